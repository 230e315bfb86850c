//! `pin`: unmovable kernel memory on one NUMA node, held until `release`. Tests use it to
//! make a memory block impossible to offline: the kernel migrates the pages of a fill
//! (anonymous memory is movable) out of a block going offline, but not these.
//!
//! The memory is pipe buffers. `pipe_write` allocates each buffer page with GFP_HIGHUSER,
//! which lacks __GFP_MOVABLE: the page comes from a kernel zone (never ZONE_MOVABLE), the
//! kernel cannot migrate it, and offlining the memory block that holds it fails with
//! EBUSY. The page is allocated by the writing thread under that thread's memory policy,
//! so binding the thread to a node with set_mempolicy(MPOL_BIND) puts it on that node. The
//! data stays in the pipe until someone reads it (nobody does) or its last fd is closed.
//!
//! Which block of the node the pages land in is the page allocator's choice: any block of
//! the node in a kernel zone (boot memory, or a hotplugged block onlined to ZONE_NORMAL).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::held::{self, Handles, HeldError, Kind, RESERVE_KIB};
use crate::memory::PAGE_SIZE;
use crate::sys;

/// Largest single pin.
pub const MAX_PIN: u64 = 256 << 20;
/// Capacity asked of each pipe: 256 buffer pages. pipe-max-size (1 MiB by default)
/// allows it to anyone; root may go beyond, but 1 MiB keeps fds few enough already.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Bytes per write(2).
const CHUNK: usize = 64 << 10;
const MPOL_DEFAULT: libc::c_int = 0;
const MPOL_BIND: libc::c_int = 2;
/// The zones a GFP_HIGHUSER page may come from, by their names in /proc/zoneinfo. DMA is
/// left out: its lowmem reserve keeps it from such allocations anyway.
const KERNEL_ZONES: [&str; 3] = ["DMA32", "Normal", "HighMem"];

#[derive(Debug, Error)]
pub enum PinError {
    #[error(transparent)]
    Held(#[from] HeldError),
    #[error("set_mempolicy(MPOL_BIND, node {node}) failed: {source}")]
    Policy { node: u32, source: io::Error },
    #[error("{op} failed after pinning {pinned} of {bytes} bytes: {source}")]
    Pipe {
        op: &'static str,
        pinned: u64,
        bytes: u64,
        source: io::Error,
    },
}

impl PinError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Held(e) => e.errno(),
            Self::Policy { source, .. } | Self::Pipe { source, .. } => sys::errno_of(source),
        }
    }
}

/// The pins alive in this agent, by handle: the read ends of their pipes. The write ends
/// are closed once written: a pipe keeps its data while any end is open, and one fd per
/// MiB instead of two keeps even a few 256 MiB pins below init's limit of 1024 fds.
#[derive(Default)]
pub struct Pins {
    table: Mutex<HashMap<u64, Vec<OwnedFd>>>,
    handles: Arc<Handles>,
}

