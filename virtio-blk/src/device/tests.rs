//! Device tests: every request type through a MockSplitQueue against a real
//! file, and every way a guest can get a request wrong.

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::{OFFSET_BLK_SIZE, OFFSET_CAPACITY, OFFSET_SEG_MAX, OFFSET_SIZE_MAX};
use crate::test_utils::*;

const SIZE: u64 = 1 << 20;
const CAPACITY: u64 = SIZE / 512;

fn flaky_harness<'a>(mem: &'a vm_memory::GuestMemoryMmap, img: &TempImage) -> Harness<'a, Flaky> {
    Harness::with_disk(mem, Flaky::new(RawFile::open(img.path(), false).unwrap()))
}

#[test]
fn features_config_space_and_open() {
    let img = TempImage::new(SIZE + 100);
    let mut cfg = DiskConfig::new(img.path());
    let dev = VirtioBlk::open(&cfg).unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_MAX_SIZE]);
    let want = (1u64 << 32) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 6) | (1 << 2) | (1 << 1);
    assert_eq!(dev.avail_features(), want);
    assert!(!dev.read_only());
    assert_eq!(dev.id(), &DiskId::from_path(img.path()));
    // The trailing 100 bytes are not a whole sector.
    assert_eq!(dev.capacity(), CAPACITY);
    let mut b8 = [0u8; 8];
    dev.read_config(OFFSET_CAPACITY as u64, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), CAPACITY);
    let mut b4 = [0u8; 4];
    dev.read_config(OFFSET_SEG_MAX as u64, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), SEG_MAX);
    dev.read_config(OFFSET_SIZE_MAX as u64, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), SIZE_MAX);
    dev.read_config(OFFSET_BLK_SIZE as u64, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512);
    drop(dev);

    cfg.readonly = true;
    cfg.id = Some("ro-disk".into());
    cfg.block_size = 4096;
    let mut dev = VirtioBlk::open(&cfg).unwrap();
    assert!(dev.read_only());
    assert_eq!(dev.avail_features(), want | (1 << 5));
    assert_eq!(dev.id().as_str(), "ro-disk");
    assert_eq!(dev.config().blk_size, 4096);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), dev.avail_features());
    // Writes to the configuration space change nothing.
    dev.write_config(0, &[0xff; 8]);
    assert_eq!(dev.capacity(), CAPACITY);
    assert_eq!(dev.config_generation(), 0);
    assert_eq!(dev.metrics().snapshot().config_writes_ignored, 1);
    drop(dev);

    cfg.block_size = 1000;
    assert!(matches!(VirtioBlk::open(&cfg), Err(Error::Config(_))));
    cfg.block_size = 512;
    cfg.id = Some("far too long for a virtio-blk id".into());
    assert!(matches!(VirtioBlk::open(&cfg), Err(Error::Config(_))));
    let missing = DiskConfig::new("/nonexistent/virtio-blk/disk.img");
    let err = VirtioBlk::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Backend(BackendError::Open { .. })));
    assert!(err.to_string().contains("/nonexistent/virtio-blk/disk.img"));
}

#[test]
fn activation_and_reset() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let mut dev = VirtioBlk::open(&DiskConfig::new(img.path())).unwrap();
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
    assert_eq!(dev.process_queue(&mem).unwrap(), ProcessOutcome::default());
    let queue = dev.reset().unwrap();
    assert!(queue.event_idx_enabled(), "EVENT_IDX was acknowledged");
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features(), 0);
    assert!(dev.reset().is_none());
}

#[test]
fn reads_return_the_file_and_count() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let (status, data) = h.read(3, 4096);
    assert_eq!(status, OK);
    assert_eq!(data, img.read(3 * 512, 4096));
    assert_eq!(last_used(&mem).2, 4097, "data and status");
    // The last sector of the disk.
    let (status, data) = h.read(CAPACITY - 1, 512);
    assert_eq!(status, OK);
    assert_eq!(data, img.read(SIZE - 512, 512));
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.read_ops, s.read_bytes), (2, 4608));
    assert_eq!(s.errors(), 0);
}

