//! What an evacuation needs from the VMM: a node's memory (its virtio-mem device and
//! memfd) and the guest agent. Both are traits so that the procedure can be tested
//! against a real memfd and a simulated guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{Request, Response};
use mempower_api::{RegionState, RegionStatus};
use virtio_mem::MemBackend;

use crate::agent::{AgentCallError, AgentClient};
use crate::config::REGION_SIZE;
use crate::devices::virtio::mem::MemDevice;

/// What the device, its memfd or the guest agent refused while evacuation asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Resize(#[from] virtio_mem::Error),
    #[error(transparent)]
    Resident(#[from] virtio_mem::BackendError),
    #[error(transparent)]
    Agent(#[from] AgentCallError),
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

/// A node's hotplug region as evacuation cuts it: the virtio-mem device's geometry
/// (where the region is, its device blocks) in regions of `region_size` bytes, each one
/// Linux memory block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub device: virtio_mem::Geometry,
    /// Bytes per region: the guest's memory block size (the base is aligned to it).
    pub region_size: u64,
}

impl Geometry {
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

    /// The guest's memory block (`memoryN`) that is `region`.
    pub fn memory_block(&self, region: u32) -> u32 {
        (self.base() / self.region_size) as u32 + region
    }

    /// The region that is the guest's memory block `block`, if it is one of this node's.
    pub fn region_of_memory_block(&self, block: u32) -> Option<u32> {
        let first = (self.base() / self.region_size) as u32;
        block
            .checked_sub(first)
            .filter(|region| *region < self.regions())
    }
}

/// The device's view at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemSnapshot {
    /// Plugged state of every device block.
    pub plugged: Vec<bool>,
    pub plugged_bytes: u64,
    pub requested_bytes: u64,
}

impl MemSnapshot {
    pub fn plugged_in(&self, blocks: std::ops::Range<usize>) -> usize {
        self.plugged[blocks].iter().filter(|p| **p).count()
    }
}

/// One node's hotplug memory.
pub trait NodeMemory: Send + Sync + 'static {
    fn geometry(&self) -> Geometry;
    fn snapshot(&self) -> MemSnapshot;
    /// Asks the guest to plug or unplug until `bytes` are plugged.
    fn set_requested_size(&self, bytes: u64) -> Result<(), NodeError>;
    /// Host memory `region` holds (memfd data).
    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError>;
}

/// `memory`'s regions as its device's bitmap and memfd describe them; the ledger adds
/// what it knows (evacuating, failed).
pub fn region_list(memory: &dyn NodeMemory) -> Vec<RegionStatus> {
    let g = memory.geometry();
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
                // A failed query reads as 0: the figure is informative, never acted upon.
                resident_bytes: memory.resident_bytes(region).unwrap_or(0),
                in_use_bytes: None,
            }
        })
        .collect()
}

/// A node's virtio-mem device, shared with the event loop that serves its queue.
pub type SharedMemDevice = Arc<Mutex<MemDevice>>;

impl NodeMemory for SharedMemDevice {
    fn geometry(&self) -> Geometry {
        let dev = self.lock().unwrap_or_else(|e| e.into_inner());
        Geometry {
            device: dev.model().geometry(),
            region_size: REGION_SIZE,
        }
    }

    fn snapshot(&self) -> MemSnapshot {
        let dev = self.lock().unwrap_or_else(|e| e.into_inner());
        let model = dev.model();
        MemSnapshot {
            plugged: (0..model.geometry().block_count())
                .map(|b| model.block_state(b) == Some(true))
                .collect(),
            plugged_bytes: model.plugged_size(),
            requested_bytes: model.requested_size(),
        }
    }

    fn set_requested_size(&self, bytes: u64) -> Result<(), NodeError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_requested_size(bytes)?;
        Ok(())
    }

    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError> {
        let g = self.geometry();
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .model()
            .backend()
            .resident_bytes(g.region_offset(region), g.region_size)
            .map_err(NodeError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;

    #[test]
    fn regions_map_to_memory_blocks() {
        let g = Geometry {
            device: virtio_mem::Geometry::new(5 << 30, 4 * REGION_SIZE, 2 << 20).unwrap(),
            region_size: REGION_SIZE,
        };
        assert_eq!((g.regions(), g.blocks_per_region()), (4, 64));
        assert_eq!(g.region_offset(3), 3 * REGION_SIZE);
        assert_eq!(g.device_blocks(2), 128..192);
        assert_eq!(g.memory_block(1), 41);
        assert_eq!(g.region_of_memory_block(43), Some(3));
        assert_eq!(g.region_of_memory_block(44), None);
        assert_eq!(g.region_of_memory_block(39), None);
    }

    #[test]
    fn regions_follow_the_bitmap_and_the_memfd() {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[128 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let dev: SharedMemDevice = Arc::new(Mutex::new(dev));
        let regions = region_list(&dev);
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
        let answer = dev.lock().unwrap().model_mut().execute(&plug);
        assert_eq!(answer.kind, virtio_mem::ResponseType::Ack);
        use vm_memory::Bytes;
        ram.memory
            .write_obj(7u64, vm_memory::GuestAddress(1 << 32))
            .unwrap();
        let r = &region_list(&dev)[0];
        assert_eq!(
            (r.state, r.plugged_bytes, r.resident_bytes),
            (RegionState::Partial, 4 * MIB, 4096)
        );
    }
}
