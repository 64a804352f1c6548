use super::*;
use hmac::{KeyInit, Mac};

/// A keyed-MAC stand-in for the OpenPGP signer, so these pure tests need no keyring.
/// The OpenPGP path is exercised end to end in tests/relays/relay_e2e.rs.
struct MacKey(&'static [u8]);
impl Signer for MacKey {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(self.0).map_err(|e| e.to_string())?;
        m.update(data);
        Ok(m.finalize().into_bytes().to_vec())
    }
}
impl Verifier for MacKey {
    fn verify(&self, _fpr: &[u8], data: &[u8], sig: &[u8]) -> Result<(), String> {
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(self.0).map_err(|e| e.to_string())?;
        m.update(data);
        m.verify_slice(sig).map_err(|_| "mac mismatch".to_string())
    }
}

const A_KEY: MacKey = MacKey(b"caller identity key");
const B_KEY: MacKey = MacKey(b"callee identity key");

fn ctx() -> CallContext {
    CallContext {
        call_id: "c0ffee@site-a.test".into(),
        from_tag: "a1".into(),
        to_tag: "b2".into(),
        caller: "mail@site-a.test".into(),
        callee: "mail@site-b.test".into(),
    }
}

fn caller() -> CallerAwaitAnswer {
    CallerAwaitAnswer::new(
        [1; 32],
        [7; 32],
        vec![Suite::ChaCha20Poly1305],
        vec![0xaa; 20],
    )
}

/// The callee's media address in the tests and the vectors.
fn media() -> std::net::SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn signed_policy() -> CalleePolicy {
    CalleePolicy {
        media: media(),
        ..CalleePolicy::default()
    }
}

fn respond(offer: &Offer) -> (CalleeAwaitConfirm, Answer) {
    CalleeAwaitConfirm::respond_with(
        &ctx(),
        offer,
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
        &signed_policy(),
    )
    .unwrap()
}

fn run(ea: [u8; 32], eb: [u8; 32]) -> (CallerDone, CalleeDone) {
    let caller = CallerAwaitAnswer::new(ea, [7; 32], vec![Suite::ChaCha20Poly1305], vec![0xaa; 20]);
    let offer = caller.offer().clone();
    let (callee, answer) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        &offer,
        eb,
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
        &signed_policy(),
    )
    .unwrap();
    let a = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY).unwrap();
    let b = callee.on_confirm(&a.confirm, &A_KEY).unwrap();
    (a, b)
}

#[test]
fn both_sides_derive_the_same_keys() {
    let (a, b) = run([1; 32], [2; 32]);
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
    assert_eq!(a.keys.callee_to_caller.key, b.keys.callee_to_caller.key);
    assert_eq!(a.keys.caller_to_callee.iv, b.keys.caller_to_callee.iv);
    assert_ne!(a.keys.caller_to_callee.key, a.keys.callee_to_caller.key);
    assert_eq!(a.keys.sas, b.keys.sas);
    assert_eq!(a.transcript, b.transcript);
    assert_eq!(a.keys.sas.len(), 4);
}

#[test]
fn different_ephemeral_keys_give_different_session_keys() {
    let (a1, _) = run([1; 32], [2; 32]);
    let (a2, _) = run([3; 32], [2; 32]);
    assert_ne!(a1.keys.caller_to_callee.key, a2.keys.caller_to_callee.key);
}

#[test]
fn debug_output_redacts_keys() {
    let (a, _) = run([1; 32], [2; 32]);
    let dbg = format!("{:?}", a.keys);
    assert!(dbg.contains("<redacted>"));
    assert!(!dbg.contains(&hex::encode(a.keys.caller_to_callee.key)));
    let dbg = format!("{:?}", a.keys.caller_to_callee);
    assert!(!dbg.contains(&format!("{:?}", a.keys.caller_to_callee.key)));
}

