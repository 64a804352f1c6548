//! Byte-for-byte tests of the sans-IO server session, without sockets.

use sipmail::smtp::{CloseReason, Envelope, Event, Reply, ServerConfig, ServerSession};

/// A scripted backend plus the bookkeeping of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Log {
    /// Every decision the backend was asked for, in order.
    calls: Vec<String>,
    /// Delivered messages.
    messages: Vec<(Envelope, Vec<u8>)>,
    aborted: usize,
    /// Largest DataChunk seen.
    max_chunk: usize,
    end: Option<String>,
}

fn config() -> ServerConfig {
    ServerConfig {
        hostname: "mx.test".into(),
        max_message_size: 1000,
        ..ServerConfig::default()
    }
}

/// Runs events until input is needed or the session ends. Returns false once
/// the session is over.
fn pump(s: &mut ServerSession, log: &mut Log, cur: &mut Vec<u8>) -> bool {
    loop {
        match s.next_event() {
            Event::NeedInput => return true,
            Event::MailFrom { from, params } => {
                log.calls.push(format!(
                    "MAIL {from} {:?} {}",
                    params.size, params.body_8bit
                ));
                let res = if from.contains("bad") {
                    Err(Reply::new(550, (5, 7, 1), "sender rejected"))
                } else {
                    Ok(())
                };
                s.mail_from_result(res);
            }
            Event::RcptTo { to, .. } => {
                log.calls.push(format!("RCPT {to}"));
                let res = if to.ends_with("@denied.example") {
                    Err(Reply::relay_denied("relay denied"))
                } else {
                    Ok(())
                };
                s.rcpt_to_result(res);
            }
            Event::DataStart { envelope } => {
                log.calls.push(format!("DATA {}", envelope.rcpt_to.len()));
                cur.clear();
                s.data_start_result(Ok(()));
            }
            Event::DataChunk(c) => {
                log.max_chunk = log.max_chunk.max(c.len());
                cur.extend_from_slice(c);
            }
            Event::DataEnd(env) => {
                log.messages.push((env, std::mem::take(cur)));
                let id = log.messages.len();
                s.data_end_result(Reply::ok(format!("Ok: queued as Q{id}")));
            }
            Event::DataAbort => {
                log.aborted += 1;
                cur.clear();
            }
            Event::Receipts(c) => {
                log.calls.push(format!("RECEIPTS {c:?}"));
                s.receipts_result(Reply::ok("Ok: 0 delivered receipt(s)\nXRECEIPT END 0"));
            }
            Event::Quit => {
                log.end = Some("quit".into());
                return false;
            }
            Event::Close(r) => {
                log.end = Some(format!("{r:?}"));
                return false;
            }
        }
    }
}

/// Feeds `chunks` in order; returns all output and the log.
fn run_chunks(cfg: ServerConfig, chunks: &[&[u8]]) -> (Vec<u8>, Log) {
    let mut s = ServerSession::new(cfg, "192.0.2.1");
    let mut log = Log::default();
    let mut cur = Vec::new();
    let mut out = Vec::new();
    let mut alive = pump(&mut s, &mut log, &mut cur);
    out.extend(s.take_output());
    for c in chunks {
        if !alive {
            break;
        }
        s.feed(c);
        alive = pump(&mut s, &mut log, &mut cur);
        out.extend(s.take_output());
    }
    (out, log)
}

