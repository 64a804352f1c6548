//! The bodies of sipmail's fuzz targets, shared by the `cargo fuzz` targets
//! (`fuzz_targets/`) and the stable-Rust mutation runner (`src/bin/smoke.rs`).
//!
//! A target "fails" only by panicking (or by hanging / using unbounded memory):
//! every error on hostile input must come back as a value.
#![forbid(unsafe_code)]

mod key_import;
mod record;

pub use key_import::{cleanup as cleanup_key_import, key_import_target, seeds_key_import};
pub use record::{record_target, seeds_record};

use sipmail::handshake::{
    Answer, CallContext, CalleeAwaitConfirm, CalleePolicy, CallerAwaitAnswer, Confirm, Offer,
    Signer, Suite, Verifier,
};
use sipmail::sip::message::{bad_request_for, parse_datagram_limited, parse_stream_limited};
use sipmail::handshake::sdp;
use sipmail::sip::{SipMessage, parse_datagram, parse_stream};

/// SIP message and SDP parsing: datagram and stream framing, every typed
/// accessor, the 400 builder, and the three sipmail bodies. A message that
/// parses must serialize to bytes that parse again to the same start line,
/// headers and body.
pub fn sip_target(data: &[u8]) {
    match parse_datagram(data) {
        Ok(msg) => {
            exercise(&msg);
            match parse_datagram(&msg.to_bytes()) {
                Ok(again) => same(&msg, &again),
                // The serializer always writes Content-Length, so a datagram at the header
                // limit without one grows past the limit by exactly that header.
                Err(sipmail::sip::ParseError::TooManyHeaders(_))
                    if msg.headers().len() == sipmail::sip::message::MAX_HEADERS
                        && msg.headers().get("Content-Length").is_none() => {}
                Err(e) => panic!("re-parsing our own serialization failed: {e}"),
            }
        }
        Err(e) => {
            let _ = bad_request_for(data, &e);
        }
    }
    let _ = parse_datagram_limited(data, data.len() / 2);
    // Stream framing: consume message after message, as a TCP connection would.
    let mut rest = data;
    let mut guard = 0;
    loop {
        match parse_stream(rest) {
            Ok(Some((msg, used))) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "stream parser used {used} of {}",
                    rest.len()
                );
                exercise(&msg);
                let bytes = msg.to_bytes();
                match parse_stream(&bytes) {
                    Ok(Some((again, n))) => {
                        assert_eq!(n, bytes.len());
                        same(&msg, &again);
                    }
                    other => panic!("re-framing our own serialization failed: {other:?}"),
                }
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                let _ = bad_request_for(rest, &e);
                break;
            }
        }
        guard += 1;
        assert!(guard <= data.len() + 1, "stream parser made no progress");
    }
    // Framing is incremental: every proper prefix of a complete message needs more
    // bytes (never an error, never a different message), and any longer buffer frames
    // the same message.
    if let Ok(Some((_, n))) = parse_stream_limited(data, 65_535) {
        let points = [
            n - 1,
            n / 2,
            n / 3,
            n / 4,
            2 * n / 3,
            3 * n / 4,
            n.saturating_sub(2),
            1,
        ];
        for k in points {
            if k < n {
                match parse_stream_limited(&data[..k], 65_535) {
                    Ok(None) => {}
                    other => panic!(
                        "prefix of {k} of a {n}-byte message: {:?}",
                        other.map(|o| o.map(|(_, used)| used))
                    ),
                }
            }
        }
        let mut longer = data[..n].to_vec();
        longer.extend_from_slice(b"OPTIONS sip:x SIP/2.0\r\n");
        match parse_stream_limited(&longer, 65_535) {
            Ok(Some((_, m))) => assert_eq!(m, n, "a following message changed the framing"),
            other => panic!(
                "framing lost with more bytes: {:?}",
                other.map(|o| o.map(|x| x.1))
            ),
        }
    }
    let _ = sdp::decode_offer(data);
    let _ = sdp::decode_answer(data);
    let _ = sdp::decode_confirm(data);
}

