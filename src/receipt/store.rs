//! Where receipts are kept on disk, on both sides of a call: blocking `std::fs`, called
//! from the blocking pool by the relay and directly by the CLI. The rest of this module
//! is sans-IO; this file is its only I/O.
//!
//! Layout under `<spool>/receipts/`:
//! - `sent/<n>.log`: the receipts a partner returned for a message we sent
//!   ([`SentRecord`], keyed by our queue ID), appended and fdatasynced *before* the message
//!   is marked delivered; [`super::records`] says how the segments work.
//! - `dedup/<n>.log`: what we accepted under one key and the receipts we issued for it
//!   ([`DedupRecord`], keyed by [`DedupKey::file_name`]), appended before we answer 250.
//! - `sent/<our queue ID>.json`, `dedup/<key>.json`: the same records as written by
//!   versions before the logs, one file each; still read (a record in a log wins), never
//!   written.
//! - `calls.log`: one line per call we placed that can carry receipts (`ms peer call-id
//!   transcript-sha256`), fsynced when the call is set up. The sender checks a returned
//!   receipt's call against it, across restarts.
//! - `delivered/<peer>.log`: the receiving side's `delivered` receipts for one partner,
//!   one JSON line each ([`StoredReceipt`]), appended and fdatasynced at hand-off; and
//!   `delivered/<peer>.acked`, the byte offset up to which the partner has fetched and
//!   acknowledged them (`XRECEIPT FETCH` / `ACK`, docs/PROTOCOL.md §4b). The log is also
//!   the receiver's own record of what it handed on.
//! - `tmp/`: files being written; renamed into place (the commit point).
//!
//! Each write of a whole file (the acknowledged offset, the pruned journal) is: write to
//! `tmp/`, fsync the file, rename, fsync the directory.

use super::dedup::{DedupKey, Remembered};
use super::records::RecordLog;
use super::wire::Signed;
use crate::group_commit::{GroupCommit, fsync_dir};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A receipt as stored: the canonical text (UTF-8) and the signature (base64).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReceipt {
    pub text: String,
    pub sig: String,
}

impl StoredReceipt {
    pub fn from_signed(s: &Signed) -> StoredReceipt {
        StoredReceipt {
            text: String::from_utf8_lossy(&s.text).into_owned(),
            sig: B64.encode(&s.sig),
        }
    }

    pub fn to_signed(&self) -> io::Result<Signed> {
        Ok(Signed {
            text: self.text.as_bytes().to_vec(),
            sig: B64
                .decode(&self.sig)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
        })
    }
}

/// The sender's record of one message's receipts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    pub queue_id: String,
    /// The partner's domain and the fingerprint the receipts were verified with.
    pub peer: String,
    pub fingerprint: String,
    /// The `accepted` receipts (the first is the one that let us forget the message).
    pub receipts: Vec<StoredReceipt>,
    /// The `delivered` receipts fetched later, each checked against an accepted one.
    #[serde(default)]
    pub delivered: Vec<StoredReceipt>,
}

impl SentRecord {
    /// The accepted receipts, parsed (one that does not parse is left out).
    pub fn accepted(&self) -> Vec<super::Receipt> {
        self.receipts
            .iter()
            .filter_map(|s| super::Receipt::parse(s.text.as_bytes()).ok())
            .collect()
    }
}

/// A batch of `delivered` receipts read for a partner: the receipts and the log offset
/// just after the last one (what an acknowledgement of the whole batch records).
#[derive(Debug, Default)]
pub struct DeliveredBatch {
    pub receipts: Vec<Signed>,
    /// (log offset after each receipt), in order.
    pub ends: Vec<u64>,
}

/// The receiver's record of one duplicate key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub sender: String,
    pub sender_queue_id: String,
    pub message_sha256: String,
    /// Every recipient accepted under the key, and the digest of the receipt covering it.
    pub rcpts: Vec<RememberedRcpt>,
    /// The receipts issued under the key.
    pub receipts: Vec<StoredReceipt>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedRcpt {
    pub rcpt: String,
    pub receipt: String,
}

impl DedupRecord {
    pub fn new(key: &DedupKey) -> DedupRecord {
        DedupRecord {
            sender: key.sender.clone(),
            sender_queue_id: key.sender_queue_id.clone(),
            message_sha256: key.message_sha256.clone(),
            ..Default::default()
        }
    }

