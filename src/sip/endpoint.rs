//! SIP endpoint: UDP + TCP transport on one address, with RFC 3261 client
//! and server transactions (§17) and RFC 3581 symmetric response routing.
//!
//! The retransmission schedule is the pure [`RetransmitTimer`]; the tokio
//! part only sends bytes and sleeps until the deadlines it returns.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

use super::limits::{LogBudget, RateLimiter, ReplyBudget, Verdict};
use super::message::{
    Method, ParseError, Request, Response, SipMessage, Via, bad_request_for,
    parse_datagram_limited, parse_stream_limited,
};
use super::{new_branch, random_hex};

// ---------------------------------------------------------------------------
// Public types

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

/// Places in the incoming queue beyond `EndpointConfig::incoming_queue` that only in-dialog
/// requests may take: enough for a relay's calls all hanging up at once (1,000 BYEs
/// within 20 ms answered 503 in the 1,000-idle-calls benchmark before this reserve).
pub const IN_DIALOG_RESERVE: usize = 2048;

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// RTT estimate (RFC 3261 T1), 500 ms.
    pub t1: Duration,
    /// Retransmission cap for non-INVITE requests and 2xx (T2), 4 s.
    pub t2: Duration,
    /// Requests larger than this go over TCP (§18.1.1), 1300.
    pub max_udp: usize,
    /// A TCP connection with no bytes received for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Largest message accepted or sent (capped at 65,535).
    pub max_message: usize,
    /// How long an INVITE client transaction waits for a final response
    /// after a provisional one (like Timer C), and how long a server
    /// transaction waits for the application to answer.
    pub proceeding_timeout: Duration,
    /// Cap on simultaneously open TCP connections (accepted + opened).
    pub max_tcp_connections: usize,
    /// Cap on pending client transactions and on server transactions.
    pub max_transactions: usize,
    /// How many new (out-of-dialog) requests may wait for the application; more are
    /// answered 503. In-dialog requests (a BYE, a re-INVITE) have a further
    /// `IN_DIALOG_RESERVE` places, so that a burst of hang-ups, or new calls that filled the
    /// queue, do not get established calls' requests refused.
    pub incoming_queue: usize,
    /// Longest time a non-2xx final response to INVITE waits for more
    /// retransmitted ACKs over UDP (T4, Timer I), 5 s.
    pub t4: Duration,
    /// New (out-of-dialog) INVITEs per second accepted from one source
    /// address; more are answered `503` with Retry-After, statelessly.
    /// Zero turns the limit off.
    pub invite_rate: f64,
    /// How many INVITEs one source may send at once before the rate applies.
    pub invite_burst: f64,
    /// Sources that are never rate-limited and not refused by the total TCP
    /// connection cap (the configured peers).
    pub trusted: Vec<IpAddr>,
    /// Cap on TCP connections from one source address.
    pub max_tcp_per_source: usize,
    /// A TCP connection that has begun a message (or was accepted and has
    /// not yet completed its first one) must complete it within this long.
    pub tcp_message_timeout: Duration,
    /// Retry-After (seconds) in 503 answers given because of overload.
    pub retry_after: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            max_udp: 1300,
            tcp_idle_timeout: Duration::from_secs(300),
            max_message: super::message::MAX_MESSAGE_SIZE,
            proceeding_timeout: Duration::from_secs(180),
            max_tcp_connections: 256,
            max_transactions: 4096,
            incoming_queue: 256,
            t4: Duration::from_secs(5),
            invite_rate: 20.0,
            invite_burst: 40.0,
            trusted: Vec::new(),
            max_tcp_per_source: 16,
            tcp_message_timeout: Duration::from_secs(10),
            retry_after: 5,
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

// ---------------------------------------------------------------------------
// Pure retransmission timer

/// What a transaction should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerAction {
    /// Send the message again, then poll again.
    Retransmit,
    /// Nothing to do before this instant.
    WaitUntil(Instant),
    /// The transaction timer (B, F or H) fired.
    Expired,
}

/// Retransmission schedule of RFC 3261 §17: an interval starting at T1 that
/// doubles after each retransmission (optionally capped), and an overall
/// deadline. Pure: the caller passes `now`.
#[derive(Debug, Clone)]
pub struct RetransmitTimer {
    interval: Duration,
    cap: Option<Duration>,
    next: Option<Instant>,
    deadline: Instant,
}

impl RetransmitTimer {
    /// First retransmission at `now + first`, then doubling, capped at `cap`;
    /// expires at `now + timeout`.
    pub fn new(now: Instant, first: Duration, cap: Option<Duration>, timeout: Duration) -> Self {
        RetransmitTimer {
            interval: first,
            cap,
            next: Some(now + first),
            deadline: now + timeout,
        }
    }
    /// No retransmissions (reliable transport), only the deadline.
    pub fn no_retransmit(now: Instant, timeout: Duration) -> Self {
        RetransmitTimer {
            interval: timeout,
            cap: None,
            next: None,
            deadline: now + timeout,
        }
    }
    /// INVITE client: Timer A (T1, doubling, uncapped) and Timer B (64*T1).
    pub fn timer_a(now: Instant, t1: Duration) -> Self {
        Self::new(now, t1, None, t1 * 64)
    }
    /// Non-INVITE client: Timer E (T1 doubling, capped at T2) and Timer F (64*T1).
    pub fn timer_e(now: Instant, t1: Duration, t2: Duration) -> Self {
        Self::new(now, t1, Some(t2), t1 * 64)
    }
    /// INVITE server final response: Timer G (T1 doubling, capped at T2) and Timer H (64*T1).
    pub fn timer_g(now: Instant, t1: Duration, t2: Duration) -> Self {
        Self::new(now, t1, Some(t2), t1 * 64)
    }

    pub fn poll(&mut self, now: Instant) -> TimerAction {
        if now >= self.deadline {
            return TimerAction::Expired;
        }
        match self.next {
            Some(next) if now >= next => {
                let doubled = self.interval.saturating_mul(2);
                self.interval = match self.cap {
                    Some(cap) => doubled.min(cap),
                    None => doubled,
                };
                let scheduled = next + self.interval;
                self.next = Some(if scheduled > now {
                    scheduled
                } else {
                    now + self.interval
                });
                TimerAction::Retransmit
            }
            Some(next) => TimerAction::WaitUntil(next.min(self.deadline)),
            None => TimerAction::WaitUntil(self.deadline),
        }
    }
    /// Stop retransmitting (INVITE after a provisional response).
    pub fn stop_retransmitting(&mut self) {
        self.next = None;
    }
    /// Retransmit every `interval` from now on (non-INVITE in Proceeding: T2).
    pub fn fixed_interval(&mut self, now: Instant, interval: Duration) {
        self.interval = interval;
        self.cap = Some(interval);
        self.next = Some(now + interval);
    }
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.next
    }
}

