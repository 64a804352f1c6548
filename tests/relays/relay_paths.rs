//! The other paths of the first issue: SIP over TCP, delivery by SMTP to the site's MTA,
//! a peer that is down, an unknown caller, and relay policy.

use crate::common::*;
use sipmail::demo::{TwoSites, delivered_intact, free_port, maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::relay::{self, Hooks, RelayEvent, Shutdown};
use sipmail::smtp::{ClientTimeouts, SmtpClient};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_sip_tcp() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(
        dir.path(),
        |s| s.replace("\"\n[delivery]", ";transport=tcp\"\n[delivery]"),
        |s| s,
    );
    assert!(a.peers[0].sip[0].tcp);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let msgs: Vec<Vec<u8>> = (0..3).map(|i| sample_message(i, "tcp")).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 3).await);
    sites.stop().await;
}

const PY_SINK: &str = r#"
import sys, os, warnings
warnings.simplefilter("ignore")
import smtpd, asyncore
out = sys.argv[1]
reject = len(sys.argv) > 2
n = [0]
class S(smtpd.SMTPServer):
    def process_message(self, peer, mailfrom, rcpttos, data, **kw):
        if reject:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % rcpttos[0]
        n[0] += 1
        p = os.path.join(out, "%d" % n[0])
        with open(p + ".tmp", "wb") as f:
            f.write(data)
        os.rename(p + ".tmp", p + ".eml")
s = S(("127.0.0.1", 0), None, decode_data=False)
print(s.socket.getsockname()[1], flush=True)
asyncore.loop(timeout=0.05)
"#;

/// Site B hands mail for its domain to "the local MTA" by SMTP: here Python's smtpd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_by_smtp_to_the_local_mta() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    let (port, _child) = python_sink(&sink, false).await;
    let (a, b) = edited_configs(dir.path(), |s| s, |s| deliver_by_smtp(s, port));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let msg = sample_message(7, "smtp-delivery");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let got = || {
        std::fs::read_dir(&sink)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(20), || got().len() == 1).await,
        "nothing reached the local MTA"
    );
    let data = std::fs::read(&got()[0]).unwrap();
    // smtpd hands over the data without the final CRLF and with CRLF line ends kept.
    let body_marker = b"Hello Bob, this is message 7.";
    assert!(data.windows(body_marker.len()).any(|w| w == body_marker));
    assert!(
        data.starts_with(b"Received: from "),
        "B adds its trace header"
    );
    assert!(
        wait_until(Duration::from_secs(5), || sites.b.queue_snapshot().messages
            == 0)
        .await
    );
    sites.stop().await;
}

