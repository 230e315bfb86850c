//! Device tests: host API, configuration space and valid guest flows.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::{OFFSET_PLUGGED_SIZE, OFFSET_REQUESTED_SIZE};
use crate::test_utils::*;

#[test]
fn features_device_type_and_queue() {
    let b = memfd_backend();
    let dev = VirtioMem::new(DeviceParams::new(REGION, BLOCKS * BS), b).unwrap();
    assert_eq!(dev.device_type(), 24);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_MAX_SIZE]);
    assert_eq!(dev.avail_features(), (1u64 << 32) | (1 << 1));
    let mut params = DeviceParams::new(REGION, BLOCKS * BS);
    params.node_id = Some(1);
    let mut dev = VirtioMem::new(params, memfd_backend()).unwrap();
    assert_eq!(dev.avail_features(), (1u64 << 32) | 0b11);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), dev.avail_features());
    let mut bad = params;
    bad.block_size = 3 * MIB;
    assert!(matches!(
        VirtioMem::new(bad, memfd_backend()),
        Err(Error::Config(_))
    ));
}

#[test]
fn activation_and_reset() {
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut dev = VirtioMem::new(DeviceParams::new(REGION, BLOCKS * BS), memfd_backend()).unwrap();
    assert!(matches!(dev.process_queue(&mem), Err(Error::NotActivated)));
    let q = || create_queue(&vq);
    assert!(matches!(
        dev.activate(q(), &mem),
        Err(Error::Version1NotAcked)
    ));
    dev.set_acked_features(dev.avail_features());
    let mut not_ready = q();
    not_ready.set_ready(false);
    assert!(matches!(
        dev.activate(not_ready, &mem),
        Err(Error::InvalidQueue)
    ));
    dev.activate(q(), &mem).unwrap();
    assert!(dev.is_activated());
    assert!(matches!(
        dev.activate(q(), &mem),
        Err(Error::AlreadyActivated)
    ));
    // Nothing queued: no chains, no notification.
    assert_eq!(dev.process_queue(&mem).unwrap(), ProcessOutcome::default());
    dev.set_requested_size(4 * BS).unwrap();
    assert_eq!(
        dev.execute(&Request::Plug(range(0, 2))).kind,
        ResponseType::Ack
    );
    assert!(dev.reset().is_some());
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features(), 0);
    // The spec forbids changing block states on a device reset.
    assert_eq!(dev.plugged_size(), 2 * BS);
}

#[test]
fn config_space_and_generation() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    let c = h.dev.config();
    assert_eq!(c.block_size, BS);
    assert_eq!(c.node_id, 3);
    assert_eq!((c.addr, c.region_size), (REGION, BLOCKS * BS));
    assert_eq!(c.usable_region_size, BLOCKS * BS);
    assert_eq!((c.plugged_size, c.requested_size), (0, BLOCKS * BS));
    let gen = h.dev.config_generation();
    assert_eq!(h.plug(2, 3), ACK);
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    let mut b = [0u8; 8];
    h.dev.read_config(OFFSET_PLUGGED_SIZE as u64, &mut b);
    assert_eq!(u64::from_le_bytes(b), 3 * BS);
    h.dev.read_config(OFFSET_REQUESTED_SIZE as u64, &mut b);
    assert_eq!(u64::from_le_bytes(b), BLOCKS * BS);
    let mut all = [0u8; 56];
    h.dev.read_config(0, &mut all);
    assert_eq!(all, h.dev.config().to_bytes());
    h.dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 8]);
    // Writes are ignored; failed requests do not change the generation.
    h.dev.write_config(0, &[1; 8]);
    assert_eq!(h.dev.config().block_size, BS);
    assert_eq!(h.plug(2, 1), ERROR);
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    assert_eq!(h.dev.metrics().snapshot().config_writes_ignored, 1);
}

