//! Issue 11, item 3: no unauthenticated write to trust state. Real relays on loopback, real
//! keys and signatures; the attacker speaks SIP on the wire.
//!
//! - one INVITE with a made-up fingerprint (no key, no signature) must not touch
//!   `<spool>/state` at all: no file changes (bytes, mtime) and the folder's mtime stays,
//!   which shows that no write and so no fsync happened (every write and every removal
//!   creates, renames or unlinks a name in that folder);
//! - the first relay to reach B claiming an opportunistic peer's domain, from an address
//!   that is not the peer's configured one, is not pinned and delivers nothing;
//! - `sipmail trust accept DOMAIN FINGERPRINT` refuses a fingerprint that is not pending,
//!   and a bare `trust accept DOMAIN` pins nothing.

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{TwoSites, free_port, maildir_files, make_keys, sample_message, site_config};
use sipmail::handshake::sdp;
use sipmail::handshake::{AuthMode, CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use sipmail::relay::Hooks;
use sipmail::relay::trust::TrustStore;
use sipmail::sip::{Endpoint, EndpointConfig, Method, Request, Transport};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

fn opportunistic(s: String) -> String {
    s.replace("\n[delivery]", "\ntrust = \"opportunistic\"\n[delivery]")
}

/// Everything observable about a state folder: the folder's mtime, and each file's bytes
/// and mtime.
type Snapshot = (Option<SystemTime>, BTreeMap<String, (Vec<u8>, SystemTime)>);

fn snapshot(state: &Path) -> Snapshot {
    let dir_mtime = std::fs::metadata(state).and_then(|m| m.modified()).ok();
    let mut files = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(state) {
        for e in rd.flatten() {
            let p = e.path();
            let m = std::fs::metadata(&p).unwrap();
            files.insert(
                e.file_name().to_string_lossy().to_string(),
                (std::fs::read(&p).unwrap(), m.modified().unwrap()),
            );
        }
    }
    (dir_mtime, files)
}

/// An opportunistic INVITE from `mail@site-a.test` to B announcing `fingerprint` and
/// presenting `key_packet` (empty: none).
fn opp_invite(fingerprint: Vec<u8>, key_packet: Vec<u8>) -> Request {
    let caller =
        CallerAwaitAnswer::new([5; 32], [6; 32], vec![Suite::ChaCha20Poly1305], fingerprint)
            .with_auth(AuthMode::Opportunistic, key_packet);
    let mut r = Request::new(Method::Invite, "sip:mail@site-b.test");
    r.headers
        .push("From", "<sip:mail@site-a.test>;tag=evil1".to_string());
    r.headers.push("To", "<sip:mail@site-b.test>");
    r.headers.push(
        "Call-ID",
        format!("{}@attacker", sipmail::sip::random_hex(8)),
    );
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", "<sip:mail@127.0.0.1>");
    r.headers.push("Content-Type", "application/sdp");
    r.body = sdp::encode_offer(caller.offer(), 1, "127.0.0.1".parse().unwrap());
    r
}

/// (a) The one-INVITE attack. B has pinned A's key. An attacker sends INVITEs claiming
/// site-a.test with: a made-up fingerprint and no key; a made-up fingerprint and his own
/// key packet; his own key and matching fingerprint but never the ACK (so no confirm
/// signature). None of them may write anything under B's `<spool>/state`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_without_a_verified_confirm_writes_no_trust_state() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a_cfg, b_cfg) = edited_configs(dir.path(), opportunistic, opportunistic);
    let a_signing = Keyring::open(&a_cfg.keyring)
        .unwrap()
        .own_signing_key()
        .unwrap()
        .0;
    // B knows A from an earlier call.
    let b_store = TrustStore::new(&b_cfg.spool);
    assert!(b_store.pin_first_use("site-a.test", &a_signing).unwrap());
    let state = b_cfg.spool.join("state");
    let sites = TwoSites::start_with(dir.path(), a_cfg, b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    // Let start-up settle, then take the snapshot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = snapshot(&state);

    let m_kr = dir.path().join("keyring/mallory");
    Keyring::generate(&m_kr, "site-a.test").unwrap();
    let (m_fpr, m_packet) = Keyring::open(&m_kr).unwrap().own_signing_key().unwrap();
    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        EndpointConfig {
            t1: Duration::from_millis(100),
            ..EndpointConfig::default()
        },
    )
    .await
    .unwrap()
    .0;
    for (what, fpr, packet) in [
        ("made-up fingerprint, no key", vec![0x42; 20], Vec::new()),
        (
            "made-up fingerprint, someone else's key",
            vec![0x43; 20],
            m_packet.clone(),
        ),
        (
            "own key, never confirmed",
            hex::decode(&m_fpr).unwrap(),
            m_packet.clone(),
        ),
    ] {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            ep.request(opp_invite(fpr, packet), sites.b.sip_addr, Transport::Udp),
        )
        .await
        .expect("B did not answer within 10 s")
        .unwrap();
        // Whatever B answered (a refusal, or a 200 that is never ACKed), the state must
        // not have changed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            snapshot(&state),
            before,
            "{what}: B's trust state changed (answer {} {})",
            resp.status,
            resp.reason
        );
    }
    // And after the unconfirmed call gave up waiting for its ACK (32 s is too long to wait
    // here; a second look after a while still must find nothing).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(snapshot(&state), before, "B's trust state changed later");
    assert!(
        maildir_files(&sites.maildir(&sites.b_cfg)).is_empty(),
        "something was delivered"
    );
    sites.stop().await;
}

