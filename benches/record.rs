//! The per-byte work of a call's leg, on one core. The record layer: `Sealer::seal_data` +
//! `Opener::open` for record payloads from 64 B to 64 KiB, and each half on its own, with
//! the default suite (ChaCha20-Poly1305); each half of the other suite (AES-256-GCM) for
//! 64 KiB records. And SHA-256, the receipt's digest, which both relays compute over every
//! byte of a message that asks for a receipt (the sender over what it puts on the wire, the
//! receiver over what it takes in). `integration/bench.sh` turns them into a bulk leg's
//! ceiling on the machine, for either suite.
//!
//! Run: `cargo bench --bench record`. Throughput is in payload bytes (criterion prints
//! GiB/s or MiB/s; docs/PERFORMANCE.md converts to GB/s).

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sha2::Digest;
use sipmail::handshake::{DirectionKeys, Suite};
use sipmail::tunnel::record::{Limits, Opened, Opener, Sealer};
use std::hint::black_box;
use std::time::Duration;

const SIZES: &[usize] = &[64, 256, 1024, 4096, 16384, 65536];

fn keys() -> DirectionKeys {
    DirectionKeys {
        key: [0x42; 32],
        iv: [0x24; 12],
    }
}

/// Open every record in `wire`, returning the payload bytes seen.
fn open_all(op: &mut Opener, wire: &mut [u8]) -> usize {
    let mut off = 0;
    let mut seen = 0;
    while off < wire.len() {
        match op.open(&mut wire[off..]) {
            Ok(Some((Opened::Data(r), used))) => {
                seen += r.len();
                off += used;
            }
            Ok(Some((_, used))) => off += used,
            Ok(None) => panic!("short record"),
            Err(e) => panic!("open failed: {e}"),
        }
    }
    seen
}

fn bench_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record/seal+open");
    for &size in SIZES {
        let payload = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, p| {
            let mut sealer = Sealer::new(&keys(), Limits::default());
            let mut opener = Opener::new(&keys());
            let mut wire = Vec::with_capacity(size + 64);
            b.iter(|| {
                wire.clear();
                sealer.seal_data(black_box(p), &mut wire).unwrap();
                black_box(open_all(&mut opener, &mut wire));
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("record/seal");
    for &size in SIZES {
        let payload = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, p| {
            let mut sealer = Sealer::new(&keys(), Limits::default());
            let mut wire = Vec::with_capacity(size + 64);
            b.iter(|| {
                wire.clear();
                sealer.seal_data(black_box(p), &mut wire).unwrap();
                black_box(&wire);
            });
        });
    }
    g.finish();

    // Opening alone: each iteration opens the first record of a fresh Opener; making the
    // Opener and copying the record happen in the untimed setup.
    let mut g = c.benchmark_group("record/open");
    for &size in SIZES {
        let mut wire = Vec::new();
        Sealer::new(&keys(), Limits::default())
            .seal_data(&vec![0xa5u8; size], &mut wire)
            .unwrap();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, w| {
            b.iter_batched_ref(
                || (Opener::new(&keys()), w.clone()),
                |(op, buf)| black_box(open_all(op, buf)),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();

    // The other suite, for bulk records only: seal and open each on its own, as above.
    let size = 65536;
    let payload = vec![0xa5u8; size];
    let mut wire = Vec::new();
    Sealer::with_suite(Suite::Aes256Gcm, &keys(), Limits::default())
        .seal_data(&payload, &mut wire)
        .unwrap();
    let mut g = c.benchmark_group("record/aes-256-gcm");
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("seal/65536", |b| {
        let mut sealer = Sealer::with_suite(Suite::Aes256Gcm, &keys(), Limits::default());
        let mut out = Vec::with_capacity(size + 64);
        b.iter(|| {
            out.clear();
            sealer.seal_data(black_box(&payload), &mut out).unwrap();
            black_box(&out);
        });
    });
    g.bench_function("open/65536", |b| {
        b.iter_batched_ref(
            || (Opener::with_suite(Suite::Aes256Gcm, &keys()), wire.clone()),
            |(op, buf)| black_box(open_all(op, buf)),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn bench_digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest/sha256");
    for size in [4096usize, 65536] {
        let data = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, d| {
            // One hasher fed chunk after chunk, as the tap and the wire hash are.
            let mut h = sha2::Sha256::new();
            b.iter(|| h.update(black_box(d)));
            black_box(h.finalize());
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_record, bench_digest
}
criterion_main!(benches);
