//! The least a durable store-and-forward SMTP hop must do: a reference for
//! `integration/bench.sh`, not part of sipmail.
//!
//! Issue 16 asks sipmail's throughput for at least 40% of `smtp-source -> smtp-sink`
//! directly. That bare path writes nothing and has no hop in the middle. This program is the
//! other end of the scale: two of them in a row (`smtp-source -> hop A -> hop B ->
//! smtp-sink`) do what any relay pair that keeps sipmail's promise must do at the least,
//! and nothing else:
//!
//! - take a message by SMTP (EHLO, MAIL, RCPT, DATA, PIPELINING);
//! - make it durable before its 250: an append to one preallocated journal, its
//!   `fdatasync` shared by every message written while the previous one ran (group commit);
//! - hand it to the next hop by SMTP over a few kept-open, pipelined connections;
//! - with `--receipts`, the least of sipmail's per-message receipt: the hop signs
//!   SHA-256 of what it took (Ed25519, a raw signature) and puts the signature in its 250;
//!   the hop before it checks that signature. (sipmail's receipt is an OpenPGP signature
//!   over a longer text, and it is stored at both ends: more work, not less.)
//!
//! No encryption, no OpenPGP, no queue files with names, no retry and no
//! recovery: the journal wraps around without checking that what it overwrites was
//! forwarded, and a failure ends the program. So its rate is an upper bound for any relay
//! pair with the same durability on the same machine, sipmail's included; the bench prints
//! both against the bare path.
//!
//! ```text
//! durable_hop LISTEN NEXT JOURNAL [CONNECTIONS] [--receipts]
//! durable_hop 127.0.0.1:2601 127.0.0.1:2602 /tmp/hop-a.journal 10 --receipts
//! ```
//!
//! The receipt key is a constant both hops know: this is a bench, not a trust model.
//!
//! The journal's group commit is its own flusher thread, not sipmail's `GroupCommit`:
//! that one is for writers on blocking threads (`sync_with` blocks its caller), and each
//! message's task here is async; a turn through the blocking pool per message would add
//! the very thread hand-offs this yardstick is meant to leave out.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The journal's size: written with zeros once at start, so that an fdatasync flushes only
/// data (the file's size and blocks never change), and wrapped around when full.
const JOURNAL_BYTES: u64 = 64 << 20;

/// The receipts' Ed25519 key (a bench constant, see the header), expanded once.
static RECEIPT_KEY: std::sync::LazyLock<ed25519_dalek::SigningKey> =
    std::sync::LazyLock::new(|| ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]));

/// What a receipt signs: SHA-256 of the envelope and the body as the hop took them.
fn receipt_digest(m: &Message) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(&m.from);
    for t in &m.to {
        h.update(t);
    }
    h.update(&m.body);
    h.finalize().into()
}

/// One message as it travels: the envelope and the body, still dot-stuffed as it came, so
/// that it goes to the next hop byte for byte.
struct Message {
    from: Vec<u8>,
    to: Vec<Vec<u8>>,
    body: Vec<u8>,
}

/// Where the next write goes and how far the journal is written; the flusher's condition.
struct Written {
    next: u64,
    /// Grows with every append: what an fdatasync that starts now covers.
    end: u64,
}

struct Journal {
    file: File,
    written: Mutex<Written>,
    more: Condvar,
    /// How far the journal is durable, in the same count as `Written::end`.
    durable: watch::Receiver<u64>,
}

