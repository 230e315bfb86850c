//! Test rig shared by the device tests: chains travel through
//! `MockSplitQueue`s in a `GuestMemoryMmap` whose regions are mapped from a
//! real memfd, and the device discards through a `MemfdBackend` built from that
//! guest memory.
//!
//! Guest memory: `[0, 2 MiB)` holds the rings and buffers (RAM the guard does
//! not allow), `[RAM, RAM + 16 MiB)` is RAM of which the guard allows the first
//! 12 MiB; the last 4 MiB play an unplugged virtio-mem block.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{
    AllowedRanges, BackendError, BalloonBackend, DiscardGuard, MemfdBackend, PAGE_SIZE,
};
use crate::device::{BalloonParams, ProcessOutcome, VirtioBalloon};
use crate::stats;
use crate::testing::{memfd_guest_memory, DriverQueue};

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const LOW_SIZE: u64 = 2 * MIB;
/// Guest-physical start of the RAM region the tests discard in.
pub(crate) const RAM: u64 = 1 << 32;
pub(crate) const RAM_SIZE: u64 = 16 * MIB;
/// The part of RAM the guard allows.
pub(crate) const ALLOWED: u64 = 12 * MIB;
pub(crate) const QSIZE: u16 = 128;
/// Page frame number of the first RAM page.
pub(crate) const RAM_PFN: u64 = RAM / PAGE_SIZE;

/// Queue `q`'s rings live at `q * 0x10000`, its buffers at 1 MiB + `q * 0x10000`.
fn ring_base(q: usize) -> u64 {
    q as u64 * 0x10000
}
pub(crate) fn buf(q: usize) -> u64 {
    MIB + q as u64 * 0x10000
}

/// Records every discard and fails them on demand.
pub(crate) struct Rec {
    pub(crate) inner: MemfdBackend,
    pub(crate) discards: RefCell<Vec<Range<u64>>>,
    pub(crate) fail: Cell<bool>,
}

impl BalloonBackend for Rec {
    fn ram_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        self.inner.ram_parts(range, f)
    }
    fn discard(&self, range: Range<u64>) -> Result<(), BackendError> {
        self.discards.borrow_mut().push(range.clone());
        if self.fail.get() {
            return Err(BackendError::NotRam {
                start: range.start,
                end: range.end,
            });
        }
        self.inner.discard(range)
    }
    fn resident_bytes(&self, range: Range<u64>) -> Result<u64, BackendError> {
        self.inner.resident_bytes(range)
    }
}

/// The guard of the tests: RAM up to [`ALLOWED`], and the unplugs a test announces.
#[derive(Debug)]
pub(crate) struct Guard {
    allowed: AllowedRanges,
    pub(crate) unplugged: RefCell<Vec<Range<u64>>>,
}

impl DiscardGuard for Guard {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        self.allowed.allowed_parts(range, f)
    }

    fn take_unplugged(&self, f: &mut dyn FnMut(Range<u64>)) {
        self.unplugged.borrow_mut().drain(..).for_each(f)
    }
}

pub(crate) fn guest_mem() -> GuestMemoryMmap {
    memfd_guest_memory(&[(0, LOW_SIZE), (RAM, RAM_SIZE)])
}

/// Every feature on.
pub(crate) fn all_features() -> BalloonParams {
    BalloonParams {
        stats_interval: Some(Duration::from_secs(5)),
        deflate_on_oom: true,
        free_page_reporting: true,
    }
}

pub(crate) fn device(mem: &GuestMemoryMmap, params: BalloonParams) -> VirtioBalloon<Rec, Guard> {
    let backend = Rec {
        inner: MemfdBackend::from_guest_memory(mem).unwrap(),
        discards: RefCell::default(),
        fail: Cell::new(false),
    };
    let guard = Guard {
        allowed: AllowedRanges::new(std::iter::once(RAM..RAM + ALLOWED).collect()),
        unplugged: RefCell::default(),
    };
    VirtioBalloon::new(params, backend, guard).unwrap()
}

pub(crate) struct Harness<'a> {
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) vqs: Vec<DriverQueue<'a>>,
    pub(crate) dev: VirtioBalloon<Rec, Guard>,
}

