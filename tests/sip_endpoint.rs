use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sipmail::sip::endpoint::{Endpoint, EndpointConfig, Incoming, Transport, TxnError};
use sipmail::sip::message::*;
use sipmail::sip::random_hex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::timeout;

fn cfg(t1_ms: u64) -> EndpointConfig {
    EndpointConfig {
        t1: Duration::from_millis(t1_ms),
        t2: Duration::from_millis(t1_ms * 8),
        ..EndpointConfig::default()
    }
}

async fn endpoint(t1_ms: u64) -> (Endpoint, mpsc::Receiver<Incoming>) {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), cfg(t1_ms))
        .await
        .unwrap()
}

fn invite(to: SocketAddr, body: &[u8]) -> Request {
    let mut r = Request::new(Method::Invite, format!("sip:relay@{to}"));
    r.headers
        .push("From", format!("<sip:relay@site-a>;tag={}", random_hex(4)));
    r.headers.push("To", "<sip:relay@site-b>");
    r.headers
        .push("Call-ID", format!("{}@site-a", random_hex(8)));
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", "<sip:relay@127.0.0.1>");
    r.headers.push("Content-Type", "application/octet-stream");
    r.body = body.to_vec();
    r
}

fn ack_for(inv: &Request, resp: &Response, body: &[u8]) -> Request {
    let mut a = Request::new(Method::Ack, inv.uri.clone());
    a.headers.push("From", inv.headers.get("From").unwrap());
    a.headers.push("To", resp.headers.get("To").unwrap());
    a.headers
        .push("Call-ID", inv.headers.get("Call-ID").unwrap());
    a.headers
        .push("CSeq", format!("{} ACK", inv.headers.cseq().unwrap().seq));
    a.body = body.to_vec();
    a
}

/// Answers the first INVITE with 200 + body, and returns the ACK it gets.
async fn uas_answer_invite(
    mut rx: mpsc::Receiver<Incoming>,
) -> (Incoming, Incoming, mpsc::Receiver<Incoming>) {
    let inc = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.request.method, Method::Invite);
    let mut ok = Response::for_request(&inc.request, 200, "OK").with_to_tag("b-tag");
    ok.body = b"answer\0\r\n\r\nkey".to_vec();
    inc.respond(ok).await.unwrap();
    let ack = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    (inc, ack, rx)
}

