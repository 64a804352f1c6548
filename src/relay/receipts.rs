//! Signed receipts in the relay (issue 14): the receiving side's duplicate suppression and
//! signing, the sending side's check of what came back, the call journal both rely on,
//! and the tap that hashes a message as it is received.
//!
//! The decisions are the pure ones of crate::receipt (`plan`, `check_accepted`); this file
//! joins them to the keyring, the store and the clock.

use super::keys::KeyState;
use crate::offload::{Consume, Offload};
use crate::queue::{Envelope, ReceiptFacts};
use crate::receipt::store::{
    DedupRecord, DeliveredBatch, JournalCall, ReceiptStore, RememberedRcpt, StoredReceipt,
};
use crate::receipt::wire::Signed;
use crate::receipt::{
    AcceptedExpectations, CallRef, DedupKey, Kind, Receipt, ReceiptError, check_accepted,
};
use sha2::Digest;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, ready};
use tokio::io::AsyncWrite;

/// Striped locks: one message's key is decided (looked up, committed, remembered) by one
/// session at a time, so that a resend racing the original cannot queue it twice.
const STRIPES: usize = 64;

pub(crate) struct Receipts {
    pub store: Arc<ReceiptStore>,
    /// The calls we placed that can carry receipts, from the journal and since the start.
    calls: Mutex<Vec<JournalCall>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// The partners whose delivered receipts one of our calls is fetching right now.
    fetching: Mutex<std::collections::HashSet<String>>,
}

/// One call's claim on fetching a partner's delivered receipts; released when dropped.
pub(crate) struct FetchClaim<'a> {
    receipts: &'a Receipts,
    peer: String,
}

impl Drop for FetchClaim<'_> {
    fn drop(&mut self) {
        lock(&self.receipts.fetching).remove(&self.peer);
    }
}

impl Receipts {
    /// Opens the store under `spool`, forgets what is older than `window`, and loads the
    /// call journal.
    pub fn open(spool: &Path, window: std::time::Duration) -> io::Result<Receipts> {
        let store = ReceiptStore::open(spool)?;
        let since = crate::queue::now_ms().saturating_sub(window.as_millis() as u64);
        store.prune(since)?;
        let calls = store.calls(since)?;
        Ok(Receipts {
            store: Arc::new(store),
            calls: Mutex::new(calls),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            fetching: Mutex::default(),
        })
    }

