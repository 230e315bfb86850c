//! `mempower-locality-bench`: what keeping evacuated data on its NUMA node costs, for
//! each way of doing it, measured in real guests (issue 10).
//!
//! Node 1 of a two-node guest gets half-live regions: fills of 64 MiB kept (live)
//! alternate with fills of 64 MiB written then freed. Then the two memory blocks of
//! node 1 holding the most live data are offlined (what evacuating a region does to the
//! guest), in one of these ways:
//!
//! * **stock**: plain offlining of an upstream kernel (`memory_hotplug.offline_node_local=0`
//!   on the patched kernel's command line gives upstream's behaviour): pages go to node 0;
//! * **move back**: the same, then the agent moves every page it found mapped in the
//!   blocks beforehand back to node 1 (`track` / `settle` with move_pages(2));
//! * **compact first**: node 1's zones are compacted (`/sys/devices/system/node/node1/compact`)
//!   before plain offlining, which moves what is still in the blocks to node 0;
//! * **patched**: offlining with the mempower guest kernel patch, which migrates to the
//!   block's own node first.
//!
//! For each: the bytes the guest migrated (`pgmigrate_success` x 4 KiB, nothing else runs),
//! the wall time, how much of the live data is still on node 1, and whether every byte
//! of it verifies. Two guests boot: one with upstream's behaviour, one with the patch's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_protocol::{BlockUsage, Request, Response, SettledBlock};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Live and freed fills per round, MiB, and rounds: 4 x (64 + 64) on node 1.
const FILL_MIB: u64 = 64;
const ROUNDS: u64 = 4;
/// Blocks offlined per run.
const TARGETS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Stock,
    MoveBack,
    CompactFirst,
    Patched,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Stock => "stock offlining",
            Way::MoveBack => "stock + move back",
            Way::CompactFirst => "compact, then stock",
            Way::Patched => "patched offlining",
        }
    }
}

struct Row {
    way: Way,
    /// In-use bytes of the target blocks before anything ran.
    in_use: u64,
    migrated: u64,
    wall: Duration,
    /// Of the live fill bytes: on node 1 before, and after.
    live: u64,
    live_on_node_after: u64,
    settled: Vec<SettledBlock>,
    note: String,
}

fn fill(api: &VmApi, bytes: u64, seed: u64) -> BenchResult<u64> {
    Ok(api.fill(1, bytes, seed)?.handle)
}

/// Pages of a fill: (on node 1, everywhere).
fn locate(api: &VmApi, handle: u64) -> BenchResult<(u64, u64)> {
    let blocks = api.locate(handle)?;
    let on1 = blocks
        .iter()
        .filter(|b| b.node == Some(1))
        .map(|b| b.pages)
        .sum();
    Ok((on1, blocks.iter().map(|b| b.pages).sum()))
}

fn verify(api: &VmApi, handle: u64) -> BenchResult<()> {
    let (checked, bad) = api.verify_counts(handle)?;
    if bad != 0 {
        return Err(format!("fill {handle}: {bad} of {checked} bytes differ").into());
    }
    Ok(())
}

fn usage(api: &VmApi, blocks: Vec<u32>) -> BenchResult<Vec<BlockUsage>> {
    api.expect(&Request::BlockUsage { blocks }, |r| match r {
        Response::BlockUsage { usage } => Some(usage),
        _ => None,
    })
}

fn set_state(api: &VmApi, request: Request) -> BenchResult<()> {
    let results = api.expect(&request, |r| match r {
        Response::BlockResults { results } => Some(results),
        _ => None,
    })?;
    match results.iter().find(|r| r.error.is_some()) {
        Some(bad) => Err(format!("{request:?}: memory{} {:?}", bad.block, bad.error).into()),
        None => Ok(()),
    }
}

fn show_node1(api: &VmApi, title: &str) -> BenchResult<()> {
    let all = usage(api, Vec::new())?;
    let line: Vec<String> = all
        .iter()
        .filter(|u| u.node == Some(1))
        .map(|u| format!("memory{} {:.0}", u.block, used(u) as f64 / MIB as f64))
        .collect();
    println!("  {title}: node 1 in use (MiB): {}", line.join(", "));
    Ok(())
}

fn used(u: &BlockUsage) -> u64 {
    u.pages.saturating_sub(u.free_pages) * PAGE
}

fn pgmigrate(api: &VmApi) -> BenchResult<u64> {
    Ok(api.vmstat("pgmigrate_success")? * PAGE)
}

/// Fills node 1 with half-live regions; returns the live fills' handles.
fn workload(api: &VmApi, seed: u64) -> BenchResult<Vec<u64>> {
    let t = Instant::now();
    let mut live = Vec::new();
    let mut freed = Vec::new();
    for round in 0..ROUNDS {
        live.push(fill(api, FILL_MIB * MIB, seed + 2 * round)?);
        freed.push(fill(api, FILL_MIB * MIB, seed + 2 * round + 1)?);
    }
    for handle in freed {
        api.release(handle)?;
    }
    print_phase("workload on node 1", t.elapsed());
    Ok(live)
}

/// Node 1's hotplug blocks (zone Movable) holding the most in use, most first.
fn targets(api: &VmApi) -> BenchResult<Vec<BlockUsage>> {
    let blocks = api.expect(&Request::Inventory, |r| match r {
        Response::Inventory { blocks, .. } => Some(blocks),
        _ => None,
    })?;
    let movable: Vec<u32> = blocks
        .iter()
        .filter(|b| b.node == Some(1) && b.online && b.zone == "Movable")
        .map(|b| b.id)
        .collect();
    let mut all = usage(api, movable)?;
    all.sort_by_key(|u| std::cmp::Reverse(used(u)));
    all.truncate(TARGETS);
    Ok(all)
}

