//! Several relays per site (issue 13, item 4): site B runs two relays, each a separate
//! `sipmail run` process with its own spool and its own key bound to site-b.test, both
//! delivering into one Maildir (the sink). Site A (in this process) lists both in its
//! `[[peer]] sip`, over UDP (where a relay killed with SIGKILL sends nothing back) and over
//! TCP (where its port refuses the connection). A sends
//! 200 messages; B1 is killed mid-run; A goes on through B2 within seconds (not at the
//! queue's next retry); B1 is restarted to drain what it had accepted. Every message is
//! delivered exactly once: the Message-IDs at the sink are counted. That includes the one
//! window every SMTP relay has (B1 killed after the end of a message, before A read its
//! reply): A keeps such a message for B1 (a `RelayPin`) instead of sending it to B2, and
//! B1, back, recognises the resend and returns its receipt. The same run with B's relays
//! found by SRV (priority 10 over UDP, 20 over TCP, in a DNSSEC-signed zone); and a relay
//! that is up but answers `503` hands the mail to the next in the same attempt.
//!
//! Loopback block 127.0.43.0/24, ports 43500-43599.

// Its own test binary, not a module of tests/relays/: the assertions read relay A's log
// through the process's one tracing subscriber (`tee`), which the tests in tests/relays/
// would take first (and write their own relays' lines into).
#[path = "relays/common.rs"]
mod common;
#[path = "relays/dns_fixture.rs"]
mod dns_fixture;

use common::wait_until;
use dns_fixture::{DNS_PORT, DnsFixture, Zone, ip};
use sipmail::demo::{maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::relay::{Hooks, RelayEvent, Shutdown};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where one run's three relays listen, and the transport A calls B with.
struct Net {
    a_ip: &'static str,
    b1_ip: &'static str,
    b2_ip: &'static str,
    a_port: u16,
    b1_port: u16,
    b2_port: u16,
    tcp: bool,
    /// Found through DNS instead of a list in `[[peer]] sip`: the DNS fixture's base
    /// (127.0.42.base+1/2). Site B's signed zone then says where its relays are:
    /// `_sipmail._udp` SRV priority 10 to B1 and `_sipmail._tcp` SRV priority 20 to B2,
    /// and A's `[[peer]]` says `sip = "dns"`.
    srv: Option<u8>,
}
const MESSAGES: usize = 200;

/// A `sipmail run` process of ours, killed (SIGKILL) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: PathBuf) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_sipmail"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting sipmail");
        Daemon { child, log }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn b_config(dir: &Path, n: &Net, name: &str, ip: &str, port: u16, sink: &Path) -> PathBuf {
    let (a_ip, a_port) = (n.a_ip, n.a_port);
    let text = format!(
        r#"[relay]
domain = "site-b.test"
keyring = "{kr}"
spool = "{sp}"
[smtp]
listen = "{ip}:0"
allow = ["127.0.0.0/8"]
[sip]
listen = "{ip}:{port}"
media = "{ip}"
call_idle = "2s"
[[peer]]
domain = "site-a.test"
sip = "sip:mail@{a_ip}:{a_port}"
[delivery]
maildir = "{md}"
[queue]
retry_initial = "1s"
retry_max = "5s"
"#,
        kr = dir.join(format!("keyring/{name}")).display(),
        sp = dir.join(format!("var/{name}/spool")).display(),
        md = sink.display(),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Keys: A, and B1 and B2 each with its own key bound to site-b.test; A's keyring holds
/// both of B's certs, each of B's keyrings holds A's.
fn keys(d: &Path) {
    let (ka, kb1, kb2) = (
        d.join("keyring/site-a"),
        d.join("keyring/b1"),
        d.join("keyring/b2"),
    );
    Keyring::generate(&ka, "site-a.test").unwrap();
    Keyring::generate(&kb1, "site-b.test").unwrap();
    Keyring::generate(&kb2, "site-b.test").unwrap();
    let a_pub = Keyring::open(&ka).unwrap().export_public().unwrap();
    for kb in [&kb1, &kb2] {
        Keyring::import(kb, a_pub.as_bytes()).unwrap();
        let b_pub = Keyring::open(kb).unwrap().export_public().unwrap();
        Keyring::import(&ka, b_pub.as_bytes()).unwrap();
    }
}

/// Waits (20 s at most) until B1's and B2's SIP ports answer; else fails with their logs.
async fn wait_up(n: &Net, relays: &[&Daemon]) {
    for (ip, port) in [(n.b1_ip, n.b1_port), (n.b2_ip, n.b2_port)] {
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect((ip, port)).is_ok()
        })
        .await;
        if !up {
            let logs: Vec<String> = relays.iter().map(|r| r.log()).collect();
            panic!("relay {ip}:{port} did not start:\n{}", logs.join("\n"));
        }
    }
}

/// Site A's config: B1 and B2 in that order in its `[[peer]] sip`, or (`n.srv`) `sip =
/// "dns"` with the fixture's validating resolver.
fn a_config(d: &Path, n: &Net) -> sipmail::config::Config {
    let (a_ip, b1_ip, b2_ip) = (n.a_ip, n.b1_ip, n.b2_ip);
    let (a_port, b1_port, b2_port) = (n.a_port, n.b1_port, n.b2_port);
    let transport = if n.tcp { ";transport=tcp" } else { "" };
    let ka = d.join("keyring/site-a");
    let a_text = format!(
        r#"[relay]
domain = "site-a.test"
keyring = "{kr}"
spool = "{sp}"
[smtp]
listen = "{a_ip}:0"
allow = ["127.0.0.0/8"]
[sip]
listen = "{a_ip}:{a_port}"
media = "{a_ip}"
call_idle = "2s"
[[peer]]
domain = "site-b.test"
sip = {sip}
[delivery]
maildir = "{md}"
[queue]
retry_initial = "1s"
retry_max = "5s"
{dns}"#,
        sip = match n.srv {
            Some(_) => "\"dns\"".to_string(),
            None => format!(
                "[\"sip:mail@{b1_ip}:{b1_port}{transport}\", \"sip:mail@{b2_ip}:{b2_port}{transport}\"]"
            ),
        },
        dns = match n.srv {
            Some(base) => format!(
                "[dns]\nresolver = \"{}:{DNS_PORT}\"\ntimeout = \"2s\"\n",
                ip(base, 2)
            ),
            None => String::new(),
        },
        kr = ka.display(),
        sp = d.join("var/site-a/spool").display(),
        md = d.join("var/site-a/maildir").display(),
    );
    sipmail::config::Config::parse("a.toml", &a_text).unwrap()
}

/// Message-ID -> how many files at the sink carry it.
fn message_ids(sink: &Path) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for f in maildir_files(sink) {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .map(str::to_string)
        {
            *ids.entry(id).or_insert(0) += 1;
        }
    }
    ids
}