/// A man in the middle who terminates both legs: he gives B his own commitment and gives
/// A his own ephemeral key in place of B's. B's signature then covers M's values, so A
/// refuses the answer.
#[test]
fn mitm_swapping_dh_values_fails_on_the_caller() {
    let caller = caller();
    let mitm = CallerAwaitAnswer::new(
        [9; 32],
        [7; 32],
        vec![Suite::ChaCha20Poly1305],
        vec![0xaa; 20],
    );
    let mut offer_to_b = caller.offer().clone();
    offer_to_b.commitment = mitm.offer().commitment;
    let (_callee, answer) = respond(&offer_to_b);
    let mut answer_to_a = answer.clone();
    answer_to_a.public = *PublicKey::from(&StaticSecret::from([8u8; 32])).as_bytes();
    let err = caller
        .on_answer(&ctx(), &answer_to_a, &B_KEY, &A_KEY)
        .unwrap_err();
    assert!(matches!(err, HandshakeError::BadSignature(_)), "{err:?}");
}

/// The same man in the middle, passing B's answer through unchanged but putting his own
/// key in the ACK: B finds it does not match the commitment.
#[test]
fn mitm_swapping_the_confirm_key_fails_on_the_callee() {
    let (a, _) = run([1; 32], [2; 32]);
    let caller = caller();
    let (callee, _answer) = respond(caller.offer());
    let mut confirm = a.confirm.clone();
    confirm.public = *PublicKey::from(&StaticSecret::from([8u8; 32])).as_bytes();
    assert_eq!(
        callee.on_confirm(&confirm, &A_KEY).unwrap_err(),
        HandshakeError::CommitmentMismatch
    );
}

#[test]
fn every_context_field_is_covered_by_the_answer_signature() {
    type Mutate = fn(&mut CallContext);
    let mutations: [(&str, Mutate); 5] = [
        ("call-id", |c| c.call_id.push('x')),
        ("from tag", |c| c.from_tag.push('x')),
        ("to tag", |c| c.to_tag.push('x')),
        ("caller", |c| c.caller = "mail@evil.test".into()),
        ("callee", |c| c.callee = "mail@evil.test".into()),
    ];
    for (name, m) in mutations {
        let caller = caller();
        let (_callee, answer) = respond(caller.offer());
        let mut seen_by_a = ctx();
        m(&mut seen_by_a);
        let r = caller.on_answer(&seen_by_a, &answer, &B_KEY, &A_KEY);
        assert!(
            matches!(r, Err(HandshakeError::BadSignature(_))),
            "{name} not covered"
        );
    }
}

#[test]
fn every_offer_and_answer_field_is_covered() {
    // Fields of the offer as B saw them, altered in transit.
    type MutOffer = fn(&mut Offer);
    let offer_mutations: [(&str, MutOffer); 3] = [
        ("nonce", |o| o.nonce[0] ^= 1),
        ("caller fingerprint", |o| o.fingerprint[0] ^= 1),
        ("commitment", |o| o.commitment[0] ^= 1),
    ];
    for (name, m) in offer_mutations {
        let caller = caller();
        let mut offer = caller.offer().clone();
        m(&mut offer);
        let (_callee, answer) = respond(&offer);
        let r = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY);
        assert!(
            matches!(r, Err(HandshakeError::BadSignature(_))),
            "{name} not covered"
        );
    }
    type MutAnswer = fn(&mut Answer);
    let answer_mutations: [(&str, MutAnswer); 5] = [
        ("media port", |a| a.media.set_port(a.media.port() ^ 1)),
        ("media address", |a| a.media.set_ip([127, 0, 0, 2].into())),
        ("callee public", |a| a.public[5] ^= 1),
        ("callee fingerprint", |a| a.fingerprint[0] ^= 1),
        ("signature", |a| a.signature[3] ^= 0x10),
    ];
    for (name, m) in answer_mutations {
        let caller = caller();
        let (_callee, mut answer) = respond(caller.offer());
        m(&mut answer);
        let r = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY);
        assert!(
            matches!(r, Err(HandshakeError::BadSignature(_))),
            "{name} not covered"
        );
    }
}

#[test]
fn flipped_bit_in_confirm_signature_fails() {
    let caller = caller();
    let (callee, answer) = respond(caller.offer());
    let done = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY).unwrap();
    let mut confirm = done.confirm.clone();
    confirm.signature[0] ^= 0x80;
    assert!(matches!(
        callee.on_confirm(&confirm, &A_KEY),
        Err(HandshakeError::BadSignature(_))
    ));
}

