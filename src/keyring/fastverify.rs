//! Ed25519 verification with the key decompressed once. Through Sequoia,
//! each verification imports the partner's key into OpenSSL again (a point decompression)
//! and runs OpenSSL's Ed25519, whose scalar multiplication takes about four times the
//! instructions of curve25519-dalek's (docs/PERFORMANCE.md, the handshake profile).
//! Sequoia still parses the signature and hashes the data and the signature's trailer, as
//! its own `verify_message` does; only the last step, the Ed25519 equation, is ours on
//! curve25519-dalek ([`super::ed25519::StrictKey`]), exactly ed25519-dalek's strict form
//! (canonical S, no small-order R or A), which every signature RFC 8032 signers make
//! passes, without the field inversion that form spends on each call.

use super::*;
use openpgp::crypto::hash::Hash;
use openpgp::crypto::mpi;
use openpgp::types::SignatureType;

/// A partner's Ed25519 signing key, decompressed (Ed25519 keys only; others verify
/// through Sequoia).
pub(super) struct FastVerify(super::ed25519::StrictKey);

impl FastVerify {
    /// `None` for a key that is not Ed25519 (or whose point is invalid: then Sequoia's
    /// path gives the error).
    pub(super) fn new(key: &Key<PublicParts, UnspecifiedRole>) -> Option<FastVerify> {
        let raw: [u8; 32] = match key.mpis() {
            mpi::PublicKey::EdDSA {
                curve: Curve::Ed25519,
                q,
            } => q.decode_point(&Curve::Ed25519).ok()?.0.try_into().ok()?,
            mpi::PublicKey::Ed25519 { a } => *a,
            _ => return None,
        };
        super::ed25519::StrictKey::from_bytes(&raw).map(FastVerify)
    }

    /// `sig` over `data` verifies with `key` (which this was made from): the checks of
    /// Sequoia's `Signature::verify_message` (a binary or text signature, the key's
    /// version, a creation time not before the key's), the digest prefix, and the
    /// signature.
    pub(super) fn verify(
        &self,
        sig: &Signature,
        key: &Key<PublicParts, UnspecifiedRole>,
        data: &[u8],
    ) -> Result<(), String> {
        if !matches!(sig.typ(), SignatureType::Binary | SignatureType::Text) {
            return Err(format!("does not verify: a {} signature", sig.typ()));
        }
        if (sig.version() == 6) != (key.version() == 6) {
            return Err(format!(
                "does not verify: a v{} signature by a v{} key",
                sig.version(),
                key.version()
            ));
        }
        match sig.signature_creation_time() {
            Some(t) if t >= key.creation_time() => {}
            Some(_) => return Err("does not verify: the signature predates the key".into()),
            None => return Err("does not verify: the signature has no creation time".into()),
        }
        let digest = (|| -> openpgp::Result<Vec<u8>> {
            let mut hash = sig.hash_algo().context()?.for_signature(sig.version());
            if let Some(salt) = sig.salt() {
                hash.update(salt);
            }
            hash.update(data);
            sig.hash(&mut hash)?;
            hash.into_digest()
        })()
        .map_err(|e| format!("does not verify: {}", error::why(e)))?;
        if digest.get(..2) != Some(&sig.digest_prefix()[..]) {
            return Err("the digest prefix does not match the signed data".into());
        }
        let mut raw = [0u8; 64];
        match sig.mpis() {
            mpi::Signature::EdDSA { r, s } => {
                let (r, s) = r
                    .value_padded(32)
                    .and_then(|r| s.value_padded(32).map(|s| (r, s)))
                    .map_err(|e| format!("does not verify: {}", error::why(e)))?;
                raw[..32].copy_from_slice(&r);
                raw[32..].copy_from_slice(&s);
            }
            mpi::Signature::Ed25519 { s } => raw.copy_from_slice(&s[..]),
            _ => return Err("does not verify: not an Ed25519 signature".into()),
        }
        if self.0.verify_strict(&digest, &raw) {
            Ok(())
        } else {
            Err("does not verify: bad signature".to_string())
        }
    }
}
