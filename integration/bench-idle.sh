#!/usr/bin/env bash
# RSS of one relay holding many idle calls, measured, not extrapolated; and how fast that
# relay set the calls up with many peers at once. Run by integration/bench.sh; alone:
#
#   integration/bench-idle.sh                          # 1,000 calls from 16 caller relays
#   IDLE_CALLS=200 IDLE_CALLERS=4 integration/bench-idle.sh
#   PERF=/tmp/setup.perf integration/bench-idle.sh     # also perf record -a -g of the set-up
#                                                      # (PERF_EVENTS="-e ..." adds events)
#   SETTLE=370 integration/bench-idle.sh               # sync, wait 370 s, then set up
#   RATE_OUT=/tmp/rates integration/bench-idle.sh      # also append the calls/s figure to a file
#
# SETTLE: on ext4 without a journal every new inode scans past the inodes freed in the last
# 60 s (360 s while their inode table block is dirty); integration/bench.sh waits before
# its 16-caller set-up so that what earlier steps freed does not count against the relays.
#
# One callee relay (callee.test) and IDLE_CALLERS caller relays c01.test, c02.test, ...,
# each with its own OpenPGP key, its own loopback address 127.0.1.N for SIP and media, and
# sip.calls_per_peer set to its share of IDLE_CALLS (at most 64, the configuration's
# limit). The calls are placed all at once: first each caller queues `share` small messages
# (smtp-source, `share` parallel sessions) while the callee is not running yet, so that each
# of its lanes is busy with an INVITE nobody answers when the next message comes; the
# callers are stopped (the messages stay in their spools), the callee is started, and the
# callers are started again: each one's first scheduler round hands one message to every
# lane, and every lane places its call at once. (A lane takes a job only when it is idle,
# and the lane idle last first, so mail that trickles in reuses calls instead of placing
# new ones: bursts of mail alone no longer make every lane call.) The calls then stay up,
# idle, because call_idle is 10 minutes. A caller short of its share gets a burst of
# 2 x share messages, at most IDLE_BURSTS in all. Then the callee's RSS is read, with the
# count of calls up.
#
# The callee is configured as a hub would be: up to 64 unanswered INVITEs per source and
# 1,024 in all (the defaults, 16 and 256, are for a site with a few partners).
#
# Appends to $OUT/results.txt. Needs smtp-source (package postfix) and python3.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IDLE_CALLS=${IDLE_CALLS:-1000}
IDLE_CALLERS=${IDLE_CALLERS:-16}
IDLE_BURSTS=${IDLE_BURSTS:-4}
SETTLE=${SETTLE:-0}
OUT=${OUT:-$ROOT/target/bench}
mkdir -p "$OUT"

say() { printf '%s\n' "$*" | tee -a "$OUT/results.txt"; }
die() { echo "bench-idle: $*" >&2; exit 1; }

