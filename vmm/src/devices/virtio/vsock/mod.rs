//! virtio-vsock (virtio 1.2 section 5.10): stream sockets between the guest (CID 3 by
//! default) and host endpoints, where every host endpoint is a Unix stream socket.
//!
//! # Pieces
//!
//! - [`VsockDevice`] ([`device`]): the [`VirtioDevice`](super::VirtioDevice) model. Its
//!   three queues are rx (device → driver), tx (driver → device) and event (unused: the
//!   device never migrates, so it never posts a transport reset).
//! - The muxer ([`muxer`]): every connection, keyed by (host port, guest port), and every
//!   host-side file descriptor; it turns guest packets into host I/O and host I/O into
//!   packets waiting for rx buffers.
//! - A connection ([`connection`]): the per-connection state machine and credit-based flow
//!   control.
//! - [`VsockEventHandler`] ([`event_handler`]): the event-loop subscriber that serves the
//!   queue kicks and all host file descriptors, which it adds and removes as connections
//!   come and go.
//!
//! # Host endpoints
//!
//! - [`VsockConnector::connect`]: a connection from the host to a guest port, as a Unix
//!   stream (one end of a socketpair; the muxer owns the other). Usable from any thread.
//! - The hybrid socket (Firecracker's convention), when the device has a socket path:
//!   a host program connects to PATH, writes `CONNECT <port>\n` and, once the guest
//!   accepted, reads `OK <host port>\n`; then the stream carries the connection's bytes.
//!   A client has 2 s to finish its line. Hybrid clients hold at most
//!   [`muxer::MAX_HYBRID_CONNECTIONS`] connections, and at most
//!   [`muxer::MAX_HYBRID_AGENT_CONNECTIONS`] to the guest agent's port, so that they can
//!   never take every slot the agent serves; beyond, a client sees EOF after its line.
//!   A guest connecting to host port P reaches the Unix socket `PATH_P` if it exists.
//!   Neither the guest nor hybrid clients may take the last
//!   [`muxer::CONNECTOR_RESERVE`] connections: they are the VMM's own.
//!
//! # Trust
//!
//! The guest is untrusted: every packet is checked, a bad one is dropped or answered
//! with RST, and the memory the device holds for a connection is bounded (see
//! [`connection::TX_BUF_SIZE`], [`connection::RX_BUF_LIMIT`], [`muxer::MAX_CONNECTIONS`]).

pub mod connection;
pub mod device;
pub mod event_handler;
mod header;
mod hybrid;
#[cfg(test)]
mod hybrid_tests;
pub mod muxer;
#[cfg(test)]
mod test_driver;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use device::VsockDevice;
pub use event_handler::VsockEventHandler;

/// The host's CID: the source of every packet the device sends.
pub const VSOCK_HOST_CID: u64 = 2;
/// The CID the VMM gives its guest.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Every queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The largest payload the device takes from, or puts in, one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The smallest host port of host-initiated connections.
pub const EPHEMERAL_PORT_START: u32 = 1 << 30;

/// `virtio_vsock_hdr` field values (virtio 1.2 section 5.10.6).
pub mod defs {
    pub const TYPE_STREAM: u16 = 1;
    pub const OP_REQUEST: u16 = 1;
    pub const OP_RESPONSE: u16 = 2;
    pub const OP_RST: u16 = 3;
    pub const OP_SHUTDOWN: u16 = 4;
    pub const OP_RW: u16 = 5;
    pub const OP_CREDIT_UPDATE: u16 = 6;
    pub const OP_CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flags: the sender will receive no more, send no more.
    pub const SHUTDOWN_RCV: u32 = 1;
    pub const SHUTDOWN_SEND: u32 = 2;
    pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (CIDs 0, 1, 2 and u32::MAX and above are not a guest's)")]
    InvalidCid(u64),
    #[error("cannot create an eventfd or timerfd: {0}")]
    Fd(io::Error),
    #[error("vsock socket: {0}")]
    Socket(#[from] mempower_api::unix_socket::BindError),
    #[error("vsock socket '{path}': cannot make it non-blocking: {source}")]
    Nonblocking { path: PathBuf, source: io::Error },
}

/// How long the device waits for the guest and for hybrid-socket clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the RESPONSE to a host-initiated REQUEST, from the connect call.
    pub request: Duration,
    /// For the guest's RST after our full SHUTDOWN, and for flushing `tx_buf` to the host
    /// after the guest's full SHUTDOWN.
    pub shutdown: Duration,
    /// For a hybrid-socket client's `CONNECT` line.
    pub handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: Duration::from_secs(2),
            shutdown: Duration::from_secs(2),
            handshake: Duration::from_secs(2),
        }
    }
}

/// A request for a host-initiated connection, from a [`VsockConnector`] to the muxer.
#[derive(Debug)]
pub(crate) struct HostConnect {
    pub guest_port: u32,
    pub stream: UnixStream,
}

/// How many connection requests may wait for the event loop.
pub(crate) const CONNECT_BACKLOG: usize = 64;

/// Opens connections from the host to guest ports. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct VsockConnector {
    requests: SyncSender<HostConnect>,
    wake: Arc<EventFd>,
}

impl VsockConnector {
    pub(crate) fn new(requests: SyncSender<HostConnect>, wake: Arc<EventFd>) -> Self {
        VsockConnector { requests, wake }
    }

    /// Opens a connection to `guest_port` and returns its host end, a blocking Unix
    /// stream (set timeouts on it as needed).
    ///
    /// Returns at once: the device sends the guest a connection request (from CID 2 and
    /// an ephemeral port at or above [`EPHEMERAL_PORT_START`]) from its event loop, and
    /// the stream carries the connection's bytes once the guest accepted. Bytes written
    /// before that wait in the socket. If the guest refuses (RST), does not answer within
    /// 2 s (for instance, no driver or nobody listening), or the device is reset, the
    /// device closes its end: reads return EOF (0 bytes) and writes fail with EPIPE.
    /// Likewise when the guest closes the connection later.
    ///
    /// Fails only if the device is gone or too many connection requests are waiting.
    pub fn connect(&self, guest_port: u32) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let request = HostConnect {
            guest_port,
            stream: ours,
        };
        match self.requests.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "too many vsock connection requests are waiting",
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the vsock device is gone",
                ))
            }
        }
        self.wake.write(1)?;
        Ok(theirs)
    }
}
