//! The durable spool.
//!
//! Layout under the spool directory:
//! - `tmp/`   bodies and envelopes being written; anything here at start-up is debris.
//! - `queue/` committed messages: `ID.msg` (the message) and `ID.env` (JSON envelope with
//!   per-recipient state). The `.env` appearing by rename is the commit point.
//! - `corrupt/` envelopes that could not be read, kept for a human.
//! - `queue/ID.hold`, `queue/ID.expire`: an operator's marks ([`Mark`]), empty files.
//! - `queue/ID.ROUTE.sending`: a delivery over ROUTE is under way. For a call, it names
//!   the partner relay ([`Interrupted`]: a process killed mid-transaction sends the message
//!   to that relay again). Otherwise empty until the next hop accepted it; then it holds
//!   the [`Handed`] recipients, so that a process killed before it recorded the outcome
//!   does not hand the message over a second time.
//!
//! Commit: fsync the body, write and fsync the envelope in tmp/, rename the body, rename
//! the envelope, fsync `queue/`. Only then does SMTP answer 250. If that last fsync fails,
//! both files are taken back out of `queue/` before the 451, so that a restart does not
//! deliver the copy whose sender was told to send it again.
//!
//! A small body (one that fits the body writer's buffer) commits in one fsync latency
//! instead of two: body and envelope are written, both renamed into `queue/` (the
//! envelope last, so a killed process never leaves an envelope without its whole body),
//! and then the envelope's fdatasync and the fsync of `queue/` run in turn on the thread
//! that staged them (a body not copied into the envelope gets its fdatasync beside them);
//! SMTP answers 250 only when all of them are done. A power loss before that can
//! leave names on disk whose data is not (a recycled file's old content, a torn one):
//! the envelope then carries the body's CRC-32, and recovery moves a message whose
//! envelope does not parse, names another ID, or whose body does not match to `corrupt/`.
//! A small body of at most `INLINE_BODY_MAX` is also written into its envelope
//! (`body_inline`), and then only the envelope is fdatasynced: recovery writes the body
//! file again from that copy where the body file did not reach the disk.

pub mod bodyio;
pub mod maildir;
mod probe;
mod route;

use crate::group_commit::{GroupCommit, fsync_dir};
use route::route_key;
pub use route::{NextHop, Route};

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub addr: String,
    pub route: Route,
    pub state: RcptState,
    #[serde(default)]
    pub attempts: u32,
    /// Unix time in milliseconds of the next attempt.
    #[serde(default)]
    pub next_attempt_ms: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// NOTIFY and ORCPT as the sender gave them, passed on to the next hop.
    #[serde(default)]
    pub dsn: crate::smtp::RcptParams,
    /// A "delayed" DSN went out for this recipient (at most one is sent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
    /// The partner relay that may already hold this message (see [`RelayPin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<RelayPin>,
}

/// A partner relay that may already hold a message: a transaction with it got no reply
/// after the end of the message. Until `until_ms` the next attempts go to that relay only:
/// it recognises the resend (our queue ID and the message's hash) and returns its
/// receipt, where another relay of the site would deliver the message a second time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayPin {
    /// The relay, as the call's target names it (`crate::dns::CallTarget::label`).
    pub relay: String,
    /// Unix time in milliseconds.
    pub until_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    /// Unix time in seconds when we accepted it.
    pub received: u64,
    pub client: String,
    pub helo: String,
    pub mail_from: String,
    pub recipients: Vec<Recipient>,
    pub size: u64,
    pub body_8bit: bool,
    /// The sender used SMTPUTF8 (RFC 6531); the next hop must offer it too.
    #[serde(default)]
    pub smtputf8: bool,
    /// RET and ENVID (RFC 3461), passed on to the next hop and used in our own DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<crate::smtp::Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// Held by the operator (`sipmail queue hold`): not tried until released. The
    /// [`Mark::Hold`] file is the durable record; this field shows it (it is read from the
    /// mark whenever the spool is read, whatever the envelope file says).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// Expired by the operator (`sipmail queue expire`): its pending recipients fail as if
    /// past `queue.max_age`, with a bounce. Read from the [`Mark::Expire`] file likewise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    /// A partner asked for a signed receipt (issue 14): what it attests, committed with the
    /// message so that a receipt lost in a crash can be issued again at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Box<ReceiptFacts>>,
    /// The body as a partner decodes it once sent (`smtp::DecodedDigest`), hashed while it
    /// was spooled; kept for a message routed to a partner, so that checking the receipt
    /// of each attempt needs no second pass over the body. Absent: hashed as it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded: Option<Box<DecodedBody>>,
    /// CRC-32 of the body file, written only by a small message's commit
    /// ([`Spool::commit_parts`]), whose body, envelope and names reach the disk side by
    /// side: recovery reads the body against it to tell a commit cut short by a power
    /// loss from a committed message. Cleared once checked; later rewrites leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_crc32: Option<u32>,
    /// A small body's bytes (base64), in the envelope file of its commit: that commit
    /// fdatasyncs this one file and writes the body's own file without syncing it
    /// ([`Spool::stage_small`]). Only in the file: recovery restores the body file from
    /// it where the body file did not reach the disk, and no envelope in memory keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_inline: Option<Box<str>>,
}

/// SHA-256 (hex) and size of a body as a partner decodes it: see [`Envelope::decoded`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodedBody {
    pub sha256: String,
    pub size: u64,
}

impl DecodedBody {
    /// Of a body that is in memory whole.
    pub fn of(body: &[u8]) -> Self {
        let mut d = crate::smtp::DecodedDigest::new();
        d.update(body);
        Self::from_digest(d)
    }

    /// Once every byte of the body went through `d`.
    pub fn from_digest(d: crate::smtp::DecodedDigest) -> Self {
        let (sha256, size) = d.finish();
        DecodedBody { sha256, size }
    }
}

/// What a receiving relay's `accepted` receipt for a queued message says, beyond the
/// envelope's own sender and recipients (see crate::receipt::Receipt).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptFacts {
    /// The sending relay's domain (as its call authenticated it) and queue ID.
    pub peer: String,
    pub sender_queue_id: String,
    /// SHA-256 (hex) and size of the bytes as received, before our trace header.
    pub message_sha256: String,
    pub message_size: u64,
    pub message_id: Option<String>,
    pub call_id: String,
    pub transcript_sha256: String,
    /// Our key's fingerprint, and when the commit started (Unix ms).
    pub fingerprint: String,
    pub committed_ms: u64,
}

/// What a `.sending` marker says once the next hop accepted the message: the recipients
/// it took and, per recipient, what the hand-off was (for a partner's delivered receipt).
/// Written the moment the reply is read, before anything else, and replayed at start-up
/// as the report the process did not live to make.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub id: String,
    pub route: Route,
    pub delivered: Vec<String>,
    /// Per recipient, what the hand-off was, kept so that a replayed delivered receipt
    /// is the same document as the one the killed process may already have written.
    #[serde(default)]
    pub handoffs: Vec<HandoffNote>,
}

/// One recipient's hand-off: `to` is `maildir <file>` or `smtp <the MTA's reply>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffNote {
    pub rcpt: String,
    pub at_ms: u64,
    pub to: String,
}

/// What [`Spool::recover`] found: the committed messages, and the hand-offs whose
/// outcome was never recorded.
pub struct Recovered {
    pub spool: Spool,
    pub envelopes: Vec<Envelope>,
    pub handed: Vec<Handed>,
    pub interrupted: Vec<Interrupted>,
}

/// A transaction with a partner relay that the last process did not live to finish: the
/// relay may hold the message, so it is pinned to it (see [`RelayPin`]). Its marker stays
/// until that outcome is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interrupted {
    pub id: String,
    pub route: Route,
    pub relay: String,
}

/// A call's `.sending` marker: the relay the message is being sent to.
#[derive(Serialize, Deserialize)]
struct SendingTo {
    relay: String,
}

/// What a `.sending` marker holds.
enum MarkerNote {
    /// Nothing yet (or the file is gone).
    Empty,
    /// The next hop took the message ([`Spool::handed`]).
    Handed(Handed),
    /// A call to this partner relay was under way ([`Spool::begin_send`]).
    Relay(String),
    Unreadable(serde_json::Error),
}

impl MarkerNote {
    fn read(marker: &Path) -> MarkerNote {
        let bytes = match fs::read(marker) {
            Ok(b) if !b.iter().all(u8::is_ascii_whitespace) => b,
            _ => return MarkerNote::Empty,
        };
        match first_value::<Handed>(&bytes) {
            Ok(h) => MarkerNote::Handed(h),
            Err(err) => match first_value::<SendingTo>(&bytes) {
                Ok(to) => MarkerNote::Relay(to.relay),
                Err(_) => MarkerNote::Unreadable(err),
            },
        }
    }
}

