//! The node's memfd behind its virtio-mem device, and the hook that opens a plug's blocks
//! (and gives their region its memory slot back) before the device acknowledges it.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_mem::{BackendError, MemBackend, MemfdBackend};

use crate::memory::slots::NodeSlots;
use crate::memory::{populate_write, present_bytes};
use crate::sync::Locked;

/// A [`MemfdBackend`] whose `populate` (called before a PLUG is acknowledged) first
/// opens the plug's blocks, restoring the slots of the regions it touches. A failure answers the guest BUSY
/// (it retries later) and leaves the blocks unplugged.
///
/// On hugetlbfs (`hugepages=on`, with slots) it works through the region mappings: a
/// plug allocates its huge pages (`MADV_POPULATE_WRITE`), so that a short pool answers
/// BUSY instead of the guest faulting later, and so that the mapping's `host-node=`
/// policy places them (hugetlbfs' `fallocate` would ignore it); resident bytes are the
/// mappings' present pages (`mincore`), as hugetlbfs has no `SEEK_DATA`.
#[derive(Debug)]
pub struct SlotBackend {
    node: u32,
    memfd: MemfdBackend,
    slots: Option<NodeSlots>,
    /// Time spent giving memory back (hole punches, slot removals), nanoseconds: what
    /// an evacuation reports as its release phase.
    release_ns: AtomicU64,
    huge: bool,
    /// The ranges discarded since [`Self::take_discarded`] last took them (offsets in
    /// the region), merged: at most one per two blocks, whoever takes them or not.
    /// Locked while the device is (a leaf lock).
    discarded: Mutex<Vec<Range<u64>>>,
}

impl SlotBackend {
    pub fn new(node: u32, memfd: MemfdBackend, slots: Option<NodeSlots>) -> Self {
        SlotBackend {
            node,
            memfd,
            slots,
            release_ns: AtomicU64::new(0),
            huge: false,
            discarded: Mutex::default(),
        }
    }

    /// The ranges (offsets in the region) discarded since the last call: the blocks
    /// unplugged since, for the balloon to drop its pages of them.
    pub fn take_discarded(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *self.discarded.locked())
    }

    /// Counts `took` as time spent releasing memory.
    pub fn add_release_time(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.release_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Time spent releasing memory since the device was made.
    pub fn release_time(&self) -> Duration {
        Duration::from_nanos(self.release_ns.load(Ordering::Relaxed))
    }

    /// The memfd is hugetlbfs: allocate and measure through the slots' mappings.
    pub fn with_huge_pages(mut self) -> Self {
        self.huge = true;
        self
    }

    /// The slots whose mappings stand for the file, on hugetlbfs.
    fn huge_slots(&self) -> Option<&NodeSlots> {
        self.slots.as_ref().filter(|_| self.huge)
    }

    /// The node's memory file, which releases and preallocations act on.
    pub fn file(&self) -> &std::fs::File {
        self.memfd.file()
    }

    /// A twin that only measures ([`MemBackend::resident_bytes`]): its own descriptor
    /// of the node's file, the same slots. A walk needs neither the device nor its lock,
    /// and one made through the device would hold the lock the event loop needs to
    /// serve the device's queue, for as long as the walk takes.
    pub fn measurer(&self) -> std::io::Result<SlotBackend> {
        let file = self.memfd.file().try_clone()?;
        let memfd = MemfdBackend::new(file, self.memfd.base(), self.memfd.size())
            .map_err(std::io::Error::other)?;
        Ok(SlotBackend {
            huge: self.huge,
            ..SlotBackend::new(self.node, memfd, self.slots.clone())
        })
    }

    /// The node's region slots, if the device manages them.
    pub fn slots(&self) -> Option<&NodeSlots> {
        self.slots.as_ref()
    }
}

impl MemBackend for SlotBackend {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if let Some(slots) = &self.slots {
            if let Err(e) = slots.open_range(offset, len) {
                log::warn!(
                    "virtio-mem of node {}: plug of {offset:#x}+{len:#x} answered BUSY: {e}",
                    self.node
                );
                return Err(BackendError::Populate {
                    offset,
                    len,
                    source: std::io::Error::other(e),
                });
            }
        }
        let Some(slots) = self.huge_slots() else {
            return self.memfd.populate(offset, len);
        };
        for (host, host_len) in slots.host_ranges(offset, len) {
            populate_write(host, host_len).map_err(|source| {
                log::warn!(
                    "virtio-mem of node {}: plug of {offset:#x}+{len:#x} answered BUSY: no \
                     huge page for it ({source})",
                    self.node
                );
                BackendError::Populate {
                    offset,
                    len,
                    source,
                }
            })?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        // Only the file: the blocks are closed (and their region's slot goes once none of
        // its blocks is plugged) after the queue round (MemDevice::close_unplugged).
        let t = Instant::now();
        let done = self.memfd.discard(offset, len);
        self.add_release_time(t.elapsed());
        if done.is_ok() {
            let mut discarded = self.discarded.locked();
            discarded.push(offset..offset.saturating_add(len));
            *discarded = virtio_balloon::merge(std::mem::take(&mut *discarded));
        }
        done
    }

    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        let Some(slots) = self.huge_slots() else {
            return self.memfd.resident_bytes(offset, len);
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.memfd.size())
        {
            return Err(BackendError::OutOfRange {
                offset,
                len,
                size: self.memfd.size(),
            });
        }
        slots
            .host_ranges(offset, len)
            .into_iter()
            .try_fold(0, |sum, (host, host_len)| {
                Ok(sum + present_bytes(host, host_len).map_err(BackendError::Seek)?)
            })
    }
}
