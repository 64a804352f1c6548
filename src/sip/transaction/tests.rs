//! Virtual-time tests of the transaction core: no sockets, no sleeps. The path type is a
//! `&'static str` naming where the request came in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::sip::message::{SipMessage, parse_datagram};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const T4: Duration = Duration::from_secs(5);
/// A wire size that earns a UDP source reply budget for every retransmission.
const BIG: usize = 100_000;
/// Plenty of room in the TU's queue.
const ROOM: usize = IN_DIALOG_RESERVE + 100;

fn config() -> Config {
    Config {
        t1: T1,
        t2: T2,
        t4: T4,
        proceeding_timeout: Duration::from_secs(180),
        max_transactions: 4096,
        max_message: 65_535,
        retry_after: 5,
        invite_rate: 0.0,
        invite_burst: 40.0,
        trusted: Vec::new(),
    }
}

fn peer() -> SocketAddr {
    "192.0.2.7:5060".parse().unwrap()
}

fn me() -> SocketAddr {
    "192.0.2.1:5060".parse().unwrap()
}

type Core = Transactions<&'static str>;

fn core(t0: Instant) -> Core {
    Transactions::new(config(), t0)
}

fn request(method: Method, branch: &str, call: &str, to_tag: Option<&str>) -> Request {
    let mut r = Request::new(method.clone(), "sip:relay@site-b");
    r.headers
        .push("Via", format!("SIP/2.0/UDP {};branch={branch}", peer()));
    r.headers.push("Max-Forwards", "70");
    r.headers.push("From", "<sip:relay@site-a>;tag=a1");
    match to_tag {
        Some(t) => r.headers.push("To", format!("<sip:relay@site-b>;tag={t}")),
        None => r.headers.push("To", "<sip:relay@site-b>"),
    }
    r.headers.push("Call-ID", format!("{call}@site-a"));
    let seq = if method == Method::Bye { 2 } else { 1 };
    r.headers.push("CSeq", format!("{seq} {method}"));
    r
}

fn invite(branch: &str, call: &str) -> Request {
    request(Method::Invite, branch, call, None)
}

/// Feeds a UDP request from `peer()` on path "udp".
fn recv(c: &mut Core, req: &Request, now: Instant) -> Vec<Action<&'static str>> {
    recv_on(c, req, Transport::Udp, ROOM, now)
}

fn recv_on(
    c: &mut Core,
    req: &Request,
    transport: Transport,
    free: usize,
    now: Instant,
) -> Vec<Action<&'static str>> {
    let path = match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    };
    c.received_request(req.clone(), peer(), transport, path, BIG, free, now)
}

