//! Abuse limits, sans-IO: every function takes `now` and does no I/O.
//!
//! - [`TokenBucket`]: a rate with a burst allowance.
//! - [`RateLimiter`]: one bucket per source address, in a bounded table, with
//!   addresses (the configured peers) that are never limited.
//! - [`PendingCalls`]: counts incoming calls that have not been ACKed yet, per
//!   source and in total, and says whether one more may start.
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
pub enum Verdict {
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
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let ip = canonical(ip);
        if !self.enabled() || self.exempt.contains(&ip) {
            return Verdict::Allow;
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_sources {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_sources {
                return Verdict::Refuse { retry_after: 1 };
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self
            .buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(now, rate, burst));
        if b.try_take(now) {
            Verdict::Allow
        } else {
            let wait = b.next_token(now).saturating_duration_since(now);
            Verdict::Refuse {
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

/// Why a new incoming call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PendingRefused {
    #[error("too many pending calls from this address (limit {0})")]
    PerSource(usize),
    #[error("too many pending calls in total (limit {0})")]
    Total(usize),
}

/// Incoming calls that have not been ACKed yet. Exempt sources (the peers)
/// have their own per-source cap but do not count against, and are not
/// refused by, the total, so a flood from elsewhere cannot lock them out.
#[derive(Debug, Clone)]
pub struct PendingCalls {
    per_source: usize,
    total: usize,
    exempt: HashSet<IpAddr>,
    counts: HashMap<IpAddr, usize>,
    non_exempt: usize,
}

impl PendingCalls {
    pub fn new(per_source: usize, total: usize) -> PendingCalls {
        PendingCalls {
            per_source: per_source.max(1),
            total: total.max(1),
            exempt: HashSet::new(),
            counts: HashMap::new(),
            non_exempt: 0,
        }
    }

    pub fn with_exempt(mut self, exempt: impl IntoIterator<Item = IpAddr>) -> PendingCalls {
        self.exempt.extend(exempt.into_iter().map(canonical));
        self
    }

    /// Counts one more pending call from `ip`, or says why not.
    pub fn try_start(&mut self, ip: IpAddr) -> Result<(), PendingRefused> {
        let ip = canonical(ip);
        let exempt = self.exempt.contains(&ip);
        let n = self.counts.get(&ip).copied().unwrap_or(0);
        if n >= self.per_source {
            return Err(PendingRefused::PerSource(self.per_source));
        }
        if !exempt && self.non_exempt >= self.total {
            return Err(PendingRefused::Total(self.total));
        }
        *self.counts.entry(ip).or_insert(0) += 1;
        if !exempt {
            self.non_exempt += 1;
        }
        Ok(())
    }

    /// The call from `ip` was ACKed, refused or ended.
    pub fn finish(&mut self, ip: IpAddr) {
        let ip = canonical(ip);
        let Some(n) = self.counts.get_mut(&ip) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.counts.remove(&ip);
        }
        if !self.exempt.contains(&ip) {
            self.non_exempt = self.non_exempt.saturating_sub(1);
        }
    }

    pub fn pending_from(&self, ip: IpAddr) -> usize {
        self.counts.get(&canonical(ip)).copied().unwrap_or(0)
    }

    /// Pending calls from non-exempt sources.
    pub fn non_exempt_total(&self) -> usize {
        self.non_exempt
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
            if matches!(l.check(flood, now), Verdict::Refuse { .. }) {
                refused += 1;
            }
            if i % 100 == 0 && l.check(ip("127.0.0.1"), now) == Verdict::Allow {
                peer_ok += 1;
            }
        }
        assert!(refused >= 1000 - 20 - 21, "{refused}");
        assert_eq!(peer_ok, 10, "the peer is never limited");
        // Another source has its own bucket.
        assert_eq!(l.check(ip("127.0.0.10"), t0), Verdict::Allow);
        // IPv4-mapped IPv6 is the same source.
        assert!(l.is_exempt(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn limiter_refusal_says_when_to_retry() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(0.5, 1.0, 10);
        assert_eq!(l.check(ip("10.0.0.1"), t0), Verdict::Allow);
        assert_eq!(
            l.check(ip("10.0.0.1"), t0),
            Verdict::Refuse { retry_after: 2 }
        );
        let mut off = RateLimiter::new(0.0, 1.0, 10);
        for _ in 0..100 {
            assert_eq!(off.check(ip("10.0.0.1"), t0), Verdict::Allow);
        }
    }

    #[test]
    fn limiter_table_is_bounded() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1.0, 2.0, 3);
        for i in 1..=3 {
            assert_eq!(l.check(ip(&format!("10.0.0.{i}")), t0), Verdict::Allow);
        }
        // Table full of busy buckets: a fourth source is refused.
        assert!(matches!(
            l.check(ip("10.0.0.4"), t0),
            Verdict::Refuse { .. }
        ));
        assert_eq!(l.sources(), 3);
        // Once the buckets are full again they are forgotten and room is made.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(l.check(ip("10.0.0.4"), later), Verdict::Allow);
        l.sweep(later + Duration::from_secs(5));
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn pending_caps_per_source_and_total_but_not_peers() {
        let peer = ip("127.0.0.1");
        let mut p = PendingCalls::new(2, 3).with_exempt([peer]);
        assert!(p.try_start(ip("10.0.0.1")).is_ok());
        assert!(p.try_start(ip("10.0.0.1")).is_ok());
        assert_eq!(
            p.try_start(ip("10.0.0.1")),
            Err(PendingRefused::PerSource(2))
        );
        assert!(p.try_start(ip("10.0.0.2")).is_ok());
        assert_eq!(p.try_start(ip("10.0.0.3")), Err(PendingRefused::Total(3)));
        // The peer is not refused by the total, only by its own cap.
        assert!(p.try_start(peer).is_ok());
        assert!(p.try_start(peer).is_ok());
        assert_eq!(p.try_start(peer), Err(PendingRefused::PerSource(2)));
        assert_eq!(p.non_exempt_total(), 3);
        p.finish(ip("10.0.0.1"));
        assert_eq!(p.pending_from(ip("10.0.0.1")), 1);
        assert!(p.try_start(ip("10.0.0.3")).is_ok());
        p.finish(peer);
        p.finish(peer);
        p.finish(peer); // more finishes than starts do no harm
        assert_eq!(p.pending_from(peer), 0);
        assert_eq!(p.non_exempt_total(), 3);
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
