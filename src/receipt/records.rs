//! Keyed records in append-only segment files: the sender's receipt records
//! (`receipts/sent/`) and the receiver's duplicate records (`receipts/dedup/`). Blocking
//! `std::fs`, run on the blocking pool; [`super::store`] is its only user.
//!
//! Why not one file per record (as before): every record was a new inode, a rename and a
//! directory fsync, and a sent record was rewritten (another rename and two fsyncs) when
//! its delivered receipt came. On ext4 each new inode also scans past the inodes freed in
//! the last minutes. With a log a record is one `write` to an open file, and its
//! durability one group-committed `fdatasync` shared by every writer waiting at the time
//! (docs/PERFORMANCE.md, run 11).
//!
//! Layout: `<dir>/<segment>.log`, `<segment>` a decimal sequence number. Each line is
//! `{"key":…,"at":…,"rec":…}` (compact JSON, `at` in Unix milliseconds) and ends in `\n`;
//! the newest line of a key is its record. A segment is closed (fdatasynced) once it
//! passes [`SEGMENT_MAX`] and a new one started (its directory entry fsynced).
//!
//! Crash: a line is durable once an fdatasync that started after it was written has
//! returned ([`RecordLog::sync`]). A crash can leave the last segment with a torn or
//! zeroed tail; a line that does not parse is skipped when the segments are read, and a
//! writer closes a torn tail with `\n` before its first line. Nothing written before a
//! completed fdatasync can be lost, so a skipped line is always one nobody was told is
//! durable: the older line of the same key (if any) is then the record, exactly as if the
//! write had not happened.
//!
//! Memory: the index holds 16 bytes of location per key under a 64-bit keyed hash of the
//! key (not the key itself): about 30 bytes per record kept. A read checks the key it
//! finds; the rare other key under the same hash is found by scanning the segments.

use crate::group_commit::GroupCommit;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A segment is closed once it is larger than this.
pub(crate) const SEGMENT_MAX: u64 = 32 << 20;

/// Where a key's newest line is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u32,
    off: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    file: Arc<fs::File>,
    /// The newest `at` of its lines (pruning drops a segment whose newest line is old).
    newest_at: u64,
    /// Bytes read into the index so far, up to the end of the last whole line (a reader
    /// follows a running writer from there).
    read: u64,
}

#[derive(Debug)]
struct State {
    index: HashMap<u64, Loc>,
    segments: BTreeMap<u32, Segment>,
    /// The segment appended to and its length (writable logs only).
    current: Option<(u32, u64)>,
    /// The last append may have left a partial line: close it before the next.
    torn: bool,
}

#[derive(Serialize)]
struct LineOut<'a, T> {
    key: &'a str,
    at: u64,
    rec: &'a T,
}

#[derive(Deserialize)]
struct LineIn<T> {
    key: String,
    at: u64,
    rec: T,
}

#[derive(Deserialize)]
struct Head {
    key: String,
    at: u64,
}

/// One directory of keyed records (see the module's documentation).
#[derive(Debug)]
pub(crate) struct RecordLog {
    dir: PathBuf,
    writable: bool,
    segment_max: u64,
    hasher: std::collections::hash_map::RandomState,
    /// Read from the segments on first use (a read-only user pays only if it reads).
    state: Mutex<Option<State>>,
    sync: GroupCommit,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

impl RecordLog {
    /// The records in `dir`. A `writable` log creates `dir` and its first segment, closes
    /// a torn tail, and appends; a read-only one (the CLI, while the daemon may run) never
    /// changes a file.
    pub(crate) fn new(dir: PathBuf, writable: bool) -> RecordLog {
        RecordLog::with_segment_max(dir, writable, SEGMENT_MAX)
    }

