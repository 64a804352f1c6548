//! The `key_import` target: hostile bytes into the keyring, the way `sipmail keys import`
//! and a running relay meet them.
//!
//! The first input byte picks the path; the rest is the data:
//! * 0: `Keyring::import` into an empty keyring directory (what `keys import` does);
//! * 1: `Keyring::import` into a keyring that already holds an own key and a partner cert
//!   (merges, own-key conflicts, revocations of that partner);
//! * 2: the data as a file in `certs/`, then `Keyring::open` (a keyring on disk);
//! * 3: the data as the peer's signature in `Keyring::verify_detached` (what a call does
//!   with the signature in a 200 OK or ACK).
//!
//! A bug is: a panic; an import that reports success but leaves a keyring that does not
//! open or does not list the imported key; an error or a reported user ID with control
//! characters in it (terminal or log injection through a hostile certificate); a
//! signature over other data that verifies.
//!
//! The keyring directories live under /dev/shm when it exists (import fsyncs), one per
//! process; [`cleanup`] removes them.

use sipmail::keyring::{Imported, Keyring, KeyringError};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

pub const SIPMAIL_SECRET: &str = include_str!("../seeds/key_import/sipmail-secret.asc");
pub const SIPMAIL_CERT: &str = include_str!("../seeds/key_import/sipmail-cert.asc");
pub const SQ_SECRET: &str = include_str!("../seeds/key_import/sq-secret.asc");
/// The data the fixture signature in the seeds covers.
pub const SIGNED: &[u8] = b"sipmail/1 answer signature\0fuzz";

fn base() -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    root.join(format!("sipmail-fuzz-keys-{}", std::process::id()))
}

/// Remove this process's keyring directories.
pub fn cleanup() {
    let _ = std::fs::remove_dir_all(base());
}

/// A fresh directory for one execution (emptied first).
fn fresh(name: &str) -> PathBuf {
    let d = base().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(base()).expect("creating the fuzz keyring base");
    d
}

/// The fixture keyring: own key = sq's (signing subkey), partner = sipmail's cert. Made
/// once by importing, then copied file by file for each execution.
fn populate(dir: &Path) {
    let template = base().join("template");
    if !template.join("secret.asc").is_file() {
        let _ = std::fs::remove_dir_all(&template);
        Keyring::import(&template, SQ_SECRET.as_bytes()).expect("fixture own key");
        Keyring::import(&template, SIPMAIL_CERT.as_bytes()).expect("fixture partner cert");
    }
    copy_tree(&template, dir);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the fixture keyring");
    for e in std::fs::read_dir(from)
        .expect("reading the template")
        .flatten()
    {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copying the template");
        }
    }
}

thread_local! {
    /// Opened once: the keyring for mode 3 (own key = sipmail's, to sign the seeds).
    static VERIFY_KR: RefCell<Option<(Keyring, String)>> = const { RefCell::new(None) };
}

fn with_verify_keyring<R>(f: impl FnOnce(&Keyring, &str) -> R) -> R {
    VERIFY_KR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (kr, fpr) = slot.get_or_insert_with(|| {
            let d = fresh("verify");
            Keyring::import(&d, SIPMAIL_SECRET.as_bytes()).expect("fixture own key");
            let kr = Keyring::open(&d).expect("fixture keyring");
            let fpr = kr.own_fingerprint().expect("fixture fingerprint");
            (kr, fpr)
        });
        f(kr, fpr)
    })
}

/// A genuine signature by the fixture key over [`SIGNED`], for the seeds.
pub fn fixture_signature() -> Vec<u8> {
    with_verify_keyring(|kr, _| kr.sign_detached(SIGNED).expect("fixture signature"))
}

fn clean_text(what: &str, s: &str) {
    assert!(!s.is_empty(), "{what} is empty");
    assert!(
        !s.chars().any(char::is_control),
        "{what} carries control characters: {s:?}"
    );
}

fn check_error(e: &KeyringError) {
    clean_text("error message", &e.to_string());
}

