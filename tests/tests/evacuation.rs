//! Evacuation end to end, in one guest with 2 nodes of 4 plugged regions each:
//!
//! 1. data is written on both nodes, some kept (live), some freed (resident but free);
//! 2. a compaction of node 0 releases the bytes asked for from the least-filled regions;
//! 3. two named regions of node 1 are evacuated through the API: both end `released`,
//!    exactly their device blocks are unplugged, their host memory is gone, and every
//!    byte of the live data is intact;
//! 4. a region holding unmovable kernel memory (a kernel-zone block with pinned pipe
//!    buffers) ends `failed` with the kernel's reason, and nothing is lost;
//! 5. a released region is plugged again, and `/metrics` counts what happened.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_protocol::{BlockPages, Request, Response};
use libtest_mimic::{Failed, Trial};
use mempower_api::{
    Job, JobAccepted, JobState, NodeStatus, RegionOutcome, RegionState, RegionStatus,
};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

const MIB: u64 = 1 << 20;
const JOB_WAIT: Duration = Duration::from_secs(300);

/// A fill that stays: its handle and the blocks it landed in.
struct Fill {
    handle: u64,
    bytes: u64,
    blocks: Vec<BlockPages>,
}

fn fill(api: &VmApi, node: u32, mib: u64, seed: u64) -> Result<Fill, Failed> {
    let t = Instant::now();
    match api.agent(&Request::Fill {
        node,
        bytes: mib * MIB,
        seed,
    })? {
        Response::Filled {
            handle,
            bytes,
            blocks,
            ..
        } => {
            print_phase(&format!("fill {mib} MiB on node {node}"), t.elapsed());
            println!("fill {handle}: {blocks:?}");
            Ok(Fill {
                handle,
                bytes,
                blocks,
            })
        }
        other => Err(format!("fill: {other:?}").into()),
    }
}

fn release(api: &VmApi, handle: u64) -> Result<(), Failed> {
    match api.agent(&Request::Release { handle })? {
        Response::Released { .. } => Ok(()),
        other => Err(format!("release: {other:?}").into()),
    }
}

fn verify(api: &VmApi, f: &Fill) -> Result<(), Failed> {
    match api.agent(&Request::Verify { handle: f.handle })? {
        Response::Verified {
            checked_bytes,
            mismatched_bytes,
            ..
        } => {
            println!(
                "verify fill {}: {mismatched_bytes} of {checked_bytes} bytes differ",
                f.handle
            );
            assert_eq!(
                (checked_bytes, mismatched_bytes),
                (f.bytes, 0),
                "fill {}",
                f.handle
            );
            Ok(())
        }
        other => Err(format!("verify: {other:?}").into()),
    }
}

fn block_results(api: &VmApi, request: Request) -> Result<(), Failed> {
    match api.agent(&request)? {
        Response::BlockResults { results } if results.iter().all(|r| r.error.is_none()) => Ok(()),
        other => Err(format!("{request:?}: {other:?}").into()),
    }
}

fn show(node: u32, regions: &[RegionStatus]) {
    for r in regions {
        println!(
            "node {node} region {} (memory{}): {} plugged {} MiB resident {:.1} MiB in use {}{}",
            r.index,
            r.memory_block,
            r.state,
            r.plugged_bytes / MIB,
            r.resident_bytes as f64 / MIB as f64,
            r.in_use_bytes
                .map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / MIB as f64)),
            r.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
}

fn node(api: &VmApi, id: u32) -> Result<NodeStatus, Failed> {
    api.nodes()?
        .into_iter()
        .find(|n| n.id == id)
        .ok_or_else(|| format!("no node {id}").into())
}

fn job(api: &VmApi, args: &[&str]) -> Result<Job, Failed> {
    let t = Instant::now();
    let job = api.run_job(args, JOB_WAIT)?;
    print_phase(&format!("job {} ({})", job.id, args.join(" ")), t.elapsed());
    println!("{}", serde_json::to_string(&job)?);
    Ok(job)
}

