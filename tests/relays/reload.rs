//! Reload without a restart (issue 15, item 4), with a real `sipmail run` daemon as site A,
//! reloaded by `sipmail reload` (its control socket) and by SIGHUP, and relays B and C on
//! real sockets in this process:
//! 1. a peer added (its [[peer]] and its cert) is called and may call, with no restart;
//! 2. a partner cert removed: a call in progress goes on, the next call with that key is
//!    refused (403), queued mail waits and is delivered once the cert is back;
//! 3. a broken file (syntax), an invalid value, a restart-only change and a broken keyring
//!    are each refused, named by `sipmail reload` (exit 1) and in the log, and the old
//!    config stays in force (mail still flows).
//!
//! `SIPMAIL_RELOAD_BY_SIGHUP=1` reloads by SIGHUP alone (and reads the outcome from the
//! log), which is how the checks were run against the keyring-only reload before it.

use crate::common::{init_logs, wait_call_outcome, wait_event, wait_until};
use sipmail::config::Config;
use sipmail::demo::{free_port, maildir_files, make_keys, sample_message, site_config};
use sipmail::keyring::Keyring;
use sipmail::relay::{self, Hooks, RelayEvent, Running, Shutdown};
use sipmail::smtp::{ClientTimeouts, SmtpClient};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Site A as a real daemon; killed if the test fails.
struct Daemon {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    smtp: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    async fn start(config: PathBuf, log: PathBuf, smtp: SocketAddr) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sipmail"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            config,
            log,
            smtp,
        };
        assert!(
            wait_until(Duration::from_secs(20), || d
                .log_text()
                .contains("relay started"))
            .await,
            "site A did not start: {}",
            d.log_text()
        );
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, what: &str) -> usize {
        self.log_text().matches(what).count()
    }

    fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// `sipmail reload --config A`: its status and output. With SIPMAIL_RELOAD_BY_SIGHUP,
    /// SIGHUP instead: success if the log gains "reloaded", failure if it gains a refusal.
    async fn reload(&self) -> (bool, String) {
        if std::env::var_os("SIPMAIL_RELOAD_BY_SIGHUP").is_some() {
            return self.hup().await;
        }
        let o = sipmail(&["reload", "--config", self.config.to_str().unwrap()]);
        (o.status.success(), text(&o))
    }

    /// SIGHUP; true if the log then says "reloaded", false if it says the reload failed
    /// or was refused.
    async fn hup(&self) -> (bool, String) {
        let (ok0, bad0) = (self.count("reloaded"), self.refusals());
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(
            wait_until(Duration::from_secs(15), || self.count("reloaded") > ok0
                || self.refusals() > bad0)
            .await,
            "SIGHUP: nothing logged: {}",
            self.log_text()
        );
        (self.count("reloaded") > ok0, self.log_text())
    }

    fn refusals(&self) -> usize {
        self.count("reload refused") + self.count("reload failed")
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

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

/// One SMTP transaction: Ok if the recipient was accepted and the message queued, Err
/// with the server's answers otherwise.
async fn send(smtp: SocketAddr, from: &str, rcpt: &str, i: usize, run: &str) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(smtp)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = SmtpClient::connect(tcp, "test.example", ClientTimeouts::default())
        .await
        .map_err(|e| e.to_string())?;
    let o = c
        .send(from, &[rcpt.to_string()], &sample_message(i, run)[..])
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.quit().await;
    if o.delivered().is_empty() {
        Err(format!("{o:?}"))
    } else {
        Ok(())
    }
}

async fn wait_files(md: &Path, n: usize, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(md).len() >= n).await,
        "{what}: expected {n} message(s) in {}, have {}",
        md.display(),
        maildir_files(md).len()
    );
}

/// A [[peer]] block.
fn peer(domain: &str, port: u16) -> String {
    format!("[[peer]]\ndomain = \"{domain}\"\nsip = \"sip:mail@127.0.0.1:{port}\"\n")
}

