//! KVM memory slots, one per boot range and one per hotplug region, and the view of guest
//! memory that the VMM's devices use.
//!
//! A hotplug region whose device blocks the guest has all unplugged is *removed*: taken
//! out of the view, its KVM slot deleted, its host mapping made `PROT_NONE`. Neither the
//! guest nor a device can then make the host allocate memory for it again: a guest access
//! exits to the VMM as MMIO (see `devices::released`), and a device's access through the
//! view fails like any address outside guest memory. A region is *restored* (mapping
//! read-write, slot back, view with it) before the guest's plug of any of its blocks is
//! acknowledged.
//!
//! # Who touches guest memory, and when a region may be removed
//!
//! Devices take the view's current map at the start of each processing round and drop it
//! at its end; they keep no map between rounds. Queue work runs on the event-loop thread,
//! and a region is removed on that thread only, after virtio-mem's queue round that
//! unplugged its last block. So when a region is made `PROT_NONE`, no map that still
//! contains it is in use. Restoring is safe at any time and from any thread. If another
//! thread ever processes guest memory (say a block I/O thread), removal must first wait
//! for it to finish its round, for instance with a round counter it bumps on entry and exit
//! that `remove` waits on while the counter is odd.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::GuestRam;

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
        // SAFETY: the range is exactly one mapping this table holds an Arc of, so it is
        // mapped; mprotect changes only its access rights. With PROT_NONE nothing may
        // access it any more: the module documentation says why nothing does.
        let rc = unsafe { libc::mprotect(self.mapping.as_ptr().cast(), self.mapping.size(), prot) };
        if rc == 0 {
            Ok(())
        } else {
            Err(SlotError::Protect {
                addr: self.addr(),
                source: std::io::Error::last_os_error(),
            })
        }
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
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(
        &self,
        change: impl FnOnce(&GuestMemoryMmap) -> Result<GuestMemoryMmap, SlotError>,
    ) -> Result<(), SlotError> {
        let guard = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        let next = change(&self.view.memory())?;
        guard.replace(next);
        Ok(())
    }

    fn without(&self, region: &RegionSlot) -> Result<(), SlotError> {
        self.publish(|m| {
            m.remove_region(region.mapping.start_addr(), region.mapping.len())
                .map(|(next, _)| next)
                .map_err(SlotError::View)
        })
    }

    fn with(&self, region: &RegionSlot) -> Result<(), SlotError> {
        self.publish(|m| {
            m.insert_region(region.mapping.clone())
                .map_err(SlotError::View)
        })
    }

    /// Removes region `i`: view first (devices stop finding it), then KVM (the guest
    /// stops reaching it), then the host mapping. Returns whether it was present.
    fn remove(&self, regions: &mut [RegionSlot], i: usize) -> Result<bool, SlotError> {
        let region = &mut regions[i];
        if region.state == SlotState::Removed {
            return Ok(false);
        }
        self.without(region)?;
        // SAFETY: deleting a slot needs nothing kept alive.
        if let Err(e) = unsafe { set_slot(&*self.kvm, region.slot, &region.mapping, false) } {
            // The guest still has the region: so must the devices.
            let _ = self.with(region);
            return Err(e);
        }
        region.state = SlotState::Removed;
        region.protect(libc::PROT_NONE)?;
        Ok(true)
    }

    /// Restores region `i` in the reverse order of [`Self::remove`]. Returns whether it
    /// was removed.
    fn restore(&self, regions: &mut [RegionSlot], i: usize) -> Result<bool, SlotError> {
        let region = &mut regions[i];
        if region.state == SlotState::Present {
            return Ok(false);
        }
        region.protect(libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the table holds an Arc of the mapping, and deletes the slot before
        // dropping it.
        if let Err(e) = unsafe { set_slot(&*self.kvm, region.slot, &region.mapping, true) } {
            let _ = region.protect(libc::PROT_NONE);
            return Err(e);
        }
        region.state = SlotState::Present;
        self.with(region)?;
        Ok(true)
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

    /// Restores every region `[offset, offset + len)` touches; returns how many were
    /// removed.
    pub fn restore_range(&self, offset: u64, len: u64) -> Result<u32, SlotError> {
        if len == 0 || self.region_size == 0 {
            return Ok(0);
        }
        let first = offset / self.region_size;
        let last = offset.saturating_add(len - 1) / self.region_size;
        self.restore_where(|r| (first..=last).contains(&u64::from(r)))
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

    /// Restores every region of the node (tests: no driver of ours needs every region).
    #[cfg(test)]
    pub fn restore_all(&self) -> Result<u32, SlotError> {
        self.restore_where(|_| true)
    }

    fn restore_where(&self, pick: impl Fn(u32) -> bool) -> Result<u32, SlotError> {
        let mut regions = self.table.lock();
        let mut restored = 0;
        for (region, &i) in (0u32..).zip(&self.indices) {
            if pick(region) && self.table.restore(&mut regions, i)? {
                restored += 1;
            }
        }
        Ok(restored)
    }

    /// Removes every present region for which `unplugged(region)` holds. Only from the
    /// event-loop thread, between device rounds (see the module documentation). Returns
    /// the regions removed, and the first failure if any.
    pub fn remove_where(&self, unplugged: impl Fn(u32) -> bool) -> (Vec<u32>, Option<SlotError>) {
        let mut regions = self.table.lock();
        let (mut removed, mut failure) = (Vec::new(), None);
        for (region, &i) in (0u32..).zip(&self.indices) {
            if !unplugged(region) {
                continue;
            }
            match self.table.remove(&mut regions, i) {
                Ok(true) => removed.push(region),
                Ok(false) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        (removed, failure)
    }
}

#[cfg(test)]
pub(crate) mod tests;
