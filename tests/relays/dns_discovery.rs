//! Partners found in DNS (issue 13, items 1 and 2), against a real authoritative server
//! (Knot) and a real validating resolver (unbound) on 127.0.42.0/24 (see dns_fixture):
//! site A has no [[peer]] for site B, finds B's relay (SRV) and key (OPENPGPKEY) in
//! DNSSEC-signed DNS and delivers; every bad answer (bogus, insecure, missing, a key for
//! another domain, SRV targets that are A itself, a resolver that never answers) leaves
//! the mail queued (deferred, not bounced) with a call failure that says why; a changed
//! key is refused (and alerts) until the old key certified it or an operator accepts it.
//!
//! Each test has its own addresses: 127.0.42.(10*i + 1..4).

use crate::common::*;
use crate::dns_fixture::*;
use sipmail::config::Config;
use sipmail::demo::{maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::relay::{self, Hooks, RelayEvent, Running, Shutdown};
use std::path::Path;
use std::time::Duration;

/// One relay of the test bed: `me` ("site-a"), at 127.0.42.(base+n), asking the
/// fixture's resolver, discovering `discover` (TOML list body, e.g. `"site-b.test"`).
fn relay_config(dir: &Path, me: &str, base: u8, n: u8, resolver: &str, extra: &str) -> String {
    format!(
        r#"[relay]
domain = "{me}.test"
keyring = "{kr}"
spool = "{sp}"
[smtp]
listen = "127.0.0.1:0"
allow = ["127.0.0.0/8"]
[sip]
listen = "{ip}:{SIP_PORT}"
media = "{ip}"
call_idle = "2s"
[delivery]
maildir = "{md}"
[queue]
retry_initial = "1s"
retry_max = "2s"
[dns]
resolver = "{resolver}"
timeout = "2s"
{extra}
"#,
        ip = ip(base, n),
        kr = dir.join(format!("keyring/{me}")).display(),
        sp = dir.join(format!("var/{me}/spool")).display(),
        md = dir.join(format!("var/{me}/maildir")).display(),
    )
}

fn keyring(dir: &Path, me: &str) -> Vec<u8> {
    let kr = dir.join(format!("keyring/{me}"));
    if !kr.join("secret.asc").exists() {
        Keyring::generate(&kr, &format!("{me}.test")).unwrap();
    }
    Keyring::open(&kr).unwrap().export_public_binary().unwrap()
}

/// The zone of a site: its relay at 127.0.42.(base+n) by SRV, and `key` as OPENPGPKEY.
fn site_zone(name: &str, base: u8, n: u8, key: Option<&[u8]>) -> Zone {
    let mut records = vec![
        srv_line(10, 10, SIP_PORT, "relay"),
        format!("relay IN A {}", ip(base, n)),
    ];
    if let Some(k) = key {
        records.push(openpgpkey_line(k));
    }
    Zone::signed(name, records)
}

struct Site {
    running: Running,
    shutdown: Shutdown,
    cfg: Config,
    events: tokio::sync::broadcast::Receiver<RelayEvent>,
}

async fn start(name: &str, text: &str) -> Site {
    let cfg = Config::parse(name, text).unwrap();
    let shutdown = Shutdown::new();
    let running = relay::start(cfg.clone(), shutdown.clone(), Hooks::default())
        .await
        .unwrap();
    let events = running.events();
    Site {
        running,
        shutdown,
        cfg,
        events,
    }
}

impl Site {
    async fn stop(self) {
        self.shutdown.trigger();
        self.running.wait().await;
    }
    fn maildir(&self) -> std::path::PathBuf {
        match &self.cfg.delivery {
            sipmail::config::Delivery::Maildir(m) => m.clone(),
            _ => unreachable!(),
        }
    }
}

async fn send(a: &Site, i: usize) {
    submit(
        a.running.smtp_addr,
        &[sample_message(i, "dns")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
}

/// The next call failure at `site` (its reason is the log line's `reason`).
async fn next_failure(site: &mut Site) -> String {
    match wait_event(&mut site.events, 20, |e| {
        matches!(
            e,
            RelayEvent::CallFailed { .. } | RelayEvent::CallEstablished { .. }
        )
    })
    .await
    {
        Some(RelayEvent::CallFailed { reason, .. }) => reason,
        other => panic!("expected a failed call, got {other:?}"),
    }
}

/// Nothing delivered at B's maildir `b_maildir`, nothing bounced back to A, the mail
/// still in A's queue.
async fn assert_deferred(a: &Site, b_maildir: &Path) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        maildir_files(b_maildir).is_empty(),
        "something was delivered"
    );
    assert!(maildir_files(&a.maildir()).is_empty(), "a bounce came back");
    assert_eq!(
        a.running.queue_snapshot().messages,
        1,
        "the mail must stay queued"
    );
}

/// Done means: A has no [[peer]] for B and delivers through DNS; with B's zone signature
/// broken, nothing more is delivered, the mail stays queued and the failure says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_found_in_dnssec_signed_dns_gets_the_mail_and_a_broken_signature_stops_it() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = 10;
    let (ka, kb) = (keyring(dir, "site-a"), keyring(dir, "site-b"));
    let zones = |tamper: Edit| {
        let mut b = site_zone("site-b.test", base, 4, Some(&kb));
        b.tamper = tamper;
        vec![site_zone("site-a.test", base, 3, Some(&ka)), b]
    };
    let mut dns = DnsFixture::start(dir, base, &zones(Edit::None));
    // The resolver really validates: AD on B's records.
    let dig = dns.dig("SRV", "_sipmail._udp.site-b.test");
    assert!(dig.contains(" ad;") || dig.contains(" ad "), "{dig}");
    let res = dns.resolver.to_string();
    let a_text = relay_config(
        dir,
        "site-a",
        base,
        3,
        &res,
        "[discovery]\ndomains = [\"site-b.test\"]",
    );
    assert!(!a_text.contains("[[peer]]"));
    let b_text = relay_config(
        dir,
        "site-b",
        base,
        4,
        &res,
        "[discovery]\ndomains = [\"site-a.test\"]",
    );
    let b = start("b.toml", &b_text).await;
    let a = start("a.toml", &a_text).await;
    let mut a_events = a.running.events();
    send(&a, 0).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b.maildir())
            .len()
            == 1)
        .await,
        "not delivered through DNS discovery: {:?}",
        wait_call_outcome(&mut a_events, 1).await
    );
    assert!(
        wait_until(Duration::from_secs(5), || a
            .running
            .queue_snapshot()
            .messages
            == 0)
        .await
    );
    // Both pinned what DNS said.
    let pin_b =
        std::fs::read_to_string(dir.join("var/site-a/spool/state/site-b.test.pin")).unwrap();
    let kb_fpr = sipmail::keyring::DiscoveredCert::parse(&kb, "site-b.test").unwrap();
    assert_eq!(pin_b.trim(), kb_fpr.fingerprint());
    assert!(dir.join("var/site-b/spool/state/site-a.test.pin").exists());

    // B's zone with a record changed after signing: bogus.
    a.stop().await;
    dns.serve(&zones(Edit::Srv));
    let dig = dns.dig("SRV", "_sipmail._udp.site-b.test");
    assert!(dig.contains("SERVFAIL"), "{dig}");
    let mut a = start("a.toml", &a_text).await;
    send(&a, 1).await;
    let why = next_failure(&mut a).await;
    assert!(
        why.contains("DNSSEC-bogus") && why.contains("_sipmail._udp.site-b.test"),
        "{why}"
    );
    assert_eq!(
        maildir_files(&b.maildir()).len(),
        1,
        "delivered despite a bogus answer"
    );
    assert!(maildir_files(&a.maildir()).is_empty(), "a bounce came back");
    assert_eq!(
        a.running.queue_snapshot().messages,
        1,
        "the mail must stay queued"
    );
    a.stop().await;
    b.stop().await;
}

