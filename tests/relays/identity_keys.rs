//! Issue 11, items 1 and 7, on the wire between real relays: a partner's cert gives it
//! only its own domain (the import binds it to one `[[peer]]`; `fingerprints = [...]`
//! restricts a peer further), and keyring changes (a revocation) take effect in a running
//! daemon without a restart: through `sipmail keys import` and on SIGHUP.

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{
    TwoSites, free_port, maildir_files, make_keys, sample_message, site_config, submit,
};
use sipmail::keyring::Keyring;
use sipmail::relay::{self, Hooks, RelayEvent, Shutdown};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use openpgp::cert::prelude::*;
use openpgp::packet::prelude::*;
use openpgp::parse::Parse;
use openpgp::serialize::SerializeInto;
use openpgp::types::SignatureType;
use sequoia_openpgp as openpgp;

fn sipmail(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Adds a self-signed user ID to the own key in `keyring` (what partner C did: its cert
/// also claims `mail@site-a.test`).
fn add_self_signed_uid(keyring: &Path, uid: &str) {
    let path = keyring.join("secret.asc");
    let cert = Cert::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    let mut signer = cert
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let uid = UserID::from(uid);
    let sig = uid
        .bind(
            &mut signer,
            &cert,
            SignatureBuilder::new(SignatureType::PositiveCertification),
        )
        .unwrap();
    let (cert, _) = cert
        .insert_packets(vec![Packet::from(uid), sig.into()])
        .unwrap();
    std::fs::write(&path, cert.as_tsk().armored().to_vec().unwrap()).unwrap();
}

/// Partner C's keyring (`keyring/site-c`): a key for mail@site-c.test that also claims
/// mail@site-a.test, with B's cert imported. Returns C's public cert, armored.
fn make_c(dir: &Path) -> String {
    let kc = dir.join("keyring/site-c");
    let kb = dir.join("keyring/site-b");
    Keyring::generate(&kc, "site-c.test").unwrap();
    add_self_signed_uid(&kc, "mail@site-a.test");
    Keyring::import(
        &kc,
        Keyring::open(&kb)
            .unwrap()
            .export_public()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    Keyring::open(&kc).unwrap().export_public().unwrap()
}

fn state_files(spool: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool.join("state"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn wait_delivered(md: &Path, n: usize) {
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(md).len() == n).await,
        "expected {n} delivered, have {}",
        maildir_files(md).len()
    );
}

/// The attack of issue 11 item 1: C's cert carries mail@site-c.test and mail@site-a.test;
/// a relay running as site-a.test with C's key calls B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cert_naming_two_domains_cannot_speak_for_the_other() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_keys(d).unwrap();
    let kb = d.join("keyring/site-b");
    let c_pub = make_c(d);
    let c_fpr = Keyring::open(&d.join("keyring/site-c"))
        .unwrap()
        .own_fingerprint()
        .unwrap();

    // B imports C's cert: refused as it is, since it names two domains ...
    let e = Keyring::import(&kb, c_pub.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mail@site-a.test") && e.contains("mail@site-c.test") && e.contains("--peer"),
        "{e}"
    );
    assert!(
        !kb.join(format!("certs/{c_fpr}.asc")).exists(),
        "the refused cert was stored"
    );
    // ... and with --peer site-c.test it counts for site-c.test only.
    Keyring::import_for(&kb, c_pub.as_bytes(), Some("site-c.test")).unwrap();
    let kr = Keyring::open(&kb).unwrap();
    assert!(kr.peer_cert("site-c.test", &c_fpr).is_ok());
    assert!(kr.peer_cert("site-a.test", &c_fpr).is_err());
    assert_eq!(
        Keyring::peer_binding(&kb, &c_fpr).unwrap().as_deref(),
        Some("site-c.test")
    );

    let (pa, pb, pc) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let a_cfg = Config::parse("a.toml", &site_config(d, "site-a", "site-b", pa, pb)).unwrap();
    let b_text = site_config(d, "site-b", "site-a", pb, pa).replace(
        "\n[delivery]",
        &format!(
            "\n[[peer]]\ndomain = \"site-c.test\"\nsip = \"sip:mail@127.0.0.1:{pc}\"\n[delivery]"
        ),
    );
    let b_cfg = Config::parse("b.toml", &b_text).unwrap();
    let b_spool = b_cfg.spool.clone();
    let sites = TwoSites::start_with(d, a_cfg, b_cfg, Hooks::default())
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);

    // The impostor: runs as site-a.test with C's key (keyring/site-c), its own spool.
    let evil_text = site_config(d, "site-c", "site-b", pc, pb).replacen(
        "domain = \"site-c.test\"",
        "domain = \"site-a.test\"",
        1,
    );
    let evil_cfg = Config::parse("evil.toml", &evil_text).unwrap();
    let evil_sd = Shutdown::new();
    let evil = relay::start(evil_cfg, evil_sd.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev_evil = evil.events();
    let mut ev_b = sites.b.events();
    submit(
        evil.smtp_addr,
        &[sample_message(1, "impostor")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let failed = wait_call_outcome(&mut ev_evil, 20).await;
    match &failed {
        Some(RelayEvent::CallFailed { reason, .. }) => {
            assert!(
                reason.contains("403"),
                "refused, but not with 403: {reason}"
            )
        }
        other => panic!("the impostor's call was not refused: {other:?} (C's key {c_fpr})"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        maildir_files(&md).is_empty(),
        "the impostor's mail was delivered"
    );
    assert_eq!(
        evil.queue_snapshot().messages,
        1,
        "stays queued at the impostor"
    );
    assert!(
        !state_files(&b_spool)
            .iter()
            .any(|f| f.starts_with("site-a.test")),
        "B wrote trust state for site-a.test: {:?}",
        state_files(&b_spool)
    );
    evil_sd.trigger();
    evil.wait().await;

    // The real A's next call works, with no `peer-has-none`.
    submit(
        sites.a.smtp_addr,
        &[sample_message(2, "real-a")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    match wait_event(&mut ev_b, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await
    {
        Some(RelayEvent::CallEstablished {
            peer, continuity, ..
        }) => {
            assert_eq!(peer, "site-a.test");
            assert_eq!(continuity, "first-call");
        }
        other => panic!("the real A's call was not established: {other:?}"),
    }
    wait_delivered(&md, 1).await;
    sites.stop().await;
}

/// `[[peer]] fingerprints = [...]`: a valid cert for the domain that is not listed is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_cert_not_in_the_peer_fingerprints_is_refused() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_keys(d).unwrap();
    // A second key for site-a.test (e.g. the one A rotates to), known to B: the only one
    // B's config accepts.
    let other = Keyring::generate(&d.join("keyring/site-a2"), "site-a.test").unwrap();
    Keyring::import(
        &d.join("keyring/site-b"),
        Keyring::open(&d.join("keyring/site-a2"))
            .unwrap()
            .export_public()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let a_cfg = Config::parse("a.toml", &site_config(d, "site-a", "site-b", pa, pb)).unwrap();
    let b_text = site_config(d, "site-b", "site-a", pb, pa).replace(
        "\n[delivery]",
        &format!("\nfingerprints = [\"{}\"]\n[delivery]", other.fingerprint),
    );
    let b_cfg = Config::parse("b.toml", &b_text).unwrap();
    let b_spool = b_cfg.spool.clone();
    let sites = TwoSites::start_with(d, a_cfg, b_cfg, Hooks::default())
        .await
        .unwrap();
    let mut ev_a = sites.a.events();
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "unlisted")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    match wait_call_outcome(&mut ev_a, 20).await {
        Some(RelayEvent::CallFailed { reason, .. }) => {
            assert!(reason.contains("403"), "{reason}")
        }
        other => panic!("A's unlisted key was not refused: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
    assert_eq!(sites.a.queue_snapshot().messages, 1);
    assert!(
        state_files(&b_spool).is_empty(),
        "{:?}",
        state_files(&b_spool)
    );
    sites.stop().await;
}

/// Item 7: A's revocation imported into a running B with `sipmail keys import`: B's next
/// call from A is refused, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_imported_with_the_cli_takes_effect_in_the_running_daemon() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sites = TwoSites::start(d, Hooks::default()).await.unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let mut ev_a = sites.a.events();
    // One call works.
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "before")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    wait_delivered(&md, 1).await;
    assert!(
        wait_event(&mut ev_a, 20, |e| matches!(e, RelayEvent::CallEnded { .. }))
            .await
            .is_some()
    );

    let a_fpr = Keyring::open(&d.join("keyring/site-a"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    let rev = d.join(format!("keyring/site-a/revocation-{a_fpr}.asc"));
    let kb = d.join("keyring/site-b");
    let o = sipmail(&[
        "keys",
        "import",
        "--keyring",
        kb.to_str().unwrap(),
        rev.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("The running daemon reloaded"),
        "keys import did not reach the daemon: {}",
        text(&o)
    );

    submit(
        sites.a.smtp_addr,
        &[sample_message(2, "after")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    match wait_call_outcome(&mut ev_a, 20).await {
        Some(RelayEvent::CallFailed { reason, .. }) => {
            assert!(reason.contains("403"), "{reason}")
        }
        other => panic!("the revoked key's call was not refused: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        maildir_files(&md).len(),
        1,
        "the revoked key's mail was delivered"
    );
    assert_eq!(sites.a.queue_snapshot().messages, 1);
    sites.stop().await;
}

/// The CLI: an ambiguous cert is refused at import with what to run; `--peer` binds it; a
/// keyring holding an unbound one (from before bindings) stops `check-config` naming the
/// file; `keys import` with no daemon running says so.
#[test]
fn the_cli_refuses_an_ambiguous_cert_and_names_an_unbound_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_keys(d).unwrap();
    let c_pub = make_c(d);
    let c_file = d.join("c.asc");
    std::fs::write(&c_file, &c_pub).unwrap();
    let kb = d.join("keyring/site-b");
    let (kbs, cfs) = (kb.to_str().unwrap(), c_file.to_str().unwrap());

    let o = sipmail(&["keys", "import", "--keyring", kbs, cfs]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("several domains") && text(&o).contains("--peer DOMAIN"),
        "{}",
        text(&o)
    );
    let o = sipmail(&[
        "keys",
        "import",
        "--keyring",
        kbs,
        "--peer",
        "site-x.test",
        cfs,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("no user ID mail@site-x.test"),
        "{}",
        text(&o)
    );
    let o = sipmail(&[
        "keys",
        "import",
        "--keyring",
        kbs,
        "--peer",
        "site-c.test",
        cfs,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("counts for peer site-c.test only")
            && text(&o).contains("No running daemon"),
        "{}",
        text(&o)
    );

    let o = sipmail(&["keys", "list", "--keyring", kbs]);
    assert!(text(&o).contains("for peer site-c.test"), "{}", text(&o));

    // A keyring from before bindings: the cert file without its .peer file.
    let c_fpr = Keyring::open(&d.join("keyring/site-c"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    std::fs::remove_file(kb.join(format!("certs/{c_fpr}.peer"))).unwrap();
    let cfg = d.join("b.toml");
    std::fs::write(&cfg, site_config(d, "site-b", "site-a", 5070, 5071)).unwrap();
    let o = sipmail(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("certs/{c_fpr}.asc"))
            && t.contains("--peer DOMAIN")
            && t.contains("relay.keyring"),
        "{t}"
    );
    // Binding it again repairs the keyring.
    let o = sipmail(&[
        "keys",
        "import",
        "--keyring",
        kbs,
        "--peer",
        "site-c.test",
        cfs,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sipmail(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

/// Item 7, SIGHUP: a real `sipmail run` daemon (site B) reloads its keyring on SIGHUP; a
/// revocation dropped into the keyring without telling the daemon takes effect then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_a_running_daemon_reload_its_keyring() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_keys(d).unwrap();
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let a_cfg = Config::parse("a.toml", &site_config(d, "site-a", "site-b", pa, pb)).unwrap();
    let b_path = d.join("b.toml");
    std::fs::write(&b_path, site_config(d, "site-b", "site-a", pb, pa)).unwrap();
    let md = d.join("var/site-b/maildir");
    let log = std::fs::File::create(d.join("b.log")).unwrap();
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sipmail"))
            .args(["run", "--config", b_path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let daemon = &mut daemon.0;
    let b_log = || std::fs::read_to_string(d.join("b.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || b_log()
            .contains("relay started"))
        .await,
        "daemon did not start: {}",
        b_log()
    );
    let sd = Shutdown::new();
    let a = relay::start(a_cfg, sd.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev_a = a.events();
    submit(
        a.smtp_addr,
        &[sample_message(1, "hup")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    wait_delivered(&md, 1).await;
    assert!(
        wait_event(&mut ev_a, 20, |e| matches!(e, RelayEvent::CallEnded { .. }))
            .await
            .is_some()
    );

    // The revocation goes into B's keyring behind the daemon's back (the library, no
    // control socket): nothing changes until SIGHUP.
    let a_fpr = Keyring::open(&d.join("keyring/site-a"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    let rev = std::fs::read(d.join(format!("keyring/site-a/revocation-{a_fpr}.asc"))).unwrap();
    Keyring::import(&d.join("keyring/site-b"), &rev).unwrap();
    let st = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        wait_until(Duration::from_secs(10), || b_log().contains("reloaded")).await,
        "no reload logged: {}",
        b_log()
    );
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "SIGHUP stopped the daemon"
    );

    submit(
        a.smtp_addr,
        &[sample_message(2, "hup")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    match wait_call_outcome(&mut ev_a, 20).await {
        Some(RelayEvent::CallFailed { reason, .. }) => assert!(reason.contains("403"), "{reason}"),
        other => panic!("the revoked key's call was not refused: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        maildir_files(&md).len(),
        1,
        "the revoked key's mail was delivered"
    );

    // A broken keyring: the reload fails, is logged, and the old keyring stays in use.
    std::fs::write(d.join("keyring/site-b/certs/broken.asc"), "not a key").unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(10), || b_log()
            .contains("reload failed"))
        .await,
        "{}",
        b_log()
    );
    assert!(daemon.try_wait().unwrap().is_none());

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    sd.trigger();
    a.wait().await;
}
