//! Per-peer trust state under `<spool>/state/`: the retained secrets that key continuity
//! needs, and the keys pinned on first use for opportunistic peers.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `<domain>.retained` | retained secrets, newest first, one a line: hex, then the remote key's fingerprint (up to 4 per key, 16 in all) | 0600 |
//! | `<domain>.pin` | the pinned signing-key fingerprint of an opportunistic peer | 0600 |
//! | `<domain>.cert` | `trust = "dnssec"`: the certificate last trusted from DNS (binary), to check that a changed key is certified by it | 0600 |
//! | `<domain>.pin-pending` | keys the peer presented and proved (their signature verified) but that were refused, for `sipmail trust accept`: one line each, `FINGERPRINT FIRST-SEEN LAST-SEEN COUNT FROM` (Unix seconds, source address), at most 8 | 0600 |
//!
//! Nothing here is written for a key that did not prove itself: a pending key is recorded
//! only after the call's signature by that key verified, and those writes are
//! rate-limited per peer ([`WriteLimiter`]).
//!
//! Every write goes to a temporary file that is fsynced, renamed over the old one, and the
//! folder fsynced, so a crash leaves the old state or the new, never half of one. The
//! relay reads the files at each call, so `sipmail trust accept` and `reset` take effect
//! on the next call without a restart.

use crate::config::ContinuityPolicy;
use crate::handshake::{Continuity, MAX_RETAINED, RetainedSecret};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

/// How many retained secrets a domain's file holds in all: [`MAX_RETAINED`] for each of up
/// to 4 remote keys (a partner's relays, each with its own key).
const MAX_KEPT: usize = MAX_RETAINED * 4;

/// The caller's offer from every retained secret (newest first, with its remote key): the
/// newest of each key first, then the newest others, [`MAX_RETAINED`] in all. Pure.
fn spread(all: Vec<(RetainedSecret, String)>) -> Vec<RetainedSecret> {
    let mut seen: Vec<&str> = Vec::new();
    let mut first: Vec<usize> = Vec::new();
    for (i, (_, k)) in all.iter().enumerate() {
        if !seen.contains(&k.as_str()) {
            seen.push(k);
            first.push(i);
        }
    }
    let rest = (0..all.len()).filter(|i| !first.contains(i));
    let order: Vec<usize> = first
        .iter()
        .copied()
        .chain(rest)
        .take(MAX_RETAINED)
        .collect();
    order.into_iter().map(|i| all[i].0.clone()).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("\"{0}\" is not a domain name")]
    BadDomain(String),
    #[error("no changed key is waiting for acceptance for {0}")]
    NothingPending(String),
    #[error(
        "{fingerprint} is not pending for {domain}; pending: {}. Check the fingerprint with the partner (`sipmail keys fingerprint` on their side), then run `sipmail trust accept {domain} FINGERPRINT` with one of these (`sipmail trust list` shows when and from where each was seen)",
        pending.join("; ")
    )]
    NotPending {
        domain: String,
        fingerprint: String,
        pending: Vec<String>,
    },
    #[error("\"{0}\" is not a key fingerprint (40 or 64 hex digits, spaces allowed)")]
    BadFingerprint(String),
}

/// At most this many pending keys per peer; a new one then replaces the one seen least
/// recently (a partner's retried calls keep its own key fresh).
pub const MAX_PENDING: usize = 8;

/// A key a peer presented and proved, but that was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKey {
    pub fingerprint: String,
    /// Unix seconds (0: not known, from an older file).
    pub first_seen: u64,
    pub last_seen: u64,
    pub count: u64,
    /// The source address of the last call that presented it ("-": not known).
    pub from: String,
}

impl PendingKey {
    fn parse(line: &str) -> Option<PendingKey> {
        let mut f = line.split_whitespace();
        let fingerprint = normalize_fingerprint(f.next()?).ok()?;
        let num = |v: Option<&str>| v.and_then(|x| x.parse::<u64>().ok());
        let first_seen = num(f.next()).unwrap_or(0);
        let last_seen = num(f.next()).unwrap_or(first_seen);
        let count = num(f.next()).unwrap_or(1);
        let from = f.next().unwrap_or("-").to_string();
        Some(PendingKey {
            fingerprint,
            first_seen,
            last_seen,
            count,
            from,
        })
    }
}

/// Upper-case hex without spaces; 40 (v4) or 64 (v6) digits.
pub fn normalize_fingerprint(f: &str) -> Result<String, TrustError> {
    let hex: String = f.chars().filter(|c| !c.is_whitespace()).collect();
    if (hex.len() == 40 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_uppercase())
    } else {
        Err(TrustError::BadFingerprint(f.to_string()))
    }
}

/// Merge a presented key into a pending set (pure): a known key gets its last-seen time,
/// count and address updated; a new one is added, replacing the least recently seen one
/// when the set holds [`MAX_PENDING`].
pub fn merge_pending(set: &mut Vec<PendingKey>, fingerprint: &str, from: &str, now: u64) {
    if let Some(k) = set.iter_mut().find(|k| k.fingerprint == fingerprint) {
        k.last_seen = now;
        k.count = k.count.saturating_add(1);
        k.from = from.to_string();
        return;
    }
    if set.len() >= MAX_PENDING
        && let Some(i) = set
            .iter()
            .enumerate()
            .min_by_key(|(_, k)| k.last_seen)
            .map(|(i, _)| i)
    {
        set.remove(i);
    }
    set.push(PendingKey {
        fingerprint: fingerprint.to_string(),
        first_seen: now,
        last_seen: now,
        count: 1,
        from: from.to_string(),
    });
}

