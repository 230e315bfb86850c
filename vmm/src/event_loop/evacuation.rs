//! The API handler's evacuation side: region lists (with the guest's usage, asked off
//! the event loop), plugging and metrics. Jobs are [`crate::evacuation::Evacuations`]'.

use mempower_api::{ApiError, ApiReply, ApiResult, RegionQuery, ReplySender};

use super::ApiHandler;
use crate::evacuation::service::Resident;
use crate::evacuation::{metrics, EvacuationError};

impl ApiHandler {
    /// Answers `GET /nodes/{id}/regions` from the region-listing pool: the guest's usage
    /// (and its memory block size, the first time) come from the agent, and the event
    /// loop never waits for the guest.
    pub(super) fn start_get_regions(
        &self,
        node: u32,
        query: RegionQuery,
        reply: &ReplySender,
    ) -> Result<(), ApiError> {
        match self.evacuations.check_node(node) {
            Ok(()) => {}
            Err(EvacuationError::NoHotplugRegion(_)) => {
                let _ = reply.send(Ok(ApiReply::Regions(Vec::new())));
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let evacuations = self.evacuations.clone();
        let connected = self.agent.as_ref().is_some_and(|a| a.status().connected);
        let reply = reply.clone();
        self.helpers.regions.submit(move || {
            if connected {
                evacuations.learn_block_size();
            }
            let answer = evacuations
                .regions(node, &query, Resident::Exact)
                .map(|mut regions| {
                    if connected {
                        evacuations.add_usage(node, &mut regions);
                    }
                    ApiReply::Regions(regions)
                });
            let _ = reply.send(answer.map_err(ApiError::from));
        })?;
        Ok(())
    }

    pub(super) fn plug_region(&self, node: u32, region: u32) -> ApiResult {
        self.evacuations.plug(node, region)?;
        let status = self
            .node_status()
            .into_iter()
            .find(|n| n.id == node)
            .ok_or(EvacuationError::NoSuchNode(node))?;
        Ok(ApiReply::Node(status))
    }

    pub(super) fn metrics(&self) -> String {
        let nodes = self.node_status();
        let mut regions = Vec::new();
        let mut counters = Vec::new();
        for id in 0..self.devices.len() as u32 {
            // Nodes without a hotplug region have no regions.
            // As last measured: a walk of every region would hold the loop (see
            // `evacuation::resident`).
            let Ok(list) = self
                .evacuations
                .regions(id, &RegionQuery::default(), Resident::Cached)
            else {
                continue;
            };
            regions.push((id, list));
            counters.push((id, self.evacuations.counters(id)));
        }
        let connected = self.agent.as_ref().is_some_and(|a| a.status().connected);
        let mut text = metrics::render(&nodes, &regions, &counters, connected);
        let ages: Vec<(u32, Option<std::time::Duration>)> = nodes
            .iter()
            .filter_map(|n| {
                let (_, age) = self.evacuations.resident_bytes(n.id).ok()?;
                Some((n.id, age))
            })
            .collect();
        text.push_str(&metrics::render_resident_age(&ages));
        if let Some(stats) = &self.loop_stats {
            text.push_str(&stats.render());
        }
        if let Some(console) = &self.console {
            text.push_str(&metrics::render_console(console.dropped()));
        }
        if let Some(balloon) = self.balloon_status() {
            text.push_str(&metrics::render_balloon(&balloon));
        }
        text.push_str(&self.autopilot_metrics());
        text
    }
}
