//! Opening a keyring directory: reading the files, evaluating every certificate against
//! the policy once, and the peer bindings (`certs/<FPR>.peer`).

use super::*;

impl Keyring {
    /// Loads `dir/secret.asc` (if present) and every `dir/certs/*.asc`.
    ///
    /// Any unreadable or unparsable file is an error naming that file.
    pub fn open(dir: &Path) -> Result<Keyring, KeyringError> {
        if !dir.is_dir() {
            return Err(KeyringError::DirMissing {
                dir: dir.to_path_buf(),
            });
        }
        let t = now();
        let mut owns: Vec<(OwnKey, SystemTime)> = Vec::new();
        for secret_path in own_key_files(dir)? {
            fsutil::warn_if_not_private(&secret_path);
            let cert = load_cert_file(&secret_path)?;
            if !cert.is_tsk() {
                return Err(KeyringError::InvalidCert {
                    what: secret_path.display().to_string(),
                    reason: "it contains no secret key material".into(),
                });
            }
            let own = build_own(cert, t);
            if let Err(reason) = &own.signer {
                tracing::warn!(fingerprint = %own.entry.fpr, "own key cannot sign: {reason}");
            }
            if owns.iter().any(|(o, _)| o.entry.fpr == own.entry.fpr) {
                continue;
            }
            let mtime = std::fs::metadata(&secret_path)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            owns.push((own, mtime));
        }
        // The newest key that can sign signs (ties, within the second of OpenPGP
        // timestamps, go to the file written last).
        owns.sort_by_key(|(o, mtime)| (o.signer.is_ok(), o.entry.created, *mtime));
        let own = owns.pop().map(|(o, _)| o);
        let own_other: Vec<OwnKey> = owns.into_iter().rev().map(|(o, _)| o).collect();
        let own_fprs: Vec<String> = own
            .iter()
            .chain(own_other.iter())
            .map(|o| o.entry.fpr.clone())
            .collect();

        let mut certs: Vec<Cert> = Vec::new();
        let mut by_fpr: HashMap<String, usize> = HashMap::new();
        for path in list_cert_files(&dir.join(CERTS_DIR))? {
            let mut cert = load_cert_file(&path)?;
            let fpr = fpr_hex(&cert.fingerprint());
            if cert.is_tsk() {
                tracing::warn!(
                    file = %path.display(),
                    "partner certificate file contains secret key material; ignoring the secrets"
                );
                cert = cert.strip_secret_key_material();
            }
            if own_fprs.contains(&fpr) {
                tracing::warn!(
                    file = %path.display(),
                    "partner certificate file holds the own key's certificate; ignored"
                );
                continue;
            }
            let stem = path.file_stem().map(|s| s.to_string_lossy().to_uppercase());
            if stem.as_deref() != Some(fpr.as_str()) {
                tracing::warn!(file = %path.display(), fingerprint = %fpr,
                    "file name does not match the certificate's fingerprint");
            }
            match by_fpr.get(&fpr) {
                Some(&i) => {
                    let old = std::mem::replace(&mut certs[i], cert.clone());
                    certs[i] = old
                        .merge_public(cert)
                        .map_err(|e| KeyringError::InvalidCert {
                            what: path.display().to_string(),
                            reason: error::why(e),
                        })?;
                }
                None => {
                    by_fpr.insert(fpr, certs.len());
                    certs.push(cert);
                }
            }
        }
        let mut peers: Vec<Entry> = certs.into_iter().map(|c| build_entry(c, t)).collect();
        let mut ambiguous = Vec::new();
        for p in &mut peers {
            let certs_dir = dir.join(CERTS_DIR);
            match read_binding(&certs_dir, &p.fpr)? {
                Some(bound) => {
                    if !p.domains.contains(&bound) {
                        tracing::warn!(fingerprint = %p.fpr, peer = %bound,
                            "partner certificate is bound to a domain it has no valid user ID for; it counts for none");
                    }
                    p.domains.retain(|d| *d == bound);
                }
                None => {
                    let claimed = claimed_domains(&p.cert);
                    if claimed.len() > 1 {
                        // Which partner it belongs to is the operator's call, not ours.
                        p.domains.clear();
                        ambiguous.push(Ambiguous {
                            file: certs_dir.join(format!("{}.asc", p.fpr)),
                            fpr: p.fpr.clone(),
                            domains: claimed,
                        });
                    }
                }
            }
        }

        tracing::debug!(
            dir = %dir.display(),
            own = ?own_fprs,
            peers = peers.len(),
            "keyring opened"
        );
        Ok(Keyring {
            dir: dir.to_path_buf(),
            own,
            own_other,
            peers,
            by_fpr,
            ambiguous,
            allowed: HashMap::new(),
        })
    }

