#!/usr/bin/env bash
# Real SIP software against two live sipmail relays (config/site-a.toml, config/site-b.toml,
# keys made with `sipmail keys ...` as in README.md):
#   1. a real call A->B captured with tshark: INVITE/200/ACK/BYE decode as SIP, nothing
#      malformed;
#   2. SIPp, over UDP and over TCP: OPTIONS -> 200 (Allow, Accept, Supported); a phone's
#      plain INVITE -> 488 with a Warning, SIPp's ACK absorbed (no 488 retransmission);
#   3. SIPp floods relay B with INVITEs at 1,000 calls/s for 10 s (from 127.0.0.2; UDP, then
#      TCP) while mail is submitted to relay A: the mail must arrive in B's Maildir during
#      the flood, and B must answer OPTIONS afterwards. Prints INVITEs answered per second
#      and B's RSS before and after.
# Everything stays on 127.0.0.0/8; every flood is bounded in calls (-m) and time (-timeout).
set -euo pipefail
source "$(dirname "$0")/lib/sites.sh"
sites_init sipmail-sipp sipp:sip-tester tshark:tshark python3:python3
SCEN="$ROOT/integration/sipp"

FLOOD_RATE="${SIPP_FLOOD_RATE:-1000}"   # calls per second
FLOOD_SECS="${SIPP_FLOOD_SECS:-10}"
FLOOD_CALLS=$((FLOOD_RATE * FLOOD_SECS))
SIPP_IP=127.0.0.2                       # the flooder: not a configured peer
B_SIP=127.0.0.1:5062

# Short call idle time and retry, so that each batch of mail below needs a new call.
sed -i 's/^call_idle = .*/call_idle = "1s"/; s/^retry_initial = .*/retry_initial = "1s"/; s/^retry_max = .*/retry_max = "2s"/' \
    config/site-a.toml config/site-b.toml
sites_keys --quiet

echo "== capture SIP between the relays (ports 5060, 5062)"
sites_capture "$WORK/sip.pcapng" "port 5060 or port 5062"
sites_start