impl Pins {
    /// Pins whose handles come from `handles`, which other stores (fills) may share.
    pub fn new(handles: Arc<Handles>) -> Self {
        Self {
            table: Mutex::default(),
            handles,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Vec<OwnedFd>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `bytes` into pipes from the calling thread bound to `node`, keeps the pipes
    /// and returns their handle; `root` is where procfs and sysfs are found. The thread's
    /// memory policy is the default again when this returns, whatever the outcome.
    pub fn pin(&self, root: &Path, node: u32, bytes: u64) -> Result<u64, PinError> {
        if bytes == 0 || bytes > MAX_PIN {
            return Err(HeldError::BadSize {
                kind: Kind::Pin,
                bytes,
                max: MAX_PIN,
            }
            .into());
        }
        let need_kib = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE / 1024 + RESERVE_KIB;
        let check = |free_kib: u64, where_| {
            if need_kib > free_kib {
                return Err(HeldError::NotEnoughMemory {
                    kind: Kind::Pin,
                    node,
                    bytes,
                    free_kib,
                    where_,
                });
            }
            Ok(())
        };
        check(held::node_free_kib(root, node)?, "")?;
        // Free memory in ZONE_MOVABLE counts in MemFree but cannot take these pages; a
        // node whose kernel zones run dry under MPOL_BIND calls the OOM killer.
        check(kernel_zone_free_kib(root, node)?, " in its kernel zones")?;

        let bound = BoundThread::bind(node).map_err(|source| PinError::Policy { node, source })?;
        let pipes = fill_pipes(bytes);
        drop(bound);
        let pipes = pipes?;
        let handle = self.handles.next();
        self.lock().insert(handle, pipes);
        Ok(handle)
    }

    /// Closes the pipes of a pin, which frees their pages.
    pub fn release(&self, handle: u64) -> Result<(), PinError> {
        self.lock()
            .remove(&handle)
            .map(drop)
            .ok_or(PinError::Held(HeldError::UnknownHandle {
                kind: Kind::Pin,
                handle,
            }))
    }
}

/// The calling thread bound to one node until this is dropped, which restores the default
/// policy. Not `Send`: the policy is the thread's, so the guard must drop on that thread.
struct BoundThread(PhantomData<*const ()>);

impl BoundThread {
    fn bind(node: u32) -> io::Result<Self> {
        set_mempolicy(MPOL_BIND, Some(1u64 << node))?;
        Ok(Self(PhantomData))
    }
}

impl Drop for BoundThread {
    fn drop(&mut self) {
        // MPOL_DEFAULT with no mask cannot fail.
        let _ = set_mempolicy(MPOL_DEFAULT, None);
    }
}

/// Sets the calling thread's memory policy; `node < 64` is checked by the caller.
fn set_mempolicy(mode: libc::c_int, mask: Option<u64>) -> io::Result<()> {
    // maxnode is one more than the bits in the mask (the kernel reads maxnode - 1 bits),
    // so 65 makes all 64 bits of the mask count and reads exactly one u64, as in fill.rs.
    let (mask_ptr, maxnode): (*const u64, libc::c_ulong) = match &mask {
        Some(mask) => (mask, 65),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: set_mempolicy reads one u64 from `mask_ptr`, which points into `mask`, alive
    // across the call, or reads nothing (null, maxnode 0). It changes only the policy of
    // the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, mask_ptr, maxnode) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new pipe, non-blocking and close-on-exec: (read end, write end).
fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into `fds`, which has room for exactly two.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success both fds are open, new, and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Grows a pipe to PIPE_SIZE; its capacity in bytes, which may be more.
fn grow(pipe: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on an open pipe fd that `pipe` owns; no memory is passed.
    let rc = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u64)
}

/// Writes `bytes` into as many pipes as that takes, each filled to its capacity but the
/// last, and returns their read ends. On error the pipes made so far are closed.
fn fill_pipes(bytes: u64) -> Result<Vec<OwnedFd>, PinError> {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut pipes = Vec::new();
    let mut pinned = 0u64;
    let fail = |op, pinned, source| PinError::Pipe {
        op,
        pinned,
        bytes,
        source,
    };
    while pinned < bytes {
        let (read, write) = new_pipe().map_err(|e| fail("pipe2", pinned, e))?;
        let mut write = File::from(write);
        let capacity = grow(&write).map_err(|e| fail("fcntl(F_SETPIPE_SZ)", pinned, e))?;
        let want = capacity.min(bytes - pinned);
        let mut held = 0u64;
        while held < want {
            let len = (want - held).min(CHUNK as u64) as usize;
            match write.write(&chunk[..len]) {
                Ok(0) => {
                    return Err(fail(
                        "write",
                        pinned + held,
                        io::ErrorKind::WriteZero.into(),
                    ))
                }
                Ok(n) => held += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full before its capacity (it should not be): go on with a new pipe.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && held > 0 => break,
                Err(e) => return Err(fail("write", pinned + held, e)),
            }
        }
        pinned += held;
        pipes.push(read);
    }
    Ok(pipes)
}

/// Free memory in the kernel zones of `node`, from <root>/proc/zoneinfo.
fn kernel_zone_free_kib(root: &Path, node: u32) -> Result<u64, HeldError> {
    let path = root.join("proc/zoneinfo");
    let text = fs::read_to_string(&path).map_err(|e| HeldError::MemFree {
        node,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    Ok(parse_kernel_zone_free_pages(&text, node) * PAGE_SIZE / 1024)
}

/// The sum of `pages free` of the KERNEL_ZONES of `node` in /proc/zoneinfo text (0 for a
/// node without memory: zoneinfo lists populated zones only).
fn parse_kernel_zone_free_pages(text: &str, node: u32) -> u64 {
    crate::zoneinfo::parse(text)
        .iter()
        .filter(|z| z.node == node && KERNEL_ZONES.contains(&z.name.as_str()))
        .map(|z| z.free)
        .sum()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::numa::tests::Fixture;

    fn root() -> &'static Path {
        Path::new("/")
    }

    /// The calling thread's memory policy mode.
    fn thread_policy() -> libc::c_int {
        let mut mode: libc::c_int = -1;
        // SAFETY: get_mempolicy writes one int into `mode`; no mask (null, maxnode 0), no
        // address and no flags, so it reads and writes nothing else.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &raw mut mode,
                std::ptr::null_mut::<libc::c_ulong>(),
                0usize,
                std::ptr::null_mut::<libc::c_void>(),
                0usize,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        mode
    }

    /// Bytes waiting in each pipe of a pin.
    fn held(pins: &Pins, handle: u64) -> Vec<u64> {
        pins.lock()[&handle]
            .iter()
            .map(|fd| {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int into `n`; `fd` is an open pipe.
                let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut n) };
                assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                n as u64
            })
            .collect()
    }

    /// Ignored by default, as not every machine shows its NUMA nodes in sysfs; CI runs
    /// it (`.ci/run`).
    #[test]
    #[ignore = "needs /sys/devices/system/node/node0; run with --ignored node_0"]
    fn pin_and_release_on_node_0() {
        assert!(
            Path::new("/sys/devices/system/node/node0").is_dir(),
            "this test needs /sys/devices/system/node/node0"
        );
        let pins = Pins::default();
        let first = pins.pin(root(), 0, 12 << 10).unwrap();
        assert_eq!(thread_policy(), MPOL_DEFAULT, "the policy is restored");
        assert_eq!(held(&pins, first), [12 << 10]);
        let second = pins.pin(root(), 0, (2 << 20) + 1).unwrap();
        assert_eq!(second, first + 1);
        assert_eq!(held(&pins, second), [1 << 20, 1 << 20, 1]);

        pins.release(first).unwrap();
        let err = pins.release(first).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{err}");
        assert_eq!(err.to_string(), format!("no such pin handle: {first}"));
        pins.release(second).unwrap();
        assert!(pins.lock().is_empty());
        assert_eq!(pins.pin(root(), 0, 1).unwrap(), second + 1, "never reused");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let pins = Pins::default();
        for bytes in [0, MAX_PIN + 1, u64::MAX] {
            let err = pins.pin(root(), 0, bytes).unwrap_err();
            let bad_size = matches!(err, PinError::Held(HeldError::BadSize { .. }));
            assert!(bad_size, "{err}");
            assert_eq!(err.errno(), libc::EINVAL, "{err}");
        }
        for node in [64, 9999] {
            let err = pins.pin(root(), node, 4096).unwrap_err();
            let missing = matches!(err, PinError::Held(HeldError::NoSuchNode(n)) if n == node);
            assert!(missing, "{err}");
            assert_eq!(err.errno(), libc::ENOENT, "{err}");
        }
        assert_eq!(thread_policy(), MPOL_DEFAULT);

        let fx = Fixture::new("pin-nodes");
        fx.node(0, "0", 1024).node(1, "1", 1024);
        let err = pins.pin(&fx.0, 2, 4096).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT, "{err}");
        // The fixture's nodes have 1234 KiB free.
        let err = pins.pin(&fx.0, 1, 4096).unwrap_err();
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        assert!(err.to_string().contains("1234 KiB free;"), "{err}");
        // Plenty free, but in ZONE_MOVABLE.
        fx.file(
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemFree: 99999999 kB\n",
        )
        .file(
            "proc/zoneinfo",
            "Node 1, zone   Normal\n  pages free     4096\nNode 1, zone  Movable\n  pages free     9999999\n",
        );
        let err = pins.pin(&fx.0, 1, 4096).unwrap_err();
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        assert!(
            err.to_string()
                .contains("16384 KiB free in its kernel zones"),
            "{err}"
        );
        assert!(pins.lock().is_empty());
    }

    #[test]
    fn policy_failure_is_reported_with_errno() {
        // A node that exists in the fixture but not in the kernel: set_mempolicy says EINVAL.
        let fx = Fixture::new("pin-policy");
        fx.node(63, "", 1024)
            .file(
                "sys/devices/system/node/node63/meminfo",
                "Node 63 MemFree: 99999999 kB\n",
            )
            .file(
                "proc/zoneinfo",
                "Node 63, zone   Normal\n  pages free 99999999\n",
            );
        let err = Pins::default().pin(&fx.0, 63, 4096).unwrap_err();
        assert!(matches!(err, PinError::Policy { node: 63, .. }), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
        assert_eq!(thread_policy(), MPOL_DEFAULT);
    }

    #[test]
    fn zoneinfo_parsing() {
        let text = "\
Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 5
  pages free     3840
        min      10
Node 0, zone    DMA32
  pages free     100
Node 0, zone   Normal
  pages free     20
Node 0, zone  Movable
  pages free     7000
Node 1, zone   Normal
  pages free     3
Node 1, zone  Movable
  pages free     9
";
        assert_eq!(parse_kernel_zone_free_pages(text, 0), 120);
        assert_eq!(parse_kernel_zone_free_pages(text, 1), 3);
        assert_eq!(parse_kernel_zone_free_pages(text, 2), 0);
        assert_eq!(parse_kernel_zone_free_pages("", 0), 0);
    }
}
