//! What an evacuation needs from the VMM: a node's memory (its virtio-mem device and
//! memfd) and the guest agent. Both are traits so that the procedure can be tested
//! against a real memfd and a simulated guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{Request, Response};
use virtio_mem::MemBackend;

use crate::agent::{AgentCallError, AgentClient};
use crate::config::REGION_SIZE;
use crate::devices::virtio::mem::MemDevice;

/// The guest agent, one call at a time.
pub trait AgentCall: Send + Sync + 'static {
    fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError>;
}

impl AgentCall for AgentClient {
    fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError> {
        AgentClient::call(self, request, timeout)
    }
}

/// Guest page size: `block_usage` counts pages, `pgmigrate_success` too.
pub const PAGE_SIZE: u64 = 4096;

/// Bytes the guest uses in each of `blocks` that is online (the agent's `block_usage`);
/// blocks missing from the answer are not online.
pub fn guest_in_use(
    agent: &dyn AgentCall,
    blocks: Vec<u32>,
    timeout: Duration,
) -> Result<HashMap<u32, u64>, String> {
    match agent.call(Request::BlockUsage { blocks }, timeout) {
        Ok(Response::BlockUsage { usage }) => Ok(usage
            .into_iter()
            // The guest is untrusted: absurd counts saturate, they never overflow.
            .map(|u| {
                let used = u.pages.saturating_sub(u.free_pages);
                (u.block, used.saturating_mul(PAGE_SIZE))
            })
            .collect()),
        Ok(other) => Err(format!("unexpected answer to block_usage: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Where a node's hotplug region is and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Guest-physical base of the hotplug region (128 MiB aligned).
    pub base: u64,
    /// Bytes per device block (the guest plugs and unplugs these).
    pub block_size: u64,
    /// Regions of [`REGION_SIZE`] in the hotplug region.
    pub regions: u32,
}

impl Geometry {
    pub fn blocks_per_region(&self) -> usize {
        (REGION_SIZE / self.block_size) as usize
    }

    /// Device blocks of `region`.
    pub fn device_blocks(&self, region: u32) -> std::ops::Range<usize> {
        let n = self.blocks_per_region();
        region as usize * n..(region as usize + 1) * n
    }

    /// The guest's memory block (`memoryN`) that is `region`.
    pub fn memory_block(&self, region: u32) -> u32 {
        (self.base / REGION_SIZE) as u32 + region
    }

    /// The region that is the guest's memory block `block`, if it is one of this node's.
    pub fn region_of_memory_block(&self, block: u32) -> Option<u32> {
        let first = (self.base / REGION_SIZE) as u32;
        block
            .checked_sub(first)
            .filter(|region| *region < self.regions)
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
    fn set_requested_size(&self, bytes: u64) -> Result<(), String>;
    /// Host memory `region` holds (memfd data).
    fn resident_bytes(&self, region: u32) -> Result<u64, String>;
}

/// A node's virtio-mem device, shared with the event loop that serves its queue.
pub type SharedMemDevice = Arc<Mutex<MemDevice>>;

impl NodeMemory for SharedMemDevice {
    fn geometry(&self) -> Geometry {
        let dev = self.lock().unwrap_or_else(|e| e.into_inner());
        let g = dev.model().geometry();
        Geometry {
            base: g.addr(),
            block_size: g.block_size(),
            regions: (g.region_size() / REGION_SIZE) as u32,
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

    fn set_requested_size(&self, bytes: u64) -> Result<(), String> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_requested_size(bytes)
            .map_err(|e| e.to_string())
    }

    fn resident_bytes(&self, region: u32) -> Result<u64, String> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .model()
            .backend()
            .resident_bytes(u64::from(region) * REGION_SIZE, REGION_SIZE)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_map_to_memory_blocks() {
        let g = Geometry {
            base: 5 << 30,
            block_size: 2 << 20,
            regions: 4,
        };
        assert_eq!(g.blocks_per_region(), 64);
        assert_eq!(g.device_blocks(2), 128..192);
        assert_eq!(g.memory_block(1), 41);
        assert_eq!(g.region_of_memory_block(43), Some(3));
        assert_eq!(g.region_of_memory_block(44), None);
        assert_eq!(g.region_of_memory_block(39), None);
    }
}