fn exercise(msg: &SipMessage) {
    let h = msg.headers();
    let _ = h.top_via();
    let _ = h.via_list();
    let _ = h.cseq();
    let _ = h.from().map(|f| f.tag().map(str::len));
    let _ = h.to().map(|t| t.to_string());
    let _ = h.contact();
    let _ = h.content_length();
    let _ = h.call_id();
    if let Ok(v) = h.top_via() {
        let _ = v.to_string();
    }
    let body = msg.body();
    let _ = sdp::decode_offer(body);
    let _ = sdp::decode_answer(body);
    let _ = sdp::decode_confirm(body);
}

fn same(a: &SipMessage, b: &SipMessage) {
    match (a, b) {
        (SipMessage::Request(x), SipMessage::Request(y)) => {
            assert_eq!(x.method, y.method);
            assert_eq!(x.uri.trim(), y.uri.trim());
            assert_eq!(x.body, y.body);
        }
        (SipMessage::Response(x), SipMessage::Response(y)) => {
            assert_eq!(x.status, y.status);
            assert_eq!(x.body, y.body);
        }
        _ => panic!("a request turned into a response or back"),
    }
    let names = |m: &SipMessage| {
        m.headers()
            .iter()
            .filter(|(n, _)| !sipmail::sip::message::header_name_eq(n, "Content-Length"))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(a), names(b), "headers changed in a round trip");
}

/// Signs with a fixed string (the handshake does not look inside signatures).
struct FakeSigner;
impl Signer for FakeSigner {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        Ok(data.iter().take(16).copied().collect())
    }
}

/// Accepts or rejects every signature, so both branches after verification are reached.
struct FakeVerifier(bool);
impl Verifier for FakeVerifier {
    fn verify(&self, _fpr: &[u8], _data: &[u8], _sig: &[u8]) -> Result<(), String> {
        if self.0 {
            Ok(())
        } else {
            Err("rejected".into())
        }
    }
}

/// Reads fuzz bytes as structured values.
struct Input<'a>(&'a [u8]);
impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn array(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let b = self.bytes(32);
        out[..b.len()].copy_from_slice(b);
        out
    }
    /// A length-prefixed chunk (the length byte scaled so long fields happen too).
    fn chunk(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        let n = if n >= 250 { (n - 249) * 300 } else { n };
        self.bytes(n)
    }
    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.chunk()).into_owned()
    }
    fn suites(&mut self) -> Vec<Suite> {
        let n = self.byte() % 4;
        (0..n)
            .map(|_| Suite::ALL[self.byte() as usize % Suite::ALL.len()])
            .collect()
    }
    /// Retained-secret IDs: up to 5 (one more than the wire allows) 8-byte IDs.
    fn rs_ids(&mut self) -> Vec<[u8; 8]> {
        self.chunk()
            .chunks_exact(8)
            .take(5)
            .map(|c| {
                let mut id = [0u8; 8];
                id.copy_from_slice(c);
                id
            })
            .collect()
    }
}

/// Offer, Answer and Confirm values, decoded from SDP or built field by field from the
/// fuzz input, fed into both handshake state machines.
pub fn handshake_target(data: &[u8]) {
    let mut inp = Input(data);
    let mode = inp.byte();
    let accept = mode & 0x80 != 0;
    let ctx = CallContext {
        call_id: inp.text(),
        from_tag: inp.text(),
        to_tag: inp.text(),
        caller: inp.text(),
        callee: inp.text(),
    };
    match mode & 0x03 {
        // Callee: an offer from SDP, then a confirm from the ACK body.
        0 => {
            let offer = sdp::decode_offer(inp.chunk());
            let confirm = sdp::decode_confirm(inp.chunk());
            if let Ok(offer) = offer {
                callee(&ctx, &offer, confirm.ok(), inp.array(), accept);
            }
        }
        // Callee with raw field values (bypassing the SDP parser's checks).
        1 => {
            let offer = Offer {
                suites: inp.suites(),
                fingerprint: inp.chunk().to_vec(),
                nonce: inp.array(),
                commitment: inp.array(),
                auth: sipmail::handshake::AuthMode::ALL[inp.byte() as usize % 3],
                rs_ids: inp.rs_ids(),
                key_packet: inp.chunk().to_vec(),
            };
            let confirm = Confirm {
                public: inp.array(),
                signature: inp.chunk().to_vec(),
            };
            callee(&ctx, &offer, Some(confirm), inp.array(), accept);
        }
        // Caller: our offer, then an answer from SDP.
        2 => {
            let caller = CallerAwaitAnswer::new(
                inp.array(),
                inp.array(),
                Suite::ALL.to_vec(),
                inp.chunk().to_vec(),
            );
            if let Ok(answer) = sdp::decode_answer(inp.rest()) {
                let _ = caller.on_answer(&ctx, &answer, &FakeVerifier(accept), &FakeSigner);
            }
        }
        // Caller with a raw answer.
        _ => {
            let caller = CallerAwaitAnswer::new(
                inp.array(),
                inp.array(),
                inp.suites(),
                inp.chunk().to_vec(),
            );
            let answer = Answer {
                media: std::net::SocketAddr::from(([127, 0, 0, 1], u16::from(inp.byte()) << 8)),
                suite: Suite::ALL[inp.byte() as usize % Suite::ALL.len()],
                fingerprint: inp.chunk().to_vec(),
                public: inp.array(),
                signature: inp.chunk().to_vec(),
                rs_ids: inp.rs_ids(),
                key_packet: inp.chunk().to_vec(),
            };
            let _ = caller.on_answer(&ctx, &answer, &FakeVerifier(accept), &FakeSigner);
        }
    }
}

