//! The API thread's event loop: one epoll set holds the listening socket,
//! every connection, the stop event and the wake-up event that replies from
//! the VMM write. Nothing in it blocks, so no connection waits for another.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, Incoming, State, Written};
use super::{ServerConfig, SHUTDOWN_RESERVE};
use crate::http::{Request, Response};
use crate::router::{route, Routed};
use crate::types::{ApiAction, ApiRequest, ApiResult};

/// epoll data of the listening socket, the stop event and the reply wake-up;
/// connections count up from [`FIRST_CONN_TOKEN`] and are never reused, so
/// an event for a connection closed earlier in the same batch finds nothing.
pub(super) const LISTENER_TOKEN: u64 = 0;
pub(super) const STOP_TOKEN: u64 = 1;
pub(super) const WAKE_TOKEN: u64 = 2;
const FIRST_CONN_TOKEN: u64 = 3;

/// Events taken per `epoll_wait`.
const EVENTS: usize = 64;
/// Connections accepted per listener event; the rest wait for the next turn.
const ACCEPTS_PER_EVENT: usize = 64;
/// How long accepting pauses when the process runs out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most one log line per this, per kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts occurrences and says when one more is worth a log line.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    pending: u64,
}

impl Throttle {
    /// Notes one occurrence; returns how many to report now, if a line is due.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

/// State of the API thread.
pub(super) struct Worker {
    listener: UnixListener,
    epoll: Epoll,
    to_vmm: Sender<ApiRequest>,
    notify: EventFd,
    /// Written by every reply (see [`crate::types::ReplySender`]).
    wake: Arc<EventFd>,
    config: ServerConfig,
    /// By token, so in the order they were accepted.
    conns: BTreeMap<u64, Conn>,
    next_token: u64,
    /// Set while accepting is paused (out of file descriptors).
    accept_paused_until: Option<Instant>,
    evicted: Throttle,
    refused: Throttle,
    accept_failed: Throttle,
}

impl Worker {
    pub fn new(
        listener: UnixListener,
        epoll: Epoll,
        to_vmm: Sender<ApiRequest>,
        notify: EventFd,
        wake: Arc<EventFd>,
        config: ServerConfig,
    ) -> Self {
        Worker {
            listener,
            epoll,
            to_vmm,
            notify,
            wake,
            config,
            conns: BTreeMap::new(),
            next_token: FIRST_CONN_TOKEN,
            accept_paused_until: None,
            evicted: Throttle::default(),
            refused: Throttle::default(),
            accept_failed: Throttle::default(),
        }
    }

