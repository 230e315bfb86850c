//! virtio-blk device model (virtio 1.2 section 5.2 "Block Device").
//!
//! A virtio-blk device is a disk: the guest driver puts read (IN), write
//! (OUT), FLUSH and GET_ID requests on one request queue and the device
//! serves them against a raw image file, moving data between the file and
//! guest memory with `preadv`/`pwritev` and no bounce buffer.
//!
//! The crate knows neither KVM nor the transport. A VMM wires it like this:
//!
//! 1. [`VirtioBlk::open`] with the user's [`DiskConfig`] (path, readonly,
//!    id, block size), or [`VirtioBlk::new`] with any [`DiskBackend`].
//! 2. Transport registers: [`VirtioBlk::device_type`],
//!    [`VirtioBlk::queue_max_sizes`], [`VirtioBlk::avail_features`],
//!    [`VirtioBlk::set_acked_features`], [`VirtioBlk::read_config`],
//!    [`VirtioBlk::write_config`], [`VirtioBlk::config_generation`].
//! 3. On `DRIVER_OK`: [`VirtioBlk::activate`] with the configured
//!    `virtio_queue::Queue`; on a status write of 0: [`VirtioBlk::reset`].
//! 4. On a queue notification: [`VirtioBlk::process_queue`], then signal the
//!    used-buffer interrupt if [`ProcessOutcome::needs_notification`]. The
//!    file I/O is synchronous, so run it on a thread that is not a vCPU. A
//!    thread that serves other work too bounds each round with
//!    [`VirtioBlk::process_queue_within`] and a [`RoundBudget`], and comes
//!    back when [`ProcessOutcome::more`] says the budget ran out.
//! 5. To report: [`VirtioBlk::metrics`] ([`VirtioBlkMetrics`], snapshot as
//!    [`MetricsSnapshot`]), [`VirtioBlk::config`], [`VirtioBlk::id`].
//!
//! Offered features: `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`,
//! `VIRTIO_RING_F_INDIRECT_DESC`, `VIRTIO_BLK_F_SIZE_MAX`,
//! `VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_BLK_SIZE`, `VIRTIO_BLK_F_FLUSH`, and
//! `VIRTIO_BLK_F_RO` for a read-only disk. When the driver does not accept
//! FLUSH, every write is made durable before it completes, as the spec asks.
//!
//! The guest is untrusted: each chain is bounded ([`CHAIN_LIMITS`]), its
//! layout checked (header readable, status writable and last, data in the
//! direction the request needs), sector ranges checked against the capacity
//! without overflow, lengths checked for 512-byte alignment. A malformed
//! request gets `VIRTIO_BLK_S_IOERR` when it has a status byte, and is
//! returned unexecuted when it has none; nothing panics. Every outcome is
//! counted in [`VirtioBlkMetrics`].

#[cfg(test)]
mod test_utils;

pub mod backend;
pub mod config;
pub mod device;
pub mod metrics;
pub mod request;

pub use backend::{BackendError, DiskBackend, RawFile};
pub use config::{
    ConfigError, DiskConfig, DiskId, VirtioBlkConfig, CONFIG_SPACE_SIZE, ID_BYTES, SECTOR_SIZE,
};
pub use device::{
    Error, ProcessOutcome, RoundBudget, VirtioBlk, CHAIN_LIMITS, DEVICE_TYPE, NUM_QUEUES,
    QUEUE_MAX_SIZE, SEG_MAX, SIZE_MAX,
};
pub use metrics::{MetricsSnapshot, VirtioBlkMetrics};
pub use request::{
    parse_chain, ChainLimits, ParsedChain, Request, RequestError, RequestHeader, RequestType,
    Segment, Status, HEADER_SIZE,
};
