//! Request throughput through the real queue path (MockSplitQueue in a
//! GuestMemoryMmap) against a raw image on tmpfs (`/dev/shm`), so the figures
//! are the device's own cost (parsing, checks, preadv/pwritev into guest
//! memory) rather than a disk's.
//!
//! Each iteration is one request laid out as Linux does (header, one data
//! descriptor, status), to sequential sectors that wrap at the end of a
//! 64 MiB image filled beforehand (a hole would read faster than data):
//! - `read/4KiB`, `read/1MiB`: IN requests;
//! - `write/4KiB`, `write/1MiB`: OUT requests, FLUSH negotiated (write-back,
//!   as with Linux).
//!
//! - `round/budget`, `round/drain`: a ring full of 1 MiB writes (85 requests),
//!   served by one round of `RoundBudget::EVENT_LOOP` (what the VMM's event loop
//!   allows before it serves anything else) or drained whole (what it did before).
//!
//! - `pread/4KiB`, `pread/1MiB`: a bare `pread` of the same sizes from the
//!   same file into a buffer, the floor the device's figures compare with
//!   (the machine is shared, so absolute numbers vary with its load).
//!
//! Criterion prints both MiB/s and requests/s (elements/s).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_blk::{DiskId, RawFile, RequestHeader, RequestType, RoundBudget, VirtioBlk};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const IMAGE_SIZE: u64 = 64 << 20;
const QSIZE: u16 = 256;
const USED_RING: u64 = 0x2000;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;

/// The image file, removed on drop.
struct ShmImage(std::path::PathBuf);

impl ShmImage {
    fn new() -> Self {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/virtio-blk-bench-{}.img",
            std::process::id()
        ));
        let data: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).expect("/dev/shm must be a writable tmpfs");
        Self(path)
    }
}

impl Drop for ShmImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: VirtioBlk<RawFile>,
    next_sector: u64,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, image: &ShmImage) -> Self {
        let disk = RawFile::open(&image.0, false).unwrap();
        let mut dev = VirtioBlk::new(disk, DiskId::new("bench").unwrap(), 512).unwrap();
        dev.set_acked_features(dev.avail_features());
        let vq = MockSplitQueue::new(mem, QSIZE);
        // MockSplitQueue puts its used ring over the second half of its avail
        // ring; give the device a used ring of its own.
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        dev.activate(q, mem).unwrap();
        Self {
            mem,
            vq,
            dev,
            next_sector: 0,
        }
    }

    /// One request of `len` bytes at the next sequential sector.
    fn request(&mut self, ty: RequestType, len: u32) {
        if (self.next_sector * 512 + u64::from(len)) > IMAGE_SIZE {
            self.next_sector = 0;
        }
        let header = RequestHeader {
            request_type: ty,
            sector: self.next_sector,
        };
        self.next_sector += u64::from(len) / 512;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(HDR))
            .unwrap();
        let data_flags = if ty == RequestType::In {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let descs = [
            Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(DATA, len, data_flags | VRING_DESC_F_NEXT as u16, 2),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            self.vq
                .desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        let idx = self.vq.avail().idx().load();
        let slot = usize::from(idx % QSIZE);
        self.vq.avail().ring().ref_at(slot).unwrap().store(0);
        self.vq.avail().idx().store(idx.wrapping_add(1));
        let out = self.dev.process_queue(self.mem).unwrap();
        assert_eq!(out.chains, 1);
        assert_eq!(self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    }
}

/// Requests in a full ring: three descriptors each.
const FULL_RING: u16 = QSIZE / 3;

impl Rig<'_> {
    /// A fresh queue holding [`FULL_RING`] 1 MiB writes.
    fn fill_ring(&mut self) {
        self.dev.reset();
        self.dev.set_acked_features(self.dev.avail_features());
        self.vq = MockSplitQueue::new(self.mem, QSIZE);
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        self.dev.activate(q, self.mem).unwrap();
        let header = RequestHeader {
            request_type: RequestType::Out,
            sector: 0,
        };
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(HDR))
            .unwrap();
        for chain in 0..FULL_RING {
            let first = chain * 3;
            let descs = [
                Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, first + 1),
                Descriptor::new(DATA, 1 << 20, VRING_DESC_F_NEXT as u16, first + 2),
                Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (i, d) in descs.into_iter().enumerate() {
                self.vq
                    .desc_table()
                    .store(first + i as u16, RawDescriptor::from(d))
                    .unwrap();
            }
            let ring = self.vq.avail().ring();
            ring.ref_at(usize::from(chain)).unwrap().store(first);
        }
        self.vq.avail().idx().store(FULL_RING);
    }
}

fn rounds(c: &mut Criterion, rig: &mut Rig<'_>) {
    let mut g = c.benchmark_group("round");
    for (name, budget) in [
        ("budget", RoundBudget::EVENT_LOOP),
        ("drain", RoundBudget::UNLIMITED),
    ] {
        // Only the round is timed, not the filling of the ring.
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    rig.fill_ring();
                    let started = std::time::Instant::now();
                    let out = rig.dev.process_queue_within(rig.mem, &budget).unwrap();
                    took += started.elapsed();
                    assert_eq!(out.more, out.chains < u32::from(FULL_RING));
                }
                took
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let image = ShmImage::new();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rig = Rig::new(&mem, &image);
    for (group, ty) in [("read", RequestType::In), ("write", RequestType::Out)] {
        let mut g = c.benchmark_group(group);
        for (name, len) in [("4KiB", 4u32 << 10), ("1MiB", 1 << 20)] {
            g.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: u64::from(len),
            });
            g.bench_function(name, |b| b.iter(|| rig.request(ty, len)));
        }
        g.finish();
    }
    rounds(c, &mut rig);
    let mut g = c.benchmark_group("pread");
    let file = std::fs::File::open(&image.0).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    for (name, len) in [("4KiB", 4usize << 10), ("1MiB", 1 << 20)] {
        g.throughput(Throughput::ElementsAndBytes {
            elements: 1,
            bytes: len as u64,
        });
        g.bench_function(name, |b| {
            b.iter(|| {
                if offset + len as u64 > IMAGE_SIZE {
                    offset = 0;
                }
                file.read_exact_at(&mut buf[..len], offset).unwrap();
                offset += len as u64;
            })
        });
    }
    g.finish();
    let m = rig.dev.metrics().snapshot();
    assert_eq!(m.errors(), 0);
    assert!(m.read_ops > 0 && m.write_ops > 0);
}

criterion_group! {
    name = requests;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30);
    targets = benches
}
criterion_main!(requests);
