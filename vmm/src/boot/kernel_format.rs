//! What `--kernel` is: an uncompressed `vmlinux` ELF, or a bzImage (a distribution's
//! `/boot/vmlinuz-*`), told apart by their magic numbers. For a bzImage, the fields of
//! its setup header the 64-bit boot protocol needs (Documentation/arch/x86/boot.rst),
//! read from the file's bytes and checked.

use std::io::{Read, Seek, SeekFrom};

/// `boot_flag` at 0x1fe and `header` ("HdrS") at 0x202 mark a bzImage.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// xloadflags (protocol 2.12) is the first field that says whether the kernel has the
/// 64-bit entry point.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags`: the protected-mode code is loaded at 0x100000 or above.
const LOADED_HIGH: u8 = 1 << 0;
/// The 64-bit entry's offset from where the protected-mode kernel is loaded.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Bytes read to tell the formats apart: the whole setup header (it ends before 0x270).
const HEAD_LEN: usize = 0x270;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("cannot read the kernel image: {0}")]
    Read(String),
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' setup header)")]
    Unknown,
    #[error("the bzImage speaks boot protocol {}.{:02}; the 64-bit entry needs 2.12 or later (Linux 3.8+)", .0 >> 8, .0 & 0xff)]
    TooOld(u16),
    #[error("the bzImage has no 64-bit entry point (xloadflags {0:#x} lacks XLF_KERNEL_64): a 32-bit kernel?")]
    No64BitEntry(u16),
    #[error("the bzImage does not load high (loadflags {0:#x}): a zImage?")]
    NotLoadedHigh(u8),
    #[error("the bzImage is truncated: {setup} bytes of setup code, file of {size} bytes")]
    Truncated { setup: u64, size: u64 },
    #[error("the bzImage's setup header is inconsistent: {0}")]
    BadHeader(&'static str),
}

/// The setup header fields the loader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageHeader {
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    /// Where the kernel wants to run; the protected-mode part is loaded here.
    pub pref_address: u64,
    /// Memory the kernel needs from its load address before it reads the memory map
    /// (decompression buffer included).
    pub init_size: u32,
    /// Highest address the initrd's last byte may have.
    pub initrd_addr_max: u32,
    /// Longest command line, without its NUL.
    pub cmdline_size: u32,
    /// Bytes of the protected-mode kernel (the file less its setup sectors).
    pub payload_len: u64,
}