fn run(cfg: ServerConfig, input: &[u8]) -> (Vec<u8>, Log) {
    run_chunks(cfg, &[input])
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_chunks(input: &[u8], seed: u64, max: usize) -> Vec<&[u8]> {
    let mut rng = Rng(seed);
    let mut v = Vec::new();
    let mut i = 0;
    while i < input.len() {
        let n = 1 + (rng.next() as usize) % max;
        let end = (i + n).min(input.len());
        v.push(&input[i..end]);
        i = end;
    }
    v
}

/// Same output and same backend view, whatever the chunking.
fn assert_chunking_invariant(cfg: &ServerConfig, input: &[u8]) -> (Vec<u8>, Log) {
    let whole = run(cfg.clone(), input);
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let bytewise = run_chunks(cfg.clone(), &bytes);
    assert_eq!(
        String::from_utf8_lossy(&whole.0),
        String::from_utf8_lossy(&bytewise.0)
    );
    let strip = |l: &Log| {
        (
            l.calls.clone(),
            l.messages.clone(),
            l.aborted,
            l.end.clone(),
        )
    };
    assert_eq!(strip(&whole.1), strip(&bytewise.1));
    for seed in 1..=20u64 {
        for max in [2usize, 7, 64, 1500] {
            let chunks = random_chunks(input, seed * 7919 + max as u64, max);
            let r = run_chunks(cfg.clone(), &chunks);
            assert_eq!(whole.0, r.0, "seed {seed} max {max}");
            assert_eq!(strip(&whole.1), strip(&r.1), "seed {seed} max {max}");
        }
    }
    whole
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const EHLO_REPLY: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n";

#[test]
fn full_conversation_exact_bytes() {
    let input = b"EHLO client.example\r\n\
MAIL FROM:<alice@a.example> SIZE=100 BODY=8BITMIME\r\n\
RCPT TO:<bob@b.example>\r\n\
RCPT TO:<eve@denied.example>\r\n\
DATA\r\n\
Subject: hi\r\n\r\n..dot\r\nbody \xc3\xa9\r\n.\r\n\
QUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input);
    let expected = format!(
        "220 mx.test ESMTP sipmail\r\n{EHLO_REPLY}\
250 2.1.0 Ok\r\n\
250 2.1.5 Ok\r\n\
550 5.7.1 relay denied\r\n\
354 End data with <CR><LF>.<CR><LF>\r\n\
250 2.0.0 Ok: queued as Q1\r\n\
221 2.0.0 mx.test closing connection\r\n"
    );
    assert_eq!(s(&out), expected);
    assert_eq!(log.messages.len(), 1);
    let (env, body) = &log.messages[0];
    assert_eq!(
        env,
        &Envelope {
            helo: "client.example".into(),
            mail_from: "alice@a.example".into(),
            rcpt_to: vec!["bob@b.example".into()],
            body_8bit: true,
            declared_size: Some(100),
            rcpt_params: vec![Default::default()],
            ..Default::default()
        }
    );
    assert_eq!(
        body.as_slice(),
        b"Subject: hi\r\n\r\n.dot\r\nbody \xc3\xa9\r\n"
    );
    assert_eq!(log.end.as_deref(), Some("quit"));
    assert_eq!(
        log.calls,
        vec![
            "MAIL alice@a.example Some(100) true",
            "RCPT bob@b.example",
            "RCPT eve@denied.example",
            "DATA 1"
        ]
    );
}

#[test]
fn pipelined_replies_come_out_in_one_batch_in_order() {
    let mut sess = ServerSession::new(config(), "192.0.2.1");
    let greeting = sess.take_output();
    assert_eq!(s(&greeting), "220 mx.test ESMTP sipmail\r\n");
    let mut log = Log::default();
    let mut cur = Vec::new();
    sess.feed(
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@denied.example>\r\nRCPT TO:<c@x>\r\nDATA\r\n",
    );
    // Everything is processed before the session asks for input again.
    assert!(pump(&mut sess, &mut log, &mut cur));
    let batch = s(&sess.take_output());
    assert_eq!(
        batch,
        format!(
            "{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.7.1 relay denied\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        )
    );
    assert_eq!(log.calls[0], "MAIL  None false");
    // The sync point: nothing more pending until the data arrives.
    assert!(sess.pending_output().is_empty());
    sess.feed(b"x\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\nNOOP\r\n");
    assert!(!pump(&mut sess, &mut log, &mut cur));
    assert_eq!(
        s(&sess.take_output()),
        "250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 mx.test closing connection\r\n"
    );
    assert_eq!(log.messages[0].0.rcpt_to, vec!["a@x", "c@x"]);
    assert_eq!(log.messages[0].0.mail_from, "");
}

#[test]
fn events_wait_for_decisions() {
    let mut sess = ServerSession::new(config(), "192.0.2.1");
    sess.feed(b"HELO c\r\nMAIL FROM:<a@x>\r\nNOOP\r\n");
    // HELO is answered without the backend; MAIL waits for a decision and is
    // repeated until it gets one.
    for _ in 0..3 {
        match sess.next_event() {
            Event::MailFrom { from, .. } => assert_eq!(from, "a@x"),
            e => panic!("unexpected {e:?}"),
        }
    }
    sess.mail_from_result(Err(Reply::temp_failure("try later")));
    assert_eq!(sess.next_event(), Event::NeedInput);
    assert_eq!(
        s(&sess.take_output()),
        "220 mx.test ESMTP sipmail\r\n250 mx.test\r\n451 4.3.0 try later\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn dot_unstuffing_and_empty_message() {
    let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n\
..\r\n...\r\n.x\r\n..x\r\nx.\r\n. \r\n\r\n.\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n.\r\nQUIT\r\n";
    let (_, log) = assert_chunking_invariant(&config(), input);
    assert_eq!(log.messages.len(), 2);
    assert_eq!(log.messages[0].1, b".\r\n..\r\nx\r\n.x\r\nx.\r\n \r\n\r\n");
    assert_eq!(log.messages[1].1, b"");
}

#[test]
fn smuggling_variants_are_rejected_and_do_not_inject_commands() {
    let variants: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\n.\r",
        b"\r\n.\r\r\n",
        b"\r\n\n.\r\n",
        b"\r\n\r.\r\n",
        b"\r\n.\n\r\n",
    ];
    for v in variants {
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nSubject: a\r\n\r\nhello"
                .to_vec();
        input.extend_from_slice(v);
        input.extend_from_slice(
            b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\nboo\r\n.\r\nQUIT\r\n",
        );
        let (out, log) = assert_chunking_invariant(&config(), &input);
        let out = s(&out);
        assert!(
            out.ends_with(
                "354 End data with <CR><LF>.<CR><LF>\r\n\
550 5.6.11 message rejected: bare LF/CR in DATA\r\n\
221 2.0.0 mx.test closing connection\r\n"
            ),
            "variant {v:?}: {out}"
        );
        assert!(log.messages.is_empty(), "variant {v:?}");
        assert_eq!(log.aborted, 1);
        assert!(
            !log.calls
                .iter()
                .any(|c| c.contains("evil") || c.contains("victim")),
            "variant {v:?}: {:?}",
            log.calls
        );
    }
}

#[test]
fn bare_lf_anywhere_rejects_but_session_goes_on() {
    let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nline\nother\r\n.\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\ngood\r\n.\r\nQUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input);
    let out = s(&out);
    assert!(out.contains("550 5.6.11 message rejected: bare LF/CR in DATA\r\n250 2.1.0 Ok\r\n"));
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].1, b"good\r\n");
}

