//! The JSON documents of the balloon: its status and the body that sets its target.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The body of `PUT /api/v1/balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonTarget {
    /// Memory the guest is asked to give up, bytes: a multiple of 4 KiB, at most the
    /// guest's RAM.
    pub target_bytes: u64,
}

/// What `GET /api/v1/balloon` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// What the host asks the guest to give up (`num_pages` x 4 KiB).
    pub target_bytes: u64,
    /// What the guest's driver says it gave up (`actual` x 4 KiB): the guest's word.
    pub actual_bytes: u64,
    /// What the device saw inflated and not deflated since, and discarded.
    pub inflated_bytes: u64,
    /// Free memory the guest reported and the host discarded, since boot.
    pub reported_bytes: u64,
    /// Host memory given back by inflation and reports, since boot.
    pub discarded_bytes: u64,
    /// Whether the guest's driver has set the device up.
    pub driver_ready: bool,
    /// The features the device offers.
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
    /// The statistics polling interval; absent without the stats queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_interval_ms: Option<u64>,
    /// The guest's latest statistics; absent until it sent some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<BalloonStats>,
    /// Every device counter by name (bytes or events since boot): the `*_bytes` figures
    /// above and what was refused (`rejected_bytes`, `malformed_chains`...).
    pub counters: BTreeMap<String, u64>,
}

/// The guest's memory statistics (virtio 1.2 section 5.5.6.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// How long ago they arrived, in milliseconds.
    pub age_ms: u64,
    /// What the guest sent, by name (`free_memory`, `total_memory`, `available_memory`,
    /// `disk_caches`, `major_faults`...): bytes for memory, counts for events.
    pub values: BTreeMap<String, u64>,
}
