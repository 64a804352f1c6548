#!/usr/bin/env bash
# Firewalls and NAT (issue 13, item 5): site A and site B in two network namespaces,
# joined through a third, "router", namespace that masquerades A's outbound traffic and
# forwards (DNAT) B's public SIP port and media port range to B's private address. Nothing
# else crosses: the router's FORWARD policy is DROP except for established traffic and
# DNAT-ed connections. B advertises its public address (sip.advertise) and a fixed media
# port range (sip.media_ports) that the DNAT forwards.
#
#   A 10.91.1.2 --- 10.91.1.1 [router: 203.0.113.5 = B's public address] 10.91.2.1 --- B 10.91.2.2
#
# Three runs, each with fresh daemons and spools:
#   1. advertise + media_ports: a message sent into A (smtplib) arrives in B's Maildir
#      through a signed call.
#   2. no sip.advertise: B signs its private address, A cannot reach it, nothing arrives.
#   3. advertise but no media_ports: B's media port is not forwarded, nothing arrives.
#   4. media_ports all in use: B refuses the call with 503 and logs why.
# Needs root and `ip netns`; skipped with a message otherwise. All namespaces and
# interfaces carry a per-run prefix and are removed on exit (the veths go with them).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "SKIP: integration/nat.sh needs root (network namespaces)"; exit 0; fi
if ! ip netns list >/dev/null 2>&1; then echo "SKIP: integration/nat.sh: no \`ip netns\` here"; exit 0; fi
for t in iptables python3; do
    command -v "$t" >/dev/null || { echo "FAIL: $t not found (apt-get install $t)"; exit 1; }
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# For exchange_keys only (its other helpers are for loopback sites); our fail() below
# replaces its fail().
# shellcheck source=integration/lib/sites.sh
source "$ROOT/integration/lib/sites.sh"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
SIPMAIL="${CARGO_TARGET_DIR:-$ROOT/target}/release/sipmail"
WORK="$(mktemp -d /tmp/sipmail-nat.XXXXXX)"
P="sn$$"                     # per-run prefix; interface names stay under 15 characters
NA="$P-a" NB="$P-b" NR="$P-r"
PIDS=()
KEEP=0
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "$NA" "$NB" "$NR"; do ip netns del "$n" 2>/dev/null || true; done
    [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    KEEP=1
    echo "FAIL: $*"
    echo "--- site A log"; tail -30 "$WORK/run/a.log" || true
    echo "--- site B log"; tail -30 "$WORK/run/b.log" || true
    echo "(work directory kept: $WORK)"
    exit 1
}
in_a() { ip netns exec "$NA" "$@"; }
in_b() { ip netns exec "$NB" "$@"; }
in_r() { ip netns exec "$NR" "$@"; }

echo "== namespaces $NA, $NB, $NR: A and B on private nets, the router NATs"
for n in "$NA" "$NB" "$NR"; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip link add "${P}A" netns "$NA" type veth peer name "${P}RA" netns "$NR"
ip link add "${P}B" netns "$NB" type veth peer name "${P}RB" netns "$NR"
ip -n "$NA" addr add 10.91.1.2/24 dev "${P}A"; ip -n "$NA" link set "${P}A" up
ip -n "$NB" addr add 10.91.2.2/24 dev "${P}B"; ip -n "$NB" link set "${P}B" up
ip -n "$NR" addr add 10.91.1.1/24 dev "${P}RA"; ip -n "$NR" link set "${P}RA" up
ip -n "$NR" addr add 10.91.2.1/24 dev "${P}RB"; ip -n "$NR" link set "${P}RB" up
ip -n "$NR" addr add 203.0.113.5/32 dev lo
ip -n "$NA" route add default via 10.91.1.1
ip -n "$NB" route add default via 10.91.2.1
in_r sysctl -qw net.ipv4.ip_forward=1
PUB=203.0.113.5 PRIV_B=10.91.2.2 SIP_B=5062 SIP_A=5061 MEDIA=40000:40009
for proto in udp tcp; do
    in_r iptables -t nat -A PREROUTING -d $PUB -p $proto --dport $SIP_B -j DNAT --to-destination $PRIV_B
done
in_r iptables -t nat -A PREROUTING -d $PUB -p tcp --dport $MEDIA -j DNAT --to-destination $PRIV_B
in_r iptables -t nat -A POSTROUTING -s 10.91.1.0/24 -o "${P}RB" -j MASQUERADE
in_r iptables -P FORWARD DROP
in_r iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
in_r iptables -A FORWARD -i "${P}RA" -o "${P}RB" -m conntrack --ctstate DNAT -j ACCEPT
# The NAT holds: A cannot reach B's private address, B cannot reach A's.
in_a python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(0 if s.connect_ex(('$PRIV_B', $SIP_B)) else 1)" \
    || fail "A reached B's private address directly: the router does not isolate"

cd "$WORK"
echo "== keys, as in README.md (exchange_keys of integration/lib/sites.sh)"
exchange_keys >/dev/null 2>&1 || fail "making and exchanging the keys failed"

config_a() {
    cat <<CF
[relay]
domain = "site-a.test"
keyring = "$WORK/keyring/site-a"
spool = "$WORK/run/a-spool"
[smtp]
listen = "127.0.0.1:2525"
[sip]
listen = "10.91.1.2:$SIP_A"
media = "10.91.1.2"
call_idle = "2s"
[[peer]]
domain = "site-b.test"
sip = "sip:mail@$PUB:$SIP_B"
[delivery]
maildir = "$WORK/run/a-maildir"
[queue]
retry_initial = "60s"
CF
}
# config_b EXTRA-SIP-LINES
config_b() {
    cat <<CF
[relay]
domain = "site-b.test"
keyring = "$WORK/keyring/site-b"
spool = "$WORK/run/b-spool"
[smtp]
listen = "127.0.0.1:2525"
[sip]
listen = "$PRIV_B:$SIP_B"
media = "$PRIV_B"
call_idle = "2s"
$1
[[peer]]
domain = "site-a.test"
# A is behind a NAT with no forwarding: B never calls it in this test.
sip = "sip:mail@10.91.2.1:$SIP_A"
[delivery]
maildir = "$WORK/run/b-maildir"
CF
}

