#!/usr/bin/env bash
# sipmail against a Postfix relay chain, in one run, paths interleaved. See
# docs/PERFORMANCE.md for what each figure means and how to read them.
#
#   integration/bench.sh                 # everything, about 20 minutes on 2 vCPU (6 of them
#                                        # letting the file system settle: SETTLE below)
#   MESSAGES=500 ROUNDS=1 integration/bench.sh   # a quick look
#
# Paths measured (all on 127.0.0.1, smtp-source and smtp-sink from Postfix):
#   sipmail      smtp-source -> sipmail A -> SIP call -> sipmail B -> smtp-sink
#   postfix      smtp-source -> Postfix A -> Postfix B -> smtp-sink        (plain SMTP)
#   bare         smtp-source -> smtp-sink directly: the ceiling, no relay at all (issue 16)
#   postfix-tls  smtp-source -> Postfix A -> Postfix B -> smtp-sink        (TLS, A pins
#                B's self-signed certificate: smtp_tls_security_level = fingerprint)
#   hops         smtp-source -> hop A -> hop B -> smtp-sink, each hop examples/durable_hop.rs:
#                SMTP in, a group-committed fdatasync before 250, SMTP out, nothing else:
#                what a relay pair with fsync before 250 and nothing more reaches here
#   hops-rcpt    the same, and each 250 carries an Ed25519 receipt the hop before checks:
#                the least of what sipmail does per message (both in the headline rounds
#                only, not the sweep)
# Rates are end to end: from the start of smtp-source until smtp-sink has counted every
# message. Then: first message on a cold call, per-message latency on a warm call, one
# big message A->B with fsync at both ends, peak RSS with it in flight, RSS of one relay
# holding 1,000 idle calls and how fast it set them up (integration/bench-idle.sh). Before
# all of that, on the quiet machine (CRITERION=1, the default): the criterion benches.
#
# Not part of CI (too long). Needs root (private Postfix instances), postfix,
# smtp-source, smtp-sink, openssl, python3; installs postfix with apt-get and matplotlib
# with pip only if they are missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

MESSAGES=${MESSAGES:-2000}        # messages per throughput run
SIZE=${SIZE:-5120}                # bytes per message (smtp-source -l)
SESSIONS=${SESSIONS:-10}          # parallel sessions for the headline figure
ROUNDS=${ROUNDS:-3}               # headline rounds; paths interleaved in each
SWEEP=${SWEEP:-"1 2 5 10 20 50 200"}  # parallel sessions for the plot
SWEEP_MESSAGES=${SWEEP_MESSAGES:-1000}
SWEEP_ROUNDS=${SWEEP_ROUNDS:-3}   # the whole sweep this many times; each point is the median
COLD_CALLS=${COLD_CALLS:-11}      # cold-call first-message measurements
WARM_MESSAGES=${WARM_MESSAGES:-20}
BIG_MB=${BIG_MB:-200}             # the one big message, MB (10^6 bytes)
IDLE_CALLS=${IDLE_CALLS:-1000}    # idle calls held by one callee relay (bench-idle.sh) ...
IDLE_CALLERS=${IDLE_CALLERS:-16}  # ... placed by this many caller relays
RUN_TIMEOUT=${RUN_TIMEOUT:-300}   # seconds, per throughput run
CRITERION=${CRITERION:-1}         # also run the criterion benches
OUT=${OUT:-$ROOT/target/bench}

