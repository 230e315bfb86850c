//! Booting a guest with `mempower run` and talking to its agent over the serial console.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::HarnessError;
use crate::images::{self, GuestImages};
use crate::mode::{self, Mode};
use crate::process::{kill_and_reap, wait_timeout, ProcessError};
use crate::retries::{self, GuestBootFailure, Retry};
use crate::verdict::{self, TrialRecord, VmmEnd};
use crate::{print_phase, secs, Result, VmApi};

/// The guest agent's ready line starts with this, followed by JSON.
pub const READY_MARKER: &str = "MEMPOWER-READY";
/// Overrides the default guest timeout, in seconds.
pub const TIMEOUT_ENV: &str = "MEMPOWER_GUEST_TIMEOUT_SECS";
/// The READY line versions this harness understands.
const READY_VERSION: u32 = 1;
/// How many lines error messages quote.
const TAIL_LINES: usize = 40;
/// How many of the VMM's own lines the message of its exit quotes.
const VMM_TAIL_LINES: usize = 10;
/// The start of the VMM's line for a guest that reset.
const RESET_SAID: &str = "guest reset (";
/// How long a VMM that said the guest reset gets to stop before it is killed at drop:
/// more than its teardown limit (`vmm::stop::TEARDOWN_LIMIT`, 5 s).
const RESET_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Errors of booting and driving a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Guests cannot run on this machine's KVM outside the test host.
    #[error("nested mode: guests must boot inside the test host (use mempower_tests::main as the test binary's main)")]
    NeedsTestHost,
    /// The VMM could not be started.
    #[error("cannot start {}: {source}", bin.display())]
    Spawn {
        /// The VMM binary.
        bin: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Waiting for something on the console timed out.
    #[error("timed out after {} waiting for {what}; console tail:\n{tail}", secs(*.after))]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long since the VMM started.
        after: Duration,
        /// The last console and VMM lines.
        tail: String,
    },
    /// The agent refused a console command.
    #[error("the agent answered {command:?} with: {error}")]
    Agent { command: String, error: String },
    /// A power-off that did not end with exit status 0.
    #[error("the VMM exited ({status}) after the guest was asked to power off; expected 0")]
    UncleanPoweroff {
        /// How it exited.
        status: String,
    },
    /// The guest kernel panicked.
    #[error("the guest kernel panicked while waiting for {what}; console tail:\n{tail}")]
    KernelPanic {
        /// What was awaited.
        what: String,
        /// The last console and VMM lines.
        tail: String,
    },
    /// The VMM exited.
    #[error("the VMM exited ({status}) while waiting for {what}; its last lines:\n{vmm_tail}\nconsole tail:\n{tail}")]
    VmmExited {
        /// What was awaited.
        what: String,
        /// How it exited.
        status: String,
        /// The VMM's own last lines.
        vmm_tail: String,
        /// The last console and VMM lines.
        tail: String,
    },
    /// The READY line could not be parsed.
    #[error("bad {READY_MARKER} line ({reason}): {line:?}")]
    BadReady {
        /// The line.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing to the guest's console failed.
    #[error("cannot write to the guest console: {0}")]
    Stdin(std::io::Error),
    /// Waiting for the VMM failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// One NUMA node as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: u32,
    /// Its CPUs.
    pub cpus: Vec<u32>,
    /// `MemTotal` of the node, in KiB.
    pub mem_total_kib: u64,
}

/// The guest agent's `MEMPOWER-READY` report.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReadyInfo {
    /// Format version (1).
    pub version: u32,
    /// The guest kernel's release.
    pub kernel: String,
    /// Guest uptime when the agent reported.
    pub uptime_ms: u64,
    /// NUMA nodes.
    pub nodes: Vec<NodeInfo>,
}

/// Parses a console line: `None` without the READY marker, else the report or why it is
/// malformed. The marker may follow other text on the line.
pub fn parse_ready_line(line: &str) -> Option<Result<ReadyInfo, GuestError>> {
    let at = line.find(READY_MARKER)?;
    let json = line[at + READY_MARKER.len()..].trim();
    let bad = |reason: String| GuestError::BadReady {
        line: line.to_string(),
        reason,
    };
    Some(match serde_json::from_str::<ReadyInfo>(json) {
        Ok(info) if info.version != READY_VERSION => Err(bad(format!(
            "version {}, expected {READY_VERSION}",
            info.version
        ))),
        Ok(info) => Ok(info),
        Err(e) => Err(bad(e.to_string())),
    })
}

