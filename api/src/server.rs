//! The API server: a thread that serves HTTP on a Unix socket and forwards
//! requests to the VMM thread.
//!
//! The thread serves every connection at once from one epoll loop
//! ([`worker`]): sockets are non-blocking, each connection is a small state
//! machine ([`conn`]) with its own deadline, and replies from the VMM wake
//! the loop through an EventFd instead of being waited for.

mod conn;
mod worker;

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::types::ApiRequest;
use crate::unix_socket::{bind_owner_only, BindError, SocketFile};
use worker::{Worker, LISTENER_TOKEN, STOP_TOKEN, WAKE_TOKEN};

/// Name of the API thread.
pub const THREAD_NAME: &str = "mempower-api";

/// Connections open at once by default: each costs a file descriptor and at
/// most one request's buffers.
pub const MAX_CONNECTIONS: usize = 128;

/// Connections taken beyond [`ServerConfig::max_connections`] when every open one is
/// waiting for the VMM or taking its response: they may only carry
/// `PUT /api/v1/vm/shutdown` (anything else is refused with 503), so that the VM can
/// always be stopped, however many requests are pending.
pub const SHUTDOWN_RESERVE: usize = 4;

/// Errors of [`ApiServer::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created (in use, not a socket, bind failed...).
    #[error("API socket: {0}")]
    Socket(#[from] BindError),
    /// Setting up epoll, the events or the thread failed.
    #[error("cannot start the API thread: {0}")]
    Setup(io::Error),
}

/// Limits of the server; [`ServerConfig::default`] is what the VMM uses.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Time a client has to send its whole request, from its connect (408
    /// after it).
    pub request_timeout: Duration,
    /// Time the VMM has to answer (504 after it).
    pub reply_timeout: Duration,
    /// Time a client has to take the whole response.
    pub write_timeout: Duration,
    /// Connections open at once. Beyond it, a new connection closes the
    /// oldest one still sending its request; if every open one is waiting for
    /// the VMM or taking its response, it is taken into the
    /// [`SHUTDOWN_RESERVE`], or refused with 503 when that is full too.
    pub max_connections: usize,
    /// Called first on the API thread, before it serves anything (the VMM installs
    /// the thread's seccomp filter there).
    pub thread_start: Option<fn()>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            request_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            max_connections: MAX_CONNECTIONS,
            thread_start: None,
        }
    }
}

/// A running API server. Dropping it stops the thread (requests waiting for
/// the VMM get 503) and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    // Dropped after the thread is joined (see Drop): removes the file.
    socket: SocketFile,
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `socket_path` and starts the API thread with the default
    /// limits. See [`ApiServer::spawn_with_config`].
    pub fn spawn(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        notify: EventFd,
    ) -> Result<ApiServer, ServerError> {
        Self::spawn_with_config(socket_path, to_vmm, notify, ServerConfig::default())
    }

    /// Binds `socket_path` (mode 0600 from the start; replacing a stale
    /// socket nobody listens on, refusing a live one or a non-socket) and
    /// starts the `mempower-api` thread. Each request becomes an
    /// [`ApiRequest`] sent on `to_vmm`, followed by a write of 1 to `notify`.
    pub fn spawn_with_config(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        notify: EventFd,
        config: ServerConfig,
    ) -> Result<ApiServer, ServerError> {
        let (listener, socket) = bind_owner_only(socket_path)?;
        // On an error below, dropping `socket` removes the file.
        let (worker, stop_evt) =
            setup(listener, to_vmm, notify, config).map_err(ServerError::Setup)?;
        let thread = thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                if let Some(start) = config.thread_start {
                    start();
                }
                worker.run()
            })
            .map_err(ServerError::Setup)?;
        Ok(ApiServer {
            socket,
            stop_evt,
            thread: Some(thread),
        })
    }

    /// The path of the socket.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }
}

/// The worker and the event that stops it.
fn setup(
    listener: UnixListener,
    to_vmm: Sender<ApiRequest>,
    notify: EventFd,
    config: ServerConfig,
) -> io::Result<(Worker, EventFd)> {
    listener.set_nonblocking(true)?;
    let stop_evt = EventFd::new(EFD_NONBLOCK)?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (listener.as_raw_fd(), LISTENER_TOKEN),
        (stop_evt.as_raw_fd(), STOP_TOKEN),
        (wake.as_raw_fd(), WAKE_TOKEN),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let worker = Worker::new(listener, epoll, to_vmm, notify, wake, config);
    Ok((worker, stop_evt))
}

/// How long dropping the server waits for its thread to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop_evt.write(1);
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Bounded: a thread stuck somewhere (a lock, a blocked stderr) must not keep
        // the VMM from exiting. It stops on its own once unstuck, or with the process.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!(
                "API: the API thread did not stop within {STOP_TIMEOUT:?}; leaving it behind"
            );
        }
    }
}

#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod tests;
