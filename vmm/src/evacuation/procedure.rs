//! Evacuating a pass's regions: the guest agent offlines each region's memory blocks
//! (the guest kernel migrates their pages elsewhere); then, once for the whole pass,
//! the VMM lowers the node's requested size by exactly the offline regions' plugged
//! bytes (a claim on the node's [`Arbiter`]), waits until the device has seen the
//! guest unplug their blocks (Linux's driver unplugs offline blocks first), and checks,
//! region by region, that the host memory went (the device discards each block as the
//! guest unplugs it). Results are per region, as if each had been evacuated alone.
//!
//! Nothing is discarded unless the guest unplugged it: a region whose offlining fails
//! drops out of the pass before the requested size is touched, with its blocks back
//! online. When the guest does not unplug in time, the claim of the regions left is
//! given back (never more: a newer user size stays) and their blocks put back online.

use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{AgentError, Request, Response};
use mempower_api::{EvacuationPhase, RegionOutcome, RegionResult};

use super::arbiter::Arbiter;
use super::ledger::Ledger;
use super::locality::{self, LocalityError};
use super::node::{AgentCall, Geometry, GuestBlockSize, MemSnapshot, NodeError};
use super::region_set::RegionSet;
use super::resident::ResidentCache;
use super::worker::Evacuate;
use crate::agent::AgentCallError;
use crate::sync::Locked;

/// Why a region could not be evacuated. Its text is the result's `reason`, which users,
/// the README and the integration tests read: keep the words.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Reading the memfd failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The node has no room for the region's data (nothing was done), or the agent
    /// could not track its pages.
    #[error(transparent)]
    Locality(#[from] LocalityError),
    /// The guest kernel refused; it keeps the block online.
    #[error("offlining memory{block} failed: {error}")]
    OfflineRefused { block: u32, error: AgentError },
    #[error("offlining memory{block}: {source}")]
    Offline { block: u32, source: AgentCallError },
    #[error("the agent did not report on memory{block}")]
    NotReported { block: u32 },
    #[error("unexpected answer to offline: {0:?}")]
    UnexpectedAnswer(Box<Response>),
    /// The pass panicked (a bug); the region may still be offline.
    #[error("the evacuation stopped unexpectedly: {0}")]
    Panicked(String),
    #[error("cannot lower the requested size: {0}")]
    LowerSize(Arc<NodeError>),
    /// The node's regions do not fit the guest's memory blocks (shared by the pass).
    #[error(transparent)]
    Geometry(Arc<NodeError>),
    #[error(
        "the guest did not unplug memory{block} within {waited:?} ({left} of {blocks} \
         device blocks still plugged); {restored}"
    )]
    NotUnplugged {
        block: u32,
        waited: Duration,
        left: usize,
        blocks: usize,
        restored: Restored,
    },
    #[error(
        "the guest unplugged memory{block} but {bytes} bytes of host memory are still \
         allocated to it"
    )]
    StillResident { block: u32, bytes: u64 },
    /// A failure after which the block was put back online, and how that went.
    #[error("{reason}; {put_back}")]
    PutBack {
        reason: Box<RegionError>,
        /// The memory blocks that were to go back online.
        blocks: Vec<u32>,
        put_back: PutBack,
    },
}

/// What became of the requested size after the guest did not unplug in time.
#[derive(Debug, Clone)]
pub enum Restored {
    To(u64),
    Failed(Arc<NodeError>),
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restored::To(bytes) => write!(f, "requested size restored to {bytes} bytes"),
            Restored::Failed(e) => write!(f, "the requested size could not be restored: {e}"),
        }
    }
}

/// How putting blocks back online after a failure went.
#[derive(Debug)]
pub enum PutBack {
    /// This many blocks went back online.
    Online(usize),
    /// Already online: the kernel refused the offline, nothing to undo.
    StillOnline,
    Refused(AgentError),
    NoAnswer,
    UnexpectedAnswer(Box<Response>),
    Call(AgentCallError),
}

