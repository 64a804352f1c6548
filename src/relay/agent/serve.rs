//! The agent's side: `sipmail handoff-agent --spool DIR`, started by the daemon. Reads
//! requests on standard input, makes each hand-off (several at once, one cached
//! connection per lane), writes the outcome into the marker, then answers.

use super::{Request, Response, lock};
use crate::queue::Spool;
use crate::relay::handoff;
use crate::smtp::SmtpClient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a connection is kept open for the lane's next message.
const SMTP_IDLE: Duration = Duration::from_secs(5);

struct Shared {
    spool: Spool,
    /// The daemon that started us: a request is only begun while it still lives.
    parent: u32,
    conns: Mutex<HashMap<u64, (SmtpClient<TcpStream>, Instant)>>,
    out: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
}

/// Serve the daemon until its requests end (its end of the pipe closed: it stopped),
/// then finish what was begun and quit.
pub async fn serve(spool: PathBuf) -> std::io::Result<()> {
    ignore_stop_signals();
    let shared = Arc::new(Shared {
        spool: Spool::at(&spool),
        parent: std::os::unix::process::parent_id(),
        conns: Mutex::new(HashMap::new()),
        out: tokio::sync::Mutex::new(stdout()),
    });
    let mut lines = BufReader::new(stdin()).lines();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            l = lines.next_line() => match l {
                Ok(Some(l)) => match serde_json::from_str::<Request>(&l) {
                    Ok(req) => {
                        tasks.spawn(handle(shared.clone(), req));
                    }
                    Err(e) => refuse(&shared, &l, e).await,
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "hand-off agent: cannot read requests");
                    break;
                }
            },
            _ = sweep.tick() => {
                let idle: Vec<_> = {
                    let mut conns = lock(&shared.conns);
                    let old: Vec<u64> = conns
                        .iter()
                        .filter(|(_, (_, t))| t.elapsed() >= SMTP_IDLE)
                        .map(|(k, _)| *k)
                        .collect();
                    old.iter().filter_map(|k| conns.remove(k)).collect()
                };
                for (c, _) in idle {
                    tasks.spawn(async move { let _ = c.quit().await; });
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // The daemon is gone (or stopping): finish every hand-off begun, so each outcome is
    // in its marker for the next daemon.
    while tasks.join_next().await.is_some() {}
    let conns: Vec<_> = lock(&shared.conns).drain().collect();
    for (_, (c, _)) in conns {
        let _ = c.quit().await;
    }
    Ok(())
}

/// Standard input as the daemon gives it, a pipe, read through the runtime's epoll:
/// tokio's `stdin()` reads on a blocking thread, which put a thread wake-up each way on
/// every hand-off's path (docs/PERFORMANCE.md, run 14). Anything else (a terminal, a
/// file: the agent run by hand) is read the portable way.
fn stdin() -> Box<dyn AsyncRead + Send + Unpin> {
    use std::os::fd::AsFd;
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdin()),
    }
}

/// Standard output likewise (the answers): a pipe written through epoll, else tokio's
/// `stdout()`. Nothing else in the agent writes to standard output (its log goes to
/// standard error), so the pipe's non-blocking mode surprises no one.
fn stdout() -> Box<dyn AsyncWrite + Send + Unpin> {
    use std::os::fd::AsFd;
    let pipe = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(tokio::net::unix::pipe::Sender::from_owned_fd);
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdout()),
    }
}

