//! The TOML configuration. Every error names the file, the key and what is wrong.
//!
//! Relative paths are taken from the working directory the daemon is started in (the
//! shipped configs are meant to be run from the repository root).

use serde::Deserialize;
use std::fmt;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    relay: RawRelay,
    smtp: RawSmtp,
    sip: RawSip,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    audit: RawAudit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    domain: String,
    keyring: PathBuf,
    spool: PathBuf,
    hostname: Option<String>,
    signing_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    listen: String,
    #[serde(default = "default_allow")]
    allow: Vec<String>,
    max_message_size: Option<u64>,
    max_recipients: Option<usize>,
}

fn default_allow() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSip {
    listen: String,
    media: String,
    call_idle: Option<String>,
    calls_per_peer: Option<usize>,
    suites: Option<Vec<String>>,
    max_message_size: Option<usize>,
    invite_rate: Option<f64>,
    invite_burst: Option<f64>,
    max_pending_per_source: Option<usize>,
    max_pending_total: Option<usize>,
    max_tcp_connections: Option<usize>,
    max_tcp_per_source: Option<usize>,
    tcp_idle: Option<String>,
    tcp_half_open: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    domain: String,
    sip: String,
    trust: Option<String>,
    psk_file: Option<PathBuf>,
    continuity: Option<String>,
    fingerprints: Option<Vec<String>>,
    senders: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    maildir: Option<PathBuf>,
    smtp: Option<String>,
    lanes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    retry_initial: Option<String>,
    retry_max: Option<String>,
    max_age: Option<String>,
    delay_warning: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    record_calls: Option<bool>,
    dir: Option<PathBuf>,
}

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

/// A pre-shared key read from `psk_file`: 32 random bytes, stored as one line of standard
/// base64 (RFC 4648 §4, 44 characters with the padding), as `sipmail psk generate` writes
/// it. Zeroized on drop; Debug never shows it.
///
/// Why a key and not a password: the callee answers an INVITE that names a psk peer with
/// an HMAC keyed by the PSK before the caller has proved anything, so anyone can collect
/// one and test guesses offline (docs/PROTOCOL.md §3a). Only a random key makes that
/// hopeless, so anything else is refused.
#[derive(Clone)]
pub struct Psk(zeroize::Zeroizing<Vec<u8>>);

impl Psk {
    /// Key length, in bytes.
    pub const LEN: usize = 32;
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A new random key and its file text (base64 and a newline).
    pub fn generate() -> Result<(Psk, zeroize::Zeroizing<String>), String> {
        use base64::Engine;
        let mut key = zeroize::Zeroizing::new(vec![0u8; Self::LEN]);
        getrandom::fill(&mut key)
            .map_err(|e| format!("the operating system's random number generator failed: {e}"))?;
        let text = zeroize::Zeroizing::new(format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(&key[..])
        ));
        Ok((Psk(key), text))
    }

    /// Write a new key to `path`, mode 0600; an existing file is never overwritten.
    pub fn generate_file(path: &Path) -> Result<Psk, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (psk, text) = Self::generate()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => format!(
                    "{} already exists; not overwriting a key (remove it first if you mean to replace it, and give the partner the new one)",
                    path.display()
                ),
                _ => format!("{}: {e}", path.display()),
            })?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(psk)
    }

    /// The key in a PSK file's text: one line of standard base64 that decodes to exactly 32
    /// bytes. Trailing white space (the newline) is ignored. A passphrase, hex, a key of
    /// another length, or hand-typed "base64" is refused. `what` names the file in errors.
    pub fn parse(what: &str, text: &[u8]) -> Result<Psk, String> {
        use base64::Engine;
        let fix =
            "make a key with `sipmail psk generate --out FILE` and give the partner the same file";
        let text = text.trim_ascii();
        let refuse = |why: &str| {
            Err(format!(
                "{what}: {why}; a PSK is 32 random bytes in base64, one line: {fix}"
            ))
        };
        if text.is_empty() {
            return refuse("empty");
        }
        let Ok(key) = base64::engine::general_purpose::STANDARD.decode(text) else {
            return refuse("not base64 (a passphrase is not a key: it can be guessed offline)");
        };
        let key = zeroize::Zeroizing::new(key);
        if key.len() != Self::LEN {
            return refuse(&format!(
                "decodes to {} bytes, not {}",
                key.len(),
                Self::LEN
            ));
        }
        // 43 characters of random base64 hold upper- and lower-case letters with
        // probability 1 - 4e-10; text without either was typed or derived, not drawn.
        if !text.iter().any(u8::is_ascii_uppercase) || !text.iter().any(u8::is_ascii_lowercase) {
            return refuse("does not look random (no mix of upper- and lower-case letters)");
        }
        Ok(Psk(key))
    }

    /// Reads a key file: it must be a regular file that only its owner can read, holding a
    /// key as [`Psk::parse`] takes it.
    pub fn load(path: &Path) -> Result<Psk, String> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !md.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by group or others (mode {mode:03o}): chmod 600 it",
                path.display()
            ));
        }
        // A key file is 45 bytes; anything much larger is not one (and is not read whole).
        if md.len() > 1024 {
            return Err(format!(
                "{}: {} bytes, not a PSK file (32 random bytes in base64, one line): make one with `sipmail psk generate --out FILE`",
                path.display(),
                md.len()
            ));
        }
        let data = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        Self::parse(&path.display().to_string(), &data)
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// How calls with one peer are authenticated (`trust = ...` on a `[[peer]]`).
#[derive(Clone, Debug)]
pub enum Trust {
    /// OpenPGP signatures by the peer's cert in our keyring (the default).
    Signed,
    /// HMAC over the transcript with a pre-shared key (`psk_file`).
    Psk(Psk),
    /// Signatures by a key the peer presents, pinned on first use.
    Opportunistic,
}

