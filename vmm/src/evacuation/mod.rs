//! Evacuation of guest memory regions, one worker per NUMA node.

pub mod worker;

pub use worker::{Evacuate, EvacuationWorker, WorkerError, MAX_REGIONS};
