//! The vsock channel: a listener on [`agent_protocol::AGENT_PORT`] serving the
//! request/response protocol of `agent_protocol` (length-prefixed JSON frames).
//!
//! Each connection is served on its own thread, so that the VMM's client and a host
//! program (through the VMM's `--vsock-socket`) can talk to the agent at once; at most
//! [`MAX_CONNECTIONS`] at a time, further ones are closed at once. Requests of different
//! connections may run concurrently; every handler is safe for that.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::console;
use crate::init::{self, Halt, Role};
use crate::requests::Handler;
use crate::session::{serve_connection, End};

/// How long a `shutdown` waits for the VMM to close the connection before powering off,
/// so that the answer leaves the guest's vsock queue first.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);
const LISTEN_BACKLOG: i32 = 8;
/// A connection that sends nothing for this long is closed, so that an idle client (a
/// host program through the VMM's `--vsock-socket`) does not keep its slot for good.
/// The VMM's own clients say hello every 5 s when they have nothing else to say.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("cannot create a vsock socket (no vsock device?): {0}")]
    Socket(#[source] io::Error),
    #[error("cannot listen on vsock port {port}: {source}")]
    Listen {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the vsock thread: {0}")]
    Thread(#[source] io::Error),
}

/// A listening AF_VSOCK stream socket.
pub struct Listener(OwnedFd);

impl Listener {
    /// Listens on `port` of any CID.
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(VsockError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is valid and the fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let listen_err = |source| VsockError::Listen { port, source };
        // SAFETY: `addr` is a valid sockaddr_vm and its exact size is passed; bind only
        // reads it during the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(listen_err(io::Error::last_os_error()));
        }
        // SAFETY: listen(2) on our own socket; no memory is involved.
        if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(listen_err(io::Error::last_os_error()));
        }
        Ok(Self(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            // SAFETY: null address pointers mean the peer address is not returned.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor that nothing else owns. UnixStream
                // only does read, write, shutdown and timeouts on it, which are the same
                // socket calls for every stream socket family.
                return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Serves the connections of `listener` (bound to [`agent_protocol::AGENT_PORT`]) on a
/// thread. A `shutdown` request powers off (as `role` does) once its answer is sent.
pub fn start(listener: Listener, handler: Arc<Handler>, role: Role) -> Result<(), VsockError> {
    thread::Builder::new()
        .name("vsock".into())
        .spawn(move || {
            let on_shutdown = Arc::new(move |stream: &UnixStream| power_off(stream, role));
            run(
                || Some(listener.accept()),
                &handler,
                on_shutdown,
                IDLE_TIMEOUT,
            );
        })
        .map(drop)
        .map_err(VsockError::Thread)
}

/// Connections served at once; a guest must not be made to spawn threads without bound.
pub const MAX_CONNECTIONS: usize = agent_protocol::MAX_AGENT_CONNECTIONS;

/// Accepts connections until `accept` gives None (only tests do), each on its own thread;
/// closes a connection that sends nothing for `idle` while the agent waits for a request.
pub fn run(
    mut accept: impl FnMut() -> Option<io::Result<UnixStream>>,
    handler: &Arc<Handler>,
    on_shutdown: Arc<dyn Fn(&UnixStream) + Send + Sync>,
    idle: Duration,
) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut last_error: Option<io::ErrorKind> = None;
    while let Some(accepted) = accept() {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Report a failure once, not once per retry.
                if last_error != Some(e.kind()) {
                    console::report(&format!("vsock accept failed: {e}"));
                }
                last_error = Some(e.kind());
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        last_error = None;
        if active.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let finished = active.clone();
        let handler = handler.clone();
        let on_shutdown = on_shutdown.clone();
        let spawned = thread::Builder::new()
            .name("vsock-conn".into())
            .spawn(move || {
                // A read that times out ends the connection as a failed one.
                let _ = stream.set_read_timeout(Some(idle));
                let end = serve_connection(&mut &stream, |r| handler.handle(r));
                match end {
                    End::Shutdown => on_shutdown(&stream),
                    // Closes it for the peer, also when another handle of it lives on.
                    End::Closed | End::Failed(_) => {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                finished.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            console::report(&format!("cannot start a vsock connection thread: {e}"));
        }
    }
}

/// Lets the answer to `shutdown` leave (the guest's vsock transmits asynchronously),
/// then powers off.
fn power_off(stream: &UnixStream, role: Role) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + SHUTDOWN_LINGER;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        let mut reader = stream;
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break, // closed by the peer, or timed out
            Ok(_) => {}
        }
    }
    let err = init::halt(role, Halt::PowerOff);
    console::report(&err.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use crate::requests::TestRequests;

    use agent_protocol::{
        read_frame, write_frame, Outcome, Request, RequestFrame, Response, ResponseFrame,
    };

    fn call(mut stream: &UnixStream, id: u64, request: Request) -> io::Result<ResponseFrame> {
        write_frame(&mut stream, &RequestFrame::new(id, request)).map_err(io::Error::other)?;
        read_frame(&mut stream).map_err(io::Error::other)
    }

    #[test]
    fn connections_are_served_at_once_and_shutdown_calls_back() {
        let handler = Arc::new(Handler::new(PathBuf::from("/"), TestRequests::Served));
        let (first, first_agent) = UnixStream::pair().unwrap();
        let (second, second_agent) = UnixStream::pair().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut incoming = vec![second_agent, first_agent];
        let shutdowns = Arc::new(Mutex::new(0));
        let seen = shutdowns.clone();
        let on_shutdown = Arc::new(move |_: &UnixStream| *seen.lock().unwrap() += 1);
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let server = thread::spawn(move || {
            run(
                || {
                    if incoming.len() == 1 {
                        wait.recv().ok()?; // the second connection, on cue
                    }
                    incoming.pop().map(Ok)
                },
                &handler,
                on_shutdown,
                Duration::from_secs(60),
            );
        });
        assert_eq!(call(&first, 1, Request::Hello).unwrap().id, 1);
        go.send(()).unwrap();
        assert_eq!(call(&second, 2, Request::Hello).unwrap().id, 2);
        // The first connection still works beside the second.
        assert_eq!(call(&first, 3, Request::Hello).unwrap().id, 3);
        let answer = call(&second, 4, Request::Shutdown).unwrap();
        assert_eq!(answer.result, Outcome::Ok(Response::ShuttingDown));
        server.join().unwrap();
        for _ in 0..500 {
            if *shutdowns.lock().unwrap() == 1 {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("on_shutdown was not called");
    }

    #[test]
    fn a_failed_connection_is_closed_for_the_peer() {
        let handler = Arc::new(Handler::new(PathBuf::from("/"), TestRequests::Served));
        let (client, agent) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut incoming = vec![agent];
        run(
            || incoming.pop().map(Ok),
            &handler,
            Arc::new(|_: &UnixStream| {}),
            Duration::from_secs(60),
        );
        (&client).write_all(&u32::MAX.to_le_bytes()).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!((&client).read(&mut buf).unwrap(), 0, "EOF expected");
    }

    #[test]
    fn an_idle_connection_is_closed_and_a_talking_one_is_not() {
        let handler = Arc::new(Handler::new(PathBuf::from("/"), TestRequests::Served));
        let (idle, idle_agent) = UnixStream::pair().unwrap();
        let (talking, talking_agent) = UnixStream::pair().unwrap();
        for s in [&idle, &talking] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let mut incoming = vec![idle_agent, talking_agent];
        let started = Instant::now();
        run(
            || incoming.pop().map(Ok),
            &handler,
            Arc::new(|_: &UnixStream| {}),
            Duration::from_millis(500),
        );
        // Talks every 100 ms for 1.5 s: three idle timeouts' worth.
        for id in 0..15 {
            assert_eq!(call(&talking, id, Request::Hello).unwrap().id, id);
            thread::sleep(Duration::from_millis(100));
        }
        let mut buf = [0u8; 1];
        assert_eq!((&idle).read(&mut buf).unwrap(), 0, "EOF expected");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn listener_binds_or_reports_a_missing_vsock() {
        match Listener::bind(agent_protocol::AGENT_PORT + 1000) {
            Ok(listener) => assert!(listener.0.as_raw_fd() >= 0),
            Err(VsockError::Socket(e)) => eprintln!("no vsock here: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
