//! The socket tasks of the endpoint: the UDP receive loop, the TCP accept loop, and one
//! reader and one writer task per TCP connection (framing, idle and half-open timeouts,
//! connection limits). They parse what arrives and hand it to `Inner::dispatch`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::{debug, trace, warn};

use super::{Inner, ReplyPath, lock, wait_true};
use crate::sip::limits::LogBudget;
use crate::sip::message::{
    ParseError, bad_request_for, parse_datagram_limited, parse_stream_limited,
};

pub(super) enum WriteCmd {
    Data(Vec<u8>),
    /// Flush and close the connection.
    Close,
}

/// A TCP connection: its writer task's queue and whether it has closed.
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<WriteCmd>,
    pub(super) closed: watch::Receiver<bool>,
}

impl Conn {
    pub(super) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

pub(super) async fn udp_loop(
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

pub(super) async fn accept_loop(
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

pub(super) fn spawn_conn(
    inner: &Arc<Inner>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: bool,
) -> Conn {
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
