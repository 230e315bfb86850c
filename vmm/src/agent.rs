//! The VMM's client of the guest agent.
//!
//! A thread (`mempower-agent`) owns the connection: it connects through vsock when the
//! agent is up, says hello, then serves calls from any thread one at a time. Each call
//! has a deadline for the whole of it, from the moment it is made: waiting behind other
//! calls, writing, and every read of the answer count against it, so an agent that
//! drips its answer a byte at a time, or keeps sending frames with other ids, cannot
//! hold the caller past it. A call that times out or fails on the wire drops the
//! connection (the stream may be out of step), and the thread reconnects with a
//! backoff. While idle it says hello every few seconds, so that `status()` notices a
//! dead agent. Calls made while disconnected fail at once with
//! [`AgentCallError::NotConnected`].

use crate::seccomp::ThreadKind;
use crate::sync::Locked;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_frame, AgentError, DeadlineStream, FrameError, GuestSignals, Request,
    RequestFrame, Response, ResponseFrame,
};

/// Opens a fresh stream to the agent's port (the vsock device's connector).
pub type Connect = Box<dyn Fn() -> io::Result<UnixStream> + Send>;

/// How long an agent call may take: offlining a full block migrates 128 MiB.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a caller waits past its deadline for the client thread's own verdict.
const ANSWER_GRACE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentCallError {
    #[error("the guest agent is not connected{}", .0.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    NotConnected(Option<String>),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the guest agent failed: {0}")]
    Connection(String),
    #[error("the guest agent refused: {0}")]
    Agent(AgentError),
    /// An answer of the wrong type, or one that fails its checks: the stream is still in
    /// step (the frame was read whole), so the connection stays.
    #[error("the guest agent's answer to {request} is unusable: {reason}")]
    BadAnswer {
        request: &'static str,
        reason: String,
    },
    #[error("the agent client thread is gone")]
    Gone,
}

/// What `GET /api/v1/agent` reports: the API's own type, so nothing is copied across.
pub use mempower_api::AgentInfo as AgentStatus;

struct Call {
    request: Request,
    /// The caller's timeout, for the error message.
    timeout: Duration,
    /// When the whole call must be over.
    deadline: Instant,
    reply: Sender<Result<Response, AgentCallError>>,
}

/// A handle on the client thread; cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    calls: Sender<Call>,
    status: Arc<Mutex<AgentStatus>>,
}

impl AgentClient {
    /// Starts the client thread.
    pub fn start(connect: Connect) -> io::Result<Self> {
        let (calls, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let worker = Worker {
            connect,
            calls: rx,
            status: status.clone(),
            next_id: 1,
        };
        crate::threads::spawn(ThreadKind::Agent, "mempower-agent", None, move || {
            worker.run()
        })
        .map_err(io::Error::other)?;
        Ok(AgentClient { calls, status })
    }

    /// Sends `request` and waits for its answer: `timeout` for the whole call, including
    /// the wait behind calls made before it.
    pub fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError> {
        let deadline = Instant::now() + timeout;
        let (reply, answer) = mpsc::channel();
        self.calls
            .send(Call {
                request,
                timeout,
                deadline,
                reply,
            })
            .map_err(|_| AgentCallError::Gone)?;
        // The thread gives up on the call at the deadline itself and answers; waiting a
        // little longer lets that answer, not a race, decide. A call still queued behind
        // a slow one is abandoned here, and skipped there.
        let left = deadline.saturating_duration_since(Instant::now()) + ANSWER_GRACE;
        match answer.recv_timeout(left) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(AgentCallError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentCallError::Gone),
        }
    }

    /// The autopilot's sample of the guest (`signals`), checked: at most
    /// `agent_protocol::MAX_NODES` nodes, each once, in order.
    pub fn signals(&self, timeout: Duration) -> Result<GuestSignals, AgentCallError> {
        let bad = |reason: String| AgentCallError::BadAnswer {
            request: "signals",
            reason,
        };
        match self.call(Request::Signals, timeout)? {
            Response::Signals(signals) => {
                signals.check().map_err(|e| bad(e.to_string()))?;
                Ok(signals)
            }
            other => Err(bad(format!("unexpected answer {other:?}"))),
        }
    }

    pub fn status(&self) -> AgentStatus {
        self.status.locked().clone()
    }
}

struct Worker {
    connect: Connect,
    calls: Receiver<Call>,
    status: Arc<Mutex<AgentStatus>>,
    next_id: u64,
}

/// Why a connection ended.
enum Ended {
    /// Every handle is gone: stop the thread.
    Shutdown,
    Failed(String),
}

