//! Types exchanged between the API thread and the VMM thread, and the JSON
//! documents the REST API sends and accepts.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use serde::{Deserialize, Serialize};

use crate::evacuation::{Job, JobAccepted};

/// What `GET /api/v1/vm` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Life-cycle state of the VM.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The guest NUMA nodes.
    pub nodes: Vec<NodeInfo>,
}

/// Life-cycle state of the VM, as seen through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs are running.
    Running,
    /// A shutdown was requested and is in progress.
    ShuttingDown,
}

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id, as the guest sees it in its SRAT.
    pub id: u32,
    /// The vCPUs of this node.
    pub cpus: Vec<u32>,
    /// Bytes of memory the node had at boot.
    pub boot_memory_bytes: u64,
}

/// What the API thread asks the VMM thread to do.
///
/// New endpoints add a variant here (and, if they return something, one to
/// [`ApiReply`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiAction {
    /// Return a [`VmInfo`].
    GetVmInfo,
    /// Begin an orderly shutdown of the VM.
    Shutdown,
    /// Return every node's [`NodeStatus`].
    GetNodes,
    /// Ask the guest to plug or unplug memory of `node`'s virtio-mem region until
    /// `bytes` are plugged.
    SetRequestedSize { node: u32, bytes: u64 },
    /// Return the guest agent's [`AgentInfo`].
    GetAgent,
    /// Return the regions of `node`'s hotplug region that `query` selects.
    GetRegions {
        node: u32,
        query: crate::evacuation::RegionQuery,
    },
    /// Send one request (protocol JSON, e.g. `{"type":"inventory"}`) to the guest agent
    /// and return its answer as JSON.
    AgentCall { request: String },
    /// Queue `regions` of `node` for its evacuation worker; answer a job. Their data
    /// may go to other nodes only with `allow_other_nodes`.
    Evacuate {
        node: u32,
        regions: Vec<u32>,
        allow_other_nodes: bool,
    },
    /// Release `release_bytes` of host memory from `node`'s least-filled regions.
    Compact {
        node: u32,
        release_bytes: u64,
        allow_other_nodes: bool,
    },
    /// Return one [`Job`].
    GetJob { id: u64 },
    /// Return every job, oldest first.
    GetJobs,
    /// Ask the guest to plug a released region of `node` again.
    PlugRegion { node: u32, region: u32 },
    /// Return the Prometheus metrics, as exposition text.
    GetMetrics,
    /// Return the balloon's [`BalloonStatus`](crate::BalloonStatus).
    GetBalloon,
    /// Ask the guest to inflate or deflate its balloon to `bytes`.
    SetBalloonTarget { bytes: u64 },
    /// Return `node`'s [`AutopilotStatus`](crate::AutopilotStatus).
    GetAutopilot { node: u32 },
    /// Change `node`'s autopilot (the fields given); answer its status.
    SetAutopilot {
        node: u32,
        settings: crate::AutopilotSettings,
    },
    /// Return the autopilot's recent events, those after `since` if given.
    GetEvents { since: Option<u64> },
}

/// A node's memory as `GET /api/v1/nodes` reports it. Nodes without a hotplug
/// region report zero for the region's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u32,
    pub boot_memory_bytes: u64,
    /// Guest-physical base of the node's virtio-mem region.
    pub region_base: u64,
    pub region_size: u64,
    pub block_size: u64,
    /// What the guest has plugged, from the device's block bitmap.
    pub plugged_bytes: u64,
    /// What the host asks the guest to plug.
    pub requested_bytes: u64,
    /// Bytes of the hotplug region that occupy host memory (memfd pages allocated), as
    /// last measured: after each evacuation pass of the node, else in the background
    /// when a read finds the figure over 1 s old.
    pub resident_bytes: u64,
}

/// One region (a 128 MiB Linux memory block) of a node's hotplug region, as
/// `GET /api/v1/nodes/{id}/regions` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStatus {
    /// Region number within the node's hotplug region.
    pub index: u32,
    /// The Linux memory block (`/sys/devices/system/memory/memoryN`) it is.
    pub memory_block: u32,
    pub base: u64,
    pub size: u64,
    pub state: RegionState,
    /// While `evacuating`: what the evacuation is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EvacuationPhase>,
    /// Why the last evacuation of a `failed` region failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub plugged_bytes: u64,
    /// Host memory the region holds (memfd data).
    pub resident_bytes: u64,
    /// Bytes the guest uses in the region (agent `block_usage`); null when the agent
    /// did not answer or the block is not online.
    #[serde(default)]
    pub in_use_bytes: Option<u64>,
}

/// What a region is, as the region list and the metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionState {
    /// Every device block plugged.
    Plugged,
    /// Some device blocks plugged, not all.
    Partial,
    /// Being evacuated (see `phase`).
    Evacuating,
    /// No device block plugged.
    Released,
    /// The last evacuation failed (see `reason`); still plugged.
    Failed,
    /// The last evacuation failed and left some of the region's memory blocks offline
    /// in the guest, which cannot use them (see `reason`); the node's next pass puts
    /// them back online first.
    Offline,
}

