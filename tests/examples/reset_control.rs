//! The reset control experiment (issue 18): are the resets of nested guests ours? Boots
//! the usual two-node guest once, in a fresh test host, runs a fill and an unplug, and
//! says how it went, with no retry, like `boot_probe`. Three inner VMMs:
//!
//! - `mempower`: 256 MiB per node and a 1 GiB virtio-mem region per node with 512 MiB
//!   plugged at boot; fill 384 MiB per node through the agent, then unplug 256 MiB per
//!   node (requested 512 -> 256 MiB): the fill does not fit in the 256 MiB of
//!   hotplugged memory that stay, so the guest migrates part of it out of the blocks it
//!   takes offline (the pages migrated are printed);
//! - `mempower-nohotplug`: 768 MiB per node and no virtio-mem (as much memory as the
//!   plugged guest), the same fill, no unplug;
//! - `qemu`: QEMU with KVM inside the test host instead of mempower, the same layout and
//!   workload, with virtio-mem-pci resized through QMP and the agent on vhost-vsock. The
//!   kernel is `images/build.sh qemu-kernel`'s (`$MEMPOWER_QEMU_KERNEL`; the same source
//!   and config plus virtio-pci, as a bzImage), the initramfs the usual one.
//!
//!     cargo run --release -p mempower-tests --example reset_control -- --mode qemu
//!
//! The last line is `reset-control: outcome <ok|guest-death|workload-failed|testhost-died|testhost-froze|error>`:
//! `guest-death` when the guest reset (triple fault, panic) or its VMM exited before the
//! power-off, `workload-failed` when a step failed or timed out while the VMM still ran
//! (a hung guest, or a failure of ours: the line before says which).
//! `images/boot-reliability.sh --mode M` runs it in a loop and tallies the outcomes.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_protocol::{Request, Response};
use mempower_api::AgentInfo;
use mempower_tests::qemu_vmm::{AgentClient, GuestEnd, QemuGuest, Qmp, GUEST_CID};
use mempower_tests::{
    images, is_inside_testhost, print_phase, probe, socket_path, Guest, GuestBuilder, Mode, VmApi,
};

const BOOT_MIB: u64 = 256;
const HOTPLUG_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 512;
/// With 256 MiB taken away, a node keeps 512 MiB: room for the fill and the kernel.
const FILL_MIB: u64 = 384;
const UNPLUG_MIB: u64 = 256;
const MIB: u64 = 1 << 20;
/// READY, and the plug at boot, normally come within 30 s.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);
/// A fill or an unplug: a minute or two nested.
const WORK_TIMEOUT: Duration = Duration::from_secs(420);
/// The whole test host run; a frozen one is caught earlier, by its console's silence.
const TESTHOST_TIMEOUT: Duration = Duration::from_secs(1200);
const QEMU_KERNEL_ENV: &str = "MEMPOWER_QEMU_KERNEL";
/// QEMU inside the test host (the test host's own QEMU is `$MEMPOWER_QEMU`).
const INNER_QEMU: &str = "qemu-system-x86_64";
const AGENT_PORT: u32 = agent_protocol::AGENT_PORT;

/// The prefix of the lines that say how a run went.
const NAME: &str = "reset-control";
const RC_USAGE: u8 = 2;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// How an inner run failed.
enum Failure {
    /// The guest reset or its VMM exited.
    Death(Box<dyn Error + Send + Sync>),
    /// A step failed or timed out with the VMM still running.
    Workload(Box<dyn Error + Send + Sync>),
}