/// Per peer, how often a refused key may be written to `<domain>.pin-pending`: a burst of
/// 4, then one a minute. Pure: the caller passes `now`. Only configured peers' domains
/// reach it, and the table is bounded anyway.
#[derive(Debug)]
pub struct WriteLimiter {
    buckets: std::collections::HashMap<String, crate::sip::limits::TokenBucket>,
    rate: f64,
    burst: f64,
}

impl Default for WriteLimiter {
    fn default() -> Self {
        WriteLimiter::new(1.0 / 60.0, 4.0)
    }
}

impl WriteLimiter {
    pub fn new(rate_per_second: f64, burst: f64) -> WriteLimiter {
        WriteLimiter {
            buckets: std::collections::HashMap::new(),
            rate: rate_per_second,
            burst,
        }
    }

    /// May `domain`'s trust state be written at `now`?
    pub fn allow(&mut self, domain: &str, now: std::time::Instant) -> bool {
        if !self.buckets.contains_key(domain) && self.buckets.len() >= 4096 {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= 4096 {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(domain.to_string())
            .or_insert_with(|| crate::sip::limits::TokenBucket::new(now, rate, burst))
            .try_take(now)
    }
}

/// What to do with an opportunistic peer's call, once its presented key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpportunisticDecision {
    /// The pinned key, or first use where first use may pin: go on (a first use is pinned
    /// once the call is established).
    Proceed,
    /// Complete the handshake only to verify the key's signature, then record the key as
    /// pending and refuse the call.
    Hold(HoldReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// Another key is pinned.
    Changed { pinned: String },
    /// Nothing pinned, and the call came from an address that is not the peer's.
    FirstUseFromElsewhere,
}

/// Pure: the pin check's result and where the call comes from decide. `placed_by_us`: we
/// called the peer's configured address, or one DNSSEC-secure answers located (not an
/// insecure SRV answer's); `from_peer_address`: an incoming call from one of the
/// addresses of the peer's `sip` URI.
pub fn opportunistic_decision(
    pin: PinCheck,
    placed_by_us: bool,
    from_peer_address: bool,
) -> OpportunisticDecision {
    match pin {
        PinCheck::Same => OpportunisticDecision::Proceed,
        PinCheck::FirstUse if placed_by_us || from_peer_address => OpportunisticDecision::Proceed,
        PinCheck::FirstUse => OpportunisticDecision::Hold(HoldReason::FirstUseFromElsewhere),
        PinCheck::Changed { pinned } => OpportunisticDecision::Hold(HoldReason::Changed { pinned }),
    }
}

/// What key continuity means for a call, on either side of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContinuityDecision {
    /// Matched, or a first call: nothing to say.
    Fine,
    /// We hold no secret but the peer remembers a call: our retained secrets were lost or
    /// reset. Warn, go on.
    LostLocal,
    /// The peer does not hold the secret our last calls left (it lost its cache, or someone
    /// else is at the other end). Warn, go on.
    Warn,
    /// As `Warn`, under `continuity = "require"`: refuse the call.
    Refuse,
}

/// Pure: the continuity rule, the same for the caller and the callee.
pub fn continuity_decision(continuity: Continuity, policy: ContinuityPolicy) -> ContinuityDecision {
    if continuity.is_problem() {
        match policy {
            ContinuityPolicy::Require => ContinuityDecision::Refuse,
            ContinuityPolicy::Warn => ContinuityDecision::Warn,
        }
    } else if continuity == (Continuity::NoneHeld { peer_has: true }) {
        ContinuityDecision::LostLocal
    } else {
        ContinuityDecision::Fine
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a presented key is, compared to the pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCheck {
    /// Nothing pinned yet: this is the first use.
    FirstUse,
    /// The pinned key.
    Same,
    /// A different key than the pinned one.
    Changed { pinned: String },
}

/// The state of one peer, as `sipmail trust list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub domain: String,
    pub retained: usize,
    pub pinned: Option<String>,
    /// Refused keys waiting for an operator, least recently seen first.
    pub pending: Vec<PendingKey>,
}

/// The `state/` folder of a spool.
#[derive(Debug)]
pub struct TrustStore {
    dir: PathBuf,
    /// Serialise read-modify-write of one peer's files among this process's calls (the
    /// spool's control socket keeps a second daemon off the same spool). One lock per
    /// stripe of domains, so that calls with different peers store their state (two fsyncs
    /// each) side by side: one lock for all capped a hub at one fsync pair at a time.
    locks: [Mutex<()>; LOCK_STRIPES],
    /// Retained secrets waiting to be written, and the group commit that writes them.
    retain_queue: Mutex<RetainQueue>,
    retain_commit: Mutex<RetainCommit>,
    /// Emptied files in `state-tmp/` whose inodes the next writes take (`crate::reuse`):
    /// every call rewrites its peer's retained secrets.
    reuse: crate::reuse::Reuse,
}

/// A secret queued by [`TrustStore::retain`], for [`TrustStore::write_retained`].
#[derive(Debug)]
pub struct RetainTicket {
    ticket: u64,
    domain: String,
}

/// One secret to keep: (ticket, domain, remote key, secret).
type Unwritten = (u64, String, String, RetainedSecret);

/// Secrets [`TrustStore::remember`] was asked to keep and no write has finished yet.
/// Lookups see them too (the next call must find the last call's secret, even while its
/// write is still running).
#[derive(Default)]
struct RetainQueue {
    /// Tickets handed out so far (one a secret).
    requested: u64,
    /// Not taken by a write yet, oldest first.
    waiting: Vec<Unwritten>,
    /// Taken by the write running now; dropped from here once it has finished.
    writing: Vec<Unwritten>,
}

/// Counts only: the secrets are never printed.
impl std::fmt::Debug for RetainQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainQueue")
            .field("requested", &self.requested)
            .field("waiting", &self.waiting.len())
            .field("writing", &self.writing.len())
            .finish()
    }
}

