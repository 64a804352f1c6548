//! Delivery of mail for our own domain: into the Maildir, or by SMTP to the site's MTA.

use super::Shared;
use super::scheduler::{Job, Jobs, Outcome, next_job};
use crate::config::Delivery;
use crate::smtp::{ClientTimeouts, SmtpClient};
use std::sync::Arc;
use tokio::net::TcpStream;

/// How long a connection to the local MTA is kept open for the next message.
const SMTP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// One lane of local delivery. With `delivery.smtp` it keeps its connection to the MTA
/// open between messages, as Postfix's smtp client does with connection caching.
pub(crate) async fn worker(shared: Arc<Shared>, jobs: Jobs) {
    let mut conn: Option<SmtpClient<TcpStream>> = None;
    loop {
        let job = tokio::select! {
            j = next_job(&jobs) => j,
            _ = tokio::time::sleep(SMTP_IDLE), if conn.is_some() => {
                if let Some(c) = conn.take() {
                    let _ = c.quit().await;
                }
                continue;
            }
        };
        let Some(job) = job else { break };
        shared.spool.begin_send(&job.id, &job.route).await;
        let outcomes = match &shared.cfg.delivery {
            Delivery::Maildir(dir) => to_maildir(&shared, dir, &job).await,
            Delivery::Smtp(addr) => to_smtp(&shared, *addr, &job, &mut conn).await,
        };
        shared.queue.report(&shared, &job, outcomes).await;
    }
    if let Some(c) = conn.take() {
        let _ = c.quit().await;
    }
}

async fn to_maildir(shared: &Shared, dir: &std::path::Path, job: &Job) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    for rcpt in &job.recipients {
        // What a local delivery agent adds: the envelope sender and the recipient.
        let prefix = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            super::trace::clean(&job.mail_from),
            super::trace::clean(rcpt)
        );
        let dir = dir.to_path_buf();
        let host = shared.cfg.hostname.clone();
        let body = shared.spool.body_path(&job.id);
        let r = tokio::task::spawn_blocking(move || {
            crate::queue::maildir::deliver(&dir, &host, prefix.as_bytes(), &body)
        })
        .await;
        let outcome = match r {
            Ok(Ok(path)) => {
                tracing::debug!(queue_id = %job.id, file = %path.display(), "written to Maildir");
                Outcome::Delivered
            }
            Ok(Err(e)) => Outcome::Transient(format!("Maildir write failed: {e}")),
            Err(e) => Outcome::Transient(format!("Maildir task failed: {e}")),
        };
        out.push((rcpt.clone(), outcome));
    }
    out
}

/// Map an SMTP transaction's replies to per-recipient outcomes.
pub(crate) fn outcomes_from_smtp(
    job: &Job,
    res: Result<crate::smtp::SendOutcome, crate::smtp::ClientError>,
    what: &str,
) -> Vec<(String, Outcome)> {
    match res {
        Err(e) => {
            if e.is_unconfirmed() {
                tracing::warn!(queue_id = %job.id, route = %job.route, error = %e,
                    "no reply after the end of the message: it is sent again, and may arrive twice if {what} had accepted it");
            }
            job.all(Outcome::Transient(format!("{what}: {e}")))
        }
        Ok(o) => o
            .per_rcpt
            .iter()
            .map(|(addr, reply)| {
                let verdict = if !reply.is_positive() {
                    reply
                } else {
                    match &o.data {
                        Some(d) => d,
                        None => reply,
                    }
                };
                let oc =
                    if verdict.is_positive() && o.data.as_ref().is_some_and(|d| d.is_positive()) {
                        Outcome::Delivered
                    } else if verdict.is_permanent() {
                        Outcome::Permanent {
                            status: verdict
                                .enhanced
                                .map(|(a, b, c)| format!("{a}.{b}.{c}"))
                                .unwrap_or_else(|| "5.0.0".into()),
                            diagnostic: format!("smtp; {}", one_line(verdict)),
                            remote: Some(what.to_string()),
                        }
                    } else {
                        Outcome::Transient(format!("{what} said: {}", one_line(verdict)))
                    };
                (addr.clone(), oc)
            })
            .collect(),
    }
}

fn one_line(r: &crate::smtp::Reply) -> String {
    r.to_string().trim_end().replace("\r\n", " / ")
}

async fn to_smtp(
    shared: &Shared,
    addr: std::net::SocketAddr,
    job: &Job,
    conn: &mut Option<SmtpClient<TcpStream>>,
) -> Vec<(String, Outcome)> {
    let what = format!("local MTA {addr}");
    // A cached connection may have been closed by the MTA meanwhile: then one fresh try.
    for fresh in [conn.is_none(), true] {
        if fresh {
            *conn = None;
            match connect(shared, addr).await {
                Ok(c) => *conn = Some(c),
                Err(e) => return outcomes_from_smtp(job, Err(e), &what),
            }
        }
        let Some(c) = conn.as_mut() else { break };
        let body =
            match crate::queue::bodyio::BodyReader::open(shared.spool.body_path(&job.id)).await {
                Ok(b) => b,
                Err(e) => {
                    return job.all(Outcome::Transient(format!(
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
    job.all(Outcome::Transient(format!("{what}: no connection")))
}

async fn connect(
    shared: &Shared,
    addr: std::net::SocketAddr,
) -> Result<SmtpClient<TcpStream>, crate::smtp::ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(crate::smtp::ClientError::Io)?;
    let _ = tcp.set_nodelay(true);
    SmtpClient::connect(tcp, &shared.cfg.hostname, ClientTimeouts::default()).await
}
