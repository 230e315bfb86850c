//! The host side of the device: every connection, keyed by (host port, guest port), the
//! host endpoints that create them (the connector's requests, the hybrid listener and
//! its handshakes), the RSTs owed to the guest, and the timer behind every timeout.
//!
//! The muxer owns every host file descriptor but cannot touch the event loop's epoll set
//! itself: it queues [`FdUpdate`]s, which the event handler applies after each event. A
//! stream that was ever registered is closed only through [`FdUpdate::Remove`], after its
//! removal from the set, so that an fd number is never reused while epoll still knows it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::ErrorKind;
use std::ops::Bound;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_protocol::AGENT_PORT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Timeouts, Verdict};
use super::defs::*;
use super::header::Hdr;
use super::hybrid::{connect_nonblocking, Handshake, HandshakeStep, HybridListener};
use super::{
    HostConnect, VsockConnector, VsockError, CONNECT_BACKLOG, EPHEMERAL_PORT_START, VSOCK_HOST_CID,
};

/// Connections at once, whoever opened them; beyond, new ones are refused.
pub const MAX_CONNECTIONS: usize = 128;
/// Of [`MAX_CONNECTIONS`], the slots only the VMM's own connections (the connector's:
/// the agent clients) may take, so that neither the guest nor hybrid-socket clients can
/// cut the VMM off from its agent.
pub const CONNECTOR_RESERVE: usize = 4;
/// Hybrid-socket clients that have not finished their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 16;
/// Hybrid-socket connections at once, to all guest ports: the rest of
/// [`MAX_CONNECTIONS`] stays for the VMM's own connections and the guest's.
pub const MAX_HYBRID_CONNECTIONS: usize = 32;
/// Hybrid-socket connections at once to the guest agent's port. The agent serves
/// [`agent_protocol::MAX_AGENT_CONNECTIONS`] at a time; the VMM's own clients (API calls,
/// and up to `evacuation::MAX_WORKER_CONNECTIONS` for the node workers), and
/// the connections they dropped on a timeout whose requests the agent still works on,
/// must always find a slot.
pub const MAX_HYBRID_AGENT_CONNECTIONS: usize = agent_protocol::MAX_AGENT_CONNECTIONS / 2;
/// RSTs waiting for rx buffers; more are dropped (the guest's peer times out instead).
pub const MAX_PENDING_RST: usize = 256;
/// Accepts per listener event; the rest wait for the next round of the event loop.
const ACCEPTS_PER_EVENT: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A change to the event loop's epoll set.
#[derive(Debug)]
pub enum FdUpdate {
    Add(RawFd, EventSet),
    Modify(RawFd, EventSet),
    /// Stop watching the stream, then close it.
    Remove(UnixStream),
    /// Stop watching the fd but keep it open (a host end that hung up: what is left in
    /// its socket is read on demand).
    Detach(RawFd),
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    /// Opened by a hybrid-socket client.
    hybrid: bool,
    /// What the epoll set watches, once an Add was queued.
    registered: Option<EventSet>,
    detached: bool,
}

#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    conns: BTreeMap<ConnKey, Entry>,
    by_fd: HashMap<RawFd, ConnKey>,
    rst_queue: VecDeque<Hdr>,
    /// Round robin: the rx scan starts after this key.
    rr_last: Option<ConnKey>,
    next_port: u32,
    requests: Receiver<HostConnect>,
    connector: VsockConnector,
    control: Arc<EventFd>,
    listener: Option<HybridListener>,
    handshakes: HashMap<RawFd, Handshake>,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    updates: Vec<FdUpdate>,
    timeouts: Timeouts,
}

