//! Requests: [`Request`] and its parser.

use super::{
    check_version, content_length, is_token, parse_head, quote, Headers, HttpError, Method,
    MAX_BODY_BYTES,
};

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path of the target, without any `?query` or `#fragment`.
    pub path: String,
    /// The query of the target, without its `?` (empty if none).
    pub query: String,
    /// The header fields.
    pub headers: Headers,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

impl Request {
    /// Parses one request from the start of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` is a valid but incomplete prefix, or the
    /// request and the number of bytes it used. Bytes after it (a pipelined
    /// request) are left alone.
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        match RequestHead::parse(buf)? {
            Some(head) => Ok(head.complete(buf).ok()),
            None => Ok(None),
        }
    }

    /// The value of the first header field called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}

/// A request's complete head: the request without its body, and the body's length.
#[derive(Debug)]
pub(super) struct RequestHead {
    request: Request,
    /// Bytes of the head, including the final empty line.
    len: usize,
    body_len: usize,
}

impl RequestHead {
    /// Parses the head at the start of `buf`; `Ok(None)` while it is incomplete.
    pub(super) fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        let Some(head) = parse_head(buf, check_request_line)? else {
            return Ok(None);
        };
        let (method, path, query) = parse_request_line(head.start_line)?;
        if head.headers.get("transfer-encoding").is_some() {
            return Err(HttpError::TransferEncodingUnsupported);
        }
        let body_len =
            content_length(&head.headers, MAX_BODY_BYTES, HttpError::BodyTooLarge)?.unwrap_or(0);
        Ok(Some(RequestHead {
            request: Request {
                method,
                path,
                query,
                headers: head.headers,
                body: Vec::new(),
            },
            len: head.len,
            body_len,
        }))
    }

    /// The request and the bytes it used, once `buf` (which starts with this head)
    /// holds its whole body; else the head back.
    pub(super) fn complete(self, buf: &[u8]) -> Result<(Request, usize), RequestHead> {
        let used = self.len + self.body_len;
        match buf.get(self.len..used) {
            Some(body) => {
                let mut request = self.request;
                request.body = body.to_vec();
                Ok((request, used))
            }
            None => Err(self),
        }
    }
}

/// The request line's check as soon as it is complete, before the rest of the head.
pub(super) fn check_request_line(line: &str) -> Result<(), HttpError> {
    parse_request_line(line).map(drop)
}

