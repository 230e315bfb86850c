//! Evacuating one region: the guest agent offlines its memory block (the guest kernel
//! migrates the pages elsewhere), the VMM lowers the node's requested size by exactly
//! the region's plugged bytes, waits until the device has seen the guest unplug the
//! region's blocks (Linux's driver unplugs offline blocks first), and checks that the
//! host memory went (the device discards each block as the guest unplugs it).
//!
//! Nothing is discarded unless the guest unplugged it: when offlining fails, the
//! requested size is never touched. When the guest does not unplug in time, the
//! requested size is restored and the block put back online.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{AgentError, Request, Response};
use mempower_api::{EvacuationPhase, RegionOutcome, RegionResult};

use super::ledger::Ledger;
use super::locality::{self, LocalityError};
use super::node::{AgentCall, NodeError, NodeMemory};
use super::worker::Evacuate;
use crate::agent::AgentCallError;

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
    #[error("cannot lower the requested size: {0}")]
    LowerSize(NodeError),
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
        put_back: PutBack,
    },
}

/// What became of the requested size after the guest did not unplug in time.
#[derive(Debug)]
pub enum Restored {
    To(u64),
    Failed(NodeError),
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restored::To(bytes) => write!(f, "requested size restored to {bytes} bytes"),
            Restored::Failed(e) => write!(f, "the requested size could not be restored: {e}"),
        }
    }
}

/// How putting a block back online after a failure went.
#[derive(Debug)]
pub enum PutBack {
    Online,
    /// Already online: the kernel refused the offline, nothing to undo.
    StillOnline,
    Refused(AgentError),
    NoAnswer,
    UnexpectedAnswer(Box<Response>),
    Call(AgentCallError),
}

impl fmt::Display for PutBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutBack::Online => write!(f, "memory block put back online"),
            PutBack::StillOnline => write!(f, "memory block still online"),
            PutBack::Refused(e) => write!(f, "putting it back online failed: {:?}", Some(e)),
            PutBack::NoAnswer => write!(f, "putting it back online: no answer"),
            PutBack::UnexpectedAnswer(a) => {
                write!(f, "putting it back online: unexpected answer {a:?}")
            }
            PutBack::Call(e) => write!(f, "putting it back online: {e}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One agent call; offlining a full block migrates 128 MiB.
    pub agent: Duration,
    /// From the lowered requested size to the region unplugged.
    pub unplug: Duration,
    /// How often the device bitmap is read while waiting.
    pub poll: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            agent: crate::event_loop::AGENT_CALL_TIMEOUT,
            unplug: Duration::from_secs(60),
            poll: Duration::from_millis(20),
        }
    }
}

/// A node's [`Evacuate`]: what `mempowerd/N` does with each region.
pub struct RegionEvacuator {
    node: u32,
    memory: Arc<dyn NodeMemory>,
    agent: Arc<dyn AgentCall>,
    ledger: Arc<Mutex<Ledger>>,
    timeouts: Timeouts,
    /// Results of the current pass, published when it ends.
    results: Vec<RegionResult>,
}

