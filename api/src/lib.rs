//! mempower's REST API: HTTP/1.1 on a Unix socket.
//!
//! # Pieces
//!
//! * [`http`]: a small, bounded, incremental HTTP/1.1 parser and writer
//!   ([`http::Request::parse`], [`http::Response`]); fuzz it there.
//! * [`types`]: the JSON documents ([`VmInfo`], ...) and the messages
//!   between the API thread and the VMM thread ([`ApiRequest`],
//!   [`ApiAction`], [`ApiReply`], [`ApiError`]).
//! * [`evacuation`]: jobs and their bodies ([`Job`], [`EvacuationRequest`]...).
//! * [`balloon`]: the balloon's status and target ([`BalloonStatus`], [`BalloonTarget`]).
//! * [`autopilot`]: a node's autopilot and its decisions ([`AutopilotStatus`],
//!   [`AutopilotSettings`], [`AutopilotEvent`]).
//! * [`server`]: [`ApiServer`], the API thread.
//! * [`client`]: a blocking [`client::request`] for the command line.
//! * [`unix_socket`]: binding a socket only its owner can reach.
//!
//! # Protocol between the API thread and the VMM thread
//!
//! The same pattern as Cloud Hypervisor's `vmm/src/api`:
//!
//! 1. The VMM creates an [`std::sync::mpsc::channel`] of [`ApiRequest`]s
//!    and an [`EventFd`](vmm_sys_util::eventfd::EventFd) it registers in
//!    its epoll loop, and calls [`ApiServer::spawn`] with the sender and a
//!    clone of the EventFd.
//! 2. The server binds the socket (mode 0600 from its first moment, see
//!    [`unix_socket`]) and starts the thread `mempower-api`. The thread
//!    serves every connection at once from its own epoll loop, one request
//!    per connection (`Connection: close`), and never blocks: a connection
//!    has 5 s from its connect to send the whole request (408 after),
//!    requests are parsed as their bytes arrive, and routed. Routing errors
//!    (404, 405 with `Allow`) and malformed requests (400, 411, 413, 431,
//!    501, 505) are answered without bothering the VMM. At most
//!    [`server::MAX_CONNECTIONS`] are open; beyond that a new connection
//!    closes the oldest one still sending its request (with a 503 and a
//!    log line), or is itself refused with 503 if all are busy.
//! 3. A routed request becomes an [`ApiRequest`]: an [`ApiAction`] and a
//!    [`ReplySender`] for its reply, made by [`ApiRequest::new`] with the
//!    API thread's own wake-up EventFd. The thread sends it, writes 1 to
//!    the VMM's EventFd, and goes on serving other connections.
//! 4. The VMM wakes up, reads the EventFd, drains the receiver with
//!    `try_recv` (several requests may be queued per wake-up), performs each
//!    action, and sends exactly one `Result<ApiReply, ApiError>` on its
//!    `reply`, from the VMM thread or from a thread of its own (the sender
//!    clones). Sending also writes the API thread's wake-up EventFd, and so
//!    does dropping the last clone of `reply` unsent. The VMM never blocks
//!    on the API thread: sending never waits, and fails harmlessly if the
//!    API thread has given up on the request.
//! 5. Woken, the API thread collects every reply that has come and writes
//!    the responses (5 s for the client to take each): the route turns an
//!    [`ApiReply`] into a success response (JSON or plain text), an
//!    [`ApiError`] becomes `{"error": message}` with its status. No reply
//!    within 10 s gives 504; a closed request channel (VMM gone) or a reply
//!    sender dropped without answer gives 503.
//!
//! Dropping the [`ApiServer`] stops the thread and removes the socket.
//! Every error body is `{"error": "<message>"}` ([`ErrorBody`]).
//! `openapi.yaml`, next to this crate's `Cargo.toml`, describes the
//! endpoints.
//!
//! Writing to a peer that went away relies on `SIGPIPE` being ignored, as
//! the Rust runtime arranges for binaries.

pub mod autopilot;
pub mod balloon;
pub mod client;
pub mod evacuation;
pub mod http;
mod router;
pub mod server;
pub mod types;
pub mod unix_socket;

#[cfg(test)]
mod test_util;

pub use autopilot::{
    AutopilotAction, AutopilotEvent, AutopilotInputs, AutopilotMode, AutopilotSettings,
    AutopilotStatus, MAX_EVENTS,
};
pub use balloon::{BalloonStats, BalloonStatus, BalloonTarget};
pub use client::{request, ClientError, ClientResponse};
pub use evacuation::{
    CompactRequest, CompactionCandidate, EvacuationRequest, Job, JobAccepted, JobKind, JobState,
    PhaseTimes, RegionOutcome, RegionQuery, RegionResult, MAX_EVACUATION_REGIONS,
};
pub use http::{HttpError, Method, Request, Response};
pub use router::dispatch;
pub use server::{ApiServer, ServerConfig, ServerError};
pub use types::{
    AgentInfo, ApiAction, ApiError, ApiReply, ApiRequest, ApiResult, ErrorBody, EvacuationPhase,
    NodeInfo, NodeStatus, RegionState, RegionStatus, ReplySender, RequestedSize, VmInfo, VmState,
};
