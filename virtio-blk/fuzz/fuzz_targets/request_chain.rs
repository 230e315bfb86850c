//! Fuzzes the request path: arbitrary descriptor chains (count, head,
//! addresses, lengths, flags, next links, indirect tables, header bytes) in a
//! MockSplitQueue, against the device over a small memfd image, with the
//! features renegotiated, the avail index corrupted and the disk failing
//! now and then.
//!
//! Invariants checked after every queue pass:
//! - no panic;
//! - every disk access the device makes lies inside the image (the `Bounded`
//!   backend asserts it before touching the file), and a read-only disk is
//!   never written;
//! - the image keeps its size, and every byte outside the ranges the device
//!   wrote keeps its initial pattern (nothing reaches the file but through
//!   the backend);
//! - every chain returned to the driver is counted exactly once in the
//!   metrics (an outcome or one kind of error).
//!
//! `seeds/request_chain/` holds a few hand-made inputs (read, write, flush,
//! GET_ID, a read-only disk, a mix with an indirect table and a
//! renegotiation) that start the fuzzer past the request parser:
//! `cargo fuzz run request_chain corpus/request_chain seeds/request_chain`.

#![no_main]

use std::cell::{Cell, RefCell};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_blk::{
    BackendError, DiskBackend, DiskId, MetricsSnapshot, RawFile, RequestHeader, RequestType,
    RoundBudget, VirtioBlk,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

const SECTORS: u64 = 32;
const DISK: u64 = SECTORS * 512;
const MEM_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 256;
const USED_RING: u64 = 0x2000;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const INDIRECT: u64 = 0xa000;
const DATA: u64 = 0x1_0000;

/// The image's initial content, computed once (loops in the target are
/// instrumented and slow).
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| (0..DISK).map(|o| (o % 251) as u8 ^ 0x5a).collect())
}

/// Forwards to a [`RawFile`] after asserting the access is inside the disk,
/// and keeps what the file should hold: the initial pattern, except where
/// the device wrote.
struct Bounded {
    inner: RawFile,
    expected: RefCell<Vec<u8>>,
    /// Fail every operation with EIO, as a broken host disk would.
    failing: Cell<bool>,
}