impl PutBack {
    /// Whether the blocks are known to be online again. Without an answer they may be
    /// offline still: the guest cannot use them until a later pass puts them back.
    pub fn online_again(&self) -> bool {
        matches!(self, PutBack::Online(_) | PutBack::StillOnline)
    }
}

impl fmt::Display for PutBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutBack::Online(1) => write!(f, "memory block put back online"),
            PutBack::Online(n) => write!(f, "{n} memory blocks put back online"),
            PutBack::StillOnline => write!(f, "memory block still online"),
            PutBack::Refused(e) => write!(f, "putting it back online failed: {:?}", Some(e)),
            PutBack::NoAnswer => write!(f, "putting it back online: no answer"),
            PutBack::UnexpectedAnswer(a) => {
                write!(f, "putting it back online: unexpected answer {a:?}")
            }
            PutBack::Call(e) => write!(f, "putting it back online: {e}; it stays offline"),
        }
    }
}

/// How often a put-back looks for the agent's reconnection, at least.
const RECONNECT_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One agent call per memory block; offlining a full block migrates 128 MiB.
    pub agent: Duration,
    /// How long the guest may go without unplugging anything of the pass.
    pub unplug: Duration,
    /// How often the device bitmap is read while waiting.
    pub poll: Duration,
    /// How long putting blocks back online waits for the agent to be reachable again
    /// (a timed-out call drops the connection, and the client reconnects).
    pub reconnect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            agent: crate::agent::AGENT_CALL_TIMEOUT,
            unplug: Duration::from_secs(60),
            poll: Duration::from_millis(20),
            reconnect: Duration::from_secs(30),
        }
    }
}

/// A node's [`Evacuate`]: what `mempowerd/N` does with each pass.
pub struct RegionEvacuator {
    node: u32,
    arbiter: Arc<Arbiter>,
    agent: Arc<dyn AgentCall>,
    block_size: Arc<GuestBlockSize>,
    ledger: Arc<Mutex<Ledger>>,
    timeouts: Timeouts,
    /// Results of the current pass, published when it ends.
    results: RefCell<Vec<RegionResult>>,
    /// The node's resident figures, refreshed after each pass (see [`ResidentCache`]).
    resident: Arc<ResidentCache>,
}

/// A region of the pass on its way.
struct InFlight {
    result: RegionResult,
    started: Instant,
    memory_blocks: Range<u32>,
    /// The memory blocks this pass offlined, to put back online if it fails.
    offlined: Vec<u32>,
    device_blocks: Range<usize>,
    resident_before: u64,
}

impl InFlight {
    fn new(g: &Geometry, region: u32) -> Self {
        InFlight {
            result: RegionResult::new(region, g.memory_block(region)),
            started: Instant::now(),
            memory_blocks: g.memory_blocks(region),
            offlined: Vec::new(),
            device_blocks: g.device_blocks(region),
            resident_before: 0,
        }
    }

    fn region(&self) -> u32 {
        self.result.region
    }

    fn finish(mut self, outcome: Result<(), RegionError>) -> RegionResult {
        match outcome {
            Ok(()) => self.result.outcome = RegionOutcome::Released,
            Err(reason) => {
                if let RegionError::PutBack {
                    blocks, put_back, ..
                } = &reason
                {
                    if !put_back.online_again() {
                        self.result.offline_blocks = blocks.clone();
                    }
                }
                self.result.reason = Some(reason.to_string());
            }
        }
        self.result.duration_ms = self.started.elapsed().as_millis() as u64;
        self.result
    }
}

impl RegionEvacuator {
    pub fn new(
        node: u32,
        arbiter: Arc<Arbiter>,
        agent: Arc<dyn AgentCall>,
        block_size: Arc<GuestBlockSize>,
        ledger: Arc<Mutex<Ledger>>,
        timeouts: Timeouts,
    ) -> Self {
        RegionEvacuator {
            node,
            arbiter,
            agent,
            block_size,
            ledger,
            timeouts,
            results: RefCell::default(),
            resident: Arc::default(),
        }
    }

