//! The driver on a scripted guest and a recording control: what it reads, what it asks,
//! and when it keeps still.

use std::sync::atomic::{AtomicU64, Ordering};

use agent_protocol::{NodeSignals, VmCounters};

use super::*;

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;

/// What the scripted guest reports: node 0's free memory, and whether the agent answers.
#[derive(Default)]
struct Guest {
    free: AtomicU64,
    silent: std::sync::atomic::AtomicBool,
}

struct Script(Arc<Guest>);

impl Sensors for Script {
    fn guest(&mut self) -> Result<GuestSignals, String> {
        if self.0.silent.load(Ordering::SeqCst) {
            return Err("the guest agent is not connected".into());
        }
        Ok(GuestSignals {
            nodes: vec![NodeSignals {
                node: 0,
                free_bytes: self.0.free.load(Ordering::SeqCst),
                file_bytes: 0,
                anon_bytes: 0,
                online_bytes: 0,
            }],
            pressure: None,
            counters: VmCounters::default(),
        })
    }

    fn host(&mut self) -> Result<HostSignals, String> {
        Err("no host in this test".into())
    }
}

/// Node 0's device as the driver sees it, and what it was asked.
#[derive(Default)]
struct Control {
    requested: AtomicU64,
    /// What running jobs have claimed: the target is that much above the requested size.
    claimed: AtomicU64,
    targets: Mutex<Vec<u64>>,
    compactions: Mutex<Vec<u64>>,
    /// Jobs still running.
    running: std::sync::atomic::AtomicBool,
}

impl NodeControl for Control {
    fn sizes(&self, node: u32) -> Result<Sizes, String> {
        assert_eq!(node, 0);
        let r = self.requested.load(Ordering::SeqCst);
        Ok(Sizes {
            target: r + self.claimed.load(Ordering::SeqCst),
            requested: r,
            plugged: r,
        })
    }

    fn set_target(&self, _: u32, bytes: u64) -> Result<(), String> {
        self.targets.locked().push(bytes);
        self.requested.store(bytes, Ordering::SeqCst);
        Ok(())
    }

    fn shrink(&self, _: u32, regions: u32) -> Result<u64, String> {
        let mut c = self.compactions.locked();
        c.push(u64::from(regions));
        self.running.store(true, Ordering::SeqCst);
        Ok(c.len() as u64)
    }

    fn running(&self, _: u64) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

struct Rig {
    guest: Arc<Guest>,
    control: Arc<Control>,
    pilot: Autopilot,
}

/// Node 0 of 1 GiB hotplug memory, 512 MiB plugged, node 1 without hotplug memory; a
/// sample every 10 ms, 200 ms of patience.
fn rig(mode: Mode) -> Rig {
    let mut s = Settings::default_for(8 * REGION, REGION);
    s.mode = mode;
    s.interval = Duration::from_millis(10);
    s.patience = Duration::from_millis(200);
    let guest = Arc::new(Guest::default());
    guest.free.store(300 * MIB, Ordering::SeqCst);
    let control = Arc::new(Control::default());
    control.requested.store(4 * REGION, Ordering::SeqCst);
    let spawn = |work: Box<dyn FnOnce() + Send>| Ok(std::thread::spawn(work));
    let pilot = Autopilot::start(
        vec![Some((s, 8 * REGION)), None],
        control.clone(),
        Box::new(Script(guest.clone())),
        &spawn,
    )
    .unwrap();
    Rig {
        guest,
        control,
        pilot,
    }
}

/// Waits up to 10 s for `done`.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_short_node_grows_at_once_and_the_event_says_why() {
    let rig = rig(Mode::Autosize);
    rig.guest.free.store(10 * MIB, Ordering::SeqCst);
    eventually("a grow", || !rig.control.targets.locked().is_empty());
    let target = rig.control.targets.locked()[0];
    assert!(target > 4 * REGION && target % REGION == 0, "{target}");
    let status = rig.pilot.status(0).unwrap();
    assert_eq!((status.grows, status.shrinks), (1, 0));
    let last = status.last.unwrap();
    assert_eq!(last.action, AutopilotAction::Grow);
    assert_eq!((last.from_bytes, last.to_bytes), (4 * REGION, target));
    assert_eq!(last.inputs.free_bytes, 10 * MIB);
    assert!(last.reason.contains("grow"), "{}", last.reason);
    assert_eq!(rig.pilot.events(None), std::slice::from_ref(&last));
    assert!(rig.pilot.events(Some(last.seq)).is_empty());
}

#[test]
fn spare_memory_goes_after_patience_by_one_compaction_at_a_time() {
    let rig = rig(Mode::Autosize);
    rig.guest.free.store(900 * MIB, Ordering::SeqCst);
    let started = Instant::now();
    eventually("a compaction", || {
        !rig.control.compactions.locked().is_empty()
    });
    assert!(started.elapsed() >= Duration::from_millis(150), "patience");
    let asked = rig.control.compactions.locked()[0];
    assert!(asked >= 1, "{asked} regions");
    // While it runs, the spare memory is still there: no second one.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(rig.control.compactions.locked().len(), 1);
    let status = rig.pilot.status(0).unwrap();
    assert_eq!(status.shrinks, 1);
    assert_eq!(status.last.unwrap().job, Some(1));
    assert!(
        rig.control.targets.locked().is_empty(),
        "a shrink is no resize"
    );
}

