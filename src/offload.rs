//! A CPU-bound consumer of a byte stream (a message's SHA-256 for its receipt) that runs
//! inline while the stream is small and on a thread of its own once it outgrows one
//! [`CHUNK`], so that a big message's hashing overlaps the stage that produces its bytes.
//!
//! Why: on the 200 MB leg, the two SHA-256 passes (the sender's over the bytes it puts
//! on the wire, the receiver's over the bytes it takes off it) ran on the very tasks that
//! seal, send, open and spool, and the leg waited on them: with the hashing made free in
//! a probe, the leg went from 459-481 MB/s to 649-795 (docs/PERFORMANCE.md, run 37).
//! Moved here, the same work runs beside those tasks on the second core.
//!
//! Back-pressure: at most [`DEPTH`] chunks wait for the consumer thread. An async producer
//! asks [`Offload::poll_room`] first, and is woken by the thread when a chunk is done, so
//! it never blocks its worker: the receiver's tap, and the sender's fallback hash of what
//! it sends, which the SMTP client feeds in pieces of at most one chunk, each after its
//! observer said it was ready (`smtp::client::Observe`). A producer that ignores
//! `poll_room` blocks in `update` when the queue is full, until the thread, which waits on
//! nothing but the CPU, has taken a chunk. Memory is bounded: at most `DEPTH + 3` chunks
//! per stream (queued, one past the mark, being consumed, being filled).
//!
//! Where no thread can be started, the consumer stays on the calling thread for the rest
//! of the stream: slower, never a byte left out.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Waker};

/// Bytes handed over at a time; a stream up to this size never leaves the calling thread.
pub const CHUNK: usize = 256 * 1024;
/// Chunks queued to the consumer thread before a producer waits.
const DEPTH: usize = 2;

/// What consumes the bytes, in order.
pub trait Consume: Send + 'static {
    fn consume(&mut self, bytes: &[u8]);
}

impl Consume for sha2::Sha256 {
    fn consume(&mut self, bytes: &[u8]) {
        sha2::Digest::update(self, bytes);
    }
}

/// See the module documentation.
pub struct Offload<C: Consume> {
    state: State<C>,
    /// Bytes given to [`update`](Self::update) so far.
    seen: u64,
    name: &'static str,
    /// No thread could be started: everything is consumed here.
    inline_only: bool,
    #[cfg(test)]
    fail_spawn: bool,
}

enum State<C: Consume> {
    Inline(C),
    Thread {
        tx: mpsc::SyncSender<Vec<u8>>,
        fill: Vec<u8>,
        queue: Arc<Queue>,
        /// The consumer back when the thread ends (None only if it never had it).
        done: tokio::sync::oneshot::Receiver<Option<C>>,
    },
    /// Only after the consumer thread died (it cannot, short of a panic in the consumer):
    /// the result is an error.
    Broken,
}

/// Chunks sent and not yet consumed, and the async producer to wake when one is.
#[derive(Default)]
struct Queue {
    waiting: AtomicUsize,
    waker: Mutex<Option<Waker>>,
    /// The consumer thread has ended (the stream's end, or a panic in the consumer):
    /// nothing will make room any more, so a producer must not wait for it.
    closed: AtomicBool,
}

impl Queue {
    fn wake(&self) {
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }

    fn has_room(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.waiting.load(Ordering::Acquire) < DEPTH
    }
}

/// Held by the consumer thread: however it ends, even by a panic in the consumer, a
/// producer waiting in [`Offload::poll_room`] is woken and finds the queue closed (its next
/// send fails, and the stream ends in an error, not a hang).
struct CloseOnExit(Arc<Queue>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake();
    }
}

impl<C: Consume> Offload<C> {
    /// `name` names the thread, if one is started.
    pub fn new(consumer: C, name: &'static str) -> Self {
        Offload {
            state: State::Inline(consumer),
            seen: 0,
            name,
            inline_only: false,
            #[cfg(test)]
            fail_spawn: false,
        }
    }

    /// Ready when the next [`update`](Self::update) of at most [`CHUNK`] bytes will not
    /// block: fewer than [`DEPTH`] chunks wait for the thread, or there is none.
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Thread { queue, .. } = &self.state else {
            return Poll::Ready(());
        };
        if queue.has_room() {
            return Poll::Ready(());
        }
        *queue.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Checked again after the waker is in place: a chunk consumed (or the thread's end)
        // in between woke nobody.
        if queue.has_room() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        if let State::Inline(_) = &self.state
            && !self.inline_only
            && self.seen > CHUNK as u64
        {
            self.start_thread();
        }
        if let State::Inline(c) = &mut self.state {
            c.consume(bytes);
            return;
        }
        while !bytes.is_empty() {
            let State::Thread {
                tx, fill, queue, ..
            } = &mut self.state
            else {
                return;
            };
            let take = bytes.len().min(CHUNK - fill.len());
            fill.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if fill.len() == CHUNK {
                let full = std::mem::replace(fill, Vec::with_capacity(CHUNK));
                queue.waiting.fetch_add(1, Ordering::AcqRel);
                if tx.send(full).is_err() {
                    self.state = State::Broken;
                }
            }
        }
    }

