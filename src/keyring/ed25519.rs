//! The strict Ed25519 verification equation on curve25519-dalek, for a key decompressed
//! once: what ed25519-dalek's `VerifyingKey::verify_strict` accepts, and nothing else,
//! without its two per-call costs that a known key does not need.
//!
//! Why not ed25519-dalek's `verify_strict` itself: it recomputes R' = [s]B - [k]A and
//! compares R'.compress() with the signature's R bytes, and compressing costs a field
//! inversion (about 255 squarings on the serial backend, whatever the CPU); it also checks
//! the key's order on every call. Here R is decompressed (as `verify_strict` also does, to
//! check its order) and compared with R' projectively (four multiplications), and the
//! key's order is checked once. No field arithmetic of our own: decompression, the
//! double-base multiplication, the order checks and the point comparison are
//! curve25519-dalek's; what this file adds is the order of the steps.
//!
//! The two are equivalent. `verify_strict` accepts exactly when: s < l (canonical); R
//! decompresses to a point of not small order; A is not of small order; and
//! compress([s]B - [k]A) == R's bytes, with k = SHA-512(R || A || M) mod l over the bytes
//! as given. For a point P of not small order, x != 0 (the points with x = 0 are (0, 1)
//! and (0, -1), of order 1 and 2), so compress(P) is the canonical encoding of P (y < p,
//! the sign of x). Hence compress(R') == R's bytes exactly when R's bytes are canonical
//! (y < p: checked below, byte-wise) and R' == P as points, where P is what they decompress
//! to. The tests compare both on valid signatures, on every kind of broken one, on
//! small-order and mixed-order keys and R, and on non-canonical encodings.

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use sha2::{Digest, Sha512};

/// An Ed25519 public key, decompressed, ready to check signatures strictly.
#[derive(Clone)]
pub struct StrictKey {
    /// The key's bytes as given: they are what k hashes.
    raw: [u8; 32],
    /// -A, for [s]B + [k](-A).
    minus_a: EdwardsPoint,
    /// A is of small order: `verify_strict` refuses every signature by such a key.
    weak: bool,
}

impl StrictKey {
    /// `None` where the bytes are no point on the curve (as `VerifyingKey::from_bytes`).
    pub fn from_bytes(raw: &[u8; 32]) -> Option<StrictKey> {
        let a = CompressedEdwardsY(*raw).decompress()?;
        Some(StrictKey {
            raw: *raw,
            minus_a: -a,
            weak: a.is_small_order(),
        })
    }

    /// `sig` (R || s) is a strict Ed25519 signature of `msg` by this key.
    pub fn verify_strict(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let r_bytes: [u8; 32] = std::array::from_fn(|i| sig[i]);
        let s_bytes: [u8; 32] = std::array::from_fn(|i| sig[32 + i]);
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
            return false;
        };
        if self.weak || !canonical_y(&r_bytes) {
            return false;
        }
        let Some(r) = CompressedEdwardsY(r_bytes).decompress() else {
            return false;
        };
        if r.is_small_order() {
            return false;
        }
        let k = challenge(&r_bytes, &self.raw, msg);
        EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &self.minus_a, &s) == r
    }
}

