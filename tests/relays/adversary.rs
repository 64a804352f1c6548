//! An adversary on the wire or with stolen material, against real relays. Each test checks
//! that nothing is delivered and, where the mail is the attacker's target, that it stays
//! queued.

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{
    TwoSites, free_port, maildir_files, make_keys, sample_message, site_config, submit,
};
use sipmail::handshake::sdp;
use sipmail::handshake::{CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use sipmail::relay::{Hooks, RelayEvent};
use sipmail::sip::{Endpoint, EndpointConfig, Method, Request, Transport};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An INVITE as a relay would send it, from `from_domain`, offering `fingerprint`.
fn invite(from_domain: &str, to_domain: &str, fingerprint: Vec<u8>) -> Request {
    let caller =
        CallerAwaitAnswer::new([5; 32], [6; 32], vec![Suite::ChaCha20Poly1305], fingerprint);
    let mut r = Request::new(Method::Invite, format!("sip:mail@{to_domain}"));
    r.headers
        .push("From", format!("<sip:mail@{from_domain}>;tag=evil1"));
    r.headers.push("To", format!("<sip:mail@{to_domain}>"));
    r.headers.push(
        "Call-ID",
        format!("{}@attacker", sipmail::sip::random_hex(8)),
    );
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", "<sip:mail@127.0.0.1>");
    r.headers.push("Content-Type", "application/sdp");
    r.body = sdp::encode_offer(caller.offer(), 1, "127.0.0.1".parse().unwrap());
    r
}

async fn attacker() -> Endpoint {
    let cfg = EndpointConfig {
        t1: Duration::from_millis(100),
        ..EndpointConfig::default()
    };
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
        .0
}

/// Unknown domains, a known domain with an unknown key, and a partner's real cert used to
/// claim another partner's domain: all 403, with nothing else said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_are_not_who_they_claim_get_403() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let b_sip: SocketAddr = sites.b.sip_addr;
    let a_fpr = hex::decode(
        Keyring::open(&sites.a_cfg.keyring)
            .unwrap()
            .own_fingerprint()
            .unwrap(),
    )
    .unwrap();
    let ep = attacker().await;
    for (what, from, fpr) in [
        ("unknown domain", "site-c.test", a_fpr.clone()),
        (
            "unknown key for a known domain",
            "site-a.test",
            vec![0x42; 20],
        ),
        (
            "B's own key claiming site-a",
            "site-a.test",
            hex::decode(
                Keyring::open(&sites.b_cfg.keyring)
                    .unwrap()
                    .own_fingerprint()
                    .unwrap(),
            )
            .unwrap(),
        ),
    ] {
        let resp = ep
            .request(invite(from, "site-b.test", fpr), b_sip, Transport::Udp)
            .await
            .unwrap();
        assert_eq!(
            resp.status, 403,
            "{what}: got {} {}",
            resp.status, resp.reason
        );
        assert!(resp.body.is_empty(), "{what}: a 403 must carry nothing");
    }
    // A call for a domain B is not.
    let resp = ep
        .request(
            invite("site-a.test", "site-z.test", a_fpr.clone()),
            b_sip,
            Transport::Udp,
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    // An ordinary phone's INVITE: 488, and the Warning says what is missing.
    let mut plain = invite("site-a.test", "site-b.test", a_fpr);
    plain.body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n".to_vec();
    let resp = ep.request(plain, b_sip, Transport::Udp).await.unwrap();
    assert_eq!(resp.status, 488);
    assert!(
        resp.headers
            .get("Warning")
            .is_some_and(|w| w.contains("sipmail")),
        "{:?}",
        resp.headers.get("Warning")
    );
    sites.stop().await;
}

fn replace_attr(d: &mut Vec<u8>, attr: &str, value: &str) -> bool {
    let text = String::from_utf8_lossy(d).to_string();
    let Some(i) = text.find(attr) else {
        return false;
    };
    let end = text[i..].find("\r\n").map(|e| e + i).unwrap_or(text.len());
    let old_len = end - i;
    let new = format!("{attr}{value}");
    let mut t = format!("{}{}{}", &text[..i], new, &text[end..]);
    // Keep Content-Length right, as a competent attacker would.
    let delta = new.len() as i64 - old_len as i64;
    if let Some(cl) = t.find("Content-Length: ") {
        let s = cl + "Content-Length: ".len();
        let e = t[s..].find("\r\n").unwrap() + s;
        let n: i64 = t[s..e].parse().unwrap();
        t = format!("{}{}{}", &t[..s], n + delta, &t[e..]);
    }
    *d = t.into_bytes();
    true
}

/// A man in the middle who terminates both legs and swaps in his own X25519 keys (the
/// attack SIP Witch's design warns about): towards A in the 200 OK, towards B in the ACK.
/// Each relay notices; nothing is delivered; the mail stays queued at A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_swapping_keys_fails() {
    use base64::Engine;
    let mallory = base64::engine::general_purpose::STANDARD.encode(
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([9u8; 32])).as_bytes(),
    );
    for towards_a in [true, false] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let m = mallory.clone();
        let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
            // 200 OK goes to A (from B's side); the ACK comes from A.
            if from_a != towards_a {
                replace_attr(
                    d,
                    if towards_a {
                        "a=sipmail-key:"
                    } else {
                        "sipmail-key:"
                    },
                    &m,
                );
            }
        });
        let sites = sites_via_sip_proxy(dir.path(), tamper).await;
        let mut ev_a = sites.a.events();
        let mut ev_b = sites.b.events();
        submit(
            sites.a.smtp_addr,
            &[sample_message(1, "mitm")],
            "bob@site-b.test",
            |_| {},
        )
        .await
        .unwrap();
        let failed = if towards_a {
            wait_event(&mut ev_a, 20, |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("signature"))).await
        } else {
            wait_event(&mut ev_b, 20, |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("commitment"))).await
        };
        assert!(
            failed.is_some(),
            "towards_a={towards_a}: the swap was not detected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
        assert_eq!(
            sites.a.queue_snapshot().messages,
            1,
            "the mail must stay queued at A"
        );
        sites.stop().await;
    }
}

