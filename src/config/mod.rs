//! The TOML configuration. Every error names the file, the key and what is wrong.
//!
//! Relative paths are taken from the working directory the daemon is started in (the
//! shipped configs are meant to be run from the repository root).
//!
//! One file per section, each with its typed struct, its parser and its defaults (each
//! default written once): [`smtp`], [`sip`] (with [`SipLimits`]), [`peer`], [`queue`]
//! (with `[delivery]`), [`psk`], [`metrics`], [`routing`] (`[routing]` and `[[route]]`); `raw` is the file as serde reads it and `values` the
//! value types the sections share. `[relay]` and `[audit]` are parsed here.

mod dns;
mod metrics;
mod nat;
mod peer;
mod psk;
mod queue;
mod raw;
mod routing;
mod sip;
mod smtp;
#[cfg(test)]
mod tests;
mod values;

pub use dns::{DEFAULT_DNS_TIMEOUT, DiscoverySection, DnsSection};
pub use metrics::MetricsSection;
pub use nat::{Advertise, PortRange};
pub use peer::{ContinuityPolicy, Outbox, Peer, Trust};
pub use psk::Psk;
pub use queue::{DEFAULT_LANES, Delivery, DeliverySection, QueueTimes};
pub use routing::{DEFAULT_NEXT_HOP_LANES, Pattern, RouteRule, Routing, Target};
pub use sip::{DEFAULT_CALL_IDLE, DEFAULT_CALLS_PER_PEER, SipLimits, SipSection};
pub use smtp::SmtpSection;
pub use values::{Cidr, SipTarget, parse_duration};

use crate::handshake::Suite;
use raw::{RawAudit, RawConfig, RawRelay};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {msg}")]
    Syntax { file: String, msg: String },
    #[error("{file}: {key}: {msg}")]
    Invalid {
        file: String,
        key: String,
        msg: String,
    },
}

/// Makes the errors of one file: each names the file and the key.
#[derive(Clone, Copy)]
struct Errors<'a> {
    file: &'a str,
}

impl Errors<'_> {
    fn bad(&self, key: &str, msg: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            key: key.to_string(),
            msg,
        }
    }
}

/// An `address:port` value.
fn socket(e: Errors<'_>, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse::<SocketAddr>().map_err(|_| {
        e.bad(
            key,
            format!("\"{v}\" is not an address:port like 127.0.0.1:2525"),
        )
    })
}

/// The `[relay]` section: who we are and where our files are.
#[derive(Clone, Debug)]
struct RelaySection {
    domain: String,
    hostname: String,
    keyring: PathBuf,
    signing_key: Option<String>,
    spool: PathBuf,
}

fn parse_relay(raw: RawRelay, e: Errors<'_>) -> Result<RelaySection, ConfigError> {
    let domain = raw.domain.to_ascii_lowercase();
    if !values::valid_domain(&domain) {
        return Err(e.bad("relay.domain", format!("\"{domain}\" is not a domain name")));
    }
    Ok(RelaySection {
        hostname: raw.hostname.unwrap_or_else(|| domain.clone()),
        domain,
        keyring: raw.keyring,
        signing_key: raw.signing_key,
        spool: raw.spool,
    })
}

/// `[audit]`: where call records go (default `<relay.spool>/calls`), `None` when off.
fn parse_audit(raw: &RawAudit, spool: &Path) -> Option<PathBuf> {
    match raw.record_calls {
        Some(false) => None,
        _ => Some(raw.dir.clone().unwrap_or_else(|| spool.join("calls"))),
    }
}

