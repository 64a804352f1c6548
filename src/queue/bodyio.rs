//! Message bodies to and from the spool with large buffers, off the async workers.
//!
//! `tokio::fs::File` runs every read and write as its own blocking-pool task, one at a
//! time; at 64 KiB per operation a 200 MB body costs thousands of hand-offs on the path of
//! the transfer. Here one thread per body does the file I/O in [`CHUNK`]-sized pieces and
//! talks to the async side through a bounded channel, so the disk and the network overlap
//! and memory stays bounded (at most `DEPTH + 2` chunks per body).
//!
//! That thread is its own, not one of tokio's blocking pool: it waits on its async partner
//! for as long as the transfer lasts, and the relay bounds the pool (`runtime` in
//! `src/cli/mod.rs`). A pool full of such loops would leave no thread for the commits and
//! fsyncs their partners wait on: two relays sending each other big bodies could each fill
//! theirs with readers waiting on a peer whose writers cannot start.
//!
//! [`BodyWriter`] also starts writing the body back to disk while it is still arriving
//! (an `fdatasync` from a helper thread every [`WRITE_BEHIND`] bytes), so that the fsync
//! before the 250 only has the tail left. Durability is unchanged: [`Spool::commit`]
//! still fsyncs the whole file before the message counts as queued, and an error seen by
//! a write-behind sync fails [`BodyWriter::finish`] (the kernel reports a write-back
//! error only once per open file, so it must not be swallowed here).
//!
//! [`Spool::commit`]: super::Spool::commit

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::{self, OwnedPermit, error::SendError, error::TrySendError};
use tokio::sync::oneshot;

use crate::smtp::DecodedDigest;

/// Bytes per file operation and per channel message.
pub const CHUNK: usize = 256 * 1024;
/// Chunks queued between the async side and the file task.
const DEPTH: usize = 4;
/// A body larger than this is synced to disk in the background while it arrives.
pub const WRITE_BEHIND: u64 = 16 * 1024 * 1024;

type Reserve = Pin<Box<dyn Future<Output = Result<OwnedPermit<Vec<u8>>, SendError<()>>> + Send>>;

fn stopped() -> io::Error {
    io::Error::other("the spool file writer stopped")
}

/// The file a body goes into: open already, or opened only when bytes must be written.
/// A body that stays below [`CHUNK`] never needs its file before the commit, which then
/// creates, writes and fsyncs it in one blocking task: one hand-off to the blocking pool
/// per small message instead of two.
pub enum BodyFile {
    Open(File),
    Later(Box<dyn FnOnce() -> io::Result<File> + Send>),
}

impl BodyFile {
    /// The file, created now if it was not yet. Blocking.
    pub fn open(self) -> io::Result<File> {
        match self {
            BodyFile::Open(f) => Ok(f),
            BodyFile::Later(create) => create(),
        }
    }
}

impl std::fmt::Debug for BodyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyFile::Open(_) => "BodyFile::Open",
            BodyFile::Later(_) => "BodyFile::Later",
        })
    }
}

/// An `AsyncWrite` into a spool file. Bytes are buffered up to [`CHUNK`]; a body that
/// stays below that is written by [`finish`](Self::finish) in one operation, a larger one
/// by a thread of its own fed through a bounded channel. `poll_flush` hands the buffered
/// bytes to that thread; [`finish`](Self::finish) waits until all are written.
pub struct BodyWriter {
    buf: Vec<u8>,
    /// The body as a partner will decode it, hashed as it is written: here for a small
    /// body, on the writer thread once there is one (see [`with_digest`](Self::with_digest)).
    digest: Option<DecodedDigest>,
    /// The file until the first full chunk starts the writer task.
    file: Option<BodyFile>,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    reserving: Option<Reserve>,
    task: Option<oneshot::Receiver<Written>>,
    size: u64,
}

/// What the writer thread gives back: the file, and the digest if one was kept.
type Written = io::Result<(File, Option<DecodedDigest>)>;