MD="$WORK/var/site-b/maildir/new"
# submit TAG COUNT: COUNT messages into relay A by Python's smtplib, marked TAG.
submit() {
    python3 - "$1" "$2" <<'PY'
import smtplib, sys
from email.message import EmailMessage
tag, n = sys.argv[1], int(sys.argv[2])
with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as s:
    for i in range(n):
        m = EmailMessage()
        m["From"] = "alice@site-a.test"; m["To"] = "bob@site-b.test"
        m["Subject"] = f"{tag} {i}"
        m.set_content(f"body {tag}-{i}-END\n")
        s.send_message(m)
PY
}
delivered() { grep -l -- "$1" "$MD"/* 2>/dev/null | wc -l; }
wait_delivered() { # TAG COUNT SECONDS
    local end=$((SECONDS + $3))
    while [ "$SECONDS" -lt "$end" ]; do
        [ "$(delivered "$1")" -ge "$2" ] && return 0; sleep 0.1
    done
    [ "$(delivered "$1")" -ge "$2" ]
}
rss() { awk '/^VmRSS/ {print $2 " " $3}' "/proc/$1/status"; }

# sipp_run NAME TRANSPORT(u1|t1) SCENARIO [more sipp args]: runs SIPp from $SIPP_IP
# against relay B; output in $WORK/NAME.*
SIPP_PORT=5090
sipp_run() {
    local name=$1 tr=$2 sf=$3; shift 3
    mkdir -p "$WORK/$name"
    SIPP_PORT=$((SIPP_PORT + 1))
    (cd "$WORK/$name" && sipp -sf "$SCEN/$sf" "$B_SIP" -i "$SIPP_IP" -p "$SIPP_PORT" -t "$tr" -nostdin \
        -trace_err -trace_stat -stf stats.csv -fd 1 "$@") >"$WORK/$name/out.txt" 2>&1
}
# stat NAME COLUMN: the last value of a column of SIPp's statistics CSV.
sipp_stat() {
    python3 - "$WORK/$1/stats.csv" "$2" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1]), delimiter=";"))
print(rows[-1][rows[0].index(sys.argv[2])])
PY
}

echo "== 1. a real call A->B, decoded by tshark"
submit capture 1
wait_delivered capture 1 20 || fail "the first message did not arrive"
for _ in $(seq 60); do grep -q "call ended" "$WORK/b.log" && break; sleep 0.1; done
sleep 0.5
kill -INT "$TSHARK" 2>/dev/null || true
wait "$TSHARK" 2>/dev/null || true
DEC=(-d udp.port==5062,sip -d tcp.port==5062,sip)
tshark -r "$WORK/sip.pcapng" "${DEC[@]}" -Y sip -T fields -e sip.Method -e sip.Status-Code \
    2>/dev/null | tr '\t' ' ' | sed 's/^ *//; s/ *$//' >"$WORK/sip.txt"
sed 's/^/   /' "$WORK/sip.txt" | sort | uniq -c
for m in INVITE ACK BYE; do grep -qx "$m" "$WORK/sip.txt" || fail "tshark decoded no $m"; done
grep -qx "200" "$WORK/sip.txt" || fail "tshark decoded no 200 OK"
malformed=$(tshark -r "$WORK/sip.pcapng" "${DEC[@]}" -Y "_ws.malformed || _ws.expert.severity >= error" 2>/dev/null | wc -l)
[ "$malformed" -eq 0 ] || { tshark -r "$WORK/sip.pcapng" "${DEC[@]}" -Y "_ws.malformed || _ws.expert.severity >= error" -V | head -40; fail "tshark found $malformed malformed packets"; }
echo "   tshark: INVITE, 200, ACK, BYE decoded as SIP; no malformed packets or expert errors"

for tr in u1 t1; do
    T=$([ "$tr" = u1 ] && echo UDP || echo TCP)
    echo "== 2. SIPp over $T: OPTIONS -> 200; plain INVITE -> 488, ACK absorbed"
    sipp_run "options-$tr" "$tr" options.xml -m 3 -timeout 20s -timeout_error \
        || { cat "$WORK/options-$tr/out.txt"; fail "SIPp OPTIONS over $T"; }
    sipp_run "invite488-$tr" "$tr" invite_488.xml -m 5 -r 5 -timeout 30s -timeout_error \
        || { cat "$WORK/invite488-$tr/out.txt"; cat "$WORK/invite488-$tr"/*errors.log 2>/dev/null | head -30; fail "SIPp plain INVITE over $T"; }
    echo "   OPTIONS: $(sipp_stat "options-$tr" "SuccessfulCall(C)") of 3 answered 200;" \
         "plain INVITE: $(sipp_stat "invite488-$tr" "SuccessfulCall(C)") of 5 answered 488 and ACKed, no retransmission"

    echo "== 3. SIPp INVITE flood over $T: $FLOOD_RATE calls/s, $FLOOD_CALLS calls, while A sends mail to B"
    rss_before=$(rss "$B")
    calls_before=$(grep -c "call established" "$WORK/b.log" || true)
    let_in_before=$(grep -c "source=$SIPP_IP.*not a sipmail offer" "$WORK/b.log" || true)
    limit_lines_before=$(grep -c "INVITE rate limit exceeded" "$WORK/b.log" || true)
    start=$SECONDS
    sipp_run "flood-$tr" "$tr" invite_flood.xml -r "$FLOOD_RATE" -m "$FLOOD_CALLS" -l 5000 \
        -recv_timeout 8s -timeout "$((FLOOD_SECS + 40))s" &
    SIPP=$!; PIDS+=($SIPP)
    sent=0
    for at in 2 5 8; do
        while [ $((SECONDS - start)) -lt "$at" ]; do sleep 0.1; done
        submit "flood-$tr-$at" 3
        sent=$((sent + 3))
    done
    wait_delivered "flood-$tr-" "$sent" 15 || fail "mail sent during the $T flood did not all arrive ($(delivered "flood-$tr-") of $sent)"
    arrived_at=$((SECONDS - start))
    sipp_rc=0; wait "$SIPP" || sipp_rc=$?
    flood_secs=$((SECONDS - start))
    rss_after=$(rss "$B")
    calls_during=$(( $(grep -c "call established" "$WORK/b.log") - calls_before ))
    let_in=$(( $(grep -c "source=$SIPP_IP.*not a sipmail offer" "$WORK/b.log" || true) - let_in_before ))
    ok=$(sipp_stat "flood-$tr" "SuccessfulCall(C)")
    failed=$(sipp_stat "flood-$tr" "FailedCall(C)")
    elapsed=$(sipp_stat "flood-$tr" "ElapsedTime(C)")
    rate=$(python3 -c "import sys; p=[int(x) for x in sys.argv[1].split(':')]; t=p[0]*3600+p[1]*60+p[2]+(p[3]/1e6 if len(p)>3 else 0); print(f'{int(sys.argv[2])/max(t,1):.0f}')" "$elapsed" "$ok")
    echo "   SIPp: $ok INVITEs answered (488 or 503) and ACKed, $failed failed, in $elapsed: $rate answered/s (exit $sipp_rc)"
    echo "   of these, $let_in were let in by the rate limit and answered 488 by the callee; the rest got a stateless 503 with Retry-After"
    echo "   mail: $sent messages sent to A at 2, 5 and 8 s into the flood, all in B's Maildir by ${arrived_at}s ($calls_during new calls A->B)"
    echo "   relay B RSS: before $rss_before, after $rss_after"
    [ "$ok" -ge $((FLOOD_CALLS * 99 / 100)) ] || fail "only $ok of $FLOOD_CALLS flood INVITEs were answered"
    [ "$calls_during" -ge 1 ] || fail "no call A->B was established during the flood"
    [ "$let_in" -le $((40 + 20 * (flood_secs + 1))) ] || fail "the rate limit let in $let_in INVITEs in ${flood_secs}s"
    sipp_run "options-after-$tr" "$tr" options.xml -m 1 -timeout 20s -timeout_error \
        || { cat "$WORK/options-after-$tr/out.txt"; fail "B did not answer OPTIONS after the $T flood"; }
    echo "   after the flood: OPTIONS -> 200"
    echo "   $(( $(grep -c "INVITE rate limit exceeded" "$WORK/b.log" || true) - limit_lines_before )) rate-limit log lines in B's log for this flood (at most 5/s)"
done

kill -0 "$A" && kill -0 "$B" || fail "a relay died"
kill -TERM "$A" "$B"
wait "$A" || fail "site A exited non-zero"
wait "$B" || fail "site B exited non-zero"
echo "sipp: OK"
rm -rf "$WORK"