say() { printf '%s\n' "$*" | tee -a "$OUT/results.txt"; }
die() { echo "bench: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
[ "$(id -u)" = 0 ] || die "run as root (private Postfix instances need it)"
if ! command -v postfix >/dev/null || ! [ -x /usr/sbin/smtp-source ] || ! [ -x /usr/sbin/smtp-sink ]; then
    echo "== installing postfix (smtp-source, smtp-sink)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    for attempt in 1 2 3; do
        apt-get install -y -qq --no-install-recommends postfix && break
        sleep 5
    done
fi
for t in openssl python3 /usr/sbin/smtp-source /usr/sbin/smtp-sink /usr/sbin/postfix; do
    command -v "$t" >/dev/null || die "$t not found"
done
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q matplotlib \
    || echo "bench: matplotlib not available; the plot will be skipped"

mkdir -p "$OUT"
: >"$OUT/results.txt"
rm -f "$OUT/leg-ceiling"
: >"$OUT/runs.tsv"
say "sipmail benchmark, $(date -u +%FT%TZ), $(nproc) vCPU, $(uname -r), git $(git -C "$ROOT" rev-parse --short HEAD)"
echo "== building (release)"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --example durable_hop
SIPMAIL="$ROOT/target/release/sipmail"
HOP="$ROOT/target/release/examples/durable_hop"
# shellcheck source=lib/postfix.sh
. "$ROOT/integration/lib/postfix.sh"
# shellcheck source=lib/sites.sh
. "$ROOT/integration/lib/sites.sh" # exchange_keys, site_config
scratch sipmail-bench # $WORK, PIDS, and the EXIT trap that stops everything
chmod 755 "$WORK"

SINK_PID=
start_sink() { # port, counter file [fifo: a FIFO instead, for latency.py to sleep on]
    counting_sink "$@"
    PIDS+=("$SINK_PID")
    wait_port "$1" 10 || die "smtp-sink did not start on $1"
}
stop_sink() { kill "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; }

read -r P_SRC_S P_SIP_A P_SIP_B P_SMTP_B P_PFA P_PFB P_PFTA P_PFTB \
    SINK_S SINK_P SINK_T SINK_X SINK_BARE \
    P_HOP_A P_HOP_B SINK_HOP P_HOPR_A P_HOPR_B SINK_HOPR <<<"$(free_ports 19)"

# ---------------------------------------------------------------- criterion
# First, before any relay, Postfix or file system work of this run: the micro-benchmarks
# measure CPU cost on one core, and run 24 measured the callee's handshake 50% slower (212
# against 141 us) at the end of the run than alone, with the 1-minute load average already
# under 0.5. On 2 vCPU that share a host, whatever else runs counts against them. The
# machine's busy share and steal time during the benches are printed with them: a busy
# share near 1.0 of the cores means criterion had the machine to itself.
cpu_snap() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6, $9}' /proc/stat; }
if [ "$CRITERION" = 1 ]; then
    echo "== building the criterion benches"
    (cd "$ROOT" && cargo bench --quiet --no-run --bench record --bench handshake --bench smtp_parse \
        --bench queue >"$OUT/criterion-build.txt" 2>&1) || true
    end=$((SECONDS + 300))
    while (($(awk '{print int($1 * 100)}' /proc/loadavg) > 50)) && ((SECONDS < end)); do sleep 2; done
    say "== criterion benches (cargo bench), one core each; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    read -r busy0 idle0 steal0 <<<"$(cpu_snap)"
    (cd "$ROOT" && cargo bench --quiet --bench record --bench handshake --bench smtp_parse --bench queue \
        >"$OUT/criterion.txt" 2>&1) || say "   cargo bench failed: see $OUT/criterion.txt"
    read -r busy1 idle1 steal1 <<<"$(cpu_snap)"
    say "   during the benches: $(awk -v b=$((busy1 - busy0)) -v i=$((idle1 - idle0)) -v s=$((steal1 - steal0)) \
        -v n="$(nproc)" 'BEGIN { t = b + i; if (t > 0) printf "%.2f of %d cores busy, steal %.1f%%", n * b / t, n, 100 * s / t }')"
    python3 - "$ROOT/target/criterion" "$(nproc)" "$OUT/leg-ceiling" <<'PY' | tee -a "$OUT/results.txt"
import json, os, sys
base, cores, ceiling_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def est(*p):
    f = os.path.join(base, *p, "new", "estimates.json")
    try:
        return json.load(open(f))["mean"]["point_estimate"]  # ns
    except OSError:
        return None
for size in (64, 1024, 16384, 65536):
    for g in ("seal+open", "seal", "open"):
        ns = est(f"record_{g}", str(size))
        if ns: print(f"   record {g:9s} {size:6d} B: {size/ns:6.2f} GB/s")
for side in ("caller_side", "callee_side", "both_sides"):
    ns = est("handshake", side)
    if ns: print(f"   handshake {side:12s}: {ns/1e3:8.1f} us -> {1e9/ns:7.0f} per second per core")
for part in ("openpgp_sign", "openpgp_verify", "x25519_keypair_and_dh", "ed25519_sign_raw",
             "ed25519_verify_strict_raw"):
    ns = est("handshake_parts", part)
    if ns: print(f"   {part:25s}: {ns/1e3:8.1f} us")
# What a side cannot go below with these libraries on this CPU: its X25519 key pair and
# shared secret, one Ed25519 signature and one strict verification, with no OpenPGP
# packet, transcript or key schedule around them.
floor = [est("handshake_parts", p) for p in ("x25519_keypair_and_dh", "ed25519_sign_raw",
                                             "ed25519_verify_strict_raw")]
if all(floor):
    ns = sum(floor)
    print(f"   a side's primitives alone (X25519 pair and DH, raw Ed25519 sign and verify):"
          f" {ns/1e3:.1f} us -> {1e9/ns:,.0f} per second per core"
          f" ({'above' if 1e9/ns >= 6000 else 'below'} the target's 6,000)")
for n in ("5KB_1rcpt", "5KB_10rcpt", "5KB_1rcpt_1448B_reads"):
    ns = est("smtp_session", n)
    if ns: print(f"   SMTP session {n:22s}: {ns/1e3:6.2f} us -> {1e9/ns:9.0f} transactions/s")
for size in (5120, 65536, 1048576):
    ns = est("smtp_data_receiver", str(size))
    if ns: print(f"   DataReceiver {size:8d} B: {ns/1e3:9.1f} us")
for n in (1, 10, 50):
    ns = est("queue_commit_5KB", "concurrent", str(n))
    if ns: print(f"   queue commit, {n:2d} at once: {ns/1e6:7.2f} ms per batch -> {n*1e9/ns:6.0f} commits/s")
# The per-byte work every byte of a call's leg needs, whatever the code around it: sealed
# by the sender, opened by the receiver, and (for a message that asks for a receipt, as
# every message on a call authenticated by signatures does) hashed by the receiver as it
# takes it in. The sender's hash of the same message is taken as the message is spooled,
# before the leg (since run 37; an envelope from before that is hashed as it is sent, the
# second figure). Spread perfectly over all cores, with nothing else (no copies, no system
# calls, no disk), that is the leg's ceiling on this machine, for each suite.
sha = est("digest_sha256", "65536")
if sha: print(f"   SHA-256 65536 B: {65536/sha:6.2f} GB/s")
suites = {"chacha20-poly1305": (est("record_seal", "65536"), est("record_open", "65536")),
          "aes-256-gcm": (est("record_aes-256-gcm", "seal_65536"), est("record_aes-256-gcm", "open_65536"))}
ceilings = []
for name, (seal, opn) in suites.items():
    if seal and opn: print(f"   {name} 65536 B: seal {65536/seal:5.2f} GB/s, open {65536/opn:5.2f} GB/s")
    if seal and opn and sha:
        crypto = (seal + opn) / 65536  # ns per byte
        c_crypto = cores * 1e3 / crypto  # MB/s
        c_receipt = cores * 1e3 / (crypto + sha / 65536)
        c_both = cores * 1e3 / (crypto + 2 * sha / 65536)
        print(f"   a leg's per-byte work, {name}, on all {cores} cores and nothing else:"
              f" {c_receipt:,.0f} MB/s with the receiver's SHA-256 ({c_both:,.0f} with one at both ends"
              f" as up to run 36, {c_crypto:,.0f} with none)")
        ceilings.append(f"{name}={c_receipt:.0f}")
if len(ceilings) == len(suites):
    with open(ceiling_file, "w") as f:
        f.write(" ".join(ceilings) + "\n")
PY
    # The queue bench created and deleted files: on ext4 without a journal a new inode
    # scans past those freed in the last 60 s (see SETTLE below), so wait that out.
    sync
    sleep 60
    say ""
fi

# ---------------------------------------------------------------- Postfix instances
echo "== private Postfix instances"
# TLS: a self-signed certificate for Postfix B (TLS chain); A pins its SHA-256 fingerprint.
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=pftb.bench.test" \
    -keyout "$WORK/pftb.key" -out "$WORK/pftb.crt" >/dev/null 2>&1
chmod 600 "$WORK/pftb.key"
FPR=$(openssl x509 -in "$WORK/pftb.crt" -noout -fingerprint -sha256 | cut -d= -f2)
mk_postfix pfa "$P_PFA" "$P_PFB" "" || die "Postfix did not start"
mk_postfix pfb "$P_PFB" "$SINK_P" "" || die "Postfix did not start"
mk_postfix pftb "$P_PFTB" "$SINK_T" "smtpd_tls_cert_file = $WORK/pftb.crt
smtpd_tls_key_file = $WORK/pftb.key
smtpd_tls_security_level = may" || die "Postfix did not start"
mk_postfix pfta "$P_PFTA" "$P_PFTB" "smtp_tls_security_level = fingerprint
smtp_tls_fingerprint_digest = sha256
smtp_tls_fingerprint_cert_match = $FPR
smtp_tls_loglevel = 1" || die "Postfix did not start"

# ---------------------------------------------------------------- sipmail pair
echo "== sipmail pair"
SM="$WORK/sm"
mkdir -p "$SM"
(cd "$SM" && exchange_keys) >"$WORK/keys.log" 2>&1 || die "key setup failed: $(tail -3 "$WORK/keys.log")"
site_config site-a site-b "$P_SRC_S" "$P_SIP_A" "$P_SIP_B" "maildir = \"var/site-a/maildir\"" >"$SM/a.toml"
site_config site-b site-a "$P_SMTP_B" "$P_SIP_B" "$P_SIP_A" "smtp = \"127.0.0.1:$SINK_S\"" >"$SM/b.toml"
(cd "$SM" && exec "$SIPMAIL" run --config b.toml >b.log 2>&1) & PIDS+=($!); SM_B=$!
(cd "$SM" && exec "$SIPMAIL" run --config a.toml >a.log 2>&1) & PIDS+=($!); SM_A=$!
wait_port "$P_SRC_S" 20 || die "sipmail A did not start: $(tail -5 "$SM/a.log")"
wait_port "$P_SMTP_B" 20 || die "sipmail B did not start: $(tail -5 "$SM/b.log")"
# The two pairs of durable hops, their journals on the spools' disk. Each hop forwards over
# 10 kept-open connections, as many as sipmail A's lanes place calls at 10 sessions.
start_hop() { # name listen next [--receipts]
    "$HOP" "127.0.0.1:$2" "127.0.0.1:$3" "$SM/$1.journal" 10 ${4:+"$4"} >"$WORK/$1.log" 2>&1 & PIDS+=($!)
    wait_port "$2" 20 || die "$1 did not start: $(tail -5 "$WORK/$1.log")"
}
start_hop hop-b "$P_HOP_B" "$SINK_HOP"
start_hop hop-a "$P_HOP_A" "$P_HOP_B"
start_hop hopr-b "$P_HOPR_B" "$SINK_HOPR" --receipts
start_hop hopr-a "$P_HOPR_A" "$P_HOPR_B" --receipts

# ---------------------------------------------------------------- throughput
path_in() { case $1 in sipmail) echo "$P_SRC_S" ;; postfix) echo "$P_PFA" ;; postfix-tls) echo "$P_PFTA" ;; bare) echo "$SINK_BARE" ;; hops) echo "$P_HOP_A" ;; hops-rcpt) echo "$P_HOPR_A" ;; esac; }
path_sink() { case $1 in sipmail) echo "$SINK_S" ;; postfix) echo "$SINK_P" ;; postfix-tls) echo "$SINK_T" ;; bare) echo "$SINK_BARE" ;; hops) echo "$SINK_HOP" ;; hops-rcpt) echo "$SINK_HOPR" ;; esac; }
# bare: smtp-source straight into smtp-sink, the same mix: what the client, the sink and
# the loopback do alone, so "sipmail / bare" says how close the relay pair comes to it.
PATHS=(sipmail postfix postfix-tls bare)
# hops, hops-rcpt: two durable hops and nothing else (examples/durable_hop.rs), in the
# headline rounds: "hops-rcpt / bare" is the share of the bare path left on this machine to
# a lean relay pair that makes each message durable before its 250 at both hops and
# returns a signed receipt the sender checks: a yardstick for "sipmail / bare" measured in
# the same rounds (one lean program's figure, not a bound for any code).
MAIN_PATHS=("${PATHS[@]}" hops hops-rcpt)

