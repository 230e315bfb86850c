//! The nested test host: a QEMU TCG machine whose emulated SVM gives a real KVM.
//!
//! It boots Debian's generic kernel with `images/testhost-init`, which mounts this
//! machine's root read-only over 9p (with writable overlays on /tmp and /run), a fresh
//! read-write work directory at the same path inside it, and runs the work directory's
//! `run.sh` chrooted into our root. `run.sh`
//! (written here) prints an up marker, changes directory, exports the environment and
//! execs the command; the init then prints `MEMPOWER-TESTHOST-EXIT <rc>` and powers off.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::images::{self, ImagesError, TestHostImages};
use crate::process::{kill_and_reap, wait_timeout};
use crate::retries::{self, Tally, TestHostFailure};

/// Printed by `run.sh` as its first line: the test host is up.
pub const UP_MARKER: &str = "MEMPOWER-TESTHOST-UP";
/// Printed by the test host's init, followed by run.sh's exit code.
pub const EXIT_MARKER: &str = "MEMPOWER-TESTHOST-EXIT";
/// Overrides the test host's default timeout, in minutes.
pub const TIMEOUT_ENV: &str = "MEMPOWER_TESTHOST_TIMEOUT_MIN";
/// Overrides the QEMU binary.
pub const QEMU_ENV: &str = "MEMPOWER_QEMU";
/// `single` or `multi` (the default): QEMU's TCG threading, `-accel tcg,thread=...`.
pub const TCG_ENV: &str = "MEMPOWER_TESTHOST_TCG";
/// Overrides the test host's number of vCPUs (default 2).
pub const CPUS_ENV: &str = "MEMPOWER_TESTHOST_CPUS";
/// `0` lets QEMU's threads run on any host CPU; by default they all share one (see
/// [`TestHost::run`]).
pub const PIN_ENV: &str = "MEMPOWER_TESTHOST_PIN";
/// Exported to the command: the read-write work directory shared with this machine.
pub const WORK_ENV: &str = "MEMPOWER_TEST_WORK";

/// How long to wait for QEMU to exit once the exit marker was seen.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Variables never passed into the test host.
const ENV_DENYLIST: &[&str] = &["PWD", "OLDPWD", "SHLVL", "_", "TMPDIR"];

