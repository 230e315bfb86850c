//! A blocking client of the API, for the command line.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::http::{HttpError, Method, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use crate::types::ErrorBody;

/// Time [`request`] gives the server to answer (the server itself gives
/// the VMM 10 s).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of [`request`]; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `connect(2)` failed: no VMM there, or no permission.
    #[error("cannot connect to API socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading or writing failed (including timeouts).
    #[error("I/O error on API socket {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The request cannot be sent as given.
    #[error("invalid request to API socket {}: {reason}", path.display())]
    InvalidRequest {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The server's answer is not a valid HTTP response.
    #[error("invalid response from API socket {}: {source}", path.display())]
    InvalidResponse {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: HttpError,
    },
    /// The server closed the connection before a complete response.
    #[error("API socket {} closed the connection before a complete response", path.display())]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
}

/// A response, as the command line needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// HTTP status.
    pub status: u16,
    /// The body (invalid UTF-8 replaced by U+FFFD).
    pub body: String,
}

impl ClientResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The message of a `{"error": ...}` body, if the body is one.
    pub fn error_message(&self) -> Option<String> {
        serde_json::from_str::<ErrorBody>(&self.body)
            .ok()
            .map(|e| e.error)
    }

    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

/// Sends one request to the API server on `socket` and waits (up to
/// [`CLIENT_TIMEOUT`]) for its response. A body is sent as JSON.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<ClientResponse, ClientError> {
    request_with_timeout(socket, method, path, body, CLIENT_TIMEOUT)
}

/// [`request`] with an explicit overall timeout.
pub fn request_with_timeout(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let message =
        build_request(method, path, body).map_err(|reason| ClientError::InvalidRequest {
            path: socket.to_path_buf(),
            reason,
        })?;
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    if let Err(e) = stream.write_all(&message) {
        // The server may have answered early (e.g. rejected the head) and
        // closed; its response is still worth reading.
        if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
            return Err(io_err(e));
        }
    }
    let response = read_response(&mut stream, deadline, socket)?;
    Ok(ClientResponse {
        status: response.status,
        body: String::from_utf8_lossy(&response.body).into_owned(),
    })
}

/// The request bytes, or why they cannot be built.
fn build_request(method: &str, path: &str, body: Option<&str>) -> Result<Vec<u8>, String> {
    let method =
        Method::from_token(method).ok_or_else(|| format!("unsupported method {method:?}"))?;
    if !path.starts_with('/') || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "path {path:?} must start with '/' and hold only visible ASCII"
        ));
    }
    let body = body.unwrap_or_default();
    if body.len() > MAX_BODY_BYTES {
        return Err(format!(
            "body of {} bytes exceeds the limit of {MAX_BODY_BYTES} bytes",
            body.len()
        ));
    }
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if head.len() > MAX_HEAD_BYTES {
        return Err(format!("path of {} bytes is too long", path.len()));
    }
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    Ok(bytes)
}

