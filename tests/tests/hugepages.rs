//! A node backed by 2 MiB huge pages and bound to host node 0 (`hugepages=on,host-node=0`):
//! the guest boots, its plugged regions hold huge pages on the host, and evacuating one of
//! them gives its pages back to the pool while live data verifies.
//!
//! Inside the nested test host the test reserves the huge pages itself (as root, through
//! `/proc/sys/vm/nr_hugepages`): that is the test host's setup, not the VMM's. Elsewhere the
//! host must have them free already; without them the test reports itself ignored.

use std::time::{Duration, Instant};

use libtest_mimic::{Completion, Failed};
use mempower_api::{RegionOutcome, RegionState};
use mempower_tests::{boot_plugged, is_inside_testhost, print_phase, socket_path, GuestBuilder};

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;
const BOOT_MIB: u64 = 256;
/// Boot memory and two plugged regions, in 2 MiB pages.
const PAGES: u64 = (BOOT_MIB * MIB + 2 * REGION) / (2 * MIB);
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn count(path: &str) -> Result<u64, Failed> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(text.trim().parse().map_err(|e| format!("{path}: {e}"))?)
}

/// The test host's setup: enough free huge pages for the guest. Elsewhere, a host without
/// them cannot run the test: `Ok(Some(why))`.
fn reserve_huge_pages() -> Result<Option<String>, Failed> {
    if is_inside_testhost() && count(FREE)? < PAGES {
        let total = count(NR_HUGEPAGES)? + PAGES;
        std::fs::write(NR_HUGEPAGES, total.to_string())
            .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
    }
    let free = count(FREE)?;
    let short = format!("the host has {free} free 2 MiB huge pages, the test needs {PAGES}");
    match (free >= PAGES, is_inside_testhost()) {
        (true, _) => Ok(None),
        (false, true) => Err(format!("the test host's reservation fell short: {short}").into()),
        (false, false) => Ok(Some(short)),
    }
}

fn huge_page_node_evacuates() -> Result<Completion, Failed> {
    let t0 = Instant::now();
    if let Some(why) = reserve_huge_pages()? {
        return Ok(Completion::ignored_with(why));
    }
    let free_before = count(FREE)?;
    let api_path = socket_path("hugepages", "sock");
    let builder = GuestBuilder::new()
        .node(0, "0", BOOT_MIB)
        .hotplug(0, 2 * REGION / MIB, 2 * REGION / MIB)
        .node_keys(0, ",host-node=0,hugepages=on");
    let (mut guest, api) = boot_plugged(builder, &api_path, t0)?;

    // Every page of the node is a huge page bound to host node 0.
    let maps = std::fs::read_to_string(format!("/proc/{}/numa_maps", guest.pid()))?;
    let node_maps: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("mempower-node0"))
        .collect();
    println!(
        "numa_maps of node 0: {} mappings, e.g. {:?}",
        node_maps.len(),
        node_maps.first()
    );
    assert_eq!(node_maps.len(), 3, "boot memory and two regions");
    for line in &node_maps {
        assert!(
            line.contains(" bind:0 ") && line.contains(" huge "),
            "{line}"
        );
    }
    let taken = free_before - count(FREE)?;
    println!(
        "huge pages taken from the pool: {taken} (boot {}, plugged {})",
        BOOT_MIB / 2,
        2 * REGION / (2 * MIB)
    );
    assert_eq!(taken, PAGES);

    let live = api.fill(0, 64 * MIB, 41)?;
    let regions = api.regions(0)?;
    let target = regions
        .iter()
        .filter(|r| r.state == RegionState::Plugged)
        .max_by_key(|r| r.index)
        .ok_or("no plugged region")?;
    println!(
        "region {}: resident {} bytes before",
        target.index, target.resident_bytes
    );
    assert_eq!(
        target.resident_bytes, REGION,
        "a plugged huge-page region is all resident"
    );
    let node_before = api.node(0)?.resident_bytes;
    let t = Instant::now();
    let job = api.run_job(
        &[
            "evacuate",
            "--node",
            "0",
            "--regions",
            &target.index.to_string(),
        ],
        Duration::from_secs(300),
    )?;
    print_phase("evacuate one huge-page region", t.elapsed());
    assert_eq!(job.results[0].outcome, RegionOutcome::Released, "{job:?}");
    let after = api
        .regions(0)?
        .into_iter()
        .find(|r| r.index == target.index)
        .ok_or("gone")?;
    let node_after = api.node(0)?.resident_bytes;
    println!(
        "region {}: resident {} bytes after; node 0 resident {node_before} -> {node_after}; \
         pool free {}",
        after.index,
        after.resident_bytes,
        count(FREE)?
    );
    assert_eq!(
        (after.state, after.resident_bytes),
        (RegionState::Released, 0)
    );
    assert_eq!(node_before - node_after, REGION);
    assert_eq!(free_before - count(FREE)?, PAGES - REGION / (2 * MIB));
    api.verify(&live)?;
    guest.poweroff_cleanly()?;
    print_phase("huge_page_node_evacuates", t0.elapsed());
    Ok(Completion::Completed)
}

fn main() {
    mempower_tests::main(vec![mempower_tests::ignorable_trial(
        "huge_page_node_evacuates",
        huge_page_node_evacuates,
    )]);
}
