//! What the sending relay checks before it believes an `accepted` receipt, and therefore
//! before it forgets a message.
//!
//! The signature alone proves only that the partner's key signed *some* receipt. The
//! checks bind it to this message and these calls:
//! - the signer is the key the call authenticated for the partner's domain (not any key
//!   of that domain, not the key of another partner);
//! - the hash, size, envelope sender and our queue ID are the message we sent;
//! - the call it names is one this message was sent on (so a receipt captured from another
//!   call, or for another message, cannot be replayed), with that call's transcript hash;
//! - it covers only recipients we asked for.
//!
//! A receipt for an earlier call of the same message is good: that is how a resend after a
//! lost connection gets the original receipt back (see [`super::dedup`]).

use super::{Kind, Receipt, same_addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the receipt is malformed: {0}")]
    Malformed(String),
    #[error("the receipt's signature does not verify: {0}")]
    BadSignature(String),
    #[error("the receipt is signed by {got}, not by {expected}, the key this call authenticated")]
    WrongKey { expected: String, got: String },
    #[error("the receipt is for another message: {0}")]
    OtherMessage(String),
    #[error("the receipt names a call this message was never sent on: {0}")]
    OtherCall(String),
    #[error("the receipt does not attest what was asked: {0}")]
    Mismatch(String),
}

/// A call a message was sent on, as the sender recorded it before sending DATA.
#[derive(Clone, Copy, Debug)]
pub struct CallRef<'a> {
    pub call_id: &'a str,
    /// SHA-256(T2) of that call, hex.
    pub transcript_sha256: &'a str,
}

/// What the sender knows, independently of the receipt.
#[derive(Clone, Copy, Debug)]
pub struct AcceptedExpectations<'a> {
    /// The partner's domain, and the fingerprint its key had on this call.
    pub receiver: &'a str,
    pub receiver_fingerprint: &'a str,
    /// Our domain.
    pub sender: &'a str,
    pub message_sha256: &'a str,
    pub message_size: u64,
    pub sender_queue_id: &'a str,
    pub mail_from: &'a str,
    /// The recipients we sent in this transaction.
    pub rcpts: &'a [String],
    /// Every call this message was sent on, oldest first.
    pub calls: &'a [CallRef<'a>],
}

/// Checks an `accepted` receipt whose signature has already been verified with the key
/// named by `receipt.receiver_fingerprint` (see [`super::Receipt`]). Returns the
/// recipients it covers, in our order.
pub fn check_accepted<'r>(
    receipt: &Receipt,
    exp: &AcceptedExpectations<'r>,
) -> Result<Vec<&'r str>, ReceiptError> {
    if receipt.kind != Kind::Accepted {
        return Err(ReceiptError::Mismatch(format!(
            "it is a {} receipt, not an accepted one",
            receipt.kind.as_str()
        )));
    }
    if !receipt
        .receiver_fingerprint
        .eq_ignore_ascii_case(exp.receiver_fingerprint)
    {
        return Err(ReceiptError::WrongKey {
            expected: exp.receiver_fingerprint.to_string(),
            got: receipt.receiver_fingerprint.clone(),
        });
    }
    if !receipt.receiver.eq_ignore_ascii_case(exp.receiver) {
        return Err(ReceiptError::Mismatch(format!(
            "it is issued by {}, not by {}",
            receipt.receiver, exp.receiver
        )));
    }
    if !receipt.sender.eq_ignore_ascii_case(exp.sender) {
        return Err(ReceiptError::OtherMessage(format!(
            "it names the sending relay {}, we are {}",
            receipt.sender, exp.sender
        )));
    }
    if receipt.sender_queue_id != exp.sender_queue_id {
        return Err(ReceiptError::OtherMessage(format!(
            "it names our queue ID {}, the message is {}",
            receipt.sender_queue_id, exp.sender_queue_id
        )));
    }
    if !receipt
        .message_sha256
        .eq_ignore_ascii_case(exp.message_sha256)
        || receipt.message_size != exp.message_size
    {
        return Err(ReceiptError::OtherMessage(format!(
            "it attests {} bytes with SHA-256 {}, we sent {} bytes with SHA-256 {}",
            receipt.message_size, receipt.message_sha256, exp.message_size, exp.message_sha256
        )));
    }
    if !same_addr(&receipt.mail_from, exp.mail_from) {
        return Err(ReceiptError::OtherMessage(format!(
            "it names the envelope sender <{}>, we sent <{}>",
            receipt.mail_from, exp.mail_from
        )));
    }
    match exp.calls.iter().find(|c| c.call_id == receipt.call_id) {
        None => {
            return Err(ReceiptError::OtherCall(format!(
                "Call-ID {}",
                receipt.call_id
            )));
        }
        Some(c)
            if !c
                .transcript_sha256
                .eq_ignore_ascii_case(&receipt.transcript_sha256) =>
        {
            return Err(ReceiptError::OtherCall(format!(
                "Call-ID {} had transcript {}, the receipt says {}",
                c.call_id, c.transcript_sha256, receipt.transcript_sha256
            )));
        }
        Some(_) => {}
    }
    // Recipients of the same message that we did not send in this transaction (a resend
    // after a partial failure) may be named by the original receipt; only the ones we
    // sent now are marked by it.
    let covered: Vec<&'r str> = exp
        .rcpts
        .iter()
        .filter(|ours| receipt.rcpts.iter().any(|r| same_addr(ours, r)))
        .map(String::as_str)
        .collect();
    if covered.is_empty() {
        return Err(ReceiptError::Mismatch(format!(
            "it covers none of the recipients we sent ({})",
            receipt.rcpts.join(", ")
        )));
    }
    Ok(covered)
}

