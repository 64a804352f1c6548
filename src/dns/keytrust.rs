//! The `trust = "dnssec"` rules for a key found in DNS, sans-IO: what the resolver said,
//! the keys found, and the pin in; use (and how the pin changes) or refuse out.
//!
//! - An insecure answer is never trusted by DNS's word. The operator's configured policy
//!   applies instead ([`InsecureKeys`]): the mail waits (`refuse`, the default), or the
//!   keys found wait as pending for the operator, and once `sipmail trust accept` pinned
//!   one, an insecure answer that holds the pinned key is used (`pending`: the operator
//!   vouched for the key, the call's signatures bind it; DNS only carried it). A
//!   `[[peer]]` with another trust policy is the other way.
//! - Nothing pinned: one key is pinned on first use; several different keys are refused
//!   (which is the partner's is not for DNS to say on first use).
//! - The pinned key among those found: used.
//! - Another key that the pinned one certified (a secure answer that changed, vouched
//!   for by the old key): used and re-pinned.
//! - Anything else: refused, and an alert (`sipmail trust accept DOMAIN FPR` after
//!   checking with the partner).

use super::client::Security;

/// One key found in the OPENPGPKEY answer (already checked for `mail@<domain>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub fingerprint: String,
    /// The pinned key made a certification of this key's `mail@<domain>` that verifies.
    pub certified_by_pinned: bool,
}

/// What happens to the pin when a key is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinAction {
    /// The pinned key: nothing changes.
    Keep,
    /// First use: pin it.
    PinFirst,
    /// A key the pinned one certified: it becomes the pin.
    Repin { old: String },
}

/// What an insecure (unsigned) OPENPGPKEY answer may lead to: `[discovery] insecure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InsecureKeys {
    /// Never used; the mail waits (the default).
    #[default]
    Refuse,
    /// Kept as pending for `sipmail trust accept`; the accepted (pinned) key is then used
    /// from insecure answers that hold it.
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error(
        "the OPENPGPKEY answer for mail@{domain} is not DNSSEC-secure (the resolver set no AD bit): a key from unsigned DNS is never trusted; the partner signs its zone, or you configure [discovery] insecure = \"pending\" (then accept its key by hand), or a [[peer]] for {domain} with another trust policy"
    )]
    Insecure { domain: String },
    #[error(
        "the OPENPGPKEY answer for mail@{domain} is not DNSSEC-secure and holds {}{}, which no operator accepted: kept as pending ([discovery] insecure = \"pending\"); check the fingerprint with the partner, then `sipmail trust accept {domain} FINGERPRINT`",
        found.join(", "),
        pinned.as_deref().map(|p| format!(", not the pinned key {p}")).unwrap_or_default()
    )]
    InsecurePending {
        domain: String,
        pinned: Option<String>,
        found: Vec<String>,
    },
    #[error(
        "the key of mail@{domain} in DNS changed (pinned {pinned}, DNS now has {}) and the pinned key did not certify the new one: refused; check with the partner, then `sipmail trust accept {domain} FINGERPRINT`",
        found.join(", ")
    )]
    Changed {
        domain: String,
        pinned: String,
        found: Vec<String>,
    },
    #[error(
        "the OPENPGPKEY answer for mail@{domain} holds several keys ({}) and none is pinned: refused; the partner should publish one, or accept one with `sipmail trust accept {domain} FINGERPRINT` after it is recorded",
        found.join(", ")
    )]
    Ambiguous { domain: String, found: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Use `candidates[index]`.
    Use {
        index: usize,
        action: PinAction,
    },
    Refuse(KeyRefusal),
}

