//! HTTP responses: building and writing them (server side) and parsing them
//! (client side), with the same limits as requests.

use serde::Serialize;

use super::{
    check_version, content_length, is_token, parse_head, Headers, HttpError,
    MAX_RESPONSE_BODY_BYTES,
};
use crate::types::ErrorBody;

/// `Content-Type` of JSON bodies.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of plain-text bodies. Prometheus exposition can use
/// [`Response::with_content_type`] to add `version=0.0.4`.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";

/// Header fields [`Response::to_bytes`] writes itself; extra fields with
/// these names are dropped.
const RESERVED: [&str; 4] = [
    "content-type",
    "content-length",
    "connection",
    "transfer-encoding",
];

/// A response. Every response closes its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, 100..=599 (others are written as 500).
    pub status: u16,
    /// `Content-Type` of the body, if it has one.
    pub content_type: Option<String>,
    /// Header fields besides `Content-Type`, `Content-Length` and
    /// `Connection`, e.g. `Allow`.
    pub headers: Headers,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response without a body (e.g. 204).
    pub fn new(status: u16) -> Self {
        Response {
            status,
            content_type: None,
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A JSON body. If `value` cannot be serialized, a 500 error instead.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                content_type: Some(CONTENT_TYPE_JSON.to_owned()),
                body,
                ..Response::new(status)
            },
            Err(e) => Response::error(500, format!("cannot serialize the response: {e}")),
        }
    }

    /// A plain-text body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            content_type: Some(CONTENT_TYPE_TEXT.to_owned()),
            body: body.into().into_bytes(),
            ..Response::new(status)
        }
    }

    /// An error: `{"error": "<message>"}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            error: message.into(),
        };
        match serde_json::to_vec(&body) {
            Ok(body) => Response {
                content_type: Some(CONTENT_TYPE_JSON.to_owned()),
                body,
                ..Response::new(status)
            },
            // Serializing a struct with one string member cannot fail.
            Err(_) => Response::new(status),
        }
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(name, value);
        self
    }

    /// Replaces the `Content-Type`.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The value of the first extra header field called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The message of a JSON error body, if the body is one.
    pub fn error_message(&self) -> Option<String> {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|e| e.error)
    }

    /// The response as HTTP/1.1 bytes, with `Content-Length` (except for
    /// 1xx, 204 and 304, which RFC 9110 forbids to carry one) and
    /// `Connection: close`. Header fields that are not valid HTTP (or that
    /// this function writes itself) are left out rather than written.
    pub fn to_bytes(&self) -> Vec<u8> {
        let status = if (100..=599).contains(&self.status) {
            self.status
        } else {
            500
        };
        let has_body = status_has_body(status);
        let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
        if let Some(ct) = self
            .content_type
            .as_deref()
            .filter(|ct| has_body && is_value(ct))
        {
            out.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if has_body {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        for (name, value) in self.headers.iter() {
            let reserved = RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name));
            if !reserved && is_token(name) && is_value(value) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut bytes = out.into_bytes();
        if has_body {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }

    /// Parses one response from the start of `buf`: `Ok(None)` while `buf`
    /// is an incomplete prefix, else the response and the bytes it used.
    ///
    /// The body must be delimited by `Content-Length` (except for statuses
    /// that have none); the limits of requests apply, but for the body's, which is
    /// [`MAX_RESPONSE_BODY_BYTES`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Response, usize)>, HttpError> {
        let Some(mut head) = parse_head(buf, |line| parse_status_line(line).map(drop))? else {
            return Ok(None);
        };
        let status = parse_status_line(head.start_line)?;
        if head.headers.get("transfer-encoding").is_some() {
            return Err(HttpError::TransferEncodingUnsupported);
        }
        let body_len = if status_has_body(status) {
            content_length(
                &head.headers,
                MAX_RESPONSE_BODY_BYTES,
                HttpError::ResponseTooLarge,
            )?
            .ok_or(HttpError::MissingContentLength)?
        } else {
            0
        };
        let Some(body) = buf.get(head.len..head.len + body_len) else {
            return Ok(None);
        };
        let content_type = head.headers.get("content-type").map(str::to_owned);
        head.headers
            .retain_names(|n| !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(n)));
        let response = Response {
            status,
            content_type,
            headers: head.headers,
            body: body.to_vec(),
        };
        Ok(Some((response, head.len + body_len)))
    }
}