#[test]
fn requested_size_validation() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    let gen = h.dev.config_generation();
    assert!(matches!(
        h.dev.set_requested_size(BS + 4096),
        Err(Error::RequestedSizeNotAligned { .. })
    ));
    assert!(matches!(
        h.dev.set_requested_size((BLOCKS + 1) * BS),
        Err(Error::RequestedSizeTooLarge { .. })
    ));
    assert!(h.dev.set_requested_size(u64::MAX).is_err());
    assert_eq!(h.dev.config_generation(), gen);
    assert!(!h.dev.set_requested_size(BLOCKS * BS).unwrap());
    assert_eq!(h.dev.config_generation(), gen);
    assert!(h.dev.set_requested_size(4 * BS).unwrap());
    assert_eq!(h.dev.requested_size(), 4 * BS);
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    assert!(h.dev.set_requested_size(0).unwrap());
    assert_eq!(h.dev.config().requested_size, 0);
}

#[test]
fn plug_unplug_releases_memfd_pages() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    assert_eq!(h.dev.resident_bytes().unwrap(), 0);
    assert_eq!(h.plug(0, 4), ACK);
    assert_eq!(h.dev.plugged_size(), 4 * BS);
    touch(h.dev.backend(), 0, 4, 0xab);
    assert_eq!(h.dev.resident_bytes().unwrap(), 4 * BS);
    assert_eq!(h.unplug(1, 2), ACK);
    assert_eq!(h.dev.plugged_size(), 2 * BS);
    assert_eq!(h.dev.resident_bytes().unwrap(), 2 * BS);
    assert_eq!(h.dev.resident_bytes_unplugged().unwrap(), 0);
    assert!(block_bytes(h.dev.backend(), 1).iter().all(|&b| b == 0));
    assert!(block_bytes(h.dev.backend(), 2).iter().all(|&b| b == 0));
    // Blocks that stayed plugged keep their data.
    assert!(block_bytes(h.dev.backend(), 0).iter().all(|&b| b == 0xab));
    assert!(block_bytes(h.dev.backend(), 3).iter().all(|&b| b == 0xab));
    assert_eq!(
        h.dev.plugged_ranges(),
        vec![REGION..REGION + BS, REGION + 3 * BS..REGION + 4 * BS]
    );
    assert_eq!(h.dev.unplugged_ranges()[0], REGION + BS..REGION + 3 * BS);
    assert_eq!(h.dev.block_state(0), Some(true));
    assert_eq!(h.dev.block_state(1), Some(false));
    assert_eq!(h.dev.block_state(BLOCKS as usize), None);
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.plug_requests, m.unplug_requests, m.resp_ack), (1, 1, 2));
    assert_eq!(
        (m.bytes_plugged, m.bytes_unplugged, m.bytes_discarded),
        (4 * BS, 2 * BS, 2 * BS)
    );
}

#[test]
fn state_requests() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    assert_eq!(h.plug(4, 4), ACK);
    assert_eq!(h.state(4, 4), (ACK, BlockState::Plugged as u16));
    assert_eq!(h.state(5, 1), (ACK, BlockState::Plugged as u16));
    assert_eq!(h.state(0, 4), (ACK, BlockState::Unplugged as u16));
    assert_eq!(h.state(8, 8), (ACK, BlockState::Unplugged as u16));
    assert_eq!(h.state(3, 2), (ACK, BlockState::Mixed as u16));
    assert_eq!(h.state(0, BLOCKS as u16), (ACK, BlockState::Mixed as u16));
    assert_eq!(h.state(0, 0).0, ERROR);
    assert_eq!(h.state(15, 2).0, ERROR);
    assert_eq!(h.dev.metrics().snapshot().state_requests, 8);
}