impl Worker {
    fn set_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.locked());
    }

    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ended = match (self.connect)() {
                Ok(stream) => match self.hello(&stream) {
                    Ok(()) => {
                        backoff = BACKOFF_MIN;
                        self.serve(&stream)
                    }
                    Err(e) => Ended::Failed(e.to_string()),
                },
                Err(e) => Ended::Failed(format!("connect: {e}")),
            };
            match ended {
                Ended::Shutdown => return,
                Ended::Failed(why) => self.set_status(|s| {
                    s.connected = false;
                    s.last_error = Some(why);
                }),
            }
            // Refuse calls while waiting to reconnect, rather than letting them queue.
            let until = Instant::now() + backoff;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match self.calls.recv_timeout(left) {
                    Ok(call) => {
                        let last = self.status.locked().last_error.clone();
                        let _ = call.reply.send(Err(AgentCallError::NotConnected(last)));
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One request/response exchange on `stream`, over by `deadline`.
    fn exchange(
        &mut self,
        stream: &UnixStream,
        request: Request,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Response, AgentCallError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut stream = DeadlineStream::new(stream, deadline);
        write_frame(&mut stream, &RequestFrame::new(id, request))
            .map_err(|e| frame_err(e, timeout))?;
        loop {
            let frame: ResponseFrame =
                read_frame(&mut stream).map_err(|e| frame_err(e, timeout))?;
            // An answer to an earlier, abandoned request cannot arrive (a timeout drops
            // the connection), but skipping mismatched ids keeps that true by
            // construction; the deadline bounds how long an agent may keep sending them.
            if frame.id == id {
                return frame.into_result().map_err(AgentCallError::Agent);
            }
        }
    }

    fn hello(&mut self, stream: &UnixStream) -> Result<(), AgentCallError> {
        let deadline = Instant::now() + HELLO_TIMEOUT;
        match self.exchange(stream, Request::Hello, HELLO_TIMEOUT, deadline)? {
            Response::Hello {
                protocol_version,
                agent_version,
                kernel,
                ..
            } => {
                self.set_status(|s| {
                    s.connected = true;
                    s.protocol_version = Some(protocol_version);
                    s.agent_version = Some(agent_version);
                    s.kernel = Some(kernel);
                    s.connections += 1;
                });
                Ok(())
            }
            other => Err(AgentCallError::Connection(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    fn serve(&mut self, stream: &UnixStream) -> Ended {
        loop {
            match self.calls.recv_timeout(KEEPALIVE) {
                // Its caller has given up already: do not make the agent work for nobody.
                Ok(call) if Instant::now() >= call.deadline => {
                    let _ = call.reply.send(Err(AgentCallError::Timeout(call.timeout)));
                }
                Ok(call) => {
                    let result = self.exchange(stream, call.request, call.timeout, call.deadline);
                    let broken = matches!(
                        result,
                        Err(AgentCallError::Timeout(_) | AgentCallError::Connection(_))
                    );
                    let why = result.as_ref().err().map(ToString::to_string);
                    let _ = call.reply.send(result);
                    if broken {
                        return Ended::Failed(why.unwrap_or_default());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.hello(stream) {
                        return Ended::Failed(e.to_string());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ended::Shutdown,
            }
        }
    }
}

fn frame_err(e: FrameError, timeout: Duration) -> AgentCallError {
    match e {
        FrameError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            AgentCallError::Timeout(timeout)
        }
        other => AgentCallError::Connection(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::psi::{Pressure, Stall};
    use agent_protocol::{NodeSignals, ResponseFrame, VmCounters};
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// What the fake agent samples: nodes 0 and 1 (in `disorder`, the other way round).
    fn sample(disorder: bool) -> GuestSignals {
        let node = |node| NodeSignals {
            node,
            free_bytes: 1 << 20,
            file_bytes: 2 << 20,
            anon_bytes: 3 << 20,
            online_bytes: 256 << 20,
        };
        let stall = Stall {
            avg10: 1.25,
            avg60: 0.5,
            total_us: 1000,
        };
        GuestSignals {
            nodes: match disorder {
                false => vec![node(0), node(1)],
                true => vec![node(1), node(0)],
            },
            pressure: Some(Pressure {
                some: stall,
                full: stall,
            }),
            counters: VmCounters {
                pgmajfault: Some(7),
                ..VmCounters::default()
            },
        }
    }

    /// A fake agent on the other end of a socketpair: answers hello, echoes `vmstat`
    /// as a counter, answers `signals` with [`sample`], and misbehaves on `offline` and
    /// `signals` as the test asks.
    fn fake_agent(stream: UnixStream, mode: &'static str) {
        std::thread::spawn(move || {
            let mut s = &stream;
            while let Ok(frame) = read_frame::<RequestFrame>(&mut s) {
                let answer = match frame.request {
                    Request::Hello => Ok(Response::Hello {
                        protocol_version: 1,
                        agent_version: "test".into(),
                        kernel: "6.1".into(),
                        capabilities: vec![],
                    }),
                    Request::Offline { .. } if mode == "silent" => continue,
                    Request::Offline { .. } if mode == "hangup" => return,
                    Request::Vmstat if mode == "drip" => {
                        let mut wire = Vec::new();
                        let counters = Default::default();
                        let answer =
                            ResponseFrame::new(frame.id, Ok(Response::Vmstat { counters }));
                        write_frame(&mut wire, &answer).unwrap();
                        for byte in wire {
                            if s.write_all(&[byte]).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        continue;
                    }
                    Request::Vmstat if mode == "wrong-ids" => loop {
                        let counters = Default::default();
                        let other =
                            ResponseFrame::new(frame.id + 1, Ok(Response::Vmstat { counters }));
                        if write_frame(&mut s, &other).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    },
                    Request::Offline { .. } => Err(AgentError::new(16, "Device or resource busy")),
                    Request::Signals if mode == "wrong-type" => {
                        Ok(Response::NodeCompacted { node: 0 })
                    }
                    Request::Signals => Ok(Response::Signals(sample(mode == "disorder"))),
                    _ => Ok(Response::Vmstat {
                        counters: Default::default(),
                    }),
                };
                let _ = write_frame(&mut s, &ResponseFrame::new(frame.id, answer));
            }
        });
    }

    fn client(mode: &'static str, connects: Arc<AtomicU32>) -> AgentClient {
        AgentClient::start(Box::new(move || {
            connects.fetch_add(1, Ordering::SeqCst);
            let (ours, theirs) = UnixStream::pair()?;
            fake_agent(theirs, mode);
            Ok(ours)
        }))
        .unwrap()
    }

    fn wait_connected(c: &AgentClient, connections: u64) {
        for _ in 0..500 {
            let s = c.status();
            if s.connected && s.connections >= connections {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("never connected: {:?}", c.status());
    }

    #[test]
    fn calls_succeed_and_agent_errors_keep_the_connection() {
        let c = client("busy", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        let s = c.status();
        assert_eq!(
            (s.protocol_version, s.agent_version.as_deref()),
            (Some(1), Some("test"))
        );
        assert!(matches!(
            c.call(Request::Vmstat, Duration::from_secs(5)),
            Ok(Response::Vmstat { .. })
        ));
        let err = c
            .call(Request::Offline { blocks: vec![1] }, Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(
            err,
            AgentCallError::Agent(AgentError::new(16, "Device or resource busy"))
        );
        assert_eq!(
            c.status().connections,
            1,
            "an agent error is an answer, not a broken link"
        );
    }

    #[test]
    fn signals_are_typed_and_checked() {
        let c = client("busy", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        assert_eq!(c.signals(Duration::from_secs(5)), Ok(sample(false)));

        for (mode, reason) in [
            ("disorder", "node 0 is out of order or named twice"),
            ("wrong-type", "unexpected answer NodeCompacted { node: 0 }"),
        ] {
            let c = client(mode, Arc::new(AtomicU32::new(0)));
            wait_connected(&c, 1);
            let err = c.signals(Duration::from_secs(5)).unwrap_err();
            assert_eq!(
                err,
                AgentCallError::BadAnswer {
                    request: "signals",
                    reason: reason.into()
                },
                "{mode}"
            );
            // The stream is in step: the link stays, and serves the next call.
            assert!(matches!(
                c.call(Request::Vmstat, Duration::from_secs(5)),
                Ok(Response::Vmstat { .. })
            ));
            assert_eq!(c.status().connections, 1, "{mode}");
        }
    }

    #[test]
    fn a_silent_agent_times_out_and_the_client_reconnects() {
        let connects = Arc::new(AtomicU32::new(0));
        let c = client("silent", connects.clone());
        wait_connected(&c, 1);
        let err = c
            .call(
                Request::Offline { blocks: vec![1] },
                Duration::from_millis(200),
            )
            .unwrap_err();
        assert_eq!(err, AgentCallError::Timeout(Duration::from_millis(200)));
        wait_connected(&c, 2);
        assert!(connects.load(Ordering::SeqCst) >= 2);
        assert!(c.status().last_error.unwrap().contains("did not answer"));
    }

    /// What a deadline may be overrun by on a busy machine; far below what the agents
    /// below could make a call last (seconds, or for ever).
    const SLACK: Duration = Duration::from_millis(700);

    /// Makes `call` on a thread, so that a client that overstays fails the test instead of
    /// hanging it; returns the outcome and how long it took.
    fn timed_call(
        c: &AgentClient,
        request: Request,
        timeout: Duration,
    ) -> (Result<Response, AgentCallError>, Duration) {
        let (tx, rx) = mpsc::channel();
        let c = c.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = c.call(request, timeout);
            let _ = tx.send((result, started.elapsed()));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the call overstayed its deadline by seconds")
    }

    #[test]
    fn an_agent_dripping_its_answer_cannot_hold_the_call_past_its_deadline() {
        let c = client("drip", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        // The whole answer takes 3 s; each byte comes well within the timeout.
        let timeout = Duration::from_millis(300);
        let (result, took) = timed_call(&c, Request::Vmstat, timeout);
        assert_eq!(result.unwrap_err(), AgentCallError::Timeout(timeout));
        assert!(took < timeout + SLACK, "{took:?}");
        wait_connected(&c, 2);
    }

    #[test]
    fn an_agent_answering_with_other_ids_cannot_hold_the_call_past_its_deadline() {
        let c = client("wrong-ids", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        let timeout = Duration::from_millis(300);
        let (result, took) = timed_call(&c, Request::Vmstat, timeout);
        assert_eq!(result.unwrap_err(), AgentCallError::Timeout(timeout));
        assert!(took < timeout + SLACK, "{took:?}");
    }

    #[test]
    fn a_call_queued_behind_a_slow_one_ends_at_its_own_deadline() {
        let c = client("silent", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        let slow = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.call(Request::Offline { blocks: vec![1] }, Duration::from_secs(3))
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let timeout = Duration::from_millis(200);
        let (result, took) = timed_call(&c, Request::Vmstat, timeout);
        assert_eq!(result.unwrap_err(), AgentCallError::Timeout(timeout));
        assert!(took < timeout + SLACK, "{took:?}");
        let slow = slow.join().unwrap().unwrap_err();
        assert_eq!(slow, AgentCallError::Timeout(Duration::from_secs(3)));
    }

    #[test]
    fn a_hangup_fails_the_call_and_reconnects() {
        let c = client("hangup", Arc::new(AtomicU32::new(0)));
        wait_connected(&c, 1);
        let err = c
            .call(Request::Offline { blocks: vec![1] }, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(err, AgentCallError::Connection(ref m) if m.contains("closed")),
            "{err}"
        );
        wait_connected(&c, 2);
    }

    #[test]
    fn an_agent_restarted_while_idle_is_reconnected() {
        // The agent's process dies right after the first hello (the stream closes), is
        // unreachable for three attempts (the service manager restarting it), then
        // listens again: the idle client notices on its keepalive and comes back.
        let attempts = Arc::new(AtomicU32::new(0));
        let seen = attempts.clone();
        let c = AgentClient::start(Box::new(move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => {
                    let (ours, theirs) = UnixStream::pair()?;
                    std::thread::spawn(move || {
                        let mut s = &theirs;
                        if let Ok(frame) = read_frame::<RequestFrame>(&mut s) {
                            let hello = Response::Hello {
                                protocol_version: 1,
                                agent_version: "before".into(),
                                kernel: "6.1".into(),
                                capabilities: vec![],
                            };
                            let _ = write_frame(&mut s, &ResponseFrame::new(frame.id, Ok(hello)));
                        }
                    });
                    Ok(ours)
                }
                1..=3 => Err(io::Error::new(io::ErrorKind::ConnectionReset, "restarting")),
                _ => {
                    let (ours, theirs) = UnixStream::pair()?;
                    fake_agent(theirs, "busy");
                    Ok(ours)
                }
            }
        }))
        .unwrap();
        wait_connected(&c, 1);
        assert_eq!(c.status().agent_version.as_deref(), Some("before"));
        let deadline = std::time::Instant::now() + KEEPALIVE * 3;
        while c.status().connections < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = c.status();
        assert!(s.connected && s.connections == 2, "{s:?}");
        assert_eq!(s.agent_version.as_deref(), Some("test"), "the new agent");
        assert!(
            attempts.load(Ordering::SeqCst) >= 5,
            "three failed attempts in between"
        );
        assert!(matches!(
            c.call(Request::Vmstat, Duration::from_secs(5)),
            Ok(Response::Vmstat { .. })
        ));
    }

    #[test]
    fn calls_while_unreachable_fail_at_once_with_the_reason() {
        let c = AgentClient::start(Box::new(|| {
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, "no agent"))
        }))
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        let err = c.call(Request::Hello, Duration::from_secs(30)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(err, AgentCallError::NotConnected(Some(ref e)) if e.contains("no agent")),
            "{err}"
        );
        assert!(!c.status().connected);
    }
}
