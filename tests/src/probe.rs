//! What the single-boot probes share (`tests/examples/boot_probe.rs`,
//! `tests/examples/reset_control.rs`): the probe runs itself once in a fresh test host,
//! never retried, and names how that ended in its last line,
//! `<name>: outcome <ok|guest-death|workload-failed|testhost-died|testhost-froze|error>`,
//! which `images/boot-reliability.sh` tallies.

use std::process::ExitCode;
use std::time::Duration;

use crate::{nested_host, TestHostError};

/// Exit status of an inner run whose guest died (reset, kernel panic, VMM exited).
pub const RC_GUEST_DEATH: i32 = 3;
/// Exit status of an inner run whose workload failed while the guest's VMM still ran.
pub const RC_WORKLOAD_FAILED: i32 = 4;

/// Prints `<name>: outcome <what>`; success only for `ok`.
pub fn outcome(name: &str, what: &str) -> ExitCode {
    println!("{name}: outcome {what}");
    match what {
        "ok" => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Runs this program with `args` once in a fresh test host and names how it ended.
pub fn outcome_in_testhost(name: &str, args: &[String], timeout: Duration) -> &'static str {
    let run = nested_host().map_err(|e| e.to_string()).and_then(|host| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        Ok(host.timeout(timeout).run(exe, args))
    });
    match run {
        Ok(Ok(0)) => "ok",
        Ok(Ok(RC_GUEST_DEATH)) => "guest-death",
        Ok(Ok(RC_WORKLOAD_FAILED)) => "workload-failed",
        Ok(Ok(rc)) => {
            println!("{name}: the inner run exited with {rc}");
            "error"
        }
        Ok(Err(e @ TestHostError::NoExitMarker { .. })) => {
            println!("{name}: {e}");
            "testhost-died"
        }
        Ok(Err(e @ (TestHostError::Silent { .. } | TestHostError::Timeout { .. }))) => {
            println!("{name}: {e}");
            "testhost-froze"
        }
        Ok(Err(e)) => {
            println!("{name}: {e}");
            "error"
        }
        Err(e) => {
            println!("{name}: preparing the test host failed: {e}");
            "error"
        }
    }
}
