use super::*;
use crate::config::DEFAULT_REGION_SIZE as REGION_SIZE;
use crate::layout::MemoryLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;

/// KVM as a list of (slot, guest address, size) calls; a slot can be made to fail.
#[derive(Default)]
pub(crate) struct Recorder {
    pub calls: Mutex<Vec<(u32, u64, u64)>>,
    pub fail_slot: Mutex<Option<u32>>,
    pub nr: usize,
}

impl KvmSlots for Recorder {
    fn nr_memslots(&self) -> usize {
        self.nr
    }

    unsafe fn set_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        _host_addr: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        if *self.fail_slot.lock().unwrap() == Some(slot) {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        self.calls.lock().unwrap().push((slot, guest_addr, size));
        Ok(())
    }
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder {
            nr: 32764,
            ..Default::default()
        })
    }

    pub fn take(&self) -> Vec<(u32, u64, u64)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

/// The permissions /proc/self/maps shows for the mapping at `addr`, e.g. "rw-s".
pub(crate) fn protection(addr: *const u8) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let addr = addr as u64;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        if (start..end).contains(&addr) {
            return perms.to_string();
        }
    }
    panic!("{addr:#x} is not mapped");
}

/// One node: 64 MiB of boot memory and three hotplug regions.
fn setup(kvm: Arc<dyn KvmSlots>) -> (GuestRam, Arc<SlotTable>) {
    let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[3 * REGION_SIZE]).unwrap();
    let ram = GuestRam::new(&layout, 1).unwrap();
    let table = SlotTable::new(kvm, &ram).unwrap();
    (ram, table)
}

fn base(ram: &GuestRam, region: usize) -> u64 {
    ram.hotplug[region].mapping.start_addr().0
}

fn in_view(table: &SlotTable, addr: u64) -> bool {
    table.memory().address_in_range(GuestAddress(addr))
}

#[test]
fn boot_memory_gets_slots_and_every_region_starts_removed() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    assert_eq!(kvm.take(), vec![(0, 0, 64 * MIB)]);
    let node = table.node(0);
    assert_eq!((node.regions(), node.region_size()), (3, REGION_SIZE));
    for region in 0..3 {
        assert_eq!(node.state(region), Some(SlotState::Removed));
        let h = &ram.hotplug[region as usize].mapping;
        assert_eq!(protection(h.as_ptr()), "---s");
        assert!(!in_view(&table, h.start_addr().0));
    }
    assert_eq!(node.state(3), None);
    assert!(in_view(&table, 0));
    assert_eq!(table.node(1).regions(), 0, "a node without hotplug memory");
}

fn host(ram: &GuestRam, region: usize, offset: u64) -> *mut u8 {
    ram.hotplug[region]
        .mapping
        .as_ptr()
        .wrapping_add(offset as usize)
}

/// Only `[start, end)` of the node's hotplug range stays plugged.
fn plugged(ranges: &[(u64, u64)]) -> Ranges {
    Ranges::of(ranges.iter().copied())
}

#[test]
fn a_plug_opens_exactly_its_blocks_and_restores_their_regions() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    kvm.take();
    let node = table.node(0);
    // One 2 MiB block at the end of region 1.
    let block = REGION_SIZE - 2 * MIB;
    assert_eq!(node.open_range(REGION_SIZE + block, 2 * MIB).unwrap(), 1);
    assert_eq!(kvm.take(), vec![(2, base(&ram, 1), REGION_SIZE)]);
    assert_eq!(node.state(0), Some(SlotState::Removed));
    assert_eq!(node.state(1), Some(SlotState::Present));
    assert_eq!(protection(host(&ram, 1, block)), "rw-s");
    assert_eq!(
        protection(host(&ram, 1, 0)),
        "---s",
        "the rest stays closed"
    );
    assert!(in_view(&table, base(&ram, 1) + block));
    assert!(!in_view(&table, base(&ram, 1)));
    // The devices' view reaches the block, and it is the node's file.
    table
        .memory()
        .write_obj(0xabu8, GuestAddress(base(&ram, 1) + block))
        .unwrap();
    // More of a present region opens it without a slot change; a range across the
    // border of regions 1 and 2 restores region 2 only.
    assert_eq!(node.open_range(REGION_SIZE, 2 * MIB).unwrap(), 0);
    assert!(kvm.take().is_empty());
    assert_eq!(protection(host(&ram, 1, 0)), "rw-s");
    assert_eq!(
        node.open_range(2 * REGION_SIZE - 2 * MIB, 4 * MIB).unwrap(),
        1
    );
    assert_eq!(kvm.take(), vec![(3, base(&ram, 2), REGION_SIZE)]);
    assert_eq!(node.open_range(0, 0).unwrap(), 0, "an empty range");
    assert_eq!(node.state(0), Some(SlotState::Removed));
}

