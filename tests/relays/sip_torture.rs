//! Malformed and hostile SIP in the spirit of RFC 4475, sent over UDP and over TCP to a
//! live relay (site B of `sipmail::demo::TwoSites`). Each message gets the answer RFC 3261
//! asks for (or none, for what cannot be answered); afterwards the relay still answers
//! OPTIONS and still carries mail from A to B. Also: methods (405, 501, 420, 416, 481,
//! CANCEL), the INVITE rate limit from a flooding address while the real peer gets
//! through, and the half-open TCP time-out.

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{
    TwoSites, free_port, maildir_files, make_keys, sample_message, site_config, submit,
};
use sipmail::relay::Hooks;
use sipmail::sip::{Response, SipMessage, parse_datagram, parse_stream};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A request with the five mandatory headers. `{T}` in `extra` is replaced by the
/// transport, `{B}` by a fresh branch.
fn req(method: &str, uri: &str, transport: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let branch = sipmail::sip::new_branch();
    let mut m = format!(
        "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:5999;branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:tester@127.0.0.1>;tag=t{n}\r\nTo: <sip:mail@site-b.test>\r\n\
         Call-ID: {n}@torture\r\nCSeq: 1 {method}\r\n{extra}",
        n = sipmail::sip::random_hex(6),
    )
    .replace("{T}", transport)
    .into_bytes();
    if !extra.to_ascii_lowercase().contains("content-length") {
        m.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    m.extend_from_slice(b"\r\n");
    m.extend_from_slice(body);
    m
}

/// What we expect back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status code.
    Status(u16),
    /// 400, or nothing at all (dropped, or the TCP connection closed).
    BadOrNothing,
}

