//! The slot table of a node at the promised size: 1 TiB of hotplug memory in 8192
//! regions of 128 MiB. What a guest's plugs and unplugs cost the VMM here is the view
//! rebuilt for the devices and the `mprotect` of each block (KVM's own slot ioctls are
//! left out: a no-op stands in for them).
//!
//! - `open one block in each region`: 8192 plug acknowledgements, each restoring its
//!   region's slot;
//! - `close a round`: one queue round after the guest unplugged those 8192 blocks, which
//!   removes every region.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vmm::layout::MemoryLayout;
use vmm::memory::slots::{KvmSlots, NodeSlots, Ranges, SlotTable};
use vmm::memory::GuestRam;

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;
const REGIONS: u64 = 8192;

/// KVM's slot table, as a no-op: the bench measures the VMM's own work.
struct NoKvm;

impl KvmSlots for NoKvm {
    fn nr_memslots(&self) -> usize {
        32764
    }

    unsafe fn set_slot(&self, _: u32, _: u64, _: u64, _: u64) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}

fn node() -> (GuestRam, Arc<SlotTable>, NodeSlots) {
    let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[REGIONS * REGION]).unwrap();
    let ram = GuestRam::new(&layout, 1).unwrap();
    let table = SlotTable::new(Arc::new(NoKvm), &ram).unwrap();
    let node = table.node(0);
    (ram, table, node)
}

fn open_each(node: &NodeSlots) {
    for region in 0..REGIONS {
        node.open_range(region * REGION, 2 * MIB).unwrap();
    }
}

fn slots(c: &mut Criterion) {
    let (_ram, _table, node) = node();
    let mut group = c.benchmark_group("slots of a 1 TiB node (8192 regions)");
    group.sample_size(10);
    group.bench_function("open one block in each region", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                open_each(&node);
                took += t.elapsed();
                node.close_outside(&Ranges::default());
            }
            took
        })
    });
    group.bench_function("close a round", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                open_each(&node);
                let t = Instant::now();
                let closing = node.close_outside(&Ranges::default());
                took += t.elapsed();
                assert_eq!(closing.removed.len() as u64, REGIONS);
            }
            took
        })
    });
    group.finish();
}

criterion_group!(benches, slots);
criterion_main!(benches);