async fn invite_200_ack(transport: Transport) {
    let (a, _arx) = endpoint(50).await;
    let (b, brx) = endpoint(50).await;
    let uas = tokio::spawn(uas_answer_invite(brx));
    let inv = invite(b.local_addr(), b"offer\0\r\n\r\nbinary");
    let resp = a
        .request(inv.clone(), b.local_addr(), transport)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"answer\0\r\n\r\nkey");
    assert_eq!(resp.headers.to().unwrap().tag(), Some("b-tag"));
    let ack = ack_for(&inv, &resp, b"ack-body");
    a.send_ack(ack, b.local_addr(), transport).await.unwrap();
    let (inc, ack, mut brx) = uas.await.unwrap();
    assert_eq!(inc.transport, transport);
    assert_eq!(inc.request.body, b"offer\0\r\n\r\nbinary");
    let via = inc.request.headers.top_via().unwrap();
    assert_eq!(via.transport, transport.as_str());
    assert!(via.branch.unwrap().starts_with("z9hG4bK"));
    assert_eq!(
        via.rport,
        Some(Some(inc.source.port())),
        "RFC 3581 rport filled in"
    );
    assert_eq!(ack.request.method, Method::Ack);
    assert_eq!(ack.request.body, b"ack-body");
    assert_eq!(ack.transport, transport);
    // Nothing else (no duplicate INVITE, no duplicate ACK) within a few T1.
    assert!(
        timeout(Duration::from_millis(400), brx.recv())
            .await
            .is_err()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn invite_200_ack_over_udp() {
    invite_200_ack(Transport::Udp).await;
}

#[tokio::test]
async fn invite_200_ack_over_tcp() {
    invite_200_ack(Transport::Tcp).await;
}

#[tokio::test]
async fn tcp_connection_is_reused() {
    let (a, _arx) = endpoint(50).await;
    let (b, mut brx) = endpoint(50).await;
    let server = tokio::spawn(async move {
        let mut sources = Vec::new();
        for _ in 0..3 {
            let inc = brx.recv().await.unwrap();
            sources.push(inc.source);
            inc.respond(Response::for_request(&inc.request, 200, "OK"))
                .await
                .unwrap();
        }
        sources
    });
    for i in 0..3 {
        let mut r = invite(b.local_addr(), b"");
        r.method = Method::Options;
        r.headers.set("CSeq", format!("{} OPTIONS", i + 1));
        let resp = a.request(r, b.local_addr(), Transport::Tcp).await.unwrap();
        assert_eq!(resp.status, 200);
    }
    let sources = server.await.unwrap();
    assert!(
        sources.iter().all(|s| *s == sources[0]),
        "one connection: {sources:?}"
    );
}

/// Receives datagrams on a raw socket; returns (arrival time, parsed message).
async fn recv_msg(sock: &UdpSocket, wait: Duration) -> Option<(Instant, SipMessage, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Some((Instant::now(), parse_datagram(&buf[..n]).unwrap(), from))
}

#[tokio::test]
async fn udp_invite_retransmits_at_t1_then_2t1() {
    let (a, _arx) = endpoint(50).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = peer.local_addr().unwrap();
    let client = tokio::spawn({
        let a = a.clone();
        async move { a.request(invite(dest, b"x"), dest, Transport::Udp).await }
    });
    let mut copies = Vec::new();
    for _ in 0..3 {
        copies.push(recv_msg(&peer, Duration::from_secs(2)).await.expect("copy"));
    }
    let branches: Vec<_> = copies
        .iter()
        .map(|(_, m, _)| m.headers().top_via().unwrap().branch.unwrap())
        .collect();
    assert!(branches.iter().all(|b| *b == branches[0]));
    // Lower bounds check the RFC 3261 timers; upper bounds are loose for loaded CI machines.
    let d1 = copies[1].0 - copies[0].0;
    let d2 = copies[2].0 - copies[1].0;
    assert!(
        d1 >= Duration::from_millis(40) && d1 <= Duration::from_millis(400),
        "first gap {d1:?}"
    );
    assert!(
        d2 >= Duration::from_millis(85) && d2 <= Duration::from_millis(600),
        "second gap {d2:?}"
    );
    // Answer the third copy: 180 then 486; the client ACKs the 486.
    let SipMessage::Request(req) = &copies[2].1 else {
        panic!()
    };
    let from = copies[2].2;
    peer.send_to(&Response::for_request(req, 180, "Ringing").to_bytes(), from)
        .await
        .unwrap();
    peer.send_to(
        &Response::for_request(req, 486, "Busy Here")
            .with_to_tag("x")
            .to_bytes(),
        from,
    )
    .await
    .unwrap();
    let resp = client.await.unwrap().unwrap();
    assert_eq!(resp.status, 486);
    // Drain any retransmission that crossed the answer, then expect the ACK with the same branch.
    loop {
        let (_, m, _) = recv_msg(&peer, Duration::from_secs(2)).await.expect("ACK");
        if let SipMessage::Request(r) = m
            && r.method == Method::Ack
        {
            assert_eq!(r.headers.top_via().unwrap().branch.unwrap(), branches[0]);
            assert_eq!(r.headers.to().unwrap().tag(), Some("x"));
            break;
        }
    }
    a.shutdown().await;
}

#[tokio::test]
async fn provisional_stops_invite_retransmission() {
    let (a, _arx) = endpoint(30).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = peer.local_addr().unwrap();
    let client = tokio::spawn({
        let a = a.clone();
        async move { a.request(invite(dest, b""), dest, Transport::Udp).await }
    });
    let (_, m, from) = recv_msg(&peer, Duration::from_secs(2)).await.unwrap();
    let SipMessage::Request(req) = m else {
        panic!()
    };
    peer.send_to(&Response::for_request(&req, 100, "Trying").to_bytes(), from)
        .await
        .unwrap();
    // Past Timer B (64*30ms) nothing more arrives and the client is still waiting.
    assert!(recv_msg(&peer, Duration::from_millis(2200)).await.is_none());
    assert!(!client.is_finished());
    peer.send_to(
        &Response::for_request(&req, 200, "OK")
            .with_to_tag("t")
            .to_bytes(),
        from,
    )
    .await
    .unwrap();
    assert_eq!(client.await.unwrap().unwrap().status, 200);
    a.shutdown().await;
}

fn raw_invite(branch: &str, via_host: SocketAddr, body: &[u8]) -> Request {
    let mut r = invite(via_host, body);
    r.headers.prepend(
        "Via",
        format!("SIP/2.0/UDP {via_host};branch={branch};rport"),
    );
    r.headers.push("Max-Forwards", "70");
    r
}

#[tokio::test]
async fn retransmitted_invite_gets_cached_response_and_is_delivered_once() {
    // Long T1 so that Timer G does not fire during the test.
    let (b, mut brx) = endpoint(2000).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    let inv = raw_invite("z9hG4bKretrans1", me, b"offer");
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.source, me);
    // Retransmission before the answer: absorbed, not delivered.
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    assert!(
        timeout(Duration::from_millis(200), brx.recv())
            .await
            .is_err()
    );
    let ok = Response::for_request(&inc.request, 200, "OK").with_to_tag("cached");
    inc.respond(ok).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, _) = timeout(Duration::from_secs(1), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let first = buf[..n].to_vec();
    // Retransmission after the answer: the same bytes again.
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let (n, _) = timeout(Duration::from_secs(1), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], &first[..]);
    let SipMessage::Response(r) = parse_datagram(&first).unwrap() else {
        panic!()
    };
    assert_eq!(r.status, 200);
    let via = r.headers.top_via().unwrap();
    assert_eq!(via.received.as_deref(), Some("127.0.0.1"));
    assert_eq!(via.rport, Some(Some(me.port())));
    assert!(
        timeout(Duration::from_millis(200), brx.recv())
            .await
            .is_err(),
        "delivered twice"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn server_retransmits_2xx_until_ack() {
    let (b, mut brx) = endpoint(50).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    let inv = raw_invite("z9hG4bK2xx", me, b"offer");
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    let resp = Response::for_request(&inc.request, 200, "OK").with_to_tag("g");
    inc.respond(resp).await.unwrap();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let (t, m, _) = recv_msg(&peer, Duration::from_secs(2))
            .await
            .expect("2xx copy");
        let SipMessage::Response(r) = m else { panic!() };
        assert_eq!(r.status, 200);
        times.push(t);
        last = Some(r);
    }
    let d1 = times[1] - times[0];
    let d2 = times[2] - times[1];
    assert!(
        d1 >= Duration::from_millis(40) && d1 <= Duration::from_millis(400),
        "{d1:?}"
    );
    assert!(
        d2 >= Duration::from_millis(85) && d2 <= Duration::from_millis(600),
        "{d2:?}"
    );
    // ACK the third copy (new branch, as for a 2xx).
    let mut ack = ack_for(&inv, &last.unwrap(), b"ack!");
    ack.headers
        .prepend("Via", format!("SIP/2.0/UDP {me};branch=z9hG4bKack1"));
    peer.send_to(&ack.to_bytes(), b.local_addr()).await.unwrap();
    // A retransmitted ACK is absorbed.
    peer.send_to(&ack.to_bytes(), b.local_addr()).await.unwrap();
    let got = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.request.method, Method::Ack);
    assert_eq!(got.request.body, b"ack!");
    // After the ACK, no more copies; at most one that crossed it.
    let mut late = 0;
    while recv_msg(&peer, Duration::from_millis(600)).await.is_some() {
        late += 1;
    }
    assert!(late <= 1, "{late} retransmissions after ACK");
    assert!(
        timeout(Duration::from_millis(100), brx.recv())
            .await
            .is_err()
    );
    b.shutdown().await;
}

