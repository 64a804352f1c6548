//! Making a relay's own key: `sipmail keys generate` (first key and rotation).

use super::*;

impl Keyring {
    /// Creates `dir` (mode 0700) and a new own key in `dir/secret.asc`.
    ///
    /// The key is a v4 Ed25519 primary key that can certify and sign,
    /// with the single user ID `mail@<domain>`, no passphrase and no
    /// expiry. The file is written atomically with mode 0600; an
    /// existing own key is never overwritten. A revocation certificate
    /// is stored in `dir/revocation-<FINGERPRINT>.asc` (mode 0600).
    pub fn generate(dir: &Path, domain: &str) -> Result<KeyInfo, KeyringError> {
        let secret_path = dir.join(SECRET_FILE);
        if secret_path.exists() {
            let existing = load_cert_file(&secret_path)
                .map(|c| fpr_hex(&c.fingerprint()))
                .unwrap_or_else(|_| "(unreadable)".into());
            return Err(KeyringError::OwnKeyExists {
                path: secret_path,
                existing,
                new: "a newly generated key".into(),
            });
        }
        Self::generate_into(dir, domain, |_| secret_path.clone())
    }

    /// Key rotation: a new own key beside the existing one(s), in
    /// `dir/secret-<FINGERPRINT>.asc`. Nothing existing is touched. Being the newest, it
    /// signs from the next [`Keyring::open`] on, unless the relay's config names another
    /// (`relay.signing_key`).
    pub fn generate_additional(dir: &Path, domain: &str) -> Result<KeyInfo, KeyringError> {
        Self::generate_into(dir, domain, |fpr| {
            dir.join(format!("{OWN_EXTRA_PREFIX}{fpr}.asc"))
        })
    }

    pub(super) fn generate_into(
        dir: &Path,
        domain: &str,
        path_for: impl Fn(&str) -> PathBuf,
    ) -> Result<KeyInfo, KeyringError> {
        let domain = normalize_domain(domain)?;
        fsutil::ensure_private_dir(dir)?;

        let (cert, revocation) = CertBuilder::new()
            .set_profile(Profile::RFC4880)
            .map_err(KeyringError::crypto)?
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
            .set_validity_period(None)
            .set_password(None)
            .add_userid(format!("{LOCAL_PART}{domain}"))
            .generate()
            .map_err(KeyringError::crypto)?;

        let armored = cert
            .as_tsk()
            .armored()
            .to_vec()
            .map_err(KeyringError::crypto)?;
        let secret_path = path_for(&fpr_hex(&cert.fingerprint()));
        fsutil::write_atomic(&secret_path, &armored, true)?;

        let rev_path = dir.join(format!(
            "{REVOCATION_PREFIX}{}.asc",
            fpr_hex(&cert.fingerprint())
        ));
        match Packet::from(revocation)
            .to_vec()
            .and_then(|b| armor_bytes(&b, openpgp::armor::Kind::Signature))
        {
            Ok(bytes) => {
                if let Err(e) = fsutil::write_atomic(&rev_path, &bytes, true) {
                    tracing::warn!("could not store the revocation certificate: {e}");
                }
            }
            Err(e) => tracing::warn!("could not serialize the revocation certificate: {e}"),
        }

        let own = build_own(cert, now());
        let info = own.info();
        tracing::info!(
            fingerprint = %info.fingerprint,
            file = %secret_path.display(),
            "generated own key for mail@{domain}"
        );
        Ok(info)
    }
}