/// Site B is down: A keeps the mail queued, retries with backoff, and delivers once B is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_down_gets_its_mail_later() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a_cfg, b_cfg) = edited_configs(dir.path(), |s| s, |s| s);
    let sd_a = Shutdown::new();
    let a = relay::start(a_cfg, sd_a.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev = a.events();
    let msg = sample_message(1, "down");
    submit(
        a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let failed = wait_event(&mut ev, 40, |e| matches!(e, RelayEvent::CallFailed { .. })).await;
    assert!(failed.is_some(), "A did not notice that B is down");
    assert_eq!(a.queue_snapshot().messages, 1);
    let sd_b = Shutdown::new();
    let b = relay::start(b_cfg.clone(), sd_b.clone(), Hooks::default())
        .await
        .unwrap();
    let md = match &b_cfg.delivery {
        sipmail::config::Delivery::Maildir(m) => m.clone(),
        _ => unreachable!(),
    };
    assert!(
        wait_until(Duration::from_secs(40), || maildir_files(&md).len() == 1).await,
        "not delivered after B came up"
    );
    assert!(delivered_intact(
        &std::fs::read(&maildir_files(&md)[0]).unwrap(),
        &msg
    ));
    assert!(wait_until(Duration::from_secs(5), || a.queue_snapshot().messages == 0).await);
    sd_a.trigger();
    sd_b.trigger();
    a.wait().await;
    b.wait().await;
}

/// A relay whose key B does not hold (site C), and a known domain presenting a key B does
/// not know, both get 403; nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_not_in_the_keyring_get_403() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a_cfg, b_cfg) = edited_configs(dir.path(), |s| s, |s| s);
    // An impostor for site-a.test: its own fresh key, B's cert, same config otherwise.
    let evil_kr = dir.path().join("keyring/evil-a");
    Keyring::generate(&evil_kr, "site-a.test").unwrap();
    let b_pub = Keyring::open(&b_cfg.keyring)
        .unwrap()
        .export_public()
        .unwrap();
    Keyring::import(&evil_kr, b_pub.as_bytes()).unwrap();
    let mut evil_cfg = a_cfg.clone();
    evil_cfg.keyring = evil_kr;
    evil_cfg.spool = dir.path().join("var/evil/spool");
    evil_cfg.sip_listen = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    evil_cfg.delivery = sipmail::config::Delivery::Maildir(dir.path().join("var/evil/maildir"));

    let sd = Shutdown::new();
    let b = relay::start(b_cfg.clone(), sd.clone(), Hooks::default())
        .await
        .unwrap();
    let evil = relay::start(evil_cfg, sd.clone(), Hooks::default())
        .await
        .unwrap();
    let mut ev = evil.events();
    submit(
        evil.smtp_addr,
        &[sample_message(1, "evil")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let e = wait_event(&mut ev, 20, |e| matches!(e, RelayEvent::CallFailed { .. })).await;
    match e {
        Some(RelayEvent::CallFailed { reason, .. }) => assert!(reason.contains("403"), "{reason}"),
        other => panic!("expected a refused call, got {other:?}"),
    }
    assert_eq!(
        evil.queue_snapshot().messages,
        1,
        "the mail must stay queued"
    );
    let md = match &b_cfg.delivery {
        sipmail::config::Delivery::Maildir(m) => m.clone(),
        _ => unreachable!(),
    };
    assert!(maildir_files(&md).is_empty());
    sd.trigger();
    b.wait().await;
    evil.wait().await;
}

/// Mail to a domain that is neither ours nor a partner's is refused at RCPT; clients
/// outside smtp.allow may only send to our own domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_policy() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a_cfg, _) = edited_configs(
        dir.path(),
        |s| s.replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.2/32\"]"),
        |s| s,
    );
    let sd = Shutdown::new();
    let a = relay::start(a_cfg, sd.clone(), Hooks::default())
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(a.smtp_addr).await.unwrap();
    let mut c = SmtpClient::connect(tcp, "client.test", ClientTimeouts::default())
        .await
        .unwrap();
    let o = c
        .send(
            "x@outside.test",
            &[
                "bob@site-b.test".into(),
                "carol@elsewhere.test".into(),
                "alice@site-a.test".into(),
            ],
            &b"Subject: t\r\n\r\nx\r\n"[..],
        )
        .await
        .unwrap();
    assert_eq!(o.per_rcpt[0].1.code, 550, "{:?}", o.per_rcpt[0]);
    assert_eq!(o.per_rcpt[0].1.enhanced, Some((5, 7, 1)));
    assert_eq!(o.per_rcpt[1].1.code, 550);
    assert_eq!(o.per_rcpt[1].1.enhanced, Some((5, 7, 1)));
    assert_eq!(
        o.per_rcpt[2].1.code, 250,
        "our own domain is accepted from anyone"
    );
    assert!(o.data.as_ref().is_some_and(|d| d.code == 250));
    let _ = c.quit().await;
    // From inside smtp.allow (127.0.0.2), the partner domain is accepted, others are not.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(a.smtp_addr).await.unwrap();
    let mut c = SmtpClient::connect(tcp, "client.test", ClientTimeouts::default())
        .await
        .unwrap();
    let o = c
        .send(
            "x@site-a.test",
            &["bob@site-b.test".into(), "carol@elsewhere.test".into()],
            &b"Subject: t\r\n\r\nx\r\n"[..],
        )
        .await
        .unwrap();
    assert_eq!(o.per_rcpt[0].1.code, 250);
    assert_eq!(o.per_rcpt[1].1.code, 550);
    assert_eq!(o.per_rcpt[1].1.enhanced, Some((5, 7, 1)));
    let _ = c.quit().await;
    sd.trigger();
    a.wait().await;
}

