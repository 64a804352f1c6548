//! SIP transactions (RFC 3261 §17) as a sans-IO state machine, like quinn-proto's
//! endpoint: it performs no I/O whatsoever and never reads a clock.
//!
//! The driver ([`super::endpoint`]) feeds [`Transactions`] with events and the time:
//! [`received_request`](Transactions::received_request),
//! [`received_response`](Transactions::received_response),
//! [`send_response`](Transactions::send_response), [`start_client`](Transactions::start_client)
//! and [`timeout`](Transactions::timeout). Each returns the [`Action`]s to perform: bytes to
//! transmit, a request to deliver to the application (the TU), a client transaction that
//! finished. [`next_deadline`](Transactions::next_deadline) says when to call `timeout`.
//!
//! The server side lives in `transaction/server.rs` (INVITE and non-INVITE, ACK, CANCEL,
//! the 503 overload answers, the in-dialog reserve), the client side in
//! `transaction/client.rs`. `P` is the driver's handle for answering on the path a request
//! came in on (for TCP, its connection); the table carries it without looking inside.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::limits::{LogBudget, RateLimiter, ReplyBudget};
use super::message::{Method, Request, Response, Via};
use super::timer::RetransmitTimer;

mod client;
mod server;
#[cfg(test)]
mod tests;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("transaction timed out")]
    Timeout,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("transport connection closed")]
    TransportClosed,
    #[error("message too large: {0} bytes")]
    TooLarge(usize),
    #[error("too many pending transactions")]
    TooManyTransactions,
    #[error("too many TCP connections")]
    TooManyConnections,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("a final response was already sent for this transaction")]
    AlreadyResponded,
    #[error("endpoint is shut down")]
    Shutdown,
    #[error(
        "not sent: the reply would exceed 3 times the bytes received from this unverified UDP source"
    )]
    ReplyBudget,
    #[error("the transaction was ended")]
    Ended,
}

/// Places in the incoming queue beyond `EndpointConfig::incoming_queue` that only in-dialog
/// requests may take: enough for a relay's calls all hanging up at once (1,000 BYEs
/// within 20 ms answered 503 in the 1,000-idle-calls benchmark before this reserve).
pub const IN_DIALOG_RESERVE: usize = 2048;

/// Whether a request may take one of the `free` places left in the TU's queue. New
/// (out-of-dialog) requests leave the last [`IN_DIALOG_RESERVE`] places to established
/// dialogs, so a burst of new calls cannot get a hang-up refused.
pub fn admits(in_dialog: bool, free: usize) -> bool {
    free > 0 && (in_dialog || free > IN_DIALOG_RESERVE)
}

/// To-tag prefix of stateless responses (not hex, so never one of our dialog tags).
pub(crate) const STATELESS_TAG: &str = "sl-";

/// (Call-ID, CSeq number): how a 2xx and its ACK are matched.
pub type DialogKey = (String, u32);
/// (branch, method) of a client transaction.
pub type ClientKey = (String, String);
/// A server transaction: branch, sent-by and method (see [`server_key`]).
pub type ServerKey = String;