[ -x /usr/sbin/smtp-source ] || die "/usr/sbin/smtp-source not found (apt-get install postfix)"
[ -z "${PERF:-}" ] || command -v perf >/dev/null || die "PERF is set but perf is not installed (apt-get install linux-perf)"
SHARE=$(((IDLE_CALLS + IDLE_CALLERS - 1) / IDLE_CALLERS))
((SHARE >= 1 && SHARE <= 64)) || die "IDLE_CALLS/IDLE_CALLERS = $SHARE calls per caller; it must be 1..64 (sip.calls_per_peer)"
((IDLE_CALLERS <= 250)) || die "IDLE_CALLERS must be at most 250 (one loopback address each)"
# The file descriptors: the callee holds one media connection per call.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# SIPMAIL=/path/to/binary compares builds (A/B); by default the release build of this tree.
if [ -z "${SIPMAIL:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    SIPMAIL="$ROOT/target/release/sipmail"
fi
# shellcheck source=lib/postfix.sh
. "$ROOT/integration/lib/postfix.sh" # free_ports, wait_port, wait_addr, rss_kb, now_ns, scratch
scratch sipmail-idle
IC=$WORK

say ""
say "== RSS with idle calls: $IDLE_CALLERS caller relays place $IDLE_CALLS calls (up to $SHARE each) to one callee relay"
CALLERS=()
for n in $(seq 1 "$IDLE_CALLERS"); do CALLERS+=("$(printf 'c%02d' "$n")"); done
share_of() { # caller index (0-based) -> its share of IDLE_CALLS
    local i=$1 s=$((IDLE_CALLS / IDLE_CALLERS)) r=$((IDLE_CALLS % IDLE_CALLERS))
    echo $((s + (i < r ? 1 : 0)))
}
(
    cd "$IC"
    "$SIPMAIL" keys generate --keyring keyring/callee --domain callee.test
    "$SIPMAIL" keys export --keyring keyring/callee >callee.asc
    for c in "${CALLERS[@]}"; do
        "$SIPMAIL" keys generate --keyring "keyring/$c" --domain "$c.test"
        "$SIPMAIL" keys import --keyring "keyring/$c" callee.asc
        "$SIPMAIL" keys export --keyring "keyring/$c" >"$c.asc"
        "$SIPMAIL" keys import --keyring keyring/callee "$c.asc"
    done
) >"$IC/keys.log" 2>&1 || die "key setup failed: $(tail -3 "$IC/keys.log")"

read -r P_CB_SIP P_CB_SMTP <<<"$(free_ports 2)"
# Each caller listens on its own loopback address at fixed ports below the ephemeral
# range: its daemon is started twice (see above), and a port picked free at the start may
# by then be the local port of one of the 10,000 media connections ("Address already in
# use" at the restart, seen at 10,000 calls).
CALLER_SIP_PORT=25260
CALLER_SMTP_PORT=25250
{
    printf '[relay]\ndomain = "callee.test"\nkeyring = "keyring/callee"\nspool = "var/callee/spool"\n'
    printf '[smtp]\nlisten = "127.0.0.1:%s"\n' "$P_CB_SMTP"
    printf '[sip]\nlisten = "127.0.0.1:%s"\nmedia = "127.0.0.1"\ncall_idle = "10m"\n' "$P_CB_SIP"
    printf 'max_pending_per_source = 64\nmax_pending_total = 1024\n'
    for i in "${!CALLERS[@]}"; do
        printf '[[peer]]\ndomain = "%s.test"\nsip = "sip:mail@127.0.1.%d:%s"\n' "${CALLERS[$i]}" $((i + 1)) "$CALLER_SIP_PORT"
    done
    printf '[delivery]\nmaildir = "var/callee/maildir"\n'
} >"$IC/callee.toml"

CALLER_PIDS=()
CALLER_SMTP=()
# The callers are load generators, each with at most 64 calls (and as many messages):
# 256 spare files cover one, where the default 1,024 would have 160 callers make 164,000
# inodes at their first start (0.35 ms each on this VM's ext4) and free them at the end.
for i in "${!CALLERS[@]}"; do
    c=${CALLERS[$i]}
    CALLER_SMTP+=("127.0.1.$((i + 1))")
    cat >"$IC/$c.toml" <<EOF
[relay]
domain = "$c.test"
keyring = "keyring/$c"
spool = "var/$c/spool"
[smtp]
listen = "127.0.1.$((i + 1)):$CALLER_SMTP_PORT"
allow = ["127.0.0.0/8"]
[sip]
listen = "127.0.1.$((i + 1)):$CALLER_SIP_PORT"
media = "127.0.1.$((i + 1))"
call_idle = "10m"
calls_per_peer = $(share_of "$i")
[[peer]]
domain = "callee.test"
sip = "sip:mail@127.0.0.1:$P_CB_SIP"
[delivery]
maildir = "var/$c/maildir"
[queue]
spare_files = 256
EOF
done
up() { # calls up in a log: established minus ended
    local e x
    e=$(grep -c "call established" "$1" || true)
    x=$(grep -c "call ended" "$1" || true)
    echo $((e - x))
}
total_up() { up "$IC/callee.log"; }
start_callers() {
    CALLER_PIDS=()
    local i c
    for i in "${!CALLERS[@]}"; do
        c=${CALLERS[$i]}
        (cd "$IC" && exec "$SIPMAIL" run --config "$c.toml" >>"$c.log" 2>&1) & PIDS+=($!); CALLER_PIDS+=($!)
    done
    for i in "${!CALLERS[@]}"; do
        wait_addr "${CALLER_SMTP[$i]}" "$CALLER_SMTP_PORT" 30 || die "caller ${CALLERS[$i]} did not start: $(tail -5 "$IC/${CALLERS[$i]}.log")"
    done
}
# Wait until every call is up, or until no call came up for STALL_S seconds, at most $1
# seconds. A call the callee refused with 503 (its admission control) is tried again when
# its Retry-After says (5 s by default): stopping after one quiet second, as this script
# did, moved on before those retries and left calls down that were on their way.
STALL_S=${STALL_S:-8}
wait_calls() {
    local end=$((SECONDS + $1)) last=-1 since=$SECONDS now
    while ((SECONDS < end)); do
        now=$(total_up)
        ((now >= IDLE_CALLS)) && break
        if ((now != last)); then last=$now since=$SECONDS; fi
        ((now > 0 && SECONDS - since >= STALL_S)) && break
        sleep 1
    done
}
start_callers
# Queue one message per lane while the callee is not running (see the top of this file).
SOURCES=()
for i in "${!CALLERS[@]}"; do
    s=$(share_of "$i")
    /usr/sbin/smtp-source -s "$s" -m "$s" -l 1000 -f "x@${CALLERS[$i]}.test" -t "y@callee.test" \
        "${CALLER_SMTP[$i]}:$CALLER_SMTP_PORT" >>"$IC/source.log" 2>&1 &
    SOURCES+=($!)
done
wait "${SOURCES[@]}" || true
sleep 1
kill "${CALLER_PIDS[@]}" 2>/dev/null || true
wait "${CALLER_PIDS[@]}" 2>/dev/null || true
QUEUED=$(find "$IC"/var/c*/spool/queue -name '*.env' 2>/dev/null | wc -l)
printf '   %d messages queued at the callers, callee not running yet\n' "$QUEUED"
(cd "$IC" && exec "$SIPMAIL" run --config callee.toml >callee.log 2>&1) & PIDS+=($!); CALLEE=$!
wait_port "$P_CB_SMTP" 30 || die "callee did not start: $(tail -5 "$IC/callee.log")"
sleep 1
CALLEE_BEFORE=$(rss_kb "$CALLEE")
if ((SETTLE > 0)); then
    printf '   letting the file system settle for %d s (see SETTLE at the top) ...\n' "$SETTLE"
    sync
    sleep "$SETTLE"
fi
if [ -n "${PERF:-}" ]; then # PERF=file: perf record -a -g while the callers set up their calls
    perf record -a -F 999 -g ${PERF_EVENTS:-} -o "$PERF" >/dev/null 2>&1 & PERF_PID=$!
fi
CPU_CALLEE0=$(cpu_ticks "$CALLEE")
start_callers
wait_calls 60
if [ -n "${PERF:-}" ]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" || true; fi
# CPU spent on the set-up (user + system): the callee's, and the callers' since they
# restarted (their start-up included), per call up.
CPU_CALLEE=$(($(cpu_ticks "$CALLEE") - CPU_CALLEE0)) CPU_CALLERS=0 FIRST_UP=$(total_up)
for p in "${CALLER_PIDS[@]}"; do CPU_CALLERS=$((CPU_CALLERS + $(cpu_ticks "$p"))); done
printf '   %d calls up at the callee once the callers restarted\n' "$FIRST_UP"

burst() { # caller index: 2 x share messages over share sessions, in the background
    local i=$1 s
    s=$(share_of "$i")
    /usr/sbin/smtp-source -s "$s" -m $((2 * s)) -l 1000 -f "x@${CALLERS[$i]}.test" -t "y@callee.test" \
        "${CALLER_SMTP[$i]}:$CALLER_SMTP_PORT" >>"$IC/source.log" 2>&1 &
    SOURCES+=($!)
}
for b in $(seq 1 "$IDLE_BURSTS"); do
    short=0 SOURCES=()
    for i in "${!CALLERS[@]}"; do
        if (($(up "$IC/${CALLERS[$i]}.log") < $(share_of "$i"))); then
            burst "$i"
            short=$((short + 1))
        fi
    done
    ((short == 0)) && break
    printf '   burst %d: %d caller(s) short of their share; waiting for calls ...\n' "$b" "$short"
    wait "${SOURCES[@]}" || true # the bursts' smtp-source processes
    # Let the last calls come up (a call is placed when a lane takes a message).
    wait_calls 30
    printf '   %d calls up at the callee\n' "$(total_up)"
done
sleep 2
UP=$(total_up)
CALLEE_WITH=$(rss_kb "$CALLEE")
FDS=$(find "/proc/$CALLEE/fd" -mindepth 1 -maxdepth 1 | wc -l)
CALLER_SUM=0
for p in "${CALLER_PIDS[@]}"; do CALLER_SUM=$((CALLER_SUM + $(rss_kb "$p"))); done

# Call set-up rate: the callee's "call established" lines, first to last (all bursts).
RATE=$(python3 - "$IC/callee.log" <<'PY'
import re, sys
from datetime import datetime
ts = []
for line in open(sys.argv[1], errors="replace"):
    if "call established" in line:
        m = re.match(r"\x1b?\[?[0-9;]*m?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
        if m:
            ts.append(datetime.fromisoformat(m.group(1)))
if len(ts) >= 2 and ts[-1] > ts[0]:
    print(f"{len(ts)} calls set up in {(ts[-1] - ts[0]).total_seconds():.2f} s: "
          f"{(len(ts) - 1) / (ts[-1] - ts[0]).total_seconds():.0f} calls/s")
else:
    print("not measured (no timestamps in the callee's log)")
PY
)
say "   calls up at the callee: $UP of $IDLE_CALLS ($FDS open file descriptors)"
say "   callee RSS: $((CALLEE_BEFORE / 1024)) MB before the calls, $((CALLEE_WITH / 1024)) MB with $UP calls idle" \
    "-> $(awk -v a="$CALLEE_BEFORE" -v b="$CALLEE_WITH" -v n="$UP" 'BEGIN {printf "%.1f", n ? (b-a)/n : 0}') kB per call"
say "   caller relays: $((CALLER_SUM / ${#CALLER_PIDS[@]} / 1024)) MB RSS on average, each holding up to $SHARE calls"
say "   call set-up with $IDLE_CALLERS peers at once (both ends on these cores, SMTP in front): $RATE"
# RATE_OUT=file: the calls/s figure alone, one line, for a caller that takes a median.
if [ -n "${RATE_OUT:-}" ]; then
    sed -n 's/.*: \([0-9][0-9]*\) calls\/s$/\1/p' <<<"$RATE" >>"$RATE_OUT"
fi
say "   CPU per call set up once the callers restarted ($FIRST_UP calls): $(awk -v a="$CPU_CALLEE" -v b="$CPU_CALLERS" \
    -v hz="$(getconf CLK_TCK)" -v n="$FIRST_UP" 'BEGIN {if (n) printf "callee %.2f ms, callers %.2f ms (their start-up included)", a * 1000 / hz / n, b * 1000 / hz / n; else printf "none up"}')"
((UP >= IDLE_CALLS)) || say "   WARNING: only $UP of $IDLE_CALLS calls came up; see $IC (set KEEP=1 to keep it)"
