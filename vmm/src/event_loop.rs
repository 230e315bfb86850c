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

use crate::agent::{AgentClient, AGENT_CALL_TIMEOUT};
use crate::autopilot::service::Autopilot;
use crate::config::VmConfig;
use crate::devices::console_buffer::ConsoleDrain;
use crate::devices::virtio::mem::MemDevice;
use crate::devices::{ExitReason, VmExit};
use crate::evacuation::Evacuations;
use crate::pool::{Pool, API_POOL};
use crate::seccomp::ThreadKind;

#[cfg(test)]
mod api_tests;
mod autopilot;
mod balloon;
mod evacuation;
#[cfg(test)]
mod starve_tests;
mod status;
pub mod timing;

use crate::sync::Locked;
use status::agent_call_error;

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
    evacuations: Arc<Evacuations>,
    /// The VM's autopilot ([`ApiHandler::with_autopilot`]).
    autopilot: Option<Arc<Autopilot>>,
    /// The VM's balloon, if it has one ([`ApiHandler::with_balloon`]).
    balloon: Option<Arc<std::sync::Mutex<crate::devices::virtio::balloon::BalloonDevice>>>,
    /// Where the requests that wait for the guest run, off the event loop.
    helpers: Helpers,
    /// How long each source keeps the loop, for the metrics ([`Self::with_loop_stats`]).
    loop_stats: Option<Arc<timing::LoopStats>>,
    /// The console's buffer, for the metrics ([`Self::with_console`]).
    console: Option<ConsoleDrain>,
}

/// The bounded pools of the requests that wait for the guest agent.
struct Helpers {
    agent_calls: Pool,
    regions: Pool,
}

impl Helpers {
    fn new() -> Self {
        Helpers {
            agent_calls: Pool::new(
                "mempower-agent-call",
                "agent calls",
                API_POOL,
                ThreadKind::Helper,
            ),
            regions: Pool::new(
                "mempower-regions",
                "region listings",
                API_POOL,
                ThreadKind::Helper,
            ),
        }
    }
}

impl ApiHandler {
    /// Starts the API server on `socket` and returns the subscriber that serves it.
    pub fn start(
        socket: &Path,
        config: &VmConfig,
        exit: Arc<VmExit>,
        devices: NodeDevices,
        agent: Option<AgentClient>,
        evacuations: Arc<Evacuations>,
    ) -> Result<(Self, ApiServer), String> {
        let (tx, rx) = mpsc::channel();
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let server_notify = notify.try_clone().map_err(|e| e.to_string())?;
        // Agent calls may legitimately take as long as their own timeout.
        let server_config = mempower_api::ServerConfig {
            reply_timeout: AGENT_CALL_TIMEOUT + std::time::Duration::from_secs(10),
            thread_start: Some(crate::seccomp::enter_api),
            ..Default::default()
        };
        let server = ApiServer::spawn_with_config(socket, tx, server_notify, server_config)
            .map_err(|e| e.to_string())?;
        let info = vm_info(&config.nodes);
        Ok((
            ApiHandler {
                requests: rx,
                notify,
                info,
                exit,
                devices,
                agent,
                evacuations,
                balloon: None,
                autopilot: None,
                helpers: Helpers::new(),
                loop_stats: None,
                console: None,
            },
            server,
        ))
    }

    /// Serves the autopilot's settings and events, and tells it of users' resizes.
    pub fn with_autopilot(mut self, autopilot: Arc<Autopilot>) -> Self {
        self.autopilot = Some(autopilot);
        self
    }

    /// Reports how long each source keeps the event loop in the metrics.
    pub fn with_loop_stats(mut self, stats: Arc<timing::LoopStats>) -> Self {
        self.loop_stats = Some(stats);
        self
    }

