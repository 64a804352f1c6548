//! `sipmail receipts`: the signed receipts partners returned for the mail we sent, as the
//! relay stored them (<spool>/receipts/sent/): the `accepted` receipt of each message and
//! the `delivered` ones fetched later; listed, shown, verified again against the keyring,
//! and exported for `gpg --verify`.

use anyhow::{Context, Result, bail};
use sipmail::config::Config;
use sipmail::keyring::Keyring;
use sipmail::receipt::Receipt;
use sipmail::receipt::store::{ReceiptStore, SentRecord};
use std::path::Path;
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum ReceiptsCmd {
    /// One line per message sent with a receipt: our queue ID, the partner, when the
    /// partner committed it, the recipients covered, how many of them have a delivered
    /// receipt yet, and the SHA-256 of the message.
    List,
    /// The receipts of one message (our queue ID), as signed.
    Show { id: String },
    /// Verify the receipts of one message (or of every message with --all) again: each
    /// signature against the partner's certificate in the keyring, and what it names
    /// against the stored record. Exit status 0 only if every one verifies.
    Verify {
        /// Our queue ID.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every stored receipt.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Write one message's receipts into DIR as receipt-N.txt (the signed text) and
    /// receipt-N.sig (the detached OpenPGP signature), its delivered receipts as
    /// delivered-N.txt/.sig, with the partner's certificate(s) as partner.asc:
    /// `gpg --import DIR/partner.asc; gpg --verify DIR/receipt-1.sig DIR/receipt-1.txt`
    /// checks it without sipmail.
    Export {
        id: String,
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

pub fn run(cfg: &Config, cmd: ReceiptsCmd) -> Result<ExitCode> {
    let store = ReceiptStore::at(&cfg.spool);
    match cmd {
        ReceiptsCmd::List => {
            let all = store.list_sent().context("reading the receipt store")?;
            if all.is_empty() {
                println!(
                    "No receipts stored in {} (receipts come back only from partners with trust = \"signed\").",
                    store.root().display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<24} {:<20} {:<6} {:<9} sha256",
                "queue id", "partner", "committed (UTC)", "rcpts", "delivered"
            );
            for rec in &all {
                let handed: Vec<String> = rec
                    .delivered
                    .iter()
                    .filter_map(|s| Receipt::parse(s.text.as_bytes()).ok())
                    .flat_map(|d| d.handoffs.into_iter().map(|h| h.rcpt))
                    .collect();
                for r in rec.accepted() {
                    let n = r.rcpts.iter().filter(|a| handed.contains(a)).count();
                    println!(
                        "{:<24} {:<24} {:<20} {:<6} {:<9} {}",
                        rec.queue_id,
                        rec.peer,
                        when(r.committed_unix_ms),
                        r.rcpts.len(),
                        n,
                        r.message_sha256
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ReceiptsCmd::Show { id } => {
            let rec = load(&store, &id)?;
            println!("# partner {} key {}", rec.peer, rec.fingerprint);
            for (i, s) in rec.receipts.iter().enumerate() {
                println!(
                    "# receipt {} (signature: {} bytes base64)",
                    i + 1,
                    s.sig.len()
                );
                print!("{}", s.text);
            }
            for (i, s) in rec.delivered.iter().enumerate() {
                println!(
                    "# delivered receipt {} (signature: {} bytes base64)",
                    i + 1,
                    s.sig.len()
                );
                print!("{}", s.text);
            }
            Ok(ExitCode::SUCCESS)
        }
        ReceiptsCmd::Verify { id, all } => {
            let kr = Keyring::open(&cfg.keyring)
                .with_context(|| format!("opening the keyring {}", cfg.keyring.display()))?;
            let recs = if all {
                store.list_sent().context("reading the receipt store")?
            } else {
                vec![load(&store, id.as_deref().unwrap_or_default())?]
            };
            let mut bad = 0;
            let mut n = 0;
            for rec in &recs {
                for s in &rec.delivered {
                    n += 1;
                    match verify_delivered(&kr, rec, s) {
                        Ok(r) => {
                            for h in &r.handoffs {
                                println!(
                                    "{}: good delivered receipt from mail@{} (key {}): <{}> handed on {} to {}",
                                    rec.queue_id,
                                    r.receiver,
                                    r.receiver_fingerprint,
                                    h.rcpt,
                                    when(h.at_unix_ms),
                                    h.to
                                );
                            }
                        }
                        Err(e) => {
                            bad += 1;
                            println!("{}: BAD delivered receipt: {e:#}", rec.queue_id);
                        }
                    }
                }
                for s in &rec.receipts {
                    n += 1;
                    match verify_one(&kr, rec, s) {
                        Ok(r) => println!(
                            "{}: good receipt from mail@{} (key {}): {} bytes sha256 {} for {}, their queue ID {}, committed {}",
                            rec.queue_id,
                            r.receiver,
                            r.receiver_fingerprint,
                            r.message_size,
                            r.message_sha256,
                            r.rcpts.join(", "),
                            r.queue_id,
                            when(r.committed_unix_ms)
                        ),
                        Err(e) => {
                            bad += 1;
                            println!("{}: BAD receipt: {e:#}", rec.queue_id);
                        }
                    }
                }
            }
            println!("{n} receipt(s), {bad} bad");
            Ok(if bad == 0 && n > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ReceiptsCmd::Export { id, dir } => {
            let rec = load(&store, &id)?;
            let kr = Keyring::open(&cfg.keyring)
                .with_context(|| format!("opening the keyring {}", cfg.keyring.display()))?;
            export(&kr, &rec, &dir)?;
            println!(
                "Wrote {} receipt(s) and {} delivered receipt(s) to {}. Check with GnuPG:\n  gpg --import {d}/partner.asc\n  gpg --verify {d}/receipt-1.sig {d}/receipt-1.txt",
                rec.receipts.len(),
                rec.delivered.len(),
                dir.display(),
                d = dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(store: &ReceiptStore, id: &str) -> Result<SentRecord> {
    match store.sent(id) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => bail!(
            "no receipt stored for queue ID {id} in {} (see `sipmail receipts list`)",
            store.root().display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading the receipt of {id}")),
    }
}

/// Verifies a stored receipt with the partner's certificate it names (the fingerprint of
/// the record for an accepted one; a delivered one may come after a key rotation), which
/// must be in the keyring for the partner's domain.
fn verify_one(
    kr: &Keyring,
    rec: &SentRecord,
    s: &sipmail::receipt::store::StoredReceipt,
) -> Result<Receipt> {
    let signed = s
        .to_signed()
        .context("the stored signature is not base64")?;
    let named = Receipt::parse(&signed.text)?;
    let fpr = match named.kind {
        sipmail::receipt::Kind::Accepted => rec.fingerprint.as_str(),
        sipmail::receipt::Kind::Delivered => named.receiver_fingerprint.as_str(),
    };
    let r = sipmail::receipt::verify(kr, &rec.peer, fpr, &signed.text, &signed.sig)?;
    if r.sender_queue_id != rec.queue_id {
        bail!(
            "it names our queue ID {}, it is stored for {}",
            r.sender_queue_id,
            rec.queue_id
        );
    }
    Ok(r)
}

/// A stored delivered receipt: verified, and checked against the record's accepted ones.
fn verify_delivered(
    kr: &Keyring,
    rec: &SentRecord,
    s: &sipmail::receipt::store::StoredReceipt,
) -> Result<Receipt> {
    let r = verify_one(kr, rec, s)?;
    sipmail::receipt::check_delivered(&r, &rec.accepted())?;
    Ok(r)
}

fn export(kr: &Keyring, rec: &SentRecord, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut fprs = vec![rec.fingerprint.clone()];
    for (prefix, list) in [("receipt", &rec.receipts), ("delivered", &rec.delivered)] {
        for (i, s) in list.iter().enumerate() {
            let signed = s
                .to_signed()
                .context("the stored signature is not base64")?;
            if let Ok(r) = Receipt::parse(&signed.text)
                && !fprs.contains(&r.receiver_fingerprint)
            {
                fprs.push(r.receiver_fingerprint);
            }
            let base = dir.join(format!("{prefix}-{}", i + 1));
            std::fs::write(base.with_extension("txt"), &signed.text)?;
            std::fs::write(base.with_extension("sig"), &signed.sig)?;
        }
    }
    // Every certificate the receipts name (a delivered receipt may come after the
    // partner rotated its key), armored one after the other: gpg imports them all.
    let mut certs = Vec::new();
    for f in &fprs {
        let cert = kr.export_peer_cert(&rec.peer, f).with_context(|| {
            format!("the certificate {f} of {} is not in the keyring", rec.peer)
        })?;
        certs.extend_from_slice(cert.as_bytes());
    }
    std::fs::write(dir.join("partner.asc"), certs)?;
    Ok(())
}

fn when(ms: u64) -> String {
    sipmail::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}
