//! One stream connection between a guest port and a host Unix stream: the state machine
//! of virtio 1.2 section 5.10.6.4 and credit-based flow control (5.10.6.3).
//!
//! Credit, per direction:
//! - guest → host: we advertise `buf_alloc` = [`TX_BUF_SIZE`] and `fwd_cnt` = the bytes
//!   written to the host stream so far. What the guest sent and the host has not read yet
//!   waits in `tx_buf`, so the guest may never have more than `TX_BUF_SIZE` bytes there:
//!   a guest that overruns its credit is reset. We send a credit update when the guest's
//!   view of our free space is stale (see [`Connection::needs_credit_update`]) and when it
//!   asks (CREDIT_REQUEST).
//! - host → guest: the guest advertises its `buf_alloc` and `fwd_cnt` in every packet; we
//!   never send more than `buf_alloc - (rx_cnt - fwd_cnt)` bytes ahead. The host stream is
//!   read into `rx_buf` only up to that credit and at most [`RX_BUF_LIMIT`] bytes, so a
//!   guest without credit (or without rx buffers) stops the reads and the host writer
//!   blocks in its socket. When blocked on credit with data waiting, we ask once for an
//!   update (CREDIT_REQUEST).
//!
//! Closing: a guest RST ends the connection at once. A guest SHUTDOWN half-closes the
//! host stream (SEND: the host reads EOF once `tx_buf` is flushed; RCV: the host's writes
//! fail); both flags end the connection with our RST once `tx_buf` is flushed (or after
//! the shutdown timeout). When the host stream reaches EOF we send SHUTDOWN(SEND), and
//! when the host closed it entirely, SHUTDOWN(RCV|SEND), then wait for the guest's RST
//! (at most the shutdown timeout). Ending a connection closes the host stream, so the
//! host sees EOF.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::defs::*;
use super::header::Hdr;
pub use super::Timeouts;

/// Our `buf_alloc`: guest bytes a connection holds while the host does not read them.
pub const TX_BUF_SIZE: u32 = 128 * 1024;
/// Host bytes a connection holds while the guest cannot take them.
pub const RX_BUF_LIMIT: usize = 64 * 1024;
/// A credit update is due when the guest believes it has less room than this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is queued or sent, the RESPONSE not yet received.
    Connecting,
    Established,
    /// We sent (or queued) SHUTDOWN with both flags; waiting for the guest's RST.
    Closing,
}

/// What the muxer must do with a connection after an event.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Forget the connection and close the host stream; send the guest an RST if `rst`.
    Close {
        rst: bool,
    },
}

/// Control packets waiting for an rx buffer.
#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_request: bool,
    credit_update: bool,
}

#[derive(Debug)]
pub struct Connection {
    state: State,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    stream: UnixStream,
    /// Hybrid-socket connection: write `OK <local_port>\n` to the host on RESPONSE.
    ok_line: bool,
    request_sent: bool,
    timeouts: Timeouts,
    expiry: Option<Instant>,
    pending: Pending,
    // guest → host
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    // host → guest
    rx_buf: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    /// SHUTDOWN flags from the guest (its point of view: RCV = it receives no more).
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent or queued (our point of view).
    local_shutdown: u32,
    host_eof: bool,
    host_hup: bool,
    host_write_shut: bool,
}

impl Connection {
    fn new(
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
        state: State,
        timeouts: Timeouts,
    ) -> Self {
        Connection {
            state,
            guest_cid,
            local_port,
            peer_port,
            stream,
            ok_line: false,
            request_sent: false,
            timeouts,
            expiry: None,
            pending: Pending::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
        }
    }

    /// A connection the host opens: sends REQUEST, gives up after `timeouts.request`.
    pub fn host_initiated(
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
        hybrid: bool,
        now: Instant,
        timeouts: Timeouts,
    ) -> Self {
        let mut c = Self::new(
            guest_cid,
            local_port,
            peer_port,
            stream,
            State::Connecting,
            timeouts,
        );
        c.ok_line = hybrid;
        c.pending.request = true;
        c.expiry = Some(now + timeouts.request);
        c
    }

    /// Host data already read (after a hybrid handshake), for the guest once the
    /// connection is up; at most [`RX_BUF_LIMIT`] bytes are kept.
    pub fn prefill(&mut self, initial: &[u8]) {
        let n = initial
            .len()
            .min(RX_BUF_LIMIT.saturating_sub(self.rx_buf.len()));
        self.rx_buf.extend(&initial[..n]);
    }

