//! `sip.media_ports` and `sip.advertise`: what a relay behind a firewall or NAT needs — a
//! fixed range of media ports to open or forward, and the public address to put on the
//! wire (and sign) while its sockets stay bound to private ones.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// `sip.media_ports = "40000-40100"`: inclusive, nonzero, first <= last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let bad = || format!("\"{text}\" is not a port range like \"40000-40100\"");
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 {
            return Err(format!("\"{text}\": port 0 is not a port"));
        }
        if first > last {
            return Err(format!("\"{text}\": the first port is above the last"));
        }
        Ok(PortRange { first, last })
    }

    /// The ports, in order.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `sip.advertise = "203.0.113.5"` or `"203.0.113.5:5060"` (`"[2001:db8::5]:5060"`): the
/// address peers reach us at. Its IP goes into our SDP (and so into the signed T1) and our
/// Contact and Via; the SIP port defaults to `sip.listen`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertise {
    pub ip: IpAddr,
    pub sip_port: Option<u16>,
}

impl Advertise {
    pub fn parse(text: &str) -> Result<Advertise, String> {
        let (ip, sip_port) = match text.parse::<IpAddr>() {
            Ok(ip) => (ip, None),
            Err(_) => {
                let a: SocketAddr = text.parse().map_err(|_| {
                    format!("\"{text}\" is not an IP address or IP:port (IPv6 with a port: \"[2001:db8::5]:5060\")")
                })?;
                if a.port() == 0 {
                    return Err(format!("\"{text}\": port 0 is not a port"));
                }
                (a.ip(), Some(a.port()))
            }
        };
        if ip.is_unspecified() {
            return Err(format!(
                "\"{text}\": peers cannot reach an unspecified address"
            ));
        }
        Ok(Advertise { ip, sip_port })
    }

    /// The SIP address we advertise, given the one we listen on.
    pub fn sip_addr(&self, listen: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.ip, self.sip_port.unwrap_or(listen.port()))
    }
}

impl fmt::Display for Advertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sip_port {
            Some(p) => write!(f, "{}", SocketAddr::new(self.ip, p)),
            None => write!(f, "{}", self.ip),
        }
    }
}
