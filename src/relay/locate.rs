//! Where a call to a partner goes: an ordered list of [`CallTarget`]s, tried in turn by
//! `caller.rs` as [`super::failover`] decides. A static `[[peer]] sip` gives one URI or a
//! list (several relays of one site, tried in the order written); each host name is
//! resolved here. (SRV location from DNS produces the same ordered list.)

use crate::config::{Peer, SipTarget};
use crate::sip::Transport;
use std::net::SocketAddr;
use std::time::Duration;

/// One place to send the INVITE (the same type the DNS location produces).
pub(crate) use crate::dns::CallTarget;

/// How long resolving one target's host name may take.
const RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// Where to call `peer`, in order: `sip = "dns"` and discovered partners by SRV
/// (`crate::dns::locate`, RFC 3263), else the configured URIs, resolved. Err names why
/// nothing is left to call.
pub(crate) async fn locate(
    site: &super::site::Site,
    peer: &Peer,
) -> Result<Vec<CallTarget>, Unlocated> {
    if peer.dns {
        let r = site
            .resolver
            .as_ref()
            .ok_or_else(|| Unlocated::Static(format!("{}: no [dns] resolver", peer.domain)))?;
        let mut random = crate::dns::srv::os_random;
        let loc = crate::dns::locate(r, &peer.domain, &site.own_sip, &mut random)
            .await
            .map_err(Unlocated::Dns)?;
        for s in &loc.skipped_self {
            tracing::warn!(peer = %peer.domain, target = %s, "SRV target skipped: it is this relay itself");
        }
        tracing::debug!(peer = %peer.domain, targets = loc.targets.len(), dnssec = %loc.security,
            "partner's relays located in DNS");
        return Ok(loc.targets);
    }
    locate_static(peer).await.map_err(Unlocated::Static)
}

/// Why there is nothing to call: DNS said so (counted as a DNS failure), or no configured
/// URI resolved.
#[derive(Debug)]
pub(crate) enum Unlocated {
    Dns(crate::dns::LocateError),
    Static(String),
}

/// The configured URIs of `peer`, resolved, in order. A host that does not resolve is
/// left out (and logged); Err when none is left, naming each failure.
async fn locate_static(peer: &Peer) -> Result<Vec<CallTarget>, String> {
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for t in &peer.sip {
        match resolve(t).await {
            Ok(addr) => out.push(target_of(t, addr)),
            Err(e) => {
                tracing::warn!(peer = %peer.domain, target = %t, reason = %e,
                    "cannot resolve this relay of the peer; trying the others");
                failures.push(format!("{t}: {e}"));
            }
        }
    }
    if out.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(out)
}

/// The call target for `t` resolved to `addr`. Pure.
pub(crate) fn target_of(t: &SipTarget, addr: SocketAddr) -> CallTarget {
    let uri = t.to_string();
    let label = if t.host.parse::<std::net::IpAddr>().is_ok()
        || t.host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
    {
        uri
    } else {
        format!("{uri} ({addr})")
    };
    CallTarget {
        addr,
        transport: if t.tcp {
            Transport::Tcp
        } else {
            Transport::Udp
        },
        label,
        // The operator wrote this URI; a host name in it is resolved by the system
        // resolver, the operator's choice of trust for it (docs/ARCHITECTURE.md).
        authentic: true,
    }
}

async fn resolve(t: &SipTarget) -> Result<SocketAddr, String> {
    let addrs = crate::dns::system::lookup(&t.host, t.port, RESOLVE_WAIT)
        .await
        .map_err(|e| e.to_string())?;
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| "no address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_configured_uri() {
        let t = SipTarget::parse("sip:mail@127.0.0.1:5062;transport=tcp").unwrap();
        let c = target_of(&t, "127.0.0.1:5062".parse().unwrap());
        assert_eq!(c.label, "sip:mail@127.0.0.1:5062;transport=tcp");
        assert_eq!(c.transport, Transport::Tcp);
        let t = SipTarget::parse("sip:mail@b1.site-b.test:5070").unwrap();
        let c = target_of(&t, "192.0.2.4:5070".parse().unwrap());
        assert_eq!(c.label, "sip:mail@b1.site-b.test:5070 (192.0.2.4:5070)");
        assert_eq!(c.transport, Transport::Udp);
        let t = SipTarget::parse("sip:mail@[::1]:5070").unwrap();
        let c = target_of(&t, "[::1]:5070".parse().unwrap());
        assert_eq!(c.label, "sip:mail@[::1]:5070");
    }

    #[tokio::test]
    async fn unresolvable_relays_are_skipped_and_none_left_is_an_error() {
        let raw = |sip: &[&str]| Peer {
            domain: "b.test".into(),
            sip: sip.iter().map(|s| SipTarget::parse(s).unwrap()).collect(),
            trust: crate::config::Trust::Signed,
            continuity: Default::default(),
            fingerprints: None,
            senders: vec![],
            dns: false,
            inbox: None,
            outbox: None,
        };
        // .invalid never resolves (RFC 2606).
        let p = raw(&["sip:mail@relay.invalid:5062", "sip:mail@127.0.43.7:43062"]);
        let t = locate_static(&p).await.unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].addr, "127.0.43.7:43062".parse().unwrap());
        let e = locate_static(&raw(&["sip:mail@relay.invalid:5062"]))
            .await
            .unwrap_err();
        assert!(e.contains("sip:mail@relay.invalid:5062"), "{e}");
    }
}
