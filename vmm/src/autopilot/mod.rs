//! The autopilot (issue 20): sizes each virtual NUMA node's virtio-mem memory to what
//! its guest uses, growing at once when the guest runs short and giving back, with
//! patience, what it leaves unused, so that the host can discard its backing.
//!
//! [`law`] is the decision, a pure state machine fed one [`Sample`] per node and per
//! interval; reading the samples and carrying out the [`Decision`]s is the driver's
//! work, outside this module.

pub mod law;

pub use law::{
    Bounds, Decision, GuestMarks, HostMarks, Law, LawError, Mode, Reason, Sample, Settings, Signal,
};
