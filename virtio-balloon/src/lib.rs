//! virtio-balloon device model (virtio 1.2 section 5.5 "Traditional Memory
//! Balloon Device"), with free page reporting.
//!
//! The host sets a target (`num_pages`); the guest driver inflates the balloon
//! by sending page frame numbers of pages it gives up, and deflates it by
//! sending those it takes back. The device punches a hole in the memfd behind
//! every inflated page (adjacent pages as one range), so the host gets the
//! memory back at once. With free page reporting the guest also sends free
//! ranges (2 MiB and up on x86-64) it keeps using afterwards: each is
//! discarded before its buffer is returned, without removing guest capacity.
//!
//! The crate knows neither KVM nor the transport. A VMM wires it like this:
//!
//! 1. [`MemfdBackend::from_guest_memory`] over the guest's memory (every region
//!    mapped from a memfd), and a [`DiscardGuard`] saying which ranges may be
//!    discarded now ([`AllowAll`] without virtio-mem; with it, only plugged
//!    memory, and [`DiscardGuard::take_unplugged`] reporting what was unplugged
//!    since, whose pages leave the balloon). Then [`VirtioBalloon::new`] with
//!    the [`BalloonParams`].
//! 2. Transport registers: [`VirtioBalloon::device_type`],
//!    [`VirtioBalloon::queue_max_sizes`], [`VirtioBalloon::avail_features`],
//!    [`VirtioBalloon::set_acked_features`], [`VirtioBalloon::read_config`],
//!    [`VirtioBalloon::write_config`], [`VirtioBalloon::config_generation`].
//! 3. On `DRIVER_OK`: [`VirtioBalloon::activate`] with the queues in index
//!    order. The driver sets up only the queues of the features it accepted,
//!    numbered without gaps ([`queue_layout`]): with reporting but no stats
//!    queue, queue 2 is the reporting queue and queue 3 stays unused. On a
//!    status write of 0: [`VirtioBalloon::reset`].
//! 4. On a notification of queue `i`: [`VirtioBalloon::process_queue`], then
//!    signal the used-buffer interrupt if [`ProcessOutcome::needs_notification`].
//! 5. To resize: [`VirtioBalloon::set_target_bytes`]; if it returns `true`,
//!    signal a configuration-change interrupt.
//! 6. Stats: every [`VirtioBalloon::stats_interval`], call
//!    [`VirtioBalloon::request_stats`] (and signal as in 4); read
//!    [`VirtioBalloon::last_stats`].
//! 7. To observe: [`VirtioBalloon::target_bytes`],
//!    [`VirtioBalloon::actual_bytes`] (what the driver claims),
//!    [`VirtioBalloon::inflated_bytes`] and
//!    [`VirtioBalloon::inflated_ranges`] (what the device saw), and the
//!    [`BalloonMetrics`] counters.
//!
//! The guest is untrusted. A malformed chain (wrong descriptor direction, too
//! many descriptors, too many bytes, unreadable memory, partial entries) is
//! refused whole; a page or range outside guest RAM, refused by the guard,
//! unaligned or overflowing is not discarded. Both are counted in the metrics,
//! the buffer is returned, and nothing panics. The work per chain is bounded
//! by [`MAX_CHAIN_DESCRIPTORS`], [`MAX_PFNS_PER_CHAIN`] and [`MAX_STATS_BYTES`].

mod pageset;
#[cfg(test)]
mod test_utils;

pub mod backend;
pub mod chain;
pub mod config;
pub mod device;
pub mod metrics;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use backend::{
    for_each_overlap, merge, AllowAll, AllowedRanges, BackendError, BalloonBackend, DiscardGuard,
    MemfdBackend, PAGE_SIZE,
};
pub use chain::{ChainError, MAX_CHAIN_DESCRIPTORS, MAX_PFNS_PER_CHAIN, MAX_STATS_BYTES};
pub use config::{BalloonConfig, ConfigError, CONFIG_SPACE_SIZE};
pub use device::{
    queue_layout, BalloonParams, Error, ProcessOutcome, QueueKind, StatsUpdate, VirtioBalloon,
    DEVICE_TYPE, QUEUE_MAX_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
};
pub use metrics::{BalloonMetrics, MetricsSnapshot};
pub use stats::{BalloonStats, STAT_SIZE};