/// The two kernel formats `--kernel` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage(BzImageHeader),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl KernelFormat {
    /// Reads the start of `image`, says which format it is, and leaves the file at its
    /// start for the loader.
    pub fn detect<F: Read + Seek>(image: &mut F) -> Result<Self, FormatError> {
        let read_err = |e: std::io::Error| FormatError::Read(e.to_string());
        let size = image.seek(SeekFrom::End(0)).map_err(read_err)?;
        image.seek(SeekFrom::Start(0)).map_err(read_err)?;
        let mut head = Vec::with_capacity(HEAD_LEN);
        image
            .by_ref()
            .take(HEAD_LEN as u64)
            .read_to_end(&mut head)
            .map_err(read_err)?;
        image.seek(SeekFrom::Start(0)).map_err(read_err)?;
        Self::from_head(&head, size)
    }

    /// Decides from the first bytes of an image of `size` bytes.
    pub fn from_head(head: &[u8], size: u64) -> Result<Self, FormatError> {
        if head.starts_with(b"\x7fELF") {
            return Ok(Self::Elf);
        }
        if head.len() < HEAD_LEN
            || u16_at(head, 0x1fe) != BOOT_FLAG_MAGIC
            || u32_at(head, 0x202) != HDRS_MAGIC
        {
            return Err(FormatError::Unknown);
        }
        let version = u16_at(head, 0x206);
        if version < MIN_PROTOCOL {
            return Err(FormatError::TooOld(version));
        }
        let loadflags = head[0x211];
        if loadflags & LOADED_HIGH == 0 {
            return Err(FormatError::NotLoadedHigh(loadflags));
        }
        let xloadflags = u16_at(head, 0x236);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(FormatError::No64BitEntry(xloadflags));
        }
        // 0 setup sectors means 4, for very old kernels; plus the boot sector.
        let sects = match head[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let setup = (sects + 1) * 512;
        if size <= setup {
            return Err(FormatError::Truncated { setup, size });
        }
        let header = BzImageHeader {
            version,
            pref_address: u64_at(head, 0x258),
            init_size: u32_at(head, 0x260),
            initrd_addr_max: u32_at(head, 0x22c),
            cmdline_size: u32_at(head, 0x238),
            payload_len: size - setup,
        };
        if header.init_size == 0 {
            return Err(FormatError::BadHeader("init_size is 0"));
        }
        if header.pref_address == 0 {
            return Err(FormatError::BadHeader("pref_address is 0"));
        }
        Ok(Self::BzImage(header))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bzImage-shaped file: setup sectors with a 2.15 header asking to run at
    /// 16 MiB with `init_size` 32 MiB, then `payload`.
    pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[0x1f1] = setup_sects;
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = LOADED_HIGH;
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        image[0x234] = 1;
        image[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&(32u32 << 20).to_le_bytes());
        image.extend_from_slice(payload);
        image
    }

    fn detect(bytes: &[u8]) -> Result<KernelFormat, FormatError> {
        KernelFormat::detect(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn elf_and_bzimage_are_told_apart() {
        assert_eq!(detect(b"\x7fELF\x02\x01\x01").unwrap(), KernelFormat::Elf);
        let image = fake_bzimage(&[0x90; 1000]);
        let KernelFormat::BzImage(h) = detect(&image).unwrap() else {
            panic!("a bzImage");
        };
        assert_eq!(
            h,
            BzImageHeader {
                version: 0x020f,
                pref_address: 16 << 20,
                init_size: 32 << 20,
                initrd_addr_max: 0x7fff_ffff,
                cmdline_size: 2047,
                payload_len: 1000,
            }
        );
    }

    #[test]
    fn other_files_and_unsuitable_kernels_are_refused_by_name() {
        assert_eq!(detect(b"").unwrap_err(), FormatError::Unknown);
        assert_eq!(
            detect(b"this is not a kernel").unwrap_err(),
            FormatError::Unknown
        );
        assert_eq!(detect(&[0u8; 4096]).unwrap_err(), FormatError::Unknown);

        let mut old = fake_bzimage(&[1; 10]);
        old[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
        let err = detect(&old).unwrap_err();
        assert_eq!(err, FormatError::TooOld(0x020b));
        assert!(err.to_string().contains("protocol 2.11"), "{err}");

        let mut x32 = fake_bzimage(&[1; 10]);
        x32[0x236..0x238].copy_from_slice(&0x0u16.to_le_bytes());
        assert!(detect(&x32)
            .unwrap_err()
            .to_string()
            .contains("no 64-bit entry point"));

        let mut low = fake_bzimage(&[1; 10]);
        low[0x211] = 0;
        assert_eq!(detect(&low).unwrap_err(), FormatError::NotLoadedHigh(0));

        let header_only = fake_bzimage(&[]);
        assert!(matches!(
            detect(&header_only).unwrap_err(),
            FormatError::Truncated { setup: 2048, .. }
        ));

        let mut no_init = fake_bzimage(&[1; 10]);
        no_init[0x260..0x264].fill(0);
        assert!(matches!(
            detect(&no_init).unwrap_err(),
            FormatError::BadHeader(_)
        ));
    }

    #[test]
    fn detection_leaves_the_file_at_its_start() {
        let image = fake_bzimage(&[7; 100]);
        let mut cursor = std::io::Cursor::new(&image);
        KernelFormat::detect(&mut cursor).unwrap();
        assert_eq!(cursor.position(), 0);
    }
}
