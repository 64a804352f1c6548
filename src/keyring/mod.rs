//! OpenPGP keyring of a sipmail relay.
//!
//! A relay has one unattended identity, `mail@<domain>`, whose secret
//! key lives in `DIR/secret.asc` (armored transferable secret key, no
//! passphrase, mode 0600), and a set of partner certificates in
//! `DIR/certs/<FINGERPRINT>.asc`. The directory has mode 0700.
//!
//! Everything expensive (parsing, policy evaluation, finding the
//! signing and verification keys, unlocking the signing key pair) is
//! done once in [`Keyring::open`]; [`Keyring::sign_detached`] and
//! [`Keyring::verify_detached`] only check the (cached) validity
//! windows against the current time and do the cryptography.
//!
//! Validity is evaluated with sequoia's `StandardPolicy`. Things that
//! only change when the files change (revocations, user ID bindings,
//! key flags, algorithm acceptance) are evaluated at open time;
//! expiry and creation times are checked on every call, so a long
//! running process notices a certificate that expires while it runs.
//! Re-open the keyring (or import again) to pick up new files.
//!
//! Design choices:
//! * Generated keys never expire. A relay is unattended; a key that
//!   silently expires would stop mail between sites. Retire a key by
//!   revoking it (generate stores a revocation certificate in
//!   `DIR/revocation-<FINGERPRINT>.asc`).
//! * Generated keys are v4 (RFC 4880) Ed25519 with one primary key that
//!   can certify and sign, so that GnuPG 2.2 can verify our signatures.
//!   v6 keys made by others are accepted as far as sequoia supports them.
//! * A partner identity is the exact user ID `mail@<domain>`; the local
//!   part `mail` is matched exactly, the domain case-insensitively.
//!   `Name <mail@domain>` does not count.
//! * A partner certificate counts for one domain only, the one the operator
//!   imported it for: `DIR/certs/<FINGERPRINT>.peer` holds that domain (one
//!   line, written atomically and fsynced at import). A certificate whose user
//!   IDs name several domains must be imported with `--peer DOMAIN`
//!   ([`Keyring::import_for`]); otherwise anyone whose certificate we hold
//!   could add a self-signed `mail@<another partner>` and speak for that
//!   partner. Certificates imported before bindings existed and naming one
//!   domain keep counting for it; one naming several counts for none, and
//!   [`Keyring::check_bindings`] says which file to bind.

mod error;
mod fsutil;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::crypto::KeyPair;
use openpgp::packet::key::{PublicParts, UnspecifiedRole};
use openpgp::packet::signature::SignatureBuilder;
use openpgp::packet::{Key, Packet, Signature};
use openpgp::parse::Parse;
use openpgp::policy::{HashAlgoSecurity, Policy, StandardPolicy};
use openpgp::serialize::SerializeInto;
use openpgp::types::{
    Curve, KeyFlags, PublicKeyAlgorithm, ReasonForRevocation, RevocationStatus, SignatureType,
};
use openpgp::{Fingerprint, KeyID, PacketPile, Profile};

pub use error::KeyringError;
/// Re-exported so that callers can name the type [`Keyring::peer_cert`] returns.
pub use openpgp::Cert;

/// The policy every validity decision is made under.
static POLICY: StandardPolicy<'static> = StandardPolicy::new();

/// File name of the own key inside the keyring directory.
pub const SECRET_FILE: &str = "secret.asc";
/// Further own keys (rotation): `secret-<FINGERPRINT>.asc`.
pub const OWN_EXTRA_PREFIX: &str = "secret-";
/// `generate` stores the new key's revocation certificate in
/// `DIR/revocation-<FINGERPRINT>.asc`; publish it to the partners to
/// retire the key.
pub const REVOCATION_PREFIX: &str = "revocation-";
/// Sub directory holding partner certificates.
pub const CERTS_DIR: &str = "certs";
/// Extension of the file beside a partner certificate (`certs/<FINGERPRINT>.peer`) that
/// names the one domain the certificate counts for.
pub const BINDING_EXT: &str = "peer";

