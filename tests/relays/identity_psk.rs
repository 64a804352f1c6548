//! Issue 11, item 5: a PSK is a key, not a password. Against real relays on loopback.
//!
//! The callee answers any INVITE that names a psk peer with `HMAC(psk, context || T1)`
//! before the caller has proved anything (the answer must authenticate the callee, and it
//! is the first message the callee sends). Anyone can therefore collect one MAC over a
//! transcript they know entirely and test guesses offline. These tests run that attack:
//! with a passphrase-like file the relay must refuse to start; with a generated key the
//! dictionary must not find it, and the same attack code must find the key once the test
//! puts the real key into the list (so the attack is shown to work).

use crate::common::*;
use sipmail::config::Config;
use sipmail::demo::{TwoSites, free_port, maildir_files, make_keys, site_config};
use sipmail::handshake::sdp;
use sipmail::handshake::{
    ANSWER_SIG_CONTEXT, AuthMode, CallContext, CallerAwaitAnswer, Suite, Transcript,
};
use sipmail::relay::Hooks;
use sipmail::sip::{Endpoint, EndpointConfig, Method, Request, Transport};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// The words a 3-word passphrase is made of, as in the report.
const WORDS: &[&str] = &[
    "correct", "horse", "battery", "staple", "mail", "relay", "partner", "secret",
];
/// 32 bytes (the old minimum), made of four dictionary words.
const PASSPHRASE: &str = "partner-battery-secret-staple-ok";

fn write_psk(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn with_psk(cfg: String, file: &Path) -> String {
    cfg.replace(
        "\n[delivery]",
        &format!(
            "\ntrust = \"psk\"\npsk_file = \"{}\"\n[delivery]",
            file.display()
        ),
    )
}

/// The two test-bed configs (A and B), both with trust = "psk" and the file `psk_content`.
fn psk_configs(dir: &Path, psk_content: &str) -> (String, String) {
    make_keys(dir).unwrap();
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let fa = write_psk(dir, "a.psk", psk_content);
    let fb = write_psk(dir, "b.psk", psk_content);
    (
        with_psk(site_config(dir, "site-a", "site-b", pa, pb), &fa),
        with_psk(site_config(dir, "site-b", "site-a", pb, pa), &fb),
    )
}

/// The attacker's tool, part 1: one INVITE to B naming site-a.test (a psk peer). No key,
/// no secret: the attacker makes up its own nonce and commitment. Returns B's status and,
/// on a 200 OK, the data B's MAC covers and the MAC.
async fn collect_answer_mac(b_sip: SocketAddr) -> (u16, Option<(Vec<u8>, Vec<u8>)>) {
    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        EndpointConfig {
            t1: Duration::from_millis(100),
            ..EndpointConfig::default()
        },
    )
    .await
    .unwrap()
    .0;
    let caller = CallerAwaitAnswer::new(
        [5; 32],
        [6; 32],
        vec![Suite::ChaCha20Poly1305],
        vec![0x42; 20],
    )
    .with_auth(AuthMode::Psk, vec![]);
    let call_id = format!("{}@attacker", sipmail::sip::random_hex(8));
    let mut r = Request::new(Method::Invite, "sip:mail@site-b.test".to_string());
    r.headers.push("From", "<sip:mail@site-a.test>;tag=evil1");
    r.headers.push("To", "<sip:mail@site-b.test>");
    r.headers.push("Call-ID", call_id.clone());
    r.headers.push("CSeq", "1 INVITE");
    r.headers.push("Contact", "<sip:mail@127.0.0.1>");
    r.headers.push("Content-Type", "application/sdp");
    r.body = sdp::encode_offer(caller.offer(), 1, "127.0.0.1".parse().unwrap());
    let resp = ep.request(r, b_sip, Transport::Udp).await.unwrap();
    if resp.status != 200 {
        return (resp.status, None);
    }
    let to_tag = resp.headers.to().unwrap().tag().unwrap().to_string();
    let answer = sdp::decode_answer(&resp.body).unwrap();
    // An ACK with no confirm: B hangs up now instead of waiting 32 s for one.
    let mut ack = Request::new(Method::Ack, "sip:mail@site-b.test".to_string());
    ack.headers.push("From", "<sip:mail@site-a.test>;tag=evil1");
    ack.headers
        .push("To", resp.headers.get("To").unwrap_or_default().to_string());
    ack.headers.push("Call-ID", call_id.clone());
    ack.headers.push("CSeq", "1 ACK");
    let _ = ep.send_ack(ack, b_sip, Transport::Udp).await;
    let ctx = CallContext {
        call_id,
        from_tag: "evil1".into(),
        to_tag,
        caller: "mail@site-a.test".into(),
        callee: "mail@site-b.test".into(),
    };
    // Everything in T1 was on the wire or chosen by the attacker.
    let t1 = Transcript::t1(&ctx, caller.offer(), &answer).unwrap();
    let mut data = ANSWER_SIG_CONTEXT.to_vec();
    data.extend_from_slice(t1.as_bytes());
    (200, Some((data, answer.signature.clone())))
}

/// The key a relay would take from a PSK file's text: the raw text (trailing white space
/// removed), and the base64 decoding of it if it has one. The attacker tries both.
fn key_candidates(file_text: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let t = file_text.trim_end();
    let mut v = vec![t.as_bytes().to_vec()];
    if let Ok(k) = base64::engine::general_purpose::STANDARD.decode(t) {
        v.push(k);
    }
    v
}

