//! The relay: binds the SMTP and SIP sockets, routes mail, places and answers calls.
//!
//! ```text
//! site MTA --SMTP--> inbound::serve_site --spool--> scheduler --> caller (SIP call + tunnel) --> peer
//! peer --SIP INVITE--> callee --tunnel--> inbound::serve_peer --spool--> scheduler --> local delivery
//! ```

mod admission;
mod bounce;
mod callee;
mod caller;
pub mod control;
mod dialog;
mod inbound;
mod local;
mod scheduler;
pub mod sender;
mod trace;
pub mod trust;

use crate::config::{Config, ConfigError};
use crate::handshake::{Signer, Verifier};
use crate::keyring::{Keyring, KeyringError};
use crate::queue::Spool;
use crate::sip::limits::PendingCalls;
use crate::sip::{Endpoint, EndpointConfig, Incoming, Method, Request, Response};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, watch};

use dialog::warn_response;
pub use scheduler::QueueSnapshot;
pub(crate) use trace::civil_from_days;

/// (year, month, day) of a day count since 1970-01-01 (for the CLI's dates).
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    civil_from_days(days)
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Keyring(#[from] KeyringError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RelayError {
    let what = what.into();
    move |source| RelayError::Io { what, source }
}

/// Tells every task to stop; cloneable.
#[derive(Clone, Debug)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown(Arc::new(watch::channel(false).0))
    }
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
    /// Resolves once `trigger` was called.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What the relay reports to whoever listens (logs carry the same facts).
#[derive(Clone, Debug)]
pub enum RelayEvent {
    CallEstablished {
        call_id: String,
        peer: String,
        outgoing: bool,
        local_fingerprint: String,
        peer_fingerprint: String,
        suite: String,
        sas: String,
        /// The peer's trust policy: signed, psk or opportunistic.
        trust: String,
        /// What the retained secrets said (see `handshake::Continuity::name`).
        continuity: String,
    },
    CallFailed {
        peer: String,
        reason: String,
    },
    CallEnded {
        call_id: String,
        peer: String,
    },
    Queued {
        id: String,
    },
    Delivered {
        id: String,
        recipient: String,
    },
    /// Given up on a recipient; a bounce goes to the sender.
    Failed {
        id: String,
        recipient: String,
        reason: String,
    },
}

/// Test hooks. Production code never sets these.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Rewrites the media address the caller connects to, so a test can put a recording
    /// or tampering TCP proxy between the relays.
    pub media_connect: Option<Arc<dyn Fn(SocketAddr) -> SocketAddr + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("media_connect", &self.media_connect.is_some())
            .finish()
    }
}

/// The keyring and what the relay derives from it, swapped as a whole on reload. A call
/// takes one snapshot ([`Shared::keys`]) and uses it to the end, so it never mixes two
/// keyrings.
pub(crate) struct KeyState {
    pub keyring: Keyring,
    pub own_fpr: Vec<u8>,
    pub own_fpr_hex: String,
    /// The key we sign with and its public key packet, presented in opportunistic calls.
    pub signing_fpr: Vec<u8>,
    pub signing_packet: Vec<u8>,
}

impl KeyState {
    /// Open and check the keyring against the config (see [`check_keyring`]).
    pub fn load(cfg: &Config, reload: bool) -> Result<KeyState, RelayError> {
        let keyring = check_keyring_for(cfg, !reload)?;
        let own_fpr_hex = keyring.own_fingerprint()?;
        let own_fpr =
            hex::decode(&own_fpr_hex).map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
        let (signing_fpr_hex, signing_packet) = keyring.own_signing_key()?;
        let signing_fpr = hex::decode(&signing_fpr_hex)
            .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
        Ok(KeyState {
            keyring,
            own_fpr,
            own_fpr_hex,
            signing_fpr,
            signing_packet,
        })
    }