fn evacuate_compact_fail() -> Result<(), Failed> {
    let t0 = Instant::now();
    let api_path = PathBuf::from(format!(
        "/tmp/mempower-evac-test-{}.sock",
        std::process::id()
    ));
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(256, 1024, 512)
        .api_socket(&api_path)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&api_path);
    print_phase("agent connected", api.wait_agent(Duration::from_secs(60))?);
    api.wait_plugged(Duration::from_secs(120))?;

    // 1. Live data on both nodes, and data written then freed.
    let live1 = fill(&api, 1, 96, 11)?;
    let freed1 = fill(&api, 1, 192, 12)?;
    release(&api, freed1.handle)?;
    let live0 = fill(&api, 0, 64, 21)?;
    let freed0 = fill(&api, 0, 192, 22)?;
    release(&api, freed0.handle)?;

    // 2. Compaction of node 0: 96 MiB from the least-filled regions.
    let before0 = api.regions(0)?;
    show(0, &before0);
    for r in before0.iter().filter(|r| r.plugged_bytes > 0) {
        assert!(
            r.in_use_bytes.is_some(),
            "the agent reports usage of region {}",
            r.index
        );
    }
    let live_region = before0
        .iter()
        .find(|r| {
            Some(r.memory_block) == live0.blocks.iter().max_by_key(|b| b.pages).map(|b| b.block)
        })
        .map(|r| r.index)
        .ok_or("the live fill of node 0 is not in its hotplug region")?;
    let node0_before = node(&api, 0)?;
    let compacted = job(&api, &["compact", "--node", "0", "--release", "96M"])?;
    assert_eq!(compacted.error, None);
    assert!(!compacted.results.is_empty());
    assert!(
        compacted
            .results
            .iter()
            .all(|r| r.outcome == RegionOutcome::Released),
        "{compacted:?}"
    );
    assert!(
        compacted.released_bytes >= 96 * MIB,
        "released {}",
        compacted.released_bytes
    );
    for c in compacted.plan.iter().filter(|c| c.chosen) {
        let was = &before0[c.region as usize];
        assert!(
            was.resident_bytes > 0,
            "untouched region {} gives nothing",
            c.region
        );
        assert_ne!(
            c.region, live_region,
            "the region with the live data was chosen over free ones"
        );
    }
    let node0_after = node(&api, 0)?;
    println!(
        "node 0: compaction asked 96 MiB, released {:.1} MiB from regions {:?} (live data in region {live_region}); \
         node resident {:.1} -> {:.1} MiB; guest migrated {:.1} MiB",
        compacted.released_bytes as f64 / MIB as f64,
        compacted.regions,
        node0_before.resident_bytes as f64 / MIB as f64,
        node0_after.resident_bytes as f64 / MIB as f64,
        compacted.migrated_bytes as f64 / MIB as f64,
    );
    verify(&api, &live0)?;

    // 3. Evacuate the two regions of node 1 that hold the most host memory.
    let before1 = api.regions(1)?;
    let before0 = api.regions(0)?;
    show(1, &before1);
    let mut by_resident: Vec<&RegionStatus> = before1
        .iter()
        .filter(|r| r.state == RegionState::Plugged)
        .collect();
    by_resident.sort_by_key(|r| std::cmp::Reverse(r.resident_bytes));
    let named: Vec<u32> = by_resident.iter().take(2).map(|r| r.index).collect();
    let held: u64 = by_resident.iter().take(2).map(|r| r.resident_bytes).sum();
    let node1_before = node(&api, 1)?;
    let list = named
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Follow the job through the region list: the phases show, and the guest's usage
    // is still reported (queries use their own agent connection, not the workers').
    let t = Instant::now();
    let accepted: JobAccepted = api.json(&["evacuate", "--node", "1", "--regions", &list])?;
    let mut seen = Vec::new();
    let evacuated = loop {
        let listed = api.regions(1)?;
        for r in listed.iter().filter(|r| r.state == RegionState::Evacuating) {
            let phase = r.phase;
            let others_usage = listed
                .iter()
                .filter(|o| o.state == RegionState::Plugged && !named.contains(&o.index))
                .all(|o| o.in_use_bytes.is_some());
            if !seen.iter().any(|(i, p, _)| *i == r.index && *p == phase) {
                seen.push((r.index, phase, others_usage));
            }
        }
        let j: Job = api.json(&["jobs", "--job", &accepted.job.to_string()])?;
        if j.state == JobState::Done {
            break j;
        }
        if t.elapsed() > JOB_WAIT {
            return Err(format!("job {} not done: {j:?}", j.id).into());
        }
    };
    print_phase(
        &format!("job {} (evacuate regions {list} of node 1)", evacuated.id),
        t.elapsed(),
    );
    println!("{}", serde_json::to_string(&evacuated)?);
    println!("seen while it ran (region, phase, usage of the other regions known): {seen:?}");
    assert!(
        seen.iter().any(|(_, p, _)| p.is_some()),
        "the region list showed no phase during a {} ms job",
        evacuated.elapsed_ms
    );
    assert!(
        seen.iter().all(|(_, _, known)| *known),
        "usage is reported while workers run"
    );
    assert_eq!(evacuated.results.len(), 2);
    for r in &evacuated.results {
        assert_eq!(r.outcome, RegionOutcome::Released, "{r:?}");
        assert_eq!(r.unplugged_bytes, 128 * MIB, "{r:?}");
        assert_eq!(r.warning, None, "the guest unplugged only the region");
    }
    let after1 = api.regions(1)?;
    show(1, &after1);
    for (b, a) in before1.iter().zip(&after1) {
        if named.contains(&b.index) {
            assert_eq!(
                (a.state, a.plugged_bytes, a.resident_bytes),
                (RegionState::Released, 0, 0),
                "region {}",
                a.index
            );
        } else {
            assert_eq!(
                (a.state, a.plugged_bytes),
                (b.state, b.plugged_bytes),
                "region {}",
                a.index
            );
        }
    }
    let after0 = api.regions(0)?;
    for (b, a) in before0.iter().zip(&after0) {
        assert_eq!(
            (a.state, a.plugged_bytes),
            (b.state, b.plugged_bytes),
            "node 0 region {}",
            a.index
        );
    }
    let node1_after = node(&api, 1)?;
    let dropped = node1_before
        .resident_bytes
        .saturating_sub(node1_after.resident_bytes);
    let migrated = evacuated.migrated_bytes;
    println!(
        "node 1: regions {named:?} held {:.1} MiB; node resident fell {:.1} MiB ({:.1}%); \
         released {:.1} MiB; guest migrated {:.1} MiB",
        held as f64 / MIB as f64,
        dropped as f64 / MIB as f64,
        100.0 * dropped as f64 / held as f64,
        evacuated.released_bytes as f64 / MIB as f64,
        migrated as f64 / MIB as f64,
    );
    assert_eq!(
        evacuated.released_bytes, held,
        "all the regions held was released"
    );
    // The live pages stay on node 1: they may land in memory the host had not
    // allocated yet, so the node's resident bytes fall by at least what the regions held
    // less what was migrated.
    assert!(
        (dropped + migrated) * 100 >= held * 99,
        "node 1 resident fell {dropped} bytes, the regions held {held} (migrated {migrated})"
    );
    assert_eq!(
        node1_after.requested_bytes,
        node1_before.requested_bytes - 256 * MIB
    );
    verify(&api, &live1)?;
    verify(&api, &live0)?;

    // 4. A region that cannot be emptied: a kernel-zone block with pinned pages.
    let plugged: Vec<RegionStatus> = api
        .regions(1)?
        .into_iter()
        .filter(|r| r.state == RegionState::Plugged)
        .collect();
    let victim = plugged
        .last()
        .ok_or("node 1 has no plugged region left")?
        .clone();
    let block = victim.memory_block;
    block_results(
        &api,
        Request::Offline {
            blocks: vec![block],
        },
    )?;
    block_results(
        &api,
        Request::Online {
            blocks: vec![block],
            movable: false,
        },
    )?;
    let used = |api: &VmApi| -> Result<u64, Failed> {
        match api.agent(&Request::BlockUsage {
            blocks: vec![block],
        })? {
            Response::BlockUsage { usage } => Ok(usage[0].pages - usage[0].free_pages),
            other => Err(format!("block_usage: {other:?}").into()),
        }
    };
    let used_before = used(&api)?;
    let pin = match api.agent(&Request::Pin {
        node: 1,
        bytes: 8 * MIB,
    })? {
        Response::Pinned { handle, .. } => handle,
        other => return Err(format!("pin: {other:?}").into()),
    };
    // The allocator prefers the node's DMA32 boot memory to stealing movable
    // pageblocks of the new kernel-zone block, so only part of the pin lands there;
    // one unmovable page is enough to make offlining fail.
    let used_after = used(&api)?;
    println!("memory{block}: {used_before} pages in use before the pin, {used_after} after");
    assert!(
        used_after > used_before,
        "part of the pin is in memory{block}"
    );
    let node1_before = node(&api, 1)?;
    let failed = job(
        &api,
        &[
            "evacuate",
            "--node",
            "1",
            "--regions",
            &victim.index.to_string(),
        ],
    )?;
    let r = &failed.results[0];
    assert_eq!(r.outcome, RegionOutcome::Failed, "{r:?}");
    let reason = r.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&format!("memory{block}")) && reason.contains("errno 16"),
        "{reason}"
    );
    let listed = api
        .regions(1)?
        .into_iter()
        .find(|x| x.index == victim.index)
        .unwrap();
    assert_eq!(listed.state, RegionState::Failed);
    assert_eq!(listed.plugged_bytes, 128 * MIB, "nothing unplugged");
    assert!(
        listed.resident_bytes >= victim.resident_bytes.min(8 * MIB),
        "nothing discarded"
    );
    let node1_after = node(&api, 1)?;
    assert_eq!(
        (node1_after.requested_bytes, node1_after.plugged_bytes),
        (node1_before.requested_bytes, node1_before.plugged_bytes)
    );
    verify(&api, &live1)?;
    verify(&api, &live0)?;
    release(&api, pin)?;
    assert!(
        matches!(api.agent(&Request::Hello)?, Response::Hello { .. }),
        "the VM is healthy"
    );

    // 5. Plug the lowest released region of node 1 again.
    let released: Vec<u32> = api
        .regions(1)?
        .iter()
        .filter(|r| r.state == RegionState::Released && r.index < 4)
        .map(|r| r.index)
        .collect();
    let again = *released.first().ok_or("no released region")?;
    api.cli(&["plug", "--node", "1", "--region", &again.to_string()])?;
    api.wait_plugged(Duration::from_secs(120))?;
    let replugged = api.regions(1)?;
    show(1, &replugged);
    assert_eq!(
        replugged[again as usize].state,
        RegionState::Plugged,
        "Linux reuses the lowest removed block"
    );
    let metrics = api.cli(&["metrics"])?;
    for line in [
        "mempower_evacuations_total{node=\"1\",result=\"released\"} 2",
        "mempower_evacuations_total{node=\"1\",result=\"failed\"} 1",
        "mempower_agent_connected 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    guest.poweroff_cleanly()?;
    print_phase("evacuate_compact_fail", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main(vec![Trial::test(
        "evacuate_compact_fail",
        evacuate_compact_fail,
    )]);
}
