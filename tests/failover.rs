//! Several relays per site (issue 13, item 4): site B runs two relays, each a separate
//! `sipmail run` process with its own spool and its own key bound to site-b.test, both
//! delivering into one Maildir (the sink). Site A (in this process) lists both in its
//! `[[peer]] sip`, over UDP (where a relay killed with SIGKILL sends nothing back) and over
//! TCP (where its port refuses the connection). A sends
//! 200 messages; B1 is killed mid-run; A goes on through B2 within seconds (not at the
//! queue's next retry); B1 is restarted to drain what it had accepted. Every message is
//! delivered, and exactly once except where A itself logged the one window every SMTP
//! relay has (B1 killed after the end of a message, before A read its reply: A sends it
//! again, "may arrive twice"): the Message-IDs at the sink are counted, and a duplicate
//! A did not flag fails the test.
//!
//! Loopback block 127.0.43.0/24, ports 43500-43599.

mod common;

use common::wait_until;
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

/// Relay A's log, kept for the assertions (this binary's one test owns the subscriber).
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

    /// A's queue IDs of the messages it sent again after a relay died between the end of
    /// the message and its reply: RFC 5321 §6.1's window, where the relay may already
    /// have taken the message (A's own log line: "... may arrive twice ...").
    fn sent_twice_maybe(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("may arrive twice"))
            .filter_map(|l| l.split("queue_id=").nth(1))
            .filter_map(|r| r.split_whitespace().next().map(str::to_string))
            .collect()
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
    })
    .await;
}

async fn killed_mid_run(n: Net) {
    let tee = tee();
    let (a_ip, b1_ip, b2_ip) = (n.a_ip, n.b1_ip, n.b2_ip);
    let (a_port, b1_port, b2_port) = (n.a_port, n.b1_port, n.b2_port);
    let transport = if n.tcp { ";transport=tcp" } else { "" };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Keys: A, and B1 and B2 each with its own key bound to site-b.test; A's keyring holds
    // both of B's certs, each of B's keyrings holds A's.
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
    let sink = d.join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    // B1 reaches the sink through a link, so that the test can cut its delivery just
    // before the kill: B1 then dies holding mail it accepted (and A was told 250 for) but
    // had not delivered, which its restart must deliver, once.
    let b1_sink = d.join("b1-sink");
    std::os::unix::fs::symlink(&sink, &b1_sink).unwrap();
    let c1 = b_config(d, &n, "b1", b1_ip, b1_port, &b1_sink);
    let c2 = b_config(d, &n, "b2", b2_ip, b2_port, &sink);
    let mut b1 = Daemon::start(&c1, d.join("b1.log"));
    let b2 = Daemon::start(&c2, d.join("b2.log"));

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
sip = ["sip:mail@{b1_ip}:{b1_port}{transport}", "sip:mail@{b2_ip}:{b2_port}{transport}"]
[delivery]
maildir = "{md}"
[queue]
retry_initial = "1s"
retry_max = "5s"
"#,
        kr = ka.display(),
        sp = d.join("var/site-a/spool").display(),
        md = d.join("var/site-a/maildir").display(),
    );
    let a_cfg = sipmail::config::Config::parse("a.toml", &a_text).unwrap();
    let shutdown = Shutdown::new();
    let a = sipmail::relay::start(a_cfg, shutdown.clone(), Hooks::default())
        .await
        .unwrap();
    let mut events = a.events();
    // Both of B's relays are up (their SIP ports answer) before mail goes.
    for (ip, port) in [(b1_ip, b1_port), (b2_ip, b2_port)] {
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect((ip, port)).is_ok()
        })
        .await;
        assert!(
            up,
            "relay {ip}:{port} did not start:\n{}\n{}",
            b1.log(),
            b2.log()
        );
    }

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

    // Everything A still holds goes through B2; A's queue empties.
    let drained = wait_until(Duration::from_secs(90), || a.queue_snapshot().messages == 0).await;
    assert!(
        drained,
        "A still holds {} messages",
        a.queue_snapshot().messages
    );
    let before_restart = message_ids(&sink);
    std::fs::remove_file(&b1_sink).unwrap();
    std::os::unix::fs::symlink(&sink, &b1_sink).unwrap();
    // B1 restarts on its spool and delivers what it had accepted.
    let b1_restarted = Daemon::start(&c1, d.join("b1-restart.log"));
    let all = wait_until(Duration::from_secs(60), || {
        message_ids(&sink).len() == MESSAGES
    })
    .await;
    // A moment more, so that a duplicate would have time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = message_ids(&sink);
    let dups: Vec<(&String, &usize)> = ids.iter().filter(|(_, n)| **n > 1).collect();
    // A duplicate is allowed only for a message A itself flagged as possibly taken by B1
    // just before B1 died (no reply after the end of the message): the window every SMTP
    // relay has, which A logs. Any other duplicate is a bug.
    // (The log is shared by this binary's tests: keep this run's, found at this sink.)
    let texts: Vec<String> = maildir_files(&sink)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    let flagged: Vec<String> = tee
        .sent_twice_maybe()
        .into_iter()
        .filter(|q| {
            texts
                .iter()
                .any(|t| t.contains(&format!("with ESMTP id {q}")))
        })
        .collect();
    let unexplained: Vec<&String> = dups
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| {
            !texts.iter().any(|text| {
                text.contains(id.as_str())
                    && flagged
                        .iter()
                        .any(|q| text.contains(&format!("with ESMTP id {q}")))
            })
        })
        .collect();
    let files = maildir_files(&sink).len();
    let mut failed_over = 0;
    while let Ok(e) = events.try_recv() {
        if let RelayEvent::CallFailed { reason, .. } = e
            && reason.contains(&format!("{b1_ip}:{b1_port}"))
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
         spooled messages; {files} files; {} duplicated ({} unexplained; A flagged {} as \
         sent again after no reply to the end of the message); 20 more through B2 within \
         {failover_took:?}; {failed_over} failed attempts at B1 logged",
        if n.tcp { "TCP" } else { "UDP" },
        before_restart.len(),
        ids.len(),
        dups.len(),
        unexplained.len(),
        flagged.len(),
    );
    assert!(
        all,
        "only {} of {MESSAGES} distinct messages arrived:\nB1 restart log:\n{}",
        ids.len(),
        b1_restarted.log()
    );
    assert!(
        unexplained.is_empty(),
        "duplicates A did not flag: {unexplained:?} (all duplicates {dups:?})"
    );
    assert!(
        dups.len() <= flagged.len(),
        "{} duplicates, {} flagged",
        dups.len(),
        flagged.len()
    );
    assert!(
        before_restart.len() < MESSAGES,
        "B1 held nothing undelivered when killed: the restart was not tested"
    );
    assert_eq!(
        files,
        MESSAGES + dups.iter().map(|(_, n)| **n - 1).sum::<usize>(),
        "files at the sink"
    );
    assert!(failed_over >= 1, "no failed attempt at B1 was reported");
    shutdown.trigger();
    a.wait().await;
    drop(b2);
    drop(b1_restarted);
}
