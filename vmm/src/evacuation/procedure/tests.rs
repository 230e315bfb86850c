//! The procedure against a real memfd-backed virtio-mem device and a simulated guest:
//! one region at a time here, passes of several in `batch`, the races with users in
//! `races`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mempower_api::{JobKind, JobState, RegionOutcome};

use super::*;
use crate::agent::AgentCallError;
use crate::evacuation::ledger::RegionMark;
use crate::evacuation::node::NodeMemory;
use crate::evacuation::test_guest::{SimGuest, MIB};
use crate::evacuation::EvacuationWorker;

mod batch;
mod races;

pub(super) struct Rig {
    pub evacuator: RegionEvacuator,
    pub ledger: Arc<Mutex<Ledger>>,
    pub arbiter: Arc<Arbiter>,
}

pub(super) fn rig(guest: &SimGuest) -> Rig {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let timeouts = Timeouts {
        agent: Duration::from_secs(1),
        unplug: Duration::from_millis(200),
        poll: Duration::from_millis(5),
        reconnect: Duration::from_millis(300),
    };
    let arbiter = Arc::new(Arbiter::new(Arc::new(guest.clone())));
    let evacuator = RegionEvacuator::new(
        0,
        arbiter.clone(),
        Arc::new(guest.clone()),
        Arc::new(GuestBlockSize::default()),
        ledger.clone(),
        timeouts,
    );
    Rig {
        evacuator,
        ledger,
        arbiter,
    }
}

fn evacuator(guest: &SimGuest) -> (RegionEvacuator, Arc<Mutex<Ledger>>) {
    let r = rig(guest);
    (r.evacuator, r.ledger)
}

fn plugged_regions(guest: &SimGuest) -> Vec<usize> {
    guest.plugged_regions()
}

/// Waits for job `id` of `ledger` to end.
pub(super) fn wait_job(ledger: &Mutex<Ledger>, id: u64) -> mempower_api::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let j = ledger.lock().unwrap().job(id).unwrap();
        if j.state == JobState::Done {
            return j;
        }
        assert!(std::time::Instant::now() < deadline, "job not done: {j:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_region_is_offlined_unplugged_exactly_and_released() {
    let guest = SimGuest::new();
    guest.st().in_use_pages.insert(33, 256);
    let (e, _) = evacuator(&guest);
    let resident = guest.resident_bytes(1).unwrap();
    assert!(resident >= MIB);
    let r = e.evacuate_region(1);
    assert_eq!(r.outcome, RegionOutcome::Released, "{r:?}");
    assert_eq!(
        (r.memory_block, r.unplugged_bytes, r.released_bytes),
        (33, 128 * MIB, resident)
    );
    // What the region held in use (the agent's `track`), all of it still on the node.
    assert_eq!(r.migrated_bytes, Some(256 * 4096));
    assert_eq!(
        (r.migrated_on_node_bytes, r.migrated_off_node_bytes),
        (Some(256 * 4096), Some(0))
    );
    assert_eq!(r.warning, None);
    assert_eq!(
        plugged_regions(&guest),
        [64, 0, 64, 64],
        "only region 1 went"
    );
    assert_eq!(guest.snapshot().requested_bytes, 384 * MIB);
    assert_eq!(guest.resident_bytes(1).unwrap(), 0);
    for kept in [0, 2, 3] {
        assert!(guest.data_intact(kept), "region {kept}");
    }
    // Again: nothing is plugged, nothing happens.
    let again = e.evacuate_region(1);
    assert_eq!(
        (again.outcome, again.unplugged_bytes),
        (RegionOutcome::Released, 0)
    );
    assert_eq!(guest.snapshot().requested_bytes, 384 * MIB);
}

#[test]
fn a_region_the_guest_cannot_offline_fails_and_nothing_is_discarded() {
    let guest = SimGuest::new();
    guest.st().unmovable.insert(34);
    let (e, _) = evacuator(&guest);
    let resident = guest.resident_bytes(2).unwrap();
    let r = e.evacuate_region(2);
    assert_eq!(r.outcome, RegionOutcome::Failed);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("memory34") && reason.contains("errno 16"),
        "{reason}"
    );
    assert_eq!(plugged_regions(&guest), [64; 4]);
    assert_eq!(guest.snapshot().requested_bytes, 512 * MIB, "never lowered");
    assert_eq!(guest.resident_bytes(2).unwrap(), resident);
    assert!(guest.data_intact(2));
}

