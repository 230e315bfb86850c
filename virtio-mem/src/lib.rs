//! virtio-mem device model (virtio 1.2 section 5.15 "Memory Device").
//!
//! A virtio-mem device manages one region of guest-physical memory cut into
//! fixed-size blocks (2 MiB by default). The host sets `requested_size`; the
//! guest driver plugs or unplugs blocks to reach it, one request at a time on
//! the guest-request queue. mempower uses one device per virtual NUMA node and
//! gives the host memory of every block the guest unplugs back (punching a hole
//! in the node's memfd).
//!
//! The crate knows neither KVM nor the transport. A VMM wires it like this:
//!
//! 1. [`VirtioMem::new`] with the region's [`DeviceParams`] and a
//!    [`MemBackend`] (usually [`MemfdBackend`] over the node's memfd).
//! 2. Transport registers: [`VirtioMem::device_type`],
//!    [`VirtioMem::queue_max_sizes`], [`VirtioMem::avail_features`],
//!    [`VirtioMem::set_acked_features`], [`VirtioMem::read_config`],
//!    [`VirtioMem::write_config`], [`VirtioMem::config_generation`].
//! 3. On `DRIVER_OK`: [`VirtioMem::activate`] with the configured
//!    `virtio_queue::Queue`; on a status write of 0: [`VirtioMem::reset`].
//! 4. On a queue notification: [`VirtioMem::process_queue`], then signal the
//!    used-buffer interrupt if [`ProcessOutcome::needs_notification`].
//! 5. To resize: [`VirtioMem::set_requested_size`]; if it returns `true`,
//!    signal a configuration-change interrupt.
//! 6. To check what the guest gave back: [`VirtioMem::plugged_ranges`],
//!    [`VirtioMem::block_state`], [`VirtioMem::resident_bytes_unplugged`],
//!    and the [`VirtioMemMetrics`] counters.
//!
//! The plugged-block bitmap is the single source of truth: `plugged_size` is
//! derived from it, and it changes only after the backend succeeded. A failed
//! discard (or populate) leaves the blocks as they were and answers BUSY, which
//! Linux retries later; ERROR would make Linux mark the device broken for good.
//!
//! The guest is untrusted: malformed chains, bad addresses and ranges are
//! answered (ERROR, when there is somewhere to answer) and never panic.
//!
//! For Linux to use the memory, the region start and end should also be aligned
//! to the guest's memory block size (128 MiB on x86-64); the device only
//! requires block-size alignment.

mod bitmap;
#[cfg(test)]
mod test_utils;

pub mod backend;
pub mod config;
pub mod device;
pub mod memfd;
pub mod metrics;
pub mod request;

pub use backend::{BackendError, MemBackend, MemfdBackend, Populate};
pub use config::{ConfigError, Geometry, VirtioMemConfig, CONFIG_SPACE_SIZE, DEFAULT_BLOCK_SIZE};
pub use device::{
    DeviceParams, Error, ProcessOutcome, VirtioMem, DEVICE_TYPE, NUM_QUEUES, QUEUE_MAX_SIZE,
    VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
pub use metrics::{MetricsSnapshot, VirtioMemMetrics};
pub use request::{BlockRange, BlockState, Request, RequestError, Response, ResponseType};
