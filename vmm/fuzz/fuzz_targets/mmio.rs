//! Fuzzes the virtio-mmio transport as a guest driver drives it: register
//! accesses of any offset, width and value, and driver-like steps (status
//! bits, features, queue setup with good and bad sizes and addresses, ready,
//! notify, interrupt ack), against a vsock or a virtio-mem device, through
//! the status state machine, queue setup and activation. The virtio-mem device
//! keeps its regions' memory slots, as the VMM's does (over a KVM that only
//! accepts the slot changes): what a driver's steps do to slots is covered.
//!
//! Invariants, after every access:
//! - no panic;
//! - the identity registers read what they always read;
//! - the status bits follow the state machine: DRIVER_OK needs FEATURES_OK,
//!   which needs DRIVER, which needs ACKNOWLEDGE;
//! - the transport is activated only with DRIVER_OK and without
//!   DEVICE_NEEDS_RESET, and the vsock device runs exactly when its
//!   transport is activated;
//! - writing 0 to Status resets: status reads 0, nothing is activated.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::mem::MemDevice;
use vmm::devices::virtio::mmio::{MmioTransport, MMIO_MAGIC_VALUE, MMIO_VERSION};
use vmm::devices::virtio::vsock::VsockDevice;
use vmm::devices::virtio::{VirtioDevice, TYPE_MEM, TYPE_VSOCK};
use vmm::devices::BusDevice;
use vmm::layout::MemoryLayout;
use vmm::memory::slots::{KvmSlots, SlotTable};
use vmm::memory::GuestRam;
use vmm_fuzz::Input;

/// Guest memory the queues may point into.
const MEM_SIZE: u64 = 0x1_0000;
const MIB: u64 = 1 << 20;

fn memory() -> GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    })
    .clone()
}

/// KVM's half of the slot table. Slots change only for the boot memory, while the
/// table is built: after that MMIO accesses alone run here, and they are a vCPU
/// thread's work, whose seccomp filter forbids slot ioctls (issue 18, item 1: an old
/// driver's FEATURES_OK used to restore every slot there).
struct VcpuPathKvm;

/// Set once the table is built: from then on a slot change is a bug.
static MMIO_ONLY: AtomicBool = AtomicBool::new(false);

impl KvmSlots for VcpuPathKvm {
    fn nr_memslots(&self) -> usize {
        32764
    }

    unsafe fn set_slot(&self, slot: u32, _: u64, _: u64, _: u64) -> Result<(), kvm_ioctls::Error> {
        assert!(
            !MMIO_ONLY.load(Ordering::Relaxed),
            "slot {slot} changed on the MMIO path, which runs on vCPU threads"
        );
        Ok(())
    }
}