    /// Reports the console output dropped because the console did not keep up.
    pub fn with_console(mut self, console: ConsoleDrain) -> Self {
        self.console = Some(console);
        self
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
            ApiAction::GetNodes => match self.start_get_nodes(&request.reply) {
                Ok(()) => return, // A pool thread answers: it measures the nodes.
                Err(e) => Err(e),
            },
            ApiAction::SetRequestedSize { node, bytes } => self
                .set_requested_size(node, bytes)
                .inspect(|_| self.user_acted(node, "a resize")),
            ApiAction::GetAgent => Ok(ApiReply::Agent(self.agent_info())),
            ApiAction::GetRegions { node, query } => {
                match self.start_get_regions(node, query, &request.reply) {
                    Ok(()) => return, // A pool thread answers: it asks the agent.
                    Err(e) => Err(e),
                }
            }
            ApiAction::Evacuate {
                node,
                regions,
                allow_other_nodes,
            } => self
                .evacuations
                .evacuate(node, &regions, allow_other_nodes)
                .inspect(|_| self.user_acted(node, "an evacuation"))
                .map(|job| ApiReply::Accepted(mempower_api::JobAccepted::new(job)))
                .map_err(ApiError::from),
            ApiAction::Compact {
                node,
                release_bytes,
                allow_other_nodes,
            } => self
                .evacuations
                .compact(node, release_bytes, allow_other_nodes)
                .inspect(|_| self.user_acted(node, "a compaction"))
                .map(|job| ApiReply::Accepted(mempower_api::JobAccepted::new(job)))
                .map_err(ApiError::from),
            ApiAction::GetJob { id } => self
                .evacuations
                .job(id)
                .map(ApiReply::Job)
                .map_err(ApiError::from),
            ApiAction::GetJobs => Ok(ApiReply::Jobs(self.evacuations.jobs())),
            ApiAction::PlugRegion { node, region } => self
                .plug_region(node, region)
                .inspect(|_| self.user_acted(node, "a plug")),
            ApiAction::GetAutopilot { node } => self.get_autopilot(node),
            ApiAction::SetAutopilot { node, settings } => self.set_autopilot(node, &settings),
            ApiAction::GetEvents { since } => self.autopilot_events(since),
            ApiAction::GetMetrics => Ok(ApiReply::Metrics(self.metrics())),
            ApiAction::GetBalloon => self.get_balloon(),
            ApiAction::SetBalloonTarget { bytes } => self.set_balloon_target(bytes),
            ApiAction::AgentCall { request: json } => {
                match self.start_agent_call(&json, request.reply.clone()) {
                    Ok(()) => return, // A pool thread answers.
                    Err(e) => Err(e),
                }
            }
        };
        // The API thread may have timed out and gone; nothing to do then.
        let _ = request.reply.send(reply);
    }
}

impl ApiHandler {
    /// The nodes with their resident bytes as last measured, never walked here (see
    /// `evacuation::resident`): for the metrics.
    fn node_status(&self) -> Vec<NodeStatus> {
        let evacuations = &self.evacuations;
        Self::node_statuses(&self.info.nodes, &self.devices, |node| {
            evacuations.resident_bytes(node).unwrap_or_default().0
        })
    }

    /// Answers `GET /nodes` from the region-listing pool, with resident bytes measured
    /// there: a client reading them after its own writes gets those writes' memory,
    /// which the cache behind the metrics may not show yet.
    fn start_get_nodes(&self, reply: &mempower_api::ReplySender) -> Result<(), ApiError> {
        let (nodes, devices) = (self.info.nodes.clone(), self.devices.clone());
        let evacuations = self.evacuations.clone();
        let reply = reply.clone();
        self.helpers.regions.submit(move || {
            let status = Self::node_statuses(&nodes, &devices, |node| {
                evacuations.measure_resident(node).unwrap_or_default()
            });
            let _ = reply.send(Ok(ApiReply::Nodes(status)));
        })?;
        Ok(())
    }

    /// Each node's status, with its hotplug region's resident bytes from `resident`.
    fn node_statuses(
        nodes: &[mempower_api::NodeInfo],
        devices: &NodeDevices,
        resident: impl Fn(u32) -> u64,
    ) -> Vec<NodeStatus> {
        nodes
            .iter()
            .map(|n| match devices.get(n.id as usize) {
                Some(Some(device)) => {
                    let resident_bytes = resident(n.id);
                    let device = device.locked();
                    let model = device.model();
                    let g = model.geometry();
                    NodeStatus {
                        id: n.id,
                        boot_memory_bytes: n.boot_memory_bytes,
                        region_base: g.addr(),
                        region_size: g.region_size(),
                        block_size: g.block_size(),
                        plugged_bytes: model.plugged_size(),
                        requested_bytes: model.requested_size(),
                        resident_bytes,
                    }
                }
                _ => NodeStatus {
                    id: n.id,
                    boot_memory_bytes: n.boot_memory_bytes,
                    region_base: 0,
                    region_size: 0,
                    block_size: 0,
                    plugged_bytes: 0,
                    requested_bytes: 0,
                    resident_bytes: 0,
                },
            })
            .collect()
    }

    /// Forwards one agent request from the agent-call pool: the event loop must never
    /// wait for the guest (unplugging, for one, needs this loop to serve virtio-mem).
    fn start_agent_call(
        &self,
        json: &str,
        reply: mempower_api::ReplySender,
    ) -> Result<(), ApiError> {
        let request: agent_protocol::Request = serde_json::from_str(json)
            .map_err(|e| ApiError::bad_request(format!("not an agent request: {e}")))?;
        let agent = self
            .agent
            .clone()
            .ok_or_else(|| ApiError::new(503, "this VM has no vsock device, so no guest agent"))?;
        self.helpers.agent_calls.submit(move || {
            let result = agent
                .call(request, AGENT_CALL_TIMEOUT)
                .map_err(agent_call_error)
                .and_then(|r| {
                    serde_json::to_string(&r)
                        .map(ApiReply::AgentResponse)
                        .map_err(|e| ApiError::internal(e.to_string()))
                });
            let _ = reply.send(result);
        })?;
        Ok(())
    }

    fn agent_info(&self) -> AgentInfo {
        match &self.agent {
            Some(agent) => agent.status(),
            None => AgentInfo {
                last_error: Some("this VM has no vsock device".into()),
                ..Default::default()
            },
        }
    }

