//! sipmail: a drop-in SMTP smarthost that carries mail between sites through signed SIP
//! calls and encrypted streams. See README.md and docs/ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dns;
pub mod document;
pub mod domain;
pub mod group_commit;
pub mod handshake;
pub mod keyring;
pub mod listen;
pub mod metrics;
pub mod offload;
pub mod own_thread;
pub mod queue;
pub mod receipt;
pub mod relay;
pub mod reuse;
pub mod sip;
pub mod smtp;
pub mod time;
pub mod tunnel;
