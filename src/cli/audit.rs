//! `sipmail verify-call`: check a call's audit record, and export it for `gpg --verify`.

use anyhow::{Context, Result};
use sipmail::audit::{self, CallRecord, Outcome, Verdict};
use sipmail::config::Config;
use sipmail::keyring::{Keyring, format_fingerprint};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn verify_call(
    record: &Path,
    keyring: Option<PathBuf>,
    config: Option<PathBuf>,
    compare: Option<PathBuf>,
    export: Option<PathBuf>,
) -> Result<ExitCode> {
    let rec = CallRecord::load(record)?;
    let keyring_dir = match (keyring, config) {
        (Some(k), _) => Some(k),
        (None, Some(c)) => Some(Config::load(&c)?.keyring),
        (None, None) => None,
    };
    let kr = match &keyring_dir {
        Some(d) => Some(Keyring::open(d).with_context(|| {
            format!(
                "opening the keyring {} to check the signatures",
                d.display()
            )
        })?),
        None => None,
    };
    let other = match &compare {
        Some(p) => Some(CallRecord::load(p)?),
        None => None,
    };
    let report = audit::verify(&rec, kr.as_ref(), other.as_ref());

    println!(
        "Call {} ({}, recorded by {}), established {}",
        rec.call_id, rec.direction, rec.local, rec.established_at
    );
    println!(
        "  caller {} key {}\n  callee {} key {}\n  suite {}, SAS {}",
        rec.caller,
        format_fingerprint(&rec.caller_fingerprint),
        rec.callee,
        format_fingerprint(&rec.callee_fingerprint),
        rec.suite,
        rec.sas
    );
    for c in &report.checks {
        let (mark, text) = match &c.outcome {
            Outcome::Pass(t) => ("ok  ", t),
            Outcome::Fail(t) => ("FAIL", t),
            Outcome::Unchecked(t) => ("--  ", t),
        };
        println!("  {mark} {}: {text}", c.what);
    }
    if let Some(dir) = &export {
        let files = audit::export(&rec, kr.as_ref(), dir)?;
        println!("Exported to {}:", dir.display());
        for f in &files {
            println!("  {}", f.display());
        }
        let d = dir.display();
        println!(
            "Check with GnuPG, after importing the signers' certificates (gpg --import {d}/*.cert.asc,\n\
             or the partner's certificate from its own keyring):\n  \
             gpg --verify {d}/answer.sig {d}/answer.data    # signed by {} (callee)\n  \
             gpg --verify {d}/confirm.sig {d}/confirm.data  # signed by {} (caller)",
            rec.answer.signer, rec.confirm.signer
        );
    }
    Ok(match report.verdict {
        Verdict::Verified => {
            println!("VERIFIED: both signatures are good and the record matches what was signed.");
            ExitCode::SUCCESS
        }
        Verdict::Failed => {
            println!(
                "FAILED: the record does not match what was signed, or a signature is bad. \
                 Treat the record as altered; compare it with the partner's record of the call."
            );
            ExitCode::FAILURE
        }
        Verdict::Incomplete => {
            println!(
                "INCOMPLETE: nothing failed, but not every signature could be checked. {}",
                if kr.is_none() {
                    "Give --keyring DIR or --config FILE, or check the exported files with gpg --verify."
                } else {
                    "Import the missing certificate (sipmail keys import) and run again."
                }
            );
            ExitCode::from(2)
        }
    })
}
