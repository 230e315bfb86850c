//! `mempower-bench --ways`: four ways of giving host DRAM back, three workloads each.
//!
//! Every way gets a fresh guest of the same shape (one node, one vCPU, 256 MiB of boot
//! memory and a 1.5 GiB virtio-mem region with 1 GiB plugged) and runs the three
//! workloads one after the other, putting back what a way removed in between:
//!
//! * (a) big freed chunks: 256 MiB written, then freed;
//! * (b) fragmented: 512 MiB written, then every other 4 KiB page freed (no free 2 MiB
//!   chunk): two fills written page by page in turn, so interleaved in physical memory,
//!   and one of them freed;
//! * (c) mixed: 128 MiB written then freed, 256 MiB written then every other page freed,
//!   128 MiB kept.
//!
//! Each workload frees 256 MiB. The ways:
//!
//! 1. the peers' resize: the requested size is lowered by what was freed (256 MiB) and the
//!    guest's driver picks what to unplug;
//! 2. free page reporting alone (`--balloon free_page_reporting=on`), the peers' best;
//! 3. mempower compaction alone: `compact` asked for the guest memory that is free but
//!    host-resident (per region: resident minus in use), at most what was freed, if at
//!    least 64 MiB;
//! 4. reporting, then compaction asked the same way once reporting has settled.
//!
//! Per cell: host DRAM released (the VMM's resident set, from the workload in place to
//! settled), guest capacity removed (plugged bytes), bytes migrated (`pgmigrate_success`
//! x 4 KiB), the time from the free until the resident set last moved, and the guest's
//! allocation slowdown: a timed 32 MiB fill while the way works, against the same fill
//! just before with nothing running.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_protocol::{Request, Response};
use mempower_api::{Job, JobAccepted, JobState, RegionState};
use mempower_tests::host_memory::{wait_settled, Sampler};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

use crate::{mib, BenchResult};

const MIB: u64 = 1 << 20;
const BOOT_MIB: u64 = 256;
const HOTPLUG_MIB: u64 = 1536;
const PLUGGED_MIB: u64 = 1024;
/// What every workload frees.
const FREED_MIB: u64 = 256;
const TIMED_FILL_MIB: u64 = 32;
/// Reporting waits 2 s after a free; still for longer than this means done.
const QUIET: Duration = Duration::from_secs(8);
const SETTLE_LIMIT: Duration = Duration::from_secs(180);
/// Less than this is not worth a compaction.
const MIN_COMPACT: u64 = 64 * MIB;
const JOB_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Resize,
    Reporting,
    Compaction,
    Both,
}

impl Way {
    const ALL: [Way; 4] = [Way::Resize, Way::Reporting, Way::Compaction, Way::Both];

    fn name(self) -> &'static str {
        match self {
            Way::Resize => "(1) peers' resize",
            Way::Reporting => "(2) reporting",
            Way::Compaction => "(3) compaction",
            Way::Both => "(4) reporting+compaction",
        }
    }

    fn reporting(self) -> bool {
        matches!(self, Way::Reporting | Way::Both)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Live,
    Free,
    /// Every other page freed: written as two interleaved fills, one of them freed.
    Thin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Big,
    Fragmented,
    Mixed,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Big, Workload::Fragmented, Workload::Mixed];

    fn name(self) -> &'static str {
        match self {
            Workload::Big => "(a) big chunks",
            Workload::Fragmented => "(b) fragmented",
            Workload::Mixed => "(c) mixed",
        }
    }

    /// The fills, in MiB, and what becomes of each; each workload frees 256 MiB.
    fn pieces(self) -> &'static [(u64, Fate)] {
        match self {
            Workload::Big => &[(256, Fate::Free)],
            Workload::Fragmented => &[(512, Fate::Thin)],
            Workload::Mixed => &[(128, Fate::Free), (256, Fate::Thin), (128, Fate::Live)],
        }
    }
}

/// One cell of the table.
struct Cell {
    way: Way,
    workload: Workload,
    /// Resident set before the free minus after settling (negative: it grew).
    released: i64,
    removed: u64,
    migrated: u64,
    settled_after: Duration,
    still: bool,
    idle_fill: Duration,
    busy_fill: Duration,
    /// What compaction was asked for, if it ran.
    compacted: Option<u64>,
}

