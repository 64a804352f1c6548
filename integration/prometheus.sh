#!/usr/bin/env bash
# The metrics and health endpoint, scraped by a real Prometheus (Debian package
# `prometheus`) every second, against two real sipmail daemons:
#   - site B is down when the first message comes: A's call fails (reason "network");
#   - B starts, and that message and N-1 more are delivered;
#   - Prometheus' /api/v1/query must then show what happened: accepted = delivered = N on
#     both sides, the failed call with its reason, tunnel bytes both ways, the queue back
#     to 0, call set-up and transfer histograms, and a partner key (site-c.test, made by
#     gpg to expire in 20 days) flagged as expiring soon, with the warning in A's log;
#   - /healthz answers 200; /readyz 200, then 503 with the reason while B's spool cannot
#     be written (chattr +i as root, chmod otherwise), then 200 again;
#   - a non-loopback [metrics] listen is refused by check-config unless allow_remote;
#   - promtool accepts the alert rules README.md suggests.
set -euo pipefail
source "$(dirname "$0")/lib/sites.sh"
sites_init sipmail-prometheus prometheus:prometheus promtool:prometheus swaks:swaks curl:curl gpg:gnupg python3:python3
# sites_init builds with cargo, which puts the binary under CARGO_TARGET_DIR when set.
SIPMAIL="$(cd "$ROOT" && realpath -m "${CARGO_TARGET_DIR:-target}")/release/sipmail"
N=20

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
A_SMTP=$(free_port); A_SIP=$(free_port); A_MET=$(free_port)
B_SMTP=$(free_port); B_SIP=$(free_port); B_MET=$(free_port)
PROM=$(free_port); C_SIP=$(free_port)

echo "== keys for site-a and site-b (README steps); a partner key for site-c.test from gpg, expiring in 20 days"
exchange_keys >/dev/null 2>&1
export GNUPGHOME="$WORK/gnupg"
mkdir -m 700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key 'mail@site-c.test' ed25519 sign,cert 20d 2>/dev/null
gpg --armor --export mail@site-c.test >site-c.asc
"$SIPMAIL" keys import --keyring keyring/site-a site-c.asc

echo "== configs: [metrics] on loopback; A calls B over SIP/TCP (a down peer fails at once)"
{
    site_config site-a site-b "$A_SMTP" "$A_SIP" "$B_SIP" 'maildir = "var/site-a/maildir"' \
        | sed "s|^sip = \"sip:mail@127.0.0.1:$B_SIP\"|sip = \"sip:mail@127.0.0.1:$B_SIP;transport=tcp\"|"
    printf '[[peer]]\ndomain = "site-c.test"\nsip = "sip:mail@127.0.0.1:%s;transport=tcp"\n' "$C_SIP"
    printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$A_MET"
} >a.toml
{
    site_config site-b site-a "$B_SMTP" "$B_SIP" "$A_SIP" 'maildir = "var/site-b/maildir"'
    printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$B_MET"
} >b.toml
"$SIPMAIL" check-config --config a.toml >/dev/null
"$SIPMAIL" check-config --config b.toml >/dev/null

echo "== check-config refuses a non-loopback metrics address unless allow_remote = true"
sed "s|^listen = \"127.0.0.1:$A_MET\"|listen = \"0.0.0.0:$A_MET\"|" a.toml >remote.toml
if "$SIPMAIL" check-config --config remote.toml >remote.log 2>&1; then
    fail "check-config accepted metrics.listen = 0.0.0.0"
fi
grep -q "metrics.listen: 0.0.0.0:$A_MET is not a loopback address" remote.log \
    || { cat remote.log; fail "the error does not name metrics.listen and the reason"; }
grep -q "allow_remote = true" remote.log || fail "the error does not say how to allow it"
printf 'allow_remote = true\n' >>remote.toml
"$SIPMAIL" check-config --config remote.toml >/dev/null || fail "allow_remote = true was not accepted"
echo "   $(grep -o 'metrics.listen: .*' remote.log | head -1 | cut -c1-100)..."

echo "== promtool checks the alert rules README.md suggests"
sed -n '/^## Monitoring/,/^## /p' "$ROOT/README.md" | sed -n '/^```yaml$/,/^```$/p' | sed '1d;$d' >rules.yml
[ -s rules.yml ] || fail "no alert rules found in README.md's Monitoring section"
promtool check rules rules.yml | sed 's/^/   /'

echo "== Prometheus on 127.0.0.1:$PROM scraping both relays every second"
cat >prometheus.yml <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: sipmail
    static_configs:
      - targets: ["127.0.0.1:$A_MET"]
        labels: {site: a}
      - targets: ["127.0.0.1:$B_MET"]
        labels: {site: b}
EOF
mkdir tsdb
prometheus --config.file=prometheus.yml --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM" >prometheus.log 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PROM/-/ready" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PROM/-/ready" >/dev/null || { tail prometheus.log; fail "Prometheus did not start"; }
prometheus --version 2>&1 | head -1 | sed 's/^/   /'

