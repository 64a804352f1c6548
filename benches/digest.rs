//! SHA-256 throughput on one core: the receipt's digest, which both relays compute over
//! every byte of a message that asks for a receipt (the sender over what it puts on the
//! wire, the receiver over what it takes in). With the record layer's seal and open
//! (`benches/record.rs`) it is the per-byte work no faster code can leave out of a call's
//! leg; `integration/bench.sh` turns the two into the leg's ceiling on this machine.
//!
//! Run: `cargo bench --bench digest`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sha2::Digest;
use std::hint::black_box;
use std::time::Duration;

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
    targets = bench_digest
}
criterion_main!(benches);
