//! Gives the VM its virtio-balloon device (`--balloon`) in the next virtio-mmio slot.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use virtio_balloon::BalloonParams;

use super::{HotplugDevices, VmError};
use crate::acpi::VirtioMmioDevice;
use crate::config::VmConfig;
use crate::devices::virtio::balloon::{BalloonDevice, BalloonHandler, PluggedRam};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::Bus;
use crate::layout::{self, MemoryLayout};
use crate::memory::slots::SlotTable;
use crate::memory::GuestRam;

/// The device (for the API) and its event-loop subscriber.
pub(super) type Attached = (Arc<Mutex<BalloonDevice>>, BalloonHandler);

/// The balloon, if the config asks for one.
pub(super) fn attach(
    vm: &VmFd,
    ram: &GuestRam,
    slots: &SlotTable,
    memory_layout: &MemoryLayout,
    config: &VmConfig,
    hotplug: &mut HotplugDevices,
    mmio_bus: &mut Bus,
) -> Result<Option<Attached>, VmError> {
    let acpi = &mut hotplug.acpi;
    let Some(spec) = &config.balloon else {
        return Ok(None);
    };
    let slot = acpi.len();
    if slot >= layout::VIRTIO_MAX_DEVICES {
        return Err(VmError::Device(
            "no virtio-mmio slot left for the balloon".into(),
        ));
    }
    let dev_err = |e: &dyn std::fmt::Display| VmError::Device(format!("virtio-balloon: {e}"));
    let params = BalloonParams {
        stats_interval: spec.stats,
        deflate_on_oom: spec.deflate_on_oom,
        free_page_reporting: spec.free_page_reporting,
    };
    let guard = PluggedRam::new(memory_layout, &hotplug.devices);
    let device =
        BalloonDevice::new(params, &ram.memory, guard, spec.size).map_err(|e| dev_err(&e))?;
    let device = Arc::new(Mutex::new(device));
    let transport = MmioTransport::new(device.clone(), slots.view()).map_err(|e| dev_err(&e))?;
    let base = layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE;
    let gsi = layout::VIRTIO_IRQ_BASE + slot as u32;
    transport
        .register_ioevents(vm, base)
        .map_err(|e| dev_err(&e))?;
    transport.register_irqfd(vm, gsi).map_err(|e| dev_err(&e))?;
    let kicks = transport.queue_events().map_err(|e| dev_err(&e))?;
    let handler = BalloonHandler::new(device.clone(), kicks).map_err(|e| dev_err(&e))?;
    mmio_bus
        .insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))
        .map_err(|e| dev_err(&e))?;
    acpi.push(VirtioMmioDevice {
        base,
        size: layout::VIRTIO_MMIO_SIZE,
        irq: gsi,
    });
    Ok(Some((device, handler)))
}