/// The torture cases: (name, bytes, expected). Built per transport (the Via says which).
fn cases(t: &str) -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let opt = |extra: &str| req("OPTIONS", "sip:mail@site-b.test", t, extra, b"");
    let mut v: Vec<(&'static str, Vec<u8>, Expect)> = Vec::new();
    // Content-Length wrong in every way.
    v.push((
        "Content-Length larger than the body",
        req(
            "OPTIONS",
            "sip:mail@site-b.test",
            t,
            "Content-Length: 500\r\n",
            b"short",
        ),
        BadOrNothing,
    ));
    v.push((
        "negative Content-Length",
        opt("Content-Length: -5\r\n"),
        BadOrNothing,
    ));
    v.push((
        "huge Content-Length",
        opt("Content-Length: 99999999999999999999999\r\n"),
        BadOrNothing,
    ));
    v.push((
        "two different Content-Lengths",
        opt("Content-Length: 0\r\nl: 4\r\n"),
        BadOrNothing,
    ));
    // Huge and too many headers.
    v.push((
        "one 20,000-byte header",
        opt(&format!("Subject: {}\r\n", "x".repeat(20_000))),
        BadOrNothing,
    ));
    v.push((
        "300 header fields",
        opt(&"X-Junk: y\r\n".repeat(300)),
        BadOrNothing,
    ));
    // Over the 65,535-byte limit (TCP), or just under it in one datagram (UDP).
    let big_line = format!("X-Big: {}\r\n", "y".repeat(6_000));
    if t == "TCP" {
        v.push((
            "70,000-byte message",
            opt(&big_line.repeat(12)),
            BadOrNothing,
        ));
    } else {
        v.push((
            "60,000-byte datagram",
            opt(&big_line.repeat(10)),
            Status(200),
        ));
    }
    // Duplicated single-instance headers.
    v.push((
        "two Call-IDs",
        opt("Call-ID: second@torture\r\n"),
        BadOrNothing,
    ));
    v.push(("two CSeqs", opt("CSeq: 2 OPTIONS\r\n"), BadOrNothing));
    v.push(("two Froms", opt("f: <sip:x@y>;tag=2\r\n"), BadOrNothing));
    // Bad values.
    v.push((
        "CSeq method does not match",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"").replacen(b"1 OPTIONS", b"1 INVITE"),
        BadOrNothing,
    ));
    v.push((
        "CSeq number too large",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"")
            .replacen(b"1 OPTIONS", b"4294967296 OPTIONS"),
        BadOrNothing,
    ));
    v.push((
        "Max-Forwards of 5 digits",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"")
            .replacen(b"Max-Forwards: 70", b"Max-Forwards: 99999"),
        BadOrNothing,
    ));
    v.push((
        "unterminated quoted display name",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"")
            .replacen(b"From: <sip:tester", b"From: \"J Rosenberg <sip:tester"),
        BadOrNothing,
    ));
    v.push((
        "From without a URI scheme",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"")
            .replacen(b"<sip:tester@127.0.0.1>", b"<tester@127.0.0.1>"),
        BadOrNothing,
    ));
    v.push((
        "Via without a host",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"").replacen(b"127.0.0.1:5999;", b";"),
        BadOrNothing,
    ));
    v.push((
        "SIP/7.0",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"").replacen(b"SIP/2.0\r\n", b"SIP/7.0\r\n"),
        BadOrNothing,
    ));
    v.push((
        "space inside the Request-URI",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"").replacen(b"sip:mail@", b"sip:ma il@"),
        BadOrNothing,
    ));
    v.push((
        "header section not UTF-8",
        opt("Subject: \u{0}\r\n").replacen(b"\0", b"\xff\xfe"),
        BadOrNothing,
    ));
    v.push((
        "header line without a colon",
        opt("NoColonHere\r\n"),
        BadOrNothing,
    ));
    v.push((
        "missing Call-ID",
        req("OPTIONS", "sip:mail@site-b.test", t, "", b"").replacen(b"Call-ID:", b"X-Call-ID:"),
        BadOrNothing,
    ));
    // Truncated and binary junk.
    let full = req("OPTIONS", "sip:mail@site-b.test", t, "", b"");
    v.push((
        "truncated in the headers",
        full[..full.len() / 2].to_vec(),
        BadOrNothing,
    ));
    v.push((
        "only a start line",
        b"INVITE sip:mail@site-b.test SIP/2.0\r\n".to_vec(),
        BadOrNothing,
    ));
    v.push((
        "binary junk",
        (0..600u32).map(|i| (i * 7919 % 251) as u8).collect(),
        BadOrNothing,
    ));
    v.push(("NUL bytes", vec![0u8; 200], BadOrNothing));
    v.push(("a response to nothing", b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKnothing\r\nCSeq: 1 INVITE\r\nCall-ID: x\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nContent-Length: 0\r\n\r\n".to_vec(), BadOrNothing));
    // Valid, if odd: these must get a proper answer.
    v.push((
        "odd whitespace, folding and compact forms (RFC 4475 3.1.1.1 style)",
        format!(
            "OPTIONS sip:mail@site-b.test SIP/2.0\r\nTO :\r\n <sip:mail@site-b.test>\r\nfrom   : \"J \\\"Rosenberg\\\\\\\"\"  <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
             MaX-fOrWaRdS: 0068\r\ni: wsinv.{}@192.0.2.1\r\nl   : 0\r\ncseq: 0009\r\n  OPTIONS\r\n\
             v  : SIP/2.0/{t}  127.0.0.1:5999 ;\r\n  branch  =   {}\r\n\r\n",
            sipmail::sip::random_hex(4),
            sipmail::sip::new_branch()
        )
        .into_bytes(),
        Status(200),
    ));
    v.push((
        "escaped characters in the URI user part",
        req("OPTIONS", "sip:%6Dail%40x@site-b.test", t, "", b""),
        Status(200),
    ));
    v.push((
        "unknown URI scheme",
        req("OPTIONS", "nosuchscheme:mail@site-b.test", t, "", b""),
        Status(416),
    ));
    v.push((
        "a request over 1,300 bytes",
        opt(&format!("Subject: {}\r\n", "z".repeat(2000))),
        Status(200),
    ));
    v.push((
        "unknown header with an odd name",
        opt("X-~!%*_+`'.-: fine\r\n"),
        Status(200),
    ));
    v.push((
        "unknown method",
        req("FOOBAR", "sip:mail@site-b.test", t, "", b""),
        Status(501),
    ));
    v.push((
        "REGISTER",
        req("REGISTER", "sip:site-b.test", t, "", b""),
        Status(405),
    ));
    v.push((
        "Require: an extension",
        opt("Require: 100rel, nosuchext\r\n"),
        Status(420),
    ));
    v.push((
        "BYE for no dialog",
        req("BYE", "sip:mail@site-b.test", t, "", b"").replacen(
            b"To: <sip:mail@site-b.test>",
            b"To: <sip:mail@site-b.test>;tag=nope",
        ),
        Status(481),
    ));
    v.push((
        "CANCEL for no INVITE",
        req("CANCEL", "sip:mail@site-b.test", t, "", b""),
        Status(481),
    ));
    v.push((
        "INVITE with an audio offer",
        req(
            "INVITE",
            "sip:mail@site-b.test",
            t,
            "Contact: <sip:tester@127.0.0.1:5999>\r\nContent-Type: application/sdp\r\n",
            b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        ),
        Status(488),
    ));
    v.push((
        "INVITE with a text body",
        req(
            "INVITE",
            "sip:mail@site-b.test",
            t,
            "Content-Type: text/plain\r\n",
            b"hello",
        ),
        Status(415),
    ));
    v
}

trait Replace {
    fn replacen(self, from: &[u8], to: &[u8]) -> Vec<u8>;
}
impl Replace for Vec<u8> {
    fn replacen(self, from: &[u8], to: &[u8]) -> Vec<u8> {
        match self.windows(from.len()).position(|w| w == from) {
            Some(i) => {
                let mut out = self[..i].to_vec();
                out.extend_from_slice(to);
                out.extend_from_slice(&self[i + from.len()..]);
                out
            }
            None => panic!("test bug: {:?} not found", String::from_utf8_lossy(from)),
        }
    }
}

fn final_status(bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Ok(Some((m, n))) = parse_stream(rest) {
        if let SipMessage::Response(r) = m
            && r.status >= 200
        {
            out.push(r.status);
        }
        rest = &rest[n..];
    }
    out
}

async fn udp_exchange(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<Response> {
    sock.send_to(msg, to).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(400), sock.recv_from(&mut buf)).await
    {
        if let Ok(SipMessage::Response(r)) = parse_datagram(&buf[..n]) {
            out.push(r);
        }
    }
    out
}

async fn tcp_exchange(to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(to).await.unwrap();
    let _ = s.write_all(msg).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    // Read until the relay closes or is quiet for a moment.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(600), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn check(name: &str, transport: &str, got: &[u16], expect: Expect) {
    match expect {
        Expect::Status(s) => assert!(
            got.contains(&s),
            "{name} over {transport}: expected {s}, got {got:?}"
        ),
        Expect::BadOrNothing => assert!(
            got.iter().all(|s| *s == 400),
            "{name} over {transport}: expected 400 or nothing, got {got:?}"
        ),
    }
}

async fn options_ok(b: SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = udp_exchange(
        &sock,
        b,
        &req("OPTIONS", "sip:mail@site-b.test", "UDP", "", b""),
    )
    .await;
    assert!(
        r.iter().any(|r| r.status == 200),
        "OPTIONS after torture: {r:?}"
    );
    let t = tcp_exchange(b, &req("OPTIONS", "sip:mail@site-b.test", "TCP", "", b"")).await;
    assert_eq!(final_status(&t), vec![200]);
}

async fn mail_a_to_b(sites: &TwoSites, run: &str, n: usize) {
    let before = maildir_files(&sites.maildir(&sites.b_cfg)).len();
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| sample_message(i, run)).collect();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |_| {})
        .await
        .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(
        wait_until(Duration::from_secs(30), || maildir_files(&md).len()
            >= before + n)
        .await,
        "mail A->B did not arrive after the torture ({run})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_over_udp_and_tcp_leave_the_relay_working() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let b = sites.b.sip_addr;
    // From 127.0.0.3, so the torture does not count against the peer's address.
    let sock = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    for (name, msg, expect) in cases("UDP") {
        let resp = udp_exchange(&sock, b, &msg).await;
        let got: Vec<u16> = resp
            .iter()
            .filter(|r| r.status >= 200)
            .map(|r| r.status)
            .collect();
        let warnings: Vec<&str> = resp
            .iter()
            .filter_map(|r| r.headers.get("Warning"))
            .collect();
        check(&format!("{name} {warnings:?}"), "UDP", &got, expect);
    }
    for (name, msg, expect) in cases("TCP") {
        let got = final_status(&tcp_exchange(b, &msg).await);
        check(name, "TCP", &got, expect);
    }
    // Three requests in one TCP write, one of them compact: three answers, in order.
    let mut three = req("OPTIONS", "sip:mail@site-b.test", "TCP", "", b"");
    three.extend(req("FOOBAR", "sip:mail@site-b.test", "TCP", "", b""));
    three.extend(
        req("OPTIONS", "sip:mail@site-b.test", "TCP", "", b"")
            .replacen(b"Call-ID:", b"i:")
            .replacen(b"Content-Length:", b"l:"),
    );
    assert_eq!(
        final_status(&tcp_exchange(b, &three).await),
        vec![200, 501, 200]
    );
    options_ok(b).await;
    mail_a_to_b(&sites, "torture", 3).await;
    sites.stop().await;
}

