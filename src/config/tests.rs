//! Unit tests of the configuration: the documented example, every error naming its key.

use super::*;

pub(super) const GOOD: &str = r#"
[relay]
domain = "site-a.test"
keyring = "keyring/site-a"
spool = "var/site-a/spool"
[smtp]
listen = "127.0.0.1:2525"
allow = ["127.0.0.0/8"]
[sip]
listen = "127.0.0.1:5060"
media = "127.0.0.1"
[[peer]]
domain = "site-b.test"
sip = "sip:mail@127.0.0.1:5062"
[delivery]
maildir = "var/site-a/maildir"
"#;

#[test]
fn the_documented_example_parses() {
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert_eq!(c.domain, "site-a.test");
    assert_eq!(c.peers[0].sip[0].port, 5062);
    assert_eq!(c.peers[0].sip.len(), 1);
    assert!(matches!(c.delivery, Delivery::Maildir(_)));
    assert!(c.smtp_allow[0].contains("127.9.9.9".parse().unwrap()));
    assert!(!c.smtp_allow[0].contains("10.0.0.1".parse().unwrap()));
    assert!(c.smtp_allow[0].contains("::ffff:127.0.0.1".parse().unwrap()));
}

#[test]
fn unknown_key_names_file_and_key() {
    let text = GOOD.replace("[smtp]\n", "[smtp]\nlistne = \"x\"\n");
    let e = Config::parse("a.toml", &text).unwrap_err().to_string();
    assert!(e.starts_with("a.toml:"), "{e}");
    assert!(e.contains("listne"), "{e}");
}

#[test]
fn bad_addresses_name_the_key() {
    for (from, to, key) in [
        (
            "listen = \"127.0.0.1:2525\"",
            "listen = \"127.0.0.1\"",
            "smtp.listen",
        ),
        (
            "media = \"127.0.0.1\"",
            "media = \"localhost:1\"",
            "sip.media",
        ),
        (
            "sip = \"sip:mail@127.0.0.1:5062\"",
            "sip = \"http://x\"",
            "peer[0].sip",
        ),
        (
            "allow = [\"127.0.0.0/8\"]",
            "allow = [\"127.0.0.0/33\"]",
            "smtp.allow",
        ),
    ] {
        let e = Config::parse("a.toml", &GOOD.replace(from, to))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{e}");
        assert!(e.starts_with("a.toml: "), "{e}");
    }
}

#[test]
fn sip_limits_default_and_override() {
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert_eq!(c.sip_limits, SipLimits::default());
    assert_eq!(c.sip_limits.invite_rate, 20.0);
    let text = GOOD.replace(
        "media = \"127.0.0.1\"\n",
        "media = \"127.0.0.1\"\ninvite_rate = 5\nmax_pending_total = 10\ntcp_half_open = \"3s\"\n",
    );
    let c = Config::parse("a.toml", &text).unwrap();
    assert_eq!(c.sip_limits.invite_rate, 5.0);
    assert_eq!(c.sip_limits.max_pending_total, 10);
    assert_eq!(c.sip_limits.tcp_half_open, Duration::from_secs(3));
    for (line, key) in [
        ("max_message_size = 100", "sip.max_message_size"),
        ("max_message_size = 70000", "sip.max_message_size"),
        ("invite_rate = -1", "sip.invite_rate"),
        ("max_pending_per_source = 0", "sip.max_pending_per_source"),
        ("tcp_idle = \"0s\"", "sip.tcp_idle"),
    ] {
        let text = GOOD.replace(
            "media = \"127.0.0.1\"\n",
            &format!("media = \"127.0.0.1\"\n{line}\n"),
        );
        let e = Config::parse("a.toml", &text).unwrap_err().to_string();
        assert!(e.contains(key), "{line}: {e}");
    }
}

