//! Test support (feature `test-utils`): memfd-backed guest memory and the
//! driver's side of a virtqueue, shared by the unit tests, the bench and the
//! fuzz target.

use std::fs::File;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::{MockError, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// A fresh memfd of `size` bytes.
pub fn memfd(size: u64) -> File {
    virtio_mem::memfd::create("virtio-balloon-test", size, virtio_mem::memfd::Pages::Small).unwrap()
}

/// Guest memory of `(guest-physical start, length)` regions, all mapped from
/// one new memfd, back to back in it, as a VMM maps a node's memfd.
pub fn memfd_guest_memory(regions: &[(u64, u64)]) -> GuestMemoryMmap {
    let file = memfd(regions.iter().map(|r| r.1).sum());
    let mut offset = 0;
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(start, len)| {
            let fo = FileOffset::new(file.try_clone().unwrap(), offset);
            offset += len;
            (GuestAddress(start), len as usize, Some(fo))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

/// The driver's side of a split virtqueue in guest memory: it writes
/// descriptors, publishes chains and reads the used ring.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    used: u64,
    size: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries whose rings start at `base` (4 KiB aligned).
    /// `MockSplitQueue` puts its used ring over half of its avail ring, so the
    /// used ring goes on the next 4 KiB boundary instead.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), size);
        let avail_end = base + 16 * u64::from(size) + 6 + 2 * u64::from(size);
        Self {
            mem,
            vq,
            used: avail_end.next_multiple_of(4096),
            size,
        }
    }

    /// The device's side, ready, as a transport hands it over.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q
    }

    /// Writes descriptor `index` as is.
    pub fn store(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), MockError> {
        let d = Descriptor::new(addr, len, flags, next);
        self.vq.desc_table().store(index, RawDescriptor::from(d))
    }

    /// Makes the chain at descriptor `head` available, wrapping like a driver.
    pub fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        let slot = usize::from(idx % self.size);
        self.vq.avail().ring().ref_at(slot).unwrap().store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Writes a chain of `(addr, len, device_writable)` descriptors at
    /// indices 0.. and publishes it.
    pub fn add_chain(&self, descs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(i as u16, addr, len, flags, i as u16 + 1)
                .unwrap();
        }
        self.publish(0);
    }

    /// Overwrites the avail index, as a broken or hostile driver might.
    pub fn set_avail_idx(&self, idx: u16) {
        self.vq.avail().idx().store(idx);
    }

    /// `(used index, length of the last used element)`.
    pub fn last_used(&self) -> (u16, u32) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let slot = u64::from(idx.wrapping_sub(1) % self.size);
        let len_at = GuestAddress(self.used + 4 + slot * 8 + 4);
        (idx, self.mem.read_obj(len_at).unwrap())
    }
}
