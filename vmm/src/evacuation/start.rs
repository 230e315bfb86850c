//! The VM's evacuation service, made once by the VM for whoever drives it (the API, the
//! autopilot): a VM without an API socket has its workers too.

use std::sync::Arc;

use super::{AgentCall, DeviceMemory, EvacuationAgents, Evacuations, NodeMemory, Timeouts};
use crate::agent::AgentClient;
use crate::config::NodeConfig;
use crate::devices::virtio::mem::MemDevice;

/// One `mempowerd/N` per node with a hotplug region (`devices`, indexed by node id),
/// each cutting its node's device into the node's regions, each with an agent
/// connection of its own (see [`EvacuationAgents`]).
pub fn for_vm(
    devices: &[Option<Arc<std::sync::Mutex<MemDevice>>>],
    nodes: &[NodeConfig],
    agent: Option<&AgentClient>,
    evacuation_agents: Vec<AgentClient>,
) -> Result<Arc<Evacuations>, String> {
    let memories = devices
        .iter()
        .zip(nodes)
        .map(|(d, node)| {
            d.clone()
                .map(|device| {
                    DeviceMemory::new(device, node.region_size)
                        .map(|m| Arc::new(m) as Arc<dyn NodeMemory>)
                        .map_err(|e| format!("node {}'s memory file: {e}", node.id))
                })
                .transpose()
        })
        .collect::<Result<_, String>>()?;
    let agents = match agent {
        Some(queries) if !evacuation_agents.is_empty() => Some(EvacuationAgents {
            workers: evacuation_agents
                .into_iter()
                .map(|a| Arc::new(a) as Arc<dyn AgentCall>)
                .collect(),
            queries: Arc::new(queries.clone()),
        }),
        _ => None,
    };
    // Each node's worker runs on the CPUs of its host-node=, if it has one.
    let placement = crate::host_numa::HostTopology::system()
        .placement(nodes)
        .map_err(|e| e.to_string())?;
    Evacuations::start_placed(memories, agents, Timeouts::default(), &placement)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}
