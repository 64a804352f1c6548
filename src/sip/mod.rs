//! SIP: the message layer ([`message`]), RFC 3261 transactions as a sans-IO core
//! ([`transaction`], with the timers of [`timer`] and the abuse limits of [`limits`]),
//! the UDP+TCP socket driver that runs them ([`endpoint`]), and dialog routing through
//! record-routing proxies ([`route`]).

pub mod endpoint;
pub mod limits;
pub mod message;
pub mod route;
pub mod timer;
pub mod transaction;

pub use endpoint::{DEFAULT_TCP_IDLE, Endpoint, EndpointConfig, Incoming, Transport, TxnError};
pub use message::{
    CSeq, Headers, Method, NameAddr, ParseError, Request, Response, SipMessage, Via,
    parse_datagram, parse_stream, warning_response,
};

/// `bytes` random bytes as lower-case hex (tags, Call-IDs, branches).
/// Falls back to a time/counter mix if the OS RNG fails, never panics.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut x = nanos ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    hex::encode(buf)
}

/// A fresh RFC 3261 branch (magic cookie + 96 random bits).
pub fn new_branch() -> String {
    format!("z9hG4bK{}", random_hex(12))
}
