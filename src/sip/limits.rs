//! Abuse limits, sans-IO: every function takes `now` and does no I/O.
//!
//! - [`TokenBucket`]: a rate with a burst allowance.
//! - [`RateLimiter`]: one bucket per source address, in a bounded table, with
//!   addresses (the configured peers) that are never limited.
//! - [`PendingCalls`]: incoming calls that have not been ACKed yet, per source and in
//!   total; when full, which call to evict (the oldest un-ACKed one).
//! - [`ReplyBudget`]: at most [`REPLY_FACTOR`] times the bytes received go back to an
//!   unverified UDP source.
//! - [`LogBudget`]: at most N log lines per second, counting what it suppressed.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(now: Instant, rate: f64, burst: f64) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens.floor() as u32
    }

    /// When the next token will be there (now if one is).
    pub fn next_token(&self, now: Instant) -> Instant {
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            return now;
        }
        let missing = 1.0 - self.tokens;
        self.last + Duration::from_secs_f64(missing / self.rate)
    }

    /// True if the bucket is full at `now` (it can then be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// The answer of a limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    Allow,
    /// Refused; the client may retry after this many seconds (for Retry-After).
    Refuse {
        retry_after: u32,
    },
}

/// Per-source token buckets. The table holds at most `max_sources` entries;
/// full buckets are forgotten first, and when every bucket is in use a new
/// source shares the refusal of an overloaded table (it is refused).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    exempt: HashSet<IpAddr>,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: f64, max_sources: usize) -> RateLimiter {
        RateLimiter {
            rate,
            burst,
            max_sources: max_sources.max(1),
            exempt: HashSet::new(),
            buckets: HashMap::new(),
        }
    }

    /// Addresses that are never limited (the configured peers).
    pub fn with_exempt(mut self, exempt: impl IntoIterator<Item = IpAddr>) -> RateLimiter {
        self.exempt.extend(exempt.into_iter().map(canonical));
        self
    }

    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.contains(&canonical(ip))
    }

    /// A rate of zero or less turns limiting off.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    /// One more event from `ip` at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> RateVerdict {
        self.check_source(ip, true, now)
    }

    /// One more event from `ip` at `now`; `verified`: the address was proven (TCP). Exempt
    /// addresses are exempt only when verified: over UDP anyone can send from a partner's
    /// address, and the exemption would let him flood in its name.
    pub fn check_source(&mut self, ip: IpAddr, verified: bool, now: Instant) -> RateVerdict {
        let ip = canonical(ip);
        if !self.enabled() || (verified && self.exempt.contains(&ip)) {
            return RateVerdict::Allow;
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_sources {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_sources {
                return RateVerdict::Refuse { retry_after: 1 };
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self
            .buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(now, rate, burst));
        if b.try_take(now) {
            RateVerdict::Allow
        } else {
            let wait = b.next_token(now).saturating_duration_since(now);
            RateVerdict::Refuse {
                retry_after: (wait.as_secs_f64().ceil() as u32).max(1),
            }
        }
    }

    /// Forget sources whose buckets are full again (call now and then).
    pub fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(now));
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A pending call's handle in [`PendingCalls`].
pub type CallId = u64;

/// What [`PendingCalls::start`] decided: the new call is admitted, and, if its source (or
/// the table) was full, the oldest un-ACKed call that must end to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub id: CallId,
    pub evict: Option<Evicted>,
}

