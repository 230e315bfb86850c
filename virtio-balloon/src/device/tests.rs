//! Device tests: host API, configuration space and valid guest flows.

use super::*;
use crate::stats::{S_MEMFREE, S_MEMTOT, S_MINFLT};
use crate::test_utils::*;
use crate::testing::DriverQueue;

const VERSION_1: u64 = 1 << 32;

#[test]
fn features_and_queue_layouts() {
    let mem = guest_mem();
    let none = device(&mem, BalloonParams::default());
    assert_eq!(none.device_type(), 5);
    assert_eq!(none.avail_features(), VERSION_1);
    assert_eq!(none.queue_max_sizes(), &[QUEUE_MAX_SIZE; 2]);
    let all = device(&mem, all_features());
    assert_eq!(all.avail_features(), VERSION_1 | 0b100110);
    assert_eq!(all.queue_max_sizes(), &[QUEUE_MAX_SIZE; 4]);
    let reporting = BalloonParams {
        free_page_reporting: true,
        ..BalloonParams::default()
    };
    let mut dev = device(&mem, reporting);
    assert_eq!(dev.avail_features(), VERSION_1 | 1 << 5);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), dev.avail_features());
    use QueueKind::*;
    assert_eq!(queue_layout(0), vec![Inflate, Deflate]);
    assert_eq!(
        queue_layout(0b100110),
        vec![Inflate, Deflate, Stats, Reporting]
    );
    // Without the stats queue, the reporting queue takes index 2.
    assert_eq!(queue_layout(1 << 5), vec![Inflate, Deflate, Reporting]);
    assert_eq!(queue_layout(1 << 1 | 1 << 2), vec![Inflate, Deflate, Stats]);
    let zero = BalloonParams {
        stats_interval: Some(Duration::ZERO),
        ..BalloonParams::default()
    };
    assert!(matches!(
        VirtioBalloon::new(
            zero,
            crate::MemfdBackend::from_guest_memory(&mem).unwrap(),
            AllowAll
        ),
        Err(Error::ZeroStatsInterval)
    ));
}

#[test]
fn activation_and_reset() {
    let mem = guest_mem();
    let vqs: Vec<_> = (0..4)
        .map(|q| DriverQueue::new(&mem, q * 0x10000, 16))
        .collect();
    let queues = |n: usize| -> Vec<Queue> { vqs.iter().take(n).map(DriverQueue::queue).collect() };
    let mut dev = device(&mem, all_features());
    assert!(matches!(
        dev.process_queue(0, &mem),
        Err(Error::NotActivated)
    ));
    assert!(matches!(dev.request_stats(&mem), Err(Error::NotActivated)));
    assert!(matches!(
        dev.activate(queues(4), &mem),
        Err(Error::Version1NotAcked)
    ));
    dev.set_acked_features(dev.avail_features());
    assert!(matches!(
        dev.activate(queues(3), &mem),
        Err(Error::MissingQueues { needed: 4, got: 3 })
    ));
    let mut not_ready = queues(4);
    not_ready[2].set_ready(false);
    assert!(matches!(
        dev.activate(not_ready, &mem),
        Err(Error::InvalidQueue(2))
    ));
    assert!(!dev.is_activated());
    dev.activate(queues(4), &mem).unwrap();
    assert!(dev.is_activated());
    assert!(matches!(
        dev.activate(queues(4), &mem),
        Err(Error::AlreadyActivated)
    ));
    assert_eq!(dev.queue_kind(3), Some(QueueKind::Reporting));
    assert!(matches!(
        dev.process_queue(4, &mem),
        Err(Error::NoSuchQueue(4))
    ));
    // Nothing queued: no chains, no notification, no stats buffer yet.
    for q in 0..4 {
        assert_eq!(
            dev.process_queue(q, &mem).unwrap(),
            ProcessOutcome::default()
        );
    }
    assert_eq!(dev.request_stats(&mem).unwrap(), ProcessOutcome::default());
    dev.set_target_bytes(8 * PAGE_SIZE).unwrap();
    dev.write_config(4, &3u32.to_le_bytes());
    dev.reset();
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features(), 0);
    assert_eq!(dev.actual_bytes(), 0);
    assert_eq!(dev.target_bytes(), 8 * PAGE_SIZE);

    // A driver accepting reporting but not stats: 3 queues, extra ones dropped.
    dev.set_acked_features(VERSION_1 | 1 << VIRTIO_BALLOON_F_REPORTING);
    dev.activate(queues(4), &mem).unwrap();
    assert_eq!(dev.queue_kind(2), Some(QueueKind::Reporting));
    assert_eq!(dev.queue_kind(3), None);
    assert!(matches!(
        dev.process_queue(3, &mem),
        Err(Error::NoSuchQueue(3))
    ));
    assert!(matches!(
        dev.request_stats(&mem),
        Err(Error::StatsNotNegotiated)
    ));
}

