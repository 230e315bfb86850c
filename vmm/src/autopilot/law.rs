//! The autopilot's control law: from one [`Sample`] of a node per interval, whether to
//! grow the node's requested size, shrink it, or hold.
//!
//! The law is pure: no clock, no I/O, no threads. Its driver reads the node (free and
//! file pages, the virtio-mem device's plugged and requested sizes, the guest's memory
//! PSI and its OOM-kill, refault and allocstall counters, the host's available memory
//! and PSI), calls [`Law::step`], and carries out the [`Decision`] by setting the
//! device's requested size. Which regions go on a shrink is the executor's choice, not
//! the law's.
//!
//! # What the node has
//! The law sizes on *available* memory: free pages, plus the share
//! [`Settings::file_credit_percent`] of the page cache (the kernel drops cold cache for
//! a new allocation without stalling, so a guest full of cache is not short of memory),
//! plus a plug the guest has not taken yet (`requested - plugged`), minus an unplug not
//! yet done. Counting the pending plug or unplug keeps the law from asking twice for
//! the same deficit or releasing the same excess twice while the device works.
//!
//! # Marks
//! Two marks on available memory, with a gap of at least half a region between them so
//! that noise does not undo a release: under the *low mark* the node is short; over the
//! *headroom* plus a region, it has whole regions to give. Between them the law holds.
//!
//! # Grow first
//! A node short of memory grows at once, at the sample that shows it: a spike must be
//! met before the guest reclaims hard or kills a task, and a region plugged too many
//! costs only until the next release. The signals, each asking for some regions:
//! - available under the low mark: the deficit up to the headroom;
//! - a new OOM kill: two (the deficit was real but could not be seen);
//! - PSI `some avg10` at [`GuestMarks::psi_grow`], or `full avg10` at
//!   [`GuestMarks::psi_full_grow`]: one per `psi_grow` of stall, up to four (PSI says how
//!   hard the guest stalls, not how much it lacks);
//! - refaults or allocstalls at their rates: one.
//!
//! The node grows by the most any signal asks for. Still short at the very next sample,
//! it grows by twice its last grow at least: free memory cannot go under zero, so a
//! deficit larger than the headroom only shows as one that does not go away. PSI is a
//! 10 s average and lags a plug, so within 10 s of a grow the soft signals (PSI,
//! refaults, allocstalls) grow again only while PSI still rises: it rises only while the
//! guest stalls more than its average.
//!
//! # Shrink with patience
//! A release is only worth it if the memory stays unused, and one that must be undone
//! costs the guest its cache and the host a compaction. So a node is *calm* while its
//! available memory is a region or more over the headroom, PSI is under
//! [`GuestMarks::psi_quiet`] and no signal asks to grow; once it has been calm for the
//! patience window, the law releases the least it had over the headroom through the
//! last patience window (releases already made counted as made from the start of it),
//! rounded down to whole regions, never under `min` and never faster than
//! [`Settings::max_shrink_per_min`] (a bucket that refills at that rate and holds a
//! minute's worth). What arrives during the window goes as the window slides over it.
//! A sample that is not calm, a grow, or a gap of more than three intervals between
//! samples starts the window again.
//!
//! # Regrets and backoff
//! A grow within [`Settings::regret_window`] of a release undoes it: a *regret*. Each
//! regret doubles the patience window, up to [`Settings::patience_max`]; after
//! [`Settings::backoff_decay`] without a regret it halves back, down to
//! [`Settings::patience`]. A load that comes back every minute or so is thus chased
//! once, then waited out.
//!
//! # Host pressure
//! When the host runs short (its available fraction under [`HostMarks::available_low`]
//! or its PSI `some avg10` at [`HostMarks::psi_high`]), the headroom tightens, from full
//! to its floor in 10 s: the larger of a quarter of the headroom and the low mark plus
//! half a region. The guests then give back what they can spare sooner and further.
//! A calm host (both marks relaxed) gives the headroom back over two minutes: quick to
//! help the host, slow to believe it is over. A tighter headroom never grows a node:
//! only the low mark and the guest's signals do.
//!
//! # Modes and the user
//! [`Mode::Off`] decides nothing. [`Mode::Release`] only gives back: it grows, on the
//! same signals, only back up to the size the node had when the law started (or that the
//! user last set). [`Mode::Autosize`] grows up to `max`. A size the user sets holds:
//! [`Law::user_target`] pauses the law until [`Law::resume`].
//!
//! # Guarantees
//! - A target is never above `max`, never under `min`, and a whole number of regions.
//! - No shrink while PSI is not quiet (a PSI that cannot be read, NaN, is not quiet).
//! - No shrink before the node has been calm for the patience window, and none of
//!   memory that was not spare through all of the last window.
//! - At most one decision per sample, and none from a sample not newer than the last.
//! - Outside `min..=max` (a user size, then resume), the node is brought back at once:
//!   under `min` at the next sample, above `max` at the next quiet one. The rate limit
//!   paces the law's own releases, not the bounds, which are the user's orders.

