//! KVM memory slots, one per boot range and one per hotplug region, and the view of guest
//! memory that the VMM's devices use.
//!
//! Only what the guest has plugged is reachable, at block granularity. Each region keeps
//! its *open* ranges: mapped read-write and in the view. A plug opens its blocks before it
//! is acknowledged (mapping read-write, the region's KVM slot added if it had none, view
//! with them). After the queue round that unplugged blocks, they are *closed* in two
//! steps: *hidden* (out of the view, [`NodeSlots::hide_outside`]), then *shut* (their host
//! mapping made `PROT_NONE`, [`NodeSlots::shut_closed`]). A region left with nothing
//! plugged is *removed* when shut: its KVM slot deleted, so that a guest access exits to
//! the VMM as MMIO (see `devices::released`). Neither the guest nor a device can then
//! make the host allocate memory for an unplugged block: a device's access fails like any
//! address outside guest memory, and a guest access to a closed block of a present region
//! makes KVM fail with `EFAULT` (no page behind it), which stops the VM as the guest's
//! fault (`cpu::run`).
//!
//! # Who touches guest memory, and when a region may be removed
//!
//! Devices take the view's current map at the start of each processing round and drop it
//! at its end; they keep no map between rounds. Queue work runs on the event-loop thread,
//! and ranges are hidden on that thread only, after virtio-mem's queue round that
//! unplugged them. Once hidden, no map in use contains them, so shutting them (and
//! removing their region) is safe from any thread: virtio-mem's release thread does it,
//! as it is slow. Restoring is safe at any time and from any thread. If another thread
//! ever processes guest memory (say a block I/O thread), hiding must first wait for it
//! to finish its round, for instance with a round counter it bumps on entry and exit
//! that `hide_outside` waits on while the counter is odd.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::GuestRam;
use crate::sync::Locked;

mod ranges;

pub use ranges::Ranges;

/// What opening and closing round to: the smallest virtio-mem block, a huge page.
pub const GRANULE: u64 = 2 << 20;

/// The guest memory devices use: a map that changes when regions are removed or
/// restored. Take `.memory()` once per processing round.
pub type GuestMemoryView = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "this VM needs {needed} KVM memory slots ({boot} for boot memory, {regions} for \
         hotplug regions of {region_mib} MiB), but the host's KVM offers {available} \
         (KVM_CAP_NR_MEMSLOTS): use less hotplug memory or larger regions"
    )]
    Budget {
        needed: usize,
        boot: usize,
        regions: usize,
        region_mib: u64,
        available: usize,
    },
    #[error("KVM_SET_USER_MEMORY_REGION cannot {action} slot {slot} at {addr:#x}: {source}")]
    Kvm {
        action: &'static str,
        slot: u32,
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot change the protection of the host mapping of {addr:#x}: {source}")]
    Protect { addr: u64, source: std::io::Error },
    #[error("guest memory map: {0}")]
    View(vm_memory::GuestRegionCollectionError),
    #[error("cannot map the open part of a region at {addr:#x}: {reason}")]
    Piece { addr: u64, reason: String },
}

/// The KVM half of the table: a `VmFd`, or a recorder in tests.
pub trait KvmSlots: Send + Sync {
    /// KVM_CAP_NR_MEMSLOTS: how many user memory slots the VM may have.
    fn nr_memslots(&self) -> usize;

    /// KVM_SET_USER_MEMORY_REGION; `size` 0 deletes the slot.
    ///
    /// # Safety
    ///
    /// `[host_addr, host_addr + size)` must stay mapped for as long as the slot exists.
    unsafe fn set_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl KvmSlots for VmFd {
    fn nr_memslots(&self) -> usize {
        // As Kvm::get_nr_memslots: a KVM that does not say allows 32 (the API's minimum).
        match self.check_extension_int(Cap::NrMemslots) {
            n if n > 0 => n as usize,
            _ => 32,
        }
    }

    unsafe fn set_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: our caller keeps the host range mapped while the slot exists.
        unsafe { self.set_user_memory_region(region) }
    }
}

/// Whether a hotplug region is reachable by the guest and the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Present,
    Removed,
}

#[derive(Debug)]
struct RegionSlot {
    slot: u32,
    node: u32,
    mapping: Arc<GuestRegionMmap>,
    state: SlotState,
    /// Offsets in the region that are mapped read-write and in the view; empty while
    /// removed.
    open: Ranges,
    /// The view's regions for `open`: the mapping itself when all of it is open.
    pieces: Vec<Arc<GuestRegionMmap>>,
}