/// Where a recorded line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The guest's serial console (the VMM's stdout).
    Console,
    /// The VMM's own messages (its stderr).
    Vmm,
}

/// A recorded line.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Time since the VMM started.
    pub at: Duration,
    /// Where it came from.
    pub stream: Stream,
    /// The line, without its end of line.
    pub text: String,
}

impl std::fmt::Display for ConsoleLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.stream {
            Stream::Console => "vm ",
            Stream::Vmm => "vmm",
        };
        write!(f, "[{tag} {:8.3}] {}", self.at.as_secs_f64(), self.text)
    }
}

struct Log {
    lines: Vec<ConsoleLine>,
    open_streams: u8,
}

struct Shared {
    log: Mutex<Log>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Configures and boots a guest (like Cloud Hypervisor's test_infra `Guest`).
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    /// (id, cpus, boot MiB, extra `--numa` keys such as the hotplug region)
    nodes: Vec<(u32, String, u64, String)>,
    cmdline: Vec<String>,
    timeout: Duration,
    extra_args: Vec<OsString>,
    bin: Option<PathBuf>,
    images: Option<GuestImages>,
}

impl Default for GuestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestBuilder {
    /// No nodes (the VMM's default), timeout `$MEMPOWER_GUEST_TIMEOUT_SECS` or 300 s.
    pub fn new() -> GuestBuilder {
        let secs = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok());
        GuestBuilder {
            nodes: Vec::new(),
            cmdline: Vec::new(),
            timeout: Duration::from_secs_f64(secs.filter(|s| *s > 0.0).unwrap_or(300.0)),
            extra_args: Vec::new(),
            bin: None,
            images: None,
        }
    }

    /// Adds a NUMA node: `--numa node=ID,cpus=CPUS,memory=<MIB>M`; `cpus` is a list such
    /// as `0`, `0-1` or `0,2`.
    pub fn node(mut self, id: u32, cpus: &str, memory_mib: u64) -> Self {
        self.nodes
            .push((id, cpus.to_string(), memory_mib, String::new()));
        self
    }

