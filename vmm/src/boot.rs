//! 64-bit direct boot of a Linux kernel: the kernel image, the initramfs, the command
//! line, the zero page with its e820 map, identity page tables and a GDT.
//!
//! Two kernel formats ([`KernelFormat`], detected from the file):
//! - an uncompressed `vmlinux` ELF, entered at its ELF entry point (`startup_64`), as
//!   Firecracker does, skipping the 16-bit setup code and the decompressor;
//! - a bzImage (a distribution's `/boot/vmlinuz-*`): its protected-mode part is loaded
//!   at the header's `pref_address` and entered through the 64-bit boot protocol at
//!   load address + 0x200, which runs the kernel's own decompressor; the zero page
//!   starts from the image's setup header.

mod kernel_format;

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, MemoryLayout};
pub use kernel_format::{BzImageHeader, FormatError, KernelFormat};

/// Flags of the boot GDT entries: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Boot-protocol constants (Documentation/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The zero page holds at most this many e820 entries.
const E820_MAX: usize = 128;
/// Our boot page tables identity-map this much (see [`write_page_tables`]): a bzImage's
/// decompressor runs in it before it builds its own.
const IDENTITY_MAPPED: u64 = 1 << 30;
/// Without a setup header to say otherwise (ELF), the initrd stays below 2 GiB, the
/// `initrd_addr_max` of older kernels.
const ELF_INITRD_LIMIT: u64 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("kernel: {0}")]
    Format(#[from] FormatError),
    #[error("cannot load the {format} kernel: {source}")]
    Kernel {
        format: &'static str,
        source: linux_loader::loader::Error,
    },
    #[error("the bzImage needs memory up to {needs:#x} (runs at {load:#x}, init_size {init_size:#x}), but low memory ends at {memory:#x}")]
    KernelTooLarge {
        load: u64,
        init_size: u64,
        needs: u64,
        memory: u64,
    },
    #[error("the bzImage wants to run at {0:#x}, outside 1 MiB..1 GiB where it can be loaded")]
    BadLoadAddress(u64),
    #[error("the kernel command line is {len} bytes, this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("the initramfs ({size} bytes) does not fit in low memory above the kernel (ends at {kernel_end:#x}, memory at {limit:#x})")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot write boot data to guest memory: {0}")]
    GuestMemory(String),
    #[error("{0} e820 entries, the zero page holds at most 128")]
    TooManyE820(usize),
}

/// Where things were put.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub format: KernelFormat,
    pub entry: u64,
    pub initramfs: Option<(u64, u64)>,
}

/// A kernel in guest memory, and what it asks of the rest of the boot.
struct LoadedKernel {
    entry: u64,
    /// First address above everything the kernel needs before it reads the memory map.
    end: u64,
    /// The initrd must end at or below this address.
    initrd_limit: u64,
    /// A bzImage's setup header, which the zero page starts from.
    setup_header: Option<setup_header>,
    /// The longest command line the kernel takes, in bytes without the NUL.
    cmdline_max: usize,
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::GuestMemory(e.to_string())
}

/// Builds the kernel command line: our defaults, then what the user added.
pub fn cmdline(defaults: &str, extra: Option<&str>) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(defaults)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    if let Some(extra) = extra.filter(|s| !s.trim().is_empty()) {
        cmdline
            .insert_str(extra.trim())
            .map_err(|e| BootError::Cmdline(format!("{e} (in '{extra}')")))?;
    }
    Ok(cmdline)
}

