//! Boots the usual two-node test VM once, with no retry, and says how it went.
//!
//!     cargo run --release -p mempower-tests --example boot_probe
//!
//! In nested mode this program re-runs itself in one fresh test host (its QEMU is
//! `$MEMPOWER_QEMU`, default `qemu-system-x86_64`); inside, it boots the guest, waits for
//! the agent's READY line and for the guest to plug its hotplug memory (where QEMU TCG's
//! nested SVM kills guests and test hosts most often), then powers it off. Unlike the
//! test harness it never boots anything twice, so that every death is seen. The last
//! line is `boot-probe: outcome <ok|guest-death|testhost-died|testhost-froze|error>`;
//! `images/boot-reliability.sh` runs it in a loop and tallies the outcomes.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_tests::{is_inside_testhost, print_phase, probe, vmm_bin, GuestBuilder, Mode};

/// The guest of tests/tests/{agent,evacuation}.rs: 256 MiB per node, a 1 GiB virtio-mem
/// region per node of which 512 MiB is plugged at boot.
const BOOT_MIB: u64 = 256;
const HOTPLUG_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 512;
/// READY normally comes within 20 s, plugging within a few more.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);
/// The whole test host run; a frozen one is caught earlier, by its console's silence.
const TESTHOST_TIMEOUT: Duration = Duration::from_secs(480);

/// The prefix of the lines that say how a run went.
const NAME: &str = "boot-probe";

fn outcome(what: &str) -> ExitCode {
    probe::outcome(NAME, what)
}

fn main() -> ExitCode {
    let mode = match mempower_tests::mode::mode() {
        Ok(mode) => mode,
        Err(e) => {
            println!("boot-probe: {e}");
            return outcome("error");
        }
    };
    if mode == Mode::Direct || is_inside_testhost() {
        return match boot_once() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("boot-probe: guest death: {e}");
                ExitCode::from(probe::RC_GUEST_DEATH as u8)
            }
        };
    }
    outcome(probe::outcome_in_testhost(NAME, &[], TESTHOST_TIMEOUT))
}

/// Boots the guest to READY, waits until both nodes have plugged what they were asked
/// to, and powers it off cleanly.
fn boot_once() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let socket = std::env::temp_dir().join(format!("boot-probe-{}.sock", std::process::id()));
    let mut guest = GuestBuilder::new()
        .two_nodes(BOOT_MIB, HOTPLUG_MIB, REQUESTED_MIB)
        .api_socket(&socket)
        .timeout(GUEST_TIMEOUT)
        .boot()?;
    guest.wait_ready()?;
    let plugging = Instant::now();
    loop {
        let json = vmm_bin::api_client(&socket, &["nodes"])
            .map_err(|e| format!("asking the VMM for its nodes: {e}"))?;
        let nodes: serde_json::Value = serde_json::from_str(&json)?;
        let nodes = nodes.as_array().cloned().unwrap_or_default();
        if !nodes.is_empty()
            && nodes
                .iter()
                .all(|n| n["plugged_bytes"] == n["requested_bytes"])
        {
            break;
        }
        if t0.elapsed() > GUEST_TIMEOUT {
            return Err(format!("the guest did not plug its memory: {json}").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    print_phase("guest plugged", t0.elapsed());
    print_phase("plugging after READY", plugging.elapsed());
    guest.poweroff_cleanly()?;
    Ok(())
}
