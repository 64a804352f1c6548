"""Helpers for integration/postfix-chain.sh: submit mail with Python's smtplib, and read
what arrived in the Postfix instances' Maildirs. Python 3.11 standard library only."""

import email
import email.policy
import glob
import os
import smtplib
import sys
import time

FROM = "alice@site-a.test"
TO = "bob@site-b.test"


def body_for(tag, seq):
    # ~2 KB of 8-bit text with the lines SMTP transparency and 8BITMIME must keep intact.
    lines = [
        f"message {seq} of run {tag}",
        ".a line that starts with a dot",
        "..two dots",
        ".",
        "From the start of a line (mbox would quote this)",
        "Grüße aus Zürich, ÆØÅ æøå, 日本語のテキスト, emoji 📨",
        "trailing spaces   ",
        "\ttab-indented",
        "x" * 900,
    ]
    lines += [f"filler line {i:04d} " + "abcdefghij" * 6 for i in range(12)]
    return "\r\n".join(lines) + "\r\n"


def message(tag, seq, to=TO, frm=FROM, extra_headers=()):
    hdrs = [
        f"From: Alice <{frm}>",
        f"To: <{to}>",
        f"Subject: chain {tag} {seq}",
        f"Message-ID: <{tag}.{seq}@site-a.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        f"X-Chain-Tag: {tag}",
        f"X-Seq: {seq}",
        *extra_headers,
    ]
    return ("\r\n".join(hdrs) + "\r\n\r\n" + body_for(tag, seq)).encode("utf-8")


def send(port, tag, count, rate, to=TO, mail_options=(), rcpt_options=()):
    """Send `count` messages at about `rate`/s over one connection, reconnecting when
    the server goes away. Prints how many were accepted (the `sent` count)."""
    accepted = 0
    s = None
    t0 = time.monotonic()
    for seq in range(count):
        due = t0 + seq / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        msg = message(tag, seq, to=to)
        for attempt in range(60):
            try:
                if s is None:
                    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
                    s.ehlo("submitter.site-a.test")
                s.sendmail(FROM, [to], msg, mail_options=["BODY=8BITMIME", *mail_options],
                           rcpt_options=list(rcpt_options))
                accepted += 1
                break
            except (smtplib.SMTPException, OSError) as e:
                print(f"submit {tag} {seq}: {e!r}, retrying", file=sys.stderr)
                try:
                    if s is not None:
                        s.close()
                finally:
                    s = None
                time.sleep(0.5)
    if s is not None:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    print(accepted)


def maildir_messages(maildir):
    out = []
    for p in sorted(glob.glob(os.path.join(maildir, "new", "*")) + glob.glob(os.path.join(maildir, "cur", "*"))):
        with open(p, "rb") as f:
            out.append((p, f.read()))
    return out


def header(raw, name):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    v = msg.get(name)
    return None if v is None else str(v)


def count(maildir, tag, sent):
    """Prints: delivered (distinct) duplicated lost, for messages of run `tag`."""
    seen = {}
    for _, raw in maildir_messages(maildir):
        head = raw.split(b"\n\n", 1)[0]
        if f"X-Chain-Tag: {tag}\n".encode() not in head.replace(b"\r\n", b"\n") + b"\n":
            continue
        seq = int(header(raw, "X-Seq"))
        seen[seq] = seen.get(seq, 0) + 1
    delivered = len(seen)
    dup = sum(n - 1 for n in seen.values())
    lost = sum(1 for s in range(int(sent)) if s not in seen)
    print(delivered, dup, lost)