#[test]
fn size_limit() {
    let mut cfg = config();
    cfg.max_message_size = 20;
    // Declared too large: refused at MAIL.
    let (out, _) = run(
        cfg.clone(),
        b"EHLO c\r\nMAIL FROM:<a@x> SIZE=21\r\nQUIT\r\n",
    );
    assert!(s(&out).contains("552 5.3.4 message size exceeds fixed maximum message size\r\n221 "));
    // Exactly at the limit (18 bytes + CRLF = 20) is fine; one more is not,
    // and the reply comes only after the end of data.
    let input = b"EHLO c\r\nMAIL FROM:<a@x> SIZE=20\r\nRCPT TO:<b@y>\r\nDATA\r\n012345678901234567\r\n.\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n0123456789012345678\r\nmore\r\n.\r\nNOOP\r\nQUIT\r\n";
    let (out, log) = assert_chunking_invariant(&cfg, input);
    let out = s(&out);
    assert!(out.contains(
        "354 End data with <CR><LF>.<CR><LF>\r\n552 5.3.4 message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n221"
    ), "{out}");
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].1, b"012345678901234567\r\n");
    assert_eq!(log.aborted, 1);
}

#[test]
fn rset_mid_transaction_and_sequence_errors() {
    let input = b"MAIL FROM:<a@x>\r\n\
EHLO c\r\n\
RCPT TO:<b@y>\r\n\
DATA\r\n\
MAIL FROM:<a@x>\r\n\
MAIL FROM:<a@x>\r\n\
DATA\r\n\
RCPT TO:<b@y>\r\n\
RSET\r\n\
DATA\r\n\
RCPT TO:<b@y>\r\n\
MAIL FROM:<bad@x>\r\n\
MAIL FROM:<c@x>\r\n\
RCPT TO:<d@y>\r\n\
DATA\r\n\
m\r\n.\r\n\
QUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input);
    let expected = format!(
        "220 mx.test ESMTP sipmail\r\n\
503 5.5.1 send EHLO/HELO first\r\n\
{EHLO_REPLY}\
503 5.5.1 need MAIL command\r\n\
503 5.5.1 need MAIL command\r\n\
250 2.1.0 Ok\r\n\
503 5.5.1 nested MAIL command\r\n\
503 5.5.1 need RCPT command (no valid recipients)\r\n\
250 2.1.5 Ok\r\n\
250 2.0.0 Ok\r\n\
503 5.5.1 need MAIL command\r\n\
503 5.5.1 need MAIL command\r\n\
550 5.7.1 sender rejected\r\n\
250 2.1.0 Ok\r\n\
250 2.1.5 Ok\r\n\
354 End data with <CR><LF>.<CR><LF>\r\n\
250 2.0.0 Ok: queued as Q1\r\n\
221 2.0.0 mx.test closing connection\r\n"
    );
    assert_eq!(s(&out), expected);
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].0.mail_from, "c@x");
    assert_eq!(log.messages[0].0.rcpt_to, vec!["d@y"]);
}

