#!/usr/bin/env bash
# Runs the four fuzz targets (fuzz/: SIP + SDP parsing, handshake state machines, the
# record layer, key import and parsing) on stable Rust with the mutation runner
# fuzz/src/bin/smoke.rs. Exit 1 if a target panics; the input is saved under
# fuzz/crashes/. See docs/FUZZING.md.
#
# SECONDS (default 30) is only a safety net against a slow machine: CI must not fail by
# luck, so the run is a fixed seed and a fixed number of inputs per target, the same
# inputs on every machine, sized to take about 30 s in total on a loaded 2-core machine.
# Longer, random runs are for people: see docs/FUZZING.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-30}"
# Shares the main target directory, so the sipmail dependencies are built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release --quiet --manifest-path "$ROOT/fuzz/Cargo.toml" --no-default-features --features smoke --bin smoke
# Inputs per target: the targets differ in speed by two orders of magnitude (key import
# parses and verifies OpenPGP certificates and writes a keyring for each input).
ITERS="${FUZZ_ITERS_EACH:-sip_parse=400000,handshake=400000,record=150000,key_import=1500}"
"$CARGO_TARGET_DIR/release/smoke" --target all --seed "${FUZZ_SEED:-20261122}" \
    --iters-each "$ITERS" --secs "$((SECS * 4))"
