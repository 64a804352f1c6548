//! `[dns]` (the validating resolver sipmail asks) and `[discovery]` (which domains
//! without a `[[peer]]` may be reached, and be accepted as callers, from DNS).
//!
//! The resolver's AD bit is what makes a key from DNS trusted, so the path to the
//! resolver must be one no one can tamper with: a loopback address, or one the operator
//! declares trusted (`trusted_path = true`, e.g. a resolver on the same host's other
//! address or behind IPsec). See docs/ARCHITECTURE.md, "DNS and DNSSEC".

use super::raw::{RawDiscovery, RawDns};
use super::values::{parse_duration, valid_domain};
use super::{ConfigError, Errors, socket};
use crate::dns::InsecureKeys;
use std::net::SocketAddr;
use std::time::Duration;

/// The default time one DNS question may take.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// `[dns]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSection {
    /// The validating resolver (`resolver = "127.0.0.1:53"`).
    pub resolver: SocketAddr,
    /// The bound on one question (`timeout`, default 5s).
    pub timeout: Duration,
}

/// `[discovery]`: partners found in DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverySection {
    /// Domains that may be discovered: each entry a domain (and its subdomains), or "*"
    /// for any.
    pub domains: Vec<String>,
    /// What an OPENPGPKEY answer that is not DNSSEC-secure may lead to (`insecure =
    /// "refuse"`, the default, or `"pending"`: kept for `sipmail trust accept`).
    pub insecure: InsecureKeys,
}

impl DiscoverySection {
    /// May `domain` (lower case) be reached and accepted through DNS?
    pub fn allows(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| {
            d == "*"
                || domain == d
                || domain
                    .strip_suffix(d.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        })
    }
}

pub(super) fn parse_dns(
    raw: Option<&RawDns>,
    e: Errors<'_>,
) -> Result<Option<DnsSection>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let resolver = socket(e, "dns.resolver", &raw.resolver)?;
    if !resolver.ip().is_loopback() && !raw.trusted_path.unwrap_or(false) {
        return Err(e.bad(
            "dns.resolver",
            format!(
                "{resolver} is not a loopback address: its AD bit (\"DNSSEC-secure\") crosses a network anyone on the path could forge; run a validating resolver on this host (unbound on 127.0.0.1:53), or set dns.trusted_path = true if the path is protected (IPsec, a private link)"
            ),
        ));
    }
    let timeout = match &raw.timeout {
        None => DEFAULT_DNS_TIMEOUT,
        Some(t) => parse_duration(t)
            .ok()
            .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
            .ok_or_else(|| {
                e.bad(
                    "dns.timeout",
                    format!("\"{t}\" is not a duration between 1ms and 60s, like \"5s\""),
                )
            })?,
    };
    Ok(Some(DnsSection { resolver, timeout }))
}

pub(super) fn parse_discovery(
    raw: Option<&RawDiscovery>,
    dns: Option<&DnsSection>,
    own: &str,
    e: Errors<'_>,
) -> Result<Option<DiscoverySection>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if dns.is_none() {
        return Err(e.bad(
            "discovery",
            "[discovery] needs a [dns] section naming a validating resolver (resolver = \"127.0.0.1:53\")".into(),
        ));
    }
    match raw.trust.as_deref().unwrap_or("dnssec") {
        "dnssec" => {}
        other => {
            return Err(e.bad(
                "discovery.trust",
                format!(
                    "\"{other}\" is not supported: discovered partners use trust = \"dnssec\" (for another policy, add a [[peer]] with sip = \"dns\")"
                ),
            ));
        }
    }
    let insecure = match raw.insecure.as_deref().unwrap_or("refuse") {
        "refuse" => InsecureKeys::Refuse,
        "pending" => InsecureKeys::Pending,
        other => {
            return Err(e.bad(
                "discovery.insecure",
                format!(
                    "\"{other}\" is not a policy: \"refuse\" (a key from unsigned DNS is never used, the default) or \"pending\" (it waits for `sipmail trust accept`)"
                ),
            ));
        }
    };
    let mut domains = Vec::new();
    for d in &raw.domains {
        let n = d.trim().trim_end_matches('.').to_ascii_lowercase();
        if n != "*" && !valid_domain(&n) {
            return Err(e.bad(
                "discovery.domains",
                format!("\"{d}\" is not a domain name or \"*\""),
            ));
        }
        if n == own {
            return Err(e.bad(
                "discovery.domains",
                format!("\"{d}\" is our own relay.domain"),
            ));
        }
        domains.push(n);
    }
    if domains.is_empty() {
        return Err(e.bad(
            "discovery.domains",
            "an empty list discovers nothing: list the domains (or \"*\" for any), or remove [discovery]".into(),
        ));
    }
    Ok(Some(DiscoverySection { domains, insecure }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_matches_domains_and_their_subdomains_only() {
        let d = DiscoverySection {
            domains: vec!["partner.test".into()],
            insecure: InsecureKeys::Refuse,
        };
        assert!(d.allows("partner.test"));
        assert!(d.allows("eu.partner.test"));
        assert!(!d.allows("evilpartner.test"));
        assert!(!d.allows("other.test"));
        let any = DiscoverySection {
            domains: vec!["*".into()],
            insecure: InsecureKeys::Refuse,
        };
        assert!(any.allows("whatever.example"));
    }
}
