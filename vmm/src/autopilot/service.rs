//! The autopilot's driver: `mempower-autopilot`, one thread for the VM, which reads the
//! signals once per interval (one agent call for every guest node, and the host's
//! files), steps each node's [`Law`] and carries its decisions out.
//!
//! There is one way to change a node's size, and the autopilot takes it like a user:
//! a grow sets the node's target (the [`Arbiter`](crate::evacuation::Arbiter)'s), a
//! shrink starts a job that removes whole regions, chosen by the compaction policy (the
//! most host memory for the least migration) and carried out by `mempowerd/N`. While its compaction runs, a node's law goes on (a spike is still
//! met), but it starts no second one.
//!
//! A user's own resize, compaction, evacuation or plug of a node pauses its law
//! ([`Autopilot::user_acted`]): the user's target holds until the user sets the
//! autopilot again ([`Autopilot::configure`]).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_protocol::GuestSignals;
use mempower_api::{
    AutopilotAction, AutopilotEvent, AutopilotInputs, AutopilotMode, AutopilotSettings,
    AutopilotStatus,
};

use super::events::EventRing;
use super::law::{Decision, Law, LawError, Mode, Sample, Settings};
use crate::host_signals::HostSignals;
use crate::sync::{self, Locked};

#[derive(Debug, thiserror::Error)]
pub enum AutopilotError {
    #[error("no such node: {0}")]
    NoSuchNode(u32),
    #[error("node {0} has no hotplug memory to size")]
    NoHotplugRegion(u32),
    #[error("{0}")]
    Settings(#[from] LawError),
    #[error("autopilot: {name} {} MiB is above node {node}'s hotplug memory ({} MiB)", bytes >> 20, hotplug >> 20)]
    AboveHotplug {
        node: u32,
        name: &'static str,
        bytes: u64,
        hotplug: u64,
    },
    #[error("cannot start the autopilot thread: {0}")]
    Spawn(String),
}

/// What the autopilot reads.
pub trait Sensors: Send {
    /// Every guest node's memory and the guest's pressure, or why not.
    fn guest(&mut self) -> Result<GuestSignals, String>;
    /// The host's memory and pressure, or why not.
    fn host(&mut self) -> Result<HostSignals, String>;
}

/// What the autopilot changes: the evacuation service, or a stand-in in tests.
pub trait NodeControl: Send + Sync {
    /// The node's sizes now.
    fn sizes(&self, node: u32) -> Result<Sizes, String>;
    /// Sets the node's target (as a user's resize does).
    fn set_target(&self, node: u32, bytes: u64) -> Result<(), String>;
    /// Starts a shrink by `regions` regions (the compaction policy chooses them);
    /// answers its job.
    fn shrink(&self, node: u32, regions: u32) -> Result<u64, String>;
    /// Whether job `id` still runs.
    fn running(&self, id: u64) -> bool;
}

/// A node's sizes, bytes of hotplug memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The node's target (the arbiter's: the user's, or the autopilot's).
    pub target: u64,
    /// What the device asks the guest to plug: the target less what running jobs have
    /// claimed (see `evacuation::arbiter`).
    pub requested: u64,
    pub plugged: u64,
}

/// Starts `work` on the autopilot's thread (the VMM's: named, under its filter).
pub type Spawn<'a> = &'a dyn Fn(Box<dyn FnOnce() + Send>) -> Result<JoinHandle<()>, String>;

/// The VM's autopilot.
pub struct Autopilot {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    started: Instant,
    /// By node id: `None` for a node without hotplug memory.
    pilots: Vec<Option<Mutex<Pilot>>>,
    events: Mutex<EventRing>,
    control: Arc<dyn NodeControl>,
    /// Whether the last sample had the guest's signals: a change is logged, once.
    sensing: std::sync::atomic::AtomicBool,
    /// Set to stop the thread; its condition variable also wakes it for new settings.
    stop: Mutex<bool>,
    wake: Condvar,
}

struct Pilot {
    node: u32,
    /// The node's hotplug memory: no bound goes beyond it.
    hotplug: u64,
    law: Law,
    grows: u64,
    shrinks: u64,
    /// The shrink job the law started, and the bytes it removes, while it runs.
    job: Option<(u64, u64)>,
    last: Option<AutopilotEvent>,
    /// Why the last sample changed nothing (empty if it did).
    last_hold: String,
    samples: u64,
}

