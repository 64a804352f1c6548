//! Pure words of delivery: a [`Job`] (one attempt for the recipients of one message on
//! one route), the [`RcptOutcome`] of each recipient, and how an SMTP transaction's replies
//! map to outcomes. No tasks, no clock: the scheduler's pure core (`schedule`) and the
//! workers both use it.

use crate::metrics::RouteLabel;
use crate::queue::Route;

/// A route as the metrics label it.
pub(crate) fn route_label(route: &Route) -> RouteLabel<'_> {
    match route {
        Route::Local => RouteLabel::Local,
        Route::Peer(d) => RouteLabel::Peer(d),
        Route::Smtp(h) => RouteLabel::NextHop(&h.host, h.port),
    }
}

/// One delivery attempt for the recipients of one message that share a route.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Job {
    pub id: String,
    pub route: Route,
    pub mail_from: String,
    pub recipients: Vec<String>,
    /// NOTIFY/ORCPT of each recipient, in the same order.
    pub rcpt_params: Vec<crate::smtp::RcptParams>,
    /// SIZE, SMTPUTF8, RET, ENVID.
    pub opts: crate::smtp::MailOptions,
    /// The partner the message came from through a signed call, if it asked for a
    /// receipt (for its `[[peer]] inbox`).
    pub from_peer: Option<String>,
    /// Its duplicate record's file name (see `receipts`), made durable before the
    /// message can leave the spool.
    pub dedup_key_file: Option<String>,
    /// The partner relay that may already hold the message (see
    /// [`crate::queue::RelayPin`]): the attempt goes there while the pin is in force.
    #[serde(default)]
    pub pin: Option<crate::queue::RelayPin>,
    /// The body as the partner will decode it, if hashed when it was spooled (see
    /// [`crate::queue::Envelope::decoded`]); otherwise the attempt hashes what it sends.
    #[serde(default)]
    pub decoded: Option<Box<crate::queue::DecodedBody>>,
}

impl Job {
    /// The same outcome for every recipient of the job.
    pub fn all(&self, outcome: RcptOutcome) -> Vec<(String, RcptOutcome)> {
        self.recipients
            .iter()
            .map(|r| (r.clone(), outcome.clone()))
            .collect()
    }
}

/// What one delivery attempt did for one recipient.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum RcptOutcome {
    Delivered,
    /// Try again later (4xx, failed call, I/O error).
    Transient(String),
    /// Try again later, not before `secs` seconds: the partner refused the call and said
    /// when to come back (a SIP `Retry-After`, RFC 3261 section 20.33, as on its `503`
    /// when it is overloaded). The queue's own back-off does not apply to this attempt.
    TransientAfter {
        reason: String,
        secs: u32,
    },
    /// Try again later, at `relay`: the connection failed after the end of the message,
    /// so that partner relay may already hold it (see `crate::queue::RelayPin`).
    Unconfirmed {
        reason: String,
        relay: String,
    },
    /// Will never work (5xx): RFC 3463 status and the diagnostic for the bounce.
    Permanent {
        status: String,
        diagnostic: String,
        remote: Option<String>,
    },
}

/// Map an SMTP transaction's replies to per-recipient outcomes (local MTA or peer).
pub(crate) fn outcomes_from_smtp(
    job: &Job,
    res: Result<crate::smtp::SendOutcome, crate::smtp::ClientError>,
    what: &str,
) -> Vec<(String, RcptOutcome)> {
    match res {
        Err(e) => {
            if e.is_unconfirmed() {
                tracing::warn!(queue_id = %job.id, route = %job.route, error = %e,
                    "no reply after the end of the message: it is sent again, and may arrive twice if {what} had accepted it");
            }
            job.all(RcptOutcome::Transient(format!("{what}: {e}")))
        }
        Ok(o) => o
            .per_rcpt
            .iter()
            .map(|(addr, reply)| {
                let decisive = if !reply.is_positive() {
                    reply
                } else {
                    match &o.data {
                        Some(d) => d,
                        None => reply,
                    }
                };
                let oc =
                    if decisive.is_positive() && o.data.as_ref().is_some_and(|d| d.is_positive()) {
                        RcptOutcome::Delivered
                    } else if decisive.is_permanent() {
                        RcptOutcome::Permanent {
                            status: decisive
                                .enhanced
                                .map(|(a, b, c)| format!("{a}.{b}.{c}"))
                                .unwrap_or_else(|| "5.0.0".into()),
                            diagnostic: format!("smtp; {}", one_line(decisive)),
                            remote: Some(what.to_string()),
                        }
                    } else {
                        RcptOutcome::Transient(format!("{what} said: {}", one_line(decisive)))
                    };
                (addr.clone(), oc)
            })
            .collect(),
    }
}

pub(crate) fn one_line(r: &crate::smtp::Reply) -> String {
    r.to_string().trim_end().replace("\r\n", " / ")
}
