//! Trace headers (RFC 5321 §4.4) and RFC 5322 dates, without a date crate; and the
//! removal of look-alikes of our authenticated-peer field from incoming messages.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWrite;

/// The field a receiving relay puts at the top of mail that came through a call: the
/// authenticated peer, how it was authenticated, its key's fingerprint and the call.
/// Only the relay that spooled the message writes it; any copy from outside is removed.
pub(crate) const PEER_FIELD: &str = "X-Sipmail-Authenticated-Peer";

/// A header line longer than this that is still `PEER_FIELD` plus white space is taken
/// to be one (RFC 5322 caps a line at 998 octets; the held bytes stay bounded).
const MAX_HELD: usize = 998;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterState {
    /// At the start of a header line.
    LineStart,
    /// Reading a field name that may still be `PEER_FIELD` (the bytes are in `held`).
    Name,
    /// The rest of a line, kept or dropped.
    Line,
    /// After the empty line that ends the header section: everything passes.
    Body,
}

/// Removes every `X-Sipmail-Authenticated-Peer` field (any case, white space before the
/// colon, with its folded continuation lines) from the header section of a message given
/// in pieces; the body is not looked at. Incremental and pure: feed it the message as it
/// arrives. Holds back at most one partial field name.
#[derive(Debug)]
pub(crate) struct HeaderFilter {
    state: FilterState,
    held: Vec<u8>,
    /// The current field is being removed (its continuation lines too).
    dropping: bool,
}

impl Default for HeaderFilter {
    fn default() -> Self {
        HeaderFilter {
            state: FilterState::LineStart,
            held: Vec::new(),
            dropping: false,
        }
    }
}

impl HeaderFilter {
    /// The header section is over: the rest passes unchanged.
    pub fn in_body(&self) -> bool {
        self.state == FilterState::Body
    }

    /// Could `held` followed by `b` still be `PEER_FIELD *WSP`?
    fn may_match(&self, b: u8) -> bool {
        let name = PEER_FIELD.as_bytes();
        match name.get(self.held.len()) {
            Some(c) => c.eq_ignore_ascii_case(&b),
            None => b == b' ' || b == b'\t',
        }
    }

    /// Filters `input`, appending what is kept to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                FilterState::Body => {
                    out.extend_from_slice(&input[i..]);
                    return;
                }
                FilterState::LineStart => match input[i] {
                    // The empty line (CRLF; bare CR or LF never get this far).
                    b'\r' | b'\n' => self.state = FilterState::Body,
                    // A folded continuation: kept or dropped with its field.
                    b' ' | b'\t' => self.state = FilterState::Line,
                    _ => {
                        self.dropping = false;
                        self.state = FilterState::Name;
                    }
                },
                FilterState::Name => {
                    let b = input[i];
                    if b == b':' && self.held.len() >= PEER_FIELD.len() {
                        self.held.clear();
                        self.dropping = true;
                        self.state = FilterState::Line;
                    } else if self.may_match(b) && self.held.len() < MAX_HELD {
                        self.held.push(b);
                        i += 1;
                    } else if self.held.len() >= MAX_HELD {
                        self.held.clear();
                        self.dropping = true;
                        self.state = FilterState::Line;
                    } else {
                        out.append(&mut self.held);
                        self.state = FilterState::Line;
                    }
                }
                FilterState::Line => {
                    let rest = &input[i..];
                    let n = memchr::memchr(b'\n', rest).map_or(rest.len(), |p| {
                        self.state = FilterState::LineStart;
                        p + 1
                    });
                    if !self.dropping {
                        out.extend_from_slice(&rest[..n]);
                    }
                    i += n;
                }
            }
        }
    }

    /// The message ended: a held name that never got its colon is kept as it was.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
    }
}

/// An `AsyncWrite` that passes a message through [`HeaderFilter`] on its way into `W`.
/// Once the header section is over, writes go straight to `W`: a large body costs one
/// branch per write.
#[derive(Debug)]
pub(crate) struct StripPeerField<W> {
    inner: W,
    filter: HeaderFilter,
    /// Filtered bytes not yet taken by `inner`, from `done` on.
    pending: Vec<u8>,
    done: usize,
}

impl<W: AsyncWrite + Unpin> StripPeerField<W> {
    pub fn new(inner: W) -> Self {
        StripPeerField {
            inner,
            filter: HeaderFilter::default(),
            pending: Vec::new(),
            done: 0,
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.done < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.done += n;
        }
        self.pending.clear();
        self.done = 0;
        Poll::Ready(Ok(()))
    }

