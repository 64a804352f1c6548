//! One test per refusal, and the admitted cases: pure, from hand-made INVITEs and a table
//! for the keyring and the trust state.

use super::*;
use crate::config::{Psk, SipTarget, Trust};
use crate::handshake::Suite;
use crate::sip::Method;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

const US: &str = "b.test";
const PEER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const FPR: &str = "0123456789ABCDEF0123456789ABCDEF01234567";

fn peer(domain: &str, trust: Trust, continuity: ContinuityPolicy) -> Peer {
    Peer {
        domain: domain.into(),
        sip: vec![SipTarget {
            user: "mail".into(),
            host: "192.0.2.1".into(),
            port: 5060,
            tcp: false,
        }],
        trust,
        continuity,
        fingerprints: None,
        senders: Vec::new(),
        dns: false,
        inbox: None,
        outbox: None,
    }
}

fn peers() -> Vec<Peer> {
    let psk = Psk::generate().expect("randomness").0;
    vec![
        peer("a.test", Trust::Signed, ContinuityPolicy::Warn),
        peer("o.test", Trust::Opportunistic, ContinuityPolicy::Warn),
        peer("p.test", Trust::Psk(psk), ContinuityPolicy::Require),
    ]
}

/// The keyring and trust state, as a table.
#[derive(Default)]
struct Table {
    /// (domain, fingerprint) of the usable certs.
    certs: Vec<(String, String)>,
    pins: HashMap<String, String>,
    broken_state: bool,
}

impl TrustView for Table {
    fn signed_key(&self, domain: &str, fingerprint: &str) -> Result<(), String> {
        if self
            .certs
            .iter()
            .any(|(d, f)| d == domain && f == fingerprint)
        {
            Ok(())
        } else {
            Err(format!("no cert {fingerprint} for {domain}"))
        }
    }
    fn pin(&self, domain: &str, fingerprint: &str) -> Result<PinCheck, String> {
        if self.broken_state {
            return Err("state/o.test.pin: corrupt".into());
        }
        Ok(match self.pins.get(domain) {
            None => PinCheck::FirstUse,
            Some(p) if p == fingerprint => PinCheck::Same,
            Some(p) => PinCheck::Changed { pinned: p.clone() },
        })
    }
    fn is_peer_address(&self, domain: &str, ip: IpAddr) -> bool {
        domain == "o.test" && ip == PEER_IP
    }
}

fn table() -> Table {
    Table {
        certs: vec![("a.test".into(), FPR.into())],
        ..Table::default()
    }
}

/// A public key packet that can sign, made in memory, and its fingerprint.
fn key_packet() -> (Vec<u8>, String) {
    use sequoia_openpgp::cert::CertBuilder;
    use sequoia_openpgp::packet::Packet;
    use sequoia_openpgp::serialize::SerializeInto;
    let (cert, _) = CertBuilder::new().generate().expect("a key");
    let packet = Packet::PublicKey(cert.primary_key().key().clone())
        .to_vec()
        .expect("serialise");
    let fpr = crate::keyring::key_packet_fingerprint(&packet).expect("fingerprint");
    (packet, fpr)
}

fn offer(auth: AuthMode, fingerprint: &str, key_packet: Vec<u8>) -> Offer {
    Offer {
        suites: vec![Suite::ChaCha20Poly1305],
        fingerprint: hex::decode(fingerprint).expect("hex"),
        nonce: [1; 32],
        commitment: [2; 32],
        auth,
        rs_ids: Vec::new(),
        key_packet,
    }
}

fn invite(from: &str, to: &str, body: Vec<u8>) -> Request {
    let mut r = Request::new(Method::Invite, "sip:mail@b.test");
    r.headers.push("From", from);
    r.headers.push("To", to);
    r.headers.push("Call-ID", "c1");
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Content-Type", "application/sdp");
    r.body = body;
    r
}

