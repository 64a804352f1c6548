//! Issue 11, item 2: a peer may only send as itself.
//!
//! The attacker is a partner that holds its own real key (site A's keyring) and places a
//! genuine, signed call to B, then speaks SMTP through the call's encrypted stream with
//! whatever envelope sender it likes. B must answer `550 5.7.1` naming the authenticated
//! peer, queue nothing, and mark what it does accept with a trace field that names the
//! peer and its fingerprint; a look-alike field that arrives from outside (from a peer or
//! from the site's own MTA) is removed.

use crate::common::*;
use sipmail::demo::{TwoSites, maildir_files, submit};
use sipmail::handshake::sdp;
use sipmail::handshake::{CallContext, CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use sipmail::relay::{Hooks, KeyringSigner, PeerVerifier};
use sipmail::sip::{Endpoint, EndpointConfig, Method, Request, Transport};
use sipmail::tunnel::record::Limits;
use sipmail::tunnel::{Role, TunnelStream};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FIELD: &str = "X-Sipmail-Authenticated-Peer";

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

/// SMTP spoken by hand through an established call: every byte of the envelope is ours.
struct RawSmtp {
    s: TunnelStream<TcpStream>,
    buf: Vec<u8>,
    /// Keeps the SIP endpoint (and so the dialog) alive while the stream is used.
    _ep: Endpoint,
    call_id: String,
}

impl RawSmtp {
    /// One complete reply (all its lines).
    async fn reply(&mut self) -> String {
        loop {
            let text = String::from_utf8_lossy(&self.buf).to_string();
            let mut end = 0;
            for line in text.split_inclusive("\r\n") {
                if !line.ends_with("\r\n") {
                    break;
                }
                end += line.len();
                if line.len() < 6 || line.as_bytes()[3] == b' ' {
                    self.buf.drain(..end);
                    return text[..end].trim_end().to_string();
                }
            }
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b))
                .await
                .expect("reply timed out")
                .expect("read through the call");
            assert!(n > 0, "the callee closed the call; had {text:?}");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.s
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.s.flush().await.unwrap();
        self.reply().await
    }

    /// One transaction; returns the reply to MAIL and, if MAIL was taken, the final reply.
    async fn send(&mut self, mail_line: &str, rcpt: &str, msg: &str) -> (String, Option<String>) {
        let mail = self.cmd(mail_line).await;
        if !mail.starts_with('2') {
            // Nothing may be open now: RCPT and DATA are out of sequence.
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert!(r.starts_with("503"), "RCPT after a refused MAIL: {r}");
            return (mail, None);
        }
        let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(r.starts_with("250"), "RCPT: {r}");
        let d = self.cmd("DATA").await;
        assert!(d.starts_with("354"), "DATA: {d}");
        let end = self.cmd(&format!("{msg}.")).await;
        (mail, Some(end))
    }
}