    /// The end of the message: writes out what the filter still holds, and returns `W`.
    pub async fn into_inner(mut self) -> io::Result<W> {
        self.filter.finish(&mut self.pending);
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        Ok(self.inner)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StripPeerField<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.filter.in_body() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.filter.feed(buf, &mut this.pending);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The authenticated-peer field, folded, ending in CRLF. `fingerprint` is `None` for a
/// PSK peer (no key: what it presented is not bound to anything we hold).
pub(crate) fn peer_field(
    domain: &str,
    auth: &str,
    fingerprint: Option<&str>,
    call_id: &str,
) -> String {
    // The Call-ID is the caller's choice: no `;` or quotes that could fake a parameter.
    let call_id: String = clean(call_id)
        .chars()
        .filter(|c| !matches!(c, ';' | '"' | '\\' | '(' | ')' | ' '))
        .collect();
    let fpr = fingerprint
        .map(|f| format!("\r\n\tfingerprint={};", clean(f)))
        .unwrap_or_default();
    format!(
        "{PEER_FIELD}: {}; auth={auth};{fpr}\r\n\tcall-id={call_id}\r\n",
        clean(domain)
    )
}

/// `Sun, 22 Nov 2026 12:00:00 +0000`
pub(crate) fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let (y, m, d) = crate::time::civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days.rem_euclid(7)) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Keep header values to printable ASCII without CR/LF, so a peer's HELO name cannot
/// inject header lines.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_350_896);
        assert_eq!(rfc5322_date(t), "Sun, 22 Nov 2026 12:34:56 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    fn filter_in_pieces(msg: &[u8], piece: usize) -> Vec<u8> {
        let mut f = HeaderFilter::default();
        let mut out = Vec::new();
        for c in msg.chunks(piece.max(1)) {
            f.feed(c, &mut out);
        }
        f.finish(&mut out);
        out
    }

    #[test]
    fn peer_fields_are_removed_in_any_form_and_the_body_is_left_alone() {
        let msg = b"X-Sipmail-Authenticated-Peer: forged; fingerprint=AA\r\n\
From: a@b.test\r\n\
x-sipmail-authenticated-peer: site-b.test;\r\n\tfingerprint=BB;\r\n call-id=x\r\n\
Subject: hi\r\n\
\x20folded subject\r\n\
X-SIPMAIL-AUTHENTICATED-PEER \t:CC\r\n\
X-Sipmail-Authenticated-Peers: kept\r\n\
X-Sipmail-Authenticated: kept\r\n\
X-Sipmail-Authenticated-Peer\r\n\
\r\n\
X-Sipmail-Authenticated-Peer: body\r\n";
        let want = b"From: a@b.test\r\n\
Subject: hi\r\n\
\x20folded subject\r\n\
X-Sipmail-Authenticated-Peers: kept\r\n\
X-Sipmail-Authenticated: kept\r\n\
X-Sipmail-Authenticated-Peer\r\n\
\r\n\
X-Sipmail-Authenticated-Peer: body\r\n";
        for piece in [1, 2, 3, 7, 29, 30, 31, 64, msg.len()] {
            assert_eq!(
                String::from_utf8_lossy(&filter_in_pieces(msg, piece)),
                String::from_utf8_lossy(want),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn filter_edge_cases() {
        // No header at all; no empty line; a continuation first; a name cut at the end.
        for (msg, want) in [
            (&b"\r\nbody\r\n"[..], &b"\r\nbody\r\n"[..]),
            (b"X-Sipmail-Authenticated-Peer: x\r\n", b""),
            (b" odd\r\nA: b\r\n", b" odd\r\nA: b\r\n"),
            (b"X-Sipmail-Auth", b"X-Sipmail-Auth"),
            (b"", b""),
        ] {
            assert_eq!(filter_in_pieces(msg, 1), want);
            assert_eq!(filter_in_pieces(msg, 100), want);
        }
        // A name padded past any sane line length is taken for the field and dropped.
        let mut long = b"X-Sipmail-Authenticated-Peer".to_vec();
        long.extend(std::iter::repeat_n(b' ', 5000));
        long.extend_from_slice(b": x\r\nA: b\r\n");
        assert_eq!(filter_in_pieces(&long, 512), b"A: b\r\n");
    }

    #[tokio::test]
    async fn the_writer_filters_then_passes_the_body_through() {
        use tokio::io::AsyncWriteExt;
        let mut w = StripPeerField::new(Vec::new());
        w.write_all(b"A: 1\r\nX-Sipmail-Authenticated-Peer: f\r\n\r\n")
            .await
            .unwrap();
        let body = vec![b'x'; 300_000];
        w.write_all(&body).await.unwrap();
        w.flush().await.unwrap();
        let out = w.into_inner().await.unwrap();
        assert_eq!(&out[..8], b"A: 1\r\n\r\n");
        assert_eq!(out.len(), 8 + body.len());
    }

    #[test]
    fn the_field_cannot_be_steered_by_the_call_id() {
        let f = peer_field(
            "site-a.test",
            "signed",
            Some("ABCD"),
            "x; fingerprint=EE\r\nY: z",
        );
        assert_eq!(
            f,
            "X-Sipmail-Authenticated-Peer: site-a.test; auth=signed;\r\n\tfingerprint=ABCD;\r\n\tcall-id=xfingerprint=EEY:z\r\n"
        );
        let f = peer_field("site-a.test", "psk", None, "c1");
        assert_eq!(
            f,
            "X-Sipmail-Authenticated-Peer: site-a.test; auth=psk;\r\n\tcall-id=c1\r\n"
        );
    }

    #[test]
    fn clean_strips_line_breaks() {
        assert_eq!(clean("a\r\nX-Evil: 1"), "aX-Evil: 1");
    }
}