/// Reads one response, bounded by the limits of [`Response::parse`].
fn read_response(
    stream: &mut UnixStream,
    deadline: Instant,
    socket: &Path,
) -> Result<Response, ClientError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match Response::parse(&buf) {
            Ok(Some((response, _))) => return Ok(response),
            Ok(None) => {}
            Err(source) => {
                return Err(ClientError::InvalidResponse {
                    path: socket.to_path_buf(),
                    source,
                })
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let timed_out = || ClientError::Io {
            path: socket.to_path_buf(),
            source: io::Error::new(ErrorKind::TimedOut, "timed out waiting for the response"),
        };
        if left.is_zero() {
            return Err(timed_out());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|source| ClientError::Io {
                path: socket.to_path_buf(),
                source,
            })?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(ClientError::Closed {
                    path: socket.to_path_buf(),
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out())
            }
            Err(source) => {
                return Err(ClientError::Io {
                    path: socket.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{sample_info, start, tempdir, Behaviour};
    use crate::types::{ApiAction, VmInfo};
    use std::os::unix::net::UnixListener;
    use std::thread;

    #[test]
    fn get_vm_info() {
        let vmm = start(Behaviour::Answer);
        let r = request(&vmm.path, "GET", "/api/v1/vm", None).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.is_success());
        assert_eq!(r.json::<VmInfo>().unwrap(), sample_info());
        assert_eq!(vmm.stop(), vec![ApiAction::GetVmInfo]);
    }

    #[test]
    fn shutdown_with_body() {
        let vmm = start(Behaviour::Answer);
        let r = request(&vmm.path, "PUT", "/api/v1/vm/shutdown", Some("{}")).unwrap();
        assert_eq!(
            r,
            ClientResponse {
                status: 204,
                body: String::new()
            }
        );
        assert_eq!(vmm.stop(), vec![ApiAction::Shutdown]);
    }

    #[test]
    fn error_responses() {
        let vmm = start(Behaviour::Answer);
        let r = request(&vmm.path, "GET", "/api/v1/nope?x=1", None).unwrap();
        assert_eq!(r.status, 404);
        assert!(!r.is_success());
        assert!(r.error_message().unwrap().contains("/api/v1/nope"));
        let r = request(&vmm.path, "POST", "/api/v1/vm", None).unwrap();
        assert_eq!(r.status, 405);
        assert!(vmm.stop().is_empty());
    }

    #[test]
    fn missing_socket_names_the_path() {
        let dir = tempdir();
        let path = dir.as_path().join("nobody.sock");
        let e = request(&path, "GET", "/api/v1/vm", None).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        let msg = e.to_string();
        let want = format!("cannot connect to API socket {}: ", path.display());
        assert!(msg.starts_with(&want), "{msg}");
        assert!(msg.contains("No such file or directory"), "{msg}");
    }

    #[test]
    fn invalid_requests_are_not_sent() {
        let dir = tempdir();
        let path = dir.as_path().join("unused.sock");
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        for (method, target, body) in [
            ("BREW", "/api/v1/vm", None),
            ("get", "/api/v1/vm", None),
            ("GET", "api/v1/vm", None),
            ("GET", "/a b", None),
            ("GET", "/a\r\nX: y", None),
            ("PUT", "/x", Some(big.as_str())),
        ] {
            let e = request(&path, method, target, body).unwrap_err();
            assert!(matches!(e, ClientError::InvalidRequest { .. }), "{e}");
            assert!(e.to_string().contains("unused.sock"));
        }
        let long = format!("/{}", "a".repeat(MAX_HEAD_BYTES));
        assert!(build_request("GET", &long, None).is_err());
    }

    #[test]
    fn request_bytes() {
        let b = build_request("PUT", "/x", Some("{}")).unwrap();
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
    }

    /// A fake server that answers every connection with `answer`.
    fn fake_server(answer: &'static [u8]) -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
        let dir = tempdir();
        let path = dir.as_path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        (dir, path)
    }

    #[test]
    fn bad_server_responses() {
        let (_d, path) = fake_server(b"SSH-2.0-OpenSSH_9.6\r\n");
        let e = request(&path, "GET", "/", None).unwrap_err();
        assert!(matches!(e, ClientError::InvalidResponse { .. }), "{e}");
        assert!(e.to_string().contains("fake.sock"));

        let (_d, path) = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        let e = request(&path, "GET", "/", None).unwrap_err();
        assert!(matches!(e, ClientError::Closed { .. }), "{e}");

        let (_d, path) = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\xffok");
        let r = request(&path, "GET", "/", None).unwrap();
        assert_eq!(r.body, "\u{fffd}o");
    }

    #[test]
    fn silent_server_times_out() {
        let dir = tempdir();
        let path = dir.as_path().join("silent.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let e =
            request_with_timeout(&path, "GET", "/", None, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(&e, ClientError::Io { source, .. } if source.kind() == ErrorKind::TimedOut)
        );
    }
}
