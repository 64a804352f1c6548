#!/usr/bin/env bash
# The big-message part of integration/bench.sh on its own, repeatable, for comparing
# builds back to back: one message of BIG_MB MB (10^6 bytes) into sipmail A, A -> SIP
# call -> sipmail B (fsync at both ends), B on to smtp-sink. Same sender (Python, body
# prepared in memory before the clock starts), same timing points and configs as bench.sh.
#
#   integration/bench-big.sh                         # the worktree's release build, 3 runs
#   SIPMAILS="/tmp/old /tmp/new" REPEAT=3 integration/bench-big.sh   # interleaved A/B
#   SMALL=2000 integration/bench-big.sh              # small-message msg/s instead
#   WARMUP=1000 SMALL=1000 SESSIONS=200 integration/bench-big.sh  # ... timed after a warm-up
#   LATENCY=60 integration/bench-big.sh              # warm per-message latency instead
#                                  (bench.sh's client, integration/lib/latency.py: p50 of
#                                  60 warm messages of 5120 B, to A's 250 and to the sink)
#   SIPMAILS="hops hops-rcpt /tmp/new" SMALL=2000 integration/bench-big.sh
#                                  # "hops", "hops-rcpt": instead of a sipmail pair, bench.sh's
#                                  # two durable hops (examples/durable_hop.rs; with SMALL only),
#                                  # so that their CPU per message sits beside sipmail's
#
# PERF=/path/perf.data: also perf record -g both relays while the message is in flight
#   (PERF_EVENTS replaces "-F 1999 -g", e.g. "-e sched:sched_switch --call-graph dwarf").
# Needs smtp-sink (Postfix) and python3. Everything on 127.0.0.1, in a temporary folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIG_MB=${BIG_MB:-200}
REPEAT=${REPEAT:-3}
SIPMAILS=${SIPMAILS:-$ROOT/target/release/sipmail}
SMALL=${SMALL:-0}        # instead of the big message: SMALL messages of 5120 B with smtp-source
SESSIONS=${SESSIONS:-10} # ... over SESSIONS sessions, timed until smtp-sink counted them all
WARMUP=${WARMUP:-0}      # ... after WARMUP messages the same way, not timed: the relays'
                         # free/ then holds files (as in bench.sh's long-lived pair)
LATENCY=${LATENCY:-0}    # instead: LATENCY warm messages one at a time (integration/lib/latency.py)
COLD=${COLD:-0}          # ... and, with LATENCY, COLD messages each on a new call, as bench.sh measures them
SINK_OUT=${SINK_OUT:-fifo} # ... smtp-sink's count through a FIFO the client sleeps on; "file":
                         # a file it reads every 0.2 ms, as runs up to 34 did (latency.py)
