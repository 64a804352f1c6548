//! Signed receipts and exactly-once delivery between two real relays (issue 14).
//!
//! Every message A sends through a signed call comes back with B's signed receipt, which A
//! checks and stores before it forgets the message. B remembers what it accepted, so a
//! resend after a lost reply is not delivered twice. A partner that lies in its receipt
//! (a tampered byte, another key, another message, a call that never was) is caught on
//! the wire: the message is not counted as delivered and stays queued.

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::receipt::Receipt;
use sipmail::receipt::store::ReceiptStore;
use sipmail::receipt::wire::Signed;
use sipmail::relay::Hooks;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn a_store(sites: &TwoSites) -> ReceiptStore {
    ReceiptStore::at(&sites.a_cfg.spool)
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Where, in a file B delivered, the bytes a receipt's `message-sha256` attests begin: at
/// a line starting "Received: from " (A's trace line; B's own come before it).
fn attested_from(delivered: &[u8], sha256: &str) -> Option<usize> {
    (0..delivered.len()).find(|&i| {
        (i == 0 || delivered[..i].ends_with(b"\r\n"))
            && delivered[i..].starts_with(b"Received: from ")
            && sha256_hex(&delivered[i..]) == sha256
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_comes_back_with_a_verified_receipt_stored_before_it_is_forgotten() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let msgs: Vec<Vec<u8>> = (0..3).map(|i| sample_message(i, "receipts")).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 3).await);
    assert!(a_queue_empties(&sites, 10).await);
    // B hands each message on and signs a delivered receipt; A fetches it through the
    // call once the lane is idle, checks it and stores it beside the accepted one.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let sent = a_store(&sites).list_sent().unwrap();
            sent.len() == 3 && sent.iter().all(|r| r.delivered.len() == 1)
        })
        .await,
        "A has not got every delivered receipt: {:?}",
        a_store(&sites).list_sent().unwrap()
    );
    let sent = a_store(&sites).list_sent().unwrap();
    assert_eq!(sent.len(), 3, "one stored receipt record per message");
    let kb = Keyring::open(&dir.path().join("keyring/site-b")).unwrap();
    let ka = Keyring::open(&dir.path().join("keyring/site-a")).unwrap();
    let b_fpr = kb.own_fingerprint().unwrap();
    let mut hashes = Vec::new();
    for rec in &sent {
        assert_eq!(rec.peer, "site-b.test");
        assert_eq!(rec.fingerprint, b_fpr);
        assert_eq!(rec.receipts.len(), 1);
        let s = rec.receipts[0].to_signed().unwrap();
        // A's keyring (B's cert in it) verifies it; it names B, A, A's queue ID.
        let r = sipmail::receipt::verify(&ka, "site-b.test", &b_fpr, &s.text, &s.sig).unwrap();
        assert_eq!(r.sender, "site-a.test");
        assert_eq!(r.sender_queue_id, rec.queue_id);
        assert_eq!(r.rcpts, vec!["bob@site-b.test".to_string()]);
        assert_eq!(r.transcript_sha256.len(), 64);
        hashes.push(r.message_sha256.clone());
        // The delivered receipt repeats the accepted one and names the Maildir file.
        let d = rec.delivered[0].to_signed().unwrap();
        let d = sipmail::receipt::verify(&ka, "site-b.test", &b_fpr, &d.text, &d.sig).unwrap();
        assert_eq!(d.kind, sipmail::receipt::Kind::Delivered);
        assert_eq!(
            sipmail::receipt::check_delivered(&d, std::slice::from_ref(&r)).unwrap(),
            vec!["bob@site-b.test".to_string()]
        );
        let to = d.handoffs[0].to.strip_prefix("maildir ").unwrap();
        assert!(md.join(to).is_file(), "no Maildir file {to}");
        assert!(d.handoffs[0].at_unix_ms >= r.committed_unix_ms);
    }
    let issued =
        sites.b.metrics_text().lines().any(|l| {
            l.starts_with("sipmail_delivered_receipts_issued_total{") && l.ends_with(" 3")
        });
    assert!(issued, "B did not count 3 delivered receipts");
    // The hash is of the bytes B received: A's queued body (with A's Received line), and
    // what B delivered is that after B's own trace lines.
    for f in maildir_files(&md) {
        let delivered = std::fs::read(&f).unwrap();
        let found = hashes
            .iter()
            .any(|h| attested_from(&delivered, h).is_some());
        assert!(found, "no receipt attests the bytes delivered in {f:?}");
    }
    // The operator's and the auditor's view: `sipmail receipts verify`, then GnuPG alone
    // on an export. A flipped byte in the exported text fails gpg.
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        sipmail::demo::site_config(dir.path(), "site-a", "site-b", 1, 2),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = sipmail_cli(&["receipts", "-c", cfg, "verify", "--all"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "receipts verify: {out}");
    assert_eq!(
        out.matches("good receipt from mail@site-b.test").count(),
        3,
        "{out}"
    );
    assert_eq!(
        out.matches("good delivered receipt from mail@site-b.test")
            .count(),
        3,
        "{out}"
    );
    assert!(out.contains("6 receipt(s), 0 bad"), "{out}");
    let o = sipmail_cli(&["receipts", "-c", cfg, "list"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(&sent[0].queue_id));
    let exp = dir.path().join("export");
    let o = sipmail_cli(&[
        "receipts",
        "-c",
        cfg,
        "export",
        &sent[0].queue_id,
        exp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gpg = Gpg::new();
    let status = gpg.verify_exported_receipt(&exp);
    assert!(status.contains(&b_fpr), "gpg names another key: {status}");
    let o = gpg.verify_files(&exp.join("delivered-1.sig"), &exp.join("delivered-1.txt"));
    let status = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && status.contains("[GNUPG:] GOODSIG"),
        "gpg on the delivered receipt: {status}"
    );
    let mut t = std::fs::read(exp.join("receipt-1.txt")).unwrap();
    t[20] ^= 0x20;
    std::fs::write(exp.join("receipt-1.txt"), &t).unwrap();
    let o = gpg.verify_files(&exp.join("receipt-1.sig"), &exp.join("receipt-1.txt"));
    assert!(!o.status.success(), "gpg accepted a tampered receipt");
    // And sipmail refuses a tampered stored receipt.
    // The record is the newest line of its queue ID in the sent log (one segment here).
    let stored = dir.path().join("var/site-a/spool/receipts/sent/1.log");
    let log = std::fs::read_to_string(&stored).unwrap();
    let key = format!("{{\"key\":\"{}\"", sent[0].queue_id);
    let mut lines: Vec<String> = log.lines().map(str::to_string).collect();
    let newest = lines
        .iter()
        .rposition(|l| l.starts_with(&key))
        .expect("the record's line");
    assert!(
        lines[newest].contains("bob@site-b.test"),
        "{}",
        lines[newest]
    );
    lines[newest] = lines[newest].replacen("bob@site-b.test", "eve@site-b.test", 1);
    std::fs::write(&stored, lines.join("\n") + "\n").unwrap();
    let o = sipmail_cli(&["receipts", "-c", cfg, "verify", &sent[0].queue_id]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!o.status.success() && out.contains("BAD receipt"), "{out}");
    sites.stop().await;
}

/// A big message (several chunks, so A hashes it on its spool writer's thread and B on a
/// thread of its own) with dot-stuffed lines: A checks B's receipt against the digest it
/// kept when it spooled the message, and that digest is of the bytes B delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_message_is_checked_against_the_digest_kept_at_spooling() {
    big_message_gets_a_matching_receipt(Hooks::default(), 1_200_000).await;
}

/// The same for a big message spooled without its digest (as by a relay before run 37):
/// A hashes it as it sends it, on a thread of its own beyond the first chunk, while the
/// SMTP client waits for that thread without blocking its worker
/// (`smtp::client::Observe`), and B's receipt matches that hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_message_spooled_without_a_digest_is_hashed_as_it_is_sent() {
    let hooks = Hooks {
        spool_without_digest: true,
        ..Hooks::default()
    };
    big_message_gets_a_matching_receipt(hooks, 3_000_000).await;
}

