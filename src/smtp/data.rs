//! The DATA phase, both directions, as pure incremental transforms.
//!
//! [`DataReceiver`] (server): dot-unstuffing, end only at `CRLF . CRLF`,
//! any bare CR or bare LF marks the message as rejected (SMTP smuggling
//! defence), size limit; or, for BDAT (RFC 3030), chunks of counted octets with
//! the same checks. [`DotStuffer`] (client): line-ending normalisation
//! to CRLF, dot-stuffing, and the terminating `.CRLF` (for BDAT: the
//! normalisation only).

/// Receiver state (position relative to line structure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    /// At the beginning of a line (after CRLF, or at the start of data).
    LineStart,
    /// A `.` at the beginning of a line, not yet emitted.
    Dot,
    /// `.` CR at the beginning of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR inside a line, not yet emitted.
    Cr,
    /// The terminating `CRLF.CRLF` has been seen.
    Done,
}

/// How a finished DATA phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Clean message within the size limit.
    Ok,
    /// A bare CR or bare LF was seen somewhere: reject (550 5.6.11).
    BareLineEnding,
    /// The message exceeded the size limit: reject (552 5.3.4).
    TooLarge,
}

/// Incremental, bounded DATA receiver. Feed it input as it arrives; it
/// appends the unstuffed message bytes (CRLF line endings, without the
/// terminating `.CRLF`) to the caller's buffer and tells when the end was
/// reached. Once the message is known to be rejected it stops emitting.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    state: RxState,
    max_size: u64,
    size: u64,
    bare: bool,
    too_large: bool,
    /// BDAT: the current chunk's octets still to come, and whether it is the last.
    chunk: Option<(u64, bool)>,
}

impl DataReceiver {
    /// `max_size`: the largest message (after unstuffing) that is accepted.
    pub fn new(max_size: u64) -> Self {
        DataReceiver {
            state: RxState::LineStart,
            max_size,
            size: 0,
            bare: false,
            too_large: false,
            chunk: None,
        }
    }

    /// A receiver for BDAT chunks (RFC 3030): no dot-stuffing and no end marker, the
    /// octets of each chunk counted ([`start_chunk`](Self::start_chunk)); the same checks
    /// for bare CR and LF, across chunk boundaries too, and the same size limit. A
    /// message whose last line has no line ending gets CRLF, as one sent with DATA does.
    pub fn chunked(max_size: u64) -> Self {
        DataReceiver {
            chunk: Some((0, false)),
            ..DataReceiver::new(max_size)
        }
    }

    /// The next BDAT chunk: `octets` of message, the last chunk if `last`.
    pub fn start_chunk(&mut self, octets: u64, last: bool) {
        self.chunk = Some((octets, last));
    }

    /// Whether the current BDAT chunk has been consumed in full.
    pub fn chunk_done(&self) -> bool {
        matches!(self.chunk, Some((0, _)))
    }