/// (b) First to reach. Mallory runs a real relay that claims site-a.test with his own key,
/// from 127.0.0.3, while B's `[[peer]]` for site-a.test says 127.0.0.1. B has never talked
/// to A. Mallory's call must not be pinned and must deliver nothing; his (verified) key is
/// only kept as pending. Then the real A calls from its configured address: pinned,
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_relay_to_reach_b_from_elsewhere_is_not_pinned() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    make_keys(dir.path()).unwrap();
    for kr in ["keyring/site-a/certs", "keyring/site-b/certs"] {
        std::fs::remove_dir_all(dir.path().join(kr)).unwrap();
    }
    let (pa, pb, pm) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let a_cfg = Config::parse(
        "a.toml",
        &opportunistic(site_config(dir.path(), "site-a", "site-b", pa, pb)),
    )
    .unwrap();
    let b_cfg = Config::parse(
        "b.toml",
        &opportunistic(site_config(dir.path(), "site-b", "site-a", pb, pa)),
    )
    .unwrap();
    // Mallory: domain site-a.test, his own key, SIP and media on 127.0.0.3.
    let m_kr = dir.path().join("keyring/mallory");
    Keyring::generate(&m_kr, "site-a.test").unwrap();
    let m_fpr = Keyring::open(&m_kr).unwrap().own_signing_key().unwrap().0;
    let m_text = opportunistic(site_config(dir.path(), "site-a", "site-b", pm, pb))
        .replace(
            &format!("listen = \"127.0.0.1:{pm}\""),
            &format!("listen = \"127.0.0.3:{pm}\""),
        )
        .replace("media = \"127.0.0.1\"", "media = \"127.0.0.3\"");
    let mut m_cfg = Config::parse("m.toml", &m_text).unwrap();
    m_cfg.keyring = m_kr;
    m_cfg.spool = dir.path().join("var/mallory/spool");
    m_cfg.delivery = sipmail::config::Delivery::Maildir(dir.path().join("var/mallory/maildir"));

    let b_store = TrustStore::new(&b_cfg.spool);
    let pending_file = b_cfg.spool.join("state/site-a.test.pin-pending");
    let b_maildir = dir.path().join("var/site-b/maildir");
    let sites = TwoSites::start_with(dir.path(), m_cfg, b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev_m = sites.a.events();
    sipmail::demo::submit(
        sites.a.smtp_addr,
        &[sample_message(1, "first-to-reach")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    // Mallory's call is set up and refused (or, before the fix, delivered).
    let _ = wait_event(&mut ev_m, 10, |e| {
        matches!(
            e,
            sipmail::relay::RelayEvent::CallFailed { .. }
                | sipmail::relay::RelayEvent::Delivered { .. }
                | sipmail::relay::RelayEvent::CallEstablished { .. }
        )
    })
    .await;
    let recorded = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&pending_file).is_ok_and(|t| t.contains(&m_fpr))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pinned = b_store
        .list()
        .unwrap()
        .into_iter()
        .find(|p| p.domain == "site-a.test")
        .and_then(|p| p.pinned);
    assert_eq!(
        pinned, None,
        "B pinned the first relay to reach it from an unconfigured address"
    );
    assert!(
        maildir_files(&b_maildir).is_empty(),
        "Mallory's mail was delivered as from site-a.test"
    );
    assert!(
        recorded,
        "Mallory's verified key is not kept as pending: {:?}",
        std::fs::read_to_string(&pending_file)
    );
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "Mallory's mail stays queued"
    );
    sites.stop().await;

    // The real A, from its configured address: pinned on first use, delivered.
    let sites = TwoSites::start_with(dir.path(), a_cfg.clone(), b_cfg, Hooks::default())
        .await
        .unwrap();
    sipmail::demo::submit(
        sites.a.smtp_addr,
        &[sample_message(2, "first-to-reach")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b_maildir).len()
            == 1)
        .await,
        "the real A's mail was not delivered"
    );
    let a_fpr = Keyring::open(&a_cfg.keyring)
        .unwrap()
        .own_signing_key()
        .unwrap()
        .0;
    assert!(
        wait_until(Duration::from_secs(5), || b_store
            .list()
            .unwrap()
            .iter()
            .any(
                |p| p.domain == "site-a.test" && p.pinned.as_deref() == Some(a_fpr.as_str())
            ))
        .await,
        "the real A was not pinned"
    );
    sites.stop().await;
}