/// Relay A's log, kept for the assertions (this binary owns the process's subscriber).
#[derive(Clone, Default)]
struct LogTee(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogTee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogTee {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A's queue IDs of the lines that contain `what`.
    fn queue_ids(&self, what: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| l.split("queue_id=").nth(1))
            .filter_map(|r| r.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// A's queue IDs of the messages kept for a relay that died between the end of the
    /// message and its reply: RFC 5321 §6.1's window, where the relay may already have
    /// taken the message.
    fn kept_for_their_relay(&self) -> Vec<String> {
        self.queue_ids("it is sent again to the same relay")
    }
}

/// The log of the relays in this process (both tests' A), kept for the assertions.
fn tee() -> LogTee {
    static TEE: std::sync::OnceLock<LogTee> = std::sync::OnceLock::new();
    TEE.get_or_init(|| {
        let tee = LogTee::default();
        let writer = tee.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        tee
    })
    .clone()
}

/// Over UDP a killed relay sends nothing back: A notices by the 5 s answer wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_relays_killed_mid_run_every_message_delivered_exactly_once() {
    killed_mid_run(Net {
        a_ip: "127.0.43.20",
        b1_ip: "127.0.43.21",
        b2_ip: "127.0.43.22",
        a_port: 43500,
        b1_port: 43501,
        b2_port: 43502,
        tcp: false,
        srv: None,
    })
    .await;
}

/// Over TCP the killed relay's port refuses the connection: A moves on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_tcp_where_the_dead_relay_refuses_the_connection() {
    killed_mid_run(Net {
        a_ip: "127.0.43.30",
        b1_ip: "127.0.43.31",
        b2_ip: "127.0.43.32",
        a_port: 43510,
        b1_port: 43511,
        b2_port: 43512,
        tcp: true,
        srv: None,
    })
    .await;
}

