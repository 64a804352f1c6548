//! The relay's Prometheus metrics ([`Metrics`]) and the HTTP endpoint that serves them with
//! `/healthz` and `/readyz` ([`http`]). Imports nothing of ours: the relay records into a
//! [`Metrics`] handle and answers the readiness question through [`http::Probe`].
//!
//! Labels stay bounded: a peer label is one of the configured partners (anything else is
//! counted as `other`), a route is `local`, a peer or a configured SMTP next hop, a reason comes from [`CallFailure`],
//! a continuity outcome from the handshake's fixed set, and a key is one in the keyring.

pub mod counting;
pub mod http;
mod labels;

use labels::{
    BytesLabels, CallLabels, ContinuityLabels, FailLabels, KeyLabels, PeerLabels, RouteLabels,
};
pub use labels::{CallFailure, Direction};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The peer label for a domain that is not a configured partner (an unknown caller).
pub const OTHER_PEER: &str = "other";
/// The route label of local delivery.
pub const LOCAL_ROUTE: &str = "local";

/// A queue route as the metrics label it: `local`, the partner's domain (or `other`), or
/// an SMTP next hop as `smtp:[host]:port`. `None`/`Some(peer)` convert to the first two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteLabel<'a> {
    Local,
    Peer(&'a str),
    /// Host and port, from the routing table, so the labels stay as few as its entries.
    NextHop(&'a str, u16),
}

impl<'a> From<Option<&'a str>> for RouteLabel<'a> {
    fn from(peer: Option<&'a str>) -> Self {
        peer.map_or(RouteLabel::Local, RouteLabel::Peer)
    }
}

impl<'a> From<Option<&'a String>> for RouteLabel<'a> {
    fn from(peer: Option<&'a String>) -> Self {
        peer.map_or(RouteLabel::Local, |p| RouteLabel::Peer(p))
    }
}

/// One key as the key gauges show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyExpiry {
    /// Our own key, or a partner's.
    pub own: bool,
    /// The domain of its `mail@` user ID.
    pub domain: String,
    pub fingerprint: String,
    /// `None`: never expires.
    pub expires: Option<SystemTime>,
}