/// Checks a `delivered` receipt (signature already verified with the key the call
/// authenticated) against the `accepted` receipts we stored for the message it names by
/// our queue ID. It must repeat one of them field for field (the same acceptance: the
/// receiver's queue ID, the call, the hash, the envelope, the commit time) and hand on only
/// recipients that acceptance covered. Returns the recipients handed on.
pub fn check_delivered(d: &Receipt, accepted: &[Receipt]) -> Result<Vec<String>, ReceiptError> {
    if d.kind != Kind::Delivered {
        return Err(ReceiptError::Mismatch(format!(
            "a {} receipt where delivered ones were fetched",
            d.kind.as_str()
        )));
    }
    let Some(a) = accepted
        .iter()
        .find(|a| a.queue_id == d.queue_id && a.call_id == d.call_id)
    else {
        return Err(ReceiptError::OtherMessage(format!(
            "it names their queue ID {} and call {}; no accepted receipt of our message {} does",
            d.queue_id, d.call_id, d.sender_queue_id
        )));
    };
    let differs: Vec<&str> = [
        ("receiver", !a.receiver.eq_ignore_ascii_case(&d.receiver)),
        ("sender", !a.sender.eq_ignore_ascii_case(&d.sender)),
        ("sender-queue-id", a.sender_queue_id != d.sender_queue_id),
        ("message-sha256", a.message_sha256 != d.message_sha256),
        ("message-size", a.message_size != d.message_size),
        ("message-id", a.message_id != d.message_id),
        ("mail-from", a.mail_from != d.mail_from),
        ("rcpt", a.rcpts != d.rcpts),
        (
            "committed-unix-ms",
            a.committed_unix_ms != d.committed_unix_ms,
        ),
        (
            "transcript-sha256",
            a.transcript_sha256 != d.transcript_sha256,
        ),
    ]
    .into_iter()
    .filter_map(|(name, bad)| bad.then_some(name))
    .collect();
    if !differs.is_empty() {
        return Err(ReceiptError::OtherMessage(format!(
            "it differs from the accepted receipt in {}",
            differs.join(", ")
        )));
    }
    let mut out = Vec::new();
    for h in &d.handoffs {
        if !a.rcpts.iter().any(|r| same_addr(r, &h.rcpt)) {
            return Err(ReceiptError::Mismatch(format!(
                "it hands on <{}>, a recipient the message was not accepted for",
                h.rcpt
            )));
        }
        out.push(h.rcpt.clone());
    }
    Ok(out)
}