    /// An error naming the first partner certificate that names several domains and was
    /// never bound to one (it counts for none until it is): the relay refuses to start.
    pub fn check_bindings(&self) -> Result<(), KeyringError> {
        match self.ambiguous.first() {
            None => Ok(()),
            Some(a) => Err(KeyringError::AmbiguousCertFile {
                file: a.file.clone(),
                dir: self.dir.clone(),
                fingerprint: a.fpr.clone(),
                domains: a.domains.clone(),
            }),
        }
    }

    /// Only the certificates `fingerprints` (hex) count for `domain` from now on
    /// (`[[peer]] fingerprints = [...]`).
    pub fn restrict_peer(
        &mut self,
        domain: &str,
        fingerprints: &[String],
    ) -> Result<(), KeyringError> {
        let domain = normalize_domain(domain)?;
        let fprs = fingerprints
            .iter()
            .map(|f| normalize_fingerprint(f))
            .collect::<Result<Vec<_>, _>>()?;
        self.allowed.insert(domain, fprs);
        Ok(())
    }

    /// The domain a partner certificate in `dir` is bound to, if any.
    pub fn peer_binding(dir: &Path, fingerprint: &str) -> Result<Option<String>, KeyringError> {
        read_binding(&dir.join(CERTS_DIR), &normalize_fingerprint(fingerprint)?)
    }
}

/// The domains of every user ID of the form `mail@<domain>`, valid or not: what the
/// certificate claims, the question being whether it claims more than one partner.
pub(super) fn claimed_domains(cert: &Cert) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for u in cert.userids() {
        if let Some(d) = uid_domain(u.userid().value())
            && !v.contains(&d)
        {
            v.push(d);
        }
    }
    v.sort();
    v
}

pub(super) fn binding_path(certs_dir: &Path, fpr: &str) -> PathBuf {
    certs_dir.join(format!("{fpr}.{BINDING_EXT}"))
}

