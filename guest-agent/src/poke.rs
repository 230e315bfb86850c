//! `poke`: reads, writes and reads again guest-physical memory through /dev/mem, as a
//! hostile guest would do to memory the host took back. Bounded: at most
//! [`MAX_POKE`] bytes, and never in RAM the guest kernel owns (a `System RAM` range of
//! /proc/iomem, unless every page poked is logically offline there: a virtio-mem
//! sub-block the driver unplugged, `PG_offline` in /proc/kpageflags), so the agent cannot
//! be made to corrupt its own guest.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use agent_protocol::MAX_POKE;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PokeError {
    #[error("a poke of {0} bytes: 1 to {MAX_POKE} are allowed")]
    Size(u32),
    #[error("a poke of 0xff cannot tell a dropped write from a kept one")]
    AllOnes,
    #[error("{addr:#x}+{len:#x} is beyond the physical address space")]
    Overflow { addr: u64, len: u32 },
    #[error(
        "{addr:#x}+{len:#x} overlaps guest RAM in use ({start:#x}-{end:#x} {name}); only \
         memory the guest does not own may be poked"
    )]
    GuestRam {
        addr: u64,
        len: u32,
        start: u64,
        end: u64,
        name: String,
    },
    #[error("cannot read /proc/iomem: {0}")]
    Iomem(io::Error),
    #[error("cannot read /proc/kpageflags at page {pfn:#x}: {source}")]
    PageFlags { pfn: u64, source: io::Error },
    #[error("cannot {what} /dev/mem at {addr:#x}: {source}")]
    DevMem {
        what: &'static str,
        addr: u64,
        source: io::Error,
    },
}

impl PokeError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Size(_) | Self::AllOnes | Self::Overflow { .. } => libc::EINVAL,
            Self::GuestRam { .. } => libc::EPERM,
            Self::Iomem(e) | Self::PageFlags { source: e, .. } | Self::DevMem { source: e, .. } => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// What one poke read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poked {
    pub ones_before: u32,
    pub ones_after: u32,
    pub written_after: u32,
}

/// The `System RAM` ranges of an /proc/iomem text (nested ones too), inclusive.
fn system_ram(iomem: &str) -> Vec<(u64, u64, String)> {
    iomem
        .lines()
        .filter_map(|line| {
            let (range, name) = line.trim_start().split_once(" : ")?;
            if !name.starts_with("System RAM") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((start, end, name.to_string()))
        })
        .collect()
}

/// `PG_offline` in /proc/kpageflags (KPF_OFFLINE, linux/kernel-page-flags.h).
const KPF_OFFLINE: u64 = 1 << 23;
const PAGE: u64 = 4096;