fn delivered(actions: &[Action<&'static str>]) -> Vec<Delivery<&'static str>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// The responses transmitted, parsed.
fn sent(actions: &[Action<&'static str>]) -> Vec<Response> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Transmit(t) => match parse_datagram(&t.bytes) {
                Ok(SipMessage::Response(r)) => Some(r),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn statuses(actions: &[Action<&'static str>]) -> Vec<u16> {
    sent(actions).iter().map(|r| r.status).collect()
}

/// The one new transaction's key, from its delivery.
fn deliver_one(c: &mut Core, req: &Request, now: Instant) -> ServerKey {
    let d = delivered(&recv(c, req, now));
    assert_eq!(d.len(), 1, "delivered once");
    d[0].key.clone()
}

fn respond(c: &mut Core, key: &str, req: &Request, status: u16, now: Instant) -> Response {
    let reason = if status < 300 { "OK" } else { "Busy Here" };
    let t = c
        .send_response(key, "udp", Response::for_request(req, status, reason), now)
        .expect("response accepted");
    assert_eq!(t.to, Dest::Path("udp"));
    match parse_datagram(&t.bytes).unwrap() {
        SipMessage::Response(r) => r,
        _ => panic!("not a response"),
    }
}

/// Runs the core's timers from `from` to `until` and returns when (relative to `t0`, in
/// ms) it transmitted something, and everything it did.
fn run(
    c: &mut Core,
    t0: Instant,
    from: Instant,
    until: Instant,
) -> (Vec<u128>, Vec<Action<&'static str>>) {
    let mut now = from;
    let mut at = Vec::new();
    let mut all = Vec::new();
    loop {
        let actions = c.timeout(now);
        for a in &actions {
            if matches!(a, Action::Transmit(_) | Action::Retransmit { .. }) {
                at.push((now - t0).as_millis());
            }
        }
        all.extend(actions);
        let next = c.next_deadline();
        if next > until {
            return (at, all);
        }
        now = next.max(now);
    }
}

fn ack_for(inv: &Request, resp: &Response, branch: &str) -> Request {
    let mut a = Request::new(Method::Ack, inv.uri.clone());
    a.headers
        .push("Via", format!("SIP/2.0/UDP {};branch={branch}", peer()));
    a.headers.push("From", inv.headers.get("From").unwrap());
    a.headers.push("To", resp.headers.get("To").unwrap());
    a.headers
        .push("Call-ID", inv.headers.get("Call-ID").unwrap());
    a.headers.push("CSeq", "1 ACK");
    a
}

// ---------------------------------------------------------------------------
// INVITE server transaction

#[test]
fn invite_2xx_is_retransmitted_until_the_ack_which_is_delivered() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv1", "c1");
    let key = deliver_one(&mut c, &inv, t0);
    let ringing = respond(&mut c, &key, &inv, 180, t0);
    let tag = ringing.headers.to().unwrap().tag().unwrap().to_string();
    let ok = respond(&mut c, &key, &inv, 200, t0);
    assert_eq!(
        ok.headers.to().unwrap().tag(),
        Some(tag.as_str()),
        "one To tag"
    );
    // Timer G: T1, 2T1, 4T1, then capped at T2.
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_millis(12_000));
    assert_eq!(at, vec![500, 1500, 3500, 7500, 11500]);
    // The ACK (its own branch) ends the retransmission and goes to the TU.
    let now = t0 + Duration::from_millis(12_000);
    let ack = ack_for(&inv, &ok, "z9hG4bKack1");
    let d = delivered(&recv(&mut c, &ack, now));
    assert_eq!(d.len(), 1);
    assert!(d[0].is_ack && d[0].in_dialog);
    let (at, _) = run(&mut c, t0, now, t0 + Duration::from_secs(40));
    assert!(at.is_empty(), "retransmitted after the ACK: {at:?}");
    // A retransmitted ACK is absorbed.
    assert!(recv(&mut c, &ack, now).is_empty());
}

/// Once the ACK for our 2xx is in, the INVITE transaction does not hold a place in the
/// table for Timer L's 32 s: a stray copy of the INVITE within T4 is absorbed (not a new
/// call, not a resent 200), and then the transaction is gone. Without an ACK it stays
/// (the 2xx is retransmitted until Timer H).
#[test]
fn the_ack_for_a_2xx_ends_the_invite_transaction_after_t4() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinvL", "cL");
    let key = deliver_one(&mut c, &inv, t0);
    let ok = respond(&mut c, &key, &inv, 200, t0);
    let now = t0 + Duration::from_millis(600);
    let ack = ack_for(&inv, &ok, "z9hG4bKackL");
    assert_eq!(delivered(&recv(&mut c, &ack, now)).len(), 1);
    assert!(
        recv(&mut c, &inv, now + Duration::from_secs(1)).is_empty(),
        "a copy of the INVITE after the ACK is absorbed"
    );
    assert_eq!(c.server_count(), 1);
    run(&mut c, t0, now, now + T4 + Duration::from_secs(2));
    assert_eq!(c.server_count(), 0, "the ACKed INVITE still holds a place");

    // No ACK: the transaction stays while the 2xx is retransmitted.
    let inv2 = invite("z9hG4bKinvM", "cM");
    let key2 = deliver_one(&mut c, &inv2, now);
    respond(&mut c, &key2, &inv2, 200, now);
    run(&mut c, t0, now, now + T4 + Duration::from_secs(2));
    assert_eq!(c.server_count(), 1, "an unACKed 2xx ended before Timer H");
}

#[test]
fn invite_non2xx_timer_g_then_ack_absorbed_and_timer_i() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv2", "c2");
    let key = deliver_one(&mut c, &inv, t0);
    let busy = respond(&mut c, &key, &inv, 486, t0);
    let (at, all) = run(&mut c, t0, t0, t0 + Duration::from_millis(4_000));
    assert_eq!(at, vec![500, 1500, 3500]);
    assert!(
        all.iter().all(|a| matches!(
            a,
            Action::Transmit(Transmit { to: Dest::Addr(addr, Transport::Udp), .. }) if *addr == peer()
        )),
        "retransmitted to the source over UDP"
    );
    assert_eq!(statuses(&all), vec![486; 3]);
    // The ACK for a non-2xx has the INVITE's branch: absorbed, not delivered.
    let now = t0 + Duration::from_millis(4_000);
    let ack = ack_for(&inv, &busy, "z9hG4bKinv2");
    assert!(recv(&mut c, &ack, now).is_empty());
    let (at, _) = run(&mut c, t0, now, now + T4 - Duration::from_millis(100));
    assert!(at.is_empty(), "Timer G stopped by the ACK");
    // Timer I: more ACKs absorbed for T4, then the transaction is gone.
    assert!(recv(&mut c, &ack, now + Duration::from_secs(1)).is_empty());
    assert_eq!(c.server_count(), 1);
    run(&mut c, t0, now, now + T4 + Duration::from_secs(2));
    assert_eq!(c.server_count(), 0, "Timer I ended it");
}

#[test]
fn timer_h_gives_up_without_ack() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv3", "c3");
    let key = deliver_one(&mut c, &inv, t0);
    respond(&mut c, &key, &inv, 603, t0);
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(60));
    assert_eq!(&at[..6], &[500, 1500, 3500, 7500, 11500, 15500]);
    assert_eq!(*at.last().unwrap(), 31500, "nothing at or after 64*T1");
    // Timer H also ended the transaction: the INVITE is new again.
    let again = delivered(&recv(&mut c, &inv, t0 + Duration::from_secs(60)));
    assert_eq!(again.len(), 1);
}