/// Adds the slot of `mapping` (`present`) or deletes it.
///
/// # Safety
///
/// To add, the caller must keep `mapping` alive until the slot is deleted.
unsafe fn set_slot(
    kvm: &dyn KvmSlots,
    slot: u32,
    mapping: &GuestRegionMmap,
    present: bool,
) -> Result<(), SlotError> {
    let addr = mapping.start_addr().0;
    let (size, host, action) = match present {
        true => (mapping.len(), mapping.as_ptr() as u64, "add"),
        false => (0, 0, "delete"),
    };
    // SAFETY: a deleted slot needs no memory; an added one is kept alive by our caller.
    unsafe { kvm.set_slot(slot, addr, size, host) }.map_err(|source| SlotError::Kvm {
        action,
        slot,
        addr,
        source,
    })
}

impl RegionSlot {
    fn addr(&self) -> u64 {
        self.mapping.start_addr().0
    }

    fn protect(&self, prot: libc::c_int) -> Result<(), SlotError> {
        self.protect_range(0, self.mapping.len(), prot)
    }

    /// Changes the access rights of `[start, end)` of the region's mapping.
    fn protect_range(&self, start: u64, end: u64, prot: libc::c_int) -> Result<(), SlotError> {
        assert!(
            start <= end && end <= self.mapping.len(),
            "within the region"
        );
        // SAFETY: the range lies within one mapping this table holds an Arc of (checked
        // above), so it is mapped; mprotect changes only its access rights. With
        // PROT_NONE nothing may access it any more: the module documentation says why
        // nothing does.
        let rc = unsafe {
            libc::mprotect(
                self.mapping.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                prot,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SlotError::Protect {
                addr: self.addr() + start,
                source: std::io::Error::last_os_error(),
            })
        }
    }

    /// The view's regions for the open ranges.
    fn pieces(&self) -> Result<Vec<Arc<GuestRegionMmap>>, SlotError> {
        if self.open.is_whole(self.mapping.len()) {
            return Ok(vec![self.mapping.clone()]);
        }
        self.open
            .iter()
            .map(|(start, end)| {
                let addr = self.addr() + start;
                // SAFETY: `[start, end)` lies within the region's mapping (open ranges
                // are clamped to it), which is shared and read-write there. The piece
                // does not own it: the table holds the mapping, and the VM keeps the
                // table (and the GuestRam) until the process ends, so no view of a
                // piece outlives the memory.
                let region = unsafe {
                    MmapRegion::build_raw(
                        self.mapping.as_ptr().add(start as usize),
                        (end - start) as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .map_err(|e| SlotError::Piece {
                    addr,
                    reason: e.to_string(),
                })?;
                GuestRegionMmap::new(region, GuestAddress(addr))
                    .map(Arc::new)
                    .ok_or(SlotError::Piece {
                        addr,
                        reason: "beyond the guest address space".into(),
                    })
            })
            .collect()
    }
}

/// Every KVM memory slot of the VM, and the devices' view of guest memory.
pub struct SlotTable {
    kvm: Arc<dyn KvmSlots>,
    view: GuestMemoryView,
    boot: Vec<(u32, Arc<GuestRegionMmap>)>,
    /// Hotplug regions, in address order (so a node's regions are in index order).
    regions: Mutex<Vec<RegionSlot>>,
}

impl std::fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotTable")
            .field("boot", &self.boot.len())
            .field("regions", &*self.lock())
            .finish()
    }
}

/// Fails if `boot` ranges and `regions` hotplug regions need more slots than `available`.
pub fn check_budget(
    boot: usize,
    regions: usize,
    region_size: u64,
    available: usize,
) -> Result<(), SlotError> {
    let needed = boot.saturating_add(regions);
    if needed > available {
        return Err(SlotError::Budget {
            needed,
            boot,
            regions,
            region_mib: region_size >> 20,
            available,
        });
    }
    Ok(())
}

