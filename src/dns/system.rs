//! Host names through the system resolver (`getaddrinfo`: /etc/hosts, nsswitch, A/AAAA),
//! for the hosts an operator configures by name: SIP routes, call targets, next hops,
//! partners' addresses.
//!
//! `getaddrinfo` blocks, and `tokio::net::lookup_host` runs it in tokio's blocking pool,
//! which the relay bounds and keeps for the disk (`runtime` in `src/cli/mod.rs`). A
//! resolver that does not answer holds its thread for its own timeouts (10 s and more with
//! glibc's defaults) after the caller has stopped waiting, so a burst of lookups could fill
//! the pool and hold up every commit behind them. Here a name is looked up on a thread of
//! its own, and the caller waits at most `wait`; an address written as one is not looked up.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("{0}")]
    Failed(io::Error),
}

/// The addresses of `host` (a name, or an IP address as it is) at `port`.
pub async fn lookup(host: &str, port: u16, wait: Duration) -> Result<Vec<SocketAddr>, LookupError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.to_string();
    let rx = crate::own_thread::spawn("resolve", move || {
        (name.as_str(), port).to_socket_addrs().map(Vec::from_iter)
    })
    .map_err(LookupError::Failed)?;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(r)) => r.map_err(LookupError::Failed),
        Ok(Err(_)) => Err(LookupError::Failed(io::Error::other(
            "the resolver thread stopped",
        ))),
        Err(_) => Err(LookupError::Timeout(wait)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_are_taken_as_they_are_and_names_are_looked_up() {
        let w = Duration::from_secs(5);
        let a = lookup("192.0.2.7", 25, w).await.unwrap();
        assert_eq!(a, vec!["192.0.2.7:25".parse().unwrap()]);
        let a = lookup("::1", 5060, w).await.unwrap();
        assert_eq!(a, vec!["[::1]:5060".parse().unwrap()]);
        // /etc/hosts names localhost on every system this runs on.
        let a = lookup("localhost", 2525, w).await.unwrap();
        assert!(
            a.iter().all(|s| s.ip().is_loopback() && s.port() == 2525),
            "{a:?}"
        );
        assert!(!a.is_empty());
        // A name that cannot exist: an error, whether the resolver says so (at once, here)
        // or does not answer in time (a machine whose DNS server is unreachable).
        let short = Duration::from_secs(2);
        assert!(lookup("no-such-host.invalid", 25, short).await.is_err());
    }
}
