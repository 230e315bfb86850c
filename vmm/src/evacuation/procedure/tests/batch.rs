//! Passes of several regions, regions of several memory blocks, and nodes of 8192
//! regions.

use super::*;
use crate::evacuation::test_guest::DATA;

fn batch(guest: &SimGuest, regions: &[u32]) -> RegionSet {
    RegionSet::of(guest.geometry().regions(), regions).unwrap()
}

fn run(e: &RegionEvacuator, batch: &RegionSet) -> Vec<RegionResult> {
    let mut results = Vec::new();
    e.evacuate_batch(batch, &mut |r| results.push(r));
    results.sort_by_key(|r| r.region);
    results
}

fn lowerings(guest: &SimGuest) -> Vec<u64> {
    guest.st().requested.clone()
}

#[test]
fn a_pass_lowers_the_requested_size_once_for_all_its_regions() {
    let guest = SimGuest::new();
    let r = rig(&guest);
    guest.st().requested.clear();
    // What each region holds in use (the agent's `track`) is what it migrates.
    guest
        .st()
        .in_use_pages
        .extend([(32, 256), (33, 256), (35, 256)]);
    let results = run(&r.evacuator, &batch(&guest, &[0, 1, 3]));
    assert!(
        results.iter().all(|x| x.outcome == RegionOutcome::Released),
        "{results:?}"
    );
    assert_eq!(
        results
            .iter()
            .map(|x| x.unplugged_bytes)
            .collect::<Vec<_>>(),
        [128 * MIB; 3]
    );
    assert!(results.iter().all(|x| x.released_bytes >= DATA));
    assert!(results.iter().all(|x| x.migrated_bytes == Some(256 * 4096)));
    assert_eq!(
        lowerings(&guest),
        [128 * MIB, 128 * MIB],
        "one claim of 384 MiB, then the settled target"
    );
    assert_eq!(plugged_regions(&guest), [0, 0, 64, 0]);
    assert_eq!(r.arbiter.target(), 128 * MIB);
    assert!(guest.data_intact(2));
    let offlines = guest
        .st()
        .calls
        .iter()
        .filter(|c| c.starts_with("Offline"))
        .count();
    assert_eq!(offlines, 3, "each region's blocks offlined by its own call");
}

#[test]
fn a_region_whose_offline_fails_drops_out_and_the_others_go_on() {
    let guest = SimGuest::new();
    guest.st().unmovable.insert(33);
    let r = rig(&guest);
    guest.st().requested.clear();
    let results = run(&r.evacuator, &batch(&guest, &[0, 1, 2]));
    let outcomes: Vec<_> = results.iter().map(|x| x.outcome).collect();
    use RegionOutcome::{Failed, Released};
    assert_eq!(outcomes, [Released, Failed, Released]);
    assert!(results[1].reason.as_deref().unwrap().contains("memory33"));
    assert_eq!(lowerings(&guest), [256 * MIB, 256 * MIB]);
    assert_eq!(plugged_regions(&guest), [0, 64, 0, 64]);
    assert!(guest.data_intact(1) && guest.data_intact(3));
    assert!(
        !guest.st().offline.contains(&33),
        "the failed block stayed online"
    );
}

#[test]
fn a_pass_the_guest_does_not_unplug_gives_back_its_claim_and_blocks() {
    let guest = SimGuest::new();
    guest.st().driver_stuck = true;
    let r = rig(&guest);
    let results = run(&r.evacuator, &batch(&guest, &[1, 2]));
    for x in &results {
        let reason = x.reason.as_deref().unwrap();
        assert_eq!(x.outcome, RegionOutcome::Failed);
        assert!(
            reason.contains("requested size restored to 536870912 bytes"),
            "{reason}"
        );
        assert!(reason.ends_with("memory block put back online"), "{reason}");
        assert_eq!(x.unplugged_bytes, 0);
    }
    assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
    assert_eq!(r.arbiter.target(), 512 * MIB);
    assert!(guest.st().offline.is_empty());
    assert!(guest.data_intact(1) && guest.data_intact(2));
}

#[test]
fn regions_of_several_memory_blocks_offline_them_all() {
    // Two 512 MiB regions of four 128 MiB blocks each: memory32-35 and memory36-39.
    let guest = SimGuest::with_regions(2, 512 * MIB);
    let r = rig(&guest);
    let results = run(&r.evacuator, &batch(&guest, &[1]));
    assert_eq!(results[0].outcome, RegionOutcome::Released, "{results:?}");
    assert_eq!(
        (results[0].memory_block, results[0].unplugged_bytes),
        (36, 512 * MIB)
    );
    assert!(guest
        .st()
        .calls
        .iter()
        .any(|c| c == "Offline { blocks: [36, 37, 38, 39] }"));
    assert_eq!(guest.plugged_regions(), [256, 0]);
}

