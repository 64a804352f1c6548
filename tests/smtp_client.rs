//! The SMTP client against our own server over loopback TCP, against
//! scripted fake servers, and against Python's `smtpd` as a third-party
//! server.

#[path = "smtp_common/mod.rs"]
mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{start_server, test_config, wait_for};
use sipmail::smtp::{ClientError, ClientTimeouts, SmtpClient};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

/// An AsyncRead that hands out its data in small, varying pieces, so
/// dot-stuffing is exercised across read boundaries.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
}

impl Trickle {
    fn new(data: &[u8]) -> Self {
        Trickle {
            data: data.to_vec(),
            pos: 0,
            step: 0,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.step = self.step % 5 + 1;
        let n = self
            .step
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Records every write call, to check command batching.
struct Recording<S> {
    inner: S,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let n = *n;
            self.writes.lock().unwrap().push(buf[..n].to_vec());
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn one_mb_body() -> Vec<u8> {
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u32;
    while body.len() < 1024 * 1024 {
        let line = match i % 7 {
            0 => format!(".dot line {i}\r\n"),
            1 => ".\r\n".to_string(),
            2 => format!("..{i}\r\n"),
            3 => format!(
                "\u{e9}\u{e8} 8-bit {i} {}\r\n",
                "x".repeat((i % 90) as usize)
            ),
            _ => format!("plain line {i}\r\n"),
        };
        body.extend_from_slice(line.as_bytes());
        i += 1;
    }
    body
}

#[tokio::test]
async fn client_to_our_server_byte_exact() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    sock.set_nodelay(true).unwrap();
    let mut c = SmtpClient::connect(sock, "relay.example", ClientTimeouts::default())
        .await
        .unwrap();
    assert_eq!(c.greeting().code, 220);
    let ext = c.extensions().clone();
    assert!(ext.esmtp && ext.pipelining && ext.eight_bit_mime && ext.enhanced_status_codes);
    assert_eq!(ext.size, Some(4 * 1024 * 1024));

    let big = one_mb_body();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "simple",
            b"Subject: a\r\n\r\nhello\r\n".to_vec(),
            b"Subject: a\r\n\r\nhello\r\n".to_vec(),
        ),
        (
            "dots",
            b".\r\n..\r\n.x\r\n\r\n.\r\n...\r\nx.\r\n".to_vec(),
            b".\r\n..\r\n.x\r\n\r\n.\r\n...\r\nx.\r\n".to_vec(),
        ),
        ("leading dot, no CRLF", b".".to_vec(), b".\r\n".to_vec()),
        ("no final CRLF", b"abc".to_vec(), b"abc\r\n".to_vec()),
        (
            "ends with dot line",
            b"abc\r\n.".to_vec(),
            b"abc\r\n.\r\n".to_vec(),
        ),
        ("ends with CR", b"abc\r".to_vec(), b"abc\r\n".to_vec()),
        ("empty", Vec::new(), Vec::new()),
        (
            "bare LF normalised",
            b"a\nb\n.c\n".to_vec(),
            b"a\r\nb\r\n.c\r\n".to_vec(),
        ),
        (
            "8bit",
            "h\u{e9}llo \u{2713}\r\n".as_bytes().to_vec(),
            "h\u{e9}llo \u{2713}\r\n".as_bytes().to_vec(),
        ),
        ("1 MB", big.clone(), big.clone()),
    ];
    for (i, (name, body, _)) in cases.iter().enumerate() {
        let rcpts = vec![format!("r{i}@b.example")];
        // Alternate plain slices and a trickling reader.
        let out = if i % 2 == 0 {
            c.send_sized("s@a.example", &rcpts, &body[..], Some(body.len() as u64))
                .await
                .unwrap()
        } else {
            c.send("s@a.example", &rcpts, Trickle::new(body))
                .await
                .unwrap()
        };
        let data = out.data.clone().expect(name);
        assert_eq!(data.code, 250, "{name}: {data:?}");
        assert_eq!(data.enhanced, Some((2, 0, 0)));
        assert_eq!(data.text, format!("Ok: queued as Q{}", i + 1));
        assert_eq!(out.delivered(), vec![rcpts[0].as_str()]);
    }
    assert_eq!(c.noop().await.unwrap().code, 250);
    c.quit().await.unwrap();
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.messages.len(), cases.len());
    for ((name, _, expected), (env, got)) in cases.iter().zip(&st.messages) {
        assert!(
            got == expected,
            "{name}: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        );
        assert!(env.body_8bit, "{name}");
    }
    // SIZE= was declared for the sized sends only.
    assert_eq!(st.mail_params[0].size, Some(cases[0].1.len() as u64));
    assert_eq!(st.mail_params[1].size, None);
    assert_eq!(st.summaries[0].messages_accepted, cases.len() as u32);
}

#[tokio::test]
async fn pipelined_envelope_in_one_write_and_partial_rejection() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let writes = Arc::new(Mutex::new(Vec::new()));
    let rec = Recording {
        inner: sock,
        writes: writes.clone(),
    };
    let mut c = SmtpClient::connect(rec, "relay.example", ClientTimeouts::default())
        .await
        .unwrap();
    let rcpts = vec![
        "a@b.example".to_string(),
        "x@denied.example".to_string(),
        "c@b.example".to_string(),
    ];
    let out = c.send("s@a.example", &rcpts, &b"hi\r\n"[..]).await.unwrap();
    // CHUNKING is offered: the whole transaction, body included, is one write.
    assert!(writes.lock().unwrap().iter().any(|w| w
        == b"MAIL FROM:<s@a.example> BODY=8BITMIME\r\nRCPT TO:<a@b.example>\r\nRCPT TO:<x@denied.example>\r\nRCPT TO:<c@b.example>\r\nBDAT 4 LAST\r\nhi\r\n"));
    assert_eq!(out.mail.code, 250);
    let codes: Vec<u16> = out.per_rcpt.iter().map(|(_, r)| r.code).collect();
    assert_eq!(codes, vec![250, 550, 250]);
    assert!(out.per_rcpt[1].1.is_permanent());
    assert_eq!(out.data.as_ref().map(|r| r.code), Some(250));
    assert_eq!(out.delivered(), vec!["a@b.example", "c@b.example"]);