impl<E: Into<Box<dyn Error + Send + Sync>>> From<E> for Failure {
    /// Errors before the guest runs (images, spawning the VMM) are not its death.
    fn from(e: E) -> Self {
        Self::Workload(e.into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Mempower,
    MempowerNoHotplug,
    Qemu,
}

impl Vmm {
    fn parse(args: &[String]) -> Option<Self> {
        match args {
            [flag, mode] if flag == "--mode" => match mode.as_str() {
                "mempower" => Some(Self::Mempower),
                "mempower-nohotplug" => Some(Self::MempowerNoHotplug),
                "qemu" => Some(Self::Qemu),
                _ => None,
            },
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Mempower => "mempower",
            Self::MempowerNoHotplug => "mempower-nohotplug",
            Self::Qemu => "qemu",
        }
    }
}

fn outcome(what: &str) -> ExitCode {
    probe::outcome(NAME, what)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(vmm) = Vmm::parse(&args) else {
        eprintln!("usage: reset_control --mode mempower|mempower-nohotplug|qemu");
        return ExitCode::from(RC_USAGE);
    };
    let mode = match mempower_tests::mode::mode() {
        Ok(mode) => mode,
        Err(e) => {
            println!("reset-control: {e}");
            return outcome("error");
        }
    };
    if mode == Mode::Direct || is_inside_testhost() {
        println!("reset-control: mode {}", vmm.name());
        let run = match vmm {
            Vmm::Mempower => run_mempower(true),
            Vmm::MempowerNoHotplug => run_mempower(false),
            Vmm::Qemu => run_qemu(),
        };
        return match run {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Death(e)) => {
                println!("reset-control: guest death: {e}");
                ExitCode::from(probe::RC_GUEST_DEATH as u8)
            }
            Err(Failure::Workload(e)) => {
                println!("reset-control: workload failed, the VMM still running: {e}");
                ExitCode::from(probe::RC_WORKLOAD_FAILED as u8)
            }
        };
    }
    if vmm == Vmm::Qemu && std::env::var_os(QEMU_KERNEL_ENV).is_none() {
        println!("reset-control: ${QEMU_KERNEL_ENV} is not set (images/build.sh qemu-kernel)");
        return outcome("error");
    }
    outcome(probe::outcome_in_testhost(NAME, &args, TESTHOST_TIMEOUT))
}

/// mempower with (`hotplug`) or without virtio-mem: boot, fill, unplug, power off.
fn run_mempower(hotplug: bool) -> Result<(), Failure> {
    let t0 = Instant::now();
    let socket = socket_path("reset-control", "sock");
    let builder = GuestBuilder::new()
        .api_socket(&socket)
        .timeout(GUEST_TIMEOUT);
    let builder = if hotplug {
        builder.two_nodes(BOOT_MIB, HOTPLUG_MIB, REQUESTED_MIB)
    } else {
        let mib = BOOT_MIB + REQUESTED_MIB;
        builder.node(0, "0", mib).node(1, "1", mib)
    };
    let mut guest = builder.boot()?;
    let work = mempower_workload(&mut guest, &VmApi::new(&socket), hotplug, t0);
    match work {
        Ok(()) => Ok(()),
        // A guest that reset is gone: its VMM has exited (or says so as it exits).
        Err(e) => match guest.wait_exit(Duration::from_secs(5)) {
            Ok(status) => Err(Failure::Death(
                format!("{e} (the VMM exited: {status})").into(),
            )),
            Err(_) => Err(Failure::Workload(e)),
        },
    }
}

fn mempower_workload(guest: &mut Guest, api: &VmApi, hotplug: bool, t0: Instant) -> Res<()> {
    guest.wait_ready()?;
    if hotplug {
        api.wait_plugged(GUEST_TIMEOUT)?;
        print_phase("guest plugged", t0.elapsed());
    }
    api.wait_agent(GUEST_TIMEOUT)?;
    let t = Instant::now();
    for node in 0..2 {
        api.fill(node, FILL_MIB * MIB, u64::from(node) + 1)?;
    }
    print_phase("fill", t.elapsed());
    if hotplug {
        let t = Instant::now();
        let size = format!("{}M", REQUESTED_MIB - UNPLUG_MIB);
        let migrated = api.vmstat(MIGRATED)?;
        for node in ["0", "1"] {
            api.cli(&["resize", "--node", node, "--size", &size])?;
        }
        api.wait_plugged(WORK_TIMEOUT)?;
        print_phase("unplug", t.elapsed());
        // Seen once in the smoke series: the VMM's agent connection was reset as the
        // unplug ended. Said, and waited out: it is not the guest's death.
        let agent: AgentInfo = api.json(&["agent"])?;
        if !agent.connected {
            println!(
                "reset-control: the agent connection dropped during the unplug ({}); waiting for it",
                agent.last_error.unwrap_or_default()
            );
            api.wait_agent(GUEST_TIMEOUT)?;
        }
        print_migrated(api.vmstat(MIGRATED)? - migrated);
    }
    guest.poweroff_cleanly()?;
    print_phase("guest total", t0.elapsed());
    Ok(())
}

/// QEMU with KVM: the same guest layout and workload as [`run_mempower`]`(true)`.
fn run_qemu() -> Result<(), Failure> {
    let t0 = Instant::now();
    let images = images::guest()?;
    let kernel = std::env::var_os(QEMU_KERNEL_ENV)
        .ok_or_else(|| format!("${QEMU_KERNEL_ENV} is not set (images/build.sh qemu-kernel)"))?;
    let config = QemuGuest {
        kernel: kernel.into(),
        initramfs: images.initramfs.clone(),
        boot_mib: BOOT_MIB,
        hotplug_mib: HOTPLUG_MIB,
        requested_mib: REQUESTED_MIB,
        qmp: socket_path("reset-control-qmp", "sock"),
    };
    let args = config.args();
    println!(
        "guest: {INNER_QEMU} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut guest = Guest::spawn_vmm(INNER_QEMU.as_ref(), &args, GUEST_TIMEOUT)?;
    let mut qmp = Qmp::connect(&config.qmp, Duration::from_secs(30))?;
    let work = qemu_workload(&mut guest, &mut qmp, t0);
    // However the work went, how the guest ended is QMP's SHUTDOWN event: a reset
    // (triple fault) ends QEMU as a power-off does (-no-reboot).
    let exit = match &work {
        Ok(()) => guest.wait_exit(GUEST_TIMEOUT).map(Some),
        Err(_) => Ok(guest.wait_exit(Duration::from_secs(5)).ok()),
    };
    let end = qmp.guest_end(Duration::from_secs(5));
    println!("reset-control: QEMU exit {exit:?}, guest end {end:?}");
    match (work, end, exit) {
        (_, Some(GuestEnd::Reset), _) => Err(Failure::Death(
            "QEMU: the guest reset (triple fault or reboot)".into(),
        )),
        (Ok(()), Some(GuestEnd::PowerOff), _) => {
            print_phase("guest total", t0.elapsed());
            Ok(())
        }
        // QEMU still runs: the guest hangs or a step of ours failed.
        (Err(e), None, Ok(None)) => Err(Failure::Workload(e)),
        (Ok(()), None, Err(e)) => Err(Failure::Workload(
            format!("the guest did not power off: {e}").into(),
        )),
        (Err(e), _, _) => Err(Failure::Death(e)),
        (Ok(()), other, _) => Err(Failure::Death(
            format!("QEMU exited without a guest power-off: {other:?}").into(),
        )),
    }
}

fn qemu_workload(guest: &mut Guest, qmp: &mut Qmp, t0: Instant) -> Res<()> {
    guest.wait_ready()?;
    let devices = ["vmem0", "vmem1"];
    wait_qemu_plugged(qmp, &devices, GUEST_TIMEOUT.saturating_sub(t0.elapsed()))?;
    print_phase("guest plugged", t0.elapsed());
    let mut agent = AgentClient::connect(GUEST_CID, AGENT_PORT, WORK_TIMEOUT)?;
    let t = Instant::now();
    for node in 0..2u32 {
        let request = Request::Fill {
            node,
            bytes: FILL_MIB * MIB,
            seed: u64::from(node) + 1,
        };
        match agent.request(request)? {
            Response::Filled { .. } => println!("fill {FILL_MIB} MiB on node {node}: done"),
            other => return Err(format!("fill: {other:?}").into()),
        }
    }
    print_phase("fill", t.elapsed());
    let t = Instant::now();
    let migrated = qemu_migrated(&mut agent)?;
    for id in devices {
        qmp.resize(id, (REQUESTED_MIB - UNPLUG_MIB) * MIB)?;
    }
    wait_qemu_plugged(qmp, &devices, WORK_TIMEOUT)?;
    print_phase("unplug", t.elapsed());
    print_migrated(qemu_migrated(&mut agent)? - migrated);
    guest.send("poweroff")?;
    Ok(())
}

/// The guest's /proc/vmstat counter of pages migrated.
const MIGRATED: &str = "pgmigrate_success";

fn print_migrated(pages: u64) {
    println!(
        "reset-control: the unplug migrated {} MiB",
        pages * 4096 / MIB
    );
}

fn qemu_migrated(agent: &mut AgentClient) -> Res<u64> {
    match agent.request(Request::Vmstat)? {
        Response::Vmstat { counters } => Ok(counters.get(MIGRATED).copied().unwrap_or(0)),
        other => Err(format!("vmstat: {other:?}").into()),
    }
}

/// Waits until each virtio-mem device holds what is requested of it.
fn wait_qemu_plugged(qmp: &mut Qmp, devices: &[&str], timeout: Duration) -> Res<()> {
    let t = Instant::now();
    loop {
        let mut sizes = Vec::new();
        for id in devices {
            sizes.push(qmp.virtio_mem_sizes(id)?);
        }
        if sizes.iter().all(|(size, requested)| size == requested) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!(
                "virtio-mem (plugged, requested) bytes {sizes:?} after {timeout:?}"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
