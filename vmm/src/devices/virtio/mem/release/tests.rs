use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use virtio_mem::memfd::{self, Pages};

use super::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// A node file of `SIZE` bytes, all written, and a releaser for it.
fn filled() -> (MemfdBackend, Releaser) {
    let file = memfd::create("release-test", SIZE, Pages::Small).unwrap();
    file.write_all_at(&vec![0xab; SIZE as usize], 0).unwrap();
    let twin = MemfdBackend::new(file.try_clone().unwrap(), 0, SIZE).unwrap();
    let releaser = Releaser::new(0, MemfdBackend::new(file, 0, SIZE).unwrap(), None);
    (twin, releaser)
}

fn resident(memfd: &MemfdBackend, start: u64, end: u64) -> u64 {
    memfd.resident_bytes(start, end - start).unwrap()
}

/// As a started releaser, whose thread the test runs when it chooses.
fn pause(r: &Releaser) -> Arc<Shared> {
    r.shared.lock().mode = Mode::Threaded;
    r.shared.clone()
}

#[test]
fn without_a_thread_a_close_punches_what_was_unplugged_and_closed() {
    let (memfd, r) = filled();
    r.note(0, 4 * MIB);
    assert_eq!(resident(&memfd, 0, SIZE), SIZE, "nothing before the close");
    r.closed(&[(8 * MIB, 10 * MIB)]);
    assert_eq!(resident(&memfd, 0, 4 * MIB), 0);
    assert_eq!(resident(&memfd, 4 * MIB, 8 * MIB), 4 * MIB);
    assert_eq!(resident(&memfd, 8 * MIB, 10 * MIB), 0);
    assert_eq!(r.punched(), (6 * MIB, 0));
    assert!(r.release_time() > Duration::ZERO);
    // A round with nothing unplugged or closed punches nothing.
    r.closed(&[]);
    assert_eq!(r.punched(), (6 * MIB, 0));
}

#[test]
fn a_started_releaser_queues_and_its_thread_punches() {
    let (memfd, r) = filled();
    let shared = pause(&r);
    r.note(0, SIZE);
    r.closed(&[]);
    assert_eq!(resident(&memfd, 0, SIZE), SIZE, "the close only queues");
    assert_eq!(shared.lock().queued.iter().collect::<Vec<_>>(), [(0, SIZE)]);
    let thread = std::thread::spawn(move || shared.run());
    assert!(r.settle(0, SIZE));
    assert_eq!(resident(&memfd, 0, SIZE), 0);
    assert_eq!(r.punched(), (SIZE, 0));
    r.stop();
    thread.join().unwrap();
}

#[test]
fn a_plug_takes_its_blocks_back_from_the_queue() {
    let (memfd, r) = filled();
    let shared = pause(&r);
    // Unplugged and closed, then plugged again before the thread ran: the guest writes.
    r.note(0, 8 * MIB);
    r.closed(&[]);
    r.reclaim(2 * MIB, 2 * MIB);
    memfd
        .file()
        .write_all_at(&vec![0xcd; 2 * MIB as usize], 2 * MIB)
        .unwrap();
    let thread = std::thread::spawn(move || shared.run());
    assert!(r.settle(0, SIZE));
    assert_eq!(resident(&memfd, 0, 2 * MIB), 0);
    assert_eq!(resident(&memfd, 4 * MIB, 8 * MIB), 0);
    let mut back = vec![0; 2 * MIB as usize];
    memfd.file().read_exact_at(&mut back, 2 * MIB).unwrap();
    assert!(back.iter().all(|&b| b == 0xcd), "the plug's data survives");
    assert_eq!(r.punched(), (6 * MIB, 0));
    r.stop();
    thread.join().unwrap();
}

#[test]
fn a_plug_in_the_same_round_as_its_unplug_is_never_punched() {
    let (memfd, r) = filled();
    r.note(0, 4 * MIB);
    r.reclaim(0, 2 * MIB);
    r.closed(&[]);
    assert_eq!(resident(&memfd, 0, 2 * MIB), 2 * MIB);
    assert_eq!(resident(&memfd, 2 * MIB, 4 * MIB), 0);
}

#[test]
fn a_plug_waits_for_the_punch_in_progress_that_overlaps_it() {
    let (_memfd, r) = filled();
    let shared = pause(&r);
    shared.lock().punching = Some((0, 4 * MIB));
    // Another range: no wait.
    let (tx, rx) = mpsc::channel();
    let other = r.share();
    std::thread::spawn(move || {
        other.reclaim(8 * MIB, MIB);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a plug elsewhere does not wait");
    // The punch's range: waits until it ends.
    let done = Arc::new(AtomicBool::new(false));
    let (plug, flag) = (r.share(), done.clone());
    let waiter = std::thread::spawn(move || {
        plug.reclaim(2 * MIB, MIB);
        flag.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!done.load(Ordering::SeqCst), "the plug waited");
    shared.lock().punching = None;
    shared.changed.notify_all();
    waiter.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn a_measurement_waits_only_for_punches_of_its_range() {
    let (_memfd, r) = filled();
    let shared = pause(&r);
    shared.lock().queued.insert(0, 4 * MIB);
    // Elsewhere: at once, though the queue is not empty.
    assert!(r.settle(8 * MIB, 4 * MIB));
    let thread = std::thread::spawn(move || shared.run());
    assert!(r.settle(0, 4 * MIB));
    assert!(r.shared.lock().queued.is_empty());
    r.stop();
    thread.join().unwrap();
    assert!(
        r.settle(0, SIZE),
        "a stopped releaser has nothing to wait for"
    );
}

#[test]
fn a_second_start_is_refused() {
    let (_memfd, r) = filled();
    pause(&r);
    assert!(matches!(
        r.start(|_| Ok(())),
        Err(ReleaseError::AlreadyStarted { node: 0 })
    ));
}

/// `mempower-release/N` under its real filter (kill mode) punches its node's file.
#[test]
fn the_release_thread_punches_under_its_filter() {
    const DONE: &str = "release-test: punched under the filter";
    if crate::test_child::scenario().is_some() {
        use crate::seccomp::{self, SeccompMode, ThreadKind};
        use std::os::fd::AsRawFd;
        crate::test_child::no_core_dumps();
        let (memfd, r) = filled();
        seccomp::prepare(SeccompMode::Kill).unwrap();
        seccomp::restrict_to_files(ThreadKind::Release, &[r.file().as_raw_fd()]).unwrap();
        r.start(|work| {
            crate::threads::spawn(ThreadKind::Release, "mempower-release/0", None, work)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .unwrap();
        r.note(0, SIZE);
        r.closed(&[]);
        assert!(r.settle(0, SIZE));
        assert_eq!(resident(&memfd, 0, SIZE), 0);
        r.stop();
        // Let the thread end under its filter too.
        std::thread::sleep(Duration::from_millis(100));
        println!("{DONE}");
        return;
    }
    let output = crate::test_child::run(
        "devices::virtio::mem::release::tests::the_release_thread_punches_under_its_filter",
        "release",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(DONE),
        "{}",
        crate::test_child::show(&output)
    );
}
