//! Fuzzes the readers of the kernel's text files that the agent reads in the guest and
//! the VMM on the host, on arbitrary text: `agent_protocol::psi::parse` (pressure files)
//! and `agent_protocol::meminfo::parse` (`/proc/meminfo`, a node's `meminfo`).
//!
//! Invariants:
//! - no panic, whatever the text;
//! - pressure figures are percentages from 0 to 100, and written back as the kernel
//!   writes them they parse to the same figures;
//! - meminfo figures are whole KiB (or saturated), and written back as the kernel writes
//!   them they parse to the same figures.

#![no_main]

use agent_protocol::meminfo;
use agent_protocol::psi::{self, Stall};
use libfuzzer_sys::fuzz_target;

fn line(kind: &str, s: &Stall) -> String {
    format!(
        "{kind} avg10={:.2} avg60={:.2} avg300=0.00 total={}\n",
        s.avg10, s.avg60, s.total_us
    )
}

const KEYS: [&str; 3] = ["MemFree:", "MemAvailable:", "Active(file):"];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(pressure) = psi::parse(&text) {
        for s in [&pressure.some, &pressure.full] {
            for avg in [s.avg10, s.avg60] {
                assert!((0.0..=100.0).contains(&avg), "{avg}");
            }
        }
        let again = line("some", &pressure.some) + &line("full", &pressure.full);
        assert_eq!(psi::parse(&again), Ok(pressure), "{again}");
    }
    if let Ok(bytes) = meminfo::parse(&text, KEYS) {
        if bytes.iter().all(|&b| b != u64::MAX) {
            assert!(bytes.iter().all(|b| b % 1024 == 0), "{bytes:?}");
            let again: String = KEYS
                .iter()
                .zip(bytes)
                .map(|(key, b)| format!("Node 0 {key} {} kB\n", b / 1024))
                .collect();
            assert_eq!(meminfo::parse(&again, KEYS), Ok(bytes), "{again}");
        }
    }
});
