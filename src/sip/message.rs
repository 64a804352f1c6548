//! SIP message model, parser and serializer (RFC 3261 §7, §18.3, §20, §25).
//!
//! Pure code: no I/O, no clocks. Bodies are arbitrary bytes and are kept
//! exactly; the header section must be UTF-8.

use std::fmt;
use std::str::FromStr;

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
// Headers

/// Compact header forms (RFC 3261 §7.3.3 and the IANA SIP header registry).
const COMPACT: &[(char, &str)] = &[
    ('a', "Accept-Contact"),
    ('b', "Referred-By"),
    ('c', "Content-Type"),
    ('d', "Request-Disposition"),
    ('e', "Content-Encoding"),
    ('f', "From"),
    ('i', "Call-ID"),
    ('j', "Reject-Contact"),
    ('k', "Supported"),
    ('l', "Content-Length"),
    ('m', "Contact"),
    ('n', "Identity-Info"),
    ('o', "Event"),
    ('r', "Refer-To"),
    ('s', "Subject"),
    ('t', "To"),
    ('u', "Allow-Events"),
    ('v', "Via"),
    ('x', "Session-Expires"),
    ('y', "Identity"),
];

/// The long form of a compact header name (`"i"` -> `"Call-ID"`), if it is one.
pub fn expand_compact(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    let c = chars.next()?.to_ascii_lowercase();
    if chars.next().is_some() {
        return None;
    }
    COMPACT.iter().find(|(k, _)| *k == c).map(|(_, v)| *v)
}

/// Header-name equality: case-insensitive and compact-form aware.
pub fn header_name_eq(a: &str, b: &str) -> bool {
    let a = expand_compact(a).unwrap_or(a);
    let b = expand_compact(b).unwrap_or(b);
    a.eq_ignore_ascii_case(b)
}

/// Splits on `sep` outside double quotes and angle brackets.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_quotes = false;
    let mut escaped = false;
    let mut angle = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '<' if !in_quotes => angle += 1,
            '>' if !in_quotes => angle = angle.saturating_sub(1),
            c if c == sep && !in_quotes && angle == 0 => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Header fields in wire order. Names are kept as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Headers(Vec::new())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// All fields in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
    /// First value of `name` (case-insensitive, compact-form aware).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| header_name_eq(n, name))
            .map(|(_, v)| v.as_str())
    }
    /// Every field line of `name`, in order (comma-joined values are not split).
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| header_name_eq(n, name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    /// Appends a field.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }
    /// Inserts a field before all others (used for the top Via).
    pub fn prepend(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(0, (name.into(), value.into()));
    }
    /// Replaces the first field of `name` and removes the others; appends if absent.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter().position(|(n, _)| header_name_eq(n, &name)) {
            Some(i) => {
                self.0[i] = (name.clone(), value);
                let mut idx = 0;
                self.0.retain(|(n, _)| {
                    let keep = idx <= i || !header_name_eq(n, &name);
                    idx += 1;
                    keep
                });
            }
            None => self.0.push((name, value)),
        }
    }
    /// Removes every field of `name`; returns how many were removed.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.0.len();
        self.0.retain(|(n, _)| !header_name_eq(n, name));
        before - self.0.len()
    }
    /// Every Via value, with comma-combined lines split, top first.
    pub fn via_values(&self) -> Vec<&str> {
        self.get_all("Via")
            .into_iter()
            .flat_map(|v| split_outside_quotes(v, ','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
    /// Every Via, parsed, top first.
    pub fn via_list(&self) -> Result<Vec<Via>, ParseError> {
        self.via_values().into_iter().map(Via::parse).collect()
    }
    /// The topmost Via.
    pub fn top_via(&self) -> Result<Via, ParseError> {
        match self.via_values().first() {
            Some(v) => Via::parse(v),
            None => Err(ParseError::MissingHeader("Via")),
        }
    }
    /// Replaces the topmost Via value (even inside a comma-combined line).
    pub fn set_top_via(&mut self, via: &Via) -> bool {
        let Some(i) = self.0.iter().position(|(n, _)| header_name_eq(n, "Via")) else {
            return false;
        };
        let mut parts: Vec<String> = split_outside_quotes(&self.0[i].1, ',')
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if parts.is_empty() {
            parts.push(via.to_string());
        } else {
            parts[0] = via.to_string();
        }
        self.0[i].1 = parts.join(", ");
        true
    }
    pub fn call_id(&self) -> Option<&str> {
        self.get("Call-ID")
    }
    pub fn cseq(&self) -> Result<CSeq, ParseError> {
        CSeq::parse(self.get("CSeq").ok_or(ParseError::MissingHeader("CSeq"))?)
    }
    pub fn from(&self) -> Result<NameAddr, ParseError> {
        NameAddr::parse_as(
            self.get("From").ok_or(ParseError::MissingHeader("From"))?,
            "From",
        )
    }
    pub fn to(&self) -> Result<NameAddr, ParseError> {
        NameAddr::parse_as(self.get("To").ok_or(ParseError::MissingHeader("To"))?, "To")
    }
    pub fn contact(&self) -> Result<NameAddr, ParseError> {
        let v = self
            .get("Contact")
            .ok_or(ParseError::MissingHeader("Contact"))?;
        let first = split_outside_quotes(v, ',').into_iter().next().unwrap_or(v);
        NameAddr::parse_as(first, "Contact")
    }
    /// Content-Length, validated: all occurrences must agree.
    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        let mut found: Option<usize> = None;
        for v in self.get_all("Content-Length") {
            let t = v.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParseError::BadContentLength(snippet(v)));
            }
            let n: usize = t
                .parse()
                .map_err(|_| ParseError::BadContentLength(snippet(v)))?;
            if let Some(prev) = found
                && prev != n
            {
                return Err(ParseError::BadContentLength(snippet(v)));
            }
            found = Some(n);
        }
        Ok(found)
    }
}