use std::collections::VecDeque;
use std::time::Duration;

mod decision;
mod settings;
#[cfg(test)]
mod tests;

pub use decision::{Decision, Reason, Signal};
use decision::{Secs, Size};
pub use settings::{Bounds, GuestMarks, HostMarks, Mode, Settings};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// PSI's avg10 forgets a stall over about this long, and a plug lands within it: a soft
/// signal this soon after a grow grows again only while PSI rises.
const SETTLE: Duration = Duration::from_secs(10);
/// Host pressure takes the headroom from full to its floor in this long...
const TIGHTEN: Duration = Duration::from_secs(10);
/// ...and a calm host gives it back over this long.
const RELAX: Duration = Duration::from_secs(120);
/// The most regions a PSI reading asks for at once: PSI says how hard the guest
/// stalls, not how much it lacks.
const MAX_PSI_REGIONS: u64 = 4;
/// Regions asked for by an OOM kill: the deficit was real but cannot be measured.
const OOM_REGIONS: u64 = 2;
/// Samples further apart than this many intervals leave the calm window unproven.
const GAP_INTERVALS: u32 = 3;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum LawError {
    #[error("autopilot: the region size is zero")]
    ZeroStep,
    #[error("autopilot: {name} {} is not a whole number of {} regions", Size(*bytes), Size(*step))]
    NotWhole {
        name: &'static str,
        bytes: u64,
        step: u64,
    },
    #[error("autopilot: min {} is above max {}", Size(*min), Size(*max))]
    MinAboveMax { min: u64, max: u64 },
    #[error("autopilot: max {} is less than one region ({}): nothing to size", Size(*max), Size(*step))]
    NothingToSize { max: u64, step: u64 },
    #[error("autopilot: headroom {} is above max {}", Size(*headroom), Size(*max))]
    HeadroomAboveMax { headroom: u64, max: u64 },
    #[error(
        "autopilot: the low mark {} must sit at least half a region ({}) under the headroom \
         {}, or noise would undo each release",
        Size(*low_mark), Size(*step / 2), Size(*headroom)
    )]
    MarksTooClose {
        low_mark: u64,
        headroom: u64,
        step: u64,
    },
    #[error("autopilot: the {0} is zero")]
    Zero(&'static str),
    #[error("autopilot: patience {} is shorter than the interval {}", Secs(*patience), Secs(*interval))]
    PatienceUnderInterval {
        patience: Duration,
        interval: Duration,
    },
    #[error("autopilot: the patience cap {} is under the patience {}", Secs(*cap), Secs(*patience))]
    PatienceCap { cap: Duration, patience: Duration },
    #[error(
        "autopilot: a shrink rate of {}/min is less than one region ({}): nothing could be released",
        Size(*rate), Size(*step)
    )]
    ShrinkRate { rate: u64, step: u64 },
    #[error("autopilot: file credit {0}% is above 100%")]
    FileCredit(u8),
    #[error("autopilot: {name} PSI marks must be 0 < {low}% <= {high}% <= 100%")]
    PsiMarks {
        name: &'static str,
        low: f32,
        high: f32,
    },
    #[error("autopilot: host available marks must be 0 <= {low} <= {calm} <= 1")]
    HostAvailable { low: f32, calm: f32 },
    #[error("autopilot: mode '{0}' is not off, release or autosize")]
    Mode(String),
}

