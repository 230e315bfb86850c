//! The host's side of the autopilot's signals: how much memory the host can still give
//! (`MemAvailable` of `/proc/meminfo`), how much its tasks stall on memory
//! (`/proc/pressure/memory`), and how much is free on the host node a guest node is bound
//! to (`host-node=` of `--numa`, see [`crate::host_numa`]).
//!
//! Files are read below a root (`/` in production, a fixture directory in tests), with
//! the parsers the guest agent uses for the same files in the guest (`agent_protocol`'s
//! `meminfo` and `psi`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use agent_protocol::meminfo::{self, MeminfoError};
use agent_protocol::psi::{self, Pressure, PsiError};

#[derive(Debug, thiserror::Error)]
pub enum HostSignalsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Meminfo { path: PathBuf, source: MeminfoError },
    #[error("{path}: {source}")]
    Pressure { path: PathBuf, source: PsiError },
}

/// One sample of the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSignals {
    /// `MemTotal` of `/proc/meminfo`.
    pub mem_total_bytes: u64,
    /// `MemAvailable`: what the host can give without swapping, free and reclaimable.
    pub mem_available_bytes: u64,
    /// `/proc/pressure/memory`; `None` where the host kernel keeps no pressure figures
    /// (built without `CONFIG_PSI`, or booted with `psi=0`).
    pub pressure: Option<Pressure>,
    /// `MemFree` of the host node asked for, if one was.
    pub node_free_bytes: Option<u64>,
}

impl HostSignals {
    /// Reads a sample below `root`; `host_node`'s free memory too, if given.
    pub fn read(root: &Path, host_node: Option<u32>) -> Result<Self, HostSignalsError> {
        HostFiles::open(root, host_node)?.read()
    }
}

/// The host's files, opened once and read again at each sample (`pread` from offset 0,
/// which makes the kernel print them afresh): a thread under a seccomp filter may not
/// open files, only read the descriptors it was given ([`Self::fds`]).
#[derive(Debug)]
pub struct HostFiles {
    meminfo: (PathBuf, File),
    /// `None` where the kernel keeps no pressure figures.
    pressure: Option<(PathBuf, File)>,
    node: Option<(PathBuf, File)>,
}

