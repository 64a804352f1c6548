#!/usr/bin/env bash
# Real MTAs on both ends (issue 4):
#   smtplib -> Postfix A -> sipmail A -> SIP call + encrypted media -> sipmail B -> Postfix B -> Maildir
# and back the same way for bounces and DSNs. Then the faults: sipmail B killed with -9 and
# restarted twice and sipmail A once during a 500-message run, sipmail B down for 60 s,
# Postfix B down, and a permanent 5xx from Postfix B. Every message is accounted for.
#
# Then one 200 MB message through the chain, with sipmail's peak memory checked.
# Env: KILL_MESSAGES (500), DOWN_SECS (60), BIG_MB (200), KEEP=1 keeps the scratch directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SIPMAIL="$ROOT/target/release/sipmail"
CHAIN="python3 $ROOT/integration/lib/chain.py"
KILL_MESSAGES=${KILL_MESSAGES:-500}
DOWN_SECS=${DOWN_SECS:-60}
BIG_MB=${BIG_MB:-200}
[ -x "$SIPMAIL" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v postfix >/dev/null || { echo "needs Postfix (.ci/run installs it)" >&2; exit 1; }

WORK="$(mktemp -d /tmp/sipmail-chain.XXXXXX)"
chmod 755 "$WORK"
# shellcheck source=lib/postfix.sh
. "$ROOT/integration/lib/postfix.sh"
# shellcheck source=lib/sites.sh
. "$ROOT/integration/lib/sites.sh" # exchange_keys, site_config

declare -A SM_PID=()
cleanup() {
    set +e
    pf_stop_all
    for p in "${SM_PID[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    for f in "$WORK"/sm/a.log "$WORK"/sm/b.log "$WORK"/pf-pfa/maillog "$WORK"/pf-pfb/maillog; do
        echo "--- $f"; tail -25 "$f" 2>/dev/null
    done
    exit 1
}
step() { echo; echo "== $*"; }

read -r P_PFA P_PFB P_SMA P_SMB P_SIPA P_SIPB <<<"$(free_ports 6)"
SM="$WORK/sm"
mkdir -p "$SM"

step "keys for mail@site-a.test and mail@site-b.test, exchanged"
(cd "$SM" && exchange_keys) >"$WORK/keys.log" 2>&1 || fail "key setup: $(tail -3 "$WORK/keys.log")"

site_config site-a site-b "$P_SMA" "$P_SIPA" "$P_SIPB" "smtp = \"127.0.0.1:$P_PFA\"" >"$SM/a.toml"
# B warns senders when mail waits (RFC 3464 "delayed"), with a short timer for the test.
site_config site-b site-a "$P_SMB" "$P_SIPB" "$P_SIPA" "smtp = \"127.0.0.1:$P_PFB\"" 'delay_warning = "3s"' >"$SM/b.toml"
sm_start() { # a|b
    local port=$P_SMA
    [ "$1" = b ] && port=$P_SMB
    (cd "$SM" && exec "$SIPMAIL" run --config "$1.toml" >>"$1.log" 2>&1) &
    SM_PID[$1]=$!
    wait_port "$port" 20 || fail "sipmail $1 did not start"
}
sm_kill9() { kill -9 "${SM_PID[$1]}"; wait "${SM_PID[$1]}" 2>/dev/null || true; }
sm_term() { kill -TERM "${SM_PID[$1]}"; wait "${SM_PID[$1]}" 2>/dev/null || true; }
sm_queue() { # a|b -> messages in the spool
    (cd "$SM" && "$SIPMAIL" queue list --config "$1.toml" --json 2>/dev/null) |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["messages"]))'
}
sm_retry() { (cd "$SM" && "$SIPMAIL" queue retry --config "$1.toml" >/dev/null 2>&1) || true; }

step "sipmail A (smtp $P_SMA, sip $P_SIPA) and B (smtp $P_SMB, sip $P_SIPB)"
sm_start b
sm_start a

step "Postfix A (:$P_PFA, relayhost sipmail A) and Postfix B (:$P_PFB, relayhost sipmail B)"
# Each Postfix is its site's MTA: it delivers its own domain into a Maildir (virtual(8)),
# rejects unknown local users with 550 5.1.1, and sends every other domain to sipmail.
pf_site() { # name domain listen relay users...
    local name=$1 domain=$2 listen=$3 relay=$4 map=""
    shift 4
    for u in "$@"; do map="$map {${u%%:*}@$domain=${u#*:}/}"; done  # localpart:maildir
    mkdir -p "$WORK/pf-$name/mail"
    chown 65534:65534 "$WORK/pf-$name/mail"
    mk_postfix "$name" "$listen" "$relay" "virtual_mailbox_domains = $domain
virtual_mailbox_base = $WORK/pf-$name/mail
virtual_mailbox_maps = inline:{$map }
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtputf8_enable = yes
message_size_limit = 0
virtual_mailbox_limit = 0" || fail "Postfix $name did not start"
}
pf_site pfa site-a.test "$P_PFA" "$P_SMA" alice:alice
pf_site pfb site-b.test "$P_PFB" "$P_SMB" bob:bob jörg:joerg big:big
BOB="$WORK/pf-pfb/mail/bob"
ALICE="$WORK/pf-pfa/mail/alice"

