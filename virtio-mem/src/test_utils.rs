//! Test rig shared by the device tests: requests travel through a
//! `MockSplitQueue` in a `GuestMemoryMmap`, and the region is backed by a real
//! memfd.

use std::cell::Cell;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::tests::memfd;
use crate::backend::{BackendError, MemBackend, MemfdBackend};
use crate::device::{DeviceParams, VirtioMem};
use crate::request::{BlockRange, Request, Response, REQUEST_SIZE, RESPONSE_SIZE};

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const BS: u64 = 2 * MIB;
pub(crate) const BLOCKS: u64 = 16;
pub(crate) const REGION: u64 = 1 << 32;
pub(crate) const FILE_BASE: u64 = 4 * MIB;
pub(crate) const REQ: u64 = 0x8000;
pub(crate) const RESP: u64 = 0x9000;

pub(crate) const ACK: u16 = 0;
pub(crate) const NACK: u16 = 1;
pub(crate) const BUSY: u16 = 2;
pub(crate) const ERROR: u16 = 3;

/// Wraps a memfd backend and fails on demand.
pub(crate) struct Flaky {
    pub(crate) inner: MemfdBackend,
    pub(crate) fail_discard_at: Cell<Option<u64>>,
    pub(crate) fail_populate: Cell<bool>,
}

impl MemBackend for Flaky {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.fail_populate.get() {
            // Takes host memory for the first block, then fails, as a pool running dry.
            self.inner
                .file()
                .write_at(&[7], self.inner.base() + offset)
                .unwrap();
            return Err(BackendError::OutOfRange {
                offset,
                len,
                size: 0,
            });
        }
        self.inner.populate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.fail_discard_at.get() == Some(offset) {
            return Err(BackendError::OutOfRange {
                offset,
                len,
                size: 0,
            });
        }
        self.inner.discard(offset, len)
    }
    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        self.inner.resident_bytes(offset, len)
    }
}

pub(crate) fn flaky() -> Flaky {
    Flaky {
        inner: memfd_backend(),
        fail_discard_at: Cell::new(None),
        fail_populate: Cell::new(false),
    }
}

pub(crate) fn memfd_backend() -> MemfdBackend {
    MemfdBackend::new(memfd(FILE_BASE + BLOCKS * BS), FILE_BASE, BLOCKS * BS).unwrap()
}

pub(crate) fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Where the tests put the used ring. `MockSplitQueue` places its used ring
/// `queue size` bytes after the avail ring start instead of `2 * size + 6`,
/// so it overlaps the second half of the avail ring: once the driver side
/// publishes its 17th chain (queue of 32), the device's used-ring writes
/// clobber avail entries. The queue given to the device uses this address
/// instead, and the tests read the used ring from here.
pub(crate) const USED_RING: u64 = 0x4000;

/// The device-side queue for `vq`, with the used ring moved to [`USED_RING`].
pub(crate) fn create_queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q
}

/// `(used idx, len of the last used element)`.
pub(crate) fn last_used(mem: &GuestMemoryMmap, qsize: u16) -> (u16, u32) {
    let idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    let slot = u64::from(idx.wrapping_sub(1) % qsize);
    let len: u32 = mem
        .read_obj(GuestAddress(USED_RING + 4 + slot * 8 + 4))
        .unwrap();
    (idx, len)
}

pub(crate) struct Harness<'a, B: MemBackend> {
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub(crate) dev: VirtioMem<B>,
}

impl<'a, B: MemBackend> Harness<'a, B> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap, backend: B) -> Self {
        let vq = MockSplitQueue::new(mem, 32);
        let mut params = DeviceParams::new(REGION, BLOCKS * BS);
        params.node_id = Some(3);
        let mut dev = VirtioMem::new(params, backend).unwrap();
        dev.set_acked_features(dev.avail_features());
        dev.activate(create_queue(&vq), mem).unwrap();
        dev.set_requested_size(BLOCKS * BS).unwrap();
        Self { mem, vq, dev }
    }

    /// Queues one chain of `(addr, len, device_writable)` descriptors.
    pub(crate) fn add_chain(&self, descs: &[(u64, u32, bool)]) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        for (i, d) in raw.into_iter().enumerate() {
            self.vq.desc_table().store(i as u16, d).unwrap();
        }
        // Publish head 0 at avail[idx % size], wrapping like a real driver.
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx) % 32)
            .unwrap()
            .store(0);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Processes the queue; returns the used length of the last chain.
    pub(crate) fn run(&mut self) -> u32 {
        let out = self.dev.process_queue(self.mem).unwrap();
        assert!(out.chains >= 1);
        assert!(out.needs_notification);
        last_used(self.mem, 32).1
    }

    /// Sends raw request bytes through a standard two-descriptor chain.
    pub(crate) fn send_raw(&mut self, req: &[u8; REQUEST_SIZE]) -> (u16, u16) {
        self.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xff; RESPONSE_SIZE], GuestAddress(RESP))
            .unwrap();
        self.add_chain(&[(REQ, 24, false), (RESP, 10, true)]);
        assert_eq!(self.run(), RESPONSE_SIZE as u32);
        self.response()
    }

    pub(crate) fn response(&self) -> (u16, u16) {
        let mut b = [0u8; RESPONSE_SIZE];
        self.mem.read_slice(&mut b, GuestAddress(RESP)).unwrap();
        Response::raw_fields(&b)
    }

    pub(crate) fn send(&mut self, req: Request) -> (u16, u16) {
        self.send_raw(&req.to_bytes())
    }

    pub(crate) fn plug(&mut self, first: u64, n: u16) -> u16 {
        self.send(Request::Plug(range(first, n))).0
    }

    pub(crate) fn unplug(&mut self, first: u64, n: u16) -> u16 {
        self.send(Request::Unplug(range(first, n))).0
    }

    pub(crate) fn state(&mut self, first: u64, n: u16) -> (u16, u16) {
        self.send(Request::State(range(first, n)))
    }
}

pub(crate) fn range(first_block: u64, nb_blocks: u16) -> BlockRange {
    BlockRange {
        addr: REGION + first_block * BS,
        nb_blocks,
    }
}

/// Writes `byte` over whole blocks of the memfd, as a guest touching them would.
pub(crate) fn touch(b: &MemfdBackend, first: u64, n: u64, byte: u8) {
    let data = vec![byte; (n * BS) as usize];
    b.file().write_at(&data, FILE_BASE + first * BS).unwrap();
}

pub(crate) fn block_bytes(b: &MemfdBackend, block: u64) -> Vec<u8> {
    let mut data = vec![0x55u8; BS as usize];
    b.file().read_at(&mut data, FILE_BASE + block * BS).unwrap();
    data
}