fn fill(api: &VmApi, mib: u64, seed: u64) -> BenchResult<u64> {
    match api.agent(&Request::Fill {
        node: 0,
        bytes: mib * MIB,
        seed,
    })? {
        Response::Filled { handle, .. } => Ok(handle),
        other => Err(format!("fill: {other:?}").into()),
    }
}

/// Two fills of `mib` in all, interleaved page by page: (the half that stays, the half
/// to free).
fn fill_interleaved(api: &VmApi, mib: u64, seed: u64) -> BenchResult<(u64, u64)> {
    let [(kept, _), (other, _)] = api.fill_interleaved(0, mib * MIB, seed, 2, 4096)?;
    Ok((kept, other))
}

fn agent_ok(api: &VmApi, request: Request) -> BenchResult<()> {
    match api.agent(&request)? {
        Response::Released { .. } => Ok(()),
        other => Err(format!("{request:?}: {other:?}").into()),
    }
}

/// How long a 32 MiB fill takes (released at once).
fn timed_fill(api: &VmApi, seed: u64) -> BenchResult<Duration> {
    let t = Instant::now();
    let handle = fill(api, TIMED_FILL_MIB, seed)?;
    let took = t.elapsed();
    agent_ok(api, Request::Release { handle })?;
    Ok(took)
}

/// Guest memory that is free yet host-resident: per plugged region, resident bytes
/// minus the bytes the guest uses there.
fn resident_but_free(api: &VmApi) -> BenchResult<u64> {
    Ok(api
        .regions(0)?
        .iter()
        .filter(|r| r.plugged_bytes > 0)
        .map(|r| {
            r.resident_bytes
                .saturating_sub(r.in_use_bytes.unwrap_or(r.resident_bytes))
        })
        .sum())
}

/// What compaction is asked for now: the free resident memory, at most what the
/// workload freed; `None` if that is not worth it.
fn compaction_ask(api: &VmApi) -> BenchResult<Option<u64>> {
    let ask = resident_but_free(api)?.min(FREED_MIB * MIB);
    println!("  free but host-resident in the regions: {}", mib(ask));
    Ok((ask >= MIN_COMPACT).then_some(ask))
}

fn start_compaction(api: &VmApi, bytes: u64) -> BenchResult<u64> {
    let release = bytes.to_string();
    let accepted: JobAccepted = api.json(&["compact", "--node", "0", "--release", &release])?;
    Ok(accepted.job)
}

