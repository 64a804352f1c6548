//! TCP listeners with a deeper accept queue than the default.
//!
//! `tokio::net::TcpListener::bind` listens with a backlog of 128. A smarthost's MTA, or
//! a load test, opens a couple of hundred connections at once; once the accept queue is
//! full the kernel drops the SYN, and the client waits a whole retransmission timeout
//! (1 s, then 3 s, 7 s) before it tries again. Issue 16's 200-session point lost two
//! thirds of its rate in some runs that way (`nstat` `TcpExtListenOverflows`), while the
//! CPU sat idle. The kernel caps the value at `net.core.somaxconn`.

use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel may hold for us before we accept them.
pub const BACKLOG: u32 = 1024;

/// A listener on `addr` (SO_REUSEADDR, as `std`'s bind sets it) with [`BACKLOG`].
pub fn tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More connections than the default backlog (128) wait, none accepted yet: with the
    /// default, the 129th SYN is dropped and retried for as long as nobody accepts, so
    /// the connect loop never ends (the timeout is only there to turn that hang into a
    /// failure); with ours, all 300 are queued, then all accepted.
    #[tokio::test]
    async fn holds_more_waiting_connections_than_the_default_backlog() {
        let l = tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let connect_all = async {
            let mut conns = Vec::new();
            for _ in 0..300 {
                conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            conns
        };
        let conns = tokio::time::timeout(std::time::Duration::from_secs(20), connect_all)
            .await
            .expect("300 connections queued while none was accepted");
        for _ in 0..conns.len() {
            l.accept().await.unwrap();
        }
    }
}
