//! The API server: a thread that serves HTTP on a Unix socket and forwards
//! requests to the VMM thread.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::http::{Request, Response};
use crate::router::{route, Routed};
use crate::types::{ApiAction, ApiRequest, ApiResult};
use crate::unix_socket::{bind_owner_only, BindError, SocketFile};

/// Name of the API thread.
pub const THREAD_NAME: &str = "mempower-api";

/// How often a wait for the VMM checks whether the server is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);

/// epoll data of the listening socket and of the stop event.
const LISTENER_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// Errors of [`ApiServer::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created (in use, not a socket, bind failed...).
    #[error("API socket: {0}")]
    Socket(#[from] BindError),
    /// Setting up epoll, the stop event or the thread failed.
    #[error("cannot start the API thread: {0}")]
    Setup(io::Error),
}

/// Timeouts of the server; [`ServerConfig::default`] is what the VMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time a client has to send its whole request (408 after it).
    pub request_timeout: Duration,
    /// Time the VMM has to answer (504 after it).
    pub reply_timeout: Duration,
    /// Time a client has to take the response.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            request_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// A running API server. Dropping it stops the thread (after the request in
/// flight, if any) and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    // Dropped after the thread is joined (see Drop): removes the file.
    socket: SocketFile,
    stop: Arc<AtomicBool>,
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `socket_path` and starts the API thread with the default
    /// timeouts. See [`ApiServer::spawn_with_config`].
    pub fn spawn(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        notify: EventFd,
    ) -> Result<ApiServer, ServerError> {
        Self::spawn_with_config(socket_path, to_vmm, notify, ServerConfig::default())
    }

    /// Binds `socket_path` (mode 0600 from the start; replacing a stale
    /// socket nobody listens on, refusing a live one or a non-socket) and starts
    /// the `mempower-api` thread. Each request becomes an [`ApiRequest`] sent
    /// on `to_vmm`, followed by a write of 1 to `notify`.
    pub fn spawn_with_config(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        notify: EventFd,
        config: ServerConfig,
    ) -> Result<ApiServer, ServerError> {
        // On an error below, dropping `socket` removes the file.
        let (listener, socket) = bind_owner_only(socket_path)?;
        let cleanup = ServerError::Setup;
        listener.set_nonblocking(true).map_err(cleanup)?;
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(cleanup)?;
        let epoll = Epoll::new().map_err(cleanup)?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER_TOKEN),
            (stop_evt.as_raw_fd(), STOP_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(cleanup)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            listener,
            epoll,
            to_vmm,
            notify,
            config,
            stop: Arc::clone(&stop),
        };
        let thread = thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || worker.run())
            .map_err(cleanup)?;
        Ok(ApiServer {
            socket,
            stop,
            stop_evt,
            thread: Some(thread),
        })
    }

    /// The path of the socket.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_evt.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State of the API thread.
struct Worker {
    listener: UnixListener,
    epoll: Epoll,
    to_vmm: Sender<ApiRequest>,
    notify: EventFd,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
}

/// What reading a request produced.
enum Incoming {
    Request(Request),
    /// Answer this without involving the VMM.
    Reject(Response),
    /// The peer went away without sending anything.
    Nothing,
}

impl Worker {
    fn run(self) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // epoll_wait fails only on invalid arguments; nothing to retry.
                Err(_) => return,
            };
            if self.stop.load(Ordering::SeqCst)
                || events[..n].iter().any(|e| e.data() == STOP_TOKEN)
            {
                return;
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => self.serve(stream),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // WouldBlock (queue drained) or a per-connection error
                    // such as ECONNABORTED: back to epoll.
                    Err(_) => break,
                }
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
    }

    /// Serves one request on `stream`, then closes it.
    fn serve(&self, mut stream: UnixStream) {
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        let response = match self.read_request(&mut stream) {
            Incoming::Nothing => return,
            Incoming::Reject(response) => response,
            Incoming::Request(request) => self.handle(&request),
        };
        let _ = stream.set_write_timeout(Some(self.config.write_timeout));
        let _ = stream.write_all(&response.to_bytes());
        let _ = stream.flush();
    }

    /// Reads until a whole request, an error, the deadline or EOF.
    fn read_request(&self, stream: &mut UnixStream) -> Incoming {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            match Request::parse(&buf) {
                Ok(Some((request, _))) => return Incoming::Request(request),
                Ok(None) => {}
                Err(e) => return Incoming::Reject(Response::error(e.status(), e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return Incoming::Reject(timeout_response());
            }
            match stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Incoming::Nothing,
                Ok(0) => {
                    return Incoming::Reject(Response::error(
                        400,
                        "connection closed before the request was complete",
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Incoming::Reject(timeout_response())
                }
                Err(_) => return Incoming::Nothing,
            }
        }
    }

    /// Routes `request` and, for an endpoint, asks the VMM.
    fn handle(&self, request: &Request) -> Response {
        match route(request) {
            Routed::Respond(response) => response,
            Routed::Vmm { action, on_reply } => match self.ask_vmm(action) {
                Ok(Ok(reply)) => on_reply(reply),
                Ok(Err(e)) => {
                    let status = if (400..=599).contains(&e.status) {
                        e.status
                    } else {
                        500
                    };
                    Response::error(status, e.message)
                }
                Err(response) => response,
            },
        }
    }

    /// Sends `action` to the VMM, wakes it, and waits for its answer.
    fn ask_vmm(&self, action: ApiAction) -> Result<ApiResult, Response> {
        let (reply, answer) = mpsc::channel();
        if self.to_vmm.send(ApiRequest { action, reply }).is_err() {
            return Err(Response::error(503, "the VMM is not running"));
        }
        if let Err(e) = self.notify.write(1) {
            return Err(Response::error(500, format!("cannot notify the VMM: {e}")));
        }
        let deadline = Instant::now() + self.config.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Response::error(504, "the VMM did not answer in time"));
            }
            match answer.recv_timeout(left.min(STOP_POLL)) {
                Ok(result) => return Ok(result),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Response::error(503, "the VMM dropped the request"))
                }
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::SeqCst) => {
                    return Err(Response::error(503, "the API server is stopping"))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

fn timeout_response() -> Response {
    Response::error(408, "timed out reading the request")
}

#[cfg(test)]
mod tests;
