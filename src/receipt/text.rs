//! The canonical text of a receipt, and its strict parser.
//!
//! ```text
//! sipmail-receipt/1
//! kind: accepted
//! receiver: site-b.test
//! receiver-fingerprint: 55F3DA9977922CDDB0D20F384D28F647410368C3
//! sender: site-a.test
//! message-sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! message-size: 4
//! message-id: <1@site-a.test>
//! mail-from: <alice@site-a.test>
//! rcpt: <bob@site-b.test>
//! sender-queue-id: 1A23BC69D0500001DC035
//! queue-id: 1A23BC69D0D000039B59B
//! committed-at: 2025-12-03T12:00:01Z
//! committed-unix-ms: 1764763201806
//! call-id: e79504c23c711be343cd5cb727d01575@site-a.test
//! transcript-sha256: d17f79417ce55ce295483ee78c752bbdee9a95b9e2f8663031b3c3f05fa47dfe
//! ```
//!
//! `message-id` is left out when the message had none; a `delivered` receipt adds, per
//! recipient handed on, `delivered-rcpt`, `delivered-at`, `delivered-unix-ms` and
//! `delivered-to`. Values are printable ASCII; a byte outside `0x21..=0x7e`, a `%`, and a
//! space at either end of a value are written `%XX`, so no value can start a line or a
//! field, and non-ASCII addresses (SMTPUTF8) survive byte for byte.
//!
//! Why not JSON: one signed spelling must exist per receipt, and an auditor reads it with
//! `cat`. JSON has many spellings of one object; this format has one, and the parser
//! refuses every other (it re-encodes what it read and compares).

use super::{Handoff, Kind, RECEIPT_FORMAT, Receipt, ReceiptError};
use crate::time::rfc3339;
use std::time::{Duration, UNIX_EPOCH};

