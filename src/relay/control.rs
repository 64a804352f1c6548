//! The control socket (`<spool>/control.sock`) through which `sipmail queue` inspects and
//! changes a running daemon's queue. One JSON request per line, one JSON reply per line.
//! Only root and the daemon's user can reach it (mode 0600).
//!
//! The socket also keeps two daemons off one spool: a second one finds it answering.
//!
//! `{"cmd":"reload"}` makes the daemon read its config file and keyring again (as SIGHUP
//! does; see `reload`), for `sipmail reload` and `sipmail keys import`. So that
//! `sipmail keys import --keyring DIR` can find the daemon using DIR, the daemon writes the
//! socket's absolute path into `DIR/daemon.control` while it runs.

use super::context::Context;
use crate::queue::{Envelope, Mark, now_ms};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum ControlRequest {
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
    /// Keep messages (`ids`, or every one with `all`) from being tried until released.
    Hold {
        #[serde(default)]
        ids: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// Let held messages go, due at once.
    Release {
        #[serde(default)]
        ids: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// Give up now: bounce to the sender, as past `queue.max_age`.
    Expire {
        #[serde(default)]
        ids: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// Read the config file and the keyring again (peers, revocations, certificates...).
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum ControlReply {
    Messages {
        messages: Vec<Envelope>,
    },
    Message {
        envelope: Box<Envelope>,
        headers: String,
    },
    Done {
        count: usize,
    },
    /// The config and keyring were reloaded; what is in force now.
    Reloaded {
        message: String,
    },
    Error {
        message: String,
    },
}

pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("control.sock")
}

/// File in the keyring directory naming the control socket of the daemon using it.
pub const KEYRING_POINTER: &str = "daemon.control";

/// Tell the daemon that uses `keyring` (found through `keyring/daemon.control`) to reload
/// it. `Ok(None)` if no daemon is known to use it or none answers.
pub async fn reload_keyring(keyring: &Path) -> std::io::Result<Option<ControlReply>> {
    let pointer = keyring.join(KEYRING_POINTER);
    let sock = match std::fs::read_to_string(&pointer) {
        Ok(s) => PathBuf::from(s.trim_end_matches('\n')),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(spool) = sock.parent() else {
        return Ok(None);
    };
    if sock != socket_path(spool) {
        return Ok(None);
    }
    request(spool, &ControlRequest::Reload).await
}

/// Record in the keyring directory which socket the daemon using it answers on. Best
/// effort: without it, `keys import` cannot notify the daemon (SIGHUP still works).
pub(crate) fn write_keyring_pointer(keyring: &Path, spool: &Path) {
    let sock = std::path::absolute(socket_path(spool)).unwrap_or_else(|_| socket_path(spool));
    let path = keyring.join(KEYRING_POINTER);
    if let Err(e) = std::fs::write(&path, format!("{}\n", sock.display())) {
        tracing::warn!(file = %path.display(), error = %e,
            "cannot record the control socket in the keyring; `sipmail keys import` will not reach this daemon (send SIGHUP instead)");
    }
}

/// Remove the pointer if it still names our socket (another daemon may have taken over).
fn remove_keyring_pointer(keyring: &Path, spool: &Path) {
    let path = keyring.join(KEYRING_POINTER);
    let ours = std::path::absolute(socket_path(spool)).unwrap_or_else(|_| socket_path(spool));
    if std::fs::read_to_string(&path).is_ok_and(|s| Path::new(s.trim_end_matches('\n')) == ours) {
        let _ = std::fs::remove_file(&path);
    }
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

/// Where the socket and the keyring pointer live: the control socket's share of the
/// config.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub spool: PathBuf,
    pub keyring: PathBuf,
}

/// Answer requests until shutdown; then remove the socket and the keyring pointer.
pub(crate) async fn serve(shared: Arc<Context>, paths: Paths, listener: UnixListener) {
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
                let reply = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(req) => handle(&shared, req).await,
                    Err(e) => ControlReply::Error {
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
    let _ = std::fs::remove_file(socket_path(&paths.spool));
    remove_keyring_pointer(&paths.keyring, &paths.spool);
}

/// How long `expire` waits for the bounces before it answers.
const EXPIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn done(r: Result<usize, String>) -> ControlReply {
    match r {
        Ok(count) => ControlReply::Done { count },
        Err(message) => ControlReply::Error { message },
    }
}

/// A message's headers for `queue show`.
async fn headers_text(spool: &crate::queue::Spool, id: &str) -> String {
    String::from_utf8_lossy(&spool.read_headers(id, 16 * 1024).await).into_owned()
}

async fn handle(shared: &Context, req: ControlRequest) -> ControlReply {
    match req {
        ControlRequest::Reload => match super::reload::reload(shared).await {
            Ok(message) => ControlReply::Reloaded { message },
            Err(message) => ControlReply::Error { message },
        },
        ControlRequest::List => ControlReply::Messages {
            messages: shared.queue.list(),
        },
        ControlRequest::Show { id } => match shared.queue.get(&id) {
            Some(envelope) => ControlReply::Message {
                headers: headers_text(&shared.spool, &id).await,
                envelope: Box::new(envelope),
            },
            None => ControlReply::Error {
                message: format!("no message {id} in the queue"),
            },
        },
        ControlRequest::Retry { id } => {
            let count = shared.queue.retry_now(id.as_deref());
            tracing::info!(
                queue_id = id.as_deref().unwrap_or("all"),
                count,
                "retry requested by the operator"
            );
            ControlReply::Done { count }
        }
        ControlRequest::Hold { ids, all } => done(shared.queue.hold(&ids, all).await),
        ControlRequest::Release { ids, all } => done(shared.queue.release(&ids, all).await),
        ControlRequest::Expire { ids, all } => match shared.queue.expire(&ids, all).await {
            Ok(ids) => {
                // Answer once they are bounced and gone (or a delivery under way, which
                // finishes first, takes longer than this).
                shared.queue.still_queued(&ids, EXPIRE_WAIT).await;
                ControlReply::Done { count: ids.len() }
            }
            Err(message) => ControlReply::Error { message },
        },
        ControlRequest::Delete { id } => match shared.queue.delete(&id).await {
            Ok(()) => {
                tracing::warn!(queue_id = %id, "deleted by the operator");
                ControlReply::Done { count: 1 }
            }
            Err(message) => ControlReply::Error { message },
        },
    }
}

/// Send one request to a running daemon. `Ok(None)` if no daemon listens.
pub async fn request(spool: &Path, req: &ControlRequest) -> std::io::Result<Option<ControlReply>> {
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
pub async fn offline(spool_dir: &Path, req: &ControlRequest) -> std::io::Result<ControlReply> {
    let envs = crate::queue::Spool::scan(spool_dir)?;
    let spool = crate::queue::Spool::at(spool_dir);
    Ok(match req {
        ControlRequest::List => ControlReply::Messages { messages: envs },
        ControlRequest::Show { id } => match envs.into_iter().find(|e| &e.id == id) {
            Some(envelope) => ControlReply::Message {
                headers: headers_text(&spool, id).await,
                envelope: Box::new(envelope),
            },
            None => ControlReply::Error {
                message: format!("no message {id} in the queue"),
            },
        },
        ControlRequest::Retry { id } => {
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
            ControlReply::Done { count }
        }
        ControlRequest::Reload => ControlReply::Error {
            message: "no daemon is running: it reads its config and keyring when it starts".into(),
        },
        ControlRequest::Hold { ids, all } => {
            match crate::queue::pick(envs.iter(), ids, *all, |e| !e.held && !e.expired) {
                Ok(ids) => {
                    for id in &ids {
                        spool.set_mark(id, Mark::Hold, true).await?;
                    }
                    ControlReply::Done { count: ids.len() }
                }
                Err(message) => ControlReply::Error { message },
            }
        }
        ControlRequest::Release { ids, all } => {
            let picked = crate::queue::pick(envs.iter(), ids, *all, |e| e.held).and_then(|ids| {
                match envs.iter().find(|e| ids.contains(&e.id) && !e.held) {
                    Some(e) => Err(format!("{} is not held", e.id)),
                    None => Ok(ids),
                }
            });
            match picked {
                Ok(ids) => {
                    for mut e in envs.into_iter().filter(|e| ids.contains(&e.id)) {
                        spool.set_mark(&e.id, Mark::Hold, false).await?;
                        // Due as soon as the daemon starts.
                        e.recipients.iter_mut().for_each(|r| r.next_attempt_ms = 0);
                        spool.update(&e).await?;
                    }
                    ControlReply::Done { count: ids.len() }
                }
                Err(message) => ControlReply::Error { message },
            }
        }
        // Marked only: the daemon bounces them when it starts.
        ControlRequest::Expire { ids, all } => {
            match crate::queue::pick(envs.iter(), ids, *all, |e| !e.expired) {
                Ok(ids) => {
                    for id in &ids {
                        spool.set_mark(id, Mark::Expire, true).await?;
                        spool.set_mark(id, Mark::Hold, false).await?;
                    }
                    ControlReply::Done { count: ids.len() }
                }
                Err(message) => ControlReply::Error { message },
            }
        }
        ControlRequest::Delete { id } => {
            if envs.iter().any(|e| &e.id == id) {
                spool.remove(id).await?;
                ControlReply::Done { count: 1 }
            } else {
                ControlReply::Error {
                    message: format!("no message {id} in the queue"),
                }
            }
        }
    })
}
