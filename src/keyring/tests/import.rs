//! Importing own keys, partner certificates and their domain bindings.

use super::*;

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
