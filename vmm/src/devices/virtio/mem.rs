//! A node's virtio-mem device (the `virtio-mem` crate's model) on the virtio-mmio
//! transport, and the event-loop subscriber that serves its request queue.

use std::fs::File;

use virtio_mem::{DeviceParams, MemfdBackend, VirtioMem};
use vm_memory::GuestMemoryMmap;

use super::kick::{KickHandler, ServeQueue};
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::layout::MemoryRange;

#[derive(Debug, thiserror::Error)]
pub enum MemDeviceError {
    #[error("node {node}: cannot duplicate its memfd: {source}")]
    File { node: u32, source: std::io::Error },
    #[error("node {node}: {source}")]
    Device {
        node: u32,
        source: virtio_mem::Error,
    },
    #[error("node {node}: {source}")]
    Backend {
        node: u32,
        source: virtio_mem::BackendError,
    },
}

/// The virtio-mem device of one NUMA node.
pub struct MemDevice {
    node: u32,
    model: VirtioMem<MemfdBackend>,
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    running: Option<(GuestMemoryMmap, Interrupt)>,
    /// A broken queue is reported once, not on every kick.
    reported_error: bool,
}

impl MemDevice {
    /// A device for `region` (one node's hotplug range), backed by the node's memfd
    /// at the region's file offset, asking the guest to plug `requested` bytes.
    pub fn new(
        region: &MemoryRange,
        node_file: &File,
        requested: u64,
    ) -> Result<Self, MemDeviceError> {
        let node = region.node;
        let file = node_file
            .try_clone()
            .map_err(|source| MemDeviceError::File { node, source })?;
        let backend = MemfdBackend::new(file, region.file_offset, region.size)
            .map_err(|source| MemDeviceError::Backend { node, source })?;
        let params = DeviceParams {
            node_id: Some(node as u16),
            ..DeviceParams::new(region.guest_addr, region.size)
        };
        let device_err = |source| MemDeviceError::Device { node, source };
        let mut model = VirtioMem::new(params, backend).map_err(device_err)?;
        model.set_requested_size(requested).map_err(device_err)?;
        Ok(MemDevice {
            node,
            model,
            running: None,
            reported_error: false,
        })
    }

    pub fn node(&self) -> u32 {
        self.node
    }

    /// Serves every pending request and interrupts the guest if it needs to know.
    pub fn process_queue(&mut self) {
        let Some((mem, interrupt)) = &self.running else {
            return; // A kick before DRIVER_OK or after a reset: nothing to serve.
        };
        match self.model.process_queue(mem) {
            Ok(outcome) if outcome.needs_notification => {
                let _ = interrupt.signal_used_queue();
            }
            Ok(_) => {}
            // The guest drives these errors: warn once, not per request.
            Err(e) if !self.reported_error => {
                self.reported_error = true;
                log::warn!("virtio-mem of node {}: {e}", self.node);
            }
            Err(e) => log::debug!("virtio-mem of node {}: {e}", self.node),
        }
    }

    /// Asks the guest to plug or unplug until `bytes` are plugged.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), virtio_mem::Error> {
        if self.model.set_requested_size(bytes)? {
            if let Some((_, interrupt)) = &self.running {
                let _ = interrupt.signal_config_change();
            }
        }
        Ok(())
    }

    /// The device model, for checks of its block bitmap.
    pub fn model(&self) -> &VirtioMem<MemfdBackend> {
        &self.model
    }

    /// The device model, for tests that play the guest's driver.
    #[cfg(test)]
    pub(crate) fn model_mut(&mut self) -> &mut VirtioMem<MemfdBackend> {
        &mut self.model
    }
}

impl VirtioDevice for MemDevice {
    fn device_type(&self) -> u32 {
        self.model.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.model.queue_max_sizes()
    }

    fn features(&self) -> u64 {
        self.model.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.model.set_acked_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.model.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.model.write_config(offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx
            .queues
            .pop()
            .ok_or_else(|| ActivateError::Device("virtio-mem needs its request queue".into()))?;
        self.model
            .activate(queue, &ctx.mem)
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.running = Some((ctx.mem, ctx.interrupt));
        self.reported_error = false;
        Ok(())
    }

    fn reset(&mut self) {
        // Block states survive a reset (the spec): a rebooted driver unplugs what it finds.
        self.model.reset();
        self.running = None;
    }

    fn config_generation(&self) -> u32 {
        self.model.config_generation()
    }
}

/// Serves the request queue when the guest kicks it (the queue's ioeventfd).
pub type MemQueueHandler = KickHandler<MemDevice>;

impl ServeQueue for MemDevice {
    fn serve_queue(&mut self) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;

    fn device(requested: u64) -> Result<(MemDevice, GuestRam), MemDeviceError> {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[128 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let device = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], requested)?;
        Ok((device, ram))
    }

    #[test]
    fn a_node_region_becomes_a_virtio_mem_device() {
        let (mut dev, _ram) = device(32 * MIB).unwrap();
        assert_eq!(dev.device_type(), 24);
        assert_eq!(dev.node(), 0);
        let (g, m) = (dev.model().geometry(), dev.model());
        assert_eq!(
            (g.addr(), g.region_size(), g.block_size()),
            (1 << 32, 128 * MIB, 2 * MIB)
        );
        assert_eq!(
            (
                m.plugged_size(),
                m.requested_size(),
                m.resident_bytes().unwrap()
            ),
            (0, 32 * MIB, 0)
        );
        // The guest reads the region and the node (ACPI PXM) from the config space.
        let mut addr = [0u8; 8];
        dev.read_config(16, &mut addr);
        assert_eq!(u64::from_le_bytes(addr), 1 << 32);
        let generation = dev.config_generation();
        dev.set_requested_size(64 * MIB).unwrap();
        assert_eq!(dev.model().requested_size(), 64 * MIB);
        assert_ne!(
            dev.config_generation(),
            generation,
            "the guest must see the change"
        );
        // A kick before activation is ignored, not a crash.
        dev.process_queue();
    }

    #[test]
    fn bad_sizes_are_refused_and_change_nothing() {
        let (mut dev, _ram) = device(0).unwrap();
        assert!(
            dev.set_requested_size(3 * MIB).is_err(),
            "not a multiple of the block size"
        );
        assert!(
            dev.set_requested_size(256 * MIB).is_err(),
            "above the region"
        );
        assert_eq!(dev.model().requested_size(), 0);
        assert!(matches!(
            device(3 * MIB),
            Err(MemDeviceError::Device { node: 0, .. })
        ));
    }
}