    /// Moves the consumer to a thread of its own; where no thread can be started, it stays
    /// here for the rest of the stream.
    fn start_thread(&mut self) {
        let State::Inline(_) = &self.state else {
            return;
        };
        // One past the mark fits without blocking: an async producer checks for room
        // before an update that completes at most one chunk.
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH + 1);
        let queue = Arc::new(Queue::default());
        // The consumer goes to the thread inside a slot it takes from, so that it can
        // stay here if the spawn fails.
        let slot = Arc::new(Mutex::new(None::<C>));
        let State::Inline(c) = std::mem::replace(&mut self.state, State::Broken) else {
            return;
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        let theirs = slot.clone();
        let q = queue.clone();
        let work = move || {
            let _closed = CloseOnExit(q.clone());
            let mut c = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(c) = c.as_mut() {
                while let Ok(chunk) = rx.recv() {
                    c.consume(&chunk);
                    drop(chunk);
                    q.waiting.fetch_sub(1, Ordering::AcqRel);
                    q.wake();
                }
            }
            c
        };
        #[cfg(test)]
        let spawned = if self.fail_spawn {
            drop(work);
            Err(io::Error::other("no thread, on purpose"))
        } else {
            crate::own_thread::spawn(self.name, work)
        };
        #[cfg(not(test))]
        let spawned = crate::own_thread::spawn(self.name, work);
        self.state = match spawned {
            Ok(done) => State::Thread {
                tx,
                fill: Vec::with_capacity(CHUNK),
                queue,
                done,
            },
            Err(e) => {
                tracing::warn!(error = %e, "{} stays on the calling thread", self.name);
                self.inline_only = true;
                match slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(c) => State::Inline(c),
                    None => State::Broken,
                }
            }
        };
    }

    /// Total bytes given to [`update`](Self::update).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The consumer, after every byte given to [`update`](Self::update).
    pub async fn finish(mut self) -> io::Result<C> {
        std::future::poll_fn(|cx| self.poll_room(cx)).await;
        match self.state {
            State::Inline(c) => Ok(c),
            State::Thread {
                tx,
                fill,
                done,
                queue,
            } => {
                if !fill.is_empty() {
                    queue.waiting.fetch_add(1, Ordering::AcqRel);
                    if tx.send(fill).is_err() {
                        return Err(broken(self.name));
                    }
                }
                drop(tx);
                match done.await {
                    Ok(Some(c)) => Ok(c),
                    _ => Err(broken(self.name)),
                }
            }
            State::Broken => Err(broken(self.name)),
        }
    }
}