/// Errors of running a command in the test host.
#[derive(Debug, thiserror::Error)]
pub enum TestHostError {
    /// `$MEMPOWER_TESTHOST_TCG` is neither `single` nor `multi`.
    #[error("{TCG_ENV}={0:?}: give single or multi")]
    BadTcg(String),
    /// The test host's images are not available.
    #[error(transparent)]
    Images(#[from] ImagesError),
    /// The work directory could not be prepared.
    #[error("test host work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The work directory's path cannot go on a kernel command line.
    #[error("test host work directory {0:?} must be valid UTF-8 without blanks")]
    BadWorkDir(PathBuf),
    /// The current directory is unknown.
    #[error("cannot get the current directory: {0}")]
    CurrentDir(std::io::Error),
    /// QEMU could not be started.
    #[error("cannot start {qemu}: {source}")]
    Spawn {
        /// The QEMU binary.
        qemu: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The test host did not finish in time; QEMU was killed.
    #[error("the test host did not finish within {}; QEMU was killed{}", crate::secs(*.timeout), tail_note(.tail))]
    Timeout {
        /// The timeout.
        timeout: Duration,
        /// QEMU's last stderr lines.
        tail: String,
    },
    /// The test host's console said nothing for too long; QEMU was killed.
    #[error("the test host printed nothing for {}: frozen; QEMU was killed{}", crate::secs(*.quiet), tail_note(.tail))]
    Silent {
        /// How long it was silent.
        quiet: Duration,
        /// QEMU's last stderr lines.
        tail: String,
    },
    /// QEMU exited without the exit marker.
    #[error("QEMU exited ({status}) without printing {EXIT_MARKER}{}", tail_note(.tail))]
    NoExitMarker {
        /// How QEMU exited.
        status: String,
        /// Its exit code; `None` if a signal ended it (or it could not be reaped).
        code: Option<i32>,
        /// QEMU's last stderr lines.
        tail: String,
    },
    /// Waiting for QEMU failed.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
}

impl TestHostError {
    /// The emulated machine's failure, which a fresh test host may not repeat: its kernel
    /// panicked or reset (with `-no-reboot` QEMU then exits 0, without the marker), QEMU
    /// itself died of a signal, or the test host froze. A QEMU that exited with an error
    /// (it refused its command line, say) is not: a retry would only hide it.
    pub fn emulated_machine_failure(&self) -> Option<TestHostFailure> {
        match self {
            TestHostError::NoExitMarker {
                code: None | Some(0),
                ..
            } => Some(TestHostFailure::Panic),
            TestHostError::Timeout { .. } | TestHostError::Silent { .. } => {
                Some(TestHostFailure::Freeze)
            }
            _ => None,
        }
    }
}

fn tail_note(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; QEMU's stderr ends with:\n{tail}")
    }
}

/// Runs one command inside a fresh QEMU TCG test host.
#[derive(Debug, Clone)]
pub struct TestHost {
    qemu: OsString,
    /// `single` or `multi`.
    tcg: String,
    /// Whether QEMU's threads share one host CPU.
    pin: bool,
    cpus: u32,
    memory_mib: u64,
    timeout: Duration,
    inherit_env: bool,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    images: Option<TestHostImages>,
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

impl TestHost {
    /// 2 vCPUs, 4 GiB, this process's environment and current directory, and a timeout
    /// of `$MEMPOWER_TESTHOST_TIMEOUT_MIN` minutes (default 12: a test binary takes under 3 minutes here).
    pub fn new() -> TestHost {
        let minutes = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok());
        TestHost {
            qemu: std::env::var_os(QEMU_ENV).unwrap_or_else(|| "qemu-system-x86_64".into()),
            tcg: std::env::var(TCG_ENV).unwrap_or_else(|_| "multi".into()),
            pin: std::env::var(PIN_ENV).map_or(true, |v| v.trim() != "0"),
            cpus: std::env::var(CPUS_ENV)
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(2),
            memory_mib: 4096,
            timeout: Duration::from_secs_f64(minutes.filter(|m| *m > 0.0).unwrap_or(12.0) * 60.0),
            inherit_env: true,
            env: Vec::new(),
            cwd: None,
            images: None,
        }
    }

    /// Sets the timeout for the whole run, boot included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Sets the memory size.
    pub fn memory_mib(mut self, memory_mib: u64) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Exports a variable to the command (after the inherited ones, so it wins).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Whether to pass this process's environment (default: yes).
    pub fn inherit_env(mut self, inherit: bool) -> Self {
        self.inherit_env = inherit;
        self
    }

    /// The command's directory inside the test host (default: our current directory).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Boots these images instead of [`images::testhost`]'s.
    pub fn images(mut self, images: TestHostImages) -> Self {
        self.images = Some(images);
        self
    }

