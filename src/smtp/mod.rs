//! SMTP for sipmail: a sans-IO server session with a thin tokio driver, and
//! an SMTP client. Self-contained: depends only on tokio, smtp-proto,
//! thiserror and tracing.
//!
//! - [`ServerSession`]: the pure server state machine (bytes in, replies and
//!   [`Event`]s out).
//! - [`serve`] / [`Backend`]: runs a session over any async stream.
//! - [`SmtpClient`]: sends mail to another SMTP server.
//! - [`Reply`], [`parse_reply`]: replies and their wire form.
//! - [`DataReceiver`], [`DotStuffer`]: the DATA phase codecs.

pub mod client;
pub mod data;
pub mod driver;
pub mod dsn;
pub mod reply;
pub mod server;

pub use client::{ClientError, ClientTimeouts, Extensions, MailOptions, SendOutcome, SmtpClient};
pub use data::{DataReceiver, DataVerdict, DecodedDigest, DotStuffer};
pub use driver::{Backend, SessionSummary, SmtpError, serve};
pub use dsn::{Notify, RcptParams, Ret};
pub use reply::{Reply, ReplyLimits, ReplyParseError, parse_reply};
pub use server::{
    CloseReason, Envelope, Event, MailParams, ReceiptCommand, ServerConfig, ServerSession,
    SessionStats,
};