# query EXPR: the value of a PromQL expression with one result (empty if none).
query() {
    curl -sf --get "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode "query=$1" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if len(r)==1 else "")'
}
# expect EXPR CHECK: wait (up to 30 s) until the value of EXPR passes the Python
# condition CHECK on v (a float), e.g. "v == 20"; prints the value.
expect() {
    local v="" _
    for _ in $(seq 60); do
        v=$(query "$1")
        if [ -n "$v" ] && python3 -c "import sys; v=float(sys.argv[1]); sys.exit(0 if ($2) else 1)" "$v"; then
            printf '   %-95s = %s\n' "$1" "$v"
            return 0
        fi
        sleep 0.5
    done
    fail "Prometheus: $1 is '${v}', expected $2"
}

echo "== start site A only (site B is down)"
"$SIPMAIL" run --config a.toml >"$WORK/a.log" 2>&1 & PIDS+=($!); A=$!
for _ in $(seq 100); do grep -q "relay started" "$WORK/a.log" && break; sleep 0.1; done
grep -q "relay started" "$WORK/a.log" || fail "site A did not start"

send() {
    swaks --server 127.0.0.1 --port "$A_SMTP" --from alice@site-a.test --to "bob@site-b.test" \
          --header "Subject: metrics test $1" --body "message $1" >"$WORK/swaks.log" 2>&1 \
        || { cat "$WORK/swaks.log"; fail "swaks was refused (message $1)"; }
}
echo "== message 1 while B is down: the call fails"
send 1
for _ in $(seq 100); do grep -q "call failed; mail stays queued" "$WORK/a.log" && break; sleep 0.1; done
grep -q "call failed; mail stays queued" "$WORK/a.log" || fail "A did not report a failed call"
expect 'sipmail_calls_failed_total{site="a",peer="site-b.test",direction="outgoing",reason="network"}' 'v >= 1'
expect 'sipmail_queue_messages{site="a",route="site-b.test"}' 'v == 1'
expect 'up{site="b"}' 'v == 0'
echo "   /readyz on A while B is down (A itself is ready; B's trouble is reported):"
curl -s "http://127.0.0.1:$A_MET/readyz" | sed 's/^/     /'
curl -sf "http://127.0.0.1:$A_MET/readyz" | grep -q "partner site-b.test: last call (outgoing) failed (network)" \
    || fail "A's /readyz does not report the failed call to site-b.test"

echo "== start site B; message 1 is retried, then $((N - 1)) more"
"$SIPMAIL" run --config b.toml >"$WORK/b.log" 2>&1 & PIDS+=($!); B=$!
for _ in $(seq 100); do grep -q "relay started" "$WORK/b.log" && break; sleep 0.1; done
grep -q "relay started" "$WORK/b.log" || fail "site B did not start"
for i in $(seq 2 "$N"); do send "$i"; done
MD="$WORK/var/site-b/maildir/new"
for _ in $(seq 300); do [ "$(ls "$MD" 2>/dev/null | wc -l)" -ge "$N" ] && break; sleep 0.1; done
n=$(ls "$MD" | wc -l)
[ "$n" -eq "$N" ] || fail "expected $N messages in B's Maildir, found $n"
echo "   $n messages in B's Maildir"