#[test]
fn unplug_all_discards_only_plugged_blocks() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    assert_eq!(h.plug(0, 2), ACK);
    assert_eq!(h.plug(5, 3), ACK);
    touch(h.dev.backend(), 0, 2, 1);
    touch(h.dev.backend(), 5, 3, 2);
    // Data in a block the guest never plugged is not the device's to drop.
    touch(h.dev.backend(), 10, 1, 3);
    let gen = h.dev.config_generation();
    assert_eq!(h.send(Request::UnplugAll).0, ACK);
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.dev.config().usable_region_size, BLOCKS * BS);
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    assert_eq!(h.dev.resident_bytes().unwrap(), BS);
    assert!(block_bytes(h.dev.backend(), 10).iter().all(|&b| b == 3));
    assert_eq!(h.dev.metrics().snapshot().bytes_discarded, 5 * BS);
    // Nothing plugged: still ACK, nothing discarded.
    assert_eq!(h.send(Request::UnplugAll).0, ACK);
    assert_eq!(h.dev.resident_bytes().unwrap(), BS);
}

#[test]
fn plug_beyond_requested_size_is_nack() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    h.dev.set_requested_size(4 * BS).unwrap();
    assert_eq!(h.plug(0, 5), NACK);
    assert_eq!(h.plug(0, 3), ACK);
    assert_eq!(h.plug(3, 2), NACK);
    assert_eq!(h.plug(3, 1), ACK);
    assert_eq!(h.plug(4, 1), NACK);
    // Shrinking the request below what is plugged: plug NACK, unplug allowed.
    h.dev.set_requested_size(BS).unwrap();
    assert_eq!(h.plug(8, 1), NACK);
    assert_eq!(h.unplug(0, 2), ACK);
    assert_eq!(h.unplug(2, 1), ACK);
    assert_eq!(h.dev.plugged_size(), BS);
    // An invalid range is ERROR even when the plug would also exceed the request.
    assert_eq!(h.plug(0, 0), ERROR);
    assert_eq!(h.dev.metrics().snapshot().resp_nack, 4);
}

#[test]
fn double_plug_and_unplug_of_unplugged_are_errors() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    assert_eq!(h.plug(2, 2), ACK);
    touch(h.dev.backend(), 2, 2, 7);
    assert_eq!(h.plug(2, 2), ERROR);
    assert_eq!(h.plug(3, 2), ERROR); // partly plugged
    assert_eq!(h.plug(0, 3), ERROR);
    assert_eq!(h.unplug(4, 1), ERROR); // never plugged
    assert_eq!(h.unplug(1, 2), ERROR); // mixed
    assert_eq!(h.unplug(3, 2), ERROR); // mixed
    assert_eq!(h.dev.plugged_size(), 2 * BS);
    assert_eq!(h.dev.resident_bytes().unwrap(), 2 * BS);
    assert_eq!(h.unplug(2, 2), ACK);
    assert_eq!(h.unplug(2, 2), ERROR); // already unplugged
}

#[test]
fn several_chains_in_one_pass() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    for i in 0..4u64 {
        let req = REQ + i * 0x100;
        let resp = RESP + i * 0x100;
        mem.write_slice(
            &Request::Plug(range(i * 2, 2)).to_bytes(),
            GuestAddress(req),
        )
        .unwrap();
        let d = |addr, len, flags, next| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        };
        let n = i as u16 * 2;
        h.vq.add_desc_chains(
            &[
                d(req, 24, VRING_DESC_F_NEXT as u16, n + 1),
                d(resp, 10, VRING_DESC_F_WRITE as u16, 0),
            ],
            n,
        )
        .unwrap();
    }
    let out = h.dev.process_queue(&mem).unwrap();
    assert_eq!(
        out,
        ProcessOutcome {
            chains: 4,
            needs_notification: true
        }
    );
    assert_eq!(h.dev.plugged_size(), 8 * BS);
    assert_eq!(last_used(&mem, 32).0, 4);
}

#[test]
fn requests_wrap_around_the_rings() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, memfd_backend());
    for i in 0..100u64 {
        let blk = i % BLOCKS;
        assert_eq!(h.plug(blk, 1), ACK, "round {i}");
        assert_eq!(h.state(blk, 1), (ACK, BlockState::Plugged as u16));
        assert_eq!(h.unplug(blk, 1), ACK, "round {i}");
    }
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.resp_ack, m.invalid_requests, m.resp_error), (300, 0, 0));
    assert_eq!(last_used(&mem, 32).0, 300);
}