/// A body written: see [`BodyWriter::finish`].
#[derive(Debug)]
pub struct Finished {
    pub file: BodyFile,
    /// What is still to be written after what is in the file: a small body whole.
    pub tail: Vec<u8>,
    pub size: u64,
    /// SHA-256 and size of the body as a partner decodes it, if asked for.
    pub decoded: Option<super::DecodedBody>,
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWriter")
            .field("size", &self.size)
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl BodyWriter {
    pub fn new(file: BodyFile) -> Self {
        BodyWriter {
            buf: Vec::with_capacity(16 * 1024),
            digest: None,
            file: Some(file),
            tx: None,
            reserving: None,
            task: None,
            size: 0,
        }
    }

    /// Also hash the body as a partner will decode it (`smtp::DecodedDigest`), for a
    /// message that may go to one that returns receipts: computed once, as the body is
    /// spooled (for a big body on the thread that writes it), not on every attempt.
    pub fn with_digest(mut self) -> Self {
        self.digest = Some(DecodedDigest::new());
        self
    }

    /// Bytes accepted so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hand the buffered bytes to the writer task (starting it if needed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(file) = self.file.take() {
            let (tx, rx) = mpsc::channel(DEPTH);
            self.tx = Some(tx);
            let digest = self.digest.take();
            match crate::own_thread::spawn("spool-write", move || {
                write_loop(file.open()?, rx, digest)
            }) {
                Ok(task) => self.task = Some(task),
                Err(e) => {
                    self.tx = None;
                    return Poll::Ready(Err(e));
                }
            }
        }
        let Some(tx) = self.tx.as_ref() else {
            return Poll::Ready(Err(stopped()));
        };
        if self.reserving.is_none() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            match tx.try_send(chunk) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(TrySendError::Full(chunk)) => {
                    self.buf = chunk;
                    self.reserving = Some(Box::pin(tx.clone().reserve_owned()));
                }
                Err(TrySendError::Closed(chunk)) => {
                    self.buf = chunk;
                    return self.poll_task_error(cx);
                }
            }
        }
        let Some(fut) = self.reserving.as_mut() else {
            return Poll::Ready(Err(stopped()));
        };
        let res = ready!(fut.as_mut().poll(cx));
        self.reserving = None;
        match res {
            Ok(permit) => {
                permit.send(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
                Poll::Ready(Ok(()))
            }
            Err(_) => self.poll_task_error(cx),
        }
    }

    /// The writer task ended early: its error.
    fn poll_task_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(Err(stopped()));
        };
        let res = ready!(Pin::new(task).poll(cx));
        self.task = None;
        self.tx = None;
        Poll::Ready(Err(match res {
            Ok(Err(e)) => e,
            Ok(Ok(_)) | Err(_) => stopped(),
        }))
    }

    /// End the body: the file (written, not yet fsynced), the tail still to write after
    /// what is in it, and the body's size. A small body (one that never left the buffer)
    /// comes back whole as the tail, with its file perhaps not created yet:
    /// [`super::Spool::commit_parts`] creates and writes it in the task that fsyncs it.
    pub async fn finish(mut self) -> io::Result<Finished> {
        if let Some(file) = self.file.take() {
            // Small body: no writer task.
            let tail = std::mem::take(&mut self.buf);
            let decoded = self.digest.take().map(|mut d| {
                d.update(&tail);
                super::DecodedBody::from_digest(d)
            });
            return Ok(Finished {
                file,
                tail,
                size: self.size,
                decoded,
            });
        }
        std::future::poll_fn(|cx| self.poll_send(cx)).await?;
        self.tx = None;
        let task = self.task.take().ok_or_else(stopped)?;
        let (file, digest) = task.await.map_err(|_| stopped())??;
        Ok(Finished {
            file: BodyFile::Open(file),
            tail: Vec::new(),
            size: self.size,
            decoded: digest.map(super::DecodedBody::from_digest),
        })
    }
}