/// One virtio-mem device for the process (its backing memfd is large), with
/// the slots of its node's two regions, reset before each run.
fn mem_device() -> Arc<Mutex<MemDevice>> {
    type Rig = (GuestRam, Arc<SlotTable>, Arc<Mutex<MemDevice>>);
    static DEV: OnceLock<Rig> = OnceLock::new();
    let (_, _, dev) = DEV.get_or_init(|| {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[256 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let table = SlotTable::new(Arc::new(VcpuPathKvm), &ram).unwrap();
        let slots = table.node(0);
        assert_eq!(slots.regions(), 2);
        let dev =
            MemDevice::with_slots(&layout.hotplug[0], &ram.node_files[0], 0, Some(slots)).unwrap();
        MMIO_ONLY.store(true, Ordering::Relaxed);
        (ram, table, Arc::new(Mutex::new(dev)))
    });
    dev.lock().unwrap().reset();
    dev.clone()
}

fn read32(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn write32(t: &mut MmioTransport, reg: u32, value: u32) {
    t.write(u64::from(reg), &value.to_le_bytes());
}

/// A queue address: inside memory (aligned or not), at its edge, or beyond.
fn address(pick: u8, raw: u32) -> u64 {
    match pick % 5 {
        0 => u64::from(raw) % MEM_SIZE & !0xf,
        1 => u64::from(raw) % MEM_SIZE,
        2 => MEM_SIZE - u64::from(raw % 64),
        3 => u64::from(raw) << 32 | u64::from(raw),
        _ => u64::from(raw),
    }
}

/// One driver-like step with values a driver would use, or nearly.
fn driver_step(t: &mut MmioTransport, input: &mut Input) -> Option<()> {
    match input.u8()? % 6 {
        0 => {
            let steps = [
                0,
                ACKNOWLEDGE,
                ACKNOWLEDGE | DRIVER,
                ACKNOWLEDGE | DRIVER | FEATURES_OK,
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
                FAILED,
                DRIVER_OK,
                NEEDS_RESET,
            ];
            let pick = input.u8()?;
            write32(
                t,
                VIRTIO_MMIO_STATUS,
                steps[usize::from(pick) % steps.len()],
            );
        }
        1 => {
            // Accept what is offered, plus a stray bit or less a few (an old or hostile
            // driver leaves out what it does not know, e.g. UNPLUGGED_INACCESSIBLE).
            for sel in 0..2 {
                write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
                let offered = read32(t, VIRTIO_MMIO_DEVICE_FEATURES);
                let extra = input.u32()? & input.u32()?;
                let dropped = input.u32()? & input.u32()?;
                write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                write32(t, VIRTIO_MMIO_DRIVER_FEATURES, (offered | extra) & !dropped);
            }
        }
        2 => {
            let queue = u32::from(input.u8()? % 4);
            write32(t, VIRTIO_MMIO_QUEUE_SEL, queue);
            let max = read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX);
            let size = match input.u8()? % 4 {
                0 => max,
                1 => max / 2,
                2 => u32::from(input.u16()?),
                _ => 3,
            };
            write32(t, VIRTIO_MMIO_QUEUE_NUM, size);
            for (low, high) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH),
            ] {
                let addr = address(input.u8()?, input.u32()?);
                write32(t, low, addr as u32);
                write32(t, high, (addr >> 32) as u32);
            }
            write32(t, VIRTIO_MMIO_QUEUE_READY, u32::from(input.u8()? % 3));
        }
        3 => write32(t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(input.u8()?)),
        4 => write32(t, VIRTIO_MMIO_INTERRUPT_ACK, input.u32()?),
        _ => {
            let mut config = [0u8; 8];
            let offset = 0x100 + u64::from(input.u8()?);
            t.read(offset, &mut config[..usize::from(input.u8()? % 9)]);
        }
    }
    Some(())
}

/// One raw access: any offset in the window, any width.
fn raw_access(t: &mut MmioTransport, input: &mut Input) -> Option<()> {
    let offset = u64::from(input.u16()? % 0x1100);
    let width = [1, 2, 4, 8, 3, 0][usize::from(input.u8()? % 6)];
    let mut data = [0u8; 8];
    if input.u8()? & 1 == 0 {
        t.read(offset, &mut data[..width]);
    } else {
        data = input.bytes()?;
        t.write(offset, &data[..width]);
    }
    Some(())
}

fn check(t: &mut MmioTransport, device_type: u32, vsock: Option<&Arc<Mutex<VsockDevice>>>) {
    assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(read32(t, VIRTIO_MMIO_VERSION), MMIO_VERSION);
    assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_ID), device_type);
    let status = t.status();
    assert_eq!(read32(t, VIRTIO_MMIO_STATUS), status);
    for (bit, needs) in [
        (DRIVER_OK, FEATURES_OK),
        (FEATURES_OK, DRIVER),
        (DRIVER, ACKNOWLEDGE),
    ] {
        assert!(
            status & bit == 0 || status & needs != 0,
            "status {status:#x}"
        );
    }
    if t.is_activated() {
        assert!(
            status & DRIVER_OK != 0 && status & NEEDS_RESET == 0,
            "{status:#x}"
        );
    }
    if let Some(dev) = vsock {
        assert_eq!(dev.lock().unwrap().is_active(), t.is_activated());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(which) = input.u8() else {
        return;
    };
    let (device, vsock, device_type): (Arc<Mutex<dyn VirtioDevice>>, _, _) = if which & 1 == 0 {
        let dev = Arc::new(Mutex::new(VsockDevice::new(3, None).unwrap()));
        (dev.clone(), Some(dev), TYPE_VSOCK)
    } else {
        (mem_device(), None, TYPE_MEM)
    };
    let mut t = MmioTransport::new(device, vm_memory::GuestMemoryAtomic::new(memory())).unwrap();
    while let Some(op) = input.u8() {
        let done = match op % 4 {
            0 => raw_access(&mut t, &mut input),
            _ => driver_step(&mut t, &mut input),
        };
        if done.is_none() {
            break;
        }
        check(&mut t, device_type, vsock.as_ref());
    }
    write32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(t.status(), 0);
    assert!(!t.is_activated());
    check(&mut t, device_type, vsock.as_ref());
});
