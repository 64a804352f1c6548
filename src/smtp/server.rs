//! Sans-IO SMTP server session.
//!
//! The session owns an input buffer and an output buffer. The driver feeds
//! input ([`ServerSession::feed`]), then calls [`ServerSession::next_event`]
//! until it returns [`Event::NeedInput`], [`Event::Quit`] or [`Event::Close`].
//! Events that need a decision (MAIL, RCPT, DATA start, DATA end) must be
//! answered with the matching `*_result` method before asking for the next
//! event; until then the same event is returned again. Replies accumulate in
//! the output buffer ([`ServerSession::take_output`]); the driver writes
//! them whenever input runs out, which gives RFC 2920 batching for free.

use std::time::Duration;

use smtp_proto::Request;

use super::data::{DataReceiver, DataVerdict};
use super::reply::Reply;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Our host name, used in the greeting and EHLO answer.
    pub hostname: String,
    /// Text after the host name in the greeting.
    pub banner: String,
    /// Largest accepted message (after dot-unstuffing), advertised as SIZE.
    pub max_message_size: u64,
    /// Recipients per transaction (452 4.5.3 beyond).
    pub max_recipients: usize,
    /// Errors (5xx answers to commands) before 421 and close.
    pub max_errors: u32,
    /// Longest accepted command line including CRLF (500 5.5.2 beyond).
    pub max_line_len: usize,
    /// Idle time allowed while waiting for a command (driver).
    pub command_timeout: Duration,
    /// Idle time allowed between reads during DATA (driver).
    pub data_timeout: Duration,
    /// Size of one read from the stream (driver).
    pub read_buffer_size: usize,
    /// Offer the in-call receipt extension (`XRECEIPT` in EHLO, `XQID=` on MAIL; see
    /// docs/PROTOCOL.md §4b). Only inside a call with a signing partner, never to the site.
    pub receipts: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            banner: "ESMTP sipmail".into(),
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 10,
            max_line_len: 4096,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
            read_buffer_size: 64 * 1024,
            receipts: false,
        }
    }
}

/// The envelope of one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Name given with EHLO/HELO.
    pub helo: String,
    /// Reverse path; `""` for the null sender `<>`.
    pub mail_from: String,
    /// Accepted recipients.
    pub rcpt_to: Vec<String>,
    /// `BODY=8BITMIME` was given.
    pub body_8bit: bool,
    /// `SIZE=` was given.
    pub declared_size: Option<u64>,
    /// `SMTPUTF8` was given (RFC 6531).
    pub smtputf8: bool,
    /// `RET=` (RFC 3461).
    pub ret: Option<super::Ret>,
    /// `ENVID=`, xtext-decoded (RFC 3461).
    pub envid: Option<String>,
    /// DSN parameters of each accepted recipient, in the order of `rcpt_to`.
    pub rcpt_params: Vec<super::RcptParams>,
    /// `XQID=`: the sending relay's queue ID; the sender asks for a signed receipt.
    pub xqid: Option<String>,
}

/// Parameters of MAIL FROM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body_8bit: bool,
    pub smtputf8: bool,
    pub ret: Option<super::Ret>,
    pub envid: Option<String>,
    /// `XQID=` (receipt extension only).
    pub xqid: Option<String>,
}