impl Muxer {
    pub(crate) fn new(
        guest_cid: u64,
        listener: Option<HybridListener>,
    ) -> Result<Self, VsockError> {
        let (tx, requests) = mpsc::sync_channel(CONNECT_BACKLOG);
        let control = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Fd)?);
        Ok(Muxer {
            guest_cid,
            conns: BTreeMap::new(),
            by_fd: HashMap::new(),
            rst_queue: VecDeque::new(),
            rr_last: None,
            next_port: EPHEMERAL_PORT_START,
            requests,
            connector: VsockConnector::new(tx, control.clone()),
            control,
            listener,
            handshakes: HashMap::new(),
            timer: TimerFd::new()
                .map_err(|e| VsockError::Fd(std::io::Error::from_raw_os_error(e.errno())))?,
            timer_armed: None,
            updates: Vec::new(),
            timeouts: Timeouts::default(),
        })
    }

    pub fn connector(&self) -> VsockConnector {
        self.connector.clone()
    }

    /// Written by the connector, and by a reset; the handler watches it.
    pub fn control_event(&self) -> Arc<EventFd> {
        self.control.clone()
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    pub fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(|l| l.listener().as_raw_fd())
    }

    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn take_updates(&mut self) -> Vec<FdUpdate> {
        std::mem::take(&mut self.updates)
    }

    fn queue_rst(&mut self, rst: Hdr) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(rst);
        }
    }

    fn reply_rst(&mut self, to: &Hdr) {
        if let Some(rst) = to.rst_reply() {
            self.queue_rst(rst);
        }
    }

    /// Forgets a connection and closes its host stream; sends the guest an RST if `rst`.
    fn close(&mut self, key: ConnKey, rst: bool) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        if rst {
            self.queue_rst(Hdr {
                src_cid: VSOCK_HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Hdr::default()
            });
        }
        let stream = entry.conn.into_stream();
        self.by_fd.remove(&stream.as_raw_fd());
        if entry.registered.is_some() {
            self.updates.push(FdUpdate::Remove(stream));
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        if let Verdict::Close { rst } = verdict {
            self.close(key, rst);
        }
    }

    /// Runs `f` on the connection, then `advance` unless `f` decided already.
    fn with_conn(
        &mut self,
        key: ConnKey,
        now: Instant,
        f: impl FnOnce(&mut Entry, &mut Vec<FdUpdate>) -> Verdict,
    ) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let verdict = match f(entry, &mut self.updates) {
            Verdict::Keep => entry.conn.advance(now),
            close => close,
        };
        self.apply(key, verdict);
    }

    /// A packet from the guest's tx queue, its payload already copied out.
    pub fn send_from_guest(&mut self, hdr: &Hdr, data: &[u8], now: Instant) {
        if hdr.src_cid != self.guest_cid {
            return; // Spoofed: there is nobody to answer.
        }
        if hdr.dst_cid != VSOCK_HOST_CID || hdr.type_ != TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.with_conn(key, now, |e, _| e.conn.recv_pkt(hdr, data));
        } else if hdr.op == OP_REQUEST {
            self.guest_connect(hdr, now);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// A tx chain the device could not parse, whose header was readable.
    pub fn malformed_from_guest(&mut self, hdr: &Hdr) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.dst_cid == VSOCK_HOST_CID && self.conns.contains_key(&key) {
            self.close(key, true);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// A guest REQUEST to host port P: connect to `PATH_P` if there is a hybrid socket.
    fn guest_connect(&mut self, hdr: &Hdr, now: Instant) {
        let stream = match &self.listener {
            Some(l) if self.conns.len() < MAX_CONNECTIONS - CONNECTOR_RESERVE => {
                connect_nonblocking(&l.port_path(hdr.dst_port)).ok()
            }
            _ => None,
        };
        let Some(stream) = stream else {
            self.reply_rst(hdr);
            return;
        };
        let conn = Connection::guest_initiated(hdr, stream, self.timeouts);
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        self.insert(key, conn, None, false);
        self.with_conn(key, now, |_, _| Verdict::Keep);
    }

    fn insert(
        &mut self,
        key: ConnKey,
        conn: Connection,
        registered: Option<EventSet>,
        hybrid: bool,
    ) {
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(
            key,
            Entry {
                conn,
                hybrid,
                registered,
                detached: false,
            },
        );
    }

    /// Whether a hybrid-socket client may open one more connection to `guest_port`.
    fn hybrid_room(&self, guest_port: u32) -> bool {
        let hybrid = || self.conns.iter().filter(|(_, e)| e.hybrid);
        let to_port = hybrid().filter(|(k, _)| k.peer_port == guest_port).count();
        hybrid().count() < MAX_HYBRID_CONNECTIONS
            && (guest_port != AGENT_PORT || to_port < MAX_HYBRID_AGENT_CONNECTIONS)
    }

    fn alloc_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(EPHEMERAL_PORT_START);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// A host-initiated connection to `guest_port` over `stream`; `registered` says what
    /// the epoll set already watches on it (a hybrid client's stream).
    fn open_host_connection(
        &mut self,
        guest_port: u32,
        stream: UnixStream,
        registered: Option<EventSet>,
        initial: &[u8],
        now: Instant,
    ) {
        let hybrid = registered.is_some();
        let limit = if hybrid {
            MAX_CONNECTIONS - CONNECTOR_RESERVE
        } else {
            MAX_CONNECTIONS
        };
        let port = if self.conns.len() < limit {
            self.alloc_port(guest_port)
        } else {
            None
        };
        let Some(port) = port else {
            // Refused: the host end sees EOF.
            if registered.is_some() {
                self.updates.push(FdUpdate::Remove(stream));
            }
            return;
        };
        let mut conn = Connection::host_initiated(
            self.guest_cid,
            port,
            guest_port,
            stream,
            hybrid,
            now,
            self.timeouts,
        );
        conn.prefill(initial);
        let key = ConnKey {
            local_port: port,
            peer_port: guest_port,
        };
        self.insert(key, conn, registered, hybrid);
    }

    /// Takes the connector's requests.
    pub fn accept_host_connects(&mut self, now: Instant) {
        while let Ok(req) = self.requests.try_recv() {
            self.open_host_connection(req.guest_port, req.stream, None, &[], now);
        }
    }

    /// Accepts hybrid-socket clients; each must then send its `CONNECT` line.
    pub fn accept_hybrid(&mut self, now: Instant) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..ACCEPTS_PER_EVENT {
            match listener.listener().accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // Closed at once.
                    }
                    let fd = stream.as_raw_fd();
                    let deadline = now + self.timeouts.handshake;
                    self.handshakes.insert(fd, Handshake::new(stream, deadline));
                    self.updates.push(FdUpdate::Add(fd, EventSet::IN));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// An event on a host stream: a handshake's or a connection's.
    pub fn handle_fd(&mut self, fd: RawFd, events: EventSet, now: Instant) {
        if let Some(handshake) = self.handshakes.get_mut(&fd) {
            match handshake.read() {
                HandshakeStep::Wait => {}
                HandshakeStep::Fail => {
                    if let Some(h) = self.handshakes.remove(&fd) {
                        self.updates.push(FdUpdate::Remove(h.stream));
                    }
                }
                HandshakeStep::Connect(port, rest) => match self.handshakes.remove(&fd) {
                    // Over the hybrid limits: refused, the client sees EOF.
                    Some(h) if !self.hybrid_room(port) => {
                        self.updates.push(FdUpdate::Remove(h.stream));
                    }
                    Some(h) => {
                        self.open_host_connection(port, h.stream, Some(EventSet::IN), &rest, now)
                    }
                    None => {}
                },
            }
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        self.with_conn(key, now, |entry, updates| {
            if events.contains(EventSet::ERROR) {
                return entry.conn.abort();
            }
            if events.contains(EventSet::HANG_UP) && !entry.detached {
                // HUP cannot be masked: stop watching, or it would fire forever.
                entry.detached = true;
                updates.push(FdUpdate::Detach(fd));
                return entry.conn.host_hung_up();
            }
            Verdict::Keep
        });
    }

    /// The timer fired: ends what expired.
    pub fn handle_timer(&mut self, now: Instant) {
        // Disarming also clears the expiration count, so the timer stops being readable;
        // `sweep` arms it again.
        let _ = self.timer.clear();
        self.timer_armed = None;
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.expiry().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(entry) = self.conns.get_mut(&key) {
                let verdict = entry.conn.expire(now);
                self.apply(key, verdict);
            }
        }
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            if let Some(h) = self.handshakes.remove(&fd) {
                self.updates.push(FdUpdate::Remove(h.stream));
            }
        }
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || self.conns.values().any(|e| e.conn.has_pending_rx())
    }

    /// The next packet for the guest, with at most `max_data` bytes of payload in `data`.
    /// RSTs first, then the connections in turn.
    pub fn next_rx(&mut self, max_data: usize, data: &mut Vec<u8>, now: Instant) -> Option<Hdr> {
        data.clear();
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some(rst);
        }
        let pending = |(k, e): (&ConnKey, &Entry)| e.conn.has_pending_rx().then_some(*k);
        let key = match self.rr_last {
            Some(last) => self
                .conns
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.conns.range(..=last))
                .find_map(pending),
            None => self.conns.iter().find_map(pending),
        }?;
        self.rr_last = Some(key);
        let entry = self.conns.get_mut(&key)?;
        let hdr = entry.conn.next_pkt(max_data, data);
        // Room was freed: read more from the host.
        let verdict = entry.conn.advance(now);
        self.apply(key, verdict);
        hdr
    }

    /// Device reset: every connection ends (the host ends see EOF); the handler is woken
    /// to close the streams.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.close(key, false);
        }
        self.rst_queue.clear();
        self.rr_last = None;
        let _ = self.control.write(1);
    }

    /// After each event: brings the epoll set in line with what each connection wants,
    /// and arms the timer for the earliest deadline.
    pub fn sweep(&mut self, now: Instant) {
        for entry in self.conns.values_mut() {
            if entry.detached {
                continue;
            }
            let fd = entry.conn.stream().as_raw_fd();
            let want = entry.conn.interest();
            match entry.registered {
                None => self.updates.push(FdUpdate::Add(fd, want)),
                Some(had) if had != want => self.updates.push(FdUpdate::Modify(fd, want)),
                Some(_) => {}
            }
            entry.registered = Some(want);
        }
        let earliest = self
            .conns
            .values()
            .filter_map(|e| e.conn.expiry())
            .chain(self.handshakes.values().map(|h| h.deadline))
            .min();
        if earliest != self.timer_armed {
            self.timer_armed = earliest;
            let _ = match earliest {
                // A zero duration would disarm the timer.
                Some(t) => self.timer.reset(
                    t.saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                    None,
                ),
                None => self.timer.clear(),
            };
        }
    }
}