    /// Whether the terminating `CRLF.CRLF` (for BDAT: the last chunk) has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == RxState::Done
    }

    /// The verdict so far (final once [`is_done`](Self::is_done)).
    pub fn verdict(&self) -> DataVerdict {
        if self.bare {
            DataVerdict::BareLineEnding
        } else if self.too_large {
            DataVerdict::TooLarge
        } else {
            DataVerdict::Ok
        }
    }

    /// Bytes of message accepted so far (after unstuffing).
    pub fn size(&self) -> u64 {
        self.size
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.bare || self.too_large {
            return;
        }
        let n = bytes.len() as u64;
        if self.size.saturating_add(n) > self.max_size {
            self.too_large = true;
            return;
        }
        self.size += n;
        out.extend_from_slice(bytes);
    }

    /// Fast path from `input[start]`, a byte inside a line that is neither CR nor LF: copies
    /// in one go every following byte up to the first one that needs the state machine (a
    /// bare CR or LF, a CR at the end of the input, or the start of a line that begins
    /// with `.`, CR or LF), whole lines included. Returns where that byte is, with the state
    /// set for it.
    fn clean_run(&mut self, input: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
        let mut j = start;
        let (end, state) = loop {
            let Some(p) = memchr::memchr2(b'\r', b'\n', &input[j..]).map(|p| j + p) else {
                break (input.len(), RxState::Mid);
            };
            if input[p] == b'\n' || input.get(p + 1) != Some(&b'\n') {
                // A bare LF or CR, or a CR whose LF is not here yet.
                break (p, RxState::Mid);
            }
            match input.get(p + 2) {
                Some(b'.' | b'\r' | b'\n') | None => break (p + 2, RxState::LineStart),
                Some(_) => j = p + 2,
            }
        };
        self.emit(out, &input[start..end]);
        self.state = state;
        end
    }

    /// BDAT: consumes the current chunk's octets from `input`, checking line endings.
    fn feed_chunk(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let Some((left, last)) = self.chunk else {
            return 0;
        };
        let take = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
        let part = &input[..take];
        let mut j = 0;
        loop {
            let p = memchr::memchr2(b'\r', b'\n', &part[j..]).map(|p| j + p);
            if p.unwrap_or(part.len()) > j {
                // Ordinary bytes: a CR before them was bare.
                if self.state == RxState::Cr {
                    self.bare = true;
                }
                self.state = RxState::Mid;
            }
            let Some(p) = p else { break };
            if part[p] == b'\n' {
                if self.state != RxState::Cr {
                    self.bare = true;
                }
                self.state = RxState::LineStart;
            } else {
                if self.state == RxState::Cr {
                    self.bare = true;
                }
                self.state = RxState::Cr;
            }
            j = p + 1;
        }
        self.emit(out, part);
        self.chunk = Some((left - take as u64, last));
        if left == take as u64 && last {
            self.end_chunks(out);
        }
        take
    }

    /// After the last chunk: a CR at the very end was bare; an unterminated last line
    /// gets its CRLF.
    fn end_chunks(&mut self, out: &mut Vec<u8>) {
        match self.state {
            RxState::Cr => self.bare = true,
            RxState::Mid => self.emit(out, b"\r\n"),
            _ => {}
        }
        self.state = RxState::Done;
    }

    /// Consumes input up to and including the end marker. Returns the number
    /// of bytes consumed; bytes after the end marker are left for the caller
    /// (pipelined commands). For BDAT: up to the end of the current chunk.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        if self.chunk.is_some() {
            return self.feed_chunk(input, out);
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                RxState::Done => return i,
                RxState::LineStart => match b {
                    b'.' => self.state = RxState::Dot,
                    b'\r' => self.state = RxState::Cr,
                    b'\n' => {
                        self.bare = true;
                        self.state = RxState::Mid;
                    }
                    _ => {
                        i = self.clean_run(input, i, out);
                        continue;
                    }
                },
                RxState::Dot => match b {
                    b'\r' => self.state = RxState::DotCr,
                    b'\n' => {
                        self.bare = true;
                        self.state = RxState::Mid;
                    }
                    _ => {
                        // Unstuff: the leading dot is dropped.
                        self.state = RxState::Mid;
                        continue;
                    }
                },
                RxState::DotCr => {
                    if b == b'\n' {
                        self.state = RxState::Done;
                        return i + 1;
                    }
                    // ".\r" then something else: a bare CR.
                    self.bare = true;
                    self.state = RxState::Mid;
                    continue;
                }
                RxState::Mid => match b {
                    b'\r' => self.state = RxState::Cr,
                    b'\n' => self.bare = true,
                    _ => {
                        i = self.clean_run(input, i, out);
                        continue;
                    }
                },
                RxState::Cr => match b {
                    b'\n' => {
                        self.emit(out, b"\r\n");
                        self.state = RxState::LineStart;
                    }
                    b'\r' => self.bare = true,
                    _ => {
                        self.bare = true;
                        self.state = RxState::Mid;
                        continue;
                    }
                },
            }
            i += 1;
        }
        i
    }
}

