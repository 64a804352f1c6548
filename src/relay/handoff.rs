//! One hand-off by SMTP: a message from the spool to the site's MTA or to an SMTP next
//! hop, on a cached connection. The daemon's lanes run it in process (`local`), or the
//! hand-off agent runs it in its own process (`agent`), so that a kill of the daemon does
//! not cut a hand-off off between the end of the message and the next hop's reply.

use super::outcome::{Job, RcptOutcome, one_line, outcomes_from_smtp};
use crate::queue::{Handed, HandoffNote, NextHop};
use crate::smtp::{ClientError, ClientTimeouts, SmtpClient};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long resolving a next hop's host, and then each TCP connect, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// An SMTP server a lane delivers to.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum SmtpHop {
    /// The site's MTA (`delivery.smtp`).
    Mta(SocketAddr),
    /// An SMTP next hop of the routing table.
    NextHop(NextHop),
}

impl SmtpHop {
    fn describe(&self) -> String {
        match self {
            SmtpHop::NextHop(h) => format!("next hop {h}"),
            SmtpHop::Mta(addr) => format!("local MTA {addr}"),
        }
    }
}

/// A recipient's hand-off as a delivered receipt names it: `maildir <file>` or
/// `smtp <the reply>`, now.
pub(crate) fn handoff(rcpt: &str, to: String) -> HandoffNote {
    HandoffNote {
        rcpt: rcpt.to_string(),
        at_ms: crate::queue::now_ms(),
        to,
    }
}

/// What the `.sending` marker records once the next hop took some recipients (None when
/// it took none).
pub(crate) fn handed(
    job: &Job,
    outcomes: &[(String, RcptOutcome)],
    handoffs: &[HandoffNote],
) -> Option<Handed> {
    let delivered: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| *o == RcptOutcome::Delivered)
        .map(|(r, _)| r.clone())
        .collect();
    (!delivered.is_empty()).then(|| Handed {
        id: job.id.clone(),
        route: job.route.clone(),
        delivered,
        handoffs: handoffs.to_vec(),
    })
}

/// Hand `job` (its body at `body`) to `hop`, on `conn` when it is open. Each recipient
/// the hop took gets its hand-off in `handoffs`.
pub(crate) async fn to_smtp(
    hostname: &str,
    hop: &SmtpHop,
    job: &Job,
    body: &Path,
    conn: &mut Option<SmtpClient<TcpStream>>,
    handoffs: &mut Vec<HandoffNote>,
) -> Vec<(String, RcptOutcome)> {
    let what = hop.describe();
    // A cached connection may have been closed by the MTA meanwhile: then one fresh try.
    for fresh in [conn.is_none(), true] {
        if fresh {
            *conn = None;
            match connect(hostname, hop).await {
                Ok(c) => *conn = Some(c),
                Err(e) => return outcomes_from_smtp(job, Err(e), &what),
            }
        }
        let Some(c) = conn.as_mut() else { break };
        let body = match crate::queue::bodyio::BodyReader::open(body) {
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

async fn connect(hostname: &str, hop: &SmtpHop) -> Result<SmtpClient<TcpStream>, ClientError> {
    let tcp = match hop {
        SmtpHop::Mta(addr) => TcpStream::connect(addr).await,
        SmtpHop::NextHop(h) => connect_next_hop(h).await,
    }
    .map_err(ClientError::Io)?;
    let _ = tcp.set_nodelay(true);
    SmtpClient::connect(tcp, hostname, ClientTimeouts::default()).await
}

/// The next hop's addresses (an IP address as it is; a name through the system
/// resolver: A/AAAA, no MX), each tried in turn until one takes the connection.
async fn connect_next_hop(h: &NextHop) -> std::io::Result<TcpStream> {
    let timed_out = |what: String| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    use crate::dns::system::{LookupError, lookup};
    let addrs: Vec<SocketAddr> = match lookup(&h.host, h.port, CONNECT_TIMEOUT).await {
        Ok(a) => a,
        Err(LookupError::Failed(e)) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot resolve {}: {e}", h.host),
            ));
        }
        Err(LookupError::Timeout(_)) => {
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