// ---------------------------------------------------------------------------
// Typed header values

/// Generic `;name[=value]` parameter list.
pub type Params = Vec<(String, Option<String>)>;

fn parse_params(s: &str, header: &'static str) -> Result<Params, ParseError> {
    let mut out = Vec::new();
    for p in split_outside_quotes(s, ';') {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
            None => (p, None),
        };
        if !is_token(name) {
            return Err(invalid(header, s));
        }
        out.push((name.to_string(), value));
    }
    Ok(out)
}

fn fmt_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (n, v) in params {
        match v {
            Some(v) => write!(f, ";{n}={v}")?,
            None => write!(f, ";{n}")?,
        }
    }
    Ok(())
}

/// A single Via value (RFC 3261 §20.42, RFC 3581 rport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// "UDP", "TCP", "TLS", ... (upper-cased).
    pub transport: String,
    /// Host as written; IPv6 references keep their brackets.
    pub host: String,
    pub port: Option<u16>,
    pub branch: Option<String>,
    pub received: Option<String>,
    /// `None`: absent; `Some(None)`: `;rport` without value; `Some(Some(p))`: `;rport=p`.
    pub rport: Option<Option<u16>>,
    /// Other parameters, in order.
    pub params: Params,
}

impl Via {
    /// A Via for `transport` at `addr` with the given branch and a valueless rport.
    pub fn new(transport: &str, addr: std::net::SocketAddr, branch: &str) -> Via {
        let host = match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        Via {
            transport: transport.to_ascii_uppercase(),
            host,
            port: Some(addr.port()),
            branch: Some(branch.to_string()),
            received: None,
            rport: Some(None),
            params: Vec::new(),
        }
    }