#[test]
fn trust_policies_parse_and_psk_files_are_checked() {
    use std::os::unix::fs::PermissionsExt;
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert!(matches!(c.peers[0].trust, Trust::Signed));
    assert_eq!(c.peers[0].continuity, ContinuityPolicy::Warn);
    let with = |extra: &str| {
        GOOD.replace(
            "sip = \"sip:mail@127.0.0.1:5062\"\n",
            &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{extra}\n"),
        )
    };
    let c = Config::parse(
        "a.toml",
        &with("trust = \"opportunistic\"\ncontinuity = \"require\""),
    )
    .unwrap();
    assert!(matches!(c.peers[0].trust, Trust::Opportunistic));
    assert_eq!(c.peers[0].continuity, ContinuityPolicy::Require);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("psk");
    // Bytes 0x00..0x1f in base64 (the PROTOCOL.md vector's key).
    std::fs::write(&f, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let psk_line = format!("trust = \"psk\"\npsk_file = \"{}\"", f.display());
    let c = Config::parse("a.toml", &with(&psk_line)).unwrap();
    match &c.peers[0].trust {
        Trust::Psk(k) => {
            assert_eq!(k.as_bytes(), (0u8..32).collect::<Vec<u8>>());
            assert!(!format!("{c:?}").contains("AAECAwQF"));
        }
        other => panic!("{other:?}"),
    }
    // Readable by others: refused, naming the key.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Config::parse("a.toml", &with(&psk_line))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("peer[0].psk_file") && e.contains("chmod 600"),
        "{e}"
    );
    // Not a key: a passphrase (even a long one), hex, another length, no randomness,
    // two lines. Each refusal names the key and the file and says what to run.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (text, why) in [
        ("short\n", "not base64"),
        (
            "0123456789abcdef0123456789abcdef-long-enough\n",
            "not base64",
        ),
        (
            "correct horse battery staple and some more words\n",
            "not base64",
        ),
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
            "decodes to 48 bytes",
        ),
        (
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==\n",
            "decodes to 31 bytes",
        ),
        (
            "correcthorsebatterystaplecorrecthorsebatteg=\n",
            "does not look random",
        ),
        (
            "AAECAwQFBgcICQoLDA0O\nDxAREhMUFRYXGBkaGxwdHh8=\n",
            "not base64",
        ),
        ("", "empty"),
    ] {
        std::fs::write(&f, text).unwrap();
        let e = Config::parse("a.toml", &with(&psk_line))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(why)
                && e.contains("peer[0].psk_file")
                && e.contains(&f.display().to_string())
                && e.contains("sipmail psk generate"),
            "{text:?}: {e}"
        );
    }
    // What `sipmail psk generate` writes is taken; it never overwrites.
    let g = dir.path().join("generated.psk");
    let made = Psk::generate_file(&g).unwrap();
    assert_eq!(
        std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Psk::load(&g).unwrap().as_bytes(), made.as_bytes());
    assert!(
        Psk::generate_file(&g)
            .unwrap_err()
            .contains("already exists")
    );
    assert_eq!(Psk::load(&g).unwrap().as_bytes(), made.as_bytes());
    for (extra, key) in [
        ("trust = \"psk\"", "peer[0].psk_file"),
        ("trust = \"none\"", "peer[0].trust"),
        ("psk_file = \"/x\"", "peer[0].psk_file"),
        ("continuity = \"maybe\"", "peer[0].continuity"),
    ] {
        let e = Config::parse("a.toml", &with(extra))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

#[test]
fn peer_fingerprints_are_hex_and_named_in_errors() {
    let with = |extra: &str| {
        GOOD.replace(
            "sip = \"sip:mail@127.0.0.1:5062\"\n",
            &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{extra}\n"),
        )
    };
    let c = Config::parse(
        "a.toml",
        &with("fingerprints = [\"0x0123 4567 89ab cdef 0123 4567 89ab cdef 0123 4567\"]"),
    )
    .unwrap();
    assert_eq!(
        c.peers[0].fingerprints.as_deref(),
        Some(&["0123456789ABCDEF0123456789ABCDEF01234567".to_string()][..])
    );
    assert!(
        Config::parse("a.toml", GOOD).unwrap().peers[0]
            .fingerprints
            .is_none()
    );
    for extra in [
        "fingerprints = [\"0123\"]",
        "fingerprints = [\"XYZ3456789ABCDEF0123456789ABCDEF01234567\"]",
        "fingerprints = []",
        "trust = \"opportunistic\"\nfingerprints = [\"0123456789ABCDEF0123456789ABCDEF01234567\"]",
    ] {
        let e = Config::parse("a.toml", &with(extra))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a.toml: peer[0].fingerprints: "),
            "{extra}: {e}"
        );
    }
}