impl SlotTable {
    /// Gives KVM a slot for every boot range, and one (not yet registered) for each
    /// hotplug region, after checking that KVM has that many. Every hotplug region starts
    /// removed: nothing is plugged before the guest asks.
    pub fn new(kvm: Arc<dyn KvmSlots>, ram: &GuestRam) -> Result<Arc<Self>, SlotError> {
        let region_size = ram.hotplug.first().map_or(0, |h| h.mapping.len());
        check_budget(
            ram.boot.len(),
            ram.hotplug.len(),
            region_size,
            kvm.nr_memslots(),
        )?;
        let boot: Vec<_> = (0u32..).zip(ram.boot.iter().cloned()).collect();
        let view = GuestMemoryMmap::from_arc_regions(ram.boot.clone()).map_err(SlotError::View)?;
        let first_hotplug_slot = boot.len() as u32;
        let table = SlotTable {
            kvm,
            view: GuestMemoryAtomic::new(view),
            boot,
            regions: Mutex::new(
                (first_hotplug_slot..)
                    .zip(&ram.hotplug)
                    .map(|(slot, h)| RegionSlot {
                        slot,
                        node: h.node,
                        mapping: h.mapping.clone(),
                        state: SlotState::Removed,
                        open: Ranges::default(),
                        pieces: Vec::new(),
                    })
                    .collect(),
            ),
        };
        for (slot, mapping) in &table.boot {
            // SAFETY: the table holds an Arc of the mapping, and deletes the slot when
            // dropped, before the mapping can go.
            unsafe { set_slot(&*table.kvm, *slot, mapping, true) }?;
        }
        for region in table.lock().iter() {
            region.protect(libc::PROT_NONE)?;
        }
        Ok(Arc::new(table))
    }

    /// The devices' view of guest memory.
    pub fn view(&self) -> GuestMemoryView {
        self.view.clone()
    }

    /// Guest memory as it is now (boot memory and present regions).
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.view.memory().into_inner()
    }

    /// Whether `gpa` lies in a hotplug region but outside what the guest has plugged: a
    /// guest access there is the guest's fault, not the VMM's.
    pub fn unplugged(&self, gpa: u64) -> bool {
        self.lock().iter().any(|r| {
            let offset = gpa.wrapping_sub(r.addr());
            offset < r.mapping.len() && !r.open.iter().any(|(s, e)| (s..e).contains(&offset))
        })
    }

    /// The slots of `node`'s hotplug regions.
    pub fn node(self: &Arc<Self>, node: u32) -> NodeSlots {
        let regions = self.lock();
        let indices: Vec<usize> = regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.node == node)
            .map(|(i, _)| i)
            .collect();
        let region_size = indices.first().map_or(0, |&i| regions[i].mapping.len());
        NodeSlots {
            table: self.clone(),
            indices,
            region_size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RegionSlot>> {
        self.regions.locked()
    }

    /// Publishes a view of boot memory and the open ranges of `regions`.
    fn republish(&self, regions: &[RegionSlot]) -> Result<(), SlotError> {
        let all = self
            .boot
            .iter()
            .map(|(_, m)| m.clone())
            .chain(regions.iter().flat_map(|r| r.pieces.iter().cloned()));
        let next = GuestMemoryMmap::from_arc_regions(all.collect()).map_err(SlotError::View)?;
        let guard = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        guard.replace(next);
        Ok(())
    }

    /// Opens `[start, end)` of region `i`: mapping read-write, the region's slot added if
    /// it was removed, the range in the region's pieces (the caller republishes the
    /// view). Returns whether the region was removed.
    fn open(
        &self,
        regions: &mut [RegionSlot],
        i: usize,
        start: u64,
        end: u64,
    ) -> Result<bool, SlotError> {
        let region = &mut regions[i];
        region.protect_range(start, end, libc::PROT_READ | libc::PROT_WRITE)?;
        let was_removed = region.state == SlotState::Removed;
        if was_removed {
            // SAFETY: the table holds an Arc of the mapping, and deletes the slot before
            // dropping it.
            if let Err(e) = unsafe { set_slot(&*self.kvm, region.slot, &region.mapping, true) } {
                let _ = region.protect_range(start, end, libc::PROT_NONE);
                return Err(e);
            }
            region.state = SlotState::Present;
        }
        region.open.insert(start, end);
        region.pieces = region.pieces()?;
        Ok(was_removed)
    }

    /// Takes `closed` (no longer open, and out of the published view) from the guest:
    /// the region's slot goes if nothing of it stays open, then the ranges become
    /// `PROT_NONE`. Returns whether the region was removed now.
    fn shut(&self, region: &mut RegionSlot, closed: &Ranges) -> Result<bool, SlotError> {
        let remove = region.open.is_empty() && region.state == SlotState::Present;
        if remove {
            // SAFETY: deleting a slot needs nothing kept alive.
            unsafe { set_slot(&*self.kvm, region.slot, &region.mapping, false) }?;
            region.state = SlotState::Removed;
        }
        for (start, end) in closed.iter() {
            region.protect_range(start, end, libc::PROT_NONE)?;
        }
        Ok(remove)
    }
}

