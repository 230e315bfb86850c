//! The device configuration space (`struct virtio_blk_config`, virtio 1.2
//! section 5.2.4), the disk's identity (the GET_ID serial) and the disk
//! parameters a VMM passes in.
//!
//! Only the fields the device offers are laid out; everything past `blk_size`
//! belongs to features it does not offer and reads as zero. Little-endian:
//!
//! | offset | size | field        | feature                 |
//! |--------|------|--------------|-------------------------|
//! | 0      | 8    | `capacity`   | always (512-byte units) |
//! | 8      | 4    | `size_max`   | `VIRTIO_BLK_F_SIZE_MAX` |
//! | 12     | 4    | `seg_max`    | `VIRTIO_BLK_F_SEG_MAX`  |
//! | 16     | 4    | `geometry`   | not offered (zero)      |
//! | 20     | 4    | `blk_size`   | `VIRTIO_BLK_F_BLK_SIZE` |

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The protocol's sector size: `capacity` and request sectors count in it,
/// whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Size in bytes of the configuration space the device exposes.
pub const CONFIG_SPACE_SIZE: usize = 24;
/// Offset of `capacity`.
pub const OFFSET_CAPACITY: usize = 0;
/// Offset of `size_max`.
pub const OFFSET_SIZE_MAX: usize = 8;
/// Offset of `seg_max`.
pub const OFFSET_SEG_MAX: usize = 12;
/// Offset of `blk_size`.
pub const OFFSET_BLK_SIZE: usize = 20;
/// Length of the GET_ID serial (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Largest `blk_size` accepted: Linux wants its logical block size to fit a page.
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// Invalid disk parameters.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `id=` is empty.
    #[error("disk id is empty")]
    IdEmpty,
    /// `id=` is longer than the 20-byte serial.
    #[error("disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    /// `id=` has a byte that is not printable ASCII (space excluded).
    #[error("disk id {0:?} must be printable ASCII without spaces")]
    IdNotPrintable(String),
    /// `blk_size` is not a power of two in 512..=4096.
    #[error("block size {0} is not a power of two between {SECTOR_SIZE} and {MAX_BLOCK_SIZE}")]
    BlockSize(u32),
}

/// The disk's serial as GET_ID returns it: ASCII, NUL-padded to 20 bytes, with
/// no terminator when it is exactly 20 bytes long (virtio 1.2 section 5.2.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskId([u8; ID_BYTES]);

impl DiskId {
    /// A serial given by the user (`id=NAME`). Guest tools show it in
    /// `/dev/disk/by-id/virtio-NAME`, hence printable ASCII without spaces.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        if name.is_empty() {
            return Err(ConfigError::IdEmpty);
        }
        if name.len() > ID_BYTES {
            return Err(ConfigError::IdTooLong(name.into()));
        }
        if !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::IdNotPrintable(name.into()));
        }
        let mut id = [0u8; ID_BYTES];
        id[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Self(id))
    }

    /// A stable default serial for a disk without `id=`: `mp` and the 64-bit
    /// FNV-1a hash of its canonical path in hex (18 bytes). The same image
    /// keeps its serial across runs however its path is spelled; FNV is used
    /// because std's hasher may change between Rust releases.
    pub fn from_path(path: &Path) -> Self {
        let path = path
            .canonicalize()
            .or_else(|_| std::path::absolute(path))
            .unwrap_or_else(|_| path.to_path_buf());
        let hash = fnv1a(path.as_os_str().as_encoded_bytes());
        Self::new(&format!("mp{hash:016x}")).expect("18 hex characters form a valid id")
    }

    /// The 20 bytes GET_ID writes.
    pub fn as_bytes(&self) -> &[u8; ID_BYTES] {
        &self.0
    }

    /// The serial without its NUL padding.
    pub fn as_str(&self) -> &str {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        // Constructed from printable ASCII only.
        std::str::from_utf8(&self.0[..len]).unwrap_or_default()
    }
}

/// 64-bit FNV-1a: tiny, and fixed forever, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskId({:?})", self.as_str())
    }
}

impl Serialize for DiskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One disk as the user describes it (`--disk path=IMG[,readonly=on][,id=NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file (or block device).
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// GET_ID serial; `None` derives one from the path ([`DiskId::from_path`]).
    pub id: Option<String>,
    /// `blk_size` offered to the guest; 512 unless the image was formatted
    /// for bigger logical blocks (Linux then uses it as its sector size, so
    /// a wrong value breaks the partition table).
    pub block_size: u32,
}

impl DiskConfig {
    /// A read-write disk with a path-derived id and 512-byte blocks.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            readonly: false,
            id: None,
            block_size: SECTOR_SIZE as u32,
        }
    }

    /// The serial GET_ID returns: `id` if given, else derived from the path.
    pub fn disk_id(&self) -> Result<DiskId, ConfigError> {
        match &self.id {
            Some(name) => DiskId::new(name),
            None => Ok(DiskId::from_path(&self.path)),
        }
    }
}

/// Checks a `blk_size`: a power of two from 512 to 4096.
pub fn check_block_size(block_size: u32) -> Result<u32, ConfigError> {
    if block_size.is_power_of_two()
        && u64::from(block_size) >= SECTOR_SIZE
        && block_size <= MAX_BLOCK_SIZE
    {
        Ok(block_size)
    } else {
        Err(ConfigError::BlockSize(block_size))
    }
}

/// A snapshot of the offered part of `struct virtio_blk_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VirtioBlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment the driver may use, in bytes.
    pub size_max: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Optimal (logical) block size in bytes.
    pub blk_size: u32,
}

