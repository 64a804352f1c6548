//! Stable-Rust fuzzing of the same targets `cargo fuzz` runs, for machines
//! without nightly: start from seed inputs, mutate (no coverage feedback),
//! run each target, stop at the first panic and save the input.
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --no-default-features --features smoke --bin smoke -- \
//!     [--target sip|handshake|record|key_import|all] (or a comma-separated list) [--secs 30] [--iters N] [--seed S] [--max-len 8192]
//!     [--dump-seeds DIR]
//! ```
//! Prints the number of executions per target. Exit 1 on a panic (the input
//! is written to fuzz/crashes/).

use sipmail_fuzz::{
    Mutator, cleanup_key_import, handshake_target, key_import_target, record_target,
    seeds_handshake, seeds_key_import, seeds_record, seeds_sip, sip_target,
};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

struct Target {
    name: &'static str,
    run: fn(&[u8]),
    corpus: Vec<Vec<u8>>,
    execs: u64,
    secs: f64,
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which: String = arg(&args, "--target", "all".to_string());
    let secs: u64 = arg(&args, "--secs", 30);
    let iters: u64 = arg(&args, "--iters", u64::MAX);
    let max_len: usize = arg(&args, "--max-len", 8192);
    let seed: u64 = arg(
        &args,
        "--seed",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    // `--iters-each` overrides the equal share of --iters per target, e.g.
    // `--iters-each record=40000,key_import=3000` for targets of very different speeds.
    let iters_each_arg: String = arg(&args, "--iters-each", String::new());
    type Entry = (&'static str, &'static str, fn(&[u8]), fn() -> Vec<Vec<u8>>);
    let all: [Entry; 4] = [
        ("sip", "sip_parse", sip_target, seeds_sip),
        ("handshake", "handshake", handshake_target, seeds_handshake),
        ("record", "record", record_target, seeds_record),
        (
            "key_import",
            "key_import",
            key_import_target,
            seeds_key_import,
        ),
    ];
    let wanted: Vec<&str> = which.split(',').collect();
    let mut targets: Vec<Target> = Vec::new();
    for (short, name, run, seeds) in all {
        if wanted
            .iter()
            .any(|w| *w == "all" || *w == short || *w == name)
        {
            targets.push(Target {
                name,
                run,
                corpus: seeds(),
                execs: 0,
                secs: 0.0,
            });
        }
    }
    if targets.is_empty() || wanted.len() > targets.len() && !wanted.contains(&"all") {
        eprintln!(
            "unknown --target {which}: use sip, handshake, record, key_import, all, or a comma-separated list"
        );
        std::process::exit(2);
    }
    // `--dump-seeds DIR`: write the seed inputs as libFuzzer corpora (DIR/sip_parse/,
    // DIR/handshake/) and stop.
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--dump-seeds")
        .and_then(|i| args.get(i + 1))
    {
        for t in &targets {
            let d = std::path::Path::new(dir).join(t.name);
            std::fs::create_dir_all(&d).expect("creating the corpus directory");
            for (i, s) in t.corpus.iter().enumerate() {
                std::fs::write(d.join(format!("seed-{i:03}")), s).expect("writing a seed");
            }
            println!("smoke: {} seeds in {}", t.corpus.len(), d.display());
        }
        return;
    }
    // Panics are what we look for: keep the default hook quiet, report ourselves.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Mutator::new(seed);
    let start = Instant::now();
    println!("smoke: seed {seed}, {secs} s, max input {max_len} bytes");
    // Seeds first, unmutated.
    for t in &mut targets {
        for input in t.corpus.clone() {
            check(t.name, t.run, &input);
            t.execs += 1;
        }
    }
    // Each target gets an equal share of the time (and of --iters).
    let n = targets.len() as u32;
    let share = Duration::from_secs(secs) / n;
    for t in &mut targets {
        let iters_each = iters_each_arg
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == t.name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(iters / n as u64);
        let t_start = Instant::now();
        let mut done: u64 = 0;
        while done < iters_each && t_start.elapsed() < share {
            for _ in 0..64 {
                let i = rng.below(t.corpus.len());
                let j = rng.below(t.corpus.len());
                let mut input = t.corpus[i].clone();
                let other = t.corpus[j].clone();
                rng.mutate(&mut input, &other, max_len);
                check(t.name, t.run, &input);
                t.execs += 1;
                done += 1;
                // Without coverage feedback, keep a bounded random sample of mutants
                // so mutations can stack up.
                if rng.below(64) == 0 {
                    if t.corpus.len() < 4096 {
                        t.corpus.push(input);
                    } else {
                        let k = rng.below(t.corpus.len());
                        t.corpus[k] = input;
                    }
                }
            }
        }
        t.secs = t_start.elapsed().as_secs_f64();
    }
    for t in &targets {
        println!(
            "smoke: {}: {} executions in {:.1} s ({:.0}/s), no panic",
            t.name,
            t.execs,
            t.secs,
            t.execs as f64 / t.secs.max(0.001)
        );
    }
    println!("smoke: total {:.1} s", start.elapsed().as_secs_f64());
    cleanup_key_import();
}

fn check(name: &str, run: fn(&[u8]), input: &[u8]) {
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(input))) {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{name}-{:016x}.bin", fxhash(input)));
        let _ = std::fs::write(&file, input);
        eprintln!(
            "smoke: {name} PANICKED: {msg}\n  input ({} bytes) saved to {}\n  {:?}",
            input.len(),
            file.display(),
            String::from_utf8_lossy(&input[..input.len().min(400)])
        );
        cleanup_key_import();
        std::process::exit(1);
    }
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100_0000_01b3)
    })
}
