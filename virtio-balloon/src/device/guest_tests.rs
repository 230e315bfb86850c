//! Device tests: what an untrusted guest may send.

// Lists of freed ranges often hold a single range.
#![allow(clippy::single_range_in_vec_init)]

use vm_memory::Bytes;

use super::*;
use crate::chain::{MAX_CHAIN_DESCRIPTORS, MAX_PFNS_PER_CHAIN, MAX_STATS_BYTES};
use crate::stats::S_MEMFREE;
use crate::test_utils::*;

/// Writes markers over the whole guest memory the tests watch.
fn mark_everything(h: &Harness) {
    h.touch(RAM, RAM_SIZE, 0xee);
    h.touch(0x18_0000, 0x8_0000, 0xee);
}

/// Checks the markers written by [`mark_everything`] survive outside `freed`.
fn only_freed(h: &Harness, freed: &[Range<u64>]) {
    let mut at = RAM;
    for r in freed.iter().chain([&(RAM + RAM_SIZE..RAM + RAM_SIZE)]) {
        assert!(
            h.holds(at, r.start - at, 0xee),
            "{at:#x}..{:#x} was discarded",
            r.start
        );
        at = r.end;
    }
    assert!(
        h.holds(0x18_0000, 0x8_0000, 0xee),
        "ring memory was discarded"
    );
    let expected: u64 = RAM_SIZE - freed.iter().map(|r| r.end - r.start).sum::<u64>();
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), expected);
}

#[test]
fn pages_outside_ram_or_refused_by_the_guard_are_never_discarded() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    mark_everything(&h);
    let unplugged = (ALLOWED / PAGE_SIZE) as u32 + RAM_PFN as u32;
    let low_ram = 0x180u32; // RAM, but the guard does not allow it
    let hole = (3u64 << 30) as u32 / 4096; // not RAM at all
    let beyond = pfn(RAM_SIZE / PAGE_SIZE); // just past RAM
    h.inflate(&[
        low_ram,
        hole,
        unplugged,
        unplugged + 5,
        beyond,
        u32::MAX,
        0,
        pfn(7),
    ]);
    // Only the one valid page is discarded.
    assert_eq!(h.discards(), vec![page(7)..page(8)]);
    only_freed(&h, &[page(7)..page(8)]);
    assert_eq!(h.dev.inflated_bytes(), PAGE_SIZE);
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.rejected_ranges, m.rejected_bytes), (7, 7 * PAGE_SIZE));
    assert_eq!(m.malformed_chains, 0);
    // A run straddling the end of the allowed part: only its allowed pages go.
    let edge = (ALLOWED / PAGE_SIZE) - 2;
    h.inflate(&(edge..edge + 4).map(pfn).collect::<Vec<_>>());
    assert_eq!(h.discards(), vec![page(edge)..page(edge + 2)]);
    only_freed(&h, &[page(7)..page(8), page(edge)..page(edge + 2)]);
    assert_eq!(h.dev.inflated_bytes(), 3 * PAGE_SIZE);
    // Deflating refused pages finds nothing to take out.
    h.deflate(&[unplugged, hole]);
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.deflate_unknown_bytes, 2 * PAGE_SIZE);
    assert_eq!(m.rejected_ranges, 8);
}

#[test]
fn malformed_pfn_chains_are_refused_whole() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    mark_everything(&h);
    let pfns: Vec<u8> = (0..8).flat_map(|i| pfn(i).to_le_bytes()).collect();
    mem.write_slice(&pfns, vm_memory::GuestAddress(buf(0)))
        .unwrap();
    let b = buf(0);
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        // A device-writable descriptor.
        vec![(b, 32, true)],
        vec![(b, 16, false), (b + 16, 16, true)],
        // Not a whole number of PFNs.
        vec![(b, 31, false)],
        vec![(b, 2, false), (b + 2, 1, false)],
        // Unreadable.
        vec![(RAM + RAM_SIZE - 8, 16, false)],
        vec![(u64::MAX - 3, 8, false)],
        // More PFNs than accepted, at once or in pieces; an absurd length.
        vec![(b, (MAX_PFNS_PER_CHAIN * 4 + 4) as u32, false)],
        vec![(b, u32::MAX, false)],
        vec![(b, 0x8000, false), (b, 0x8000, false)],
        // Too many descriptors.
        vec![(b, 4, false); MAX_CHAIN_DESCRIPTORS + 1],
    ];
    for (i, descs) in bad.iter().enumerate() {
        for q in [0, 1] {
            h.add_chain(q, descs);
            h.served(q);
            assert_eq!(
                h.dev.metrics().snapshot().malformed_chains,
                (2 * i + q + 1) as u64
            );
        }
    }
    assert!(h.discards().is_empty());
    only_freed(&h, &[]);
    // The limits themselves are accepted: 64 descriptors, 4096 PFNs.
    h.add_chain(0, &vec![(b, 4, false); MAX_CHAIN_DESCRIPTORS]);
    h.served(0);
    assert_eq!(h.discards(), vec![page(0)..page(1)]);
    let many: Vec<u32> = (0..MAX_PFNS_PER_CHAIN as u64).map(|i| pfn(i % 8)).collect();
    h.inflate(&many);
    assert_eq!(h.discards(), vec![page(0)..page(8)]);
    assert_eq!(h.dev.inflated_bytes(), 8 * PAGE_SIZE);
    // An empty chain is nothing to do.
    h.add_chain(0, &[(b, 0, false)]);
    h.served(0);
    assert_eq!(
        h.dev.metrics().snapshot().malformed_chains,
        2 * bad.len() as u64
    );
}