#[test]
fn writes_reach_the_file_and_count() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(h.write(10, &data), OK);
    assert_eq!(last_used(&mem).2, 1, "only the status is written");
    assert_eq!(img.read(10 * 512, 8192), data);
    // Neighbours are untouched.
    assert_eq!(img.read(9 * 512, 512), initial(9 * 512, 512));
    assert_eq!(img.read(26 * 512, 1)[0], pattern(26 * 512));
    assert_eq!(h.read(10, 8192), (OK, data));
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.write_ops, s.write_bytes), (1, 8192));
    assert_eq!(img.len(), SIZE, "the file never grows");
}

#[test]
fn flush_and_write_through_without_flush() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = flaky_harness(&mem, &img);
    assert_eq!(h.write(0, &[1; 512]), OK);
    assert_eq!(
        h.dev.disk().flushes.get(),
        0,
        "FLUSH negotiated: write-back"
    );
    assert_eq!(h.request(RequestType::Flush, 0, &[]), (OK, 1));
    assert_eq!(h.dev.disk().flushes.get(), 1);
    // FLUSH SHOULD carry no data nor sector; the device ignores both.
    assert_eq!(
        h.request(RequestType::Flush, 99, &[(DATA, 512, true)]),
        (OK, 1)
    );
    assert_eq!(h.dev.metrics().snapshot().flush_ops, 2);
    h.dev.disk().fail_flush.set(true);
    assert_eq!(h.request(RequestType::Flush, 0, &[]).0, IOERR);
    assert_eq!(h.dev.metrics().snapshot().io_errors, 1);
    h.dev.disk().fail_flush.set(false);

    // A driver without FLUSH expects write-through: each write is flushed.
    let flushes = h.dev.disk().flushes.get();
    h.dev.reset();
    h.dev
        .set_acked_features(h.dev.avail_features() & !(1 << VIRTIO_BLK_F_FLUSH));
    h.vq = MockSplitQueue::new(&mem, QSIZE);
    h.dev.activate(create_queue(&h.vq), &mem).unwrap();
    assert_eq!(h.write(0, &[2; 1024]), OK);
    assert_eq!(h.dev.disk().flushes.get(), flushes + 1);
    h.dev.disk().fail_flush.set(true);
    assert_eq!(h.write(0, &[3; 512]), IOERR, "not durable: not done");
}

#[test]
fn get_id_pads_and_never_truncates() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    mem.write_slice(&[0xee; 64], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(RequestType::GetId, 0, &[(DATA, 20, true)]),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"test-disk");
    assert_eq!(&id[9..], &[0u8; 11], "NUL-padded");
    // Split across descriptors, in a bigger buffer: 20 bytes, no more.
    mem.write_slice(&[0xee; 64], GuestAddress(DATA)).unwrap();
    let data = [(DATA, 7, true), (DATA + 7, 25, true)];
    assert_eq!(h.request(RequestType::GetId, 0, &data), (OK, 21));
    let mut got = [0u8; 33];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..20], &id);
    assert_eq!(&got[20..], &[0xee; 13]);
    // Too small for the whole id: refused, nothing written.
    mem.write_slice(&[0xee; 64], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(RequestType::GetId, 0, &[(DATA, 19, true)]),
        (IOERR, 1)
    );
    let mut after = [0u8; 19];
    mem.read_slice(&mut after, GuestAddress(DATA)).unwrap();
    assert_eq!(after, [0xee; 19]);
    // The id must be device-writable.
    assert_eq!(
        h.request(RequestType::GetId, 0, &[(DATA, 20, false)]).0,
        IOERR
    );
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.get_id_ops, s.bad_layout), (2, 2));

    // A 20-byte id has no terminator.
    drop(h);
    let disk = RawFile::open(img.path(), true).unwrap();
    let full = DiskId::new("abcdefghijklmnopqrst").unwrap();
    let mut h = Harness::with_device(&mem, VirtioBlk::new(disk, full, 512).unwrap());
    assert_eq!(
        h.request(RequestType::GetId, 0, &[(DATA, 20, true)]),
        (OK, 21)
    );
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"abcdefghijklmnopqrst");
}

