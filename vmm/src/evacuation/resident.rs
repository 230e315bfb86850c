//! Each region's host-resident bytes as last measured, so that `GET /metrics`, answered
//! on the event loop, never walks a node's memory file there. A walk
//! is `SEEK_DATA`/`SEEK_HOLE` over the memfd, or `mincore` over the mappings of a
//! huge-page node: its cost grows with the node (up to 1 TiB) and its fragmentation,
//! and it holds the node's device lock, which the event loop needs to serve virtio-mem.
//!
//! The figures are refreshed
//! * at start (nothing is plugged yet: a walk finds nothing at once);
//! * by the node's `mempowerd/N` after each pass, before the pass's jobs are published,
//!   so that a job's end is reflected exactly;
//! * in the background ([`Evacuations`](super::Evacuations)' refresh pool) when a
//!   reader finds them older than [`REFRESH_AFTER`]: that reader gets the figures it
//!   found, the next one fresh ones. Scraped every interval, the figures are thus at
//!   most one interval old (plus a walk); `mempower_node_resident_age_seconds` says.
//!
//! The node list (`GET /nodes`) and the region listing (`GET /nodes/{id}/regions`) run on
//! a pool and measure anew (the node list stores what it measured here): a client that
//! reads them after its own writes sees those writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::node::NodeMemory;
use crate::sync::Locked;

/// Figures older than this start a background refresh when read.
pub const REFRESH_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Figures {
    regions: Vec<u64>,
    /// When the last refresh started measuring; None before the first.
    measured: Option<Instant>,
}

/// One node's cache.
#[derive(Default)]
pub struct ResidentCache {
    figures: Mutex<Figures>,
    /// Held for a whole refresh: refreshes run one at a time, so the last to measure is
    /// the last to store, and a slow background refresh cannot overwrite the worker's
    /// newer figures with older ones.
    walking: Mutex<()>,
    /// A background refresh is queued or running.
    pending: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

impl ResidentCache {
    /// Measures every region of `memory` (the device is locked for one region's walk at
    /// a time, never for the whole node). A region that cannot be measured reads as 0:
    /// the figure is informative, never acted upon. Never on the event loop.
    pub fn refresh(&self, memory: &dyn NodeMemory) {
        let _walking = lock(&self.walking);
        let started = Instant::now();
        let regions = (0..memory.geometry().regions())
            .map(|r| memory.resident_bytes(r).unwrap_or(0))
            .collect();
        *lock(&self.figures) = Figures {
            regions,
            measured: Some(started),
        };
    }

    /// Host-resident bytes of `region` as last measured.
    pub fn region(&self, region: u32) -> u64 {
        lock(&self.figures)
            .regions
            .get(region as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Host-resident bytes of the node's hotplug region (its regions tile it).
    pub fn total(&self) -> u64 {
        lock(&self.figures)
            .regions
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(*r))
    }

    /// How old the figures are; None before the first refresh.
    pub fn age(&self) -> Option<Duration> {
        lock(&self.figures).measured.map(|t| t.elapsed())
    }

    /// Whether a background refresh should start now: the figures are older than
    /// [`REFRESH_AFTER`] (or missing) and none is queued. True claims it: the caller
    /// must run [`Self::refresh`] (or [`Self::unclaim`]), which ends the claim.
    pub fn claim_refresh(&self) -> bool {
        if self.age().is_some_and(|age| age < REFRESH_AFTER) {
            return false;
        }
        !self.pending.swap(true, Ordering::AcqRel)
    }

    /// Runs the claimed refresh and ends the claim.
    pub fn refresh_claimed(&self, memory: &dyn NodeMemory) {
        self.refresh(memory);
        self.unclaim();
    }

    /// Gives up a claim whose refresh could not start.
    pub fn unclaim(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evacuation::node::{Geometry, MemSnapshot, NodeError};
    use std::sync::atomic::AtomicU64;

    const MIB: u64 = 1 << 20;

    /// Three regions whose resident bytes are `bytes`, counting walks.
    struct Fake {
        bytes: AtomicU64,
        walks: AtomicU64,
    }

    impl NodeMemory for Fake {
        fn geometry(&self) -> Geometry {
            Geometry::new(
                virtio_mem::Geometry::new(1 << 32, 3 * 128 * MIB, 2 * MIB).unwrap(),
                128 * MIB,
            )
        }
        fn snapshot(&self) -> MemSnapshot {
            unreachable!("not needed")
        }
        fn set_requested_size(&self, _: u64) -> Result<(), NodeError> {
            unreachable!("not needed")
        }
        fn resident_bytes(&self, region: u32) -> Result<u64, NodeError> {
            self.walks.fetch_add(1, Ordering::SeqCst);
            Ok(self.bytes.load(Ordering::SeqCst) * u64::from(region + 1))
        }
    }

    #[test]
    fn figures_are_read_without_walking_and_refreshed_when_stale() {
        let memory = Fake {
            bytes: AtomicU64::new(MIB),
            walks: AtomicU64::new(0),
        };
        let cache = ResidentCache::default();
        assert_eq!((cache.total(), cache.age()), (0, None));
        assert!(cache.claim_refresh(), "never measured: stale");
        assert!(!cache.claim_refresh(), "one background refresh at a time");
        cache.refresh_claimed(&memory);
        assert_eq!(memory.walks.load(Ordering::SeqCst), 3, "one walk a region");
        assert_eq!((cache.region(1), cache.total()), (2 * MIB, 6 * MIB));
        assert_eq!(cache.region(7), 0, "no such region");
        // The memory changes: readers see the old figures, and walk nothing.
        memory.bytes.store(0, Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(cache.total(), 6 * MIB);
        }
        assert_eq!(memory.walks.load(Ordering::SeqCst), 3);
        assert!(!cache.claim_refresh(), "fresh figures need no refresh");
        assert!(cache.age().unwrap() < REFRESH_AFTER);
        // The worker's refresh after a pass is exact at once.
        cache.refresh(&memory);
        assert_eq!(cache.total(), 0);
        // A claim that cannot run gives way to the next.
        *lock(&cache.figures) = Figures::default();
        assert!(cache.claim_refresh());
        cache.unclaim();
        assert!(cache.claim_refresh());
    }
}