/// Parses `METHOD SP target SP HTTP/1.x` into the method, the path and the query.
fn parse_request_line(line: &str) -> Result<(Method, String, String), HttpError> {
    if line.contains(['\r', '\n']) {
        return Err(HttpError::MalformedRequestLine);
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::MalformedRequestLine);
    };
    if !is_token(method) || target.is_empty() {
        return Err(HttpError::MalformedRequestLine);
    }
    check_version(version, HttpError::MalformedRequestLine)?;
    let method =
        Method::from_token(method).ok_or_else(|| HttpError::UnsupportedMethod(quote(method)))?;
    if !target.starts_with('/') {
        return Err(HttpError::InvalidTarget(quote(target)));
    }
    let target = target.split('#').next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok((method, path.to_owned(), query.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{MAX_BODY_BYTES, MAX_HEADERS, MAX_HEAD_BYTES, MAX_QUOTE};

    fn ok(buf: &[u8]) -> (Request, usize) {
        Request::parse(buf).unwrap().unwrap()
    }

    fn err(buf: &[u8]) -> HttpError {
        Request::parse(buf).unwrap_err()
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /api/v1/vm HTTP/1.1\r\nHost: localhost\r\nX-Thing:  a b \t\r\n\r\n";
        let (req, used) = ok(raw);
        assert_eq!(used, raw.len());
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/api/v1/vm");
        assert_eq!(req.header("host"), Some("localhost"));
        assert_eq!(req.header("HOST"), Some("localhost"));
        assert_eq!(req.header("x-thing"), Some("a b"));
        assert_eq!(req.header("missing"), None);
        assert!(req.body.is_empty());
    }

    #[test]
    fn http_1_0_and_empty_header_value() {
        let (req, _) = ok(b"DELETE /x HTTP/1.0\r\nX-Empty:\r\n\r\n");
        assert_eq!(req.method, Method::Delete);
        assert_eq!(req.header("x-empty"), Some(""));
    }

    #[test]
    fn put_with_body_and_pipelined_rest() {
        let raw = b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let (req, used) = ok(raw);
        assert_eq!(req.method, Method::Put);
        assert_eq!(req.body, b"hello");
        assert_eq!(&raw[used..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn query_and_fragment_stripped() {
        assert_eq!(ok(b"GET /a/b?x=1&y=2 HTTP/1.1\r\n\r\n").0.path, "/a/b");
        assert_eq!(ok(b"GET /a#frag HTTP/1.1\r\n\r\n").0.path, "/a");
        assert_eq!(ok(b"GET /?q HTTP/1.1\r\n\r\n").0.path, "/");
        let (req, _) = ok(b"GET /a/b?x=1&y=2#f HTTP/1.1\r\n\r\n");
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/a/b", "x=1&y=2"));
        assert_eq!(ok(b"GET /a HTTP/1.1\r\n\r\n").0.query, "");
    }

    #[test]
    fn split_across_reads() {
        let raw = b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"a\": true}";
        for cut in 0..raw.len() {
            assert_eq!(
                Request::parse(&raw[..cut]),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        let (req, used) = ok(raw);
        assert_eq!(used, raw.len());
        assert_eq!(req.body, b"{\"a\": true}");
    }

    #[test]
    fn head_limit() {
        let mut raw = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        let pad = MAX_HEAD_BYTES - raw.len() - 4;
        raw.extend(std::iter::repeat_n(b'a', pad));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(raw.len(), MAX_HEAD_BYTES);
        assert_eq!(ok(&raw).1, MAX_HEAD_BYTES);

        raw.insert(20, b'a');
        assert_eq!(err(&raw), HttpError::HeadTooLarge);
        assert_eq!(err(&raw[..MAX_HEAD_BYTES]), HttpError::HeadTooLarge);
        assert_eq!(Request::parse(&raw[..MAX_HEAD_BYTES - 1]), Ok(None));
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn endless_head_is_rejected_at_the_limit() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        while raw.len() < 4 * MAX_HEAD_BYTES {
            raw.extend_from_slice(b"A: b\r\n");
        }
        assert!(matches!(
            err(&raw),
            HttpError::HeadTooLarge | HttpError::TooManyHeaders
        ));
        let raw = vec![b'a'; 100 * MAX_HEAD_BYTES];
        assert_eq!(err(&raw), HttpError::HeadTooLarge);
    }

    #[test]
    fn header_count_limit() {
        let build = |n: usize| {
            let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                raw.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw
        };
        assert_eq!(ok(&build(MAX_HEADERS)).0.headers.len(), MAX_HEADERS);
        let e = err(&build(MAX_HEADERS + 1));
        assert_eq!(e, HttpError::TooManyHeaders);
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn body_limit() {
        let head = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        let mut raw = head.into_bytes();
        assert_eq!(Request::parse(&raw), Ok(None));
        raw.extend(std::iter::repeat_n(b'x', MAX_BODY_BYTES));
        assert_eq!(ok(&raw).0.body.len(), MAX_BODY_BYTES);

        // Rejected from the head alone, before any body byte arrives.
        let too_big = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let e = err(too_big.as_bytes());
        assert!(matches!(e, HttpError::BodyTooLarge(_)));
        assert_eq!(e.status(), 413);
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(err(huge).status(), 413);
    }

    #[test]
    fn bad_content_length() {
        for value in ["abc", "-1", "+5", "1 2", "0x10", "5,5", "1.0", ""] {
            let raw = format!("PUT / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            let e = err(raw.as_bytes());
            assert!(
                matches!(e, HttpError::InvalidContentLength(_)),
                "{value:?}: {e:?}"
            );
            assert_eq!(e.status(), 400);
        }
        let conflicting = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\nab";
        assert_eq!(err(conflicting), HttpError::ConflictingContentLength);
        let same = b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 02\r\n\r\nab";
        assert_eq!(ok(same).0.body, b"ab");
    }

    #[test]
    fn chunked_rejected() {
        let raw = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let e = err(raw);
        assert_eq!(e, HttpError::TransferEncodingUnsupported);
        assert_eq!(e.status(), 411);
        assert!(e.to_string().contains("Content-Length"));
    }

    #[test]
    fn garbage_fails_fast() {
        assert_eq!(err(b"\0\x01\x02"), HttpError::InvalidByte(0));
        assert_eq!(err(b"\xff\xfe"), HttpError::InvalidByte(0xff));
        assert_eq!(err(b"GET /\x7f HTTP/1.1"), HttpError::InvalidByte(0x7f));
        assert_eq!(err(b"\x16\x03\x01\x02\x00"), HttpError::InvalidByte(0x16));
        // A bad request line is rejected before the head is complete.
        assert_eq!(err(b"HELLO\r\n"), HttpError::MalformedRequestLine);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: \xc3\xa9\r\n"),
            HttpError::InvalidByte(0xc3)
        );
    }

    #[test]
    fn malformed_request_lines() {
        for raw in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b" GET / HTTP/1.1\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"GET\t/ HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
        ] {
            let e = err(raw);
            assert_eq!(
                e,
                HttpError::MalformedRequestLine,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(e.status(), 400);
        }
        let e = err(b"GET / HTTP/2.0\r\n\r\n");
        assert_eq!(e, HttpError::UnsupportedVersion("HTTP/2.0".into()));
        assert_eq!(e.status(), 505);
        let e = err(b"BREW /pot HTTP/1.1\r\n\r\n");
        assert_eq!(e, HttpError::UnsupportedMethod("BREW".into()));
        assert_eq!(e.status(), 501);
        assert_eq!(err(b"get / HTTP/1.1\r\n\r\n").status(), 501);
        for target in ["http://h/x", "*", "x"] {
            let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert!(matches!(err(raw.as_bytes()), HttpError::InvalidTarget(_)));
        }
    }

    #[test]
    fn malformed_headers() {
        for (raw, why) in [
            (&b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..], "missing ':'"),
            (b"GET / HTTP/1.1\r\nName : v\r\n\r\n", "invalid field name"),
            (b"GET / HTTP/1.1\r\n: v\r\n\r\n", "invalid field name"),
            (
                b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
                "obsolete line folding",
            ),
            (b"GET / HTTP/1.1\r\nA: b\nB: c\r\n\r\n", "bare CR or LF"),
            (b"GET / HTTP/1.1\r\nA: b\rB: c\r\n\r\n", "bare CR or LF"),
        ] {
            assert_eq!(err(raw), HttpError::MalformedHeader(why));
        }
    }

    #[test]
    fn long_quotes_are_truncated() {
        let method = "X".repeat(1000);
        let raw = format!("{method} / HTTP/1.1\r\n\r\n");
        let HttpError::UnsupportedMethod(quoted) = err(raw.as_bytes()) else {
            panic!("wrong error");
        };
        assert_eq!(quoted.len(), MAX_QUOTE);
    }

    #[test]
    fn pseudo_random_input_never_panics() {
        let valid = b"PUT /api/v1/vm/shutdown?x HTTP/1.1\r\nContent-Length: 3\r\nA: b\r\n\r\nabc";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut buf = valid.to_vec();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let cut = (next() as usize) % (buf.len() + 1);
            if let Ok(Some((req, used))) = Request::parse(&buf[..cut]) {
                assert!(used <= cut);
                assert!(req.body.len() <= MAX_BODY_BYTES);
            }
        }
    }

    #[test]
    fn method_round_trip() {
        for m in [
            Method::Get,
            Method::Head,
            Method::Post,
            Method::Put,
            Method::Patch,
            Method::Delete,
            Method::Options,
        ] {
            assert_eq!(Method::from_token(m.as_str()), Some(m));
            assert_eq!(m.to_string(), m.as_str());
        }
    }
}