    // No recipient accepted: the server drops the chunk it was sent with, and the
    // transaction is reset; the connection is reusable.
    writes.lock().unwrap().clear();
    let rcpts = vec!["x@denied.example".to_string()];
    let out = c
        .send("s@a.example", &rcpts, &b"never sent\r\n"[..])
        .await
        .unwrap();
    assert_eq!(out.data, None);
    assert_eq!(out.per_rcpt[0].1.code, 550);
    let w = writes.lock().unwrap().concat();
    assert!(
        w.ends_with(b"BDAT 12 LAST\r\nnever sent\r\nRSET\r\n"),
        "{}",
        String::from_utf8_lossy(&w)
    );

    // MAIL refused: every recipient carries the MAIL reply.
    let rcpts = vec!["a@b.example".to_string(), "c@b.example".to_string()];
    let out = c
        .send("bad@a.example", &rcpts, &b"x\r\n"[..])
        .await
        .unwrap();
    assert_eq!(out.mail.code, 550);
    assert!(out.per_rcpt.iter().all(|(_, r)| r == &out.mail));
    assert_eq!(out.data, None);

    // Declared size over the server's limit: refused at MAIL.
    let out = c
        .send_sized("s@a.example", &rcpts, &b"x\r\n"[..], Some(10 * 1024 * 1024))
        .await
        .unwrap();
    assert_eq!(out.mail.code, 552);
    assert_eq!(out.mail.enhanced, Some((5, 3, 4)));

    let out = c
        .send("s@a.example", &rcpts, &b"last\r\n"[..])
        .await
        .unwrap();
    assert_eq!(out.data.map(|r| r.code), Some(250));
    c.quit().await.unwrap();
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.messages.len(), 2);
    assert_eq!(st.messages[0].0.rcpt_to, vec!["a@b.example", "c@b.example"]);
    assert_eq!(st.messages[1].1, b"last\r\n");
}

/// A fake server: sends each scripted reply after reading one line (the
/// first one right away), records the lines it got.
async fn fake_server(
    script: Vec<&'static str>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = sock.into_split();
        let mut rd = BufReader::new(rd);
        let mut lines = Vec::new();
        let mut first = true;
        for reply in script {
            if !first {
                let mut l = String::new();
                if rd.read_line(&mut l).await.unwrap_or(0) == 0 {
                    break;
                }
                lines.push(l);
            }
            first = false;
            if wr.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
        // Collect what else comes, then hang up after 1 s of silence.
        let mut l = String::new();
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(1), rd.read_line(&mut l)).await
        {
            if n == 0 {
                break;
            }
            lines.push(std::mem::take(&mut l));
        }
        lines
    });
    (addr, h)
}

