//! The balloon in the VMM: what its guard lets it discard (boot memory and plugged
//! virtio-mem blocks only), and the device driven through its `VirtioDevice` side by a
//! driver playing the guest.

// Lists of allowed parts often hold a single range.
#![allow(clippy::single_range_in_vec_init)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use virtio_balloon::stats::{encode, S_MEMFREE};
use virtio_balloon::testing::DriverQueue;
use virtio_balloon::{BalloonBackend, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::{INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING, VIRTIO_F_VERSION_1};
use crate::memory::GuestRam;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const HOTPLUG: u64 = 1 << 32;
const BOOT: u64 = 64 * MIB;

/// One node: 64 MiB of boot memory and a 128 MiB virtio-mem region at 4 GiB, whose
/// blocks 0, 1 and 3 (2 MiB each) are plugged and block 2 is not.
struct Vm {
    ram: GuestRam,
    layout: MemoryLayout,
    mem_device: Arc<Mutex<MemDevice>>,
}

fn vm() -> Vm {
    let layout = MemoryLayout::with_hotplug(&[BOOT], &[128 * MIB]).unwrap();
    let ram = GuestRam::new(&layout, 1).unwrap();
    let mut dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 6 * MIB).unwrap();
    for (addr, nb_blocks) in [(HOTPLUG, 2), (HOTPLUG + 6 * MIB, 1)] {
        let plug = virtio_mem::Request::Plug(virtio_mem::BlockRange { addr, nb_blocks });
        assert_eq!(
            dev.model_mut().execute(&plug).kind,
            virtio_mem::ResponseType::Ack
        );
    }
    Vm {
        ram,
        layout,
        mem_device: Arc::new(Mutex::new(dev)),
    }
}

impl Vm {
    fn guard(&self) -> PluggedRam {
        PluggedRam::new(&self.layout, &[Some(self.mem_device.clone())])
    }

    fn balloon(&self, params: BalloonParams) -> BalloonDevice {
        BalloonDevice::new(params, &self.ram.memory, self.guard(), 0).unwrap()
    }

    /// Host-resident bytes of the node's memfd behind `range`.
    fn resident(&self, dev: &BalloonDevice, range: Range<u64>) -> u64 {
        dev.model().backend().resident_bytes(range).unwrap()
    }

    fn write(&self, addr: u64, len: u64) {
        self.ram
            .memory
            .write_slice(&vec![0x5a; len as usize], GuestAddress(addr))
            .unwrap();
    }
}

fn allowed(guard: &PluggedRam, range: Range<u64>) -> Vec<Range<u64>> {
    let mut parts = Vec::new();
    guard.allowed_parts(range, &mut |p| parts.push(p));
    parts.sort_by_key(|p| p.start);
    parts
}

#[test]
fn the_guard_allows_boot_memory_and_plugged_blocks_only() {
    let vm = vm();
    let g = vm.guard();
    assert_eq!(allowed(&g, 60 * MIB..68 * MIB), [60 * MIB..BOOT]);
    assert_eq!(
        allowed(&g, HOTPLUG - PAGE..HOTPLUG + 10 * MIB),
        [
            HOTPLUG..HOTPLUG + 4 * MIB,
            HOTPLUG + 6 * MIB..HOTPLUG + 8 * MIB
        ]
    );
    // Inside one block, and across the unplugged one.
    assert_eq!(
        allowed(&g, HOTPLUG + PAGE..HOTPLUG + 2 * PAGE),
        [HOTPLUG + PAGE..HOTPLUG + 2 * PAGE]
    );
    assert_eq!(
        allowed(&g, HOTPLUG + 3 * MIB..HOTPLUG + 7 * MIB),
        [
            HOTPLUG + 3 * MIB..HOTPLUG + 4 * MIB,
            HOTPLUG + 6 * MIB..HOTPLUG + 7 * MIB
        ]
    );
    for refused in [
        HOTPLUG + 4 * MIB..HOTPLUG + 6 * MIB,
        HOTPLUG + 8 * MIB..HOTPLUG + 128 * MIB,
        HOTPLUG + 128 * MIB..u64::MAX,
        BOOT..HOTPLUG,
    ] {
        assert_eq!(allowed(&g, refused.clone()), [], "{refused:#x?}");
    }
    // What the guest unplugs later is refused from then on.
    let unplug = virtio_mem::Request::Unplug(virtio_mem::BlockRange {
        addr: HOTPLUG,
        nb_blocks: 1,
    });
    vm.mem_device.lock().unwrap().model_mut().execute(&unplug);
    assert_eq!(
        allowed(&g, HOTPLUG..HOTPLUG + 4 * MIB),
        [HOTPLUG + 2 * MIB..HOTPLUG + 4 * MIB]
    );
    // A region whose device is missing is refused whole.
    let blind = PluggedRam::new(&vm.layout, &[None]);
    assert_eq!(allowed(&blind, HOTPLUG..HOTPLUG + 4 * MIB), []);
    assert_eq!(allowed(&blind, 0..PAGE), [0..PAGE]);
}

