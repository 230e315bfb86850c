//! The `main` of `harness = false` test binaries: runs the trials here (direct mode), or
//! re-runs this very binary inside one nested test host.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use libtest_mimic::{Arguments, Completion, Conclusion, Failed, Trial};

use crate::images::{self, INITRAMFS_ENV, KERNEL_ENV, TESTHOST_INITRAMFS_ENV, TESTHOST_KERNEL_ENV};
use crate::mode::{self, Mode, MODE_ENV};
use crate::retries::{self, Retry, TestHostFailure};
use crate::testhost::{TestHost, TestHostError};
use crate::verdict::{self, TrialRecord};
use crate::vmm_bin::{self, BIN_ENV};
use crate::Result;

/// Set to `1` in the test host: this binary is the inner run.
pub const INSIDE_ENV: &str = "MEMPOWER_TEST_INSIDE";

/// Whether this process is the inner run, inside the test host.
pub fn is_inside_testhost() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1")
}

/// Runs the test binary's trials, with libtest's command line and output.
///
/// In nested mode (and not already inside the test host), builds the images and
/// `mempower` here, then runs this same binary with the same arguments inside one test
/// host, and exits with its exit code: the inner libtest output is the result. Listing
/// (`--list`), or a selection without any runnable trial, never boots a test host.
pub fn main(trials: Vec<Trial>) -> ! {
    main_with_memory(trials, None)
}

/// [`main`], with a nested test host of `memory_mib` MiB instead of the default
/// [`TestHost`]'s: for guests that touch more memory than that holds.
pub fn main_with_memory(trials: Vec<Trial>, memory_mib: Option<u64>) -> ! {
    let args = Arguments::from_args();
    if args.list {
        libtest_mimic::run(&args, trials).exit();
    }
    if is_inside_testhost() {
        let _ = mode::mode(); // Prints `mode: direct (...)` for the inner run.
                              // No summary here: the outer run counts this run's retry lines and prints it.
        libtest_mimic::run(&args, trials).exit();
    }
    let runnable = trials
        .iter()
        .filter(|t| !args.is_filtered_out(t) && !args.is_ignored(t))
        .count();
    if let Err(e) = retries::cap() {
        fail_all(&args, trials, &e.to_string());
    }
    let mode = match mode::mode() {
        Ok(mode) => mode,
        Err(e) => fail_all(&args, trials, &e.to_string()),
    };
    if mode == Mode::Direct || runnable == 0 {
        finish(libtest_mimic::run(&args, trials));
    }
    let start = Instant::now();
    let host = match prepare_nested(&args) {
        Ok(host) => match memory_mib {
            Some(mib) => host.memory_mib(mib),
            None => host,
        },
        Err(e) => fail_all(
            &args,
            trials,
            &format!("preparing the nested test host failed: {e}"),
        ),
    };
    crate::print_phase("images and mempower ready", start.elapsed());
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => fail_all(&args, trials, &format!("cannot find this test binary: {e}")),
    };
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    // A test host that dies without its exit marker, or freezes until its timeout, is a
    // failure of the emulated machine (QEMU TCG's nested SVM panics or wedges the test
    // host while a guest onlines memory: see images/README.md), not of the tests.
    let result = run_surviving_testhost_failures(&host, &exe, &argv, "the tests");
    let rc = match result {
        Ok(rc) => rc,
        Err(e) => {
            println!("error: the nested test run failed: {e}");
            101
        }
    };
    retries::print_summary();
    std::process::exit(rc);
}

/// A test binary's trial: `body` runs once. Inside the nested test host, a run that failed
/// after the emulated machine reset a vCPU of a guest this run booted (on its own thread),
/// while none of its VMMs failed (see `verdict`), runs once more in fresh guests, within
/// the binary's retry budget; that is said and counted (`retries: ..., 1 trial`). In
/// direct mode a trial runs once.
pub fn trial(name: &'static str, body: fn() -> std::result::Result<(), Failed>) -> Trial {
    Trial::test(name, move || run_trial(name, body, is_inside_testhost()))
}

/// [`trial`], for a test that may find, once running, that this machine cannot run it
/// (no free huge pages, say): its body then returns `Ok(Completion::ignored_with(why))`,
/// and the trial is reported as ignored with that reason, never as passed.
pub fn ignorable_trial(
    name: &'static str,
    body: fn() -> std::result::Result<Completion, Failed>,
) -> Trial {
    Trial::ignorable_test(name, move || run_trial(name, body, is_inside_testhost()))
}