/// Write `bytes` over a (recycled) file in place: from offset 0, then cut the file to
/// their length if it was longer. Never truncated to zero first, for two reasons seen on
/// ext4 (docs/ARCHITECTURE.md, "Spool file reuse"): a file truncated to zero and then
/// written is flushed to the disk when it is closed (the `auto_da_alloc` heuristic), and
/// the truncation frees the file's blocks (with the `discard` mount option, a discard
/// request each) only for the write to allocate them again, which then makes its
/// fdatasync write the allocation too. Overwritten, a file of about the old size keeps
/// its blocks. Until the cut, the file holds the new bytes followed by the old tail:
/// callers either read only a first JSON value ([`MarkerNote::read`]) or publish the file
/// by a rename only after this returns.
fn write_over(f: &fs::File, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(bytes, 0)?;
    if f.metadata()?.len() > bytes.len() as u64 {
        f.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

/// A small body up to this size is committed inside its envelope file as well
/// (`Envelope::body_inline`): one fdatasync per commit instead of two.
const INLINE_BODY_MAX: usize = 64 * 1024;

/// Envelope files are padded to a multiple of this.
const ENV_FILE_ROUND: usize = 512;
/// An old envelope file's size is kept for a new envelope up to this much shorter.
const ENV_FILE_PAD_MAX: usize = 4096;

/// The size to give an envelope file of `json` bytes that now holds `old` bytes: `old`
/// (the JSON followed by spaces, which JSON allows) when the JSON fits and does not leave
/// much more than a block of padding, else the JSON's length rounded up to
/// [`ENV_FILE_ROUND`]. Why: an fdatasync must also write the inode, a second synchronous
/// write to the disk, when the file's size changed (ext4 without a journal; on this
/// project's VMs 190 against 125 µs, 84 against 46 µs of system CPU, for a recycled file
/// of 700 bytes, docs/PERFORMANCE.md run 23). Envelopes of one relay differ by a few
/// bytes (IDs, times, states) plus their small bodies' copies (`body_inline`), so once
/// rounded a recycled file keeps its size when the bodies are of about one size.
fn env_file_len(old: u64, json: usize) -> usize {
    match usize::try_from(old) {
        Ok(old) if old >= json && old - json <= ENV_FILE_PAD_MAX => old,
        _ => json.div_ceil(ENV_FILE_ROUND) * ENV_FILE_ROUND,
    }
}

/// The first JSON value in `bytes`; what follows it is ignored: a marker written over in
/// place ([`write_over`]) by a process that stopped before the cut still reads as its note.
fn first_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<T>()
        .next()
        .unwrap_or_else(|| serde_json::from_slice(b""))
}

/// An operator's mark on a queued message: an empty file `queue/ID.hold` or
/// `queue/ID.expire` beside the envelope. A file of its own, not a field in the envelope,
/// so that setting it never races a delivery's rewrite of the envelope: each is one
/// create or unlink, made durable by an fsync of `queue/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Hold,
    Expire,
}

impl Mark {
    fn ext(self) -> &'static str {
        match self {
            Mark::Hold => "hold",
            Mark::Expire => "expire",
        }
    }
}

impl Envelope {
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
    }
}

/// The messages an operator's command names: `ids` (each must be among `queued`), or
/// with `all` every queued message that `fits`, sorted. Exactly one of the two.
pub fn pick<'a>(
    queued: impl Iterator<Item = &'a Envelope>,
    ids: &[String],
    all: bool,
    fits: impl Fn(&Envelope) -> bool,
) -> Result<Vec<String>, String> {
    let queued: Vec<&Envelope> = queued.collect();
    match (all, ids.is_empty()) {
        (true, false) => Err("give queue IDs or --all, not both".into()),
        (false, true) => Err("no queue ID given (or --all for every message)".into()),
        (true, true) => {
            let mut v: Vec<String> = queued
                .iter()
                .filter(|e| fits(e))
                .map(|e| e.id.clone())
                .collect();
            v.sort();
            Ok(v)
        }
        (false, false) => {
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|i| !queued.iter().any(|e| &e.id == *i))
                .map(String::as_str)
                .collect();
            if unknown.is_empty() {
                Ok(ids.to_vec())
            } else {
                Err(format!("no message {} in the queue", unknown.join(", ")))
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct Spool {
    tmp: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
    free: PathBuf,
    /// Group commit of `queue/`'s fsyncs: every commit renames its files into `queue/`
    /// and then needs one fsync of the directory that starts *after* its renames.
    dir_sync: Arc<GroupCommit>,
    recycler: Arc<Recycler>,
    /// Tests: runs before each fsync of `queue/` (a disk error cannot be made on demand).
    dir_sync_fault: Arc<FaultSlot>,
}

/// Where [`Spool::set_dir_sync_fault`] keeps its hook.
#[derive(Default)]
struct FaultSlot(std::sync::OnceLock<DirSyncFault>);

impl std::fmt::Debug for FaultSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "set"
        } else {
            "none"
        })
    }
}

/// Runs before each fsync of a spool's `queue/`; an error stands for the fsync's (see
/// [`Spool::set_dir_sync_fault`]).
pub type DirSyncFault = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// [`Recycler`]'s files: by [`FileKind`], each with the ticket it waits for.
type FreeFiles = [VecDeque<(PathBuf, Option<u64>)>; 3];

/// Files of finished messages, kept in `free/` and renamed into place for the next
/// files the spool creates (bodies, envelopes, `.sending` markers): written over in place
/// ([`write_over`]), or truncated for a large body. On this machine's ext4 every new
/// inode costs a scan past the inodes freed in the last few seconds, so with three files
/// per message created and deleted at hundreds of messages a second, allocating inodes
/// came to dominate the relay's CPU time (see docs/PERFORMANCE.md). A rename costs no
/// inode.
///
/// `free/` survives a restart ([`Recycler::restock`]): a relay restarted for a reload or an
/// upgrade does not pay the new inodes of its first burst again. A crash can leave a
/// name in `free/` for a file still named in `queue/` (on ext4 without a journal a rename's
/// two directory blocks reach the disk in no particular order), so recovery keeps a free
/// file only if it has exactly one name and its inode is named nowhere in the spool:
/// reusing it can never overwrite a queued message. A retired file is never read again
/// by anyone: it is retired only when its delivery is over (an operator's `delete`
/// unlinks instead, since a delivery may still be reading the body).
///
/// A file that leaves `queue/` is reused only once an fsync of `queue/` that started
/// after its rename has completed (the group commit's tickets tell): so even on a file
/// system without a journal, where metadata reaches the disk in no particular order, a
/// crash can never leave a name in `queue/` pointing at an inode that now holds another
/// message. (The old name may come back, and the message be delivered twice, exactly as
/// with an unlink that was not fsynced.)
///
/// Files are kept by kind (bodies, envelopes, markers) and a new file takes one of its own
/// kind first: a recycled file of about the right size is written over in place
/// ([`write_over`]) without freeing or allocating blocks, where an envelope written over
/// a body would free a block at its cut and the body written over an envelope allocate
/// one (on ext4 with `discard`, a freed block costs a discard request).
#[derive(Debug, Default)]
struct Recycler {
    /// Free files by [`FileKind`], oldest first, each with the `dir_sync` ticket count
    /// seen after its rename out of `queue/`: reusable once `durable` passes it. `None`:
    /// reusable at once (kept from before a restart, whose recovery fsynced `queue/`).
    files: std::sync::Mutex<FreeFiles>,
    /// The next name in `free/` (a number, then the file's kind as its extension).
    seq: AtomicU64,
    /// Files in `queue/` at start-up: they come to `free/` as their messages leave, so
    /// [`Recycler::make_spares`] counts them as spares already.
    queued_at_start: AtomicUsize,
}

impl Recycler {
    fn lock(&self) -> std::sync::MutexGuard<'_, FreeFiles> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many files wait in `free/`.
    fn len(&self) -> usize {
        self.lock().iter().map(VecDeque::len).sum()
    }

    /// A reusable file for `path`: the oldest of its own kind, else the oldest of another
    /// kind, once `durable` has passed its ticket.
    fn take(&self, path: &Path, durable: u64) -> Option<PathBuf> {
        let kind = FileKind::of(path) as usize;
        let mut files = self.lock();
        let order = [kind, (kind + 1) % 3, (kind + 2) % 3];
        order.into_iter().find_map(|k| match files[k].front() {
            Some((_, seen)) if seen.is_none_or(|seen| durable > seen) => {
                files[k].pop_front().map(|(p, _)| p)
            }
            _ => None,
        })
    }

    /// At start-up, after recovery has emptied `tmp/` and fsynced `queue/`: take up the
    /// files a previous process left in `free/`, up to [`RECYCLE_MAX`], and unlink the
    /// rest. Kept only a regular file with one name, whose inode no name in `queue/` or
    /// `corrupt/` shares (see the type's notes) and whose name this process could have
    /// given it.
    fn restock(&self, spool: &Spool) -> io::Result<()> {
        use std::os::unix::fs::{DirEntryExt, MetadataExt};
        let mut named = std::collections::HashSet::new();
        for e in fs::read_dir(&spool.queue)? {
            named.insert(e?.ino());
        }
        self.queued_at_start.store(named.len(), Ordering::Relaxed);
        for e in fs::read_dir(&spool.corrupt)? {
            named.insert(e?.ino());
        }
        let mut kept: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(&spool.free)? {
            let path = e?.path();
            let meta = fs::symlink_metadata(&path)?;
            let seq = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok());
            match seq {
                Some(seq)
                    if meta.is_file() && meta.nlink() == 1 && !named.contains(&meta.ino()) =>
                {
                    kept.push((seq, path))
                }
                _ if meta.is_dir() => {
                    tracing::warn!(dir = %path.display(), "spool recovery: a directory in free/ is not sipmail's; left alone");
                }
                _ => fs::remove_file(&path)?,
            }
        }
        kept.sort();
        for (_, path) in kept.drain(RECYCLE_MAX.min(kept.len())..) {
            fs::remove_file(path)?;
        }
        let next = kept.last().map_or(0, |(seq, _)| seq + 1);
        self.seq.store(next, Ordering::Relaxed);
        let mut files = self.lock();
        for (_, path) in kept {
            files[FileKind::of(&path) as usize].push_back((path, None));
        }
        Ok(())
    }

    /// Fill `free/` up to `up_to` files (at most [`RECYCLE_MAX`]) with new empty files
    /// (see [`Spool::make_spares`]), counting the files of the messages queued at
    /// start-up as spares already; returns how many it made. Stops at the first error:
    /// spare files only save time.
    fn make_spares(&self, free: &Path, up_to: usize) -> io::Result<usize> {
        let held = self.len() + self.queued_at_start.load(Ordering::Relaxed);
        let want = up_to.min(RECYCLE_MAX).saturating_sub(held);
        for made in 0..want {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let path = free.join(format!("{seq}.{}", FileKind::Other.ext()));
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("after {made} spare files: {e}")))?;
            // Never in queue/: reusable at once.
            self.lock()[FileKind::Other as usize].push_back((path, None));
        }
        Ok(want)
    }
}

/// What a spool file holds, by its name: for [`Recycler`]'s like-for-like reuse.
#[derive(Clone, Copy)]
enum FileKind {
    Body = 0,
    Envelope = 1,
    Other = 2,
}

impl FileKind {
    fn of(path: &Path) -> FileKind {
        match path.extension().and_then(|e| e.to_str()) {
            Some("msg") => FileKind::Body,
            Some("env") => FileKind::Envelope,
            _ => FileKind::Other,
        }
    }

