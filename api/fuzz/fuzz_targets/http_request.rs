//! Fuzzes the REST API's HTTP/1.1 parser: `Request::parse` (what the API
//! server runs on every read) and `Response::parse` (what the client runs).
//!
//! Each input is used twice:
//! - raw: the whole input is parsed at once, as a request and as a response;
//! - structured: a header picks a split point and, optionally, a run of one
//!   byte to insert (so small inputs can reach the 8 KiB head and 64 KiB body
//!   limits); the message is then parsed whole and the way an incremental
//!   reader does it (parse the prefix; if it needs more bytes, parse the
//!   whole).
//!
//! Invariants:
//! - no panic;
//! - a successful parse uses no more bytes than it was given, and its body is
//!   the last bytes it used;
//! - body <= `MAX_BODY_BYTES`, head <= `MAX_HEAD_BYTES`, header fields <=
//!   `MAX_HEADERS`;
//! - a request's path starts with '/' and holds no query, fragment, space or
//!   line break; its header names are tokens, its values are trimmed and hold
//!   no line break; a `Content-Length` it has equals its body length; it has
//!   no `Transfer-Encoding`;
//! - a response's status is in 100..=599; statuses without a body have none;
//!   the fields `to_bytes` writes itself are not in its headers;
//! - the server's incremental `RequestReader`, fed the prefix then the whole,
//!   answers as `Request::parse` does on the same bytes;
//! - splitting does not change the answer: a prefix shorter than a parsed
//!   message is `Ok(None)`, a prefix holding it parses to the same message,
//!   and a prefix rejected with an error belongs to an input that is rejected
//!   too (reading in pieces never rejects a valid message, nor accepts an
//!   invalid one);
//! - re-serializing a parsed message and parsing that gives it back;
//! - errors map to a documented status and quote at most a bounded piece of
//!   the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mempower_api::http::{
    Request, RequestReader, Response, MAX_BODY_BYTES, MAX_HEADERS, MAX_HEAD_BYTES,
};
use mempower_api::HttpError;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
}

type Parsed<T> = Result<Option<(T, usize)>, HttpError>;

