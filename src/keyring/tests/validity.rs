//! Validity over time: expiry and revocation of certificates and subkeys.

use super::*;

#[test]
fn expired_cert_is_refused() {
    let day = Duration::from_secs(86_400);
    let (cert, _) = CertBuilder::new()
        .set_creation_time(SystemTime::now() - 10 * day)
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .set_validity_period(day)
        .add_userid("mail@old.test")
        .generate()
        .unwrap();
    let fpr = cert.fingerprint().to_hex();
    let (_t, dir, _) = new_site("site-a.test");
    Keyring::import(&dir, &armored_pub(&cert)).unwrap();
    let k = Keyring::open(&dir).unwrap();
    match k.peer_cert("old.test", &fpr) {
        Err(KeyringError::Expired {
            fingerprint,
            expired_at,
        }) => {
            assert_eq!(fingerprint, fpr);
            assert!(expired_at.ends_with("UTC"), "{expired_at}");
        }
        r => panic!("unexpected {r:?}"),
    }
    assert!(!k.has_peer("old.test"));
    let info = k.list().into_iter().find(|i| i.fingerprint == fpr).unwrap();
    assert_eq!(info.status, KeyStatus::Expired);
    assert!(info.expires.is_some());

    // A signature made (back then) with that key does not verify now.
    let mut kp = cert
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .role_into_unspecified()
        .into_keypair()
        .unwrap();
    let sig = SignatureBuilder::new(SignatureType::Binary)
        .set_signature_creation_time(SystemTime::now() - 9 * day - day / 2)
        .unwrap()
        .sign_message(&mut kp, b"old")
        .unwrap();
    let sig = Packet::from(sig).to_vec().unwrap();
    assert!(matches!(
        k.verify_detached("old.test", &fpr, b"old", &sig),
        Err(KeyringError::Expired { .. })
    ));

    // An expired own key cannot sign.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(SECRET_FILE), armored_tsk(&cert)).unwrap();
    let own = Keyring::open(tmp.path()).unwrap();
    assert!(matches!(
        own.sign_detached(b"x"),
        Err(KeyringError::NoSigningKey { .. })
    ));
    // And cannot be imported as own key.
    let tmp2 = tempfile::tempdir().unwrap();
    assert!(matches!(
        Keyring::import(tmp2.path(), &armored_tsk(&cert)),
        Err(KeyringError::NoSigningKey { .. })
    ));
}

#[test]
fn expiring_cert_is_fine_until_then() {
    let (cert, _) = CertBuilder::new()
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .set_validity_period(Duration::from_secs(86_400))
        .add_userid("mail@soon.test")
        .generate()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    Keyring::import(tmp.path(), &armored_pub(&cert)).unwrap();
    let k = Keyring::open(tmp.path()).unwrap();
    k.peer_cert("soon.test", &cert.fingerprint().to_hex())
        .unwrap();
    assert!(k.has_peer("soon.test"));
}

