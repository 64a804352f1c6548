//! `[queue]` (retry and give-up times) and `[delivery]` (where mail for our own domain goes).

use super::raw::{RawDelivery, RawQueue};
use super::values::parse_duration;
use super::{ConfigError, Errors, socket};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `delivery.lanes` default: local deliveries at once.
pub const DEFAULT_LANES: usize = 8;

#[derive(Clone, Debug)]
pub enum Delivery {
    Maildir(PathBuf),
    Smtp(SocketAddr),
}

/// The `[delivery]` section.
#[derive(Clone, Debug)]
pub struct DeliverySection {
    /// Default: the Maildir `<relay.spool>/maildir`.
    pub delivery: Delivery,
    /// Local deliveries at once.
    pub lanes: usize,
}

#[derive(Clone, Debug)]
pub struct QueueTimes {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    /// Send a "delayed" DSN once a recipient has waited this long (None: never, as
    /// Postfix's default `delay_warning_time = 0`).
    pub delay_warning: Option<Duration>,
    /// How long a partner's message we accepted is remembered for duplicate suppression,
    /// and how long the calls that receipts name are kept (issue 14). At least the
    /// partners' maximum queue age: a resend after that is queued again.
    pub dedup_window: Duration,
    /// How long a message that a partner's relay may already hold (a transaction with it
    /// got no reply after the end of the message) keeps going to that relay, which
    /// recognises the resend, before the site's other relays are tried (where it may then
    /// arrive twice). Exactly-once across several relays of a site (issue 13).
    pub resend_hold: Duration,
    /// Empty files `sipmail run` puts in the spool's `free/` before the first message, so
    /// that a first burst does not create inodes on the message's path (see
    /// `Spool::make_spares`). At most [`crate::queue::SPARE_FILES_MAX`].
    pub spare_files: usize,
}

impl Default for QueueTimes {
    /// RFC 5321 §4.5.4.1: retry interval at least 30 minutes, give-up time 4-5 days. We
    /// start lower and back off exponentially up to the maximum.
    fn default() -> Self {
        QueueTimes {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(5 * 24 * 3600),
            delay_warning: None,
            // Postfix's maximal_queue_lifetime is 5 days, ours too: a week covers both.
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            // Long enough for a relay to be restarted or its machine rebooted; short
            // enough that a relay that is gone for good holds its partners' mail an hour.
            resend_hold: Duration::from_secs(3600),
            spare_files: crate::queue::SPARE_FILES_MAX,
        }
    }
}

pub(super) fn parse_delivery(
    raw: &RawDelivery,
    spool: &Path,
    e: Errors<'_>,
) -> Result<DeliverySection, ConfigError> {
    let delivery = match (&raw.maildir, &raw.smtp) {
        (Some(_), Some(_)) => {
            return Err(e.bad("delivery", "set either maildir or smtp, not both".into()));
        }
        (None, Some(s)) => Delivery::Smtp(socket(e, "delivery.smtp", s)?),
        (Some(m), None) => Delivery::Maildir(m.clone()),
        (None, None) => Delivery::Maildir(spool.join("maildir")),
    };
    let lanes = raw.lanes.unwrap_or(DEFAULT_LANES);
    if !(1..=64).contains(&lanes) {
        return Err(e.bad("delivery.lanes", format!("{lanes} is not in 1..=64")));
    }
    Ok(DeliverySection { delivery, lanes })
}

pub(super) fn parse_queue(raw: &RawQueue, e: Errors<'_>) -> Result<QueueTimes, ConfigError> {
    let bad = |key: &str, msg: String| e.bad(key, msg);
    let mut queue = QueueTimes::default();
    let dur = |key: &str, v: &Option<String>, d: Duration| -> Result<Duration, ConfigError> {
        match v {
            None => Ok(d),
            Some(s) => parse_duration(s).map_err(|m| bad(key, m)),
        }
    };
    queue.retry_initial = dur(
        "queue.retry_initial",
        &raw.retry_initial,
        queue.retry_initial,
    )?;
    queue.retry_max = dur("queue.retry_max", &raw.retry_max, queue.retry_max)?;
    queue.max_age = dur("queue.max_age", &raw.max_age, queue.max_age)?;
    queue.delay_warning = match &raw.delay_warning {
        None => None,
        Some(s) => match parse_duration(s).map_err(|m| bad("queue.delay_warning", m))? {
            d if d.is_zero() => None,
            d if d >= queue.max_age => {
                return Err(bad(
                    "queue.delay_warning",
                    "must be shorter than queue.max_age (or 0 for none)".into(),
                ));
            }
            d => Some(d),
        },
    };
    queue.dedup_window = dur("queue.dedup_window", &raw.dedup_window, queue.dedup_window)?;
    if queue.dedup_window < Duration::from_secs(3600) {
        return Err(bad(
            "queue.dedup_window",
            "must be at least 1h (and at least the partners' maximum queue age)".into(),
        ));
    }
    queue.resend_hold = dur("queue.resend_hold", &raw.resend_hold, queue.resend_hold)?;
    if queue.resend_hold >= queue.max_age {
        return Err(bad(
            "queue.resend_hold",
            "must be shorter than queue.max_age".into(),
        ));
    }
    if let Some(n) = raw.spare_files {
        if n > crate::queue::SPARE_FILES_MAX {
            return Err(bad(
                "queue.spare_files",
                format!(
                    "must be at most {} (what the spool's free/ keeps)",
                    crate::queue::SPARE_FILES_MAX
                ),
            ));
        }
        queue.spare_files = n;
    }
    if queue.retry_initial.is_zero() || queue.retry_max < queue.retry_initial {
        return Err(bad(
            "queue.retry_max",
            "must be at least queue.retry_initial, and both above zero".into(),
        ));
    }
    Ok(queue)
}
