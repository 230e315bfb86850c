//! Builds a VM from a validated configuration and runs it until the guest stops.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig, VirtioMmioDevice};
use crate::agent::AgentClient;
use crate::autopilot::service::{Autopilot, NodeControl};
use crate::autopilot::wiring::VmSensors;
use crate::boot;
use crate::config::VmConfig;
use crate::cpu;
use crate::devices::console_buffer::{self, ConsoleBuffer};
use crate::devices::console_log::{self, ConsoleLog};
use crate::devices::console_watch::{AgentPanic, ConsoleWatch};
use crate::devices::legacy::{AcpiPmDevice, ResetTrigger, I8042};
use crate::devices::released::ReleasedMemory;
use crate::devices::serial::{IrqTrigger, SerialDevice, SerialInput};
use crate::devices::virtio::balloon::BalloonDevice;
use crate::devices::virtio::blk::{BlkDevice, BlkQueueHandler};
use crate::devices::virtio::mem::{MemDevice, MemQueueHandler};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::virtio::vsock::{
    VsockConnector, VsockDevice, VsockEventHandler, DEFAULT_GUEST_CID,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, ExitReason, VmExit};
use crate::evacuation::Evacuations;
use crate::event_loop::timing::LoopStats;
use crate::event_loop::{ApiHandler, ExitWatcher};
use crate::host_numa::{HostNumaError, HostTopology};
use crate::host_signals::HostFiles;
use crate::layout::{self, MemoryLayout};
use crate::memory::slots::{SlotError, SlotTable};
use crate::memory::GuestRam;
use crate::seccomp::{self, ThreadKind};
use crate::stop;
use crate::sync::Locked;
use crate::threads;

mod balloon;

