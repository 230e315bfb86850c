//! Boots the nested test host and checks its KVM: `svm` in /proc/cpuinfo and /dev/kvm.
//!
//!     cargo run -p mempower-tests --example testhost_smoke [-- 'COMMAND']
//!
//! Runs `sh -c COMMAND` in the test host (default: the KVM check) and exits with its code.

use std::time::Instant;

use mempower_tests::{print_phase, TestHost};

const CHECK: &str = "echo svm flags: $(grep -cw svm /proc/cpuinfo); ls -l /dev/kvm; \
    grep -qw svm /proc/cpuinfo && test -c /dev/kvm";

fn main() {
    let command = std::env::args().nth(1).unwrap_or_else(|| CHECK.to_string());
    let start = Instant::now();
    match TestHost::new().run("sh", &["-c", &command]) {
        Ok(rc) => {
            print_phase("testhost_smoke", start.elapsed());
            println!("testhost_smoke: command exited with {rc}");
            std::process::exit(rc);
        }
        Err(e) => {
            eprintln!("testhost_smoke: {e}");
            std::process::exit(1);
        }
    }
}
