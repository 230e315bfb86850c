//! Evacuation of guest memory regions, one worker per NUMA node.
//!
//! * [`worker`]: `mempowerd/N`, the kmempowerd loop over a region bitmask.
//! * [`procedure`]: what the worker does with one region (offline, exact shrink,
//!   bitmap check, release check, and the way back on failure).
//! * [`ledger`]: jobs, region marks and counters.
//! * [`compaction`]: the policy that picks regions for "release N bytes".
//! * [`service`]: [`Evacuations`], what the API handler calls.
//! * [`node`]: the device and agent as the procedure sees them.
//! * [`locality`]: keeping evacuated data on its node, and each region's migration.

pub mod compaction;
pub mod ledger;
pub mod locality;
pub mod metrics;
pub mod node;
pub mod procedure;
pub mod service;
pub mod worker;

#[cfg(test)]
mod test_guest;

pub use ledger::{Ledger, RegionMark};
pub use node::{AgentCall, Geometry, MemSnapshot, NodeError, NodeMemory, SharedMemDevice};
pub use procedure::{RegionError, RegionEvacuator, Timeouts};
pub use service::{hotplug_node, EvacuationAgents, EvacuationError, Evacuations};
pub use worker::{Evacuate, EvacuationWorker, WorkerError, MAX_REGIONS};
