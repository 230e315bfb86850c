//! A small, bounded HTTP/1.1 message parser and writer.
//!
//! Only what the API needs: one request per connection, bodies delimited by
//! `Content-Length` (no chunked transfer coding), origin-form targets. The
//! parser is incremental ([`Request::parse`] returns `Ok(None)` while it needs
//! more bytes), it never panics on any input, and it never allocates more
//! than the input it has accepted, which the limits below bound:
//!
//! * [`MAX_HEAD_BYTES`]: the request/status line, the header fields and the
//!   empty line ending them;
//! * [`MAX_BODY_BYTES`]: the body;
//! * [`MAX_HEADERS`]: the number of header fields.
//!
//! The head must be printable ASCII (plus SP, HTAB and CRLF line ends);
//! anything else is rejected as soon as it is seen, so garbage fails fast
//! rather than waiting for a terminator that never comes.

mod reader;
mod request;
mod response;

pub use reader::RequestReader;
pub use request::Request;
pub use response::{reason_phrase, Response, CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT};

use std::fmt;

/// Largest accepted head (start line + header fields + final CRLF), bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest accepted body, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest accepted response body, bytes: the region list of several nodes of 8192
/// regions, or their metrics, are megabytes.
pub const MAX_RESPONSE_BODY_BYTES: usize = 32 << 20;
/// Largest accepted number of header fields.
pub const MAX_HEADERS: usize = 64;

/// Longest piece of peer input quoted back in an error message.
const MAX_QUOTE: usize = 64;

/// Why a message was rejected. [`HttpError::status`] gives the HTTP status a
/// server should answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No end of the header section within [`MAX_HEAD_BYTES`].
    #[error("header section larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// `Content-Length` above [`MAX_BODY_BYTES`].
    #[error("body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(String),
    /// A response's `Content-Length` above [`MAX_RESPONSE_BODY_BYTES`].
    #[error("response body of {0} bytes exceeds the limit of {MAX_RESPONSE_BODY_BYTES} bytes")]
    ResponseTooLarge(String),
    /// A byte that may not appear in a message head.
    #[error("invalid byte 0x{0:02x} in the message head")]
    InvalidByte(u8),
    /// The request line is not `METHOD SP /target SP HTTP/1.x`.
    #[error("malformed request line")]
    MalformedRequestLine,
    /// The status line is not `HTTP/1.x SP ddd SP reason`.
    #[error("malformed status line")]
    MalformedStatusLine,
    /// An HTTP version other than 1.0 or 1.1.
    #[error("unsupported HTTP version {0:?}")]
    UnsupportedVersion(String),
    /// A well-formed but unknown method.
    #[error("unsupported method {0:?}")]
    UnsupportedMethod(String),
    /// A request target that is not an absolute path.
    #[error("invalid request target {0:?}: expected an absolute path")]
    InvalidTarget(String),
    /// A header line that is not `name: value`.
    #[error("malformed header field: {0}")]
    MalformedHeader(&'static str),
    /// A `Content-Length` that is not a decimal number.
    #[error("invalid Content-Length {0:?}")]
    InvalidContentLength(String),
    /// Several `Content-Length` fields with different values.
    #[error("conflicting Content-Length header fields")]
    ConflictingContentLength,
    /// `Transfer-Encoding` (chunked bodies) is not supported.
    #[error("Transfer-Encoding is not supported; send the body with a Content-Length")]
    TransferEncodingUnsupported,
    /// A response that has a body but no `Content-Length`.
    #[error("response without Content-Length")]
    MissingContentLength,
}

impl HttpError {
    /// The HTTP status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::UnsupportedVersion(_) => 505,
            HttpError::UnsupportedMethod(_) => 501,
            HttpError::TransferEncodingUnsupported => 411,
            _ => 400,
        }
    }
}

/// The request methods the parser knows. Others are rejected with 501.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
    /// `OPTIONS`
    Options,
}

impl Method {
    /// The method token, e.g. `"GET"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }

