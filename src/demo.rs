//! `sipmail demo`, and the two-site test bed that the integration tests share with it.
//! Cargo feature `demo`: off in the shipped build, on for the tests (see README, Test).

use crate::config::{Config, Delivery};
use crate::keyring::Keyring;
use crate::relay::{self, Hooks, RelayEvent, Running, Shutdown};
use crate::smtp::{ClientTimeouts, SmtpClient};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Keyring(#[from] crate::keyring::KeyringError),
    #[error("{0}")]
    Relay(#[from] relay::RelayError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SMTP into site A: {0}")]
    Smtp(#[from] crate::smtp::ClientError),
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        what: what.to_string(),
        source,
    }
}

/// A port that is free for both TCP and UDP on 127.0.0.1 right now.
///
/// Chosen at random below the kernel's ephemeral range (32768 and up by default), so that
/// the outgoing connections of whatever else runs meanwhile cannot take it between this
/// check and the relay's bind.
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..200 {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).map_err(std::io::Error::other)?;
        let port = 20000 + u16::from_be_bytes(r) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port for TCP+UDP",
    ))
}

/// Keys for two sites that know each other, under `dir`.
pub fn make_keys(dir: &Path) -> Result<(PathBuf, PathBuf), DemoError> {
    let ka = dir.join("keyring/site-a");
    let kb = dir.join("keyring/site-b");
    Keyring::generate(&ka, "site-a.test")?;
    Keyring::generate(&kb, "site-b.test")?;
    let a_pub = Keyring::open(&ka)?.export_public()?;
    let b_pub = Keyring::open(&kb)?.export_public()?;
    Keyring::import(&kb, a_pub.as_bytes())?;
    Keyring::import(&ka, b_pub.as_bytes())?;
    Ok((ka, kb))
}

/// The config text of one site of the test bed.
pub fn site_config(
    dir: &Path,
    me: &str,
    other: &str,
    sip_port: u16,
    other_sip_port: u16,
) -> String {
    format!(
        r#"[relay]
domain = "{me}.test"
keyring = "{kr}"
spool = "{sp}"
[smtp]
listen = "127.0.0.1:0"
allow = ["127.0.0.0/8"]
[sip]
listen = "127.0.0.1:{sip_port}"
media = "127.0.0.1"
call_idle = "2s"
[[peer]]
domain = "{other}.test"
sip = "sip:mail@127.0.0.1:{other_sip_port}"
[delivery]
maildir = "{md}"
[queue]
retry_initial = "1s"
retry_max = "5s"
spare_files = 16
"#,
        kr = dir.join(format!("keyring/{me}")).display(),
        sp = dir.join(format!("var/{me}/spool")).display(),
        md = dir.join(format!("var/{me}/maildir")).display(),
    )
}

/// Two relays, site-a.test and site-b.test, on loopback, running in this process.
pub struct TwoSites {
    pub dir: PathBuf,
    pub a: Running,
    pub b: Running,
    pub a_cfg: Config,
    pub b_cfg: Config,
    pub shutdown_a: Shutdown,
    pub shutdown_b: Shutdown,
}

impl TwoSites {
    /// Fresh keys and configs in `dir`, then start both.
    pub async fn start(dir: &Path, hooks_a: Hooks) -> Result<TwoSites, DemoError> {
        make_keys(dir)?;
        let (pa, pb) = (
            free_port().map_err(io("port"))?,
            free_port().map_err(io("port"))?,
        );
        let a_cfg = Config::parse(
            "site-a (demo)",
            &site_config(dir, "site-a", "site-b", pa, pb),
        )?;
        let b_cfg = Config::parse(
            "site-b (demo)",
            &site_config(dir, "site-b", "site-a", pb, pa),
        )?;
        Self::start_with(dir, a_cfg, b_cfg, hooks_a).await
    }

    pub async fn start_with(
        dir: &Path,
        a_cfg: Config,
        b_cfg: Config,
        hooks_a: Hooks,
    ) -> Result<TwoSites, DemoError> {
        Self::start_with_hooks(dir, a_cfg, b_cfg, hooks_a, Hooks::default()).await
    }

    /// As [`TwoSites::start_with`], with test hooks for B too.
    pub async fn start_with_hooks(
        dir: &Path,
        a_cfg: Config,
        b_cfg: Config,
        hooks_a: Hooks,
        hooks_b: Hooks,
    ) -> Result<TwoSites, DemoError> {
        let shutdown_a = Shutdown::new();
        let shutdown_b = Shutdown::new();
        let b = relay::start(b_cfg.clone(), shutdown_b.clone(), hooks_b).await?;
        let a = relay::start(a_cfg.clone(), shutdown_a.clone(), hooks_a).await?;
        Ok(TwoSites {
            dir: dir.to_path_buf(),
            a,
            b,
            a_cfg,
            b_cfg,
            shutdown_a,
            shutdown_b,
        })
    }

    pub fn maildir(&self, cfg: &Config) -> PathBuf {
        match &cfg.delivery {
            Delivery::Maildir(m) => m.clone(),
            Delivery::Smtp(_) => self.dir.join("no-maildir"),
        }
    }

    /// Stop both relays cleanly.
    pub async fn stop(self) {
        self.shutdown_a.trigger();
        self.shutdown_b.trigger();
        self.a.wait().await;
        self.b.wait().await;
    }
}