#[test]
fn other_commands() {
    let mut cfg = config();
    cfg.max_errors = 100;
    let input =
        b"HELO c\r\nNOOP\r\nVRFY bob\r\nHELP\r\nFOO bar\r\nSTARTTLS\r\nAUTH PLAIN\r\nEXPN x\r\n\
noop\r\n\r\nEHLO\r\nMAIL FROM:<a@x> REQUIRETLS\r\nMAIL FROM:<a@x> SIZE=abc\r\nMAIL FROM:<a b@x>\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<x@y> RRVS=2030-01-01T00:00:00Z\r\nQUIT\r\n";
    let (out, log) = assert_chunking_invariant(&cfg, input);
    let expected = "220 mx.test ESMTP sipmail\r\n\
250 mx.test\r\n\
250 2.0.0 Ok\r\n\
252 2.5.0 cannot VRFY user, but will accept message and attempt delivery\r\n\
214 2.0.0 commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n\
500 5.5.1 command not recognized\r\n\
502 5.5.1 command not implemented\r\n\
502 5.5.1 command not implemented\r\n\
502 5.5.1 command not implemented\r\n\
250 2.0.0 Ok\r\n\
500 5.5.1 command not recognized\r\n\
501 5.5.4 syntax: EHLO domain\r\n\
555 5.5.4 unsupported parameter\r\n\
501 5.5.4 invalid parameter SIZE\r\n\
501 5.1.7 bad sender address syntax\r\n\
250 2.1.0 Ok\r\n\
250 2.1.5 Ok\r\n\
555 5.5.4 unsupported parameter\r\n\
221 2.0.0 mx.test closing connection\r\n";
    assert_eq!(s(&out), expected);
    assert!(log.calls.contains(&"RCPT postmaster".to_string()));
}

#[test]
fn line_too_long() {
    let mut input = b"EHLO c\r\nNOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'A', 5000));
    input.extend_from_slice(b"\r\nNOOP\r\n");
    // A line just under the limit (4096 including CRLF) is accepted.
    input.extend_from_slice(b"NOOP ");
    input.extend(std::iter::repeat_n(b'B', 4096 - 7));
    input.extend_from_slice(b"\r\nQUIT\r\n");
    let (out, _) = assert_chunking_invariant(&config(), &input);
    assert_eq!(
        s(&out),
        format!(
            "220 mx.test ESMTP sipmail\r\n{EHLO_REPLY}500 5.5.2 line too long\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 mx.test closing connection\r\n"
        )
    );
}

#[test]
fn max_recipients() {
    let mut cfg = config();
    cfg.max_recipients = 2;
    let (out, log) = run(
        cfg,
        b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\nRCPT TO:<3@y>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    );
    assert!(
        s(&out).contains("250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 too many recipients\r\n354 ")
    );
    assert_eq!(log.messages[0].0.rcpt_to, vec!["1@y", "2@y"]);
}

#[test]
fn too_many_errors_closes_with_421() {
    let mut cfg = config();
    cfg.max_errors = 3;
    let (out, log) = run(cfg, b"EHLO c\r\nX\r\nY\r\nZ\r\nNOOP\r\n");
    assert_eq!(
        s(&out),
        format!(
            "220 mx.test ESMTP sipmail\r\n{EHLO_REPLY}500 5.5.1 command not recognized\r\n500 5.5.1 command not recognized\r\n500 5.5.1 command not recognized\r\n421 4.7.0 mx.test error: too many errors\r\n"
        )
    );
    assert_eq!(log.end.as_deref(), Some("TooManyErrors"));
}

