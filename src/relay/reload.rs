//! Reload without a restart (SIGHUP, `sipmail reload`, `sipmail keys import`): read the
//! config file and the keyring again, check them as at start, and swap them in whole.
//!
//! Live: `[[peer]]` (added, removed, changed: address, trust, psk_file, fingerprints,
//! senders, continuity), the keyring (certs imported or revoked, own keys,
//! `relay.signing_key`), `smtp.allow`, `smtp.max_message_size`, `smtp.max_recipients`,
//! `sip.call_idle`, `sip.suites`, `[queue]`, and the routing table (`[[route]]`,
//! `routing.default`, `routing.default_message`: mail accepted from then on is routed by
//! it; mail already queued keeps the route it was given). Everything else is read only at start
//! ([`restart_only_changes`]): a reload that changes it is refused, naming the setting.
//! A refused reload changes nothing; calls, SMTP sessions and jobs in progress keep the
//! snapshot they started with either way.

use super::context::Context;
use super::keys::KeyState;
use super::settings::{Settings, peer_addresses};
use crate::config::{Config, Peer, Trust};
use crate::queue::Route;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Read the config file the daemon was started with (none if it was started with a config
/// built in memory: then the one in force) and its keyring; if both are usable
/// and no restart-only setting changed, calls, sessions and jobs from now on use them.
/// Otherwise nothing changes, and the error (also logged) says why.
pub(crate) async fn reload(ctx: &Context) -> Result<String, String> {
    // Held for the whole reload so that two run one after the other; tasks never take it.
    let mut in_force = ctx.config.lock().await;
    let file = in_force.file.clone();
    let current = in_force.cfg.clone();
    let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, KeyState), String> {
        let cfg = match &file {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?,
            None => current.clone(),
        };
        let ks = KeyState::load(&cfg, Some(&current.peers)).map_err(|e| e.to_string())?;
        Ok((cfg, ks))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (new, ks) = match loaded.and_then(|(new, ks)| {
        let changed = restart_only_changes(&in_force.cfg, &new);
        if changed.is_empty() {
            Ok((new, ks))
        } else {
            Err(format!(
                "{}: {}: restart to change it",
                new.file,
                changed.join("; ")
            ))
        }
    }) {
        Ok(x) => x,
        Err(why) => {
            tracing::error!(error = %why, "reload failed, nothing changed: the config and keyring loaded before stay in force");
            return Err(format!(
                "reload refused, the config and keyring loaded before stay in force: {why}"
            ));
        }
    };
    let addrs = peer_addresses(&new).await;
    let generation = ctx.settings().generation + 1;
    let diff = peer_diff(&in_force.cfg.peers, &new.peers);
    let summary = format!(
        "{} and keyring {} reloaded: own key {}, {} partner certificate(s), {} peer(s){}; routing: {}",
        match &in_force.file {
            Some(_) => new.file.clone(),
            None => format!("{} (built in memory, not re-read)", new.file),
        },
        new.keyring.display(),
        ks.own_fpr_hex,
        ks.keyring.list().iter().filter(|k| !k.own).count(),
        new.peers.len(),
        diff.describe(),
        describe_routing(&new.routing)
    );
    ctx.keys.set(ks);
    let settings = Settings::from_config(&new, addrs, generation);
    ctx.queue
        .reconfigure(new.queue.clone(), settings.site.clone());
    ctx.settings.set(settings);
    // Newly added partners get their own label; removed ones fall back to `other`.
    ctx.metrics
        .set_peers(new.peers.iter().map(|p| p.domain.clone()));
    for domain in &diff.removed {
        let waiting = queued_for(ctx, domain);
        if waiting > 0 {
            tracing::warn!(peer = %domain, messages = waiting,
                "peer removed by reload: its queued mail stays queued, is retried on the queue's schedule and bounced after queue.max_age unless the peer is added again");
        }
    }
    tracing::info!(generation, "{summary}");
    in_force.cfg = new;
    Ok(summary)
}

/// Messages with a recipient still waiting for `domain`.
fn queued_for(ctx: &Context, domain: &str) -> usize {
    let route = Route::Peer(domain.to_string());
    ctx.queue
        .list()
        .iter()
        .filter(|e| e.pending().any(|r| r.route == route))
        .count()
}

/// The settings read only at start that differ between `old` and `new`, each as
/// "key changed from A to B". A reload is refused when any does.
pub(crate) fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key} changed from {a} to {b}"));
        }
    };
    let path = |p: &std::path::Path| p.display().to_string();
    check("relay.domain", old.domain.clone(), new.domain.clone());
    check("relay.hostname", old.hostname.clone(), new.hostname.clone());
    check("relay.keyring", path(&old.keyring), path(&new.keyring));
    check("relay.spool", path(&old.spool), path(&new.spool));
    check(
        "smtp.listen",
        old.smtp_listen.to_string(),
        new.smtp_listen.to_string(),
    );
    check(
        "sip.listen",
        old.sip_listen.to_string(),
        new.sip_listen.to_string(),
    );
    check(
        "sip.media",
        old.media_ip.to_string(),
        new.media_ip.to_string(),
    );
    // Contact, Via and the endpoint take them at start; a NAT's forwarding is set up for
    // one range, so a change is a restart anyway.
    let opt = |o: Option<String>| o.unwrap_or_else(|| "unset".to_string());
    check(
        "sip.media_ports",
        opt(old.media_ports.map(|r| r.to_string())),
        opt(new.media_ports.map(|r| r.to_string())),
    );
    check(
        "sip.advertise",
        opt(old.advertise.map(|a| a.to_string())),
        opt(new.advertise.map(|a| a.to_string())),
    );
    check(
        "sip.calls_per_peer",
        old.calls_per_peer.to_string(),
        new.calls_per_peer.to_string(),
    );
    let (a, b) = (&old.sip_limits, &new.sip_limits);
    let n = |x: usize| x.to_string();
    let f = |x: f64| x.to_string();
    let d = |x: std::time::Duration| format!("{x:?}");
    check(
        "sip.max_message_size",
        n(a.max_message_size),
        n(b.max_message_size),
    );
    check("sip.invite_rate", f(a.invite_rate), f(b.invite_rate));
    check("sip.invite_burst", f(a.invite_burst), f(b.invite_burst));
    check(
        "sip.max_pending_per_source",
        n(a.max_pending_per_source),
        n(b.max_pending_per_source),
    );
    check(
        "sip.max_pending_total",
        n(a.max_pending_total),
        n(b.max_pending_total),
    );
    check(
        "sip.max_tcp_connections",
        n(a.max_tcp_connections),
        n(b.max_tcp_connections),
    );
    check(
        "sip.max_tcp_per_source",
        n(a.max_tcp_per_source),
        n(b.max_tcp_per_source),
    );
    check("sip.tcp_idle", d(a.tcp_idle), d(b.tcp_idle));
    check("sip.tcp_half_open", d(a.tcp_half_open), d(b.tcp_half_open));
    check("delivery", delivery(&old.delivery), delivery(&new.delivery));
    check("delivery.lanes", n(old.local_lanes), n(new.local_lanes));
    // The lanes of a route are started once, with the count in force at start.
    check("routing.lanes", n(old.routing.lanes), n(new.routing.lanes));
    let audit = |c: &Option<PathBuf>| match c {
        Some(p) => format!("recording into {}", p.display()),
        None => "off".to_string(),
    };
    check("audit", audit(&old.call_records), audit(&new.call_records));
    let metrics = |m: &Option<crate::config::MetricsSection>| match m {
        Some(m) => format!("listening on {}", m.listen),
        None => "off".to_string(),
    };
    check(
        "metrics.listen",
        metrics(&old.metrics),
        metrics(&new.metrics),
    );
    out
}

