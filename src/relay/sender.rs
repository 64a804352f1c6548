//! Which envelope senders a peer may use over its authenticated call (issue 11, item 2).
//!
//! Pure: the decision takes the configured domains and the reverse path as the SMTP
//! parser handed it over, and returns `Ok` or a refusal that becomes `550 5.7.1`.
//!
//! A peer may send as `<>` (bounces), as its own domain and any subdomain of it, and as
//! the domains listed for it in `[[peer]] senders = [...]` and their subdomains. Domains
//! compare in their ASCII (A-label) form, case-insensitively, without a trailing dot; a
//! subdomain matches on a label boundary only (`evilsite-a.test` is not under
//! `site-a.test`). When the sender's domain lies under our own domain, or under another
//! configured peer's domain, more specifically than under anything this peer may use,
//! it is refused: a peer whose domain is `corp.test` may not send as `eu.corp.test` when
//! that is us or another partner.

use crate::smtp::Reply;

/// Everything the decision needs, in normalised (A-label, lower-case) form.
#[derive(Clone, Debug)]
pub struct SenderPolicy<'a> {
    /// The authenticated peer's domain.
    pub peer: &'a str,
    /// `[[peer]] senders` of that peer.
    pub senders: &'a [String],
    /// Our own `relay.domain`.
    pub own: &'a str,
    /// Every configured peer's domain (this peer's included or not, either is fine).
    pub peers: &'a [&'a str],
}

/// Why a reverse path was refused. Each names the authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SenderRefusal {
    #[error("<{sender}>: sender domain not allowed for authenticated peer {peer}")]
    NotAllowed { sender: String, peer: String },
    #[error("<{sender}>: an address literal is not a sender domain for authenticated peer {peer}")]
    AddressLiteral { sender: String, peer: String },
    #[error("<{sender}>: sender domain is not a valid domain name (authenticated peer {peer})")]
    BadDomain { sender: String, peer: String },
    /// The local part holds an `@` once unquoted: readers that split at the first `@`
    /// would see another domain than the one checked here.
    #[error(
        "<{sender}>: ambiguous sender address (\"@\" in the local part) from authenticated peer {peer}"
    )]
    Ambiguous { sender: String, peer: String },
}

impl SenderRefusal {
    /// `550 5.7.1 ...` (RFC 3463: delivery not authorized).
    pub fn reply(&self) -> Reply {
        Reply::new(550, (5, 7, 1), self.to_string())
    }
}

/// A domain in the form used for comparison: one trailing dot removed, IDNA (UTS #46) to
/// A-labels, lower case, LDH labels of 1..=63 octets, at most 253 octets in all. `None`
/// if it is not a domain name (address literals included).
pub fn normalise_domain(d: &str) -> Option<String> {
    crate::domain::normalise_domain(d)
}

/// `d` is `base` or a subdomain of it, on a label boundary. Both normalised.
pub fn within(d: &str, base: &str) -> bool {
    d == base
        || (d.len() > base.len()
            && d.ends_with(base)
            && d.as_bytes()[d.len() - base.len() - 1] == b'.')
}

/// How specifically `d` lies under `base`: the number of labels of `base`, if it does.
fn depth(d: &str, base: &str) -> Option<usize> {
    within(d, base).then(|| base.split('.').count())
}