# wait_count MAILDIR TAG SENT SECONDS: prints progress; returns when all arrived.
wait_count() {
    local md=$1 tag=$2 sent=$3 secs=$4 start=$SECONDS last=-1 d dup lost
    while :; do
        read -r d dup lost <<<"$($CHAIN count "$md" "$tag" "$sent")"
        if ((d != last)) || (((SECONDS - start) % 10 == 0)); then
            printf '   %3ds: %d/%d delivered, %d duplicated; queues: Postfix A %s, sipmail A %s, sipmail B %s, Postfix B %s\n' \
                $((SECONDS - start)) "$d" "$sent" "$dup" "$(pf_queue_size pfa)" "$(sm_queue a)" "$(sm_queue b)" "$(pf_queue_size pfb)"
            last=$d
        fi
        ((d >= sent)) && return 0
        ((SECONDS - start >= secs)) && return 1
        # Cut the retry timers short: Postfix backs off up to 30 s, sipmail 5 s here.
        if (((SECONDS - start) % 5 == 4)); then pf_flush pfa; pf_flush pfb; sm_retry a; sm_retry b; fi
        sleep 1
    done
}

step "1. intact: 8-bit body, leading dots, a 900-character line, through both Postfixes and both relays"
[ "$($CHAIN send "$P_PFA" intact 1 10)" = 1 ] || fail "Postfix A did not accept the message"
wait_count "$BOB" intact 1 60 || fail "the message did not reach Postfix B's Maildir"
$CHAIN intact "$BOB" intact 0 || fail "message changed on the way"

step "1b. SMTPUTF8: to jörg@site-b.test, with a raw UTF-8 To: header, through both relays"
[ "$($CHAIN send "$P_PFA" utf8 1 10 jörg@site-b.test SMTPUTF8)" = 1 ] || fail "Postfix A did not accept"
wait_count "$WORK/pf-pfb/mail/joerg" utf8 1 60 || fail "the SMTPUTF8 message did not reach jörg's Maildir"
$CHAIN intact "$WORK/pf-pfb/mail/joerg" utf8 0 jörg@site-b.test || fail "SMTPUTF8 message changed on the way"

step "1c. DSN parameters cross the tunnel: NOTIFY=SUCCESS,FAILURE, ORCPT, ENVID, RET=HDRS; Postfix B's 'delivered' DSN comes back"
[ "$($CHAIN send "$P_PFA" dsn 1 10 bob@site-b.test "RET=HDRS ENVID=chain-envid-1" "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@site-b.test")" = 1 ] ||
    fail "Postfix A did not accept"
for _ in $(seq 60); do $CHAIN dsn "$ALICE" "chain dsn 0" >/dev/null 2>&1 && break; sleep 1; done
$CHAIN dsn "$ALICE" "chain dsn 0" | tee "$WORK/dsn1.txt" | sed 's/^/   /' || fail "no success DSN came back to alice"
grep -q "action=delivered" "$WORK/dsn1.txt" || fail "the DSN is not a 'delivered' one"
grep -q "envid=chain-envid-1" "$WORK/dsn1.txt" || fail "ENVID was not carried to Postfix B"
grep -q "original-recipient=rfc822;bob@site-b.test" "$WORK/dsn1.txt" || fail "ORCPT was not carried to Postfix B"

step "2. permanent 5xx: Postfix B rejects nobody@site-b.test; the bounce comes back through the chain"
[ "$($CHAIN send "$P_PFA" bounce 1 10 nobody@site-b.test "ENVID=chain-envid-2" "NOTIFY=FAILURE")" = 1 ] ||
    fail "Postfix A did not accept"