fn run_trial<T>(
    name: &str,
    body: fn() -> std::result::Result<T, Failed>,
    nested: bool,
) -> std::result::Result<T, Failed> {
    let record = Arc::new(TrialRecord::default());
    let first =
        verdict::within(&record, || std::panic::catch_unwind(body)).unwrap_or_else(|panic| {
            let text = match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
                (Some(s), _) => s.to_string(),
                (_, Some(s)) => s.clone(),
                _ => "a panic without a message".to_string(),
            };
            Err(Failed::from(format!("test panicked: {text}")))
        });
    match first {
        Err(e) if nested && record.emulated_machine_failed() => {
            if !retries::allow(Retry::Trial) {
                return Err(e);
            }
            let why = e.message().and_then(|m| m.lines().next()).unwrap_or("");
            println!(
                "harness: {name} failed ({why}) after the emulated machine reset a vCPU of \
                 its nested guest; running it again in fresh guests"
            );
            verdict::within(&Arc::new(TrialRecord::default()), body)
        }
        result => result,
    }
}

/// Runs the trials in this process, in either mode, and prints the retry summary: for a
/// test binary whose trials drive test hosts or child harnesses themselves.
pub fn main_here(trials: Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    if args.list {
        libtest_mimic::run(&args, trials).exit();
    }
    let _ = mode::mode();
    finish(libtest_mimic::run(&args, trials));
}

/// Prints the retry summary after libtest's, and exits as libtest does.
fn finish(conclusion: Conclusion) -> ! {
    retries::print_summary();
    conclusion.exit();
}

/// Builds everything on this machine and returns a test host configured to run this
/// program again inside it, in direct mode, with the images and `mempower` preset.
pub fn nested_host() -> Result<TestHost> {
    let guest = images::guest()?;
    let testhost = images::testhost()?;
    let bin = vmm_bin::mempower_bin()?;
    Ok(TestHost::new()
        .images(testhost.clone())
        .env(INSIDE_ENV, "1")
        .env(MODE_ENV, "direct")
        .env(BIN_ENV, bin)
        .env(KERNEL_ENV, &guest.kernel)
        .env(INITRAMFS_ENV, &guest.initramfs)
        .env(TESTHOST_KERNEL_ENV, &testhost.kernel)
        .env(TESTHOST_INITRAMFS_ENV, &testhost.initramfs))
}

