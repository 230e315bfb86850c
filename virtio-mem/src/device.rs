//! The virtio-mem device: plugged-block bookkeeping, request handling and the
//! guest-request queue loop, with no knowledge of KVM or of the transport.

use std::ops::Range;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_MEM;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::backend::{BackendError, MemBackend};
use crate::bitmap::BlockBitmap;
use crate::config::{ConfigError, Geometry, VirtioMemConfig, DEFAULT_BLOCK_SIZE};
use crate::metrics::VirtioMemMetrics;
use crate::request::{parse_chain, BlockRange, BlockState, Request, Response, ResponseType};

/// Feature bit: `node_id` is a valid ACPI proximity domain.
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver must not access unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Virtio device type (24).
pub const DEVICE_TYPE: u32 = VIRTIO_ID_MEM;
/// Number of virtqueues (one: guest-request).
pub const NUM_QUEUES: usize = 1;
/// Maximum size of the guest-request queue. Linux has at most one request in
/// flight, so this is plenty.
pub const QUEUE_MAX_SIZE: u16 = 128;

/// A device operation failed (host side; guest mistakes are answered on the
/// queue, not returned here).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid region geometry.
    #[error("invalid virtio-mem region: {0}")]
    Config(#[from] ConfigError),
    /// `requested_size` is not a multiple of the block size.
    #[error("requested size {requested:#x} is not a multiple of the block size {block_size:#x}")]
    RequestedSizeNotAligned {
        /// The rejected size.
        requested: u64,
        /// Block size.
        block_size: u64,
    },
    /// `requested_size` exceeds the region.
    #[error("requested size {requested:#x} exceeds the region size {region_size:#x}")]
    RequestedSizeTooLarge {
        /// The rejected size.
        requested: u64,
        /// Region size.
        region_size: u64,
    },
    /// `activate` on an active device.
    #[error("device already activated")]
    AlreadyActivated,
    /// Queue processing before `activate`.
    #[error("device not activated")]
    NotActivated,
    /// The driver did not accept `VIRTIO_F_VERSION_1` (virtio-mem is modern-only).
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    Version1NotAcked,
    /// The queue set up by the driver is not usable in guest memory.
    #[error("guest-request queue is not valid")]
    InvalidQueue,
    /// The queue rings could not be accessed.
    #[error("guest-request queue: {0}")]
    Queue(virtio_queue::Error),
    /// The avail ring announces chains the device cannot fetch.
    #[error("guest-request queue announces work that cannot be fetched")]
    QueueStalled,
    /// A backend query failed.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
}

/// Where and how big the device-managed region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    /// Guest-physical start of the region (block-size aligned).
    pub addr: u64,
    /// Region size in bytes (a multiple of the block size).
    pub region_size: u64,
    /// Block size: a power of two, at least 4 KiB (default 2 MiB).
    pub block_size: u64,
    /// ACPI proximity domain; `Some` offers `VIRTIO_MEM_F_ACPI_PXM`.
    pub node_id: Option<u16>,
}

impl DeviceParams {
    /// A region with the default 2 MiB block size and no node id.
    pub fn new(addr: u64, region_size: u64) -> Self {
        Self {
            addr,
            region_size,
            block_size: DEFAULT_BLOCK_SIZE,
            node_id: None,
        }
    }
}

/// What one [`VirtioMem::process_queue`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains returned to the driver through the used ring.
    pub chains: u32,
    /// The caller must signal the used-buffer interrupt.
    pub needs_notification: bool,
}

/// A virtio-mem device over a [`MemBackend`].
#[derive(Debug)]
pub struct VirtioMem<B> {
    geometry: Geometry,
    node_id: Option<u16>,
    usable_region_size: u64,
    requested_size: u64,
    plugged: BlockBitmap,
    generation: u32,
    avail_features: u64,
    acked_features: u64,
    queue: Option<Queue>,
    backend: B,
    metrics: Arc<VirtioMemMetrics>,
}