impl Trust {
    pub fn mode(&self) -> crate::handshake::AuthMode {
        use crate::handshake::AuthMode;
        match self {
            Trust::Signed => AuthMode::Signed,
            Trust::Psk(_) => AuthMode::Psk,
            Trust::Opportunistic => AuthMode::Opportunistic,
        }
    }
}

/// `[[peer]] fingerprints`: each 40 (v4) or 64 (v6) hex digits, spaces and a `0x` allowed;
/// uppercased. An empty list would refuse the peer for good, so it is an error too.
fn parse_fingerprints(list: &[String]) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err(
            "an empty list accepts no certificate: list the partner's fingerprints or remove the key"
                .into(),
        );
    }
    list.iter()
        .map(|f| {
            let mut s: String = f.chars().filter(|c| !c.is_whitespace()).collect();
            if s.starts_with("0x") || s.starts_with("0X") {
                s.drain(..2);
            }
            let s = s.to_ascii_uppercase();
            if (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(s)
            } else {
                Err(format!(
                    "\"{f}\" is not a fingerprint: expected 40 (v4) or 64 (v6) hex digits"
                ))
            }
        })
        .collect()
}

/// What a retained-secret mismatch does (`continuity = ...` on a `[[peer]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ContinuityPolicy {
    /// Log a warning and go on without the old secret (the default).
    #[default]
    Warn,
    /// Refuse the call; the mail stays queued until an operator runs `sipmail trust reset`.
    Require,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub domain: String,
    pub sip: SipTarget,
    pub trust: Trust,
    pub continuity: ContinuityPolicy,
    /// `fingerprints = [...]`: the only certificates (uppercase hex) that may speak for
    /// this peer; `None`: any certificate imported for its domain.
    pub fingerprints: Option<Vec<String>>,
    /// Further sender domains (and their subdomains) this peer may use in MAIL FROM over
    /// its calls, besides its own domain; A-labels, lower case (`senders = [...]`).
    pub senders: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum Delivery {
    Maildir(PathBuf),
    Smtp(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct QueueTimes {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    /// Send a "delayed" DSN once a recipient has waited this long (None: never, as
    /// Postfix's default `delay_warning_time = 0`).
    pub delay_warning: Option<Duration>,
}

impl Default for QueueTimes {
    /// RFC 5321 §4.5.4.1: retry interval at least 30 minutes, give-up time 4-5 days. We
    /// start lower and back off exponentially up to the maximum.
    fn default() -> Self {
        QueueTimes {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(5 * 24 * 3600),
            delay_warning: None,
        }
    }
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
    fn default() -> Self {
        SipLimits {
            max_message_size: 65_535,
            invite_rate: 20.0,
            invite_burst: 40.0,
            max_pending_per_source: 16,
            max_pending_total: 256,
            max_tcp_connections: 256,
            max_tcp_per_source: 16,
            tcp_idle: Duration::from_secs(120),
            tcp_half_open: Duration::from_secs(10),
        }
    }
}

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
    pub call_idle: Duration,
    /// Calls placed at once to one peer when mail is waiting (each reused for many messages).
    pub calls_per_peer: usize,
    /// Media cipher suites we offer and accept, in our order of preference.
    pub suites: Vec<crate::handshake::Suite>,
    /// Local deliveries at once.
    pub local_lanes: usize,
    pub sip_limits: SipLimits,
    pub peers: Vec<Peer>,
    pub delivery: Delivery,
    pub queue: QueueTimes,
    /// Where each established call's audit record goes (`[audit]`; see crate::audit), or
    /// `None` when `record_calls = false`. Default: `<relay.spool>/calls`.
    pub call_records: Option<PathBuf>,
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

fn valid_domain(d: &str) -> bool {
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

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            msg: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let bad = |key: &str, msg: String| ConfigError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            msg,
        };
        let domain = raw.relay.domain.to_ascii_lowercase();
        if !valid_domain(&domain) {
            return Err(bad(
                "relay.domain",
                format!("\"{domain}\" is not a domain name"),
            ));
        }
        let sock = |key: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse::<SocketAddr>().map_err(|_| {
                bad(
                    key,
                    format!("\"{v}\" is not an address:port like 127.0.0.1:2525"),
                )
            })
        };
        let smtp_listen = sock("smtp.listen", &raw.smtp.listen)?;
        let smtp_allow = raw
            .smtp
            .allow
            .iter()
            .map(|c| Cidr::parse(c).map_err(|m| bad("smtp.allow", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let sip_listen = sock("sip.listen", &raw.sip.listen)?;
        let media_ip: IpAddr = raw.sip.media.parse().map_err(|_| {
            bad(
                "sip.media",
                format!("\"{}\" is not an IP address", raw.sip.media),
            )
        })?;
        let call_idle = match &raw.sip.call_idle {
            None => Duration::from_secs(10),
            Some(s) => parse_duration(s).map_err(|m| bad("sip.call_idle", m))?,
        };
        let mut sip_limits = SipLimits::default();
        {
            let l = &mut sip_limits;
            let r = &raw.sip;
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
        }
        let mut peers: Vec<Peer> = Vec::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let key = format!("peer[{i}]");
            let d = p.domain.to_ascii_lowercase();
            if !valid_domain(&d) {
                return Err(bad(
                    &format!("{key}.domain"),
                    format!("\"{d}\" is not a domain name"),
                ));
            }
            if d == domain {
                return Err(bad(
                    &format!("{key}.domain"),
                    format!("\"{d}\" is our own relay.domain"),
                ));
            }
            if peers.iter().any(|q| q.domain == d) {
                return Err(bad(
                    &format!("{key}.domain"),
                    format!("\"{d}\" is listed twice"),
                ));
            }
            let sip = SipTarget::parse(&p.sip).map_err(|m| bad(&format!("{key}.sip"), m))?;
            let trust = match (p.trust.as_deref().unwrap_or("signed"), &p.psk_file) {
                ("signed", None) => Trust::Signed,
                ("opportunistic", None) => Trust::Opportunistic,
                ("psk", Some(f)) => {
                    Trust::Psk(Psk::load(f).map_err(|m| bad(&format!("{key}.psk_file"), m))?)
                }
                ("psk", None) => {
                    return Err(bad(
                        &format!("{key}.psk_file"),
                        "trust = \"psk\" needs psk_file = \"FILE\" (mode 0600; make one with `sipmail psk generate --out FILE`)"
                            .into(),
                    ));
                }
                ("signed" | "opportunistic", Some(_)) => {
                    return Err(bad(
                        &format!("{key}.psk_file"),
                        "psk_file is only used with trust = \"psk\"".into(),
                    ));
                }
                (other, _) => {
                    return Err(bad(
                        &format!("{key}.trust"),
                        format!("\"{other}\" is not one of signed, psk, opportunistic"),
                    ));
                }
            };
            let continuity = match p.continuity.as_deref() {
                None | Some("warn") => ContinuityPolicy::Warn,
                Some("require") => ContinuityPolicy::Require,
                Some(other) => {
                    return Err(bad(
                        &format!("{key}.continuity"),
                        format!("\"{other}\" is not one of warn, require"),
                    ));
                }
            };
            let fingerprints = match &p.fingerprints {
                None => None,
                Some(_) if !matches!(trust, Trust::Signed) => {
                    return Err(bad(
                        &format!("{key}.fingerprints"),
                        "fingerprints is only used with trust = \"signed\"".into(),
                    ));
                }
                Some(list) => Some(
                    parse_fingerprints(list).map_err(|m| bad(&format!("{key}.fingerprints"), m))?,
                ),
            };
            let mut senders: Vec<String> = Vec::new();
            for s in p.senders.iter().flatten() {
                let n = crate::domain::normalise_domain(s).ok_or_else(|| {
                    bad(
                        &format!("{key}.senders"),
                        format!("\"{s}\" is not a domain name (write a domain such as example.org, no address or literal)"),
                    )
                })?;
                if !n.contains('.') {
                    return Err(bad(
                        &format!("{key}.senders"),
                        format!(
                            "\"{s}\" is a whole top-level domain; list the partner's own domains"
                        ),
                    ));
                }
                if n == domain {
                    return Err(bad(
                        &format!("{key}.senders"),
                        format!("\"{s}\" is our own relay.domain: a peer may never send as it"),
                    ));
                }
                if !senders.contains(&n) && n != d {
                    senders.push(n);
                }
            }
            if let Trust::Psk(k) = &trust
                && let Some(j) = peers.iter().position(|q| match &q.trust {
                    Trust::Psk(other) => other.as_bytes() == k.as_bytes(),
                    _ => false,
                })
            {
                // The MAC names no one: a peer holding another's PSK could call as it.
                return Err(bad(
                    &format!("{key}.psk_file"),
                    format!(
                        "{d} has the same pre-shared key as {} (peer[{j}]); each peer needs its own, or either could call as the other: `sipmail psk generate --out FILE`",
                        peers[j].domain
                    ),
                ));
            }
            peers.push(Peer {
                domain: d,
                sip,
                trust,
                continuity,
                fingerprints,
                senders,
            });
        }
        // A domain listed for one peer that is another peer's own would never be honoured
        // (the more specific owner wins, see relay::sender): say so rather than ignore it.
        for (i, p) in peers.iter().enumerate() {
            if let Some(s) = p
                .senders
                .iter()
                .find(|s| peers.iter().any(|q| q.domain == **s))
            {
                return Err(bad(
                    &format!("peer[{i}].senders"),
                    format!(
                        "\"{s}\" is the domain of another [[peer]], which only that peer may send as"
                    ),
                ));
            }
        }
        let delivery = match (&raw.delivery.maildir, &raw.delivery.smtp) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "delivery",
                    "set either maildir or smtp, not both".into(),
                ));
            }
            (None, Some(s)) => Delivery::Smtp(sock("delivery.smtp", s)?),
            (Some(m), None) => Delivery::Maildir(m.clone()),
            (None, None) => Delivery::Maildir(raw.relay.spool.join("maildir")),
        };
        let mut queue = QueueTimes::default();
        let dur = |key: &str, v: &Option<String>, d: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(d),
                Some(s) => parse_duration(s).map_err(|m| bad(key, m)),
            }
        };
        queue.retry_initial = dur(
            "queue.retry_initial",
            &raw.queue.retry_initial,
            queue.retry_initial,
        )?;
        queue.retry_max = dur("queue.retry_max", &raw.queue.retry_max, queue.retry_max)?;
        queue.max_age = dur("queue.max_age", &raw.queue.max_age, queue.max_age)?;
        queue.delay_warning = match &raw.queue.delay_warning {
            None => None,
            Some(s) => match parse_duration(s).map_err(|m| bad("queue.delay_warning", m))? {
                d if d.is_zero() => None,
                d if d >= queue.max_age => {
                    return Err(bad(
                        "queue.delay_warning",
                        "must be shorter than queue.max_age (or 0 for none)".into(),
                    ));
                }
                d => Some(d),
            },
        };
        if queue.retry_initial.is_zero() || queue.retry_max < queue.retry_initial {
            return Err(bad(
                "queue.retry_max",
                "must be at least queue.retry_initial, and both above zero".into(),
            ));
        }
        let max_message_size = raw.smtp.max_message_size.unwrap_or(50 * 1024 * 1024);
        let calls_per_peer = raw.sip.calls_per_peer.unwrap_or(16);
        if !(1..=64).contains(&calls_per_peer) {
            return Err(bad(
                "sip.calls_per_peer",
                format!("{calls_per_peer} is not in 1..=64"),
            ));
        }
        let suites = match &raw.sip.suites {
            None => crate::handshake::Suite::ALL.to_vec(),
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    let s = crate::handshake::Suite::from_name(n).ok_or_else(|| {
                        bad(
                            "sip.suites",
                            format!(
                                "unknown suite \"{n}\" (known: chacha20-poly1305, aes-256-gcm)"
                            ),
                        )
                    })?;
                    if !v.contains(&s) {
                        v.push(s);
                    }
                }
                if v.is_empty() {
                    return Err(bad("sip.suites", "lists no suite".into()));
                }
                v
            }
        };
        let local_lanes = raw.delivery.lanes.unwrap_or(8);
        if !(1..=64).contains(&local_lanes) {
            return Err(bad(
                "delivery.lanes",
                format!("{local_lanes} is not in 1..=64"),
            ));
        }
        let call_records = match raw.audit.record_calls {
            Some(false) => None,
            _ => Some(
                raw.audit
                    .dir
                    .clone()
                    .unwrap_or_else(|| raw.relay.spool.join("calls")),
            ),
        };
        Ok(Config {
            file: file.to_string(),
            hostname: raw.relay.hostname.unwrap_or_else(|| domain.clone()),
            domain,
            keyring: raw.relay.keyring,
            signing_key: raw.relay.signing_key,
            spool: raw.relay.spool,
            smtp_listen,
            smtp_allow,
            max_message_size,
            max_recipients: raw.smtp.max_recipients.unwrap_or(100),
            sip_listen,
            media_ip,
            call_idle,
            calls_per_peer,
            suites,
            local_lanes,
            sip_limits,
            peers,
            delivery,
            queue,
            call_records,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[relay]
domain = "site-a.test"
keyring = "keyring/site-a"
spool = "var/site-a/spool"
[smtp]
listen = "127.0.0.1:2525"
allow = ["127.0.0.0/8"]
[sip]
listen = "127.0.0.1:5060"
media = "127.0.0.1"
[[peer]]
domain = "site-b.test"
sip = "sip:mail@127.0.0.1:5062"
[delivery]
maildir = "var/site-a/maildir"
"#;

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse("a.toml", GOOD).unwrap();
        assert_eq!(c.domain, "site-a.test");
        assert_eq!(c.peers[0].sip.port, 5062);
        assert!(matches!(c.delivery, Delivery::Maildir(_)));
        assert!(c.smtp_allow[0].contains("127.9.9.9".parse().unwrap()));
        assert!(!c.smtp_allow[0].contains("10.0.0.1".parse().unwrap()));
        assert!(c.smtp_allow[0].contains("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = GOOD.replace("[smtp]\n", "[smtp]\nlistne = \"x\"\n");
        let e = Config::parse("a.toml", &text).unwrap_err().to_string();
        assert!(e.starts_with("a.toml:"), "{e}");
        assert!(e.contains("listne"), "{e}");
    }

    #[test]
    fn bad_addresses_name_the_key() {
        for (from, to, key) in [
            (
                "listen = \"127.0.0.1:2525\"",
                "listen = \"127.0.0.1\"",
                "smtp.listen",
            ),
            (
                "media = \"127.0.0.1\"",
                "media = \"localhost:1\"",
                "sip.media",
            ),
            (
                "sip = \"sip:mail@127.0.0.1:5062\"",
                "sip = \"http://x\"",
                "peer[0].sip",
            ),
            (
                "allow = [\"127.0.0.0/8\"]",
                "allow = [\"127.0.0.0/33\"]",
                "smtp.allow",
            ),
        ] {
            let e = Config::parse("a.toml", &GOOD.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
            assert!(e.starts_with("a.toml: "), "{e}");
        }
    }

    #[test]
    fn sip_limits_default_and_override() {
        let c = Config::parse("a.toml", GOOD).unwrap();
        assert_eq!(c.sip_limits, SipLimits::default());
        assert_eq!(c.sip_limits.invite_rate, 20.0);
        let text = GOOD.replace(
            "media = \"127.0.0.1\"\n",
            "media = \"127.0.0.1\"\ninvite_rate = 5\nmax_pending_total = 10\ntcp_half_open = \"3s\"\n",
        );
        let c = Config::parse("a.toml", &text).unwrap();
        assert_eq!(c.sip_limits.invite_rate, 5.0);
        assert_eq!(c.sip_limits.max_pending_total, 10);
        assert_eq!(c.sip_limits.tcp_half_open, Duration::from_secs(3));
        for (line, key) in [
            ("max_message_size = 100", "sip.max_message_size"),
            ("max_message_size = 70000", "sip.max_message_size"),
            ("invite_rate = -1", "sip.invite_rate"),
            ("max_pending_per_source = 0", "sip.max_pending_per_source"),
            ("tcp_idle = \"0s\"", "sip.tcp_idle"),
        ] {
            let text = GOOD.replace(
                "media = \"127.0.0.1\"\n",
                &format!("media = \"127.0.0.1\"\n{line}\n"),
            );
            let e = Config::parse("a.toml", &text).unwrap_err().to_string();
            assert!(e.contains(key), "{line}: {e}");
        }
    }

    #[test]
    fn trust_policies_parse_and_psk_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let c = Config::parse("a.toml", GOOD).unwrap();
        assert!(matches!(c.peers[0].trust, Trust::Signed));
        assert_eq!(c.peers[0].continuity, ContinuityPolicy::Warn);
        let with = |extra: &str| {
            GOOD.replace(
                "sip = \"sip:mail@127.0.0.1:5062\"\n",
                &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{extra}\n"),
            )
        };
        let c = Config::parse(
            "a.toml",
            &with("trust = \"opportunistic\"\ncontinuity = \"require\""),
        )
        .unwrap();
        assert!(matches!(c.peers[0].trust, Trust::Opportunistic));
        assert_eq!(c.peers[0].continuity, ContinuityPolicy::Require);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("psk");
        // Bytes 0x00..0x1f in base64 (the PROTOCOL.md vector's key).
        std::fs::write(&f, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let psk_line = format!("trust = \"psk\"\npsk_file = \"{}\"", f.display());
        let c = Config::parse("a.toml", &with(&psk_line)).unwrap();
        match &c.peers[0].trust {
            Trust::Psk(k) => {
                assert_eq!(k.as_bytes(), (0u8..32).collect::<Vec<u8>>());
                assert!(!format!("{c:?}").contains("AAECAwQF"));
            }
            other => panic!("{other:?}"),
        }
        // Readable by others: refused, naming the key.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::parse("a.toml", &with(&psk_line))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("peer[0].psk_file") && e.contains("chmod 600"),
            "{e}"
        );
        // Not a key: a passphrase (even a long one), hex, another length, no randomness,
        // two lines. Each refusal names the key and the file and says what to run.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (text, why) in [
            ("short\n", "not base64"),
            (
                "0123456789abcdef0123456789abcdef-long-enough\n",
                "not base64",
            ),
            (
                "correct horse battery staple and some more words\n",
                "not base64",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
                "decodes to 48 bytes",
            ),
            (
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==\n",
                "decodes to 31 bytes",
            ),
            (
                "correcthorsebatterystaplecorrecthorsebatteg=\n",
                "does not look random",
            ),
            (
                "AAECAwQFBgcICQoLDA0O\nDxAREhMUFRYXGBkaGxwdHh8=\n",
                "not base64",
            ),
            ("", "empty"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Config::parse("a.toml", &with(&psk_line))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(why)
                    && e.contains("peer[0].psk_file")
                    && e.contains(&f.display().to_string())
                    && e.contains("sipmail psk generate"),
                "{text:?}: {e}"
            );
        }
        // What `sipmail psk generate` writes is taken; it never overwrites.
        let g = dir.path().join("generated.psk");
        let made = Psk::generate_file(&g).unwrap();
        assert_eq!(
            std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Psk::load(&g).unwrap().as_bytes(), made.as_bytes());
        assert!(
            Psk::generate_file(&g)
                .unwrap_err()
                .contains("already exists")
        );
        assert_eq!(Psk::load(&g).unwrap().as_bytes(), made.as_bytes());
        for (extra, key) in [
            ("trust = \"psk\"", "peer[0].psk_file"),
            ("trust = \"none\"", "peer[0].trust"),
            ("psk_file = \"/x\"", "peer[0].psk_file"),
            ("continuity = \"maybe\"", "peer[0].continuity"),
        ] {
            let e = Config::parse("a.toml", &with(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn peer_fingerprints_are_hex_and_named_in_errors() {
        let with = |extra: &str| {
            GOOD.replace(
                "sip = \"sip:mail@127.0.0.1:5062\"\n",
                &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{extra}\n"),
            )
        };
        let c = Config::parse(
            "a.toml",
            &with("fingerprints = [\"0x0123 4567 89ab cdef 0123 4567 89ab cdef 0123 4567\"]"),
        )
        .unwrap();
        assert_eq!(
            c.peers[0].fingerprints.as_deref(),
            Some(&["0123456789ABCDEF0123456789ABCDEF01234567".to_string()][..])
        );
        assert!(
            Config::parse("a.toml", GOOD).unwrap().peers[0]
                .fingerprints
                .is_none()
        );
        for extra in [
            "fingerprints = [\"0123\"]",
            "fingerprints = [\"XYZ3456789ABCDEF0123456789ABCDEF01234567\"]",
            "fingerprints = []",
            "trust = \"opportunistic\"\nfingerprints = [\"0123456789ABCDEF0123456789ABCDEF01234567\"]",
        ] {
            let e = Config::parse("a.toml", &with(extra))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("a.toml: peer[0].fingerprints: "),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn peer_senders_are_normalised_and_checked() {
        let with = |line: &str| {
            GOOD.replace(
                "sip = \"sip:mail@127.0.0.1:5062\"\n",
                &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{line}\n"),
            )
        };
        assert!(
            Config::parse("a.toml", GOOD).unwrap().peers[0]
                .senders
                .is_empty()
        );
        let c = Config::parse(
            "a.toml",
            &with("senders = [\"Partner.Example.\", \"bücher.test\", \"partner.example\", \"site-b.test\"]"),
        )
        .unwrap();
        assert_eq!(
            c.peers[0].senders,
            ["partner.example", "xn--bcher-kva.test"]
        );
        for (line, what) in [
            ("senders = [\"x@example.org\"]", "not a domain name"),
            ("senders = [\"[127.0.0.1]\"]", "not a domain name"),
            ("senders = [\"\"]", "not a domain name"),
            ("senders = [\"org\"]", "top-level"),
            ("senders = [\"SITE-A.test\"]", "our own relay.domain"),
            ("senders = \"example.org\"", "senders"),
        ] {
            let e = Config::parse("a.toml", &with(line))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("a.toml: "), "{e}");
            assert!(
                e.contains("peer[0].senders") || e.contains("senders"),
                "{e}"
            );
            assert!(e.contains(what), "{line}: {e}");
        }
        // Another partner's own domain is that partner's alone.
        let two = with("senders = [\"site-c.test\"]").replace(
            "[delivery]",
            "[[peer]]\ndomain = \"site-c.test\"\nsip = \"sip:mail@127.0.0.1:5064\"\n[delivery]",
        );
        let e = Config::parse("a.toml", &two).unwrap_err().to_string();
        assert!(
            e.contains("peer[0].senders") && e.contains("another [[peer]]"),
            "{e}"
        );
    }

    #[test]
    fn durations_and_targets() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5d").unwrap(), Duration::from_secs(432000));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        let t = SipTarget::parse("sip:mail@[::1]:5070;transport=tcp").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tcp), ("::1", 5070, true));
        assert_eq!(t.to_string(), "sip:mail@[::1]:5070;transport=tcp");
        assert_eq!(SipTarget::parse("sip:mail@example.net").unwrap().port, 5060);
    }
}
