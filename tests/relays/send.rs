//! `sipmail send` end to end (issue 14, "Done means"): two relays, three files sent as
//! attachments, the command exits 0 only once the partner's signed receipt is stored and
//! verifies, and the files appear in B's inbox byte for byte. A partner's attachment whose
//! name tries to leave the inbox is not written there, and its message is still delivered.

use crate::common::*;
use sipmail::demo::{TwoSites, free_port, maildir_files, site_config, submit};
use sipmail::relay::Hooks;
use std::path::Path;
use std::time::Duration;

/// The test bed's configs, A's SMTP on a fixed port (the CLI reads it from the file) and
/// B with an inbox for site-a's attachments. Written to a.toml and b.toml.
fn configs(dir: &Path) -> (sipmail::config::Config, sipmail::config::Config) {
    configs_with(dir, |s| s, |s| s)
}

fn configs_with(
    dir: &Path,
    edit_a: impl Fn(String) -> String,
    edit_b: impl Fn(String) -> String,
) -> (sipmail::config::Config, sipmail::config::Config) {
    sipmail::demo::make_keys(dir).unwrap();
    let (pa, pb, smtp) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let a = site_config(dir, "site-a", "site-b", pa, pb).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{smtp}\""),
    );
    let inbox = dir.join("inbox/site-a");
    let b = site_config(dir, "site-b", "site-a", pb, pa).replace(
        "[[peer]]\ndomain = \"site-a.test\"\n",
        &format!(
            "[[peer]]\ndomain = \"site-a.test\"\ninbox = \"{}\"\n",
            inbox.display()
        ),
    );
    assert!(b.contains("inbox ="), "the edit did not apply");
    let (a, b) = (edit_a(a), edit_b(b));
    std::fs::write(dir.join("a.toml"), &a).unwrap();
    std::fs::write(dir.join("b.toml"), &b).unwrap();
    (
        sipmail::config::Config::parse("a.toml", &a).unwrap(),
        sipmail::config::Config::parse("b.toml", &b).unwrap(),
    )
}

/// The CLI off the runtime's threads: `sipmail send` waits for the relays in this process.
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || sipmail_cli(&args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_files_arrive_in_the_partners_inbox_and_send_exits_0_with_a_verified_receipt() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = configs(dir.path());
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    // Three documents: binary (every byte value), text with CRLF and a lone dot, a name
    // with a space and non-ASCII letters.
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "blob.bin",
            (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect(),
        ),
        ("orders.csv", b"id;qty\r\n1;5\r\n.\r\n2;7\r\n".to_vec()),
        (
            "Rechnung März 2026.xml",
            "<rechnung betrag=\"12,50 €\"/>\n".as_bytes().to_vec(),
        ),
    ];
    let mut args: Vec<String> = vec![
        "send".into(),
        "-c".into(),
        dir.path().join("a.toml").display().to_string(),
        "--to".into(),
        "bob@site-b.test".into(),
        "--wait".into(),
        "60s".into(),
    ];
    for (name, bytes) in &files {
        let p = docs.join(name);
        std::fs::write(&p, bytes).unwrap();
        args.push(p.display().to_string());
    }
    let o = cli(args).await;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "sipmail send failed: {out}");
    assert!(
        out.contains("signed receipt from mail@site-b.test"),
        "{out}"
    );
    assert!(out.contains("Verified."), "{out}");
    let id = out
        .split_whitespace()
        .skip_while(|w| *w != "Queued")
        .nth(2)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    // Byte for byte in B's inbox, nothing left in its tmp/.
    let inbox = dir.path().join("inbox/site-a");
    assert!(
        wait_until(Duration::from_secs(20), || files
            .iter()
            .all(|(n, _)| inbox.join(n).exists()))
        .await
    );
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(inbox.join(name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(std::fs::read_dir(inbox.join("tmp")).unwrap().count(), 0);
    // The receipt verifies again from the store.
    let o = cli(vec![
        "receipts".into(),
        "-c".into(),
        dir.path().join("a.toml").display().to_string(),
        "verify".into(),
        id.clone(),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // And with GnuPG alone, on the export.
    let exp = dir.path().join("export");
    let o = cli(vec![
        "receipts".into(),
        "-c".into(),
        dir.path().join("a.toml").display().to_string(),
        "export".into(),
        id.clone(),
        exp.display().to_string(),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Gpg::new().verify_exported_receipt(&exp);

    // A partner's attachment named to escape the inbox: refused, the message delivered.
    let evil = b"From: a@site-a.test\r\nTo: bob@site-b.test\r\nSubject: evil\r\n\
        MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n\
        --B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
        --B\r\nContent-Type: application/octet-stream\r\n\
        Content-Disposition: attachment; filename=\"../../escaped.txt\"\r\n\r\npwned\r\n\
        --B--\r\n"
        .to_vec();
    let before = maildir_files(&sites.maildir(&sites.b_cfg)).len();
    submit(sites.a.smtp_addr, &[evil], "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&md).len()
            == before + 1)
        .await
    );
    assert!(!dir.path().join("escaped.txt").exists());
    assert!(!dir.path().join("inbox/escaped.txt").exists());
    let names: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), files.len() + 1, "{names:?}"); // + tmp/
    sites.stop().await;
}

#[tokio::test]
async fn send_refuses_a_recipient_that_returns_no_receipt_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    configs(dir.path());
    let f = dir.path().join("x.txt");
    std::fs::write(&f, b"x").unwrap();
    let cfg = dir.path().join("a.toml").display().to_string();
    for (to, why) in [
        ("carol@elsewhere.test", "is not a [[peer]]"),
        ("not-an-address", "not an address"),
    ] {
        let o = cli(vec![
            "send".into(),
            "-c".into(),
            cfg.clone(),
            "--to".into(),
            to.into(),
            f.display().to_string(),
        ])
        .await;
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success() && err.contains(why), "{to}: {err}");
    }
}

