//! The tokio driver over real loopback TCP (and an in-memory duplex), with
//! Python's smtplib as an independent client.

#[path = "smtp_common/mod.rs"]
mod common;

use std::time::Duration;

use common::{FileBackend, Shared, start_server, test_config, wait_for};
use sipmail::smtp::{CloseReason, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn python(script: &str, args: &[String]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python timed out")
    .expect("python3 runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SMTPLIB_SEND: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
body = ("Subject: =?utf-8?q?test?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "h\u00e9llo w\u00f6rld \u2713 \U0001F600\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n").encode("utf-8")
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
code, msg = s.ehlo("pyclient.example")
assert code == 250, (code, msg)
for ext in ("pipelining", "8bitmime", "enhancedstatuscodes", "size"):
    assert s.has_extn(ext), ext
print("SIZE", s.esmtp_features["size"])
refused = s.sendmail("alice@a.example", ["bob@b.example", "eve@denied.example", "carol@c.example"],
                     body, mail_options=["BODY=8BITMIME", "SIZE=%d" % len(body)])
print("REFUSED", sorted(refused.items()))
print("NOOP", s.noop())
s.quit()
"#;

#[tokio::test]
async fn python_smtplib_client_delivers_exact_bytes() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let (ok, stdout, stderr) = python(SMTPLIB_SEND, &[addr.port().to_string()]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("SIZE 4194304"), "{stdout}");
    assert!(
        stdout.contains("REFUSED [('eve@denied.example', (550, b'5.7.1 relay denied'))]"),
        "{stdout}"
    );
    assert!(stdout.contains("NOOP (250, b'2.0.0 Ok')"), "{stdout}");
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.messages.len(), 1);
    let (env, bytes) = &st.messages[0];
    let expected = "Subject: =?utf-8?q?test?=\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n\
h\u{e9}llo w\u{f6}rld \u{2713} \u{1F600}\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";
    assert_eq!(String::from_utf8_lossy(bytes), expected);
    assert_eq!(bytes.as_slice(), expected.as_bytes());
    assert_eq!(env.helo, "pyclient.example");
    assert_eq!(env.mail_from, "alice@a.example");
    assert_eq!(env.rcpt_to, vec!["bob@b.example", "carol@c.example"]);
    assert!(env.body_8bit);
    assert_eq!(env.declared_size, Some(expected.len() as u64));
    let sum = &st.summaries[0];
    assert_eq!(sum.close_reason, CloseReason::Quit);
    assert_eq!(sum.messages_accepted, 1);
    assert_eq!(sum.helo.as_deref(), Some("pyclient.example"));
    assert_eq!(sum.peer, "127.0.0.1");
}

const SMTPLIB_BARE_LF: &str = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.ehlo("py")
try:
    s.sendmail("a@a.example", ["b@b.example"], b"Subject: x\n\nbare lf\n.\nMAIL FROM:<x@y>\n")
    print("ACCEPTED")
except smtplib.SMTPDataError as e:
    print("DATAERROR", e.smtp_code, e.smtp_error)
s.sendmail("a@a.example", ["b@b.example"], b"Subject: y\r\n\r\nfine\r\n")
s.quit()
"#;

#[tokio::test]
async fn python_smtplib_bare_lf_is_rejected() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let (ok, stdout, stderr) = python(SMTPLIB_BARE_LF, &[addr.port().to_string()]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("DATAERROR 550 b'5.6.11 message rejected: bare LF/CR in DATA'"),
        "{stdout}"
    );
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.aborted, 1);
    assert_eq!(st.messages.len(), 1);
    assert_eq!(st.messages[0].1, b"Subject: y\r\n\r\nfine\r\n");
}

/// Reads from `sock` until `buf` ends with `suffix` (or panics after 10 s).
async fn read_until(sock: &mut TcpStream, buf: &mut Vec<u8>, suffix: &[u8]) {
    let fut = async {
        while !buf.ends_with(suffix) {
            let mut tmp = [0u8; 4096];
            let n = sock.read(&mut tmp).await.unwrap();
            assert!(n > 0, "EOF; got {:?}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&tmp[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timeout; got {:?}", String::from_utf8_lossy(buf)));
}

#[tokio::test]
async fn pipelined_batch_over_tcp_exact_bytes() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut sock, &mut got, b"\r\n").await;
    assert_eq!(got, b"220 mx.test ESMTP sipmail\r\n");
    got.clear();
    sock.write_all(
        b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<z@denied.example>\r\nDATA\r\n",
    )
    .await
    .unwrap();
    read_until(&mut sock, &mut got, b"<CR><LF>.<CR><LF>\r\n").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 4194304\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.7.1 relay denied\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    got.clear();
    sock.write_all(b"hello\r\n..x\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    read_until(&mut sock, &mut got, b"closing connection\r\n").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 mx.test closing connection\r\n"
    );
    let mut rest = Vec::new();
    let n = sock.read_to_end(&mut rest).await.unwrap();
    assert_eq!(n, 0, "server closes after QUIT");
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    assert_eq!(store.lock().unwrap().messages[0].1, b"hello\r\n.x\r\n");
}

