//! Device tests: what an untrusted guest may send.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_utils::*;

#[test]
fn invalid_ranges_are_errors_and_change_nothing() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    assert_eq!(h.plug(0, 2), ACK);
    touch(h.dev.backend(), 0, 2, 9);
    let bad = [
        BlockRange {
            addr: REGION + 4096,
            nb_blocks: 1,
        }, // unaligned
        BlockRange {
            addr: REGION + BS / 2,
            nb_blocks: 1,
        }, // unaligned
        BlockRange {
            addr: REGION - BS,
            nb_blocks: 2,
        }, // starts below
        BlockRange {
            addr: 0,
            nb_blocks: 1,
        }, // far below
        BlockRange {
            addr: REGION + BLOCKS * BS,
            nb_blocks: 1,
        }, // just past
        range(BLOCKS - 1, 2), // straddles the end
        range(0, 0),          // no block
        BlockRange {
            addr: u64::MAX - BS + 1,
            nb_blocks: u16::MAX,
        }, // overflow
        BlockRange {
            addr: (u64::MAX / BS) * BS,
            nb_blocks: 0xffff,
        },
    ];
    for r in bad {
        for req in [Request::Plug(r), Request::Unplug(r), Request::State(r)] {
            assert_eq!(h.send(req).0, ERROR, "{req:?}");
        }
    }
    assert_eq!(h.dev.plugged_size(), 2 * BS);
    assert_eq!(h.dev.resident_bytes().unwrap(), 2 * BS);
    assert_eq!(h.dev.metrics().snapshot().resp_error, 27);
    // ...because of the ranges, not of a malformed chain.
    assert_eq!(h.dev.metrics().snapshot().invalid_requests, 0);
}

#[test]
fn unknown_type_and_short_header() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    let mut raw = Request::Plug(range(0, 1)).to_bytes();
    raw[0] = 4;
    assert_eq!(h.send_raw(&raw).0, ERROR);
    raw[0..2].copy_from_slice(&0xffffu16.to_le_bytes());
    assert_eq!(h.send_raw(&raw).0, ERROR);
    // A valid plug whose header descriptor is one byte short.
    mem.write_slice(&Request::Plug(range(0, 1)).to_bytes(), GuestAddress(REQ))
        .unwrap();
    h.add_chain(&[(REQ, 23, false), (RESP, 10, true)]);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response().0, ERROR);
    // Header in an unmapped address.
    h.add_chain(&[(0x4000_0000, 24, false), (RESP, 10, true)]);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response().0, ERROR);
    // No readable descriptor at all.
    h.add_chain(&[(RESP, 10, true)]);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response().0, ERROR);
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.dev.metrics().snapshot().invalid_requests, 5);
}

#[test]
fn requests_split_across_descriptors() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    let req = Request::Plug(range(1, 2)).to_bytes();
    mem.write_slice(&req[..5], GuestAddress(REQ)).unwrap();
    mem.write_slice(&req[5..], GuestAddress(REQ + 0x100))
        .unwrap();
    mem.write_slice(&[0xff; 10], GuestAddress(RESP)).unwrap();
    h.add_chain(&[
        (REQ, 5, false),
        (REQ + 0x100, 19, false),
        (RESP, 3, true),
        (RESP + 3, 100, true),
    ]);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response(), (ACK, 0));
    assert_eq!(h.dev.plugged_size(), 2 * BS);
}

#[test]
fn chains_without_a_usable_response_are_not_executed() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    mem.write_slice(&Request::Plug(range(0, 1)).to_bytes(), GuestAddress(REQ))
        .unwrap();
    let cases: [&[(u64, u32, bool)]; 5] = [
        &[(REQ, 24, false)],                                   // missing
        &[(REQ, 24, false), (RESP, 10, false)],                // read-only
        &[(REQ, 24, false), (RESP, 9, true)],                  // too small
        &[(REQ, 24, false), (RESP, 5, true), (RESP, 4, true)], // still too small
        &[(REQ, 24, false), (0x4000_0000, 10, true)],          // not in memory
    ];
    for chain in cases {
        mem.write_slice(&[0xff; 10], GuestAddress(RESP)).unwrap();
        h.add_chain(chain);
        assert_eq!(h.run(), 0, "{chain:?}");
        assert_eq!(h.response().0, 0xffff, "{chain:?}");
    }
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.dev.metrics().snapshot().unanswered_chains, 5);
    assert_eq!(h.dev.metrics().snapshot().resp_ack, 0);
}