#[test]
fn bad_report_chains_and_ranges() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    mark_everything(&h);
    let two = 2 * MIB as u32;
    // Malformed chains: nothing in them is discarded, not even the valid range.
    h.add_chain(3, &[(RAM, two, true), (RAM + 2 * MIB, two, false)]);
    h.served(3);
    h.add_chain(3, &vec![(RAM, 4096, true); MAX_CHAIN_DESCRIPTORS + 1]);
    h.served(3);
    assert_eq!(h.dev.metrics().snapshot().malformed_chains, 2);
    assert!(h.discards().is_empty());
    // Bad ranges are skipped one by one; the good one is still discarded.
    h.report(&[
        (RAM + 4 * MIB + 1, two),         // unaligned address
        (RAM + 4 * MIB, two - 1),         // unaligned length
        (RAM + 4 * MIB, 0),               // empty
        (u64::MAX - 4095, 8192),          // overflows
        (!4095, 4096),                    // far beyond RAM
        (0x18_0000, 0x8_0000),            // RAM the guard refuses
        (RAM + 10 * MIB, 4 * MIB as u32), // half allowed, half unplugged
        (RAM + 14 * MIB, two),            // unplugged
        (RAM + RAM_SIZE, two),            // past RAM
        (RAM + 2 * MIB, two),             // fine
    ]);
    assert_eq!(
        h.discards(),
        vec![RAM + 2 * MIB..RAM + 4 * MIB, RAM + 10 * MIB..RAM + 12 * MIB]
    );
    only_freed(
        &h,
        &[RAM + 2 * MIB..RAM + 4 * MIB, RAM + 10 * MIB..RAM + 12 * MIB],
    );
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.rejected_ranges, 9);
    assert_eq!(m.reported_bytes, 4 * MIB);
    assert_eq!(m.malformed_chains, 2);
}

#[test]
fn malformed_stats_keep_the_buffer_and_the_last_good_stats() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.give_stats(&[(S_MEMFREE, 77)]);
    let good = h.dev.last_stats().unwrap();
    let b = buf(2);
    // A second buffer while the device holds one (the driver must not): the
    // old one goes back at once, the new one is kept.
    for descs in [
        vec![(b, 10, true)],                             // writable
        vec![(b, 15, false)],                            // partial entry
        vec![(b, (MAX_STATS_BYTES + 10) as u32, false)], // too large
        vec![(b, 10, false); MAX_CHAIN_DESCRIPTORS + 1], // too many descriptors
        vec![(u64::MAX - 5, 10, false)],                 // unreadable
    ] {
        let used = h.last_used(2).0;
        h.add_chain(2, &descs);
        let out = h.run(2);
        assert_eq!(out.chains, 1);
        assert!(out.needs_notification);
        assert_eq!(h.last_used(2).0, used.wrapping_add(1));
    }
    assert_eq!(h.dev.last_stats(), Some(good));
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.malformed_chains, m.stats_updates), (5, 1));
    // The last (malformed) buffer is still held and goes back on request.
    assert_eq!(h.dev.request_stats(&mem).unwrap().chains, 1);
    assert_eq!(h.dev.request_stats(&mem).unwrap().chains, 0);
}

#[test]
fn a_corrupt_avail_ring_never_panics() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    mark_everything(&h);
    // Heads past the descriptor table, then an avail index far ahead.
    for q in 0..4 {
        h.vqs[q].publish(0xffff);
        let out = h.dev.process_queue(q, &mem);
        assert!(
            out.is_ok() || matches!(out, Err(Error::Queue(_))),
            "{out:?}"
        );
        h.vqs[q].set_avail_idx(0x8000);
        let _ = h.dev.process_queue(q, &mem);
    }
    only_freed(&h, &[]);
}
