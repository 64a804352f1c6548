//! Error type of the keyring module.

use std::path::PathBuf;

/// Everything that can go wrong in the keyring.
///
/// Messages name the file or fingerprint involved and say what to do
/// next. No variant ever carries secret key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The keyring directory does not exist.
    #[error(
        "keyring directory {} does not exist: generate a key there or import one first",
        dir.display()
    )]
    DirMissing { dir: PathBuf },

    /// A file system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Data (a file or imported bytes) is not a usable OpenPGP certificate.
    #[error("{what} is not a usable OpenPGP certificate: {reason}; fix or remove it")]
    InvalidCert { what: String, reason: String },

    /// Imported data contains more than one certificate.
    #[error(
        "{what} contains {count} certificates; export and import one key at a time \
         (e.g. `gpg --armor --export mail@DOMAIN`)"
    )]
    MultipleCerts { what: String, count: usize },

    /// A domain name given by the caller is not acceptable.
    #[error("invalid domain {domain:?}: {reason}")]
    InvalidDomain {
        domain: String,
        reason: &'static str,
    },

    /// A fingerprint given by the caller is not a fingerprint.
    #[error("invalid fingerprint {input:?}: expected 40 (v4) or 64 (v6) hex digits")]
    InvalidFingerprint { input: String },

    /// `generate` or `import` would replace an existing own key.
    #[error(
        "{} already holds the relay's own key {existing}; refusing to replace it with {new}: \
         move that file away first if you really want to change the relay's identity",
        path.display()
    )]
    OwnKeyExists {
        path: PathBuf,
        existing: String,
        new: String,
    },

    /// An operation needs the own key but there is none.
    #[error(
        "no own key in {}: generate one or import a secret key (secret.asc is missing)",
        dir.display()
    )]
    NoOwnKey { dir: PathBuf },

    /// The own key does not carry `mail@<domain>`.
    #[error(
        "the relay's own key {fingerprint} has no valid user ID mail@{domain} (it has: {}): \
         fix the configured domain or generate/import a key for mail@{domain}",
        user_ids.join(", ")
    )]
    NotOwnDomain {
        fingerprint: String,
        domain: String,
        user_ids: Vec<String>,
    },

    /// Secret key material is protected by a passphrase.
    #[error(
        "the secret key {fingerprint} is protected by a passphrase, but the relay runs \
         unattended: remove the passphrase: `gpg --passwd {fingerprint}` (enter an empty \
         passphrase) and export again, or `sq key password --clear < key.asc > clear.asc`"
    )]
    EncryptedSecretKey { fingerprint: String },

    /// No valid signing-capable key with usable secret material.
    #[error("key {fingerprint} cannot sign: {reason}")]
    NoSigningKey { fingerprint: String, reason: String },

    /// A public certificate with the own key's fingerprint was imported.
    #[error(
        "certificate {fingerprint} is the public half of this relay's own key; it is already \
         in the keyring (import partner certificates only)"
    )]
    IsOwnKey { fingerprint: String },

    /// A revocation targets a key that is not in the keyring (or is our own).
    #[error("revocation for {target}: {reason}")]
    RevocationNotApplicable { target: String, reason: String },

    /// No certificate with this fingerprint.
    #[error(
        "no certificate with fingerprint {fingerprint} (claimed for {domain}): import the \
         partner's certificate first"
    )]
    UnknownFingerprint { fingerprint: String, domain: String },

    /// The certificate exists, but has no valid user ID `mail@<domain>`.
    #[error(
        "certificate {fingerprint} is not valid for mail@{domain} (its user IDs: {}): check \
         the partner's domain or import the right certificate",
        user_ids.join(", ")
    )]
    WrongIdentity {
        fingerprint: String,
        domain: String,
        user_ids: Vec<String>,
    },

    /// The certificate (or its only signing key) has expired.
    #[error(
        "certificate {fingerprint} expired at {expired_at}: its owner must extend the expiry \
         and the updated certificate must be imported again"
    )]
    Expired {
        fingerprint: String,
        expired_at: String,
    },

    /// The certificate is not valid yet (creation time in the future).
    #[error("certificate {fingerprint} is not valid before {valid_from}: check the system clocks")]
    NotYetValid {
        fingerprint: String,
        valid_from: String,
    },

    /// The certificate has been revoked.
    #[error("certificate {fingerprint} is revoked ({reason}): ask the partner for their new key")]
    Revoked { fingerprint: String, reason: String },

    /// A signature did not verify.
    #[error("bad signature from {fingerprint}: {reason}")]
    BadSignature { fingerprint: String, reason: String },

    /// An imported partner certificate names several domains and no `--peer` says which.
    #[error(
        "certificate {fingerprint} has user IDs for several domains ({}); a partner's \
         certificate may only speak for that partner: say which peer it is for with \
         `sipmail keys import --keyring {} --peer DOMAIN FILE`",
        domains.iter().map(|d| format!("mail@{d}")).collect::<Vec<_>>().join(", "),
        dir.display()
    )]
    AmbiguousCert {
        fingerprint: String,
        domains: Vec<String>,
        dir: PathBuf,
    },

    /// A stored partner certificate names several domains and was never bound to one.
    #[error(
        "{}: partner certificate {fingerprint} has user IDs for several domains ({}) and is \
         bound to none, so it counts for none: run `sipmail keys import --keyring {} --peer \
         DOMAIN {}` with the domain of the partner that gave it to you, or remove it \
         (`sipmail keys remove --keyring {} {fingerprint}`)",
        file.display(),
        domains.iter().map(|d| format!("mail@{d}")).collect::<Vec<_>>().join(", "),
        dir.display(),
        file.display(),
        dir.display()
    )]
    AmbiguousCertFile {
        file: PathBuf,
        dir: PathBuf,
        fingerprint: String,
        domains: Vec<String>,
    },

    /// `--peer DOMAIN` names a domain the certificate has no user ID for.
    #[error(
        "certificate {fingerprint} has no user ID mail@{domain} (it has: {}): check the \
         --peer domain",
        user_ids.join(", ")
    )]
    NotForPeer {
        fingerprint: String,
        domain: String,
        user_ids: Vec<String>,
    },

    /// A binding file does not hold a domain.
    #[error("{}: not a peer binding ({reason}): import the certificate again with --peer DOMAIN", file.display())]
    InvalidBinding { file: PathBuf, reason: String },

    /// The certificate is valid for the domain but not in that peer's `fingerprints`.
    #[error("certificate {fingerprint} is not among the fingerprints configured for peer {domain}")]
    NotListedForPeer { fingerprint: String, domain: String },

    /// The crypto library failed to make a signature or a key.
    #[error("OpenPGP operation failed: {reason}")]
    Crypto { reason: String },
}

impl KeyringError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        KeyringError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn crypto(e: impl std::fmt::Display) -> Self {
        KeyringError::Crypto { reason: why(e) }
    }
}

/// A library error (with its causes, `{:#}`) as one line without control characters.
/// Sequoia's parser errors span lines ("Unrecognized token ... \nExpected one of ...");
/// they end up in log lines and terminal output, often about data a peer sent.
pub(crate) fn why(e: impl std::fmt::Display) -> String {
    one_line(&format!("{e:#}"))
}

/// Line breaks (with the indentation after them) become one space; any other control
/// character is escaped.
pub(crate) fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_joins_lines_and_escapes_controls() {
        assert_eq!(
            super::one_line("Unrecognized token\n  Expected one of A\x1b[31m\u{7}"),
            "Unrecognized token Expected one of A\\u{1b}[31m\\u{7}"
        );
    }
}
