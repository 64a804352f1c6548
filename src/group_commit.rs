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

/// [`fsync_dir`] as a group commit shared by every writer of this process that names
/// files in `dir` (call it after the link or rename it must make durable): concurrent
/// writers (Maildir deliveries on several lanes, the audit records of calls set up at
/// once) share one fsync of the folder instead of one each. Blocking.
pub fn fsync_dir_shared(dir: &Path) -> io::Result<()> {
    dir_commit(dir).sync_with(|| fsync_dir(dir))
}

/// The one group commit of `dir` in this process. The table keeps a folder's entry while
/// a writer holds it; it is pruned when it grows (a new audit folder each day).
fn dir_commit(dir: &Path) -> std::sync::Arc<GroupCommit> {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Arc, OnceLock};
    const PRUNE_ABOVE: usize = 64;
    static DIRS: OnceLock<Mutex<HashMap<PathBuf, Arc<GroupCommit>>>> = OnceLock::new();
    let mut dirs = DIRS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = dirs.get(dir) {
        return c.clone();
    }
    if dirs.len() >= PRUNE_ABOVE {
        dirs.retain(|_, c| Arc::strong_count(c) > 1);
    }
    let c = Arc::new(GroupCommit::default());
    dirs.insert(dir.to_path_buf(), c.clone());
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Writers of one folder share its group commit, so that while one fsync runs the
    /// others wait for one more, not one each; another folder has its own.
    #[test]
    fn writers_of_one_folder_share_its_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        assert!(Arc::ptr_eq(&dir_commit(&a), &dir_commit(&a)));
        assert!(!Arc::ptr_eq(&dir_commit(&a), &dir_commit(&b)));
        let fsyncs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (a, fsyncs) = (a.clone(), fsyncs.clone());
                std::thread::spawn(move || {
                    dir_commit(&a)
                        .sync_with(|| {
                            fsyncs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok(())
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = fsyncs.load(Ordering::SeqCst);
        assert!((1..16).contains(&n), "{n} fsyncs for 16 writers");
        std::fs::create_dir(&a).unwrap();
        fsync_dir_shared(&a).unwrap();
        assert!(fsync_dir_shared(&dir.path().join("gone")).is_err());
    }
}
