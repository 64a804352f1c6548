//! Two real relays in this process, on loopback: SMTP in, SIP call with OpenPGP-signed
//! handshake, encrypted stream, Maildir out. Plus proxies that record and tamper.

use crate::common::*;
use sipmail::demo::{TwoSites, delivered_intact, maildir_files, sample_message, submit};
use sipmail::relay::{Hooks, RelayEvent};
use std::sync::Arc;
use std::time::Duration;

fn big_message(n: usize) -> Vec<u8> {
    let mut m = b"From: a@site-a.test\r\nTo: bob@site-b.test\r\nSubject: big\r\nMessage-ID: <big@site-a.test>\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < n {
        m.extend_from_slice(
            format!("line {i:08} ..... with some text and a lone dot next\r\n.\r\n").as_bytes(),
        );
        i += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_arrives_byte_for_byte_through_one_reused_call() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // One call at a time to the peer, so every message must reuse it.
    let one_call = |s: String| {
        s.replace(
            "call_idle = \"2s\"",
            "call_idle = \"2s\"\ncalls_per_peer = 1",
        )
    };
    let (a, b) = edited_configs(dir.path(), one_call, |s| s);
    assert_eq!(a.calls_per_peer, 1);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut events = sites.a.events();
    let mut msgs: Vec<Vec<u8>> = (0..8).map(|i| sample_message(i, "e2e")).collect();
    msgs.push(big_message(1_500_000));
    msgs.push(b"Subject: no final line break\r\n\r\nends without CRLF".to_vec());
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len()
            == msgs.len())
        .await,
        "only {} of {} arrived",
        maildir_files(&md).len(),
        msgs.len()
    );
    let files: Vec<Vec<u8>> = maildir_files(&md)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    for (i, m) in msgs.iter().enumerate() {
        // SMTP requires a final CRLF; the client adds it, so compare with it.
        let mut expect = m.clone();
        if !expect.ends_with(b"\r\n") {
            expect.extend_from_slice(b"\r\n");
        }
        assert!(
            files.iter().any(|f| delivered_intact(f, &expect)),
            "message {i} not intact"
        );
    }
    // All of it went through one call; the queues are empty.
    let mut calls = 0;
    while let Ok(e) = events.try_recv() {
        if let RelayEvent::CallEstablished { sas, .. } = e {
            calls += 1;
            assert_eq!(sas.len(), 4);
        }
    }
    assert_eq!(calls, 1, "messages to one peer should share one call");
    assert!(
        wait_until(Duration::from_secs(5), || sites.a.queue_snapshot().messages
            == 0
            && sites.b.queue_snapshot().messages == 0)
        .await
    );
    // The idle call ends with BYE (call_idle = 2s in the test bed).
    let ended = wait_event(&mut events, 10, |e| {
        matches!(e, RelayEvent::CallEnded { .. })
    })
    .await
    .is_some();
    assert!(ended, "the idle call was not hung up");
    sites.stop().await;
}

/// With the default 16 lanes to a peer, messages that come one at a time (each delivered
/// before the next) all go through one call: the lane idle last takes the next job. Taken
/// in turn, each of the first 16 messages placed a call of its own (issue 16: the warm
/// latency was a new call's latency for most of the bench's "warm" messages). "Delivered"
/// here is both ends done: B's Maildir has it and A's queue is empty. B hands a message on
/// while its commit's flushes run (docs/ARCHITECTURE.md, "Commit and hand-off overlap"),
/// so the file can be in the Maildir before A's lane has B's 250 and is idle again; a
/// message sent in that gap finds the lane busy and rightly takes another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_one_at_a_time_share_one_call_among_many_lanes() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(dir.path(), |s| s, |s| s);
    assert!(a.calls_per_peer > 1);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut events = sites.a.events();
    let md = sites.maildir(&sites.b_cfg);
    for i in 0..6 {
        submit(
            sites.a.smtp_addr,
            &[sample_message(i, "one at a time")],
            "bob@site-b.test",
            |_| {},
        )
        .await
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || maildir_files(&md).len()
                == i + 1
                && sites.a.queue_snapshot().messages == 0)
            .await,
            "message {i} did not arrive"
        );
    }
    let mut calls = 0;
    while let Ok(e) = events.try_recv() {
        if matches!(e, RelayEvent::CallEstablished { .. }) {
            calls += 1;
        }
    }
    assert_eq!(calls, 1, "six messages one at a time placed {calls} calls");
    sites.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_never_crosses_between_the_relays_in_clear() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let proxy = MediaProxy::start(None).await;
    let sites = TwoSites::start(dir.path(), proxy.hook()).await.unwrap();
    let secret = "Quarterly numbers: the merger with Initech closes on Friday";
    let msg =
        format!("Subject: {secret}\r\nFrom: alice@site-a.test\r\n\r\n{secret}\r\n").into_bytes();
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    assert!(delivered_intact(
        &std::fs::read(&maildir_files(&md)[0]).unwrap(),
        &msg
    ));
    let rec = proxy.recorded.lock().unwrap().clone();
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(
        rec.len() > msg.len(),
        "the proxy saw only {} bytes",
        rec.len()
    );
    for needle in [
        &b"Quarterly"[..],
        b"Initech",
        b"MAIL FROM",
        b"RCPT TO",
        b"bob@site-b.test",
        b"220 ",
        b"EHLO",
    ] {
        assert!(
            !rec.windows(needle.len()).any(|w| w == needle),
            "{:?} crossed the media connection in clear",
            String::from_utf8_lossy(needle)
        );
    }
    sites.stop().await;
}

