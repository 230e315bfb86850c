//! Watches the guest's console output for the agent's `MEMPOWER-PANIC` line, so that a
//! VM whose agent panicked is reported as such rather than as a clean power-off or a
//! bare reset. The line is the guest's word (as everything on its console): it is
//! quoted, never trusted beyond that.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use super::ExitReason;
use crate::sync::Locked;

/// What the guest agent prints first when it panics (guest-agent's `PANIC_PREFIX`).
pub const PANIC_MARKER: &[u8] = b"MEMPOWER-PANIC ";
/// The longest line kept; the guest decides how long its lines are.
const MAX_LINE: usize = 512;

/// The first panic line the guest printed, if any; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AgentPanic(Arc<Mutex<Option<String>>>);

impl AgentPanic {
    pub fn line(&self) -> Option<String> {
        self.0.locked().clone()
    }

    /// The reason to report: a guest that stopped after its agent panicked stopped
    /// because of it.
    pub fn explain(&self, reason: ExitReason) -> ExitReason {
        let Some(line) = self.line() else {
            return reason;
        };
        match reason {
            ExitReason::PowerOff => ExitReason::Reset(format!(
                "the guest agent panicked: {line}; then the guest powered off"
            )),
            ExitReason::Reset(why) => {
                ExitReason::Reset(format!("the guest agent panicked: {line}; then {why}"))
            }
            // The VMM stopped it, or failed, or the guest broke a rule: that is the reason.
            other @ (ExitReason::Stopped(_) | ExitReason::GuestFault(_) | ExitReason::Error(_)) => {
                other
            }
        }
    }
}

/// A console writer that passes everything on to `inner` and notes the first panic line.
pub struct ConsoleWatch<W> {
    inner: W,
    line: Vec<u8>,
    panic: AgentPanic,
}

impl<W: Write> ConsoleWatch<W> {
    pub fn new(inner: W, panic: AgentPanic) -> Self {
        ConsoleWatch {
            inner,
            line: Vec::with_capacity(MAX_LINE),
            panic,
        }
    }

    fn end_of_line(&mut self) {
        if self.line.starts_with(PANIC_MARKER) {
            let mut first = self.panic.0.locked();
            if first.is_none() {
                let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                let text = line
                    .iter()
                    .map(|&b| match b {
                        0x20..=0x7e => char::from(b),
                        _ => '?',
                    })
                    .collect();
                *first = Some(text);
            }
        }
        self.line.clear();
    }
}

impl<W: Write> Write for ConsoleWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Watch only what `inner` took, so that nothing is seen twice.
        let n = self.inner.write(buf)?;
        for &b in &buf[..n] {
            match b {
                b'\n' => self.end_of_line(),
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(output: &[&[u8]]) -> (Vec<u8>, AgentPanic) {
        let panic = AgentPanic::default();
        let mut w = ConsoleWatch::new(Vec::new(), panic.clone());
        for piece in output {
            w.write_all(piece).unwrap();
        }
        (w.inner, panic)
    }

    #[test]
    fn the_first_panic_line_is_noted_and_everything_passes_through() {
        let pieces: [&[u8]; 5] = [
            b"boot\r\nMEMPOWER-READY {}\r\n",
            b"MEMPOWER-PAN",
            b"IC thread 'vsock-conn' panicked at src/x.rs:1:2: boom\r\n",
            b"MEMPOWER-PANIC second\n",
            b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n",
        ];
        let (out, panic) = watch(&pieces);
        assert_eq!(out, pieces.concat());
        assert_eq!(
            panic.line().as_deref(),
            Some("MEMPOWER-PANIC thread 'vsock-conn' panicked at src/x.rs:1:2: boom")
        );
    }

    #[test]
    fn only_a_marker_at_the_start_of_a_line_counts_and_lines_are_bounded() {
        let (_, panic) = watch(&[b"echo MEMPOWER-PANIC x\n", b"MEMPOWER-PANIC"]);
        assert_eq!(panic.line(), None, "mid-line, or not ended");
        let long = [b"MEMPOWER-PANIC ".as_slice(), &[b'x'; 10_000], b"\xff\n"].concat();
        let (_, panic) = watch(&[&long]);
        assert_eq!(panic.line().unwrap().len(), MAX_LINE);
    }

    #[test]
    fn a_stop_after_a_panic_is_reported_as_the_panic() {
        let (_, calm) = watch(&[b"MEMPOWER-READY {}\n"]);
        assert_eq!(calm.explain(ExitReason::PowerOff), ExitReason::PowerOff);
        let (_, panic) = watch(&[b"MEMPOWER-PANIC boom\n"]);
        let ExitReason::Reset(why) = panic.explain(ExitReason::Reset("i8042 reset".into())) else {
            panic!("a reset stays a reset");
        };
        assert_eq!(
            why,
            "the guest agent panicked: MEMPOWER-PANIC boom; then i8042 reset"
        );
        assert!(matches!(
            panic.explain(ExitReason::PowerOff),
            ExitReason::Reset(why) if why.contains("agent panicked")
        ));
        let stopped = ExitReason::Stopped("shutdown requested through the API".into());
        assert_eq!(panic.explain(stopped.clone()), stopped);
    }
}
