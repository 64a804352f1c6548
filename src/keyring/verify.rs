//! Signing with the own key and verifying partners' signatures (by certificate, or by a
//! bare key packet for opportunistic trust): the per-call work.

use super::*;

impl Keyring {
    /// Makes a detached binary signature (`SignatureType::Binary`)
    /// over `data` with the own key's signing-capable (sub)key.
    pub fn sign_detached(&self, data: &[u8]) -> Result<Vec<u8>, KeyringError> {
        let signer = self.own_signer()?;
        let t = now();
        if let Some(exp) = signer.expires
            && t >= exp
        {
            return Err(KeyringError::Expired {
                fingerprint: signer.fpr.clone(),
                expired_at: fmt_time(exp),
            });
        }
        let builder = SignatureBuilder::new(SignatureType::Binary);
        let sig = match &signer.fast {
            // An Ed25519 key expanded once (see `fastsign`).
            Some(fast) => builder.sign_message(&mut fast.signer(), data),
            // `Signer::sign` wants `&mut`; a clone of the key pair keeps `&self`
            // usable from many threads without a lock.
            None => builder.sign_message(&mut signer.keypair.clone(), data),
        }
        .map_err(KeyringError::crypto)?;
        Packet::from(sig).to_vec().map_err(KeyringError::crypto)
    }

    /// The certificate with primary fingerprint `fingerprint` (hex, case
    /// and spaces ignored) if it is currently valid for `mail@<domain>`.
    ///
    /// Both partner certificates and the own certificate are searched;
    /// the own certificate only matches the own domain(s).
    pub fn peer_cert(&self, domain: &str, fingerprint: &str) -> Result<&Cert, KeyringError> {
        Ok(&self.checked_entry(domain, fingerprint, now())?.cert)
    }

    /// That certificate (see [`Keyring::peer_cert`]), ASCII-armored: what an auditor
    /// imports into GnuPG to check a partner's receipts or call records.
    pub fn export_peer_cert(
        &self,
        domain: &str,
        fingerprint: &str,
    ) -> Result<String, KeyringError> {
        use sequoia_openpgp::serialize::SerializeInto;
        let bytes = self
            .peer_cert(domain, fingerprint)?
            .armored()
            .to_vec()
            .map_err(KeyringError::crypto)?;
        String::from_utf8(bytes).map_err(KeyringError::crypto)
    }

    /// Whether at least one certificate is currently usable to verify
    /// signatures from `mail@<domain>`.
    pub fn has_peer(&self, domain: &str) -> bool {
        let Ok(domain) = normalize_domain(domain) else {
            return false;
        };
        let t = now();
        self.own
            .iter()
            .chain(self.own_other.iter())
            .map(|o| &o.entry)
            .chain(self.peers.iter())
            .filter(|e| e.domains.contains(&domain) && self.listed(&domain, &e.fpr))
            .any(|e| e.check(&domain, t).is_ok() && e.verifiers.iter().any(|k| k.alive(t)))
    }

    /// Verifies a detached signature over `data` made by a valid
    /// signing-capable key of the certificate `fingerprint`, which must
    /// be valid for `mail@<domain>` (see [`Keyring::peer_cert`]).
    ///
    /// Certificate problems give the errors of `peer_cert`; any problem
    /// with the signature itself gives `BadSignature`.
    pub fn verify_detached(
        &self,
        domain: &str,
        fingerprint: &str,
        data: &[u8],
        sig: &[u8],
    ) -> Result<(), KeyringError> {
        let t = now();
        let entry = self.checked_entry(domain, fingerprint, t)?;
        entry.verify_detached(data, sig, t)
    }

    /// The key that [`Keyring::sign_detached`] signs with, as a serialized OpenPGP public key
    /// packet, and its fingerprint (uppercase hex). Opportunistic calls present this packet
    /// so that a peer without our certificate can verify (and pin) the key.
    pub fn own_signing_key(&self) -> Result<(String, Vec<u8>), KeyringError> {
        let signer = self.own_signer()?;
        let key = signer.keypair.public().clone();
        let fpr = fpr_hex(&key.fingerprint());
        let packet = Packet::PublicKey(key.role_into_primary())
            .to_vec()
            .map_err(KeyringError::crypto)?;
        Ok((fpr, packet))
    }

