//! What an evacuation needs from the VMM: a node's memory (its virtio-mem device and
//! memfd) and the guest agent. Both are traits so that the procedure can be tested
//! against a real memfd and a simulated guest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{Request, Response};
use mempower_api::{RegionState, RegionStatus};
use virtio_mem::MemBackend;

use crate::agent::{AgentCallError, AgentClient};
use crate::devices::virtio::mem::{MemDevice, SlotBackend};
use crate::sync::Locked;

/// What the device, its memfd or the guest agent refused while evacuation asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Resize(#[from] virtio_mem::Error),
    #[error(transparent)]
    Resident(#[from] virtio_mem::BackendError),
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error(
        "region size {} is smaller than the guest's memory block size {}",
        size_text(*.region_size),
        size_text(*.block_size)
    )]
    RegionSmallerThanBlock { region_size: u64, block_size: u64 },
    #[error(
        "the guest's memory block size {} does not fit regions of {}",
        size_text(*.block_size),
        size_text(*.region_size)
    )]
    BlocksDoNotFit { region_size: u64, block_size: u64 },
    #[error("unexpected answer to {request}: {answer:?}")]
    UnexpectedAnswer {
        request: &'static str,
        answer: Box<Response>,
    },
}

/// The guest agent, one call at a time.
pub trait AgentCall: Send + Sync + 'static {
    fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError>;
}

impl AgentCall for AgentClient {
    fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError> {
        AgentClient::call(self, request, timeout)
    }
}

/// Guest page size: `block_usage` and `track` count pages.
pub const PAGE_SIZE: u64 = 4096;

