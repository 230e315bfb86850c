//! Hybrid-socket clients are bounded: they cannot take every agent slot nor every
//! connection, and one that never finishes its `CONNECT` line is closed at its deadline.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agent_protocol::AGENT_PORT;

use super::connection::Timeouts;
use super::defs::*;
use super::muxer::{MAX_HYBRID_AGENT_CONNECTIONS, MAX_HYBRID_CONNECTIONS};
use super::test_driver::*;
use super::tests::temp_dir;

/// A hybrid client to `guest_port` that the mock guest accepted.
fn hybrid_accepted(rig: &mut Rig, path: &std::path::Path, guest_port: u32) -> UnixStream {
    let mut client = UnixStream::connect(path).unwrap();
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let (req, _) = rig.expect("REQUEST", |h| {
        h.op == OP_REQUEST && h.dst_port == guest_port
    });
    rig.send(&from_guest(OP_RESPONSE, guest_port, req.src_port), &[]);
    let ok = rig.host_read(&mut client, 3);
    assert_eq!(ok, b"OK ", "accepted");
    client
}

/// A hybrid client to `guest_port` is closed without the guest hearing of it.
fn assert_refused(rig: &mut Rig, path: &std::path::Path, guest_port: u32) {
    let mut client = UnixStream::connect(path).unwrap();
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    assert!(rig.host_sees_eof(&mut client), "refused");
    rig.settle(20);
    assert!(
        rig.inbox
            .iter()
            .all(|(h, _)| !(h.op == OP_REQUEST && h.dst_port == guest_port)),
        "the guest heard of a refused client"
    );
}

#[test]
fn hybrid_clients_cannot_take_every_agent_slot() {
    let dir = temp_dir("hybrid-agent-cap");
    let path = dir.join("v.sock");
    let mut rig = Rig::new(Some(&path));
    let held: Vec<UnixStream> = (0..MAX_HYBRID_AGENT_CONNECTIONS)
        .map(|_| hybrid_accepted(&mut rig, &path, AGENT_PORT))
        .collect();
    assert_refused(&mut rig, &path, AGENT_PORT);
    // The VMM's own client still reaches the agent's port...
    let _own = rig.connector.connect(AGENT_PORT).unwrap();
    rig.expect("the VMM's REQUEST", |h| {
        h.op == OP_REQUEST && h.dst_port == AGENT_PORT
    });
    // ...and hybrid clients other ports.
    let _other = hybrid_accepted(&mut rig, &path, 1234);
    // A slot freed is a slot to take again.
    drop(held);
    rig.settle(50);
    let _again = hybrid_accepted(&mut rig, &path, AGENT_PORT);
    drop(rig);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hybrid_connections_are_bounded_in_all() {
    let dir = temp_dir("hybrid-cap");
    let path = dir.join("v.sock");
    let mut rig = Rig::new(Some(&path));
    let _held: Vec<UnixStream> = (0..MAX_HYBRID_CONNECTIONS as u32)
        .map(|i| hybrid_accepted(&mut rig, &path, 2000 + i))
        .collect();
    assert_refused(&mut rig, &path, 3000);
    let _own = rig.connector.connect(3000).unwrap();
    rig.expect("the VMM's REQUEST", |h| {
        h.op == OP_REQUEST && h.dst_port == 3000
    });
    drop(rig);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_client_dripping_its_connect_line_is_closed_at_the_handshake_deadline() {
    let dir = temp_dir("hybrid-drip");
    let path = dir.join("v.sock");
    let handshake = Duration::from_millis(200);
    let timeouts = Timeouts {
        handshake,
        ..Timeouts::default()
    };
    let mut rig = Rig::with_timeouts(Some(&path), timeouts);
    let mut client = UnixStream::connect(&path).unwrap();
    // One byte per 50 ms: each within the deadline, the line far beyond it.
    let mut closed = false;
    for &byte in b"CONNECT 1234\n" {
        if client.write_all(&[byte]).is_err() {
            closed = true;
            break;
        }
        rig.settle(50);
    }
    assert!(closed || rig.host_sees_eof(&mut client));
    // Had the deadline been per byte, the line would have come through.
    assert!(rig.inbox.iter().all(|(h, _)| h.op != OP_REQUEST));
    drop(rig);
    std::fs::remove_dir_all(&dir).unwrap();
}
