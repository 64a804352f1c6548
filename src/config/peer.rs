//! `[[peer]]`: the partner relays, how each is authenticated, and which sender domains
//! each may use.

use super::raw::{RawPeer, RawSipTargets};
use super::values::{SipTarget, valid_domain};
use super::{ConfigError, Errors, Psk};

/// How calls with one peer are authenticated (`trust = ...` on a `[[peer]]`).
#[derive(Clone, Debug)]
pub enum Trust {
    /// OpenPGP signatures by the peer's cert in our keyring (the default).
    Signed,
    /// HMAC over the transcript with a pre-shared key (`psk_file`).
    Psk(Psk),
    /// Signatures by a key the peer presents, pinned on first use.
    Opportunistic,
    /// Signatures by the cert of the peer's DNSSEC-secure OPENPGPKEY record (RFC 7929),
    /// pinned; a changed key only if the pinned one certified it, or through
    /// `sipmail trust accept`. On the wire, the same as `signed`.
    Dnssec,
}

impl Trust {
    pub fn mode(&self) -> crate::handshake::AuthMode {
        use crate::handshake::AuthMode;
        match self {
            Trust::Signed => AuthMode::Signed,
            Trust::Psk(_) => AuthMode::Psk,
            Trust::Opportunistic => AuthMode::Opportunistic,
            Trust::Dnssec => AuthMode::Signed,
        }
    }
}

/// `[[peer]] fingerprints`: each 40 (v4) or 64 (v6) hex digits, spaces and a `0x` allowed;
/// uppercased. An empty list would refuse the peer for good, so it is an error too.
fn parse_fingerprints(list: &[String]) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err(
            "an empty list accepts no certificate: list the partner's fingerprints or remove the key"
                .into(),
        );
    }
    list.iter()
        .map(|f| {
            crate::keyring::normalize_fingerprint(f).map_err(|_| {
                format!("\"{f}\" is not a fingerprint: expected 40 (v4) or 64 (v6) hex digits")
            })
        })
        .collect()
}

/// What a retained-secret mismatch does (`continuity = ...` on a `[[peer]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ContinuityPolicy {
    /// Log a warning and go on without the old secret (the default).
    #[default]
    Warn,
    /// Refuse the call; the mail stays queued until an operator runs `sipmail trust reset`.
    Require,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub domain: String,
    /// The partner's relays, tried in this order (`sip = "URI"` or `sip = ["URI", ...]`);
    /// never empty.
    pub sip: Vec<SipTarget>,
    pub trust: Trust,
    pub continuity: ContinuityPolicy,
    /// `fingerprints = [...]`: the only certificates (uppercase hex) that may speak for
    /// this peer; `None`: any certificate imported for its domain.
    pub fingerprints: Option<Vec<String>>,
    /// Further sender domains (and their subdomains) this peer may use in MAIL FROM over
    /// its calls, besides its own domain; A-labels, lower case (`senders = [...]`).
    pub senders: Vec<String>,
    /// `sip = "dns"`: the relay's address comes from the domain's SRV records (RFC 3263);
    /// `sip` is then empty: each call locates the relays by SRV.
    pub dns: bool,
    /// `inbox = "DIR"`: the attachments of this partner's messages are also written into
    /// DIR (each to `DIR/tmp/` first, then renamed into place) when they are delivered.
    pub inbox: Option<std::path::PathBuf>,
    /// `outbox = "DIR"`: files renamed into DIR are sent to this partner, one message
    /// each, and moved to `DIR/sent/` with their receipt or to `DIR/failed/` with the reason.
    pub outbox: Option<Outbox>,
}

/// A partner's outbox directory (`[[peer]] outbox`, `outbox_to`, `outbox_from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbox {
    pub dir: std::path::PathBuf,
    /// The recipients at the partner (at least one, each in the partner's domain).
    pub to: Vec<String>,
    /// The sender; `None`: postmaster@ our domain.
    pub from: Option<String>,
}

impl Peer {
    /// A partner found through `[discovery]`: no `[[peer]]`, location and key from DNS.
    pub fn discovered(domain: &str) -> Peer {
        Peer {
            domain: domain.to_ascii_lowercase(),
            sip: Vec::new(),
            trust: Trust::Dnssec,
            continuity: ContinuityPolicy::Warn,
            fingerprints: None,
            senders: Vec::new(),
            dns: true,
            inbox: None,
            outbox: None,
        }
    }
}

