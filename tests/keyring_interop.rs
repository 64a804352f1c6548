//! Interoperability of the keyring with real external tools: GnuPG and
//! sq. These tests do not skip: a missing tool is a failure with a
//! message saying how to install it.

use sipmail::keyring::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

fn require(tool: &str, package: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        _ => panic!("{tool} not found: apt-get install {package}"),
    }
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A throw-away GnuPG home; its agent is stopped on drop.
struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    fn new() -> Gpg {
        require("gpg", "gnupg");
        let home = tempfile::Builder::new().prefix("gpgh").tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Gpg { home }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", self.home.path())
            .args(["--batch", "--no-tty", "--no-auto-check-trustdb"])
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        check(self.run(args), &format!("gpg {}", args.join(" ")))
    }

    /// Generates a key and returns its fingerprint.
    fn generate(
        &self,
        uid: &str,
        algo: &str,
        usage: &str,
        expire: &str,
        passphrase: &str,
    ) -> String {
        let pass = format!("--passphrase={passphrase}");
        self.ok(&[
            "--pinentry-mode",
            "loopback",
            &pass,
            "--quick-generate-key",
            uid,
            algo,
            usage,
            expire,
        ]);
        self.fingerprint(uid)
    }

    fn fingerprint(&self, uid: &str) -> String {
        let out = self.ok(&["--with-colons", "--list-keys", &format!("={uid}")]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("fpr:::::::::"))
            .map(|s| s.trim_end_matches(':').to_string())
            .expect("gpg printed no fingerprint")
    }

    fn export_public(&self, fpr: &str) -> Vec<u8> {
        self.ok(&["--armor", "--export", fpr]).stdout
    }

    fn export_secret(&self, fpr: &str, passphrase: &str) -> Vec<u8> {
        let pass = format!("--passphrase={passphrase}");
        self.ok(&[
            "--pinentry-mode",
            "loopback",
            &pass,
            "--armor",
            "--export-secret-keys",
            fpr,
        ])
        .stdout
    }

    fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn keydir(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    tmp.path().join(name)
}

/// gpg makes the key; we import the secret as own key in keyring A and
/// the public cert in keyring B; A signs, B verifies.
fn gpg_key_round_trip(algo: &str, expect_algo: &str) {
    let gpg = Gpg::new();
    let fpr = gpg.generate("mail@site-a.test", algo, "cert,sign", "never", "");
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (keydir(&tmp, "a"), keydir(&tmp, "b"));

    match Keyring::import(&da, &gpg.export_secret(&fpr, "")).unwrap() {
        Imported::OwnSecretKey {
            fingerprint,
            user_ids,
        } => {
            assert_eq!(fingerprint, fpr);
            assert_eq!(user_ids, vec!["mail@site-a.test".to_string()]);
        }
        other => panic!("expected own key, got {other:?}"),
    }
    match Keyring::import(&db, &gpg.export_public(&fpr)).unwrap() {
        Imported::PartnerCert { fingerprint, .. } => assert_eq!(fingerprint, fpr),
        other => panic!("expected partner cert, got {other:?}"),
    }

    let a = Keyring::open(&da).unwrap();
    let b = Keyring::open(&db).unwrap();
    assert_eq!(a.own_fingerprint().unwrap(), fpr);
    a.own_domain_ok("site-a.test").unwrap();
    let info = &a.list()[0];
    assert_eq!(info.algo, expect_algo);
    assert!(info.can_sign);
    assert_eq!(info.expires, None);

    let data = b"MAIL FROM:<alice@site-a.test>\r\n";
    let sig = a.sign_detached(data).unwrap();
    b.verify_detached("site-a.test", &fpr, data, &sig).unwrap();
    assert!(matches!(
        b.verify_detached("site-a.test", &fpr, b"tampered", &sig),
        Err(KeyringError::BadSignature { .. })
    ));
    assert!(matches!(
        b.verify_detached("site-b.test", &fpr, data, &sig),
        Err(KeyringError::WrongIdentity { .. })
    ));

    // And gpg itself accepts the signature made with its own key.
    std::fs::write(gpg.path("d.bin"), data).unwrap();
    std::fs::write(gpg.path("d.sig"), &sig).unwrap();
    let d = gpg.path("d.bin");
    let s = gpg.path("d.sig");
    gpg.ok(&["--verify", s.to_str().unwrap(), d.to_str().unwrap()]);
}

