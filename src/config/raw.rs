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
    pub(super) sip: String,
    pub(super) trust: Option<String>,
    pub(super) psk_file: Option<PathBuf>,
    pub(super) continuity: Option<String>,
    pub(super) fingerprints: Option<Vec<String>>,
    pub(super) senders: Option<Vec<String>>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) resolver: String,
    pub(super) timeout: Option<String>,
    pub(super) trusted_path: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) domains: Vec<String>,
    pub(super) trust: Option<String>,
}
