//! `mempower-bench`: host DRAM given back by mempower's compaction against the peers'
//! way (lower requested_size, let the guest's driver choose), in one guest.
//!
//! Both nodes get the same fragmented workload in their hotplug memory: data that stays
//! (live), data written then freed (resident on the host, free in the guest), and
//! untouched memory. Then the same amount of guest memory is removed twice:
//!
//! * (b) the peers' way, on node 1: its requested size is lowered by N MiB (the first
//!   argument, default 256);
//! * (a) mempower's way, on node 0: `compact` asks for N - 16 MiB, which its policy takes
//!   from N / 128 regions if that many hold host memory (it never takes untouched ones).
//!
//! (b) runs first: Linux's offlining migrates pages to other nodes first, so (a)'s
//! migrations land on node 1 and must not change what (b) finds there. For each way the
//! bench prints the host memory released (the node's memfd data), the guest memory
//! removed (plugged bytes), the bytes the guest migrated (pgmigrate_success x 4096) and
//! the wall time, then the ratios.
//!
//! `mempower-bench --batch` measures batched passes and parallel nodes instead (see
//! `bench/batch.rs`); `mempower-bench --ways` runs the four-way comparison (see
//! `bench/ways.rs`): the peers' resize, free page reporting, compaction, and both, on
//! three workloads; `mempower-bench --scale [MIB,...]` how compaction's cost grows with
//! the work (see `bench/scale.rs`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_tests::{print_phase, GuestBuilder, VmApi};

/// The bench's other measurements, in `bench/`.
mod bench {
    pub mod batch;
    pub mod scale;
    pub mod ways;
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
const HOTPLUG_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 768;
/// Guest memory each way removes, unless given as the first argument (MiB, a multiple
/// of 128, at most 768).
const DEFAULT_REMOVE_MIB: u64 = 256;

/// What to remove, and what compaction is asked for: a little less than the removal,
/// since a region's resident bytes are never quite 128 MiB.
fn amounts() -> BenchResult<(u64, u64)> {
    let remove = match std::env::args().nth(1) {
        None => DEFAULT_REMOVE_MIB,
        Some(a) => a
            .parse::<u64>()
            .ok()
            .filter(|m| *m > 0 && m % 128 == 0 && *m <= REQUESTED_MIB)
            .ok_or_else(|| {
                format!("{a:?}: give MiB to remove, a multiple of 128 up to {REQUESTED_MIB}")
            })?,
    };
    Ok((remove, remove - 16))
}
/// Per node, in order: (MiB, kept?). Freed fills leave resident-but-free memory
/// between live data; the top regions stay untouched.
const WORKLOAD: [(u64, bool); 4] = [(64, true), (128, false), (64, true), (128, false)];

struct Outcome {
    released: u64,
    removed: u64,
    migrated: u64,
    wall: Duration,
}

fn workload(api: &VmApi, node: u32) -> BenchResult<()> {
    let mut freed = Vec::new();
    for (i, (mib, keep)) in WORKLOAD.iter().enumerate() {
        let fill = api.fill(node, mib * MIB, u64::from(node) * 100 + i as u64)?;
        if !keep {
            freed.push(fill.handle);
        }
    }
    for handle in freed {
        api.release(handle)?;
    }
    Ok(())
}

fn show_regions(api: &VmApi, node: u32) -> BenchResult<()> {
    for r in api.regions(node)? {
        println!(
            "  node {node} region {} (memory{}): {:<9} resident {:>6.1} MiB, guest in use {}",
            r.index,
            r.memory_block,
            r.state,
            r.resident_bytes as f64 / MIB as f64,
            r.in_use_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / MIB as f64))
        );
    }
    Ok(())
}

/// Runs `shrink` and measures what it did to `node_id`.
fn measure(
    api: &VmApi,
    node_id: u32,
    shrink: impl FnOnce() -> BenchResult<()>,
) -> BenchResult<Outcome> {
    let before = api.node(node_id)?;
    let migrated_before = api.vmstat("pgmigrate_success")?;
    let t = Instant::now();
    shrink()?;
    let wall = t.elapsed();
    let after = api.node(node_id)?;
    Ok(Outcome {
        released: before.resident_bytes.saturating_sub(after.resident_bytes),
        removed: before.plugged_bytes.saturating_sub(after.plugged_bytes),
        migrated: (api.vmstat("pgmigrate_success")? - migrated_before) * 4096,
        wall,
    })
}

