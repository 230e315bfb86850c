//! Fuzzes the four balloon queues: arbitrary descriptor chains (count, head,
//! addresses, lengths, flags, next links, PFN arrays, stats bytes) in
//! MockSplitQueues, interleaved with host operations (target changes, stats
//! requests, config accesses, resets with any subset of the features,
//! corrupt avail indexes), against a MemfdBackend over memfd-backed guest
//! memory and a guard that refuses part of RAM.
//!
//! Invariants checked after every operation:
//! - no panic;
//! - every discard the backend received lies inside RAM the guard allows;
//! - every page the guard refuses (ring memory included), all written
//!   first, is still resident in the memfd: none was discarded;
//! - the balloon the device tracks lies inside the allowed ranges, and its
//!   byte count matches its ranges.

#![no_main]

use std::cell::RefCell;
use std::ops::Range;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use virtio_balloon::testing::{memfd_guest_memory, DriverQueue};
use virtio_balloon::{
    AllowedRanges, BackendError, BalloonBackend, BalloonParams, MemfdBackend, QueueKind,
    VirtioBalloon, PAGE_SIZE,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const LOW: u64 = MIB;
const RAM: u64 = 1 << 32;
const RAM_SIZE: u64 = 8 * MIB;
const QSIZE: u16 = 128;
/// Buffers the chains point into.
const BUF: u64 = 0x20000;
/// Low memory the guard refuses and the fuzzer marks (rings are below).
const MARKED_LOW: Range<u64> = 0x80000..LOW;
const MARK: u64 = 0x4d41_524b_4d41_524b;

fn allowed() -> Vec<Range<u64>> {
    vec![RAM..RAM + 2 * MIB, RAM + 3 * MIB..RAM + 6 * MIB]
}

/// The refused pages the fuzzer marks.
fn refused() -> Vec<Range<u64>> {
    vec![
        MARKED_LOW,
        RAM + 2 * MIB..RAM + 3 * MIB,
        RAM + 6 * MIB..RAM + RAM_SIZE,
    ]
}

/// Records every discard before doing it.
struct Rec {
    inner: MemfdBackend,
    discards: RefCell<Vec<Range<u64>>>,
}

impl BalloonBackend for Rec {
    fn ram_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        self.inner.ram_parts(range, f)
    }
    fn discard(&self, range: Range<u64>) -> Result<(), BackendError> {
        self.discards.borrow_mut().push(range.clone());
        self.inner.discard(range)
    }
    fn resident_bytes(&self, range: Range<u64>) -> Result<u64, BackendError> {
        self.inner.resident_bytes(range)
    }
}

type Dev = VirtioBalloon<Rec, AllowedRanges>;

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

/// Resets the device and activates it with `features` (of those offered).
fn activate<'a>(mem: &'a GuestMemoryMmap, dev: &mut Dev, features: u64) -> Vec<DriverQueue<'a>> {
    dev.reset();
    dev.set_acked_features(features | 1 << 32);
    let vqs: Vec<_> = (0..4u64)
        .map(|q| DriverQueue::new(mem, q * 0x4000, QSIZE))
        .collect();
    let queues = vqs.iter().map(DriverQueue::queue).collect();
    dev.activate(queues, mem).unwrap();
    vqs
}

/// A descriptor address: mostly the buffer or RAM pages, sometimes the end of
/// a region, sometimes anything.
fn addr(input: &mut Input) -> Option<u64> {
    let sel = input.u8()?;
    Some(match sel % 6 {
        0 => BUF + u64::from(input.u8()?),
        1 | 2 => RAM + u64::from(input.u16()? % 4096) * PAGE_SIZE,
        3 => RAM + u64::from(input.u16()?) * 512,
        4 => (RAM + RAM_SIZE).wrapping_sub(u64::from(input.u8()?) * PAGE_SIZE),
        _ => input.u64()?,
    })
}

fn len(input: &mut Input) -> Option<u32> {
    Some(match input.u8()? % 6 {
        0 => 4 * u32::from(input.u8()?),
        1 => 10 * u32::from(input.u8()? % 20),
        2 => 2 * MIB as u32,
        3 => PAGE_SIZE as u32 * u32::from(input.u8()?),
        4 => u32::from(input.u8()?),
        _ => input.u32()?,
    })
}

