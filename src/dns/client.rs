//! The stub resolver: one question to the configured validating resolver, through
//! hickory's client (UDP, and TCP when the answer is truncated), with a bounded time.
//!
//! DNSSEC is not validated here: the resolver validates, and its AD bit says whether the
//! answer is authentic. That bit is only worth trusting on a path no one can tamper with
//! (loopback, or an address the operator explicitly trusts); `[dns]` enforces that at
//! config load. See docs/ARCHITECTURE.md, "DNS and DNSSEC".

use futures_util::StreamExt;
use hickory_net::client::Client;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// What a validating resolver says about an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// The AD bit was set: validated from a trust anchor.
    Secure,
    /// No AD bit: the zone is unsigned (or not under a trust anchor).
    Insecure,
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Security::Secure => "DNSSEC-secure",
            Security::Insecure => "insecure (not DNSSEC-signed)",
        })
    }
}

/// Why a lookup gave no usable answer. Every variant names the question.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error(
        "DNS: no answer from the resolver {resolver} for {name} {rtype} within {secs} s (is it running? [dns] resolver)"
    )]
    Timeout {
        resolver: SocketAddr,
        name: String,
        rtype: String,
        secs: u64,
    },
    #[error(
        "DNS: the answer for {name} {rtype} is DNSSEC-bogus: the resolver's validation failed (a broken or expired signature, or a key that does not match the parent's DS)"
    )]
    Bogus { name: String, rtype: String },
    #[error(
        "DNS: the resolver {resolver} answered SERVFAIL for {name} {rtype}: it could not resolve the name (the zone's servers failed or disagree, or aliases that loop); the resolver's log says which"
    )]
    ServFail {
        resolver: SocketAddr,
        name: String,
        rtype: String,
    },
    #[error("DNS: the resolver {resolver} answered {rcode} for {name} {rtype}")]
    Rcode {
        resolver: SocketAddr,
        name: String,
        rtype: String,
        rcode: String,
    },
    #[error("DNS: cannot ask the resolver {resolver} about {name} {rtype}: {why}")]
    Network {
        resolver: SocketAddr,
        name: String,
        rtype: String,
        why: String,
    },
    #[error("DNS: \"{0}\" is not a domain name")]
    BadName(String),
}

/// The records of one answer (of the asked type only), whether the name exists, and how
/// secure the answer is.
#[derive(Debug, Clone)]
pub struct Answer {
    pub records: Vec<RData>,
    /// NXDOMAIN: the name does not exist (records is then empty).
    pub nxdomain: bool,
    pub security: Security,
}

