//! `sipmail verify-call --export`: the signed bytes, signatures and certificates as files,
//! for `gpg --verify` alone.

use super::{AuditError, CallRecord, SignedPart, domain_of, io};
use crate::keyring::Keyring;
use sequoia_openpgp as openpgp;
use std::path::{Path, PathBuf};

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
