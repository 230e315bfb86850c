//! The ledger: every job, what each region is going through, and the counters that
//! `/metrics` reports. One mutex guards it; the API handler and the node workers share
//! it. Results reach jobs only once the worker has cleared the pass's bits (see
//! [`Ledger::publish`]), so a job can never wait for a pass that already ended.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use mempower_api::{
    CompactionCandidate, EvacuationPhase, Job, JobKind, JobState, PhaseTimes, RegionOutcome,
    RegionResult,
};

/// Finished jobs kept for `GET /api/v1/evacuations`; older ones are forgotten.
const KEEP_DONE_JOBS: usize = 256;

/// What the ledger knows about a region beyond the device bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionMark {
    Evacuating(EvacuationPhase),
    /// The last evacuation failed, for this reason; the region is still plugged.
    Failed(String),
    /// The last evacuation failed, for this reason, and left these memory blocks offline
    /// in the guest; they stay marked until a pass puts them back online.
    Offline {
        blocks: Vec<u32>,
        reason: String,
    },
}

/// Per-node totals since the VM started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeCounters {
    pub released_regions: u64,
    pub failed_regions: u64,
    pub released_bytes: u64,
    pub unplugged_bytes: u64,
    pub migrated_bytes: u64,
    pub jobs_done: u64,
    pub job_seconds: f64,
}

struct JobRecord {
    job: Job,
    /// Its regions that have no result yet: a set, so that a job of 8192 regions
    /// takes each result in constant time.
    waiting: BTreeSet<u32>,
    created: Instant,
    finished: Option<Instant>,
}

#[derive(Default)]
pub struct Ledger {
    next_job: u64,
    jobs: BTreeMap<u64, JobRecord>,
    marks: HashMap<(u32, u32), RegionMark>,
    counters: BTreeMap<u32, NodeCounters>,
}

impl Ledger {
    /// Records a new job; a compaction starts in `planning` with no regions yet.
    pub fn new_job(
        &mut self,
        node: u32,
        kind: JobKind,
        regions: Vec<u32>,
        release_bytes: Option<u64>,
    ) -> u64 {
        self.next_job += 1;
        let id = self.next_job;
        let state = match kind {
            JobKind::Compact | JobKind::Shrink => JobState::Planning,
            JobKind::Evacuate => JobState::Queued,
        };
        let waiting = regions.iter().copied().collect();
        let job = Job {
            id,
            node,
            kind,
            state,
            regions,
            results: Vec::new(),
            release_bytes,
            plan: Vec::new(),
            error: None,
            allow_other_nodes: false,
            released_bytes: 0,
            unplugged_bytes: 0,
            migrated_bytes: 0,
            migrated_on_node_bytes: 0,
            migrated_off_node_bytes: 0,
            moved_back_bytes: 0,
            elapsed_ms: 0,
            phases: PhaseTimes::default(),
        };
        self.jobs.insert(
            id,
            JobRecord {
                job,
                waiting,
                created: Instant::now(),
                finished: None,
            },
        );
        self.forget_old_jobs();
        id
    }

    /// Lets the job's data go to other nodes when its node has no room.
    pub fn allow_other_nodes(&mut self, id: u64) {
        if let Some(r) = self.jobs.get_mut(&id) {
            r.job.allow_other_nodes = true;
        }
    }

    /// A job whose request is checked (the node's room) before it is queued.
    pub fn checking(&mut self, id: u64) {
        if let Some(r) = self.jobs.get_mut(&id) {
            r.job.state = JobState::Planning;
        }
    }

    /// Whether `region`'s data may go to other nodes: every unfinished job of `node`
    /// that wants it allows it (and there is one).
    pub fn other_nodes_allowed(&self, node: u32, region: u32) -> bool {
        let mut wanting = self
            .jobs
            .values()
            .map(|r| &r.job)
            .filter(|j| j.node == node && j.state != JobState::Done && j.regions.contains(&region))
            .peekable();
        wanting.peek().is_some() && wanting.all(|j| j.allow_other_nodes)
    }

    /// A compaction's ranking and chosen regions: the job now waits for the worker.
    pub fn planned(&mut self, id: u64, plan: Vec<CompactionCandidate>, regions: Vec<u32>) {
        if let Some(r) = self.jobs.get_mut(&id) {
            r.job.plan = plan;
            r.waiting = regions.iter().copied().collect();
            r.job.regions = regions;
            r.job.state = JobState::Queued;
        }
    }

