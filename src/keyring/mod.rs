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

// One file per job; they share this file's types and imports (`use super::*`).
mod discovered;
pub mod ed25519;
mod error;
mod fastsign;
mod fastverify;
mod fsutil;
mod generate;
mod import;
mod load;
#[cfg(test)]
mod tests;
mod verify;
pub use discovered::DiscoveredCert;

use import::*;
use load::*;
use verify::*;

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
pub use verify::{key_packet_fingerprint, verify_with_key_packet};

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
    /// The key decompressed once, for Ed25519 keys (see `fastverify`).
    fast: Option<fastverify::FastVerify>,
}

/// The own signing key pair, unlocked at open time.
struct OwnSigner {
    keypair: KeyPair,
    /// The same key expanded once (ed25519-dalek), for Ed25519 keys (see `fastsign`).
    fast: Option<fastsign::FastEd25519>,
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

/// Strips spaces and an optional `0x`, uppercases, checks the length (the keyring's and
/// the config's one spelling of a fingerprint).
pub fn normalize_fingerprint(input: &str) -> Result<String, KeyringError> {
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