/// Local part of every relay identity.
const LOCAL_PART: &str = "mail@";

/// What [`Keyring::import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// A secret key became (or refreshed) the relay's own key.
    OwnSecretKey {
        fingerprint: String,
        user_ids: Vec<String>,
    },
    /// A partner certificate was added (or merged into the existing one).
    PartnerCert {
        fingerprint: String,
        user_ids: Vec<String>,
    },
    /// A bare revocation certificate was merged into a partner certificate.
    Revocation { fingerprint: String },
}

/// Validity of a key as shown by [`Keyring::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    Valid,
    Expired,
    NotYetValid,
    Revoked,
    /// Rejected by the policy (e.g. only SHA-1 self-signatures).
    Invalid(String),
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyStatus::Valid => f.write_str("valid"),
            KeyStatus::Expired => f.write_str("expired"),
            KeyStatus::NotYetValid => f.write_str("not yet valid"),
            KeyStatus::Revoked => f.write_str("revoked"),
            KeyStatus::Invalid(r) => write!(f, "invalid: {r}"),
        }
    }
}

/// Summary of one key in the keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Uppercase hex fingerprint of the primary key.
    pub fingerprint: String,
    /// All user IDs (lossy UTF-8), valid or not.
    pub user_ids: Vec<String>,
    /// `true` for the relay's own key.
    pub own: bool,
    /// Primary key algorithm, gpg style: `ed25519`, `rsa3072`, ...
    pub algo: String,
    /// Expiry of the primary key; `None` = never.
    pub expires: Option<SystemTime>,
    pub status: KeyStatus,
    /// A valid signing-capable (sub)key exists (for the own key: with a
    /// usable secret).
    pub can_sign: bool,
}

/// A public key that may verify partner signatures.
struct VerifyKey {
    key: Key<PublicParts, UnspecifiedRole>,
    fpr: Fingerprint,
    keyid: KeyID,
    created: SystemTime,
    /// Earliest of this key's and the primary key's expiry.
    expires: Option<SystemTime>,
}

/// The own signing key pair, unlocked at open time.
struct OwnSigner {
    keypair: KeyPair,
    fpr: String,
    expires: Option<SystemTime>,
}

/// A certificate with everything precomputed that per-call checks need.
struct Entry {
    cert: Cert,
    fpr: String,
    user_ids: Vec<String>,
    /// Lowercase domains `d` of valid, unrevoked user IDs `mail@d`.
    domains: Vec<String>,
    algo: String,
    created: SystemTime,
    expires: Option<SystemTime>,
    revoked: Option<String>,
    invalid: Option<String>,
    verifiers: Vec<VerifyKey>,
}

struct OwnKey {
    entry: Entry,
    signer: Result<OwnSigner, String>,
}

/// The relay's keyring: own key (optional) and partner certificates.
pub struct Keyring {
    dir: PathBuf,
    /// The own key that signs: the newest usable one, or the one chosen with
    /// [`Keyring::select_signing_key`].
    own: Option<OwnKey>,
    /// Other own keys (`secret-<FINGERPRINT>.asc`): a key being rotated in or out. They
    /// do not sign, unless selected.
    own_other: Vec<OwnKey>,
    peers: Vec<Entry>,
    by_fpr: HashMap<String, usize>,
    /// Partner certificates naming several domains with no binding: they count for none.
    ambiguous: Vec<Ambiguous>,
    /// `[[peer]] fingerprints`: where a domain has a list, only those certificates count.
    allowed: HashMap<String, Vec<String>>,
}