#[test]
fn spent_reply_budget_stops_timer_g() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKbudget", "cb");
    let len = inv.to_bytes().len();
    let d = c.received_request(inv.clone(), peer(), Transport::Udp, "udp", len, ROOM, t0);
    let key = delivered(&d)[0].key.clone();
    let busy = respond(&mut c, &key, &inv, 486, t0);
    // Three times the request's size, the first copy included.
    let copies = len * crate::sip::limits::REPLY_FACTOR / busy.to_bytes().len();
    assert!((2..6).contains(&copies), "{copies}");
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(40));
    assert_eq!(at, [500, 1500, 3500, 7500, 11500][..copies - 1]);
}

#[test]
fn final_response_over_tcp_is_not_retransmitted() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv4", "c4");
    let d = delivered(&recv_on(&mut c, &inv, Transport::Tcp, ROOM, t0));
    let key = d[0].key.clone();
    c.send_response(
        &key,
        "tcp",
        Response::for_request(&inv, 486, "Busy Here"),
        t0,
    )
    .unwrap();
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(40));
    assert!(at.is_empty());
}

#[test]
fn retransmitted_invite_is_absorbed_then_gets_the_last_response() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv5", "c5");
    let key = deliver_one(&mut c, &inv, t0);
    assert!(
        recv(&mut c, &inv, t0).is_empty(),
        "nothing sent yet: absorbed"
    );
    respond(&mut c, &key, &inv, 180, t0);
    let again = recv(&mut c, &inv, t0 + T1);
    assert_eq!(statuses(&again), vec![180]);
    assert!(delivered(&again).is_empty(), "delivered once");
    let ok = respond(&mut c, &key, &inv, 200, t0 + T1);
    assert_eq!(statuses(&recv(&mut c, &inv, t0 + T1)), vec![200]);
    // A second final response is refused.
    let err = c
        .send_response(&key, "udp", Response::for_request(&inv, 500, "Oops"), t0)
        .unwrap_err();
    assert!(matches!(err, TxnError::AlreadyResponded), "{err}");
    assert!(ok.is_success());
}

