//! Fuzzes the guest-request path: arbitrary descriptor chains (count, head,
//! addresses, lengths, flags, next links, request bytes) in a MockSplitQueue,
//! interleaved with host resizes, against a real memfd backend.
//!
//! Invariants checked after every queue pass:
//! - no panic;
//! - plugged blocks × block_size == plugged_size == config plugged_size;
//! - the plugged ranges add up to plugged_size;
//! - a pass that plugged memory leaves plugged_size <= requested_size;
//! - unplugged blocks hold no host memory (the fuzzer only writes to plugged
//!   blocks, so this means every unplug really discarded);
//! - plugged blocks keep the marker the fuzzer wrote (nothing plugged is ever
//!   discarded).

#![no_main]

use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_mem::memfd::{self, Pages};
use virtio_mem::{BlockRange, DeviceParams, MemfdBackend, Request, VirtioMem};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BS: u64 = 2 << 20;
const BLOCKS: u64 = 32;
const REGION: u64 = 1 << 32;
const MEM_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 32;
const REQ: u64 = 0x8000;
const RESP: u64 = 0x9000;
const USED_RING: u64 = 0x4000;
const MARK: [u8; 8] = *b"PLUGGED!";

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

fn activate<'a>(
    mem: &'a GuestMemoryMmap,
    dev: &mut VirtioMem<MemfdBackend>,
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::new(mem, QSIZE);
    dev.reset();
    dev.set_acked_features(dev.avail_features());
    // MockSplitQueue puts its used ring over the second half of its avail
    // ring; give the device a used ring of its own.
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    dev.activate(q, mem).unwrap();
    vq
}

/// A descriptor address: mostly near the request/response buffers, sometimes
/// at the end of guest memory, sometimes anything.
fn addr(input: &mut Input) -> Option<u64> {
    let sel = input.u8()?;
    let off = u64::from(input.u8()?);
    Some(match sel % 4 {
        0 => REQ + off,
        1 => RESP + off,
        2 => MEM_SIZE.wrapping_sub(off),
        _ => input.u64()?,
    })
}

/// Request bytes: either well-formed with fuzzed fields, or raw.
fn request(input: &mut Input) -> Option<[u8; 24]> {
    let sel = input.u8()?;
    if sel & 0x80 != 0 {
        return input.bytes::<24>();
    }
    let block = u64::from(input.u8()?) % (BLOCKS + 4);
    let nb = u16::from(input.u8()?) % 40;
    let mut addr = REGION.wrapping_add(block * BS);
    if sel & 0x40 != 0 {
        addr = addr.wrapping_sub(u64::from(input.u16()?));
    }
    let range = BlockRange {
        addr,
        nb_blocks: nb,
    };
    let req = match sel % 4 {
        0 => Request::Plug(range),
        1 => Request::Unplug(range),
        2 => Request::UnplugAll,
        _ => Request::State(range),
    };
    Some(req.to_bytes())
}

/// Builds one chain at descriptor indices 0..n and makes it available.
fn add_chain(
    input: &mut Input,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    op: u8,
) -> Option<()> {
    let n = u16::from(op % 20) + 1;
    mem.write_slice(&request(input)?, GuestAddress(REQ)).ok()?;
    let raw_links = input.u8()? & 1 == 1;
    for i in 0..n {
        let a = addr(input)?;
        let len = match input.u8()? % 4 {
            0 => 24,
            1 => 10,
            2 => u32::from(input.u8()?),
            _ => input.u32()?,
        };
        let mut flags = u16::from(input.u8()?) & 0x7;
        let mut next = i + 1;
        if raw_links {
            next = input.u16()?;
        } else if i + 1 < n {
            flags |= VRING_DESC_F_NEXT as u16;
        } else {
            flags &= !(VRING_DESC_F_NEXT as u16);
        }
        let desc = RawDescriptor::from(Descriptor::new(a, len, flags, next));
        vq.desc_table().store(i, desc).ok()?;
    }
    let head = if raw_links { input.u16()? % QSIZE } else { 0 };
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .ok()?
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
    Some(())
}

fn check(dev: &VirtioMem<MemfdBackend>, plugged_before: u64) {
    let plugged = dev.plugged_size();
    assert_eq!(dev.plugged_blocks() as u64 * BS, plugged);
    assert_eq!(dev.config().plugged_size, plugged);
    let ranges: u64 = dev.plugged_ranges().iter().map(|r| r.end - r.start).sum();
    assert_eq!(ranges, plugged);
    if plugged > plugged_before {
        assert!(plugged <= dev.requested_size());
    }
    assert_eq!(dev.resident_bytes_unplugged().unwrap(), 0);
    let file = dev.backend().file();
    for b in 0..BLOCKS as usize {
        if dev.block_state(b) == Some(true) {
            let mut m = [0u8; 8];
            file.read_at(&mut m, b as u64 * BS).unwrap();
            // Blocks plugged in this pass are not marked yet: zero or marker.
            assert!(m == MARK || m == [0; 8], "plugged block {b} lost its data");
            // Mark it, as a guest using the block would.
            file.write_at(&MARK, b as u64 * BS).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let backend = MemfdBackend::new(memfd::create("virtio-mem-fuzz", BLOCKS * BS, Pages::Small).unwrap(), 0, BLOCKS * BS).unwrap();
    let mut dev = VirtioMem::new(DeviceParams::new(REGION, BLOCKS * BS), backend).unwrap();
    dev.set_requested_size(BLOCKS / 2 * BS).unwrap();
    let mut vq = activate(&mem, &mut dev);

    while let Some(op) = input.u8() {
        let before = dev.plugged_size();
        match op >> 5 {
            // Host resize, sometimes invalid.
            6 => {
                let Some(v) = input.u16() else { break };
                let bytes = u64::from(v % 40) * BS + if v & 0x8000 != 0 { 4096 } else { 0 };
                let gen = dev.config_generation();
                match dev.set_requested_size(bytes) {
                    Ok(true) => assert_ne!(dev.config_generation(), gen),
                    Ok(false) | Err(_) => assert_eq!(dev.config_generation(), gen),
                }
            }
            // Corrupt the avail index, then reset the device like a VMM would.
            7 if op & 0x1f == 0x1f => {
                let Some(v) = input.u16() else { break };
                vq.avail().idx().store(v);
                if dev.process_queue(&mem).is_err() {
                    vq = activate(&mem, &mut dev);
                }
            }
            _ => {
                if add_chain(&mut input, &mem, &vq, op).is_none() {
                    break;
                }
                match dev.process_queue(&mem) {
                    Ok(out) => assert!(out.chains <= u32::from(QSIZE)),
                    Err(_) => vq = activate(&mem, &mut dev),
                }
            }
        }
        check(&dev, before);
    }
    if *STATS.get_or_init(|| std::env::var_os("VIRTIO_MEM_FUZZ_STATS").is_some()) {
        eprintln!("stats {:?}", dev.metrics().snapshot());
    }
});

/// Set `VIRTIO_MEM_FUZZ_STATS` to print each input's device counters (to see
/// which paths a corpus reaches).
static STATS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