    /// Forgets a job that never started (its thread could not be spawned): the client
    /// is told so, and no job is left behind.
    pub fn discard(&mut self, id: u64) {
        self.jobs.remove(&id);
    }

    /// A job that cannot run at all ends here.
    pub fn abandon(&mut self, id: u64, error: String) {
        if let Some(r) = self.jobs.get_mut(&id) {
            log::warn!(
                "job {id} ({} of node {}) ended: {error}",
                kind_name(r.job.kind),
                r.job.node
            );
            r.job.error = Some(error);
            r.job.state = JobState::Done;
            r.finished = Some(Instant::now());
        }
    }

    /// The worker entered `phase` for `region`; jobs waiting for it are now running.
    pub fn set_phase(&mut self, node: u32, region: u32, phase: EvacuationPhase) {
        self.marks
            .insert((node, region), RegionMark::Evacuating(phase));
        for r in self.jobs.values_mut() {
            if r.job.node == node && r.job.state == JobState::Queued && r.waiting.contains(&region)
            {
                r.job.state = JobState::Running;
            }
        }
    }

    /// The worker finished `result.region`: its mark and the node's counters change at
    /// once, the jobs learn of it in [`Ledger::publish`].
    pub fn region_done(&mut self, node: u32, result: &RegionResult) {
        let key = (node, result.region);
        let c = self.counters.entry(node).or_default();
        match result.outcome {
            RegionOutcome::Released => {
                self.marks.remove(&key);
                c.released_regions += 1;
            }
            RegionOutcome::Failed => {
                let reason = result.reason.clone().unwrap_or_default();
                let mark = match result.offline_blocks.is_empty() {
                    true => RegionMark::Failed(reason),
                    false => RegionMark::Offline {
                        blocks: result.offline_blocks.clone(),
                        reason,
                    },
                };
                self.marks.insert(key, mark);
                c.failed_regions += 1;
            }
        }
        c.released_bytes += result.released_bytes;
        c.unplugged_bytes += result.unplugged_bytes;
        c.migrated_bytes += result.migrated_bytes.unwrap_or(0);
    }

    /// Gives a pass's results to every unfinished job of `node` that asked for those
    /// regions, and ends the jobs that now have all their results.
    pub fn publish(&mut self, node: u32, results: &[RegionResult]) {
        let now = Instant::now();
        let mut finished = Vec::new();
        for r in self.jobs.values_mut() {
            if r.job.node != node
                || r.job.state == JobState::Done
                || r.job.state == JobState::Planning
            {
                continue;
            }
            for result in results {
                if r.waiting.remove(&result.region) {
                    r.job.results.push(result.clone());
                }
            }
            if r.waiting.is_empty() {
                r.job.state = JobState::Done;
                r.finished = Some(now);
                finished.push(now - r.created);
                log_end(&report(r));
            }
        }
        let c = self.counters.entry(node).or_default();
        for took in finished {
            c.jobs_done += 1;
            c.job_seconds += took.as_secs_f64();
        }
    }

    pub fn mark(&self, node: u32, region: u32) -> Option<&RegionMark> {
        self.marks.get(&(node, region))
    }

    /// The regions of `node` whose memory blocks a failed evacuation left offline, with
    /// those blocks.
    pub fn stranded(&self, node: u32) -> Vec<(u32, Vec<u32>)> {
        let mut stranded: Vec<_> = self
            .marks
            .iter()
            .filter_map(|(&(n, region), mark)| match mark {
                RegionMark::Offline { blocks, .. } if n == node => Some((region, blocks.clone())),
                _ => None,
            })
            .collect();
        stranded.sort();
        stranded
    }

    /// The memory blocks of `region` are online again.
    pub fn clear_stranded(&mut self, node: u32, region: u32) {
        if let Some(RegionMark::Offline { .. }) = self.marks.get(&(node, region)) {
            self.marks.remove(&(node, region));
        }
    }

    /// Forgets a failure, e.g. when the region is asked for again (not blocks left
    /// offline: those stay marked until they are online again).
    pub fn clear_failure(&mut self, node: u32, region: u32) {
        if let Some(RegionMark::Failed(_)) = self.marks.get(&(node, region)) {
            self.marks.remove(&(node, region));
        }
    }

    pub fn counters(&self, node: u32) -> NodeCounters {
        self.counters.get(&node).cloned().unwrap_or_default()
    }

    /// One job with its sums and elapsed time filled in.
    pub fn job(&self, id: u64) -> Option<Job> {
        self.jobs.get(&id).map(report)
    }