/// The same with B's relays found in DNS (RFC 3263): A has `sip = "dns"`, and B's signed
/// zone gives B1 by `_sipmail._udp` SRV at priority 10 and B2 by `_sipmail._tcp` SRV at
/// priority 20 (each on its own port, as the SRV records say). A calls B1 while it is up
/// (priority), goes on through B2 (over TCP: the SRV record's transport) once B1 is dead,
/// and every message is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_both_relays_found_by_srv_priority() {
    killed_mid_run(Net {
        a_ip: "127.0.43.50",
        b1_ip: "127.0.43.51",
        b2_ip: "127.0.43.52",
        a_port: 43530,
        b1_port: 43531,
        b2_port: 43532,
        tcp: false,
        srv: Some(220),
    })
    .await;
}

async fn killed_mid_run(n: Net) {
    let tee = tee();
    let (b1_ip, b2_ip) = (n.b1_ip, n.b2_ip);
    let (b1_port, b2_port) = (n.b1_port, n.b2_port);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keys(d);
    let sink = d.join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    // B1 reaches the sink through a link, so that the test can cut its delivery just
    // before the kill: B1 then dies holding mail it accepted (and A was told 250 for) but
    // had not delivered, which its restart must deliver, once.
    let b1_sink = d.join("b1-sink");
    std::os::unix::fs::symlink(&sink, &b1_sink).unwrap();
    let c1 = b_config(d, &n, "b1", b1_ip, b1_port, &b1_sink);
    let c2 = b_config(d, &n, "b2", b2_ip, b2_port, &sink);
    let _dns = n.srv.map(|base| {
        DnsFixture::start(
            d,
            base,
            &[Zone::signed(
                "site-b.test",
                vec![
                    format!("_sipmail._udp IN SRV 10 10 {b1_port} b1"),
                    format!("_sipmail._tcp IN SRV 20 10 {b2_port} b2"),
                    format!("b1 IN A {b1_ip}"),
                    format!("b2 IN A {b2_ip}"),
                ],
            )],
        )
    });
    let mut b1 = Daemon::start(&c1, d.join("b1.log"));
    let b2 = Daemon::start(&c2, d.join("b2.log"));

    let a_cfg = a_config(d, &n);
    let shutdown = Shutdown::new();
    let a = sipmail::relay::start(a_cfg, shutdown.clone(), Hooks::default())
        .await
        .unwrap();
    let mut events = a.events();
    // Both of B's relays are up (their SIP ports answer) before mail goes.
    wait_up(&n, &[&b1, &b2]).await;

    let run = format!("failover-{}", std::process::id());
    let msgs: Vec<Vec<u8>> = (0..MESSAGES).map(|i| sample_message(i, &run)).collect();
    let smtp = a.smtp_addr;
    let sender = tokio::spawn(async move {
        // Several sessions, one after the other, so the queue fills over time.
        for chunk in msgs.chunks(20) {
            submit(smtp, chunk, "bob@site-b.test", |_| {})
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });

    // Kill B1 with SIGKILL once it has delivered some of the mail.
    let some = wait_until(Duration::from_secs(60), || maildir_files(&sink).len() >= 40).await;
    assert!(
        some,
        "B1 delivered only {}:\n{}",
        maildir_files(&sink).len(),
        b1.log()
    );
    std::fs::remove_file(&b1_sink).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), &b1_sink).unwrap();
    let cut = maildir_files(&sink).len();
    let held = wait_until(Duration::from_secs(20), || {
        b1.log().matches("Maildir write failed").count() >= 10
    })
    .await;
    assert!(
        held,
        "B1 took no more mail after its sink was cut:\n{}",
        b1.log()
    );
    b1.kill9();
    let killed_at = Instant::now();
    let at_kill = maildir_files(&sink).len();
    sender.await.unwrap();

    // Mail goes on through B2 within seconds.
    let via_b2 = wait_until(Duration::from_secs(30), || {
        maildir_files(&sink).len() >= at_kill + 20
    })
    .await;
    assert!(via_b2, "no mail through B2 after B1 died:\n{}", b2.log());
    let failover_took = killed_at.elapsed();

    // Everything A still holds goes through B2, except what B1 may hold: a transaction
    // with B1 that got no reply after the end of the message. That waits for B1.
    let only_kept = wait_until(Duration::from_secs(90), || {
        let kept = tee.kept_for_their_relay();
        a.queue_snapshot_ids().iter().all(|id| kept.contains(id))
    })
    .await;
    let waiting = a.queue_snapshot_ids();
    assert!(
        only_kept,
        "A still holds {} messages, not all kept for B1: {waiting:?}",
        waiting.len()
    );
    let before_restart = message_ids(&sink);
    std::fs::remove_file(&b1_sink).unwrap();
    std::os::unix::fs::symlink(&sink, &b1_sink).unwrap();
    // B1 restarts on its spool and delivers what it had accepted; A's kept messages go
    // to it again, and it returns the receipts of those it had taken.
    let b1_restarted = Daemon::start(&c1, d.join("b1-restart.log"));
    let all = wait_until(Duration::from_secs(60), || {
        message_ids(&sink).len() == MESSAGES && a.queue_snapshot().messages == 0
    })
    .await;
    // A moment more, so that a duplicate would have time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = message_ids(&sink);
    let dups: Vec<(&String, &usize)> = ids.iter().filter(|(_, n)| **n > 1).collect();
    let files = maildir_files(&sink).len();
    // (The log is shared by this binary's tests: keep this run's, found at this sink.)
    let texts: Vec<String> = maildir_files(&sink)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    let sent_twice: Vec<String> = tee
        .queue_ids("may arrive twice")
        .into_iter()
        .filter(|q| {
            texts
                .iter()
                .any(|t| t.contains(&format!("with ESMTP id {q}")))
        })
        .collect();
    let mut failed_over = 0;
    while let Ok(e) = events.try_recv() {
        if let RelayEvent::CallFailed { reason, .. } = e
            && (reason.contains(&format!("{b1_ip}:{b1_port}"))
                || reason.contains(&format!("b1.site-b.test:{b1_port}")))
        {
            failed_over += 1;
        }
    }
    let recovered = b1_restarted
        .log()
        .split("recovered=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    eprintln!(
        "failover figures ({}): {MESSAGES} sent; B1's sink cut at {cut} delivered, B1 killed at \
         {at_kill}; {} distinct before B1's restart, {} after; B1 recovered {recovered} \
         spooled messages; {files} files; {} duplicated; {} kept for B1 while it was down \
         (no reply after the end of the message); 20 more through B2 within \
         {failover_took:?}; {failed_over} failed attempts at B1 logged",
        match (n.srv, n.tcp) {
            (Some(_), _) => "SRV: B1 over UDP, B2 over TCP",
            (None, true) => "TCP",
            (None, false) => "UDP",
        },
        before_restart.len(),
        ids.len(),
        dups.len(),
        waiting.len(),
    );
    assert!(
        all,
        "only {} of {MESSAGES} distinct messages arrived, A holds {}:\nB1 restart log:\n{}",
        ids.len(),
        a.queue_snapshot().messages,
        b1_restarted.log()
    );
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert!(
        sent_twice.is_empty(),
        "A gave up waiting for B1 for {sent_twice:?}"
    );
    assert!(
        before_restart.len() < MESSAGES,
        "B1 held nothing undelivered when killed: the restart was not tested"
    );
    assert_eq!(files, MESSAGES, "files at the sink");
    assert!(failed_over >= 1, "no failed attempt at B1 was reported");
    shutdown.trigger();
    a.wait().await;
    drop(b2);
    drop(b1_restarted);
}

