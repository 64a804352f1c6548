//! Certificates found in DNS (OPENPGPKEY, RFC 7929): checked for `mail@<domain>` like a
//! partner certificate in the keyring, but held in memory for one call, never imported.

use super::*;

/// A partner certificate from an OPENPGPKEY record, valid for `mail@<domain>`.
pub struct DiscoveredCert {
    entry: Entry,
    domain: String,
}

impl fmt::Debug for DiscoveredCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveredCert")
            .field("fingerprint", &self.entry.fpr)
            .field("domain", &self.domain)
            .finish()
    }
}

impl DiscoveredCert {
    /// Parse the RDATA of an OPENPGPKEY record (a binary transferable public key) and
    /// check it now for `mail@<domain>`: a valid, unrevoked, unexpired certificate with
    /// that exact user ID and a signing key. Secret key material is dropped.
    pub fn parse(bytes: &[u8], domain: &str) -> Result<DiscoveredCert, KeyringError> {
        let domain = normalize_domain(domain)?;
        let cert = Cert::from_bytes(bytes)
            .map_err(|e| invalid("the OPENPGPKEY record", e))?
            .strip_secret_key_material();
        let t = now();
        let entry = build_entry(cert, t);
        entry.check(&domain, t)?;
        if entry.verifiers.is_empty() {
            return Err(KeyringError::InvalidCert {
                what: format!("certificate {}", entry.fpr),
                reason: "it has no valid signing-capable key".into(),
            });
        }
        Ok(DiscoveredCert { entry, domain })
    }

    /// Uppercase hex fingerprint of the primary key.
    pub fn fingerprint(&self) -> &str {
        &self.entry.fpr
    }

    /// All user IDs (printable).
    pub fn user_ids(&self) -> &[String] {
        &self.entry.user_ids
    }

    /// The certificate, binary (what is stored to check the next change against).
    pub fn to_bytes(&self) -> Result<Vec<u8>, KeyringError> {
        self.entry.cert.to_vec().map_err(KeyringError::crypto)
    }

    /// Verify a detached signature by this certificate; `fingerprint` (hex) is the one
    /// the call announced and must be this certificate's.
    pub fn verify_detached(
        &self,
        fingerprint: &str,
        data: &[u8],
        sig: &[u8],
    ) -> Result<(), KeyringError> {
        let fpr = normalize_fingerprint(fingerprint)?;
        if fpr != self.entry.fpr {
            return Err(KeyringError::UnknownFingerprint {
                fingerprint: fpr,
                domain: self.domain.clone(),
            });
        }
        let t = now();
        self.entry.check(&self.domain, t)?;
        self.entry.verify_detached(data, sig, t)
    }

    /// Whether `old` (the key pinned before) certified this certificate's `mail@<domain>`
    /// user ID: a third-party certification by `old`'s primary key that verifies. This is
    /// how a partner announces a new key in DNS that its old one vouches for.
    pub fn certified_by(&self, old: &Cert) -> bool {
        let signer = old.primary_key().key();
        let pk = self.entry.cert.primary_key().key();
        let want = format!("{LOCAL_PART}{}", self.domain);
        self.entry.cert.userids().any(|ua| {
            ua.userid().value().eq_ignore_ascii_case(want.as_bytes())
                && ua.certifications().any(|sig| {
                    sig.get_issuers()
                        .iter()
                        .any(|h| h.aliases(signer.key_handle()))
                        && sig
                            .clone()
                            .verify_userid_binding(signer, pk, ua.userid())
                            .is_ok()
                })
        })
    }

    /// Parse bytes stored earlier by [`DiscoveredCert::to_bytes`] as a bare certificate
    /// (for [`DiscoveredCert::certified_by`]; no validity checks).
    pub fn stored(bytes: &[u8]) -> Result<Cert, KeyringError> {
        Cert::from_bytes(bytes).map_err(|e| invalid("the stored certificate", e))
    }
}

