//! Issue 11, item 6: the media stream is bound to the call. Against real relays on
//! loopback: the media address the callee announces is covered by its signature, and
//! connections to the media port that never authenticate cannot make a call fail.

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::handshake::sdp;
use sipmail::handshake::{CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use sipmail::relay::{Hooks, RelayEvent};
use sipmail::sip::{Endpoint, EndpointConfig, Method, Request, Transport};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn send(sites: &TwoSites, run: &str) {
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, run)],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
}

/// Replace the SDP line starting with `prefix` (up to its CRLF) by `line`, and fix the
/// Content-Length, as a competent attacker would.
fn replace_line(d: &mut Vec<u8>, prefix: &str, line: &str) -> bool {
    let text = String::from_utf8_lossy(d).to_string();
    let Some(i) = text.find(prefix) else {
        return false;
    };
    let end = text[i..].find("\r\n").map(|e| e + i).unwrap_or(text.len());
    let delta = line.len() as i64 - (end - i) as i64;
    let mut t = format!("{}{}{}", &text[..i], line, &text[end..]);
    if let Some(cl) = t.find("Content-Length: ") {
        let s = cl + "Content-Length: ".len();
        let e = t[s..].find("\r\n").unwrap() + s;
        let n: i64 = t[s..e].parse().unwrap();
        t = format!("{}{}{}", &t[..s], n + delta, &t[e..]);
    }
    *d = t.into_bytes();
    true
}

/// A man in the middle on the SIP path rewrites the 200 OK's c=/m= to a listener of his
/// own, hoping A connects there (to relay, delay or fingerprint the stream). The address is
/// in the signed transcript, so A refuses the answer: it never connects to the attacker,
/// nothing is delivered, the mail stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_media_address_in_the_200_ok_is_refused() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let evil = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = evil.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            // Hold it open, say nothing.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(s);
            });
        }
    });
    let rewritten = Arc::new(AtomicUsize::new(0));
    let r = rewritten.clone();
    let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
        if !from_a && d.starts_with(b"SIP/2.0 200") && d.windows(4).any(|w| w == b"m=ap") {
            let ok = replace_line(d, "c=IN IP4 ", &format!("c=IN IP4 {}", evil_addr.ip()))
                && replace_line(
                    d,
                    "m=application ",
                    &format!("m=application {} TCP sipmail", evil_addr.port()),
                );
            assert!(ok, "the 200 OK has no c=/m= to rewrite");
            r.fetch_add(1, Ordering::SeqCst);
        }
    });
    let sites = sites_via_sip_proxy(dir.path(), tamper).await;
    let mut ev = sites.a.events();
    send(&sites, "media-rewrite").await;
    // A either refuses the answer (the fix) or connects to the attacker (the hole).
    let failed = wait_event(&mut ev, 20, |e| matches!(e, RelayEvent::CallFailed { .. })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rewritten.load(Ordering::SeqCst) > 0,
        "the proxy saw no 200 OK"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "A connected to the media address the man in the middle put in the 200 OK"
    );
    match failed {
        Some(RelayEvent::CallFailed { reason, .. }) => assert!(
            reason.contains("signature does not verify"),
            "the call failed for another reason: {reason}"
        ),
        other => panic!("no failed call: {other:?}"),
    }
    assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "the mail must stay queued"
    );
    sites.stop().await;
}

/// Someone who sees the 200 OK (or scans for the port) opens two silent connections to
/// B's media port ahead of the real caller. B accepts connections side by side, each with
/// its own deadline for a first authenticated record, so the real caller's connection
/// still wins: the call succeeds and the mail is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_to_the_media_port_do_not_stop_the_call() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let h = held.clone();
    // Raced ahead of the real caller: the hook runs just before A connects to the media
    // address, and these two connections are established (in B's accept queue) first.
    let hooks = Hooks {
        media_connect: Some(Arc::new(move |real| {
            for _ in 0..2 {
                if let Ok(s) = std::net::TcpStream::connect(real) {
                    h.lock().unwrap().push(s);
                }
            }
            real
        })),
        ..Default::default()
    };
    let (a, b) = edited_configs(dir.path(), |s| s, |s| s);
    let sites = TwoSites::start_with(dir.path(), a, b, hooks).await.unwrap();
    let mut ev = sites.a.events();
    send(&sites, "silent-media").await;
    let md = sites.maildir(&sites.b_cfg);
    let delivered = wait_until(Duration::from_secs(25), || maildir_files(&md).len() == 1).await;
    let failures = {
        let mut n = 0;
        while let Ok(e) = ev.try_recv() {
            if matches!(e, RelayEvent::CallFailed { .. }) {
                n += 1;
            }
        }
        n
    };
    assert!(
        held.lock().unwrap().len() >= 2,
        "the silent connections were not opened"
    );
    assert!(
        delivered,
        "two silent connections to the media port stopped the call ({failures} failed calls)"
    );
    assert_eq!(failures, 0, "a call failed");
    sites.stop().await;
}

/// An offer of the previous protocol version (2: transcript without the media address,
/// PSK outside the key schedule) gets 488 with a Warning naming the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_of_the_old_protocol_version_gets_488() {
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
    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        EndpointConfig {
            t1: Duration::from_millis(100),
            ..EndpointConfig::default()
        },
    )
    .await
    .unwrap()
    .0;
    let caller = CallerAwaitAnswer::new([5; 32], [6; 32], vec![Suite::ChaCha20Poly1305], a_fpr);
    let mut r = Request::new(Method::Invite, "sip:mail@site-b.test".to_string());
    r.headers.push("From", "<sip:mail@site-a.test>;tag=old1");
    r.headers.push("To", "<sip:mail@site-b.test>");
    r.headers
        .push("Call-ID", format!("{}@old", sipmail::sip::random_hex(8)));
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", "<sip:mail@127.0.0.1>");
    r.headers.push("Content-Type", "application/sdp");
    let body = String::from_utf8(sdp::encode_offer(
        caller.offer(),
        1,
        "127.0.0.1".parse().unwrap(),
    ))
    .unwrap();
    r.body = body
        .replace(
            &format!("a=sipmail-version:{}\r\n", sdp::VERSION),
            "a=sipmail-version:2\r\n",
        )
        .into_bytes();
    let resp = ep
        .request(r, sites.b.sip_addr, Transport::Udp)
        .await
        .unwrap();
    let warning = resp.headers.get("Warning").unwrap_or("").to_string();
    assert_eq!(
        resp.status, 488,
        "{} {} {warning}",
        resp.status, resp.reason
    );
    assert!(
        warning.contains("unsupported sipmail version 2"),
        "{warning}"
    );
    assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
    sites.stop().await;
}
