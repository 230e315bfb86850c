//! Tests that must run in a process of their own (seccomp filters, process exits): the
//! test binary runs itself again, running only the calling test, with an environment
//! variable naming the scenario the child plays.

use std::process::{Command, Output};

/// The variable that names a child's scenario.
const SCENARIO_ENV: &str = "MEMPOWER_TEST_CHILD_SCENARIO";

/// The scenario, when this process is a child.
pub fn scenario() -> Option<String> {
    std::env::var(SCENARIO_ENV).ok()
}

/// Runs `scenario` in a child that runs only the test `test` (its full path, e.g.
/// `stop::tests::a_stuck_teardown_still_exits`), and waits for it.
pub fn run(test: &str, scenario: &str) -> Output {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, scenario)
        .output()
        .expect("the test binary runs")
}

/// No core file from a child that is meant to die of a signal.
pub fn no_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit, alive for the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
}

/// The child's status and output, for assertion messages.
pub fn show(output: &Output) -> String {
    format!(
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