/// Our defaults for every guest. `pci=off`: there is no PCI bus, and probing one is slow.
/// `memhp_default_state=online_movable`: hotplugged memory goes to ZONE_MOVABLE, so that it
/// can be emptied (migrated) and unplugged again.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 panic=1 pci=off mitigations=off memhp_default_state=online_movable";
/// Where KVM puts the TSS on Intel; above all guest memory below 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long the teardown waits for the guest's last console output to be written.
const CONSOLE_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    UnsupportedHostKvm(String),
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("device setup: {0}")]
    Device(String),
    #[error("cannot open console log '{path}': {source}")]
    ConsoleLog {
        path: String,
        source: std::io::Error,
    },
    #[error("API socket: {0}")]
    Api(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    HostNuma(#[from] HostNumaError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Refuses a host KVM that cannot run a standard guest: the nested paravirtual `kvm_pvm`
/// on a CPU without vmx/svm. Such a guest would otherwise die minutes into its boot.
pub fn check_host_kvm(sys_module: &Path, cpuinfo: &str) -> Result<(), VmError> {
    let pvm = sys_module.join("kvm_pvm").exists();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if pvm && !hw_virt {
        return Err(VmError::UnsupportedHostKvm(
            "this host's /dev/kvm is kvm_pvm, a paravirtual KVM without vmx/svm that cannot run a \
             standard Linux guest's user space (its first syscall faults). Run mempower in nested mode: \
             inside a QEMU test host with a real KVM, as the test harness does (see images/README.md)"
                .into(),
        ));
    }
    Ok(())
}

/// The guest console's writer; the vCPUs, which write it, may read and truncate its
/// files only (none on stdout).
fn console_writer(path: Option<&Path>) -> Result<Box<dyn Write + Send>, VmError> {
    let Some(p) = path else {
        seccomp::restrict_to_files(ThreadKind::Vcpu, &[])?;
        return Ok(Box::new(std::io::stdout()));
    };
    let log =
        ConsoleLog::open(p, console_log::MAX_BYTES).map_err(|source| VmError::ConsoleLog {
            path: p.display().to_string(),
            source,
        })?;
    seccomp::restrict_to_files(ThreadKind::Vcpu, &log.fds())?;
    Ok(Box::new(log))
}

/// The descriptors the event loop releases and preallocates guest memory on: each
/// virtio-mem device's node file and the balloon's files.
fn memory_files(
    devices: &[Option<Arc<Mutex<MemDevice>>>],
    balloon: Option<&Arc<Mutex<BalloonDevice>>>,
) -> Vec<RawFd> {
    let node_file = |d: &Arc<Mutex<MemDevice>>| d.locked().model().backend().file().as_raw_fd();
    let mut fds: Vec<RawFd> = devices.iter().flatten().map(node_file).collect();
    if let Some(balloon) = balloon {
        let balloon = balloon.locked();
        fds.extend(balloon.model().backend().files().map(AsRawFd::as_raw_fd));
    }
    fds
}

/// Starts each node's release thread (`mempower-release/N`, on its node's CPUs), which
/// then punches unplugged blocks instead of the event loop, on its node file only.
fn start_releasing(
    devices: &[Option<Arc<Mutex<MemDevice>>>],
    placement: &[Option<Vec<usize>>],
) -> Result<(), VmError> {
    let nodes = || {
        devices
            .iter()
            .enumerate()
            .filter_map(|(n, d)| Some((n, d.as_ref()?)))
    };
    let fds: Vec<RawFd> = nodes()
        .map(|(_, d)| d.locked().model().backend().releaser().file().as_raw_fd())
        .collect();
    seccomp::restrict_to_files(ThreadKind::Release, &fds)?;
    for (node, device) in nodes() {
        let cpus = placement.get(node).cloned().flatten();
        let name = format!("mempower-release/{node}");
        let spawn = |work| {
            threads::spawn(ThreadKind::Release, name, cpus, work)
                .map(drop)
                .map_err(|e| e.to_string())
        };
        device
            .locked()
            .start_releasing(spawn)
            .map_err(|e| VmError::Device(e.to_string()))?;
    }
    Ok(())
}

/// Starts `mempower-autopilot` for the nodes of `config.autopilot` (off unless asked
/// for; the API turns it on and off), reading the agent and the host's files, which it
/// opens here: its filter lets it read only those.
fn start_autopilot(
    config: &VmConfig,
    evacuations: &Arc<Evacuations>,
    agent: AgentClient,
) -> Result<Arc<Autopilot>, VmError> {
    let err = |e: &dyn std::fmt::Display| VmError::Device(format!("the autopilot: {e}"));
    let host = HostFiles::open(std::path::Path::new("/"), None).map_err(|e| err(&e))?;
    seccomp::restrict_to_files(ThreadKind::Autopilot, &host.fds())?;
    let sensors = VmSensors {
        agent,
        host,
        timeout: std::time::Duration::from_secs(1),
    };
    let spawn = |work| {
        threads::spawn(ThreadKind::Autopilot, "mempower-autopilot", None, work)
            .map_err(|e| e.to_string())
    };
    let control: Arc<dyn NodeControl> = evacuations.clone();
    let settings = crate::autopilot::plan::settings(&config.nodes, &config.autopilot)?;
    let nodes = settings.into_iter().zip(&config.nodes);
    let settings = nodes.map(|(s, n)| s.map(|s| (s, n.hotplug))).collect();
    Autopilot::start(settings, control, Box::new(sensors), &spawn)
        .map(Arc::new)
        .map_err(|e| err(&e))
}

/// The virtio-mem devices of the nodes that have a hotplug region.
struct HotplugDevices {
    /// Indexed by node id; `None` for nodes without a region.
    devices: Vec<Option<Arc<Mutex<MemDevice>>>>,
    handlers: Vec<MemQueueHandler>,
    acpi: Vec<VirtioMmioDevice>,
}

/// Gives each node with a hotplug region a virtio-mem device on the MMIO bus, with its
/// queue kick (ioeventfd) and interrupt (irqfd) wired to KVM, and the device that answers
/// guest accesses to its released regions.
fn attach_memory_devices(
    vm: &VmFd,
    ram: &GuestRam,
    slots: &Arc<SlotTable>,
    memory_layout: &MemoryLayout,
    config: &VmConfig,
    mmio_bus: &mut Bus,
) -> Result<HotplugDevices, VmError> {
    let dev_err = |e: &dyn std::fmt::Display| VmError::Device(e.to_string());
    let mut out = HotplugDevices {
        devices: vec![None; config.nodes.len()],
        handlers: Vec::new(),
        acpi: Vec::new(),
    };
    for region in &memory_layout.hotplug {
        let node = region.node as usize;
        let node_slots = slots.node(region.node);
        let released =
            ReleasedMemory::new(region.node, region.guest_addr, node_slots.region_size());
        mmio_bus
            .insert(
                region.guest_addr,
                region.size,
                Arc::new(Mutex::new(released)),
            )
            .map_err(|e| dev_err(&e))?;
        let device = MemDevice::for_node(
            region,
            &ram.node_files[node],
            config.nodes[node].requested,
            Some(node_slots),
            config.nodes[node].hugepages,
        )
        .map_err(|e| dev_err(&e))?;
        let device = Arc::new(Mutex::new(device));
        let what = format!("virtio-mem of node {node}");
        let kick =
            attach_mmio(vm, slots, device.clone(), &what, mmio_bus, &mut out.acpi)?.remove(0);
        out.handlers
            .push(MemQueueHandler::new(device.clone(), kick));
        out.devices[node] = Some(device);
    }
    Ok(out)
}

/// Gives the VM its virtio-vsock device (guest CID 3) in the next virtio-mmio slot, for
/// the guest agent and, with `--vsock-socket`, for host programs.
fn attach_vsock(
    vm: &VmFd,
    slots: &SlotTable,
    config: &VmConfig,
    mmio_bus: &mut Bus,
    acpi: &mut Vec<VirtioMmioDevice>,
) -> Result<(VsockEventHandler, VsockConnector), VmError> {
    let dev_err = |e: &dyn std::fmt::Display| VmError::Device(format!("vsock: {e}"));
    let device = VsockDevice::new(DEFAULT_GUEST_CID, config.vsock_socket.as_deref())
        .map_err(|e| dev_err(&e))?;
    let connector = device.connector();
    let device = Arc::new(Mutex::new(device));
    let kicks = attach_mmio(vm, slots, device.clone(), "vsock", mmio_bus, acpi)?;
    Ok((VsockEventHandler::new(device, kicks), connector))
}

/// Gives the VM one virtio-blk device per `--disk`, in order, in the virtio-mmio slots
/// after the others; the guest probes them in that order (vda, vdb, ...).
fn attach_disks(
    vm: &VmFd,
    slots: &SlotTable,
    config: &VmConfig,
    mmio_bus: &mut Bus,
    acpi: &mut Vec<VirtioMmioDevice>,
) -> Result<Vec<BlkQueueHandler>, VmError> {
    let mut handlers = Vec::new();
    for disk in &config.disks {
        let device = BlkDevice::open(disk).map_err(|e| VmError::Device(e.to_string()))?;
        let device = Arc::new(Mutex::new(device));
        let what = format!("disk {}", disk.path.display());
        let kick = attach_mmio(vm, slots, device.clone(), &what, mmio_bus, acpi)?.remove(0);
        handlers.push(BlkQueueHandler::new(device, kick));
    }
    Ok(handlers)
}

/// Puts `device` in the next virtio-mmio slot (`acpi.len()`): its transport on the MMIO
/// bus over the slot table's view of guest memory, its queue notifications (ioeventfds)
/// and interrupt (irqfd) wired to KVM, and its ACPI `LNRO0005` entry. Answers the queue
/// notification eventfds for the device's event-loop subscriber; `what` names the device
/// in errors.
pub(super) fn attach_mmio(
    vm: &VmFd,
    slots: &SlotTable,
    device: Arc<Mutex<dyn VirtioDevice>>,
    what: &str,
    mmio_bus: &mut Bus,
    acpi: &mut Vec<VirtioMmioDevice>,
) -> Result<Vec<EventFd>, VmError> {
    let slot = acpi.len();
    if slot >= layout::VIRTIO_MAX_DEVICES {
        return Err(VmError::Device(format!(
            "no virtio-mmio slot left for {what}"
        )));
    }
    let dev_err = |e: &dyn std::fmt::Display| VmError::Device(format!("{what}: {e}"));
    let transport = MmioTransport::new(device, slots.view()).map_err(|e| dev_err(&e))?;
    let base = layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE;
    let gsi = layout::VIRTIO_IRQ_BASE + slot as u32;
    transport
        .register_ioevents(vm, base)
        .map_err(|e| dev_err(&e))?;
    transport.register_irqfd(vm, gsi).map_err(|e| dev_err(&e))?;
    let kicks = transport.queue_events().map_err(|e| dev_err(&e))?;
    mmio_bus
        .insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))
        .map_err(|e| dev_err(&e))?;
    acpi.push(VirtioMmioDevice {
        base,
        size: layout::VIRTIO_MMIO_SIZE,
        irq: gsi,
    });
    Ok(kicks)
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Brings every vCPU thread out of `KVM_RUN` before the process exits, rather than
/// leaving the kernel to tear them down mid-run. The signal interrupts `KVM_RUN` (EINTR);
/// the run loop then sees the exit reason and returns. A signal can land just before a
/// thread enters `KVM_RUN`, so it is repeated until the thread is done, for a second.
fn stop_vcpus(threads: &[std::thread::JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    let deadline = Instant::now() + std::time::Duration::from_secs(1);
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread is alive (not finished, and its handle keeps it
            // joinable), and the kick signal has a handler that does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), cpu::kick_signal()) };
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Boots the guest and runs it until it powers off, resets, fails, or is stopped. The
/// reason a running VM stopped is logged before its teardown (see [`stop`]); an error is
/// a setup failure, for the caller to report.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmError> {
    let started = Instant::now();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    check_host_kvm(Path::new("/sys/module"), &cpuinfo)?;

    let kvm_fd = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = Arc::new(kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

    let node_sizes: Vec<u64> = config.nodes.iter().map(|n| n.memory).collect();
    let hotplug_sizes: Vec<u64> = config.nodes.iter().map(|n| n.hotplug).collect();
    let region_sizes: Vec<u64> = config.nodes.iter().map(|n| n.region_size).collect();
    let memory_layout =
        MemoryLayout::with_hotplug_aligned(&node_sizes, &hotplug_sizes, &region_sizes)?;
    // One KVM memory slot per region, and one per boot memory range.
    crate::config::check_memslots(
        &config.nodes,
        memory_layout.ranges.len() as u64,
        kvm_fd.get_nr_memslots() as u64,
    )?;
    let topology = HostTopology::system();
    let ram = GuestRam::with_nodes(&memory_layout, &config.nodes, &topology)?;
    // From here on, guest memory is the slot table's view: the hotplug regions start
    // removed, until the guest plugs them.
    let slots = SlotTable::new(vm.clone(), &ram)?;
    // The table lives until the process ends. Dropping it deletes every KVM slot (an
    // ioctl), and its last owner may be an evacuation worker finishing a pass after the
    // VM stopped (workers are not joined), whose seccomp filter forbids KVM ioctls;
    // closing the VM at exit frees the slots anyway.
    std::mem::forget(slots.clone());
    let boot_memory = slots.memory();

    let exit = Arc::new(VmExit::new().map_err(|e| VmError::Device(e.to_string()))?);
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Device(e.to_string()))?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(kvm("KVM_IRQFD"))?;
    let agent_panic = AgentPanic::default();
    // The vCPUs write the console through a bounded buffer: never blocked by it, nor
    // holding the serial lock while the console is slow.
    let (console, console_drain) = ConsoleBuffer::start(
        console_writer(config.console_log.as_deref())?,
        console_buffer::CAPACITY,
        || seccomp::enter(ThreadKind::Vcpu),
    )
    .map_err(|e| VmError::Device(format!("cannot start the console writer: {e}")))?;
    let console = ConsoleWatch::new(console, agent_panic.clone());
    let (uart, rx_drained) = SerialDevice::new(
        IrqTrigger(serial_irq),
        Box::new(console) as Box<dyn Write + Send>,
    )
    .map_err(|e| VmError::Device(format!("cannot make the serial port: {e}")))?;
    let serial = Arc::new(Mutex::new(uart));
    let mut io_bus = Bus::default();
    let bus_err = |e: crate::devices::BusError| VmError::Device(e.to_string());
    io_bus
        .insert(u64::from(layout::COM1_PORT), 8, serial.clone())
        .map_err(bus_err)?;
    io_bus
        .insert(
            u64::from(layout::ACPI_PM_PORT),
            1,
            Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone()))),
        )
        .map_err(bus_err)?;
    let i8042 = I8042(I8042Device::new(ResetTrigger(exit.clone())));
    io_bus
        .insert(
            u64::from(layout::I8042_PORT),
            layout::I8042_PORT_LEN,
            Arc::new(Mutex::new(i8042)),
        )
        .map_err(bus_err)?;
    let io_bus = Arc::new(io_bus);

    let mut mmio_bus = Bus::default();
    let mut hotplug =
        attach_memory_devices(&vm, &ram, &slots, &memory_layout, config, &mut mmio_bus)?;
    let (vsock_handler, connector) =
        attach_vsock(&vm, &slots, config, &mut mmio_bus, &mut hotplug.acpi)?;
    let balloon = balloon::attach(
        &vm,
        &ram,
        &slots,
        &memory_layout,
        config,
        &mut hotplug,
        &mut mmio_bus,
    )?;
    let disk_handlers = attach_disks(&vm, &slots, config, &mut mmio_bus, &mut hotplug.acpi)?;
    let mmio_bus = Arc::new(mmio_bus);

    let vcpus = config.vcpu_count();
    let node_of_cpu: Vec<u32> = (0..vcpus)
        .map(|c| {
            config
                .node_of_cpu(c)
                .expect("validated: every vCPU has a node")
        })
        .collect();
    let hotplug_srat: Vec<(u32, u64, u64)> = memory_layout
        .hotplug
        .iter()
        .map(|r| (r.node, r.guest_addr, r.size))
        .collect();
    let tables = acpi::build(&AcpiConfig {
        node_of_cpu: node_of_cpu.clone(),
        node_count: config.nodes.len() as u32,
        memory: &memory_layout.ranges,
        hotplug: &hotplug_srat,
        virtio_devices: &hotplug.acpi,
    })?;
    for (addr, bytes) in &tables.blobs {
        boot_memory
            .write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| VmError::Device(format!("writing ACPI tables: {e}")))?;
    }

    let cmdline = boot::cmdline(DEFAULT_CMDLINE, config.cmdline_extra.as_deref())?;
    let boot_info = boot::load(
        &boot_memory,
        &memory_layout,
        &config.kernel,
        config.initramfs.as_deref(),
        &cmdline,
        tables.rsdp_addr,
    )?;

    vmm_sys_util::signal::register_signal_handler(cpu::kick_signal(), ignore_kick)
        .map_err(|e| VmError::Device(format!("cannot install the vCPU kick handler: {e}")))?;
    let base_cpuid = cpu::supported_cpuid(&kvm_fd)?;
    // Each vCPU runs on the CPUs of its node's host-node=, if it has one.
    let placement = topology.placement(&config.nodes)?;
    let mut threads = Vec::new();
    for cpu_id in 0..vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(cpu_id))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        let cpuid = cpu::cpuid_for(&base_cpuid, cpu_id, node_of_cpu[cpu_id as usize]);
        cpu::configure(&vcpu, cpu_id, &cpuid, boot_info.entry)?;
        let (io, mmio, exit) = (io_bus.clone(), mmio_bus.clone(), exit.clone());
        let table = slots.clone();
        let unplugged: cpu::Unplugged = Arc::new(move |gpa| table.unplugged(gpa));
        let view = slots.view();
        let read: cpu::ReadGuest =
            Arc::new(move |gpa| view.memory().read_obj::<u64>(GuestAddress(gpa)).ok());
        let name = format!("vcpu{cpu_id}");
        let cpus = placement[node_of_cpu[cpu_id as usize] as usize].clone();
        let thread = threads::spawn(ThreadKind::Vcpu, name, cpus, move || {
            cpu::run(cpu_id, vcpu, io, mmio, exit, unplugged, read)
        })?;
        threads.push(thread);
    }
    log::info!(
        "VM started in {} ms: {} vCPUs, {} NUMA nodes, {} MiB",
        started.elapsed().as_millis(),
        vcpus,
        config.nodes.len(),
        memory_layout.ranges.iter().map(|r| r.size).sum::<u64>() >> 20
    );

    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    // Every source is timed: a slow one is logged by name and shows in the metrics.
    let loop_stats = Arc::new(LoopStats::default());
    events.add_subscriber(Arc::new(Mutex::new(
        loop_stats.timed("vsock", vsock_handler),
    )));
    // The agent clients connect through vsock as soon as the guest's agent listens: one
    // for API calls and queries, and one per evacuation worker (up to a few, shared
    // beyond), whose offlining may take minutes: a node's never waits behind another's.
    let start_agent = |connector: VsockConnector| {
        AgentClient::start(Box::new(move || {
            connector.connect(agent_protocol::AGENT_PORT)
        }))
        .map_err(|e| VmError::Device(format!("starting the agent client: {e}")))
    };
    let agent = start_agent(connector.clone())?;
    let hotplug_nodes = hotplug.devices.iter().flatten().count();
    let evacuation_agents = (0..hotplug_nodes.min(crate::evacuation::MAX_WORKER_CONNECTIONS))
        .map(|_| start_agent(connector.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let nodes = memory_layout.hotplug.iter().map(|r| r.node);
    for (node, handler) in nodes.zip(hotplug.handlers) {
        let handler = loop_stats.timed(format!("virtio-mem/{node}"), handler);
        events.add_subscriber(Arc::new(Mutex::new(handler)));
    }
    for (disk, handler) in disk_handlers.into_iter().enumerate() {
        let handler = loop_stats.timed(format!("virtio-blk/{disk}"), handler);
        events.add_subscriber(Arc::new(Mutex::new(handler)));
    }
    let balloon = balloon.map(|(device, handler)| {
        let handler = loop_stats.timed("virtio-balloon", handler);
        events.add_subscriber(Arc::new(Mutex::new(handler)));
        device
    });
    seccomp::restrict_to_files(
        ThreadKind::EventLoop,
        &memory_files(&hotplug.devices, balloon.as_ref()),
    )?;
    start_releasing(&hotplug.devices, &placement)?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(exit.clone()))));
    let input = SerialInput::new(std::io::stdin(), serial.clone(), rx_drained);
    events.add_subscriber(Arc::new(Mutex::new(
        loop_stats.timed("serial-input", input),
    )));
    // The workers exist with or without an API: the autopilot drives them too.
    let evacuations = crate::evacuation::start::for_vm(
        &hotplug.devices,
        &config.nodes,
        Some(&agent),
        evacuation_agents,
    )
    .map_err(|e| VmError::Device(format!("the evacuation service: {e}")))?;
    // A connection of its own: the API's agent calls (a fill takes seconds) must not
    // starve its samples.
    let autopilot = start_autopilot(config, &evacuations, start_agent(connector.clone())?)?;
    let _api = match &config.api_socket {
        Some(path) => {
            let (handler, server) = ApiHandler::start(
                path,
                config,
                exit.clone(),
                hotplug.devices.clone(),
                Some(agent.clone()),
                evacuations.clone(),
            )
            .map_err(VmError::Api)?;
            let handler = match balloon {
                Some(balloon) => handler.with_balloon(balloon),
                None => handler,
            }
            .with_autopilot(autopilot.clone())
            .with_loop_stats(loop_stats.clone())
            .with_console(console_drain.clone());
            events.add_subscriber(Arc::new(Mutex::new(loop_stats.timed("api", handler))));
            Some(server)
        }
        None => None,
    };
    // From here on the main thread serves the guest: filter it first.
    seccomp::apply(ThreadKind::EventLoop)?;
    let mut failed = None;
    while !exit.is_set() {
        // A panic in a subscriber stops the VM like any failure: reported, then the
        // bounded teardown (unwinding would skip both).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| events.run()));
        let why = match ran {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => format!("event loop: {e:?}"),
            Err(panic) => format!("event loop panicked: {}", stop::panic_message(&*panic)),
        };
        failed = Some(ExitReason::Error(why));
        break;
    }
    let reason = failed.unwrap_or_else(|| {
        agent_panic.explain(exit.reason().expect("loop ends only once a reason is set"))
    });
    // Why it stops comes first, and the teardown is bounded: nothing below (nor the
    // drops at the end of this function) can hide the reason or keep the process alive.
    stop::report(&reason);
    if let Err(e) = stop::Watchdog::arm(stop::TEARDOWN_LIMIT, stop::status(&reason), || {
        seccomp::enter(ThreadKind::Watchdog)
    }) {
        log::warn!("cannot start the teardown watchdog: {e}");
    }
    stop_vcpus(&threads);
    // Bounded: a console nobody reads must not hold the exit.
    console_drain.drain(CONSOLE_DRAIN_LIMIT);
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_without_hardware_virtualisation_is_refused() {
        let dir = std::env::temp_dir().join(format!("mempower-sysmod-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        let err = check_host_kvm(&dir, "flags\t: fpu sse2 lm\n").unwrap_err();
        assert!(err.to_string().contains("nested mode"), "{err}");
        // The same module beside vmx or svm is a host we can use.
        check_host_kvm(&dir, "flags\t: fpu svm lm\n").unwrap();
        std::fs::remove_dir(dir.join("kvm_pvm")).unwrap();
        check_host_kvm(&dir, "flags\t: fpu lm\n").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