/// Why the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT.
    Quit,
    /// The client closed the connection.
    ClientEof,
    /// Idle or data timeout (421 4.4.2 sent).
    Timeout,
    /// Too many errors (421 4.7.0 sent).
    TooManyErrors,
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Write pending output, then read more input (or report EOF).
    NeedInput,
    /// Ask the backend; answer with [`ServerSession::mail_from_result`].
    MailFrom { from: &'a str, params: MailParams },
    /// Ask the backend; answer with [`ServerSession::rcpt_to_result`].
    RcptTo {
        to: &'a str,
        params: &'a super::RcptParams,
    },
    /// Open the spool; answer with [`ServerSession::data_start_result`].
    DataStart { envelope: &'a Envelope },
    /// Message bytes (unstuffed, CRLF line endings) for the spool. If writing
    /// fails, call [`ServerSession::data_write_failed`].
    DataChunk(&'a [u8]),
    /// The message is complete and good: hand envelope and spool to the
    /// backend, answer with [`ServerSession::data_end_result`].
    DataEnd(Envelope),
    /// The message was rejected (reply already queued): discard the spool.
    DataAbort,
    /// `XRECEIPT FETCH` or `XRECEIPT ACK n` inside a call that offers receipts: ask the
    /// backend, answer with [`ServerSession::receipts_result`].
    Receipts(ReceiptCommand),
    /// QUIT: 221 queued. Write output and close.
    Quit,
    /// 421 queued (or the peer went away). Write output and close.
    Close(CloseReason),
}

/// The receipt extension's own command (docs/PROTOCOL.md §4b): fetch the `delivered`
/// receipts waiting for this client, or acknowledge the first `n` of the last batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptCommand {
    Fetch,
    Ack(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading command lines.
    Command,
    /// Discarding an over-long command line up to its LF.
    Discard,
    WaitMail,
    WaitRcpt,
    WaitDataStart,
    /// In DATA.
    Data,
    /// Reading the octets of a BDAT chunk (RFC 3030).
    Chunk,
    /// Discarding the octets of a refused BDAT chunk, to stay in step with the client.
    Skip,
    /// A BDAT transaction was ended by RSET or EHLO between its chunks: the open spool
    /// is to be discarded ([`Event::DataAbort`]).
    ChunkAbort,
    /// DATA finished, the event (end or abort) is to be delivered.
    DataFinished,
    WaitDataEnd,
    WaitReceipts(ReceiptCommand),
    Quit,
    Closed(CloseReason),
}

/// Counters kept over the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub messages_accepted: u32,
    pub messages_rejected: u32,
    pub errors: u32,
}

/// A sans-IO SMTP server session.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    peer: String,
    phase: Phase,
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
    chunk: Vec<u8>,
    helo: Option<String>,
    esmtp: bool,
    /// MAIL accepted: envelope under construction.
    tx: Option<Envelope>,
    pending_mail: Option<(String, MailParams)>,
    pending_rcpt: Option<(String, super::RcptParams)>,
    data: Option<DataReceiver>,
    /// BDAT: the chunk whose spool is being opened ([`Event::DataStart`]).
    pending_chunk: Option<(u64, bool)>,
    /// BDAT: a transaction's spool is open between its chunks.
    bdat_open: bool,
    /// Octets of a refused BDAT chunk still to discard.
    skip: u64,
    write_failed: bool,
    storage_full: bool,
    stats: SessionStats,
}

fn r(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, e, text)
}

impl ServerSession {
    /// A new session; the 220 greeting is queued in the output.
    pub fn new(config: ServerConfig, peer_ip: impl Into<String>) -> Self {
        let mut s = ServerSession {
            peer: peer_ip.into(),
            phase: Phase::Command,
            input: Vec::new(),
            pos: 0,
            output: Vec::new(),
            chunk: Vec::new(),
            helo: None,
            esmtp: false,
            tx: None,
            pending_mail: None,
            pending_rcpt: None,
            data: None,
            pending_chunk: None,
            bdat_open: false,
            skip: 0,
            write_failed: false,
            storage_full: false,
            stats: SessionStats::default(),
            config,
        };
        let greeting = Reply::plain(220, format!("{} {}", s.config.hostname, s.config.banner));
        s.push(&greeting);
        s
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Name given with EHLO/HELO, if any.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// True while message octets are being read, DATA or a BDAT chunk (the driver uses
    /// the data timeout and larger reads).
    pub fn in_data(&self) -> bool {
        matches!(
            self.phase,
            Phase::Data | Phase::DataFinished | Phase::Chunk | Phase::Skip
        )
    }

    /// True once QUIT or a close happened.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Quit | Phase::Closed(_))
    }

    /// Appends input bytes. Call only after [`Event::NeedInput`]; the buffer
    /// holds at most one read plus one partial command line.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Output written so far (replies), to be sent to the peer.
    pub fn pending_output(&self) -> &[u8] {
        &self.output
    }

    /// Takes the queued output.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The peer closed its side.
    pub fn eof(&mut self) {
        if !self.is_closed() {
            self.phase = Phase::Closed(CloseReason::ClientEof);
        }
    }

    /// The driver's timer fired: queues 421 4.4.2 and closes.
    pub fn timeout(&mut self) {
        if !self.is_closed() {
            let text = format!("{} error: timeout exceeded", self.config.hostname);
            self.push(&r(421, (4, 4, 2), &text));
            self.phase = Phase::Closed(CloseReason::Timeout);
        }
    }

    fn push(&mut self, reply: &Reply) {
        reply.write_to(&mut self.output);
    }

    /// Queues an error reply and counts it; closes after too many.
    fn error(&mut self, reply: Reply) {
        self.push(&reply);
        self.stats.errors += 1;
        if self.stats.errors >= self.config.max_errors {
            let text = format!("{} error: too many errors", self.config.hostname);
            self.push(&r(421, (4, 7, 0), &text));
            self.phase = Phase::Closed(CloseReason::TooManyErrors);
        }
    }

