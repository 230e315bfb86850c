//! The device end to end: a mock guest driver on real queues, the event handler on a
//! real event loop, and host ends as real Unix sockets.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mempower_api::unix_socket::BindError;

use super::connection::{Timeouts, TX_BUF_SIZE};
use super::defs::*;
use super::header::Hdr;
use super::test_driver::*;
use super::*;
use crate::devices::virtio::{VirtioDevice, INTERRUPT_USED_RING};

pub(super) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mempower-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A host-initiated connection the mock guest accepted: (host stream, host port).
fn accepted(rig: &mut Rig, guest_port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let stream = rig.connector.connect(guest_port).unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST);
    let mut resp = from_guest(OP_RESPONSE, guest_port, req.src_port);
    resp.buf_alloc = buf_alloc;
    rig.send(&resp, &[]);
    rig.settle(20);
    (stream, req.src_port)
}

/// Nothing left to do: no event fires (level-triggered fds that spin would).
fn assert_idle(rig: &mut Rig) {
    rig.settle(30);
    assert_eq!(
        rig.em.run_with_timeout(50).unwrap(),
        0,
        "the event loop spins"
    );
}

fn is_rst_to(h: &Hdr, guest_port: u32, host_port: u32) -> bool {
    h.op == OP_RST && h.dst_port == guest_port && h.src_port == host_port
}

#[test]
fn identity_queues_and_config_space() {
    let mut dev = VsockDevice::new(3, None).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.features(), 0);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    let mut high = [0xffu8; 4];
    dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut past = [0u8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0; 4], "bytes past the end are left alone");
    dev.read_config(u64::MAX, &mut past);
    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3, "read-only");
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            VsockDevice::new(bad, None),
            Err(VsockError::InvalidCid(_))
        ));
    }
}

#[test]
fn the_device_comes_up_through_the_mmio_transport() {
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{self as tu, r, w, w64};
    use crate::devices::BusDevice;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    use virtio_bindings::virtio_mmio::*;

    fn assert_handle<T: Clone + Send + Sync>() {}
    assert_handle::<VsockConnector>();
    let dev = Arc::new(Mutex::new(VsockDevice::new(3, None).unwrap()));
    let mut t =
        MmioTransport::new(dev.clone(), vm_memory::GuestMemoryAtomic::new(tu::memory())).unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 19);
    let mut cid = [0u8; 8];
    t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    assert_eq!(t.queue_events().unwrap().len(), 3);
    assert_ne!(tu::negotiate(&mut t, tu::V1) & 8, 0, "FEATURES_OK");
    for q in 0..3u32 {
        let base = 0x1000 * u64::from(q + 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
        w64(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        w64(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x400);
        w64(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x800);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    tu::driver_ok(&mut t);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert!(dev.lock().unwrap().is_active());
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!dev.lock().unwrap().is_active(), "reset");
}

#[test]
fn a_guest_connection_without_a_host_listener_is_refused() {
    let mut rig = Rig::new(None);
    rig.send(&from_guest(OP_REQUEST, 1000, 1234), &[]);
    let (rst, _) = rig.expect("RST", |h| h.op == OP_RST);
    assert_eq!(
        (
            rst.src_cid,
            rst.dst_cid,
            rst.src_port,
            rst.dst_port,
            rst.type_
        ),
        (2, 3, 1234, 1000, TYPE_STREAM)
    );
    assert_ne!(rig.irq.status() & INTERRUPT_USED_RING, 0);
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_host_connection_is_accepted_and_carries_data_both_ways() {
    let mut rig = Rig::new(None);
    let mut stream = rig.connector.connect(5252).unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (2, 3, 5252));
    assert!(req.src_port >= EPHEMERAL_PORT_START);
    assert_eq!(
        (req.type_, req.buf_alloc, req.fwd_cnt),
        (TYPE_STREAM, TX_BUF_SIZE, 0)
    );
    // Written before the guest accepted: waits in the socket.
    stream.write_all(b"early ").unwrap();
    rig.settle(20);
    assert!(rig.inbox.iter().all(|(h, _)| h.op != OP_RW));
    rig.send(&from_guest(OP_RESPONSE, 5252, req.src_port), &[]);
    stream.write_all(b"ping").unwrap();
    let mut got = Vec::new();
    rig.run_until(|r| {
        for (h, d) in r.inbox.drain(..) {
            assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, req.src_port, 5252));
            got.extend(d);
        }
        got.len() >= 10
    });
    assert_eq!(got, b"early ping");
    let mut rw = from_guest(OP_RW, 5252, req.src_port);
    rw.len = 4;
    rig.send(&rw, b"pong");
    assert_eq!(rig.host_read(&mut stream, 4), b"pong");
    // Two connections to one guest port get distinct host ports.
    let _second = rig.connector.connect(5252).unwrap();
    let (req2, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST);
    assert_ne!(req2.src_port, req.src_port);
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 2);
}

