use super::*;
use crate::layout::MemoryLayout;
use crate::memory::GuestRam;
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

fn device(requested: u64) -> Result<(MemDevice, GuestRam), MemDeviceError> {
    let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[128 * MIB]).unwrap();
    let ram = GuestRam::new(&layout, 1).unwrap();
    let device = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], requested)?;
    Ok((device, ram))
}

#[test]
fn a_node_region_becomes_a_virtio_mem_device() {
    let (mut dev, _ram) = device(32 * MIB).unwrap();
    assert_eq!(dev.device_type(), 24);
    assert_eq!(dev.node(), 0);
    let (g, m) = (dev.model().geometry(), dev.model());
    assert_eq!(
        (g.addr(), g.region_size(), g.block_size()),
        (1 << 32, 128 * MIB, 2 * MIB)
    );
    assert_eq!(
        (
            m.plugged_size(),
            m.requested_size(),
            m.resident_bytes().unwrap()
        ),
        (0, 32 * MIB, 0)
    );
    // The guest reads the region and the node (ACPI PXM) from the config space.
    let mut addr = [0u8; 8];
    dev.read_config(16, &mut addr);
    assert_eq!(u64::from_le_bytes(addr), 1 << 32);
    let generation = dev.config_generation();
    dev.set_requested_size(64 * MIB).unwrap();
    assert_eq!(dev.model().requested_size(), 64 * MIB);
    assert_ne!(
        dev.config_generation(),
        generation,
        "the guest must see the change"
    );
    // A kick before activation is ignored, not a crash.
    dev.process_queue();
}

#[test]
fn an_unusable_queue_asks_the_driver_for_a_reset() {
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{driver_ok, negotiate, r, setup_queue, w, V1};
    use crate::devices::virtio::INTERRUPT_CONFIG_CHANGE;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET;
    use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_STATUS};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    let (dev, ram) = device(0).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let view = vm_memory::GuestMemoryAtomic::new(ram.memory.clone());
    let mut t = MmioTransport::new(dev.clone(), view).unwrap();
    let irqfd = t.interrupt().irqfd().try_clone().unwrap();
    let vq = MockSplitQueue::create(&ram.memory, GuestAddress(0x10_0000), 16);
    let bring_up = |t: &mut MmioTransport| {
        negotiate(t, V1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
        let (desc, avail, used) = (vq.desc_table_addr(), vq.avail_addr(), vq.used_addr());
        setup_queue(t, 16, desc.0, avail.0, used.0);
        driver_ok(t);
        assert!(t.is_activated());
    };
    bring_up(&mut t);
    // The avail ring announces more chains than the queue holds.
    vq.avail().idx().store(1000);
    dev.lock().unwrap().process_queue();
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(irqfd.read().unwrap(), 1, "one interrupt");
    // The device serves nothing more: another kick neither interrupts nor warns.
    dev.lock().unwrap().process_queue();
    assert!(irqfd.read().is_err(), "no interrupt: the irqfd is empty");
    // The driver resets the device and sets it up again: it runs.
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    vq.avail().idx().store(0);
    bring_up(&mut t);
    dev.lock().unwrap().process_queue();
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
}

#[test]
fn bad_sizes_are_refused_and_change_nothing() {
    let (mut dev, _ram) = device(0).unwrap();
    assert!(
        dev.set_requested_size(3 * MIB).is_err(),
        "not a multiple of the block size"
    );
    assert!(
        dev.set_requested_size(256 * MIB).is_err(),
        "above the region"
    );
    assert_eq!(dev.model().requested_size(), 0);
    assert!(matches!(
        device(3 * MIB),
        Err(MemDeviceError::Device { node: 0, .. })
    ));
}

