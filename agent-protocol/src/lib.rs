//! The protocol between the VMM and the guest agent, over a vsock stream.
//!
//! Every message is a frame: a 4-byte little-endian length, then that many bytes of JSON.
//! The VMM sends [`RequestFrame`]s, each with an `id`; the agent answers each with one
//! [`ResponseFrame`] carrying the same `id` and either a [`Response`] or an
//! [`AgentError`] (an errno and a message). Frames above [`MAX_FRAME`] are refused before
//! anything is allocated for them, so a peer cannot make the other side allocate
//! unbounded memory. Both sides speak [`PROTOCOL_VERSION`]; `hello` tells the other's.
//!
//! [`psi`] and [`meminfo`] parse the kernel's text files that the agent reads in the
//! guest and the VMM on the host.

mod frame;
pub mod meminfo;
mod messages;
pub mod psi;
mod signals;

pub use frame::{read_frame, write_frame, DeadlineStream, FrameError, MAX_FRAME};
pub use messages::*;
pub use signals::{GuestSignals, NodeSignals, SignalsError, VmCounters, MAX_NODES};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 5252;
/// Connections the agent serves at once; it closes further ones at once. The VMM keeps
/// some of them for its own clients.
pub const MAX_AGENT_CONNECTIONS: usize = 8;
/// Bumped on any incompatible change of the messages.
pub const PROTOCOL_VERSION: u32 = 1;
/// The most bytes one `poke` request may touch.
pub const MAX_POKE: u32 = 4096;
