//! SIP message model and serializer (RFC 3261 §7, §20, §25): [`Request`], [`Response`],
//! [`Method`], the parse error, and the response builders. Header fields live in
//! `message/headers.rs`, the parser in `message/parse.rs`; both are re-exported here.
//!
//! Pure code: no I/O, no clocks. Bodies are arbitrary bytes and are kept
//! exactly; the header section must be UTF-8.

use std::fmt;
use std::str::FromStr;

mod headers;
mod parse;

pub use headers::{CSeq, Headers, NameAddr, Params, Via, expand_compact, header_name_eq};
pub use parse::{
    bad_request_for, parse_datagram, parse_datagram_limited, parse_stream, parse_stream_limited,
};

/// Largest message accepted by the parser (RFC 3261 §18.1.1 UDP upper bound).
pub const MAX_MESSAGE_SIZE: usize = 65_535;
/// Largest number of header fields (after unfolding).
pub const MAX_HEADERS: usize = 128;
/// Largest header line (physical, and after unfolding).
pub const MAX_HEADER_LINE: usize = 8 * 1024;

/// Why a buffer is not an acceptable SIP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty message")]
    Empty,
    #[error("message too large: {size} bytes, limit {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("too many header fields (limit {0})")]
    TooManyHeaders(usize),
    #[error("header line too long: {len} bytes, limit {limit}")]
    HeaderLineTooLong { len: usize, limit: usize },
    #[error("header section is not terminated by an empty line")]
    UnterminatedHeaders,
    #[error("header section is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed start line: {0:?}")]
    BadStartLine(String),
    #[error("invalid method: {0:?}")]
    BadMethod(String),
    #[error("invalid Request-URI: {0:?}")]
    BadRequestUri(String),
    #[error("unsupported SIP version: {0:?}")]
    UnsupportedVersion(String),
    #[error("invalid status code: {0:?}")]
    BadStatusCode(String),
    #[error("malformed header line: {0:?}")]
    MalformedHeader(String),
    #[error("missing mandatory header: {0}")]
    MissingHeader(&'static str),
    #[error("invalid {header} header: {value:?}")]
    InvalidHeader { header: &'static str, value: String },
    #[error("CSeq method {cseq} does not match request method {method}")]
    CSeqMethodMismatch { method: String, cseq: String },
    #[error("invalid Content-Length: {0:?}")]
    BadContentLength(String),
    #[error("Content-Length {declared} exceeds the {available} body bytes present")]
    ContentLengthExceedsBody { declared: usize, available: usize },
    #[error("Content-Length is mandatory on stream transports")]
    MissingContentLength,
}

/// Shortens peer-controlled text for error messages.
fn snippet(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

fn invalid(header: &'static str, value: &str) -> ParseError {
    ParseError::InvalidHeader {
        header,
        value: snippet(value),
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_token_char)
}

// ---------------------------------------------------------------------------
// Method

/// A SIP request method. Methods are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Other(String),
}

impl Method {
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Ok(match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            other if is_token(other) => Method::Other(other.to_string()),
            other => return Err(ParseError::BadMethod(snippet(other))),
        })
    }
}

// ---------------------------------------------------------------------------
// Messages

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub uri: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipMessage {
    Request(Request),
    Response(Response),
}

