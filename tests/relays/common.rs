//! Shared pieces of the integration tests: real TCP and UDP proxies that sit between the
//! two relays, record what crosses, and can tamper with it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// What a tamper function may do to the bytes of one connection, direction caller->callee.
/// Arguments: connection number (0-based), offset of `chunk` in the stream, the chunk.
pub type Tamper = Arc<dyn Fn(usize, usize, &mut [u8]) + Send + Sync>;

/// A TCP proxy: every connection to `addr()` is forwarded to the target that the relay
/// asked for (set per connection through `set_target`). Records all bytes both ways.
pub struct MediaProxy {
    pub listen: SocketAddr,
    /// Cut connection `.0` after `.1` bytes caller->callee (both directions closed).
    pub cut: Option<(usize, usize)>,
    pub target: Arc<Mutex<Option<SocketAddr>>>,
    pub recorded: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<AtomicUsize>,
}

impl MediaProxy {
    pub async fn start(tamper: Option<Tamper>) -> MediaProxy {
        Self::start_with(tamper, None).await
    }

    /// Like `start`, and connection `cut.0` is cut after `cut.1` bytes from the caller,
    /// without the authenticated close: a truncation attack.
    pub async fn start_with(tamper: Option<Tamper>, cut: Option<(usize, usize)>) -> MediaProxy {
        Self::start_full(tamper, cut, None).await
    }

    /// Like `start`, and on connection `mute.0`, once `mute.1` bytes have gone from the
    /// caller, nothing more from the callee gets through, and both sides are closed a
    /// second later: the callee's reply to the end of the data is lost.
    pub async fn start_muting(mute: (usize, usize)) -> MediaProxy {
        Self::start_full(None, None, Some(mute)).await
    }

    async fn start_full(
        tamper: Option<Tamper>,
        cut: Option<(usize, usize)>,
        mute: Option<(usize, usize)>,
    ) -> MediaProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = l.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let recorded: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (t, r, c) = (target.clone(), recorded.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let Some(dest) = *t.lock().unwrap() else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(dest).await else {
                    continue;
                };
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = outbound.into_split();
                let rec1 = r.clone();
                let tamper = tamper.clone();
                let stop = Arc::new(tokio::sync::Notify::new());
                let stop2 = stop.clone();
                let muted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let muted2 = muted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut off = 0usize;
                    loop {
                        let k = match ir.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => k,
                        };
                        if let Some(f) = &tamper {
                            f(n, off, &mut buf[..k]);
                        }
                        let mut k = k;
                        let cutting = matches!(cut, Some((c, at)) if c == n && off + k >= at);
                        if let Some((_, at)) = cut.filter(|_| cutting) {
                            k = at.saturating_sub(off);
                        }
                        off += k;
                        if matches!(mute, Some((c, at)) if c == n && off >= at)
                            && !muted.swap(true, Ordering::SeqCst)
                        {
                            let stop = stop.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                stop.notify_one();
                            });
                        }
                        rec1.lock().unwrap().extend_from_slice(&buf[..k]);
                        if ow.write_all(&buf[..k]).await.is_err() || cutting {
                            break;
                        }
                    }
                    // A cut closes both sides at once, as a broken connection would.
                    drop(ow);
                    stop.notify_one();
                });
                let rec2 = r.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let k = tokio::select! {
                            r = or.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(k) => k,
                            },
                            _ = stop2.notified() => break,
                        };
                        if muted2.load(Ordering::SeqCst) {
                            continue;
                        }
                        rec2.lock().unwrap().extend_from_slice(&buf[..k]);
                        if iw.write_all(&buf[..k]).await.is_err() {
                            break;
                        }
                    }
                    let _ = iw.shutdown().await;
                });
            }
        });
        MediaProxy {
            listen,
            cut,
            target,
            recorded,
            connections,
        }
    }

    /// The hook for relay A: remember the real media address, connect to the proxy.
    pub fn hook(&self) -> sipmail::relay::Hooks {
        let target = self.target.clone();
        let listen = self.listen;
        sipmail::relay::Hooks {
            media_connect: Some(Arc::new(move |real| {
                *target.lock().unwrap() = Some(real);
                listen
            })),
            ..Default::default()
        }
    }
}

/// What a SIP tamper function may do: (datagram number in that direction, is it from A, bytes).
pub type SipTamper = Arc<dyn Fn(usize, bool, &mut Vec<u8>) + Send + Sync>;

/// A UDP proxy for SIP between A (which is configured to call the proxy) and B.
pub struct SipProxy {
    pub listen: SocketAddr,
}

impl SipProxy {
    pub async fn start(b: SocketAddr, tamper: SipTamper) -> SipProxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let listen = front.local_addr().unwrap();
        let a_addr: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (f, bk, aa, t) = (front.clone(), back.clone(), a_addr.clone(), tamper.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut n = 0;
            while let Ok((k, from)) = f.recv_from(&mut buf).await {
                *aa.lock().unwrap() = Some(from);
                let mut d = buf[..k].to_vec();
                t(n, true, &mut d);
                n += 1;
                let _ = bk.send_to(&d, b).await;
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut n = 0;
            while let Ok((k, _)) = back.recv_from(&mut buf).await {
                let mut d = buf[..k].to_vec();
                tamper(n, false, &mut d);
                n += 1;
                let to = *a_addr.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&d, to).await;
                }
            }
        });
        SipProxy { listen }
    }
}