/// The knobs of the transaction layer (a part of `EndpointConfig`).
#[derive(Debug, Clone)]
pub struct Config {
    /// RTT estimate (T1).
    pub t1: Duration,
    /// Retransmission cap for non-INVITE requests and for final responses to INVITE (T2).
    pub t2: Duration,
    /// How long a non-2xx final response to INVITE absorbs retransmitted ACKs (Timer I).
    pub t4: Duration,
    /// Timer C-like wait for a final response after a provisional one, and how long a
    /// server transaction waits for the TU.
    pub proceeding_timeout: Duration,
    /// Cap on client transactions, and on server transactions (then `503`).
    pub max_transactions: usize,
    /// Largest response sent.
    pub max_message: usize,
    /// Retry-After (seconds) of the overload `503`.
    pub retry_after: u32,
    /// New INVITEs per second per source (0: no limit), and the burst.
    pub invite_rate: f64,
    pub invite_burst: f64,
    /// Never rate-limited (over TCP, where the address is proven).
    pub trusted: Vec<IpAddr>,
}

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest<P> {
    /// Back on the path a request came in on.
    Path(P),
    /// To an address (retransmissions over UDP, ACKs of our client transactions).
    Addr(SocketAddr, Transport),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<P> {
    pub to: Dest<P>,
    pub bytes: Vec<u8>,
}

/// A request for the TU, with what the driver needs to let it answer.
#[derive(Debug, Clone)]
pub struct Delivery<P> {
    pub request: Request,
    pub source: SocketAddr,
    pub transport: Transport,
    pub path: P,
    pub key: ServerKey,
    /// Has a To tag (a BYE, a re-INVITE, an ACK): may use the in-dialog reserve.
    pub in_dialog: bool,
    /// An ACK: delivered, but there is nothing to answer.
    pub is_ack: bool,
}

/// How a client transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutcome {
    /// The first final response.
    Final(Response),
    /// Timer B or F (or the wait after a provisional response) fired.
    TimedOut,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Action<P> {
    Transmit(Transmit<P>),
    /// A client request retransmitted (UDP). If sending fails, the driver fails the
    /// transaction with the I/O error ([`Transactions::abandon_client`]).
    Retransmit {
        key: ClientKey,
        dest: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Hand the request to the TU; if its queue refuses it, call
    /// [`Transactions::undeliverable`].
    Deliver(Delivery<P>),
    /// The client transaction terminated.
    ClientDone {
        key: ClientKey,
        outcome: ClientOutcome,
    },
}

/// A final response to INVITE retransmitted over UDP until the ACK (Timers G and H).
struct Resend {
    timer: RetransmitTimer,
    bytes: Vec<u8>,
    dest: SocketAddr,
    status: u16,
    /// The instant under which it is in the timer heap.
    due: Instant,
}

struct ServerTxn<P> {
    /// Last response sent, re-sent when the request is retransmitted.
    last_response: Option<Vec<u8>>,
    final_status: Option<u16>,
    expires: Instant,
    /// To tag for our responses when the request's To has none.
    to_tag: String,
    /// For an INVITE not yet answered finally: the request without body, and where to
    /// answer, so that a CANCEL can answer it 487.
    invite: Option<(Request, P)>,
    is_invite: bool,
    dialog: DialogKey,
    source: SocketAddr,
    transport: Transport,
    /// UDP only: what may still go back to a source that has not proven its address.
    budget: Option<ReplyBudget>,
    /// Ended by the TU (an evicted call): nothing more is sent.
    ended: bool,
    resend: Option<Resend>,
}

struct ClientTxn {
    /// The request as sent (with our Via, without body), for the ACK of a non-2xx.
    request: Request,
    bytes: Vec<u8>,
    dest: SocketAddr,
    transport: Transport,
    is_invite: bool,
    timer: RetransmitTimer,
    due: Instant,
}

/// An ACK we sent, re-sent when its final response is retransmitted.
struct SentAck {
    bytes: Vec<u8>,
    dest: SocketAddr,
    transport: Transport,
    expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Server(ServerKey),
    Client(ClientKey),
}

/// The transaction table: every server and client transaction, the ACKs we sent, the
/// INVITE rate limiter. Owned by one driver; all methods take `now`.
pub struct Transactions<P> {
    cfg: Config,
    servers: HashMap<ServerKey, ServerTxn<P>>,
    clients: HashMap<ClientKey, ClientTxn>,
    /// 2xx sent to an INVITE -> its transaction, until the ACK.
    ack_index: HashMap<DialogKey, ServerKey>,
    acks: HashMap<DialogKey, SentAck>,
    /// ACKs delivered to the TU, so that a retransmitted one is absorbed.
    seen_acks: HashMap<(String, u32, String), Instant>,
    invite_limiter: RateLimiter,
    limit_log: LogBudget,
    /// Retransmission deadlines; an entry whose transaction has moved on is stale and
    /// skipped (its `due` differs).
    timers: BinaryHeap<Reverse<(Instant, Slot)>>,
    /// Expired transactions and ACK records are dropped every `sweep_every`.
    next_sweep: Instant,
    sweep_every: Duration,
}

impl<P: Clone> Transactions<P> {
    pub fn new(cfg: Config, now: Instant) -> Self {
        let invite_limiter = RateLimiter::new(cfg.invite_rate, cfg.invite_burst, 65_536)
            .with_exempt(cfg.trusted.iter().copied());
        let sweep_every = (cfg.t1 * 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        Transactions {
            cfg,
            servers: HashMap::new(),
            clients: HashMap::new(),
            ack_index: HashMap::new(),
            acks: HashMap::new(),
            seen_acks: HashMap::new(),
            invite_limiter,
            limit_log: LogBudget::new(5),
            timers: BinaryHeap::new(),
            next_sweep: now + sweep_every,
            sweep_every,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Open server transactions (including those lingering for retransmissions).
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// Pending client transactions.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// When [`timeout`](Self::timeout) must be called next.
    pub fn next_deadline(&self) -> Instant {
        match self.timers.peek() {
            Some(Reverse((at, _))) => (*at).min(self.next_sweep),
            None => self.next_sweep,
        }
    }

    /// Fires every timer due at `now`: retransmissions (A, E, G), transaction timeouts
    /// (B, F, H), and drops expired transactions (Timers D-like, I, J, K).
    pub fn timeout(&mut self, now: Instant) -> Vec<Action<P>> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, slot))) = self.timers.pop() else {
                break;
            };
            match slot {
                Slot::Server(key) => self.fire_server(key, at, now, &mut out),
                Slot::Client(key) => self.fire_client(key, at, now, &mut out),
            }
        }
        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now + self.sweep_every;
        }
        out
    }

    fn sweep(&mut self, now: Instant) {
        self.servers.retain(|_, t| t.expires > now);
        let servers = &self.servers;
        self.ack_index.retain(|_, k| servers.contains_key(k));
        self.acks.retain(|_, a| a.expires > now);
        self.seen_acks.retain(|_, e| *e > now);
        self.invite_limiter.sweep(now);
    }

    /// Forgets every transaction (shutdown).
    pub fn clear(&mut self) {
        self.clients.clear();
        self.servers.clear();
        self.ack_index.clear();
        self.acks.clear();
        self.timers.clear();
    }
}