    /// Answer to [`Event::Receipts`].
    pub fn receipts_result(&mut self, reply: Reply) {
        if matches!(self.phase, Phase::WaitReceipts(_)) {
            self.phase = Phase::Command;
            self.push(&reply);
        }
    }

    /// `XRECEIPT FETCH` / `XRECEIPT ACK n`, where the extension is offered, outside a
    /// transaction. `None` if the line is not an XRECEIPT command.
    fn receipt_command(&mut self, line: &[u8]) -> Option<()> {
        let text = std::str::from_utf8(line)
            .ok()?
            .trim_end_matches(['\r', '\n']);
        let mut w = text.split(' ');
        if !w.next()?.eq_ignore_ascii_case(RECEIPT_KEYWORD) || !self.config.receipts {
            return None;
        }
        let cmd = match (w.next(), w.next(), w.next()) {
            (Some(f), None, None) if f.eq_ignore_ascii_case("FETCH") => ReceiptCommand::Fetch,
            (Some(a), Some(n), None) if a.eq_ignore_ascii_case("ACK") => match n.parse::<usize>() {
                Ok(n) if n <= MAX_RECEIPTS_PER_REPLY => ReceiptCommand::Ack(n),
                _ => {
                    self.error(r(501, (5, 5, 4), "XRECEIPT ACK takes a count of 0 to 16"));
                    return Some(());
                }
            },
            _ => {
                self.error(r(
                    501,
                    (5, 5, 4),
                    "syntax: XRECEIPT FETCH | XRECEIPT ACK <n>",
                ));
                return Some(());
            }
        };
        if !self.esmtp || self.helo.is_none() {
            self.error(r(503, (5, 5, 1), "send EHLO first"));
        } else if self.tx.is_some() {
            self.error(r(
                503,
                (5, 5, 1),
                "XRECEIPT is not allowed in a mail transaction",
            ));
        } else {
            self.phase = Phase::WaitReceipts(cmd);
        }
        Some(())
    }

    /// Answer to [`Event::MailFrom`].
    pub fn mail_from_result(&mut self, result: Result<(), Reply>) {
        if self.phase != Phase::WaitMail {
            return;
        }
        self.phase = Phase::Command;
        let Some((from, params)) = self.pending_mail.take() else {
            return;
        };
        match result {
            Ok(()) => {
                self.tx = Some(Envelope {
                    helo: self.helo.clone().unwrap_or_default(),
                    mail_from: from,
                    rcpt_to: Vec::new(),
                    body_8bit: params.body_8bit,
                    declared_size: params.size,
                    smtputf8: params.smtputf8,
                    ret: params.ret,
                    envid: params.envid,
                    rcpt_params: Vec::new(),
                    xqid: params.xqid,
                });
                self.push(&r(250, (2, 1, 0), "Ok"));
            }
            Err(reply) => self.push(&reply),
        }
    }

