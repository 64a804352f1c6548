#!/usr/bin/env bash
# Issue 14, large documents: one file of SEND_MB MB (10^6 bytes, default 2000) through
# `sipmail send` end to end: the command builds the MIME message and hands it to sipmail A,
# A sends it through a signed call to sipmail B (fsync at both ends, B signs the receipt),
# B delivers to smtp-sink; `sipmail send` exits 0 once the verified receipt is stored.
#
# Reports: the A->B leg (A's "queued" to A's "receipt verified and stored", from the log
# timestamps) in MB/s of message bytes; the whole command's time; each relay's peak RSS
# above idle (VmHWM after clear_refs). Targets (issue 14): >= 200 MB/s on the leg, and
# < 64 MB above idle at both relays.
#
#   integration/bench-send.sh            # 2000 MB
#   SEND_MB=200 integration/bench-send.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SEND_MB=${SEND_MB:-2000}
SIPMAIL=${SIPMAIL:-$ROOT/target/release/sipmail}
[ -x "$SIPMAIL" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -x /usr/sbin/smtp-sink ] || { echo "bench-send: smtp-sink (Postfix) not found" >&2; exit 1; }
# shellcheck source=lib/postfix.sh
. "$ROOT/integration/lib/postfix.sh"
# shellcheck source=lib/sites.sh
. "$ROOT/integration/lib/sites.sh" # exchange_keys, site_config
scratch sipmail-sendbench
cd "$WORK"
exchange_keys >keys.log 2>&1
read -r P_A P_SIP_A P_SIP_B P_B SINK <<<"$(free_ports 5)"
BIGMAX="max_message_size = $((SEND_MB * 1000000 * 14 / 10 + 1000000))"
site_config site-a site-b "$P_A" "$P_SIP_A" "$P_SIP_B" 'maildir = "var/site-a/maildir"' \
    | sed "s/^max_message_size = .*/$BIGMAX/" >a.toml
site_config site-b site-a "$P_B" "$P_SIP_B" "$P_SIP_A" "smtp = \"127.0.0.1:$SINK\"" \
    | sed "s/^max_message_size = .*/$BIGMAX/" >b.toml
"$SIPMAIL" run --config b.toml >>b.log 2>&1 & SM_B=$!; PIDS+=("$SM_B")
"$SIPMAIL" run --config a.toml >>a.log 2>&1 & SM_A=$!; PIDS+=("$SM_A")
wait_port "$P_A" 20 && wait_port "$P_B" 20 || { echo "daemons did not start"; exit 1; }
counting_sink "$SINK" sink.cnt; PIDS+=("$SINK_PID")
wait_port "$SINK" 10
echo "bench-send: $SEND_MB MB, $(nproc) vCPU, git $(git -C "$ROOT" rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   writing the file ($SEND_MB MB of random bytes)"
head -c $((SEND_MB * 1000000)) /dev/urandom >doc.bin
sleep 0.5
reset_hwm "$SM_A"; reset_hwm "$SM_B"
IDLE_A=$(rss_kb "$SM_A"); IDLE_B=$(rss_kb "$SM_B")
t0=$(now_ns)
"$SIPMAIL" send -c a.toml --to bob@site-b.test --wait 900s doc.bin >send.out 2>send.err || {
    echo "sipmail send failed:"; tail -5 send.err send.out; exit 1; }
t1=$(now_ns)
HWM_A=$(hwm_kb "$SM_A"); HWM_B=$(hwm_kb "$SM_B")
cat send.out
python3 - "$WORK" "$SEND_MB" "$t0" "$t1" "$IDLE_A" "$HWM_A" "$IDLE_B" "$HWM_B" <<'PY'
import re, sys, datetime
work, mb, t0, t1, ia, ha, ib, hb = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
log = open(f"{work}/a.log", encoding="utf-8", errors="replace").read().splitlines()
def ts(line):
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
queued = [l for l in log if " queued " in l and "client=127.0.0.1" in l]
done = [l for l in log if "receipt verified and stored" in l]
size = int(re.search(r"size=(\d+)", queued[-1]).group(1))
leg = ts(done[-1]) - ts(queued[-1])
print(f"   message {size/1e6:.0f} MB (base64 of {mb} MB); A->B leg (queued at A -> receipt stored at A): "
      f"{leg:.1f} s, {size/1e6/leg:.0f} MB/s (target >= 200)")
print(f"   sipmail send, start to verified receipt: {(t1-t0)/1e9:.1f} s")
print(f"   peak RSS above idle: sipmail A {(ha-ia)/1024:.0f} MB, sipmail B {(hb-ib)/1024:.0f} MB (target < 64 each)")
PY