impl Journal {
    fn open(path: &str) -> io::Result<Arc<Journal>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..JOURNAL_BYTES / zeros.len() as u64 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        let (tx, rx) = watch::channel(0u64);
        let journal = Arc::new(Journal {
            file,
            written: Mutex::new(Written { next: 0, end: 0 }),
            more: Condvar::new(),
            durable: rx,
        });
        let flusher = Arc::clone(&journal);
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || flusher.flush_forever(tx))?;
        Ok(journal)
    }

    /// Group commit: each fdatasync covers everything appended before it started.
    fn flush_forever(&self, durable: watch::Sender<u64>) {
        let mut done = 0u64;
        loop {
            let target = {
                let mut w = self.written.lock().expect("journal lock");
                while w.end == done {
                    w = self.more.wait(w).expect("journal lock");
                }
                w.end
            };
            if let Err(e) = self.file.sync_data() {
                eprintln!("durable_hop: fdatasync of the journal failed: {e}");
                std::process::exit(1);
            }
            done = target;
            durable.send_replace(done);
        }
    }

    /// Appends one message and returns the count it is durable at.
    fn append(&self, m: &Message) -> io::Result<u64> {
        let mut record = Vec::with_capacity(m.body.len() + 256);
        record.extend_from_slice(&(m.body.len() as u64).to_le_bytes());
        record.extend_from_slice(&m.from);
        for t in &m.to {
            record.extend_from_slice(t);
        }
        record.extend_from_slice(&m.body);
        let len = record.len() as u64;
        if len > JOURNAL_BYTES {
            return Err(io::Error::other("message larger than the journal"));
        }
        // The write happens under the lock, so everything below `end` is in the page
        // cache before a flush that reads `end` starts.
        let mut w = self.written.lock().expect("journal lock");
        if w.next + len > JOURNAL_BYTES {
            w.next = 0;
        }
        self.file.write_all_at(&record, w.next)?;
        w.next += len;
        w.end += len;
        let end = w.end;
        drop(w);
        self.more.notify_one();
        Ok(end)
    }

    async fn durable_at(&self, end: u64) {
        let mut rx = self.durable.clone();
        // The flusher never stops while the program runs, so the sender outlives this.
        let _ = rx.wait_for(|d| *d >= end).await;
    }
}

fn upper(line: &[u8], n: usize) -> Vec<u8> {
    line.iter().take(n).map(u8::to_ascii_uppercase).collect()
}

/// One SMTP session from the previous hop (or the client).
async fn serve(
    sock: TcpStream,
    journal: Arc<Journal>,
    out: mpsc::UnboundedSender<Message>,
    receipts: bool,
) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let (r, w) = sock.into_split();
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::new(w);
    w.write_all(b"220 durable-hop ESMTP\r\n").await?;
    w.flush().await?;
    let mut line = Vec::with_capacity(512);
    let mut from = Vec::new();
    let mut to: Vec<Vec<u8>> = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = upper(&line, 4);
        match verb.as_slice() {
            b"EHLO" => {
                w.write_all(
                    b"250-durable-hop\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n",
                )
                .await?
            }
            b"HELO" | b"NOOP" => w.write_all(b"250 OK\r\n").await?,
            b"MAIL" => {
                from = line.clone();
                to.clear();
                w.write_all(b"250 2.1.0 OK\r\n").await?
            }
            b"RCPT" => {
                to.push(line.clone());
                w.write_all(b"250 2.1.5 OK\r\n").await?
            }
            b"RSET" => {
                from.clear();
                to.clear();
                w.write_all(b"250 2.0.0 OK\r\n").await?
            }
            b"DATA" if !from.is_empty() && !to.is_empty() => {
                w.write_all(b"354 go on\r\n").await?;
                w.flush().await?;
                let mut body = Vec::with_capacity(8 << 10);
                loop {
                    let start = body.len();
                    if r.read_until(b'\n', &mut body).await? == 0 {
                        return Ok(());
                    }
                    if &body[start..] == b".\r\n" {
                        break;
                    }
                }
                let m = Message {
                    from: std::mem::take(&mut from),
                    to: std::mem::take(&mut to),
                    body,
                };
                let end = journal.append(&m)?;
                journal.durable_at(end).await;
                let reply = if receipts {
                    use ed25519_dalek::Signer;
                    let sig = RECEIPT_KEY.sign(&receipt_digest(&m));
                    format!(
                        "250 2.0.0 queued receipt={}\r\n",
                        hex::encode(sig.to_bytes())
                    )
                } else {
                    "250 2.0.0 queued\r\n".to_string()
                };
                out.send(m)
                    .map_err(|_| io::Error::other("forwarders gone"))?;
                w.write_all(reply.as_bytes()).await?
            }
            b"QUIT" => {
                w.write_all(b"221 2.0.0 bye\r\n").await?;
                w.flush().await?;
                return Ok(());
            }
            _ => w.write_all(b"502 5.5.2 not here\r\n").await?,
        }
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}

/// Reads one (possibly multi-line) reply and returns its code.
async fn reply<R: AsyncBufReadExt + Unpin>(r: &mut R, line: &mut Vec<u8>) -> io::Result<u16> {
    loop {
        line.clear();
        if r.read_until(b'\n', line).await? == 0 {
            return Err(io::Error::other("the next hop closed the connection"));
        }
        if line.len() < 4 {
            return Err(io::Error::other("short reply from the next hop"));
        }
        if line[3] != b'-' {
            let code = std::str::from_utf8(&line[..3])
                .ok()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other("bad reply code from the next hop"))?;
            return Ok(code);
        }
    }
}

