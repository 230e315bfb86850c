//! `Evacuations`: what the API handler calls. It owns one `mempowerd/N` worker per
//! node with a hotplug region, the shared [`Ledger`], and checks every request before
//! anything is queued. Refusals are [`EvacuationError`]s, which the API side
//! (`event_loop::status`) turns into responses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mempower_api::{EvacuationPhase, Job, JobKind, RegionState, RegionStatus};

use super::compaction;
use super::ledger::{Ledger, NodeCounters, RegionMark};
use super::locality;
use super::node::{guest_in_use, region_list, AgentCall, NodeError, NodeMemory};
use super::procedure::{RegionEvacuator, Timeouts};
use super::worker::{EvacuationWorker, WorkerError};

/// Why a request about nodes, regions or jobs was refused.
#[derive(Debug, thiserror::Error)]
pub enum EvacuationError {
    #[error("no such node: {0}")]
    NoSuchNode(u32),
    #[error("node {0} has no hotplug region")]
    NoHotplugRegion(u32),
    #[error("no such region: {region} (node {node} has regions 0 to {})", .regions.saturating_sub(1))]
    NoSuchRegion {
        node: u32,
        region: u32,
        regions: u32,
    },
    #[error("no regions given")]
    NoRegions,
    #[error("node {0} cannot be evacuated: this VM has no guest agent (vsock)")]
    AgentUnavailable(u32),
    #[error("region {region} of node {node} is queued for evacuation")]
    AlreadyQueued { node: u32, region: u32 },
    #[error("region {region} of node {node} is being evacuated ({phase})")]
    Evacuating {
        node: u32,
        region: u32,
        phase: EvacuationPhase,
    },
    #[error("region {region} of node {node} is already plugged")]
    AlreadyPlugged { node: u32, region: u32 },
    /// The device refused the requested size that plugs the region.
    #[error("cannot plug region {region}: {source}")]
    Device { region: u32, source: NodeError },
    /// The node's worker refused the regions (e.g. beyond its mask).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("no such job: {0}")]
    NoSuchJob(u64),
    #[error("cannot start the {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
}

/// `nodes[node]`, for lists indexed by node id whose `None` is a node without a hotplug
/// region: the one place that tells an unknown node from one without memory to manage.
pub fn hotplug_node<T>(nodes: &[Option<T>], node: u32) -> Result<&T, EvacuationError> {
    match nodes.get(node as usize) {
        None => Err(EvacuationError::NoSuchNode(node)),
        Some(None) => Err(EvacuationError::NoHotplugRegion(node)),
        Some(Some(n)) => Ok(n),
    }
}

/// Before a job queues `regions`: whether `node` has room for what they hold (see
/// [`locality::prepare`]). Regions with nothing plugged have no block in the guest.
fn check_room(
    memory: &dyn NodeMemory,
    agent: &dyn AgentCall,
    node: u32,
    regions: &[u32],
    allow_other_nodes: bool,
    timeout: Duration,
) -> Result<(), locality::LocalityError> {
    let g = memory.geometry();
    let s = memory.snapshot();
    let blocks: Vec<u32> = regions
        .iter()
        .filter(|r| s.plugged_in(g.device_blocks(**r)) > 0)
        .map(|r| g.memory_block(*r))
        .collect();
    if blocks.is_empty() {
        return Ok(());
    }
    let prepared = locality::prepare(agent, node, &blocks, allow_other_nodes, timeout)?;
    locality::forget(agent, prepared.token, timeout);
    Ok(())
}

/// How long the region list waits for the guest's block usage.
const USAGE_TIMEOUT: Duration = Duration::from_secs(10);

struct NodeEvacuation {
    memory: Arc<dyn NodeMemory>,
    /// None without a guest agent: nothing can be evacuated then.
    worker: Option<EvacuationWorker>,
}

/// The guest agent, twice: the workers' connection, and another one for queries (usage,
/// compaction plans), so that these need not wait behind an offlining that may take
/// minutes (the agent answers each connection in order).
#[derive(Clone)]
pub struct EvacuationAgents {
    pub workers: Arc<dyn AgentCall>,
    pub queries: Arc<dyn AgentCall>,
}

pub struct Evacuations {
    ledger: Arc<Mutex<Ledger>>,
    /// Indexed by node id; None for a node without a hotplug region.
    nodes: Vec<Option<Arc<NodeEvacuation>>>,
    /// For usage and compaction plans.
    agent: Option<Arc<dyn AgentCall>>,
    timeouts: Timeouts,
}