/// Loads everything the kernel needs and returns its entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel_path: &std::path::Path,
    initramfs_path: Option<&std::path::Path>,
    cmdline: &Cmdline,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let open = |what, path: &std::path::Path| {
        File::open(path).map_err(|source| BootError::Open {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let mut file = open("kernel", kernel_path)?;
    let format = KernelFormat::detect(&mut file)?;
    let kernel = match format {
        KernelFormat::Elf => load_elf(mem, &mut file)?,
        KernelFormat::BzImage(header) => load_bzimage(mem, layout, &mut file, &header)?,
    };

    let initramfs = match initramfs_path {
        Some(path) => Some(load_initramfs(
            mem,
            layout,
            open("initramfs", path)?,
            kernel.end,
            kernel.initrd_limit,
        )?),
        None => None,
    };
    load_cmdline(mem, GuestAddress(layout::CMDLINE), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    if cmdline_len > kernel.cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max: kernel.cmdline_max,
        });
    }

    let mut params = boot_params::default();
    match kernel.setup_header {
        // The boot protocol: the zero page starts as a copy of the image's setup header,
        // and cmdline_size stays the kernel's limit.
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            params.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    let e820 = layout.e820();
    if e820.len() > E820_MAX {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = kind;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(mem_err)?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootInfo {
        format,
        entry: kernel.entry,
        initramfs,
    })
}

fn load_elf(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel, BootError> {
    let loaded =
        Elf::load(mem, None, file, Some(GuestAddress(layout::HIMEM_START))).map_err(|source| {
            BootError::Kernel {
                format: "ELF",
                source,
            }
        })?;
    Ok(LoadedKernel {
        entry: loaded.kernel_load.raw_value(),
        end: loaded.kernel_end,
        initrd_limit: ELF_INITRD_LIMIT,
        setup_header: None,
        cmdline_max: layout::CMDLINE_MAX - 1,
    })
}

/// Loads a bzImage's protected-mode part at its preferred address, where it runs (so a
/// non-relocatable kernel need not move), after checking that the memory it needs to
/// decompress itself is there and identity-mapped.
fn load_bzimage(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    file: &mut File,
    header: &BzImageHeader,
) -> Result<LoadedKernel, BootError> {
    let load = header.pref_address;
    if !(layout::HIMEM_START..IDENTITY_MAPPED).contains(&load) {
        return Err(BootError::BadLoadAddress(load));
    }
    let init_size = u64::from(header.init_size);
    let needs = load + init_size.max(header.payload_len);
    let memory = layout.low_memory_end().min(IDENTITY_MAPPED);
    if needs > memory {
        return Err(BootError::KernelTooLarge {
            load,
            init_size,
            needs,
            memory,
        });
    }
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(load)),
        file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::Kernel {
        format: "bzImage",
        source,
    })?;
    log::info!(
        "kernel: bzImage, boot protocol {}.{:02}, {} KiB loaded at {load:#x}, {} MiB reserved to decompress",
        header.version >> 8,
        header.version & 0xff,
        header.payload_len >> 10,
        init_size >> 20
    );
    Ok(LoadedKernel {
        entry: load + kernel_format::ENTRY_64_OFFSET,
        end: needs,
        initrd_limit: u64::from(header.initrd_addr_max) + 1,
        setup_header: loaded.setup_header,
        cmdline_max: (header.cmdline_size as usize).min(layout::CMDLINE_MAX - 1),
    })
}