#[test]
fn an_agent_timeout_or_disconnect_fails_the_region_and_changes_nothing() {
    for down in [
        AgentCallError::Timeout(Duration::from_secs(1)),
        AgentCallError::NotConnected(None),
    ] {
        let guest = SimGuest::new();
        guest.st().agent_down = Some(down.clone());
        let (e, _) = evacuator(&guest);
        let r = e.evacuate_region(0);
        assert_eq!(r.outcome, RegionOutcome::Failed);
        assert!(r.reason.unwrap().contains(&down.to_string()));
        assert_eq!(plugged_regions(&guest), [64; 4]);
        assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
        assert!(guest.data_intact(0));
    }
}

/// One region through a whole pass of the worker's: results recorded in the ledger.
fn evacuate_recorded(e: &mut RegionEvacuator, region: u32) -> RegionResult {
    let batch = RegionSet::of(4, &[region]).unwrap();
    e.evacuate(&batch);
    let result = e.results.borrow().last().cloned().unwrap();
    e.pass_done(&batch);
    result
}

/// An offline whose answer is lost drops the agent's connection: putting the block back
/// waits for the reconnection instead of failing at once with "not connected".
#[test]
fn a_put_back_waits_for_the_agent_to_reconnect() {
    let guest = SimGuest::new();
    (guest.st().offline_answer_lost, guest.st().reconnect_calls) = (true, 3);
    let (mut e, ledger) = evacuator(&guest);
    let r = evacuate_recorded(&mut e, 1);
    assert_eq!(r.outcome, RegionOutcome::Failed);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("did not answer") && reason.ends_with("memory block put back online"),
        "{reason}"
    );
    assert!(guest.st().offline.is_empty(), "memory33 is online again");
    assert!(r.offline_blocks.is_empty());
    assert!(matches!(
        ledger.lock().unwrap().mark(0, 1),
        Some(RegionMark::Failed(_))
    ));
    assert_eq!(plugged_regions(&guest), [64; 4]);
    assert!(guest.data_intact(1));
}

/// An agent that stays away past the deadline: the result and the region's mark say
/// which blocks may be offline, and the node's next pass puts them back first.
#[test]
fn blocks_left_offline_are_marked_and_put_back_by_the_next_pass() {
    let guest = SimGuest::new();
    (guest.st().offline_answer_lost, guest.st().reconnect_calls) = (true, u32::MAX);
    let (mut e, ledger) = evacuator(&guest);
    let r = evacuate_recorded(&mut e, 1);
    assert_eq!(r.outcome, RegionOutcome::Failed);
    assert!(r.reason.unwrap().ends_with("it stays offline"));
    assert_eq!(r.offline_blocks, [33]);
    assert_eq!(guest.st().offline, [33].into());
    assert_eq!(ledger.lock().unwrap().stranded(0), [(1, vec![33])]);
    ledger.lock().unwrap().clear_failure(0, 1);
    assert!(
        matches!(ledger.lock().unwrap().mark(0, 1), Some(RegionMark::Offline { blocks, .. }) if blocks == &[33]),
        "asking for the region again does not forget its offline blocks"
    );
    // The agent is back; a pass for another region puts memory33 back online first.
    (guest.st().offline_answer_lost, guest.st().not_connected) = (false, 0);
    guest.st().calls.clear();
    let r = evacuate_recorded(&mut e, 2);
    assert_eq!(r.outcome, RegionOutcome::Released, "{r:?}");
    assert!(
        !guest.st().offline.contains(&33),
        "memory33 is online again"
    );
    let calls = guest.st().calls.clone();
    let at = |call: &str| calls.iter().position(|c| c.starts_with(call));
    let (online, offline) = (at("Online { blocks: [33]"), at("Offline { blocks: [34]"));
    assert!(online.is_some() && online < offline, "{calls:?}");
    assert!(ledger.lock().unwrap().stranded(0).is_empty());
    assert_eq!(ledger.lock().unwrap().mark(0, 1), None);
    assert!(guest.data_intact(1));
}