impl<'a> Harness<'a> {
    /// A device with `params`, the driver accepting `acked` of the offered
    /// features, activated with as many queues as it offers.
    pub(crate) fn with(mem: &'a GuestMemoryMmap, params: BalloonParams, acked: u64) -> Self {
        let mut dev = device(mem, params);
        let n = dev.queue_max_sizes().len();
        let vqs: Vec<_> = (0..n)
            .map(|q| DriverQueue::new(mem, ring_base(q), QSIZE))
            .collect();
        dev.set_acked_features(acked);
        let queues = vqs.iter().map(DriverQueue::queue).collect();
        dev.activate(queues, mem).unwrap();
        Self { mem, vqs, dev }
    }

    /// Every feature offered and accepted: queues inflate, deflate, stats, reporting.
    pub(crate) fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dev = device(mem, all_features());
        Self::with(mem, all_features(), dev.avail_features())
    }

    /// Queues one chain of `(addr, len, device_writable)` descriptors on queue `q`.
    pub(crate) fn add_chain(&self, q: usize, descs: &[(u64, u32, bool)]) {
        self.vqs[q].add_chain(descs);
    }

    pub(crate) fn run(&mut self, q: usize) -> ProcessOutcome {
        self.dev.process_queue(q, self.mem).unwrap()
    }

    /// `(used idx, len of the last used element)` of queue `q`.
    pub(crate) fn last_used(&self, q: usize) -> (u16, u32) {
        self.vqs[q].last_used()
    }

    /// Sends `pfns` on queue `q` (0 inflate, 1 deflate) in one descriptor, as
    /// Linux does, and checks the chain came back with nothing written.
    pub(crate) fn send_pfns(&mut self, q: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(buf(q))).unwrap();
        self.add_chain(q, &[(buf(q), bytes.len() as u32, false)]);
        self.served(q);
    }

    /// Processes queue `q` and checks one chain came back, with used length 0.
    pub(crate) fn served(&mut self, q: usize) {
        let before = self.last_used(q).0;
        let out = self.run(q);
        assert_eq!(out.chains, 1);
        assert!(out.needs_notification);
        assert_eq!(self.last_used(q), (before.wrapping_add(1), 0));
    }

    pub(crate) fn inflate(&mut self, pfns: &[u32]) {
        self.send_pfns(0, pfns);
    }

    pub(crate) fn deflate(&mut self, pfns: &[u32]) {
        self.send_pfns(1, pfns);
    }

    /// Sends a free page report: one device-writable descriptor per range.
    pub(crate) fn report(&mut self, ranges: &[(u64, u32)]) {
        let descs: Vec<_> = ranges.iter().map(|&(a, l)| (a, l, true)).collect();
        self.add_chain(3, &descs);
        self.served(3);
    }

    /// Gives the device a stats buffer holding `entries`; returns what
    /// processing did (the buffer is kept, so normally nothing is used).
    pub(crate) fn give_stats(&mut self, entries: &[(u16, u64)]) -> ProcessOutcome {
        let bytes = stats::encode(entries);
        self.mem.write_slice(&bytes, GuestAddress(buf(2))).unwrap();
        self.add_chain(2, &[(buf(2), bytes.len() as u32, false)]);
        self.run(2)
    }

    /// Announces `range` unplugged, as virtio-mem's guard would.
    pub(crate) fn unplug(&self, range: Range<u64>) {
        self.dev.guard().unplugged.borrow_mut().push(range);
    }

    pub(crate) fn discards(&self) -> Vec<Range<u64>> {
        self.dev.backend().discards.borrow_mut().drain(..).collect()
    }

    pub(crate) fn resident(&self, range: Range<u64>) -> u64 {
        self.dev.backend().resident_bytes(range).unwrap()
    }

    /// Writes `byte` over `[gpa, gpa + len)` through the guest mapping, as the
    /// guest touching its memory would.
    pub(crate) fn touch(&self, gpa: u64, len: u64, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    /// Whether every byte of `[gpa, gpa + len)` is `byte`.
    pub(crate) fn holds(&self, gpa: u64, len: u64, byte: u8) -> bool {
        let mut data = vec![!byte; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(gpa)).unwrap();
        data.iter().all(|&b| b == byte)
    }
}

/// The guest-physical address of RAM page `i`.
pub(crate) fn page(i: u64) -> u64 {
    RAM + i * PAGE_SIZE
}

/// The balloon PFN of RAM page `i`.
pub(crate) fn pfn(i: u64) -> u32 {
    (RAM_PFN + i) as u32
}