// ---------------------------------------------------------------------------
// Internal state

enum WriteCmd {
    Data(Vec<u8>),
    /// Flush and close the connection.
    Close,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    tx: mpsc::Sender<WriteCmd>,
    closed: watch::Receiver<bool>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

#[derive(Clone)]
enum ReplyPath {
    Udp(SocketAddr),
    Tcp(Conn),
}

/// To-tag prefix of stateless responses (not hex, so never one of our dialog tags).
const STATELESS_TAG: &str = "sl-";

/// (Call-ID, CSeq number): how a 2xx and its ACK are matched.
type DialogKey = (String, u32);
/// (branch, method) of a client transaction.
type ClientKey = (String, String);

struct ServerTxn {
    /// Last response sent, re-sent when the request is retransmitted.
    last_response: Option<Vec<u8>>,
    final_status: Option<u16>,
    /// Woken by the ACK (non-2xx: same branch; 2xx: Call-ID + CSeq number).
    ack: Arc<Notify>,
    expires: Instant,
    /// To tag for our responses when the request's To has none.
    to_tag: String,
    /// For INVITE: the request without body, and where to answer, so a
    /// CANCEL can answer it 487.
    invite: Option<(Request, ReplyPath, DialogKey)>,
    transport: Transport,
    /// UDP only: what may still go back to a source that has not proven its address.
    budget: Option<ReplyBudget>,
    /// Ended by the application (an evicted call): nothing more is sent.
    ended: bool,
}

struct SentAck {
    bytes: Vec<u8>,
    dest: SocketAddr,
    transport: Transport,
    expires: Instant,
}

#[derive(Default)]
struct State {
    clients: HashMap<ClientKey, mpsc::Sender<Response>>,
    servers: HashMap<String, ServerTxn>,
    ack_index: HashMap<DialogKey, String>,
    acks: HashMap<DialogKey, SentAck>,
    seen_acks: HashMap<(String, u32, String), Instant>,
    conns: HashMap<SocketAddr, Conn>,
    invite_limiter: Option<RateLimiter>,
    limit_log: Option<LogBudget>,
}

struct Inner {
    cfg: EndpointConfig,
    local: SocketAddr,
    udp: Arc<UdpSocket>,
    state: Mutex<State>,
    shutdown_tx: watch::Sender<bool>,
    incoming_tx: Mutex<Option<mpsc::Sender<Incoming>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    next_conn_id: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tokio_instant(i: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(i)
}

/// Server transaction key (RFC 3261 §17.2.3): branch + sent-by + method,
/// with ACK mapped to INVITE. Falls back to RFC 2543-style matching when the
/// branch lacks the magic cookie.
fn server_key(req: &Request, via: &Via, method: &Method) -> String {
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

// ---------------------------------------------------------------------------
// Endpoint

/// A SIP endpoint bound to one address for both UDP and TCP.
#[derive(Clone)]
pub struct Endpoint(Arc<Inner>);

/// A request received from a peer, with the handle to answer it.
pub struct Incoming {
    pub request: Request,
    pub source: SocketAddr,
    pub transport: Transport,
    reply: Replier,
}

struct Replier {
    inner: Arc<Inner>,
    key: String,
    path: ReplyPath,
    is_invite: bool,
    is_ack: bool,
    dialog: DialogKey,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("request", &self.request)
            .field("source", &self.source)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.0.local)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds UDP and TCP on the same address. With port 0 a free port is
    /// picked: TCP is bound first, then UDP on its port, retrying on a clash.
    pub async fn bind(
        addr: SocketAddr,
        cfg: EndpointConfig,
    ) -> io::Result<(Endpoint, mpsc::Receiver<Incoming>)> {
        let (listener, udp) = if addr.port() == 0 {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let listener = TcpListener::bind(addr).await?;
                let port = listener.local_addr()?.port();
                match UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await {
                    Ok(udp) => break (listener, udp),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 32 => continue,
                    Err(e) => return Err(e),
                }
            }
        } else {
            let listener = TcpListener::bind(addr).await?;
            let udp = UdpSocket::bind(addr).await?;
            (listener, udp)
        };
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(cfg.incoming_queue.max(1) + IN_DIALOG_RESERVE);
        let (shutdown_tx, _) = watch::channel(false);
        let state = State {
            invite_limiter: Some(
                RateLimiter::new(cfg.invite_rate, cfg.invite_burst, 65_536)
                    .with_exempt(cfg.trusted.iter().copied()),
            ),
            limit_log: Some(LogBudget::new(5)),
            ..State::default()
        };
        let inner = Arc::new(Inner {
            cfg,
            local,
            udp: Arc::new(udp),
            state: Mutex::new(state),
            shutdown_tx,
            incoming_tx: Mutex::new(Some(tx)),
            tasks: Mutex::new(Vec::new()),
            next_conn_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        let udp_task = tokio::spawn(udp_loop(
            weak.clone(),
            inner.udp.clone(),
            inner.shutdown_tx.subscribe(),
            inner.cfg.max_message,
        ));
        let tcp_task = tokio::spawn(accept_loop(
            weak.clone(),
            listener,
            inner.shutdown_tx.subscribe(),
        ));
        let sweep_task = tokio::spawn(sweep_loop(
            weak,
            inner.shutdown_tx.subscribe(),
            (inner.cfg.t1 * 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        ));
        lock(&inner.tasks).extend([udp_task, tcp_task, sweep_task]);
        Ok((Endpoint(inner), rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.0.local
    }

    pub fn config(&self) -> &EndpointConfig {
        &self.0.cfg
    }

    /// Runs a client transaction and returns the first final response.
    ///
    /// Inserts the top Via (our address, a fresh `z9hG4bK` branch, `rport`)
    /// and Max-Forwards if absent. Requests larger than `max_udp` go over TCP.
    /// A non-2xx final response to INVITE is ACKed here (§17.1.1.3); a 2xx
    /// must be ACKed by the caller with [`Endpoint::send_ack`].
    pub async fn request(
        &self,
        mut req: Request,
        dest: SocketAddr,
        transport: Transport,
    ) -> Result<Response, TxnError> {
        let inner = &self.0;
        let mut shutdown = inner.shutdown_tx.subscribe();
        if *shutdown.borrow() {
            return Err(TxnError::Shutdown);
        }
        if req.method == Method::Ack {
            return Err(TxnError::InvalidRequest(
                "ACK has no transaction; use send_ack".into(),
            ));
        }
        check_request(&req)?;
        if !req.headers.contains("Max-Forwards") {
            req.headers.push("Max-Forwards", "70");
        }
        let branch = new_branch();
        let (req, bytes, transport) = inner.add_via(req, &branch, transport);
        if bytes.len() > inner.cfg.max_message {
            return Err(TxnError::TooLarge(bytes.len()));
        }
        let is_invite = req.method == Method::Invite;
        let key: ClientKey = (branch, req.method.to_string());
        let (tx, mut rx) = mpsc::channel(16);
        {
            let mut st = lock(&inner.state);
            if st.clients.len() >= inner.cfg.max_transactions {
                return Err(TxnError::TooManyTransactions);
            }
            st.clients.insert(key.clone(), tx);
        }
        let _guard = ClientGuard {
            inner: inner.clone(),
            key,
        };
        let t1 = inner.cfg.t1;
        let now = Instant::now();
        let (mut timer, conn) = match transport {
            Transport::Udp => {
                inner.udp.send_to(&bytes, dest).await?;
                let timer = if is_invite {
                    RetransmitTimer::timer_a(now, t1)
                } else {
                    RetransmitTimer::timer_e(now, t1, inner.cfg.t2)
                };
                (timer, None)
            }
            Transport::Tcp => {
                let conn = inner.connection(dest).await?;
                conn.tx
                    .send(WriteCmd::Data(bytes.clone()))
                    .await
                    .map_err(|_| TxnError::TransportClosed)?;
                (RetransmitTimer::no_retransmit(now, t1 * 64), Some(conn))
            }
        };
        let mut closed = conn.as_ref().map(|c| c.closed.clone());
        let response = loop {
            match timer.poll(Instant::now()) {
                TimerAction::Expired => return Err(TxnError::Timeout),
                TimerAction::Retransmit => {
                    trace!(%dest, method = %req.method, "retransmitting request");
                    inner.udp.send_to(&bytes, dest).await?;
                }
                TimerAction::WaitUntil(at) => {
                    tokio::select! {
                        biased;
                        r = rx.recv() => match r {
                            None => return Err(TxnError::TransportClosed),
                            Some(resp) if resp.is_provisional() => {
                                let now = Instant::now();
                                if is_invite {
                                    timer.stop_retransmitting();
                                    timer.set_deadline(now + inner.cfg.proceeding_timeout);
                                } else if transport == Transport::Udp {
                                    timer.fixed_interval(now, inner.cfg.t2);
                                }
                            }
                            Some(resp) => break resp,
                        },
                        _ = tokio::time::sleep_until(tokio_instant(at)) => {}
                        _ = wait_closed(&mut closed) => return Err(TxnError::TransportClosed),
                        _ = shutdown.changed() => return Err(TxnError::Shutdown),
                    }
                }
            }
        };
        if is_invite && !response.is_success() {
            let ack = non2xx_ack(&req, &response);
            let bytes = ack.to_bytes();
            if let Err(e) = inner.send_bytes(&bytes, dest, transport).await {
                debug!(%dest, error = %e, "could not send ACK for non-2xx final response");
            }
            inner.remember_ack(&ack, bytes, dest, transport);
        }
        Ok(response)
    }

    /// Sends an ACK for a 2xx (no transaction; new branch). It is remembered
    /// for 64*T1 under Call-ID + CSeq number and re-sent whenever the 2xx is
    /// retransmitted.
    pub async fn send_ack(
        &self,
        mut ack: Request,
        dest: SocketAddr,
        transport: Transport,
    ) -> Result<(), TxnError> {
        let inner = &self.0;
        if *inner.shutdown_tx.borrow() {
            return Err(TxnError::Shutdown);
        }
        if ack.method != Method::Ack {
            return Err(TxnError::InvalidRequest("send_ack needs an ACK".into()));
        }
        check_request(&ack)?;
        if !ack.headers.contains("Max-Forwards") {
            ack.headers.push("Max-Forwards", "70");
        }
        let (ack, bytes, transport) = inner.add_via(ack, &new_branch(), transport);
        if bytes.len() > inner.cfg.max_message {
            return Err(TxnError::TooLarge(bytes.len()));
        }
        inner.send_bytes(&bytes, dest, transport).await?;
        inner.remember_ack(&ack, bytes, dest, transport);
        Ok(())
    }

    /// Stops all tasks, closes connections, fails pending transactions with
    /// `Shutdown`/`TransportClosed` and closes the incoming channel.
    pub async fn shutdown(&self) {
        let inner = &self.0;
        inner.shutdown_tx.send_replace(true);
        lock(&inner.incoming_tx).take();
        let conns: Vec<Conn> = {
            let mut st = lock(&inner.state);
            st.clients.clear();
            st.servers.clear();
            st.ack_index.clear();
            st.acks.clear();
            st.conns.drain().map(|(_, c)| c).collect()
        };
        for c in conns {
            let _ = c.tx.try_send(WriteCmd::Close);
        }
        let tasks: Vec<JoinHandle<()>> = lock(&inner.tasks).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn check_request(req: &Request) -> Result<(), TxnError> {
    let h = &req.headers;
    for name in ["From", "To", "Call-ID", "CSeq"] {
        if !h.contains(name) {
            return Err(TxnError::InvalidRequest(format!("missing {name}")));
        }
    }
    let cseq = h
        .cseq()
        .map_err(|e| TxnError::InvalidRequest(e.to_string()))?;
    if cseq.method != req.method {
        return Err(TxnError::InvalidRequest(
            "CSeq method does not match".into(),
        ));
    }
    Ok(())
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

async fn wait_closed(closed: &mut Option<watch::Receiver<bool>>) {
    match closed {
        Some(rx) => {
            let _ = rx.wait_for(|c| *c).await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
fn non2xx_ack(req: &Request, resp: &Response) -> Request {
    let mut ack = Request::new(Method::Ack, req.uri.clone());
    if let Some(v) = req.headers.via_values().first() {
        ack.headers.push("Via", *v);
    }
    ack.headers.push("Max-Forwards", "70");
    for name in ["From", "Call-ID"] {
        if let Some(v) = req.headers.get(name) {
            ack.headers.push(name, v);
        }
    }
    if let Some(to) = resp.headers.get("To").or(req.headers.get("To")) {
        ack.headers.push("To", to);
    }
    let seq = req.headers.cseq().map(|c| c.seq).unwrap_or(0);
    ack.headers.push("CSeq", format!("{seq} ACK"));
    for r in req.headers.get_all("Route") {
        ack.headers.push("Route", r);
    }
    ack
}

struct ClientGuard {
    inner: Arc<Inner>,
    key: ClientKey,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        lock(&self.inner.state).clients.remove(&self.key);
    }
}

impl Inner {
    /// Prepends our Via; switches UDP to TCP when the result exceeds max_udp.
    fn add_via(
        &self,
        req: Request,
        branch: &str,
        transport: Transport,
    ) -> (Request, Vec<u8>, Transport) {
        let build = |t: Transport| {
            let mut r = req.clone();
            r.headers
                .prepend("Via", Via::new(t.as_str(), self.local, branch).to_string());
            let b = r.to_bytes();
            (r, b)
        };
        let (r, b) = build(transport);
        if transport == Transport::Udp && b.len() > self.cfg.max_udp {
            debug!(size = b.len(), "request exceeds max_udp, using TCP");
            let (r, b) = build(Transport::Tcp);
            return (r, b, Transport::Tcp);
        }
        (r, b, transport)
    }

    fn remember_ack(&self, ack: &Request, bytes: Vec<u8>, dest: SocketAddr, transport: Transport) {
        let (Some(call_id), Ok(cseq)) = (ack.headers.call_id(), ack.headers.cseq()) else {
            return;
        };
        let mut st = lock(&self.state);
        if st.acks.len() >= self.cfg.max_transactions {
            return;
        }
        st.acks.insert(
            (call_id.to_string(), cseq.seq),
            SentAck {
                bytes,
                dest,
                transport,
                expires: Instant::now() + self.cfg.t1 * 64,
            },
        );
    }

    async fn send_bytes(
        self: &Arc<Self>,
        bytes: &[u8],
        dest: SocketAddr,
        transport: Transport,
    ) -> Result<(), TxnError> {
        match transport {
            Transport::Udp => {
                self.udp.send_to(bytes, dest).await?;
            }
            Transport::Tcp => {
                let conn = self.connection(dest).await?;
                conn.tx
                    .send(WriteCmd::Data(bytes.to_vec()))
                    .await
                    .map_err(|_| TxnError::TransportClosed)?;
            }
        }
        Ok(())
    }

    async fn send_path(&self, path: &ReplyPath, bytes: Vec<u8>) -> Result<(), TxnError> {
        match path {
            ReplyPath::Udp(addr) => {
                self.udp.send_to(&bytes, *addr).await?;
            }
            ReplyPath::Tcp(conn) => {
                if conn.is_closed() {
                    return Err(TxnError::TransportClosed);
                }
                conn.tx
                    .send(WriteCmd::Data(bytes))
                    .await
                    .map_err(|_| TxnError::TransportClosed)?;
            }
        }
        Ok(())
    }

    /// An open connection to `dest`, reused if one exists.
    async fn connection(self: &Arc<Self>, dest: SocketAddr) -> Result<Conn, TxnError> {
        {
            let st = lock(&self.state);
            if let Some(c) = st.conns.get(&dest)
                && !c.is_closed()
            {
                return Ok(c.clone());
            }
            if st.conns.len() >= self.cfg.max_tcp_connections {
                return Err(TxnError::TooManyConnections);
            }
        }
        let stream = tokio::time::timeout(self.cfg.t1 * 64, TcpStream::connect(dest))
            .await
            .map_err(|_| TxnError::Timeout)??;
        Ok(spawn_conn(self, stream, dest, false))
    }

    fn deliver(&self, incoming: Incoming, in_dialog: bool) -> Result<(), Box<Incoming>> {
        let guard = lock(&self.incoming_tx);
        let Some(tx) = guard.as_ref() else {
            return Err(Box::new(incoming));
        };
        // New requests leave the reserve to established dialogs.
        if !in_dialog && tx.capacity() <= IN_DIALOG_RESERVE {
            return Err(Box::new(incoming));
        }
        tx.try_send(incoming).map_err(|e| match e {
            mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => {
                Box::new(i)
            }
        })
    }

    /// `wire_len`: the message's size on the wire (for the reply budget of UDP sources).
    async fn dispatch(
        self: &Arc<Self>,
        msg: SipMessage,
        source: SocketAddr,
        path: ReplyPath,
        wire_len: usize,
    ) {
        match msg {
            SipMessage::Request(req) => self.handle_request(req, source, path, wire_len).await,
            SipMessage::Response(resp) => self.handle_response(resp, source).await,
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        mut req: Request,
        source: SocketAddr,
        path: ReplyPath,
        wire_len: usize,
    ) {
        let transport = match path {
            ReplyPath::Udp(_) => Transport::Udp,
            ReplyPath::Tcp(_) => Transport::Tcp,
        };
        let (mut via, Some(call_id), Ok(cseq)) = (
            match req.headers.top_via() {
                Ok(v) => v,
                Err(e) => {
                    debug!(%source, error = %e, "dropping request with bad Via");
                    return;
                }
            },
            req.headers.call_id().map(str::to_string),
            req.headers.cseq(),
        ) else {
            debug!(%source, "dropping request without Call-ID/CSeq");
            return;
        };
        // RFC 3261 §18.2.1 received, RFC 3581 rport.
        let src_ip = source.ip().to_string();
        if via.rport == Some(None) {
            via.rport = Some(Some(source.port()));
            via.received = Some(src_ip);
        } else if via.host.trim_start_matches('[').trim_end_matches(']') != src_ip {
            via.received = Some(src_ip);
        }
        req.headers.set_top_via(&via);
        let key = server_key(&req, &via, &req.method);
        let dialog: DialogKey = (call_id.clone(), cseq.seq);
        // A To tag: a request within an established (or establishing) dialog.
        let in_dialog = req.headers.to().is_ok_and(|t| t.tag().is_some());

        if req.method == Method::Ack {
            let branch = via.branch.clone().unwrap_or_default();
            {
                let mut st = lock(&self.state);
                if let Some(txn) = st.servers.get_mut(&key)
                    && txn.final_status.is_some_and(|s| s >= 300)
                {
                    txn.ack.notify_one();
                    // Confirmed: Timer I (T4 over UDP, zero over TCP) absorbs
                    // further retransmitted ACKs, then the transaction ends.
                    let linger = match transport {
                        Transport::Udp => self.cfg.t4,
                        Transport::Tcp => Duration::ZERO,
                    };
                    txn.expires = txn.expires.min(Instant::now() + linger);
                    trace!(%source, "ACK for non-2xx absorbed by its transaction");
                    return;
                }
                let stateless = req
                    .headers
                    .to()
                    .ok()
                    .and_then(|t| t.tag().map(|t| t.starts_with(STATELESS_TAG)))
                    .unwrap_or(false);
                if stateless {
                    trace!(%source, "ACK for a stateless 503 absorbed");
                    return;
                }
                let seen_key = (call_id, cseq.seq, branch);
                if st.seen_acks.contains_key(&seen_key) {
                    trace!(%source, "retransmitted ACK absorbed");
                    return;
                }
                if st.seen_acks.len() < self.cfg.max_transactions {
                    st.seen_acks
                        .insert(seen_key, Instant::now() + self.cfg.t1 * 64);
                }
                if let Some(k) = st.ack_index.remove(&dialog)
                    && let Some(txn) = st.servers.get(&k)
                {
                    txn.ack.notify_one();
                }
            }
            let incoming = Incoming {
                request: req,
                source,
                transport,
                reply: Replier {
                    inner: self.clone(),
                    key,
                    path,
                    is_invite: false,
                    is_ack: true,
                    dialog,
                },
            };
            if self.deliver(incoming, in_dialog).is_err() {
                warn!(%source, "incoming queue full or closed: ACK dropped");
            }
            return;
        }

        enum Action {
            Resend(Vec<u8>, ReplyPath),
            Absorb,
            Reject,
            RateLimited(u32, u64),
            Quiet,
            New,
        }
        let out_of_dialog_invite = req.method == Method::Invite && !in_dialog;
        let action = {
            let mut st = lock(&self.state);
            let open = st.servers.len();
            match st.servers.get_mut(&key) {
                Some(txn) => match &txn.last_response {
                    Some(bytes) if !txn.ended => {
                        // A retransmitted request earns its source more reply bytes.
                        let allowed = match txn.budget.as_mut() {
                            Some(b) => {
                                b.received(wire_len);
                                b.try_send(bytes.len())
                            }
                            None => true,
                        };
                        if allowed {
                            Action::Resend(bytes.clone(), path.clone())
                        } else {
                            Action::Absorb
                        }
                    }
                    _ => Action::Absorb,
                },
                None if open >= self.cfg.max_transactions => Action::Reject,
                None => {
                    let now = Instant::now();
                    let verdict = match (&mut st.invite_limiter, out_of_dialog_invite) {
                        // The peers' exemption holds only over TCP, where the source
                        // address is proven; over UDP anyone can send from it.
                        (Some(l), true) => {
                            l.check_source(source.ip(), transport == Transport::Tcp, now)
                        }
                        _ => Verdict::Allow,
                    };
                    match verdict {
                        Verdict::Refuse { retry_after } => {
                            match st.limit_log.as_mut().and_then(|l| l.allow(now)) {
                                Some(suppressed) => Action::RateLimited(retry_after, suppressed),
                                None => Action::Quiet,
                            }
                        }
                        Verdict::Allow => {
                            let invite = (req.method == Method::Invite).then(|| {
                                let mut head = req.clone();
                                head.body = Vec::new();
                                (head, path.clone(), dialog.clone())
                            });
                            st.servers.insert(
                                key.clone(),
                                ServerTxn {
                                    last_response: None,
                                    final_status: None,
                                    ack: Arc::new(Notify::new()),
                                    expires: now + self.cfg.proceeding_timeout + self.cfg.t1 * 64,
                                    to_tag: random_hex(8),
                                    invite,
                                    transport,
                                    budget: (transport == Transport::Udp)
                                        .then(|| ReplyBudget::new(wire_len)),
                                    ended: false,
                                },
                            );
                            Action::New
                        }
                    }
                }
            }
        };
        match action {
            Action::Resend(bytes, path) => {
                debug!(%source, method = %req.method, "retransmitted request: re-sending last response");
                if let Err(e) = self.send_path(&path, bytes).await {
                    debug!(%source, error = %e, "re-sending response failed");
                }
            }
            Action::Absorb => {
                debug!(%source, method = %req.method, "retransmitted request absorbed");
            }
            Action::Reject => {
                warn!(%source, "too many server transactions: 503");
                let r = self.overload_response(&req, "too many transactions", None);
                let _ = self.send_path(&path, r.to_bytes()).await;
            }
            Action::RateLimited(retry_after, suppressed) => {
                warn!(
                    %source,
                    rate = self.cfg.invite_rate,
                    suppressed,
                    "INVITE rate limit exceeded: 503 (at most 5 of these lines a second; \
                     `suppressed` counts the ones not logged)"
                );
                let r = self.overload_response(&req, "INVITE rate limit", Some(retry_after));
                let _ = self.send_path(&path, r.to_bytes()).await;
            }
            Action::Quiet => {
                let r = self.overload_response(&req, "INVITE rate limit", None);
                let _ = self.send_path(&path, r.to_bytes()).await;
            }
            Action::New if req.method == Method::Cancel => {
                self.handle_cancel(req, source, key, path, via).await;
            }
            Action::New => {
                let is_invite = req.method == Method::Invite;
                let incoming = Incoming {
                    request: req,
                    source,
                    transport,
                    reply: Replier {
                        inner: self.clone(),
                        key: key.clone(),
                        path: path.clone(),
                        is_invite,
                        is_ack: false,
                        dialog,
                    },
                };
                if let Err(incoming) = self.deliver(incoming, in_dialog) {
                    warn!(%source, "incoming queue full or closed: 503");
                    lock(&self.state).servers.remove(&key);
                    let r = self.overload_response(&incoming.request, "overloaded", None);
                    let _ = self.send_path(&path, r.to_bytes()).await;
                }
            }
        }
    }

    /// A stateless `503 Service Unavailable` with Retry-After and a Warning.
    /// Its To tag starts with [`STATELESS_TAG`], so the ACK for it is absorbed
    /// here without a transaction.
    fn overload_response(&self, req: &Request, why: &str, retry_after: Option<u32>) -> Response {
        let mut r = Response::for_request(req, 503, "Service Unavailable");
        if req.method != Method::Cancel {
            r = r.with_to_tag(&format!("{STATELESS_TAG}{}", random_hex(6)));
        }
        let secs = retry_after.unwrap_or(self.cfg.retry_after).max(1);
        r.headers.push("Retry-After", secs.to_string());
        r.headers.push("Warning", format!("399 sipmail \"{why}\""));
        r
    }

    /// CANCEL (RFC 3261 §9.2): 200 for the CANCEL and 487 for its INVITE if
    /// that has not been answered yet; 481 if there is no such INVITE.
    async fn handle_cancel(
        self: &Arc<Self>,
        req: Request,
        source: SocketAddr,
        key: String,
        path: ReplyPath,
        via: Via,
    ) {
        let invite_key = server_key(&req, &via, &Method::Invite);
        let found = {
            let st = lock(&self.state);
            st.servers
                .get(&invite_key)
                .map(|t| (t.final_status.is_some(), t.to_tag.clone(), t.invite.clone()))
        };
        let is_cancel_txn = |status: u16, reason: &str, tag: Option<&str>| {
            let r = Response::for_request(&req, status, reason);
            match tag {
                Some(t) => r.with_to_tag(t),
                None => r,
            }
        };
        let Some((answered, tag, invite)) = found else {
            debug!(%source, "CANCEL for no known INVITE: 481");
            let r = is_cancel_txn(481, "Call/Transaction Does Not Exist", None);
            let _ = self.respond_txn(&key, &path, false, None, r).await;
            return;
        };
        let r = is_cancel_txn(200, "OK", Some(&tag));
        let _ = self.respond_txn(&key, &path, false, None, r).await;
        if answered {
            debug!(%source, "CANCEL after the final response: no effect");
            return;
        }
        let Some((inv, inv_path, dialog)) = invite else {
            return;
        };
        let r = Response::for_request(&inv, 487, "Request Terminated").with_to_tag(&tag);
        match self
            .respond_txn(&invite_key, &inv_path, true, Some(dialog), r)
            .await
        {
            Ok(()) => debug!(%source, "INVITE cancelled: 487"),
            Err(e) => {
                debug!(%source, error = %e, "INVITE answered meanwhile; CANCEL had no effect")
            }
        }
    }

    /// Sends a response in server transaction `key`, caches it for
    /// retransmitted requests, and for a final response to INVITE over UDP
    /// runs Timers G and H until the ACK.
    async fn respond_txn(
        self: &Arc<Self>,
        key: &str,
        path: &ReplyPath,
        is_invite: bool,
        dialog: Option<DialogKey>,
        mut resp: Response,
    ) -> Result<(), TxnError> {
        let is_final = resp.status >= 200;
        let (ack, bytes) = {
            let mut st = lock(&self.state);
            let ack = match st.servers.get_mut(key) {
                Some(txn) => {
                    if txn.ended {
                        return Err(TxnError::Ended);
                    }
                    if txn.final_status.is_some() {
                        return Err(TxnError::AlreadyResponded);
                    }
                    if resp.status > 100 {
                        resp = resp.with_to_tag(&txn.to_tag);
                    }
                    let bytes = resp.to_bytes();
                    if bytes.len() > self.cfg.max_message {
                        return Err(TxnError::TooLarge(bytes.len()));
                    }
                    if let Some(b) = txn.budget.as_mut()
                        && !b.try_send(bytes.len())
                    {
                        return Err(TxnError::ReplyBudget);
                    }
                    txn.last_response = Some(bytes.clone());
                    if is_final {
                        txn.final_status = Some(resp.status);
                        txn.invite = None;
                        // Timer H (INVITE) or J (non-INVITE over UDP); a
                        // non-INVITE transaction over TCP ends at once.
                        let linger = if !is_invite && txn.transport == Transport::Tcp {
                            Duration::ZERO
                        } else {
                            self.cfg.t1 * 64
                        };
                        txn.expires = Instant::now() + linger;
                    }
                    (Some(txn.ack.clone()), bytes)
                }
                None => (None, resp.to_bytes()),
            };
            if is_final
                && is_invite
                && resp.is_success()
                && let Some(d) = dialog
            {
                st.ack_index.insert(d, key.to_string());
            }
            ack
        };
        if bytes.len() > self.cfg.max_message {
            return Err(TxnError::TooLarge(bytes.len()));
        }
        self.send_path(path, bytes.clone()).await?;
        if let (true, true, ReplyPath::Udp(dest), Some(ack)) = (is_final, is_invite, path, ack) {
            let dest = *dest;
            let (t1, t2) = (self.cfg.t1, self.cfg.t2);
            let shutdown = self.shutdown_tx.subscribe();
            let status = resp.status;
            tokio::spawn(retransmit_final(
                Arc::downgrade(self),
                key.to_string(),
                bytes,
                dest,
                status,
                ack,
                shutdown,
                (t1, t2),
            ));
        }
        Ok(())
    }

    async fn handle_response(self: &Arc<Self>, resp: Response, source: SocketAddr) {
        let (Ok(via), Ok(cseq)) = (resp.headers.top_via(), resp.headers.cseq()) else {
            debug!(%source, "dropping response without usable Via/CSeq");
            return;
        };
        let Some(branch) = via.branch else {
            debug!(%source, "dropping response without branch");
            return;
        };
        let key: ClientKey = (branch, cseq.method.to_string());
        let (sender, resend) = {
            let st = lock(&self.state);
            let sender = st.clients.get(&key).cloned();
            let resend = if sender.is_none() && cseq.method == Method::Invite && resp.status >= 200
            {
                resp.headers.call_id().and_then(|cid| {
                    st.acks
                        .get(&(cid.to_string(), cseq.seq))
                        .map(|a| (a.bytes.clone(), a.dest, a.transport))
                })
            } else {
                None
            };
            (sender, resend)
        };
        if let Some(tx) = sender {
            if tx.try_send(resp).is_err() {
                debug!(%source, "client transaction queue full, response dropped");
            }
        } else if let Some((bytes, dest, transport)) = resend {
            debug!(%source, status = resp.status, "final response retransmitted: re-sending ACK");
            let inner = self.clone();
            tokio::spawn(async move {
                if let Err(e) = inner.send_bytes(&bytes, dest, transport).await {
                    debug!(%dest, error = %e, "re-sending ACK failed");
                }
            });
        } else {
            debug!(%source, status = resp.status, "response matches no transaction, dropped");
        }
    }
}

impl Incoming {
    /// Ends the server transaction of this request: nothing more is sent in it (no
    /// response, no retransmission) and a retransmitted request is absorbed. For a call
    /// evicted to make room for newer ones.
    pub fn end_transaction(&self) {
        let r = &self.reply;
        let mut st = lock(&r.inner.state);
        if let Some(t) = st.servers.get_mut(&r.key) {
            t.ended = true;
            t.invite = None;
            // Stops a running Timer G task (or the next one, at once).
            t.ack.notify_one();
        }
    }

    /// Answers the request (server transaction). See the module docs for
    /// caching and retransmission behaviour.
    pub async fn respond(&self, resp: Response) -> Result<(), TxnError> {
        let r = &self.reply;
        if r.is_ack {
            return Err(TxnError::InvalidRequest("ACK cannot be answered".into()));
        }
        r.inner
            .respond_txn(&r.key, &r.path, r.is_invite, Some(r.dialog.clone()), resp)
            .await
    }
}

/// Timer G / H for a final response to INVITE over UDP. Each retransmission is charged to
/// the transaction's reply budget; when that is spent (or the application ended the
/// transaction) retransmission stops as if Timer H had fired.
#[allow(clippy::too_many_arguments)]
async fn retransmit_final(
    weak: Weak<Inner>,
    key: String,
    bytes: Vec<u8>,
    dest: SocketAddr,
    status: u16,
    ack: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    (t1, t2): (Duration, Duration),
) {
    let mut timer = RetransmitTimer::timer_g(Instant::now(), t1, t2);
    loop {
        match timer.poll(Instant::now()) {
            TimerAction::Retransmit => {
                let Some(inner) = weak.upgrade() else { return };
                let allowed = match lock(&inner.state).servers.get_mut(&key) {
                    Some(t) if t.ended => false,
                    Some(t) => t.budget.as_mut().is_none_or(|b| b.try_send(bytes.len())),
                    None => false,
                };
                if !allowed {
                    debug!(%dest, status, "reply budget spent (or transaction ended): final response no longer retransmitted");
                    return;
                }
                trace!(%dest, status, "retransmitting final response");
                if let Err(e) = inner.udp.send_to(&bytes, dest).await {
                    debug!(%dest, error = %e, "retransmitting final response failed");
                }
            }
            TimerAction::Expired => {
                warn!(%dest, status, "no ACK for final response to INVITE before Timer H; giving up");
                return;
            }
            TimerAction::WaitUntil(at) => {
                tokio::select! {
                    _ = ack.notified() => {
                        trace!(%dest, status, "ACK received, retransmission stopped");
                        return;
                    }
                    _ = tokio::time::sleep_until(tokio_instant(at)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Transport tasks

async fn udp_loop(
    weak: Weak<Inner>,
    udp: Arc<UdpSocket>,
    mut shutdown: watch::Receiver<bool>,
    max_message: usize,
) {
    let mut buf = vec![0u8; 65_536];
    let mut log_budget = LogBudget::new(10);
    loop {
        let (n, src) = tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "UDP receive error");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let msg = match parse_datagram_limited(&buf[..n], max_message) {
            Ok(m) => m,
            Err(ParseError::Empty) => {
                trace!(%src, "UDP keep-alive");
                continue;
            }
            Err(e) => {
                // A request whose Via, From, To, Call-ID and CSeq can still be
                // read gets a 400 saying why; anything else is dropped.
                let reply = bad_request_for(&buf[..n], &e);
                if let Some(suppressed) = log_budget.allow(Instant::now()) {
                    warn!(
                        %src,
                        size = n,
                        error = %e,
                        answered_400 = reply.is_some(),
                        suppressed,
                        "unparseable UDP datagram{}",
                        if reply.is_some() { "" } else { " dropped" }
                    );
                }
                if let Some(r) = reply
                    && let Err(e) = udp.send_to(&r.to_bytes(), src).await
                {
                    debug!(%src, error = %e, "sending 400 failed");
                }
                continue;
            }
        };
        let Some(inner) = weak.upgrade() else { return };
        inner.dispatch(msg, src, ReplyPath::Udp(src), n).await;
    }
}

async fn accept_loop(
    weak: Weak<Inner>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "TCP accept error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(inner) = weak.upgrade() else { return };
        let refuse = {
            let st = lock(&inner.state);
            let from_source = st
                .conns
                .iter()
                .filter(|(a, c)| a.ip() == peer.ip() && !c.is_closed())
                .count();
            let trusted = inner.cfg.trusted.contains(&peer.ip());
            if from_source >= inner.cfg.max_tcp_per_source {
                Some("per-source TCP connection limit reached")
            } else if !trusted && st.conns.len() >= inner.cfg.max_tcp_connections {
                Some("TCP connection limit reached")
            } else {
                None
            }
        };
        if let Some(why) = refuse {
            warn!(%peer, "{why}, refusing connection");
            drop(stream);
            continue;
        }
        spawn_conn(&inner, stream, peer, true);
    }
}

async fn sweep_loop(weak: Weak<Inner>, mut shutdown: watch::Receiver<bool>, every: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        let mut st = lock(&inner.state);
        st.servers.retain(|_, t| t.expires > now);
        let State {
            servers, ack_index, ..
        } = &mut *st;
        ack_index.retain(|_, k| servers.contains_key(k));
        st.acks.retain(|_, a| a.expires > now);
        st.seen_acks.retain(|_, e| *e > now);
        st.conns.retain(|_, c| !c.is_closed());
        if let Some(l) = st.invite_limiter.as_mut() {
            l.sweep(now);
        }
    }
}

fn spawn_conn(inner: &Arc<Inner>, stream: TcpStream, peer: SocketAddr, accepted: bool) -> Conn {
    let _ = stream.set_nodelay(true);
    let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(64);
    let (closed_tx, closed_rx) = watch::channel(false);
    let closed_tx = Arc::new(closed_tx);
    let conn = Conn {
        id,
        tx,
        closed: closed_rx,
    };
    lock(&inner.state).conns.insert(peer, conn.clone());
    let (rd, wr) = stream.into_split();
    tokio::spawn(conn_writer(
        wr,
        rx,
        closed_tx.clone(),
        inner.shutdown_tx.subscribe(),
    ));
    tokio::spawn(conn_reader(
        Arc::downgrade(inner),
        rd,
        conn.clone(),
        peer,
        closed_tx,
        inner.shutdown_tx.subscribe(),
        TcpTimeouts {
            idle: inner.cfg.tcp_idle_timeout,
            message: inner.cfg.tcp_message_timeout,
            accepted,
        },
        inner.cfg.max_message,
    ));
    conn
}

#[derive(Clone, Copy)]
struct TcpTimeouts {
    /// No bytes at all for this long: close.
    idle: Duration,
    /// A message begun must be complete within this long.
    message: Duration,
    /// Accepted (not opened by us): the first message must also arrive
    /// within `message` of the connection being accepted.
    accepted: bool,
}

async fn conn_writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<WriteCmd>,
    closed_tx: Arc<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut closed = closed_tx.subscribe();
    loop {
        tokio::select! {
            biased;
            cmd = rx.recv() => match cmd {
                Some(WriteCmd::Data(b)) => {
                    if let Err(e) = wr.write_all(&b).await {
                        debug!(error = %e, "TCP write failed");
                        break;
                    }
                }
                Some(WriteCmd::Close) | None => break,
            },
            _ = wait_true(&mut closed) => break,
            _ = shutdown.changed() => break,
        }
    }
    let _ = wr.shutdown().await;
    closed_tx.send_replace(true);
}

#[allow(clippy::too_many_arguments)]
async fn conn_reader(
    weak: Weak<Inner>,
    mut rd: OwnedReadHalf,
    conn: Conn,
    peer: SocketAddr,
    closed_tx: Arc<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
    timeouts: TcpTimeouts,
    max_message: usize,
) {
    let mut closed = closed_tx.subscribe();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // When the message now in `buf` (or, on an accepted connection, the
    // first message) must be complete.
    let mut message_deadline = timeouts
        .accepted
        .then(|| tokio::time::Instant::now() + timeouts.message);
    'outer: loop {
        loop {
            match parse_stream_limited(&buf, max_message) {
                Ok(Some((msg, used))) => {
                    buf.drain(..used);
                    message_deadline = None;
                    let Some(inner) = weak.upgrade() else {
                        break 'outer;
                    };
                    inner
                        .dispatch(msg, peer, ReplyPath::Tcp(conn.clone()), used)
                        .await;
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(%peer, error = %e, "unparseable SIP on TCP, closing connection");
                    if let Some(r) = bad_request_for(&buf, &e) {
                        let _ = conn.tx.send(WriteCmd::Data(r.to_bytes())).await;
                    }
                    let _ = conn.tx.send(WriteCmd::Close).await;
                    break 'outer;
                }
            }
        }
        let started = buf.iter().any(|b| !b.is_ascii_whitespace());
        if started && message_deadline.is_none() {
            message_deadline = Some(tokio::time::Instant::now() + timeouts.message);
        }
        let idle_deadline = tokio::time::Instant::now() + timeouts.idle;
        let deadline = message_deadline.map_or(idle_deadline, |m| m.min(idle_deadline));
        tokio::select! {
            r = tokio::time::timeout_at(deadline, rd.read(&mut chunk)) => match r {
                Err(_) => {
                    if message_deadline.is_some_and(|m| m <= deadline) {
                        warn!(%peer, buffered = buf.len(), "TCP message not completed in time (half-open or slow sender), closing");
                    } else {
                        debug!(%peer, "TCP connection idle, closing");
                    }
                    let _ = conn.tx.send(WriteCmd::Close).await;
                    break;
                }
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TCP read failed");
                    break;
                }
            },
            _ = wait_true(&mut closed) => break,
            _ = shutdown.changed() => break,
        }
    }
    closed_tx.send_replace(true);
    if let Some(inner) = weak.upgrade() {
        let mut st = lock(&inner.state);
        if st.conns.get(&peer).is_some_and(|c| c.id == conn.id) {
            st.conns.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_a_doubles_without_cap() {
        let t0 = Instant::now();
        let t1 = Duration::from_millis(500);
        let mut t = RetransmitTimer::timer_a(t0, t1);
        assert_eq!(t.poll(t0), TimerAction::WaitUntil(t0 + t1));
        let mut sends = Vec::new();
        let mut now = t0;
        while now < t0 + t1 * 70 {
            match t.poll(now) {
                TimerAction::Retransmit => sends.push(now - t0),
                TimerAction::WaitUntil(at) => now = at,
                TimerAction::Expired => break,
            }
        }
        let ms: Vec<u128> = sends.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(t.poll(t0 + t1 * 64), TimerAction::Expired);
    }

    #[test]
    fn timer_e_caps_at_t2() {
        let t0 = Instant::now();
        let t1 = Duration::from_millis(500);
        let t2 = Duration::from_secs(4);
        let mut t = RetransmitTimer::timer_e(t0, t1, t2);
        let mut sends = Vec::new();
        let mut now = t0;
        loop {
            match t.poll(now) {
                TimerAction::Retransmit => sends.push((now - t0).as_millis()),
                TimerAction::WaitUntil(at) => now = at,
                TimerAction::Expired => break,
            }
        }
        assert_eq!(&sends[..6], &[500, 1500, 3500, 7500, 11500, 15500]);
        assert!(sends.iter().all(|&s| s < 32_000));
        assert_eq!(now - t0, t1 * 64);
    }

    #[test]
    fn provisional_stops_invite_retransmission() {
        let t0 = Instant::now();
        let t1 = Duration::from_millis(100);
        let mut t = RetransmitTimer::timer_a(t0, t1);
        t.stop_retransmitting();
        assert_eq!(t.poll(t0 + t1 * 2), TimerAction::WaitUntil(t0 + t1 * 64));
        t.set_deadline(t0 + t1 * 100);
        assert_eq!(t.poll(t0 + t1 * 65), TimerAction::WaitUntil(t0 + t1 * 100));
    }

    #[test]
    fn non_invite_proceeding_uses_fixed_interval() {
        let t0 = Instant::now();
        let t1 = Duration::from_millis(500);
        let t2 = Duration::from_secs(4);
        let mut t = RetransmitTimer::timer_e(t0, t1, t2);
        t.fixed_interval(t0, t2);
        assert_eq!(t.poll(t0), TimerAction::WaitUntil(t0 + t2));
        assert_eq!(t.poll(t0 + t2), TimerAction::Retransmit);
        assert_eq!(t.next_retransmit(), Some(t0 + t2 * 2));
    }

    #[test]
    fn no_retransmit_only_expires() {
        let t0 = Instant::now();
        let mut t = RetransmitTimer::no_retransmit(t0, Duration::from_secs(1));
        assert_eq!(
            t.poll(t0),
            TimerAction::WaitUntil(t0 + Duration::from_secs(1))
        );
        assert_eq!(t.poll(t0 + Duration::from_secs(1)), TimerAction::Expired);
        assert_eq!(t.deadline(), t0 + Duration::from_secs(1));
    }
}