#[test]
fn other_request_types_are_unsupported() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // DISCARD, WRITE_ZEROES, SCSI, GET_LIFETIME, zone append, garbage.
    for raw in [11u32, 13, 2, 10, 15, 0x8000_0001, u32::MAX] {
        let ty = RequestType::from_raw(raw);
        assert_eq!(h.request(ty, 0, &[(DATA, 16, false)]), (UNSUPP, 1), "{raw}");
    }
    assert_eq!(img.read(0, 4096), initial(0, 4096));
    let s = h.dev.metrics().snapshot();
    assert_eq!(s.unsupported_requests, 7);
    assert_eq!(s.errors(), 0);
}

#[test]
fn read_only_disks_refuse_writes() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, true);
    assert_eq!(h.write(0, &[0x55; 4096]), IOERR);
    // Even a malformed range gets the read-only answer, and nothing moves.
    assert_eq!(h.write(CAPACITY, &[0x55; 512]), IOERR);
    assert_eq!(img.read(0, 4096), initial(0, 4096));
    assert_eq!(h.read(0, 512).0, OK);
    assert_eq!(h.request(RequestType::Flush, 0, &[]).0, OK);
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.readonly_writes, s.write_ops, s.read_ops), (2, 0, 1));
}

#[test]
fn sector_ranges_are_checked_without_overflow() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // Ends exactly at the capacity: fine; one sector further: refused.
    assert_eq!(h.read(CAPACITY - 2, 1024).0, OK);
    assert_eq!(h.read(CAPACITY - 1, 1024).0, IOERR);
    assert_eq!(h.read(CAPACITY, 512).0, IOERR);
    assert_eq!(h.write(CAPACITY - 1, &[9; 1024]), IOERR);
    // sector * 512 overflows; sector * 512 + len overflows.
    for sector in [u64::MAX, u64::MAX / 512 + 1, (u64::MAX - 511) / 512] {
        assert_eq!(h.read(sector, 1024).0, IOERR, "{sector:#x}");
        assert_eq!(h.write(sector, &[9; 1024]), IOERR, "{sector:#x}");
    }
    assert_eq!(img.len(), SIZE);
    assert_eq!(img.read(SIZE - 512, 512), initial(SIZE - 512, 512));
    assert_eq!(h.dev.metrics().snapshot().out_of_range, 9);
}

#[test]
fn lengths_must_be_whole_sectors_and_may_be_zero() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    for len in [1u32, 100, 511, 513, 4095] {
        assert_eq!(h.read(0, len).0, IOERR, "{len}");
        assert_eq!(h.write(0, &vec![1; len as usize]), IOERR, "{len}");
    }
    // Two segments that only add up to whole sectors are fine.
    let data = [(DATA, 100, true), (DATA + 0x1000, 412, true)];
    assert_eq!(h.request(RequestType::In, 1, &data), (OK, 513));
    let mut got = vec![0u8; 100];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, img.read(512, 100));
    // No data is a multiple of 512 too, and the range is in the disk.
    assert_eq!(h.request(RequestType::In, 0, &[]), (OK, 1));
    assert_eq!(h.request(RequestType::Out, CAPACITY, &[]), (OK, 1));
    assert_eq!(h.request(RequestType::Out, CAPACITY + 1, &[]).0, IOERR);
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.unaligned, s.out_of_range), (10, 1));
    assert_eq!(img.read(0, 4096), initial(0, 4096));
}

