//! Delivery without a call: mail for our own domain into the Maildir or by SMTP to the
//! site's MTA, and mail on an SMTP route (`smtp:[host]:port`, the default route) to its
//! next hop. Both SMTP destinations share one client path with connection caching.

use super::context::Context;
use super::jobs::Lane;
use super::outcome::{Job, RcptOutcome, one_line, outcomes_from_smtp, route_label};
use crate::config::Delivery;
use crate::queue::NextHop;
use crate::receipt::Handoff;
use crate::smtp::{ClientError, ClientTimeouts, SmtpClient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long a connection to the local MTA or a next hop is kept open for the next message.
const SMTP_IDLE: Duration = Duration::from_secs(5);

/// How long resolving a next hop's host, and then each TCP connect, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a lane without calls hands its mail.
#[derive(Clone, Debug)]
pub(crate) enum Destination {
    Maildir(std::path::PathBuf),
    Smtp(SmtpHop),
}

/// An SMTP server a lane delivers to.
#[derive(Clone, Debug)]
pub(crate) enum SmtpHop {
    /// The site's MTA (`delivery.smtp`).
    Mta(SocketAddr),
    /// An SMTP next hop of the routing table.
    NextHop(NextHop),
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
/// open between messages, as Postfix's smtp client does with connection caching.
pub(crate) async fn worker(ctx: Arc<Context>, dest: Destination, lane: Lane) {
    let mut conn: Option<SmtpClient<TcpStream>> = None;
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
        // (written without fsync when the message came) is made durable first, before the
        // hand-off rather than after it, so that nothing slow sits between the MTA's 250
        // and the report (a crash there is what makes the MTA get the message twice).
        if let Some(k) = job.dedup_key_file.clone()
            && let Err(e) = ctx.receipts.sync_dedup(k).await
        {
            tracing::error!(queue_id = %job.id, error = %e,
                "cannot make the duplicate record durable; a resend after a crash could be delivered twice");
        }
        ctx.spool.begin_send(&job.id, &job.route).await;
        let sending = tokio::time::Instant::now();
        // What each recipient's hand-off was, for a partner's delivered receipt.
        let mut handoffs = Vec::new();
        let outcomes = match to_inbox(&ctx, &job).await {
            Err(failed) => failed,
            Ok(()) => match &dest {
                Destination::Maildir(dir) => to_maildir(&ctx, dir, &job, &mut handoffs).await,
                Destination::Smtp(hop) => to_smtp(&ctx, hop, &job, &mut conn, &mut handoffs).await,
            },
        };
        // First of all, before signing or reporting: note what the next hop took, so that
        // a kill from here on replays this outcome instead of handing the message over again.
        let delivered: Vec<String> = outcomes
            .iter()
            .filter(|(_, o)| *o == RcptOutcome::Delivered)
            .map(|(r, _)| r.clone())
            .collect();
        if !delivered.is_empty() {
            let h = crate::queue::Handed {
                id: job.id.clone(),
                route: job.route.clone(),
                delivered,
                handoffs: handoffs.iter().map(note_of).collect(),
            };
            if let Err(e) = ctx.spool.handed(&h) {
                tracing::warn!(queue_id = %job.id, error = %e,
                    "cannot note the hand-off; if sipmail stops before the outcome is recorded, the message may arrive twice");
            }
        }
        ctx.metrics
            .transferred(route_label(&job.route), sending.elapsed());
        // The delivered receipt is signed and written (a kill -9 cannot lose a written
        // line) before the report, and fdatasynced after it (the report is not kept waiting
        // for the disk; only a power cut in between could lose the receipt, not the mail).
        let issued = super::delivered::issue_for(&ctx, &job, handoffs).await;
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

/// A hand-off as the spool's `.sending` marker keeps it, and back (for a replay).
fn note_of(h: &Handoff) -> crate::queue::HandoffNote {
    crate::queue::HandoffNote {
        rcpt: h.rcpt.clone(),
        at_ms: h.at_unix_ms,
        to: h.to.clone(),
    }
}

pub(crate) fn handoff_of(n: &crate::queue::HandoffNote) -> Handoff {
    Handoff {
        rcpt: n.rcpt.clone(),
        at_unix_ms: n.at_ms,
        to: n.to.clone(),
    }
}

fn handoff(rcpt: &str, to: String) -> Handoff {
    Handoff {
        rcpt: rcpt.to_string(),
        at_unix_ms: crate::queue::now_ms(),
        to,
    }
}

async fn to_maildir(
    ctx: &Context,
    dir: &std::path::Path,
    job: &Job,
    handoffs: &mut Vec<Handoff>,
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

async fn to_smtp(
    ctx: &Context,
    hop: &SmtpHop,
    job: &Job,
    conn: &mut Option<SmtpClient<TcpStream>>,
    handoffs: &mut Vec<Handoff>,
) -> Vec<(String, RcptOutcome)> {
    let what = match hop {
        SmtpHop::NextHop(h) => format!("next hop {h}"),
        SmtpHop::Mta(addr) => format!("local MTA {addr}"),
    };
    // A cached connection may have been closed by the MTA meanwhile: then one fresh try.
    for fresh in [conn.is_none(), true] {
        if fresh {
            *conn = None;
            match connect(ctx, hop).await {
                Ok(c) => *conn = Some(c),
                Err(e) => return outcomes_from_smtp(job, Err(e), &what),
            }
        }
        let Some(c) = conn.as_mut() else { break };
        let body = match crate::queue::bodyio::BodyReader::open(ctx.spool.body_path(&job.id)).await
        {
            Ok(b) => b,
            Err(e) => {
                return job.all(RcptOutcome::Transient(format!(
                    "cannot open the queued message: {e}"
                )));
            }
        };
        let res = c
            .send_tx(
                &job.mail_from,
                &job.recipients,
                &job.rcpt_params,
                &job.opts,
                body,
            )
            .await;
        match res {
            // A cached connection that failed before the message went out: one fresh
            // try now. Never after the end of the message, which may have been accepted.
            Err(e) if !fresh && !e.is_unconfirmed() => continue,
            Err(e) => {
                *conn = None;
                return outcomes_from_smtp(job, Err(e), &what);
            }
            Ok(o) => {
                let data = o.data.as_ref().map(one_line);
                let outcomes = outcomes_from_smtp(job, Ok(o), &what);
                if let Some(reply) = data {
                    for (rcpt, oc) in &outcomes {
                        if *oc == RcptOutcome::Delivered {
                            handoffs.push(handoff(rcpt, format!("smtp {reply}")));
                        }
                    }
                }
                return outcomes;
            }
        }
    }
    job.all(RcptOutcome::Transient(format!("{what}: no connection")))
}

async fn connect(ctx: &Context, hop: &SmtpHop) -> Result<SmtpClient<TcpStream>, ClientError> {
    let tcp = match hop {
        SmtpHop::Mta(addr) => TcpStream::connect(addr).await,
        SmtpHop::NextHop(h) => connect_next_hop(h).await,
    }
    .map_err(ClientError::Io)?;
    let _ = tcp.set_nodelay(true);
    SmtpClient::connect(
        tcp,
        &ctx.settings().site.hostname,
        ClientTimeouts::default(),
    )
    .await
}

/// The next hop's addresses (an IP address as it is; a name through the system
/// resolver: A/AAAA, no MX), each tried in turn until one takes the connection.
async fn connect_next_hop(h: &NextHop) -> std::io::Result<TcpStream> {
    let timed_out = |what: String| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((h.host.as_str(), h.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot resolve {}: {e}", h.host),
            ));
        }
        Err(_) => {
            return Err(timed_out(format!(
                "resolving {} took over {CONNECT_TIMEOUT:?}",
                h.host
            )));
        }
    };
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} has no address", h.host),
    );
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = std::io::Error::new(e.kind(), format!("{a}: {e}")),
            Err(_) => last = timed_out(format!("{a}: no answer within {CONNECT_TIMEOUT:?}")),
        }
    }
    Err(last)
}
