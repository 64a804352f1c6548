//! The hand-off agent: a child process of the daemon that makes its SMTP hand-offs (to
//! the site's MTA and to SMTP next hops), as Postfix's delivery agents are processes of
//! their own.
//!
//! Why a process: between sending the end of a message and reading the next hop's reply
//! (RFC 1047's window), the next hop commits the message. A daemon killed inside that
//! window never learns that it did, and sends the message again after its restart: a
//! duplicate. The window lasts as long as the next hop's fsync, so a kill -9 of a busy
//! relay often finds a lane in it. The agent is not killed with the daemon: it finishes
//! the transactions it has begun and writes each outcome into the message's `.sending`
//! marker, which the next daemon replays instead of sending again.
//!
//! How the two processes stay out of each other's way:
//! - the agent holds an advisory lock (flock) on a message's marker from before its
//!   transaction begins until the outcome is written; the spool's recovery takes the same
//!   lock before it reads a marker, so it waits for an agent still at work;
//! - after taking the lock, the agent checks that the daemon that asked is still its
//!   parent. A request still in the pipe when the daemon died is dropped, never begun:
//!   the next daemon may already have read that marker and queued the message again.
//!
//! The wire between them is one JSON object per line: a [`Request`] on the agent's
//! standard input, a [`Response`] on its standard output (matched by `n`). The agent
//! stops when its standard input ends, after finishing what it has begun; it ignores
//! SIGINT and SIGTERM, which reach it together with the daemon.
//!
//! What remains: a kill of the agent itself (or a power cut) inside the window still
//! makes a duplicate, as for any SMTP client.

mod client;
mod serve;

pub(crate) use client::Agent;
pub use serve::serve;

use super::handoff::SmtpHop;
use super::outcome::{Job, RcptOutcome};
use crate::queue::HandoffNote;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;

/// A lock that a panic elsewhere did not make unusable (both sides keep plain maps).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the daemon starts its agent: this program with these arguments, then
/// `--spool DIR` (the CLI gives its own executable and `handoff-agent`).
#[derive(Clone, Debug)]
pub struct AgentCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// One hand-off the daemon asks for.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    /// Matches the response.
    pub n: u64,
    /// The daemon's lane: the agent keeps one cached connection per lane.
    pub lane: u64,
    /// Our name in EHLO.
    pub hostname: String,
    pub hop: SmtpHop,
    pub job: Job,
}

/// What the hand-off did.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    pub n: u64,
    pub outcomes: Vec<(String, RcptOutcome)>,
    pub handoffs: Vec<HandoffNote>,
    /// The outcome is written into the marker (so the daemon need not write it).
    pub noted: bool,
    /// The agent could not read the request (no hand-off was made).
    #[serde(default)]
    pub refused: Option<String>,
}
