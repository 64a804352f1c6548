//! Where a partner's relay is, from DNS (RFC 3263 without NAPTR): the SRV records of
//! `_sipmail._udp.D` and `_sipmail._tcp.D`, ordered by [`super::srv::order`], each target's
//! A/AAAA records, and, only when there is no SRV record at all, the A/AAAA records of the
//! domain itself on port 5060 over UDP. Targets that are this relay are refused: a call to
//! ourselves would loop.

use super::client::{DnsError, Resolver, Security, addresses};
use super::srv::{SrvPlan, SrvRecord, order};
use crate::sip::Transport;
use hickory_proto::rr::{RData, RecordType};
use std::net::{IpAddr, SocketAddr};

/// The SRV service of sipmail relays over UDP. Dedicated names, so that the company's
/// own `_sip._udp` (its VoIP service) stays as it is; a site that wants its SIP proxy to
/// take the calls points these at the proxy.
pub const SRV_UDP: &str = "_sipmail._udp";
/// The SRV service of sipmail relays over TCP.
pub const SRV_TCP: &str = "_sipmail._tcp";
/// RFC 3263's default port when there is no SRV record.
pub const DEFAULT_PORT: u16 = 5060;
/// At most this many SRV records and addresses are used (a zone cannot make us call
/// thousands of targets).
pub const MAX_TARGETS: usize = 16;

/// One place to call, in the order to try (shared with `relay::locate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallTarget {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// What the log names, e.g. "b1.site-b.test:5062 (SRV prio 10)".
    pub label: String,
    /// The address is the operator's (a configured URI) or came from DNSSEC-secure
    /// answers only. False for one an insecure SRV or A/AAAA answer gave: anyone who can
    /// forge such an answer chose it, so it may not vouch for a key on first use
    /// (opportunistic trust; see `relay::caller::check_pin`).
    pub authentic: bool,
}

/// What [`locate`] found.
#[derive(Debug, Clone)]
pub struct Location {
    pub targets: Vec<CallTarget>,
    /// The SRV records in the order tried (empty: the A/AAAA fallback).
    pub srv: Vec<SrvRecord>,
    /// Secure only when every answer used was DNSSEC-secure.
    pub security: Security,
    /// Targets left out because they are this relay.
    pub skipped_self: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LocateError {
    #[error("{0}")]
    Dns(#[from] DnsError),
    #[error(
        "{domain} publishes SRV target \".\" under {SRV_UDP}/{SRV_TCP}: it says it takes no sipmail calls"
    )]
    Refused { domain: String },
    #[error(
        "{domain} has no {SRV_UDP}/{SRV_TCP} SRV record and no A/AAAA record: nothing to call (publish the records `sipmail keys publish` prints)"
    )]
    Missing { domain: String },
    #[error("the SRV targets of {domain} have no address: {targets}")]
    NoAddress { domain: String, targets: String },
    #[error(
        "every SRV target of {domain} points at this relay itself ({targets}): calling it would loop; the partner's DNS is wrong, or the domain is ours"
    )]
    SelfOnly { domain: String, targets: String },
}

/// Is `addr` this relay? `ours` are our SIP listen and advertised addresses; a wildcard
/// listen address matches every loopback address and the same port.
pub fn is_ourselves(addr: SocketAddr, ours: &[SocketAddr]) -> bool {
    ours.iter().any(|o| {
        *o == addr
            || (o.port() == addr.port() && o.ip().is_unspecified() && addr.ip().is_loopback())
    })
}

fn srv_records(answer: Vec<RData>, transport: Transport) -> Vec<SrvRecord> {
    answer
        .into_iter()
        .filter_map(|r| match r {
            RData::SRV(s) => Some(SrvRecord {
                priority: s.priority,
                weight: s.weight,
                port: s.port,
                target: {
                    let t = s.target.to_ascii().to_ascii_lowercase();
                    if t == "." {
                        t
                    } else {
                        t.trim_end_matches('.').to_string()
                    }
                },
                transport,
            }),
            _ => None,
        })
        .collect()
}

/// A and AAAA of `host`: the addresses and whether both answers were secure. A missing
/// name gives no addresses, not an error.
async fn host_addresses(r: &Resolver, host: &str) -> Result<(Vec<IpAddr>, Security), DnsError> {
    let a = r.query(host, RecordType::A).await?;
    let aaaa = r.query(host, RecordType::AAAA).await?;
    let security = if a.security == Security::Secure && aaaa.security == Security::Secure {
        Security::Secure
    } else {
        Security::Insecure
    };
    let mut v = addresses(&a.records);
    v.extend(addresses(&aaaa.records));
    Ok((v, security))
}

