//! SMTP client: greeting, EHLO (HELO fallback), pipelined or step-by-step
//! transactions with a streamed, dot-stuffed body. Every wait is bounded.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::data::DotStuffer;
use super::reply::{Reply, ReplyLimits, parse_reply};

/// Client timeouts; defaults are the RFC 5321 §4.5.3.2 values.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// Initial 220 greeting (5 min).
    pub greeting: Duration,
    /// EHLO/HELO, RSET, NOOP, QUIT replies (5 min).
    pub command: Duration,
    /// MAIL reply (5 min).
    pub mail: Duration,
    /// Each RCPT reply (5 min).
    pub rcpt: Duration,
    /// DATA initiation, the 354 (2 min).
    pub data_init: Duration,
    /// Each write of a data block (3 min).
    pub data_block: Duration,
    /// Reply after the final `.` (10 min).
    pub data_term: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        ClientTimeouts {
            greeting: min(5),
            command: min(5),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_term: min(10),
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The greeting or EHLO/HELO was refused.
    #[error("rejected: {0}")]
    Rejected(Reply),
    /// The end of the message was sent but no reply came back: the server may have
    /// accepted it, so sending it again may deliver it twice (RFC 5321 §6.1).
    #[error("{0}, after the end of the message was sent (it may have been accepted)")]
    Unconfirmed(Box<ClientError>),
}

impl ClientError {
    /// Only a 5xx rejection is permanent; I/O, timeouts and protocol errors
    /// are worth retrying later.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ClientError::Rejected(r) if r.is_permanent())
    }

    /// The connection failed after the whole message was sent: a retry may duplicate it.
    pub fn is_unconfirmed(&self) -> bool {
        matches!(self, ClientError::Unconfirmed(_))
    }
}

/// Sees the message's bytes as they go on the wire (see [`SmtpClient::send_tx_observed`]),
/// and how they are framed there.
///
/// The client hands [`see`](Observe::see) at most [`OBSERVE_MAX`] bytes at a time, and
/// before each piece waits, without blocking its thread, until
/// [`poll_ready`](Observe::poll_ready) says the observer can take it. So an observer that
/// passes the bytes to a thread of its own (the receipt's hash of a big message) holds
/// the sending task back while that thread is behind, instead of blocking a worker of the
/// async runtime.
pub trait Observe: Send {
    /// Ready when the next [`see`](Self::see) will not block. The default: always.
    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::task::Poll::Ready(())
    }
    /// The next bytes of the message as they go on the wire (at most [`OBSERVE_MAX`]).
    fn see(&mut self, framing: Framing, bytes: &[u8]);
}

/// The most bytes one [`Observe::see`] is given.
pub const OBSERVE_MAX: usize = 256 * 1024;

/// See [`SmtpClient::send_tx_observed`].
pub type Observer<'a> = &'a mut dyn Observe;

/// Shows `bytes` to the observer, if any: in pieces of at most [`OBSERVE_MAX`], each
/// once the observer is ready for it.
async fn show(observe: &mut Option<Observer<'_>>, framing: Framing, bytes: &[u8]) {
    let Some(o) = observe.as_mut() else {
        return;
    };
    for piece in bytes.chunks(OBSERVE_MAX) {
        std::future::poll_fn(|cx| o.poll_ready(cx)).await;
        o.see(framing, piece);
    }
}

/// How a message's bytes go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After DATA: dot-stuffed, ending with `.CRLF`.
    Data,
    /// In BDAT chunks (RFC 3030): the bytes as they are, counted.
    Chunks,
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// EHLO succeeded (false: HELO fallback, no extensions).
    pub esmtp: bool,
    pub pipelining: bool,
    /// `SIZE` was offered; `Some(0)` means no fixed limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub enhanced_status_codes: bool,
    /// RFC 3461 DSN parameters are understood.
    pub dsn: bool,
    /// RFC 6531 internationalized addresses are understood.
    pub smtputf8: bool,
    /// RFC 3030 BDAT is understood.
    pub chunking: bool,
    /// The in-call receipt extension (`XRECEIPT sipmail-receipt/1`) is offered.
    pub receipts: bool,
    /// All EHLO keyword lines (after the first), as sent.
    pub raw: Vec<String>,
}

impl Extensions {
    fn from_ehlo(reply: &Reply) -> Self {
        let mut ext = Extensions {
            esmtp: true,
            ..Default::default()
        };
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            ext.raw.push(line.to_string());
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                "DSN" => ext.dsn = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "CHUNKING" => ext.chunking = true,
                super::server::RECEIPT_KEYWORD => {
                    ext.receipts = words.next() == Some(super::server::RECEIPT_VERSION)
                }
                "SIZE" => {
                    ext.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0));
                }
                _ => {}
            }
        }
        ext
    }
}