/// A message of about `size` bytes with dot-stuffed lines, from A to B: A takes B's
/// receipt (it matched A's hash), and the receipt attests the bytes B delivered.
async fn big_message_gets_a_matching_receipt(hooks_a: Hooks, size: usize) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), hooks_a).await.unwrap();
    let mut big =
        b"From: alice@site-a.test\r\nTo: bob@site-b.test\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0usize;
    while big.len() < size {
        let dot = if i.is_multiple_of(5) { "." } else { "" };
        big.extend_from_slice(format!("{dot}{i:08} {}\r\n", "z".repeat(i % 90)).as_bytes());
        i += 1;
    }
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&big),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await);
    assert!(
        a_queue_empties(&sites, 10).await,
        "A did not take B's receipt: its hash of what it sent did not match"
    );
    let sent = a_store(&sites).list_sent().unwrap();
    assert_eq!(sent.len(), 1);
    let signed = sent[0].receipts[0].to_signed().unwrap();
    let r = Receipt::parse(signed.text.as_ref()).unwrap();
    // B's own trace lines come first; the receipt attests what B received, from A's on.
    let delivered = std::fs::read(&maildir_files(&md)[0]).unwrap();
    let at = attested_from(&delivered, &r.message_sha256)
        .expect("the receipt attests the delivered bytes from a Received line on");
    assert_eq!(r.message_size, (delivered.len() - at) as u64);
    assert!(
        delivered.ends_with(&big[big.len() - 200..]),
        "the body arrived whole"
    );
    sites.stop().await;
}