impl Drop for SlotTable {
    /// KVM forgets every mapping before the table's Arcs of them go.
    fn drop(&mut self) {
        let regions = self
            .regions
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let present = regions
            .iter()
            .filter(|r| r.state == SlotState::Present)
            .map(|r| (r.slot, r.addr()));
        let boot = self.boot.iter().map(|(s, m)| (*s, m.start_addr().0));
        for (slot, addr) in boot.chain(present).collect::<Vec<_>>() {
            // SAFETY: deleting a slot makes KVM drop the host range.
            let _ = unsafe { self.kvm.set_slot(slot, addr, 0, 0) };
        }
    }
}

/// One node's hotplug regions in the slot table. Offsets are relative to the start of the
/// node's hotplug range, as virtio-mem's backend gets them.
#[derive(Debug, Clone)]
pub struct NodeSlots {
    table: Arc<SlotTable>,
    /// Table indices of the node's regions, region 0 first.
    indices: Vec<usize>,
    region_size: u64,
}

impl NodeSlots {
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn regions(&self) -> u32 {
        self.indices.len() as u32
    }

    /// The devices' view of guest memory (the whole table's).
    pub fn view(&self) -> GuestMemoryView {
        self.table.view()
    }

    pub fn state(&self, region: u32) -> Option<SlotState> {
        let i = *self.indices.get(region as usize)?;
        Some(self.table.lock()[i].state)
    }