#[test]
fn off_and_silent_guests_decide_nothing() {
    let rig = rig(Mode::Off);
    rig.guest.free.store(10 * MIB, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(rig.control.targets.locked().is_empty());
    assert!(rig.pilot.events(None).is_empty());
    // On, with the agent silent: still nothing.
    rig.guest.silent.store(true, Ordering::SeqCst);
    let on = AutopilotSettings {
        mode: Some(AutopilotMode::Autosize),
        ..Default::default()
    };
    let status = rig.pilot.configure(0, &on).unwrap();
    assert_eq!(status.mode, AutopilotMode::Autosize);
    std::thread::sleep(Duration::from_millis(200));
    assert!(rig.control.targets.locked().is_empty());
    // The agent answers: the grow comes.
    rig.guest.silent.store(false, Ordering::SeqCst);
    eventually("a grow", || !rig.control.targets.locked().is_empty());
}

#[test]
fn a_user_takes_over_until_the_autopilot_is_set_again() {
    let rig = rig(Mode::Autosize);
    rig.pilot.user_acted(0, "a resize", 2 * REGION);
    let status = rig.pilot.status(0).unwrap();
    assert!(status.paused_by_user);
    assert_eq!(status.last.unwrap().action, AutopilotAction::User);
    rig.guest.free.store(10 * MIB, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        rig.control.targets.locked().is_empty(),
        "the user's size holds"
    );
    rig.pilot
        .configure(0, &AutopilotSettings::default())
        .unwrap();
    assert!(!rig.pilot.status(0).unwrap().paused_by_user);
    eventually("a grow", || !rig.control.targets.locked().is_empty());
}

#[test]
fn bad_settings_and_nodes_are_refused_and_change_nothing() {
    let rig = rig(Mode::Off);
    let bad = AutopilotSettings {
        mode: Some(AutopilotMode::Autosize),
        min_bytes: Some(6 * REGION),
        max_bytes: Some(4 * REGION),
        ..Default::default()
    };
    let err = rig.pilot.configure(0, &bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "autopilot: min 768 MiB is above max 512 MiB"
    );
    assert_eq!(rig.pilot.status(0).unwrap().mode, AutopilotMode::Off);
    let above = AutopilotSettings {
        max_bytes: Some(16 * REGION),
        ..Default::default()
    };
    assert_eq!(
        rig.pilot.configure(0, &above).unwrap_err().to_string(),
        "autopilot: max 2048 MiB is above node 0's hotplug memory (1024 MiB)"
    );
    assert!(matches!(
        rig.pilot.status(1),
        Err(AutopilotError::NoHotplugRegion(1))
    ));
    assert!(matches!(
        rig.pilot.configure(7, &bad),
        Err(AutopilotError::NoSuchNode(7))
    ));
}

#[test]
fn after_a_shrink_ends_the_node_still_grows_when_short() {
    let rig = rig(Mode::Autosize);
    rig.guest.free.store(900 * MIB, Ordering::SeqCst);
    eventually("a shrink", || !rig.control.compactions.locked().is_empty());
    // The job removes its region, and ends.
    let asked = rig.control.compactions.locked()[0];
    let r = rig.control.requested.load(Ordering::SeqCst);
    rig.control
        .requested
        .store(r - asked * REGION, Ordering::SeqCst);
    rig.guest.free.store(300 * MIB, Ordering::SeqCst);
    rig.control.running.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    rig.guest.free.store(10 * MIB, Ordering::SeqCst);
    eventually("a grow after the shrink", || {
        !rig.control.targets.locked().is_empty()
    });
}

#[test]
fn a_grow_during_a_shrink_lands_where_the_law_asked() {
    let rig = rig(Mode::Autosize);
    rig.guest.free.store(900 * MIB, Ordering::SeqCst);
    eventually("a shrink", || !rig.control.compactions.locked().is_empty());
    let regions = rig.control.compactions.locked()[0];
    // The job claims its regions: the requested size drops, the target stays.
    let before = rig.control.requested.load(Ordering::SeqCst);
    rig.control
        .requested
        .store(before - regions * REGION, Ordering::SeqCst);
    rig.control
        .claimed
        .store(regions * REGION, Ordering::SeqCst);
    // A spike meanwhile.
    rig.guest.free.store(10 * MIB, Ordering::SeqCst);
    eventually("a grow", || !rig.control.targets.locked().is_empty());
    let asked = rig.control.targets.locked()[0];
    let grow = rig
        .pilot
        .events(None)
        .into_iter()
        .find(|e| e.action == AutopilotAction::Grow)
        .unwrap();
    // The law saw the requested size (the claim counted once), and the target covers
    // what the job will take off it when it ends.
    assert_eq!(grow.from_bytes, before - regions * REGION);
    assert_eq!(asked, grow.to_bytes + regions * REGION);
}
