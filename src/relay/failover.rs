//! Failover across a partner's relays, sans-IO: which target to try next, given what
//! happened to the last one, and which targets were found down recently. The caller's
//! driver (`caller::place_call_in_turn`) feeds it outcomes and time; it decides.
//!
//! What moves on to the next relay (the relay, not the call, is at fault):
//! - the relay cannot be reached (connection refused, a closed or broken connection);
//! - no final answer within [`ANSWER_WAIT`] while another relay remains (a relay killed
//!   over UDP gives no error at all);
//! - `408`, `480`, `486` and any `5xx` (`503` overloaded, `500` no media port...);
//! - the call's set-up failed after the 200 OK: no media connection, no SMTP greeting.
//!
//! What does not (the answer would be the same at every relay of the site, or it is an
//! alarm that must reach the operator rather than be hidden by a call elsewhere):
//! - `403`, `404`, `488` and the other `4xx`, and `6xx`: the site refuses *us* (unknown
//!   key, not a partner, trust policy mismatch, an offer it cannot take) and every relay
//!   of the site applies the same policy;
//! - a failed signature, commitment, pin or key-continuity check: someone on the path (a
//!   tampering proxy) or at that relay is not who the key says. Trying the next relay
//!   would let whoever can break one call steer our mail to the relay of their choice and
//!   would bury the alarm; the mail stays queued and the log says why.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an INVITE may wait for its final answer before the next relay is tried, when
/// there is one (the last relay gets the full transaction time, 32 s). sipmail answers an
/// INVITE in milliseconds (it never rings), so 5 s means the relay is down or overloaded;
/// over UDP, where a dead relay sends nothing back, this is how "down" is noticed.
pub(crate) const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// How long a relay that failed stays at the back of the order: calls placed meanwhile
/// try the others first (and it last), instead of waiting [`ANSWER_WAIT`] on it each time.
pub(crate) const DOWN_HOLD: Duration = Duration::from_secs(30);

/// What happened to one attempt, as far as failover cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Connection refused, reset or closed before an answer.
    Unreachable,
    /// No final answer in time.
    NoAnswer,
    /// A final non-2xx answer.
    Status(u16),
    /// A 200 OK, then the media connection or the SMTP greeting failed.
    SetupFailed,
    /// A failure that must not move on: a security check, our own trouble.
    Final,
}

/// Should the next relay be tried after `a`? (See the module documentation.)
pub(crate) fn fails_over(a: Attempt) -> bool {
    match a {
        Attempt::Unreachable | Attempt::NoAnswer | Attempt::SetupFailed => true,
        Attempt::Status(s) => matches!(s, 408 | 480 | 486 | 500..=599),
        Attempt::Final => false,
    }
}

/// Relays found down, by label, and when.
#[derive(Debug, Default)]
pub(crate) struct DownList(HashMap<String, Instant>);

impl DownList {
    pub fn mark(&mut self, label: &str, now: Instant) {
        self.0.insert(label.to_string(), now);
    }
    pub fn clear(&mut self, label: &str) {
        self.0.remove(label);
    }
    fn is_down(&self, label: &str, now: Instant) -> bool {
        self.0
            .get(label)
            .is_some_and(|at| now.saturating_duration_since(*at) < DOWN_HOLD)
    }
    /// Forget entries older than [`DOWN_HOLD`] (keeps the map small).
    pub fn prune(&mut self, now: Instant) {
        self.0
            .retain(|_, at| now.saturating_duration_since(*at) < DOWN_HOLD);
    }
}

/// One call set-up's walk over the targets.
#[derive(Debug)]
pub(crate) struct Failover {
    /// Indexes into the targets, in the order to try them.
    order: Vec<usize>,
    next: usize,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Try target `index`; `last` says whether it is the last one left (it then gets the
    /// full INVITE transaction time instead of [`ANSWER_WAIT`]).
    Try { index: usize, last: bool },
    /// Stop: the outcome must not fail over, or no target is left.
    Stop,
}

impl Failover {
    /// The configured order, with relays found down within [`DOWN_HOLD`] moved to the
    /// back (in their configured order): they are still tried when the others fail.
    pub fn new(labels: &[&str], down: &DownList, now: Instant) -> Self {
        let (mut up, dn): (Vec<usize>, Vec<usize>) =
            (0..labels.len()).partition(|&i| !down.is_down(labels[i], now));
        up.extend(dn);
        Failover { order: up, next: 0 }
    }

