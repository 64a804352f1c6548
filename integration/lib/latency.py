#!/usr/bin/env python3
"""Per-message latency through sipmail A -> call -> B -> smtp-sink, with Python's smtplib.

    latency.py PORT SINK_COUNT_FILE A_LOG COLD WARM SIZE [GAP_MS]

PORT is A's SMTP port, SINK_COUNT_FILE the output of `smtp-sink -c`, A_LOG A's log (its
"call ended" lines tell when a call was hung up). Each message is timed from before the
connection to A until A's 250 ("accepted by A") and until smtp-sink counted it ("at the
sink").

How "at the sink" is seen: when SINK_COUNT_FILE is a FIFO (the benches give smtp-sink's
standard output one), this client sleeps in select() on it and reads the count the moment
smtp-sink writes it. When it is a plain file, it reads the file every 0.2 ms, the way
runs up to 34 measured: that adds the time to the next read (in one traced message, 0.32
ms after smtp-sink's 250) and takes CPU from the relays on this 2-core machine for every
read (docs/PERFORMANCE.md, run 35).

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
import os
import re
import select
import smtplib
import stat
import statistics
import sys
import time

port, cnt, alog = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cold, warm, size = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
gap = float(sys.argv[7]) / 1000 if len(sys.argv) > 7 else 0.05


class Sink:
    """smtp-sink's running count (`-c`: "sess=N quit=N mesg=N" and a carriage return, one
    line for each message and each session's end)."""

    def __init__(self, path):
        self.fifo = stat.S_ISFIFO(os.stat(path).st_mode)
        self.path, self.seen, self.tail = path, 0, b""
        if self.fifo:
            # Non-blocking, so that opening does not wait for a writer and a read never
            # hangs; the waiting is select()'s.
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def count(self):
        """The count so far (what smtp-sink has written, without waiting)."""
        if not self.fifo:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                n = f.tell()
                f.seek(max(0, n - 200))
                m = re.findall(rb"mesg=(\d+)", f.read())
            return int(m[-1]) if m else 0
        while select.select([self.fd], [], [], 0)[0] and self._read():
            pass
        return self.seen

    def wait_above(self, before, deadline):
        """Waits until the count is above `before`; False at `deadline` (perf_counter)."""
        while self.count() <= before:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            if not self.fifo:
                time.sleep(0.0002)
            elif select.select([self.fd], [], [], left)[0] and not self._read():
                sys.exit("latency: smtp-sink closed its output (did it stop?)")
        return True

    def _read(self):
        """One read from the FIFO; False at its end (no writer left)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        lines = (self.tail + chunk).split(b"\r")
        self.tail = lines.pop()  # a line not yet ended
        for line in reversed(lines):
            m = re.search(rb"mesg=(\d+)", line)
            if m:
                self.seen = int(m.group(1))
                break
        return True


sink = Sink(cnt)


def calls_ended():
    with open(alog, "rb") as f:
        return f.read().count(b"call ended")


body = ("Subject: latency\r\n\r\n" + "x" * 74 + "\r\n") * max(1, size // 96)


def one():
    before = sink.count()
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("a@site-a.test", ["b@site-b.test"], body)
        t_acc = time.perf_counter()
    if not sink.wait_above(before, t0 + 30):
        return None, None
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