    pub fn remembered(&self) -> Vec<Remembered> {
        self.rcpts
            .iter()
            .map(|r| Remembered {
                rcpt: r.rcpt.clone(),
                receipt_digest: r.receipt.clone(),
            })
            .collect()
    }

    /// The issued receipt whose text has this digest.
    pub fn receipt(&self, digest: &str) -> Option<&StoredReceipt> {
        use sha2::Digest;
        self.receipts
            .iter()
            .find(|r| hex::encode(sha2::Sha256::digest(r.text.as_bytes())) == digest)
    }
}

/// One call in `calls.log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalCall {
    pub at_ms: u64,
    pub peer: String,
    pub call_id: String,
    pub transcript_sha256: String,
}

#[derive(Debug)]
pub struct ReceiptStore {
    root: PathBuf,
    seq: AtomicU64,
    /// The sender's receipt records and the receiver's duplicate records.
    sent_log: RecordLog,
    dedup_log: RecordLog,
    /// The delivered logs this process has open, by path: appends are serialised under
    /// this lock; their fdatasyncs are group-committed per log (a writer whose line an
    /// fdatasync started after covered skips its own).
    delivered: std::sync::Mutex<std::collections::HashMap<PathBuf, DeliveredLog>>,
    /// A sent record is read, changed and rewritten; two calls may fetch the same receipt
    /// at once, so each rewrite holds the stripe of its queue ID (striped rather than one
    /// lock so that different messages still share the directory fsync's group commit).
    sent_locks: [std::sync::Mutex<()>; SENT_STRIPES],
    /// Group commit of the call journal's fdatasyncs.
    journal_sync: GroupCommit,
    /// Emptied files in `tmp/` whose inodes the next writes take (`crate::reuse`).
    reuse: crate::reuse::Reuse,
}

const SENT_STRIPES: usize = 64;

/// One partner's delivered log, held open by the process that appends to it, so that an
/// append is one write(2) rather than opens, a stat and a read of the last byte each time
/// (a profile of the receiving relay counted three opens per message here).
#[derive(Debug)]
struct DeliveredLog {
    /// Opened for appending (and reading its last byte when first opened).
    file: std::sync::Arc<fs::File>,
    sync: std::sync::Arc<GroupCommit>,
    /// The acknowledged offset and its file, once read or written by this process.
    acked: Option<(fs::File, u64)>,
}

/// The acknowledged offset is written in place at a fixed width, so each new value
/// overwrites the whole previous one (a shorter one written by an older version too).
fn acked_text(offset: u64) -> String {
    format!("{offset:020}\n")
}

impl ReceiptStore {
    /// The store under `<spool>/receipts`, creating its directories. Files left in `tmp/`
    /// by a crash are removed.
    pub fn open(spool: &Path) -> io::Result<ReceiptStore> {
        let s = ReceiptStore::with_logs(spool, true);
        for d in ["sent", "dedup", "delivered", "tmp"] {
            fs::create_dir_all(s.root.join(d))?;
        }
        for e in fs::read_dir(s.root.join("tmp"))? {
            let _ = fs::remove_file(e?.path());
        }
        s.sent_log.open()?;
        s.dedup_log.open()?;
        Ok(s)
    }

    /// The store, read-only use (the CLI): nothing is created.
    pub fn at(spool: &Path) -> ReceiptStore {
        ReceiptStore::with_logs(spool, false)
    }

    fn with_logs(spool: &Path, writable: bool) -> ReceiptStore {
        let root = spool.join("receipts");
        ReceiptStore {
            sent_log: RecordLog::new(root.join("sent"), writable),
            dedup_log: RecordLog::new(root.join("dedup"), writable),
            root,
            seq: AtomicU64::new(0),
            delivered: std::sync::Mutex::default(),
            sent_locks: std::array::from_fn(|_| std::sync::Mutex::new(())),
            journal_sync: GroupCommit::default(),
            reuse: crate::reuse::Reuse::default(),
        }
    }

