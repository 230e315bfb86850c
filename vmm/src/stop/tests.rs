//! The stop sequence in child processes ([`crate::test_child`]): the real logger on
//! stderr, the real watchdog, and seccomp filters as in `mempower run`.

use std::time::Instant;

use super::*;
use crate::seccomp::{self, ThreadKind};
use crate::test_child::{self, show};

/// The child's side: the event loop's stop sequence, then a teardown that `scenario`
/// says hangs or finishes.
fn child(scenario: &str) {
    crate::logger::init(Some(log::LevelFilter::Info), None).unwrap();
    seccomp::prepare(seccomp::SeccompMode::Kill).unwrap();
    seccomp::restrict_to_files(ThreadKind::EventLoop, &[]).unwrap();
    // The main thread's filter, as when the event loop ends.
    seccomp::apply(ThreadKind::EventLoop).unwrap();
    let reason = ExitReason::Reset("triple fault in the test".into());
    report(&reason);
    let watchdog = Watchdog::arm(Duration::from_millis(300), status(&reason), || {
        seccomp::enter(ThreadKind::Watchdog)
    })
    .unwrap();
    log::info!("tearing down");
    match scenario {
        // A teardown stuck for good, as on a join of a thread that never ends.
        "hang" => loop {
            std::thread::park();
        },
        "finish" => {
            watchdog.disarm();
            std::thread::sleep(Duration::from_millis(600));
            log::info!("teardown done");
            std::process::exit(0);
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn run_child(scenario: &str) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let output = test_child::run(
        "stop::tests::the_reason_comes_before_the_teardown_and_a_stuck_teardown_still_exits",
        scenario,
    );
    (output, started.elapsed())
}

/// Where `needle` starts in `haystack`, for ordering checks.
fn at(haystack: &str, needle: &str) -> usize {
    haystack
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} missing from:\n{haystack}"))
}

#[test]
fn the_reason_comes_before_the_teardown_and_a_stuck_teardown_still_exits() {
    if let Some(scenario) = test_child::scenario() {
        return child(&scenario);
    }
    let (output, took) = run_child("hang");
    assert_eq!(
        output.status.code(),
        Some(i32::from(EXIT_GUEST_RESET)),
        "{}",
        show(&output)
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = at(&stderr, "WARN  [");
    assert!(stderr[reason..].starts_with("WARN  ["), "{stderr}");
    assert!(
        stderr.contains("guest reset (triple fault in the test)"),
        "{stderr}"
    );
    let teardown = at(&stderr, "tearing down");
    let fired = at(
        &stderr,
        "[mempower-watchdog] vmm::stop: the teardown took longer than 300ms; \
         exiting with status 3 without finishing it",
    );
    assert!(reason < teardown && teardown < fired, "{stderr}");

    // A teardown that finishes in time is left alone.
    let (output, _) = run_child("finish");
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("teardown done") && !stderr.contains("took longer"),
        "{stderr}"
    );
}

#[test]
fn caught_panics_say_what_happened() {
    let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
    assert_eq!(
        panic_message(&*caught(|| panic!("a static message"))),
        "a static message"
    );
    let n = 3;
    let formatted = std::panic::catch_unwind(move || panic!("queue {n} broke")).unwrap_err();
    assert_eq!(panic_message(&*formatted), "queue 3 broke");
    let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
    assert_eq!(panic_message(&*other), "(no message)");
}

#[test]
fn exit_statuses_follow_the_reason() {
    assert_eq!(status(&ExitReason::PowerOff), 0);
    assert_eq!(status(&ExitReason::Stopped("API".into())), 0);
    assert_eq!(status(&ExitReason::Reset("panic".into())), 3);
    assert_eq!(status(&ExitReason::Error("KVM".into())), 1);
    assert_eq!(status(&ExitReason::GuestFault("unplugged".into())), 4);
}
