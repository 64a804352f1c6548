//! Unit tests of the keyring module (sequoia only; the tests with gpg
//! and sq are in tests/keyring_interop.rs).

use super::*;
use std::os::unix::fs::PermissionsExt;

use openpgp::types::ReasonForRevocation;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A keyring directory with a freshly generated own key.
fn new_site(domain: &str) -> (tempfile::TempDir, PathBuf, Keyring) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    Keyring::generate(&dir, domain).unwrap();
    let kr = Keyring::open(&dir).unwrap();
    (tmp, dir, kr)
}

/// Two sites that know each other's certificates.
fn two_sites() -> (Vec<tempfile::TempDir>, Keyring, Keyring) {
    let (ta, da, a) = new_site("site-a.test");
    let (tb, db, b) = new_site("site-b.test");
    Keyring::import(&db, a.export_public().unwrap().as_bytes()).unwrap();
    Keyring::import(&da, b.export_public().unwrap().as_bytes()).unwrap();
    let a = Keyring::open(&da).unwrap();
    let b = Keyring::open(&db).unwrap();
    (vec![ta, tb], a, b)
}

fn armored_tsk(cert: &Cert) -> Vec<u8> {
    cert.as_tsk().armored().to_vec().unwrap()
}

fn armored_pub(cert: &Cert) -> Vec<u8> {
    cert.armored().to_vec().unwrap()
}

#[test]
fn generate_creates_private_dir_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a").join("keys");
    let info = Keyring::generate(&dir, "Site-A.test").unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(SECRET_FILE)), 0o600);
    assert!(info.own);
    assert_eq!(info.user_ids, vec!["mail@site-a.test".to_string()]);
    assert_eq!(info.algo, "ed25519");
    assert_eq!(info.expires, None);
    assert_eq!(info.status, KeyStatus::Valid);
    assert!(info.can_sign);
    assert_eq!(info.fingerprint.len(), 40);
    assert!(
        info.fingerprint
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    );
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");

    let rev = dir.join(format!("{REVOCATION_PREFIX}{}.asc", info.fingerprint));
    assert_eq!(mode(&rev), 0o600);

    let kr = Keyring::open(&dir).unwrap();
    assert_eq!(kr.own_fingerprint().unwrap(), info.fingerprint);
    kr.own_domain_ok("site-a.test").unwrap();
    kr.own_domain_ok("SITE-A.TEST").unwrap();
    assert!(matches!(
        kr.own_domain_ok("site-b.test"),
        Err(KeyringError::NotOwnDomain { .. })
    ));
    assert_eq!(kr.list(), vec![info.clone()]);

    // The stored key is a v4 key, unencrypted, primary can sign.
    let cert = Cert::from_bytes(&std::fs::read(dir.join(SECRET_FILE)).unwrap()).unwrap();
    assert!(cert.is_tsk());
    assert_eq!(cert.primary_key().key().version(), 4);
    assert!(cert.primary_key().key().has_unencrypted_secret());
}

