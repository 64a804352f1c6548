//! SMTP parsing on one core: a whole pipelined transaction through the sans-IO
//! `ServerSession` (feed / next_event, every decision answered "yes"), and the DATA phase
//! alone through `DataReceiver::feed`.
//!
//! Run: `cargo bench --bench smtp_parse`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sipmail::smtp::{DataReceiver, Event, Reply, ServerConfig, ServerSession};
use std::hint::black_box;
use std::time::Duration;

/// A message of about `size` bytes with CRLF lines of 76 characters, some starting with a
/// dot (so dot-unstuffing has work), already dot-stuffed and terminated for the wire.
fn wire_body(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 100);
    v.extend_from_slice(b"From: a@site-a.test\r\nTo: b@site-b.test\r\nSubject: bench\r\n\r\n");
    let mut i = 0usize;
    while v.len() < size {
        if i.is_multiple_of(20) {
            v.extend_from_slice(b"..");
        }
        for k in 0..74 {
            v.push(b'a' + ((i + k) % 26) as u8);
        }
        v.extend_from_slice(b"\r\n");
        i += 1;
    }
    v.extend_from_slice(b".\r\n");
    v
}

/// One transaction, pipelined as a client with PIPELINING sends it.
fn transaction(body: &[u8], rcpts: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"EHLO client.site-a.test\r\n");
    v.extend_from_slice(b"MAIL FROM:<alice@site-a.test> BODY=8BITMIME SIZE=6000\r\n");
    for r in 0..rcpts {
        v.extend_from_slice(format!("RCPT TO:<user{r}@site-b.test>\r\n").as_bytes());
    }
    v.extend_from_slice(b"DATA\r\n");
    v.extend_from_slice(body);
    v.extend_from_slice(b"QUIT\r\n");
    v
}

/// Drive a session over `input` fed in `chunk`-sized reads; returns message bytes seen.
fn run_session(input: &[u8], chunk: usize) -> usize {
    let mut s = ServerSession::new(ServerConfig::default(), "127.0.0.1");
    let mut fed = 0;
    let mut msg = 0;
    loop {
        match s.next_event() {
            Event::NeedInput => {
                if fed >= input.len() {
                    s.eof();
                    continue;
                }
                let end = (fed + chunk).min(input.len());
                s.feed(&input[fed..end]);
                fed = end;
                black_box(s.take_output());
            }
            Event::MailFrom { .. } => s.mail_from_result(Ok(())),
            Event::RcptTo { .. } => s.rcpt_to_result(Ok(())),
            Event::DataStart { .. } => s.data_start_result(Ok(())),
            Event::DataChunk(c) => msg += c.len(),
            Event::DataEnd(env) => {
                black_box(env);
                s.data_end_result(Reply::ok("queued"));
            }
            Event::DataAbort => panic!("message rejected"),
            Event::Receipts(_) => s.receipts_result(Reply::ok("Ok")),
            Event::Quit | Event::Close(_) => break,
        }
    }
    black_box(s.take_output());
    msg
}

fn bench_smtp(c: &mut Criterion) {
    let mut g = c.benchmark_group("smtp/session");
    for (name, size, rcpts) in [("5KB_1rcpt", 5120, 1), ("5KB_10rcpt", 5120, 10)] {
        let input = transaction(&wire_body(size), rcpts);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(name), &input, |b, i| {
            b.iter(|| run_session(black_box(i), 64 * 1024));
        });
    }
    // The same transaction arriving in small reads (one TCP segment at a time).
    let input = transaction(&wire_body(5120), 1);
    g.bench_with_input(
        BenchmarkId::from_parameter("5KB_1rcpt_1448B_reads"),
        &input,
        |b, i| {
            b.iter(|| run_session(black_box(i), 1448));
        },
    );
    g.finish();

    let mut g = c.benchmark_group("smtp/data_receiver");
    for size in [5 * 1024, 64 * 1024, 1024 * 1024] {
        let body = wire_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            let mut out = Vec::with_capacity(body.len());
            b.iter(|| {
                out.clear();
                let mut rx = DataReceiver::new(u64::MAX);
                let n = rx.feed(black_box(body), &mut out);
                assert!(rx.is_done());
                black_box(n)
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_smtp
}
criterion_main!(benches);