#[test]
fn gpg_ed25519_key_round_trip() {
    gpg_key_round_trip("ed25519", "ed25519");
}

#[test]
fn gpg_rsa3072_key_round_trip() {
    gpg_key_round_trip("rsa3072", "rsa3072");
}

/// Auditor use case: gpg verifies a signature our generated key made.
#[test]
fn gpg_verifies_our_signature() {
    let gpg = Gpg::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = keydir(&tmp, "k");
    let info = Keyring::generate(&dir, "site-a.test").unwrap();
    let kr = Keyring::open(&dir).unwrap();

    let cert = gpg.path("cert.asc");
    std::fs::write(&cert, kr.export_public().unwrap()).unwrap();
    gpg.ok(&["--import", cert.to_str().unwrap()]);
    assert_eq!(gpg.fingerprint("mail@site-a.test"), info.fingerprint);

    let data_path = gpg.path("data.bin");
    let sig_path = gpg.path("sig.bin");
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&data_path, &data).unwrap();
    std::fs::write(&sig_path, kr.sign_detached(&data).unwrap()).unwrap();

    let out = gpg.run(&[
        "--status-fd",
        "1",
        "--verify",
        sig_path.to_str().unwrap(),
        data_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "gpg --verify: {stderr}");
    assert!(stderr.contains("Good signature"), "{stderr}");
    assert!(
        status.lines().any(
            |l| l.starts_with("[GNUPG:] VALIDSIG") && l.trim_end().ends_with(&info.fingerprint)
        ),
        "{status}"
    );

    // The same check fails on tampered data (so the test can fail).
    let mut bad = data.clone();
    bad[100] ^= 1;
    std::fs::write(&data_path, &bad).unwrap();
    let out = gpg.run(&[
        "--verify",
        sig_path.to_str().unwrap(),
        data_path.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BAD signature"));
}

/// gpg makes a detached signature; we verify it.
#[test]
fn we_verify_gpg_signature() {
    let gpg = Gpg::new();
    let fpr = gpg.generate("mail@site-a.test", "ed25519", "cert,sign", "never", "");
    let tmp = tempfile::tempdir().unwrap();
    let dir = keydir(&tmp, "b");
    Keyring::import(&dir, &gpg.export_public(&fpr)).unwrap();
    let kr = Keyring::open(&dir).unwrap();

    let data_path = gpg.path("data.bin");
    std::fs::write(&data_path, b"signed by gpg").unwrap();
    let sig_path = gpg.path("data.sig");
    gpg.ok(&[
        "--pinentry-mode",
        "loopback",
        "--passphrase=",
        "--local-user",
        &fpr,
        "--output",
        sig_path.to_str().unwrap(),
        "--detach-sign",
        data_path.to_str().unwrap(),
    ]);
    let sig = std::fs::read(&sig_path).unwrap();
    kr.verify_detached("site-a.test", &fpr, b"signed by gpg", &sig)
        .unwrap();
    assert!(matches!(
        kr.verify_detached("site-a.test", &fpr, b"signed by gpG", &sig),
        Err(KeyringError::BadSignature { .. })
    ));
}

#[test]
fn gpg_key_with_passphrase_is_refused() {
    let gpg = Gpg::new();
    let fpr = gpg.generate(
        "mail@site-a.test",
        "ed25519",
        "cert,sign",
        "never",
        "s3cret",
    );
    let secret = gpg.export_secret(&fpr, "s3cret");
    assert!(String::from_utf8_lossy(&secret).contains("PRIVATE KEY"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = keydir(&tmp, "a");
    let err = Keyring::import(&dir, &secret).unwrap_err();
    assert!(
        matches!(&err, KeyringError::EncryptedSecretKey { fingerprint } if *fingerprint == fpr),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("remove the passphrase"), "{msg}");
    assert!(msg.contains(&fpr), "{msg}");
    assert!(!dir.join(SECRET_FILE).exists());
}

/// gpg's revocation certificate (made at key generation, the same
/// thing `gpg --gen-revoke` prints), both as an updated cert exported
/// by gpg and as a bare revocation imported into our keyring.
#[test]
fn gpg_revoked_cert_is_refused() {
    let gpg = Gpg::new();
    let fpr = gpg.generate("mail@site-a.test", "ed25519", "cert,sign", "never", "");
    let tmp = tempfile::tempdir().unwrap();

    // Bare revocation into our keyring after the cert.
    let d1 = keydir(&tmp, "one");
    Keyring::import(&d1, &gpg.export_public(&fpr)).unwrap();
    Keyring::open(&d1)
        .unwrap()
        .peer_cert("site-a.test", &fpr)
        .unwrap();
    let rev_file = gpg
        .home
        .path()
        .join("openpgp-revocs.d")
        .join(format!("{fpr}.rev"));
    let rev = std::fs::read_to_string(&rev_file).unwrap();
    // gpg guards the block against accidental use with a leading ':'.
    let rev = rev.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
    );
    assert_eq!(
        Keyring::import(&d1, rev.as_bytes()).unwrap(),
        Imported::Revocation {
            fingerprint: fpr.clone()
        }
    );
    let k1 = Keyring::open(&d1).unwrap();
    assert!(matches!(
        k1.peer_cert("site-a.test", &fpr),
        Err(KeyringError::Revoked { .. })
    ));
    assert!(!k1.has_peer("site-a.test"));

    // gpg imports the revocation and exports the revoked cert.
    let rev_path = gpg.path("rev.asc");
    std::fs::write(&rev_path, &rev).unwrap();
    gpg.ok(&["--import", rev_path.to_str().unwrap()]);
    let d2 = keydir(&tmp, "two");
    Keyring::import(&d2, &gpg.export_public(&fpr)).unwrap();
    let k2 = Keyring::open(&d2).unwrap();
    let err = k2.peer_cert("site-a.test", &fpr).unwrap_err();
    assert!(matches!(err, KeyringError::Revoked { .. }), "{err:?}");
    assert_eq!(k2.list()[0].status, KeyStatus::Revoked);
}

#[test]
fn gpg_expiring_cert_works_until_expiry() {
    let gpg = Gpg::new();
    let fpr = gpg.generate("mail@site-a.test", "ed25519", "cert,sign", "1d", "");
    let tmp = tempfile::tempdir().unwrap();
    let dir = keydir(&tmp, "b");
    Keyring::import(&dir, &gpg.export_public(&fpr)).unwrap();
    let kr = Keyring::open(&dir).unwrap();
    kr.peer_cert("site-a.test", &fpr).unwrap();
    assert!(kr.has_peer("site-a.test"));
    let exp = kr.list()[0].expires.expect("gpg key has an expiry");
    let left = exp.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(86_400 - 600) && left <= Duration::from_secs(86_400 + 600),
        "{left:?}"
    );
}

/// gpg's own `--faked-system-time` makes a key whose 1-day validity
/// ended long ago.
#[test]
fn gpg_expired_cert_is_refused() {
    let gpg = Gpg::new();
    let ten_days_ago = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 10 * 86_400;
    let fake = format!("--faked-system-time={ten_days_ago}!");
    gpg.ok(&[
        &fake,
        "--pinentry-mode",
        "loopback",
        "--passphrase=",
        "--quick-generate-key",
        "mail@site-a.test",
        "ed25519",
        "cert,sign",
        "1d",
    ]);
    let fpr = gpg.fingerprint("mail@site-a.test");
    let tmp = tempfile::tempdir().unwrap();
    let dir = keydir(&tmp, "b");
    Keyring::import(&dir, &gpg.export_public(&fpr)).unwrap();
    let kr = Keyring::open(&dir).unwrap();
    assert!(matches!(
        kr.peer_cert("site-a.test", &fpr),
        Err(KeyringError::Expired { .. })
    ));
    assert_eq!(kr.list()[0].status, KeyStatus::Expired);
    // As own key it is refused: it cannot sign.
    let own = keydir(&tmp, "a");
    assert!(matches!(
        Keyring::import(&own, &gpg.export_secret(&fpr, "")),
        Err(KeyringError::NoSigningKey { .. })
    ));
}

/// Runs sq in `dir` and returns its output.
fn sq(dir: &Path, args: &[&str]) -> Output {
    require("sq", "sq");
    let out = Command::new("sq")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    check(out, &format!("sq {}", args.join(" ")))
}

/// sq makes a certify-only primary key with a separate signing subkey.
#[test]
fn sq_key_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    sq(
        w,
        &[
            "key",
            "generate",
            "--userid",
            "mail@site-b.test",
            "--cipher-suite",
            "cv25519",
            "--expires",
            "never",
            "--export",
            "sec.asc",
        ],
    );
    let public = sq(w, &["key", "extract-cert", "sec.asc"]).stdout;
    std::fs::write(w.join("pub.asc"), &public).unwrap();
    let secret = std::fs::read(w.join("sec.asc")).unwrap();

    let (da, db) = (w.join("site-b"), w.join("site-a"));
    let fpr = match Keyring::import(&da, &secret).unwrap() {
        Imported::OwnSecretKey { fingerprint, .. } => fingerprint,
        other => panic!("expected own key, got {other:?}"),
    };
    match Keyring::import(&db, &public).unwrap() {
        Imported::PartnerCert {
            fingerprint,
            user_ids,
        } => {
            assert_eq!(fingerprint, fpr);
            assert_eq!(user_ids, vec!["mail@site-b.test".to_string()]);
        }
        other => panic!("expected partner cert, got {other:?}"),
    }
    let own = Keyring::open(&da).unwrap();
    let peer = Keyring::open(&db).unwrap();
    own.own_domain_ok("site-b.test").unwrap();
    assert_eq!(own.own_fingerprint().unwrap(), fpr);
    // Our export is the same certificate sq extracted.
    let ours = own.export_public().unwrap();
    assert!(ours.contains("PUBLIC KEY BLOCK") && !ours.contains("PRIVATE"));

    let data = b"DATA\r\n";
    let sig = own.sign_detached(data).unwrap();
    peer.verify_detached("site-b.test", &fpr, data, &sig)
        .unwrap();
    assert!(matches!(
        peer.verify_detached("site-b.test", &fpr, b"DATA\n", &sig),
        Err(KeyringError::BadSignature { .. })
    ));

    // sq agrees (signature by the signing subkey, not the primary).
    std::fs::write(w.join("data"), data).unwrap();
    std::fs::write(w.join("data.sig"), &sig).unwrap();
    sq(
        w,
        &[
            "verify",
            "--signer-cert",
            "pub.asc",
            "--detached",
            "data.sig",
            "data",
        ],
    );

    // sq signs, we verify.
    sq(
        w,
        &[
            "sign",
            "--detached",
            "--binary",
            "--signer-key",
            "sec.asc",
            "--output",
            "sq.sig",
            "data",
        ],
    );
    let sq_sig = std::fs::read(w.join("sq.sig")).unwrap();
    peer.verify_detached("site-b.test", &fpr, data, &sq_sig)
        .unwrap();

    // sq's revocation certificate (sec.asc.rev) revokes it.
    let rev = std::fs::read(w.join("sec.asc.rev")).unwrap();
    assert_eq!(
        Keyring::import(&db, &rev).unwrap(),
        Imported::Revocation {
            fingerprint: fpr.clone()
        }
    );
    let peer = Keyring::open(&db).unwrap();
    assert!(matches!(
        peer.verify_detached("site-b.test", &fpr, data, &sig),
        Err(KeyringError::Revoked { .. })
    ));
}