#[test]
fn generate_tightens_existing_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    Keyring::generate(&dir, "site-a.test").unwrap();
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn generate_refuses_to_overwrite() {
    let (_t, dir, kr) = new_site("site-a.test");
    let before = std::fs::read(dir.join(SECRET_FILE)).unwrap();
    let err = Keyring::generate(&dir, "site-a.test").unwrap_err();
    match &err {
        KeyringError::OwnKeyExists { existing, .. } => {
            assert_eq!(*existing, kr.own_fingerprint().unwrap())
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(err.to_string().contains("secret.asc"), "{err}");
    assert_eq!(std::fs::read(dir.join(SECRET_FILE)).unwrap(), before);
}

#[test]
fn generate_rejects_bad_domain() {
    let tmp = tempfile::tempdir().unwrap();
    for d in ["", "a b", "x@y", "<y>"] {
        assert!(matches!(
            Keyring::generate(tmp.path(), d),
            Err(KeyringError::InvalidDomain { .. })
        ));
    }
}

#[test]
fn open_missing_dir_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nope");
    let err = Keyring::open(&dir).unwrap_err();
    assert!(matches!(err, KeyringError::DirMissing { .. }));
    assert!(err.to_string().contains(&dir.display().to_string()));
}

#[test]
fn open_broken_cert_file_names_it() {
    let (_t, dir, _kr) = new_site("site-a.test");
    std::fs::create_dir_all(dir.join(CERTS_DIR)).unwrap();
    let bad = dir.join(CERTS_DIR).join("broken.asc");
    std::fs::write(&bad, b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxx\n").unwrap();
    let err = Keyring::open(&dir).unwrap_err();
    assert!(matches!(err, KeyringError::InvalidCert { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.asc"), "{err}");
}

/// Found by the `key_import` fuzz target: a signature (not a cert) in `certs/` gave an
/// error whose text, from Sequoia's grammar, spans two lines; such messages reach log lines
/// and terminals, also for data a peer sent. Every keyring error is one clean line.
#[test]
fn errors_about_foreign_data_are_one_line() {
    let (_t, dir, kr) = new_site("site-a.test");
    let sig = crate::audit::armor_signature(&kr.sign_detached(b"data").unwrap()).unwrap();
    std::fs::create_dir_all(dir.join(CERTS_DIR)).unwrap();
    std::fs::write(dir.join(CERTS_DIR).join("sig.asc"), &sig).unwrap();
    let open_err = Keyring::open(&dir).unwrap_err().to_string();
    let import_err = Keyring::import(&dir, b"\x99\x00\x01\xff")
        .unwrap_err()
        .to_string();
    let verify_err = kr
        .verify_detached(
            "site-a.test",
            &kr.own_fingerprint().unwrap(),
            b"data",
            b"\xc2\x01",
        )
        .unwrap_err()
        .to_string();
    for e in [open_err, import_err, verify_err] {
        assert!(!e.chars().any(char::is_control), "{e:?}");
    }
}

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

#[test]
fn import_own_tsk_vs_public_cert() {
    let (_ta, da, a) = new_site("site-a.test");
    let fa = a.own_fingerprint().unwrap();
    let tsk = std::fs::read(da.join(SECRET_FILE)).unwrap();

    // Secret key into an empty (not yet existing) dir => own key.
    let tmp = tempfile::tempdir().unwrap();
    let d2 = tmp.path().join("k2");
    assert_eq!(
        Keyring::import(&d2, &tsk).unwrap(),
        Imported::OwnSecretKey {
            fingerprint: fa.clone(),
            user_ids: vec!["mail@site-a.test".into()]
        }
    );
    assert_eq!(mode(&d2), 0o700);
    assert_eq!(mode(&d2.join(SECRET_FILE)), 0o600);
    // Same key again: fine (merge).
    assert!(matches!(
        Keyring::import(&d2, &tsk),
        Ok(Imported::OwnSecretKey { .. })
    ));
    // Binary form works as well.
    let cert = Cert::from_bytes(&tsk).unwrap();
    let binary = cert.as_tsk().to_vec().unwrap();
    assert!(matches!(
        Keyring::import(&d2, &binary),
        Ok(Imported::OwnSecretKey { .. })
    ));
    let k2 = Keyring::open(&d2).unwrap();
    assert_eq!(k2.own_fingerprint().unwrap(), fa);
    // It signs, and A verifies.
    let sig = k2.sign_detached(b"m").unwrap();
    a.verify_detached("site-a.test", &fa, b"m", &sig).unwrap();

    // A different secret key is refused.
    let (_tb, db, _b) = new_site("site-b.test");
    let other = std::fs::read(db.join(SECRET_FILE)).unwrap();
    assert!(matches!(
        Keyring::import(&d2, &other),
        Err(KeyringError::OwnKeyExists { .. })
    ));
    assert_eq!(Keyring::open(&d2).unwrap().own_fingerprint().unwrap(), fa);

    // Public cert => partner cert file.
    let public = a.export_public().unwrap();
    assert_eq!(
        Keyring::import(&db, public.as_bytes()).unwrap(),
        Imported::PartnerCert {
            fingerprint: fa.clone(),
            user_ids: vec!["mail@site-a.test".into()]
        }
    );
    let file = db.join(CERTS_DIR).join(format!("{fa}.asc"));
    assert!(file.is_file());
    assert_eq!(mode(&file), 0o600);
    assert!(
        !Cert::from_bytes(&std::fs::read(&file).unwrap())
            .unwrap()
            .is_tsk()
    );
    // Importing again merges, still one partner.
    Keyring::import(&db, public.as_bytes()).unwrap();
    let b = Keyring::open(&db).unwrap();
    assert_eq!(b.list().len(), 2);
    assert!(!b.list()[1].own);

    // The own public cert is not a partner.
    assert!(matches!(
        Keyring::import(&da, public.as_bytes()),
        Err(KeyringError::IsOwnKey { .. })
    ));
}

#[test]
fn import_rejects_junk_multiple_and_foreign_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    assert!(matches!(
        Keyring::import(d, b"hello"),
        Err(KeyringError::InvalidCert { .. })
    ));
    let (c1, _) = CertBuilder::general_purpose(Some("mail@x.test"))
        .generate()
        .unwrap();
    let (c2, _) = CertBuilder::general_purpose(Some("mail@y.test"))
        .generate()
        .unwrap();
    let both = [armored_pub(&c1), armored_pub(&c2)].concat();
    assert!(matches!(
        Keyring::import(d, &both),
        Err(KeyringError::MultipleCerts { count: 2, .. })
    ));
    let (alice, _) = CertBuilder::general_purpose(Some("Alice <alice@x.test>"))
        .generate()
        .unwrap();
    let err = Keyring::import(d, &armored_pub(&alice)).unwrap_err();
    assert!(matches!(err, KeyringError::InvalidCert { .. }), "{err:?}");
    assert!(err.to_string().contains("mail@<domain>"), "{err}");
}

#[test]
fn several_user_ids_and_signing_subkey() {
    // Certify-only primary, separate signing subkey, extra user IDs.
    let (cert, _) = CertBuilder::new()
        .add_userid("Site C relay <ops@site-c.test>")
        .add_userid("mail@site-c.test")
        .add_signing_subkey()
        .generate()
        .unwrap();
    let fc = cert.fingerprint().to_hex();
    let (_tc, dc, _) = new_site("unused.test");
    std::fs::remove_file(dc.join(SECRET_FILE)).unwrap();
    Keyring::import(&dc, &armored_tsk(&cert)).unwrap();
    let c = Keyring::open(&dc).unwrap();
    c.own_domain_ok("site-c.test").unwrap();

    let (_ta, da, _) = new_site("site-a.test");
    Keyring::import(&da, c.export_public().unwrap().as_bytes()).unwrap();
    let a = Keyring::open(&da).unwrap();

    let sig = c.sign_detached(b"payload").unwrap();
    // Made by the subkey, not the primary.
    let pile = PacketPile::from_bytes(&sig).unwrap();
    let Some(Packet::Signature(s)) = pile.children().next() else {
        panic!("no signature")
    };
    let subkey = cert.keys().subkeys().next().unwrap().key().fingerprint();
    assert!(s.issuer_fingerprints().any(|f| *f == subkey));
    a.verify_detached("site-c.test", &fc, b"payload", &sig)
        .unwrap();
    assert!(matches!(
        a.peer_cert("ops.site-c.test", &fc),
        Err(KeyringError::WrongIdentity { .. })
    ));
}

#[test]
fn export_contains_no_secret() {
    let (_t, dir, a) = new_site("site-a.test");
    let public = a.export_public().unwrap();
    assert!(public.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    assert!(!public.contains("PRIVATE"));
    let pile = PacketPile::from_bytes(public.as_bytes()).unwrap();
    assert!(pile.children().count() >= 3);
    for p in pile.children() {
        assert!(
            !matches!(p, Packet::SecretKey(_) | Packet::SecretSubkey(_)),
            "secret packet in export: {p:?}"
        );
    }
    let cert = Cert::from_bytes(public.as_bytes()).unwrap();
    assert!(!cert.is_tsk());
    assert_eq!(cert.fingerprint().to_hex(), a.own_fingerprint().unwrap());
    // ... while the file on disk does have the secret.
    let on_disk = PacketPile::from_bytes(&std::fs::read(dir.join(SECRET_FILE)).unwrap()).unwrap();
    assert!(
        on_disk
            .children()
            .any(|p| matches!(p, Packet::SecretKey(_)))
    );
}

#[test]
fn debug_shows_fingerprints_only() {
    let (_t, _d, a) = new_site("site-a.test");
    // The random temp folder name is not ours to check (it once contained "mpi").
    let dbg = format!("{a:?}").replace(&format!("{:?}", a.dir()), "<dir>");
    let fa = a.own_fingerprint().unwrap();
    assert!(dbg.contains(&fa), "{dbg}");
    assert!(dbg.len() < 400, "{dbg}");
    assert!(!dbg.to_lowercase().contains("secret"), "{dbg}");
    assert!(!dbg.contains("mpi"), "{dbg}");
}

#[test]
fn no_own_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, _) = CertBuilder::general_purpose(Some("mail@x.test"))
        .generate()
        .unwrap();
    Keyring::import(tmp.path(), &armored_pub(&c)).unwrap();
    let k = Keyring::open(tmp.path()).unwrap();
    assert!(matches!(
        k.sign_detached(b"x"),
        Err(KeyringError::NoOwnKey { .. })
    ));
    assert!(matches!(
        k.own_fingerprint(),
        Err(KeyringError::NoOwnKey { .. })
    ));
    assert!(matches!(
        k.export_public(),
        Err(KeyringError::NoOwnKey { .. })
    ));
    assert!(k.has_peer("x.test"));
}

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
fn encrypted_secret_key_is_refused() {
    let (cert, _) = CertBuilder::new()
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .add_userid("mail@site-a.test")
        .set_password(Some("hunter2".into()))
        .generate()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = Keyring::import(tmp.path(), &armored_tsk(&cert)).unwrap_err();
    assert!(
        matches!(err, KeyringError::EncryptedSecretKey { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("remove the passphrase"), "{err}");
    assert!(!tmp.path().join(SECRET_FILE).exists());
}

#[test]
fn fingerprint_formatting() {
    assert_eq!(
        format_fingerprint("0123456789abcdef0123456789ABCDEF01234567"),
        "0123 4567 89AB CDEF 0123 4567 89AB CDEF 0123 4567"
    );
    assert_eq!(format_fingerprint("0123 4567"), "0123 4567");
    assert_eq!(format_fingerprint(""), "");
    assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    assert_eq!(
        fmt_time(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723)),
        "2000-02-29 01:02:03 UTC"
    );
}

#[test]
fn keyring_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Keyring>();
    assert_send_sync::<KeyringError>();
}

#[test]
fn own_cert_handed_out_has_no_secrets() {
    let (_t, _d, a) = new_site("site-a.test");
    let fa = a.own_fingerprint().unwrap();
    assert!(!a.peer_cert("site-a.test", &fa).unwrap().is_tsk());
}

#[test]
fn control_characters_in_user_ids_are_escaped() {
    let (cert, _) = CertBuilder::new()
        .add_userid("mail@ok.test")
        .add_userid("evil\nINFO forged line")
        .add_signing_subkey()
        .generate()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    Keyring::import(tmp.path(), &armored_pub(&cert)).unwrap();
    let k = Keyring::open(tmp.path()).unwrap();
    let err = k
        .peer_cert("other.test", &cert.fingerprint().to_hex())
        .unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("evil\\nINFO"), "{msg}");
}

#[test]
fn v6_keys_work() {
    let (cert, _) = CertBuilder::new()
        .set_profile(Profile::RFC9580)
        .unwrap()
        .add_userid("mail@six.test")
        .add_signing_subkey()
        .generate()
        .unwrap();
    assert_eq!(cert.primary_key().key().version(), 6);
    let fpr = cert.fingerprint().to_hex();
    assert_eq!(fpr.len(), 64);
    let (_t, dir, _) = new_site("site-a.test");
    std::fs::remove_file(dir.join(SECRET_FILE)).unwrap();
    Keyring::import(&dir, &armored_tsk(&cert)).unwrap();
    let own = Keyring::open(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    Keyring::import(tmp.path(), own.export_public().unwrap().as_bytes()).unwrap();
    let peer = Keyring::open(tmp.path()).unwrap();
    let sig = own.sign_detached(b"v6").unwrap();
    peer.verify_detached("six.test", &fpr, b"v6", &sig).unwrap();
    assert!(matches!(
        peer.verify_detached("six.test", &fpr, b"v7", &sig),
        Err(KeyringError::BadSignature { .. })
    ));
}

/// Throughput check, run by hand: `cargo test --release -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() {
    let (_t, a, b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    let data = vec![0x5au8; 512];
    let n = 5000;
    let start = std::time::Instant::now();
    let sigs: Vec<Vec<u8>> = (0..n).map(|_| a.sign_detached(&data).unwrap()).collect();
    let sign = start.elapsed();
    let start = std::time::Instant::now();
    for s in &sigs {
        b.verify_detached("site-a.test", &fa, &data, s).unwrap();
    }
    let verify = start.elapsed();
    println!(
        "sign: {:.0}/s, verify: {:.0}/s",
        n as f64 / sign.as_secs_f64(),
        n as f64 / verify.as_secs_f64()
    );
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

#[test]
fn a_cert_naming_two_domains_counts_for_the_one_it_was_imported_for() {
    let (cert, _) = CertBuilder::new()
        .add_userid("mail@site-c.test")
        .add_userid("mail@site-a.test")
        .generate()
        .unwrap();
    let fc = cert.fingerprint().to_hex();
    let (_tb, db, _) = new_site("site-b.test");
    let err = Keyring::import(&db, &armored_pub(&cert)).unwrap_err();
    assert!(matches!(err, KeyringError::AmbiguousCert { .. }), "{err:?}");
    assert!(!db.join(CERTS_DIR).join(format!("{fc}.asc")).exists());
    let err = Keyring::import_for(&db, &armored_pub(&cert), Some("site-x.test")).unwrap_err();
    assert!(matches!(err, KeyringError::NotForPeer { .. }), "{err:?}");

    Keyring::import_for(&db, &armored_pub(&cert), Some("SITE-C.test")).unwrap();
    let binding = db.join(CERTS_DIR).join(format!("{fc}.{BINDING_EXT}"));
    assert_eq!(std::fs::read_to_string(&binding).unwrap(), "site-c.test\n");
    assert_eq!(mode(&binding), 0o600);
    let b = Keyring::open(&db).unwrap();
    b.check_bindings().unwrap();
    assert!(b.peer_cert("site-c.test", &fc).is_ok());
    assert!(matches!(
        b.peer_cert("site-a.test", &fc),
        Err(KeyringError::WrongIdentity { .. })
    ));
    assert!(!b.has_peer("site-a.test"));
    // Imported again without --peer: the binding stays.
    Keyring::import(&db, &armored_pub(&cert)).unwrap();
    assert_eq!(
        Keyring::peer_binding(&db, &fc).unwrap().as_deref(),
        Some("site-c.test")
    );

    // A keyring from before bindings: counts for neither, and check_bindings names it.
    std::fs::remove_file(&binding).unwrap();
    let b = Keyring::open(&db).unwrap();
    assert!(b.peer_cert("site-c.test", &fc).is_err());
    assert!(b.peer_cert("site-a.test", &fc).is_err());
    let err = b.check_bindings().unwrap_err();
    assert!(
        matches!(err, KeyringError::AmbiguousCertFile { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("{fc}.asc")), "{err}");
}

#[test]
fn a_one_domain_cert_is_bound_at_import_and_peer_fingerprints_restrict() {
    let (_dirs, a, mut b) = two_sites();
    let fa = a.own_fingerprint().unwrap();
    assert_eq!(
        Keyring::peer_binding(b.dir(), &fa).unwrap().as_deref(),
        Some("site-a.test")
    );
    b.check_bindings().unwrap();
    let sig = a.sign_detached(b"x").unwrap();
    b.verify_detached("site-a.test", &fa, b"x", &sig).unwrap();
    b.restrict_peer(
        "site-a.test",
        &["0123456789ABCDEF0123456789ABCDEF01234567".into()],
    )
    .unwrap();
    assert!(matches!(
        b.verify_detached("site-a.test", &fa, b"x", &sig),
        Err(KeyringError::NotListedForPeer { .. })
    ));
    assert!(!b.has_peer("site-a.test"));
    b.restrict_peer("site-a.test", &[fa.to_lowercase()])
        .unwrap();
    b.verify_detached("site-a.test", &fa, b"x", &sig).unwrap();
    assert!(b.has_peer("site-a.test"));
}