#[test]
fn a_refused_host_connection_reads_eof() {
    let mut rig = Rig::new(None);
    let mut stream = rig.connector.connect(77).unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST);
    rig.send(&from_guest(OP_RST, 77, req.src_port), &[]);
    assert!(rig.host_sees_eof(&mut stream));
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 0);
    assert!(
        rig.inbox.iter().all(|(h, _)| h.op != OP_RST),
        "an RST is never answered"
    );
}

#[test]
fn a_guest_that_never_answers_times_out_to_eof() {
    let timeouts = Timeouts {
        request: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let mut rig = Rig::with_timeouts(None, timeouts);
    let mut stream = rig.connector.connect(5252).unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST);
    assert!(rig.host_sees_eof(&mut stream));
    rig.expect("RST", |h| is_rst_to(h, 5252, req.src_port));
    // A late answer finds no connection.
    rig.send(&from_guest(OP_RESPONSE, 5252, req.src_port), &[]);
    rig.expect("RST", |h| is_rst_to(h, 5252, req.src_port));
}

#[test]
fn host_data_stops_at_the_guest_credit_and_resumes_after_an_update() {
    let mut rig = Rig::new(None);
    let (mut stream, port) = accepted(&mut rig, 5252, 1000);
    let sent: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    stream.write_all(&sent).unwrap();
    let mut got = Vec::new();
    let take = |rig: &mut Rig, got: &mut Vec<u8>| {
        rig.settle(100);
        let mut ops = Vec::new();
        for (h, d) in rig.inbox.drain(..) {
            ops.push(h.op);
            got.extend(d);
        }
        ops
    };
    let ops = take(&mut rig, &mut got);
    assert_eq!(got.len(), 1000, "never past the credit");
    assert!(ops.contains(&OP_CREDIT_REQUEST), "{ops:?}");
    assert_idle(&mut rig);
    let mut update = from_guest(OP_CREDIT_UPDATE, 5252, port);
    update.buf_alloc = 1000;
    update.fwd_cnt = 1000;
    rig.send(&update, &[]);
    take(&mut rig, &mut got);
    assert_eq!(got.len(), 2000);
    update.buf_alloc = 64 * 1024;
    update.fwd_cnt = 2000;
    rig.send(&update, &[]);
    take(&mut rig, &mut got);
    assert_eq!(got, sent);
}

