//! A guest page walk, done by the VMM after KVM gave up on one: when the guest's page
//! tables lie in memory it unplugged, KVM cannot read them and stops the vCPU with an
//! internal error that names no address. Walking the tables of the instruction pointer
//! ourselves tells whether that is what happened, and so whether the stop is the guest's
//! fault (exit status 4) or the VMM's (1).
//!
//! Long mode only (4- or 5-level tables): a guest that unplugs memory runs Linux with
//! virtio-mem, which needs it.

/// Where a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// A table entry the walk needs is at this guest-physical address, in memory the
    /// guest unplugged.
    Unplugged { entry: u64 },
    /// The address translates to this guest-physical address.
    Mapped(u64),
    /// An entry is not present: the guest's own page fault, not a stop of KVM's.
    NotPresent,
    /// An entry could not be read, though it is not in unplugged memory.
    Unreadable { entry: u64 },
    /// Not long mode: nothing this walker knows.
    NotLongMode,
}

const EFER_LMA: u64 = 1 << 10;
const CR4_LA57: u64 = 1 << 12;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Bits 12..52 of an entry or of CR3: the next table's (or the page's) address.
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Walks the tables at `cr3` for the linear address `va`, reading each 8-byte entry
/// with `read` and asking `unplugged` about its address first.
pub fn walk(
    cr3: u64,
    cr4: u64,
    efer: u64,
    va: u64,
    read: &dyn Fn(u64) -> Option<u64>,
    unplugged: &dyn Fn(u64) -> bool,
) -> Walk {
    if efer & EFER_LMA == 0 {
        return Walk::NotLongMode;
    }
    let levels: u32 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDRESS;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry_addr = table + ((va >> shift) & 0x1ff) * 8;
        if unplugged(entry_addr) {
            return Walk::Unplugged { entry: entry_addr };
        }
        let Some(entry) = read(entry_addr) else {
            return Walk::Unreadable { entry: entry_addr };
        };
        if entry & PRESENT == 0 {
            return Walk::NotPresent;
        }
        // A 1 GiB (level 3) or 2 MiB (level 2) page ends the walk early.
        if level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0) {
            let offset_mask = (1u64 << shift) - 1;
            return Walk::Mapped((entry & ADDRESS & !offset_mask) | (va & offset_mask));
        }
        table = entry & ADDRESS;
    }
    unreachable!("the loop returns at level 1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LMA: u64 = EFER_LMA;

    /// Page tables as a map of entry address to entry.
    struct Tables(HashMap<u64, u64>);

    impl Tables {
        /// One 4 KiB mapping of `va` to `pa`, its tables at `pml4`, `pdpt`, `pd`, `pt`.
        fn four_levels(va: u64, pa: u64, [pml4, pdpt, pd, pt]: [u64; 4]) -> Tables {
            let at = |table: u64, shift: u32| table + ((va >> shift) & 0x1ff) * 8;
            Tables(HashMap::from([
                (at(pml4, 39), pdpt | PRESENT),
                (at(pdpt, 30), pd | PRESENT),
                (at(pd, 21), pt | PRESENT),
                (at(pt, 12), pa | PRESENT),
            ]))
        }

        /// Memory holds zeros where no entry was written.
        fn walk(&self, cr3: u64, va: u64, unplugged: &dyn Fn(u64) -> bool) -> Walk {
            walk(
                cr3,
                0,
                LMA,
                va,
                &|a| Some(self.0.get(&a).copied().unwrap_or(0)),
                unplugged,
            )
        }
    }

    const VA: u64 = 0xffff_8880_0123_4567;

    #[test]
    fn a_mapped_address_translates() {
        let t = Tables::four_levels(VA, 0x5000, [0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(t.walk(0x1000, VA, &|_| false), Walk::Mapped(0x5567));
        // A missing entry is the guest's page fault.
        assert_eq!(t.walk(0x1000, VA + (1 << 21), &|_| false), Walk::NotPresent);
    }

    #[test]
    fn a_table_in_unplugged_memory_is_named() {
        // The page table (level 1) lies at 4 GiB, in a block the guest unplugged.
        let pt = 1 << 32;
        let t = Tables::four_levels(VA, 0x5000, [0x1000, 0x2000, 0x3000, pt]);
        let unplugged = |a: u64| (pt..pt + (2 << 20)).contains(&a);
        assert_eq!(
            t.walk(0x1000, VA, &unplugged),
            Walk::Unplugged {
                entry: pt + ((VA >> 12) & 0x1ff) * 8
            }
        );
        // CR3 itself there: the first entry already.
        let at_top = t.walk(pt, VA, &unplugged);
        assert!(matches!(at_top, Walk::Unplugged { entry } if entry >= pt));
    }

    #[test]
    fn large_pages_end_early_and_other_modes_are_not_walked() {
        let pd_entry = 0x3000 + ((VA >> 21) & 0x1ff) * 8;
        let mut t = Tables::four_levels(VA, 0x5000, [0x1000, 0x2000, 0x3000, 0x4000]);
        t.0.insert(pd_entry, 0x4020_0000 | PAGE_SIZE_BIT | PRESENT);
        assert_eq!(
            t.walk(0x1000, VA, &|_| false),
            Walk::Mapped(0x4020_0000 | (VA & 0x1f_ffff))
        );
        assert_eq!(
            walk(0x1000, 0, 0, VA, &|_| Some(PRESENT), &|_| false),
            Walk::NotLongMode
        );
        // Five levels: the walk starts one level higher, at bit 48.
        let five = walk(0x1000, CR4_LA57, LMA, VA, &|_| None, &|_| false);
        assert_eq!(
            five,
            Walk::Unreadable {
                entry: 0x1000 + ((VA >> 48) & 0x1ff) * 8
            }
        );
    }
}
