//! Issue 11, item 4: an off-path attacker cannot lock a partner out, nor use B as an
//! amplifier. Real relays on loopback; the attacker is a plain UDP socket on site A's
//! address (127.0.0.1, the host of B's `[[peer]]` for site-a.test), which is what an
//! off-path attacker spoofing A's address looks like to B.

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::handshake::sdp;
use sipmail::handshake::{CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use sipmail::relay::Hooks;
use sipmail::sip::{Method, Request};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A raw INVITE from `mail@site-a.test` carrying A's real (public) fingerprint, as it
/// would go on the wire from `from` (Via with rport), never to be ACKed.
fn spoofed_invite(from: std::net::SocketAddr, a_fpr: &[u8], n: usize) -> Vec<u8> {
    let caller = CallerAwaitAnswer::new(
        [5; 32],
        [6; 32],
        vec![Suite::ChaCha20Poly1305],
        a_fpr.to_vec(),
    );
    let mut r = Request::new(Method::Invite, "sip:mail@site-b.test");
    r.headers.push(
        "Via",
        format!(
            "SIP/2.0/UDP {from};branch=z9hG4bK{}{n};rport",
            sipmail::sip::random_hex(6)
        ),
    );
    r.headers.push("Max-Forwards", "70");
    r.headers
        .push("From", format!("<sip:mail@site-a.test>;tag=spoof{n}"));
    r.headers.push("To", "<sip:mail@site-b.test>");
    r.headers.push(
        "Call-ID",
        format!("{}-{n}@site-a.test", sipmail::sip::random_hex(8)),
    );
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", format!("<sip:mail@{from}>"));
    r.headers.push("Content-Type", "application/sdp");
    r.body = sdp::encode_offer(caller.offer(), 1, "127.0.0.1".parse().unwrap());
    r.to_bytes()
}

/// 20 un-ACKed INVITEs with A's fingerprint from A's address take (before the fix) all 16
/// of A's pending slots for 32 s. The real A's mail must still arrive within 15 s, and B
/// must send the attacker's socket at most 3 times the bytes it received from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_invites_from_a_partners_address_neither_lock_it_out_nor_amplify() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let a_fpr = hex::decode(
        Keyring::open(&sites.a_cfg.keyring)
            .unwrap()
            .own_fingerprint()
            .unwrap(),
    )
    .unwrap();
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let me = sock.local_addr().unwrap();
    assert_eq!(
        me.ip(),
        sites.a.sip_addr.ip(),
        "the attacker must share A's address"
    );

    // Count everything B sends to the attacker's socket, and how many 200 OKs.
    let (bytes_back, oks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, b, o) = (sock.clone(), bytes_back.clone(), oks.clone());
    let counter = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        // Bounded: the task is aborted at the end of the test.
        while let Ok((n, _)) = s.recv_from(&mut buf).await {
            b.fetch_add(n, Ordering::SeqCst);
            if buf[..n].starts_with(b"SIP/2.0 200") {
                o.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    const ATTACK: usize = 20;
    let mut bytes_sent = 0usize;
    for n in 0..ATTACK {
        let d = spoofed_invite(me, &a_fpr, n);
        bytes_sent += sock.send_to(&d, sites.b.sip_addr).await.unwrap();
    }
    // B answers (at least) the 16 it has room for with a 200 OK that is never ACKed.
    assert!(
        wait_until(Duration::from_secs(5), || oks.load(Ordering::SeqCst) >= 16).await,
        "B answered only {} of the spoofed INVITEs",
        oks.load(Ordering::SeqCst)
    );
    let attack_started = std::time::Instant::now();

    // The real A now has mail for B.
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "lockout")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let delivered = wait_until(Duration::from_secs(15), || maildir_files(&md).len() == 1).await;

    // Keep counting until 12 s after the attack (the 200 OKs were retransmitted for 32 s,
    // doubling from 0.5 s up to 4 s apart: 11 sends each by then).
    let rest = Duration::from_secs(12).saturating_sub(attack_started.elapsed());
    tokio::time::sleep(rest).await;
    counter.abort();
    let back = bytes_back.load(Ordering::SeqCst);
    eprintln!(
        "delivered within 15 s: {delivered}; B sent {back} bytes to the attacker, who sent {bytes_sent} ({:.1}x)",
        back as f64 / bytes_sent as f64
    );
    assert!(
        delivered,
        "the real A's mail was not delivered within 15 s while spoofed INVITEs held its slots"
    );
    assert!(
        back <= 3 * bytes_sent,
        "B sent {back} bytes to an unverified UDP source that sent it {bytes_sent} ({:.1}x)",
        back as f64 / bytes_sent as f64
    );
    sites.stop().await;
}

/// A partner that calls over SIP/TCP keeps its exemption: a sustained flood of spoofed UDP
/// INVITEs from its address (100 a second, for the whole delivery) neither rate-limits nor
/// evicts its calls, and B still sends the flooder at most 3 times what it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_over_tcp_is_unaffected_by_a_udp_flood_from_its_address() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let tcp = |s: String| {
        s.lines()
            .map(|l| {
                if l.starts_with("sip = \"sip:mail@") {
                    l.trim_end_matches('"').to_string() + ";transport=tcp\""
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let (a, b) = edited_configs(dir.path(), tcp, |s| s);
    assert!(a.peers[0].sip[0].tcp);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let a_fpr = hex::decode(
        Keyring::open(&sites.a_cfg.keyring)
            .unwrap()
            .own_fingerprint()
            .unwrap(),
    )
    .unwrap();
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let me = sock.local_addr().unwrap();
    let bytes_back = Arc::new(AtomicUsize::new(0));
    let (s, bb) = (sock.clone(), bytes_back.clone());
    let counter = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = s.recv_from(&mut buf).await {
            bb.fetch_add(n, Ordering::SeqCst);
        }
    });
    let b_sip = sites.b.sip_addr;
    let (s, stop) = (sock.clone(), Arc::new(tokio::sync::Notify::new()));
    let stop2 = stop.clone();
    // At most 1,500 INVITEs, 10 ms apart, until told to stop.
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        for n in 0..1500 {
            let d = spoofed_invite(me, &a_fpr, n);
            sent += s.send_to(&d, b_sip).await.unwrap();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop2.notified() => break,
            }
        }
        sent
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "tcp-flood")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let delivered = wait_until(Duration::from_secs(15), || maildir_files(&md).len() == 1).await;
    stop.notify_one();
    let bytes_sent = flood.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    counter.abort();
    let back = bytes_back.load(Ordering::SeqCst);
    eprintln!(
        "delivered within 15 s: {delivered}; B sent {back} bytes to the flooder, who sent {bytes_sent} ({:.2}x)",
        back as f64 / bytes_sent as f64
    );
    assert!(
        delivered,
        "the partner's mail over TCP was not delivered during the flood"
    );
    assert!(
        back <= 3 * bytes_sent,
        "B amplified: {back} > 3 x {bytes_sent}"
    );
    sites.stop().await;
}