/// Three sites: A (the daemon under test; initially knows only B), B (knows A) and C
/// (knows A; A does not know C yet, and has not imported C's cert).
struct Bed {
    dir: PathBuf,
    a: Daemon,
    /// A's config text as started.
    a_text: String,
    ports: (u16, u16, u16),
    b: Running,
    c: Option<Running>,
    stop: Shutdown,
    /// C stops on its own (to test mail queued for it).
    stop_c: Shutdown,
    c_cfg: Config,
}

impl Bed {
    async fn start(dir: &Path, b_call_idle: &str) -> Bed {
        make_keys(dir).unwrap();
        let kc = dir.join("keyring/site-c");
        Keyring::generate(&kc, "site-c.test").unwrap();
        let a_pub = Keyring::open(&dir.join("keyring/site-a"))
            .unwrap()
            .export_public()
            .unwrap();
        Keyring::import(&kc, a_pub.as_bytes()).unwrap();
        let (pa, pb, pc) = (
            free_port().unwrap(),
            free_port().unwrap(),
            free_port().unwrap(),
        );
        let a_smtp: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let a_text = site_config(dir, "site-a", "site-b", pa, pb).replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{a_smtp}\""),
        );
        // One lane to A at B: the message after the first one takes the call that is up.
        let b_text = site_config(dir, "site-b", "site-a", pb, pa).replace(
            "call_idle = \"2s\"",
            &format!("call_idle = \"{b_call_idle}\"\ncalls_per_peer = 1"),
        );
        let c_text = site_config(dir, "site-c", "site-a", pc, pa);
        let a_path = dir.join("a.toml");
        std::fs::write(&a_path, &a_text).unwrap();
        let stop = Shutdown::new();
        let b = relay::start(
            Config::parse("b.toml", &b_text).unwrap(),
            stop.clone(),
            Hooks::default(),
        )
        .await
        .unwrap();
        let c_cfg = Config::parse("c.toml", &c_text).unwrap();
        let stop_c = Shutdown::new();
        let c = relay::start(c_cfg.clone(), stop_c.clone(), Hooks::default())
            .await
            .unwrap();
        let a = Daemon::start(a_path, dir.join("a.log"), a_smtp).await;
        Bed {
            dir: dir.to_path_buf(),
            a,
            a_text,
            ports: (pa, pb, pc),
            b,
            c: Some(c),
            stop,
            stop_c,
            c_cfg,
        }
    }

    /// Stop C (its tasks ended, its sockets closed); [`Bed::restart_c`] starts it again.
    async fn stop_c(&mut self) {
        self.stop_c.trigger();
        if let Some(c) = self.c.take() {
            c.wait().await;
        }
    }

    async fn restart_c(&mut self) {
        self.stop_c = Shutdown::new();
        let c = relay::start(self.c_cfg.clone(), self.stop_c.clone(), Hooks::default())
            .await
            .unwrap();
        self.c = Some(c);
    }

    fn c(&self) -> &Running {
        self.c.as_ref().unwrap()
    }

    fn maildir(&self, site: &str) -> PathBuf {
        self.dir.join(format!("var/{site}/maildir"))
    }

    /// A's config as started, with C added as a peer.
    fn a_text_with_c(&self) -> String {
        format!("{}{}", self.a_text, peer("site-c.test", self.ports.2))
    }

    /// A to B still works (the config in force is the old one).
    async fn a_still_delivers_to_b(&self, i: usize, run: &str) {
        let md = self.maildir("site-b");
        let before = maildir_files(&md).len();
        send(self.a.smtp, "alice@site-a.test", "bob@site-b.test", i, run)
            .await
            .unwrap_or_else(|e| panic!("{run}: A refused mail for B: {e}"));
        wait_files(&md, before + 1, run).await;
    }

    async fn stop(self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.a.child.id().to_string()])
            .status();
        self.stop.trigger();
        self.stop_c.trigger();
        self.b.wait().await;
        if let Some(c) = self.c {
            c.wait().await;
        }
        // Dropping the daemon reaps it.
        drop(self.a);
    }
}