    /// The lock serialising read-change-write of one queue ID's sent record.
    fn sent_lock(&self, queue_id: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        queue_id.hash(&mut h);
        let m = &self.sent_locks[(h.finish() as usize) % SENT_STRIPES];
        // A panic while holding it cannot leave a record half-written (one write each).
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Write to `tmp/`, fsync, rename into `dir/name`, fsync the directory. A file
    /// rewritten is swapped with the new version, whose inode is an emptied old one where
    /// there is one (`crate::reuse`).
    fn write_atomic(&self, dir: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
        let (tmp, mut f) = self.reuse.take_or(|| {
            let tmp = self.root.join("tmp").join(format!(
                "{name}.{}.{}",
                std::process::id(),
                self.seq.fetch_add(1, Ordering::Relaxed)
            ));
            let f = fs::File::create(&tmp)?;
            Ok((tmp, f))
        })?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        let d = self.root.join(dir);
        let old = self.reuse.put(&tmp, &d.join(name))?;
        fsync_dir(&d)?;
        self.reuse.settle(old);
        Ok(())
    }

    fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> io::Result<Option<T>> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    // --- receiving side ---

    pub fn dedup(&self, key: &DedupKey) -> io::Result<Option<DedupRecord>> {
        self.dedup_named(&key.file_name())
    }

    /// The record under a key's file name: the log's, else an older version's file.
    fn dedup_named(&self, key_file: &str) -> io::Result<Option<DedupRecord>> {
        Self::logged_or_legacy(&self.dedup_log, key_file, &self.legacy_dedup_path(key_file))
    }

    /// `key`'s record in `log`, else the file an older version wrote for it.
    fn logged_or_legacy<T: for<'a> Deserialize<'a>>(
        log: &RecordLog,
        key: &str,
        legacy: &Path,
    ) -> io::Result<Option<T>> {
        match log.get(key)? {
            Some(r) => Ok(Some(r)),
            None => Self::read_json(legacy),
        }
    }

    fn legacy_dedup_path(&self, key_file: &str) -> PathBuf {
        self.root.join("dedup").join(format!("{key_file}.json"))
    }

    fn check_key_file(key_file: &str) -> io::Result<()> {
        if key_file.len() != 64 || !key_file.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a duplicate key",
            ));
        }
        Ok(())
    }

    /// Whether `key` may have a record: in the log's index (in memory), or as a file an
    /// older version wrote. `false` means certainly none, found without reading a record.
    pub fn dedup_may_exist(&self, key: &DedupKey) -> io::Result<bool> {
        let name = key.file_name();
        Ok(self.dedup_log.contains(&name)? || self.legacy_dedup_path(&name).exists())
    }

    /// Writes the record of `key`. A new record is written without fsync when the
    /// message it covers is committed in the spool with its facts (the envelope is the
    /// durable copy until [`ReceiptStore::sync_dedup`] runs before the message leaves the
    /// spool; start-up recovery rebuilds a lost or torn one from it). A record that replaces
    /// an older one is always fsynced: the older one may cover messages already gone.
    pub fn put_dedup(&self, key: &DedupKey, rec: &DedupRecord, lazy: bool) -> io::Result<()> {
        let name = key.file_name();
        let durable =
            !lazy || self.dedup_log.contains(&name)? || self.legacy_dedup_path(&name).exists();
        self.dedup_log.put(&name, rec, now_ms(), durable)
    }

    /// The record stored under a key's file name ([`DedupKey::file_name`]).
    pub fn dedup_file(&self, key_file: &str) -> io::Result<Option<DedupRecord>> {
        Self::check_key_file(key_file)?;
        self.dedup_named(key_file)
    }

    /// Makes the record of `key` durable (group-committed); nothing if absent.
    pub fn sync_dedup(&self, key_file: &str) -> io::Result<()> {
        Self::check_key_file(key_file)?;
        if self.dedup_log.contains(key_file)? {
            return self.dedup_log.sync_key(key_file);
        }
        // A record an older version wrote lazily, one file, for a message still queued.
        match fs::File::open(self.legacy_dedup_path(key_file)) {
            Ok(f) => f.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        fsync_dir(&self.root.join("dedup"))
    }

    /// The record of `key`, or `None` if it is absent *or torn* (not valid JSON: a lazy
    /// write cut by a crash); recovery rebuilds it from the spool.
    pub fn dedup_or_torn(&self, key: &DedupKey) -> io::Result<Option<DedupRecord>> {
        match self.dedup(key) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "a duplicate record was torn by a crash; rebuilt from the spool");
                Ok(None)
            }
            r => r,
        }
    }

    // --- sending side ---

    fn legacy_sent_path(&self, queue_id: &str) -> PathBuf {
        self.root.join("sent").join(format!("{queue_id}.json"))
    }

    /// The receipts stored for our message `queue_id` (a queue ID of ours: checked, as it
    /// names a file).
    pub fn sent(&self, queue_id: &str) -> io::Result<Option<SentRecord>> {
        if !super::dedup::valid_queue_id(queue_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{queue_id:?} is not a queue ID"),
            ));
        }
        Self::logged_or_legacy(&self.sent_log, queue_id, &self.legacy_sent_path(queue_id))
    }

    /// Adds `new` receipts to the record of `queue_id` (durably).
    pub fn add_sent(
        &self,
        queue_id: &str,
        peer: &str,
        fingerprint: &str,
        new: &[Signed],
    ) -> io::Result<()> {
        let _g = self.sent_lock(queue_id);
        let mut rec = self.sent(queue_id)?.unwrap_or_else(|| SentRecord {
            queue_id: queue_id.to_string(),
            peer: peer.to_string(),
            fingerprint: fingerprint.to_string(),
            receipts: Vec::new(),
            delivered: Vec::new(),
        });
        for s in new {
            let st = StoredReceipt::from_signed(s);
            if !rec.receipts.iter().any(|r| r.text == st.text) {
                rec.receipts.push(st);
            }
        }
        self.sent_log.put(queue_id, &rec, now_ms(), true)
    }

    /// Adds checked `delivered` receipts to the (existing) record of `queue_id`, durably.
    /// Returns how many were new (a receipt fetched twice is stored once).
    pub fn add_delivered(&self, queue_id: &str, new: &[Signed]) -> io::Result<usize> {
        self.add_delivered_with(queue_id, new, true)
    }

    /// As [`ReceiptStore::add_delivered`], written but not yet durable: a batch of them is
    /// made durable by one [`ReceiptStore::sync_sent`].
    pub fn add_delivered_unsynced(&self, queue_id: &str, new: &[Signed]) -> io::Result<usize> {
        self.add_delivered_with(queue_id, new, false)
    }

    /// Makes every sent record written so far durable (one group-committed fdatasync).
    pub fn sync_sent(&self) -> io::Result<()> {
        self.sent_log.sync()
    }

    fn add_delivered_with(
        &self,
        queue_id: &str,
        new: &[Signed],
        durable: bool,
    ) -> io::Result<usize> {
        let _g = self.sent_lock(queue_id);
        let Some(mut rec) = self.sent(queue_id)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no receipt record for {queue_id}"),
            ));
        };
        let before = rec.delivered.len();
        for s in new {
            let st = StoredReceipt::from_signed(s);
            if !rec.delivered.iter().any(|r| r.text == st.text) {
                rec.delivered.push(st);
            }
        }
        let added = rec.delivered.len() - before;
        if added == 0 {
            return Ok(0);
        }
        self.sent_log.put(queue_id, &rec, now_ms(), durable)?;
        Ok(added)
    }

    /// Every stored sent record, oldest first (by queue ID: ours sort by time); a record
    /// in the log wins over an older version's file of the same queue ID.
    pub fn list_sent(&self) -> io::Result<Vec<SentRecord>> {
        let mut all: std::collections::BTreeMap<String, SentRecord> = self
            .sent_log
            .scan::<SentRecord>()?
            .into_iter()
            .map(|(k, (_, r))| (k, r))
            .collect();
        for r in self.list_legacy_sent()? {
            all.entry(r.queue_id.clone()).or_insert(r);
        }
        Ok(all.into_values().collect())
    }

    fn list_legacy_sent(&self) -> io::Result<Vec<SentRecord>> {
        let mut names: Vec<PathBuf> = match fs::read_dir(self.root.join("sent")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        let mut out = Vec::new();
        for p in names {
            if let Some(r) = Self::read_json(&p)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    // --- the receiving side's delivered receipts, per partner ---

    fn delivered_path(&self, peer: &str, ext: &str) -> io::Result<PathBuf> {
        let p = peer.to_ascii_lowercase();
        let ok = !p.is_empty()
            && !p.starts_with('.')
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{peer:?} is not a partner domain"),
            ));
        }
        Ok(self.root.join("delivered").join(format!("{p}.{ext}")))
    }

    /// `peer`'s delivered log, opened (and created) on first use: a line left torn by a
    /// crash is closed then, so the next line starts on its own (the reader skips the torn
    /// one). Called with the `delivered` lock held.
    fn open_delivered_log<'a>(
        &self,
        open: &'a mut std::collections::HashMap<PathBuf, DeliveredLog>,
        path: &Path,
    ) -> io::Result<&'a mut DeliveredLog> {
        use std::collections::hash_map::Entry;
        match open.entry(path.to_path_buf()) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                use std::os::unix::fs::FileExt;
                let new = !path.exists();
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .create(true)
                    .append(true)
                    .open(path)?;
                let len = f.metadata()?.len();
                let mut last = [b'\n'];
                if len > 0 {
                    f.read_exact_at(&mut last, len - 1)?;
                }
                if last[0] != b'\n' {
                    f.write_all(b"\n")?;
                }
                if new {
                    fsync_dir(&self.root.join("delivered"))?;
                }
                Ok(v.insert(DeliveredLog {
                    file: std::sync::Arc::new(f),
                    sync: std::sync::Arc::default(),
                    acked: None,
                }))
            }
        }
    }

    fn delivered_logs(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PathBuf, DeliveredLog>> {
        // A panic while holding it cannot leave a line half-written in memory: the map
        // holds files and offsets only.
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a signed `delivered` receipt to `peer`'s log (written: a killed process
    /// cannot lose it; [`ReceiptStore::sync_delivered`] makes it survive a power cut).
    pub fn append_delivered(&self, peer: &str, s: &Signed) -> io::Result<()> {
        let path = self.delivered_path(peer, "log")?;
        let mut line =
            serde_json::to_vec(&StoredReceipt::from_signed(s)).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut open = self.delivered_logs();
        let log = self.open_delivered_log(&mut open, &path)?;
        // One write(2) on an O_APPEND file. If it fails part-way (a full disk), the log is
        // closed and opened again by the next append, which ends the torn line first.
        if let Err(e) = (&*log.file).write_all(&line) {
            open.remove(&path);
            return Err(e);
        }
        Ok(())
    }

    /// fdatasyncs `peer`'s delivered log, group-committed: one fdatasync that started
    /// after this call covers it.
    pub fn sync_delivered(&self, peer: &str) -> io::Result<()> {
        let path = self.delivered_path(peer, "log")?;
        let (file, group) = {
            let mut open = self.delivered_logs();
            let log = self.open_delivered_log(&mut open, &path)?;
            (log.file.clone(), log.sync.clone())
        };
        // fdatasync is of the file, whichever descriptor: it covers every line written
        // before it started.
        group.sync_with(|| file.sync_data())
    }

    /// The offset up to which `peer` acknowledged its delivered receipts: the value this
    /// process last wrote, or the file's (0 where there is none, or where it does not
    /// parse: after a power cut an unsynced write may be torn, and receipts are then only
    /// sent again, which the partner stores once).
    fn delivered_acked(&self, peer: &str) -> io::Result<u64> {
        let path = self.delivered_path(peer, "log")?;
        if let Some((_, at)) = self
            .delivered_logs()
            .get(&path)
            .and_then(|l| l.acked.as_ref())
        {
            return Ok(*at);
        }
        Self::read_acked(&self.delivered_path(peer, "acked")?)
    }

    /// The offset in an `.acked` file (see [`ReceiptStore::delivered_acked`]).
    fn read_acked(path: &Path) -> io::Result<u64> {
        match fs::read_to_string(path) {
            Ok(t) => Ok(t.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Up to `max` delivered receipts for `peer` not yet acknowledged, oldest first.
    pub fn delivered_batch(&self, peer: &str, max: usize) -> io::Result<DeliveredBatch> {
        use std::io::{BufRead, Seek, SeekFrom};
        let mut out = DeliveredBatch::default();
        let from = self.delivered_acked(peer)?;
        let f = match fs::File::open(self.delivered_path(peer, "log")?) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut r = io::BufReader::new(f);
        r.seek(SeekFrom::Start(from))?;
        let mut at = from;
        let mut line = Vec::new();
        while out.receipts.len() < max {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // the end, or a line still being written
            }
            at += n as u64;
            match serde_json::from_slice::<StoredReceipt>(&line).map(|s| s.to_signed()) {
                Ok(Ok(s)) => {
                    out.receipts.push(s);
                    out.ends.push(at);
                }
                _ => tracing::warn!(
                    peer,
                    offset = at - n as u64,
                    "a torn line in the delivered-receipt log is skipped"
                ),
            }
        }
        Ok(out)
    }

    /// `peer` has the delivered receipts up to `offset` (never moves back).
    pub fn ack_delivered(&self, peer: &str, offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.delivered_path(peer, "log")?;
        let acked_path = self.delivered_path(peer, "acked")?;
        let mut open = self.delivered_logs();
        let log = self.open_delivered_log(&mut open, &path)?;
        let acked = match &mut log.acked {
            Some(a) => a,
            None => {
                // First acknowledgement of this process: the file's value, read under
                // the lock, is where "never moves back" starts.
                let from = Self::read_acked(&acked_path)?;
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&acked_path)?;
                log.acked.insert((f, from))
            }
        };
        if offset <= acked.1 {
            return Ok(());
        }
        // Written in place, not fsynced: an acknowledgement lost in a crash only sends
        // receipts again, and the partner stores each once.
        acked.0.write_all_at(acked_text(offset).as_bytes(), 0)?;
        acked.1 = offset;
        Ok(())
    }

    /// Every delivered receipt in `peer`'s log (the CLI's view on the receiving side).
    pub fn delivered_log(&self, peer: &str) -> io::Result<Vec<Signed>> {
        let text = match fs::read(self.delivered_path(peer, "log")?) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .split(|b| *b == b'\n')
            .filter_map(|l| {
                serde_json::from_slice::<StoredReceipt>(l)
                    .ok()?
                    .to_signed()
                    .ok()
            })
            .collect())
    }

    // --- the call journal ---

    fn journal(&self) -> PathBuf {
        self.root.join("calls.log")
    }

    /// Appends a call and fdatasyncs the journal, group-committed: calls set up at the
    /// same moment share one fdatasync (one that started after this line was written
    /// covers it), so a burst of calls does not queue behind one disk flush each.
    pub fn record_call(&self, c: &JournalCall) -> io::Result<()> {
        let line = format!(
            "{} {} {} {}\n",
            c.at_ms, c.peer, c.call_id, c.transcript_sha256
        );
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.journal())?;
        // One write(2) of the whole line on an O_APPEND file: lines of calls recorded at
        // once do not interleave.
        (&f).write_all(line.as_bytes())?;
        self.journal_sync.sync_with(|| f.sync_data())
    }

    /// The journal's calls not older than `since_ms`. Lines that do not parse (a torn last
    /// line after a crash) are skipped.
    pub fn calls(&self, since_ms: u64) -> io::Result<Vec<JournalCall>> {
        let text = match fs::read_to_string(self.journal()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut w = l.split(' ');
                let c = JournalCall {
                    at_ms: w.next()?.parse().ok()?,
                    peer: w.next()?.to_string(),
                    call_id: w.next()?.to_string(),
                    transcript_sha256: w.next()?.to_string(),
                };
                (w.next().is_none() && c.transcript_sha256.len() == 64 && c.at_ms >= since_ms)
                    .then_some(c)
            })
            .collect())
    }

    /// Rewrites the journal with only the calls since `since_ms`, and removes duplicate
    /// records not written since then (whole log segments, and older versions' files):
    /// run at start-up.
    pub fn prune(&self, since_ms: u64) -> io::Result<()> {
        let keep = self.calls(since_ms)?;
        let mut text = String::new();
        for c in &keep {
            text.push_str(&format!(
                "{} {} {} {}\n",
                c.at_ms, c.peer, c.call_id, c.transcript_sha256
            ));
        }
        if self.journal().exists() {
            self.write_atomic("", "calls.log", text.as_bytes())?;
        }
        let dropped = self.dedup_log.prune_before(since_ms)?;
        if dropped > 0 {
            tracing::info!(
                segments = dropped,
                "receipts: dropped duplicate records older than the duplicate window"
            );
        }
        let cutoff = std::time::UNIX_EPOCH + std::time::Duration::from_millis(since_ms);
        if let Ok(rd) = fs::read_dir(self.root.join("dedup")) {
            for e in rd
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