#[test]
fn timeout_and_eof() {
    let mut sess = ServerSession::new(config(), "192.0.2.1");
    sess.feed(b"EHLO c\r\nMAIL FROM:<a@x>\r\n");
    let mut log = Log::default();
    let mut cur = Vec::new();
    assert!(pump(&mut sess, &mut log, &mut cur));
    sess.take_output();
    sess.timeout();
    assert_eq!(sess.next_event(), Event::Close(CloseReason::Timeout));
    assert_eq!(
        s(&sess.take_output()),
        "421 4.4.2 mx.test error: timeout exceeded\r\n"
    );
    let mut sess = ServerSession::new(config(), "192.0.2.1");
    sess.eof();
    assert_eq!(sess.next_event(), Event::Close(CloseReason::ClientEof));
}

#[test]
fn large_message_streams_in_bounded_chunks() {
    let mut cfg = config();
    cfg.max_message_size = 20 * 1024 * 1024;
    let mut sess = ServerSession::new(cfg, "192.0.2.1");
    let mut log = Log::default();
    let mut cur = Vec::new();
    sess.feed(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n");
    assert!(pump(&mut sess, &mut log, &mut cur));
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let mut block = Vec::new();
    while block.len() < 64 * 1024 - line.len() {
        block.extend_from_slice(line);
    }
    let mut total = 0;
    for _ in 0..160 {
        sess.feed(&block);
        total += block.len();
        assert!(pump(&mut sess, &mut log, &mut cur));
    }
    sess.feed(b".\r\nQUIT\r\n");
    assert!(!pump(&mut sess, &mut log, &mut cur));
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].1.len(), total);
    assert!(log.max_chunk <= block.len(), "{}", log.max_chunk);
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng(42);
    let pieces: &[&[u8]] = &[
        b"EHLO a\r\n",
        b"HELO a\r\n",
        b"MAIL FROM:<a@b> SIZE=5\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<c@d>\r\n",
        b"DATA\r\n",
        b".\r\n",
        b"\r\n.\r\n",
        b"\r",
        b"\n",
        b".",
        b"RSET\r\n",
        b"QUIT\r\n",
        b"\xff\xfe\x00",
        b"NOOP",
        b"MAIL FROM:<\xc3\xa9@x>\r\n",
        b"RCPT TO:<",
        "MAIL FROM:<a@x> SIZE\u{e9}=1 BODY=\u{e9}\r\n".as_bytes(),
        b"RCPT TO:<postmaster>\r\n",
        b"BDAT 3\r\n",
        b"BDAT 7 LAST\r\n",
        b"BDAT 0 LAST\r\n",
        b"BDAT 99999999999999999999 LAST\r\n",
        b"BDAT x\r\n",
    ];
    for _ in 0..3000 {
        let mut input = Vec::new();
        for _ in 0..(rng.next() % 30) {
            if rng.next().is_multiple_of(4) {
                input.push((rng.next() & 0xff) as u8);
            } else {
                input.extend_from_slice(pieces[(rng.next() as usize) % pieces.len()]);
            }
        }
        let mut cfg = config();
        cfg.max_message_size = 10;
        cfg.max_line_len = 40;
        let seed = rng.next();
        let a = run(cfg.clone(), &input);
        let b = run_chunks(cfg, &random_chunks(&input, seed, 5));
        assert_eq!(a.0, b.0);
    }
}