/// Incremental encoder for the client side of DATA: converts bare LF and
/// bare CR to CRLF, dot-stuffs lines that begin with `.`, and on
/// [`finish`](Self::finish) makes sure the message ends with CRLF and
/// appends the terminating `.CRLF`.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    at_line_start: bool,
    pending_cr: bool,
    /// false for BDAT: line endings normalised, no dot-stuffing, no `.CRLF`.
    dots: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    pub fn new() -> Self {
        DotStuffer {
            at_line_start: true,
            pending_cr: false,
            dots: true,
        }
    }

    /// For BDAT (RFC 3030): the same line-ending normalisation (so the server stores
    /// the same bytes as after DATA), without dot-stuffing or the final `.CRLF`.
    pub fn chunking() -> Self {
        DotStuffer {
            dots: false,
            ..DotStuffer::new()
        }
    }

    /// Encodes `input`, appending to `out`. Runs of input that need no change (lines
    /// already ending in CRLF and not starting with `.`) are copied in one go.
    pub fn encode<O: Emit + ?Sized>(&mut self, input: &[u8], out: &mut O) {
        out.reserve_for(input.len() + input.len() / 64 + 4);
        let mut i = 0;
        if self.pending_cr && !input.is_empty() {
            // A CR at the end of the previous input: CRLF either way, LF consumed.
            self.pending_cr = false;
            out.emit(b"\r\n");
            self.at_line_start = true;
            if input[0] == b'\n' {
                i = 1;
            }
        }
        while i < input.len() {
            if self.dots && self.at_line_start && input[i] == b'.' {
                out.emit(b".");
            }
            // Copy verbatim up to the first CR or LF that is not part of a CRLF followed by
            // a line that does not start with `.`.
            let start = i;
            let mut j = i;
            loop {
                let Some(p) = memchr::memchr2(b'\r', b'\n', &input[j..]).map(|p| j + p) else {
                    out.emit(&input[start..]);
                    self.at_line_start = false;
                    return;
                };
                if input[p] == b'\n' {
                    // Bare LF.
                    out.emit(&input[start..p]);
                    out.emit(b"\r\n");
                    self.at_line_start = true;
                    i = p + 1;
                    break;
                }
                match input.get(p + 1) {
                    None => {
                        // CR at the end: wait for the next input.
                        out.emit(&input[start..p]);
                        self.pending_cr = true;
                        return;
                    }
                    Some(b'\n') => {
                        if input.get(p + 2).is_some_and(|&b| b != b'.') {
                            j = p + 2;
                            continue;
                        }
                        out.emit(&input[start..p + 2]);
                        self.at_line_start = true;
                        i = p + 2;
                        break;
                    }
                    Some(_) => {
                        // Bare CR.
                        out.emit(&input[start..p]);
                        out.emit(b"\r\n");
                        self.at_line_start = true;
                        i = p + 1;
                        break;
                    }
                }
            }
        }
    }

    /// Ends the message: CRLF if the last line is unterminated, then `.CRLF` (not for
    /// BDAT).
    pub fn finish<O: Emit + ?Sized>(&mut self, out: &mut O) {
        if self.pending_cr || !self.at_line_start {
            out.emit(b"\r\n");
        }
        self.pending_cr = false;
        self.at_line_start = true;
        if self.dots {
            out.emit(b".\r\n");
        }
    }
}

/// Where [`DotStuffer`] puts its output: the bytes for the wire, or a digest of them.
pub trait Emit {
    fn emit(&mut self, bytes: &[u8]);
    /// About this many bytes are coming.
    fn reserve_for(&mut self, _n: usize) {}
}

impl Emit for Vec<u8> {
    fn emit(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn reserve_for(&mut self, n: usize) {
        self.reserve(n);
    }
}

/// SHA-256 and size of a message as a server decodes it once our client has sent it, in
/// either framing: the line-ending normalisation of [`DotStuffer`] (bare CR and bare LF
/// become CRLF, a last line gets its CRLF), hashed as it goes, with no copy. Fed the
/// bytes of a spool file as they are written, it gives what a partner's receipt will
/// attest for that file, before the message is ever sent.
#[derive(Clone)]
pub struct DecodedDigest {
    norm: DotStuffer,
    out: HashOut,
}

#[derive(Clone)]
struct HashOut {
    hash: sha2::Sha256,
    size: u64,
}

impl Emit for HashOut {
    fn emit(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.hash, bytes);
        self.size += bytes.len() as u64;
    }
}

