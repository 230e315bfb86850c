//! A tally of what the harness retried because the emulated machine failed, printed at
//! the end of every run (`retries: ...`), so that a rise is seen instead of hidden.
//!
//! Retries happen on two levels: the inner run, inside the test host, boots nested guests
//! again, and runs a trial again whose guest the emulated machine reset mid-run; the
//! outer run replaces test hosts. Each retry is printed as a marker line
//! (`MEMPOWER-RETRY guest-boot triple-fault`) as it happens. Whoever streams a run's
//! output (the outer harness reading the test host's console, a test reading a child
//! harness) parses those lines and records them again in its own tally, which prints
//! the marker once more on its own output: every level counts each retry once, even
//! when a test host dies after the line went out.
//!
//! Only failures of the emulated machine are retried (see `verdict`), and a test binary
//! gets at most `$MEMPOWER_MAX_RETRIES` retries (default 1) over all levels: the outer
//! run hands what is left to the inner one. Past that, the failure is the result.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

/// Starts a retry line; the kind and cause follow, separated by blanks.
pub const MARKER: &str = "MEMPOWER-RETRY";
/// The most retries a test binary (or the demo, or a bench) may take.
pub const MAX_ENV: &str = "MEMPOWER_MAX_RETRIES";
/// The cap without `$MEMPOWER_MAX_RETRIES`.
const DEFAULT_MAX: u32 = 1;

/// Errors of the retry settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetriesError {
    /// `$MEMPOWER_MAX_RETRIES` is not a whole number.
    #[error("{MAX_ENV}={0:?}: give a whole number of retries")]
    BadCap(String),
}

/// Parses a `$MEMPOWER_MAX_RETRIES` value; unset or empty is the default.
pub fn parse_cap(value: Option<&str>) -> Result<u32, RetriesError> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_MAX),
        Some(v) => v.parse().map_err(|_| RetriesError::BadCap(v.to_string())),
    }
}

/// This process's cap on retries, from `$MEMPOWER_MAX_RETRIES`.
pub fn cap() -> Result<u32, RetriesError> {
    parse_cap(std::env::var(MAX_ENV).ok().as_deref())
}

/// Why a nested guest was booted again before it reached READY. Only the emulated
/// machine's failure is retried; a kernel panic, a hang or a VMM's exit fails at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GuestBootFailure {
    /// A vCPU triple faulted at the reset vector (`verdict::VmmEnd::EmulatedReset`).
    TripleFault,
}

/// Why a test host was replaced by a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TestHostFailure {
    /// QEMU exited without the exit marker: the test host's kernel panicked.
    Panic,
    /// The console went silent, or the run outlived its timeout.
    Freeze,
}

/// One retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Retry {
    /// A nested guest booted again.
    GuestBoot(GuestBootFailure),
    /// A trial run again, in fresh guests, after a guest of its first run was reset by a
    /// triple fault once booted.
    Trial,
    /// A test host replaced.
    TestHost(TestHostFailure),
}

impl GuestBootFailure {
    const ALL: [GuestBootFailure; 1] = [GuestBootFailure::TripleFault];

    /// The marker's word.
    fn word(self) -> &'static str {
        match self {
            GuestBootFailure::TripleFault => "triple-fault",
        }
    }

    /// The summary's words.
    fn phrase(self) -> &'static str {
        match self {
            GuestBootFailure::TripleFault => "triple fault",
        }
    }
}

impl TestHostFailure {
    const ALL: [TestHostFailure; 2] = [TestHostFailure::Panic, TestHostFailure::Freeze];

    fn word(self) -> &'static str {
        match self {
            TestHostFailure::Panic => "panic",
            TestHostFailure::Freeze => "freeze",
        }
    }
}

impl fmt::Display for Retry {
    /// The marker line, e.g. `MEMPOWER-RETRY test-host panic`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retry::GuestBoot(why) => write!(f, "{MARKER} guest-boot {}", why.word()),
            Retry::Trial => write!(f, "{MARKER} trial triple-fault"),
            Retry::TestHost(why) => write!(f, "{MARKER} test-host {}", why.word()),
        }
    }
}

