//! Call audit records: what each established call signed, kept so that an auditor can check
//! it later, with `sipmail verify-call` or with `gpg --verify` alone.
//!
//! A record is one small JSON file per call (about 2 KB), written by both relays when a
//! call is established, in `<audit.dir>/<YYYY-MM-DD>/<Call-ID>.<out|in>.json` (UTC date;
//! `audit.dir` defaults to `<relay.spool>/calls`). It holds:
//!
//! * the exact bytes each side signed (`"sipmail/1 answer signature\0" || T1` and
//!   `"sipmail/1 confirm signature\0" || T2`, base64) and both detached OpenPGP
//!   signatures, ASCII-armored, so that `gpg --verify` needs nothing else;
//! * what the log line "call established" says: Call-ID, both identities and
//!   fingerprints, the suite, the SAS, SHA-256(T2), the time.
//!
//! It holds no secret: the transcript carries only public values (ephemeral *public* keys,
//! nonce, commitment), and neither the Diffie-Hellman result nor any traffic key or IV is
//! ever written. That is also why the SAS cannot be recomputed from a record: it is derived
//! from the shared secret. It can be compared with the partner's record of the same call.

use crate::handshake::{
    ANSWER_SIG_CONTEXT, CONFIRM_SIG_CONTEXT, PROTOCOL_LABEL, SessionKeys, Suite, Transcript,
    commitment,
};
use crate::keyring::{Keyring, KeyringError};
pub use crate::time::rfc3339;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sequoia_openpgp as openpgp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `format` field of every record this version writes.
pub const RECORD_FORMAT: &str = "sipmail-call-record/1";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a sipmail call record: {reason} (records are the JSON files in <spool>/calls/<date>/)",
        path.display()
    )]
    NotARecord { path: PathBuf, reason: String },
    #[error("the transcript is malformed: {0}")]
    Transcript(String),
    #[error("armoring the signature failed: {0}")]
    Armor(String),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |source| AuditError::Io {
        action,
        path,
        source,
    }
}

/// One signature of the handshake: who signed, the exact signed bytes and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPart {
    /// `mail@<domain>` of the signer.
    pub signer: String,
    /// The signer's primary key fingerprint, upper-case hex.
    pub fingerprint: String,
    /// The signed bytes (context prefix || transcript), base64.
    pub data: String,
    /// The detached OpenPGP signature, ASCII-armored.
    pub signature: String,
}

/// The audit record of one established call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub format: String,
    pub call_id: String,
    /// `outgoing` (we called) or `incoming`.
    pub direction: String,
    /// Our identity and the partner's domain, as the relay that wrote the record saw them.
    pub local: String,
    pub peer: String,
    pub caller: String,
    pub callee: String,
    pub caller_fingerprint: String,
    pub callee_fingerprint: String,
    pub suite: String,
    pub sas: String,
    /// SHA-256(T2), hex: the salt of the key schedule and the call's identity in logs.
    pub transcript_sha256: String,
    /// RFC 3339, UTC.
    pub established_at: String,
    pub established_unix: u64,
    /// The callee's signature over `"sipmail/1 answer signature\0" || T1`.
    pub answer: SignedPart,
    /// The caller's signature over `"sipmail/1 confirm signature\0" || T2`.
    pub confirm: SignedPart,
}

/// What the relay hands over when a call is established.
#[derive(Clone, Copy, Debug)]
pub struct CallSignatures<'a> {
    pub transcript: &'a Transcript,
    pub answer_signature: &'a [u8],
    pub confirm_signature: &'a [u8],
}

/// The fields of a transcript T2 (docs/PROTOCOL.md §2), parsed strictly: every field
/// once, in order, with the fixed lengths where the protocol fixes them, nothing after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedTranscript {
    pub call_id: String,
    pub from_tag: String,
    pub to_tag: String,
    pub caller: String,
    pub callee: String,
    pub offered_suites: Vec<u8>,
    pub nonce: [u8; 32],
    pub commitment: [u8; 32],
    pub caller_fingerprint: Vec<u8>,
    pub chosen_suite: u8,
    pub callee_public: [u8; 32],
    pub callee_fingerprint: Vec<u8>,
    pub caller_public: [u8; 32],
    /// The trust policy's id (1 signed, 2 psk, 3 opportunistic).
    pub auth_mode: u8,
    /// Where the callee's media listener was (the answer's `c=`/`m=`).
    pub callee_media: std::net::SocketAddr,
    /// Length of T1, the prefix the callee signed (everything before the caller's key).
    pub t1_len: usize,
}