    /// Answer to [`Event::RcptTo`].
    pub fn rcpt_to_result(&mut self, result: Result<(), Reply>) {
        if self.phase != Phase::WaitRcpt {
            return;
        }
        self.phase = Phase::Command;
        let Some((to, params)) = self.pending_rcpt.take() else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.rcpt_to.push(to);
                    tx.rcpt_params.push(params);
                }
                self.push(&r(250, (2, 1, 5), "Ok"));
            }
            Err(reply) => self.push(&reply),
        }
    }

    /// Answer to [`Event::DataStart`]: `Ok` sends 354 and enters DATA (for BDAT: reads
    /// the chunk).
    pub fn data_start_result(&mut self, result: Result<(), Reply>) {
        if self.phase != Phase::WaitDataStart {
            return;
        }
        if let Some((octets, last)) = self.pending_chunk.take() {
            match result {
                Ok(()) => {
                    let mut rx = DataReceiver::chunked(self.config.max_message_size);
                    rx.start_chunk(octets, last);
                    self.data = Some(rx);
                    self.write_failed = false;
                    self.storage_full = false;
                    self.bdat_open = true;
                    self.phase = Phase::Chunk;
                }
                Err(reply) => {
                    // The transaction ends here: a later chunk must not start another
                    // message that lacks this one's octets.
                    self.tx = None;
                    self.push(&reply);
                    self.skip_chunk(octets);
                }
            }
            return;
        }
        match result {
            Ok(()) => {
                self.push(&Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
                self.data = Some(DataReceiver::new(self.config.max_message_size));
                self.write_failed = false;
                self.storage_full = false;
                self.phase = Phase::Data;
            }
            Err(reply) => {
                self.push(&reply);
                self.phase = Phase::Command;
            }
        }
    }

    /// Writing a [`Event::DataChunk`] to the spool failed: the message will be
    /// answered 451 4.3.0 and aborted at its end.
    pub fn data_write_failed(&mut self) {
        self.write_failed = true;
    }

    /// Writing failed because the disk is full: answered 452 4.3.1 (RFC 3463: mail
    /// system full), which tells the client to try again later, not to bounce.
    pub fn data_storage_full(&mut self) {
        self.write_failed = true;
        self.storage_full = true;
    }

    /// Answer to [`Event::DataEnd`].
    pub fn data_end_result(&mut self, reply: Reply) {
        if self.phase != Phase::WaitDataEnd {
            return;
        }
        if reply.is_positive() {
            self.stats.messages_accepted += 1;
        } else {
            self.stats.messages_rejected += 1;
        }
        self.push(&reply);
        self.phase = Phase::Command;
    }

    /// The next thing for the driver to do.
    pub fn next_event(&mut self) -> Event<'_> {
        self.chunk.clear();
        loop {
            match self.phase {
                Phase::Closed(reason) => return Event::Close(reason),
                Phase::Quit => return Event::Quit,
                Phase::WaitMail => {
                    if self.pending_mail.is_none() {
                        self.phase = Phase::Command;
                        continue;
                    }
                    return match &self.pending_mail {
                        Some((from, params)) => Event::MailFrom {
                            from,
                            params: params.clone(),
                        },
                        None => Event::NeedInput,
                    };
                }
                Phase::WaitRcpt => {
                    if self.pending_rcpt.is_none() {
                        self.phase = Phase::Command;
                        continue;
                    }
                    return match &self.pending_rcpt {
                        Some((to, params)) => Event::RcptTo { to, params },
                        None => Event::NeedInput,
                    };
                }
                Phase::WaitReceipts(c) => return Event::Receipts(c),
                Phase::WaitDataStart => {
                    if self.tx.is_none() {
                        self.phase = Phase::Command;
                        continue;
                    }
                    return match &self.tx {
                        Some(envelope) => Event::DataStart { envelope },
                        None => Event::NeedInput,
                    };
                }
                Phase::WaitDataEnd => {
                    // The envelope was handed out with DataEnd; nothing to
                    // repeat. Treat a missing answer as a local failure.
                    self.data_end_result(Reply::temp_failure("local error in processing"));
                    continue;
                }
                Phase::Data | Phase::Chunk => {
                    let Some(rx) = self.data.as_mut() else {
                        self.phase = Phase::Command;
                        continue;
                    };
                    let n = rx.feed(&self.input[self.pos..], &mut self.chunk);
                    self.pos += n;
                    let (done, chunk_done) = (rx.is_done(), rx.chunk_done());
                    if done {
                        self.phase = Phase::DataFinished;
                    } else if self.phase == Phase::Chunk && chunk_done {
                        // RFC 3030: each chunk but the last is answered when it is in;
                        // the message's fate comes with the last.
                        self.push(&r(250, (2, 0, 0), "Ok: chunk received"));
                        self.phase = Phase::Command;
                    }
                    if !self.chunk.is_empty() {
                        return Event::DataChunk(&self.chunk);
                    }
                    if matches!(self.phase, Phase::Data | Phase::Chunk) {
                        return Event::NeedInput;
                    }
                }
                Phase::Skip => {
                    let avail = (self.input.len() - self.pos) as u64;
                    let n = avail.min(self.skip);
                    self.pos += n as usize;
                    self.skip -= n;
                    if self.skip > 0 {
                        return Event::NeedInput;
                    }
                    self.phase = Phase::Command;
                }
                Phase::ChunkAbort => {
                    self.bdat_open = false;
                    self.data = None;
                    self.phase = Phase::Command;
                    return Event::DataAbort;
                }
                Phase::DataFinished => {
                    self.bdat_open = false;
                    let verdict = self
                        .data
                        .take()
                        .map(|rx| rx.verdict())
                        .unwrap_or(DataVerdict::Ok);
                    let tx = self.tx.take();
                    let reject = match (verdict, self.write_failed) {
                        (DataVerdict::BareLineEnding, _) => {
                            Some(r(550, (5, 6, 11), "message rejected: bare LF/CR in DATA"))
                        }
                        (DataVerdict::TooLarge, _) => Some(r(
                            552,
                            (5, 3, 4),
                            "message size exceeds fixed maximum message size",
                        )),
                        (DataVerdict::Ok, true) if self.storage_full => Some(Reply::storage_full()),
                        (DataVerdict::Ok, true) => {
                            Some(Reply::temp_failure("local error in processing"))
                        }
                        (DataVerdict::Ok, false) => None,
                    };
                    match (reject, tx) {
                        (None, Some(envelope)) => {
                            self.phase = Phase::WaitDataEnd;
                            return Event::DataEnd(envelope);
                        }
                        (reject, _) => {
                            let reply = reject.unwrap_or_else(|| {
                                Reply::temp_failure("local error in processing")
                            });
                            tracing::info!(client = %self.peer, code = reply.code, "message rejected");
                            self.stats.messages_rejected += 1;
                            self.push(&reply);
                            self.phase = Phase::Command;
                            return Event::DataAbort;
                        }
                    }
                }
                Phase::Discard => {
                    let rest = &self.input[self.pos..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            self.pos += i + 1;
                            self.phase = Phase::Command;
                            self.error(r(500, (5, 5, 2), "line too long"));
                        }
                        None => {
                            self.pos = self.input.len();
                            return Event::NeedInput;
                        }
                    }
                }
                Phase::Command => {
                    let rest = &self.input[self.pos..];
                    let max = self.config.max_line_len.max(16);
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(i) if i < max => {
                            let line = rest[..=i].to_vec();
                            self.pos += i + 1;
                            self.command(&line);
                        }
                        Some(i) => {
                            self.pos += i + 1;
                            self.error(r(500, (5, 5, 2), "line too long"));
                        }
                        None if rest.len() >= max => {
                            self.pos = self.input.len();
                            self.phase = Phase::Discard;
                        }
                        None => {
                            // Keep the partial line at the start of the buffer.
                            if self.pos > 0 {
                                self.input.drain(..self.pos);
                                self.pos = 0;
                            }
                            return Event::NeedInput;
                        }
                    }
                }
            }
        }
    }

    /// Handles one complete command line (ending in LF).
    fn command(&mut self, line: &[u8]) {
        if self.receipt_command(line).is_some() {
            return;
        }
        // `XQID=` is ours (the receipt extension), unknown to the parser: taken out of a
        // MAIL line first, and only where the extension is offered.
        let (stripped, xqid) = match self.config.receipts {
            true => match take_xqid(line) {
                Ok(x) => x,
                Err(()) => {
                    self.error(r(501, (5, 5, 4), "invalid XQID parameter"));
                    return;
                }
            },
            false => (None, None),
        };
        let line = stripped.as_deref().unwrap_or(line);
        let mut it = line.iter();
        let parsed = Request::parse(&mut it);
        tracing::trace!(client = %self.peer, line = %super::reply::excerpt(line), "command");
        let req = match parsed {
            Ok(req) => req,
            Err(e) => {
                let reply = match e {
                    smtp_proto::Error::UnknownCommand => {
                        r(500, (5, 5, 1), "command not recognized")
                    }
                    smtp_proto::Error::InvalidSenderAddress => {
                        r(501, (5, 1, 7), "bad sender address syntax")
                    }
                    smtp_proto::Error::InvalidRecipientAddress => {
                        r(501, (5, 1, 3), "bad recipient address syntax")
                    }
                    smtp_proto::Error::SyntaxError { syntax } => {
                        r(501, (5, 5, 4), &format!("syntax: {syntax}"))
                    }
                    smtp_proto::Error::InvalidParameter { param } => {
                        r(501, (5, 5, 4), &format!("invalid parameter {param}"))
                    }
                    smtp_proto::Error::UnsupportedParameter { .. } => {
                        r(555, (5, 5, 4), "unsupported parameter")
                    }
                    _ => r(500, (5, 5, 2), "syntax error"),
                };
                self.error(reply);
                return;
            }
        };
        match req {
            Request::Ehlo { host } => self.hello(host.into_owned(), true),
            Request::Helo { host } => self.hello(host.into_owned(), false),
            Request::Mail { from } => {
                if self.helo.is_none() {
                    self.error(r(503, (5, 5, 1), "send EHLO/HELO first"));
                    return;
                }
                if self.tx.is_some() {
                    self.error(r(503, (5, 5, 1), "nested MAIL command"));
                    return;
                }
                let allowed = smtp_proto::MAIL_BODY_7BIT
                    | smtp_proto::MAIL_BODY_8BITMIME
                    | smtp_proto::MAIL_SMTPUTF8
                    | smtp_proto::MAIL_RET_FULL
                    | smtp_proto::MAIL_RET_HDRS;
                if from.flags & !allowed != 0
                    || from.trans_id.is_some()
                    || from.solicit.is_some()
                    || from.mtrk.is_some()
                    || from.auth.is_some()
                    || from.by != 0
                    || from.hold_for != 0
                    || from.hold_until != 0
                    || from.mt_priority != 0
                {
                    self.error(r(555, (5, 5, 4), "unsupported parameter"));
                    return;
                }
                let size = match size_param(line) {
                    Ok(size) => size,
                    Err(()) => {
                        self.error(r(501, (5, 5, 4), "invalid SIZE parameter"));
                        return;
                    }
                };
                if size.is_some_and(|s| s > self.config.max_message_size) {
                    self.error(r(
                        552,
                        (5, 3, 4),
                        "message size exceeds fixed maximum message size",
                    ));
                    return;
                }
                let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
                if !smtputf8 && !from.address.is_ascii() {
                    self.error(r(
                        553,
                        (5, 6, 7),
                        "non-ASCII sender address needs the SMTPUTF8 parameter",
                    ));
                    return;
                }
                let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
                    Some(super::Ret::Full)
                } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
                    Some(super::Ret::Hdrs)
                } else {
                    None
                };
                let params = MailParams {
                    size,
                    body_8bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                    smtputf8,
                    ret,
                    envid: from.env_id.map(|e| e.into_owned()),
                    xqid,
                };
                self.pending_mail = Some((from.address.into_owned(), params));
                self.phase = Phase::WaitMail;
            }
            Request::Rcpt { to } => {
                let Some(tx) = self.tx.as_ref() else {
                    self.error(r(503, (5, 5, 1), "need MAIL command"));
                    return;
                };
                if self.bdat_open {
                    self.error(r(503, (5, 5, 1), "RCPT is not allowed after BDAT"));
                    return;
                }
                let notify_bits = smtp_proto::RCPT_NOTIFY_SUCCESS
                    | smtp_proto::RCPT_NOTIFY_FAILURE
                    | smtp_proto::RCPT_NOTIFY_DELAY
                    | smtp_proto::RCPT_NOTIFY_NEVER;
                if to.flags & !notify_bits != 0 || to.rrvs != 0 {
                    self.error(r(555, (5, 5, 4), "unsupported parameter"));
                    return;
                }
                if !tx.smtputf8 && !to.address.is_ascii() {
                    self.error(r(
                        553,
                        (5, 6, 7),
                        "non-ASCII recipient address needs the SMTPUTF8 parameter",
                    ));
                    return;
                }
                let notify = (to.flags & notify_bits != 0).then_some(super::Notify {
                    success: to.flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
                    failure: to.flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
                    delay: to.flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
                });
                let params = super::RcptParams {
                    notify,
                    orcpt: to.orcpt.map(|o| o.into_owned()),
                };
                let mut address = to.address.into_owned();
                if address.is_empty() {
                    // smtp-proto yields "" for the domain-less <postmaster>.
                    if is_postmaster(line) {
                        address = "postmaster".into();
                    } else {
                        self.error(r(501, (5, 1, 3), "bad recipient address syntax"));
                        return;
                    }
                }
                if tx.rcpt_to.len() >= self.config.max_recipients {
                    self.push(&r(452, (4, 5, 3), "too many recipients"));
                    return;
                }
                self.pending_rcpt = Some((address, params));
                self.phase = Phase::WaitRcpt;
            }
            Request::Data if self.bdat_open => self.error(r(
                503,
                (5, 5, 1),
                "DATA is not allowed after BDAT; send RSET",
            )),
            Request::Data => match &self.tx {
                None => self.error(r(503, (5, 5, 1), "need MAIL command")),
                Some(tx) if tx.rcpt_to.is_empty() => {
                    self.error(r(503, (5, 5, 1), "need RCPT command (no valid recipients)"))
                }
                Some(_) => self.phase = Phase::WaitDataStart,
            },
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size as u64, is_last),
            Request::Rset => {
                self.tx = None;
                self.push(&r(250, (2, 0, 0), "Ok"));
                if self.bdat_open {
                    self.phase = Phase::ChunkAbort;
                }
            }
            Request::Noop { .. } => self.push(&r(250, (2, 0, 0), "Ok")),
            Request::Vrfy { .. } => self.push(&r(
                252,
                (2, 5, 0),
                "cannot VRFY user, but will accept message and attempt delivery",
            )),
            Request::Help { .. } => self.push(&r(
                214,
                (2, 0, 0),
                "commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
            )),
            Request::Quit => {
                let text = format!("{} closing connection", self.config.hostname);
                self.push(&r(221, (2, 0, 0), &text));
                self.phase = Phase::Quit;
            }
            Request::Lhlo { .. }
            | Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::StartTls => self.error(r(502, (5, 5, 1), "command not implemented")),
        }
    }

    /// `BDAT octets [LAST]` (RFC 3030). The chunk's octets follow the command at once,
    /// so a refused chunk is still read (and dropped) to stay in step with the client.
    fn bdat(&mut self, octets: u64, last: bool) {
        if self.bdat_open {
            if let Some(rx) = self.data.as_mut() {
                rx.start_chunk(octets, last);
            }
            self.phase = Phase::Chunk;
            return;
        }
        let refused = match &self.tx {
            None => Some(r(503, (5, 5, 1), "need MAIL command")),
            Some(tx) if tx.rcpt_to.is_empty() => Some(r(
                554,
                (5, 5, 1),
                "no valid recipients; the chunk was discarded",
            )),
            Some(_) => None,
        };
        match refused {
            Some(reply) => {
                self.error(reply);
                self.skip_chunk(octets);
            }
            None => {
                self.pending_chunk = Some((octets, last));
                self.phase = Phase::WaitDataStart;
            }
        }
    }

    /// Discard the next `octets` of input (a refused chunk), unless the session closed.
    fn skip_chunk(&mut self, octets: u64) {
        if self.is_closed() {
            return;
        }
        self.skip = octets;
        self.phase = Phase::Skip;
    }

    fn hello(&mut self, host: String, esmtp: bool) {
        if self.bdat_open {
            self.phase = Phase::ChunkAbort;
        }
        self.tx = None;
        self.esmtp = esmtp;
        let hn = &self.config.hostname;
        let receipts = if self.config.receipts {
            format!("\n{RECEIPT_KEYWORD} {RECEIPT_VERSION}")
        } else {
            String::new()
        };
        let reply = if esmtp {
            Reply::plain(
                250,
                format!(
                    "{hn}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nDSN\nCHUNKING\nENHANCEDSTATUSCODES{receipts}",
                    self.config.max_message_size
                ),
            )
        } else {
            Reply::plain(250, hn.clone())
        };
        tracing::debug!(client = %self.peer, helo = %host, esmtp, "hello");
        self.helo = Some(host);
        self.push(&reply);
    }
}

