//! Releasing a touched 128 MiB region (one Linux memory block, one mempower region) to
//! the host, with 4 KiB shmem pages and with 2 MiB hugetlb pages: the UNPLUG of 64
//! blocks through the real queue path, whose cost is the backend's hole punch.
//!
//! The region is touched through a shared mapping of the memfd before each timed
//! unplug, as a guest touches it through KVM (hugetlbfs has no `write(2)`).
//!
//! The 2 MiB case needs 64 free huge pages (`echo 64 > /proc/sys/vm/nr_hugepages` as
//! root); without them it is skipped with a line saying so, never measured on small
//! pages instead.

use std::fs::File;
use std::os::fd::AsRawFd;
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
const BLOCKS: u16 = 64;
const REGION_BYTES: u64 = BLOCKS as u64 * BS;
const REGION: u64 = 1 << 32;
const QSIZE: u16 = 16;
const REQ: u64 = 0x8000;
const RESP: u64 = 0x9000;
const USED_RING: u64 = 0x4000;

/// A shared, writable mapping of the whole memfd: the guest's view of the region.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: u64) -> Mapping {
        let len = len as usize;
        // SAFETY: a fresh shared mapping of an open memfd at least `len` bytes long; the
        // kernel picks the address, and the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        Mapping {
            addr: addr.cast(),
            len,
        }
    }

    /// Writes one byte per 4 KiB page, so that every page of the region is allocated.
    fn touch(&self) {
        for off in (0..self.len).step_by(4096) {
            // SAFETY: `off < len`, inside the live mapping created in `new`, which is
            // writable; nothing else references this memory as a Rust object.
            unsafe { self.addr.add(off).write_volatile(0xa5) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing uses after.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: VirtioMem<MemfdBackend>,
    mapping: Mapping,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, pages: Pages) -> Result<Self, memfd::MemfdError> {
        let file = memfd::create("virtio-mem-release-bench", REGION_BYTES, pages)?;
        let mapping = Mapping::new(&file, REGION_BYTES);
        let backend = MemfdBackend::new(file, 0, REGION_BYTES).unwrap();
        let mut dev = VirtioMem::new(DeviceParams::new(REGION, REGION_BYTES), backend).unwrap();
        dev.set_acked_features(dev.avail_features());
        let vq = MockSplitQueue::new(mem, QSIZE);
        // MockSplitQueue puts its used ring over the second half of its avail ring;
        // give the device a used ring of its own.
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        dev.activate(q, mem).unwrap();
        dev.set_requested_size(REGION_BYTES).unwrap();
        let d0 = Descriptor::new(REQ, 24, VRING_DESC_F_NEXT as u16, 1);
        let d1 = Descriptor::new(RESP, 10, VRING_DESC_F_WRITE as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(d1)).unwrap();
        Ok(Rig {
            mem,
            vq,
            dev,
            mapping,
        })
    }

    /// One request through the queue; asserts it was acknowledged (ACK is 0).
    fn send(&mut self, req: Request) {
        self.mem
            .write_slice(&req.to_bytes(), GuestAddress(REQ))
            .unwrap();
        let idx = self.vq.avail().idx().load();
        let slot = usize::from(idx % QSIZE);
        self.vq.avail().ring().ref_at(slot).unwrap().store(0);
        self.vq.avail().idx().store(idx.wrapping_add(1));
        assert_eq!(self.dev.process_queue(self.mem).unwrap().chains, 1);
        assert_eq!(self.mem.read_obj::<u16>(GuestAddress(RESP)).unwrap(), 0);
    }
}

fn whole_region() -> BlockRange {
    BlockRange {
        addr: REGION,
        nb_blocks: BLOCKS,
    }
}

fn release(c: &mut Criterion) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut g = c.benchmark_group("release_touched_region");
    g.throughput(Throughput::Bytes(REGION_BYTES));
    for (name, pages) in [
        ("128MiB_4KiB_pages", Pages::Small),
        ("128MiB_2MiB_pages", Pages::Huge2M),
    ] {
        let mut rig = match Rig::new(&mem, pages) {
            Ok(rig) => rig,
            Err(e) => {
                println!("release_touched_region/{name}: skipped: {e}");
                continue;
            }
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rig.send(Request::Plug(whole_region()));
                    rig.mapping.touch();
                    let t = Instant::now();
                    rig.send(Request::Unplug(whole_region()));
                    total += t.elapsed();
                }
                total
            })
        });
        // The hole punch really gave the pages back: nothing of the region stays
        // allocated in the file (hugetlbfs counts its pages in st_blocks too).
        assert_eq!(
            rig.dev.backend().allocated_file_bytes().unwrap(),
            0,
            "{name}"
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);
    targets = release
}
criterion_main!(benches);