/// (1) C added to A without a restart: before, A refuses mail for C and C's calls; after
/// the [[peer]] and the cert are in and A reloads, mail flows both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_added_by_reload_is_called_and_may_call() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Bed::start(dir.path(), "2s").await;
    let mut ev_c = bed.c().events();

    // Before: A has no route to C, and refuses C's call.
    let refused = send(
        bed.a.smtp,
        "alice@site-a.test",
        "carol@site-c.test",
        1,
        "add",
    )
    .await
    .expect_err("A accepted mail for site-c.test before C was added");
    assert!(refused.contains("not a partner domain"), "{refused}");
    send(
        bed.c().smtp_addr,
        "carol@site-c.test",
        "alice@site-a.test",
        2,
        "add",
    )
    .await
    .unwrap();
    match wait_call_outcome(&mut ev_c, 20).await {
        Some(RelayEvent::CallFailed { reason, .. }) => {
            assert!(reason.contains("403"), "C's call: {reason}")
        }
        other => panic!("A answered C before C was added: {other:?}"),
    }
    assert!(maildir_files(&bed.maildir("site-a")).is_empty());

    // Add C: its cert (the library, behind the daemon's back), then its [[peer]].
    let c_pub = Keyring::open(&bed.dir.join("keyring/site-c"))
        .unwrap()
        .export_public()
        .unwrap();
    Keyring::import(&bed.dir.join("keyring/site-a"), c_pub.as_bytes()).unwrap();
    bed.a.write_config(&bed.a_text_with_c());
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "reload refused: {out}");
    if std::env::var_os("SIPMAIL_RELOAD_BY_SIGHUP").is_none() {
        assert!(out.contains("added: site-c.test"), "{out}");
    }

    // After: A calls C, and C's queued message (retried within 5 s) reaches A.
    send(
        bed.a.smtp,
        "alice@site-a.test",
        "carol@site-c.test",
        3,
        "add",
    )
    .await
    .unwrap_or_else(|e| panic!("A still refuses mail for C after the reload: {e}"));
    wait_files(&bed.maildir("site-c"), 1, "A to C after the reload").await;
    wait_files(
        &bed.maildir("site-a"),
        1,
        "C's queued mail to A after the reload",
    )
    .await;
    // B is untouched.
    bed.a_still_delivers_to_b(4, "add").await;

    // C removed again while mail for it waits in A's queue (C is down; A's INVITE goes
    // unanswered for 32 s): the message stays queued, a log line says so, A refuses new
    // mail for C, and once C is back in the config (and up), the message is delivered.
    bed.stop_c().await;
    send(
        bed.a.smtp,
        "alice@site-a.test",
        "carol@site-c.test",
        5,
        "add",
    )
    .await
    .unwrap();
    bed.a.write_config(&bed.a_text);
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "reload refused: {out}");
    if std::env::var_os("SIPMAIL_RELOAD_BY_SIGHUP").is_none() {
        assert!(out.contains("removed: site-c.test"), "{out}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || bed
            .a
            .log_text()
            .contains("peer removed by reload: its queued mail stays queued"))
        .await,
        "{}",
        bed.a.log_text()
    );
    let refused = send(
        bed.a.smtp,
        "alice@site-a.test",
        "carol@site-c.test",
        6,
        "add",
    )
    .await;
    assert!(refused.is_err(), "A accepts mail for the removed peer C");
    let q = || {
        text(&sipmail(&[
            "queue",
            "list",
            "--json",
            "--config",
            bed.a.config.to_str().unwrap(),
        ]))
    };
    // Its next attempt finds no [[peer]]: still queued.
    assert!(
        wait_until(Duration::from_secs(60), || bed
            .a
            .log_text()
            .contains("no [[peer]] for this domain in the config in force"))
        .await,
        "{}",
        bed.a.log_text()
    );
    assert!(
        q().contains("carol@site-c.test"),
        "A's queue lost it: {}",
        q()
    );
    bed.restart_c().await;
    bed.a.write_config(&bed.a_text_with_c());
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "reload refused: {out}");
    wait_files(&bed.maildir("site-c"), 2, "A's queued mail after C is back").await;
    bed.stop().await;
}

