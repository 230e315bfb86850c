//! Giving unplugged blocks' host memory back, off the event loop.
//!
//! Taking unplugged memory from the guest and giving it back to the host is slow: deleting
//! a region's KVM slot makes KVM zap its mappings and wait for its vCPUs (98 ms for one
//! 128 MiB region in a nested run), and punching a hole frees every page. The event loop
//! serves every device and the API, so it must not wait for either. An unplug therefore
//! only *notes* its blocks ([`Releaser::note`]). After the queue round, the device hides
//! them from the devices (out of the view: quick, and only the loop may) and hands them
//! here ([`Releaser::closed`]). `mempower-release/N` then *shuts* them (the region's KVM
//! slot goes if nothing of it stays plugged, the host mapping becomes `PROT_NONE`, see
//! `memory::slots`) and punches them, once: shut first, so that nothing the guest
//! touches after the punch can refill them.
//!
//! One ordering matters: a punch still queued must never destroy what the guest writes
//! after plugging the same blocks again. A plug therefore first takes its blocks out of
//! the queue (they are in use again: nothing to give back) and waits for the punch in
//! progress if it overlaps ([`Releaser::reclaim`]). Measuring what is resident waits in
//! the same way ([`Releaser::settle`]), so that an evacuation's "released" means punched.
//!
//! Until [`Releaser::start`] (unit tests, and a VM before its threads start), `closed`
//! punches at once, on the caller's thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_mem::{MemBackend, MemfdBackend};

use crate::memory::slots::{NodeSlots, Ranges};
use crate::sync::{self, Locked};

/// The most one punch covers: a plug that waits for the punch in progress waits for
/// this much at most, not for a whole evacuation's worth.
const CHUNK: u64 = 64 << 20;

/// How long a measurement waits for the punches of its range before it measures anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("node {node}: cannot start its release thread: {reason}")]
    Start { node: u32, reason: String },
    #[error("node {node}: its release thread is already started")]
    AlreadyStarted { node: u32 },
}

/// What the release thread runs.
pub type Work = Box<dyn FnOnce() + Send>;

/// The punches of one node's hotplug range (offsets in that range).
#[derive(Debug)]
pub struct Releaser {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    node: u32,
    /// Its own descriptor of the node's file, which the thread's filter allows.
    memfd: MemfdBackend,
    /// The node's region slots, shut before a punch (none: the device manages none).
    slots: Option<NodeSlots>,
    state: Mutex<State>,
    /// Signalled when a punch ends, work arrives, or the releaser stops.
    changed: Condvar,
    /// Time spent giving memory back, nanoseconds (see `SlotBackend::release_time`).
    release_ns: AtomicU64,
    /// Bytes punched, and punches that failed.
    punched: AtomicU64,
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Unplugged during the current queue round, not closed yet: not to be punched yet.
    noted: Ranges,
    /// Closed, waiting for the thread.
    queued: Ranges,
    /// What the thread punches now.
    punching: Option<(u64, u64)>,
    mode: Mode,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No thread: `closed` punches on its caller's thread.
    #[default]
    Inline,
    /// `mempower-release/N` punches what `closed` queues.
    Threaded,
    /// The device is gone: the thread ends, and `closed` punches at once again.
    Stopped,
}

