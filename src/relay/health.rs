//! What the metrics endpoint asks the relay (crate::metrics::http::Probe): the gauges read
//! from state at each scrape (the queue per route, the keys), and `/readyz`: both
//! listeners serving, the spool taking a file (written, fsynced, renamed, removed), not
//! shutting down; and, for information, each partner's last call.

use super::context::Context;
use super::keywatch;
use crate::metrics::http::Probe;
use crate::metrics::{LastCall, Metrics};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

pub(crate) struct Health {
    pub ctx: Arc<Context>,
    pub smtp: SocketAddr,
    pub sip: SocketAddr,
}

impl Probe for Health {
    fn refresh(&self, m: &Metrics) {
        let now = SystemTime::now();
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let stats = self.ctx.queue.route_stats();
        let routes: Vec<_> = stats
            .iter()
            .map(|s| {
                let age = Duration::from_secs(now_s.saturating_sub(s.oldest_received));
                (super::outcome::route_label(&s.route), s.messages, age)
            })
            .collect();
        m.set_queue(&routes);
        keywatch::refresh(&self.ctx, now);
    }

    fn ready(&self) -> Result<String, String> {
        let mut problems = String::new();
        if self.ctx.shutdown.is_triggered() {
            problems.push_str("shutting down\n");
        }
        let up = &self.ctx.listeners;
        if !up.smtp.load(Ordering::SeqCst) {
            let _ = writeln!(problems, "the SMTP listener on {} is down", self.smtp);
        }
        if !up.sip.load(Ordering::SeqCst) {
            let _ = writeln!(problems, "the SIP listener on {} is down", self.sip);
        }
        if let Err(e) = self.ctx.spool.probe_write() {
            let _ = writeln!(problems, "the spool is not writable: {e}");
        }
        let report = partners(&self.ctx, SystemTime::now());
        if problems.is_empty() {
            Ok(format!(
                "SMTP listener {} up\nSIP listener {} up\nspool writable\n{report}",
                self.smtp, self.sip
            ))
        } else {
            Err(format!("{problems}{report}"))
        }
    }
}

/// One line per configured partner: its last call's outcome (one that came up, or one we
/// placed that failed), or none yet. A partner's trouble does not make us unready (mail
/// to it waits in the queue), it is reported.
fn partners(ctx: &Context, now: SystemTime) -> String {
    let calls = ctx.metrics.last_calls();
    let mut out = String::new();
    for p in &ctx.settings().site.peers {
        let line = match calls.get(&p.domain.to_ascii_lowercase()) {
            None => "no call yet".to_string(),
            Some(c) => last_call(c, now),
        };
        let _ = writeln!(out, "partner {}: {line}", p.domain);
    }
    out
}

fn last_call(c: &LastCall, now: SystemTime) -> String {
    let ago = now.duration_since(c.at).unwrap_or_default().as_secs();
    let outcome = match c.failure {
        None => "came up".to_string(),
        Some(f) => format!("failed ({})", f.as_str()),
    };
    format!(
        "last call ({}) {outcome}, {ago} s ago",
        c.direction.as_str()
    )
}