/// A's reply to the end of the data is lost (the proxy swallows it and closes): A sends
/// again on a new call, B recognises the message and returns the receipt it signed on the
/// first call, and the message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_lost_reply_gets_the_original_receipt_and_is_not_delivered_twice() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // Mute B's replies on the first media connection once A has sent 150 kB of the data.
    let proxy = MediaProxy::start_muting((0, 150_000)).await;
    let sites = TwoSites::start(dir.path(), proxy.hook()).await.unwrap();
    let mut msg = b"From: a@site-a.test\r\nTo: bob@site-b.test\r\nSubject: resend\r\nMessage-ID: <resend@site-a.test>\r\n\r\n".to_vec();
    while msg.len() < 200_000 {
        msg.extend_from_slice(b"0123456789 abcdefghijklmnopqrstuvwxyz 0123456789\r\n");
    }
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(a_queue_empties(&sites, 40).await, "A never got a receipt");
    assert!(
        proxy.connections.load(Ordering::SeqCst) >= 2,
        "the first reply was not lost"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(maildir_files(&md).len(), 1, "delivered more than once");
    let sent = a_store(&sites).list_sent().unwrap();
    assert_eq!(sent.len(), 1);
    let kb = Keyring::open(&dir.path().join("keyring/site-b")).unwrap();
    let r = Receipt::parse(sent[0].receipts[0].text.as_bytes()).unwrap();
    assert_eq!(r.message_id.as_deref(), Some("<resend@site-a.test>"));
    assert_eq!(r.receiver_fingerprint, kb.own_fingerprint().unwrap());
    // B's metrics say it suppressed one duplicate.
    let dup = sites
        .b
        .metrics_text()
        .lines()
        .any(|l| l.starts_with("sipmail_duplicates_suppressed_total{") && l.ends_with(" 1"));
    assert!(dup, "B did not count the suppressed duplicate");
    sites.stop().await;
}

/// How B lies, once the switch is on.
#[derive(Clone, Copy, Debug)]
enum Lie {
    FlipAByte,
    OtherKey,
    OtherMessage,
    OtherCall,
}

