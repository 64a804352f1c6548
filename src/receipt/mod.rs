//! Signed receipts: what a receiving relay signs when it has made a message durable, and
//! what it signs again when it hands the message on (issue 14).
//!
//! A call's audit record proves *who* was on the channel; a receipt proves *which message*
//! crossed it. It is a small text document in a canonical form ([`Receipt::encode`]), signed
//! with a detached binary OpenPGP signature by the receiver's `mail@<domain>` key, so that
//! `gpg --verify receipt.asc receipt.txt` with the partner's cert is all an auditor needs.
//!
//! One file per job: this file is the document (fields, canonical text, strict parsing),
//! [`check`] is what the sending relay checks before it believes a receipt, and
//! [`dedup`] is the receiving relay's key for "already accepted", [`wire`] is how receipts
//! travel in the reply to DATA. Everything here is sans-IO (bytes and values in, values and
//! typed errors out) except [`store`], the files that keep receipts on both sides, and
//! `records`, the append-only logs under two of them.

pub mod check;
pub mod dedup;
mod records;
mod sign;
pub mod store;
mod text;
pub mod wire;

#[cfg(test)]
mod tests;

pub use check::{AcceptedExpectations, CallRef, ReceiptError, check_accepted, check_delivered};
pub use dedup::DedupKey;
pub use sign::{sign, verify};

/// The first line of every receipt this version writes. It also separates receipts from
/// every other thing the same key signs: the handshake's signed data starts with
/// `"sipmail/1 "`, and no receipt can be mistaken for it (or the other way round).
pub const RECEIPT_FORMAT: &str = "sipmail-receipt/1";

/// What a receipt attests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The receiver has the message on stable storage (written before its 250 to DATA).
    Accepted,
    /// The receiver has handed the message on for one recipient (Maildir or local MTA).
    Delivered,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Accepted => "accepted",
            Kind::Delivered => "delivered",
        }
    }
}

/// How one recipient's copy was handed on (only in a `delivered` receipt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// The recipient, as in the `rcpt` list.
    pub rcpt: String,
    /// Unix time in milliseconds.
    pub at_unix_ms: u64,
    /// What the receiver can show: `maildir <file name>` or `smtp <the MTA's reply>`.
    pub to: String,
}

/// One receipt. Every field is signed; [`Receipt::encode`] is the only spelling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub kind: Kind,
    /// The receiving relay's domain (it signs as `mail@<receiver>`).
    pub receiver: String,
    /// The primary fingerprint of the key that signs, upper-case hex.
    pub receiver_fingerprint: String,
    /// The sending relay's domain, as the call authenticated it.
    pub sender: String,
    /// SHA-256 of the message bytes exactly as received (after dot-unstuffing, before the
    /// receiver added its own trace header), lower-case hex.
    pub message_sha256: String,
    pub message_size: u64,
    /// The message's Message-ID header field body, if it had one (unfolded).
    pub message_id: Option<String>,
    /// The envelope sender; empty for the null sender `<>`.
    pub mail_from: String,
    /// The recipients the receiver accepted, in the order given.
    pub rcpts: Vec<String>,
    /// The sending relay's queue ID (half of the duplicate-suppression key).
    pub sender_queue_id: String,
    /// The receiver's own queue ID.
    pub queue_id: String,
    /// When the message became durable at the receiver, Unix milliseconds.
    pub committed_unix_ms: u64,
    /// The call it came through, and SHA-256(T2) of that call (its transcript hash).
    pub call_id: String,
    pub transcript_sha256: String,
    /// `delivered` receipts only: one entry per recipient handed on.
    pub handoffs: Vec<Handoff>,
}

impl Receipt {
    /// The canonical text that is signed. Line-based, UTF-8, LF endings; every field on
    /// its own line, in a fixed order; values percent-encoded so that no value can add a
    /// line or a field.
    pub fn encode(&self) -> Vec<u8> {
        text::encode(self)
    }

    /// Parses the canonical text strictly: the exact first line, every field once and in
    /// order, and bytes that re-encode to themselves (one receipt, one spelling).
    pub fn parse(bytes: &[u8]) -> Result<Receipt, ReceiptError> {
        text::parse(bytes)
    }

    /// SHA-256 of the canonical text, hex: how a `delivered` receipt or a log line names
    /// an `accepted` one.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.encode()))
    }

    /// The key under which the receiver remembers this message (see [`dedup`]).
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey::new(&self.sender, &self.sender_queue_id, &self.message_sha256)
    }
}

/// Two envelope addresses are the same recipient: the local part byte for byte (relays
/// pass it through unchanged), the domain case-insensitively.
pub(crate) fn same_addr(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}