/// Place a real call to B as site A (A's own key, A's signature), the way a hostile
/// partner that runs its own software would, and open the call's SMTP stream.
async fn call_b_as_a(sites: &TwoSites) -> RawSmtp {
    let ka = Keyring::open(&sites.a_cfg.keyring).unwrap();
    let fpr = hex::decode(ka.own_fingerprint().unwrap()).unwrap();
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
    let caller = CallerAwaitAnswer::new(random32(), random32(), vec![Suite::ChaCha20Poly1305], fpr);
    let call_id = format!("{}@site-a.test", sipmail::sip::random_hex(12));
    let from_tag = sipmail::sip::random_hex(8);
    let mut invite = Request::new(Method::Invite, "sip:mail@site-b.test");
    invite
        .headers
        .push("From", format!("<sip:mail@site-a.test>;tag={from_tag}"));
    invite.headers.push("To", "<sip:mail@site-b.test>");
    invite.headers.push("Call-ID", call_id.clone());
    invite.headers.push("CSeq", "1 INVITE");
    invite
        .headers
        .push("Contact", format!("<sip:mail@{}>", ep.local_addr()));
    invite.headers.push("Content-Type", "application/sdp");
    invite.body = sdp::encode_offer(caller.offer(), 1, "127.0.0.1".parse().unwrap());
    let b_sip = sites.b.sip_addr;
    let resp = ep.request(invite, b_sip, Transport::Udp).await.unwrap();
    assert_eq!(resp.status, 200, "{} {}", resp.status, resp.reason);
    let to = resp.headers.get("To").unwrap().to_string();
    let to_tag = resp
        .headers
        .to()
        .unwrap()
        .tag()
        .map(str::to_string)
        .unwrap();
    let answer = sdp::decode_answer(&resp.body).unwrap();
    let media = answer.media;
    let ctx = CallContext {
        call_id: call_id.clone(),
        from_tag: from_tag.clone(),
        to_tag,
        caller: "mail@site-a.test".into(),
        callee: "mail@site-b.test".into(),
    };
    let done = caller
        .on_answer(
            &ctx,
            &answer,
            &PeerVerifier {
                keyring: &ka,
                domain: "site-b.test",
            },
            &KeyringSigner(&ka),
        )
        .unwrap();
    let mut ack = Request::new(Method::Ack, "sip:mail@site-b.test");
    ack.headers
        .push("From", format!("<sip:mail@site-a.test>;tag={from_tag}"));
    ack.headers.push("To", to);
    ack.headers.push("Call-ID", call_id.clone());
    ack.headers.push("CSeq", "1 ACK");
    ack.headers.push("Content-Type", sdp::CONFIRM_CONTENT_TYPE);
    ack.body = sdp::encode_confirm(&done.confirm);
    ep.send_ack(ack, b_sip, Transport::Udp).await.unwrap();
    let tcp = TcpStream::connect(media).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut s = TunnelStream::new(tcp, &done.keys, Role::Caller, Limits::default());
    s.send_hello().await.unwrap();
    let mut raw = RawSmtp {
        s,
        buf: Vec::new(),
        _ep: ep,
        call_id,
    };
    let greeting = raw.reply().await;
    assert!(greeting.starts_with("220"), "{greeting}");
    let ehlo = raw.cmd("EHLO relay.site-a.test").await;
    assert!(ehlo.contains("SMTPUTF8"), "{ehlo}");
    raw
}

