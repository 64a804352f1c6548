//! Trust policies (signed, psk, opportunistic), key continuity and key rotation, between
//! two real relays on loopback. Every refusal test checks that nothing was delivered and
//! that the mail is still queued at the sender.

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::relay::trust::TrustStore;
use sipmail::relay::{Hooks, RelayEvent};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Add lines to the `[[peer]]` section of a test-bed config.
fn peer_lines(lines: &str) -> impl Fn(String) -> String + '_ {
    move |s: String| s.replace("\n[delivery]", &format!("\n{lines}\n[delivery]"))
}

fn psk_file(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!("trust = \"psk\"\npsk_file = \"{}\"", p.display())
}

async fn send(sites: &TwoSites, n: usize, run: &str) {
    submit(
        sites.a.smtp_addr,
        &[sample_message(n, run)],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
}

/// The continuity both sides report for the next call (A outgoing, B incoming).
async fn next_call(
    ev_a: &mut tokio::sync::broadcast::Receiver<RelayEvent>,
    ev_b: &mut tokio::sync::broadcast::Receiver<RelayEvent>,
) -> (String, String) {
    let get = |e: Option<RelayEvent>| match e {
        Some(RelayEvent::CallEstablished { continuity, .. }) => continuity,
        other => panic!("no call: {other:?}"),
    };
    let a = get(wait_event(ev_a, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await);
    let b = get(wait_event(ev_b, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await);
    (a, b)
}

async fn call_ended(ev: &mut tokio::sync::broadcast::Receiver<RelayEvent>) {
    assert!(
        wait_event(ev, 20, |e| matches!(e, RelayEvent::CallEnded { .. }))
            .await
            .is_some(),
        "the call did not end"
    );
}

async fn assert_refused_and_queued(sites: &TwoSites, delivered_before: usize) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        maildir_files(&sites.maildir(&sites.b_cfg)).len(),
        delivered_before,
        "something was delivered"
    );
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "the mail must stay queued at A"
    );
}

async fn wait_delivered(sites: &TwoSites, n: usize) {
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&md).len() == n).await,
        "expected {n} delivered, have {}",
        maildir_files(&md).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_peers_exchange_mail() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let key = "Jk1l0q4t0m8d2xQ3m1Zb7wq9c5nV6yR2pL8sT4uE0aI=\n";
    let (a, b) = edited_configs(
        dir.path(),
        peer_lines(&psk_file(dir.path(), "a.psk", key)),
        peer_lines(&psk_file(dir.path(), "b.psk", key)),
    );
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 1, "psk").await;
    match wait_event(&mut ev, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await
    {
        Some(RelayEvent::CallEstablished { trust, .. }) => assert_eq!(trust, "psk"),
        other => panic!("no call: {other:?}"),
    }
    wait_delivered(&sites, 1).await;
    sites.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_psk_is_refused_and_the_mail_stays_queued() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(
        dir.path(),
        peer_lines(&psk_file(
            dir.path(),
            "a.psk",
            "Jk1l0q4t0m8d2xQ3m1Zb7wq9c5nV6yR2pL8sT4uE0aI=\n",
        )),
        peer_lines(&psk_file(
            dir.path(),
            "b.psk",
            "ZZZZ0q4t0m8d2xQ3m1Zb7wq9c5nV6yR2pL8sT4uE0aI=\n",
        )),
    );
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 1, "wrong-psk").await;
    let failed = wait_event(
        &mut ev,
        20,
        |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("PSK MAC")),
    )
    .await;
    assert!(
        failed.is_some(),
        "A accepted an answer MACed with another key"
    );
    assert_refused_and_queued(&sites, 0).await;
    sites.stop().await;
}

/// A requires signatures of B, B expects a PSK from A (or the reverse): the callee refuses
/// with 488 and a Warning naming the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_mismatch_is_refused_with_488() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let psk = psk_file(
        dir.path(),
        "b.psk",
        "Jk1l0q4t0m8d2xQ3m1Zb7wq9c5nV6yR2pL8sT4uE0aI=\n",
    );
    let (a, b) = edited_configs(dir.path(), |s| s, peer_lines(&psk));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 1, "mismatch").await;
    let failed = wait_event(&mut ev, 20, |e| {
        matches!(e, RelayEvent::CallFailed { reason, .. }
            if reason.contains("488") && reason.contains("trust policy mismatch"))
    })
    .await;
    assert!(failed.is_some(), "no 488 for a policy mismatch");
    assert_refused_and_queued(&sites, 0).await;
    sites.stop().await;
}