/// What the writes so far covered; its lock is held by the one writer at a time.
#[derive(Debug, Default)]
struct RetainCommit {
    /// Every ticket up to this one was written (or failed, in `failed`).
    done: u64,
    /// Tickets whose domain's write failed, with the error, until their caller looks.
    failed: std::collections::HashMap<u64, String>,
}

fn check_domain(d: &str) -> Result<String, TrustError> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(TrustError::BadDomain(d))
    }
}

const LOCK_STRIPES: usize = 16;

/// Adds `secrets` (oldest first) to a list of retained secrets (newest first): each goes
/// to the front, at most [`MAX_RETAINED`] are kept per remote key and [`MAX_KEPT`] in all.
fn merge_retained<'a>(
    list: &mut Vec<(RetainedSecret, String)>,
    secrets: impl Iterator<Item = (&'a String, &'a RetainedSecret)>,
) {
    for (key, secret) in secrets {
        list.retain(|(s, _)| s != secret);
        list.insert(0, (secret.clone(), key.clone()));
    }
    let mut per_key: std::collections::HashMap<String, usize> = Default::default();
    list.retain(|(_, k)| {
        let n = per_key.entry(k.clone()).or_insert(0);
        *n += 1;
        *n <= MAX_RETAINED
    });
    list.truncate(MAX_KEPT);
}