/// The outcome of the last call with a peer (for `/readyz` and a gauge): one that came
/// up, either way, or one we placed that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastCall {
    pub at: SystemTime,
    pub direction: Direction,
    /// `None`: the call came up.
    pub failure: Option<CallFailure>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn setup_histogram() -> Histogram {
    // 5 ms .. ~41 s: a set-up on a LAN takes milliseconds, an unanswered INVITE 32 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn transfer_histogram() -> Histogram {
    // 1 ms .. ~65 s per message.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric of the relay. Cheap to record into (atomics; a lock only to find a label's
/// series); always present, whether or not the endpoint is on.
pub struct Metrics {
    registry: Registry,
    peers: RwLock<HashSet<String>>,
    accepted: Family<RouteLabels, Counter>,
    delivered: Family<RouteLabels, Counter>,
    deferred: Family<RouteLabels, Counter>,
    bounced: Family<RouteLabels, Counter>,
    queue_messages: Family<RouteLabels, Gauge>,
    queue_oldest: Family<RouteLabels, Gauge>,
    calls_placed: Family<PeerLabels, Counter>,
    calls_answered: Family<PeerLabels, Counter>,
    calls_established: Family<CallLabels, Counter>,
    calls_failed: Family<FailLabels, Counter>,
    call_setup: HistogramFamily<PeerLabels>,
    transfer: HistogramFamily<RouteLabels>,
    tunnel_bytes: Family<BytesLabels, Counter>,
    continuity: Family<ContinuityLabels, Counter>,
    last_call_ok: Family<PeerLabels, Gauge>,
    last_call_time: Family<PeerLabels, Gauge>,
    key_expiry: Family<KeyLabels, Gauge>,
    key_expires_soon: Family<KeyLabels, Gauge>,
    receipts_issued: Family<PeerLabels, Counter>,
    duplicates_suppressed: Family<PeerLabels, Counter>,
    receipts_verified: Family<PeerLabels, Counter>,
    receipts_refused: Family<PeerLabels, Counter>,
    delivered_issued: Family<PeerLabels, Counter>,
    delivered_verified: Family<PeerLabels, Counter>,
    delivered_refused: Family<PeerLabels, Counter>,
    last_calls: Mutex<BTreeMap<String, LastCall>>,
    scraping: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// How long before a key expires we warn (issue 15: 30 days).
pub const KEY_WARNING: Duration = Duration::from_secs(30 * 86_400);

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

impl Metrics {
    /// The metrics of a relay whose partners are `peers` (the only peer labels used).
    pub fn new<I: IntoIterator<Item = String>>(peers: I) -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("sipmail"),
            peers: RwLock::new(HashSet::new()),
            accepted: Family::default(),
            delivered: Family::default(),
            deferred: Family::default(),
            bounced: Family::default(),
            queue_messages: Family::default(),
            queue_oldest: Family::default(),
            calls_placed: Family::default(),
            calls_answered: Family::default(),
            calls_established: Family::default(),
            calls_failed: Family::default(),
            call_setup: Family::new_with_constructor(setup_histogram as fn() -> Histogram),
            transfer: Family::new_with_constructor(transfer_histogram as fn() -> Histogram),
            tunnel_bytes: Family::default(),
            continuity: Family::default(),
            last_call_ok: Family::default(),
            last_call_time: Family::default(),
            key_expiry: Family::default(),
            key_expires_soon: Family::default(),
            receipts_issued: Family::default(),
            duplicates_suppressed: Family::default(),
            receipts_verified: Family::default(),
            receipts_refused: Family::default(),
            delivered_issued: Family::default(),
            delivered_verified: Family::default(),
            delivered_refused: Family::default(),
            last_calls: Mutex::new(BTreeMap::new()),
            scraping: Mutex::new(()),
        };
        m.register();
        m.set_peers(peers);
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "messages_accepted",
            "Recipients queued on a route (from SMTP, or a delivery status notification we generated)",
            self.accepted.clone(),
        );
        r.register(
            "messages_delivered",
            "Recipients delivered on a route",
            self.delivered.clone(),
        );
        r.register(
            "messages_deferred",
            "Delivery attempts of a recipient that failed for now (retried later)",
            self.deferred.clone(),
        );
        r.register(
            "messages_bounced",
            "Recipients given up on (failed for good; a bounce goes to the sender)",
            self.bounced.clone(),
        );
        r.register(
            "queue_messages",
            "Messages waiting in the queue with a recipient on this route",
            self.queue_messages.clone(),
        );
        r.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message waiting on this route (0 when none)",
            self.queue_oldest.clone(),
        );
        r.register(
            "calls_placed",
            "Calls we placed to a partner (INVITEs sent)",
            self.calls_placed.clone(),
        );
        r.register(
            "calls_answered",
            "Calls from a partner we answered with 200 OK",
            self.calls_answered.clone(),
        );
        r.register(
            "calls_established",
            "Calls that came up: keys proven over the media stream",
            self.calls_established.clone(),
        );
        r.register(
            "calls_failed",
            "Calls that failed before they came up, by reason",
            self.calls_failed.clone(),
        );
        r.register(
            "call_setup_seconds",
            "Time from our INVITE to an established call (outgoing calls)",
            self.call_setup.clone(),
        );
        r.register(
            "message_transfer_seconds",
            "Time to hand one message to the next hop (through a call, or local delivery)",
            self.transfer.clone(),
        );
        r.register(
            "tunnel_bytes",
            "Bytes through the calls' encrypted media streams (records on the wire)",
            self.tunnel_bytes.clone(),
        );
        r.register(
            "key_continuity",
            "Established calls by key-continuity outcome (retained secrets)",
            self.continuity.clone(),
        );
        r.register(
            "peer_last_call_success",
            "1 if the last call with this partner came up (either way), 0 if the last was one we placed that failed",
            self.last_call_ok.clone(),
        );
        r.register(
            "peer_last_call_timestamp_seconds",
            "When the last call with this partner came up or failed (unix time)",
            self.last_call_time.clone(),
        );
        r.register(
            "key_expiry_timestamp_seconds",
            "When a key expires (unix time); keys that never expire have no series",
            self.key_expiry.clone(),
        );
        r.register(
            "key_expires_soon",
            "1 if the key expires within 30 days (or has expired), else 0",
            self.key_expires_soon.clone(),
        );
        r.register(
            "receipts_issued",
            "Signed receipts we issued for a partner's messages we made durable",
            self.receipts_issued.clone(),
        );
        r.register(
            "duplicates_suppressed",
            "Resends of a partner's message we had accepted before: not queued again, the earlier receipt returned",
            self.duplicates_suppressed.clone(),
        );
        r.register(
            "receipts_verified",
            "Receipts from a partner that verified and matched the message sent",
            self.receipts_verified.clone(),
        );
        r.register(
            "receipts_refused",
            "Receipts from a partner refused (bad signature, wrong key, another message or call); the message stays queued",
            self.receipts_refused.clone(),
        );
        r.register(
            "delivered_receipts_issued",
            "Signed delivered receipts we issued when we handed a partner's message on",
            self.delivered_issued.clone(),
        );
        r.register(
            "delivered_receipts_verified",
            "Delivered receipts fetched from a partner that verified and matched an accepted one",
            self.delivered_verified.clone(),
        );
        r.register(
            "delivered_receipts_refused",
            "Delivered receipts fetched from a partner and refused (not stored)",
            self.delivered_refused.clone(),
        );
    }

    /// The partners whose domains may appear as labels (at start, and after a reload).
    pub fn set_peers<I: IntoIterator<Item = String>>(&self, peers: I) {
        let set: HashSet<String> = peers.into_iter().map(|p| p.to_ascii_lowercase()).collect();
        match self.peers.write() {
            Ok(mut p) => *p = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// The label for `domain`: itself if it is a partner, else [`OTHER_PEER`].
    pub fn peer_label(&self, domain: &str) -> String {
        let d = domain.to_ascii_lowercase();
        let known = match self.peers.read() {
            Ok(p) => p.contains(&d),
            Err(poisoned) => poisoned.into_inner().contains(&d),
        };
        if known { d } else { OTHER_PEER.to_string() }
    }

    /// The label of a route.
    fn route<'a>(&self, route: impl Into<RouteLabel<'a>>) -> RouteLabels {
        RouteLabels {
            route: match route.into() {
                RouteLabel::Local => LOCAL_ROUTE.to_string(),
                RouteLabel::Peer(p) => self.peer_label(p),
                RouteLabel::NextHop(host, port) => format!("smtp:[{host}]:{port}"),
            },
        }
    }

    fn peer(&self, domain: &str) -> PeerLabels {
        PeerLabels {
            peer: self.peer_label(domain),
        }
    }

    pub fn accepted<'a>(&self, route: impl Into<RouteLabel<'a>>, recipients: u64) {
        self.accepted
            .get_or_create(&self.route(route))
            .inc_by(recipients);
    }

    pub fn delivered<'a>(&self, route: impl Into<RouteLabel<'a>>) {
        self.delivered.get_or_create(&self.route(route)).inc();
    }

    pub fn deferred<'a>(&self, route: impl Into<RouteLabel<'a>>) {
        self.deferred.get_or_create(&self.route(route)).inc();
    }

    pub fn bounced<'a>(&self, route: impl Into<RouteLabel<'a>>) {
        self.bounced.get_or_create(&self.route(route)).inc();
    }

    /// One message handed to the next hop on a route, taking `took`.
    pub fn transferred<'a>(&self, route: impl Into<RouteLabel<'a>>, took: Duration) {
        self.transfer
            .get_or_create(&self.route(route))
            .observe(took.as_secs_f64());
    }

    /// The queue per route right now: `(route, messages, age of the oldest)`. Routes not
    /// listed (the partners, and local) show 0.
    pub fn set_queue(&self, routes: &[(RouteLabel<'_>, u64, Duration)]) {
        self.queue_messages.clear();
        self.queue_oldest.clear();
        let peers = self.known_peers();
        let all =
            std::iter::once(RouteLabel::Local).chain(peers.iter().map(|p| RouteLabel::Peer(p)));
        for r in all {
            let l = self.route(r);
            self.queue_messages.get_or_create(&l).set(0);
            self.queue_oldest.get_or_create(&l).set(0);
        }
        for (route, n, age) in routes {
            let l = self.route(*route);
            self.queue_messages
                .get_or_create(&l)
                .inc_by(i64::try_from(*n).unwrap_or(i64::MAX));
            let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
            let g = self.queue_oldest.get_or_create(&l);
            if age > g.get() {
                g.set(age);
            }
        }
    }

    fn known_peers(&self) -> Vec<String> {
        let mut v: Vec<String> = match self.peers.read() {
            Ok(p) => p.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        };
        v.sort();
        v
    }

    pub fn receipt_issued(&self, peer: &str) {
        self.receipts_issued.get_or_create(&self.peer(peer)).inc();
    }

    pub fn duplicate_suppressed(&self, peer: &str) {
        self.duplicates_suppressed
            .get_or_create(&self.peer(peer))
            .inc();
    }

    /// Receipts that came back from `peer`: `ok` verified and matched, else refused.
    pub fn receipt_checked(&self, peer: &str, ok: bool) {
        let f = if ok {
            &self.receipts_verified
        } else {
            &self.receipts_refused
        };
        f.get_or_create(&self.peer(peer)).inc();
    }

    pub fn delivered_receipt_issued(&self, peer: &str) {
        self.delivered_issued.get_or_create(&self.peer(peer)).inc();
    }

    /// A delivered receipt fetched from `peer`: `ok` verified and matched, else refused.
    pub fn delivered_receipt_checked(&self, peer: &str, ok: bool) {
        let f = if ok {
            &self.delivered_verified
        } else {
            &self.delivered_refused
        };
        f.get_or_create(&self.peer(peer)).inc();
    }

    pub fn call_placed(&self, peer: &str) {
        self.calls_placed.get_or_create(&self.peer(peer)).inc();
    }

    pub fn call_answered(&self, peer: &str) {
        self.calls_answered.get_or_create(&self.peer(peer)).inc();
    }

    /// A call came up; `continuity` is the handshake's continuity name.
    pub fn call_established(&self, peer: &str, direction: Direction, continuity: &'static str) {
        let p = self.peer(peer);
        self.calls_established
            .get_or_create(&CallLabels {
                peer: p.peer.clone(),
                direction,
            })
            .inc();
        self.continuity
            .get_or_create(&ContinuityLabels {
                peer: p.peer.clone(),
                outcome: continuity,
            })
            .inc();
        self.last_call(p, direction, None);
    }

    /// An outgoing call to `peer` came up `took` after we sent its INVITE.
    pub fn call_setup(&self, peer: &str, took: Duration) {
        self.call_setup
            .get_or_create(&self.peer(peer))
            .observe(took.as_secs_f64());
    }

    pub fn call_failed(&self, peer: &str, direction: Direction, reason: CallFailure) {
        let p = self.peer(peer);
        self.calls_failed
            .get_or_create(&FailLabels {
                peer: p.peer.clone(),
                direction,
                reason,
            })
            .inc();
        // An incoming call that failed proved nothing about who placed it (anyone can put
        // a partner's domain in From): it does not change that partner's last call.
        if direction == Direction::Outgoing {
            self.last_call(p, direction, Some(reason));
        }
    }

    fn last_call(&self, p: PeerLabels, direction: Direction, failure: Option<CallFailure>) {
        // Unknown callers are not a partner's state.
        if p.peer == OTHER_PEER {
            return;
        }
        let at = SystemTime::now();
        self.last_call_ok
            .get_or_create(&p)
            .set(i64::from(failure.is_none()));
        self.last_call_time.get_or_create(&p).set(unix(at));
        let mut calls = self.last_calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.insert(
            p.peer,
            LastCall {
                at,
                direction,
                failure,
            },
        );
    }

    /// The last call with each partner that had one, by domain.
    pub fn last_calls(&self) -> BTreeMap<String, LastCall> {
        self.last_calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counters for the bytes of one call's media stream with `peer`.
    pub fn tunnel_counters(&self, peer: &str) -> counting::Counters {
        let peer = self.peer_label(peer);
        counting::Counters {
            read: self.tunnel_bytes.get_or_create_owned(&BytesLabels {
                peer: peer.clone(),
                direction: "in",
            }),
            written: self.tunnel_bytes.get_or_create_owned(&BytesLabels {
                peer,
                direction: "out",
            }),
        }
    }

    /// The keys now in the keyring (replaces the last set, so a removed key disappears).
    /// Returns the keys that expire within [`KEY_WARNING`] of `now` (or have expired).
    pub fn set_keys(&self, keys: &[KeyExpiry], now: SystemTime) -> Vec<KeyExpiry> {
        self.key_expiry.clear();
        self.key_expires_soon.clear();
        let mut soon = Vec::new();
        for k in keys {
            let l = KeyLabels {
                owner: if k.own { "own" } else { "partner" },
                domain: k.domain.clone(),
                fingerprint: k.fingerprint.clone(),
            };
            let expiring = k.expires.is_some_and(|e| e <= now + KEY_WARNING);
            if let Some(e) = k.expires {
                self.key_expiry.get_or_create(&l).set(unix(e));
            }
            self.key_expires_soon
                .get_or_create(&l)
                .set(i64::from(expiring));
            if expiring {
                soon.push(k.clone());
            }
        }
        soon
    }

    /// The exposition: OpenMetrics text, as Prometheus scrapes it. `refresh` first sets
    /// the gauges read from state (queue, keys); one scrape at a time, so two cannot
    /// interleave their refreshes.
    pub fn scrape(&self, refresh: impl FnOnce(&Metrics)) -> Result<String, std::fmt::Error> {
        let _one = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        refresh(self);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