#[tokio::test]
async fn helo_fallback_and_step_by_step() {
    let (addr, h) = fake_server(vec![
        "220-fake.example first\r\n220 second line\r\n",
        "502 5.5.1 EHLO not supported\r\n",
        "250 fake.example\r\n",
        "250 ok\r\n",
        "451 4.2.0 later\r\n",
        "250 ok\r\n",
        "354 go\r\n",
        "250 queued\r\n",
        "221 bye\r\n",
    ])
    .await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let mut c = SmtpClient::connect(sock, "me.example", ClientTimeouts::default())
        .await
        .unwrap();
    assert_eq!(c.greeting().text, "fake.example first\nsecond line");
    assert!(!c.extensions().esmtp && !c.extensions().pipelining);
    let rcpts = vec!["a@x".to_string(), "b@x".to_string()];
    let out = c.send("f@x", &rcpts, &b".hidden\r\nok"[..]).await.unwrap();
    assert!(out.per_rcpt[0].1.is_transient());
    assert_eq!(out.data.as_ref().unwrap().text, "queued");
    assert_eq!(out.delivered(), vec!["b@x"]);
    c.quit().await.unwrap();
    let lines = h.await.unwrap();
    assert_eq!(
        lines.concat(),
        "EHLO me.example\r\nHELO me.example\r\nMAIL FROM:<f@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n..hidden\r\nok\r\n.\r\nQUIT\r\n"
    );
}

#[tokio::test]
async fn greeting_rejected_is_permanent() {
    let (addr, _h) = fake_server(vec!["554 5.7.1 go away\r\n"]).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let err = SmtpClient::connect(sock, "me", ClientTimeouts::default())
        .await
        .unwrap_err();
    match &err {
        ClientError::Rejected(r) => assert_eq!((r.code, r.text.as_str()), (554, "go away")),
        e => panic!("{e:?}"),
    }
    assert!(err.is_permanent());

    let (addr, _h) = fake_server(vec!["220 hi\r\n", "421 4.3.2 busy\r\n"]).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let err = SmtpClient::connect(sock, "me", ClientTimeouts::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, ClientError::Rejected(r) if r.code == 421));
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn malformed_reply_is_protocol_error() {
    let (addr, _h) =
        fake_server(vec!["220 hi\r\n", "250-ok\r\nHTTP/1.1 400 Bad Request\r\n"]).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let err = SmtpClient::connect(sock, "me", ClientTimeouts::default())
        .await
        .unwrap_err();
    match &err {
        ClientError::Protocol(m) => assert!(m.contains("HTTP/1.1 400"), "{m}"),
        e => panic!("{e:?}"),
    }
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn greeting_timeout() {
    let (addr, _h) = fake_server(vec![]).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let t = ClientTimeouts {
        greeting: Duration::from_millis(200),
        ..ClientTimeouts::default()
    };
    let start = std::time::Instant::now();
    let err = SmtpClient::connect(sock, "me", t).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout("greeting")), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn eof_instead_of_reply_is_io_error() {
    let (addr, _h) = fake_server(vec!["220 hi\r\n"]).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let err = SmtpClient::connect(sock, "me", ClientTimeouts::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_)), "{err:?}");
}

const PY_SMTPD: &str = r#"
import sys, warnings
warnings.simplefilter("ignore")
import smtpd, asyncore
out = sys.argv[1]
class S(smtpd.SMTPServer):
    def process_message(self, peer, mailfrom, rcpttos, data, **kw):
        with open(out + ".tmp", "wb") as f:
            f.write(repr((mailfrom, rcpttos, kw.get("mail_options"))).encode() + b"\n" + data)
        import os
        os.rename(out + ".tmp", out)
        return None
s = S(("127.0.0.1", 0), None, decode_data=False)
print(s.socket.getsockname()[1], flush=True)
asyncore.loop(timeout=0.05)
"#;

