//! What every task of the relay needs, grouped by job: the settings a reload can change
//! ([`Settings`]: who we are, our partners, SMTP limits), the keyring ([`Keys`]), the SIP
//! side ([`SipState`]), the peers' trust state ([`PeerTrust`]), the mail ([`Spool`] and
//! [`MailQueue`]), the metrics and the listeners' state ([`Listeners`]), and the shutdown
//! signal, events and test hooks.
//! It holds run-time state and the live settings, not the config: the settings that need a
//! restart are handed to each task as arguments at start (see `daemon::start`).

use super::events::{Events, Hooks, RelayEvent, Shutdown};
use super::keys::{KeyState, Keys};
use super::scheduler::MailQueue;
pub(crate) use super::settings::canonical_ip;
use super::settings::{InForce, Live, Settings};
use super::trust;
use crate::metrics::Metrics;
use crate::queue::Spool;
use crate::sip::limits::{CallId, PendingCalls};
use crate::sip::{Endpoint, Incoming};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub(crate) struct Context {
    /// Our domain, partners, SMTP limits...: swapped whole by a reload; a call or session
    /// takes one snapshot ([`Context::settings`]).
    pub settings: Arc<Live<Settings>>,
    /// The config in force (the last one a reload accepted). Its lock also makes reloads
    /// run one at a time; no task reads it.
    pub config: tokio::sync::Mutex<InForce>,
    /// The keyring in use; a call takes one snapshot ([`Context::keys`]).
    pub keys: Arc<Keys>,
    pub sip: SipState,
    pub trust: PeerTrust,
    /// The message files; written by `inbound` and `bounce`, read by the workers.
    pub spool: Spool,
    /// The queue in memory (the scheduler's); `inbound` inserts, `control` inspects.
    pub queue: Arc<MailQueue>,
    /// Signed receipts: the store, the call journal, the duplicate keys' locks.
    pub receipts: Arc<super::receipts::Receipts>,
    pub shutdown: Shutdown,
    pub events: Events,
    /// Counters, gauges and histograms (see crate::metrics); always recorded.
    pub metrics: Arc<Metrics>,
    /// Whether the SMTP and SIP loops still serve their sockets (for `/readyz`).
    pub listeners: Arc<Listeners>,
    pub hooks: Hooks,
    /// Where SMTP hand-offs are made: the hand-off agent's process (see `agent`), or in
    /// this process when there is none (a relay started as a library, in tests).
    pub agent: Option<Arc<super::agent::Agent>>,
}

/// Whether each listener's loop is running: set when it starts, cleared when it ends
/// (normally or not), by [`Listeners::run`].
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    pub smtp: AtomicBool,
    pub sip: AtomicBool,
}

impl Listeners {
    /// Run `task` (a listener's loop) with `flag` set while it runs.
    pub async fn run(flag: &AtomicBool, task: impl std::future::Future<Output = ()>) {
        /// Clears the flag however the loop ends.
        struct Up<'a>(&'a AtomicBool);
        impl Drop for Up<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        flag.store(true, Ordering::SeqCst);
        let _up = Up(flag);
        task.await
    }
}

/// The SIP side: the endpoint, the calls in progress, and the gates of our own calls.
pub(crate) struct SipState {
    pub endpoint: Endpoint,
    /// Our SIP address for Contact: `sip.advertise` behind a NAT, else the bound one.
    pub addr: SocketAddr,
    /// In-dialog requests go to their call's task through these (by Call-ID).
    pub dialogs: Mutex<HashMap<String, mpsc::Sender<Box<Incoming>>>>,
    /// Incoming calls not yet ACKed, per source and in total, and how to end each one
    /// if it is evicted to make room.
    pub pending: Mutex<PendingTable>,
    /// Per peer, the gate that makes our call set-ups to it run one at a time, holding the
    /// last failure (see `caller::place_call_in_turn`).
    pub call_setup: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<SetupFailure>>>>>,
    /// Partner relays found down lately (by target label), tried last for a while
    /// (see `failover`).
    pub down: Mutex<super::failover::DownList>,
}

