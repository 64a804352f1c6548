//! Ed25519 signing with a key imported once. Sequoia's `KeyPair` keeps the secret in
//! encrypted memory and, for each signature, decrypts it (a SHA-256 over a 16 KiB pre-key)
//! and imports it into OpenSSL again (which recomputes the public key): together 60% of a
//! signature's instructions (docs/PERFORMANCE.md, the handshake profile). This signer
//! imports it once, when the keyring is loaded, and hands Sequoia only the raw signature;
//! Sequoia still builds, hashes and serialises the OpenPGP signature, so what comes out is
//! the same kind of signature, which gpg verifies. The price: the secret stays in OpenSSL's
//! heap while the keyring is loaded, instead of in Sequoia's encrypted memory.

use super::*;
use openpgp::crypto::mpi;
use openpgp::types::HashAlgorithm;
use openssl::pkey::{Id, PKey, Private};

/// The own signing key, ready in OpenSSL (Ed25519 keys only; others sign the slow way).
pub(super) struct FastEd25519 {
    public: Key<PublicParts, UnspecifiedRole>,
    pkey: PKey<Private>,
    /// Which signature encoding the key's algorithm wants.
    legacy_eddsa: bool,
}

impl FastEd25519 {
    /// `None` for a key that is not Ed25519 (RSA, ECDSA, Ed448, ...).
    pub(super) fn new(keypair: &KeyPair) -> Option<FastEd25519> {
        let public = keypair.public().clone();
        // The secret goes straight from Sequoia's protected buffer into OpenSSL: no copy
        // of it is left in our own heap.
        #[allow(deprecated)]
        let (pkey, legacy_eddsa) = keypair.secret().map(|secret| {
            let import = |raw: &[u8]| PKey::private_key_from_raw_bytes(raw, Id::ED25519).ok();
            match (public.pk_algo(), public.mpis(), secret) {
                (
                    PublicKeyAlgorithm::EdDSA,
                    mpi::PublicKey::EdDSA {
                        curve: Curve::Ed25519,
                        ..
                    },
                    mpi::SecretKeyMaterial::EdDSA { scalar },
                ) => import(&scalar.value_padded(32)).map(|k| (k, true)),
                (
                    PublicKeyAlgorithm::Ed25519,
                    mpi::PublicKey::Ed25519 { .. },
                    mpi::SecretKeyMaterial::Ed25519 { x },
                ) => import(x).map(|k| (k, false)),
                _ => None,
            }
        })?;
        // The imported key must be the certificate's: compare the public halves.
        let ours = pkey.raw_public_key().ok()?;
        let matches = match public.mpis() {
            mpi::PublicKey::EdDSA { q, .. } => q
                .decode_point(&Curve::Ed25519)
                .is_ok_and(|(p, _)| p == ours.as_slice()),
            mpi::PublicKey::Ed25519 { a } => a.as_slice() == ours.as_slice(),
            _ => false,
        };
        matches.then_some(FastEd25519 {
            public,
            pkey,
            legacy_eddsa,
        })
    }

    /// A `Signer` borrowing it (Sequoia wants `&mut`; this one has no state to change).
    pub(super) fn signer(&self) -> Signing<'_> {
        Signing(self)
    }
}

pub(super) struct Signing<'a>(&'a FastEd25519);

impl openpgp::crypto::Signer for Signing<'_> {
    fn public(&self) -> &Key<PublicParts, UnspecifiedRole> {
        &self.0.public
    }

    fn sign(&mut self, _hash: HashAlgorithm, digest: &[u8]) -> openpgp::Result<mpi::Signature> {
        let mut s = openssl::sign::Signer::new_without_digest(&self.0.pkey)?;
        let sig = s.sign_oneshot_to_vec(digest)?;
        if sig.len() != 64 {
            return Err(openpgp::Error::InvalidOperation(format!(
                "OpenSSL made an Ed25519 signature of {} bytes",
                sig.len()
            ))
            .into());
        }
        Ok(if self.0.legacy_eddsa {
            mpi::Signature::EdDSA {
                r: mpi::MPI::new(&sig[..32]),
                s: mpi::MPI::new(&sig[32..]),
            }
        } else {
            let mut a = [0u8; 64];
            a.copy_from_slice(&sig);
            mpi::Signature::Ed25519 { s: Box::new(a) }
        })
    }
}