impl<'a> Input<'a> {
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

fn callee(
    ctx: &CallContext,
    offer: &Offer,
    confirm: Option<Confirm>,
    secret: [u8; 32],
    accept: bool,
) {
    let policy = CalleePolicy {
        media: "127.0.0.1:4000".parse().expect("literal address"),
        ..CalleePolicy::default()
    };
    let Ok((awaiting, answer)) = CalleeAwaitConfirm::respond_with(
        ctx,
        offer,
        secret,
        Suite::ALL,
        vec![0xAB; 20],
        &FakeSigner,
        &policy,
    ) else {
        return;
    };
    // Our own answer must survive its SDP encoding.
    let body = sdp::encode_answer(&answer, 1);
    let decoded = sdp::decode_answer(&body).expect("our own answer must decode");
    assert_eq!(decoded, answer);
    if let Some(c) = confirm {
        let _ = awaiting.on_confirm(&c, &FakeVerifier(accept));
    }
}

/// Starting inputs: well-formed messages and bodies as sipmail and common SIP
/// software send them, so mutations start close to the interesting paths.
pub fn seeds_sip() -> Vec<Vec<u8>> {
    let caller = CallerAwaitAnswer::new([1; 32], [2; 32], Suite::ALL.to_vec(), vec![0xAA; 20]);
    let offer = sdp::encode_offer(caller.offer(), 7, "127.0.0.1".parse().expect("ip"));
    let answer = Answer {
        media: "127.0.0.1:4000".parse().expect("addr"),
        suite: Suite::ChaCha20Poly1305,
        fingerprint: vec![0xBB; 20],
        public: [3; 32],
        signature: vec![9; 64],
        rs_ids: vec![[6; 8]],
        key_packet: Vec::new(),
    };
    let answer = sdp::encode_answer(&answer, 8);
    let confirm = sdp::encode_confirm(&Confirm {
        public: [4; 32],
        signature: vec![5; 64],
    });
    let mut out = Vec::new();
    let head = |start: &str, extra: &str, ctype: &str, body: &[u8]| {
        let mut m = format!(
            "{start}\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK776asdhds;rport\r\n\
             Max-Forwards: 70\r\nTo: <sip:mail@site-b.test>{extra}\r\n\
             From: <sip:mail@site-a.test>;tag=1928301774\r\nCall-ID: a84b4c76e66710@pc33\r\n\
             CSeq: 314159 {}\r\nContact: <sip:mail@127.0.0.1:5060>\r\n",
            start.split(' ').next().unwrap_or("INVITE")
        )
        .into_bytes();
        if !ctype.is_empty() {
            m.extend_from_slice(format!("Content-Type: {ctype}\r\n").as_bytes());
        }
        m.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        m.extend_from_slice(body);
        m
    };
    out.push(head(
        "INVITE sip:mail@site-b.test SIP/2.0",
        "",
        "application/sdp",
        &offer,
    ));
    out.push(head(
        "ACK sip:mail@site-b.test SIP/2.0",
        ";tag=x",
        "application/sipmail-confirm",
        &confirm,
    ));
    out.push(head("OPTIONS sip:mail@site-b.test SIP/2.0", "", "", b""));
    out.push(head("BYE sip:mail@site-b.test SIP/2.0", ";tag=x", "", b""));
    out.push(head("CANCEL sip:mail@site-b.test SIP/2.0", "", "", b""));
    let mut resp = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKx;received=127.0.0.1;rport=5060\r\n\
        To: <sip:mail@site-b.test>;tag=abc\r\nFrom: <sip:mail@site-a.test>;tag=1\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
        Content-Type: application/sdp\r\n"
        .to_vec();
    resp.extend_from_slice(format!("Content-Length: {}\r\n\r\n", answer.len()).as_bytes());
    resp.extend_from_slice(&answer);
    out.push(resp);
    // Compact forms, folding, odd spacing (RFC 4475 §3.1.1.1-style).
    out.push(
        b"INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\nTO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
          from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\nMaX-fOrWaRdS: 0068\r\n\
          Call-ID: wsinv.ndaksdj@192.0.2.1\r\nContent-Length   : 0\r\ncseq: 0009\r\n  INVITE\r\n\
          Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\ns :\r\nv: SIP/2.0/TCP spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\nm:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33\r\n\r\n"
            .to_vec(),
    );
    out.push(b"\r\n\r\n".to_vec());
    out.push(offer);
    out.push(answer);
    out.push(confirm);
    out
}

/// Starting inputs for [`handshake_target`]: each mode with plausible values.
pub fn seeds_handshake() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let ctx = |v: &mut Vec<u8>| {
        for s in [
            "callid@host",
            "fromtag",
            "totag",
            "mail@site-a.test",
            "mail@site-b.test",
        ] {
            v.push(s.len() as u8);
            v.extend_from_slice(s.as_bytes());
        }
    };
    let caller = CallerAwaitAnswer::new([1; 32], [2; 32], Suite::ALL.to_vec(), vec![0xAA; 20]);
    let offer = sdp::encode_offer(caller.offer(), 7, "127.0.0.1".parse().expect("ip"));
    let confirm = sdp::encode_confirm(&Confirm {
        public: [4; 32],
        signature: vec![5; 64],
    });
    let answer = sdp::encode_answer(
        &Answer {
            media: "127.0.0.1:4000".parse().expect("addr"),
            suite: Suite::ChaCha20Poly1305,
            fingerprint: vec![0xBB; 20],
            public: [3; 32],
            signature: vec![9; 64],
            rs_ids: Vec::new(),
            key_packet: Vec::new(),
        },
        8,
    );
    for accept in [0u8, 0x80] {
        // mode 0: offer SDP + confirm SDP (chunks are at most 249 bytes unless scaled).
        let mut v = vec![accept];
        ctx(&mut v);
        for body in [&offer, &confirm] {
            if body.len() < 250 {
                v.push(body.len() as u8);
                v.extend_from_slice(body);
            } else {
                let units = body.len().div_ceil(300);
                v.push(249 + units as u8);
                let mut b = body.clone();
                b.resize(units * 300, b'\n');
                v.extend_from_slice(&b);
            }
        }
        v.extend_from_slice(&[7; 32]);
        out.push(v);
        // mode 1: raw values
        let mut v = vec![accept | 1];
        ctx(&mut v);
        v.extend_from_slice(&[1, 0, 20]);
        v.extend_from_slice(&[0xAA; 20]);
        v.extend_from_slice(&[2; 64]);
        v.extend_from_slice(&[4; 32]);
        v.push(64);
        v.extend_from_slice(&[5; 64]);
        v.extend_from_slice(&[7; 32]);
        out.push(v);
        // mode 2: answer SDP
        let mut v = vec![accept | 2];
        ctx(&mut v);
        v.extend_from_slice(&[1; 64]);
        v.push(20);
        v.extend_from_slice(&[0xAA; 20]);
        v.extend_from_slice(&answer);
        out.push(v);
        // mode 3: raw answer
        let mut v = vec![accept | 3];
        ctx(&mut v);
        v.extend_from_slice(&[1; 64]);
        v.extend_from_slice(&[1, 0, 20]);
        v.extend_from_slice(&[0xAA; 20]);
        v.extend_from_slice(&[0, 20]);
        v.extend_from_slice(&[0xBB; 20]);
        v.extend_from_slice(&[3; 32]);
        v.push(64);
        v.extend_from_slice(&[9; 64]);
        out.push(v);
    }
    out
}