    /// Claims the fetch of `peer`'s delivered receipts for one call; `None` while another
    /// of our calls to it holds the claim. The partner hands every call the same oldest
    /// unacknowledged batch, so two calls fetching at once only carry and verify the same
    /// receipts twice: with 60 calls to one partner that was 60 copies of each batch, and
    /// the memory their replies grew (docs/PERFORMANCE.md).
    pub fn claim_fetch(&self, peer: &str) -> Option<FetchClaim<'_>> {
        let peer = peer.to_ascii_lowercase();
        // Not `then_some`: it would build (and drop, releasing the other call's claim)
        // a claim while the lock is held, which deadlocks.
        if !lock(&self.fetching).insert(peer.clone()) {
            return None;
        }
        Some(FetchClaim {
            receipts: self,
            peer,
        })
    }

    /// The lock for `key` (see [`STRIPES`]).
    pub async fn lock(&self, key: &DedupKey) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock_file(&key.file_name()).await
    }

    /// The lock for the key whose file name ([`DedupKey::file_name`]) is `key_file`.
    pub async fn lock_file(&self, key_file: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let i = key_file
            .get(..4)
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .unwrap_or(0)
            % STRIPES;
        self.stripes[i].lock().await
    }

    /// Journals a call we placed (fsynced) before any message goes through it.
    pub async fn record_call(&self, c: JournalCall) -> io::Result<()> {
        let store = self.store.clone();
        let rec = c.clone();
        blocking(move || store.record_call(&rec)).await?;
        lock(&self.calls).push(c);
        Ok(())
    }

    /// Our calls to `peer` in the journal with one of these Call-IDs.
    pub fn calls_with(&self, peer: &str, call_ids: &[String]) -> Vec<JournalCall> {
        lock(&self.calls)
            .iter()
            .rev() // the newest first: a receipt names a recent call
            .filter(|c| c.peer.eq_ignore_ascii_case(peer) && call_ids.contains(&c.call_id))
            .cloned()
            .collect()
    }

    /// The dedup record of `key`. A key never seen (every message but a resend) is
    /// answered from the index in memory on this thread: both this and
    /// [`put_dedup`](Self::put_dedup) are on the path to the partner's 250, where a turn
    /// through the blocking pool costs a thread wake-up each way (docs/PERFORMANCE.md,
    /// run 12). A record to read is read on the blocking pool.
    pub async fn dedup(&self, key: &DedupKey) -> io::Result<Option<DedupRecord>> {
        if !self.store.dedup_may_exist(key)? {
            return Ok(None);
        }
        let (store, key) = (self.store.clone(), key.clone());
        blocking(move || store.dedup(&key)).await
    }

    /// Writes the record (lazily for a new key: see `ReceiptStore::put_dedup`). A new
    /// key's record is one append into the page cache, made on this thread (see
    /// [`dedup`](Self::dedup)); one that replaces a record is fsynced, on the blocking
    /// pool. The caller holds the key's lock ([`lock`](Self::lock)), so the key cannot
    /// become known in between.
    pub async fn put_dedup(&self, key: &DedupKey, rec: DedupRecord) -> io::Result<()> {
        if !self.store.dedup_may_exist(key)? {
            return self.store.put_dedup(key, &rec, true);
        }
        let (store, key) = (self.store.clone(), key.clone());
        blocking(move || store.put_dedup(&key, &rec, true)).await
    }

    /// Before a partner's message leaves the spool: its duplicate record made durable.
    pub async fn sync_dedup(&self, key_file: String) -> io::Result<()> {
        let store = self.store.clone();
        blocking(move || store.sync_dedup(&key_file)).await
    }

    pub async fn add_sent(
        &self,
        queue_id: &str,
        peer: &str,
        fingerprint: &str,
        new: Vec<Signed>,
    ) -> io::Result<()> {
        let store = self.store.clone();
        let (q, p, f) = (
            queue_id.to_string(),
            peer.to_string(),
            fingerprint.to_string(),
        );
        blocking(move || store.add_sent(&q, &p, &f, &new)).await
    }
}

impl Receipts {
    /// Receiving side: the partner's delivered log fdatasynced.
    pub async fn sync_delivered(&self, peer: &str) -> io::Result<()> {
        let (store, peer) = (self.store.clone(), peer.to_string());
        blocking(move || store.sync_delivered(&peer)).await
    }

    /// Receiving side: the partner's unacknowledged delivered receipts, at most `max`.
    pub async fn delivered_batch(&self, peer: &str, max: usize) -> io::Result<DeliveredBatch> {
        let (store, peer) = (self.store.clone(), peer.to_string());
        blocking(move || store.delivered_batch(&peer, max)).await
    }

    pub async fn ack_delivered(&self, peer: &str, offset: u64) -> io::Result<()> {
        let (store, peer) = (self.store.clone(), peer.to_string());
        blocking(move || store.ack_delivered(&peer, offset)).await
    }

    /// Sending side: checked delivered receipts written into our message's record, durable
    /// only after [`Receipts::sync_sent`] (a fetched batch shares one fdatasync).
    pub async fn add_delivered(&self, queue_id: &str, new: Vec<Signed>) -> io::Result<usize> {
        let (store, q) = (self.store.clone(), queue_id.to_string());
        blocking(move || store.add_delivered_unsynced(&q, &new)).await
    }

    /// Sending side: every record written so far is durable when this returns.
    pub async fn sync_sent(&self) -> io::Result<()> {
        let store = self.store.clone();
        blocking(move || store.sync_sent()).await
    }

    /// Sending side: the accepted receipts stored for our message `queue_id`.
    pub async fn accepted_of(&self, queue_id: &str) -> io::Result<Vec<Receipt>> {
        let (store, q) = (self.store.clone(), queue_id.to_string());
        let rec = blocking(move || store.sent(&q)).await?;
        Ok(rec.map(|r| r.accepted()).unwrap_or_default())
    }
}

/// Runs blocking file work on the blocking pool (the receipt store and the outbox).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The duplicate key of a message committed with `facts`.
pub(crate) fn key_of(facts: &ReceiptFacts) -> DedupKey {
    DedupKey::new(&facts.peer, &facts.sender_queue_id, &facts.message_sha256)
}