impl<B: MemBackend> VirtioMem<B> {
    /// A device with every block unplugged and `requested_size` 0. The
    /// usable region is the whole region and never changes.
    pub fn new(params: DeviceParams, backend: B) -> Result<Self, Error> {
        let geometry = Geometry::new(params.addr, params.region_size, params.block_size)?;
        let mut avail_features =
            (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
        if params.node_id.is_some() {
            avail_features |= 1u64 << VIRTIO_MEM_F_ACPI_PXM;
        }
        Ok(Self {
            geometry,
            node_id: params.node_id,
            usable_region_size: geometry.region_size(),
            requested_size: 0,
            plugged: BlockBitmap::new(geometry.block_count()),
            generation: 0,
            avail_features,
            acked_features: 0,
            queue: None,
            backend,
            metrics: Arc::default(),
        })
    }

    // ---- transport-facing API ----

    /// Virtio device type (24).
    pub fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// Maximum size of each queue (one queue).
    pub fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_MAX_SIZE]
    }

    /// Features offered to the driver.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features; bits the device did not offer are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Configuration generation; changes whenever any configuration field does.
    pub fn config_generation(&self) -> u32 {
        self.generation
    }

    /// Driver read of the configuration space; any offset and length.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// Driver write of the configuration space: read-only, ignored.
    pub fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        VirtioMemMetrics::inc(&self.metrics.config_writes_ignored);
    }

    /// Takes the guest-request queue once the driver set `DRIVER_OK`.
    pub fn activate<M: GuestMemory>(&mut self, queue: Queue, mem: &M) -> Result<(), Error> {
        if self.queue.is_some() {
            return Err(Error::AlreadyActivated);
        }
        if self.acked_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::Version1NotAcked);
        }
        if !queue.ready() || !queue.is_valid(mem) {
            return Err(Error::InvalidQueue);
        }
        self.queue = Some(queue);
        Ok(())
    }

    /// Whether `activate` succeeded and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.queue.is_some()
    }

    /// Device reset: gives the queue back and forgets the features. Block
    /// states are kept, as the spec requires (a rebooting guest sends
    /// UNPLUG_ALL when it finds memory still plugged).
    pub fn reset(&mut self) -> Option<Queue> {
        self.acked_features = 0;
        self.queue.take()
    }

    /// Serves every available request (the canonical
    /// disable-notification / drain / enable-notification loop).
    /// On `Err` the queue is broken and the device needs a reset.
    pub fn process_queue<M: GuestMemory>(&mut self, mem: &M) -> Result<ProcessOutcome, Error> {
        let mut queue = self.queue.take().ok_or(Error::NotActivated)?;
        let result = self.drain(&mut queue, mem);
        self.queue = Some(queue);
        result
    }

    fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<ProcessOutcome, Error> {
        let mut outcome = ProcessOutcome::default();
        loop {
            queue.disable_notification(mem).map_err(Error::Queue)?;
            let mut popped = 0u32;
            while let Some(chain) = queue.iter(mem).map_err(Error::Queue)?.next() {
                popped += 1;
                let head = chain.head_index();
                let used_len = self.handle_chain(chain, mem);
                queue.add_used(mem, head, used_len).map_err(Error::Queue)?;
                if queue.needs_notification(mem).map_err(Error::Queue)? {
                    outcome.needs_notification = true;
                }
            }
            outcome.chains += popped;
            if !queue.enable_notification(mem).map_err(Error::Queue)? {
                return Ok(outcome);
            }
            if popped == 0 {
                // The avail index says there is work, yet no chain can be
                // fetched: looping again would spin forever.
                return Err(Error::QueueStalled);
            }
        }
    }

    /// Serves one chain; returns the byte count for the used ring.
    fn handle_chain<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, mem: &M) -> u32 {
        let parsed = parse_chain(chain);
        let request = match parsed.request {
            Ok(req) => {
                self.metrics.request(&req);
                Some(req)
            }
            Err(_) => {
                VirtioMemMetrics::inc(&self.metrics.invalid_requests);
                None
            }
        };
        let Ok(buffer) = parsed.response else {
            // Nowhere to answer: executing would change state behind the
            // driver's back, so the request is dropped.
            VirtioMemMetrics::inc(&self.metrics.unanswered_chains);
            return 0;
        };
        let response = match request {
            Some(req) => self.execute(&req),
            None => Response::new(ResponseType::Error),
        };
        self.metrics.response(response.kind);
        buffer.write(mem, &response).unwrap_or_else(|_| {
            VirtioMemMetrics::inc(&self.metrics.unanswered_chains);
            0
        })
    }

    /// Executes a decoded request against the bitmap and the backend.
    pub fn execute(&mut self, req: &Request) -> Response {
        match *req {
            Request::Plug(r) => self.plug(&r),
            Request::Unplug(r) => self.unplug(&r),
            Request::UnplugAll => self.unplug_all(),
            Request::State(r) => match self.block_range(&r) {
                Some(blocks) => {
                    let plugged = self.plugged.count_ones_in(blocks.clone());
                    Response::state(if plugged == blocks.len() {
                        BlockState::Plugged
                    } else if plugged == 0 {
                        BlockState::Unplugged
                    } else {
                        BlockState::Mixed
                    })
                }
                None => Response::new(ResponseType::Error),
            },
        }
    }

    /// Blocks covered by a guest range, or `None` if the spec says ERROR:
    /// unaligned address, no block, or any block outside the usable region.
    fn block_range(&self, r: &BlockRange) -> Option<Range<usize>> {
        let bs = self.geometry.block_size();
        if r.nb_blocks == 0 || r.addr % bs != 0 {
            return None;
        }
        let offset = r.addr.checked_sub(self.geometry.addr())?;
        let end = offset.checked_add(u64::from(r.nb_blocks).checked_mul(bs)?)?;
        if end > self.usable_region_size {
            return None;
        }
        let first = usize::try_from(offset / bs).ok()?;
        Some(first..first + usize::from(r.nb_blocks))
    }

    fn plug(&mut self, r: &BlockRange) -> Response {
        let Some(blocks) = self.block_range(r) else {
            return Response::new(ResponseType::Error);
        };
        let len = self.geometry.blocks_to_bytes(blocks.len());
        if self.plugged_size().saturating_add(len) > self.requested_size {
            return Response::new(ResponseType::Nack);
        }
        if self.plugged.count_ones_in(blocks.clone()) != 0 {
            return Response::new(ResponseType::Error);
        }
        let offset = self.geometry.blocks_to_bytes(blocks.start);
        if self.backend.populate(offset, len).is_err() {
            VirtioMemMetrics::inc(&self.metrics.populate_failures);
            // A populate can fail part way (a huge-page pool that runs dry): give back
            // what it took, so that blocks left unplugged hold no host memory. They were
            // all unplugged (checked above), so no guest data is lost.
            let _ = self.backend.discard(offset, len);
            return Response::new(ResponseType::Busy);
        }
        self.plugged.set_range(blocks, true);
        self.bump_generation();
        VirtioMemMetrics::add_bytes(&self.metrics.bytes_plugged, len);
        Response::new(ResponseType::Ack)
    }

    fn unplug(&mut self, r: &BlockRange) -> Response {
        let Some(blocks) = self.block_range(r) else {
            return Response::new(ResponseType::Error);
        };
        if self.plugged.count_ones_in(blocks.clone()) != blocks.len() {
            return Response::new(ResponseType::Error);
        }
        if self.discard_blocks(blocks).is_err() {
            return Response::new(ResponseType::Busy);
        }
        self.bump_generation();
        Response::new(ResponseType::Ack)
    }

    fn unplug_all(&mut self) -> Response {
        let mut failed = false;
        let mut changed = false;
        for run in self.plugged.runs(true) {
            match self.discard_blocks(run) {
                Ok(()) => changed = true,
                Err(_) => failed = true,
            }
        }
        if changed {
            self.bump_generation();
        }
        Response::new(if failed {
            ResponseType::Busy
        } else {
            ResponseType::Ack
        })
    }

    /// Discards plugged blocks and, only if that worked, marks them unplugged.
    fn discard_blocks(&mut self, blocks: Range<usize>) -> Result<(), BackendError> {
        let offset = self.geometry.blocks_to_bytes(blocks.start);
        let len = self.geometry.blocks_to_bytes(blocks.len());
        if let Err(e) = self.backend.discard(offset, len) {
            VirtioMemMetrics::inc(&self.metrics.discard_failures);
            return Err(e);
        }
        self.plugged.set_range(blocks, false);
        VirtioMemMetrics::add_bytes(&self.metrics.bytes_unplugged, len);
        VirtioMemMetrics::add_bytes(&self.metrics.bytes_discarded, len);
        Ok(())
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    // ---- host-facing API ----

    /// Sets the size the driver should plug. Must be a multiple of the block
    /// size and at most the region size. Returns whether it changed, in which
    /// case the caller must raise a configuration-change interrupt (if the
    /// driver is up).
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<bool, Error> {
        let block_size = self.geometry.block_size();
        if bytes % block_size != 0 {
            return Err(Error::RequestedSizeNotAligned {
                requested: bytes,
                block_size,
            });
        }
        if bytes > self.geometry.region_size() {
            return Err(Error::RequestedSizeTooLarge {
                requested: bytes,
                region_size: self.geometry.region_size(),
            });
        }
        if bytes == self.requested_size {
            return Ok(false);
        }
        self.requested_size = bytes;
        self.bump_generation();
        VirtioMemMetrics::inc(&self.metrics.requested_size_changes);
        Ok(true)
    }

    /// Current `requested_size`.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Bytes plugged, derived from the bitmap.
    pub fn plugged_size(&self) -> u64 {
        self.geometry.blocks_to_bytes(self.plugged.count_ones())
    }

    /// Number of plugged blocks.
    pub fn plugged_blocks(&self) -> usize {
        self.plugged.count_ones()
    }

    /// Region geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Whether block `index` is plugged; `None` past the region.
    pub fn block_state(&self, index: usize) -> Option<bool> {
        self.plugged.get(index)
    }

    /// Guest-physical ranges of plugged memory, maximal and in order.
    pub fn plugged_ranges(&self) -> Vec<Range<u64>> {
        self.gpa_runs(true)
    }

    /// Guest-physical ranges of unplugged memory, maximal and in order.
    pub fn unplugged_ranges(&self) -> Vec<Range<u64>> {
        self.gpa_runs(false)
    }

    fn gpa_runs(&self, value: bool) -> Vec<Range<u64>> {
        let g = &self.geometry;
        self.plugged
            .runs(value)
            .into_iter()
            .map(|r| g.block_addr(r.start)..g.block_addr(r.end))
            .collect()
    }

    /// Host-resident bytes of the whole region.
    pub fn resident_bytes(&self) -> Result<u64, Error> {
        Ok(self
            .backend
            .resident_bytes(0, self.geometry.region_size())?)
    }

    /// Host-resident bytes in unplugged blocks (should stay near 0 when the
    /// guest honours `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`).
    pub fn resident_bytes_unplugged(&self) -> Result<u64, Error> {
        let mut total = 0;
        for run in self.plugged.runs(false) {
            let offset = self.geometry.blocks_to_bytes(run.start);
            let len = self.geometry.blocks_to_bytes(run.len());
            total += self.backend.resident_bytes(offset, len)?;
        }
        Ok(total)
    }

    /// Snapshot of the configuration space.
    pub fn config(&self) -> VirtioMemConfig {
        VirtioMemConfig {
            block_size: self.geometry.block_size(),
            node_id: self.node_id.unwrap_or(0),
            addr: self.geometry.addr(),
            region_size: self.geometry.region_size(),
            usable_region_size: self.usable_region_size,
            plugged_size: self.plugged_size(),
            requested_size: self.requested_size,
        }
    }

    /// The device's counters, shareable with a metrics exporter.
    pub fn metrics(&self) -> Arc<VirtioMemMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The memory backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod guest_tests;
