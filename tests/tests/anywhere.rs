//! The harness works from a checkout under /tmp. The test host used to mount a tmpfs over
//! /tmp, which hid a checkout there and its work directory ("cannot mount the work
//! directory").
//!
//! `harness_runs_from_tmp` copies this test binary and `mempower` into a fresh directory
//! under /tmp, and runs the copy from there as an outer harness, with its target
//! directory (and so the test host's work directory) there too. In nested mode the copy
//! boots one test host and runs again inside it, where `probe` checks what a test needs
//! of that directory: its own program, its current directory, a writable work directory,
//! `mempower`, and Unix sockets in /tmp. No guest boots.

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};
use mempower_tests::images::{self, INITRAMFS_ENV, KERNEL_ENV};
use mempower_tests::images::{TESTHOST_INITRAMFS_ENV, TESTHOST_KERNEL_ENV};
use mempower_tests::vmm_bin::{self, BIN_ENV};
use mempower_tests::{is_inside_testhost, print_phase, retries, wait_timeout, Mode};

/// Set (to the directory under /tmp) for the copy: it runs `probe`.
const PROBE_ENV: &str = "MEMPOWER_TEST_TMP_PROBE";
/// The probe's report line: `MEMPOWER-TMP-PROBE inside=<bool>`.
const PROBE_MARKER: &str = "MEMPOWER-TMP-PROBE";
/// One test host boot, with room for the harness's reruns.
const CHILD_WAIT: Duration = Duration::from_secs(30 * 60);

fn under(what: &str, path: &Path, dir: &Path) -> Result<(), Failed> {
    match path.starts_with(dir) {
        true => Ok(()),
        false => Err(format!("{what} is {}, not under {}", path.display(), dir.display()).into()),
    }
}

/// Runs in the copy, inside the test host in nested mode.
fn probe() -> Result<(), Failed> {
    let dir = PathBuf::from(std::env::var_os(PROBE_ENV).ok_or("no probe directory")?);
    under("this program", &std::env::current_exe()?, &dir)?;
    let cwd = std::env::current_dir()?;
    if cwd != dir {
        return Err(format!(
            "current directory {}, expected {}",
            cwd.display(),
            dir.display()
        )
        .into());
    }
    let bin = vmm_bin::mempower_bin()?;
    under("mempower", &bin, &dir)?;
    let out = Command::new(&bin).arg("--version").output()?;
    if !out.status.success() {
        return Err(format!("{} --version: {:?}", bin.display(), out).into());
    }
    if is_inside_testhost() {
        // The shared work directory, under the /tmp directory, writable.
        let work =
            PathBuf::from(std::env::var_os("MEMPOWER_TEST_WORK").ok_or("no work directory")?);
        under("the work directory", &work, &dir)?;
        let file = work.join("probe");
        std::fs::write(&file, "written in the test host")?;
        assert_eq!(std::fs::read_to_string(&file)?, "written in the test host");
    }
    // /tmp takes a Unix socket, as the tests' API sockets need.
    let socket = mempower_tests::socket_path("tmp-probe", "sock");
    let listener = UnixListener::bind(&socket)?;
    let _client = UnixStream::connect(&socket)?;
    listener.accept()?;
    std::fs::remove_file(&socket)?;
    println!("{PROBE_MARKER} inside={}", is_inside_testhost());
    Ok(())
}

/// A fresh directory under /tmp, removed on drop unless kept.
struct TmpDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.keep {
            println!("kept {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn copy_into(file: &Path, dir: &Path) -> Result<PathBuf, Failed> {
    let name = file.file_name().ok_or("no file name")?;
    let to = dir.join(name);
    std::fs::copy(file, &to)
        .map_err(|e| format!("copying {} to {}: {e}", file.display(), to.display()))?;
    Ok(to)
}

fn harness_runs_from_tmp() -> Result<(), Failed> {
    let t0 = Instant::now();
    let mut tmp = TmpDir {
        path: PathBuf::from(format!("/tmp/mempower-anywhere-{}", std::process::id())),
        keep: false,
    };
    let _ = std::fs::remove_dir_all(&tmp.path);
    std::fs::create_dir_all(tmp.path.join("bin"))?;
    let exe = copy_into(&std::env::current_exe()?, &tmp.path.join("bin"))?;
    let bin = copy_into(&vmm_bin::mempower_bin()?, &tmp.path.join("bin"))?;
    let mode = mempower_tests::mode::mode()?;

    let mut child = Command::new(&exe);
    child
        .args(["--exact", "probe"])
        .current_dir(&tmp.path)
        .env(PROBE_ENV, &tmp.path)
        .env("CARGO_TARGET_DIR", tmp.path.join("target"))
        .env(BIN_ENV, &bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if mode == Mode::Nested {
        // Built here, once; only the harness's own directories move to /tmp.
        let guest = images::guest()?;
        let host = images::testhost()?;
        child
            .env(KERNEL_ENV, &guest.kernel)
            .env(INITRAMFS_ENV, &guest.initramfs)
            .env(TESTHOST_KERNEL_ENV, &host.kernel)
            .env(TESTHOST_INITRAMFS_ENV, &host.initramfs);
    }
    println!("running {} from {}", exe.display(), tmp.path.display());
    let mut child = child.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut reports = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(PROBE_MARKER) {
                reports.push(line.clone());
            }
            // The copy's retries count in this run's summary too.
            if !retries::TALLY.relay(&line) {
                println!("tmp-run: {line}");
            }
        }
        reports
    });
    let status = wait_timeout(&mut child, CHILD_WAIT)?;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let reports = reader.join().map_err(|_| "the output reader panicked")?;
    print_phase("harness run from /tmp", t0.elapsed());
    let expected = format!("{PROBE_MARKER} inside={}", mode == Mode::Nested);
    let ok = status.is_some_and(|s| s.success()) && reports.iter().any(|l| l.contains(&expected));
    if !ok {
        tmp.keep = true;
        let status = status.map_or("no exit in time".to_string(), |s| s.to_string());
        return Err(format!(
            "the harness run from {} ended with {status}; probe reports {reports:?}, expected {expected:?}",
            tmp.path.display()
        )
        .into());
    }
    Ok(())
}

fn main() {
    if std::env::var_os(PROBE_ENV).is_some() {
        mempower_tests::main(vec![Trial::test("probe", probe)]);
    }
    mempower_tests::main_here(vec![Trial::test(
        "harness_runs_from_tmp",
        harness_runs_from_tmp,
    )]);
}