/// A client of one validating resolver.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl Resolver {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Resolver {
        Resolver { addr, timeout }
    }

    /// Ask `rtype` for `name` (an absolute name; a trailing dot is added). A SERVFAIL is
    /// asked again with checking disabled (CD): if that gives an answer, the SERVFAIL was
    /// the resolver's DNSSEC validation failing, and the error says "bogus".
    pub async fn query(&self, name: &str, rtype: RecordType) -> Result<Answer, DnsError> {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        let qname = Name::from_ascii(&fqdn).map_err(|_| DnsError::BadName(name.to_string()))?;
        let shown = fqdn.trim_end_matches('.').to_string();
        let msg = self.exchange_bounded(&qname, rtype, false, &shown).await?;
        match msg.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            ResponseCode::ServFail => {
                let checked = self.exchange_bounded(&qname, rtype, true, &shown).await;
                return Err(match checked {
                    Ok(m)
                        if matches!(
                            m.metadata.response_code,
                            ResponseCode::NoError | ResponseCode::NXDomain
                        ) =>
                    {
                        DnsError::Bogus {
                            name: shown,
                            rtype: rtype.to_string(),
                        }
                    }
                    _ => DnsError::ServFail {
                        resolver: self.addr,
                        name: shown,
                        rtype: rtype.to_string(),
                    },
                });
            }
            other => {
                return Err(DnsError::Rcode {
                    resolver: self.addr,
                    name: shown,
                    rtype: rtype.to_string(),
                    rcode: other.to_string(),
                });
            }
        }
        let security = if msg.metadata.authentic_data {
            Security::Secure
        } else {
            Security::Insecure
        };
        let nxdomain = msg.metadata.response_code == ResponseCode::NXDomain;
        let records = msg
            .answers
            .into_iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| r.data)
            .collect();
        Ok(Answer {
            records,
            nxdomain,
            security,
        })
    }

    /// One exchange (UDP, then TCP if truncated), bounded by `timeout` as a whole.
    async fn exchange_bounded(
        &self,
        qname: &Name,
        rtype: RecordType,
        cd: bool,
        shown: &str,
    ) -> Result<Message, DnsError> {
        match tokio::time::timeout(self.timeout, self.exchange(qname, rtype, cd, shown)).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout_error(shown, rtype)),
        }
    }

    fn timeout_error(&self, shown: &str, rtype: RecordType) -> DnsError {
        DnsError::Timeout {
            resolver: self.addr,
            name: shown.to_string(),
            rtype: rtype.to_string(),
            secs: self.timeout.as_secs().max(1),
        }
    }

    async fn exchange(
        &self,
        qname: &Name,
        rtype: RecordType,
        cd: bool,
        shown: &str,
    ) -> Result<Message, DnsError> {
        let net = |why: String| DnsError::Network {
            resolver: self.addr,
            name: shown.to_string(),
            rtype: rtype.to_string(),
            why,
        };
        let request = || {
            let mut msg = Message::query();
            msg.metadata.recursion_desired = true;
            // RFC 6840 5.7: ask for the AD bit; the DO bit asks for DNSSEC records too.
            msg.metadata.authentic_data = true;
            msg.metadata.checking_disabled = cd;
            msg.add_query(Query::query(qname.clone(), rtype));
            let mut edns = Edns::new();
            edns.set_max_payload(1232).set_dnssec_ok(true);
            msg.set_edns(edns);
            let mut opts = DnsRequestOptions::default();
            opts.use_edns = true;
            opts.edns_set_dnssec_ok = true;
            opts.edns_payload_len = 1232;
            DnsRequest::new(msg, opts)
        };
        let provider = TokioRuntimeProvider::default();
        // hickory's own timeout is longer than ours, so that a silent resolver always
        // ends in our (bounded) timeout, with its clear error.
        let inner = self.timeout + Duration::from_secs(1);
        let udp = UdpClientStream::builder(self.addr, provider.clone())
            .with_timeout(Some(inner))
            .build();
        let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(udp);
        let bg = tokio::spawn(bg);
        let first = client.send(request()).next().await;
        bg.abort();
        let msg = match first {
            Some(Ok(r)) => r.into_message(),
            Some(Err(hickory_net::NetError::Timeout)) | None => {
                return Err(self.timeout_error(shown, rtype));
            }
            Some(Err(e)) => return Err(net(e.to_string())),
        };
        if !msg.metadata.truncation {
            return Ok(msg);
        }
        // Too large for UDP (a big key): ask again over TCP.
        let (connect, handle) =
            TcpClientStream::new(self.addr, None, Some(inner), provider.clone());
        let stream = connect.await.map_err(|e| net(format!("TCP: {e}")))?;
        let (client, bg) = Client::<TokioRuntimeProvider>::with_timeout(stream, handle, inner);
        let bg = tokio::spawn(bg);
        let got = client.send(request()).next().await;
        bg.abort();
        match got {
            Some(Ok(r)) => Ok(r.into_message()),
            Some(Err(e)) => Err(net(format!("TCP: {e}"))),
            None => Err(net("TCP: no response".into())),
        }
    }
}

/// The addresses in A and AAAA answers.
pub fn addresses(records: &[RData]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match r {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}