    /// A connection the guest opened with `request`, accepted by a host listener.
    pub fn guest_initiated(request: &Hdr, stream: UnixStream, timeouts: Timeouts) -> Self {
        let mut c = Self::new(
            request.src_cid,
            request.dst_port,
            request.src_port,
            stream,
            State::Established,
            timeouts,
        );
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c.pending.response = true;
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether the REQUEST went out (the guest may know of the connection).
    fn guest_knows(&self) -> bool {
        self.state != State::Connecting || self.request_sent
    }

    /// What the guest can still take: its free space as it last told us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest's view of our free space is stale enough to send an update: it
    /// believes it has less than [`CREDIT_UPDATE_THRESHOLD`] left, or half the buffer was
    /// forwarded since it last heard from us.
    pub fn needs_credit_update(&self) -> bool {
        let stale = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let believed_used = stale.saturating_add(self.tx_buf.len() as u32);
        let believed_free = TX_BUF_SIZE.saturating_sub(believed_used);
        let guest_may_send =
            self.state == State::Established && self.peer_shutdown & SHUTDOWN_SEND == 0;
        guest_may_send
            && stale > 0
            && (believed_free < CREDIT_UPDATE_THRESHOLD || stale >= TX_BUF_SIZE / 2)
    }

    fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    fn rx_room(&self) -> usize {
        let cap = RX_BUF_LIMIT.min(self.peer_credit() as usize);
        cap.saturating_sub(self.rx_buf.len())
    }

    /// The epoll events wanted on the host stream (hang-ups and errors always come).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.may_read_host() && self.rx_room() > 0 {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Takes a packet from the guest (addressed to this connection); call
    /// [`Connection::advance`] afterwards.
    pub fn recv_pkt(&mut self, hdr: &Hdr, data: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.credit_requested = false;
        match (self.state, hdr.op) {
            (_, OP_RST) => Verdict::Close { rst: false },
            (State::Connecting, OP_RESPONSE) => {
                self.state = State::Established;
                self.expiry = None;
                if self.ok_line && self.write_ok_line().is_err() {
                    return Verdict::Close { rst: true };
                }
                Verdict::Keep
            }
            (State::Connecting, _) => Verdict::Close { rst: true },
            (_, OP_CREDIT_UPDATE) => Verdict::Keep,
            (_, OP_CREDIT_REQUEST) => {
                self.pending.credit_update = true;
                Verdict::Keep
            }
            // We receive no more: the guest's data has nowhere to go.
            (State::Closing, OP_RW) => Verdict::Keep,
            (State::Closing, _) => Verdict::Close { rst: true },
            (State::Established, OP_RW) => self.take_data(data),
            (State::Established, OP_SHUTDOWN) => {
                let new = hdr.flags & SHUTDOWN_BOTH & !self.peer_shutdown;
                self.peer_shutdown |= new;
                if new & SHUTDOWN_RCV != 0 {
                    self.rx_buf.clear();
                    // The host's further writes fail (EPIPE) instead of piling up.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                Verdict::Keep
            }
            // REQUEST or RESPONSE on a live connection, or an unknown op.
            (State::Established, _) => Verdict::Close { rst: true },
        }
    }

    fn take_data(&mut self, data: &[u8]) -> Verdict {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Close { rst: true };
        }
        if self.local_shutdown & SHUTDOWN_RCV != 0 {
            return Verdict::Keep;
        }
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            return Verdict::Close { rst: true };
        }
        self.tx_buf.extend(data);
        Verdict::Keep
    }

    fn write_ok_line(&mut self) -> io::Result<()> {
        let line = format!("OK {}\n", self.local_port);
        // The stream is fresh and non-blocking: its socket buffer takes a short line, and
        // anything else is an error.
        self.stream.write_all(line.as_bytes())
    }

    /// Moves data as far as it can go without blocking and queues the control packets
    /// that became due. Call after every event that concerns the connection.
    pub fn advance(&mut self, now: Instant) -> Verdict {
        if self.state == State::Connecting {
            return Verdict::Keep;
        }
        if self.flush_tx().is_err() {
            return Verdict::Close { rst: true };
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.tx_buf.is_empty()
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            if self.tx_buf.is_empty() {
                return Verdict::Close { rst: true };
            }
            self.expiry.get_or_insert(now + self.timeouts.shutdown);
        }
        if self.needs_credit_update() {
            self.pending.credit_update = true;
        }
        if self.may_read_host() && self.fill_rx().is_err() {
            return Verdict::Close { rst: true };
        }
        let nothing_more_to_guest = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        if nothing_more_to_guest && self.rx_buf.is_empty() {
            let mut flags = SHUTDOWN_SEND;
            if self.host_hup {
                flags |= SHUTDOWN_RCV;
            }
            if flags & !self.local_shutdown != 0 {
                self.local_shutdown |= flags;
                self.pending.shutdown = true;
            }
            if self.local_shutdown == SHUTDOWN_BOTH && self.state == State::Established {
                self.state = State::Closing;
                self.expiry = Some(now + self.timeouts.shutdown);
            }
        }
        // Out of credit with data waiting, or more to come: ask once per guest packet.
        let more = !self.rx_buf.is_empty() || self.may_read_host();
        if more
            && self.state == State::Established
            && self.peer_credit() == 0
            && !self.credit_requested
        {
            self.credit_requested = true;
            self.pending.credit_request = true;
        }
        Verdict::Keep
    }

    fn flush_tx(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fill_rx(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let room = self.rx_room();
            if room == 0 {
                return Ok(());
            }
            let want = room.min(buf.len());
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    return Ok(());
                }
                Ok(n) => self.rx_buf.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The host closed its end entirely (EPOLLHUP). What is left in the socket is still
    /// read, then the guest hears SHUTDOWN(RCV|SEND).
    pub fn host_hung_up(&mut self) -> Verdict {
        self.host_hup = true;
        if self.state == State::Connecting {
            return Verdict::Close {
                rst: self.request_sent,
            };
        }
        Verdict::Keep
    }

    /// The verdict once the expiry passed.
    pub fn expire(&mut self, now: Instant) -> Verdict {
        match self.expiry {
            Some(t) if t <= now => Verdict::Close {
                rst: self.guest_knows(),
            },
            _ => Verdict::Keep,
        }
    }

    /// Ends the connection on our side (error, reset): whether the guest needs an RST.
    pub fn abort(&self) -> Verdict {
        Verdict::Close {
            rst: self.guest_knows(),
        }
    }
}

mod rx;

#[cfg(test)]
mod tests;
