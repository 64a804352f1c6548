//! Queue commit as SMTP intake makes it: a 5 KB body through `Spool::body_writer`, then
//! `Spool::commit_parts` (a body this small: write body and envelope, rename both into
//! `queue/`, then the body's and the envelope's fdatasync and the fsync of `queue/` side by
//! side). Single, and N commits at once on a multi-threaded tokio runtime (what N parallel
//! SMTP sessions do).
//!
//! The spool lives in a temporary folder under `SIPMAIL_BENCH_DIR` (default: the system
//! temp dir), so the figure is that file system's fsync cost. Committed files are removed
//! outside the timed region.
//!
//! Also: start-up recovery of 2,000 queued messages, with and without the bodies' checksum
//! check.
//!
//! Run: `cargo bench --bench queue`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sipmail::queue::{Envelope, RcptState, Recipient, Route, Spool};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn envelope(id: &str, size: u64) -> Envelope {
    Envelope {
        id: id.into(),
        received: 1,
        client: "127.0.0.1".into(),
        helo: "client.site-a.test".into(),
        mail_from: "alice@site-a.test".into(),
        recipients: vec![Recipient {
            addr: "bob@site-b.test".into(),
            route: Route::Peer("site-b.test".into()),
            state: RcptState::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            dsn: Default::default(),
            delay_warned: false,
            pin: None,
        }],
        size,
        body_8bit: false,
        smtputf8: false,
        ret: None,
        envid: None,
        held: false,
        expired: false,
        receipt: None,
        decoded: None,
        body_crc32: None,
        body_inline: None,
    }
}

/// One commit as SMTP intake makes it: the body through the spool's body writer, then
/// `commit_parts` (for a body this small, the side-by-side commit).
async fn commit_one(spool: &Spool, body: &[u8]) -> String {
    let id = Spool::new_id();
    let mut w = spool.body_writer(&id);
    w.write_all(body).await.unwrap();
    let sipmail::queue::bodyio::Finished { file, tail, .. } = w.finish().await.unwrap();
    spool
        .commit_parts(file, tail, &envelope(&id, body.len() as u64))
        .await
        .unwrap();
    id
}

fn cleanup(root: &Path, ids: &[String]) {
    for id in ids {
        let _ = std::fs::remove_file(root.join("queue").join(format!("{id}.msg")));
        let _ = std::fs::remove_file(root.join("queue").join(format!("{id}.env")));
    }
}

/// A spool in a temporary folder, a multi-threaded runtime and a 5 KB body.
struct Bench {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    spool: Spool,
    rt: tokio::runtime::Runtime,
    body: Vec<u8>,
}

impl Bench {
    fn new() -> Bench {
        let base = std::env::var_os("SIPMAIL_BENCH_DIR").map(std::path::PathBuf::from);
        let dir = match &base {
            Some(b) => tempfile::tempdir_in(b).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let root = dir.path().join("spool");
        let (spool, _) = Spool::open(&root).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        Bench {
            _dir: dir,
            root,
            spool,
            rt,
            body: vec![b'x'; 5120],
        }
    }
}

fn bench_queue(c: &mut Criterion) {
    let bench = Bench::new();
    let (root, spool, rt, body) = (&bench.root, &bench.spool, &bench.rt, &bench.body);

    let mut g = c.benchmark_group("queue/commit_5KB");
    for n in [1usize, 10, 50] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("concurrent", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let ids = rt.block_on(async {
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..n {
                            let (s, b) = (spool.clone(), body.clone());
                            set.spawn(async move { commit_one(&s, &b).await });
                        }
                        set.join_all().await
                    });
                    total += t.elapsed();
                    cleanup(root, &ids);
                }
                total
            });
        });
    }
    g.finish();
}

/// Start-up recovery of 2,000 queued 5 KB messages (page cache warm): fresh from the
/// side-by-side commit, so each body is read against its envelope's CRC-32, and then the
/// same messages once tried (an envelope rewrite leaves the checksum out: nothing to read).
fn bench_recover(c: &mut Criterion) {
    const N: usize = 2000;
    let bench = Bench::new();
    let (root, spool, rt, body) = (&bench.root, &bench.spool, &bench.rt, &bench.body);
    let ids = rt.block_on(async {
        let mut ids = Vec::with_capacity(N);
        for _ in 0..N {
            ids.push(commit_one(spool, body).await);
        }
        ids
    });
    let recover = || {
        let r = Spool::recover(root).unwrap();
        assert_eq!(r.envelopes.len(), N);
    };
    let mut g = c.benchmark_group("queue/recover_5KB");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("fresh_2000", |b| b.iter(recover));
    rt.block_on(async {
        for id in &ids {
            spool.update(&envelope(id, 5120)).await.unwrap();
        }
    });
    g.bench_function("tried_2000", |b| b.iter(recover));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_queue, bench_recover
}
criterion_main!(benches);