impl Autopilot {
    /// An autopilot for nodes of `settings` (by node id, with the node's hotplug bytes;
    /// `None`: no hotplug memory), its thread started through `spawn` with `sensors`.
    pub fn start(
        settings: Vec<Option<(Settings, u64)>>,
        control: Arc<dyn NodeControl>,
        sensors: Box<dyn Sensors>,
        spawn: Spawn<'_>,
    ) -> Result<Self, AutopilotError> {
        let pilots = (0u32..)
            .zip(settings)
            .map(|(node, s)| {
                s.map(|(s, hotplug)| {
                    fits(node, &s, hotplug)?;
                    Ok(Mutex::new(Pilot {
                        node,
                        hotplug,
                        law: Law::new(s)?,
                        grows: 0,
                        shrinks: 0,
                        job: None,
                        last: None,
                        last_hold: String::new(),
                        samples: 0,
                    }))
                })
                .transpose()
            })
            .collect::<Result<_, AutopilotError>>()?;
        let shared = Arc::new(Shared {
            started: Instant::now(),
            pilots,
            events: Mutex::default(),
            control,
            sensing: std::sync::atomic::AtomicBool::new(true),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let run = shared.clone();
        let thread = spawn(Box::new(move || run.run(sensors))).map_err(AutopilotError::Spawn)?;
        Ok(Autopilot {
            shared,
            thread: Some(thread),
        })
    }

    fn pilot(&self, node: u32) -> Result<&Mutex<Pilot>, AutopilotError> {
        match self.shared.pilots.get(node as usize) {
            None => Err(AutopilotError::NoSuchNode(node)),
            Some(None) => Err(AutopilotError::NoHotplugRegion(node)),
            Some(Some(p)) => Ok(p),
        }
    }

    pub fn status(&self, node: u32) -> Result<AutopilotStatus, AutopilotError> {
        Ok(self.pilot(node)?.locked().status())
    }

    /// Changes the fields of `settings` given; the law starts again from the node's
    /// size now, and a user's pause ends.
    pub fn configure(
        &self,
        node: u32,
        settings: &AutopilotSettings,
    ) -> Result<AutopilotStatus, AutopilotError> {
        let mut pilot = self.pilot(node)?.locked();
        let mut s = pilot.law.settings().clone();
        apply(&mut s, settings);
        fits(node, &s, pilot.hotplug)?;
        pilot.law.reconfigure(s)?;
        pilot.law.resume();
        let words = format!("autopilot set: {}", describe(pilot.law.settings()));
        let target = self.shared.control.sizes(node).map_or(0, |s| s.requested);
        let event = self
            .shared
            .event(&pilot, AutopilotAction::User, target, target, words);
        self.shared.record(&mut pilot, event);
        let status = pilot.status();
        drop(pilot);
        self.shared.wake.notify_all();
        Ok(status)
    }

    /// A user resized, compacted, evacuated or plugged `node` (`what`), leaving its
    /// target at `target`: the law holds it until the autopilot is set again.
    pub fn user_acted(&self, node: u32, what: &str, target: u64) {
        let Ok(pilot) = self.pilot(node) else {
            return;
        };
        let mut pilot = pilot.locked();
        if pilot.law.settings().mode == Mode::Off {
            return;
        }
        let from = pilot.law.paused().unwrap_or(target);
        pilot.law.user_target(target);
        let words = format!("{what} by a user: the autopilot holds until it is set again");
        let event = self
            .shared
            .event(&pilot, AutopilotAction::User, from, target, words);
        self.shared.record(&mut pilot, event);
    }

    /// The events after `since`, oldest first.
    pub fn events(&self, since: Option<u64>) -> Vec<AutopilotEvent> {
        self.shared.events.locked().after(since)
    }

    /// Every node's status (nodes with hotplug memory).
    pub fn statuses(&self) -> Vec<AutopilotStatus> {
        let pilots = self.shared.pilots.iter().flatten();
        pilots.map(|p| p.locked().status()).collect()
    }
}

impl Drop for Autopilot {
    fn drop(&mut self) {
        *self.shared.stop.locked() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// The shortest interval of the nodes whose law decides, if any does.
    fn interval(&self) -> Option<Duration> {
        let live = self.pilots.iter().flatten().filter_map(|p| {
            let p = p.locked();
            p.deciding().then_some(p.law.settings().interval)
        });
        live.min()
    }

    fn run(&self, mut sensors: Box<dyn Sensors>) {
        let mut stop = self.stop.locked();
        let mut next = Instant::now();
        loop {
            if *stop {
                return;
            }
            // Pilots' locks are never held while the stop flag is taken: this order is safe.
            let Some(interval) = self.interval() else {
                stop = sync::wait(&self.wake, stop);
                continue;
            };
            let now = Instant::now();
            if now < next {
                stop = self
                    .wake
                    .wait_timeout(stop, next - now)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                continue;
            }
            next = now + interval;
            drop(stop);
            self.tick(&mut *sensors);
            stop = self.stop.locked();
        }
    }

    /// One round: the signals, then each deciding node's law.
    fn tick(&self, sensors: &mut dyn Sensors) {
        use std::sync::atomic::Ordering;
        let guest = match sensors.guest() {
            Ok(g) => {
                if !self.sensing.swap(true, Ordering::Relaxed) {
                    log::info!("autopilot: the guest's signals are back");
                }
                g
            }
            Err(e) => {
                if self.sensing.swap(false, Ordering::Relaxed) {
                    log::warn!(
                        "autopilot: no guest signals, nothing is decided until they come: {e}"
                    );
                }
                return;
            }
        };
        let host = sensors.host().map_err(|e| {
            log::debug!("autopilot: no host signals this interval: {e}");
        });
        let at = self.started.elapsed();
        for pilot in self.pilots.iter().flatten() {
            let mut pilot = pilot.locked();
            if pilot.deciding() {
                self.step(&mut pilot, at, &guest, host.as_ref().ok());
            }
        }
    }

    fn step(
        &self,
        pilot: &mut Pilot,
        at: Duration,
        guest: &GuestSignals,
        host: Option<&HostSignals>,
    ) {
        let node = pilot.node;
        let Some(mine) = guest.nodes.iter().find(|n| n.node == node) else {
            return; // The guest has not brought the node up (yet).
        };
        let sizes = match self.control.sizes(node) {
            Ok(sizes) => sizes,
            Err(e) => return log::warn!("autopilot: node {node}: {e}"),
        };
        let (requested, plugged) = (sizes.requested, sizes.plugged);
        if let Some((id, _)) = pilot.job {
            if !self.control.running(id) {
                pilot.job = None;
            }
        }
        // The law sees the size its shrink in flight asked for: the job lowers the
        // requested size once it claims its regions; before (while it plans), the law
        // takes them off itself. A grow meanwhile sets the target that much higher, as
        // the job takes what it releases off the target when it ends (the arbiter's
        // rule), to land where the law asked.
        let pending = pilot.job.map_or(0, |(_, bytes)| bytes);
        let claimed = sizes.target.saturating_sub(sizes.requested);
        let unclaimed = pending.saturating_sub(claimed);
        let (psi_some, psi_full) = guest
            .pressure
            .map_or((0.0, 0.0), |p| (p.some.avg10, p.full.avg10));
        let c = guest.counters;
        let sample = Sample {
            at,
            node_free: mine.free_bytes,
            node_file: mine.file_bytes,
            plugged,
            requested: requested.saturating_sub(unclaimed),
            psi_some_avg10: psi_some,
            psi_full_avg10: psi_full,
            oom_kills: c.oom_kill.unwrap_or(0),
            refaults: c.workingset_refault_anon.unwrap_or(0)
                + c.workingset_refault_file.unwrap_or(0),
            allocstalls: c.allocstall.unwrap_or(0),
            host_available_fraction: host.map_or(1.0, |h| {
                h.mem_available_bytes as f32 / h.mem_total_bytes.max(1) as f32
            }),
            host_psi_some_avg10: host.and_then(|h| h.pressure).map_or(0.0, |p| p.some.avg10),
        };
        let inputs = AutopilotInputs {
            free_bytes: mine.free_bytes,
            file_bytes: mine.file_bytes,
            anon_bytes: mine.anon_bytes,
            plugged_bytes: plugged,
            psi_some_avg10: f64::from(psi_some),
            psi_full_avg10: f64::from(psi_full),
            oom_kills: sample.oom_kills,
            host_available_bytes: host.map_or(0, |h| h.mem_available_bytes),
            host_psi_some_avg10: f64::from(sample.host_psi_some_avg10),
        };
        let from = sample.requested;
        pilot.samples += 1;
        let decision = pilot.law.step(&sample);
        let (action, to, job, words) = match &decision {
            Decision::Hold { reason } => {
                pilot.last_hold = reason.to_string();
                return;
            }
            Decision::Grow { to, .. } => match self.control.set_target(node, to + pending) {
                Ok(()) => {
                    pilot.grows += 1;
                    (AutopilotAction::Grow, *to, None, decision.to_string())
                }
                Err(e) => (
                    AutopilotAction::Failed,
                    from,
                    None,
                    format!("{decision}: {e}"),
                ),
            },
            Decision::Shrink { .. } if pilot.job.is_some() => return,
            Decision::Shrink { to, .. } => {
                match self.control.shrink(node, regions(from - to, pilot)) {
                    Ok(id) => {
                        pilot.shrinks += 1;
                        pilot.job = Some((id, from - to));
                        (AutopilotAction::Shrink, *to, Some(id), decision.to_string())
                    }
                    Err(e) => (
                        AutopilotAction::Failed,
                        from,
                        None,
                        format!("{decision}: {e}"),
                    ),
                }
            }
        };
        pilot.last_hold.clear();
        log::info!("autopilot: node {node}: {words}");
        let mut event = self.event(pilot, action, from, to, words);
        event.job = job;
        event.inputs = inputs;
        self.record(pilot, event);
    }

    /// Adds `event` to the ring, numbered, as `pilot`'s last.
    fn record(&self, pilot: &mut Pilot, event: AutopilotEvent) {
        pilot.last = Some(self.events.locked().push(event));
    }

    /// An event of `pilot`'s node, with the inputs it last saw.
    fn event(
        &self,
        pilot: &Pilot,
        action: AutopilotAction,
        from: u64,
        to: u64,
        reason: String,
    ) -> AutopilotEvent {
        AutopilotEvent {
            seq: 0,
            at_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            node: pilot.node,
            action,
            from_bytes: from,
            to_bytes: to,
            reason,
            job: None,
            inputs: pilot
                .last
                .as_ref()
                .map(|e| e.inputs.clone())
                .unwrap_or_default(),
        }
    }
}

impl Pilot {
    /// Whether the law decides: it is on, and no user took the node over.
    fn deciding(&self) -> bool {
        self.law.settings().mode != Mode::Off && self.law.paused().is_none()
    }

    fn status(&self) -> AutopilotStatus {
        let s = self.law.settings();
        AutopilotStatus {
            node: self.node,
            mode: api_mode(s.mode),
            min_bytes: s.bounds.min,
            max_bytes: s.bounds.max,
            headroom_bytes: s.bounds.headroom,
            effective_headroom_bytes: self.law.headroom_now(),
            interval_ms: millis(s.interval),
            patience_ms: millis(s.patience),
            paused_by_user: self.law.paused().is_some(),
            grows: self.grows,
            shrinks: self.shrinks,
            regrets: self.law.regrets(),
            samples: self.samples,
            holding: (!self.last_hold.is_empty()).then(|| self.last_hold.clone()),
            last: self.last.clone(),
        }
    }
}

/// Whole regions in `bytes` of `pilot`'s node (targets are whole regions).
fn regions(bytes: u64, pilot: &Pilot) -> u32 {
    let step = pilot.law.settings().bounds.step.max(1);
    u32::try_from(bytes / step).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn api_mode(mode: Mode) -> AutopilotMode {
    match mode {
        Mode::Off => AutopilotMode::Off,
        Mode::Release => AutopilotMode::Release,
        Mode::Autosize => AutopilotMode::Autosize,
    }
}

/// Checks that `s`'s bounds fit a node of `hotplug` bytes.
pub fn fits(node: u32, s: &Settings, hotplug: u64) -> Result<(), AutopilotError> {
    for (name, bytes) in [("max", s.bounds.max), ("min", s.bounds.min)] {
        if bytes > hotplug {
            return Err(AutopilotError::AboveHotplug {
                node,
                name,
                bytes,
                hotplug,
            });
        }
    }
    Ok(())
}

/// Sets the fields `given` has in `s`. A new headroom moves the low mark with it (a
/// quarter of it, as by default).
pub fn apply(s: &mut Settings, given: &AutopilotSettings) {
    if let Some(mode) = given.mode {
        s.mode = match mode {
            AutopilotMode::Off => Mode::Off,
            AutopilotMode::Release => Mode::Release,
            AutopilotMode::Autosize => Mode::Autosize,
        };
    }
    if let Some(min) = given.min_bytes {
        s.bounds.min = min;
    }
    if let Some(max) = given.max_bytes {
        s.bounds.max = max;
    }
    if let Some(headroom) = given.headroom_bytes {
        s.bounds.headroom = headroom;
        s.bounds.low_mark = headroom / 4;
    }
    if let Some(ms) = given.interval_ms {
        s.interval = Duration::from_millis(ms);
    }
    if let Some(ms) = given.patience_ms {
        s.patience = Duration::from_millis(ms);
        s.patience_max = s.patience_max.max(s.patience * 4);
    }
}

/// The settings in a few words, for the events.
fn describe(s: &Settings) -> String {
    let mib = |b: u64| b >> 20;
    format!(
        "{} between {} and {} MiB, headroom {} MiB, every {} ms, patience {} s",
        s.mode,
        mib(s.bounds.min),
        mib(s.bounds.max),
        mib(s.bounds.headroom),
        s.interval.as_millis(),
        s.patience.as_secs()
    )
}

#[cfg(test)]
mod tests;
