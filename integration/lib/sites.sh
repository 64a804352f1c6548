# Shared steps of the two-daemon suites (integration/two-daemons.sh, integration/sipp.sh):
# a work directory, the release build, keys for site-a.test and site-b.test made and
# exchanged exactly as README.md says, and both daemons started from config/site-*.toml.
# Source it after `set -euo pipefail`; it defines:
#
#   sites_init PREFIX TOOL:PACKAGE...  check the tools, build, make $WORK (/tmp/PREFIX.XXXXXX),
#                                      cd into it, copy config/; sets ROOT, SIPMAIL, WORK,
#                                      PIDS and an EXIT trap that stops every PID in PIDS
#   sites_keys [--quiet]               keys generate / export / import for both sites,
#                                      keys list, check-config for both
#   sites_capture FILE FILTER          start tshark on lo into FILE (sets TSHARK)
#   sites_start                        start B then A, wait for "relay started" (sets A, B;
#                                      logs in $WORK/a.log and $WORK/b.log)
#   fail MESSAGE                       print MESSAGE and both logs' tails, keep $WORK, exit 1
#
# Everything runs on 127.0.0.1 with the ports of config/site-a.toml and site-b.toml.

sites_init() {
    local prefix=$1 tp tool pkg
    shift
    for tp in "$@"; do
        tool=${tp%%:*}; pkg=${tp#*:}
        command -v "$tool" >/dev/null || { echo "FAIL: $tool not found (apt-get install $pkg)"; exit 1; }
    done
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    SIPMAIL="$ROOT/target/release/sipmail"
    WORK="$(mktemp -d "/tmp/$prefix.XXXXXX")"
    PIDS=()
    trap sites_cleanup EXIT
    cd "$WORK"
    cp -r "$ROOT/config" .
}

sites_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

fail() {
    echo "FAIL: $*"
    echo "--- site A log"; tail -30 "$WORK/a.log" || true
    echo "--- site B log"; tail -30 "$WORK/b.log" || true
    echo "(work directory kept: $WORK)"
    exit 1
}

# exchange_keys: in the current directory, keys for both sites in keyring/site-a and
# keyring/site-b, each importing the other's cert (README.md, "Setting up two real sites").
# Also used by postfix-chain.sh and bench.sh, which need only $SIPMAIL.
exchange_keys() {
    "$SIPMAIL" keys generate --keyring keyring/site-a --domain site-a.test
    "$SIPMAIL" keys generate --keyring keyring/site-b --domain site-b.test
    "$SIPMAIL" keys export --keyring keyring/site-a > site-a.asc
    "$SIPMAIL" keys export --keyring keyring/site-b > site-b.asc
    "$SIPMAIL" keys import --keyring keyring/site-b site-a.asc
    "$SIPMAIL" keys import --keyring keyring/site-a site-b.asc
}

# site_config ME OTHER SMTP-PORT SIP-PORT OTHER-SIP-PORT DELIVERY-LINE [QUEUE-LINES]:
# a config for site ME (site-a or site-b) on loopback ports, for scripts that pick their
# own ports; keys as exchange_keys makes them; short timers for tests.
site_config() {
    cat <<CF
[relay]
domain = "$1.test"
keyring = "keyring/$1"
spool = "var/$1/spool"
[smtp]
listen = "127.0.0.1:$3"
allow = ["127.0.0.0/8"]
max_message_size = 1000000000
[sip]
listen = "127.0.0.1:$4"
media = "127.0.0.1"
call_idle = "2s"
[[peer]]
domain = "$2.test"
sip = "sip:mail@127.0.0.1:$5"
[delivery]
$6
[queue]
retry_initial = "1s"
retry_max = "5s"
${7:-}
CF
}

sites_keys() {
    echo "== keys, as in README.md"
    # Not `>/dev/stdout`: when stdout is a file (a CI log), opening it again truncates it.
    if [ "${1:-}" = --quiet ]; then sites_key_steps >/dev/null 2>&1; else sites_key_steps 2>&1; fi
}

sites_key_steps() {
    exchange_keys
    "$SIPMAIL" keys list --keyring keyring/site-a
    "$SIPMAIL" check-config --config config/site-a.toml
    "$SIPMAIL" check-config --config config/site-b.toml
}

sites_capture() {
    tshark -i lo -f "$2" -w "$1" -q >"$WORK/tshark.log" 2>&1 &
    PIDS+=($!); TSHARK=$!
    for _ in $(seq 50); do grep -q "Capturing on" "$WORK/tshark.log" && break; sleep 0.1; done
}

sites_start() {
    echo "== start both daemons"
    "$SIPMAIL" run --config config/site-b.toml >"$WORK/b.log" 2>&1 & PIDS+=($!); B=$!
    "$SIPMAIL" run --config config/site-a.toml >"$WORK/a.log" 2>&1 & PIDS+=($!); A=$!
    for _ in $(seq 100); do
        grep -q "relay started" "$WORK/a.log" && grep -q "relay started" "$WORK/b.log" && break; sleep 0.1
    done
    grep -q "relay started" "$WORK/a.log" || fail "site A did not start"
    grep -q "relay started" "$WORK/b.log" || fail "site B did not start"
}
