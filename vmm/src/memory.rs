//! Guest RAM: one memfd per NUMA node, mapped into the VMM and into the guest.
//!
//! A node's memory is one file so that later, when the guest unplugs part of it, the
//! VMM can give exactly that part back to the host with `fallocate(PUNCH_HOLE)`.
//!
//! Each hotplug region (a node's hotplug range cut at its region size, `region=` of
//! `--numa`) is its own host mapping, so that [`slots`] can take it away from the guest and the VMM's devices when
//! the guest has unplugged all of it, and give it back when the guest plugs it again.

pub mod slots;

use std::fs::File;
use std::sync::Arc;

use virtio_mem::memfd::{self, MemfdError, Pages};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::config::DEFAULT_REGION_SIZE;
use crate::layout::MemoryLayout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("node {node}'s memory: {source}")]
    Memfd { node: u32, source: MemfdError },
    #[error("cannot map guest memory at {addr:#x} ({size} bytes): {reason}")]
    Map {
        addr: u64,
        size: u64,
        reason: String,
    },
    #[error("node {node}'s hotplug range of {size} bytes is not a multiple of its region size {region_size}")]
    RegionSize {
        node: u32,
        size: u64,
        region_size: u64,
    },
}

/// One region of a node's hotplug range, mapped on its own.
#[derive(Debug, Clone)]
pub struct HotplugRegion {
    pub node: u32,
    /// The region's index within its node's hotplug range.
    pub index: u32,
    pub mapping: Arc<GuestRegionMmap>,
}

/// The guest's RAM and the per-node files behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// Every range and region, all mapped read-write: for tests and for setting up boot
    /// memory. Once a [`slots::SlotTable`] runs the VM, its view is the one to use: the
    /// hotplug regions it removed are not accessible through this map.
    pub memory: GuestMemoryMmap,
    /// `node_files[n]` backs node n; ranges of the layout index into it by file offset.
    pub node_files: Vec<File>,
    /// Boot memory, one mapping per layout range, in address order.
    pub boot: Vec<Arc<GuestRegionMmap>>,
    /// Hotplug memory, one mapping per region, in address order.
    pub hotplug: Vec<HotplugRegion>,
}

impl GuestRam {
    /// [`GuestRam::with_region_sizes`] with every node cut at [`DEFAULT_REGION_SIZE`].
    pub fn new(layout: &MemoryLayout, nodes: u32) -> Result<Self, MemoryError> {
        Self::with_region_sizes(layout, &vec![DEFAULT_REGION_SIZE; nodes as usize])
    }