# run_path kind path messages sessions -> appends to runs.tsv, prints rate
run_path() {
    local kind=$1 p=$2 n=$3 s=$4 cnt="$WORK/sink-$2.cnt"
    start_sink "$(path_sink "$p")" "$cnt"
    local t0 t_src t1 got=0 status=ok
    t0=$(now_ns)
    timeout "$RUN_TIMEOUT" /usr/sbin/smtp-source -s "$s" -m "$n" -l "$SIZE" \
        -f a@site-a.test -t b@site-b.test "127.0.0.1:$(path_in "$p")" >"$WORK/source.log" 2>&1 \
        || status="source-failed"
    t_src=$(now_ns)
    local deadline=$((t0 + RUN_TIMEOUT * 1000000000))
    while :; do
        got=$(sink_count "$cnt")
        ((got >= n)) && break
        (($(now_ns) > deadline)) && { status=timeout; break; }
        sleep 0.01
    done
    t1=$(now_ns)
    stop_sink
    local secs rate
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    rate=$(awk -v n="$got" -v t="$secs" 'BEGIN {printf "%.1f", n/t}')
    local src_secs
    src_secs=$(awk -v a="$t0" -v b="$t_src" 'BEGIN {printf "%.3f", (b-a)/1e9}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$p" "$s" "$n" "$got" "$secs" "$src_secs" "$rate" "$status" >>"$OUT/runs.tsv"
    printf '   %-12s %3s sessions %5s msgs  %8s s  %8s msg/s  (accepted by the first hop in %s s) %s\n' \
        "$p" "$s" "$got" "$secs" "$rate" "$src_secs" "$status" | tee -a "$OUT/results.txt"
}

say "load average before the throughput runs: $(cut -d' ' -f1-3 /proc/loadavg)"
say ""
echo "== warm-up (one small run per path, not counted)"
for p in "${MAIN_PATHS[@]}"; do run_path warmup "$p" 200 "$SESSIONS" >/dev/null; done

say "== throughput: $MESSAGES messages x $SIZE B, $SESSIONS sessions, $ROUNDS rounds, paths interleaved"
for r in $(seq "$ROUNDS"); do
    for p in "${MAIN_PATHS[@]}"; do run_path main "$p" "$MESSAGES" "$SESSIONS"; done
done
say ""
# The sweep is run SWEEP_ROUNDS times over (all points, then all again), and each point is
# the median of its rounds: one run of 1,000 messages is a second or two on a machine whose
# bare path can swing by a third between neighbouring runs, and the peak taken as the
# largest of many single runs was an upward-biased yardstick for the 50 and 200 points.
say "== sweep: $SWEEP_MESSAGES messages x $SIZE B per run, $SWEEP_ROUNDS rounds, paths interleaved at each session count"
for r in $(seq "$SWEEP_ROUNDS"); do
    for s in $SWEEP; do
        for p in "${PATHS[@]}"; do run_path sweep "$p" "$SWEEP_MESSAGES" "$s"; done
    done
done

# ---------------------------------------------------------------- the spool's disk
# What the targets of issue 16 are relative to, measured on the disk of the spools in this
# run: the latency of one small write + fdatasync, and the fsynced sequential write rate.
say ""
say "== the spool disk ($(df -P "$SM" | awk 'NR==2 {print $1}'), measured now"
FSYNC_MS=$(python3 - "$SM" <<'PY'
import os, statistics, sys, time
p = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
lat = []
for i in range(200):
    os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append((time.perf_counter() - t) * 1000)
os.close(fd); os.unlink(p)
print(f"{statistics.median(lat):.3f}")
PY
)
say "   4 KB write + fdatasync: median $FSYNC_MS ms (200 tries)"
# MB/s of 10^6 bytes, as the big-message figures below.
DD_RATE=$(dd if=/dev/zero of="$SM/dd-probe" bs=1M count="$BIG_MB" conv=fdatasync 2>&1 \
    | awk -v n="$BIG_MB" '/copied/ {sub(/.*copied, /, ""); printf "%.0f", n * 1.048576 / ($1 + 0)}')
rm -f "$SM/dd-probe"
say "   dd bs=1M count=$BIG_MB conv=fdatasync: $DD_RATE MB/s"

# ---------------------------------------------------------------- latency
say ""
say "== latency (sipmail), one message of $SIZE B submitted with Python's smtplib"
start_sink "$SINK_S" "$WORK/sink-lat.cnt" fifo
python3 "$ROOT/integration/lib/latency.py" "$P_SRC_S" "$WORK/sink-lat.cnt" "$SM/a.log" "$COLD_CALLS" "$WARM_MESSAGES" "$SIZE" >"$WORK/latency.txt"
stop_sink
sed 's/^/   /' "$WORK/latency.txt" | tee -a "$OUT/results.txt"
WARM_P50=$(awk '/^WARM / {print $3}' "$WORK/latency.txt")
COLD_P50=$(awk '/^COLD/ {print $3}' "$WORK/latency.txt")
say "   target (issue 16): warm p50 <= 2 x fsync + 2 ms = $(awk -v f="$FSYNC_MS" 'BEGIN {printf "%.2f", 2*f+2}') ms (is $WARM_P50);" \
    "cold p50 <= warm + 3 ms = $(awk -v w="$WARM_P50" 'BEGIN {printf "%.2f", w+3}') ms (is $COLD_P50)"
PAUSED_P50=$(awk '/^PAUSED/ {print $3}' "$WORK/latency.txt")
say "   the new call's own cost: cold p50 - warm-after-the-same-pause p50 = $(awk -v c="$COLD_P50" -v p="$PAUSED_P50" 'BEGIN {printf "%.2f", c-p}') ms" \
    "(the target's 3 ms against the pause-matched warm figure: $(awk -v c="$COLD_P50" -v p="$PAUSED_P50" 'BEGIN {print (c-p <= 3) ? "met" : "not met"}'))"
say "   (smtp-source -> A -> call -> B -> sink; 'cold' includes INVITE/200/ACK, both signatures and"
say "    both verifications, the media connection, A's and B's fsyncs and B's delivery to the sink)"
# The same client and message straight to a sink, no relay, back to back as the warm
# messages above: the client's own SMTP session and the sink's count, which the warm figure
# holds too. What is left of the target after it is what the two relays may take.
start_sink "$SINK_BARE" "$WORK/sink-lat-bare.cnt" fifo
python3 "$ROOT/integration/lib/latency.py" "$SINK_BARE" "$WORK/sink-lat-bare.cnt" /dev/null 0 "$WARM_MESSAGES" "$SIZE" 0 >"$WORK/latency-bare.txt"
stop_sink
BARE_LAT_P50=$(awk '/^WARM / {print $3}' "$WORK/latency-bare.txt")
say "   the same client straight to smtp-sink, no relay (reference, same run): p50 $BARE_LAT_P50 ms" \
    "($(awk '/^WARM / {sub(/^WARM /, ""); print}' "$WORK/latency-bare.txt")); the two relays' share of the warm p50:" \
    "$(awk -v w="$WARM_P50" -v b="$BARE_LAT_P50" 'BEGIN {printf "%.2f", w-b}') ms, of the target's" \
    "$(awk -v f="$FSYNC_MS" -v b="$BARE_LAT_P50" 'BEGIN {printf "%.2f", 2*f+2-b}') ms left after the client's own session"

# ---------------------------------------------------------------- one big message
say ""
say "== one message of $BIG_MB MB, A -> B (A's spool fsync, the call, B's spool fsync), B then to the sink"
BIG=$((BIG_MB * 1000000))
sleep 3 # let the call from the latency test go idle and end
start_sink "$SINK_S" "$WORK/sink-big.cnt"
echo 5 >"/proc/$SM_A/clear_refs"; echo 5 >"/proc/$SM_B/clear_refs" # reset VmHWM
IDLE_A=$(rss_kb "$SM_A"); IDLE_B=$(rss_kb "$SM_B")
A_OFF=$(log_size "$SM/a.log")
say "   (A's log holds $((A_OFF / 1000000)) MB before the message; the poll below reads only what comes after)"
(
    peak_a=0; peak_b=0
    while kill -0 "$SM_A" 2>/dev/null; do
        a=$(rss_kb "$SM_A"); b=$(rss_kb "$SM_B")
        ((a > peak_a)) && peak_a=$a; ((b > peak_b)) && peak_b=$b
        # Renamed into place: a kill between the truncation and the write of a plain
        # ">" left an empty file, and the read below then ended the run (run 34).
        echo "$peak_a $peak_b" >"$WORK/rss-peak.new" && mv -f "$WORK/rss-peak.new" "$WORK/rss-peak"
        sleep 0.02
    done
) & SAMPLER=$!
PIDS+=("$SAMPLER")
# The client is Python with the whole message prepared in memory (smtp-source makes its
# body line by line and tops out near 80 MB/s here, see the direct figure below).
# body preparation happens before the clock starts (t0 = greeting received)
python3 "$ROOT/integration/lib/bigsend.py" "$P_SRC_S" "$BIG" "$WORK/big.t0" >"$WORK/big-source.log" 2>&1 \
    || say "   the big message was refused: $(tail -2 "$WORK/big-source.log")"
t0=$(cat "$WORK/big.t0")
t_acc=$(now_ns)
end=$((t0 + 600000000000))
while (($(delivered_since "$SM/a.log" "$A_OFF") < 1)) && (($(now_ns) < end)); do sleep 0.01; done
t_b=$(now_ns)
while (($(sink_count "$WORK/sink-big.cnt") < 1)) && (($(now_ns) < end)); do sleep 0.01; done
t_sink=$(now_ns)
kill "$SAMPLER" 2>/dev/null || true
stop_sink
PEAK_A=0 PEAK_B=0
read -r PEAK_A PEAK_B <"$WORK/rss-peak" || true
HWM_A=$(hwm_kb "$SM_A"); HWM_B=$(hwm_kb "$SM_B")
mbps() { awk -v b="$BIG" -v a="$1" -v z="$2" 'BEGIN {printf "%.0f MB/s (%.2f s)", b/1e6/((z-a)/1e9), (z-a)/1e9}'; }
say "   into A (smtp-source -> A, A fsyncs, 250):               $(mbps "$t0" "$t_acc")"
say "   A -> B leg (A's spool -> call -> B, B fsyncs, 250):     $(mbps "$t_acc" "$t_b")"
say "   target (issue 16): A -> B leg >= 80% of dd's $DD_RATE MB/s = $(awk -v d="$DD_RATE" 'BEGIN {printf "%.0f", 0.8*d}') MB/s"
if [ -s "$OUT/leg-ceiling" ]; then # written by the criterion step of this run
    # "chacha20-poly1305=N aes-256-gcm=M": the leg's ceiling with receipts, per suite.
    SUITE_USED=$(grep -o 'suite=[a-z0-9-]*' "$SM/a.log" | tail -1 | cut -d= -f2 || true)
    say "   the leg's ceiling on this machine with receipts (criterion above: seal, open and the receiver's SHA-256 on all $(nproc) cores, nothing else):"
    tr ' ' '\n' <"$OUT/leg-ceiling" | while IFS='=' read -r suite ceiling; do
        say "      $suite$([ "$suite" = "$SUITE_USED" ] && echo " (this run's call)"): $ceiling MB/s, $(awk -v d="$DD_RATE" -v c="$ceiling" 'BEGIN {if (0.8 * d > c) printf "below the target: out of reach on this machine for any code that seals, opens and hashes every byte once with this suite"; else printf "above the target"}')"
    done
fi
say "   end to end into A through B's fsynced 250:             $(mbps "$t0" "$t_b")"
say "   ... and on to the sink:                                $(mbps "$t0" "$t_sink")"
say "   RSS A: idle $((IDLE_A / 1024)) MB, peak $((HWM_A / 1024)) MB (VmHWM; sampled $((PEAK_A / 1024)) MB) -> +$(((HWM_A - IDLE_A) / 1024)) MB"
say "   RSS B: idle $((IDLE_B / 1024)) MB, peak $((HWM_B / 1024)) MB (VmHWM; sampled $((PEAK_B / 1024)) MB) -> +$(((HWM_B - IDLE_B) / 1024)) MB"
say "   smtp-source -> smtp-sink directly, same size, for scale:"
start_sink "$SINK_X" "$WORK/sink-direct.cnt"
t0=$(now_ns)
/usr/sbin/smtp-source -s 1 -m 1 -l "$BIG" -f a@x.test -t b@y.test "127.0.0.1:$SINK_X" >/dev/null 2>&1 || true
t1=$(now_ns)
stop_sink
say "   $(mbps "$t0" "$t1")"

# ---------------------------------------------------------------- idle calls
# One callee relay holding IDLE_CALLS calls from IDLE_CALLERS caller relays (bench-idle.sh).
# Issue 16's call set-up figure is for 16 caller relays. Holding 10,000 calls takes more
# (64 calls per peer at most), so with another count of callers the set-up rate is also
# measured as the issue defines it: 1,000 calls from 16 caller relays. That step first
# lets the file system settle for SETTLE seconds (sync, then wait): on an ext4 without a
# journal (this machine's disk) every new inode scans past the inodes freed in the last
# 60 s, 360 s while their inode table block is dirty, and the steps above free tens of
# thousands (their scratch folders, Postfix's queue files). The relays free none during
# the set-up; what the scan costs them right after those steps is in docs/PERFORMANCE.md
# (run 17). The first step runs without waiting, so its set-up rate shows that case.
SETTLE=${SETTLE:-370}
SETUP_CALLS=$IDLE_CALLS
if [ "$IDLE_CALLERS" != 16 ]; then
    IDLE_CALLS="$IDLE_CALLS" IDLE_CALLERS="$IDLE_CALLERS" OUT="$OUT" "$ROOT/integration/bench-idle.sh" \
        || say "   the idle-calls step failed (see above)"
    SETUP_CALLS=1000
fi
# The set-up rate swings by 15-25% from one sample to the next on this VM (the same
# binary gave 393 to 499 calls/s in one sitting: docs/PERFORMANCE.md, run 33), so it is
# measured SETUP_ROUNDS times and the median is the figure, as for the throughput rows.
# Only the first round waits for the file system to settle: the rounds run in one folder
# that is removed after the last, so no round frees inodes that the next would scan past.
# Then one reference round with both relays' spools on tmpfs (no disk: every flush a
# no-op): what the set-up reaches with the same code when the disk's work costs nothing,
# i.e. how much of the figure the spool's disk takes. A reference, not the figure.
SETUP_ROUNDS=${SETUP_ROUNDS:-3}
SETUP_DIR="$WORK/setup-rounds"
mkdir -p "$SETUP_DIR"
: >"$WORK/setup-rates"
for r in $(seq "$SETUP_ROUNDS"); do
    settle=0
    ((r == 1)) && settle=$SETTLE
    say "-- 16-caller set-up, round $r of $SETUP_ROUNDS"
    KEEP=1 TMPDIR="$SETUP_DIR" RATE_OUT="$WORK/setup-rates" IDLE_CALLS="$SETUP_CALLS" IDLE_CALLERS=16 \
        SETTLE="$settle" OUT="$OUT" "$ROOT/integration/bench-idle.sh" \
        || say "   the 16-caller set-up step failed (see above)"
done
rm -rf "$SETUP_DIR"
MEDIAN_SETUP=$(python3 - "$WORK/setup-rates" <<'PY'
import statistics, sys
r = [float(x) for x in open(sys.argv[1]).read().split()]
if r:
    print(f"{statistics.median(r):.0f} calls/s (rounds: {', '.join(f'{x:.0f}' for x in r)})")
else:
    print("not measured")
PY
)
say "   call set-up, 16 callers, median of $SETUP_ROUNDS rounds: $MEDIAN_SETUP; target >= 500"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    say "-- reference: the same set-up with both relays' spools on tmpfs (no disk)"
    : >"$WORK/setup-rates-tmpfs"
    TMPDIR=/dev/shm RATE_OUT="$WORK/setup-rates-tmpfs" IDLE_CALLS="$SETUP_CALLS" IDLE_CALLERS=16 \
        OUT="$OUT" "$ROOT/integration/bench-idle.sh" \
        || say "   the tmpfs set-up step failed (see above)"
    say "   call set-up on tmpfs: $(cat "$WORK/setup-rates-tmpfs" 2>/dev/null || true) calls/s (a reference: the spools' disk costs the rest)"
fi

# ---------------------------------------------------------------- summary
say ""
say "== summary (medians of the headline rounds, same run)"
python3 - "$OUT/runs.tsv" "$OUT" <<'PY' | tee -a "$OUT/results.txt"
import csv, statistics, sys, os
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))
main = {}
for kind, path, s, n, got, secs, src, rate, status in rows:
    if kind == "main":
        main.setdefault(path, []).append(float(rate))
