//! A node's virtio-mem device (the `virtio-mem` crate's model) on the virtio-mmio
//! transport, and the event-loop subscriber that serves its request queue.
//!
//! With the node's [`NodeSlots`], the device also keeps each hotplug region's KVM slot in
//! step with its blocks: a region whose blocks are all unplugged is removed after the
//! queue round that unplugged the last one, and restored before a plug of any of its
//! blocks is acknowledged ([`SlotBackend`]).

mod backend;

use std::fs::File;

use virtio_mem::memfd::HUGE_2M;
use virtio_mem::{DeviceParams, MemfdBackend, VirtioMem, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE};
use vm_memory::GuestAddressSpace;

pub use backend::SlotBackend;

use super::kick::{KickHandler, ServeQueue};
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::layout::MemoryRange;
use crate::memory::slots::{GuestMemoryView, NodeSlots};

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

/// What happens to the KVM slots of regions the guest has unplugged entirely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPolicy {
    /// The driver accepted VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (Linux 5.16 and later): it
    /// never reads unplugged memory, so such regions are removed.
    RemoveUnplugged,
    /// An older driver, which may read unplugged memory (e.g. for a crash dump): every
    /// region stays present.
    KeepPresent,
}

/// The virtio-mem device of one NUMA node.
pub struct MemDevice {
    node: u32,
    model: VirtioMem<SlotBackend>,
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    /// Dropped when the queue turns out unusable, until the driver resets the device.
    running: Option<(GuestMemoryView, Interrupt)>,
    /// Until a driver says otherwise, unplugged regions are removed (all are at boot).
    slot_policy: SlotPolicy,
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
        let backend = match huge_pages {
            true => SlotBackend::new(node, memfd, slots).with_huge_pages(),
            false => SlotBackend::new(node, memfd, slots),
        };
        let device_err = |source| MemDeviceError::Device { node, source };
        let mut model = VirtioMem::new(params, backend).map_err(device_err)?;
        model.set_requested_size(requested).map_err(device_err)?;
        Ok(MemDevice {
            node,
            model,
            running: None,
            slot_policy: SlotPolicy::RemoveUnplugged,
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
        self.remove_unplugged_regions();
    }

    /// Removes the slot of every region with no plugged block, unless the driver may read
    /// unplugged memory.
    pub(crate) fn remove_unplugged_regions(&mut self) {
        if self.slot_policy == SlotPolicy::KeepPresent {
            return;
        }
        let Some(slots) = self.model.backend().slots() else {
            return;
        };
        let geometry = self.model.geometry();
        let region_size = slots.region_size();
        let mut in_use = vec![false; slots.regions() as usize];
        for range in self.model.plugged_ranges() {
            let first = (range.start - geometry.addr()) / region_size;
            let last = (range.end - 1 - geometry.addr()) / region_size;
            for r in first..=last {
                if let Some(used) = in_use.get_mut(r as usize) {
                    *used = true;
                }
            }
        }
        let t = std::time::Instant::now();
        let (removed, failure) = slots.remove_where(|r| !in_use[r as usize]);
        if !removed.is_empty() {
            self.model.backend().add_release_time(t.elapsed());
        }
        if !removed.is_empty() {
            log::info!(
                "virtio-mem of node {}: regions {removed:?} are unplugged: their memory slots \
                 are removed",
                self.node
            );
        }
        if let Some(e) = failure {
            log::warn!(
                "virtio-mem of node {}: an unplugged region keeps its slot: {e}",
                self.node
            );
        }
    }

    pub fn slot_policy(&self) -> SlotPolicy {
        self.slot_policy
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

    fn ack_features(&mut self, features: u64) {
        self.model.set_acked_features(features);
        let Some(slots) = self.model.backend().slots() else {
            return;
        };
        if features & 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE != 0 {
            // Regions left present by an older driver go after the next queue round.
            self.slot_policy = SlotPolicy::RemoveUnplugged;
            return;
        }
        self.slot_policy = SlotPolicy::KeepPresent;
        log::warn!(
            "virtio-mem of node {}: the driver did not accept UNPLUGGED_INACCESSIBLE and may \
             read unplugged memory, so every hotplug region keeps its memory slot",
            self.node
        );
        if let Err(e) = slots.restore_all() {
            log::warn!(
                "virtio-mem of node {}: cannot restore the slots of its regions: {e}",
                self.node
            );
        }
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

/// Serves the request queue when the guest kicks it (the queue's ioeventfd).
pub type MemQueueHandler = KickHandler<MemDevice>;

impl ServeQueue for MemDevice {
    fn serve_queue(&mut self) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