#[test]
fn a_guest_that_does_not_unplug_gets_its_size_and_block_back() {
    let guest = SimGuest::new();
    guest.st().driver_stuck = true;
    let (e, _) = evacuator(&guest);
    let r = e.evacuate_region(3);
    assert_eq!(r.outcome, RegionOutcome::Failed);
    let reason = r.reason.unwrap();
    assert!(reason.contains("did not unplug memory35"), "{reason}");
    assert!(
        reason.contains("restored") && reason.contains("put back online"),
        "{reason}"
    );
    assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
    assert!(guest.st().offline.is_empty());
    assert!(guest.data_intact(3));
}

#[test]
fn a_guest_that_unplugs_more_is_reported() {
    let guest = SimGuest::new();
    guest.st().driver_greedy = true;
    let (e, _) = evacuator(&guest);
    let r = e.evacuate_region(0);
    assert_eq!(r.outcome, RegionOutcome::Released);
    let warning = r.warning.unwrap();
    assert!(warning.contains("other regions [3]"), "{warning}");
}

#[test]
fn the_worker_runs_jobs_and_never_discards_a_failed_region() {
    let guest = SimGuest::new();
    guest.st().unmovable.insert(33);
    let (e, ledger) = evacuator(&guest);
    let resident = e.resident_cache();
    resident.refresh(&guest);
    let held = guest.resident_bytes(0).unwrap();
    assert!(held > 0 && resident.region(0) == held);
    let worker = EvacuationWorker::start(0, 4, e).unwrap();
    let job = {
        let mut l = ledger.lock().unwrap();
        let id = l.new_job(0, JobKind::Evacuate, vec![0, 1, 2], None);
        worker.request(&[0, 1, 2]).unwrap();
        id
    };
    let done = wait_job(&ledger, job);
    let outcomes: Vec<_> = done.results.iter().map(|r| (r.region, r.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (0, RegionOutcome::Released),
            (1, RegionOutcome::Failed),
            (2, RegionOutcome::Released)
        ]
    );
    assert_eq!(plugged_regions(&guest), [0, 64, 0, 64]);
    assert!(guest.data_intact(1) && guest.data_intact(3));
    // The resident figures the event loop reads were measured before the job ended.
    for region in 0..4 {
        let exact = guest.resident_bytes(region).unwrap();
        assert_eq!(resident.region(region), exact, "region {region}");
    }
    assert_eq!(resident.region(0), 0);
    assert_eq!(done.unplugged_bytes, 256 * MIB);
    assert_eq!(guest.snapshot().requested_bytes, 256 * MIB);
    let l = ledger.lock().unwrap();
    assert!(matches!(
        l.mark(0, 1),
        Some(super::super::ledger::RegionMark::Failed(_))
    ));
    assert_eq!(l.counters(0).released_regions, 2);
}