#[test]
fn low_order_public_key_is_refused() {
    let caller = caller();
    // A (signed) answer whose key is the identity point gives an all-zero shared secret.
    let mut answer = Answer {
        media: media(),
        suite: Suite::ChaCha20Poly1305,
        fingerprint: vec![0xbb; 20],
        public: [0; 32],
        signature: vec![],
        rs_ids: vec![],
        key_packet: vec![],
    };
    let t1 = Transcript::t1(&ctx(), caller.offer(), &answer).unwrap();
    answer.signature = B_KEY.sign(&signed_data(ANSWER_SIG_CONTEXT, &t1)).unwrap();
    assert_eq!(
        caller
            .on_answer(&ctx(), &answer, &B_KEY, &A_KEY)
            .unwrap_err(),
        HandshakeError::NonContributory
    );
}

#[test]
fn offer_without_suites_is_refused() {
    let caller = CallerAwaitAnswer::new([1; 32], [7; 32], vec![], vec![0xaa; 20]);
    let r = CalleeAwaitConfirm::respond(
        &ctx(),
        caller.offer(),
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
    );
    assert_eq!(r.unwrap_err(), HandshakeError::EmptySuiteList);
}

#[test]
fn sas_uses_the_zrtp_alphabet() {
    assert_eq!(render_sas([0, 0, 0, 0]), "yyyy");
    assert_eq!(render_sas([0xff, 0xff, 0xff, 0xff]), "9999");
    // 0x08 0x86 0x42 -> 00001 00010 00011 00100 -> b n d r
    assert_eq!(render_sas([0x08, 0x86, 0x42, 0x00]), "bndr");
}

/// The vectors published in docs/PROTOCOL.md. If this test changes, the document must too.
#[test]
fn protocol_md_test_vectors() {
    let (a, _b) = run([1; 32], [2; 32]);
    let th = hex::encode(a.keys.transcript_hash);
    let k_ab = hex::encode(a.keys.caller_to_callee.key);
    let iv_ab = hex::encode(a.keys.caller_to_callee.iv);
    let k_ba = hex::encode(a.keys.callee_to_caller.key);
    let iv_ba = hex::encode(a.keys.callee_to_caller.iv);
    let t2 = hex::encode(a.transcript.as_bytes());
    println!(
        "T2 = {t2}\nTH2 = {th}\nk_ab = {k_ab}\niv_ab = {iv_ab}\nk_ba = {k_ba}\niv_ba = {iv_ba}\nsas = {}",
        a.keys.sas
    );
    assert_eq!(th, VECTOR_TH2);
    assert_eq!(k_ab, VECTOR_K_AB);
    assert_eq!(iv_ab, VECTOR_IV_AB);
    assert_eq!(k_ba, VECTOR_K_BA);
    assert_eq!(iv_ba, VECTOR_IV_BA);
    assert_eq!(a.keys.sas, VECTOR_SAS);
    // The first two records the caller sends: the empty hello, then "EHLO site-a.test\r\n".
    let mut sealer =
        crate::tunnel::record::Sealer::new(&a.keys.caller_to_callee, Default::default());
    let mut wire = Vec::new();
    sealer.seal_data(b"", &mut wire).unwrap();
    sealer
        .seal_data(b"EHLO site-a.test\r\n", &mut wire)
        .unwrap();
    println!("records = {}", hex::encode(&wire));
    assert_eq!(hex::encode(&wire), VECTOR_RECORDS);
    assert_eq!(hex::encode(a.transcript.as_bytes()), VECTOR_T2);
    println!("rs_next = {}", hex::encode(a.keys.retained.as_bytes()));
    assert_eq!(hex::encode(a.keys.retained.as_bytes()), VECTOR_RS_NEXT);
}

