//! The `mempower` VMM binary under test.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use crate::harness::is_inside_testhost;

/// Names a prebuilt `mempower` binary; nothing is built when it is set.
pub const BIN_ENV: &str = "MEMPOWER_BIN";

/// Errors of building or locating `mempower`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmmBinError {
    /// cargo could not be started.
    #[error("cannot run cargo: {0}")]
    Spawn(Arc<std::io::Error>),
    /// The build failed.
    #[error("`cargo build --release -p vmm --bin mempower` failed ({0}); its errors are above")]
    Build(std::process::ExitStatus),
    /// The binary is not where it should be.
    #[error("mempower binary {} does not exist", .0.display())]
    Missing(PathBuf),
    /// Inside the test host, `MEMPOWER_BIN` was not exported by the outer harness.
    #[error("{BIN_ENV} is not set, and nothing can be built inside the test host")]
    NotExported,
}

/// The `mempower` binary: `$MEMPOWER_BIN`, or else built once per process with
/// `cargo build --release -p vmm --bin mempower` into [`crate::target_dir`].
pub fn mempower_bin() -> Result<PathBuf, VmmBinError> {
    static BIN: OnceLock<Result<PathBuf, VmmBinError>> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = match std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None if is_inside_testhost() => return Err(VmmBinError::NotExported),
            None => build()?,
        };
        if path.is_file() {
            Ok(path)
        } else {
            Err(VmmBinError::Missing(path))
        }
    })
    .clone()
}

fn build() -> Result<PathBuf, VmmBinError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("vmm: building mempower (cargo build --release -p vmm --bin mempower)");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "vmm", "--bin", "mempower"])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        // Keep our stdout for test output: cargo's progress goes to stderr anyway.
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| VmmBinError::Spawn(Arc::new(e)))?;
    if !status.success() {
        return Err(VmmBinError::Build(status));
    }
    Ok(crate::target_dir().join("release/mempower"))
}

/// Runs `mempower ARGS --api-socket SOCKET` (a client subcommand against a running VMM)
/// and returns its trimmed stdout; a non-zero exit is an error carrying its stderr.
pub fn api_client(
    socket: &std::path::Path,
    args: &[&str],
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let out = Command::new(mempower_bin()?)
        .args(args)
        .arg("--api-socket")
        .arg(socket)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "mempower {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
