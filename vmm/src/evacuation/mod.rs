//! Evacuation of guest memory regions, one worker per NUMA node.
//!
//! * [`worker`]: `mempowerd/N`, the kmempowerd loop over a [`RegionSet`].
//! * [`procedure`]: what the worker does with a pass's regions (offline each, one
//!   exact shrink, bitmap and release checks per region, and the way back on failure).
//! * [`arbiter`]: the one owner of each node's requested size.
//! * [`ledger`]: jobs, region marks and counters.
//! * [`compaction`]: the policy that picks regions for "release N bytes".
//! * [`service`]: [`Evacuations`], what the API handler calls.
//! * [`start`]: the VM's service, made once at boot.
//! * [`node`]: the device and agent as the procedure sees them, and the regions'
//!   geometry.
//! * [`locality`]: keeping evacuated data on its node, and each region's migration.
//! * [`resident`]: each region's host-resident bytes as last measured, for readers on
//!   the event loop.

pub mod arbiter;
pub mod compaction;
pub mod ledger;
pub mod locality;
pub mod metrics;
pub mod node;
pub mod procedure;
pub mod region_set;
pub mod resident;
pub mod service;
pub mod start;
pub mod worker;

#[cfg(test)]
mod test_guest;

pub use arbiter::Arbiter;
pub use ledger::{Ledger, RegionMark};
pub use node::{
    AgentCall, DeviceMemory, Geometry, MemSnapshot, NodeError, NodeMemory, SharedMemDevice,
};
pub use procedure::{RegionError, RegionEvacuator, Timeouts};
pub use region_set::RegionSet;
pub use service::{
    hotplug_node, EvacuationAgents, EvacuationError, Evacuations, MAX_WORKER_CONNECTIONS,
};
pub use worker::{Evacuate, EvacuationWorker, WorkerError};