/// Fills the buffer with what `kind` carries: PFNs (mostly RAM pages and
/// runs of them) or stats entries. Sometimes the buffer is left as the last
/// chain had it, so a deflate can name the pages an inflate just did.
fn fill_buffer(input: &mut Input, mem: &GuestMemoryMmap, kind: QueueKind) -> Option<()> {
    let sel = input.u8()?;
    if sel & 0x80 != 0 {
        return Some(());
    }
    let n = usize::from(input.u8()?);
    let mut bytes = Vec::new();
    let mut last = (RAM / PAGE_SIZE) as u32;
    for _ in 0..n {
        match (kind, sel & 0x40 != 0) {
            (QueueKind::Stats, _) => {
                bytes.extend_from_slice(&u16::from(input.u8()? % 20).to_le_bytes());
                bytes.extend_from_slice(&input.bytes::<8>()?);
            }
            (_, false) => {
                last = match input.u8()? % 4 {
                    0 => (RAM / PAGE_SIZE) as u32 + u32::from(input.u16()? % 2048),
                    1 => last.wrapping_add(1),
                    2 => last.wrapping_sub(u32::from(input.u8()?)),
                    _ => input.u32()?,
                };
                bytes.extend_from_slice(&last.to_le_bytes());
            }
            (_, true) => bytes.push(input.u8()?),
        }
    }
    mem.write_slice(&bytes, GuestAddress(BUF)).ok()
}

/// A descriptor as a driver would make it for `kind`, with fuzzed sizes.
fn well_formed(input: &mut Input, kind: QueueKind) -> Option<(u64, u32, u16)> {
    let v = input.u8()?;
    Some(match kind {
        QueueKind::Reporting => {
            let (addr, len) = match v % 4 {
                0 => (RAM + u64::from(v >> 2) % 4 * 2 * MIB, 2 * MIB),
                1 => (
                    RAM + u64::from(input.u16()? % 2048) * PAGE_SIZE,
                    PAGE_SIZE << (v >> 5),
                ),
                2 => (
                    RAM + u64::from(input.u16()? % 2048) * PAGE_SIZE,
                    PAGE_SIZE * u64::from(input.u8()?),
                ),
                _ => (RAM + u64::from(input.u16()?), u64::from(input.u16()?)),
            };
            (addr, len as u32, VRING_DESC_F_WRITE as u16)
        }
        QueueKind::Stats => (
            BUF + 10 * u64::from(v % 8),
            10 * u32::from(input.u8()? % 24),
            0,
        ),
        _ => (BUF + 4 * u64::from(v % 16), 4 * u32::from(input.u8()?), 0),
    })
}

/// Builds one chain at descriptor indices 0..n of queue `vq`, which carries
/// `kind`, and makes it available: well-formed descriptors, or raw ones.
fn add_chain(
    input: &mut Input,
    mem: &GuestMemoryMmap,
    vq: &DriverQueue,
    kind: QueueKind,
    op: u8,
) -> Option<()> {
    fill_buffer(input, mem, kind)?;
    let raw = op & 0x10 != 0;
    let n = match input.u8()? {
        x if x < 200 => u16::from(x % if raw { 34 } else { 4 }) + 1,
        x => u16::from(x - 200) + 10,
    };
    let raw_links = raw && input.u8()? & 1 == 1;
    for i in 0..n {
        let (a, l, mut flags) = if raw {
            (addr(input)?, len(input)?, u16::from(input.u8()?) & 0x7)
        } else {
            well_formed(input, kind)?
        };
        let mut next = i + 1;
        if raw_links {
            next = input.u16()?;
        } else if i + 1 < n {
            flags |= VRING_DESC_F_NEXT as u16;
        } else {
            flags &= !(VRING_DESC_F_NEXT as u16);
        }
        vq.store(i, a, l, flags, next).ok()?;
    }
    let head = if raw_links { input.u16()? % QSIZE } else { 0 };
    vq.publish(head);
    Some(())
}

fn inside(r: &Range<u64>, allowed: &[Range<u64>]) -> bool {
    allowed.iter().any(|a| a.start <= r.start && r.end <= a.end)
}