/// A partner certificate that names several domains and was never bound to one.
#[derive(Debug, Clone)]
struct Ambiguous {
    file: PathBuf,
    fpr: String,
    domains: Vec<String>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Fingerprints only: never key material.
        f.debug_struct("Keyring")
            .field("dir", &self.dir)
            .field("own", &self.own.as_ref().map(|o| &o.entry.fpr))
            .field(
                "peers",
                &self.peers.iter().map(|p| &p.fpr).collect::<Vec<_>>(),
            )
            .finish()
    }
}

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

    fn generate_into(
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

    /// The keyring directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The own certificate, armored, without any secret key material.
    pub fn export_public(&self) -> Result<String, KeyringError> {
        let own = self.own()?;
        let public = own.entry.cert.clone().strip_secret_key_material();
        let bytes = public.armored().to_vec().map_err(KeyringError::crypto)?;
        String::from_utf8(bytes).map_err(KeyringError::crypto)
    }

    /// Sign with the own key `fingerprint` (hex) instead of the newest: `relay.signing_key`
    /// in the config, e.g. to keep signing with the old key until every partner has the
    /// new one.
    pub fn select_signing_key(&mut self, fingerprint: &str) -> Result<(), KeyringError> {
        let fpr = normalize_fingerprint(fingerprint)?;
        if self.own.as_ref().is_some_and(|o| o.entry.fpr == fpr) {
            return Ok(());
        }
        let i = self
            .own_other
            .iter()
            .position(|o| o.entry.fpr == fpr)
            .ok_or_else(|| KeyringError::UnknownFingerprint {
                fingerprint: fpr.clone(),
                domain: "(own keys)".into(),
            })?;
        let chosen = self.own_other.remove(i);
        if let Some(prev) = self.own.replace(chosen) {
            self.own_other.insert(0, prev);
        }
        Ok(())
    }

    /// The public certificate of own key `fingerprint`, armored (for announcing a new key
    /// before it signs).
    pub fn export_public_of(&self, fingerprint: &str) -> Result<String, KeyringError> {
        let fpr = normalize_fingerprint(fingerprint)?;
        let own = self
            .own
            .iter()
            .chain(self.own_other.iter())
            .find(|o| o.entry.fpr == fpr)
            .ok_or_else(|| KeyringError::UnknownFingerprint {
                fingerprint: fpr.clone(),
                domain: "(own keys)".into(),
            })?;
        let bytes = own
            .entry
            .cert
            .armored()
            .to_vec()
            .map_err(KeyringError::crypto)?;
        String::from_utf8(bytes).map_err(KeyringError::crypto)
    }

    /// All keys: the own key first, then partners by fingerprint.
    pub fn list(&self) -> Vec<KeyInfo> {
        let mut v: Vec<KeyInfo> = self
            .own
            .iter()
            .chain(self.own_other.iter())
            .map(|o| o.info())
            .collect();
        let mut peers: Vec<KeyInfo> = self.peers.iter().map(|e| e.info(false, None)).collect();
        peers.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        v.extend(peers);
        v
    }

    /// Uppercase hex fingerprint of the own primary key.
    pub fn own_fingerprint(&self) -> Result<String, KeyringError> {
        Ok(self.own()?.entry.fpr.clone())
    }

    /// Checks that the own key has a valid user ID `mail@<domain>`.
    pub fn own_domain_ok(&self, domain: &str) -> Result<(), KeyringError> {
        let domain = normalize_domain(domain)?;
        let own = self.own()?;
        if own.entry.domains.contains(&domain) {
            Ok(())
        } else {
            Err(KeyringError::NotOwnDomain {
                fingerprint: own.entry.fpr.clone(),
                domain,
                user_ids: own.entry.user_ids.clone(),
            })
        }
    }

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
        // `Signer::sign` wants `&mut`; a clone of the key pair is cheap
        // compared to the signature and keeps `&self` usable from many
        // threads without a lock.
        let mut keypair = signer.keypair.clone();
        let sig = SignatureBuilder::new(SignatureType::Binary)
            .sign_message(&mut keypair, data)
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
        let bad = |reason: String| KeyringError::BadSignature {
            fingerprint: entry.fpr.clone(),
            reason,
        };

        let (sig, sig_time) = checked_signature(sig, t).map_err(bad)?;

        let issuers = sig.get_issuers();
        let mut reason = if entry.verifiers.is_empty() {
            "the certificate has no valid signing-capable key".to_string()
        } else {
            "made by a key that is not a signing key of this certificate".to_string()
        };
        for k in &entry.verifiers {
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
            match verify_with_key(&sig, &k.key, data) {
                Ok(()) => return Ok(()),
                Err(why) => reason = why,
            }
        }
        Err(bad(reason))
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

    fn own(&self) -> Result<&OwnKey, KeyringError> {
        self.own.as_ref().ok_or_else(|| KeyringError::NoOwnKey {
            dir: self.dir.clone(),
        })
    }

    /// The own key's signing-capable (sub)key, or why there is none.
    fn own_signer(&self) -> Result<&OwnSigner, KeyringError> {
        let own = self.own()?;
        own.signer
            .as_ref()
            .map_err(|reason| KeyringError::NoSigningKey {
                fingerprint: own.entry.fpr.clone(),
                reason: reason.clone(),
            })
    }

    fn checked_entry(
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
    fn listed(&self, domain: &str, fpr: &str) -> bool {
        self.allowed
            .get(domain)
            .is_none_or(|l| l.iter().any(|f| f == fpr))
    }
}

/// The domains of every user ID of the form `mail@<domain>`, valid or not: what the
/// certificate claims, the question being whether it claims more than one partner.
fn claimed_domains(cert: &Cert) -> Vec<String> {
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

fn binding_path(certs_dir: &Path, fpr: &str) -> PathBuf {
    certs_dir.join(format!("{fpr}.{BINDING_EXT}"))
}

/// The domain in `certs/<FPR>.peer`, if that file exists.
fn read_binding(certs_dir: &Path, fpr: &str) -> Result<Option<String>, KeyringError> {
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
    verify_with_key(&sig, &key, data).map_err(bad)
}

/// A detached signature, parsed and checked for what does not depend on the key: a
/// binary-document signature, allowed by the policy, alive at `t`, with a creation time.
fn checked_signature(sig: &[u8], t: SystemTime) -> Result<(Signature, SystemTime), String> {
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
fn verify_with_key(
    sig: &Signature,
    key: &Key<PublicParts, UnspecifiedRole>,
    data: &[u8],
) -> Result<(), String> {
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

/// Human readable fingerprint: groups of 4 hex digits separated by spaces.
pub fn format_fingerprint(fpr: &str) -> String {
    let clean: Vec<char> = fpr
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    clean
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

impl VerifyKey {
    fn alive(&self, t: SystemTime) -> bool {
        self.created <= t + CLOCK_SKEW && self.expires.is_none_or(|e| t < e)
    }
}

/// Tolerance for creation times slightly in the future (clock skew
/// between the two sites).
const CLOCK_SKEW: Duration = Duration::from_secs(300);

impl Entry {
    /// All per-call checks of a certificate for `domain` at time `t`.
    fn check(&self, domain: &str, t: SystemTime) -> Result<(), KeyringError> {
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

    fn status(&self, t: SystemTime) -> KeyStatus {
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

    fn info(&self, own: bool, can_sign: Option<bool>) -> KeyInfo {
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
    fn info(&self) -> KeyInfo {
        let t = now();
        let can_sign = self
            .signer
            .as_ref()
            .is_ok_and(|s| s.expires.is_none_or(|e| t < e));
        self.entry.info(true, Some(can_sign))
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn fpr_hex(fpr: &Fingerprint) -> String {
    fpr.to_hex()
}

fn invalid(what: &str, e: impl fmt::Display) -> KeyringError {
    KeyringError::InvalidCert {
        what: what.to_string(),
        reason: error::why(e),
    }
}

/// Lowercases and sanity checks a domain.
fn normalize_domain(domain: &str) -> Result<String, KeyringError> {
    let err = |reason| KeyringError::InvalidDomain {
        domain: domain.to_string(),
        reason,
    };
    if domain.is_empty() {
        return Err(err("empty"));
    }
    if domain.len() > 253 {
        return Err(err("longer than 253 characters"));
    }
    if domain
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '<' | '>'))
    {
        return Err(err(
            "contains whitespace, a control character, '@', '<' or '>'",
        ));
    }
    Ok(domain.to_ascii_lowercase())
}

/// Strips spaces and an optional `0x`, uppercases, checks the length.
fn normalize_fingerprint(input: &str) -> Result<String, KeyringError> {
    let mut s: String = input.chars().filter(|c| !c.is_whitespace()).collect();
    if s.starts_with("0x") || s.starts_with("0X") {
        s.drain(..2);
    }
    let s = s.to_ascii_uppercase();
    if (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(KeyringError::InvalidFingerprint {
            input: input.to_string(),
        })
    }
}

/// The domain of a user ID of the exact form `mail@<domain>`.
fn uid_domain(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?;
    let d = s.strip_prefix(LOCAL_PART)?;
    normalize_domain(d).ok()
}

/// Formats a time as `YYYY-MM-DD HH:MM:SS UTC`.
fn fmt_time(t: SystemTime) -> String {
    crate::time::utc_datetime(t)
}

/// gpg style algorithm name of a key.
fn algo_name<P: openpgp::packet::key::KeyParts, R: openpgp::packet::key::KeyRole>(
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

fn revocation_reason(status: &RevocationStatus) -> Option<String> {
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
fn build_entry(cert: Cert, t: SystemTime) -> Entry {
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
fn build_own(cert: Cert, t: SystemTime) -> OwnKey {
    let signer = own_signer(&cert, t);
    // Only the unlocked signing key pair keeps secret material; the
    // certificate that `peer_cert` may hand out is the public half.
    let entry = build_entry(cert.strip_secret_key_material(), t);
    OwnKey { entry, signer }
}

fn own_signer(cert: &Cert, t: SystemTime) -> Result<OwnSigner, String> {
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

const ENCRYPTED_MARKER: &str = "the signing key's secret is protected by a passphrase";

fn load_cert_file(path: &Path) -> Result<Cert, KeyringError> {
    let bytes = fsutil::read(path)?;
    Cert::from_bytes(&bytes).map_err(|e| invalid(&path.display().to_string(), e))
}

/// `secret.asc` and `secret-<FINGERPRINT>.asc` in the keyring directory, sorted.
fn own_key_files(dir: &Path) -> Result<Vec<PathBuf>, KeyringError> {
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
fn list_cert_files(certs: &Path) -> Result<Vec<PathBuf>, KeyringError> {
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

/// Parses exactly one signature packet (binary or armored).
fn parse_signature(bytes: &[u8]) -> Result<Signature, String> {
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

fn import_own(dir: &Path, cert: Cert) -> Result<Imported, KeyringError> {
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

fn own_fpr_on_disk(dir: &Path) -> Result<Option<String>, KeyringError> {
    let path = dir.join(SECRET_FILE);
    if path.exists() {
        Ok(Some(fpr_hex(&load_cert_file(&path)?.fingerprint())))
    } else {
        Ok(None)
    }
}

fn import_partner(dir: &Path, cert: Cert, peer: Option<&str>) -> Result<Imported, KeyringError> {
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
fn only_signatures(data: &[u8]) -> bool {
    PacketPile::from_bytes(data).is_ok_and(|p| {
        p.children().next().is_some() && p.children().all(|p| matches!(p, Packet::Signature(_)))
    })
}

/// Merges a bare key revocation signature into the partner cert it revokes.
fn import_revocation(dir: &Path, data: &[u8]) -> Result<Imported, KeyringError> {
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

/// ASCII-armors serialized packets.
fn armor_bytes(bytes: &[u8], kind: openpgp::armor::Kind) -> openpgp::Result<Vec<u8>> {
    use std::io::Write;
    let mut w = openpgp::armor::Writer::new(Vec::new(), kind)?;
    w.write_all(bytes)?;
    Ok(w.finalize()?)
}

/// Lossy UTF-8 with control characters escaped, so that text from a
/// peer's certificate cannot forge log lines or terminal output.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

fn uids(cert: &Cert) -> Vec<String> {
    cert.userids()
        .map(|u| printable(u.userid().value()))
        .collect()
}
