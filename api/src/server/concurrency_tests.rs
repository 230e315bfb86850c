//! The server serves connections at once: idle, slow or greedy clients and
//! slow VMM replies delay nobody else. Real sockets, a fake VMM thread.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::ServerConfig;
use crate::http::Response;
use crate::test_util::{exchange, start, start_with, Behaviour};

const GET_VM: &[u8] = b"GET /api/v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n";
const AGENT_CALL: &[u8] =
    b"POST /api/v1/agent/call HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"type\":\"hello\"}";
/// What "not delayed" means here.
const PROMPT: Duration = Duration::from_millis(100);

/// `GET /api/v1/vm` on a new connection: the status and how long it took.
fn timed_get(path: &Path) -> (u16, Duration) {
    let started = Instant::now();
    let r = exchange(path, GET_VM);
    (r.status, started.elapsed())
}

/// The worst latency of `n` GETs, each of which must succeed.
fn worst_get(path: &Path, n: usize) -> Duration {
    (0..n)
        .map(|_| {
            let (status, took) = timed_get(path);
            assert_eq!(status, 200);
            took
        })
        .max()
        .unwrap_or_default()
}

/// Opens `n` connections that send nothing, from a thread, so that a server
/// that does not take them fails the test instead of hanging it.
fn idle_connections(path: &Path, n: usize) -> Vec<UnixStream> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    thread::spawn(move || {
        let conns: Vec<UnixStream> = (0..n)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let _ = tx.send(conns);
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("the server did not take {n} connections within 10 s"))
}

/// Sends `raw` on a new connection, from a thread; the response comes on the
/// receiver, with the time it took.
fn in_background(path: &Path, raw: &'static [u8]) -> mpsc::Receiver<(Response, Duration)> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    thread::spawn(move || {
        let started = Instant::now();
        let r = exchange(&path, raw);
        let _ = tx.send((r, started.elapsed()));
    });
    rx
}

/// Reads what the server sent until it closed (or 10 s).
fn read_all(stream: &mut UnixStream) -> Vec<u8> {
    read_until_closed(stream).0
}

/// Reads what the server sent, and whether it then closed the connection (rather than
/// going quiet for 10 s).
fn read_until_closed(stream: &mut UnixStream) -> (Vec<u8>, bool) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let closed = stream.read_to_end(&mut buf).is_ok();
    (buf, closed)
}

#[test]
fn two_hundred_idle_connections_do_not_delay_a_get() {
    let vmm = start(Behaviour::Answer);
    let idle = idle_connections(&vmm.path, 200);
    // Let the server take them all before measuring.
    thread::sleep(Duration::from_millis(200));
    let worst = worst_get(&vmm.path, 5);
    println!("GET /api/v1/vm with 200 idle connections held open: worst of 5 took {worst:?}");
    assert!(worst < PROMPT, "{worst:?}");
    drop(idle);
    vmm.stop();
}

#[test]
fn a_client_dripping_bytes_cannot_hold_others_nor_its_deadline() {
    let config = ServerConfig {
        request_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::Answer);
    let path = vmm.path.clone();
    let (dripping, started_dripping) = mpsc::channel();
    let dripper = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        // A request that never ends, one byte every 10 ms.
        let endless = b"GET /api/v1/vm HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 400].iter());
        for &byte in endless {
            if s.write_all(&[byte]).is_err() {
                break;
            }
            let _ = dripping.send(());
            thread::sleep(Duration::from_millis(10));
        }
        let answer = read_all(&mut s);
        (answer, started.elapsed())
    });
    // Its connection is ahead of the GETs' in the listener's queue: by their turn, the
    // server holds a half-sent request.
    started_dripping
        .recv_timeout(Duration::from_secs(10))
        .expect("the dripper connects and sends");
    let worst = worst_get(&vmm.path, 5);
    assert!(worst < PROMPT, "{worst:?} while a client drips its request");
    let (answer, took) = dripper.join().unwrap();
    let (r, _) = Response::parse(&answer).unwrap().unwrap();
    assert_eq!(r.status, 408);
    // The deadline is for the whole request, not per read.
    assert!(took < Duration::from_millis(2500), "{took:?}");
    vmm.stop();
}