/// Parses `HTTP/1.x SP ddd SP reason` into the status code.
fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    if line.contains(['\r', '\n']) {
        return Err(HttpError::MalformedStatusLine);
    }
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    check_version(version, HttpError::MalformedStatusLine)?;
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::MalformedStatusLine);
    }
    match code.parse::<u16>() {
        Ok(status) if (100..=599).contains(&status) => Ok(status),
        _ => Err(HttpError::MalformedStatusLine),
    }
}

/// Whether a response with this status carries a body (and its length).
fn status_has_body(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

/// Whether `s` can be written as a header value.
fn is_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
}

/// The standard reason phrase of `status` ("Unknown" if none).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{MAX_BODY_BYTES, MAX_HEAD_BYTES, MAX_RESPONSE_BODY_BYTES};

    fn text(r: &Response) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn json_response_bytes() {
        let r = Response::json(200, &serde_json::json!({"a": 1}));
        assert_eq!(
            text(&r),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\
             Connection: close\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn error_response_is_json() {
        let r = Response::error(404, "no route for \"/x\"");
        let s = text(&r);
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"), "{s}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, serde_json::json!({"error": "no route for \"/x\""}));
        assert_eq!(r.error_message().as_deref(), Some("no route for \"/x\""));
    }

    #[test]
    fn no_content_has_no_length_or_body() {
        let mut r = Response::new(204);
        r.body = b"ignored".to_vec();
        r.content_type = Some("text/plain".into());
        assert_eq!(
            text(&r),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn extra_headers_are_sanitized() {
        let r = Response::text(405, "")
            .with_header("Allow", "GET, PUT")
            .with_header("Content-Length", "999")
            .with_header("X-Evil", "a\r\nSet-Cookie: x")
            .with_header("Bad Name", "v")
            .with_content_type("text/plain; version=0.0.4");
        let s = text(&r);
        assert!(s.contains("\r\nAllow: GET, PUT\r\n"), "{s}");
        assert!(s.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"));
        assert!(s.contains("\r\nContent-Length: 0\r\n"));
        assert!(!s.contains("999") && !s.contains("Evil") && !s.contains("Bad Name"));
        assert_eq!(
            text(&Response::new(42)).lines().next(),
            Some("HTTP/1.1 500 Internal Server Error")
        );
    }

    #[test]
    fn round_trip() {
        for r in [
            Response::json(200, &vec![1, 2, 3]),
            Response::text(200, "metric 1\n"),
            Response::error(503, "VMM gone").with_header("Retry-After", "1"),
            Response::new(204),
        ] {
            let bytes = r.to_bytes();
            let (back, used) = Response::parse(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(back, r);
        }
    }

    #[test]
    fn parse_split_across_reads() {
        let bytes = Response::text(200, "hello world").to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(Response::parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        assert!(Response::parse(&bytes).unwrap().is_some());
    }

    #[test]
    fn parse_rejects_bad_responses() {
        let cases: [(&[u8], HttpError); 8] = [
            (b"HTTP/1.1 200 OK\r\n\r\n", HttpError::MissingContentLength),
            (b"HTTP/1.1 20 OK\r\n\r\n", HttpError::MalformedStatusLine),
            (b"HTTP/1.1 999 What\r\n\r\n", HttpError::MalformedStatusLine),
            (b"HTTP/1.1 2x0 OK\r\n", HttpError::MalformedStatusLine),
            (b"SSH-2.0-OpenSSH\r\n", HttpError::MalformedStatusLine),
            (
                b"HTTP/3 200 OK\r\n",
                HttpError::UnsupportedVersion("HTTP/3".into()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::TransferEncodingUnsupported,
            ),
            (b"\x00garbage", HttpError::InvalidByte(0)),
        ];
        for (raw, want) in cases {
            assert_eq!(
                Response::parse(raw),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE_BODY_BYTES + 1
        );
        assert!(matches!(
            Response::parse(big.as_bytes()),
            Err(HttpError::ResponseTooLarge(_))
        ));
        // A region list of megabytes is a response, not a request: it fits.
        let region_list = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(
            Response::parse(region_list.as_bytes()),
            Ok(None),
            "waits for it"
        );
        let endless = vec![b'H'; 2 * MAX_HEAD_BYTES];
        assert_eq!(Response::parse(&endless), Err(HttpError::HeadTooLarge));
        // A status line without a reason phrase is tolerated.
        let (r, _) = Response::parse(b"HTTP/1.0 204\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.status, 204);
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(405), "Method Not Allowed");
        assert_eq!(reason_phrase(599), "Unknown");
    }
}