impl RegionState {
    /// Every state, so that a metric can give each a series.
    pub const ALL: [RegionState; 6] = [
        RegionState::Plugged,
        RegionState::Partial,
        RegionState::Evacuating,
        RegionState::Released,
        RegionState::Failed,
        RegionState::Offline,
    ];

    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            RegionState::Plugged => "plugged",
            RegionState::Partial => "partial",
            RegionState::Evacuating => "evacuating",
            RegionState::Released => "released",
            RegionState::Failed => "failed",
            RegionState::Offline => "offline",
        }
    }
}

impl std::str::FromStr for RegionState {
    type Err = String;

    /// A state by its JSON name.
    fn from_str(value: &str) -> Result<Self, String> {
        RegionState::ALL
            .into_iter()
            .find(|s| s.as_str() == value)
            .ok_or_else(|| {
                let all: Vec<&str> = RegionState::ALL.iter().map(|s| s.as_str()).collect();
                format!("must be one of {}, not '{value}'", all.join(", "))
            })
    }
}

impl std::fmt::Display for RegionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The phases of a region's evacuation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvacuationPhase {
    /// The guest agent offlines the memory block (the guest migrates its pages).
    Offlining,
    /// The guest unplugs the region's device blocks.
    Unplugging,
    /// The VMM checks that the host memory went.
    Releasing,
}

impl EvacuationPhase {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            EvacuationPhase::Offlining => "offlining",
            EvacuationPhase::Unplugging => "unplugging",
            EvacuationPhase::Releasing => "releasing",
        }
    }
}

impl std::fmt::Display for EvacuationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The guest agent's connection, as `GET /api/v1/agent` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub connected: bool,
    pub protocol_version: Option<u32>,
    pub agent_version: Option<String>,
    pub kernel: Option<String>,
    /// Why the last connection attempt or call failed, if one did.
    pub last_error: Option<String>,
    /// Successful connections so far (each reconnect adds one).
    pub connections: u64,
}

/// The body of `PUT /api/v1/nodes/{id}/requested-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedSize {
    pub requested_size: u64,
}

/// The successful outcome of an [`ApiAction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiReply {
    /// Answer to [`ApiAction::GetVmInfo`].
    VmInfo(VmInfo),
    /// Answer to [`ApiAction::GetNodes`].
    Nodes(Vec<NodeStatus>),
    /// Answer to [`ApiAction::GetAgent`].
    Agent(AgentInfo),
    /// Answer to [`ApiAction::GetRegions`].
    Regions(Vec<RegionStatus>),
    /// Answer to [`ApiAction::AgentCall`]: the agent's response, as JSON text.
    AgentResponse(String),
    /// Answer to [`ApiAction::Evacuate`] and [`ApiAction::Compact`] (202).
    Accepted(JobAccepted),
    /// Answer to [`ApiAction::GetJob`].
    Job(Job),
    /// Answer to [`ApiAction::GetJobs`].
    Jobs(Vec<Job>),
    /// Answer to [`ApiAction::PlugRegion`] (202): the node after the request.
    Node(NodeStatus),
    /// Answer to [`ApiAction::GetMetrics`].
    Metrics(String),
    /// Answer to [`ApiAction::GetBalloon`] and [`ApiAction::SetBalloonTarget`].
    Balloon(crate::BalloonStatus),
    /// Answer to [`ApiAction::GetAutopilot`] and [`ApiAction::SetAutopilot`].
    Autopilot(crate::AutopilotStatus),
    /// Answer to [`ApiAction::GetEvents`], oldest first.
    Events(Vec<crate::AutopilotEvent>),
    /// The action succeeded and has nothing to return.
    Empty,
}

/// A failed [`ApiAction`], as the VMM reports it: an HTTP status (4xx or
/// 5xx) and a human-readable message that becomes the `error` member of the
/// JSON error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// HTTP status code; anything outside 400..=599 is sent as 500.
    pub status: u16,
    /// Message for the client.
    pub message: String,
    /// Seconds after which the client may try again (`Retry-After`): the VMM was too
    /// busy to take the request, and will not be for long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with an explicit status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to try again after `seconds`.
    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400: the request is well-formed HTTP but its content is invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: the request names something that does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 409: the request conflicts with the current state of the VM.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 500: the VMM failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// What the VMM sends back through [`ApiRequest::reply`].
pub type ApiResult = Result<ApiReply, ApiError>;

/// One request from the API thread to the VMM thread.
///
/// The VMM must send exactly one [`ApiResult`] on `reply`; dropping `reply`
/// (every clone of it) without sending makes the API answer 503.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: ApiAction,
    /// Where to send the outcome.
    pub reply: ReplySender,
}