/// k = SHA-512(R || A || M) mod l, over the encodings as given (RFC 8032 section 5.1.7).
fn challenge(r: &[u8; 32], a: &[u8; 32], msg: &[u8]) -> Scalar {
    let mut h = Sha512::new();
    h.update(r);
    h.update(a);
    h.update(msg);
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// The y in an encoded point (the low 255 bits, little-endian) is below p = 2^255 - 19.
/// The values from p to 2^255 - 1 are the only non-canonical ones: all bytes 0xff but
/// the first (at least 0xed) and the last (0x7f with the sign bit masked off).
fn canonical_y(b: &[u8; 32]) -> bool {
    !(b[31] & 0x7f == 0x7f && b[1..31].iter().all(|&x| x == 0xff) && b[0] >= 0xed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
    use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

    fn random<const N: usize>() -> [u8; N] {
        let mut b = [0u8; N];
        getrandom::fill(&mut b).unwrap();
        b
    }

    /// ed25519-dalek's verdict, the reference (`None`: it refuses the key's bytes too).
    fn dalek(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Option<bool> {
        let k = VerifyingKey::from_bytes(key).ok()?;
        Some(
            k.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
                .is_ok(),
        )
    }

    /// R || s.
    fn signature(r: &[u8; 32], s: &Scalar) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(r);
        sig[32..].copy_from_slice(s.as_bytes());
        sig
    }

    fn ours(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Option<bool> {
        Some(StrictKey::from_bytes(key)?.verify_strict(msg, sig))
    }

    fn agree(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        let (d, o) = (dalek(key, msg, sig), ours(key, msg, sig));
        assert_eq!(
            o,
            d,
            "key {} sig {} msg {}",
            hex::encode(key),
            hex::encode(sig),
            hex::encode(msg)
        );
        d == Some(true)
    }

    /// RFC 8032 section 7.1, test 2 (one byte) and test 3 (two bytes).
    #[test]
    fn rfc8032_vectors() {
        let cases = [
            (
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ];
        for (key, msg, sig) in cases {
            let key: [u8; 32] = hex::decode(key).unwrap().try_into().unwrap();
            let sig: [u8; 64] = hex::decode(sig).unwrap().try_into().unwrap();
            let msg = hex::decode(msg).unwrap();
            assert!(agree(&key, &msg, &sig));
            let mut wrong = msg.clone();
            wrong[0] ^= 1;
            assert!(!agree(&key, &wrong, &sig));
        }
    }

    /// Real signatures verify; any one flipped bit of the signature, the message or the
    /// key gives the same verdict as ed25519-dalek's (a refusal, but for the sign bit of
    /// a key that then decodes to another key, which both refuse too).
    #[test]
    fn agrees_on_real_and_broken_signatures() {
        for i in 0..300 {
            let sk = SigningKey::from_bytes(&random());
            let key = sk.verifying_key().to_bytes();
            let msg = random::<48>();
            let sig = sk.sign(&msg).to_bytes();
            assert!(agree(&key, &msg, &sig), "a real signature, round {i}");
            let bit = usize::from(random::<2>()[0]) % 512;
            let mut s2 = sig;
            s2[bit / 8] ^= 1 << (bit % 8);
            assert!(!agree(&key, &msg, &s2));
            let mut m2 = msg;
            m2[bit % 48] ^= 1 << (bit % 8);
            assert!(!agree(&key, &m2, &sig));
            let mut k2 = key;
            k2[bit % 32] ^= 1 << (bit % 8);
            assert!(!agree(&k2, &msg, &sig));
        }
    }

    /// s + l encodes the same scalar as s: both refuse it (malleability), and every s
    /// with one of the top three bits set.
    #[test]
    fn refuses_a_non_canonical_s() {
        // l, little-endian.
        let l: [u8; 32] =
            hex::decode("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010")
                .unwrap()
                .try_into()
                .unwrap();
        let mut seen = 0;
        for _ in 0..200 {
            let sk = SigningKey::from_bytes(&random());
            let key = sk.verifying_key().to_bytes();
            let msg = random::<16>();
            let sig = sk.sign(&msg).to_bytes();
            let mut plus_l = sig;
            let mut carry = 0u16;
            for j in 0..32 {
                let v = u16::from(sig[32 + j]) + u16::from(l[j]) + carry;
                plus_l[32 + j] = v as u8;
                carry = v >> 8;
            }
            if carry == 0 {
                seen += 1;
                assert!(!agree(&key, &msg, &plus_l));
            }
            let mut high = sig;
            high[63] |= 0x80;
            assert!(!agree(&key, &msg, &high));
        }
        assert!(seen > 0);
    }

    /// The eight small-order points as R and as the key, in their canonical encodings and
    /// with the sign bit set: both refuse every signature with them.
    #[test]
    fn refuses_small_order_r_and_keys() {
        let sk = SigningKey::from_bytes(&random());
        let key = sk.verifying_key().to_bytes();
        let msg = random::<16>();
        let sig = sk.sign(&msg).to_bytes();
        for t in EIGHT_TORSION.iter() {
            for sign in [0u8, 0x80] {
                let mut enc = t.compress().to_bytes();
                enc[31] |= sign;
                let mut s2 = sig;
                s2[..32].copy_from_slice(&enc);
                assert!(!agree(&key, &msg, &s2));
                // A small-order key T, with R = [s]B: the cofactorless equation
                // [s]B - [k]T = R holds whenever 8 divides k; both still refuse it.
                if CompressedEdwardsY(enc).decompress().is_some() {
                    let s = Scalar::from_bytes_mod_order(random());
                    let r = ED25519_BASEPOINT_POINT * s;
                    let forged = signature(&r.compress().to_bytes(), &s);
                    assert!(
                        !agree(&enc, &msg, &forged),
                        "small-order key {}",
                        hex::encode(enc)
                    );
                }
            }
        }
    }

    /// R = the identity, with s = k·a: the cofactorless equation holds ([s]B - [k]A = 0 =
    /// R: ed25519-dalek's non-strict `verify` takes it), so only R's order check refuses
    /// it, in both. Also in R's non-canonical encoding (y = p + 1).
    #[test]
    fn refuses_a_signature_whose_r_is_the_identity() {
        for non_canonical in [false, true] {
            let a = Scalar::from_bytes_mod_order(random());
            let key = (ED25519_BASEPOINT_POINT * a).compress().to_bytes();
            let mut r_enc = [0u8; 32];
            r_enc[0] = 1;
            if non_canonical {
                r_enc = [0xff; 32];
                r_enc[0] = 0xee;
                r_enc[31] = 0x7f;
            }
            let msg = random::<16>();
            let sig = signature(&r_enc, &(challenge(&r_enc, &key, &msg) * a));
            if !non_canonical {
                let lax = VerifyingKey::from_bytes(&key).unwrap();
                assert!(
                    ed25519_dalek::Verifier::verify(
                        &lax,
                        &msg,
                        &ed25519_dalek::Signature::from_bytes(&sig)
                    )
                    .is_ok(),
                    "the forged signature satisfies the cofactorless equation"
                );
            }
            assert!(!agree(&key, &msg, &sig));
        }
    }

    /// A key with a torsion part (A + T, of mixed order) is not refused by `verify_strict`:
    /// a signature whose k is a multiple of the torsion's order verifies under both, and
    /// one whose k is not is refused by both.
    #[test]
    fn agrees_on_mixed_order_keys() {
        let t = EIGHT_TORSION[1]; // of order 8
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..400 {
            let a = Scalar::from_bytes_mod_order(random());
            let key = (ED25519_BASEPOINT_POINT * a + t).compress().to_bytes();
            let r = Scalar::from_bytes_mod_order(random());
            let r_enc = (ED25519_BASEPOINT_POINT * r).compress().to_bytes();
            let msg = random::<16>();
            let sig = signature(&r_enc, &(r + challenge(&r_enc, &key, &msg) * a));
            if agree(&key, &msg, &sig) {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        // About one in eight k is a multiple of 8.
        assert!(
            accepted > 10 && refused > 200,
            "{accepted} accepted, {refused} refused"
        );
    }

    /// R with y >= p: the 19 non-canonical values of y, with either sign bit, as R of an
    /// otherwise good signature: both refuse them all. And the predicate itself, at its
    /// edges.
    #[test]
    fn refuses_a_non_canonical_r() {
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        let mut below = p;
        below[0] = 0xec;
        assert!(canonical_y(&below));
        assert!(!canonical_y(&p));
        let mut top = [0xffu8; 32];
        assert!(!canonical_y(&top));
        top[31] = 0xff; // the sign bit is not part of y
        assert!(!canonical_y(&top));
        let mut one_less_byte = p;
        one_less_byte[17] = 0xfe;
        assert!(canonical_y(&one_less_byte));
        let sk = SigningKey::from_bytes(&random());
        let key = sk.verifying_key().to_bytes();
        let msg = random::<16>();
        let sig = sk.sign(&msg).to_bytes();
        for add in 0..19u8 {
            for sign in [0u8, 0x80] {
                let mut enc = p;
                enc[0] = 0xed + add;
                enc[31] |= sign;
                let mut s2 = sig;
                s2[..32].copy_from_slice(&enc);
                assert!(!agree(&key, &msg, &s2));
            }
        }
    }
}