    pub fn parse(s: &str) -> Result<Via, ParseError> {
        let bad = || invalid("Via", s);
        let mut parts = split_outside_quotes(s, ';').into_iter();
        let head = parts.next().ok_or_else(bad)?;
        // sent-protocol: name SLASH version SLASH transport (SLASH = SWS "/" SWS)
        let mut pieces = head.splitn(3, '/');
        let name = pieces.next().ok_or_else(bad)?.trim();
        let version = pieces.next().ok_or_else(bad)?.trim();
        let rest = pieces.next().ok_or_else(bad)?.trim_start();
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err(bad());
        }
        let split = rest
            .find(|c: char| c.is_ascii_whitespace())
            .ok_or_else(bad)?;
        let transport = &rest[..split];
        let sent_by = rest[split..].trim();
        if !is_token(transport) || sent_by.is_empty() {
            return Err(bad());
        }
        let (host, port) = if let Some(stripped) = sent_by.strip_prefix('[') {
            let close = stripped.find(']').ok_or_else(bad)?;
            let inner = &stripped[..close];
            if inner.is_empty()
                || !inner
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return Err(bad());
            }
            let after = &stripped[close + 1..];
            let port = match after.trim().strip_prefix(':') {
                Some(p) => Some(p.trim().parse::<u16>().map_err(|_| bad())?),
                None if after.trim().is_empty() => None,
                None => return Err(bad()),
            };
            (format!("[{inner}]"), port)
        } else {
            let (h, p) = match sent_by.split_once(':') {
                Some((h, p)) => (h.trim(), Some(p.trim().parse::<u16>().map_err(|_| bad())?)),
                None => (sent_by, None),
            };
            if h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(bad());
            }
            (h.to_string(), p)
        };
        let mut via = Via {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            branch: None,
            received: None,
            rport: None,
            params: Vec::new(),
        };
        let rest: Vec<&str> = parts.collect();
        for (n, v) in parse_params(&rest.join(";"), "Via")? {
            if n.eq_ignore_ascii_case("branch") {
                via.branch = Some(v.filter(|v| !v.is_empty()).ok_or_else(bad)?);
            } else if n.eq_ignore_ascii_case("received") {
                via.received = Some(v.filter(|v| !v.is_empty()).ok_or_else(bad)?);
            } else if n.eq_ignore_ascii_case("rport") {
                via.rport = Some(match v {
                    Some(p) if !p.is_empty() => Some(p.parse::<u16>().map_err(|_| bad())?),
                    _ => None,
                });
            } else {
                via.params.push((n, v));
            }
        }
        Ok(via)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(b) = &self.branch {
            write!(f, ";branch={b}")?;
        }
        if let Some(r) = &self.received {
            write!(f, ";received={r}")?;
        }
        match self.rport {
            Some(Some(p)) => write!(f, ";rport={p}")?,
            Some(None) => write!(f, ";rport")?,
            None => {}
        }
        fmt_params(f, &self.params)
    }
}

/// CSeq (RFC 3261 §20.16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(s: &str) -> Result<CSeq, ParseError> {
        let mut it = s.split_ascii_whitespace();
        let (Some(n), Some(m), None) = (it.next(), it.next(), it.next()) else {
            return Err(invalid("CSeq", s));
        };
        if !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("CSeq", s));
        }
        let seq = n.parse::<u32>().map_err(|_| invalid("CSeq", s))?;
        let method = m.parse::<Method>().map_err(|_| invalid("CSeq", s))?;
        Ok(CSeq { seq, method })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// name-addr / addr-spec with header parameters (From, To, Contact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: String,
    pub params: Params,
}

impl NameAddr {
    pub fn new(uri: impl Into<String>) -> NameAddr {
        NameAddr {
            display: None,
            uri: uri.into(),
            params: Vec::new(),
        }
    }

    pub fn parse(s: &str) -> Result<NameAddr, ParseError> {
        Self::parse_as(s, "name-addr")
    }