echo "== what Prometheus scraped"
expect 'up{site="a"}' 'v == 1'
expect 'up{site="b"}' 'v == 1'
expect 'sipmail_messages_accepted_total{site="a",route="site-b.test"}' "v == $N"
expect 'sipmail_messages_delivered_total{site="a",route="site-b.test"}' "v == $N"
expect 'sipmail_messages_accepted_total{site="b",route="local"}' "v == $N"
expect 'sipmail_messages_delivered_total{site="b",route="local"}' "v == $N"
expect 'sum(sipmail_messages_bounced_total) or vector(0)' 'v == 0'
expect 'sipmail_messages_deferred_total{site="a",route="site-b.test"}' 'v >= 1'
expect 'sipmail_calls_failed_total{site="a",peer="site-b.test",direction="outgoing",reason="network"}' 'v >= 1'
expect 'sipmail_calls_placed_total{site="a",peer="site-b.test"}' 'v >= 2'
expect 'sipmail_calls_established_total{site="a",peer="site-b.test",direction="outgoing"}' 'v >= 1'
expect 'sipmail_calls_answered_total{site="b",peer="site-a.test"}' 'v >= 1'
expect 'sipmail_calls_established_total{site="b",peer="site-a.test",direction="incoming"}' 'v >= 1'
# Every call A placed either came up or failed.
expect 'sum(sipmail_calls_placed_total{site="a",peer="site-b.test"}) - sum(sipmail_calls_established_total{site="a",peer="site-b.test",direction="outgoing"}) - sum(sipmail_calls_failed_total{site="a",peer="site-b.test",direction="outgoing"})' 'v == 0'
expect 'sum(sipmail_key_continuity_total{site="a",peer="site-b.test"})' 'v >= 1'
expect 'sipmail_tunnel_bytes_total{site="a",peer="site-b.test",direction="out"}' 'v > 0'
expect 'sipmail_tunnel_bytes_total{site="a",peer="site-b.test",direction="in"}' 'v > 0'
expect 'sipmail_tunnel_bytes_total{site="b",peer="site-a.test",direction="in"}' 'v > 0'
# Every message came back with B's signed receipt (A's "in" bytes are mostly receipts:
# with these small messages they outweigh what A sends).
expect 'sipmail_receipts_issued_total{site="b",peer="site-a.test"}' "v == $N"
expect 'sipmail_receipts_verified_total{site="a",peer="site-b.test"}' "v == $N"
expect 'sum(sipmail_receipts_refused_total) or vector(0)' 'v == 0'
# ...and a delivered receipt when B handed it on, fetched by A through its call.
expect 'sipmail_delivered_receipts_issued_total{site="b",peer="site-a.test"}' "v == $N"
expect 'sipmail_delivered_receipts_verified_total{site="a",peer="site-b.test"}' "v == $N"
expect 'sum(sipmail_delivered_receipts_refused_total) or vector(0)' 'v == 0'
expect 'sipmail_queue_messages{site="a",route="site-b.test"}' 'v == 0'
expect 'sipmail_queue_oldest_message_age_seconds{site="a",route="site-b.test"}' 'v == 0'
expect 'sipmail_queue_messages{site="b",route="local"}' 'v == 0'
expect 'sipmail_call_setup_seconds_count{site="a",peer="site-b.test"}' 'v >= 1'
expect 'histogram_quantile(0.5, sipmail_call_setup_seconds_bucket{site="a",peer="site-b.test"})' 'v > 0'
expect 'sipmail_message_transfer_seconds_count{site="a",route="site-b.test"}' "v == $N"
expect 'sipmail_message_transfer_seconds_count{site="b",route="local"}' "v == $N"
expect 'sipmail_peer_last_call_success{site="a",peer="site-b.test"}' 'v == 1'
C_EXP=$(gpg --with-colons --list-keys mail@site-c.test 2>/dev/null | awk -F: '/^pub/ {print $7; exit}')
expect 'sipmail_key_expiry_timestamp_seconds{site="a",owner="partner",domain="site-c.test"}' "v == $C_EXP"
expect 'sipmail_key_expires_soon{site="a",owner="partner",domain="site-c.test"}' 'v == 1'
expect 'sipmail_key_expires_soon{site="a",owner="partner",domain="site-b.test"}' 'v == 0'
expect 'sipmail_key_expires_soon{site="a",owner="own",domain="site-a.test"}' 'v == 0'
grep -q "key expires within 30 days.*" "$WORK/a.log" || fail "no key expiry warning in A's log"
grep "key expires within 30 days" "$WORK/a.log" | grep -q "site-c.test" || fail "the warning does not name site-c.test"
[ "$(grep -c "key expires within 30 days" "$WORK/a.log")" -eq 1 ] || fail "the key warning was logged more than once"
echo "   A's log: $(grep -o 'key expires within 30 days.*' "$WORK/a.log" | cut -c1-110)..."

echo "== /healthz and /readyz"
for port in "$A_MET" "$B_MET"; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz")" = 200 ] || fail "/healthz on $port is not 200"
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ] || fail "/readyz on $port is not 200"
done
curl -s "http://127.0.0.1:$A_MET/readyz" | grep -q "partner site-b.test: last call (outgoing) came up" \
    || fail "A's /readyz does not report the last call to site-b.test"
SPOOL_TMP="$WORK/var/site-b/spool/tmp"
if [ "$(id -u)" -eq 0 ]; then
    how="chattr +i"; chattr +i "$SPOOL_TMP"
    undo() { chattr -i "$SPOOL_TMP"; }
else
    how="chmod 0555"; chmod 0555 "$SPOOL_TMP"
    undo() { chmod 0755 "$SPOOL_TMP"; }
fi
code=$(curl -s -m 10 -o readyz.txt -w '%{http_code}' "http://127.0.0.1:$B_MET/readyz")
undo
echo "   B's spool tmp/ made unwritable ($how): /readyz answered $code:"
sed 's/^/     /' readyz.txt
[ "$code" = 503 ] || fail "/readyz is $code, not 503, with an unwritable spool"
grep -q "^the spool is not writable: creating .*/spool/tmp/ready-.*\.probe" readyz.txt \
    || fail "/readyz does not say that the spool is not writable, and where"
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$B_MET/readyz")" = 200 ] || fail "/readyz did not come back to 200"
echo "   writable again: /readyz 200"

echo "== stop"
kill -TERM "$A" "$B"
wait "$A" || fail "site A exited non-zero"
wait "$B" || fail "site B exited non-zero"
rm -rf "$WORK"
echo "== prometheus.sh passed"
