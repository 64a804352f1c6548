#!/usr/bin/env bash
# Two sipmail daemons from config/site-a.toml and config/site-b.toml, keys made and
# exchanged exactly as the README says, mail submitted to A by swaks and by Python's
# smtplib, checked in B's Maildir; tshark records the loopback traffic between the relays
# and we check that no plaintext of the message crossed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for t in swaks tshark python3; do
    command -v "$t" >/dev/null || { echo "FAIL: $t not found (apt-get install swaks tshark)"; exit 1; }
done
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
SIPMAIL="$ROOT/target/release/sipmail"
WORK="$(mktemp -d /tmp/sipmail-two-daemons.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; echo "--- site A log"; tail -30 "$WORK/a.log" || true; echo "--- site B log"; tail -30 "$WORK/b.log" || true; exit 1; }

cd "$WORK"
cp -r "$ROOT/config" .
echo "== keys, as in README.md"
"$SIPMAIL" keys generate --keyring keyring/site-a --domain site-a.test
"$SIPMAIL" keys generate --keyring keyring/site-b --domain site-b.test
"$SIPMAIL" keys export --keyring keyring/site-a > site-a.asc
"$SIPMAIL" keys export --keyring keyring/site-b > site-b.asc
"$SIPMAIL" keys import --keyring keyring/site-b site-a.asc
"$SIPMAIL" keys import --keyring keyring/site-a site-b.asc
"$SIPMAIL" keys list --keyring keyring/site-a
"$SIPMAIL" check-config --config config/site-a.toml
"$SIPMAIL" check-config --config config/site-b.toml

echo "== capture on lo (everything but the SMTP submission port 2525)"
tshark -i lo -f "not tcp port 2525" -w "$WORK/relays.pcapng" -q >"$WORK/tshark.log" 2>&1 &
PIDS+=($!); TSHARK=$!
for _ in $(seq 50); do grep -q "Capturing on" "$WORK/tshark.log" && break; sleep 0.1; done

echo "== start both daemons"
"$SIPMAIL" run --config config/site-b.toml >"$WORK/b.log" 2>&1 & PIDS+=($!); B=$!
"$SIPMAIL" run --config config/site-a.toml >"$WORK/a.log" 2>&1 & PIDS+=($!); A=$!
for _ in $(seq 100); do
    grep -q "relay started" "$WORK/a.log" && grep -q "relay started" "$WORK/b.log" && break; sleep 0.1
done
grep -q "relay started" "$WORK/a.log" || fail "site A did not start"
grep -q "relay started" "$WORK/b.log" || fail "site B did not start"

MARK="sipmail-$(date +%s)-$RANDOM"
echo "== swaks -> site A, marker $MARK"
swaks --server 127.0.0.1 --port 2525 --from alice@site-a.test --to bob@site-b.test \
      --header "Subject: secret $MARK" --body "The launch code is $MARK-BODY" >"$WORK/swaks.log" 2>&1 \
    || { cat "$WORK/swaks.log"; fail "swaks was refused"; }
grep -q "250 2.0.0 Ok: queued as" "$WORK/swaks.log" || fail "swaks got no 250 queued"

echo "== Python smtplib -> site A"
python3 - "$MARK" <<'PY'
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "carol@site-a.test"; m["To"] = "dave@site-b.test"
m["Subject"] = "smtplib " + sys.argv[1]
m.set_content("Grüße, " + sys.argv[1] + "-PYBODY\n.leading dot line\n")
with smtplib.SMTP("127.0.0.1", 2525) as s:
    s.send_message(m)
PY

MD="$WORK/var/site-b/maildir/new"
for _ in $(seq 300); do
    [ "$(ls "$MD" 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.1
done
n=$(ls "$MD" | wc -l)
[ "$n" -eq 2 ] || fail "expected 2 messages in B's Maildir, found $n"
grep -l "$MARK-BODY" "$MD"/* >/dev/null || fail "swaks message body not in B's Maildir"
grep -l "$MARK-PYBODY" "$MD"/* >/dev/null || fail "smtplib message body not in B's Maildir"
grep -q "^\.\.leading dot line" "$MD"/* && fail "dot-stuffing leaked into the stored message"
grep -q "^\.leading dot line" "$MD"/* || fail "the leading-dot line was not delivered intact"
echo "   both messages are in $MD"

echo "== stop (SIGTERM): calls end with BYE"
sleep 1
kill -TERM "$A" "$B"
wait "$A" || fail "site A exited non-zero"
wait "$B" || fail "site B exited non-zero"
sleep 0.5
kill -INT "$TSHARK" 2>/dev/null || true
wait "$TSHARK" 2>/dev/null || true

echo "== what crossed between the relays"
tshark -r "$WORK/relays.pcapng" -d udp.port==5062,sip -d tcp.port==5062,sip -Y sip \
    -T fields -e ip.src -e udp.srcport -e udp.dstport -e sip.Method -e sip.Status-Code >"$WORK/sip.txt" 2>/dev/null || true
cat "$WORK/sip.txt"
grep -qP "\tINVITE" "$WORK/sip.txt" || fail "tshark saw no INVITE"
grep -qP "\t200$" "$WORK/sip.txt" || fail "tshark saw no 200 OK"
grep -qP "\tACK" "$WORK/sip.txt" || fail "tshark saw no ACK"
grep -qP "\tBYE" "$WORK/sip.txt" || fail "tshark saw no BYE"
media_bytes=$(tshark -r "$WORK/relays.pcapng" -Y "tcp.len > 0 && !(tcp.port == 5060) && !(tcp.port == 5062)" \
    -T fields -e tcp.len 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "   media TCP payload bytes between the relays: $media_bytes"
[ "$media_bytes" -gt 1000 ] || fail "the capture holds no media stream"
for needle in "$MARK" "launch code" "MAIL FROM" "bob@site-b.test>" "Grüße"; do
    if grep -aqF "$needle" "$WORK/relays.pcapng"; then fail "'$needle' crossed between the relays in clear"; fi
done
echo "   no plaintext of either message in the capture ($(stat -c %s "$WORK/relays.pcapng") bytes)"
grep -h "call established" "$WORK/a.log" "$WORK/b.log" | sed 's/^/   /'
echo "two-daemons: OK"
rm -rf "$WORK"
