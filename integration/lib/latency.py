#!/usr/bin/env python3
"""Per-message latency through sipmail A -> call -> B -> smtp-sink, with Python's smtplib.

    latency.py PORT SINK_COUNT_FILE A_LOG COLD WARM SIZE [GAP_MS]

PORT is A's SMTP port, SINK_COUNT_FILE the output of `smtp-sink -c`, A_LOG A's log (its
"call ended" lines tell when a call was hung up). Each message is timed from before the
connection to A until A's 250 ("accepted by A") and until smtp-sink counted it ("at the
sink").

COLD > 0 (integration/bench.sh): COLD messages each on a new call (after the previous call
was hung up: call_idle = 2 s), WARM messages on the call the first one set up, and COLD
messages on a warm call after the same 1.5 s pause. COLD = 0 (integration/bench-big.sh's
LATENCY mode, for comparing builds): two messages to set the call up, then WARM messages
on it, GAP_MS apart (50 by default). With PORT a sink's own port, A_LOG unused and COLD 0
(bench.sh's reference line): the same client straight to the sink, no relay. Prints one
line per cold and paused message, then COLD, WARM, PAUSED and ACCEPTED_WARM summary lines
(median, min, max), and AFTER_A_WARM: each warm message's time from A's 250 to the sink
(the relays' part, without the client's SMTP session with A).
"""
import re
import smtplib
import statistics
import sys
import time

port, cnt, alog = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cold, warm, size = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
gap = float(sys.argv[7]) / 1000 if len(sys.argv) > 7 else 0.05


def count():
    with open(cnt, "rb") as f:
        f.seek(0, 2)
        n = f.tell()
        f.seek(max(0, n - 200))
        m = re.findall(rb"mesg=(\d+)", f.read())
    return int(m[-1]) if m else 0


def calls_ended():
    with open(alog, "rb") as f:
        return f.read().count(b"call ended")


body = ("Subject: latency\r\n\r\n" + "x" * 74 + "\r\n") * max(1, size // 96)


def one():
    before = count()
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("a@site-a.test", ["b@site-b.test"], body)
        t_acc = time.perf_counter()
    end = t0 + 30
    while count() <= before:
        if time.perf_counter() > end:
            return None, None
        time.sleep(0.0002)
    return (t_acc - t0) * 1000, (time.perf_counter() - t0) * 1000


colds, warms, accepted, paused = [], [], [], []


def warm_run():
    for _ in range(warm):
        acc, tot = one()
        warms.append(tot)
        accepted.append(acc)
        if cold == 0:
            time.sleep(gap)


if cold == 0:
    one()
    one()  # the call is up and warm
    warm_run()
for i in range(cold):
    # wait until the previous call has been hung up (call_idle = 2s)
    ended = calls_ended()
    end = time.time() + 15
    time.sleep(2.2)
    while calls_ended() <= ended and time.time() < end:
        time.sleep(0.05)
    acc, tot = one()
    colds.append(tot)
    print(f"cold {i}: accepted by A {acc:.2f} ms, at the sink {tot:.2f} ms")
    if i == 0:
        warm_run()
# The same pause before a message on a call that is still up (call_idle = 2s): what the
# idle machine's wake-ups cost a message after a pause, call set-up aside. Cold minus
# this is what the new call itself costs.
if cold > 0:
    one()  # a call up
for i in range(cold):
    time.sleep(1.5)
    acc, tot = one()
    paused.append(tot)
    print(f"warm after a 1.5 s pause {i}: accepted by A {acc:.2f} ms, at the sink {tot:.2f} ms")


def fmt(v):
    v = [x for x in v if x is not None]
    if not v:
        return "none measured"
    return f"median {statistics.median(v):.2f} ms, min {min(v):.2f}, max {max(v):.2f} (n={len(v)})"


if cold > 0:
    print("COLD " + fmt(colds))
print("WARM " + fmt(warms))
if cold > 0:
    print("PAUSED " + fmt(paused))
print("ACCEPTED_WARM (A's 250) " + fmt(accepted))
print("AFTER_A_WARM (A's 250 to the sink) " + fmt([t - a for t, a in zip(warms, accepted) if t is not None and a is not None]))
