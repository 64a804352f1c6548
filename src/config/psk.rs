//! Pre-shared keys (`[[peer]] psk_file`): generating, reading and checking key files.

use std::fmt;
use std::path::Path;

/// A pre-shared key read from `psk_file`: 32 random bytes, stored as one line of standard
/// base64 (RFC 4648 §4, 44 characters with the padding), as `sipmail psk generate` writes
/// it. Zeroized on drop; Debug never shows it.
///
/// Why a key and not a password: the callee answers an INVITE that names a psk peer with
/// an HMAC keyed by the PSK before the caller has proved anything, so anyone can collect
/// one and test guesses offline (docs/PROTOCOL.md §3a). Only a random key makes that
/// hopeless, so anything else is refused.
#[derive(Clone)]
pub struct Psk(zeroize::Zeroizing<Vec<u8>>);

impl Psk {
    /// Key length, in bytes.
    pub const LEN: usize = 32;
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A new random key and its file text (base64 and a newline).
    pub fn generate() -> Result<(Psk, zeroize::Zeroizing<String>), String> {
        use base64::Engine;
        let mut key = zeroize::Zeroizing::new(vec![0u8; Self::LEN]);
        getrandom::fill(&mut key)
            .map_err(|e| format!("the operating system's random number generator failed: {e}"))?;
        let text = zeroize::Zeroizing::new(format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(&key[..])
        ));
        Ok((Psk(key), text))
    }

    /// Write a new key to `path`, mode 0600; an existing file is never overwritten.
    pub fn generate_file(path: &Path) -> Result<Psk, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (psk, text) = Self::generate()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => format!(
                    "{} already exists; not overwriting a key (remove it first if you mean to replace it, and give the partner the new one)",
                    path.display()
                ),
                _ => format!("{}: {e}", path.display()),
            })?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(psk)
    }

    /// The key in a PSK file's text: one line of standard base64 that decodes to exactly 32
    /// bytes. Trailing white space (the newline) is ignored. A passphrase, hex, a key of
    /// another length, or hand-typed "base64" is refused. `what` names the file in errors.
    pub fn parse(what: &str, text: &[u8]) -> Result<Psk, String> {
        use base64::Engine;
        let fix =
            "make a key with `sipmail psk generate --out FILE` and give the partner the same file";
        let text = text.trim_ascii();
        let refuse = |why: &str| {
            Err(format!(
                "{what}: {why}; a PSK is 32 random bytes in base64, one line: {fix}"
            ))
        };
        if text.is_empty() {
            return refuse("empty");
        }
        let Ok(key) = base64::engine::general_purpose::STANDARD.decode(text) else {
            return refuse("not base64 (a passphrase is not a key: it can be guessed offline)");
        };
        let key = zeroize::Zeroizing::new(key);
        if key.len() != Self::LEN {
            return refuse(&format!(
                "decodes to {} bytes, not {}",
                key.len(),
                Self::LEN
            ));
        }
        // 43 characters of random base64 hold upper- and lower-case letters with
        // probability 1 - 4e-10; text without either was typed or derived, not drawn.
        if !text.iter().any(u8::is_ascii_uppercase) || !text.iter().any(u8::is_ascii_lowercase) {
            return refuse("does not look random (no mix of upper- and lower-case letters)");
        }
        Ok(Psk(key))
    }

    /// Reads a key file: it must be a regular file that only its owner can read, holding a
    /// key as [`Psk::parse`] takes it.
    pub fn load(path: &Path) -> Result<Psk, String> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !md.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by group or others (mode {mode:03o}): chmod 600 it",
                path.display()
            ));
        }
        // A key file is 45 bytes; anything much larger is not one (and is not read whole).
        if md.len() > 1024 {
            return Err(format!(
                "{}: {} bytes, not a PSK file (32 random bytes in base64, one line): make one with `sipmail psk generate --out FILE`",
                path.display(),
                md.len()
            ));
        }
        let data = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        Self::parse(&path.display().to_string(), &data)
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}