/// Every `[[peer]]`, checked against each other and against our own `domain`.
pub(super) fn parse_peers(
    raw: &[RawPeer],
    domain: &str,
    e: Errors<'_>,
) -> Result<Vec<Peer>, ConfigError> {
    let mut peers: Vec<Peer> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let peer = parse_peer(i, p, domain, &peers, e)?;
        peers.push(peer);
    }
    // A domain listed for one peer that is another peer's own would never be honoured
    // (the more specific owner wins, see relay::sender): say so rather than ignore it.
    for (i, p) in peers.iter().enumerate() {
        if let Some(s) = p
            .senders
            .iter()
            .find(|s| peers.iter().any(|q| q.domain == **s))
        {
            return Err(e.bad(
                &format!("peer[{i}].senders"),
                format!(
                    "\"{s}\" is the domain of another [[peer]], which only that peer may send as"
                ),
            ));
        }
    }
    Ok(peers)
}

/// `peer[i]`, given the peers before it.
fn parse_peer(
    i: usize,
    p: &RawPeer,
    domain: &str,
    peers: &[Peer],
    e: Errors<'_>,
) -> Result<Peer, ConfigError> {
    let bad = |key: &str, msg: String| e.bad(key, msg);
    let key = format!("peer[{i}]");
    let d = p.domain.to_ascii_lowercase();
    if !valid_domain(&d) {
        return Err(bad(
            &format!("{key}.domain"),
            format!("\"{d}\" is not a domain name"),
        ));
    }
    if d == domain {
        return Err(bad(
            &format!("{key}.domain"),
            format!("\"{d}\" is our own relay.domain"),
        ));
    }
    if peers.iter().any(|q| q.domain == d) {
        return Err(bad(
            &format!("{key}.domain"),
            format!("\"{d}\" is listed twice"),
        ));
    }
    // `sip = "dns"`: located by SRV at each call (crate::dns::locate), no static target.
    let dns = matches!(&p.sip, RawSipTargets::One(s) if s.eq_ignore_ascii_case("dns"));
    let sip = if dns {
        Vec::new()
    } else {
        parse_sip_targets(&p.sip).map_err(|m| bad(&format!("{key}.sip"), m))?
    };
    let trust = parse_trust(&key, p, e)?;
    let continuity = match p.continuity.as_deref() {
        None | Some("warn") => ContinuityPolicy::Warn,
        Some("require") => ContinuityPolicy::Require,
        Some(other) => {
            return Err(bad(
                &format!("{key}.continuity"),
                format!("\"{other}\" is not one of warn, require"),
            ));
        }
    };
    let fingerprints = match &p.fingerprints {
        None => None,
        Some(_) if !matches!(trust, Trust::Signed) => {
            return Err(bad(
                &format!("{key}.fingerprints"),
                "fingerprints is only used with trust = \"signed\"".into(),
            ));
        }
        Some(list) => {
            Some(parse_fingerprints(list).map_err(|m| bad(&format!("{key}.fingerprints"), m))?)
        }
    };
    let senders = parse_senders(&key, p, &d, domain, e)?;
    if let Trust::Psk(k) = &trust
        && let Some(j) = peers.iter().position(|q| match &q.trust {
            Trust::Psk(other) => other.as_bytes() == k.as_bytes(),
            _ => false,
        })
    {
        // The MAC names no one: a peer holding another's PSK could call as it.
        return Err(bad(
            &format!("{key}.psk_file"),
            format!(
                "{d} has the same pre-shared key as {} (peer[{j}]); each peer needs its own, or either could call as the other: `sipmail psk generate --out FILE`",
                peers[j].domain
            ),
        ));
    }
    let inbox = match &p.inbox {
        Some(dir) if !matches!(trust, Trust::Signed) => {
            return Err(bad(
                &format!("{key}.inbox"),
                format!(
                    "{}: an inbox is only for partners with trust = \"signed\" (their messages carry signed receipts)",
                    dir.display()
                ),
            ));
        }
        Some(dir) if !dir.is_absolute() => {
            return Err(bad(
                &format!("{key}.inbox"),
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        other => other.clone(),
    };
    let outbox = match (&p.outbox, &p.outbox_to) {
        (None, None) if p.outbox_from.is_none() => None,
        (None, _) => {
            return Err(bad(
                &format!("{key}.outbox"),
                "outbox_to and outbox_from need outbox = \"DIR\"".into(),
            ));
        }
        (Some(_), _) if !matches!(trust, Trust::Signed) => {
            return Err(bad(
                &format!("{key}.outbox"),
                "an outbox is only for partners with trust = \"signed\" (a file leaves it only with a signed receipt)".into(),
            ));
        }
        (Some(dir), _) if !dir.is_absolute() => {
            return Err(bad(
                &format!("{key}.outbox"),
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        (Some(_), None) => {
            return Err(bad(
                &format!("{key}.outbox_to"),
                format!("the outbox needs outbox_to = [\"someone@{d}\"], who receives its files"),
            ));
        }
        (Some(dir), Some(to)) => {
            if to.is_empty() {
                return Err(bad(&format!("{key}.outbox_to"), "is empty".into()));
            }
            for t in to {
                let ok = t
                    .rsplit_once('@')
                    .is_some_and(|(l, dom)| !l.is_empty() && dom.eq_ignore_ascii_case(&d));
                if !ok {
                    return Err(bad(
                        &format!("{key}.outbox_to"),
                        format!("{t:?} is not an address at {d}"),
                    ));
                }
            }
            Some(Outbox {
                dir: dir.clone(),
                to: to.clone(),
                from: p.outbox_from.clone(),
            })
        }
    };
    Ok(Peer {
        domain: d,
        sip,
        trust,
        continuity,
        fingerprints,
        senders,
        dns,
        inbox,
        outbox,
    })
}

/// `sip`: one URI or a non-empty list of distinct URIs, in the order they are tried.
fn parse_sip_targets(raw: &RawSipTargets) -> Result<Vec<SipTarget>, String> {
    let list: Vec<&String> = match raw {
        RawSipTargets::One(s) => vec![s],
        RawSipTargets::Many(v) => v.iter().collect(),
    };
    if list.is_empty() {
        return Err("an empty list names no relay: give one URI or a list of them".into());
    }
    let mut out: Vec<SipTarget> = Vec::with_capacity(list.len());
    for s in list {
        let t = SipTarget::parse(s)?;
        if out.contains(&t) {
            return Err(format!("\"{s}\" is listed twice"));
        }
        out.push(t);
    }
    Ok(out)
}

/// `trust` and `psk_file` of `peer[i]` (`key`); the default is `signed`.
fn parse_trust(key: &str, p: &RawPeer, e: Errors<'_>) -> Result<Trust, ConfigError> {
    let bad = |key: &str, msg: String| e.bad(key, msg);
    Ok(
        match (p.trust.as_deref().unwrap_or("signed"), &p.psk_file) {
            ("signed", None) => Trust::Signed,
            ("opportunistic", None) => Trust::Opportunistic,
            ("dnssec", None) => Trust::Dnssec,
            ("psk", Some(f)) => {
                Trust::Psk(Psk::load(f).map_err(|m| bad(&format!("{key}.psk_file"), m))?)
            }
            ("psk", None) => {
                return Err(bad(
                &format!("{key}.psk_file"),
                "trust = \"psk\" needs psk_file = \"FILE\" (mode 0600; make one with `sipmail psk generate --out FILE`)"
                    .into(),
            ));
            }
            ("signed" | "opportunistic" | "dnssec", Some(_)) => {
                return Err(bad(
                    &format!("{key}.psk_file"),
                    "psk_file is only used with trust = \"psk\"".into(),
                ));
            }
            (other, _) => {
                return Err(bad(
                    &format!("{key}.trust"),
                    format!("\"{other}\" is not one of signed, psk, opportunistic, dnssec"),
                ));
            }
        },
    )
}

/// `senders` of `peer[i]` (`key`, domain `d`): normalised, without `d` and repeats.
fn parse_senders(
    key: &str,
    p: &RawPeer,
    d: &str,
    domain: &str,
    e: Errors<'_>,
) -> Result<Vec<String>, ConfigError> {
    let bad = |key: &str, msg: String| e.bad(key, msg);
    let mut senders: Vec<String> = Vec::new();
    for s in p.senders.iter().flatten() {
        let n = crate::domain::normalise_domain(s).ok_or_else(|| {
            bad(
                &format!("{key}.senders"),
                format!("\"{s}\" is not a domain name (write a domain such as example.org, no address or literal)"),
            )
        })?;
        if !n.contains('.') {
            return Err(bad(
                &format!("{key}.senders"),
                format!("\"{s}\" is a whole top-level domain; list the partner's own domains"),
            ));
        }
        if n == domain {
            return Err(bad(
                &format!("{key}.senders"),
                format!("\"{s}\" is our own relay.domain: a peer may never send as it"),
            ));
        }
        if !senders.contains(&n) && n != d {
            senders.push(n);
        }
    }
    Ok(senders)
}