impl ParsedTranscript {
    pub fn parse(t2: &[u8]) -> Result<ParsedTranscript, AuditError> {
        let bad = |m: String| AuditError::Transcript(m);
        // The transcript's fields in their order (docs/PROTOCOL.md): T1 is everything
        // before the caller's public key (0x0e), which comes last.
        const ORDER: [u8; 18] = [
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0f,
            0x10, 0x11, 0x12, 0x0e,
        ];
        let mut fields: Vec<&[u8]> = Vec::with_capacity(ORDER.len());
        let mut off = 0usize;
        let mut t1_len = 0usize;
        for tag in ORDER {
            let head = t2
                .get(off..off + 3)
                .ok_or_else(|| bad(format!("it ends before field {tag:#04x}")))?;
            if head[0] != tag {
                return Err(bad(format!(
                    "field {tag:#04x} expected at offset {off}, found tag {:#04x}",
                    head[0]
                )));
            }
            let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
            let value = t2
                .get(off + 3..off + 3 + len)
                .ok_or_else(|| bad(format!("field {tag:#04x} is cut short")))?;
            if tag == 0x0e {
                t1_len = off;
            }
            fields.push(value);
            off += 3 + len;
        }
        if off != t2.len() {
            return Err(bad(format!(
                "{} bytes after the last field",
                t2.len() - off
            )));
        }
        if fields[0] != PROTOCOL_LABEL {
            return Err(bad(format!(
                "the protocol label is not {}",
                String::from_utf8_lossy(PROTOCOL_LABEL)
            )));
        }
        let text = |i: usize, what: &str| {
            String::from_utf8(fields[i].to_vec())
                .map_err(|_| bad(format!("the {what} is not UTF-8")))
        };
        let fixed = |i: usize, what: &str| -> Result<[u8; 32], AuditError> {
            fields[i]
                .try_into()
                .map_err(|_| bad(format!("the {what} is not 32 bytes")))
        };
        let chosen = match fields[10] {
            [c] => *c,
            _ => return Err(bad("the chosen suite is not one byte".into())),
        };
        Ok(ParsedTranscript {
            call_id: text(1, "Call-ID")?,
            from_tag: text(2, "From tag")?,
            to_tag: text(3, "To tag")?,
            caller: text(4, "caller")?,
            callee: text(5, "callee")?,
            offered_suites: fields[6].to_vec(),
            nonce: fixed(7, "nonce")?,
            commitment: fixed(8, "commitment")?,
            caller_fingerprint: fields[9].to_vec(),
            chosen_suite: chosen,
            callee_public: fixed(11, "callee public key")?,
            callee_fingerprint: fields[12].to_vec(),
            auth_mode: match fields[13] {
                [m] => *m,
                _ => return Err(bad("the trust policy is not one byte".into())),
            },
            callee_media: media(fields[16])
                .ok_or_else(|| bad("the callee media address is not 7 or 19 bytes".into()))?,
            caller_public: fixed(17, "caller public key")?,
            t1_len,
        })
    }
}

/// A transcript's callee media address (docs/PROTOCOL.md §2, tag 0x12).
fn media(v: &[u8]) -> Option<std::net::SocketAddr> {
    let port = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
    match v {
        [4, rest @ ..] if rest.len() == 6 => {
            let ip: [u8; 4] = rest[..4].try_into().ok()?;
            Some((ip, port(&rest[4..])).into())
        }
        [6, rest @ ..] if rest.len() == 18 => {
            let ip: [u8; 16] = rest[..16].try_into().ok()?;
            Some((ip, port(&rest[16..])).into())
        }
        _ => None,
    }
}

fn suite_name(id: u8) -> Option<&'static str> {
    Suite::ALL.iter().find(|s| s.id() == id).map(|s| s.name())
}

fn domain_of(identity: &str) -> &str {
    identity.rsplit_once('@').map_or(identity, |(_, d)| d)
}

fn concat(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + body.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(body);
    v
}

/// ASCII armor for a binary OpenPGP signature packet.
pub fn armor_signature(sig: &[u8]) -> Result<String, AuditError> {
    use std::io::Write;
    let armor = |e: std::io::Error| AuditError::Armor(e.to_string());
    let mut w =
        openpgp::armor::Writer::new(Vec::new(), openpgp::armor::Kind::Signature).map_err(armor)?;
    w.write_all(sig).map_err(armor)?;
    let bytes = w.finalize().map_err(armor)?;
    String::from_utf8(bytes).map_err(|e| AuditError::Armor(e.to_string()))
}

