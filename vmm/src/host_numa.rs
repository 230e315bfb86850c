//! The host's NUMA topology, and placing a guest node on one host node (`host-node=` of
//! `--numa`): its memory bound there with `mbind`, its threads (vCPUs, `mempowerd/N`)
//! run on that node's CPUs, as Cloud Hypervisor's `host_numa_node` and kmempowerd's
//! `kthread_create_on_node` do.
//!
//! The topology comes from sysfs (`/sys/devices/system/node`), read under a root that
//! tests replace with a fake tree.

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::{Builder, JoinHandle};

use crate::config::{ConfigError, NodeConfig};

/// Where the kernel describes the host's NUMA nodes.
pub const SYSFS_NODES: &str = "/sys/devices/system/node";

/// `mbind` flags (linux/mempolicy.h), which libc does not name: fail if a page already
/// there cannot be placed, and move the pages that can.
const MPOL_MF_STRICT: libc::c_uint = 1 << 0;
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum HostNumaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: '{text}' is not a list such as 0-3,8")]
    BadList { path: PathBuf, text: String },
    #[error("{path}: '{text}' is not a number")]
    BadCount { path: PathBuf, text: String },
    #[error(
        "host node {node} does not exist or has no memory (this host's nodes with memory: \
         {available})"
    )]
    NoSuchNode { node: u32, available: String },
    #[error(
        "host node {node}'s CPUs ({cpus}) are all outside the CPUs this process may run on \
         ({allowed})"
    )]
    NoAllowedCpus {
        node: u32,
        cpus: String,
        allowed: String,
    },
    #[error("CPU {0} is beyond the {max} CPUs an affinity mask can name", max = libc::CPU_SETSIZE)]
    CpuTooLarge(usize),
    #[error("cannot read this process's CPU affinity: {0}")]
    Affinity(std::io::Error),
    #[error("cannot bind {len:#x} bytes at {addr:#x} to host node {node}: {source}")]
    Bind {
        addr: u64,
        len: u64,
        node: u32,
        source: std::io::Error,
    },
    #[error("thread '{thread}' cannot run on CPUs {cpus}: {source}")]
    Pin {
        thread: String,
        cpus: String,
        source: std::io::Error,
    },
    #[error("cannot start thread '{thread}': {source}")]
    Spawn {
        thread: String,
        source: std::io::Error,
    },
}

/// Parses a kernel list such as `0-3,8,10-11` (an empty file is an empty list).
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    let mut out = Vec::new();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u32, u32) = (lo.parse().ok()?, hi.parse().ok()?);
        if lo > hi || hi - lo > libc::CPU_SETSIZE as u32 * 64 {
            return None;
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Formats a sorted list the kernel's way: `0-3,8`.
pub fn format_list<T: Copy + Into<u64>>(items: &[T]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let start = items[i].into();
        let mut end = start;
        while i + 1 < items.len() && items[i + 1].into() == end + 1 {
            i += 1;
            end += 1;
        }
        parts.push(match start == end {
            true => start.to_string(),
            false => format!("{start}-{end}"),
        });
        i += 1;
    }
    match parts.is_empty() {
        true => "none".into(),
        false => parts.join(","),
    }
}

/// Where the kernel counts the host's free 2 MiB huge pages, all nodes together.
pub const FREE_HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// Free 2 MiB huge pages on the whole host.
pub fn free_huge_pages_total() -> Result<u64, HostNumaError> {
    read_count(PathBuf::from(FREE_HUGE_PAGES))
}

fn read_count(path: PathBuf) -> Result<u64, HostNumaError> {
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(HostNumaError::Read { path, source }),
    };
    text.trim().parse().map_err(|_| HostNumaError::BadCount {
        path,
        text: text.trim().to_string(),
    })
}

/// The host's nodes as sysfs describes them under `root`.
#[derive(Debug, Clone)]
pub struct HostTopology {
    root: PathBuf,
}

impl HostTopology {
    /// This host's topology.
    pub fn system() -> Self {
        Self::at(SYSFS_NODES)
    }