#[test]
fn ended_transaction_sends_nothing_more() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv6", "c6");
    let key = deliver_one(&mut c, &inv, t0);
    respond(&mut c, &key, &inv, 200, t0);
    c.end(&key);
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(40));
    assert!(at.is_empty(), "Timer G stopped");
    let mut c = core(t0);
    let key = deliver_one(&mut c, &inv, t0);
    c.end(&key);
    assert!(recv(&mut c, &inv, t0).is_empty(), "retransmission absorbed");
    let err = c
        .send_response(&key, "udp", Response::for_request(&inv, 200, "OK"), t0)
        .unwrap_err();
    assert!(matches!(err, TxnError::Ended));
}

// ---------------------------------------------------------------------------
// Non-INVITE server transaction

#[test]
fn non_invite_replays_its_response_until_timer_j() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let bye = request(Method::Bye, "z9hG4bKbye1", "c7", Some("b1"));
    let key = deliver_one(&mut c, &bye, t0);
    respond(&mut c, &key, &bye, 200, t0);
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(10));
    assert!(at.is_empty(), "no Timer G for non-INVITE");
    let replay = recv(&mut c, &bye, t0 + Duration::from_secs(10));
    assert_eq!(statuses(&replay), vec![200]);
    assert!(delivered(&replay).is_empty());
    // Timer J (64*T1 over UDP): then the transaction is gone.
    run(&mut c, t0, t0, t0 + T1 * 64 + Duration::from_secs(1));
    assert_eq!(c.server_count(), 0);
    let late = recv(&mut c, &bye, t0 + T1 * 65);
    assert_eq!(delivered(&late).len(), 1, "a new transaction");
}

#[test]
fn non_invite_over_tcp_ends_at_its_final_response() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let opt = request(Method::Options, "z9hG4bKopt1", "c8", None);
    let d = delivered(&recv_on(&mut c, &opt, Transport::Tcp, ROOM, t0));
    c.send_response(&d[0].key, "tcp", Response::for_request(&opt, 200, "OK"), t0)
        .unwrap();
    run(&mut c, t0, t0, t0 + Duration::from_secs(1));
    assert_eq!(c.server_count(), 0);
}

// ---------------------------------------------------------------------------
// CANCEL

fn cancel_for(inv: &Request) -> Request {
    let mut c = inv.clone();
    c.method = Method::Cancel;
    c.headers.set("CSeq", "1 CANCEL");
    c
}

#[test]
fn cancel_answers_200_and_the_invite_487() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv9", "c9");
    let key = deliver_one(&mut c, &inv, t0);
    let ringing = respond(&mut c, &key, &inv, 180, t0);
    let actions = recv(&mut c, &cancel_for(&inv), t0 + T1);
    assert!(delivered(&actions).is_empty(), "CANCEL is handled here");
    let got = sent(&actions);
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 487]
    );
    assert_eq!(got[0].headers.cseq().unwrap().method, Method::Cancel);
    assert_eq!(got[1].headers.cseq().unwrap().method, Method::Invite);
    let tag = ringing.headers.to().unwrap().tag().map(str::to_string);
    assert_eq!(got[1].headers.to().unwrap().tag().map(str::to_string), tag);
    // The TU's answer comes too late.
    let err = c
        .send_response(&key, "udp", Response::for_request(&inv, 200, "OK"), t0 + T1)
        .unwrap_err();
    assert!(matches!(err, TxnError::AlreadyResponded));
    // The 487 is retransmitted (Timer G) until its ACK.
    let (at, _) = run(&mut c, t0, t0 + T1, t0 + T1 * 4);
    assert_eq!(at, vec![1000, 2000]);
}

#[test]
fn cancel_after_the_answer_or_for_nothing() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKinv10", "c10");
    let key = deliver_one(&mut c, &inv, t0);
    respond(&mut c, &key, &inv, 200, t0);
    assert_eq!(statuses(&recv(&mut c, &cancel_for(&inv), t0)), vec![200]);
    let stranger = invite("z9hG4bKnobody", "c11");
    assert_eq!(
        statuses(&recv(&mut c, &cancel_for(&stranger), t0)),
        vec![481]
    );
}

