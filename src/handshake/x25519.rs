//! X25519 (RFC 7748) for the handshake's shared secret, computed on the Edwards form of
//! Curve25519.
//!
//! Why not `x25519_dalek`'s `diffie_hellman`: it runs the Montgomery ladder on
//! curve25519-dalek's serial field arithmetic, whatever the CPU. curve25519-dalek's
//! constant-time variable-base Edwards multiplication runs on its AVX2 or AVX-512 IFMA
//! backend where the CPU has one (chosen at run time; `.cargo/config.toml` builds the
//! IFMA one too). The same product costs about half the ladder's time with IFMA and a
//! quarter less with AVX2 (docs/PERFORMANCE.md, run 36), and a handshake does one per side.
//!
//! The result is RFC 7748's, byte for byte: for the peer's u, take the Edwards point P the
//! birational map gives, compute [c]P for the clamped scalar c, and map back to u. Since
//! c is a multiple of 8, [c]P = [8]([c/8]P), and c/8 < 2^252 < l, so the scalar is exact
//! and any torsion part of P (a hostile peer's small-order point) is handled as the ladder
//! handles it. Which of P and -P the map picks does not matter: [c](-P) = -[c]P has the
//! same u.
//! A u with no point on the curve (on the twist, or u = -1) takes the ladder instead:
//! only a broken or hostile peer sends one, the branch depends only on that public value,
//! and the ladder gives the RFC's answer for it. The tests compare both ways over random
//! keys, random u (on the curve and on the twist), every small-order u and non-canonical
//! encodings.

use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use zeroize::{Zeroize, Zeroizing};

/// X25519(`secret`, `public`): the u-coordinate of [clamp(secret)]·u, as RFC 7748 defines
/// it (all zeros for a small-order `public`; the caller rejects that).
pub fn x25519(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
    let Some(point) = MontgomeryPoint(*public).to_edwards(0) else {
        return MontgomeryPoint(*public).mul_clamped(*secret).to_bytes();
    };
    let clamped = Zeroizing::new(clamp_integer(*secret));
    // c / 8, a right shift by three of the little-endian integer.
    let mut eighth = Zeroizing::new([0u8; 32]);
    for i in 0..32 {
        let high = clamped.get(i + 1).map_or(0, |b| b << 5);
        eighth[i] = (clamped[i] >> 3) | high;
    }
    // Below 2^252 < l: `from_bytes_mod_order` reduces nothing.
    let mut scalar = Scalar::from_bytes_mod_order(*eighth);
    let mut product = (point * scalar).mul_by_cofactor();
    let shared = product.to_montgomery().to_bytes();
    // What depends on the secret is wiped; the peer's point is public.
    scalar.zeroize();
    product.zeroize();
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
        let s = x25519_dalek::StaticSecret::from(*secret);
        *s.diffie_hellman(&x25519_dalek::PublicKey::from(*public))
            .as_bytes()
    }

    fn random32() -> [u8; 32] {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).unwrap();
        b
    }

    fn le(hex: &str) -> [u8; 32] {
        hex::decode(hex).unwrap().try_into().unwrap()
    }

    /// RFC 7748 section 5.2's two test vectors, and section 6.1's key agreement.
    #[test]
    fn rfc7748_vectors() {
        let cases = [
            (
                "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
                "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
                "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
            ),
            (
                "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
                "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
                "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
            ),
            (
                "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
                "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
            ),
        ];
        for (k, u, out) in cases {
            assert_eq!(x25519(&le(k), &le(u)), le(out), "k = {k}");
            assert_eq!(ladder(&le(k), &le(u)), le(out), "k = {k}");
        }
    }

    /// Honest peers: a real public key from the other side, both ways agree.
    #[test]
    fn agrees_with_the_ladder_on_real_keys() {
        for _ in 0..300 {
            let (a, b) = (random32(), random32());
            let pb =
                *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(b)).as_bytes();
            assert_eq!(x25519(&a, &pb), ladder(&a, &pb));
        }
    }

    /// Anything a peer could send: random 32 bytes (half of them on the twist, some with the
    /// top bit set, some non-canonical), the small-order points in every encoding, p - 1.
    #[test]
    fn agrees_with_the_ladder_on_hostile_values() {
        let mut on_curve = 0;
        for _ in 0..600 {
            let (a, u) = (random32(), random32());
            if MontgomeryPoint(u).to_edwards(0).is_some() {
                on_curve += 1;
            }
            assert_eq!(x25519(&a, &u), ladder(&a, &u), "u = {}", hex::encode(u));
        }
        // Both branches were taken.
        assert!(
            (150..450).contains(&on_curve),
            "{on_curve} of 600 on the curve"
        );

        // u a hostile peer might send (libsodium's blocklist): the small-order points 0, 1
        // and the two of order 8; p - 1 (u = -1, on the twist); p and p + 1 (0 and 1, not
        // reduced); the two of order 8 plus p, which sets bit 255; 2^256 - 39, -38, -37.
        // RFC 7748 ignores bit 255, so each is also tried with it set.
        let small = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "cdeb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
            "4c9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
            "d9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ];
        for u in small {
            let u = le(u);
            for _ in 0..20 {
                let a = random32();
                assert_eq!(x25519(&a, &u), ladder(&a, &u), "u = {}", hex::encode(u));
            }
            let mut high = u;
            high[31] |= 0x80;
            let a = random32();
            assert_eq!(x25519(&a, &high), ladder(&a, &high));
        }
        // A small-order u, in any encoding, gives all zeros, which the handshake rejects.
        for i in [0, 1, 2, 3, 5, 6] {
            assert_eq!(
                x25519(&random32(), &le(small[i])),
                [0u8; 32],
                "{}",
                small[i]
            );
        }
    }
}
