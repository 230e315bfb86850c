//! The host memory a running VMM holds: its resident set (`VmRSS`: guest memory it has
//! touched, its memfds included), sampled until it stops moving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far the resident set may drift and still count as still.
pub const TOLERANCE: u64 = 2 << 20;

/// `VmRSS` of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// Follows samples of a resident set: when it first moved, when it last moved, and
/// whether it has been still for long enough.
#[derive(Debug, Clone)]
pub struct Settle {
    start: u64,
    /// The value at the last move, and when.
    anchor: (u64, Duration),
    first_move: Option<Duration>,
    last: u64,
    quiet: Duration,
}

/// What a settled (or timed out) resident set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Bytes at the first sample and at the last.
    pub start: u64,
    pub end: u64,
    /// When it first moved by more than [`TOLERANCE`], if it did.
    pub first_move: Option<Duration>,
    /// When it last moved: the time it took to settle.
    pub settled_after: Duration,
    /// Whether it was still for the quiet period (false: the wait timed out).
    pub still: bool,
}

impl Settled {
    /// Bytes given back to the host (0 if it grew).
    pub fn released(&self) -> u64 {
        self.start.saturating_sub(self.end)
    }
}

impl Settle {
    /// Starts at `rss` bytes; settled once still for `quiet`.
    pub fn new(rss: u64, quiet: Duration) -> Self {
        Settle {
            start: rss,
            anchor: (rss, Duration::ZERO),
            first_move: None,
            last: rss,
            quiet,
        }
    }

    /// Takes the sample `rss` seen `at` after the start; true once settled.
    pub fn feed(&mut self, at: Duration, rss: u64) -> bool {
        self.last = rss;
        if rss.abs_diff(self.anchor.0) > TOLERANCE {
            self.anchor = (rss, at);
            self.first_move.get_or_insert(at);
        }
        at.saturating_sub(self.anchor.1) >= self.quiet
    }

    /// What happened so far.
    pub fn result(&self, still: bool) -> Settled {
        Settled {
            start: self.start,
            end: self.last,
            first_move: self.first_move,
            settled_after: self.anchor.1,
            still,
        }
    }
}

/// Samples `pid`'s resident set every 250 ms until it has been still for `quiet` (and,
/// with `min_move`, has moved by at least that much since the start), or `timeout`.
pub fn wait_settled(
    pid: u32,
    min_move: Option<u64>,
    quiet: Duration,
    timeout: Duration,
) -> std::io::Result<Settled> {
    let t0 = Instant::now();
    let start = rss_bytes(pid)?;
    let mut settle = Settle::new(start, quiet);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let rss = rss_bytes(pid)?;
        let still = settle.feed(t0.elapsed(), rss);
        let moved_enough = min_move.is_none_or(|m| rss.abs_diff(start) >= m);
        if still && moved_enough {
            return Ok(settle.result(true));
        }
        if t0.elapsed() > timeout {
            return Ok(settle.result(false));
        }
    }
}

/// Samples a resident set every 250 ms on a thread of its own, from a given moment on,
/// while the caller does things that change it.
pub struct Sampler {
    shared: Arc<Mutex<Sampled>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Sampled {
    settle: Settle,
    still: bool,
    error: Option<std::io::Error>,
}

impl Sampler {
    /// Starts sampling `pid` now; still means no move for `quiet`.
    pub fn start(pid: u32, quiet: Duration) -> std::io::Result<Self> {
        let t0 = Instant::now();
        let shared = Arc::new(Mutex::new(Sampled {
            settle: Settle::new(rss_bytes(pid)?, quiet),
            still: false,
            error: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, halt) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let sample = rss_bytes(pid);
                    let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                    match sample {
                        Ok(rss) => s.still = s.settle.feed(t0.elapsed(), rss),
                        Err(e) => {
                            s.error = Some(e);
                            return;
                        }
                    }
                }
            })?;
        Ok(Sampler {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the set has been still for the quiet period (or `timeout`), then
    /// stops sampling. Times count from [`Sampler::start`].
    pub fn wait_still(mut self, timeout: Duration) -> std::io::Result<Settled> {
        let t = Instant::now();
        let result = loop {
            {
                let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = s.error.take() {
                    break Err(e);
                }
                if s.still || t.elapsed() > timeout {
                    break Ok(s.settle.result(s.still));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.halt();
        result
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn settles_after_the_last_move_and_ignores_jitter() {
        let s = |ms| Duration::from_millis(ms);
        let mut settle = Settle::new(500 * MIB, s(3000));
        // Jitter of 1 MiB is not a move.
        assert!(!settle.feed(s(250), 501 * MIB));
        assert!(!settle.feed(s(2000), 499 * MIB));
        // Reports: the set falls in steps.
        assert!(!settle.feed(s(2500), 400 * MIB));
        assert!(!settle.feed(s(3000), 300 * MIB));
        assert!(!settle.feed(s(4000), 250 * MIB));
        assert!(!settle.feed(s(6000), 251 * MIB), "still for 2 s only");
        assert!(settle.feed(s(7000), 250 * MIB));
        let r = settle.result(true);
        assert_eq!(
            (r.first_move, r.settled_after, r.released()),
            (Some(s(2500)), s(4000), 250 * MIB)
        );
        // Nothing ever moves: settled after the quiet period, no first move.
        let mut idle = Settle::new(MIB, s(1000));
        assert!(idle.feed(s(1000), MIB));
        assert_eq!(idle.result(true).first_move, None);
        assert_eq!(idle.result(true).released(), 0);
    }

    #[test]
    fn a_sampler_sees_its_process_still() {
        let sampler = Sampler::start(std::process::id(), Duration::from_millis(600)).unwrap();
        let settled = sampler.wait_still(Duration::from_secs(20)).unwrap();
        assert!(settled.still, "{settled:?}");
        assert!(settled.end > 0);
    }

    #[test]
    fn our_own_resident_set_is_readable() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 0);
        assert!(rss_bytes(u32::MAX).is_err());
    }
}