impl Bounded {
    fn check<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>]) -> u64 {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = offset.checked_add(len).expect("disk range overflows");
        assert!(
            end <= self.size(),
            "access {offset:#x}+{len:#x} outside the disk"
        );
        len
    }

    fn gate(&self) -> Result<(), BackendError> {
        if self.failing.get() {
            return Err(BackendError::Flush(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        Ok(())
    }
}

impl DiskBackend for Bounded {
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
        self.check(offset, bufs);
        self.gate()?;
        self.inner.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError> {
        assert!(!self.read_only(), "write reached a read-only disk");
        let len = self.check(offset, bufs) as usize;
        self.gate()?;
        let result = self.inner.write_vectored_at(offset, bufs);
        // The range was the device's to write: the file is now the truth there.
        let at = offset as usize;
        let mut expected = self.expected.borrow_mut();
        self.inner
            .file()
            .read_exact_at(&mut expected[at..at + len], offset)
            .unwrap();
        result
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.gate()?;
        self.inner.flush()
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
}

fn image(read_only: bool) -> RawFile {
    let file = virtio_mem::memfd::create("virtio-blk-fuzz", 0, virtio_mem::memfd::Pages::Small)
        .unwrap();
    file.write_all_at(pattern(), 0).unwrap();
    RawFile::from_file(file, read_only).unwrap()
}

/// Resets the device and activates it again with `features` acknowledged,
/// on fresh rings.
fn activate<'a>(
    mem: &'a GuestMemoryMmap,
    dev: &mut VirtioBlk<Bounded>,
    features: u64,
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::new(mem, QSIZE);
    dev.reset();
    dev.set_acked_features(features);
    // MockSplitQueue puts its used ring over the second half of its avail
    // ring; give the device a used ring of its own.
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    dev.activate(q, mem).unwrap();
    vq
}

/// A descriptor address: mostly one of the request buffers, sometimes the
/// end of guest memory, sometimes anything.
fn addr(input: &mut Input) -> Option<u64> {
    let sel = input.u8()?;
    let off = u64::from(input.u16()?);
    Some(match sel % 6 {
        0 => HDR + off % 64,
        1 => STATUS + off % 64,
        2 | 3 => DATA + off * 8,
        4 => MEM_SIZE.wrapping_sub(off % 1024),
        _ => input.u64()?,
    })
}

fn len(input: &mut Input) -> Option<u32> {
    Some(match input.u8()? % 6 {
        0 => 16,
        1 => 1,
        2 => 20,
        3 => 512 * u32::from(input.u8()? % 80),
        4 => u32::from(input.u16()?),
        _ => input.u32()?,
    })
}

/// Header bytes: a well-formed header with fuzzed fields, or raw bytes.
fn header(input: &mut Input) -> Option<[u8; 16]> {
    let sel = input.u8()?;
    if sel & 0x80 != 0 {
        return input.bytes::<16>();
    }
    let request_type = match sel % 6 {
        0 | 1 => RequestType::In,
        2 | 3 => RequestType::Out,
        4 => RequestType::Flush,
        _ => RequestType::GetId,
    };
    let sector = match (sel >> 3) % 4 {
        0 => u64::from(input.u8()?) % (SECTORS + 2),
        1 => SECTORS - u64::from(input.u8()? % 4),
        _ => input.u64()?,
    };
    Some(
        RequestHeader {
            request_type,
            sector,
        }
        .to_bytes(),
    )
}

/// The descriptors of one chain: a Linux-like layout with fuzzed data
/// segments, or fully fuzzed descriptors.
fn descriptors(input: &mut Input, op: u8) -> Option<Vec<(u64, u32, u16)>> {
    let write = VRING_DESC_F_WRITE as u16;
    if op & 0x10 != 0 {
        let n = if op & 0x08 != 0 {
            120 + u16::from(op % 16)
        } else {
            1 + u16::from(op % 8)
        };
        return (0..n)
            .map(|_| Some((addr(input)?, len(input)?, u16::from(input.u8()?) & 0x7)))
            .collect();
    }
    let data_flags = if input.u8()? & 1 == 1 { write } else { 0 };
    let mut descs = vec![(HDR, 16, 0)];
    let mut at = DATA;
    for _ in 0..op % 8 {
        let l = if input.u8()? & 3 == 0 {
            len(input)?
        } else {
            512 * u32::from(1 + input.u8()? % 16)
        };
        descs.push((at, l, data_flags));
        at += u64::from(l % 0x1_0000);
    }
    descs.push((STATUS, 1, write));
    Some(descs)
}

/// Builds one chain and makes it available: linked at descriptor indices
/// 0..n, with fuzzed links, or in an indirect table.
fn add_chain(
    input: &mut Input,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    op: u8,
) -> Option<()> {
    mem.write_slice(&header(input)?, GuestAddress(HDR)).ok()?;
    let descs = descriptors(input, op)?;
    let mode = input.u8()? % 4;
    let n = descs.len() as u16;
    let mut head = 0;
    for (i, &(a, l, f)) in descs.iter().enumerate() {
        let i = i as u16;
        let (mut flags, mut next) = (f & !(VRING_DESC_F_NEXT as u16), i + 1);
        if i + 1 < n {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if mode == 3 {
            // Fuzzed links and head.
            flags = f;
            next = input.u16()?;
        }
        let desc = Descriptor::new(a, l, flags, next);
        if mode == 2 {
            mem.write_obj(desc, GuestAddress(INDIRECT + 16 * u64::from(i)))
                .ok()?;
        } else {
            vq.desc_table().store(i, RawDescriptor::from(desc)).ok()?;
        }
    }
    if mode == 2 {
        let table = Descriptor::new(INDIRECT, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(table)).ok()?;
    } else if mode == 3 {
        head = input.u16()? % (QSIZE + 4);
    }
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .ok()?
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
    Some(())
}

/// A round's budget: unlimited, or a few requests (and one sync for odd ones).
fn budget_of(selector: u8) -> RoundBudget {
    match selector {
        0 => RoundBudget::UNLIMITED,
        n => RoundBudget {
            requests: u32::from(n),
            bytes: u64::MAX,
            syncs: if n % 2 == 1 { 1 } else { u32::MAX },
        },
    }
}

/// Chains the metrics account for: one outcome or one error each.
fn accounted(m: &MetricsSnapshot) -> u64 {
    m.read_ops + m.write_ops + m.flush_ops + m.get_id_ops + m.unsupported_requests + m.errors()
}

fn check(dev: &VirtioBlk<Bounded>) {
    let disk = dev.disk();
    let file = disk.inner.file();
    assert_eq!(
        file.metadata().unwrap().len(),
        DISK,
        "the image changed size"
    );
    let mut now = vec![0u8; DISK as usize];
    file.read_exact_at(&mut now, 0).unwrap();
    assert!(
        now == *disk.expected.borrow(),
        "the image changed outside the device's writes"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(flags) = input.u8() else { return };
    let read_only = flags & 1 == 1;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let disk = Bounded {
        inner: image(read_only),
        expected: RefCell::new(pattern().to_vec()),
        failing: Cell::new(false),
    };
    let mut dev = VirtioBlk::new(disk, DiskId::new("fuzz").unwrap(), 512).unwrap();
    let all = dev.avail_features();
    let mut vq = activate(&mem, &mut dev, all);
    let mut chains = 0u64;

    while let Some(op) = input.u8() {
        match op >> 5 {
            // Renegotiate: sometimes without FLUSH (write-through) or EVENT_IDX.
            6 => {
                let Some(drop) = input.u64() else { break };
                vq = activate(&mem, &mut dev, all & !(drop & (1 << 9 | 1 << 29)));
            }
            // The host disk breaks, or recovers.
            7 if op & 0x1f == 0x1e => dev.disk().failing.set(!dev.disk().failing.get()),
            // Corrupt the avail index, then reset the device like a VMM would.
            7 if op & 0x1f == 0x1f => {
                let Some(v) = input.u16() else { break };
                vq.avail().idx().store(v);
                if dev.process_queue(&mem).is_err() {
                    vq = activate(&mem, &mut dev, all);
                }
                chains = accounted(&dev.metrics().snapshot());
            }
            _ => {
                if add_chain(&mut input, &mem, &vq, op).is_none() {
                    break;
                }
                // Round after round, as the VMM's event loop serves it: a round
                // serves at most its budget, and makes progress while it asks to
                // be called again.
                let budget = budget_of(op >> 5);
                for round in 0.. {
                    assert!(round <= QSIZE, "more rounds than requests");
                    match dev.process_queue_within(&mem, &budget) {
                        Ok(out) => {
                            assert!(out.chains <= u32::from(QSIZE));
                            assert!(out.chains <= budget.requests);
                            assert!(!out.more || out.chains > 0, "a round made no progress");
                            chains += u64::from(out.chains);
                            assert_eq!(accounted(&dev.metrics().snapshot()), chains);
                            if !out.more {
                                break;
                            }
                        }
                        Err(_) => {
                            // The failing chain was served but never returned.
                            vq = activate(&mem, &mut dev, all);
                            chains = accounted(&dev.metrics().snapshot());
                            break;
                        }
                    }
                }
            }
        }
        check(&dev);
    }
    if *STATS.get_or_init(|| std::env::var_os("VIRTIO_BLK_FUZZ_STATS").is_some()) {
        eprintln!("stats {:?}", dev.metrics().snapshot());
    }
});

/// Set `VIRTIO_BLK_FUZZ_STATS` to print each input's device counters (to see
/// which paths a corpus reaches).
static STATS: OnceLock<bool> = OnceLock::new();
