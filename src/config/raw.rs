//! The TOML file as serde reads it: every key optional where it has a default, unknown keys
//! refused. The section parsers turn these into the typed sections.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) relay: RawRelay,
    pub(super) smtp: RawSmtp,
    pub(super) sip: RawSip,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
    #[serde(default)]
    pub(super) delivery: RawDelivery,
    #[serde(default)]
    pub(super) queue: RawQueue,
    #[serde(default)]
    pub(super) audit: RawAudit,
    pub(super) metrics: Option<RawMetrics>,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    pub(super) dns: Option<RawDns>,
    pub(super) discovery: Option<RawDiscovery>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    pub(super) domain: String,
    pub(super) keyring: PathBuf,
    pub(super) spool: PathBuf,
    pub(super) hostname: Option<String>,
    pub(super) signing_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
    pub(super) listen: String,
    #[serde(default = "default_allow")]
    pub(super) allow: Vec<String>,
    pub(super) max_message_size: Option<u64>,
    pub(super) max_recipients: Option<usize>,
}

fn default_allow() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSip {
    pub(super) listen: String,
    pub(super) media: String,
    pub(super) media_ports: Option<String>,
    pub(super) advertise: Option<String>,
    pub(super) call_idle: Option<String>,
    pub(super) calls_per_peer: Option<usize>,
    pub(super) suites: Option<Vec<String>>,
    pub(super) max_message_size: Option<usize>,
    pub(super) invite_rate: Option<f64>,
    pub(super) invite_burst: Option<f64>,
    pub(super) max_pending_per_source: Option<usize>,
    pub(super) max_pending_total: Option<usize>,
    pub(super) max_tcp_connections: Option<usize>,
    pub(super) max_tcp_per_source: Option<usize>,
    pub(super) tcp_idle: Option<String>,
    pub(super) tcp_half_open: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) domain: String,
    pub(super) sip: RawSipTargets,
    pub(super) trust: Option<String>,
    pub(super) psk_file: Option<PathBuf>,
    pub(super) continuity: Option<String>,
    pub(super) fingerprints: Option<Vec<String>>,
    pub(super) senders: Option<Vec<String>>,
    pub(super) inbox: Option<PathBuf>,
    pub(super) outbox: Option<PathBuf>,
    pub(super) outbox_to: Option<Vec<String>>,
    pub(super) outbox_from: Option<String>,
}

/// `[[peer]] sip`: one URI, or a list of them (several relays, tried in order).
pub(super) enum RawSipTargets {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for RawSipTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawSipTargets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a SIP URI (\"sip:mail@host:port\") or a list of them, tried in order")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawSipTargets::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    v.push(s);
                }
                Ok(RawSipTargets::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    pub(super) maildir: Option<PathBuf>,
    pub(super) smtp: Option<String>,
    pub(super) lanes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) retry_initial: Option<String>,
    pub(super) retry_max: Option<String>,
    pub(super) max_age: Option<String>,
    pub(super) delay_warning: Option<String>,
    pub(super) dedup_window: Option<String>,
    pub(super) resend_hold: Option<String>,
    pub(super) spare_files: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) record_calls: Option<bool>,
    pub(super) dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
    pub(super) allow_remote: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) default: Option<String>,
    pub(super) default_message: Option<String>,
    pub(super) lanes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) resolver: String,
    pub(super) timeout: Option<String>,
    pub(super) trusted_path: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) domain: String,
    pub(super) via: String,
    pub(super) message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) domains: Vec<String>,
    pub(super) trust: Option<String>,
    pub(super) insecure: Option<String>,
}