    /// The node's resident figures, which this evacuator refreshes after each pass.
    pub fn resident_cache(&self) -> Arc<ResidentCache> {
        self.resident.clone()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.locked()
    }

    fn phase(&self, region: u32, phase: EvacuationPhase) {
        self.ledger().set_phase(self.node, region, phase);
    }

    fn snapshot(&self) -> MemSnapshot {
        self.arbiter.memory().snapshot()
    }

    /// The node's geometry with the guest's memory block size. Until the agent has
    /// said it, the x86_64 size is assumed: a wrong guess cannot discard anything (the
    /// guest only unplugs what it offlined, and the checks below catch the rest).
    fn geometry(&self) -> Result<Geometry, NodeError> {
        let g = self.arbiter.memory().geometry();
        match self.block_size.learn(&*self.agent, self.timeouts.agent) {
            Ok(block_size) => g.with_memory_block_size(block_size),
            Err(e) => {
                log::debug!("node {}: the guest's block size is unknown: {e}", self.node);
                Ok(g)
            }
        }
    }

    /// Evacuates `region` alone and says what happened (for tests: the worker hands
    /// whole passes to [`RegionEvacuator::evacuate_batch`]).
    #[cfg(test)]
    pub(crate) fn evacuate_region(&self, region: u32) -> RegionResult {
        let g = self.arbiter.memory().geometry();
        let batch = RegionSet::of(g.regions(), &[region]).unwrap_or_else(|_| {
            panic!(
                "region {region} is beyond the node's {} regions",
                g.regions()
            )
        });
        let mut results = Vec::new();
        self.evacuate_batch(&batch, &mut |r| results.push(r));
        results.remove(0)
    }

    /// Evacuates every region of `batch` in one pass, handing each result to `done` as
    /// soon as it is known.
    pub fn evacuate_batch(&self, batch: &RegionSet, done: &mut dyn FnMut(RegionResult)) {
        let g = match self.geometry() {
            Ok(g) => g,
            Err(e) => {
                let (g, e) = (self.arbiter.memory().geometry(), Arc::new(e));
                for region in batch.iter_ones() {
                    let reason = RegionError::Geometry(e.clone());
                    done(InFlight::new(&g, region).finish(Err(reason)));
                }
                return;
            }
        };
        self.put_back_stranded();
        let mut offline = Vec::new();
        for region in batch.iter_ones() {
            let mut f = InFlight::new(&g, region);
            match self.take_offline(&g, &mut f) {
                Ok(true) => offline.push(f),
                Ok(false) => done(f.finish(Ok(()))),
                Err(e) => done(f.finish(Err(e))),
            }
        }
        if !offline.is_empty() {
            self.unplug(&g, batch, offline, done);
        }
    }

    /// Offlines `f`'s memory blocks; false if nothing was plugged (nothing to do).
    /// The locality hooks surround it: track (and check the node's room) before,
    /// settle (move back what left the node) after, whether it succeeded or not.
    fn take_offline(&self, g: &Geometry, f: &mut InFlight) -> Result<bool, RegionError> {
        let before = self.snapshot();
        if before.plugged_in(f.device_blocks.clone()) == 0 {
            f.result.warning = Some("nothing was plugged in the region".into());
            return Ok(false);
        }
        f.resident_before = self.arbiter.memory().resident_bytes(f.region())?;
        self.phase(f.region(), EvacuationPhase::Offlining);
        // Only blocks with plugged memory exist in the guest: the others were removed.
        let blocks: Vec<u32> = f
            .memory_blocks
            .clone()
            .filter(|b| before.plugged_in(g.device_blocks_of_memory_block(*b)) > 0)
            .collect();
        let allow = self.ledger().other_nodes_allowed(self.node, f.region());
        let timeout = self.timeouts.agent;
        // The offline phase: tracking, offlining (the guest migrates), settling.
        let t = Instant::now();
        let prepared = locality::prepare(&*self.agent, self.node, &blocks, allow, timeout)?;
        let offlined = self.offline(&blocks);
        let settled = locality::settle(&*self.agent, &prepared, timeout);
        locality::record(
            &mut f.result,
            &prepared,
            &blocks,
            offlined.is_ok(),
            settled.as_deref(),
        );
        f.result.phases.offline_ms = millis(t.elapsed());
        offlined?;
        f.offlined = blocks;
        Ok(true)
    }