fn delivery(d: &crate::config::Delivery) -> String {
    match d {
        crate::config::Delivery::Maildir(p) => format!("maildir {}", p.display()),
        crate::config::Delivery::Smtp(a) => format!("smtp {a}"),
    }
}

/// The routing table in one line, for the start and reload log lines: how many
/// `[[route]]`s and where everything else goes.
pub(crate) fn describe_routing(r: &crate::config::Routing) -> String {
    use crate::config::Target;
    let default = match &r.default {
        Target::Local => "local".to_string(),
        Target::Peer(p) => format!("peer:{p}"),
        Target::Smtp(h) => format!("smtp:{h}"),
        Target::Refuse(_) => "refuse".to_string(),
    };
    format!("{} route(s), default {default}", r.routes.len())
}

/// Which peers a reload adds, removes and changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl PeerDiff {
    fn describe(&self) -> String {
        let mut s = String::new();
        for (what, list) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !list.is_empty() {
                s.push_str(&format!("; {what}: {}", list.join(", ")));
            }
        }
        s
    }
}

pub(crate) fn peer_diff(old: &[Peer], new: &[Peer]) -> PeerDiff {
    let key = |ps: &[Peer]| -> BTreeMap<String, String> {
        ps.iter()
            .map(|p| (p.domain.to_ascii_lowercase(), peer_fingerprint(p)))
            .collect()
    };
    let (a, b) = (key(old), key(new));
    let mut diff = PeerDiff::default();
    for (d, v) in &b {
        match a.get(d) {
            None => diff.added.push(d.clone()),
            Some(w) if w != v => diff.changed.push(d.clone()),
            Some(_) => {}
        }
    }
    diff.removed = a.keys().filter(|d| !b.contains_key(*d)).cloned().collect();
    diff
}

