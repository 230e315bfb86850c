//! `mempower-bench --batch`: what batched passes and parallel nodes save.
//!
//! One guest: node 0 with 3 GiB of hotplug memory, node 1 with 1 GiB, all plugged
//! (24 and 8 regions of 128 MiB). Then, timed:
//!
//! 1. 8 regions of node 0 evacuated one at a time (8 jobs, each waited for), against
//!    8 other regions of node 0 in one job (one pass: offline each, one shrink, one
//!    wait);
//! 2. 4 regions of node 0 then 4 of node 1 (one job each, the second started when the
//!    first ended), against 4 other regions of each node at once (two jobs started
//!    together, one worker and one agent connection per node).
//!
//! Each way prints the bench's wall time (jobs polled every 50 ms through the API
//! socket) and the VMM's own job times (`elapsed_ms`, creation to last result). The
//! regions hold no data of the workload: the figures are the cost of the evacuation
//! cycle itself (offline, shrink, unplug, release), which batching and parallel nodes
//! are meant to cut.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mempower_api::{Job, JobAccepted, JobState, RegionOutcome};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

use crate::BenchResult;

const POLL: Duration = Duration::from_millis(50);
const JOB_LIMIT: Duration = Duration::from_secs(900);

/// Starts an evacuation of `regions` of `node`; answers the job's id.
fn start(socket: &Path, node: u32, regions: &[u32]) -> BenchResult<u64> {
    let body = serde_json::json!({ "regions": regions }).to_string();
    let path = format!("/api/v1/nodes/{node}/evacuations");
    let answer = mempower_api::client::request(socket, "POST", &path, Some(&body))?;
    if !answer.is_success() {
        return Err(format!("evacuate {regions:?} of node {node}: {}", answer.body).into());
    }
    Ok(answer.json::<JobAccepted>()?.job)
}

/// Waits until every job of `ids` is done; all their regions must be released.
pub(crate) fn wait(socket: &Path, ids: &[u64]) -> BenchResult<Vec<Job>> {
    let t = Instant::now();
    loop {
        let answer = mempower_api::client::request(socket, "GET", "/api/v1/evacuations", None)?;
        let jobs: Vec<Job> = answer.json()?;
        let ours: Vec<Job> = jobs.into_iter().filter(|j| ids.contains(&j.id)).collect();
        if ours.len() == ids.len() && ours.iter().all(|j| j.state == JobState::Done) {
            for j in &ours {
                let failed: Vec<_> = j
                    .results
                    .iter()
                    .filter(|r| r.outcome != RegionOutcome::Released)
                    .collect();
                if !failed.is_empty() || j.error.is_some() {
                    return Err(format!("job {} failed: {:?} {failed:?}", j.id, j.error).into());
                }
            }
            return Ok(ours);
        }
        if t.elapsed() > JOB_LIMIT {
            return Err(format!("jobs {ids:?} not done within {JOB_LIMIT:?}").into());
        }
        std::thread::sleep(POLL);
    }
}

