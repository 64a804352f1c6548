//! The DATA phase, both directions, as pure incremental transforms.
//!
//! [`DataReceiver`] (server): dot-unstuffing, end only at `CRLF . CRLF`,
//! any bare CR or bare LF marks the message as rejected (SMTP smuggling
//! defence), size limit. [`DotStuffer`] (client): line-ending normalisation
//! to CRLF, dot-stuffing, and the terminating `.CRLF`.

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
        }
    }

    /// Whether the terminating `CRLF.CRLF` has been consumed.
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

    /// Consumes input up to and including the end marker. Returns the number
    /// of bytes consumed; bytes after the end marker are left for the caller
    /// (pipelined commands).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
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
                        // Fast path: copy the run up to the next CR/LF.
                        let run = input[i..]
                            .iter()
                            .position(|&c| c == b'\r' || c == b'\n')
                            .unwrap_or(input.len() - i);
                        self.emit(out, &input[i..i + run]);
                        self.state = RxState::Mid;
                        i += run;
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
                        let run = input[i..]
                            .iter()
                            .position(|&c| c == b'\r' || c == b'\n')
                            .unwrap_or(input.len() - i);
                        self.emit(out, &input[i..i + run]);
                        i += run;
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
        }
    }

    /// Encodes `input`, appending to `out`.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 4);
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                }
                _ => {
                    if self.at_line_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    self.at_line_start = false;
                }
            }
        }
    }

    /// Ends the message: CRLF if the last line is unterminated, then `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        self.pending_cr = false;
        self.at_line_start = true;
        out.extend_from_slice(b".\r\n");
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
}
