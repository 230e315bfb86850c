//! The connection state machine and its credit accounting, without guest memory.

use std::io::{Read, Write};

use super::*;
use crate::devices::virtio::vsock::VSOCK_HOST_CID;

const GUEST: u64 = 3;

fn guest(op: u16, buf_alloc: u32, fwd_cnt: u32) -> Hdr {
    Hdr {
        src_cid: GUEST,
        dst_cid: VSOCK_HOST_CID,
        src_port: 5252,
        dst_port: 1 << 30,
        type_: TYPE_STREAM,
        op,
        buf_alloc,
        fwd_cnt,
        ..Hdr::default()
    }
}

/// A host-initiated connection the guest accepted with `buf_alloc`, and the host end.
fn established(buf_alloc: u32) -> (Connection, UnixStream, Instant) {
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let now = Instant::now();
    let mut c =
        Connection::host_initiated(GUEST, 1 << 30, 5252, ours, false, now, Timeouts::default());
    let mut data = Vec::new();
    let req = c.next_pkt(4096, &mut data).unwrap();
    assert_eq!(
        (req.op, req.src_port, req.dst_port),
        (OP_REQUEST, 1 << 30, 5252)
    );
    assert!(!c.has_pending_rx());
    assert_eq!(
        c.recv_pkt(&guest(OP_RESPONSE, buf_alloc, 0), &[]),
        Verdict::Keep
    );
    assert_eq!(c.advance(now), Verdict::Keep);
    assert_eq!(c.state(), State::Established);
    (c, host, now)
}

fn drain(c: &mut Connection, max: usize) -> Vec<Hdr> {
    let mut out = Vec::new();
    let mut data = Vec::new();
    while let Some(h) = c.next_pkt(max, &mut data) {
        assert_eq!(h.len as usize, data.len());
        out.push(h);
    }
    out
}

#[test]
fn host_data_stops_at_the_guest_credit_and_resumes_on_an_update() {
    let (mut c, mut host, now) = established(1000);
    host.write_all(&[7u8; 3000]).unwrap();
    assert_eq!(c.advance(now), Verdict::Keep);
    let pkts = drain(&mut c, 600);
    let rw: u32 = pkts.iter().filter(|h| h.op == OP_RW).map(|h| h.len).sum();
    assert_eq!(rw, 1000, "never past the credit");
    assert_eq!(pkts.iter().filter(|h| h.op == OP_RW).count(), 2);
    // Blocked with data waiting: one credit request, not one per call.
    assert_eq!(c.advance(now), Verdict::Keep);
    let ops: Vec<u16> = drain(&mut c, 600).iter().map(|h| h.op).collect();
    assert_eq!(ops, [OP_CREDIT_REQUEST]);
    assert_eq!(c.advance(now), Verdict::Keep);
    assert!(!c.has_pending_rx());
    assert_eq!(c.interest(), EventSet::empty(), "no reads without credit");
    // The guest consumed 1000 bytes.
    assert_eq!(
        c.recv_pkt(&guest(OP_CREDIT_UPDATE, 1000, 1000), &[]),
        Verdict::Keep
    );
    assert_eq!(c.advance(now), Verdict::Keep);
    let rw: u32 = drain(&mut c, 4096).iter().map(|h| h.len).sum();
    assert_eq!(rw, 1000);
}