    /// Parses a method token (case-sensitive, as HTTP specifies).
    pub fn from_token(token: &str) -> Option<Method> {
        Some(match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => return None,
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header fields in arrival order; lookups ignore ASCII case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No fields.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The value of the first field called `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every field called `name` (any case).
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Appends a field.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// All fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Keeps only the fields for which `keep(name)` is true.
    pub(crate) fn retain_names(&mut self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|(n, _)| keep(n));
    }
}

/// A parsed message head.
pub(crate) struct Head<'a> {
    /// The request or status line.
    pub start_line: &'a str,
    pub headers: Headers,
    /// Bytes of the head, including the final empty line.
    pub len: usize,
}

/// Parses the head at the start of `buf`. `check_start` validates the start
/// line as soon as it is complete, before the rest of the head arrives.
pub(crate) fn parse_head(
    buf: &[u8],
    check_start: impl Fn(&str) -> Result<(), HttpError>,
) -> Result<Option<Head<'_>>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let end = find(window, b"\r\n\r\n");
    let scanned = &window[..end.unwrap_or(window.len())];
    if let Some(&bad) = scanned.iter().find(|&&b| !is_head_byte(b)) {
        return Err(HttpError::InvalidByte(bad));
    }
    let Some(end) = end else {
        if let Some(eol) = find(window, b"\r\n") {
            check_start(ascii(&window[..eol])?)?;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
        return Ok(None);
    };
    let mut lines = ascii(scanned)?.split("\r\n");
    let start_line = lines.next().unwrap_or_default();
    let mut headers = Headers::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let (name, value) = parse_header_line(line)?;
        headers.push(name, value);
    }
    Ok(Some(Head {
        start_line,
        headers,
        len: end + 4,
    }))
}

/// Accepts `HTTP/1.0` and `HTTP/1.1`; other `HTTP/...` versions are
/// unsupported, anything else is `malformed`.
pub(crate) fn check_version(version: &str, malformed: HttpError) -> Result<(), HttpError> {
    match version {
        "HTTP/1.1" | "HTTP/1.0" => Ok(()),
        v if v.starts_with("HTTP/") => Err(HttpError::UnsupportedVersion(quote(v))),
        _ => Err(malformed),
    }
}

/// Parses `name: value`, trimming optional whitespace around the value.
fn parse_header_line(line: &str) -> Result<(&str, &str), HttpError> {
    if line.contains(['\r', '\n']) {
        return Err(HttpError::MalformedHeader("bare CR or LF"));
    }
    if line.starts_with([' ', '\t']) {
        return Err(HttpError::MalformedHeader("obsolete line folding"));
    }
    let (name, value) = line
        .split_once(':')
        .ok_or(HttpError::MalformedHeader("missing ':'"))?;
    if !is_token(name) {
        return Err(HttpError::MalformedHeader("invalid field name"));
    }
    Ok((name, value.trim_matches([' ', '\t'])))
}

/// The body length declared by `Content-Length`, if any, up to `max` (else the error
/// `too_large` makes of the value).
pub(crate) fn content_length(
    headers: &Headers,
    max: usize,
    too_large: fn(String) -> HttpError,
) -> Result<Option<usize>, HttpError> {
    let mut found = None;
    for value in headers.get_all("content-length") {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::InvalidContentLength(quote(value)));
        }
        let len = match value.parse::<usize>() {
            Ok(len) if len <= max => len,
            _ => return Err(too_large(quote(value))),
        };
        if found.is_some_and(|f| f != len) {
            return Err(HttpError::ConflictingContentLength);
        }
        found = Some(len);
    }
    Ok(found)
}

/// Bytes allowed in a head: visible ASCII, SP, HTAB, CR and LF.
fn is_head_byte(b: u8) -> bool {
    matches!(b, b'\t' | b'\r' | b'\n' | 0x20..=0x7e)
}

/// Whether `s` is a non-empty HTTP token (RFC 9110 `tchar`s).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `bytes` as text; head bytes have been checked to be ASCII already.
fn ascii(bytes: &[u8]) -> Result<&str, HttpError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let bad = bytes.get(e.valid_up_to()).copied().unwrap_or_default();
        HttpError::InvalidByte(bad)
    })
}

/// Peer input shortened for quoting in an error message.
pub(crate) fn quote(s: &str) -> String {
    s.chars().take(MAX_QUOTE).collect()
}

/// Position of the first `needle` in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
