//! `delivered` receipts (issue 14), both sides. The receiving relay signs one when it hands
//! a partner's message on (Maildir file or local MTA reply) and appends it to that
//! partner's log; the sending relay fetches them through its next call (`XRECEIPT FETCH`,
//! docs/PROTOCOL.md §4b), checks each against the `accepted` receipt it stored for the
//! message, stores the good ones beside it, and acknowledges the batch.
//!
//! The decision is the pure `crate::receipt::check_delivered`; this file joins it to the
//! keyring, the store and the call's SMTP client.

use super::context::Context;
use super::receipts::sign;
use crate::receipt::store::DedupRecord;
use crate::receipt::wire::{MAX_RECEIPTS, parse_reply_lines};
use crate::receipt::{Kind, Receipt, ReceiptError, check_delivered};
use crate::smtp::{ClientError, SmtpClient};
use tokio::io::{AsyncRead, AsyncWrite};

/// Batches fetched in one go, at most (16 receipts each).
const MAX_BATCHES: usize = 8;

/// The `delivered` receipt for the recipients of our message `queue_id` handed on as
/// `handoffs`: the accepted receipt that covered them (from the duplicate record), with
/// the kind, the signing key of now and the hand-offs. `None` if no accepted receipt of
/// that queue entry is on record.
fn delivered_receipt(
    rec: &DedupRecord,
    queue_id: &str,
    own_fpr: &str,
    handoffs: Vec<crate::receipt::Handoff>,
) -> Option<Receipt> {
    let mut r = rec
        .receipts
        .iter()
        .filter_map(|s| Receipt::parse(s.text.as_bytes()).ok())
        .find(|r| r.kind == Kind::Accepted && r.queue_id == queue_id)?;
    r.kind = Kind::Delivered;
    r.receiver_fingerprint = own_fpr.to_string();
    r.handoffs = handoffs;
    Some(r)
}

/// Receiving side, after a partner's message was handed on: signs a `delivered` receipt
/// for the recipients in `handoffs` and appends it to the partner's log, for the partner
/// to fetch; not yet fdatasynced (see [`make_durable`], `Receipts::sync_delivered`).
/// Returns the partner whose log was written. A failure is an error in the log: the
/// message is delivered, only this proof of it is missing.
fn issue(
    ctx: &Context,
    peer: &str,
    key_file: &str,
    queue_id: &str,
    handoffs: Vec<crate::receipt::Handoff>,
) -> Option<String> {
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(%queue_id, %peer, error = %e,
            "ALERT: no delivered receipt for a partner's message that was handed on");
        None
    };
    // The record was written when the message came (it is in the page cache) and the
    // receipt is one line appended to the log: both on this thread, as the spool's
    // `.sending` marker is written, rather than two turns through the blocking pool
    // (docs/PERFORMANCE.md, run 25). The log's fdatasync is `make_durable`'s, on the pool.
    let rec = match ctx.receipts.store.dedup_file(key_file) {
        Ok(Some(r)) => r,
        Ok(None) => return fail(&"its duplicate record is gone"),
        Err(e) => return fail(&e),
    };
    let keys = ctx.keys();
    let n = handoffs.len();
    let Some(r) = delivered_receipt(&rec, queue_id, &keys.own_fpr_hex, handoffs) else {
        return fail(&"no accepted receipt of this queue entry in its duplicate record");
    };
    let signed = match sign(&keys, &r) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match ctx.receipts.store.append_delivered(peer, &signed) {
        Ok(()) => {
            ctx.metrics.delivered_receipt_issued(peer);
            tracing::info!(%queue_id, %peer, rcpts = n, sender_queue_id = %r.sender_queue_id,
                "delivered receipt signed, waiting for the partner to fetch it");
            Some(peer.to_string())
        }
        Err(e) => fail(&e),
    }
}

/// [`issue`] for a job of a partner's message (one that came with a receipt) whose
/// recipients in `handoffs` were handed on; `None` (nothing issued) for any other job.
pub(crate) fn issue_for(
    ctx: &Context,
    job: &super::outcome::Job,
    handoffs: Vec<crate::receipt::Handoff>,
) -> Option<String> {
    match (&job.dedup_key_file, &job.from_peer) {
        (Some(k), Some(peer)) if !handoffs.is_empty() => issue(ctx, peer, k, &job.id, handoffs),
        _ => None,
    }
}

/// fdatasyncs `peer`'s delivered log (group-committed with the other lanes).
pub(crate) async fn make_durable(ctx: &Context, peer: &str) {
    if let Err(e) = ctx.receipts.sync_delivered(peer).await {
        tracing::error!(%peer, error = %e,
            "cannot make the delivered-receipt log durable; a power cut could lose receipts");
    }
}

