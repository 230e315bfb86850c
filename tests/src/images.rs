//! The images guests and the test host boot, built by `images/build.sh`.
//!
//! Environment variables naming an image (`MEMPOWER_KERNEL`, ...) take precedence over
//! building it. Inside the test host nothing is built (its root is read-only): the outer
//! harness exports every path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use crate::harness::is_inside_testhost;

/// Guest kernel (`vmlinux`).
pub const KERNEL_ENV: &str = "MEMPOWER_KERNEL";
/// Guest initramfs (cpio, `/init` is the guest agent).
pub const INITRAMFS_ENV: &str = "MEMPOWER_INITRAMFS";
/// Test host kernel (Debian `vmlinuz`).
pub const TESTHOST_KERNEL_ENV: &str = "MEMPOWER_TESTHOST_KERNEL";
/// Test host initramfs (gzip cpio, `/init` is `images/testhost-init`).
pub const TESTHOST_INITRAMFS_ENV: &str = "MEMPOWER_TESTHOST_INITRAMFS";
/// Debian guest kernel (Debian's `vmlinuz`, a bzImage).
pub const DEBIAN_KERNEL_ENV: &str = "MEMPOWER_DEBIAN_KERNEL";
/// Debian guest initrd (initramfs-tools, gzip).
pub const DEBIAN_INITRD_ENV: &str = "MEMPOWER_DEBIAN_INITRD";
/// Debian guest root disk (raw ext4 image, read-only in the cache: boot a copy).
pub const DEBIAN_ROOTFS_ENV: &str = "MEMPOWER_DEBIAN_ROOTFS";

/// Errors of building or locating images.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImagesError {
    /// `images/build.sh` could not be started.
    #[error("cannot run {script}: {source}")]
    Spawn {
        /// The script's path.
        script: PathBuf,
        /// The underlying error.
        source: Arc<std::io::Error>,
    },
    /// `images/build.sh` failed.
    #[error("`images/build.sh {what}` failed ({status}); its errors are above")]
    Failed {
        /// The build.sh argument.
        what: String,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// A line of build.sh's stdout is not `KEY=PATH`.
    #[error("unexpected line on images/build.sh's stdout: {0:?}")]
    BadLine(String),
    /// build.sh did not name an image.
    #[error("images/build.sh did not print {0}=PATH")]
    MissingKey(&'static str),
    /// An image path does not exist.
    #[error("{key}={} does not exist", path.display())]
    Missing {
        /// The variable naming it.
        key: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Inside the test host, an image path was not exported by the outer harness.
    #[error("{0} is not set, and images cannot be built inside the test host")]
    NotExported(&'static str),
}

/// What a guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// `vmlinux`.
    pub kernel: PathBuf,
    /// Uncompressed cpio whose `/init` is the guest agent.
    pub initramfs: PathBuf,
}

/// What the nested test host boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestHostImages {
    /// Debian's generic `vmlinuz`.
    pub kernel: PathBuf,
    /// Gzip cpio with busybox, modules and `images/testhost-init`.
    pub initramfs: PathBuf,
}

/// What the Debian guest boots (`images/build.sh debian`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianImages {
    /// Debian's `vmlinuz` (bzImage).
    pub kernel: PathBuf,
    /// Its initrd, regenerated with mempower's device drivers.
    pub initrd: PathBuf,
    /// The root disk: raw ext4 with systemd and the agent service.
    pub rootfs: PathBuf,
}

impl DebianImages {
    /// The variables naming these images, to export into the test host.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            (DEBIAN_KERNEL_ENV, &self.kernel),
            (DEBIAN_INITRD_ENV, &self.initrd),
            (DEBIAN_ROOTFS_ENV, &self.rootfs),
        ]
    }
}

/// Parses build.sh's stdout: `KEY=PATH` lines; blank lines are skipped.
pub fn parse_key_paths(stdout: &str) -> Result<BTreeMap<String, PathBuf>, ImagesError> {
    let mut map = BTreeMap::new();
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (key, path) = line
            .split_once('=')
            .ok_or_else(|| ImagesError::BadLine(line.into()))?;
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok || path.is_empty() {
            return Err(ImagesError::BadLine(line.into()));
        }
        map.insert(key.to_string(), PathBuf::from(path));
    }
    Ok(map)
}