#[tokio::test]
async fn non2xx_ack_is_absorbed_and_stops_retransmission() {
    let (b, mut brx) = endpoint(50).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    let inv = raw_invite("z9hG4bKbusy", me, b"");
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    inc.respond(Response::for_request(&inc.request, 486, "Busy Here").with_to_tag("b"))
        .await
        .unwrap();
    let (_, m, _) = recv_msg(&peer, Duration::from_secs(1)).await.unwrap();
    let SipMessage::Response(r) = m else { panic!() };
    assert_eq!(r.status, 486);
    let (_, _, _) = recv_msg(&peer, Duration::from_secs(1))
        .await
        .expect("retransmitted 486");
    // ACK with the INVITE's branch.
    let mut ack = ack_for(&inv, &r, b"");
    ack.headers
        .prepend("Via", format!("SIP/2.0/UDP {me};branch=z9hG4bKbusy"));
    peer.send_to(&ack.to_bytes(), b.local_addr()).await.unwrap();
    let mut late = 0;
    while recv_msg(&peer, Duration::from_millis(500)).await.is_some() {
        late += 1;
    }
    assert!(late <= 1);
    assert!(
        timeout(Duration::from_millis(100), brx.recv())
            .await
            .is_err(),
        "ACK for non-2xx must not be delivered"
    );
    assert!(matches!(
        inc.respond(Response::for_request(&inc.request, 500, "x"))
            .await,
        Err(TxnError::AlreadyResponded)
    ));
    b.shutdown().await;
}

