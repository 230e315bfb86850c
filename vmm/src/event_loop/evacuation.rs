//! The API handler's evacuation side: region lists (with the guest's usage, asked off
//! the event loop), plugging and metrics. Jobs are [`crate::evacuation::Evacuations`]'.

use mempower_api::{ApiError, ApiReply, ApiResult, ReplySender};

use super::ApiHandler;
use crate::evacuation::{metrics, Evacuations};

impl ApiHandler {
    /// Answers `GET /nodes/{id}/regions` from a thread of its own: the guest's usage
    /// comes from the agent, and the event loop never waits for the guest.
    pub(super) fn start_get_regions(&self, node: u32, reply: &ReplySender) -> Result<(), ApiError> {
        let device = match self.devices.get(node as usize) {
            None => return Err(ApiError::not_found(format!("no such node: {node}"))),
            Some(None) => {
                let _ = reply.send(Ok(ApiReply::Regions(Vec::new())));
                return Ok(());
            }
            Some(Some(device)) => device.clone(),
        };
        let evacuations = self.evacuations.clone();
        let connected = self.agent.as_ref().is_some_and(|a| a.status().connected);
        let reply = reply.clone();
        std::thread::Builder::new()
            .name("mempower-regions".into())
            .spawn(move || {
                let mut regions = device.lock().unwrap_or_else(|e| e.into_inner()).regions();
                evacuations.annotate(node, &mut regions);
                let usage = match evacuations.agent() {
                    // Only blocks the guest has: unplugged ones were removed, and the
                    // agent refuses a request naming a block that does not exist.
                    Some(agent) if connected => Evacuations::in_use_bytes(
                        &*agent,
                        regions
                            .iter()
                            .filter(|r| r.plugged_bytes > 0)
                            .map(|r| r.memory_block)
                            .collect(),
                    ),
                    _ => None,
                };
                for r in &mut regions {
                    r.in_use_bytes = usage.as_ref().and_then(|u| u.get(&r.memory_block).copied());
                }
                let _ = reply.send(Ok(ApiReply::Regions(regions)));
            })
            .map_err(|e| ApiError::internal(format!("cannot list the regions: {e}")))?;
        Ok(())
    }

    pub(super) fn plug_region(&self, node: u32, region: u32) -> ApiResult {
        self.evacuations.plug(node, region)?;
        let status = self
            .node_status()
            .into_iter()
            .find(|n| n.id == node)
            .ok_or_else(|| ApiError::not_found(format!("no such node: {node}")))?;
        Ok(ApiReply::Node(status))
    }

    pub(super) fn metrics(&self) -> String {
        let nodes = self.node_status();
        let mut regions = Vec::new();
        let mut counters = Vec::new();
        for (id, device) in self.devices.iter().enumerate() {
            let Some(device) = device else { continue };
            let mut list = device.lock().unwrap_or_else(|e| e.into_inner()).regions();
            self.evacuations.annotate(id as u32, &mut list);
            regions.push((id as u32, list));
            counters.push((id as u32, self.evacuations.counters(id as u32)));
        }
        let connected = self.agent.as_ref().is_some_and(|a| a.status().connected);
        metrics::render(&nodes, &regions, &counters, connected)
    }
}
