//! Tests of the virtio-mmio transport with a dummy device; no KVM needed (the one test that
//! registers eventfds with KVM is ignored unless asked for: `--ignored kvm`).

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

#[test]
fn identification_registers() {
    let (_, mut t) = transport();
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 24);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(MAX));
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "queue 1 does not exist"
    );
    w(&mut t, VIRTIO_MMIO_SHM_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn features_are_negotiated_across_both_words() {
    let packed = 1u64 << VIRTIO_F_RING_PACKED;
    let (dev, mut t) = transport_with(Dummy {
        features: 1 << 3 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << 35 | packed,
        ..Default::default()
    });
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
        1 << 3 | 1 << VIRTIO_RING_F_EVENT_IDX
    );
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    // VERSION_1 is added, packed rings are not offered.
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 0 | 1 << 3);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);

    let wanted = V1 | 1 << 35 | 1 << 3;
    assert_eq!(
        negotiate(&mut t, wanted),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    assert_eq!(dev.lock().unwrap().acked, Some(wanted));
    // The features are frozen once FEATURES_OK is set.
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    assert_eq!(t.driver_features, wanted);
}

#[test]
fn features_ok_is_refused_for_unknown_features_or_without_version_1() {
    for features in [V1 | 1 << 7, 1 << 3, V1 | 1 << VIRTIO_F_RING_PACKED] {
        let (dev, mut t) = transport();
        assert_eq!(
            negotiate(&mut t, features),
            ACKNOWLEDGE | DRIVER,
            "{features:#x}"
        );
        assert_eq!(dev.lock().unwrap().acked, None);
        setup_queue(&mut t, 16, 0x1000, 0x2000, 0x3000);
        driver_ok(&mut t);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & DRIVER_OK, 0);
        assert_eq!(dev.lock().unwrap().activations, 0);
    }
}

#[test]
fn status_bits_are_set_in_order_and_never_cleared_but_by_reset() {
    let (dev, mut t) = transport();
    w(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        0,
        "DRIVER before ACKNOWLEDGE"
    );
    w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
    w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER,
        "bits cannot be cleared"
    );
    w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER,
        "DRIVER_OK needs FEATURES_OK"
    );
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED,
    );
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED
    );
    setup_queue(&mut t, 16, 0x1000, 0x2000, 0x3000);
    driver_ok(&mut t);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS) & DRIVER_OK,
        0,
        "FAILED blocks DRIVER_OK"
    );
    assert_eq!(dev.lock().unwrap().activations, 0);
}

#[test]
fn a_valid_queue_activates_the_device_exactly_once() {
    let mem = memory();
    // The driver's view of memory and the transport's are the same mappings.
    let (dev, mut t) = transport_on(default_dummy(), mem.clone());
    let mut mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    mock.add_chain(2).unwrap();
    assert_ne!(
        negotiate(&mut t, V1 | 1 << VIRTIO_RING_F_EVENT_IDX) & FEATURES_OK,
        0
    );
    setup_queue(
        &mut t,
        16,
        mock.desc_table_addr().0,
        mock.avail_addr().0,
        mock.used_addr().0,
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    driver_ok(&mut t);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(t.is_activated());
    driver_ok(&mut t);
    // Queue registers are frozen now.
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(t.queues[0].size, 16);

    let mut d = dev.lock().unwrap();
    assert_eq!(d.activations, 1);
    let ctx = d.ctx.as_mut().unwrap();
    assert_eq!(ctx.acked_features, V1 | 1 << VIRTIO_RING_F_EVENT_IDX);
    assert_eq!((ctx.queues.len(), ctx.queue_events.len()), (1, 1));
    let round = ctx.mem.memory();
    let q = &mut ctx.queues[0];
    assert_eq!(
        (q.size(), q.ready(), q.event_idx_enabled()),
        (16, true, true)
    );
    assert_eq!(q.used_ring(), mock.used_addr().0);
    // The device sees what the driver put in the ring.
    let chain = q
        .pop_descriptor_chain(&*round)
        .expect("the chain the driver added");
    assert_eq!(chain.head_index(), 0);
}

#[test]
fn queue_addresses_are_split_in_low_and_high_halves() {
    let (dev, mut t) = transport();
    bring_up(&mut t);
    let d = dev.lock().unwrap();
    let q = &d.ctx.as_ref().unwrap().queues[0];
    assert_eq!(
        (q.desc_table(), q.avail_ring(), q.used_ring()),
        (0x1000, 0x2000, HIGH_MEM + 0x100)
    );
}

#[test]
fn a_bad_queue_setup_needs_a_reset_and_does_not_activate() {
    let cases: [(u32, u64, u64, u64); 8] = [
        (0, 0x1000, 0x2000, 0x3000),
        (3, 0x1000, 0x2000, 0x3000),
        (u32::from(MAX) * 2, 0x1000, 0x2000, 0x3000),
        (0x1_0010, 0x1000, 0x2000, 0x3000),
        (16, 0x1008, 0x2000, 0x3000),
        (16, 0x1000, 0x2001, 0x3000),
        (16, 0x1000, 0x2000, 0x3002),
        (16, 0x1000, 0x2000, 0xfff0),
    ];
    for (size, desc, avail, used) in cases {
        let (dev, mut t) = transport();
        negotiate(&mut t, V1);
        setup_queue(&mut t, size, desc, avail, used);
        driver_ok(&mut t);
        let what = format!("size {size} desc {desc:#x} avail {avail:#x} used {used:#x}");
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0, "{what}");
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            INTERRUPT_CONFIG_CHANGE,
            "{what}"
        );
        assert!(!t.is_activated());
        assert_eq!(dev.lock().unwrap().activations, 0, "{what}");
        // After a reset the driver can do it right.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        bring_up(&mut t);
        assert_eq!(dev.lock().unwrap().activations, 1, "{what}");
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    }
}

