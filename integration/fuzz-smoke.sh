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
"$CARGO_TARGET_DIR/release/smoke" --target all --secs "$SECS"