impl HostFiles {
    pub fn open(root: &Path, host_node: Option<u32>) -> Result<Self, HostSignalsError> {
        let open = |path: PathBuf| match File::open(&path) {
            Ok(file) => Ok((path, file)),
            Err(source) => Err(HostSignalsError::Read { path, source }),
        };
        let pressure = match open(root.join("proc/pressure/memory")) {
            Ok(file) => Some(file),
            Err(HostSignalsError::Read { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let node = match host_node {
            Some(node) => {
                let nodes = root.join(crate::host_numa::SYSFS_NODES.trim_start_matches('/'));
                Some(open(nodes.join(format!("node{node}/meminfo")))?)
            }
            None => None,
        };
        Ok(HostFiles {
            meminfo: open(root.join("proc/meminfo"))?,
            pressure,
            node,
        })
    }

    /// The descriptors [`Self::read`] reads.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let files = [
            Some(&self.meminfo),
            self.pressure.as_ref(),
            self.node.as_ref(),
        ];
        files
            .into_iter()
            .flatten()
            .map(|(_, f)| f.as_raw_fd())
            .collect()
    }

    /// A sample.
    pub fn read(&self) -> Result<HostSignals, HostSignalsError> {
        let [mem_total_bytes, mem_available_bytes] =
            read_meminfo(&self.meminfo, ["MemTotal:", "MemAvailable:"])?;
        let node_free_bytes = match &self.node {
            Some(node) => Some(read_meminfo(node, ["MemFree:"])?[0]),
            None => None,
        };
        let pressure = match &self.pressure {
            Some((path, file)) => Some(psi::parse(&read_text(path, file)?).map_err(|source| {
                HostSignalsError::Pressure {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
        Ok(HostSignals {
            mem_total_bytes,
            mem_available_bytes,
            pressure,
            node_free_bytes,
        })
    }
}

/// Most of a file read: the host's meminfo is about 1.5 KiB.
const MAX_TEXT: usize = 64 << 10;

/// The whole file, read from offset 0.
fn read_text(path: &Path, file: &File) -> Result<String, HostSignalsError> {
    let err = |source| HostSignalsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if buf.len() >= MAX_TEXT {
                return Err(err(io::Error::other("longer than 64 KiB")));
            }
            buf.resize(buf.len() * 2, 0);
        }
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

fn read_meminfo<const N: usize>(
    (path, file): &(PathBuf, File),
    keys: [&str; N],
) -> Result<[u64; N], HostSignalsError> {
    meminfo::parse(&read_text(path, file)?, keys).map_err(|source| HostSignalsError::Meminfo {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    const MEMINFO: &str = "MemTotal:       24683792 kB\n\
                           MemFree:        21058608 kB\n\
                           MemAvailable:   23411960 kB\n\
                           HugePages_Total:       0\n\
                           Hugepagesize:       2048 kB\n";

    const PRESSURE: &str = "some avg10=2.50 avg60=1.00 avg300=0.10 total=31337\n\
                            full avg10=0.75 avg60=0.00 avg300=0.00 total=42\n";

    /// A host with /proc/meminfo, pressure figures and node 1.
    fn fixture() -> TempDir {
        let dir = TempDir::new_with_prefix("/tmp/mempower-host-signals-").unwrap();
        let root = dir.as_path();
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("proc/meminfo", MEMINFO);
        write("proc/pressure/memory", PRESSURE);
        write(
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemTotal:  8388608 kB\nNode 1 MemFree:   4194304 kB\n",
        );
        dir
    }

    #[test]
    fn reads_meminfo_pressure_and_a_host_node() {
        let dir = fixture();
        let s = HostSignals::read(dir.as_path(), Some(1)).unwrap();
        assert_eq!(
            (s.mem_total_bytes, s.mem_available_bytes, s.node_free_bytes),
            (24_683_792 << 10, 23_411_960 << 10, Some(4 << 30))
        );
        let p = s.pressure.unwrap();
        assert_eq!(
            (p.some.avg10, p.some.avg60, p.some.total_us),
            (2.5, 1.0, 31_337)
        );
        assert_eq!((p.full.avg10, p.full.total_us), (0.75, 42));
        // Without a host node, no node is read.
        let s = HostSignals::read(dir.as_path(), None).unwrap();
        assert_eq!(s.node_free_bytes, None);
    }

    #[test]
    fn open_files_are_read_afresh_at_each_sample() {
        let dir = fixture();
        let files = HostFiles::open(dir.as_path(), Some(1)).unwrap();
        assert_eq!(files.fds().len(), 3);
        let before = files.read().unwrap();
        let meminfo = dir.as_path().join("proc/meminfo");
        std::fs::write(&meminfo, "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n").unwrap();
        let after = files.read().unwrap();
        assert_ne!(before.mem_total_bytes, after.mem_total_bytes);
        assert_eq!(
            (after.mem_total_bytes, after.mem_available_bytes),
            (2 << 20, 1 << 20)
        );
    }

    #[test]
    fn no_pressure_file_is_none() {
        let dir = fixture();
        std::fs::remove_file(dir.as_path().join("proc/pressure/memory")).unwrap();
        let s = HostSignals::read(dir.as_path(), Some(1)).unwrap();
        assert_eq!(s.pressure, None);
        assert_eq!(s.node_free_bytes, Some(4 << 30));
    }

    #[test]
    fn errors_name_the_file_and_what_is_wrong() {
        let dir = fixture();
        let root = dir.as_path();
        let err = HostSignals::read(root, Some(2)).unwrap_err();
        assert!(
            matches!(&err, HostSignalsError::Read { path, source }
                if path.ends_with("node2/meminfo") && source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        std::fs::write(root.join("proc/pressure/memory"), "some avg10=x\n").unwrap();
        let err = HostSignals::read(root, None).unwrap_err();
        assert!(
            matches!(&err, HostSignalsError::Pressure { path, .. } if path.ends_with("pressure/memory")),
            "{err}"
        );
        std::fs::write(root.join("proc/meminfo"), "MemTotal: 1 kB\n").unwrap();
        let err = HostSignals::read(root, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no MemAvailable: line",
                root.join("proc/meminfo").display()
            )
        );
        std::fs::write(
            root.join("proc/meminfo"),
            "MemTotal: 1 kB\nMemAvailable: 1 GB\n",
        )
        .unwrap();
        let err = HostSignals::read(root, None).unwrap_err();
        assert!(err.to_string().contains("malformed line"), "{err}");
    }

    #[test]
    fn this_hosts_figures_are_sane() {
        let s = HostSignals::read(Path::new("/"), None).unwrap();
        assert!(s.mem_available_bytes > 0, "{s:?}");
        assert!(s.mem_available_bytes <= s.mem_total_bytes, "{s:?}");
        if let Some(p) = s.pressure {
            // Stalls only grow; `full` time is part of `some` time.
            assert!(p.full.total_us <= p.some.total_us, "{p:?}");
        }
    }

    /// Ignored by default, as not every machine shows its NUMA nodes in sysfs; CI runs
    /// it (`.ci/run`).
    #[test]
    #[ignore = "needs /sys/devices/system/node/node0; run with --ignored node_0"]
    fn this_hosts_node_0_has_free_memory() {
        assert!(
            Path::new("/sys/devices/system/node/node0").is_dir(),
            "this test needs /sys/devices/system/node/node0"
        );
        let s = HostSignals::read(Path::new("/"), Some(0)).unwrap();
        let free = s.node_free_bytes.unwrap();
        assert!(free > 0 && free <= s.mem_total_bytes, "{s:?}");
    }
}