impl Default for DecodedDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl DecodedDigest {
    pub fn new() -> Self {
        DecodedDigest {
            norm: DotStuffer::chunking(),
            out: HashOut {
                hash: sha2::Digest::new(),
                size: 0,
            },
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.norm.encode(bytes, &mut self.out);
    }

    /// SHA-256 (lowercase hex) and size of the decoded message.
    pub fn finish(mut self) -> (String, u64) {
        self.norm.finish(&mut self.out);
        (
            hex::encode(sha2::Digest::finalize(self.out.hash)),
            self.out.size,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx_all(input: &[u8], max: u64) -> (Vec<u8>, usize, DataVerdict, bool) {
        let mut r = DataReceiver::new(max);
        let mut out = Vec::new();
        let n = r.feed(input, &mut out);
        (out, n, r.verdict(), r.is_done())
    }

    fn rx_bytewise(input: &[u8], max: u64) -> (Vec<u8>, usize, DataVerdict, bool) {
        let mut r = DataReceiver::new(max);
        let mut out = Vec::new();
        let mut n = 0;
        for b in input {
            if r.is_done() {
                break;
            }
            n += r.feed(std::slice::from_ref(b), &mut out);
        }
        (out, n, r.verdict(), r.is_done())
    }

    #[test]
    fn basic_and_unstuffing() {
        let input = b"Subject: x\r\n\r\n..leading\r\n.x\r\nend\r\n.\r\nQUIT\r\n";
        for f in [rx_all, rx_bytewise] {
            let (out, n, v, done) = f(input, 1000);
            assert_eq!(out, b"Subject: x\r\n\r\n.leading\r\nx\r\nend\r\n");
            assert_eq!(&input[n..], b"QUIT\r\n");
            assert_eq!(v, DataVerdict::Ok);
            assert!(done);
        }
    }

    #[test]
    fn empty_message() {
        let (out, n, v, done) = rx_all(b".\r\n", 10);
        assert!(out.is_empty() && n == 3 && v == DataVerdict::Ok && done);
    }

    #[test]
    fn smuggling_variants_are_not_end_and_reject() {
        for bad in [
            &b"a\n.\nb"[..],
            b"a\n.\r\nb",
            b"a\r\n.\nb",
            b"a\r.\rb",
            b"a\r.\r\nb",
            b"a\r\n.\rb",
            b"a\r\n.\r\rb",
            b"a\nb",
            b"a\rb",
        ] {
            let mut input = bad.to_vec();
            input.extend_from_slice(b"\r\n.\r\nNEXT");
            for f in [rx_all, rx_bytewise] {
                let (_, n, v, done) = f(&input, 1000);
                assert!(done, "{bad:?}");
                assert_eq!(&input[n..], b"NEXT", "{bad:?}");
                assert_eq!(v, DataVerdict::BareLineEnding, "{bad:?}");
            }
        }
    }

    #[test]
    fn size_limit() {
        let (out, _, v, done) = rx_all(b"0123456789\r\n.\r\n", 12);
        assert_eq!((out.len(), v, done), (12, DataVerdict::Ok, true));
        let (_, _, v, done) = rx_all(b"0123456789\r\n.\r\n", 11);
        assert_eq!((v, done), (DataVerdict::TooLarge, true));
    }

    #[test]
    fn stuffer_examples() {
        let enc = |input: &[u8]| {
            let mut s = DotStuffer::new();
            let mut out = Vec::new();
            s.encode(input, &mut out);
            s.finish(&mut out);
            out
        };
        assert_eq!(enc(b""), b".\r\n");
        assert_eq!(enc(b"a"), b"a\r\n.\r\n");
        assert_eq!(enc(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(enc(b"a\n.b\rc\r"), b"a\r\n..b\r\nc\r\n.\r\n");
        assert_eq!(enc(b"x\r\n.\r\ny"), b"x\r\n..\r\ny\r\n.\r\n");
    }

    /// The byte-at-a-time encoder the fast path replaced: the reference.
    fn reference_stuff(input: &[u8]) -> Vec<u8> {
        let (mut at_line_start, mut pending_cr) = (true, false);
        let mut out = Vec::new();
        for &b in input {
            if pending_cr {
                pending_cr = false;
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    at_line_start = true;
                }
                _ => {
                    if at_line_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    at_line_start = false;
                }
            }
        }
        if pending_cr || !at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// The fast paths (runs of whole lines) give the same bytes and verdicts as the
    /// byte-at-a-time state machine, for every chunking, on inputs full of the special
    /// bytes and on long clean lines.
    #[test]
    fn fast_paths_match_bytewise() {
        let mut seed = 0x0dd_ba11_5eed_u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabets: [&[u8]; 3] = [b".\r\nab", b"xxxxxxx\r\n.", b"xy\r\n"];
        for round in 0..6000 {
            let alphabet = alphabets[round % alphabets.len()];
            let len = (rnd() % 80) as usize;
            let mut body: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            if round % 4 == 0 {
                // Something that ends the DATA phase, then more bytes.
                body.extend_from_slice(b"\r\n.\r\nNEXT");
            }
            let chunk = 1 + (rnd() % 9) as usize;
            // Stuffer: chunked fast path against the reference.
            let mut enc = DotStuffer::new();
            let mut wire = Vec::new();
            for part in body.chunks(chunk) {
                enc.encode(part, &mut wire);
            }
            enc.finish(&mut wire);
            assert_eq!(
                wire,
                reference_stuff(&body),
                "{body:?} in chunks of {chunk}"
            );
            // Receiver: whole input, chunked, and byte by byte agree.
            let max = if round % 3 == 0 {
                (len / 2) as u64
            } else {
                1000
            };
            let whole = rx_all(&body, max);
            let bytewise = rx_bytewise(&body, max);
            let mut r = DataReceiver::new(max);
            let (mut out, mut used) = (Vec::new(), 0);
            for part in body.chunks(chunk) {
                if r.is_done() {
                    break;
                }
                used += r.feed(part, &mut out);
            }
            let chunked = (out, used, r.verdict(), r.is_done());
            for other in [&bytewise, &chunked] {
                assert_eq!(whole.2, other.2, "verdict {body:?} max {max}");
                assert_eq!(whole.3, other.3, "done {body:?}");
                assert_eq!(whole.1, other.1, "consumed {body:?}");
                if whole.2 == DataVerdict::Ok {
                    assert_eq!(whole.0, other.0, "output {body:?}");
                }
            }
        }
    }

    /// Stuffer and receiver are inverse on CRLF-normalised input, whatever
    /// the chunking.
    #[test]
    fn roundtrip_random() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b".\r\nab\xff";
        for _ in 0..2000 {
            let len = (rnd() % 40) as usize;
            let body: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            let mut enc = DotStuffer::new();
            let mut wire = Vec::new();
            let mut i = 0;
            while i < body.len() {
                let n = 1 + (rnd() % 5) as usize;
                let end = (i + n).min(body.len());
                enc.encode(&body[i..end], &mut wire);
                i = end;
            }
            enc.finish(&mut wire);
            // expected: normalised body, ending in CRLF unless empty
            let mut norm = Vec::new();
            let mut k = 0;
            while k < body.len() {
                match body[k] {
                    b'\r' => {
                        norm.extend_from_slice(b"\r\n");
                        if body.get(k + 1) == Some(&b'\n') {
                            k += 1;
                        }
                    }
                    b'\n' => norm.extend_from_slice(b"\r\n"),
                    c => norm.push(c),
                }
                k += 1;
            }
            if !norm.is_empty() && !norm.ends_with(b"\r\n") {
                norm.extend_from_slice(b"\r\n");
            }
            let mut rx = DataReceiver::new(u64::MAX);
            let mut out = Vec::new();
            let mut j = 0;
            while j < wire.len() && !rx.is_done() {
                let n = 1 + (rnd() % 7) as usize;
                let end = (j + n).min(wire.len());
                j += rx.feed(&wire[j..end], &mut out);
            }
            assert!(rx.is_done(), "{body:?}");
            assert_eq!(j, wire.len(), "{body:?}");
            assert_eq!(rx.verdict(), DataVerdict::Ok, "{body:?}");
            assert_eq!(out, norm, "{body:?}");
        }
    }

    /// The digest kept at spooling time is what the receiver decodes after either framing,
    /// for bodies with bare CR and LF, leading dots, CRLF split across writes, a last line
    /// without its CRLF, and nothing at all; and whatever the pieces it was fed in.
    #[test]
    fn the_decoded_digest_is_what_the_server_decodes() {
        use sha2::Digest;
        let bodies: [&[u8]; 6] = [
            b"",
            b"a\r\nb\r\n",
            b"a\nb\r\n.dot\rc\r\n..two\nend",
            b".\r\n.\r\n\r\r\n\n\n",
            b"\r",
            b"no line break at all",
        ];
        for body in bodies {
            let mut wire = Vec::new();
            let mut st = DotStuffer::new();
            st.encode(body, &mut wire);
            st.finish(&mut wire);
            let mut rx = DataReceiver::new(u64::MAX);
            let mut decoded = Vec::new();
            assert_eq!(rx.feed(&wire, &mut decoded), wire.len());
            assert!(rx.is_done());
            let want = (
                hex::encode(sha2::Sha256::digest(&decoded)),
                decoded.len() as u64,
            );
            for piece in [1, 2, 3, 7, usize::MAX] {
                let mut d = DecodedDigest::new();
                for p in body.chunks(piece.min(body.len().max(1))) {
                    d.update(p);
                }
                assert_eq!(d.finish(), want, "body {body:?} in pieces of {piece}");
            }
        }
    }
}