impl Keyring {
    /// The own certificate, binary, without secret key material: the RDATA of the
    /// OPENPGPKEY record `sipmail keys publish` prints. Every older own key still in the
    /// keyring (a rotation's predecessor, `keys generate --rotate`) certifies its
    /// `mail@<domain>` user IDs, so that relays that pinned the old key from DNS take the
    /// new one (`trust = "dnssec"`). A revoked or unusable old key certifies nothing.
    pub fn export_public_binary(&self) -> Result<Vec<u8>, KeyringError> {
        let own = self.own()?;
        let mut cert = own.entry.cert.clone().strip_secret_key_material();
        for old in self.predecessors(own) {
            let tsk = self.own_tsk(&old.entry.fpr)?;
            for d in &own.entry.domains {
                cert = certify(&tsk, cert, d)?;
            }
        }
        cert.to_vec().map_err(KeyringError::crypto)
    }

    /// The fingerprints of the own keys that certify the published one (see
    /// [`export_public_binary`](Self::export_public_binary)).
    pub fn predecessor_fingerprints(&self) -> Result<Vec<String>, KeyringError> {
        let own = self.own()?;
        Ok(self
            .predecessors(own)
            .map(|o| o.entry.fpr.clone())
            .collect())
    }

    /// The own key `fpr` with its secret key material, read from its file (the keyring
    /// keeps only the signing key pair unlocked; a certification needs the primary key).
    fn own_tsk(&self, fpr: &str) -> Result<Cert, KeyringError> {
        for path in super::load::own_key_files(&self.dir)? {
            let cert = super::load::load_cert_file(&path)?;
            if fpr_hex(&cert.fingerprint()) == fpr {
                return Ok(cert);
            }
        }
        Err(KeyringError::NoSigningKey {
            fingerprint: fpr.to_string(),
            reason: "its secret key file is gone from the keyring".into(),
        })
    }

    fn predecessors<'a>(&'a self, own: &'a OwnKey) -> impl Iterator<Item = &'a OwnKey> {
        self.own_other.iter().filter(move |o| {
            o.entry.created < own.entry.created
                && o.entry.revoked.is_none()
                && o.entry.invalid.is_none()
        })
    }

    /// Certify `mail@<domain>` of `new` (a certificate, armored or binary) with the key
    /// that signs, and return the certificate with that certification, binary (for a new
    /// key made in another keyring; `keys publish` does it for a rotation in place).
    pub fn certify_successor(&self, new: &[u8], domain: &str) -> Result<Vec<u8>, KeyringError> {
        let domain = normalize_domain(domain)?;
        let own = self.own()?;
        let cert = Cert::from_bytes(new)
            .map_err(|e| invalid("the new certificate", e))?
            .strip_secret_key_material();
        certify(&self.own_tsk(&own.entry.fpr)?, cert, &domain)?
            .to_vec()
            .map_err(KeyringError::crypto)
    }
}

/// `cert` with its `mail@<domain>` user ID certified by `by`'s primary key (`by` holds
/// the secret key: an own key).
fn certify(by: &Cert, cert: Cert, domain: &str) -> Result<Cert, KeyringError> {
    let mut signer = by
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .and_then(|k| k.into_keypair())
        .map_err(KeyringError::crypto)?;
    let want = format!("{LOCAL_PART}{domain}");
    let uid = cert
        .userids()
        .find(|u| u.userid().value().eq_ignore_ascii_case(want.as_bytes()))
        .map(|u| u.userid().clone())
        .ok_or_else(|| KeyringError::WrongIdentity {
            fingerprint: fpr_hex(&cert.fingerprint()),
            domain: domain.to_string(),
            user_ids: cert
                .userids()
                .map(|u| printable(u.userid().value()))
                .collect(),
        })?;
    let sig = uid
        .certify(
            &mut signer,
            &cert,
            SignatureType::GenericCertification,
            None,
            None,
        )
        .map_err(KeyringError::crypto)?;
    let (cert, _) = cert.insert_packets(sig).map_err(KeyringError::crypto)?;
    Ok(cert)
}