/// A's outbox for site-b: a file renamed in goes to `sent/` with B's receipt beside it; a
/// file still being written in place is not taken until it has been left alone; a file
/// B refuses for good (too large for B) goes to `failed/` with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_files_leave_only_to_sent_with_their_receipt_or_to_failed_with_the_reason() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox/site-b");
    let (a, b) = configs_with(
        dir.path(),
        |a| {
            a.replace(
                "[[peer]]\ndomain = \"site-b.test\"\n",
                &format!(
                    "[[peer]]\ndomain = \"site-b.test\"\noutbox = \"{}\"\noutbox_to = [\"docs@site-b.test\"]\n",
                    outbox.display()
                ),
            )
            .replace("retry_max = \"5s\"", "retry_max = \"2s\"")
        },
        // B takes nothing over 100 kB (a permanent 552 for the big file below).
        |b| b.replace("[smtp]\n", "[smtp]\nmax_message_size = 100000\n"),
    );
    assert!(a.peers[0].outbox.is_some(), "the outbox edit did not apply");
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || outbox.join("tmp").exists()).await);
    // 1. Written in tmp/, renamed in.
    let doc = b"order 4711: 12 pallets\r\n".repeat(100);
    std::fs::write(outbox.join("tmp/order-4711.txt"), &doc).unwrap();
    std::fs::rename(
        outbox.join("tmp/order-4711.txt"),
        outbox.join("order-4711.txt"),
    )
    .unwrap();
    // 2. Written in place, slowly: must not be taken while it grows.
    let slow = outbox.join("slow.csv");
    let mut f = std::fs::File::create(&slow).unwrap();
    for i in 0..6 {
        use std::io::Write;
        writeln!(f, "line {i}").unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            slow.exists(),
            "slow.csv was taken while still being written (after {i} lines)"
        );
    }
    drop(f);
    // 3. Too large for B.
    std::fs::write(outbox.join("tmp/huge.bin"), vec![7u8; 150_000]).unwrap();
    std::fs::rename(outbox.join("tmp/huge.bin"), outbox.join("huge.bin")).unwrap();
    let sent = outbox.join("sent");
    assert!(
        wait_until(Duration::from_secs(30), || sent
            .join("order-4711.txt")
            .exists()
            && sent.join("slow.csv").exists())
        .await,
        "not in sent/"
    );
    assert_eq!(std::fs::read(sent.join("order-4711.txt")).unwrap(), doc);
    let inbox = dir.path().join("inbox/site-a");
    assert_eq!(std::fs::read(inbox.join("order-4711.txt")).unwrap(), doc);
    assert_eq!(
        std::fs::read_to_string(inbox.join("slow.csv")).unwrap(),
        (0..6).map(|i| format!("line {i}\n")).collect::<String>()
    );
    // The receipt beside it verifies with B's cert (the keyring of A has it).
    let ka = sipmail::keyring::Keyring::open(&dir.path().join("keyring/site-a")).unwrap();
    let kb = sipmail::keyring::Keyring::open(&dir.path().join("keyring/site-b")).unwrap();
    let b_fpr = kb.own_fingerprint().unwrap();
    // `NAME.txt`/`NAME.sig` in sent/, verified with B's cert.
    let verify_beside = |name: &str| {
        let text = std::fs::read(sent.join(format!("{name}.txt"))).unwrap();
        let sig = std::fs::read(sent.join(format!("{name}.sig"))).unwrap();
        sipmail::receipt::verify(&ka, "site-b.test", &b_fpr, &text, &sig).unwrap()
    };
    let r = verify_beside("order-4711.txt.receipt-1");
    assert_eq!(r.rcpts, vec!["docs@site-b.test".to_string()]);
    // Later B's delivered receipt comes (fetched by A's next call, or at its hang-up) and
    // lands beside the file as well; it verifies and names the same message.
    let delivered = sent.join("order-4711.txt.delivered-1.txt");
    assert!(
        wait_until(Duration::from_secs(30), || delivered.exists()).await,
        "no delivered receipt beside the file in sent/"
    );
    let d = verify_beside("order-4711.txt.delivered-1");
    assert_eq!(d.kind, sipmail::receipt::Kind::Delivered);
    assert_eq!(d.message_sha256, r.message_sha256);
    assert_eq!(d.handoffs[0].rcpt, "docs@site-b.test");
    // The refused one: in failed/ with its reason, never in sent/.
    let failed = outbox.join("failed");
    assert!(
        wait_until(Duration::from_secs(30), || failed.join("huge.bin").exists()).await,
        "huge.bin not in failed/"
    );
    let reason = std::fs::read_to_string(failed.join("huge.bin.reason.txt")).unwrap();
    assert!(
        reason.contains("552") || reason.contains("size"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read(failed.join("huge.bin")).unwrap(),
        vec![7u8; 150_000]
    );
    assert!(!sent.join("huge.bin").exists());
    // Nothing left behind in the outbox itself or in .work/.
    let left: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !["tmp", ".work", ".delivered", "sent", "failed"].contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The claim's state (`.work/NAME.qid`, `.queued`) goes only after the file's move is
    // durable, so it may outlive the moment the file shows up in failed/ by a little.
    let work = outbox.join(".work");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&work)
            .unwrap()
            .count()
            == 0)
        .await,
        "left in .work: {:?}",
        std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    sites.stop().await;
}