/// A recorded INVITE and ACK replayed to B after the real call: B answers the INVITE (it
/// cannot tell), but the old ACK does not complete the new handshake, so B hangs up and
/// nothing more is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_invite_and_ack_deliver_nothing() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let recorded: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let rec = recorded.clone();
    let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
        if from_a {
            rec.lock().unwrap().push(d.clone());
        }
    });
    let sites = sites_via_sip_proxy(dir.path(), tamper).await;
    let md = sites.maildir(&sites.b_cfg);
    let mut ev_b = sites.b.events();
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "replay")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    // Replay once the real call is over (the idle call hangs up after 2 s).
    assert!(
        wait_event(&mut ev_b, 10, |e| matches!(e, RelayEvent::CallEnded { .. }))
            .await
            .is_some()
    );
    let msgs = recorded.lock().unwrap().clone();
    let inv = msgs
        .iter()
        .find(|m| m.starts_with(b"INVITE"))
        .unwrap()
        .clone();
    let ack = msgs
        .iter()
        .find(|m| m.starts_with(b"ACK") && m.windows(12).any(|w| w == b"sipmail-key:"))
        .unwrap()
        .clone();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Replayed verbatim, the INVITE is a retransmission to B's transaction layer: it gets
    // the old 200 again and never reaches the relay as a call. A smarter attacker gives it
    // a new branch, so that B takes it for a new call:
    let inv = String::from_utf8(inv)
        .unwrap()
        .replacen("branch=z9hG4bK", "branch=z9hG4bKreplay", 1)
        .into_bytes();
    sock.send_to(&inv, sites.b.sip_addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    // B answers 200 (possibly after 100 Trying); then the old ACK.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut got_200 = false;
    while tokio::time::Instant::now() < deadline && !got_200 {
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
        {
            got_200 = buf[..n].starts_with(b"SIP/2.0 200");
        }
    }
    assert!(got_200, "B did not answer the replayed INVITE");
    let ack = String::from_utf8(ack)
        .unwrap()
        .replacen("branch=z9hG4bK", "branch=z9hG4bKreplay", 1)
        .into_bytes();
    sock.send_to(&ack, sites.b.sip_addr).await.unwrap();
    let failed = wait_event(&mut ev_b, 10, |e| {
        matches!(e, RelayEvent::CallFailed { .. })
    })
    .await;
    assert!(failed.is_some(), "B accepted a replayed ACK");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        maildir_files(&md).len(),
        1,
        "the replay delivered something"
    );
    sites.stop().await;
}

/// Downgrade on the wire: the strong-suite preference stripped from the INVITE, or the
/// chosen suite swapped in the 200 OK. Both are signed, so A refuses the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_downgrade_or_swap_on_the_wire_fails() {
    for strip_offer in [true, false] {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
            if strip_offer && from_a {
                replace_attr(d, "a=sipmail-suites:", "aes-256-gcm");
            }
            if !strip_offer && !from_a {
                replace_attr(d, "a=sipmail-suite:", "aes-256-gcm");
            }
        });
        let sites = sites_via_sip_proxy(dir.path(), tamper).await;
        let mut ev_a = sites.a.events();
        submit(
            sites.a.smtp_addr,
            &[sample_message(1, "downgrade")],
            "bob@site-b.test",
            |_| {},
        )
        .await
        .unwrap();
        let failed = wait_event(
            &mut ev_a,
            20,
            |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("signature")),
        )
        .await;
        assert!(
            failed.is_some(),
            "strip_offer={strip_offer}: the downgrade was not detected"
        );
        assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
        assert_eq!(sites.a.queue_snapshot().messages, 1);
        sites.stop().await;
    }
}