/// Flip one bit inside the base64 value of `attr` (e.g. "sipmail-signature:") if present.
pub fn flip_in_attr(d: &mut [u8], attr: &str, index: usize) -> bool {
    let Some(pos) = d.windows(attr.len()).position(|w| w == attr.as_bytes()) else {
        return false;
    };
    let i = pos + attr.len() + index;
    // Swap one base64 character for another valid one, so the SDP still parses.
    d[i] = if d[i] == b'A' { b'B' } else { b'A' };
    true
}

/// A `sipmail` process a test started: killed (by its PID) and reaped when dropped, also
/// when the test fails.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Show the relays' logs in a failing test's output (RUST_LOG overrides the level).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// Wait up to `secs` for an event that matches.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<sipmail::relay::RelayEvent>,
    secs: u64,
    f: impl Fn(&sipmail::relay::RelayEvent) -> bool,
) -> Option<sipmail::relay::RelayEvent> {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
            && f(&e)
        {
            return Some(e);
        }
    }
    None
}

/// The next call outcome (failed or established), within `secs` seconds.
pub async fn wait_call_outcome(
    rx: &mut tokio::sync::broadcast::Receiver<sipmail::relay::RelayEvent>,
    secs: u64,
) -> Option<sipmail::relay::RelayEvent> {
    use sipmail::relay::RelayEvent;
    wait_event(rx, secs, |e| {
        matches!(
            e,
            RelayEvent::CallFailed { .. } | RelayEvent::CallEstablished { .. }
        )
    })
    .await
}

/// Fresh keys and the two test-bed configs, each passed through an edit of its TOML text.
pub fn edited_configs(
    dir: &std::path::Path,
    edit_a: impl Fn(String) -> String,
    edit_b: impl Fn(String) -> String,
) -> (sipmail::config::Config, sipmail::config::Config) {
    configs_calling(dir, edit_a, edit_b, None)
}

/// As `edited_configs`, with A calling site-b at `a_calls_b_at` (a proxy) if given.
fn configs_calling(
    dir: &std::path::Path,
    edit_a: impl Fn(String) -> String,
    edit_b: impl Fn(String) -> String,
    a_calls_b_at: Option<(u16, u16)>,
) -> (sipmail::config::Config, sipmail::config::Config) {
    use sipmail::demo::{free_port, make_keys, site_config};
    make_keys(dir).unwrap();
    let pa = free_port().unwrap();
    let (pb, a_calls) = a_calls_b_at.unwrap_or_else(|| {
        let pb = free_port().unwrap();
        (pb, pb)
    });
    let a = edit_a(site_config(dir, "site-a", "site-b", pa, a_calls));
    let b = edit_b(site_config(dir, "site-b", "site-a", pb, pa));
    (
        sipmail::config::Config::parse("a.toml", &a).unwrap(),
        sipmail::config::Config::parse("b.toml", &b).unwrap(),
    )
}

/// The two sites with a tampering SIP proxy in front of B: A calls the proxy.
pub async fn sites_via_sip_proxy(
    dir: &std::path::Path,
    tamper: SipTamper,
) -> sipmail::demo::TwoSites {
    let pb = sipmail::demo::free_port().unwrap();
    let proxy = SipProxy::start(format!("127.0.0.1:{pb}").parse().unwrap(), tamper).await;
    let (a, b) = configs_calling(dir, |s| s, |s| s, Some((pb, proxy.listen.port())));
    sipmail::demo::TwoSites::start_with(dir, a, b, sipmail::relay::Hooks::default())
        .await
        .unwrap()
}

/// Runs the `sipmail` binary built for the tests, stdin closed, and waits for it.
pub fn sipmail_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sipmail"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A throw-away GnuPG home; its agent is stopped on drop.
pub struct Gpg(tempfile::TempDir);

impl Gpg {
    pub fn new() -> Gpg {
        let v = std::process::Command::new("gpg").arg("--version").output();
        assert!(
            v.is_ok_and(|o| o.status.success()),
            "gpg not found: apt-get install gnupg"
        );
        let home = tempfile::Builder::new().prefix("gpgh").tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Gpg(home)
    }
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        let mut c = std::process::Command::new("gpg");
        c.env("GNUPGHOME", self.0.path())
            .args(["--batch", "--no-tty", "--status-fd", "1"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut i = child.stdin.take().unwrap();
            if let Some(d) = stdin {
                i.write_all(d).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }
    /// `gpg --verify DIR/NAME.sig DIR/NAME.data`.
    pub fn verify(&self, dir: &std::path::Path, name: &str) -> std::process::Output {
        self.verify_files(
            &dir.join(format!("{name}.sig")),
            &dir.join(format!("{name}.data")),
        )
    }
    /// What an auditor does with `sipmail receipts export ID DIR`: import DIR/partner.asc,
    /// then `gpg --verify DIR/receipt-1.sig DIR/receipt-1.txt`, which must say GOODSIG.
    /// Returns gpg's status lines.
    pub fn verify_exported_receipt(&self, dir: &std::path::Path) -> String {
        let cert = std::fs::read(dir.join("partner.asc")).unwrap();
        assert!(self.run(&["--import"], Some(&cert)).status.success());
        let o = self.verify_files(&dir.join("receipt-1.sig"), &dir.join("receipt-1.txt"));
        let status = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success() && status.contains("[GNUPG:] GOODSIG"),
            "gpg: {status}"
        );
        status
    }
    pub fn verify_files(
        &self,
        sig: &std::path::Path,
        data: &std::path::Path,
    ) -> std::process::Output {
        self.run(
            &["--verify", sig.to_str().unwrap(), data.to_str().unwrap()],
            None,
        )
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("gpgconf")
            .env("GNUPGHOME", self.0.path())
            .args(["--kill", "gpg-agent"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
