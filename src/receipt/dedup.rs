//! Exactly once: how the receiving relay recognises a message it has already accepted.
//!
//! A sender that lost the connection after sending the final `.` cannot know whether the
//! receiver committed the message; it must send it again. The receiver remembers, for a
//! window at least as long as the sender's maximum queue age, every recipient it accepted
//! under the key (sending relay's domain, sending relay's queue ID, SHA-256 of the bytes).
//!
//! - The queue ID alone is not enough: it is the sender's, and a buggy or restored sender
//!   could reuse one for other content. The body hash alone is not enough: two different
//!   messages with identical bytes (a daily report) are two messages.
//! - The sending domain is the one the call authenticated, never a value the sender
//!   states, so one partner cannot suppress another partner's mail.
//! - The hash is of the bytes the receiver itself received, not a value the sender claims.
//!
//! A resend whose recipients were all accepted before gets the original receipt(s) back
//! and is not queued again. Recipients not seen before are queued as a new message with a
//! new receipt. [`plan`] makes that decision; the store that remembers is the driver's.

use sha2::Digest;

/// The key of one accepted message (see the module text).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub sender: String,
    pub sender_queue_id: String,
    pub message_sha256: String,
}

impl DedupKey {
    pub fn new(sender: &str, sender_queue_id: &str, message_sha256: &str) -> DedupKey {
        DedupKey {
            sender: sender.to_ascii_lowercase(),
            sender_queue_id: sender_queue_id.to_string(),
            message_sha256: message_sha256.to_ascii_lowercase(),
        }
    }

    /// A file name for the key: hex SHA-256 over the three parts, NUL-separated. The
    /// queue ID comes from the peer, so it never becomes part of a path as it is.
    pub fn file_name(&self) -> String {
        let mut h = sha2::Sha256::new();
        h.update(self.sender.as_bytes());
        h.update([0]);
        h.update(self.sender_queue_id.as_bytes());
        h.update([0]);
        h.update(self.message_sha256.as_bytes());
        hex::encode(h.finalize())
    }
}

/// Whether a sender's queue ID is acceptable as half of a key: 1 to 64 characters of
/// `[A-Za-z0-9._-]` (Postfix's and sipmail's IDs are all of this form).
pub fn valid_queue_id(id: &str) -> bool {
    crate::smtp::server::valid_queue_id(id)
}

/// One recipient remembered under a key, and the receipt that covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub rcpt: String,
    /// [`super::Receipt::digest`] of the `accepted` receipt that covers it.
    pub receipt_digest: String,
}

/// What to do with a message whose key matched earlier acceptances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Recipients to queue now (a new receipt covers them). Empty: queue nothing.
    pub new_rcpts: Vec<String>,
    /// Earlier receipts to send back (digests, each once, in first-seen order).
    pub prior_receipts: Vec<String>,
}

/// Splits the recipients accepted in this transaction into those seen before under the
/// same key and those not. Addresses compare as the SMTP layer accepted them (the domain
/// case-insensitively).
pub fn plan(accepted: &[String], remembered: &[Remembered]) -> Plan {
    let mut p = Plan::default();
    for r in accepted {
        match remembered.iter().find(|m| super::same_addr(&m.rcpt, r)) {
            Some(m) => {
                if !p.prior_receipts.contains(&m.receipt_digest) {
                    p.prior_receipts.push(m.receipt_digest.clone());
                }
            }
            None => p.new_rcpts.push(r.clone()),
        }
    }
    p
}
