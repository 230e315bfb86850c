//! Boots a guest whose two NUMA nodes each have a virtio-mem region, and checks that the
//! host can shrink one node's memory, that the guest unplugs it on that node only, that
//! the host gets the memory back, and that growing plugs again.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use mempower_api::NodeStatus;
use mempower_tests::{print_phase, socket_path, Guest, GuestBuilder, VmApi};

const MIB: u64 = 1 << 20;
const BOOT_MIB: u64 = 256;
const REGION_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 512;
const SHRINK_MIB: u64 = 256;
/// Enough to fill node 1's free memory, so that all of its plugged blocks are host-resident.
const TOUCH_MIB: u64 = 640;
const WAIT: Duration = Duration::from_secs(240);

fn resize(api: &VmApi, node: u32, mib: u64) -> Result<(), Failed> {
    let (node, size) = (node.to_string(), format!("{mib}M"));
    api.cli(&["resize", "--node", &node, "--size", &size])?;
    Ok(())
}

/// Waits until every node has plugged what is requested of it; prints how long it took.
fn wait_plugged(api: &VmApi, what: &str) -> Result<Vec<NodeStatus>, Failed> {
    let start = Instant::now();
    let nodes = api.wait_plugged(WAIT).map_err(|e| format!("{what}: {e}"))?;
    print_phase(what, start.elapsed());
    Ok(nodes)
}

fn vmm_rss(guest: &Guest) -> Result<u64, Failed> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", guest.pid()))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

fn mem_total_kib(guest: &mut Guest) -> Result<[u64; 2], Failed> {
    let ready = guest.ready_now(Duration::from_secs(60))?;
    match ready.nodes.as_slice() {
        [a, b] => Ok([a.mem_total_kib, b.mem_total_kib]),
        other => Err(format!("expected 2 nodes, the guest reports {other:?}").into()),
    }
}

fn shrink_and_grow_node_1() -> Result<(), Failed> {
    let t0 = Instant::now();
    let socket = socket_path("virtio-mem", "sock");
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(BOOT_MIB, REGION_MIB, REQUESTED_MIB)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);

    // At boot the guest plugs what was requested on each node.
    let plugged = wait_plugged(&api, "guest plugged the requested memory")?;
    let ids: Vec<u32> = plugged.iter().map(|n| n.id).collect();
    assert_eq!(ids, [0, 1]);
    for n in &plugged {
        assert_eq!(
            (n.region_size, n.plugged_bytes),
            (REGION_MIB * MIB, REQUESTED_MIB * MIB),
            "{n:?}"
        );
    }
    let before = mem_total_kib(&mut guest)?;
    // Boot memory less the kernel's reservations (node 0: the kernel image and memmap;
    // node 1: the 64 MiB swiotlb bounce buffer, placed below 4 GiB because memory exists
    // above it) plus the whole plugged amount.
    for (node, overhead_mib) in [(0, 48), (1, 96)] {
        let floor = (BOOT_MIB - overhead_mib + REQUESTED_MIB) * 1024;
        if before[node] < floor {
            return Err(format!(
                "node {node} MemTotal {} KiB < {floor} KiB: plugged memory missing",
                before[node]
            )
            .into());
        }
    }

    // Make node 1's plugged memory host-resident but free in the guest.
    let t = Instant::now();
    guest.ask(&format!("touch 1 {TOUCH_MIB}"), "MEMPOWER-TOUCHED", WAIT)?;
    print_phase(
        &format!("guest touched and freed {TOUCH_MIB} MiB on node 1"),
        t.elapsed(),
    );
    let resident_before = api.node(1)?.resident_bytes;
    let rss_before = vmm_rss(&guest)?;
    println!(
        "node 1 region resident: {} MiB; VMM RSS {} MiB",
        resident_before / MIB,
        rss_before / MIB
    );
    if resident_before < REQUESTED_MIB * MIB * 95 / 100 {
        return Err(format!(
            "touching did not make node 1's blocks resident: {resident_before} bytes"
        )
        .into());
    }

    // Shrink node 1: the guest unplugs on node 1 only, and the host gets the memory back.
    let t = Instant::now();
    resize(&api, 1, REQUESTED_MIB - SHRINK_MIB)?;
    let after = wait_plugged(&api, "guest unplugged 256 MiB of node 1")?;
    let took = t.elapsed();
    assert_eq!(
        after[0].plugged_bytes,
        REQUESTED_MIB * MIB,
        "node 0 must keep its memory"
    );
    assert_eq!(
        after[1].plugged_bytes,
        (REQUESTED_MIB - SHRINK_MIB) * MIB,
        "device bitmap"
    );
    let released = resident_before.saturating_sub(after[1].resident_bytes);
    let rss_after = vmm_rss(&guest)?;
    let rss_released = rss_before.saturating_sub(rss_after);
    println!(
        "released: region {} MiB, VMM RSS {} MiB ({} -> {} MiB), for {} MiB unplugged in {:.1} s",
        released / MIB,
        rss_released / MIB,
        rss_before / MIB,
        rss_after / MIB,
        SHRINK_MIB,
        took.as_secs_f64()
    );
    // The blocks that stay plugged hold at most their size, so the unplugged blocks held at
    // least `resident_before - kept` host-resident bytes (the touch made that ~254 MiB of
    // 256 MiB): 99% of it must come back, in the memfd and in the VMM's RSS.
    let kept = (REQUESTED_MIB - SHRINK_MIB) * MIB;
    let unplugged_resident = resident_before.saturating_sub(kept);
    if unplugged_resident < SHRINK_MIB * MIB * 9 / 10 {
        return Err(
            format!("only {unplugged_resident} resident bytes can have been unplugged").into(),
        );
    }
    let floor = unplugged_resident * 99 / 100;
    if released < floor || rss_released < floor {
        return Err(format!(
            "host released {released} bytes (RSS {rss_released}), expected at least {floor}"
        )
        .into());
    }
    // The region view agrees with the node view: same bitmap, same memfd.
    let regions = api.regions(1)?;
    let region_plugged: u64 = regions.iter().map(|r| r.plugged_bytes).sum();
    assert_eq!(
        (regions.len(), region_plugged),
        (8, after[1].plugged_bytes),
        "{regions:?}"
    );
    let shrunk = mem_total_kib(&mut guest)?;
    assert_eq!(shrunk[0], before[0], "node 0 MemTotal must not change");
    assert_eq!(
        before[1] - shrunk[1],
        SHRINK_MIB * 1024,
        "node 1 MemTotal falls by what was unplugged"
    );

    // Grow again: the guest plugs again.
    resize(&api, 1, REQUESTED_MIB)?;
    let regrown = wait_plugged(&api, "guest plugged node 1 again")?;
    assert_eq!(regrown[1].plugged_bytes, REQUESTED_MIB * MIB);
    assert_eq!(
        mem_total_kib(&mut guest)?,
        before,
        "MemTotal back to where it was"
    );

    guest.poweroff_cleanly()?;
    print_phase("shrink_and_grow_node_1", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main(vec![mempower_tests::trial(
        "shrink_and_grow_node_1",
        shrink_and_grow_node_1,
    )]);
}