/// Sites that prefer AES-256-GCM get it, end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_256_gcm_when_the_caller_prefers_it() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let aes = |s: String| {
        s.replace(
            "call_idle = \"2s\"",
            "call_idle = \"2s\"\nsuites = [\"aes-256-gcm\", \"chacha20-poly1305\"]",
        )
    };
    let (a, b) = edited_configs(dir.path(), aes, |s| s);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    let msg = sample_message(4, "aes");
    submit(
        sites.a.smtp_addr,
        std::slice::from_ref(&msg),
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let est = wait_event(&mut ev, 20, |e| {
        matches!(e, RelayEvent::CallEstablished { .. })
    })
    .await;
    match est {
        Some(RelayEvent::CallEstablished { suite, .. }) => assert_eq!(suite, "aes-256-gcm"),
        other => panic!("no call: {other:?}"),
    }
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    assert!(sipmail::demo::delivered_intact(
        &std::fs::read(&maildir_files(&md)[0]).unwrap(),
        &msg
    ));
    sites.stop().await;
}

/// Truncation: the media connection is cut in the middle of a message, with no
/// authenticated close. B must not commit the half message; A retries on a new call and
/// the message arrives once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_stream_delivers_nothing_half_done() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let proxy = MediaProxy::start_with(None, Some((0, 120_000))).await;
    let sites = TwoSites::start(dir.path(), proxy.hook()).await.unwrap();
    let mut msg = b"Subject: long\r\nMessage-ID: <trunc@site-a.test>\r\n\r\n".to_vec();
    while msg.len() < 300_000 {
        msg.extend_from_slice(
            b"0123456789 the quick brown fox jumps over the lazy dog 0123456789\r\n",
        );
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
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await,
        "not delivered after the retry"
    );
    assert!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the cut call did not fail"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = maildir_files(&md);
    assert_eq!(files.len(), 1, "a half message was delivered");
    assert!(sipmail::demo::delivered_intact(
        &std::fs::read(&files[0]).unwrap(),
        &msg
    ));
    assert_eq!(sites.b.queue_snapshot().messages, 0);
    sites.stop().await;
}

/// Mallory has B's certificate (it is public) but not B's key. He answers A's call as
/// site-b.test, presenting B's fingerprint with a signature made by his own key for
/// mail@site-b.test. A verifies against the cert it holds for B and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_cert_with_the_wrong_key_is_refused() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    make_keys(dir.path()).unwrap();
    let b_fpr = Keyring::open(&dir.path().join("keyring/site-b"))
        .unwrap()
        .own_fingerprint()
        .unwrap();
    // Mallory's relay: domain site-b.test, his own key with B's user ID, A's cert.
    let m_kr = dir.path().join("keyring/mallory");
    Keyring::generate(&m_kr, "site-b.test").unwrap();
    let a_pub = Keyring::open(&dir.path().join("keyring/site-a"))
        .unwrap()
        .export_public()
        .unwrap();
    Keyring::import(&m_kr, a_pub.as_bytes()).unwrap();
    let (pa, pm) = (free_port().unwrap(), free_port().unwrap());
    let fpr = b_fpr.clone();
    let tamper: SipTamper = Arc::new(move |_, from_a, d: &mut Vec<u8>| {
        if !from_a {
            replace_attr(d, "a=sipmail-fingerprint:", &fpr);
        }
    });
    let proxy = SipProxy::start(format!("127.0.0.1:{pm}").parse().unwrap(), tamper).await;
    let a = Config::parse(
        "a",
        &site_config(dir.path(), "site-a", "site-b", pa, proxy.listen.port()),
    )
    .unwrap();
    let mut m = Config::parse("m", &site_config(dir.path(), "site-b", "site-a", pm, pa)).unwrap();
    m.keyring = m_kr;
    m.spool = dir.path().join("var/mallory/spool");
    m.delivery = sipmail::config::Delivery::Maildir(dir.path().join("var/mallory/maildir"));
    let sites = TwoSites::start_with(dir.path(), a, m, Hooks::default())
        .await
        .unwrap();
    let mut ev = sites.a.events();
    submit(
        sites.a.smtp_addr,
        &[sample_message(1, "stolen")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let failed = wait_event(
        &mut ev,
        20,
        |e| matches!(e, RelayEvent::CallFailed { reason, .. } if reason.contains("signature")),
    )
    .await;
    assert!(failed.is_some(), "A accepted Mallory's answer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        maildir_files(&dir.path().join("var/mallory/maildir")).is_empty(),
        "Mallory received the mail"
    );
    assert_eq!(
        sites.a.queue_snapshot().messages,
        1,
        "the mail must stay queued"
    );
    sites.stop().await;
}