    /// Gives node `id` (added before) a virtio-mem region of `hotplug_mib` MiB, of which the
    /// guest is asked to plug `requested_mib` MiB at boot.
    pub fn hotplug(mut self, id: u32, hotplug_mib: u64, requested_mib: u64) -> Self {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.0 == id) {
            node.3 = format!(",hotplug={hotplug_mib}M,requested={requested_mib}M");
        }
        self
    }

    /// Appends `keys` (such as `,hugepages=on`) to node `id`'s `--numa` value; after its
    /// `hotplug`, if any.
    pub fn node_keys(mut self, id: u32, keys: &str) -> Self {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.0 == id) {
            node.3.push_str(keys);
        }
        self
    }

    /// The usual test VM: nodes 0 and 1 with one vCPU and `boot_mib` MiB each, and a
    /// virtio-mem region of `hotplug_mib` MiB per node with `requested_mib` MiB plugged.
    pub fn two_nodes(self, boot_mib: u64, hotplug_mib: u64, requested_mib: u64) -> Self {
        self.node(0, "0", boot_mib)
            .node(1, "1", boot_mib)
            .hotplug(0, hotplug_mib, requested_mib)
            .hotplug(1, hotplug_mib, requested_mib)
    }

    /// Serves the VMM's API on `socket` (`--api-socket`).
    pub fn api_socket(self, socket: impl Into<OsString>) -> Self {
        self.arg("--api-socket").arg(socket)
    }

    /// Appends to the guest kernel command line (`--cmdline`); words after `--` reach the
    /// agent as argv.
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline.push(extra.to_string());
        self
    }

    /// Timeout for each wait: READY (counted from the VMM's start) and exit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Passes another argument to `mempower run` (e.g. `--api-socket`).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Uses this VMM binary instead of [`crate::vmm_bin::mempower_bin`]'s.
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// Boots these images instead of [`images::guest`]'s.
    pub fn images(mut self, images: GuestImages) -> Self {
        self.images = Some(images);
        self
    }

    /// The `mempower run` arguments.
    fn args(&self, images: &GuestImages) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--kernel".into(),
            images.kernel.clone().into(),
        ];
        args.extend(["--initramfs".into(), images.initramfs.clone().into()]);
        if !self.cmdline.is_empty() {
            args.extend(["--cmdline".into(), self.cmdline.join(" ").into()]);
        }
        for (id, cpus, mib, hotplug) in &self.nodes {
            args.extend([
                "--numa".into(),
                format!("node={id},cpus={cpus},memory={mib}M{hotplug}").into(),
            ]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Boots and waits for the agent's READY line.
    ///
    /// Inside the nested test host, a guest whose vCPU the emulated machine reset before
    /// READY (a triple fault at the reset vector, after which the VMM stopped with its
    /// reset status: see `verdict`) is booted again, within the binary's retry budget
    /// (`retries::allow`), and that is said. Anything else (a kernel panic, a hang, a VMM
    /// that exited another way) fails at once, as does every failure in direct mode.
    pub fn boot_until_ready(&self) -> Result<(Guest, ReadyInfo)> {
        self.boot_retrying(Guest::wait_ready)
    }

    /// Boots and waits with `wait` (for READY, for the agent service, ...), booting again
    /// as [`GuestBuilder::boot_until_ready`] says.
    pub fn boot_retrying<T>(
        &self,
        mut wait: impl FnMut(&mut Guest) -> Result<T>,
    ) -> Result<(Guest, T)> {
        loop {
            let mut guest = self.boot()?;
            let e = match wait(&mut guest) {
                Ok(got) => return Ok((guest, got)),
                Err(e) => e,
            };
            if !crate::is_inside_testhost() || guest.end() != Some(VmmEnd::EmulatedReset) {
                return Err(e);
            }
            if !retries::allow(Retry::GuestBoot(GuestBootFailure::TripleFault)) {
                return Err(e);
            }
            guest.boot_retried = true;
            let why = e.to_string();
            let why = why.lines().next().unwrap_or("");
            println!(
                "harness: the emulated machine reset a vCPU of the nested guest as it booted ({why}); booting it again"
            );
        }
    }

    /// Starts the VMM. Its console is recorded and echoed to our stdout.
    pub fn boot(&self) -> Result<Guest> {
        if mode::mode()? == Mode::Nested && !crate::is_inside_testhost() {
            return Err(GuestError::NeedsTestHost.into());
        }
        let bin = match &self.bin {
            Some(bin) => bin.clone(),
            None => crate::vmm_bin::mempower_bin()?,
        };
        let images = match &self.images {
            Some(images) => images.clone(),
            None => images::guest()?.clone(),
        };
        let args = self.args(&images);
        println!(
            "guest: {} {}",
            bin.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(spawn(&bin, &args, self.timeout)?)
    }
}

/// Starts `bin args...` as the VMM, with its output recorded.
fn spawn(bin: &Path, args: &[OsString], timeout: Duration) -> Result<Guest, GuestError> {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GuestError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
    let log = Log {
        lines: Vec::new(),
        open_streams: 2,
    };
    let shared = Arc::new(Shared {
        log: Mutex::new(log),
        changed: Condvar::new(),
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    spawn_reader(stdout, Stream::Console, start, Arc::clone(&shared));
    spawn_reader(stderr, Stream::Vmm, start, Arc::clone(&shared));
    Ok(Guest {
        stdin: child.stdin.take(),
        child,
        shared,
        start,
        timeout,
        ready: None,
        status: None,
        boot_retried: false,
        trial: verdict::current(),
    })
}

/// Records (and echoes) the lines of one of the VMM's output streams; prints the boot
/// phases as their lines go by.
fn spawn_reader(
    stream: impl Read + Send + 'static,
    kind: Stream,
    start: Instant,
    shared: Arc<Shared>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        let (mut first, mut init, mut ready) = (false, false, false);
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let line = ConsoleLine {
                at: start.elapsed(),
                stream: kind,
                text,
            };
            println!("{line}");
            if kind == Stream::Console {
                if !first {
                    first = true;
                    print_phase("guest first console line", line.at);
                }
                if !init && line.text.contains("Run /init") {
                    init = true;
                    print_phase("guest Run /init", line.at);
                }
                if !ready && line.text.contains(READY_MARKER) {
                    ready = true;
                    print_phase("guest READY", line.at);
                }
            }
            shared.lock().lines.push(line);
            shared.changed.notify_all();
        }
        shared.lock().open_streams -= 1;
        shared.changed.notify_all();
    });
}

/// What a scan of the console found.
enum Found<T> {
    Match(T),
    Panic,
}

/// A running guest. Dropping it kills a VMM that is still running.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    start: Instant,
    timeout: Duration,
    ready: Option<ReadyInfo>,
    status: Option<ExitStatus>,
    /// A failed boot that `boot_until_ready` counted and retried: not the trial's to count.
    boot_retried: bool,
    /// The trial that booted this guest, told how its VMM ended.
    trial: Option<Arc<TrialRecord>>,
}