#[test]
fn a_slow_vmm_reply_does_not_delay_other_requests() {
    let vmm = start(Behaviour::SlowAgent(Duration::from_secs(1)));
    let slow = in_background(&vmm.path, AGENT_CALL);
    vmm.wait_received(1);
    let worst = worst_get(&vmm.path, 3);
    assert!(worst < PROMPT, "{worst:?} while an agent call waits");
    let (r, took) = slow.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    vmm.stop();
}

#[test]
fn beyond_the_cap_the_oldest_idle_connection_is_closed() {
    let config = ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::Answer);
    // A listening Unix socket's queue is first in, first out: the server accepts these
    // in this order, and the GET's connection after them.
    let mut idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&vmm.path).unwrap())
        .collect();
    let (status, took) = timed_get(&vmm.path);
    assert_eq!(status, 200);
    assert!(took < PROMPT, "{took:?}");
    let (r, _) = Response::parse(&read_all(&mut idle[0])).unwrap().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.error_message().unwrap().contains("oldest"));
    // The others are still open: nothing to read, no EOF.
    for s in &mut idle[1..] {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = s.read(&mut [0u8; 16]).unwrap_err();
        assert!(matches!(
            err.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
    }
    vmm.stop();
}

#[test]
fn when_every_connection_waits_for_the_vmm_new_ones_are_refused() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::SlowAgent(Duration::from_millis(800)));
    let calls = [
        in_background(&vmm.path, AGENT_CALL),
        in_background(&vmm.path, AGENT_CALL),
    ];
    vmm.wait_received(2);
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 503);
    assert!(r.error_message().unwrap().contains("waiting for the VMM"));
    for call in calls {
        let (r, _) = call.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, 200, "waiting requests are not evicted");
    }
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    vmm.stop();
}

/// Issue 18 item 3: with all 128 connections waiting for the VMM, shutdown still gets
/// through, at once; anything else on the reserve is refused.
#[test]
fn shutdown_answers_behind_128_pending_calls() {
    const SHUTDOWN: &[u8] = b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    let vmm = start(Behaviour::SlowAgent(Duration::from_secs(3)));
    let calls: Vec<_> = (0..super::MAX_CONNECTIONS)
        .map(|_| in_background(&vmm.path, AGENT_CALL))
        .collect();
    thread::sleep(Duration::from_millis(500));
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 503, "only a shutdown passes the reserve");
    let started = Instant::now();
    let r = exchange(&vmm.path, SHUTDOWN);
    let took = started.elapsed();
    println!(
        "shutdown behind {} pending calls took {took:?}",
        calls.len()
    );
    assert_eq!(r.status, 204);
    assert!(took < PROMPT, "{took:?}");
    for call in calls {
        let (r, _) = call.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(r.status, 200, "the pending calls were not evicted");
    }
    vmm.stop();
}

#[test]
fn a_client_that_does_not_take_its_response_is_dropped_at_the_write_deadline() {
    const BIG: usize = 8 << 20;
    let config = ServerConfig {
        write_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::BigMetrics(BIG));
    let mut greedy = UnixStream::connect(&vmm.path).unwrap();
    greedy.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    // The response has started: it now waits for its reader.
    greedy
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut first = [0u8; 16];
    let started = greedy
        .read(&mut first)
        .expect("the response starts within 10 s");
    assert!(
        first[..started].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..started])
    );
    let worst = worst_get(&vmm.path, 3);
    assert!(
        worst < PROMPT,
        "{worst:?} while a response waits for its reader"
    );
    // The client keeps not reading, past the write deadline.
    thread::sleep(Duration::from_millis(500));
    let (rest, closed) = read_until_closed(&mut greedy);
    let got = started + rest.len();
    assert!(closed, "the server closed the connection");
    assert!(got < BIG, "the server gave up: {got} of {BIG} bytes");
    vmm.stop();
}

#[test]
fn stopping_answers_requests_waiting_for_the_vmm() {
    let vmm = start(Behaviour::SlowAgent(Duration::from_secs(30)));
    let waiting = in_background(&vmm.path, AGENT_CALL);
    vmm.wait_received(1);
    let started = Instant::now();
    vmm.stop();
    assert!(started.elapsed() < Duration::from_secs(5));
    let (r, _) = waiting.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 503);
    assert!(r.error_message().unwrap().contains("stopping"));
}