/// Where to call `domain`'s relay, in order. `ours`: our own SIP addresses (see
/// [`is_ourselves`]). `random(n)` gives a uniform number in `0..=n` (SRV weights).
pub async fn locate(
    r: &Resolver,
    domain: &str,
    ours: &[SocketAddr],
    random: &mut (dyn FnMut(u32) -> u32 + Send),
) -> Result<Location, LocateError> {
    let udp = r
        .query(&format!("{SRV_UDP}.{domain}"), RecordType::SRV)
        .await?;
    let tcp = r
        .query(&format!("{SRV_TCP}.{domain}"), RecordType::SRV)
        .await?;
    let (udp_secure, tcp_secure) = (
        udp.security == Security::Secure,
        tcp.security == Security::Secure,
    );
    let mut security = if udp_secure && tcp_secure {
        Security::Secure
    } else {
        Security::Insecure
    };
    let srv_secure = |t: Transport| match t {
        Transport::Udp => udp_secure,
        Transport::Tcp => tcp_secure,
    };
    let mut records = srv_records(udp.records, Transport::Udp);
    records.extend(srv_records(tcp.records, Transport::Tcp));
    records.truncate(MAX_TARGETS);
    let mut targets = Vec::new();
    let mut skipped_self = Vec::new();
    let plan = order(&records, random);
    let srv = match plan {
        SrvPlan::Refused => {
            return Err(LocateError::Refused {
                domain: domain.to_string(),
            });
        }
        SrvPlan::NoRecords => {
            // RFC 3263 4.2: no SRV at all, so the domain's own A/AAAA, default port, UDP.
            let (addrs, sec) = host_addresses(r, domain).await?;
            if sec == Security::Insecure {
                security = Security::Insecure;
            }
            if addrs.is_empty() {
                return Err(LocateError::Missing {
                    domain: domain.to_string(),
                });
            }
            for ip in addrs.into_iter().take(MAX_TARGETS) {
                let addr = SocketAddr::new(ip, DEFAULT_PORT);
                let label = format!("{domain}:{DEFAULT_PORT} (A/AAAA, no SRV)");
                if is_ourselves(addr, ours) {
                    skipped_self.push(format!("{label} = {addr}"));
                    continue;
                }
                targets.push(CallTarget {
                    addr,
                    transport: Transport::Udp,
                    label,
                    authentic: sec == Security::Secure,
                });
            }
            Vec::new()
        }
        SrvPlan::Ordered(list) => {
            let mut unresolved = Vec::new();
            for rec in &list {
                let (addrs, sec) = host_addresses(r, &rec.target).await?;
                if sec == Security::Insecure {
                    security = Security::Insecure;
                }
                if addrs.is_empty() {
                    unresolved.push(rec.target.clone());
                }
                for ip in addrs {
                    let addr = SocketAddr::new(ip, rec.port);
                    let label = format!(
                        "{}:{} {} (SRV prio {} weight {})",
                        rec.target,
                        rec.port,
                        rec.transport.as_str(),
                        rec.priority,
                        rec.weight
                    );
                    if is_ourselves(addr, ours) {
                        skipped_self.push(format!("{label} = {addr}"));
                        continue;
                    }
                    if targets.len() < MAX_TARGETS
                        && !targets
                            .iter()
                            .any(|t: &CallTarget| t.addr == addr && t.transport == rec.transport)
                    {
                        targets.push(CallTarget {
                            addr,
                            transport: rec.transport,
                            label,
                            authentic: sec == Security::Secure && srv_secure(rec.transport),
                        });
                    }
                }
            }
            if targets.is_empty() && skipped_self.is_empty() {
                return Err(LocateError::NoAddress {
                    domain: domain.to_string(),
                    targets: unresolved.join(", "),
                });
            }
            list
        }
    };
    if targets.is_empty() {
        return Err(LocateError::SelfOnly {
            domain: domain.to_string(),
            targets: skipped_self.join(", "),
        });
    }
    Ok(Location {
        targets,
        srv,
        security,
        skipped_self,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ourselves_is_our_address_or_loopback_on_a_wildcard_listener() {
        let ours: Vec<SocketAddr> = vec!["127.0.42.3:5060".parse().unwrap()];
        assert!(is_ourselves("127.0.42.3:5060".parse().unwrap(), &ours));
        assert!(!is_ourselves("127.0.42.3:5061".parse().unwrap(), &ours));
        assert!(!is_ourselves("127.0.42.4:5060".parse().unwrap(), &ours));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:5060".parse().unwrap()];
        assert!(is_ourselves("127.0.0.1:5060".parse().unwrap(), &any));
        assert!(!is_ourselves("192.0.2.1:5060".parse().unwrap(), &any));
    }
}