impl ApiRequest {
    /// A request and the receiving end of its reply. `wake`, if any, is
    /// written when the reply is sent or its last clone dropped unsent.
    pub fn new(action: ApiAction, wake: Option<Arc<EventFd>>) -> (ApiRequest, Receiver<ApiResult>) {
        let (tx, rx) = mpsc::channel();
        let reply = ReplySender(Arc::new(ReplyInner { tx: Some(tx), wake }));
        (ApiRequest { action, reply }, rx)
    }
}

/// Where the VMM sends the outcome of one [`ApiRequest`]; cheap to clone, so
/// a thread of the VMM's may answer. Sending, or dropping the last clone
/// without sending, also wakes the API thread, which never blocks waiting
/// for the reply.
#[derive(Debug, Clone)]
pub struct ReplySender(Arc<ReplyInner>);

#[derive(Debug)]
struct ReplyInner {
    /// `None` only while being dropped.
    tx: Option<Sender<ApiResult>>,
    wake: Option<Arc<EventFd>>,
}

impl ReplySender {
    /// Sends the outcome; false if the API thread has given up on the
    /// request, in which case the VMM has nothing more to do.
    pub fn send(&self, result: ApiResult) -> bool {
        let sent = match &self.0.tx {
            Some(tx) => tx.send(result).is_ok(),
            None => false,
        };
        if !sent {
            return false;
        }
        if let Some(wake) = &self.0.wake {
            // An eventfd write fails only when its counter would overflow,
            // and then the API thread has a wake-up pending anyway.
            let _ = wake.write(1);
        }
        true
    }
}

impl Drop for ReplyInner {
    fn drop(&mut self) {
        // Disconnect first, so that the woken API thread sees it.
        drop(self.tx.take());
        if let Some(wake) = &self.wake {
            let _ = wake.write(1);
        }
    }
}

/// The JSON body of every error response: `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_reply_wakes_the_api_thread_and_so_does_dropping_the_last_clone() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (request, answer) = ApiRequest::new(ApiAction::GetVmInfo, Some(wake.clone()));
        assert!(request.reply.send(Ok(ApiReply::Empty)));
        assert_eq!(wake.read().unwrap(), 1);
        assert_eq!(answer.try_recv().unwrap(), Ok(ApiReply::Empty));

        let (request, answer) = ApiRequest::new(ApiAction::GetVmInfo, Some(wake.clone()));
        let clone = request.reply.clone();
        drop(request);
        assert!(wake.read().is_err(), "a clone still lives: no wake-up yet");
        drop(clone);
        assert_eq!(wake.read().unwrap(), 1);
        assert_eq!(answer.try_recv(), Err(mpsc::TryRecvError::Disconnected));

        let (request, answer) = ApiRequest::new(ApiAction::GetVmInfo, None);
        drop(answer);
        assert!(!request.reply.send(Ok(ApiReply::Empty)), "nobody waits");
    }

    fn sample() -> VmInfo {
        VmInfo {
            state: VmState::ShuttingDown,
            vcpus: 4,
            nodes: vec![
                NodeInfo {
                    id: 0,
                    cpus: vec![0, 1],
                    boot_memory_bytes: 1 << 30,
                },
                NodeInfo {
                    id: 1,
                    cpus: vec![2, 3],
                    boot_memory_bytes: 0,
                },
            ],
        }
    }

    #[test]
    fn vm_info_json_shape() {
        let v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["state"], "shutting_down");
        assert_eq!(v["vcpus"], 4);
        assert_eq!(v["nodes"][0]["cpus"], serde_json::json!([0, 1]));
        assert_eq!(v["nodes"][0]["boot_memory_bytes"], 1u64 << 30);
        let back: VmInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn vm_state_snake_case() {
        assert_eq!(
            serde_json::to_string(&VmState::Running).unwrap(),
            "\"running\""
        );
        let s: VmState = serde_json::from_str("\"shutting_down\"").unwrap();
        assert_eq!(s, VmState::ShuttingDown);
        assert!(serde_json::from_str::<VmState>("\"Running\"").is_err());
    }

    #[test]
    fn region_states_and_phases_are_their_json_names() {
        for s in RegionState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<RegionState>(&json).unwrap(), s);
        }
        let phases = [
            EvacuationPhase::Offlining,
            EvacuationPhase::Unplugging,
            EvacuationPhase::Releasing,
        ];
        for p in phases {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<EvacuationPhase>(&json).unwrap(), p);
        }
        assert_eq!(format!("{:<9}|", RegionState::Failed), "failed   |");
        assert!(serde_json::from_str::<RegionState>("\"Plugged\"").is_err());
    }

    #[test]
    fn error_body_shape() {
        let s = serde_json::to_string(&ErrorBody {
            error: "boom \"x\"".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"error":"boom \"x\""}"#);
    }

    #[test]
    fn api_error_constructors() {
        assert_eq!(ApiError::bad_request("a").status, 400);
        assert_eq!(ApiError::not_found("a").status, 404);
        assert_eq!(ApiError::conflict("a").status, 409);
        assert_eq!(ApiError::internal("a").status, 500);
        assert_eq!(ApiError::new(418, "tea").to_string(), "tea (HTTP 418)");
    }
}