/// A small, deterministic mutator (xorshift PRNG): bit flips, byte and
/// "interesting value" overwrites, insertions, deletions, duplicated or
/// swapped lines, splices with another input, truncation.
pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator { state: seed | 1 }
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn mutate(&mut self, input: &mut Vec<u8>, other: &[u8], max_len: usize) {
        const TOKENS: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b":",
            b";",
            b",",
            b"<",
            b">",
            b"\"",
            b"\\",
            b"%",
            b"%00",
            b"=",
            b"/",
            b"@",
            b"\0",
            b"\xff",
            b"\xc3\x28",
            b"Content-Length: ",
            b"Content-Length: 99999999999999999999\r\n",
            b"l: -1\r\n",
            b"Via: ",
            b"v: ",
            b"CSeq: 1 INVITE\r\n",
            b"To: <sip:a@b>;tag=",
            b"SIP/2.0",
            b"sips:",
            b"tel:",
            b"z9hG4bK",
            b";rport",
            b";branch=",
            b"\r\n\r\n",
            b"a=sipmail-",
            b"m=audio 0 TCP ",
            b"c=IN IP6 ::1\r\n",
            b"0",
            b"65535",
            b"4294967296",
            b"-",
            b"Require: foo\r\n",
        ];
        let rounds = 1 + self.below(4);
        for _ in 0..rounds {
            let len = input.len();
            match self.below(11) {
                0 if len > 0 => {
                    let i = self.below(len);
                    input[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    input[i] = self.next_u64() as u8;
                }
                2 => {
                    let i = self.below(len + 1);
                    let t = TOKENS[self.below(TOKENS.len())];
                    input.splice(i..i, t.iter().copied());
                }
                3 if len > 0 => {
                    let i = self.below(len);
                    let n = 1 + self.below((len - i).min(64));
                    input.drain(i..i + n);
                }
                4 if len > 0 => {
                    input.truncate(self.below(len));
                }
                5 => {
                    // Duplicate a line.
                    let lines: Vec<usize> = std::iter::once(0)
                        .chain(
                            input
                                .iter()
                                .enumerate()
                                .filter(|(_, b)| **b == b'\n')
                                .map(|(i, _)| i + 1),
                        )
                        .collect();
                    let a = lines[self.below(lines.len())];
                    let b = input[a..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(input.len(), |p| a + p + 1);
                    let line = input[a..b].to_vec();
                    let at = lines[self.below(lines.len())];
                    input.splice(at..at, line);
                }
                6 if !other.is_empty() => {
                    // Splice with another input.
                    let i = self.below(len + 1);
                    let j = self.below(other.len());
                    let n = 1 + self.below(other.len() - j);
                    input.truncate(i);
                    input.extend_from_slice(&other[j..j + n]);
                }
                7 if len > 0 => {
                    // Repeat a chunk (long headers, huge values).
                    let i = self.below(len);
                    let n = 1 + self.below((len - i).min(32));
                    let chunk = input[i..i + n].to_vec();
                    let times = 1 + self.below(200);
                    for _ in 0..times {
                        input.splice(i..i, chunk.iter().copied());
                    }
                }
                8 if len > 0 => {
                    // A digit run replaced by a boundary number.
                    let i = self.below(len);
                    let nums: &[&[u8]] = &[
                        b"0",
                        b"1",
                        b"65535",
                        b"65536",
                        b"4294967295",
                        b"18446744073709551616",
                        b"-1",
                    ];
                    let t = nums[self.below(nums.len())];
                    let end = input[i..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(len, |p| i + p);
                    input.splice(i..end, t.iter().copied());
                }
                9 if len > 1 => {
                    let a = self.below(len);
                    let b = self.below(len);
                    input.swap(a, b);
                }
                _ => {
                    let n = self.below(16);
                    for _ in 0..n {
                        input.push(self.next_u64() as u8);
                    }
                }
            }
            input.truncate(max_len);
        }
    }
}