#[test]
fn any_framing_is_accepted() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // OUT: header and data in one readable descriptor.
    put_header(&mem, DATA, RequestType::Out, 4);
    mem.write_slice(&[0x42; 1024], GuestAddress(DATA + 16))
        .unwrap();
    h.add_chain(&[(DATA, 16 + 1024, false), (STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.status(), OK);
    assert_eq!(img.read(4 * 512, 1024), vec![0x42; 1024]);
    // IN: header split in two, data and status in one writable descriptor.
    put_header(&mem, HDR, RequestType::In, 4);
    let out = DATA + 0x10000;
    h.add_chain(&[(HDR, 10, false), (HDR + 10, 6, false), (out, 513, true)]);
    assert_eq!(h.run(), 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(out + 512)).unwrap(), OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(out)).unwrap();
    assert_eq!(got, vec![0x42; 512]);
    // Through an indirect table.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.add_indirect_chain(&[(HDR, 16, false), (out, 512, true), (STATUS, 1, true)]);
    assert_eq!(h.run(), 513);
    assert_eq!(h.status(), OK);
    assert_eq!(h.dev.metrics().snapshot().errors(), 0);
}

#[test]
fn bad_layouts_get_ioerr_or_nothing() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let hdr = |ty, sector| {
        put_header(&mem, HDR, ty, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    };
    let unchanged = |h: &Harness| {
        assert_eq!(img.read(0, 8192), initial(0, 8192));
        assert_eq!(h.status(), 0xff, "status byte untouched");
    };
    hdr(RequestType::Out, 0);
    mem.write_slice(&[0x77; 4096], GuestAddress(DATA)).unwrap();
    // No device-writable status at the end: not executed, nothing written.
    h.add_chain(&[(HDR, 16, false), (DATA, 4096, false)]);
    assert_eq!(h.run(), 0);
    unchanged(&h);
    h.add_chain(&[(HDR, 16, false), (DATA, 4096, false), (STATUS, 0, true)]);
    assert_eq!(h.run(), 0);
    unchanged(&h);
    // Status outside guest memory, or wrapping the address space.
    h.add_chain(&[(HDR, 16, false), (DATA, 4096, false), (MEM_SIZE, 1, true)]);
    assert_eq!(h.run(), 0);
    h.add_chain(&[(HDR, 16, false), (DATA, 4096, false), (u64::MAX, 2, true)]);
    assert_eq!(h.run(), 0);
    unchanged(&h);
    assert_eq!(h.dev.metrics().snapshot().unanswered_chains, 4);

    let cases: [&[Desc]; 6] = [
        // Header too short, or device-writable.
        &[(HDR, 8, false), (STATUS, 1, true)],
        &[(HDR, 16, true), (STATUS, 1, true)],
        // Readable data after the status-side writable part.
        &[
            (HDR, 16, false),
            (STATUS, 1, true),
            (DATA, 512, false),
            (STATUS, 1, true),
        ],
        // OUT data must be device-readable.
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        // Header outside guest memory.
        &[(MEM_SIZE - 8, 16, false), (STATUS, 1, true)],
        // Data outside guest memory: checked before any byte is written.
        &[
            (HDR, 16, false),
            (DATA, 4096, false),
            (MEM_SIZE - 512, 1024, false),
            (STATUS, 1, true),
        ],
    ];
    for (i, chain) in cases.iter().enumerate() {
        hdr(RequestType::Out, 0);
        h.add_chain(chain);
        assert_eq!(h.run(), 1, "case {i}");
        assert_eq!(h.status(), IOERR, "case {i}");
        assert_eq!(img.read(0, 8192), initial(0, 8192));
    }
    // IN data must be device-writable.
    hdr(RequestType::In, 0);
    h.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.status(), IOERR);
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.bad_layout, s.bad_guest_memory), (5, 2));
    assert_eq!((s.read_ops, s.write_ops), (0, 0));
}