    /// The signer and the verifier for calls with `peer`, by its trust policy. `presented`
    /// is the key packet the peer presented (opportunistic only).
    pub fn auth_for<'a>(
        &'a self,
        peer: &'a crate::config::Peer,
        presented: &'a [u8],
    ) -> (
        Box<dyn Signer + Send + Sync + 'a>,
        Box<dyn Verifier + Send + Sync + 'a>,
    ) {
        use crate::config::Trust;
        match &peer.trust {
            Trust::Signed => (
                Box::new(KeyringSigner(&self.keyring)),
                Box::new(PeerVerifier {
                    keyring: &self.keyring,
                    domain: &peer.domain,
                }),
            ),
            Trust::Psk(k) => {
                let a = crate::handshake::PskAuth::new(k.as_bytes());
                (Box::new(a.clone()), Box::new(a))
            }
            Trust::Opportunistic => (
                Box::new(KeyringSigner(&self.keyring)),
                Box::new(PresentedKeyVerifier { packet: presented }),
            ),
        }
    }

    /// The fingerprint we announce to `peer`: our cert's, or (opportunistic) our signing
    /// key's, which is what the peer pins.
    pub fn announced_fpr(&self, peer: &crate::config::Peer) -> Vec<u8> {
        if peer.trust.mode() == crate::handshake::AuthMode::Opportunistic {
            self.signing_fpr.clone()
        } else {
            self.own_fpr.clone()
        }
    }
}

pub(crate) struct Shared {
    pub cfg: Config,
    /// Replaced whole by [`Shared::reload_keys`] (SIGHUP, `sipmail keys import`).
    keys: std::sync::RwLock<Arc<KeyState>>,
    pub spool: Spool,
    pub endpoint: Endpoint,
    pub sip_addr: SocketAddr,
    pub queue: scheduler::Queue,
    pub dialogs: Mutex<HashMap<String, mpsc::Sender<Incoming>>>,
    /// Incoming calls not yet ACKed, per source and in total, and how to end each one
    /// if it is evicted to make room.
    pub pending: Mutex<PendingTable>,
    pub shutdown: Shutdown,
    pub events: broadcast::Sender<RelayEvent>,
    pub hooks: Hooks,
    /// Retained secrets and pins, under `<spool>/state`. In an Arc so that its fsynced
    /// writes can run on the blocking pool, off the runtime's threads.
    pub trust: Arc<trust::TrustStore>,
    /// Per peer, the gate that makes our call set-ups to it run one at a time, holding the
    /// last failure (see `caller::place_call_in_turn`).
    pub call_setup: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<caller::SetupFailure>>>>>,
    /// Rate limit, per peer, on writing keys the peer presented but we refused (pending).
    pub trust_writes: Mutex<trust::WriteLimiter>,
    /// Each peer's configured addresses (see `peer_addresses`).
    pub peer_addrs: HashMap<String, Vec<IpAddr>>,
}

impl Shared {
    pub fn event(&self, e: RelayEvent) {
        let _ = self.events.send(e);
    }

