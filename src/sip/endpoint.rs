//! SIP endpoint: UDP + TCP transport on one address, with RFC 3261 client
//! and server transactions (§17) and RFC 3581 symmetric response routing.
//!
//! The retransmission schedule is the pure [`RetransmitTimer`]; the tokio
//! part only sends bytes and sleeps until the deadlines it returns.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

use super::message::{
    Method, ParseError, Request, Response, SipMessage, Via, bad_request_for,
    parse_datagram_limited, parse_stream_limited,
};
use super::new_branch;

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
    /// Capacity of the incoming-request channel; when it is full new
    /// requests are answered 503.
    pub incoming_queue: usize,
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
        let (tx, rx) = mpsc::channel(cfg.incoming_queue.max(1));
        let (shutdown_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            cfg,
            local,
            udp: Arc::new(udp),
            state: Mutex::new(State::default()),
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
        Ok(spawn_conn(self, stream, dest))
    }

    fn deliver(&self, incoming: Incoming) -> Result<(), Box<Incoming>> {
        let guard = lock(&self.incoming_tx);
        match guard.as_ref() {
            Some(tx) => tx.try_send(incoming).map_err(|e| match e {
                mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => {
                    Box::new(i)
                }
            }),
            None => Err(Box::new(incoming)),
        }
    }

    async fn dispatch(self: &Arc<Self>, msg: SipMessage, source: SocketAddr, path: ReplyPath) {
        match msg {
            SipMessage::Request(req) => self.handle_request(req, source, path).await,
            SipMessage::Response(resp) => self.handle_response(resp, source).await,
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        mut req: Request,
        source: SocketAddr,
        path: ReplyPath,
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

        if req.method == Method::Ack {
            let branch = via.branch.clone().unwrap_or_default();
            {
                let mut st = lock(&self.state);
                if let Some(txn) = st.servers.get(&key)
                    && txn.final_status.is_some_and(|s| s >= 300)
                {
                    txn.ack.notify_one();
                    trace!(%source, "ACK for non-2xx absorbed by its transaction");
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
            if self.deliver(incoming).is_err() {
                warn!(%source, "incoming queue full or closed: ACK dropped");
            }
            return;
        }

        enum Action {
            Resend(Vec<u8>, ReplyPath),
            Absorb,
            Reject,
            New,
        }
        let action = {
            let mut st = lock(&self.state);
            match st.servers.get(&key) {
                Some(txn) => match &txn.last_response {
                    Some(bytes) => Action::Resend(bytes.clone(), path.clone()),
                    None => Action::Absorb,
                },
                None if st.servers.len() >= self.cfg.max_transactions => Action::Reject,
                None => {
                    st.servers.insert(
                        key.clone(),
                        ServerTxn {
                            last_response: None,
                            final_status: None,
                            ack: Arc::new(Notify::new()),
                            expires: Instant::now()
                                + self.cfg.proceeding_timeout
                                + self.cfg.t1 * 64,
                        },
                    );
                    Action::New
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
                let r = Response::for_request(&req, 503, "Service Unavailable");
                let _ = self.send_path(&path, r.to_bytes()).await;
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
                if let Err(incoming) = self.deliver(incoming) {
                    warn!(%source, "incoming queue full or closed: 503");
                    lock(&self.state).servers.remove(&key);
                    let r = Response::for_request(&incoming.request, 503, "Service Unavailable");
                    let _ = self.send_path(&path, r.to_bytes()).await;
                }
            }
        }
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
    /// Answers the request (server transaction). See the module docs for
    /// caching and retransmission behaviour.
    pub async fn respond(&self, resp: Response) -> Result<(), TxnError> {
        let r = &self.reply;
        let inner = &r.inner;
        if r.is_ack {
            return Err(TxnError::InvalidRequest("ACK cannot be answered".into()));
        }
        let bytes = resp.to_bytes();
        if bytes.len() > inner.cfg.max_message {
            return Err(TxnError::TooLarge(bytes.len()));
        }
        let is_final = resp.status >= 200;
        let ack = {
            let mut st = lock(&inner.state);
            let ack = match st.servers.get_mut(&r.key) {
                Some(txn) => {
                    if txn.final_status.is_some() {
                        return Err(TxnError::AlreadyResponded);
                    }
                    txn.last_response = Some(bytes.clone());
                    if is_final {
                        txn.final_status = Some(resp.status);
                        txn.expires = Instant::now() + inner.cfg.t1 * 64;
                    }
                    Some(txn.ack.clone())
                }
                None => None,
            };
            if is_final && r.is_invite && resp.is_success() {
                st.ack_index.insert(r.dialog.clone(), r.key.clone());
            }
            ack
        };
        inner.send_path(&r.path, bytes.clone()).await?;
        if let (true, true, ReplyPath::Udp(dest), Some(ack)) = (is_final, r.is_invite, &r.path, ack)
        {
            let udp = inner.udp.clone();
            let dest = *dest;
            let (t1, t2) = (inner.cfg.t1, inner.cfg.t2);
            let shutdown = inner.shutdown_tx.subscribe();
            let status = resp.status;
            tokio::spawn(retransmit_final(
                udp, bytes, dest, status, ack, shutdown, t1, t2,
            ));
        }
        Ok(())
    }
}

/// Timer G / H for a final response to INVITE over UDP.
#[allow(clippy::too_many_arguments)]
async fn retransmit_final(
    udp: Arc<UdpSocket>,
    bytes: Vec<u8>,
    dest: SocketAddr,
    status: u16,
    ack: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    t1: Duration,
    t2: Duration,
) {
    let mut timer = RetransmitTimer::timer_g(Instant::now(), t1, t2);
    loop {
        match timer.poll(Instant::now()) {
            TimerAction::Retransmit => {
                trace!(%dest, status, "retransmitting final response");
                if let Err(e) = udp.send_to(&bytes, dest).await {
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
                warn!(%src, size = n, error = %e, "dropping unparseable UDP datagram");
                continue;
            }
        };
        let Some(inner) = weak.upgrade() else { return };
        inner.dispatch(msg, src, ReplyPath::Udp(src)).await;
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
        let full = lock(&inner.state).conns.len() >= inner.cfg.max_tcp_connections;
        if full {
            warn!(%peer, "TCP connection limit reached, refusing connection");
            drop(stream);
            continue;
        }
        spawn_conn(&inner, stream, peer);
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
    }
}

fn spawn_conn(inner: &Arc<Inner>, stream: TcpStream, peer: SocketAddr) -> Conn {
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
        inner.cfg.tcp_idle_timeout,
        inner.cfg.max_message,
    ));
    conn
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
    idle: Duration,
    max_message: usize,
) {
    let mut closed = closed_tx.subscribe();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    'outer: loop {
        loop {
            match parse_stream_limited(&buf, max_message) {
                Ok(Some((msg, used))) => {
                    buf.drain(..used);
                    let Some(inner) = weak.upgrade() else {
                        break 'outer;
                    };
                    inner
                        .dispatch(msg, peer, ReplyPath::Tcp(conn.clone()))
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
        tokio::select! {
            r = tokio::time::timeout(idle, rd.read(&mut chunk)) => match r {
                Err(_) => {
                    debug!(%peer, "TCP connection idle, closing");
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