/// May the authenticated peer send with this reverse path? `from` is the address as the
/// SMTP parser gave it (`""` for `<>`, quotes of a quoted local part removed).
pub fn check_peer_sender(policy: &SenderPolicy<'_>, from: &str) -> Result<(), SenderRefusal> {
    if from.is_empty() {
        return Ok(());
    }
    let peer = policy.peer.to_string();
    let sender = crate::relay::trace::clean(from);
    let Some((local, domain)) = from.rsplit_once('@') else {
        return Err(SenderRefusal::BadDomain { sender, peer });
    };
    if local.contains('@') {
        return Err(SenderRefusal::Ambiguous { sender, peer });
    }
    if domain.starts_with('[') {
        return Err(SenderRefusal::AddressLiteral { sender, peer });
    }
    let Some(domain) = normalise_domain(domain) else {
        return Err(SenderRefusal::BadDomain { sender, peer });
    };
    // The most specific base this peer may use...
    let mine = std::iter::once(policy.peer)
        .chain(policy.senders.iter().map(String::as_str))
        .filter_map(|b| depth(&domain, b))
        .max();
    // ...must be more specific than us or any other partner (ties go to them).
    let theirs = std::iter::once(policy.own)
        .chain(policy.peers.iter().copied().filter(|p| *p != policy.peer))
        .filter_map(|b| depth(&domain, b))
        .max();
    match (mine, theirs) {
        (Some(_), None) => Ok(()),
        (Some(m), Some(t)) if m > t => Ok(()),
        _ => Err(SenderRefusal::NotAllowed { sender, peer }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(from: &str) -> Result<(), SenderRefusal> {
        let senders = vec!["partner.test".to_string(), "xn--bcher-kva.test".to_string()];
        let peers = ["site-c.test", "site-a.test", "eu.site-c.test"];
        let p = SenderPolicy {
            peer: "site-c.test",
            senders: &senders,
            own: "site-b.test",
            peers: &peers,
        };
        check_peer_sender(&p, from)
    }

    #[test]
    fn own_domain_subdomains_listed_domains_and_null_sender_pass() {
        for ok in [
            "",
            "ceo@site-c.test",
            "CEO@SITE-C.TEST",
            "ceo@site-c.test.",
            "x@mail.site-c.test",
            "john doe@site-c.test",
            "x@partner.test",
            "x@lists.partner.test",
            "x@xn--bcher-kva.test",
            "jörg@bücher.test",
            "jörg@BÜCHER.test",
            "jörg@münchen.site-c.test",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn other_domains_are_refused_naming_the_peer() {
        for bad in [
            "ceo@site-a.test",
            "it-admin@site-b.test",
            "it-admin@SITE-B.TEST.",
            "x@mail.site-b.test",
            "ceo@evilsite-c.test",
            "ceo@site-c.test.evil.test",
            "x@test",
            "x@evilpartner.test",
            "x@bücher.test.evil",
            // Another partner's domain under ours is theirs, not ours to give away.
            "x@eu.site-c.test",
            "x@mail.eu.site-c.test",
        ] {
            let e = check(bad).unwrap_err();
            assert!(
                matches!(e, SenderRefusal::NotAllowed { .. }),
                "{bad}: {e:?}"
            );
            let r = e.reply();
            assert_eq!((r.code, r.enhanced), (550, Some((5, 7, 1))), "{bad}");
            assert!(
                e.to_string().contains("authenticated peer site-c.test"),
                "{e}"
            );
        }
        let e = check("ceo@site-a.test").unwrap_err().to_string();
        assert_eq!(
            e,
            "<ceo@site-a.test>: sender domain not allowed for authenticated peer site-c.test"
        );
    }

    #[test]
    fn literals_quoted_at_signs_and_junk_are_refused() {
        assert!(matches!(
            check("x@[127.0.0.1]"),
            Err(SenderRefusal::AddressLiteral { .. })
        ));
        assert!(matches!(
            check("x@[IPv6:::1]"),
            Err(SenderRefusal::AddressLiteral { .. })
        ));
        // `"ceo@site-a.test"@site-c.test` after the parser removed the quotes.
        assert!(matches!(
            check("ceo@site-a.test@site-c.test"),
            Err(SenderRefusal::Ambiguous { .. })
        ));
        for junk in [
            "nodomain",
            "x@",
            "x@.",
            "x@site-c..test",
            "x@-site-c.test",
            "x@site_c.test",
            "x@site-c.test..",
            "x@xn--zz.site-c.test",
        ] {
            assert!(
                matches!(check(junk), Err(SenderRefusal::BadDomain { .. })),
                "{junk}: {:?}",
                check(junk)
            );
        }
        // Control characters never reach the reply text.
        let e = check("a\r\nb@site-x.test").unwrap_err().to_string();
        assert!(!e.contains('\r') && !e.contains('\n'), "{e}");
    }

    #[test]
    fn a_peer_under_our_domain_may_use_its_own() {
        let peers = ["eu.site-b.test"];
        let p = SenderPolicy {
            peer: "eu.site-b.test",
            senders: &[],
            own: "site-b.test",
            peers: &peers,
        };
        assert_eq!(check_peer_sender(&p, "x@eu.site-b.test"), Ok(()));
        assert_eq!(check_peer_sender(&p, "x@a.eu.site-b.test"), Ok(()));
        assert!(check_peer_sender(&p, "x@site-b.test").is_err());
        // And a peer above our domain does not get ours.
        let peers = ["corp.test"];
        let p = SenderPolicy {
            peer: "corp.test",
            senders: &[],
            own: "eu.corp.test",
            peers: &peers,
        };
        assert_eq!(check_peer_sender(&p, "x@corp.test"), Ok(()));
        assert!(check_peer_sender(&p, "x@eu.corp.test").is_err());
        assert!(check_peer_sender(&p, "x@mx.eu.corp.test").is_err());
    }

    #[test]
    fn within_is_on_label_boundaries() {
        // normalise_domain itself is tested in crate::domain.
        assert!(within("a.b.c", "b.c") && within("b.c", "b.c"));
        assert!(!within("ab.c", "b.c") && !within("c", "b.c"));
    }
}