fn queued(spool: &Path) -> usize {
    std::fs::read_dir(spool.join("queue"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn message(subject: &str) -> String {
    format!(
        "From: someone <someone@site-a.test>\r\nTo: bob@site-b.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    )
}

/// The header section of a delivered file.
fn header_section(file: &[u8]) -> String {
    let text = String::from_utf8_lossy(file);
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every occurrence of the trace field in a header section, unfolded.
fn trace_fields(header: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut in_field = false;
    for line in header.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if in_field && let Some(last) = out.last_mut() {
                last.push_str(line);
            }
            continue;
        }
        in_field = line
            .split(':')
            .next()
            .is_some_and(|n| n.trim_end().eq_ignore_ascii_case(FIELD));
        if in_field {
            out.push(line.to_string());
        }
    }
    out
}

/// The attack of the issue: over its real call, partner A claims senders of other domains,
/// B's own domain and B's other partner's domain among them. Each is refused at MAIL FROM with 550 5.7.1 naming
/// site-a.test, and B queues and delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_send_as_another_domain() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // B has a second partner, site-c.test: A may not send as C either.
    let (a, b) = edited_configs(
        dir.path(),
        |s| s,
        |s| {
            s.replace(
                "\n[delivery]",
                "\n[[peer]]\ndomain = \"site-c.test\"\nsip = \"sip:mail@127.0.0.1:9\"\ntrust = \"opportunistic\"\n[delivery]",
            )
        },
    );
    assert_eq!(b.peers.len(), 2);
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let mut call = call_b_as_a(&sites).await;
    let mut accepted = Vec::new();
    for (i, sender) in [
        "<ceo@site-x.test>",
        "<ceo@site-c.test>",
        "<ceo@mail.site-c.test>",
        "<it-admin@site-b.test>",
        "<IT-Admin@SITE-B.TEST.>",
        "<ceo@evilsite-a.test>",
        "<ceo@site-a.test.evil.test>",
        "<ceo@xsite-a.test>",
        "<\"ceo@site-b.test\"@site-a.test>",
        "<@relay.site-a.test:ceo@site-b.test>",
        "<ceo@[127.0.0.1]>",
        "<jörg@bücher.test> SMTPUTF8",
    ]
    .into_iter()
    .enumerate()
    {
        if i % 4 == 3 {
            // Each refusal is followed by an out-of-sequence RCPT (an SMTP error); stay
            // below the server's error limit with a fresh call now and then.
            let _ = call.cmd("QUIT").await;
            call = call_b_as_a(&sites).await;
        }
        let (mail, end) = call
            .send(
                &format!("MAIL FROM:{sender}"),
                "bob@site-b.test",
                &message(&format!("forged {i}")),
            )
            .await;
        if let Some(end) = end {
            accepted.push(format!("{sender}: MAIL {mail:?}, end of data {end:?}"));
            continue;
        }
        if sender.contains('[') {
            // An address literal does not even parse as a sender here.
            assert!(mail.starts_with('5'), "{sender}: {mail}");
            continue;
        }
        assert!(
            mail.starts_with("550 5.7.1 ") && mail.contains("authenticated peer site-a.test"),
            "{sender}: {mail}"
        );
    }
    let _ = call.cmd("QUIT").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = maildir_files(&md).len();
    let in_queue = queued(&sites.b_cfg.spool);
    assert!(
        accepted.is_empty() && delivered == 0 && in_queue == 0,
        "B took forged senders from its peer: {accepted:#?}; {delivered} delivered, {in_queue} queued"
    );
    sites.stop().await;
}

/// What the peer may still send: the null sender (bounces), its own domain in any case and
/// with a trailing dot, its subdomains (also in UTF-8 with SMTPUTF8), quoted local parts,
/// and the domains B lists for it with `senders = [...]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_send_as_itself_its_subdomains_and_listed_domains() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = edited_configs(
        dir.path(),
        |s| s,
        |s| {
            s.replace(
                "\n[delivery]",
                "\nsenders = [\"partner-of-a.test\", \"Bücher.Test\"]\n[delivery]",
            )
        },
    );
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    let mut call = call_b_as_a(&sites).await;
    let good = [
        "<>",
        "<alice@site-a.test>",
        "<Alice@Site-A.Test.>",
        "<bob@eu.site-a.test>",
        "<\"john doe\"@site-a.test>",
        "<jörg@münchen.site-a.test> SMTPUTF8",
        "<x@partner-of-a.test>",
        "<x@lists.partner-of-a.test>",
        "<x@xn--bcher-kva.test>",
        "<jörg@bücher.test> SMTPUTF8",
    ];
    for (i, sender) in good.iter().enumerate() {
        let (mail, end) = call
            .send(
                &format!("MAIL FROM:{sender}"),
                "bob@site-b.test",
                &message(&format!("good {i}")),
            )
            .await;
        assert!(mail.starts_with("250"), "{sender}: {mail}");
        let end = end.unwrap();
        assert!(end.starts_with("250"), "{sender}: {end}");
    }
    // Near misses of the listed domains are still refused.
    for sender in ["<x@evilpartner-of-a.test>", "<x@partner-of-a.test.evil>"] {
        let (mail, end) = call
            .send(&format!("MAIL FROM:{sender}"), "bob@site-b.test", "x\r\n")
            .await;
        assert!(
            end.is_none() && mail.starts_with("550 5.7.1"),
            "{sender}: {mail}"
        );
    }
    let _ = call.cmd("QUIT").await;
    assert!(
        wait_until(Duration::from_secs(20), || maildir_files(&md).len()
            == good.len())
        .await,
        "delivered {} of {}",
        maildir_files(&md).len(),
        good.len()
    );
    sites.stop().await;
}