#[test]
fn a_running_device_can_ask_for_a_reset() {
    let (dev, mut t) = transport();
    bring_up(&mut t);
    let running = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), running);
    let irq = dev.lock().unwrap().ctx.as_ref().unwrap().interrupt.clone();
    irq.signal_needs_reset().unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), running | NEEDS_RESET);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    // The driver's reset clears the request; a new initialisation runs the device.
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    bring_up(&mut t);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), running);
    assert_eq!(dev.lock().unwrap().activations, 2);
}

#[test]
fn an_unready_queue_or_a_refusing_device_needs_a_reset() {
    let (dev, mut t) = transport();
    negotiate(&mut t, V1);
    setup_queue(&mut t, 16, 0x1000, 0x2000, 0x3000);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    driver_ok(&mut t);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_eq!(dev.lock().unwrap().activations, 0);

    let (_, mut t) = transport_with(Dummy {
        refuse: true,
        ..default_dummy()
    });
    bring_up(&mut t);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert!(!t.is_activated());
}

/// A driver that accepted fewer features sets up fewer queues (virtio-balloon without
/// the stats queue): the device says how many it needs, and only those must be ready.
#[test]
fn only_the_queues_the_acked_features_need_must_be_ready() {
    let three = |needed| {
        let dev = Arc::new(Mutex::new(Dummy {
            max: vec![MAX; 3],
            needed,
            ..default_dummy()
        }));
        let t =
            MmioTransport::new(dev.clone(), vm_memory::GuestMemoryAtomic::new(memory())).unwrap();
        (dev, t)
    };
    let setup = |t: &mut MmioTransport, queues: u32| {
        negotiate(t, V1);
        for i in 0..queues {
            w(t, VIRTIO_MMIO_QUEUE_SEL, i);
            w(t, VIRTIO_MMIO_QUEUE_NUM, 16);
            let base = 0x1000 + u64::from(i) * 0x3000;
            w64(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            w64(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
            w64(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
            w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        driver_ok(t);
    };
    // Two of three queues set up, two needed: the device gets exactly those two.
    let (dev, mut t) = three(Some(2));
    setup(&mut t, 2);
    assert!(t.is_activated());
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    {
        let d = dev.lock().unwrap();
        let ctx = d.ctx.as_ref().unwrap();
        assert_eq!(ctx.queues.len(), 2);
        assert_eq!(ctx.queues[1].desc_table(), 0x4000);
        assert_eq!(ctx.queue_events.len(), 3, "every queue keeps its eventfd");
    }
    // The same setup for a device that needs all three: refused, as before.
    let (dev, mut t) = three(None);
    setup(&mut t, 2);
    assert!(!t.is_activated());
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_eq!(dev.lock().unwrap().activations, 0);
    // A device claiming more queues than it has gets the ones that exist.
    let (dev, mut t) = three(Some(7));
    setup(&mut t, 3);
    assert!(t.is_activated());
    assert_eq!(dev.lock().unwrap().ctx.as_ref().unwrap().queues.len(), 3);
    // Needing none activates without queues.
    let (dev, mut t) = three(Some(0));
    setup(&mut t, 0);
    assert!(t.is_activated());
    assert!(dev.lock().unwrap().ctx.as_ref().unwrap().queues.is_empty());
}

#[test]
fn config_space_accesses_reach_the_device_at_any_width() {
    let (dev, mut t) = transport_with(Dummy {
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        generation: 9,
        ..Default::default()
    });
    let mut b1 = [0u8; 1];
    t.read(0x103, &mut b1);
    assert_eq!(b1, [4]);
    let mut b2 = [0u8; 2];
    t.read(0x101, &mut b2);
    assert_eq!(b2, [2, 3]);
    let mut b8 = [0u8; 8];
    t.read(0x100, &mut b8);
    assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b4 = [0xffu8; 4];
    t.read(0x106, &mut b4);
    assert_eq!(b4, [7, 8, 0, 0], "past the device's config reads as zeros");

    t.write(0x105, &[0xaa]);
    t.write(0x100, &[0x10, 0x11]);
    t.write(0x102, &0x1312_u16.to_le_bytes());
    assert_eq!(
        dev.lock().unwrap().config,
        [0x10, 0x11, 0x12, 0x13, 5, 0xaa, 7, 8]
    );
    t.write(0x100, &u64::MAX.to_le_bytes());
    assert_eq!(dev.lock().unwrap().config, [0xff; 8]);
    // Crossing the end of the window reaches nobody.
    t.write(0xffe, &[1, 2, 3, 4]);
    t.read(0xffe, &mut b4);
    assert_eq!(b4, [0; 4]);
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 9);
}

#[test]
fn interrupt_status_is_set_by_the_device_and_cleared_by_ack() {
    let (dev, mut t) = transport();
    bring_up(&mut t);
    let irq = dev.lock().unwrap().ctx.as_ref().unwrap().interrupt.clone();
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    irq.signal_used_queue().unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INTERRUPT_USED_RING);
    t.interrupt().signal_config_change().unwrap();
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 2);
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_USED_RING);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn writing_zero_to_status_resets_the_device_and_its_queues() {
    let (dev, mut t) = transport();
    bring_up(&mut t);
    t.interrupt().signal_used_queue().unwrap();
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    let q = t.queues[0];
    assert_eq!(
        (q.size, q.desc, q.driver, q.device),
        (u32::from(MAX), 0, 0, 0)
    );
    assert_eq!((t.driver_features, t.is_activated()), (0, false));
    {
        let d = dev.lock().unwrap();
        assert_eq!((d.resets, d.activations), (1, 1));
        assert!(d.ctx.is_none());
    }
    // A second initialisation activates the device again.
    bring_up(&mut t);
    assert_eq!(dev.lock().unwrap().activations, 2);
}

#[test]
fn a_queue_notify_that_reaches_the_transport_kicks_the_queue() {
    let (_, mut t) = transport();
    let events = t.queue_events().unwrap();
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert_eq!(events[0].read().unwrap(), 2);
    assert!(events[0].read().is_err(), "no further kick");
}

#[test]
fn garbage_accesses_never_panic_and_bad_register_accesses_read_zero() {
    let (_, mut t) = transport();
    let mut b2 = [0xffu8; 2];
    t.read(0, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    t.read(0, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    t.read(2, &mut b4);
    assert_eq!(b4, [0; 4]);
    // Misaligned or wrong-size writes to Status do nothing.
    t.write(0x70, &[1]);
    t.write(0x71, &[1, 0, 0, 0]);
    t.write(0x70, &1u64.to_le_bytes());
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let offsets = (0..0x1010u64).chain([u64::MAX, u64::MAX - 3, 1 << 40, 0x1_0000_0100]);
    for offset in offsets {
        for len in [0usize, 1, 2, 3, 4, 8, 16] {
            let mut buf = vec![0u8; len];
            t.read(offset, &mut buf);
            let value = next().to_le_bytes().repeat(2);
            t.write(offset, &value[..len]);
        }
    }
    for _ in 0..10_000 {
        let offset = (next() % 0x110) & !3;
        let value = (next() as u32) & [0xff, 0xffff, u32::MAX][(next() % 3) as usize];
        w(&mut t, offset as u32, value);
    }
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
}

#[test]
fn invalid_queue_maximum_sizes_are_refused() {
    for max in [0u16, 3, 65535] {
        let dev = Arc::new(Mutex::new(Dummy {
            max: vec![256, max],
            ..Default::default()
        }));
        let err = MmioTransport::new(dev, vm_memory::GuestMemoryAtomic::new(memory())).unwrap_err();
        assert!(
            matches!(err, MmioError::InvalidQueueMax { index: 1, max: m } if m == max),
            "{err}"
        );
    }
    assert!(memory().num_regions() == 2);
}

/// Ignored by default, as a machine without KVM cannot run it; CI runs it (`.ci/run`).
#[test]
#[ignore = "needs /dev/kvm with an in-kernel irqchip; run with --ignored kvm"]
fn ioevents_and_irqfd_register_with_kvm() {
    let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip()
        .expect("this test needs KVM's in-kernel irqchip");
    let (_, t) = transport();
    t.register_ioevents(&vm, 0xd000_0000).unwrap();
    t.register_irqfd(&vm, 5).unwrap();
    // The same datamatch at the same address twice is refused by KVM.
    assert!(matches!(
        t.register_ioevents(&vm, 0xd000_0000),
        Err(MmioError::Kvm {
            what: "KVM_IOEVENTFD",
            ..
        })
    ));
}
