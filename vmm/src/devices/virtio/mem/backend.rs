//! The node's memfd behind its virtio-mem device, and the hook that opens a plug's blocks
//! (and gives their region its memory slot back) before the device acknowledges it.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_mem::{BackendError, MemBackend, MemfdBackend};

use super::release::Releaser;
use crate::memory::slots::NodeSlots;
use crate::memory::{populate_write, present_bytes};
use crate::sync::Locked;

/// A [`MemfdBackend`] whose `populate` (called before a PLUG is acknowledged) first
/// opens the plug's blocks, restoring the slots of the regions it touches. A failure
/// answers the guest BUSY (it retries later) and leaves the blocks unplugged.
///
/// With slots, `discard` (an unplug) only notes the blocks: they are punched once closed,
/// off the event loop (see `release`); a plug takes them back from that queue first.
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
    /// The node's punches, and the time spent giving memory back (hole punches, slot
    /// removals): what an evacuation reports as its release phase.
    releaser: Releaser,
    huge: bool,
    /// The ranges discarded since [`Self::take_discarded`] last took them (offsets in
    /// the region), merged: at most one per two blocks, whoever takes them or not.
    /// Locked while the device is (a leaf lock).
    discarded: Mutex<Vec<Range<u64>>>,
}

impl SlotBackend {
    pub fn new(
        node: u32,
        memfd: MemfdBackend,
        slots: Option<NodeSlots>,
    ) -> Result<Self, BackendError> {
        let releaser = Releaser::new(node, Self::twin_file(&memfd)?, slots.clone());
        Ok(SlotBackend {
            node,
            memfd,
            slots,
            releaser,
            huge: false,
            discarded: Mutex::default(),
        })
    }

    /// The same slice of the node's file, through a descriptor of its own.
    fn twin_file(memfd: &MemfdBackend) -> Result<MemfdBackend, BackendError> {
        let file = memfd.file().try_clone().map_err(BackendError::Stat)?;
        MemfdBackend::new(file, memfd.base(), memfd.size())
    }

    /// The node's punches.
    pub fn releaser(&self) -> &Releaser {
        &self.releaser
    }

    /// The ranges (offsets in the region) discarded since the last call: the blocks
    /// unplugged since, for the balloon to drop its pages of them.
    pub fn take_discarded(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *self.discarded.locked())
    }

    /// Counts `took` as time spent releasing memory.
    pub fn add_release_time(&self, took: Duration) {
        self.releaser.add_release_time(took);
    }

    /// Time spent releasing memory since the device was made.
    pub fn release_time(&self) -> Duration {
        self.releaser.release_time()
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
    /// of the node's file, the same slots and punch queue. A walk needs neither the
    /// device nor its lock, and one made through the device would hold the lock the
    /// event loop needs to serve the device's queue, for as long as the walk takes.
    pub fn measurer(&self) -> std::io::Result<SlotBackend> {
        let memfd = Self::twin_file(&self.memfd).map_err(std::io::Error::other)?;
        Ok(SlotBackend {
            node: self.node,
            memfd,
            slots: self.slots.clone(),
            releaser: self.releaser.share(),
            huge: self.huge,
            discarded: Mutex::default(),
        })
    }

    /// The node's region slots, if the device manages them.
    pub fn slots(&self) -> Option<&NodeSlots> {
        self.slots.as_ref()
    }
}

impl SlotBackend {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.memfd.size() => Ok(()),
            _ => Err(BackendError::OutOfRange {
                offset,
                len,
                size: self.memfd.size(),
            }),
        }
    }
}

impl MemBackend for SlotBackend {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if let Some(slots) = &self.slots {
            // Nothing queued may punch what the guest writes once this plug is acked.
            self.releaser.reclaim(offset, len);
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
        if self.slots.is_some() {
            // Punched once closed, after the queue round (MemDevice::close_unplugged),
            // and off the event loop (`release`).
            self.check_range(offset, len)?;
            self.releaser.note(offset, len);
        } else {
            let t = Instant::now();
            let done = self.memfd.discard(offset, len);
            self.add_release_time(t.elapsed());
            done?;
        }
        let mut discarded = self.discarded.locked();
        discarded.push(offset..offset.saturating_add(len));
        *discarded = virtio_balloon::merge(std::mem::take(&mut *discarded));
        Ok(())
    }

    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        self.check_range(offset, len)?;
        // What is unplugged counts as released once punched: wait for its punches.
        self.releaser.settle(offset, len);
        let Some(slots) = self.huge_slots() else {
            return self.memfd.resident_bytes(offset, len);
        };
        slots
            .host_ranges(offset, len)
            .into_iter()
            .try_fold(0, |sum, (host, host_len)| {
                Ok(sum + present_bytes(host, host_len).map_err(BackendError::Seek)?)
            })
    }
}