fn expect(code: u16, want: u16, what: &str) -> io::Result<()> {
    if code == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the next hop answered {code} to {what}"
        )))
    }
}

type Conn = (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    BufWriter<tokio::net::tcp::OwnedWriteHalf>,
);

async fn connect(next: &str, line: &mut Vec<u8>) -> io::Result<Conn> {
    let sock = TcpStream::connect(next).await?;
    sock.set_nodelay(true)?;
    let (r, w) = sock.into_split();
    let (mut r, mut w) = (BufReader::new(r), BufWriter::with_capacity(64 << 10, w));
    expect(reply(&mut r, line).await?, 220, "the connection")?;
    w.write_all(b"EHLO durable-hop\r\n").await?;
    w.flush().await?;
    expect(reply(&mut r, line).await?, 250, "EHLO")?;
    Ok((r, w))
}

async fn send(conn: &mut Conn, m: &Message, line: &mut Vec<u8>) -> io::Result<()> {
    let (r, w) = conn;
    // PIPELINING: the envelope and DATA in one write.
    w.write_all(&m.from).await?;
    for t in &m.to {
        w.write_all(t).await?;
    }
    w.write_all(b"DATA\r\n").await?;
    w.flush().await?;
    expect(reply(r, line).await?, 250, "MAIL")?;
    for _ in &m.to {
        expect(reply(r, line).await?, 250, "RCPT")?;
    }
    expect(reply(r, line).await?, 354, "DATA")?;
    w.write_all(&m.body).await?;
    w.write_all(b".\r\n").await?;
    w.flush().await?;
    expect(reply(r, line).await?, 250, "the message")?;
    // A receipt in the 250 (from another durable_hop; smtp-sink sends none) is checked.
    if let Some(at) = memchr::memmem::find(line, b"receipt=") {
        let hex_sig = line[at + 8..].trim_ascii_end();
        let raw: [u8; 64] = hex::decode(hex_sig)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| io::Error::other("a malformed receipt from the next hop"))?;
        RECEIPT_KEY
            .verifying_key()
            .verify_strict(
                &receipt_digest(m),
                &ed25519_dalek::Signature::from_bytes(&raw),
            )
            .map_err(|_| io::Error::other("the next hop's receipt does not verify"))?;
    }
    Ok(())
}

/// One kept-open connection to the next hop, taking messages from the shared queue. The
/// connection is opened when the first message comes, and opened again once if it turns
/// out closed (the bench restarts its sink between runs).
async fn forward(
    next: String,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>>,
) -> io::Result<()> {
    let mut line = Vec::with_capacity(512);
    let mut conn: Option<Conn> = None;
    loop {
        let Some(m) = queue.lock().await.recv().await else {
            return Ok(());
        };
        let mut again = false;
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(connect(&next, &mut line).await?),
            };
            match send(c, &m, &mut line).await {
                Ok(()) => break,
                Err(_) if !again => {
                    conn = None;
                    again = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let receipts = args.iter().any(|a| a == "--receipts");
    args.retain(|a| a != "--receipts");
    if args.len() < 4 || args.len() > 5 || args[1] == "--help" {
        eprintln!("usage: durable_hop LISTEN NEXT JOURNAL [CONNECTIONS] [--receipts]");
        std::process::exit(2);
    }
    let conns: usize = match args.get(4).map(|c| c.parse()) {
        None => 10,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("durable_hop: CONNECTIONS must be a positive number");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = rt.block_on(run(
        args[1].clone(),
        args[2].clone(),
        args[3].clone(),
        conns,
        receipts,
    )) {
        eprintln!("durable_hop: {e}");
        std::process::exit(1);
    }
}

async fn run(
    listen: String,
    next: String,
    journal: String,
    conns: usize,
    receipts: bool,
) -> io::Result<()> {
    let journal = Journal::open(&journal)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(tokio::sync::Mutex::new(rx));
    let (failed_tx, mut failed) = mpsc::unbounded_channel::<io::Error>();
    for _ in 0..conns {
        let (next, queue, failed_tx) = (next.clone(), Arc::clone(&queue), failed_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = forward(next, queue).await {
                let _ = failed_tx.send(e);
            }
        });
    }
    let listener = TcpListener::bind(&listen).await?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (sock, _) = accepted?;
                let (journal, tx) = (Arc::clone(&journal), tx.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(sock, journal, tx, receipts).await {
                        eprintln!("durable_hop: a session ended: {e}");
                    }
                });
            }
            Some(e) = failed.recv() => return Err(e),
        }
    }
}
