//! Request throughput through the real queue path (MockSplitQueue in a
//! GuestMemoryMmap) against a real memfd backend.
//!
//! - `plug_unplug_touched/2MiB`: PLUG one 2 MiB block, touch it (untimed), then
//!   UNPLUG it (the hole punch really frees 512 pages). Timed: both requests.
//! - `unplug_touched/N`: UNPLUG of N touched blocks at once; throughput is the
//!   memory given back to the host.
//! - `plug_unplug_untouched/2MiB`: the same round trip with nothing to free.
//! - `state/N`: STATE over N blocks (bitmap only).

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_mem::memfd::{self, Pages};
use virtio_mem::{BlockRange, DeviceParams, MemfdBackend, Request, VirtioMem};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BS: u64 = 2 << 20;
const BLOCKS: u64 = 128;
const REGION: u64 = 1 << 32;
const QSIZE: u16 = 64;
const REQ: u64 = 0x8000;
const RESP: u64 = 0x9000;
const USED_RING: u64 = 0x4000;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: VirtioMem<MemfdBackend>,
    touch_buf: Vec<u8>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let vq = MockSplitQueue::new(mem, QSIZE);
        let backend = MemfdBackend::new(
            memfd::create("virtio-mem-bench", BLOCKS * BS, Pages::Small).unwrap(),
            0,
            BLOCKS * BS,
        )
        .unwrap();
        let mut dev = VirtioMem::new(DeviceParams::new(REGION, BLOCKS * BS), backend).unwrap();
        dev.set_acked_features(dev.avail_features());
        // MockSplitQueue puts its used ring over the second half of its avail
        // ring; give the device a used ring of its own.
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        dev.activate(q, mem).unwrap();
        dev.set_requested_size(BLOCKS * BS).unwrap();
        let d0 = Descriptor::new(REQ, 24, VRING_DESC_F_NEXT as u16, 1);
        let d1 = Descriptor::new(RESP, 10, VRING_DESC_F_WRITE as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(d1)).unwrap();
        Self {
            mem,
            vq,
            dev,
            touch_buf: vec![0xa5; BS as usize],
        }
    }

    /// One request through the queue; returns the response type.
    fn send(&mut self, req: Request) -> u16 {
        self.mem
            .write_slice(&req.to_bytes(), GuestAddress(REQ))
            .unwrap();
        let idx = self.vq.avail().idx().load();
        let slot = usize::from(idx % QSIZE);
        self.vq.avail().ring().ref_at(slot).unwrap().store(0);
        self.vq.avail().idx().store(idx.wrapping_add(1));
        let out = self.dev.process_queue(self.mem).unwrap();
        assert_eq!(out.chains, 1);
        self.mem.read_obj::<u16>(GuestAddress(RESP)).unwrap()
    }

    fn touch(&self, first: u64, n: u64) {
        for b in first..first + n {
            self.dev
                .backend()
                .file()
                .write_at(&self.touch_buf, b * BS)
                .unwrap();
        }
    }
}

fn range(first: u64, n: u16) -> BlockRange {
    BlockRange {
        addr: REGION + first * BS,
        nb_blocks: n,
    }
}

fn benches(c: &mut Criterion) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut rig = Rig::new(&mem);

    let mut g = c.benchmark_group("plug_unplug_touched");
    g.throughput(Throughput::Bytes(BS));
    g.bench_function("2MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let blk = i % BLOCKS;
                let t = Instant::now();
                assert_eq!(rig.send(Request::Plug(range(blk, 1))), 0);
                total += t.elapsed();
                rig.touch(blk, 1);
                let t = Instant::now();
                assert_eq!(rig.send(Request::Unplug(range(blk, 1))), 0);
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();

    let mut g = c.benchmark_group("unplug_touched");
    for n in [1u16, 16, 64] {
        g.throughput(Throughput::Bytes(BS * u64::from(n)));
        g.bench_function(format!("{n}x2MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    assert_eq!(rig.send(Request::Plug(range(0, n))), 0);
                    rig.touch(0, u64::from(n));
                    let t = Instant::now();
                    assert_eq!(rig.send(Request::Unplug(range(0, n))), 0);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
    assert_eq!(rig.dev.resident_bytes().unwrap(), 0);

    let mut g = c.benchmark_group("plug_unplug_untouched");
    g.bench_function("2MiB", |b| {
        b.iter(|| {
            assert_eq!(rig.send(Request::Plug(range(5, 1))), 0);
            assert_eq!(rig.send(Request::Unplug(range(5, 1))), 0);
        })
    });
    g.finish();

    assert_eq!(rig.send(Request::Plug(range(0, 64))), 0);
    let mut g = c.benchmark_group("state");
    for n in [1u16, BLOCKS as u16] {
        g.bench_function(format!("{n}_blocks"), |b| {
            b.iter(|| assert_eq!(rig.send(Request::State(range(0, n))), 0))
        });
    }
    g.finish();
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
