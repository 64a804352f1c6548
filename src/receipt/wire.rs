//! How receipts travel back through the call: extra lines of the `250` reply to the end
//! of DATA, in a transaction that asked for them with `MAIL ... XQID=<queue ID>` after
//! the server offered `XRECEIPT sipmail-receipt/1` in its EHLO reply (docs/PROTOCOL.md
//! §4b).
//!
//! ```text
//! 250-2.0.0 Ok: queued as 1A2B...
//! 250-2.0.0 XRECEIPT 1 T <base64 of the receipt text, in pieces of at most 300 characters>
//! 250-2.0.0 XRECEIPT 1 S <base64 of the detached signature>
//! 250 2.0.0 XRECEIPT END 1
//! ```
//!
//! Receipts are numbered from 1; the `T` and `S` pieces of each are concatenated in order.
//! The last line says how many there are, so a reply cut short or padded is refused.
//! Lines stay under RFC 5321's 512 octets. Sans-IO: text in, text out.

use super::ReceiptError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Base64 characters per line.
const PIECE: usize = 300;
/// Receipts in one reply, at most (a resend may be covered by several earlier ones).
pub const MAX_RECEIPTS: usize = crate::smtp::server::MAX_RECEIPTS_PER_REPLY;
/// Largest receipt text and signature accepted from a peer.
const MAX_TEXT: usize = 16 * 1024;
const MAX_SIG: usize = 2 * 1024;

/// One signed receipt as it travels: the canonical text and its detached signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub text: Vec<u8>,
    pub sig: Vec<u8>,
}

/// The text of the final reply: `first` (e.g. `Ok: queued as ID`), then the receipts.
/// Each line of the result is one reply line (joined with `\n`, as [`crate::smtp::Reply`]
/// wants).
pub fn reply_text(first: &str, receipts: &[Signed]) -> String {
    let mut out = String::from(first);
    for (i, r) in receipts.iter().enumerate() {
        for (tag, bytes) in [("T", &r.text), ("S", &r.sig)] {
            let b = B64.encode(bytes);
            for piece in b.as_bytes().chunks(PIECE) {
                out.push_str(&format!(
                    "\nXRECEIPT {} {tag} {}",
                    i + 1,
                    String::from_utf8_lossy(piece)
                ));
            }
        }
    }
    out.push_str(&format!("\nXRECEIPT END {}", receipts.len()));
    out
}

/// The receipts in a reply's lines (enhanced codes already removed). A reply without any
/// `XRECEIPT` line yields an empty list; anything malformed is an error.
pub fn parse_reply_lines<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<Signed>, ReceiptError> {
    let bad = |why: &str| ReceiptError::Malformed(format!("receipt lines in the reply: {why}"));
    let mut b64: Vec<(String, String)> = Vec::new();
    let mut end: Option<usize> = None;
    let mut any = false;
    for line in lines {
        let Some(rest) = line.strip_prefix("XRECEIPT ") else {
            if any {
                return Err(bad("another line among them"));
            }
            continue;
        };
        any = true;
        if end.is_some() {
            return Err(bad("a line after END"));
        }
        let mut w = rest.split(' ');
        let (Some(a), Some(b)) = (w.next(), w.next()) else {
            return Err(bad("a short line"));
        };
        if a == "END" {
            let n: usize = b.parse().map_err(|_| bad("END without a count"))?;
            if w.next().is_some() {
                return Err(bad("junk after END"));
            }
            end = Some(n);
            continue;
        }
        let i: usize = a.parse().map_err(|_| bad("no receipt number"))?;
        let (Some(piece), None) = (w.next(), w.next()) else {
            return Err(bad("a line without exactly one piece"));
        };
        if i == 0 || i > MAX_RECEIPTS {
            return Err(bad("receipt number out of range"));
        }
        if i == b64.len() + 1 {
            b64.push((String::new(), String::new()));
        } else if i != b64.len() {
            return Err(bad("receipts out of order"));
        }
        let cur = b64.last_mut().ok_or_else(|| bad("no receipt"))?;
        match b {
            "T" if cur.1.is_empty() => cur.0.push_str(piece),
            "S" => cur.1.push_str(piece),
            _ => return Err(bad("a T piece after the S pieces, or an unknown tag")),
        }
        if cur.0.len() > MAX_TEXT * 4 / 3 + 4 || cur.1.len() > MAX_SIG * 4 / 3 + 4 {
            return Err(bad("a receipt too large"));
        }
    }
    if !any {
        return Ok(Vec::new());
    }
    if end != Some(b64.len()) {
        return Err(bad("the count at END does not match (a reply cut short?)"));
    }
    b64.into_iter()
        .map(|(t, s)| {
            let text = B64.decode(t).map_err(|_| bad("bad base64"))?;
            let sig = B64.decode(s).map_err(|_| bad("bad base64"))?;
            if text.is_empty() || sig.is_empty() {
                return Err(bad("an empty receipt or signature"));
            }
            Ok(Signed { text, sig })
        })
        .collect()
}
