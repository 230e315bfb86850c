//! The guest's NUMA view, as the kernel reports it in sysfs and procfs.
//!
//! Every reader takes the filesystem root (`/` in production, a fixture directory in
//! tests) and reads `<root>/sys/...` and `<root>/proc/...` below it.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

/// Highest CPU number accepted in a cpulist. Bounds memory use on malformed input
/// (`x86_64` kernels support at most 8192 CPUs).
const MAX_CPU: u32 = 65_535;

#[derive(Debug, Error)]
pub enum NumaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<NumaError>,
    },
    #[error("malformed cpulist {input:?}: {reason}")]
    CpuList { input: String, reason: &'static str },
    #[error("malformed meminfo: {0}")]
    MemTotal(String),
    #[error("malformed uptime {0:?}")]
    Uptime(String),
    #[error("{0} contains no node<N> directories")]
    NoNodes(PathBuf),
    #[error("uname failed: {0}")]
    Uname(#[source] io::Error),
}

/// One NUMA node: its online CPUs and the memory it currently has online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub mem_total_kib: u64,
}

/// What the guest reports about itself: kernel release, uptime and NUMA nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestView {
    pub kernel: String,
    pub uptime_ms: u64,
    pub nodes: Vec<Node>,
}

impl GuestView {
    /// Reads the current view; `root` is the directory procfs and sysfs are mounted below.
    pub fn collect(root: &Path) -> Result<Self, NumaError> {
        Ok(Self {
            kernel: kernel_release()?,
            uptime_ms: read_parsed(&root.join("proc/uptime"), parse_uptime_ms)?,
            nodes: read_nodes(root)?,
        })
    }
}

impl NumaError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } | Self::Uname(source) => crate::sys::errno_of(source),
            _ => libc::EIO,
        }
    }
}

/// Where the kernel describes the nodes.
pub fn nodes_dir(root: &Path) -> PathBuf {
    root.join("sys/devices/system/node")
}

/// The ids of the nodes below [`nodes_dir`], sorted; `None` without that directory (a
/// non-NUMA kernel), an error if it names no node.
pub fn node_ids(root: &Path) -> Result<Option<Vec<u32>>, NumaError> {
    let dir = nodes_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(NumaError::Read { path: dir, source }),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NumaError::Read {
            path: dir.clone(),
            source,
        })?;
        // Skips "online", "possible", "power", ...
        ids.extend(node_id(&entry.file_name()));
    }
    if ids.is_empty() {
        return Err(NumaError::NoNodes(dir));
    }
    ids.sort_unstable();
    Ok(Some(ids))
}

/// The nodes below [`nodes_dir`], sorted by id. Without that directory (a non-NUMA
/// kernel) the whole machine is reported as node 0.
pub fn read_nodes(root: &Path) -> Result<Vec<Node>, NumaError> {
    let Some(ids) = node_ids(root)? else {
        return single_node(root);
    };
    ids.into_iter()
        .map(|id| {
            let path = nodes_dir(root).join(format!("node{id}"));
            Ok(Node {
                id,
                cpus: read_parsed(&path.join("cpulist"), parse_cpulist)?,
                mem_total_kib: read_parsed(&path.join("meminfo"), parse_mem_total_kib)?,
            })
        })
        .collect()
}

fn single_node(root: &Path) -> Result<Vec<Node>, NumaError> {
    Ok(vec![Node {
        id: 0,
        cpus: read_parsed(&root.join("sys/devices/system/cpu/online"), parse_cpulist)?,
        mem_total_kib: read_parsed(&root.join("proc/meminfo"), parse_mem_total_kib)?,
    }])
}

/// `node12` → 12; anything else → None.
fn node_id(name: &OsStr) -> Option<u32> {
    let digits = name.to_str()?.strip_prefix("node")?;
    is_digits(digits).then(|| digits.parse().ok()).flatten()
}

