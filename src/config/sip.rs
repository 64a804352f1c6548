//! `[sip]`: where the relay listens for calls, its media address, call limits, cipher
//! suites, and the limits against abuse of the SIP port ([`SipLimits`]).

use super::nat::{Advertise, PortRange};
use super::raw::RawSip;
use super::values::parse_duration;
use super::{ConfigError, Errors, socket};
use crate::handshake::Suite;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// `sip.call_idle` default: a call with no mail to carry for this long is ended with BYE.
pub const DEFAULT_CALL_IDLE: Duration = Duration::from_secs(10);
/// `sip.calls_per_peer` default.
pub const DEFAULT_CALLS_PER_PEER: usize = 16;

/// The `[sip]` section, as the SIP side of the relay needs it.
#[derive(Clone, Debug)]
pub struct SipSection {
    pub listen: SocketAddr,
    pub media_ip: IpAddr,
    /// `sip.media_ports`: the ports media listeners may take (None: any free port).
    pub media_ports: Option<PortRange>,
    /// `sip.advertise`: the address put on the wire when it differs from the bound one (NAT).
    pub advertise: Option<Advertise>,
    pub call_idle: Duration,
    /// Calls placed at once to one peer when mail is waiting (each reused for many messages).
    pub calls_per_peer: usize,
    /// Media cipher suites we offer and accept, in our order of preference.
    pub suites: Vec<Suite>,
    pub limits: SipLimits,
}

/// Limits against abuse of the SIP port (`[sip]` keys of the same names).
#[derive(Clone, Debug, PartialEq)]
pub struct SipLimits {
    /// Largest SIP message accepted, bytes (at most 65,535).
    pub max_message_size: usize,
    /// New INVITEs per second from one address (configured peers are exempt); 0 = no limit.
    pub invite_rate: f64,
    /// INVITEs one address may send at once before `invite_rate` applies.
    pub invite_burst: f64,
    /// Incoming calls not yet ACKed, per source address.
    pub max_pending_per_source: usize,
    /// Incoming calls not yet ACKed from non-peer addresses, in total.
    pub max_pending_total: usize,
    /// Open SIP/TCP connections in total (peers may exceed it).
    pub max_tcp_connections: usize,
    /// Open SIP/TCP connections from one address.
    pub max_tcp_per_source: usize,
    /// A SIP/TCP connection with no traffic for this long is closed.
    pub tcp_idle: Duration,
    /// A SIP/TCP message begun (or a new connection's first message) must be complete
    /// within this long.
    pub tcp_half_open: Duration,
}

impl Default for SipLimits {
    /// The endpoint's own defaults, so each knob has one (`sip::EndpointConfig::default`);
    /// the pending-call limits exist only here.
    fn default() -> Self {
        let ep = crate::sip::EndpointConfig::default();
        SipLimits {
            max_message_size: ep.max_message,
            invite_rate: ep.invite_rate,
            invite_burst: ep.invite_burst,
            max_pending_per_source: 16,
            max_pending_total: 256,
            max_tcp_connections: ep.max_tcp_connections,
            max_tcp_per_source: ep.max_tcp_per_source,
            tcp_idle: ep.tcp_idle_timeout,
            tcp_half_open: ep.tcp_message_timeout,
        }
    }
}

pub(super) fn parse_sip(raw: &RawSip, e: Errors<'_>) -> Result<SipSection, ConfigError> {
    let listen = socket(e, "sip.listen", &raw.listen)?;
    let media_ip: IpAddr = raw.media.parse().map_err(|_| {
        e.bad(
            "sip.media",
            format!("\"{}\" is not an IP address", raw.media),
        )
    })?;
    let media_ports = raw
        .media_ports
        .as_deref()
        .map(|t| PortRange::parse(t).map_err(|m| e.bad("sip.media_ports", m)))
        .transpose()?;
    let advertise = raw
        .advertise
        .as_deref()
        .map(|t| Advertise::parse(t).map_err(|m| e.bad("sip.advertise", m)))
        .transpose()?;
    if let Some(a) = advertise
        && a.sip_port.is_none()
        && listen.port() == 0
    {
        return Err(e.bad(
            "sip.advertise",
            format!("\"{a}\" needs a port: sip.listen's port is 0 (picked at start)"),
        ));
    }
    let call_idle = match &raw.call_idle {
        None => DEFAULT_CALL_IDLE,
        Some(s) => parse_duration(s).map_err(|m| e.bad("sip.call_idle", m))?,
    };
    let limits = parse_limits(raw, e)?;
    let calls_per_peer = raw.calls_per_peer.unwrap_or(DEFAULT_CALLS_PER_PEER);
    if !(1..=64).contains(&calls_per_peer) {
        return Err(e.bad(
            "sip.calls_per_peer",
            format!("{calls_per_peer} is not in 1..=64"),
        ));
    }
    let suites = parse_suites(raw.suites.as_deref(), e)?;
    Ok(SipSection {
        listen,
        media_ip,
        media_ports,
        advertise,
        call_idle,
        calls_per_peer,
        suites,
        limits,
    })
}