fn broken(name: &str) -> io::Error {
    io::Error::other(format!("the {name} thread ended before the stream did"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Records the bytes and the threads that consumed them.
    #[derive(Default)]
    struct Record {
        bytes: Vec<u8>,
        threads: Vec<Option<String>>,
        panic_after: Option<usize>,
        /// Each consume waits for a token from here, if set.
        gate: Option<std::sync::mpsc::Receiver<()>>,
    }

    impl Consume for Record {
        fn consume(&mut self, bytes: &[u8]) {
            if let Some(g) = &self.gate {
                let _ = g.recv();
            }
            self.bytes.extend_from_slice(bytes);
            let name = std::thread::current().name().map(str::to_string);
            if self.threads.last() != Some(&name) {
                self.threads.push(name);
            }
            if self.panic_after.is_some_and(|n| self.bytes.len() > n) {
                panic!("a consumer that fails, on purpose");
            }
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_small_stream_is_consumed_here() {
        let data = pattern(CHUNK);
        let mut o = Offload::new(Record::default(), "t-offload-small");
        for piece in data.chunks(1000) {
            o.update(piece);
        }
        assert_eq!(o.seen(), CHUNK as u64);
        let r = o.finish().await.unwrap();
        assert_eq!(r.bytes, data);
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(r.threads, vec![here], "no thread for one chunk");
    }

    /// Past one chunk the consumer moves to its thread with what it has seen, and every
    /// byte arrives once and in order, whatever the sizes written.
    #[tokio::test(flavor = "current_thread")]
    async fn a_big_stream_moves_to_a_thread_in_order() {
        let data = pattern(5 * CHUNK + 4321);
        let mut o = Offload::new(Record::default(), "t-offload-big");
        let sizes = [1, CHUNK - 1, 2, 3 * CHUNK, 17, 99_999];
        let (mut at, mut k) = (0, 0);
        while at < data.len() {
            let n = sizes[k % sizes.len()].min(data.len() - at);
            o.update(&data[at..at + n]);
            at += n;
            k += 1;
        }
        assert_eq!(o.seen(), data.len() as u64);
        let r = o.finish().await.unwrap();
        assert_eq!(r.bytes, data);
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(r.threads, vec![here, Some("t-offload-big".to_string())]);
    }

    /// A consumer thread that dies is an error at the end, not a hang or a panic here.
    #[tokio::test(flavor = "current_thread")]
    async fn a_dead_consumer_is_an_error() {
        let rec = Record {
            panic_after: Some(2 * CHUNK),
            ..Record::default()
        };
        let mut o = Offload::new(rec, "t-offload-dies");
        for piece in pattern(20 * CHUNK).chunks(CHUNK / 3) {
            o.update(piece);
        }
        let e = o.finish().await.err().expect("the thread died");
        assert!(e.to_string().contains("t-offload-dies"), "{e}");
    }

    /// A consumer thread that dies while an async producer waits for room wakes it: the
    /// producer is not left waiting for a chunk that will never be consumed, and the
    /// stream ends in an error.
    #[tokio::test(flavor = "current_thread")]
    async fn a_consumer_that_dies_wakes_a_waiting_producer() {
        let (open, gate) = std::sync::mpsc::channel();
        let rec = Record {
            panic_after: Some(CHUNK),
            gate: Some(gate),
            ..Record::default()
        };
        let mut o = Offload::new(rec, "t-offload-dies-waiting");
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        open.send(()).unwrap(); // the first chunk, consumed here
        let data = pattern(3 * CHUNK);
        o.update(&data[..CHUNK]);
        o.update(&data[CHUNK..]); // the thread starts; two chunks wait for it
        assert!(
            o.poll_room(&mut cx).is_pending(),
            "no room with DEPTH waiting"
        );
        open.send(()).unwrap(); // the thread takes a chunk and its consumer panics
        let t0 = std::time::Instant::now();
        while o.poll_room(&mut cx).is_pending() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "the producer was left waiting"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(count.0.load(Ordering::SeqCst) > 0, "never woken");
        let e = o.finish().await.err().expect("the thread died");
        assert!(e.to_string().contains("t-offload-dies-waiting"), "{e}");
    }

    /// No thread can be started: every byte is still consumed, in order, here; the
    /// stream does not try again for each update.
    #[tokio::test(flavor = "current_thread")]
    async fn without_a_thread_everything_is_consumed_here() {
        let data = pattern(4 * CHUNK + 99);
        let mut o = Offload::new(Record::default(), "t-offload-nothread");
        o.fail_spawn = true;
        for piece in data.chunks(CHUNK / 3 + 1) {
            o.update(piece);
        }
        assert!(o.inline_only);
        let r = o.finish().await.unwrap();
        assert!(r.bytes == data, "bytes lost or out of order");
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(r.threads, vec![here]);
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes, and the count.
    fn counting_waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    /// An async producer is told to wait once DEPTH chunks wait for a slow consumer, and
    /// is woken when one is consumed: it never has to block.
    #[tokio::test(flavor = "current_thread")]
    async fn an_async_producer_waits_for_room_and_is_woken() {
        let (open, gate) = std::sync::mpsc::channel();
        let rec = Record {
            gate: Some(gate),
            ..Record::default()
        };
        let mut o = Offload::new(rec, "t-offload-room");
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let data = pattern(4 * CHUNK);
        // The first chunk is consumed here (inline): let it through.
        open.send(()).unwrap();
        let mut at = 0;
        let mut pending = 0;
        while at < data.len() {
            if o.poll_room(&mut cx).is_pending() {
                pending += 1;
                let woken = count.0.load(Ordering::SeqCst);
                open.send(()).unwrap(); // one chunk may be consumed now
                let t0 = std::time::Instant::now();
                while count.0.load(Ordering::SeqCst) == woken {
                    assert!(
                        t0.elapsed() < std::time::Duration::from_secs(10),
                        "never woken"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                continue;
            }
            o.update(&data[at..at + CHUNK]);
            at += CHUNK;
        }
        assert!(pending > 0, "the producer was never asked to wait");
        for _ in 0..8 {
            let _ = open.send(());
        }
        let r = o.finish().await.unwrap();
        assert!(r.bytes == data);
    }
}
