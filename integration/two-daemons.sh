#!/usr/bin/env bash
# Two sipmail daemons from config/site-a.toml and config/site-b.toml, keys made and
# exchanged exactly as the README says, mail submitted to A by swaks and by Python's
# smtplib, checked in B's Maildir; tshark records the loopback traffic between the relays
# and we check that no plaintext of the message crossed.
set -euo pipefail
source "$(dirname "$0")/lib/sites.sh"
sites_init sipmail-two-daemons swaks:swaks tshark:tshark python3:python3
sites_keys

echo "== capture on lo (everything but the SMTP submission port 2525)"
sites_capture "$WORK/relays.pcapng" "not tcp port 2525"
sites_start

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

echo "== audit: the call's records (docs/AUDIT.md) verify with sipmail verify-call and gpg --verify"
RA=$(ls var/site-a/spool/calls/*/*.out.json 2>/dev/null | head -1)
[ -n "$RA" ] || fail "site A wrote no call record"
RB=$(ls var/site-b/spool/calls/*/"$(basename "$RA" .out.json)".in.json 2>/dev/null | head -1)
[ -n "$RB" ] || fail "site B has no record of call $(basename "$RA" .out.json)"
"$SIPMAIL" verify-call --config config/site-a.toml "$RA" --compare "$RB" --export audit >audit.txt \
    || { cat audit.txt; fail "verify-call did not verify A's record"; }
grep -E "^  (ok|FAIL|--)" audit.txt | sed 's/^/ /'
"$SIPMAIL" verify-call --config config/site-b.toml "$RB" >/dev/null || fail "verify-call did not verify B's record"
if command -v gpg >/dev/null; then
    export GNUPGHOME="$WORK/gnupg"; mkdir -m 700 "$GNUPGHOME"
    gpg --batch -q --import site-a.asc site-b.asc 2>/dev/null
    for part in answer confirm; do
        gpg --batch --status-fd 1 --verify "audit/$part.sig" "audit/$part.data" 2>/dev/null | grep -q "^\[GNUPG:\] VALIDSIG" \
            || fail "gpg --verify rejected the recorded $part signature"
    done
    gpgconf --kill gpg-agent 2>/dev/null || true
    echo "   gpg --verify: both recorded signatures are good"
else
    echo "   (gpg not installed: gpg --verify step skipped; apt-get install gnupg)"
fi
echo "two-daemons: OK"
rm -rf "$WORK"