/// The `accepted` receipt for a message queued with `facts`: it covers every recipient of
/// the envelope (the ones this acceptance queued).
pub(crate) fn accepted_receipt(receiver: &str, env: &Envelope, facts: &ReceiptFacts) -> Receipt {
    Receipt {
        kind: Kind::Accepted,
        receiver: receiver.to_string(),
        receiver_fingerprint: facts.fingerprint.clone(),
        sender: facts.peer.clone(),
        message_sha256: facts.message_sha256.clone(),
        message_size: facts.message_size,
        message_id: facts.message_id.clone(),
        mail_from: env.mail_from.clone(),
        rcpts: env.recipients.iter().map(|r| r.addr.clone()).collect(),
        sender_queue_id: facts.sender_queue_id.clone(),
        queue_id: env.id.clone(),
        committed_unix_ms: facts.committed_ms,
        call_id: facts.call_id.clone(),
        transcript_sha256: facts.transcript_sha256.clone(),
        handoffs: Vec::new(),
    }
}

/// Signs `r` with our key.
pub(crate) fn sign(keys: &KeyState, r: &Receipt) -> Result<Signed, crate::keyring::KeyringError> {
    let (text, sig) = crate::receipt::sign(&keys.keyring, r)?;
    Ok(Signed { text, sig })
}

/// `rec` with the receipt `signed` and the recipients it covers added.
pub(crate) fn remember(rec: &mut DedupRecord, r: &Receipt, signed: &Signed) {
    let digest = r.digest();
    for a in &r.rcpts {
        if !rec.rcpts.iter().any(|m| m.rcpt == *a) {
            rec.rcpts.push(RememberedRcpt {
                rcpt: a.clone(),
                receipt: digest.clone(),
            });
        }
    }
    if rec.receipt(&digest).is_none() {
        rec.receipts.push(StoredReceipt::from_signed(signed));
    }
}

/// At start-up: every queued message accepted with a receipt whose duplicate record did
/// not make it to disk (a crash between the commit and the record) is remembered now, with
/// its receipt signed again from the facts committed with it. Runs before any delivery.
pub(crate) fn recover(
    receipts: &Receipts,
    keys: &KeyState,
    own_domain: &str,
    envelopes: &[Envelope],
) -> io::Result<usize> {
    let mut n = 0;
    for env in envelopes {
        let Some(facts) = &env.receipt else { continue };
        let key = key_of(facts);
        let mut rec = receipts
            .store
            .dedup_or_torn(&key)?
            .unwrap_or_else(|| DedupRecord::new(&key));
        let r = accepted_receipt(own_domain, env, facts);
        if rec.receipt(&r.digest()).is_some() {
            continue;
        }
        let signed = sign(keys, &r).map_err(|e| io::Error::other(e.to_string()))?;
        remember(&mut rec, &r, &signed);
        receipts.store.put_dedup(&key, &rec, false)?;
        tracing::info!(queue_id = %env.id, peer = %facts.peer, sender_queue_id = %facts.sender_queue_id,
            "receipt recovery: the message was committed but not yet remembered; remembered now");
        n += 1;
    }
    Ok(n)
}

/// What the sender knows of a message it sent through a call, to check the receipts.
pub(crate) struct SentMessage<'a> {
    pub peer: &'a str,
    /// The fingerprint the call authenticated for the peer.
    pub peer_fpr: &'a str,
    pub own_domain: &'a str,
    pub queue_id: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub mail_from: &'a str,
    /// The recipients the partner accepted in this transaction.
    pub rcpts: &'a [String],
}

