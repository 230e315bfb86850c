//! Subscribers of the VMM's event loop (event-manager): the exit watcher, and the API
//! handler that answers requests from the API thread.

use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use mempower_api::{
    AgentInfo, ApiAction, ApiError, ApiReply, ApiRequest, ApiServer, NodeInfo, NodeStatus, VmInfo,
    VmState,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::agent::AgentClient;
use crate::config::VmConfig;
use crate::devices::virtio::mem::MemDevice;
use crate::devices::{ExitReason, VmExit};

/// Each node's virtio-mem device, indexed by node id (`None`: no hotplug region).
pub type NodeDevices = Vec<Option<Arc<std::sync::Mutex<MemDevice>>>>;

/// Wakes the loop when the VM stops, so that `run` can see the reason and return.
pub struct ExitWatcher {
    exit: Arc<VmExit>,
}

impl ExitWatcher {
    pub fn new(exit: Arc<VmExit>) -> Self {
        ExitWatcher { exit }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.exit.event, EventSet::IN))
            .expect("a fresh eventfd can always join the epoll set");
    }
}

/// Answers the API thread. Runs on the VMM thread, so it may touch VM state freely.
pub struct ApiHandler {
    requests: Receiver<ApiRequest>,
    notify: EventFd,
    info: VmInfo,
    exit: Arc<VmExit>,
    devices: NodeDevices,
    agent: Option<AgentClient>,
}

impl ApiHandler {
    /// Starts the API server on `socket` and returns the subscriber that serves it.
    pub fn start(
        socket: &Path,
        config: &VmConfig,
        exit: Arc<VmExit>,
        devices: NodeDevices,
        agent: Option<AgentClient>,
    ) -> Result<(Self, ApiServer), String> {
        let (tx, rx) = mpsc::channel();
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let server_notify = notify.try_clone().map_err(|e| e.to_string())?;
        let server = ApiServer::spawn(socket, tx, server_notify).map_err(|e| e.to_string())?;
        let info = VmInfo {
            state: VmState::Running,
            vcpus: config.vcpu_count(),
            nodes: config
                .nodes
                .iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    cpus: n.cpus.clone(),
                    boot_memory_bytes: n.memory,
                })
                .collect(),
        };
        Ok((
            ApiHandler {
                requests: rx,
                notify,
                info,
                exit,
                devices,
                agent,
            },
            server,
        ))
    }

    fn handle(&mut self, request: ApiRequest) {
        let reply = match request.action {
            ApiAction::GetVmInfo => Ok(ApiReply::VmInfo(self.info.clone())),
            ApiAction::Shutdown => {
                self.info.state = VmState::ShuttingDown;
                self.exit.set(ExitReason::Stopped(
                    "shutdown requested through the API".into(),
                ));
                Ok(ApiReply::Empty)
            }
            ApiAction::GetNodes => Ok(ApiReply::Nodes(self.node_status())),
            ApiAction::SetRequestedSize { node, bytes } => self.set_requested_size(node, bytes),
            ApiAction::GetAgent => Ok(ApiReply::Agent(self.agent_info())),
        };
        // The API thread may have timed out and gone; nothing to do then.
        let _ = request.reply.send(reply);
    }
}

impl ApiHandler {
    fn node_status(&self) -> Vec<NodeStatus> {
        self.info
            .nodes
            .iter()
            .map(|n| {
                let mut status = NodeStatus {
                    id: n.id,
                    boot_memory_bytes: n.boot_memory_bytes,
                    region_base: 0,
                    region_size: 0,
                    block_size: 0,
                    plugged_bytes: 0,
                    requested_bytes: 0,
                    resident_bytes: 0,
                };
                if let Some(Some(device)) = self.devices.get(n.id as usize) {
                    let s = device.lock().unwrap_or_else(|e| e.into_inner()).status();
                    status.region_base = s.region_base;
                    status.region_size = s.region_size;
                    status.block_size = s.block_size;
                    status.plugged_bytes = s.plugged_bytes;
                    status.requested_bytes = s.requested_bytes;
                    status.resident_bytes = s.resident_bytes;
                }
                status
            })
            .collect()
    }