#[test]
fn credit_counters_wrap() {
    let (mut c, mut host, now) = established(100);
    c.rx_cnt = Wrapping(u32::MAX - 10);
    c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
    host.write_all(&[1u8; 50]).unwrap();
    assert_eq!(c.advance(now), Verdict::Keep);
    assert_eq!(drain(&mut c, 4096)[0].len, 50);
    assert_eq!(c.rx_cnt.0, 39, "wrapped past zero");
    assert_eq!(c.peer_credit(), 50);
    // A guest claiming more forwarded than was sent gets no extra credit.
    assert_eq!(
        c.recv_pkt(&guest(OP_CREDIT_UPDATE, 100, 1000), &[]),
        Verdict::Keep
    );
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn guest_data_is_forwarded_and_credit_updates_follow_it() {
    let (mut c, mut host, now) = established(4096);
    let chunk = vec![9u8; 64 * 1024];
    assert_eq!(c.recv_pkt(&guest(OP_RW, 4096, 0), &chunk), Verdict::Keep);
    assert_eq!(c.advance(now), Verdict::Keep);
    let mut got = vec![0u8; chunk.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(c.fwd_cnt.0, 64 * 1024);
    // Half of our buffer forwarded since the guest last heard: an update is due.
    assert!(c.needs_credit_update());
    let pkts = drain(&mut c, 4096);
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].op, pkts[0].fwd_cnt), (OP_CREDIT_UPDATE, 64 * 1024));
    assert_eq!(pkts[0].buf_alloc, TX_BUF_SIZE);
    assert!(!c.needs_credit_update());
    // A credit request is always answered.
    assert_eq!(
        c.recv_pkt(&guest(OP_CREDIT_REQUEST, 4096, 0), &[]),
        Verdict::Keep
    );
    assert_eq!(drain(&mut c, 4096)[0].op, OP_CREDIT_UPDATE);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let (mut c, _host, now) = established(4096);
    // The host does not read: the first bytes fill its socket, the rest wait in tx_buf.
    let chunk = vec![1u8; 64 * 1024];
    let mut verdict = Verdict::Keep;
    for _ in 0..64 {
        verdict = c.recv_pkt(&guest(OP_RW, 4096, 0), &chunk);
        if verdict != Verdict::Keep {
            break;
        }
        assert_eq!(c.advance(now), Verdict::Keep);
        assert!(c.tx_buf.len() <= TX_BUF_SIZE as usize);
    }
    assert_eq!(verdict, Verdict::Close { rst: true });
}

#[test]
fn guest_shutdowns_half_close_then_close_the_host_stream() {
    let (mut c, mut host, now) = established(4096);
    assert_eq!(c.recv_pkt(&guest(OP_RW, 4096, 0), b"bye"), Verdict::Keep);
    let mut shut = guest(OP_SHUTDOWN, 4096, 0);
    shut.flags = SHUTDOWN_SEND;
    assert_eq!(c.recv_pkt(&shut, &[]), Verdict::Keep);
    assert_eq!(c.advance(now), Verdict::Keep);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "the data, then EOF");
    // The other direction still works.
    host.write_all(b"still here").unwrap();
    assert_eq!(c.advance(now), Verdict::Keep);
    assert_eq!(drain(&mut c, 4096)[0].len, 10);
    // More data after SHUTDOWN(SEND) breaks the protocol.
    let mut c2 = established(4096).0;
    assert_eq!(c2.recv_pkt(&shut, &[]), Verdict::Keep);
    assert_eq!(
        c2.recv_pkt(&guest(OP_RW, 4096, 0), b"x"),
        Verdict::Close { rst: true }
    );
    // Both flags: the guest is done; we answer with RST.
    shut.flags = SHUTDOWN_BOTH;
    assert_eq!(c.recv_pkt(&shut, &[]), Verdict::Keep);
    assert_eq!(c.advance(now), Verdict::Close { rst: true });
}

#[test]
fn host_eof_then_hang_up_shut_the_guest_down_and_time_out() {
    let (mut c, host, now) = established(4096);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.advance(now), Verdict::Keep);
    let pkts = drain(&mut c, 4096);
    assert_eq!((pkts[0].op, pkts[0].flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    assert_eq!(c.state(), State::Established, "half closed");
    drop(host);
    assert_eq!(c.host_hung_up(), Verdict::Keep);
    assert_eq!(c.advance(now), Verdict::Keep);
    let pkts = drain(&mut c, 4096);
    assert_eq!((pkts[0].op, pkts[0].flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    assert_eq!(c.state(), State::Closing);
    assert_eq!(c.expire(now), Verdict::Keep);
    let later = now + Timeouts::default().shutdown;
    assert_eq!(c.expire(later), Verdict::Close { rst: true });
}

#[test]
fn a_host_request_the_guest_ignores_expires_and_only_rst_or_response_count() {
    let (ours, _host) = UnixStream::pair().unwrap();
    let now = Instant::now();
    let t = Timeouts::default();
    let mut c = Connection::host_initiated(GUEST, 1 << 30, 5252, ours, false, now, t);
    // Before the REQUEST went out, the guest knows nothing: no RST owed.
    assert_eq!(c.expire(now + t.request), Verdict::Close { rst: false });
    let _ = c.next_pkt(4096, &mut Vec::new());
    assert_eq!(c.expire(now), Verdict::Keep);
    assert_eq!(c.expire(now + t.request), Verdict::Close { rst: true });
    // Data before the RESPONSE is a protocol error.
    assert_eq!(
        c.recv_pkt(&guest(OP_RW, 4096, 0), b"early"),
        Verdict::Close { rst: true }
    );
}