#[tokio::test]
async fn remembered_ack_is_resent_on_2xx_retransmission() {
    let (a, _arx) = endpoint(50).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = peer.local_addr().unwrap();
    let inv = invite(dest, b"");
    let client = tokio::spawn({
        let a = a.clone();
        let inv = inv.clone();
        async move { a.request(inv, dest, Transport::Udp).await }
    });
    let (_, m, from) = recv_msg(&peer, Duration::from_secs(2)).await.unwrap();
    let SipMessage::Request(req) = m else {
        panic!()
    };
    let ok = Response::for_request(&req, 200, "OK")
        .with_to_tag("r")
        .to_bytes();
    peer.send_to(&ok, from).await.unwrap();
    let resp = client.await.unwrap().unwrap();
    a.send_ack(ack_for(&inv, &resp, b"k"), dest, Transport::Udp)
        .await
        .unwrap();
    let ack1 = next_ack(&peer).await.expect("ACK");
    peer.send_to(&ok, from).await.unwrap(); // 2xx retransmission
    let ack2 = next_ack(&peer).await.expect("re-sent ACK");
    assert_eq!(ack1, ack2);
    assert_eq!(ack2.body, b"k");
    a.shutdown().await;
}

async fn next_ack(peer: &UdpSocket) -> Option<Request> {
    loop {
        let (_, m, _) = recv_msg(peer, Duration::from_secs(2)).await?;
        if let SipMessage::Request(r) = m
            && r.method == Method::Ack
        {
            return Some(r);
        }
    }
}

#[tokio::test]
async fn large_request_switches_to_tcp() {
    let (a, _arx) = endpoint(50).await;
    let (b, mut brx) = endpoint(50).await;
    let body = vec![0xABu8; 2000];
    let server = tokio::spawn(async move {
        let inc = brx.recv().await.unwrap();
        let t = inc.transport;
        let via = inc.request.headers.top_via().unwrap();
        let len = inc.request.body.len();
        inc.respond(Response::for_request(&inc.request, 200, "OK").with_to_tag("l"))
            .await
            .unwrap();
        (t, via.transport, len)
    });
    let resp = a
        .request(
            invite(b.local_addr(), &body),
            b.local_addr(),
            Transport::Udp,
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let (t, via_t, len) = server.await.unwrap();
    assert_eq!(t, Transport::Tcp);
    assert_eq!(via_t, "TCP");
    assert_eq!(len, 2000);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn timer_b_timeout_when_nobody_answers() {
    let (a, _arx) = endpoint(10).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = peer.local_addr().unwrap();
    let start = Instant::now();
    let r = a.request(invite(dest, b""), dest, Transport::Udp).await;
    let took = start.elapsed();
    assert!(matches!(r, Err(TxnError::Timeout)), "{r:?}");
    assert!(
        took >= Duration::from_millis(640) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    // Original at 0, Timer A at 10, 30, 70, 150, 310, 630 ms; Timer B at 640 -> 7
    let mut n = 0;
    while recv_msg(&peer, Duration::from_millis(50)).await.is_some() {
        n += 1;
    }
    assert_eq!(n, 7, "copies sent");
    a.shutdown().await;
}

#[tokio::test]
async fn timer_f_timeout_non_invite_over_tcp_and_udp() {
    let (a, _arx) = endpoint(10).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let mut r = invite(dest, b"");
    r.method = Method::Options;
    r.headers.set("CSeq", "1 OPTIONS");
    let res = a.request(r.clone(), dest, Transport::Tcp).await;
    assert!(matches!(res, Err(TxnError::Timeout)), "{res:?}");
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let res = a
        .request(r, peer.local_addr().unwrap(), Transport::Udp)
        .await;
    assert!(matches!(res, Err(TxnError::Timeout)), "{res:?}");
    a.shutdown().await;
}

#[tokio::test]
async fn tcp_close_fails_pending_transaction() {
    let (a, _arx) = endpoint(200).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        drop(s);
    });
    let res = a.request(invite(dest, b""), dest, Transport::Tcp).await;
    assert!(matches!(res, Err(TxnError::TransportClosed)), "{res:?}");
    a.shutdown().await;
}

#[tokio::test]
async fn tcp_garbage_gets_400_and_close() {
    let (b, mut brx) = endpoint(50).await;
    let mut s = TcpStream::connect(b.local_addr()).await.unwrap();
    // Clearly a request, but CSeq method does not match.
    let msg = "INVITE sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKbad\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@example.com>\r\nCall-ID: bad@x\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n";
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("SIP/2.0 400 "), "{text}");
    assert!(text.contains("Call-ID: bad@x"));
    assert!(
        timeout(Duration::from_millis(100), brx.recv())
            .await
            .is_err()
    );
    // Not a request at all: just closed.
    let mut s = TcpStream::connect(b.local_addr()).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00 hello\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.is_empty());
    b.shutdown().await;
}