// ---------------------------------------------------------------------------
// Overload: 503 and the in-dialog reserve

fn assert_stateless_503(r: &Response, warning: &str) {
    assert_eq!(r.status, 503);
    assert_eq!(r.headers.get("Retry-After"), Some("5"));
    assert_eq!(r.headers.get("Warning"), Some(warning));
    let to = r.headers.to().unwrap();
    assert!(to.tag().unwrap().starts_with(STATELESS_TAG));
}

#[test]
fn full_table_answers_503_and_its_ack_is_absorbed() {
    let t0 = Instant::now();
    let mut c = Transactions::new(
        Config {
            max_transactions: 2,
            ..config()
        },
        t0,
    );
    deliver_one(&mut c, &invite("z9hG4bKa", "d1"), t0);
    deliver_one(&mut c, &invite("z9hG4bKb", "d2"), t0);
    let third = invite("z9hG4bKc", "d3");
    let got = sent(&recv(&mut c, &third, t0));
    assert_eq!(got.len(), 1);
    assert_stateless_503(&got[0], "399 sipmail \"too many transactions\"");
    assert_eq!(c.server_count(), 2, "no state for the refused request");
    let ack = ack_for(&third, &got[0], "z9hG4bKc");
    assert!(
        recv(&mut c, &ack, t0).is_empty(),
        "ACK of a stateless 503 absorbed"
    );
}

#[test]
fn invite_rate_limit_answers_503_with_retry_after() {
    let t0 = Instant::now();
    let mut c = Transactions::new(
        Config {
            invite_rate: 1.0,
            invite_burst: 2.0,
            ..config()
        },
        t0,
    );
    deliver_one(&mut c, &invite("z9hG4bKr1", "r1"), t0);
    deliver_one(&mut c, &invite("z9hG4bKr2", "r2"), t0);
    let got = sent(&recv(&mut c, &invite("z9hG4bKr3", "r3"), t0));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, 503);
    assert!(got[0].headers.get("Retry-After").is_some());
    assert_eq!(
        got[0].headers.get("Warning"),
        Some("399 sipmail \"INVITE rate limit\"")
    );
    // In-dialog requests are not rate-limited; a second later a token is back.
    deliver_one(
        &mut c,
        &request(Method::Bye, "z9hG4bKr4", "r1", Some("x")),
        t0,
    );
    deliver_one(
        &mut c,
        &invite("z9hG4bKr5", "r5"),
        t0 + Duration::from_secs(1),
    );
}

#[test]
fn full_queue_answers_503_overloaded_and_forgets_the_transaction() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = invite("z9hG4bKq1", "q1");
    let got = sent(&recv_on(&mut c, &inv, Transport::Udp, 0, t0));
    assert_eq!(got.len(), 1);
    assert_stateless_503(&got[0], "399 sipmail \"overloaded\"");
    assert_eq!(c.server_count(), 0);
    // The driver's own refusal (the queue filled meanwhile) does the same.
    let d = delivered(&recv(&mut c, &inv, t0));
    let again = c.undeliverable(&d[0].key, &d[0].request, peer(), false, "udp");
    assert_stateless_503(&sent(&again)[0], "399 sipmail \"overloaded\"");
    assert_eq!(c.server_count(), 0);
}