fn read_parsed<T>(path: &Path, parse: fn(&str) -> Result<T, NumaError>) -> Result<T, NumaError> {
    let text = fs::read_to_string(path).map_err(|source| NumaError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|e| NumaError::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Parses a kernel cpulist such as `0-3,8,10-11` into sorted, distinct CPU numbers.
/// Empty input (a node without CPUs) gives an empty list.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>, NumaError> {
    let text = text.trim();
    let bad = |reason| NumaError::CpuList {
        input: text.to_owned(),
        reason,
    };
    let cpu = |s: &str| -> Result<u32, NumaError> {
        if !is_digits(s) {
            return Err(bad("expected a CPU number"));
        }
        match s.parse() {
            Ok(n) if n <= MAX_CPU => Ok(n),
            _ => Err(bad("CPU number too large")),
        }
    };
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut ranges = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (cpu(first)?, cpu(last)?),
            None => (cpu(part)?, cpu(part)?),
        };
        if first > last {
            return Err(bad("range goes backwards"));
        }
        ranges.push((first, last));
    }
    // Merging sorted ranges keeps the output sorted and bounded even if they overlap.
    ranges.sort_unstable();
    let mut cpus: Vec<u32> = Vec::new();
    for (first, last) in ranges {
        let start = match cpus.last() {
            Some(&prev) if prev >= first => prev + 1,
            _ => first,
        };
        cpus.extend(start..=last);
    }
    Ok(cpus)
}

/// Finds `MemTotal: <n> kB` in /proc/meminfo or a node's meminfo
/// (`Node 0 MemTotal:   262144 kB`) and returns n.
pub fn parse_mem_total_kib(text: &str) -> Result<u64, NumaError> {
    for line in text.lines() {
        let mut words = line.split_whitespace().skip_while(|w| *w != "MemTotal:");
        if words.next().is_none() {
            continue;
        }
        let kib = words
            .next()
            .filter(|n| is_digits(n))
            .and_then(|n| n.parse().ok());
        return match (kib, words.next(), words.next()) {
            (Some(kib), Some("kB"), None) => Ok(kib),
            _ => Err(NumaError::MemTotal(format!("bad line {line:?}"))),
        };
    }
    Err(NumaError::MemTotal("no MemTotal line".to_owned()))
}

/// Parses /proc/uptime (`12345.67 54321.00`) into whole milliseconds.
pub fn parse_uptime_ms(text: &str) -> Result<u64, NumaError> {
    let bad = || NumaError::Uptime(text.trim().to_owned());
    let first = text.split_whitespace().next().ok_or_else(bad)?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    if !is_digits(secs) || !is_digits(frac) {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let ms = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |acc, digit| acc * 10 + u64::from(digit - b'0'));
    secs.checked_mul(1000)
        .and_then(|s| s.checked_add(ms))
        .ok_or_else(bad)
}

