//! SIP endpoint: the socket driver of the transaction core. UDP + TCP on one address,
//! RFC 3581 symmetric response routing.
//!
//! All transaction state (RFC 3261 §17) lives in the sans-IO
//! [`Transactions`]. This driver reads the sockets
//! (`endpoint/transport.rs`), feeds each message to the core with `Instant::now()`, performs the
//! [`Action`]s it returns (send bytes, deliver a request to the application, wake a
//! waiting [`Endpoint::request`]), and one task sleeps until the core's next deadline.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::message::{Method, Request, Response, SipMessage, Via};
use super::new_branch;
pub use super::timer::{RetransmitTimer, TimerAction};
use super::transaction::{self, Action, ClientKey, ClientOutcome, Dest, Transactions, Transmit};
pub use super::transaction::{IN_DIALOG_RESERVE, Transport, TxnError};

mod transport;

use transport::{Conn, WriteCmd, spawn_conn};

/// Default of [`EndpointConfig::tcp_idle_timeout`] (and of the `sip.tcp_idle` setting):
/// a TCP connection with no bytes received for 120 s is closed.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Configuration

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
    /// The sent-by of our Via when it is not the bound address (behind a NAT).
    pub sent_by: Option<SocketAddr>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            max_udp: 1300,
            tcp_idle_timeout: DEFAULT_TCP_IDLE,
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
            sent_by: None,
        }
    }
}

/// How to answer a request: the UDP source, or the TCP connection it came in on.
#[derive(Clone)]
enum ReplyPath {
    Udp(SocketAddr),
    Tcp(Conn),
}

/// The result a waiting [`Endpoint::request`] gets.
type ClientResult = Result<Response, TxnError>;

struct State {
    core: Transactions<ReplyPath>,
    /// The callers of [`Endpoint::request`] waiting for their transaction.
    waiters: HashMap<ClientKey, oneshot::Sender<ClientResult>>,
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
    /// Wakes the timer task when the core's next deadline moved earlier.
    wake: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn core_config(cfg: &EndpointConfig) -> transaction::Config {
    transaction::Config {
        t1: cfg.t1,
        t2: cfg.t2,
        t4: cfg.t4,
        proceeding_timeout: cfg.proceeding_timeout,
        max_transactions: cfg.max_transactions,
        max_message: cfg.max_message,
        retry_after: cfg.retry_after,
        invite_rate: cfg.invite_rate,
        invite_burst: cfg.invite_burst,
        trusted: cfg.trusted.clone(),
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
    is_ack: bool,
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
                let listener = crate::listen::tcp(addr)?;
                let port = listener.local_addr()?.port();
                match UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await {
                    Ok(udp) => break (listener, udp),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 32 => continue,
                    Err(e) => return Err(e),
                }
            }
        } else {
            let listener = crate::listen::tcp(addr)?;
            let udp = UdpSocket::bind(addr).await?;
            (listener, udp)
        };
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(cfg.incoming_queue.max(1) + IN_DIALOG_RESERVE);
        let (shutdown_tx, _) = watch::channel(false);
        let state = State {
            core: Transactions::new(core_config(&cfg), Instant::now()),
            waiters: HashMap::new(),
            conns: HashMap::new(),
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
            wake: Arc::new(Notify::new()),
        });
        let weak = Arc::downgrade(&inner);
        let udp_task = tokio::spawn(transport::udp_loop(
            weak.clone(),
            inner.udp.clone(),
            inner.shutdown_tx.subscribe(),
            inner.cfg.max_message,
        ));
        let tcp_task = tokio::spawn(transport::accept_loop(
            weak.clone(),
            listener,
            inner.shutdown_tx.subscribe(),
        ));
        let timer_task = tokio::spawn(timer_loop(
            weak,
            inner.wake.clone(),
            inner.shutdown_tx.subscribe(),
        ));
        lock(&inner.tasks).extend([udp_task, tcp_task, timer_task]);
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
        let key: ClientKey = (branch, req.method.to_string());
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&inner.state);
            st.core.start_client(
                key.clone(),
                &req,
                bytes.clone(),
                dest,
                transport,
                Instant::now(),
            )?;
            st.waiters.insert(key.clone(), tx);
        }
        inner.wake.notify_one();
        let _guard = ClientGuard {
            inner: inner.clone(),
            key,
        };
        let mut closed = match transport {
            Transport::Udp => {
                inner.udp.send_to(&bytes, dest).await?;
                None
            }
            Transport::Tcp => {
                let conn = inner.connection(dest).await?;
                conn.tx
                    .send(WriteCmd::Data(bytes))
                    .await
                    .map_err(|_| TxnError::TransportClosed)?;
                Some(conn.closed.clone())
            }
        };
        // The core ends the transaction (final response, Timer B/F); the driver
        // watches the connection and the shutdown.
        tokio::select! {
            biased;
            r = rx => r.unwrap_or(Err(TxnError::TransportClosed)),
            _ = wait_closed(&mut closed) => Err(TxnError::TransportClosed),
            _ = shutdown.changed() => Err(TxnError::Shutdown),
        }
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
        lock(&inner.state)
            .core
            .remember_ack(&ack, bytes, dest, transport, Instant::now());
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
            st.core.clear();
            st.waiters.clear();
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

