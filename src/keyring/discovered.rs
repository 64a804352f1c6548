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
    /// OPENPGPKEY record `sipmail keys publish` prints.
    pub fn export_public_binary(&self) -> Result<Vec<u8>, KeyringError> {
        let own = self.own()?;
        own.entry
            .cert
            .clone()
            .strip_secret_key_material()
            .to_vec()
            .map_err(KeyringError::crypto)
    }

    /// Certify `mail@<domain>` of `new` (a certificate, armored or binary) with our own
    /// key, and return the certificate with that certification, binary: what a site
    /// publishes when it rotates the key in its OPENPGPKEY record, so that relays that
    /// pinned the old key accept the new one (`trust = "dnssec"`).
    pub fn certify_successor(&self, new: &[u8], domain: &str) -> Result<Vec<u8>, KeyringError> {
        let domain = normalize_domain(domain)?;
        let mut signer = self.own_certifier()?;
        let cert = Cert::from_bytes(new)
            .map_err(|e| invalid("the new certificate", e))?
            .strip_secret_key_material();
        let want = format!("{LOCAL_PART}{domain}");
        let uid = cert
            .userids()
            .find(|u| u.userid().value().eq_ignore_ascii_case(want.as_bytes()))
            .map(|u| u.userid().clone())
            .ok_or_else(|| KeyringError::WrongIdentity {
                fingerprint: fpr_hex(&cert.fingerprint()),
                domain: domain.clone(),
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
        cert.to_vec().map_err(KeyringError::crypto)
    }

    /// A key pair of the own primary key (which certifies).
    fn own_certifier(&self) -> Result<KeyPair, KeyringError> {
        let own = self.own()?;
        let secret = std::fs::read(self.dir.join(SECRET_FILE))
            .map_err(|e| KeyringError::io("cannot read", self.dir.join(SECRET_FILE), e))?;
        let tsk = Cert::from_bytes(&secret).map_err(|e| invalid(SECRET_FILE, e))?;
        if tsk.fingerprint().to_hex() != own.entry.fpr {
            return Err(KeyringError::NoSigningKey {
                fingerprint: own.entry.fpr.clone(),
                reason: format!("{SECRET_FILE} is not the key that signs"),
            });
        }
        tsk.primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .and_then(|k| k.into_keypair())
            .map_err(KeyringError::crypto)
    }
}