#[test]
fn a_guest_without_rx_buffers_stops_the_host_reads() {
    let mut rig = Rig::new(None);
    let (mut stream, _) = accepted(&mut rig, 5252, 1 << 20);
    rig.rx_posted = 0;
    rig.settle(30);
    assert!(rig.inbox.is_empty());
    stream.set_nonblocking(true).unwrap();
    // The host writes until its socket is full: the 16 posted buffers take 64 KiB, the
    // device holds a bounded amount, then the reads stop.
    let chunk = [1u8; 4096];
    let mut written = 0;
    for _ in 0..1024 {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => {
                rig.settle(20);
                match stream.write(&chunk) {
                    Ok(n) => written += n,
                    Err(_) => break,
                }
            }
        }
    }
    assert!(written < 1024 * 4096, "the host writer was never blocked");
    assert_idle(&mut rig);
    assert_eq!(rig.inbox.len(), 16, "one packet per posted buffer");
    // Buffers again: everything arrives.
    rig.rx_posted = 16;
    let mut got = 0;
    rig.run_until(|r| {
        got += r.inbox.drain(..).map(|(_, d)| d.len()).sum::<usize>();
        got >= written
    });
    assert_eq!(got, written);
}

#[test]
fn guest_rst_and_shutdown_close_the_host_stream() {
    let mut rig = Rig::new(None);
    let (mut a, port_a) = accepted(&mut rig, 1, 4096);
    rig.send(&from_guest(OP_RST, 1, port_a), &[]);
    assert!(rig.host_sees_eof(&mut a));
    // Anything later on that connection gets an RST.
    rig.send(&from_guest(OP_CREDIT_UPDATE, 1, port_a), &[]);
    rig.expect("RST", |h| is_rst_to(h, 1, port_a));

    let (mut b, port_b) = accepted(&mut rig, 2, 4096);
    let mut shut = from_guest(OP_SHUTDOWN, 2, port_b);
    shut.flags = SHUTDOWN_BOTH;
    rig.send(&shut, &[]);
    assert!(rig.host_sees_eof(&mut b));
    rig.expect("RST", |h| is_rst_to(h, 2, port_b));
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_host_close_shuts_the_guest_down_and_its_rst_ends_the_connection() {
    let mut rig = Rig::new(None);
    let (stream, port) = accepted(&mut rig, 9, 4096);
    drop(stream);
    let (shut, _) = rig.expect("SHUTDOWN", |h| h.op == OP_SHUTDOWN);
    assert_eq!(
        (shut.flags, shut.src_port, shut.dst_port),
        (SHUTDOWN_BOTH, port, 9)
    );
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 1);
    assert_idle(&mut rig);
    rig.send(&from_guest(OP_RST, 9, port), &[]);
    assert!(rig.run_until(|r| r.dev.lock().unwrap().connection_count() == 0));
    assert!(rig.inbox.is_empty(), "an RST is never answered");
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut rig = Rig::new(None);
    let (mut stream, port) = accepted(&mut rig, 3, 4096);
    // The host reads nothing: its socket fills, then our buffer; then the guest overruns.
    let chunk = vec![5u8; 60 * 1024];
    let mut rw = from_guest(OP_RW, 3, port);
    rw.len = chunk.len() as u32;
    for _ in 0..16 {
        rig.send(&rw, &chunk);
        rig.step();
    }
    rig.expect("RST", |h| is_rst_to(h, 3, port));
    assert!(rig.host_sees_eof(&mut stream));
}

#[test]
fn a_credit_request_is_answered() {
    let mut rig = Rig::new(None);
    let (_stream, port) = accepted(&mut rig, 4, 4096);
    rig.send(&from_guest(OP_CREDIT_REQUEST, 4, port), &[]);
    let (upd, _) = rig.expect("CREDIT_UPDATE", |h| h.op == OP_CREDIT_UPDATE);
    assert_eq!(
        (upd.buf_alloc, upd.fwd_cnt, upd.dst_port),
        (TX_BUF_SIZE, 0, 4)
    );
}

#[test]
fn a_reset_closes_every_connection() {
    let mut rig = Rig::new(None);
    let (mut stream, _) = accepted(&mut rig, 6, 4096);
    rig.dev.lock().unwrap().reset();
    assert!(rig.host_sees_eof(&mut stream));
    assert_eq!(rig.dev.lock().unwrap().connection_count(), 0);
    assert!(!rig.dev.lock().unwrap().is_active());
}

