//! Tests of the server on real Unix sockets, with a fake VMM thread.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::http::Response;
use crate::http::{CONTENT_TYPE_JSON, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use crate::test_util::{exchange, sample_info, start, start_with, tempdir, Behaviour};
use crate::types::{ApiAction, ApiError, VmInfo};
use crate::unix_socket::BindError;

const GET_VM: &[u8] = b"GET /api/v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n";
const SHUTDOWN: &[u8] = b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nContent-Length: 0\r\n\r\n";

fn error_of(r: &Response) -> String {
    assert_eq!(r.content_type.as_deref(), Some(CONTENT_TYPE_JSON));
    r.error_message().expect("a JSON error body")
}

#[test]
fn get_vm_info_is_200_json_and_wakes_the_vmm() {
    let vmm = start(Behaviour::Answer);
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type.as_deref(), Some(CONTENT_TYPE_JSON));
    let info: VmInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(info, sample_info());
    assert!(vmm.notify.read().unwrap() >= 1);
    assert_eq!(vmm.stop(), vec![ApiAction::GetVmInfo]);
}

#[test]
fn shutdown_is_204() {
    let vmm = start(Behaviour::Answer);
    let r = exchange(&vmm.path, SHUTDOWN);
    assert_eq!(r, Response::new(204));
    // A body, a query and HTTP/1.0 change nothing.
    let r = exchange(
        &vmm.path,
        b"PUT /api/v1/vm/shutdown?now HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 204);
    assert_eq!(vmm.stop(), vec![ApiAction::Shutdown, ApiAction::Shutdown]);
}

#[test]
fn unknown_path_is_404() {
    let vmm = start(Behaviour::Answer);
    let r = exchange(&vmm.path, b"GET /api/v2/vm HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("/api/v2/vm"));
    assert!(vmm.stop().is_empty());
}

#[test]
fn wrong_method_is_405_with_allow() {
    let vmm = start(Behaviour::Answer);
    let r = exchange(&vmm.path, b"DELETE /api/v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("GET"));
    error_of(&r);
    let r = exchange(&vmm.path, b"GET /api/v1/vm/shutdown HTTP/1.1\r\n\r\n");
    assert_eq!((r.status, r.header("allow")), (405, Some("PUT")));
    assert!(vmm.stop().is_empty());
}

#[test]
fn malformed_requests_are_400_and_the_server_survives() {
    let vmm = start(Behaviour::Answer);
    for raw in [
        &b"NONSENSE\r\n\r\n"[..],
        b"\x16\x03\x01\x00\xa5\x01\x00\x00",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET /api/v1/vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
    ] {
        let r = exchange(&vmm.path, raw);
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(raw));
        error_of(&r);
    }
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    assert_eq!(vmm.stop(), vec![ApiAction::GetVmInfo]);
}

#[test]
fn limits_over_the_socket() {
    let vmm = start(Behaviour::Answer);
    let big = format!(
        "PUT /api/v1/vm/shutdown HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
        MAX_BODY_BYTES + 1,
        "x".repeat(MAX_BODY_BYTES + 1)
    );
    assert_eq!(exchange(&vmm.path, big.as_bytes()).status, 413);
    let chunked =
        b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let r = exchange(&vmm.path, chunked);
    assert_eq!(r.status, 411);
    assert!(error_of(&r).contains("Content-Length"));
    let long_head = format!(
        "GET /api/v1/vm HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES)
    );
    assert_eq!(exchange(&vmm.path, long_head.as_bytes()).status, 431);
    assert_eq!(exchange(&vmm.path, b"GET / HTTP/2.0\r\n\r\n").status, 505);
    assert!(vmm.stop().is_empty());
}

#[test]
fn vmm_errors_become_json_errors() {
    let vmm = start(Behaviour::Fail(ApiError::conflict("already shutting down")));
    let r = exchange(&vmm.path, SHUTDOWN);
    assert_eq!(r.status, 409);
    assert_eq!(error_of(&r), "already shutting down");
    vmm.stop();

    // A status that is not an error status is a VMM bug: 500.
    let vmm = start(Behaviour::Fail(ApiError::new(200, "odd")));
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!((r.status, error_of(&r).as_str()), (500, "odd"));
    assert_eq!(r.header("retry-after"), None);
    vmm.stop();
}

#[test]
fn a_busy_vmm_says_when_to_try_again() {
    let busy = ApiError::new(503, "too many agent calls are in progress").with_retry_after(2);
    let vmm = start(Behaviour::Fail(busy));
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(error_of(&r), "too many agent calls are in progress");
    vmm.stop();
}

#[test]
fn vmm_gone_is_503() {
    let dir = tempdir();
    let path = dir.as_path().join("api.sock");
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let _server = ApiServer::spawn(&path, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let r = exchange(&path, GET_VM);
    assert_eq!(r.status, 503);
    assert!(error_of(&r).contains("not running"));
}

#[test]
fn dropped_reply_is_503() {
    let vmm = start(Behaviour::DropReply);
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 503);
    assert!(error_of(&r).contains("dropped"));
    vmm.stop();
}

#[test]
fn slow_vmm_is_504() {
    let config = ServerConfig {
        reply_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::Hold(Duration::from_millis(600)));
    // 504, not the 503 that the VMM dropping the request after 600 ms gives.
    let r = exchange(&vmm.path, GET_VM);
    assert_eq!(r.status, 504);
    error_of(&r);
    vmm.stop();
}

#[test]
fn slow_client_is_408() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::Answer);
    let mut s = UnixStream::connect(&vmm.path).unwrap();
    s.write_all(b"GET /api/v1/vm HTTP/1.1\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let (r, _) = Response::parse(&buf).unwrap().unwrap();
    assert_eq!(r.status, 408);
    // The server is free again.
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    vmm.stop();
}

#[test]
fn empty_connections_are_harmless() {
    let vmm = start(Behaviour::Answer);
    for _ in 0..3 {
        drop(UnixStream::connect(&vmm.path).unwrap());
    }
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    assert_eq!(vmm.stop(), vec![ApiAction::GetVmInfo]);
}

#[test]
fn socket_is_mode_0600() {
    let vmm = start(Behaviour::Answer);
    let meta = std::fs::symlink_metadata(&vmm.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    vmm.stop();
}

#[test]
fn thread_is_named() {
    let vmm = start(Behaviour::Answer);
    let named = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|comm| comm.trim_end() == THREAD_NAME)
    };
    // The new thread names itself once it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !named() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(named());
    vmm.stop();
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempdir();
    let path = dir.as_path().join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a closed listener leaves its socket file");
    let (tx, rx) = mpsc::channel();
    let server = ApiServer::spawn(&path, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    assert_eq!(server.socket_path(), path);
    // The new socket is live (503: there is no VMM behind it).
    drop(rx);
    assert_eq!(exchange(&path, GET_VM).status, 503);
}

#[test]
fn live_socket_is_refused() {
    let vmm = start(Behaviour::Answer);
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::spawn(&vmm.path, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap_err();
    assert!(matches!(e, ServerError::Socket(BindError::InUse(_))), "{e}");
    assert!(e.to_string().contains(&*vmm.path.to_string_lossy()));
    // The first server still serves, on the same file.
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    assert_eq!(vmm.stop(), vec![ApiAction::GetVmInfo]);
}

#[test]
fn non_socket_is_refused_and_left_alone() {
    let dir = tempdir();
    let path = dir.as_path().join("api.sock");
    std::fs::write(&path, b"precious").unwrap();
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::spawn(&path, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap_err();
    assert!(
        matches!(e, ServerError::Socket(BindError::NotASocket(_))),
        "{e}"
    );
    assert!(e.to_string().contains("not a socket"));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn missing_directory_is_a_socket_error() {
    let dir = tempdir();
    let path = dir.as_path().join("no/such/dir/api.sock");
    let (tx, _rx) = mpsc::channel();
    let e = ApiServer::spawn(&path, tx, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap_err();
    assert!(
        matches!(e, ServerError::Socket(BindError::Io { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("no/such/dir/api.sock"), "{e}");
}

#[test]
fn drop_removes_the_socket_and_stops_the_thread() {
    let vmm = start(Behaviour::Answer);
    let path = vmm.path.clone();
    let started = Instant::now();
    vmm.stop();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn drop_leaves_a_foreign_socket_alone() {
    let mut vmm = start(Behaviour::Answer);
    std::fs::remove_file(&vmm.path).unwrap();
    let _other = UnixListener::bind(&vmm.path).unwrap();
    vmm.server.take();
    assert!(vmm.path.exists());
    vmm.stop();
}

#[test]
fn evacuation_endpoints_on_a_real_socket() {
    let vmm = start(Behaviour::Answer);
    let body = r#"{"regions":[2,3]}"#;
    let raw = format!(
        "POST /api/v1/nodes/1/evacuations HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = exchange(&vmm.path, raw.as_bytes());
    assert_eq!(
        (r.status, r.header("location")),
        (202, Some("/api/v1/evacuations/1"))
    );
    let job: crate::evacuation::JobAccepted = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(job.job, 1);
    let r = exchange(&vmm.path, b"GET /api/v1/evacuations/7 HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("no such job: 7"));
    let r = exchange(
        &vmm.path,
        b"POST /api/v1/nodes/0/regions/0/plug HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 409);
    let r = exchange(&vmm.path, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"mempower_up 1\n".as_slice())
    );
    assert_eq!(
        vmm.stop(),
        vec![
            ApiAction::Evacuate {
                node: 1,
                regions: vec![2, 3],
                allow_other_nodes: false,
            },
            ApiAction::GetJob { id: 7 },
            ApiAction::PlugRegion { node: 0, region: 0 },
            ApiAction::GetMetrics,
        ]
    );
}

/// Which thread ran the start hook, and the hook that blocks for good.
static HOOK_THREAD: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn record_hook_thread() {
    *HOOK_THREAD.lock().unwrap() = thread::current().name().map(str::to_owned);
}

fn stuck_forever() {
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

#[test]
fn the_start_hook_runs_on_the_api_thread_before_it_serves() {
    let config = ServerConfig {
        thread_start: Some(record_hook_thread),
        ..ServerConfig::default()
    };
    let vmm = start_with(config, Behaviour::Answer);
    assert_eq!(exchange(&vmm.path, GET_VM).status, 200);
    assert_eq!(HOOK_THREAD.lock().unwrap().as_deref(), Some(THREAD_NAME));
    vmm.stop();
}

#[test]
fn dropping_the_server_does_not_wait_for_a_stuck_thread() {
    let config = ServerConfig {
        thread_start: Some(stuck_forever),
        ..ServerConfig::default()
    };
    let mut vmm = start_with(config, Behaviour::Answer);
    let server = vmm.server.take().unwrap();
    let started = Instant::now();
    drop(server);
    let took = started.elapsed();
    // Not `stop`: the fake VMM waits for good on the stuck thread's requests.
    let path = vmm.path.clone();
    assert!(
        took >= STOP_TIMEOUT && took < STOP_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    assert!(!path.exists(), "the socket file is removed all the same");
}
