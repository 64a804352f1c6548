#!/usr/bin/env bash
# contrib/sipmail.service passes `systemd-analyze verify` with no complaint at all (unknown
# keys are only warnings there, so any output fails this check). The unit's binary path is
# pointed at this tree's release build, since verify checks that ExecStart is executable.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: skipped, systemd-analyze not found (apt-get install systemd)"
    exit 0
fi
bin="${SIPMAIL_BIN:-$ROOT/target/release/sipmail}"
[ -x "$bin" ] || { echo "check-unit: $bin not built (cargo build --release)" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s|/usr/local/bin/sipmail|$bin|g" "$ROOT/contrib/sipmail.service" >"$dir/sipmail.service"
out=$(systemd-analyze verify "$dir/sipmail.service" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "check-unit: systemd-analyze verify complained:" >&2
    echo "$out" >&2
    exit 1
fi
echo "check-unit: contrib/sipmail.service verifies clean ($(systemd-analyze --version | head -1))"
