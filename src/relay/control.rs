//! The control socket (`<spool>/control.sock`) through which `sipmail queue` inspects and
//! changes a running daemon's queue. One JSON request per line, one JSON reply per line.
//! Only root and the daemon's user can reach it (mode 0600).
//!
//! The socket also keeps two daemons off one spool: a second one finds it answering.

use super::Shared;
use crate::queue::{Envelope, now_ms};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    List,
    Show {
        id: String,
    },
    /// Retry now: one message, or every message when `id` is None.
    Retry {
        id: Option<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Reply {
    Messages { messages: Vec<Envelope> },
    Message { envelope: Envelope, headers: String },
    Done { count: usize },
    Error { message: String },
}

pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("control.sock")
}

/// Bind the socket, refusing if another daemon answers on it.
pub(crate) async fn bind(spool: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(spool);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another sipmail daemon is running on this spool ({} answers)",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
            _ = shared.shutdown.wait() => break,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r.take(64 * 1024)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&shared, req).await,
                    Err(e) => Reply::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(socket_path(&shared.cfg.spool));
}

/// A message's headers for `queue show`.
async fn headers_text(spool: &crate::queue::Spool, id: &str) -> String {
    String::from_utf8_lossy(&spool.read_headers(id, 16 * 1024).await).into_owned()
}

async fn handle(shared: &Shared, req: Request) -> Reply {
    match req {
        Request::List => Reply::Messages {
            messages: shared.queue.list(),
        },
        Request::Show { id } => match shared.queue.get(&id) {
            Some(envelope) => Reply::Message {
                headers: headers_text(&shared.spool, &id).await,
                envelope,
            },
            None => Reply::Error {
                message: format!("no message {id} in the queue"),
            },
        },
        Request::Retry { id } => {
            let count = shared.queue.retry_now(id.as_deref());
            tracing::info!(
                id = id.as_deref().unwrap_or("all"),
                count,
                "retry requested by the operator"
            );
            Reply::Done { count }
        }
        Request::Delete { id } => match shared.queue.delete(&id).await {
            Ok(()) => {
                tracing::warn!(queue_id = %id, "deleted by the operator");
                Reply::Done { count: 1 }
            }
            Err(message) => Reply::Error { message },
        },
    }
}

/// Send one request to a running daemon. `Ok(None)` if no daemon listens.
pub async fn request(spool: &Path, req: &Request) -> std::io::Result<Option<Reply>> {
    let conn = match UnixStream::connect(socket_path(spool)).await {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let (r, mut w) = conn.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines.next_line().await?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the control socket",
        )
    })?;
    serde_json::from_str(&reply)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// When no daemon runs: the same operations directly on the spool files.
pub async fn offline(spool_dir: &Path, req: &Request) -> std::io::Result<Reply> {
    let envs = crate::queue::Spool::scan(spool_dir)?;
    let spool = crate::queue::Spool::at(spool_dir);
    Ok(match req {
        Request::List => Reply::Messages { messages: envs },
        Request::Show { id } => match envs.into_iter().find(|e| &e.id == id) {
            Some(envelope) => Reply::Message {
                headers: headers_text(&spool, id).await,
                envelope,
            },
            None => Reply::Error {
                message: format!("no message {id} in the queue"),
            },
        },
        Request::Retry { id } => {
            let mut count = 0;
            for mut e in envs
                .into_iter()
                .filter(|e| id.as_ref().is_none_or(|i| &e.id == i))
            {
                for r in e
                    .recipients
                    .iter_mut()
                    .filter(|r| r.state == crate::queue::RcptState::Pending)
                {
                    r.next_attempt_ms = now_ms();
                }
                spool.update(&e).await?;
                count += 1;
            }
            Reply::Done { count }
        }
        Request::Delete { id } => {
            if envs.iter().any(|e| &e.id == id) {
                spool.remove(id).await?;
                Reply::Done { count: 1 }
            } else {
                Reply::Error {
                    message: format!("no message {id} in the queue"),
                }
            }
        }
    })
}
