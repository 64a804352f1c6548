//! `sipmail verify-call`: a record's structure, its transcript hash and commitment, both
//! signatures (with a keyring), and the comparison with the partner's record.

use super::{CallRecord, ParsedTranscript, RECORD_FORMAT, domain_of, suite_name};
use crate::handshake::{ANSWER_SIG_CONTEXT, CONFIRM_SIG_CONTEXT, commitment};
use crate::keyring::{Keyring, KeyringError};
use sha2::{Digest, Sha256};

/// How one check came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    /// Could not be decided (no keyring, unknown or unusable cert, or not computable).
    Unchecked(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub what: &'static str,
    pub outcome: Outcome,
}

/// The overall result of [`verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed (the SAS excepted: it is never computable from a record).
    Verified,
    /// At least one check failed: the record was altered or the signatures are bad.
    Failed,
    /// Nothing failed, but a signature could not be checked.
    Incomplete,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub checks: Vec<Check>,
    pub verdict: Verdict,
}

/// Check a record: its structure and internal consistency, the transcript hash and the
/// commitment, and (with a keyring) both OpenPGP signatures. With `other`, the partner's
/// record of the same call, also compare the two (this is how the SAS is checked).
pub fn verify(rec: &CallRecord, keyring: Option<&Keyring>, other: Option<&CallRecord>) -> Report {
    let mut checks = Vec::new();
    let mut push = |what: &'static str, outcome: Outcome| checks.push(Check { what, outcome });
    use Outcome::*;

    if rec.format == RECORD_FORMAT {
        push("format", Pass(rec.format.clone()));
    } else {
        push(
            "format",
            Fail(format!("{:?}, expected {RECORD_FORMAT:?}", rec.format)),
        );
    }
    let parsed = rec.signed_data().and_then(|(answer, confirm)| {
        let t1 = answer
            .strip_prefix(ANSWER_SIG_CONTEXT)
            .ok_or("answer.data does not start with \"sipmail/1 answer signature\\0\"")?;
        let t2 = confirm
            .strip_prefix(CONFIRM_SIG_CONTEXT)
            .ok_or("confirm.data does not start with \"sipmail/1 confirm signature\\0\"")?;
        let p = ParsedTranscript::parse(t2).map_err(|e| e.to_string())?;
        if t2[..p.t1_len] != *t1 {
            return Err("T1 (answer.data) is not the prefix of T2 (confirm.data)".to_string());
        }
        Ok((answer.clone(), confirm.clone(), p, t2.to_vec()))
    });
    let (answer_data, confirm_data, p, t2) = match parsed {
        Ok(x) => {
            push(
                "signed data",
                Pass(format!(
                    "T1 {} bytes, T2 {} bytes, well formed",
                    x.2.t1_len,
                    x.3.len()
                )),
            );
            x
        }
        Err(e) => {
            push("signed data", Fail(e));
            return finish(checks);
        }
    };

    let th2 = hex::encode(Sha256::digest(&t2));
    if th2.eq_ignore_ascii_case(&rec.transcript_sha256) {
        push("transcript hash", Pass(format!("SHA-256(T2) = {th2}")));
    } else {
        push(
            "transcript hash",
            Fail(format!(
                "SHA-256(T2) is {th2}, the record says {}",
                rec.transcript_sha256
            )),
        );
    }

    let caller_fpr = hex::encode_upper(&p.caller_fingerprint);
    let callee_fpr = hex::encode_upper(&p.callee_fingerprint);
    let chosen = suite_name(p.chosen_suite);
    let mut mismatches = Vec::new();
    let mut same = |field: &str, record: &str, signed: &str, ci: bool| {
        let eq = if ci {
            record.eq_ignore_ascii_case(signed)
        } else {
            record == signed
        };
        if !eq {
            mismatches.push(format!("{field}: record {record:?}, signed {signed:?}"));
        }
    };
    same("call_id", &rec.call_id, &p.call_id, false);
    same("caller", &rec.caller, &p.caller, false);
    same("callee", &rec.callee, &p.callee, false);
    same(
        "caller_fingerprint",
        &rec.caller_fingerprint,
        &caller_fpr,
        true,
    );
    same(
        "callee_fingerprint",
        &rec.callee_fingerprint,
        &callee_fpr,
        true,
    );
    same("answer.signer", &rec.answer.signer, &p.callee, false);
    same(
        "answer.fingerprint",
        &rec.answer.fingerprint,
        &callee_fpr,
        true,
    );
    same("confirm.signer", &rec.confirm.signer, &p.caller, false);
    same(
        "confirm.fingerprint",
        &rec.confirm.fingerprint,
        &caller_fpr,
        true,
    );
    same("suite", &rec.suite, chosen.unwrap_or("(unknown)"), false);
    let (local, peer) = if rec.direction == "outgoing" {
        (&p.caller, &p.callee)
    } else {
        (&p.callee, &p.caller)
    };
    same("local", &rec.local, local, false);
    same("peer", &rec.peer, domain_of(peer), true);
    if !matches!(rec.direction.as_str(), "outgoing" | "incoming") {
        mismatches.push(format!(
            "direction {:?} is not outgoing/incoming",
            rec.direction
        ));
    }
    if mismatches.is_empty() {
        push(
            "record fields",
            Pass(format!(
                "Call-ID, identities, fingerprints and suite are those signed ({} calls {})",
                p.caller, p.callee
            )),
        );
    } else {
        push("record fields", Fail(mismatches.join("; ")));
    }

    if commitment(&p.caller_public) == p.commitment {
        push(
            "commitment",
            Pass("SHA-256(prefix || caller's key) equals the offer's commitment".into()),
        );
    } else {
        push(
            "commitment",
            Fail("the caller's ephemeral key does not match the commitment".into()),
        );
    }
    if p.offered_suites.contains(&p.chosen_suite) && chosen.is_some() {
        push(
            "suite",
            Pass(format!(
                "{} chosen from [{}]",
                chosen.unwrap_or_default(),
                p.offered_suites
                    .iter()
                    .map(|s| suite_name(*s).unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        );
    } else {
        push("suite", Fail("the chosen suite was not offered".into()));
    }

    for (what, part, data, identity, fpr) in [
        (
            "answer signature",
            &rec.answer,
            &answer_data,
            &p.callee,
            &callee_fpr,
        ),
        (
            "confirm signature",
            &rec.confirm,
            &confirm_data,
            &p.caller,
            &caller_fpr,
        ),
    ] {
        let outcome = match keyring {
            None => Unchecked("no keyring given (--keyring or --config)".into()),
            Some(kr) => {
                match kr.verify_detached(domain_of(identity), fpr, data, part.signature.as_bytes())
                {
                    Ok(()) => Pass(format!(
                        "good signature by {identity}, key {}",
                        crate::keyring::format_fingerprint(fpr)
                    )),
                    Err(e @ KeyringError::BadSignature { .. }) => Fail(e.to_string()),
                    Err(e) => Unchecked(e.to_string()),
                }
            }
        };
        push(what, outcome);
    }

    match other {
        None => push(
            "SAS",
            Unchecked(format!(
                "{} as recorded; it derives from the call's secret, which is never recorded: compare it with the partner's record (--compare)",
                rec.sas
            )),
        ),
        Some(o) => {
            let mut diffs = Vec::new();
            if o.sas != rec.sas {
                diffs.push(format!("SAS {} here, {} there", rec.sas, o.sas));
            }
            if !o
                .transcript_sha256
                .eq_ignore_ascii_case(&rec.transcript_sha256)
            {
                diffs.push("transcript hashes differ".to_string());
            }
            if o.answer.data != rec.answer.data || o.confirm.data != rec.confirm.data {
                diffs.push("signed data differs".to_string());
            }
            if o.call_id != rec.call_id {
                diffs.push("Call-IDs differ".to_string());
            }
            if o.direction == rec.direction {
                diffs.push(format!(
                    "both records are {}; expected one of each side",
                    rec.direction
                ));
            }
            if diffs.is_empty() {
                push(
                    "SAS",
                    Pass(format!(
                        "{} on both sides, same transcript and signed data",
                        rec.sas
                    )),
                );
            } else {
                push("SAS", Fail(diffs.join("; ")));
            }
        }
    }
    finish(checks)
}

fn finish(checks: Vec<Check>) -> Report {
    let failed = checks.iter().any(|c| matches!(c.outcome, Outcome::Fail(_)));
    // The SAS alone is never computable from one record; it does not make it incomplete.
    let incomplete = checks
        .iter()
        .any(|c| c.what != "SAS" && matches!(c.outcome, Outcome::Unchecked(_)));
    let verdict = if failed {
        Verdict::Failed
    } else if incomplete {
        Verdict::Incomplete
    } else {
        Verdict::Verified
    };
    Report { checks, verdict }
}
