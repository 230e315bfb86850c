//! What the law decides, and why, in words fit for logs and the API.

use std::fmt;
use std::time::Duration;

use super::{GIB, MIB};

/// Why a node is short of memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    LowFree { available: u64, low_mark: u64 },
    Psi { some: f32, full: f32 },
    OomKill { kills: u64 },
    Refaults { per_sec: u64 },
    Allocstalls { per_sec: u64 },
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::LowFree {
                available,
                low_mark,
            } => write!(
                f,
                "available {} under the low mark {}",
                Size(*available),
                Size(*low_mark)
            ),
            Signal::Psi { some, full } => {
                write!(f, "memory PSI some {some:.1}% full {full:.1}%")
            }
            Signal::OomKill { kills } => write!(f, "{kills} OOM kill(s)"),
            Signal::Refaults { per_sec } => write!(f, "{per_sec} refaults/s"),
            Signal::Allocstalls { per_sec } => write!(f, "{per_sec} allocation stalls/s"),
        }
    }
}

/// Why the law decided what it did; its `Display` is a short text for logs and the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Mode off.
    Off,
    /// The user set the size; the law waits for [`Law::resume`](super::Law::resume).
    Paused { user_target: u64 },
    /// The sample is not newer than the last one.
    OutOfOrder,
    /// Grow: the node is short.
    Short(Signal),
    /// Grow: the size is under `min`.
    BelowMin { min: u64 },
    /// Hold: short, but at `max`.
    AtMax { max: u64, signal: Signal },
    /// Hold: short, but release mode grows no further than where it started.
    AtCeiling { ceiling: u64, signal: Signal },
    /// Hold: a soft signal right after a grow, which has yet to land.
    Settling { signal: Signal },
    /// Hold: PSI is not quiet, so nothing is released.
    NotQuiet { some: f32, quiet: f32 },
    /// Hold: no whole region over the headroom.
    Comfortable { available: u64, headroom: u64 },
    /// Hold: calm, for less than the patience window yet.
    Waiting { calm: Duration, patience: Duration },
    /// Hold: a region to give, but the node is at `min`.
    AtMin { min: u64 },
    /// Hold: a region to give, but the rate limit's budget is spent.
    RateLimited { budget: u64 },
    /// Shrink: `spare` over the headroom all through the patience window.
    Spare {
        spare: u64,
        headroom: u64,
        calm: Duration,
    },
    /// Shrink: the size is above `max`.
    AboveMax { max: u64 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Off => f.write_str("autopilot off"),
            Reason::Paused { user_target } => {
                write!(f, "the user set {}: paused", Size(*user_target))
            }
            Reason::OutOfOrder => f.write_str("sample not newer than the last"),
            Reason::Short(signal) => write!(f, "{signal}"),
            Reason::BelowMin { min } => write!(f, "under min {}", Size(*min)),
            Reason::AtMax { max, signal } => write!(f, "{signal}, but at max {}", Size(*max)),
            Reason::AtCeiling { ceiling, signal } => write!(
                f,
                "{signal}, but release mode grows no further than {}",
                Size(*ceiling)
            ),
            Reason::Settling { signal } => write!(f, "{signal}, waiting for the last grow"),
            Reason::NotQuiet { some, quiet } => {
                write!(f, "memory PSI some {some:.1}% is not under {quiet:.1}%")
            }
            Reason::Comfortable {
                available,
                headroom,
            } => write!(
                f,
                "available {} within a region of the headroom {}",
                Size(*available),
                Size(*headroom)
            ),
            Reason::Waiting { calm, patience } => {
                write!(f, "calm for {} of {}", Secs(*calm), Secs(*patience))
            }
            Reason::AtMin { min } => write!(f, "spare memory, but at min {}", Size(*min)),
            Reason::RateLimited { budget } => write!(
                f,
                "spare memory, but only {} may go now (rate limit)",
                Size(*budget)
            ),
            Reason::Spare {
                spare,
                headroom,
                calm,
            } => write!(
                f,
                "{} spare over the headroom {} for {}",
                Size(*spare),
                Size(*headroom),
                Secs(*calm)
            ),
            Reason::AboveMax { max } => write!(f, "above max {}", Size(*max)),
        }
    }
}

/// What to do with the node's requested size.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold { reason: Reason },
    Grow { to: u64, reason: Reason },
    Shrink { to: u64, reason: Reason },
}

impl Decision {
    /// The new requested size, if the decision changes it.
    pub fn target(&self) -> Option<u64> {
        match self {
            Decision::Hold { .. } => None,
            Decision::Grow { to, .. } | Decision::Shrink { to, .. } => Some(*to),
        }
    }

    pub fn reason(&self) -> &Reason {
        match self {
            Decision::Hold { reason }
            | Decision::Grow { reason, .. }
            | Decision::Shrink { reason, .. } => reason,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Hold { reason } => write!(f, "hold: {reason}"),
            Decision::Grow { to, reason } => write!(f, "grow to {}: {reason}", Size(*to)),
            Decision::Shrink { to, reason } => write!(f, "shrink to {}: {reason}", Size(*to)),
        }
    }
}

/// Bytes for people: whole GiB or MiB when they are, else MiB with a decimal.
pub(super) struct Size(pub(super) u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB && b % GIB == 0 {
            write!(f, "{} GiB", b / GIB)
        } else if b % MIB == 0 {
            write!(f, "{} MiB", b / MIB)
        } else if b >= MIB {
            write!(f, "{:.1} MiB", b as f64 / MIB as f64)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

/// A duration for people, in seconds.
pub(super) struct Secs(pub(super) Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{} s", self.0.as_secs())
        } else {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        }
    }
}
