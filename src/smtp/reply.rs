//! SMTP replies: the wire form (server side) and a pure, bounded parser
//! for multi-line replies (client side).

use std::fmt;

/// An SMTP reply: a three-digit code, an optional RFC 3463 enhanced status
/// code, and text. Multi-line text is separated by `'\n'` in [`Reply::text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<(u8, u16, u16)>,
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO/HELO answers).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            text: text.into(),
        }
    }

    /// `250 2.0.0 <text>`
    pub fn ok(text: impl Into<String>) -> Self {
        Reply::new(250, (2, 0, 0), text)
    }

    /// `451 4.3.0 <text>`: local error, try again later.
    pub fn temp_failure(text: impl Into<String>) -> Self {
        Reply::new(451, (4, 3, 0), text)
    }

    /// `452 4.3.1`: the queue's disk is full (RFC 3463 4.3.1, "mail system full"): a
    /// reason for the client to retry later, never to bounce.
    pub fn storage_full() -> Self {
        Reply::new(
            452,
            (4, 3, 1),
            "insufficient system storage: the queue's disk is full, try again later",
        )
    }

    /// The answer to a failed spool write: 452 4.3.1 when the disk (or a quota) is full,
    /// wherever in the write it showed (create, write, flush, fsync, rename), else
    /// `451 4.3.0`.
    pub fn spool_write_failed(e: &std::io::Error) -> Self {
        if is_storage_full(e) {
            Reply::storage_full()
        } else {
            Reply::temp_failure("Local error: cannot write to the queue, try again later")
        }
    }

    /// `550 5.7.1 <text>`: relay / policy denial.
    pub fn relay_denied(text: impl Into<String>) -> Self {
        Reply::new(550, (5, 7, 1), text)
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx (and anything out of range, which is never a success).
    pub fn is_permanent(&self) -> bool {
        !self.is_positive() && !self.is_transient()
    }

    /// The text lines (at least one, possibly empty).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n').map(|l| l.trim_end_matches('\r'))
    }

    /// Appends the wire form to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
    }
}

/// Wire form: every line `CODE-[x.y.z ]text\r\n`, the last one with a space.
/// CR and other control characters in the text are replaced by spaces so a
/// backend-supplied text can never inject extra reply lines.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.code.min(999);
        let lines: Vec<&str> = self.lines().collect();
        let n = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            write!(f, "{code:03}{sep}")?;
            if let Some((a, b, c)) = self.enhanced {
                write!(f, "{a}.{b}.{c}")?;
                if !line.is_empty() {
                    f.write_str(" ")?;
                }
            }
            for ch in line.chars() {
                if ch.is_control() {
                    f.write_str(" ")?;
                } else {
                    write!(f, "{ch}")?;
                }
            }
            f.write_str("\r\n")?;
        }
        Ok(())
    }
}

/// Limits for [`parse_reply`].
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimits {
    /// Longest accepted line, including the line ending.
    pub max_line: usize,
    /// Largest accepted reply, all lines together.
    pub max_total: usize,
}

impl Default for ReplyLimits {
    fn default() -> Self {
        ReplyLimits {
            max_line: 4096,
            max_total: 64 * 1024,
        }
    }
}

/// Why a reply could not be parsed. Carries the offending line, truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyParseError(pub String);

impl fmt::Display for ReplyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The disk or a quota is full: a write error the client should hear as 452 4.3.1.
pub fn is_storage_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded)
}

/// Printable, truncated rendering of peer bytes for error messages.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let mut s = String::new();
    for &b in bytes.iter().take(MAX) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

type EnhancedCode = (u8, u16, u16);

