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
//! Back-pressure is a bounded channel whose `send` blocks the producer when [`DEPTH`]
//! chunks wait. The producer is an async task, and it blocks only while the consumer
//! thread, which waits on nothing but the CPU, catches up: never longer than doing the
//! same work inline took, which is what the producer did before. Memory is bounded: at
//! most `DEPTH + 2` chunks per stream (queued, being consumed, being filled).

use std::io;
use std::sync::mpsc;

/// Bytes handed over at a time; a stream up to this size never leaves the calling thread.
pub const CHUNK: usize = 256 * 1024;
/// Chunks queued to the consumer thread before the producer waits.
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
}

enum State<C: Consume> {
    Inline(C),
    Thread {
        tx: mpsc::SyncSender<Vec<u8>>,
        fill: Vec<u8>,
        /// The consumer back when the thread ends (None only if it never had it).
        done: tokio::sync::oneshot::Receiver<Option<C>>,
    },
    /// Only after the consumer thread died (it cannot, short of a panic in the consumer):
    /// the result is an error.
    Broken,
}

impl<C: Consume> Offload<C> {
    /// `name` names the thread, if one is started.
    pub fn new(consumer: C, name: &'static str) -> Self {
        Offload {
            state: State::Inline(consumer),
            seen: 0,
            name,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        if let State::Inline(c) = &mut self.state {
            if self.seen <= CHUNK as u64 {
                c.consume(bytes);
                return;
            }
            self.start_thread();
        }
        while !bytes.is_empty() {
            let State::Thread { tx, fill, .. } = &mut self.state else {
                return;
            };
            let take = bytes.len().min(CHUNK - fill.len());
            fill.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if fill.len() == CHUNK {
                let full = std::mem::replace(fill, Vec::with_capacity(CHUNK));
                if tx.send(full).is_err() {
                    self.state = State::Broken;
                }
            }
        }
    }

    /// Moves the consumer to a thread of its own; where no thread can be started, it stays
    /// here (slower, not wrong).
    fn start_thread(&mut self) {
        let State::Inline(_) = &self.state else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH);
        // The consumer goes to the thread inside a slot it takes from, so that it can
        // stay here if the spawn fails.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None::<C>));
        let State::Inline(c) = std::mem::replace(&mut self.state, State::Broken) else {
            return;
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        let theirs = slot.clone();
        let spawned = crate::own_thread::spawn(self.name, move || {
            let mut c = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(c) = c.as_mut() {
                while let Ok(chunk) = rx.recv() {
                    c.consume(&chunk);
                }
            }
            c
        });
        self.state = match spawned {
            Ok(done) => State::Thread {
                tx,
                fill: Vec::with_capacity(CHUNK),
                done,
            },
            Err(e) => {
                tracing::debug!(error = %e, "{} stays on the calling thread", self.name);
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
    pub async fn finish(self) -> io::Result<C> {
        match self.state {
            State::Inline(c) => Ok(c),
            State::Thread { tx, fill, done } => {
                if !fill.is_empty() && tx.send(fill).is_err() {
                    return Err(broken(self.name));
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

    /// Records the bytes and the threads that consumed them.
    #[derive(Default)]
    struct Record {
        bytes: Vec<u8>,
        threads: Vec<Option<String>>,
        panic_after: Option<usize>,
    }

    impl Consume for Record {
        fn consume(&mut self, bytes: &[u8]) {
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
}