/// A retransmitted INVITE gets the same answer and is not a new call; CANCEL for an INVITE
/// that was answered has no effect (200 to the CANCEL only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_get_the_same_answer() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let b = sites.b.sip_addr;
    let sock = UdpSocket::bind("127.0.0.4:0").await.unwrap();
    let inv = req(
        "INVITE",
        "sip:mail@site-b.test",
        "UDP",
        "Content-Type: application/sdp\r\n",
        b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
    );
    let first = udp_exchange(&sock, b, &inv).await;
    let again = udp_exchange(&sock, b, &inv).await;
    let finals = |v: &[Response]| -> Vec<Vec<u8>> {
        v.iter()
            .filter(|r| r.status >= 200)
            .map(|r| r.to_bytes())
            .collect()
    };
    assert_eq!(finals(&first).len(), 1, "{first:?}");
    assert_eq!(first[first.len() - 1].status, 488);
    // The retransmission gets byte-for-byte the same 488 (same To tag), not a new answer.
    assert!(
        finals(&again).iter().all(|r| *r == finals(&first)[0]),
        "{again:?}"
    );
    // CANCEL after the final response: 200 for the CANCEL, nothing else.
    let cancel = String::from_utf8(inv.clone())
        .unwrap()
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL")
        .replace("Content-Type: application/sdp\r\n", "");
    let mut cancel = cancel
        .lines()
        .filter(|l| !l.starts_with("Content-Length"))
        .collect::<Vec<_>>()
        .join("\r\n");
    cancel.push_str("\r\nContent-Length: 0\r\n\r\n");
    // (The 488 is retransmitted meanwhile, since we never ACK it: look at CANCEL's answers.)
    let r: Vec<u16> = udp_exchange(&sock, b, cancel.as_bytes())
        .await
        .iter()
        .filter(|r| r.headers.get("CSeq").is_some_and(|c| c.ends_with("CANCEL")))
        .map(|r| r.status)
        .collect();
    assert_eq!(r, vec![200]);
    sites.stop().await;
}