    /// The extension of a file of this kind in `free/`, which [`FileKind::of`] reads back.
    fn ext(self) -> &'static str {
        match self {
            FileKind::Body => "msg",
            FileKind::Envelope => "env",
            FileKind::Other => "other",
        }
    }
}

/// At most this many files wait in `free/`; beyond that, finished files are unlinked.
const RECYCLE_MAX: usize = 1024;

/// The most spare files [`Spool::make_spares`] makes (`queue.spare_files`): what `free/`
/// keeps.
pub const SPARE_FILES_MAX: usize = RECYCLE_MAX;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Wait until no hand-off agent of an earlier process holds `marker`'s lock: such an agent
/// is still handing that message over, and writes the outcome into the marker when it is
/// done (see `relay::agent`).
fn wait_for_agent(marker: &Path) {
    let Ok(f) = fs::File::open(marker) else {
        return;
    };
    if let Err(fs::TryLockError::WouldBlock) = f.try_lock() {
        tracing::info!(file = %marker.display(),
            "spool recovery: the hand-off agent of the stopped process is still handing this message over; waiting for its outcome");
        if let Err(e) = f.lock() {
            tracing::warn!(file = %marker.display(), error = %e, "spool recovery: cannot wait for the marker's lock");
        }
    }
}

/// The two halves of a commit ([`Spool::commit_parts`]): how many are still running, and
/// whether one failed.
#[derive(Debug)]
struct Halves {
    left: u8,
    failed: bool,
}

/// A commit under way ([`Spool::begin_commit`]): the message's files are named in
/// `queue/` and their flushes are running.
#[derive(Debug)]
#[must_use = "a commit is complete only once `durable` has returned Ok"]
pub struct Committing {
    spool: Spool,
    id: String,
    flushes: Vec<tokio::task::JoinHandle<io::Result<()>>>,
}

impl Committing {
    /// Waits for the flushes. Ok: the message survives a power loss. An error takes the
    /// files back out of `queue/` first (the client hears 451 and sends the message
    /// again, so a restart must not deliver this copy as well).
    pub async fn durable(self) -> io::Result<()> {
        let mut result = Ok(());
        for flush in self.flushes {
            let r = flush.await.map_err(io::Error::other).and_then(|r| r);
            result = result.and(r);
        }
        if let Err(e) = result {
            let s = self.spool;
            let id = self.id;
            let _ = tokio::task::spawn_blocking(move || s.leave_queue(&id)).await;
            return Err(e);
        }
        Ok(())
    }
}

impl Spool {
    /// Open (creating if needed) and recover: clear `tmp/`, drop bodies whose envelope
    /// never committed, and return every committed envelope.
    pub fn open(root: &Path) -> io::Result<(Spool, Vec<Envelope>)> {
        Self::recover(root).map(|r| (r.spool, r.envelopes))
    }

