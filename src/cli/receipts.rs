//! `sipmail receipts`: the signed receipts partners returned for the mail we sent, as the
//! relay stored them (<spool>/receipts/sent/), listed, shown, verified again against the
//! keyring, and exported for `gpg --verify`.

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
    /// partner committed it, the recipients covered and the SHA-256 of the message.
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
    /// receipt-N.sig (the detached OpenPGP signature), with the partner's certificate as
    /// partner.asc: `gpg --import DIR/partner.asc; gpg --verify DIR/receipt-1.sig
    /// DIR/receipt-1.txt` checks it without sipmail.
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
                "{:<24} {:<24} {:<20} {:<8} sha256",
                "queue id", "partner", "committed (UTC)", "rcpts"
            );
            for rec in &all {
                for r in parsed(rec) {
                    println!(
                        "{:<24} {:<24} {:<20} {:<8} {}",
                        rec.queue_id,
                        rec.peer,
                        when(r.committed_unix_ms),
                        r.rcpts.len(),
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
                "Wrote {} receipt(s) to {}. Check with GnuPG:\n  gpg --import {d}/partner.asc\n  gpg --verify {d}/receipt-1.sig {d}/receipt-1.txt",
                rec.receipts.len(),
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

fn parsed(rec: &SentRecord) -> Vec<Receipt> {
    rec.receipts
        .iter()
        .filter_map(|s| Receipt::parse(s.text.as_bytes()).ok())
        .collect()
}

fn verify_one(
    kr: &Keyring,
    rec: &SentRecord,
    s: &sipmail::receipt::store::StoredReceipt,
) -> Result<Receipt> {
    let signed = s
        .to_signed()
        .context("the stored signature is not base64")?;
    let r = sipmail::receipt::verify(kr, &rec.peer, &rec.fingerprint, &signed.text, &signed.sig)?;
    if r.sender_queue_id != rec.queue_id {
        bail!(
            "it names our queue ID {}, it is stored for {}",
            r.sender_queue_id,
            rec.queue_id
        );
    }
    Ok(r)
}

fn export(kr: &Keyring, rec: &SentRecord, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, s) in rec.receipts.iter().enumerate() {
        let signed = s
            .to_signed()
            .context("the stored signature is not base64")?;
        let base = dir.join(format!("receipt-{}", i + 1));
        std::fs::write(base.with_extension("txt"), &signed.text)?;
        std::fs::write(base.with_extension("sig"), &signed.sig)?;
    }
    let cert = kr
        .export_peer_cert(&rec.peer, &rec.fingerprint)
        .with_context(|| {
            format!(
                "the certificate {} of {} is not in the keyring",
                rec.fingerprint, rec.peer
            )
        })?;
    std::fs::write(dir.join("partner.asc"), cert)?;
    Ok(())
}

fn when(ms: u64) -> String {
    sipmail::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}
