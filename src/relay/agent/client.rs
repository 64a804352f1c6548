//! The daemon's side of the hand-off agent: starts it when a hand-off first needs it (and
//! again after it stopped), sends requests, and matches the responses.

use super::{AgentCommand, Request, Response, lock};
use crate::relay::handoff::SmtpHop;
use crate::relay::outcome::Job;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::oneshot;

/// Requests waiting for their response; `None` once the agent's output ended (it stopped).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>>;

pub(crate) struct Agent {
    cmd: AgentCommand,
    spool: PathBuf,
    running: tokio::sync::Mutex<Option<Running>>,
    next: AtomicU64,
}

struct Running {
    stdin: ChildStdin,
    pending: Pending,
}

impl Agent {
    pub fn new(cmd: AgentCommand, spool: PathBuf) -> Agent {
        Agent {
            cmd,
            spool,
            running: tokio::sync::Mutex::new(None),
            next: AtomicU64::new(1),
        }
    }

    /// A number for a lane (its connection cache in the agent).
    pub fn lane_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Have the agent hand `job` to `hop`. An error means the agent stopped (or could not
    /// be started) before it answered: the hand-off may or may not have happened, and
    /// the marker says which if the agent got as far as writing it.
    pub async fn hand_off(
        &self,
        lane: u64,
        hostname: &str,
        hop: &SmtpHop,
        job: &Job,
    ) -> Result<Response, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            n,
            lane,
            hostname: hostname.to_string(),
            hop: hop.clone(),
            job: job.clone(),
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let rx = {
            let mut running = self.running.lock().await;
            let (tx, rx) = oneshot::channel();
            let mut tx = Some(tx);
            // A stopped agent is started again, once per request.
            for _ in 0..2 {
                if running.is_none() {
                    *running = Some(self.start()?);
                }
                let Some(r) = running.as_mut() else { break };
                let registered = match lock(&r.pending).as_mut() {
                    Some(p) => {
                        if let Some(tx) = tx.take() {
                            p.insert(n, tx);
                        }
                        true
                    }
                    None => false,
                };
                if !registered {
                    *running = None;
                    continue;
                }
                if let Err(e) = r.stdin.write_all(&line).await {
                    if let Some(p) = lock(&r.pending).as_mut() {
                        p.remove(&n);
                    }
                    *running = None;
                    return Err(format!("cannot write to the hand-off agent: {e}"));
                }
                break;
            }
            rx
        };
        match rx.await {
            Ok(Response {
                refused: Some(why), ..
            }) => Err(why),
            Ok(r) => Ok(r),
            Err(_) => Err("the hand-off agent stopped before it answered".to_string()),
        }
    }

    fn start(&self) -> Result<Running, String> {
        let mut child = tokio::process::Command::new(&self.cmd.program)
            .args(&self.cmd.args)
            .arg("--spool")
            .arg(&self.spool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // It must outlive a killed daemon: that is what it is for.
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the hand-off agent {}: {e}",
                    self.cmd.program.display()
                )
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the hand-off agent has no pipes".into());
        };
        tracing::debug!(pid = ?child.id(), "hand-off agent started");
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(read_responses(stdout, pending.clone(), child));
        Ok(Running { stdin, pending })
    }
}

/// Hand each response to its request; when the agent's output ends, fail the requests
/// still waiting and reap the process.
async fn read_responses(stdout: ChildStdout, pending: Pending, mut child: Child) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(l)) => match serde_json::from_str::<Response>(&l) {
                Ok(r) => {
                    let tx = lock(&pending).as_mut().and_then(|p| p.remove(&r.n));
                    if let Some(tx) = tx {
                        let _ = tx.send(r);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "unreadable response from the hand-off agent")
                }
            },
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "cannot read from the hand-off agent");
                break;
            }
        }
    }
    let waiting = lock(&pending).take().map_or(0, |p| p.len());
    let status = child.wait().await;
    if waiting > 0 || !matches!(&status, Ok(s) if s.success()) {
        tracing::warn!(status = ?status, waiting,
            "the hand-off agent stopped; the next hand-off starts a new one");
    }
}
