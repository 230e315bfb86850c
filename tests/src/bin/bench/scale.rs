//! `mempower-bench --scale [MIB,...]`: how compaction's end-to-end cost grows with the
//! work.
//!
//! For each size P (MiB plugged per node; default 1024, 2048 and 4096), a fresh guest
//! with two nodes of P plugged. Each node is filled to about 50% in a fragmented way:
//! its hotplug memory (less 64 MiB of room) is written as alternating 4 MiB runs of
//! live data and of data then freed (`fill_interleaved`, 256 MiB per agent call), so
//! every region is half live and wholly resident on the host. Then both nodes are
//! compacted by half at once (`compact --release P/2 - 16M` each, two jobs), and the
//! bench reports:
//!
//! * the host memory released (both nodes' memfd data, before minus after) per second
//!   of wall time, from starting the two jobs until both are done;
//! * where the jobs' time went: offline/migrate, unplug, release (the jobs' `phases`)
//!   and the rest (planning, queueing), as fractions of the jobs' summed time;
//! * how the wall time grows from one size to the next;
//! * the host's own hole-punch rate, measured here (the same machine, nested or not),
//!   as the limit: the end-to-end rate over it is the ratio to compare, since nested
//!   absolute times say little.

use std::path::Path;
use std::time::{Duration, Instant};

use mempower_api::{Job, JobAccepted, PhaseTimes};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

use crate::bench::batch;
use crate::BenchResult;

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// MiB plugged per node, by default: 1, 2 and 4 GiB of work.
pub const DEFAULT_SIZES: [u64; 3] = [1024, 2048, 4096];
const RUN: u64 = 4 * MIB;
/// Left unfilled per node, for the kernel's own allocations.
const ROOM: u64 = 64 * MIB;
/// Per agent call: a call has 120 s, and a nested guest writes about 5 MiB/s.
const FILL_CHUNK: u64 = 256 * MIB;
const BOOT_MIB: u64 = 256;

/// The sizes after `--scale`: MiB per node, multiples of 256 (so that half is whole
/// regions), at least 256.
pub fn sizes() -> BenchResult<Vec<u64>> {
    let Some(list) = std::env::args().nth(2) else {
        return Ok(DEFAULT_SIZES.to_vec());
    };
    list.split(',')
        .map(|s| {
            s.parse::<u64>()
                .ok()
                .filter(|m| *m >= 256 && m % 256 == 0 && *m <= 4096)
                .ok_or_else(|| {
                    format!("--scale {list}: give MiB per node, multiples of 256 up to 4096").into()
                })
        })
        .collect()
}

/// The test host memory the largest size needs: both nodes' plugged memory (all of it
/// touched), the guest's boot memory, the test host's own.
pub fn testhost_mib(sizes: &[u64]) -> u64 {
    let largest = sizes.iter().copied().max().unwrap_or(0);
    (2 * largest + 2 * BOOT_MIB + 2048).max(4096)
}

/// What one size gave.
struct Point {
    per_node_mib: u64,
    fill: Duration,
    released: u64,
    migrated: u64,
    wall: Duration,
    phases: PhaseTimes,
    jobs_ms: u64,
}

impl Point {
    fn gib_per_s(&self) -> f64 {
        self.released as f64 / GIB / self.wall.as_secs_f64()
    }

    fn fraction(&self, ms: u64) -> String {
        format!("{:.2}", ms as f64 / self.jobs_ms.max(1) as f64)
    }
}

/// Fills `bytes` of `node` with alternating live and freed 4 MiB runs. The freed runs
/// are freed only once all are written: freed earlier, the next chunk would reuse them,
/// leaving much of the node untouched (not resident on the host), where the
/// compaction's migrations would then land and fault in fresh host memory.
fn fragment(api: &VmApi, node: u32, bytes: u64, seed: u64) -> BenchResult<()> {
    let mut left = bytes;
    let mut i = 0;
    let mut freed = Vec::new();
    while left > 0 {
        let chunk = left.min(FILL_CHUNK);
        let [_, (other, _)] = api.fill_interleaved(node, chunk, seed + 2 * i, 2, RUN)?;
        freed.push(other);
        left -= chunk;
        i += 1;
    }
    for handle in freed {
        api.release(handle)?;
    }
    Ok(())
}

fn start_compaction(socket: &Path, node: u32, bytes: u64) -> BenchResult<u64> {
    let body = serde_json::json!({ "release_bytes": bytes }).to_string();
    let path = format!("/api/v1/nodes/{node}/compact");
    let answer = mempower_api::client::request(socket, "POST", &path, Some(&body))?;
    if !answer.is_success() {
        return Err(format!("compact node {node}: {}", answer.body).into());
    }
    Ok(answer.json::<JobAccepted>()?.job)
}

fn resident(api: &VmApi) -> BenchResult<u64> {
    Ok(api.nodes()?.iter().map(|n| n.resident_bytes).sum())
}