    fn parse_as(s: &str, header: &'static str) -> Result<NameAddr, ParseError> {
        let bad = || invalid(header, s);
        let t = s.trim();
        // Find '<' outside quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut lt = None;
        for (i, c) in t.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '<' if !in_quotes => {
                    lt = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let (display, uri, rest) = if let Some(lt) = lt {
            let gt = t[lt..].find('>').ok_or_else(bad)? + lt;
            let d = t[..lt].trim();
            let display = if d.is_empty() {
                None
            } else if let Some(q) = d.strip_prefix('"') {
                let q = q.strip_suffix('"').ok_or_else(bad)?;
                let mut out = String::new();
                let mut esc = false;
                for c in q.chars() {
                    if esc {
                        out.push(c);
                        esc = false;
                    } else if c == '\\' {
                        esc = true;
                    } else {
                        out.push(c);
                    }
                }
                Some(out)
            } else {
                Some(d.to_string())
            };
            (display, t[lt + 1..gt].trim(), &t[gt + 1..])
        } else {
            match t.find(';') {
                Some(i) => (None, t[..i].trim(), &t[i..]),
                None => (None, t, ""),
            }
        };
        let scheme_ok = uri == "*" || uri.split_once(':').is_some_and(|(sch, _)| is_scheme(sch));
        if !scheme_ok || uri.chars().any(|c| c.is_whitespace()) {
            return Err(bad());
        }
        let rest = rest.trim();
        if !rest.is_empty() && !rest.starts_with(';') {
            return Err(bad());
        }
        Ok(NameAddr {
            display,
            uri: uri.to_string(),
            params: parse_params(rest, header)?,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        self.param("tag").flatten()
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            let esc = d.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "\"{esc}\" ")?;
        }
        write!(f, "<{}>", self.uri)?;
        fmt_params(f, &self.params)
    }
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
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

// ---------------------------------------------------------------------------
// Parser

enum StartLine {
    Request(Method, String),
    Response(u16, String),
}

/// Bytes of CRLF / LF keep-alives before the start line (RFC 3261 §7.5).
fn leading_crlf(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        if buf[i..].starts_with(b"\r\n") {
            i += 2;
        } else if buf[i..].starts_with(b"\n") {
            i += 1;
        } else {
            return i;
        }
    }
}

/// Scans the header section: returns (end of head, start of body) once the
/// empty line is seen. Enforces the physical line-length limit, also on an
/// incomplete trailing line.
fn scan_head(buf: &[u8]) -> Result<Option<(usize, usize)>, ParseError> {
    let mut pos = 0;
    while pos < buf.len() {
        let Some(off) = buf[pos..].iter().position(|&b| b == b'\n') else {
            let len = buf.len() - pos;
            if len > MAX_HEADER_LINE {
                return Err(ParseError::HeaderLineTooLong {
                    len,
                    limit: MAX_HEADER_LINE,
                });
            }
            return Ok(None);
        };
        let nl = pos + off;
        let mut line = &buf[pos..nl];
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        if line.len() > MAX_HEADER_LINE {
            return Err(ParseError::HeaderLineTooLong {
                len: line.len(),
                limit: MAX_HEADER_LINE,
            });
        }
        if line.is_empty() && pos > 0 {
            return Ok(Some((pos, nl + 1)));
        }
        pos = nl + 1;
    }
    Ok(None)
}

fn starts_with_sip(s: &str) -> bool {
    s.as_bytes()
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
}

/// Control characters other than HTAB (including a bare CR and DEL).
fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\t')
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    if has_control(line) {
        return Err(ParseError::BadStartLine(snippet(line)));
    }
    if starts_with_sip(line) {
        let (version, rest) = line
            .split_once(' ')
            .ok_or_else(|| ParseError::BadStartLine(snippet(line)))?;
        if !version.eq_ignore_ascii_case("SIP/2.0") {
            return Err(ParseError::UnsupportedVersion(snippet(version)));
        }
        let rest = rest.trim_start_matches(' ');
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::BadStatusCode(snippet(code)));
        }
        let status: u16 = code
            .parse()
            .map_err(|_| ParseError::BadStatusCode(snippet(code)))?;
        if !(100..=699).contains(&status) {
            return Err(ParseError::BadStatusCode(snippet(code)));
        }
        return Ok(StartLine::Response(status, reason.trim().to_string()));
    }
    let mut it = line.split_ascii_whitespace();
    let (Some(m), Some(uri), Some(version), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(ParseError::BadStartLine(snippet(line)));
    };
    let method: Method = m.parse()?;
    if !starts_with_sip(version) {
        return Err(ParseError::BadStartLine(snippet(line)));
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(ParseError::UnsupportedVersion(snippet(version)));
    }
    let scheme_ok = uri
        .split_once(':')
        .is_some_and(|(s, rest)| is_scheme(s) && !rest.is_empty());
    if !scheme_ok {
        return Err(ParseError::BadRequestUri(snippet(uri)));
    }
    Ok(StartLine::Request(method, uri.to_string()))
}