/// The second set of vectors in docs/PROTOCOL.md: trust policy psk, and both sides holding
/// the retained secret rs = 32 bytes of 0x33 from an earlier call.
#[test]
fn protocol_md_psk_continuity_vectors() {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(VECTOR_PSK)
        .unwrap();
    assert_eq!(key, (0u8..32).collect::<Vec<u8>>());
    let psk = PskAuth::new(&key);
    let held = vec![RetainedSecret::from_bytes([0x33; 32])];
    let caller = caller()
        .with_auth(AuthMode::Psk, vec![])
        .with_retained(held.clone());
    let policy = CalleePolicy {
        media: media(),
        auth: AuthMode::Psk,
        retained: held,
        key_packet: vec![],
    };
    let (callee, answer) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        caller.offer(),
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &psk,
        &policy,
    )
    .unwrap();
    let rs_id_caller = hex::encode(caller.offer().rs_ids[0]);
    let a = caller.on_answer(&ctx(), &answer, &psk, &psk).unwrap();
    let b = callee.on_confirm(&a.confirm, &psk).unwrap();
    assert_eq!(a.keys.continuity, Continuity::Matched);
    assert_eq!(b.keys.caller_to_callee.key, a.keys.caller_to_callee.key);
    let got = [
        ("psk_rs_id_caller", rs_id_caller),
        ("psk_rs_id_callee", hex::encode(answer.rs_ids[0])),
        ("psk_T2", hex::encode(a.transcript.as_bytes())),
        ("psk_mac_answer", hex::encode(&answer.signature)),
        ("psk_mac_confirm", hex::encode(&a.confirm.signature)),
        ("psk_k_ab", hex::encode(a.keys.caller_to_callee.key)),
        ("psk_k_ba", hex::encode(a.keys.callee_to_caller.key)),
        ("psk_SAS", a.keys.sas.clone()),
        ("psk_rs_next", hex::encode(a.keys.retained.as_bytes())),
    ];
    for ((name, value), want) in got.iter().zip(VECTORS_PSK) {
        println!("{name} = {value}");
        assert_eq!(value, want, "{name}");
    }
}

/// The PSK file's content: base64 of the bytes 0x00, 0x01, ... 0x1f.
pub(crate) const VECTOR_PSK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub(crate) const VECTORS_PSK: [&str; 9] = [
    "6a57631eeb5c052b",
    "ef08a9aa2fd496b7",
    "0100097369706d61696c2f3302001263306666656540736974652d612e74657374030002613104000262320500106d61696c40736974652d612e746573740600106d61696c40736974652d622e74657374070001010800200707070707070707070707070707070707070707070707070707070707070707090020d825cc0ed87be1995b399d6e75e6d26e26fe0261dd896b2e67187f79f64fa1bd0a0014aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0b0001010c0020ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d590d0014bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb0f0001021000086a57631eeb5c052b110008ef08a9aa2fd496b7120007047f0000019c400e0020a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209",
    "598d4bf59e21154d881da19dfc83be82317b84dcdaad4d7296a9273a1ae11e4d",
    "9c1f014d8245a45ab2ae77a27ab68fcdefc81e56a28234759a4b11ecd17f93e5",
    "f1e2f43aae365972351da3a75ff05ccae2224d1031d6ebd806fa7db3f9312892",
    "759779d5bf3e1b317866746c29c92cbc1d6ced276409a191e4098bb19b5f9ed9",
    "ihqm",
    "b25895984af3ee721625ff731ad802378d44de88dea42696e9e876da831347e6",
];
pub(crate) const VECTOR_RS_NEXT: &str =
    "1654d6a4031f18f5f0b4197b515811682028ce988ab8d4aa170160e0600815f9";

pub(crate) const VECTOR_TH2: &str =
    "fc2dd0bf521351590b99e685e9b1a32579391d9a6ddeabfd47539303b1fde75c";
pub(crate) const VECTOR_K_AB: &str =
    "12b9aa074f7bfda2e8d5faa466ab5a0b9a4974b5411d441d989f96b9578e9396";
pub(crate) const VECTOR_IV_AB: &str = "55369995565096487d157603";
pub(crate) const VECTOR_K_BA: &str =
    "a41db908672d0e21c61f2c3a8d45d985cc6c42fb0e399291317291f523745077";
