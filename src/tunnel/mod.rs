//! The call's "media": an encrypted, authenticated byte stream over TCP.
//!
//! `record` is the pure record layer; `TunnelStream` is a thin `AsyncRead + AsyncWrite`
//! adapter so that the SMTP client and server run over it unchanged.

pub mod record;

use crate::handshake::SessionKeys;
use record::{Limits, Opened, Opener, RecordError, Sealer};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which end of the call we are: the caller sends with the caller->callee keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Caller,
    Callee,
}

/// Errors surfaced through `io::Error` (kind `InvalidData` or `UnexpectedEof`), with this
/// as the inner error, so callers can tell tampering from truncation.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the stream ended without the authenticated close (truncated)")]
    Truncated,
}

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> Self {
        let kind = match e {
            TunnelError::Truncated => io::ErrorKind::UnexpectedEof,
            TunnelError::Record(_) => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Largest payload we put in one record when writing.
const WRITE_CHUNK: usize = 16 * 1024;
/// Sealed bytes we hold before pushing back on the writer; also what one `poll_write`
/// seals at most (several records, one socket write).
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Write buffer capacity kept across a flush; a larger one is given back.
const WRITE_KEEP: usize = 4 * 1024;
/// Read buffer beyond one maximal record, so that one socket read brings several records.
const READ_EXTRA: usize = 192 * 1024;
/// The read buffer at most: one maximal record and the extra.
const READ_MAX: usize = record::HEADER_LEN + record::MAX_CIPHERTEXT + READ_EXTRA;
/// The read buffer a stream takes when bytes come. It doubles (up to [`READ_MAX`]) when a
/// record does not fit or a socket read fills it, so a call that carries little (SMTP
/// commands, small messages) holds 2 kB while it works, and a bulk transfer reaches
/// full-size reads after a few records.
const READ_INITIAL: usize = 2 * 1024;
/// What an idle stream reads into (on the stack) before it takes a read buffer.
const READ_PROBE: usize = 2 * 1024;
/// A buffer up to this size is given back whenever the stream waits with nothing
/// buffered: 10,000 idle calls on one relay are a design point (docs/PERFORMANCE.md).
/// Only a stream whose buffer grew past it for bulk keeps its buffer between reads.
const READ_RELEASE: usize = 32 * 1024;

pub struct TunnelStream<S> {
    inner: S,
    sealer: Sealer,
    opener: Opener,
    /// Raw bytes read from the socket; `rpos..rlen` not yet consumed.
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    /// Decrypted payload waiting to be read: `rbuf[plain]`.
    plain: std::ops::Range<usize>,
    /// Sealed bytes not yet written: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// A record that failed to open while filling a read; returned by the next read.
    read_err: Option<io::Error>,
    /// Set once the peer's CLOSE was read: reads return EOF from then on.
    peer_closed: bool,
    close_sealed: bool,
    /// Total bytes written to the socket (for tests and stats).
    pub wire_bytes_written: u64,
}

impl<S> std::fmt::Debug for TunnelStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("sealer", &self.sealer)
            .field("opener", &self.opener)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TunnelStream<S> {
    pub fn new(inner: S, keys: &SessionKeys, role: Role, limits: Limits) -> Self {
        let (send, recv) = match role {
            Role::Caller => (&keys.caller_to_callee, &keys.callee_to_caller),
            Role::Callee => (&keys.callee_to_caller, &keys.caller_to_callee),
        };
        TunnelStream {
            inner,
            sealer: Sealer::with_suite(keys.suite, send, limits),
            opener: Opener::with_suite(keys.suite, recv),
            rbuf: Vec::new(),
            rpos: 0,
            rlen: 0,
            plain: 0..0,
            // Grows as records are sealed (at most the high-water mark and one record).
            wbuf: Vec::new(),
            wpos: 0,
            read_err: None,
            peer_closed: false,
            close_sealed: false,
            wire_bytes_written: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Read and open the next record, for the callee's check that the connection really
    /// comes from the caller (the caller sends an empty DATA record first).
    pub async fn read_first_record(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_next_record(cx))
            .await
            .map(|_| ())
    }

    /// Send an empty DATA record: proves to the callee that this connection holds the keys.
    pub async fn send_hello(&mut self) -> io::Result<()> {
        self.sealer
            .seal_data(&[], &mut self.wbuf)
            .map_err(|e| io::Error::from(TunnelError::Record(e)))?;
        tokio::io::AsyncWriteExt::flush(self).await
    }

    /// Open the next record if it is already in `rbuf`: Some(true) for DATA (in `plain`),
    /// Some(false) for a KEY_UPDATE or the CLOSE (then `peer_closed`), None if the record
    /// is not complete yet. A record that fails to open is an error.
    fn open_buffered(&mut self) -> io::Result<Option<bool>> {
        let avail = &mut self.rbuf[self.rpos..self.rlen];
        let Some((opened, used)) = self.opener.open(avail).map_err(TunnelError::Record)? else {
            return Ok(None);
        };
        let base = self.rpos;
        self.rpos += used;
        Ok(Some(match opened {
            Opened::Data(r) => {
                self.plain = base + r.start..base + r.end;
                true
            }
            Opened::Close => {
                self.peer_closed = true;
                false
            }
            Opened::KeyUpdate => false,
        }))
    }

    /// Open one record from the socket. Ready(Ok(true)) if a record was processed,
    /// Ready(Ok(false)) at the authenticated end.
    fn poll_next_record(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if self.peer_closed {
                return Poll::Ready(Ok(false));
            }
            match self.open_buffered()? {
                Some(true) => return Poll::Ready(Ok(true)),
                Some(false) => continue, // KEY_UPDATE, or CLOSE (checked above)
                None => {
                    // Compact, then read more. A buffer full of one incomplete record is
                    // too small for it: grow (READ_MAX holds any record).
                    if self.rpos > 0 {
                        self.rbuf.copy_within(self.rpos..self.rlen, 0);
                        self.rlen -= self.rpos;
                        self.rpos = 0;
                    }
                    if self.rlen == 0 && self.rbuf.len() <= READ_RELEASE {
                        ready!(self.poll_read_idle(cx))?;
                        continue;
                    }
                    if self.rlen == self.rbuf.len() {
                        self.grow_read_buffer();
                    }
                    let mut rb = ReadBuf::new(&mut self.rbuf[self.rlen..]);
                    ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(TunnelError::Truncated.into()));
                    }
                    self.rlen += n;
                    // A read that filled the buffer: more is coming, read more at once.
                    if self.rlen == self.rbuf.len() {
                        self.grow_read_buffer();
                    }
                }
            }
        }
    }

    /// A read with nothing buffered, on a stream that is not in bulk (its buffer did not
    /// grow past [`READ_RELEASE`]): read into the stack first, so that a call waiting for
    /// its next command or reply holds no read buffer at all (the buffer is given back
    /// when the read waits), and take a buffer only when bytes come.
    fn poll_read_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut probe = [0u8; READ_PROBE];
        let mut rb = ReadBuf::new(&mut probe);
        if Pin::new(&mut self.inner)
            .poll_read(cx, &mut rb)?
            .is_pending()
        {
            self.rbuf = Vec::new();
            return Poll::Pending;
        }
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(TunnelError::Truncated.into()));
        }
        if self.rbuf.len() < READ_INITIAL {
            self.rbuf = vec![0; READ_INITIAL];
        }
        self.rbuf[..n].copy_from_slice(rb.filled());
        self.rlen = n;
        Poll::Ready(Ok(()))
    }

    /// Double the read buffer, up to [`READ_MAX`].
    fn grow_read_buffer(&mut self) {
        let len = (self.rbuf.len() * 2).min(READ_MAX);
        self.rbuf.resize(len, 0);
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
            self.wire_bytes_written += n as u64;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TunnelStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.read_err.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                // Fill the caller's buffer from records already received, without another
                // socket read; an error or the CLOSE is reported at the next call.
                while buf.remaining() > 0 && this.plain.is_empty() && !this.peer_closed {
                    match this.open_buffered() {
                        Ok(Some(true)) => {
                            let n = this.plain.len().min(buf.remaining());
                            buf.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                            this.plain.start += n;
                        }
                        Ok(Some(false)) => continue,
                        Ok(None) => break,
                        Err(e) => {
                            this.read_err = Some(e);
                            break;
                        }
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if !ready!(this.poll_next_record(cx))? {
                return Poll::Ready(Ok(())); // authenticated EOF
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TunnelStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wbuf.len() - this.wpos >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        // Seal as many records as the data fills, up to the high-water mark, so that one
        // socket write carries several records.
        let mut n = 0;
        while n < data.len() && (n == 0 || this.wbuf.len() - this.wpos < WRITE_HIGH_WATER) {
            let m = (data.len() - n).min(WRITE_CHUNK);
            this.sealer
                .seal_data(&data[n..n + m], &mut this.wbuf)
                .map_err(|e| io::Error::from(TunnelError::Record(e)))?;
            n += m;
        }
        // Opportunistic: push what we can now, but the data is accepted either way.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        // A flush ends a burst (SMTP replies, a message's end). What one large burst grew
        // (a batch of receipts, a message's DATA) is not kept for a call that may now idle
        // for minutes: 16-32 kB write buffers were the largest part of the heap of 1,000
        // calls at its peak (docs/PERFORMANCE.md).
        if this.wbuf.capacity() > WRITE_KEEP {
            this.wbuf = Vec::new();
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sealed {
            this.sealer
                .seal_close(&mut this.wbuf)
                .map_err(|e| io::Error::from(TunnelError::Record(e)))?;
            this.close_sealed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Is this I/O error the tunnel reporting truncation?
pub fn is_truncation(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<TunnelError>())
        .is_some_and(|t| matches!(t, TunnelError::Truncated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{Continuity, DirectionKeys, RetainedSecret, SessionKeys, Suite};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One record of the largest payload, sealed directly by `caller`, read whole by `callee`.
    async fn a_maximal_record_arrives<S: AsyncRead + AsyncWrite + Unpin>(
        caller: &mut TunnelStream<S>,
        callee: &mut TunnelStream<S>,
    ) {
        let big: Vec<u8> = (0..record::MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
        caller.sealer.seal_data(&big, &mut caller.wbuf).unwrap();
        caller.flush().await.unwrap();
        let mut got = vec![0u8; big.len()];
        callee.read_exact(&mut got).await.unwrap();
        assert!(got == big, "the maximal record arrived changed");
    }

    fn keys() -> SessionKeys {
        SessionKeys {
            suite: Suite::ChaCha20Poly1305,
            caller_to_callee: DirectionKeys {
                key: [1; 32],
                iv: [2; 12],
            },
            callee_to_caller: DirectionKeys {
                key: [3; 32],
                iv: [4; 12],
            },
            sas: String::new(),
            transcript_hash: [0; 32],
            retained: RetainedSecret::from_bytes([5; 32]),
            continuity: Continuity::Matched,
        }
    }

    /// The read buffer is taken at 2 kB and stays there for small records (SMTP commands);
    /// a record of the largest size, and a bulk stream, make it grow, never past
    /// READ_MAX, and every byte arrives as sent.
    #[tokio::test]
    async fn the_read_buffer_grows_only_when_the_records_need_it() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let k = keys();
        let mut caller = TunnelStream::new(a, &k, Role::Caller, Limits::default());
        let mut callee = TunnelStream::new(b, &k, Role::Callee, Limits::default());
        caller.write_all(b"EHLO a.test\r\n").await.unwrap();
        caller.flush().await.unwrap();
        let mut line = [0u8; 13];
        callee.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"EHLO a.test\r\n");
        assert_eq!(callee.rbuf.len(), READ_INITIAL, "small records: no growth");

        // One record of the largest payload (our writer seals 16 kB records; a peer may
        // send 64 kB ones).
        a_maximal_record_arrives(&mut caller, &mut callee).await;
        assert!(callee.rbuf.len() >= record::HEADER_LEN + record::MAX_CIPHERTEXT);

        // A bulk stream through the ordinary writer.
        let bulk: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let send = bulk.clone();
        let writer = tokio::spawn(async move {
            caller.write_all(&send).await.unwrap();
            caller.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        callee.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == bulk, "the bulk stream arrived changed");
        assert!(callee.rbuf.len() <= READ_MAX);
    }

    /// A stream waiting with nothing buffered holds no read buffer; the next bytes are
    /// read whole, also when they are more than the stack's probe holds, and a stream
    /// whose buffer grew for bulk keeps it.
    #[tokio::test]
    async fn an_idle_stream_holds_no_read_buffer() {
        use std::future::Future;
        let (a, b) = tokio::io::duplex(1 << 20);
        let k = keys();
        let mut caller = TunnelStream::new(a, &k, Role::Caller, Limits::default());
        let mut callee = TunnelStream::new(b, &k, Role::Callee, Limits::default());
        let mut line = [0u8; 13];
        for _ in 0..2 {
            caller.write_all(b"EHLO a.test\r\n").await.unwrap();
            caller.flush().await.unwrap();
            callee.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"EHLO a.test\r\n");
            // Nothing more was sent: the read waits, and gives the buffer back.
            let mut one = [0u8; 1];
            let read = std::pin::pin!(callee.read(&mut one));
            let waker = std::task::Waker::noop();
            let pending = read.poll(&mut Context::from_waker(waker));
            assert!(pending.is_pending());
            assert_eq!(
                callee.rbuf.capacity(),
                0,
                "an idle stream kept its read buffer"
            );
        }
        // More than the probe at once: several records, read in full.
        let text: Vec<u8> = (0..READ_PROBE * 3).map(|i| b'a' + (i % 26) as u8).collect();
        for c in text.chunks(100) {
            caller.write_all(c).await.unwrap();
        }
        caller.flush().await.unwrap();
        let mut got = vec![0u8; text.len()];
        callee.read_exact(&mut got).await.unwrap();
        assert!(
            got == text,
            "the records after the idle read arrived changed"
        );

        // A maximal record grows the buffer past READ_RELEASE: a bulk stream keeps it.
        a_maximal_record_arrives(&mut caller, &mut callee).await;
        let grown = callee.rbuf.len();
        assert!(grown > READ_RELEASE, "the buffer did not grow: {grown}");
        let mut one = [0u8; 1];
        let read = std::pin::pin!(callee.read(&mut one));
        let waker = std::task::Waker::noop();
        assert!(read.poll(&mut Context::from_waker(waker)).is_pending());
        assert_eq!(
            callee.rbuf.len(),
            grown,
            "a bulk stream gave its buffer back"
        );
    }

    /// A large burst (a batch of receipts in one reply) grows the write buffer; the flush
    /// that ends it gives the memory back, so an idle call does not keep it. Small writes
    /// keep their small buffer (no allocation per reply).
    #[tokio::test]
    async fn a_flush_gives_back_what_a_large_burst_grew() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let k = keys();
        let mut callee = TunnelStream::new(b, &k, Role::Callee, Limits::default());
        let mut caller = TunnelStream::new(a, &k, Role::Caller, Limits::default());
        callee.write_all(b"250 ok\r\n").await.unwrap();
        callee.flush().await.unwrap();
        let small = callee.wbuf.capacity();
        assert!(small > 0 && small <= WRITE_KEEP, "small reply: {small}");

        let burst: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
        callee.write_all(&burst).await.unwrap();
        callee.flush().await.unwrap();
        assert!(
            callee.wbuf.capacity() <= WRITE_KEEP,
            "after a 40 kB burst the write buffer keeps {} bytes",
            callee.wbuf.capacity()
        );
        let mut got = vec![0u8; 8 + burst.len()];
        caller.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], b"250 ok\r\n");
        assert!(got[8..] == burst[..], "the burst arrived changed");
    }
}