/// (2) B's cert removed from A's keyring: B's call in progress goes on; B's next call is
/// refused (403) and A's call to B fails; mail waits in both queues, and is delivered
/// once the cert is back (another reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_cert_refuses_the_next_call_and_queued_mail_waits() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // B keeps an idle call up for 8 s, so that it is still up across A's reload.
    let mut bed = Bed::start(dir.path(), "8s").await;
    let mut ev_b = bed.b.events();
    let md_a = bed.maildir("site-a");
    let md_b = bed.maildir("site-b");

    send(
        bed.b.smtp_addr,
        "bob@site-b.test",
        "alice@site-a.test",
        1,
        "rev",
    )
    .await
    .unwrap();
    let first = match wait_event(&mut ev_b, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await
    {
        Some(RelayEvent::CallEstablished { call_id, .. }) => call_id,
        other => panic!("B's first call: {other:?}"),
    };
    wait_files(&md_a, 1, "B to A before").await;

    // Take B's cert out of A's keyring (both files), behind the daemon's back; reload.
    let b_fpr = Keyring::open(&bed.dir.join("keyring/site-b"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    let certs = bed.dir.join("keyring/site-a/certs");
    let aside = bed.dir.join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    let moved: Vec<String> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&b_fpr))
        .collect();
    assert!(
        !moved.is_empty(),
        "no file for {b_fpr} in {}",
        certs.display()
    );
    for n in &moved {
        std::fs::rename(certs.join(n), aside.join(n)).unwrap();
    }
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "reload refused: {out}");

    // B's call placed before the reload is still up: the next message goes through it.
    send(
        bed.b.smtp_addr,
        "bob@site-b.test",
        "alice@site-a.test",
        2,
        "rev",
    )
    .await
    .unwrap();
    wait_files(&md_a, 2, "B to A through the call placed before the reload").await;
    let mut ev_b2 = bed.b.events();
    // Once it ends, B's next call uses the key A no longer holds: refused.
    match wait_event(&mut ev_b, 40, |e| matches!(e, RelayEvent::CallEnded { .. })).await {
        Some(RelayEvent::CallEnded { call_id, .. }) => assert_eq!(call_id, first),
        other => panic!("B's call did not end: {other:?}"),
    }
    send(
        bed.b.smtp_addr,
        "bob@site-b.test",
        "alice@site-a.test",
        3,
        "rev",
    )
    .await
    .unwrap();
    match wait_call_outcome(&mut ev_b2, 20).await {
        Some(RelayEvent::CallFailed { reason, .. }) => {
            assert!(reason.contains("403"), "B's call: {reason}")
        }
        other => panic!("B's call with the removed key was not refused: {other:?}"),
    }
    // A's call to B fails too (no cert to check B's answer): the message stays queued.
    send(bed.a.smtp, "alice@site-a.test", "bob@site-b.test", 4, "rev")
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || bed
            .a
            .log_text()
            .contains("call failed; mail stays queued"))
        .await,
        "{}",
        bed.a.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        maildir_files(&md_a).len(),
        2,
        "mail from B's removed key arrived"
    );
    assert!(
        maildir_files(&md_b).is_empty(),
        "A delivered to B without its cert"
    );
    assert_eq!(
        bed.b.queue_snapshot().messages,
        1,
        "B's message left its queue"
    );
    let q = sipmail(&[
        "queue",
        "list",
        "--json",
        "--config",
        bed.a.config.to_str().unwrap(),
    ]);
    assert!(
        text(&q).contains("bob@site-b.test"),
        "A's queue lost the message for B: {}",
        text(&q)
    );
    assert!(bed.a.running());

    // The cert back, a reload: both queued messages are delivered on their next retry.
    for n in &moved {
        std::fs::rename(aside.join(n), certs.join(n)).unwrap();
    }
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "reload refused: {out}");
    wait_files(&md_a, 3, "B's queued mail after the cert is back").await;
    wait_files(&md_b, 1, "A's queued mail after the cert is back").await;
    bed.stop().await;
}