    /// The current keyring (a snapshot: a reload does not change it under the caller).
    pub fn keys(&self) -> Arc<KeyState> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Read the keyring again (revocations, imported and removed certs, peer bindings, own
    /// keys) and check it as at start; if it is usable, calls from now on use it. If not,
    /// the old keyring stays in use and the error says why.
    pub async fn reload_keys(self: &Arc<Self>) -> Result<String, String> {
        let me = self.clone();
        let loaded = tokio::task::spawn_blocking(move || KeyState::load(&me.cfg, true))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match loaded {
            Ok(ks) => {
                let summary = format!(
                    "keyring {} reloaded: own key {}, {} partner certificate(s)",
                    self.cfg.keyring.display(),
                    ks.own_fpr_hex,
                    ks.keyring.list().iter().filter(|k| !k.own).count()
                );
                tracing::info!(fingerprint = %ks.own_fpr_hex, "{summary}");
                match self.keys.write() {
                    Ok(mut k) => *k = Arc::new(ks),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(ks),
                }
                Ok(summary)
            }
            Err(why) => {
                tracing::warn!(error = %why, "keyring reload failed; the keyring loaded before stays in use");
                Err(format!(
                    "keyring reload failed, the keyring loaded before stays in use: {why}"
                ))
            }
        }
    }

    /// The audit record of a call: both fingerprints, the suite, the SAS and the hash of
    /// the signed transcript, in the log and as an event; and, unless `audit.record_calls`
    /// is off, the signed data and both signatures in a record file (crate::audit). Then the
    /// call's trust state is kept: its retained secret for the next call, and
    /// (opportunistic) the peer's key pinned if this was the first use. Called only once the
    /// media stream has proved that both sides hold the same keys.
    pub async fn call_established(
        &self,
        call_id: &str,
        peer: &crate::config::Peer,
        outgoing: bool,
        peer_fpr: &str,
        keys: &crate::handshake::SessionKeys,
        sigs: crate::audit::CallSignatures<'_>,
    ) {
        let mode = peer.trust.mode();
        let ks = self.keys();
        // Only OpenPGP-signed calls leave evidence a third party can check (docs/AUDIT.md):
        // a PSK call's MACs prove nothing to anyone without the secret, and an
        // opportunistic call's keys are not in anyone's keyring.
        if let Some(dir) = &self.cfg.call_records
            && mode == crate::handshake::AuthMode::Signed
        {
            self.record_call(dir, call_id, &peer.domain, outgoing, keys, sigs);
        }
        let local_fpr = if mode == crate::handshake::AuthMode::Opportunistic {
            hex::encode_upper(&ks.signing_fpr)
        } else {
            ks.own_fpr_hex.clone()
        };
        tracing::info!(
            %call_id,
            peer = %peer.domain,
            direction = if outgoing { "outgoing" } else { "incoming" },
            trust = %mode,
            local_fingerprint = %local_fpr,
            peer_fingerprint = %peer_fpr,
            suite = %keys.suite,
            sas = %keys.sas,
            continuity = %keys.continuity,
            transcript_sha256 = %hex::encode(keys.transcript_hash),
            "call established"
        );
        // The trust state is written (and fsynced) on the blocking pool; the call waits for
        // it, so that the next call to or from this peer finds the new secret.
        let (trust, domain, retained) = (
            self.trust.clone(),
            peer.domain.clone(),
            keys.retained.clone(),
        );
        let pin = (mode == crate::handshake::AuthMode::Opportunistic).then(|| peer_fpr.to_string());
        let stored = tokio::task::spawn_blocking(move || {
            (
                trust.remember(&domain, &retained),
                pin.map(|fpr| trust.pin_first_use(&domain, &fpr)),
            )
        })
        .await;
        let (remembered, pinned) = match stored {
            Ok(r) => r,
            Err(e) => (
                Err(trust::TrustError::Io {
                    path: self.trust.dir().to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                }),
                None,
            ),
        };
        if let Err(e) = remembered {
            tracing::warn!(peer = %peer.domain, error = %e, "cannot store the retained secret; the next call has no key continuity");
        }
        match pinned {
            Some(Ok(true)) => tracing::warn!(
                peer = %peer.domain, peer_fingerprint = %peer_fpr, sas = %keys.sas,
                "opportunistic peer's key pinned on first use: compare the SAS with the partner to rule out a man in the middle on this call"
            ),
            Some(Err(e)) => {
                tracing::warn!(peer = %peer.domain, error = %e, "cannot pin the peer's key")
            }
            Some(Ok(false)) | None => {}
        }
        self.event(RelayEvent::CallEstablished {
            call_id: call_id.to_string(),
            peer: peer.domain.clone(),
            outgoing,
            local_fingerprint: local_fpr,
            peer_fingerprint: peer_fpr.to_string(),
            suite: keys.suite.to_string(),
            sas: keys.sas.clone(),
            trust: mode.to_string(),
            continuity: keys.continuity.to_string(),
        });
    }

    /// Is `ip` one of `domain`'s configured addresses?
    pub fn is_peer_address(&self, domain: &str, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.peer_addrs.get(domain).is_some_and(|v| v.contains(&ip))
    }

    /// Keep a key that `domain` presented, whose signature verified, but that we refused
    /// (changed, or first use from elsewhere), for `sipmail trust accept`. Rate-limited per
    /// peer; the write (two fsyncs) runs on the blocking pool.
    pub async fn record_pending(&self, domain: &str, fingerprint: &str, from: IpAddr) {
        let allowed = self
            .trust_writes
            .lock()
            .map(|mut l| l.allow(domain, std::time::Instant::now()))
            .unwrap_or(false);
        if !allowed {
            tracing::warn!(peer = %domain, presented = %fingerprint, %from,
                "refused key not recorded as pending: too many trust-state writes for this peer (rate limit)");
            return;
        }
        let (trust, d, f) = (
            self.trust.clone(),
            domain.to_string(),
            fingerprint.to_string(),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let from_s = canonical_ip(from).to_string();
        let r =
            tokio::task::spawn_blocking(move || trust.record_pending(&d, &f, &from_s, now)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(peer = %domain, error = %e, "cannot record the refused key")
            }
            Err(e) => tracing::warn!(peer = %domain, error = %e, "cannot record the refused key"),
        }
    }

    /// Our retained secrets for `domain`; a corrupt file is logged and treated as none.
    pub fn retained_for(&self, domain: &str) -> Vec<crate::handshake::RetainedSecret> {
        self.trust.retained(domain).unwrap_or_else(|e| {
            tracing::warn!(peer = %domain, error = %e, "retained secrets unreadable; calling without them");
            Vec::new()
        })
    }
}

impl Shared {
    /// Write the call's audit record off the call's path. A failure is logged, never fatal:
    /// the log line "call established" carries the same identities.
    fn record_call(
        &self,
        dir: &std::path::Path,
        call_id: &str,
        peer: &str,
        outgoing: bool,
        keys: &crate::handshake::SessionKeys,
        sigs: crate::audit::CallSignatures<'_>,
    ) {
        let rec = match crate::audit::CallRecord::new(
            call_id,
            outgoing,
            peer,
            keys,
            sigs,
            std::time::SystemTime::now(),
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%call_id, error = %e, "cannot build the call's audit record");
                return;
            }
        };
        let dir = dir.to_path_buf();
        let call_id = call_id.to_string();
        tokio::task::spawn_blocking(move || match rec.write(&dir) {
            Ok(path) => tracing::debug!(%call_id, record = %path.display(), "call record written"),
            Err(e) => tracing::warn!(%call_id, error = %e, "cannot write the call's audit record"),
        });
    }
}

