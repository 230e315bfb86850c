//! One connection of the vsock protocol: request frames in, response frames out.
//!
//! A payload that is not a request gets an error answer (EBADMSG; EPROTO for another
//! protocol version) with the frame's `id` if it has one, else 0, and the connection
//! goes on: the frame was read whole, so the stream is still in step. Fatal frame errors
//! (too large, truncated, I/O) end the connection.

use std::io::{Read, Write};

use agent_protocol::{
    read_frame, write_frame, AgentError, FrameError, Request, RequestFrame, Response,
    ResponseFrame, PROTOCOL_VERSION,
};

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The peer closed it.
    Closed,
    /// A fatal frame error (too large, truncated, I/O): the stream is out of step. Not
    /// reported on the console: the VMM drops connections on timeouts as a matter of
    /// course, and console lines must stay answers to console commands.
    Failed(#[allow(dead_code)] FrameError),
    /// A `shutdown` was answered.
    Shutdown,
}

/// Reads request frames from `stream` and answers each, until the connection ends.
pub fn serve_connection<S>(
    stream: &mut S,
    handle: impl Fn(Request) -> Result<Response, AgentError>,
) -> End
where
    S: Read + Write,
{
    loop {
        let (id, result) = match read_frame::<serde_json::Value>(stream) {
            Ok(value) => decode(value),
            Err(FrameError::Closed) => return End::Closed,
            Err(FrameError::Malformed(e)) => (
                0,
                Err(AgentError::new(
                    libc::EBADMSG,
                    format!("malformed frame: {e}"),
                )),
            ),
            Err(e) => return End::Failed(e),
        };
        let (id, result) = match result {
            Ok(request) => (id, handle(request)),
            Err(e) => (id, Err(e)),
        };
        let shutting_down = matches!(result, Ok(Response::ShuttingDown));
        let response = ResponseFrame::new(id, result);
        match write_frame(stream, &response) {
            Ok(()) => {}
            // Nothing was written: say so instead, and stay in step.
            Err(FrameError::TooLarge(n)) => {
                let refusal = AgentError::new(
                    libc::EMSGSIZE,
                    format!("the answer ({n} bytes) is above the frame limit"),
                );
                if let Err(e) = write_frame(stream, &ResponseFrame::new(id, Err(refusal))) {
                    return End::Failed(e);
                }
            }
            Err(e) => return End::Failed(e),
        }
        if shutting_down {
            return End::Shutdown;
        }
    }
}

