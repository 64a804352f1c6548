//! The settings a reload can change ([`Settings`]), held in a [`Live`] cell that is swapped
//! whole. A task takes one snapshot (an `Arc`) and uses it to the end of its call, SMTP
//! session or job, so it never mixes two configs; the lock is held only to clone the `Arc`,
//! never across I/O. Which settings may change live and which need a restart is decided in
//! `reload` (see docs/ARCHITECTURE.md, "Reload").

use super::site::Site;
use crate::config::{Cidr, Config};
use crate::smtp::ServerConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A value swapped whole on reload; readers get a snapshot.
pub(crate) struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(v: T) -> Self {
        Live(RwLock::new(Arc::new(v)))
    }

    /// The current value (a snapshot: a reload does not change it under the caller).
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, v: T) {
        let v = Arc::new(v);
        match self.0.write() {
            Ok(mut cur) => *cur = v,
            Err(poisoned) => *poisoned.into_inner() = v,
        }
    }
}

/// The config in force, for reloads (no task reads it).
pub(crate) struct InForce {
    pub cfg: Config,
    /// The file it was read from; `None` when the daemon was started with a config built
    /// in memory (the test bed, the demo): then a reload reads the keyring only.
    pub file: Option<std::path::PathBuf>,
}

impl InForce {
    pub fn new(cfg: Config) -> Self {
        let path = std::path::PathBuf::from(&cfg.file);
        let file = path.is_file().then_some(path);
        InForce { cfg, file }
    }
}

/// What a reload can change, besides the keyring (`keys::Keys`).
pub(crate) struct Settings {
    /// Bumped by each successful reload: a caller lane hangs up an idle call placed under
    /// older settings before its next message, so that the next message goes through a
    /// call made with the new peer settings and keyring.
    pub generation: u64,
    /// Our domain, host name, partners (the live part), suites, media address.
    pub site: Site,
    /// How our SMTP servers answer, on the site side and in calls.
    pub smtp: ServerConfig,
    /// `smtp.allow`: site clients that may relay.
    pub smtp_allow: Vec<Cidr>,
    /// Each peer's configured addresses (see [`peer_addresses`]).
    pub peer_addrs: HashMap<String, Vec<IpAddr>>,
    /// A caller lane hangs up after this long without work.
    pub call_idle: Duration,
}

impl Settings {
    /// The settings of `cfg`; `peer_addrs` from [`peer_addresses`].
    pub fn from_config(
        cfg: &Config,
        peer_addrs: HashMap<String, Vec<IpAddr>>,
        generation: u64,
    ) -> Self {
        Settings {
            generation,
            site: Site::from_config(cfg),
            smtp: ServerConfig {
                hostname: cfg.hostname.clone(),
                max_message_size: cfg.max_message_size,
                max_recipients: cfg.max_recipients,
                ..ServerConfig::default()
            },
            smtp_allow: cfg.smtp_allow.clone(),
            peer_addrs,
            call_idle: cfg.call_idle,
        }
    }
}

/// How long resolving one peer's host name may take (start and reload).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The IP addresses of each configured peer (the hosts of its `sip` URIs, every relay). Over TCP they
/// are exempt from the INVITE rate limit and the totals, so a flood from elsewhere does
/// not lock them out; and an opportunistic peer's key is pinned on first use only from
/// one of them (or when we placed the call). Host names are resolved at start and at each
/// reload, each within 5 s; `sip = "dns"` peers by [`located_addresses`].
pub(crate) async fn peer_addresses(cfg: &Config) -> HashMap<String, Vec<IpAddr>> {
    let mut out = located_addresses(cfg).await;
    for p in &cfg.peers {
        if p.dns {
            continue;
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for t in &p.sip {
            if let Ok(ip) = t
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                ips.push(ip);
                continue;
            }
            use crate::dns::system::{LookupError, lookup};
            match lookup(&t.host, t.port, RESOLVE_TIMEOUT).await {
                Ok(addrs) => ips.extend(addrs.into_iter().map(|a| a.ip())),
                Err(LookupError::Failed(e)) => {
                    tracing::warn!(peer = %p.domain, host = %t.host, error = %e, "cannot resolve peer; it gets no exemption from the SIP limits, and (opportunistic) is pinned only by a call we place")
                }
                Err(LookupError::Timeout(_)) => {
                    tracing::warn!(peer = %p.domain, host = %t.host, "resolving the peer took over 5 s; it gets no exemption from the SIP limits, and (opportunistic) is pinned only by a call we place")
                }
            }
        }
        let ips: Vec<IpAddr> = ips.into_iter().map(canonical_ip).collect();
        out.entry(p.domain.clone())
            .or_insert_with(Vec::new)
            .extend(ips);
    }
    out
}

/// `sip = "dns"` peers: the addresses of the relays that DNSSEC-secure answers locate
/// (SRV, then A/AAAA: `CallTarget::authentic`), looked up side by side through `[dns]`'s
/// resolver, each peer within 5 s. An address from an insecure answer vouches for
/// nothing (whoever forged the answer chose it): such a peer gets no exemption from the
/// SIP limits, and no incoming call pins its first key. Looked up at start and at each
/// reload, as host names are; a relay the zone adds later counts from the next reload.
async fn located_addresses(cfg: &Config) -> HashMap<String, Vec<IpAddr>> {
    let mut out = HashMap::new();
    if !cfg.peers.iter().any(|p| p.dns) {
        return out;
    }
    let site = Site::from_config(cfg);
    let Some(resolver) = site.resolver else {
        return out;
    };
    let mut lookups = tokio::task::JoinSet::new();
    for p in cfg.peers.iter().filter(|p| p.dns) {
        let (r, domain, own) = (resolver.clone(), p.domain.clone(), site.own_sip.clone());
        lookups.spawn(async move {
            let mut random = crate::dns::srv::os_random;
            let located = crate::dns::locate(&r, &domain, &own, &mut random);
            let located = tokio::time::timeout(RESOLVE_TIMEOUT, located).await;
            (domain, located)
        });
    }
    while let Some(done) = lookups.join_next().await {
        let Ok((domain, located)) = done else {
            continue;
        };
        match located {
            Ok(Ok(loc)) => {
                let ips: Vec<IpAddr> = loc
                    .targets
                    .iter()
                    .filter(|t| t.authentic)
                    .map(|t| canonical_ip(t.addr.ip()))
                    .collect();
                if ips.len() < loc.targets.len() {
                    tracing::warn!(peer = %domain, insecure = loc.targets.len() - ips.len(),
                        "some of the peer's relays were located by DNS answers that are not DNSSEC-secure: those get no exemption from the SIP limits, and (opportunistic) no call from them pins a first key");
                }
                if !ips.is_empty() {
                    tracing::info!(peer = %domain, addresses = ?ips,
                        "peer's relays located by DNSSEC-secure SRV: exempt from the SIP limits over TCP");
                }
                out.insert(domain, ips);
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %domain, error = %e, "cannot locate the peer's relays in DNS now; it gets no exemption from the SIP limits until the next reload, and (opportunistic) is pinned only by a call we place")
            }
            Err(_) => {
                tracing::warn!(peer = %domain, "locating the peer's relays in DNS took over 5 s; it gets no exemption from the SIP limits until the next reload, and (opportunistic) is pinned only by a call we place")
            }
        }
    }
    out
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