pub(super) async fn wait_true(rx: &mut watch::Receiver<bool>) {
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

struct ClientGuard {
    inner: Arc<Inner>,
    key: ClientKey,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        st.core.abandon_client(&self.key);
        st.waiters.remove(&self.key);
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
            r.headers.prepend(
                "Via",
                Via::new(t.as_str(), self.cfg.sent_by.unwrap_or(self.local), branch).to_string(),
            );
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

    /// Runs `f` on the core; wakes the timer task if the next deadline moved earlier.
    fn with_core<R>(&self, f: impl FnOnce(&mut Transactions<ReplyPath>) -> R) -> R {
        let (r, earlier) = {
            let mut st = lock(&self.state);
            let before = st.core.next_deadline();
            let r = f(&mut st.core);
            (r, st.core.next_deadline() < before)
        };
        if earlier {
            self.wake.notify_one();
        }
        r
    }

    /// Free places in the application's queue (0 once it is closed).
    fn queue_room(&self) -> usize {
        lock(&self.incoming_tx)
            .as_ref()
            .map_or(0, |tx| tx.capacity())
    }

    fn deliver(&self, incoming: Incoming, in_dialog: bool) -> Result<(), Box<Incoming>> {
        let guard = lock(&self.incoming_tx);
        let Some(tx) = guard.as_ref() else {
            return Err(Box::new(incoming));
        };
        // Checked again: other sockets' messages may have taken places meanwhile.
        if !transaction::admits(in_dialog, tx.capacity()) {
            return Err(Box::new(incoming));
        }
        tx.try_send(incoming).map_err(|e| match e {
            mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => {
                Box::new(i)
            }
        })
    }

    /// A parsed message from `source`; `wire_len` is its size on the wire (for the
    /// reply budget of UDP sources).
    async fn dispatch(
        self: &Arc<Self>,
        msg: SipMessage,
        source: SocketAddr,
        path: ReplyPath,
        wire_len: usize,
    ) {
        let now = Instant::now();
        let actions = match msg {
            SipMessage::Request(req) => {
                let transport = match path {
                    ReplyPath::Udp(_) => Transport::Udp,
                    ReplyPath::Tcp(_) => Transport::Tcp,
                };
                let free = self.queue_room();
                self.with_core(|c| {
                    c.received_request(req, source, transport, path, wire_len, free, now)
                })
            }
            SipMessage::Response(resp) => {
                self.with_core(|c| c.received_response(resp, source, now))
            }
        };
        self.perform(actions).await;
    }

    /// Carries out the core's actions, in order.
    async fn perform(self: &Arc<Self>, actions: Vec<Action<ReplyPath>>) {
        let mut todo = VecDeque::from(actions);
        while let Some(action) = todo.pop_front() {
            match action {
                Action::Transmit(Transmit {
                    to: Dest::Path(path),
                    bytes,
                }) => {
                    if let Err(e) = self.send_path(&path, bytes).await {
                        debug!(error = %e, "sending response failed");
                    }
                }
                Action::Transmit(Transmit {
                    to: Dest::Addr(dest, Transport::Udp),
                    bytes,
                }) => {
                    if let Err(e) = self.udp.send_to(&bytes, dest).await {
                        debug!(%dest, error = %e, "sending failed");
                    }
                }
                Action::Transmit(Transmit {
                    to: Dest::Addr(dest, Transport::Tcp),
                    bytes,
                }) => {
                    // May have to connect first: not in the reading task.
                    let inner = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = inner.send_bytes(&bytes, dest, Transport::Tcp).await {
                            debug!(%dest, error = %e, "sending ACK failed");
                        }
                    });
                }
                Action::Retransmit { key, dest, bytes } => {
                    if let Err(e) = self.udp.send_to(&bytes, dest).await {
                        let mut st = lock(&self.state);
                        st.core.abandon_client(&key);
                        if let Some(w) = st.waiters.remove(&key) {
                            let _ = w.send(Err(TxnError::Io(e)));
                        }
                    }
                }
                Action::ClientDone { key, outcome } => {
                    let result = match outcome {
                        ClientOutcome::Final(resp) => Ok(resp),
                        ClientOutcome::TimedOut => Err(TxnError::Timeout),
                    };
                    if let Some(w) = lock(&self.state).waiters.remove(&key) {
                        let _ = w.send(result);
                    }
                }
                Action::Deliver(d) => {
                    let incoming = Incoming {
                        request: d.request,
                        source: d.source,
                        transport: d.transport,
                        reply: Replier {
                            inner: self.clone(),
                            key: d.key,
                            path: d.path,
                            is_ack: d.is_ack,
                        },
                    };
                    if let Err(refused) = self.deliver(incoming, d.in_dialog) {
                        let Incoming {
                            request,
                            source,
                            reply,
                            ..
                        } = *refused;
                        let more = self.with_core(|c| {
                            c.undeliverable(&reply.key, &request, source, reply.is_ack, reply.path)
                        });
                        todo.extend(more);
                    }
                }
            }
        }
    }
}