/// A relay that is up but refuses with `503` (here: every port of its `sip.media_ports`
/// is taken, so it answers "503 no media port"): A moves to the next relay in the same
/// attempt. A's queue would wait 60 s before a retry, and the mail arrives long before
/// that, so it was not the queue's schedule that moved it; B1 is named with its 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_answering_503_hands_the_mail_to_the_next_in_the_same_attempt() {
    let n = Net {
        a_ip: "127.0.43.60",
        b1_ip: "127.0.43.61",
        b2_ip: "127.0.43.62",
        a_port: 43540,
        b1_port: 43541,
        b2_port: 43542,
        tcp: false,
        srv: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keys(d);
    let sink = d.join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    // B1's only media port, taken before it starts.
    let taken = std::net::TcpListener::bind((n.b1_ip, 43549)).unwrap();
    let c1 = b_config(d, &n, "b1", n.b1_ip, n.b1_port, &sink);
    let text = std::fs::read_to_string(&c1).unwrap();
    assert!(text.contains("call_idle = \"2s\"\n"));
    std::fs::write(
        &c1,
        text.replace(
            "call_idle = \"2s\"\n",
            "call_idle = \"2s\"\nmedia_ports = \"43549-43549\"\n",
        ),
    )
    .unwrap();
    let c2 = b_config(d, &n, "b2", n.b2_ip, n.b2_port, &sink);
    let b1 = Daemon::start(&c1, d.join("b1.log"));
    let b2 = Daemon::start(&c2, d.join("b2.log"));
    wait_up(&n, &[&b1, &b2]).await;
    let mut a_cfg = a_config(d, &n);
    a_cfg.queue.retry_initial = Duration::from_secs(60);
    a_cfg.queue.retry_max = Duration::from_secs(60);
    let shutdown = Shutdown::new();
    let a = sipmail::relay::start(a_cfg, shutdown.clone(), Hooks::default())
        .await
        .unwrap();
    let mut events = a.events();
    let msgs: Vec<Vec<u8>> = (0..5).map(|i| sample_message(i, "refused-503")).collect();
    submit(a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let arrived = wait_until(Duration::from_secs(30), || maildir_files(&sink).len() == 5).await;
    let mut refused = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let RelayEvent::CallFailed { reason, .. } = e {
            refused.push(reason);
        }
    }
    assert!(
        arrived,
        "{} of 5 arrived within 30 s (A's queue retries only after 60 s); failures: {refused:?}\nB2:\n{}",
        maildir_files(&sink).len(),
        b2.log()
    );
    assert!(
        refused
            .iter()
            .any(|r| r.contains("503") && r.contains(&format!("{}:{}", n.b1_ip, n.b1_port))),
        "B1's 503 was not what moved the mail on: {refused:?}"
    );
    assert_eq!(message_ids(&sink).len(), 5, "each message once");
    shutdown.trigger();
    a.wait().await;
    drop(taken);
}