pub(crate) const VECTOR_IV_BA: &str = "aa020e2df58f6cbf66e5ec4a";
pub(crate) const VECTOR_SAS: &str = "8fn4";
pub(crate) const VECTOR_RECORDS: &str = "0000001173615c055fa196bdc8eee62c6f85ba8f79000000230ebb44e029033ee957c67f28eff37a2a0e490d3642ae32a22b47e65b778a62bae03755";
pub(crate) const VECTOR_T2: &str = "0100097369706d61696c2f3302001263306666656540736974652d612e74657374030002613104000262320500106d61696c40736974652d612e746573740600106d61696c40736974652d622e74657374070001010800200707070707070707070707070707070707070707070707070707070707070707090020d825cc0ed87be1995b399d6e75e6d26e26fe0261dd896b2e67187f79f64fa1bd0a0014aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0b0001010c0020ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d590d0014bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb0f000101100000110000120007047f0000019c400e0020a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209";

#[test]
fn the_callee_honours_the_callers_preference_among_common_suites() {
    let caller = CallerAwaitAnswer::new(
        [1; 32],
        [7; 32],
        vec![Suite::Aes256Gcm, Suite::ChaCha20Poly1305],
        vec![0xaa; 20],
    );
    let (_c, answer) = respond(caller.offer());
    assert_eq!(answer.suite, Suite::Aes256Gcm);
    let r = CalleeAwaitConfirm::respond(
        &ctx(),
        &caller_offer_only(Suite::ChaCha20Poly1305),
        [2; 32],
        &[Suite::Aes256Gcm],
        vec![0xbb; 20],
        &B_KEY,
    );
    assert!(matches!(r, Err(HandshakeError::NoCommonSuite { .. })));
}

fn caller_offer_only(s: Suite) -> Offer {
    CallerAwaitAnswer::new([1; 32], [7; 32], vec![s], vec![0xaa; 20])
        .offer()
        .clone()
}

/// Downgrade: a man in the middle strips the strong suite from the offer (or swaps the
/// chosen suite in the answer). The offered list and the choice are both in T1, which B
/// signs, so A refuses.
#[test]
fn suite_downgrade_and_swap_are_refused() {
    let caller = CallerAwaitAnswer::new(
        [1; 32],
        [7; 32],
        vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
        vec![0xaa; 20],
    );
    let mut stripped = caller.offer().clone();
    stripped.suites = vec![Suite::Aes256Gcm];
    let (_c, answer) = respond(&stripped);
    assert_eq!(answer.suite, Suite::Aes256Gcm);
    let r = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY);
    assert!(matches!(r, Err(HandshakeError::BadSignature(_))), "{r:?}");

    let caller = CallerAwaitAnswer::new(
        [1; 32],
        [7; 32],
        vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
        vec![0xaa; 20],
    );
    let (_c, mut answer) = respond(caller.offer());
    answer.suite = Suite::Aes256Gcm;
    let r = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY);
    assert!(matches!(r, Err(HandshakeError::BadSignature(_))), "{r:?}");

    // A suite that was never offered is refused before any signature check.
    let only_chacha = self::caller();
    let (_c, mut answer) = respond(only_chacha.offer());
    answer.suite = Suite::Aes256Gcm;
    assert_eq!(
        only_chacha
            .on_answer(&ctx(), &answer, &B_KEY, &A_KEY)
            .unwrap_err(),
        HandshakeError::SuiteNotOffered(Suite::Aes256Gcm)
    );
}

fn rs(b: u8) -> RetainedSecret {
    RetainedSecret::from_bytes([b; 32])
}

/// One call with retained secrets on each side; returns both ends.
fn run_retained(
    a_rs: Vec<RetainedSecret>,
    b_rs: Vec<RetainedSecret>,
) -> Result<(CallerDone, CalleeDone), HandshakeError> {
    let caller = caller().with_retained(a_rs);
    let policy = CalleePolicy {
        media: media(),
        auth: AuthMode::Signed,
        retained: b_rs,
        key_packet: vec![],
    };
    let (callee, answer) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        caller.offer(),
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
        &policy,
    )?;
    let a = caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY)?;
    let b = callee.on_confirm(&a.confirm, &A_KEY)?;
    Ok((a, b))
}