fn check_import(dir: &Path, r: Result<Imported, KeyringError>) {
    let (fpr, uids) = match &r {
        Err(e) => return check_error(e),
        Ok(Imported::OwnSecretKey {
            fingerprint,
            user_ids,
        })
        | Ok(Imported::PartnerCert {
            fingerprint,
            user_ids,
        }) => (fingerprint, user_ids.clone()),
        Ok(Imported::Revocation { fingerprint }) => (fingerprint, Vec::new()),
    };
    for u in &uids {
        assert!(!u.chars().any(char::is_control), "user ID {u:?}");
    }
    // What import accepted, open must load, and list.
    let kr = Keyring::open(dir)
        .unwrap_or_else(|e| panic!("import said {r:?}, but the keyring does not open: {e}"));
    let listed = kr.list();
    assert!(
        listed.iter().any(|k| &k.fingerprint == fpr),
        "import said {r:?}, but {fpr} is not listed"
    );
    for k in &listed {
        for u in &k.user_ids {
            assert!(!u.chars().any(char::is_control), "listed user ID {u:?}");
        }
    }
}

pub fn key_import_target(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let d = fresh("empty");
            let r = Keyring::import(&d, rest);
            check_import(&d, r);
        }
        1 => {
            let d = fresh("populated");
            populate(&d);
            let r = Keyring::import(&d, rest);
            check_import(&d, r);
        }
        2 => {
            let d = fresh("ondisk");
            let certs = d.join("certs");
            std::fs::create_dir_all(&certs).expect("certs dir");
            std::fs::write(certs.join("FUZZ.asc"), rest).expect("writing the fuzz cert");
            match Keyring::open(&d) {
                Ok(kr) => {
                    for k in kr.list() {
                        for u in &k.user_ids {
                            assert!(!u.chars().any(char::is_control), "listed user ID {u:?}");
                        }
                        let _ = kr.peer_cert("site-a.test", &k.fingerprint);
                    }
                    let _ = kr.has_peer("site-a.test");
                }
                Err(e) => check_error(&e),
            }
        }
        _ => with_verify_keyring(|kr, fpr| {
            let genuine = kr.verify_detached("site-a.test", fpr, SIGNED, rest);
            if let Err(e) = &genuine {
                check_error(e);
            }
            // Whatever verifies over SIGNED must not verify over other data.
            let other = kr.verify_detached("site-a.test", fpr, b"other data", rest);
            assert!(other.is_err(), "one signature verifies over two messages");
            if let Err(e) = &other {
                check_error(e);
            }
        }),
    }
}

/// Seeds: every fixture, armored and binary, for each mode; and a genuine signature.
pub fn seeds_key_import() -> Vec<Vec<u8>> {
    let fixtures: &[&[u8]] = &[
        include_bytes!("../seeds/key_import/sipmail-secret.asc"),
        include_bytes!("../seeds/key_import/sipmail-secret.bin"),
        include_bytes!("../seeds/key_import/sipmail-cert.asc"),
        include_bytes!("../seeds/key_import/sipmail-cert.bin"),
        include_bytes!("../seeds/key_import/sipmail-revocation.asc"),
        include_bytes!("../seeds/key_import/sipmail-revocation.bin"),
        include_bytes!("../seeds/key_import/gpg-secret.asc"),
        include_bytes!("../seeds/key_import/gpg-secret.bin"),
        include_bytes!("../seeds/key_import/gpg-cert.asc"),
        include_bytes!("../seeds/key_import/gpg-cert.bin"),
        include_bytes!("../seeds/key_import/sq-secret.asc"),
        include_bytes!("../seeds/key_import/sq-secret.bin"),
        include_bytes!("../seeds/key_import/sq-cert.asc"),
        include_bytes!("../seeds/key_import/sq-cert.bin"),
    ];
    let mut out = Vec::new();
    for mode in 0u8..3 {
        for f in fixtures {
            let mut v = vec![mode];
            v.extend_from_slice(f);
            out.push(v);
        }
    }
    let sig = fixture_signature();
    let mut v = vec![3u8];
    v.extend_from_slice(&sig);
    out.push(v);
    let mut v = vec![3u8];
    v.extend_from_slice(
        sipmail::audit::armor_signature(&sig)
            .expect("armor")
            .as_bytes(),
    );
    out.push(v);
    out
}
