#!/usr/bin/env bash
# Runs both fuzz targets (fuzz/: SIP + SDP parsing, handshake state machines) on stable
# Rust with the mutation runner fuzz/src/bin/smoke.rs, for SECONDS (default 30) in total.
# Exit 1 if a target panics; the input is saved under fuzz/crashes/. See docs/FUZZING.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-30}"
# Shares the main target directory, so the sipmail dependencies are built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release --quiet --manifest-path "$ROOT/fuzz/Cargo.toml" --no-default-features --features smoke --bin smoke
# CI must not fail by luck: a fixed seed and a fixed number of inputs make the smoke run
# the same inputs on every machine (the time limit is only a safety net). Longer, random
# runs are for people: see docs/FUZZING.md.
"$CARGO_TARGET_DIR/release/smoke" --target all --seed "${FUZZ_SEED:-20261122}" \
    --iters "${FUZZ_ITERS:-2000000}" --secs "$((SECS * 4))"
