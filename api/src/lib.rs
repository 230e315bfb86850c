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
//! * [`server`]: [`ApiServer`], the API thread.
//! * [`client`]: a blocking [`client::request`] for the command line.
//!
//! # Protocol between the API thread and the VMM thread
//!
//! The same pattern as Cloud Hypervisor's `vmm/src/api`:
//!
//! 1. The VMM creates an [`std::sync::mpsc::channel`] of [`ApiRequest`]s
//!    and an [`EventFd`](vmm_sys_util::eventfd::EventFd) it registers in
//!    its epoll loop, and calls [`ApiServer::spawn`] with the sender and a
//!    clone of the EventFd.
//! 2. The server binds the socket (mode 0600) and starts the thread
//!    `mempower-api`. The thread accepts one connection at a time and
//!    serves one request per connection (`Connection: close`): it reads the
//!    request (5 s for the whole of it), parses it, and routes it. Routing
//!    errors (404, 405 with `Allow`) and malformed requests (400, 411, 413,
//!    431, 501, 505) are answered without bothering the VMM.
//! 3. A routed request becomes an [`ApiRequest`]: an [`ApiAction`] and the
//!    sending half of a fresh reply channel. The thread sends it, then
//!    writes 1 to the EventFd.
//! 4. The VMM wakes up, reads the EventFd, drains the receiver with
//!    `try_recv` (several requests may be queued per wake-up), performs each
//!    action, and sends exactly one `Result<ApiReply, ApiError>` on its
//!    `reply` sender. The VMM never blocks on the API thread: the send
//!    succeeds even if the API thread has given up.
//! 5. The API thread waits up to 10 s for the reply and writes the
//!    response: the route turns an [`ApiReply`] into a success response
//!    (JSON or plain text), an [`ApiError`] becomes `{"error": message}`
//!    with its status. No reply in time gives 504; a closed request channel
//!    (VMM gone) or a reply sender dropped without answer gives 503.
//!
//! Dropping the [`ApiServer`] stops the thread and removes the socket.
//! Every error body is `{"error": "<message>"}` ([`ErrorBody`]).
//! `openapi.yaml`, next to this crate's `Cargo.toml`, describes the
//! endpoints.
//!
//! Writing to a peer that went away relies on `SIGPIPE` being ignored, as
//! the Rust runtime arranges for binaries.

pub mod balloon;
pub mod client;
pub mod evacuation;
pub mod http;
mod router;
pub mod server;
pub mod types;

#[cfg(test)]
mod test_util;

pub use balloon::{BalloonStats, BalloonStatus, BalloonTarget};
pub use client::{request, ClientError, ClientResponse};
pub use evacuation::{
    CompactRequest, CompactionCandidate, EvacuationRequest, Job, JobAccepted, JobKind, JobState,
    RegionOutcome, RegionResult,
};
pub use http::{HttpError, Method, Request, Response};
pub use router::dispatch;
pub use server::{ApiServer, ServerConfig, ServerError};
pub use types::{
    AgentInfo, ApiAction, ApiError, ApiReply, ApiRequest, ApiResult, ErrorBody, EvacuationPhase,
    NodeInfo, NodeStatus, RegionState, RegionStatus, RequestedSize, VmInfo, VmState,
};
