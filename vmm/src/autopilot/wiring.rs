//! The autopilot on a real VM: its signals come from the guest agent and the host's
//! files, its decisions go to the evacuation service (the one way to a node's size).

use std::time::Duration;

use agent_protocol::GuestSignals;
use mempower_api::JobState;

use super::service::{NodeControl, Sensors, Sizes};
use crate::agent::AgentClient;
use crate::evacuation::Evacuations;
use crate::host_signals::{HostFiles, HostSignals};

impl NodeControl for Evacuations {
    fn sizes(&self, node: u32) -> Result<Sizes, String> {
        let (requested, plugged) = Evacuations::sizes(self, node).map_err(|e| e.to_string())?;
        let target = self.target(node).map_err(|e| e.to_string())?;
        Ok(Sizes {
            target,
            requested,
            plugged,
        })
    }

    fn set_target(&self, node: u32, bytes: u64) -> Result<(), String> {
        self.resize(node, bytes).map_err(|e| e.to_string())
    }

    fn shrink(&self, node: u32, regions: u32) -> Result<u64, String> {
        Evacuations::shrink(self, node, regions).map_err(|e| e.to_string())
    }

    fn running(&self, id: u64) -> bool {
        self.job(id).is_ok_and(|j| j.state != JobState::Done)
    }
}

/// The guest agent (its query connection) and the host's files.
pub struct VmSensors {
    pub agent: AgentClient,
    pub host: HostFiles,
    /// How long a signals call may take: an interval, so that a stuck agent delays one
    /// sample, not the loop.
    pub timeout: Duration,
}

impl Sensors for VmSensors {
    fn guest(&mut self) -> Result<GuestSignals, String> {
        if !self.agent.status().connected {
            return Err("the guest agent is not connected".into());
        }
        self.agent.signals(self.timeout).map_err(|e| e.to_string())
    }

    fn host(&mut self) -> Result<HostSignals, String> {
        self.host.read().map_err(|e| e.to_string())
    }
}
