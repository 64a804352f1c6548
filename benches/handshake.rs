//! The full sipmail handshake computed in memory with real OpenPGP keys (Ed25519, made by
//! `Keyring::generate`), both sides, and the time each side spends counted on its own.
//!
//! - `handshake/both_sides`: offer, answer (sign T1), confirm (verify T1, sign T2),
//!   callee check (verify T2), key schedule on both ends. One iteration = one call.
//! - `handshake/caller_side`, `handshake/callee_side`: the same full handshake, but only
//!   the named side's work is timed (`iter_custom`), so 1 / time = handshakes per second
//!   per side per core.
//! - `handshake/parts/*`: one OpenPGP signature, one verification, one X25519 key pair
//!   and shared secret (as the handshake computes it, and with x25519-dalek's ladder);
//!   and the floor under a side: a raw Ed25519 signature and strict verification.
//!
//! Run: `cargo bench --bench handshake`.

use criterion::{Criterion, criterion_group, criterion_main};
use sipmail::handshake::{CallContext, CalleeAwaitConfirm, CallerAwaitAnswer, Suite};
use sipmail::keyring::Keyring;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

// The relay's own OpenPGP signer and verifier, so the bench measures what calls use.
use sipmail::relay::{KeyringSigner as Sign, PeerVerifier as Verify};

struct Sites {
    _dir: tempfile::TempDir,
    a: Keyring,
    b: Keyring,
    a_fpr: Vec<u8>,
    b_fpr: Vec<u8>,
}