impl Request {
    pub fn new(method: Method, uri: impl Into<String>) -> Request {
        Request {
            method,
            uri: uri.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let start = format!("{} {} SIP/2.0", self.method, clean(&self.uri));
        serialize(&start, &self.headers, &self.body)
    }

    /// True if the request belongs to a dialog: its To carries a tag (RFC 3261 §12.2).
    /// A BYE or re-INVITE is; a new INVITE is not.
    pub fn is_in_dialog(&self) -> bool {
        self.headers.to().is_ok_and(|t| t.tag().is_some())
    }
}

impl Response {
    pub fn new(status: u16, reason: impl Into<String>) -> Response {
        Response {
            status,
            reason: reason.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A response to `req` carrying its Via(s), From, To, Call-ID and CSeq
    /// (RFC 3261 §8.2.6.2), plus Record-Route for responses that could set up
    /// a dialog (§12.1.1). No To tag is added: see [`Response::with_to_tag`].
    pub fn for_request(req: &Request, status: u16, reason: impl Into<String>) -> Response {
        let mut r = Response::new(status, reason);
        for v in req.headers.get_all("Via") {
            r.headers.push("Via", v);
        }
        for name in ["From", "To", "Call-ID", "CSeq"] {
            if let Some(v) = req.headers.get(name) {
                r.headers.push(name, v);
            }
        }
        if (101..300).contains(&status) {
            for v in req.headers.get_all("Record-Route") {
                r.headers.push("Record-Route", v);
            }
        }
        r
    }

    /// Adds `;tag=<tag>` to To unless it already has a tag.
    pub fn with_to_tag(mut self, tag: &str) -> Response {
        if let Some(to) = self.headers.get("To") {
            let has_tag = NameAddr::parse(to)
                .map(|n| n.tag().is_some())
                .unwrap_or(false);
            if !has_tag {
                let v = format!("{to};tag={tag}");
                self.headers.set("To", v);
            }
        }
        self
    }

    /// Appends a `Warning: <code> <agent> "<text>"` header (RFC 3261 §20.43). The text
    /// becomes a safe quoted-string: `"`, `\`, CR and LF are each replaced by a space.
    pub fn with_warning(mut self, code: u16, agent: &str, text: &str) -> Response {
        self.headers
            .push("Warning", warning_value(code, agent, text));
        self
    }

    pub fn is_provisional(&self) -> bool {
        self.status < 200
    }
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let start = format!("SIP/2.0 {:03} {}", self.status, clean(&self.reason));
        serialize(&start, &self.headers, &self.body)
    }
}

impl SipMessage {
    /// Wire form; Content-Length is computed from the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            SipMessage::Request(r) => r.to_bytes(),
            SipMessage::Response(r) => r.to_bytes(),
        }
    }
    pub fn headers(&self) -> &Headers {
        match self {
            SipMessage::Request(r) => &r.headers,
            SipMessage::Response(r) => &r.headers,
        }
    }
    pub fn body(&self) -> &[u8] {
        match self {
            SipMessage::Request(r) => &r.body,
            SipMessage::Response(r) => &r.body,
        }
    }
}

/// A response to `req` (see [`Response::for_request`]) with one Warning header: the one
/// place that writes a Warning. `warning_response(req, 403, "Forbidden", 399, "sipmail",
/// "unknown peer")` gives `Warning: 399 sipmail "unknown peer"`.
pub fn warning_response(
    req: &Request,
    status: u16,
    reason: &str,
    code: u16,
    agent: &str,
    text: &str,
) -> Response {
    Response::for_request(req, status, reason).with_warning(code, agent, text)
}

/// The value of a Warning header, its text made a safe quoted-string.
fn warning_value(code: u16, agent: &str, text: &str) -> String {
    format!(
        "{code} {agent} \"{}\"",
        text.replace(['"', '\\', '\r', '\n'], " ")
    )
}

/// Header text must not smuggle line breaks onto the wire.
fn clean(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

fn serialize(start: &str, headers: &Headers, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(start.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (n, v) in headers.iter() {
        if header_name_eq(n, "Content-Length") {
            continue;
        }
        out.extend_from_slice(clean(n).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(clean(v).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite(to: &str) -> Request {
        let mut r = Request::new(Method::Invite, "sip:mail@site-b.test");
        r.headers
            .push("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKw1");
        r.headers.push("From", "<sip:mail@site-a.test>;tag=a");
        r.headers.push("To", to);
        r.headers.push("Call-ID", "w1@site-a.test");
        r.headers.push("CSeq", "1 INVITE");
        r
    }

    /// What relay's `reject` and `warn_response` wrote before this helper existed.
    fn relay_style(req: &Request, status: u16, reason: &str, warning: &str) -> Response {
        let mut r = Response::for_request(req, status, reason);
        r.headers.push(
            "Warning",
            format!(
                "399 sipmail \"{}\"",
                warning.replace(['"', '\\', '\r', '\n'], " ")
            ),
        );
        r
    }

    #[test]
    fn warning_response_is_byte_identical_to_the_relay_builders() {
        let req = invite("<sip:mail@site-b.test>");
        for text in ["unknown peer", "a \"quoted\" \\ text\r\nwith breaks", ""] {
            let ours = warning_response(&req, 403, "Forbidden", 399, "sipmail", text);
            assert_eq!(
                ours.to_bytes(),
                relay_style(&req, 403, "Forbidden", text).to_bytes()
            );
        }
        let r = warning_response(
            &req,
            488,
            "Not Acceptable Here",
            399,
            "sipmail",
            "say \"hi\"",
        );
        assert_eq!(r.headers.get("Warning"), Some("399 sipmail \"say  hi \""));
    }

    #[test]
    fn in_dialog_means_a_to_tag() {
        assert!(!invite("<sip:mail@site-b.test>").is_in_dialog());
        assert!(invite("<sip:mail@site-b.test>;tag=b").is_in_dialog());
        assert!(!invite("garbage <").is_in_dialog());
    }
}
