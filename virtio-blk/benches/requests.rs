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
//! - `pread/4KiB`, `pread/1MiB`: a bare `pread` of the same sizes from the
//!   same file into a buffer, the floor the device's figures compare with
//!   (the machine is shared, so absolute numbers vary with its load).
//!
//! Criterion prints both MiB/s and requests/s (elements/s).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_blk::{DiskId, RawFile, RequestHeader, RequestType, VirtioBlk};
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
