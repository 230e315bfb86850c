//! The virtio-blk device: feature negotiation, configuration space, and the
//! request-queue loop that serves requests against a [`DiskBackend`], with no
//! knowledge of KVM or of the transport.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use crate::backend::{BackendError, DiskBackend, RawFile};
use crate::config::{
    check_block_size, ConfigError, DiskConfig, DiskId, VirtioBlkConfig, ID_BYTES, SECTOR_SIZE,
};
use crate::metrics::VirtioBlkMetrics;
use crate::request::{parse_chain, ChainLimits, Request, RequestError, RequestType, Status};

/// Virtio device type (2).
pub const DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;
/// Number of virtqueues (one request queue).
pub const NUM_QUEUES: usize = 1;
/// Maximum size of the request queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// `seg_max`: data segments per request. Small enough that two requests of
/// the largest size fit the ring even without indirect descriptors.
pub const SEG_MAX: u32 = 126;
/// `size_max`: bytes per data segment. With [`SEG_MAX`] it bounds a request
/// to 126 MiB, a limit Linux honours (its default is 1.25 MiB per request).
pub const SIZE_MAX: u32 = 1 << 20;
/// The bounds every chain is checked against: `seg_max` data segments plus
/// a header and a status descriptor, at most `seg_max * size_max` bytes.
pub const CHAIN_LIMITS: ChainLimits = ChainLimits {
    max_descriptors: SEG_MAX as usize + 2,
    max_segments: SEG_MAX as usize,
    max_data_len: SEG_MAX as u64 * SIZE_MAX as u64,
};

/// A device operation failed (host side; guest mistakes are answered on the
/// queue, not returned here).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid disk parameters.
    #[error("invalid disk: {0}")]
    Config(#[from] ConfigError),
    /// The image cannot be used.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// `activate` on an active device.
    #[error("device already activated")]
    AlreadyActivated,
    /// Queue processing before `activate`.
    #[error("device not activated")]
    NotActivated,
    /// The driver did not accept `VIRTIO_F_VERSION_1` (the device is modern-only).
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    Version1NotAcked,
    /// The queue set up by the driver is not usable in guest memory.
    #[error("request queue is not valid")]
    InvalidQueue,
    /// The queue rings could not be accessed.
    #[error("request queue: {0}")]
    Queue(virtio_queue::Error),
    /// The avail ring announces chains the device cannot fetch.
    #[error("request queue announces work that cannot be fetched")]
    QueueStalled,
}

/// What one [`VirtioBlk::process_queue`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains returned to the driver through the used ring.
    pub chains: u32,
    /// The caller must signal the used-buffer interrupt.
    pub needs_notification: bool,
    /// The round's [`RoundBudget`] ran out: requests may be waiting, and the
    /// driver will not kick for them (notifications stay disabled), so the
    /// caller must call again, after serving its other work.
    pub more: bool,
}

/// How much one [`VirtioBlk::process_queue_within`] round may do before it
/// hands the thread back: the I/O is synchronous, and a guest writing flat
/// out must not keep its caller (the VMM's event loop) from anything else.
/// A round always serves at least one request, and stops after the one that
/// reaches any limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundBudget {
    /// Requests served.
    pub requests: u32,
    /// Data bytes moved between the disk and guest memory.
    pub bytes: u64,
    /// `fdatasync`s: FLUSH requests, and writes made durable because the
    /// driver did not accept FLUSH (write-through).
    pub syncs: u32,
}

impl RoundBudget {
    /// No limit: the round drains the queue.
    pub const UNLIMITED: RoundBudget = RoundBudget {
        requests: u32::MAX,
        bytes: u64::MAX,
        syncs: u32::MAX,
    };
    /// What a VMM's event loop should allow: a few milliseconds of I/O on a
    /// page-cached image, one `fdatasync` (milliseconds to tens of them on
    /// a real disk); a quarter of the largest ring.
    pub const EVENT_LOOP: RoundBudget = RoundBudget {
        requests: QUEUE_MAX_SIZE as u32 / 4,
        bytes: 4 << 20,
        syncs: 1,
    };
}

/// What a round has spent of its [`RoundBudget`].
#[derive(Debug, Default)]
struct Spent {
    requests: u32,
    bytes: u64,
    syncs: u32,
}

impl Spent {
    /// Never before the first request: every round makes progress.
    fn exhausts(&self, budget: &RoundBudget) -> bool {
        self.requests > 0
            && (self.requests >= budget.requests
                || self.bytes >= budget.bytes
                || self.syncs >= budget.syncs)
    }
}

// The VMM holds devices as `Arc<Mutex<dyn VirtioDevice>>`, which needs Send:
// checked at compile time.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<VirtioBlk<RawFile>>();
};

/// A virtio-blk device over a [`DiskBackend`].
#[derive(Debug)]
pub struct VirtioBlk<D = RawFile> {
    disk: D,
    id: DiskId,
    config: VirtioBlkConfig,
    avail_features: u64,
    acked_features: u64,
    queue: Option<Queue>,
    metrics: Arc<VirtioBlkMetrics>,
    /// The first disk failure of an activation is logged as a warning, the
    /// rest only counted (a full host disk would fail every write).
    io_error_logged: bool,
}