med = {p: statistics.median(v) for p, v in main.items()}
for p, v in main.items():
    print(f"   {p:12s} median {med[p]:8.1f} msg/s   rounds: {', '.join(f'{x:.1f}' for x in v)}")
if {"sipmail", "postfix", "postfix-tls"} <= med.keys():
    print(f"   sipmail / postfix chain plain:          {med['sipmail']/med['postfix']:.2f}x")
    print(f"   sipmail / postfix chain TLS fingerprint: {med['sipmail']/med['postfix-tls']:.2f}x")
    per = {}
    for kind, path, s, n, got, secs, src, rate, status in rows:
        if kind == "main":
            per.setdefault(path, []).append(float(rate))
    for i in range(min(len(v) for v in per.values())):
        print(f"   round {i+1}: sipmail/plain {per['sipmail'][i]/per['postfix'][i]:.2f}x, sipmail/TLS {per['sipmail'][i]/per['postfix-tls'][i]:.2f}x")
    print(f"   target (issue 16): >= 4x the plain chain, >= 6x the TLS chain")
if {"sipmail", "bare"} <= med.keys():
    print(f"   sipmail / bare smtp-source -> smtp-sink: {100*med['sipmail']/med['bare']:.0f}% (target >= 40%)")
# The two durable hops (examples/durable_hop.rs): what a relay pair that does nothing but
# the durability (hops), and that and a checked signature per message (hops-rcpt), reaches.
for h, what in (("hops", "fsync before 250 at both hops, nothing else"),
                ("hops-rcpt", "that and a signed receipt per message, checked")):
    if {"sipmail", "bare", h} <= med.keys():
        r = med[h] / med["bare"]
        print(f"   {h} / bare: {100*r:.0f}% ({what}): "
              f"{'the 40% target is above it on this machine' if r < 0.40 else 'it does not exclude the 40% target'};"
              f" sipmail / {h}: {100*med['sipmail']/med[h]:.0f}%")
        if {"postfix", "postfix-tls"} <= med.keys():
            print(f"      {h} / postfix chains: {med[h]/med['postfix']:.2f}x and {med[h]/med['postfix-tls']:.2f}x (targets for sipmail 4x and 6x)")
