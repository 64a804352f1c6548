//! Signing and verifying: round trips, every flipped bit, wrong keys, domains and fingerprints.

use super::*;

#[test]
fn sign_verify_round_trip() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let data = b"INVITE sip:relay@site-b.test SIP/2.0\r\n";
    let sig = a.sign_detached(data).unwrap();

    b.verify_detached("site-a.test", &fa, data, &sig).unwrap();
    // Case and spacing of domain and fingerprint do not matter.
    b.verify_detached(
        "SITE-A.Test",
        &format_fingerprint(&fa.to_lowercase()),
        data,
        &sig,
    )
    .unwrap();
    // The signer can verify its own signature too (own cert, own domain).
    a.verify_detached("site-a.test", &fa, data, &sig).unwrap();

    // It is a v4 binary signature packet.
    let pile = PacketPile::from_bytes(&sig).unwrap();
    match pile.children().next() {
        Some(Packet::Signature(s)) => {
            assert_eq!(s.typ(), SignatureType::Binary);
            assert_eq!(s.version(), 4);
        }
        p => panic!("unexpected {p:?}"),
    }
    // Armored signatures are accepted as well.
    let armored = armor_bytes(&sig, openpgp::armor::Kind::Signature).unwrap();
    assert!(armored.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
    b.verify_detached("site-a.test", &fa, data, &armored)
        .unwrap();
}

#[test]
fn flipped_bits_fail() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let data = b"hello partner".to_vec();
    let sig = a.sign_detached(&data).unwrap();

    for i in 0..data.len() {
        let mut d = data.clone();
        d[i] ^= 0x01;
        assert!(
            matches!(
                b.verify_detached("site-a.test", &fa, &d, &sig),
                Err(KeyringError::BadSignature { .. })
            ),
            "flipped data byte {i} verified"
        );
    }
    // Hashed area, signature MPIs, truncation.
    for i in [6, 8, 12, sig.len() - 1, sig.len() - 5, sig.len() - 40] {
        let mut s = sig.clone();
        s[i] ^= 0x10;
        let r = b.verify_detached("site-a.test", &fa, &data, &s);
        assert!(
            matches!(r, Err(KeyringError::BadSignature { .. })),
            "flipped signature byte {i}: {r:?}"
        );
    }
    for bad in [&sig[..sig.len() - 1], &[][..], b"garbage"] {
        assert!(matches!(
            b.verify_detached("site-a.test", &fa, &data, bad),
            Err(KeyringError::BadSignature { .. })
        ));
    }
    // Two signatures glued together are not one signature.
    let two = [sig.clone(), sig.clone()].concat();
    assert!(matches!(
        b.verify_detached("site-a.test", &fa, &data, &two),
        Err(KeyringError::BadSignature { .. })
    ));
}

/// Every single bit of the signature packet matters: a relay must not accept a signature
/// that differs from what the peer sent in any bit, not even in the unhashed area.
#[test]
fn every_flipped_signature_bit_fails() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let data = b"sipmail/1 answer signature\0transcript".to_vec();
    let sig = a.sign_detached(&data).unwrap();
    let mut accepted = Vec::new();
    for bit in 0..sig.len() * 8 {
        let mut s = sig.clone();
        s[bit / 8] ^= 1 << (bit % 8);
        if b.verify_detached("site-a.test", &fa, &data, &s).is_ok() {
            accepted.push(bit);
        }
    }
    assert!(
        accepted.is_empty(),
        "flipped bits {accepted:?} of {} still verified",
        sig.len() * 8
    );
}

#[test]
fn signature_by_another_key_fails() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    // B's signature, claimed to be A's.
    let sig = b.sign_detached(b"data").unwrap();
    let err = a
        .verify_detached("site-a.test", &fa, b"data", &sig)
        .unwrap_err();
    assert!(matches!(err, KeyringError::BadSignature { .. }), "{err:?}");
    // A text signature (wrong type) by the right key.
    let own = a.own.as_ref().unwrap().signer.as_ref().unwrap();
    let mut kp = own.keypair.clone();
    let text = SignatureBuilder::new(SignatureType::Text)
        .sign_message(&mut kp, b"data")
        .unwrap();
    let text = Packet::from(text).to_vec().unwrap();
    assert!(matches!(
        b.verify_detached("site-a.test", &fa, b"data", &text),
        Err(KeyringError::BadSignature { .. })
    ));
}