/// 300 INVITEs from one address in a burst: most get 503 with Retry-After, and mail from
/// the real peer (whose address is exempt) keeps flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_flood_is_rate_limited_but_the_peer_gets_through() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let sites = TwoSites::start(dir.path(), Hooks::default()).await.unwrap();
    let b = sites.b.sip_addr;
    let flooder = UdpSocket::bind("127.0.0.5:0").await.unwrap();
    let sent = 300;
    let t0 = std::time::Instant::now();
    let flood = async {
        for i in 0..sent {
            let inv = req(
                "INVITE",
                "sip:mail@site-b.test",
                "UDP",
                "Content-Type: application/sdp\r\n",
                format!("v=0\r\no=- {i} 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n").as_bytes(),
            );
            flooder.send_to(&inv, b).await.unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        // Distinct calls per status (the 488s are retransmitted: we never ACK them).
        let mut seen = std::collections::HashSet::<(u16, String)>::new();
        let mut codes = std::collections::HashMap::<u16, usize>::new();
        let mut retry_after = 0;
        let mut buf = vec![0u8; 65536];
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(800), flooder.recv_from(&mut buf)).await
        {
            if let Ok(SipMessage::Response(r)) = parse_datagram(&buf[..n])
                && seen.insert((r.status, r.headers.call_id().unwrap_or("").to_string()))
            {
                *codes.entry(r.status).or_default() += 1;
                if r.status == 503 && r.headers.get("Retry-After").is_some() {
                    retry_after += 1;
                }
            }
        }
        (codes, retry_after)
    };
    let ((), (codes, retry_after)) = tokio::join!(mail_a_to_b(&sites, "flood", 2), flood);
    let c503 = codes.get(&503).copied().unwrap_or(0);
    let c488 = codes.get(&488).copied().unwrap_or(0);
    // Let in: at most the burst (40) plus 20 a second while it lasted (UDP may lose some).
    let secs = t0.elapsed().as_secs_f64();
    let allowed = 40.0 + 20.0 * secs;
    assert!(
        c488 >= 1 && c488 as f64 <= allowed + 5.0,
        "{codes:?} in {secs:.1} s"
    );
    assert!(
        c503 >= 100,
        "most of the flood must be refused: {codes:?} in {secs:.1} s"
    );
    assert_eq!(retry_after, c503, "every 503 carries Retry-After");
    options_ok(b).await;
    sites.stop().await;
}