fn sipmail(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// (c) `trust accept` pins only the fingerprint the operator names, and only if it is
/// pending. B has A's key pinned and a (genuinely presented) key G pending.
#[test]
fn trust_accept_refuses_a_fingerprint_that_is_not_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (_, b_cfg) = edited_configs(dir.path(), opportunistic, opportunistic);
    let text = opportunistic(site_config(dir.path(), "site-b", "site-a", 5999, 5998));
    let cfg_path = dir.path().join("b.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = cfg_path.to_str().unwrap();
    let pinned = "A".repeat(40);
    let pending = "B".repeat(40);
    let wrong = "C".repeat(40);
    let store = TrustStore::new(&b_cfg.spool);
    assert!(store.pin_first_use("site-a.test", &pinned).unwrap());
    // A pending key as the relay records it (one line per key; the fingerprint first).
    let state = b_cfg.spool.join("state");
    std::fs::write(
        state.join("site-a.test.pin-pending"),
        format!("{pending}\n"),
    )
    .unwrap();
    let before = snapshot(&state);

    // A fingerprint that is not pending: refused, and the message lists what is.
    let (ok, out) = sipmail(&["trust", "--config", cfg, "accept", "site-a.test", &wrong]);
    assert!(!ok, "accepted a fingerprint that is not pending: {out}");
    assert!(out.contains("not pending"), "{out}");
    assert!(
        out.contains(&sipmail::keyring::format_fingerprint(&pending)) || out.contains(&pending),
        "the refusal does not list the pending key: {out}"
    );
    assert_eq!(
        snapshot(&state),
        before,
        "the refused accept changed the state"
    );

    // Without a fingerprint: refused (it would pin whatever is pending at that moment).
    let (ok, out) = sipmail(&["trust", "--config", cfg, "accept", "site-a.test"]);
    assert!(
        !ok,
        "`trust accept DOMAIN` without a fingerprint pinned: {out}"
    );
    assert_eq!(
        snapshot(&state),
        before,
        "the bare accept changed the state"
    );

    // The pending one, named: accepted (spaces as `keys fingerprint` prints them are fine).
    let spaced = sipmail::keyring::format_fingerprint(&pending);
    let (ok, out) = sipmail(&["trust", "--config", cfg, "accept", "site-a.test", &spaced]);
    assert!(ok, "{out}");
    assert_eq!(
        store.check_pin("site-a.test", &pending).unwrap(),
        sipmail::relay::trust::PinCheck::Same
    );
}

/// The callee's side of a changed key: B has A's key pinned; A is reinstalled with a new
/// key and calls from its configured address. B completes the handshake only to verify
/// the new key's signature, records it as pending (with where and when it was seen),
/// tells A why through the call (a `554` greeting A logs), and takes no mail. After the
/// operator accepts that very fingerprint, the queued mail goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_caller_key_is_verified_kept_pending_and_refused_until_accepted() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (mut a_cfg, b_cfg) = edited_configs(dir.path(), opportunistic, opportunistic);
    let b_store = TrustStore::new(&b_cfg.spool);
    let old = Keyring::open(&a_cfg.keyring)
        .unwrap()
        .own_signing_key()
        .unwrap()
        .0;
    assert!(b_store.pin_first_use("site-a.test", &old).unwrap());
    let new_kr = dir.path().join("keyring/site-a-new");
    Keyring::generate(&new_kr, "site-a.test").unwrap();
    let new = Keyring::open(&new_kr).unwrap().own_signing_key().unwrap().0;
    a_cfg.keyring = new_kr;
    let sites = TwoSites::start_with(dir.path(), a_cfg, b_cfg.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev_a = sites.a.events();
    sipmail::demo::submit(
        sites.a.smtp_addr,
        &[sample_message(1, "changed")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let failed = wait_event(&mut ev_a, 15, |e| {
        matches!(e, sipmail::relay::RelayEvent::CallFailed { reason, .. }
            if reason.contains("554") && reason.contains("trust accept site-a.test"))
    })
    .await;
    assert!(
        failed.is_some(),
        "A was not told why (554 through the call)"
    );
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        maildir_files(&md).is_empty(),
        "mail taken from a changed key"
    );
    assert_eq!(
        b_store.check_pin("site-a.test", &old).unwrap(),
        sipmail::relay::trust::PinCheck::Same
    );
    let pending = b_store.pending("site-a.test").unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].fingerprint, new);
    assert_eq!(pending[0].from, "127.0.0.1");
    assert!(pending[0].last_seen > 0 && pending[0].count >= 1);

    let (was, now) = b_store.accept_pending("site-a.test", &new).unwrap();
    assert_eq!(
        (was.as_deref(), now.as_str()),
        (Some(old.as_str()), new.as_str())
    );
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await,
        "the queued mail did not go through after the accept"
    );
    sites.stop().await;
}
