//! Who we are and who our partners are: the part of the config every call and every
//! message needs, read-only for the daemon's life. Also where mail for an address goes.

use crate::config::{Config, Peer, PortRange, Routing};
use crate::handshake::Suite;
use crate::queue::Route;
use std::net::IpAddr;
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
        }
    }

    /// The partner for `domain` (case-insensitive), if any.
    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    /// Where mail for `addr` goes: our domain is local, then the routing table decides
    /// (`[[route]]`, the partners, `routing.default`; see `config::Routing::decide`). Err:
    /// the text of the 550 5.7.1 that refuses it. Whether the client may use the route
    /// is the SMTP server's check (`inbound`).
    pub fn route_for(&self, addr: &str) -> Result<Route, String> {
        let Some((_, domain)) = addr.rsplit_once('@') else {
            return Err(format!("<{addr}> has no domain"));
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.routing.decide(&domain, &self.domain, &self.peers)
    }
}
