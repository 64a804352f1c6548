//! Thin tokio driver running a [`ServerSession`] over any async stream.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reply::Reply;
use super::server::{CloseReason, Envelope, Event, MailParams, ServerConfig, ServerSession};

/// Where accepted mail goes: policy decisions and the spool.
pub trait Backend: Send {
    /// The spool file (or anything else the message bytes are written to).
    type Writer: AsyncWrite + Unpin + Send;

    /// MAIL FROM. `from` is `""` for the null reverse path `<>`.
    fn mail_from(
        &mut self,
        from: &str,
        params: &MailParams,
    ) -> impl Future<Output = Result<(), Reply>> + Send;

    /// RCPT TO: routing / policy (e.g. `550 5.7.1 relay denied`).
    fn rcpt_to(&mut self, to: &str) -> impl Future<Output = Result<(), Reply>> + Send;

    /// DATA accepted by the protocol: open the spool.
    fn data_start(
        &mut self,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<Self::Writer, Reply>> + Send;

    /// The complete, clean message was written (and flushed) to `writer`:
    /// make it durable and answer (`250 2.0.0 ... queued as ...` or
    /// `451 4.3.0 ...`).
    fn data_end(
        &mut self,
        envelope: Envelope,
        writer: Self::Writer,
    ) -> impl Future<Output = Reply> + Send;

    /// The message was rejected or the session ended mid-DATA: discard.
    fn data_abort(&mut self, writer: Self::Writer) -> impl Future<Output = ()> + Send;

    /// `XRECEIPT FETCH` / `ACK n` (only where [`ServerConfig::receipts`] offers the
    /// extension). A backend without receipts to give says so.
    fn receipts(&mut self, cmd: super::ReceiptCommand) -> impl Future<Output = Reply> + Send {
        let _ = cmd;
        async { Reply::new(502, (5, 5, 1), "no receipts here") }
    }
}

/// Errors that end a session abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timeout while {0}")]
    Timeout(&'static str),
}

/// What happened in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub peer: String,
    pub helo: Option<String>,
    pub messages_accepted: u32,
    pub messages_rejected: u32,
    pub errors: u32,
    pub close_reason: CloseReason,
}

/// The read buffer between messages, and where one in DATA starts.
const COMMAND_READ: usize = 512;
const DATA_READ: usize = 4096;

/// Pending output beyond this is written even while commands remain.
const FLUSH_THRESHOLD: usize = 16 * 1024;

async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut ServerSession,
    limit: Duration,
) -> Result<(), SmtpError> {
    if session.pending_output().is_empty() {
        return Ok(());
    }
    let out = session.take_output();
    match tokio::time::timeout(limit, async {
        stream.write_all(&out).await?;
        stream.flush().await
    })
    .await
    {
        Ok(r) => Ok(r?),
        Err(_) => Err(SmtpError::Timeout("writing replies")),
    }
}

/// Serves one SMTP session on `stream` (TCP, a tunnel, anything). Sets
/// nothing socket-specific. Returns when the client quits, goes away, times
/// out or makes too many errors; an open spool writer is always aborted.
pub async fn serve<S, B>(
    mut stream: S,
    peer: impl Into<String>,
    config: &ServerConfig,
    backend: &mut B,
) -> Result<SessionSummary, SmtpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: Backend,
{
    let mut session = ServerSession::new(config.clone(), peer);
    let mut writer: Option<B::Writer> = None;
    let result = run(&mut stream, &mut session, backend, &mut writer).await;
    if let Some(w) = writer.take() {
        backend.data_abort(w).await;
    }
    let stats = session.stats().clone();
    match &result {
        Ok(reason) => tracing::info!(
            client = session.peer(),
            ?reason,
            accepted = stats.messages_accepted,
            rejected = stats.messages_rejected,
            "smtp session closed"
        ),
        Err(e) => tracing::warn!(client = session.peer(), error = %e, "smtp session failed"),
    }
    let close_reason = result?;
    Ok(SessionSummary {
        peer: session.peer().to_string(),
        helo: session.helo().map(str::to_string),
        messages_accepted: stats.messages_accepted,
        messages_rejected: stats.messages_rejected,
        errors: stats.errors,
        close_reason,
    })
}