/// Parses a marker line; the marker may follow other text (the serial console can join
/// a line without its end to the next one).
pub fn parse_marker(line: &str) -> Option<Retry> {
    let at = line.find(MARKER)?;
    let mut words = line[at + MARKER.len()..].split_whitespace();
    let (kind, cause) = (words.next()?, words.next()?);
    match kind {
        "guest-boot" => GuestBootFailure::ALL
            .into_iter()
            .find(|c| c.word() == cause)
            .map(Retry::GuestBoot),
        "trial" => (cause == "triple-fault").then_some(Retry::Trial),
        "test-host" => TestHostFailure::ALL
            .into_iter()
            .find(|c| c.word() == cause)
            .map(Retry::TestHost),
        _ => None,
    }
}

/// Retries counted by cause.
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<Retry, u32>>,
}

impl Tally {
    /// An empty tally.
    pub const fn new() -> Tally {
        Tally {
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts a retry and prints its marker line.
    pub fn record(&self, retry: Retry) {
        *self.lock().entry(retry).or_insert(0) += 1;
        println!("{retry}");
    }

    /// Counts a retry and prints its marker line if fewer than `cap` are counted; returns
    /// whether it did. Trials running side by side take from the one budget.
    pub fn try_record(&self, retry: Retry, cap: u32) -> bool {
        {
            let mut counts = self.lock();
            if counts.values().sum::<u32>() >= cap {
                return false;
            }
            *counts.entry(retry).or_insert(0) += 1;
        }
        println!("{retry}");
        true
    }

    /// How many retries of any kind.
    pub fn total(&self) -> u32 {
        self.lock().values().sum()
    }

    /// If `line` is a retry marker, records it (printing it again) and returns true;
    /// otherwise returns false and the caller prints the line.
    pub fn relay(&self, line: &str) -> bool {
        match parse_marker(line) {
            Some(retry) => {
                self.record(retry);
                true
            }
            None => false,
        }
    }

    /// How many retries of this kind and cause.
    pub fn count(&self, retry: Retry) -> u32 {
        self.lock().get(&retry).copied().unwrap_or(0)
    }

    /// `retries: 2 guest boots (1 triple fault, 1 no READY), 0 trials, 1 test host (1 panic)`.
    pub fn summary(&self) -> String {
        let counts = self.lock();
        let boots: Vec<(u32, &str)> = GuestBootFailure::ALL
            .into_iter()
            .filter_map(|c| Some((*counts.get(&Retry::GuestBoot(c))?, c.phrase())))
            .collect();
        let trials: Vec<(u32, &str)> = counts
            .get(&Retry::Trial)
            .map(|n| (*n, "triple fault"))
            .into_iter()
            .collect();
        let hosts: Vec<(u32, &str)> = TestHostFailure::ALL
            .into_iter()
            .filter_map(|c| Some((*counts.get(&Retry::TestHost(c))?, c.word())))
            .collect();
        format!(
            "retries: {}, {}, {}",
            part(&boots, "guest boot"),
            part(&trials, "trial"),
            part(&hosts, "test host")
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Retry, u32>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `0 guest boots`, or `3 guest boots (2 triple fault, 1 no READY)`.
fn part(causes: &[(u32, &str)], noun: &str) -> String {
    let total: u32 = causes.iter().map(|(n, _)| n).sum();
    let plural = if total == 1 { "" } else { "s" };
    if total == 0 {
        return format!("0 {noun}s");
    }
    let list: Vec<String> = causes
        .iter()
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    format!("{total} {noun}{plural} ({})", list.join(", "))
}

/// This process's tally.
pub static TALLY: Tally = Tally::new();

/// Takes a retry from this process's budget (`$MEMPOWER_MAX_RETRIES`; an unreadable
/// value allows none) and prints its marker line; once the budget is spent, says so and
/// returns false: the failure is then the result.
pub fn allow(retry: Retry) -> bool {
    let cap = cap().unwrap_or(0);
    let allowed = TALLY.try_record(retry, cap);
    if !allowed {
        println!("harness: not retried: this run's retries reached its cap ({MAX_ENV}={cap})");
    }
    allowed
}

/// What is left of this process's budget: the cap of a run nested in this one.
pub fn remaining() -> u32 {
    cap().unwrap_or(0).saturating_sub(TALLY.total())
}

/// Prints this process's `retries: ...` line.
pub fn print_summary() {
    println!("{}", TALLY.summary());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        let all = GuestBootFailure::ALL
            .into_iter()
            .map(Retry::GuestBoot)
            .chain([Retry::Trial])
            .chain(TestHostFailure::ALL.into_iter().map(Retry::TestHost));
        for retry in all {
            let line = retry.to_string();
            assert_eq!(parse_marker(&line), Some(retry), "{line}");
            // Joined to an unterminated line before it, with a CR after it.
            assert_eq!(parse_marker(&format!("abc{line}\r")), Some(retry), "{line}");
        }
    }

    #[test]
    fn bad_markers() {
        for bad in [
            "MEMPOWER-RETRY",
            "MEMPOWER-RETRY guest-boot",
            "MEMPOWER-RETRY guest-boot hiccup",
            "MEMPOWER-RETRY guest-boot no-ready",
            "MEMPOWER-RETRY test-host triple-fault",
            "MEMPOWER-RETRY vm panic",
            "MEMPOWER-RETRY trial panic",
            "retries: 0 guest boots, 0 trials, 0 test hosts",
        ] {
            assert_eq!(parse_marker(bad), None, "{bad}");
        }
    }

    #[test]
    fn summaries() {
        let tally = Tally::new();
        assert_eq!(
            tally.summary(),
            "retries: 0 guest boots, 0 trials, 0 test hosts"
        );
        tally.record(Retry::TestHost(TestHostFailure::Panic));
        assert_eq!(
            tally.summary(),
            "retries: 0 guest boots, 0 trials, 1 test host (1 panic)"
        );
        assert!(tally.relay("MEMPOWER-RETRY guest-boot triple-fault"));
        assert!(tally.relay("[  9.1] MEMPOWER-RETRY guest-boot triple-fault"));
        assert!(!tally.relay("test evacuate_compact_fail ... ok"));
        assert!(tally.relay("MEMPOWER-RETRY trial triple-fault"));
        tally.record(Retry::TestHost(TestHostFailure::Freeze));
        assert_eq!(
            tally.summary(),
            "retries: 2 guest boots (2 triple fault), 1 trial (1 triple fault), 2 test hosts (1 panic, 1 freeze)"
        );
        assert_eq!(
            tally.count(Retry::GuestBoot(GuestBootFailure::TripleFault)),
            2
        );
        assert_eq!(tally.count(Retry::Trial), 1);
        assert_eq!(tally.total(), 5);
    }

    #[test]
    fn the_cap_bounds_all_retries_together() {
        assert_eq!(parse_cap(None), Ok(1));
        assert_eq!(parse_cap(Some(" ")), Ok(1));
        assert_eq!(parse_cap(Some("0")), Ok(0));
        assert_eq!(parse_cap(Some(" 3\n")), Ok(3));
        for bad in ["-1", "one", "1.5"] {
            assert_eq!(parse_cap(Some(bad)), Err(RetriesError::BadCap(bad.into())));
        }
        let tally = Tally::new();
        let boot = Retry::GuestBoot(GuestBootFailure::TripleFault);
        assert!(!tally.try_record(boot, 0), "a cap of 0 allows none");
        assert!(tally.try_record(boot, 2));
        // A retry relayed from an inner run takes from the same budget.
        assert!(tally.relay("MEMPOWER-RETRY test-host panic"));
        assert!(!tally.try_record(Retry::Trial, 2));
        assert!(tally.try_record(Retry::Trial, 3));
        assert_eq!(
            tally.summary(),
            "retries: 1 guest boot (1 triple fault), 1 trial (1 triple fault), 1 test host (1 panic)"
        );
    }

    /// Trials side by side cannot both take the last retry.
    #[test]
    fn the_cap_holds_across_threads() {
        static TALLY: Tally = Tally::new();
        let taken: u32 = (0..8)
            .map(|_| std::thread::spawn(|| TALLY.try_record(Retry::Trial, 3)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| u32::from(t.join().unwrap()))
            .sum();
        assert_eq!(taken, 3);
        assert_eq!(TALLY.total(), 3);
    }
}