mod slots {
    use std::sync::Arc;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_mem::{
        BlockRange, MemBackend, Request, ResponseType, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::super::*;
    use crate::config::DEFAULT_REGION_SIZE as REGION_SIZE;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use crate::layout::MemoryLayout;
    use crate::memory::slots::tests::{protection, Recorder};
    use crate::memory::slots::{SlotState, SlotTable};
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;
    const BS: u64 = 2 * MIB;
    const BASE: u64 = 1 << 32;
    const REGION_BLOCKS: u64 = REGION_SIZE / BS;

    /// A node with 3 hotplug regions, its device managing their slots over a recorder.
    struct Rig {
        ram: GuestRam,
        kvm: Arc<Recorder>,
        dev: MemDevice,
    }

    fn rig() -> Rig {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[3 * REGION_SIZE]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let kvm = Recorder::new();
        let table = SlotTable::new(kvm.clone(), &ram).unwrap();
        kvm.take();
        let dev = MemDevice::with_slots(
            &layout.hotplug[0],
            &ram.node_files[0],
            3 * REGION_SIZE,
            Some(table.node(0)),
        )
        .unwrap();
        Rig { ram, kvm, dev }
    }

    impl Rig {
        fn request(&mut self, req: Request) -> ResponseType {
            self.dev.model_mut().execute(&req).kind
        }

        fn plug(&mut self, block: u64, nb_blocks: u16) -> ResponseType {
            self.request(Request::Plug(range(block, nb_blocks)))
        }

        fn unplug(&mut self, block: u64, nb_blocks: u16) -> ResponseType {
            self.request(Request::Unplug(range(block, nb_blocks)))
        }

        fn states(&self) -> Vec<SlotState> {
            let slots = self.dev.model().backend().slots().unwrap();
            (0..3).map(|r| slots.state(r).unwrap()).collect()
        }

        fn protection(&self, region: usize) -> String {
            protection(self.ram.hotplug[region].mapping.as_ptr())
        }

        /// The host protection of device block `block` of the node.
        fn block_protection(&self, block: u64) -> String {
            let region = (block / REGION_BLOCKS) as usize;
            let offset = (block % REGION_BLOCKS * BS) as usize;
            protection(
                self.ram.hotplug[region]
                    .mapping
                    .as_ptr()
                    .wrapping_add(offset),
            )
        }
    }

    fn range(block: u64, nb_blocks: u16) -> BlockRange {
        BlockRange {
            addr: BASE + block * BS,
            nb_blocks,
        }
    }

    fn region_addr(region: u64) -> u64 {
        BASE + region * REGION_SIZE
    }

    use SlotState::{Present as P, Removed as R};

    #[test]
    fn regions_follow_plugs_and_unplugs() {
        let mut rig = rig();
        assert_eq!(rig.states(), [R, R, R]);
        // One block of a removed region: its slot comes back before the ACK.
        assert_eq!(rig.plug(REGION_BLOCKS + 5, 1), ResponseType::Ack);
        assert_eq!(rig.states(), [R, P, R]);
        assert_eq!(rig.kvm.take(), [(2, region_addr(1), REGION_SIZE)]);
        assert_eq!(rig.block_protection(REGION_BLOCKS + 5), "rw-s");
        assert_eq!(
            rig.block_protection(REGION_BLOCKS + 4),
            "---s",
            "only the plug"
        );
        // A partial plug of region 0, then one of its two blocks unplugged: the region
        // stays, the block is closed after the round.
        assert_eq!(rig.plug(0, 2), ResponseType::Ack);
        assert_eq!(rig.unplug(1, 1), ResponseType::Ack);
        assert_eq!(
            rig.block_protection(1),
            "rw-s",
            "not in the middle of a round"
        );
        rig.dev.close_unplugged();
        assert_eq!(rig.states(), [P, P, R]);
        assert_eq!(rig.kvm.take(), [(1, region_addr(0), REGION_SIZE)]);
        assert_eq!(
            (rig.block_protection(0), rig.block_protection(1)),
            ("rw-s".into(), "---s".into())
        );
        // Its last block unplugged: the region goes after the round.
        assert_eq!(rig.unplug(0, 1), ResponseType::Ack);
        assert_eq!(rig.states(), [P, P, R], "not in the middle of a round");
        rig.dev.close_unplugged();
        assert_eq!(rig.states(), [R, P, R]);
        assert_eq!(rig.kvm.take(), [(1, region_addr(0), 0)]);
        assert_eq!(rig.protection(0), "---s");
        // A plug across the border of regions 1 and 2 brings region 2 back too.
        assert_eq!(rig.plug(2 * REGION_BLOCKS - 1, 2), ResponseType::Ack);
        assert_eq!(rig.states(), [R, P, P]);
        assert_eq!(rig.kvm.take(), [(3, region_addr(2), REGION_SIZE)]);
        // A refused plug (already plugged: ERROR) restores nothing.
        assert_eq!(rig.plug(0, 1), ResponseType::Ack);
        rig.kvm.take();
        rig.dev.close_unplugged();
        assert_eq!(rig.plug(0, 1), ResponseType::Error);
        assert!(rig.kvm.take().is_empty());
        // UNPLUG_ALL empties every region.
        assert_eq!(rig.request(Request::UnplugAll), ResponseType::Ack);
        rig.dev.close_unplugged();
        assert_eq!(rig.states(), [R, R, R]);
        assert_eq!(
            rig.kvm.take(),
            [
                (1, region_addr(0), 0),
                (2, region_addr(1), 0),
                (3, region_addr(2), 0)
            ]
        );
        assert_eq!(rig.dev.model().plugged_size(), 0);
    }

    /// With its release thread, the queue round only closes what the guest unplugged; the
    /// thread punches it, and a plug of the same block right after keeps what the guest
    /// writes there.
    #[test]
    fn unplugged_blocks_are_punched_off_the_loop_and_a_replug_keeps_its_data() {
        use virtio_mem::MemBackend;
        let mut rig = rig();
        rig.dev
            .start_releasing(|work| {
                std::thread::spawn(work);
                Ok(())
            })
            .unwrap();
        let host = rig.ram.hotplug[0].mapping.as_ptr();
        let fill = |block: u64, byte: u8| {
            // SAFETY: the block is plugged, so open (mapped read-write), and inside the
            // region's mapping, which the rig keeps alive.
            unsafe { std::ptr::write_bytes(host.add((block * BS) as usize), byte, BS as usize) };
        };
        assert_eq!(rig.plug(0, 4), ResponseType::Ack);
        (0..4).for_each(|b| fill(b, 0xab));
        assert_eq!(rig.unplug(0, 2), ResponseType::Ack);
        rig.dev.close_unplugged();
        assert_eq!(rig.plug(0, 1), ResponseType::Ack);
        fill(0, 0xcd);
        let measurer = rig.dev.model().backend().measurer().unwrap();
        assert_eq!(measurer.resident_bytes(0, 4 * BS).unwrap(), 3 * BS);
        assert_eq!(
            measurer.resident_bytes(BS, BS).unwrap(),
            0,
            "block 1 punched"
        );
        assert_eq!(
            (rig.block_protection(0), rig.block_protection(1)),
            ("rw-s".into(), "---s".into()),
            "block 1 shut, block 0 plugged again"
        );
        // SAFETY: block 0 is plugged again, so mapped read-write.
        let back = unsafe { std::slice::from_raw_parts(host, BS as usize) };
        assert!(back.iter().all(|&b| b == 0xcd), "the plug's data survives");
    }

    #[test]
    fn a_slot_kvm_refuses_makes_the_plug_busy() {
        let mut rig = rig();
        *rig.kvm.fail_slot.lock().unwrap() = Some(1);
        assert_eq!(rig.plug(3, 1), ResponseType::Busy);
        assert_eq!(rig.dev.model().plugged_size(), 0);
        assert_eq!(rig.states(), [R, R, R]);
        assert_eq!(rig.protection(0), "---s");
        *rig.kvm.fail_slot.lock().unwrap() = None;
        assert_eq!(rig.plug(3, 1), ResponseType::Ack, "the guest's retry works");
        assert_eq!(rig.states(), [P, R, R]);
    }

    #[test]
    fn a_driver_that_may_read_unplugged_memory_is_refused_and_no_slot_changes() {
        let mut rig = rig();
        let old_driver = 1 << VIRTIO_F_VERSION_1;
        let refused = rig.dev.ack_features(old_driver).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "virtio-mem of node 0: the driver did not accept \
             VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (feature bit 1) and it may read unplugged \
             memory, which mempower releases: FEATURES_OK refused, the device stays unusable \
             for this driver"
        );
        assert_eq!(rig.dev.model().acked_features(), 0);
        assert_eq!(rig.states(), [R, R, R], "nothing was mapped for it");
        assert!(rig.kvm.take().is_empty());
        // A newer driver (after a reset or a reboot) is served.
        let new_driver = old_driver | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        rig.dev.ack_features(new_driver).unwrap();
        assert_eq!(rig.dev.model().acked_features(), new_driver);
        assert_eq!(rig.plug(0, 1), ResponseType::Ack);
        assert_eq!(rig.states(), [P, R, R]);
    }