impl AsyncWrite for BodyWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= CHUNK {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(CHUNK - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        this.size += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.file.is_some() {
            // Still small: kept for `finish`.
            return Poll::Ready(Ok(()));
        }
        this.poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// The writer task: chunks to the file, with write-behind syncs for big bodies, and the
/// body's digest if one is kept (the hashing overlaps the next chunk's arrival).
fn write_loop(
    mut file: File,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut digest: Option<DecodedDigest>,
) -> Written {
    let mut behind: Option<WriteBehind> = None;
    let mut unsynced = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        file.write_all(&chunk)?;
        if let Some(d) = digest.as_mut() {
            d.update(&chunk);
        }
        unsynced += chunk.len() as u64;
        if unsynced >= WRITE_BEHIND {
            unsynced = 0;
            if behind.is_none() {
                behind = WriteBehind::start(&file);
            }
            if let Some(b) = &behind {
                b.kick();
            }
        }
    }
    if let Some(b) = behind {
        b.finish()?;
    }
    Ok((file, digest))
}

/// A helper thread that runs `fdatasync` on the body while it is being written, so that
/// the final fsync has little left to do. Kicks while a sync runs are merged.
struct WriteBehind {
    kick: std_mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl WriteBehind {
    fn start(file: &File) -> Option<WriteBehind> {
        let file = file.try_clone().ok()?;
        let (kick, rx) = std_mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("spool-sync".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok()?;
        Some(WriteBehind { kick, thread })
    }

    fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Stop the thread; an error it met is the body's error.
    fn finish(self) -> io::Result<()> {
        drop(self.kick);
        self.thread
            .join()
            .map_err(|_| io::Error::other("spool sync thread panicked"))?
    }
}

/// An `AsyncRead` of a spool file, read ahead in [`CHUNK`]s by a thread of its own.
pub struct BodyReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReader").finish_non_exhaustive()
    }
}

impl BodyReader {
    /// Start reading `file` from its current position.
    pub fn new(file: File) -> Self {
        let (tx, rx) = mpsc::channel(DEPTH.min(2));
        let failed = tx.clone();
        if let Err(e) = crate::own_thread::spawn("spool-read", move || read_loop(file, tx)) {
            // The channel is empty and has room: the reader sees the error first.
            let _ = failed.try_send(Err(e));
        }
        BodyReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl BodyReader {
    /// Open `path` and start reading it. A body of up to [`CHUNK`] whose pages are all in
    /// the page cache (a message just queued, the usual case) is read here, on the
    /// calling thread: `preadv2(RWF_NOWAIT)` takes it only if no disk read is needed, and
    /// the two turns through the blocking pool (there and back) were on every message's
    /// path to the next hop (docs/PERFORMANCE.md, run 14). Anything else is read ahead
    /// from the file opened here by a thread of its own ([`BodyReader::new`]). The open's error
    /// comes back here, before anything is sent.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(match cached(&file) {
            Some(body) => {
                // No sender: the end of the file comes right after this chunk.
                let (_, rx) = mpsc::channel(1);
                BodyReader {
                    rx,
                    cur: body,
                    pos: 0,
                }
            }
            // `cached` reads with offsets: `file` is still at its start.
            None => BodyReader::new(file),
        })
    }
}