/// The whole configuration. Its fields keep the flat names the relay reads (`smtp_listen`,
/// `calls_per_peer`, ...); [`Config::smtp_section`], [`Config::sip_section`] and
/// [`Config::delivery_section`] give a component just its section.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: String,
    pub domain: String,
    pub hostname: String,
    pub keyring: PathBuf,
    /// The own key to sign with (fingerprint); default: the newest own key.
    pub signing_key: Option<String>,
    pub spool: PathBuf,
    pub smtp_listen: SocketAddr,
    pub smtp_allow: Vec<Cidr>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub sip_listen: SocketAddr,
    pub media_ip: IpAddr,
    /// `sip.media_ports`: the ports media listeners may take (None: any free port).
    pub media_ports: Option<PortRange>,
    /// `sip.advertise`: the address put on the wire instead of the bound one (NAT).
    pub advertise: Option<Advertise>,
    pub call_idle: Duration,
    /// Calls placed at once to one peer when mail is waiting (each reused for many messages).
    pub calls_per_peer: usize,
    /// Media cipher suites we offer and accept, in our order of preference.
    pub suites: Vec<Suite>,
    /// Local deliveries at once.
    pub local_lanes: usize,
    pub sip_limits: SipLimits,
    pub peers: Vec<Peer>,
    pub delivery: Delivery,
    pub queue: QueueTimes,
    /// Where each established call's audit record goes (`[audit]`; see crate::audit), or
    /// `None` when `record_calls = false`. Default: `<relay.spool>/calls`.
    pub call_records: Option<PathBuf>,
    /// The metrics and health endpoint (`[metrics]`), `None` when off (the default).
    pub metrics: Option<MetricsSection>,
    /// `[[route]]` and `[routing]`: where mail for each domain goes (see [`Routing`]).
    pub routing: Routing,
    /// `[dns]`: the validating resolver for `sip = "dns"`, `trust = "dnssec"` and
    /// `[discovery]` (None: no DNS lookups).
    pub dns: Option<DnsSection>,
    /// `[discovery]`: domains without a `[[peer]]` reached (and accepted) through DNS.
    pub discovery: Option<DiscoverySection>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Parses a file's text; `file` names it in errors. Each section is parsed by its own
    /// function, in the order of the file, and the first error is returned.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            msg: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let e = Errors { file };
        let relay = parse_relay(raw.relay, e)?;
        let smtp = smtp::parse_smtp(&raw.smtp, e)?;
        let sip = sip::parse_sip(&raw.sip, e)?;
        let peers = peer::parse_peers(&raw.peer, &relay.domain, e)?;
        let delivery = queue::parse_delivery(&raw.delivery, &relay.spool, e)?;
        let queue = queue::parse_queue(&raw.queue, e)?;
        let call_records = parse_audit(&raw.audit, &relay.spool);
        let metrics = metrics::parse_metrics(raw.metrics.as_ref(), e)?;
        let routing = routing::parse_routing(&raw.routing, &raw.route, &relay.domain, &peers, e)?;
        let dns = dns::parse_dns(raw.dns.as_ref(), e)?;
        let discovery =
            dns::parse_discovery(raw.discovery.as_ref(), dns.as_ref(), &relay.domain, e)?;
        if dns.is_none()
            && let Some(i) = peers
                .iter()
                .position(|p| p.dns || matches!(p.trust, Trust::Dnssec))
        {
            return Err(e.bad(
                &format!("peer[{i}]"),
                "sip = \"dns\" and trust = \"dnssec\" need a [dns] section naming a validating resolver (resolver = \"127.0.0.1:53\")".into(),
            ));
        }
        Ok(Config {
            file: file.to_string(),
            domain: relay.domain,
            hostname: relay.hostname,
            keyring: relay.keyring,
            signing_key: relay.signing_key,
            spool: relay.spool,
            smtp_listen: smtp.listen,
            smtp_allow: smtp.allow,
            max_message_size: smtp.max_message_size,
            max_recipients: smtp.max_recipients,
            sip_listen: sip.listen,
            media_ip: sip.media_ip,
            media_ports: sip.media_ports,
            advertise: sip.advertise,
            call_idle: sip.call_idle,
            calls_per_peer: sip.calls_per_peer,
            suites: sip.suites,
            local_lanes: delivery.lanes,
            sip_limits: sip.limits,
            peers,
            delivery: delivery.delivery,
            queue,
            call_records,
            metrics,
            routing,
            dns,
            discovery,
        })
    }

    /// The `[smtp]` section, for the SMTP listener.
    pub fn smtp_section(&self) -> SmtpSection {
        SmtpSection {
            listen: self.smtp_listen,
            allow: self.smtp_allow.clone(),
            max_message_size: self.max_message_size,
            max_recipients: self.max_recipients,
        }
    }

    /// The `[sip]` section, for the SIP endpoint and the calls.
    pub fn sip_section(&self) -> SipSection {
        SipSection {
            listen: self.sip_listen,
            media_ip: self.media_ip,
            media_ports: self.media_ports,
            advertise: self.advertise,
            call_idle: self.call_idle,
            calls_per_peer: self.calls_per_peer,
            suites: self.suites.clone(),
            limits: self.sip_limits.clone(),
        }
    }

    /// The `[delivery]` section, for local delivery.
    pub fn delivery_section(&self) -> DeliverySection {
        DeliverySection {
            delivery: self.delivery.clone(),
            lanes: self.local_lanes,
        }
    }

    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    pub fn invalid(&self, key: &str, msg: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.to_string(),
            msg,
        }
    }
}