/// Where mail for `addr` goes: our domain is local, a partner's goes to that peer, anything
/// else has no route (sipmail is not an Internet MTA).
pub(crate) fn route_for(cfg: &Config, addr: &str) -> Option<crate::queue::Route> {
    let domain = addr
        .rsplit_once('@')?
        .1
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if domain == cfg.domain {
        Some(crate::queue::Route::Local)
    } else {
        cfg.peer(&domain)
            .map(|p| crate::queue::Route::Peer(p.domain.clone()))
    }
}

/// A `Reason` header value (RFC 3326) explaining why we hang up.
pub(crate) fn reason_header(text: &str) -> String {
    format!(
        "SIP;cause=488;text=\"{}\"",
        text.replace(['"', '\\', '\r', '\n'], " ")
    )
}

/// Signs with the relay's own OpenPGP key.
pub struct KeyringSigner<'a>(pub &'a Keyring);
impl Signer for KeyringSigner<'_> {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.0.sign_detached(data).map_err(|e| e.to_string())
    }
}

/// Verifies with the cert held for `mail@domain`.
pub struct PeerVerifier<'a> {
    pub keyring: &'a Keyring,
    pub domain: &'a str,
}
impl Verifier for PeerVerifier<'_> {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String> {
        self.keyring
            .verify_detached(
                self.domain,
                &hex::encode_upper(fingerprint),
                data,
                signature,
            )
            .map_err(|e| e.to_string())
    }
}