impl Releaser {
    /// A releaser for `memfd` (a descriptor of the node's file of its own) and the
    /// node's `slots`.
    pub fn new(node: u32, memfd: MemfdBackend, slots: Option<NodeSlots>) -> Self {
        Releaser {
            shared: Arc::new(Shared {
                node,
                memfd,
                slots,
                state: Mutex::default(),
                changed: Condvar::new(),
                release_ns: AtomicU64::new(0),
                punched: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// The descriptor the thread punches with, for its seccomp filter.
    pub fn file(&self) -> &std::fs::File {
        self.shared.memfd.file()
    }

    /// Starts the thread's work through `spawn` (the VMM's: named `mempower-release/N`,
    /// on its node's CPUs, under its filter): from now on `closed` only queues.
    pub fn start(
        &self,
        spawn: impl FnOnce(Work) -> Result<(), String>,
    ) -> Result<(), ReleaseError> {
        let node = self.shared.node;
        let mut state = self.shared.lock();
        if state.mode != Mode::Inline {
            return Err(ReleaseError::AlreadyStarted { node });
        }
        let shared = self.shared.clone();
        // The thread's first step takes this lock: it waits until the mode is set.
        spawn(Box::new(move || shared.run()))
            .map_err(|reason| ReleaseError::Start { node, reason })?;
        state.mode = Mode::Threaded;
        Ok(())
    }

    /// `[offset, offset + len)` was unplugged in this queue round: punch it once closed.
    pub fn note(&self, offset: u64, len: u64) {
        self.shared
            .lock()
            .noted
            .insert(offset, offset.saturating_add(len));
    }

    /// The queue round is over and `closed` is hidden from the devices: it is shut and
    /// punched, with what the round unplugged.
    pub fn closed(&self, closed: &[(u64, u64)]) {
        let mut state = self.shared.lock();
        let mut release = std::mem::take(&mut state.noted);
        for &(start, end) in closed {
            release.insert(start, end);
        }
        if release.is_empty() {
            return;
        }
        if state.mode == Mode::Threaded {
            for (start, end) in release.iter() {
                state.queued.insert(start, end);
            }
            self.shared.changed.notify_all();
            return;
        }
        drop(state);
        for (start, end) in release.iter() {
            self.shared.release(start, end);
        }
    }

    /// A plug of `[offset, offset + len)`: its blocks leave the queue, and a punch of
    /// them in progress ends, before the guest may write to them.
    pub fn reclaim(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut state = self.shared.lock();
        state.noted.remove(offset, end);
        state.queued.remove(offset, end);
        while state.punching.is_some_and(|p| overlaps(p, (offset, end))) {
            state = sync::wait(&self.shared.changed, state);
        }
    }

    /// Waits until no punch of `[offset, offset + len)` is queued or in progress, for
    /// at most a minute; false if it gave up.
    pub fn settle(&self, offset: u64, len: u64) -> bool {
        let range = (offset, offset.saturating_add(len));
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut state = self.shared.lock();
        loop {
            let busy = state.punching.is_some_and(|p| overlaps(p, range))
                || !state.queued.window(range.0, range.1).is_empty();
            if !busy || state.mode != Mode::Threaded {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "node {}: punches of {:#x}+{len:#x} still pending after {SETTLE_LIMIT:?}",
                    self.shared.node,
                    offset
                );
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Counts `took` as time spent releasing memory.
    pub fn add_release_time(&self, took: Duration) {
        self.shared.add_release_time(took);
    }

    /// Time spent releasing memory since the device was made.
    pub fn release_time(&self) -> Duration {
        Duration::from_nanos(self.shared.release_ns.load(Ordering::Relaxed))
    }

    /// Bytes punched so far, and punches that failed.
    pub fn punched(&self) -> (u64, u64) {
        (
            self.shared.punched.load(Ordering::Relaxed),
            self.shared.failures.load(Ordering::Relaxed),
        )
    }

    /// A handle on the same queue, for the device's measuring twin.
    pub fn share(&self) -> Releaser {
        Releaser {
            shared: self.shared.clone(),
        }
    }

    /// Stops the thread after its current punch (what is queued stays unreleased: the
    /// VM is going away).
    pub fn stop(&self) {
        self.shared.lock().mode = Mode::Stopped;
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    fn add_release_time(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.release_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Shuts `[start, end)` (what of it is not plugged again), then punches it. A failure
    /// keeps the memory, never the guest's data (the blocks are unplugged and hidden):
    /// it is logged and counted.
    fn release(&self, start: u64, end: u64) {
        let t = Instant::now();
        if let Some(slots) = &self.slots {
            let shut = slots.shut_closed(start, end);
            if !shut.removed.is_empty() {
                log::info!(
                    "virtio-mem of node {}: regions {:?} are unplugged: their memory slots \
                     are removed",
                    self.node,
                    shut.removed
                );
            }
            if let Some(e) = shut.failure {
                log::warn!(
                    "virtio-mem of node {}: the guest still reaches unplugged memory: {e}",
                    self.node
                );
            }
        }
        match self.memfd.discard(start, end - start) {
            Ok(()) => {
                self.punched.fetch_add(end - start, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "virtio-mem of node {}: unplugged memory stays: {e}",
                    self.node
                );
            }
        }
        self.add_release_time(t.elapsed());
    }

    /// The thread: punches what is queued, a chunk at a time, until stopped.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if state.mode == Mode::Stopped {
                return;
            }
            let Some((start, end)) = state.queued.iter().next() else {
                state = sync::wait(&self.changed, state);
                continue;
            };
            let chunk = (start, end.min(start.saturating_add(CHUNK)));
            state.queued.remove(chunk.0, chunk.1);
            state.punching = Some(chunk);
            drop(state);
            self.release(chunk.0, chunk.1);
            state = self.lock();
            state.punching = None;
            self.changed.notify_all();
        }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[cfg(test)]
mod tests;