#[test]
fn config_space_target_and_generation() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    let gen = h.dev.config_generation();
    assert!(h.dev.set_target_bytes(128 * MIB).unwrap());
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    assert!(!h.dev.set_target_bytes(128 * MIB).unwrap());
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(1));
    let mut b = [0u8; 4];
    h.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 32768);
    assert!(matches!(
        h.dev.set_target_bytes(MIB + 1),
        Err(Error::TargetNotPageAligned(_))
    ));
    assert!(matches!(
        h.dev.set_target_bytes(16 << 40),
        Err(Error::TargetTooLarge(_))
    ));
    assert!(h.dev.set_target_bytes((16 << 40) - PAGE_SIZE).unwrap());
    assert_eq!(h.dev.target_bytes(), (16 << 40) - PAGE_SIZE);
    // The driver reports its balloon size in `actual`; num_pages is the device's.
    h.dev.write_config(4, &100u32.to_le_bytes());
    assert_eq!(h.dev.actual_bytes(), 100 * PAGE_SIZE);
    h.dev.write_config(0, &[0; 4]);
    h.dev.write_config(2, &[0; 4]);
    h.dev.write_config(8, &[1; 4]);
    assert_eq!(h.dev.config().num_pages, u32::MAX);
    assert_eq!(h.dev.config().actual, 100);
    let mut all = [0u8; 16];
    h.dev.read_config(0, &mut all);
    assert_eq!(&all[..8], &h.dev.config().to_bytes());
    assert_eq!(
        &all[8..],
        &[0; 8],
        "free_page_hint_cmd_id and poison_val are not offered"
    );
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.config_writes_ignored, m.target_changes), (3, 2));
    // Driver writes do not change the generation.
    assert_eq!(h.dev.config_generation(), gen.wrapping_add(2));
}

#[test]
fn inflate_merges_adjacent_pages_into_one_discard() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.touch(RAM, 64 * PAGE_SIZE, 0xab);
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), 64 * PAGE_SIZE);
    // Linux pops pages off a list: often in descending order.
    h.inflate(&(0..16).rev().map(pfn).collect::<Vec<_>>());
    assert_eq!(h.discards(), vec![page(0)..page(16)]);
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), 48 * PAGE_SIZE);
    assert_eq!(h.resident(page(0)..page(16)), 0);
    assert!(h.holds(page(0), 16 * PAGE_SIZE, 0));
    assert!(h.holds(page(16), 48 * PAGE_SIZE, 0xab));
    assert_eq!(h.dev.inflated_bytes(), 16 * PAGE_SIZE);
    assert_eq!(h.dev.inflated_ranges(), vec![page(0)..page(16)]);
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.inflate_chains, 1);
    assert_eq!(
        (m.inflated_bytes, m.discarded_bytes),
        (16 * PAGE_SIZE, 16 * PAGE_SIZE)
    );
    assert_eq!((m.rejected_ranges, m.malformed_chains), (0, 0));
}

#[test]
fn inflate_unordered_non_adjacent_and_repeated_pages() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.touch(RAM, 64 * PAGE_SIZE, 0x5a);
    h.inflate(&[
        pfn(9),
        pfn(3),
        pfn(40),
        pfn(4),
        pfn(3),
        pfn(5),
        pfn(41),
        pfn(20),
    ]);
    assert_eq!(
        h.discards(),
        vec![
            page(3)..page(6),
            page(9)..page(10),
            page(20)..page(21),
            page(40)..page(42)
        ]
    );
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), (64 - 7) * PAGE_SIZE);
    for i in [3, 4, 5, 9, 20, 40, 41] {
        assert_eq!(h.resident(page(i)..page(i + 1)), 0, "page {i}");
    }
    for i in [2, 6, 8, 10, 19, 21, 39, 42] {
        assert_eq!(h.resident(page(i)..page(i + 1)), PAGE_SIZE, "page {i}");
        assert!(h.holds(page(i), PAGE_SIZE, 0x5a));
    }
    assert_eq!(h.dev.inflated_bytes(), 7 * PAGE_SIZE);
    // Inflating pages already in the balloon discards again but counts once.
    h.touch(page(4), PAGE_SIZE, 1);
    h.inflate(&[pfn(4), pfn(6)]);
    assert_eq!(h.discards(), vec![page(4)..page(5), page(6)..page(7)]);
    assert_eq!(h.dev.inflated_bytes(), 8 * PAGE_SIZE);
    let m = h.dev.metrics().snapshot();
    assert_eq!(
        (m.inflated_bytes, m.reinflated_bytes),
        (8 * PAGE_SIZE, PAGE_SIZE)
    );
    assert_eq!(m.discarded_bytes, 9 * PAGE_SIZE);
}

