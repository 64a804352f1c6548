use super::*;
use hmac::{KeyInit, Mac};

/// A keyed-MAC stand-in for the OpenPGP signer, so these pure tests need no keyring.
/// The OpenPGP path is exercised end to end in tests/relay_e2e.rs.
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

fn respond(offer: &Offer) -> (CalleeAwaitConfirm, Answer) {
    CalleeAwaitConfirm::respond(&ctx(), offer, [2; 32], Suite::ALL, vec![0xbb; 20], &B_KEY).unwrap()
}

fn run(ea: [u8; 32], eb: [u8; 32]) -> (CallerDone, CalleeDone) {
    let caller = CallerAwaitAnswer::new(ea, [7; 32], vec![Suite::ChaCha20Poly1305], vec![0xaa; 20]);
    let offer = caller.offer().clone();
    let (callee, answer) =
        CalleeAwaitConfirm::respond(&ctx(), &offer, eb, Suite::ALL, vec![0xbb; 20], &B_KEY)
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
    let answer_mutations: [(&str, MutAnswer); 3] = [
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
        suite: Suite::ChaCha20Poly1305,
        fingerprint: vec![0xbb; 20],
        public: [0; 32],
        signature: vec![],
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
}

pub(crate) const VECTOR_TH2: &str =
    "0c2b05897c0fa89daf0d5772adfcfb7d6bf063b93bfea375e0aafa06d8a0faf4";
pub(crate) const VECTOR_K_AB: &str =
    "d19359242cff7522dd2d7922b84b49c0b02495de3914e2585ea303035736efde";
pub(crate) const VECTOR_IV_AB: &str = "c21ee2356409b509013ad355";
pub(crate) const VECTOR_K_BA: &str =
    "ef7346d9e749f40685036c908976c2df38bcedbc0df6ccfb69295f2becf40954";
pub(crate) const VECTOR_IV_BA: &str = "627066a76cb64bfe0bd964bf";
pub(crate) const VECTOR_SAS: &str = "e1qr";
pub(crate) const VECTOR_RECORDS: &str = "00000011729713622d018602aca2e22c0efcfc2cfe000000230e592d445dcf9ba53b449bf1b62a81992067da624a16f9d32ff2a9d0881b0cb3c74113";
pub(crate) const VECTOR_T2: &str = "0100097369706d61696c2f3102001263306666656540736974652d612e74657374030002613104000262320500106d61696c40736974652d612e746573740600106d61696c40736974652d622e74657374070001010800200707070707070707070707070707070707070707070707070707070707070707090020d825cc0ed87be1995b399d6e75e6d26e26fe0261dd896b2e67187f79f64fa1bd0a0014aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0b0001010c0020ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d590d0014bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb0e0020a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209";

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