impl VirtioBlk<RawFile> {
    /// Opens the image `config` names and builds its device.
    pub fn open(config: &DiskConfig) -> Result<Self, Error> {
        let id = config.disk_id()?;
        let disk = RawFile::open(&config.path, config.readonly)?;
        Self::new(disk, id, config.block_size)
    }
}

impl<D: DiskBackend> VirtioBlk<D> {
    /// A device serving `disk`, answering GET_ID with `id` and offering
    /// `block_size` as `blk_size`. The capacity is the disk size in whole
    /// sectors: a trailing partial sector is unreachable.
    pub fn new(disk: D, id: DiskId, block_size: u32) -> Result<Self, Error> {
        let block_size = check_block_size(block_size)?;
        let size = disk.size();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk {id}: image size {size} is not a multiple of {SECTOR_SIZE}; \
                 its last {} bytes are not visible to the guest",
                size % SECTOR_SIZE
            );
        }
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            config: VirtioBlkConfig {
                capacity: size / SECTOR_SIZE,
                size_max: SIZE_MAX,
                seg_max: SEG_MAX,
                blk_size: block_size,
            },
            disk,
            id,
            avail_features,
            acked_features: 0,
            queue: None,
            metrics: Arc::default(),
            io_error_logged: false,
        })
    }

    // ---- transport-facing API ----

    /// Virtio device type (2).
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

    /// Configuration generation: the configuration never changes.
    pub fn config_generation(&self) -> u32 {
        0
    }

    /// Driver read of the configuration space; any offset and length.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// Driver write of the configuration space: nothing offered is writable
    /// (no `VIRTIO_BLK_F_CONFIG_WCE`), so it is ignored.
    pub fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        self.metrics.config_write();
    }

    /// Takes the request queue once the driver set `DRIVER_OK`. EVENT_IDX is
    /// set on the queue from the acknowledged features.
    pub fn activate<M: GuestMemory>(&mut self, mut queue: Queue, mem: &M) -> Result<(), Error> {
        if self.queue.is_some() {
            return Err(Error::AlreadyActivated);
        }
        if !self.acked(VIRTIO_F_VERSION_1) {
            return Err(Error::Version1NotAcked);
        }
        if !queue.ready() || !queue.is_valid(mem) {
            return Err(Error::InvalidQueue);
        }
        queue.set_event_idx(self.acked(VIRTIO_RING_F_EVENT_IDX));
        self.queue = Some(queue);
        self.io_error_logged = false;
        Ok(())
    }

    /// Whether `activate` succeeded and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.queue.is_some()
    }

    /// Device reset: gives the queue back and forgets the features. Every
    /// completed request has reached the file already (requests run to
    /// completion inside [`VirtioBlk::process_queue`]).
    pub fn reset(&mut self) -> Option<Queue> {
        self.acked_features = 0;
        self.queue.take()
    }

    /// Serves every available request (the canonical
    /// disable-notification / drain / enable-notification loop). The I/O is
    /// synchronous: call it off the vCPU threads.
    /// On `Err` the queue is broken and the device needs a reset.
    pub fn process_queue<M: GuestMemory>(&mut self, mem: &M) -> Result<ProcessOutcome, Error> {
        self.process_queue_within(mem, &RoundBudget::UNLIMITED)
    }

    /// As [`Self::process_queue`], stopping once `budget` is spent. Then
    /// [`ProcessOutcome::more`] is set and notifications stay disabled: the
    /// caller calls again later, as if the driver had kicked.
    pub fn process_queue_within<M: GuestMemory>(
        &mut self,
        mem: &M,
        budget: &RoundBudget,
    ) -> Result<ProcessOutcome, Error> {
        let mut queue = self.queue.take().ok_or(Error::NotActivated)?;
        let result = self.drain(&mut queue, mem, budget);
        self.queue = Some(queue);
        result
    }

    fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        budget: &RoundBudget,
    ) -> Result<ProcessOutcome, Error> {
        let mut outcome = ProcessOutcome::default();
        let mut spent = Spent::default();
        loop {
            queue.disable_notification(mem).map_err(Error::Queue)?;
            let mut popped = 0u32;
            while !spent.exhausts(budget) {
                let Some(chain) = queue.iter(mem).map_err(Error::Queue)?.next() else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let used_len = self.handle_chain(chain, mem, &mut spent);
                queue.add_used(mem, head, used_len).map_err(Error::Queue)?;
            }
            outcome.chains += popped;
            // Once per batch: with EVENT_IDX, one interrupt covers them all.
            if popped > 0 && queue.needs_notification(mem).map_err(Error::Queue)? {
                outcome.needs_notification = true;
            }
            if spent.exhausts(budget) {
                // Notifications stay off: the caller comes back by itself.
                outcome.more = true;
                return Ok(outcome);
            }
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

    /// Serves one chain; returns the byte count for the used ring: the data
    /// written plus the status byte, 1 for a failed request, 0 when there
    /// was nowhere to put the status.
    fn handle_chain<M: GuestMemory>(
        &mut self,
        chain: DescriptorChain<&M>,
        mem: &M,
        spent: &mut Spent,
    ) -> u32 {
        spent.requests += 1;
        let parsed = parse_chain(chain, &CHAIN_LIMITS);
        let status_addr = match parsed.status {
            Ok(addr) => addr,
            Err(e) => {
                // Executing a request the driver cannot learn the outcome of
                // would change the disk behind its back: drop it.
                self.failed(&e);
                return 0;
            }
        };
        let result = parsed.request.and_then(|req| {
            // Charged before it runs: a failed request did (most of) its I/O too.
            spent.bytes = spent.bytes.saturating_add(req.data_len);
            let written = self.execute(&req, mem, spent)?;
            Ok((req, written))
        });
        let (status, used) = match result {
            Ok((req, written)) => {
                let kind = req.header.request_type;
                self.metrics.success(kind, req.data_len);
                // The chain is shorter than 4 GiB (virtio-queue stops at
                // that), so data plus status fits.
                (Status::Ok, written.saturating_add(1))
            }
            Err(e) => {
                self.failed(&e);
                (e.status(), 1)
            }
        };
        if mem.write_obj(status as u8, status_addr).is_err() {
            self.failed(&RequestError::StatusNotInMemory(status_addr.0));
            return 0;
        }
        used
    }

    fn failed(&mut self, e: &RequestError) {
        self.metrics.failure(e);
        if matches!(e, RequestError::Backend(_)) && !self.io_error_logged {
            self.io_error_logged = true;
            log::warn!("virtio-blk {}: {e} (further errors only counted)", self.id);
        } else {
            log::debug!("virtio-blk {}: {e}", self.id);
        }
    }

    /// Executes a well-formed request; returns the data bytes written to
    /// guest memory.
    fn execute<M: GuestMemory>(
        &mut self,
        req: &Request,
        mem: &M,
        spent: &mut Spent,
    ) -> Result<u32, RequestError> {
        let sector = req.header.sector;
        match req.header.request_type {
            RequestType::In => {
                let offset = self.disk_offset(sector, req.data_len)?;
                let bufs = guest_slices(mem, req, Permissions::Write)?;
                self.disk.read_vectored_at(offset, &bufs)?;
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                // The spec: IOERR and no data written, whatever the request.
                if self.disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.disk_offset(sector, req.data_len)?;
                let bufs = guest_slices(mem, req, Permissions::Read)?;
                self.disk.write_vectored_at(offset, &bufs)?;
                // Without FLUSH negotiated the driver assumes a write-through
                // cache: the write must be durable before it completes.
                if !self.acked(VIRTIO_BLK_F_FLUSH) {
                    spent.syncs += 1;
                    self.disk.flush()?;
                }
                Ok(0)
            }
            RequestType::Flush => {
                spent.syncs += 1;
                self.disk.flush()?;
                Ok(0)
            }
            RequestType::GetId => {
                // The serial is never truncated: a short buffer is an error.
                if req.data_len < ID_BYTES as u64 {
                    return Err(RequestError::GetIdBufferTooSmall(req.data_len));
                }
                let id = self.id.as_bytes();
                let mut done = 0;
                for seg in &req.data {
                    let take = (seg.len as usize).min(ID_BYTES - done);
                    mem.write_slice(&id[done..done + take], seg.addr)
                        .map_err(RequestError::DataNotInMemory)?;
                    done += take;
                    if done == ID_BYTES {
                        break;
                    }
                }
                Ok(ID_BYTES as u32)
            }
            RequestType::Unsupported(raw) => Err(RequestError::Unsupported(raw)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, checked against the
    /// capacity without overflow.
    fn disk_offset(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let capacity = self.config.capacity;
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|start| {
                start
                    .checked_add(len)
                    .is_some_and(|end| end <= capacity * SECTOR_SIZE)
            })
            .ok_or(RequestError::OutOfRange {
                sector,
                len,
                capacity,
            })
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    // ---- host-side API ----

    /// Snapshot of the configuration space.
    pub fn config(&self) -> VirtioBlkConfig {
        self.config
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    /// The serial GET_ID returns.
    pub fn id(&self) -> &DiskId {
        &self.id
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The device's counters, shareable with a metrics exporter.
    pub fn metrics(&self) -> Arc<VirtioBlkMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The disk backend.
    pub fn disk(&self) -> &D {
        &self.disk
    }
}

/// The request's data buffers as guest-memory slices with the access the
/// device needs, all checked before any I/O starts (so an OUT with a bad
/// buffer writes nothing).
fn guest_slices<'m, M: GuestMemory>(
    mem: &'m M,
    req: &Request,
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>, RequestError> {
    let mut slices = Vec::with_capacity(req.data.len());
    for seg in &req.data {
        let parts = mem
            .get_slices(seg.addr, seg.len as usize, access)
            .map_err(RequestError::DataNotInMemory)?;
        for part in parts {
            slices.push(part.map_err(RequestError::DataNotInMemory)?);
        }
    }
    Ok(slices)
}

#[cfg(test)]
mod tests;