#[test]
fn deflate_takes_pages_back_and_they_return_on_touch() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.touch(RAM, 32 * PAGE_SIZE, 7);
    h.inflate(&(0..32).map(pfn).collect::<Vec<_>>());
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), 0);
    h.deflate(&(8..24).map(pfn).collect::<Vec<_>>());
    // Deflating discards nothing.
    assert!(h.discards().len() == 1);
    assert_eq!(h.dev.inflated_bytes(), 16 * PAGE_SIZE);
    assert_eq!(
        h.dev.inflated_ranges(),
        vec![page(0)..page(8), page(24)..page(32)]
    );
    // The guest uses a deflated page again: the host allocates it on touch.
    h.touch(page(10), PAGE_SIZE, 9);
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), PAGE_SIZE);
    assert!(h.holds(page(10), PAGE_SIZE, 9));
    // Deflating pages not in the balloon changes nothing and is counted.
    h.deflate(&[pfn(10), pfn(100)]);
    assert_eq!(h.dev.inflated_bytes(), 16 * PAGE_SIZE);
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.deflate_chains, 2);
    assert_eq!(
        (m.deflated_bytes, m.deflate_unknown_bytes),
        (16 * PAGE_SIZE, 2 * PAGE_SIZE)
    );
    // A reset driver starts with an empty balloon.
    h.dev.reset();
    assert_eq!(
        (h.dev.inflated_bytes(), h.dev.inflated_ranges()),
        (0, vec![])
    );
}

#[test]
fn pages_of_unplugged_memory_leave_the_balloon() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.inflate(&(0..16).map(pfn).collect::<Vec<_>>());
    // Pages 4..8 unplugged, and a range that ends inside page 12: the page goes too.
    h.unplug(page(4)..page(8));
    h.unplug(page(12) - 1..page(12) + 1);
    assert_eq!(h.dev.inflated_bytes(), 10 * PAGE_SIZE);
    assert_eq!(
        h.dev.inflated_ranges(),
        vec![page(0)..page(4), page(8)..page(11), page(13)..page(16)]
    );
    assert_eq!(h.dev.metrics().snapshot().unplugged_bytes, 6 * PAGE_SIZE);
    // Announced between two chains: gone before the next one is served, so the page
    // inflated again counts as new and a deflate of one is unknown.
    h.unplug(page(0)..page(2));
    h.inflate(&[pfn(0)]);
    h.deflate(&[pfn(1)]);
    assert_eq!(h.dev.inflated_bytes(), 9 * PAGE_SIZE);
    let m = h.dev.metrics().snapshot();
    assert_eq!(
        (
            m.inflated_bytes,
            m.reinflated_bytes,
            m.deflate_unknown_bytes
        ),
        (17 * PAGE_SIZE, 0, PAGE_SIZE)
    );
    assert_eq!(m.unplugged_bytes, 8 * PAGE_SIZE);
}

#[test]
fn stats_round_trip() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    assert_eq!(h.dev.last_stats(), None);
    // The driver primes the queue: the device keeps the buffer.
    let out = h.give_stats(&[(S_MEMTOT, 1 << 30), (S_MEMFREE, 1 << 29), (99, 1)]);
    assert_eq!((out.chains, out.needs_notification), (1, false));
    assert_eq!(h.last_used(2).0, 0);
    let s = h.dev.last_stats().unwrap();
    assert_eq!(s.stats.total_memory, Some(1 << 30));
    assert_eq!(s.stats.free_memory, Some(1 << 29));
    assert_eq!(s.stats.minor_faults, None);
    // The host's timer asks for new stats: the buffer goes back.
    let out = h.dev.request_stats(&mem).unwrap();
    assert_eq!(
        out,
        ProcessOutcome {
            chains: 1,
            needs_notification: true
        }
    );
    assert_eq!(h.last_used(2), (1, 0));
    // Nothing held until the driver answers.
    assert_eq!(h.dev.request_stats(&mem).unwrap().chains, 0);
    h.give_stats(&[(S_MEMTOT, 1 << 30), (S_MEMFREE, 1 << 20), (S_MINFLT, 42)]);
    let s2 = h.dev.last_stats().unwrap();
    assert_eq!(s2.stats.free_memory, Some(1 << 20));
    assert_eq!(s2.stats.minor_faults, Some(42));
    assert!(s2.received >= s.received);
    let m = h.dev.metrics().snapshot();
    assert_eq!(
        (m.stats_updates, m.stats_requests, m.stats_unknown_tags),
        (2, 1, 1)
    );
    assert_eq!(h.dev.stats_interval(), Some(Duration::from_secs(5)));
    h.dev.set_stats_interval(Duration::from_secs(1)).unwrap();
    assert_eq!(h.dev.stats_interval(), Some(Duration::from_secs(1)));
    assert!(matches!(
        h.dev.set_stats_interval(Duration::ZERO),
        Err(Error::ZeroStatsInterval)
    ));
    let mut plain = device(&mem, BalloonParams::default());
    assert!(matches!(
        plain.set_stats_interval(Duration::from_secs(1)),
        Err(Error::StatsNotOffered)
    ));
}