/// A TCP connection that starts a message and stalls is closed after `tcp_half_open`;
/// one that never sends anything, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tcp_connections_time_out() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    make_keys(dir.path()).unwrap();
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let cfg = |me, other, p, q| {
        site_config(dir.path(), me, other, p, q).replace(
            "[sip]\n",
            "[sip]\ntcp_half_open = \"1s\"\nmax_tcp_per_source = 4\n",
        )
    };
    let a_cfg = Config::parse("a", &cfg("site-a", "site-b", pa, pb)).unwrap();
    let b_cfg = Config::parse("b", &cfg("site-b", "site-a", pb, pa)).unwrap();
    assert_eq!(b_cfg.sip_limits.tcp_half_open, Duration::from_secs(1));
    let sites = TwoSites::start_with(dir.path(), a_cfg, b_cfg, Hooks::default())
        .await
        .unwrap();
    let b = sites.b.sip_addr;
    let mut stalled = TcpStream::connect(b).await.unwrap();
    stalled
        .write_all(b"OPTIONS sip:mail@site-b.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(b).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    for s in [&mut stalled, &mut silent] {
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(4));
    // Per-source cap: a fifth simultaneous connection from one address is refused.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(TcpStream::connect(b).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = TcpStream::connect(b).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "fifth connection not refused: {r:?}"
    );
    drop(conns);
    options_ok(b).await;
    mail_a_to_b(&sites, "half-open", 1).await;
    sites.stop().await;
}
