//! The queue's rules, pure: given a message, the outcomes of one delivery attempt, the
//! time and the [`QueueTimes`], what becomes of each recipient (delivered, retried later,
//! failed for good), which DSNs go to the sender, and whether the message is done. No
//! I/O and no clock: the scheduler commits what [`decide`] returns.

use super::outcome::RcptOutcome;
use crate::config::QueueTimes;
use crate::queue::{Envelope, RcptState, Route};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One recipient a DSN reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub rcpt: String,
    /// RFC 3463 status, e.g. `5.1.1`, or `4.4.7` for expiry.
    pub status: String,
    /// `smtp; 550 5.1.1 ...` or a plain reason.
    pub diagnostic: String,
    /// The relay or server that said no, if any.
    pub remote: Option<String>,
    /// The sender's ORCPT for this recipient (RFC 3461), reported back as given.
    pub orcpt: Option<String>,
}

/// What a DSN reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DsnKind {
    /// The recipients failed for good.
    Failed,
    /// The recipients are still being retried, until the given time.
    Delayed { until: SystemTime },
}

/// What happened to one recipient, for the log and the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Delivered {
        rcpt: String,
    },
    Deferred {
        rcpt: String,
        attempts: u32,
        retry_in: Duration,
        reason: String,
    },
    /// Given up; `bounce` is false when the sender asked for no failure DSN (NOTIFY).
    Failed {
        failure: Failure,
        bounce: bool,
    },
}

/// The effects of one report on one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The message with its recipients' new states, attempts and next attempt times.
    pub envelope: Envelope,
    pub steps: Vec<Step>,
    /// Recipients to report in a "failed" DSN (empty: none to send).
    pub failed_dsn: Vec<Failure>,
    /// Recipients to report in a "delayed" DSN, and until when they are retried.
    pub delayed_dsn: Option<(Vec<Failure>, SystemTime)>,
}

impl Decision {
    /// Nothing is pending any more.
    pub fn done(&self) -> bool {
        self.envelope.pending().next().is_none()
    }

    /// What to do with the spooled message once the failure DSN was (`bounced`) or could
    /// not be queued. A bounce is queued before the original goes, so a crash in between
    /// can at worst repeat the bounce, never lose it.
    pub fn disposal(&self, bounced: bool) -> Disposal {
        if self.done() && bounced {
            Disposal::Remove
        } else {
            Disposal::Keep
        }
    }
}

/// The spool's part of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disposal {
    /// Delete the message.
    Remove,
    /// Write the new state and keep it queued.
    Keep,
}

/// How long to wait before attempt `attempts + 1`: `retry_initial`, doubling with each
/// attempt, at most `retry_max`.
pub(crate) fn backoff(times: &QueueTimes, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    (times.retry_initial * factor).min(times.retry_max)
}

