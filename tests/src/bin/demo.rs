//! `mempower-demo`: boots the default two-node VM in the right mode and shows the job
//! mempower does: giving host DRAM back. `./demo.sh` runs it.
//!
//! 1. Boot two NUMA nodes, each with boot memory and a virtio-mem region, and show
//!    what the guest sees.
//! 2. On node 0, the guest agent writes live data and scratch data, then frees the
//!    scratch: that memory is now resident on the host but free in the guest, the
//!    kind no guest gives back by itself.
//! 3. Show node 0's regions: host-resident against guest in-use bytes.
//! 4. Compact node 0: mempower's policy picks the regions that give back the most host
//!    memory for the least migration, the agent offlines them, the VMM shrinks the
//!    node by exactly those blocks.
//! 5. Show the regions again, say how much host DRAM was released, what the peers'
//!    way (lowering the requested size and letting the guest's driver take its
//!    highest blocks, as Firecracker, Cloud Hypervisor and QEMU do) would have
//!    released from the same state, and check every byte of the live data.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_api::{RegionOutcome, RegionState, RegionStatus};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
/// Boot memory of each of the two nodes (one vCPU each).
const BOOT_MIB: u64 = 256;
/// Each node's virtio-mem region, and how much of it the guest plugs at boot (MiB).
const HOTPLUG_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 512;
/// The workload on node 0: data that stays, and scratch data written then freed. Small,
/// because a nested guest writes its memory at a few MiB/s, and the demo should take
/// about a minute warm.
const LIVE_MIB: u64 = 8;
const SCRATCH_MIB: u64 = 56;
/// Host memory the compaction is asked to release: less than the scratch data, so that
/// one region holding most of it is enough.
const COMPACT_MIB: u64 = 32;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn show_regions(title: &str, regions: &[RegionStatus]) {
    println!();
    println!("{title}");
    println!(
        "  {:<7} {:<13} {:<10} {:>12} {:>13} {:>13}",
        "region", "memory block", "state", "plugged MiB", "resident MiB", "in use MiB"
    );
    for r in regions {
        println!(
            "  {:<7} {:<13} {:<10} {:>12} {:>13.1} {:>13}",
            r.index,
            format!("memory{}", r.memory_block),
            r.state,
            r.plugged_bytes / MIB,
            mib(r.resident_bytes),
            r.in_use_bytes
                .map_or("-".to_string(), |b| format!("{:.1}", mib(b)))
        );
    }
}

/// Host memory the peers' way would release by removing `bytes` of guest memory from
/// this state: Linux's virtio-mem driver unplugs offline blocks first (there are none
/// here), then online movable ones from the highest address down, whatever they hold.
/// `mempower-bench` measures that rule on a real guest (see the README).
fn peers_release(regions: &[RegionStatus], bytes: u64) -> u64 {
    let mut left = bytes;
    let mut released = 0;
    for r in regions
        .iter()
        .rev()
        .filter(|r| r.state == RegionState::Plugged)
    {
        if left == 0 {
            break;
        }
        left = left.saturating_sub(r.plugged_bytes);
        released += r.resident_bytes;
    }
    released
}

fn demo() -> DemoResult<()> {
    let t0 = Instant::now();
    let socket = mempower_tests::socket_path("demo", "sock");
    let (mut guest, ready) = GuestBuilder::new()
        .two_nodes(BOOT_MIB, HOTPLUG_MIB, REQUESTED_MIB)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    let plugging = Instant::now();
    let nodes = api.wait_plugged(Duration::from_secs(120))?;
    api.wait_agent(Duration::from_secs(60))?;
    print_phase("guest plugged its hotplug memory", plugging.elapsed());

    println!();
    println!(
        "The guest ({}) sees {} NUMA nodes:",
        ready.kernel,
        ready.nodes.len()
    );
    for (seen, host) in ready.nodes.iter().zip(&nodes) {
        let cpus: Vec<String> = seen.cpus.iter().map(u32::to_string).collect();
        println!(
            "  node {}: cpus {}, {} MiB; mempower serves it a {} MiB virtio-mem region with {} MiB plugged",
            seen.id,
            cpus.join(","),
            seen.mem_total_kib / 1024,
            host.region_size / MIB,
            host.plugged_bytes / MIB
        );
    }

    println!();
    println!(
        "Node 0: the guest agent writes {LIVE_MIB} MiB of live data and {SCRATCH_MIB} MiB of \
         scratch data, then frees the scratch."
    );
    let live = api.fill(0, LIVE_MIB * MIB, 1)?;
    let scratch = api.fill(0, SCRATCH_MIB * MIB, 2)?;
    api.release(scratch.handle)?;
    let before = api.regions(0)?;
    show_regions(
        "Node 0's regions: what they hold on the host (resident) and what the guest uses:",
        &before,
    );
    let resident_before = api.node(0)?.resident_bytes;

    println!();
    println!("mempower compact --node 0 --release {COMPACT_MIB}M");
    let t = Instant::now();
    let job = api.run_job(
        &[
            "compact",
            "--node",
            "0",
            "--release",
            &format!("{COMPACT_MIB}M"),
        ],
        Duration::from_secs(300),
    )?;
    print_phase("compaction", t.elapsed());
    if let Some(error) = &job.error {
        return Err(format!("the compaction failed: {error}").into());
    }
    if let Some(failed) = job
        .results
        .iter()
        .find(|r| r.outcome != RegionOutcome::Released)
    {
        return Err(format!("region {} failed: {:?}", failed.region, failed.reason).into());
    }
    let after = api.regions(0)?;
    show_regions("Node 0's regions after the compaction:", &after);
    let released = resident_before.saturating_sub(api.node(0)?.resident_bytes);
    api.verify(&live)?;

    let chosen: Vec<String> = job.results.iter().map(|r| r.region.to_string()).collect();
    println!();
    println!(
        "mempower released {:.1} MiB of host DRAM by removing {} MiB of guest memory \
         (region {}, migrating {:.1} MiB); shrinking virtio-mem by as much the peers' way \
         (the guest's driver takes its highest blocks) would have released {:.1} MiB from \
         the same state; all {} MiB of live data verified. (Free page reporting, the \
         peers' other way, is compared in `mempower-bench --ways`.)",
        mib(released),
        job.unplugged_bytes / MIB,
        chosen.join(", "),
        mib(job.migrated_bytes),
        mib(peers_release(&before, job.unplugged_bytes)),
        LIVE_MIB
    );
    println!();
    guest.poweroff_cleanly()?;
    print_phase("demo", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    mempower_tests::run_program("mempower-demo", Duration::from_secs(900), demo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(index: u32, state: RegionState, resident_mib: u64) -> RegionStatus {
        RegionStatus {
            index,
            memory_block: 32 + index,
            base: (4 << 30) + u64::from(index) * 128 * MIB,
            size: 128 * MIB,
            state,
            phase: None,
            reason: None,
            plugged_bytes: if state == RegionState::Released {
                0
            } else {
                128 * MIB
            },
            resident_bytes: resident_mib * MIB,
            in_use_bytes: None,
        }
    }

    #[test]
    fn the_peers_way_takes_the_highest_plugged_regions() {
        let regions = [
            region(0, RegionState::Plugged, 100),
            region(1, RegionState::Plugged, 20),
            region(2, RegionState::Plugged, 3),
            region(3, RegionState::Released, 0),
        ];
        assert_eq!(peers_release(&regions, 128 * MIB), 3 * MIB);
        assert_eq!(peers_release(&regions, 256 * MIB), 23 * MIB);
        assert_eq!(peers_release(&regions, 0), 0);
    }
}