/// A call evicted to make room, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub id: CallId,
    /// The source's (or, if false, the table's) limit was reached.
    pub per_source: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SourceKey {
    ip: IpAddr,
    /// Came over TCP: the address was proven by the handshake. Spoofed UDP from the same
    /// address counts separately, so it can never evict these.
    verified: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingEntry {
    source: SourceKey,
    exempt: bool,
    started: Instant,
}

/// Incoming calls that have not been ACKed yet.
///
/// A new call is never refused for lack of room: the oldest un-ACKed call from the same
/// source (same address and transport) is evicted instead, or, when the total is
/// reached, the oldest one from any non-exempt source. A real call is pending for one
/// round trip, a spoofed or abandoned one until its ACK times out, so oldest-first
/// eviction ends the attacker's calls and not the partner's: spoofed INVITEs from a
/// partner's address cannot lock the partner out (a refusal did, issue 11).
///
/// Exempt sources (the configured peers) are exempt only over TCP, where the address is
/// verified by the TCP handshake; over UDP anyone can claim it. Exempt calls do not count
/// against the total and are never evicted by other sources' calls.
#[derive(Debug, Clone)]
pub struct PendingCalls {
    per_source: usize,
    total: usize,
    exempt: HashSet<IpAddr>,
    /// Ordered by id, that is by arrival: the first match is the oldest.
    calls: std::collections::BTreeMap<CallId, PendingEntry>,
    counts: HashMap<SourceKey, usize>,
    non_exempt: usize,
    next_id: CallId,
}

impl PendingCalls {
    pub fn new(per_source: usize, total: usize) -> PendingCalls {
        PendingCalls {
            per_source: per_source.max(1),
            total: total.max(1),
            exempt: HashSet::new(),
            calls: std::collections::BTreeMap::new(),
            counts: HashMap::new(),
            non_exempt: 0,
            next_id: 1,
        }
    }

    pub fn with_exempt(mut self, exempt: impl IntoIterator<Item = IpAddr>) -> PendingCalls {
        self.exempt.extend(exempt.into_iter().map(canonical));
        self
    }

    /// One more pending call from `ip` (`verified`: it came over TCP) at `now`.
    pub fn start(&mut self, ip: IpAddr, verified: bool, now: Instant) -> Admitted {
        let source = SourceKey {
            ip: canonical(ip),
            verified,
        };
        let exempt = verified && self.exempt.contains(&source.ip);
        let n = self.counts.get(&source).copied().unwrap_or(0);
        let evict = if n >= self.per_source {
            self.oldest(|e| e.source == source).map(|id| Evicted {
                id,
                per_source: true,
            })
        } else if !exempt && self.non_exempt >= self.total {
            self.oldest(|e| !e.exempt).map(|id| Evicted {
                id,
                per_source: false,
            })
        } else {
            None
        };
        if let Some(e) = evict {
            self.finish(e.id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.calls.insert(
            id,
            PendingEntry {
                source,
                exempt,
                started: now,
            },
        );
        *self.counts.entry(source).or_insert(0) += 1;
        if !exempt {
            self.non_exempt += 1;
        }
        Admitted { id, evict }
    }

    fn oldest(&self, f: impl Fn(&PendingEntry) -> bool) -> Option<CallId> {
        self.calls
            .iter()
            .filter(|(_, e)| f(e))
            .min_by_key(|(id, e)| (e.started, **id))
            .map(|(id, _)| *id)
    }

    /// Call `id` was ACKed, refused, ended or evicted. Unknown ids are ignored.
    pub fn finish(&mut self, id: CallId) {
        let Some(e) = self.calls.remove(&id) else {
            return;
        };
        if let Some(n) = self.counts.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&e.source);
            }
        }
        if !e.exempt {
            self.non_exempt = self.non_exempt.saturating_sub(1);
        }
    }

    /// Pending calls from `ip`, over both transports.
    pub fn pending_from(&self, ip: IpAddr) -> usize {
        let ip = canonical(ip);
        self.counts
            .iter()
            .filter(|(k, _)| k.ip == ip)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Pending calls from non-exempt sources.
    pub fn non_exempt_total(&self) -> usize {
        self.non_exempt
    }
}

/// How many bytes the relay may send back to an unverified UDP source, per request bytes
/// received from it: a spoofed source address must not turn the relay into an amplifier.
pub const REPLY_FACTOR: usize = 3;

/// The reply budget of one UDP server transaction whose source is not verified (no ACK
/// yet): what was received in its requests (the first and any retransmissions) and what
/// was sent back. Sending stops at [`REPLY_FACTOR`] times the bytes received; an INVITE's
/// final response then stops being retransmitted, as if Timer H had fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyBudget {
    received: usize,
    sent: usize,
}

impl ReplyBudget {
    /// A transaction opened by a request of `received` bytes.
    pub fn new(received: usize) -> ReplyBudget {
        ReplyBudget { received, sent: 0 }
    }

    /// The request was retransmitted: `n` more bytes from the source.
    pub fn received(&mut self, n: usize) {
        self.received = self.received.saturating_add(n);
    }

