//! `sipmail keys import`: own keys, partner certificates (bound to one domain) and
//! revocations, each written atomically.

use super::*;

impl Keyring {
    /// Imports a key or certificate (armored or binary) into `dir`.
    ///
    /// * A secret key with unencrypted secret material becomes the own
    ///   key (`dir/secret.asc`); refused if a different own key exists.
    ///   Re-importing the same key merges it (e.g. a new expiry).
    /// * A public certificate goes to `dir/certs/<FINGERPRINT>.asc`,
    ///   merged with an existing file for the same fingerprint.
    /// * A bare key revocation signature (`gpg --gen-revoke`, the `.rev`
    ///   file of `sq key generate`) is merged into the partner
    ///   certificate it revokes.
    ///
    /// `dir` is created (mode 0700) if missing. An open [`Keyring`]
    /// does not see the change; open it again.
    pub fn import(dir: &Path, data: &[u8]) -> Result<Imported, KeyringError> {
        Self::import_for(dir, data, None)
    }

    /// As [`Keyring::import`]; a partner certificate is bound to `peer`, which must be the
    /// domain of one of its `mail@` user IDs, and counts for that domain only. Without
    /// `peer`, a certificate is bound to the one domain its user IDs name (or to the domain
    /// it was bound to before); one naming several domains is refused.
    pub fn import_for(
        dir: &Path,
        data: &[u8],
        peer: Option<&str>,
    ) -> Result<Imported, KeyringError> {
        let what = "imported data";
        let parsed: openpgp::Result<Vec<Cert>> =
            CertParser::from_bytes(data).and_then(|p| p.collect());
        let certs = match parsed {
            Ok(certs) => certs,
            // A bare revocation signature is not a certificate.
            Err(_) if only_signatures(data) => Vec::new(),
            Err(e) => return Err(invalid(what, e)),
        };
        match certs.len() {
            0 => import_revocation(dir, data),
            1 => {
                let Some(cert) = certs.into_iter().next() else {
                    return Err(invalid(what, "no certificate found"));
                };
                fsutil::ensure_private_dir(dir)?;
                if cert.is_tsk() {
                    if peer.is_some() {
                        return Err(invalid(
                            what,
                            "it is a secret key (this relay's own); --peer is for partner \
                             certificates",
                        ));
                    }
                    import_own(dir, cert)
                } else {
                    import_partner(dir, cert, peer)
                }
            }
            count => Err(KeyringError::MultipleCerts {
                what: what.into(),
                count,
            }),
        }
    }
}

/// Parses exactly one signature packet (binary or armored).
pub(super) fn parse_signature(bytes: &[u8]) -> Result<Signature, String> {
    let pile = PacketPile::from_bytes(bytes)
        .map_err(|e| format!("not an OpenPGP signature: {}", error::why(e)))?;
    let mut packets = pile.into_children();
    match (packets.next(), packets.next()) {
        (Some(Packet::Signature(sig)), None) => Ok(sig),
        (Some(_), None) => Err("the packet is not a signature".into()),
        (None, _) => Err("empty signature".into()),
        (Some(_), Some(_)) => Err("expected exactly one signature packet".into()),
    }
}

pub(super) fn import_own(dir: &Path, cert: Cert) -> Result<Imported, KeyringError> {
    let fpr = fpr_hex(&cert.fingerprint());
    match own_signer(&cert, now()) {
        Ok(_) => {}
        Err(reason) if reason == ENCRYPTED_MARKER => {
            return Err(KeyringError::EncryptedSecretKey { fingerprint: fpr });
        }
        Err(reason) => {
            return Err(KeyringError::NoSigningKey {
                fingerprint: fpr,
                reason,
            });
        }
    }
    let path = dir.join(SECRET_FILE);
    let merged = if path.exists() {
        let existing = load_cert_file(&path)?;
        let existing_fpr = fpr_hex(&existing.fingerprint());
        if existing_fpr != fpr {
            return Err(KeyringError::OwnKeyExists {
                path,
                existing: existing_fpr,
                new: fpr,
            });
        }
        existing
            .merge_public_and_secret(cert)
            .map_err(|e| invalid("imported secret key", e))?
    } else {
        cert
    };
    let bytes = merged
        .as_tsk()
        .armored()
        .to_vec()
        .map_err(KeyringError::crypto)?;
    fsutil::write_atomic(&path, &bytes, false)?;
    let user_ids = uids(&merged);
    tracing::info!(fingerprint = %fpr, file = %path.display(), "imported own secret key");
    Ok(Imported::OwnSecretKey {
        fingerprint: fpr,
        user_ids,
    })
}

pub(super) fn own_fpr_on_disk(dir: &Path) -> Result<Option<String>, KeyringError> {
    let path = dir.join(SECRET_FILE);
    if path.exists() {
        Ok(Some(fpr_hex(&load_cert_file(&path)?.fingerprint())))
    } else {
        Ok(None)
    }
}