    /// [`open`](Self::open), also returning the hand-offs to replay. Their markers stay
    /// until the replayed outcome is committed (a crash during the replay replays again).
    pub fn recover(root: &Path) -> io::Result<Recovered> {
        let s = Spool::at(root);
        for d in [&s.tmp, &s.queue, &s.corrupt, &s.free] {
            fs::create_dir_all(d)?;
        }
        for e in fs::read_dir(&s.tmp)? {
            let e = e?;
            tracing::info!(file = %e.path().display(), "spool recovery: removing unfinished file");
            fs::remove_file(e.path())?;
        }
        let mut envs = Vec::new();
        let mut bodies = Vec::new();
        let mut markers = Vec::new();
        let mut marks = Vec::new();
        for e in fs::read_dir(&s.queue)? {
            let p = e?.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("env") => match fs::read(&p).map(|b| serde_json::from_slice::<Envelope>(&b)) {
                    Ok(Ok(env)) if p.file_stem() != Some(env.id.as_ref()) => {
                        // A recycled file whose new content never reached the disk.
                        tracing::error!(file = %p.display(), queue_id = %env.id, "spool recovery: envelope names another message (a commit cut short by a power loss, whose sender was not answered 250), moved to corrupt/ with its body");
                        s.to_corrupt(&p);
                        s.to_corrupt(&p.with_extension("msg"));
                    }
                    Ok(Ok(mut env))
                        if env.body_inline.is_some() || s.body_path(&env.id).exists() =>
                    {
                        let checked = if env.body_inline.is_some() {
                            s.restore_inline(&mut env)
                        } else {
                            s.check_body(&mut env)
                        };
                        match checked {
                            Ok(true) => envs.push(env),
                            Ok(false) => {
                                tracing::error!(queue_id = %env.id, "spool recovery: body (its file, or the copy kept in the envelope) does not match its envelope's checksum (a commit cut short by a power loss, whose sender was not answered 250, or a damaged disk); both moved to corrupt/");
                                s.to_corrupt(&p);
                                s.to_corrupt(&s.body_path(&env.id));
                            }
                            Err(err) => return Err(err),
                        }
                    }
                    Ok(Ok(env)) => {
                        tracing::error!(queue_id = %env.id, "spool recovery: envelope without body, moved to corrupt/");
                        s.to_corrupt(&p);
                    }
                    Ok(Err(err)) => {
                        tracing::error!(file = %p.display(), %err, "spool recovery: unreadable envelope, moved to corrupt/");
                        s.to_corrupt(&p);
                    }
                    Err(err) => return Err(err),
                },
                Some("msg") => bodies.push(p),
                Some("sending") => markers.push(p),
                Some("hold" | "expire") => marks.push(p),
                _ => {}
            }
        }
        for m in marks {
            let id = m.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if !envs.iter().any(|e| e.id == id) {
                // The message left the queue after its mark was set.
                fs::remove_file(&m)?;
            }
        }
        for env in &mut envs {
            s.read_marks(env);
        }
        let mut handed = Vec::new();
        let mut interrupted = Vec::new();
        for m in markers {
            wait_for_agent(&m);
            // A marker with something to replay stays until that outcome is committed.
            let kept = match MarkerNote::read(&m) {
                MarkerNote::Handed(h) => Self::still_pending(h, &envs)
                    .map(|h| handed.push(h))
                    .is_some(),
                MarkerNote::Relay(relay) => match Self::interrupted(&m, relay, &envs) {
                    Some(i) => {
                        tracing::warn!(queue_id = %i.id, route = %i.route, relay = %i.relay,
                            "sipmail stopped while this message was being sent to a partner relay; it goes to that relay again, which recognises it if it had taken it");
                        interrupted.push(i);
                        true
                    }
                    None => false,
                },
                MarkerNote::Unreadable(err) => {
                    tracing::error!(file = %m.display(), %err, "spool recovery: unreadable hand-off record, ignored");
                    false
                }
                MarkerNote::Empty => false,
            };
            if !kept {
                s.explain_interrupted_send(&m, &envs);
                fs::remove_file(&m)?;
            }
        }
        for b in bodies {
            // (A body moved to corrupt/ with its envelope above is gone.)
            if !b.with_extension("env").exists() && b.exists() {
                tracing::info!(file = %b.display(), "spool recovery: removing body that was never committed");
                fs::remove_file(&b)?;
            }
        }
        fsync_dir(&s.queue)?;
        s.recycler.restock(&s)?;
        envs.sort_by(|a, b| a.id.cmp(&b.id));
        handed.sort_by(|a: &Handed, b| a.id.cmp(&b.id));
        Ok(Recovered {
            spool: s,
            envelopes: envs,
            handed,
            interrupted,
        })
    }

    /// Fill `free/` with empty files, up to `up_to` (`queue.spare_files`; at most the
    /// number it keeps), before the first message:
    /// a burst of more messages in flight than `free/` holds would otherwise create a new
    /// inode per file on the message's path. On ext4 without a journal each new inode is
    /// checked against every inode of its group freed in the last minutes
    /// (`recently_deleted`), holding the directory's lock meanwhile: 0.35 ms a file
    /// measured on this project's test machine, 200 sessions then ran at 77% of 20
    /// (docs/PERFORMANCE.md, run 21). `free/` survives a restart and the files of queued
    /// messages count (they come to `free/` when their messages leave), so this costs
    /// once in a spool's life, not at every start. Returns how many files it made; an
    /// error only ends the filling.
    pub fn make_spares(&self, up_to: usize) -> io::Result<usize> {
        self.recycler.make_spares(&self.free, up_to)
    }

    /// Keep a file of `queue/` that recovery cannot use in `corrupt/`, for a human.
    fn to_corrupt(&self, path: &Path) {
        let _ = fs::rename(
            path,
            self.corrupt.join(path.file_name().unwrap_or_default()),
        );
    }

    /// Whether the body matches the checksum a small message's commit put in its
    /// envelope (none: nothing to check). The checksum is cleared once it matched: it
    /// only speaks for the commit.
    fn check_body(&self, env: &mut Envelope) -> io::Result<bool> {
        let Some(want) = env.body_crc32 else {
            return Ok(true);
        };
        let got = self.body_crc32(&env.id)?;
        env.body_crc32 = None;
        Ok(got == want)
    }

    /// The CRC-32 of `id`'s body file, streamed: only small bodies carry a checksum, but
    /// a damaged spool could pair one with any file.
    fn body_crc32(&self, id: &str) -> io::Result<u32> {
        let mut file = fs::File::open(self.body_path(id))?;
        let (mut crc, mut buf) = (crc32fast::Hasher::new(), vec![0u8; 64 * 1024]);
        loop {
            match io::Read::read(&mut file, &mut buf)? {
                0 => break,
                n => crc.update(&buf[..n]),
            }
        }
        Ok(crc.finalize())
    }

    /// A small message committed with its body in the envelope (`body_inline`): whether
    /// that copy matches the commit's checksum; if so, and the body file is missing or does
    /// not match, the body file is written again from it (fdatasynced; recovery fsyncs
    /// `queue/` before it returns). The copy is dropped from the envelope in memory.
    fn restore_inline(&self, env: &mut Envelope) -> io::Result<bool> {
        use base64::Engine;
        let (Some(b64), Some(want)) = (env.body_inline.take(), env.body_crc32) else {
            return Ok(false);
        };
        let Ok(body) = base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) else {
            return Ok(false);
        };
        if crc32fast::hash(&body) != want {
            return Ok(false);
        }
        if self.body_crc32(&env.id).ok() != Some(want) {
            tracing::warn!(queue_id = %env.id, "spool recovery: body file restored from the copy in its envelope (it had not reached the disk)");
            let tmp = self.tmp_body_path(&env.id);
            self.fill_file(&tmp, &body)?.sync_data()?;
            fs::rename(&tmp, self.body_path(&env.id))?;
        }
        env.body_crc32 = None;
        Ok(true)
    }

    /// The call to `relay` that `marker` records, if its message still has recipients
    /// pending on that route.
    fn interrupted(marker: &Path, relay: String, envs: &[Envelope]) -> Option<Interrupted> {
        let (id, key) = marker
            .file_name()?
            .to_str()?
            .strip_suffix(".sending")?
            .split_once('.')?;
        let env = envs.iter().find(|e| e.id == id)?;
        let route = env
            .pending()
            .find(|r| route_key(&r.route) == key)?
            .route
            .clone();
        Some(Interrupted {
            id: id.to_string(),
            route,
            relay,
        })
    }

    /// What the marker of `id` on `route` records, if the next hop took anything (the
    /// hand-off agent wrote it and then stopped before it answered).
    pub fn noted(&self, id: &str, route: &Route) -> Option<Handed> {
        match MarkerNote::read(&self.sending_path(id, route)) {
            MarkerNote::Handed(h) => Some(h),
            _ => None,
        }
    }

    /// The hand-off a marker records, if it names a queued message that still has one of
    /// those recipients pending on that route (else there is nothing to replay). An
    /// unreadable marker is treated as empty: the message is sent again, as before.
    fn still_pending(h: Handed, envs: &[Envelope]) -> Option<Handed> {
        let env = envs.iter().find(|e| e.id == h.id)?;
        env.pending()
            .any(|r| r.route == h.route && h.delivered.contains(&r.addr))
            .then_some(h)
    }

    /// Record, the moment the next hop said yes, that it took `handed.delivered`. Not
    /// fsynced: like the marker itself it only has to survive this process (kill -9, a
    /// panic), which the page cache does; after a power cut the message is sent again, as
    /// any MTA's would be. What remains is the time between the next hop's commit and
    /// this write: the SMTP window of RFC 1047, which no SMTP client can close.
    ///
    /// Written on the calling thread, not through the blocking pool: a few hundred bytes
    /// into the page cache take microseconds, while a turn in a pool busy with fsyncs
    /// could take milliseconds, all of them inside the window this note is there to close.
    pub fn handed(&self, handed: &Handed) -> io::Result<()> {
        let bytes = serde_json::to_vec(handed).map_err(io::Error::other)?;
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.sending_path(&handed.id, &handed.route))?;
        // Never synced: a marker only has to outlive this process.
        write_over(&f, &bytes)
    }

    /// A `.sending` marker left by a process that stopped mid-delivery: if that route
    /// still has pending recipients, the next attempt may repeat a delivery the other
    /// side had already accepted. Say so, once, in the log (issue: every duplicate is
    /// explained).
    fn explain_interrupted_send(&self, marker: &Path, envs: &[Envelope]) {
        let name = marker
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let Some((id, key)) = name
            .strip_suffix(".sending")
            .and_then(|n| n.split_once('.'))
        else {
            return;
        };
        let Some(env) = envs.iter().find(|e| e.id == id) else {
            return;
        };
        for r in env.pending().filter(|r| route_key(&r.route) == key) {
            tracing::warn!(queue_id = %id, rcpt = %r.addr, route = %r.route,
                "sipmail stopped while this message was being handed over; it is sent again, and may arrive twice if the other side had already accepted it");
        }
    }

    pub(crate) fn sending_path(&self, id: &str, route: &Route) -> PathBuf {
        self.queue
            .join(format!("{id}.{}.sending", route_key(route)))
    }

    /// Note that a delivery of `id` over `route` starts, to the partner relay `relay` for
    /// a call. Not fsynced: it only has to survive a crash of this process (the page
    /// cache does). Written on the calling thread, as [`Spool::handed`] is: a rename and
    /// a small write into the page cache, where a turn through the blocking pool (there
    /// and back) was on every message's path to the next hop (docs/PERFORMANCE.md, run 14).
    pub fn begin_send(&self, id: &str, route: &Route, relay: Option<&str>) {
        let marker = self.sending_path(id, route);
        let note = match relay {
            Some(relay) => serde_json::to_vec(&SendingTo {
                relay: relay.to_string(),
            })
            .map_err(io::Error::other),
            // No relay: a blank note (read as empty). One byte, not none: cut to zero, a
            // recycled marker would give up its block (see `write_over`).
            None => Ok(b"\n".to_vec()),
        };
        let written = note.and_then(|note| self.fill_file(&marker, &note).map(drop));
        if let Err(e) = written {
            // As before: the delivery goes ahead; a crash during it is then not explained
            // by a marker (the hand-off agent refuses to begin without one, see its claim).
            tracing::warn!(queue_id = %id, marker = %marker.display(), error = %e,
                "cannot write the delivery's .sending marker");
        }
    }

    /// The outcome of that delivery is recorded: the marker is retired, on the calling
    /// thread (one rename, as [`begin_send`](Self::begin_send) writes it).
    pub fn end_send(&self, id: &str, route: &Route) {
        let _ = self.retire(&self.sending_path(id, route));
    }

    /// Create (or truncate) `path` for writing: a recycled file from `free/` renamed into
    /// place when there is one, else a new file.
    fn create_file(&self, path: &Path) -> io::Result<fs::File> {
        self.take_file(path, true)
    }

    /// [`create_file`](Self::create_file); with `truncate` false a recycled file keeps its
    /// old bytes, for a writer that cuts it to length itself ([`write_over`]).
    fn take_file(&self, path: &Path, truncate: bool) -> io::Result<fs::File> {
        let reuse = self.recycler.take(path, self.dir_sync.durable());
        if let Some(from) = reuse
            && fs::rename(&from, path).is_ok()
        {
            return fs::OpenOptions::new()
                .write(true)
                .truncate(truncate)
                .open(path);
        }
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(path)
    }

    /// A file at `path` (from `free/` if one is ready, else new) holding exactly `bytes`,
    /// written over in place ([`write_over`]); not synced. For files written whole: a
    /// small body and every envelope (renamed into `queue/` after), and a marker.
    fn fill_file(&self, path: &Path, bytes: &[u8]) -> io::Result<fs::File> {
        let f = self.take_file(path, false)?;
        write_over(&f, bytes)?;
        Ok(f)
    }

    /// A body's name in `tmp/`, while it is written.
    fn tmp_body_path(&self, id: &str) -> PathBuf {
        self.tmp.join(format!("{id}.msg"))
    }

    /// An envelope's name in `tmp/`, while it is written.
    fn tmp_env_path(&self, id: &str) -> PathBuf {
        self.tmp.join(format!("{id}.env"))
    }

    /// Take a finished file out of `queue/`: moved to `free/` for reuse, or unlinked.
    /// Either way its name is gone, as with `remove_file` (and as lazily durable).
    fn retire(&self, path: &Path) -> io::Result<()> {
        let room = self.recycler.len() < RECYCLE_MAX;
        if room {
            // Named by kind, so that a restart puts it back with its own kind.
            let kind = FileKind::of(path);
            let seq = self.recycler.seq.fetch_add(1, Ordering::Relaxed);
            let to = self.free.join(format!("{seq}.{}", kind.ext()));
            match fs::rename(path, &to) {
                Ok(()) => {
                    // Any fsync of queue/ that takes a later ticket starts after this.
                    let seen = self.dir_sync.requested();
                    self.recycler.lock()[kind as usize].push_back((to, Some(seen)));
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(_) => {} // no free/ (a spool opened without recovery): unlink
            }
        }
        fs::remove_file(path)
    }

    /// The spool at `root`, without recovery: for reading while no daemon runs.
    pub fn at(root: &Path) -> Spool {
        Spool {
            tmp: root.join("tmp"),
            queue: root.join("queue"),
            corrupt: root.join("corrupt"),
            free: root.join("free"),
            dir_sync: Arc::default(),
            recycler: Arc::default(),
            dir_sync_fault: Arc::default(),
        }
    }

    /// For tests: `fault` runs before every later fsync of `queue/` by this spool and its
    /// clones, and an error it returns is taken for the fsync's (a disk that fails a flush
    /// cannot be had on demand). Set once; a second call changes nothing.
    pub fn set_dir_sync_fault(&self, fault: DirSyncFault) {
        let _ = self.dir_sync_fault.0.set(fault);
    }

    /// Read every committed envelope without changing anything.
    pub fn scan(root: &Path) -> io::Result<Vec<Envelope>> {
        let s = Spool::at(root);
        let mut envs = Vec::new();
        let rd = match fs::read_dir(&s.queue) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(envs),
            Err(e) => return Err(e),
        };
        for e in rd {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("env")
                && let Ok(mut env) = serde_json::from_slice::<Envelope>(&fs::read(&p)?)
            {
                env.body_crc32 = None;
                env.body_inline = None;
                s.read_marks(&mut env);
                envs.push(env);
            }
        }
        envs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(envs)
    }

    /// A new queue ID: time-ordered, unique within this process and across restarts.
    pub fn new_id() -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut r = [0u8; 3];
        let _ = getrandom::fill(&mut r);
        format!(
            "{:011X}{:04X}{}",
            now.as_millis(),
            SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff,
            hex::encode_upper(r)
        )
    }

    fn mark_path(&self, id: &str, mark: Mark) -> PathBuf {
        self.queue.join(format!("{id}.{}", mark.ext()))
    }

    /// Set `held` and `expired` from the mark files: they, not the envelope file, say.
    fn read_marks(&self, env: &mut Envelope) {
        env.held = self.mark_path(&env.id, Mark::Hold).exists();
        env.expired = self.mark_path(&env.id, Mark::Expire).exists();
    }

    /// Set (`on`) or clear a mark on message `id`, durably: the create or unlink, then an
    /// fsync of `queue/` (shared with concurrent commits).
    pub async fn set_mark(&self, id: &str, mark: Mark, on: bool) -> io::Result<()> {
        let path = self.mark_path(id, mark);
        tokio::task::spawn_blocking(move || {
            if on {
                fs::File::create(&path).map(drop)
            } else {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            }
        })
        .await
        .map_err(io::Error::other)??;
        self.sync_queue_dir().await
    }

    /// Remove both marks of a message that left the queue (after the message: a crash in
    /// between leaves a mark without a message, which the next start removes).
    pub async fn clear_marks(&self, id: &str) {
        let paths = [
            self.mark_path(id, Mark::Hold),
            self.mark_path(id, Mark::Expire),
        ];
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                let _ = fs::remove_file(p);
            }
        })
        .await;
    }

    pub fn body_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.msg"))
    }
    /// Whether `id` is committed and still in `queue/` (for a reader without the daemon's
    /// queue in memory, such as `sipmail send`).
    pub fn is_queued(&self, id: &str) -> bool {
        self.env_path(id).exists()
    }

    fn env_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.env"))
    }

    /// The header block of a queued message: up to and including the CRLF before the
    /// empty line, read from at most the first `cap` bytes. Without an end of headers
    /// within the cap, it ends at the last complete line.
    pub async fn read_headers(&self, id: &str, cap: u64) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        if let Ok(f) = tokio::fs::File::open(self.body_path(id)).await {
            let _ = f.take(cap).read_to_end(&mut buf).await;
        }
        let end = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => end + 2,
            None => buf
                .windows(2)
                .rposition(|w| w == b"\r\n")
                .map_or(0, |p| p + 2),
        };
        buf.truncate(end);
        buf
    }

    /// Create the file a new message body is streamed into.
    pub async fn create_body(&self, id: &str) -> io::Result<tokio::fs::File> {
        let s = self.clone();
        let path = self.tmp_body_path(id);
        let f = tokio::task::spawn_blocking(move || s.create_file(&path))
            .await
            .map_err(io::Error::other)??;
        Ok(tokio::fs::File::from_std(f))
    }

    /// A writer for a new body file in `tmp/` (large buffers, off the async workers).
    /// The file is created only when the body outgrows the writer's buffer, or else by
    /// the commit: [`bodyio::BodyWriter::finish`] gives the file (perhaps still to be
    /// created) and its unwritten tail for [`commit_parts`](Self::commit_parts).
    pub fn body_writer(&self, id: &str) -> bodyio::BodyWriter {
        let (s, path) = (self.clone(), self.tmp_body_path(id));
        bodyio::BodyWriter::new(bodyio::BodyFile::Later(Box::new(move || {
            s.create_file(&path)
        })))
    }

    /// Make the message durable. Returns only after the body, the envelope and the
    /// directory entries are fsynced (the directory fsync shared with concurrent commits).
    pub async fn commit(&self, mut body: tokio::fs::File, env: &Envelope) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        body.flush().await?;
        let body = body.into_std().await;
        self.commit_parts(bodyio::BodyFile::Open(body), Vec::new(), env)
            .await
    }

    /// [`Spool::commit`] of a body file in `tmp/` (perhaps not created yet) still to be
    /// completed by `tail`: [`begin_commit`](Self::begin_commit), then
    /// [`Committing::durable`].
    pub async fn commit_parts(
        &self,
        body: bodyio::BodyFile,
        tail: Vec<u8>,
        env: &Envelope,
    ) -> io::Result<()> {
        self.begin_commit(body, tail, env).await?.durable().await
    }

    /// The first half of a commit: returns once the message's files are written and
    /// named in `queue/`, and their flushes are under way. Whoever may act on the message
    /// before [`Committing::durable`] returns must accept that the commit can still fail
    /// (then the files leave `queue/` again) and that a killed process finds the message
    /// queued at restart (the names are its commit point; the flushes make it survive a
    /// power loss). A body never created is all in `tail`: see
    /// [`stage_small`](Self::stage_small). Otherwise the commit is made whole here, and
    /// the result is already durable: two blocking tasks run side by side, the body's tail
    /// and fsync, and the envelope's write and fsync; the one that ends second, if neither
    /// failed, renames both into `queue/` (the envelope last: the commit point) and fsyncs
    /// `queue/` (group commit). A large body is named in `queue/` only once it is on disk,
    /// so that a restart never meets a committed envelope with a half-written body.
    pub async fn begin_commit(
        &self,
        body: bodyio::BodyFile,
        tail: Vec<u8>,
        env: &Envelope,
    ) -> io::Result<Committing> {
        if matches!(body, bodyio::BodyFile::Later(_)) {
            // The body never left the writer's buffer: `tail` is all of it. Its file is
            // taken by `stage_small` (written over in place, not created empty).
            return self.stage_small(tail, env).await;
        }
        let halves = Arc::new(std::sync::Mutex::new(Halves {
            left: 2,
            failed: false,
        }));
        let (s, h, id) = (self.clone(), halves.clone(), env.id.clone());
        let body_half = tokio::task::spawn_blocking(move || {
            let r = body
                .open()
                .and_then(|mut f| f.write_all(&tail).and_then(|()| f.sync_all()));
            s.commit_half(&h, r, &id)
        });
        let (s, h, e) = (self.clone(), halves, env.clone());
        let env_half = tokio::task::spawn_blocking(move || {
            let r = s.write_env_tmp(&e);
            s.commit_half(&h, r, &e.id)
        });
        let (b, e) = tokio::join!(body_half, env_half);
        b.map_err(io::Error::other)??;
        e.map_err(io::Error::other)??;
        Ok(Committing {
            spool: self.clone(),
            id: env.id.clone(),
            flushes: Vec::new(),
        })
    }

    /// The first half of the commit of a body that is all in `tail` (see the module's
    /// notes): one blocking task writes the body and the envelope (each over a recycled
    /// file in place, [`fill_file`](Self::fill_file)) and renames both into `queue/`; the
    /// caller hears of it then, while that task goes on to fdatasync the envelope, which
    /// holds a copy of a body of at most [`INLINE_BODY_MAX`] (`body_inline`), and then to
    /// fsync `queue/`; a larger body's file gets an fdatasync of its own beside them. Both
    /// flushes stay on the staging thread: each task of their own would cost a pass
    /// through the blocking pool per message.
    async fn stage_small(&self, tail: Vec<u8>, env: &Envelope) -> io::Result<Committing> {
        use base64::Engine;
        let mut env = env.clone();
        env.body_crc32 = Some(crc32fast::hash(&tail));
        let inline = tail.len() <= INLINE_BODY_MAX;
        if inline {
            env.body_inline = Some(
                base64::engine::general_purpose::STANDARD
                    .encode(&tail)
                    .into(),
            );
        }
        let (s, id) = (self.clone(), env.id.clone());
        let (staged_tx, staged_rx) = tokio::sync::oneshot::channel();
        let dir_flush = tokio::task::spawn_blocking(move || {
            let staged = (|| {
                let b = s.fill_file(&s.tmp_body_path(&env.id), &tail)?;
                let e = s.write_env_file(&env)?;
                s.enter_queue(&env.id)?;
                Ok::<_, io::Error>((b, e))
            })();
            let (b, e) = match staged {
                Ok(files) => files,
                Err(e) => {
                    let _ = staged_tx.send(Err(e));
                    return Ok(());
                }
            };
            let mut flushes = Vec::new();
            if !inline {
                let rt = tokio::runtime::Handle::current();
                flushes.push(rt.spawn_blocking(move || b.sync_data()));
            }
            if staged_tx.send(Ok(flushes)).is_err() {
                // The caller is gone (its task was cancelled): nobody will see the
                // outcome, and the message stays as a kill would leave it.
                tracing::debug!(queue_id = %env.id, "commit abandoned by its caller");
            }
            // The envelope's flush, then the fsync of `queue/`, here in turn: a task of
            // their own for the envelope ran them side by side, at the price of one more
            // pass through the blocking pool (a lock, a wake-up and a thread switch each
            // way) for every message (docs/PERFORMANCE.md, run 33).
            e.sync_data()?;
            s.sync_queue_dir_blocking()
        });
        let mut flushes = match staged_rx.await {
            Ok(Ok(flushes)) => flushes,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                // The staging task ended without a word: it panicked.
                return Err(dir_flush
                    .await
                    .err()
                    .map(io::Error::other)
                    .unwrap_or_else(|| io::Error::other("the commit's task ended early")));
            }
        };
        flushes.push(dir_flush);
        Ok(Committing {
            spool: self.clone(),
            id,
            flushes,
        })
    }

    /// Rename a written body and envelope from `tmp/` into `queue/`: the envelope last,
    /// since its rename is the commit point (for a process that is killed; a power loss
    /// also needs the fsyncs). If the envelope cannot go, the body goes back.
    fn enter_queue(&self, id: &str) -> io::Result<()> {
        let tmp_body = self.tmp_body_path(id);
        fs::rename(&tmp_body, self.body_path(id))?;
        if let Err(e) = fs::rename(self.tmp_env_path(id), self.env_path(id)) {
            let _ = fs::rename(self.body_path(id), &tmp_body);
            return Err(e);
        }
        Ok(())
    }

    /// Take a commit that failed back out of `queue/`: the client hears 451 and sends
    /// the message again, so a restart must not deliver this copy as well. Best effort
    /// (after a failed fsync the disk's state is unknown); the envelope first, since
    /// without it the body is no message.
    fn leave_queue(&self, id: &str) {
        let _ = fs::rename(self.env_path(id), self.tmp_env_path(id));
        let _ = fs::rename(self.body_path(id), self.tmp_body_path(id));
    }

    /// fsync `queue/` after this thread's changes to it (group commit: one that started
    /// after them may have covered them already). Blocking.
    fn sync_queue_dir_blocking(&self) -> io::Result<()> {
        self.dir_sync.sync_with(|| {
            if let Some(fault) = self.dir_sync_fault.0.get() {
                fault()?;
            }
            fsync_dir(&self.queue)
        })
    }

    async fn sync_queue_dir(&self) -> io::Result<()> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.sync_queue_dir_blocking())
            .await
            .map_err(io::Error::other)?
    }

    /// One half of a commit is written and fsynced (or failed): the second to get here
    /// finishes the commit.
    fn commit_half(
        &self,
        halves: &std::sync::Mutex<Halves>,
        r: io::Result<()>,
        id: &str,
    ) -> io::Result<()> {
        let finish = {
            let mut h = halves.lock().unwrap_or_else(|p| p.into_inner());
            h.left -= 1;
            h.failed |= r.is_err();
            h.left == 0 && !h.failed
        };
        r?;
        if finish {
            self.enter_queue(id)?;
            if let Err(e) = self.sync_queue_dir_blocking() {
                self.leave_queue(id);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Throw away a message that will not be committed (its body, and its envelope where
    /// a failed commit took it back out of queue/).
    pub async fn discard(&self, id: &str) {
        let paths = [self.tmp_body_path(id), self.tmp_env_path(id)];
        // Unlinked, not recycled: only names leaving queue/ are covered by its fsyncs.
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                let _ = fs::remove_file(p);
            }
        })
        .await;
    }

    /// Write an envelope to `tmp/ID.env`, not yet synced. The JSON is padded with spaces
    /// to a size the recycled file already has where it can be ([`env_file_len`]): a file
    /// whose size does not change is flushed by an fdatasync without its inode.
    fn write_env_file(&self, env: &Envelope) -> io::Result<fs::File> {
        let mut data = serde_json::to_vec_pretty(env).map_err(io::Error::other)?;
        let f = self.take_file(&self.tmp_env_path(&env.id), false)?;
        let len = env_file_len(f.metadata()?.len(), data.len());
        data.resize(len, b' ');
        write_over(&f, &data)?;
        Ok(f)
    }

    fn write_env_tmp(&self, env: &Envelope) -> io::Result<()> {
        self.write_env_file(env)?.sync_all()
    }

    /// Replace an envelope atomically (new recipient states).
    pub async fn update(&self, env: &Envelope) -> io::Result<()> {
        let s = self.clone();
        let env = env.clone();
        tokio::task::spawn_blocking(move || {
            // The envelope being replaced may hold the body's only durable copy
            // (`body_inline`); envelopes in memory never carry it, so the body file is
            // made durable first. A clean file's fdatasync only flushes the disk's cache.
            fs::File::open(s.body_path(&env.id))?.sync_data()?;
            s.write_env_tmp(&env)?;
            fs::rename(s.tmp_env_path(&env.id), s.env_path(&env.id))
        })
        .await
        .map_err(io::Error::other)??;
        self.sync_queue_dir().await
    }

    /// [`remove`](Self::remove) after a delivery over `route`, and the `.sending` marker
    /// of [`begin_send`](Self::begin_send) with it. The files are retired for reuse rather
    /// than unlinked (same order, same lazy durability). Three renames with nothing to
    /// fsync, made on the calling thread as `begin_send` makes its marker, rather than a
    /// turn through the blocking pool there and back (no difference in throughput either
    /// way on the bench's VM: docs/PERFORMANCE.md, run 25).
    pub fn remove_sent(&self, id: &str, route: &Route) -> io::Result<()> {
        self.retire(&self.env_path(id))?;
        self.retire(&self.body_path(id))?;
        // Only a log line depends on the marker, and only while the envelope exists.
        let _ = self.retire(&self.sending_path(id, route));
        Ok(())
    }

    /// Remove a finished message: the envelope first, so a crash leaves only an orphan body
    /// (removed at start-up), never an envelope without its body. Unlinked, not recycled:
    /// an operator's `delete` may race a delivery still reading the body.
    ///
    /// No directory fsync here, as in Postfix: if the machine loses power before the kernel
    /// writes the unlink, the message comes back and is delivered again (a duplicate, which
    /// SMTP allows); a process crash or `kill -9` loses nothing of the kind.
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        let s = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            fs::remove_file(s.env_path(&id))?;
            fs::remove_file(s.body_path(&id))?;
            for mark in [Mark::Hold, Mark::Expire] {
                let _ = fs::remove_file(s.mark_path(&id, mark));
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// From now on every fsync of `s`'s `queue/` fails (a disk error made on demand).
    fn fail_every_dir_sync(s: &Spool) {
        s.set_dir_sync_fault(Arc::new(|| {
            Err(io::Error::other("injected: fsync of queue/ failed"))
        }));
    }

    /// One pending recipient at site-b.test, due now: the envelope the spool and
    /// scheduler tests share.
    pub(crate) fn env(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            received: 1,
            client: "127.0.0.1".into(),
            helo: "h".into(),
            mail_from: "a@site-a.test".into(),
            recipients: vec![Recipient {
                addr: "b@site-b.test".into(),
                route: Route::Peer("site-b.test".into()),
                state: RcptState::Pending,
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
                dsn: Default::default(),
                delay_warned: false,
                pin: None,
            }],
            size: 5,
            body_8bit: false,
            smtputf8: false,
            ret: None,
            envid: None,
            held: false,
            expired: false,
            receipt: None,
            decoded: None,
            body_crc32: None,
            body_inline: None,
        }
    }

    /// The fsync of queue/ fails after a commit's renames: the client is answered 451 and
    /// will send the message again, so this copy must not be in the queue after a
    /// restart either. (Seen failing before the commit took the files back out: the
    /// restart recovered the message, a duplicate of the resend.)
    #[tokio::test]
    async fn a_commit_whose_directory_fsync_fails_is_not_in_the_queue_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        fail_every_dir_sync(&s);
        let id = Spool::new_id();
        let mut w = s.body_writer(&id);
        w.write_all(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
        let err = s.commit_parts(file, tail, &env(&id)).await.unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        s.discard(&id).await;
        assert!(!s.is_queued(&id), "the envelope stayed in queue/");
        assert!(!s.body_path(&id).exists(), "the body stayed in queue/");
        drop(s);
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert!(
            envs.is_empty(),
            "a message answered 451 came back: {envs:?}"
        );
        // The spool still works once the disk does.
        let id2 = Spool::new_id();
        let mut w = s.body_writer(&id2);
        w.write_all(b"ok\r\n").await.unwrap();
        let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
        s.commit_parts(file, tail, &env(&id2)).await.unwrap();
        assert!(s.is_queued(&id2));
    }

    /// The first half of a small commit names the message in `queue/` with its bytes
    /// readable there (a lane may send it from then on), before `durable` returns; a
    /// flush that fails then takes it back out, and a restart does not find it.
    #[tokio::test]
    async fn a_begun_commit_is_readable_in_the_queue_and_leaves_it_when_its_flush_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let begin = |body: &'static [u8]| {
            let s = s.clone();
            async move {
                let id = Spool::new_id();
                let mut w = s.body_writer(&id);
                w.write_all(body).await.unwrap();
                let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
                let c = s.begin_commit(file, tail, &env(&id)).await.unwrap();
                (id, c)
            }
        };
        let (ok, c) = begin(b"Subject: ok\r\n\r\nkept\r\n").await;
        assert!(s.is_queued(&ok));
        assert_eq!(
            std::fs::read(s.body_path(&ok)).unwrap(),
            b"Subject: ok\r\n\r\nkept\r\n"
        );
        c.durable().await.unwrap();
        fail_every_dir_sync(&s);
        let (bad, c) = begin(b"Subject: bad\r\n\r\ngone\r\n").await;
        assert!(s.is_queued(&bad), "named in queue/ before the flushes end");
        let err = c.durable().await.unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!s.is_queued(&bad), "the envelope stayed in queue/");
        s.discard(&bad).await;
        drop(s);
        let (_, envs) = Spool::open(dir.path()).unwrap();
        let ids: Vec<&str> = envs.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, vec![ok.as_str()]);
    }

    /// The names in a folder, sorted.
    fn free_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Commit a small message (the side-by-side commit) with this body.
    async fn commit_small_body(s: &Spool, body: &[u8]) -> String {
        let id = Spool::new_id();
        let mut w = s.body_writer(&id);
        w.write_all(body).await.unwrap();
        let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
        assert!(matches!(file, bodyio::BodyFile::Later(_)), "a small body");
        s.commit_parts(file, tail, &env(&id)).await.unwrap();
        id
    }

    /// A small message's names and data reach the disk side by side, so a power loss
    /// before its 250 can leave its names durable over data that is not: a recycled
    /// body file still holding an older message of the same size, or an envelope file
    /// still holding another message's envelope. A body kept in its envelope
    /// (`body_inline`) that matches the commit's checksum is the message: its body file
    /// is written again from it. Otherwise recovery must not deliver it; both files go to
    /// corrupt/, and a whole commit recovers as it was. (Seen failing with the checks in
    /// `recover` taken out: the wrong body and the stale envelope came back; and with the
    /// restore taken out: the lost body file kept its old bytes.)
    #[tokio::test]
    async fn a_small_commit_cut_short_by_a_power_loss_is_not_delivered() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let big = [b"Subject: d\r\n\r\n".as_slice(), &[b'd'; INLINE_BODY_MAX]].concat();
        let whole = commit_small_body(&s, b"Subject: a\r\n\r\nwhole\r\n").await;
        let lost = commit_small_body(&s, b"Subject: b\r\n\r\nnew!!\r\n").await;
        let stale = commit_small_body(&s, b"Subject: c\r\n\r\nthird\r\n").await;
        let torn = commit_small_body(&s, &big).await;
        let damaged = commit_small_body(&s, b"Subject: e\r\n\r\nfifth\r\n").await;
        let queue = dir.path().join("queue");
        let inline = |id: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(queue.join(format!("{id}.env"))).unwrap())
                .unwrap()
        };
        assert!(
            inline(&lost)["body_inline"].is_string(),
            "kept in its envelope"
        );
        assert!(
            inline(&torn).get("body_inline").is_none(),
            "too big to keep there"
        );
        // What the disk may hold after the power loss: `lost`'s body file kept an older
        // message's bytes (same size), and so did `torn`'s, which its envelope does not
        // hold; `stale`'s envelope file kept `whole`'s envelope; `damaged`'s envelope
        // holds other bytes than the commit's checksum speaks for.
        std::fs::write(s.body_path(&lost), b"Subject: b\r\n\r\nold!!\r\n").unwrap();
        let mut old = big.clone();
        old[20] = b'x';
        std::fs::write(s.body_path(&torn), old).unwrap();
        std::fs::copy(s.env_path(&whole), s.env_path(&stale)).unwrap();
        let mut e = inline(&damaged);
        e["body_inline"] = base64::engine::general_purpose::STANDARD
            .encode(b"Subject: e\r\n\r\nfifth!\r\n")
            .into();
        std::fs::write(s.env_path(&damaged), serde_json::to_vec(&e).unwrap()).unwrap();
        drop(s);
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            envs,
            vec![env(&whole), env(&lost)],
            "the whole commits come back"
        );
        assert_eq!(
            std::fs::read(s.body_path(&whole)).unwrap(),
            b"Subject: a\r\n\r\nwhole\r\n"
        );
        assert_eq!(
            std::fs::read(s.body_path(&lost)).unwrap(),
            b"Subject: b\r\n\r\nnew!!\r\n",
            "restored from the envelope"
        );
        let corrupt = dir.path().join("corrupt");
        for id in [&torn, &stale, &damaged] {
            for name in [format!("{id}.env"), format!("{id}.msg")] {
                assert!(corrupt.join(&name).exists(), "{name} kept in corrupt/");
            }
        }
        // The checksum and the copy speak for the commit only: a rewrite leaves them out,
        // once the body file is durable.
        s.update(&env(&lost)).await.unwrap();
        let on_disk = inline(&lost);
        assert!(on_disk.get("body_crc32").is_none() && on_disk.get("body_inline").is_none());
    }

    #[tokio::test]
    async fn commit_recover_update_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert!(envs.is_empty());
        let id = Spool::new_id();
        let mut f = s.create_body(&id).await.unwrap();
        f.write_all(b"hello").await.unwrap();
        s.commit(f, &env(&id)).await.unwrap();
        // An uncommitted body and a stray tmp file are cleaned up at the next open.
        let id2 = Spool::new_id();
        let mut f2 = s.create_body(&id2).await.unwrap();
        f2.write_all(b"half").await.unwrap();
        drop(f2);
        std::fs::write(dir.path().join("queue").join("ORPHAN.msg"), b"x").unwrap();
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs, vec![env(&id)]);
        assert_eq!(std::fs::read(s.body_path(&id)).unwrap(), b"hello");
        assert!(!dir.path().join("queue/ORPHAN.msg").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let mut e = env(&id);
        e.recipients[0].attempts = 3;
        s.update(&e).await.unwrap();
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs[0].recipients[0].attempts, 3);
        s.remove(&id).await.unwrap();
        let (_s, envs) = Spool::open(dir.path()).unwrap();
        assert!(envs.is_empty());
    }

    /// A `.sending` marker that records a hand-off is returned for replay and kept (until
    /// the replayed outcome is committed); an empty one, or one whose recipients are no
    /// longer pending, is removed as before.
    #[tokio::test]
    async fn a_noted_hand_off_is_recovered_for_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let route = Route::Peer("site-b.test".into());
        let mut ids = Vec::new();
        for _ in 0..3 {
            let id = Spool::new_id();
            let mut f = s.create_body(&id).await.unwrap();
            f.write_all(b"hello").await.unwrap();
            s.commit(f, &env(&id)).await.unwrap();
            s.begin_send(&id, &route, None);
            ids.push(id);
        }
        let note = |id: &str, rcpt: &str| Handed {
            id: id.to_string(),
            route: route.clone(),
            delivered: vec![rcpt.to_string()],
            handoffs: vec![],
        };
        let rcpt = env(&ids[0]).recipients[0].addr.clone();
        s.handed(&note(&ids[0], &rcpt)).unwrap();
        s.handed(&note(&ids[1], "someone@else.example")).unwrap();
        // ids[2]: the marker stays empty (stopped before the next hop answered).
        let r = Spool::recover(dir.path()).unwrap();
        assert_eq!(r.envelopes.len(), 3);
        assert_eq!(r.handed, vec![note(&ids[0], &rcpt)]);
        assert!(r.spool.sending_path(&ids[0], &route).exists());
        assert!(!r.spool.sending_path(&ids[1], &route).exists());
        assert!(!r.spool.sending_path(&ids[2], &route).exists());
        // Committing the replayed outcome retires the marker.
        r.spool.remove_sent(&ids[0], &route).unwrap();
        assert!(Spool::recover(dir.path()).unwrap().handed.is_empty());
    }

    /// A marker's note is written over the file in place (no truncation to zero, which
    /// makes ext4 flush the file at close): a recycled file's longer old bytes are cut
    /// off, and a stop between the write and the cut (new note, then the old tail) still
    /// reads as the new note.
    #[tokio::test]
    async fn a_marker_note_written_over_longer_old_bytes_reads_as_the_new_note() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let route = Route::Peer("site-b.test".into());
        let note = |rcpt: &str| Handed {
            id: "Q1".into(),
            route: route.clone(),
            delivered: vec![rcpt.to_string()],
            handoffs: vec![],
        };
        let marker = s.sending_path("Q1", &route);
        // Old bytes, longer than the note: a recycled body's, say.
        let old = format!("Subject: old\r\n\r\n{}", "x".repeat(5000));
        fs::write(&marker, &old).unwrap();
        let new = note("b@site-b.test");
        s.handed(&new).unwrap();
        let bytes = fs::read(&marker).unwrap();
        assert_eq!(
            bytes,
            serde_json::to_vec(&new).unwrap(),
            "cut to the note's length"
        );
        assert!(matches!(MarkerNote::read(&marker), MarkerNote::Handed(h) if h == new));
        // The state a stop between the write and the cut leaves behind.
        let longer = note(&format!("{}@site-b.test", "c".repeat(300)));
        fs::write(&marker, serde_json::to_vec(&longer).unwrap()).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&marker).unwrap();
        f.write_all_at(&serde_json::to_vec(&new).unwrap(), 0)
            .unwrap();
        assert!(fs::metadata(&marker).unwrap().len() > bytes.len() as u64);
        assert!(matches!(MarkerNote::read(&marker), MarkerNote::Handed(h) if h == new));
        // A relay's marker the same way, and whitespace alone is an empty marker.
        s.begin_send("Q1", &route, Some("b1.site-b.test:5060"));
        assert!(
            matches!(MarkerNote::read(&marker), MarkerNote::Relay(r) if r == "b1.site-b.test:5060")
        );
        assert_eq!(
            fs::metadata(&marker).unwrap().len(),
            serde_json::to_vec(&SendingTo {
                relay: "b1.site-b.test:5060".into()
            })
            .unwrap()
            .len() as u64
        );
        fs::write(&marker, b"  \n").unwrap();
        assert!(matches!(MarkerNote::read(&marker), MarkerNote::Empty));
        // No relay: a blank note of one byte (a recycled marker keeps its block), empty.
        s.begin_send("Q1", &route, Some("b1.site-b.test:5060"));
        s.begin_send("Q1", &route, None);
        assert_eq!(fs::read(&marker).unwrap(), b"\n");
        assert!(matches!(MarkerNote::read(&marker), MarkerNote::Empty));
    }

    /// A call's marker names the partner relay: after a stop mid-transaction it comes back
    /// as [`Interrupted`] (that relay may hold the message) and stays until committed; a
    /// marker whose message has nothing pending on that route is removed.
    #[tokio::test]
    async fn a_call_interrupted_mid_transaction_names_its_relay_after_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let route = env("x").recipients[0].route.clone();
        let other = Route::Peer("elsewhere.example".into());
        let id = Spool::new_id();
        let mut f = s.create_body(&id).await.unwrap();
        f.write_all(b"hello").await.unwrap();
        s.commit(f, &env(&id)).await.unwrap();
        s.begin_send(&id, &route, Some("b1.site-b.test:5060 (SRV prio 10)"));
        s.begin_send(&id, &other, Some("b9.elsewhere.example:5060"));
        let r = Spool::recover(dir.path()).unwrap();
        assert_eq!(
            r.interrupted,
            vec![Interrupted {
                id: id.clone(),
                route: route.clone(),
                relay: "b1.site-b.test:5060 (SRV prio 10)".into(),
            }]
        );
        assert!(r.handed.is_empty());
        assert!(r.spool.sending_path(&id, &route).exists());
        assert!(!r.spool.sending_path(&id, &other).exists());
        // Committing the outcome retires the marker.
        r.spool.end_send(&id, &route);
        assert!(Spool::recover(dir.path()).unwrap().interrupted.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_directory_fsyncs_and_all_recover() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let id = Spool::new_id();
                let mut f = s.create_body(&id).await.unwrap();
                f.write_all(format!("message {i}").as_bytes())
                    .await
                    .unwrap();
                s.commit(f, &env(&id)).await.unwrap();
                id
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        let fsyncs = s.dir_sync.durable();
        assert_eq!(fsyncs, 50, "every commit is covered");
        let (_s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs.len(), 50);
        for id in ids {
            assert!(envs.iter().any(|e| e.id == id));
        }
    }

    #[tokio::test]
    async fn finished_files_are_recycled_truncated_and_free_is_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let route = Route::Peer("site-b.test".into());
        let id = Spool::new_id();
        let mut f = s.create_body(&id).await.unwrap();
        f.write_all(b"a long first body that is longer than the second")
            .await
            .unwrap();
        s.commit(f, &env(&id)).await.unwrap();
        s.begin_send(&id, &route, None);
        s.remove_sent(&id, &route).unwrap();
        assert_eq!(s.recycler.len(), 3);
        assert_eq!(
            std::fs::read_dir(dir.path().join("queue")).unwrap().count(),
            0
        );
        // Not reused before an fsync of queue/ has made their removal durable.
        let id2 = Spool::new_id();
        let mut f = s.create_body(&id2).await.unwrap();
        f.write_all(b"second").await.unwrap();
        s.commit(f, &env(&id2)).await.unwrap();
        assert_eq!(s.recycler.len(), 3);
        // That commit's fsync covered them: the next message reuses them, and nothing of
        // the old contents remains.
        let id3 = Spool::new_id();
        let mut f = s.create_body(&id3).await.unwrap();
        f.write_all(b"third").await.unwrap();
        s.commit(f, &env(&id3)).await.unwrap();
        assert_eq!(s.recycler.len(), 1);
        assert_eq!(std::fs::read(s.body_path(&id3)).unwrap(), b"third");
        // A restart keeps free/: the one file left is reusable at once (recovery fsynced
        // queue/), and the next retired file's name follows the kept ones'.
        drop(s);
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs, vec![env(&id2), env(&id3)]);
        let free = |d: &Path| free_names(&d.join("free"));
        assert_eq!(free(dir.path()), ["2.other"]);
        assert_eq!(s.recycler.len(), 1);
        let id4 = commit_small_body(&s, b"fourth").await;
        assert_eq!(s.recycler.len(), 0, "the kept file was reused");
        assert_eq!(std::fs::read(s.body_path(&id4)).unwrap(), b"fourth");
        s.begin_send(&id4, &route, None);
        s.remove_sent(&id4, &route).unwrap();
        assert_eq!(free(dir.path()), ["3.env", "4.msg", "5.other"]);
    }

    /// `make_spares` fills free/ up to what it keeps, once: a restart finds them there.
    /// Messages take them (a spare is empty; the file ends up holding exactly its bytes).
    #[tokio::test]
    async fn spare_files_are_made_once_and_taken_by_new_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        assert_eq!(s.make_spares(SPARE_FILES_MAX).unwrap(), RECYCLE_MAX);
        assert_eq!(s.make_spares(SPARE_FILES_MAX).unwrap(), 0);
        let count = || std::fs::read_dir(dir.path().join("free")).unwrap().count();
        assert_eq!(count(), RECYCLE_MAX);
        drop(s);
        let (s, _) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            s.make_spares(SPARE_FILES_MAX).unwrap(),
            0,
            "kept across the restart"
        );
        let id = commit_small_body(&s, b"Subject: x\r\n\r\nbody\r\n").await;
        assert_eq!(
            count(),
            RECYCLE_MAX - 2,
            "the body and the envelope were spares"
        );
        assert_eq!(
            std::fs::read(s.body_path(&id)).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        drop(s);
        // The queued message's two files count: a restart makes no new spare for them.
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs.iter().map(|e| &e.id).collect::<Vec<_>>(), [&id]);
        assert_eq!(s.make_spares(SPARE_FILES_MAX).unwrap(), 0);
        assert_eq!(count(), RECYCLE_MAX - 2);
    }

    /// A crash on ext4 without a journal can leave a retired (or reused) file named both
    /// in free/ and in queue/. Recovery must not keep such a free/ name: reusing it would
    /// overwrite a queued message. Here the second name is made as a hard link, and free/
    /// also holds a name this process would never give and a file of another kind.
    #[tokio::test]
    async fn recovery_drops_free_files_that_share_an_inode_with_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let id = commit_small_body(&s, b"Subject: kept\r\n\r\nqueued\r\n").await;
        let free = dir.path().join("free");
        std::fs::hard_link(s.body_path(&id), free.join("7.msg")).unwrap();
        std::fs::hard_link(s.env_path(&id), free.join("8.env")).unwrap();
        std::fs::write(free.join("3.msg"), b"an old body").unwrap();
        std::fs::write(free.join("stray"), b"not sipmail's name").unwrap();
        drop(s);
        let (s, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs.iter().map(|e| &e.id).collect::<Vec<_>>(), [&id]);
        let left = free_names(&free);
        // New messages take the one kept file and never touch the queued one.
        for n in 0..3 {
            commit_small_body(&s, format!("another {n}").as_bytes()).await;
        }
        assert_eq!(
            std::fs::read(s.body_path(&id)).unwrap(),
            b"Subject: kept\r\n\r\nqueued\r\n",
            "a queued message was overwritten through a second name in free/"
        );
        assert_eq!(left, ["3.msg"], "shared inodes and stray names dropped");
        drop(s);
        let (_, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(envs.len(), 4);
    }

    /// A small commit writes its body and envelope over recycled files of their own kind
    /// in place (no truncation to zero, `write_over`): the files must end up holding
    /// exactly the new bytes, though the recycled ones were longer. And a power loss that
    /// keeps the new bytes but not the cut (new bytes, then the old tail) must not be
    /// delivered: the envelope no longer parses and goes to corrupt/.
    #[tokio::test]
    async fn a_small_commit_over_longer_recycled_files_holds_exactly_its_bytes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let long_body = [b"Subject: long\r\n\r\n".as_slice(), &[b'x'; 9000]].concat();
        let long = Spool::new_id();
        let mut w = s.body_writer(&long);
        w.write_all(&long_body).await.unwrap();
        let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
        let mut long_env = env(&long);
        long_env.helo = "h".repeat(2000); // an envelope longer than the next one
        s.commit_parts(file, tail, &long_env).await.unwrap();
        let inodes =
            [s.body_path(&long), s.env_path(&long)].map(|p| std::fs::metadata(p).unwrap().ino());
        s.remove_sent(&long, &Route::Peer("site-b.test".into()))
            .unwrap(); // retired to free/, for reuse
        // An fsync of queue/ after their removal makes them reusable.
        s.sync_queue_dir().await.unwrap();
        let short = b"Subject: s\r\n\r\nshort\r\n";
        let id = commit_small_body(&s, short).await;
        // Like for like (`Recycler`): the body into the old body's file, the envelope
        // into the old envelope's, though they left queue/ envelope first.
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(s.body_path(&id)), inodes[0], "the old body's file");
        assert_eq!(ino(s.env_path(&id)), inodes[1], "the old envelope's file");
        assert_eq!(std::fs::read(s.body_path(&id)).unwrap(), short);
        let on_disk: Envelope =
            serde_json::from_slice(&std::fs::read(s.env_path(&id)).unwrap()).unwrap();
        assert_eq!(on_disk.id, id);
        // The cut lost, the writes kept: new bytes followed by an older file's tail.
        let torn = commit_small_body(&s, short).await;
        for p in [s.body_path(&torn), s.env_path(&torn)] {
            let mut bytes = std::fs::read(&p).unwrap();
            bytes.extend_from_slice(b"\n  \"old\": \"tail\"\n}\nxxxxxxxx\r\n");
            std::fs::write(&p, bytes).unwrap();
        }
        drop(s);
        let (_, envs) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            envs.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            [id.as_str()]
        );
        assert!(dir.path().join(format!("corrupt/{torn}.env")).exists());
        // Its body, with no envelope, is an orphan and goes at the same recovery.
        assert!(!dir.path().join(format!("queue/{torn}.msg")).exists());
    }

    /// An envelope file keeps a recycled file's size when the new JSON fits (padded with
    /// spaces, still one JSON value), so that its fdatasync need not write the inode;
    /// it is cut when the old file is much longer.
    #[tokio::test]
    async fn an_envelope_keeps_its_recycled_files_size_and_reads_back() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let meta = |p: PathBuf| std::fs::metadata(p).unwrap();
        let read = |id: &str| -> Envelope {
            serde_json::from_slice(&std::fs::read(s.env_path(id)).unwrap()).unwrap()
        };
        let mut sizes = Vec::new();
        let mut inodes = Vec::new();
        for helo in [
            "h".repeat(5000),
            "h".repeat(4990),
            "h".repeat(5000),
            "h".into(),
        ] {
            let id = Spool::new_id();
            let mut e = env(&id);
            e.helo = helo.clone();
            let mut w = s.body_writer(&id);
            w.write_all(b"Subject: s\r\n\r\nbody\r\n").await.unwrap();
            let bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
            s.commit_parts(file, tail, &e).await.unwrap();
            let m = meta(s.env_path(&id));
            sizes.push(m.len());
            inodes.push(m.ino());
            let back = read(&id);
            assert_eq!(
                (back.id.as_str(), back.helo.as_str()),
                (id.as_str(), helo.as_str())
            );
            s.remove_sent(&id, &Route::Peer("site-b.test".into()))
                .unwrap();
            s.sync_queue_dir().await.unwrap(); // reusable from here
        }
        assert!(
            inodes.windows(2).all(|w| w[0] == w[1]),
            "one recycled file: {inodes:?}"
        );
        let first = sizes[0];
        assert_eq!(
            first % ENV_FILE_ROUND as u64,
            0,
            "a new file is rounded: {first}"
        );
        assert_eq!(
            sizes[..3],
            [first; 3],
            "10 bytes shorter or back: the same size"
        );
        assert!(sizes[3] < first - ENV_FILE_PAD_MAX as u64, "cut: {sizes:?}");
        assert_eq!(sizes[3] % ENV_FILE_ROUND as u64, 0);
    }

    #[test]
    fn envelope_file_sizes() {
        assert_eq!(env_file_len(0, 300), 512);
        assert_eq!(env_file_len(512, 300), 512);
        assert_eq!(env_file_len(512, 513), 1024);
        assert_eq!(env_file_len(1024, 1024), 1024);
        assert_eq!(env_file_len(300 + 4096, 300), 300 + 4096);
        assert_eq!(env_file_len(301 + 4096, 300), 512);
    }

    #[tokio::test]
    async fn marks_are_read_at_open_and_go_with_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path()).unwrap();
        let (a, b) = (Spool::new_id(), Spool::new_id());
        for id in [&a, &b] {
            let mut f = s.create_body(id).await.unwrap();
            f.write_all(b"x").await.unwrap();
            s.commit(f, &env(id)).await.unwrap();
        }
        s.set_mark(&a, Mark::Hold, true).await.unwrap();
        s.set_mark(&b, Mark::Expire, true).await.unwrap();
        // A mark whose message is gone (left the queue before the mark was set).
        std::fs::write(dir.path().join("queue/GONE.hold"), b"").unwrap();
        // The envelope file does not say; the marks do.
        let (s, envs) = Spool::open(dir.path()).unwrap();
        let flags: Vec<(bool, bool)> = envs.iter().map(|e| (e.held, e.expired)).collect();
        assert_eq!(flags, [(true, false), (false, true)]);
        assert!(!dir.path().join("queue/GONE.hold").exists());
        assert!(Spool::scan(dir.path()).unwrap()[0].held);
        s.set_mark(&a, Mark::Hold, false).await.unwrap();
        s.set_mark(&a, Mark::Hold, false).await.unwrap(); // clearing twice is fine
        assert!(!Spool::scan(dir.path()).unwrap()[0].held);
        // An operator's delete takes the marks with it.
        s.remove(&b).await.unwrap();
        assert!(!dir.path().join(format!("queue/{b}.expire")).exists());
    }

    #[test]
    fn ids_are_unique_and_ordered() {
        let a = Spool::new_id();
        let b = Spool::new_id();
        assert_ne!(a, b);
        assert!(a[..11] <= b[..11]);
    }
}