/// B rewrites its receipts while `on`; the first honest receipt is kept for replay.
fn lying_b(dir: &std::path::Path, lie: Lie, on: Arc<AtomicBool>) -> Hooks {
    let kb = dir.join("keyring/site-b");
    let other = dir.join("keyring/mallory");
    Keyring::generate(&other, "site-b.test").unwrap();
    let first: Arc<Mutex<Option<Signed>>> = Arc::default();
    Hooks {
        receipt_reply: Some(Arc::new(move |mut v: Vec<Signed>| {
            let mut keep = first.lock().unwrap();
            if keep.is_none() {
                *keep = v.first().cloned();
            }
            if !on.load(Ordering::SeqCst) {
                return v;
            }
            let resign = |r: &Receipt, with: &std::path::Path| {
                let k = Keyring::open(with).unwrap();
                let (text, sig) = sipmail::receipt::sign(&k, r).unwrap();
                Signed { text, sig }
            };
            let s = &mut v[0];
            let mut r = Receipt::parse(&s.text).unwrap();
            match lie {
                Lie::FlipAByte => {
                    let i = s.text.len() / 2;
                    s.text[i] ^= 0x01;
                }
                Lie::OtherKey => {
                    let k = Keyring::open(&other).unwrap();
                    r.receiver_fingerprint = k.own_fingerprint().unwrap();
                    *s = resign(&r, &other);
                }
                Lie::OtherMessage => {
                    if let Some(old) = keep.clone() {
                        *s = old;
                    }
                }
                Lie::OtherCall => {
                    r.call_id = format!("forged-{}", r.call_id);
                    *s = resign(&r, &kb);
                }
            }
            v
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_receipt_is_refused_the_message_stays_queued_and_is_never_delivered_twice() {
    for lie in [
        Lie::FlipAByte,
        Lie::OtherKey,
        Lie::OtherMessage,
        Lie::OtherCall,
    ] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let on = Arc::new(AtomicBool::new(false));
        let (a, b) = edited_configs(dir.path(), |s| s, |s| s);
        let hooks_b = lying_b(dir.path(), lie, on.clone());
        let sites = TwoSites::start_with_hooks(dir.path(), a, b, Hooks::default(), hooks_b)
            .await
            .unwrap();
        let md = sites.maildir(&sites.b_cfg);
        // A first, honest message (its receipt is what B replays for OtherMessage).
        let first = sample_message(0, &format!("{lie:?}"));
        submit(sites.a.smtp_addr, &[first], "bob@site-b.test", |_| {})
            .await
            .unwrap();
        assert!(a_queue_empties(&sites, 20).await);
        on.store(true, Ordering::SeqCst);
        let second = sample_message(1, &format!("{lie:?}"));
        submit(sites.a.smtp_addr, &[second], "bob@site-b.test", |_| {})
            .await
            .unwrap();
        // B has it (it was honestly received), A does not count it delivered: it stays
        // queued through several retries (retry_initial = 1s), and B delivers it once.
        assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 2).await);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            sites.a.queue_snapshot().messages,
            1,
            "{lie:?}: a message with a lying receipt left A's queue"
        );
        assert_eq!(a_store(&sites).list_sent().unwrap().len(), 1, "{lie:?}");
        let refused = sites
            .a
            .metrics_text()
            .lines()
            .any(|l| l.starts_with("sipmail_receipts_refused_total{") && !l.ends_with(" 0"));
        assert!(refused, "{lie:?}: A did not count a refused receipt");
        // B stops lying: the next retry gets the true receipt; still one copy delivered.
        on.store(false, Ordering::SeqCst);
        assert!(
            a_queue_empties(&sites, 20).await,
            "{lie:?}: not delivered after B told the truth"
        );
        assert_eq!(maildir_files(&md).len(), 2, "{lie:?}: delivered twice");
        assert_eq!(a_store(&sites).list_sent().unwrap().len(), 2, "{lie:?}");
        sites.stop().await;
    }
}

/// The sum of a counter's series in a relay's metrics text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// B lies in its delivered receipts: a tampered byte, another key, a receipt for another
/// message (the first message's, re-pointed at the second and signed again by B's real
/// key), and a hand-off to a recipient the message was never accepted for. A refuses each
/// (ALERT and the refused counter) and stores none; the honest ones are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_delivered_receipt_is_refused_and_not_stored() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let kb_dir = dir.path().join("keyring/site-b");
    let other = dir.path().join("keyring/mallory");
    Keyring::generate(&other, "site-b.test").unwrap();
    // 0: honest; 1..=4: the lies, in the order below.
    let mode = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first: Arc<Mutex<Option<Receipt>>> = Arc::default();
    let (m, f) = (mode.clone(), first.clone());
    let hooks_b = Hooks {
        delivered_reply: Some(Arc::new(move |v: Vec<Signed>| {
            let resign = |r: &Receipt, with: &std::path::Path| {
                let k = Keyring::open(with).unwrap();
                let (text, sig) = sipmail::receipt::sign(&k, r).unwrap();
                Signed { text, sig }
            };
            v.into_iter()
                .map(|mut s| {
                    let mut r = Receipt::parse(&s.text).unwrap();
                    let mut keep = f.lock().unwrap();
                    match m.load(Ordering::SeqCst) {
                        0 => {
                            keep.get_or_insert(r);
                            s
                        }
                        1 => {
                            let i = s.text.len() / 2;
                            s.text[i] ^= 0x01;
                            s
                        }
                        2 => {
                            let k = Keyring::open(&other).unwrap();
                            r.receiver_fingerprint = k.own_fingerprint().unwrap();
                            resign(&r, &other)
                        }
                        3 => {
                            let mut old = keep.clone().unwrap();
                            old.sender_queue_id = r.sender_queue_id.clone();
                            resign(&old, &kb_dir)
                        }
                        _ => {
                            r.handoffs[0].rcpt = "eve@site-b.test".into();
                            resign(&r, &kb_dir)
                        }
                    }
                })
                .collect()
        })),
        ..Default::default()
    };
    let (a, b) = edited_configs(dir.path(), |s| s, |s| s);
    let sites = TwoSites::start_with_hooks(dir.path(), a, b, Hooks::default(), hooks_b)
        .await
        .unwrap();
    let delivered_of = |sites: &TwoSites| -> usize {
        a_store(sites)
            .list_sent()
            .unwrap()
            .iter()
            .map(|r| r.delivered.len())
            .sum()
    };
    for step in 0..5usize {
        mode.store(step, Ordering::SeqCst);
        let msg = sample_message(step, "lying delivered");
        submit(sites.a.smtp_addr, &[msg], "bob@site-b.test", |_| {})
            .await
            .unwrap();
        let settled = wait_until(Duration::from_secs(15), || {
            let refused = counter(
                &sites.a.metrics_text(),
                "sipmail_delivered_receipts_refused_total",
            );
            let stored = delivered_of(&sites);
            a_store(&sites).list_sent().unwrap().len() == step + 1
                && (stored + refused as usize) == step + 1
        })
        .await;
        assert!(
            settled,
            "step {step}: A neither stored nor refused the delivered receipt"
        );
        assert_eq!(
            delivered_of(&sites),
            1,
            "step {step}: a lying receipt was stored"
        );
    }
    let text = sites.a.metrics_text();
    assert_eq!(
        counter(&text, "sipmail_delivered_receipts_refused_total"),
        4
    );
    assert_eq!(
        counter(&text, "sipmail_delivered_receipts_verified_total"),
        1
    );
    // Every message was still delivered once, and left A's queue on its accepted receipt.
    assert_eq!(maildir_files(&sites.maildir(&sites.b_cfg)).len(), 5);
    assert_eq!(sites.a.queue_snapshot().messages, 0);
    sites.stop().await;
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "this test needs root to mount a small tmpfs as B's spool (a full disk): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    fn grow(&self, size: &str) {
        let o = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A's state while B refuses its one message: nothing in B's Maildir, the message still
/// queued at A with no receipt for it, and B's reply (`said`) recorded in its envelope.
fn assert_a_keeps_it_unreceipted(dir: &std::path::Path, sites: &TwoSites, said: &str) {
    let md = sites.maildir(&sites.b_cfg);
    assert_eq!(maildir_files(&md).len(), 0, "delivered while B refused it?");
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "A dropped the message"
    );
    assert_eq!(
        a_store(sites).list_sent().unwrap().len(),
        0,
        "A holds a receipt for a message B never committed"
    );
    let ids = sites.a.queue_snapshot_ids();
    let env = std::fs::read_to_string(dir.join(format!("var/site-a/spool/queue/{}.env", ids[0])))
        .unwrap();
    assert!(env.contains(said), "{env}");
}