fn wait_job(api: &VmApi, id: u64) -> BenchResult<Job> {
    let t = Instant::now();
    loop {
        let job: Job = api.json(&["jobs", "--job", &id.to_string()])?;
        if job.state == JobState::Done {
            show_job(&job);
            return Ok(job);
        }
        if t.elapsed() > JOB_LIMIT {
            return Err(format!("job {id} not done within {JOB_LIMIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The compaction's ranking: what reporting already gave back ranks low.
fn show_job(job: &Job) {
    for c in &job.plan {
        println!(
            "  plan: region {} resident {:>9} in use {:>9}{}",
            c.region,
            mib(c.resident_bytes),
            mib(c.in_use_bytes),
            if c.chosen { "  <- chosen" } else { "" }
        );
    }
    for r in &job.results {
        println!(
            "  region {}: {:?}, released {}, migrated {}{}",
            r.region,
            r.outcome,
            mib(r.released_bytes),
            r.migrated_bytes.map_or("?".into(), mib),
            r.reason
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &job.error {
        println!("  job error: {e}");
    }
}

fn run_cell(api: &VmApi, pid: u32, way: Way, workload: Workload) -> BenchResult<Cell> {
    println!("== {} / {}", way.name(), workload.name());
    // (handle, freed at the free step?)
    let mut fills = Vec::new();
    for (i, &(size, fate)) in workload.pieces().iter().enumerate() {
        let t = Instant::now();
        let seed = 1000 + 10 * i as u64;
        match fate {
            Fate::Live => fills.push((fill(api, size, seed)?, false)),
            Fate::Free => fills.push((fill(api, size, seed)?, true)),
            Fate::Thin => {
                let (kept, gaps) = fill_interleaved(api, size, seed)?;
                fills.extend([(kept, false), (gaps, true)]);
            }
        }
        print_phase(&format!("fill {size} MiB ({fate:?})"), t.elapsed());
    }
    let idle_fill = timed_fill(api, 77)?;
    // The timed fill's free may be reported: start from a still resident set.
    wait_settled(pid, None, QUIET, SETTLE_LIMIT)?;
    let before = api.node(0)?;
    let migrated_before = api.vmstat("pgmigrate_success")?;

    let sampler = Sampler::start(pid, QUIET)?;
    let freed_at = Instant::now();
    for &(handle, _) in fills.iter().filter(|f| f.1) {
        agent_ok(api, Request::Release { handle })?;
    }
    let mut compacted = None;
    let mut job = None;
    match way {
        Way::Resize => {
            let size = format!("{}M", before.requested_bytes / MIB - FREED_MIB);
            api.cli(&["resize", "--node", "0", "--size", &size])?;
        }
        Way::Compaction => {
            compacted = compaction_ask(api)?;
            if let Some(bytes) = compacted {
                job = Some(start_compaction(api, bytes)?);
            }
        }
        // Reporting starts 2 s after a free.
        Way::Reporting | Way::Both => {
            std::thread::sleep(Duration::from_millis(2500).saturating_sub(freed_at.elapsed()))
        }
    }
    let busy_fill = timed_fill(api, 78)?;
    match way {
        Way::Resize => {
            api.wait_plugged(JOB_LIMIT)?;
        }
        Way::Compaction => {
            if let Some(id) = job {
                wait_job(api, id)?;
            }
        }
        Way::Reporting => {}
        Way::Both => {
            // Compaction takes what reporting left once it is done.
            wait_settled(pid, None, QUIET, SETTLE_LIMIT)?;
            compacted = compaction_ask(api)?;
            if let Some(bytes) = compacted {
                let id = start_compaction(api, bytes)?;
                wait_job(api, id)?;
            } else {
                println!("  nothing left worth a compaction: no guest memory removed");
            }
        }
    }
    let settled = sampler.wait_still(SETTLE_LIMIT)?;
    let after = api.node(0)?;
    let cell = Cell {
        way,
        workload,
        released: settled.start as i64 - settled.end as i64,
        removed: before.plugged_bytes.saturating_sub(after.plugged_bytes),
        migrated: (api.vmstat("pgmigrate_success")? - migrated_before) * 4096,
        settled_after: settled.settled_after,
        still: settled.still,
        idle_fill,
        busy_fill,
        compacted,
    };
    println!(
        "  released {:.1} MiB, removed {}, migrated {}, settled after {:.1} s{}, fill {:.2} s idle / {:.2} s busy",
        cell.released as f64 / MIB as f64,
        mib(cell.removed),
        mib(cell.migrated),
        cell.settled_after.as_secs_f64(),
        if cell.still { "" } else { " (not still)" },
        idle_fill.as_secs_f64(),
        busy_fill.as_secs_f64()
    );
    for (handle, _) in fills.into_iter().filter(|f| !f.1) {
        agent_ok(api, Request::Release { handle })?;
    }
    Ok(cell)
}

/// Puts back the guest memory a way removed.
fn restore(api: &VmApi, way: Way) -> BenchResult<()> {
    match way {
        Way::Resize => {
            let size = format!("{PLUGGED_MIB}M");
            api.cli(&["resize", "--node", "0", "--size", &size])?;
        }
        Way::Compaction | Way::Both => {
            for r in api.regions(0)? {
                if r.state == RegionState::Released {
                    api.cli(&["plug", "--node", "0", "--region", &r.index.to_string()])?;
                }
            }
        }
        Way::Reporting => {}
    }
    api.wait_plugged(JOB_LIMIT)?;
    Ok(())
}

fn run_way(way: Way) -> BenchResult<Vec<Cell>> {
    let t0 = Instant::now();
    let socket = PathBuf::from(format!(
        "/tmp/mempower-ways-{}-{}.sock",
        std::process::id(),
        way as u8
    ));
    let mut builder = GuestBuilder::new()
        .node(0, "0", BOOT_MIB)
        .hotplug(0, HOTPLUG_MIB, PLUGGED_MIB)
        .api_socket(&socket);
    if way.reporting() {
        builder = builder.arg("--balloon").arg("free_page_reporting=on");
    }
    let (mut guest, _) = builder.boot_until_ready()?;
    print_phase(&format!("{}: boot to READY", way.name()), t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(300))?;
    let pid = guest.pid();
    wait_settled(pid, None, QUIET, SETTLE_LIMIT)?;
    let mut cells = Vec::new();
    for workload in Workload::ALL {
        cells.push(run_cell(&api, pid, way, workload)?);
        restore(&api, way)?;
        wait_settled(pid, None, QUIET, SETTLE_LIMIT)?;
    }
    if way.reporting() {
        let b: mempower_api::BalloonStatus = api.json(&["balloon"])?;
        println!(
            "  balloon: reported {}, discarded {}, rejected {}",
            mib(b.reported_bytes),
            mib(b.discarded_bytes),
            mib(b.counters.get("rejected_bytes").copied().unwrap_or(0))
        );
    }
    guest.poweroff_cleanly()?;
    print_phase(way.name(), t0.elapsed());
    Ok(cells)
}

fn signed_mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn print_table(cells: &[Cell]) {
    println!();
    println!(
        "{:<26} {:<16} {:>13} {:>13} {:>13} {:>10} {:>10}",
        "way", "workload", "host released", "guest removed", "migrated", "settled", "slowdown"
    );
    for c in cells {
        println!(
            "{:<26} {:<16} {:>13} {:>13} {:>13} {:>8.1} s{} {:>9.2}x",
            c.way.name(),
            c.workload.name(),
            signed_mib(c.released),
            mib(c.removed),
            mib(c.migrated),
            c.settled_after.as_secs_f64(),
            if c.still { " " } else { "*" },
            c.busy_fill.as_secs_f64() / c.idle_fill.as_secs_f64().max(1e-3)
        );
    }
    println!("(* not still when the bench stopped waiting; slowdown: a 32 MiB fill while the way works / the same fill just before)");
    for c in cells.iter().filter(|c| c.compacted.is_some()) {
        println!(
            "compaction asked for {} in {} / {}",
            mib(c.compacted.unwrap_or(0)),
            c.way.name(),
            c.workload.name()
        );
    }
}

/// The goals, checked on the measured cells.
fn print_goals(cells: &[Cell]) {
    let get = |way, workload| {
        cells
            .iter()
            .find(|c| c.way == way && c.workload == workload)
    };
    if let (Some(r), Some(c), Some(b)) = (
        get(Way::Reporting, Workload::Fragmented),
        get(Way::Compaction, Workload::Fragmented),
        get(Way::Both, Workload::Fragmented),
    ) {
        let floor = 3 * r.released.max(0);
        for x in [c, b] {
            println!(
                "goal (b): {} releases {} >= 3 x {} ({}): {}",
                x.way.name(),
                signed_mib(x.released),
                signed_mib(r.released),
                r.way.name(),
                if x.released >= floor && x.released > 0 {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
    }
    if let (Some(r), Some(b)) = (
        get(Way::Reporting, Workload::Big),
        get(Way::Both, Workload::Big),
    ) {
        // "As much": within 16 MiB.
        let met = b.released + (16 * MIB) as i64 >= r.released && b.removed == 0;
        println!(
            "goal (a): {} releases {} (reporting: {}) and removes {}: {}",
            b.way.name(),
            signed_mib(b.released),
            signed_mib(r.released),
            mib(b.removed),
            if met { "met" } else { "MISSED" }
        );
    }
}

pub fn bench() -> BenchResult<()> {
    let t0 = Instant::now();
    let mut cells = Vec::new();
    for way in Way::ALL {
        cells.extend(run_way(way)?);
    }
    print_table(&cells);
    print_goals(&cells);
    print_phase("bench --ways", t0.elapsed());
    Ok(())
}
