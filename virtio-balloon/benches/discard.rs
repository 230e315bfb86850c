//! Discard rate through the real queue path (driver queues in a memfd-backed
//! GuestMemoryMmap, the device's MemfdBackend built from it). Every iteration
//! first writes 128 MiB of guest RAM (untimed) so each discard really frees
//! host pages, then gives all of it back; throughput is that memory.
//!
//! - `report/2MiB_ranges`: 64 free 2 MiB ranges, none adjacent (so none merge),
//!   in 2 chains of 32 as Linux's page reporting sends them.
//! - `inflate/4KiB_adjacent`: 32768 PFNs in 128 chains of 256 (Linux's batch),
//!   consecutive pages: each chain merges into one 1 MiB discard.
//! - `inflate/4KiB_scattered`: 32768 PFNs of every other page: nothing
//!   merges, one 4 KiB discard per page (the worst case).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_balloon::testing::{memfd_guest_memory, DriverQueue};
use virtio_balloon::{
    AllowedRanges, BalloonBackend, BalloonParams, MemfdBackend, VirtioBalloon, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const LOW: u64 = 2 * MIB;
const RAM: u64 = 1 << 32;
const RAM_SIZE: u64 = 256 * MIB;
/// What each iteration touches and gives back.
const FREED: u64 = 128 * MIB;
const QSIZE: u16 = 128;
const BUF: u64 = MIB;
/// Linux's inflate batch (VIRTIO_BALLOON_ARRAY_PFNS_MAX).
const PFNS_PER_CHAIN: u64 = 256;
/// Linux's report batch (PAGE_REPORTING_CAPACITY).
const RANGES_PER_CHAIN: u64 = 32;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vqs: Vec<DriverQueue<'a>>,
    dev: VirtioBalloon<MemfdBackend, AllowedRanges>,
    chunk: Vec<u8>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let params = BalloonParams {
            stats_interval: Some(Duration::from_secs(1)),
            deflate_on_oom: false,
            free_page_reporting: true,
        };
        let backend = MemfdBackend::from_guest_memory(mem).unwrap();
        let guard = AllowedRanges::new(std::iter::once(RAM..RAM + RAM_SIZE).collect());
        let mut dev = VirtioBalloon::new(params, backend, guard).unwrap();
        dev.set_acked_features(dev.avail_features());
        let vqs: Vec<_> = (0..4u64)
            .map(|q| DriverQueue::new(mem, q * 0x10000, QSIZE))
            .collect();
        let queues = vqs.iter().map(DriverQueue::queue).collect();
        dev.activate(queues, mem).unwrap();
        Self {
            mem,
            vqs,
            dev,
            chunk: vec![0xa5; 2 * MIB as usize],
        }
    }

    /// Writes the pages `RAM + i * stride` pages about to be freed (each
    /// `chunk`-sized), as a guest using them would.
    fn touch(&self, stride: u64, chunk: u64) {
        for i in 0..FREED / chunk {
            let at = RAM + i * stride * chunk;
            let data = &self.chunk[..chunk as usize];
            self.mem.write_slice(data, GuestAddress(at)).unwrap();
        }
    }

    /// Publishes one chain at descriptor 0 of queue `q` and serves it.
    fn send(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
        self.vqs[q].add_chain(descs);
        let out = self.dev.process_queue(q, self.mem).unwrap();
        assert_eq!(out.chains, 1);
    }

    /// Inflates (`q == 0`) or deflates (`q == 1`) the pages `first + i * stride`.
    fn pfns(&mut self, q: usize, stride: u64) {
        let pages = FREED / PAGE_SIZE;
        let first = RAM / PAGE_SIZE;
        for c in 0..pages / PFNS_PER_CHAIN {
            let bytes: Vec<u8> = (0..PFNS_PER_CHAIN)
                .flat_map(|i| ((first + (c * PFNS_PER_CHAIN + i) * stride) as u32).to_le_bytes())
                .collect();
            self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
            self.send(q, &[(BUF, bytes.len() as u32, false)]);
        }
    }

    /// Reports every other 2 MiB range of the first `2 * FREED` bytes.
    fn report(&mut self) {
        let ranges = FREED / (2 * MIB);
        for c in 0..ranges / RANGES_PER_CHAIN {
            let descs: Vec<_> = (0..RANGES_PER_CHAIN)
                .map(|i| {
                    (
                        RAM + (c * RANGES_PER_CHAIN + i) * 4 * MIB,
                        2 * MIB as u32,
                        true,
                    )
                })
                .collect();
            self.send(3, &descs);
        }
    }

    fn resident(&self) -> u64 {
        self.dev
            .backend()
            .resident_bytes(RAM..RAM + RAM_SIZE)
            .unwrap()
    }
}

/// Times `free` only; `touch` before each run must leave `FREED` bytes resident
/// and `free` must release all of them.
fn timed(
    rig: &mut Rig,
    iters: u64,
    touch: impl Fn(&Rig),
    free: impl Fn(&mut Rig),
    after: impl Fn(&mut Rig),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        touch(rig);
        assert_eq!(rig.resident(), FREED);
        let t = Instant::now();
        free(rig);
        total += t.elapsed();
        assert_eq!(rig.resident(), 0);
        after(rig);
    }
    total
}

fn benches(c: &mut Criterion) {
    let mem = memfd_guest_memory(&[(0, LOW), (RAM, RAM_SIZE)]);
    let mut rig = Rig::new(&mem);

    let mut g = c.benchmark_group("report");
    g.throughput(Throughput::Bytes(FREED));
    g.bench_function("2MiB_ranges", |b| {
        b.iter_custom(|iters| {
            let touch = |r: &Rig| r.touch(2, 2 * MIB);
            timed(&mut rig, iters, touch, |r| r.report(), |_| {})
        })
    });
    g.finish();

    let mut g = c.benchmark_group("inflate");
    g.throughput(Throughput::Bytes(FREED));
    for (name, stride) in [("4KiB_adjacent", 1u64), ("4KiB_scattered", 2)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let chunk = if stride == 1 { 2 * MIB } else { PAGE_SIZE };
                let touch = |r: &Rig| r.touch(stride, chunk);
                timed(
                    &mut rig,
                    iters,
                    touch,
                    |r| r.pfns(0, stride),
                    |r| r.pfns(1, stride),
                )
            })
        });
    }
    g.finish();
    let m = rig.dev.metrics().snapshot();
    assert_eq!(
        m.malformed_chains + m.rejected_ranges + m.discard_failures,
        0
    );
    assert_eq!(rig.dev.inflated_bytes(), 0);
}

criterion_group! {
    name = discard;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    targets = benches
}
criterion_main!(discard);