/// The id of a frame (0 if it has none), and its request or why it cannot be served.
fn decode(value: serde_json::Value) -> (u64, Result<Request, AgentError>) {
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if let Some(version) = value.get("version").and_then(serde_json::Value::as_u64) {
        if version != u64::from(PROTOCOL_VERSION) {
            let message = format!(
                "protocol version {version} is not supported (this agent speaks {PROTOCOL_VERSION})"
            );
            return (id, Err(AgentError::new(libc::EPROTO, message)));
        }
    }
    match serde_json::from_value::<RequestFrame>(value) {
        Ok(frame) => (frame.id, Ok(frame.request)),
        Err(e) => (
            id,
            Err(AgentError::new(
                libc::EBADMSG,
                format!("malformed request: {e}"),
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;

    use agent_protocol::{Outcome, MAX_FRAME};

    use crate::requests::{Handler, TestRequests};

    /// Reads from a script of bytes, records what is written.
    struct Duplex<'a> {
        input: &'a [u8],
        output: Vec<u8>,
    }

    impl Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn raw(wire: &mut Vec<u8>, payload: &[u8]) {
        wire.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        wire.extend_from_slice(payload);
    }

    fn request(wire: &mut Vec<u8>, id: u64, request: Request) {
        write_frame(wire, &RequestFrame::new(id, request)).unwrap();
    }

    /// Serves `wire` with a real handler on `/`; returns how it ended and the answers.
    fn serve(wire: &[u8]) -> (End, Vec<ResponseFrame>) {
        let handler = Handler::new(PathBuf::from("/"), TestRequests::Served);
        let mut duplex = Duplex {
            input: wire,
            output: Vec::new(),
        };
        let end = serve_connection(&mut duplex, |r| handler.handle(r));
        let mut out = duplex.output.as_slice();
        let mut responses = Vec::new();
        while let Ok(frame) = read_frame::<ResponseFrame>(&mut out) {
            responses.push(frame);
        }
        assert!(out.is_empty(), "trailing output");
        (end, responses)
    }

    fn errno(frame: &ResponseFrame) -> i32 {
        match &frame.result {
            Outcome::Error(e) => e.errno,
            Outcome::Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    #[test]
    fn good_bad_and_unknown_version_frames_then_eof() {
        let mut wire = Vec::new();
        request(&mut wire, 1, Request::Hello);
        raw(&mut wire, b"{not json");
        raw(
            &mut wire,
            br#"{"version":1,"id":7,"request":{"type":"format_disk"}}"#,
        );
        raw(
            &mut wire,
            br#"{"version":2,"id":8,"request":{"type":"teleport"}}"#,
        );
        raw(
            &mut wire,
            br#"{"version":"x","id":9,"request":{"type":"hello"}}"#,
        );
        raw(&mut wire, b"[1,2]");
        request(&mut wire, 10, Request::Release { handle: 77 });
        request(&mut wire, 11, Request::Vmstat);
        let (end, responses) = serve(&wire);
        assert!(matches!(end, End::Closed), "{end:?}");
        let ids: Vec<u64> = responses.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 0, 7, 8, 9, 0, 10, 11]);
        assert!(responses.iter().all(|r| r.version == PROTOCOL_VERSION));
        assert!(matches!(
            responses[0].result,
            Outcome::Ok(Response::Hello {
                protocol_version: 1,
                ..
            })
        ));
        for bad in [1, 2, 4, 5] {
            assert_eq!(
                errno(&responses[bad]),
                libc::EBADMSG,
                "{:?}",
                responses[bad]
            );
        }
        assert_eq!(errno(&responses[3]), libc::EPROTO);
        assert_eq!(errno(&responses[6]), libc::EINVAL);
        assert!(matches!(
            responses[7].result,
            Outcome::Ok(Response::Vmstat { .. })
        ));
    }

    #[test]
    fn fatal_frame_errors_end_the_connection() {
        let mut wire = Vec::new();
        request(&mut wire, 1, Request::Hello);
        wire.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        request(&mut wire, 2, Request::Hello); // never read
        let (end, responses) = serve(&wire);
        assert!(
            matches!(end, End::Failed(FrameError::TooLarge(_))),
            "{end:?}"
        );
        assert_eq!(responses.len(), 1);

        let mut wire = Vec::new();
        request(&mut wire, 1, Request::Hello);
        wire.truncate(wire.len() - 1);
        let (end, responses) = serve(&wire);
        assert!(
            matches!(end, End::Failed(FrameError::Truncated { .. })),
            "{end:?}"
        );
        assert!(responses.is_empty());
    }

    #[test]
    fn shutdown_is_answered_then_the_connection_ends() {
        let mut wire = Vec::new();
        request(&mut wire, 4, Request::Shutdown);
        request(&mut wire, 5, Request::Hello); // never read
        let (end, responses) = serve(&wire);
        assert!(matches!(end, End::Shutdown), "{end:?}");
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].id, 4);
        assert_eq!(responses[0].result, Outcome::Ok(Response::ShuttingDown));
    }

    #[test]
    fn answers_above_the_frame_limit_become_errors() {
        let mut wire = Vec::new();
        request(&mut wire, 1, Request::Vmstat);
        request(&mut wire, 2, Request::Vmstat);
        let mut duplex = Duplex {
            input: &wire,
            output: Vec::new(),
        };
        let huge = || Response::Vmstat {
            counters: [("x".repeat(MAX_FRAME as usize), 1)].into(),
        };
        let end = serve_connection(&mut duplex, |_| Ok(huge()));
        assert!(matches!(end, End::Closed));
        let mut out = duplex.output.as_slice();
        for id in [1, 2] {
            let frame: ResponseFrame = read_frame(&mut out).unwrap();
            assert_eq!((frame.id, errno(&frame)), (id, libc::EMSGSIZE));
        }
    }
}