    /// The user's resize: the node's arbiter owns its requested size.
    fn set_requested_size(&mut self, node: u32, bytes: u64) -> Result<ApiReply, ApiError> {
        self.evacuations.resize(node, bytes)?;
        Ok(ApiReply::Empty)
    }
}

/// The VM as `GET /api/v1/vm` first reports it.
fn vm_info(nodes: &[crate::config::NodeConfig]) -> VmInfo {
    VmInfo {
        state: VmState::Running,
        vcpus: nodes.iter().map(|n| n.cpus.len() as u32).sum(),
        nodes: nodes
            .iter()
            .map(|n| NodeInfo {
                id: n.id,
                cpus: n.cpus.clone(),
                boot_memory_bytes: n.memory,
            })
            .collect(),
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
    use crate::agent::AgentCallError;
    use crate::config::NodeConfig;
    use crate::layout::MemoryLayout;
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;

    /// A handler for node 0 (with a 128 MiB region) and node 1 (without), no server.
    pub(super) fn handler() -> (ApiHandler, GuestRam) {
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
        let devices: NodeDevices = vec![Some(Arc::new(std::sync::Mutex::new(dev))), None];
        let handler = ApiHandler {
            requests,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            info: vm_info(&nodes),
            exit: Arc::new(VmExit::new().unwrap()),
            evacuations: crate::evacuation::start::for_vm(&devices, &nodes, None, Vec::new())
                .unwrap(),
            devices,
            agent: None,
            balloon: None,
            autopilot: None,
            helpers: Helpers::new(),
            loop_stats: None,
            console: None,
        };
        (handler, ram)
    }

    #[test]
    fn nodes_report_their_regions() {
        let (h, _ram) = handler();
        assert_eq!((h.info.vcpus, h.info.nodes[1].cpus.clone()), (2, vec![1]));
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

    /// `/metrics` and the node list are answered on the event loop: they read the
    /// resident figures as last measured, and walk no memory file there.
    #[test]
    fn metrics_and_nodes_walk_no_memory_on_the_event_loop() {
        use crate::evacuation::node::walks;
        let (h, _ram) = handler();
        let before = walks::on_this_thread();
        for _ in 0..3 {
            let text = h.metrics();
            assert!(text.contains("mempower_region_resident_bytes{node=\"0\",region=\"0\"} 0"));
            assert!(text.contains("mempower_node_resident_age_seconds{node=\"0\"}"));
            assert_eq!(h.node_status()[0].resident_bytes, 0);
        }
        assert_eq!(walks::on_this_thread(), before);
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
    fn regions_of_known_nodes_only() {
        let (mut h, _ram) = handler();
        let mut ask = |node| {
            let query = Default::default();
            let (request, rx) = ApiRequest::new(ApiAction::GetRegions { node, query }, None);
            h.handle(request);
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
        };
        assert!(
            matches!(ask(0), Ok(ApiReply::Regions(r)) if r.len() == 1 && r[0].in_use_bytes.is_none())
        );
        assert_eq!(
            ask(1),
            Ok(ApiReply::Regions(vec![])),
            "a node without a region has none"
        );
        assert_eq!(ask(5).unwrap_err().status, 404);
    }

    #[test]
    fn agent_status_without_an_agent_says_why() {
        let (h, _ram) = handler();
        let info = h.agent_info();
        assert!(!info.connected);
        assert!(info.last_error.unwrap().contains("no vsock device"));
    }

    #[test]
    fn agent_calls_are_checked_and_answered_off_the_event_loop() {
        let (h, _ram) = handler();
        let (ApiRequest { reply: tx, .. }, _rx) = ApiRequest::new(ApiAction::GetAgent, None);
        let err = h
            .start_agent_call(r#"{"type":"format_disk"}"#, tx.clone())
            .unwrap_err();
        assert_eq!(err.status, 400);
        let err = h
            .start_agent_call(r#"{"type":"inventory"}"#, tx)
            .unwrap_err();
        assert_eq!(err.status, 503, "no vsock device in this handler");
        assert_eq!(
            agent_call_error(AgentCallError::Timeout(AGENT_CALL_TIMEOUT)).status,
            504
        );
        let refused = agent_call_error(AgentCallError::Agent(agent_protocol::AgentError::new(
            16, "busy",
        )));
        assert_eq!(
            (refused.status, refused.message.contains("errno 16")),
            (422, true)
        );
        let unusable = agent_call_error(AgentCallError::BadAnswer {
            request: "signals",
            reason: "node 0 is out of order or named twice".into(),
        });
        assert_eq!(unusable.status, 502, "the agent's fault, not the client's");
    }

    #[test]
    fn shutdown_stops_the_vm() {
        let (mut h, _ram) = handler();
        let (request, rx) = ApiRequest::new(ApiAction::Shutdown, None);
        h.handle(request);
        assert_eq!(rx.recv().unwrap(), Ok(ApiReply::Empty));
        assert!(matches!(h.exit.reason(), Some(ExitReason::Stopped(_))));
    }
}