#[tokio::test]
async fn idle_timeout_sends_421_and_closes() {
    let mut cfg = test_config();
    cfg.command_timeout = Duration::from_millis(200);
    let (addr, store, _dir) = start_server(cfg).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut sock, &mut got, b"sipmail\r\n").await;
    got.clear();
    read_until(&mut sock, &mut got, b"\r\n").await;
    assert_eq!(got, b"421 4.4.2 mx.test error: timeout exceeded\r\n");
    let mut rest = Vec::new();
    assert_eq!(sock.read_to_end(&mut rest).await.unwrap(), 0);
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    assert_eq!(
        store.lock().unwrap().summaries[0].close_reason,
        CloseReason::Timeout
    );
}

#[tokio::test]
async fn data_timeout_aborts_spool() {
    let mut cfg = test_config();
    cfg.data_timeout = Duration::from_millis(200);
    let (addr, store, _dir) = start_server(cfg).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    sock.write_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        .await
        .unwrap();
    read_until(&mut sock, &mut got, b"<CR><LF>.<CR><LF>\r\n").await;
    sock.write_all(b"partial message\r\n").await.unwrap();
    got.clear();
    read_until(&mut sock, &mut got, b"\r\n").await;
    assert_eq!(got, b"421 4.4.2 mx.test error: timeout exceeded\r\n");
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.aborted, 1);
    assert!(st.messages.is_empty());
}

#[tokio::test]
async fn client_eof_mid_data_aborts_spool() {
    let (addr, store, _dir) = start_server(test_config()).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    sock.write_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        .await
        .unwrap();
    read_until(&mut sock, &mut got, b"<CR><LF>.<CR><LF>\r\n").await;
    sock.write_all(b"partial\r\n").await.unwrap();
    drop(sock);
    wait_for(&store, |s| !s.summaries.is_empty()).await;
    let st = store.lock().unwrap();
    assert_eq!(st.aborted, 1);
    assert_eq!(st.summaries[0].close_reason, CloseReason::ClientEof);
}

/// `serve` over a non-socket stream, spawned (so its future is Send).
#[tokio::test]
async fn serve_over_duplex_stream() {
    let (client, server) = tokio::io::duplex(1024);
    let dir = tempfile::tempdir().unwrap();
    let store: Shared = Default::default();
    let mut backend = FileBackend::new(dir.path().to_path_buf(), store.clone());
    let cfg = test_config();
    let task =
        tokio::spawn(async move { serve(server, "tunnel:peer-a", &cfg, &mut backend).await });
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut big = b"EHLO t\r\nMAIL FROM:<>\r\nRCPT TO:<b@y>\r\nDATA\r\n".to_vec();
    let mut expected = Vec::new();
    for i in 0..20000 {
        let line = format!(".{i} line of the body\r\n");
        big.push(b'.');
        big.extend_from_slice(line.as_bytes());
        expected.extend_from_slice(line.as_bytes());
    }
    big.extend_from_slice(b".\r\nQUIT\r\n");
    // Write everything while reading concurrently (the duplex buffer is
    // small, so this also exercises backpressure).
    let writer = tokio::spawn(async move {
        wr.write_all(&big).await.unwrap();
        wr
    });
    let mut out = Vec::new();
    rd.read_to_end(&mut out).await.unwrap();
    let _wr = writer.await.unwrap();
    let summary = task.await.unwrap().unwrap();
    assert_eq!(summary.close_reason, CloseReason::Quit);
    assert_eq!(summary.peer, "tunnel:peer-a");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.ends_with("250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 mx.test closing connection\r\n"),
        "{out}"
    );
    let st = store.lock().unwrap();
    assert_eq!(st.messages[0].1, expected);
    assert_eq!(st.messages[0].0.mail_from, "");
}
