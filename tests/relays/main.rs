//! The integration tests that run relays in this process (and real peers beside them),
//! as one test binary with a module per subject. `tests/failover.rs` is not one of them:
//! its assertions read the relays' log through the process's one tracing subscriber.
//!
//! Why one binary: each of these files instantiates the relay's generic and async code
//! (tokio tasks, the SIP and SMTP drivers, `common`'s proxies) again, and as 20 separate
//! crates they took 44-53 s each to compile in release, about 16 of the 24 CPU minutes
//! of `cargo test --release --no-run` on a 2-core machine. Together they compile once
//! (measured: 1 min 5 s, about 2 minutes of CPU).
//!
//! Tests of different modules now run side by side in one process, so each module keeps
//! to its own fixed addresses and ports (a block of 127.0.0.0/8 or a port range named in
//! its header, or port 0) and nothing here touches process-wide state (environment,
//! working directory, limits, the tracing subscriber: only `common::init_logs` sets it,
//! and the first call wins). Run one module with
//! `cargo test --release --test relays -- relay_e2e::`.

mod common;
mod dns_fixture;

mod adversary;
mod audit_gpg;
mod dns_discovery;
mod identity_keys;
mod identity_lockout;
mod identity_media;
mod identity_psk;
mod identity_sender;
mod identity_trust;
mod kamailio;
mod metrics_http;
mod queue_cli;
mod receipts;
mod relay_e2e;
mod relay_paths;
mod reload;
mod routing;
mod send;
mod sip_torture;
mod trust;
