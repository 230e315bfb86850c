//! Guest RAM: one memfd per NUMA node, mapped into the VMM and into the guest.
//!
//! A node's memory is one file so that later, when the guest unplugs part of it, the
//! VMM can give exactly that part back to the host with `fallocate(PUNCH_HOLE)`.

use std::fs::File;

use virtio_mem::memfd::{self, MemfdError, Pages};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
}

/// The guest's RAM and the per-node files behind it.
#[derive(Debug)]
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// `node_files[n]` backs node n; ranges of the layout index into it by file offset.
    pub node_files: Vec<File>,
}

impl GuestRam {
    /// Creates one memfd per node, sized for its boot memory and hotplug region, and maps
    /// every range of the layout (hotplug regions too: KVM needs them in a memslot).
    pub fn new(layout: &MemoryLayout, nodes: u32) -> Result<Self, MemoryError> {
        let mut node_files = Vec::new();
        for node in 0..nodes {
            let size = layout.node_file_size(node);
            let name = format!("mempower-node{node}");
            let file = memfd::create(&name, size, Pages::Small)
                .map_err(|source| MemoryError::Memfd { node, source })?;
            node_files.push(file);
        }
        let mut regions = Vec::new();
        for r in layout.ranges.iter().chain(&layout.hotplug) {
            let map_err = |reason: String| MemoryError::Map {
                addr: r.guest_addr,
                size: r.size,
                reason,
            };
            let file = node_files[r.node as usize]
                .try_clone()
                .map_err(|e| map_err(e.to_string()))?;
            let region = GuestRegionMmap::from_range(
                GuestAddress(r.guest_addr),
                r.size as usize,
                Some(FileOffset::new(file, r.file_offset)),
            )
            .map_err(|e| map_err(e.to_string()))?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
            addr: 0,
            size: layout.end(),
            reason: e.to_string(),
        })?;
        Ok(GuestRam { memory, node_files })
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
}