/// The driver's side: queues at 1 MiB + 64 KiB steps, buffers at 2 MiB + 64 KiB steps.
fn bring_up<'a>(
    vm: &'a Vm,
    dev: &mut BalloonDevice,
    features: u64,
) -> (Vec<DriverQueue<'a>>, Interrupt) {
    dev.ack_features(features).unwrap();
    let queues: Vec<DriverQueue<'a>> = (0..dev.queues_needed(features))
        .map(|q| DriverQueue::new(&vm.ram.memory, MIB + q as u64 * 0x10000, 128))
        .collect();
    let interrupt = Interrupt::new().unwrap();
    dev.activate(ActivateContext {
        mem: vm_memory::GuestMemoryAtomic::new(vm.ram.memory.clone()),
        queues: queues.iter().map(DriverQueue::queue).collect(),
        queue_events: Vec::new(),
        interrupt: interrupt.clone(),
        acked_features: features,
    })
    .unwrap();
    (queues, interrupt)
}

fn buffer(q: usize) -> u64 {
    2 * MIB + q as u64 * 0x10000
}

fn inflate(vm: &Vm, dev: &mut BalloonDevice, queues: &[DriverQueue<'_>], pfns: &[u32]) {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    vm.ram
        .memory
        .write_slice(&bytes, GuestAddress(buffer(0)))
        .unwrap();
    queues[0].add_chain(&[(buffer(0), bytes.len() as u32, false)]);
    dev.process_queue(0);
}

const V1: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn inflation_and_reports_discard_only_what_the_guard_allows() {
    let vm = vm();
    let mut dev = vm.balloon(BalloonParams {
        free_page_reporting: true,
        ..Default::default()
    });
    let features = V1 | 1 << VIRTIO_BALLOON_F_REPORTING;
    assert_eq!(
        dev.queues_needed(features),
        3,
        "inflate, deflate, reporting"
    );
    assert_eq!(dev.queues_needed(V1), 2);
    let (queues, interrupt) = bring_up(&vm, &mut dev, features);
    assert!(dev.driver_ready());

    let boot_page = 32 * MIB;
    let plugged = HOTPLUG + PAGE;
    let unplugged = HOTPLUG + 4 * MIB + PAGE;
    for addr in [boot_page, plugged, unplugged] {
        vm.write(addr, PAGE);
    }
    // Rings and buffers live below 4 MiB: watch the rest.
    let watched = 4 * MIB..u64::MAX;
    assert_eq!(vm.resident(&dev, watched.clone()), 3 * PAGE);
    let pfn = |addr: u64| (addr / PAGE) as u32;
    let beyond = pfn(HOTPLUG + 200 * MIB);
    inflate(
        &vm,
        &mut dev,
        &queues,
        &[pfn(boot_page), pfn(plugged), pfn(unplugged), beyond],
    );
    assert_eq!(interrupt.status(), INTERRUPT_USED_RING);
    assert_eq!(queues[0].last_used().0, 1, "the buffer went back");
    // The unplugged block keeps its (stale) page: the balloon never touches it.
    assert_eq!(vm.resident(&dev, watched), PAGE);
    assert_eq!(vm.resident(&dev, unplugged..unplugged + PAGE), PAGE);
    assert_eq!(dev.inflated_bytes(), 2 * PAGE);
    let m = dev.model().metrics().snapshot();
    assert_eq!(
        (m.inflated_bytes, m.discarded_bytes, m.rejected_bytes),
        (2 * PAGE, 2 * PAGE, 2 * PAGE)
    );

    // A report of plugged block 3 and of unplugged block 2: only block 3 goes.
    vm.write(HOTPLUG + 4 * MIB, 4 * MIB);
    queues[2].add_chain(&[
        (HOTPLUG + 6 * MIB, 2 * MIB as u32, true),
        (HOTPLUG + 4 * MIB, 2 * MIB as u32, true),
    ]);
    dev.process_queue(2);
    assert_eq!(queues[2].last_used().0, 1);
    assert_eq!(
        vm.resident(&dev, HOTPLUG + 4 * MIB..HOTPLUG + 8 * MIB),
        2 * MIB
    );
    let m = dev.model().metrics().snapshot();
    assert_eq!(
        (m.reported_bytes, m.discarded_bytes),
        (2 * MIB, 2 * PAGE + 2 * MIB)
    );
    // Kicks of a queue the features do not use, or before activation, do nothing.
    dev.process_queue(3);
    dev.reset();
    assert!(!dev.driver_ready());
    dev.process_queue(0);
}

#[test]
fn pages_of_a_block_unplugged_later_leave_the_balloon() {
    let vm = vm();
    let mut dev = vm.balloon(BalloonParams::default());
    let (queues, _interrupt) = bring_up(&vm, &mut dev, V1);
    let pfn = |addr: u64| (addr / PAGE) as u32;
    let block0 = [HOTPLUG + PAGE, HOTPLUG + 2 * PAGE];
    let block1 = HOTPLUG + 2 * MIB + PAGE;
    let boot_page = 32 * MIB;
    let pages: Vec<u32> = block0
        .iter()
        .chain([&block1, &boot_page])
        .map(|&a| pfn(a))
        .collect();
    inflate(&vm, &mut dev, &queues, &pages);
    assert_eq!(dev.inflated_bytes(), 4 * PAGE);

    // The guest unplugs block 0 without deflating its pages first: they are gone from
    // the guest, and from the balloon.
    let block = |addr| virtio_mem::BlockRange { addr, nb_blocks: 1 };
    let execute = |request| {
        vm.mem_device
            .lock()
            .unwrap()
            .model_mut()
            .execute(&request)
            .kind
    };
    let unplug = virtio_mem::Request::Unplug(block(HOTPLUG));
    assert_eq!(execute(unplug), virtio_mem::ResponseType::Ack);
    assert_eq!(dev.inflated_bytes(), 2 * PAGE);
    let m = dev.model().metrics().snapshot();
    assert_eq!(m.unplugged_bytes, 2 * PAGE);

    // Plugged again, the block is fresh memory: one of its pages inflated now is new.
    let plug = virtio_mem::Request::Plug(block(HOTPLUG));
    assert_eq!(execute(plug), virtio_mem::ResponseType::Ack);
    inflate(&vm, &mut dev, &queues, &[pfn(block0[0])]);
    assert_eq!(dev.inflated_bytes(), 3 * PAGE);
    let m = dev.model().metrics().snapshot();
    assert_eq!((m.inflated_bytes, m.reinflated_bytes), (5 * PAGE, 0));

    // Unplugs nobody takes (a VM without a balloon) stay merged, however many.
    for _ in 0..3 {
        let unplug = virtio_mem::Request::Unplug(virtio_mem::BlockRange {
            addr: HOTPLUG,
            nb_blocks: 2,
        });
        assert_eq!(execute(unplug), virtio_mem::ResponseType::Ack);
        let plug = virtio_mem::Request::Plug(block(HOTPLUG + 2 * MIB));
        assert_eq!(execute(plug), virtio_mem::ResponseType::Ack);
        let plug = virtio_mem::Request::Plug(block(HOTPLUG));
        assert_eq!(execute(plug), virtio_mem::ResponseType::Ack);
    }
    let unplugged = vm.mem_device.lock().unwrap().take_unplugged();
    assert_eq!(unplugged, [HOTPLUG..HOTPLUG + 4 * MIB]);
    assert_eq!(vm.mem_device.lock().unwrap().take_unplugged(), []);
}

#[test]
fn the_target_is_checked_against_guest_ram_and_announced() {
    let vm = vm();
    let mut dev = vm.balloon(BalloonParams::default());
    let ram = BOOT + 6 * MIB;
    let err = dev.set_target_bytes(ram + PAGE, ram).unwrap_err();
    assert!(
        matches!(err, BalloonError::TargetAboveRam { target, ram: r } if target == ram + PAGE && r == ram),
        "{err}"
    );
    assert!(matches!(
        dev.set_target_bytes(PAGE + 1, ram),
        Err(BalloonError::Device(
            virtio_balloon::Error::TargetNotPageAligned(_)
        ))
    ));
    assert_eq!(dev.model().target_bytes(), 0, "refusals change nothing");
    // Before the driver is up: recorded, no interrupt to raise.
    dev.set_target_bytes(8 * MIB, ram).unwrap();
    let (_queues, interrupt) = bring_up(&vm, &mut dev, V1);
    let mut num_pages = [0u8; 4];
    dev.read_config(0, &mut num_pages);
    assert_eq!(u32::from_le_bytes(num_pages), (8 * MIB / PAGE) as u32);
    dev.set_target_bytes(16 * MIB, ram).unwrap();
    assert_eq!(interrupt.status(), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(dev.model().target_bytes(), 16 * MIB);
    // The initial target is checked as any other.
    assert!(BalloonDevice::new(BalloonParams::default(), &vm.ram.memory, vm.guard(), 3).is_err());
}

#[test]
fn stats_are_polled_through_the_held_buffer() {
    let vm = vm();
    let params = BalloonParams {
        stats_interval: Some(Duration::from_millis(20)),
        ..Default::default()
    };
    let mut dev = vm.balloon(params);
    let features = V1 | 1 << VIRTIO_BALLOON_F_STATS_VQ;
    // Linux primes the stats queue before DRIVER_OK: activation kicks every queue.
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let mut primed = vm.balloon(params);
    primed.ack_features(features).unwrap();
    let driver: Vec<DriverQueue<'_>> = (0..3)
        .map(|q| DriverQueue::new(&vm.ram.memory, MIB + q as u64 * 0x10000, 128))
        .collect();
    primed
        .activate(ActivateContext {
            mem: vm_memory::GuestMemoryAtomic::new(vm.ram.memory.clone()),
            queues: driver.iter().map(DriverQueue::queue).collect(),
            queue_events: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: Interrupt::new().unwrap(),
            acked_features: features,
        })
        .unwrap();
    for kick in &kicks {
        assert_eq!(kick.read().unwrap(), 1);
    }

    let (queues, _irq) = bring_up(&vm, &mut dev, features);
    let stats = encode(&[(S_MEMFREE, 77 * MIB)]);
    vm.ram
        .memory
        .write_slice(&stats, GuestAddress(buffer(2)))
        .unwrap();
    queues[2].add_chain(&[(buffer(2), stats.len() as u32, false)]);
    dev.process_queue(2);
    assert_eq!(
        dev.model().last_stats().unwrap().stats.free_memory,
        Some(77 * MIB)
    );
    assert_eq!(queues[2].last_used().0, 0, "held until the host asks");
    dev.request_stats();
    assert_eq!(queues[2].last_used().0, 1);
    dev.request_stats();
    assert_eq!(queues[2].last_used().0, 1, "nothing held: nothing to give");

    // The handler's timer fires at the device's interval.
    let device = Arc::new(Mutex::new(dev));
    let mut handler = BalloonHandler::new(device, Vec::new()).unwrap();
    let timer = handler.timer.as_mut().expect("a stats timer");
    assert!(timer.wait().unwrap() >= 1);
    let plain = vm.balloon(BalloonParams::default());
    let handler = BalloonHandler::new(Arc::new(Mutex::new(plain)), Vec::new()).unwrap();
    assert!(handler.timer.is_none());
}

#[test]
fn a_guest_cannot_name_memory_of_another_file() {
    // The memfd behind the region keeps data the guest wrote outside what it named.
    let vm = vm();
    let mut dev = vm.balloon(BalloonParams::default());
    let (queues, _irq) = bring_up(&vm, &mut dev, V1);
    vm.write(HOTPLUG, 4 * MIB);
    let pfns: Vec<u32> = (0..16)
        .map(|i| ((HOTPLUG + MIB) / PAGE) as u32 + i)
        .collect();
    inflate(&vm, &mut dev, &queues, &pfns);
    let mut byte = [0u8; 1];
    let file = &vm.ram.node_files[0];
    // The region follows the node's 64 MiB of boot memory in its memfd.
    file.read_exact_at(&mut byte, BOOT + MIB - 1).unwrap();
    assert_eq!(byte, [0x5a]);
    file.read_exact_at(&mut byte, BOOT + MIB).unwrap();
    assert_eq!(byte, [0]);
    file.read_exact_at(&mut byte, BOOT + MIB + 16 * PAGE)
        .unwrap();
    assert_eq!(byte, [0x5a]);
    assert_eq!(
        vm.resident(&dev, HOTPLUG..HOTPLUG + 4 * MIB),
        4 * MIB - 16 * PAGE
    );
}

#[test]
fn an_unusable_queue_asks_the_driver_for_a_reset() {
    let vm = vm();
    let mut dev = vm.balloon(BalloonParams::default());
    let (queues, irq) = bring_up(&vm, &mut dev, V1);
    // The avail ring announces more chains than the queue holds.
    queues[0].set_avail_idx(1000);
    dev.process_queue(0);
    assert!(irq.needs_reset());
    assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(irq.irqfd().read().unwrap(), 1, "one interrupt");
    assert!(!dev.driver_ready());
    // The device serves nothing more, on any queue: no interrupt, no discard.
    let page = HOTPLUG + PAGE;
    vm.write(page, PAGE);
    queues[0].set_avail_idx(0);
    inflate(&vm, &mut dev, &queues, &[(page / PAGE) as u32]);
    dev.process_queue(1);
    assert!(
        irq.irqfd().read().is_err(),
        "no interrupt: the irqfd is empty"
    );
    assert_eq!(vm.resident(&dev, page..page + PAGE), PAGE);
    // After a reset and a fresh set-up the device runs again.
    dev.reset();
    let (queues, irq) = bring_up(&vm, &mut dev, V1);
    assert!(!irq.needs_reset());
    inflate(&vm, &mut dev, &queues, &[(page / PAGE) as u32]);
    assert_eq!(irq.status(), INTERRUPT_USED_RING);
    assert_eq!(vm.resident(&dev, page..page + PAGE), 0);
}