#[tokio::test]
async fn client_to_python_smtpd() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("received");
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PY_SMTPD)
        .arg(&out_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("smtpd start")
    .unwrap();
    let port: u16 = line.trim().parse().expect("port");

    let sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut c = SmtpClient::connect(sock, "relay.example", ClientTimeouts::default())
        .await
        .unwrap();
    assert!(c.extensions().eight_bit_mime);
    assert!(!c.extensions().pipelining);
    let body = "Subject: t\r\n\r\n.starts with dot\r\n..two\r\n\u{fc}ber\r\nlast".as_bytes();
    let rcpts = vec!["x@y.example".to_string(), "z@y.example".to_string()];
    let out = c
        .send_sized("s@a.example", &rcpts, body, Some(body.len() as u64))
        .await
        .unwrap();
    assert_eq!(out.data.as_ref().map(|r| r.code), Some(250), "{out:?}");
    c.quit().await.unwrap();

    let mut got = None;
    for _ in 0..200 {
        if let Ok(b) = std::fs::read(&out_path) {
            got = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill().await;
    let got = got.expect("smtpd received the message");
    let (head, data) = got.split_at(got.iter().position(|&b| b == b'\n').unwrap() + 1);
    let head = String::from_utf8_lossy(head);
    assert!(
        head.starts_with(
            "('s@a.example', ['x@y.example', 'z@y.example'], ['BODY=8BITMIME', 'SIZE="
        ),
        "{head}"
    );
    // smtpd hands over the unstuffed text with LF line endings and no final
    // newline.
    assert_eq!(
        String::from_utf8_lossy(data),
        "Subject: t\n\n.starts with dot\n..two\n\u{fc}ber\nlast"
    );
}

/// An observer that is not ready the first time it is asked for each piece (and wakes its
/// task at once, as a hashing thread does when it catches up), and checks that it is
/// shown nothing it did not say it was ready for, in pieces of at most `OBSERVE_MAX`.
#[derive(Default)]
struct Hesitant {
    /// `poll_ready` said Ready, and no piece was shown since.
    ready: bool,
    /// Pending was returned for the piece to come.
    hesitated: bool,
    waits: usize,
    pieces: Vec<(sipmail::smtp::client::Framing, usize)>,
    bytes: Vec<u8>,
}

impl sipmail::smtp::client::Observe for Hesitant {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.hesitated {
            self.hesitated = true;
            self.waits += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = true;
        Poll::Ready(())
    }
    fn see(&mut self, framing: sipmail::smtp::client::Framing, bytes: &[u8]) {
        assert!(self.ready, "shown a piece before it said it was ready");
        assert!(bytes.len() <= sipmail::smtp::client::OBSERVE_MAX);
        self.ready = false;
        self.hesitated = false;
        self.pieces.push((framing, bytes.len()));
        self.bytes.extend_from_slice(bytes);
    }
}

/// What the server decodes from `wire`, sent with `framing`.
fn decoded(framing: sipmail::smtp::client::Framing, wire: &[u8]) -> Vec<u8> {
    use sipmail::smtp::client::Framing;
    match framing {
        Framing::Chunks => wire.to_vec(),
        Framing::Data => {
            let mut rx = sipmail::smtp::DataReceiver::new(u64::MAX);
            let mut out = Vec::new();
            assert_eq!(rx.feed(wire, &mut out), wire.len());
            assert!(rx.is_done(), "the observed bytes end the message");
            out
        }
    }
}

/// The client shows its observer every byte it puts on the wire (BDAT for a small
/// message, DATA for one of 1 MB, in several pieces), each piece only once the observer
/// said it was ready: an observer whose consumer is behind holds the sending task back
/// without blocking its thread (the receipt's hash of a big message, `WireHash`).
#[tokio::test(flavor = "current_thread")]
async fn the_client_waits_for_its_observer_before_each_piece() {
    use sipmail::smtp::MailOptions;
    use sipmail::smtp::client::Framing;
    let (addr, store, _dir) = start_server(test_config()).await;
    let sock = TcpStream::connect(addr).await.unwrap();
    let mut c = SmtpClient::connect(sock, "relay.example", ClientTimeouts::default())
        .await
        .unwrap();
    assert!(c.extensions().chunking && c.extensions().pipelining);
    let big = one_mb_body();
    let small = b"Subject: s\r\n\r\n.dot\r\nbare\nend".to_vec();
    for (body, framing) in [(&small, Framing::Chunks), (&big, Framing::Data)] {
        let mut o = Hesitant::default();
        let rcpts = vec!["r@b.example".to_string()];
        let out = c
            .send_tx_observed(
                "s@a.example",
                &rcpts,
                &[],
                &MailOptions::default(),
                &body[..],
                Some(&mut o),
            )
            .await
            .unwrap();
        assert_eq!(out.data.expect("a reply to the message").code, 250);
        assert!(
            o.pieces.iter().all(|(f, _)| *f == framing),
            "{:?}",
            o.pieces
        );
        assert_eq!(o.waits, o.pieces.len(), "one wait before each piece");
        if framing == Framing::Data {
            assert!(o.pieces.len() >= 4, "1 MB in pieces: {:?}", o.pieces);
        }
        let st = store.lock().unwrap();
        let (_, got) = st.messages.last().expect("the server has the message");
        assert!(
            decoded(framing, &o.bytes) == *got,
            "the observer saw other bytes than the server took"
        );
    }
    c.quit().await.unwrap();
}
