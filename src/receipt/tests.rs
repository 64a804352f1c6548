use super::dedup::{Plan, Remembered, plan, valid_queue_id};
use super::*;
use crate::keyring::Keyring;

fn sample() -> Receipt {
    Receipt {
        kind: Kind::Accepted,
        receiver: "site-b.test".into(),
        receiver_fingerprint: "55F3DA9977922CDDB0D20F384D28F647410368C3".into(),
        sender: "site-a.test".into(),
        message_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        message_size: 4,
        message_id: Some("<1@site-a.test>".into()),
        mail_from: "alice@site-a.test".into(),
        rcpts: vec!["bob@site-b.test".into(), "carol@site-b.test".into()],
        sender_queue_id: "1A23BC69D0500001DC035".into(),
        queue_id: "1A23BC69D0D000039B59B".into(),
        committed_unix_ms: 1_764_763_201_806,
        call_id: "e79504c23c711be343cd5cb727d01575@site-a.test".into(),
        transcript_sha256: "d17f79417ce55ce295483ee78c752bbdee9a95b9e2f8663031b3c3f05fa47dfe"
            .into(),
        handoffs: vec![],
    }
}

/// The canonical text, byte for byte (this is the vector in docs/PROTOCOL.md).
#[test]
fn canonical_text_is_exact() {
    let want = "sipmail-receipt/1\n\
kind: accepted\n\
receiver: site-b.test\n\
receiver-fingerprint: 55F3DA9977922CDDB0D20F384D28F647410368C3\n\
sender: site-a.test\n\
message-sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n\
message-size: 4\n\
message-id: <1@site-a.test>\n\
mail-from: <alice@site-a.test>\n\
rcpt: <bob@site-b.test>\n\
rcpt: <carol@site-b.test>\n\
sender-queue-id: 1A23BC69D0500001DC035\n\
queue-id: 1A23BC69D0D000039B59B\n\
committed-at: 2025-12-03T12:00:01Z\n\
committed-unix-ms: 1764763201806\n\
call-id: e79504c23c711be343cd5cb727d01575@site-a.test\n\
transcript-sha256: d17f79417ce55ce295483ee78c752bbdee9a95b9e2f8663031b3c3f05fa47dfe\n";
    assert_eq!(String::from_utf8(sample().encode()).unwrap(), want);
    assert_eq!(Receipt::parse(want.as_bytes()).unwrap(), sample());
    assert_eq!(
        sample().digest(),
        "b09a0c90e79f5c0e4442017169f81c0d8b9aad8b4483d2c37407fa993b490877"
    );
}

#[test]
fn round_trips_every_shape() {
    let mut r = sample();
    r.message_id = None;
    r.mail_from = String::new();
    assert_eq!(Receipt::parse(&r.encode()).unwrap(), r);
    assert!(
        String::from_utf8(r.encode())
            .unwrap()
            .contains("mail-from: <>\n")
    );

    let mut d = sample();
    d.kind = Kind::Delivered;
    d.handoffs = vec![
        Handoff {
            rcpt: "bob@site-b.test".into(),
            at_unix_ms: 1_764_763_202_000,
            to: "maildir 1764763202.M1P2Q3.site-b.test".into(),
        },
        Handoff {
            rcpt: "carol@site-b.test".into(),
            at_unix_ms: 1_764_763_203_000,
            to: "smtp 250 2.0.0 Ok: queued as 4XyZ ".into(),
        },
    ];
    let t = d.encode();
    assert!(
        String::from_utf8(t.clone())
            .unwrap()
            .contains("delivered-to: smtp 250 2.0.0 Ok: queued as 4XyZ%20\n")
    );
    assert_eq!(Receipt::parse(&t).unwrap(), d);
}

/// A value cannot add a line or a field: a Message-ID (peer-controlled) with CR LF and a
/// fake field, and a non-ASCII address, are escaped and come back byte for byte.
#[test]
fn values_cannot_inject_fields() {
    let mut r = sample();
    r.message_id = Some("<x@y>\r\nqueue-id: FORGED".into());
    r.rcpts = vec!["jörg@site-b.test".into()];
    let t = String::from_utf8(r.encode()).unwrap();
    assert!(
        t.contains("message-id: <x@y>%0D%0Aqueue-id: FORGED\n"),
        "{t}"
    );
    assert_eq!(
        t.lines().filter(|l| l.starts_with("queue-id:")).count(),
        1,
        "{t}"
    );
    assert!(t.contains("rcpt: <j%C3%B6rg@site-b.test>\n"));
    assert_eq!(Receipt::parse(t.as_bytes()).unwrap(), r);
}

