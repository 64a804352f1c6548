//! Ed25519 signing with a key expanded once. Sequoia's `KeyPair` keeps the secret in
//! encrypted memory and, for each signature, decrypts it (a SHA-256 over a 16 KiB pre-key)
//! and imports it into OpenSSL again (which recomputes the public key): together 60% of a
//! signature's instructions (docs/PERFORMANCE.md, the handshake profile). This signer
//! expands it once, when the keyring is loaded (ed25519-dalek's `SigningKey`: the hashed
//! scalar and the public key precomputed), and hands Sequoia only the raw signature;
//! Sequoia still builds, hashes and serialises the OpenPGP signature, so what comes out is
//! the same kind of signature, which gpg verifies. Ed25519 is deterministic: the raw
//! signature is byte for byte the one Sequoia's key pair makes (tested). The price: the
//! secret stays in our heap while the keyring is loaded (zeroed when it is dropped),
//! instead of in Sequoia's encrypted memory.

use super::*;
use ed25519_dalek::Signer as _;
use openpgp::crypto::mpi;
use openpgp::types::HashAlgorithm;

/// The own signing key, expanded (Ed25519 keys only; others sign the slow way).
pub(super) struct FastEd25519 {
    public: Key<PublicParts, UnspecifiedRole>,
    key: ed25519_dalek::SigningKey,
    /// Which signature encoding the key's algorithm wants.
    legacy_eddsa: bool,
}

impl FastEd25519 {
    /// `None` for a key that is not Ed25519 (RSA, ECDSA, Ed448, ...).
    pub(super) fn new(keypair: &KeyPair) -> Option<FastEd25519> {
        let public = keypair.public().clone();
        // The secret goes from Sequoia's protected buffer into the signing key (which
        // zeroes itself when dropped); the seed copy on the stack is zeroed too.
        #[allow(deprecated)]
        let (key, legacy_eddsa) = keypair.secret().map(|secret| {
            let import = |raw: &[u8]| {
                let seed: zeroize::Zeroizing<[u8; 32]> =
                    zeroize::Zeroizing::new(raw.try_into().ok()?);
                Some(ed25519_dalek::SigningKey::from_bytes(&seed))
            };
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
        // The expanded key must be the certificate's: compare the public halves.
        let ours = key.verifying_key().to_bytes();
        let matches = match public.mpis() {
            mpi::PublicKey::EdDSA { q, .. } => q
                .decode_point(&Curve::Ed25519)
                .is_ok_and(|(p, _)| p == ours.as_slice()),
            mpi::PublicKey::Ed25519 { a } => a.as_slice() == ours.as_slice(),
            _ => false,
        };
        matches.then_some(FastEd25519 {
            public,
            key,
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
        let sig = self.0.key.sign(digest).to_bytes();
        Ok(if self.0.legacy_eddsa {
            mpi::Signature::EdDSA {
                r: mpi::MPI::new(&sig[..32]),
                s: mpi::MPI::new(&sig[32..]),
            }
        } else {
            mpi::Signature::Ed25519 { s: Box::new(sig) }
        })
    }
}