/// RFC 3461 and RFC 6531 parameters are accepted and end up in the envelope, decoded,
/// in recipient order.
#[test]
fn dsn_and_smtputf8_parameters_reach_the_envelope() {
    let input = "EHLO c\r\n\
MAIL FROM:<jörg@a.example> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=QQ+2B314\r\n\
RCPT TO:<bob@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@b.example\r\n\
RCPT TO:<ünï@b.example> NOTIFY=NEVER\r\n\
RCPT TO:<c@b.example>\r\n\
DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input.as_bytes());
    assert!(
        s(&out).contains("250 2.0.0 Ok: queued as Q1"),
        "{}",
        s(&out)
    );
    let (env, _) = &log.messages[0];
    assert!(env.smtputf8);
    assert_eq!(env.ret, Some(sipmail::smtp::Ret::Hdrs));
    assert_eq!(env.envid.as_deref(), Some("QQ+314"));
    assert_eq!(
        env.rcpt_to,
        ["bob@b.example", "ünï@b.example", "c@b.example"]
    );
    let p = &env.rcpt_params;
    assert_eq!(p.len(), 3);
    let n = p[0].notify.expect("NOTIFY");
    assert!(n.success && n.failure && !n.delay);
    assert_eq!(p[0].orcpt.as_deref(), Some("Bob+x@b.example"));
    assert_eq!(p[1].notify, Some(sipmail::smtp::Notify::NEVER));
    assert!(!p[1].wants_failure_dsn());
    assert_eq!(p[2], Default::default());
    assert!(p[2].wants_failure_dsn());
}

/// Without SMTPUTF8, a non-ASCII address is refused with 553 5.6.7 (RFC 6531 §3.5).
#[test]
fn non_ascii_address_without_smtputf8_is_refused() {
    let input = "EHLO c\r\nMAIL FROM:<jörg@a.example>\r\nMAIL FROM:<a@a.example>\r\n\
RCPT TO:<ü@b.example>\r\nQUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input.as_bytes());
    let text = s(&out);
    assert_eq!(text.matches("553 5.6.7").count(), 2, "{text}");
    assert!(text.contains("250 2.1.0 Ok"), "{text}");
    assert!(log.messages.is_empty());
}

