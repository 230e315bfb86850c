//! The balloon end to end, in one guest (one node: 384 MiB of boot memory and a
//! virtio-mem region of 512 MiB with 256 MiB plugged), started with
//! `--balloon size=0,free_page_reporting=on,stats=1s,deflate_on_oom=on`:
//!
//! 1. free page reporting: a 256 MiB fill, then freed, comes back to the host (the VMM's
//!    resident set falls) within a bounded time, which is printed;
//! 2. inflation: 128 MiB of the guest's free memory that reporting cannot take (every
//!    other physical page of 256 MiB written freed, so no 2 MiB chunk is free) goes back
//!    to the host when the balloon inflates by 128 MiB;
//! 3. deflation gives the 128 MiB back to the guest, which can use it again;
//! 4. live data verifies after every step, and the statistics queue reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_protocol::{Request, Response};
use libtest_mimic::Failed;
use mempower_api::BalloonStatus;
use mempower_tests::host_memory::{rss_bytes, wait_settled, Settled};
use mempower_tests::{print_phase, GuestBuilder, VmApi};

const MIB: u64 = 1 << 20;
/// Reporting waits 2 s after a free before it reports; still for longer means done.
const QUIET: Duration = Duration::from_secs(8);
/// The bound on reporting 256 MiB back (it takes a few seconds on hardware).
const REPORT_BOUND: Duration = Duration::from_secs(90);
const INFLATE_MIB: u64 = 128;