#[test]
fn the_connector_fails_once_the_device_is_gone() {
    let rig = Rig::new(None);
    let connector = rig.connector.clone();
    drop(rig);
    let err = connector.connect(1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotConnected);
}

fn read_line(rig: &mut Rig, stream: &mut UnixStream) -> Vec<u8> {
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let b = rig.host_read(stream, 1);
        if b.is_empty() {
            break;
        }
        line.extend(b);
    }
    line
}

#[test]
fn hybrid_clients_connect_with_a_connect_line() {
    let dir = temp_dir("hybrid");
    let path = dir.join("v.sock");
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        VsockDevice::new(3, Some(&path)),
        Err(VsockError::Socket(BindError::NotASocket(_)))
    ));
    std::fs::remove_file(&path).unwrap();
    drop(UnixListener::bind(&path).unwrap()); // A stale socket is replaced.
    let timeouts = Timeouts {
        handshake: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let mut rig = Rig::with_timeouts(Some(&path), timeouts);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1234\nhi").unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST && h.dst_port == 1234);
    rig.send(&from_guest(OP_RESPONSE, 1234, req.src_port), &[]);
    let line = read_line(&mut rig, &mut client);
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
    let (rw, data) = rig.expect("RW", |h| h.op == OP_RW);
    assert_eq!(
        (rw.dst_port, data),
        (1234, b"hi".to_vec()),
        "bytes after the line"
    );
    let mut back = from_guest(OP_RW, 1234, req.src_port);
    back.len = 5;
    rig.send(&back, b"hello");
    assert_eq!(rig.host_read(&mut client, 5), b"hello");

    // Refused by the guest: EOF, no OK.
    let mut refused = UnixStream::connect(&path).unwrap();
    refused.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = rig.expect("REQUEST", |h| h.op == OP_REQUEST && h.dst_port == 99);
    rig.send(&from_guest(OP_RST, 99, req.src_port), &[]);
    assert_eq!(rig.host_read(&mut refused, 16), b"");

    // Bad lines are closed without reaching the guest.
    for bad in [
        &b"CONNECT x\n"[..],
        b"HELLO 1\n",
        &[b'7'; 40],
        b"CONNECT 99999999999\n",
    ] {
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(bad).unwrap();
        assert!(
            rig.host_sees_eof(&mut c),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Silence is closed after the handshake timeout.
    let mut silent = UnixStream::connect(&path).unwrap();
    assert!(rig.host_sees_eof(&mut silent));
    assert!(rig.inbox.iter().all(|(h, _)| h.op != OP_REQUEST));

    drop(rig);
    assert!(!path.exists(), "the socket file goes with the device");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_reaches_the_host_socket_path_port() {
    let dir = temp_dir("g2h");
    let path = dir.join("v.sock");
    let service = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
    let mut rig = Rig::new(Some(&path));
    let mut req = from_guest(OP_REQUEST, 2000, 1234);
    req.buf_alloc = 4096;
    rig.send(&req, &[]);
    let (resp, _) = rig.expect("RESPONSE", |h| h.op == OP_RESPONSE);
    assert_eq!(
        (resp.src_port, resp.dst_port, resp.dst_cid),
        (1234, 2000, 3)
    );
    let (mut host, _) = service.accept().unwrap();
    let mut rw = from_guest(OP_RW, 2000, 1234);
    rw.len = 3;
    rig.send(&rw, b"abc");
    assert_eq!(rig.host_read(&mut host, 3), b"abc");
    host.write_all(b"xyz").unwrap();
    let (_, data) = rig.expect("RW", |h| h.op == OP_RW);
    assert_eq!(data, b"xyz");
    // No socket for that port: refused.
    rig.send(&from_guest(OP_REQUEST, 2001, 4321), &[]);
    rig.expect("RST", |h| is_rst_to(h, 2001, 4321));
    drop(rig);
    std::fs::remove_dir_all(&dir).unwrap();
}

mod malformed;
