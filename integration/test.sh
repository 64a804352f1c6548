#!/usr/bin/env bash
# The project's test command: unit and in-process tests, then the real-peer suites.
# Needs gpg, sq, sipp, swaks, tshark, postfix, prometheus and curl:
# integration/install-peers.sh installs them on Debian when run as root, and otherwise
# says what to run.
set -euo pipefail
cd "$(dirname "$0")/.."
integration/install-peers.sh
echo "== cargo test --release"
cargo test --release
echo "== integration/check_vectors.py (PROTOCOL.md vectors recomputed independently in Python)"
python3 integration/check_vectors.py
echo "== integration/check-unit.sh (contrib/sipmail.service passes systemd-analyze verify)"
integration/check-unit.sh
echo "== integration/two-daemons.sh (two sipmail daemons, swaks, tshark capture, verify-call + gpg on the call records)"
integration/two-daemons.sh
echo "== integration/postfix-chain.sh (Postfix A -> sipmail A -> sipmail B -> Postfix B; bounces; kill -9, peer down, MTA down)"
integration/postfix-chain.sh
echo "== integration/prometheus.sh (a real Prometheus scrapes two daemons: the figures match the mail sent and the failed call; /healthz, /readyz 503 on an unwritable spool)"
integration/prometheus.sh
echo "== integration/nat.sh (relays in two network namespaces joined through a NAT: sip.advertise + sip.media_ports get the mail through, either missing does not; needs root)"
integration/nat.sh
echo "== integration/sipp.sh (SIPp against two daemons over UDP and TCP: OPTIONS, a phone's INVITE, a 1,000/s INVITE flood while mail flows; tshark)"
integration/sipp.sh
echo "== fuzz smoke (stable Rust, four targets, fixed seed and inputs, about 30 s; docs/FUZZING.md)"
integration/fuzz-smoke.sh 30
echo "== integration/compose.sh (docker-compose.yml: two sites, a message A -> B, B cut off the wan 60 s and killed; skipped without a Docker engine)"
integration/compose.sh
echo "== all tests passed"