#[test]
fn free_page_reporting_discards_each_range_then_returns_the_buffer() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.touch(RAM, ALLOWED, 0xcd);
    // Three 2 MiB free pages, two of them adjacent, in no particular order.
    h.report(&[
        (RAM + 6 * MIB, 2 * MIB as u32),
        (RAM, 2 * MIB as u32),
        (RAM + 2 * MIB, 2 * MIB as u32),
    ]);
    assert_eq!(
        h.discards(),
        vec![RAM..RAM + 4 * MIB, RAM + 6 * MIB..RAM + 8 * MIB]
    );
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), ALLOWED - 6 * MIB);
    assert!(h.holds(RAM + 4 * MIB, 2 * MIB, 0xcd));
    assert!(h.holds(RAM + 8 * MIB, 4 * MIB, 0xcd));
    // Reported memory stays the guest's: no balloon change.
    assert_eq!(h.dev.inflated_bytes(), 0);
    // The guest reuses a reported page: fresh zeroed memory on touch.
    assert!(h.holds(RAM, PAGE_SIZE, 0));
    h.touch(RAM, PAGE_SIZE, 1);
    assert!(h.holds(RAM, PAGE_SIZE, 1));
    let m = h.dev.metrics().snapshot();
    assert_eq!(m.report_chains, 1);
    assert_eq!((m.reported_bytes, m.discarded_bytes), (6 * MIB, 6 * MIB));
}

#[test]
fn reporting_works_at_index_2_without_the_stats_queue() {
    let mem = guest_mem();
    let params = BalloonParams {
        free_page_reporting: true,
        ..BalloonParams::default()
    };
    let mut h = Harness::with(&mem, params, VERSION_1 | 1 << VIRTIO_BALLOON_F_REPORTING);
    h.touch(RAM, 2 * MIB, 3);
    h.add_chain(2, &[(RAM, 2 * MIB as u32, true)]);
    h.served(2);
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), 0);
    assert_eq!(h.dev.metrics().snapshot().reported_bytes, 2 * MIB);
}

#[test]
fn chains_wrap_around_the_rings() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    for round in 0..100u64 {
        let i = round % 64;
        h.touch(page(i), PAGE_SIZE, 1);
        h.inflate(&[pfn(i)]);
        assert_eq!(h.resident(page(i)..page(i + 1)), 0, "round {round}");
        h.deflate(&[pfn(i)]);
    }
    assert_eq!(h.last_used(0).0, 100);
    assert_eq!(h.last_used(1).0, 100);
    let m = h.dev.metrics().snapshot();
    assert_eq!(
        (m.inflated_bytes, m.deflated_bytes),
        (100 * PAGE_SIZE, 100 * PAGE_SIZE)
    );
    assert_eq!(h.dev.inflated_bytes(), 0);
}

#[test]
fn a_failed_discard_is_counted_and_the_page_stays_inflated() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem);
    h.touch(RAM, 4 * PAGE_SIZE, 2);
    h.dev.backend().fail.set(true);
    h.inflate(&[pfn(0), pfn(1)]);
    h.report(&[(page(2), 2 * PAGE_SIZE as u32)]);
    h.dev.backend().fail.set(false);
    assert_eq!(h.resident(RAM..RAM + RAM_SIZE), 4 * PAGE_SIZE);
    // The guest gave the pages up whatever the host managed to do.
    assert_eq!(h.dev.inflated_bytes(), 2 * PAGE_SIZE);
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.discard_failures, m.discarded_bytes), (2, 0));
}