/// Every other spelling of the same receipt is refused.
#[test]
fn other_spellings_are_refused() {
    let good = String::from_utf8(sample().encode()).unwrap();
    let cases = [
        good.replace("sipmail-receipt/1\n", "sipmail-receipt/2\n"),
        good.replace("message-size: 4\n", "message-size: 04\n"),
        good.replace(
            "committed-at: 2025-12-03T12:00:01Z",
            "committed-at: 2025-12-03T12:00:02Z",
        ),
        good.replace("sender: site-a.test", "sender: site%2Da.test"),
        good.replace("\n", "\r\n"),
        good.trim_end_matches('\n').to_string(),
        format!("{good}extra: 1\n"),
        good.replace("kind: accepted", "kind: maybe"),
        good.replace("rcpt: <bob@site-b.test>\nrcpt: <carol@site-b.test>\n", ""),
        good.replace("call-id: ", "call-id:"),
        good.replace(
            "mail-from: <alice@site-a.test>",
            "mail-from: alice@site-a.test",
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        let e = Receipt::parse(c.as_bytes()).unwrap_err();
        assert!(matches!(e, ReceiptError::Malformed(_)), "case {i}: {e}");
    }
    // Fields out of order.
    let swapped = good.replace(
        "receiver: site-b.test\nreceiver-fingerprint: 55F3DA9977922CDDB0D20F384D28F647410368C3\n",
        "receiver-fingerprint: 55F3DA9977922CDDB0D20F384D28F647410368C3\nreceiver: site-b.test\n",
    );
    assert!(Receipt::parse(swapped.as_bytes()).is_err());
}

fn expectations<'a>(rcpts: &'a [String], calls: &'a [CallRef<'a>]) -> AcceptedExpectations<'a> {
    AcceptedExpectations {
        receiver: "site-b.test",
        receiver_fingerprint: "55F3DA9977922CDDB0D20F384D28F647410368C3",
        sender: "site-a.test",
        message_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        message_size: 4,
        sender_queue_id: "1A23BC69D0500001DC035",
        mail_from: "alice@site-a.test",
        rcpts,
        calls,
    }
}

#[test]
fn check_binds_message_call_and_key() {
    let rcpts = vec![
        "bob@site-b.test".to_string(),
        "carol@SITE-B.test".to_string(),
    ];
    let calls = [
        CallRef {
            call_id: "earlier@site-a.test",
            transcript_sha256: "00",
        },
        CallRef {
            call_id: "e79504c23c711be343cd5cb727d01575@site-a.test",
            transcript_sha256: "d17f79417ce55ce295483ee78c752bbdee9a95b9e2f8663031b3c3f05fa47dfe",
        },
    ];
    let exp = expectations(&rcpts, &calls);
    assert_eq!(
        check_accepted(&sample(), &exp).unwrap(),
        vec!["bob@site-b.test", "carol@SITE-B.test"]
    );

    type Edit = fn(&mut Receipt);
    let wrong: [(&str, Edit); 10] = [
        ("delivered kind", |r| r.kind = Kind::Delivered),
        ("other key", |r| {
            r.receiver_fingerprint = "C8D7E6B6BB3471263FD319A6DB0FDB867EC88F26".into()
        }),
        ("other receiver", |r| r.receiver = "site-c.test".into()),
        ("other sender", |r| r.sender = "site-c.test".into()),
        ("other queue id", |r| {
            r.sender_queue_id = "1A23BC69D0500001DC036".into()
        }),
        ("other body", |r| {
            r.message_sha256 =
                "0f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()
        }),
        ("other size", |r| r.message_size = 5),
        ("other envelope sender", |r| {
            r.mail_from = "mallory@site-a.test".into()
        }),
        ("a call never placed", |r| {
            r.call_id = "replayed@site-a.test".into()
        }),
        ("right call, wrong transcript", |r| {
            r.transcript_sha256 =
                "e17f79417ce55ce295483ee78c752bbdee9a95b9e2f8663031b3c3f05fa47dfe".into()
        }),
    ];
    for (what, edit) in wrong {
        let mut r = sample();
        edit(&mut r);
        assert!(check_accepted(&r, &exp).is_err(), "{what} was accepted");
    }
    // Covering none of the recipients sent now.
    let mut r = sample();
    r.rcpts = vec!["dave@site-b.test".into()];
    assert!(matches!(
        check_accepted(&r, &exp),
        Err(ReceiptError::Mismatch(_))
    ));
    // Covering more than sent now (the original receipt of a resend): only ours count.
    let only_bob = vec!["bob@site-b.test".to_string()];
    assert_eq!(
        check_accepted(&sample(), &expectations(&only_bob, &calls)).unwrap(),
        vec!["bob@site-b.test"]
    );
}