/// Verifies with the key packet the peer presented in an opportunistic call.
pub struct PresentedKeyVerifier<'a> {
    pub packet: &'a [u8],
}
impl Verifier for PresentedKeyVerifier<'_> {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String> {
        if self.packet.is_empty() {
            return Err("an opportunistic peer must present its key (a=sipmail-pubkey)".into());
        }
        crate::keyring::verify_with_key_packet(
            self.packet,
            &hex::encode_upper(fingerprint),
            data,
            signature,
        )
        .map_err(|e| e.to_string())
    }
}

/// Open the keyring and check it against the config: our own key for mail@domain, and a
/// usable cert for every peer.
pub fn check_keyring(cfg: &Config) -> Result<Keyring, RelayError> {
    check_keyring_for(cfg, true)
}

/// As [`check_keyring`]; with `peers_required` false (a reload), a peer left without a
/// usable certificate (its only one revoked or removed: the point of the change) is a
/// warning, and calls with it are refused until one is imported.
fn check_keyring_for(cfg: &Config, peers_required: bool) -> Result<Keyring, RelayError> {
    if !cfg.keyring.is_dir() {
        return Err(cfg
            .invalid(
                "relay.keyring",
                format!(
                    "{} does not exist: create it with `sipmail keys generate --keyring {} --domain {}`",
                    cfg.keyring.display(),
                    cfg.keyring.display(),
                    cfg.domain
                ),
            )
            .into());
    }
    let mut kr =
        Keyring::open(&cfg.keyring).map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    kr.check_bindings()
        .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    for (i, p) in cfg.peers.iter().enumerate() {
        if let Some(list) = &p.fingerprints {
            kr.restrict_peer(&p.domain, list)
                .map_err(|e| cfg.invalid(&format!("peer[{i}].fingerprints"), e.to_string()))?;
        }
    }
    if let Some(fpr) = &cfg.signing_key {
        kr.select_signing_key(fpr)
            .map_err(|e| cfg.invalid("relay.signing_key", e.to_string()))?;
    }
    kr.own_domain_ok(&cfg.domain)
        .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    for (i, p) in cfg.peers.iter().enumerate() {
        // Only `signed` peers need a cert; psk and opportunistic peers do without.
        if matches!(p.trust, crate::config::Trust::Signed) && !kr.has_peer(&p.domain) {
            if !peers_required {
                tracing::warn!(peer = %p.domain, "no usable certificate for this peer any more: its calls are refused until one is imported");
                continue;
            }
            return Err(cfg
                .invalid(
                    &format!("peer[{i}]"),
                    format!(
                        "no usable certificate for mail@{}{} in {}: import the partner's cert with `sipmail keys import --keyring {} FILE`",
                        p.domain,
                        if p.fingerprints.is_some() { " among its fingerprints" } else { "" },
                        cfg.keyring.display(),
                        cfg.keyring.display()
                    ),
                )
                .into());
        }
    }
    Ok(kr)
}

/// A started relay.
pub struct Running {
    pub smtp_addr: SocketAddr,
    pub sip_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    pub fn events(&self) -> broadcast::Receiver<RelayEvent> {
        self.shared.events.subscribe()
    }

    pub fn queue_snapshot(&self) -> QueueSnapshot {
        self.shared.queue.snapshot()
    }

    /// The IDs of every queued message, oldest first.
    pub fn queue_snapshot_ids(&self) -> Vec<String> {
        self.shared.queue.list().into_iter().map(|e| e.id).collect()
    }

    /// Read the keyring again, as SIGHUP does (see [`Shared::reload_keys`]).
    pub async fn reload_keys(&self) -> Result<String, String> {
        self.shared.reload_keys().await
    }

    /// Wait until every task has finished (after shutdown was triggered).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.shared.endpoint.shutdown().await;
        tracing::info!(domain = %self.shared.cfg.domain, "relay stopped");
    }
}