    pub(super) fn own(&self) -> Result<&OwnKey, KeyringError> {
        self.own.as_ref().ok_or_else(|| KeyringError::NoOwnKey {
            dir: self.dir.clone(),
        })
    }

    /// The own key's signing-capable (sub)key, or why there is none.
    pub(super) fn own_signer(&self) -> Result<&OwnSigner, KeyringError> {
        let own = self.own()?;
        own.signer
            .as_ref()
            .map_err(|reason| KeyringError::NoSigningKey {
                fingerprint: own.entry.fpr.clone(),
                reason: reason.clone(),
            })
    }

    pub(super) fn checked_entry(
        &self,
        domain: &str,
        fingerprint: &str,
        t: SystemTime,
    ) -> Result<&Entry, KeyringError> {
        let domain = normalize_domain(domain)?;
        let fpr = normalize_fingerprint(fingerprint)?;
        let own = self
            .own
            .iter()
            .chain(self.own_other.iter())
            .find(|o| o.entry.fpr == fpr);
        let entry = match own {
            Some(o) => &o.entry,
            None => self
                .by_fpr
                .get(&fpr)
                .and_then(|&i| self.peers.get(i))
                .ok_or_else(|| KeyringError::UnknownFingerprint {
                    fingerprint: fpr.clone(),
                    domain: domain.clone(),
                })?,
        };
        if !self.listed(&domain, &fpr) {
            return Err(KeyringError::NotListedForPeer {
                fingerprint: fpr,
                domain,
            });
        }
        entry.check(&domain, t)?;
        Ok(entry)
    }

    /// Whether `fpr` may speak for `domain` under `[[peer]] fingerprints` (no list: any).
    pub(super) fn listed(&self, domain: &str, fpr: &str) -> bool {
        self.allowed
            .get(domain)
            .is_none_or(|l| l.iter().any(|f| f == fpr))
    }
}

/// Verifies a detached binary signature over `data` with a bare public key packet that a
/// peer presented (opportunistic trust: no certificate, no user ID, no keyring). The
/// packet's fingerprint must be `fingerprint` (hex); the signature gets the same checks as
/// in [`Keyring::verify_detached`] (type, policy, creation time, digest prefix).
/// The fingerprint (upper-case hex) of a presented public key packet that can sign: the
/// cheap check, before any state is touched, that an opportunistic peer presented a key
/// at all and that it is the one it announced.
pub fn key_packet_fingerprint(packet: &[u8]) -> Result<String, KeyringError> {
    let bad = |reason: String| KeyringError::BadSignature {
        fingerprint: "-".into(),
        reason,
    };
    if packet.is_empty() {
        return Err(bad("no key presented (a=sipmail-pubkey)".into()));
    }
    let key: Key<PublicParts, UnspecifiedRole> = match Packet::from_bytes(packet) {
        Ok(Packet::PublicKey(k)) => k.role_into_unspecified(),
        Ok(Packet::PublicSubkey(k)) => k.role_into_unspecified(),
        Ok(p) => {
            return Err(bad(format!(
                "presented a {} packet, not a public key",
                p.tag()
            )));
        }
        Err(e) => return Err(bad(format!("the presented key does not parse: {e:#}"))),
    };
    if !key.pk_algo().for_signing() {
        return Err(bad(format!("{} cannot sign", key.pk_algo())));
    }
    Ok(fpr_hex(&key.fingerprint()))
}

pub fn verify_with_key_packet(
    packet: &[u8],
    fingerprint: &str,
    data: &[u8],
    sig: &[u8],
) -> Result<(), KeyringError> {
    let fpr = normalize_fingerprint(fingerprint)?;
    let bad = |reason: String| KeyringError::BadSignature {
        fingerprint: fpr.clone(),
        reason,
    };
    let key: Key<PublicParts, UnspecifiedRole> = match Packet::from_bytes(packet) {
        Ok(Packet::PublicKey(k)) => k.role_into_unspecified(),
        Ok(Packet::PublicSubkey(k)) => k.role_into_unspecified(),
        Ok(p) => {
            return Err(bad(format!(
                "presented a {} packet, not a public key",
                p.tag()
            )));
        }
        Err(e) => return Err(bad(format!("the presented key does not parse: {e:#}"))),
    };
    if fpr_hex(&key.fingerprint()) != fpr {
        return Err(bad(format!(
            "the presented key is {}, not the announced fingerprint",
            fpr_hex(&key.fingerprint())
        )));
    }
    if !key.pk_algo().for_signing() {
        return Err(bad(format!("{} cannot sign", key.pk_algo())));
    }
    let t = now();
    let (sig, sig_time) = checked_signature(sig, t).map_err(bad)?;
    if sig_time < key.creation_time() {
        return Err(bad("signature predates the key".into()));
    }
    if key.creation_time() > t + CLOCK_SKEW {
        return Err(bad("the presented key was created in the future".into()));
    }
    let fast = super::fastverify::FastVerify::new(&key);
    verify_with_key(&sig, &key, fast.as_ref(), data).map_err(bad)
}