fn sites() -> Sites {
    let dir = tempfile::tempdir().unwrap();
    let ka = dir.path().join("site-a");
    let kb = dir.path().join("site-b");
    Keyring::generate(&ka, "site-a.test").unwrap();
    Keyring::generate(&kb, "site-b.test").unwrap();
    let pub_a = Keyring::open(&ka).unwrap().export_public().unwrap();
    let pub_b = Keyring::open(&kb).unwrap().export_public().unwrap();
    Keyring::import(&kb, pub_a.as_bytes()).unwrap();
    Keyring::import(&ka, pub_b.as_bytes()).unwrap();
    let open = |p: &Path| Keyring::open(p).unwrap();
    let (a, b) = (open(&ka), open(&kb));
    let a_fpr = hex::decode(a.own_fingerprint().unwrap()).unwrap();
    let b_fpr = hex::decode(b.own_fingerprint().unwrap()).unwrap();
    Sites {
        _dir: dir,
        a,
        b,
        a_fpr,
        b_fpr,
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

/// One full handshake; returns (caller time, callee time).
fn handshake(s: &Sites, n: u64) -> (Duration, Duration) {
    let ctx = CallContext {
        call_id: format!("bench{n}@site-a.test"),
        from_tag: "a1b2c3d4".into(),
        to_tag: "e5f6a7b8".into(),
        caller: "mail@site-a.test".into(),
        callee: "mail@site-b.test".into(),
    };
    let a_sign = Sign(&s.a);
    let b_sign = Sign(&s.b);
    let a_verify = Verify {
        keyring: &s.a,
        domain: "site-b.test",
    };
    let b_verify = Verify {
        keyring: &s.b,
        domain: "site-a.test",
    };
    // The randomness a relay draws per call is drawn outside the timed regions.
    let (ea, nonce, eb) = (random32(), random32(), random32());

    let t = Instant::now();
    let caller = CallerAwaitAnswer::new(ea, nonce, Suite::ALL.to_vec(), s.a_fpr.clone());
    let mut caller_time = t.elapsed();

    let t = Instant::now();
    let (callee, answer) = CalleeAwaitConfirm::respond(
        &ctx,
        caller.offer(),
        eb,
        Suite::ALL,
        s.b_fpr.clone(),
        &b_sign,
    )
    .unwrap();
    let mut callee_time = t.elapsed();

    let t = Instant::now();
    let done_a = caller.on_answer(&ctx, &answer, &a_verify, &a_sign).unwrap();
    caller_time += t.elapsed();

    let t = Instant::now();
    let done_b = callee.on_confirm(&done_a.confirm, &b_verify).unwrap();
    callee_time += t.elapsed();

    assert_eq!(done_a.keys.transcript_hash, done_b.keys.transcript_hash);
    black_box((done_a, done_b));
    (caller_time, callee_time)
}

fn bench_handshake(c: &mut Criterion) {
    let s = sites();
    let mut g = c.benchmark_group("handshake");
    g.bench_function("both_sides", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            handshake(&s, n)
        });
    });
    g.bench_function("caller_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|n| handshake(&s, n).0).sum());
    });
    g.bench_function("callee_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|n| handshake(&s, n).1).sum());
    });
    g.finish();

    let mut g = c.benchmark_group("handshake/parts");
    let data = vec![0x5au8; 400]; // about the size of T2
    g.bench_function("openpgp_sign", |b| {
        b.iter(|| s.a.sign_detached(black_box(&data)).unwrap());
    });
    let fpr = hex::encode_upper(&s.a_fpr);
    // A fresh signature each time (made outside the clock), as in a real handshake: Sequoia
    // caches the result of verifying a signature it has seen, so verifying one signature
    // over and over measured that cache (12 µs), not the verification (about 150 µs).
    g.bench_function("openpgp_verify", |b| {
        b.iter_batched(
            || s.a.sign_detached(&data).unwrap(),
            |sig| {
                s.b.verify_detached("site-a.test", &fpr, black_box(&data), &sig)
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        );
    });
    // What a handshake side does: its key pair (x25519-dalek's fixed-base table), then the
    // shared secret (`sipmail::handshake::x25519`, the Edwards form on the vector backends).
    use x25519_dalek::{PublicKey, StaticSecret};
    let peer = PublicKey::from(&StaticSecret::from([7u8; 32]));
    g.bench_function("x25519_keypair_and_dh", |b| {
        b.iter(|| {
            let s = StaticSecret::from(black_box([9u8; 32]));
            let p = PublicKey::from(&s);
            black_box((
                p,
                sipmail::handshake::x25519(&s.to_bytes(), peer.as_bytes()),
            ))
        });
    });
    // The same with x25519-dalek's Montgomery ladder, as before run 36, for comparison.
    g.bench_function("x25519_keypair_and_ladder_dh", |b| {
        b.iter(|| {
            let s = StaticSecret::from(black_box([9u8; 32]));
            let p = PublicKey::from(&s);
            black_box((p, s.diffie_hellman(&peer)))
        });
    });
    // The floor under a side: the same X25519 as above plus one raw Ed25519 signature and
    // one strict verification (as the handshake's fast paths make them: ed25519-dalek's
    // signing, and `sipmail::keyring::ed25519::StrictKey`, the strict equation without a
    // field inversion) over a 32-byte digest, the input an OpenPGP EdDSA signature signs,
    // with no OpenPGP packet around them. A side's time above the sum of these three is
    // the handshake's own work (the packets, the transcript, the key schedule); below it
    // no code on these libraries can go on this CPU. ed25519-dalek's own `verify_strict`
    // (which the handshake used before) is measured beside it.
    use ed25519_dalek::{Signer, SigningKey};
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let public = key.verifying_key();
    let strict = sipmail::keyring::ed25519::StrictKey::from_bytes(&public.to_bytes()).unwrap();
    let digest = [0x5au8; 32];
    g.bench_function("ed25519_sign_raw", |b| {
        b.iter(|| key.sign(black_box(&digest)));
    });
    // A fresh signature each time (made outside the clock), as for the OpenPGP
    // verification above.
    let mut n = 0u8;
    let mut fresh = || {
        n = n.wrapping_add(1);
        let d = [n; 32];
        (d, key.sign(&d))
    };
    g.bench_function("ed25519_verify_strict_raw", |b| {
        b.iter_batched(
            &mut fresh,
            |(d, sig)| assert!(strict.verify_strict(black_box(&d), &sig.to_bytes())),
            criterion::BatchSize::SmallInput,
        );
    });
    g.bench_function("ed25519_verify_strict_dalek", |b| {
        b.iter_batched(
            &mut fresh,
            |(d, sig)| public.verify_strict(black_box(&d), &sig).unwrap(),
            criterion::BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_handshake
}
criterion_main!(benches);