/// Bind everything and start the tasks.
pub async fn start(cfg: Config, shutdown: Shutdown, hooks: Hooks) -> Result<Running, RelayError> {
    let keys = KeyState::load(&cfg, false)?;
    // Claim the spool first: recovery must never run under another daemon's feet.
    std::fs::create_dir_all(&cfg.spool)
        .map_err(io_err(format!("creating spool {}", cfg.spool.display())))?;
    let control = control::bind(&cfg.spool).await.map_err(io_err(format!(
        "{}: relay.spool {}",
        cfg.file,
        cfg.spool.display()
    )))?;
    control::write_keyring_pointer(&cfg.keyring, &cfg.spool);
    let (spool, envelopes) = Spool::open(&cfg.spool)
        .map_err(io_err(format!("opening spool {}", cfg.spool.display())))?;
    if let crate::config::Delivery::Maildir(m) = &cfg.delivery {
        crate::queue::maildir::ensure(m)
            .map_err(io_err(format!("creating Maildir {}", m.display())))?;
    }
    let smtp = tokio::net::TcpListener::bind(cfg.smtp_listen)
        .await
        .map_err(io_err(format!(
            "{}: smtp.listen {}",
            cfg.file, cfg.smtp_listen
        )))?;
    let smtp_addr = smtp.local_addr().map_err(io_err("smtp socket"))?;
    let peer_addrs = peer_addresses(&cfg).await;
    let mut trusted: Vec<IpAddr> = peer_addrs.values().flatten().copied().collect();
    trusted.sort();
    trusted.dedup();
    let limits = &cfg.sip_limits;
    let ep_cfg = EndpointConfig {
        max_message: limits.max_message_size,
        invite_rate: limits.invite_rate,
        invite_burst: limits.invite_burst,
        max_tcp_connections: limits.max_tcp_connections,
        max_tcp_per_source: limits.max_tcp_per_source,
        tcp_idle_timeout: limits.tcp_idle,
        tcp_message_timeout: limits.tcp_half_open,
        trusted: trusted.clone(),
        ..EndpointConfig::default()
    };
    let pending = PendingTable {
        calls: PendingCalls::new(limits.max_pending_per_source, limits.max_pending_total)
            .with_exempt(trusted.iter().copied()),
        evict: HashMap::new(),
    };
    let (endpoint, incoming) = Endpoint::bind(cfg.sip_listen, ep_cfg)
        .await
        .map_err(io_err(format!(
            "{}: sip.listen {}",
            cfg.file, cfg.sip_listen
        )))?;
    let sip_addr = endpoint.local_addr();
    let recovered = envelopes.len();
    let cfg_spool = cfg.spool.clone();
    let shared = Arc::new(Shared {
        queue: scheduler::Queue::new(spool.clone(), envelopes, cfg.queue.clone()),
        cfg,
        keys: std::sync::RwLock::new(Arc::new(keys)),
        spool,
        endpoint,
        sip_addr,
        dialogs: Mutex::new(HashMap::new()),
        pending: Mutex::new(pending),
        shutdown,
        events: broadcast::channel(1024).0,
        hooks,
        trust: Arc::new(trust::TrustStore::new(&cfg_spool)),
        trust_writes: Mutex::new(trust::WriteLimiter::default()),
        peer_addrs,
        call_setup: Mutex::new(HashMap::new()),
    });
    tracing::info!(
        domain = %shared.cfg.domain,
        smtp = %smtp_addr,
        sip = %sip_addr,
        fingerprint = %shared.keys().own_fpr_hex,
        peers = shared.cfg.peers.len(),
        recovered,
        "relay started"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(inbound::accept_loop(shared.clone(), smtp));
    tasks.spawn(sip_loop(shared.clone(), incoming));
    tasks.spawn(scheduler::run(shared.clone()));
    tasks.spawn(control::serve(shared.clone(), control));
    Ok(Running {
        smtp_addr,
        sip_addr,
        shared,
        tasks,
    })
}

/// Run until shutdown. SIGHUP reloads the keyring.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<(), RelayError> {
    let running = start(cfg, shutdown.clone(), Hooks::default()).await?;
    let shared = running.shared.clone();
    let hup = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; reload the keyring with `sipmail keys import` or a restart");
                return;
            }
        };
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { break },
                _ = shutdown.wait() => break,
            }
            tracing::info!("SIGHUP: reloading the keyring");
            // A failure is logged by reload_keys; the old keyring stays.
            let _ = shared.reload_keys().await;
        }
    });
    running.wait().await;
    hup.abort();
    Ok(())
}