/// (b): lower node 1's requested size by `remove_mib` and let the guest choose.
fn peers_way(api: &VmApi, remove_mib: u64) -> BenchResult<Outcome> {
    let requested = api.node(1)?.requested_bytes;
    measure(api, 1, || {
        let size = format!("{}M", requested / MIB - remove_mib);
        api.cli(&["resize", "--node", "1", "--size", &size])?;
        api.wait_plugged(Duration::from_secs(600))?;
        Ok(())
    })
}

/// (a): compaction of node 0.
fn mempower_way(api: &VmApi, compact_mib: u64) -> BenchResult<Outcome> {
    measure(api, 0, || {
        let release = format!("{compact_mib}M");
        let job = api.run_job(
            &["compact", "--node", "0", "--release", &release],
            Duration::from_secs(900),
        )?;
        println!(
            "  compaction job: regions {:?}, plan {:?}",
            job.regions, job.plan
        );
        if let Some(e) = &job.error {
            return Err(format!("compaction failed: {e}").into());
        }
        for r in &job.results {
            println!(
                "  region {} (memory{}): {:?} {}",
                r.region,
                r.memory_block,
                r.outcome,
                r.reason.clone().unwrap_or_default()
            );
        }
        Ok(())
    })
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "n/a".into()
    } else {
        format!("{:.2}", a as f64 / b as f64)
    }
}

fn bench() -> BenchResult<()> {
    let (remove_mib, compact_mib) = amounts()?;
    let t0 = Instant::now();
    let socket = mempower_tests::socket_path("bench", "sock");
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(256, HOTPLUG_MIB, REQUESTED_MIB)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(120))?;
    for n in [0, 1] {
        workload(&api, n)?;
    }
    println!("workload in place:");
    show_regions(&api, 0)?;
    show_regions(&api, 1)?;

    println!("(b) the peers' way, node 1: requested size lowered by {remove_mib} MiB");
    let b = peers_way(&api, remove_mib)?;
    println!("(a) mempower's way, node 0: compact --release {compact_mib}M");
    let a = mempower_way(&api, compact_mib)?;
    println!("after:");
    show_regions(&api, 0)?;
    show_regions(&api, 1)?;
    guest.poweroff_cleanly()?;

    println!();
    println!(
        "{:<34} {:>14} {:>14} {:>14} {:>10}",
        "", "host released", "guest removed", "guest migrated", "wall time"
    );
    for (name, o) in [
        ("(a) mempower compaction, node 0", &a),
        ("(b) peers' way (resize), node 1", &b),
    ] {
        println!(
            "{name:<34} {:>14} {:>14} {:>14} {:>8.1} s",
            mib(o.released),
            mib(o.removed),
            mib(o.migrated),
            o.wall.as_secs_f64()
        );
    }
    println!();
    println!(
        "release efficiency (host released / guest removed): (a) {}  (b) {}",
        ratio(a.released, a.removed),
        ratio(b.released, b.removed)
    );
    println!(
        "migrated bytes per released byte:                   (a) {}  (b) {}",
        ratio(a.migrated, a.released),
        ratio(b.migrated, b.released)
    );
    println!(
        "host released, (a) / (b):                           {}",
        ratio(a.released, b.released)
    );
    if a.removed != b.removed {
        println!(
            "note: (a) removed {} and (b) {}: compare the efficiencies, not the totals",
            mib(a.removed),
            mib(b.removed)
        );
    }
    print_phase("bench", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--batch") => {
            let limit = Duration::from_secs(2400);
            return mempower_tests::run_program("mempower-bench --batch", limit, bench::batch::run);
        }
        Some("--ways") => {
            // Four fresh guests and twelve workloads: about 30 minutes nested.
            let limit = Duration::from_secs(3600);
            return mempower_tests::run_program("mempower-bench --ways", limit, bench::ways::bench);
        }
        _ => {}
    }
    if std::env::args().nth(1).as_deref() == Some("--scale") {
        let memory = match bench::scale::sizes() {
            Ok(sizes) => bench::scale::testhost_mib(&sizes),
            Err(e) => {
                eprintln!("mempower-bench: {e}");
                return ExitCode::from(2);
            }
        };
        let limit = Duration::from_secs(7200);
        return mempower_tests::run_program_with_memory(
            "mempower-bench --scale",
            limit,
            Some(memory),
            bench::scale::run,
        );
    }
    mempower_tests::run_program("mempower-bench", Duration::from_secs(1800), bench)
}
