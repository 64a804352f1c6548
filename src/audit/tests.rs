//! Unit tests of the audit records: transcript parsing and the checks without a keyring.

use super::*;
use crate::handshake::{Answer, CallContext, Offer, Transcript, commitment};
use std::time::UNIX_EPOCH;

fn transcript() -> Transcript {
    let ctx = CallContext {
        call_id: "c0ffee@site-a.test".into(),
        from_tag: "a1".into(),
        to_tag: "b2".into(),
        caller: "mail@site-a.test".into(),
        callee: "mail@site-b.test".into(),
    };
    let public = [9u8; 32];
    let offer = Offer {
        suites: vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
        fingerprint: vec![0xaa; 20],
        nonce: [7; 32],
        commitment: commitment(&public),
        auth: crate::handshake::AuthMode::Signed,
        rs_ids: vec![],
        key_packet: vec![],
    };
    let answer = Answer {
        media: "127.0.0.1:40000".parse().unwrap(),
        suite: Suite::Aes256Gcm,
        fingerprint: vec![0xbb; 20],
        public: [2; 32],
        signature: vec![],
        rs_ids: vec![],
        key_packet: vec![],
    };
    Transcript::t1(&ctx, &offer, &answer)
        .unwrap()
        .extend_t2(&public)
        .unwrap()
}

#[test]
fn transcript_parses_and_t1_is_the_prefix() {
    let t2 = transcript();
    let p = ParsedTranscript::parse(t2.as_bytes()).unwrap();
    assert_eq!(p.call_id, "c0ffee@site-a.test");
    assert_eq!(p.callee, "mail@site-b.test");
    assert_eq!(p.chosen_suite, 2);
    assert_eq!(p.offered_suites, vec![1, 2]);
    assert_eq!(p.caller_public, [9; 32]);
    assert_eq!(p.callee_media, "127.0.0.1:40000".parse().unwrap());
    assert_eq!(p.t1_len, t2.as_bytes().len() - 35);
    // Any truncation or extension is refused.
    let b = t2.as_bytes();
    for cut in 0..b.len() {
        assert!(ParsedTranscript::parse(&b[..cut]).is_err(), "cut {cut}");
    }
    let mut longer = b.to_vec();
    longer.push(0);
    assert!(ParsedTranscript::parse(&longer).is_err());
}

#[test]
fn structure_checks_without_a_keyring() {
    let t2 = transcript();
    let keys = crate::handshake::derive_keys(
        &[5; 32],
        None,
        None,
        crate::handshake::Continuity::NoneHeld { peer_has: false },
        &t2,
        Suite::Aes256Gcm,
    );
    let sig = [0xc2u8, 0x01, 0x00]; // not a real signature; only armored here
    let rec = CallRecord::new(
        "c0ffee@site-a.test",
        true,
        "site-b.test",
        &keys,
        CallSignatures {
            transcript: &t2,
            answer_signature: &sig,
            confirm_signature: &sig,
        },
        UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
    )
    .unwrap();
    assert_eq!(rec.established_at, "2027-01-15T08:00:00Z");
    assert_eq!(rec.local, "mail@site-a.test");
    assert_eq!(rec.suite, "aes-256-gcm");
    let r = verify(&rec, None, None);
    assert_eq!(r.verdict, Verdict::Incomplete, "{:?}", r.checks);
    assert!(
        r.checks
            .iter()
            .filter(|c| c.what != "SAS" && !c.what.ends_with("signature"))
            .all(|c| matches!(c.outcome, Outcome::Pass(_))),
        "{:?}",
        r.checks
    );
    // Changing what the record claims, without the signed bytes, is caught.
    for edit in [
        (|r: &mut CallRecord| r.call_id.push('x')) as fn(&mut CallRecord),
        |r| r.suite = "chacha20-poly1305".into(),
        |r| r.caller_fingerprint = "BB".repeat(20),
        |r| r.transcript_sha256 = "00".repeat(32),
        |r| r.peer = "evil.test".into(),
    ] {
        let mut bad = rec.clone();
        edit(&mut bad);
        assert_eq!(verify(&bad, None, None).verdict, Verdict::Failed);
    }
    // The two records of one call must agree.
    let mut other = rec.clone();
    other.direction = "incoming".into();
    other.local = "mail@site-b.test".into();
    other.peer = "site-a.test".into();
    let r = verify(&rec, None, Some(&other));
    assert!(matches!(r.checks.last().unwrap().outcome, Outcome::Pass(_)));
    other.sas = "yyyy".into();
    assert_eq!(verify(&rec, None, Some(&other)).verdict, Verdict::Failed);
}