impl Guest {
    /// Starts `bin args...` as the VMM of a guest that mempower does not boot (QEMU in
    /// the reset control experiment, `tests/examples/reset_control.rs`): its stdout is
    /// the guest's serial console and its stdin goes to it, as with `mempower run`.
    pub fn spawn_vmm(bin: &Path, args: &[OsString], timeout: Duration) -> Result<Guest> {
        Ok(spawn(bin, args, timeout)?)
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A copy of every line recorded so far.
    pub fn lines(&self) -> Vec<ConsoleLine> {
        self.shared.lock().lines.clone()
    }

    /// The last `n` recorded lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let log = self.shared.lock();
        let from = log.lines.len().saturating_sub(n);
        log.lines[from..]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The VMM's own last `n` lines, one per line.
    fn vmm_tail(&self, n: usize) -> String {
        let log = self.shared.lock();
        let vmm: Vec<String> = log
            .lines
            .iter()
            .filter(|l| l.stream == Stream::Vmm)
            .map(ToString::to_string)
            .collect();
        vmm[vmm.len().saturating_sub(n)..].join("\n")
    }

    /// How the VMM ended, once its exit was seen.
    pub fn end(&self) -> Option<VmmEnd> {
        self.status.map(|status| self.classify(status))
    }

    fn classify(&self, status: ExitStatus) -> VmmEnd {
        let log = self.shared.lock();
        let vmm = log.lines.iter().filter(|l| l.stream == Stream::Vmm);
        verdict::classify(status, vmm.map(|l| l.text.as_str()))
    }

    /// Waits for the agent's READY line and returns its report (cached after the first
    /// success). Fails early, with the console's tail, if the kernel panics or the VMM
    /// exits; times out at the builder's timeout counted from the VMM's start.
    pub fn wait_ready(&mut self) -> Result<ReadyInfo> {
        if let Some(ready) = &self.ready {
            return Ok(ready.clone());
        }
        let deadline = self.start + self.timeout;
        let line = self.wait_line(READY_MARKER, deadline, |l| l.contains(READY_MARKER))?;
        let info = match parse_ready_line(&line).expect("the line has the marker") {
            Ok(info) => info,
            Err(e) => self.ask_ready_again(e.into())?,
        };
        self.ready = Some(info.clone());
        Ok(info)
    }

    /// The guest's console is shared: a kernel message printed while the agent writes its
    /// line can cut it in two (seen when virtio-mem onlines memory at that moment). A cut
    /// line is reported and the agent asked again, a few times.
    fn ask_ready_again(&mut self, mut error: HarnessError) -> Result<ReadyInfo> {
        for _ in 0..3 {
            println!("harness: unreadable READY line ({error}); asking the agent again");
            let line = self.ask("ready", READY_MARKER, Duration::from_secs(60))?;
            match parse_ready_line(&line).expect("the line has the marker") {
                Ok(info) => return Ok(info),
                Err(e) => error = e.into(),
            }
        }
        Err(error)
    }

    /// For a guest whose agent runs as a service (a distribution's guest, where the console
    /// is a login prompt, not the agent): waits until the VMM's agent client is connected,
    /// as `GET /api/v1/agent` on `api` says. Fails early, with the console's tail, if the
    /// kernel panics or the VMM exits; times out at the builder's timeout counted from the
    /// VMM's start. Returns the time from the VMM's start to the connection.
    pub fn wait_agent(&mut self, api: &VmApi) -> Result<Duration> {
        let what = "the agent to connect (GET /api/v1/agent)";
        let deadline = self.start + self.timeout;
        loop {
            // Fails while the VMM has not opened its socket yet: that is "not yet".
            if let Ok(info) = api.json::<mempower_api::AgentInfo>(&["agent"]) {
                if info.connected {
                    let at = self.start.elapsed();
                    print_phase("guest agent connected", at);
                    return Ok(at);
                }
            }
            let now = Instant::now();
            // Sleeps up to a second, returning early on a kernel panic or the VMM's exit.
            match self.wait_line(what, (now + Duration::from_secs(1)).min(deadline), |_| {
                false
            }) {
                Err(HarnessError::Guest(GuestError::Timeout { .. })) if now < deadline => {}
                Err(e) => return Err(e),
                Ok(_) => unreachable!("nothing matches"),
            }
        }
    }

    /// Waits up to `timeout` for a console line containing `needle` (searching every line
    /// since boot) and returns it. Fails early like [`Guest::wait_ready`].
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let what = format!("a console line containing {needle:?}");
        self.wait_line(&what, Instant::now() + timeout, |l| l.contains(needle))
    }

