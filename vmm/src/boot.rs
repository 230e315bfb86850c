//! 64-bit direct boot of an uncompressed `vmlinux`: the ELF image, the initramfs, the
//! command line, the zero page with its e820 map, identity page tables and a GDT.
//!
//! The kernel is entered at its ELF entry point (`startup_64`) in long mode, as
//! Firecracker does, skipping the 16-bit setup code and the decompressor.

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, MemoryLayout};

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

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load the kernel (an uncompressed vmlinux ELF is expected): {0}")]
    Kernel(linux_loader::loader::Error),
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
    pub entry: u64,
    pub initramfs: Option<(u64, u64)>,
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
    let mut kernel = open("kernel", kernel_path)?;
    let loaded = Elf::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(BootError::Kernel)?;
    let kernel_end = loaded.kernel_end;

    let initramfs = match initramfs_path {
        Some(path) => Some(load_initramfs(
            mem,
            layout,
            open("initramfs", path)?,
            kernel_end,
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

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
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
        entry: loaded.kernel_load.raw_value(),
        initramfs,
    })
}

/// Puts the initramfs at the top of the memory that starts at 0, below 2 GiB (older
/// kernels' `initrd_addr_max`), page aligned, and above the kernel image.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    mut file: File,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = file.metadata().map_err(mem_err)?.len();
    let limit = layout.low_memory_end().min(1 << 31);
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
        assert!(matches!(err, BootError::Kernel(_)), "{err}");
        let err = load(&ram.memory, &layout, &dir.join("missing"), None, &c, 0).unwrap_err();
        assert!(err.to_string().contains("cannot open kernel"), "{err}");

        write_page_tables(&ram.memory).unwrap();
        let pde: u64 = ram.memory.read_obj(GuestAddress(layout::PD + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);

        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let (addr, size) =
            load_initramfs(&ram.memory, &layout, File::open(&initrd).unwrap(), 16 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        assert!(ram.memory.address_in_range(GuestAddress(addr)));
        let err = load_initramfs(&ram.memory, &layout, File::open(&initrd).unwrap(), 64 << 20)
            .unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