impl VirtioBlkConfig {
    /// Serializes to the exact little-endian spec layout.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[OFFSET_CAPACITY..OFFSET_CAPACITY + 8].copy_from_slice(&self.capacity.to_le_bytes());
        b[OFFSET_SIZE_MAX..OFFSET_SIZE_MAX + 4].copy_from_slice(&self.size_max.to_le_bytes());
        b[OFFSET_SEG_MAX..OFFSET_SEG_MAX + 4].copy_from_slice(&self.seg_max.to_le_bytes());
        b[OFFSET_BLK_SIZE..OFFSET_BLK_SIZE + 4].copy_from_slice(&self.blk_size.to_le_bytes());
        b
    }

    /// Reads `data.len()` bytes at `offset`, as a transport would on a driver
    /// access. Any offset and length is accepted: bytes beyond the
    /// configuration space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.to_bytes();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)) else {
            return;
        };
        let n = data.len().min(src.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_bytes_at_each_offset() {
        let c = VirtioBlkConfig {
            capacity: 0x0102_0304_0506_0708,
            size_max: 0x1112_1314,
            seg_max: 0x2122_2324,
            blk_size: 0x3132_3334,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..12], &0x1112_1314u32.to_le_bytes());
        assert_eq!(&b[12..16], &0x2122_2324u32.to_le_bytes());
        assert_eq!(&b[16..20], &[0u8; 4], "geometry is not offered");
        assert_eq!(&b[20..24], &0x3132_3334u32.to_le_bytes());
        for width in [1usize, 2, 4, 8] {
            for off in 0..CONFIG_SPACE_SIZE + 8 {
                let mut d = vec![0xffu8; width];
                c.read(off as u64, &mut d);
                for (i, byte) in d.iter().enumerate() {
                    let want = b.get(off + i).copied().unwrap_or(0);
                    assert_eq!(*byte, want, "offset {off} width {width} byte {i}");
                }
            }
        }
        for off in [24u64, 1000, u64::from(u32::MAX), u64::MAX] {
            let mut d = [0xaau8; 16];
            c.read(off, &mut d);
            assert_eq!(d, [0u8; 16]);
        }
        c.read(u64::MAX, &mut []);
    }

    #[test]
    fn ids_are_checked_and_padded() {
        let id = DiskId::new("root").unwrap();
        assert_eq!(&id.as_bytes()[..4], b"root");
        assert_eq!(&id.as_bytes()[4..], &[0u8; 16]);
        assert_eq!(id.to_string(), "root");
        let full = DiskId::new("abcdefghijklmnopqrst").unwrap();
        assert_eq!(
            full.as_bytes(),
            b"abcdefghijklmnopqrst",
            "no NUL at 20 bytes"
        );
        assert_eq!(full.as_str().len(), 20);
        assert_eq!(DiskId::new(""), Err(ConfigError::IdEmpty));
        assert!(matches!(
            DiskId::new("abcdefghijklmnopqrstu"),
            Err(ConfigError::IdTooLong(_))
        ));
        for bad in ["a b", "a\0b", "é", "tab\t"] {
            assert!(
                matches!(DiskId::new(bad), Err(ConfigError::IdNotPrintable(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn path_ids_are_stable_and_distinct() {
        let a = DiskId::from_path(Path::new("/nonexistent/disk-a.img"));
        assert_eq!(a, DiskId::from_path(Path::new("/nonexistent/disk-a.img")));
        assert_eq!(
            a,
            DiskId::from_path(Path::new("/nonexistent/./disk-a.img")),
            "the canonical spelling counts"
        );
        let b = DiskId::from_path(Path::new("/nonexistent/disk-b.img"));
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("mp"));
        assert_eq!(a.as_str().len(), 18);
        let hash = fnv1a(b"/nonexistent/disk-a.img");
        assert_eq!(a.as_str(), format!("mp{hash:016x}"));
        // Published FNV-1a 64 test vectors: the serials never change.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn disk_config_defaults_and_block_sizes() {
        let c = DiskConfig::new("/nonexistent/x.img");
        assert!(!c.readonly);
        assert_eq!(c.block_size, 512);
        assert_eq!(
            c.disk_id().unwrap(),
            DiskId::from_path(Path::new("/nonexistent/x.img"))
        );
        let named = DiskConfig {
            id: Some("data".into()),
            ..c.clone()
        };
        assert_eq!(named.disk_id().unwrap().as_str(), "data");
        let bad = DiskConfig {
            id: Some(String::new()),
            ..c
        };
        assert_eq!(bad.disk_id(), Err(ConfigError::IdEmpty));
        for ok in [512, 1024, 2048, 4096] {
            assert_eq!(check_block_size(ok), Ok(ok));
        }
        for bad in [0, 256, 513, 3000, 8192, u32::MAX] {
            assert_eq!(check_block_size(bad), Err(ConfigError::BlockSize(bad)));
        }
    }
}