/// Real keys: a receipt signed by site B verifies at A; one changed byte, a receipt
/// signed by another key, and a receipt claiming another signer all fail.
#[test]
fn signed_receipts_verify_and_tampering_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    Keyring::generate(&da, "site-a.test").unwrap();
    let b_info = Keyring::generate(&db, "site-b.test").unwrap();
    Keyring::generate(&dc, "site-c.test").unwrap();
    let b = Keyring::open(&db).unwrap();
    let c = Keyring::open(&dc).unwrap();
    Keyring::import(&da, b.export_public().unwrap().as_bytes()).unwrap();
    Keyring::import(&da, c.export_public().unwrap().as_bytes()).unwrap();
    let a = Keyring::open(&da).unwrap();
    let b_fpr = b_info.fingerprint.clone();

    let mut r = sample();
    r.receiver_fingerprint = b_fpr.clone();
    let (text, sig) = sign(&b, &r).unwrap();
    assert_eq!(verify(&a, "site-b.test", &b_fpr, &text, &sig).unwrap(), r);

    // Any signed byte changed (here: each byte of the size field's value in turn).
    let at = text
        .windows(15)
        .position(|w| w == b"message-size: 4")
        .unwrap()
        + 14;
    let mut t = text.clone();
    t[at] = b'5';
    assert!(matches!(
        verify(&a, "site-b.test", &b_fpr, &t, &sig),
        Err(ReceiptError::BadSignature(_))
    ));
    // Signed by C's key but claiming B's fingerprint.
    let (_, sig_c) = sign(&c, &r).unwrap();
    assert!(matches!(
        verify(&a, "site-b.test", &b_fpr, &text, &sig_c),
        Err(ReceiptError::BadSignature(_))
    ));
    // A good receipt from C, presented as B's.
    let mut rc = sample();
    rc.receiver = "site-c.test".into();
    rc.receiver_fingerprint = c.own_fingerprint().unwrap();
    let (tc, sc) = sign(&c, &rc).unwrap();
    assert!(verify(&a, "site-b.test", &b_fpr, &tc, &sc).is_err());
    // The same, naming B's fingerprint but signed by C.
    rc.receiver_fingerprint = b_fpr.clone();
    let (tc, sc) = sign(&c, &rc).unwrap();
    assert!(verify(&a, "site-c.test", &c.own_fingerprint().unwrap(), &tc, &sc).is_err());
    assert!(verify(&a, "site-b.test", &b_fpr, &tc, &sc).is_err());
}

#[test]
fn dedup_plan_splits_seen_and_new() {
    let rem = vec![
        Remembered {
            rcpt: "bob@site-b.test".into(),
            receipt_digest: "d1".into(),
        },
        Remembered {
            rcpt: "carol@site-b.test".into(),
            receipt_digest: "d1".into(),
        },
    ];
    assert_eq!(
        plan(
            &["bob@SITE-B.test".into(), "carol@site-b.test".into()],
            &rem
        ),
        Plan {
            new_rcpts: vec![],
            prior_receipts: vec!["d1".into()]
        }
    );
    assert_eq!(
        plan(&["Bob@site-b.test".into(), "dave@site-b.test".into()], &rem),
        Plan {
            new_rcpts: vec!["Bob@site-b.test".into(), "dave@site-b.test".into()],
            prior_receipts: vec![]
        }
    );
    assert!(valid_queue_id("1A23BC69D0500001DC035"));
    assert!(!valid_queue_id("../x"));
    assert!(!valid_queue_id(""));
    assert!(!valid_queue_id(&"A".repeat(65)));
    let k1 = DedupKey::new("Site-A.test", "Q1", "AB");
    assert_eq!(k1, DedupKey::new("site-a.test", "Q1", "ab"));
    assert_ne!(
        k1.file_name(),
        DedupKey::new("site-c.test", "Q1", "ab").file_name()
    );
    assert_ne!(
        k1.file_name(),
        DedupKey::new("site-a.test", "Q1", "ac").file_name()
    );
    assert_eq!(k1.file_name().len(), 64);
}

