//! Guest physical address layout: fixed boot structures, the 32-bit MMIO hole, and where
//! each NUMA node's memory lands.
//!
//! Nodes are laid out one after the other from address 0. A node that would cross the
//! MMIO hole below 4 GiB is split around it, so one node may own two ranges. Each range
//! records its offset in the node's memfd, because a node is backed by one file.

/// Boot GDT and IDT, as in Firecracker's x86_64 layout.
pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for the first GiB: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line; x86 Linux reads at most 2048 bytes.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the legacy BIOS area, which e820 reports as reserved.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// First address above the legacy area.
pub const HIMEM_START: u64 = 0x100000;
const _: () = assert!(
    EBDA_START <= ACPI_START && ACPI_END <= HIMEM_START,
    "ACPI tables sit in the reserved legacy area"
);

/// The 32-bit MMIO hole: devices, IOAPIC and LAPIC live here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// virtio-mmio device windows, one page each, in the hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// virtio-mmio devices interrupt on GSIs from here (COM1 has 4), up to the IOAPIC's 23.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const VIRTIO_MAX_DEVICES: usize = 19;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Legacy IO ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// ACPI hardware-reduced sleep control/status and reset register (as Cloud Hypervisor).
pub const ACPI_PM_PORT: u16 = 0x600;
/// The i8042 keyboard controller's ports 0x60..=0x64; 0xfe at 0x64 resets the machine.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One contiguous piece of a node's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    pub node: u32,
    pub guest_addr: u64,
    pub size: u64,
    /// Offset of this range in the node's memfd.
    pub file_offset: u64,
}

impl MemoryRange {
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("guest memory of {0} bytes does not fit the 64-bit guest physical address space")]
    TooLarge(u64),
}

/// Hotplug (virtio-mem) regions start at or above 4 GiB, out of the way of boot memory
/// and the MMIO hole, each aligned to a Linux memory block.
pub const HOTPLUG_START: u64 = 1 << 32;
pub const HOTPLUG_ALIGNMENT: u64 = 128 << 20;

/// Where every node's boot memory and hotplug region live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Boot memory: in e820 and SRAT.
    pub ranges: Vec<MemoryRange>,
    /// One range per node that has a hotplug region: in SRAT (hotpluggable), not in e820.
    /// Its file offset follows the node's boot memory in the same memfd.
    pub hotplug: Vec<MemoryRange>,
}

/// The guest's physical address width we promise not to exceed (the lowest common CPU).
const MAX_GUEST_PHYS: u64 = 1 << 46;