/// Both relays require signatures; a man in the middle rewrites the INVITE's trust policy
/// to psk or opportunistic (and presents his own key), hoping the callee takes the weaker
/// one. The callee holds its configured policy: 488, nothing delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_of_the_trust_policy_on_the_wire_is_refused() {
    for weaker in ["psk", "opportunistic"] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
            if from_a && d.starts_with(b"INVITE") {
                let text = String::from_utf8_lossy(d).to_string();
                let body_start = text.find("\r\n\r\n").unwrap() + 4;
                let old_len = text.len() - body_start;
                let mut body = text[body_start..]
                    .replace("a=sipmail-auth:signed", &format!("a=sipmail-auth:{weaker}"));
                if weaker == "opportunistic" {
                    body.push_str("a=sipmail-pubkey:AAAA\r\n");
                }
                let head = text[..body_start].replace(
                    &format!("Content-Length: {old_len}\r\n"),
                    &format!("Content-Length: {}\r\n", body.len()),
                );
                *d = format!("{head}{body}").into_bytes();
            }
        });
        let sites = sites_via_sip_proxy(dir.path(), tamper).await;
        let mut ev = sites.a.events();
        send(&sites, 1, "downgrade").await;
        let failed = wait_event(&mut ev, 20, |e| {
            matches!(e, RelayEvent::CallFailed { reason, .. }
                if reason.contains("488") && reason.contains("trust policy mismatch"))
        })
        .await;
        assert!(failed.is_some(), "{weaker}: the downgrade was not refused");
        assert_refused_and_queued(&sites, 0).await;
        sites.stop().await;
    }
}

/// Opportunistic peers with no certs of each other: the first call pins each other's key
/// (and is delivered); after B's key changes, A refuses B's answers until an operator
/// accepts the new key, and then the queued mail goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_pins_on_first_use_and_refuses_a_changed_key_until_accepted() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let opp = peer_lines("trust = \"opportunistic\"");
    let (a_cfg, mut b_cfg) = edited_configs(dir.path(), &opp, &opp);
    // No partner certs at all: opportunistic needs none.
    for kr in ["keyring/site-a/certs", "keyring/site-b/certs"] {
        std::fs::remove_dir_all(dir.path().join(kr)).unwrap();
    }
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 1, "tofu").await;
    match wait_event(&mut ev, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await
    {
        Some(RelayEvent::CallEstablished {
            trust,
            peer_fingerprint,
            ..
        }) => {
            assert_eq!(trust, "opportunistic");
            let b_fpr = Keyring::open(&b_cfg.keyring)
                .unwrap()
                .own_fingerprint()
                .unwrap();
            assert_eq!(peer_fingerprint, b_fpr);
        }
        other => panic!("no call: {other:?}"),
    }
    wait_delivered(&sites, 1).await;
    let a_store = TrustStore::new(&a_cfg.spool);
    let b_store = TrustStore::new(&b_cfg.spool);
    assert!(
        wait_until(Duration::from_secs(5), || a_store
            .list()
            .unwrap()
            .first()
            .is_some_and(|p| p.pinned.is_some()))
        .await
    );
    assert!(b_store.list().unwrap()[0].pinned.is_some());
    sites.stop().await;

    // B is reinstalled with a new key (or Mallory answers for it).
    let new_kr = dir.path().join("keyring/site-b-new");
    let new_fpr = Keyring::generate(&new_kr, "site-b.test")
        .unwrap()
        .fingerprint;
    b_cfg.keyring = new_kr;
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 2, "tofu").await;
    let failed = wait_event(&mut ev, 20, |e| {
        matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("changed since first use"))
    })
    .await;
    assert!(failed.is_some(), "A accepted a changed key");
    assert_refused_and_queued(&sites, 1).await;
    let pending = a_store.list().unwrap();
    assert_eq!(pending[0].pending[0].fingerprint, new_fpr);

    // The operator checks the new fingerprint with the partner and accepts it.
    let (old, new) = a_store.accept_pending("site-b.test", &new_fpr).unwrap();
    assert_ne!(old.as_deref(), Some(new.as_str()));
    wait_delivered(&sites, 2).await;
    sites.stop().await;
}