impl CallRecord {
    /// The record of a call we took part in. `outgoing`: we were the caller.
    pub fn new(
        call_id: &str,
        outgoing: bool,
        peer_domain: &str,
        keys: &SessionKeys,
        sigs: CallSignatures<'_>,
        at: SystemTime,
    ) -> Result<CallRecord, AuditError> {
        let t2 = sigs.transcript.as_bytes();
        let p = ParsedTranscript::parse(t2)?;
        let answer_data = concat(ANSWER_SIG_CONTEXT, &t2[..p.t1_len]);
        let confirm_data = concat(CONFIRM_SIG_CONTEXT, t2);
        let caller_fpr = hex::encode_upper(&p.caller_fingerprint);
        let callee_fpr = hex::encode_upper(&p.callee_fingerprint);
        Ok(CallRecord {
            format: RECORD_FORMAT.into(),
            call_id: call_id.into(),
            direction: if outgoing { "outgoing" } else { "incoming" }.into(),
            local: if outgoing { &p.caller } else { &p.callee }.clone(),
            peer: peer_domain.into(),
            caller: p.caller.clone(),
            callee: p.callee.clone(),
            caller_fingerprint: caller_fpr.clone(),
            callee_fingerprint: callee_fpr.clone(),
            suite: keys.suite.name().into(),
            sas: keys.sas.clone(),
            transcript_sha256: hex::encode(keys.transcript_hash),
            established_at: rfc3339(at),
            established_unix: at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            answer: SignedPart {
                signer: p.callee.clone(),
                fingerprint: callee_fpr,
                data: B64.encode(answer_data),
                signature: armor_signature(sigs.answer_signature)?,
            },
            confirm: SignedPart {
                signer: p.caller.clone(),
                fingerprint: caller_fpr,
                data: B64.encode(confirm_data),
                signature: armor_signature(sigs.confirm_signature)?,
            },
        })
    }

    /// Read a record file.
    pub fn load(path: &Path) -> Result<CallRecord, AuditError> {
        let text = std::fs::read(path).map_err(io("reading", path))?;
        serde_json::from_slice(&text).map_err(|e| AuditError::NotARecord {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Write the record into `dir/<YYYY-MM-DD>/`, never replacing an existing file.
    /// Returns the file's path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, AuditError> {
        let day = self.established_at.get(..10).unwrap_or("unknown-date");
        let day_dir = dir.join(day);
        std::fs::create_dir_all(&day_dir).map_err(io("creating", &day_dir))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| AuditError::NotARecord {
            path: day_dir.clone(),
            reason: e.to_string(),
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&day_dir)
            .map_err(io("creating a file in", &day_dir))?;
        use std::io::Write;
        tmp.write_all(&json)
            .and_then(|_| tmp.write_all(b"\n"))
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(io("writing", tmp.path()))?;
        // The Call-ID comes from the peer on incoming calls: only a safe subset of it
        // names the file, so it cannot leave the folder.
        let stem: String = self
            .call_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.@+".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(120)
            .collect();
        let stem = stem.trim_start_matches('.');
        let dir_tag = if self.direction == "outgoing" {
            "out"
        } else {
            "in"
        };
        for n in 0..1000 {
            let name = if n == 0 {
                format!("{stem}.{dir_tag}.json")
            } else {
                format!("{stem}.{dir_tag}.{n}.json")
            };
            let path = day_dir.join(name);
            match tmp.persist_noclobber(&path) {
                Ok(_) => return Ok(path),
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => tmp = e.file,
                Err(e) => return Err(io("writing", &path)(e.error)),
            }
        }
        Err(io("writing", &day_dir)(std::io::Error::other(
            "1000 records with this Call-ID already exist",
        )))
    }

    /// The exact signed bytes of the answer (callee) and the confirm (caller).
    pub fn signed_data(&self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let a = B64
            .decode(self.answer.data.trim())
            .map_err(|e| format!("answer.data is not base64: {e}"))?;
        let c = B64
            .decode(self.confirm.data.trim())
            .map_err(|e| format!("confirm.data is not base64: {e}"))?;
        Ok((a, c))
    }
}

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

/// Write `answer.data answer.sig confirm.data confirm.sig` (and, with a keyring, the
/// signers' certificates `answer.cert.asc confirm.cert.asc`) into `dir`, for
/// `gpg --verify answer.sig answer.data`. Returns the files written.
pub fn export(
    rec: &CallRecord,
    keyring: Option<&Keyring>,
    dir: &Path,
) -> Result<Vec<PathBuf>, AuditError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let (answer, confirm) = rec.signed_data().map_err(|reason| AuditError::NotARecord {
        path: dir.to_path_buf(),
        reason,
    })?;
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("answer.data".into(), answer),
        (
            "answer.sig".into(),
            rec.answer.signature.clone().into_bytes(),
        ),
        ("confirm.data".into(), confirm),
        (
            "confirm.sig".into(),
            rec.confirm.signature.clone().into_bytes(),
        ),
    ];
    if let Some(kr) = keyring {
        for (name, part) in [("answer", &rec.answer), ("confirm", &rec.confirm)] {
            if let Some(cert) = signer_cert(kr, part) {
                files.push((format!("{name}.cert.asc"), cert.into_bytes()));
            }
        }
    }
    let mut out = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io("writing", &path))?;
        out.push(path);
    }
    Ok(out)
}

