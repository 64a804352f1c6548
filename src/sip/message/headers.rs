//! Header fields: the ordered [`Headers`] list, compact names, and the typed values
//! Via, CSeq and name-addr (RFC 3261 §7.3, §20).

use std::fmt;

use super::*;

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
pub struct Headers(pub(super) Vec<(String, String)>);

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
        self.list_values("Via")
    }
    /// Every value of a list header such as Record-Route or Route (RFC 3261 §7.3.1): all
    /// its lines in order, comma-combined values split (outside quotes and `<>`), trimmed.
    pub fn list_values(&self, name: &str) -> Vec<&str> {
        self.get_all(name)
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

pub(super) fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}