/// One reading of a node and of the host. Counters are cumulative (the law takes their
/// differences); sizes are bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Monotonic time of the reading.
    pub at: Duration,
    /// The node's free memory (`MemFree` of its meminfo).
    pub node_free: u64,
    /// The node's page cache (`FilePages`).
    pub node_file: u64,
    /// What the virtio-mem device has plugged.
    pub plugged: u64,
    /// What the device was asked to plug: the size the law moves.
    pub requested: u64,
    /// The guest's memory PSI, percent.
    pub psi_some_avg10: f32,
    pub psi_full_avg10: f32,
    /// The guest's `oom_kill` counter.
    pub oom_kills: u64,
    /// The node's `workingset_refault_anon` + `workingset_refault_file`, in pages.
    pub refaults: u64,
    /// The guest's `allocstall_*` counters, summed.
    pub allocstalls: u64,
    /// The host's MemAvailable / MemTotal.
    pub host_available_fraction: f32,
    /// The host's memory PSI `some avg10`, percent.
    pub host_psi_some_avg10: f32,
}

/// Whether the law decides or waits for the user.
#[derive(Debug, Clone, PartialEq)]
enum Run {
    Deciding,
    Paused { user_target: u64 },
}

/// The counters of the last sample.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    at: Duration,
    oom_kills: u64,
    refaults: u64,
    allocstalls: u64,
    psi_some: f32,
}

/// What changed since the last sample.
#[derive(Debug, Default)]
struct Rates {
    oom_kills: u64,
    refaults_per_sec: u64,
    allocstalls_per_sec: u64,
    /// PSI avg10 rises only while the guest stalls more than its average: still short.
    psi_rising: bool,
    /// The last sample was answered with a grow.
    grew_last: bool,
}

/// What the guest's signals say.
#[derive(Debug)]
enum Short {
    No,
    /// Only soft signals, which a recent grow has yet to answer.
    Settling(Signal),
    Grow(Signal, u64),
}

/// Since when the node has been calm, and what it had available over the last patience
/// window: only the samples that may yet be the least, rising from front to back, so
/// that the front is the least (at most a window's worth of samples).
#[derive(Debug, Clone, PartialEq)]
struct Calm {
    since: Duration,
    window: VecDeque<(Duration, u64)>,
}

impl Calm {
    fn new(since: Duration) -> Calm {
        Calm {
            since,
            window: VecDeque::new(),
        }
    }

    fn push(&mut self, at: Duration, available: u64, span: Duration) {
        while self.window.back().is_some_and(|&(_, a)| a >= available) {
            self.window.pop_back();
        }
        self.window.push_back((at, available));
        while self.window.front().is_some_and(|&(t, _)| t + span < at) {
            self.window.pop_front();
        }
    }

    fn least(&self) -> u64 {
        self.window.front().map_or(0, |&(_, a)| a)
    }