/// Each call leaves a retained secret that the next call mixes in. When A loses its cache,
/// the next call warns on both sides (by default), still goes through, and leaves a new
/// secret both hold: the call after it matches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_secrets_carry_over_and_a_lost_cache_warns_then_recovers() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(dir.path(), |s| s, |s| s);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let (mut ev_a, mut ev_b) = (sites.a.events(), sites.b.events());
    let rs_file = sites.a_cfg.spool.join("state/site-b.test.retained");

    send(&sites, 1, "rs").await;
    assert_eq!(
        next_call(&mut ev_a, &mut ev_b).await,
        ("first-call".into(), "first-call".into())
    );
    wait_delivered(&sites, 1).await;
    call_ended(&mut ev_a).await;
    let mode = std::fs::metadata(&rs_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    send(&sites, 2, "rs").await;
    assert_eq!(
        next_call(&mut ev_a, &mut ev_b).await,
        ("matched".into(), "matched".into())
    );
    wait_delivered(&sites, 2).await;
    call_ended(&mut ev_a).await;

    // A loses its cache.
    std::fs::remove_file(&rs_file).unwrap();
    send(&sites, 3, "rs").await;
    assert_eq!(
        next_call(&mut ev_a, &mut ev_b).await,
        ("lost-local-cache".into(), "peer-has-none".into())
    );
    wait_delivered(&sites, 3).await;
    call_ended(&mut ev_a).await;

    send(&sites, 4, "rs").await;
    assert_eq!(
        next_call(&mut ev_a, &mut ev_b).await,
        ("matched".into(), "matched".into())
    );
    wait_delivered(&sites, 4).await;
    sites.stop().await;
}

/// B requires continuity with A. A caller that does not hold the secret of the last call
/// (A after losing its cache, or anyone else with A's identity but not its history) is
/// refused before any 200 OK; after the operator's `trust reset`, mail flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuity_require_refuses_until_reset() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(dir.path(), |s| s, peer_lines("continuity = \"require\""));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let (mut ev_a, mut ev_b) = (sites.a.events(), sites.b.events());
    send(&sites, 1, "require").await;
    assert_eq!(next_call(&mut ev_a, &mut ev_b).await.1, "first-call");
    wait_delivered(&sites, 1).await;
    call_ended(&mut ev_a).await;

    std::fs::remove_file(sites.a_cfg.spool.join("state/site-b.test.retained")).unwrap();
    send(&sites, 2, "require").await;
    let failed = wait_event(&mut ev_a, 20, |e| {
        matches!(e, RelayEvent::CallFailed { reason, .. }
            if reason.contains("403") && reason.contains("continuity"))
    })
    .await;
    assert!(
        failed.is_some(),
        "B did not refuse a caller without the retained secret"
    );
    assert_refused_and_queued(&sites, 1).await;

    assert!(
        TrustStore::new(&sites.b_cfg.spool)
            .reset("site-a.test")
            .unwrap()
    );
    wait_delivered(&sites, 2).await;
    sites.stop().await;
}

/// Key rotation: A adds a new key beside the old one and B imports its cert. While B holds
/// both, calls signed by either are accepted; once B removes the old cert, a call signed
/// by the old key is refused (403, mail stays queued) and the new key carries the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_accepts_both_keys_until_the_old_one_is_retired() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (mut a_cfg, b_cfg) = edited_configs(dir.path(), |s| s, |s| s);
    let old = Keyring::open(&a_cfg.keyring)
        .unwrap()
        .own_fingerprint()
        .unwrap();
    // Rotate: the old key stays where it is.
    let new = Keyring::generate_additional(&a_cfg.keyring, "site-a.test")
        .unwrap()
        .fingerprint;
    assert_ne!(old, new);
    assert!(a_cfg.keyring.join("secret.asc").exists());
    // Announce: B imports the new cert beside the old one.
    let cert = Keyring::open(&a_cfg.keyring)
        .unwrap()
        .export_public_of(&new)
        .unwrap();
    Keyring::import(&b_cfg.keyring, cert.as_bytes()).unwrap();

    let signer_of_next_call = |sites: &TwoSites| {
        let mut ev = sites.a.events();
        async move {
            match wait_event(&mut ev, 20, |e| {
                matches!(e, RelayEvent::CallEstablished { .. })
            })
            .await
            {
                Some(RelayEvent::CallEstablished {
                    local_fingerprint, ..
                }) => local_fingerprint,
                other => panic!("no call: {other:?}"),
            }
        }
    };

    // A signs with the newest key: accepted.
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let signer = signer_of_next_call(&sites);
    send(&sites, 1, "rotate").await;
    assert_eq!(signer.await, new);
    wait_delivered(&sites, 1).await;
    sites.stop().await;

    // A signs with the old key (relay.signing_key): still accepted while B holds both.
    a_cfg.signing_key = Some(old.clone());
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let signer = signer_of_next_call(&sites);
    send(&sites, 2, "rotate").await;
    assert_eq!(signer.await, old);
    wait_delivered(&sites, 2).await;
    sites.stop().await;

    // Retire: B removes the old cert. A call signed by the old key is refused.
    std::fs::remove_file(b_cfg.keyring.join(format!("certs/{old}.asc"))).unwrap();
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    send(&sites, 3, "rotate").await;
    let failed = wait_event(
        &mut ev,
        20,
        |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("403")),
    )
    .await;
    assert!(failed.is_some(), "a retired key was accepted");
    assert_refused_and_queued(&sites, 2).await;
    sites.stop().await;

    // A drops the pin and signs with the new key: the queued mail goes through.
    a_cfg.signing_key = None;
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    wait_delivered(&sites, 3).await;
    sites.stop().await;
}

