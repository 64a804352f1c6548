//! Who we are and who our partners are: the part of the config every call and every
//! message needs, read-only for the daemon's life. Also where mail for an address goes.

use crate::config::{Config, DiscoverySection, Peer, PortRange, Routing};
use crate::dns::Resolver;
use crate::handshake::Suite;
use crate::queue::Route;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub(crate) struct Site {
    /// Our mail domain (`mail@<domain>` is our SIP identity).
    pub domain: String,
    /// Our host name, in greetings, Received lines and DSNs.
    pub hostname: String,
    /// Our partners.
    pub peers: Vec<Peer>,
    /// Media cipher suites we offer and accept, in our order of preference.
    pub suites: Vec<Suite>,
    /// The address our media sockets bind to.
    pub media_ip: IpAddr,
    /// The ports our media listeners may take (None: any).
    pub media_ports: Option<PortRange>,
    /// The address our offers and answers announce (and sign): `sip.advertise`'s IP
    /// behind a NAT, else `media_ip`.
    pub public_media_ip: IpAddr,
    /// Where each signed call's audit record goes (None: not recorded).
    pub call_records: Option<PathBuf>,
    /// `[[route]]` and `[routing]`: where mail for other domains goes.
    pub routing: Routing,
    /// `[dns]`: the validating resolver (None: no DNS lookups).
    pub resolver: Option<Resolver>,
    /// `[discovery]`: domains reached and accepted without a `[[peer]]`.
    pub discovery: Option<DiscoverySection>,
    /// Our own SIP addresses (listen, advertised): an SRV target that is one of them
    /// would make us call ourselves.
    pub own_sip: Vec<SocketAddr>,
}

impl Site {
    pub fn from_config(cfg: &Config) -> Self {
        Site {
            domain: cfg.domain.clone(),
            hostname: cfg.hostname.clone(),
            peers: cfg.peers.clone(),
            suites: cfg.suites.clone(),
            media_ip: cfg.media_ip,
            media_ports: cfg.media_ports,
            public_media_ip: cfg.advertise.map_or(cfg.media_ip, |a| a.ip),
            call_records: cfg.call_records.clone(),
            routing: cfg.routing.clone(),
            resolver: cfg
                .dns
                .as_ref()
                .map(|d| Resolver::new(d.resolver, d.timeout)),
            discovery: cfg.discovery.clone(),
            own_sip: {
                let mut v = vec![cfg.sip_listen];
                if let Some(a) = cfg.advertise {
                    v.push(SocketAddr::new(
                        a.ip,
                        a.sip_port.unwrap_or(cfg.sip_listen.port()),
                    ));
                }
                v
            },
        }
    }

    /// The partner for `domain`: its `[[peer]]`, or, when `[discovery]` allows the domain,
    /// a partner found in DNS (location from SRV, key from OPENPGPKEY, `trust = "dnssec"`).
    pub fn partner(&self, domain: &str) -> Option<Peer> {
        if let Some(p) = self.peer(domain) {
            return Some(p.clone());
        }
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        self.discovers(&d).then(|| Peer::discovered(&d))
    }

    /// `[discovery] insecure`: what a key from an insecure answer may lead to (refused
    /// when there is no `[discovery]`).
    pub fn insecure_keys(&self) -> crate::dns::InsecureKeys {
        self.discovery
            .as_ref()
            .map_or(crate::dns::InsecureKeys::Refuse, |d| d.insecure)
    }

    /// Does `[discovery]` allow `domain` (lower case), which has no `[[peer]]`?
    pub fn discovers(&self, domain: &str) -> bool {
        domain != self.domain
            && crate::domain::normalise_domain(domain).as_deref() == Some(domain)
            && self.discovery.as_ref().is_some_and(|d| d.allows(domain))
    }

    /// The partner for `domain` (case-insensitive), if any.
    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    /// Where mail for `addr` goes: our domain is local; then an exact `[[route]]`, a
    /// `[[peer]]`, a domain `[discovery]` allows (a partner found in DNS at call time),
    /// then the `.subdomain` routes and `routing.default` (see `config::Routing::decide`).
    /// Err: the text of the 550 5.7.1 that refuses it. Whether the client may use the
    /// route is the SMTP server's check (`inbound`).
    pub fn route_for(&self, addr: &str) -> Result<Route, String> {
        let Some((_, domain)) = addr.rsplit_once('@') else {
            return Err(format!("<{addr}> has no domain"));
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain != self.domain
            && !self.routing.has_exact(&domain)
            && self.peer(&domain).is_none()
            && self.discovers(&domain)
        {
            return Ok(Route::Peer(domain));
        }
        self.routing.decide(&domain, &self.domain, &self.peers)
    }
}