/// Puts the initramfs at the top of the memory that starts at 0, ending at or below
/// `limit` (the kernel's `initrd_addr_max` + 1), page aligned, and above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    mut file: File,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = file.metadata().map_err(mem_err)?.len();
    let limit = layout.low_memory_end().min(limit);
    let addr = limit.checked_sub(size).map(|a| a & !0xfff).unwrap_or(0);
    if size == 0 || addr < kernel_end {
        return Err(BootError::InitramfsTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(mem_err)?;
    Ok((addr, size))
}

/// Identity-maps the first GiB with 2 MiB pages; the kernel builds its own tables soon.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_obj(layout::PDPT | 0x03, GuestAddress(layout::PML4))
        .map_err(mem_err)?;
    mem.write_obj(layout::PD | 0x03, GuestAddress(layout::PDPT))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PD + i * 8))
            .map_err(mem_err)?;
    }
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT + i as u64 * 8))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(mem_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn gdt_entries_are_long_mode_code_and_flat_data() {
        assert_eq!(GDT[0], 0);
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn cmdline_joins_defaults_and_extra() {
        let c = cmdline("console=ttyS0 panic=1", Some("  foo=bar -- poweroff ")).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 panic=1 foo=bar -- poweroff"
        );
        let too_long = "x".repeat(layout::CMDLINE_MAX + 1);
        assert!(matches!(
            cmdline("a", Some(&too_long)),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn boot_structures_are_written_and_garbage_kernels_refused() {
        let layout = MemoryLayout::new(&[64 << 20]).unwrap();
        let ram = crate::memory::GuestRam::new(&layout, 1).unwrap();
        let dir = std::env::temp_dir().join(format!("mempower-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("not-an-elf");
        std::fs::write(&bogus, b"this is not a kernel").unwrap();
        let c = cmdline("console=ttyS0", None).unwrap();
        let err = load(&ram.memory, &layout, &bogus, None, &c, 0).unwrap_err();
        assert!(
            matches!(err, BootError::Format(FormatError::Unknown)),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
        let mut elf_garbage = b"\x7fELF".to_vec();
        elf_garbage.resize(64, 0);
        std::fs::write(&bogus, elf_garbage).unwrap();
        let err = load(&ram.memory, &layout, &bogus, None, &c, 0).unwrap_err();
        assert!(
            matches!(err, BootError::Kernel { format: "ELF", .. }),
            "{err}"
        );
        let err = load(&ram.memory, &layout, &dir.join("missing"), None, &c, 0).unwrap_err();
        assert!(err.to_string().contains("cannot open kernel"), "{err}");

        write_page_tables(&ram.memory).unwrap();
        let pde: u64 = ram.memory.read_obj(GuestAddress(layout::PD + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);

        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let open = || File::open(&initrd).unwrap();
        let (addr, size) =
            load_initramfs(&ram.memory, &layout, open(), 16 << 20, ELF_INITRD_LIMIT).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        assert!(ram.memory.address_in_range(GuestAddress(addr)));
        let err =
            load_initramfs(&ram.memory, &layout, open(), 64 << 20, ELF_INITRD_LIMIT).unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }));
        // The kernel's initrd_addr_max is a limit, even with memory above it.
        let (addr, _) = load_initramfs(&ram.memory, &layout, open(), 16 << 20, 40 << 20).unwrap();
        assert!(addr + size <= 40 << 20 && addr >= 16 << 20);
        let err = load_initramfs(&ram.memory, &layout, open(), 16 << 20, 16 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Loads the fake bzImage (runs at 16 MiB, needs 32 MiB there) in `memory_mib`.
    fn load_fake_bzimage(
        memory_mib: u64,
        edit: impl FnOnce(&mut Vec<u8>),
        extra_cmdline: Option<&str>,
    ) -> Result<(BootInfo, GuestMemoryMmap, Vec<u8>), BootError> {
        let layout = MemoryLayout::new(&[memory_mib << 20]).unwrap();
        let ram = crate::memory::GuestRam::new(&layout, 1).unwrap();
        static CASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "mempower-bzimage-test-{}-{case}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let payload: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut image = kernel_format::tests::fake_bzimage(&payload);
        // The initrd must end at or below 96 MiB.
        image[0x22c..0x230].copy_from_slice(&(0x600_0000u32 - 1).to_le_bytes());
        edit(&mut image);
        std::fs::write(dir.join("bzImage"), &image).unwrap();
        std::fs::write(dir.join("initrd"), vec![0x5a; 20_000]).unwrap();
        let c = cmdline("console=ttyS0", extra_cmdline).unwrap();
        let info = load(
            &ram.memory,
            &layout,
            &dir.join("bzImage"),
            Some(&dir.join("initrd")),
            &c,
            0xe0000,
        );
        std::fs::remove_dir_all(&dir).unwrap();
        info.map(|info| (info, ram.memory.clone(), payload))
    }

    #[test]
    fn a_bzimage_runs_at_its_preferred_address_through_the_64_bit_entry() {
        let (info, mem, payload) = load_fake_bzimage(256, |_| {}, None).unwrap();
        assert!(matches!(info.format, KernelFormat::BzImage(_)));
        assert_eq!(info.entry, (16 << 20) + 0x200);
        let mut loaded = vec![0u8; payload.len()];
        mem.read_slice(&mut loaded, GuestAddress(16 << 20)).unwrap();
        assert_eq!(
            loaded, payload,
            "the protected-mode part, without setup sectors"
        );

        let (addr, size) = info.initramfs.unwrap();
        assert_eq!(size, 20_000);
        assert!(addr >= 48 << 20, "above the decompression area: {addr:#x}");
        assert!(
            addr + size <= 0x600_0000,
            "below initrd_addr_max: {addr:#x}"
        );

        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.version }, 0x020f, "copied from the image");
        assert_eq!({ hdr.cmdline_size }, 2047, "the kernel's limit, kept");
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.code32_start }, 16 << 20);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (addr as u32, 20_000)
        );
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert!(params.e820_entries >= 3);
    }

    #[test]
    fn a_bzimage_that_cannot_run_here_is_refused_by_name() {
        let err = load_fake_bzimage(32, |_| {}, None).unwrap_err();
        assert!(
            matches!(err, BootError::KernelTooLarge { needs, .. } if needs == 48 << 20),
            "{err}"
        );
        let err = load_fake_bzimage(
            256,
            |image| image[0x238..0x23c].copy_from_slice(&20u32.to_le_bytes()),
            Some("a-long-parameter=1"),
        )
        .unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { max: 20, .. }),
            "{err}"
        );
        let err = load_fake_bzimage(
            256,
            |image| image[0x258..0x260].copy_from_slice(&(2u64 << 30).to_le_bytes()),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BootError::BadLoadAddress(_)), "{err}");
        let err = load_fake_bzimage(
            256,
            |image| image[0x236..0x238].copy_from_slice(&0u16.to_le_bytes()),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, BootError::Format(FormatError::No64BitEntry(0))),
            "{err}"
        );
    }
}