pub(super) fn import_partner(
    dir: &Path,
    cert: Cert,
    peer: Option<&str>,
) -> Result<Imported, KeyringError> {
    let fpr = fpr_hex(&cert.fingerprint());
    if own_fpr_on_disk(dir)?.as_deref() == Some(fpr.as_str()) {
        return Err(KeyringError::IsOwnKey { fingerprint: fpr });
    }
    let what = format!("certificate {fpr}");
    if let Err(e) = cert.with_policy(&POLICY, now()) {
        return Err(invalid(&what, e));
    }
    let user_ids = uids(&cert);
    if !cert
        .userids()
        .any(|u| uid_domain(u.userid().value()).is_some())
    {
        return Err(KeyringError::InvalidCert {
            what,
            reason: format!(
                "it has no user ID of the form mail@<domain> (it has: {})",
                user_ids.join(", ")
            ),
        });
    }
    let certs_dir = dir.join(CERTS_DIR);
    fsutil::ensure_private_dir(&certs_dir)?;
    let path = certs_dir.join(format!("{fpr}.asc"));
    let merged = if path.exists() {
        load_cert_file(&path)?
            .strip_secret_key_material()
            .merge_public(cert)
            .map_err(|e| invalid(&what, e))?
    } else {
        cert
    };
    let claimed = claimed_domains(&merged);
    let existing = read_binding(&certs_dir, &fpr)?;
    let bound = match (peer, existing) {
        (Some(p), _) => {
            let p = normalize_domain(p)?;
            if !claimed.contains(&p) {
                return Err(KeyringError::NotForPeer {
                    fingerprint: fpr,
                    domain: p,
                    user_ids: uids(&merged),
                });
            }
            p
        }
        (None, Some(b)) => b,
        (None, None) => match claimed.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(KeyringError::AmbiguousCert {
                    fingerprint: fpr,
                    domains: claimed,
                    dir: dir.to_path_buf(),
                });
            }
        },
    };
    // The binding first: a crash between the two writes leaves a binding without a
    // certificate (harmless), never a certificate that counts for the wrong domain.
    let bpath = binding_path(&certs_dir, &fpr);
    if read_binding(&certs_dir, &fpr)?.as_deref() != Some(bound.as_str()) {
        fsutil::write_atomic(&bpath, format!("{bound}\n").as_bytes(), false)?;
    }
    let bytes = merged.armored().to_vec().map_err(KeyringError::crypto)?;
    fsutil::write_atomic(&path, &bytes, false)?;
    tracing::info!(fingerprint = %fpr, file = %path.display(), peer = %bound, "imported partner certificate");
    Ok(Imported::PartnerCert {
        fingerprint: fpr,
        user_ids: uids(&merged),
    })
}

/// Whether `data` parses as a non-empty sequence of signature packets.
pub(super) fn only_signatures(data: &[u8]) -> bool {
    PacketPile::from_bytes(data).is_ok_and(|p| {
        p.children().next().is_some() && p.children().all(|p| matches!(p, Packet::Signature(_)))
    })
}

/// Merges a bare key revocation signature into the partner cert it revokes.
pub(super) fn import_revocation(dir: &Path, data: &[u8]) -> Result<Imported, KeyringError> {
    let what = "imported data";
    let pile = PacketPile::from_bytes(data).map_err(|e| invalid(what, e))?;
    let sigs: Vec<Signature> = pile
        .into_children()
        .filter_map(|p| match p {
            Packet::Signature(s) if s.typ() == SignatureType::KeyRevocation => Some(s),
            _ => None,
        })
        .collect();
    let Some(first) = sigs.first() else {
        return Err(invalid(
            what,
            "it contains neither a certificate nor a key revocation signature",
        ));
    };
    let issuers = first.get_issuers();
    let target = issuers
        .first()
        .map(|h| h.to_hex())
        .unwrap_or_else(|| "(no issuer)".into());
    let not_applicable = |reason: String| KeyringError::RevocationNotApplicable {
        target: target.clone(),
        reason,
    };

    let own_fpr = own_fpr_on_disk(dir)?;
    let mut found = None;
    for path in list_cert_files(&dir.join(CERTS_DIR))? {
        let cert = load_cert_file(&path)?;
        let fpr = cert.fingerprint();
        if issuers
            .iter()
            .any(|h| h.aliases(openpgp::KeyHandle::from(&fpr)))
        {
            found = Some((path, cert));
            break;
        }
    }
    let Some((path, cert)) = found else {
        if let Some(own) = own_fpr
            && issuers
                .iter()
                .any(|h| h.to_hex() == own || own.ends_with(&h.to_hex()))
        {
            return Err(not_applicable(
                "it revokes this relay's own key; publish it to the partners instead of \
                 importing it here"
                    .into(),
            ));
        }
        return Err(not_applicable(
            "no partner certificate with that key is in the keyring: import the certificate \
             first"
                .into(),
        ));
    };
    let fpr = fpr_hex(&cert.fingerprint());
    let (cert, _) = cert
        .insert_packets(sigs.into_iter().map(Packet::from))
        .map_err(|e| invalid(what, e))?;
    match cert.with_policy(&POLICY, None) {
        Ok(vc) if matches!(vc.revocation_status(), RevocationStatus::Revoked(_)) => {}
        _ => {
            return Err(not_applicable(format!(
                "the signature does not validly revoke certificate {fpr}"
            )));
        }
    }
    let bytes = cert.armored().to_vec().map_err(KeyringError::crypto)?;
    fsutil::write_atomic(&path, &bytes, false)?;
    tracing::info!(fingerprint = %fpr, "imported revocation");
    Ok(Imported::Revocation { fingerprint: fpr })
}
