use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mempower_api::{JobKind, JobState, RegionOutcome};

use super::*;
use crate::evacuation::arbiter::Arbiter;
use crate::evacuation::ledger::Ledger;
use crate::evacuation::node::GuestBlockSize;
use crate::evacuation::procedure::{RegionEvacuator, Timeouts};
use crate::evacuation::test_guest::{SimGuest, MIB};
use crate::evacuation::{EvacuationWorker, NodeMemory};

const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;
const TIMEOUT: Duration = Duration::from_secs(1);

fn rooms(node0_mib: u64, node1_mib: u64) -> Vec<NodeRoom> {
    vec![
        NodeRoom {
            node: 0,
            free_pages: node0_mib * PAGES_PER_MIB,
        },
        NodeRoom {
            node: 1,
            free_pages: node1_mib * PAGES_PER_MIB,
        },
    ]
}

#[test]
fn room_on_the_node_or_elsewhere_only_if_allowed() {
    let need = 96 * MIB;
    // Node 1 has room: the data stays, with or without the patch (without it, node 0
    // must hold it on the way).
    assert!(!check_room(1, &[40], need, &rooms(100, 100), true, false).unwrap());
    assert!(!check_room(1, &[40], need, &rooms(100, 100), false, false).unwrap());
    // Node 1 has no room: refused unless allowed.
    let e = check_room(1, &[40, 41], need, &rooms(500, 40), true, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node 1 has no room for the 96.0 MiB in use in memory40, memory41: it has 40.0 MiB \
         free elsewhere; nothing was evacuated (\"allow_other_nodes\": true lets the data \
         go to other nodes)"
    );
    assert!(check_room(1, &[40], need, &rooms(500, 40), true, true).unwrap());
    // Nowhere is enough: refused even when allowed.
    let e = check_room(1, &[40], need, &rooms(50, 40), true, true).unwrap_err();
    assert!(matches!(e, LocalityError::NoRoomAnywhere { .. }), "{e}");
    // A kernel that offlines to other nodes first needs room there for all of it.
    let e = check_room(1, &[40], need, &rooms(90, 500), false, false).unwrap_err();
    assert!(
        e.to_string().contains("offlines to other nodes first"),
        "{e}"
    );
    // Nothing in use needs no room at all.
    assert!(!check_room(1, &[40], 0, &rooms(0, 0), false, false).unwrap());
    // Absurd figures from the guest saturate.
    let huge = [NodeRoom {
        node: 1,
        free_pages: u64::MAX,
    }];
    assert!(!check_room(1, &[40], u64::MAX, &huge, true, false).unwrap());
}

#[test]
fn prepare_tracks_and_a_refusal_forgets_the_track() {
    let guest = SimGuest::new();
    {
        let mut st = guest.st();
        st.node = 1;
        st.in_use_pages.insert(33, 64 * PAGES_PER_MIB);
        st.rooms = Some(rooms(1000, 10));
    }
    let e = prepare(&guest, 1, &[33], false, TIMEOUT).unwrap_err();
    assert!(matches!(e, LocalityError::NoRoom { node: 1, .. }), "{e}");
    assert!(
        guest.st().tracks.is_empty(),
        "the refused track was released"
    );
    assert!(!guest.st().calls.iter().any(|c| c.starts_with("Offline")));
    let p = prepare(&guest, 1, &[33], true, TIMEOUT).unwrap();
    assert!(p.spills && p.node_local_offline);
    assert_eq!(p.in_use_bytes(33), 64 * MIB);
    assert_eq!(p.in_use_bytes(34), 0);
    // A spilling settle does not move pages back.
    settle(&guest, &p, TIMEOUT).unwrap();
    assert!(guest
        .st()
        .calls
        .iter()
        .any(|c| c.contains("Settle") && c.contains("move_back: false")));
    guest.st().agent_down = Some(crate::agent::AgentCallError::Timeout(TIMEOUT));
    let e = prepare(&guest, 1, &[33], true, TIMEOUT).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("tracking the pages of memory33: "),
        "{e}"
    );
}

fn region_result() -> RegionResult {
    RegionResult::new(1, 33)
}

#[test]
fn results_count_the_region_own_pages_and_where_they_went() {
    let prepared = Prepared {
        token: 1,
        node: 1,
        node_local_offline: false,
        blocks: vec![TrackedBlock {
            block: 33,
            node: Some(1),
            in_use_pages: 1000,
            mapped_pages: 900,
        }],
        spills: false,
    };
    let settled = [SettledBlock {
        block: 33,
        node: Some(1),
        tracked_pages: 900,
        on_node_pages: 880,
        moved_back_pages: 870,
        off_node_pages: 10,
        gone_pages: 10,
        ..SettledBlock::default()
    }];
    let mut r = region_result();
    record(&mut r, &prepared, &[33], true, Some(&settled));
    assert_eq!(r.migrated_bytes, Some(1000 * PAGE_SIZE), "all in use moved");
    assert_eq!(
        (
            r.migrated_on_node_bytes,
            r.migrated_off_node_bytes,
            r.moved_back_bytes
        ),
        (
            Some(880 * PAGE_SIZE),
            Some(10 * PAGE_SIZE),
            Some(870 * PAGE_SIZE)
        )
    );
    // A failed offline counts only the pages seen moving.
    let mut r = region_result();
    record(&mut r, &prepared, &[33], false, Some(&settled));
    assert_eq!(r.migrated_bytes, Some(890 * PAGE_SIZE));
    // Without a settlement, a successful offline still knows what it migrated.
    let mut r = region_result();
    record(&mut r, &prepared, &[33], true, None);
    assert_eq!(
        (r.migrated_bytes, r.migrated_on_node_bytes),
        (Some(1000 * PAGE_SIZE), None)
    );
}