#[test]
fn malformed_layouts_get_an_error_response() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    mem.write_slice(&Request::Plug(range(0, 1)).to_bytes(), GuestAddress(REQ))
        .unwrap();
    // A device-readable descriptor after the response.
    h.add_chain(&[(REQ, 24, false), (RESP, 10, true), (REQ, 24, false)]);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response().0, ERROR);
    // Too many descriptors: 1 header + 16 more.
    let mut long = vec![(REQ, 24, false)];
    long.extend(std::iter::repeat_n((RESP, 10, true), 16));
    h.add_chain(&long);
    assert_eq!(h.run(), 10);
    assert_eq!(h.response().0, ERROR);
    assert_eq!(h.dev.plugged_size(), 0);
}

#[test]
fn discard_failure_is_busy_and_keeps_blocks_plugged() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, flaky());
    assert_eq!(h.plug(0, 2), ACK);
    assert_eq!(h.plug(4, 2), ACK);
    touch(&h.dev.backend().inner, 0, 6, 5);
    h.dev.backend().fail_discard_at.set(Some(0));
    assert_eq!(h.unplug(0, 2), BUSY);
    assert_eq!(h.dev.plugged_size(), 4 * BS);
    assert_eq!(h.dev.block_state(0), Some(true));
    // UNPLUG_ALL: the run that can be discarded is, the other stays plugged.
    assert_eq!(h.send(Request::UnplugAll).0, BUSY);
    assert_eq!(h.dev.plugged_ranges(), vec![REGION..REGION + 2 * BS]);
    assert!(block_bytes(&h.dev.backend().inner, 4)
        .iter()
        .all(|&b| b == 0));
    assert!(block_bytes(&h.dev.backend().inner, 0)
        .iter()
        .all(|&b| b == 5));
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.discard_failures, m.resp_busy), (2, 2));
    h.dev.backend().fail_discard_at.set(None);
    assert_eq!(h.send(Request::UnplugAll).0, ACK);
    assert_eq!(h.dev.plugged_size(), 0);
    // Populate failure: BUSY, stays unplugged, and what the populate took is given back.
    h.dev.backend().fail_populate.set(true);
    assert_eq!(h.plug(0, 2), BUSY);
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.dev.metrics().snapshot().populate_failures, 1);
    assert_eq!(h.dev.backend().resident_bytes(0, 2 * BS).unwrap(), 0);
}

#[test]
fn broken_avail_index_is_an_error_not_a_panic() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    h.vq.avail().idx().store(1000);
    assert!(matches!(h.dev.process_queue(&mem), Err(Error::Queue(_))));
    assert_eq!(h.dev.plugged_size(), 0);
}

#[test]
fn huge_block_size_ranges_do_not_overflow() {
    // A legal but extreme geometry: 2^62-byte blocks, one block of region.
    let bs = 1u64 << 62;
    let params = DeviceParams {
        addr: 0,
        region_size: bs,
        block_size: bs,
        node_id: None,
    };
    let mut dev = VirtioMem::new(params, flaky()).unwrap();
    dev.set_requested_size(bs).unwrap();
    for r in [
        BlockRange {
            addr: 0,
            nb_blocks: u16::MAX,
        },
        BlockRange {
            addr: bs,
            nb_blocks: 2,
        },
        BlockRange {
            addr: 3 * bs,
            nb_blocks: 1,
        },
    ] {
        for req in [Request::Plug(r), Request::Unplug(r), Request::State(r)] {
            assert_eq!(dev.execute(&req).kind, ResponseType::Error, "{req:?}");
        }
    }
}