mod wire_format {
    use crate::receipt::wire::{MAX_RECEIPTS, Signed, parse_reply_lines, reply_text};

    fn two() -> Vec<Signed> {
        vec![
            Signed {
                text: vec![b'a'; 700],
                sig: vec![1, 2, 3],
            },
            Signed {
                text: b"second".to_vec(),
                sig: vec![9; 119],
            },
        ]
    }

    #[test]
    fn receipts_round_trip_through_reply_lines_under_512_octets() {
        let text = reply_text("Ok: queued as Q1", &two());
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "Ok: queued as Q1");
        assert_eq!(*lines.last().unwrap(), "XRECEIPT END 2");
        // Each line, with "250-2.0.0 " and CRLF, stays within RFC 5321's 512 octets.
        assert!(lines.iter().all(|l| l.len() + 12 <= 512));
        // 700 bytes -> 936 base64 characters -> 4 T lines for the first receipt.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("XRECEIPT 1 T "))
                .count(),
            4
        );
        assert_eq!(parse_reply_lines(lines.into_iter()).unwrap(), two());
        // A reply without the extension's lines has no receipts (and is not an error).
        assert_eq!(
            parse_reply_lines(["Ok: queued as Q1"].into_iter()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn cut_short_reordered_padded_or_oversized_reply_lines_are_refused() {
        let good = reply_text("Ok", &two());
        let lines: Vec<String> = good.split('\n').map(str::to_string).collect();
        let bad = |ls: Vec<String>, what: &str| {
            let e = parse_reply_lines(ls.iter().map(String::as_str)).unwrap_err();
            assert!(e.to_string().contains("malformed"), "{what}: {e}");
        };
        // The END line missing (cut short), or a count that does not match.
        bad(lines[..lines.len() - 1].to_vec(), "no END");
        let mut l = lines.clone();
        *l.last_mut().unwrap() = "XRECEIPT END 3".into();
        bad(l, "wrong count");
        // A line after END, a foreign line among them, receipts out of order.
        let mut l = lines.clone();
        l.push("XRECEIPT 1 T AAAA".into());
        bad(l, "after END");
        let mut l = lines.clone();
        l.insert(2, "something else".into());
        bad(l, "foreign line");
        let mut l = lines.clone();
        let n = l.len();
        l.swap(1, n - 2);
        bad(l, "out of order");
        // A T piece after S, bad base64, an empty signature, a number out of range.
        bad(
            vec![
                "XRECEIPT 1 S AAAA".into(),
                "XRECEIPT 1 T AAAA".into(),
                "XRECEIPT END 1".into(),
            ],
            "T after S",
        );
        bad(
            vec![
                "XRECEIPT 1 T !!!!".into(),
                "XRECEIPT 1 S AAAA".into(),
                "XRECEIPT END 1".into(),
            ],
            "base64",
        );
        bad(
            vec!["XRECEIPT 1 T AAAA".into(), "XRECEIPT END 1".into()],
            "no signature",
        );
        bad(
            vec![
                format!("XRECEIPT {} T AAAA", MAX_RECEIPTS + 1),
                "XRECEIPT END 1".into(),
            ],
            "too many",
        );
        // More than 16 KiB of text.
        let mut l = vec![];
        for _ in 0..80 {
            l.push(format!("XRECEIPT 1 T {}", "A".repeat(300)));
        }
        l.push("XRECEIPT 1 S AAAA".into());
        l.push("XRECEIPT END 1".into());
        bad(l, "too large");
    }
}

fn delivered_of(a: &Receipt, rcpt: &str) -> Receipt {
    let mut d = a.clone();
    d.kind = Kind::Delivered;
    d.handoffs = vec![Handoff {
        rcpt: rcpt.into(),
        at_unix_ms: a.committed_unix_ms + 40,
        to: "maildir new/1764763202.M1P2Q3.site-b.test".into(),
    }];
    d
}

/// A delivered receipt must repeat an accepted one of the same message field for field
/// and hand on only recipients it covered; every other shape is refused, naming why.
#[test]
fn a_delivered_receipt_must_repeat_an_accepted_one() {
    let a = sample();
    let good = delivered_of(&a, "bob@site-b.test");
    assert_eq!(
        check_delivered(&good, std::slice::from_ref(&a)).unwrap(),
        vec!["bob@site-b.test".to_string()]
    );
    let other = {
        let mut o = sample();
        o.queue_id = "1A23BC69D0D000039FFFF".into();
        o.sender_queue_id = "1A23BC69D0500001DFFFF".into();
        o.message_sha256 = "00".repeat(32);
        o
    };
    type Edit = fn(&mut Receipt);
    let cases: [(&str, Edit); 7] = [
        ("an accepted receipt", |d| d.kind = Kind::Accepted),
        ("another hash", |d| d.message_sha256 = "11".repeat(32)),
        ("another envelope", |d| {
            d.mail_from = "eve@site-a.test".into()
        }),
        ("another queue ID of theirs", |d| {
            d.queue_id = "1A23BC69D0D0000399999".into()
        }),
        ("another call", |d| d.call_id = "forged@site-a.test".into()),
        ("another commit time", |d| d.committed_unix_ms += 1),
        ("a recipient not accepted", |d| {
            d.handoffs[0].rcpt = "eve@site-b.test".into()
        }),
    ];
    for (what, edit) in cases {
        let mut d = good.clone();
        edit(&mut d);
        let e = check_delivered(&d, std::slice::from_ref(&a)).unwrap_err();
        assert!(!e.to_string().is_empty(), "{what}");
    }
    // The receipt of another message of ours does not cover this one.
    assert!(matches!(
        check_delivered(&good, std::slice::from_ref(&other)),
        Err(ReceiptError::OtherMessage(_))
    ));
    assert!(check_delivered(&good, &[]).is_err());
}

/// The receiver's delivered log: appended lines come back in order from the last
/// acknowledged offset, a torn last line is skipped (and closed by the next append), and
/// an acknowledgement never moves back.
#[test]
fn the_delivered_log_hands_out_unacknowledged_receipts_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    let s = |i: u8| wire::Signed {
        text: format!("receipt {i}").into_bytes(),
        sig: vec![i; 3],
    };
    for i in 0..3 {
        st.append_delivered("site-a.test", &s(i)).unwrap();
    }
    st.sync_delivered("site-a.test").unwrap();
    let b = st.delivered_batch("site-a.test", 2).unwrap();
    assert_eq!(b.receipts, vec![s(0), s(1)]);
    st.ack_delivered("site-a.test", b.ends[1]).unwrap();
    // A crash mid-append leaves a torn line; the next process reads the acknowledged
    // offset back from its file.
    drop(st);
    let log = dir.path().join("receipts/delivered/site-a.test.log");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"{\"text\":\"torn").unwrap();
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    let b = st.delivered_batch("site-a.test", 16).unwrap();
    assert_eq!(b.receipts, vec![s(2)]);
    st.append_delivered("site-a.test", &s(3)).unwrap();
    let b2 = st.delivered_batch("site-a.test", 16).unwrap();
    assert_eq!(b2.receipts, vec![s(2), s(3)]);
    st.ack_delivered("site-a.test", *b2.ends.last().unwrap())
        .unwrap();
    st.ack_delivered("site-a.test", b.ends[0]).unwrap(); // an older ack: no effect
    assert!(
        st.delivered_batch("site-a.test", 16)
            .unwrap()
            .receipts
            .is_empty()
    );
    assert_eq!(st.delivered_log("site-a.test").unwrap().len(), 4);
    // Only a domain names a log file.
    assert!(st.append_delivered("../x", &s(9)).is_err());
    assert!(st.delivered_batch("a/b", 1).is_err());
}

