//! One client connection: a non-blocking stream and where it is in the
//! exchange. It reads its request as bytes arrive, waits for the VMM without
//! blocking anyone, and writes its response as the peer takes it.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use crate::http::{Request, RequestReader, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use crate::types::{ApiReply, ApiResult};

/// Bytes read per `read(2)`.
const CHUNK: usize = 4096;
/// Reads per readiness event: a fast sender cannot keep the loop to itself.
const READS_PER_EVENT: usize = 16;
/// The most a connection buffers: a request at the limits, and a chunk that
/// went past them (the parser refuses it then).
const MAX_BUFFER: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES + CHUNK;

/// Where a connection is in its one exchange.
pub(super) enum State {
    /// Reading the request until `deadline`; `reader` remembers how far `buf` was
    /// parsed, so each read costs what it brought.
    Reading {
        buf: Vec<u8>,
        reader: RequestReader,
        deadline: Instant,
    },
    /// The VMM has the request; its reply arrives on `answer`.
    Waiting {
        answer: Receiver<ApiResult>,
        on_reply: fn(ApiReply) -> Response,
        deadline: Instant,
    },
    /// Writing the response; closed when done or at `deadline`.
    Writing {
        out: Vec<u8>,
        done: usize,
        deadline: Instant,
    },
}

/// What reading produced.
pub(super) enum Incoming {
    /// Nothing complete yet.
    More,
    /// A whole request.
    Request(Request),
    /// Answer this without involving the VMM (a malformed request).
    Reject(Response),
    /// The peer went away; close without answering.
    Gone,
}

/// What writing produced.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// The peer took everything: close.
    Done,
    /// The socket is full: wait for it to drain.
    More,
    /// The peer went away.
    Gone,
}

pub(super) struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// What the epoll set watches for this connection now.
    pub interest: EventSet,
    /// Taken beyond the cap while every other connection waits for the VMM: it may
    /// only shut the VM down (see [`super::SHUTDOWN_RESERVE`]).
    pub reserved: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, request_deadline: Instant, reserved: bool) -> Self {
        Conn {
            reserved,
            stream,
            state: State::Reading {
                buf: Vec::new(),
                reader: RequestReader::new(),
                deadline: request_deadline,
            },
            interest: EventSet::IN,
        }
    }

    pub fn deadline(&self) -> Instant {
        match &self.state {
            State::Reading { deadline, .. }
            | State::Waiting { deadline, .. }
            | State::Writing { deadline, .. } => *deadline,
        }
    }

    /// What the epoll set should watch in the current state. While waiting
    /// for the VMM nothing (only a hang-up, which epoll always reports).
    pub fn wanted(&self) -> EventSet {
        match self.state {
            State::Reading { .. } => EventSet::IN,
            State::Waiting { .. } => EventSet::empty(),
            State::Writing { .. } => EventSet::OUT,
        }
    }

    pub fn is_reading(&self) -> bool {
        matches!(self.state, State::Reading { .. })
    }

    /// Reads what the peer sent, as far as a whole request.
    pub fn read(&mut self) -> Incoming {
        let State::Reading { buf, reader, .. } = &mut self.state else {
            return Incoming::More;
        };
        let mut chunk = [0u8; CHUNK];
        for _ in 0..READS_PER_EVENT {
            let room = MAX_BUFFER.saturating_sub(buf.len()).min(CHUNK);
            if room == 0 {
                // Unreachable with the parser's limits; never buffer more.
                return Incoming::Reject(Response::error(413, "request too large"));
            }
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) if buf.is_empty() => return Incoming::Gone,
                Ok(0) => {
                    return Incoming::Reject(Response::error(
                        400,
                        "connection closed before the request was complete",
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Incoming::More,
                Err(_) => return Incoming::Gone,
            }
            match reader.parse(buf) {
                Ok(Some((request, _))) => return Incoming::Request(request),
                Ok(None) => {}
                Err(e) => return Incoming::Reject(Response::error(e.status(), e.to_string())),
            }
        }
        Incoming::More
    }

    /// Starts sending `response`, due by `deadline`, and sends what the
    /// socket takes now.
    pub fn respond(&mut self, response: &Response, deadline: Instant) -> Written {
        self.state = State::Writing {
            out: response.to_bytes(),
            done: 0,
            deadline,
        };
        self.write()
    }

    /// Writes what the socket takes of the response.
    pub fn write(&mut self) -> Written {
        let State::Writing { out, done, .. } = &mut self.state else {
            return Written::More;
        };
        while *done < out.len() {
            match self.stream.write(&out[*done..]) {
                Ok(0) => return Written::Gone,
                Ok(n) => *done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Written::More,
                Err(_) => return Written::Gone,
            }
        }
        Written::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow client's head, a byte per read: the connection parses each byte once,
    /// not its whole buffer again after every read (8 KiB head: about 33 million
    /// bytes looked at before, 3 per byte now).
    #[test]
    fn a_head_a_byte_per_read_costs_linear_time() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let mut conn = Conn::new(ours, deadline, false);
        let mut raw = b"GET /api/v1/vm HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES - raw.len() - 4));
        raw.extend_from_slice(b"\r\n\r\n");
        let mut request = None;
        for (i, byte) in raw.iter().enumerate() {
            theirs.write_all(&[*byte]).unwrap();
            match conn.read() {
                Incoming::More => assert!(i + 1 < raw.len(), "nothing at the end"),
                Incoming::Request(r) => request = Some(r),
                _ => panic!("refused at byte {i}"),
            }
        }
        assert_eq!(request.map(|r| r.path), Some("/api/v1/vm".to_owned()));
        let State::Reading { reader, .. } = &conn.state else {
            panic!("the connection still holds what it read");
        };
        println!(
            "a {}-byte head a byte per read: {} bytes examined",
            raw.len(),
            reader.examined()
        );
        assert!(reader.examined() <= 3 * raw.len(), "{}", reader.examined());
    }
}