#[tokio::test]
async fn udp_junk_is_dropped_and_endpoint_keeps_working() {
    let (b, mut brx) = endpoint(50).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    for junk in [
        &b"\r\n\r\n"[..],
        b"garbage",
        b"INVITE sip:x SIP/2.0\r\n\r\n",
        &[0u8; 100],
    ] {
        peer.send_to(junk, b.local_addr()).await.unwrap();
    }
    let mut opt = raw_invite("z9hG4bKafterjunk", me, b"");
    opt.method = Method::Options;
    opt.headers.set("CSeq", "1 OPTIONS");
    peer.send_to(&opt.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.request.method, Method::Options);
    inc.respond(Response::for_request(&inc.request, 200, "OK"))
        .await
        .unwrap();
    let (_, m, _) = recv_msg(&peer, Duration::from_secs(1)).await.unwrap();
    assert!(matches!(m, SipMessage::Response(ref r) if r.status == 200));
    b.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_incoming_channel_and_fails_requests() {
    let (a, mut arx) = endpoint(50).await;
    a.shutdown().await;
    assert!(
        timeout(Duration::from_secs(1), arx.recv())
            .await
            .unwrap()
            .is_none()
    );
    let r = a
        .request(invite(a.local_addr(), b""), a.local_addr(), Transport::Udp)
        .await;
    assert!(matches!(r, Err(TxnError::Shutdown)), "{r:?}");
}

/// Every response datagram `peer` receives within `wait`, parsed.
async fn responses(peer: &UdpSocket, wait: Duration) -> Vec<Response> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok((n, _))) = timeout(wait, peer.recv_from(&mut buf)).await {
        if let Ok(SipMessage::Response(r)) = parse_datagram(&buf[..n]) {
            out.push(r);
        }
    }
    out
}

fn cancel_for(inv: &Request) -> Request {
    let mut c = Request::new(Method::Cancel, inv.uri.clone());
    for name in ["Via", "From", "To", "Call-ID", "Max-Forwards"] {
        c.headers.push(name, inv.headers.get(name).unwrap());
    }
    let seq = inv.headers.cseq().unwrap().seq;
    c.headers.push("CSeq", format!("{seq} CANCEL"));
    c
}

#[tokio::test]
async fn cancel_before_the_answer_gets_200_and_the_invite_487() {
    let (b, mut brx) = endpoint(2000).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    let inv = raw_invite("z9hG4bKcancel1", me, b"offer");
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    peer.send_to(&cancel_for(&inv).to_bytes(), b.local_addr())
        .await
        .unwrap();
    let got = responses(&peer, Duration::from_millis(300)).await;
    let by_method = |m: &str| -> Vec<u16> {
        got.iter()
            .filter(|r| r.headers.cseq().unwrap().method.as_str() == m)
            .map(|r| r.status)
            .collect()
    };
    assert_eq!(by_method("CANCEL"), vec![200], "{got:?}");
    assert_eq!(by_method("INVITE"), vec![487], "{got:?}");
    // The 487 has a To tag, and it is the same as the CANCEL's 200.
    let tag = |m: &str| {
        got.iter()
            .find(|r| r.headers.cseq().unwrap().method.as_str() == m)
            .and_then(|r| r.headers.to().ok()?.tag().map(str::to_string))
    };
    assert!(tag("INVITE").is_some());
    assert_eq!(tag("INVITE"), tag("CANCEL"));
    // The application's late answer is refused: the INVITE is over.
    let late = inc
        .respond(Response::for_request(&inc.request, 200, "OK").with_to_tag("late"))
        .await;
    assert!(matches!(late, Err(TxnError::AlreadyResponded)), "{late:?}");
    // The CANCEL was not delivered to the application.
    assert!(
        timeout(Duration::from_millis(200), brx.recv())
            .await
            .is_err()
    );
    b.shutdown().await;
}