/// Verifies and checks every receipt in the final reply's lines. All of them must hold
/// (a bad one is an alarm, not something to skip); returns the recipients covered and the
/// receipts to store.
pub(crate) fn check_returned<'a>(
    keys: &KeyState,
    journal: &Receipts,
    m: &SentMessage<'a>,
    lines: impl Iterator<Item = &'a str>,
) -> Result<(Vec<String>, Vec<Signed>), ReceiptError> {
    let signed = crate::receipt::wire::parse_reply_lines(lines)?;
    if signed.is_empty() {
        return Err(ReceiptError::Malformed(
            "the partner accepted the message but returned no receipt".into(),
        ));
    }
    // Every signature first, with the key this call authenticated; then the calls the
    // receipts name, looked up in the journal; then what each attests.
    let verified = signed
        .iter()
        .map(|s| crate::receipt::verify(&keys.keyring, m.peer, m.peer_fpr, &s.text, &s.sig))
        .collect::<Result<Vec<Receipt>, ReceiptError>>()?;
    let named: Vec<String> = verified.iter().map(|r| r.call_id.clone()).collect();
    let calls = journal.calls_with(m.peer, &named);
    let refs: Vec<CallRef<'_>> = calls
        .iter()
        .map(|c| CallRef {
            call_id: &c.call_id,
            transcript_sha256: &c.transcript_sha256,
        })
        .collect();
    let exp = AcceptedExpectations {
        receiver: m.peer,
        receiver_fingerprint: m.peer_fpr,
        sender: m.own_domain,
        message_sha256: m.sha256,
        message_size: m.size,
        sender_queue_id: m.queue_id,
        mail_from: m.mail_from,
        rcpts: m.rcpts,
        calls: &refs,
    };
    let mut covered: Vec<String> = Vec::new();
    for r in &verified {
        for a in check_accepted(r, &exp)? {
            if !covered.iter().any(|c| c == a) {
                covered.push(a.to_string());
            }
        }
    }
    Ok((covered, signed))
}

/// Hashes the bytes of a message as they are received (before anything below rewrites
/// them) and keeps its header section, for the receipt. Off (a plain pass-through) for
/// mail that asks for no receipt.
pub(crate) struct Tap<W> {
    inner: W,
    on: Option<TapState>,
}

struct TapState {
    /// On a thread of its own for a big message (`crate::offload`).
    hash: Offload<sha2::Sha256>,
    head: Vec<u8>,
    head_done: bool,
}

/// Header bytes kept for the Message-ID, at most.
const HEAD_MAX: usize = 64 * 1024;

/// What the tap saw.
pub(crate) struct Tapped {
    pub sha256: String,
    pub size: u64,
    pub message_id: Option<String>,
}

impl<W> Tap<W> {
    pub fn new(inner: W, on: bool) -> Self {
        Tap {
            inner,
            on: on.then(|| TapState {
                hash: Offload::new(sha2::Sha256::new(), "receipt-hash"),
                head: Vec::new(),
                head_done: false,
            }),
        }
    }

    /// The writer, and what was tapped; an error only if the hashing thread failed.
    pub async fn into_parts(self) -> (W, Option<io::Result<Tapped>>) {
        let tapped = match self.on {
            None => None,
            Some(t) => Some(t.finish().await),
        };
        (self.inner, tapped)
    }
}