/// The rules above. `pinned`: the pinned fingerprint (uppercase hex), if any;
/// `insecure`: the operator's policy for an insecure answer.
pub fn decide(
    domain: &str,
    security: Security,
    candidates: &[Candidate],
    pinned: Option<&str>,
    insecure: InsecureKeys,
) -> Verdict {
    let domain = domain.to_string();
    let found = || -> Vec<String> {
        let mut v: Vec<String> = candidates.iter().map(|c| c.fingerprint.clone()).collect();
        v.dedup();
        v
    };
    if security != Security::Secure {
        if insecure == InsecureKeys::Refuse {
            return Verdict::Refuse(KeyRefusal::Insecure { domain });
        }
        // Only the key an operator accepted; no first use, and no re-pin on a
        // certification carried by an answer anyone could have forged.
        if let Some(p) = pinned
            && let Some(i) = candidates
                .iter()
                .position(|c| c.fingerprint.eq_ignore_ascii_case(p))
        {
            return Verdict::Use {
                index: i,
                action: PinAction::Keep,
            };
        }
        return Verdict::Refuse(KeyRefusal::InsecurePending {
            domain,
            pinned: pinned.map(str::to_ascii_uppercase),
            found: found(),
        });
    }
    match pinned {
        Some(p) => {
            if let Some(i) = candidates
                .iter()
                .position(|c| c.fingerprint.eq_ignore_ascii_case(p))
            {
                return Verdict::Use {
                    index: i,
                    action: PinAction::Keep,
                };
            }
            if let Some(i) = candidates.iter().position(|c| c.certified_by_pinned) {
                return Verdict::Use {
                    index: i,
                    action: PinAction::Repin {
                        old: p.to_ascii_uppercase(),
                    },
                };
            }
            Verdict::Refuse(KeyRefusal::Changed {
                domain,
                pinned: p.to_ascii_uppercase(),
                found: found(),
            })
        }
        None => {
            let f = found();
            if f.len() == 1 {
                Verdict::Use {
                    index: 0,
                    action: PinAction::PinFirst,
                }
            } else {
                Verdict::Refuse(KeyRefusal::Ambiguous { domain, found: f })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(f: &str, certified: bool) -> Candidate {
        Candidate {
            fingerprint: f.into(),
            certified_by_pinned: certified,
        }
    }

    use InsecureKeys::{Pending, Refuse};

    #[test]
    fn insecure_is_never_trusted_whatever_the_pin() {
        for pinned in [None, Some("AA")] {
            assert_eq!(
                decide(
                    "b.test",
                    Security::Insecure,
                    &[c("AA", false)],
                    pinned,
                    Refuse
                ),
                Verdict::Refuse(KeyRefusal::Insecure {
                    domain: "b.test".into()
                })
            );
        }
    }

    #[test]
    fn insecure_pending_uses_only_the_accepted_key() {
        // First use: pending, never pinned from an insecure answer.
        assert_eq!(
            decide(
                "b.test",
                Security::Insecure,
                &[c("AA", false)],
                None,
                Pending
            ),
            Verdict::Refuse(KeyRefusal::InsecurePending {
                domain: "b.test".into(),
                pinned: None,
                found: vec!["AA".into()]
            })
        );
        // The accepted key, even beside another.
        assert_eq!(
            decide(
                "b.test",
                Security::Insecure,
                &[c("BB", false), c("AA", false)],
                Some("aa"),
                Pending
            ),
            Verdict::Use {
                index: 1,
                action: PinAction::Keep
            }
        );
        // A change, even one the pinned key certified: pending (the certification
        // arrived in an answer anyone could forge; the operator decides).
        let v = decide(
            "b.test",
            Security::Insecure,
            &[c("BB", true)],
            Some("AA"),
            Pending,
        );
        let Verdict::Refuse(r) = v else {
            panic!("{v:?}")
        };
        assert!(
            r.to_string().contains("not the pinned key AA")
                && r.to_string().contains("sipmail trust accept b.test"),
            "{r}"
        );
    }

    #[test]
    fn first_use_pins_one_key_and_refuses_several() {
        assert_eq!(
            decide("b.test", Security::Secure, &[c("AA", false)], None, Refuse),
            Verdict::Use {
                index: 0,
                action: PinAction::PinFirst
            }
        );
        assert!(matches!(
            decide(
                "b.test",
                Security::Secure,
                &[c("AA", false), c("BB", false)],
                None,
                Refuse
            ),
            Verdict::Refuse(KeyRefusal::Ambiguous { .. })
        ));
    }

    #[test]
    fn the_pinned_key_is_used_even_beside_others() {
        assert_eq!(
            decide(
                "b.test",
                Security::Secure,
                &[c("BB", false), c("AA", false)],
                Some("aa"),
                Refuse
            ),
            Verdict::Use {
                index: 1,
                action: PinAction::Keep
            }
        );
    }

    #[test]
    fn a_changed_key_needs_the_old_keys_certification() {
        assert_eq!(
            decide(
                "b.test",
                Security::Secure,
                &[c("BB", true)],
                Some("AA"),
                Refuse
            ),
            Verdict::Use {
                index: 0,
                action: PinAction::Repin { old: "AA".into() }
            }
        );
        let v = decide(
            "b.test",
            Security::Secure,
            &[c("BB", false)],
            Some("AA"),
            Refuse,
        );
        let Verdict::Refuse(r) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            r,
            KeyRefusal::Changed {
                domain: "b.test".into(),
                pinned: "AA".into(),
                found: vec!["BB".into()]
            }
        );
        assert!(r.to_string().contains("sipmail trust accept b.test"), "{r}");
    }
}