# Each sweep point: the median of its rounds (SWEEP_ROUNDS).
rounds = {}
for kind, path, s, n, got, secs, src, rate, status in rows:
    if kind == "sweep":
        rounds.setdefault(path, {}).setdefault(int(s), []).append(float(rate))
sweep = {p: [(s, statistics.median(v)) for s, v in pts.items()] for p, pts in rounds.items()}
if "sipmail" in sweep:
    pts = dict(sweep["sipmail"])
    runs = rounds["sipmail"]
    peak_s, peak = max(pts.items(), key=lambda kv: kv[1])
    print(f"   sipmail sweep (median of {len(runs[peak_s])} rounds per point): peak {peak:.1f} msg/s at {peak_s} sessions")
    for s in sorted(pts):
        print(f"      {s:3d} sessions: median {pts[s]:7.1f}   rounds: {', '.join(f'{x:.1f}' for x in runs[s])}")
    for s in (50, 200):
        if s in pts:
            # One decimal: run 37's 917.4 of 1,022.5 printed as "90%" and is 89.7%, not met.
            share = 100 * pts[s] / peak
            print(f"   sipmail at {s:3d} sessions: {pts[s]:.1f} msg/s = {share:.1f}% of the peak"
                  f" (target >= 90%: {'met' if share >= 90 else 'not met'})")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels = {"sipmail": "sipmail A -> call -> sipmail B",
              "postfix": "Postfix A -> Postfix B (plain)",
              "postfix-tls": "Postfix A -> Postfix B (TLS, fingerprint)",
              "bare": "smtp-source -> smtp-sink directly (no relay)"}
    for p in ("sipmail", "postfix", "postfix-tls", "bare"):
        if p in sweep:
            xs, ys = zip(*sorted(sweep[p]))
            ax.plot(xs, ys, marker="o", label=labels[p])
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50, 200]); ax.set_xticklabels(["1", "2", "5", "10", "20", "50", "200"])
    ax.set_xlabel("parallel SMTP sessions (smtp-source -s)")
    ax.set_ylabel("messages/s, end to end")
    ax.set_title("smtp-source -> relay chain -> smtp-sink, 5 KB messages, 127.0.0.1")
    ax.grid(True, which="both", alpha=0.3); ax.legend(); ax.set_ylim(bottom=0)
    fig.tight_layout(); fig.savefig(os.path.join(sys.argv[2], "sessions.png"))
    print(f"   plot: {os.path.join(sys.argv[2], 'sessions.png')}")
except ImportError:
    print("   (no matplotlib: plot skipped)")
PY
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

say ""
say "results: $OUT/results.txt, $OUT/runs.tsv$( [ -f "$OUT/sessions.png" ] && echo ", $OUT/sessions.png")"