    /// Boots the test host, runs `program args...` in it (chrooted into this machine's
    /// root, `/dev/kvm` available) and returns its exit code. QEMU's console is streamed
    /// to our stdout as it comes.
    pub fn run<S: AsRef<OsStr>>(
        &self,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<i32, TestHostError> {
        // Before anything is built or created: a bad setting is the whole answer.
        if !["single", "multi"].contains(&self.tcg.as_str()) {
            return Err(TestHostError::BadTcg(self.tcg.clone()));
        }
        let images = match &self.images {
            Some(images) => images.clone(),
            None => images::testhost()?.clone(),
        };
        let cwd = match &self.cwd {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().map_err(TestHostError::CurrentDir)?,
        };
        let work = new_work_dir()?;
        let work_str = work.to_str().filter(|s| !s.contains(char::is_whitespace));
        let work_str = work_str
            .ok_or_else(|| TestHostError::BadWorkDir(work.clone()))?
            .to_string();

        let mut env: Vec<(OsString, OsString)> = Vec::new();
        if self.inherit_env {
            env.extend(std::env::vars_os().filter(|(k, _)| !ENV_DENYLIST.iter().any(|d| k == *d)));
        }
        env.push((WORK_ENV.into(), work.clone().into()));
        env.extend(self.env.iter().cloned());
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        let script = run_script(&cwd, &env, program.as_ref(), &args);
        let script_path = work.join("run.sh");
        std::fs::write(&script_path, script).map_err(|source| TestHostError::WorkDir {
            path: script_path,
            source,
        })?;

        let mut qemu = Command::new(&self.qemu);
        qemu.args(["-accel", &format!("tcg,thread={}", self.tcg)])
            .args(["-cpu", "max,vendor=AuthenticAMD"])
            .args([
                "-smp",
                &self.cpus.to_string(),
                "-m",
                &format!("{}M", self.memory_mib),
            ])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args([
                "-append",
                &format!("console=ttyS0 quiet panic=-1 mempower_work={work_str}"),
            ])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={work_str},mount_tag=work,security_model=none,multidevs=remap"
            ));
        // QEMU 7.2's multi-threaded TCG with nested SVM now and then resets a nested
        // guest's vCPU (a triple fault at the reset vector), mostly while it moves memory
        // about, and only when QEMU's vCPU threads truly run at once: boots beside a build
        // never failed, and a run pinned to one CPU had no reset where unpinned ones had
        // two (images/README.md). So its threads share one host CPU.
        let pinned = self.pin.then(last_cpu).flatten();
        if let Some(cpu) = pinned {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // sched_setaffinity(2), a system call, on a set built on its own stack.
            unsafe {
                qemu.pre_exec(move || pin_to(cpu));
            }
        }
        println!(
            "testhost: booting QEMU TCG ({} vCPUs, thread={}, {}, {} MiB), work directory {work_str}",
            self.cpus,
            self.tcg,
            pinned.map_or("unpinned".to_string(), |c| format!("pinned to host CPU {c}")),
            self.memory_mib
        );
        let outcome = run_console(qemu, &self.qemu.to_string_lossy(), self.timeout);
        if matches!(outcome, Ok(ConsoleOutcome { rc: 0, .. })) {
            let _ = std::fs::remove_dir_all(&work);
        } else {
            println!("testhost: kept work directory {work_str}");
        }
        let ConsoleOutcome { rc, summary } = outcome?;
        if let Some(summary) = summary {
            // Repeat the inner libtest summary so that our output ends with it, as a test
            // binary's normally does.
            println!("{summary}");
        }
        Ok(rc)
    }
}

