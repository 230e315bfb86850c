//! A node's virtio-mem device (the `virtio-mem` crate's model) on the virtio-mmio
//! transport, and the event-loop subscriber that serves its request queue.
//!
//! With the node's [`NodeSlots`], the device also keeps what the guest and the devices
//! can reach in step with its blocks: a block is opened before its plug is acknowledged
//! ([`SlotBackend`]), and closed after the queue round that unplugged it; a region whose
//! blocks are all unplugged loses its KVM slot too.

mod backend;
pub mod release;

use std::fs::File;

use virtio_mem::memfd::HUGE_2M;
use virtio_mem::{DeviceParams, MemfdBackend, VirtioMem, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE};
use vm_memory::GuestAddressSpace;

pub use backend::SlotBackend;
pub use release::ReleaseError;

use super::kick::{KickHandler, ServeQueue};
use super::{ActivateContext, ActivateError, FeaturesRefused, Interrupt, VirtioDevice};
use crate::layout::MemoryRange;
use crate::memory::slots::{GuestMemoryView, NodeSlots, Ranges};

#[derive(Debug, thiserror::Error)]
pub enum MemDeviceError {
    #[error("node {node}: cannot duplicate its memfd: {source}")]
    File { node: u32, source: std::io::Error },
    #[error("node {node}: {source}")]
    Device {
        node: u32,
        source: virtio_mem::Error,
    },
    #[error(
        "node {node}: virtio-mem blocks of {block_size:#x} bytes at file offset \
         {file_offset:#x} are not whole 2 MiB huge pages"
    )]
    HugePageAlignment {
        node: u32,
        block_size: u64,
        file_offset: u64,
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
    model: VirtioMem<SlotBackend>,
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    /// Dropped when the queue turns out unusable, until the driver resets the device.
    running: Option<(GuestMemoryView, Interrupt)>,
}

impl MemDevice {
    /// A device for `region` (one node's hotplug range), backed by the node's memfd
    /// at the region's file offset, asking the guest to plug `requested` bytes. Its
    /// regions' slots are not managed: for tests of the device alone.
    pub fn new(
        region: &MemoryRange,
        node_file: &File,
        requested: u64,
    ) -> Result<Self, MemDeviceError> {
        Self::with_slots(region, node_file, requested, None)
    }

    /// As [`Self::new`], and keeps the slots of the node's regions in step with the
    /// plugged blocks.
    pub fn with_slots(
        region: &MemoryRange,
        node_file: &File,
        requested: u64,
        slots: Option<NodeSlots>,
    ) -> Result<Self, MemDeviceError> {
        Self::for_node(region, node_file, requested, slots, false)
    }

    /// As [`Self::with_slots`]; with `huge_pages`, the node's memfd is of 2 MiB hugetlbfs
    /// pages, which the device allocates and measures through the slots' mappings.
    pub fn for_node(
        region: &MemoryRange,
        node_file: &File,
        requested: u64,
        slots: Option<NodeSlots>,
        huge_pages: bool,
    ) -> Result<Self, MemDeviceError> {
        let node = region.node;
        let params = DeviceParams {
            node_id: Some(node as u16),
            ..DeviceParams::new(region.guest_addr, region.size)
        };
        // A block's punch hole must free whole huge pages, never part of one.
        if huge_pages && (params.block_size % HUGE_2M != 0 || region.file_offset % HUGE_2M != 0) {
            return Err(MemDeviceError::HugePageAlignment {
                node,
                block_size: params.block_size,
                file_offset: region.file_offset,
            });
        }
        let file = node_file
            .try_clone()
            .map_err(|source| MemDeviceError::File { node, source })?;
        let memfd = MemfdBackend::new(file, region.file_offset, region.size)
            .map_err(|source| MemDeviceError::Backend { node, source })?;
        let backend = SlotBackend::new(node, memfd, slots)
            .map_err(|source| MemDeviceError::Backend { node, source })?;
        let backend = match huge_pages {
            true => backend.with_huge_pages(),
            false => backend,
        };
        let device_err = |source| MemDeviceError::Device { node, source };
        let mut model = VirtioMem::new(params, backend).map_err(device_err)?;
        model.set_requested_size(requested).map_err(device_err)?;
        Ok(MemDevice {
            node,
            model,
            running: None,
        })
    }