/// The trace field: B adds one naming the peer, its fingerprint and the call, at the top
/// (right below its own Received line);
/// look-alikes from the site's MTA (submitted to A) and from the peer itself (sent through
/// the call) are gone on arrival, folded or not, in any case, anywhere in the header
/// section; the same text in the body stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_field_names_the_peer_and_forged_ones_are_removed() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let a_fpr = Keyring::open(&sites.a_cfg.keyring)
        .unwrap()
        .own_fingerprint()
        .unwrap()
        .to_uppercase();
    let md = sites.maildir(&sites.b_cfg);
    let forged = |subject: &str| {
        format!(
            "X-Sipmail-Authenticated-Peer: site-b.test; fingerprint=00000000FORGEDTOP\r\n\
             From: Alice <alice@site-a.test>\r\n\
             x-sipmail-authenticated-peer: site-b.test;\r\n\tfingerprint=00000000FORGEDFOLDED;\r\n call-id=x\r\n\
             To: Bob <bob@site-b.test>\r\n\
             X-SIPMAIL-AUTHENTICATED-PEER :site-b.test; fingerprint=00000000FORGEDWSP\r\n\
             Subject: {subject}\r\n\
             X-Sipmail-Authenticated-Peer-Note: kept, a different field\r\n\
             \r\n\
             X-Sipmail-Authenticated-Peer: this line is body text and stays\r\n"
        )
    };
    // 1. From the site's MTA, through A (the normal path).
    let via_a = forged("via A");
    submit(
        sites.a.smtp_addr,
        &[via_a.clone().into_bytes()],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    // 2. From the peer itself, through its call.
    let mut call = call_b_as_a(&sites).await;
    let direct = forged("direct");
    let (mail, end) = call
        .send("MAIL FROM:<alice@site-a.test>", "bob@site-b.test", &direct)
        .await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(
        end.as_deref().is_some_and(|e| e.starts_with("250")),
        "{end:?}"
    );
    let _ = call.cmd("QUIT").await;
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 2).await);

    for (what, original, call_id) in [
        ("via A", via_a, None),
        ("direct", direct, Some(call.call_id.clone())),
    ] {
        let file = maildir_files(&md)
            .into_iter()
            .map(|f| std::fs::read(f).unwrap())
            .find(|f| header_section(f).contains(&format!("Subject: {what}\r\n")))
            .unwrap_or_else(|| panic!("{what}: not delivered"));
        let header = header_section(&file);
        let fields = trace_fields(&header);
        assert_eq!(fields.len(), 1, "{what}: {fields:#?}\n{header}");
        let f = &fields[0];
        assert!(
            f.starts_with(&format!("{FIELD}: site-a.test;"))
                && f.contains(&format!("fingerprint={a_fpr}")),
            "{what}: {f}"
        );
        if let Some(id) = call_id {
            assert!(f.contains(&format!("call-id={id}")), "{what}: {f}");
        }
        assert!(!header.contains("FORGED"), "{what}:\n{header}");
        // It is at the top, right below B's own Received line: only that, and Return-Path
        // and Delivered-To (added at delivery), are above it.
        let lines: Vec<&str> = header.split("\r\n").collect();
        let first = lines.iter().position(|l| l.starts_with(FIELD)).unwrap();
        assert!(
            first >= 1
                && lines[..first].iter().all(|l| l.starts_with("Return-Path: ")
                    || l.starts_with("Delivered-To: ")
                    || l.starts_with("Received: ")
                    || l.starts_with('\t')),
            "{what}:\n{header}"
        );
        let received = lines[..first]
            .iter()
            .rposition(|l| l.starts_with("Received: "))
            .map(|i| lines[i..first].concat());
        assert!(
            received.is_some_and(|r| r.contains("by site-b.test (sipmail)")),
            "{what}:\n{header}"
        );
        // Everything else of the message is as sent, the forged fields taken out.
        let text = String::from_utf8_lossy(&file).to_string();
        let expect = original
            .replace(
                "X-Sipmail-Authenticated-Peer: site-b.test; fingerprint=00000000FORGEDTOP\r\n",
                "",
            )
            .replace(
                "x-sipmail-authenticated-peer: site-b.test;\r\n\tfingerprint=00000000FORGEDFOLDED;\r\n call-id=x\r\n",
                "",
            )
            .replace(
                "X-SIPMAIL-AUTHENTICATED-PEER :site-b.test; fingerprint=00000000FORGEDWSP\r\n",
                "",
            );
        assert!(text.ends_with(&expect), "{what}:\n{text}");
        assert!(text.contains("X-Sipmail-Authenticated-Peer-Note: kept"));
        assert!(text.contains(
            "\r\n\r\nX-Sipmail-Authenticated-Peer: this line is body text and stays\r\n"
        ));
    }
    sites.stop().await;
}

/// A PSK peer has no key: the field says `auth=psk` and claims no fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_field_of_a_psk_call_claims_no_fingerprint() {
    use std::os::unix::fs::PermissionsExt;
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let psk = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, "Jk1l0q4t0m8d2xQ3m1Zb7wq9c5nV6yR2pL8sT4uE0aI=\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "\ntrust = \"psk\"\npsk_file = \"{}\"\n[delivery]",
            p.display()
        )
    };
    let (pa, pb) = (psk("a.psk"), psk("b.psk"));
    let (a, b) = edited_configs(
        dir.path(),
        |s| s.replace("\n[delivery]", &pa),
        |s| s.replace("\n[delivery]", &pb),
    );
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    submit(
        sites.a.smtp_addr,
        &[message("psk").into_bytes()],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || maildir_files(&md).len() == 1).await);
    let file = std::fs::read(&maildir_files(&md)[0]).unwrap();
    let header = header_section(&file);
    let fields = trace_fields(&header);
    assert_eq!(fields.len(), 1, "{header}");
    assert!(
        fields[0].starts_with(&format!("{FIELD}: site-a.test; auth=psk;"))
            && fields[0].contains("call-id=")
            && !fields[0].contains("fingerprint"),
        "{}",
        fields[0]
    );
    sites.stop().await;
}