    /// Opens `[offset, offset + len)` (widened to whole granules), restoring the slots
    /// of the regions it touches that were removed; returns how many were.
    pub fn open_range(&self, offset: u64, len: u64) -> Result<u32, SlotError> {
        let node_len = self.region_size * self.indices.len() as u64;
        let start = offset - offset % GRANULE;
        let end = offset.saturating_add(len).div_ceil(GRANULE) * GRANULE;
        let end = end.min(node_len);
        if len == 0 || start >= end {
            return Ok(0);
        }
        let mut regions = self.table.lock();
        let mut restored = 0;
        let mut result = Ok(());
        for (base, &i) in (0u64..).map(|r| r * self.region_size).zip(&self.indices) {
            let (lo, hi) = (start.max(base), end.min(base + self.region_size));
            if lo >= hi {
                continue;
            }
            match self.table.open(&mut regions, i, lo - base, hi - base) {
                Ok(was_removed) => restored += u32::from(was_removed),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // What was opened is published even if a later region failed.
        self.table.republish(&regions)?;
        result.map(|()| restored)
    }

    /// The parts of the node's region mappings that `[offset, offset + len)` covers, in
    /// order: `(host address, length)`. Only while the table lives are they mapped.
    pub fn host_ranges(&self, offset: u64, len: u64) -> Vec<(*mut u8, usize)> {
        let end = offset.saturating_add(len);
        let regions = self.table.lock();
        let mut out = Vec::new();
        for (region, &i) in (0u64..).zip(&self.indices) {
            let start = region * self.region_size;
            let (lo, hi) = (offset.max(start), end.min(start + self.region_size));
            if lo < hi {
                // In bounds: `lo - start < hi - start <= region_size`, the mapping's size.
                let host = regions[i]
                    .mapping
                    .as_ptr()
                    .wrapping_add((lo - start) as usize);
                out.push((host, (hi - lo) as usize));
            }
        }
        out
    }

    /// Opens every region of the node whole (tests: no driver of ours needs that).
    #[cfg(test)]
    pub fn restore_all(&self) -> Result<u32, SlotError> {
        self.open_range(0, self.region_size * self.indices.len() as u64)
    }

    /// Closes what is open outside `plugged` (offsets in the node's hotplug range), and
    /// removes the regions left with nothing plugged: [`Self::hide_outside`], then
    /// [`Self::shut_closed`] of what it hid, at once (for tests and the `slots` bench: the
    /// device hides on the event loop and shuts on its release thread).
    pub fn close_outside(&self, plugged: &Ranges) -> Closing {
        let mut closing = self.hide_outside(plugged);
        for (start, end) in std::mem::take(&mut closing.closed) {
            let shut = self.shut_closed(start, end);
            closing.removed.extend(shut.removed);
            closing.closed.extend(shut.closed);
            if let Some(e) = shut.failure {
                closing.failure.get_or_insert(e);
            }
        }
        closing
    }

    /// The first half of a close: what is open outside `plugged` leaves the open ranges
    /// and the devices' view (one new view for the whole round); `closed` lists it. The
    /// guest still reaches it until [`Self::shut_closed`]. Only from the event-loop
    /// thread, between device rounds (see the module documentation).
    pub fn hide_outside(&self, plugged: &Ranges) -> Closing {
        let mut regions = self.table.lock();
        let mut closing = Closing::default();
        // 1. Each region's open ranges shrink to what stays plugged.
        let mut hidden = Vec::new();
        for (region, &i) in (0u32..).zip(&self.indices) {
            if regions[i].open.is_empty() {
                continue;
            }
            let base = u64::from(region) * self.region_size;
            let keep = plugged.window(base, base + self.region_size);
            let closed = regions[i].open.intersect(&keep);
            if closed.is_empty() {
                continue;
            }
            match regions[i].pieces() {
                Ok(pieces) => {
                    let old = std::mem::replace(&mut regions[i].pieces, pieces);
                    hidden.push((region, i, closed, old));
                }
                Err(e) => {
                    reopen(&mut regions[i], &closed, None);
                    closing.failure.get_or_insert(e);
                }
            }
        }
        if hidden.is_empty() {
            return closing;
        }
        // 2. The devices stop finding them.
        if let Err(e) = self.table.republish(&regions) {
            for (_, i, closed, old) in hidden {
                reopen(&mut regions[i], &closed, Some(old));
            }
            closing.failure.get_or_insert(e);
            return closing;
        }
        for (region, _, closed, _) in hidden {
            let base = u64::from(region) * self.region_size;
            closing
                .closed
                .extend(closed.iter().map(|(s, e)| (base + s, base + e)));
        }
        closing
    }

    /// The second half of a close, for what of `[start, end)` is not open (a plug since
    /// may have opened part of it again): the guest stops reaching it. A region with
    /// nothing open loses its KVM slot; the closed ranges' host mapping becomes
    /// `PROT_NONE`. From any thread: the view no longer holds these ranges.
    pub fn shut_closed(&self, start: u64, end: u64) -> Closing {
        let mut regions = self.table.lock();
        let mut closing = Closing::default();
        let mut republish = false;
        for (region, &i) in (0u32..).zip(&self.indices) {
            let base = u64::from(region) * self.region_size;
            let (lo, hi) = (start.max(base), end.min(base + self.region_size));
            if lo >= hi {
                continue;
            }
            let mut closed = Ranges::of([(lo - base, hi - base)]);
            for (s, e) in regions[i].open.iter() {
                closed.remove(s, e);
            }
            if closed.is_empty() {
                continue;
            }
            match self.table.shut(&mut regions[i], &closed) {
                Ok(removed) => {
                    if removed {
                        closing.removed.push(region);
                    }
                    closing
                        .closed
                        .extend(closed.iter().map(|(s, e)| (base + s, base + e)));
                }
                Err(e) => {
                    // KVM kept the slot: the guest still reaches the region, so must
                    // the devices.
                    if regions[i].state == SlotState::Present && regions[i].open.is_empty() {
                        reopen(&mut regions[i], &closed, None);
                        match regions[i].pieces() {
                            Ok(pieces) => regions[i].pieces = pieces,
                            Err(e) => {
                                closing.failure.get_or_insert(e);
                            }
                        }
                        republish = true;
                    }
                    closing.failure.get_or_insert(e);
                }
            }
        }
        if republish {
            if let Err(e) = self.table.republish(&regions) {
                closing.failure.get_or_insert(e);
            }
        }
        closing
    }
}

/// Puts `closed` back among `region`'s open ranges, with its former pieces if known.
fn reopen(region: &mut RegionSlot, closed: &Ranges, pieces: Option<Vec<Arc<GuestRegionMmap>>>) {
    for (start, end) in closed.iter() {
        region.open.insert(start, end);
    }
    if let Some(pieces) = pieces {
        region.pieces = pieces;
    }
}

/// What [`NodeSlots::close_outside`] did.
#[derive(Debug, Default)]
pub struct Closing {
    /// Regions whose slots went.
    pub removed: Vec<u32>,
    /// Ranges closed, offsets in the node's hotplug range.
    pub closed: Vec<(u64, u64)>,
    /// The first failure, if any; the rest was still done.
    pub failure: Option<SlotError>,
}

#[cfg(test)]
pub(crate) mod tests;