    pub fn node(&self) -> u32 {
        self.node
    }

    /// Serves every pending request and interrupts the guest if it needs to know, then
    /// removes the regions it left with nothing plugged. On the event-loop thread only
    /// (see `memory::slots` on when regions may be removed).
    ///
    /// Bad requests get error answers; an error here is the queue itself (rings the
    /// device cannot follow), so the device stops and asks the driver for a reset
    /// (DEVICE_NEEDS_RESET).
    pub fn process_queue(&mut self) {
        let Some((view, interrupt)) = &self.running else {
            return; // A kick before DRIVER_OK, after a reset, or while one is needed.
        };
        // This round's map; dropped before any region is removed.
        let round = self
            .model
            .process_queue(&*view.memory())
            .map(|o| o.needs_notification);
        let node = self.node;
        if !interrupt.queue_served(round, || format!("virtio-mem of node {node}")) {
            self.running = None;
        }
        self.close_unplugged();
    }

    /// Hides the blocks the guest has unplugged from the devices, then hands them to the
    /// node's releaser, which shuts them (the regions left with none plugged lose their
    /// slots, see `memory::slots`) and punches them once, after the shut: a guest that
    /// touched them between its unplug and the shut gets nothing kept.
    pub(crate) fn close_unplugged(&mut self) {
        let Some(slots) = self.model.backend().slots() else {
            return;
        };
        let base = self.model.geometry().addr();
        let plugged = Ranges::of(
            self.model
                .plugged_ranges()
                .into_iter()
                .map(|r| (r.start - base, r.end - base)),
        );
        let t = std::time::Instant::now();
        let closing = slots.hide_outside(&plugged);
        if !closing.closed.is_empty() {
            self.model.backend().add_release_time(t.elapsed());
        }
        if let Some(e) = closing.failure {
            log::warn!(
                "virtio-mem of node {}: unplugged memory stays open: {e}",
                self.node
            );
        }
        self.model.backend().releaser().closed(&closing.closed);
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

    /// The guest-physical ranges unplugged since the last call (see
    /// [`SlotBackend::take_discarded`]).
    pub fn take_unplugged(&self) -> Vec<std::ops::Range<u64>> {
        let base = self.model.geometry().addr();
        let mut ranges = self.model.backend().take_discarded();
        for r in &mut ranges {
            *r = base + r.start..base + r.end;
        }
        ranges
    }

    /// Starts the node's release thread through `spawn`: from then on unplugged memory
    /// is punched there, not on the event loop (see `release`).
    pub fn start_releasing(
        &self,
        spawn: impl FnOnce(release::Work) -> Result<(), String>,
    ) -> Result<(), ReleaseError> {
        self.model.backend().releaser().start(spawn)
    }

    /// The device model, for checks of its block bitmap.
    pub fn model(&self) -> &VirtioMem<SlotBackend> {
        &self.model
    }

    /// The device model, for tests that play the guest's driver.
    #[cfg(test)]
    pub(crate) fn model_mut(&mut self) -> &mut VirtioMem<SlotBackend> {
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

    /// Refuses a driver that did not accept UNPLUGGED_INACCESSIBLE (Linux before 5.16, or
    /// one that clears the bit), as QEMU does on x86: such a driver may read unplugged
    /// memory, so serving it would mean mapping every region, plugged or not, which breaks
    /// the promise that released memory stays released. (Mapping them here would also run
    /// slot ioctls on a vCPU thread, whose filter forbids them.)
    fn ack_features(&mut self, features: u64) -> Result<(), FeaturesRefused> {
        if features & 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE == 0 {
            return Err(FeaturesRefused::MissingRequired {
                device: format!("virtio-mem of node {}", self.node),
                name: "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
                bit: VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
                why: "it may read unplugged memory, which mempower releases",
            });
        }
        self.model.set_acked_features(features);
        Ok(())
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
            .activate(queue, &*ctx.mem.memory())
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.running = Some((ctx.mem, ctx.interrupt));
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

impl Drop for MemDevice {
    fn drop(&mut self) {
        self.model.backend().releaser().stop();
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
mod tests;