    /// Lowers the requested size once for every region of `offline`, waits once, and
    /// finishes each.
    fn unplug(
        &self,
        g: &Geometry,
        batch: &RegionSet,
        mut offline: Vec<InFlight>,
        done: &mut dyn FnMut(RegionResult),
    ) {
        for f in &offline {
            self.phase(f.region(), EvacuationPhase::Unplugging);
        }
        let now = self.snapshot();
        for f in &mut offline {
            f.result.unplugged_bytes =
                now.plugged_in(f.device_blocks.clone()) as u64 * g.block_size();
        }
        let claim = match self
            .arbiter
            .claim(offline.iter().map(|f| f.result.unplugged_bytes).sum())
        {
            Ok(claim) => claim,
            Err(e) => {
                let e = Arc::new(e);
                for f in offline {
                    let reason = self.put_back(&f.offlined, RegionError::LowerSize(e.clone()));
                    done(f.finish(Err(reason)));
                }
                return;
            }
        };
        let waiting = Instant::now();
        let (after, stalled) = self.wait_unplugged(&offline);
        share_the_wait(&mut offline, waiting.elapsed(), &now, &after);
        let (gone, left): (Vec<InFlight>, Vec<InFlight>) = offline
            .into_iter()
            .partition(|f| after.plugged_in(f.device_blocks.clone()) == 0);
        let released = gone.iter().map(|f| f.result.unplugged_bytes).sum();
        let restored = match claim.settle(released) {
            Ok(bytes) => Restored::To(bytes),
            Err(e) => Restored::Failed(Arc::new(e)),
        };
        for mut f in left {
            let reason = RegionError::NotUnplugged {
                block: f.result.memory_block,
                waited: stalled,
                left: after.plugged_in(f.device_blocks.clone()),
                blocks: f.device_blocks.len(),
                restored: restored.clone(),
            };
            f.result.unplugged_bytes = 0;
            let reason = self.put_back(&f.offlined, reason);
            done(f.finish(Err(reason)));
        }
        let others = other_regions_unplugged(g, &now, &after, batch);
        for mut f in gone {
            if !others.is_empty() {
                f.result.warning = Some(format!(
                    "the guest also unplugged {} device blocks of other regions {:?}",
                    others.iter().map(|(_, n)| n).sum::<usize>(),
                    others.iter().map(|(r, _)| *r).collect::<Vec<_>>()
                ));
            }
            let outcome = self.check_released(&mut f);
            done(f.finish(outcome));
        }
    }

    /// Waits until every region of `offline` is unplugged, or the guest unplugs nothing
    /// of them for the unplug timeout; answers the last snapshot and how long it waited
    /// without progress.
    fn wait_unplugged(&self, offline: &[InFlight]) -> (MemSnapshot, Duration) {
        let left = |s: &MemSnapshot| -> usize {
            offline
                .iter()
                .map(|f| s.plugged_in(f.device_blocks.clone()))
                .sum()
        };
        let mut progress = Instant::now();
        let mut last = usize::MAX;
        loop {
            let s = self.snapshot();
            let now = left(&s);
            if now == 0 {
                return (s, Duration::ZERO);
            }
            if now < last {
                last = now;
                progress = Instant::now();
            } else if progress.elapsed() >= self.timeouts.unplug {
                return (s, self.timeouts.unplug);
            }
            std::thread::sleep(self.timeouts.poll);
        }
    }

