//! `sipmail send`: documents to a partner as MIME attachments (built with lettre), handed to
//! the running relay by SMTP, then a wait until the partner's signed receipt is stored
//! and verifies. Exit status 0 only with a verified receipt for every recipient.

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sipmail::config::{Config, Trust};
use sipmail::document::Document;
use sipmail::keyring::Keyring;
use sipmail::receipt::Receipt;
use sipmail::receipt::store::ReceiptStore;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// The relay's configuration file (its SMTP address, spool and keyring).
    #[arg(long, short)]
    config: PathBuf,
    /// A recipient at a partner with trust = "signed" (repeat for more).
    #[arg(long, required = true, value_name = "ADDRESS")]
    to: Vec<String>,
    /// The envelope and header sender (default: postmaster@ our domain); bounces go here.
    #[arg(long, value_name = "ADDRESS")]
    from: Option<String>,
    /// The Subject (default: "Documents: " and the file names).
    #[arg(long)]
    subject: Option<String>,
    /// How long to wait for the receipt before giving up (the message stays queued and
    /// is still delivered; check later with `sipmail receipts show QUEUE_ID`).
    #[arg(long, default_value = "10m", value_parser = sipmail::config::parse_duration)]
    wait: Duration,
    /// The files to send, each as an attachment under its own file name.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

pub fn run(args: SendArgs) -> Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    // Only a partner with trust = "signed" returns receipts: refuse before sending.
    for to in &args.to {
        let domain = to
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .with_context(|| format!("{to}: not an address (local@domain)"))?;
        match cfg.peers.iter().find(|p| p.domain == domain) {
            Some(p) if matches!(p.trust, Trust::Signed) => {}
            Some(_) => bail!(
                "{to}: {domain} is a partner without trust = \"signed\"; it returns no signed receipt, so `sipmail send` cannot confirm delivery (send it by SMTP instead)"
            ),
            None => bail!(
                "{to}: {domain} is not a [[peer]] in {}; `sipmail send` only sends to partners that return signed receipts",
                cfg.file
            ),
        }
    }
    let from = args
        .from
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", cfg.domain));
    let (message, listing) = build(&cfg, &args, &from)?;
    let size = message.len() as u64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let id = rt.block_on(submit(&cfg, &from, &args.to, message))?;
    eprintln!(
        "Queued as {id}: {} file(s), {size} bytes in all, for {}.",
        listing.len(),
        args.to.join(", ")
    );
    wait_for_receipt(&cfg, &id, &args.to, args.wait)
}

/// The message (see `sipmail::document`).
fn build(cfg: &Config, args: &SendArgs, from: &str) -> Result<(Vec<u8>, Vec<String>)> {
    let mut docs = Vec::new();
    for f in &args.files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no usable file name", f.display()))?
            .to_string();
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        docs.push(Document { name, bytes });
    }
    let id = format!("{}@{}", hex::encode(rand_bytes()?), cfg.domain);
    let msg = sipmail::document::build(from, &args.to, args.subject.as_deref(), &id, &docs)?;
    Ok((msg, docs.iter().map(sipmail::document::listing).collect()))
}

fn rand_bytes() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    Ok(b)
}

/// Hands the message to the relay's SMTP port, with a progress bar; returns its queue ID.
async fn submit(cfg: &Config, from: &str, to: &[String], message: Vec<u8>) -> Result<String> {
    let mut addr = cfg.smtp_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("connecting to the relay's SMTP port {addr}: is `sipmail run` running?")
        })?;
    let mut client = sipmail::smtp::SmtpClient::connect(
        stream,
        "sipmail-send",
        sipmail::smtp::ClientTimeouts::default(),
    )
    .await
    .with_context(|| format!("SMTP greeting from {addr}"))?;
    let bar = ProgressBar::new(message.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("sending  {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let size = message.len() as u64;
    let reader = bar.wrap_async_read(std::io::Cursor::new(message));
    let out = client
        .send_sized(from, to, tokio::io::BufReader::new(reader), Some(size))
        .await
        .context("sending the message to the relay")?;
    bar.finish_and_clear();
    let _ = client.quit().await;
    for (r, reply) in &out.per_rcpt {
        if !reply.is_positive() {
            bail!("the relay refused {r}: {}", reply.to_string().trim_end());
        }
    }
    let data = out
        .data
        .filter(|d| d.is_positive())
        .context("the relay did not accept the message")?;
    let text = data.to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "as")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no queue ID in the relay's reply: {}", text.trim_end()))
}

/// Polls the receipt store until receipts cover every recipient and verify, the message
/// leaves the queue without them (it bounced), or `wait` passes.
fn wait_for_receipt(cfg: &Config, id: &str, to: &[String], wait: Duration) -> Result<ExitCode> {
    let store = ReceiptStore::at(&cfg.spool);
    let spool = sipmail::queue::Spool::at(&cfg.spool);
    let queued = || spool.is_queued(id);
    let spin = ProgressBar::new_spinner();
    spin.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    loop {
        spin.set_message(format!(
            "waiting for the partner's signed receipt ({}s)",
            start.elapsed().as_secs()
        ));
        if let Some(rec) = store.sent(id).context("reading the receipt store")? {
            let kr = Keyring::open(&cfg.keyring)
                .with_context(|| format!("opening the keyring {}", cfg.keyring.display()))?;
            let mut covered: Vec<String> = Vec::new();
            let mut lines = Vec::new();
            for s in &rec.receipts {
                let signed = s.to_signed()?;
                let r: Receipt = sipmail::receipt::verify(
                    &kr,
                    &rec.peer,
                    &rec.fingerprint,
                    &signed.text,
                    &signed.sig,
                )
                .with_context(|| format!("the stored receipt for {id} does not verify"))?;
                covered.extend(r.rcpts.iter().cloned());
                lines.push(format!(
                    "signed receipt from mail@{} (key {}): {} bytes, sha256 {}, their queue ID {}, for {}",
                    r.receiver,
                    r.receiver_fingerprint,
                    r.message_size,
                    r.message_sha256,
                    r.queue_id,
                    r.rcpts.join(", ")
                ));
            }
            let missing: Vec<&String> = to
                .iter()
                .filter(|t| !covered.iter().any(|c| c.eq_ignore_ascii_case(t)))
                .collect();
            if missing.is_empty() {
                spin.finish_and_clear();
                for l in lines {
                    println!("{id}: {l}");
                }
                println!(
                    "Verified. Stored in {}; `sipmail receipts export {id} DIR` writes it for gpg --verify.",
                    store.root().join("sent").display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !queued() {
                spin.finish_and_clear();
                eprintln!(
                    "{id} left the queue with no receipt for {}: not delivered to them (a bounce went to the sender).",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
        } else if !queued() && store.sent(id)?.is_none() {
            spin.finish_and_clear();
            eprintln!(
                "{id} left the queue without a receipt: it was not delivered (a bounce went to the sender). See the relay's log for {id}."
            );
            return Ok(ExitCode::FAILURE);
        }
        if start.elapsed() >= wait {
            spin.finish_and_clear();
            eprintln!(
                "No receipt for {id} after {}s. The message stays queued and is retried; check with `sipmail queue -c {} show {id}` and later `sipmail receipts -c {} show {id}`.",
                wait.as_secs(),
                cfg.file,
                cfg.file
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
