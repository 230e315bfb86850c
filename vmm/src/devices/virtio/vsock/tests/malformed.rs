//! A hostile or broken guest: bad chains and bad headers are dropped or answered with
//! RST, never a panic, and the device keeps working.

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// Writes `hdr` where the next tx chain's buffers go; returns that address.
fn stage(rig: &mut Rig, hdr: &Hdr) -> u64 {
    let addr = rig.tx_slot_addr();
    rig.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(addr))
        .unwrap();
    addr
}

#[test]
fn malformed_tx_packets_are_dropped_or_reset() {
    let mut rig = Rig::new(None);
    let (mut stream, port) = accepted(&mut rig, 7, 4096);
    let hdr_len = PKT_HEADER_SIZE as u32;
    // Dropped: nothing to answer, or nobody to answer to.
    let a = stage(&mut rig, &from_guest(OP_REQUEST, 7500, 7600));
    rig.send_raw(&[(a, 20, false)]); // header descriptor too short
    let a = stage(&mut rig, &from_guest(OP_REQUEST, 7501, 7601));
    rig.send_raw(&[(a, hdr_len, true)]); // device-writable tx buffer
    rig.send_raw(&[(1 << 40, hdr_len, false)]); // outside guest memory
    let mut spoofed = from_guest(OP_REQUEST, 7507, 7607);
    spoofed.src_cid = 7;
    rig.send(&spoofed, &[]);
    // Answered with RST.
    let mut long = from_guest(OP_RW, 7502, 7602);
    long.len = 1000;
    let a = stage(&mut rig, &long);
    rig.send_raw(&[(a, hdr_len, false), (a + 64, 10, false)]); // len past the buffer
    let mut huge = from_guest(OP_RW, 7503, 7603);
    huge.len = 1 << 20;
    let a = stage(&mut rig, &huge);
    rig.send_raw(&[(a, hdr_len, false), (a + 64, 1 << 20, false)]); // len above the maximum
    let mut missing = from_guest(OP_RW, 7504, 7604);
    missing.len = 100;
    let a = stage(&mut rig, &missing);
    rig.send_raw(&[(a, hdr_len, false)]); // no data descriptor
    rig.send(&from_guest(99, 7505, 7605), &[]); // unknown op
    let mut seqpacket = from_guest(OP_REQUEST, 7506, 7606);
    seqpacket.type_ = 2;
    rig.send(&seqpacket, &[]);
    let mut elsewhere = from_guest(OP_REQUEST, 7508, 7608);
    elsewhere.dst_cid = 5;
    rig.send(&elsewhere, &[]);
    let mut data_to_the_wrong_place = from_guest(OP_RW, 7509, 7609);
    data_to_the_wrong_place.len = 3;
    rig.send(&data_to_the_wrong_place, b"abc"); // data for no connection
    rig.send(&from_guest(0, 7, port), &[]); // invalid op on a live connection
    rig.settle(100);

    let mut rsts: Vec<(u32, u32)> = rig
        .inbox
        .iter()
        .map(|(h, _)| {
            assert_eq!(h.op, OP_RST, "{h:?}");
            (h.dst_port, h.src_port)
        })
        .collect();
    rsts.sort_unstable();
    let mut expected = vec![
        (7502, 7602),
        (7503, 7603),
        (7504, 7604),
        (7505, 7605),
        (7506, 7606),
        (7508, 7608),
        (7509, 7609),
        (7, port),
    ];
    expected.sort_unstable();
    assert_eq!(rsts, expected);
    let seq = rig.inbox.iter().find(|(h, _)| h.dst_port == 7506).unwrap();
    assert_eq!(seq.0.type_, 2, "the RST mirrors the type");
    let other = rig.inbox.iter().find(|(h, _)| h.dst_port == 7508).unwrap();
    assert_eq!(other.0.src_cid, 5, "the RST mirrors the addresses");
    assert!(
        rig.host_sees_eof(&mut stream),
        "the live connection was reset"
    );
    rig.inbox.clear();

    // Still working.
    let (mut again, port) = accepted(&mut rig, 8, 4096);
    let mut rw = from_guest(OP_RW, 8, port);
    rw.len = 2;
    rig.send(&rw, b"ok");
    assert_eq!(rig.host_read(&mut again, 2), b"ok");
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mut rig = Rig::new(None);
    rig.rx_posted = 0;
    // Owe the guest more RSTs than it posted buffers for.
    for port in 0..20 {
        rig.send(&from_guest(OP_REQUEST, 100 + port, 200 + port), &[]);
    }
    rig.settle(50);
    assert_eq!(rig.inbox.len(), 16);
    let slot_addr = 0x10_0000 + 20 * 0x11000;
    let hdr_len = PKT_HEADER_SIZE as u32;
    rig.post_raw_rx(&[(slot_addr, hdr_len, false), (slot_addr + 64, 4096, true)]); // read-only
    rig.post_raw_rx(&[(slot_addr, 10, true)]); // too short for a header
    rig.post_raw_rx(&[(1 << 40, hdr_len, true), (slot_addr, 64, true)]); // outside memory
    rig.post_raw_rx(&[(slot_addr, hdr_len, true), (slot_addr + 64, 1 << 20, true)]); // too big
    rig.settle(50);
    assert_eq!(rig.empty_used, 4);
    assert_eq!(rig.inbox.len(), 16);
    rig.rx_posted = 16;
    rig.settle(50);
    assert_eq!(rig.inbox.len(), 20, "the rest came with good buffers");
    assert!(rig.inbox.iter().all(|(h, _)| h.op == OP_RST));
}

