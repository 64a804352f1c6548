//! How the relay talks to whoever runs it: the [`Shutdown`] signal in, [`RelayEvent`]s
//! out, and the test [`Hooks`].

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Tells every task to stop; cloneable.
#[derive(Clone, Debug)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown(Arc::new(watch::channel(false).0))
    }
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
    /// Resolves once `trigger` was called.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What the relay reports to whoever listens (logs carry the same facts).
#[derive(Clone, Debug)]
pub enum RelayEvent {
    CallEstablished {
        call_id: String,
        peer: String,
        outgoing: bool,
        local_fingerprint: String,
        peer_fingerprint: String,
        suite: String,
        sas: String,
        /// The peer's trust policy: signed, psk or opportunistic.
        trust: String,
        /// What the retained secrets said (see `handshake::Continuity::name`).
        continuity: String,
    },
    CallFailed {
        peer: String,
        reason: String,
    },
    CallEnded {
        call_id: String,
        peer: String,
    },
    Queued {
        id: String,
    },
    /// A message handed to the scheduler while its commit ran was taken back because the
    /// commit failed (its client heard 451). `handed_over`: a lane had taken it, so it
    /// may arrive twice.
    Withdrawn {
        id: String,
        handed_over: bool,
    },
    Delivered {
        id: String,
        recipient: String,
    },
    /// Given up on a recipient; a bounce goes to the sender.
    Failed {
        id: String,
        recipient: String,
        reason: String,
    },
    /// A partner's delivered receipt for our message `id` was checked and stored.
    DeliveredReceipt {
        id: String,
    },
}

/// Where the events go: a broadcast channel; nobody listening is fine.
#[derive(Clone, Debug)]
pub(crate) struct Events(broadcast::Sender<RelayEvent>);

impl Events {
    pub fn new() -> Self {
        Events(broadcast::channel(1024).0)
    }
    pub fn emit(&self, e: RelayEvent) {
        let _ = self.0.send(e);
    }
    pub fn subscribe(&self) -> broadcast::Receiver<RelayEvent> {
        self.0.subscribe()
    }
}

/// Test hooks. Production code never sets these.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Rewrites the media address the caller connects to, so a test can put a recording
    /// or tampering TCP proxy between the relays.
    pub media_connect: Option<Arc<dyn Fn(SocketAddr) -> SocketAddr + Send + Sync>>,
    /// Rewrites the receipts this relay sends back in a call, so a test can play a partner
    /// that lies about what it received (tampered, wrong key, another message or call).
    pub receipt_reply: Option<ReceiptRewrite>,
    /// The same for the `delivered` receipts this relay hands out to `XRECEIPT FETCH`.
    pub delivered_reply: Option<ReceiptRewrite>,
    /// Runs before each fsync of the spool's `queue/`; an error stands for the fsync's,
    /// so a test can play a disk that fails a flush (`Spool::set_dir_sync_fault`).
    pub spool_dir_sync: Option<crate::queue::DirSyncFault>,
    /// Spools messages for a partner without their digest, as a relay before run 37 did,
    /// so a test can send one through the fallback that hashes the bytes as they are sent
    /// (`receipts::WireHash`).
    pub spool_without_digest: bool,
}

/// See [`Hooks::receipt_reply`].
pub type ReceiptRewrite = Arc<
    dyn Fn(Vec<crate::receipt::wire::Signed>) -> Vec<crate::receipt::wire::Signed> + Send + Sync,
>;

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("media_connect", &self.media_connect.is_some())
            .field("receipt_reply", &self.receipt_reply.is_some())
            .field("delivered_reply", &self.delivered_reply.is_some())
            .field("spool_dir_sync", &self.spool_dir_sync.is_some())
            .field("spool_without_digest", &self.spool_without_digest)
            .finish()
    }
}