fn prepare_nested(args: &Arguments) -> Result<TestHost> {
    let mut host = nested_host()?;
    // The inner run's stdout is the test host's serial console, a terminal: keep it from
    // colouring what we pass on to a pipe or file.
    let colour_chosen = args.color.is_some()
        || ["NO_COLOR", "CLICOLOR_FORCE"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
    if !colour_chosen && !std::io::stdout().is_terminal() {
        host = host.env("NO_COLOR", "1");
    }
    Ok(host)
}

/// Reports `why` as the failure of every selected trial, with libtest's output.
fn fail_all(args: &Arguments, trials: Vec<Trial>, why: &str) -> ! {
    println!("error: {why}");
    let failing = trials
        .iter()
        .map(|t| {
            let why = why.to_string();
            Trial::test(t.name(), move || Err(Failed::from(why)))
                .with_kind(t.kind())
                .with_ignored_flag(t.has_ignored_flag())
        })
        .collect();
    finish(libtest_mimic::run(args, failing));
}

/// Runs a program (the demo, the bench) in the right mode: in nested mode, outside the
/// test host, this same executable runs again inside one test host (at most `timeout`)
/// with the same arguments; otherwise `body` runs here. Errors are printed as
/// `<name>: error: ...`.
pub fn run_program<E: std::fmt::Display>(
    name: &str,
    timeout: std::time::Duration,
    body: fn() -> std::result::Result<(), E>,
) -> std::process::ExitCode {
    run_program_with_memory(name, timeout, None, body)
}

/// [`run_program`], with a nested test host of `memory_mib` MiB instead of the default.
pub fn run_program_with_memory<E: std::fmt::Display>(
    name: &str,
    timeout: std::time::Duration,
    memory_mib: Option<u64>,
    body: fn() -> std::result::Result<(), E>,
) -> std::process::ExitCode {
    let result = match retries::cap()
        .map_err(|e| e.to_string())
        .and(mode::mode().map_err(|e| e.to_string()))
    {
        Ok(Mode::Nested) if !is_inside_testhost() => nested_host()
            .map_err(|e| e.to_string())
            .and_then(|host| {
                let host = match memory_mib {
                    Some(mib) => host.memory_mib(mib),
                    None => host,
                };
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
                run_surviving_testhost_failures(&host.timeout(timeout), &exe, &argv, name)
                    .map_err(|e| e.to_string())
            })
            .and_then(|rc| match rc {
                0 => Ok(()),
                rc => Err(format!("{name} failed in the test host (exit {rc})")),
            }),
        Ok(_) => body().map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if !is_inside_testhost() {
        retries::print_summary();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `exe` in the test host, which gets what is left of this binary's retry budget;
/// a test host that panics (QEMU exits without the exit marker) or freezes (a silent
/// console, or the run outlives its timeout) is replaced while the budget lasts. Each
/// rerun is announced and counted.
fn run_surviving_testhost_failures(
    host: &TestHost,
    exe: &std::path::Path,
    argv: &[OsString],
    what: &str,
) -> std::result::Result<i32, TestHostError> {
    loop {
        let run = host
            .clone()
            .env(retries::MAX_ENV, retries::remaining().to_string())
            .run(exe, argv);
        let Some(failure) = run
            .as_ref()
            .err()
            .and_then(TestHostError::emulated_machine_failure)
        else {
            return run;
        };
        let how = match failure {
            TestHostFailure::Panic => "died",
            TestHostFailure::Freeze => "froze",
        };
        if !retries::allow(Retry::TestHost(failure)) {
            return run;
        }
        if let Err(e) = run {
            println!("warning: the test host {how} ({e}); running {what} again in a fresh one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::VmmEnd;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails its first run, after its guests' VMMs ended as `ends` say.
    fn flaky(calls: &AtomicU32, ends: &[VmmEnd]) -> std::result::Result<(), Failed> {
        if calls.fetch_add(1, Ordering::SeqCst) > 0 {
            return Ok(());
        }
        for end in ends {
            verdict::current().expect("a trial's run").note(*end);
        }
        panic!("the guest went away");
    }

    /// A trial that finds it cannot run here is counted as ignored, with its reason.
    #[test]
    fn an_ignorable_trial_is_ignored_not_passed() {
        fn no_pool() -> std::result::Result<Completion, Failed> {
            Ok(Completion::ignored_with(
                "the host has 0 free 2 MiB huge pages",
            ))
        }
        fn ran() -> std::result::Result<Completion, Failed> {
            Ok(Completion::Completed)
        }
        // Its report would look like another test binary's in this one's output.
        let args = Arguments {
            test_threads: Some(1),
            logfile: Some("/dev/null".into()),
            ..Arguments::default()
        };
        let trials = vec![
            ignorable_trial("no_pool", no_pool),
            ignorable_trial("ran", ran),
        ];
        let conclusion = libtest_mimic::run(&args, trials);
        assert_eq!((conclusion.num_ignored, conclusion.num_passed), (1, 1));
        assert_eq!(conclusion.num_failed, 0);
    }

    /// One test, as the retry budget of the process is one for all its tests.
    #[test]
    fn a_trial_runs_again_only_after_its_own_guest_was_reset_within_the_cap() {
        static RESET_CALLS: AtomicU32 = AtomicU32::new(0);
        static NO_RESET: AtomicU32 = AtomicU32::new(0);
        static VMM_FAILED: AtomicU32 = AtomicU32::new(0);
        static DIRECT: AtomicU32 = AtomicU32::new(0);
        static OTHER: AtomicU32 = AtomicU32::new(0);
        static PAST_CAP: AtomicU32 = AtomicU32::new(0);
        const RESET: &[VmmEnd] = &[VmmEnd::EmulatedReset];
        const BOTH: &[VmmEnd] = &[VmmEnd::EmulatedReset, VmmEnd::VmmFailed];
        assert_eq!(
            retries::TALLY.total(),
            0,
            "this process's budget is untouched"
        );
        // A failure of its own, after a VMM failed beside the reset, or on real KVM is
        // the trial's result.
        let own = run_trial("no_reset", || flaky(&NO_RESET, &[VmmEnd::PowerOff]), true);
        assert_eq!(
            own.unwrap_err().message(),
            Some("test panicked: the guest went away")
        );
        assert!(run_trial("vmm_failed", || flaky(&VMM_FAILED, BOTH), true).is_err());
        assert!(run_trial("direct", || flaky(&DIRECT, RESET), false).is_err());
        for calls in [&NO_RESET, &VMM_FAILED, &DIRECT] {
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
        // Another trial's reset, on another thread, buys this one nothing.
        let other = std::thread::spawn(|| {
            verdict::within(&Arc::new(TrialRecord::default()), || {
                verdict::current().unwrap().note(VmmEnd::EmulatedReset)
            })
        });
        other.join().unwrap();
        assert!(run_trial("other", || flaky(&OTHER, &[]), true).is_err());
        assert_eq!(OTHER.load(Ordering::SeqCst), 1);
        assert_eq!(retries::TALLY.total(), 0);
        // Its own guest's reset: run again, and counted.
        assert!(run_trial("reset", || flaky(&RESET_CALLS, RESET), true).is_ok());
        assert_eq!(RESET_CALLS.load(Ordering::SeqCst), 2);
        assert_eq!(retries::TALLY.count(Retry::Trial), 1);
        // The default cap (1 per binary) is spent: the next reset fails the trial.
        if std::env::var_os(retries::MAX_ENV).is_none() {
            assert!(run_trial("past_cap", || flaky(&PAST_CAP, RESET), true).is_err());
            assert_eq!(PAST_CAP.load(Ordering::SeqCst), 1);
            assert_eq!(retries::TALLY.count(Retry::Trial), 1);
        }
    }
}
