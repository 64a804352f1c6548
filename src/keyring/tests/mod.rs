//! Unit tests of the keyring module (sequoia only; the tests with gpg
//! and sq are in tests/keyring_interop.rs).

use super::*;
use std::os::unix::fs::PermissionsExt;

use openpgp::types::ReasonForRevocation;

mod import;
mod sign_verify;
mod validity;

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
    let sig = armor_bytes(
        &kr.sign_detached(b"data").unwrap(),
        openpgp::armor::Kind::Signature,
    )
    .unwrap();
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