/// Calls that overlap must not set off continuity alarms. A places up to 8 calls at once
/// to B (calls_per_peer = 8), in three bursts of 16 messages, each burst after the last
/// calls were hung up; B requires continuity. Every call is accepted, none reports a
/// continuity problem at either end, and all 48 messages arrive. (Before the caller set
/// up its calls to a peer one at a time, the first burst's later calls met B holding the
/// secret of the first one, "peer-has-none", and were refused; and the two caches, each
/// filled in its own order, could end up with no secret in common.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_calls_keep_both_caches_in_step() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(
        dir.path(),
        |s| {
            s.replace(
                "call_idle = \"2s\"",
                "call_idle = \"2s\"\ncalls_per_peer = 8",
            )
        },
        peer_lines("continuity = \"require\""),
    );
    let sites = Arc::new(
        TwoSites::start_with(dir.path(), a, b, Hooks::default())
            .await
            .unwrap(),
    );
    let (mut ev_a, mut ev_b) = (sites.a.events(), sites.b.events());
    let mut continuity = Vec::new();
    let mut calls = 0;
    let mut most_up = 0;
    for burst in 0..3 {
        let mut tasks = Vec::new();
        for t in 0..8 {
            let sites = sites.clone();
            tasks.push(tokio::spawn(async move {
                let msgs: Vec<_> = (0..2)
                    .map(|i| sample_message(100 * burst + 10 * t + i, "overlap"))
                    .collect();
                submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        wait_delivered(&sites, 16 * (burst + 1)).await;
        // Every call of this burst ends (call_idle) before the next burst starts.
        let mut up = 0i32;
        let quiet = wait_until(Duration::from_secs(30), || {
            while let Ok(e) = ev_a.try_recv() {
                match e {
                    RelayEvent::CallEstablished { continuity: c, .. } => {
                        up += 1;
                        calls += 1;
                        most_up = most_up.max(up);
                        continuity.push(format!("A: {c}"));
                    }
                    RelayEvent::CallEnded { .. } => up -= 1,
                    RelayEvent::CallFailed { reason, .. } => {
                        panic!("a call failed: {reason}")
                    }
                    _ => {}
                }
            }
            up == 0
        })
        .await;
        assert!(quiet, "calls of burst {burst} did not end");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    while let Ok(e) = ev_b.try_recv() {
        if let RelayEvent::CallEstablished { continuity: c, .. } = e {
            continuity.push(format!("B: {c}"));
        }
    }
    // The point of the test: several calls were up at once.
    assert!(
        most_up >= 2,
        "never two calls at once ({calls} calls in all)"
    );
    let problems: Vec<_> = continuity
        .iter()
        .filter(|c| !c.ends_with("matched") && !c.ends_with("first-call"))
        .collect();
    assert!(
        problems.is_empty(),
        "continuity problems: {problems:?} (all: {continuity:?})"
    );
    let first_calls = continuity
        .iter()
        .filter(|c| c.ends_with("first-call"))
        .count();
    assert_eq!(
        first_calls, 2,
        "only the very first call has no secret: {continuity:?}"
    );
    Arc::try_unwrap(sites).ok().unwrap().stop().await;
}