    /// A release lowers what each sample of the window would have had, had it been
    /// made before them: what is left is what stayed spare all through the window.
    fn released(&mut self, bytes: u64) {
        for (_, a) in &mut self.window {
            *a = a.saturating_sub(bytes);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Grown {
    at: Duration,
    regions: u64,
}

/// The control law of one node: feed it a [`Sample`] per interval with [`Law::step`].
#[derive(Debug, Clone)]
pub struct Law {
    settings: Settings,
    run: Run,
    last: Option<Seen>,
    /// How far release mode grows back; taken from the next sample when unknown.
    ceiling: Option<u64>,
    headroom_now: u64,
    patience_now: Duration,
    calm: Option<Calm>,
    last_grow: Option<Grown>,
    /// When the last release was made, while it is within its regret window.
    release_at: Option<Duration>,
    /// When the patience was last lengthened or relaxed, while it is lengthened.
    backoff_at: Option<Duration>,
    regrets: u64,
    /// Bytes the rate limit lets go now.
    budget: u64,
}

impl Law {
    pub fn new(settings: Settings) -> Result<Law, LawError> {
        settings.validate()?;
        Ok(Law {
            run: Run::Deciding,
            last: None,
            ceiling: None,
            headroom_now: settings.bounds.headroom,
            patience_now: settings.patience,
            calm: None,
            last_grow: None,
            release_at: None,
            backoff_at: None,
            regrets: 0,
            budget: settings.max_shrink_per_min,
            settings,
        })
    }

    /// Replaces the settings, keeping what the law learnt (regrets, backoff within the
    /// new bounds). A new mode takes its release ceiling from the next sample.
    pub fn reconfigure(&mut self, settings: Settings) -> Result<(), LawError> {
        settings.validate()?;
        if settings.mode != self.settings.mode {
            self.ceiling = None;
        }
        self.headroom_now = self
            .headroom_now
            .clamp(settings.headroom_floor(), settings.bounds.headroom);
        self.patience_now = self
            .patience_now
            .clamp(settings.patience, settings.patience_max);
        self.budget = self.budget.min(settings.max_shrink_per_min);
        self.calm = None;
        self.settings = settings;
        Ok(())
    }

    /// The user set the node's size to `bytes`: hold it until [`Law::resume`]. Release
    /// mode then grows back no further than it.
    pub fn user_target(&mut self, bytes: u64) {
        let b = &self.settings.bounds;
        self.ceiling = Some(ceiling_of(bytes, b));
        self.run = Run::Paused { user_target: bytes };
        self.calm = None;
    }

    /// Decides again. What happened while paused was the user's doing: no release is
    /// waiting to be regretted, and the calm window starts afresh.
    pub fn resume(&mut self) {
        self.run = Run::Deciding;
        self.calm = None;
        self.last_grow = None;
        self.release_at = None;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The size the user set, while the law is paused.
    pub fn paused(&self) -> Option<u64> {
        match self.run {
            Run::Deciding => None,
            Run::Paused { user_target } => Some(user_target),
        }
    }

    /// Releases undone by a grow within the regret window, so far.
    pub fn regrets(&self) -> u64 {
        self.regrets
    }

    /// The headroom after host pressure.
    pub fn headroom_now(&self) -> u64 {
        self.headroom_now
    }

    /// The patience window after regrets.
    pub fn patience_now(&self) -> Duration {
        self.patience_now
    }

    /// Takes one sample and decides.
    pub fn step(&mut self, s: &Sample) -> Decision {
        let since_last = match &self.last {
            Some(last) if s.at <= last.at => {
                return Decision::Hold {
                    reason: Reason::OutOfOrder,
                }
            }
            Some(last) => Some(s.at - last.at),
            None => None,
        };
        let rates = self.rates(s, since_last);
        if let Some(dt) = since_last {
            self.refill(dt);
            self.follow_host(s, dt);
            if dt > self.settings.interval * GAP_INTERVALS {
                self.calm = None;
            }
        }
        self.expire(s.at);

        if let Run::Paused { user_target } = self.run {
            return hold(Reason::Paused { user_target });
        }
        if self.settings.mode == Mode::Off {
            self.calm = None;
            return hold(Reason::Off);
        }
        let b = &self.settings.bounds;
        let ceiling = *self.ceiling.get_or_insert(ceiling_of(s.requested, b));
        if s.requested < b.min {
            let min = b.min;
            return self.grow(s, min, Reason::BelowMin { min });
        }
        let available = self.available(s);
        match self.short(s, available, &rates) {
            Short::Grow(signal, mut regions) => {
                // Still short right after a grow: the deficit is more than it showed.
                if let Some(last) = self.last_grow.as_ref().filter(|_| rates.grew_last) {
                    regions = regions.max(last.regions.saturating_mul(2));
                }
                self.grow_for(s, ceiling, signal, regions)
            }
            Short::Settling(signal) => {
                self.calm = None;
                hold(Reason::Settling { signal })
            }
            Short::No => self.shrink_for(s, available),
        }
    }

    /// Counter increments since the last sample, as rates; a counter that went back
    /// (a guest reboot) counts as no change.
    fn rates(&mut self, s: &Sample, since_last: Option<Duration>) -> Rates {
        let rates = match (&self.last, since_last) {
            (Some(last), Some(dt)) => {
                let per_sec = |now: u64, then: u64| {
                    let d = now.saturating_sub(then) as f64 / dt.as_secs_f64();
                    d as u64
                };
                Rates {
                    oom_kills: s.oom_kills.saturating_sub(last.oom_kills),
                    refaults_per_sec: per_sec(s.refaults, last.refaults),
                    allocstalls_per_sec: per_sec(s.allocstalls, last.allocstalls),
                    psi_rising: s.psi_some_avg10 > last.psi_some,
                    grew_last: dt < SETTLE
                        && self.last_grow.as_ref().is_some_and(|g| g.at == last.at),
                }
            }
            _ => Rates::default(),
        };
        self.last = Some(Seen {
            at: s.at,
            oom_kills: s.oom_kills,
            refaults: s.refaults,
            allocstalls: s.allocstalls,
            psi_some: s.psi_some_avg10,
        });
        rates
    }

    fn refill(&mut self, dt: Duration) {
        let cap = self.settings.max_shrink_per_min;
        let add = (cap as u128 * dt.as_millis() / 60_000).min(cap as u128) as u64;
        self.budget = self.budget.saturating_add(add).min(cap);
    }

    /// Tightens the headroom under host pressure and relaxes it on a calm host.
    fn follow_host(&mut self, s: &Sample, dt: Duration) {
        let h = &self.settings.host;
        let full = self.settings.bounds.headroom;
        let floor = self.settings.headroom_floor();
        let span = (full - floor) as u128;
        let by = |over: Duration| (span * dt.as_millis() / over.as_millis().max(1)) as u64;
        let short =
            s.host_available_fraction < h.available_low || s.host_psi_some_avg10 >= h.psi_high;
        let calm =
            s.host_available_fraction >= h.available_calm && s.host_psi_some_avg10 < h.psi_calm;
        if short {
            self.headroom_now = self.headroom_now.saturating_sub(by(TIGHTEN)).max(floor);
        } else if calm {
            self.headroom_now = self.headroom_now.saturating_add(by(RELAX)).min(full);
        }
    }

    /// Ends the regret window of the last release, and relaxes a lengthened patience
    /// by half once it went [`Settings::backoff_decay`] without a regret.
    fn expire(&mut self, now: Duration) {
        if self
            .release_at
            .is_some_and(|at| now - at > self.settings.regret_window)
        {
            self.release_at = None;
        }
        if let Some(at) = self.backoff_at {
            if now - at >= self.settings.backoff_decay {
                self.patience_now = (self.patience_now / 2).max(self.settings.patience);
                self.backoff_at = (self.patience_now > self.settings.patience).then_some(now);
            }
        }
    }

    /// Free memory, the credited page cache, and a pending plug or unplug.
    fn available(&self, s: &Sample) -> u64 {
        let credit = s.node_file / 100 * self.settings.file_credit_percent as u64;
        let now = s.node_free.saturating_add(credit);
        if s.requested >= s.plugged {
            now.saturating_add(s.requested - s.plugged)
        } else {
            now.saturating_sub(s.plugged - s.requested)
        }
    }

    /// Whether the node is short, and by how many regions: the most any signal asks
    /// for. Soft signals within [`SETTLE`] of a grow only count if PSI rose since.
    fn short(&self, s: &Sample, available: u64, rates: &Rates) -> Short {
        let b = &self.settings.bounds;
        let g = &self.settings.guest;
        let mut hard = Vec::new();
        let mut soft = Vec::new();
        if available < b.low_mark {
            let deficit = self.headroom_now - available;
            let signal = Signal::LowFree {
                available,
                low_mark: b.low_mark,
            };
            hard.push((signal, deficit.div_ceil(b.step).max(1)));
        }
        if rates.oom_kills > 0 {
            let kills = rates.oom_kills;
            hard.push((Signal::OomKill { kills }, OOM_REGIONS));
        }
        if s.psi_some_avg10 >= g.psi_grow || s.psi_full_avg10 >= g.psi_full_grow {
            let regions = ((s.psi_some_avg10 / g.psi_grow) as u64).clamp(1, MAX_PSI_REGIONS);
            let signal = Signal::Psi {
                some: s.psi_some_avg10,
                full: s.psi_full_avg10,
            };
            soft.push((signal, regions));
        }
        if rates.refaults_per_sec >= g.refaults_per_sec {
            let per_sec = rates.refaults_per_sec;
            soft.push((Signal::Refaults { per_sec }, 1));
        }
        if rates.allocstalls_per_sec >= g.allocstalls_per_sec {
            let per_sec = rates.allocstalls_per_sec;
            soft.push((Signal::Allocstalls { per_sec }, 1));
        }
        let settling = !rates.psi_rising
            && self
                .last_grow
                .as_ref()
                .is_some_and(|last| s.at - last.at < SETTLE);
        if settling && hard.is_empty() {
            return match soft.into_iter().next() {
                Some((signal, _)) => Short::Settling(signal),
                None => Short::No,
            };
        }
        if !settling {
            hard.append(&mut soft);
        }
        // The first of the largest: hard signals before soft ones on a tie.
        let most = hard.into_iter().rev().max_by_key(|(_, regions)| *regions);
        match most {
            Some((signal, regions)) => Short::Grow(signal, regions),
            None => Short::No,
        }
    }

    fn grow_for(&mut self, s: &Sample, ceiling: u64, signal: Signal, regions: u64) -> Decision {
        let b = &self.settings.bounds;
        let limit = match self.settings.mode {
            Mode::Release => ceiling.min(b.max),
            Mode::Off | Mode::Autosize => b.max,
        };
        let want = s.requested.saturating_add(regions.saturating_mul(b.step));
        let to = align_up(want, b.step).min(limit);
        if to <= s.requested {
            self.calm = None;
            return hold(if limit < b.max {
                Reason::AtCeiling {
                    ceiling: limit,
                    signal,
                }
            } else {
                Reason::AtMax { max: b.max, signal }
            });
        }
        self.grow(s, to, Reason::Short(signal))
    }

    fn grow(&mut self, s: &Sample, to: u64, reason: Reason) -> Decision {
        self.calm = None;
        let step = self.settings.bounds.step;
        self.last_grow = Some(Grown {
            at: s.at,
            regions: (to - s.requested).div_ceil(step),
        });
        if self.release_at.take().is_some() {
            self.regrets += 1;
            self.patience_now = (self.patience_now * 2).min(self.settings.patience_max);
            self.backoff_at = Some(s.at);
        }
        Decision::Grow { to, reason }
    }

    fn shrink_for(&mut self, s: &Sample, available: u64) -> Decision {
        let b = &self.settings.bounds;
        let quiet = self.settings.guest.psi_quiet;
        // Written so that NaN is not quiet.
        let is_quiet = s.psi_some_avg10 < quiet;
        if !is_quiet {
            self.calm = None;
            return hold(Reason::NotQuiet {
                some: s.psi_some_avg10,
                quiet,
            });
        }
        if s.requested > b.max {
            // The bounds are the user's orders, not the law's judgement: no patience,
            // no rate limit.
            self.calm = None;
            let max = b.max;
            return Decision::Shrink {
                to: max,
                reason: Reason::AboveMax { max },
            };
        }
        if available < self.headroom_now.saturating_add(b.step) {
            self.calm = None;
            return hold(Reason::Comfortable {
                available,
                headroom: self.headroom_now,
            });
        }
        let calm = self.calm.get_or_insert_with(|| Calm::new(s.at));
        calm.push(s.at, available, self.patience_now);
        let (calm_for, least) = (s.at - calm.since, calm.least());
        if calm_for < self.patience_now {
            return hold(Reason::Waiting {
                calm: calm_for,
                patience: self.patience_now,
            });
        }
        // The window holds the calm run's least, which may be less than a region over
        // the headroom now: after a release, or when the headroom grew back.
        let spare = least.saturating_sub(self.headroom_now);
        if spare < b.step {
            return hold(Reason::Comfortable {
                available: least,
                headroom: self.headroom_now,
            });
        }
        // Down by the spare and the budget, to a whole region (rounding up releases
        // less), not under min.
        let to = align_up(s.requested.saturating_sub(spare.min(self.budget)), b.step).max(b.min);
        if to >= s.requested {
            return hold(if s.requested <= b.min {
                Reason::AtMin { min: b.min }
            } else {
                Reason::RateLimited {
                    budget: self.budget,
                }
            });
        }
        let released = s.requested - to;
        self.budget -= released;
        if let Some(calm) = &mut self.calm {
            calm.released(released);
        }
        self.release_at = Some(s.at);
        Decision::Shrink {
            to,
            reason: Reason::Spare {
                spare,
                headroom: self.headroom_now,
                calm: calm_for,
            },
        }
    }
}

fn hold(reason: Reason) -> Decision {
    Decision::Hold { reason }
}

/// The most release mode grows to, from a size set by the user or at boot: the whole
/// regions it holds, within the bounds.
fn ceiling_of(bytes: u64, b: &Bounds) -> u64 {
    (bytes / b.step * b.step).clamp(b.min, b.max)
}

fn align_up(bytes: u64, step: u64) -> u64 {
    bytes.div_ceil(step).saturating_mul(step)
}