fn check_error(e: &HttpError) {
    assert!(
        matches!(e.status(), 400 | 411 | 413 | 431 | 501 | 505),
        "{e:?} -> {}",
        e.status()
    );
    // Quotes of peer input are cut to 64 characters.
    let msg = e.to_string();
    assert!(msg.len() <= 200, "error message of {} bytes", msg.len());
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_header(name: &str, value: &str) {
    assert!(is_token(name), "header name {name:?}");
    assert!(
        value
            .bytes()
            .all(|b| b == b'\t' || (0x20..=0x7e).contains(&b)),
        "header value {value:?}"
    );
    assert!(!value.starts_with([' ', '\t']) && !value.ends_with([' ', '\t']));
}

/// Invariants of a request parsed from `buf`.
fn check_request(buf: &[u8], req: &Request, used: usize) {
    assert!(used <= buf.len(), "used {used} of {}", buf.len());
    assert!(req.body.len() <= MAX_BODY_BYTES, "body {}", req.body.len());
    assert!(
        req.headers.len() <= MAX_HEADERS,
        "{} headers",
        req.headers.len()
    );
    let head = used - req.body.len();
    assert!(head <= MAX_HEAD_BYTES, "head of {head} bytes");
    assert!(buf[..head].ends_with(b"\r\n\r\n"));
    assert_eq!(&buf[head..used], &req.body[..]);

    let path = &req.path;
    assert!(path.starts_with('/'), "path {path:?}");
    assert!(!path.contains(['?', '#', ' ', '\r', '\n']), "path {path:?}");
    assert!(path
        .bytes()
        .all(|b| b == b'\t' || (0x21..=0x7e).contains(&b)));
    assert!(path.len() < head);

    for (name, value) in req.headers.iter() {
        check_header(name, value);
        assert!(!name.eq_ignore_ascii_case("transfer-encoding"));
        if name.eq_ignore_ascii_case("content-length") {
            assert_eq!(value.parse::<usize>().ok(), Some(req.body.len()));
        }
    }
    if req.header("content-length").is_none() {
        assert!(req.body.is_empty());
    }
}

/// Invariants of a response parsed from `buf`.
fn check_response(buf: &[u8], resp: &Response, used: usize) {
    assert!(used <= buf.len(), "used {used} of {}", buf.len());
    assert!(
        resp.body.len() <= MAX_BODY_BYTES,
        "body {}",
        resp.body.len()
    );
    assert!(resp.headers.len() <= MAX_HEADERS);
    let head = used - resp.body.len();
    assert!(head <= MAX_HEAD_BYTES, "head of {head} bytes");
    assert!(buf[..head].ends_with(b"\r\n\r\n"));
    assert_eq!(&buf[head..used], &resp.body[..]);
    assert!((100..=599).contains(&resp.status), "status {}", resp.status);
    if (100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304 {
        assert!(resp.body.is_empty());
    }
    for (name, value) in resp.headers.iter() {
        check_header(name, value);
        for reserved in [
            "content-type",
            "content-length",
            "connection",
            "transfer-encoding",
        ] {
            assert!(!name.eq_ignore_ascii_case(reserved), "kept {name:?}");
        }
    }
}

fn check_parsed<T>(buf: &[u8], parsed: &Parsed<T>, check: impl Fn(&[u8], &T, usize)) {
    match parsed {
        Ok(Some((msg, used))) => check(buf, msg, *used),
        Ok(None) => {}
        Err(e) => check_error(e),
    }
}

/// Parses `buf[..split]`, then `buf` when the prefix needs more bytes, as
/// a reader that re-parses its buffer after every read does; checks that
/// the answer agrees with parsing `buf` at once (`whole`).
fn check_split<T: PartialEq + std::fmt::Debug>(
    buf: &[u8],
    split: usize,
    whole: &Parsed<T>,
    parse: impl Fn(&[u8]) -> Parsed<T>,
    check: impl Fn(&[u8], &T, usize),
) {
    let prefix = &buf[..split];
    let first = parse(prefix);
    check_parsed(prefix, &first, &check);
    match (&first, whole) {
        // Complete in the prefix: the rest of the buffer is not looked at.
        (Ok(Some(p)), w) => assert_eq!(Ok(Some(p)), w.as_ref().map(Option::as_ref)),
        // Rejected early: more bytes would not have made it valid.
        (Err(e), w) => assert!(
            w.is_err(),
            "prefix of {split} rejected ({e:?}), whole {w:?}"
        ),
        // Needs more bytes: the reader reads on and parses the whole.
        (Ok(None), Ok(Some((_, used)))) => assert!(*used > split),
        (Ok(None), _) => {}
    }
    if let Ok(Some((_, used))) = whole {
        if split >= *used {
            assert!(matches!(first, Ok(Some(_))), "prefix of {split} >= {used}");
        }
    }
}

/// The server's way: one [`RequestReader`] fed the prefix, then (if it needs more) the
/// whole buffer, answers what `Request::parse` answers on the same bytes.
fn check_reader(buf: &[u8], split: usize) {
    let mut reader = RequestReader::new();
    let first = reader.parse(&buf[..split]);
    assert_eq!(first, Request::parse(&buf[..split]), "prefix of {split}");
    if first == Ok(None) {
        assert_eq!(reader.parse(buf), Request::parse(buf), "after {split}");
    }
}

/// `req` written back as bytes, parsed again, must give `req`.
fn request_round_trip(req: &Request) {
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (name, value) in req.headers.iter() {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let head = out.len();
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&req.body);
    if head > MAX_HEAD_BYTES {
        // Adding ": " can push a head over the limit.
        return;
    }
    let again = Request::parse(&bytes);
    assert_eq!(again, Ok(Some((req.clone(), bytes.len()))));
}

/// `resp` written with `to_bytes`, parsed again, must give `resp` back (the
/// content type only for statuses that have a body).
fn response_round_trip(resp: &Response) {
    let bytes = resp.to_bytes();
    let body = resp.body.len();
    // `to_bytes` adds up to three fields and may lengthen the status line.
    if resp.headers.len() + 3 > MAX_HEADERS || bytes.len() - body > MAX_HEAD_BYTES {
        return;
    }
    let again = Response::parse(&bytes);
    let Ok(Some((r2, used))) = again else {
        panic!("re-parsing {resp:?} gave {again:?}");
    };
    assert_eq!(used, bytes.len());
    assert_eq!(r2.status, resp.status);
    assert_eq!(r2.headers, resp.headers);
    assert_eq!(r2.body, resp.body);
    let has_body = !((100..200).contains(&resp.status) || resp.status == 204 || resp.status == 304);
    let ct = if has_body {
        resp.content_type.clone()
    } else {
        None
    };
    assert_eq!(r2.content_type, ct);
}

fn check_whole(buf: &[u8]) -> (Parsed<Request>, Parsed<Response>) {
    let req = Request::parse(buf);
    check_parsed(buf, &req, check_request);
    if let Ok(Some((r, _))) = &req {
        request_round_trip(r);
    }
    let resp = Response::parse(buf);
    check_parsed(buf, &resp, check_response);
    if let Ok(Some((r, _))) = &resp {
        response_round_trip(r);
    }
    (req, resp)
}

fuzz_target!(|data: &[u8]| {
    // Raw: the whole input is the message.
    let _ = check_whole(data);

    // Structured: split u32, mode u8, [fill len u24, at u16, byte u8], msg.
    // The fill (a quarter of the inputs: long heads are slow to scan under
    // the sanitizers) inserts `len` times `byte` at `at`.
    let mut input = Input(data);
    let split = input.u32() as usize;
    let mode = input.u8();
    let mut msg;
    if mode & 3 == 3 {
        let len = (u32::from_le_bytes([input.u8(), input.u8(), input.u8(), 0]) as usize)
            % (MAX_HEAD_BYTES + MAX_BODY_BYTES + 64);
        let at = input.u16() as usize;
        let byte = input.u8();
        msg = input.0.to_vec();
        let at = at % (msg.len() + 1);
        msg.splice(at..at, std::iter::repeat_n(byte, len));
    } else {
        msg = input.0.to_vec();
    }
    let split = split % (msg.len() + 1);
    let (req, resp) = check_whole(&msg);
    check_split(&msg, split, &req, Request::parse, check_request);
    check_reader(&msg, split);
    check_split(&msg, split, &resp, Response::parse, check_response);
});