/// Everything about a peer that a reload may change, as one comparable string. The PSK
/// enters only as a hash of it, so that this string is never a secret.
fn peer_fingerprint(p: &Peer) -> String {
    use sha2::Digest;
    let trust = match &p.trust {
        Trust::Signed => "signed".to_string(),
        Trust::Opportunistic => "opportunistic".to_string(),
        Trust::Dnssec => "dnssec".to_string(),
        Trust::Psk(k) => format!("psk {}", hex::encode(sha2::Sha256::digest(k.as_bytes()))),
    };
    format!(
        "{:?} {trust} {:?} {:?} {:?} dns={}",
        p.sip, p.continuity, p.fingerprints, p.senders, p.dns
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config: `relay` lines after the domain, the `[smtp]` and `[sip]` lines, then the
    /// rest (sections and peers).
    fn cfg(relay: &str, smtp: &str, sip: &str, rest: &str) -> Config {
        let text = format!(
            "[relay]\ndomain = \"a.test\"\nkeyring = \"k\"\n{relay}\n\
             [smtp]\nlisten = \"127.0.0.1:2525\"\n{smtp}\n\
             [sip]\nmedia = \"127.0.0.1\"\n{sip}\n{rest}"
        );
        Config::parse("t.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const SPOOL: &str = "spool = \"s\"";
    const SIP: &str = "listen = \"127.0.0.1:5060\"";
    const B: &str = "[[peer]]\ndomain = \"b.test\"\nsip = \"sip:mail@127.0.0.1:5061\"\n";
    const C: &str = "[[peer]]\ndomain = \"c.test\"\nsip = \"sip:mail@127.0.0.1:5062\"\n";

    #[test]
    fn peers_limits_and_queue_times_may_change_live() {
        let old = cfg(SPOOL, "", SIP, B);
        let new = cfg(
            SPOOL,
            "max_recipients = 5\nallow = [\"10.0.0.0/8\"]",
            &format!("{SIP}\ncall_idle = \"9s\""),
            &format!("[queue]\nretry_initial = \"7s\"\n{C}senders = [\"x.test\"]\n"),
        );
        assert_eq!(restart_only_changes(&old, &new), Vec::<String>::new());
    }

    #[test]
    fn the_routing_table_may_change_live_but_its_lanes_need_a_restart() {
        let old = cfg(SPOOL, "", SIP, B);
        let routes = "[routing]\ndefault = \"smtp:[mx.test]:2525\"\n\
                      [[route]]\ndomain = \".x.test\"\nvia = \"refuse\"\n";
        let new = cfg(SPOOL, "", SIP, &format!("{routes}{B}"));
        assert_eq!(restart_only_changes(&old, &new), Vec::<String>::new());
        assert_eq!(
            describe_routing(&new.routing),
            "1 route(s), default smtp:[mx.test]:2525"
        );
        let lanes = cfg(SPOOL, "", SIP, &format!("[routing]\nlanes = 9\n{B}"));
        assert_eq!(
            restart_only_changes(&old, &lanes),
            ["routing.lanes changed from 4 to 9"]
        );
    }

    #[test]
    fn listeners_spool_domain_and_sip_limits_need_a_restart() {
        let old = cfg(SPOOL, "", SIP, B);
        let new = Config::parse(
            "t.toml",
            &format!(
                "[relay]\ndomain = \"z.test\"\nkeyring = \"k\"\nspool = \"s2\"\n\
                 [smtp]\nlisten = \"127.0.0.1:2526\"\n\
                 [sip]\nlisten = \"127.0.0.1:5070\"\nmedia = \"127.0.0.1\"\ninvite_rate = 3\n\
                 media_ports = \"40000-40100\"\nadvertise = \"203.0.113.5\"\n{B}"
            ),
        )
        .unwrap();
        let got = restart_only_changes(&old, &new);
        for key in [
            "relay.domain changed from a.test to z.test",
            "relay.spool changed from s to s2",
            "smtp.listen changed from 127.0.0.1:2525 to 127.0.0.1:2526",
            "sip.listen changed from 127.0.0.1:5060 to 127.0.0.1:5070",
            "sip.invite_rate changed",
            "sip.media_ports changed from unset to 40000-40100",
            "sip.advertise changed from unset to 203.0.113.5",
            // The spool moved, so did the default Maildir under it.
            "delivery changed",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(key)),
                "{key} not in {got:?}"
            );
        }
    }

    #[test]
    fn the_peer_diff_names_added_removed_and_changed_peers() {
        let old = cfg(SPOOL, "", SIP, &format!("{B}{C}"));
        let b2 = B.replace("5061", "5099");
        let d_peer = "[[peer]]\ndomain = \"d.test\"\nsip = \"sip:mail@127.0.0.1:5063\"\n";
        let new = cfg(SPOOL, "", SIP, &format!("{b2}{d_peer}"));
        let d = peer_diff(&old.peers, &new.peers);
        assert_eq!(d.added, ["d.test"]);
        assert_eq!(d.removed, ["c.test"]);
        assert_eq!(d.changed, ["b.test"]);
        assert_eq!(peer_diff(&old.peers, &old.peers), PeerDiff::default());
    }
}