#[tokio::test]
async fn cancel_after_the_answer_or_for_nothing() {
    let (b, mut brx) = endpoint(2000).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    // For an INVITE we never saw: 481.
    let ghost = raw_invite("z9hG4bKghost", me, b"");
    peer.send_to(&cancel_for(&ghost).to_bytes(), b.local_addr())
        .await
        .unwrap();
    let got = responses(&peer, Duration::from_millis(300)).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), vec![481]);
    // After the final response: 200 for the CANCEL, nothing for the INVITE.
    let inv = raw_invite("z9hG4bKcancel2", me, b"offer");
    peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    let inc = timeout(Duration::from_secs(2), brx.recv())
        .await
        .unwrap()
        .unwrap();
    inc.respond(Response::for_request(&inc.request, 486, "Busy Here"))
        .await
        .unwrap();
    let first = responses(&peer, Duration::from_millis(200)).await;
    assert_eq!(first[0].status, 486);
    assert!(
        first[0].headers.to().unwrap().tag().is_some(),
        "a final non-2xx carries a To tag"
    );
    peer.send_to(&cancel_for(&inv).to_bytes(), b.local_addr())
        .await
        .unwrap();
    let got = responses(&peer, Duration::from_millis(300)).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), vec![200]);
    b.shutdown().await;
}

#[tokio::test]
async fn invite_rate_limit_answers_503_statelessly_and_spares_trusted() {
    let cfg = EndpointConfig {
        invite_rate: 1.0,
        invite_burst: 3.0,
        trusted: vec!["127.0.0.1".parse().unwrap()],
        ..cfg(2000)
    };
    let (b, mut brx) = Endpoint::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let flooder = UdpSocket::bind("127.0.0.6:0").await.unwrap();
    let fme = flooder.local_addr().unwrap();
    for i in 0..10 {
        let inv = raw_invite(&format!("z9hG4bKflood{i}"), fme, b"");
        flooder
            .send_to(&inv.to_bytes(), b.local_addr())
            .await
            .unwrap();
    }
    let got = responses(&flooder, Duration::from_millis(300)).await;
    let refused: Vec<&Response> = got.iter().filter(|r| r.status == 503).collect();
    assert_eq!(refused.len(), 7, "{got:?}");
    for r in &refused {
        assert!(r.headers.get("Retry-After").is_some());
        assert!(r.headers.to().unwrap().tag().is_some());
    }
    let mut delivered = 0;
    while let Ok(Some(_)) = timeout(Duration::from_millis(100), brx.recv()).await {
        delivered += 1;
    }
    assert_eq!(delivered, 3, "the burst gets through");
    // The ACK for a stateless 503 is absorbed, not delivered.
    let mut ack = Request::new(Method::Ack, "sip:relay@x");
    ack.headers
        .push("Via", format!("SIP/2.0/UDP {fme};branch=z9hG4bKflood9"));
    for name in ["From", "Call-ID"] {
        ack.headers
            .push(name, refused[0].headers.get(name).unwrap());
    }
    ack.headers
        .push("To", refused[0].headers.get("To").unwrap());
    ack.headers.push("CSeq", "1 ACK");
    flooder
        .send_to(&ack.to_bytes(), b.local_addr())
        .await
        .unwrap();
    assert!(
        timeout(Duration::from_millis(200), brx.recv())
            .await
            .is_err()
    );
    // A trusted address is never limited over TCP, where the handshake proves it.
    let mut tcp = TcpStream::connect(b.local_addr()).await.unwrap();
    let me = tcp.local_addr().unwrap();
    for i in 0..10 {
        let mut inv = invite(me, b"");
        inv.headers.prepend(
            "Via",
            format!("SIP/2.0/TCP {me};branch=z9hG4bKtrustedtcp{i}"),
        );
        inv.headers.push("Max-Forwards", "70");
        tcp.write_all(&inv.to_bytes()).await.unwrap();
    }
    let mut delivered = 0;
    while let Ok(Some(_)) = timeout(Duration::from_millis(200), brx.recv()).await {
        delivered += 1;
    }
    assert_eq!(delivered, 10);
    // Over UDP anyone can send from its address (issue 11): limited like anyone.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    for i in 0..10 {
        let inv = raw_invite(&format!("z9hG4bKtrusted{i}"), me, b"");
        peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    }
    let mut delivered = 0;
    while let Ok(Some(_)) = timeout(Duration::from_millis(200), brx.recv()).await {
        delivered += 1;
    }
    assert_eq!(delivered, 3, "the burst, no exemption over UDP");
    b.shutdown().await;
}

