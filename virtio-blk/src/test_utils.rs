//! Test rig shared by the unit tests: requests travel through a
//! `MockSplitQueue` in a `GuestMemoryMmap`, and the disk is a real file in
//! the temporary directory.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::backend::{BackendError, DiskBackend, RawFile};
use crate::config::DiskId;
use crate::device::{ProcessOutcome, VirtioBlk};
use crate::request::{RequestHeader, RequestType};

pub(crate) const QSIZE: u16 = 256;
/// Guest memory size: room for the rings, the buffers and a 2 MiB data area.
pub(crate) const MEM_SIZE: u64 = 0x40_0000;
/// Where the device's used ring lives (see [`create_queue`]).
pub(crate) const USED_RING: u64 = 0x2000;
/// `used_event` in the avail ring (avail ring at 0x1000, after 256 descriptors).
pub(crate) const USED_EVENT: u64 = 0x1000 + 4 + 2 * QSIZE as u64;
pub(crate) const HDR: u64 = 0x1_0000;
pub(crate) const STATUS: u64 = 0x1_1000;
pub(crate) const INDIRECT: u64 = 0x1_2000;
pub(crate) const DATA: u64 = 0x20_0000;

pub(crate) const OK: u8 = 0;
pub(crate) const IOERR: u8 = 1;
pub(crate) const UNSUPP: u8 = 2;

/// The byte the test images hold at `offset` before anything writes them.
pub(crate) fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8 ^ (offset >> 12) as u8
}

/// What a test image holds at `offset..offset + len` before anything writes it.
pub(crate) fn initial(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(pattern).collect()
}

/// Writes a request header at `addr` in guest memory.
pub(crate) fn put_header(mem: &GuestMemoryMmap, addr: u64, request_type: RequestType, sector: u64) {
    let header = RequestHeader {
        request_type,
        sector,
    };
    mem.write_slice(&header.to_bytes(), GuestAddress(addr))
        .unwrap();
}

/// A disk image in the temporary directory, filled with [`pattern`] and
/// removed on drop.
pub(crate) struct TempImage {
    path: PathBuf,
}

impl TempImage {
    pub(crate) fn new(size: u64) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "virtio-blk-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let bytes: Vec<u8> = (0..size).map(pattern).collect();
        std::fs::write(&path, bytes).unwrap();
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }

    pub(crate) fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut b, offset)
            .unwrap();
        b
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Wraps a [`RawFile`], fails on demand and counts flushes.
#[derive(Debug)]
pub(crate) struct Flaky {
    pub(crate) inner: RawFile,
    pub(crate) fail_io: Cell<bool>,
    pub(crate) fail_flush: Cell<bool>,
    pub(crate) flushes: Cell<u32>,
}

impl Flaky {
    pub(crate) fn new(inner: RawFile) -> Self {
        Self {
            inner,
            fail_io: Cell::new(false),
            fail_flush: Cell::new(false),
            flushes: Cell::new(0),
        }
    }

    /// EIO when `fail_io` is set.
    fn gate(&self, offset: u64) -> Result<(), BackendError> {
        if !self.fail_io.get() {
            return Ok(());
        }
        Err(BackendError::Read {
            offset,
            len: 0,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        })
    }
}