    /// The topology of a (possibly fake) tree laid out as `/sys/devices/system/node`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        HostTopology { root: root.into() }
    }

    fn read(&self, relative: &str) -> Result<(PathBuf, String), HostNumaError> {
        let path = self.root.join(relative);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(HostNumaError::Read { path, source }),
        }
    }

    fn list(&self, relative: &str) -> Result<Vec<u32>, HostNumaError> {
        let (path, text) = self.read(relative)?;
        parse_list(&text).ok_or(HostNumaError::BadList {
            path,
            text: text.trim().to_string(),
        })
    }

    /// Nodes that are online and have memory: those guest memory can be bound to.
    pub fn memory_nodes(&self) -> Result<Vec<u32>, HostNumaError> {
        let online = self.list("online")?;
        let mut nodes = self.list("has_memory")?;
        nodes.retain(|n| online.contains(n));
        Ok(nodes)
    }

    /// Fails unless `node` is online and has memory.
    pub fn check_node(&self, node: u32) -> Result<(), HostNumaError> {
        let nodes = self.memory_nodes()?;
        match nodes.contains(&node) {
            true => Ok(()),
            false => Err(HostNumaError::NoSuchNode {
                node,
                available: format_list(&nodes),
            }),
        }
    }

    /// The CPUs of `node` (none for a memory-only node).
    pub fn cpus_of(&self, node: u32) -> Result<Vec<usize>, HostNumaError> {
        let cpus = self.list(&format!("node{node}/cpulist"))?;
        Ok(cpus.into_iter().map(|c| c as usize).collect())
    }

    /// Free 2 MiB huge pages on `node` (pages reserved but not yet used included).
    pub fn free_huge_pages(&self, node: u32) -> Result<u64, HostNumaError> {
        read_count(self.root.join(format!(
            "node{node}/hugepages/hugepages-2048kB/free_hugepages"
        )))
    }

    /// The CPUs the threads of a guest node bound to `node` run on: the node's CPUs this
    /// process may use (the calling thread's affinity stands for the process's, e.g. a
    /// `taskset`). `None` for a node without CPUs: its threads stay where they are.
    pub fn thread_cpus(&self, node: u32) -> Result<Option<Vec<usize>>, HostNumaError> {
        let cpus = self.cpus_of(node)?;
        if cpus.is_empty() {
            return Ok(None);
        }
        let allowed = current_affinity().map_err(HostNumaError::Affinity)?;
        let usable: Vec<usize> = cpus
            .iter()
            .copied()
            .filter(|c| allowed.contains(c))
            .collect();
        if usable.is_empty() {
            return Err(HostNumaError::NoAllowedCpus {
                node,
                cpus: format_list(&as_u64(&cpus)),
                allowed: format_list(&as_u64(&allowed)),
            });
        }
        Ok(Some(usable))
    }

    /// For each guest node (by id), the CPUs its threads run on: see [`Self::thread_cpus`].
    pub fn placement(
        &self,
        nodes: &[NodeConfig],
    ) -> Result<Vec<Option<Vec<usize>>>, HostNumaError> {
        nodes
            .iter()
            .map(|n| match n.host_node {
                Some(h) => self.thread_cpus(h),
                None => Ok(None),
            })
            .collect()
    }

    /// The usage check of `--numa ...,host-node=H`: every H exists and has memory.
    pub fn check_config(&self, nodes: &[NodeConfig]) -> Result<(), ConfigError> {
        for n in nodes {
            if let Some(host) = n.host_node {
                self.check_node(host).map_err(|e| ConfigError::HostNode {
                    node: n.id,
                    host,
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(())
    }
}

fn as_u64(cpus: &[usize]) -> Vec<u64> {
    cpus.iter().map(|&c| c as u64).collect()
}

fn cpu_set(cpus: &[usize]) -> Result<libc::cpu_set_t, HostNumaError> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(HostNumaError::CpuTooLarge(cpu));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Ok(set)
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> std::io::Result<Vec<usize>> {
    // SAFETY: as in `cpu_set`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes into `set`, which
    // lives across the call.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every `c` is below CPU_SETSIZE, so the bit read is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Runs the calling thread on `cpus` only.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), HostNumaError> {
    let set = cpu_set(cpus)?;
    // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes from `set`, which lives
    // across the call; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(HostNumaError::Pin {
            thread: std::thread::current().name().unwrap_or("?").to_string(),
            cpus: format_list(&as_u64(cpus)),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Binds `[addr, addr + len)` of this process to host `node` (`MPOL_BIND`): its pages are
/// allocated there, and any already present are moved there, or the call fails.
///
/// For a memfd (shmem) mapping the policy is the file's, for that range, whoever faults
/// the pages (KVM through this mapping, `fallocate`); for hugetlbfs it is the mapping's,
/// which is the one KVM and the VMM fault through.
pub fn bind_memory(addr: usize, len: usize, node: u32) -> Result<(), HostNumaError> {
    let bind_err = |source| HostNumaError::Bind {
        addr: addr as u64,
        len: len as u64,
        node,
        source,
    };
    let words = node as usize / 64 + 1;
    let mut mask = vec![0 as libc::c_ulong; words];
    mask[node as usize / 64] |= 1 << (node % 64);
    // The kernel reads `maxnode - 1` bits (a historical off-by-one that libnuma also
    // allows for), so pass one more than the mask holds.
    let maxnode = (words * 64 + 1) as libc::c_ulong;
    // SAFETY: mbind reads `mask` (alive across the call, `words` longs, which `maxnode`
    // covers) and changes only the memory policy of the range, never its contents: moved
    // pages keep their data. A range that is not mapped fails with EFAULT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len as libc::c_ulong,
            libc::MPOL_BIND as libc::c_ulong,
            mask.as_ptr(),
            maxnode,
            (MPOL_MF_STRICT | MPOL_MF_MOVE) as libc::c_ulong,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(bind_err(std::io::Error::last_os_error())),
    }
}

/// Spawns a thread that first moves itself to `cpus` (when given) and only then runs
/// `f`; returns once it has, with the pinning's error if it failed (the thread then ends
/// without running `f`).
pub fn spawn_on<F, T>(
    builder: Builder,
    name: &str,
    cpus: Option<Vec<usize>>,
    f: F,
) -> Result<JoinHandle<T>, HostNumaError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + Default + 'static,
{
    let (pinned_tx, pinned_rx) = mpsc::sync_channel(1);
    let handle = builder
        .spawn(move || {
            let pinned = cpus.as_deref().map_or(Ok(()), pin_current_thread);
            let ok = pinned.is_ok();
            let _ = pinned_tx.send(pinned);
            match ok {
                true => f(),
                false => T::default(),
            }
        })
        .map_err(|source| HostNumaError::Spawn {
            thread: name.to_string(),
            source,
        })?;
    match pinned_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        // The thread died before it could say (it cannot panic before sending).
        Err(_) => Err(HostNumaError::Spawn {
            thread: name.to_string(),
            source: std::io::Error::other("the thread ended before it started"),
        }),
    }
}

/// Writes a fake node tree under `root` for tests: `online`, `has_memory`, and for each
/// `(node, cpulist)` its `cpulist`.
#[cfg(test)]
pub(crate) fn fake_tree(root: &std::path::Path, memory_nodes: &str, cpus: &[(u32, &str)]) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("online"), "0-3\n").unwrap();
    std::fs::write(root.join("has_memory"), format!("{memory_nodes}\n")).unwrap();
    for (node, list) in cpus {
        let dir = root.join(format!("node{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpulist"), format!("{list}\n")).unwrap();
    }
}

/// The policy `/proc/self/numa_maps` shows for the mapping that starts at `addr`.
#[cfg(test)]
pub(crate) fn numa_maps_line(addr: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let start = format!("{addr:x} ");
    maps.lines()
        .find(|l| l.starts_with(&start))
        .map(str::to_string)
}

#[cfg(test)]
mod tests;
