//! The autopilot end to end, on one node of 256 MiB boot memory and 1 GiB of hotplug
//! memory (128 MiB regions), the autopilot on from boot (a sample every 500 ms, 8 s of
//! patience, the default 256 MiB headroom):
//!
//! 1. the working set grows in steps of 32 MiB: whenever less than the low mark is
//!    free, the node grows back to its headroom, before the guest runs short (no OOM
//!    kill);
//! 2. it drops in big chunks: after the patience, compactions give the excess back;
//! 3. it grows again and drops fragmented (one page kept in four): the compaction
//!    migrates what stays and still gives back;
//! 4. a spike is met by plugging;
//! 5. turned off, the autopilot does nothing more;
//! 6. every byte of live data is intact, `oom_kill` never moved, and the figures of the
//!    run are printed: size over use, grow latency, time to give 90% of a drop back,
//!    regrets, the autopilot thread's CPU time.
//!
//! A second trial, inside the nested test host only, presses the host (allocating most
//! of its memory) and watches the headroom tighten, then relax.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{GuestSignals, Request, Response};
use libtest_mimic::{Completion, Failed};
use mempower_api::{AutopilotAction, AutopilotEvent, AutopilotStatus, Job};
use mempower_tests::{
    boot_plugged, is_inside_testhost, print_phase, socket_path, Fill, GuestBuilder, VmApi,
};

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;
const PATIENCE: Duration = Duration::from_secs(8);
/// Long enough for a patience, a compaction of a few regions in nested mode, and noise.
const SHRINK_WAIT: Duration = Duration::from_secs(240);
const GROW_WAIT: Duration = Duration::from_secs(60);

/// Held by each trial for its whole run: the host-pressure trial must not squeeze the
/// other's guest (libtest runs trials in parallel).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn boot(name: &str) -> Result<(mempower_tests::Guest, VmApi), Failed> {
    let t0 = Instant::now();
    let builder = GuestBuilder::new()
        .node(0, "0", 256)
        .hotplug(0, 1024, 256)
        .arg("--autopilot")
        .arg("node=0,mode=autosize,interval=500ms,patience=8s");
    boot_plugged(builder, &socket_path(name, "sock"), t0)
}

fn signals(api: &VmApi) -> Result<GuestSignals, Failed> {
    Ok(api.expect(&Request::Signals, |r| match r {
        Response::Signals(s) => Some(s),
        _ => None,
    })?)
}

fn status(api: &VmApi) -> Result<AutopilotStatus, Failed> {
    Ok(api.json(&["autopilot", "--node", "0"])?)
}

fn events(api: &VmApi, since: u64) -> Result<Vec<AutopilotEvent>, Failed> {
    Ok(api.json(&["events", "--since", &since.to_string()])?)
}

fn last_seq(api: &VmApi) -> Result<u64, Failed> {
    Ok(events(api, 0)?.last().map_or(0, |e| e.seq))
}