/// Whether every page of `[addr, last]` is logically offline: RAM the kernel has given
/// up, such as virtio-mem's unplugged sub-blocks inside a plugged memory block.
fn all_offline(root: &Path, addr: u64, last: u64) -> Result<bool, PokeError> {
    let flags = std::fs::File::open(root.join("proc/kpageflags")).map_err(|source| {
        PokeError::PageFlags {
            pfn: addr / PAGE,
            source,
        }
    })?;
    for pfn in addr / PAGE..=last / PAGE {
        let mut word = [0u8; 8];
        flags
            .read_exact_at(&mut word, pfn * 8)
            .map_err(|source| PokeError::PageFlags { pfn, source })?;
        if u64::from_le_bytes(word) & KPF_OFFLINE == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Pokes `len` bytes at `addr`: reads them, writes `byte` over them, reads them again.
/// `root` is where /proc and /dev are found (`/`).
pub fn poke(root: &Path, addr: u64, len: u32, byte: u8) -> Result<Poked, PokeError> {
    if len == 0 || len > MAX_POKE {
        return Err(PokeError::Size(len));
    }
    if byte == 0xff {
        return Err(PokeError::AllOnes);
    }
    let last = addr
        .checked_add(u64::from(len) - 1)
        .filter(|&l| i64::try_from(l).is_ok())
        .ok_or(PokeError::Overflow { addr, len })?;
    let iomem = std::fs::read_to_string(root.join("proc/iomem")).map_err(PokeError::Iomem)?;
    if let Some((start, end, name)) = system_ram(&iomem)
        .into_iter()
        .find(|(start, end, _)| *start <= last && addr <= *end)
        .filter(|_| !matches!(all_offline(root, addr, last), Ok(true)))
    {
        return Err(PokeError::GuestRam {
            addr,
            len,
            start,
            end,
            name,
        });
    }
    let dev_mem = |what| move |source| PokeError::DevMem { what, addr, source };
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("dev/mem"))
        .map_err(dev_mem("open"))?;
    let count = |buf: &[u8], value: u8| buf.iter().filter(|&&b| b == value).count() as u32;
    let mut buf = vec![0u8; len as usize];
    mem.read_exact_at(&mut buf, addr).map_err(dev_mem("read"))?;
    let ones_before = count(&buf, 0xff);
    buf.fill(byte);
    mem.write_all_at(&buf, addr).map_err(dev_mem("write"))?;
    mem.read_exact_at(&mut buf, addr)
        .map_err(dev_mem("read back"))?;
    Ok(Poked {
        ones_before,
        ones_after: count(&buf, 0xff),
        written_after: count(&buf, byte),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOMEM: &str = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000fffff : Reserved
00100000-0fffffff : System RAM
  01000000-01bfffff : Kernel code
d0000000-d0000fff : LNRO0005:00
100000000-15fffffff : virtio0
  100000000-107ffffff : System RAM (virtio_mem)
";

    /// A root with that iomem and a 64 KiB file standing in for /dev/mem at address 0.
    fn fixture(name: &str) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("poke-{name}-{}", std::process::id()));
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("proc/iomem"), IOMEM).unwrap();
        std::fs::write(root.join("dev/mem"), vec![0xffu8; 0x10000]).unwrap();
        // Page flags for the first 16 pages: page 5 alone is logically offline.
        let flags: Vec<u8> = (0..16u64)
            .flat_map(|pfn| if pfn == 5 { KPF_OFFLINE } else { 1 << 10 }.to_le_bytes())
            .collect();
        std::fs::write(root.join("proc/kpageflags"), flags).unwrap();
        root
    }

    #[test]
    fn logically_offline_ram_may_be_poked_and_nothing_else() {
        let root = fixture("offline");
        // Page 5 is System RAM, but unplugged: the poke goes through.
        let poked = poke(&root, 5 * PAGE, 16, 0x5a).unwrap();
        assert_eq!(poked.written_after, 16);
        // Running into page 6 (in use), or beyond the flags file, is refused.
        let err = poke(&root, 6 * PAGE - 8, 16, 0x5a).unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        assert_eq!(
            poke(&root, 0x1_0000_0000, 8, 1).unwrap_err().errno(),
            libc::EPERM
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn iomem_system_ram_is_found_at_any_depth() {
        let ram = system_ram(IOMEM);
        assert_eq!(
            ram.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            [
                (0x1000, 0x9fbff),
                (0x10_0000, 0xfff_ffff),
                (0x1_0000_0000, 0x1_07ff_ffff)
            ]
        );
        assert_eq!(ram[2].2, "System RAM (virtio_mem)");
        assert!(system_ram("garbage\nzz-1 : System RAM\n").is_empty());
    }

    #[test]
    fn a_poke_reports_what_it_read_before_and_after() {
        let root = fixture("rw");
        // The file keeps writes, unlike a released region: all ones, then the byte.
        let poked = poke(&root, 0x200, 16, 0x5a).unwrap();
        assert_eq!(
            poked,
            Poked {
                ones_before: 16,
                ones_after: 0,
                written_after: 16
            }
        );
        let data = std::fs::read(root.join("dev/mem")).unwrap();
        assert_eq!(
            &data[0x1ff..0x211],
            &[[0xff].as_slice(), &[0x5a; 16], &[0xff]].concat()
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_pokes_are_refused_before_touching_anything() {
        let root = fixture("refused");
        let errno = |r: Result<Poked, PokeError>| r.unwrap_err().errno();
        assert_eq!(errno(poke(&root, 0x200, 0, 1)), libc::EINVAL);
        assert_eq!(errno(poke(&root, 0x200, MAX_POKE + 1, 1)), libc::EINVAL);
        assert_eq!(errno(poke(&root, 0x200, 1, 0xff)), libc::EINVAL);
        assert_eq!(errno(poke(&root, u64::MAX, 2, 1)), libc::EINVAL);
        // Guest RAM, including a range that only ends in it and virtio-mem's plugged part.
        let err = poke(&root, 0xff8, 16, 1).unwrap_err();
        assert_eq!(err.errno(), libc::EPERM);
        assert!(
            err.to_string().contains("0x1000-0x9fbff System RAM"),
            "{err}"
        );
        assert_eq!(errno(poke(&root, 0x1_07ff_f000, 8, 1)), libc::EPERM);
        // The unplugged rest of the virtio-mem device's range is not RAM: the fixture's
        // "/dev/mem" is too short for it, so the read fails with the kernel's errno.
        let err = poke(&root, 0x1_0800_0000, 8, 1).unwrap_err();
        assert!(
            matches!(err, PokeError::DevMem { what: "read", .. }),
            "{err}"
        );
        let data = std::fs::read(root.join("dev/mem")).unwrap();
        assert!(data.iter().all(|&b| b == 0xff), "nothing was written");
        std::fs::remove_dir_all(&root).unwrap();
        let err = poke(&root, 0x200, 1, 1).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT, "no /proc/iomem: {err}");
    }
}
