//! The autopilot (issue 20): sizes each virtual NUMA node's virtio-mem memory to what
//! its guest uses, growing at once when the guest runs short and giving back, with
//! patience, what it leaves unused, so that the host can discard its backing.
//!
//! [`law`] is the decision, a pure state machine fed one [`Sample`] per node and per
//! interval; [`service`] is the driver that reads the samples and carries the
//! [`Decision`]s out; [`events`] keeps the recent ones for the API.

pub mod events;
pub mod law;
pub mod plan;
pub mod service;
pub mod wiring;

pub use law::{
    Bounds, Decision, GuestMarks, HostMarks, Law, LawError, Mode, Reason, Sample, Settings, Signal,
};
