//! The JSON documents of the autopilot: a node's settings and status, and the events
//! that record its decisions.

use serde::{Deserialize, Serialize};

/// Most events `GET /api/v1/events` returns (the VMM keeps no more).
pub const MAX_EVENTS: usize = 512;

/// What the autopilot of a node may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutopilotMode {
    /// Nothing: the node's size is the user's alone.
    #[default]
    Off,
    /// Only give back what the guest does not use, never above the size it started from.
    Release,
    /// Size the node to what its guest uses: grow at once under pressure, shrink with
    /// patience.
    Autosize,
}

/// The body of `PUT /api/v1/nodes/{id}/autopilot`: fields left out keep their value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AutopilotSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AutopilotMode>,
    /// Least hotplug memory the node keeps plugged, bytes (whole regions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bytes: Option<u64>,
    /// Most hotplug memory the autopilot plugs, bytes (whole regions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Free memory the node keeps beyond what its guest uses, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_bytes: Option<u64>,
    /// How often the signals are read and the law stepped, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// How long the node stays calm, with memory to spare, before it gives some back,
    /// milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience_ms: Option<u64>,
}

/// What `GET /api/v1/nodes/{id}/autopilot` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutopilotStatus {
    pub node: u32,
    pub mode: AutopilotMode,
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub headroom_bytes: u64,
    /// The headroom now: host pressure tightens it, down to a floor.
    pub effective_headroom_bytes: u64,
    pub interval_ms: u64,
    pub patience_ms: u64,
    /// A user's resize, compaction or evacuation of the node holds until the user sets
    /// the autopilot again: until then it decides nothing.
    pub paused_by_user: bool,
    /// Decisions that changed the node's size, since boot.
    pub grows: u64,
    pub shrinks: u64,
    /// Shrinks that a grow undid within the regret window.
    pub regrets: u64,
    /// Samples the law was stepped on, since boot.
    pub samples: u64,
    /// Why the last sample changed nothing, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<String>,
    /// The last decision, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<AutopilotEvent>,
}

/// One decision of a node's autopilot, with the inputs it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutopilotEvent {
    /// Increases by one per event, VM-wide: `GET /api/v1/events?since=N` returns the
    /// events after N.
    pub seq: u64,
    /// Milliseconds since the VM started.
    pub at_ms: u64,
    pub node: u32,
    pub action: AutopilotAction,
    /// The node's target before and after, bytes of hotplug memory.
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// Why, in words.
    pub reason: String,
    /// The compaction job a shrink started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    pub inputs: AutopilotInputs,
}

/// What an autopilot decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutopilotAction {
    Grow,
    Shrink,
    /// A decision that could not be carried out (the reason says why).
    Failed,
    /// The user took over (resize, compaction, evacuation) or set the autopilot.
    User,
}

/// The signals a decision saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AutopilotInputs {
    /// The guest node's free, file and anonymous memory, bytes.
    pub free_bytes: u64,
    pub file_bytes: u64,
    pub anon_bytes: u64,
    pub plugged_bytes: u64,
    /// Guest memory pressure (PSI `some` and `full`, avg10, percent).
    pub psi_some_avg10: f64,
    pub psi_full_avg10: f64,
    /// The guest's OOM kills since boot.
    pub oom_kills: u64,
    /// The host's available memory (`MemAvailable`), bytes, and its pressure.
    pub host_available_bytes: u64,
    pub host_psi_some_avg10: f64,
}