[ "$($CHAIN send "$P_PFA" quiet 1 10 nobody@site-b.test "" "NOTIFY=NEVER")" = 1 ] || fail "Postfix A did not accept"
for _ in $(seq 60); do $CHAIN dsn "$ALICE" "chain bounce 0" >/dev/null 2>&1 && break; sleep 1; done
$CHAIN dsn "$ALICE" "chain bounce 0" || fail "no bounce reached alice"
$CHAIN dsn "$ALICE" "chain bounce 0" >"$WORK/dsn2.txt"
grep -q "status=5.1.1" "$WORK/dsn2.txt" || fail "bounce does not say 5.1.1"
grep -q "envid=chain-envid-2" "$WORK/dsn2.txt" || fail "sipmail B's bounce lacks the ENVID"
for _ in $(seq 20); do grep -q "no bounce: the sender asked for none" "$SM/b.log" && break; sleep 0.5; done
grep -q "no bounce: the sender asked for none" "$SM/b.log" || fail "NOTIFY=NEVER: sipmail B did not say it withheld the bounce"
sleep 2
if $CHAIN dsn "$ALICE" "chain quiet 0" >/dev/null 2>&1; then fail "NOTIFY=NEVER was bounced anyway"; fi
echo "   NOTIFY=NEVER: the failure was logged and no bounce was sent"
grep -E "delivery failed for good|bounce queued" "$SM/b.log" | head -2 | sed 's/^/   sipmail B: /'

step "3. Postfix B down: sipmail B queues and retries"
pf_stop pfb
N_PF=10
[ "$($CHAIN send "$P_PFA" pfdown $N_PF 20)" = $N_PF ] || fail "Postfix A did not accept"
for _ in $(seq 60); do (($(sm_queue b) >= N_PF)) && break; sleep 1; done
(($(sm_queue b) >= N_PF)) || fail "sipmail B did not queue the messages while Postfix B was down"
grep -c "deferred" "$SM/b.log" | sed 's/^/   sipmail B deferrals logged so far: /'
echo "   sipmail B holds $(sm_queue b) messages; Postfix B stays down 6 s more (sipmail B's delay_warning is 3 s)"
sleep 6
echo "   starting Postfix B again"
pf_start pfb "$P_PFB" || fail "Postfix B did not restart"
wait_count "$BOB" pfdown $N_PF 90 || fail "mail held while Postfix B was down was not delivered"
for _ in $(seq 30); do $CHAIN dsn "$ALICE" "chain pfdown 0" >/dev/null 2>&1 && break; sleep 1; done
$CHAIN dsn "$ALICE" "chain pfdown 0" | tee "$WORK/dsn3.txt" | sed 's/^/   delay warning: /' || fail "no delay warning reached alice"
grep -q "action=delayed" "$WORK/dsn3.txt" || fail "the warning is not a 'delayed' DSN"

step "4. sipmail B down for $DOWN_SECS s"
sm_term b
N_DOWN=20
[ "$($CHAIN send "$P_PFA" bdown $N_DOWN 20)" = $N_DOWN ] || fail "Postfix A did not accept"
for ((t = 0; t < DOWN_SECS; t += 10)); do
    read -r d _ _ <<<"$($CHAIN count "$BOB" bdown $N_DOWN)"
    printf '   %2ds down: %d delivered (must be 0), sipmail A holds %s\n' "$t" "$d" "$(sm_queue a)"
    ((d == 0)) || fail "delivered while sipmail B was down?"
    sleep $((DOWN_SECS - t < 10 ? DOWN_SECS - t : 10))
done
sm_start b
T0=$SECONDS
wait_count "$BOB" bdown $N_DOWN 120 || fail "mail held while sipmail B was down was not delivered"
echo "   all $N_DOWN delivered $((SECONDS - T0)) s after sipmail B came back"