#[test]
fn buffers_in_a_released_region_are_refused_untouched() {
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
    let mut rig = Rig::new(None);
    // The spare region leaves the device's view and becomes inaccessible, as the slot
    // table does with a region the guest unplugged: touching it would kill the test.
    let spare = rig.mem.find_region(GuestAddress(SPARE_REGION)).unwrap();
    let (without, _) = rig
        .view
        .memory()
        .remove_region(spare.start_addr(), spare.len())
        .unwrap();
    rig.view.lock().unwrap().replace(without);
    // SAFETY: the region is a mapping of `rig.mem`, which is leaked (never unmapped);
    // from now on nothing may touch it, which is what this test checks.
    let rc =
        unsafe { libc::mprotect(spare.as_ptr().cast(), spare.len() as usize, libc::PROT_NONE) };
    assert_eq!(rc, 0);
    let hdr_len = PKT_HEADER_SIZE as u32;

    // An rx buffer there is returned empty: 17 RSTs owed, 16 good buffers posted.
    rig.rx_posted = 0;
    for port in 0..17 {
        rig.send(&from_guest(OP_REQUEST, 100 + port, 200 + port), &[]);
    }
    rig.settle(50);
    assert_eq!(rig.inbox.len(), 16);
    rig.post_raw_rx(&[
        (SPARE_REGION + 0x1000, hdr_len, true),
        (SPARE_REGION, 64, true),
    ]);
    rig.settle(50);
    assert_eq!((rig.empty_used, rig.inbox.len()), (1, 16));
    rig.rx_posted = 16;
    rig.settle(50);
    assert_eq!(rig.inbox.len(), 17, "the last RST came in a good buffer");
    rig.inbox.clear();

    // Data there: the packet is malformed and its connection reset.
    let (mut stream, port) = accepted(&mut rig, 9, 4096);
    let mut rw = from_guest(OP_RW, 9, port);
    rw.len = 16;
    let a = stage(&mut rig, &rw);
    rig.send_raw(&[(a, hdr_len, false), (SPARE_REGION + 0x100, 16, false)]);
    let (rst, _) = rig.expect("the RST of the malformed packet", |h| h.dst_port == 9);
    assert_eq!(rst.op, OP_RST);
    assert!(rig.host_sees_eof(&mut stream), "the connection was reset");
    // A header there: dropped, nothing answered.
    rig.send_raw(&[(SPARE_REGION, hdr_len, false)]);
    rig.settle(50);
    assert!(rig.inbox.is_empty(), "{:?}", rig.inbox);

    // The device works on with the rest of memory.
    let (mut again, port) = accepted(&mut rig, 10, 4096);
    let mut ok = from_guest(OP_RW, 10, port);
    ok.len = 2;
    rig.send(&ok, b"ok");
    assert_eq!(rig.host_read(&mut again, 2), b"ok");
}