/// An acknowledged offset written by an older version (shorter, no padding) is read; the
/// next one is written in place and replaces all of it, and a new process reads it back.
#[test]
fn an_acknowledged_offset_is_written_in_place_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = |i: u8| wire::Signed {
        text: format!("receipt {i}").into_bytes(),
        sig: vec![i; 3],
    };
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    for i in 0..3 {
        st.append_delivered("site-a.test", &s(i)).unwrap();
    }
    let ends = st.delivered_batch("site-a.test", 16).unwrap().ends;
    drop(st);
    let acked = dir.path().join("receipts/delivered/site-a.test.acked");
    std::fs::write(&acked, ends[0].to_string()).unwrap();
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    let b = st.delivered_batch("site-a.test", 16).unwrap();
    assert_eq!(b.receipts, vec![s(1), s(2)]);
    st.ack_delivered("site-a.test", ends[1]).unwrap();
    assert_eq!(
        std::fs::read_to_string(&acked).unwrap(),
        format!("{:020}\n", ends[1])
    );
    drop(st);
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    assert_eq!(
        st.delivered_batch("site-a.test", 16).unwrap().receipts,
        vec![s(2)]
    );
    // A value that does not parse (torn by a power cut) sends everything again.
    drop(st);
    std::fs::write(&acked, b"\0\0\0").unwrap();
    let st = store::ReceiptStore::open(dir.path()).unwrap();
    assert_eq!(
        st.delivered_batch("site-a.test", 16)
            .unwrap()
            .receipts
            .len(),
        3
    );
}