pub(crate) const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS";

/// Methods that exist (RFC 3261 and its extensions) but that sipmail does not allow:
/// `405 Method Not Allowed`. Anything else is unknown: `501 Not Implemented`.
const KNOWN_METHODS: &[&str] = &[
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

/// The IP addresses of each configured peer (the host of its `sip` URI). Over TCP they
/// are exempt from the INVITE rate limit and the totals, so a flood from elsewhere does
/// not lock them out; and an opportunistic peer's key is pinned on first use only from
/// one of them (or when we placed the call). Host names are resolved once, at start.
async fn peer_addresses(cfg: &Config) -> HashMap<String, Vec<IpAddr>> {
    let mut out = HashMap::new();
    for p in &cfg.peers {
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Ok(ip) = p
            .sip
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            ips.push(ip);
        } else {
            match tokio::net::lookup_host((p.sip.host.as_str(), p.sip.port)).await {
                Ok(addrs) => ips.extend(addrs.map(|a| a.ip())),
                Err(e) => {
                    tracing::warn!(peer = %p.domain, host = %p.sip.host, error = %e, "cannot resolve peer; it gets no exemption from the SIP limits, and (opportunistic) is pinned only by a call we place")
                }
            }
        }
        let ips: Vec<IpAddr> = ips.into_iter().map(canonical_ip).collect();
        out.entry(p.domain.clone())
            .or_insert_with(Vec::new)
            .extend(ips);
    }
    out
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The pending calls and, per call, the sender that tells its task it was evicted.
pub(crate) struct PendingTable {
    pub calls: PendingCalls,
    pub evict: HashMap<crate::sip::limits::CallId, tokio::sync::oneshot::Sender<()>>,
}

/// Holds one pending-call slot; frees it when dropped.
pub(crate) struct PendingGuard {
    shared: Arc<Shared>,
    id: crate::sip::limits::CallId,
    evicted: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl PendingGuard {
    /// Resolves when this call was evicted to make room for newer ones (never, once the
    /// call is no longer pending).
    pub async fn evicted(&mut self) {
        match self.evicted.as_mut() {
            Some(rx) => {
                if rx.await.is_err() {
                    // The sender was dropped without a send: not evicted.
                    std::future::pending::<()>().await
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.calls.finish(self.id);
            p.evict.remove(&self.id);
        }
    }
}

/// Option-tags in `Require` that we do not support: all of them (RFC 3261 §8.2.2.3).
fn unsupported_requires(req: &Request) -> Vec<String> {
    req.headers
        .get_all("Require")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Dispatch incoming SIP requests: new INVITEs start a callee task; in-dialog requests go
/// to their call's task.
async fn sip_loop(shared: Arc<Shared>, mut incoming: mpsc::Receiver<Incoming>) {
    let mut calls = tokio::task::JoinSet::new();
    let mut stopping = false;
    loop {
        if stopping && calls.is_empty() {
            break;
        }
        let inc = tokio::select! {
            inc = incoming.recv() => match inc { Some(i) => i, None => break },
            _ = shared.shutdown.wait(), if !stopping => { stopping = true; continue }
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
        };
        let call_id = inc
            .request
            .headers
            .call_id()
            .unwrap_or_default()
            .to_string();
        let in_dialog = inc
            .request
            .headers
            .to()
            .ok()
            .and_then(|t| t.tag().map(|_| ()))
            .is_some();
        // A Request-URI we cannot serve: 416 (RFC 3261 §8.2.2.1).
        let scheme = inc.request.uri.split(':').next().unwrap_or("");
        if !scheme.eq_ignore_ascii_case("sip") && inc.request.method != Method::Ack {
            let r = warn_response(
                &inc.request,
                416,
                "Unsupported URI Scheme",
                "sipmail answers sip: URIs only",
            );
            let _ = inc.respond(r).await;
            continue;
        }
        // We support no extensions: any Require gets 420 (never for ACK or CANCEL).
        if !matches!(inc.request.method, Method::Ack | Method::Cancel) {
            let unsupported = unsupported_requires(&inc.request);
            if !unsupported.is_empty() {
                let mut r = warn_response(
                    &inc.request,
                    420,
                    "Bad Extension",
                    "sipmail supports no SIP extensions",
                );
                r.headers.push("Unsupported", unsupported.join(", "));
                let _ = inc.respond(r).await;
                continue;
            }
        }
        match inc.request.method {
            Method::Invite if !in_dialog && stopping => {
                let mut r = Response::for_request(&inc.request, 503, "Service Unavailable");
                r.headers.push("Retry-After", "60");
                r.headers
                    .push("Warning", "399 sipmail \"relay is shutting down\"");
                let _ = inc.respond(r).await;
            }
            Method::Invite if !in_dialog => {
                // Never refused for lack of room: the oldest un-ACKed call from the same
                // source (or, with the table full, from anywhere) is evicted instead, so
                // spoofed INVITEs cannot hold a partner's slots (issue 11).
                let verified = inc.transport == crate::sip::Transport::Tcp;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let admitted = shared.pending.lock().ok().map(|mut p| {
                    let a = p
                        .calls
                        .start(inc.source.ip(), verified, std::time::Instant::now());
                    p.evict.insert(a.id, tx);
                    let evicted = a.evict.and_then(|e| p.evict.remove(&e.id).map(|s| (e, s)));
                    (a.id, evicted)
                });
                let Some((id, evicted)) = admitted else {
                    let r = warn_response(&inc.request, 503, "Service Unavailable", "overloaded");
                    let _ = inc.respond(r).await;
                    continue;
                };
                if let Some((e, stop)) = evicted {
                    tracing::warn!(source = %inc.source, per_source = e.per_source,
                        "pending calls full: the oldest un-ACKed call is dropped to make room");
                    let _ = stop.send(());
                }
                let guard = PendingGuard {
                    shared: shared.clone(),
                    id,
                    evicted: Some(rx),
                };
                calls.spawn(callee::handle_invite(shared.clone(), inc, guard));
            }
            Method::Options => {
                let mut r = Response::for_request(&inc.request, 200, "OK");
                r.headers.push("Allow", ALLOW);
                r.headers
                    .push("Accept", "application/sdp, application/sipmail-confirm");
                r.headers.push("Supported", "");
                let _ = inc.respond(r).await;
            }
            Method::Ack | Method::Bye | Method::Invite | Method::Cancel => {
                let tx = shared
                    .dialogs
                    .lock()
                    .ok()
                    .and_then(|d| d.get(&call_id).cloned());
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(inc);
                    }
                    None if inc.request.method == Method::Ack => {
                        tracing::debug!(%call_id, "ACK for no known call, absorbed");
                    }
                    None => {
                        let _ = inc
                            .respond(Response::for_request(
                                &inc.request,
                                481,
                                "Call/Transaction Does Not Exist",
                            ))
                            .await;
                    }
                }
            }
            ref m if KNOWN_METHODS.contains(&m.as_str()) => {
                let mut r = Response::for_request(&inc.request, 405, "Method Not Allowed");
                r.headers.push("Allow", ALLOW);
                let _ = inc.respond(r).await;
            }
            _ => {
                let mut r = Response::for_request(&inc.request, 501, "Not Implemented");
                r.headers.push("Allow", ALLOW);
                let _ = inc.respond(r).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_tags_are_all_unsupported() {
        let mut r = Request::new(Method::Invite, "sip:mail@x");
        assert!(unsupported_requires(&r).is_empty());
        r.headers.push("Require", "100rel, timer");
        r.headers.push("Require", "foo");
        assert_eq!(unsupported_requires(&r), vec!["100rel", "timer", "foo"]);
    }
}
