//! The parser: one UDP datagram or the front of a TCP stream into a [`SipMessage`],
//! with the size and header limits, and the `400` for a request that cannot be parsed.

use super::headers::is_scheme;
use super::*;

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