/// Flip one bit in a record on the first media connection. That call must fail without
/// delivering anything; the mail stays queued and arrives, once, on the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_any_record_fails_the_transfer_and_the_mail_stays_queued() {
    // Offsets into the caller->callee stream: the first record (the hello), the EHLO, and
    // deep in the DATA of a 200 KB message.
    for offset in [2usize, 40, 150_000] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let tamper: Tamper = Arc::new(move |conn, off, chunk: &mut [u8]| {
            if conn == 0 && off <= offset && offset < off + chunk.len() {
                chunk[offset - off] ^= 0x04;
            }
        });
        let proxy = MediaProxy::start(Some(tamper)).await;
        let sites = TwoSites::start(dir.path(), proxy.hook()).await.unwrap();
        let msg = big_message(200_000);
        submit(
            sites.a.smtp_addr,
            std::slice::from_ref(&msg),
            "bob@site-b.test",
            |_| {},
        )
        .await
        .unwrap();
        let md = sites.maildir(&sites.b_cfg);
        // Nothing is delivered by the tampered call; the retry (1 s later) is clean.
        assert!(
            wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await,
            "offset {offset}: not delivered after the retry"
        );
        assert!(
            proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2,
            "offset {offset}: the tampered call did not fail"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let files = maildir_files(&md);
        assert_eq!(files.len(), 1, "offset {offset}: delivered more than once");
        assert!(delivered_intact(&std::fs::read(&files[0]).unwrap(), &msg));
        sites.stop().await;
    }
}

/// A flipped bit in the callee's signature (200 OK) or the caller's (ACK): no call, no
/// delivery, and the message is still in A's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_either_signature_fails_the_call_and_the_mail_stays_queued() {
    for (from_a, index) in [
        (false, 10usize),
        (false, 60),
        (false, 120),
        (true, 10),
        (true, 60),
        (true, 120),
    ] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let tamper: SipTamper = Arc::new(move |_, is_from_a, d: &mut Vec<u8>| {
            if is_from_a == from_a {
                flip_in_attr(d, "sipmail-signature:", index);
            }
        });
        let sites = sites_via_sip_proxy(dir.path(), tamper).await;
        let mut events = sites.a.events();
        submit(
            sites.a.smtp_addr,
            &[sample_message(1, "sig")],
            "bob@site-b.test",
            |_| {},
        )
        .await
        .unwrap();
        let failed = wait_event(&mut events, 20, |e| {
            matches!(e, RelayEvent::CallFailed { .. })
        })
        .await
        .is_some();
        assert!(
            failed,
            "from_a={from_a} index={index}: the call did not fail"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            maildir_files(&sites.maildir(&sites.b_cfg)).is_empty(),
            "delivered despite a bad signature"
        );
        assert_eq!(
            sites.a.queue_snapshot().messages,
            1,
            "the message left A's queue"
        );
        sites.stop().await;
    }
}

/// The spool's spare files through the daemon: `sipmail run` makes `queue.spare_files`
/// empty files in `free/` at a spool's first start, messages take them, and a restart keeps
/// `free/` (the files delivered messages gave back) and makes none again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_files_are_made_at_the_first_start_and_kept_across_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let free = sites.a_cfg.spool.join("free");
    let names = |d: &std::path::Path| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let len = e.metadata().unwrap().len();
                (e.file_name().into_string().unwrap(), len)
            })
            .collect();
        v.sort();
        v
    };
    let spares = names(&free);
    assert_eq!(
        spares.len(),
        16,
        "the test bed's queue.spare_files: {spares:?}"
    );
    assert!(
        spares
            .iter()
            .all(|(n, len)| n.ends_with(".other") && *len == 0)
    );
    let msgs: Vec<Vec<u8>> = (0..3).map(|i| sample_message(i, "spares")).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 3
            && sites.a.queue_snapshot().messages == 0)
        .await,
        "the messages were not delivered"
    );
    let before = names(&free);
    assert!(
        before != spares && before.len() >= 16,
        "the messages took spares and gave their files back: {before:?}"
    );
    sites.shutdown_a.trigger();
    sites.a.wait().await;
    sites.shutdown_a = sipmail::relay::Shutdown::new();
    sites.a = sipmail::relay::start(
        sites.a_cfg.clone(),
        sites.shutdown_a.clone(),
        Hooks::default(),
    )
    .await
    .unwrap();
    assert_eq!(names(&free), before, "free/ kept as it was, no spare made");
    // And the restarted relay delivers with them.
    let more = sample_message(3, "spares");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&more),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 4).await,
        "the message after the restart was not delivered"
    );
    sites.stop().await;
}
