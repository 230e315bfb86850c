//! `signals`: the autopilot's sample of the guest, per node (free, page cache, anonymous
//! and online memory) and guest-wide (memory pressure, reclaim counters).
//!
//! Every file is read below the filesystem root (`/` in production, a fixture directory
//! in tests). A sample reads each node's `meminfo` and its directory, the `state` of each
//! of its memory blocks, `/proc/pressure/memory` and `/proc/vmstat`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use agent_protocol::meminfo::{self, MeminfoError};
use agent_protocol::psi::{self, Pressure, PsiError};
use agent_protocol::{GuestSignals, NodeSignals, VmCounters, MAX_NODES};
use thiserror::Error;

use crate::memory::{self, MemoryError};
use crate::numa::{self, NumaError};
use crate::vmstat::{self, VmstatError};

#[derive(Debug, Error)]
pub enum SignalsError {
    #[error(transparent)]
    Numa(#[from] NumaError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vmstat(#[from] VmstatError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Meminfo {
        path: PathBuf,
        #[source]
        source: MeminfoError,
    },
    #[error("{path}: {source}")]
    Pressure {
        path: PathBuf,
        #[source]
        source: PsiError,
    },
    #[error("the guest has {0} nodes, more than the {MAX_NODES} an answer may name")]
    TooManyNodes(usize),
}

impl SignalsError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Numa(e) => e.errno(),
            Self::Memory(e) => e.errno(),
            Self::Vmstat(e) => e.errno(),
            Self::Read { source, .. } => crate::sys::errno_of(source),
            Self::Meminfo { .. } | Self::Pressure { .. } => libc::EIO,
            Self::TooManyNodes(_) => libc::E2BIG,
        }
    }
}

/// Takes one sample.
pub fn read(root: &Path) -> Result<GuestSignals, SignalsError> {
    let ids = numa::node_ids(root)?;
    let count = ids.as_ref().map_or(1, Vec::len);
    if count > MAX_NODES {
        return Err(SignalsError::TooManyNodes(count));
    }
    let block_size = memory::block_size(root)?;
    let nodes = match ids {
        Some(ids) => ids
            .into_iter()
            .map(|id| {
                let meminfo = numa::nodes_dir(root).join(format!("node{id}/meminfo"));
                let blocks = memory::node_block_ids(root, id)?;
                node_signals(id, &meminfo, root, &blocks, block_size)
            })
            .collect::<Result<_, _>>()?,
        // A non-NUMA kernel: the whole machine is node 0, as `inventory` says.
        None => {
            let blocks = memory::block_ids(root)?;
            let meminfo = root.join("proc/meminfo");
            vec![node_signals(0, &meminfo, root, &blocks, block_size)?]
        }
    };
    Ok(GuestSignals {
        nodes,
        pressure: read_pressure(root)?,
        counters: counters(&vmstat::read(root)?),
    })
}

fn node_signals(
    node: u32,
    meminfo_path: &Path,
    root: &Path,
    blocks: &[u32],
    block_size: u64,
) -> Result<NodeSignals, SignalsError> {
    let text = fs::read_to_string(meminfo_path).map_err(|source| SignalsError::Read {
        path: meminfo_path.to_owned(),
        source,
    })?;
    let keys = [
        "MemFree:",
        "Active(file):",
        "Inactive(file):",
        "Active(anon):",
        "Inactive(anon):",
    ];
    let [free, active_file, inactive_file, active_anon, inactive_anon] =
        meminfo::parse(&text, keys).map_err(|source| SignalsError::Meminfo {
            path: meminfo_path.to_owned(),
            source,
        })?;
    let online = online_blocks(root, blocks)?;
    Ok(NodeSignals {
        node,
        free_bytes: free,
        file_bytes: active_file.saturating_add(inactive_file),
        anon_bytes: active_anon.saturating_add(inactive_anon),
        online_bytes: online.saturating_mul(block_size),
    })
}