/// A detached signature, parsed and checked for what does not depend on the key: a
/// binary-document signature, allowed by the policy, alive at `t`, with a creation time.
pub(super) fn checked_signature(
    sig: &[u8],
    t: SystemTime,
) -> Result<(Signature, SystemTime), String> {
    let sig = parse_signature(sig)?;
    if sig.typ() != SignatureType::Binary {
        return Err(format!(
            "signature type is {}, expected a binary document signature",
            sig.typ()
        ));
    }
    POLICY
        .signature(&sig, HashAlgoSecurity::CollisionResistance)
        .map_err(|e| format!("rejected by policy: {}", error::why(e)))?;
    sig.signature_alive(t, None)
        .map_err(|e| format!("signature not alive: {}", error::why(e)))?;
    let created = sig
        .signature_creation_time()
        .ok_or("signature has no creation time")?;
    Ok((sig, created))
}

/// `sig` over `data` verifies with `key`, digest prefix included: Sequoia does not check
/// the two-byte prefix (only a quick filter in RFC 9580); we do, so that no bit of the
/// packet is malleable.
pub(super) fn verify_with_key(
    sig: &Signature,
    key: &Key<PublicParts, UnspecifiedRole>,
    fast: Option<&super::fastverify::FastVerify>,
    data: &[u8],
) -> Result<(), String> {
    if let Some(f) = fast {
        return f.verify(sig, key, data);
    }
    match sig.verify_message(key, data) {
        Ok(())
            if sig
                .computed_digest()
                .is_some_and(|d| d.get(..2) == Some(&sig.digest_prefix()[..])) =>
        {
            Ok(())
        }
        Ok(()) => Err("the digest prefix does not match the signed data".into()),
        Err(e) => Err(format!("does not verify: {}", error::why(e))),
    }
}

impl VerifyKey {
    pub(super) fn alive(&self, t: SystemTime) -> bool {
        self.created <= t + CLOCK_SKEW && self.expires.is_none_or(|e| t < e)
    }
}

/// Tolerance for creation times slightly in the future (clock skew
/// between the two sites).
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(300);

impl Entry {
    /// Verifies a detached signature over `data` by one of this certificate's valid
    /// signing-capable keys at time `t` (the certificate itself already checked).
    pub(super) fn verify_detached(
        &self,
        data: &[u8],
        sig: &[u8],
        t: SystemTime,
    ) -> Result<(), KeyringError> {
        let bad = |reason: String| KeyringError::BadSignature {
            fingerprint: self.fpr.clone(),
            reason,
        };

        let (sig, sig_time) = checked_signature(sig, t).map_err(bad)?;

        let issuers = sig.get_issuers();
        let mut reason = if self.verifiers.is_empty() {
            "the certificate has no valid signing-capable key".to_string()
        } else {
            "made by a key that is not a signing key of this certificate".to_string()
        };
        for k in &self.verifiers {
            let named = issuers.is_empty()
                || issuers.iter().any(|h| match h {
                    openpgp::KeyHandle::Fingerprint(f) => *f == k.fpr,
                    openpgp::KeyHandle::KeyID(id) => *id == k.keyid,
                });
            if !named {
                continue;
            }
            if !k.alive(t) {
                reason = format!(
                    "signing key {} is expired or not yet valid",
                    fpr_hex(&k.fpr)
                );
                continue;
            }
            if sig_time < k.created {
                reason = format!("signature predates signing key {}", fpr_hex(&k.fpr));
                continue;
            }
            match verify_with_key(&sig, &k.key, k.fast.as_ref(), data) {
                Ok(()) => return Ok(()),
                Err(why) => reason = why,
            }
        }
        Err(bad(reason))
    }
}
