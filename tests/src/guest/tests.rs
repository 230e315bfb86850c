//! Tests of the guest driver, against fake VMMs (shell scripts).

use super::*;
use crate::verdict::{self, TrialRecord, VmmEnd};

const GOOD: &str = r#"MEMPOWER-READY {"version":1,"kernel":"6.1.192","uptime_ms":12345,"nodes":[{"id":0,"cpus":[0],"mem_total_kib":123456},{"id":1,"cpus":[1],"mem_total_kib":234567}]}"#;

#[test]
fn ready_good() {
    let info = parse_ready_line(GOOD).unwrap().unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.kernel, "6.1.192");
    assert_eq!(info.uptime_ms, 12345);
    assert_eq!(
        info.nodes,
        vec![
            NodeInfo {
                id: 0,
                cpus: vec![0],
                mem_total_kib: 123456
            },
            NodeInfo {
                id: 1,
                cpus: vec![1],
                mem_total_kib: 234567
            },
        ]
    );
    // Other text before the marker (an interleaved kernel message), a CR, and
    // unknown fields are tolerated.
    let noisy = format!("[    3.2] x{GOOD}\r").replace(r#""nodes""#, r#""extra":true,"nodes""#);
    assert_eq!(parse_ready_line(&noisy).unwrap().unwrap(), info);
}

#[test]
fn ready_absent_or_malformed() {
    assert!(parse_ready_line("[    3.201000] Run /init as init process").is_none());
    let bad = |line: &str| {
        matches!(
            parse_ready_line(line),
            Some(Err(GuestError::BadReady { .. }))
        )
    };
    assert!(bad("MEMPOWER-READY"));
    assert!(bad("MEMPOWER-READY {"));
    assert!(bad(r#"MEMPOWER-READY {"version":1}"#));
    assert!(bad(&GOOD.replace("\"cpus\":[0]", "\"cpus\":\"0\"")));
    assert!(bad(&GOOD.replace("\"version\":1", "\"version\":2")));
    assert!(bad(&GOOD[..GOOD.len() - 1]));
}

#[test]
fn run_args() {
    let images = GuestImages {
        kernel: "/k/vmlinux".into(),
        initramfs: "/i.cpio".into(),
    };
    let args = GuestBuilder::new()
        .node(0, "0", 256)
        .node(1, "1-2", 512)
        .cmdline("foo=1")
        .cmdline("-- x")
        .arg("--api-socket")
        .arg("/s")
        .args(&images);
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--kernel",
            "/k/vmlinux",
            "--initramfs",
            "/i.cpio",
            "--cmdline",
            "foo=1 -- x",
            "--numa",
            "node=0,cpus=0,memory=256M",
            "--numa",
            "node=1,cpus=1-2,memory=512M",
            "--api-socket",
            "/s",
        ]
    );
}

/// Runs a shell script as the "VMM", bypassing mode, images and the real binary.
fn fake_guest(script: &str, timeout: Duration) -> Guest {
    spawn(Path::new("/bin/sh"), &["-c".into(), script.into()], timeout).unwrap()
}