    pub(crate) fn with_segment_max(dir: PathBuf, writable: bool, segment_max: u64) -> RecordLog {
        RecordLog {
            dir,
            writable,
            segment_max,
            hasher: Default::default(),
            state: Mutex::new(None),
            sync: GroupCommit::default(),
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn seg_path(&self, seg: u32) -> PathBuf {
        self.dir.join(format!("{seg}.log"))
    }

    /// The segment numbers present, in order.
    fn list_segments(&self) -> io::Result<Vec<u32>> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.writable => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut segs: Vec<u32> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let num = n.strip_suffix(".log")?;
                (num.bytes().all(|b| b.is_ascii_digit()) && !num.is_empty())
                    .then(|| num.parse().ok())?
            })
            .collect();
        segs.sort_unstable();
        Ok(segs)
    }

    /// Every complete line of `bytes` that parses as a record head, with its offset and
    /// length (without the `\n`); and how many lines did not parse.
    fn lines(bytes: &[u8]) -> (Vec<(Head, u64, u32)>, usize) {
        let (mut out, mut skipped, mut off) = (Vec::new(), 0, 0usize);
        while let Some(n) = bytes[off..].iter().position(|&b| b == b'\n') {
            let line = &bytes[off..off + n];
            match serde_json::from_slice::<Head>(line) {
                Ok(h) if u32::try_from(n).is_ok() => out.push((h, off as u64, n as u32)),
                _ if line.is_empty() || line.iter().all(|&b| b == 0) => {}
                _ => skipped += 1,
            }
            off += n + 1;
        }
        (out, skipped)
    }

    fn load(&self) -> io::Result<State> {
        if self.writable {
            fs::create_dir_all(&self.dir)?;
        }
        let mut st = State {
            index: HashMap::new(),
            segments: BTreeMap::new(),
            current: None,
            torn: false,
        };
        self.refresh(&mut st)?;
        if self.writable {
            match st.segments.iter().next_back() {
                Some((&seg, s)) => {
                    let len = s.file.metadata()?.len();
                    st.current = Some((seg, len));
                    st.torn = s.read < len; // a partial last line
                }
                None => self.start_segment(&mut st, 1)?,
            }
        }
        Ok(st)
    }

