//! Integration-test harness for mempower.
//!
//! Tests boot real Linux guests with the `mempower` VMM. They run in one of two [`Mode`]s:
//!
//! - **direct**: the VMM uses this machine's `/dev/kvm` (real hardware KVM);
//! - **nested**: this machine's KVM cannot run a stock guest (a paravirtual `kvm_pvm`),
//!   so the whole test binary re-runs itself inside a QEMU TCG [`TestHost`], whose
//!   emulated SVM gives a real KVM. See `/work/shared/GUEST-KVM.md` and `images/`.
//!
//! Test binaries use `harness = false` and call [`main`] with their
//! [`libtest_mimic::Trial`]s; trials boot guests with [`GuestBuilder`].

mod error;
mod guest;
mod harness;
pub mod host_memory;
pub mod images;
pub mod latency;
pub mod mode;
pub mod probe;
mod process;
pub mod qemu_vmm;
pub mod retries;
mod testhost;
pub mod verdict;
pub mod vm_api;
pub mod vmm_bin;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::{HarnessError, Result};
pub use guest::{ConsoleLine, Guest, GuestBuilder, GuestError, NodeInfo, ReadyInfo, Stream};
pub use harness::{
    ignorable_trial, is_inside_testhost, main, main_here, main_with_memory, nested_host,
    run_program, run_program_with_memory, trial,
};
pub use mode::Mode;
pub use process::{wait_timeout, ProcessError};
pub use testhost::{TestHost, TestHostError};
pub use vm_api::{pages_in, Fill, VmApi};

/// The workspace's root directory (the checkout), as compiled in.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root if
/// relative), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// A path for a Unix socket of this process in the temporary directory, e.g.
/// `/tmp/mempower-demo-1234.sock` for `socket_path("demo", "sock")`.
pub fn socket_path(name: &str, extension: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "mempower-{name}-{}.{extension}",
        std::process::id()
    ))
}

/// Formats a duration as seconds with one decimal, e.g. `16.4 s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Prints a phase timing line, e.g. `phase: test host up: 16.4 s`.
pub fn print_phase(what: &str, elapsed: Duration) {
    println!("phase: {what}: {}", secs(elapsed));
}

/// Boots the guest `builder` describes with its API on `api_path`, then waits for the
/// agent and for the guest to plug what it was asked to, printing those phases from `t0`.
pub fn boot_plugged(
    builder: GuestBuilder,
    api_path: &Path,
    t0: Instant,
) -> std::result::Result<(Guest, VmApi), libtest_mimic::Failed> {
    let (guest, _) = builder.api_socket(api_path).boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(api_path);
    print_phase("agent connected", api.wait_agent(Duration::from_secs(60))?);
    api.wait_plugged(Duration::from_secs(120))?;
    Ok((guest, api))
}