impl TrustStore {
    fn lock_for(&self, domain: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        domain
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .hash(&mut h);
        self.locks[h.finish() as usize % LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn new(spool: &Path) -> TrustStore {
        TrustStore {
            dir: spool.join("state"),
            locks: std::array::from_fn(|_| Mutex::new(())),
            retain_queue: Mutex::default(),
            retain_commit: Mutex::default(),
            reuse: crate::reuse::Reuse::default(),
        }
    }

    /// Where new versions are written before they are swapped in: beside `state/`, so that
    /// `state/` holds only the state itself.
    fn tmp_dir(&self) -> PathBuf {
        self.dir.with_file_name("state-tmp")
    }

    /// The daemon, at start: removes what writes left in `state-tmp/` (a crash's half
    /// written files, the emptied inodes the last run kept).
    pub fn clear_tmp(&self) {
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, domain: &str, ext: &str) -> Result<PathBuf, TrustError> {
        Ok(self.dir.join(format!("{}.{ext}", check_domain(domain)?)))
    }

    /// Write a new version, fsync it, swap it in for the old one (whose inode, emptied,
    /// takes a later write: `crate::reuse`), fsync `state/`.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), TrustError> {
        let old = self.write_swapped(path, data)?;
        self.sync_dir().map_err(io(path))?;
        self.reuse.settle(old);
        Ok(())
    }

    /// fsync `state/`: the swaps made so far are durable.
    fn sync_dir(&self) -> std::io::Result<()> {
        crate::group_commit::fsync_dir(&self.dir)
    }

    /// [`write_atomic`](Self::write_atomic) without the directory's fsync: the caller
    /// fsyncs `state/` once for several files, then settles each swap.
    fn write_swapped(&self, path: &Path, data: &[u8]) -> Result<crate::reuse::Swapped, TrustError> {
        let tmp_dir = self.tmp_dir();
        for d in [&self.dir, &tmp_dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io(d))?;
        }
        let (tmp, mut f) = self
            .reuse
            .take_or(|| {
                let mut rnd = [0u8; 8];
                getrandom::fill(&mut rnd).map_err(|e| std::io::Error::other(e.to_string()))?;
                let fresh = tmp_dir.join(format!("tmp-{}", hex::encode(rnd)));
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&fresh)?;
                Ok((fresh, f))
            })
            .map_err(io(path))?;
        let res = (|| {
            f.write_all(data)?;
            f.sync_all()?;
            self.reuse.put(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io(path))
    }

    fn remove(&self, path: &Path) -> Result<bool, TrustError> {
        match fs::remove_file(path) {
            Ok(()) => {
                let _ = self.sync_dir();
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(path)(e)),
        }
    }

    fn read_line(&self, path: &Path) -> Result<Option<String>, TrustError> {
        match fs::read_to_string(path) {
            Ok(s) => Ok(s.lines().next().map(|l| l.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// Every retained secret for `domain`, newest first, each with the fingerprint of the
    /// remote key of the call that left it (`""` in files of older versions, which kept
    /// no fingerprint). A missing file means none (first call, or the cache was lost); a
    /// corrupt one is an error the caller logs.
    fn retained_all(&self, domain: &str) -> Result<Vec<(RetainedSecret, String)>, TrustError> {
        let domain = check_domain(domain)?;
        // Taken before the file is read: a write that finishes in between is in the file.
        let unwritten: Vec<(String, RetainedSecret)> = {
            let q = self.retain_queue.lock().unwrap_or_else(|p| p.into_inner());
            let mut mine: Vec<&Unwritten> = q
                .writing
                .iter()
                .chain(&q.waiting)
                .filter(|(_, d, _, _)| *d == domain)
                .collect();
            mine.sort_by_key(|(t, _, _, _)| *t);
            mine.into_iter()
                .map(|(_, _, k, s)| (k.clone(), s.clone()))
                .collect()
        };
        let mut list = self.retained_file(&domain)?;
        merge_retained(&mut list, unwritten.iter().map(|(k, s)| (k, s)));
        Ok(list)
    }

    /// The retained secrets in `domain`'s file, newest first.
    fn retained_file(&self, domain: &str) -> Result<Vec<(RetainedSecret, String)>, TrustError> {
        let path = self.path(domain, "retained")?;
        let text = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let corrupt = |why: &str| TrustError::Corrupt {
            path: path.clone(),
            why: why.to_string(),
        };
        let text = std::str::from_utf8(&text).map_err(|_| corrupt("not text"))?;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (secret, key) = line.split_once(' ').unwrap_or((line, ""));
            let mut b = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(secret, &mut b[..])
                .map_err(|_| corrupt("a line is not 64 hex digits"))?;
            if !key.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(corrupt("a key fingerprint is not hex"));
            }
            out.push((RetainedSecret::from_bytes(*b), key.to_ascii_uppercase()));
        }
        out.truncate(MAX_KEPT);
        Ok(out)
    }

    /// The newest [`MAX_RETAINED`] retained secrets for `domain`, whichever key.
    pub fn retained(&self, domain: &str) -> Result<Vec<RetainedSecret>, TrustError> {
        let mut out: Vec<RetainedSecret> = self
            .retained_all(domain)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        out.truncate(MAX_RETAINED);
        Ok(out)
    }

    /// What the callee offers continuity with: the secrets of calls with the remote key
    /// `fingerprint` (and those of older files, which name no key), newest first. Each of
    /// a partner's relays, with its own key, has its own continuity with us.
    pub fn retained_for_key(
        &self,
        domain: &str,
        fingerprint: &str,
    ) -> Result<Vec<RetainedSecret>, TrustError> {
        let mut out: Vec<RetainedSecret> = self
            .retained_all(domain)?
            .into_iter()
            .filter(|(_, k)| k.is_empty() || k.eq_ignore_ascii_case(fingerprint))
            .map(|(s, _)| s)
            .collect();
        out.truncate(MAX_RETAINED);
        Ok(out)
    }

    /// What the caller offers before it knows which relay (which key) will answer: the
    /// newest secret of each remote key first (newest key first), then the newest others,
    /// [`MAX_RETAINED`] in all. Whichever of a partner's relays answers finds its own
    /// newest secret among them; with one relay this is its newest four, as before.
    pub fn retained_spread(&self, domain: &str) -> Result<Vec<RetainedSecret>, TrustError> {
        Ok(spread(self.retained_all(domain)?))
    }

    /// Keep `secret`, left by a call with the remote key `fingerprint`, as the newest
    /// retained secret for `domain`. At most [`MAX_RETAINED`] are kept per remote key and
    /// [`MAX_KEPT`] in all (the oldest go). Durable when this returns.
    ///
    /// Group-committed: every call set up stores one, and a burst of calls with one peer
    /// used to queue on its lock for a write and two fsyncs each. Now the secrets asked for
    /// while a write runs are all taken by the next one: one file write (and its fsyncs)
    /// per domain for the whole batch, in the order they were asked for.
    pub fn remember(
        &self,
        domain: &str,
        fingerprint: &str,
        secret: &RetainedSecret,
    ) -> Result<(), TrustError> {
        let ticket = self.retain(domain, fingerprint, secret)?;
        self.write_retained(ticket)
    }

    /// The first half of [`TrustStore::remember`], which does not block: `secret` is
    /// queued for the next write, and lookups find it from now on. The returned ticket is
    /// for [`TrustStore::write_retained`], which makes it durable.
    pub fn retain(
        &self,
        domain: &str,
        fingerprint: &str,
        secret: &RetainedSecret,
    ) -> Result<RetainTicket, TrustError> {
        let domain = check_domain(domain)?;
        let key: String = fingerprint
            .chars()
            .filter(char::is_ascii_hexdigit)
            .collect::<String>()
            .to_ascii_uppercase();
        let ticket = {
            let mut q = self.retain_queue.lock().unwrap_or_else(|p| p.into_inner());
            q.requested += 1;
            let t = q.requested;
            q.waiting.push((t, domain.clone(), key, secret.clone()));
            t
        };
        Ok(RetainTicket { ticket, domain })
    }

    /// Blocking: writes the secrets queued so far (`ticket`'s among them, unless an earlier
    /// write took it), with their fsyncs. Durable when this returns.
    pub fn write_retained(&self, ticket: RetainTicket) -> Result<(), TrustError> {
        let RetainTicket { ticket, domain } = ticket;
        let mut commit = self.retain_commit.lock().unwrap_or_else(|p| p.into_inner());
        if commit.done < ticket {
            // Ours is not written yet: write everything waiting, ours included.
            let (upto, batch) = {
                let mut q = self.retain_queue.lock().unwrap_or_else(|p| p.into_inner());
                let batch = std::mem::take(&mut q.waiting);
                q.writing = batch.clone();
                (q.requested, batch)
            };
            let mut domains: Vec<&str> = Vec::new();
            for (_, d, _, _) in &batch {
                if !domains.contains(&d.as_str()) {
                    domains.push(d);
                }
            }
            // Each domain's file written, fsynced and swapped in; then one fsync of
            // `state/` for them all (it used to be one per domain).
            let mut swapped = Vec::new();
            for d in domains {
                let mine = batch.iter().filter(|(_, bd, _, _)| bd == d);
                match self.remember_batch(d, mine.clone().map(|(_, _, k, s)| (k, s))) {
                    Ok(old) => swapped.push((d, old)),
                    Err(e) => {
                        for (t, _, _, _) in mine {
                            commit.failed.insert(*t, e.to_string());
                        }
                    }
                }
            }
            if !swapped.is_empty()
                && let Err(e) = self.sync_dir()
            {
                for (t, bd, _, _) in &batch {
                    if swapped.iter().any(|(d, _)| d == bd) {
                        commit.failed.insert(*t, e.to_string());
                    }
                }
                swapped.clear(); // unsettled: the old versions stay whole
            }
            for (_, old) in swapped {
                self.reuse.settle(old);
            }
            commit.done = upto;
            let mut q = self.retain_queue.lock().unwrap_or_else(|p| p.into_inner());
            q.writing.clear();
        }
        match commit.failed.remove(&ticket) {
            None => Ok(()),
            Some(why) => Err(TrustError::Io {
                path: self.path(&domain, "retained")?,
                source: std::io::Error::other(why),
            }),
        }
    }

    /// Adds `secrets` (oldest first) to `domain`'s retained secrets and writes the file
    /// (fsynced and swapped in; the caller fsyncs `state/` and settles the swap).
    fn remember_batch<'a>(
        &self,
        domain: &str,
        secrets: impl Iterator<Item = (&'a String, &'a RetainedSecret)>,
    ) -> Result<crate::reuse::Swapped, TrustError> {
        let _g = self.lock_for(domain);
        let path = self.path(domain, "retained")?;
        // A corrupt file is replaced: the secrets in it are unusable anyway.
        let mut list = self.retained_file(domain).unwrap_or_default();
        merge_retained(&mut list, secrets);
        let mut text = Zeroizing::new(String::with_capacity(107 * list.len()));
        for (s, k) in &list {
            text.push_str(&hex::encode(s.as_bytes()));
            if !k.is_empty() {
                text.push(' ');
                text.push_str(k);
            }
            text.push('\n');
        }
        self.write_swapped(&path, text.as_bytes())
    }

    /// Compare a presented key fingerprint (hex) with the pin.
    pub fn check_pin(&self, domain: &str, fingerprint: &str) -> Result<PinCheck, TrustError> {
        let path = self.path(domain, "pin")?;
        Ok(match self.read_line(&path)? {
            None => PinCheck::FirstUse,
            Some(p) if p.eq_ignore_ascii_case(fingerprint) => PinCheck::Same,
            Some(pinned) => PinCheck::Changed { pinned },
        })
    }

    /// Pin `fingerprint` for `domain` if nothing is pinned yet. Returns whether it pinned.
    pub fn pin_first_use(&self, domain: &str, fingerprint: &str) -> Result<bool, TrustError> {
        let _g = self.lock_for(domain);
        if self.check_pin(domain, fingerprint)? != PinCheck::FirstUse {
            return Ok(false);
        }
        let path = self.path(domain, "pin")?;
        self.write_atomic(
            &path,
            format!("{}\n", fingerprint.to_uppercase()).as_bytes(),
        )?;
        Ok(true)
    }

    /// `trust = "dnssec"`: the certificate last trusted from DNS for `domain` (binary), to
    /// check a changed key's certification by it.
    pub fn pinned_cert(&self, domain: &str) -> Result<Option<Vec<u8>>, TrustError> {
        let path = self.path(domain, "cert")?;
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keep the certificate trusted from DNS for `domain` (see [`TrustStore::pinned_cert`]).
    pub fn store_cert(&self, domain: &str, cert: &[u8]) -> Result<(), TrustError> {
        let _g = self.lock_for(domain);
        let path = self.path(domain, "cert")?;
        if fs::read(&path).is_ok_and(|old| old == cert) {
            return Ok(());
        }
        self.write_atomic(&path, cert)
    }

    /// `trust = "dnssec"`: a changed key that the pinned one certified becomes the pin.
    /// The retained secrets go, as with `sipmail trust accept`: they belong to the old key.
    pub fn repin(&self, domain: &str, fingerprint: &str) -> Result<(), TrustError> {
        let _g = self.lock_for(domain);
        let new = normalize_fingerprint(fingerprint)?;
        self.write_atomic(&self.path(domain, "pin")?, format!("{new}\n").as_bytes())?;
        self.remove(&self.path(domain, "retained")?)?;
        Ok(())
    }

    /// The keys waiting for acceptance for `domain`.
    pub fn pending(&self, domain: &str) -> Result<Vec<PendingKey>, TrustError> {
        let path = self.path(domain, "pin-pending")?;
        match fs::read_to_string(&path) {
            Ok(s) => Ok(s.lines().filter_map(PendingKey::parse).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keep a key that `domain` presented and proved but that was refused, for an operator
    /// to accept: every such key is kept (up to [`MAX_PENDING`]), with when it was first
    /// and last seen, how often, and from where. Only ever call this after the key's
    /// signature verified, and through a rate limit ([`WriteLimiter`]).
    pub fn record_pending(
        &self,
        domain: &str,
        fingerprint: &str,
        from: &str,
        now_unix: u64,
    ) -> Result<(), TrustError> {
        let _g = self.lock_for(domain);
        let fingerprint = normalize_fingerprint(fingerprint)?;
        let path = self.path(domain, "pin-pending")?;
        let mut set = self.pending(domain).unwrap_or_default();
        merge_pending(&mut set, &fingerprint, from, now_unix);
        let mut text = String::new();
        for k in &set {
            text.push_str(&format!(
                "{} {} {} {} {}\n",
                k.fingerprint,
                k.first_seen,
                k.last_seen,
                k.count,
                k.from.replace(char::is_whitespace, "")
            ));
        }
        self.write_atomic(&path, text.as_bytes())
    }

    /// `sipmail trust accept DOMAIN FINGERPRINT`: the named key, which must be pending,
    /// becomes the pin, and the other pending keys are dropped (the operator chose). The
    /// retained secrets are forgotten too: they belong to the old key's calls. Returns
    /// (old pin, new pin).
    pub fn accept_pending(
        &self,
        domain: &str,
        fingerprint: &str,
    ) -> Result<(Option<String>, String), TrustError> {
        let _g = self.lock_for(domain);
        let want = normalize_fingerprint(fingerprint)?;
        let pending_path = self.path(domain, "pin-pending")?;
        let pending = self.pending(domain)?;
        if pending.is_empty() {
            return Err(TrustError::NothingPending(domain.to_string()));
        }
        let Some(new) = pending
            .iter()
            .find(|k| k.fingerprint == want)
            .map(|k| k.fingerprint.clone())
        else {
            return Err(TrustError::NotPending {
                domain: domain.to_string(),
                fingerprint: want,
                pending: pending
                    .iter()
                    .map(|k| crate::keyring::format_fingerprint(&k.fingerprint))
                    .collect(),
            });
        };
        let pin_path = self.path(domain, "pin")?;
        let old = self.read_line(&pin_path)?;
        self.write_atomic(&pin_path, format!("{new}\n").as_bytes())?;
        self.remove(&pending_path)?;
        self.remove(&self.path(domain, "retained")?)?;
        Ok((old, new))
    }

    /// `sipmail trust reset`: forget everything about `domain` (pin, pending key, retained
    /// secrets). The next call is a first call again. Returns whether anything was removed.
    pub fn reset(&self, domain: &str) -> Result<bool, TrustError> {
        let _g = self.lock_for(domain);
        let mut any = false;
        for ext in ["pin", "pin-pending", "retained", "cert"] {
            any |= self.remove(&self.path(domain, ext)?)?;
        }
        Ok(any)
    }

    /// The state of every peer that has any.
    pub fn list(&self) -> Result<Vec<PeerState>, TrustError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut domains: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                ["retained", "pin", "pin-pending"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(&format!(".{ext}")).map(str::to_string))
            })
            .collect();
        domains.sort();
        domains.dedup();
        domains
            .into_iter()
            .map(|d| {
                Ok(PeerState {
                    retained: self.retained(&d).map(|v| v.len()).unwrap_or(0),
                    pinned: self.read_line(&self.path(&d, "pin")?)?,
                    pending: self.pending(&d)?,
                    domain: d,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn retained_secrets_keep_the_newest_four_privately() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        assert!(s.retained("site-b.test").unwrap().is_empty());
        for i in 1..=6u8 {
            s.remember("site-b.test", "AB12", &RetainedSecret::from_bytes([i; 32]))
                .unwrap();
        }
        let got = s.retained("SITE-B.test").unwrap();
        let firsts: Vec<u8> = got.iter().map(|r| r.as_bytes()[0]).collect();
        assert_eq!(firsts, vec![6, 5, 4, 3]);
        let path = dir.path().join("state/site-b.test.retained");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path().join("state")).unwrap().count(), 1);
        // The rewrites reused one inode, kept emptied beside state/: no secret is left
        // in it, and the daemon's start removes it.
        let kept: Vec<_> = fs::read_dir(dir.path().join("state-tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(fs::metadata(&kept[0]).unwrap().len(), 0);
        s.clear_tmp();
        assert_eq!(
            fs::read_dir(dir.path().join("state-tmp")).unwrap().count(),
            0
        );
        fs::write(&path, "not hex\n").unwrap();
        assert!(matches!(
            s.retained("site-b.test"),
            Err(TrustError::Corrupt { .. })
        ));
        assert!(s.path("../evil", "pin").is_err());
    }

    /// Calls set up at once store their secrets in shared writes: every one is kept, for
    /// several domains at once, each caller returns only once its own is written, and a
    /// write that fails is reported to each caller whose secret it carried.
    #[test]
    fn secrets_stored_at_once_share_writes_and_all_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(TrustStore::new(dir.path()));
        let threads: Vec<_> = (0..16u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let domain = if i % 2 == 0 { "b.test" } else { "c.test" };
                    let key = format!("{:02X}", i / 2);
                    s.remember(domain, &key, &RetainedSecret::from_bytes([i; 32]))
                        .unwrap();
                    // Durable when it returns: our own secret is on file.
                    assert!(s.retained_for_key(domain, &key).unwrap()[0].as_bytes()[0] == i);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for (domain, parity) in [("b.test", 0u8), ("c.test", 1)] {
            let mut got: Vec<u8> = s
                .retained(domain)
                .unwrap()
                .iter()
                .map(|r| r.as_bytes()[0])
                .collect();
            let file = dir.path().join(format!("state/{domain}.retained"));
            let all = fs::read_to_string(file).unwrap().lines().count();
            assert_eq!(all, 8, "{domain}: every call's secret is kept");
            got.sort();
            assert!(got.iter().all(|b| b % 2 == parity), "{domain}: {got:?}");
        }
        // A write that cannot happen: the error reaches the caller, named.
        fs::remove_dir_all(dir.path().join("state")).unwrap();
        fs::write(dir.path().join("state"), "a file, not a folder").unwrap();
        let e = s
            .remember("b.test", "01", &RetainedSecret::from_bytes([99; 32]))
            .unwrap_err();
        assert!(e.to_string().contains("b.test.retained"), "{e}");
    }

    #[test]
    fn each_remote_key_keeps_its_own_continuity() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        let path = dir.path().join("state/b.test.retained");
        // A file of an older version: no key named; it counts for every key.
        fs::create_dir_all(dir.path().join("state")).unwrap();
        fs::write(&path, format!("{}\n", hex::encode([9u8; 32]))).unwrap();
        let r = |b: u8| RetainedSecret::from_bytes([b; 32]);
        let firsts = |v: Vec<RetainedSecret>| v.iter().map(|x| x.as_bytes()[0]).collect::<Vec<_>>();
        // Relay B1 (key AA..) answers five calls, then B2 (key BB..) one.
        for i in 1..=5u8 {
            s.remember("b.test", "aa11", &r(i)).unwrap();
        }
        s.remember("b.test", "BB22", &r(20)).unwrap();
        // B1's newest four are kept (its fifth went); the older-version line counts for
        // every key.
        assert_eq!(
            firsts(s.retained_for_key("b.test", "AA11").unwrap()),
            [5, 4, 3, 2]
        );
        assert_eq!(
            firsts(s.retained_for_key("b.test", "BB22").unwrap()),
            [20, 9]
        );
        // A caller offers each key's newest first: B1 and B2 both find theirs.
        assert_eq!(firsts(s.retained_spread("b.test").unwrap()), [20, 5, 9, 4]);
        // The newest overall, as before.
        assert_eq!(firsts(s.retained("b.test").unwrap()), [20, 5, 4, 3]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!("{} BB22\n", hex::encode([20u8; 32]))),
            "{text}"
        );
        // More keys than MAX_KEPT holds: the oldest lines go.
        for k in 0..20u8 {
            s.remember("b.test", &format!("{k:02X}"), &r(100 + k))
                .unwrap();
        }
        assert_eq!(s.retained_all("b.test").unwrap().len(), MAX_KEPT);
        fs::write(&path, format!("{} not-hex\n", hex::encode([1u8; 32]))).unwrap();
        assert!(matches!(
            s.retained("b.test"),
            Err(TrustError::Corrupt { .. })
        ));
    }

    /// The next call must find the last call's secret while its write is still running
    /// (the call does not wait for it): a queued secret is found before it is written, and
    /// the file gets it once it is.
    #[test]
    fn a_queued_secret_is_found_before_its_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        let r = |b: u8| RetainedSecret::from_bytes([b; 32]);
        let firsts = |v: Vec<RetainedSecret>| v.iter().map(|x| x.as_bytes()[0]).collect::<Vec<_>>();
        s.remember("b.test", "AA11", &r(1)).unwrap();
        let t2 = s.retain("B.test.", "aa11", &r(2)).unwrap();
        let t3 = s.retain("b.test", "BB22", &r(3)).unwrap();
        // Found by every lookup, newest first, not yet on disk.
        assert_eq!(firsts(s.retained("b.test").unwrap()), [3, 2, 1]);
        assert_eq!(
            firsts(s.retained_for_key("b.test", "AA11").unwrap()),
            [2, 1]
        );
        assert_eq!(firsts(s.retained_spread("b.test").unwrap()), [3, 2, 1]);
        assert!(s.retained("c.test").unwrap().is_empty());
        let on_disk = || TrustStore::new(dir.path()).retained("b.test").unwrap();
        assert_eq!(firsts(on_disk()), [1]);
        // One write takes both (group commit); the second finds its ticket done.
        s.write_retained(t3).unwrap();
        assert_eq!(firsts(on_disk()), [3, 2, 1]);
        s.write_retained(t2).unwrap();
        assert_eq!(firsts(s.retained("b.test").unwrap()), [3, 2, 1]);
        let q = s.retain_queue.lock().unwrap();
        assert!(q.waiting.is_empty() && q.writing.is_empty(), "{q:?}");
    }

    #[test]
    fn pins_change_only_through_accept_or_reset() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        let (aa, bb, cc) = ("AA".repeat(20), "BB".repeat(20), "CC".repeat(20));
        assert_eq!(s.check_pin("b.test", &aa).unwrap(), PinCheck::FirstUse);
        assert!(s.pin_first_use("b.test", &aa.to_lowercase()).unwrap());
        assert!(!s.pin_first_use("b.test", &bb).unwrap());
        assert_eq!(s.check_pin("b.test", &aa).unwrap(), PinCheck::Same);
        assert_eq!(
            s.check_pin("b.test", &bb).unwrap(),
            PinCheck::Changed { pinned: aa.clone() }
        );
        assert!(matches!(
            s.accept_pending("b.test", &bb),
            Err(TrustError::NothingPending(_))
        ));
        s.record_pending("b.test", &bb, "192.0.2.1", 100).unwrap();
        s.record_pending("b.test", &cc, "192.0.2.9", 150).unwrap();
        s.record_pending("b.test", &bb.to_lowercase(), "192.0.2.2", 200)
            .unwrap();
        s.remember("b.test", "", &RetainedSecret::from_bytes([1; 32]))
            .unwrap();
        let l = s.list().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].pinned.as_deref(), Some(aa.as_str()));
        assert_eq!(l[0].retained, 1);
        assert_eq!(
            l[0].pending[0],
            PendingKey {
                fingerprint: bb.clone(),
                first_seen: 100,
                last_seen: 200,
                count: 2,
                from: "192.0.2.2".into()
            }
        );
        assert_eq!(l[0].pending[1].fingerprint, cc);
        // Not pending: refused, naming what is.
        let e = s.accept_pending("b.test", &"DD".repeat(20)).unwrap_err();
        assert!(matches!(e, TrustError::NotPending { .. }), "{e}");
        let (fb, fc) = (
            crate::keyring::format_fingerprint(&bb),
            crate::keyring::format_fingerprint(&cc),
        );
        assert!(
            e.to_string().contains(&fb) && e.to_string().contains(&fc),
            "{e}"
        );
        assert!(matches!(
            s.accept_pending("b.test", "BB"),
            Err(TrustError::BadFingerprint(_))
        ));
        assert_eq!(s.check_pin("b.test", &aa).unwrap(), PinCheck::Same);
        // Named, with spaces as `keys fingerprint` prints it: accepted.
        let spaced = crate::keyring::format_fingerprint(&cc);
        assert_eq!(
            s.accept_pending("b.test", &spaced).unwrap(),
            (Some(aa.clone()), cc.clone())
        );
        assert_eq!(s.check_pin("b.test", &cc).unwrap(), PinCheck::Same);
        assert!(s.retained("b.test").unwrap().is_empty());
        assert!(s.pending("b.test").unwrap().is_empty());
        assert!(s.reset("b.test").unwrap());
        assert_eq!(s.check_pin("b.test", &cc).unwrap(), PinCheck::FirstUse);
        assert!(!s.reset("b.test").unwrap());
    }

    #[test]
    fn the_pending_set_is_bounded_and_keeps_the_fresh_ones() {
        let mut set = Vec::new();
        for i in 0..MAX_PENDING as u64 {
            merge_pending(&mut set, &format!("{i:040X}"), "x", 10 + i);
        }
        // The partner's key (key 0) is seen again: fresh.
        merge_pending(&mut set, &format!("{:040X}", 0), "y", 100);
        // A new key replaces the least recently seen (key 1), not the partner's.
        merge_pending(&mut set, &"EE".repeat(20), "z", 101);
        assert_eq!(set.len(), MAX_PENDING);
        assert!(set.iter().any(|k| k.fingerprint == format!("{:040X}", 0)));
        assert!(!set.iter().any(|k| k.fingerprint == format!("{:040X}", 1)));
        // An older file's bare fingerprint line still reads.
        let k = PendingKey::parse(&"ab".repeat(20)).unwrap();
        assert_eq!((k.fingerprint, k.count), ("AB".repeat(20), 1));
        assert!(PendingKey::parse("garbage").is_none());
    }

    #[test]
    fn trust_state_writes_are_rate_limited_per_peer() {
        let t0 = std::time::Instant::now();
        let mut l = WriteLimiter::default();
        let allowed = (0..100).filter(|_| l.allow("a.test", t0)).count();
        assert_eq!(allowed, 4, "a burst of 4");
        assert!(l.allow("b.test", t0), "another peer has its own budget");
        let later = t0 + std::time::Duration::from_secs(60);
        assert!(l.allow("a.test", later));
        assert!(!l.allow("a.test", later));
    }

    #[test]
    fn first_use_pins_only_calls_we_placed_or_from_the_peers_address() {
        use OpportunisticDecision::*;
        assert_eq!(
            opportunistic_decision(PinCheck::FirstUse, true, false),
            Proceed
        );
        assert_eq!(
            opportunistic_decision(PinCheck::FirstUse, false, true),
            Proceed
        );
        assert_eq!(
            opportunistic_decision(PinCheck::FirstUse, false, false),
            Hold(HoldReason::FirstUseFromElsewhere)
        );
        assert_eq!(
            opportunistic_decision(PinCheck::Same, false, false),
            Proceed
        );
        assert_eq!(
            opportunistic_decision(
                PinCheck::Changed {
                    pinned: "AA".into()
                },
                true,
                true
            ),
            Hold(HoldReason::Changed {
                pinned: "AA".into()
            })
        );
    }

    #[test]
    fn continuity_refuses_only_problems_under_require() {
        use ContinuityDecision::*;
        use ContinuityPolicy::{Require, Warn as W};
        let none = |peer_has| Continuity::NoneHeld { peer_has };
        for (c, warn, require) in [
            (Continuity::Matched, Fine, Fine),
            (none(false), Fine, Fine),
            (none(true), LostLocal, LostLocal),
            (Continuity::PeerHasNone, Warn, Refuse),
            (Continuity::Mismatch, Warn, Refuse),
        ] {
            assert_eq!(continuity_decision(c, W), warn, "{c}");
            assert_eq!(continuity_decision(c, Require), require, "{c}");
        }
    }
}
