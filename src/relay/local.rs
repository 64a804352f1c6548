//! Delivery without a call: mail for our own domain into the Maildir or by SMTP to the
//! site's MTA, and mail on an SMTP route (`smtp:[host]:port`, the default route) to its
//! next hop. Both SMTP destinations share one client path with connection caching.

use super::context::Context;
use super::handoff::{SmtpHop, handoff};
use super::jobs::Lane;
use super::outcome::{Job, RcptOutcome, route_label};
use crate::config::Delivery;
use crate::queue::HandoffNote;
use crate::receipt::Handoff;
use crate::smtp::SmtpClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long a connection to the local MTA or a next hop is kept open for the next message.
const SMTP_IDLE: Duration = Duration::from_secs(5);

/// Where a lane without calls hands its mail.
#[derive(Clone, Debug)]
pub(crate) enum Destination {
    Maildir(std::path::PathBuf),
    Smtp(SmtpHop),
}

impl From<Delivery> for Destination {
    fn from(d: Delivery) -> Self {
        match d {
            Delivery::Maildir(dir) => Destination::Maildir(dir),
            Delivery::Smtp(addr) => Destination::Smtp(SmtpHop::Mta(addr)),
        }
    }
}

/// One lane of local delivery or of an SMTP next hop. By SMTP it keeps its connection
/// open between messages, as Postfix's smtp client does with connection caching; with a
/// hand-off agent (the daemon's normal way) the agent keeps it.
pub(crate) async fn worker(ctx: Arc<Context>, dest: Destination, lane: Lane) {
    let mut conn: Option<SmtpClient<TcpStream>> = None;
    let agent = ctx.agent.as_ref().map(|a| (a, a.lane_id()));
    loop {
        let job = tokio::select! {
            j = lane.next() => j,
            _ = tokio::time::sleep(SMTP_IDLE), if conn.is_some() => {
                if let Some(c) = conn.take() {
                    let _ = c.quit().await;
                }
                continue;
            }
        };
        let Some(job) = job else { break };
        // A partner's message may leave the spool after this attempt: its duplicate record
        // (written without fsync when the message came) must be durable before the report.
        // Its fdatasync runs while the message is handed over, not before (it was on the
        // warm latency's path), and is waited for once the MTA's answer is noted, so that
        // nothing slow sits between the MTA's 250 and that note (a crash there is what
        // makes the MTA get the message twice).
        // The intake hands a partner's message over while it commits it, and writes the
        // record after that, under the key's lock: waiting for the lock is waiting for the
        // record (`inbound`'s `commit_with_receipt`). The hand-off does not wait.
        let dedup = job.dedup_key_file.clone().map(|k| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                drop(ctx.receipts.lock_file(&k).await);
                ctx.receipts.sync_dedup(k).await
            })
        });
        ctx.spool.begin_send(&job.id, &job.route, None);
        let sending = tokio::time::Instant::now();
        // What each recipient's hand-off was, for a partner's delivered receipt.
        let mut handoffs = Vec::new();
        let mut noted = false;
        let outcomes = match to_inbox(&ctx, &job).await {
            Err(failed) => failed,
            Ok(()) => match (&dest, agent) {
                (Destination::Maildir(dir), _) => to_maildir(&ctx, dir, &job, &mut handoffs).await,
                (Destination::Smtp(hop), Some((agent, lane_id))) => {
                    let hostname = ctx.settings().site.hostname.clone();
                    match agent.hand_off(lane_id, &hostname, hop, &job).await {
                        Ok(r) => {
                            (handoffs, noted) = (r.handoffs, r.noted);
                            r.outcomes
                        }
                        Err(e) => after_lost_agent(&ctx, &job, e, &mut handoffs, &mut noted),
                    }
                }
                (Destination::Smtp(hop), None) => {
                    let hostname = ctx.settings().site.hostname.clone();
                    let body = ctx.spool.body_path(&job.id);
                    super::handoff::to_smtp(&hostname, hop, &job, &body, &mut conn, &mut handoffs)
                        .await
                }
            },
        };
        // First of all, before signing or reporting: note what the next hop took, so that
        // a kill from here on replays this outcome instead of handing the message over again.
        if let Some(h) = super::handoff::handed(&job, &outcomes, &handoffs).filter(|_| !noted)
            && let Err(e) = ctx.spool.handed(&h)
        {
            tracing::warn!(queue_id = %job.id, error = %e,
                "cannot note the hand-off; if sipmail stops before the outcome is recorded, the message may arrive twice");
        }
        if let Some(synced) = dedup {
            let r = synced
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = r {
                tracing::error!(queue_id = %job.id, error = %e,
                    "cannot make the duplicate record durable; a resend after a crash could be delivered twice");
            }
        }
        let handoffs: Vec<Handoff> = handoffs.iter().map(handoff_of).collect();
        ctx.metrics
            .transferred(route_label(&job.route), sending.elapsed());
        // The delivered receipt is signed and written (a kill -9 cannot lose a written
        // line) before the report, and fdatasynced after it (the report is not kept waiting
        // for the disk; only a power cut in between could lose the receipt, not the mail).
        let issued = super::delivered::issue_for(&ctx, &job, handoffs);
        lane.report(job, outcomes).await;
        if let Some(peer) = issued {
            super::delivered::make_durable(&ctx, &peer).await;
        }
    }
    if let Some(c) = conn.take() {
        let _ = c.quit().await;
    }
}