fn escape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = String::with_capacity(b.len());
    for (i, &c) in b.iter().enumerate() {
        let edge_space = c == b' ' && (i == 0 || i + 1 == b.len());
        if (0x21..=0x7e).contains(&c) && c != b'%' || c == b' ' && !edge_space {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn unescape(field: &'static str, v: &str) -> Result<String, ReceiptError> {
    let bad = |why: &str| ReceiptError::Malformed(format!("{field}: {why}"));
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(|| bad("truncated %XX"))?;
            let s = std::str::from_utf8(hex).map_err(|_| bad("bad %XX"))?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| bad("bad %XX"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8 once decoded"))
}

fn at(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

pub(super) fn encode(r: &Receipt) -> Vec<u8> {
    let mut s = String::with_capacity(1024);
    let mut line = |k: &str, v: &str| {
        s.push_str(k);
        s.push_str(": ");
        s.push_str(&escape(v));
        s.push('\n');
    };
    line("kind", r.kind.as_str());
    line("receiver", &r.receiver);
    line("receiver-fingerprint", &r.receiver_fingerprint);
    line("sender", &r.sender);
    line("message-sha256", &r.message_sha256);
    line("message-size", &r.message_size.to_string());
    if let Some(id) = &r.message_id {
        line("message-id", id);
    }
    line("mail-from", &format!("<{}>", r.mail_from));
    for rc in &r.rcpts {
        line("rcpt", &format!("<{rc}>"));
    }
    line("sender-queue-id", &r.sender_queue_id);
    line("queue-id", &r.queue_id);
    line("committed-at", &at(r.committed_unix_ms));
    line("committed-unix-ms", &r.committed_unix_ms.to_string());
    line("call-id", &r.call_id);
    line("transcript-sha256", &r.transcript_sha256);
    for h in &r.handoffs {
        line("delivered-rcpt", &format!("<{}>", h.rcpt));
        line("delivered-at", &at(h.at_unix_ms));
        line("delivered-unix-ms", &h.at_unix_ms.to_string());
        line("delivered-to", &h.to);
    }
    let mut out = Vec::with_capacity(s.len() + RECEIPT_FORMAT.len() + 1);
    out.extend_from_slice(RECEIPT_FORMAT.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(s.as_bytes());
    out
}

/// Reads `name: value` lines in the one allowed order.
struct Lines<'a> {
    lines: std::iter::Peekable<std::str::Split<'a, char>>,
}

impl<'a> Lines<'a> {
    fn peek_is(&mut self, name: &str) -> bool {
        self.lines
            .peek()
            .and_then(|l| l.split_once(": "))
            .is_some_and(|(k, _)| k == name)
    }

    fn take(&mut self, name: &'static str) -> Result<String, ReceiptError> {
        let l = self.lines.next().filter(|l| !l.is_empty()).ok_or_else(|| {
            ReceiptError::Malformed(format!("the field {name} is missing (receipt ends early)"))
        })?;
        match l.split_once(": ") {
            Some((k, v)) if k == name => unescape(name, v),
            Some((k, _)) => Err(ReceiptError::Malformed(format!(
                "expected the field {name}, found {}",
                escape(k)
            ))),
            None => Err(ReceiptError::Malformed(format!(
                "expected the field {name}, found a line without \": \""
            ))),
        }
    }

    fn number(&mut self, name: &'static str) -> Result<u64, ReceiptError> {
        let v = self.take(name)?;
        v.parse().map_err(|_| {
            ReceiptError::Malformed(format!("{name}: \"{}\" is not a number", escape(&v)))
        })
    }

    fn address(&mut self, name: &'static str) -> Result<String, ReceiptError> {
        let v = self.take(name)?;
        v.strip_prefix('<')
            .and_then(|v| v.strip_suffix('>'))
            .map(str::to_string)
            .ok_or_else(|| ReceiptError::Malformed(format!("{name}: expected <address>")))
    }
}

pub(super) fn parse(bytes: &[u8]) -> Result<Receipt, ReceiptError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| ReceiptError::Malformed("not UTF-8 text".into()))?;
    let body = text
        .strip_prefix(RECEIPT_FORMAT)
        .and_then(|t| t.strip_prefix('\n'))
        .ok_or_else(|| {
            ReceiptError::Malformed(format!("the first line is not \"{RECEIPT_FORMAT}\""))
        })?;
    let body = body
        .strip_suffix('\n')
        .ok_or_else(|| ReceiptError::Malformed("the last line does not end with LF".into()))?;
    let mut l = Lines {
        lines: body.split('\n').peekable(),
    };
    let kind = match l.take("kind")?.as_str() {
        "accepted" => Kind::Accepted,
        "delivered" => Kind::Delivered,
        other => {
            return Err(ReceiptError::Malformed(format!(
                "kind: \"{}\" is neither accepted nor delivered",
                escape(other)
            )));
        }
    };
    let receiver = l.take("receiver")?;
    let receiver_fingerprint = l.take("receiver-fingerprint")?;
    let sender = l.take("sender")?;
    let message_sha256 = l.take("message-sha256")?;
    let message_size = l.number("message-size")?;
    let message_id = if l.peek_is("message-id") {
        Some(l.take("message-id")?)
    } else {
        None
    };
    let mail_from = l.address("mail-from")?;
    let mut rcpts = vec![l.address("rcpt")?];
    while l.peek_is("rcpt") {
        rcpts.push(l.address("rcpt")?);
    }
    let sender_queue_id = l.take("sender-queue-id")?;
    let queue_id = l.take("queue-id")?;
    let _committed_at = l.take("committed-at")?;
    let committed_unix_ms = l.number("committed-unix-ms")?;
    let call_id = l.take("call-id")?;
    let transcript_sha256 = l.take("transcript-sha256")?;
    let mut handoffs = Vec::new();
    while l.peek_is("delivered-rcpt") {
        let rcpt = l.address("delivered-rcpt")?;
        let _ = l.take("delivered-at")?;
        let at_unix_ms = l.number("delivered-unix-ms")?;
        let to = l.take("delivered-to")?;
        handoffs.push(Handoff {
            rcpt,
            at_unix_ms,
            to,
        });
    }
    if let Some(extra) = l.lines.next() {
        return Err(ReceiptError::Malformed(format!(
            "unexpected line after the last field: \"{}\"",
            escape(extra.get(..60).unwrap_or(extra))
        )));
    }
    let r = Receipt {
        kind,
        receiver,
        receiver_fingerprint,
        sender,
        message_sha256,
        message_size,
        message_id,
        mail_from,
        rcpts,
        sender_queue_id,
        queue_id,
        committed_unix_ms,
        call_id,
        transcript_sha256,
        handoffs,
    };
    match (r.kind, r.handoffs.is_empty()) {
        (Kind::Accepted, false) => {
            return Err(ReceiptError::Malformed(
                "an accepted receipt names deliveries".into(),
            ));
        }
        (Kind::Delivered, true) => {
            return Err(ReceiptError::Malformed(
                "a delivered receipt names no delivery".into(),
            ));
        }
        _ => {}
    }
    // One spelling per receipt: the derived fields (times), the escapes and the number
    // formats must be exactly what encode() writes.
    if r.encode() != bytes {
        return Err(ReceiptError::Malformed(
            "not in canonical form (a derived time, an escape or a number is spelled differently)"
                .into(),
        ));
    }
    Ok(r)
}
