//! `Evacuations`: what the API handler calls. It owns one `mempowerd/N` worker per
//! node with a hotplug region, the shared [`Ledger`], and checks every request before
//! anything is queued. Refusals are [`EvacuationError`]s, which the API side
//! (`event_loop::status`) turns into responses.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mempower_api::{
    CompactionCandidate, EvacuationPhase, Job, JobKind, RegionQuery, RegionState, RegionStatus,
};

use super::arbiter::Arbiter;
use super::compaction::{self, Goal, PlanError};
use super::ledger::{Ledger, NodeCounters, RegionMark};
use super::locality;
use super::node::{
    fill_resident, guest_in_use, region_list, AgentCall, Geometry, GuestBlockSize, NodeError,
    NodeMemory,
};
use super::procedure::{RegionEvacuator, Timeouts};
use super::region_set::RegionSet;
use super::resident::ResidentCache;
use super::worker::{EvacuationWorker, WorkerError};
use crate::pool::{Pool, PoolError, PoolSize, API_POOL};
use crate::seccomp::ThreadKind;
use crate::sync::Locked;

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
    /// A user resize the device refuses (unaligned, beyond the hotplug region).
    #[error(transparent)]
    Resize(NodeError),
    /// The node's regions are smaller than the guest's memory blocks.
    #[error(transparent)]
    Geometry(NodeError),
    /// The node's worker refused the regions (e.g. beyond its mask).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("no such job: {0}")]
    NoSuchJob(u64),
    /// A list longer than the node has regions: it cannot name each once.
    #[error("{given} regions given, node {node} has {regions}")]
    TooManyRegions {
        node: u32,
        given: usize,
        regions: u32,
    },
    /// The checks or compactions in progress fill their pool.
    #[error(transparent)]
    Pool(#[from] PoolError),
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
/// [`locality::prepare`]). Blocks with nothing plugged are not in the guest.
fn check_room(
    memory: &dyn NodeMemory,
    g: &Geometry,
    agent: &dyn AgentCall,
    node: u32,
    regions: &[u32],
    allow_other_nodes: bool,
    timeout: Duration,
) -> Result<(), locality::LocalityError> {
    let s = memory.snapshot();
    let blocks: Vec<u32> = regions
        .iter()
        .flat_map(|r| g.memory_blocks(*r))
        .filter(|b| s.plugged_in(g.device_blocks_of_memory_block(*b)) > 0)
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

/// At most this many agent connections for the workers; more nodes share them. The
/// guest agent serves [`agent_protocol::MAX_AGENT_CONNECTIONS`] (8) at once, half of
/// them for host programs; the VMM's API calls need one, and a connection dropped on a
/// timeout may hold another until the agent finishes its request.
pub const MAX_WORKER_CONNECTIONS: usize = 2;
const _: () = assert!(
    1 + MAX_WORKER_CONNECTIONS
        + 1
        + crate::devices::virtio::vsock::muxer::MAX_HYBRID_AGENT_CONNECTIONS
        <= agent_protocol::MAX_AGENT_CONNECTIONS,
    "the VMM's agent clients, a dropped one and host programs' fit the agent's slots"
);

struct NodeEvacuation {
    arbiter: Arc<Arbiter>,
    /// What the event loop reads instead of walking the memfd (see [`ResidentCache`]).
    resident: Arc<ResidentCache>,
    /// None without a guest agent: nothing can be evacuated then.
    worker: Option<EvacuationWorker>,
    /// Held by a compaction from its planning until its regions are queued, so that the
    /// next compaction of the node plans after it, without those regions.
    compaction: Mutex<()>,
}

impl NodeEvacuation {
    fn memory(&self) -> &Arc<dyn NodeMemory> {
        self.arbiter.memory()
    }
}

/// The guest agent for the workers and for queries (usage, compaction plans, the
/// guest's block size). Each node's worker has a connection of its own (node `i` uses
/// `workers[i % workers.len()]`): the agent answers each connection in order, so node
/// 0's offlining never waits behind node 1's, and queries never wait behind either.
#[derive(Clone)]
pub struct EvacuationAgents {
    pub workers: Vec<Arc<dyn AgentCall>>,
    pub queries: Arc<dyn AgentCall>,
}

pub struct Evacuations {
    ledger: Arc<Mutex<Ledger>>,
    /// Indexed by node id; None for a node without a hotplug region.
    nodes: Vec<Option<Arc<NodeEvacuation>>>,
    /// For usage and compaction plans.
    agent: Option<Arc<dyn AgentCall>>,
    /// The guest's memory block size, once the agent has said it.
    block_size: Arc<GuestBlockSize>,
    timeouts: Timeouts,
    /// Where evacuation checks and compaction plans run: both ask the agent, so a
    /// client posting jobs in a loop must not start a thread each.
    checks: Pool,
    compactions: Pool,
    /// Where stale resident figures are measured again, off the event loop.
    refreshes: Pool,
}

/// Where a region list's resident bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resident {
    /// Measured now: a walk of each region's memory (never on the event loop).
    Exact,
    /// As last measured (see [`ResidentCache`]): for readers on the event loop.
    Cached,
}

impl Evacuations {
    /// Starts `mempowerd/N` for every node with memory (and only if there is an agent).
    pub fn start(
        memories: Vec<Option<Arc<dyn NodeMemory>>>,
        agents: Option<EvacuationAgents>,
        timeouts: Timeouts,
    ) -> Result<Self, WorkerError> {
        Self::start_placed(memories, agents, timeouts, &[])
    }

    /// As [`Self::start`], node N's worker running on `placement[N]`'s CPUs, if given.
    pub fn start_placed(
        memories: Vec<Option<Arc<dyn NodeMemory>>>,
        agents: Option<EvacuationAgents>,
        timeouts: Timeouts,
        placement: &[Option<Vec<usize>>],
    ) -> Result<Self, WorkerError> {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let block_size = Arc::new(GuestBlockSize::default());
        let mut nodes = Vec::new();
        for (id, memory) in memories.into_iter().enumerate() {
            let Some(memory) = memory else {
                nodes.push(None);
                continue;
            };
            let arbiter = Arc::new(Arbiter::new(memory));
            let agent = agents
                .as_ref()
                .filter(|a| !a.workers.is_empty())
                .map(|a| a.workers[id % a.workers.len()].clone());
            let (worker, resident) = match agent {
                Some(agent) => {
                    let evacuator = RegionEvacuator::new(
                        id as u32,
                        arbiter.clone(),
                        agent,
                        block_size.clone(),
                        ledger.clone(),
                        timeouts,
                    );
                    let resident = evacuator.resident_cache();
                    let worker = EvacuationWorker::start_on(
                        id as u32,
                        arbiter.memory().geometry().regions(),
                        evacuator,
                        placement.get(id).cloned().flatten(),
                    )?;
                    (Some(worker), resident)
                }
                None => (None, Arc::default()),
            };
            // Nothing is plugged yet: the first walk finds nothing, at once.
            resident.refresh(&**arbiter.memory());
            nodes.push(Some(Arc::new(NodeEvacuation {
                arbiter,
                resident,
                worker,
                compaction: Mutex::new(()),
            })));
        }
        Ok(Evacuations {
            ledger,
            agent: agents.map(|a| a.queries),
            block_size,
            timeouts,
            checks: Pool::new(
                "mempower-check",
                "evacuation checks",
                API_POOL,
                ThreadKind::Helper,
            ),
            compactions: Pool::new(
                "mempower-compact",
                "compactions",
                API_POOL,
                ThreadKind::Helper,
            ),
            // One refresh per node at most is ever queued (ResidentCache::claim_refresh).
            refreshes: Pool::new(
                "mempower-resident",
                "resident-memory refreshes",
                PoolSize {
                    workers: 1,
                    queue: nodes.len(),
                },
                ThreadKind::Helper,
            ),
            nodes,
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    fn node(&self, node: u32) -> Result<&Arc<NodeEvacuation>, EvacuationError> {
        hotplug_node(&self.nodes, node)
    }

    /// Whether `node` exists and has a hotplug region.
    pub fn check_node(&self, node: u32) -> Result<(), EvacuationError> {
        self.node(node).map(drop)
    }

    /// The node's geometry with the guest's memory block size, if the agent said it.
    fn geometry(&self, n: &NodeEvacuation) -> Result<Geometry, NodeError> {
        self.block_size.apply(n.memory().geometry())
    }

    fn check_region(
        &self,
        node: u32,
        n: &NodeEvacuation,
        region: u32,
    ) -> Result<(), EvacuationError> {
        let regions = n.memory().geometry().regions();
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
    /// thread of the checks pool checks that the node has room for what the regions hold (or that other
    /// nodes may take it), then queues them; regions already queued merge.
    pub fn evacuate(
        &self,
        node: u32,
        regions: &[u32],
        allow_other_nodes: bool,
    ) -> Result<u64, EvacuationError> {
        let n = self.node(node)?.clone();
        let count = n.memory().geometry().regions();
        // Refused before anything is built from it: each region once at most.
        if regions.len() > count as usize {
            return Err(EvacuationError::TooManyRegions {
                node,
                given: regions.len(),
                regions: count,
            });
        }
        let mut wanted = Vec::new();
        let mut seen = RegionSet::new(count);
        for &r in regions {
            self.check_region(node, &n, r)?;
            if seen.insert(r) {
                wanted.push(r);
            }
        }
        if wanted.is_empty() {
            return Err(EvacuationError::NoRegions);
        }
        self.worker(node, &n)?;
        let g = self.geometry(&n).map_err(EvacuationError::Geometry)?;
        // There is a worker, so there is an agent: both come from `start`'s agents.
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
        let submitted = self.checks.submit(move || {
            let memory = n.memory();
            let checked = check_room(
                &**memory,
                &g,
                &*agent,
                node,
                &wanted,
                allow_other_nodes,
                timeout,
            );
            let mut ledger = lock(&ledger);
            match checked {
                Err(e) => ledger.abandon(id, e.to_string()),
                Ok(()) => {
                    ledger.planned(id, Vec::new(), wanted.clone());
                    // Under the ledger lock, so that the job is queued before the
                    // worker can report on its regions.
                    if let Some(Err(e)) = n.worker.as_ref().map(|w| w.request(&wanted)) {
                        ledger.abandon(id, e.to_string());
                    }
                }
            }
        });
        if let Err(e) = submitted {
            self.ledger().discard(id);
            return Err(e.into());
        }
        Ok(id)
    }

    /// The agent connection for queries; there is one whenever there are workers.
    fn query_agent(&self, node: u32) -> Result<Arc<dyn AgentCall>, EvacuationError> {
        self.agent
            .clone()
            .ok_or(EvacuationError::AgentUnavailable(node))
    }

    /// Starts a compaction of `node`: a thread of the compactions pool ranks its regions, checks that the node
    /// has room for what the chosen ones hold, then queues them. Answers the job's id
    /// at once. Compactions of one node plan one after the other, each without the
    /// regions the ones before it queued.
    pub fn compact(
        &self,
        node: u32,
        release_bytes: u64,
        allow_other_nodes: bool,
    ) -> Result<u64, EvacuationError> {
        self.start_planned(node, Goal::Release(release_bytes), allow_other_nodes)
    }

    /// Starts a shrink of `node` by `regions` regions, chosen by the compaction policy
    /// among the idle plugged ones, untouched ones included (the autopilot's way to make
    /// a node smaller); node-local only. Answers the job's id at once.
    pub fn shrink(&self, node: u32, regions: u32) -> Result<u64, EvacuationError> {
        if regions == 0 {
            return Err(EvacuationError::NoRegions);
        }
        self.start_planned(node, Goal::Regions(regions as usize), false)
    }

    /// A job whose regions a thread of the compactions pool plans for `goal`.
    fn start_planned(
        &self,
        node: u32,
        goal: Goal,
        allow_other_nodes: bool,
    ) -> Result<u64, EvacuationError> {
        let n = self.node(node)?.clone();
        self.worker(node, &n)?;
        let agent = self.query_agent(node)?;
        let id = {
            let mut ledger = self.ledger();
            let id = match goal {
                Goal::Release(bytes) => {
                    ledger.new_job(node, JobKind::Compact, Vec::new(), Some(bytes))
                }
                Goal::Regions(_) => ledger.new_job(node, JobKind::Shrink, Vec::new(), None),
            };
            if allow_other_nodes {
                ledger.allow_other_nodes(id);
            }
            id
        };
        let planning = Planning {
            node,
            id,
            n,
            agent,
            ledger: self.ledger.clone(),
            block_size: self.block_size.clone(),
            timeout: self.timeouts.agent,
            allow_other_nodes,
        };
        if let Err(e) = self.compactions.submit(move || planning.run(goal)) {
            self.ledger().discard(id);
            return Err(e.into());
        }
        Ok(id)
    }

    /// Asks the guest to plug `region` again by raising the node's target by what it
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
        if n.worker.as_ref().is_some_and(|w| w.is_pending(region)) {
            return Err(EvacuationError::AlreadyQueued { node, region });
        }
        let g = n.memory().geometry();
        let plugged = n.memory().snapshot().plugged_in(g.device_blocks(region));
        if plugged == g.blocks_per_region() {
            return Err(EvacuationError::AlreadyPlugged { node, region });
        }
        let missing = (g.blocks_per_region() - plugged) as u64 * g.block_size();
        n.arbiter
            .raise_target(missing)
            .map(drop)
            .map_err(|source| EvacuationError::Device { region, source })
    }

    /// The user's resize of `node`: its target size (see [`Arbiter`]).
    pub fn resize(&self, node: u32, bytes: u64) -> Result<(), EvacuationError> {
        self.node(node)?
            .arbiter
            .set_target(bytes)
            .map(drop)
            .map_err(EvacuationError::Resize)
    }

    /// The node's target (the user's, as its [`Arbiter`] keeps it).
    pub fn target(&self, node: u32) -> Result<u64, EvacuationError> {
        Ok(self.node(node)?.arbiter.target())
    }

    /// The node's device: what it asks the guest to plug, and what is plugged.
    pub fn sizes(&self, node: u32) -> Result<(u64, u64), EvacuationError> {
        let s = self.node(node)?.memory().snapshot();
        Ok((s.requested_bytes, s.plugged_bytes))
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

    /// The regions of `node` that `query` selects: what its device's bitmap and memfd
    /// say about each, and what the ledger knows (evacuating, failed). If the guest's
    /// memory blocks are larger than the node's regions, every region says so.
    pub fn regions(
        &self,
        node: u32,
        query: &RegionQuery,
        resident: Resident,
    ) -> Result<Vec<RegionStatus>, EvacuationError> {
        let n = self.node(node)?;
        let (g, unfit) = match self.geometry(n) {
            Ok(g) => (g, None),
            Err(e) => (n.memory().geometry(), Some(e.to_string())),
        };
        let mut regions = region_list(&**n.memory(), &g);
        self.annotate(node, &mut regions);
        let mut regions: Vec<RegionStatus> = regions
            .into_iter()
            .filter(|r| query.state.is_none_or(|s| r.state == s))
            .skip(query.offset as usize)
            .take(query.limit.map_or(usize::MAX, |l| l as usize))
            .collect();
        match resident {
            Resident::Exact => fill_resident(&**n.memory(), &mut regions),
            Resident::Cached => {
                for r in &mut regions {
                    r.resident_bytes = n.resident.region(r.index);
                }
                self.refresh_if_stale(n);
            }
        }
        if let Some(reason) = unfit {
            for r in &mut regions {
                r.reason.get_or_insert_with(|| reason.clone());
            }
        }
        Ok(regions)
    }

    /// Host-resident bytes of `node`'s hotplug region as last measured, and how old
    /// the figure is (see [`ResidentCache`]); refreshed in the background when stale.
    pub fn resident_bytes(&self, node: u32) -> Result<(u64, Option<Duration>), EvacuationError> {
        let n = self.node(node)?;
        let figures = (n.resident.total(), n.resident.age());
        self.refresh_if_stale(n);
        Ok(figures)
    }

    /// Measures `node`'s regions now (a memfd walk: never on the event loop), updates
    /// the cache with the result, and returns it.
    pub fn measure_resident(&self, node: u32) -> Result<u64, EvacuationError> {
        let n = self.node(node)?;
        n.resident.refresh(&**n.memory());
        Ok(n.resident.total())
    }

    /// Queues a measurement of `n`'s regions if its figures are stale and none is queued.
    fn refresh_if_stale(&self, n: &Arc<NodeEvacuation>) {
        if !n.resident.claim_refresh() {
            return;
        }
        let node = n.clone();
        let queued = self
            .refreshes
            .submit(move || node.resident.refresh_claimed(&**node.memory()));
        if let Err(e) = queued {
            log::debug!("resident figures stay as they are: {e}");
            n.resident.unclaim();
        }
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
                Some(RegionMark::Offline { reason, .. }) => {
                    r.state = RegionState::Offline;
                    r.reason = Some(reason.clone());
                }
                _ => {}
            }
        }
    }

    /// Asks the agent for the guest's memory block size, unless it is known. Blocks
    /// the caller; without an answer, the x86_64 size stays assumed.
    pub fn learn_block_size(&self) {
        if let Some(agent) = &self.agent {
            if let Err(e) = self.block_size.learn(&**agent, USAGE_TIMEOUT) {
                log::debug!("the guest's memory block size is unknown: {e}");
            }
        }
    }

    /// Fills in the guest's in-use bytes of `regions` of `node` (the sum over each
    /// region's online memory blocks), asking the agent. Blocks the caller; slow.
    /// Without an answer, the figures stay unknown.
    pub fn add_usage(&self, node: u32, regions: &mut [RegionStatus]) {
        let (Some(agent), Ok(n)) = (&self.agent, self.node(node)) else {
            return;
        };
        let Ok(g) = self.geometry(n) else {
            return; // Regions that are not whole blocks have no usage to speak of.
        };
        // Only blocks the guest has: unplugged ones were removed, and the agent refuses
        // a request naming a block that does not exist.
        let s = n.memory().snapshot();
        let blocks: Vec<u32> = regions
            .iter()
            .filter(|r| r.plugged_bytes > 0)
            .flat_map(|r| g.memory_blocks(r.index))
            .filter(|b| s.plugged_in(g.device_blocks_of_memory_block(*b)) > 0)
            .collect();
        let Ok(usage) = guest_in_use(&**agent, blocks, USAGE_TIMEOUT) else {
            return;
        };
        for r in regions {
            let reported: Vec<u64> = g
                .memory_blocks(r.index)
                .filter_map(|b| usage.get(&b).copied())
                .collect();
            r.in_use_bytes = (!reported.is_empty())
                .then(|| reported.iter().fold(0u64, |sum, u| sum.saturating_add(*u)));
        }
    }

    pub fn agent(&self) -> Option<Arc<dyn AgentCall>> {
        self.agent.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

/// A compaction's planning, run by the compactions pool.
struct Planning {
    node: u32,
    id: u64,
    n: Arc<NodeEvacuation>,
    agent: Arc<dyn AgentCall>,
    ledger: Arc<Mutex<Ledger>>,
    block_size: Arc<GuestBlockSize>,
    timeout: Duration,
    allow_other_nodes: bool,
}

/// Ends the job with an error if planning stops without an outcome (a panic), so that
/// no compaction stays in `planning`.
struct Unfinished<'a> {
    ledger: &'a Mutex<Ledger>,
    id: u64,
}

impl Unfinished<'_> {
    /// Planning reached its outcome, which reports itself.
    fn defuse(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        lock(self.ledger).abandon(
            self.id,
            "the compaction's planning stopped unexpectedly".into(),
        );
    }
}

impl Planning {
    fn run(self, goal: Goal) {
        let unfinished = Unfinished {
            ledger: &self.ledger,
            id: self.id,
        };
        let _turn = lock(&self.n.compaction);
        let planned = self.plan(goal);
        // Room for what the chosen regions hold, asked before the ledger is locked.
        let checked = match &planned {
            Ok((plan, g)) if plan.iter().any(|c| c.chosen) => check_room(
                &**self.n.memory(),
                g,
                &*self.agent,
                self.node,
                &chosen(plan),
                self.allow_other_nodes,
                self.timeout,
            ),
            _ => Ok(()),
        };
        let mut ledger = lock(&self.ledger);
        unfinished.defuse();
        let plan = match planned {
            Ok((plan, _)) => plan,
            Err(e) => return ledger.abandon(self.id, e.to_string()),
        };
        let chosen = chosen(&plan);
        ledger.planned(self.id, plan, chosen.clone());
        if chosen.is_empty() {
            let why = match goal {
                Goal::Release(_) => "nothing to release: no plugged region holds host memory",
                Goal::Regions(_) => "nothing to remove: no plugged region is idle",
            };
            return ledger.abandon(self.id, why.into());
        }
        if let Err(e) = checked {
            return ledger.abandon(self.id, e.to_string());
        }
        if let Some(w) = &self.n.worker {
            if let Err(e) = w.request(&chosen) {
                ledger.abandon(self.id, e.to_string());
            }
        }
    }

    fn plan(&self, goal: Goal) -> Result<(Vec<CompactionCandidate>, Geometry), PlanError> {
        let memory = self.n.memory();
        let _ = self.block_size.learn(&*self.agent, self.timeout);
        let g = self
            .block_size
            .apply(memory.geometry())
            .map_err(PlanError::Geometry)?;
        let eligible = idle_plugged_regions(self.node, &self.n, &g, &self.ledger);
        let plan = compaction::plan(&**memory, &g, &*self.agent, &eligible, goal, self.timeout)?;
        Ok((plan, g))
    }
}

/// The regions a plan chose.
fn chosen(plan: &[CompactionCandidate]) -> Vec<u32> {
    plan.iter().filter(|c| c.chosen).map(|c| c.region).collect()
}

/// Fully plugged regions that are neither queued nor being evacuated.
fn idle_plugged_regions(
    node: u32,
    n: &NodeEvacuation,
    g: &Geometry,
    ledger: &Mutex<Ledger>,
) -> Vec<u32> {
    let s = n.memory().snapshot();
    let pending = n
        .worker
        .as_ref()
        .map_or_else(|| RegionSet::new(g.regions()), |w| w.pending());
    let ledger = lock(ledger);
    (0..g.regions())
        .filter(|r| s.plugged_in(g.device_blocks(*r)) == g.blocks_per_region())
        .filter(|r| !pending.contains(*r))
        .filter(|r| !matches!(ledger.mark(node, *r), Some(RegionMark::Evacuating(_))))
        .collect()
}

#[cfg(test)]
mod tests;
