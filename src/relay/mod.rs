//! The relay: binds the SMTP and SIP sockets, routes mail, places and answers calls.
//!
//! ```text
//! site MTA --SMTP--> inbound --spool--> scheduler --lane--> caller (SIP call + tunnel) --> peer
//! peer --SIP INVITE--> dispatch --> callee --tunnel--> inbound --spool--> scheduler --lane--> local
//! ```
//!
//! Files, by job (docs/ARCHITECTURE.md, "The relay", has the layers and the data flow):
//! - start and run: `daemon` (spawns the long-lived tasks), `context` (what they share),
//!   `site`, `keys`, `settings` (what a reload may swap), `reload`, `events`, `error`;
//!   `health` (what the metrics endpoint asks: readiness, the gauges read at scrape time)
//!   and `keywatch` (key expiry gauges and warnings);
//! - calls: `dispatch` (the SIP front door), `admission` (the callee's pure checks),
//!   `dialog` (ACK/BYE waits, hang-up, routes through proxies), `callee`, `caller`,
//!   `locate` (a partner's relays) and `failover` (which one next, pure), `established`,
//!   `trust`;
//! - mail: `inbound` (SMTP into the spool), `scheduler` (the queue; commits reports),
//!   `schedule` (its pure rules), `outcome` (jobs and outcomes, pure), `jobs` (the lanes
//!   between the scheduler and the workers),
//!   `local`, `handoff` (one SMTP hand-off), `agent` (the process that makes them, so
//!   that a killed daemon does not cut one off), `inbox` (a partner's attachments into its inbox directory), `outbox` (files dropped
//!   for a partner, sent and moved to `sent/` with their receipt), `bounce`, `sender`, `trace`, `control`, `receipts` (signed receipts: the
//!   receiver's duplicate suppression and signing, the sender's checks, the call journal).

mod admission;
mod agent;
mod bounce;
mod callee;
mod caller;
mod context;
pub mod control;
mod daemon;
mod delivered;
mod dialog;
mod dispatch;
pub mod dnskey;
mod error;
mod established;
mod events;
mod failover;
mod handoff;
mod health;
mod inbound;
mod inbox;
mod jobs;
mod keys;
mod keywatch;
mod local;
mod locate;
mod mediaport;
mod outbox;
mod outcome;
mod receipts;
mod reload;
mod schedule;
mod scheduler;
pub mod sender;
mod settings;
mod sipvocab;
mod site;
mod trace;
pub mod trust;

pub use agent::{AgentCommand, serve as serve_handoff_agent};
pub use daemon::{Running, run, start, start_with_agent};
pub use error::RelayError;
pub use events::{Hooks, RelayEvent, Shutdown};
pub use keys::{KeyringSigner, PeerVerifier, PresentedKeyVerifier, check_keyring};
pub use scheduler::QueueSnapshot;