/// The `SIZE=` parameter of a MAIL line, parsed here (strictly) rather than
/// trusting the upstream parser's handling of overflow.
/// The EHLO keyword of the in-call receipt extension and the receipt format it carries.
pub const RECEIPT_KEYWORD: &str = "XRECEIPT";
pub const RECEIPT_VERSION: &str = "sipmail-receipt/1";
/// Receipts in one reply, at most (so `XRECEIPT ACK` counts to this).
pub const MAX_RECEIPTS_PER_REPLY: usize = 16;

/// Whether a sender's queue ID is acceptable as `XQID=`: 1 to 64 characters of
/// `[A-Za-z0-9._-]` (Postfix's and sipmail's IDs are all of this form). It becomes half of
/// the receiver's duplicate key, never a path.
pub fn valid_queue_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where the parameters of a MAIL or RCPT line start: just after the `>` that closes the
/// path, skipping any `>` inside a quoted local part (ENVID's xtext may hold `>` too, so
/// the last `>` of the line is not it).
fn params_start(line: &str) -> Option<usize> {
    let open = line.find('<')?;
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[open + 1..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(open + 1 + i + 1),
            _ => {}
        }
    }
    None
}

/// Takes `XQID=<id>` out of a MAIL line: the line without it (if it was there) and the
/// value. A second XQID, an empty one, or one that is not a queue ID
/// ([`valid_queue_id`]) is an error. Not a MAIL line: unchanged.
#[allow(clippy::type_complexity)]
fn take_xqid(line: &[u8]) -> Result<(Option<Vec<u8>>, Option<String>), ()> {
    if line.len() < 5 || !line[..5].eq_ignore_ascii_case(b"MAIL ") {
        return Ok((None, None));
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return Ok((None, None));
    };
    let Some(start) = params_start(text) else {
        return Ok((None, None));
    };
    let (head, params) = text.split_at(start);
    let mut kept = String::with_capacity(text.len());
    kept.push_str(head);
    let mut xqid = None;
    for word in params.split_ascii_whitespace() {
        if word.len() >= 5 && word.as_bytes()[..5].eq_ignore_ascii_case(b"XQID=") {
            let v = &word[5..];
            if xqid.is_some() || !valid_queue_id(v) {
                return Err(());
            }
            xqid = Some(v.to_string());
        } else {
            kept.push(' ');
            kept.push_str(word);
        }
    }
    match xqid {
        None => Ok((None, None)),
        Some(x) => {
            kept.push_str("\r\n");
            Ok((Some(kept.into_bytes()), Some(x)))
        }
    }
}

