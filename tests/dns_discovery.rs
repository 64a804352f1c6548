//! Partners found in DNS (issue 13, items 1 and 2), against a real authoritative server
//! (Knot) and a real validating resolver (unbound) on 127.0.42.0/24 (see dns_fixture):
//! site A has no [[peer]] for site B, finds B's relay (SRV) and key (OPENPGPKEY) in
//! DNSSEC-signed DNS and delivers; every bad answer (bogus, insecure, missing, a key for
//! another domain, SRV targets that are A itself, a resolver that never answers) leaves
//! the mail queued (deferred, not bounced) with a call failure that says why; a changed
//! key is refused (and alerts) until the old key certified it or an operator accepts it.
//!
//! Each test has its own addresses: 127.0.42.(10*i + 1..4).

mod common;
mod dns_fixture;

use common::*;
use dns_fixture::*;
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
    assert!(maildir_files(b_maildir).is_empty(), "something was delivered");
    assert!(maildir_files(&a.maildir()).is_empty(), "a bounce came back");
    assert_eq!(a.running.queue_snapshot().messages, 1, "the mail must stay queued");
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
    let a_text = relay_config(dir, "site-a", base, 3, &res, "[discovery]\ndomains = [\"site-b.test\"]");
    assert!(!a_text.contains("[[peer]]"));
    let b_text = relay_config(dir, "site-b", base, 4, &res, "[discovery]\ndomains = [\"site-a.test\"]");
    let mut b = start("b.toml", &b_text).await;
    let mut a = start("a.toml", &a_text).await;
    let mut a_events = a.running.events();
    send(&a, 0).await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&b.maildir()).len() == 1).await,
        "not delivered through DNS discovery: {:?}",
        wait_call_outcome(&mut a_events, 1).await
    );
    assert!(
        wait_until(Duration::from_secs(5), || a.running.queue_snapshot().messages == 0).await
    );
    // Both pinned what DNS said.
    let pin_b = std::fs::read_to_string(dir.join("var/site-a/spool/state/site-b.test.pin")).unwrap();
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
    assert!(why.contains("DNSSEC-bogus") && why.contains("_sipmail._udp.site-b.test"), "{why}");
    assert_eq!(maildir_files(&b.maildir()).len(), 1, "delivered despite a bogus answer");
    assert!(maildir_files(&a.maildir()).is_empty(), "a bounce came back");
    assert_eq!(a.running.queue_snapshot().messages, 1, "the mail must stay queued");
    let _ = &mut b;
    a.stop().await;
    b.stop().await;
}