    fn agent_info(&self) -> AgentInfo {
        match &self.agent {
            Some(agent) => {
                let s = agent.status();
                AgentInfo {
                    connected: s.connected,
                    protocol_version: s.protocol_version,
                    agent_version: s.agent_version,
                    kernel: s.kernel,
                    last_error: s.last_error,
                    connections: s.connections,
                }
            }
            None => AgentInfo {
                last_error: Some("this VM has no vsock device".into()),
                ..Default::default()
            },
        }
    }

    fn set_requested_size(&mut self, node: u32, bytes: u64) -> Result<ApiReply, ApiError> {
        let device = match self.devices.get(node as usize) {
            None => return Err(ApiError::not_found(format!("no such node: {node}"))),
            Some(None) => {
                return Err(ApiError::bad_request(format!(
                    "node {node} has no hotplug region"
                )))
            }
            Some(Some(device)) => device,
        };
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_requested_size(bytes)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(ApiReply::Empty)
    }
}

impl MutEventSubscriber for ApiHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.notify.read();
        while let Ok(request) = self.requests.try_recv() {
            self.handle(request);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.notify, EventSet::IN))
            .expect("a fresh eventfd can always join the epoll set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::layout::MemoryLayout;
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;

    /// A handler for node 0 (with a 128 MiB region) and node 1 (without), no server.
    fn handler() -> (ApiHandler, GuestRam) {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB, 64 * MIB], &[128 * MIB, 0]).unwrap();
        let ram = GuestRam::new(&layout, 2).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let (_tx, requests) = mpsc::channel();
        let nodes = [0, 1].map(|id| NodeConfig {
            id,
            cpus: vec![id],
            memory: 64 * MIB,
            ..Default::default()
        });
        let handler = ApiHandler {
            requests,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            info: VmInfo {
                state: VmState::Running,
                vcpus: 2,
                nodes: nodes
                    .iter()
                    .map(|n| NodeInfo {
                        id: n.id,
                        cpus: n.cpus.clone(),
                        boot_memory_bytes: n.memory,
                    })
                    .collect(),
            },
            exit: Arc::new(VmExit::new().unwrap()),
            devices: vec![Some(Arc::new(std::sync::Mutex::new(dev))), None],
            agent: None,
        };
        (handler, ram)
    }

    #[test]
    fn nodes_report_their_regions() {
        let (h, _ram) = handler();
        let nodes = h.node_status();
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (
                nodes[0].region_base,
                nodes[0].region_size,
                nodes[0].block_size
            ),
            (1 << 32, 128 * MIB, 2 * MIB)
        );
        assert_eq!(
            (nodes[1].region_size, nodes[1].boot_memory_bytes),
            (0, 64 * MIB)
        );
    }

    #[test]
    fn resize_errors_map_to_http_statuses() {
        let (mut h, _ram) = handler();
        assert_eq!(h.set_requested_size(0, 64 * MIB), Ok(ApiReply::Empty));
        assert_eq!(h.node_status()[0].requested_bytes, 64 * MIB);
        assert_eq!(h.set_requested_size(7, 0).unwrap_err().status, 404);
        let no_region = h.set_requested_size(1, 0).unwrap_err();
        assert_eq!(
            (
                no_region.status,
                no_region.message.contains("no hotplug region")
            ),
            (400, true)
        );
        for bad in [3 * MIB, 256 * MIB] {
            assert_eq!(
                h.set_requested_size(0, bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }
        assert_eq!(
            h.node_status()[0].requested_bytes,
            64 * MIB,
            "refused sizes change nothing"
        );
    }

    #[test]
    fn agent_status_without_an_agent_says_why() {
        let (h, _ram) = handler();
        let info = h.agent_info();
        assert!(!info.connected);
        assert!(info.last_error.unwrap().contains("no vsock device"));
    }

    #[test]
    fn shutdown_stops_the_vm() {
        let (mut h, _ram) = handler();
        let (tx, rx) = mpsc::channel();
        h.handle(ApiRequest {
            action: ApiAction::Shutdown,
            reply: tx,
        });
        assert_eq!(rx.recv().unwrap(), Ok(ApiReply::Empty));
        assert!(matches!(h.exit.reason(), Some(ExitReason::Stopped(_))));
    }
}
