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

use crate::config::{NodeConfig, DEFAULT_REGION_SIZE};
use crate::host_numa::{self, HostNumaError, HostTopology};
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
    #[error("node {node}'s memory: {source}")]
    Bind { node: u32, source: HostNumaError },
    #[error("node {node} has hugepages=on, but this host cannot give 2 MiB huge pages: {reason}")]
    NoHugePages { node: u32, reason: String },
    #[error(
        "node {node} needs {needed} huge pages of 2 MiB for its boot memory, the host has \
         {free} free{place} (raise /proc/sys/vm/nr_hugepages): {source}"
    )]
    HugePagesShort {
        node: u32,
        needed: u64,
        free: String,
        place: String,
        source: std::io::Error,
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
        let nodes: Vec<NodeConfig> = region_sizes
            .iter()
            .map(|&region_size| NodeConfig {
                region_size,
                ..Default::default()
            })
            .collect();
        Self::with_nodes(layout, &nodes, &HostTopology::system())
    }

    /// As [`Self::with_region_sizes`], with each node's backing as configured: node n's
    /// mappings bound to its `host_node` (before anything touches them, so that every
    /// page is placed there), and its memfd of 2 MiB hugetlbfs pages with `hugepages`,
    /// its boot memory allocated now so that a short pool fails here, clearly.
    pub fn with_nodes(
        layout: &MemoryLayout,
        nodes: &[NodeConfig],
        topology: &HostTopology,
    ) -> Result<Self, MemoryError> {
        let mut node_files = Vec::new();
        for (node, config) in (0u32..).zip(nodes) {
            let size = layout.node_file_size(node);
            let name = format!("mempower-node{node}");
            let pages = match config.hugepages {
                true => Pages::Huge2M,
                false => Pages::Small,
            };
            let file = memfd::create(&name, size, pages).map_err(|source| match source {
                // EINVAL: a kernel without hugetlbfs or 2 MiB pages.
                MemfdError::Create { source, .. } if config.hugepages => MemoryError::NoHugePages {
                    node,
                    reason: source.to_string(),
                },
                source => MemoryError::Memfd { node, source },
            })?;
            node_files.push(file);
        }
        let bind = |node: u32, mapping: &GuestRegionMmap| match nodes[node as usize].host_node {
            Some(host) => host_numa::bind_memory(mapping.as_ptr() as usize, mapping.size(), host)
                .map_err(|source| MemoryError::Bind { node, source }),
            None => Ok(()),
        };
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
            .map(|r| {
                let mapping = map(r.node, r.guest_addr, r.size, r.file_offset)?;
                bind(r.node, &mapping)?;
                if nodes[r.node as usize].hugepages {
                    let host_node = nodes[r.node as usize].host_node;
                    allocate_huge(
                        r.node,
                        mapping.as_ptr(),
                        mapping.size(),
                        host_node,
                        topology,
                    )?;
                }
                Ok(mapping)
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let mut hotplug = Vec::new();
        for r in &layout.hotplug {
            let region_size = nodes[r.node as usize].region_size;
            if r.size % region_size != 0 {
                return Err(MemoryError::RegionSize {
                    node: r.node,
                    size: r.size,
                    region_size,
                });
            }
            for index in 0..r.size / region_size {
                let offset = index * region_size;
                let mapping = map(
                    r.node,
                    r.guest_addr + offset,
                    region_size,
                    r.file_offset + offset,
                )?;
                // Hotplug memory is allocated when the guest plugs it (virtio-mem's
                // populate), through this mapping, so its policy places it.
                bind(r.node, &mapping)?;
                hotplug.push(HotplugRegion {
                    node: r.node,
                    index: index as u32,
                    mapping,
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

/// Allocates every huge page of the mapping at `addr` through it (`MADV_POPULATE_WRITE`), so that
/// its policy places them and a pool too small for the boot memory is an error at start,
/// not a guest that dies on its first touch of a page the pool cannot give (the mapping
/// is `MAP_NORESERVE`, so nothing was reserved).
fn allocate_huge(
    node: u32,
    addr: *mut u8,
    len: usize,
    host_node: Option<u32>,
    topology: &HostTopology,
) -> Result<(), MemoryError> {
    // Read before allocating: what the host had for this node.
    let (free, place) = match host_node {
        Some(h) => (topology.free_huge_pages(h), format!(" on host node {h}")),
        None => (host_numa::free_huge_pages_total(), String::new()),
    };
    populate_write(addr, len).map_err(|source| MemoryError::HugePagesShort {
        node,
        needed: len as u64 / memfd::HUGE_2M,
        free: free.map_or_else(|e| format!("? ({e})"), |f| f.to_string()),
        place,
        source,
    })
}

/// Faults in every page of `[addr, addr + len)` for writing, as the guest would.
pub(crate) fn populate_write(addr: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: the range is one mapping of guest memory the caller holds; populating
    // allocates its pages (zeroed) without changing any contents or the mapping.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_POPULATE_WRITE) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Bytes of `[addr, addr + len)` whose pages are present in this process's page tables
/// (`mincore`). For a hugetlbfs mapping, which every allocation of the VMM's guest memory
/// goes through (KVM faults the guest's accesses through it), this is the memory the
/// range holds, which `lseek(SEEK_DATA)` cannot tell on hugetlbfs.
pub(crate) fn present_bytes(addr: *mut u8, len: usize) -> std::io::Result<u64> {
    const PAGE: usize = 4096;
    let mut present = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `present` has one byte per page of the range, which the kernel fills; the
    // range is a mapping of guest memory the caller holds, whose contents are untouched.
    let rc = unsafe { libc::mincore(addr.cast(), len, present.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(present.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64)
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

    /// The numa_maps line of a mapping.
    fn policy(mapping: &GuestRegionMmap) -> String {
        crate::host_numa::numa_maps_line(mapping.as_ptr() as u64).unwrap()
    }

    #[test]
    fn a_host_node_binds_boot_and_hotplug_mappings() {
        let topology = HostTopology::system();
        let host = topology.memory_nodes().unwrap()[0];
        let layout =
            MemoryLayout::with_hotplug(&[4 * MIB, 4 * MIB], &[0, 2 * DEFAULT_REGION_SIZE]).unwrap();
        let nodes = [
            NodeConfig::default(),
            NodeConfig {
                id: 1,
                host_node: Some(host),
                ..Default::default()
            },
        ];
        let ram = GuestRam::with_nodes(&layout, &nodes, &topology).unwrap();
        let bind = format!(" bind:{host} ");
        assert!(
            !policy(&ram.boot[0]).contains(" bind:"),
            "{}",
            policy(&ram.boot[0])
        );
        assert!(
            policy(&ram.boot[1]).contains(&bind),
            "{}",
            policy(&ram.boot[1])
        );
        for h in &ram.hotplug {
            assert!(policy(&h.mapping).contains(&bind), "{}", policy(&h.mapping));
        }
        // The pages the guest writes are allocated there (numa_maps counts them: N<node>=).
        ram.memory
            .write_slice(&[1u8; 8192], GuestAddress(layout.hotplug[0].guest_addr))
            .unwrap();
        let line = policy(&ram.hotplug[0].mapping);
        assert!(line.contains(&format!(" N{host}=")), "{line}");
        // A node the host does not have cannot be bound to.
        let bad = [NodeConfig {
            host_node: Some(1000),
            ..Default::default()
        }];
        let err = GuestRam::with_nodes(&MemoryLayout::new(&[4 * MIB]).unwrap(), &bad, &topology)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("node 0's memory: cannot bind"),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs 4 free 2 MiB huge pages (vm.nr_hugepages); run with --ignored huge_page"]
    fn huge_page_boot_memory_is_allocated_at_start() {
        let topology = HostTopology::system();
        let free = host_numa::free_huge_pages_total().unwrap_or(0);
        assert!(
            free >= 4,
            "this test needs 4 free 2 MiB huge pages, the host has {free}"
        );
        let layout = MemoryLayout::new(&[4 * MIB]).unwrap();
        let nodes = [NodeConfig {
            hugepages: true,
            host_node: Some(topology.memory_nodes().unwrap()[0]),
            ..Default::default()
        }];
        let ram = GuestRam::with_nodes(&layout, &nodes, &topology).unwrap();
        let boot = &ram.boot[0];
        assert_eq!(present_bytes(boot.as_ptr(), boot.size()).unwrap(), 4 * MIB);
        let line = policy(boot);
        assert!(line.contains(" huge ") && line.contains(" bind:"), "{line}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::blocks(&ram.node_files[0].metadata().unwrap()) * 512,
            4 * MIB
        );
        // Pages that cannot be allocated fail the start with the count needed and the
        // count free. (Not by draining the pool, which other programs share: a mapping
        // that cannot be written fails the same call.)
        let file = memfd::create("short", memfd::HUGE_2M, Pages::Huge2M).unwrap();
        let len = 2 * memfd::HUGE_2M as usize;
        // SAFETY: a fresh shared mapping of the file, unmapped below; nothing else uses it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let err = allocate_huge(3, addr.cast(), len, None, &topology).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "node 3 needs 2 huge pages of 2 MiB for its boot memory, the host has "
            ),
            "{text}"
        );
        assert!(
            text.contains("free (raise /proc/sys/vm/nr_hugepages)"),
            "{text}"
        );
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(addr, len) };
    }
}
