//! Building a call's audit record from the handshake, and writing and reading its file.

use super::{AuditError, ParsedTranscript, RECORD_FORMAT, concat, io};
use crate::group_commit::fsync_dir_shared;
use crate::handshake::{ANSWER_SIG_CONTEXT, CONFIRM_SIG_CONTEXT, SessionKeys, Transcript};
use crate::time::rfc3339;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sequoia_openpgp as openpgp;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Returns the file's path once the record is durable: its bytes, and its name (the
    /// day's folder fsynced, and `dir` too when the day's folder is new).
    pub fn write(&self, dir: &Path) -> Result<PathBuf, AuditError> {
        let day = self.established_at.get(..10).unwrap_or("unknown-date");
        let day_dir = dir.join(day);
        let json = serde_json::to_vec_pretty(self).map_err(|e| AuditError::NotARecord {
            path: day_dir.clone(),
            reason: e.to_string(),
        })?;
        let temp = || {
            tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&day_dir)
        };
        // The day's folder is made by its first record (and again if it was removed).
        let (mut tmp, new_day) = match temp() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&day_dir).map_err(io("creating", &day_dir))?;
                (temp().map_err(io("creating a file in", &day_dir))?, true)
            }
            r => (r.map_err(io("creating a file in", &day_dir))?, false),
        };
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
                Ok(_) => {
                    // The name is a link made after the file's fsync: without an fsync of
                    // the folder a power loss could still lose the record.
                    // Calls set up at once share that fsync.
                    fsync_dir_shared(&day_dir).map_err(io("syncing", &day_dir))?;
                    // And the day's folder's own name, once per day and process: whoever
                    // made the folder may not have fsynced `dir` yet.
                    if new_day || !day_known_durable(&day_dir) {
                        fsync_dir_shared(dir).map_err(io("syncing", dir))?;
                        note_day_durable(&day_dir);
                    }
                    return Ok(path);
                }
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

/// The day folder whose name this process made durable last (records of a day after the
/// first skip the fsync of the records folder).
static DAY_DURABLE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

fn day_known_durable(day_dir: &Path) -> bool {
    DAY_DURABLE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_deref()
        == Some(day_dir)
}

fn note_day_durable(day_dir: &Path) {
    *DAY_DURABLE.lock().unwrap_or_else(|p| p.into_inner()) = Some(day_dir.to_path_buf());
}