#[test]
fn regions_asked_for_during_a_pass_go_to_the_next_pass() {
    let guest = SimGuest::new();
    let (go, hold) = std::sync::mpsc::channel();
    guest.st().hold = Some((32, hold)); // region 0's offlining waits
    let (e, ledger) = evacuator(&guest);
    let worker = EvacuationWorker::start(0, 4, e).unwrap();
    let new_job = |regions: Vec<u32>| {
        let mut l = ledger.lock().unwrap();
        let id = l.new_job(0, JobKind::Evacuate, regions.clone(), None);
        worker.request(&regions).unwrap();
        id
    };
    let first = new_job(vec![0, 1]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ledger.lock().unwrap().mark(0, 0).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "region 0 never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Region 0 is being offlined: ask for it again, and for region 2.
    let second = new_job(vec![2, 0]);
    go.send(()).unwrap();
    let (first, second) = (wait_job(&ledger, first), wait_job(&ledger, second));
    let regions = |j: &mempower_api::Job| j.results.iter().map(|r| r.region).collect::<Vec<_>>();
    assert_eq!(regions(&first), [0, 1]);
    assert_eq!(
        regions(&second),
        [0, 2],
        "region 0 from the first pass, 2 from the next"
    );
    assert!(second
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
    let offlines_of_0 = guest
        .st()
        .calls
        .iter()
        .filter(|c| c.contains("Offline { blocks: [32] }"))
        .count();
    assert_eq!(offlines_of_0, 1, "region 0 was not evacuated twice");
    assert_eq!(plugged_regions(&guest), [0, 0, 0, 64]);
    assert!(guest.data_intact(3));
}

#[test]
fn an_agent_that_answers_nonsense_fails_the_region_and_changes_nothing() {
    let guest = SimGuest::new();
    guest.st().agent_lies = true;
    let (e, _) = evacuator(&guest);
    let r = e.evacuate_region(1);
    assert_eq!(r.outcome, RegionOutcome::Failed);
    let reason = r.reason.unwrap();
    assert!(reason.contains("did not report on memory33"), "{reason}");
    assert_eq!(plugged_regions(&guest), [64; 4]);
    assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
    assert!(guest.data_intact(1));
    // Absurd usage counts saturate instead of overflowing.
    let usage =
        crate::evacuation::node::guest_in_use(&guest, vec![32], Duration::from_secs(1)).unwrap();
    assert_eq!(usage[&32], u64::MAX);
}

/// Users, the README and the integration tests read these words: they must not drift.
#[test]
fn failure_reasons_keep_their_words() {
    let reason = |setup: &dyn Fn(&SimGuest), region| {
        let guest = SimGuest::new();
        setup(&guest);
        evacuator(&guest).0.evacuate_region(region).reason.unwrap()
    };
    assert_eq!(
        reason(
            &|g| {
                g.st().unmovable.insert(34);
            },
            2
        ),
        "offlining memory34 failed: Device or resource busy (errno 16)"
    );
    assert_eq!(
        reason(&|g| g.st().driver_stuck = true, 3),
        "the guest did not unplug memory35 within 200ms (64 of 64 device blocks still \
         plugged); requested size restored to 536870912 bytes; memory block put back online"
    );
    assert_eq!(
        reason(&|g| g.st().agent_lies = true, 1),
        "the agent did not report on memory33; memory block still online"
    );
    assert_eq!(
        reason(
            &|g| g.st().agent_down = Some(AgentCallError::Timeout(Duration::from_secs(1))),
            0
        ),
        "tracking the pages of memory32: the guest agent did not answer within 1s"
    );
    assert_eq!(
        reason(
            &|g| {
                let mut st = g.st();
                st.in_use_pages.insert(32, 4096);
                st.rooms = Some(vec![agent_protocol::NodeRoom {
                    node: 0,
                    free_pages: 256,
                }]);
            },
            0
        ),
        "node 0 has no room for the 16.0 MiB in use in memory32: it has 1.0 MiB free \
         elsewhere; nothing was evacuated (\"allow_other_nodes\": true lets the data go to \
         other nodes)"
    );
}

#[test]
fn the_host_release_is_timed_and_the_wait_shared() {
    let guest = SimGuest::new();
    let (e, _) = evacuator(&guest);
    let before = guest.snapshot().release_time;
    let r = e.evacuate_region(1);
    assert_eq!(r.outcome, RegionOutcome::Released, "{r:?}");
    let took = guest.snapshot().release_time - before;
    assert!(took > Duration::ZERO, "the hole punch was timed");
    assert!(r.phases.total_ms() <= r.duration_ms, "{r:?}");

    let g = guest.geometry();
    let mut offline = vec![InFlight::new(&g, 0), InFlight::new(&g, 1)];
    let snap = |release_ms: u64| MemSnapshot {
        plugged: Vec::new(),
        plugged_bytes: 0,
        requested_bytes: 0,
        release_time: Duration::from_millis(release_ms),
    };
    share_the_wait(
        &mut offline,
        Duration::from_millis(100),
        &snap(5),
        &snap(45),
    );
    for f in &offline {
        assert_eq!(
            (f.result.phases.unplug_ms, f.result.phases.release_ms),
            (30, 20)
        );
    }
}