    /// Every job kept, oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        self.jobs.values().map(report).collect()
    }

    fn forget_old_jobs(&mut self) {
        let done: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, r)| r.job.state == JobState::Done)
            .map(|(id, _)| *id)
            .collect();
        for id in done.iter().take(done.len().saturating_sub(KEEP_DONE_JOBS)) {
            self.jobs.remove(id);
        }
    }
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Evacuate => "evacuation",
        JobKind::Compact => "compaction",
        JobKind::Shrink => "shrink",
    }
}

/// A finished job's summary: info if every region was released, warn otherwise.
fn log_end(job: &Job) {
    let failed = job
        .results
        .iter()
        .filter(|x| x.outcome == RegionOutcome::Failed)
        .count();
    let summary = format!(
        "job {} ({} of node {}) done in {} ms: {} of {} regions released, {} bytes of host \
         memory freed",
        job.id,
        kind_name(job.kind),
        job.node,
        job.elapsed_ms,
        job.results.len() - failed,
        job.results.len(),
        job.released_bytes
    );
    if failed == 0 {
        log::info!("{summary}");
    } else {
        log::warn!("{summary}");
    }
}

fn report(r: &JobRecord) -> Job {
    let mut job = r.job.clone();
    job.released_bytes = job.results.iter().map(|x| x.released_bytes).sum();
    job.unplugged_bytes = job.results.iter().map(|x| x.unplugged_bytes).sum();
    job.migrated_bytes = job.results.iter().filter_map(|x| x.migrated_bytes).sum();
    job.phases = PhaseTimes::default();
    for x in &job.results {
        job.phases.add(&x.phases);
    }
    job.migrated_on_node_bytes = job
        .results
        .iter()
        .filter_map(|x| x.migrated_on_node_bytes)
        .sum();
    job.migrated_off_node_bytes = job
        .results
        .iter()
        .filter_map(|x| x.migrated_off_node_bytes)
        .sum();
    job.moved_back_bytes = job.results.iter().filter_map(|x| x.moved_back_bytes).sum();
    let end = r.finished.unwrap_or_else(Instant::now);
    job.elapsed_ms = (end - r.created).as_millis() as u64;
    job
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(region: u32, outcome: RegionOutcome) -> RegionResult {
        RegionResult {
            region,
            memory_block: 40 + region,
            outcome,
            reason: (outcome == RegionOutcome::Failed).then(|| "busy".to_string()),
            warning: None,
            unplugged_bytes: 128 << 20,
            released_bytes: 100 << 20,
            migrated_bytes: Some(4096),
            migrated_on_node_bytes: Some(4096),
            migrated_off_node_bytes: None,
            moved_back_bytes: Some(0),
            duration_ms: 5,
            phases: PhaseTimes {
                offline_ms: 3,
                unplug_ms: 1,
                release_ms: 1,
            },
            offline_blocks: Vec::new(),
        }
    }

    #[test]
    fn jobs_get_results_of_their_regions_and_end() {
        let mut l = Ledger::default();
        let a = l.new_job(1, JobKind::Evacuate, vec![0, 2], None);
        let b = l.new_job(1, JobKind::Evacuate, vec![2], None);
        let other_node = l.new_job(0, JobKind::Evacuate, vec![2], None);
        l.set_phase(1, 2, EvacuationPhase::Unplugging);
        assert_eq!(l.job(a).unwrap().state, JobState::Running);
        assert_eq!(l.job(other_node).unwrap().state, JobState::Queued);
        assert_eq!(
            l.mark(1, 2),
            Some(&RegionMark::Evacuating(EvacuationPhase::Unplugging))
        );
        let r2 = result(2, RegionOutcome::Released);
        l.region_done(1, &r2);
        assert_eq!(l.mark(1, 2), None);
        l.publish(1, &[r2]);
        assert_eq!(
            l.job(b).unwrap().state,
            JobState::Done,
            "merged requests share the pass"
        );
        let job_a = l.job(a).unwrap();
        assert_eq!((job_a.state, job_a.results.len()), (JobState::Running, 1));
        let r0 = result(0, RegionOutcome::Failed);
        l.region_done(1, &r0);
        l.publish(1, &[r0]);
        let job_a = l.job(a).unwrap();
        assert_eq!(job_a.state, JobState::Done);
        assert_eq!(job_a.released_bytes, 200 << 20);
        assert_eq!(job_a.migrated_bytes, 8192);
        assert_eq!(
            (job_a.phases.offline_ms, job_a.phases.total_ms()),
            (6, 10),
            "the phases of both results"
        );
        assert_eq!(
            (
                job_a.migrated_on_node_bytes,
                job_a.migrated_off_node_bytes,
                job_a.moved_back_bytes
            ),
            (8192, 0, 0)
        );
        assert_eq!(l.mark(1, 0), Some(&RegionMark::Failed("busy".into())));
        let c = l.counters(1);
        assert_eq!(
            (c.released_regions, c.failed_regions, c.jobs_done),
            (1, 1, 2)
        );
        assert_eq!(l.job(other_node).unwrap().results, vec![]);
        l.clear_failure(1, 0);
        assert_eq!(l.mark(1, 0), None);
    }

    #[test]
    fn compactions_plan_first_and_can_be_abandoned() {
        let mut l = Ledger::default();
        let c = l.new_job(0, JobKind::Compact, vec![], Some(1 << 27));
        assert_eq!(l.job(c).unwrap().state, JobState::Planning);
        l.publish(0, &[result(1, RegionOutcome::Released)]);
        assert!(
            l.job(c).unwrap().results.is_empty(),
            "a planning job takes no results"
        );
        l.planned(c, vec![], vec![1]);
        assert_eq!(l.job(c).unwrap().state, JobState::Queued);
        let d = l.new_job(0, JobKind::Compact, vec![], Some(1));
        l.abandon(d, "nothing to release".into());
        let job = l.job(d).unwrap();
        assert_eq!(
            (job.state, job.error.as_deref()),
            (JobState::Done, Some("nothing to release"))
        );
        assert_eq!(l.jobs().iter().map(|j| j.id).collect::<Vec<_>>(), [c, d]);
    }

    #[test]
    fn a_job_of_8192_regions_gets_its_results_quickly() {
        let mut l = Ledger::default();
        let all: Vec<u32> = (0..8192).collect();
        let big = l.new_job(0, JobKind::Evacuate, all.clone(), None);
        let small = l.new_job(0, JobKind::Evacuate, vec![8191], None);
        let t = Instant::now();
        let results: Vec<RegionResult> = all
            .iter()
            .map(|r| result(*r, RegionOutcome::Released))
            .collect();
        for (region, r) in all.iter().zip(&results) {
            l.set_phase(0, *region, EvacuationPhase::Offlining);
            l.region_done(0, r);
        }
        l.publish(0, &results[..4096]);
        assert_eq!(l.job(big).unwrap().state, JobState::Running);
        l.publish(0, &results[4096..]);
        let took = t.elapsed();
        let job = l.job(big).unwrap();
        assert_eq!((job.state, job.results.len()), (JobState::Done, 8192));
        assert_eq!(job.unplugged_bytes, 8192 * (128 << 20));
        assert_eq!(l.job(small).unwrap().results[0].region, 8191);
        assert_eq!(l.counters(0).released_regions, 8192);
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        l.discard(small);
        assert!(l.job(small).is_none());
    }

    #[test]
    fn other_nodes_only_if_every_job_wanting_the_region_allows() {
        let mut l = Ledger::default();
        let a = l.new_job(1, JobKind::Evacuate, vec![0, 1], None);
        l.checking(a);
        assert_eq!(l.job(a).unwrap().state, JobState::Planning);
        assert!(!l.other_nodes_allowed(1, 0));
        l.allow_other_nodes(a);
        assert!(l.job(a).unwrap().allow_other_nodes);
        assert!(l.other_nodes_allowed(1, 0));
        assert!(!l.other_nodes_allowed(0, 0), "another node");
        assert!(!l.other_nodes_allowed(1, 2), "no job wants it");
        let b = l.new_job(1, JobKind::Evacuate, vec![1], None);
        assert!(!l.other_nodes_allowed(1, 1), "b does not allow it");
        assert!(l.other_nodes_allowed(1, 0));
        l.abandon(b, "x".into());
        assert!(l.other_nodes_allowed(1, 1), "a finished job has no say");
    }

    #[test]
    fn old_finished_jobs_are_forgotten() {
        let mut l = Ledger::default();
        for _ in 0..KEEP_DONE_JOBS + 10 {
            let id = l.new_job(0, JobKind::Evacuate, vec![], None);
            l.abandon(id, "x".into());
        }
        let pending = l.new_job(0, JobKind::Evacuate, vec![3], None);
        assert!(l.jobs().len() <= KEEP_DONE_JOBS + 1);
        assert!(l.job(pending).is_some());
        assert!(l.job(1).is_none());
    }
}