/// The domain in `certs/<FPR>.peer`, if that file exists.
pub(super) fn read_binding(certs_dir: &Path, fpr: &str) -> Result<Option<String>, KeyringError> {
    let path = binding_path(certs_dir, fpr);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyringError::io("cannot read", &path, e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    normalize_domain(text.trim())
        .map(Some)
        .map_err(|e| KeyringError::InvalidBinding {
            file: path.clone(),
            reason: e.to_string(),
        })
}

impl Entry {
    /// All per-call checks of a certificate for `domain` at time `t`.
    pub(super) fn check(&self, domain: &str, t: SystemTime) -> Result<(), KeyringError> {
        if let Some(reason) = &self.invalid {
            return Err(KeyringError::InvalidCert {
                what: format!("certificate {}", self.fpr),
                reason: reason.clone(),
            });
        }
        if !self.domains.iter().any(|d| d == domain) {
            return Err(KeyringError::WrongIdentity {
                fingerprint: self.fpr.clone(),
                domain: domain.to_string(),
                user_ids: self.user_ids.clone(),
            });
        }
        if let Some(reason) = &self.revoked {
            return Err(KeyringError::Revoked {
                fingerprint: self.fpr.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(exp) = self.expires
            && t >= exp
        {
            return Err(KeyringError::Expired {
                fingerprint: self.fpr.clone(),
                expired_at: fmt_time(exp),
            });
        }
        if self.created > t + CLOCK_SKEW {
            return Err(KeyringError::NotYetValid {
                fingerprint: self.fpr.clone(),
                valid_from: fmt_time(self.created),
            });
        }
        Ok(())
    }

    pub(super) fn status(&self, t: SystemTime) -> KeyStatus {
        if let Some(r) = &self.invalid {
            KeyStatus::Invalid(r.clone())
        } else if self.revoked.is_some() {
            KeyStatus::Revoked
        } else if self.expires.is_some_and(|e| t >= e) {
            KeyStatus::Expired
        } else if self.created > t + CLOCK_SKEW {
            KeyStatus::NotYetValid
        } else {
            KeyStatus::Valid
        }
    }

    pub(super) fn info(&self, own: bool, can_sign: Option<bool>) -> KeyInfo {
        let t = now();
        KeyInfo {
            fingerprint: self.fpr.clone(),
            user_ids: self.user_ids.clone(),
            own,
            algo: self.algo.clone(),
            expires: self.expires,
            status: self.status(t),
            can_sign: can_sign.unwrap_or_else(|| self.verifiers.iter().any(|k| k.alive(t))),
        }
    }
}

impl OwnKey {
    pub(super) fn info(&self) -> KeyInfo {
        let t = now();
        let can_sign = self
            .signer
            .as_ref()
            .is_ok_and(|s| s.expires.is_none_or(|e| t < e));
        self.entry.info(true, Some(can_sign))
    }
}

/// gpg style algorithm name of a key.
pub(super) fn algo_name<P: openpgp::packet::key::KeyParts, R: openpgp::packet::key::KeyRole>(
    key: &Key<P, R>,
) -> String {
    use openpgp::crypto::mpi::PublicKey as Mpi;
    #[allow(deprecated)]
    match (key.pk_algo(), key.mpis()) {
        (PublicKeyAlgorithm::RSAEncryptSign | PublicKeyAlgorithm::RSASign, m) => {
            format!("rsa{}", m.bits().unwrap_or(0))
        }
        (_, Mpi::EdDSA { curve, .. }) | (_, Mpi::ECDSA { curve, .. }) => match curve {
            Curve::Ed25519 => "ed25519".into(),
            c => format!("{} {c}", key.pk_algo()).to_lowercase(),
        },
        (PublicKeyAlgorithm::Ed25519, _) => "ed25519".into(),
        (PublicKeyAlgorithm::Ed448, _) => "ed448".into(),
        (a, m) => match m.bits() {
            Some(b) => format!("{a} {b}"),
            None => a.to_string(),
        },
    }
}

pub(super) fn revocation_reason(status: &RevocationStatus) -> Option<String> {
    match status {
        RevocationStatus::Revoked(sigs) => {
            let reason = sigs
                .iter()
                .find_map(|s| s.reason_for_revocation())
                .map(|(code, msg)| {
                    let msg = printable(msg);
                    let code = match code {
                        ReasonForRevocation::KeyCompromised => "key compromised".to_string(),
                        ReasonForRevocation::KeySuperseded => "key superseded".to_string(),
                        ReasonForRevocation::KeyRetired => "key retired".to_string(),
                        ReasonForRevocation::Unspecified => "no reason given".to_string(),
                        other => other.to_string(),
                    };
                    if msg.is_empty() {
                        code
                    } else {
                        format!("{code}: {msg}")
                    }
                })
                .unwrap_or_else(|| "no reason given".into());
            Some(reason)
        }
        _ => None,
    }
}

/// Evaluates a certificate once, at time `t`.
pub(super) fn build_entry(cert: Cert, t: SystemTime) -> Entry {
    let fpr = fpr_hex(&cert.fingerprint());
    let user_ids: Vec<String> = cert
        .userids()
        .map(|u| printable(u.userid().value()))
        .collect();
    let primary = cert.primary_key();
    let algo = algo_name(primary.key());
    let created = primary.key().creation_time();

    let mut domains = Vec::new();
    let mut expires = None;
    let mut revoked = None;
    let mut invalid = None;
    let mut verifiers = Vec::new();
    match cert.with_policy(&POLICY, t) {
        Err(e) => invalid = Some(error::why(e)),
        Ok(vc) => {
            revoked = revocation_reason(&vc.revocation_status());
            expires = vc.primary_key().key_expiration_time();
            for u in vc.userids() {
                if matches!(u.revocation_status(), RevocationStatus::Revoked(_)) {
                    continue;
                }
                if let Some(d) = uid_domain(u.userid().value())
                    && !domains.contains(&d)
                {
                    domains.push(d);
                }
            }
            for ka in vc.keys().for_signing() {
                if matches!(ka.revocation_status(), RevocationStatus::Revoked(_)) {
                    continue;
                }
                let key = ka.key().clone().role_into_unspecified();
                let key_exp = ka.key_expiration_time();
                let exp = match (key_exp, expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                verifiers.push(VerifyKey {
                    fast: super::fastverify::FastVerify::new(&key),
                    fpr: key.fingerprint(),
                    keyid: key.keyid(),
                    created: key.creation_time(),
                    expires: exp,
                    key,
                });
            }
        }
    }
    Entry {
        cert,
        fpr,
        user_ids,
        domains,
        algo,
        created,
        expires,
        revoked,
        invalid,
        verifiers,
    }
}

/// Evaluates the own key and unlocks its newest valid signing key.
pub(super) fn build_own(cert: Cert, t: SystemTime) -> OwnKey {
    let signer = own_signer(&cert, t);
    // Only the unlocked signing key pair keeps secret material; the
    // certificate that `peer_cert` may hand out is the public half.
    let entry = build_entry(cert.strip_secret_key_material(), t);
    OwnKey { entry, signer }
}

pub(super) fn own_signer(cert: &Cert, t: SystemTime) -> Result<OwnSigner, String> {
    let vc = cert.with_policy(&POLICY, t).map_err(error::why)?;
    if let RevocationStatus::Revoked(_) = vc.revocation_status() {
        return Err("the key is revoked".into());
    }
    vc.alive().map_err(error::why)?;
    let primary_exp = vc.primary_key().key_expiration_time();
    let mut best: Option<(SystemTime, OwnSigner)> = None;
    let mut saw_encrypted = false;
    let mut saw_signing = false;
    for ka in vc.keys().for_signing().alive().revoked(false) {
        saw_signing = true;
        let key = ka.key();
        match key.optional_secret() {
            None => continue,
            Some(s) if s.is_encrypted() => {
                saw_encrypted = true;
                continue;
            }
            Some(_) => {}
        }
        let Ok(secret_key) = key.clone().parts_into_secret() else {
            continue;
        };
        let keypair = match secret_key.role_into_unspecified().into_keypair() {
            Ok(kp) => kp,
            Err(e) => {
                tracing::warn!(key = %key.fingerprint(), "unusable secret key: {}", error::why(&e));
                continue;
            }
        };
        let created = key.creation_time();
        let exp = match (ka.key_expiration_time(), primary_exp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if best.as_ref().is_none_or(|(c, _)| created > *c) {
            best = Some((
                created,
                OwnSigner {
                    fast: fastsign::FastEd25519::new(&keypair),
                    keypair,
                    fpr: fpr_hex(&cert.fingerprint()),
                    expires: exp,
                },
            ));
        }
    }
    match best {
        Some((_, s)) => Ok(s),
        None if saw_encrypted => Err(ENCRYPTED_MARKER.into()),
        None if saw_signing => Err(
            "no secret key material for its signing-capable key (only a stub was exported?): \
             export the secret key including the signing subkey"
                .into(),
        ),
        None => Err("it has no valid, unexpired, unrevoked signing-capable key".into()),
    }
}

pub(super) const ENCRYPTED_MARKER: &str = "the signing key's secret is protected by a passphrase";

pub(super) fn load_cert_file(path: &Path) -> Result<Cert, KeyringError> {
    let bytes = fsutil::read(path)?;
    Cert::from_bytes(&bytes).map_err(|e| invalid(&path.display().to_string(), e))
}

/// `secret.asc` and `secret-<FINGERPRINT>.asc` in the keyring directory, sorted.
pub(super) fn own_key_files(dir: &Path) -> Result<Vec<PathBuf>, KeyringError> {
    let rd = std::fs::read_dir(dir).map_err(|e| KeyringError::io("cannot read", dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string());
            name.is_some_and(|n| {
                n == SECRET_FILE || (n.starts_with(OWN_EXTRA_PREFIX) && n.ends_with(".asc"))
            }) && p.is_file()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// `*.asc` files in `certs`, sorted; an absent directory has none.
pub(super) fn list_cert_files(certs: &Path) -> Result<Vec<PathBuf>, KeyringError> {
    let rd = match std::fs::read_dir(certs) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(KeyringError::io("cannot read directory", certs, e)),
    };
    let mut files = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| KeyringError::io("cannot read directory", certs, e))?;
        let path = ent.path();
        if path.extension().is_some_and(|x| x == "asc") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