#[test]
fn peer_senders_are_normalised_and_checked() {
    let with = |line: &str| {
        GOOD.replace(
            "sip = \"sip:mail@127.0.0.1:5062\"\n",
            &format!("sip = \"sip:mail@127.0.0.1:5062\"\n{line}\n"),
        )
    };
    assert!(
        Config::parse("a.toml", GOOD).unwrap().peers[0]
            .senders
            .is_empty()
    );
    let c = Config::parse(
            "a.toml",
            &with("senders = [\"Partner.Example.\", \"bücher.test\", \"partner.example\", \"site-b.test\"]"),
        )
        .unwrap();
    assert_eq!(
        c.peers[0].senders,
        ["partner.example", "xn--bcher-kva.test"]
    );
    for (line, what) in [
        ("senders = [\"x@example.org\"]", "not a domain name"),
        ("senders = [\"[127.0.0.1]\"]", "not a domain name"),
        ("senders = [\"\"]", "not a domain name"),
        ("senders = [\"org\"]", "top-level"),
        ("senders = [\"SITE-A.test\"]", "our own relay.domain"),
        ("senders = \"example.org\"", "senders"),
    ] {
        let e = Config::parse("a.toml", &with(line))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml: "), "{e}");
        assert!(
            e.contains("peer[0].senders") || e.contains("senders"),
            "{e}"
        );
        assert!(e.contains(what), "{line}: {e}");
    }
    // Another partner's own domain is that partner's alone.
    let two = with("senders = [\"site-c.test\"]").replace(
        "[delivery]",
        "[[peer]]\ndomain = \"site-c.test\"\nsip = \"sip:mail@127.0.0.1:5064\"\n[delivery]",
    );
    let e = Config::parse("a.toml", &two).unwrap_err().to_string();
    assert!(
        e.contains("peer[0].senders") && e.contains("another [[peer]]"),
        "{e}"
    );
}

#[test]
fn durations_and_targets() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5d").unwrap(), Duration::from_secs(432000));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5y").is_err());
    let t = SipTarget::parse("sip:mail@[::1]:5070;transport=tcp").unwrap();
    assert_eq!((t.host.as_str(), t.port, t.tcp), ("::1", 5070, true));
    assert_eq!(t.to_string(), "sip:mail@[::1]:5070;transport=tcp");
    assert_eq!(SipTarget::parse("sip:mail@example.net").unwrap().port, 5060);
}

#[test]
fn sip_may_list_several_relays_tried_in_order() {
    let text = GOOD.replace(
        "sip = \"sip:mail@127.0.0.1:5062\"",
        "sip = [\"sip:mail@127.0.0.1:5062\", \"sip:mail@b2.site-b.test:5070;transport=tcp\"]",
    );
    let c = Config::parse("a.toml", &text).unwrap();
    let s: Vec<String> = c.peers[0].sip.iter().map(ToString::to_string).collect();
    assert_eq!(
        s,
        [
            "sip:mail@127.0.0.1:5062",
            "sip:mail@b2.site-b.test:5070;transport=tcp"
        ]
    );
    for (list, why) in [
        ("[]", "empty list"),
        (
            "[\"sip:mail@127.0.0.1:5062\", \"sip:mail@127.0.0.1:5062\"]",
            "listed twice",
        ),
        (
            "[\"sip:mail@127.0.0.1:5062\", \"mail@x\"]",
            "must start with sip:",
        ),
        ("5", "a SIP URI"),
    ] {
        let text = GOOD.replace(
            "sip = \"sip:mail@127.0.0.1:5062\"",
            &format!("sip = {list}"),
        );
        let e = Config::parse("a.toml", &text).unwrap_err().to_string();
        assert!(e.contains(why), "{list}: {e}");
        assert!(e.contains("peer[0]") || e.contains("sip"), "{list}: {e}");
    }
}