#[test]
fn chains_and_requests_are_bounded() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let sector_descs = |n: usize, w: bool| -> Vec<Desc> {
        (0..n as u64).map(|i| (DATA + i * 512, 512, w)).collect()
    };
    // seg_max segments: served.
    let data = sector_descs(SEG_MAX as usize, true);
    assert_eq!(
        h.request(RequestType::In, 0, &data),
        (OK, SEG_MAX * 512 + 1)
    );
    // One more: refused, as is a chain longer than seg_max + 2 descriptors.
    let data = sector_descs(SEG_MAX as usize + 1, false);
    assert_eq!(h.request(RequestType::Out, 0, &data), (IOERR, 1));
    let data = sector_descs(SEG_MAX as usize + 10, false);
    assert_eq!(h.request(RequestType::Out, 0, &data), (IOERR, 1));
    // A chain as long as the queue: still answered at its real end.
    let data = sector_descs(QSIZE as usize - 2, false);
    assert_eq!(h.request(RequestType::Out, 0, &data), (IOERR, 1));
    // More data than seg_max * size_max, even in few descriptors.
    let huge = CHAIN_LIMITS.max_data_len as u32 + 512;
    assert_eq!(
        h.request(RequestType::Out, 0, &[(DATA, huge, false)]),
        (IOERR, 1)
    );
    assert_eq!(img.read(0, 4096), initial(0, 4096));
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.too_many_segments, s.data_too_long), (3, 1));
    assert_eq!(s.read_ops, 1);
}

#[test]
fn disk_failures_become_ioerr() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = flaky_harness(&mem, &img);
    h.dev.disk().fail_io.set(true);
    assert_eq!(h.read(0, 512).0, IOERR);
    assert_eq!(h.write(0, &[1; 512]), IOERR);
    h.dev.disk().fail_io.set(false);
    assert_eq!(h.read(0, 512).0, OK);
    let s = h.dev.metrics().snapshot();
    assert_eq!((s.io_errors, s.read_ops), (2, 1));

    // A file that shrank under the device: the read hits EOF.
    h.dev.disk().inner.file().set_len(4096).unwrap();
    assert_eq!(h.read(16, 512).0, IOERR);
    assert_eq!(h.dev.metrics().snapshot().io_errors, 3);
}

#[test]
fn batches_event_idx_and_bad_heads() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    put_header(&mem, HDR, RequestType::In, 0);
    // Three chains in one batch; the driver asks to be told at used idx 3 only.
    for i in 0..3u64 {
        h.add_chain(&[
            (HDR, 16, false),
            (DATA + i * 512, 512, true),
            (STATUS + i, 1, true),
        ]);
    }
    mem.write_obj(2u16, GuestAddress(USED_EVENT)).unwrap();
    let out = h.process();
    assert_eq!(
        out,
        ProcessOutcome {
            chains: 3,
            needs_notification: true,
            more: false
        }
    );
    assert_eq!(last_used(&mem).0, 3);
    // The next request does not reach used_event: no interrupt.
    mem.write_obj(10u16, GuestAddress(USED_EVENT)).unwrap();
    h.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    let out = h.process();
    assert_eq!(
        out,
        ProcessOutcome {
            chains: 1,
            needs_notification: false,
            more: false
        }
    );

    // A head index beyond the queue yields an empty chain, which cannot go
    // in the used ring: the queue is broken (the VMM resets the device).
    let idx = h.vq.avail().idx().load();
    h.vq.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(QSIZE + 5);
    h.vq.avail().idx().store(idx.wrapping_add(1));
    assert!(matches!(h.dev.process_queue(&mem), Err(Error::Queue(_))));
    assert_eq!(h.dev.metrics().snapshot().unanswered_chains, 1);
    // So does an avail index too far ahead.
    h.vq.avail().idx().store(idx.wrapping_add(1000));
    assert!(matches!(h.dev.process_queue(&mem), Err(Error::Queue(_))));
}