/// The hole a partly plugged region used to leave: its unplugged blocks are closed to
/// the devices (the view) and to the guest (`PROT_NONE` under its slot).
#[test]
fn unplugged_blocks_of_a_present_region_are_closed() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    let node = table.node(0);
    assert_eq!(node.restore_all().unwrap(), 3);
    kvm.take();
    // Region 1 keeps one block (its 6th); regions 0 and 2 keep nothing.
    let kept = REGION_SIZE + 10 * MIB;
    let closing = node.close_outside(&plugged(&[(kept, kept + 2 * MIB)]));
    assert_eq!(closing.removed, vec![0, 2]);
    assert!(closing.failure.is_none());
    assert_eq!(
        closing.closed,
        vec![
            (0, REGION_SIZE),
            (REGION_SIZE, kept),
            (kept + 2 * MIB, 2 * REGION_SIZE),
            (2 * REGION_SIZE, 3 * REGION_SIZE)
        ]
    );
    assert_eq!(
        kvm.take(),
        vec![(1, base(&ram, 0), 0), (3, base(&ram, 2), 0)],
        "region 1 keeps its slot"
    );
    assert_eq!(node.state(1), Some(SlotState::Present));
    for (offset, prot, reachable) in [
        (0, "---s", false),
        (8 * MIB, "---s", false),
        (10 * MIB, "rw-s", true),
        (12 * MIB, "---s", false),
        (REGION_SIZE - 2 * MIB, "---s", false),
    ] {
        assert_eq!(protection(host(&ram, 1, offset)), prot, "{offset:#x}");
        assert_eq!(in_view(&table, base(&ram, 1) + offset), reachable);
    }
    // A device's access to a closed block fails instead of faulting; a buffer running
    // from the open block into a closed one fails too.
    let mem = table.memory();
    assert!(mem
        .read_obj::<u8>(GuestAddress(base(&ram, 1) + 12 * MIB))
        .is_err());
    let mut buf = [0u8; 8];
    let end_of_open = GuestAddress(base(&ram, 1) + 12 * MIB - 4);
    assert!(mem.read_slice(&mut buf, end_of_open).is_err());
    // Closing again closes nothing; the kept block closes on its own.
    let again = node.close_outside(&plugged(&[(kept, kept + 2 * MIB)]));
    assert!(again.closed.is_empty() && again.removed.is_empty());
    let last = node.close_outside(&Ranges::default());
    assert_eq!(
        (last.removed, last.closed),
        (vec![1], vec![(kept, kept + 2 * MIB)])
    );
    assert_eq!(kvm.take(), vec![(2, base(&ram, 1), 0)]);
}

#[test]
fn removal_takes_the_region_from_kvm_the_view_and_the_host_mapping() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    let node = table.node(0);
    assert_eq!(node.restore_all().unwrap(), 3);
    kvm.take();
    let closing = node.close_outside(&plugged(&[(REGION_SIZE, 2 * REGION_SIZE)]));
    assert_eq!(
        (closing.removed, closing.failure.is_none()),
        (vec![0, 2], true)
    );
    assert_eq!(
        kvm.take(),
        vec![(1, base(&ram, 0), 0), (3, base(&ram, 2), 0)]
    );
    for (region, prot, reachable) in [(0, "---s", false), (1, "rw-s", true), (2, "---s", false)] {
        assert_eq!(protection(ram.hotplug[region].mapping.as_ptr()), prot);
        assert_eq!(in_view(&table, base(&ram, region)), reachable);
    }
    // A device's access through the view to a removed region fails instead of faulting.
    assert!(table
        .memory()
        .read_obj::<u8>(GuestAddress(base(&ram, 2)))
        .is_err());
    // Removing again is a no-op; opening brings the same slot back.
    assert_eq!(node.close_outside(&Ranges::default()).removed, vec![1]);
    kvm.take();
    assert!(node.close_outside(&Ranges::default()).removed.is_empty());
    assert!(kvm.take().is_empty());
    node.open_range(0, 1).unwrap();
    assert_eq!(kvm.take(), vec![(1, base(&ram, 0), REGION_SIZE)]);
    assert_eq!(
        protection(host(&ram, 0, 0)),
        "rw-s",
        "a whole granule opens"
    );
    assert_eq!(protection(host(&ram, 0, 2 * MIB)), "---s");
}