#[test]
fn in_dialog_requests_may_use_the_reserve() {
    assert!(admits(false, IN_DIALOG_RESERVE + 1));
    assert!(!admits(false, IN_DIALOG_RESERVE));
    assert!(admits(true, 1));
    assert!(!admits(true, 0));
    let t0 = Instant::now();
    let mut c = core(t0);
    // Only the reserve is left: a new INVITE is refused, a BYE of a dialog gets in.
    let inv = invite("z9hG4bKres1", "res1");
    let refused = recv_on(&mut c, &inv, Transport::Udp, IN_DIALOG_RESERVE, t0);
    assert_eq!(statuses(&refused), vec![503]);
    let bye = request(Method::Bye, "z9hG4bKres2", "res2", Some("b2"));
    let d = delivered(&recv_on(
        &mut c,
        &bye,
        Transport::Udp,
        IN_DIALOG_RESERVE,
        t0,
    ));
    assert_eq!(d.len(), 1);
    assert!(d[0].in_dialog);
    let ack = request(Method::Ack, "z9hG4bKres3", "res3", Some("b3"));
    let d = delivered(&recv_on(&mut c, &ack, Transport::Udp, 1, t0));
    assert_eq!(d.len(), 1, "an ACK of a 2xx is delivered from the reserve");
    // The reserve exhausted: even a BYE is refused.
    let bye = request(Method::Bye, "z9hG4bKres4", "res4", Some("b4"));
    assert_eq!(
        statuses(&recv_on(&mut c, &bye, Transport::Udp, 0, t0)),
        vec![503]
    );
}

// ---------------------------------------------------------------------------
// Client transactions

fn client_request(method: Method, branch: &str) -> Request {
    let mut r = Request::new(method.clone(), "sip:relay@site-b");
    r.headers
        .push("Via", format!("SIP/2.0/UDP {};branch={branch};rport", me()));
    r.headers.push("From", "<sip:relay@site-a>;tag=a9");
    r.headers.push("To", "<sip:relay@site-b>");
    r.headers.push("Call-ID", format!("{branch}@site-a"));
    r.headers.push("CSeq", format!("1 {method}"));
    r
}

fn start(c: &mut Core, req: &Request, transport: Transport, now: Instant) -> ClientKey {
    let branch = req.headers.top_via().unwrap().branch.unwrap();
    let key = (branch, req.method.to_string());
    c.start_client(key.clone(), req, req.to_bytes(), peer(), transport, now)
        .unwrap();
    key
}

fn answer(req: &Request, status: u16) -> Response {
    Response::for_request(req, status, "X").with_to_tag("far")
}

fn done(actions: &[Action<&'static str>]) -> Vec<ClientOutcome> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ClientDone { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn invite_client_timer_a_and_b() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = client_request(Method::Invite, "z9hG4bKca");
    start(&mut c, &inv, Transport::Udp, t0);
    let (at, all) = run(&mut c, t0, t0, t0 + T1 * 64);
    assert_eq!(at, vec![500, 1500, 3500, 7500, 15500, 31500]);
    assert_eq!(
        done(&all),
        vec![ClientOutcome::TimedOut],
        "Timer B at 64*T1"
    );
    assert_eq!(c.client_count(), 0);
}

#[test]
fn invite_client_provisional_stops_retransmission() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = client_request(Method::Invite, "z9hG4bKcb");
    start(&mut c, &inv, Transport::Udp, t0);
    let now = t0 + Duration::from_millis(600);
    run(&mut c, t0, t0, now);
    assert!(
        c.received_response(answer(&inv, 180), peer(), now)
            .is_empty()
    );
    let (at, all) = run(&mut c, t0, now, t0 + Duration::from_secs(100));
    assert!(at.is_empty(), "no retransmission after 180: {at:?}");
    assert!(done(&all).is_empty(), "Timer B no longer applies");
    let (_, all) = run(&mut c, t0, now, now + Duration::from_secs(181));
    assert_eq!(
        done(&all),
        vec![ClientOutcome::TimedOut],
        "the proceeding timeout"
    );
}

