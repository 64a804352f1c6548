//! The `sipmail` command as a user runs it: keys made by us, by gpg and by sq; configs
//! that are wrong in each of the ways the first issue lists.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn sipmail(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn need(tool: &str, package: &str) {
    if Command::new(tool).arg("--version").output().is_err() {
        panic!("{tool} not found: apt-get install {package}");
    }
}

#[test]
fn keys_generate_export_import_list() {
    let d = tempfile::tempdir().unwrap();
    let o = sipmail(
        &[
            "keys",
            "generate",
            "--keyring",
            "kr/a",
            "--domain",
            "site-a.test",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("mail@site-a.test"));
    let mode = std::fs::metadata(d.path().join("kr/a/secret.asc"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let o = sipmail(&["keys", "export", "--keyring", "kr/a"], d.path());
    let armored = String::from_utf8(o.stdout).unwrap();
    assert!(armored.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    assert!(!armored.contains("PRIVATE"));
    std::fs::write(d.path().join("a.asc"), &armored).unwrap();
    assert!(
        sipmail(
            &[
                "keys",
                "generate",
                "--keyring",
                "kr/b",
                "--domain",
                "site-b.test"
            ],
            d.path()
        )
        .status
        .success()
    );
    let o = sipmail(&["keys", "import", "--keyring", "kr/b", "a.asc"], d.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("partner certificate"), "{}", text(&o));
    let o = sipmail(&["keys", "list", "--keyring", "kr/b"], d.path());
    let t = text(&o);
    assert!(
        t.contains("own")
            && t.contains("mail@site-b.test")
            && t.contains("partner")
            && t.contains("mail@site-a.test"),
        "{t}"
    );
    let o = sipmail(&["keys", "fingerprint", "--keyring", "kr/a"], d.path());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim().split(' ').count(),
        10
    );
    // A second generate must not overwrite the identity.
    let o = sipmail(
        &[
            "keys",
            "generate",
            "--keyring",
            "kr/a",
            "--domain",
            "site-a.test",
        ],
        d.path(),
    );
    assert!(!o.status.success());
}

#[test]
fn keys_import_from_gpg_and_sq() {
    need("gpg", "gnupg");
    need("sq", "sq");
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("gnupg");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let o = Command::new("gpg")
            .env("GNUPGHOME", &home)
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase="])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "gpg {args:?}: {}", text(&o));
        o.stdout
    };
    gpg(&[
        "--quick-generate-key",
        "mail@site-a.test",
        "ed25519",
        "cert,sign",
        "never",
    ]);
    std::fs::write(
        d.path().join("gpg-sec.asc"),
        gpg(&["--armor", "--export-secret-keys", "mail@site-a.test"]),
    )
    .unwrap();
    let o = sipmail(
        &["keys", "import", "--keyring", "kr/a", "gpg-sec.asc"],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("own secret key") && text(&o).contains("mail@site-a.test"),
        "{}",
        text(&o)
    );
    // sq: certify-only primary with a separate signing subkey.
    let o = Command::new("sq")
        .current_dir(d.path())
        .args([
            "key",
            "generate",
            "--userid",
            "mail@site-b.test",
            "--cipher-suite",
            "cv25519",
            "--expires",
            "never",
            "--export",
            "sq-sec.asc",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "sq: {}", text(&o));
    let o = Command::new("sq")
        .current_dir(d.path())
        .args(["key", "extract-cert", "sq-sec.asc"])
        .output()
        .unwrap();
    std::fs::write(d.path().join("sq-pub.asc"), &o.stdout).unwrap();
    let o = sipmail(
        &["keys", "import", "--keyring", "kr/a", "sq-pub.asc"],
        d.path(),
    );
    assert!(
        text(&o).contains("partner certificate") && text(&o).contains("mail@site-b.test"),
        "{}",
        text(&o)
    );
    let o = sipmail(
        &["keys", "import", "--keyring", "kr/b", "sq-sec.asc"],
        d.path(),
    );
    assert!(text(&o).contains("own secret key"), "{}", text(&o));
}

const GOOD: &str = r#"[relay]
domain = "site-a.test"
keyring = "kr/a"
spool = "var/spool"
[smtp]
listen = "127.0.0.1:0"
allow = ["127.0.0.0/8"]
[sip]
listen = "127.0.0.1:0"
media = "127.0.0.1"
[[peer]]
domain = "site-b.test"
sip = "sip:mail@127.0.0.1:5062"
"#;

#[test]
fn bad_configs_name_the_file_the_key_and_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let check = |name: &str, cfg: &str, expect: &[&str]| {
        std::fs::write(d.path().join(name), cfg).unwrap();
        let o = sipmail(&["check-config", "--config", name], d.path());
        assert!(!o.status.success(), "{name} was accepted");
        let t = text(&o);
        assert!(t.contains(name), "{name}: file not named: {t}");
        for e in expect {
            assert!(t.contains(e), "{name}: {e:?} not in: {t}");
        }
        // `run` refuses the same config with the same message.
        let o = sipmail(&["run", "--config", name], d.path());
        assert!(!o.status.success());
    };
    check(
        "unknown.toml",
        &GOOD.replace("[sip]\n", "[sip]\nlisten_udp = \"x\"\n"),
        &["listen_udp"],
    );
    check(
        "addr.toml",
        &GOOD.replace(
            "listen = \"127.0.0.1:0\"\nallow",
            "listen = \"127.0.0.1:99999\"\nallow",
        ),
        &["smtp.listen", "99999"],
    );
    check(
        "peer-uri.toml",
        &GOOD.replace("sip:mail@127.0.0.1:5062", "mail@127.0.0.1"),
        &["peer[0].sip"],
    );
    check(
        "no-keyring.toml",
        GOOD,
        &["relay.keyring", "kr/a", "keys generate"],
    );
    assert!(
        sipmail(
            &[
                "keys",
                "generate",
                "--keyring",
                "kr/a",
                "--domain",
                "site-a.test"
            ],
            d.path()
        )
        .status
        .success()
    );
    check(
        "no-peer-cert.toml",
        GOOD,
        &["peer[0]", "site-b.test", "keys import"],
    );
    check(
        "wrong-domain.toml",
        &GOOD.replace("domain = \"site-a.test\"", "domain = \"site-x.test\""),
        &["relay.keyring", "site-x.test"],
    );
    let o = sipmail(&["check-config", "--config", "missing.toml"], d.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("missing.toml"));
}

#[test]
fn help_lists_every_command() {
    let d = tempfile::tempdir().unwrap();
    let t = text(&sipmail(&["--help"], d.path()));
    for c in [
        "run",
        "check-config",
        "demo",
        "keys",
        "verify-call",
        "queue",
    ] {
        assert!(t.contains(c), "{c} missing from --help: {t}");
    }
    let t = text(&sipmail(&["keys", "--help"], d.path()));
    for c in ["generate", "export", "import", "list", "fingerprint"] {
        assert!(t.contains(c), "{c} missing from keys --help: {t}");
    }
    let t = text(&sipmail(&["queue", "--help"], d.path()));
    for c in [
        "list", "show", "retry", "delete", "hold", "release", "expire",
    ] {
        assert!(t.contains(c), "{c} missing from queue --help: {t}");
    }
    let t = text(&sipmail(&["--help"], d.path()));
    assert!(t.contains("--log-format"), "{t}");
    // A bad log format is refused by name, before anything runs.
    let o = sipmail(&["--log-format", "xml", "queue", "list"], d.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("xml"), "{}", text(&o));
}

/// `sipmail trust list | accept | reset` on a spool's state, as an operator runs them.
#[test]
fn trust_list_accept_reset() {
    use sipmail::relay::trust::TrustStore;
    let d = tempfile::tempdir().unwrap();
    let cfg = r#"[relay]
domain = "site-a.test"
keyring = "kr"
spool = "spool"
[smtp]
listen = "127.0.0.1:0"
[sip]
listen = "127.0.0.1:0"
media = "127.0.0.1"
[[peer]]
domain = "site-b.test"
sip = "sip:mail@127.0.0.1:5062"
trust = "opportunistic"
"#;
    std::fs::write(d.path().join("a.toml"), cfg).unwrap();
    let store = TrustStore::new(&d.path().join("spool"));
    let (pinned, pending) = ("AAAA1111".repeat(5), "BBBB2222".repeat(5));
    store.pin_first_use("site-b.test", &pinned).unwrap();
    // As the relay records a refused key, once its signature verified.
    store
        .record_pending("site-b.test", &pending, "192.0.2.7", 1_700_000_000)
        .unwrap();
    let o = sipmail(&["trust", "list", "--config", "a.toml"], d.path());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("trust=opportunistic") && t.contains("AAAA 1111"),
        "{t}"
    );
    assert!(t.contains("PENDING") && t.contains("BBBB 2222"), "{t}");
    assert!(t.contains("192.0.2.7") && t.contains("2023-11-14"), "{t}");
    let o = sipmail(
        &["trust", "accept", "site-x.test", &pending, "-c", "a.toml"],
        d.path(),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("not a [[peer]]"), "{}", text(&o));
    let o = sipmail(
        &["trust", "accept", "site-b.test", &pending, "-c", "a.toml"],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("now pinned BBBB 2222"), "{}", text(&o));
    let o = sipmail(
        &["trust", "accept", "site-b.test", &pending, "-c", "a.toml"],
        d.path(),
    );
    assert!(!o.status.success(), "nothing is pending any more");
    let o = sipmail(&["trust", "reset", "site-b.test", "-c", "a.toml"], d.path());
    assert!(
        o.status.success() && text(&o).contains("forgotten"),
        "{}",
        text(&o)
    );
    assert!(store.list().unwrap().is_empty());
    let o = sipmail(&["trust", "--help"], d.path());
    for sub in ["list", "accept", "reset"] {
        assert!(text(&o).contains(sub), "{}", text(&o));
    }
}