impl RegionEvacuator {
    pub fn new(
        node: u32,
        memory: Arc<dyn NodeMemory>,
        agent: Arc<dyn AgentCall>,
        ledger: Arc<Mutex<Ledger>>,
        timeouts: Timeouts,
    ) -> Self {
        RegionEvacuator {
            node,
            memory,
            agent,
            ledger,
            timeouts,
            results: Vec::new(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn phase(&self, region: u32, phase: EvacuationPhase) {
        self.ledger().set_phase(self.node, region, phase);
    }

    /// Evacuates `region` and says what happened.
    pub fn evacuate_region(&self, region: u32) -> RegionResult {
        let started = Instant::now();
        let block = self.memory.geometry().memory_block(region);
        let mut result = RegionResult::new(region, block);
        match self.run(region, block, &mut result) {
            Ok(()) => result.outcome = RegionOutcome::Released,
            Err(reason) => result.reason = Some(reason.to_string()),
        }
        result.duration_ms = started.elapsed().as_millis() as u64;
        result
    }

    fn run(&self, region: u32, block: u32, result: &mut RegionResult) -> Result<(), RegionError> {
        let g = self.memory.geometry();
        let blocks = g.device_blocks(region);
        let before = self.memory.snapshot();
        if before.plugged_in(blocks.clone()) == 0 {
            result.warning = Some("nothing was plugged in the region".into());
            return Ok(());
        }
        let resident_before = self.memory.resident_bytes(region)?;

        self.phase(region, EvacuationPhase::Offlining);
        // Locality hooks: track (and check the room) before offlining, settle after.
        let allow = self.ledger().other_nodes_allowed(self.node, region);
        let timeout = self.timeouts.agent;
        let prepared = locality::prepare(&*self.agent, self.node, &[block], allow, timeout)?;
        let offlined = self.offline(block);
        let settled = locality::settle(&*self.agent, &prepared, timeout);
        locality::record(
            result,
            &prepared,
            block,
            offlined.is_ok(),
            settled.as_deref(),
        );
        offlined?;

        self.phase(region, EvacuationPhase::Unplugging);
        let now = self.memory.snapshot();
        let region_bytes = now.plugged_in(blocks.clone()) as u64 * g.block_size();
        let old_requested = now.requested_bytes;
        let target = old_requested
            .min(now.plugged_bytes)
            .saturating_sub(region_bytes);
        if let Err(e) = self.memory.set_requested_size(target) {
            return Err(self.put_back(block, RegionError::LowerSize(e)));
        }
        let deadline = Instant::now() + self.timeouts.unplug;
        let after = loop {
            let s = self.memory.snapshot();
            if s.plugged_in(blocks.clone()) == 0 && s.plugged_bytes <= target {
                break s;
            }
            if Instant::now() >= deadline {
                let restored = match self.memory.set_requested_size(old_requested) {
                    Ok(()) => Restored::To(old_requested),
                    Err(e) => Restored::Failed(e),
                };
                let reason = RegionError::NotUnplugged {
                    block,
                    waited: self.timeouts.unplug,
                    left: s.plugged_in(blocks.clone()),
                    blocks: blocks.len(),
                    restored,
                };
                return Err(self.put_back(block, reason));
            }
            std::thread::sleep(self.timeouts.poll);
        };
        result.unplugged_bytes = region_bytes;
        let others: Vec<usize> = (0..before.plugged.len())
            .filter(|b| !blocks.contains(b) && before.plugged[*b] && !after.plugged[*b])
            .collect();
        if !others.is_empty() {
            let mut regions: Vec<u32> = others
                .iter()
                .map(|b| (b / g.blocks_per_region()) as u32)
                .collect();
            regions.dedup();
            result.warning = Some(format!(
                "the guest also unplugged {} device blocks of other regions {regions:?}",
                others.len()
            ));
        }

        self.phase(region, EvacuationPhase::Releasing);
        let resident_after = self.memory.resident_bytes(region)?;
        result.released_bytes = resident_before.saturating_sub(resident_after);
        if resident_after > 0 {
            return Err(RegionError::StillResident {
                block,
                bytes: resident_after,
            });
        }
        Ok(())
    }

    /// Offlines `block`; on any failure it is left (or put back) online.
    fn offline(&self, block: u32) -> Result<(), RegionError> {
        let request = Request::Offline {
            blocks: vec![block],
        };
        let reason = match self.agent.call(request, self.timeouts.agent) {
            Ok(Response::BlockResults { results }) => {
                match results.into_iter().find(|r| r.block == block) {
                    Some(r) => match r.error {
                        None => return Ok(()),
                        // The kernel restores a block whose offlining fails.
                        Some(error) => return Err(RegionError::OfflineRefused { block, error }),
                    },
                    None => RegionError::NotReported { block },
                }
            }
            Ok(other) => RegionError::UnexpectedAnswer(Box::new(other)),
            Err(source) => RegionError::Offline { block, source },
        };
        Err(self.put_back(block, reason))
    }

    /// Puts `block` back online (zone Movable) after a failure, and says how it went.
    fn put_back(&self, block: u32, reason: RegionError) -> RegionError {
        let request = Request::Online {
            blocks: vec![block],
            movable: true,
        };
        let put_back = match self.agent.call(request, self.timeouts.agent) {
            Ok(Response::BlockResults { results }) => match results.into_iter().next() {
                Some(r) => match r.error {
                    None => PutBack::Online,
                    // Already online: the kernel refused the offline, nothing to undo.
                    Some(e) if e.errno == libc::EINVAL => PutBack::StillOnline,
                    Some(e) => PutBack::Refused(e),
                },
                None => PutBack::NoAnswer,
            },
            Ok(other) => PutBack::UnexpectedAnswer(Box::new(other)),
            Err(e) => PutBack::Call(e),
        };
        RegionError::PutBack {
            reason: Box::new(reason),
            put_back,
        }
    }
}

impl Evacuate for RegionEvacuator {
    fn evacuate(&mut self, region: u32) {
        let result = self.evacuate_region(region);
        log_outcome(self.node, &result);
        self.ledger().region_done(self.node, &result);
        self.results.push(result);
    }

    fn pass_done(&mut self, _batch: u128) {
        let results = std::mem::take(&mut self.results);
        self.ledger().publish(self.node, &results);
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