/// Bytes the guest uses in each of `blocks` that is online (the agent's `block_usage`);
/// blocks missing from the answer are not online.
pub fn guest_in_use(
    agent: &dyn AgentCall,
    blocks: Vec<u32>,
    timeout: Duration,
) -> Result<HashMap<u32, u64>, NodeError> {
    match agent.call(Request::BlockUsage { blocks }, timeout) {
        Ok(Response::BlockUsage { usage }) => Ok(usage
            .into_iter()
            // The guest is untrusted: absurd counts saturate, they never overflow.
            .map(|u| {
                let used = u.pages.saturating_sub(u.free_pages);
                (u.block, used.saturating_mul(PAGE_SIZE))
            })
            .collect()),
        Ok(other) => Err(NodeError::UnexpectedAnswer {
            request: "block_usage",
            answer: Box::new(other),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The guest's memory block size on x86_64 unless it reports another: Linux's smallest.
pub const ASSUMED_MEMORY_BLOCK_SIZE: u64 = crate::config::MIN_REGION_SIZE;

/// `bytes` as users write sizes: `128 MiB`, `2 GiB`, else in bytes.
pub fn size_text(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// A node's hotplug region as evacuation cuts it: the virtio-mem device's geometry
/// (where the region is, its device blocks) in regions of `region_size` bytes, each
/// made of whole guest memory blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub device: virtio_mem::Geometry,
    /// Bytes per region: the node's `region=` (the hotplug base is aligned to it).
    pub region_size: u64,
    /// The guest's memory block size: what its agent reported, or
    /// [`ASSUMED_MEMORY_BLOCK_SIZE`] until it has.
    pub memory_block_size: u64,
}

impl Geometry {
    pub fn new(device: virtio_mem::Geometry, region_size: u64) -> Self {
        Geometry {
            device,
            region_size,
            memory_block_size: ASSUMED_MEMORY_BLOCK_SIZE.min(region_size),
        }
    }

    /// This geometry with the guest's memory block size, if its regions are made of
    /// whole blocks of that size.
    pub fn with_memory_block_size(self, block_size: u64) -> Result<Self, NodeError> {
        if block_size > self.region_size {
            return Err(NodeError::RegionSmallerThanBlock {
                region_size: self.region_size,
                block_size,
            });
        }
        let whole_blocks = block_size.is_power_of_two()
            && block_size >= self.block_size()
            && self.region_size % block_size == 0
            && self.base() % block_size == 0;
        if !whole_blocks {
            return Err(NodeError::BlocksDoNotFit {
                region_size: self.region_size,
                block_size,
            });
        }
        Ok(Geometry {
            memory_block_size: block_size,
            ..self
        })
    }

    /// Guest-physical base of the hotplug region.
    pub fn base(&self) -> u64 {
        self.device.addr()
    }

    /// Bytes per device block (the guest plugs and unplugs these).
    pub fn block_size(&self) -> u64 {
        self.device.block_size()
    }

    /// Regions in the hotplug region.
    pub fn regions(&self) -> u32 {
        (self.device.region_size() / self.region_size) as u32
    }

    /// Device blocks per region.
    pub fn blocks_per_region(&self) -> usize {
        (self.region_size / self.block_size()) as usize
    }

    /// Where `region` starts within the hotplug region (and its memfd range).
    pub fn region_offset(&self, region: u32) -> u64 {
        u64::from(region) * self.region_size
    }

    /// Device blocks of `region`.
    pub fn device_blocks(&self, region: u32) -> std::ops::Range<usize> {
        let n = self.blocks_per_region();
        region as usize * n..(region as usize + 1) * n
    }

    /// Device blocks of the guest's memory block `block` (one of this node's).
    pub fn device_blocks_of_memory_block(&self, block: u32) -> std::ops::Range<usize> {
        let per_block = (self.memory_block_size / self.block_size()) as usize;
        let first = (u64::from(block) * self.memory_block_size - self.base()) / self.block_size();
        first as usize..first as usize + per_block
    }

    /// The guest's memory blocks (`memoryN`) that make `region`.
    pub fn memory_blocks(&self, region: u32) -> std::ops::Range<u32> {
        let first = self.memory_block(region);
        first..first + (self.region_size / self.memory_block_size) as u32
    }

    /// The guest's first memory block of `region`.
    pub fn memory_block(&self, region: u32) -> u32 {
        ((self.base() + self.region_offset(region)) / self.memory_block_size) as u32
    }

    /// The region that holds the guest's memory block `block`, if it is this node's.
    pub fn region_of_memory_block(&self, block: u32) -> Option<u32> {
        let first = (self.base() / self.memory_block_size) as u32;
        let per_region = (self.region_size / self.memory_block_size) as u32;
        block
            .checked_sub(first)
            .map(|b| b / per_region)
            .filter(|region| *region < self.regions())
    }
}

/// The guest's memory block size, once its agent has said it: the same for every node,
/// and fixed from the guest's boot.
#[derive(Debug, Default)]
pub struct GuestBlockSize(AtomicU64);

impl GuestBlockSize {
    pub fn known(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|b| *b != 0)
    }

    /// The block size, asked of the agent (its inventory) the first time.
    pub fn learn(&self, agent: &dyn AgentCall, timeout: Duration) -> Result<u64, NodeError> {
        if let Some(known) = self.known() {
            return Ok(known);
        }
        match agent.call(Request::Inventory, timeout)? {
            Response::Inventory { block_size, .. } if block_size != 0 => {
                self.0.store(block_size, Ordering::Relaxed);
                Ok(block_size)
            }
            answer => Err(NodeError::UnexpectedAnswer {
                request: "inventory",
                answer: Box::new(answer),
            }),
        }
    }

    /// `g` with the guest's block size, if known (and fitting), else as it is.
    pub fn apply(&self, g: Geometry) -> Result<Geometry, NodeError> {
        match self.known() {
            Some(block_size) => g.with_memory_block_size(block_size),
            None => Ok(g),
        }
    }
}

/// The device's view at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemSnapshot {
    /// Runs of plugged device blocks, in order: compact for a node of any size.
    pub plugged: Vec<std::ops::Range<usize>>,
    pub plugged_bytes: u64,
    pub requested_bytes: u64,
    /// Host time spent giving the node's memory back so far (hole punches, slot
    /// removals): the difference over a pass is its release work.
    pub release_time: Duration,
}

impl MemSnapshot {
    /// Plugged device blocks in `blocks`.
    pub fn plugged_in(&self, blocks: std::ops::Range<usize>) -> usize {
        let first = self.plugged.partition_point(|run| run.end <= blocks.start);
        self.plugged[first..]
            .iter()
            .take_while(|run| run.start < blocks.end)
            .map(|run| run.end.min(blocks.end) - run.start.max(blocks.start))
            .sum()
    }
}

/// One node's hotplug memory.
pub trait NodeMemory: Send + Sync + 'static {
    fn geometry(&self) -> Geometry;
    fn snapshot(&self) -> MemSnapshot;
    /// Asks the guest to plug or unplug until `bytes` are plugged. Only the node's
    /// [`super::arbiter::Arbiter`] calls this.
    fn set_requested_size(&self, bytes: u64) -> Result<(), NodeError>;
    /// Host memory `region` holds (memfd data).
    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError>;
}

/// The regions of `g` as the device's bitmap describes them, without their resident
/// bytes (see [`fill_resident`]); the ledger adds what it knows (evacuating, failed).
pub fn region_list(memory: &dyn NodeMemory, g: &Geometry) -> Vec<RegionStatus> {
    let s = memory.snapshot();
    (0..g.regions())
        .map(|region| {
            let plugged = s.plugged_in(g.device_blocks(region));
            let state = match plugged {
                0 => RegionState::Released,
                n if n == g.blocks_per_region() => RegionState::Plugged,
                _ => RegionState::Partial,
            };
            RegionStatus {
                index: region,
                memory_block: g.memory_block(region),
                base: g.base() + g.region_offset(region),
                size: g.region_size,
                state,
                phase: None,
                reason: None,
                plugged_bytes: g.device.blocks_to_bytes(plugged),
                resident_bytes: 0,
                in_use_bytes: None,
            }
        })
        .collect()
}

/// Fills in the host memory each of `regions` holds.
pub fn fill_resident(memory: &dyn NodeMemory, regions: &mut [RegionStatus]) {
    for r in regions {
        // A failed query reads as 0: the figure is informative, never acted upon.
        r.resident_bytes = memory.resident_bytes(r.index).unwrap_or(0);
    }
}

/// A node's virtio-mem device, shared with the event loop that serves its queue.
pub type SharedMemDevice = Arc<Mutex<MemDevice>>;

/// A node's device as evacuation sees it: cut into the node's regions.
#[derive(Clone)]
pub struct DeviceMemory {
    pub device: SharedMemDevice,
    /// The node's region size (`NodeConfig::region_size`).
    pub region_size: u64,
    /// Measures resident bytes without the device lock ([`SlotBackend::measurer`]).
    measurer: Arc<SlotBackend>,
}

impl DeviceMemory {
    /// `device` cut into regions of `region_size` bytes.
    pub fn new(device: SharedMemDevice, region_size: u64) -> std::io::Result<Self> {
        let measurer = {
            let dev = device.locked();
            dev.model().backend().measurer()?
        };
        Ok(DeviceMemory {
            device,
            region_size,
            measurer: Arc::new(measurer),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemDevice> {
        self.device.locked()
    }
}

impl NodeMemory for DeviceMemory {
    fn geometry(&self) -> Geometry {
        Geometry::new(self.lock().model().geometry(), self.region_size)
    }

    fn snapshot(&self) -> MemSnapshot {
        let dev = self.lock();
        let model = dev.model();
        let g = model.geometry();
        let block = |addr: u64| ((addr - g.addr()) / g.block_size()) as usize;
        MemSnapshot {
            plugged: model
                .plugged_ranges()
                .into_iter()
                .map(|r| block(r.start)..block(r.end))
                .collect(),
            plugged_bytes: model.plugged_size(),
            requested_bytes: model.requested_size(),
            release_time: model.backend().release_time(),
        }
    }

    fn set_requested_size(&self, bytes: u64) -> Result<(), NodeError> {
        self.lock().set_requested_size(bytes)?;
        Ok(())
    }

    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError> {
        #[cfg(test)]
        walks::count();
        // Without the device lock: the walk may take long on a large or fragmented
        // region, and the event loop must not wait for it to serve the device.
        let offset = u64::from(region) * self.region_size;
        self.measurer
            .resident_bytes(offset, self.region_size)
            .map_err(NodeError::from)
    }
}

/// Walks of a node's memory file ([`DeviceMemory::resident_bytes`]) made by the
/// calling thread, so that tests can tell that readers on the event loop make none.
#[cfg(test)]
pub mod walks {
    use std::cell::Cell;

    thread_local! {
        static WALKS: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn count() {
        WALKS.with(|w| w.set(w.get() + 1));
    }

    /// Walks this thread made so far.
    pub fn on_this_thread() -> u64 {
        WALKS.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn geometry(base: u64, size: u64, region_size: u64) -> Geometry {
        Geometry::new(
            virtio_mem::Geometry::new(base, size, 2 * MIB).unwrap(),
            region_size,
        )
    }

    #[test]
    fn regions_map_to_memory_blocks() {
        let g = geometry(5 * GIB, 4 * 128 * MIB, 128 * MIB);
        assert_eq!((g.regions(), g.blocks_per_region()), (4, 64));
        assert_eq!(g.region_offset(3), 3 * 128 * MIB);
        assert_eq!(g.device_blocks(2), 128..192);
        assert_eq!(g.memory_block(1), 41);
        assert_eq!(g.memory_blocks(1), 41..42);
        assert_eq!(g.region_of_memory_block(43), Some(3));
        assert_eq!(g.region_of_memory_block(44), None);
        assert_eq!(g.region_of_memory_block(39), None);
        assert_eq!(g.device_blocks_of_memory_block(42), 128..192);
    }

    #[test]
    fn regions_of_several_memory_blocks() {
        // 1 GiB regions at 8 GiB; the guest's blocks are 128 MiB until it says 256 MiB.
        let g = geometry(8 * GIB, 4 * GIB, GIB);
        assert_eq!((g.regions(), g.blocks_per_region()), (4, 512));
        assert_eq!(g.memory_blocks(1), 72..80);
        assert_eq!(g.region_of_memory_block(79), Some(1));
        assert_eq!(g.region_of_memory_block(80), Some(2));
        assert_eq!(g.region_of_memory_block(96), None);
        let g = g.with_memory_block_size(256 * MIB).unwrap();
        assert_eq!(g.memory_blocks(1), 36..40);
        assert_eq!(g.device_blocks_of_memory_block(37), 640..768);
        assert_eq!(g.region_of_memory_block(40), Some(2));
    }

    #[test]
    fn a_region_smaller_than_the_guests_block_is_refused() {
        let g = geometry(8 * GIB, 4 * GIB, 128 * MIB);
        let e = g.with_memory_block_size(2 * GIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "region size 128 MiB is smaller than the guest's memory block size 2 GiB"
        );
        for odd in [96 * MIB, MIB, 0] {
            let e = g.with_memory_block_size(odd).unwrap_err();
            assert!(matches!(e, NodeError::BlocksDoNotFit { .. }), "{odd}: {e}");
        }
        // A base that is not aligned to the guest's block does not fit either.
        let g = geometry(8 * GIB + 128 * MIB, 2 * GIB, GIB);
        assert!(g.with_memory_block_size(GIB).is_err());
        assert_eq!(size_text(3 * 4096), "12288 bytes");
    }

    #[test]
    fn the_guests_block_size_is_asked_once() {
        struct Inventory(std::sync::atomic::AtomicU32);
        impl AgentCall for Inventory {
            fn call(&self, r: Request, _: Duration) -> Result<Response, AgentCallError> {
                assert_eq!(r, Request::Inventory);
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(Response::Inventory {
                    block_size: 256 * MIB,
                    nodes: vec![],
                    blocks: vec![],
                })
            }
        }
        let agent = Inventory(Default::default());
        let known = GuestBlockSize::default();
        assert_eq!(known.known(), None);
        let g = geometry(8 * GIB, 4 * GIB, GIB);
        assert_eq!(known.apply(g).unwrap(), g, "nothing known, nothing changed");
        for _ in 0..3 {
            assert_eq!(
                known.learn(&agent, Duration::from_secs(1)).unwrap(),
                256 * MIB
            );
        }
        assert_eq!(agent.0.load(Ordering::SeqCst), 1);
        assert_eq!(known.apply(g).unwrap().memory_block_size, 256 * MIB);
    }

    #[test]
    fn snapshots_count_plugged_blocks_in_runs() {
        let s = MemSnapshot {
            plugged: vec![2..5, 10..20, 64..128],
            plugged_bytes: 0,
            requested_bytes: 0,
            release_time: Duration::ZERO,
        };
        assert_eq!(s.plugged_in(0..64), 3 + 10);
        assert_eq!(s.plugged_in(4..11), 2);
        assert_eq!(s.plugged_in(20..64), 0);
        assert_eq!(s.plugged_in(64..128), 64);
        assert_eq!(s.plugged_in(100..1000), 28);
    }

    /// A node of one 128 MiB region, nothing plugged.
    fn one_region() -> (GuestRam, DeviceMemory) {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[128 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let dev = DeviceMemory::new(Arc::new(Mutex::new(dev)), 128 * MIB).unwrap();
        (ram, dev)
    }

    #[test]
    fn regions_follow_the_bitmap_and_the_memfd() {
        let (ram, dev) = one_region();
        let list = |dev: &DeviceMemory| {
            let mut regions = region_list(dev, &dev.geometry());
            fill_resident(dev, &mut regions);
            regions
        };
        let regions = list(&dev);
        assert_eq!(regions.len(), 1);
        let r = &regions[0];
        assert_eq!(
            (r.index, r.memory_block, r.base, r.size),
            (0, 32, 1 << 32, 128 * MIB)
        );
        assert_eq!(
            (r.state, r.plugged_bytes, r.resident_bytes),
            (RegionState::Released, 0, 0)
        );
        // The guest plugs two blocks and writes one page into the first.
        NodeMemory::set_requested_size(&dev, 4 * MIB).unwrap();
        let plug = virtio_mem::Request::Plug(virtio_mem::BlockRange {
            addr: 1 << 32,
            nb_blocks: 2,
        });
        let answer = dev.device.lock().unwrap().model_mut().execute(&plug);
        assert_eq!(answer.kind, virtio_mem::ResponseType::Ack);
        use vm_memory::Bytes;
        ram.memory
            .write_obj(7u64, vm_memory::GuestAddress(1 << 32))
            .unwrap();
        let r = &list(&dev)[0];
        assert_eq!(
            (r.state, r.plugged_bytes, r.resident_bytes),
            (RegionState::Partial, 4 * MIB, 4096)
        );
        let runs = dev.snapshot().plugged;
        assert_eq!((runs.len(), runs[0].clone()), (1, 0..2));
    }

    /// A walk of a fragmented region takes a while (an extent per written page); the
    /// device, which the event loop locks to serve its queue, is never held for it.
    #[test]
    fn measuring_a_region_never_holds_the_device() {
        let (ram, dev) = one_region();
        NodeMemory::set_requested_size(&dev, 128 * MIB).unwrap();
        let plug = virtio_mem::Request::Plug(virtio_mem::BlockRange {
            addr: 1 << 32,
            nb_blocks: 64,
        });
        dev.device.lock().unwrap().model_mut().execute(&plug);
        // Every other page: 16384 extents of data.
        use vm_memory::Bytes;
        for page in (0..128 * MIB / 4096).step_by(2) {
            ram.memory
                .write_obj(1u8, vm_memory::GuestAddress((1 << 32) + page * 4096))
                .unwrap();
        }
        let t = std::time::Instant::now();
        assert_eq!(dev.resident_bytes(0).unwrap(), 64 * MIB);
        let walk = t.elapsed();
        let walker = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    dev.resident_bytes(0).unwrap();
                }
            })
        };
        let mut longest = Duration::ZERO;
        while !walker.is_finished() {
            let t = std::time::Instant::now();
            drop(dev.device.lock().unwrap());
            longest = longest.max(t.elapsed());
            std::thread::sleep(Duration::from_micros(200));
        }
        walker.join().unwrap();
        println!("a walk of the region took {walk:?}; the device waited at most {longest:?}");
        assert!(
            longest < walk / 4,
            "waited {longest:?} for a walk of {walk:?}"
        );
    }

    /// A node of 1 TiB in 128 MiB regions: 8192 regions, listed in a blink.
    #[test]
    fn a_node_of_8192_regions_is_listed_quickly() {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[1 << 40]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let dev = DeviceMemory::new(Arc::new(Mutex::new(dev)), 128 * MIB).unwrap();
        NodeMemory::set_requested_size(&dev, 1 << 40).unwrap();
        // The guest plugs every other region whole.
        for region in (0..8192u64).step_by(2) {
            let plug = virtio_mem::Request::Plug(virtio_mem::BlockRange {
                addr: (1 << 32) + region * 128 * MIB,
                nb_blocks: 64,
            });
            let answer = dev.device.lock().unwrap().model_mut().execute(&plug);
            assert_eq!(answer.kind, virtio_mem::ResponseType::Ack);
        }
        let t = std::time::Instant::now();
        let g = dev.geometry();
        let mut regions = region_list(&dev, &g);
        fill_resident(&dev, &mut regions);
        let took = t.elapsed();
        assert_eq!(regions.len(), 8192);
        assert_eq!(
            regions
                .iter()
                .filter(|r| r.state == RegionState::Plugged)
                .count(),
            4096
        );
        assert_eq!(regions[8191].memory_block, 32 + 8191);
        assert_eq!(regions[8190].plugged_bytes, 128 * MIB);
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }
}
