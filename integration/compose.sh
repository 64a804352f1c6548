#!/usr/bin/env bash
# The Docker deployment as shipped: docker-compose.yml brings up two sites (Postfix and
# sipmail each, on their own networks, the relays joined by a "wan" network), and mail
# sent into Postfix A must reach Postfix B's Maildir:
#   1. one message arrives, byte for byte in body and Message-ID; only SIP (and media)
#      crosses between the sites (SMTP of the other site, and the other Postfix, are out of reach);
#   2. sipmail B is cut off the wan (`docker network disconnect`) for DOWN_SECS (60) while
#      MESSAGES (100) are sent into A; none arrives while cut; after reconnecting all arrive,
#      each exactly once (by Message-ID);
#   3. `docker stop` sipmail B (SIGTERM: a quick clean stop, exit 0), start it; then MESSAGES
#      more while sipmail B is killed (`docker kill`, SIGKILL) and started again: none lost,
#      any duplicate only with a log line that says it may arrive twice.
# Skipped (exit 0, with a message) when there is no Docker engine. Builds the base image
# from Debian's packages first when it is missing (integration/docker/base-images.sh), and
# the sipmail image from the binary built here (target runtime-prebuilt; README.md, "Run
# with Docker"). Everything it makes is named sipmailtest<PID>: compose project, networks,
# volumes and the two images, and only those are removed at the end (KEEP=1 keeps them).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MESSAGES=${MESSAGES:-100}
DOWN_SECS=${DOWN_SECS:-60}

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "SKIP: no Docker engine here (docker info fails): the compose test needs one"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
    BUILD_FLAGS=()
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
    # Compose v1 uses the classic builder: no leftover containers from a failed step.
    BUILD_FLAGS=(--force-rm)
else
    echo "FAIL: a Docker engine runs but there is no compose: apt-get install docker-compose (or the docker-compose-plugin)"
    exit 1
fi

P=sipmailtest$$
export SIPMAIL_IMAGE=$P-sipmail:latest POSTFIX_IMAGE=$P-postfix:latest
export SIPMAIL_TARGET=runtime-prebuilt SIPMAIL_BINARY=target/docker/sipmail
# Subnets of our own: SIPMAIL_NET.{0,1,2}.0/24, not overlapping any network that exists.
taken=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' $(docker network ls -q) 2>/dev/null || true)
SIPMAIL_NET=
for i in $(seq 0 49); do
    n=10.$((200 + ($$ + i) % 50))
    grep -q "$n\." <<<"$taken" || { SIPMAIL_NET=$n; break; }
done
[ -n "$SIPMAIL_NET" ] || { echo "FAIL: no free 10.200-249.x subnets for the test networks"; exit 1; }
export SIPMAIL_NET
dc() { "${COMPOSE[@]}" -p "$P" "$@"; }
cid() { dc ps -q "$1"; }