#[test]
fn retained_secrets_are_mixed_in_when_both_hold_one() {
    // First call: nothing held on either side.
    let (a, b) = run_retained(vec![], vec![]).unwrap();
    assert_eq!(a.keys.continuity, Continuity::NoneHeld { peer_has: false });
    assert_eq!(a.keys.retained, b.keys.retained);
    // Second call with the secret the first left: matched, and the keys differ from a call
    // without it (the secret really enters the key schedule).
    let left = a.keys.retained.clone();
    let (a2, b2) = run_retained(vec![left.clone()], vec![left.clone()]).unwrap();
    assert_eq!(a2.keys.continuity, Continuity::Matched);
    assert_eq!(b2.keys.continuity, Continuity::Matched);
    assert_eq!(a2.keys.caller_to_callee.key, b2.keys.caller_to_callee.key);
    let (plain, _) = run_retained(vec![], vec![]).unwrap();
    assert_ne!(
        a2.keys.caller_to_callee.key,
        plain.keys.caller_to_callee.key
    );
    assert_ne!(a2.keys.retained, left);
}

#[test]
fn both_sides_pick_the_same_secret_when_their_caches_differ_in_order() {
    // A finished calls 1, 2, 3 in that order; B saw 3 complete before 2. The newest secret
    // in A's order that B holds is 3.
    let (a, b) = run_retained(vec![rs(3), rs(2), rs(1)], vec![rs(2), rs(3), rs(9)]).unwrap();
    assert_eq!(a.keys.continuity, Continuity::Matched);
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
    // B is one call ahead (A missed storing the last secret): still matched, on rs(1).
    let (a, b) = run_retained(vec![rs(1)], vec![rs(4), rs(1)]).unwrap();
    assert_eq!(b.keys.continuity, Continuity::Matched);
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
}

#[test]
fn a_lost_cache_or_a_mismatch_is_reported_and_the_call_still_agrees_on_keys() {
    // B lost its cache: A sees the peer has none, B sees that A remembers more.
    let (a, b) = run_retained(vec![rs(1)], vec![]).unwrap();
    assert_eq!(a.keys.continuity, Continuity::PeerHasNone);
    assert!(a.keys.continuity.is_problem());
    assert_eq!(b.keys.continuity, Continuity::NoneHeld { peer_has: true });
    assert!(!b.keys.continuity.is_problem());
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
    // Both hold something, nothing in common.
    let (a, b) = run_retained(vec![rs(1)], vec![rs(2)]).unwrap();
    assert_eq!(a.keys.continuity, Continuity::Mismatch);
    assert_eq!(b.keys.continuity, Continuity::Mismatch);
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
}

/// Mallory sat in the middle of the first, unauthenticated call: A's retained secret is
/// the one of the A-M leg, B's the one of the M-B leg. On the next call without him, both
/// sides see a mismatch. And if Mallory is there again but only relays the retained-secret
/// IDs he saw, the secrets he does not know enter the keys, so his legs' keys differ from
/// what A and B derive and the stream cannot be read.
#[test]
fn a_man_in_the_middle_of_an_earlier_call_is_detected_later() {
    let (am, _) = run_retained(vec![], vec![]).unwrap();
    let (mb, _) = run_retained(vec![rs(0x55)], vec![]).unwrap();
    let (a, b) = run_retained(
        vec![am.keys.retained.clone()],
        vec![mb.keys.retained.clone()],
    )
    .unwrap();
    assert_eq!(a.keys.continuity, Continuity::Mismatch);
    assert_eq!(b.keys.continuity, Continuity::Mismatch);

    // Now A and B share rs; Mallory (no rs) replays A's IDs to B and B's IDs to A.
    let shared = rs(0x77);
    let caller = caller().with_retained(vec![shared.clone()]);
    let ids_from_a = caller.offer().rs_ids.clone();
    let mallory_to_b = CallerAwaitAnswer::new(
        [9; 32],
        [7; 32],
        vec![Suite::ChaCha20Poly1305],
        vec![0xaa; 20],
    );
    let mut offer_m = mallory_to_b.offer().clone();
    offer_m.rs_ids = ids_from_a;
    let policy = CalleePolicy {
        media: media(),
        auth: AuthMode::Signed,
        retained: vec![shared.clone()],
        key_packet: vec![],
    };
    let (b_side, _) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        &offer_m,
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
        &policy,
    )
    .unwrap();
    // B believes continuity holds, and mixes rs into keys Mallory cannot compute: his own
    // leg (derived without rs) does not match.
    assert_eq!(b_side.continuity(), Continuity::Matched);
}