/// How many of `blocks` are online. A block that is gone (virtio-mem removed it after
/// its node's directory was read) is not.
fn online_blocks(root: &Path, blocks: &[u32]) -> Result<u64, MemoryError> {
    let mut online = 0;
    for &id in blocks {
        match memory::read_state(root, id) {
            Ok(state) if state == "online" => online += 1,
            Ok(_) => {}
            Err(MemoryError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(online)
}

/// `/proc/pressure/memory`, or `None` where the kernel keeps no pressure figures (it then
/// makes no `/proc/pressure`).
fn read_pressure(root: &Path) -> Result<Option<Pressure>, SignalsError> {
    let path = root.join("proc/pressure/memory");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SignalsError::Read { path, source }),
    };
    psi::parse(&text)
        .map(Some)
        .map_err(|source| SignalsError::Pressure { path, source })
}

fn counters(vmstat: &BTreeMap<String, u64>) -> VmCounters {
    let get = |name: &str| vmstat.get(name).copied();
    // `allocstall_dma32`, `allocstall_normal`, ...; `allocstall` alone before 4.8.
    let stalls = vmstat
        .iter()
        .filter(|(name, _)| *name == "allocstall" || name.starts_with("allocstall_"));
    VmCounters {
        oom_kill: get("oom_kill"),
        workingset_refault_anon: get("workingset_refault_anon"),
        workingset_refault_file: get("workingset_refault_file"),
        pgmajfault: get("pgmajfault"),
        allocstall: stalls.fold(None, |sum, (_, &n)| {
            Some(n.saturating_add(sum.unwrap_or(0)))
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::tests::{block, two_node_fixture};
    use crate::numa::tests::Fixture;

    fn node_meminfo(node: u32, free: u64, file: (u64, u64), anon: (u64, u64)) -> String {
        format!(
            "Node {node} MemTotal:       1048576 kB\n\
             Node {node} MemFree:        {free} kB\n\
             Node {node} MemUsed:         3625184 kB\n\
             Node {node} Active:           792728 kB\n\
             Node {node} Active(anon):     {} kB\n\
             Node {node} Inactive(anon):   {} kB\n\
             Node {node} Active(file):     {} kB\n\
             Node {node} Inactive(file):   {} kB\n\
             Node {node} HugePages_Total:     0\n\
             Node {node} HugePages_Free:      0\n",
            anon.0, anon.1, file.0, file.1
        )
    }

    const PRESSURE: &str = "some avg10=1.50 avg60=0.25 avg300=0.00 total=1234\n\
                            full avg10=0.50 avg60=0.00 avg300=0.00 total=567\n";

    #[test]
    fn counters_sum_the_stalls_and_miss_what_the_kernel_lacks() {
        let vmstat = vmstat::parse(
            "oom_kill 2\npgmajfault 30\nallocstall_dma 1\nallocstall_dma32 2\n\
             allocstall_normal 18446744073709551615\nallocstall_movable 4\nallocstalls 9\n\
             workingset_refault_file 7\n",
        );
        assert_eq!(
            counters(&vmstat),
            VmCounters {
                oom_kill: Some(2),
                workingset_refault_anon: None,
                workingset_refault_file: Some(7),
                pgmajfault: Some(30),
                allocstall: Some(u64::MAX),
            }
        );
        let old = vmstat::parse("allocstall 5\npgmajfault 1\n");
        assert_eq!(counters(&old).allocstall, Some(5));
        assert_eq!(counters(&BTreeMap::new()), VmCounters::default());
    }

    /// The two-node fixture: node 0 has blocks 0 and 1 online, node 1 has 8 online and 9,
    /// 10 offline (128 MiB blocks).
    pub(crate) fn signals_fixture(name: &str) -> Fixture {
        let fx = two_node_fixture(name);
        fx.file(
            "sys/devices/system/node/node0/meminfo",
            &node_meminfo(0, 1000, (10, 20), (30, 40)),
        )
        .file(
            "sys/devices/system/node/node1/meminfo",
            &node_meminfo(1, 2000, (1, 2), (3, 4)),
        )
        .file(
            "proc/vmstat",
            "oom_kill 1\npgmajfault 2\nallocstall_normal 3\n",
        )
        .file("proc/pressure/memory", PRESSURE);
        fx
    }

    #[test]
    fn a_sample_of_two_nodes() {
        let fx = signals_fixture("signals");
        let s = read(&fx.0).unwrap();
        assert_eq!(
            s.nodes,
            [
                NodeSignals {
                    node: 0,
                    free_bytes: 1000 << 10,
                    file_bytes: 30 << 10,
                    anon_bytes: 70 << 10,
                    online_bytes: 2 << 27,
                },
                NodeSignals {
                    node: 1,
                    free_bytes: 2000 << 10,
                    file_bytes: 3 << 10,
                    anon_bytes: 7 << 10,
                    online_bytes: 1 << 27,
                },
            ]
        );
        let p = s.pressure.unwrap();
        assert_eq!(
            (p.some.avg10, p.some.avg60, p.some.total_us),
            (1.5, 0.25, 1234)
        );
        assert_eq!((p.full.avg10, p.full.total_us), (0.5, 567));
        assert_eq!(
            (
                s.counters.oom_kill,
                s.counters.allocstall,
                s.counters.pgmajfault
            ),
            (Some(1), Some(3), Some(2))
        );
        assert_eq!(s.check(), Ok(()));
    }

    #[test]
    fn no_pressure_file_is_none_and_a_bad_one_an_error() {
        let fx = signals_fixture("signals-psi");
        fs::remove_file(fx.0.join("proc/pressure/memory")).unwrap();
        assert_eq!(read(&fx.0).unwrap().pressure, None);
        fx.file("proc/pressure/memory", "some avg10=1\n");
        let err = read(&fx.0).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(err.to_string().contains("pressure/memory"), "{err}");
    }

    #[test]
    fn blocks_that_come_and_go_count_as_they_are() {
        let fx = signals_fixture("signals-blocks");
        // Node 1 gets block 11 online; then block 8 is removed after its node's
        // directory was read (a link to nowhere stands for that).
        block(&fx, 11, 1, "online", "Movable");
        fs::remove_dir_all(fx.0.join("sys/devices/system/memory/memory8")).unwrap();
        let s = read(&fx.0).unwrap();
        assert_eq!(s.nodes[1].online_bytes, 1 << 27);
        // A block's state that cannot be read for another reason is an error.
        let state = fx.0.join("sys/devices/system/memory/memory0/state");
        fs::remove_file(&state).unwrap();
        fs::create_dir(&state).unwrap();
        assert_eq!(read(&fx.0).unwrap_err().errno(), libc::EISDIR);
    }

    #[test]
    fn errors_name_their_file_and_errno() {
        let fx = signals_fixture("signals-errors");
        fx.file(
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemFree: x kB\n",
        );
        let err = read(&fx.0).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(
            err.to_string().contains("node1/meminfo: malformed"),
            "{err}"
        );
        fs::remove_file(fx.0.join("sys/devices/system/node/node1/meminfo")).unwrap();
        assert_eq!(read(&fx.0).unwrap_err().errno(), libc::ENOENT);
        let fx = signals_fixture("signals-vmstat");
        fs::remove_file(fx.0.join("proc/vmstat")).unwrap();
        assert_eq!(read(&fx.0).unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn a_non_numa_kernel_is_node_0() {
        let fx = Fixture::new("signals-non-numa");
        fx.file("sys/devices/system/memory/block_size_bytes", "8000000\n")
            .file("sys/devices/system/memory/memory0/state", "online\n")
            .file("sys/devices/system/memory/memory1/state", "offline\n")
            .file(
                "proc/meminfo",
                "MemFree: 5 kB\nActive(anon): 1 kB\nInactive(anon): 1 kB\n\
                 Active(file): 2 kB\nInactive(file): 0 kB\n",
            )
            .file("proc/vmstat", "");
        let s = read(&fx.0).unwrap();
        assert_eq!(
            s.nodes,
            [NodeSignals {
                node: 0,
                free_bytes: 5 << 10,
                file_bytes: 2 << 10,
                anon_bytes: 2 << 10,
                online_bytes: 1 << 27,
            }]
        );
        assert_eq!((s.pressure, s.counters), (None, VmCounters::default()));
    }

    #[test]
    fn more_nodes_than_an_answer_may_name_are_refused() {
        let fx = Fixture::new("signals-many");
        for id in 0..=MAX_NODES {
            fs::create_dir_all(fx.0.join(format!("sys/devices/system/node/node{id}"))).unwrap();
        }
        let err = read(&fx.0).unwrap_err();
        assert_eq!(err.errno(), libc::E2BIG);
        assert!(err.to_string().contains("1025 nodes"), "{err}");
    }

    /// Ignored by default, as not every machine shows its NUMA nodes in sysfs; CI runs
    /// it (`.ci/run`).
    #[test]
    #[ignore = "needs /sys/devices/system/node/node0; run with --ignored node_0"]
    fn a_sample_of_node_0_and_the_rest_of_this_machine() {
        assert!(
            Path::new("/sys/devices/system/node/node0").is_dir(),
            "this test needs /sys/devices/system/node/node0"
        );
        // The figures are whatever they are, but they hang together.
        let s = read(Path::new("/")).unwrap();
        assert!(!s.nodes.is_empty());
        assert_eq!(s.check(), Ok(()));
        assert!(s
            .nodes
            .iter()
            .any(|n| n.free_bytes > 0 && n.online_bytes > 0));
        for n in &s.nodes {
            assert!(
                n.free_bytes <= n.online_bytes || n.online_bytes == 0,
                "{n:?}"
            );
        }
        assert!(s.counters.pgmajfault.is_some());
    }
}
