# Shared by integration scripts: free loopback ports, waiting for a port, process memory,
# smtp-sink's counter, and private Postfix instances on loopback
# (../shared/design/PEERS.md). Source it; it expects
# $WORK (a world-readable scratch directory) and appends started instances to PF_DIRS.

# N ports free for both TCP and UDP on 127.0.0.1 (SIP uses both).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
out, keep = [], []
while len(out) < int(sys.argv[1]):
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); continue
    keep += [t, u]; out.append(p)
print(" ".join(map(str, out)))
PY
}

wait_port() { wait_addr 127.0.0.1 "$1" "${2:-10}"; } # port [seconds]
wait_addr() { # ip port [seconds]: until a TCP connection to ip:port succeeds
    local end=$((SECONDS + ${3:-10}))
    while ((SECONDS < end)); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

now_ns() { date +%s%N; }
# A sipmail's memory counts its hand-off agent (a child process) too: a PID and its children.
with_children() { echo "$1"; pgrep -P "$1" 2>/dev/null || true; }
sum_status() { # FIELD PID -> the field summed over PID and its children, in kB
    local p total=0 v
    for p in $(with_children "$2"); do
        v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
rss_kb() { sum_status VmRSS "$1"; }
hwm_kb() { sum_status VmHWM "$1"; } # peak RSS (a sum of each process's peak; reset_hwm resets)
# CPU time in clock ticks of a PID and its children so far: the hand-off agent is a child
# process, and its work is part of the relay's. cpu_ticks: user + system; user_ticks: user
# mode alone. (Fields 12 and 13 after the command name in /proc/PID/stat.)
stat_ticks() { # awk expression over the fields, PID
    local p total=0 f
    for p in $(with_children "$2"); do
        f=$(cut -d')' -f2- "/proc/$p/stat" 2>/dev/null) || continue
        total=$((total + $(echo "$f" | awk "{print $1}")))
    done
    echo "$total"
}
cpu_ticks() { stat_ticks '$12 + $13' "$1"; }
user_ticks() { stat_ticks '$12' "$1"; }
# Context switches so far (voluntary and not) of the threads of a PID and its children that
# are alive now (a thread that ended takes its count with it).
ctx_switches() {
    local p total=0 v
    for p in $(with_children "$1"); do
        v=$(cat /proc/"$p"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}')
        total=$((total + v))
    done
    echo "$total"
}
reset_hwm() { local p; for p in $(with_children "$1"); do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }

# counting_sink PORT OUT [fifo]: smtp-sink on 127.0.0.1:PORT in the background (SINK_PID),
# its running count (-c) into the file OUT, read with sink_count; with "fifo", into a FIFO
# made at OUT for integration/lib/latency.py to sleep on, opened read-write so that the
# sink never waits for a reader (its errors then go to OUT.err).
counting_sink() {
    rm -f "$2"
    if [ "${3:-}" = fifo ]; then
        mkfifo "$2"
        /usr/sbin/smtp-sink -u nobody -c "127.0.0.1:$1" 1000 1<>"$2" 2>>"$2.err" &
    else
        /usr/sbin/smtp-sink -u nobody -c "127.0.0.1:$1" 1000 >"$2" 2>&1 &
    fi
    SINK_PID=$!
}

sink_count() { # messages counted so far in the file of `smtp-sink -c`
    local c
    c=$(tail -c 200 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1)
    echo "${c#mesg=}" | sed 's/^$/0/'
}
# A relay's "delivered to the peer" lines after byte OFFSET of its log. Only the new
# part is read: after bench.sh's throughput steps A's log holds about 31 MB, and a grep of
# the whole log every 10 ms (17 ms of CPU each for 24.5 MB, measured) took most of a core
# from the relays while the 200 MB leg was timed (run 37, docs/PERFORMANCE.md).
delivered_since() { # LOG OFFSET
    tail -c +$(($2 + 1)) "$1" | grep -c 'delivered.*route=peer' || true
}
log_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

PF_DIRS=()
# mk_postfix NAME LISTEN-PORT RELAYHOST-PORT [EXTRA main.cf LINES]
# Makes $WORK/pf-NAME and starts it: a Postfix listening on 127.0.0.1:LISTEN-PORT that
# sends everything it does not deliver itself to [127.0.0.1]:RELAYHOST-PORT.
mk_postfix() {
    local name=$1 listen=$2 relay=$3 extra=${4:-} d="$WORK/pf-$1"
    mkdir -p "$d/etc" "$d/spool" "$d/data"
    chown root "$d/spool"
    chown postfix:postfix "$d/data"
    chmod 700 "$d/data"
    cat >"$d/etc/main.cf" <<CF
compatibility_level = 3.6
config_directory = $d/etc
queue_directory = $d/spool
data_directory = $d/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = $name.test
mydomain = $name.test
myorigin = \$myhostname
mydestination =
local_transport = error:local delivery disabled
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:$relay
smtp_host_lookup = native
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = $d/maillog
maillog_file_prefixes = $d
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 30s
$extra
CF
    {
        echo "127.0.0.1:$listen inet n - n - - smtpd"
        # The standard services, not chrooted, up to postlog (no pipe transports).
        awk '/^#/ || /^$/ {next} /^smtp +inet/ {next} /^maildrop/ {exit}
             /^[a-z]/ {$5="n"} {print}' /usr/share/postfix/master.cf.dist
    } >"$d/etc/master.cf"
    PF_DIRS+=("$d")
    pf_start "$name" "$listen"
}

pf_start() { # NAME LISTEN-PORT
    local d="$WORK/pf-$1"
    postfix -c "$d/etc" start >/dev/null 2>&1 || {
        tail -20 "$d/maillog" 2>/dev/null
        echo "postfix $1 did not start (its log is above)" >&2
        return 1
    }
    wait_port "$2" 20 || {
        tail -20 "$d/maillog"
        echo "postfix $1 does not listen on $2" >&2
        return 1
    }
}
pf_stop() { postfix -c "$WORK/pf-$1/etc" stop >/dev/null 2>&1 || true; }
pf_flush() { postqueue -c "$WORK/pf-$1/etc" -f >/dev/null 2>&1 || true; }
pf_queue_size() { # messages in Postfix's queue (0 when empty)
    postqueue -c "$WORK/pf-$1/etc" -j 2>/dev/null | wc -l
}
pf_stop_all() {
    local d
    for d in "${PF_DIRS[@]}"; do postfix -c "$d/etc" stop >/dev/null 2>&1; done
}

# scratch PREFIX: a scratch directory /tmp/PREFIX.XXXXXX in $WORK, an empty PIDS, and an
# EXIT trap that stops our Postfix instances and every PID in PIDS, then removes $WORK
# (kept if KEEP is set).
scratch() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
    PIDS=()
    trap scratch_cleanup EXIT
}
scratch_cleanup() {
    set +e
    pf_stop_all
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
