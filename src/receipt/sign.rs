//! Signing a receipt with our `mail@` key, and verifying a partner's.

use super::{Receipt, ReceiptError};
use crate::keyring::{Keyring, KeyringError};

/// The canonical text of `r` and a detached binary OpenPGP signature over exactly those
/// bytes, by our signing key (`gpg --verify SIG TEXT` checks it).
pub fn sign(keyring: &Keyring, r: &Receipt) -> Result<(Vec<u8>, Vec<u8>), KeyringError> {
    let text = r.encode();
    let sig = keyring.sign_detached(&text)?;
    Ok((text, sig))
}

/// Parses `text` and verifies `sig` over it with the certificate `fingerprint`, which must
/// be valid for `mail@<domain>` in `keyring`; the receipt must name that domain and that
/// fingerprint as its signer. What the receipt attests is checked apart
/// ([`super::check_accepted`]).
pub fn verify(
    keyring: &Keyring,
    domain: &str,
    fingerprint: &str,
    text: &[u8],
    sig: &[u8],
) -> Result<Receipt, ReceiptError> {
    let r = Receipt::parse(text)?;
    let fpr =
        crate::keyring::normalize_fingerprint(fingerprint).map_err(|e| ReceiptError::WrongKey {
            expected: fingerprint.to_string(),
            got: e.to_string(),
        })?;
    if !r.receiver_fingerprint.eq_ignore_ascii_case(&fpr) {
        return Err(ReceiptError::WrongKey {
            expected: fpr,
            got: r.receiver_fingerprint,
        });
    }
    if !r.receiver.eq_ignore_ascii_case(domain) {
        return Err(ReceiptError::Mismatch(format!(
            "it is issued by {}, not by {domain}",
            r.receiver
        )));
    }
    keyring
        .verify_detached(domain, &fpr, text, sig)
        .map_err(|e| ReceiptError::BadSignature(e.to_string()))?;
    Ok(r)
}
