//! Delivery of mail for our own domain: into the Maildir, or by SMTP to the site's MTA.

use super::context::Context;
use super::jobs::Lane;
use super::outcome::{Job, RcptOutcome, outcomes_from_smtp};
use crate::config::Delivery;
use crate::smtp::{ClientTimeouts, SmtpClient};
use std::sync::Arc;
use tokio::net::TcpStream;

/// How long a connection to the local MTA is kept open for the next message.
const SMTP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// One lane of local delivery. With `delivery.smtp` it keeps its connection to the MTA
/// open between messages, as Postfix's smtp client does with connection caching.
pub(crate) async fn worker(ctx: Arc<Context>, delivery: Delivery, lane: Lane) {
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
        ctx.spool.begin_send(&job.id, &job.route).await;
        let sending = tokio::time::Instant::now();
        let outcomes = match &delivery {
            Delivery::Maildir(dir) => to_maildir(&ctx, dir, &job).await,
            Delivery::Smtp(addr) => to_smtp(&ctx, *addr, &job, &mut conn).await,
        };
        ctx.metrics.transferred(None, sending.elapsed());
        lane.report(job, outcomes).await;
    }
    if let Some(c) = conn.take() {
        let _ = c.quit().await;
    }
}

async fn to_maildir(ctx: &Context, dir: &std::path::Path, job: &Job) -> Vec<(String, RcptOutcome)> {
    let mut out = Vec::new();
    for rcpt in &job.recipients {
        // What a local delivery agent adds: the envelope sender and the recipient.
        let prefix = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            super::trace::clean(&job.mail_from),
            super::trace::clean(rcpt)
        );
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
    addr: std::net::SocketAddr,
    job: &Job,
    conn: &mut Option<SmtpClient<TcpStream>>,
) -> Vec<(String, RcptOutcome)> {
    let what = format!("local MTA {addr}");
    // A cached connection may have been closed by the MTA meanwhile: then one fresh try.
    for fresh in [conn.is_none(), true] {
        if fresh {
            *conn = None;
            match connect(ctx, addr).await {
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
            Ok(o) => return outcomes_from_smtp(job, Ok(o), &what),
        }
    }
    job.all(RcptOutcome::Transient(format!("{what}: no connection")))
}

async fn connect(
    ctx: &Context,
    addr: std::net::SocketAddr,
) -> Result<SmtpClient<TcpStream>, crate::smtp::ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(crate::smtp::ClientError::Io)?;
    let _ = tcp.set_nodelay(true);
    SmtpClient::connect(
        tcp,
        &ctx.settings().site.hostname,
        ClientTimeouts::default(),
    )
    .await
}