/// Python's smtpd as the site's local MTA; it keeps each message in `dir`, or refuses
/// every message with 550 5.1.1 when `reject` is set.
async fn python_sink(dir: &std::path::Path, reject: bool) -> (u16, tokio::process::Child) {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(PY_SINK).arg(dir);
    if reject {
        cmd.arg("reject");
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 not found");
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .expect("python smtpd did not start (needs Python <= 3.11)");
    (port, child)
}

fn deliver_by_smtp(s: String, port: u16) -> String {
    let start = s.find("maildir = ").unwrap();
    let end = s[start..].find('\n').unwrap() + start;
    format!("{}smtp = \"127.0.0.1:{port}\"{}", &s[..start], &s[end..])
}

/// B's local MTA refuses the recipient for good: B returns an RFC 3464 report to the
/// sender, through a call back to site A, into A's Maildir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_bounces_to_the_sender() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink");
    std::fs::create_dir_all(&sink).unwrap();
    let (port, _child) = python_sink(&sink, true).await;
    let (a, b) = edited_configs(dir.path(), |s| s, |s| deliver_by_smtp(s, port));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let msg = sample_message(3, "bounce");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "nobody@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md_a = sites.maildir(&sites.a_cfg);
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md_a).len() == 1).await,
        "no bounce reached the sender"
    );
    let dsn = std::fs::read(&maildir_files(&md_a)[0]).unwrap();
    let text = String::from_utf8_lossy(&dsn);
    assert!(
        text.contains("Return-Path: <>"),
        "a bounce has the null sender:\n{text}"
    );
    assert!(text.contains("Delivered-To: alice@site-a.test"));
    assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status"));
    assert!(text.contains("Final-Recipient: rfc822; nobody@site-b.test"));
    assert!(text.contains("Status: 5.1.1"));
    assert!(
        text.contains("Message-ID: <demo-bounce-3@site-a.test>"),
        "original headers are returned"
    );
    assert!(!text.contains("Hello Bob"), "the body is not returned");
    assert!(
        wait_until(Duration::from_secs(5), || sites.a.queue_snapshot().messages
            == 0
            && sites.b.queue_snapshot().messages == 0)
        .await,
        "both queues empty: A {:?}, B {:?}",
        sites.a.queue_snapshot(),
        sites.b.queue_snapshot()
    );
    sites.stop().await;
}

/// A site's message goes to the scheduler once its files are in A's `queue/`, while its
/// flushes run (docs/ARCHITECTURE.md, "Commit and hand-off overlap"). Here the disk
/// fails the flush after the lane has handed the message to B: the client must hear 451
/// (it keeps the message and sends it again), A must take the message back out of its
/// queue and report that it had been handed over (the warning "may arrive twice"), and
/// the resend goes through. Nothing hangs, nothing is lost; the one duplicate is the
/// announced one. (A message no lane had taken yet must never be handed over once
/// withdrawn: the scheduler's unit test `a_withdrawn_message_is_forgotten_and_says_whether_a_lane_had_it`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_fails_after_the_hand_off_answers_451_and_announces_the_copy() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let hooks = Hooks {
        spool_dir_sync: Some(Arc::new(move || {
            if f.load(Ordering::SeqCst) {
                // Slow, then failed: the lane has handed the message over meanwhile.
                std::thread::sleep(Duration::from_millis(1500));
                return Err(std::io::Error::other("injected: the disk failed the flush"));
            }
            Ok(())
        })),
        ..Hooks::default()
    };
    let sites = TwoSites::start(dir.path(), hooks).await.unwrap();
    let md = sites.maildir(&sites.b_cfg);
    // A first message sets the call up.
    submit(
        sites.a.smtp_addr,
        &[sample_message(0, "flush")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await);
    let mut events = sites.a.events();
    failing.store(true, Ordering::SeqCst);
    let second = sample_message(1, "flush");
    let refused = submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&second),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("451"), "not a 451: {refused}");
    let withdrawn = match wait_event(&mut events, 10, |e| {
        matches!(e, RelayEvent::Withdrawn { .. })
    })
    .await
    {
        Some(RelayEvent::Withdrawn { handed_over, .. }) => handed_over,
        other => panic!("no Withdrawn event: {other:?}"),
    };
    assert!(
        withdrawn,
        "the lane had not handed the message over: the test proves nothing"
    );
    // What the client does with a 451: it sends the message again, to a disk that works.
    failing.store(false, Ordering::SeqCst);
    submit(sites.a.smtp_addr, &[second], "bob@site-b.test", |_| {})
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 3).await,
        "B's Maildir holds {} messages, not 3 (the first, the one handed over before the flush failed, its resend)",
        maildir_files(&md).len()
    );
    assert!(
        wait_until(Duration::from_secs(10), || sites
            .a
            .queue_snapshot()
            .messages
            == 0)
        .await,
        "A's queue did not empty: {:?}",
        sites.a.queue_snapshot()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(maildir_files(&md).len(), 3, "a copy more than announced");
    sites.stop().await;
}