/// A fresh, empty `<target>/testhost-work/<pid>-<n>`. It may be anywhere, /tmp included:
/// the test host mounts it at the same path, over its overlays of /tmp and /run.
fn new_work_dir() -> Result<PathBuf, TestHostError> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = crate::target_dir()
        .join("testhost-work")
        .join(format!("{}-{n}", std::process::id()));
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .map_err(TestHostError::CurrentDir)?
            .join(dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| TestHostError::WorkDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Quotes bytes for a POSIX shell: single quotes, each `'` as `'\''`.
pub(crate) fn shell_quote(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

fn is_shell_name(name: &[u8]) -> bool {
    matches!(name.first(), Some(b) if b.is_ascii_alphabetic() || *b == b'_')
        && name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

/// The `run.sh` the test host runs: up marker, `cd`, exports (names that are not shell
/// identifiers are skipped), then `exec program args... </dev/null`.
pub(crate) fn run_script(
    cwd: &Path,
    env: &[(OsString, OsString)],
    program: &OsStr,
    args: &[&OsStr],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"#!/bin/sh\n# Written by mempower-tests; run by the test host's init, chrooted into the host's root.\n");
    s.extend_from_slice(format!("echo {UP_MARKER}\n").as_bytes());
    s.extend_from_slice(b"cd ");
    s.extend_from_slice(&shell_quote(cwd.as_os_str().as_bytes()));
    s.extend_from_slice(b" || exit 125\n");
    for (key, value) in env {
        if !is_shell_name(key.as_bytes()) {
            continue;
        }
        s.extend_from_slice(b"export ");
        s.extend_from_slice(key.as_bytes());
        s.push(b'=');
        s.extend_from_slice(&shell_quote(value.as_bytes()));
        s.push(b'\n');
    }
    s.extend_from_slice(b"exec");
    for word in std::iter::once(program).chain(args.iter().copied()) {
        s.push(b' ');
        s.extend_from_slice(&shell_quote(word.as_bytes()));
    }
    s.extend_from_slice(b" </dev/null\n");
    s
}

/// Drops carriage returns, control characters and terminal escape sequences (SeaBIOS
/// and the kernel clear the screen) but keeps colours (`ESC [ ... m`).
pub(crate) fn sanitize(line: &[u8]) -> String {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b == 0x1b {
            if line.get(i + 1) == Some(&b'[') {
                let start = i;
                let mut j = i + 2;
                while j < line.len() && !(0x40..=0x7e).contains(&line[j]) {
                    j += 1;
                }
                if line.get(j) == Some(&b'm') {
                    out.extend_from_slice(&line[start..=j]);
                }
                i = j + 1;
            } else {
                i += 2;
            }
            continue;
        }
        if b >= 0x20 || b == b'\t' {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a line is libtest's final `test result: ...` line (colours ignored).
pub(crate) fn is_libtest_summary(line: &str) -> bool {
    let mut plain = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = rest[at..].find('m').map_or("", |m| &rest[at + m + 1..]);
    }
    plain.push_str(rest);
    plain.starts_with("test result: ")
}

/// Parses the exit marker anywhere in a line (output without a final newline may
/// precede it).
pub(crate) fn parse_exit_marker(line: &str) -> Option<i32> {
    let at = line.find(EXIT_MARKER)?;
    line[at + EXIT_MARKER.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

enum Event {
    Up(Instant),
    /// A console line: the test host is alive.
    Line,
    Exit(i32),
    Eof,
}

/// A test host whose console says nothing for this long has frozen (QEMU TCG's nested
/// SVM can wedge it with QEMU spinning at full CPU); tests print far more often.
const SILENCE_LIMIT: Duration = Duration::from_secs(300);

/// How a console process ended.
#[derive(Debug)]
pub(crate) struct ConsoleOutcome {
    /// The code of the exit marker.
    rc: i32,
    /// The last libtest `test result:` line printed, if any.
    summary: Option<String>,
}

/// The last host CPU this process may run on.
fn last_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data, and all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of_val(&set) bytes into `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads the set, for CPUs below CPU_SETSIZE only.
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
}

/// Binds the calling process to `cpu`; async-signal-safe (for `pre_exec`).
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in last_cpu: plain data, then CPU_SET within CPU_SETSIZE (the caller's
    // CPU came from a set of that size) and a system call reading the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs a console process (QEMU, or a fake one in tests): streams its stdout to ours,
/// counts its retry lines in this process's tally, returns the code of the exit marker;
/// kills it after `timeout`, or once its console has been silent for [`SILENCE_LIMIT`].
pub(crate) fn run_console(
    cmd: Command,
    name: &str,
    timeout: Duration,
) -> Result<ConsoleOutcome, TestHostError> {
    run_console_with(cmd, name, timeout, SILENCE_LIMIT, &retries::TALLY)
}

fn run_console_with(
    mut cmd: Command,
    name: &str,
    timeout: Duration,
    silence: Duration,
    tally: &'static Tally,
) -> Result<ConsoleOutcome, TestHostError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe. PR_SET_PDEATHSIG kills QEMU if we die; it fires when the
    // forking thread exits, and this thread blocks below until QEMU is gone.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| TestHostError::Spawn {
        qemu: name.to_string(),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let (tx, rx) = mpsc::channel();
    let out_thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        let mut exited = false;
        let mut summary = None;
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = sanitize(&buf);
            if exited {
                continue; // The test host powering off.
            }
            if line.is_empty() && buf.contains(&0x1b) {
                continue; // Only terminal control (SeaBIOS clearing the screen).
            }
            if line.trim() == UP_MARKER {
                let _ = tx.send(Event::Up(Instant::now()));
                continue;
            }
            if let Some(rc) = parse_exit_marker(&line) {
                exited = true;
                let before = &line[..line.find(EXIT_MARKER).unwrap_or(0)];
                if !before.is_empty() {
                    println!("{before}");
                }
                let _ = tx.send(Event::Exit(rc));
                continue;
            }
            // The inner run's retry lines are counted here, and printed again by the tally.
            if !tally.relay(&line) {
                println!("{line}");
            }
            let _ = tx.send(Event::Line);
            if is_libtest_summary(&line) {
                summary = Some(line);
            }
        }
        let _ = tx.send(Event::Eof);
        summary
    });
    let tail = Arc::new(Mutex::new(Vec::<String>::new()));
    let err_thread = {
        let tail = Arc::clone(&tail);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            while matches!(reader.by_ref().read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = sanitize(&buf);
                buf.clear();
                eprintln!("qemu: {line}");
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        })
    };
    let tail_text =
        |tail: &Arc<Mutex<Vec<String>>>| tail.lock().unwrap_or_else(|e| e.into_inner()).join("\n");

    let deadline = start + timeout;
    let mut rc = None;
    let mut exit_deadline = None;
    let mut lingering = false;
    let mut last_line = Instant::now();
    loop {
        let limit = exit_deadline
            .unwrap_or(deadline)
            .min(deadline)
            .min(last_line + silence);
        match rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
            Ok(Event::Up(at)) => crate::print_phase("test host up", at - start),
            Ok(Event::Line) => last_line = Instant::now(),
            Ok(Event::Exit(code)) => {
                rc = Some(code);
                exit_deadline = Some(Instant::now() + EXIT_GRACE);
            }
            Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if rc.is_some() {
                    lingering = true; // Marker seen, QEMU lingers: kill it below.
                    break;
                }
                kill_and_reap(&mut child);
                let _ = out_thread.join();
                let _ = err_thread.join();
                if Instant::now() < deadline {
                    return Err(TestHostError::Silent {
                        quiet: silence,
                        tail: tail_text(&tail),
                    });
                }
                return Err(TestHostError::Timeout {
                    timeout,
                    tail: tail_text(&tail),
                });
            }
        }
    }
    let status: Option<ExitStatus> = match lingering {
        true => kill_and_reap(&mut child),
        false => match wait_timeout(&mut child, EXIT_GRACE)? {
            Some(status) => Some(status),
            None => kill_and_reap(&mut child),
        },
    };
    let summary = out_thread.join().ok().flatten();
    let _ = err_thread.join();
    crate::print_phase("test host total", start.elapsed());
    let rc = rc.ok_or_else(|| TestHostError::NoExitMarker {
        status: status.map_or_else(|| "unknown status".to_string(), |s| s.to_string()),
        code: status.and_then(|s| s.code()),
        tail: tail_text(&tail),
    })?;
    Ok(ConsoleOutcome { rc, summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        s.into()
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(b"plain"), b"'plain'");
        assert_eq!(shell_quote(b"a b"), b"'a b'");
        assert_eq!(shell_quote(b"it's"), b"'it'\\''s'");
        assert_eq!(shell_quote(b""), b"''");
    }

    #[test]
    fn run_script_text() {
        let env = vec![
            (os("FOO"), os("x y")),
            (os("BAD-NAME"), os("1")),
            (os("Q"), os("'")),
        ];
        let script = run_script(
            Path::new("/w d"),
            &env,
            OsStr::new("/bin/prog"),
            &[OsStr::new("--exact"), OsStr::new("a b")],
        );
        let script = String::from_utf8(script).unwrap();
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert!(
            script.contains("\necho MEMPOWER-TESTHOST-UP\ncd '/w d' || exit 125\n"),
            "{script}"
        );
        assert!(script.contains("\nexport FOO='x y'\n"), "{script}");
        assert!(script.contains("\nexport Q=''\\'''\n"), "{script}");
        assert!(!script.contains("BAD-NAME"), "{script}");
        assert!(
            script.ends_with("\nexec '/bin/prog' '--exact' 'a b' </dev/null\n"),
            "{script}"
        );
    }

    /// The script, run by a real shell, passes every argument and variable byte for byte.
    #[test]
    fn run_script_round_trip() {
        let dir = std::env::temp_dir().join(format!("mempower-runsh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tricky = [
            "a b",
            "it's",
            "\"dq\"",
            "$HOME",
            "`id`",
            "new\nline",
            "back\\slash",
            "*",
            "",
        ];
        let env = vec![(os("TRICKY"), os("x 'y' $z \"w\"")), (os("EMPTY"), os(""))];
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("-c"),
            OsStr::new(
                r#"pwd; printf '[%s]' "$@"; printf '\n{%s}{%s}\n' "$TRICKY" "${EMPTY-unset}""#,
            ),
            OsStr::new("argv0"),
        ];
        args.extend(tricky.iter().map(OsStr::new));
        let script = run_script(&dir, &env, OsStr::new("sh"), &args);
        let path = dir.join("run.sh");
        std::fs::write(&path, script).unwrap();
        let out = Command::new("sh")
            .arg(&path)
            .current_dir("/")
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success());
        let expected_args: String = tricky.iter().map(|a| format!("[{a}]")).collect();
        let expected = format!(
            "{UP_MARKER}\n{}\n{expected_args}\n{{x 'y' $z \"w\"}}{{}}\n",
            dir.display()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }

    #[test]
    fn sanitizing() {
        assert_eq!(
            sanitize(b"\x1bc\x1b[?7l\x1b[2Jtesthost: up\r\n"),
            "testhost: up"
        );
        assert_eq!(
            sanitize(b"test x ... \x1b[32mok\x1b[0m\r\n"),
            "test x ... \x1b[32mok\x1b[0m"
        );
        assert_eq!(sanitize(b"tab\there\x07"), "tab\there");
        assert_eq!(sanitize(b"trailing escape \x1b["), "trailing escape ");
    }

    #[test]
    fn libtest_summaries() {
        assert!(is_libtest_summary(
            "test result: ok. 2 passed; 0 failed; 0 ignored"
        ));
        assert!(is_libtest_summary(
            "test result: \x1b[32mok\x1b[0m. 2 passed"
        ));
        assert!(is_libtest_summary(
            "\x1b[1mtest result: \x1b[31mFAILED\x1b[0m. 1 passed"
        ));
        assert!(!is_libtest_summary("test kvm_usable ... ok"));
    }

    #[test]
    fn exit_markers() {
        assert_eq!(parse_exit_marker("MEMPOWER-TESTHOST-EXIT 0"), Some(0));
        assert_eq!(
            parse_exit_marker("partial lineMEMPOWER-TESTHOST-EXIT 101"),
            Some(101)
        );
        assert_eq!(parse_exit_marker("MEMPOWER-TESTHOST-EXIT"), None);
        assert_eq!(parse_exit_marker("MEMPOWER-TESTHOST-EXIT x"), None);
        assert_eq!(parse_exit_marker("nothing"), None);
    }

    fn fake(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn console_exit_code() {
        let cmd = fake(
            "echo boot; echo MEMPOWER-TESTHOST-UP; echo 'test result: ok. 1 passed'; \
             printf 'no newline'; echo 'MEMPOWER-TESTHOST-EXIT 7'; echo 'reboot: Power down'",
        );
        let outcome = run_console(cmd, "fake", Duration::from_secs(20)).unwrap();
        assert_eq!(outcome.rc, 7);
        assert_eq!(
            outcome.summary.as_deref(),
            Some("test result: ok. 1 passed")
        );
    }

    #[test]
    fn a_bad_tcg_setting_is_refused_before_anything_runs() {
        let host = TestHost {
            tcg: "both".into(),
            ..TestHost::new()
        };
        let err = host.run("true", &[] as &[&str]).unwrap_err();
        assert!(matches!(err, TestHostError::BadTcg(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "MEMPOWER_TESTHOST_TCG=\"both\": give single or multi"
        );
    }

    /// The inner run's retry lines reach the outer tally, also from a test host that
    /// dies afterwards.
    #[test]
    fn console_retry_lines_are_counted() {
        static TALLY: Tally = Tally::new();
        let cmd = fake(
            "echo 'MEMPOWER-RETRY guest-boot triple-fault'; echo 'x MEMPOWER-RETRY trial triple-fault'; \
             echo 'MEMPOWER-RETRY guest-boot triple-fault'; exit 1",
        );
        let result = run_console_with(cmd, "fake", Duration::from_secs(20), SILENCE_LIMIT, &TALLY);
        assert!(
            matches!(result, Err(TestHostError::NoExitMarker { .. })),
            "{result:?}"
        );
        assert_eq!(
            TALLY.summary(),
            "retries: 2 guest boots (2 triple fault), 1 trial (1 triple fault), 0 test hosts"
        );
    }

    #[test]
    fn console_without_marker() {
        let cmd = fake("echo boot; echo 'Kernel panic' >&2; exit 1");
        match run_console(cmd, "fake", Duration::from_secs(20)) {
            Err(TestHostError::NoExitMarker { status, code, tail }) => {
                assert!(status.contains('1'), "{status}");
                assert_eq!(code, Some(1));
                assert!(tail.contains("Kernel panic"), "{tail}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Only a test host that panicked, reset or froze is the emulated machine's failure.
    #[test]
    fn which_test_host_failures_are_the_emulated_machines() {
        let exited = |script: &str| run_console(fake(script), "fake", Duration::from_secs(20));
        // Its kernel panicked, then reset: QEMU (-no-reboot) exits 0 without the marker.
        let panicked = exited("echo '[ 3.1] Kernel panic - not syncing: stack guard page'; exit 0");
        let panicked = panicked.unwrap_err();
        assert_eq!(
            panicked.emulated_machine_failure(),
            Some(TestHostFailure::Panic)
        );
        let killed = exited("kill -SEGV $$").unwrap_err();
        assert_eq!(
            killed.emulated_machine_failure(),
            Some(TestHostFailure::Panic),
            "{killed}"
        );
        // QEMU refused to start: ours.
        let refused = exited("echo 'qemu: -accel tcg,thread=both: invalid' >&2; exit 1");
        assert_eq!(refused.unwrap_err().emulated_machine_failure(), None);
        let silent = run_console_with(
            fake("exec sleep 30"),
            "fake",
            Duration::from_secs(20),
            Duration::from_millis(300),
            &retries::TALLY,
        );
        let silent = silent.unwrap_err();
        assert_eq!(
            silent.emulated_machine_failure(),
            Some(TestHostFailure::Freeze)
        );
        let bad = TestHostError::BadTcg("both".into());
        assert_eq!(bad.emulated_machine_failure(), None);
    }

    #[test]
    fn console_timeout_kills() {
        let t0 = Instant::now();
        let cmd = fake("echo boot; exec sleep 30");
        let result = run_console(cmd, "fake", Duration::from_millis(500));
        assert!(
            matches!(result, Err(TestHostError::Timeout { .. })),
            "{result:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_silent_console_is_a_frozen_test_host() {
        let t0 = Instant::now();
        let cmd = fake("echo boot; exec sleep 30");
        let result = run_console_with(
            cmd,
            "fake",
            Duration::from_secs(20),
            Duration::from_millis(500),
            &retries::TALLY,
        );
        assert!(
            matches!(result, Err(TestHostError::Silent { .. })),
            "{result:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        // Lines that keep coming keep it alive past the silence limit.
        let cmd = fake(
            "for i in 1 2 3 4 5 6; do echo tick; sleep 0.2; done; echo 'MEMPOWER-TESTHOST-EXIT 0'",
        );
        let outcome = run_console_with(
            cmd,
            "fake",
            Duration::from_secs(20),
            Duration::from_millis(600),
            &retries::TALLY,
        );
        assert_eq!(outcome.unwrap().rc, 0);
    }

    #[test]
    fn console_lingering_after_marker() {
        // The marker was printed but the process does not exit: it is killed after the
        // grace period, or at the overall timeout, whichever comes first.
        let t0 = Instant::now();
        let cmd = fake("echo 'MEMPOWER-TESTHOST-EXIT 0'; exec sleep 30");
        assert_eq!(
            run_console(cmd, "fake", Duration::from_secs(1)).unwrap().rc,
            0
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }
}