step "5. $KILL_MESSAGES messages while sipmail B is killed -9 twice and sipmail A once"
$CHAIN send "$P_PFA" kill "$KILL_MESSAGES" 40 >"$WORK/kill.sent" 2>"$WORK/kill.submit.log" &
SENDER=$!
RUN_SECS=$((KILL_MESSAGES / 40))
at() { # wait until second $1 of the run
    while ((SECONDS - K0 < $1)); do sleep 0.2; done
}
K0=$SECONDS
at $((RUN_SECS * 2 / 10)); echo "   $((SECONDS - K0))s: kill -9 sipmail B"; sm_kill9 b
sleep 1; sm_start b; echo "   $((SECONDS - K0))s: sipmail B restarted"
at $((RUN_SECS * 5 / 10)); echo "   $((SECONDS - K0))s: kill -9 sipmail B"; sm_kill9 b
sleep 1; sm_start b; echo "   $((SECONDS - K0))s: sipmail B restarted"
at $((RUN_SECS * 8 / 10)); echo "   $((SECONDS - K0))s: kill -9 sipmail A"; sm_kill9 a
sleep 1; sm_start a; echo "   $((SECONDS - K0))s: sipmail A restarted"
wait "$SENDER" || fail "the submitter failed: $(tail -3 "$WORK/kill.submit.log")"
SENT=$(cat "$WORK/kill.sent")
echo "   Postfix A accepted $SENT of $KILL_MESSAGES"
wait_count "$BOB" kill "$SENT" 300 || true
read -r DELIVERED DUP LOST <<<"$($CHAIN count "$BOB" kill "$SENT")"
count_lines() { # PATTERN FILE... -> matching lines in all files
    local pat=$1
    shift
    cat "$@" 2>/dev/null | grep -c -- "$pat" || true
}
EXPLAINED_PF=$(count_lines "may be sent more than once" "$WORK/pf-pfa/maillog" "$WORK/pf-pfb/maillog")
EXPLAINED_SM=$(count_lines "may arrive twice" "$SM/a.log" "$SM/b.log")
echo
echo "   kill test: sent $SENT, delivered $DELIVERED, duplicated $DUP, lost $LOST"
echo "   duplicate warnings logged: Postfix $EXPLAINED_PF ('may be sent more than once'), sipmail $EXPLAINED_SM ('may arrive twice')"
UNEXPLAINED=0
$CHAIN explain "$BOB" kill "$SM/a.log" "$SM/b.log" "$WORK/pf-pfa/maillog" "$WORK/pf-pfb/maillog" \
    >"$WORK/explain.txt" || UNEXPLAINED=$?
sed 's/^/   /' "$WORK/explain.txt"
# Where each duplicate was made (issue 14): the call leg must make none, since sipmail B
# recognises a resend (sender's queue ID + hash) and returns the original receipt.
$CHAIN by-hop "$BOB" kill >"$WORK/by-hop.txt"
echo "   duplicates by the hop that made them:"
sed '$d; s/^/     /' "$WORK/by-hop.txt"
read -r _ SM_DUP _ LEG_DUP _ HANDOFF_DUP <<<"$(tail -1 "$WORK/by-hop.txt")"
echo "   sipmail-created duplicates: $SM_DUP (call leg $LEG_DUP, B's SMTP hand-off to Postfix B $HANDOFF_DUP); the rest are Postfix's"
((LOST == 0)) || fail "$LOST messages lost"
((LEG_DUP == 0)) || fail "$LEG_DUP duplicates made on the call leg between the sipmail relays"
# B's hand-off agent finishes a hand-off a kill cut the daemon out of (issue 14).
((HANDOFF_DUP == 0)) || fail "$HANDOFF_DUP duplicates made at B's hand-off to Postfix B"
((UNEXPLAINED == 0)) || fail "$UNEXPLAINED duplicates without a log line that explains them"

step "6. one message of ${BIG_MB} MB through the chain; sipmail's memory stays bounded"
for x in a b; do reset_hwm "${SM_PID[$x]}"; done # reset the high-water marks
IDLE_A=$(rss_kb "${SM_PID[a]}"); IDLE_B=$(rss_kb "${SM_PID[b]}")
T0=$SECONDS
SUM=$($CHAIN big-send "$P_PFA" big@site-b.test $((BIG_MB * 1000000))) || fail "Postfix A refused the big message"
echo "   Postfix A accepted it after $((SECONDS - T0)) s"
for _ in $(seq 300); do
    ls "$WORK/pf-pfb/mail/big/new/"* >/dev/null 2>&1 && break
    sleep 1
done
read -r GOT LEN <<<"$($CHAIN big-check "$WORK/pf-pfb/mail/big")" || fail "the big message did not arrive"
echo "   in Postfix B's Maildir after $((SECONDS - T0)) s: $LEN body bytes"
[ "$GOT" = "$SUM" ] || fail "the big message's body changed on the way"
PEAK_A=$(hwm_kb "${SM_PID[a]}"); PEAK_B=$(hwm_kb "${SM_PID[b]}")
echo "   sipmail A: idle $((IDLE_A / 1024)) MB, peak $((PEAK_A / 1024)) MB; sipmail B: idle $((IDLE_B / 1024)) MB, peak $((PEAK_B / 1024)) MB"
for pair in "A $IDLE_A $PEAK_A" "B $IDLE_B $PEAK_B"; do
    read -r who idle peak <<<"$pair"
    ((peak - idle < 64 * 1024)) || fail "sipmail $who took $(((peak - idle) / 1024)) MB more than idle for one message"
done

step "every message accounted for"
echo "   sipmail A queue $(sm_queue a), sipmail B queue $(sm_queue b), Postfix A $(pf_queue_size pfa), Postfix B $(pf_queue_size pfb)"
echo "postfix-chain: OK"