#[test]
fn wrong_domain_and_unknown_fingerprint() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let fb = b.own_fingerprint().unwrap();
    let sig = a.sign_detached(b"x").unwrap();

    match b.verify_detached("site-c.test", &fa, b"x", &sig) {
        Err(KeyringError::WrongIdentity {
            fingerprint,
            domain,
            user_ids,
        }) => {
            assert_eq!(fingerprint, fa);
            assert_eq!(domain, "site-c.test");
            assert_eq!(user_ids, vec!["mail@site-a.test".to_string()]);
        }
        r => panic!("unexpected {r:?}"),
    }
    assert!(matches!(
        b.peer_cert("site-c.test", &fa),
        Err(KeyringError::WrongIdentity { .. })
    ));
    // The own key is never a peer for another domain.
    assert!(matches!(
        b.peer_cert("site-a.test", &fb),
        Err(KeyringError::WrongIdentity { .. })
    ));
    assert_eq!(
        b.peer_cert("site-b.test", &fb)
            .unwrap()
            .fingerprint()
            .to_hex(),
        fb
    );
    assert_eq!(
        b.peer_cert("site-a.test", &fa)
            .unwrap()
            .fingerprint()
            .to_hex(),
        fa
    );

    let unknown = "0123456789ABCDEF0123456789ABCDEF01234567";
    assert!(matches!(
        b.verify_detached("site-a.test", unknown, b"x", &sig),
        Err(KeyringError::UnknownFingerprint { .. })
    ));
    assert!(matches!(
        b.peer_cert("site-a.test", "not hex"),
        Err(KeyringError::InvalidFingerprint { .. })
    ));
    assert!(matches!(
        b.peer_cert("site-a.test", &fa[..39]),
        Err(KeyringError::InvalidFingerprint { .. })
    ));

    assert!(b.has_peer("site-a.test"));
    assert!(b.has_peer("Site-A.test"));
    assert!(!b.has_peer("site-c.test"));
}

/// The Ed25519 key the relay generates signs through the key imported once (`fastsign`),
/// and the raw signature it makes is the one the slow path (Sequoia's own key pair) makes:
/// Ed25519 is deterministic, so over the same digest the two must agree byte for byte.
#[test]
fn the_fast_signer_signs_exactly_as_the_key_pair_does() {
    use openpgp::crypto::Signer;
    let (_t, a, b) = two_sites();
    let own = a.own.as_ref().unwrap().signer.as_ref().unwrap();
    let fast = own
        .fast
        .as_ref()
        .expect("a generated Ed25519 key signs the fast way");
    for digest in [
        [0u8; 32].as_slice(),
        &[0xa5; 64],
        b"handshake transcript digest",
    ] {
        let quick = fast
            .signer()
            .sign(openpgp::types::HashAlgorithm::SHA512, digest)
            .unwrap();
        let slow = own
            .keypair
            .clone()
            .sign(openpgp::types::HashAlgorithm::SHA512, digest)
            .unwrap();
        assert_eq!(quick, slow);
    }
    // And what sign_detached makes (through it) verifies at the partner.
    let fa = a.own_fingerprint().unwrap();
    let sig = a.sign_detached(b"data").unwrap();
    b.verify_detached("site-a.test", &fa, b"data", &sig)
        .unwrap();
}

/// A partner's Ed25519 signature is verified by dalek with the key decompressed once
/// (`fastverify`): for the good signature, every flipped bit of the signature and of the
/// data, and another site's key, its verdict is Sequoia's own (through OpenSSL).
#[test]
fn the_fast_verifier_agrees_with_sequoia_on_every_flipped_bit() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let entry = &b.peers[b.by_fpr[&fa]];
    let k = &entry.verifiers[0];
    let fast = k
        .fast
        .as_ref()
        .expect("a generated Ed25519 key verifies the fast way");
    let data = b"v=0 o=- transcript".to_vec();
    let sig = a.sign_detached(&data).unwrap();
    let verdicts = |sig: &[u8], data: &[u8]| -> Option<(bool, bool)> {
        let (s, _) = checked_signature(sig, SystemTime::now()).ok()?;
        Some((
            verify_with_key(&s, &k.key, Some(fast), data).is_ok(),
            verify_with_key(&s, &k.key, None, data).is_ok(),
        ))
    };
    assert_eq!(verdicts(&sig, &data), Some((true, true)));
    let mut checked = 0;
    for i in 0..sig.len() * 8 {
        let mut s = sig.clone();
        s[i / 8] ^= 1 << (i % 8);
        if let Some((quick, slow)) = verdicts(&s, &data) {
            assert_eq!(quick, slow, "signature bit {i}");
            assert!(!quick, "signature bit {i} flipped still verifies");
            checked += 1;
        }
    }
    assert!(checked > 64, "only {checked} flipped signatures parsed");
    for i in 0..data.len() * 8 {
        let mut d = data.clone();
        d[i / 8] ^= 1 << (i % 8);
        assert_eq!(verdicts(&sig, &d), Some((false, false)), "data bit {i}");
    }
    // Site B's own signature, checked against site A's key.
    let other = b.sign_detached(&data).unwrap();
    assert_eq!(verdicts(&other, &data), Some((false, false)));
}