/// Waits until `done` holds, polling every 500 ms; how long it took.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, Failed>,
) -> Result<Duration, Failed> {
    let t = Instant::now();
    while !done()? {
        if t.elapsed() > timeout {
            return Err(format!("{what}: not within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(t.elapsed())
}

/// One look at the node, taken every 500 ms by the sampler.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// Boot memory and plugged hotplug memory: what the guest may use.
    size: u64,
    /// Host memory the hotplug region holds.
    resident: u64,
    /// What the guest uses: its online memory less what is free.
    used: u64,
}

/// Samples the node in the background while the phases run.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(api: &VmApi) -> Sampler {
        let (samples, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let api = VmApi::new(api.socket());
        let (out, halt) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                if let (Ok(node), Ok(s)) = (api.node(0), signals(&api)) {
                    if let Some(n) = s.nodes.iter().find(|n| n.node == 0) {
                        out.lock().unwrap().push(Sample {
                            at: Instant::now(),
                            size: node.boot_memory_bytes + node.plugged_bytes,
                            resident: node.resident_bytes,
                            used: n.online_bytes.saturating_sub(n.free_bytes),
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

/// The autopilot's low mark with its defaults (a quarter of the 256 MiB headroom): it
/// grows the node whenever less than this is free, so a step of [`STEP`] always finds
/// room once the free memory is back over [`ROOM`].
const LOW_MARK: u64 = 64 * MIB;
const STEP: u64 = 32 * MIB;
const ROOM: u64 = LOW_MARK - 8 * MIB;

/// Waits until node 0 has [`ROOM`] free: the autopilot keeps [`LOW_MARK`] free.
fn wait_room(api: &VmApi) -> Result<(), Failed> {
    wait_until("room for the next step", GROW_WAIT, || {
        Ok(node0_free(api)? >= ROOM)
    })?;
    Ok(())
}

/// Fills `bytes` on node 0 in steps of [`STEP`], each once the node has room for it:
/// never more than the guest has free, however fast the autopilot is.
fn grow_in_steps(api: &VmApi, bytes: u64, seed: u64) -> Result<Vec<Fill>, Failed> {
    let mut fills = Vec::new();
    for i in 0..bytes / STEP {
        wait_room(api)?;
        fills.push(api.fill(0, STEP, seed + i)?);
    }
    Ok(fills)
}

fn node0_free(api: &VmApi) -> Result<u64, Failed> {
    let s = signals(api)?;
    let n = s.nodes.iter().find(|n| n.node == 0).ok_or("no node 0")?;
    Ok(n.free_bytes)
}

/// Waits until the autopilot's compactions since `since` gave back at least `regions`
/// regions and none runs; the jobs.
fn wait_shrunk(api: &VmApi, since: u64, regions: u64) -> Result<Vec<Job>, Failed> {
    let mut jobs = Vec::new();
    wait_until("the autopilot's shrinks", SHRINK_WAIT, || {
        let shrinks: Vec<u64> = events(api, since)?
            .iter()
            .filter(|e| e.action == AutopilotAction::Shrink)
            .filter_map(|e| e.job)
            .collect();
        jobs = shrinks
            .iter()
            .map(|id| api.json::<Job>(&["jobs", "--job", &id.to_string()]))
            .collect::<Result<_, _>>()?;
        let released: u64 = jobs.iter().map(|j| j.unplugged_bytes).sum();
        let running = jobs.iter().any(|j| j.state != mempower_api::JobState::Done);
        Ok(!running && released >= regions * REGION)
    })?;
    for j in &jobs {
        println!(
            "autopilot job {}: {} MiB unplugged, {:.1} MiB host memory freed, {:.1} MiB migrated",
            j.id,
            j.unplugged_bytes / MIB,
            j.released_bytes as f64 / MIB as f64,
            j.migrated_bytes as f64 / MIB as f64
        );
        assert_eq!(j.error, None, "{j:?}");
    }
    Ok(jobs)
}

/// Seconds from `from` until the node's size came within 10% of its lowest after it.
fn time_to_90(samples: &[Sample], from: Instant) -> Option<f64> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= from).collect();
    let start = after.first()?.size;
    let low = after.iter().map(|s| s.size).min()?;
    let goal = low + (start - low) / 10;
    let hit = after.iter().find(|s| s.size <= goal)?;
    Some(hit.at.duration_since(from).as_secs_f64())
}

/// The autopilot thread's CPU time (user and system), from its task's stat.
fn autopilot_cpu(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "mempower-autopi" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        return Some(Duration::from_millis(ticks * 1000 / hz));
    }
    None
}

fn follows_the_working_set() -> Result<(), Failed> {
    booted("autopilot", working_set_story)
}

/// Boots a guest named `name` (alone: see [`ONE_AT_A_TIME`]) and runs `story` on it; if
/// the story fails, prints the autopilot's status and the VMM's and guest's last lines.
fn booted<T>(
    name: &str,
    story: fn(&mut mempower_tests::Guest, &VmApi, Instant) -> Result<T, Failed>,
) -> Result<T, Failed> {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let (mut guest, api) = boot(name)?;
    let out = story(&mut guest, &api, t0);
    if out.is_err() {
        println!("autopilot: {:?}", status(&api));
        println!("the VMM and the guest, last lines:\n{}", guest.tail(60));
    }
    out
}

fn working_set_story(
    guest: &mut mempower_tests::Guest,
    api: &VmApi,
    t0: Instant,
) -> Result<(), Failed> {
    let api = api.clone();
    let oom_before = api.vmstat("oom_kill")?;
    let first = status(&api)?;
    assert_eq!(first.mode, mempower_api::AutopilotMode::Autosize);
    assert!(!first.paused_by_user);
    let sampler = Sampler::start(&api);
    let live = api.fill(0, 32 * MIB, 1)?;

    // 1. Growing in steps: every step is met by plugging.
    let t = Instant::now();
    let plugged_before = api.node(0)?.plugged_bytes;
    let steps = grow_in_steps(&api, 448 * MIB, 10)?;
    let grown = api.node(0)?.plugged_bytes;
    print_phase("phase 1: grow in steps", t.elapsed());
    println!("plugged {} -> {} MiB", plugged_before / MIB, grown / MIB);
    assert!(grown >= plugged_before + 2 * REGION, "the node grew");

    // 2. A drop in big chunks: the excess goes back after the patience.
    let seq = last_seq(&api)?;
    let dropped = Instant::now();
    for f in &steps {
        api.release(f.handle)?;
    }
    wait_shrunk(&api, seq, 2)?;
    print_phase("phase 2: big drop given back", dropped.elapsed());
    let first_shrink = events(&api, seq)?
        .into_iter()
        .find(|e| e.action == AutopilotAction::Shrink)
        .ok_or("no shrink")?;
    println!("first shrink: {}", first_shrink.reason);

    // 3. Grown again, then a fragmented drop: one page in four stays.
    let t = Instant::now();
    // Interleaved fills until the node has grown, and two more: then a quarter of them
    // stays, spread over every region the fills touched.
    let (mut kept, mut others) = (Vec::new(), Vec::new());
    let plugged = api.node(0)?.plugged_bytes;
    let mut after_grow = 0;
    for i in 0..24 {
        wait_room(&api)?;
        let [(k, kb), (other, _)] = api.fill_interleaved(0, STEP, 30 + i, 4, 4096)?;
        kept.push((k, kb));
        others.push(other);
        if api.node(0)?.plugged_bytes > plugged {
            after_grow += 1;
            if after_grow > 2 {
                break;
            }
        }
    }
    assert!(
        after_grow > 0,
        "the interleaved fills never made the node grow"
    );
    print_phase("phase 3: grown by interleaved fills", t.elapsed());
    let seq = last_seq(&api)?;
    for other in others {
        api.release(other)?;
    }
    let frag = wait_shrunk(&api, seq, 1);
    print_phase("phase 3: fragmented drop", t.elapsed());
    let frag = frag?;
    let migrated: u64 = frag.iter().map(|j| j.migrated_bytes).sum();
    println!(
        "fragmented drop: {:.1} MiB migrated",
        migrated as f64 / MIB as f64
    );

    // 4. A spike: all the free memory but 40 MiB at once, under the low mark: met by
    // plugging.
    wait_until("the headroom back", GROW_WAIT, || {
        Ok(node0_free(&api)? >= 192 * MIB)
    })?;
    let before = api.node(0)?.plugged_bytes;
    let spike_bytes = node0_free(&api)?.saturating_sub(40 * MIB) / MIB * MIB;
    let spike = api.fill(0, spike_bytes, 40)?;
    let grow_latency = wait_until("a plug after the spike", GROW_WAIT, || {
        Ok(api.node(0)?.plugged_bytes > before)
    })?;
    println!(
        "grow latency after the spike: {:.2} s",
        grow_latency.as_secs_f64()
    );

    // 5. Off: nothing more happens.
    let off: AutopilotStatus = api.json(&["autopilot", "--node", "0", "--mode", "off"])?;
    assert_eq!(off.mode, mempower_api::AutopilotMode::Off);
    // A shrink started before ends as it would have.
    wait_until("the autopilot's last job", SHRINK_WAIT, || {
        let jobs: Vec<Job> = api.json(&["jobs"])?;
        Ok(jobs.iter().all(|j| j.state == mempower_api::JobState::Done))
    })?;
    let seq = last_seq(&api)?;
    let requested = api.node(0)?.requested_bytes;
    api.release(spike.handle)?;
    std::thread::sleep(PATIENCE * 2 + Duration::from_secs(4));
    let after: Vec<_> = events(&api, seq)?
        .into_iter()
        .filter(|e| matches!(e.action, AutopilotAction::Grow | AutopilotAction::Shrink))
        .collect();
    assert!(after.is_empty(), "the autopilot acted while off: {after:?}");
    assert_eq!(api.node(0)?.requested_bytes, requested);

    // 6. Nothing lost, nobody killed; the figures.
    let samples = sampler.stop();
    api.verify(&live)?;
    for (handle, bytes) in &kept {
        assert_eq!(
            api.verify_counts(*handle)?,
            (*bytes, 0),
            "kept fill {handle}"
        );
    }
    let oom_after = api.vmstat("oom_kill")?;
    assert_eq!(oom_after, oom_before, "OOM kills during the run");
    let end = status(&api)?;
    let (size, used) = samples.iter().fold((0u128, 0u128), |(a, b), s| {
        (a + u128::from(s.size), b + u128::from(s.used))
    });
    let resident = samples.iter().map(|s| s.resident).max().unwrap_or(0);
    println!(
        "autopilot figures: {} samples; size over use {:.2} (time-averaged boot+plugged \
         over the guest's used memory); peak hotplug resident {} MiB; 90% of the big drop \
         given back in {:.1} s; grow latency {:.2} s; {} grows, {} shrinks, {} regrets; \
         OOM kills {}; autopilot CPU {:?} in {:.0} s",
        samples.len(),
        size as f64 / used.max(1) as f64,
        resident / MIB,
        time_to_90(&samples, dropped).unwrap_or(f64::NAN),
        grow_latency.as_secs_f64(),
        end.grows,
        end.shrinks,
        end.regrets,
        oom_after - oom_before,
        autopilot_cpu(guest.pid()),
        t0.elapsed().as_secs_f64()
    );
    assert!(end.grows >= 2 && end.shrinks >= 2, "{end:?}");
    guest.poweroff_cleanly()?;
    print_phase("autopilot_follows_the_working_set", t0.elapsed());
    Ok(())
}

/// Allocates and touches `bytes` in this process (inside the test host: the VMM's host).
fn press(bytes: u64) -> Vec<u8> {
    let mut v = vec![0u8; bytes as usize];
    for page in v.chunks_mut(4096) {
        page[0] = 1;
    }
    v
}

fn host_meminfo(key: &str) -> Result<u64, Failed> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or(format!("no {key}"))?;
    let kb: u64 = line.split_whitespace().nth(1).ok_or("bad line")?.parse()?;
    Ok(kb * 1024)
}

fn host_pressure_tightens_the_headroom() -> Result<Completion, Failed> {
    if !is_inside_testhost() {
        return Ok(Completion::ignored_with(
            "allocates most of the host's memory: runs only inside the nested test host",
        ));
    }
    booted("autopilot-host", press_the_host)
}

fn press_the_host(
    guest: &mut mempower_tests::Guest,
    api: &VmApi,
    t0: Instant,
) -> Result<Completion, Failed> {
    let api = api.clone();
    let calm = status(&api)?;
    assert_eq!(calm.effective_headroom_bytes, calm.headroom_bytes);
    // Down to 8% of the host's memory available: under the law's 10% mark. If the host
    // runs out, this process is the one to go, not the VMM.
    std::fs::write("/proc/self/oom_score_adj", "1000")?;
    let (total, available) = (host_meminfo("MemTotal:")?, host_meminfo("MemAvailable:")?);
    let take = available.saturating_sub(total * 8 / 100);
    println!(
        "host: {} MiB of {} MiB available; taking {} MiB",
        available / MIB,
        total / MIB,
        take / MIB
    );
    let pressed = press(take);
    // The law tightens to its floor (a quarter of the headroom, or the low mark and half
    // a region if more: 128 MiB here) within 10 s.
    let floor = 128 * MIB;
    let tightened = wait_until("the headroom tightens to its floor", GROW_WAIT, || {
        Ok(status(&api)?.effective_headroom_bytes <= floor)
    })?;
    let tight = status(&api)?.effective_headroom_bytes;
    println!(
        "headroom {} -> {} MiB in {:.1} s of host pressure",
        calm.headroom_bytes / MIB,
        tight / MIB,
        tightened.as_secs_f64()
    );
    drop(pressed);
    let relaxed = wait_until("the headroom relaxes", Duration::from_secs(300), || {
        Ok(status(&api)?.effective_headroom_bytes == calm.headroom_bytes)
    })?;
    println!("headroom back in {:.1} s", relaxed.as_secs_f64());
    guest.poweroff_cleanly()?;
    print_phase("host_pressure_tightens_the_headroom", t0.elapsed());
    Ok(Completion::Completed)
}

fn main() {
    mempower_tests::main(vec![
        mempower_tests::trial("autopilot_follows_the_working_set", follows_the_working_set),
        mempower_tests::ignorable_trial(
            "host_pressure_tightens_the_headroom",
            host_pressure_tightens_the_headroom,
        ),
    ]);
}