fn parse_header_lines<'a>(
    lines: impl Iterator<Item = &'a str>,
    lenient: bool,
) -> Result<Headers, ParseError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        // A bare CR, NUL or other control character inside a header line (RFC 3261 §25.1
        // allows only HTAB): another parser might split the line there, so refuse it.
        if has_control(line) {
            if lenient {
                continue;
            }
            return Err(ParseError::MalformedHeader(snippet(line)));
        }
        if line.starts_with([' ', '\t']) {
            match headers.last_mut() {
                Some((_, v)) => {
                    let cont = line.trim();
                    if !cont.is_empty() {
                        if !v.is_empty() {
                            v.push(' ');
                        }
                        v.push_str(cont);
                    }
                    if v.len() > MAX_HEADER_LINE {
                        return Err(ParseError::HeaderLineTooLong {
                            len: v.len(),
                            limit: MAX_HEADER_LINE,
                        });
                    }
                }
                None if lenient => {}
                None => return Err(ParseError::MalformedHeader(snippet(line))),
            }
            continue;
        }
        let parsed = line
            .split_once(':')
            .map(|(n, v)| (n.trim(), v.trim()))
            .filter(|(n, _)| is_token(n));
        match parsed {
            Some((n, v)) => {
                if headers.len() >= MAX_HEADERS {
                    return Err(ParseError::TooManyHeaders(MAX_HEADERS));
                }
                headers.push((n.to_string(), v.to_string()));
            }
            None if lenient => {}
            None => return Err(ParseError::MalformedHeader(snippet(line))),
        }
    }
    Ok(Headers(headers))
}

struct Head {
    start: StartLine,
    headers: Headers,
}

fn parse_head(head: &[u8]) -> Result<Head, ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| ParseError::InvalidUtf8)?;
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty());
    let first = lines.next().ok_or(ParseError::Empty)?;
    let start = parse_start_line(first)?;
    let headers = parse_header_lines(lines, false)?;
    validate(&start, &headers)?;
    Ok(Head { start, headers })
}

fn validate(start: &StartLine, h: &Headers) -> Result<(), ParseError> {
    h.content_length()?;
    // Single-instance headers must not repeat (RFC 3261 §7.3.1, RFC 4475 §3.1.2.19).
    for name in [
        "Call-ID",
        "CSeq",
        "From",
        "To",
        "Max-Forwards",
        "Content-Type",
    ] {
        let all = h.get_all(name);
        if all.len() > 1 {
            let header = match name {
                "Call-ID" => "Call-ID",
                "CSeq" => "CSeq",
                "From" => "From",
                "To" => "To",
                "Max-Forwards" => "Max-Forwards",
                _ => "Content-Type",
            };
            return Err(ParseError::InvalidHeader {
                header,
                value: format!("repeated {} times", all.len()),
            });
        }
    }
    match start {
        StartLine::Request(method, _) => {
            for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                match h.get(name) {
                    Some(v) if !v.trim().is_empty() => {}
                    Some(_) => {
                        return Err(ParseError::InvalidHeader {
                            header: name,
                            value: String::new(),
                        });
                    }
                    None => {
                        return Err(ParseError::MissingHeader(match name {
                            "Via" => "Via",
                            "From" => "From",
                            "To" => "To",
                            "Call-ID" => "Call-ID",
                            _ => "CSeq",
                        }));
                    }
                }
            }
            let cseq = h.cseq()?;
            if &cseq.method != method {
                return Err(ParseError::CSeqMethodMismatch {
                    method: method.to_string(),
                    cseq: cseq.method.to_string(),
                });
            }
            h.via_list()?;
            h.from()?;
            h.to()?;
            if let Some(mf) = h.get("Max-Forwards") {
                let t = mf.trim();
                // 1*DIGIT (RFC 3261 §25.1; RFC 4475 §3.1.1.1 has "0068"): leading zeros
                // are fine, the value must stay within three digits.
                let significant = t.trim_start_matches('0');
                if t.is_empty() || significant.len() > 3 || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid("Max-Forwards", mf));
                }
            }
        }
        StartLine::Response(..) => {
            if h.contains("CSeq") {
                h.cseq()?;
            }
            if h.contains("Via") {
                h.via_list()?;
            }
        }
    }
    Ok(())
}

fn build(head: Head, body: Vec<u8>) -> SipMessage {
    match head.start {
        StartLine::Request(method, uri) => SipMessage::Request(Request {
            method,
            uri,
            headers: head.headers,
            body,
        }),
        StartLine::Response(status, reason) => SipMessage::Response(Response {
            status,
            reason,
            headers: head.headers,
            body,
        }),
    }
}

/// Parses one UDP datagram. Content-Length is optional; when present it must
/// not exceed the bytes after the header section, and a smaller value
/// truncates the body.
pub fn parse_datagram(buf: &[u8]) -> Result<SipMessage, ParseError> {
    parse_datagram_limited(buf, MAX_MESSAGE_SIZE)
}