#[test]
fn the_callee_refuses_an_offer_with_another_trust_policy() {
    for (offered, required) in [
        (AuthMode::Opportunistic, AuthMode::Signed),
        (AuthMode::Psk, AuthMode::Signed),
        (AuthMode::Signed, AuthMode::Psk),
    ] {
        let caller = caller().with_auth(offered, vec![]);
        let policy = CalleePolicy {
            auth: required,
            ..CalleePolicy::default()
        };
        let r = CalleeAwaitConfirm::respond_with(
            &ctx(),
            caller.offer(),
            [2; 32],
            Suite::ALL,
            vec![0xbb; 20],
            &B_KEY,
            &policy,
        );
        assert_eq!(
            r.unwrap_err(),
            HandshakeError::AuthMismatch { offered, required }
        );
    }
}

/// The trust policy is in the transcript: a man in the middle who rewrites it on the way
/// to a callee configured for it breaks the callee's signature as the caller checks it.
#[test]
fn the_trust_policy_is_covered_by_the_signatures() {
    let caller = caller();
    let mut offer = caller.offer().clone();
    offer.auth = AuthMode::Psk;
    let policy = CalleePolicy {
        auth: AuthMode::Psk,
        ..signed_policy()
    };
    let (_c, answer) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        &offer,
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &PskAuth::new(&[0x44; 32]),
        &policy,
    )
    .unwrap();
    assert!(matches!(
        caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY),
        Err(HandshakeError::BadSignature(_))
    ));
    // So are the retained-secret IDs.
    let caller = self::caller().with_retained(vec![rs(1)]);
    let mut offer = caller.offer().clone();
    offer.rs_ids.clear();
    let (_c, answer) = respond(&offer);
    assert!(matches!(
        caller.on_answer(&ctx(), &answer, &B_KEY, &A_KEY),
        Err(HandshakeError::BadSignature(_))
    ));
}

#[test]
fn psk_accepts_the_same_key_and_refuses_another() {
    let a_psk = PskAuth::new(b"0123456789abcdef0123456789abcdef");
    let b_psk = PskAuth::new(b"0123456789abcdef0123456789abcdef");
    let wrong = PskAuth::new(b"0123456789abcdef0123456789abcdeX");
    let policy = CalleePolicy {
        auth: AuthMode::Psk,
        ..CalleePolicy::default()
    };
    let go = |callee_key: &PskAuth| {
        let caller = caller().with_auth(AuthMode::Psk, vec![]);
        let (callee, answer) = CalleeAwaitConfirm::respond_with(
            &ctx(),
            caller.offer(),
            [2; 32],
            Suite::ALL,
            vec![0xbb; 20],
            callee_key,
            &policy,
        )
        .unwrap();
        let a = caller.on_answer(&ctx(), &answer, &a_psk, &a_psk)?;
        let b = callee.on_confirm(&a.confirm, callee_key)?;
        Ok::<_, HandshakeError>((a, b))
    };
    let (a, b) = go(&b_psk).unwrap();
    assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
    assert!(matches!(go(&wrong), Err(HandshakeError::BadSignature(_))));
    assert_eq!(format!("{a_psk:?}"), "PskAuth(<redacted>)");
    // A PSK MAC made as the callee does not pass as the caller's (distinct contexts).
    let t = Transcript::t1(
        &ctx(),
        caller().offer(),
        &Answer {
            media: media(),
            suite: Suite::ChaCha20Poly1305,
            fingerprint: vec![0xbb; 20],
            public: [3; 32],
            signature: vec![],
            rs_ids: vec![],
            key_packet: vec![],
        },
    )
    .unwrap();
    let answer_mac = a_psk.sign(&signed_data(ANSWER_SIG_CONTEXT, &t)).unwrap();
    assert!(
        a_psk
            .verify(&[], &signed_data(CONFIRM_SIG_CONTEXT, &t), &answer_mac)
            .is_err()
    );
}