fn size_param(line: &[u8]) -> Result<Option<u64>, ()> {
    let line = std::str::from_utf8(line).map_err(|_| ())?;
    let after = match params_start(line) {
        Some(i) => &line[i..],
        None => return Ok(None),
    };
    for word in after.split_ascii_whitespace() {
        let bytes = word.as_bytes();
        if bytes.len() >= 5 && bytes[..5].eq_ignore_ascii_case(b"SIZE=") {
            let v = word.get(5..).unwrap_or("");
            if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            return v.parse::<u64>().map(Some).map_err(|_| ());
        }
    }
    Ok(None)
}

fn is_postmaster(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    match (line.find('<'), line.find('>')) {
        (Some(a), Some(b)) if a < b => line[a + 1..b].eq_ignore_ascii_case("postmaster"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_param_parsing() {
        assert_eq!(size_param(b"MAIL FROM:<a@b> SIZE=10\r\n"), Ok(Some(10)));
        assert_eq!(
            size_param(b"MAIL FROM:<a@b> size=10 BODY=8BITMIME\r\n"),
            Ok(Some(10))
        );
        assert_eq!(size_param(b"MAIL FROM:<a@b>\r\n"), Ok(None));
        assert_eq!(
            size_param(b"MAIL FROM:<a@b> SIZE=99999999999999999999999\r\n"),
            Err(())
        );
        assert_eq!(size_param(b"MAIL FROM:<a@b> SIZE=\r\n"), Err(()));
        assert_eq!(size_param(b"MAIL FROM:<a@b> SIZE=-1\r\n"), Err(()));
        // Multi-byte characters around the 5th byte must not panic.
        assert_eq!(
            size_param("MAIL FROM:<a@b> SIZE\u{e9}=1\r\n".as_bytes()),
            Ok(None)
        );
        assert_eq!(
            size_param("MAIL FROM:<a@b> SIZE=\u{e9}\r\n".as_bytes()),
            Err(())
        );
    }

    /// EHLO, then one MAIL line; what the session made of it (the reply text and the
    /// XQID handed to the backend).
    fn mail_with(receipts: bool, mail: &str) -> (String, Option<String>) {
        let cfg = ServerConfig {
            receipts,
            ..ServerConfig::default()
        };
        let mut s = ServerSession::new(cfg, "peer");
        s.feed(format!("EHLO x\r\n{mail}\r\n").as_bytes());
        let mut xqid = None;
        while let Event::MailFrom { params, .. } = s.next_event() {
            xqid = params.xqid.clone();
            s.mail_from_result(Ok(()));
        }
        let out = String::from_utf8(s.take_output()).unwrap();
        (out, xqid)
    }

    #[test]
    fn the_receipt_extension_is_offered_and_parsed_only_where_it_is_on() {
        let (out, x) = mail_with(
            true,
            "MAIL FROM:<a@b> XQID=1A2B.c-d_9 SIZE=10 BODY=8BITMIME",
        );
        assert!(
            out.contains("250-ENHANCEDSTATUSCODES\r\n250 XRECEIPT sipmail-receipt/1\r\n"),
            "{out}"
        );
        assert!(out.ends_with("250 2.1.0 Ok\r\n"), "{out}");
        assert_eq!(x.as_deref(), Some("1A2B.c-d_9"));
        // A `>` in a quoted local part does not end the path; xtext after it neither.
        let (out, x) = mail_with(true, "MAIL FROM:<\"a>b XQID=no\"@b> ENVID=x>y XQID=Q2");
        assert!(out.ends_with("250 2.1.0 Ok\r\n"), "{out}");
        assert_eq!(x.as_deref(), Some("Q2"));
        // Off (the site side): not offered, and the parameter is refused.
        let (out, x) = mail_with(false, "MAIL FROM:<a@b> XQID=Q1");
        assert!(!out.contains("XRECEIPT"), "{out}");
        assert!(
            out.ends_with("555 5.5.4 unsupported parameter\r\n"),
            "{out}"
        );
        assert_eq!(x, None);
        // Bad values: a path, empty, too long, twice.
        for bad in [
            "MAIL FROM:<a@b> XQID=../x",
            "MAIL FROM:<a@b> XQID=",
            &format!("MAIL FROM:<a@b> XQID={}", "A".repeat(65)),
            "MAIL FROM:<a@b> XQID=A XQID=B",
        ] {
            let (out, x) = mail_with(true, bad);
            assert!(
                out.ends_with("501 5.5.4 invalid XQID parameter\r\n"),
                "{bad}: {out}"
            );
            assert_eq!(x, None);
        }
    }

    #[test]
    fn postmaster() {
        assert!(is_postmaster(b"RCPT TO:<Postmaster>\r\n"));
        assert!(!is_postmaster(b"RCPT TO:<>\r\n"));
    }
}