impl Incoming {
    /// Ends the server transaction of this request: nothing more is sent in it (no
    /// response, no retransmission) and a retransmitted request is absorbed. For a call
    /// evicted to make room for newer ones.
    pub fn end_transaction(&self) {
        lock(&self.reply.inner.state).core.end(&self.reply.key);
    }

    /// Answers the request in its server transaction: the response gets the transaction's
    /// To tag, is cached for retransmitted requests, and a final response to INVITE over
    /// UDP is retransmitted until the ACK (see [`Transactions::send_response`]).
    pub async fn respond(&self, resp: Response) -> Result<(), TxnError> {
        let r = &self.reply;
        if r.is_ack {
            return Err(TxnError::InvalidRequest("ACK cannot be answered".into()));
        }
        let now = Instant::now();
        let t = r
            .inner
            .with_core(|c| c.send_response(&r.key, r.path.clone(), resp, now))?;
        let Dest::Path(path) = t.to else {
            unreachable!("responses go back on the request's path")
        };
        r.inner.send_path(&path, t.bytes).await
    }
}

/// Sleeps until the core's next deadline (or an earlier one appears), then fires its
/// timers and performs what they ask for.
async fn timer_loop(weak: Weak<Inner>, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let at = {
            let Some(inner) = weak.upgrade() else { return };
            lock(&inner.state).core.next_deadline()
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            _ = wake.notified() => continue,
            _ = shutdown.changed() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        let actions = {
            let mut st = lock(&inner.state);
            st.conns.retain(|_, c| !c.is_closed());
            st.core.timeout(Instant::now())
        };
        inner.perform(actions).await;
    }
}
