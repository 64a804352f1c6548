//! The canonical transcript: a sequence of `tag (1 byte) || length (2 bytes, big endian)
//! || value` fields in a fixed order. Raw SDP text is never signed; only these fields are.

use super::{Answer, CallContext, HandshakeError, Offer, PROTOCOL_LABEL};

/// Field tags, in the order they must appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Protocol = 0x01,
    CallId = 0x02,
    FromTag = 0x03,
    ToTag = 0x04,
    Caller = 0x05,
    Callee = 0x06,
    OfferedSuites = 0x07,
    Nonce = 0x08,
    Commitment = 0x09,
    CallerFingerprint = 0x0a,
    ChosenSuite = 0x0b,
    CalleePublic = 0x0c,
    CalleeFingerprint = 0x0d,
    CallerPublic = 0x0e,
    AuthMode = 0x0f,
    CallerRetainedIds = 0x10,
    CalleeRetainedIds = 0x11,
    CalleeMedia = 0x12,
}

/// The callee's media address as a transcript value: `4 || 4 address bytes || port` or
/// `6 || 16 address bytes || port`, the port a u16 big endian (7 or 19 bytes).
pub fn media_field(a: std::net::SocketAddr) -> Vec<u8> {
    let mut v = Vec::with_capacity(19);
    match a.ip() {
        std::net::IpAddr::V4(ip) => {
            v.push(4);
            v.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            v.push(6);
            v.extend_from_slice(&ip.octets());
        }
    }
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

/// Encoded transcript bytes. T1 (what the callee signs) is a prefix of T2 (what the caller
/// signs and what the keys are derived from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript(Vec<u8>);

impl Transcript {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn push(&mut self, tag: Tag, field: &'static str, value: &[u8]) -> Result<(), HandshakeError> {
        let len = u16::try_from(value.len()).map_err(|_| HandshakeError::FieldTooLong {
            field,
            len: value.len(),
        })?;
        self.0.push(tag as u8);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(value);
        Ok(())
    }

    /// T1: everything known once the callee has answered.
    pub fn t1(ctx: &CallContext, offer: &Offer, answer: &Answer) -> Result<Self, HandshakeError> {
        let mut t = Transcript(Vec::with_capacity(512));
        t.push(Tag::Protocol, "protocol", PROTOCOL_LABEL)?;
        t.push(Tag::CallId, "Call-ID", ctx.call_id.as_bytes())?;
        t.push(Tag::FromTag, "From tag", ctx.from_tag.as_bytes())?;
        t.push(Tag::ToTag, "To tag", ctx.to_tag.as_bytes())?;
        t.push(Tag::Caller, "caller", ctx.caller.as_bytes())?;
        t.push(Tag::Callee, "callee", ctx.callee.as_bytes())?;
        let suites: Vec<u8> = offer.suites.iter().map(|s| s.id()).collect();
        t.push(Tag::OfferedSuites, "offered suites", &suites)?;
        t.push(Tag::Nonce, "nonce", &offer.nonce)?;
        t.push(Tag::Commitment, "commitment", &offer.commitment)?;
        t.push(
            Tag::CallerFingerprint,
            "caller fingerprint",
            &offer.fingerprint,
        )?;
        t.push(Tag::ChosenSuite, "chosen suite", &[answer.suite.id()])?;
        t.push(Tag::CalleePublic, "callee public key", &answer.public)?;
        t.push(
            Tag::CalleeFingerprint,
            "callee fingerprint",
            &answer.fingerprint,
        )?;
        t.push(Tag::AuthMode, "trust policy", &[offer.auth.id()])?;
        t.push(
            Tag::CallerRetainedIds,
            "caller retained-secret IDs",
            &offer.rs_ids.concat(),
        )?;
        t.push(
            Tag::CalleeRetainedIds,
            "callee retained-secret IDs",
            &answer.rs_ids.concat(),
        )?;
        t.push(
            Tag::CalleeMedia,
            "callee media address",
            &media_field(answer.media),
        )?;
        Ok(t)
    }

    /// T2 = T1 || the caller's ephemeral public key.
    pub fn extend_t2(&self, caller_public: &[u8; 32]) -> Result<Self, HandshakeError> {
        let mut t = self.clone();
        t.push(Tag::CallerPublic, "caller public key", caller_public)?;
        Ok(t)
    }
}