/// `sip.suites`: known names, repeats dropped, at least one; default every suite.
fn parse_suites(names: Option<&[String]>, e: Errors<'_>) -> Result<Vec<Suite>, ConfigError> {
    let Some(names) = names else {
        return Ok(Suite::ALL.to_vec());
    };
    let mut v = Vec::new();
    for n in names {
        let s = Suite::from_name(n).ok_or_else(|| {
            e.bad(
                "sip.suites",
                format!("unknown suite \"{n}\" (known: chacha20-poly1305, aes-256-gcm)"),
            )
        })?;
        if !v.contains(&s) {
            v.push(s);
        }
    }
    if v.is_empty() {
        return Err(e.bad("sip.suites", "lists no suite".into()));
    }
    Ok(v)
}

/// The [`SipLimits`] keys of `[sip]`, each defaulting to [`SipLimits::default`].
fn parse_limits(r: &RawSip, e: Errors<'_>) -> Result<SipLimits, ConfigError> {
    let bad = |key: &str, msg: String| e.bad(key, msg);
    let mut limits = SipLimits::default();
    let l = &mut limits;
    let count = |key: &str, v: Option<usize>, d: usize, max: usize| match v {
        None => Ok(d),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(bad(key, format!("{n} is out of range 1..={max}"))),
    };
    l.max_message_size = count(
        "sip.max_message_size",
        r.max_message_size,
        l.max_message_size,
        65_535,
    )?;
    if l.max_message_size < 1024 {
        return Err(bad(
            "sip.max_message_size",
            "must be at least 1024 bytes".into(),
        ));
    }
    for (key, v, d) in [
        ("sip.invite_rate", r.invite_rate, &mut l.invite_rate),
        ("sip.invite_burst", r.invite_burst, &mut l.invite_burst),
    ] {
        if let Some(x) = v {
            if !x.is_finite() || !(0.0..=1_000_000.0).contains(&x) {
                return Err(bad(key, format!("{x} is out of range 0..=1000000")));
            }
            *d = x;
        }
    }
    if l.invite_burst < 1.0 {
        return Err(bad("sip.invite_burst", "must be at least 1".into()));
    }
    const BIG: usize = 1_000_000;
    l.max_pending_per_source = count(
        "sip.max_pending_per_source",
        r.max_pending_per_source,
        l.max_pending_per_source,
        BIG,
    )?;
    l.max_pending_total = count(
        "sip.max_pending_total",
        r.max_pending_total,
        l.max_pending_total,
        BIG,
    )?;
    l.max_tcp_connections = count(
        "sip.max_tcp_connections",
        r.max_tcp_connections,
        l.max_tcp_connections,
        BIG,
    )?;
    l.max_tcp_per_source = count(
        "sip.max_tcp_per_source",
        r.max_tcp_per_source,
        l.max_tcp_per_source,
        BIG,
    )?;
    for (key, v, d) in [
        ("sip.tcp_idle", &r.tcp_idle, &mut l.tcp_idle),
        ("sip.tcp_half_open", &r.tcp_half_open, &mut l.tcp_half_open),
    ] {
        if let Some(text) = v {
            let x = parse_duration(text).map_err(|m| bad(key, m))?;
            if x.is_zero() {
                return Err(bad(key, "must be above zero".into()));
            }
            *d = x;
        }
    }
    Ok(limits)
}
