//! Fuzzes `agent_protocol::psi::parse`, the reader of the kernel's pressure files (the
//! agent's in the guest, the VMM's on the host), on arbitrary text.
//!
//! Invariants:
//! - no panic, whatever the text;
//! - what it accepts are percentages from 0 to 100;
//! - its figures, written back as the kernel writes them, parse to the same figures.

#![no_main]

use agent_protocol::psi::{self, Stall};
use libfuzzer_sys::fuzz_target;

fn line(kind: &str, s: &Stall) -> String {
    format!(
        "{kind} avg10={:.2} avg60={:.2} avg300=0.00 total={}\n",
        s.avg10, s.avg60, s.total_us
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(pressure) = psi::parse(&String::from_utf8_lossy(data)) else {
        return;
    };
    for s in [&pressure.some, &pressure.full] {
        for avg in [s.avg10, s.avg60] {
            assert!((0.0..=100.0).contains(&avg), "{avg}");
        }
    }
    let text = line("some", &pressure.some) + &line("full", &pressure.full);
    assert_eq!(psi::parse(&text), Ok(pressure), "{text}");
});