#[test]
fn a_block_that_cannot_go_offline_brings_the_others_back_online() {
    let guest = SimGuest::with_regions(2, 512 * MIB);
    guest.st().unmovable.insert(38);
    let r = rig(&guest);
    let results = run(&r.evacuator, &batch(&guest, &[1]));
    let reason = results[0].reason.as_deref().unwrap();
    assert_eq!(
        reason,
        "offlining memory38 failed: Device or resource busy (errno 16); 3 memory blocks put \
         back online"
    );
    assert!(guest.st().offline.is_empty());
    assert_eq!(guest.plugged_regions(), [256, 256], "nothing discarded");
    assert_eq!(
        guest.snapshot().requested_bytes,
        1024 * MIB,
        "never lowered"
    );
}

#[test]
fn only_the_blocks_the_guest_has_are_offlined() {
    // Region 1's last 128 MiB block was unplugged before: the guest removed memory39.
    let guest = SimGuest::with_regions(2, 512 * MIB);
    let r = rig(&guest);
    r.arbiter.set_target(1024 * MIB - 128 * MIB).unwrap();
    assert_eq!(guest.plugged_regions(), [256, 192]);
    let results = run(&r.evacuator, &batch(&guest, &[1]));
    assert_eq!(results[0].outcome, RegionOutcome::Released, "{results:?}");
    assert_eq!(results[0].unplugged_bytes, 384 * MIB);
    assert!(guest
        .st()
        .calls
        .iter()
        .any(|c| c == "Offline { blocks: [36, 37, 38] }"));
}

#[test]
fn the_guests_block_size_decides_the_blocks_and_may_refuse_the_regions() {
    // 1 GiB regions, 256 MiB guest blocks: region 1 is memory20-23 (4 GiB / 256 MiB).
    let guest = SimGuest::with_regions(2, 1024 * MIB);
    guest.st().block_size = 256 * MIB;
    let r = rig(&guest);
    let results = run(&r.evacuator, &batch(&guest, &[1]));
    assert_eq!(results[0].outcome, RegionOutcome::Released, "{results:?}");
    assert_eq!(results[0].memory_block, 20);
    assert!(guest
        .st()
        .calls
        .iter()
        .any(|c| c == "Offline { blocks: [20, 21, 22, 23] }"));
    // 128 MiB regions in a guest of 2 GiB blocks: every region says why not.
    let guest = SimGuest::new();
    guest.st().block_size = 2048 * MIB;
    let r = rig(&guest);
    let results = run(&r.evacuator, &batch(&guest, &[0, 3]));
    for x in &results {
        assert_eq!(
            x.reason.as_deref(),
            Some("region size 128 MiB is smaller than the guest's memory block size 2 GiB")
        );
    }
    assert!(!guest.st().calls.iter().any(|c| c.starts_with("Offline")));
    assert_eq!(guest.plugged_regions(), [64; 4]);
}

#[test]
fn a_pass_that_panics_fails_its_regions_and_gives_back_what_it_took() {
    let guest = SimGuest::new();
    guest.st().agent_panics = true;
    let r = rig(&guest);
    let worker = EvacuationWorker::start(0, 4, r.evacuator).unwrap();
    let job = {
        let mut l = r.ledger.lock().unwrap();
        worker.request(&[1, 2]).unwrap();
        l.new_job(0, JobKind::Evacuate, vec![1, 2], None)
    };
    let done = wait_job(&r.ledger, job);
    for x in &done.results {
        assert_eq!(x.outcome, RegionOutcome::Failed);
        let reason = x.reason.as_deref().unwrap();
        assert!(
            reason.starts_with("the evacuation stopped unexpectedly: "),
            "{reason}"
        );
    }
    assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
    assert!(guest.data_intact(1));
}

/// A node of 1 TiB in 128 MiB regions: its highest and lowest regions, and others, in
/// one pass.
#[test]
fn a_pass_over_a_node_of_8192_regions() {
    let guest = SimGuest::with_regions(8192, 128 * MIB);
    guest.write(8191, 7);
    let r = rig(&guest);
    let wanted = [0, 1, 4095, 8190, 8191];
    let t = std::time::Instant::now();
    let results = run(&r.evacuator, &batch(&guest, &wanted));
    let took = t.elapsed();
    assert!(
        results.iter().all(|x| x.outcome == RegionOutcome::Released),
        "{results:?}"
    );
    assert_eq!(results[4].memory_block, 32 + 8191);
    assert!(results[4].released_bytes >= DATA);
    let plugged = guest.plugged_regions();
    assert_eq!(plugged.iter().filter(|p| **p == 0).count(), wanted.len());
    assert_eq!(r.arbiter.target(), (8192 - 5) * 128 * MIB);
    assert_eq!(guest.snapshot().plugged_bytes, (8192 - 5) * 128 * MIB);
    assert!(took < Duration::from_secs(10), "{took:?}");
}