/// A partner's message for local delivery whose `[[peer]] inbox` is set: its attachments
/// go there first (see `inbox`). An I/O error (a full disk) fails the whole delivery for
/// now, so it is retried; a refused file name is logged and the message still delivered.
async fn to_inbox(ctx: &Context, job: &Job) -> Result<(), Vec<(String, RcptOutcome)>> {
    let (crate::queue::Route::Local, Some(peer)) = (&job.route, &job.from_peer) else {
        return Ok(());
    };
    let Some(dir) = ctx.settings().site.peer(peer).and_then(|p| p.inbox.clone()) else {
        return Ok(());
    };
    let (id, body) = (job.id.clone(), ctx.spool.body_path(&job.id));
    let d = dir.clone();
    let r = tokio::task::spawn_blocking(move || super::inbox::write_attachments(&d, &id, &body))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    match r {
        Ok(written) => {
            for w in written {
                match w {
                    super::inbox::Written::File(p) => {
                        tracing::info!(queue_id = %job.id, %peer, file = %p.display(), "attachment in the inbox")
                    }
                    super::inbox::Written::Refused(e) => {
                        tracing::error!(queue_id = %job.id, %peer, inbox = %dir.display(), reason = %e,
                            "attachment not written to the inbox (the message is still delivered to the mailbox)")
                    }
                }
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(queue_id = %job.id, %peer, inbox = %dir.display(), error = %e,
                "cannot write to the inbox; the delivery is retried");
            Err(job.all(RcptOutcome::Transient(format!(
                "cannot write to the inbox {}: {e}",
                dir.display()
            ))))
        }
    }
}

/// The agent stopped before it answered: what its note in the marker says, if it got as
/// far as writing one, else a transient failure (sent again later: the one case left
/// where the next hop may get the message twice).
fn after_lost_agent(
    ctx: &Context,
    job: &Job,
    error: String,
    handoffs: &mut Vec<HandoffNote>,
    noted: &mut bool,
) -> Vec<(String, RcptOutcome)> {
    let Some(h) = ctx.spool.noted(&job.id, &job.route) else {
        tracing::warn!(queue_id = %job.id, route = %job.route, %error,
            "the hand-off agent stopped during this hand-off; it is sent again, and may arrive twice if the next hop had accepted it");
        return job.all(RcptOutcome::Transient(error));
    };
    *handoffs = h.handoffs;
    *noted = true;
    job.recipients
        .iter()
        .map(|r| {
            let oc = if h.delivered.contains(r) {
                RcptOutcome::Delivered
            } else {
                RcptOutcome::Transient(error.clone())
            };
            (r.clone(), oc)
        })
        .collect()
}

/// A hand-off as the spool's `.sending` marker keeps it, turned into the delivered
/// receipt's words.
pub(crate) fn handoff_of(n: &crate::queue::HandoffNote) -> Handoff {
    Handoff {
        rcpt: n.rcpt.clone(),
        at_unix_ms: n.at_ms,
        to: n.to.clone(),
    }
}

async fn to_maildir(
    ctx: &Context,
    dir: &std::path::Path,
    job: &Job,
    handoffs: &mut Vec<HandoffNote>,
) -> Vec<(String, RcptOutcome)> {
    let mut out = Vec::new();
    for rcpt in &job.recipients {
        // What a local delivery agent adds: the envelope sender and the recipient.
        let prefix = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            super::trace::clean(&job.mail_from),
            super::trace::clean(rcpt)
        );
        let root = dir;
        let dir = dir.to_path_buf();
        let host = ctx.settings().site.hostname.clone();
        let body = ctx.spool.body_path(&job.id);
        let r = tokio::task::spawn_blocking(move || {
            crate::queue::maildir::deliver(&dir, &host, prefix.as_bytes(), &body)
        })
        .await;
        let outcome = match r {
            Ok(Ok(path)) => {
                tracing::debug!(queue_id = %job.id, file = %path.display(), "written to Maildir");
                let file = path.strip_prefix(root).unwrap_or(&path);
                handoffs.push(handoff(rcpt, format!("maildir {}", file.display())));
                RcptOutcome::Delivered
            }
            Ok(Err(e)) => RcptOutcome::Transient(format!("Maildir write failed: {e}")),
            Err(e) => RcptOutcome::Transient(format!("Maildir task failed: {e}")),
        };
        out.push((rcpt.clone(), outcome));
    }
    out
}