impl DiskBackend for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError> {
        self.gate(offset)?;
        self.inner.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError> {
        self.gate(offset)?;
        self.inner.write_vectored_at(offset, bufs)
    }
    fn flush(&self) -> Result<(), BackendError> {
        if self.fail_flush.get() {
            return Err(BackendError::Flush(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        self.flushes.set(self.flushes.get() + 1);
        self.inner.flush()
    }
}

pub(crate) fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// The device-side queue for `vq`. `MockSplitQueue` places its used ring
/// `queue size` bytes after the avail ring start instead of `2 * size + 6`,
/// over the second half of the avail ring, so the device gets a used ring
/// of its own at [`USED_RING`], where the tests read it.
pub(crate) fn create_queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q
}

/// `(used idx, id and len of the element at used slot `idx - 1`)`.
pub(crate) fn last_used(mem: &GuestMemoryMmap) -> (u16, u32, u32) {
    let idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    let slot = u64::from(idx.wrapping_sub(1) % QSIZE);
    let elem = GuestAddress(USED_RING + 4 + slot * 8);
    let id: u32 = mem.read_obj(elem).unwrap();
    let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
    (idx, id, len)
}

/// A descriptor as the tests describe it: `(addr, len, device_writable)`.
pub(crate) type Desc = (u64, u32, bool);

pub(crate) struct Harness<'a, D: DiskBackend = RawFile> {
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub(crate) dev: VirtioBlk<D>,
    /// First free descriptor index for the next chain of this batch.
    next_desc: u16,
}

impl<'a> Harness<'a, RawFile> {
    /// A device over `img`, every feature acknowledged, activated.
    pub(crate) fn new(mem: &'a GuestMemoryMmap, img: &TempImage, read_only: bool) -> Self {
        Harness::with_disk(mem, RawFile::open(img.path(), read_only).unwrap())
    }
}

impl<'a, D: DiskBackend> Harness<'a, D> {
    /// A device over `disk` with id `test-disk`, every feature acknowledged,
    /// activated.
    pub(crate) fn with_disk(mem: &'a GuestMemoryMmap, disk: D) -> Self {
        let dev = VirtioBlk::new(disk, DiskId::new("test-disk").unwrap(), 512).unwrap();
        Self::with_device(mem, dev)
    }

    /// `dev` with every feature acknowledged, activated.
    pub(crate) fn with_device(mem: &'a GuestMemoryMmap, mut dev: VirtioBlk<D>) -> Self {
        dev.set_acked_features(dev.avail_features());
        let vq = MockSplitQueue::new(mem, QSIZE);
        dev.activate(create_queue(&vq), mem).unwrap();
        Self {
            mem,
            vq,
            dev,
            next_desc: 0,
        }
    }

    /// Stores `descs` as a linked chain from the next free index and makes
    /// it available.
    pub(crate) fn add_chain(&mut self, descs: &[Desc]) {
        let first = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(addr, len, flags, index + 1);
            self.vq
                .desc_table()
                .store(index, RawDescriptor::from(d))
                .unwrap();
        }
        self.next_desc += descs.len().max(1) as u16;
        self.publish(first);
    }

    /// Puts `descs` in an indirect table at [`INDIRECT`] and makes a chain of
    /// the one descriptor pointing at it available.
    pub(crate) fn add_indirect_chain(&mut self, descs: &[Desc]) {
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(addr, len, flags, i as u16 + 1);
            self.mem
                .write_obj(d, GuestAddress(INDIRECT + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        let table_len = 16 * descs.len() as u32;
        let d = SplitDescriptor::new(INDIRECT, table_len, VRING_DESC_F_INDIRECT as u16, 0);
        self.vq
            .desc_table()
            .store(head, RawDescriptor::from(d))
            .unwrap();
        self.next_desc += 1;
        self.publish(head);
    }

    /// Publishes `head` at `avail[idx % size]`, wrapping like a real driver.
    fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Serves the queue; the descriptor table is free again afterwards.
    pub(crate) fn process(&mut self) -> ProcessOutcome {
        let out = self.dev.process_queue(self.mem).unwrap();
        self.next_desc = 0;
        out
    }

    /// Serves the queue; returns the used length of the last chain.
    pub(crate) fn run(&mut self) -> u32 {
        assert!(self.process().chains >= 1);
        last_used(self.mem).2
    }

    /// Sends a request laid out as Linux does: header, data, status, each in
    /// descriptors of their own. Returns `(status, used len)`.
    pub(crate) fn request(&mut self, ty: RequestType, sector: u64, data: &[Desc]) -> (u8, u32) {
        put_header(self.mem, HDR, ty, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        self.add_chain(&chain);
        let used = self.run();
        (self.status(), used)
    }

    pub(crate) fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Reads `len` bytes at `sector` into [`DATA`]; returns the status and the data.
    pub(crate) fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(DATA))
            .unwrap();
        let (status, _) = self.request(RequestType::In, sector, &[(DATA, len, true)]);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        (status, data)
    }

    /// Writes `data` at `sector` from [`DATA`]; returns the status.
    pub(crate) fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let len = data.len() as u32;
        self.request(RequestType::Out, sector, &[(DATA, len, false)])
            .0
    }
}