/// The attacker's tool, part 2: offline, test every guess against the MAC. Returns the
/// guessed file text that matches.
fn crack(data: &[u8], mac: &[u8], guesses: &[String]) -> Option<String> {
    use hmac::{KeyInit, Mac};
    for g in guesses {
        for key in key_candidates(g) {
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
            m.update(data);
            if m.verify_slice(mac).is_ok() {
                return Some(g.clone());
            }
        }
    }
    None
}

/// Every 3- and 4-word combination of WORDS joined by '-' (4,608 guesses), the
/// passphrase among them.
fn dictionary() -> Vec<String> {
    let mut v = Vec::new();
    for a in WORDS {
        for b in WORDS {
            for c in WORDS {
                for d in WORDS {
                    v.push(format!("{a}-{b}-{c}-{d}-ok"));
                }
                v.push(format!("{a}-{b}-{c}"));
            }
        }
    }
    v
}

/// With a passphrase-like PSK file, the relay refuses to start, naming the file and what
/// to run. (Before the fix it started, and one 200 OK was enough to find the passphrase.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_psk_is_refused_at_start_so_the_offline_dictionary_has_nothing_to_crack() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (a_text, b_text) = psk_configs(dir.path(), &format!("{PASSPHRASE}\n"));
    assert!(dictionary().contains(&PASSPHRASE.to_string()));
    match Config::parse("b.toml", &b_text) {
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("b.toml")
                    && e.contains("peer[0].psk_file")
                    && e.contains("b.psk")
                    && e.contains("sipmail psk generate"),
                "the refusal must name the file, the key and what to run: {e}"
            );
        }
        Ok(b_cfg) => {
            // The relay takes the passphrase: run the attack to show what that costs.
            let a_cfg = Config::parse("a.toml", &a_text).unwrap();
            let sites = TwoSites::start_with(dir.path(), a_cfg, b_cfg, Hooks::default())
                .await
                .unwrap();
            let (status, got) = collect_answer_mac(sites.b.sip_addr).await;
            let cracked = got.and_then(|(data, mac)| crack(&data, &mac, &dictionary()));
            sites.stop().await;
            panic!(
                "the relay started with a passphrase PSK; B answered an unauthenticated INVITE with {status}, \
                 and the offline dictionary found the key: {cracked:?}"
            );
        }
    }
}

/// With a key made as documented (32 random bytes, base64), the dictionary finds nothing;
/// the same attack code finds the key when the test adds it to the list. B still answers
/// the unauthenticated INVITE with a MAC (the oracle exists; the key's entropy is what
/// makes it useless), and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_psk_survives_the_offline_dictionary_that_cracks_it_when_given_the_key() {
    use base64::Engine;
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap();
    let key_text = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let (a_text, b_text) = psk_configs(dir.path(), &key_text);
    let sites = TwoSites::start_with(
        dir.path(),
        Config::parse("a.toml", &a_text).unwrap(),
        Config::parse("b.toml", &b_text).unwrap(),
        Hooks::default(),
    )
    .await
    .unwrap();
    let (status, got) = collect_answer_mac(sites.b.sip_addr).await;
    assert_eq!(
        status, 200,
        "B answers a psk INVITE before the caller proves anything"
    );
    let (data, mac) = got.unwrap();
    let mut guesses = dictionary();
    assert_eq!(
        crack(&data, &mac, &guesses),
        None,
        "a guess list found a random key"
    );
    // The attack code is real: with the key in the list, it finds it.
    guesses.insert(guesses.len() / 2, key_text.clone());
    assert_eq!(crack(&data, &mac, &guesses), Some(key_text));
    assert!(maildir_files(&sites.maildir(&sites.b_cfg)).is_empty());
    sites.stop().await;
}

/// Two peers with the same PSK could each call as the other (the MAC names no one): the
/// configuration is refused, naming both peers.
#[test]
fn two_peers_sharing_a_psk_are_refused_at_load() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap();
    let key = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let f1 = write_psk(dir.path(), "b.psk", &key);
    let f2 = write_psk(dir.path(), "c.psk", &key);
    let text = with_psk(site_config(dir.path(), "site-a", "site-b", 5060, 5062), &f1).replace(
        "\n[delivery]",
        &format!(
            "\n[[peer]]\ndomain = \"site-c.test\"\nsip = \"sip:mail@127.0.0.1:5064\"\ntrust = \"psk\"\npsk_file = \"{}\"\n[delivery]",
            f2.display()
        ),
    );
    let e = Config::parse("a.toml", &text)
        .expect_err("two peers with one PSK were accepted")
        .to_string();
    assert!(
        e.contains("site-b.test") && e.contains("site-c.test") && e.contains("peer[1].psk_file"),
        "{e}"
    );
    // Each with its own key: accepted.
    let mut raw2 = [0u8; 32];
    getrandom::fill(&mut raw2).unwrap();
    write_psk(
        dir.path(),
        "c.psk",
        &base64::engine::general_purpose::STANDARD.encode(raw2),
    );
    Config::parse("a.toml", &text).unwrap();
}

/// `sipmail psk generate`: to standard output, or to a new file (mode 0600) that it never
/// overwrites; what it makes is what a psk_file must hold.
#[test]
fn psk_generate_makes_a_key_the_config_takes_and_never_overwrites() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(["psk", "generate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.len(), 45, "{text:?}");
    sipmail::config::Psk::parse("stdout", text.as_bytes()).unwrap();
    let f = dir.path().join("b.psk");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_sipmail"))
            .args(["psk", "generate", "--out"])
            .arg(&f)
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(&f).unwrap();
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&f).unwrap(), first, "the key was overwritten");
    let text = with_psk(site_config(dir.path(), "site-a", "site-b", 5060, 5062), &f);
    Config::parse("a.toml", &text).unwrap();
}