/// The one window every SMTP relay has, made on purpose: B1 takes a message (and delivers
/// it) but its reply to the end of the message is lost, then B1 is killed. A may not send
/// that message to B2, which would deliver it a second time: it keeps it for B1 (a
/// `RelayPin`) while B1 is down, though B2 is up and takes A's other mail, and once B1 is
/// back, B1 recognises the resend and returns its receipt. Delivered once. (Before the
/// pin, A's next call went to B2: delivered twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_dead_relay_may_hold_waits_for_it_and_is_delivered_once() {
    let tee = tee();
    let n = Net {
        a_ip: "127.0.43.40",
        b1_ip: "127.0.43.41",
        b2_ip: "127.0.43.42",
        a_port: 43520,
        b1_port: 43521,
        b2_port: 43522,
        tcp: true,
        srv: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keys(d);
    let sink = d.join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    let c1 = b_config(d, &n, "b1", n.b1_ip, n.b1_port, &sink);
    let c2 = b_config(d, &n, "b2", n.b2_ip, n.b2_port, &sink);
    let mut b1 = Daemon::start(&c1, d.join("b1.log"));
    let b2 = Daemon::start(&c2, d.join("b2.log"));
    wait_up(&n, &[&b1, &b2]).await;
    // The first media connection (A's first call, to B1, first in A's list): once A has
    // sent 150 kB, nothing from B1 gets through, and both sides close a second later.
    let proxy = common::MediaProxy::start_muting((0, 150_000)).await;
    let shutdown = Shutdown::new();
    let a = sipmail::relay::start(a_config(d, &n), shutdown.clone(), proxy.hook())
        .await
        .unwrap();
    let mut msg = b"From: a@site-a.test\r\nTo: bob@site-b.test\r\nSubject: held\r\nMessage-ID: <held@site-a.test>\r\n\r\n".to_vec();
    while msg.len() < 200_000 {
        msg.extend_from_slice(b"0123456789 abcdefghijklmnopqrstuvwxyz 0123456789\r\n");
    }
    submit(a.smtp_addr, &[msg], "bob@site-b.test", |_| {})
        .await
        .unwrap();
    // B1 has it (delivered), A does not know: B1 dies now.
    let taken = wait_until(Duration::from_secs(30), || maildir_files(&sink).len() == 1).await;
    assert!(taken, "B1 did not take the message:\n{}", b1.log());
    b1.kill9();
    let kept = wait_until(Duration::from_secs(20), || {
        let id = a.queue_snapshot_ids();
        id.len() == 1 && tee.kept_for_their_relay().contains(&id[0])
    })
    .await;
    assert!(kept, "A did not keep the message for B1: {}", tee.text());
    // B2 is up and takes A's other mail meanwhile; this message stays for B1.
    let other = sample_message(1, "while-b1-is-down");
    submit(a.smtp_addr, &[other], "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let other_through_b2 =
        wait_until(Duration::from_secs(30), || maildir_files(&sink).len() == 2).await;
    assert!(
        other_through_b2,
        "B2 did not take A's other mail:\n{}",
        b2.log()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        message_ids(&sink).get("<held@site-a.test>"),
        Some(&1),
        "the held message went to B2"
    );
    assert_eq!(a.queue_snapshot().messages, 1, "A no longer holds it");
    // B1 is back: A sends the message to it again; B1 knows it and returns its receipt.
    let b1_back = Daemon::start(&c1, d.join("b1-restart.log"));
    let done = wait_until(Duration::from_secs(30), || a.queue_snapshot().messages == 0).await;
    assert!(done, "A still holds the message:\n{}", b1_back.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(message_ids(&sink).get("<held@site-a.test>"), Some(&1));
    assert_eq!(maildir_files(&sink).len(), 2, "files at the sink");
    let stored = sipmail::receipt::store::ReceiptStore::at(&d.join("var/site-a/spool"))
        .list_sent()
        .unwrap();
    assert_eq!(stored.len(), 2, "a receipt for each message");
    shutdown.trigger();
    a.wait().await;
    drop(b2);
    drop(b1_back);
}

/// A partner's relay that answers every INVITE `503 Service Unavailable` with
/// `Retry-After: secs`, as an overloaded sipmail does (its transaction table or pending
/// calls full). A scripted peer: a real relay cannot be made to shed load on cue. Returns
/// when each new INVITE (by Call-ID) came.
fn overloaded_relay(ip: &str, port: u16, secs: u32) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let seen = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let sock = std::net::UdpSocket::bind((ip, port)).unwrap();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if !text.starts_with("INVITE ") {
                continue; // the ACK for our 503
            }
            let mut resp = String::from("SIP/2.0 503 Service Unavailable\r\n");
            let mut call_id = String::new();
            for line in text.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
                let name = line
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                match name.as_str() {
                    "via" | "v" | "from" | "f" | "cseq" => resp += &format!("{line}\r\n"),
                    "call-id" | "i" => {
                        call_id = line.split_once(':').unwrap().1.trim().to_string();
                        resp += &format!("{line}\r\n");
                    }
                    "to" | "t" => resp += &format!("{line};tag=overloaded\r\n"),
                    _ => {}
                }
            }
            resp += &format!("Retry-After: {secs}\r\nContent-Length: 0\r\n\r\n");
            let _ = sock.send_to(resp.as_bytes(), from);
            let mut log = log.lock().unwrap();
            if !log.iter().any(|(_, c)| *c == call_id) {
                log.push((Instant::now(), call_id));
            }
        }
    });
    seen
}