/// Whether A's queue empties within `secs` seconds.
async fn a_queue_empties(sites: &TwoSites, secs: u64) -> bool {
    wait_until(Duration::from_secs(secs), || {
        sites.a.queue_snapshot().messages == 0
    })
    .await
}

/// Once B can take it: A's queue empties, and B's Maildir holds `n` messages and A `n`
/// sent receipts (none lost, none twice).
async fn assert_all_arrive_once(sites: &TwoSites, n: usize) {
    assert!(
        a_queue_empties(sites, 40).await,
        "the message never got through once B could take it"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let md = sites.maildir(&sites.b_cfg);
    assert_eq!(maildir_files(&md).len(), n, "lost or delivered twice");
    assert_eq!(a_store(sites).list_sent().unwrap().len(), n);
}

/// B's spool is a 1 MB file system and a 1.5 MB message comes: B answers 451 (it cannot
/// write it), A keeps it queued and retries, a small message still gets through, and once
/// the disk has room the big one arrives, once, with its receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_the_receiver_defers_and_nothing_is_lost_or_delivered_twice() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("var/site-b/spool"), "1m");
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let mut big = b"From: a@site-a.test\r\nTo: bob@site-b.test\r\nSubject: big\r\nMessage-ID: <big@site-a.test>\r\n\r\n".to_vec();
    while big.len() < 1_500_000 {
        big.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&big),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    // A few retries (retry_initial = 1s) against the full disk. A was told why: the disk
    // is full (452 4.3.1), a reason to retry, not to bounce.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_a_keeps_it_unreceipted(dir.path(), &sites, "452 4.3.1 insufficient system storage");
    // A took the digest it will check B's receipt against as it spooled the message: the
    // SHA-256 of its body file (lines already CRLF, so as B will decode it), in the
    // envelope, with no attempt in between able to change it.
    let id = &sites.a.queue_snapshot_ids()[0];
    let spooled = dir.path().join(format!("var/site-a/spool/queue/{id}"));
    let env_bytes = std::fs::read(spooled.with_extension("env")).unwrap();
    // The first JSON value: an envelope file may be longer than its value (rewritten in
    // place, see the spool).
    let env: serde_json::Value = serde_json::Deserializer::from_slice(&env_bytes)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let body = std::fs::read(spooled.with_extension("msg")).unwrap();
    assert_eq!(
        env["decoded"]["sha256"],
        sha256_hex(&body).as_str(),
        "{env}"
    );
    assert_eq!(env["decoded"]["size"], body.len() as u64);
    // Nothing half-written is left in B's spool.
    let tmp = dir.path().join("var/site-b/spool/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "debris in B's spool/tmp"
    );
    // A small message still passes.
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "small")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    // Room again: the big one arrives, once, and A has both receipts.
    disk.grow("16m");
    assert_all_arrive_once(&sites, 2).await;
    sites.stop().await;
    drop(disk);
}