[ -x /usr/sbin/smtp-sink ] || { echo "bench-big: smtp-sink not found" >&2; exit 1; }
[ -z "${PERF:-}" ] || command -v perf >/dev/null \
    || { echo "bench-big: PERF is set but perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
# shellcheck source=lib/postfix.sh
. "$ROOT/integration/lib/postfix.sh"
# shellcheck source=lib/sites.sh
. "$ROOT/integration/lib/sites.sh" # exchange_keys, site_config
scratch sipmail-bigbench
BIG=$((BIG_MB * 1000000))
is_hops() { [ "$1" = hops ] || [ "$1" = hops-rcpt ]; }
HOP="$ROOT/target/release/examples/durable_hop"
for bin in $SIPMAILS; do
    if is_hops "$bin"; then
        ((SMALL > 0)) || { echo "bench-big: $bin is for SMALL runs only" >&2; exit 1; }
        cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --example durable_hop
        break
    fi
done
echo "bench-big: $BIG_MB MB, $(nproc) vCPU, git $(git -C "$ROOT" rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
n=0
for bin in $SIPMAILS; do
    n=$((n + 1))
    SM="$WORK/sm$n"
    mkdir -p "$SM"
    is_hops "$bin" && continue
    (cd "$SM" && SIPMAIL=$bin exchange_keys) >"$WORK/keys$n.log" 2>&1
done
# After each run: both relays and the sink stopped, the spool gone (keys stay).
end_run() {
    kill "$SM_A" "$SM_B" "$SINK_PID" 2>/dev/null || true
    wait "$SM_A" "$SM_B" "$SINK_PID" 2>/dev/null || true
    rm -rf "$SM/var"
}
for r in $(seq "$REPEAT"); do
    n=0
    for bin in $SIPMAILS; do
        n=$((n + 1))
        SM="$WORK/sm$n"
        read -r P_SRC P_SIP_A P_SIP_B P_SMTP_B SINK <<<"$(free_ports 5)"
        if is_hops "$bin"; then # A listens where sipmail A would, B where sipmail B's SMTP would
            mkdir -p "$SM/var"; touch "$SM/a.log"
            rcpt=""; [ "$bin" = hops-rcpt ] && rcpt=--receipts
            "$HOP" "127.0.0.1:$P_SMTP_B" "127.0.0.1:$SINK" "$SM/var/b.journal" 10 $rcpt >>"$SM/b.log" 2>&1 & SM_B=$!; PIDS+=("$SM_B")
            "$HOP" "127.0.0.1:$P_SRC" "127.0.0.1:$P_SMTP_B" "$SM/var/a.journal" 10 $rcpt >>"$SM/a.log" 2>&1 & SM_A=$!; PIDS+=("$SM_A")
        else
            site_config site-a site-b "$P_SRC" "$P_SIP_A" "$P_SIP_B" "maildir = \"var/site-a/maildir\"" >"$SM/a.toml"
            site_config site-b site-a "$P_SMTP_B" "$P_SIP_B" "$P_SIP_A" "smtp = \"127.0.0.1:$SINK\"" >"$SM/b.toml"
            (cd "$SM" && exec "$bin" run --config b.toml >>b.log 2>&1) & SM_B=$!; PIDS+=("$SM_B")
            (cd "$SM" && exec "$bin" run --config a.toml >>a.log 2>&1) & SM_A=$!; PIDS+=("$SM_A")
        fi
        wait_port "$P_SRC" 20 && wait_port "$P_SMTP_B" 20 || { echo "daemons did not start"; exit 1; }
        sink_out=file
        ((LATENCY > 0)) && sink_out=$SINK_OUT # latency.py wakes on each count through a FIFO
        counting_sink "$SINK" "$WORK/sink.cnt" "$sink_out"; PIDS+=("$SINK_PID")
        wait_port "$SINK" 10
        sleep 0.5
        reset_hwm "$SM_A"; reset_hwm "$SM_B"
        IDLE_A=$(rss_kb "$SM_A"); IDLE_B=$(rss_kb "$SM_B")
        A_OFF=$(log_size "$SM/a.log")
        load=$(cut -d' ' -f1 /proc/loadavg)
        if [ -n "${PERF:-}" ]; then # PERF=file: perf record -g of A and B while the message is in flight
            perf record ${PERF_EVENTS:--F 1999 -g} -o "$PERF.$n" -p "$SM_A,$SM_B" >/dev/null 2>&1 & PERF_PID=$!
            sleep 0.5
        fi
        if ((SMALL > 0)); then # the small-message throughput of bench.sh's sipmail path
            # send_small N: N more messages over SESSIONS sessions, until the sink has
            # counted all sent so far (SENT) or 300 s passed.
            SENT=0
            send_small() {
                local ts
                ts=$(now_ns)
                timeout 300 /usr/sbin/smtp-source -s "$SESSIONS" -m "$1" -l 5120 -f a@site-a.test \
                    -t b@site-b.test "127.0.0.1:$P_SRC" >/dev/null 2>&1 || echo "   smtp-source failed"
                SENT=$((SENT + $1))
                while (($(sink_count "$WORK/sink.cnt") < SENT)) && (($(now_ns) < ts + 300000000000)); do sleep 0.01; done
            }
            if ((WARMUP > 0)); then
                send_small "$WARMUP"
                sleep 1 # the last files' fsync of queue/ passes, so they are reusable
            fi
            C0=$(($(cpu_ticks "$SM_A") + $(cpu_ticks "$SM_B")))
            U0=$(($(user_ticks "$SM_A") + $(user_ticks "$SM_B")))
            X0=$(($(ctx_switches "$SM_A") + $(ctx_switches "$SM_B")))
            t0=$(now_ns)
            send_small "$SMALL"
            t1=$(now_ns)
            C1=$(($(cpu_ticks "$SM_A") + $(cpu_ticks "$SM_B")))
            U1=$(($(user_ticks "$SM_A") + $(user_ticks "$SM_B")))
            X1=$(($(ctx_switches "$SM_A") + $(ctx_switches "$SM_B")))
            got=$(($(sink_count "$WORK/sink.cnt") - WARMUP))
            # CPU per message of both relays together: steadier than msg/s on a busy machine.
            printf 'run %s %-28s load %s | %s x 5120 B, %s sessions%s: %s msg/s (%s at the sink) | CPU of A+B %s ms/msg (user %s), %s switches/msg\n' "$r" "$(basename "$bin")" \
                "$load" "$SMALL" "$SESSIONS" "$( ((WARMUP > 0)) && echo " after $WARMUP warm-up")" "$(awk -v n="$got" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}')" \
                "$got" \
                "$(awk -v c=$((C1 - C0)) -v hz="$(getconf CLK_TCK)" -v n="$SMALL" 'BEGIN {printf "%.3f", c * 1000 / hz / n}')" \
                "$(awk -v c=$((U1 - U0)) -v hz="$(getconf CLK_TCK)" -v n="$SMALL" 'BEGIN {printf "%.3f", c * 1000 / hz / n}')" \
                "$(awk -v c=$((X1 - X0)) -v n="$SMALL" 'BEGIN {printf "%.1f", c / n}')"
            end_run
            continue
        fi
        if ((LATENCY > 0)); then # bench.sh's warm latency, the call set up first
            python3 "$ROOT/integration/lib/latency.py" "$P_SRC" "$WORK/sink.cnt" "$SM/a.log" "$COLD" "$LATENCY" 5120 \
                >"$WORK/latency.txt" 2>&1 || echo "   latency client failed: $(tail -2 "$WORK/latency.txt")"
            printf 'run %s %-28s load %s | warm p50 at the sink: %s | to A'"'"'s 250: %s | A'"'"'s 250 to the sink: %s\n' "$r" "$(basename "$bin")" "$load" \
                "$(awk '/^WARM / {print $3 " ms (n=" substr($NF, 4)}' "$WORK/latency.txt")" \
                "$(awk '/^ACCEPTED_WARM/ {print $5 " ms"}' "$WORK/latency.txt")" \
                "$(awk '/^AFTER_A_WARM/ {print $8 " ms"}' "$WORK/latency.txt")"
            if ((COLD > 0)); then
                printf 'run %s %-28s cold p50 at the sink: %s | warm after a 1.5 s pause: %s\n' "$r" "$(basename "$bin")" \
                    "$(awk '/^COLD / {print $3 " ms"}' "$WORK/latency.txt")" "$(awk '/^PAUSED / {print $3 " ms"}' "$WORK/latency.txt")"
            fi
            end_run
            continue
        fi
        python3 "$ROOT/integration/lib/bigsend.py" "$P_SRC" "$BIG" "$WORK/big.t0" >"$WORK/big-source.log" 2>&1 \
            || echo "   refused: $(tail -2 "$WORK/big-source.log")"
        t0=$(cat "$WORK/big.t0"); t_acc=$(now_ns)
        end=$((t0 + 600000000000))
        while (($(delivered_since "$SM/a.log" "$A_OFF") < 1)) && (($(now_ns) < end)); do sleep 0.005; done
        t_b=$(now_ns)
        if [ -n "${PERF:-}" ]; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" || true; fi
        while (($(sink_count "$WORK/sink.cnt") < 1)) && (($(now_ns) < end)); do sleep 0.01; done
        t_sink=$(now_ns)
        HWM_A=$(hwm_kb "$SM_A"); HWM_B=$(hwm_kb "$SM_B")
        mbps() { awk -v b="$BIG" -v a="$1" -v z="$2" 'BEGIN {printf "%4.0f MB/s (%5.2f s)", b/1e6/((z-a)/1e9), (z-a)/1e9}'; }
        printf 'run %s %-28s load %s | into A %s | A->B %s | e2e to B %s | to sink %s | RSS +%s/+%s MB\n' \
            "$r" "$(basename "$bin")" "$load" "$(mbps "$t0" "$t_acc")" "$(mbps "$t_acc" "$t_b")" \
            "$(mbps "$t0" "$t_b")" "$(mbps "$t0" "$t_sink")" \
            $(((HWM_A - IDLE_A) / 1024)) $(((HWM_B - IDLE_B) / 1024))
        end_run
    done
done