/// Runs `images/build.sh <what>` (progress on our stderr) and parses its stdout.
fn run_build_sh(what: &str) -> Result<BTreeMap<String, PathBuf>, ImagesError> {
    let script = crate::workspace_root().join("images/build.sh");
    println!("images: running {} {what}", script.display());
    let out = Command::new(&script)
        .arg(what)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| ImagesError::Spawn {
            script: script.clone(),
            source: Arc::new(e),
        })?;
    if !out.status.success() {
        return Err(ImagesError::Failed {
            what: what.to_string(),
            status: out.status,
        });
    }
    parse_key_paths(&String::from_utf8_lossy(&out.stdout))
}

/// Resolves each key from its environment variable, or else from build.sh's output for
/// the given targets (run only if some key is not preset).
fn resolve<const N: usize>(
    keys: [&'static str; N],
    targets: &[&str],
) -> Result<[PathBuf; N], ImagesError> {
    let preset = keys.map(|k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let mut built = BTreeMap::new();
    if preset.iter().any(Option::is_none) {
        if is_inside_testhost() {
            let missing = keys
                .iter()
                .zip(&preset)
                .find(|(_, p)| p.is_none())
                .map(|(k, _)| *k);
            return Err(ImagesError::NotExported(missing.unwrap_or(keys[0])));
        }
        for target in targets {
            built.extend(run_build_sh(target)?);
        }
    }
    let mut paths = Vec::with_capacity(N);
    for (key, preset) in keys.iter().zip(preset) {
        let path = match preset {
            Some(p) => p,
            None => built
                .get(*key)
                .cloned()
                .ok_or(ImagesError::MissingKey(key))?,
        };
        if !Path::new(&path).is_file() {
            return Err(ImagesError::Missing { key, path });
        }
        paths.push(path);
    }
    Ok(paths.try_into().expect("one path per key"))
}

/// The guest's kernel and initramfs, built once per process.
pub fn guest() -> Result<&'static GuestImages, ImagesError> {
    static IMAGES: OnceLock<Result<GuestImages, ImagesError>> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let [kernel, initramfs] =
                resolve([KERNEL_ENV, INITRAMFS_ENV], &["kernel", "initramfs"])?;
            Ok(GuestImages { kernel, initramfs })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The Debian guest's images, built once per process (minutes the first time, then
/// cached in `~/.cache/mempower`). Only test binaries that boot it build it; they export
/// [`DebianImages::env`] before [`crate::main`] so that the test host sees the paths.
pub fn debian() -> Result<&'static DebianImages, ImagesError> {
    static IMAGES: OnceLock<Result<DebianImages, ImagesError>> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let [kernel, initrd, rootfs] = resolve(
                [DEBIAN_KERNEL_ENV, DEBIAN_INITRD_ENV, DEBIAN_ROOTFS_ENV],
                &["debian"],
            )?;
            Ok(DebianImages {
                kernel,
                initrd,
                rootfs,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The test host's kernel and initramfs, built once per process.
pub fn testhost() -> Result<&'static TestHostImages, ImagesError> {
    static IMAGES: OnceLock<Result<TestHostImages, ImagesError>> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let [kernel, initramfs] =
                resolve([TESTHOST_KERNEL_ENV, TESTHOST_INITRAMFS_ENV], &["testhost"])?;
            Ok(TestHostImages { kernel, initramfs })
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_lines() {
        let out = "MEMPOWER_KERNEL=/c/kernel-1/vmlinux\n\nMEMPOWER_INITRAMFS=/w/target/images/initramfs.cpio\n";
        let map = parse_key_paths(out).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map["MEMPOWER_KERNEL"], PathBuf::from("/c/kernel-1/vmlinux"));
        assert_eq!(
            map["MEMPOWER_INITRAMFS"],
            PathBuf::from("/w/target/images/initramfs.cpio")
        );
        // A path may itself contain '='.
        let map = parse_key_paths("MEMPOWER_TESTHOST_KERNEL=/a=b/vmlinuz").unwrap();
        assert_eq!(
            map["MEMPOWER_TESTHOST_KERNEL"],
            PathBuf::from("/a=b/vmlinuz")
        );
        assert!(parse_key_paths("").unwrap().is_empty());
    }

    #[test]
    fn bad_key_path_lines() {
        for bad in [
            "building kernel...",
            "=/x",
            "lower=/x",
            "MEMPOWER_KERNEL=",
            "A B=/x",
        ] {
            assert!(
                matches!(parse_key_paths(bad), Err(ImagesError::BadLine(_))),
                "{bad:?}"
            );
        }
    }
}