/// Sending side: fetches the delivered receipts `peer` holds for us through this call's
/// SMTP session, checks and stores each, and acknowledges every batch it could store. A
/// receipt that fails a check is an alarm (`ALERT`, `sipmail_delivered_receipts_refused_total`)
/// and is not stored; it is acknowledged all the same (the partner has nothing better to
/// send). A batch's receipts are written one by one and made durable by one fdatasync
/// before the acknowledgement; an I/O error storing one, or that fdatasync failing, leaves
/// the batch unacknowledged, to be fetched again.
/// Returns how many were stored, or `None` when another of our calls to `peer` is
/// fetching (one at a time: [`super::receipts::Receipts::claim_fetch`]); an error is the
/// session's (the call is broken).
pub(crate) async fn fetch<S>(
    ctx: &Context,
    peer: &str,
    client: &mut SmtpClient<S>,
) -> Result<Option<usize>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(_claim) = ctx.receipts.claim_fetch(peer) else {
        return Ok(None);
    };
    fetch_claimed(ctx, peer, client).await.map(Some)
}

async fn fetch_claimed<S>(
    ctx: &Context,
    peer: &str,
    client: &mut SmtpClient<S>,
) -> Result<usize, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut stored = 0;
    for _ in 0..MAX_BATCHES {
        let reply = client.receipts_fetch().await?;
        if !reply.is_positive() {
            tracing::debug!(%peer, reply = %super::outcome::one_line(&reply), "the partner has no delivered receipts to give");
            return Ok(stored);
        }
        let batch = match parse_reply_lines(reply.lines()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%peer, error = %e, "ALERT: the partner's delivered receipts are malformed; not acknowledged");
                ctx.metrics.delivered_receipt_checked(peer, false);
                return Ok(stored);
            }
        };
        let n = batch.len();
        for s in batch {
            let checked = match check_one(ctx, peer, &s.text, &s.sig).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(%peer, error = %e,
                        "cannot read our receipt record; the batch is fetched again on a later call");
                    return Ok(stored);
                }
            };
            match checked {
                Ok(r) => match ctx
                    .receipts
                    .add_delivered(&r.sender_queue_id, vec![s])
                    .await
                {
                    // Counted once: another call's fetch may have brought the same one.
                    Ok(0) => {}
                    Ok(new) => {
                        ctx.metrics.delivered_receipt_checked(peer, true);
                        ctx.event(super::events::RelayEvent::DeliveredReceipt {
                            id: r.sender_queue_id.clone(),
                        });
                        stored += new;
                        tracing::info!(queue_id = %r.sender_queue_id, %peer,
                            rcpts = %r.handoffs.iter().map(|h| h.rcpt.as_str()).collect::<Vec<_>>().join(","),
                            "delivered receipt verified and stored");
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %r.sender_queue_id, error = %e,
                            "cannot store a delivered receipt; it is fetched again on a later call");
                        return Ok(stored);
                    }
                },
                Err(e) => {
                    ctx.metrics.delivered_receipt_checked(peer, false);
                    tracing::error!(%peer, error = %e,
                        "ALERT: the partner's delivered receipt is refused and not stored");
                }
            }
        }
        if let Err(e) = ctx.receipts.sync_sent().await {
            tracing::error!(%peer, error = %e,
                "cannot make the stored delivered receipts durable; the batch is fetched again on a later call");
            return Ok(stored);
        }
        client.receipts_ack(n).await?;
        if n < MAX_RECEIPTS {
            break;
        }
    }
    Ok(stored)
}

/// Verifies one delivered receipt with a certificate we hold for `peer` (the one it
/// names: the partner may have rotated its key since the call that carried the message),
/// then checks it against the accepted receipts stored for the message it names. The outer
/// error is ours (reading our record failed: not the partner's fault, nothing is refused).
async fn check_one(
    ctx: &Context,
    peer: &str,
    text: &[u8],
    sig: &[u8],
) -> std::io::Result<Result<Receipt, ReceiptError>> {
    let keys = ctx.keys();
    let r = match Receipt::parse(text).and_then(|named| {
        crate::receipt::verify(&keys.keyring, peer, &named.receiver_fingerprint, text, sig)
    }) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if !crate::receipt::dedup::valid_queue_id(&r.sender_queue_id) {
        return Ok(Err(ReceiptError::OtherMessage(format!(
            "{:?} is not one of our queue IDs",
            r.sender_queue_id
        ))));
    }
    let accepted = ctx.receipts.accepted_of(&r.sender_queue_id).await?;
    if accepted.is_empty() {
        return Ok(Err(ReceiptError::OtherMessage(format!(
            "we hold no accepted receipt for our queue ID {}",
            r.sender_queue_id
        ))));
    }
    Ok(check_delivered(&r, &accepted).map(|_| r))
}