fn signed_invite() -> Request {
    let body = sdp::encode_offer(&offer(AuthMode::Signed, FPR, Vec::new()), 1, PEER_IP);
    invite("<sip:mail@a.test>;tag=t1", "<sip:mail@b.test>", body)
}

fn run(req: &Request, source: IpAddr, view: &Table) -> Result<Admitted, Refusal> {
    let peers = peers();
    let local = Local {
        domain: US,
        peers: &peers,
    };
    admit(&InviteFacts::of(req, source), local, view)
}

fn refused(req: &Request) -> Refusal {
    run(req, PEER_IP, &table()).expect_err("refused")
}

fn assert_refusal(r: &Refusal, status: u16, reason: &str, warning: &str) {
    assert_eq!(
        (r.status, r.reason, r.warning.as_str()),
        (status, reason, warning),
        "{r:?}"
    );
}

#[test]
fn a_signed_call_from_a_known_key_is_admitted() {
    let a = run(&signed_invite(), PEER_IP, &table()).expect("admitted");
    assert_eq!(a.domain, "a.test");
    assert_eq!(a.peer.domain, "a.test");
    assert_eq!(a.from_tag, "t1");
    assert_eq!(a.fingerprint, FPR);
    assert_eq!(a.offer.auth, AuthMode::Signed);
    assert_eq!(a.hold, None);
}

#[test]
fn a_psk_call_needs_no_lookup() {
    let body = sdp::encode_offer(&offer(AuthMode::Psk, FPR, Vec::new()), 1, PEER_IP);
    let req = invite("<sip:mail@P.TEST>;tag=t1", "<sip:MAIL@b.test:5060>", body);
    let a = run(&req, ELSEWHERE, &Table::default()).expect("admitted");
    assert_eq!(a.domain, "p.test");
    assert_eq!(a.hold, None);
}

#[test]
fn bad_from_is_400() {
    let mut req = signed_invite();
    req.headers.set("From", "no uri here <");
    let r = refused(&req);
    assert_eq!((r.status, r.reason), (400, "Bad Request"));
    assert!(r.log.starts_with("bad From/To: "), "{}", r.log);
    assert_eq!(r.log, format!("bad From/To: {}", r.warning));
    assert_eq!(r.failure, CallFailure::Malformed);
}

#[test]
fn missing_to_is_400() {
    let mut req = signed_invite();
    req.headers.remove("To");
    let r = refused(&req);
    assert_eq!((r.status, r.reason), (400, "Bad Request"));
    assert_eq!(
        r.warning,
        crate::sip::ParseError::MissingHeader("To").to_string()
    );
}

#[test]
fn from_without_a_tag_is_400() {
    let mut req = signed_invite();
    req.headers.set("From", "<sip:mail@a.test>");
    assert_refusal(&refused(&req), 400, "Bad Request", "From has no tag");
}

#[test]
fn no_offer_is_488() {
    let mut req = signed_invite();
    req.body.clear();
    assert_refusal(
        &refused(&req),
        488,
        "Not Acceptable Here",
        "no offer: sipmail needs an application/sdp offer with its key exchange",
    );
}

#[test]
fn a_body_that_is_not_sdp_is_415_with_accept() {
    let mut req = signed_invite();
    req.headers.set("Content-Type", "text/plain");
    let r = refused(&req);
    assert_refusal(
        &r,
        415,
        "Unsupported Media Type",
        "sipmail needs an application/sdp offer",
    );
    assert_eq!(r.accept, Some("application/sdp"));
    assert_eq!(r.log, "body type \"text/plain\"");
}

#[test]
fn sdp_that_is_not_a_sipmail_offer_is_488() {
    let mut req = signed_invite();
    req.body = b"v=0\r\ns=phone\r\nm=audio 4000 RTP/AVP 0\r\n".to_vec();
    assert_refusal(
        &refused(&req),
        488,
        "Not Acceptable Here",
        "not a sipmail offer: missing sipmail-version (not a sipmail offer)",
    );
}