    /// Index what was written since the last call: new segments, and new whole lines of
    /// the ones known (a reader follows the writer; the writer calls it once, at load).
    fn refresh(&self, st: &mut State) -> io::Result<()> {
        let segs = self.list_segments()?;
        let last = segs.last().copied();
        for seg in segs {
            if st.segments.keys().next_back().is_some_and(|&k| seg < k) {
                continue; // older than the newest known: complete when it was read
            }
            let path = self.seg_path(seg);
            let s = match st.segments.entry(seg) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let file = if self.writable && Some(seg) == last {
                        fs::OpenOptions::new().read(true).append(true).open(&path)?
                    } else {
                        match fs::File::open(&path) {
                            Ok(f) => f,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // pruned
                            Err(e) => return Err(e),
                        }
                    };
                    v.insert(Segment {
                        file: Arc::new(file),
                        newest_at: 0,
                        read: 0,
                    })
                }
            };
            let len = s.file.metadata()?.len();
            if len <= s.read {
                continue;
            }
            let mut bytes = vec![0u8; (len - s.read) as usize];
            s.file.read_exact_at(&mut bytes, s.read)?;
            let (lines, skipped) = Self::lines(&bytes);
            if skipped > 0 {
                tracing::warn!(file = %path.display(), lines = skipped,
                    "receipt records: lines that do not parse were skipped (a write cut by a crash, or damage); the older record of their key, if any, stands");
            }
            let base = s.read;
            let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            s.read += end as u64;
            for (h, off, len) in lines {
                s.newest_at = s.newest_at.max(h.at);
                st.index.insert(
                    self.hash(&h.key),
                    Loc {
                        seg,
                        off: base + off,
                        len,
                    },
                );
            }
        }
        Ok(())
    }

    fn start_segment(&self, st: &mut State, seg: u32) -> io::Result<()> {
        let path = self.seg_path(seg);
        let file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        // The new name must survive a crash before any line in it counts as durable.
        crate::group_commit::fsync_dir(&self.dir)?;
        st.segments.insert(
            seg,
            Segment {
                file: Arc::new(file),
                newest_at: 0,
                read: 0,
            },
        );
        st.current = Some((seg, 0));
        st.torn = false;
        Ok(())
    }

    fn state(&self) -> io::Result<MutexGuard<'_, Option<State>>> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            None => *g = Some(self.load()?),
            // A reader sees what the writer (another process) added since.
            Some(st) if !self.writable => self.refresh(st)?,
            Some(_) => {}
        }
        Ok(g)
    }

    /// Read the segments now (a writable log: create its first one).
    pub(crate) fn open(&self) -> io::Result<()> {
        self.state().map(drop)
    }

    /// The record of `key`, if any.
    pub(crate) fn get<T: for<'a> Deserialize<'a>>(&self, key: &str) -> io::Result<Option<T>> {
        let (loc, file) = {
            let g = self.state()?;
            let st = g.as_ref().expect("loaded");
            let Some(loc) = st.index.get(&self.hash(key)).copied() else {
                return Ok(None);
            };
            let file = st.segments.get(&loc.seg).map(|s| s.file.clone());
            (loc, file)
        };
        let path = self.seg_path(loc.seg);
        let Some(file) = file else {
            return Ok(None);
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.off)?;
        let line: LineIn<T> = serde_json::from_slice(&buf).map_err(|e| bad(&path, e))?;
        if line.key == key {
            return Ok(Some(line.rec));
        }
        // Another key under the same 64-bit hash: find ours the slow way.
        Ok(self.scan::<T>()?.remove(key).map(|(_, rec)| rec))
    }

    /// Whether `key` has a record.
    pub(crate) fn contains(&self, key: &str) -> io::Result<bool> {
        let g = self.state()?;
        Ok(g.as_ref()
            .expect("loaded")
            .index
            .contains_key(&self.hash(key)))
    }

    /// Append `rec` as the record of `key`; with `durable`, return once it is on disk
    /// (group-committed). Without, a crash of the machine may lose it; a crash of the
    /// process may not (it is in the page cache).
    pub(crate) fn put<T: Serialize>(
        &self,
        key: &str,
        rec: &T,
        at_ms: u64,
        durable: bool,
    ) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.dir.display()),
            ));
        }
        let mut line = serde_json::to_vec(&LineOut {
            key,
            at: at_ms,
            rec,
        })
        .map_err(io::Error::other)?;
        line.push(b'\n');
        let len = u32::try_from(line.len() - 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        {
            let mut g = self.state()?;
            let st = g.as_mut().expect("loaded");
            let (mut seg, mut off) = st.current.expect("a writable log has a segment");
            if off > 0 && off + line.len() as u64 > self.segment_max {
                // Close the full segment: its lines are durable before the next one
                // starts, so a sync of the new one covers every earlier line.
                st.segments[&seg].file.sync_data()?;
                self.start_segment(st, seg + 1)?;
                (seg, off) = (seg + 1, 0);
            }
            let file = st.segments[&seg].file.clone();
            if st.torn {
                (&*file).write_all(b"\n")?;
                off += 1;
                st.current = Some((seg, off));
                st.torn = false;
            }
            if let Err(e) = (&*file).write_all(&line) {
                // Part of the line may be in the file: the next writer closes it.
                st.torn = true;
                st.current = Some((seg, file.metadata().map_or(off, |m| m.len())));
                return Err(e);
            }
            st.current = Some((seg, off + line.len() as u64));
            st.index.insert(self.hash(key), Loc { seg, off, len });
            let s = st.segments.get_mut(&seg).expect("current segment");
            s.newest_at = s.newest_at.max(at_ms);
        }
        if durable { self.sync() } else { Ok(()) }
    }

    /// Make every line written so far durable (group-committed).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.sync.sync_with(|| {
            let file = {
                let g = self.state()?;
                let st = g.as_ref().expect("loaded");
                match st.current {
                    Some((seg, _)) => st.segments[&seg].file.clone(),
                    None => return Ok(()),
                }
            };
            file.sync_data()
        })
    }

    /// Make `key`'s record durable if it is in the open segment (closed segments were
    /// fdatasynced when they were closed).
    pub(crate) fn sync_key(&self, key: &str) -> io::Result<()> {
        let current = {
            let g = self.state()?;
            let st = g.as_ref().expect("loaded");
            match (st.index.get(&self.hash(key)), st.current) {
                (Some(loc), Some((seg, _))) => loc.seg == seg,
                _ => false,
            }
        };
        if current { self.sync() } else { Ok(()) }
    }

    /// Every key's newest record with its `at`, read from the files (not the index).
    pub(crate) fn scan<T: for<'a> Deserialize<'a>>(
        &self,
    ) -> io::Result<BTreeMap<String, (u64, T)>> {
        let mut out = BTreeMap::new();
        for seg in self.list_segments()? {
            let path = self.seg_path(seg);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for (_, off, len) in Self::lines(&bytes).0 {
                let l = &bytes[off as usize..off as usize + len as usize];
                if let Ok(line) = serde_json::from_slice::<LineIn<T>>(l) {
                    out.insert(line.key, (line.at, line.rec));
                }
            }
        }
        Ok(out)
    }

    /// Drop the closed segments whose newest line is older than `since_ms`: every record
    /// in them was last written before then. Returns how many were removed.
    pub(crate) fn prune_before(&self, since_ms: u64) -> io::Result<usize> {
        if !self.writable {
            return Ok(0);
        }
        let mut g = self.state()?;
        let st = g.as_mut().expect("loaded");
        let current = st.current.map(|(s, _)| s);
        let old: Vec<u32> = st
            .segments
            .iter()
            .filter(|(seg, s)| Some(**seg) != current && s.newest_at < since_ms)
            .map(|(seg, _)| *seg)
            .collect();
        for seg in &old {
            fs::remove_file(self.seg_path(*seg))?;
            st.segments.remove(seg);
        }
        if !old.is_empty() {
            st.index.retain(|_, loc| !old.contains(&loc.seg));
        }
        Ok(old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct R {
        n: u32,
        s: String,
    }

    fn r(n: u32) -> R {
        R {
            n,
            s: format!("record {n}"),
        }
    }

    #[test]
    fn newest_line_wins_and_a_reopen_finds_every_record() {
        let d = tempfile::tempdir().unwrap();
        let log = RecordLog::new(d.path().join("x"), true);
        log.put("a", &r(1), 10, false).unwrap();
        log.put("b", &r(2), 11, true).unwrap();
        log.put("a", &r(3), 12, true).unwrap();
        assert_eq!(log.get::<R>("a").unwrap(), Some(r(3)));
        assert_eq!(log.get::<R>("b").unwrap(), Some(r(2)));
        assert_eq!(log.get::<R>("c").unwrap(), None);
        drop(log);
        let log = RecordLog::new(d.path().join("x"), true);
        assert_eq!(log.get::<R>("a").unwrap(), Some(r(3)));
        assert!(log.contains("b").unwrap() && !log.contains("c").unwrap());
        let all = log.scan::<R>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["a"], (12, r(3)));
        // One file, three lines: no file per record.
        assert_eq!(std::fs::read_dir(d.path().join("x")).unwrap().count(), 1);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_closed_before_the_next_line() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        let log = RecordLog::new(dir.clone(), true);
        log.put("a", &r(1), 10, true).unwrap();
        drop(log);
        // A crash cut the newer line of "a" and left zeros after it (ext4 without a
        // journal can extend a file whose data never landed).
        let seg = dir.join("1.log");
        let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"key\":\"a\",\"at\":11,\"rec\":{\"n\":2,\"s\":\"rec")
            .unwrap();
        f.write_all(&[0u8; 100]).unwrap();
        drop(f);
        let log = RecordLog::new(dir.clone(), true);
        assert_eq!(
            log.get::<R>("a").unwrap(),
            Some(r(1)),
            "the older line stands"
        );
        log.put("b", &r(5), 12, true).unwrap();
        drop(log);
        let log = RecordLog::new(dir, false);
        assert_eq!(log.get::<R>("a").unwrap(), Some(r(1)));
        assert_eq!(log.get::<R>("b").unwrap(), Some(r(5)));
    }

    #[test]
    fn segments_roll_and_pruning_keeps_what_was_written_since() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        let log = RecordLog::with_segment_max(dir.clone(), true, 200);
        for i in 0..10 {
            log.put(&format!("k{i}"), &r(i), 100 + i as u64, true)
                .unwrap();
        }
        // k0 rewritten late: its newest line is in the open segment.
        log.put("k0", &r(99), 1000, true).unwrap();
        let segs = log.list_segments().unwrap();
        assert!(segs.len() >= 3, "{segs:?}");
        let removed = log.prune_before(500).unwrap();
        assert_eq!(removed, segs.len() - 1, "every closed segment was older");
        assert_eq!(log.get::<R>("k0").unwrap(), Some(r(99)));
        assert_eq!(log.get::<R>("k5").unwrap(), None);
        drop(log);
        let log = RecordLog::with_segment_max(dir, true, 200);
        assert_eq!(log.get::<R>("k0").unwrap(), Some(r(99)));
        assert_eq!(log.get::<R>("k5").unwrap(), None);
    }

    #[test]
    fn a_read_only_log_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        let ro = RecordLog::new(dir.clone(), false);
        assert_eq!(ro.get::<R>("a").unwrap(), None);
        assert!(!dir.exists());
        assert!(ro.put("a", &r(1), 1, true).is_err());
        let rw = RecordLog::new(dir.clone(), true);
        rw.put("a", &r(1), 1, false).unwrap();
        // A torn tail is left alone by a reader (the writer may be mid-line).
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.join("1.log"))
            .unwrap();
        f.write_all(b"{\"key\":").unwrap();
        let before = fs::read(dir.join("1.log")).unwrap();
        let ro = RecordLog::new(dir.clone(), false);
        assert_eq!(ro.get::<R>("a").unwrap(), Some(r(1)));
        assert_eq!(fs::read(dir.join("1.log")).unwrap(), before);
    }

    #[test]
    fn a_reader_follows_a_running_writer() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        let rw = RecordLog::with_segment_max(dir.clone(), true, 150);
        rw.put("a", &r(1), 1, false).unwrap();
        let ro = RecordLog::new(dir.clone(), false);
        assert_eq!(ro.get::<R>("a").unwrap(), Some(r(1)));
        assert_eq!(ro.get::<R>("b").unwrap(), None);
        // New keys, a rewritten key, and a new segment, all after the reader's first look.
        for i in 2..8 {
            rw.put("b", &r(i), i as u64, false).unwrap();
        }
        rw.put("a", &r(100), 9, false).unwrap();
        assert!(rw.list_segments().unwrap().len() > 1);
        assert_eq!(ro.get::<R>("b").unwrap(), Some(r(7)));
        assert_eq!(ro.get::<R>("a").unwrap(), Some(r(100)));
    }

    #[test]
    fn concurrent_durable_writers_all_land() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        let log = Arc::new(RecordLog::new(dir.clone(), true));
        log.open().unwrap();
        let hs: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        log.put(&format!("t{t}-{i}"), &r(i), 1, true).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let fsyncs = log.sync.durable();
        assert_eq!(
            fsyncs, 400,
            "every write is covered by a completed fdatasync"
        );
        let log = RecordLog::new(dir, false);
        assert_eq!(log.scan::<R>().unwrap().len(), 400);
        assert_eq!(log.get::<R>("t7-49").unwrap(), Some(r(49)));
    }
}