started=0
cleanup() {
    local rc=$?
    set +e
    if ((started)); then
        if ((rc != 0)); then
            echo "--- logs (tail) of project $P"
            for s in sipmail-a sipmail-b postfix-a postfix-b; do dc logs --no-color --tail 15 "$s" 2>&1; done
        fi
        if [ -n "${KEEP:-}" ]; then
            echo "kept compose project $P (remove it with: ${COMPOSE[*]} -p $P down -v; docker rmi $SIPMAIL_IMAGE $POSTFIX_IMAGE)"
        else
            dc down -v --remove-orphans >/dev/null 2>&1
            # --no-prune: the layers below stay as build cache for the next run.
            docker rmi --no-prune "$SIPMAIL_IMAGE" "$POSTFIX_IMAGE" >/dev/null 2>&1
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

echo "== base image"
if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    echo "debian:bookworm-slim exists"
else
    t0=$SECONDS
    integration/docker/base-images.sh
    echo "base image built in $((SECONDS - t0)) s"
fi

echo "== sipmail binary without the demo feature, for the runtime-prebuilt target"
t0=$SECONDS
cargo build --release --quiet --no-default-features
echo "built in $((SECONDS - t0)) s"
mkdir -p target/docker
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/sipmail" target/docker/sipmail

echo "== ${COMPOSE[*]} -p $P up -d --build (networks $SIPMAIL_NET.0-2.0/24)"
started=1
compose_t0=$SECONDS
t0=$SECONDS
dc build "${BUILD_FLAGS[@]}" >"/tmp/$P-build.log" 2>&1 || { tail -30 "/tmp/$P-build.log"; fail "image build failed"; }
build_s=$((SECONDS - t0))
rm -f "/tmp/$P-build.log"
t0=$SECONDS
dc up -d
SA=$(cid sipmail-a) SB=$(cid sipmail-b) PA=$(cid postfix-a) PB=$(cid postfix-b)
for c in "$SA" "$SB"; do
    end=$((SECONDS + 60))
    until docker logs "$c" 2>&1 | grep -q "relay started"; do
        ((SECONDS < end)) || fail "a relay did not start within 60 s"
        sleep 0.5
    done
done
up_s=$((SECONDS - t0))
echo "images built in ${build_s} s; both relays up ${up_s} s after 'up -d'"
dc logs --no-color keys-a | grep -A1 "fingerprint of" || true
[ "$(docker exec "$SA" id -u)" != 0 ] || fail "sipmail A runs as root"

# send PHASE COUNT [PAUSE]: COUNT messages into Postfix A by its sendmail, each with the
# Message-ID <P.PHASE.N@site-a.test>, PAUSE seconds apart.
send() {
    docker exec "$PA" sh -c '
        i=1
        while [ $i -le "$2" ]; do
            printf "From: alice@site-a.test\nTo: bob@site-b.test\nSubject: compose %s %s\nMessage-ID: <%s.%s.%s@site-a.test>\n\nbody of %s message %s\n" \
                "$1" $i "$4" "$1" $i "$1" $i | sendmail -f alice@site-a.test bob@site-b.test || exit 1
            i=$((i + 1))
            sleep "$3"
        done' sh "$1" "$2" "${3:-0}" "$P"
}
# ids PHASE: the Message-IDs of that phase in Postfix B's Maildir, one line each (with repeats).
ids() {
    docker exec "$PB" sh -c 'find /var/mail/vmail/inbox/new -type f -exec grep -h -i "^Message-ID:" {} + 2>/dev/null' |
        tr -d '\r' | grep -o "<$P\.$1\.[0-9]*@site-a.test>" || true
}
count() { ids "$1" | wc -l; }
distinct() { ids "$1" | sort -u | wc -l; }
wait_count() { # PHASE N SECONDS: until N distinct messages of PHASE are in B, or the time is up
    # Distinct: a duplicate must not end the wait while another message is still on its way
    # (a message whose call failed in the kill waits for its retry at A).
    local end=$((SECONDS + $3))
    while (($(distinct "$1") < $2 && SECONDS < end)); do sleep 1; done
}
# check_all PHASE N: every one of N there; prints lost and duplicated.
check_all() {
    local got arrived missing=() lost dup
    got=$(ids "$1" | sort | uniq -c) # one snapshot for every figure below
    arrived=$(grep -c . <<<"$got" || true)
    for i in $(seq "$2"); do grep -q "<$P\.$1\.$i@" <<<"$got" || missing+=("<$P.$1.$i@site-a.test>"); done
    lost=${#missing[@]}
    dup=$(awk '$1 > 1' <<<"$got" | wc -l)
    echo "phase $1: sent $2, arrived $arrived distinct, lost $lost, duplicated $dup"
    if ((lost > 0)); then # what a failure needs to be explained: which ones, and where they are
        printf '   missing: %s\n' "${missing[@]}"
        echo "   sipmail A's queue:"
        docker exec "$SA" sipmail queue list --config /var/lib/sipmail/sipmail.toml 2>&1 | sed 's/^/      /' || true
    fi
    LOST=$lost DUP=$dup
}

echo "== 1. one message A -> B"
send one 1
wait_count one 1 60
[ "$(count one)" -eq 1 ] || fail "the first message did not arrive in Postfix B's Maildir within 60 s"
docker exec "$PB" sh -c "grep -l -F '<$P.one.1@site-a.test>' /var/mail/vmail/inbox/new/* | xargs cat" >"/tmp/$P-one.eml"
grep -q "^body of one message 1" "/tmp/$P-one.eml" || fail "the first message's body is not what was sent"
grep -q "^X-Sipmail-Authenticated-Peer: site-a.test; auth=signed" "/tmp/$P-one.eml" ||
    fail "the first message did not come through a signed call (no X-Sipmail-Authenticated-Peer)"
rm -f "/tmp/$P-one.eml"
echo "arrived through a signed call"

echo "== only SIP crosses: what sipmail B can reach on the other site"
reach() { docker exec "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/$3" >/dev/null 2>&1; }
reach "$SB" "$SIPMAIL_NET.0.10" 5060 || fail "sipmail B cannot reach sipmail A's SIP port"
! reach "$SB" "$SIPMAIL_NET.0.10" 2525 || fail "sipmail A's SMTP port answers on the wan"
! reach "$SB" "$SIPMAIL_NET.1.10" 2525 || fail "sipmail B reaches sipmail A's site-network address"
! reach "$SB" "$SIPMAIL_NET.1.25" 25 || fail "sipmail B reaches Postfix A"
! reach "$PB" "$SIPMAIL_NET.0.10" 5060 || fail "Postfix B reaches sipmail A (it must not be on the wan)"
echo "SIP yes; A's SMTP on the wan, A's site network and Postfix A from B: no"

echo "== 2. sipmail B off the wan for ${DOWN_SECS} s while $MESSAGES messages are sent into A"
cut_at=$SECONDS
docker network disconnect "${P}_wan" "$SB"
send cut "$MESSAGES"
sent_s=$((SECONDS - cut_at))
while ((SECONDS - cut_at < DOWN_SECS)); do sleep 1; done
during=$(count cut)
queued=$(docker exec "$SA" sipmail queue list --config /var/lib/sipmail/sipmail.toml --json | grep -c '"id"' || true)
docker network connect --ip "$SIPMAIL_NET.0.20" --alias sipmail-b "${P}_wan" "$SB"
back_at=$SECONDS
echo "sent $MESSAGES in ${sent_s} s; after $((back_at - cut_at)) s cut: $during in B, $queued queued at sipmail A; reconnected"
((during == 0)) || fail "$during messages reached B while it was cut off"
wait_count cut "$MESSAGES" 180
echo "all in B $((SECONDS - back_at)) s after reconnecting"
check_all cut "$MESSAGES"
((LOST == 0)) || fail "$LOST messages lost across the network cut"
((DUP == 0)) || fail "$DUP messages arrived twice across the network cut"

echo "== 3a. docker stop sipmail B (SIGTERM)"
t0=$(date +%s%N)
docker stop -t 30 "$SB" >/dev/null
stop_ms=$((($(date +%s%N) - t0) / 1000000))
code=$(docker inspect -f '{{.State.ExitCode}}' "$SB")
echo "stopped in ${stop_ms} ms, exit code $code"
docker logs --tail 5 "$SB" 2>&1 | grep -q "relay stopped" || fail "sipmail B's log does not end with 'relay stopped'"
((code == 0)) || fail "sipmail B exited with $code on SIGTERM"
((stop_ms < 15000)) || fail "docker stop took ${stop_ms} ms (SIGTERM not handled, or sessions not ending?)"
docker start "$SB" >/dev/null

echo "== 3b. $MESSAGES messages while sipmail B is killed (SIGKILL) and started again"
send kill "$MESSAGES" 0.05 &
sender=$!
wait_count kill $((MESSAGES / 5)) 60
before=$(count kill)
docker kill "$SB" >/dev/null
sleep 3
docker start "$SB" >/dev/null
echo "killed sipmail B after $before arrived; started again"
wait "$sender" || fail "sending into Postfix A failed"
wait_count kill "$MESSAGES" 180
check_all kill "$MESSAGES"
((LOST == 0)) || fail "$LOST messages lost across the kill"
if ((DUP > 0)); then
    explained=$(docker logs "$SA" 2>&1 | grep -c "may arrive twice" || true)
    explained=$((explained + $(docker logs "$SB" 2>&1 | grep -c "may arrive twice" || true)))
    ((explained >= DUP)) || fail "$DUP duplicates but only $explained 'may arrive twice' log lines"
    echo "$DUP duplicates, each announced by a 'may arrive twice' log line"
fi

echo "== health"
sleep_until=$((SECONDS + 60))
for c in "$SA" "$SB" "$PA" "$PB"; do
    while [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" != healthy ]; do
        ((SECONDS < sleep_until)) || fail "container $c is $(docker inspect -f '{{.State.Health.Status}}' "$c"), not healthy"
        sleep 1
    done
done
echo "all four containers healthy"
echo "compose test passed: $((SECONDS - compose_t0)) s from docker compose up to here"