/// The whole of a queued body of up to [`CHUNK`] bytes if every page of it is in the page
/// cache, without waiting for the disk: `None` when it is larger, not all cached, or the
/// kernel or file system cannot say (`RWF_NOWAIT` unsupported). A queued body no longer
/// changes, so its size is its end.
fn cached(file: &File) -> Option<Vec<u8>> {
    let len = file.metadata().ok()?.len();
    if len > CHUNK as u64 {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    let mut at = 0;
    while at < buf.len() {
        let mut slices = [io::IoSliceMut::new(&mut buf[at..])];
        match rustix::io::preadv2(
            file,
            &mut slices,
            at as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => return None, // shorter than its size said: let the reader see
            Ok(n) => at += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None, // EAGAIN (not cached), EOPNOTSUPP, ...
        }
    }
    Some(buf)
}

fn read_loop(mut file: File, tx: mpsc::Sender<io::Result<Vec<u8>>>) {
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0);
    // A small body in one read of its size (+1 to see the end without another read).
    let mut cap = (hint as usize).saturating_add(1).clamp(4096, CHUNK);
    loop {
        let mut chunk = Vec::with_capacity(cap);
        let want = cap;
        cap = CHUNK;
        match (&mut file).take(want as u64).read_to_end(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                if tx.blocking_send(Ok(chunk)).is_err() || n < want {
                    return; // the reader was dropped, or the end of the file
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pos == this.cur.len() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    this.cur = chunk;
                    this.pos = 0;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())), // end of file
            }
        }
        let n = (this.cur.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.cur[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A body's file loop waits on its async partner for as long as the transfer lasts, so
    /// it must not hold a thread of the relay's bounded blocking pool: with more transfers
    /// stalled than the pool has threads, a commit's blocking task still runs. (Seen
    /// failing with the loops on `spawn_blocking`: the task never started.)
    #[test]
    fn stalled_transfers_leave_the_blocking_pool_free() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let big = pattern(4 * CHUNK);
            let (mut readers, mut writers) = (Vec::new(), Vec::new());
            for i in 0..3 {
                let path = dir.path().join(format!("{i}.msg"));
                std::fs::write(&path, &big).unwrap();
                // Nobody reads yet: the loop fills its channel and waits.
                readers.push(BodyReader::new(File::open(&path).unwrap()));
                // A writer whose loop has its first chunk and waits for the next.
                let out = File::create(dir.path().join(format!("{i}.out"))).unwrap();
                let mut w = BodyWriter::new(BodyFile::Open(out));
                w.write_all(&big[..CHUNK + 1]).await.unwrap();
                w.flush().await.unwrap();
                writers.push(w);
            }
            let task = tokio::task::spawn_blocking(|| 7);
            let ran = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
            assert!(
                matches!(ran, Ok(Ok(7))),
                "a blocking task waited behind six stalled transfers"
            );
            for mut r in readers {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                assert!(got == big, "a stalled read completes whole");
            }
            for (i, w) in writers.into_iter().enumerate() {
                let Finished {
                    file, tail, size, ..
                } = w.finish().await.unwrap();
                let mut file = file.open().unwrap();
                std::io::Write::write_all(&mut file, &tail).unwrap();
                assert_eq!(size, CHUNK as u64 + 1);
                let path = dir.path().join(format!("{i}.out"));
                assert!(std::fs::read(path).unwrap() == big[..CHUNK + 1]);
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_then_read_back_small_and_big_bodies() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 5000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let body = pattern(len);
            let path = dir.path().join(format!("{len}.msg"));
            let mut w = BodyWriter::new(BodyFile::Open(File::create(&path).unwrap()));
            // Every other length keeps the digest: on this thread for a small body, on the
            // writer's for a big one, over every byte once and in order.
            let digest = len % 2 == 1;
            if digest {
                w = w.with_digest();
            }
            // Odd write sizes, with flushes in between, as the SMTP driver does.
            for (k, part) in body.chunks(10_007).enumerate() {
                w.write_all(part).await.unwrap();
                if k % 3 == 0 {
                    w.flush().await.unwrap();
                }
            }
            assert_eq!(w.size(), len as u64);
            let Finished {
                file,
                tail,
                size,
                decoded,
            } = w.finish().await.unwrap();
            let want = digest.then(|| {
                let mut d = DecodedDigest::new();
                d.update(&body);
                let (sha256, size) = d.finish();
                super::super::DecodedBody { sha256, size }
            });
            assert_eq!(decoded, want, "the digest of {len} bytes");
            let mut file = file.open().unwrap();
            assert_eq!(size, len as u64);
            std::io::Write::write_all(&mut file, &tail).unwrap();
            file.sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), body, "len {len}");
            let mut r = BodyReader::new(File::open(&path).unwrap());
            let mut back = Vec::new();
            let mut piece = vec![0u8; 9_999];
            loop {
                let n = r.read(&mut piece).await.unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&piece[..n]);
            }
            assert_eq!(back, body, "read back, len {len}");
        }
    }

    /// `open` reads a small cached body on the calling thread, anything else through
    /// the blocking pool; both give back the bytes on disk, and a missing body is an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_reads_cached_small_bodies_here_and_the_rest_ahead() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 5000, CHUNK, CHUNK + 1, 2 * CHUNK + 3] {
            let body = pattern(len);
            let path = dir.path().join(format!("{len}.msg"));
            std::fs::write(&path, &body).unwrap();
            // Just written: in the page cache, so a small one is taken without the pool
            // (ext4, xfs, btrfs and tmpfs answer RWF_NOWAIT reads).
            let here = cached(&File::open(&path).unwrap());
            if len <= CHUNK {
                assert_eq!(here.as_deref(), Some(&body[..]), "len {len}");
            } else {
                assert!(here.is_none(), "len {len}: larger than a chunk");
            }
            let mut r = BodyReader::open(&path).unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, body, "read back, len {len}");
        }
        let gone = BodyReader::open(&dir.path().join("none.msg"));
        assert_eq!(gone.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_behind_bodies_are_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.msg");
        let len = WRITE_BEHIND as usize * 2 + 12_345;
        let body = pattern(len);
        let mut w = BodyWriter::new(BodyFile::Open(File::create(&path).unwrap()));
        for part in body.chunks(64 * 1024) {
            w.write_all(part).await.unwrap();
        }
        let Finished {
            file, tail, size, ..
        } = w.finish().await.unwrap();
        assert_eq!(size, len as u64);
        assert!(tail.is_empty(), "a big body is all in the file");
        drop(file);
        assert!(std::fs::read(&path).unwrap() == body);
    }

    #[tokio::test]
    async fn a_failing_file_fails_the_writer() {
        // A file opened read-only: the writer task's first write fails, and that error
        // surfaces from a later write or from finish.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.msg");
        std::fs::write(&path, b"").unwrap();
        let mut w = BodyWriter::new(BodyFile::Open(File::open(&path).unwrap()));
        let chunk = vec![b'x'; CHUNK];
        let mut failed = false;
        for _ in 0..(DEPTH + 4) {
            if w.write_all(&chunk).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || w.finish().await.is_err());
    }

    /// A file to be created later is created only when a full chunk must be written: a
    /// small body comes back from `finish` still uncreated, a big one is in its file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_file_is_created_only_for_a_body_that_outgrows_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        for len in [5000, CHUNK + 1] {
            let path = dir.path().join(format!("{len}.msg"));
            let p = path.clone();
            let mut w = BodyWriter::new(BodyFile::Later(Box::new(move || File::create(&p))));
            let body = pattern(len);
            w.write_all(&body).await.unwrap();
            w.flush().await.unwrap();
            let Finished {
                file, tail, size, ..
            } = w.finish().await.unwrap();
            assert_eq!(size, len as u64);
            if len < CHUNK {
                assert!(matches!(file, BodyFile::Later(_)), "len {len}: {file:?}");
                assert!(!path.exists(), "len {len}: created before the commit");
                assert_eq!(tail, body);
            } else {
                assert!(matches!(file, BodyFile::Open(_)), "len {len}: {file:?}");
                assert!(tail.is_empty());
            }
            let mut f = file.open().unwrap();
            std::io::Write::write_all(&mut f, &tail).unwrap();
            drop(f);
            assert_eq!(std::fs::read(&path).unwrap(), body, "len {len}");
        }
    }

    /// A file that cannot be created fails the body with that error, whether a big body's
    /// first chunk needed it or a small body's commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_file_that_cannot_be_created_fails_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("x.msg");
        for len in [10, 3 * CHUNK] {
            let p = path.clone();
            let mut w = BodyWriter::new(BodyFile::Later(Box::new(move || File::create(&p))));
            let mut failed = w.write_all(&pattern(len)).await.is_err();
            if !failed {
                failed = match w.finish().await {
                    Err(_) => true,
                    Ok(f) => f.file.open().is_err(),
                };
            }
            assert!(
                failed,
                "len {len}: no error for a file that cannot be created"
            );
        }
    }
}
