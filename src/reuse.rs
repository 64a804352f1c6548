//! Files rewritten atomically without creating or unlinking an inode each time.
//!
//! The usual atomic rewrite (write a new file, fsync it, rename it over the old one)
//! creates one inode and unlinks one per write. On ext4 without a journal (this machine's
//! spool disk), every inode created scans past the inodes unlinked in the last seconds
//! (`find_inode_bit`, `recently_deleted`): in the call set-up bench that scan took a third
//! of all samples (docs/PERFORMANCE.md, run 10). Used for the sent receipt records (rewritten
//! once per message, when its delivered receipt comes) and the retained secrets of
//! `relay::trust` (rewritten at each call). Here the new file is
//! swapped with the old
//! one (`renameat2(RENAME_EXCHANGE)`, as atomic as a rename), and the old inode, now at
//! the temporary name, is emptied and kept for the next write. Where the target does not
//! exist yet, or the file system has no `RENAME_EXCHANGE`, it is a plain rename.
//!
//! The old inode is emptied only once the caller has fsynced the directory
//! ([`Reuse::settle`]): until the swap is durable, a power loss can leave the directory on
//! disk naming the old inode as the file, and that inode must then still hold the old
//! version whole (an emptied one would read as "no pin" or "no retained secrets").
//!
//! The temporary names live in a directory the owner clears when it opens (a crash may
//! leave them behind; their content is never read).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// At most this many emptied inodes are kept; more are unlinked.
const KEPT: usize = 64;

/// Emptied files (temporary names) whose inodes the next writes take.
#[derive(Debug, Default)]
pub struct Reuse(Mutex<Vec<PathBuf>>);

impl Reuse {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A file to write the next version into, opened for writing and empty: a kept one,
    /// or else what `create` makes.
    pub fn take_or(
        &self,
        create: impl FnOnce() -> io::Result<(PathBuf, fs::File)>,
    ) -> io::Result<(PathBuf, fs::File)> {
        match self.take() {
            Some(kept) => Ok(kept),
            None => create(),
        }
    }

    /// A kept file to write the next version into, opened for writing (empty), or `None`.
    fn take(&self) -> Option<(PathBuf, fs::File)> {
        loop {
            let p = self.lock().pop()?;
            if let Ok(f) = fs::OpenOptions::new().write(true).truncate(true).open(&p) {
                return Some((p, f));
            }
        }
    }

    /// Puts the written (and, where it must be, fsynced) file `tmp` in place of
    /// `target`, atomically. The old version's inode, now at `tmp`, is left whole: give
    /// the result to [`settle`](Self::settle) after the directory's fsync.
    pub fn put(&self, tmp: &Path, target: &Path) -> io::Result<Swapped> {
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, tmp, cwd, target, rustix::fs::RenameFlags::EXCHANGE) {
            Ok(()) => Ok(Swapped(Some(tmp.to_path_buf()))),
            // Nothing to swap with (a first version), or no RENAME_EXCHANGE here.
            Err(_) => fs::rename(tmp, target).map(|()| Swapped(None)),
        }
    }

    /// The swap is durable (the directory was fsynced), or need not be: the old version's
    /// inode is emptied at once (it may hold secrets) and kept for the next write.
    pub fn settle(&self, swapped: Swapped) {
        let Some(old) = swapped.0 else {
            return;
        };
        let emptied = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&old)
            .is_ok();
        let mut kept = self.lock();
        if emptied && kept.len() < KEPT {
            kept.push(old);
        } else {
            drop(kept);
            let _ = fs::remove_file(old);
        }
    }
}

/// The old version's inode after [`Reuse::put`], still whole at its temporary name until
/// [`Reuse::settle`]. Dropped unsettled (the directory's fsync failed), it stays there,
/// unread, until the owner clears its temporary directory.
#[must_use = "settle it after the directory's fsync"]
#[derive(Debug)]
pub struct Swapped(Option<PathBuf>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A rewrite swaps in the new bytes and gives its old inode, emptied, to the next
    /// write: no inode is created or unlinked per rewrite.
    #[test]
    fn a_rewrite_swaps_and_its_old_inode_serves_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reuse::default();
        let (tmp, a, b) = (
            dir.path().join("t1"),
            dir.path().join("a"),
            dir.path().join("b"),
        );
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let write = |r: &Reuse, target: &Path, bytes: &[u8], fresh: &Path| {
            let (p, mut f) = r
                .take_or(|| Ok((fresh.to_path_buf(), fs::File::create(fresh)?)))
                .unwrap();
            f.write_all(bytes).unwrap();
            drop(f);
            let old = r.put(&p, target).unwrap();
            r.settle(old);
        };
        write(&r, &a, b"first", &tmp);
        let first = ino(&a);
        assert!(r.take().is_none(), "a first version is a plain rename");
        write(&r, &a, b"second, longer", &dir.path().join("t2"));
        assert_eq!(fs::read(&a).unwrap(), b"second, longer");
        assert_ne!(ino(&a), first);
        // The old inode is kept, empty, and written by the next file.
        assert_eq!(r.lock().len(), 1);
        assert_eq!(fs::metadata(&r.lock()[0]).unwrap().len(), 0);
        write(&r, &b, b"b", &dir.path().join("t3"));
        assert_eq!(ino(&b), first);
        assert_eq!(fs::read(&b).unwrap(), b"b");
        assert!(r.lock().is_empty());
        write(&r, &b, b"b2", &dir.path().join("t4"));
        write(&r, &a, b"a3", &dir.path().join("t5"));
        assert_eq!(fs::read(&a).unwrap(), b"a3");
        assert_eq!(fs::read(&b).unwrap(), b"b2");
    }

    /// Until the caller settles the swap (after fsyncing the directory), the old inode
    /// keeps the old version whole: a power loss before that fsync may leave the
    /// directory on disk naming it as the file. (Seen failing when `put` emptied it at
    /// once: the old version read back empty.)
    #[test]
    fn the_old_version_stays_whole_until_the_swap_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reuse::default();
        let target = dir.path().join("pin");
        fs::write(&target, b"OLD-FINGERPRINT\n").unwrap();
        let old_ino = fs::metadata(&target).unwrap().ino();
        let tmp = dir.path().join("t1");
        fs::write(&tmp, b"NEW-FINGERPRINT\n").unwrap();
        let swapped = r.put(&tmp, &target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"NEW-FINGERPRINT\n");
        // The old inode, at the temporary name: still the whole old version.
        assert_eq!(fs::metadata(&tmp).unwrap().ino(), old_ino);
        assert_eq!(fs::read(&tmp).unwrap(), b"OLD-FINGERPRINT\n");
        assert!(r.take().is_none(), "not reusable before it is settled");
        r.settle(swapped);
        assert_eq!(fs::metadata(&tmp).unwrap().len(), 0, "emptied once settled");
        let (p, _) = r.take().expect("kept for the next write");
        assert_eq!(p, tmp);
    }
}
