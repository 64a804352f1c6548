//! RFC 3261 timer values (§17, Table 4) and the pure retransmission schedule
//! [`RetransmitTimer`]: an interval that starts at T1 and doubles, optionally capped,
//! with an overall deadline. No clock: every call takes `now`.

use std::time::{Duration, Instant};

/// T1, the round-trip estimate: 500 ms.
pub const T1: Duration = Duration::from_millis(500);
/// T2, the longest retransmission interval for non-INVITE requests and INVITE responses: 4 s.
pub const T2: Duration = Duration::from_secs(4);
/// T4, how long a message may stay in the network: 5 s (Timers I and K).
pub const T4: Duration = Duration::from_secs(5);

/// Timers B, F, H and J: 64*T1.
pub fn txn_timeout(t1: Duration) -> Duration {
    t1 * 64
}

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