#[test]
fn a_version_2_offer_is_488() {
    let mut req = signed_invite();
    let body = String::from_utf8(req.body.clone()).unwrap();
    req.body = body
        .replace("a=sipmail-version:3", "a=sipmail-version:2")
        .into_bytes();
    assert_refusal(
        &refused(&req),
        488,
        "Not Acceptable Here",
        "not a sipmail offer: unsupported sipmail version 2",
    );
}

#[test]
fn a_call_for_someone_else_is_404() {
    for to in [
        "<sip:mail@c.test>",
        "<sip:postmaster@b.test>",
        "<tel:+15551234>",
    ] {
        let mut req = signed_invite();
        req.headers.set("To", to);
        let r = refused(&req);
        assert_refusal(
            &r,
            404,
            "Not Found",
            "this relay only answers mail@its domain",
        );
    }
}

#[test]
fn a_caller_that_is_not_a_peer_is_403() {
    for from in ["<sip:mail@x.test>;tag=1", "<sip:bob@a.test>;tag=1"] {
        let mut req = signed_invite();
        req.headers.set("From", from);
        let r = refused(&req);
        assert_refusal(&r, 403, "Forbidden", "not a partner of this relay");
        assert!(r.log.ends_with("is not a configured peer"), "{}", r.log);
        assert_eq!(r.failure, CallFailure::Policy);
    }
}

#[test]
fn a_downgraded_trust_policy_is_488() {
    let body = sdp::encode_offer(&offer(AuthMode::Psk, FPR, Vec::new()), 1, PEER_IP);
    let req = invite("<sip:mail@a.test>;tag=t1", "<sip:mail@b.test>", body);
    let r = refused(&req);
    assert_refusal(
        &r,
        488,
        "Not Acceptable Here",
        "trust policy mismatch: the offer uses psk, this relay requires signed for a.test",
    );
    assert_eq!(r.failure, CallFailure::Policy);
}

#[test]
fn a_signed_call_with_an_unknown_key_is_403() {
    let mut view = table();
    view.certs = vec![("o.test".into(), FPR.into())];
    let r = run(&signed_invite(), PEER_IP, &view).expect_err("refused");
    assert_refusal(
        &r,
        403,
        "Forbidden",
        "unknown or unusable key for this peer",
    );
    assert_eq!(r.failure, CallFailure::UnknownKey);
    assert_eq!(
        r.log,
        format!("peer a.test key {FPR}: no cert {FPR} for a.test")
    );
}

fn opportunistic_invite(fingerprint: &str, packet: Vec<u8>) -> Request {
    let body = sdp::encode_offer(
        &offer(AuthMode::Opportunistic, fingerprint, packet),
        1,
        PEER_IP,
    );
    invite("<sip:mail@o.test>;tag=t1", "<sip:mail@b.test>", body)
}

#[test]
fn an_opportunistic_peer_that_does_not_present_its_announced_key_is_403() {
    let (packet, _) = key_packet();
    for packet in [Vec::new(), packet] {
        let r = refused(&opportunistic_invite(FPR, packet));
        assert_refusal(
            &r,
            403,
            "Forbidden",
            "an opportunistic peer must present the key it announces (a=sipmail-pubkey)",
        );
    }
}

#[test]
fn unreadable_trust_state_is_500() {
    let (packet, fpr) = key_packet();
    let view = Table {
        broken_state: true,
        ..table()
    };
    let r = run(&opportunistic_invite(&fpr, packet), PEER_IP, &view).expect_err("refused");
    assert_refusal(&r, 500, "Server Internal Error", "trust state");
    assert_eq!(r.log, "trust state for o.test: state/o.test.pin: corrupt");
}

