//! The strict parser of a transcript T2 as the record holds it (docs/PROTOCOL.md §2): the
//! handshake's own [`Tag`]s, in the handshake's order.

use super::AuditError;
use crate::handshake::{PROTOCOL_LABEL, Tag};

/// The fields of a transcript T2 (docs/PROTOCOL.md §2), parsed strictly: every field
/// once, in order, with the fixed lengths where the protocol fixes them, nothing after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedTranscript {
    pub call_id: String,
    pub from_tag: String,
    pub to_tag: String,
    pub caller: String,
    pub callee: String,
    pub offered_suites: Vec<u8>,
    pub nonce: [u8; 32],
    pub commitment: [u8; 32],
    pub caller_fingerprint: Vec<u8>,
    pub chosen_suite: u8,
    pub callee_public: [u8; 32],
    pub callee_fingerprint: Vec<u8>,
    pub caller_public: [u8; 32],
    /// The trust policy's id (1 signed, 2 psk, 3 opportunistic).
    pub auth_mode: u8,
    /// Where the callee's media listener was (the answer's `c=`/`m=`).
    pub callee_media: std::net::SocketAddr,
    /// Length of T1, the prefix the callee signed (everything before the caller's key).
    pub t1_len: usize,
}

/// The transcript's fields in their order (docs/PROTOCOL.md §2). T1, what the callee
/// signs, is everything before the caller's public key, which comes last.
const ORDER: [Tag; 18] = [
    Tag::Protocol,
    Tag::CallId,
    Tag::FromTag,
    Tag::ToTag,
    Tag::Caller,
    Tag::Callee,
    Tag::OfferedSuites,
    Tag::Nonce,
    Tag::Commitment,
    Tag::CallerFingerprint,
    Tag::ChosenSuite,
    Tag::CalleePublic,
    Tag::CalleeFingerprint,
    Tag::AuthMode,
    Tag::CallerRetainedIds,
    Tag::CalleeRetainedIds,
    Tag::CalleeMedia,
    Tag::CallerPublic,
];

impl ParsedTranscript {
    pub fn parse(t2: &[u8]) -> Result<ParsedTranscript, AuditError> {
        let bad = |m: String| AuditError::Transcript(m);
        let mut fields: Vec<&[u8]> = Vec::with_capacity(ORDER.len());
        let mut off = 0usize;
        let mut t1_len = 0usize;
        for tag in ORDER {
            let id = tag as u8;
            let head = t2
                .get(off..off + 3)
                .ok_or_else(|| bad(format!("it ends before field {id:#04x}")))?;
            if head[0] != id {
                return Err(bad(format!(
                    "field {id:#04x} expected at offset {off}, found tag {:#04x}",
                    head[0]
                )));
            }
            let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
            let value = t2
                .get(off + 3..off + 3 + len)
                .ok_or_else(|| bad(format!("field {id:#04x} is cut short")))?;
            if tag == Tag::CallerPublic {
                t1_len = off;
            }
            fields.push(value);
            off += 3 + len;
        }
        if off != t2.len() {
            return Err(bad(format!(
                "{} bytes after the last field",
                t2.len() - off
            )));
        }
        // Every tag of ORDER has its field now.
        let field = |tag: Tag| fields[ORDER.iter().position(|&t| t == tag).unwrap_or(0)];
        if field(Tag::Protocol) != PROTOCOL_LABEL {
            return Err(bad(format!(
                "the protocol label is not {}",
                String::from_utf8_lossy(PROTOCOL_LABEL)
            )));
        }
        let text = |tag: Tag, what: &str| {
            String::from_utf8(field(tag).to_vec())
                .map_err(|_| bad(format!("the {what} is not UTF-8")))
        };
        let fixed = |tag: Tag, what: &str| -> Result<[u8; 32], AuditError> {
            field(tag)
                .try_into()
                .map_err(|_| bad(format!("the {what} is not 32 bytes")))
        };
        let chosen = match field(Tag::ChosenSuite) {
            [c] => *c,
            _ => return Err(bad("the chosen suite is not one byte".into())),
        };
        Ok(ParsedTranscript {
            call_id: text(Tag::CallId, "Call-ID")?,
            from_tag: text(Tag::FromTag, "From tag")?,
            to_tag: text(Tag::ToTag, "To tag")?,
            caller: text(Tag::Caller, "caller")?,
            callee: text(Tag::Callee, "callee")?,
            offered_suites: field(Tag::OfferedSuites).to_vec(),
            nonce: fixed(Tag::Nonce, "nonce")?,
            commitment: fixed(Tag::Commitment, "commitment")?,
            caller_fingerprint: field(Tag::CallerFingerprint).to_vec(),
            chosen_suite: chosen,
            callee_public: fixed(Tag::CalleePublic, "callee public key")?,
            callee_fingerprint: field(Tag::CalleeFingerprint).to_vec(),
            auth_mode: match field(Tag::AuthMode) {
                [m] => *m,
                _ => return Err(bad("the trust policy is not one byte".into())),
            },
            callee_media: media(field(Tag::CalleeMedia))
                .ok_or_else(|| bad("the callee media address is not 7 or 19 bytes".into()))?,
            caller_public: fixed(Tag::CallerPublic, "caller public key")?,
            t1_len,
        })
    }
}

/// A transcript's callee media address ([`Tag::CalleeMedia`], the inverse of the
/// handshake's `media_field`).
fn media(v: &[u8]) -> Option<std::net::SocketAddr> {
    let port = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
    match v {
        [4, rest @ ..] if rest.len() == 6 => {
            let ip: [u8; 4] = rest[..4].try_into().ok()?;
            Some((ip, port(&rest[4..])).into())
        }
        [6, rest @ ..] if rest.len() == 18 => {
            let ip: [u8; 16] = rest[..16].try_into().ok()?;
            Some((ip, port(&rest[16..])).into())
        }
        _ => None,
    }
}