#[test]
fn metrics_is_off_by_default_and_loopback_unless_allowed() {
    assert_eq!(Config::parse("a.toml", GOOD).unwrap().metrics, None);
    let on = format!("{GOOD}[metrics]\nlisten = \"127.0.0.1:9725\"\n");
    let m = Config::parse("a.toml", &on).unwrap().metrics.unwrap();
    assert_eq!(m.listen, "127.0.0.1:9725".parse().unwrap());
    assert!(!m.allow_remote);
    let v6 = format!("{GOOD}[metrics]\nlisten = \"[::1]:9725\"\n");
    assert!(Config::parse("a.toml", &v6).unwrap().metrics.is_some());
    // Anywhere else is refused unless asked for, with the key and the way out named.
    for addr in ["0.0.0.0:9725", "192.0.2.7:9725", "[::]:9725"] {
        let remote = format!("{GOOD}[metrics]\nlisten = \"{addr}\"\n");
        let e = Config::parse("a.toml", &remote).unwrap_err().to_string();
        assert!(e.starts_with("a.toml: metrics.listen: "), "{e}");
        assert!(e.contains("not a loopback address"), "{e}");
        assert!(e.contains("allow_remote = true"), "{e}");
        let allowed = format!("{remote}allow_remote = true\n");
        let m = Config::parse("a.toml", &allowed).unwrap().metrics.unwrap();
        assert!(m.allow_remote);
    }
    let bad = format!("{GOOD}[metrics]\nlisten = \"localhost\"\n");
    let e = Config::parse("a.toml", &bad).unwrap_err().to_string();
    assert!(e.contains("metrics.listen"), "{e}");
    let missing = format!("{GOOD}[metrics]\nallow_remote = true\n");
    let e = Config::parse("a.toml", &missing).unwrap_err().to_string();
    assert!(e.contains("listen"), "{e}");
}

#[test]
fn media_ports_and_advertise_parse_and_bad_ones_name_the_key() {
    let with = |lines: &str| {
        GOOD.replace(
            "media = \"127.0.0.1\"\n",
            &format!("media = \"127.0.0.1\"\n{lines}\n"),
        )
    };
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert_eq!((c.media_ports, c.advertise), (None, None));
    let c = Config::parse(
        "a.toml",
        &with("media_ports = \"40000-40100\"\nadvertise = \"203.0.113.5\""),
    )
    .unwrap();
    assert_eq!(
        c.media_ports,
        Some(PortRange {
            first: 40000,
            last: 40100
        })
    );
    let adv = c.advertise.unwrap();
    assert_eq!(adv.sip_addr(c.sip_listen).to_string(), "203.0.113.5:5060");
    let c = Config::parse("a.toml", &with("advertise = \"[2001:db8::5]:5070\"")).unwrap();
    assert_eq!(
        c.advertise.unwrap().sip_addr(c.sip_listen).to_string(),
        "[2001:db8::5]:5070"
    );
    for (line, key) in [
        ("media_ports = \"40100-40000\"", "sip.media_ports"),
        ("media_ports = \"0-10\"", "sip.media_ports"),
        ("media_ports = \"40000\"", "sip.media_ports"),
        ("media_ports = \"40000-70000\"", "sip.media_ports"),
        ("advertise = \"nat.example\"", "sip.advertise"),
        ("advertise = \"0.0.0.0\"", "sip.advertise"),
        ("advertise = \"203.0.113.5:0\"", "sip.advertise"),
    ] {
        let e = Config::parse("a.toml", &with(line))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{line}: {e}");
    }
    // The SIP port is picked at start: advertise cannot borrow it.
    let any_port = with("advertise = \"203.0.113.5\"").replace("127.0.0.1:5060", "127.0.0.1:0");
    let e = Config::parse("a.toml", &any_port).unwrap_err().to_string();
    assert!(
        e.contains("sip.advertise") && e.contains("needs a port"),
        "{e}"
    );
    assert!(
        Config::parse(
            "a.toml",
            &any_port.replace("203.0.113.5\"", "203.0.113.5:5060\"")
        )
        .is_ok()
    );
}