/// (3) Bad new configs are refused, named and logged; the old one stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_and_the_old_one_stays() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Bed::start(dir.path(), "2s").await;
    bed.a_still_delivers_to_b(1, "bad").await;
    let by_hup = std::env::var_os("SIPMAIL_RELOAD_BY_SIGHUP").is_some();

    // Syntax: `sipmail reload` names the error (it cannot find the daemon through a file
    // that is not TOML); SIGHUP makes the daemon log it.
    let broken = bed.a_text.replace("[[peer]]", "[[peer]");
    bed.a.write_config(&broken);
    if !by_hup {
        let (ok, out) = bed.a.reload().await;
        assert!(!ok, "a broken file was accepted: {out}");
        assert!(
            out.contains("a.toml") && out.contains("TOML parse error"),
            "{out}"
        );
    }
    let (ok, log) = bed.a.hup().await;
    assert!(!ok, "SIGHUP: a broken file was accepted");
    assert!(
        log.contains("reload failed") && log.contains("TOML parse error"),
        "{log}"
    );
    assert!(bed.a.running());
    bed.a_still_delivers_to_b(2, "bad").await;

    // Cases the daemon judges: each refused with its reason, in the answer and the log.
    let c_peer = bed.a_text_with_c();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "an invalid value",
            c_peer.replace("sip:mail@127.0.0.1", "http://127.0.0.1"),
            "must start with sip:",
        ),
        (
            "a setting read only at start",
            bed.a_text.replace(
                &format!("listen = \"127.0.0.1:{}\"", bed.ports.0),
                &format!("listen = \"127.0.0.1:{}\"", free_port().unwrap()),
            ),
            "sip.listen changed",
        ),
        (
            "a signed peer with no cert",
            c_peer.clone(),
            "no usable certificate for mail@site-c.test",
        ),
    ];
    for (what, text, reason) in cases {
        bed.a.write_config(&text);
        let before = bed.a.refusals();
        let (ok, out) = bed.a.reload().await;
        assert!(!ok, "{what}: accepted: {out}");
        assert!(
            wait_until(Duration::from_secs(5), || bed.a.refusals() > before).await,
            "{what}: not logged: {}",
            bed.a.log_text()
        );
        for (whose, t) in [("the answer", out), ("the log", bed.a.log_text())] {
            assert!(
                t.contains(reason),
                "{what}: {whose} does not say {reason:?}: {t}"
            );
        }
        if !by_hup {
            assert!(
                bed.a.log_text().contains("restart to change it")
                    || what != "a setting read only at start",
                "{what}"
            );
        }
        // The old config is in force: still no route to C, and B is served.
        let r = send(
            bed.a.smtp,
            "alice@site-a.test",
            "carol@site-c.test",
            3,
            "bad",
        )
        .await;
        assert!(r.is_err(), "{what}: the refused config is in force");
        bed.a_still_delivers_to_b(4, what).await;
    }

    // A broken keyring (a file that is no key): refused, logged, old keyring in force.
    bed.a.write_config(&bed.a_text);
    let junk = bed.dir.join("keyring/site-a/certs/junk.asc");
    std::fs::write(&junk, "not a key").unwrap();
    let (ok, out) = bed.a.reload().await;
    assert!(!ok, "a broken keyring was accepted: {out}");
    assert!(out.contains("junk.asc"), "{out}");
    bed.a_still_delivers_to_b(5, "bad").await;
    std::fs::remove_file(&junk).unwrap();
    let (ok, out) = bed.a.reload().await;
    assert!(ok, "the repaired config was refused: {out}");
    assert!(bed.a.running());

    // No daemon on that spool: a clear error naming the socket and what to do.
    if !by_hup {
        let other = bed.dir.join("other.toml");
        std::fs::write(
            &other,
            bed.a_text.replace("var/site-a/spool", "var/nowhere/spool"),
        )
        .unwrap();
        let o = sipmail(&["reload", "--config", other.to_str().unwrap()]);
        assert!(!o.status.success());
        let t = text(&o);
        assert!(
            t.contains("no sipmail daemon answers on")
                && t.contains("nowhere/spool/control.sock")
                && t.contains("sipmail run --config"),
            "{t}"
        );
    }
    bed.stop().await;
}