    /// The first target to try.
    pub fn first(&mut self) -> Next {
        self.advance()
    }

    /// After an attempt that ended as `a`: the next target, or stop.
    pub fn after(&mut self, a: Attempt) -> Next {
        if !fails_over(a) {
            return Next::Stop;
        }
        self.advance()
    }

    fn advance(&mut self) -> Next {
        match self.order.get(self.next) {
            Some(&index) => {
                self.next += 1;
                Next::Try {
                    index,
                    last: self.next == self.order.len(),
                }
            }
            None => Next::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: [&str; 3] = ["b1", "b2", "b3"];

    #[test]
    fn targets_are_tried_in_order_while_failures_mean_the_relay() {
        let now = Instant::now();
        let mut f = Failover::new(&L, &DownList::default(), now);
        assert_eq!(
            f.first(),
            Next::Try {
                index: 0,
                last: false
            }
        );
        assert_eq!(
            f.after(Attempt::Unreachable),
            Next::Try {
                index: 1,
                last: false
            }
        );
        assert_eq!(
            f.after(Attempt::Status(503)),
            Next::Try {
                index: 2,
                last: true
            }
        );
        assert_eq!(f.after(Attempt::NoAnswer), Next::Stop);
    }

    #[test]
    fn refusals_and_security_failures_stop_at_once() {
        for a in [
            Attempt::Status(403),
            Attempt::Status(404),
            Attempt::Status(488),
            Attempt::Status(415),
            Attempt::Status(603),
            Attempt::Final,
        ] {
            let mut f = Failover::new(&L, &DownList::default(), Instant::now());
            f.first();
            assert_eq!(f.after(a), Next::Stop, "{a:?}");
        }
        for a in [
            Attempt::Status(408),
            Attempt::Status(480),
            Attempt::Status(486),
            Attempt::Status(500),
            Attempt::Status(503),
            Attempt::Status(504),
            Attempt::SetupFailed,
            Attempt::NoAnswer,
            Attempt::Unreachable,
        ] {
            assert!(fails_over(a), "{a:?}");
        }
    }

    #[test]
    fn a_relay_found_down_goes_last_for_a_while() {
        let t0 = Instant::now();
        let mut down = DownList::default();
        down.mark("b1", t0);
        let mut f = Failover::new(&L, &down, t0 + Duration::from_secs(10));
        assert_eq!(
            f.first(),
            Next::Try {
                index: 1,
                last: false
            }
        );
        assert_eq!(
            f.after(Attempt::Status(503)),
            Next::Try {
                index: 2,
                last: false
            }
        );
        // Still tried, last.
        assert_eq!(
            f.after(Attempt::Unreachable),
            Next::Try {
                index: 0,
                last: true
            }
        );
        // After DOWN_HOLD it is back in its place.
        let mut f = Failover::new(&L, &down, t0 + DOWN_HOLD);
        assert_eq!(
            f.first(),
            Next::Try {
                index: 0,
                last: false
            }
        );
        down.prune(t0 + DOWN_HOLD);
        assert!(down.0.is_empty());
        down.mark("b2", t0);
        down.clear("b2");
        assert!(down.0.is_empty());
    }

    #[test]
    fn one_target_is_the_last_at_once() {
        let mut f = Failover::new(&["only"], &DownList::default(), Instant::now());
        assert_eq!(
            f.first(),
            Next::Try {
                index: 0,
                last: true
            }
        );
        assert_eq!(f.after(Attempt::Unreachable), Next::Stop);
        let mut f = Failover::new(&[], &DownList::default(), Instant::now());
        assert_eq!(f.first(), Next::Stop);
    }
}