#[test]
fn revoked_cert_is_refused() {
    let (cert, rev) = CertBuilder::new()
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .add_userid("mail@gone.test")
        .generate()
        .unwrap();
    let fpr = cert.fingerprint().to_hex();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    Keyring::import(d, &armored_pub(&cert)).unwrap();
    let k = Keyring::open(d).unwrap();
    k.peer_cert("gone.test", &fpr).unwrap();
    let sig = {
        let mut kp = cert
            .primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .unwrap()
            .role_into_unspecified()
            .into_keypair()
            .unwrap();
        let s = SignatureBuilder::new(SignatureType::Binary)
            .sign_message(&mut kp, b"m")
            .unwrap();
        Packet::from(s).to_vec().unwrap()
    };
    k.verify_detached("gone.test", &fpr, b"m", &sig).unwrap();

    // Import the bare revocation certificate.
    let rev_bytes = armor_bytes(
        &Packet::from(rev).to_vec().unwrap(),
        openpgp::armor::Kind::Signature,
    )
    .unwrap();
    assert_eq!(
        Keyring::import(d, &rev_bytes).unwrap(),
        Imported::Revocation {
            fingerprint: fpr.clone()
        }
    );
    let k = Keyring::open(d).unwrap();
    assert!(matches!(
        k.peer_cert("gone.test", &fpr),
        Err(KeyringError::Revoked { .. })
    ));
    assert!(matches!(
        k.verify_detached("gone.test", &fpr, b"m", &sig),
        Err(KeyringError::Revoked { .. })
    ));
    assert!(!k.has_peer("gone.test"));
    assert_eq!(k.list()[0].status, KeyStatus::Revoked);
    // Re-importing the unrevoked cert does not un-revoke it.
    Keyring::import(d, &armored_pub(&cert)).unwrap();
    assert!(matches!(
        Keyring::open(d).unwrap().peer_cert("gone.test", &fpr),
        Err(KeyringError::Revoked { .. })
    ));

    // A revoked cert imported as a whole, with a reason.
    let (cert2, _) = CertBuilder::new()
        .add_userid("mail@gone2.test")
        .add_signing_subkey()
        .generate()
        .unwrap();
    let mut signer = cert2
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let rev2 = CertRevocationBuilder::new()
        .set_reason_for_revocation(ReasonForRevocation::KeyRetired, b"site closed")
        .unwrap()
        .build(&mut signer, &cert2, None)
        .unwrap();
    let (revoked2, _) = cert2.insert_packets(Some(rev2)).unwrap();
    Keyring::import(d, &armored_pub(&revoked2)).unwrap();
    let err = Keyring::open(d)
        .unwrap()
        .peer_cert("gone2.test", &revoked2.fingerprint().to_hex())
        .unwrap_err();
    assert!(matches!(err, KeyringError::Revoked { .. }), "{err:?}");
    assert!(err.to_string().contains("site closed"), "{err}");

    // A revocation for an unknown cert is refused.
    let (cert3, rev3) = CertBuilder::new()
        .add_userid("mail@z.test")
        .generate()
        .unwrap();
    let _ = cert3;
    let rev3 = armor_bytes(
        &Packet::from(rev3).to_vec().unwrap(),
        openpgp::armor::Kind::Signature,
    )
    .unwrap();
    assert!(matches!(
        Keyring::import(d, &rev3),
        Err(KeyringError::RevocationNotApplicable { .. })
    ));
}

#[test]
fn revoked_signing_subkey_is_not_used_for_verification() {
    let (cert, _) = CertBuilder::new()
        .add_userid("mail@sub.test")
        .add_signing_subkey()
        .generate()
        .unwrap();
    let fpr = cert.fingerprint().to_hex();
    let sub = cert.keys().subkeys().next().unwrap().key().clone();
    let mut sub_kp = sub
        .clone()
        .parts_into_secret()
        .unwrap()
        .role_into_unspecified()
        .into_keypair()
        .unwrap();
    let sig = SignatureBuilder::new(SignatureType::Binary)
        .sign_message(&mut sub_kp, b"m")
        .unwrap();
    let sig = Packet::from(sig).to_vec().unwrap();

    let mut primary = cert
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let subrev = SubkeyRevocationBuilder::new()
        .set_reason_for_revocation(ReasonForRevocation::KeyCompromised, b"")
        .unwrap()
        .build(&mut primary, &cert, &sub.role_into_subordinate(), None)
        .unwrap();
    let (revoked, _) = cert.clone().insert_packets(Some(subrev)).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    Keyring::import(tmp.path(), &armored_pub(&cert)).unwrap();
    Keyring::open(tmp.path())
        .unwrap()
        .verify_detached("sub.test", &fpr, b"m", &sig)
        .unwrap();
    Keyring::import(tmp.path(), &armored_pub(&revoked)).unwrap();
    let k = Keyring::open(tmp.path()).unwrap();
    assert!(matches!(
        k.verify_detached("sub.test", &fpr, b"m", &sig),
        Err(KeyringError::BadSignature { .. })
    ));
    assert!(!k.has_peer("sub.test"));
}

#[test]
fn generated_revocation_certificate_revokes() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let rev = std::fs::read(a.dir().join(format!("{REVOCATION_PREFIX}{fa}.asc"))).unwrap();
    assert_eq!(
        Keyring::import(b.dir(), &rev).unwrap(),
        Imported::Revocation {
            fingerprint: fa.clone()
        }
    );
    assert!(matches!(
        Keyring::open(b.dir())
            .unwrap()
            .peer_cert("site-a.test", &fa),
        Err(KeyringError::Revoked { .. })
    ));
    // Our own revocation is not imported locally.
    assert!(matches!(
        Keyring::import(a.dir(), &rev),
        Err(KeyringError::RevocationNotApplicable { .. })
    ));
}