fn fill(api: &VmApi, mib: u64, seed: u64) -> Result<u64, Failed> {
    let t = Instant::now();
    match api.agent(&Request::Fill {
        node: 0,
        bytes: mib * MIB,
        seed,
    })? {
        Response::Filled { handle, .. } => {
            print_phase(&format!("fill {mib} MiB"), t.elapsed());
            Ok(handle)
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

/// Checks every kept byte of a fill: `expected` bytes, none differing.
fn verify(api: &VmApi, handle: u64, expected: u64, when: &str) -> Result<(), Failed> {
    match api.agent(&Request::Verify { handle })? {
        Response::Verified {
            checked_bytes,
            mismatched_bytes,
            ..
        } if checked_bytes == expected && mismatched_bytes == 0 => Ok(()),
        other => Err(format!("{when}: fill {handle} does not verify: {other:?}").into()),
    }
}

fn balloon(api: &VmApi) -> Result<BalloonStatus, Failed> {
    Ok(api.json(&["balloon"])?)
}

fn free_bytes(api: &VmApi) -> Result<u64, Failed> {
    Ok(api.vmstat("nr_free_pages")? * 4096)
}

/// Sets the target and waits until the guest's driver and the device both agree.
fn resize_balloon(api: &VmApi, mib: u64) -> Result<BalloonStatus, Failed> {
    let t = Instant::now();
    let size = format!("{mib}M");
    let answer: BalloonStatus = api.json(&["balloon", "--size", &size])?;
    assert_eq!(answer.target_bytes, mib * MIB);
    loop {
        let b = balloon(api)?;
        if b.actual_bytes == mib * MIB && b.inflated_bytes == mib * MIB {
            print_phase(&format!("balloon at {mib} MiB"), t.elapsed());
            return Ok(b);
        }
        if t.elapsed() > Duration::from_secs(180) {
            return Err(format!("the balloon did not reach {mib} MiB: {b:?}").into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn show(what: &str, s: &Settled) {
    println!(
        "{what}: resident {:.1} -> {:.1} MiB (released {:.1} MiB); first move after {}, settled after {:.1} s{}",
        s.start as f64 / MIB as f64,
        s.end as f64 / MIB as f64,
        s.released() as f64 / MIB as f64,
        s.first_move
            .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        s.settled_after.as_secs_f64(),
        if s.still { "" } else { " (timed out)" }
    );
}

fn balloon_reports_inflates_and_deflates() -> Result<(), Failed> {
    let t0 = Instant::now();
    let socket = PathBuf::from(format!("/tmp/mempower-balloon-{}.sock", std::process::id()));
    let (mut guest, _) = GuestBuilder::new()
        .node(0, "0", 384)
        .hotplug(0, 512, 256)
        .api_socket(&socket)
        .arg("--balloon")
        .arg("size=0,free_page_reporting=on,stats=1s,deflate_on_oom=on")
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());
    let api = VmApi::new(&socket);
    api.wait_agent(Duration::from_secs(60))?;
    api.wait_plugged(Duration::from_secs(120))?;
    let pid = guest.pid();
    let b = balloon(&api)?;
    assert!(
        b.driver_ready && b.free_page_reporting && b.deflate_on_oom,
        "{b:?}"
    );
    assert_eq!(b.stats_interval_ms, Some(1000));
    // Whatever booting freed was reported; wait for that to end.
    show(
        "after boot",
        &wait_settled(pid, None, QUIET, Duration::from_secs(60))?,
    );
    let live = fill(&api, 64, 1)?;

    // 1. Free page reporting: 256 MiB written, then freed.
    let big = fill(&api, 256, 2)?;
    let filled = rss_bytes(pid)?;
    let reported_before = balloon(&api)?.reported_bytes;
    release(&api, big)?;
    let freed = wait_settled(pid, Some(200 * MIB), QUIET, REPORT_BOUND)?;
    show("256 MiB freed, reporting on", &freed);
    let reported = balloon(&api)?.reported_bytes - reported_before;
    println!(
        "reported and discarded: {:.1} MiB; released {:.1} MiB of the 256 MiB freed in {:.1} s",
        reported as f64 / MIB as f64,
        filled.saturating_sub(freed.end) as f64 / MIB as f64,
        freed.settled_after.as_secs_f64()
    );
    if !freed.still || freed.released() < 200 * MIB {
        return Err(format!(
            "reporting gave back {} MiB of 256 MiB within {REPORT_BOUND:?}",
            freed.released() / MIB
        )
        .into());
    }
    assert!(reported >= 200 * MIB, "the device counted {reported} bytes");
    verify(&api, live, 64 * MIB, "after reporting")?;

    // 2. Inflation of free memory reporting cannot take: every other page of 256 MiB.
    let t = Instant::now();
    // One-page runs: one page in two kept.
    let (sparse, gaps) = match api.fill_interleaved(0, 2 * INFLATE_MIB * MIB, 3, 2, 4096)? {
        [(kept, kept_bytes), (other, other_bytes)]
            if kept_bytes == INFLATE_MIB * MIB && other_bytes == INFLATE_MIB * MIB =>
        {
            (kept, other)
        }
        other => return Err(format!("fill_interleaved: {other:?}").into()),
    };
    print_phase("two interleaved 128 MiB fills", t.elapsed());
    let with_gaps = rss_bytes(pid)?;
    release(&api, gaps)?;
    let thinned = wait_settled(pid, None, QUIET, Duration::from_secs(60))?;
    show("every other page freed (nothing to report)", &thinned);
    // Reporting taking the gaps would mean they were not fragmented, and the inflation
    // below would then prove nothing about fragmented free memory.
    let gaps_released = with_gaps.saturating_sub(thinned.end);
    if gaps_released > 16 * MIB {
        return Err(format!(
            "reporting gave back {} MiB of the interleaved gaps: they were not fragmented",
            gaps_released / MIB
        )
        .into());
    }
    let free_before = free_bytes(&api)?;
    let discarded_before = balloon(&api)?.discarded_bytes;
    let t = Instant::now();
    resize_balloon(&api, INFLATE_MIB)?;
    let inflated = wait_settled(pid, None, Duration::from_secs(3), Duration::from_secs(30))?;
    let inflate_time = t.elapsed();
    show("inflated by 128 MiB", &inflated);
    let b = balloon(&api)?;
    let discarded = b.discarded_bytes - discarded_before;
    let released = thinned.end.saturating_sub(inflated.end);
    let taken = free_before.saturating_sub(free_bytes(&api)?);
    println!(
        "inflate: host released {:.1} MiB (resident set), device discarded {:.1} MiB, guest free memory fell {:.1} MiB, in {:.1} s",
        released as f64 / MIB as f64,
        discarded as f64 / MIB as f64,
        taken as f64 / MIB as f64,
        inflate_time.as_secs_f64()
    );
    assert!(
        discarded >= INFLATE_MIB * MIB,
        "the device discarded {discarded} bytes"
    );
    if released < INFLATE_MIB * MIB * 7 / 8 {
        return Err(format!(
            "inflating by {INFLATE_MIB} MiB released only {} MiB of host memory",
            released / MIB
        )
        .into());
    }
    verify(&api, live, 64 * MIB, "inflated")?;
    verify(&api, sparse, INFLATE_MIB * MIB, "inflated")?;

    // 3. Deflation: the guest gets its 128 MiB back.
    let free_inflated = free_bytes(&api)?;
    resize_balloon(&api, 0)?;
    let returned = free_bytes(&api)?.saturating_sub(free_inflated);
    println!(
        "deflate: guest free memory rose {:.1} MiB",
        returned as f64 / MIB as f64
    );
    assert!(
        returned >= INFLATE_MIB * MIB * 15 / 16,
        "deflating gave back {returned} bytes"
    );
    let rss_deflated = rss_bytes(pid)?;
    let again = fill(&api, 192, 4)?;
    let grown = rss_bytes(pid)?.saturating_sub(rss_deflated);
    println!(
        "a 192 MiB fill after deflating: resident set grew {:.1} MiB",
        grown as f64 / MIB as f64
    );
    verify(&api, again, 192 * MIB, "deflated")?;
    verify(&api, live, 64 * MIB, "deflated")?;
    verify(&api, sparse, INFLATE_MIB * MIB, "deflated")?;

    // 4. The statistics queue: the guest answered the polls.
    let b = balloon(&api)?;
    let stats = b.stats.ok_or("no statistics after a minute of polling")?;
    assert!(stats.age_ms < 10_000, "stale statistics: {stats:?}");
    for key in ["free_memory", "total_memory"] {
        assert!(stats.values.contains_key(key), "{key} missing: {stats:?}");
    }
    println!("stats: {:?}; counters: {:?}", stats.values, b.counters);
    assert_eq!(b.counters.get("malformed_chains"), Some(&0));
    let metrics = api.cli(&["metrics"])?;
    assert!(
        metrics.contains("\nmempower_balloon_reported_bytes_total "),
        "{metrics}"
    );

    guest.poweroff_cleanly()?;
    print_phase("balloon_reports_inflates_and_deflates", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main(vec![mempower_tests::trial(
        "balloon_reports_inflates_and_deflates",
        balloon_reports_inflates_and_deflates,
    )]);
}
