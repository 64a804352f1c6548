//! Group commit of one file's or one directory's fsync, for writers on blocking threads.
//!
//! A writer that needs its write durable takes a ticket after the write and then waits
//! for an fsync that *started* after its ticket was taken: while one fsync runs, the
//! writers that arrive share the next one, so N concurrent writers cost about two fsyncs
//! instead of N. Used by the spool (the `queue/` directory after a commit's renames) and
//! by the receipt store (its record logs, the delivered logs and the call journal).
//! [`fsync_dir`] is the directory fsync itself, for every module that makes a name
//! durable.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Tickets taken so far (one per write to cover).
    requested: AtomicU64,
    /// The highest ticket known durable; the lock also serialises the fsyncs.
    synced: Mutex<u64>,
    /// The same value, readable without the lock.
    durable: AtomicU64,
}

impl GroupCommit {
    /// Call after the write this sync must cover: `fsync` runs unless one that started
    /// after the write already covered it.
    pub fn sync_with(&self, fsync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= ticket {
            return Ok(()); // an fsync that started after our write covered it
        }
        let covers = self.requested.load(Ordering::SeqCst);
        fsync()?;
        *synced = covers;
        self.durable.store(covers, Ordering::SeqCst);
        Ok(())
    }

    /// Tickets taken so far. Read after a change: once [`GroupCommit::durable`] is greater,
    /// an fsync that started after the change has completed.
    pub fn requested(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// The highest ticket an fsync has covered.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }
}

/// fsync a directory: the names created, renamed or removed in it so far are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