def big_body(size):
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-./:;<=>?@[]^_`{|}~\r\n"
    return line * (size // len(line))


def big_send(port, to, size):
    """One message of about `size` bytes. Prints the SHA-256 of its body with LF line
    ends (as a Maildir stores it)."""
    import hashlib
    body = big_body(int(size))
    msg = (f"From: <{FROM}>\r\nTo: <{to}>\r\nSubject: big\r\nX-Chain-Tag: big\r\n\r\n").encode() + body
    with smtplib.SMTP("127.0.0.1", int(port), timeout=600) as s:
        s.sendmail(FROM, [to], msg, mail_options=["BODY=8BITMIME"])
    print(hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest())


def big_check(maildir):
    """Prints size and SHA-256 of the body of the one message in `maildir`."""
    import hashlib
    msgs = maildir_messages(maildir)
    if len(msgs) != 1:
        sys.exit(f"expected one message in {maildir}, found {len(msgs)}")
    raw = msgs[0][1].replace(b"\r\n", b"\n")
    body = raw.split(b"\n\n", 1)[1]
    print(hashlib.sha256(body).hexdigest(), len(body))


WARNINGS = ("may arrive twice", "may be sent more than once")


def explain(maildir, tag, *logs):
    """For each message of run `tag` that arrived more than once, find the warning that
    explains it: a sipmail or Postfix log line of that kind naming one of the queue IDs
    in the copies' Received headers. Exit status: how many are unexplained."""
    import re
    copies = {}
    for _, raw in maildir_messages(maildir):
        if f"X-Chain-Tag: {tag}".encode() not in raw:
            continue
        seq = int(header(raw, "X-Seq"))
        head = raw.split(b"\n\n", 1)[0].decode("utf-8", "replace")
        ids = re.findall(r"with E?SMTP id ([0-9A-Za-z]+)", head)
        copies.setdefault(seq, []).append(ids)
    lines = []
    for log in logs:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines += [l.strip() for l in f if any(w in l for w in WARNINGS)]
    unexplained = 0
    for seq, cs in sorted(copies.items()):
        if len(cs) < 2:
            continue
        ids = {i for c in cs for i in c}
        why = [l for l in lines if any(i in l for i in ids)]
        if why:
            print(f"seq {seq} arrived {len(cs)} times; explained by: {why[0][:260]}")
        else:
            unexplained += 1
            print(f"seq {seq} arrived {len(cs)} times; NO warning names any of {sorted(ids)}")
    sys.exit(min(unexplained, 100))


HOPS = (
    "Postfix A took it twice (its client resent)",
    "Postfix A handed it to sipmail A twice (Postfix created the duplicate)",
    "sipmail A handed it to sipmail B twice (the call leg: sipmail created the duplicate)",
    "sipmail B handed it to Postfix B twice (B's SMTP hand-off: sipmail created the duplicate)",
)


def by_hop(maildir, tag):
    """For each message of run `tag` that arrived more than once: at which hop the copies
    part. Each copy's Received lines give the queue IDs of the hops, bottom up (Postfix A,
    sipmail A, sipmail B, Postfix B); two copies part at the first hop whose IDs differ.
    Prints one line per hop with a count, and `sipmail N` (duplicates sipmail created, on
    the call leg or at B's hand-off) as the last line."""
    import re
    copies = {}
    for _, raw in maildir_messages(maildir):
        if f"X-Chain-Tag: {tag}".encode() not in raw:
            continue
        seq = int(header(raw, "X-Seq"))
        head = raw.split(b"\n\n", 1)[0].decode("utf-8", "replace")
        ids = re.findall(r"\((?:sipmail|Postfix)\) with E?SMTPS? id ([0-9A-Za-z]+)", head)
        copies.setdefault(seq, []).append(list(reversed(ids)))
    counts = [0] * len(HOPS)
    for seq, cs in sorted(copies.items()):
        first = cs[0]
        for other in cs[1:]:
            hop = next((i for i, (x, y) in enumerate(zip(first, other)) if x != y), len(HOPS) - 1)
            counts[min(hop, len(HOPS) - 1)] += 1
    for n, what in zip(counts, HOPS):
        print(f"{n} {what}")
    print(f"sipmail {counts[2] + counts[3]} leg {counts[2]} handoff {counts[3]}")


def intact(maildir, tag, seq, to=TO):
    """The delivered copy has every header we sent, in order, and the same body."""
    sent = message(tag, int(seq), to=to).replace(b"\r\n", b"\n")
    s_head, s_body = sent.split(b"\n\n", 1)
    found = [raw for _, raw in maildir_messages(maildir) if f"X-Chain-Tag: {tag}".encode() in raw]
    if len(found) != 1:
        sys.exit(f"intact: expected 1 message of run {tag} in {maildir}, found {len(found)}")
    got = found[0].replace(b"\r\n", b"\n")
    g_head, g_body = got.split(b"\n\n", 1)
    if g_body != s_body:
        sys.exit(f"intact: body differs ({len(g_body)} bytes delivered, {len(s_body)} sent)")
    g_lines = g_head.split(b"\n")
    pos = 0
    for line in s_head.split(b"\n"):
        try:
            pos = g_lines.index(line, pos) + 1
        except ValueError:
            sys.exit(f"intact: header line {line!r} missing or out of order")
    received = sum(1 for l in g_lines if l.startswith(b"Received:"))
    kept = len(s_head.split(b"\n"))
    print(f"intact: {len(s_body)} body bytes identical, {kept} headers kept, {received} Received lines added")


def find_dsn(maildir, subject):
    """Prints the DSN in `maildir` about the message with `subject`: action, status,
    diagnostic; exits non-zero if there is none."""
    for p, raw in maildir_messages(maildir):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        if msg.get_content_type() != "multipart/report":
            continue
        if msg.get_param("report-type") != "delivery-status":
            continue
        parts = list(msg.iter_parts())
        status = next((x for x in parts if x.get_content_type() == "message/delivery-status"), None)
        orig = next((x for x in parts if x.get_content_type() in ("text/rfc822-headers", "message/rfc822", "message/rfc822-headers")), None)
        if status is None or orig is None:
            continue
        orig_text = orig.as_bytes().decode("utf-8", "replace")
        if subject not in orig_text:
            continue
        fields = {}
        for block in status.get_payload():
            for k, v in block.items():
                fields.setdefault(k.lower(), str(v))
        for k in ("original-recipient", "final-recipient"):
            if fields.get(k):
                fields[k] = fields[k].replace(" ", "")
        print(f"from={msg.get('From')} action={fields.get('action')} status={fields.get('status')} "
              f"final-recipient={fields.get('final-recipient')} original-recipient={fields.get('original-recipient')} "
              f"envid={fields.get('original-envelope-id')} diagnostic={fields.get('diagnostic-code')!r}")
        return
    sys.exit(f"no DSN about {subject!r} in {maildir}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "send":
        port, tag, n, rate = int(args[0]), args[1], int(args[2]), float(args[3])
        to = args[4] if len(args) > 4 else TO
        mopts = args[5].split() if len(args) > 5 else []  # "" for none
        ropts = args[6].split() if len(args) > 6 else []
        send(port, tag, n, rate, to, mopts, ropts)
    elif cmd == "count":
        count(args[0], args[1], args[2])
    elif cmd == "big-send":
        big_send(*args)
    elif cmd == "big-check":
        big_check(*args)
    elif cmd == "explain":
        explain(*args)
    elif cmd == "by-hop":
        by_hop(*args)
    elif cmd == "intact":
        intact(*args)
    elif cmd == "dsn":
        find_dsn(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")
