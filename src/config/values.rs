//! Value types and parsers shared by the sections: address blocks, SIP targets, durations,
//! domain names.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// An address block such as `127.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("\"{s}\": prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A partner's SIP address: `sip:mail@HOST[:PORT][;transport=udp|tcp]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub tcp: bool,
}

impl SipTarget {
    pub fn parse(s: &str) -> Result<SipTarget, String> {
        let rest = s
            .strip_prefix("sip:")
            .ok_or_else(|| format!("\"{s}\" must start with sip: (sips: is not supported)"))?;
        let mut parts = rest.split(';');
        let addr = parts.next().unwrap_or_default();
        let mut tcp = false;
        for p in parts {
            match p.to_ascii_lowercase().as_str() {
                "transport=tcp" => tcp = true,
                "transport=udp" => tcp = false,
                other => return Err(format!("\"{s}\": unsupported URI parameter \"{other}\"")),
            }
        }
        let (user, hostport) = addr
            .split_once('@')
            .ok_or_else(|| format!("\"{s}\" needs a user part, e.g. sip:mail@host:5060"))?;
        if user.is_empty() {
            return Err(format!("\"{s}\": empty user part"));
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, r) = h
                .split_once(']')
                .ok_or_else(|| format!("\"{s}\": unclosed ["))?;
            (h.to_string(), r.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("\"{s}\": empty host"));
        }
        let port = match port {
            None => 5060,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("\"{s}\": bad port \"{p}\""))?,
        };
        Ok(SipTarget {
            user: user.to_string(),
            host,
            port,
            tcp,
        })
    }
}

impl fmt::Display for SipTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "sip:{}@{}:{}", self.user, host, self.port)?;
        if self.tcp {
            f.write_str(";transport=tcp")?;
        }
        Ok(())
    }
}

/// `500ms`, `10s`, `30m`, `2h`, `5d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("\"{s}\" needs a unit: ms, s, m, h or d"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration like 30s or 5m"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "\"{s}\": unknown unit \"{unit}\" (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

pub(super) fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}
