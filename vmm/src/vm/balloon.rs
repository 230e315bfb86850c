//! Gives the VM its virtio-balloon device (`--balloon`) in the next virtio-mmio slot.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use virtio_balloon::BalloonParams;

use super::{HotplugDevices, VmError};
use crate::config::VmConfig;
use crate::devices::virtio::balloon::{BalloonDevice, BalloonHandler, PluggedRam};
use crate::devices::Bus;
use crate::layout::MemoryLayout;
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
    let Some(spec) = &config.balloon else {
        return Ok(None);
    };
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
    let kicks = super::attach_mmio(
        vm,
        slots,
        device.clone(),
        "virtio-balloon",
        mmio_bus,
        &mut hotplug.acpi,
    )?;
    let handler = BalloonHandler::new(device.clone(), kicks).map_err(|e| dev_err(&e))?;
    Ok(Some((device, handler)))
}