    /// May `n` more bytes go back? If so they are counted as sent.
    pub fn try_send(&mut self, n: usize) -> bool {
        let after = self.sent.saturating_add(n);
        if after <= self.received.saturating_mul(REPLY_FACTOR) {
            self.sent = after;
            true
        } else {
            false
        }
    }

    pub fn sent(&self) -> usize {
        self.sent
    }
}

/// At most `per_second` log lines per second; the rest are counted so the next
/// allowed line can say how many were suppressed.
#[derive(Debug, Clone)]
pub struct LogBudget {
    per_second: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second: per_second.max(1),
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, and say that `n` lines were suppressed before.
    /// `None`: stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = match self.window_start {
            Some(s) => now.saturating_duration_since(s) >= Duration::from_secs(1),
            None => true,
        };
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 20.0, 20.0);
        let allowed = (0..100).filter(|_| b.try_take(t0)).count();
        assert_eq!(allowed, 20, "a full bucket gives its burst at once");
        assert!(!b.try_take(t0));
        // 50 ms later one token (20/s) is back.
        assert!(b.try_take(t0 + Duration::from_millis(50)));
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        // Over ten seconds at 1,000 attempts per second, about 20/s get through.
        let mut ok = 0;
        for i in 1..=10_000u64 {
            if b.try_take(t0 + Duration::from_millis(50) + Duration::from_micros(i * 1000)) {
                ok += 1;
            }
        }
        assert!((195..=205).contains(&ok), "{ok}");
    }

    #[test]
    fn bucket_never_exceeds_burst_and_predicts_next_token() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10.0, 5.0);
        assert_eq!(b.available(t0 + Duration::from_secs(100)), 5);
        let t1 = t0 + Duration::from_secs(100);
        for _ in 0..5 {
            assert!(b.try_take(t1));
        }
        assert_eq!(b.next_token(t1), t1 + Duration::from_millis(100));
        assert!(!b.is_full(t1));
        assert!(b.is_full(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn limiter_is_per_source_and_exempts_peers() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(20.0, 20.0, 1000).with_exempt([ip("127.0.0.1")]);
        let flood = ip("127.0.0.9");
        let mut refused = 0;
        let mut peer_ok = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i);
            if matches!(l.check(flood, now), RateVerdict::Refuse { .. }) {
                refused += 1;
            }
            if i % 100 == 0 && l.check(ip("127.0.0.1"), now) == RateVerdict::Allow {
                peer_ok += 1;
            }
        }
        assert!(refused >= 1000 - 20 - 21, "{refused}");
        assert_eq!(peer_ok, 10, "the peer is never limited");
        // Another source has its own bucket.
        assert_eq!(l.check(ip("127.0.0.10"), t0), RateVerdict::Allow);
        // IPv4-mapped IPv6 is the same source.
        assert!(l.is_exempt(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn limiter_refusal_says_when_to_retry() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(0.5, 1.0, 10);
        assert_eq!(l.check(ip("10.0.0.1"), t0), RateVerdict::Allow);
        assert_eq!(
            l.check(ip("10.0.0.1"), t0),
            RateVerdict::Refuse { retry_after: 2 }
        );
        let mut off = RateLimiter::new(0.0, 1.0, 10);
        for _ in 0..100 {
            assert_eq!(off.check(ip("10.0.0.1"), t0), RateVerdict::Allow);
        }
    }

    #[test]
    fn limiter_table_is_bounded() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1.0, 2.0, 3);
        for i in 1..=3 {
            assert_eq!(l.check(ip(&format!("10.0.0.{i}")), t0), RateVerdict::Allow);
        }
        // Table full of busy buckets: a fourth source is refused.
        assert!(matches!(
            l.check(ip("10.0.0.4"), t0),
            RateVerdict::Refuse { .. }
        ));
        assert_eq!(l.sources(), 3);
        // Once the buckets are full again they are forgotten and room is made.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(l.check(ip("10.0.0.4"), later), RateVerdict::Allow);
        l.sweep(later + Duration::from_secs(5));
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn a_full_source_evicts_its_oldest_call_never_refuses() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let peer = ip("127.0.0.1");
        let mut p = PendingCalls::new(16, 256).with_exempt([peer]);
        // 16 spoofed, never-ACKed INVITEs over UDP from the peer's address, 10 ms apart.
        let spoofed: Vec<CallId> = (0..16)
            .map(|i| {
                let a = p.start(peer, false, at(10 * i));
                assert_eq!(a.evict, None);
                a.id
            })
            .collect();
        // The real peer's call (UDP too) evicts the oldest spoofed one and is admitted.
        let real = p.start(peer, false, at(1000));
        assert_eq!(
            real.evict,
            Some(Evicted {
                id: spoofed[0],
                per_source: true
            })
        );
        // Its ACK comes one round trip later; it was never the oldest meanwhile.
        p.finish(real.id);
        assert_eq!(p.pending_from(peer), 15);
        // More spoofed INVITEs keep evicting spoofed ones, oldest first.
        assert_eq!(p.start(peer, false, at(1010)).evict, None);
        let next = p.start(peer, false, at(1020));
        assert_eq!(next.evict.map(|e| e.id), Some(spoofed[1]));
        p.finish(spoofed[1]); // already gone: no effect
        assert_eq!(p.pending_from(peer), 16);
        // Over TCP the peer is a different source: UDP calls never evict it, nor count.
        for i in 0..16 {
            assert_eq!(p.start(peer, true, at(2000 + i)).evict, None);
        }
        assert_eq!(p.pending_from(peer), 32);
        assert_eq!(p.non_exempt_total(), 16, "verified peer calls are exempt");
    }

    #[test]
    fn a_full_table_evicts_the_oldest_non_exempt_call() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let peer = ip("127.0.0.1");
        let mut p = PendingCalls::new(2, 3).with_exempt([peer]);
        let a1 = p.start(ip("10.0.0.1"), false, at(0)).id;
        let _a2 = p.start(ip("10.0.0.1"), false, at(1)).id;
        let b1 = p.start(ip("10.0.0.2"), false, at(2)).id;
        let ex = p.start(peer, true, at(3));
        assert_eq!(ex.evict, None, "an exempt TCP call does not need room");
        // The peer over UDP is not exempt: it takes room like anyone.
        let c = p.start(peer, false, at(4));
        assert_eq!(
            c.evict,
            Some(Evicted {
                id: a1,
                per_source: false
            })
        );
        let d = p.start(ip("10.0.0.3"), false, at(5));
        assert_eq!(d.evict.map(|e| e.id), Some(_a2));
        let e = p.start(ip("10.0.0.4"), false, at(6));
        assert_eq!(e.evict.map(|e| e.id), Some(b1));
        // Never the exempt one.
        for i in 0..10 {
            let x = p.start(ip(&format!("10.0.1.{i}")), false, at(10 + i));
            assert_ne!(x.evict.map(|e| e.id), Some(ex.id));
        }
        assert_eq!(p.non_exempt_total(), 3);
        p.finish(ex.id);
        assert_eq!(p.pending_from(peer), 0);
    }

    #[test]
    fn the_limiter_exempts_peers_only_when_verified() {
        let t0 = Instant::now();
        let peer = ip("127.0.0.1");
        let mut l = RateLimiter::new(1.0, 2.0, 100).with_exempt([peer]);
        for _ in 0..100 {
            assert_eq!(l.check_source(peer, true, t0), RateVerdict::Allow);
        }
        assert_eq!(l.check_source(peer, false, t0), RateVerdict::Allow);
        assert_eq!(l.check_source(peer, false, t0), RateVerdict::Allow);
        assert!(matches!(
            l.check_source(peer, false, t0),
            RateVerdict::Refuse { .. }
        ));
    }

    #[test]
    fn reply_budget_is_three_times_what_was_received() {
        // An INVITE of 750 bytes, a 200 OK of 1,100 retransmitted on Timer G.
        let mut b = ReplyBudget::new(750);
        assert!(b.try_send(1100));
        assert!(b.try_send(1100));
        assert!(!b.try_send(1100), "3,300 > 2,250");
        assert_eq!(b.sent(), 2200);
        // The caller retransmits its INVITE (its 200 OK was lost): more budget.
        b.received(750);
        assert!(b.try_send(1100));
        assert!(b.sent() <= 3 * 1500);
        let mut tiny = ReplyBudget::new(100);
        assert!(!tiny.try_send(301));
        assert!(tiny.try_send(300));
    }

    #[test]
    fn log_budget_counts_what_it_suppressed() {
        let t0 = Instant::now();
        let mut l = LogBudget::new(2);
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }
}