/// One way of doing the work: its wall time and the VMM's job time.
struct Way {
    name: String,
    wall: Duration,
    vmm: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn job_time(jobs: &[Job]) -> Duration {
    Duration::from_millis(jobs.iter().map(|j| j.elapsed_ms).sum())
}

fn one_at_a_time(socket: &Path, node: u32, regions: &[u32]) -> BenchResult<Way> {
    let t = Instant::now();
    let mut jobs = Vec::new();
    for &r in regions {
        let id = start(socket, node, &[r])?;
        jobs.extend(wait(socket, &[id])?);
    }
    Ok(Way {
        name: format!("{} regions one at a time", regions.len()),
        wall: t.elapsed(),
        vmm: job_time(&jobs),
    })
}

fn one_pass(socket: &Path, node: u32, regions: &[u32]) -> BenchResult<Way> {
    let t = Instant::now();
    let id = start(socket, node, regions)?;
    let jobs = wait(socket, &[id])?;
    let passes: Vec<u64> = jobs[0].results.iter().map(|r| r.duration_ms).collect();
    println!("  per-region durations in the pass (ms): {passes:?}");
    Ok(Way {
        name: format!("{} regions in one pass", regions.len()),
        wall: t.elapsed(),
        vmm: job_time(&jobs),
    })
}

fn serial(socket: &Path, work: &[(u32, Vec<u32>)]) -> BenchResult<Way> {
    let t = Instant::now();
    let mut jobs = Vec::new();
    for (node, regions) in work {
        let id = start(socket, *node, regions)?;
        jobs.extend(wait(socket, &[id])?);
    }
    Ok(Way {
        name: "2 nodes x 4 regions, one node after the other".into(),
        wall: t.elapsed(),
        vmm: job_time(&jobs),
    })
}

fn parallel(socket: &Path, work: &[(u32, Vec<u32>)]) -> BenchResult<Way> {
    let t = Instant::now();
    let ids = std::thread::scope(|s| {
        let starts: Vec<_> = work
            .iter()
            .map(|(node, regions)| s.spawn(move || start(socket, *node, regions)))
            .collect();
        starts
            .into_iter()
            .map(|h| h.join().map_err(|_| "a start thread panicked")?)
            .collect::<BenchResult<Vec<u64>>>()
    })?;
    let jobs = wait(socket, &ids)?;
    Ok(Way {
        name: "2 nodes x 4 regions, both at once".into(),
        wall: t.elapsed(),
        // The two jobs overlap: the VMM's time is the longer one's.
        vmm: jobs
            .iter()
            .map(|j| Duration::from_millis(j.elapsed_ms))
            .max()
            .unwrap_or_default(),
    })
}

fn compare(slow: &Way, fast: &Way) {
    for w in [slow, fast] {
        println!("{:<48} {:>10} {:>10}", w.name, ms(w.wall), ms(w.vmm));
    }
    println!(
        "{:<48} {:>10.2} {:>10.2}",
        "ratio",
        slow.wall.as_secs_f64() / fast.wall.as_secs_f64(),
        slow.vmm.as_secs_f64() / fast.vmm.as_secs_f64().max(1e-3)
    );
}

pub fn run() -> BenchResult<()> {
    let t0 = Instant::now();
    let socket = PathBuf::from(format!("/tmp/mempower-bench-{}.sock", std::process::id()));
    let (mut guest, _) = GuestBuilder::new()
        .node(0, "0", 256)
        .node(1, "1", 256)
        .hotplug(0, 3072, 3072)
        .hotplug(1, 1024, 1024)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    let t = Instant::now();
    api.wait_plugged(Duration::from_secs(600))?;
    print_phase("4 GiB plugged", t.elapsed());

    let single = one_at_a_time(&socket, 0, &(0..8).collect::<Vec<_>>())?;
    print_phase(&single.name, single.wall);
    let batched = one_pass(&socket, 0, &(8..16).collect::<Vec<_>>())?;
    print_phase(&batched.name, batched.wall);
    let one_by_one = serial(&socket, &[(0, (16..20).collect()), (1, (0..4).collect())])?;
    print_phase(&one_by_one.name, one_by_one.wall);
    let both = parallel(&socket, &[(0, (20..24).collect()), (1, (4..8).collect())])?;
    print_phase(&both.name, both.wall);
    let nodes = api.nodes()?;
    guest.poweroff_cleanly()?;

    println!();
    println!("{:<48} {:>10} {:>10}", "", "wall", "VMM jobs");
    compare(&single, &batched);
    compare(&one_by_one, &both);
    for n in nodes {
        println!(
            "node {}: {} MiB plugged, {} MiB resident after",
            n.id,
            n.plugged_bytes >> 20,
            n.resident_bytes >> 20
        );
    }
    print_phase("bench --batch", t0.elapsed());
    Ok(())
}