/// Site A alone (B's zone as given, B's relay not running), discovering site-b.test:
/// one message sent; returns the call failure's reason after checking that the mail is
/// deferred (queued, nothing delivered, no bounce).
async fn bad_input(
    base: u8,
    b_zone: impl FnOnce(&[u8], &[u8]) -> Zone,
    resolver: Option<&str>,
) -> String {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ka, kb) = (keyring(dir, "site-a"), keyring(dir, "site-b"));
    let zones = vec![
        site_zone("site-a.test", base, 3, Some(&ka)),
        b_zone(&ka, &kb),
    ];
    let dns = DnsFixture::start(dir, base, &zones);
    let res = resolver
        .map(str::to_string)
        .unwrap_or(dns.resolver.to_string());
    let a_text = relay_config(
        dir,
        "site-a",
        base,
        3,
        &res,
        "[discovery]\ndomains = [\"site-b.test\"]",
    );
    let mut a = start("a.toml", &a_text).await;
    send(&a, 0).await;
    let why = next_failure(&mut a).await;
    assert_deferred(&a, &dir.join("var/site-b/maildir")).await;
    // Retried on the queue's schedule, with the same reason: still deferred.
    let again = next_failure(&mut a).await;
    assert_eq!(again, why);
    assert_deferred(&a, &dir.join("var/site-b/maildir")).await;
    a.stop().await;
    drop(dns);
    why
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_key_record_is_refused_and_the_mail_waits() {
    let why = bad_input(
        20,
        |_, kb| {
            let mut z = site_zone("site-b.test", 20, 4, Some(kb));
            z.tamper = Edit::Key;
            z
        },
        None,
    )
    .await;
    assert!(
        why.contains("DNSSEC-bogus") && why.contains("_openpgpkey.site-b.test"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_answer_is_never_trusted() {
    let why = bad_input(
        30,
        |_, kb| {
            let mut z = site_zone("site-b.test", 30, 4, Some(kb));
            z.signed = false;
            z
        },
        None,
    )
    .await;
    assert!(
        why.contains("not DNSSEC-secure") && why.contains("mail@site-b.test"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_record_defers() {
    let why = bad_input(40, |_, _| site_zone("site-b.test", 40, 4, None), None).await;
    assert!(
        why.contains("no OPENPGPKEY record for mail@site-b.test"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_for_another_domain_is_refused() {
    // B's zone publishes A's key (user ID mail@site-a.test): securely signed, wrong identity.
    let why = bad_input(50, |ka, _| site_zone("site-b.test", 50, 4, Some(ka)), None).await;
    assert!(
        why.contains("not valid for mail@site-b.test") && why.contains("mail@site-a.test"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_targets_that_are_ourselves_are_refused() {
    // Both SRV targets of B resolve to A's own SIP address: calling them would loop.
    let why = bad_input(
        60,
        |_, kb| {
            Zone::signed(
                "site-b.test",
                vec![
                    srv_line(10, 10, SIP_PORT, "relay"),
                    srv_line(20, 10, SIP_PORT, "backup.site-b.test."),
                    format!("relay IN A {}", ip(60, 3)),
                    format!("backup IN A {}", ip(60, 3)),
                    openpgpkey_line(kb),
                ],
            )
        },
        None,
    )
    .await;
    assert!(
        why.contains("points at this relay itself")
            && why.contains("relay.site-b.test")
            && why.contains("backup.site-b.test"),
        "{why}"
    );
}

/// SRV targets that loop: B's SRV target is an alias (RFC 2782 forbids that) in a circle
/// of CNAMEs. The lookup ends (the resolver stops the chase) with no address, the mail
/// waits, and the reason names the looping target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_targets_in_a_cname_loop_defer_with_the_reason() {
    let why = bad_input(
        160,
        |_, kb| {
            Zone::signed(
                "site-b.test",
                vec![
                    srv_line(10, 10, SIP_PORT, "relay"),
                    "relay IN CNAME loop".to_string(),
                    "loop IN CNAME relay".to_string(),
                    openpgpkey_line(kb),
                ],
            )
        },
        None,
    )
    .await;
    assert!(
        why.contains("SERVFAIL for relay.site-b.test") && why.contains("aliases that loop"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_never_answers_times_out_and_the_mail_waits() {
    // A UDP socket that reads nothing and answers nothing, as the resolver.
    let silent = std::net::UdpSocket::bind(format!("{}:{DNS_PORT}", ip(70, 9))).unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let why = bad_input(
        70,
        |_, kb| site_zone("site-b.test", 70, 4, Some(kb)),
        Some(&addr),
    )
    .await;
    assert!(
        why.contains("no answer from the resolver") && why.contains(&addr),
        "{why}"
    );
    // Bounded: two attempts of one 2 s question each, plus the queue's retry.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// The `[[peer]]` blocks of the opportunistic tests: A's for site-b.test (located by
/// SRV, `trust = "opportunistic"`), and B's for site-a.test at A's address (.3).
fn opportunistic_peers(base: u8) -> (&'static str, String) {
    (
        "[[peer]]\ndomain = \"site-b.test\"\nsip = \"dns\"\ntrust = \"opportunistic\"",
        format!(
            "[[peer]]\ndomain = \"site-a.test\"\nsip = \"sip:mail@{}:{SIP_PORT}\"\ntrust = \"opportunistic\"",
            ip(base, 3)
        ),
    )
}

/// A's trust state pins the real B's key (keyring/site-b) for site-b.test.
fn assert_b_pinned(dir: &Path, store: &sipmail::relay::trust::TrustStore) {
    let b_fpr = Keyring::open(&dir.join("keyring/site-b"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    let state = store.list().unwrap();
    assert!(
        state
            .iter()
            .any(|p| p.domain == "site-b.test" && p.pinned.as_deref() == Some(b_fpr.as_str())),
        "B's key is not pinned at A: {state:?}"
    );
}

/// The attack on opportunistic trust through DNS: A's `[[peer]]` for site-b.test says
/// `sip = "dns"` and `trust = "opportunistic"` (pin the first key seen), and B's zone is
/// not signed. Mallory, who can forge (or owns) that insecure answer, points B's SRV at
/// his own relay, which holds its own key for site-b.test. A's first call reaches him and
/// his signatures verify (with the key he presents): before the fix, A pinned Mallory's
/// key and handed him the mail. Now an address from an insecure answer cannot vouch for a
/// first key: nothing is pinned, nothing reaches Mallory, the mail stays queued, and his
/// key waits as pending for an operator who compares fingerprints. Then B signs its zone
/// and points the SRV at the real B: the first use pins B's key and the mail goes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opportunistic_partner_located_by_insecure_srv_is_not_pinned_on_first_use() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = 140;
    keyring(dir, "site-a");
    keyring(dir, "site-b");
    let mallory_kr = dir.join("keyring/mallory");
    let mallory_fpr = Keyring::generate(&mallory_kr, "site-b.test")
        .unwrap()
        .fingerprint;
    let b_zone = |n: u8, signed: bool| Zone {
        signed,
        ..site_zone("site-b.test", base, n, None)
    };
    // B's unsigned zone, its SRV pointing at Mallory's relay (at .5).
    let mut dns = DnsFixture::start(dir, base, &[b_zone(5, false)]);
    let res = dns.resolver.to_string();
    let (a_peer, b_peer) = opportunistic_peers(base);
    let a_text = relay_config(dir, "site-a", base, 3, &res, a_peer);
    let m_text = relay_config(dir, "site-b", base, 5, &res, &b_peer)
        .replace("keyring/site-b", "keyring/mallory")
        .replace("var/site-b", "var/mallory");
    let mallory = start("m.toml", &m_text).await;
    let mut a = start("a.toml", &a_text).await;
    send(&a, 0).await;
    let why = next_failure(&mut a).await;
    assert!(
        why.contains("not DNSSEC-secure")
            && why.contains("not pinned on first use")
            && why.contains(&mallory_fpr)
            && why.contains("sipmail trust accept site-b.test"),
        "{why}"
    );
    assert_deferred(&a, &mallory.maildir()).await;
    let store = sipmail::relay::trust::TrustStore::new(&dir.join("var/site-a/spool"));
    let state = store.list().unwrap();
    assert!(
        state.iter().all(|p| p.pinned.is_none()),
        "a key was pinned: {state:?}"
    );
    assert!(
        state
            .iter()
            .any(|p| p.pending.iter().any(|k| k.fingerprint == mallory_fpr)),
        "Mallory's key is not pending for the operator: {state:?}"
    );
    mallory.stop().await;
    a.stop().await;

    // B signs its zone and points the SRV at its real relay (at .4).
    dns.serve(&[b_zone(4, true)]);
    let b_text = relay_config(dir, "site-b", base, 4, &res, &b_peer);
    let b = start("b.toml", &b_text).await;
    let mut a = start("a.toml", &a_text).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b.maildir())
            .len()
            == 1)
        .await,
        "not delivered to the real B: {:?}",
        wait_call_outcome(&mut a.events, 1).await
    );
    assert_b_pinned(dir, &store);
    a.stop().await;
    b.stop().await;
}

/// The other direction: B, an opportunistic `sip = "dns"` peer of A, calls A first. A
/// pins a first key from an incoming call only when it comes from one of the peer's
/// addresses, here the relays B's SRV locates, and only when those answers are
/// DNSSEC-secure: with B's zone unsigned, A holds B's call (the mail waits at B, nothing
/// pinned); with it signed, A (restarted: peer addresses are looked up at start and
/// reload) takes the call, pins B's key and gets the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_first_call_pins_only_from_a_relay_located_by_secure_srv() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = 150;
    keyring(dir, "site-a");
    keyring(dir, "site-b");
    let b_zone = |signed: bool| Zone {
        signed,
        ..site_zone("site-b.test", base, 4, None)
    };
    let mut dns = DnsFixture::start(dir, base, &[b_zone(false)]);
    let res = dns.resolver.to_string();
    let (a_peer, b_peer) = opportunistic_peers(base);
    let a_text = relay_config(dir, "site-a", base, 3, &res, a_peer);
    let b_text = relay_config(dir, "site-b", base, 4, &res, &b_peer);
    let a = start("a.toml", &a_text).await;
    let b = start("b.toml", &b_text).await;
    submit(
        b.running.smtp_addr,
        &[sample_message(0, "incoming")],
        "alice@site-a.test",
        |_| {},
    )
    .await
    .unwrap();
    // B calls (and retries) while A holds its calls.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        maildir_files(&a.maildir()).is_empty(),
        "A took a first call from a relay located by insecure SRV"
    );
    assert_eq!(
        b.running.queue_snapshot().messages,
        1,
        "the mail must wait at B"
    );
    let store = sipmail::relay::trust::TrustStore::new(&dir.join("var/site-a/spool"));
    assert!(
        store.list().unwrap().iter().all(|p| p.pinned.is_none()),
        "A pinned a key"
    );
    a.stop().await;

    dns.serve(&[b_zone(true)]);
    let a = start("a.toml", &a_text).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&a.maildir())
            .len()
            == 1)
        .await,
        "A did not take B's first call from its DNSSEC-located relay"
    );
    assert_b_pinned(dir, &store);
    a.stop().await;
    b.stop().await;
}

/// Without DNSSEC, discovery falls back to the operator's policy, never to trusting DNS.
/// B's zone is unsigned; A discovers site-b.test with `[discovery] insecure = "pending"`.
/// The first call finds B's key in an insecure answer: refused, the mail waits, the key is
/// kept as pending (nothing pinned). The operator checks the fingerprint with B and runs
/// `sipmail trust accept`: from then on the insecure answer holding that key is used,
/// and the mail goes. (With the default `insecure = "refuse"`, see
/// `an_insecure_answer_is_never_trusted`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_partner_zone_falls_back_to_pending_keys_the_operator_accepts() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = 170;
    let (ka, kb) = (keyring(dir, "site-a"), keyring(dir, "site-b"));
    let b_zone = Zone {
        signed: false,
        ..site_zone("site-b.test", base, 4, Some(&kb))
    };
    let dns = DnsFixture::start(
        dir,
        base,
        &[site_zone("site-a.test", base, 3, Some(&ka)), b_zone],
    );
    let res = dns.resolver.to_string();
    let a_text = relay_config(
        dir,
        "site-a",
        base,
        3,
        &res,
        "[discovery]\ndomains = [\"site-b.test\"]\ninsecure = \"pending\"",
    );
    let b_text = relay_config(
        dir,
        "site-b",
        base,
        4,
        &res,
        "[discovery]\ndomains = [\"site-a.test\"]",
    );
    let b = start("b.toml", &b_text).await;
    let mut a = start("a.toml", &a_text).await;
    send(&a, 0).await;
    let why = next_failure(&mut a).await;
    let b_fpr = sipmail::keyring::DiscoveredCert::parse(&kb, "site-b.test")
        .unwrap()
        .fingerprint()
        .to_string();
    assert!(
        why.contains("not DNSSEC-secure")
            && why.contains(&b_fpr)
            && why.contains("kept as pending"),
        "{why}"
    );
    assert_deferred(&a, &b.maildir()).await;
    let store = sipmail::relay::trust::TrustStore::new(&dir.join("var/site-a/spool"));
    let pending = store.pending("site-b.test").unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].fingerprint, b_fpr);
    assert!(store.list().unwrap().iter().all(|p| p.pinned.is_none()));
    // The operator's command, on A's config.
    let a_toml = dir.join("a.toml");
    std::fs::write(&a_toml, &a_text).unwrap();
    let out = sipmail_cli(&[
        "trust".as_ref(),
        "accept".as_ref(),
        "--config".as_ref(),
        a_toml.as_os_str(),
        "site-b.test".as_ref(),
        b_fpr.as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b.maildir())
            .len()
            == 1)
        .await,
        "not delivered after trust accept: {:?}",
        wait_call_outcome(&mut a.events, 1).await
    );
    a.stop().await;
    b.stop().await;
}

/// The text of A's `/metrics`.
async fn metrics_text(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A pinned B's key from DNS and delivered; B's zone then publishes B's new key (B signs
/// with it; `certify`: the old key certified the new one), and a second message is sent.
struct Rotation {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    a: Site,
    b: Site,
    _dns: DnsFixture,
    new_fpr: String,
}

async fn rotate(base: u8, certify: bool) -> Rotation {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (ka, kb) = (keyring(&dir, "site-a"), keyring(&dir, "site-b"));
    let zones = |kb: &[u8]| {
        vec![
            site_zone("site-a.test", base, 3, Some(&ka)),
            site_zone("site-b.test", base, 4, Some(kb)),
        ]
    };
    let mut dns = DnsFixture::start(&dir, base, &zones(&kb));
    let res = dns.resolver.to_string();
    let a_text = relay_config(
        &dir,
        "site-a",
        base,
        3,
        &res,
        &format!(
            "[discovery]\ndomains = [\"site-b.test\"]\n[metrics]\nlisten = \"{}:42090\"",
            ip(base, 3)
        ),
    );
    let b_text = relay_config(
        &dir,
        "site-b",
        base,
        4,
        &res,
        "[discovery]\ndomains = [\"site-a.test\"]",
    );
    let b = start("b.toml", &b_text).await;
    let a = start("a.toml", &a_text).await;
    send(&a, 0).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b.maildir())
            .len()
            == 1)
        .await,
        "the first message (before the rotation) was not delivered"
    );
    b.stop().await;
    let (new_key, b_text) = if certify {
        // The operator's rotation in place: a new key beside the old one, and the
        // OPENPGPKEY record `sipmail keys publish` prints for it (the old key certifies
        // the new one there).
        let run = |args: &[&std::ffi::OsStr]| {
            let out = sipmail_cli(args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let kr = dir.join("keyring/site-b");
        run(&[
            "keys".as_ref(),
            "generate".as_ref(),
            "--rotate".as_ref(),
            "--domain".as_ref(),
            "site-b.test".as_ref(),
            "--keyring".as_ref(),
            kr.as_os_str(),
        ]);
        let b_toml = dir.join("b.toml");
        std::fs::write(&b_toml, &b_text).unwrap();
        let text = run(&[
            "keys".as_ref(),
            "publish".as_ref(),
            "--config".as_ref(),
            b_toml.as_os_str(),
        ]);
        assert!(
            text.contains("certified by this relay's previous key"),
            "{text}"
        );
        let rdata = text
            .lines()
            .find(|l| l.contains(" IN OPENPGPKEY "))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap();
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(rdata)
            .unwrap();
        (key, b_text)
    } else {
        // A new key from elsewhere (a new keyring), that the old one never certified.
        let new_dir = dir.join("keyring/site-b-new");
        Keyring::generate(&new_dir, "site-b.test").unwrap();
        let key = Keyring::open(&new_dir)
            .unwrap()
            .export_public_binary()
            .unwrap();
        let b_text = b_text.replace("keyring/site-b\"", "keyring/site-b-new\"");
        assert!(b_text.contains("site-b-new"));
        (key, b_text)
    };
    let new_fpr = sipmail::keyring::DiscoveredCert::parse(&new_key, "site-b.test")
        .unwrap()
        .fingerprint()
        .to_string();
    dns.serve(&zones(&new_key));
    let b = start("b.toml", &b_text).await;
    // A's idle call to the old B is gone (call_idle 2s): the next message places a call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut a = a;
    a.events = a.running.events();
    send(&a, 1).await;
    Rotation {
        _tmp: tmp,
        dir,
        a,
        b,
        _dns: dns,
        new_fpr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_in_dns_is_refused_with_an_alert_until_an_operator_accepts_it() {
    let mut r = rotate(80, false).await;
    let why = next_failure(&mut r.a).await;
    assert!(
        why.contains("changed")
            && why.contains(&r.new_fpr)
            && why.contains("sipmail trust accept site-b.test"),
        "{why}"
    );
    assert_eq!(
        maildir_files(&r.b.maildir()).len(),
        1,
        "delivered with a changed key"
    );
    assert_eq!(r.a.running.queue_snapshot().messages, 1);
    let m = metrics_text(r.a.running.metrics_addr.unwrap()).await;
    assert!(m.contains("reason=\"key_changed\""), "{m}");
    // The refused key waits for the operator, with where it came from.
    let store = sipmail::relay::trust::TrustStore::new(&r.dir.join("var/site-a/spool"));
    let pending = store.pending("site-b.test").unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].fingerprint, r.new_fpr);
    assert_eq!(pending[0].from, "dns");
    // `sipmail trust accept site-b.test FPR`, the real command, on A's spool.
    let a_toml = r.dir.join("a.toml");
    std::fs::write(
        &a_toml,
        relay_config(
            &r.dir,
            "site-a",
            80,
            3,
            &r.a.cfg.dns.as_ref().unwrap().resolver.to_string(),
            "[discovery]\ndomains = [\"site-b.test\"]",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(["trust", "accept", "--config"])
        .arg(&a_toml)
        .args(["site-b.test", &r.new_fpr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(["trust", "list", "--config"])
        .arg(&a_toml)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("site-b.test  trust=dnssec (discovered)")
            && list.contains(&sipmail::keyring::format_fingerprint(&r.new_fpr)),
        "{list}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&r.b.maildir())
            .len()
            == 2)
        .await,
        "not delivered after trust accept"
    );
    r.a.stop().await;
    r.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_certified_by_the_pinned_one_is_taken_and_pinned() {
    let r = rotate(90, true).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&r.b.maildir())
            .len()
            == 2)
        .await,
        "the certified new key was not accepted"
    );
    let pin =
        std::fs::read_to_string(r.dir.join("var/site-a/spool/state/site-b.test.pin")).unwrap();
    assert_eq!(pin.trim(), r.new_fpr);
    r.a.stop().await;
    r.b.stop().await;
}

/// `sipmail keys publish` prints records a real zone takes as they are; `sipmail discover`
/// then shows B's relay and trusts its key (exit 0), and refuses an unsigned zone (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_records_serve_as_they_are_and_discover_explains_the_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = 100;
    keyring(dir, "site-a");
    keyring(dir, "site-b");
    let exe = env!("CARGO_BIN_EXE_sipmail");
    let b_toml = dir.join("b.toml");
    let a_toml = dir.join("a.toml");
    let res = format!("{}:{DNS_PORT}", ip(base, 2));
    std::fs::write(&b_toml, relay_config(dir, "site-b", base, 4, &res, "")).unwrap();
    std::fs::write(
        &a_toml,
        relay_config(
            dir,
            "site-a",
            base,
            3,
            &res,
            "[discovery]\ndomains = [\"site-b.test\"]",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "keys",
            "publish",
            "--target",
            "relay.site-b.test",
            "--ttl",
            "60",
            "--config",
        ])
        .arg(&b_toml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("_sipmail._udp.site-b.test. 60 IN SRV 10 10 42060 relay.site-b.test."),
        "{text}"
    );
    assert!(
        text.contains("._openpgpkey.site-b.test. 60 IN OPENPGPKEY "),
        "{text}"
    );
    let mut records: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    records.push(format!("relay IN A {}", ip(base, 4)));
    let discover = |zone: Zone| {
        let _dns = DnsFixture::start(dir, base, &[zone]);
        let out = std::process::Command::new(exe)
            .args(["discover", "site-b.test", "--config"])
            .arg(&a_toml)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, text) = discover(Zone::signed("site-b.test", records.clone()));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("-> {}:{SIP_PORT} UDP", ip(base, 4))),
        "{text}"
    );
    assert!(
        text.contains("TRUSTED (first use: it would be pinned)"),
        "{text}"
    );
    assert!(text.contains("DNSSEC-secure"), "{text}");
    // Nothing was pinned by looking.
    assert!(!dir.join("var/site-a/spool/state/site-b.test.pin").exists());
    let mut unsigned = Zone::signed("site-b.test", records);
    unsigned.signed = false;
    let (code, text) = discover(unsigned);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("NOT TRUSTED") && text.contains("not DNSSEC-secure"),
        "{text}"
    );
    assert!(text.contains("stays queued"), "{text}");
}