fn node_worker(guest: &SimGuest, node: u32, ledger: &Arc<Mutex<Ledger>>) -> EvacuationWorker {
    let timeouts = Timeouts {
        agent: Duration::from_secs(5),
        unplug: Duration::from_secs(5),
        poll: Duration::from_millis(5),
        reconnect: Duration::from_secs(5),
    };
    let evacuator = RegionEvacuator::new(
        node,
        Arc::new(Arbiter::new(Arc::new(guest.clone()))),
        Arc::new(guest.clone()),
        Arc::new(GuestBlockSize::default()),
        ledger.clone(),
        timeouts,
    );
    let regions = guest.geometry().regions();
    EvacuationWorker::start(node, regions, evacuator).unwrap()
}

fn wait_done(ledger: &Arc<Mutex<Ledger>>, id: u64) -> mempower_api::Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = ledger.lock().unwrap().job(id).unwrap();
        if job.state == JobState::Done {
            return job;
        }
        assert!(Instant::now() < deadline, "{job:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Two nodes of one guest evacuate at once; the guest's migration counter is global, so
/// each job must count only what its own regions held in use.
#[test]
fn concurrent_jobs_on_two_nodes_count_their_own_migrations() {
    let global = Arc::new(AtomicU64::new(0));
    let node0 = SimGuest::new();
    let node1 = SimGuest::new();
    for (node, guest, pages) in [(0, &node0, [5000, 7000]), (1, &node1, [16384, 3000])] {
        let mut st = guest.st();
        st.node = node;
        st.global_migrated = Some(global.clone());
        st.in_use_pages.insert(32, pages[0]);
        st.in_use_pages.insert(33, pages[1]);
    }
    // Node 0's first offlining waits until node 1's job is over: their migrations
    // interleave as concurrent jobs' do.
    let (go, hold) = std::sync::mpsc::channel();
    node0.st().hold = Some((32, hold));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let w0 = node_worker(&node0, 0, &ledger);
    let w1 = node_worker(&node1, 1, &ledger);
    let j0 = ledger
        .lock()
        .unwrap()
        .new_job(0, JobKind::Evacuate, vec![0, 1], None);
    let j1 = ledger
        .lock()
        .unwrap()
        .new_job(1, JobKind::Evacuate, vec![0, 1], None);
    w0.request(&[0, 1]).unwrap();
    w1.request(&[0, 1]).unwrap();
    let job1 = wait_done(&ledger, j1);
    go.send(()).unwrap();
    let job0 = wait_done(&ledger, j0);
    for job in [&job0, &job1] {
        assert!(
            job.results
                .iter()
                .all(|r| r.outcome == RegionOutcome::Released),
            "{job:?}"
        );
    }
    assert_eq!(job0.migrated_bytes, 12_000 * PAGE_SIZE);
    assert_eq!(job1.migrated_bytes, 19_384 * PAGE_SIZE);
    assert_eq!(job1.migrated_on_node_bytes, job1.migrated_bytes);
    assert_eq!(job1.migrated_off_node_bytes, 0);
    // What the global counter saw during node 0's job: both nodes' migrations.
    let both = global.load(Ordering::SeqCst) * PAGE_SIZE;
    assert!(both > job0.migrated_bytes + job1.migrated_bytes);
    for guest in [&node0, &node1] {
        assert_eq!(guest.snapshot().plugged_bytes, 256 * MIB);
    }
}

#[test]
fn a_kernel_without_the_patch_gets_its_pages_moved_back() {
    let guest = SimGuest::new();
    {
        let mut st = guest.st();
        st.offline_leaves_node = true;
        st.in_use_pages.insert(34, 2048);
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let w = node_worker(&guest, 0, &ledger);
    let id = ledger
        .lock()
        .unwrap()
        .new_job(0, JobKind::Evacuate, vec![2], None);
    w.request(&[2]).unwrap();
    let job = wait_done(&ledger, id);
    assert_eq!(job.results[0].outcome, RegionOutcome::Released, "{job:?}");
    assert_eq!(
        (
            job.migrated_bytes,
            job.migrated_on_node_bytes,
            job.moved_back_bytes
        ),
        (2048 * PAGE_SIZE, 2048 * PAGE_SIZE, 2048 * PAGE_SIZE)
    );
}

#[test]
fn a_region_without_room_fails_before_it_is_offlined() {
    let guest = SimGuest::new();
    {
        let mut st = guest.st();
        st.in_use_pages.insert(33, 100 * PAGES_PER_MIB);
        st.rooms = Some(rooms(10, 1000));
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let w = node_worker(&guest, 0, &ledger);
    let id = ledger
        .lock()
        .unwrap()
        .new_job(0, JobKind::Evacuate, vec![1], None);
    w.request(&[1]).unwrap();
    let job = wait_done(&ledger, id);
    let r = &job.results[0];
    assert_eq!(r.outcome, RegionOutcome::Failed);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("node 0 has no room"),
        "{r:?}"
    );
    assert!(!guest.st().calls.iter().any(|c| c.starts_with("Offline")));
    assert_eq!(guest.snapshot().plugged_bytes, 512 * MIB);
    assert!(guest.data_intact(1));
}