#[test]
fn fake_guest_ready_and_poweroff() {
    let script = format!(
        "echo '[    0.1] Linux'; echo vmm-log >&2; echo '[    3.2] Run /init as init process'; echo '{GOOD}'; \
         read cmd; [ \"$cmd\" = poweroff ] && exit 0; exit 9"
    );
    let mut guest = fake_guest(&script, Duration::from_secs(20));
    let info = guest.wait_ready().unwrap();
    assert_eq!(info.nodes.len(), 2);
    // stderr has its own reader thread: its line may land after READY's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !guest
        .lines()
        .iter()
        .any(|l| l.stream == Stream::Vmm && l.text == "vmm-log")
    {
        assert!(
            Instant::now() < deadline,
            "the VMM's stderr line was not recorded"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(guest
        .wait_for_line("Run /init", Duration::from_secs(1))
        .unwrap()
        .contains("as init process"));
    assert_eq!(guest.poweroff().unwrap().code(), Some(0));
}

#[test]
fn a_poweroff_that_exits_non_zero_is_an_error() {
    let mut guest = fake_guest("read cmd; exit 3", Duration::from_secs(20));
    let err = guest.poweroff_cleanly().unwrap_err();
    assert!(
        matches!(&err, crate::HarnessError::Guest(GuestError::UncleanPoweroff { status }) if status.contains('3')),
        "{err}"
    );
    let mut guest = fake_guest("read cmd; exit 0", Duration::from_secs(20));
    guest.poweroff_cleanly().unwrap();
}

#[test]
fn fake_guest_panics() {
    let mut guest = fake_guest(
        "echo '[ 1.0] Kernel panic - not syncing: boom'; exec sleep 30",
        Duration::from_secs(20),
    );
    let t0 = Instant::now();
    let err = guest.wait_ready().unwrap_err();
    assert!(
        matches!(
            err,
            crate::HarnessError::Guest(GuestError::KernelPanic { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(
        guest.end(),
        None,
        "still running: not the emulated machine's"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
} // Dropping kills the sleeping "VMM".

#[test]
fn fake_guest_exits_early() {
    let mut guest = fake_guest(
        "echo '[ 0.1] Linux'; echo 'error: no KVM' >&2; exit 1",
        Duration::from_secs(20),
    );
    let err = guest.wait_ready().unwrap_err();
    match &err {
        crate::HarnessError::Guest(GuestError::VmmExited {
            status, vmm_tail, ..
        }) => {
            assert!(status.contains('1'), "{status}");
            assert!(vmm_tail.contains("error: no KVM"), "{vmm_tail}");
            assert!(!vmm_tail.contains("Linux"), "{vmm_tail}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(guest.end(), Some(VmmEnd::VmmFailed));
}

const RESET_AT_VECTOR: &str =
    "mempower: guest reset (triple fault or shutdown: vCPU 1 rip=0xfff0 rsp=0x0)";

#[test]
fn a_reset_vector_triple_fault_is_told_from_other_exits() {
    let script =
        format!("echo '[ 6.8] Run /init as init process'; echo '{RESET_AT_VECTOR}' >&2; exit 3");
    let mut guest = fake_guest(&script, Duration::from_secs(20));
    let err = guest.wait_ready().unwrap_err();
    assert_eq!(guest.end(), Some(VmmEnd::EmulatedReset), "{err}");
    // The same line from a VMM killed by seccomp (159) or one that panicked (101).
    for code in [159, 101, 1] {
        let mut guest = fake_guest(
            &format!("echo '{RESET_AT_VECTOR}' >&2; exit {code}"),
            Duration::from_secs(20),
        );
        let err = guest.wait_ready().unwrap_err();
        assert_eq!(guest.end(), Some(VmmEnd::VmmFailed), "{err}");
    }
}

/// A dropped guest tells the trial that booted it how its VMM ended; a VMM killed at
/// drop, or a boot retried, tells nothing.
#[test]
fn a_dropped_guest_reports_to_its_trial() {
    let record = Arc::new(TrialRecord::default());
    verdict::within(&record, || {
        let mut killed = fake_guest("exec sleep 30", Duration::from_secs(20));
        assert!(killed.wait_exit(Duration::from_millis(50)).is_err());
        drop(killed);
        let mut retried = fake_guest(
            &format!("echo '{RESET_AT_VECTOR}' >&2; exit 3"),
            Duration::from_secs(20),
        );
        assert!(retried.wait_ready().is_err());
        retried.boot_retried = true;
    });
    assert!(!record.emulated_machine_failed());
    // Reset as the test drove it: the VMM is still stopping when the guest is dropped.
    verdict::within(&record, || {
        let guest = fake_guest(
            &format!("echo '{RESET_AT_VECTOR}' >&2; sleep 1; exit 3"),
            Duration::from_secs(20),
        );
        let said = guest.scan(Instant::now() + Duration::from_secs(10), |l| {
            (l.stream == Stream::Vmm && l.text.contains("guest reset")).then_some(())
        });
        assert!(said.is_some());
        let t0 = Instant::now();
        drop(guest);
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    });
    assert!(record.emulated_machine_failed());
    // A VMM killed by seccomp in the same run: ours.
    verdict::within(&record, || {
        let mut guest = fake_guest("exit 159", Duration::from_secs(20));
        assert_eq!(
            guest.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(159)
        );
    });
    assert!(!record.emulated_machine_failed());
}

#[test]
fn fake_guest_times_out() {
    let mut guest = fake_guest("echo booting; exec sleep 30", Duration::from_millis(500));
    let t0 = Instant::now();
    let err = guest.wait_ready().unwrap_err();
    assert!(
        matches!(err, crate::HarnessError::Guest(GuestError::Timeout { .. })),
        "{err}"
    );
    assert_eq!(guest.end(), None);
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Not exiting: the exit wait times out too, and drop kills it.
    assert!(guest.wait_exit(Duration::from_millis(100)).is_err());
}
