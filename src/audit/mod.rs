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
//!
//! One file per job: [`record`] builds, writes and reads records, [`transcript`] parses
//! the signed transcript strictly, [`verify`] checks a record (`sipmail verify-call`) and
//! [`export`] writes the files `gpg --verify` needs.

mod export;
mod record;
mod transcript;
mod verify;

pub use crate::time::rfc3339;
pub use export::export;
pub use record::{CallRecord, CallSignatures, SignedPart, armor_signature};
pub use transcript::ParsedTranscript;
pub use verify::{Check, Outcome, Report, Verdict, verify};

use crate::handshake::Suite;
use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests;