/// Both of the partner's relays are overloaded and say `Retry-After: 2`: A tries again
/// after about 2 s, not after its queue's back-off (60 s here), and not sooner than 2 s.
/// Before, A ignored Retry-After, and the calls refused at the 10,000-call bench's burst
/// came back a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_is_tried_again_when_the_partner_said() {
    let n = Net {
        a_ip: "127.0.43.70",
        b1_ip: "127.0.43.71",
        b2_ip: "127.0.43.72",
        a_port: 43570,
        b1_port: 43571,
        b2_port: 43572,
        tcp: false,
        srv: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keys(d);
    std::fs::create_dir_all(d.join("sink")).unwrap();
    let b1 = overloaded_relay(n.b1_ip, n.b1_port, 2);
    let b2 = overloaded_relay(n.b2_ip, n.b2_port, 2);
    let mut a_cfg = a_config(d, &n);
    a_cfg.queue.retry_initial = Duration::from_secs(60);
    a_cfg.queue.retry_max = Duration::from_secs(60);
    let shutdown = Shutdown::new();
    let a = sipmail::relay::start(a_cfg, shutdown.clone(), Hooks::default())
        .await
        .unwrap();
    submit(
        a.smtp_addr,
        &[sample_message(0, "retry-after")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let calls = || {
        let mut all: Vec<Instant> = b1.lock().unwrap().iter().map(|(t, _)| *t).collect();
        all.extend(b2.lock().unwrap().iter().map(|(t, _)| *t));
        all.sort();
        all
    };
    let again = wait_until(Duration::from_secs(12), || calls().len() >= 3).await;
    let seen = calls();
    assert!(
        again,
        "A called the overloaded partner {} time(s) in 12 s; with Retry-After: 2 it should have come back",
        seen.len()
    );
    // The first attempt tries both relays at once; the next attempt comes 2 s after it.
    let gap = seen[2].duration_since(seen[1]);
    assert!(
        gap >= Duration::from_millis(1900) && gap < Duration::from_secs(6),
        "next attempt {gap:?} after the refusal; the partner said 2 s"
    );
    shutdown.trigger();
    a.wait().await;
}
