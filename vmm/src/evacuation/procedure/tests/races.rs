//! Users and evacuations changing a node's requested size at the same time: the
//! arbiter's semantics, through the worker.

use super::*;
use crate::evacuation::ledger::RegionMark;

/// Starts the worker on `regions` and answers the job and the worker.
fn start(r: Rig, regions: &[u32]) -> (u64, Arc<Mutex<Ledger>>, EvacuationWorker) {
    let ledger = r.ledger.clone();
    let worker = EvacuationWorker::start(0, 4, r.evacuator).unwrap();
    let job = {
        let mut l = ledger.lock().unwrap();
        worker.request(regions).unwrap();
        l.new_job(0, JobKind::Evacuate, regions.to_vec(), None)
    };
    (job, ledger, worker)
}

fn wait_phase(ledger: &Mutex<Ledger>, region: u32, phase: mempower_api::EvacuationPhase) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ledger.lock().unwrap().mark(0, region) != Some(&RegionMark::Evacuating(phase)) {
        assert!(
            std::time::Instant::now() < deadline,
            "region {region} never got to {phase}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_resize_during_the_unplug_wait_is_kept_and_the_region_still_goes() {
    let guest = SimGuest::new();
    guest.st().driver_stuck = true;
    let r = rig(&guest);
    let arbiter = r.arbiter.clone();
    let (job, ledger, _worker) = start(r, &[3]);
    wait_phase(&ledger, 3, mempower_api::EvacuationPhase::Unplugging);
    // The user lowers the node to 256 MiB while the guest has not unplugged yet.
    assert_eq!(arbiter.set_target(256 * MIB).unwrap(), 128 * MIB);
    guest.st().driver_stuck = false;
    guest.drive();
    let done = wait_job(&ledger, job);
    assert_eq!(done.results[0].outcome, RegionOutcome::Released, "{done:?}");
    assert_eq!(
        arbiter.target(),
        128 * MIB,
        "the user's 256 MiB less the region"
    );
    assert_eq!(guest.snapshot().requested_bytes, 128 * MIB);
    assert_eq!(plugged_regions(&guest)[3], 0);
    assert!(guest.data_intact(0));
}

#[test]
fn a_plug_during_offlining_and_the_evacuation_both_happen() {
    let guest = SimGuest::new();
    let r = rig(&guest);
    // Region 3 was released earlier.
    assert_eq!(
        r.evacuator.evacuate_region(3).outcome,
        RegionOutcome::Released
    );
    let (go, hold) = std::sync::mpsc::channel();
    guest.st().hold = Some((33, hold)); // region 1's offlining waits
    let arbiter = r.arbiter.clone();
    let (job, ledger, _worker) = start(r, &[1]);
    wait_phase(&ledger, 1, mempower_api::EvacuationPhase::Offlining);
    // The user plugs region 3 again (what `plug` asks of the arbiter).
    assert_eq!(arbiter.raise_target(128 * MIB).unwrap(), 512 * MIB);
    assert_eq!(plugged_regions(&guest), [64; 4]);
    go.send(()).unwrap();
    let done = wait_job(&ledger, job);
    assert_eq!(done.results[0].outcome, RegionOutcome::Released, "{done:?}");
    assert_eq!(plugged_regions(&guest), [64, 0, 64, 64], "both happened");
    assert_eq!(arbiter.target(), 384 * MIB);
    assert!(guest.data_intact(0) && guest.data_intact(2));
}

#[test]
fn an_evacuation_failing_after_a_user_resize_keeps_the_users_value() {
    let guest = SimGuest::new();
    guest.st().driver_stuck = true;
    let r = rig(&guest);
    let arbiter = r.arbiter.clone();
    let (job, ledger, _worker) = start(r, &[2]);
    wait_phase(&ledger, 2, mempower_api::EvacuationPhase::Unplugging);
    arbiter.set_target(384 * MIB).unwrap();
    let done = wait_job(&ledger, job);
    let reason = done.results[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("requested size restored to 402653184 bytes"),
        "{reason}"
    );
    assert_eq!(
        guest.snapshot().requested_bytes,
        384 * MIB,
        "not the old 512 MiB"
    );
    assert_eq!(arbiter.target(), 384 * MIB);
    assert!(guest.st().offline.is_empty());
}
