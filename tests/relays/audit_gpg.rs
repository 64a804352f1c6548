//! Call audit records (issue 5 item 7): two real relays make a call; each writes a record;
//! `sipmail verify-call` checks it against the keyring, and GnuPG, in a private
//! GNUPGHOME, verifies the exported signatures with nothing but the partner's certificate.
//! A tampered record fails both. This test does not skip: without gpg it fails, saying
//! how to install it.

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sipmail::demo::{TwoSites, maildir_files, sample_message, submit};
use sipmail::keyring::Keyring;
use sipmail::relay::Hooks;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn records(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for day in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(day.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "json") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_signatures_verify_with_sipmail_and_gpg_and_tampering_fails_both() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let one_call = |s: String| {
        s.replace(
            "call_idle = \"2s\"",
            "call_idle = \"2s\"\ncalls_per_peer = 1",
        )
    };
    let (a, b) = edited_configs(dir.path(), one_call, one_call);
    let (calls_a, calls_b) = (
        a.call_records.clone().expect("records are on by default"),
        b.call_records.clone().unwrap(),
    );
    assert_eq!(calls_a, a.spool.join("calls"));
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    submit(
        sites.a.smtp_addr,
        &[sample_message(0, "audit")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await);
    assert!(
        wait_until(Duration::from_secs(10), || records(&calls_a).len() == 1
            && records(&calls_b).len() == 1)
        .await,
        "one record on each side: {:?} {:?}",
        records(&calls_a),
        records(&calls_b)
    );
    let (ka, kb) = (sites.a_cfg.keyring.clone(), sites.b_cfg.keyring.clone());
    sites.stop().await;
    let rec_a = records(&calls_a).remove(0);
    let rec_b = records(&calls_b).remove(0);
    assert!(rec_a.to_str().unwrap().ends_with(".out.json"));
    assert!(rec_b.to_str().unwrap().ends_with(".in.json"));

    // The record holds no secret: nothing but public values. Spot-check that it is the
    // documented shape and small.
    let json = std::fs::read_to_string(&rec_a).unwrap();
    assert!(json.len() < 4096, "record is {} bytes", json.len());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in [
        "call_id",
        "caller_fingerprint",
        "callee_fingerprint",
        "suite",
        "sas",
    ] {
        assert!(v[key].is_string(), "{key} missing");
    }
    for key in ["key", "secret", "iv", "shared"] {
        assert!(
            !v.as_object().unwrap().keys().any(|k| k.contains(key)),
            "a field named like {key:?}"
        );
    }

    // sipmail verify-call: each side's record verifies with its own keyring, and the two
    // records agree (SAS included).
    let o = sipmail_cli(&[
        "verify-call",
        "--keyring",
        ka.to_str().unwrap(),
        rec_a.to_str().unwrap(),
        "--compare",
        rec_b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("VERIFIED"), "{}", text(&o));
    assert!(text(&o).contains("on both sides"), "{}", text(&o));
    let o = sipmail_cli(&[
        "verify-call",
        "--keyring",
        kb.to_str().unwrap(),
        rec_b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // Without a keyring nothing fails, but the signatures are not checked: exit 2.
    let o = sipmail_cli(&["verify-call", rec_a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // The auditor's procedure: export, import both relays' public certs, gpg --verify.
    let gpg = Gpg::new();
    for k in [&ka, &kb] {
        let cert = Keyring::open(k).unwrap().export_public().unwrap();
        let o = gpg.run(&["--import"], Some(cert.as_bytes()));
        assert!(o.status.success(), "{}", text(&o));
    }
    let exp = dir.path().join("export");
    let o = sipmail_cli(&[
        "verify-call",
        "--keyring",
        ka.to_str().unwrap(),
        rec_a.to_str().unwrap(),
        "--export",
        exp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "answer.data",
        "answer.sig",
        "confirm.data",
        "confirm.sig",
        "answer.cert.asc",
        "confirm.cert.asc",
    ] {
        assert!(exp.join(f).is_file(), "{f} not exported");
    }
    let fpr = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap().to_string();
    for (name, signer) in [
        ("answer", fpr(&v, "callee_fingerprint")),
        ("confirm", fpr(&v, "caller_fingerprint")),
    ] {
        let o = gpg.verify(&exp, name);
        let out = text(&o);
        assert!(o.status.success(), "gpg --verify {name}: {out}");
        // VALIDSIG <fpr> ... <sig class 00 = binary document> ... <primary fpr>
        let line = out
            .lines()
            .find(|l| l.starts_with("[GNUPG:] VALIDSIG"))
            .unwrap_or_else(|| panic!("no VALIDSIG: {out}"));
        assert!(line.contains(&signer), "{line}");
        assert_eq!(
            line.split(' ').nth(10),
            Some("00"),
            "binary signature: {line}"
        );
    }

    // Tamper: change one byte of the nonce in the signed data, consistently in T1 and T2,
    // and fix up the recorded transcript hash, so that only the signatures can tell.
    let mut t: serde_json::Value = v.clone();
    let mut answer = B64.decode(t["answer"]["data"].as_str().unwrap()).unwrap();
    let mut confirm = B64.decode(t["confirm"]["data"].as_str().unwrap()).unwrap();
    // The nonce field (tag 0x08, length 32) sits at the same transcript offset in both.
    let t2 = &confirm[b"sipmail/1 confirm signature\0".len()..];
    let nonce_at = t2.windows(3).position(|w| w == [0x08, 0x00, 0x20]).unwrap() + 3;
    answer[b"sipmail/1 answer signature\0".len() + nonce_at] ^= 0x01;
    confirm[b"sipmail/1 confirm signature\0".len() + nonce_at] ^= 0x01;
    use sha2::Digest;
    let th2 = sha2::Sha256::digest(&confirm[b"sipmail/1 confirm signature\0".len()..]);
    t["answer"]["data"] = B64.encode(&answer).into();
    t["confirm"]["data"] = B64.encode(&confirm).into();
    t["transcript_sha256"] = hex::encode(th2).into();
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
    let exp2 = dir.path().join("export-tampered");
    let o = sipmail_cli(&[
        "verify-call",
        "--keyring",
        ka.to_str().unwrap(),
        tampered.to_str().unwrap(),
        "--export",
        exp2.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("FAIL answer signature"), "{out}");
    assert!(out.contains("FAIL confirm signature"), "{out}");
    assert!(
        out.contains("ok   transcript hash"),
        "only the signatures fail: {out}"
    );
    for name in ["answer", "confirm"] {
        let o = gpg.verify(&exp2, name);
        let out = text(&o);
        assert!(!o.status.success(), "gpg accepted tampered {name}: {out}");
        assert!(out.contains("[GNUPG:] BADSIG"), "{out}");
    }

    // A record whose claims differ from what was signed fails too (suite swapped).
    let mut t = v.clone();
    t["suite"] = "aes-256-gcm".into();
    std::fs::write(&tampered, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
    let o = sipmail_cli(&[
        "verify-call",
        "--keyring",
        ka.to_str().unwrap(),
        tampered.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("FAIL record fields"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_calls_false_writes_no_record() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let off = |s: String| format!("{s}[audit]\nrecord_calls = false\n");
    let (a, b) = edited_configs(dir.path(), off, off);
    assert!(a.call_records.is_none());
    let spool_a = a.spool.clone();
    let sites = TwoSites::start_with(dir.path(), a, b, Hooks::default())
        .await
        .unwrap();
    submit(
        sites.a.smtp_addr,
        &[sample_message(0, "noaudit")],
        "bob@site-b.test",
        |_| {},
    )
    .await
    .unwrap();
    let md = sites.maildir(&sites.b_cfg);
    assert!(wait_until(Duration::from_secs(30), || maildir_files(&md).len() == 1).await);
    sites.stop().await;
    assert!(!spool_a.join("calls").exists());
}
