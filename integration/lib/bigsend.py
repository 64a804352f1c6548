"""One big message into an SMTP server with the body prepared in memory before the clock
starts: used by integration/bench.sh and bench-big.sh. Args: PORT SIZE READY-FILE (gets
the time in ns when the greeting arrived)."""
import socket, sys, time
port, size, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
line = b"x" * 98 + b"\r\n"
body = b"Subject: big\r\n\r\n" + line * (size // len(line)) + b".\r\n"
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if l[3:4] != b"-":
            return l
reply()
open(ready, "w").write(str(time.time_ns()))  # connected and greeted: the clock starts
for cmd in (b"EHLO big.test", b"MAIL FROM:<a@site-a.test>", b"RCPT TO:<b@site-b.test>", b"DATA"):
    s.sendall(cmd + b"\r\n"); r = reply()
s.sendall(body)
r = reply()
s.sendall(b"QUIT\r\n")
sys.exit(0 if r.startswith(b"250") else 1)