    /// The region is unplugged: its host memory must be gone.
    fn check_released(&self, f: &mut InFlight) -> Result<(), RegionError> {
        self.phase(f.region(), EvacuationPhase::Releasing);
        let t = Instant::now();
        let resident_after = self.arbiter.memory().resident_bytes(f.region());
        f.result.phases.release_ms += millis(t.elapsed());
        let resident_after = resident_after?;
        f.result.released_bytes = f.resident_before.saturating_sub(resident_after);
        if resident_after > 0 {
            return Err(RegionError::StillResident {
                block: f.result.memory_block,
                bytes: resident_after,
            });
        }
        Ok(())
    }

    /// Offlines `blocks` (one region's); on any failure, those that went offline are
    /// put back online, and the error names the first block that failed.
    fn offline(&self, blocks: &[u32]) -> Result<(), RegionError> {
        let Some(&first) = blocks.first() else {
            return Ok(());
        };
        let request = Request::Offline {
            blocks: blocks.to_vec(),
        };
        let timeout = self.timeouts.agent * blocks.len() as u32;
        let (reason, undo) = match self.agent.call(request, timeout) {
            Ok(Response::BlockResults { results }) => {
                let mut undo = Vec::new();
                let mut failure = None;
                for &block in blocks {
                    match results.iter().find(|r| r.block == block) {
                        Some(r) => match &r.error {
                            None => undo.push(block),
                            // The kernel restores a block whose offlining fails.
                            Some(error) => {
                                failure.get_or_insert(RegionError::OfflineRefused {
                                    block,
                                    error: error.clone(),
                                });
                            }
                        },
                        None => {
                            undo.push(block);
                            failure.get_or_insert(RegionError::NotReported { block });
                        }
                    }
                }
                match failure {
                    None => return Ok(()),
                    Some(refused) if undo.is_empty() => return Err(refused),
                    Some(reason) => (reason, undo),
                }
            }
            Ok(other) => (
                RegionError::UnexpectedAnswer(Box::new(other)),
                blocks.to_vec(),
            ),
            // Refused by the client while disconnected: the agent never saw the call.
            Err(source @ AgentCallError::NotConnected(_)) => {
                return Err(RegionError::Offline {
                    block: first,
                    source,
                })
            }
            Err(source) => (
                RegionError::Offline {
                    block: first,
                    source,
                },
                blocks.to_vec(),
            ),
        };
        Err(self.put_back(&undo, reason))
    }

    /// Puts `blocks` back online (zone Movable) after a failure, and says how it went.
    fn put_back(&self, blocks: &[u32], reason: RegionError) -> RegionError {
        RegionError::PutBack {
            reason: Box::new(reason),
            blocks: blocks.to_vec(),
            put_back: self.online(blocks),
        }
    }

    /// Onlines `blocks`. The failure being undone may have dropped the agent's connection
    /// (a timeout does), so a call that finds no connection is made again, until the
    /// client has reconnected or [`Timeouts::reconnect`] has passed.
    fn online(&self, blocks: &[u32]) -> PutBack {
        let timeout = self.timeouts.agent * blocks.len().max(1) as u32;
        let give_up = Instant::now() + self.timeouts.reconnect;
        let answer = loop {
            let request = Request::Online {
                blocks: blocks.to_vec(),
                movable: true,
            };
            match self.agent.call(request, timeout) {
                Err(AgentCallError::NotConnected(_) | AgentCallError::Connection(_))
                    if Instant::now() < give_up =>
                {
                    std::thread::sleep(self.timeouts.poll.max(RECONNECT_POLL));
                }
                answer => break answer,
            }
        };
        match answer {
            Ok(Response::BlockResults { results }) if results.is_empty() => PutBack::NoAnswer,
            Ok(Response::BlockResults { results }) => {
                let refused = results
                    .iter()
                    .filter_map(|r| r.error.clone())
                    // Already online: the kernel refused the offline, nothing to undo.
                    .find(|e| e.errno != libc::EINVAL);
                match refused {
                    Some(e) => PutBack::Refused(e),
                    None => match results.iter().filter(|r| r.error.is_none()).count() {
                        0 => PutBack::StillOnline,
                        n => PutBack::Online(n),
                    },
                }
            }
            Ok(other) => PutBack::UnexpectedAnswer(Box::new(other)),
            Err(e) => PutBack::Call(e),
        }
    }

