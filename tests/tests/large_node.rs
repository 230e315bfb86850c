//! A large node: node 1 has a 64 GiB hotplug region (512 regions of 128 MiB) of which
//! the guest plugs 2 GiB.
//!
//! 1. Host memory stays sparse: the node's memfd holds only what the guest touched,
//!    and the VMM's resident set is far below the guest's plugged memory.
//! 2. The region list names all 512 regions, 16 of them plugged; its `state` filter and
//!    paging agree with the full list.
//! 3. Live data is written on node 1; the lowest and the highest plugged regions (one
//!    of them holding the live data) are evacuated in one job: both end `released`,
//!    the node's host memory drops by what they held, and every byte of the data
//!    verifies.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use mempower_api::{RegionOutcome, RegionState, RegionStatus};
use mempower_tests::{pages_in, print_phase, socket_path, GuestBuilder, VmApi};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const HOTPLUG: u64 = 64 * GIB;
const PLUGGED: u64 = 2 * GIB;
const REGION: u64 = 128 * MIB;
const LIVE: u64 = 64 * MIB;
/// Host memory the guest may touch in node 1's hotplug region before any fill: what
/// onlining writes there (the guest's memory map lives in boot memory), with room.
const UNTOUCHED_SLACK: u64 = 32 * MIB;
/// The nested test host: the guest's 1 GiB of boot memory, what it touches of the
/// hotplug region and the test host's own needs. The 64 GiB are never backed.
const TESTHOST_MIB: u64 = 4096;

/// The VMM's resident set (`VmRSS` of /proc/PID/status), bytes.
fn vmm_rss(pid: u32) -> Result<u64, Failed> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS in the VMM's status")?;
    Ok(kib * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// 2. The list of a 512-region node, filtered and paged.
fn check_region_list(api: &VmApi) -> Result<Vec<RegionStatus>, Failed> {
    let all = api.regions(1)?;
    assert_eq!(all.len() as u64, HOTPLUG / REGION, "every region is listed");
    let plugged: Vec<RegionStatus> = api.json(&["regions", "--node", "1", "--state", "plugged"])?;
    assert_eq!(plugged.len() as u64, PLUGGED / REGION, "{plugged:?}");
    let expected: Vec<&RegionStatus> = all
        .iter()
        .filter(|r| r.state == RegionState::Plugged)
        .collect();
    assert_eq!(
        plugged.iter().map(|r| r.index).collect::<Vec<_>>(),
        expected.iter().map(|r| r.index).collect::<Vec<_>>()
    );
    let unplugged = all
        .iter()
        .filter(|r| r.plugged_bytes == 0 && r.resident_bytes == 0)
        .count();
    assert_eq!(unplugged as u64, (HOTPLUG - PLUGGED) / REGION);
    let page: Vec<RegionStatus> =
        api.json(&["regions", "--node", "1", "--offset", "500", "--limit", "8"])?;
    assert_eq!(
        page.iter().map(|r| r.index).collect::<Vec<_>>(),
        (500..508).collect::<Vec<_>>()
    );
    println!(
        "node 1: {} regions listed, plugged: {:?}",
        all.len(),
        plugged.iter().map(|r| r.index).collect::<Vec<_>>()
    );
    Ok(plugged)
}

fn large_node() -> Result<(), Failed> {
    let t0 = Instant::now();
    let socket = socket_path("large-node", "sock");
    let (mut guest, _) = GuestBuilder::new()
        .node(0, "0", 512)
        .node(1, "1", 512)
        .hotplug(1, HOTPLUG / MIB, PLUGGED / MIB)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(300))?;
    print_phase("2 GiB plugged", t0.elapsed());

    // 1. Sparse.
    let node = api.node(1)?;
    assert_eq!((node.region_size, node.plugged_bytes), (HOTPLUG, PLUGGED));
    let rss = vmm_rss(guest.pid())?;
    println!(
        "node 1: {} of hotplug memory, {} plugged, {} resident on the host; VMM resident set {}",
        mib(node.region_size),
        mib(node.plugged_bytes),
        mib(node.resident_bytes),
        mib(rss)
    );
    assert!(
        node.resident_bytes <= UNTOUCHED_SLACK,
        "node 1's untouched plugged memory holds {} of host memory",
        mib(node.resident_bytes)
    );
    // Boot memory (1 GiB) is the most the guest can have touched; the plugged 2 GiB
    // and the 62 GiB beyond are not backed.
    assert!(rss < GIB + 256 * MIB, "the VMM holds {}", mib(rss));

    // 2. The list.
    let plugged = check_region_list(&api)?;
    let (lowest, highest) = match (plugged.first(), plugged.last()) {
        (Some(l), Some(h)) => (l.clone(), h.clone()),
        _ => return Err("node 1 has no plugged region".into()),
    };

    // 3. Live data, then the lowest and highest plugged regions in one job.
    let live = api.fill(1, LIVE, 71)?;
    let after_fill = api.node(1)?;
    println!(
        "node 1 after a {} fill: {} resident",
        mib(LIVE),
        mib(after_fill.resident_bytes)
    );
    assert!(
        after_fill.resident_bytes <= LIVE + UNTOUCHED_SLACK,
        "only what the guest touched is resident: {}",
        mib(after_fill.resident_bytes)
    );
    let in_named: u64 = [&lowest, &highest]
        .iter()
        .map(|r| pages_in(&live.blocks, r.memory_block))
        .sum();
    assert!(
        in_named > 0,
        "the live data is in neither region {} (memory{}) nor {} (memory{}): {:?}",
        lowest.index,
        lowest.memory_block,
        highest.index,
        highest.memory_block,
        live.blocks
    );
    let regions = api.regions(1)?;
    let held: u64 = [lowest.index, highest.index]
        .iter()
        .map(|&i| regions[i as usize].resident_bytes)
        .sum();
    let list = format!("{},{}", lowest.index, highest.index);
    let t = Instant::now();
    let job = api.run_job(
        &["evacuate", "--node", "1", "--regions", &list],
        Duration::from_secs(300),
    )?;
    print_phase(&format!("evacuate regions {list} of node 1"), t.elapsed());
    println!("{}", serde_json::to_string(&job)?);
    assert_eq!(job.error, None);
    assert_eq!(job.results.len(), 2, "{job:?}");
    for r in &job.results {
        assert_eq!(r.outcome, RegionOutcome::Released, "{r:?}");
        assert_eq!(r.unplugged_bytes, REGION, "{r:?}");
    }
    // The guest may touch a few more pages there between the listing and the job.
    assert!(
        job.released_bytes >= held && job.released_bytes <= 2 * REGION,
        "released {} of the {} the two regions held",
        mib(job.released_bytes),
        mib(held)
    );
    let after = api.node(1)?;
    assert_eq!(after.plugged_bytes, PLUGGED - 2 * REGION);
    let listed = api.regions(1)?;
    for i in [lowest.index, highest.index] {
        let r = &listed[i as usize];
        assert_eq!(
            (r.state, r.plugged_bytes, r.resident_bytes),
            (RegionState::Released, 0, 0),
            "region {i}"
        );
    }
    println!(
        "node 1: regions {list} held {} ({} pages of live data there); released {}, \
         guest migrated {}; node resident {} -> {}",
        mib(held),
        in_named,
        mib(job.released_bytes),
        mib(job.migrated_bytes),
        mib(after_fill.resident_bytes),
        mib(after.resident_bytes)
    );
    api.verify(&live)?;
    guest.poweroff_cleanly()?;
    print_phase("large_node", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main_with_memory(
        vec![mempower_tests::trial("large_node", large_node)],
        Some(TESTHOST_MIB),
    );
}
