#!/usr/bin/env bash
# The project's test command: unit and in-process tests, then the real-peer suites.
# Needs gpg, sq, sipp, swaks and tshark (.ci/run installs them on Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test --release"
cargo test --release
echo "== integration/check_vectors.py (PROTOCOL.md vectors recomputed independently in Python)"
python3 integration/check_vectors.py
echo "== integration/two-daemons.sh (two sipmail daemons, swaks, tshark capture)"
integration/two-daemons.sh
echo "== all tests passed"