    pub fn run(mut self) {
        let mut events = [EpollEvent::default(); EVENTS];
        loop {
            let timeout = self.timeout_ms(Instant::now());
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only invalid arguments make epoll_wait fail.
                    log::error!("API: epoll_wait failed, the API thread stops: {e}");
                    return;
                }
            };
            let now = Instant::now();
            if events[..n].iter().any(|e| e.data() == STOP_TOKEN) {
                self.shut_down();
                return;
            }
            for event in &events[..n] {
                match event.data() {
                    LISTENER_TOKEN => self.accept(now),
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        self.collect_replies(now);
                    }
                    token => self.on_event(token, event.event_set(), now),
                }
            }
            self.expire(Instant::now());
        }
    }

    /// Milliseconds until the earliest deadline (rounded up), or -1.
    fn timeout_ms(&self, now: Instant) -> i32 {
        let earliest = self
            .conns
            .values()
            .map(Conn::deadline)
            .chain(self.accept_paused_until)
            .min();
        match earliest {
            None => -1,
            Some(t) => {
                let left = t.saturating_duration_since(now);
                let ms = left.as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.accept_paused_until.is_some() {
            return;
        }
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors or memory: the listener would stay
                    // readable and spin the loop, so stop watching it awhile.
                    if let Some(n) = self.accept_failed.note(now) {
                        log::warn!(
                            "API: cannot accept connections ({n} failures): {e}; \
                             pausing for {ACCEPT_PAUSE:?}"
                        );
                    }
                    self.watch_listener(false);
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    fn watch_listener(&self, on: bool) {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(events, LISTENER_TOKEN),
        );
    }

    /// Takes a new connection, making room for it if the cap is reached.
    fn admit(&mut self, stream: UnixStream, now: Instant) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let max = self.config.max_connections;
        let ordinary = self.conns.values().filter(|c| !c.reserved).count();
        // Every ordinary connection busy with the VMM: the new one may still shut it down.
        let reserved =
            ordinary >= max && !self.conns.values().any(|c| c.is_reading() && !c.reserved);
        let (lane, cap) = match reserved {
            false => (ordinary, max),
            true => (self.conns.len() - ordinary, SHUTDOWN_RESERVE),
        };
        if lane >= cap {
            let oldest_reading = self
                .conns
                .iter()
                .find(|(_, c)| c.is_reading() && c.reserved == reserved)
                .map(|(&token, _)| token);
            let Some(token) = oldest_reading else {
                if let Some(n) = self.refused.note(now) {
                    log::warn!(
                        "API: {max} connections are open, all waiting for the VMM or taking \
                         their response, and {SHUTDOWN_RESERVE} more for a shutdown; refused \
                         {n} new connection(s) with 503"
                    );
                }
                parting_shot(stream, &busy());
                return;
            };
            if let Some(conn) = self.conns.remove(&token) {
                parting_shot(
                    conn.stream,
                    &Response::error(
                        503,
                        "too many open connections: this one, the oldest still sending \
                         its request, was closed to make room",
                    ),
                );
            }
            if let Some(n) = self.evicted.note(now) {
                log::warn!(
                    "API: {max} connections are open; closed {n} connection(s) that had not \
                     sent a whole request, oldest first, to make room for new ones"
                );
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        let added = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        );
        if added.is_ok() {
            let deadline = now + self.config.request_timeout;
            self.conns
                .insert(token, Conn::new(stream, deadline, reserved));
        }
    }

    fn on_event(&mut self, token: u64, events: EventSet, now: Instant) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.state {
            State::Reading { .. } => match conn.read() {
                Incoming::More => {}
                Incoming::Request(request) => self.dispatch(token, &request, now),
                Incoming::Reject(response) => self.respond(token, &response, now),
                Incoming::Gone => self.close(token),
            },
            // The peer hung up while the VMM works: nobody to answer.
            State::Waiting { .. } => {
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    self.close(token);
                }
            }
            State::Writing { .. } => match conn.write() {
                Written::More => {}
                Written::Done | Written::Gone => self.close(token),
            },
        }
        self.sync_interest(token);
    }

    /// Routes `request`: answers it at once, or hands it to the VMM.
    fn dispatch(&mut self, token: u64, request: &Request, now: Instant) {
        let reserved = self.conns.get(&token).is_some_and(|c| c.reserved);
        match route(request) {
            Routed::Respond(response) => self.respond(token, &response, now),
            Routed::Vmm { action, .. } if reserved && action != ApiAction::Shutdown => {
                self.respond(token, &busy(), now)
            }
            Routed::Vmm { action, on_reply } => match self.ask_vmm(action) {
                Ok(answer) => {
                    if let Some(conn) = self.conns.get_mut(&token) {
                        conn.state = State::Waiting {
                            answer,
                            on_reply,
                            deadline: now + self.config.reply_timeout,
                        };
                    }
                }
                Err(response) => self.respond(token, &response, now),
            },
        }
    }

    /// Sends `action` to the VMM and wakes it; the reply comes on the
    /// receiver, announced by [`Worker::wake`].
    fn ask_vmm(&self, action: ApiAction) -> Result<Receiver<ApiResult>, Response> {
        let (request, answer) = ApiRequest::new(action, Some(self.wake.clone()));
        if self.to_vmm.send(request).is_err() {
            return Err(Response::error(503, "the VMM is not running"));
        }
        if let Err(e) = self.notify.write(1) {
            return Err(Response::error(500, format!("cannot notify the VMM: {e}")));
        }
        Ok(answer)
    }

    /// Answers every connection whose reply has come (or whose reply sender
    /// the VMM dropped).
    fn collect_replies(&mut self, now: Instant) {
        let mut ready = Vec::new();
        for (&token, conn) in &self.conns {
            if let State::Waiting {
                answer, on_reply, ..
            } = &conn.state
            {
                match answer.try_recv() {
                    Ok(result) => ready.push((token, vmm_response(result, *on_reply))),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        ready.push((token, Response::error(503, "the VMM dropped the request")))
                    }
                }
            }
        }
        for (token, response) in ready {
            self.respond(token, &response, now);
        }
    }

    /// Starts writing `response` on the connection; closes it if that is all.
    fn respond(&mut self, token: u64, response: &Response, now: Instant) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.respond(response, now + self.config.write_timeout) {
            Written::More => self.sync_interest(token),
            Written::Done | Written::Gone => self.close(token),
        }
    }

    /// Makes the epoll set watch what the connection's state needs.
    fn sync_interest(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let wanted = conn.wanted();
        if wanted != conn.interest {
            let changed = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(wanted, token),
            );
            match changed {
                Ok(()) => conn.interest = wanted,
                Err(_) => self.close(token),
            }
        }
    }

    /// Closing the stream also takes it out of the epoll set (nothing else
    /// holds its descriptor).
    fn close(&mut self, token: u64) {
        self.conns.remove(&token);
    }

    /// Ends what is overdue: 408 for a request not read in time, 504 for a
    /// VMM that did not answer, and a close for a response not taken.
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline() <= now)
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            let Some(conn) = self.conns.get(&token) else {
                continue;
            };
            match conn.state {
                State::Reading { .. } => {
                    let response = Response::error(408, "timed out reading the request");
                    self.respond(token, &response, now);
                }
                State::Waiting { .. } => {
                    let response = Response::error(504, "the VMM did not answer in time");
                    self.respond(token, &response, now);
                }
                State::Writing { .. } => self.close(token),
            }
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            self.watch_listener(true);
        }
    }

    /// The server is being dropped: requests waiting for the VMM hear so.
    fn shut_down(&mut self) {
        let stopping = Response::error(503, "the API server is stopping");
        for (_, conn) in std::mem::take(&mut self.conns) {
            if matches!(conn.state, State::Waiting { .. }) {
                parting_shot(conn.stream, &stopping);
            }
        }
    }
}

/// The response for the VMM's outcome.
fn vmm_response(result: ApiResult, on_reply: fn(crate::types::ApiReply) -> Response) -> Response {
    match result {
        Ok(reply) => on_reply(reply),
        // A status that is not an error status is a VMM bug.
        Err(e) if (400..=599).contains(&e.status) => {
            let response = Response::error(e.status, e.message);
            match e.retry_after {
                Some(seconds) => response.with_header("Retry-After", seconds.to_string()),
                None => response,
            }
        }
        Err(e) => Response::error(500, e.message),
    }
}

/// The answer when every connection is busy with the VMM.
fn busy() -> Response {
    Response::error(503, "too many connections are waiting for the VMM")
}

/// Writes what the socket takes of `response` at once, then closes.
fn parting_shot(mut stream: UnixStream, response: &Response) {
    let _ = stream.write(&response.to_bytes());
}