/// Apply the outcomes of one attempt on `route` to `env` at `now_ms` (milliseconds since
/// the epoch). Outcomes for recipients that are not pending on this route are ignored.
pub(crate) fn decide(
    env: &Envelope,
    route: &Route,
    outcomes: &[(String, RcptOutcome)],
    now_ms: u64,
    times: &QueueTimes,
) -> Decision {
    let mut env = env.clone();
    let mut steps = Vec::new();
    let mut failed_dsn = Vec::new();
    let mut delays = Vec::new();
    let age = Duration::from_secs(now_ms / 1000).saturating_sub(Duration::from_secs(env.received));
    // `sipmail queue expire`: the next transient outcome is the last, as past max_age.
    let expired = env.expired;
    for (addr, outcome) in outcomes {
        let Some(r) = env
            .recipients
            .iter_mut()
            .find(|r| &r.addr == addr && &r.route == route && r.state == RcptState::Pending)
        else {
            continue;
        };
        // The relay that may hold it now (a pin in force on another relay is replaced:
        // this one got the message's end last).
        if let RcptOutcome::Unconfirmed { relay, .. } = outcome {
            let until_ms = match &r.pin {
                Some(p) if &p.relay == relay => p.until_ms,
                _ => now_ms + times.resend_hold.as_millis() as u64,
            };
            r.pin = Some(crate::queue::RelayPin {
                relay: relay.clone(),
                until_ms,
            });
        }
        let failure = match outcome {
            RcptOutcome::Delivered => {
                r.state = RcptState::Delivered;
                r.last_error = None;
                r.pin = None;
                steps.push(Step::Delivered { rcpt: addr.clone() });
                None
            }
            RcptOutcome::Transient(why)
            | RcptOutcome::TransientAfter { reason: why, .. }
            | RcptOutcome::Unconfirmed { reason: why, .. }
                if age < times.max_age && !expired =>
            {
                r.attempts += 1;
                let wait = match outcome {
                    // The partner's word, within the queue's limits: at least a second
                    // (no tight loop), at most queue.retry_max.
                    RcptOutcome::TransientAfter { secs, .. } => {
                        Duration::from_secs(u64::from(*secs))
                            .min(times.retry_max)
                            .max(Duration::from_secs(1))
                    }
                    _ => backoff(times, r.attempts),
                };
                r.next_attempt_ms = now_ms + wait.as_millis() as u64;
                r.last_error = Some(why.clone());
                if times.delay_warning.is_some_and(|d| age >= d)
                    && !r.delay_warned
                    && r.dsn.notify.is_none_or(|n| n.delay)
                {
                    r.delay_warned = true;
                    delays.push(Failure {
                        rcpt: addr.clone(),
                        status: "4.4.7".into(),
                        diagnostic: format!("X-Sipmail; {why}"),
                        remote: None,
                        orcpt: r.dsn.orcpt.clone(),
                    });
                }
                steps.push(Step::Deferred {
                    rcpt: addr.clone(),
                    attempts: r.attempts,
                    retry_in: wait,
                    reason: why.clone(),
                });
                None
            }
            RcptOutcome::Transient(why)
            | RcptOutcome::TransientAfter { reason: why, .. }
            | RcptOutcome::Unconfirmed { reason: why, .. } => Some(Failure {
                rcpt: addr.clone(),
                status: "4.4.7".into(),
                diagnostic: format!(
                    "X-Sipmail; {} after {} hours: {why}",
                    if expired {
                        "expired by the operator"
                    } else {
                        "gave up"
                    },
                    age.as_secs() / 3600
                ),
                remote: None,
                orcpt: r.dsn.orcpt.clone(),
            }),
            RcptOutcome::Permanent {
                status,
                diagnostic,
                remote,
            } => Some(Failure {
                rcpt: addr.clone(),
                status: status.clone(),
                diagnostic: diagnostic.clone(),
                remote: remote.clone(),
                orcpt: r.dsn.orcpt.clone(),
            }),
        };
        if let Some(f) = failure {
            r.state = RcptState::Failed;
            r.pin = None;
            r.last_error = Some(f.diagnostic.clone());
            let bounce = r.dsn.wants_failure_dsn();
            if bounce {
                failed_dsn.push(f.clone());
            }
            steps.push(Step::Failed { failure: f, bounce });
        }
    }
    let delayed_dsn = (!delays.is_empty()).then(|| {
        let until = UNIX_EPOCH + Duration::from_secs(env.received) + times.max_age;
        (delays, until)
    });
    Decision {
        envelope: env,
        steps,
        failed_dsn,
        delayed_dsn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::{Notify, RcptParams};

    const HOUR: u64 = 3600;

    fn times() -> QueueTimes {
        QueueTimes {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(5 * 24 * HOUR),
            delay_warning: Some(Duration::from_secs(4 * HOUR)),
            ..QueueTimes::default()
        }
    }

    /// A message received at t = 1,000,000 s with `rcpts` pending on the route of the
    /// first recipient of `crate::queue::tests::env`.
    fn message(rcpts: &[&str]) -> (Envelope, Route) {
        let mut e = crate::queue::tests::env("Q");
        e.received = 1_000_000;
        let proto = e.recipients[0].clone();
        e.recipients = rcpts
            .iter()
            .map(|a| crate::queue::Recipient {
                addr: a.to_string(),
                ..proto.clone()
            })
            .collect();
        let route = proto.route.clone();
        (e, route)
    }

    /// Milliseconds since the epoch, `secs` after the message arrived.
    fn at(secs: u64) -> u64 {
        (1_000_000 + secs) * 1000
    }

    fn transient(rcpt: &str) -> Vec<(String, RcptOutcome)> {
        vec![(rcpt.into(), RcptOutcome::Transient("call failed".into()))]
    }

    #[test]
    fn backoff_doubles_from_the_initial_interval_up_to_the_maximum() {
        let t = times();
        let secs: Vec<u64> = (1..=8).map(|n| backoff(&t, n).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1800, 1800, 1800]);
        // The shift is capped: a huge attempt count neither overflows nor panics.
        assert_eq!(backoff(&t, u32::MAX), t.retry_max);
    }

    #[test]
    fn delivered_recipient_is_done_and_the_message_removed() {
        let (env, route) = message(&["bob@b.test"]);
        let d = decide(
            &env,
            &route,
            &[("bob@b.test".into(), RcptOutcome::Delivered)],
            at(5),
            &times(),
        );
        assert_eq!(d.envelope.recipients[0].state, RcptState::Delivered);
        assert_eq!(
            d.steps,
            [Step::Delivered {
                rcpt: "bob@b.test".into()
            }]
        );
        assert!(d.done() && d.failed_dsn.is_empty() && d.delayed_dsn.is_none());
        assert_eq!(d.disposal(true), Disposal::Remove);
    }

    /// No reply after the end of the message: the recipient is retried as after any
    /// transient failure, pinned to the relay that may hold it for `resend_hold` from the
    /// first such attempt there; a later one at another relay moves the pin, a plain
    /// failure keeps it, and the delivery (the relay's receipt) ends it.
    #[test]
    fn an_unconfirmed_transaction_pins_the_message_to_its_relay() {
        let (env, route) = message(&["bob@b.test"]);
        let t = times();
        let unconfirmed = |relay: &str| {
            vec![(
                "bob@b.test".to_string(),
                RcptOutcome::Unconfirmed {
                    reason: "connection lost after the end of the message".into(),
                    relay: relay.into(),
                },
            )]
        };
        let hold = t.resend_hold.as_millis() as u64;
        let d1 = decide(&env, &route, &unconfirmed("b1"), at(10), &t);
        let r = &d1.envelope.recipients[0];
        assert_eq!(r.state, RcptState::Pending);
        assert_eq!(r.attempts, 1);
        let pin = r.pin.clone().expect("pinned");
        assert_eq!((pin.relay.as_str(), pin.until_ms), ("b1", at(10) + hold));
        // Again at the same relay: the hold still counts from the first time.
        let d2 = decide(&d1.envelope, &route, &unconfirmed("b1"), at(70), &t);
        assert_eq!(d2.envelope.recipients[0].pin, Some(pin.clone()));
        // A failed call keeps the pin.
        let d3 = decide(&d2.envelope, &route, &transient("bob@b.test"), at(200), &t);
        assert_eq!(d3.envelope.recipients[0].pin, Some(pin));
        // At another relay: that one may hold it now.
        let d4 = decide(&d3.envelope, &route, &unconfirmed("b2"), at(400), &t);
        let moved = d4.envelope.recipients[0].pin.clone().unwrap();
        assert_eq!(
            (moved.relay.as_str(), moved.until_ms),
            ("b2", at(400) + hold)
        );
        let done = decide(
            &d4.envelope,
            &route,
            &[("bob@b.test".into(), RcptOutcome::Delivered)],
            at(500),
            &t,
        );
        assert_eq!(done.envelope.recipients[0].pin, None);
        assert!(done.done());
    }

    #[test]
    fn transient_failure_is_retried_with_backoff() {
        let (env, route) = message(&["bob@b.test"]);
        let t = times();
        let d1 = decide(&env, &route, &transient("bob@b.test"), at(10), &t);
        let r = &d1.envelope.recipients[0];
        assert_eq!(r.state, RcptState::Pending);
        assert_eq!(r.attempts, 1);
        assert_eq!(r.next_attempt_ms, at(10) + 60_000);
        assert_eq!(r.last_error.as_deref(), Some("call failed"));
        assert!(!d1.done());
        assert_eq!(d1.disposal(true), Disposal::Keep);
        // The second failure waits twice as long.
        let d2 = decide(&d1.envelope, &route, &transient("bob@b.test"), at(70), &t);
        let r = &d2.envelope.recipients[0];
        assert_eq!((r.attempts, r.next_attempt_ms), (2, at(70) + 120_000));
        assert!(matches!(
            &d2.steps[0],
            Step::Deferred { attempts: 2, retry_in, .. } if retry_in.as_secs() == 120
        ));
    }

    /// A refusal with `Retry-After` is tried again when the partner said, not after the
    /// queue's back-off (60 s here): the 10,000-call bench's refused calls came back a
    /// minute later although the callee's 503 said 5 s.
    #[test]
    fn a_refusal_with_retry_after_is_tried_again_when_the_partner_said() {
        let (env, route) = message(&["bob@b.test"]);
        let t = times();
        let after = |secs| {
            vec![(
                "bob@b.test".to_string(),
                RcptOutcome::TransientAfter {
                    reason: "503 overloaded".into(),
                    secs,
                },
            )]
        };
        let d = decide(&env, &route, &after(5), at(10), &t);
        let r = &d.envelope.recipients[0];
        assert_eq!((r.state, r.attempts), (RcptState::Pending, 1));
        assert_eq!(r.next_attempt_ms, at(10) + 5_000);
        assert_eq!(r.last_error.as_deref(), Some("503 overloaded"));
        // Never sooner than a second, never later than queue.retry_max.
        let d = decide(&env, &route, &after(0), at(10), &t);
        assert_eq!(d.envelope.recipients[0].next_attempt_ms, at(10) + 1_000);
        let d = decide(&env, &route, &after(u32::MAX), at(10), &t);
        assert_eq!(
            d.envelope.recipients[0].next_attempt_ms,
            at(10) + t.retry_max.as_millis() as u64
        );
        // Past queue.max_age it expires like any transient failure.
        let d = decide(&env, &route, &after(5), at(5 * 24 * HOUR), &t);
        assert_eq!(d.envelope.recipients[0].state, RcptState::Failed);
    }

    #[test]
    fn transient_failure_after_max_age_expires_and_bounces() {
        let (env, route) = message(&["bob@b.test"]);
        let d = decide(
            &env,
            &route,
            &transient("bob@b.test"),
            at(5 * 24 * HOUR),
            &times(),
        );
        assert_eq!(d.envelope.recipients[0].state, RcptState::Failed);
        assert_eq!(d.failed_dsn.len(), 1);
        let f = &d.failed_dsn[0];
        assert_eq!(f.status, "4.4.7");
        assert_eq!(
            f.diagnostic,
            "X-Sipmail; gave up after 120 hours: call failed"
        );
        assert!(d.done());
        // Removed only once the bounce is queued.
        assert_eq!(d.disposal(true), Disposal::Remove);
        assert_eq!(d.disposal(false), Disposal::Keep);
    }

    #[test]
    fn an_expired_message_fails_at_its_next_transient_outcome_with_the_same_bounce() {
        let (mut env, route) = message(&["bob@b.test"]);
        env.expired = true;
        // One hour old, far from max_age: the operator's expiry decides.
        let d = decide(&env, &route, &transient("bob@b.test"), at(HOUR), &times());
        assert_eq!(d.envelope.recipients[0].state, RcptState::Failed);
        let f = &d.failed_dsn[0];
        assert_eq!(f.status, "4.4.7");
        assert_eq!(
            f.diagnostic,
            "X-Sipmail; expired by the operator after 1 hours: call failed"
        );
        assert!(matches!(&d.steps[0], Step::Failed { bounce: true, .. }));
        assert_eq!(d.disposal(true), Disposal::Remove);
        // A delivery that was under way still counts as delivered.
        let ok = vec![("bob@b.test".to_string(), RcptOutcome::Delivered)];
        let d = decide(&env, &route, &ok, at(HOUR), &times());
        assert!(d.failed_dsn.is_empty() && d.done());
    }

    #[test]
    fn permanent_failure_bounces_with_the_remote_status() {
        let (env, route) = message(&["bob@b.test", "carol@b.test"]);
        let outcomes = vec![
            (
                "bob@b.test".into(),
                RcptOutcome::Permanent {
                    status: "5.1.1".into(),
                    diagnostic: "smtp; 550 5.1.1 no such user".into(),
                    remote: Some("peer b.test".into()),
                },
            ),
            ("carol@b.test".into(), RcptOutcome::Delivered),
        ];
        let d = decide(&env, &route, &outcomes, at(1), &times());
        assert_eq!(
            d.failed_dsn,
            [Failure {
                rcpt: "bob@b.test".into(),
                status: "5.1.1".into(),
                diagnostic: "smtp; 550 5.1.1 no such user".into(),
                remote: Some("peer b.test".into()),
                orcpt: None,
            }]
        );
        assert_eq!(
            d.envelope.recipients[0].last_error.as_deref(),
            Some("smtp; 550 5.1.1 no such user")
        );
        assert!(d.done());
    }

    #[test]
    fn notify_never_fails_without_a_bounce() {
        let (mut env, route) = message(&["bob@b.test"]);
        env.recipients[0].dsn = RcptParams {
            notify: Some(Notify::NEVER),
            orcpt: None,
        };
        let outcomes = vec![(
            "bob@b.test".into(),
            RcptOutcome::Permanent {
                status: "5.0.0".into(),
                diagnostic: "no".into(),
                remote: None,
            },
        )];
        let d = decide(&env, &route, &outcomes, at(1), &times());
        assert!(d.failed_dsn.is_empty());
        assert!(matches!(&d.steps[0], Step::Failed { bounce: false, .. }));
        assert_eq!(d.disposal(true), Disposal::Remove);
    }

    #[test]
    fn delay_warning_is_sent_once_after_the_warning_time() {
        let (env, route) = message(&["bob@b.test"]);
        let t = times();
        // Before the warning time: nothing.
        let d = decide(&env, &route, &transient("bob@b.test"), at(HOUR), &t);
        assert!(d.delayed_dsn.is_none());
        // After it: one "delayed" DSN, saying until when we keep trying.
        let d = decide(
            &d.envelope,
            &route,
            &transient("bob@b.test"),
            at(4 * HOUR),
            &t,
        );
        let (warned, until) = d.delayed_dsn.clone().expect("a delay warning");
        assert_eq!(warned[0].status, "4.4.7");
        assert_eq!(warned[0].diagnostic, "X-Sipmail; call failed");
        assert_eq!(
            until,
            UNIX_EPOCH + Duration::from_secs(1_000_000 + 5 * 24 * HOUR)
        );
        assert!(d.envelope.recipients[0].delay_warned);
        // Never twice.
        let d = decide(
            &d.envelope,
            &route,
            &transient("bob@b.test"),
            at(5 * HOUR),
            &t,
        );
        assert!(d.delayed_dsn.is_none());
    }

    #[test]
    fn no_delay_warning_when_off_or_not_asked_for() {
        let (mut env, route) = message(&["bob@b.test"]);
        let off = QueueTimes {
            delay_warning: None,
            ..times()
        };
        let d = decide(&env, &route, &transient("bob@b.test"), at(10 * HOUR), &off);
        assert!(d.delayed_dsn.is_none());
        env.recipients[0].dsn.notify = Some(Notify::NEVER);
        let d = decide(
            &env,
            &route,
            &transient("bob@b.test"),
            at(10 * HOUR),
            &times(),
        );
        assert!(d.delayed_dsn.is_none());
    }

    #[test]
    fn outcomes_for_other_routes_or_settled_recipients_are_ignored() {
        let (mut env, route) = message(&["bob@b.test", "carol@b.test"]);
        env.recipients[1].state = RcptState::Delivered;
        let other = Route::Peer("elsewhere.test".into());
        let d = decide(&env, &other, &transient("bob@b.test"), at(1), &times());
        assert_eq!(d.envelope, env);
        assert!(d.steps.is_empty());
        let d = decide(&env, &route, &transient("carol@b.test"), at(1), &times());
        assert_eq!(d.envelope, env);
    }
}