fn parse_enhanced(text: &str, code: u16) -> Option<(EnhancedCode, &str)> {
    let (word, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    let mut parts = word.split('.');
    let a = parts.next()?;
    let b = parts.next()?;
    let c = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !(digits(a, 1) && digits(b, 3) && digits(c, 3)) {
        return None;
    }
    let a: u8 = a.parse().ok()?;
    if u16::from(a) != code / 100 || !matches!(a, 2 | 4 | 5) {
        return None;
    }
    Some(((a, b.parse().ok()?, c.parse().ok()?), rest))
}

/// Parses one complete (possibly multi-line) reply from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((reply, consumed)))`
/// when a full reply is there. Lines end in CRLF (a bare LF is tolerated).
/// An enhanced status code is recognised when every line carries one.
pub fn parse_reply(
    buf: &[u8],
    limits: ReplyLimits,
) -> Result<Option<(Reply, usize)>, ReplyParseError> {
    let mut pos = 0usize;
    let mut code: Option<u16> = None;
    let mut lines: Vec<&str> = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() >= limits.max_line {
                return Err(ReplyParseError(format!(
                    "reply line too long: {}",
                    excerpt(rest)
                )));
            }
            if pos + rest.len() > limits.max_total {
                return Err(ReplyParseError(format!(
                    "reply too long: {}",
                    excerpt(rest)
                )));
            }
            return Ok(None);
        };
        let raw = &rest[..=nl];
        if raw.len() > limits.max_line {
            return Err(ReplyParseError(format!(
                "reply line too long: {}",
                excerpt(raw)
            )));
        }
        pos += raw.len();
        if pos > limits.max_total {
            return Err(ReplyParseError(format!("reply too long: {}", excerpt(raw))));
        }
        let mut line = &raw[..raw.len() - 1];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        let bad = || ReplyParseError(format!("malformed reply line: {}", excerpt(raw)));
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let this_code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..=599).contains(&this_code) {
            return Err(bad());
        }
        if code.is_some_and(|c| c != this_code) {
            return Err(ReplyParseError(format!(
                "reply code changed in multi-line reply: {}",
                excerpt(raw)
            )));
        }
        code = Some(this_code);
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(bad()),
        };
        let text = std::str::from_utf8(text).map_err(|_| bad())?;
        lines.push(text);
        if last {
            break;
        }
    }
    let code = code.unwrap_or(0);
    // Enhanced codes: only when every line has one of the right class.
    let parsed: Vec<Option<(EnhancedCode, &str)>> =
        lines.iter().map(|l| parse_enhanced(l, code)).collect();
    let reply = if parsed.iter().all(Option::is_some) {
        let first = parsed.first().and_then(|p| p.map(|(e, _)| e));
        let text: Vec<&str> = parsed.iter().flatten().map(|(_, t)| *t).collect();
        Reply {
            code,
            enhanced: first,
            text: text.join("\n"),
        }
    } else {
        Reply {
            code,
            enhanced: None,
            text: lines.join("\n"),
        }
    };
    Ok(Some((reply, pos)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_452_wherever_the_write_failed_other_errors_451() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::StorageFull, ErrorKind::QuotaExceeded] {
            let r = Reply::spool_write_failed(&Error::from(kind));
            assert_eq!((r.code, r.enhanced), (452, Some((4, 3, 1))), "{kind:?}");
        }
        let r = Reply::spool_write_failed(&Error::from_raw_os_error(28)); // ENOSPC from fsync
        assert_eq!(r.code, 452);
        let r = Reply::spool_write_failed(&Error::from(ErrorKind::PermissionDenied));
        assert_eq!((r.code, r.enhanced), (451, Some((4, 3, 0))));
    }

    #[test]
    fn display_single_and_multi() {
        assert_eq!(Reply::ok("Ok").to_string(), "250 2.0.0 Ok\r\n");
        let r = Reply::plain(250, "host\nPIPELINING\nSIZE 10");
        assert_eq!(
            r.to_string(),
            "250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        let r = Reply::new(550, (5, 7, 1), "a\r\n999 injected");
        assert_eq!(r.to_string(), "550-5.7.1 a\r\n550 5.7.1 999 injected\r\n");
        let r = Reply::new(451, (4, 3, 0), "x\ty\u{7}");
        assert_eq!(r.to_string(), "451 4.3.0 x y \r\n");
    }

    #[test]
    fn parse_roundtrip() {
        for r in [
            Reply::ok("Ok: queued as ABC"),
            Reply::plain(250, "host\nPIPELINING\nSIZE 10"),
            Reply::new(550, (5, 7, 1), "relay\ndenied"),
            Reply::plain(220, ""),
        ] {
            let wire = r.to_string();
            let (p, n) = parse_reply(wire.as_bytes(), ReplyLimits::default())
                .unwrap()
                .unwrap();
            assert_eq!(n, wire.len());
            assert_eq!(p, r);
        }
    }

    #[test]
    fn parse_incomplete_and_errors() {
        let l = ReplyLimits::default();
        assert_eq!(parse_reply(b"250-a\r\n250 b", l).unwrap(), None);
        assert_eq!(parse_reply(b"", l).unwrap(), None);
        assert!(parse_reply(b"25x ok\r\n", l).is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n", l).is_err());
        assert!(parse_reply(b"250_a\r\n", l).is_err());
        assert!(parse_reply(b"hello\r\n", l).is_err());
        assert!(parse_reply(b"100 x\r\n", l).is_err());
        let long = vec![b'2'; 5000];
        let e = parse_reply(&long, l).unwrap_err();
        assert!(e.0.len() < 200, "{}", e.0);
        let mut many = Vec::new();
        for _ in 0..3000 {
            many.extend_from_slice(b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
        }
        assert!(parse_reply(&many, l).is_err());
        // bare code, bare LF tolerated
        let (r, n) = parse_reply(b"250\n", l).unwrap().unwrap();
        assert_eq!((r.code, r.text.as_str(), n), (250, "", 4));
    }

    #[test]
    fn enhanced_class_must_match() {
        let l = ReplyLimits::default();
        let (r, _) = parse_reply(b"250 5.1.1 x\r\n", l).unwrap().unwrap();
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "5.1.1 x");
        let (r, _) = parse_reply(b"250-8BITMIME\r\n250 SIZE 1\r\n", l)
            .unwrap()
            .unwrap();
        assert_eq!(r.enhanced, None);
    }
}