impl Evacuations {
    /// Starts `mempowerd/N` for every node with memory (and only if there is an agent).
    pub fn start(
        memories: Vec<Option<Arc<dyn NodeMemory>>>,
        agents: Option<EvacuationAgents>,
        timeouts: Timeouts,
    ) -> Result<Self, WorkerError> {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut nodes = Vec::new();
        for (id, memory) in memories.into_iter().enumerate() {
            let Some(memory) = memory else {
                nodes.push(None);
                continue;
            };
            let worker = match &agents {
                Some(agents) => Some(EvacuationWorker::start(
                    id as u32,
                    RegionEvacuator::new(
                        id as u32,
                        memory.clone(),
                        agents.workers.clone(),
                        ledger.clone(),
                        timeouts,
                    ),
                )?),
                None => None,
            };
            nodes.push(Some(Arc::new(NodeEvacuation { memory, worker })));
        }
        Ok(Evacuations {
            ledger,
            nodes,
            agent: agents.map(|a| a.queries),
            timeouts,
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node(&self, node: u32) -> Result<&Arc<NodeEvacuation>, EvacuationError> {
        hotplug_node(&self.nodes, node)
    }

    fn check_region(
        &self,
        node: u32,
        n: &NodeEvacuation,
        region: u32,
    ) -> Result<(), EvacuationError> {
        let regions = n.memory.geometry().regions();
        if region >= regions {
            return Err(EvacuationError::NoSuchRegion {
                node,
                region,
                regions,
            });
        }
        Ok(())
    }

    fn worker<'a>(
        &self,
        node: u32,
        n: &'a NodeEvacuation,
    ) -> Result<&'a EvacuationWorker, EvacuationError> {
        n.worker
            .as_ref()
            .ok_or(EvacuationError::AgentUnavailable(node))
    }

    /// Starts an evacuation of `regions` of `node`; answers the job's id at once. A
    /// thread checks that the node has room for what the regions hold (or that other
    /// nodes may take it), then queues them; regions already queued merge.
    pub fn evacuate(
        &self,
        node: u32,
        regions: &[u32],
        allow_other_nodes: bool,
    ) -> Result<u64, EvacuationError> {
        let n = self.node(node)?.clone();
        let mut wanted = Vec::new();
        for &r in regions {
            self.check_region(node, &n, r)?;
            if r >= super::worker::MAX_REGIONS {
                return Err(WorkerError::BadRegion(r).into());
            }
            if !wanted.contains(&r) {
                wanted.push(r);
            }
        }
        if wanted.is_empty() {
            return Err(EvacuationError::NoRegions);
        }
        self.worker(node, &n)?;
        let agent = self.query_agent(node)?;
        let id = {
            let mut ledger = self.ledger();
            for &r in &wanted {
                ledger.clear_failure(node, r);
            }
            let id = ledger.new_job(node, JobKind::Evacuate, wanted.clone(), None);
            ledger.checking(id);
            if allow_other_nodes {
                ledger.allow_other_nodes(id);
            }
            id
        };
        let ledger = self.ledger.clone();
        let timeout = self.timeouts.agent;
        std::thread::Builder::new()
            .name(format!("mempower-check/{node}"))
            .spawn(move || {
                let checked = check_room(
                    &*n.memory,
                    &*agent,
                    node,
                    &wanted,
                    allow_other_nodes,
                    timeout,
                );
                let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                match checked {
                    Err(e) => ledger.abandon(id, e.to_string()),
                    Ok(()) => {
                        ledger.planned(id, Vec::new(), wanted.clone());
                        // Under the ledger lock, so that the job is queued before the
                        // worker can finish.
                        if let Some(Err(e)) = n.worker.as_ref().map(|w| w.request(&wanted)) {
                            ledger.abandon(id, e.to_string());
                        }
                    }
                }
            })
            .map_err(|source| EvacuationError::Spawn {
                what: "evacuation check",
                source,
            })?;
        Ok(id)
    }

    /// The agent connection for queries; there is one whenever there are workers.
    fn query_agent(&self, node: u32) -> Result<Arc<dyn AgentCall>, EvacuationError> {
        self.agent
            .clone()
            .ok_or(EvacuationError::AgentUnavailable(node))
    }

    /// Starts a compaction of `node`: a thread ranks its regions, checks that the node
    /// has room for what the chosen ones hold, then queues them. Answers the job's id
    /// at once.
    pub fn compact(
        &self,
        node: u32,
        release_bytes: u64,
        allow_other_nodes: bool,
    ) -> Result<u64, EvacuationError> {
        let n = self.node(node)?.clone();
        self.worker(node, &n)?;
        // There is a worker, so there is an agent: both come from `start`'s agents.
        let agent = self.query_agent(node)?;
        let id = {
            let mut ledger = self.ledger();
            let id = ledger.new_job(node, JobKind::Compact, Vec::new(), Some(release_bytes));
            if allow_other_nodes {
                ledger.allow_other_nodes(id);
            }
            id
        };
        let ledger = self.ledger.clone();
        let timeout = self.timeouts.agent;
        let eligible = self.idle_plugged_regions(node, &n);
        std::thread::Builder::new()
            .name(format!("mempower-compact/{node}"))
            .spawn(move || {
                let planned =
                    compaction::plan(&*n.memory, &*agent, &eligible, release_bytes, timeout);
                let plan = match planned {
                    Err(e) => {
                        ledger
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .abandon(id, e.to_string());
                        return;
                    }
                    Ok(plan) => plan,
                };
                let chosen: Vec<u32> = plan.iter().filter(|c| c.chosen).map(|c| c.region).collect();
                let checked = if chosen.is_empty() {
                    Ok(())
                } else {
                    check_room(
                        &*n.memory,
                        &*agent,
                        node,
                        &chosen,
                        allow_other_nodes,
                        timeout,
                    )
                };
                let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                ledger.planned(id, plan, chosen.clone());
                if chosen.is_empty() {
                    ledger.abandon(
                        id,
                        "nothing to release: no plugged region holds host memory".into(),
                    );
                    return;
                }
                if let Err(e) = checked {
                    ledger.abandon(id, e.to_string());
                    return;
                }
                if let Some(w) = &n.worker {
                    if let Err(e) = w.request(&chosen) {
                        ledger.abandon(id, e.to_string());
                    }
                }
            })
            .map_err(|source| EvacuationError::Spawn {
                what: "compaction",
                source,
            })?;
        Ok(id)
    }

    /// Fully plugged regions that are neither queued nor being evacuated.
    fn idle_plugged_regions(&self, node: u32, n: &NodeEvacuation) -> Vec<u32> {
        let g = n.memory.geometry();
        let s = n.memory.snapshot();
        let pending = n.worker.as_ref().map_or(0, |w| w.pending());
        let ledger = self.ledger();
        (0..g.regions())
            .filter(|r| s.plugged_in(g.device_blocks(*r)) == g.blocks_per_region())
            .filter(|r| pending & (1 << r) == 0)
            .filter(|r| !matches!(ledger.mark(node, *r), Some(RegionMark::Evacuating(_))))
            .collect()
    }

    /// Asks the guest to plug `region` again by raising the requested size by what it
    /// lacks. The guest's driver picks where to plug: with Linux's, removed memory
    /// blocks are reused lowest first.
    pub fn plug(&self, node: u32, region: u32) -> Result<(), EvacuationError> {
        let n = self.node(node)?;
        self.check_region(node, n, region)?;
        if let Some(&RegionMark::Evacuating(phase)) = self.ledger().mark(node, region) {
            return Err(EvacuationError::Evacuating {
                node,
                region,
                phase,
            });
        }
        if n.worker
            .as_ref()
            .is_some_and(|w| w.pending() & (1 << region) != 0)
        {
            return Err(EvacuationError::AlreadyQueued { node, region });
        }
        let g = n.memory.geometry();
        let s = n.memory.snapshot();
        let plugged = s.plugged_in(g.device_blocks(region));
        if plugged == g.blocks_per_region() {
            return Err(EvacuationError::AlreadyPlugged { node, region });
        }
        let missing = (g.blocks_per_region() - plugged) as u64 * g.block_size();
        n.memory
            .set_requested_size(s.requested_bytes + missing)
            .map_err(|source| EvacuationError::Device { region, source })
    }

    pub fn job(&self, id: u64) -> Result<Job, EvacuationError> {
        self.ledger().job(id).ok_or(EvacuationError::NoSuchJob(id))
    }

    pub fn jobs(&self) -> Vec<Job> {
        self.ledger().jobs()
    }

    pub fn counters(&self, node: u32) -> NodeCounters {
        self.ledger().counters(node)
    }

    /// The regions of `node`: what its device's bitmap and memfd say about each, and
    /// what the ledger knows (evacuating, failed).
    pub fn regions(&self, node: u32) -> Result<Vec<RegionStatus>, EvacuationError> {
        let n = self.node(node)?;
        let mut regions = region_list(&*n.memory);
        self.annotate(node, &mut regions);
        Ok(regions)
    }

    fn annotate(&self, node: u32, regions: &mut [RegionStatus]) {
        let ledger = self.ledger();
        for r in regions {
            match ledger.mark(node, r.index) {
                Some(RegionMark::Evacuating(phase)) => {
                    r.state = RegionState::Evacuating;
                    r.phase = Some(*phase);
                }
                Some(RegionMark::Failed(reason)) if r.state != RegionState::Released => {
                    r.state = RegionState::Failed;
                    r.reason = Some(reason.clone());
                }
                _ => {}
            }
        }
    }

    /// The guest's in-use bytes of each online memory block of `blocks`, or None if the
    /// agent does not answer. Blocks the caller; slow.
    pub fn in_use_bytes(agent: &dyn AgentCall, blocks: Vec<u32>) -> Option<HashMap<u32, u64>> {
        guest_in_use(agent, blocks, USAGE_TIMEOUT).ok()
    }

    pub fn agent(&self) -> Option<Arc<dyn AgentCall>> {
        self.agent.clone()
    }
}

#[cfg(test)]
mod tests;