/// Files in a Maildir's new/.
pub fn maildir_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("new"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A test message with a unique Message-ID, 8-bit text and a line that needs dot-stuffing.
pub fn sample_message(i: usize, run: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@site-a.test>\r\nTo: Bob <bob@site-b.test>\r\nSubject: sipmail demo message {i}\r\n\
         Message-ID: <demo-{run}-{i}@site-a.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nHello Bob, this is message {i}.\r\n\
         Grüße aus Zürich — the body never crosses between the relays in clear.\r\n\
         .a line that starts with a dot\r\n\r\nAlice\r\n"
    )
    .into_bytes()
}

/// Submit messages to a relay by SMTP, one session.
pub async fn submit(
    smtp: SocketAddr,
    msgs: &[Vec<u8>],
    rcpt: &str,
    mut progress: impl FnMut(usize),
) -> Result<(), DemoError> {
    let tcp = tokio::net::TcpStream::connect(smtp)
        .await
        .map_err(io("connecting to site A"))?;
    tcp.set_nodelay(true).map_err(io("socket"))?;
    let mut c = SmtpClient::connect(tcp, "demo.site-a.test", ClientTimeouts::default()).await?;
    for (i, m) in msgs.iter().enumerate() {
        let o = c
            .send("alice@site-a.test", &[rcpt.to_string()], &m[..])
            .await?;
        if o.delivered().is_empty() {
            return Err(DemoError::Io {
                what: format!("message {i}"),
                source: std::io::Error::other(format!(
                    "site A refused it: {:?}",
                    o.data.or(Some(o.mail))
                )),
            });
        }
        progress(i + 1);
    }
    let _ = c.quit().await;
    Ok(())
}

/// Does the delivered file hold exactly `original` after the trace headers we add?
pub fn delivered_intact(file: &[u8], original: &[u8]) -> bool {
    file.ends_with(original) && {
        let prefix = &file[..file.len() - original.len()];
        // Only Return-Path, Delivered-To, Received and the authenticated-peer field of
        // mail that came through a call (with folded lines) may precede it.
        let text = String::from_utf8_lossy(prefix);
        text.split("\r\n").filter(|l| !l.is_empty()).all(|l| {
            l.starts_with("Return-Path: ")
                || l.starts_with("Delivered-To: ")
                || l.starts_with("Received: ")
                || l.starts_with("X-Sipmail-Authenticated-Peer: ")
                || l.starts_with('\t')
        })
    }
}

/// The demo. Returns whether every message arrived intact.
pub async fn run(messages: usize, cleanup: bool) -> Result<bool, DemoError> {
    let tmp = tempfile::Builder::new()
        .prefix("sipmail-demo-")
        .tempdir()
        .map_err(io("temporary folder"))?;
    let dir = tmp.path().to_path_buf();
    let mut out = std::io::stdout();
    println!(
        "sipmail demo: two relays on loopback, fresh keys in {}",
        dir.display()
    );
    let sites = TwoSites::start(&dir, Hooks::default()).await?;
    println!(
        "  site-a.test: SMTP {}  SIP {}\n  site-b.test: SMTP {}  SIP {}",
        sites.a.smtp_addr, sites.a.sip_addr, sites.b.smtp_addr, sites.b.sip_addr
    );
    let mut events = sites.a.events();
    let run_id = crate::sip::random_hex(4);
    let msgs: Vec<Vec<u8>> = (0..messages).map(|i| sample_message(i, &run_id)).collect();
    let maildir = sites.maildir(&sites.b_cfg);
    let start = Instant::now();
    submit(sites.a.smtp_addr, &msgs, "bob@site-b.test", |n| {
        print!("\r  submitted to site A: {n}/{messages}");
        let _ = out.flush();
    })
    .await?;
    println!();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut arrived = 0;
    while Instant::now() < deadline {
        arrived = maildir_files(&maildir).len();
        print!("\r  arrived in site B's Maildir: {arrived}/{messages}");
        let _ = out.flush();
        if arrived >= messages {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    println!();
    let mut call = None;
    let mut failures = Vec::new();
    while let Ok(e) = events.try_recv() {
        match e {
            RelayEvent::CallEstablished { .. } if call.is_none() => call = Some(e),
            RelayEvent::CallFailed { reason, .. } => failures.push(reason),
            _ => {}
        }
    }
    // Check every message byte for byte.
    let files: Vec<Vec<u8>> = maildir_files(&maildir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    let intact = msgs
        .iter()
        .filter(|m| files.iter().any(|f| delivered_intact(f, m)))
        .count();
    println!();
    if let Some(RelayEvent::CallEstablished {
        call_id,
        local_fingerprint,
        peer_fingerprint,
        suite,
        sas,
        ..
    }) = &call
    {
        println!("  call:          {call_id}");
        println!(
            "  site A key:    {}",
            crate::keyring::format_fingerprint(local_fingerprint)
        );
        println!(
            "  site B key:    {}",
            crate::keyring::format_fingerprint(peer_fingerprint)
        );
        println!("  suite:         {suite}");
        println!("  SAS:           {sas}   (both relays log the same SAS)");
    } else {
        println!("  no call was established");
    }
    for f in &failures {
        println!("  call failure:  {f}");
    }
    println!(
        "  delivered:     {intact}/{messages} intact in {:.3} s = {:.1} messages/s",
        elapsed.as_secs_f64(),
        intact as f64 / elapsed.as_secs_f64()
    );
    println!("  Maildir:       {}", maildir.display());
    sites.stop().await;
    let ok = intact == messages && arrived == messages;
    if cleanup {
        drop(tmp);
    } else {
        let kept = tmp.keep();
        println!("  (kept; remove with: rm -rf {})", kept.display());
    }
    println!(
        "{}",
        if ok {
            "demo: OK"
        } else {
            "demo: FAILED: not every message arrived intact"
        }
    );
    Ok(ok)
}
