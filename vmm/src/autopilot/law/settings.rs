//! What the law is told: its mode, bounds and marks, checked once.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{LawError, GIB, MIB};

/// What the autopilot may do to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No decisions.
    Off,
    /// Gives back what the guest does not use; grows only back to where it started.
    Release,
    /// Sizes the node to what the guest uses, between `min` and `max`.
    Autosize,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Release => "release",
            Mode::Autosize => "autosize",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = LawError;

    fn from_str(s: &str) -> Result<Mode, LawError> {
        match s {
            "off" => Ok(Mode::Off),
            "release" => Ok(Mode::Release),
            "autosize" => Ok(Mode::Autosize),
            other => Err(LawError::Mode(other.to_string())),
        }
    }
}

/// Sizes, in bytes. `min`, `max` and targets are of the hotplug region's requested
/// size; `headroom` and `low_mark` are of the node's available memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub min: u64,
    pub max: u64,
    /// The region size: every target is a multiple of it.
    pub step: u64,
    /// Available memory kept free: a node with a region more than this has one to give.
    pub headroom: u64,
    /// Under this much available memory the node is short, and grows.
    pub low_mark: u64,
}

/// The guest's signals and the levels at which they count.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestMarks {
    /// PSI `some avg10` (percent) at which the node grows.
    pub psi_grow: f32,
    /// PSI `full avg10` (percent) at which the node grows.
    pub psi_full_grow: f32,
    /// PSI `some avg10` (percent) under which the guest is quiet, and may shrink.
    pub psi_quiet: f32,
    /// Refaulted pages per second at which the node grows: its cache is too small.
    pub refaults_per_sec: u64,
    /// Direct reclaims per second at which the node grows: kswapd cannot keep up.
    pub allocstalls_per_sec: u64,
}

/// The host's signals: when it runs short, the guests keep less headroom.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMarks {
    /// MemAvailable / MemTotal under which the host is short.
    pub available_low: f32,
    /// MemAvailable / MemTotal at or over which (with calm PSI) the host is calm.
    pub available_calm: f32,
    /// Host PSI `some avg10` (percent) at which the host is short.
    pub psi_high: f32,
    /// Host PSI `some avg10` (percent) under which (with enough available) it is calm.
    pub psi_calm: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    pub bounds: Bounds,
    /// How often the driver samples: only used to tell a gap between samples.
    pub interval: Duration,
    /// How long a node stays calm before it releases.
    pub patience: Duration,
    /// How long regrets may stretch the patience.
    pub patience_max: Duration,
    /// A grow this soon after a release makes the release a regret.
    pub regret_window: Duration,
    /// After this long without a regret, a lengthened patience halves back.
    pub backoff_decay: Duration,
    /// Bytes a node may release in a minute.
    pub max_shrink_per_min: u64,
    /// Percent of the node's page cache counted as available.
    pub file_credit_percent: u8,
    pub guest: GuestMarks,
    pub host: HostMarks,
}

impl Settings {
    /// Settings for a node with `node_hotplug_bytes` of hotplug memory cut in regions of
    /// `region_size`: the whole hotplug range, a headroom of 256 MiB or two regions
    /// (whichever is larger, at most the range), the low mark a quarter of it, a sample
    /// a second, 30 s of patience (up to 2 min after regrets, relaxing after 10 min
    /// without one), a 60 s regret window and up to 2 GiB or four regions released a
    /// minute.
    pub fn default_for(node_hotplug_bytes: u64, region_size: u64) -> Settings {
        let step = region_size;
        let max = node_hotplug_bytes.checked_div(step).unwrap_or(0) * step;
        let headroom = (256 * MIB).max(step.saturating_mul(2)).min(max);
        Settings {
            mode: Mode::Autosize,
            bounds: Bounds {
                min: 0,
                max,
                step,
                headroom,
                low_mark: headroom / 4,
            },
            interval: Duration::from_secs(1),
            patience: Duration::from_secs(30),
            patience_max: Duration::from_secs(120),
            regret_window: Duration::from_secs(60),
            backoff_decay: Duration::from_secs(600),
            max_shrink_per_min: (2 * GIB).max(step.saturating_mul(4)),
            file_credit_percent: 50,
            guest: GuestMarks {
                psi_grow: 10.0,
                psi_full_grow: 2.0,
                psi_quiet: 1.0,
                refaults_per_sec: 8192,
                allocstalls_per_sec: 20,
            },
            host: HostMarks {
                available_low: 0.10,
                available_calm: 0.20,
                psi_high: 10.0,
                psi_calm: 2.0,
            },
        }
    }

    /// Checks the settings hang together; the error is fit for a user.
    pub fn validate(&self) -> Result<(), LawError> {
        let b = &self.bounds;
        if b.step == 0 {
            return Err(LawError::ZeroStep);
        }
        for (name, bytes) in [("min", b.min), ("max", b.max)] {
            if bytes % b.step != 0 {
                return Err(LawError::NotWhole {
                    name,
                    bytes,
                    step: b.step,
                });
            }
        }
        if b.min > b.max {
            return Err(LawError::MinAboveMax {
                min: b.min,
                max: b.max,
            });
        }
        if b.max < b.step {
            return Err(LawError::NothingToSize {
                max: b.max,
                step: b.step,
            });
        }
        if b.headroom > b.max {
            return Err(LawError::HeadroomAboveMax {
                headroom: b.headroom,
                max: b.max,
            });
        }
        if b.low_mark.saturating_add(b.step / 2) > b.headroom {
            return Err(LawError::MarksTooClose {
                low_mark: b.low_mark,
                headroom: b.headroom,
                step: b.step,
            });
        }
        if self.interval.is_zero() {
            return Err(LawError::Zero("interval"));
        }
        if self.patience < self.interval {
            return Err(LawError::PatienceUnderInterval {
                patience: self.patience,
                interval: self.interval,
            });
        }
        if self.patience_max < self.patience {
            return Err(LawError::PatienceCap {
                cap: self.patience_max,
                patience: self.patience,
            });
        }
        if self.regret_window.is_zero() {
            return Err(LawError::Zero("regret window"));
        }
        if self.backoff_decay.is_zero() {
            return Err(LawError::Zero("backoff decay"));
        }
        if self.max_shrink_per_min < b.step {
            return Err(LawError::ShrinkRate {
                rate: self.max_shrink_per_min,
                step: b.step,
            });
        }
        if self.file_credit_percent > 100 {
            return Err(LawError::FileCredit(self.file_credit_percent));
        }
        let g = &self.guest;
        let h = &self.host;
        for (name, low, high) in [
            ("guest", g.psi_quiet, g.psi_grow),
            (
                "guest full",
                g.psi_quiet.min(g.psi_full_grow),
                g.psi_full_grow,
            ),
            ("host", h.psi_calm, h.psi_high),
        ] {
            // Written so that NaN fails.
            if !(low > 0.0 && low <= high && high <= 100.0) {
                return Err(LawError::PsiMarks { name, low, high });
            }
        }
        if !(h.available_low >= 0.0
            && h.available_low <= h.available_calm
            && h.available_calm <= 1.0)
        {
            return Err(LawError::HostAvailable {
                low: h.available_low,
                calm: h.available_calm,
            });
        }
        Ok(())
    }

    /// The headroom under the most host pressure: low enough to matter, high enough
    /// that a release still leaves half a region over the low mark.
    pub fn headroom_floor(&self) -> u64 {
        let b = &self.bounds;
        (b.headroom / 4)
            .max(b.low_mark + b.step / 2)
            .min(b.headroom)
    }
}