/// `count` reads of one sector each, published at once; status `i` at `STATUS + i`.
fn queue_reads(h: &mut Harness<'_, impl DiskBackend>, count: u64) {
    put_header(h.mem, HDR, RequestType::In, 0);
    for i in 0..count {
        h.add_chain(&[
            (HDR, 16, false),
            (DATA + i * 512, 512, true),
            (STATUS + i, 1, true),
        ]);
    }
}

#[test]
fn a_round_serves_at_most_its_budget_and_asks_to_come_back() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // As many requests as the descriptor table holds: one round would serve them all.
    queue_reads(&mut h, 85);
    let budget = RoundBudget {
        requests: 40,
        ..RoundBudget::UNLIMITED
    };
    let avail_event = || {
        mem.read_obj::<u16>(GuestAddress(USED_RING + 4 + 8 * u64::from(QSIZE)))
            .unwrap()
    };
    let mut rounds = Vec::new();
    loop {
        // The driver wants to hear of the next used buffer.
        let used = last_used(&mem).0;
        mem.write_obj(used, GuestAddress(USED_EVENT)).unwrap();
        let out = h.dev.process_queue_within(&mem, &budget).unwrap();
        rounds.push(out.chains);
        assert!(out.needs_notification, "each round tells the driver");
        assert_eq!(last_used(&mem).0, rounds.iter().sum::<u32>() as u16);
        if !out.more {
            break;
        }
        // EVENT_IDX: while the device is due back, avail_event stays behind, so the
        // driver does not kick for what it adds meanwhile.
        assert_eq!(avail_event(), 0);
    }
    assert_eq!(rounds, [40, 40, 5], "then nothing was left: no more");
    assert_eq!(avail_event(), 85, "notifications on again once drained");
    assert_eq!(h.dev.metrics().snapshot().read_ops, 85);

    // Bytes bound a round too, after the request that reaches them.
    drop(h); // It holds the image's lock.
    let mut h = Harness::new(&mem, &img, false);
    queue_reads(&mut h, 8);
    let by_bytes = RoundBudget {
        bytes: 1500,
        ..RoundBudget::UNLIMITED
    };
    let out = h.dev.process_queue_within(&mem, &by_bytes).unwrap();
    assert_eq!(
        (out.chains, out.more),
        (3, true),
        "3 x 512 bytes reach 1500"
    );
    // A budget of nothing still serves one request: every round makes progress.
    let none = RoundBudget {
        requests: 0,
        bytes: 0,
        syncs: 0,
    };
    let out = h.dev.process_queue_within(&mem, &none).unwrap();
    assert_eq!((out.chains, out.more), (1, true));
    let out = h.dev.process_queue(&mem).unwrap();
    assert_eq!((out.chains, out.more), (4, false));
}

#[test]
fn write_through_syncs_count_against_the_budget() {
    let img = TempImage::new(SIZE);
    let mem = guest_mem();
    let mut h = flaky_harness(&mem, &img);
    h.dev.reset();
    h.dev
        .set_acked_features(h.dev.avail_features() & !(1 << VIRTIO_BLK_F_FLUSH));
    h.vq = MockSplitQueue::new(&mem, QSIZE);
    h.dev.activate(create_queue(&h.vq), &mem).unwrap();
    put_header(&mem, HDR, RequestType::Out, 0);
    for i in 0..5u64 {
        h.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS + i, 1, true)]);
    }
    let out = h
        .dev
        .process_queue_within(&mem, &RoundBudget::EVENT_LOOP)
        .unwrap();
    assert_eq!((out.chains, out.more), (1, true), "one fdatasync per round");
    assert_eq!(h.dev.disk().flushes.get(), 1);
    let mut rounds = 1;
    while h
        .dev
        .process_queue_within(&mem, &RoundBudget::EVENT_LOOP)
        .unwrap()
        .more
    {
        rounds += 1;
    }
    assert_eq!((rounds, h.dev.disk().flushes.get()), (5, 5));
    assert_eq!(h.dev.metrics().snapshot().write_ops, 5);
}