async fn run<S, B>(
    stream: &mut S,
    session: &mut ServerSession,
    backend: &mut B,
    writer: &mut Option<B::Writer>,
) -> Result<CloseReason, SmtpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: Backend,
{
    let cfg = session.config().clone();
    // Commands are short: between messages the buffer is small (an idle session, such
    // as a call kept up for the next message, holds 512 bytes). In DATA it starts at
    // 4 kB and doubles when a read fills it, up to `read_buffer_size`, so a message gets
    // full-size reads after a few.
    let max_read = cfg.read_buffer_size.max(COMMAND_READ);
    let data_read = DATA_READ.min(max_read);
    let mut buf = vec![0u8; COMMAND_READ];
    let mut write_failed = false;
    loop {
        if session.pending_output().len() >= FLUSH_THRESHOLD {
            flush(stream, session, cfg.command_timeout).await?;
        }
        match session.next_event() {
            Event::NeedInput => {
                flush(stream, session, cfg.command_timeout).await?;
                let limit = if session.in_data() {
                    if buf.len() < data_read {
                        buf = vec![0u8; data_read];
                    }
                    cfg.data_timeout
                } else {
                    if buf.len() > COMMAND_READ {
                        buf = vec![0u8; COMMAND_READ];
                    }
                    cfg.command_timeout
                };
                match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                    Err(_) => session.timeout(),
                    Ok(Ok(0)) => session.eof(),
                    Ok(Ok(n)) => {
                        session.feed(&buf[..n]);
                        if session.in_data() && n == buf.len() && buf.len() < max_read {
                            buf.resize((buf.len() * 2).min(max_read), 0);
                        }
                    }
                    Ok(Err(e)) => return Err(e.into()),
                }
            }
            Event::MailFrom { from, params } => {
                let res = backend.mail_from(from, &params).await;
                session.mail_from_result(res);
            }
            Event::RcptTo { to, .. } => {
                let res = backend.rcpt_to(to).await;
                session.rcpt_to_result(res);
            }
            Event::DataStart { envelope } => match backend.data_start(envelope).await {
                Ok(w) => {
                    *writer = Some(w);
                    write_failed = false;
                    session.data_start_result(Ok(()));
                }
                Err(reply) => session.data_start_result(Err(reply)),
            },
            Event::DataChunk(chunk) => {
                if write_failed {
                    continue;
                }
                let failed = match writer.as_mut() {
                    Some(w) => match w.write_all(chunk).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, "spool write failed");
                            Some(super::reply::is_storage_full(&e))
                        }
                    },
                    None => Some(false),
                };
                if let Some(full) = failed {
                    write_failed = true;
                    if full {
                        session.data_storage_full();
                    } else {
                        session.data_write_failed();
                    }
                }
            }
            Event::DataEnd(envelope) => {
                let reply = match writer.take() {
                    Some(mut w) => match w.flush().await {
                        // Boxed: the commit (spool, receipt, scheduler) is the largest
                        // step, and inline it would size every session's future, for the
                        // session's whole life, idle or not.
                        Ok(()) => Box::pin(backend.data_end(envelope, w)).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "spool flush failed");
                            backend.data_abort(w).await;
                            Reply::spool_write_failed(&e)
                        }
                    },
                    None => Reply::temp_failure("local error in processing"),
                };
                session.data_end_result(reply);
            }
            Event::Receipts(cmd) => {
                let reply = backend.receipts(cmd).await;
                session.receipts_result(reply);
            }
            Event::DataAbort => {
                if let Some(w) = writer.take() {
                    backend.data_abort(w).await;
                }
            }
            Event::Quit => {
                flush(stream, session, cfg.command_timeout).await?;
                let _ = stream.shutdown().await;
                return Ok(CloseReason::Quit);
            }
            Event::Close(reason) => {
                if reason != CloseReason::ClientEof {
                    // Best effort: the 421 may not reach a peer that is gone.
                    let _ = flush(stream, session, cfg.command_timeout).await;
                    let _ = stream.shutdown().await;
                }
                return Ok(reason);
            }
        }
    }
}