fn one_size(per_node_mib: u64) -> BenchResult<Point> {
    let t0 = Instant::now();
    let socket = mempower_tests::socket_path(&format!("scale-{per_node_mib}"), "sock");
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(BOOT_MIB, per_node_mib, per_node_mib)
        .api_socket(&socket)
        .boot_until_ready()?;
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(900))?;
    print_phase(
        &format!("{per_node_mib} MiB per node plugged"),
        t0.elapsed(),
    );

    let t = Instant::now();
    let fill_bytes = per_node_mib * MIB - ROOM;
    for node in [0u32, 1] {
        fragment(&api, node, fill_bytes, 100 * u64::from(node))?;
    }
    let fill = t.elapsed();
    print_phase("fragmented fill of both nodes", fill);

    let before = resident(&api)?;
    println!(
        "both nodes hold {:.2} GiB of host memory for {:.2} GiB plugged",
        before as f64 / GIB,
        (2 * per_node_mib * MIB) as f64 / GIB
    );
    let release = per_node_mib * MIB / 2 - 16 * MIB;
    let t = Instant::now();
    let ids = [
        start_compaction(api.socket(), 0, release)?,
        start_compaction(api.socket(), 1, release)?,
    ];
    let jobs: Vec<Job> = batch::wait(api.socket(), &ids)?;
    let wall = t.elapsed();
    let after = resident(&api)?;
    // What the regions held in use when offlined, as the jobs count it.
    let migrated = jobs.iter().map(|j| j.migrated_bytes).sum();
    let mut phases = PhaseTimes::default();
    for j in &jobs {
        phases.add(&j.phases);
        println!(
            "job {} (node {}): {} regions {:?}, released {:.1} MiB in {} ms, phases {:?}",
            j.id,
            j.node,
            j.results.len(),
            j.regions,
            j.released_bytes as f64 / MIB as f64,
            j.elapsed_ms,
            j.phases
        );
    }
    guest.poweroff_cleanly()?;
    print_phase(&format!("size {per_node_mib} MiB per node"), t0.elapsed());
    Ok(Point {
        per_node_mib,
        fill,
        released: before.saturating_sub(after),
        migrated,
        wall,
        phases,
        jobs_ms: jobs.iter().map(|j| j.elapsed_ms).sum(),
    })
}

/// The host's hole-punch rate here, GiB/s: 256 MiB of a memfd touched, then punched
/// (the virtio-mem backend's release), best of five.
fn punch_rate() -> BenchResult<f64> {
    use std::os::fd::AsRawFd;
    const LEN: usize = 256 << 20;
    // SAFETY: memfd_create reads the NUL-terminated name only.
    let fd = unsafe { libc::memfd_create(c"mempower-bench-punch".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is the new descriptor above, owned by nothing else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(LEN as u64)?;
    // SAFETY: a fresh shared mapping of the memfd, LEN bytes long; checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut best = Duration::MAX;
    for _ in 0..5 {
        for off in (0..LEN).step_by(4096) {
            // SAFETY: `off < LEN`, inside the live writable mapping above.
            unsafe { (addr as *mut u8).add(off).write_volatile(0xa5) };
        }
        let t = Instant::now();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate acts on our own memfd; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, LEN as i64) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        best = best.min(t.elapsed());
    }
    // SAFETY: unmaps exactly the mapping made above, which nothing uses after.
    unsafe { libc::munmap(addr, LEN) };
    Ok(LEN as f64 / GIB / best.as_secs_f64())
}

pub fn run() -> BenchResult<()> {
    let sizes = sizes()?;
    let t0 = Instant::now();
    let punch = punch_rate()?;
    println!("host hole punch here: {punch:.2} GiB/s (256 MiB touched, best of 5)");
    let mut points = Vec::new();
    for &size in &sizes {
        // QEMU TCG's nested SVM sometimes resets a guest (see GuestBuilder): once more.
        let point = match one_size(size) {
            Ok(p) => p,
            Err(e) => {
                println!("size {size} MiB per node failed ({e}); once more in a fresh guest");
                one_size(size)?
            }
        };
        points.push(point);
    }
    println!();
    println!(
        "| per node | fill | released | migrated | wall | GiB/s | / punch | offline | unplug | release | other | wall / first |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let first = points[0].wall.as_secs_f64();
    for p in &points {
        let other = p.jobs_ms.saturating_sub(p.phases.total_ms());
        println!(
            "| {} MiB | {:.0} s | {:.2} GiB | {:.2} GiB | {:.2} s | {:.3} | {:.4} | {} | {} | {} | {} | {:.2} |",
            p.per_node_mib,
            p.fill.as_secs_f64(),
            p.released as f64 / GIB,
            p.migrated as f64 / GIB,
            p.wall.as_secs_f64(),
            p.gib_per_s(),
            p.gib_per_s() / punch,
            p.fraction(p.phases.offline_ms),
            p.fraction(p.phases.unplug_ms),
            p.fraction(p.phases.release_ms),
            p.fraction(other),
            p.wall.as_secs_f64() / first,
        );
    }
    print_phase("bench --scale", t0.elapsed());
    Ok(())
}
