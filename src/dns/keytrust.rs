//! The `trust = "dnssec"` rules for a key found in DNS, sans-IO: what the resolver said,
//! the keys found, and the pin in; use (and how the pin changes) or refuse out.
//!
//! - An insecure answer is never trusted (the operator's configured policy applies
//!   instead: a `[[peer]]` with another trust, or the mail waits).
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error(
        "the OPENPGPKEY answer for mail@{domain} is not DNSSEC-secure (the resolver set no AD bit): a key from unsigned DNS is never trusted; sign the zone, or configure a [[peer]] for {domain} with another trust policy"
    )]
    Insecure { domain: String },
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

/// The rules above. `pinned`: the pinned fingerprint (uppercase hex), if any.
pub fn decide(
    domain: &str,
    security: Security,
    candidates: &[Candidate],
    pinned: Option<&str>,
) -> Verdict {
    let domain = domain.to_string();
    if security != Security::Secure {
        return Verdict::Refuse(KeyRefusal::Insecure { domain });
    }
    let found = || -> Vec<String> {
        let mut v: Vec<String> = candidates.iter().map(|c| c.fingerprint.clone()).collect();
        v.dedup();
        v
    };
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

    #[test]
    fn insecure_is_never_trusted_whatever_the_pin() {
        for pinned in [None, Some("AA")] {
            assert_eq!(
                decide("b.test", Security::Insecure, &[c("AA", false)], pinned),
                Verdict::Refuse(KeyRefusal::Insecure {
                    domain: "b.test".into()
                })
            );
        }
    }

    #[test]
    fn first_use_pins_one_key_and_refuses_several() {
        assert_eq!(
            decide("b.test", Security::Secure, &[c("AA", false)], None),
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
                None
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
                Some("aa")
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
            decide("b.test", Security::Secure, &[c("BB", true)], Some("AA")),
            Verdict::Use {
                index: 0,
                action: PinAction::Repin { old: "AA".into() }
            }
        );
        let v = decide("b.test", Security::Secure, &[c("BB", false)], Some("AA"));
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
