use std::time::{Duration, Instant};

use mempower_api::{JobState, RegionOutcome, RegionQuery};

use super::*;
use crate::evacuation::test_guest::{SimGuest, DATA, MIB};

fn service(guest: &SimGuest, with_agent: bool) -> Evacuations {
    let memory: Arc<dyn NodeMemory> = Arc::new(guest.clone());
    let agent = with_agent.then(|| {
        let agent: Arc<dyn AgentCall> = Arc::new(guest.clone());
        EvacuationAgents {
            workers: vec![agent.clone()],
            queries: agent,
        }
    });
    let timeouts = Timeouts {
        agent: Duration::from_secs(1),
        unplug: Duration::from_millis(500),
        poll: Duration::from_millis(5),
        reconnect: Duration::from_millis(500),
    };
    // Node 0 has the simulated region, node 1 none.
    Evacuations::start(vec![Some(memory), None], agent, timeouts).unwrap()
}

fn wait(s: &Evacuations, id: u64) -> Job {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let job = s.job(id).unwrap();
        if job.state == JobState::Done {
            return job;
        }
        assert!(Instant::now() < deadline, "{job:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn requests_are_checked_before_anything_is_queued() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    use EvacuationError as E;
    assert!(matches!(s.evacuate(7, &[0], false), Err(E::NoSuchNode(7))));
    assert!(matches!(
        s.evacuate(1, &[0], false),
        Err(E::NoHotplugRegion(1))
    ));
    let e = s.evacuate(0, &[1, 4], false).unwrap_err();
    assert!(
        matches!(
            e,
            E::NoSuchRegion {
                node: 0,
                region: 4,
                regions: 4
            }
        ),
        "{e}"
    );
    assert!(matches!(s.evacuate(0, &[], false), Err(E::NoRegions)));
    // A list longer than the node's 4 regions is refused whole, duplicates or not.
    for given in [5, 10_000] {
        let e = s.evacuate(0, &vec![0; given], false).unwrap_err();
        assert!(
            matches!(e, E::TooManyRegions { node: 0, given: g, regions: 4 } if g == given),
            "{e}"
        );
    }
    assert!(s.jobs().is_empty(), "nothing was queued");
    assert!(matches!(s.job(1), Err(E::NoSuchJob(1))));
    let no_agent = service(&guest, false);
    assert!(matches!(
        no_agent.evacuate(0, &[0], false),
        Err(E::AgentUnavailable(0))
    ));
    assert!(matches!(
        no_agent.compact(0, MIB, false),
        Err(E::AgentUnavailable(0))
    ));
}

#[test]
fn an_evacuation_job_releases_its_regions_once() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    let id = s.evacuate(0, &[2, 1, 2], false).unwrap();
    let job = wait(&s, id);
    assert_eq!(
        job.regions,
        [2, 1],
        "a region named twice is evacuated once"
    );
    assert!(job
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
    assert_eq!(job.unplugged_bytes, 256 * MIB);
    assert!(job.released_bytes >= 2 * MIB);
    let regions = s
        .regions(0, &RegionQuery::default(), Resident::Exact)
        .unwrap();
    let states: Vec<RegionState> = regions.iter().map(|r| r.state).collect();
    use RegionState::{Plugged, Released};
    assert_eq!(states, [Plugged, Released, Released, Plugged]);
    assert_eq!(s.counters(0).released_regions, 2);
    // Plugging region 1 again; a plugged region is a conflict.
    assert!(matches!(
        s.plug(0, 0),
        Err(EvacuationError::AlreadyPlugged { node: 0, region: 0 })
    ));
    assert!(matches!(
        s.plug(0, 9),
        Err(EvacuationError::NoSuchRegion { region: 9, .. })
    ));
    s.plug(0, 1).unwrap();
    assert_eq!(guest.snapshot().requested_bytes, 384 * MIB);
    assert_eq!(guest.snapshot().plugged_bytes, 384 * MIB);
}

#[test]
fn a_failed_region_is_listed_as_failed_with_the_kernel_reason() {
    let guest = SimGuest::new();
    guest.st().unmovable.insert(35);
    let s = service(&guest, true);
    let job = wait(&s, s.evacuate(0, &[3], false).unwrap());
    assert_eq!(job.results[0].outcome, RegionOutcome::Failed);
    let regions = s
        .regions(0, &RegionQuery::default(), Resident::Exact)
        .unwrap();
    assert_eq!(regions[3].state, RegionState::Failed);
    assert!(regions[3].reason.as_deref().unwrap().contains("errno 16"));
    assert!(guest.data_intact(3));
}

#[test]
fn compaction_takes_resident_but_free_regions_first() {
    let guest = SimGuest::new();
    // Region 0 (memory32) is full, regions 1 and 2 hold 4 MiB each but the guest uses
    // 1 MiB of region 2's only; region 3 has 4 MiB written too, and 8 MiB more: the best
    // gain.
    guest.write(3, 4);
    {
        let mut st = guest.st();
        st.in_use_pages.insert(32, 32768);
        st.in_use_pages.insert(34, 256);
    }
    let big = vec![4u8; 8 * MIB as usize];
    vm_memory::Bytes::write_slice(
        &guest.ram.memory,
        &big,
        vm_memory::GuestAddress(crate::evacuation::test_guest::BASE + 3 * 128 * MIB + DATA),
    )
    .unwrap();
    let s = service(&guest, true);
    let job = wait(&s, s.compact(0, 9 * MIB, false).unwrap());
    assert_eq!(job.error, None);
    assert_eq!(job.regions, [3], "12 MiB resident and unused");
    let ranked: Vec<u32> = job.plan.iter().map(|c| c.region).collect();
    assert_eq!(ranked, [3, 1, 2, 0]);
    let job = wait(&s, s.compact(0, 6 * MIB, false).unwrap());
    assert_eq!(
        job.regions,
        [1, 2],
        "4 MiB free, then 4 MiB of which 1 MiB in use"
    );
    assert!(job
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
    // Only region 0 is left, and the guest can't offline it: compaction fails it.
    guest.st().unmovable.insert(32);
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert_eq!(job.results[0].outcome, RegionOutcome::Failed);
    assert!(guest.data_intact(0));
}

#[test]
fn compaction_with_nothing_resident_says_so() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    let first = wait(&s, s.evacuate(0, &[0, 1, 2, 3], false).unwrap());
    assert!(first
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert!(job.error.unwrap().contains("nothing to release"));
    assert!(job.results.is_empty());
}

#[test]
fn regions_being_evacuated_or_queued_cannot_be_plugged() {
    let guest = SimGuest::new();
    let (go, hold) = std::sync::mpsc::channel();
    guest.st().hold = Some((32, hold)); // region 0's offlining waits
    let s = service(&guest, true);
    let id = s.evacuate(0, &[0, 1], false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        s.plug(0, 0),
        Err(EvacuationError::Evacuating {
            phase: EvacuationPhase::Offlining,
            ..
        })
    ) {
        assert!(Instant::now() < deadline, "region 0 never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        s.plug(0, 1),
        Err(EvacuationError::AlreadyQueued { node: 0, region: 1 })
    ));
    go.send(()).unwrap();
    let job = wait(&s, id);
    assert!(job
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
}

#[test]
fn two_compactions_at_once_plan_one_after_the_other_on_different_regions() {
    let guest = SimGuest::new();
    let (go, hold) = std::sync::mpsc::channel();
    guest.st().hold_usage = Some(hold); // the first compaction's planning waits
    let s = service(&guest, true);
    let first = s.compact(0, DATA, false).unwrap();
    // The first takes the node's turn, then asks for the block usage and waits there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.st().hold_usage.is_some() {
        assert!(
            Instant::now() < deadline,
            "the first compaction never planned"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = s.compact(0, DATA, false).unwrap();
    assert_eq!(s.job(second).unwrap().state, JobState::Planning);
    go.send(()).unwrap();
    let (first, second) = (wait(&s, first), wait(&s, second));
    assert_eq!((first.regions.len(), second.regions.len()), (1, 1));
    assert_ne!(first.regions, second.regions, "never the same region twice");
    assert!(
        !second.plan.iter().any(|c| c.region == first.regions[0]),
        "the second planned without the first's region: {:?}",
        second.plan
    );
    for job in [&first, &second] {
        assert_eq!(job.results.len(), 1);
        assert_eq!(job.results[0].outcome, RegionOutcome::Released);
        assert!(job.released_bytes >= DATA);
    }
    assert_eq!(s.counters(0).released_regions, 2);
}

#[test]
fn a_compaction_whose_planning_fails_or_panics_ends_with_an_error() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    guest.st().agent_down = Some(crate::agent::AgentCallError::Timeout(Duration::from_secs(
        1,
    )));
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert_eq!(
        job.error.as_deref(),
        Some("compaction needs the guest's block usage: the guest agent did not answer within 1s")
    );
    guest.st().agent_down = None;
    guest.st().agent_panics = true;
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert_eq!(
        job.error.as_deref(),
        Some("the compaction's planning stopped unexpectedly")
    );
    assert!(job.results.is_empty());
    // The node's next compaction is not stuck behind the one that panicked.
    guest.st().agent_panics = false;
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert_eq!(job.error, None);
}

#[test]
fn region_lists_filter_and_page() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    wait(&s, s.evacuate(0, &[1, 3], false).unwrap());
    let list = |query: &str| -> Vec<u32> {
        let q = RegionQuery::parse(query).unwrap();
        s.regions(0, &q, Resident::Exact)
            .unwrap()
            .iter()
            .map(|r| r.index)
            .collect()
    };
    assert_eq!(list(""), [0, 1, 2, 3]);
    assert_eq!(list("state=plugged"), [0, 2]);
    assert_eq!(list("state=released&offset=1"), [3]);
    assert_eq!(list("offset=1&limit=2"), [1, 2]);
    assert_eq!(list("state=failed"), Vec::<u32>::new());
    let plugged = s
        .regions(
            0,
            &RegionQuery::parse("state=plugged").unwrap(),
            Resident::Exact,
        )
        .unwrap();
    assert!(plugged.iter().all(|r| r.resident_bytes >= DATA));
    let mut with_usage = plugged.clone();
    guest.st().in_use_pages.insert(34, 256);
    s.add_usage(0, &mut with_usage);
    assert_eq!(
        with_usage
            .iter()
            .map(|r| r.in_use_bytes)
            .collect::<Vec<_>>(),
        [Some(0), Some(MIB)]
    );
}

#[test]
fn regions_smaller_than_the_guests_blocks_are_refused_everywhere() {
    let guest = SimGuest::new();
    guest.st().block_size = 2 << 30;
    let s = service(&guest, true);
    let why = "region size 128 MiB is smaller than the guest's memory block size 2 GiB";
    // Before the agent said so, nothing is known...
    assert!(s
        .regions(0, &RegionQuery::default(), Resident::Exact)
        .unwrap()[0]
        .reason
        .is_none());
    // ...once it has, the region list and every evacuation say it.
    s.learn_block_size();
    let regions = s
        .regions(0, &RegionQuery::default(), Resident::Exact)
        .unwrap();
    assert!(
        regions.iter().all(|r| r.reason.as_deref() == Some(why)),
        "{regions:?}"
    );
    let e = s.evacuate(0, &[1], false).unwrap_err();
    assert!(matches!(e, EvacuationError::Geometry(_)));
    assert_eq!(e.to_string(), why);
    assert!(s.jobs().is_empty());
    let job = wait(&s, s.compact(0, MIB, false).unwrap());
    assert_eq!(job.error.as_deref(), Some(why));
}

#[test]
fn resizes_go_through_the_arbiter() {
    let guest = SimGuest::new();
    let s = service(&guest, true);
    s.resize(0, 256 * MIB).unwrap();
    assert_eq!(guest.snapshot().requested_bytes, 256 * MIB);
    let e = s.resize(0, 3 * MIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "requested size 0x300000 is not a multiple of the block size 0x200000"
    );
    assert!(matches!(
        s.resize(1, 0),
        Err(EvacuationError::NoHotplugRegion(1))
    ));
    // A plug raises the user's target, not the device's momentary size.
    s.plug(0, 3).unwrap();
    assert_eq!(guest.snapshot().requested_bytes, 384 * MIB);
}

#[test]
fn a_node_without_room_is_said_so_before_anything_is_evacuated() {
    let guest = SimGuest::new();
    {
        let mut st = guest.st();
        // Regions 0 and 1 hold 60 MiB in use each; node 0 has 100 MiB of room, the
        // other node plenty.
        st.in_use_pages.insert(32, 60 * 256);
        st.in_use_pages.insert(33, 60 * 256);
        st.rooms = Some(vec![
            agent_protocol::NodeRoom {
                node: 0,
                free_pages: 100 * 256,
            },
            agent_protocol::NodeRoom {
                node: 1,
                free_pages: 1000 * 256,
            },
        ]);
    }
    let s = service(&guest, true);
    let job = wait(&s, s.evacuate(0, &[0, 1], false).unwrap());
    let error = job.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("node 0 has no room for the 120.0 MiB in use in memory32, memory33"),
        "{error}"
    );
    assert!(job.results.is_empty() && !job.allow_other_nodes);
    assert!(!guest.st().calls.iter().any(|c| c.starts_with("Offline")));
    assert!(
        guest.st().tracks.is_empty(),
        "the check's track was released"
    );
    // A compaction that would choose them says the same.
    guest
        .st()
        .in_use_pages
        .extend([(34, 60 * 256), (35, 60 * 256)]);
    let job = wait(&s, s.compact(0, 200 * MIB, false).unwrap());
    assert!(job.error.unwrap().contains("has no room"));
    assert!(job.results.is_empty());
    // One region fits.
    let job = wait(&s, s.evacuate(0, &[1], false).unwrap());
    assert_eq!(job.results[0].outcome, RegionOutcome::Released, "{job:?}");
    // Allowed to go to other nodes, two more that do not fit together go.
    let job = wait(&s, s.evacuate(0, &[0, 2], true).unwrap());
    assert!(job.allow_other_nodes);
    assert!(job
        .results
        .iter()
        .all(|r| r.outcome == RegionOutcome::Released));
    assert_eq!(job.migrated_bytes, 120 * MIB);
}

/// The figures readers on the event loop get are as last measured; a read that finds
/// them stale has them measured again in the background, and gets the old ones.
#[test]
fn stale_resident_figures_are_refreshed_off_the_reader() {
    let guest = SimGuest::with_regions(2, 128 * MIB);
    let s = service(&guest, false);
    let (total, age) = s.resident_bytes(0).unwrap();
    assert_eq!(total, 0, "measured at start: nothing written");
    assert!(age.unwrap() < crate::evacuation::resident::REFRESH_AFTER);
    guest.write(1, 7);
    let cached = || {
        s.regions(0, &RegionQuery::default(), Resident::Cached)
            .unwrap()[1]
            .resident_bytes
    };
    assert_eq!(
        (s.resident_bytes(0).unwrap().0, cached()),
        (0, 0),
        "fresh: kept"
    );
    let exact = s
        .regions(0, &RegionQuery::default(), Resident::Exact)
        .unwrap();
    assert_eq!(exact[1].resident_bytes, DATA, "the listing measures");
    std::thread::sleep(crate::evacuation::resident::REFRESH_AFTER);
    assert_eq!(
        s.resident_bytes(0).unwrap().0,
        0,
        "stale: answered as it is"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.resident_bytes(0).unwrap().0 != DATA {
        assert!(Instant::now() < deadline, "never refreshed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cached(), DATA);
    assert_eq!(s.refreshes.threads(), 1);
}