/// The pending calls and, per call, the sender that tells its task it was evicted.
pub(crate) struct PendingTable {
    pub calls: PendingCalls,
    pub evict: HashMap<CallId, tokio::sync::oneshot::Sender<()>>,
}

/// The last failed set-up of a call to a peer: when, and why.
#[derive(Debug, Clone)]
pub(crate) struct SetupFailure {
    pub at: tokio::time::Instant,
    pub reason: String,
    /// The failed call's `Retry-After`, for the lanes that did not try (see `caller`).
    pub retry_after: Option<u32>,
}

/// Holds one pending-call slot; frees it when dropped.
pub(crate) struct PendingGuard {
    ctx: Arc<Context>,
    id: CallId,
    evicted: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl PendingGuard {
    /// Hold the slot `id` (already taken in `ctx.sip.pending`); `evicted` fires if the
    /// call is evicted to make room.
    pub fn new(ctx: Arc<Context>, id: CallId, evicted: tokio::sync::oneshot::Receiver<()>) -> Self {
        PendingGuard {
            ctx,
            id,
            evicted: Some(evicted),
        }
    }

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
        if let Ok(mut p) = self.ctx.sip.pending.lock() {
            p.calls.finish(self.id);
            p.evict.remove(&self.id);
        }
    }
}

/// What we keep about each peer's keys: retained secrets, pins, pending keys.
pub(crate) struct PeerTrust {
    /// Under `<spool>/state`. In an Arc so that its fsynced writes can run on the
    /// blocking pool, off the runtime's threads.
    pub store: Arc<trust::TrustStore>,
    /// Rate limit, per peer, on writing keys the peer presented but we refused (pending).
    pub writes: Mutex<trust::WriteLimiter>,
}

impl Context {
    pub fn event(&self, e: RelayEvent) {
        self.events.emit(e);
    }

    /// The current keyring (a snapshot: a reload does not change it under the caller).
    pub fn keys(&self) -> Arc<KeyState> {
        self.keys.current()
    }

    /// The current settings (a snapshot: a reload does not change it under the caller).
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.get()
    }

    /// Is `ip` one of `domain`'s configured addresses?
    pub fn is_peer_address(&self, domain: &str, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.settings()
            .peer_addrs
            .get(domain)
            .is_some_and(|v| v.contains(&ip))
    }

    /// Keep a key that `domain` presented, whose signature verified, but that we refused
    /// (changed, or first use from elsewhere), for `sipmail trust accept`. Rate-limited per
    /// peer; the write (two fsyncs) runs on the blocking pool.
    pub async fn record_pending(&self, domain: &str, fingerprint: &str, from: IpAddr) {
        let allowed = self
            .trust
            .writes
            .lock()
            .map(|mut l| l.allow(domain, std::time::Instant::now()))
            .unwrap_or(false);
        if !allowed {
            tracing::warn!(peer = %domain, presented = %fingerprint, %from,
                "refused key not recorded as pending: too many trust-state writes for this peer (rate limit)");
            return;
        }
        let (trust, d, f) = (
            self.trust.store.clone(),
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

    /// Our retained secrets for `domain`: those of calls with the remote key `remote` (the
    /// callee knows the caller's from its offer), or, placing a call before we know which
    /// of the partner's relays answers, each relay's newest first (`None`). A corrupt file
    /// is logged and treated as none.
    pub fn retained_for(
        &self,
        domain: &str,
        remote: Option<&str>,
    ) -> Vec<crate::handshake::RetainedSecret> {
        let got = match remote {
            Some(fpr) => self.trust.store.retained_for_key(domain, fpr),
            None => self.trust.store.retained_spread(domain),
        };
        got.unwrap_or_else(|e| {
            tracing::warn!(peer = %domain, error = %e, "retained secrets unreadable; calling without them");
            Vec::new()
        })
    }
}