    /// FEATURES_OK is set on a vCPU thread. Under that thread's real filter (kill mode), an
    /// old driver is refused and the VMM lives on. With /dev/kvm the slots are KVM's own,
    /// so a slot ioctl there would be trapped; without it, a recorder stands in.
    #[test]
    fn an_old_driver_is_refused_on_a_filtered_vcpu_thread() {
        const SURVIVED: &str = "mem-test: the filtered vCPU thread survived";
        if crate::test_child::scenario().is_some() {
            refuse_on_a_filtered_vcpu_thread();
            println!("{SURVIVED}");
            return;
        }
        let output = crate::test_child::run(
            "devices::virtio::mem::tests::slots::an_old_driver_is_refused_on_a_filtered_vcpu_thread",
            "vcpu",
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(SURVIVED),
            "{}",
            crate::test_child::show(&output)
        );
    }

    /// The child's side: a node's device behind its transport, driven from a vCPU thread.
    fn refuse_on_a_filtered_vcpu_thread() {
        use crate::devices::virtio::mmio::MmioTransport;
        use crate::devices::virtio::test_utils::{negotiate, w, V1};
        use crate::memory::slots::KvmSlots;
        use crate::seccomp::{self, SeccompMode, ThreadKind};
        use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK;
        use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

        crate::test_child::no_core_dumps();
        let kvm: Arc<dyn KvmSlots> = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Arc::new(kvm.create_vm().unwrap()),
            Err(_) => {
                println!("mem-test: no /dev/kvm, a recorder stands in for KVM's slots");
                Recorder::new()
            }
        };
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[3 * REGION_SIZE]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let table = SlotTable::new(kvm, &ram).unwrap();
        let node = table.node(0);
        let dev = MemDevice::with_slots(
            &layout.hotplug[0],
            &ram.node_files[0],
            3 * REGION_SIZE,
            Some(node.clone()),
        )
        .unwrap();
        let mut t = MmioTransport::new(Arc::new(std::sync::Mutex::new(dev)), table.view()).unwrap();
        seccomp::prepare(SeccompMode::Kill).unwrap();
        // No console log: the vCPU's file calls are refused on every descriptor.
        seccomp::restrict_to_files(ThreadKind::Vcpu, &[]).unwrap();
        std::thread::spawn(move || {
            seccomp::apply(ThreadKind::Vcpu).unwrap();
            assert_eq!(
                negotiate(&mut t, V1) & FEATURES_OK,
                0,
                "an old driver is refused"
            );
            w(&mut t, VIRTIO_MMIO_STATUS, 0);
            let new_driver = V1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
            assert_ne!(negotiate(&mut t, new_driver) & FEATURES_OK, 0);
        })
        .join()
        .unwrap();
        let states: Vec<_> = (0..3).map(|r| node.state(r).unwrap()).collect();
        assert_eq!(states, [R, R, R], "no region was mapped");
    }

    /// The guest's side of the request queue, in boot memory (which stays present).
    struct Driver {
        vq: MockSplitQueue<'static, GuestMemoryMmap>,
        mem: &'static GuestMemoryMmap,
        /// The next free descriptor (chains are never reused: a test sends few).
        next: u16,
    }

    const QSIZE: u16 = 16;
    const RING: u64 = 0x10000;
    const USED: u64 = 0x20000;
    const REQ: u64 = 0x30000;
    const RESP: u64 = 0x31000;

    impl Driver {
        fn queue(&self) -> Queue {
            let mut q: Queue = self.vq.create_queue().unwrap();
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q
        }

        /// Publishes a chain: a request at `req`, a response buffer at `resp`.
        fn send(&mut self, req: u64, request: Option<Request>, resp: u64) {
            if let Some(request) = request {
                self.mem
                    .write_slice(&request.to_bytes(), GuestAddress(req))
                    .unwrap();
            }
            let chain = [
                SplitDescriptor::new(req, 24, VRING_DESC_F_NEXT as u16, self.next + 1),
                SplitDescriptor::new(resp, 10, VRING_DESC_F_WRITE as u16, 0),
            ]
            .map(RawDescriptor::from);
            self.vq.add_desc_chains(&chain, self.next).unwrap();
            self.next += 2;
        }

        /// The used length of chain `n` (0-based, in order).
        fn used_len(&self, n: u16) -> u32 {
            let at = USED + 4 + u64::from(n % QSIZE) * 8 + 4;
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn response(&self) -> u16 {
            self.mem.read_obj(GuestAddress(RESP)).unwrap()
        }
    }

    #[test]
    fn requests_pointing_into_a_removed_region_are_refused_untouched() {
        let mut rig = rig();
        let boot: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_arc_regions(rig.ram.boot.clone()).unwrap(),
        ));
        let mut driver = Driver {
            vq: MockSplitQueue::create(boot, GuestAddress(RING), QSIZE),
            mem: boot,
            next: 0,
        };
        let view = rig.dev.model().backend().slots().unwrap().view();
        let features = rig.dev.features();
        rig.dev.ack_features(features).unwrap();
        let ctx = ActivateContext {
            mem: view,
            queues: vec![driver.queue()],
            queue_events: vec![],
            interrupt: Interrupt::new().unwrap(),
            acked_features: features,
        };
        rig.dev.activate(ctx).unwrap();
        // Region 1 is removed: its host mapping is PROT_NONE, so a device that touched it
        // would kill this test with SIGSEGV.
        assert_eq!(rig.protection(1), "---s");
        let removed = region_addr(1) + 0x1000;
        // 1. The request itself lies in the removed region.
        driver.send(removed, None, RESP);
        // 2. A valid request whose response buffer lies there.
        driver.send(REQ, Some(Request::State(range(0, 1))), removed);
        // 3. A valid plug, answered in boot memory.
        driver.send(REQ, Some(Request::Plug(range(0, 1))), RESP);
        rig.dev.process_queue();
        assert_eq!(driver.used_idx(), 3, "every chain is returned");
        assert_eq!(
            driver.used_len(0),
            10,
            "an ERROR for the unreadable request"
        );
        assert_eq!(
            driver.used_len(1),
            0,
            "no response written into the removed region"
        );
        assert_eq!((driver.used_len(2), driver.response()), (10, 0), "ACK");
        assert_eq!(rig.states(), [P, R, R]);
        assert_eq!(rig.protection(1), "---s");
        let resident = rig
            .dev
            .model()
            .backend()
            .resident_bytes(REGION_SIZE, REGION_SIZE);
        assert_eq!(
            resident.unwrap(),
            0,
            "no host memory for the removed region"
        );
        // The round that unplugs the block removes region 0 again.
        driver.send(REQ, Some(Request::Unplug(range(0, 1))), RESP);
        rig.dev.process_queue();
        assert_eq!((driver.used_len(3), driver.response()), (10, 0), "ACK");
        assert_eq!(rig.states(), [R, R, R]);
    }

    /// Free 2 MiB huge pages on the host, for tests that need a few.
    fn free_huge_pages() -> u64 {
        crate::host_numa::free_huge_pages_total().unwrap_or(0)
    }

    /// A huge-page node: 4 MiB of boot memory and `regions` hotplug regions, all of them
    /// requested, its device managing their slots over a recorder.
    struct HugeRig {
        layout: MemoryLayout,
        ram: GuestRam,
        table: Arc<SlotTable>,
        dev: MemDevice,
    }

    fn huge_rig(regions: u64) -> HugeRig {
        let layout = MemoryLayout::with_hotplug(&[4 * MIB], &[regions * REGION_SIZE]).unwrap();
        let node = crate::config::NodeConfig {
            hugepages: true,
            ..Default::default()
        };
        let topology = crate::host_numa::HostTopology::system();
        let ram = GuestRam::with_nodes(&layout, &[node], &topology).unwrap();
        let table = SlotTable::new(Recorder::new(), &ram).unwrap();
        let dev = MemDevice::for_node(
            &layout.hotplug[0],
            &ram.node_files[0],
            regions * REGION_SIZE,
            Some(table.node(0)),
            true,
        )
        .unwrap();
        HugeRig {
            layout,
            ram,
            table,
            dev,
        }
    }

    #[test]
    #[ignore = "needs 4 to 1024 free 2 MiB huge pages (vm.nr_hugepages); run with --ignored huge_page"]
    fn a_plug_beyond_the_huge_page_pool_is_busy_and_keeps_nothing() {
        let free = free_huge_pages();
        assert!(
            (4..=1024).contains(&free),
            "this test needs 4 to 1024 free 2 MiB huge pages, the host has {free}"
        );
        // More blocks than the pool has pages, with a margin for other tests giving
        // theirs back meanwhile (they hold at most 8).
        let want = free + 64;
        let regions = (want * BS).div_ceil(REGION_SIZE);
        // The whole rig stays alive: the device's slots map the rig's memory.
        let mut rig = huge_rig(regions);
        let dev = &mut rig.dev;
        let request = Request::Plug(range(0, u16::try_from(want).unwrap()));
        assert_eq!(dev.model_mut().execute(&request).kind, ResponseType::Busy);
        assert_eq!(dev.model().plugged_size(), 0);
        // The pages the plug took before the pool ran dry went back to it.
        let held: u64 = (0..regions)
            .map(|r| {
                let backend = dev.model().backend();
                backend
                    .resident_bytes(r * REGION_SIZE, REGION_SIZE)
                    .unwrap()
            })
            .sum();
        assert_eq!(held, 0);
        assert!(free_huge_pages() + 8 >= free, "the pool got its pages back");
        // The guest's next, smaller plug works.
        let one = Request::Plug(range(0, 1));
        assert_eq!(dev.model_mut().execute(&one).kind, ResponseType::Ack);
    }

    #[test]
    #[ignore = "needs 8 free 2 MiB huge pages (vm.nr_hugepages); run with --ignored huge_page"]
    fn huge_page_plugs_allocate_and_resident_bytes_count_them() {
        let free = free_huge_pages();
        assert!(
            free >= 8,
            "this test needs 8 free 2 MiB huge pages, the host has {free}"
        );
        let HugeRig {
            layout,
            ram,
            table,
            mut dev,
        } = huge_rig(2);
        let backend = |dev: &MemDevice, region: u64| {
            dev.model()
                .backend()
                .resident_bytes(region * REGION_SIZE, REGION_SIZE)
                .unwrap()
        };
        // hugetlbfs has no SEEK_DATA: the memfd's own measure calls it all resident.
        let memfd = virtio_mem::MemfdBackend::new(
            ram.node_files[0].try_clone().unwrap(),
            layout.hotplug[0].file_offset,
            2 * REGION_SIZE,
        )
        .unwrap();
        assert_eq!(memfd.resident_bytes(0, REGION_SIZE).unwrap(), REGION_SIZE);
        assert_eq!((backend(&dev, 0), backend(&dev, 1)), (0, 0));
        // A plug allocates its huge pages before it is acknowledged, untouched or not.
        let plugged = dev.model_mut().execute(&Request::Plug(range(0, 3))).kind;
        assert_eq!(plugged, ResponseType::Ack);
        assert_eq!((backend(&dev, 0), backend(&dev, 1)), (3 * BS, 0));
        // The boot memory (2 pages) and the plugged blocks, in the file's blocks too.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&ram.node_files[0].metadata().unwrap());
        assert_eq!(blocks * 512, 4 * MIB + 3 * BS);
        let data = GuestAddress(BASE + 2 * BS + 5);
        table.memory().write_obj(0x5a5a_u32, data).unwrap();
        // Unplugging block 1 gives exactly its huge page back; block 2's data stays.
        assert_eq!(
            dev.model_mut().execute(&Request::Unplug(range(1, 1))).kind,
            ResponseType::Ack
        );
        assert_eq!(backend(&dev, 0), 2 * BS);
        assert_eq!(table.memory().read_obj::<u32>(data).unwrap(), 0x5a5a);
        assert!(dev
            .model()
            .backend()
            .resident_bytes(REGION_SIZE, REGION_SIZE + 1)
            .is_err());
        // Blocks that are not whole huge pages are refused.
        let mut odd = layout.hotplug[0];
        odd.file_offset += 4096;
        assert!(matches!(
            MemDevice::for_node(&odd, &ram.node_files[0], 0, None, true),
            Err(MemDeviceError::HugePageAlignment { node: 0, .. })
        ));
    }
}