#[test]
fn a_kvm_failure_leaves_the_region_as_it_was() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    let node = table.node(0);
    *kvm.fail_slot.lock().unwrap() = Some(1);
    let err = node.open_range(0, 2 * MIB).unwrap_err();
    assert!(err.to_string().contains("cannot add slot 1"), "{err}");
    assert_eq!(node.state(0), Some(SlotState::Removed));
    assert_eq!(protection(ram.hotplug[0].mapping.as_ptr()), "---s");
    assert!(!in_view(&table, base(&ram, 0)));
    *kvm.fail_slot.lock().unwrap() = None;
    node.restore_all().unwrap();
    *kvm.fail_slot.lock().unwrap() = Some(2);
    let closing = node.close_outside(&Ranges::default());
    assert_eq!(closing.removed, vec![0, 2]);
    assert!(matches!(
        closing.failure,
        Some(SlotError::Kvm { slot: 2, .. })
    ));
    assert_eq!(node.state(1), Some(SlotState::Present));
    assert_eq!(protection(ram.hotplug[1].mapping.as_ptr()), "rw-s");
    assert!(in_view(&table, base(&ram, 1)), "the guest still has it");
}

#[test]
fn the_budget_is_checked_against_kvm_nr_memslots() {
    check_budget(2, 30, REGION_SIZE, 32).unwrap();
    let err = check_budget(2, 31, REGION_SIZE, 32).unwrap_err();
    assert_eq!(
        err.to_string(),
        "this VM needs 33 KVM memory slots (2 for boot memory, 31 for hotplug regions of \
         128 MiB), but the host's KVM offers 32 (KVM_CAP_NR_MEMSLOTS): use less hotplug \
         memory or larger regions"
    );
    let kvm = Arc::new(Recorder {
        nr: 3,
        ..Default::default()
    });
    let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[3 * REGION_SIZE]).unwrap();
    let ram = GuestRam::new(&layout, 1).unwrap();
    let err = SlotTable::new(kvm.clone(), &ram).unwrap_err();
    assert!(matches!(
        err,
        SlotError::Budget {
            needed: 4,
            available: 3,
            ..
        }
    ));
    assert!(kvm.take().is_empty(), "nothing registered");
}

#[test]
fn dropping_the_table_deletes_every_slot_it_added() {
    let kvm = Recorder::new();
    let (ram, table) = setup(kvm.clone());
    table.node(0).open_range(REGION_SIZE, 1).unwrap();
    kvm.take();
    drop(table);
    assert_eq!(kvm.take(), vec![(0, 0, 0), (2, base(&ram, 1), 0)]);
}

/// Ignored by default, as a machine without KVM cannot run it; CI runs it (`.ci/run`).
#[test]
#[ignore = "needs /dev/kvm; run with --ignored kvm"]
fn real_kvm_accepts_removal_and_restoring() {
    let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
    let vm: Arc<VmFd> = Arc::new(kvm.create_vm().unwrap());
    assert!(vm.nr_memslots() >= 32);
    let (ram, table) = setup(vm);
    let node = table.node(0);
    node.restore_all().unwrap();
    let keep = plugged(&[
        (0, REGION_SIZE),
        (2 * REGION_SIZE, 2 * REGION_SIZE + 2 * MIB),
    ]);
    let closing = node.close_outside(&keep);
    assert_eq!(
        (closing.removed, closing.failure.map(|e| e.to_string())),
        (vec![1], None)
    );
    assert_eq!(node.open_range(REGION_SIZE, 2 * MIB).unwrap(), 1);
    assert_eq!(protection(ram.hotplug[1].mapping.as_ptr()), "rw-s");
}