fn track(api: &VmApi, blocks: &[u32]) -> BenchResult<(u64, bool)> {
    api.expect(
        &Request::Track {
            blocks: blocks.to_vec(),
        },
        |r| match r {
            Response::Tracked {
                token,
                node_local_offline,
                ..
            } => Some((token, node_local_offline)),
            _ => None,
        },
    )
}

fn settle(api: &VmApi, token: u64, move_back: bool) -> BenchResult<Vec<SettledBlock>> {
    api.expect(&Request::Settle { token, move_back }, |r| match r {
        Response::Settled { blocks, .. } => Some(blocks),
        _ => None,
    })
}

fn run(api: &VmApi, way: Way, seed: u64) -> BenchResult<Row> {
    println!("== {}", way.name());
    let live = workload(api, seed)?;
    let mut live_before = 0;
    for &h in &live {
        live_before += locate(api, h)?.1;
    }
    show_node1(api, "before")?;
    let targets = targets(api)?;
    let blocks: Vec<u32> = targets.iter().map(|u| u.block).collect();
    let in_use: u64 = targets.iter().map(used).sum();
    println!(
        "  offlining {blocks:?}, {:.1} MiB in use",
        in_use as f64 / MIB as f64
    );
    let mut note = String::new();
    let migrated_before = pgmigrate(api)?;
    let t = Instant::now();
    if way == Way::CompactFirst {
        let tc = Instant::now();
        api.expect(&Request::CompactNode { node: 1 }, |r| {
            matches!(r, Response::NodeCompacted { .. }).then_some(())
        })?;
        let left: u64 = usage(api, blocks.clone())?.iter().map(used).sum();
        note = format!(
            "compaction {:.1} s, {:.1} MiB migrated, left {:.1} MiB in the blocks",
            tc.elapsed().as_secs_f64(),
            (pgmigrate(api)? - migrated_before) as f64 / MIB as f64,
            left as f64 / MIB as f64
        );
        show_node1(api, "after compaction")?;
    }
    let (token, node_local) = track(api, &blocks)?;
    let expected_local = way == Way::Patched;
    if node_local != expected_local {
        return Err(format!("the guest says node_local_offline={node_local} for {way:?}").into());
    }
    let to = Instant::now();
    set_state(
        api,
        Request::Offline {
            blocks: blocks.clone(),
        },
    )?;
    let offline_time = to.elapsed();
    let ts = Instant::now();
    let settled = settle(api, token, way == Way::MoveBack)?;
    let wall = t.elapsed();
    if way == Way::MoveBack {
        note = format!(
            "offline {:.1} s, move back {:.1} s",
            offline_time.as_secs_f64(),
            ts.elapsed().as_secs_f64()
        );
    }
    let migrated = pgmigrate(api)? - migrated_before;
    let mut live_after = 0;
    for &h in &live {
        live_after += locate(api, h)?.0;
        verify(api, h)?;
    }
    show_node1(api, "after")?;
    // Put everything back for the next way.
    set_state(
        api,
        Request::Online {
            blocks,
            movable: true,
        },
    )?;
    for h in live {
        api.release(h)?;
    }
    Ok(Row {
        way,
        in_use,
        migrated,
        wall,
        live: live_before * PAGE,
        live_on_node_after: live_after * PAGE,
        settled,
        note,
    })
}

fn guest(cmdline: &str, ways: &[Way], rows: &mut Vec<Row>) -> BenchResult<()> {
    let t0 = Instant::now();
    let socket = PathBuf::from(format!(
        "/tmp/mempower-locality-{}-{}.sock",
        std::process::id(),
        rows.len()
    ));
    let mut builder = GuestBuilder::new()
        .two_nodes(256, 1024, 512)
        .api_socket(&socket);
    if !cmdline.is_empty() {
        builder = builder.cmdline(cmdline);
    }
    let (mut guest, _) = builder.boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(120))?;
    for (i, &way) in ways.iter().enumerate() {
        rows.push(run(&api, way, 1000 * (rows.len() as u64 + 1) + i as u64)?);
    }
    guest.poweroff_cleanly()?;
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn bench() -> BenchResult<()> {
    let t0 = Instant::now();
    let mut rows = Vec::new();
    guest(
        "memory_hotplug.offline_node_local=0",
        &[Way::Stock, Way::MoveBack, Way::CompactFirst],
        &mut rows,
    )?;
    guest("", &[Way::Patched], &mut rows)?;
    println!();
    println!(
        "{:<22} {:>12} {:>14} {:>9} {:>12} {:>14}  details",
        "way", "in use", "migrated", "time", "live", "live on node 1"
    );
    for r in &rows {
        let pct = 100.0 * r.live_on_node_after as f64 / r.live.max(1) as f64;
        println!(
            "{:<22} {:>12} {:>14} {:>7.1} s {:>12} {:>8} {:>4.0}%  {}",
            r.way.name(),
            mib(r.in_use),
            mib(r.migrated),
            r.wall.as_secs_f64(),
            mib(r.live),
            mib(r.live_on_node_after),
            pct,
            r.note
        );
        for s in &r.settled {
            println!(
                "{:<22} memory{}: tracked {}, on node {} (moved back {}), off node {}, unmoved {}, gone {}",
                "",
                s.block,
                mib(s.tracked_pages * PAGE),
                mib(s.on_node_pages * PAGE),
                mib(s.moved_back_pages * PAGE),
                mib(s.off_node_pages * PAGE),
                mib(s.unmoved_pages * PAGE),
                mib(s.gone_pages * PAGE)
            );
        }
    }
    print_phase("bench", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    mempower_tests::run_program("mempower-locality-bench", Duration::from_secs(3600), bench)
}