    fn wait_line(
        &mut self,
        what: &str,
        deadline: Instant,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let found = self.scan(deadline, |line| {
            if line.stream != Stream::Console {
                None
            } else if matches(&line.text) {
                Some(Found::Match(line.text.clone()))
            } else if line.text.contains("Kernel panic") {
                Some(Found::Panic)
            } else {
                None
            }
        });
        match found {
            Some(Found::Match(line)) => Ok(line),
            Some(Found::Panic) => {
                // Let the panic's message and backtrace reach the log.
                std::thread::sleep(Duration::from_secs(1));
                Err(GuestError::KernelPanic {
                    what: what.to_string(),
                    tail: self.tail(TAIL_LINES),
                }
                .into())
            }
            None if self.output_closed() => {
                let status = match wait_timeout(&mut self.child, Duration::from_secs(5))? {
                    Some(status) => {
                        self.status = Some(status);
                        status.to_string()
                    }
                    None => "its output closed, still running".to_string(),
                };
                Err(GuestError::VmmExited {
                    what: what.to_string(),
                    status,
                    vmm_tail: self.vmm_tail(VMM_TAIL_LINES),
                    tail: self.tail(TAIL_LINES),
                }
                .into())
            }
            None => Err(GuestError::Timeout {
                what: what.to_string(),
                after: self.start.elapsed(),
                tail: self.tail(TAIL_LINES),
            }
            .into()),
        }
    }

    fn output_closed(&self) -> bool {
        self.shared.lock().open_streams == 0
    }

    /// Scans recorded lines, waiting for new ones, until `f` finds something, the VMM's
    /// output closes, or the deadline passes.
    fn scan<T>(&self, deadline: Instant, f: impl Fn(&ConsoleLine) -> Option<T>) -> Option<T> {
        self.scan_from(0, deadline, f)
    }

    fn scan_from<T>(
        &self,
        mut next: usize,
        deadline: Instant,
        f: impl Fn(&ConsoleLine) -> Option<T>,
    ) -> Option<T> {
        let mut log = self.shared.lock();
        loop {
            while next < log.lines.len() {
                if let Some(found) = f(&log.lines[next]) {
                    return Some(found);
                }
                next += 1;
            }
            let now = Instant::now();
            if log.open_streams == 0 || now >= deadline {
                return None;
            }
            log = self
                .shared
                .changed
                .wait_timeout(log, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `command` to the agent and waits up to `timeout` for the first console line
    /// after it that contains `needle` (or an agent error or panic line).
    pub fn ask(&mut self, command: &str, needle: &str, timeout: Duration) -> Result<String> {
        let start = self.shared.lock().lines.len();
        self.send(command)?;
        let deadline = Instant::now() + timeout;
        let found = self.scan_from(start, deadline, |line| {
            (line.stream == Stream::Console
                && (line.text.contains(needle)
                    || line.text.contains("MEMPOWER-ERROR")
                    || line.text.contains("MEMPOWER-PANIC")))
            .then(|| line.text.clone())
        });
        match found {
            Some(line) if line.contains(needle) => Ok(line),
            Some(error) => Err(GuestError::Agent {
                command: command.to_string(),
                error,
            }
            .into()),
            None => Err(GuestError::Timeout {
                what: format!("{needle:?} after {command:?}"),
                after: self.start.elapsed(),
                tail: self.tail(TAIL_LINES),
            }
            .into()),
        }
    }

    /// Asks the agent for a fresh READY report.
    pub fn ready_now(&mut self, timeout: Duration) -> Result<ReadyInfo> {
        let line = self.ask("ready", READY_MARKER, timeout)?;
        match parse_ready_line(&line).expect("the line has the marker") {
            Ok(info) => Ok(info),
            Err(e) => self.ask_ready_again(e.into()),
        }
    }

    /// Writes one line (a `\n` is added) to the guest's serial console.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            GuestError::Stdin(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin already closed",
            ))
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(GuestError::Stdin)?;
        Ok(())
    }