    /// Puts back online what an earlier pass of this node left offline, before this
    /// pass offlines anything: the guest gets its memory back as soon as the agent
    /// answers again.
    fn put_back_stranded(&self) {
        let stranded = self.ledger().stranded(self.node);
        for (region, blocks) in stranded {
            let put_back = self.online(&blocks);
            if put_back.online_again() {
                log::info!(
                    "node {} region {region}: memory blocks {blocks:?}, left offline by an \
                     earlier evacuation, are online again",
                    self.node
                );
                self.ledger().clear_stranded(self.node, region);
            } else {
                log::warn!(
                    "node {} region {region}: memory blocks {blocks:?} stay offline: {put_back}",
                    self.node
                );
            }
        }
    }

    /// Hands a finished region to the ledger (its mark and counters change at once)
    /// and keeps it for the pass's jobs.
    fn record(&self, result: RegionResult) {
        log_outcome(self.node, &result);
        self.ledger().region_done(self.node, &result);
        self.results.borrow_mut().push(result);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Shares a pass's unplug wait (`waited`, from lowering the requested size until the
/// guest had unplugged) equally among its regions: the host's release work between
/// `before` and `after` (the device punches holes as the guest unplugs) as `release`,
/// the rest as `unplug`.
fn share_the_wait(
    offline: &mut [InFlight],
    waited: Duration,
    before: &MemSnapshot,
    after: &MemSnapshot,
) {
    let n = offline.len().max(1) as u32;
    let release = after.release_time.saturating_sub(before.release_time);
    let unplug = waited.saturating_sub(release);
    for f in offline {
        f.result.phases.unplug_ms = millis(unplug / n);
        f.result.phases.release_ms = millis(release / n);
    }
}

/// Regions outside `batch` that lost plugged blocks between `before` and `after`, and
/// how many: the guest took more than it was asked for.
fn other_regions_unplugged(
    g: &Geometry,
    before: &MemSnapshot,
    after: &MemSnapshot,
    batch: &RegionSet,
) -> Vec<(u32, usize)> {
    (0..g.regions())
        .filter(|r| !batch.contains(*r))
        .filter_map(|r| {
            let (b, a) = (
                before.plugged_in(g.device_blocks(r)),
                after.plugged_in(g.device_blocks(r)),
            );
            (a < b).then(|| (r, b - a))
        })
        .collect()
}

impl Evacuate for RegionEvacuator {
    fn evacuate(&mut self, batch: &RegionSet) {
        self.evacuate_batch(batch, &mut |r| self.record(r));
    }

    fn pass_done(&mut self, _batch: &RegionSet) {
        // Before the jobs end: whoever sees a job done sees the memory it gave back.
        self.resident.refresh(&**self.arbiter.memory());
        let mut results = self.results.take();
        results.sort_by_key(|r| r.region);
        self.ledger().publish(self.node, &results);
    }

    fn pass_panicked(&mut self, batch: &RegionSet, why: &str) {
        let g = self.arbiter.memory().geometry();
        for region in batch.iter_ones() {
            if self.results.borrow().iter().all(|r| r.region != region) {
                let reason = RegionError::Panicked(why.to_string());
                self.record(InFlight::new(&g, region).finish(Err(reason)));
            }
        }
    }
}

fn log_outcome(node: u32, r: &RegionResult) {
    let what = format!("node {node} region {} (memory{})", r.region, r.memory_block);
    match r.outcome {
        RegionOutcome::Released => log::info!(
            "{what} released in {} ms: {} bytes unplugged, {} bytes of host memory freed{}",
            r.duration_ms,
            r.unplugged_bytes,
            r.released_bytes,
            r.warning
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default(),
        ),
        RegionOutcome::Failed => log::warn!(
            "{what} failed after {} ms: {}",
            r.duration_ms,
            r.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

#[cfg(test)]
mod tests;