impl TapState {
    async fn finish(self) -> io::Result<Tapped> {
        let size = self.hash.seen();
        let hash = self.hash.finish().await?;
        Ok(Tapped {
            sha256: hex::encode(hash.finalize()),
            size,
            message_id: mail_parser::MessageParser::default()
                .parse_headers(&self.head[..])
                .and_then(|m| m.message_id().map(|s| s.trim().to_string()))
                .filter(|s| !s.is_empty())
                // The field body as written: mail-parser gives the ID without its <>.
                .map(|s| format!("<{s}>")),
        })
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tap<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Room for what this write may hand to the hashing thread, before the bytes are
        // taken: a worker never waits on that thread (`crate::offload`).
        if let Some(t) = &mut this.on {
            ready!(t.hash.poll_room(cx));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if let Some(t) = &mut this.on {
            let done = &buf[..n];
            t.hash.update(done);
            if !t.head_done {
                let room = HEAD_MAX.saturating_sub(t.head.len());
                // Only the new bytes (and the 3 before them) can complete the blank line.
                let from = t.head.len().saturating_sub(3);
                t.head.extend_from_slice(&done[..done.len().min(room)]);
                t.head_done = t.head[from..].windows(4).any(|w| w == b"\r\n\r\n") || room == 0;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the receiving side will have: the message's bytes as they go on the wire, decoded
/// as a server decodes them (the same `DataReceiver`: after DATA unstuffed, in BDAT
/// chunks as they are), hashed. So the sender's hash matches the receiver's whatever line
/// endings the spooled body had. The decoding and hashing of a big message run on a
/// thread of their own (`crate::offload`); the sending task only copies the bytes.
pub(crate) struct WireHash {
    framing: Option<crate::smtp::client::Framing>,
    work: Option<Offload<WireDecode>>,
}

/// The decoding and hashing, wherever they run.
struct WireDecode {
    framing: crate::smtp::client::Framing,
    rx: crate::smtp::DataReceiver,
    chunk: Vec<u8>,
    hash: sha2::Sha256,
    size: u64,
}

impl WireDecode {
    fn new(framing: crate::smtp::client::Framing) -> Self {
        WireDecode {
            framing,
            rx: crate::smtp::DataReceiver::new(u64::MAX),
            chunk: Vec::new(),
            hash: sha2::Sha256::new(),
            size: 0,
        }
    }
}

impl Consume for WireDecode {
    fn consume(&mut self, wire: &[u8]) {
        match self.framing {
            crate::smtp::client::Framing::Data => {
                self.rx.feed(wire, &mut self.chunk);
                self.hash.update(&self.chunk);
                self.size += self.chunk.len() as u64;
                self.chunk.clear();
            }
            crate::smtp::client::Framing::Chunks => {
                self.hash.update(wire);
                self.size += wire.len() as u64;
            }
        }
    }
}

impl WireHash {
    pub fn new() -> Self {
        WireHash {
            framing: None,
            work: None,
        }
    }

    /// Feed the bytes written on the wire. Chunks are sent already normalised (the client's
    /// encoder ends them with CRLF), so they are the message as they are. One message has
    /// one framing: the client sends it either in one BDAT chunk or after DATA.
    pub fn feed(&mut self, framing: crate::smtp::client::Framing, wire: &[u8]) {
        let work = self.work.get_or_insert_with(|| {
            self.framing = Some(framing);
            Offload::new(WireDecode::new(framing), "receipt-hash")
        });
        debug_assert_eq!(self.framing, Some(framing), "one framing per message");
        work.update(wire);
    }

    /// SHA-256 (hex) and size of the decoded message; an error only if the hashing
    /// thread failed.
    pub async fn digest(self) -> io::Result<(String, u64)> {
        let d = match self.work {
            Some(w) => w.finish().await?,
            None => WireDecode::new(crate::smtp::client::Framing::Chunks),
        };
        Ok((hex::encode(d.hash.finalize()), d.size))
    }
}

/// The SMTP client shows a message to its observer in pieces no larger than what
/// `WireHash`'s `poll_ready` promises to take without blocking.
const _: () = assert!(crate::smtp::client::OBSERVE_MAX <= crate::offload::CHUNK);

impl crate::smtp::client::Observe for WireHash {
    /// Ready when the next [`feed`](WireHash::feed) of at most [`crate::offload::CHUNK`] bytes
    /// will not block: the hashing thread, once there is one, is not behind.
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
        match &mut self.work {
            Some(w) => w.poll_room(cx),
            None => Poll::Ready(()),
        }
    }
    fn see(&mut self, framing: crate::smtp::client::Framing, bytes: &[u8]) {
        self.feed(framing, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One call at a time fetches a partner's delivered receipts: a second claim is
    /// refused (and its refusal does not release the first), the name's case does not
    /// matter, other partners are independent, and the claim ends when dropped.
    #[test]
    fn one_call_at_a_time_fetches_a_partners_delivered_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let r = Receipts::open(dir.path(), std::time::Duration::from_secs(3600)).unwrap();
        let first = r.claim_fetch("site-b.test").expect("the first claim");
        assert!(
            r.claim_fetch("SITE-B.test").is_none(),
            "a second claim while held"
        );
        assert!(
            r.claim_fetch("site-b.test").is_none(),
            "the refusal released the claim"
        );
        let other = r
            .claim_fetch("site-c.test")
            .expect("another partner's claim");
        drop(first);
        assert!(
            r.claim_fetch("site-b.test").is_some(),
            "the claim outlived its drop"
        );
        drop(other);
    }

    /// The sender's hash is of what the receiver decodes, even for a body with bare LFs,
    /// a lone CR, leading dots and no final line break (which the client normalises).
    #[tokio::test]
    async fn wire_hash_is_the_hash_of_what_the_server_decodes() {
        let body = b"a\nb\r\n.dot\rc\r\n..two\nend";
        let mut stuffer = crate::smtp::DotStuffer::new();
        let mut wire = Vec::new();
        stuffer.encode(&body[..7], &mut wire);
        stuffer.encode(&body[7..], &mut wire);
        stuffer.finish(&mut wire);
        let mut h = WireHash::new();
        for piece in wire.chunks(3) {
            h.feed(crate::smtp::client::Framing::Data, piece);
        }
        let mut rx = crate::smtp::DataReceiver::new(u64::MAX);
        let mut decoded = Vec::new();
        rx.feed(&wire, &mut decoded);
        assert_eq!(decoded, b"a\r\nb\r\n.dot\r\nc\r\n..two\r\nend\r\n");
        let expected = (
            hex::encode(sha2::Sha256::digest(&decoded)),
            decoded.len() as u64,
        );
        assert_eq!(h.digest().await.unwrap(), expected);

        // The same body in one BDAT chunk: the same bytes reach the server, so the same
        // hash, and the server's chunked receiver stores exactly them.
        let mut enc = crate::smtp::DotStuffer::chunking();
        let mut chunk = Vec::new();
        enc.encode(&body[..7], &mut chunk);
        enc.encode(&body[7..], &mut chunk);
        enc.finish(&mut chunk);
        let mut h = WireHash::new();
        h.feed(crate::smtp::client::Framing::Chunks, &chunk);
        assert_eq!(h.digest().await.unwrap(), expected);
        let mut rx = crate::smtp::DataReceiver::chunked(u64::MAX);
        rx.start_chunk(chunk.len() as u64, true);
        let mut stored = Vec::new();
        assert_eq!(rx.feed(&chunk, &mut stored), chunk.len());
        assert!(rx.is_done());
        assert_eq!(rx.verdict(), crate::smtp::DataVerdict::Ok);
        assert_eq!(stored, decoded);
    }

    /// A body of several offload chunks, whose decoding and hashing move to a thread of
    /// their own part-way: the digest is still that of what the server decodes, with
    /// dot-stuffed lines and CRLFs split across the pieces and across the chunks.
    #[tokio::test]
    async fn wire_hash_of_a_big_message_is_the_same_off_thread() {
        let mut body = b"Subject: big\r\n\r\n".to_vec();
        let mut i = 0u32;
        while body.len() < 3 * crate::offload::CHUNK + 12_345 {
            // Every 7th line starts with a dot; lines of varying length.
            let dot = if i.is_multiple_of(7) { "." } else { "" };
            body.extend_from_slice(
                format!("{dot}line {i} {}\r\n", "y".repeat((i % 97) as usize)).as_bytes(),
            );
            i += 1;
        }
        let mut stuffer = crate::smtp::DotStuffer::new();
        let mut wire = Vec::new();
        stuffer.encode(&body, &mut wire);
        stuffer.finish(&mut wire);
        let mut h = WireHash::new();
        for piece in wire.chunks(40_961) {
            h.feed(crate::smtp::client::Framing::Data, piece);
        }
        let expected = (hex::encode(sha2::Sha256::digest(&body)), body.len() as u64);
        assert_eq!(h.digest().await.unwrap(), expected);
    }

    /// The receiving side's tap over a big message: what passes through is unchanged, the
    /// hash and size are those of the whole message, and the Message-ID comes from its
    /// header section.
    #[tokio::test]
    async fn the_tap_hashes_a_big_message_off_thread() {
        use tokio::io::AsyncWriteExt;
        let mut msg = b"Message-ID: <big@site-a.test>\r\nSubject: big\r\n\r\n".to_vec();
        while msg.len() < 2 * crate::offload::CHUNK + 777 {
            msg.extend_from_slice(b"0123456789abcdef0123456789abcdef0123456789abcdef\r\n");
        }
        let mut tap = Tap::new(Vec::new(), true);
        for piece in msg.chunks(65_537) {
            tap.write_all(piece).await.unwrap();
        }
        let (out, tapped) = tap.into_parts().await;
        assert_eq!(out, msg);
        let t = tapped.expect("tap on").expect("hashed");
        assert_eq!(t.sha256, hex::encode(sha2::Sha256::digest(&msg)));
        assert_eq!(t.size, msg.len() as u64);
        assert_eq!(t.message_id.as_deref(), Some("<big@site-a.test>"));
    }
}