impl MemoryLayout {
    /// Lays out nodes of the given sizes, in order, from address 0.
    pub fn new(node_sizes: &[u64]) -> Result<Self, LayoutError> {
        let total = node_sizes
            .iter()
            .try_fold(0u64, |acc, &s| acc.checked_add(s))
            .filter(|&t| t <= MAX_GUEST_PHYS - (MMIO_HOLE_END - MMIO_HOLE_START))
            .ok_or(LayoutError::TooLarge(
                node_sizes.iter().fold(0u64, |a, &s| a.saturating_add(s)),
            ))?;
        let mut ranges = Vec::new();
        let mut cursor = 0u64;
        for (node, &size) in node_sizes.iter().enumerate() {
            let mut left = size;
            let mut file_offset = 0;
            while left > 0 {
                if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&cursor) {
                    cursor = MMIO_HOLE_END;
                }
                let room = if cursor < MMIO_HOLE_START {
                    MMIO_HOLE_START - cursor
                } else {
                    left
                };
                let size = left.min(room);
                ranges.push(MemoryRange {
                    node: node as u32,
                    guest_addr: cursor,
                    size,
                    file_offset,
                });
                cursor += size;
                file_offset += size;
                left -= size;
            }
        }
        debug_assert!(
            cursor <= MAX_GUEST_PHYS,
            "{total} bytes were checked to fit"
        );
        Ok(MemoryLayout {
            ranges,
            hotplug: Vec::new(),
        })
    }

    /// Lays out boot memory, then each node's hotplug region (`hotplug_sizes[n]`, 0 for
    /// none) above 4 GiB and above all boot memory.
    pub fn with_hotplug(node_sizes: &[u64], hotplug_sizes: &[u64]) -> Result<Self, LayoutError> {
        Self::with_hotplug_aligned(node_sizes, hotplug_sizes, &[])
    }

    /// [`Self::with_hotplug`], each hotplug region also aligned to `alignments[n]` (its
    /// evacuation region size, so that a region is whole guest memory blocks of any
    /// size up to it); missing or smaller alignments are [`HOTPLUG_ALIGNMENT`].
    pub fn with_hotplug_aligned(
        node_sizes: &[u64],
        hotplug_sizes: &[u64],
        alignments: &[u64],
    ) -> Result<Self, LayoutError> {
        let mut layout = Self::new(node_sizes)?;
        let total: u64 = hotplug_sizes.iter().fold(0u64, |a, &s| a.saturating_add(s));
        let mut cursor = layout.end().max(HOTPLUG_START);
        for (node, &size) in hotplug_sizes.iter().enumerate() {
            if size == 0 {
                continue;
            }
            let align = alignments
                .get(node)
                .map_or(HOTPLUG_ALIGNMENT, |a| (*a).max(HOTPLUG_ALIGNMENT));
            let too_large = || LayoutError::TooLarge(total);
            cursor = cursor
                .checked_next_multiple_of(align)
                .ok_or_else(too_large)?;
            layout.hotplug.push(MemoryRange {
                node: node as u32,
                guest_addr: cursor,
                size,
                file_offset: node_sizes.get(node).copied().unwrap_or(0),
            });
            cursor = cursor
                .checked_add(size.next_multiple_of(HOTPLUG_ALIGNMENT))
                .filter(|&c| c <= MAX_GUEST_PHYS)
                .ok_or_else(too_large)?;
        }
        Ok(layout)
    }

    /// The size of node `node`'s memfd: its boot memory plus its hotplug region.
    pub fn node_file_size(&self, node: u32) -> u64 {
        self.ranges
            .iter()
            .chain(&self.hotplug)
            .filter(|r| r.node == node)
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0)
    }

    /// The ranges that belong to `node`.
    pub fn node_ranges(&self, node: u32) -> impl Iterator<Item = &MemoryRange> {
        self.ranges.iter().filter(move |r| r.node == node)
    }

    /// First address above all boot memory.
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, MemoryRange::end)
    }

    /// End of the memory that starts at address 0 and runs without a gap (below the hole).
    pub fn low_memory_end(&self) -> u64 {
        let mut end = 0;
        for r in &self.ranges {
            if r.guest_addr != end {
                break;
            }
            end = r.end();
        }
        end
    }

    /// The e820 map: RAM below the EBDA, the reserved legacy area, then all RAM above 1 MiB.
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut map = vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        ];
        for r in &self.ranges {
            let start = r.guest_addr.max(HIMEM_START);
            if r.end() <= start {
                continue;
            }
            // Adjacent ranges of different nodes are still separate e820 entries; the
            // kernel merges them and takes node boundaries from SRAT.
            map.push((start, r.end() - start, E820_RAM));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn two_small_nodes_are_contiguous() {
        let l = MemoryLayout::new(&[256 * MIB, 256 * MIB]).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                MemoryRange {
                    node: 0,
                    guest_addr: 0,
                    size: 256 * MIB,
                    file_offset: 0
                },
                MemoryRange {
                    node: 1,
                    guest_addr: 256 * MIB,
                    size: 256 * MIB,
                    file_offset: 0
                },
            ]
        );
        assert_eq!(l.end(), 512 * MIB);
        assert_eq!(l.low_memory_end(), 512 * MIB);
    }

    #[test]
    fn a_node_crossing_the_hole_is_split_and_nothing_overlaps_it() {
        let l = MemoryLayout::new(&[2 * GIB, 2 * GIB]).unwrap();
        let node1: Vec<_> = l.node_ranges(1).copied().collect();
        assert_eq!(
            node1,
            vec![
                MemoryRange {
                    node: 1,
                    guest_addr: 2 * GIB,
                    size: GIB,
                    file_offset: 0
                },
                MemoryRange {
                    node: 1,
                    guest_addr: 4 * GIB,
                    size: GIB,
                    file_offset: GIB
                },
            ]
        );
        for r in &l.ranges {
            assert!(
                r.end() <= MMIO_HOLE_START || r.guest_addr >= MMIO_HOLE_END,
                "{r:?} overlaps the hole"
            );
        }
        assert_eq!(l.low_memory_end(), MMIO_HOLE_START);
        let total: u64 = l.ranges.iter().map(|r| r.size).sum();
        assert_eq!(total, 4 * GIB);
    }

    #[test]
    fn a_node_starting_at_the_hole_moves_above_it() {
        let l = MemoryLayout::new(&[3 * GIB, GIB]).unwrap();
        assert_eq!(
            l.ranges[1],
            MemoryRange {
                node: 1,
                guest_addr: 4 * GIB,
                size: GIB,
                file_offset: 0
            }
        );
    }

    #[test]
    fn e820_matches_memory() {
        let l = MemoryLayout::new(&[2 * GIB, 2 * GIB]).unwrap();
        let e820 = l.e820();
        let ram: u64 = e820.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All memory is RAM except the 640 KiB..1 MiB legacy area.
        assert_eq!(ram, 4 * GIB - (HIMEM_START - EBDA_START));
        // Sorted, non-overlapping, and never in the MMIO hole.
        for pair in e820.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?} overlap");
        }
        for &(start, len, _) in &e820 {
            assert!(start + len <= MMIO_HOLE_START || start >= MMIO_HOLE_END);
        }
        // The ACPI tables sit in the reserved area, outside RAM.
        assert!(e820.contains(&(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)));
    }

    #[test]
    fn hotplug_regions_align_to_their_region_size() {
        let l = MemoryLayout::with_hotplug_aligned(
            &[256 * MIB, 256 * MIB],
            &[GIB, 4 * GIB],
            &[128 * MIB, 2 * GIB],
        )
        .unwrap();
        assert_eq!(l.hotplug[0].guest_addr, 4 * GIB);
        assert_eq!(
            l.hotplug[1].guest_addr,
            6 * GIB,
            "5 GiB rounded up to 2 GiB"
        );
        assert!(MemoryLayout::with_hotplug_aligned(&[GIB], &[GIB], &[1 << 63]).is_err());
    }

    #[test]
    fn hotplug_regions_sit_above_4g_aligned_and_outside_e820() {
        let l = MemoryLayout::with_hotplug(&[256 * MIB, 256 * MIB], &[GIB, GIB]).unwrap();
        assert_eq!(
            l.hotplug,
            vec![
                MemoryRange {
                    node: 0,
                    guest_addr: 4 * GIB,
                    size: GIB,
                    file_offset: 256 * MIB
                },
                MemoryRange {
                    node: 1,
                    guest_addr: 5 * GIB,
                    size: GIB,
                    file_offset: 256 * MIB
                },
            ]
        );
        assert_eq!(l.node_file_size(0), 256 * MIB + GIB);
        assert_eq!(l.node_file_size(1), 256 * MIB + GIB);
        let e820_end = l.e820().iter().map(|e| e.0 + e.1).max().unwrap();
        assert_eq!(e820_end, 512 * MIB, "hotplug memory is not boot RAM");
        // A node without a region gets none; big boot memory pushes regions higher.
        let l =
            MemoryLayout::with_hotplug(&[4 * GIB + 2 * MIB, 256 * MIB], &[0, 128 * MIB]).unwrap();
        assert_eq!(l.hotplug.len(), 1);
        assert_eq!(l.hotplug[0].node, 1);
        assert_eq!(l.hotplug[0].guest_addr % HOTPLUG_ALIGNMENT, 0);
        assert!(l.hotplug[0].guest_addr >= l.end());
        assert_eq!(l.node_file_size(0), 4 * GIB + 2 * MIB);
        assert!(MemoryLayout::with_hotplug(&[GIB], &[1 << 45, 1 << 45]).is_err());
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(MemoryLayout::new(&[u64::MAX / 2, u64::MAX / 2]).is_err());
        assert!(MemoryLayout::new(&[1 << 50]).is_err());
    }
}