    /// Creates one memfd per node, sized for its boot memory and hotplug range, and maps
    /// every boot range of the layout and every region of its hotplug ranges: node n's
    /// cut at `region_sizes[n]`.
    pub fn with_region_sizes(
        layout: &MemoryLayout,
        region_sizes: &[u64],
    ) -> Result<Self, MemoryError> {
        let mut node_files = Vec::new();
        for node in 0..region_sizes.len() as u32 {
            let size = layout.node_file_size(node);
            let name = format!("mempower-node{node}");
            let file = memfd::create(&name, size, Pages::Small)
                .map_err(|source| MemoryError::Memfd { node, source })?;
            node_files.push(file);
        }
        let map = |node: u32, guest_addr: u64, size: u64, file_offset: u64| {
            let map_err = |reason: String| MemoryError::Map {
                addr: guest_addr,
                size,
                reason,
            };
            let file = node_files[node as usize]
                .try_clone()
                .map_err(|e| map_err(e.to_string()))?;
            GuestRegionMmap::from_range(
                GuestAddress(guest_addr),
                size as usize,
                Some(FileOffset::new(file, file_offset)),
            )
            .map(Arc::new)
            .map_err(|e| map_err(e.to_string()))
        };
        let boot = layout
            .ranges
            .iter()
            .map(|r| map(r.node, r.guest_addr, r.size, r.file_offset))
            .collect::<Result<Vec<_>, _>>()?;
        let mut hotplug = Vec::new();
        for r in &layout.hotplug {
            let region_size = region_sizes[r.node as usize];
            if r.size % region_size != 0 {
                return Err(MemoryError::RegionSize {
                    node: r.node,
                    size: r.size,
                    region_size,
                });
            }
            for index in 0..r.size / region_size {
                let offset = index * region_size;
                hotplug.push(HotplugRegion {
                    node: r.node,
                    index: index as u32,
                    mapping: map(
                        r.node,
                        r.guest_addr + offset,
                        region_size,
                        r.file_offset + offset,
                    )?,
                });
            }
        }
        let all = boot
            .iter()
            .cloned()
            .chain(hotplug.iter().map(|h| h.mapping.clone()))
            .collect();
        let memory = GuestMemoryMmap::from_arc_regions(all).map_err(|e| MemoryError::Map {
            addr: 0,
            size: layout.end(),
            reason: e.to_string(),
        })?;
        Ok(GuestRam {
            memory,
            node_files,
            boot,
            hotplug,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: u64 = 1 << 20;

    #[test]
    fn each_node_is_backed_by_its_own_file() {
        let layout = MemoryLayout::new(&[4 * MIB, 2 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 2).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        assert_eq!(ram.node_files[0].metadata().unwrap().len(), 4 * MIB);
        assert_eq!(ram.node_files[1].metadata().unwrap().len(), 2 * MIB);
        // A write to node 1's memory lands at offset 0 of node 1's file.
        ram.memory
            .write_obj(0xabcdu32, GuestAddress(4 * MIB))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&ram.node_files[1], &mut buf, 0).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
        let total: u64 = ram.memory.iter().map(|r| r.len()).sum();
        assert_eq!(total, 6 * MIB);
    }

    #[test]
    fn hotplug_regions_share_their_nodes_file() {
        let layout = MemoryLayout::with_hotplug(&[4 * MIB, 2 * MIB], &[0, 128 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 2).unwrap();
        assert_eq!(ram.memory.num_regions(), 3);
        assert_eq!((ram.boot.len(), ram.hotplug.len()), (2, 1));
        assert_eq!(
            ram.node_files[1].metadata().unwrap().len(),
            2 * MIB + 128 * MIB
        );
        let region = layout.hotplug[0];
        ram.memory
            .write_obj(0x5au8, GuestAddress(region.guest_addr))
            .unwrap();
        let mut buf = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&ram.node_files[1], &mut buf, region.file_offset)
            .unwrap();
        assert_eq!(buf, [0x5a]);
    }

    #[test]
    fn each_hotplug_region_is_its_own_mapping() {
        const REGION_SIZE: u64 = DEFAULT_REGION_SIZE;
        let layout = MemoryLayout::with_hotplug(&[4 * MIB], &[3 * REGION_SIZE]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        assert_eq!(ram.memory.num_regions(), 4);
        let base = layout.hotplug[0].guest_addr;
        for (i, h) in ram.hotplug.iter().enumerate() {
            assert_eq!((h.node, h.index), (0, i as u32));
            assert_eq!(h.mapping.start_addr().0, base + i as u64 * REGION_SIZE);
            assert_eq!(h.mapping.len(), REGION_SIZE);
        }
        // The last region's first byte is at its offset in the node's file.
        ram.memory
            .write_obj(0x77u8, GuestAddress(base + 2 * REGION_SIZE))
            .unwrap();
        let mut buf = [0u8; 1];
        let offset = layout.hotplug[0].file_offset + 2 * REGION_SIZE;
        std::os::unix::fs::FileExt::read_exact_at(&ram.node_files[0], &mut buf, offset).unwrap();
        assert_eq!(buf, [0x77]);
        // A hotplug range that is not whole regions is refused.
        let odd = MemoryLayout::with_hotplug(&[4 * MIB], &[REGION_SIZE + 2 * MIB]).unwrap();
        assert!(matches!(
            GuestRam::new(&odd, 1),
            Err(MemoryError::RegionSize { node: 0, .. })
        ));
    }
}