/// Two calls may fetch the same delivered receipt at once (prometheus.sh saw 21 verified
/// for 20 messages): storing it must count it, and keep it, exactly once.
#[test]
fn a_delivered_receipt_stored_by_racing_calls_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let st = std::sync::Arc::new(store::ReceiptStore::open(dir.path()).unwrap());
    let signed = |t: &str| wire::Signed {
        text: t.as_bytes().to_vec(),
        sig: vec![1, 2, 3],
    };
    for round in 0..20u32 {
        let qid = format!("1A23BC69D05{round:05}DC035");
        st.add_sent(&qid, "site-b.test", "FPR", &[signed("accepted")])
            .unwrap();
        let gate = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (st, gate, qid) = (st.clone(), gate.clone(), qid.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    st.add_delivered(&qid, &[signed("delivered")]).unwrap()
                })
            })
            .collect();
        let added: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(added, 1, "round {round}: counted {added} times");
        let rec = st.sent(&qid).unwrap().unwrap();
        assert_eq!(rec.delivered.len(), 1);
        assert_eq!(rec.receipts.len(), 1);
    }
}

/// Records an older version wrote, one file each, are still found: a sent record is read,
/// gets its delivered receipt in the log, and is listed once; a duplicate record is found
/// by key and pruned by age as before. Nothing new is written as a file.
#[test]
fn records_of_the_file_per_record_layout_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let signed = |t: &str| wire::Signed {
        text: t.as_bytes().to_vec(),
        sig: vec![1, 2, 3],
    };
    let qid = "1A23BC69D0500001DC035";
    let old = store::SentRecord {
        queue_id: qid.into(),
        peer: "site-b.test".into(),
        fingerprint: "FPR".into(),
        receipts: vec![store::StoredReceipt::from_signed(&signed("accepted"))],
        delivered: vec![],
    };
    let key = DedupKey {
        sender: "site-a.test".into(),
        sender_queue_id: qid.into(),
        message_sha256: "ab".repeat(32),
    };
    let old_dedup = store::DedupRecord::new(&key);
    let receipts = dir.path().join("receipts");
    for d in ["sent", "dedup"] {
        std::fs::create_dir_all(receipts.join(d)).unwrap();
    }
    std::fs::write(
        receipts.join(format!("sent/{qid}.json")),
        serde_json::to_vec_pretty(&old).unwrap(),
    )
    .unwrap();
    let dedup_file = receipts.join(format!("dedup/{}.json", key.file_name()));
    std::fs::write(&dedup_file, serde_json::to_vec_pretty(&old_dedup).unwrap()).unwrap();

    let st = store::ReceiptStore::open(dir.path()).unwrap();
    assert_eq!(st.sent(qid).unwrap(), Some(old.clone()));
    assert_eq!(st.dedup(&key).unwrap(), Some(old_dedup.clone()));
    assert_eq!(st.add_delivered(qid, &[signed("delivered")]).unwrap(), 1);
    let listed = st.list_sent().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].delivered.len(), 1, "the log's newer record wins");
    assert_eq!(st.sent(qid).unwrap().unwrap().receipts, old.receipts);
    // No new file per record: the sent directory holds the old file and one segment.
    assert_eq!(std::fs::read_dir(receipts.join("sent")).unwrap().count(), 2);
    // Pruning by age still removes an old duplicate file.
    st.prune(u64::MAX / 2).unwrap();
    assert!(!dedup_file.exists());
    assert_eq!(st.dedup(&key).unwrap(), None);
}