/// `XRECEIPT FETCH` / `ACK n`: only where the extension is offered, only after EHLO and
/// outside a transaction, with a count of at most 16; byte for byte.
#[test]
fn xreceipt_commands_are_checked_before_the_backend_sees_them() {
    let input = b"XRECEIPT FETCH\r\nEHLO a\r\nXRECEIPT FETCH\r\nXRECEIPT ACK 0\r\nXRECEIPT ACK 17\r\nXRECEIPT\r\nXRECEIPT FETCH NOW\r\nMAIL FROM:<a@b.example>\r\nXRECEIPT FETCH\r\nQUIT\r\n";
    let on = ServerConfig {
        receipts: true,
        ..config()
    };
    let (out, log) = assert_chunking_invariant(&on, input);
    let out = String::from_utf8_lossy(&out);
    let replies: Vec<&str> = out
        .split("\r\n")
        .filter(|l| !l.starts_with("250-") || l.contains("2.0.0"))
        .collect();
    assert_eq!(
        replies,
        [
            "220 mx.test ESMTP sipmail",
            "503 5.5.1 send EHLO first",
            "250 XRECEIPT sipmail-receipt/1",
            "250-2.0.0 Ok: 0 delivered receipt(s)",
            "250 2.0.0 XRECEIPT END 0",
            "250-2.0.0 Ok: 0 delivered receipt(s)",
            "250 2.0.0 XRECEIPT END 0",
            "501 5.5.4 XRECEIPT ACK takes a count of 0 to 16",
            "501 5.5.4 syntax: XRECEIPT FETCH | XRECEIPT ACK <n>",
            "501 5.5.4 syntax: XRECEIPT FETCH | XRECEIPT ACK <n>",
            "250 2.1.0 Ok",
            "503 5.5.1 XRECEIPT is not allowed in a mail transaction",
            "221 2.0.0 mx.test closing connection",
            "",
        ],
        "{out}"
    );
    assert_eq!(
        log.calls,
        [
            "RECEIPTS Fetch",
            "RECEIPTS Ack(0)",
            "MAIL a@b.example None false"
        ]
    );
    // Where the extension is not offered, the command does not exist.
    let (out, log) = run(config(), b"EHLO a\r\nXRECEIPT FETCH\r\nQUIT\r\n");
    assert!(
        String::from_utf8_lossy(&out).contains("500 5.5.1 command not recognized"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(log.calls.is_empty());
}

/// BDAT (RFC 3030): one chunk with MAIL and RCPT in one flight, as sipmail's client sends
/// it; several chunks; a chunk of 0; an unterminated last line gets its CRLF. The octets
/// are counted, not parsed: a "." line and command-like lines inside a chunk are message.
#[test]
fn bdat_chunks_make_the_message_whatever_the_reads() {
    let input = b"EHLO c\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 13 LAST\r\nhi\r\n.\r\nRSET\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\none\r\nBDAT 0\r\nNOOP\r\nBDAT 9 LAST\r\n.two\r\nend\
QUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input);
    assert_eq!(
        s(&out),
        format!(
            "220 mx.test ESMTP sipmail\r\n{EHLO_REPLY}\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as Q1\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: chunk received\r\n250 2.0.0 Ok: chunk received\r\n\
250 2.0.0 Ok\r\n250 2.0.0 Ok: queued as Q2\r\n\
221 2.0.0 mx.test closing connection\r\n"
        )
    );
    assert_eq!(log.messages.len(), 2);
    assert_eq!(log.messages[0].1, b"hi\r\n.\r\nRSET\r\n");
    assert_eq!(log.messages[1].1, b"one\r\n.two\r\nend\r\n");
    assert_eq!(
        log.calls.iter().filter(|c| c.starts_with("DATA")).count(),
        2
    );
    assert_eq!(log.aborted, 0);
}

/// A refused BDAT still has its octets read and dropped, so they are never taken for
/// commands (the chunks below hold command lines); a transaction whose chunk was refused
/// is over. DATA and RCPT after a chunk, and DATA-style content rules: bare LF rejects.
#[test]
fn refused_bdat_chunks_are_read_and_dropped_not_taken_for_commands() {
    let input = b"EHLO c\r\n\
BDAT 21\r\nRCPT TO:<evil@y>\r\nX\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@denied.example>\r\nBDAT 17 LAST\r\nMAIL FROM:<e@x>\r\n\
RSET\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 3\r\nab\n\
RCPT TO:<c@y>\r\nDATA\r\nBDAT 3 LAST\r\nz\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 4 LAST\r\nok\r\n\
QUIT\r\n";
    let (out, log) = assert_chunking_invariant(&config(), input);
    assert_eq!(
        s(&out),
        format!(
            "220 mx.test ESMTP sipmail\r\n{EHLO_REPLY}\
503 5.5.1 need MAIL command\r\n\
250 2.1.0 Ok\r\n550 5.7.1 relay denied\r\n554 5.5.1 no valid recipients; the chunk was discarded\r\n\
250 2.0.0 Ok\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: chunk received\r\n\
503 5.5.1 RCPT is not allowed after BDAT\r\n503 5.5.1 DATA is not allowed after BDAT; send RSET\r\n\
550 5.6.11 message rejected: bare LF/CR in DATA\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as Q1\r\n\
221 2.0.0 mx.test closing connection\r\n"
        )
    );
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].1, b"ok\r\n");
    assert_eq!(log.messages[0].0.rcpt_to, vec!["b@y"]);
    assert!(
        !log.calls
            .iter()
            .any(|c| c.contains("evil") || c.contains("e@x")),
        "chunk octets were taken for commands: {:?}",
        log.calls
    );
    assert_eq!(log.aborted, 1, "the rejected message's spool is discarded");
}

/// RSET or EHLO between the chunks of a transaction discards what was received; the size
/// limit counts all chunks and is answered at the last.
#[test]
fn bdat_between_chunks_rset_discards_and_the_size_limit_spans_chunks() {
    let mut cfg = config();
    cfg.max_message_size = 10;
    let input = b"EHLO c\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\nabc\r\nRSET\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\nabc\r\nEHLO d\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 6\r\n1234\r\nBDAT 6 LAST\r\n5678\r\n\
MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 0 LAST\r\n\
QUIT\r\n";
    let (out, log) = assert_chunking_invariant(&cfg, input);
    let out = s(&out);
    let ehlo = EHLO_REPLY.replace("SIZE 1000", "SIZE 10");
    assert_eq!(
        out,
        format!(
            "220 mx.test ESMTP sipmail\r\n{ehlo}\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: chunk received\r\n250 2.0.0 Ok\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: chunk received\r\n{ehlo}\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: chunk received\r\n\
552 5.3.4 message size exceeds fixed maximum message size\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as Q1\r\n\
221 2.0.0 mx.test closing connection\r\n"
        )
    );
    assert_eq!(log.aborted, 3);
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.messages[0].1, b"", "BDAT 0 LAST: an empty message");
}