    /// Asks the agent to power off and waits (the builder's timeout) for the VMM to exit.
    pub fn poweroff(&mut self) -> Result<ExitStatus> {
        self.send("poweroff")?;
        self.wait_exit(self.timeout)
    }

    /// [`Guest::poweroff`], and an error unless the VMM exits with 0, as it does when the
    /// guest powers off.
    pub fn poweroff_cleanly(&mut self) -> Result<()> {
        let status = self.poweroff()?;
        match status.code() {
            Some(0) => Ok(()),
            _ => Err(GuestError::UncleanPoweroff {
                status: status.to_string(),
            }
            .into()),
        }
    }

    /// Waits for the VMM's process. Once the VMM has said the guest powered off, it is
    /// given 30 s to go: in the nested test host a vCPU thread has been seen stuck in the
    /// test host's KVM (its kernel reported a soft lockup of that thread) after a clean
    /// power-off, and then the process cannot finish. That is counted as the power-off
    /// it was, and said.
    fn wait_process(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut powered_off_at = None;
        while Instant::now() < deadline {
            if let Some(status) = wait_timeout(&mut self.child, Duration::from_secs(1))? {
                return Ok(Some(status));
            }
            let said = self
                .lines()
                .iter()
                .any(|l| l.stream == Stream::Vmm && l.text.ends_with(": guest powered off"));
            match powered_off_at {
                None if said => powered_off_at = Some(Instant::now()),
                Some(at) if at.elapsed() > Duration::from_secs(30) => {
                    println!(
                        "harness: the VMM reported the guest's power-off 30 s ago but its process has not \
                         exited (a vCPU thread stuck in the test host's KVM); counting the power-off"
                    );
                    return Ok(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the VMM to exit; on timeout it is left running (and
    /// killed when the guest is dropped).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match self.wait_process(timeout)? {
            Some(status) => {
                self.status = Some(status);
                print_phase("guest exit", self.start.elapsed());
                // Let the readers drain what the VMM printed last.
                let deadline = Instant::now() + Duration::from_secs(2);
                let _ = self.scan(deadline, |_| None::<()>);
                Ok(status)
            }
            None => Err(GuestError::Timeout {
                what: "the VMM to exit".to_string(),
                after: self.start.elapsed(),
                tail: self.tail(TAIL_LINES),
            }
            .into()),
        }
    }
}

impl Drop for Guest {
    /// Kills a VMM still running, and tells the trial how a VMM that stopped by itself
    /// ended: a trial whose guest the emulated machine reset may run again.
    fn drop(&mut self) {
        let mut exited = self.status.or_else(|| self.child.try_wait().ok().flatten());
        let said_reset = self
            .shared
            .lock()
            .lines
            .iter()
            .any(|l| l.stream == Stream::Vmm && l.text.contains(RESET_SAID));
        if exited.is_none() && said_reset {
            // A test that failed as the guest went away: the VMM is still tearing down.
            exited = wait_timeout(&mut self.child, RESET_EXIT_WAIT)
                .ok()
                .flatten();
        }
        if exited.is_none() {
            if let Some(status) = kill_and_reap(&mut self.child) {
                println!("guest: VMM {} killed at drop ({status})", self.child.id());
            }
        }
        // Its last lines come in until its output closes.
        let deadline = Instant::now() + Duration::from_secs(2);
        let _ = self.scan(deadline, |_| None::<()>);
        if let (Some(status), Some(trial), false) = (exited, &self.trial, self.boot_retried) {
            trial.note(self.classify(status));
        }
    }
}

#[cfg(test)]
mod tests;