# run NAME EXTRA-B-LINES EXPECT(deliver|fail): fresh daemons, one message into A.
run() {
    local name=$1 extra=$2 expect=$3 mark="nat-$1-$$"
    echo "== run $name: B's [sip] adds: ${extra:-nothing}"
    [ -d run ] && mv run "run-prev-$(date +%s%N)"
    mkdir run
    config_a > run/a.toml
    config_b "$extra" > run/b.toml
    "$SIPMAIL" check-config --config run/a.toml >/dev/null
    "$SIPMAIL" check-config --config run/b.toml >/dev/null
    ip netns exec "$NB" "$SIPMAIL" run --config run/b.toml >run/b.log 2>&1 & PIDS+=($!); local b=$!
    ip netns exec "$NA" "$SIPMAIL" run --config run/a.toml >run/a.log 2>&1 & PIDS+=($!); local a=$!
    for _ in $(seq 100); do
        grep -q "relay started" run/a.log && grep -q "relay started" run/b.log && break; sleep 0.1
    done
    grep -q "relay started" run/b.log || fail "site B did not start"
    grep -q "relay started" run/a.log || fail "site A did not start"
    in_a python3 - "$mark" <<'PY' || fail "smtplib could not hand the message to A"
import smtplib, sys
mark = sys.argv[1]
msg = f"From: alice@site-a.test\r\nTo: bob@site-b.test\r\nSubject: {mark}\r\n\r\n{mark}-BODY through the NAT\r\n"
with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
    s.sendmail("alice@site-a.test", ["bob@site-b.test"], msg)
PY
    local got=0 start=$SECONDS
    for _ in $(seq 200); do
        if grep -qs "$mark-BODY" run/b-maildir/new/* 2>/dev/null; then got=1; break; fi
        # A failed call is logged once; give the failure cases ~25 s to be sure.
        [ "$expect" != deliver ] && [ $((SECONDS - start)) -ge 25 ] && break
        sleep 0.2
    done
    if [ "$expect" = deliver ]; then
        [ "$got" = 1 ] || fail "run $name: the message did not reach B's Maildir in 40 s"
        grep -q "call established" run/a.log || fail "run $name: A logged no established (signed) call"
        grep -q "call established" run/b.log || fail "run $name: B logged no established (signed) call"
        echo "   delivered in $((SECONDS - start)) s; A's call:"
        grep -h "call established" run/a.log | head -1 | sed 's/^/   /'
        grep -h "relay started" run/b.log | sed 's/^/   B: /'
        # The caller connected to the advertised (signed) address, not B's private one.
        if grep -q "$PRIV_B:400" run/a.log; then fail "run $name: A's log names B's private media address"; fi
    elif [ "$expect" = busy ]; then
        [ "$got" = 0 ] || fail "run $name: the message arrived although every media port was taken"
        grep -q "no free media port in sip.media_ports" run/b.log || fail "run $name: B did not log the full media port range"
        grep -q "503" run/a.log || fail "run $name: A did not see B's 503"
        echo "   refused (as expected):"
        grep -h "no free media port" run/b.log | head -1 | sed 's/^/   B: /'
        grep -h "503" run/a.log | head -1 | sed 's/^/   A: /'
    else
        [ "$got" = 0 ] || fail "run $name: the message arrived although B's setup cannot work through the NAT"
        echo "   not delivered (as expected); A says:"
        grep -hiE "media connection|call failed|deferred|set-up" run/a.log | head -3 | sed 's/^/   /'
        grep -qiE "media connection" run/a.log || fail "run $name: A's log does not say the media connection failed"
    fi
    kill "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
}

run advertised 'media_ports = "40000-40009"
advertise = "203.0.113.5"' deliver
run no-advertise 'media_ports = "40000-40009"' fail
run no-media-ports 'advertise = "203.0.113.5"' fail
# 4. Every port of the range taken (one port, held by another listener in B's namespace):
#    B refuses the call with 503 and says why.
#    SO_REUSEADDR: the earlier runs leave 40000 in TIME_WAIT, and a plain bind would fail
#    there while B's listener (tokio sets SO_REUSEADDR) would not: the run would then test
#    nothing. So the blocker reuses too, and the script checks that it really holds the port.
ip netns exec "$NB" python3 -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('$PRIV_B', 40000)); s.listen(); time.sleep(120)" &
blocker=$!
PIDS+=($blocker)
for _ in $(seq 50); do
    ip netns exec "$NB" ss -Hltn "sport = :40000" | grep -q . && break
    kill -0 "$blocker" 2>/dev/null || fail "the blocker could not take $PRIV_B:40000 in B's namespace"
    sleep 0.1
done
ip netns exec "$NB" ss -Hltn "sport = :40000" | grep -q . || fail "nothing listens on $PRIV_B:40000 after 5 s: the ports-busy run would test nothing"
run ports-busy 'media_ports = "40000-40000"
advertise = "203.0.113.5"' busy
echo "== nat.sh: passed (delivered through the NAT with sip.advertise + sip.media_ports; not without either; 503 when the range is full)"