#[test]
fn dns_discovery_and_sip_dns_parse_and_their_errors_name_the_key() {
    // A [[peer]] located by DNS with its key from DNS, and discovery of others.
    let text = GOOD.replace(
        "sip = \"sip:mail@127.0.0.1:5062\"",
        "sip = \"dns\"\ntrust = \"dnssec\"",
    ) + "[dns]\nresolver = \"127.0.0.1:53\"\ntimeout = \"3s\"\n[discovery]\ndomains = [\"partner.test\", \"*\"]\n";
    let c = Config::parse("a.toml", &text).unwrap();
    assert!(c.peers[0].dns && matches!(c.peers[0].trust, Trust::Dnssec));
    assert!(
        c.peers[0].sip.is_empty(),
        "sip = \"dns\" has no static target"
    );
    assert_eq!(c.dns.as_ref().unwrap().timeout, Duration::from_secs(3));
    assert!(c.discovery.as_ref().unwrap().allows("x.example"));
    assert_eq!(
        c.discovery.as_ref().unwrap().insecure,
        crate::dns::InsecureKeys::Refuse,
        "insecure keys are refused unless the operator says otherwise"
    );
    for (extra, key, says) in [
        (
            "[dns]\nresolver = \"192.0.2.53:53\"",
            "dns.resolver",
            "not a loopback address",
        ),
        (
            "[dns]\nresolver = \"localhost\"",
            "dns.resolver",
            "address:port",
        ),
        (
            "[dns]\nresolver = \"127.0.0.1:53\"\ntimeout = \"0s\"",
            "dns.timeout",
            "between",
        ),
        (
            "[discovery]\ndomains = [\"*\"]",
            "discovery",
            "needs a [dns]",
        ),
        (
            "[dns]\nresolver = \"127.0.0.1:53\"\n[discovery]\ndomains = []",
            "discovery.domains",
            "discovers nothing",
        ),
        (
            "[dns]\nresolver = \"127.0.0.1:53\"\n[discovery]\ndomains = [\"site-a.test\"]",
            "discovery.domains",
            "our own",
        ),
        (
            "[dns]\nresolver = \"127.0.0.1:53\"\n[discovery]\ndomains = [\"*\"]\ntrust = \"opportunistic\"",
            "discovery.trust",
            "not supported",
        ),
        (
            "[dns]\nresolver = \"127.0.0.1:53\"\n[discovery]\ndomains = [\"*\"]\ninsecure = \"trust\"",
            "discovery.insecure",
            "\"refuse\"",
        ),
    ] {
        let e = Config::parse("a.toml", &(GOOD.to_string() + extra + "\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(says), "{extra}: {e}");
    }
    // A non-loopback resolver on a path the operator declares protected.
    assert!(
        Config::parse(
            "a.toml",
            &(GOOD.to_string() + "[dns]\nresolver = \"192.0.2.53:53\"\ntrusted_path = true\n")
        )
        .is_ok()
    );
    // sip = "dns" without [dns].
    let e = Config::parse(
        "a.toml",
        &GOOD.replace("sip = \"sip:mail@127.0.0.1:5062\"", "sip = \"dns\""),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("peer[0]") && e.contains("[dns]"), "{e}");
}

#[test]
fn resend_hold_defaults_to_an_hour_and_must_be_shorter_than_max_age() {
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert_eq!(c.queue.resend_hold, Duration::from_secs(3600));
    let text = format!("{GOOD}[queue]\nresend_hold = \"10m\"\n");
    let c = Config::parse("a.toml", &text).unwrap();
    assert_eq!(c.queue.resend_hold, Duration::from_secs(600));
    let text = format!("{GOOD}[queue]\nresend_hold = \"6d\"\n");
    let e = Config::parse("a.toml", &text).unwrap_err().to_string();
    assert!(
        e.contains("queue.resend_hold") && e.contains("max_age"),
        "{e}"
    );
}

#[test]
fn spare_files_default_to_what_free_keeps_and_cannot_exceed_it() {
    let c = Config::parse("a.toml", GOOD).unwrap();
    assert_eq!(c.queue.spare_files, 1024);
    let c = Config::parse("a.toml", &format!("{GOOD}[queue]\nspare_files = 0\n")).unwrap();
    assert_eq!(c.queue.spare_files, 0);
    let text = format!("{GOOD}[queue]\nspare_files = 1025\n");
    let e = Config::parse("a.toml", &text).unwrap_err().to_string();
    assert!(
        e.contains("queue.spare_files") && e.contains("at most 1024"),
        "{e}"
    );
    let text = format!("{GOOD}[queue]\nspare_files = -1\n");
    let e = Config::parse("a.toml", &text).unwrap_err().to_string();
    assert!(e.contains("spare_files"), "{e}");
}
