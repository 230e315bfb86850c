//! [`RequestReader`]: [`Request::parse`] for a buffer that grows as bytes arrive. It
//! keeps how far the head was scanned for its end, and the head once it is complete,
//! so that each read looks only at new bytes: a head sent a byte at a time costs time
//! linear in its length, where parsing the whole buffer after every read was quadratic.

use super::request::{check_request_line, RequestHead};
use super::{ascii, is_head_byte, HttpError, Request, MAX_HEAD_BYTES};

/// Where the head is.
#[derive(Debug)]
enum Progress {
    /// Not complete yet: `scanned` bytes of it are valid head bytes and hold no
    /// CRLFCRLF; `eol` is the end of the request line once seen, `line_ok` whether
    /// that line passed its check.
    Scanning {
        scanned: usize,
        eol: Option<usize>,
        line_ok: bool,
    },
    /// Complete: only the body is missing.
    Head(RequestHead),
    /// The request was returned (or refused); the reader has nothing more to say.
    Done,
}

/// Reads one request from a buffer the caller appends to: each call to
/// [`RequestReader::parse`] must get the same bytes as the one before, plus any new
/// ones. Its answers are [`Request::parse`]'s on the same buffer.
#[derive(Debug)]
pub struct RequestReader {
    progress: Progress,
    /// Bytes looked at so far, counting the one full parse of a complete head.
    examined: usize,
}

impl Default for RequestReader {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestReader {
    /// A reader that has seen nothing.
    pub fn new() -> Self {
        RequestReader {
            progress: Progress::Scanning {
                scanned: 0,
                eol: None,
                line_ok: false,
            },
            examined: 0,
        }
    }

    /// The request at the start of `buf` and the bytes it used, once complete;
    /// `Ok(None)` while it needs more bytes. After a request or an error, the reader
    /// is done and answers `Ok(None)`.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let result = self.advance(buf);
        if !matches!(result, Ok(None)) {
            self.progress = Progress::Done;
        }
        result
    }

    /// Bytes the reader has looked at so far: what reading a request cost.
    pub fn examined(&self) -> usize {
        self.examined
    }

    fn advance(&mut self, buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let progress = std::mem::replace(&mut self.progress, Progress::Done);
        let head = match progress {
            Progress::Done => return Ok(None),
            Progress::Head(head) => head,
            Progress::Scanning {
                scanned,
                eol,
                line_ok,
            } => match self.scan(buf, scanned, eol, line_ok)? {
                Some(head) => head,
                None => return Ok(None),
            },
        };
        match head.complete(buf) {
            Ok(done) => Ok(Some(done)),
            Err(head) => {
                self.progress = Progress::Head(head);
                Ok(None)
            }
        }
    }