/// [`parse_datagram`] with a custom size limit (never above [`MAX_MESSAGE_SIZE`]).
pub fn parse_datagram_limited(buf: &[u8], max: usize) -> Result<SipMessage, ParseError> {
    let limit = max.min(MAX_MESSAGE_SIZE);
    if buf.len() > limit {
        return Err(ParseError::TooLarge {
            size: buf.len(),
            limit,
        });
    }
    let skip = leading_crlf(buf);
    let buf = &buf[skip..];
    if buf.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ParseError::Empty);
    }
    let (head_end, body_start) = scan_head(buf)?.ok_or(ParseError::UnterminatedHeaders)?;
    let head = parse_head(&buf[..head_end])?;
    let rest = &buf[body_start..];
    let body = match head.headers.content_length()? {
        Some(n) if n > rest.len() => {
            return Err(ParseError::ContentLengthExceedsBody {
                declared: n,
                available: rest.len(),
            });
        }
        Some(n) => rest[..n].to_vec(),
        None => rest.to_vec(),
    };
    Ok(build(head, body))
}

/// Parses one message from the front of a stream buffer. `Ok(None)`: more
/// bytes are needed. On success returns the message and the number of bytes
/// consumed (including any leading CRLF keep-alives). Content-Length is
/// mandatory (RFC 3261 §18.3).
pub fn parse_stream(buf: &[u8]) -> Result<Option<(SipMessage, usize)>, ParseError> {
    parse_stream_limited(buf, MAX_MESSAGE_SIZE)
}

/// [`parse_stream`] with a custom size limit (never above [`MAX_MESSAGE_SIZE`]).
pub fn parse_stream_limited(
    buf: &[u8],
    max: usize,
) -> Result<Option<(SipMessage, usize)>, ParseError> {
    let limit = max.min(MAX_MESSAGE_SIZE);
    let skip = leading_crlf(buf);
    let data = &buf[skip..];
    if data.is_empty() || data == b"\r" {
        return Ok(None);
    }
    // Reject a bad start line as soon as it is complete.
    if let Some(nl) = data.iter().position(|&b| b == b'\n') {
        let line = &data[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = std::str::from_utf8(line).map_err(|_| ParseError::InvalidUtf8)?;
        if line.len() > MAX_HEADER_LINE {
            return Err(ParseError::HeaderLineTooLong {
                len: line.len(),
                limit: MAX_HEADER_LINE,
            });
        }
        parse_start_line(text)?;
    }
    let Some((head_end, body_start)) = scan_head(data)? else {
        if data.len() > limit {
            return Err(ParseError::TooLarge {
                size: data.len(),
                limit,
            });
        }
        return Ok(None);
    };
    let head = parse_head(&data[..head_end])?;
    let cl = head
        .headers
        .content_length()?
        .ok_or(ParseError::MissingContentLength)?;
    let total = body_start.saturating_add(cl);
    if total > limit {
        return Err(ParseError::TooLarge { size: total, limit });
    }
    if data.len() < total {
        return Ok(None);
    }
    let body = data[body_start..total].to_vec();
    Ok(Some((build(head, body), skip + total)))
}

/// For a buffer that failed to parse: if it is clearly a request whose Via,
/// From, To, Call-ID and CSeq can be read, a `400 Bad Request` for it.
pub fn bad_request_for(buf: &[u8], why: &ParseError) -> Option<Response> {
    let buf = &buf[leading_crlf(buf)..];
    let buf = &buf[..buf.len().min(MAX_MESSAGE_SIZE)];
    let head_end = match scan_head(buf) {
        Ok(Some((end, _))) => end,
        _ => buf.len(),
    };
    let text = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty());
    let first = lines.next()?;
    let mut parts = first.split_ascii_whitespace();
    let (Some(m), Some(_uri), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !is_token(m) || !v.to_ascii_uppercase().starts_with("SIP/") {
        return None;
    }
    let headers = parse_header_lines(lines.take(MAX_HEADERS), true).ok()?;
    let mut r = Response::new(400, "Bad Request");
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        let vals = headers.get_all(name);
        if vals.is_empty() {
            return None;
        }
        for v in vals {
            r.headers.push(name, v);
        }
    }
    r.headers.push(
        "Warning",
        format!("399 - \"{}\"", why.to_string().replace('"', "'")),
    );
    Some(r)
}