/// New requests may fill the incoming queue only up to `incoming_queue`; in-dialog requests
/// (a BYE ending a call) have room beyond it. When many calls end at once, or new INVITEs
/// have filled the queue, a hang-up is still delivered, not answered 503.
#[tokio::test]
async fn in_dialog_requests_are_delivered_when_new_requests_filled_the_queue() {
    let cfg = EndpointConfig {
        incoming_queue: 3,
        ..cfg(2000)
    };
    let (b, mut brx) = Endpoint::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = peer.local_addr().unwrap();
    // Nobody reads the queue yet: 3 new INVITEs fill it, the 4th and 5th get 503.
    for i in 0..5 {
        let inv = raw_invite(&format!("z9hG4bKfill{i}"), me, b"");
        peer.send_to(&inv.to_bytes(), b.local_addr()).await.unwrap();
    }
    let got = responses(&peer, Duration::from_millis(300)).await;
    assert_eq!(got.iter().filter(|r| r.status == 503).count(), 2, "{got:?}");
    // 20 BYEs of established dialogs (To tag) at once: all delivered, none refused.
    for i in 0..20 {
        let mut bye = Request::new(Method::Bye, format!("sip:relay@{}", b.local_addr()));
        bye.headers.push(
            "Via",
            format!("SIP/2.0/UDP {me};branch=z9hG4bKbye{i};rport"),
        );
        bye.headers.push("Max-Forwards", "70");
        bye.headers.push("From", "<sip:relay@site-a>;tag=a1");
        bye.headers
            .push("To", format!("<sip:relay@site-b>;tag=b{i}"));
        bye.headers.push("Call-ID", format!("call{i}@site-a"));
        bye.headers.push("CSeq", "2 BYE");
        peer.send_to(&bye.to_bytes(), b.local_addr()).await.unwrap();
    }
    let got = responses(&peer, Duration::from_millis(300)).await;
    assert!(got.iter().all(|r| r.status != 503), "BYE refused: {got:?}");
    let mut byes = 0;
    let mut invites = 0;
    while let Ok(Some(i)) = timeout(Duration::from_millis(100), brx.recv()).await {
        match i.request.method {
            Method::Bye => byes += 1,
            Method::Invite => invites += 1,
            _ => {}
        }
    }
    assert_eq!((invites, byes), (3, 20));
    b.shutdown().await;
}

/// Behind a NAT (`sip.advertise`) our Via names the advertised address, not the bound one;
/// the answer still comes back, on the path the request came in on (the NAT's mapping).
#[tokio::test]
async fn an_advertised_sent_by_goes_into_the_via_and_answers_still_arrive() {
    let advertised: SocketAddr = "203.0.113.5:5999".parse().unwrap();
    let (a, _arx) = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        EndpointConfig {
            sent_by: Some(advertised),
            ..cfg(50)
        },
    )
    .await
    .unwrap();
    let (b, mut brx) = endpoint(50).await;
    let server = tokio::spawn(async move {
        let inc = brx.recv().await.unwrap();
        let via = inc.request.headers.top_via().unwrap();
        inc.respond(Response::for_request(&inc.request, 200, "OK"))
            .await
            .unwrap();
        via
    });
    let mut r = invite(b.local_addr(), b"");
    r.method = Method::Options;
    r.headers.set("CSeq", "1 OPTIONS");
    let resp = timeout(
        Duration::from_secs(5),
        a.request(r, b.local_addr(), Transport::Udp),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status, 200);
    let via = server.await.unwrap();
    assert_eq!(
        (via.host.as_str(), via.port),
        ("203.0.113.5", Some(5999)),
        "{via:?}"
    );
}
