//! The hybrid Unix socket (Firecracker's convention): the listener at PATH, the
//! `CONNECT <port>\n` handshake of its clients, and connections from the guest to the
//! host sockets `PATH_<port>`.

use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mempower_api::unix_socket::{bind_owner_only, SocketFile};

use super::VsockError;

/// The longest handshake line, newline included.
pub const MAX_HANDSHAKE: usize = 32;

/// The listening socket; removes its file when dropped (if the file is still ours).
#[derive(Debug)]
pub struct HybridListener {
    listener: UnixListener,
    file: SocketFile,
}

impl HybridListener {
    /// Binds `path` (replacing a stale socket nobody listens on, refusing a live one or a
    /// non-socket), mode 0600 from the start, non-blocking.
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        let (listener, file) = bind_owner_only(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Nonblocking {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(HybridListener { listener, file })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The host socket a guest connection to `port` goes to: `PATH_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.file.path().to_path_buf().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

/// Parses a handshake line without its newline: `CONNECT <port>`, the port in decimal.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A client of the listener that has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct Handshake {
    pub stream: UnixStream,
    pub deadline: Instant,
    buf: Vec<u8>,
}

/// How a handshake read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// No full line yet.
    Wait,
    /// `CONNECT <port>`, and the bytes that followed the line.
    Connect(u32, Vec<u8>),
    /// A bad or overlong line, EOF or an error: close it.
    Fail,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Handshake {
            stream,
            deadline,
            buf: Vec::with_capacity(MAX_HANDSHAKE),
        }
    }

    /// Reads what is there, never more than [`MAX_HANDSHAKE`] bytes in all.
    pub fn read(&mut self) -> HandshakeStep {
        let mut chunk = [0u8; MAX_HANDSHAKE];
        loop {
            let room = MAX_HANDSHAKE - self.buf.len();
            if room == 0 {
                return HandshakeStep::Fail;
            }
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return HandshakeStep::Fail,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HandshakeStep::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return HandshakeStep::Fail,
            }
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                return match parse_connect(&self.buf[..pos]) {
                    Some(port) => HandshakeStep::Connect(port, self.buf[pos + 1..].to_vec()),
                    None => HandshakeStep::Fail,
                };
            }
        }
    }
}

/// Connects to the Unix stream socket at `path` without blocking: a listener whose
/// backlog is full refuses (EAGAIN) instead of stalling the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL, which the zeroed address already holds.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call, and
    // `fd` is an open socket.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 12 34",
            b"connect 1234",
            b"CONNECT  1234",
            b"HELLO",
            b"",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener_and_reports_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("mempower-vsock-nbc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        assert!(listener.accept().is_ok());
        drop(stream);
        let long = PathBuf::from("/".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