    /// Scans the head's new bytes; the head once its end is among them.
    fn scan(
        &mut self,
        buf: &[u8],
        scanned: usize,
        mut eol: Option<usize>,
        mut line_ok: bool,
    ) -> Result<Option<RequestHead>, HttpError> {
        let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
        for (i, &b) in window.iter().enumerate().skip(scanned) {
            self.examined += 1;
            // CR LF CR LF ends the head: its first three bytes passed already.
            if b == b'\n' && i >= 3 && &window[i - 3..i] == b"\r\n\r" {
                let head = RequestHead::parse(&window[..=i])?;
                self.examined += i + 1;
                // A head that ends here is complete: `parse` cannot want more.
                return Ok(head);
            }
            if !is_head_byte(b) {
                return Err(HttpError::InvalidByte(b));
            }
            if b == b'\n' && eol.is_none() && i >= 1 && window[i - 1] == b'\r' {
                eol = Some(i - 1);
            }
        }
        if let (Some(eol), false) = (eol, line_ok) {
            check_request_line(ascii(&window[..eol])?)?;
            self.examined += eol;
            line_ok = true;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
        self.progress = Progress::Scanning {
            scanned: window.len(),
            eol,
            line_ok,
        };
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::MAX_BODY_BYTES;

    type Parsed = Result<Option<(Request, usize)>, HttpError>;

    /// Feeds `raw` to a reader `step` bytes at a time, as the server's reads would:
    /// the answer, the bytes fed when it came, and what the reader examined.
    fn read_in_steps(raw: &[u8], step: usize) -> (Parsed, usize, usize) {
        let mut reader = RequestReader::new();
        let mut fed = 0;
        loop {
            fed = (fed + step).min(raw.len());
            match reader.parse(&raw[..fed]) {
                Ok(None) if fed < raw.len() => {}
                answer => return (answer, fed, reader.examined()),
            }
        }
    }

    /// A head of `pad` bytes of padding in one field, and a body.
    fn big_request(pad: usize) -> Vec<u8> {
        let mut raw = b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nContent-Length: 2\r\nX-Pad: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', pad));
        raw.extend_from_slice(b"\r\n\r\n{}");
        raw
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_read_in_linear_time() {
        let raw = big_request(MAX_HEAD_BYTES - 100);
        let head = raw.len() - 2;
        assert!(head <= MAX_HEAD_BYTES);
        let (answer, fed, examined) = read_in_steps(&raw, 1);
        let (request, used) = answer.unwrap().unwrap();
        assert_eq!(
            (used, fed, request.body.as_slice()),
            (raw.len(), raw.len(), &b"{}"[..])
        );
        // Each byte scanned once, the complete head parsed once, the request line
        // checked once: about 3 looks per byte. Parsing the buffer after each byte
        // looked at about head² / 2 bytes, 33 million here.
        println!("a {head}-byte head sent a byte at a time: {examined} bytes examined");
        assert!(
            examined <= 3 * raw.len(),
            "{examined} bytes examined for {head}"
        );
    }

    #[test]
    fn a_body_sent_a_byte_at_a_time_does_not_parse_the_head_again() {
        let head = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        let mut raw = head.clone().into_bytes();
        raw.extend(std::iter::repeat_n(b'x', MAX_BODY_BYTES));
        let (answer, _, examined) = read_in_steps(&raw, 1);
        assert_eq!(answer.unwrap().unwrap().1, raw.len());
        assert!(examined <= 3 * head.len(), "{examined}");
    }

    /// Whatever the reads, the reader answers what parsing the whole buffer answers.
    #[test]
    fn answers_as_request_parse_does() {
        let cases: [&[u8]; 12] = [
            b"GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
            b"HELLO\r\n",
            b"GET / HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r",
            b"GET / HTTP/1.1\r\nA: b\r\n\r\n",
        ];
        let long = big_request(MAX_HEAD_BYTES);
        let endless = vec![b'a'; 2 * MAX_HEAD_BYTES];
        for raw in cases.iter().copied().chain([&long[..], &endless[..]]) {
            let whole = Request::parse(raw);
            for step in [1, 2, 3, 7, 64, raw.len().max(1)] {
                let (answer, fed, _) = read_in_steps(raw, step);
                let at_fed = Request::parse(&raw[..fed]);
                assert_eq!(
                    answer,
                    at_fed,
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(raw)
                );
                match (&answer, &whole) {
                    (Ok(Some(a)), w) => assert_eq!(Ok(Some(a)), w.as_ref().map(Option::as_ref)),
                    (Err(_), w) => assert!(w.is_err(), "{:?}", String::from_utf8_lossy(raw)),
                    (Ok(None), w) => assert_eq!(&Ok(None), w),
                }
            }
        }
    }

    #[test]
    fn a_done_reader_says_nothing_more() {
        let mut reader = RequestReader::new();
        let raw = b"GET / HTTP/1.1\r\n\r\n";
        assert!(reader.parse(raw).unwrap().is_some());
        assert_eq!(reader.parse(raw), Ok(None));
        let mut reader = RequestReader::new();
        assert!(reader.parse(b"\0").is_err());
        assert_eq!(reader.parse(b"\0GET"), Ok(None));
    }
}