#[test]
fn retained_secret_ids_depend_on_role_and_debug_redacts() {
    let s = rs(1);
    assert_ne!(s.id(true), s.id(false));
    assert_ne!(s.id(true), rs(2).id(true));
    assert_eq!(format!("{s:?}"), "RetainedSecret(<redacted>)");
    let (a, _) = run([1; 32], [2; 32]);
    assert!(!format!("{:?}", a.keys).contains(&hex::encode(a.keys.retained.as_bytes())));
}

/// The PSK is in the key schedule, not only in the MACs: two calls with the same
/// ephemeral keys, nonce and retained secret, authenticated with different PSKs, derive
/// different session keys (so a PSK also protects the stream, e.g. against someone who
/// can compute ss).
#[test]
fn different_psks_give_different_session_keys_for_the_same_ss_and_rs() {
    let go = |key: &[u8]| {
        let psk = PskAuth::new(key);
        let held = vec![rs(0x33)];
        let caller = caller()
            .with_auth(AuthMode::Psk, vec![])
            .with_retained(held.clone());
        let policy = CalleePolicy {
            auth: AuthMode::Psk,
            retained: held,
            ..CalleePolicy::default()
        };
        let (callee, answer) = CalleeAwaitConfirm::respond_with(
            &ctx(),
            caller.offer(),
            [2; 32],
            Suite::ALL,
            vec![0xbb; 20],
            &psk,
            &policy,
        )
        .unwrap();
        let a = caller.on_answer(&ctx(), &answer, &psk, &psk).unwrap();
        let b = callee.on_confirm(&a.confirm, &psk).unwrap();
        assert_eq!(a.keys.caller_to_callee.key, b.keys.caller_to_callee.key);
        assert_eq!(a.keys.continuity, Continuity::Matched);
        a
    };
    let one = go(&[0x11; 32]);
    let two = go(&[0x22; 32]);
    // Same transcript (the PSK is not in it), same ss, same rs ...
    assert_eq!(one.transcript, two.transcript);
    // ... different keys, SAS input and next retained secret.
    assert_ne!(one.keys.caller_to_callee.key, two.keys.caller_to_callee.key);
    assert_ne!(one.keys.callee_to_caller.key, two.keys.callee_to_caller.key);
    assert_ne!(one.keys.retained, two.keys.retained);
}

#[test]
fn the_key_schedule_mixes_in_the_psk() {
    let (a, _) = run([1; 32], [2; 32]);
    let t2 = a.transcript;
    let k = |psk: Option<&[u8]>| {
        derive_keys(
            &[5; 32],
            Some(&rs(3)),
            psk,
            Continuity::Matched,
            &t2,
            Suite::ChaCha20Poly1305,
        )
        .caller_to_callee
        .key
    };
    assert_ne!(k(None), k(Some(&[1; 32])));
    assert_ne!(k(Some(&[1; 32])), k(Some(&[2; 32])));
    assert_eq!(k(Some(&[1; 32])), k(Some(&[1; 32])));
}

/// Trust policy psk needs the PSK for the keys: a signer that has none is an error, not
/// a call keyed without it.
#[test]
fn psk_policy_without_a_psk_is_refused() {
    let caller = caller().with_auth(AuthMode::Psk, vec![]);
    let policy = CalleePolicy {
        auth: AuthMode::Psk,
        ..signed_policy()
    };
    let r = CalleeAwaitConfirm::respond_with(
        &ctx(),
        caller.offer(),
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &B_KEY,
        &policy,
    );
    assert_eq!(r.unwrap_err(), HandshakeError::NoPsk);
    let psk = PskAuth::new(&[0x44; 32]);
    let (_c, answer) = CalleeAwaitConfirm::respond_with(
        &ctx(),
        caller.offer(),
        [2; 32],
        Suite::ALL,
        vec![0xbb; 20],
        &psk,
        &policy,
    )
    .unwrap();
    assert_eq!(
        caller.on_answer(&ctx(), &answer, &psk, &B_KEY).unwrap_err(),
        HandshakeError::NoPsk
    );
}