/// The running kernel's release, e.g. `6.1.192`.
pub fn kernel_release() -> Result<String, NumaError> {
    // SAFETY: utsname consists only of c_char arrays, for which all-zero bytes are valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname that uname(2) fills in.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return Err(NumaError::Uname(io::Error::last_os_error()));
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temporary directory tree, removed on drop.
    pub(crate) struct Fixture(pub PathBuf);

    impl Fixture {
        pub(crate) fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("guest-agent-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        pub(crate) fn file(&self, rel: &str, contents: &str) -> &Self {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
            self
        }

        pub(crate) fn node(&self, id: u32, cpulist: &str, kib: u64) -> &Self {
            let dir = format!("sys/devices/system/node/node{id}");
            self.file(&format!("{dir}/cpulist"), cpulist).file(
                &format!("{dir}/meminfo"),
                &format!("Node {id} MemTotal:       {kib} kB\nNode {id} MemFree:        1234 kB\n"),
            )
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn cpulist_single_cpus_and_ranges() {
        assert_eq!(parse_cpulist("0\n").unwrap(), vec![0]);
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("5-5").unwrap(), vec![5]);
    }

    #[test]
    fn cpulist_empty_means_no_cpus() {
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist("\n").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn cpulist_sorts_and_merges_overlaps() {
        assert_eq!(
            parse_cpulist("6,1-3,2-4,0").unwrap(),
            vec![0, 1, 2, 3, 4, 6]
        );
        let many = vec!["0-65535"; 500].join(",");
        assert_eq!(parse_cpulist(&many).unwrap().len(), 65_536);
    }

    #[test]
    fn cpulist_malformed_is_an_error() {
        for input in [
            "a",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            ",",
            "0,",
            "1-2-3",
            "0-3:2/4",
            " 1, 2",
            "+1",
            "-",
            "4294967296",
            "65536",
            "0-4294967295",
            "१",
        ] {
            let err = parse_cpulist(input).expect_err(input);
            assert!(matches!(err, NumaError::CpuList { .. }), "{input}: {err}");
        }
    }

    #[test]
    fn meminfo_node_and_proc_formats() {
        let node = "Node 1 MemTotal:       262144 kB\nNode 1 MemFree:  1 kB\n";
        assert_eq!(parse_mem_total_kib(node).unwrap(), 262_144);
        let proc = "MemTotal:        7300892 kB\nMemFree:         5480232 kB\n";
        assert_eq!(parse_mem_total_kib(proc).unwrap(), 7_300_892);
    }

    #[test]
    fn meminfo_malformed_is_an_error() {
        for input in [
            "",
            "MemFree: 1 kB\n",
            "MemTotal:\n",
            "MemTotal: lots kB\n",
            "MemTotal: 12 MB\n",
            "MemTotal: 12\n",
            "MemTotal: 12 kB extra\n",
            "MemTotal: -12 kB\n",
            "MemTotal: 99999999999999999999999 kB\n",
        ] {
            let err = parse_mem_total_kib(input).expect_err(input);
            assert!(matches!(err, NumaError::MemTotal(_)), "{input}: {err}");
        }
    }

    #[test]
    fn uptime_to_milliseconds() {
        assert_eq!(parse_uptime_ms("12345.67 54321.00\n").unwrap(), 12_345_670);
        assert_eq!(parse_uptime_ms("0.05 0.00\n").unwrap(), 50);
        assert_eq!(parse_uptime_ms("7 1").unwrap(), 7000);
        assert_eq!(parse_uptime_ms("1.23456").unwrap(), 1234);
        for input in [
            "", "\n", "abc 1", "-1.00 0", "1.2.3 0", "1. 0", ".5 0", "1.x",
        ] {
            assert!(parse_uptime_ms(input).is_err(), "{input:?}");
        }
    }

    #[test]
    fn view_of_two_node_fixture() {
        let fx = Fixture::new("two-nodes");
        fx.node(1, "1\n", 234_567)
            .node(0, "0\n", 123_456)
            .file("sys/devices/system/node/online", "0-1\n")
            .file("sys/devices/system/node/possible", "0-1\n")
            .file("sys/devices/system/node/power/runtime", "x\n")
            .file("proc/uptime", "12.345 1.00\n");
        let view = GuestView::collect(&fx.0).unwrap();
        assert!(!view.kernel.is_empty());
        assert_eq!(view.uptime_ms, 12_345);
        assert_eq!(
            view.nodes,
            vec![
                Node {
                    id: 0,
                    cpus: vec![0],
                    mem_total_kib: 123_456
                },
                Node {
                    id: 1,
                    cpus: vec![1],
                    mem_total_kib: 234_567
                },
            ]
        );
    }

    #[test]
    fn nodes_sorted_numerically_and_cpuless_nodes_kept() {
        let fx = Fixture::new("sorted");
        fx.node(10, "", 1).node(2, "2-3", 2).node(1, "0-1", 3);
        let ids: Vec<u32> = read_nodes(&fx.0).unwrap().iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 2, 10]);
        assert_eq!(read_nodes(&fx.0).unwrap()[2].cpus, Vec::<u32>::new());
    }

    #[test]
    fn non_numa_fallback_is_node_0() {
        let fx = Fixture::new("non-numa");
        fx.file("sys/devices/system/cpu/online", "0-3\n")
            .file("proc/meminfo", "MemTotal:  524288 kB\nMemFree: 1 kB\n");
        let nodes = read_nodes(&fx.0).unwrap();
        assert_eq!(
            nodes,
            vec![Node {
                id: 0,
                cpus: vec![0, 1, 2, 3],
                mem_total_kib: 524_288
            }]
        );
    }

    #[test]
    fn broken_fixture_errors_name_the_file() {
        let fx = Fixture::new("broken");
        fx.node(0, "0-", 1);
        let err = read_nodes(&fx.0).unwrap_err().to_string();
        assert!(
            err.contains("node0/cpulist") && err.contains("malformed cpulist"),
            "{err}"
        );

        let fx = Fixture::new("missing");
        fx.file("sys/devices/system/node/online", "0\n");
        assert!(matches!(read_nodes(&fx.0), Err(NumaError::NoNodes(_))));
        assert!(matches!(
            GuestView::collect(&fx.0),
            Err(NumaError::Read { .. })
        ));
    }
}