/// B cannot commit a partner's message: its commit fails while B signs the message's
/// receipt beside it (the two run together since issue 16's run 22). Here B's `queue/` is
/// another file system, so the commit's rename into it fails (EXDEV) while the rest of
/// the spool, the receipt logs included, still works: a relay that answered 250 anyway
/// would hand A a signed receipt for a message it does not hold. B must answer 451 and
/// keep nothing: no receipt reaches A, A keeps the message and retries, and once the
/// commit can succeed the message arrives once, with one receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_beside_its_receipt_signature_sends_no_receipt_and_nothing_twice() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let queue_fs = SmallDisk::mount(&dir.path().join("var/site-b/spool/queue"), "1m");
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "not committed")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    // A few attempts (retry_initial = 1s), each failing at B's commit.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_a_keeps_it_unreceipted(dir.path(), &sites, "cannot write to the queue");
    // B's own queue/ back: the message arrives once, and A has its one receipt.
    drop(queue_fs);
    assert_all_arrive_once(&sites, 1).await;
    sites.stop().await;
}

/// What `kill -9` leaves when it strikes B after its local MTA (here the Maildir) took a
/// partner's message but before B recorded that: the hand-off noted in the `.sending`
/// marker (written by the spool's own `handed`, as the lane writes it the moment the hand-off
/// succeeds) and the message still queued. Restarted, B must record it as delivered and
/// issue its delivered receipt, not hand it over a second time (the duplicate CI's kill -9
/// run saw at B's hand-off to Postfix B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_noted_before_a_kill_is_not_repeated_after_the_restart() {
    use sipmail::queue::{Handed, HandoffNote, Route, Spool};
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let md = sites.maildir(&sites.b_cfg);
    // B cannot deliver for now: its Maildir is a plain file.
    std::fs::remove_dir_all(&md).unwrap();
    std::fs::write(&md, b"not a directory").unwrap();
    let msg = sample_message(1, "handed");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || counter(
            &sites.b.metrics_text(),
            "sipmail_messages_deferred_total"
        ) >= 1)
        .await,
        "B never tried (and failed) to deliver"
    );
    sites.shutdown_b.trigger();
    sites.b.wait().await;
    // The state the kill leaves: the Maildir took the message (file in new/), and the
    // marker says so; B's queue still holds it.
    std::fs::remove_file(&md).unwrap();
    for d in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(md.join(d)).unwrap();
    }
    let file = md.join("new/1700000000.handed.site-b");
    std::fs::write(&file, &msg).unwrap();
    let (spool, envs) = Spool::open(&sites.b_cfg.spool).unwrap();
    assert_eq!(envs.len(), 1, "B's queue should hold the message");
    let id = envs[0].id.clone();
    spool.begin_send(&id, &Route::Local, None);
    spool
        .handed(&Handed {
            id: id.clone(),
            route: Route::Local,
            delivered: vec!["bob@site-b.test".into()],
            handoffs: vec![HandoffNote {
                rcpt: "bob@site-b.test".into(),
                at_ms: 1_700_000_000_000,
                to: format!(
                    "maildir new/{}",
                    file.file_name().unwrap().to_str().unwrap()
                ),
            }],
        })
        .unwrap();
    drop(spool);
    sites.shutdown_b = sipmail::relay::Shutdown::new();
    sites.b = sipmail::relay::start(
        sites.b_cfg.clone(),
        sites.shutdown_b.clone(),
        Hooks::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        sites.b.queue_snapshot().messages,
        0,
        "the hand-off was not replayed"
    );
    // A second message makes A call again and fetch the delivered receipts.
    let second = sample_message(2, "handed");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&second),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let sent = a_store(&sites).list_sent().unwrap();
            sent.len() == 2 && sent.iter().all(|r| r.delivered.len() == 1)
        })
        .await,
        "A did not get both delivered receipts: {:?}",
        a_store(&sites).list_sent().unwrap()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = maildir_files(&md);
    assert_eq!(
        files.len(),
        2,
        "the first message was handed over again: {files:?}"
    );
    // The replayed receipt names the hand-off the killed process made.
    let first = a_store(&sites).list_sent().unwrap().into_iter().find(|r| {
        r.delivered
            .iter()
            .any(|d| d.text.contains("1700000000.handed.site-b"))
    });
    assert!(
        first.is_some(),
        "no delivered receipt names the noted hand-off"
    );
    sites.stop().await;
}