fn check(dev: &mut Dev) {
    let allowed = allowed();
    for d in dev.backend().discards.borrow_mut().drain(..) {
        assert!(
            inside(&d, &allowed),
            "discarded {d:#x?} outside the allowed ranges"
        );
    }
    // Every refused page was written, so a discarded one shows as a hole.
    for r in refused() {
        let resident = dev.backend().resident_bytes(r.clone()).unwrap();
        assert_eq!(resident, r.end - r.start, "a page of {r:#x?} was discarded");
    }
    let ranges = dev.inflated_ranges();
    assert!(
        ranges.iter().all(|r| inside(r, &allowed)),
        "balloon {ranges:#x?}"
    );
    assert_eq!(
        ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
        dev.inflated_bytes()
    );
}

/// Guest memory shared by every input: building it and writing every refused
/// page for each input would cost more than the input itself.
struct Env {
    mem: GuestMemoryMmap,
}

impl Env {
    fn new() -> Self {
        let mem = memfd_guest_memory(&[(0, LOW), (RAM, RAM_SIZE)]);
        for r in refused() {
            for page in (r.start..r.end).step_by(PAGE_SIZE as usize) {
                mem.write_obj(MARK, GuestAddress(page)).unwrap();
            }
        }
        Self { mem }
    }
}

thread_local! {
    static ENV: Env = Env::new();
}

fuzz_target!(|data: &[u8]| ENV.with(|env| run(data, &env.mem)));

fn run(data: &[u8], mem: &GuestMemoryMmap) {
    let mut input = Input(data);
    let ram = MemfdBackend::from_guest_memory(mem).unwrap();
    // Every input starts from zeroed rings, buffers and allowed RAM (refused
    // pages are never discarded, or the last input would have failed).
    for r in std::iter::once(0..MARKED_LOW.start).chain(allowed()) {
        ram.discard(r).unwrap();
    }
    let params = BalloonParams {
        stats_interval: Some(Duration::from_secs(1)),
        deflate_on_oom: true,
        free_page_reporting: true,
    };
    let backend = Rec {
        inner: ram,
        discards: RefCell::default(),
    };
    let mut dev = VirtioBalloon::new(params, backend, AllowedRanges::new(allowed())).unwrap();
    let all = dev.avail_features();
    let mut features = all;
    let mut vqs = activate(mem, &mut dev, features);

    while let Some(op) = input.u8() {
        let layout = virtio_balloon::queue_layout(features);
        match op >> 5 {
            // Host operations.
            6 => match op & 7 {
                0 => {
                    let Some(v) = input.u32() else { break };
                    let bytes = u64::from(v) * if op & 8 != 0 { 4096 } else { 1 };
                    let gen = dev.config_generation();
                    match dev.set_target_bytes(bytes) {
                        Ok(true) => assert_ne!(dev.config_generation(), gen),
                        Ok(false) | Err(_) => assert_eq!(dev.config_generation(), gen),
                    }
                }
                1 => {
                    let _ = dev.request_stats(mem);
                }
                2 => {
                    let (Some(off), Some(v)) = (input.u8(), input.u32()) else {
                        break;
                    };
                    let width = usize::from(op >> 3 & 3) + 1;
                    dev.write_config(u64::from(off % 12), &v.to_le_bytes()[..width]);
                }
                3 => {
                    let Some(off) = input.u64() else { break };
                    let mut b = [0u8; 8];
                    dev.read_config(off, &mut b);
                }
                _ => {
                    let Some(f) = input.u8() else { break };
                    features = all & u64::from(f);
                    vqs = activate(mem, &mut dev, features);
                }
            },
            // Corrupt an avail index, then reset the device like a VMM would.
            7 => {
                let Some(v) = input.u16() else { break };
                let q = usize::from(op) % layout.len();
                vqs[q].set_avail_idx(v);
                if dev.process_queue(q, mem).is_err() {
                    vqs = activate(mem, &mut dev, features);
                }
            }
            _ => {
                let q = usize::from(op) % layout.len();
                if add_chain(&mut input, mem, &vqs[q], layout[q], op).is_none() {
                    break;
                }
                match dev.process_queue(q, mem) {
                    Ok(out) => assert!(out.chains <= u32::from(QSIZE)),
                    Err(_) => vqs = activate(mem, &mut dev, features),
                }
            }
        }
        check(&mut dev);
    }
}
