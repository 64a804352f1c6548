#!/usr/bin/env bash
# Install the real peers the tests drive (gpg, sq, sipp, swaks, tshark, postfix, iproute2,
# iptables, prometheus, curl, kamailio, Python's `cryptography`, and for DNS discovery knot, kdig,
# unbound, ldns-signzone) when they are missing. On Debian/Ubuntu as
# root it installs them with apt-get; anywhere else it prints the exact command to run and
# fails, so the test command stops at once with a clear message instead of half-way with
# "sq not found".
set -euo pipefail

need=()
for tool in gpg sq sipp swaks tshark postfix ip iptables prometheus curl kamailio knotd kdig unbound ldns-signzone; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
packages="postfix swaks sip-tester gnupg sq tshark iproute2 iptables prometheus curl kamailio knot knot-dnsutils unbound ldnsutils"

if ((${#need[@]})); then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install-peers: missing ${need[*]}." >&2
        echo "  On Debian or Ubuntu run, as root:" >&2
        echo "    apt-get install --no-install-recommends $packages" >&2
        echo "  then run the test command again (it installs them itself when run as root)." >&2
        exit 1
    fi
    echo "== installing test peers (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # The first install sometimes fails with "cannot access archive"; a retry works.
    ok=0
    for attempt in 1 2 3; do
        # shellcheck disable=SC2086 # the package list is meant to split
        if apt-get install -y -qq --no-install-recommends $packages >/tmp/sipmail-peers-apt.log 2>&1; then
            ok=1
            break
        fi
        echo "apt-get install failed (attempt $attempt), retrying"; tail -5 /tmp/sipmail-peers-apt.log
        sleep 5
    done
    if ((!ok)); then
        echo "install-peers: apt-get install $packages failed; see /tmp/sipmail-peers-apt.log" >&2
        exit 1
    fi
fi

# The independent test-vector check uses Python's `cryptography`.
if ! python3 -c "import cryptography" 2>/dev/null; then
    if ! python3 -m pip install -q cryptography 2>/dev/null \
        && ! python3 -m pip install -q --break-system-packages cryptography; then
        echo "install-peers: Python's cryptography is missing: run 'apt-get install python3-cryptography' or 'pip install cryptography'" >&2
        exit 1
    fi
fi