/// Moves `slot`'s deadline to `at`. The heap entry under the old `due` becomes stale.
fn arm(
    timers: &mut BinaryHeap<Reverse<(Instant, Slot)>>,
    due: &mut Instant,
    at: Instant,
    slot: Slot,
) {
    if *due != at {
        *due = at;
        timers.push(Reverse((at, slot)));
    }
}

/// Server transaction key (RFC 3261 §17.2.3): branch + sent-by + method,
/// with ACK mapped to INVITE. Falls back to RFC 2543-style matching when the
/// branch lacks the magic cookie.
pub fn server_key(req: &Request, via: &Via, method: &Method) -> ServerKey {
    let method = if *method == Method::Ack {
        "INVITE".to_string()
    } else {
        method.to_string()
    };
    let sent_by = format!("{}:{}", via.host, via.port.unwrap_or(0));
    match &via.branch {
        Some(b) if b.starts_with("z9hG4bK") => format!("{b}\u{0}{sent_by}\u{0}{method}"),
        _ => {
            let h = &req.headers;
            let seq = h.cseq().map(|c| c.seq).unwrap_or(0);
            let from_tag = h
                .from()
                .ok()
                .and_then(|f| f.tag().map(str::to_string))
                .unwrap_or_default();
            format!(
                "legacy\u{0}{}\u{0}{seq}\u{0}{from_tag}\u{0}{via}\u{0}{method}",
                h.call_id().unwrap_or("")
            )
        }
    }
}

/// A stateless `503 Service Unavailable` with Retry-After and a Warning. Its To tag
/// starts with [`STATELESS_TAG`], so the ACK for it is absorbed without a transaction.
fn overload_response(req: &Request, why: &str, retry_after: u32) -> Response {
    let mut r = Response::for_request(req, 503, "Service Unavailable");
    if req.method != Method::Cancel {
        r = r.with_to_tag(&format!("{STATELESS_TAG}{}", super::random_hex(6)));
    }
    r.headers
        .push("Retry-After", retry_after.max(1).to_string());
    r.with_warning(399, "sipmail", why)
}
