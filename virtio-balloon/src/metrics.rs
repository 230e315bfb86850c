//! Device counters: lock-free atomics the device bumps, and a serializable
//! snapshot for export (e.g. Prometheus text format by the VMM).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of one virtio-balloon device. Shared with the VMM through an
        /// `Arc`, readable at any time without locking the device. All are
        /// monotonic; byte counts are in bytes.
        #[derive(Debug, Default)]
        pub struct BalloonMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`BalloonMetrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct MetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl BalloonMetrics {
            /// Copies every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Inflate chains served.
    inflate_chains,
    /// Deflate chains served.
    deflate_chains,
    /// Free page report chains served.
    report_chains,
    /// Pages newly put in the balloon, in bytes.
    inflated_bytes,
    /// Pages inflated again while already in the balloon, in bytes.
    reinflated_bytes,
    /// Pages taken out of the balloon, in bytes.
    deflated_bytes,
    /// Deflated pages that were not in the balloon (ignored), in bytes.
    deflate_unknown_bytes,
    /// Pages that left the balloon because their memory was unplugged, in bytes.
    unplugged_bytes,
    /// Reported free memory accepted for discarding, in bytes.
    reported_bytes,
    /// Host memory given back (successful discards), in bytes.
    discarded_bytes,
    /// Inflated or reported ranges with a part refused (not RAM, refused by
    /// the guard, unaligned or overflowing); the refused part is not discarded.
    rejected_ranges,
    /// Bytes of those refused parts.
    rejected_bytes,
    /// Backend discards that failed (the memory stays with the host).
    discard_failures,
    /// Chains refused whole (see `ChainError`); nothing in them is acted upon.
    malformed_chains,
    /// Stats buffers parsed.
    stats_updates,
    /// Stats entries with an unknown tag (ignored).
    stats_unknown_tags,
    /// Stats buffers handed back to the driver to ask for fresh ones.
    stats_requests,
    /// Host changes of the target (`num_pages`).
    target_changes,
    /// Driver writes outside `actual` (ignored).
    config_writes_ignored,
}

impl BalloonMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_reach_the_snapshot() {
        let m = BalloonMetrics::default();
        BalloonMetrics::add(&m.inflated_bytes, 4096);
        BalloonMetrics::add(&m.inflated_bytes, 8192);
        BalloonMetrics::inc(&m.malformed_chains);
        BalloonMetrics::inc(&m.config_writes_ignored);
        let s = m.snapshot();
        assert_eq!(s.inflated_bytes, 12288);
        assert_eq!((s.malformed_chains, s.config_writes_ignored), (1, 1));
        assert_eq!(
            s,
            MetricsSnapshot {
                inflated_bytes: 12288,
                malformed_chains: 1,
                config_writes_ignored: 1,
                ..MetricsSnapshot::default()
            }
        );
    }
}