/// The MAIL parameters of one transaction, beyond BODY (which follows 8BITMIME).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailOptions {
    /// Declared with `SIZE=` when the server offers SIZE.
    pub size: Option<u64>,
    /// The message needs SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Passed on with `RET=` / `ENVID=` when the server offers DSN.
    pub ret: Option<super::Ret>,
    pub envid: Option<String>,
    /// Our queue ID, sent as `XQID=` (asking for a signed receipt) when the server offers
    /// the receipt extension.
    pub xqid: Option<String>,
}

/// Result of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// The reply to MAIL FROM.
    pub mail: Reply,
    /// One reply per recipient, in order. If MAIL was refused, every
    /// recipient carries the MAIL reply.
    pub per_rcpt: Vec<(String, Reply)>,
    /// The reply that decides the message: the final reply after the body,
    /// or a refusal of DATA. `None` when DATA was not attempted (MAIL refused
    /// or no recipient accepted).
    pub data: Option<Reply>,
}

impl SendOutcome {
    /// Recipients for which the message was accepted.
    pub fn delivered(&self) -> Vec<&str> {
        match &self.data {
            Some(d) if d.is_positive() => self
                .per_rcpt
                .iter()
                .filter(|(_, r)| r.is_positive())
                .map(|(a, _)| a.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }
}

const BODY_CHUNK: usize = 256 * 1024;

/// An SMTP client connection over any async stream.
#[derive(Debug)]
pub struct SmtpClient<S: AsyncRead + AsyncWrite + Unpin + Send> {
    stream: S,
    rbuf: Vec<u8>,
    timeouts: ClientTimeouts,
    limits: ReplyLimits,
    greeting: Reply,
    ehlo: Reply,
    ext: Extensions,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> SmtpClient<S> {
    /// Reads the greeting and introduces itself with EHLO (HELO if EHLO is
    /// refused with 5xx).
    pub async fn connect(
        stream: S,
        helo_name: &str,
        timeouts: ClientTimeouts,
    ) -> Result<Self, ClientError> {
        if helo_name.is_empty() || helo_name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ClientError::Protocol(format!(
                "invalid helo name {helo_name:?}"
            )));
        }
        let mut c = SmtpClient {
            stream,
            rbuf: Vec::with_capacity(1024),
            timeouts,
            limits: ReplyLimits::default(),
            greeting: Reply::plain(0, ""),
            ehlo: Reply::plain(0, ""),
            ext: Extensions::default(),
        };
        let greeting = c.read_reply(timeouts.greeting, "greeting").await?;
        if greeting.code != 220 {
            let _ = c.write(b"QUIT\r\n", timeouts.command, "QUIT").await;
            return Err(ClientError::Rejected(greeting));
        }
        c.greeting = greeting;
        let ehlo = c
            .command(&format!("EHLO {helo_name}\r\n"), timeouts.command, "EHLO")
            .await?;
        if ehlo.code == 250 {
            c.ext = Extensions::from_ehlo(&ehlo);
            c.ehlo = ehlo;
        } else if ehlo.is_permanent() {
            let helo = c
                .command(&format!("HELO {helo_name}\r\n"), timeouts.command, "HELO")
                .await?;
            if helo.code != 250 {
                let _ = c.write(b"QUIT\r\n", timeouts.command, "QUIT").await;
                return Err(ClientError::Rejected(helo));
            }
            c.ehlo = helo;
        } else {
            let _ = c.write(b"QUIT\r\n", timeouts.command, "QUIT").await;
            return Err(ClientError::Rejected(ehlo));
        }
        Ok(c)
    }

    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// The EHLO (or HELO) reply.
    pub fn ehlo_reply(&self) -> &Reply {
        &self.ehlo
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        limit: Duration,
        what: &'static str,
    ) -> Result<(), ClientError> {
        match tokio::time::timeout(limit, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        {
            Ok(r) => Ok(r?),
            Err(_) => Err(ClientError::Timeout(what)),
        }
    }

    /// Reads one reply; `limit` bounds the whole wait.
    async fn read_reply(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Reply, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.rbuf, self.limits) {
                Ok(Some((reply, n))) => {
                    self.rbuf.drain(..n);
                    tracing::trace!(code = reply.code, what, "reply");
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.0)),
            }
            let mut tmp = [0u8; 4096];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => return Err(ClientError::Timeout(what)),
                Ok(r) => r?,
            };
            if n == 0 {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed while waiting for {what}"),
                )));
            }
            self.rbuf.extend_from_slice(&tmp[..n]);
        }
    }

    async fn command(
        &mut self,
        line: &str,
        limit: Duration,
        what: &'static str,
    ) -> Result<Reply, ClientError> {
        self.write(line.as_bytes(), limit, what).await?;
        self.read_reply(limit, what).await
    }

    /// RSET.
    pub async fn rset(&mut self) -> Result<Reply, ClientError> {
        self.command("RSET\r\n", self.timeouts.command, "RSET")
            .await
    }

    /// NOOP.
    pub async fn noop(&mut self) -> Result<Reply, ClientError> {
        self.command("NOOP\r\n", self.timeouts.command, "NOOP")
            .await
    }

    /// `XRECEIPT FETCH` (the receipt extension, docs/PROTOCOL.md §4b): the server's
    /// `delivered` receipts waiting for us, as reply lines for
    /// [`crate::receipt::wire::parse_reply_lines`].
    pub async fn receipts_fetch(&mut self) -> Result<Reply, ClientError> {
        self.command(
            "XRECEIPT FETCH\r\n",
            self.timeouts.command,
            "XRECEIPT FETCH",
        )
        .await
    }

    /// `XRECEIPT ACK n`: the first `n` receipts of the last fetch are stored.
    pub async fn receipts_ack(&mut self, n: usize) -> Result<Reply, ClientError> {
        self.command(
            &format!("XRECEIPT ACK {n}\r\n"),
            self.timeouts.command,
            "XRECEIPT ACK",
        )
        .await
    }

    /// QUIT, then wait for 221 (EOF instead is tolerated).
    pub async fn quit(mut self) -> Result<(), ClientError> {
        let t = self.timeouts.command;
        self.write(b"QUIT\r\n", t, "QUIT").await?;
        match self.read_reply(t, "QUIT").await {
            Ok(_) => {}
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) => {}
            Err(e) => return Err(e),
        }
        let _ = tokio::time::timeout(t, self.stream.shutdown()).await;
        Ok(())
    }

    fn check_address(addr: &str) -> Result<(), ClientError> {
        if addr.len() > 1000
            || addr
                .bytes()
                .any(|b| b < b' ' || b == 0x7f || b == b'<' || b == b'>')
        {
            return Err(ClientError::Protocol(format!(
                "invalid address {:?}",
                super::reply::excerpt(addr.as_bytes())
            )));
        }
        Ok(())
    }

    /// Sends one message. See [`send_sized`](Self::send_sized).
    pub async fn send(
        &mut self,
        from: &str,
        rcpts: &[String],
        body: impl AsyncRead + Unpin,
    ) -> Result<SendOutcome, ClientError> {
        self.send_sized(from, rcpts, body, None).await
    }

    /// Sends one message; `size` (if known) is declared with `SIZE=` when the
    /// server offers it. With PIPELINING, MAIL, all RCPTs and DATA go out in
    /// one write. The body is streamed in chunks, normalised to CRLF and
    /// dot-stuffed. When no recipient is accepted, RSET is sent instead of
    /// the body. Errors are returned only for transport/protocol failures;
    /// SMTP refusals are in the outcome.
    pub async fn send_sized(
        &mut self,
        from: &str,
        rcpts: &[String],
        body: impl AsyncRead + Unpin,
        size: Option<u64>,
    ) -> Result<SendOutcome, ClientError> {
        let opts = MailOptions {
            size,
            ..MailOptions::default()
        };
        self.send_tx(from, rcpts, &[], &opts, body).await
    }

    /// Sends one message with its SMTPUTF8 and DSN parameters. `rcpt_params` holds
    /// each recipient's NOTIFY/ORCPT (missing entries: none); they and RET/ENVID go out
    /// only if the server offers DSN. A message whose envelope needs SMTPUTF8 is not
    /// sent to a server without it: every recipient then gets 553 5.6.7 (RFC 6531
    /// §3.2, no downgrade).
    pub async fn send_tx(
        &mut self,
        from: &str,
        rcpts: &[String],
        rcpt_params: &[super::RcptParams],
        opts: &MailOptions,
        body: impl AsyncRead + Unpin,
    ) -> Result<SendOutcome, ClientError> {
        self.send_tx_observed(from, rcpts, rcpt_params, opts, body, None)
            .await
    }

    /// As [`send_tx`](Self::send_tx); `observe` sees the message's bytes exactly as they
    /// go on the wire (CRLF-normalised; after DATA also dot-stuffed, with the final
    /// `.CRLF`), so a caller can compute what the server will have received.
    ///
    /// With CHUNKING and PIPELINING offered, a body that fits in one chunk goes out as
    /// `BDAT n LAST` in the same write as MAIL and RCPT: the whole transaction is one
    /// round trip, where DATA waits for its 354 first. A larger body goes with DATA.
    pub async fn send_tx_observed(
        &mut self,
        from: &str,
        rcpts: &[String],
        rcpt_params: &[super::RcptParams],
        opts: &MailOptions,
        mut body: impl AsyncRead + Unpin,
        observe: Option<Observer<'_>>,
    ) -> Result<SendOutcome, ClientError> {
        Self::check_address(from)?;
        for r in rcpts {
            Self::check_address(r)?;
        }
        let needs_utf8 = !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
        if needs_utf8 && !self.ext.smtputf8 {
            let no = Reply::new(
                553,
                (5, 6, 7),
                "the next hop does not offer SMTPUTF8, which this message's addresses need",
            );
            return Ok(SendOutcome {
                mail: no.clone(),
                per_rcpt: rcpts.iter().map(|r| (r.clone(), no.clone())).collect(),
                data: None,
            });
        }
        let t = self.timeouts;
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.ext.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if opts.smtputf8 && self.ext.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if let (Some(_), Some(size)) = (self.ext.size, opts.size) {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if self.ext.dsn {
            if let Some(ret) = opts.ret {
                mail.push_str(&format!(" RET={}", ret.as_str()));
            }
            if let Some(envid) = &opts.envid {
                mail.push_str(&format!(" ENVID={}", super::dsn::xtext(envid)));
            }
        }
        if let (true, Some(q)) = (self.ext.receipts, &opts.xqid) {
            mail.push_str(&format!(" XQID={q}"));
        }
        mail.push_str("\r\n");
        let dsn = self.ext.dsn;
        let rcpt_line = |i: usize, r: &str| {
            let mut line = format!("RCPT TO:<{r}>");
            if let Some(p) = rcpt_params.get(i).filter(|_| dsn) {
                if let Some(n) = p.notify {
                    line.push_str(&format!(" NOTIFY={}", n.value()));
                }
                if let Some(o) = &p.orcpt {
                    line.push_str(&format!(" ORCPT=rfc822;{}", super::dsn::xtext(o)));
                }
            }
            line.push_str("\r\n");
            line
        };

        // A body that fits in one chunk, read whole before anything is sent; the bytes
        // read are the start of the body for DATA otherwise.
        let mut head = Vec::new();
        if self.ext.chunking && self.ext.pipelining && !rcpts.is_empty() {
            // Read into spare capacity: no 256 KiB zeroed for a message of a few kB.
            head.reserve_exact(BODY_CHUNK);
            let fits = loop {
                if body.read_buf(&mut head).await? == 0 {
                    break true;
                }
                if head.len() >= BODY_CHUNK {
                    break false;
                }
            };
            if fits {
                let mut data = Vec::with_capacity(head.len() + 2);
                let mut enc = DotStuffer::chunking();
                enc.encode(&head, &mut data);
                enc.finish(&mut data);
                return self
                    .send_one_chunk(mail, rcpts, rcpt_line, &data, observe)
                    .await;
            }
        }

        let mut per_rcpt = Vec::with_capacity(rcpts.len());
        let mail_reply;
        let data_reply;
        if self.ext.pipelining {
            let mut batch = mail;
            for (i, r) in rcpts.iter().enumerate() {
                batch.push_str(&rcpt_line(i, r));
            }
            if !rcpts.is_empty() {
                batch.push_str("DATA\r\n");
            }
            self.write(batch.as_bytes(), t.mail, "MAIL").await?;
            mail_reply = self.read_reply(t.mail, "MAIL").await?;
            for r in rcpts {
                let reply = self.read_reply(t.rcpt, "RCPT").await?;
                per_rcpt.push((r.clone(), reply));
            }
            data_reply = if rcpts.is_empty() {
                None
            } else {
                Some(self.read_reply(t.data_init, "DATA").await?)
            };
        } else {
            mail_reply = self.command(&mail, t.mail, "MAIL").await?;
            if mail_reply.is_positive() {
                for (i, r) in rcpts.iter().enumerate() {
                    let reply = self.command(&rcpt_line(i, r), t.rcpt, "RCPT").await?;
                    per_rcpt.push((r.clone(), reply));
                }
            }
            let any = per_rcpt.iter().any(|(_, r)| r.is_positive());
            data_reply = if mail_reply.is_positive() && any {
                Some(self.command("DATA\r\n", t.data_init, "DATA").await?)
            } else {
                None
            };
        }
        let any_rcpt = Self::rcpt_outcome(&mail_reply, rcpts, &mut per_rcpt);

        match data_reply {
            Some(d) if d.code == 354 => {
                if any_rcpt {
                    let final_reply = self.send_body(&head, &mut body, observe).await?;
                    Ok(SendOutcome {
                        mail: mail_reply,
                        per_rcpt,
                        data: Some(final_reply),
                    })
                } else {
                    // A server that says 354 with no valid recipient: end
                    // the empty message, then reset.
                    self.write(b".\r\n", t.data_block, "DATA").await?;
                    let _ = self.read_reply(t.data_term, "end of data").await?;
                    self.rset().await?;
                    Ok(SendOutcome {
                        mail: mail_reply,
                        per_rcpt,
                        data: None,
                    })
                }
            }
            other => {
                self.rset().await?;
                let data = if any_rcpt { other } else { None };
                Ok(SendOutcome {
                    mail: mail_reply,
                    per_rcpt,
                    data,
                })
            }
        }
    }

    /// Each recipient's reply (the MAIL reply for all when MAIL was refused), and whether
    /// any recipient was accepted.
    fn rcpt_outcome(mail: &Reply, rcpts: &[String], per_rcpt: &mut Vec<(String, Reply)>) -> bool {
        if !mail.is_positive() {
            *per_rcpt = rcpts.iter().map(|r| (r.clone(), mail.clone())).collect();
        }
        mail.is_positive() && per_rcpt.iter().any(|(_, r)| r.is_positive())
    }

    /// MAIL, the RCPTs and `BDAT n LAST` with the whole (normalised) body, in one write;
    /// then their replies. The last one is the message's. Once the write has started the
    /// server may hold the message, so a failure from there on is
    /// [`ClientError::Unconfirmed`]. A refused transaction is reset.
    async fn send_one_chunk(
        &mut self,
        mail: String,
        rcpts: &[String],
        rcpt_line: impl Fn(usize, &str) -> String,
        data: &[u8],
        mut observe: Option<Observer<'_>>,
    ) -> Result<SendOutcome, ClientError> {
        let t = self.timeouts;
        let mut batch = mail.into_bytes();
        for (i, r) in rcpts.iter().enumerate() {
            batch.extend_from_slice(rcpt_line(i, r).as_bytes());
        }
        batch.extend_from_slice(format!("BDAT {} LAST\r\n", data.len()).as_bytes());
        batch.extend_from_slice(data);
        show(&mut observe, Framing::Chunks, data).await;
        let unconfirmed = |e| ClientError::Unconfirmed(Box::new(e));
        self.write(&batch, t.data_block, "MAIL ... BDAT")
            .await
            .map_err(unconfirmed)?;
        let mail_reply = self.read_reply(t.mail, "MAIL").await.map_err(unconfirmed)?;
        let mut per_rcpt = Vec::with_capacity(rcpts.len());
        for r in rcpts {
            let reply = self.read_reply(t.rcpt, "RCPT").await.map_err(unconfirmed)?;
            per_rcpt.push((r.clone(), reply));
        }
        let last = self
            .read_reply(t.data_term, "end of data")
            .await
            .map_err(unconfirmed)?;
        let any_rcpt = Self::rcpt_outcome(&mail_reply, rcpts, &mut per_rcpt);
        if !last.is_positive() {
            self.rset().await?;
        }
        Ok(SendOutcome {
            mail: mail_reply,
            per_rcpt,
            data: any_rcpt.then_some(last),
        })
    }

    async fn send_body(
        &mut self,
        head: &[u8],
        body: &mut (impl AsyncRead + Unpin),
        mut observe: Option<Observer<'_>>,
    ) -> Result<Reply, ClientError> {
        let t = self.timeouts;
        let mut stuffer = DotStuffer::new();
        let mut inbuf = vec![0u8; BODY_CHUNK];
        let mut out = Vec::with_capacity(BODY_CHUNK + BODY_CHUNK / 8);
        stuffer.encode(head, &mut out);
        loop {
            let n = body.read(&mut inbuf).await?;
            if n == 0 {
                break;
            }
            stuffer.encode(&inbuf[..n], &mut out);
            if out.len() >= BODY_CHUNK {
                show(&mut observe, Framing::Data, &out).await;
                self.write(&out, t.data_block, "data block").await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        show(&mut observe, Framing::Data, &out).await;
        // From here on the server may hold the whole message.
        let unconfirmed = |e| ClientError::Unconfirmed(Box::new(e));
        self.write(&out, t.data_block, "data block")
            .await
            .map_err(unconfirmed)?;
        self.read_reply(t.data_term, "end of data")
            .await
            .map_err(unconfirmed)
    }
}