/// The armored public cert of a signer, from the keyring (own or partner).
fn signer_cert(kr: &Keyring, part: &SignedPart) -> Option<String> {
    use openpgp::serialize::SerializeInto;
    if kr
        .own_fingerprint()
        .is_ok_and(|f| f.eq_ignore_ascii_case(&part.fingerprint))
    {
        return kr.export_public().ok();
    }
    let cert = kr
        .peer_cert(domain_of(&part.signer), &part.fingerprint)
        .ok()?;
    String::from_utf8(cert.armored().to_vec().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{Answer, CallContext, Offer};

    fn transcript() -> Transcript {
        let ctx = CallContext {
            call_id: "c0ffee@site-a.test".into(),
            from_tag: "a1".into(),
            to_tag: "b2".into(),
            caller: "mail@site-a.test".into(),
            callee: "mail@site-b.test".into(),
        };
        let public = [9u8; 32];
        let offer = Offer {
            suites: vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
            fingerprint: vec![0xaa; 20],
            nonce: [7; 32],
            commitment: commitment(&public),
            auth: crate::handshake::AuthMode::Signed,
            rs_ids: vec![],
            key_packet: vec![],
        };
        let answer = Answer {
            media: "127.0.0.1:40000".parse().unwrap(),
            suite: Suite::Aes256Gcm,
            fingerprint: vec![0xbb; 20],
            public: [2; 32],
            signature: vec![],
            rs_ids: vec![],
            key_packet: vec![],
        };
        Transcript::t1(&ctx, &offer, &answer)
            .unwrap()
            .extend_t2(&public)
            .unwrap()
    }

    #[test]
    fn transcript_parses_and_t1_is_the_prefix() {
        let t2 = transcript();
        let p = ParsedTranscript::parse(t2.as_bytes()).unwrap();
        assert_eq!(p.call_id, "c0ffee@site-a.test");
        assert_eq!(p.callee, "mail@site-b.test");
        assert_eq!(p.chosen_suite, 2);
        assert_eq!(p.offered_suites, vec![1, 2]);
        assert_eq!(p.caller_public, [9; 32]);
        assert_eq!(p.callee_media, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(p.t1_len, t2.as_bytes().len() - 35);
        // Any truncation or extension is refused.
        let b = t2.as_bytes();
        for cut in 0..b.len() {
            assert!(ParsedTranscript::parse(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut longer = b.to_vec();
        longer.push(0);
        assert!(ParsedTranscript::parse(&longer).is_err());
    }

    #[test]
    fn structure_checks_without_a_keyring() {
        let t2 = transcript();
        let keys = crate::handshake::derive_keys(
            &[5; 32],
            None,
            None,
            crate::handshake::Continuity::NoneHeld { peer_has: false },
            &t2,
            Suite::Aes256Gcm,
        );
        let sig = [0xc2u8, 0x01, 0x00]; // not a real signature; only armored here
        let rec = CallRecord::new(
            "c0ffee@site-a.test",
            true,
            "site-b.test",
            &keys,
            CallSignatures {
                transcript: &t2,
                answer_signature: &sig,
                confirm_signature: &sig,
            },
            UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        )
        .unwrap();
        assert_eq!(rec.established_at, "2027-01-15T08:00:00Z");
        assert_eq!(rec.local, "mail@site-a.test");
        assert_eq!(rec.suite, "aes-256-gcm");
        let r = verify(&rec, None, None);
        assert_eq!(r.verdict, Verdict::Incomplete, "{:?}", r.checks);
        assert!(
            r.checks
                .iter()
                .filter(|c| c.what != "SAS" && !c.what.ends_with("signature"))
                .all(|c| matches!(c.outcome, Outcome::Pass(_))),
            "{:?}",
            r.checks
        );
        // Changing what the record claims, without the signed bytes, is caught.
        for edit in [
            (|r: &mut CallRecord| r.call_id.push('x')) as fn(&mut CallRecord),
            |r| r.suite = "chacha20-poly1305".into(),
            |r| r.caller_fingerprint = "BB".repeat(20),
            |r| r.transcript_sha256 = "00".repeat(32),
            |r| r.peer = "evil.test".into(),
        ] {
            let mut bad = rec.clone();
            edit(&mut bad);
            assert_eq!(verify(&bad, None, None).verdict, Verdict::Failed);
        }
        // The two records of one call must agree.
        let mut other = rec.clone();
        other.direction = "incoming".into();
        other.local = "mail@site-b.test".into();
        other.peer = "site-a.test".into();
        let r = verify(&rec, None, Some(&other));
        assert!(matches!(r.checks.last().unwrap().outcome, Outcome::Pass(_)));
        other.sas = "yyyy".into();
        assert_eq!(verify(&rec, None, Some(&other)).verdict, Verdict::Failed);
    }
}
