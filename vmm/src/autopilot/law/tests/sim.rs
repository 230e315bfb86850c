//! A small model of a guest node for the law to drive: boot memory, a working set that
//! follows a trace, and a virtio-mem device that plugs and unplugs at a finite rate. The
//! guest stalls (PSI) when its free memory nears zero and kills a task when its working
//! set does not fit. Then the trace generators, each a working set per second.

use std::time::Duration;

use super::super::{Decision, Law, Sample, Settings, GIB, MIB};

pub(super) const STEP: u64 = 128 * MIB;
pub(super) const BOOT: u64 = 512 * MIB;
pub(super) const HOTPLUG: u64 = 8 * GIB;
pub(super) const SECOND: Duration = Duration::from_secs(1);
/// The device's pace: a plug lands within a second, an unplug of 2 GiB takes four.
pub(super) const PLUG_PER_SEC: u64 = 2 * GIB;
pub(super) const UNPLUG_PER_SEC: u64 = 512 * MIB;
/// The guest's free memory under which it starts to stall (its min watermark).
pub(super) const MIN_FREE: u64 = 32 * MIB;

#[derive(Debug, Clone, Copy)]
pub(super) struct Host {
    pub(super) available: f32,
    pub(super) psi: f32,
}

pub(super) const CALM_HOST: Host = Host {
    available: 0.5,
    psi: 0.0,
};
pub(super) const SHORT_HOST: Host = Host {
    available: 0.05,
    psi: 20.0,
};

/// One sample and what the law made of it.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) ws: u64,
    pub(super) sample: Sample,
    pub(super) decision: Decision,
}

/// A guest node driven by the law.
pub(super) struct Sim {
    pub(super) law: Law,
    pub(super) boot: u64,
    pub(super) plugged: u64,
    pub(super) requested: u64,
    /// PSI some avg10 of the model guest.
    pub(super) psi: f32,
    pub(super) oom_kills: u64,
    pub(super) allocstalls: u64,
    pub(super) host: Host,
    pub(super) at: Duration,
    pub(super) log: Vec<Record>,
}

impl Sim {
    pub(super) fn new(settings: Settings, requested: u64) -> Sim {
        Sim {
            law: Law::new(settings).unwrap(),
            boot: BOOT,
            plugged: requested,
            requested,
            psi: 0.0,
            oom_kills: 0,
            allocstalls: 0,
            host: CALM_HOST,
            at: Duration::ZERO,
            log: Vec::new(),
        }
    }

    /// The node's memory as the guest sees it.
    pub(super) fn size(&self) -> u64 {
        self.boot + self.plugged
    }

    pub(super) fn tick(&mut self, ws: u64) -> Decision {
        self.tick_with(ws, |_| {})
    }

    /// One interval at working set `ws`; `tweak` may alter the sample the law sees.
    pub(super) fn tick_with(&mut self, ws: u64, tweak: impl FnOnce(&mut Sample)) -> Decision {
        let total = self.size();
        let free = total.saturating_sub(ws);
        let short = (ws + MIN_FREE).saturating_sub(total);
        // A 16 MiB shortfall stalls the guest 10% of the time; avg10 follows over ~10 s.
        let stall = (short as f32 / (16 * MIB) as f32 * 10.0).min(100.0);
        self.psi = self.psi * 0.9 + stall * 0.1;
        self.allocstalls += stall as u64;
        if ws > total {
            self.oom_kills += 1;
        }
        let mut sample = Sample {
            at: self.at,
            node_free: free,
            node_file: 0,
            plugged: self.plugged,
            requested: self.requested,
            psi_some_avg10: self.psi,
            psi_full_avg10: self.psi / 4.0,
            oom_kills: self.oom_kills,
            refaults: 0,
            allocstalls: self.allocstalls,
            host_available_fraction: self.host.available,
            host_psi_some_avg10: self.host.psi,
        };
        tweak(&mut sample);
        let decision = self.law.step(&sample);
        if let Some(to) = decision.target() {
            self.requested = to;
        }
        self.device();
        self.at += SECOND;
        self.log.push(Record {
            ws,
            sample,
            decision: decision.clone(),
        });
        decision
    }

    /// The device moves toward the requested size over the interval.
    pub(super) fn device(&mut self) {
        if self.requested > self.plugged {
            self.plugged = self.requested.min(self.plugged + PLUG_PER_SEC);
        } else {
            let down = self.plugged.saturating_sub(UNPLUG_PER_SEC);
            self.plugged = self.requested.max(down);
        }
    }

    pub(super) fn run(&mut self, trace: &[u64]) {
        for &ws in trace {
            self.tick(ws);
        }
    }

    /// The user resizes the node.
    pub(super) fn user(&mut self, bytes: u64) {
        self.law.user_target(bytes);
        self.requested = bytes;
    }

    pub(super) fn grows(&self) -> impl Iterator<Item = &Record> {
        self.log
            .iter()
            .filter(|r| matches!(r.decision, Decision::Grow { .. }))
    }

    pub(super) fn shrinks(&self) -> impl Iterator<Item = &Record> {
        self.log
            .iter()
            .filter(|r| matches!(r.decision, Decision::Shrink { .. }))
    }

    /// Seconds of the first shrink at or after second `from`.
    pub(super) fn first_shrink_from(&self, from: usize) -> Option<usize> {
        self.log[from..]
            .iter()
            .position(|r| matches!(r.decision, Decision::Shrink { .. }))
            .map(|i| i + from)
    }
}

/// xorshift64*: random-ish traces, the same on every run, without a dependency.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in [-1, 1).
    pub(super) fn signed(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

// Trace generators: a working set per second.

pub(super) fn steady(ws: u64, secs: usize) -> Vec<u64> {
    vec![ws; secs]
}

pub(super) fn ramp(from: u64, to: u64, secs: usize) -> Vec<u64> {
    (0..secs)
        .map(|i| (from as f64 + (to as f64 - from as f64) * i as f64 / secs as f64) as u64)
        .collect()
}

/// From `from`, `chunks` drops of `chunk`, each held `hold` seconds.
pub(super) fn chunks(from: u64, chunk: u64, chunks: usize, hold: usize) -> Vec<u64> {
    (0..=chunks)
        .flat_map(|i| steady(from - chunk * i as u64, hold))
        .collect()
}

/// `base`, with `peak` for `len` seconds from second `at`.
pub(super) fn spike(base: u64, peak: u64, at: usize, len: usize, secs: usize) -> Vec<u64> {
    (0..secs)
        .map(|i| {
            if (at..at + len).contains(&i) {
                peak
            } else {
                base
            }
        })
        .collect()
}

/// `base` ± `percent`.
pub(super) fn noise(base: u64, percent: f64, secs: usize, rng: &mut Rng) -> Vec<u64> {
    (0..secs)
        .map(|_| (base as f64 * (1.0 + percent / 100.0 * rng.signed())) as u64)
        .collect()
}

/// `low` and `high` in turn, each for half of `period` seconds.
pub(super) fn oscillate(low: u64, high: u64, period: usize, secs: usize) -> Vec<u64> {
    (0..secs)
        .map(|i| if i % period < period / 2 { low } else { high })
        .collect()
}