#[test]
fn invite_client_acks_a_non2xx_and_again_on_its_retransmission() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = client_request(Method::Invite, "z9hG4bKcc");
    let key = start(&mut c, &inv, Transport::Udp, t0);
    let busy = answer(&inv, 486);
    let out = c.received_response(busy.clone(), peer(), t0);
    let Action::Transmit(Transmit { to, bytes }) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(*to, Dest::Addr(peer(), Transport::Udp));
    let Ok(SipMessage::Request(ack)) = parse_datagram(bytes) else {
        panic!()
    };
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(
        ack.headers.top_via().unwrap().branch,
        inv.headers.top_via().unwrap().branch
    );
    assert_eq!(ack.headers.to().unwrap().tag(), Some("far"));
    assert!(
        matches!(&out[1], Action::ClientDone { key: k, outcome: ClientOutcome::Final(r) } if *k == key && r.status == 486)
    );
    let again = c.received_response(busy, peer(), t0 + T1);
    assert!(matches!(&again[..], [Action::Transmit(t)] if t.bytes == *bytes));
    let (at, _) = run(&mut c, t0, t0, t0 + Duration::from_secs(40));
    assert!(at.is_empty(), "the transaction is over");
}

#[test]
fn invite_client_2xx_is_left_to_the_caller() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let inv = client_request(Method::Invite, "z9hG4bKcd");
    start(&mut c, &inv, Transport::Udp, t0);
    let out = c.received_response(answer(&inv, 200), peer(), t0);
    assert!(
        matches!(&out[..], [Action::ClientDone { outcome: ClientOutcome::Final(r), .. }] if r.status == 200)
    );
    // The caller's ACK, remembered, answers a retransmitted 2xx.
    let ack = client_request(Method::Ack, "z9hG4bKce");
    let mut ack = ack;
    ack.headers.set("Call-ID", "z9hG4bKcd@site-a");
    c.remember_ack(&ack, ack.to_bytes(), peer(), Transport::Udp, t0);
    let again = c.received_response(answer(&inv, 200), peer(), t0 + T1);
    assert!(matches!(&again[..], [Action::Transmit(t)] if t.bytes == ack.to_bytes()));
}

#[test]
fn non_invite_client_timer_e_and_f() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let opt = client_request(Method::Options, "z9hG4bKcf");
    start(&mut c, &opt, Transport::Udp, t0);
    let (at, all) = run(&mut c, t0, t0, t0 + T1 * 64);
    assert_eq!(&at[..6], &[500, 1500, 3500, 7500, 11500, 15500]);
    assert_eq!(*at.last().unwrap(), 31500);
    assert_eq!(done(&all), vec![ClientOutcome::TimedOut], "Timer F");
}

#[test]
fn non_invite_client_provisional_retransmits_every_t2() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let opt = client_request(Method::Options, "z9hG4bKcg");
    start(&mut c, &opt, Transport::Udp, t0);
    let now = t0 + Duration::from_millis(600);
    run(&mut c, t0, t0, now);
    c.received_response(answer(&opt, 100), peer(), now);
    let (at, all) = run(&mut c, t0, now, t0 + Duration::from_millis(13_000));
    assert_eq!(at, vec![4600, 8600, 12600]);
    assert!(done(&all).is_empty());
    let out = c.received_response(answer(&opt, 200), peer(), t0 + Duration::from_secs(13));
    assert!(matches!(
        &out[..],
        [Action::ClientDone {
            outcome: ClientOutcome::Final(_),
            ..
        }]
    ));
}

#[test]
fn tcp_client_is_not_retransmitted_but_times_out() {
    let t0 = Instant::now();
    let mut c = core(t0);
    let opt = client_request(Method::Options, "z9hG4bKch");
    start(&mut c, &opt, Transport::Tcp, t0);
    let (at, all) = run(&mut c, t0, t0, t0 + T1 * 64);
    assert!(at.is_empty());
    assert_eq!(done(&all), vec![ClientOutcome::TimedOut]);
}

#[test]
fn client_table_is_bounded() {
    let t0 = Instant::now();
    let mut c = Transactions::<&'static str>::new(
        Config {
            max_transactions: 1,
            ..config()
        },
        t0,
    );
    start(
        &mut c,
        &client_request(Method::Options, "z9hG4bKci"),
        Transport::Udp,
        t0,
    );
    let second = client_request(Method::Options, "z9hG4bKcj");
    let err = c
        .start_client(
            ("b".into(), "OPTIONS".into()),
            &second,
            Vec::new(),
            peer(),
            Transport::Udp,
            t0,
        )
        .unwrap_err();
    assert!(matches!(err, TxnError::TooManyTransactions));
}