/// SIGINT (Ctrl-C in a terminal) and SIGTERM (a service manager) reach the daemon and us
/// together; the daemon stops cleanly and closes our input, which is when we stop.
fn ignore_stop_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        match signal(kind) {
            Ok(mut s) => {
                tokio::spawn(async move { while s.recv().await.is_some() {} });
            }
            Err(e) => tracing::warn!(error = %e, "hand-off agent: cannot handle a stop signal"),
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request) {
    let job = &req.job;
    let marker = shared.spool.sending_path(&job.id, &job.route);
    let claim = match claim(&marker).await {
        Ok(f) => f,
        Err(e) => {
            let msg = format!("the hand-off agent cannot claim {}: {e}", marker.display());
            let outcomes = job.all(crate::relay::outcome::RcptOutcome::Transient(msg));
            return answer(&shared, req.n, outcomes, Vec::new(), false).await;
        }
    };
    // Begun only while the daemon that asked still lives: once it is gone, the next one
    // may already have read this marker (empty) and queued the message again.
    if std::os::unix::process::parent_id() != shared.parent {
        tracing::info!(queue_id = %job.id,
            "hand-off agent: the daemon stopped before this hand-off began; left to the next one");
        return;
    }
    let mut conn = lock(&shared.conns).remove(&req.lane).map(|(c, _)| c);
    let mut handoffs = Vec::new();
    let outcomes = handoff::to_smtp(
        &req.hostname,
        &req.hop,
        job,
        &shared.spool.body_path(&job.id),
        &mut conn,
        &mut handoffs,
    )
    .await;
    if let Some(c) = conn {
        lock(&shared.conns).insert(req.lane, (c, Instant::now()));
    }
    // First of all: the note the next daemon replays if this one is gone.
    let noted = match handoff::handed(job, &outcomes, &handoffs) {
        Some(h) => match shared.spool.handed(&h) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(queue_id = %job.id, error = %e,
                    "hand-off agent: cannot note the hand-off; if sipmail stops before the outcome is recorded, the message may arrive twice");
                false
            }
        },
        None => false,
    };
    drop(claim);
    answer(&shared, req.n, outcomes, handoffs, noted).await;
}

/// Open the message's marker and take its lock (waiting, off the runtime, if the spool's
/// recovery holds it: on a thread of its own, since that wait is on another process, not
/// on the disk).
async fn claim(marker: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::File::open(marker)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            crate::own_thread::spawn("agent-claim", move || f.lock().map(|()| f))?
                .await
                .map_err(std::io::Error::other)?
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// A request we cannot read (a daemon of another version?): answered as refused when
/// its number can be read, so the daemon's lane does not wait for ever.
async fn refuse(shared: &Shared, line: &str, e: serde_json::Error) {
    tracing::error!(error = %e, "hand-off agent: unreadable request");
    let n = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("n").and_then(serde_json::Value::as_u64));
    if let Some(n) = n {
        let r = Response {
            n,
            outcomes: Vec::new(),
            handoffs: Vec::new(),
            noted: false,
            refused: Some(format!("the hand-off agent cannot read the request: {e}")),
        };
        write_line(shared, &r).await;
    }
}

async fn answer(
    shared: &Shared,
    n: u64,
    outcomes: Vec<(String, crate::relay::outcome::RcptOutcome)>,
    handoffs: Vec<crate::queue::HandoffNote>,
    noted: bool,
) {
    let r = Response {
        n,
        outcomes,
        handoffs,
        noted,
        refused: None,
    };
    write_line(shared, &r).await;
}

async fn write_line(shared: &Shared, r: &Response) {
    let Ok(mut line) = serde_json::to_vec(r) else {
        return;
    };
    line.push(b'\n');
    let mut out = shared.out.lock().await;
    // The daemon may be gone: then nobody reads this, and the marker says it instead.
    let _ = out.write_all(&line).await;
    let _ = out.flush().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// While another open file holds the marker's lock (the daemon's spool recovery), the
    /// claim waits off the runtime: the runtime's one thread goes on with other tasks, and
    /// the claim completes once the lock is released.
    #[tokio::test(flavor = "current_thread")]
    async fn a_claim_waits_for_the_lock_without_holding_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ID.local.sending");
        std::fs::write(&marker, b"\n").unwrap();
        let held = std::fs::File::open(&marker).unwrap();
        held.lock().unwrap();
        let m = marker.clone();
        let claim = tokio::spawn(async move { super::claim(&m).await });
        // The runtime still runs timers while the claim waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !claim.is_finished(),
            "the claim took a lock someone else holds"
        );
        drop(held);
        let f = tokio::time::timeout(Duration::from_secs(10), claim)
            .await
            .expect("the claim ends once the lock is released")
            .unwrap()
            .unwrap();
        // The claim holds the lock now: another open file cannot take it.
        let other = std::fs::File::open(&marker).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(f);
    }
}