#[test]
fn opportunistic_keys_are_held_not_refused_until_they_prove_themselves() {
    let (packet, fpr) = key_packet();
    let req = opportunistic_invite(&fpr, packet);
    // First use from the peer's address: go on (pinned once established).
    let a = run(&req, PEER_IP, &table()).expect("admitted");
    assert_eq!((a.fingerprint.as_str(), a.hold), (fpr.as_str(), None));
    // First use from elsewhere: held.
    let a = run(&req, ELSEWHERE, &table()).expect("admitted");
    assert_eq!(a.hold, Some(HoldReason::FirstUseFromElsewhere));
    // The pinned key, from anywhere: go on.
    let mut view = table();
    view.pins.insert("o.test".into(), fpr.clone());
    assert_eq!(run(&req, ELSEWHERE, &view).expect("admitted").hold, None);
    // Another key pinned: held.
    view.pins.insert("o.test".into(), FPR.into());
    assert_eq!(
        run(&req, PEER_IP, &view).expect("admitted").hold,
        Some(HoldReason::Changed { pinned: FPR.into() })
    );
}

#[test]
fn offers_we_cannot_answer_are_488_and_our_failures_500() {
    for e in [
        HandshakeError::NoCommonSuite {
            offered: "x".into(),
        },
        HandshakeError::EmptySuiteList,
        HandshakeError::TooManyRetainedIds,
        HandshakeError::AuthMismatch {
            offered: AuthMode::Psk,
            required: AuthMode::Signed,
        },
    ] {
        let r = answer_refusal(&e);
        assert_refusal(&r, 488, "Not Acceptable Here", &e.to_string());
    }
    let e = HandshakeError::SignFailed("card removed".into());
    let r = answer_refusal(&e);
    assert_refusal(&r, 500, "Server Internal Error", "signing failed");
    assert_eq!(r.log, e.to_string());
    let r = answer_refusal(&HandshakeError::NoPsk);
    assert_refusal(&r, 500, "Server Internal Error", "signing failed");
}

#[test]
fn broken_continuity_is_403_only_under_require() {
    let r = continuity_refusal("p.test", Continuity::Mismatch, ContinuityPolicy::Require)
        .expect("refused");
    assert_refusal(
        &r,
        403,
        "Forbidden",
        "key continuity with mail@p.test is broken (mismatch); refused by policy",
    );
    assert_eq!(r.failure, CallFailure::Continuity);
    let r = continuity_refusal("p.test", Continuity::PeerHasNone, ContinuityPolicy::Require)
        .expect("refused");
    assert_eq!(
        r.warning,
        "key continuity with mail@p.test is broken (peer-has-none); refused by policy"
    );
    assert_eq!(
        continuity_refusal("p.test", Continuity::Mismatch, ContinuityPolicy::Warn),
        None
    );
    for c in [
        Continuity::Matched,
        Continuity::NoneHeld { peer_has: true },
        Continuity::NoneHeld { peer_has: false },
    ] {
        assert_eq!(
            continuity_refusal("p.test", c, ContinuityPolicy::Require),
            None
        );
    }
}

#[test]
fn our_own_failures_and_a_reused_call_id() {
    assert_refusal(
        &Refusal::call_id_in_use(),
        482,
        "Loop Detected",
        "Call-ID already in use",
    );
    let r = Refusal::internal("no media port", "cannot open a media port: busy".into());
    assert_refusal(&r, 500, "Server Internal Error", "no media port");
    assert_eq!(r.log, "cannot open a media port: busy");
}

#[test]
fn held_calls_say_what_the_operator_runs() {
    assert_eq!(
        held_message("o.test", FPR, &HoldReason::Changed { pinned: "X".into() }),
        format!(
            "the key of mail@o.test changed since first use; refused until the operator runs `sipmail trust accept o.test {FPR}`"
        )
    );
    assert!(
        held_message("o.test", FPR, &HoldReason::FirstUseFromElsewhere).starts_with(
            "first call from mail@o.test, from an address that is not its configured one"
        )
    );
}
