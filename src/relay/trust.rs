//! Per-peer trust state under `<spool>/state/`: the retained secrets that key continuity
//! needs, and the keys pinned on first use for opportunistic peers.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `<domain>.retained` | up to 4 retained secrets, hex, newest first | 0600 |
//! | `<domain>.pin` | the pinned signing-key fingerprint of an opportunistic peer | 0600 |
//! | `<domain>.pin-pending` | a different key the peer presented, refused, for `sipmail trust accept` | 0600 |
//!
//! Every write goes to a temporary file that is fsynced, renamed over the old one, and the
//! folder fsynced, so a crash leaves the old state or the new, never half of one. The
//! relay reads the files at each call, so `sipmail trust accept` and `reset` take effect
//! on the next call without a restart.

use crate::handshake::{MAX_RETAINED, RetainedSecret};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("\"{0}\" is not a domain name")]
    BadDomain(String),
    #[error("no changed key is waiting for acceptance for {0}")]
    NothingPending(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a presented key is, compared to the pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCheck {
    /// Nothing pinned yet: this is the first use.
    FirstUse,
    /// The pinned key.
    Same,
    /// A different key than the pinned one.
    Changed { pinned: String },
}

/// The state of one peer, as `sipmail trust list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub domain: String,
    pub retained: usize,
    pub pinned: Option<String>,
    pub pending: Option<String>,
}

/// The `state/` folder of a spool.
#[derive(Debug)]
pub struct TrustStore {
    dir: PathBuf,
    /// Serialise read-modify-write of one peer's files among this process's calls (the
    /// spool's control socket keeps a second daemon off the same spool). One lock per
    /// stripe of domains, so that calls with different peers store their state (two fsyncs
    /// each) side by side: one lock for all capped a hub at one fsync pair at a time.
    locks: [Mutex<()>; LOCK_STRIPES],
}

fn check_domain(d: &str) -> Result<String, TrustError> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        });
    if ok {
        Ok(d)
    } else {
        Err(TrustError::BadDomain(d))
    }
}

const LOCK_STRIPES: usize = 16;

impl TrustStore {
    fn lock_for(&self, domain: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        domain
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .hash(&mut h);
        self.locks[h.finish() as usize % LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn new(spool: &Path) -> TrustStore {
        TrustStore {
            dir: spool.join("state"),
            locks: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, domain: &str, ext: &str) -> Result<PathBuf, TrustError> {
        Ok(self.dir.join(format!("{}.{ext}", check_domain(domain)?)))
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), TrustError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| TrustError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tmp = path.with_extension(format!("tmp-{}", hex::encode(rnd)));
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(io(path))
    }

    fn remove(&self, path: &Path) -> Result<bool, TrustError> {
        match fs::remove_file(path) {
            Ok(()) => {
                if let Ok(d) = File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(path)(e)),
        }
    }

    fn read_line(&self, path: &Path) -> Result<Option<String>, TrustError> {
        match fs::read_to_string(path) {
            Ok(s) => Ok(s.lines().next().map(|l| l.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// The retained secrets for `domain`, newest first. A missing file means none (first
    /// call, or the cache was lost); a corrupt one is an error the caller logs.
    pub fn retained(&self, domain: &str) -> Result<Vec<RetainedSecret>, TrustError> {
        let path = self.path(domain, "retained")?;
        let text = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let corrupt = |why: &str| TrustError::Corrupt {
            path: path.clone(),
            why: why.to_string(),
        };
        let text = std::str::from_utf8(&text).map_err(|_| corrupt("not text"))?;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut b = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(line, &mut b[..])
                .map_err(|_| corrupt("a line is not 64 hex digits"))?;
            out.push(RetainedSecret::from_bytes(*b));
        }
        out.truncate(MAX_RETAINED);
        Ok(out)
    }

    /// Keep `secret` as the newest retained secret for `domain` (older ones beyond
    /// [`MAX_RETAINED`] are forgotten).
    pub fn remember(&self, domain: &str, secret: &RetainedSecret) -> Result<(), TrustError> {
        let _g = self.lock_for(domain);
        let path = self.path(domain, "retained")?;
        // A corrupt file is replaced: the secrets in it are unusable anyway.
        let mut list = self.retained(domain).unwrap_or_default();
        list.retain(|s| s != secret);
        list.insert(0, secret.clone());
        list.truncate(MAX_RETAINED);
        let mut text = Zeroizing::new(String::with_capacity(65 * list.len()));
        for s in &list {
            text.push_str(&hex::encode(s.as_bytes()));
            text.push('\n');
        }
        self.write_atomic(&path, text.as_bytes())
    }

    /// Compare a presented key fingerprint (hex) with the pin.
    pub fn check_pin(&self, domain: &str, fingerprint: &str) -> Result<PinCheck, TrustError> {
        let path = self.path(domain, "pin")?;
        Ok(match self.read_line(&path)? {
            None => PinCheck::FirstUse,
            Some(p) if p.eq_ignore_ascii_case(fingerprint) => PinCheck::Same,
            Some(pinned) => PinCheck::Changed { pinned },
        })
    }

    /// Pin `fingerprint` for `domain` if nothing is pinned yet. Returns whether it pinned.
    pub fn pin_first_use(&self, domain: &str, fingerprint: &str) -> Result<bool, TrustError> {
        let _g = self.lock_for(domain);
        if self.check_pin(domain, fingerprint)? != PinCheck::FirstUse {
            return Ok(false);
        }
        let path = self.path(domain, "pin")?;
        self.write_atomic(
            &path,
            format!("{}\n", fingerprint.to_uppercase()).as_bytes(),
        )?;
        Ok(true)
    }

    /// Record a changed key that was refused, for an operator to accept.
    pub fn set_pending(&self, domain: &str, fingerprint: &str) -> Result<(), TrustError> {
        let path = self.path(domain, "pin-pending")?;
        self.write_atomic(
            &path,
            format!("{}\n", fingerprint.to_uppercase()).as_bytes(),
        )
    }

    /// `sipmail trust accept`: the refused key becomes the pin. The retained secrets are
    /// forgotten too: they belong to the old key's calls. Returns (old pin, new pin).
    pub fn accept_pending(&self, domain: &str) -> Result<(Option<String>, String), TrustError> {
        let _g = self.lock_for(domain);
        let pending_path = self.path(domain, "pin-pending")?;
        let new = self
            .read_line(&pending_path)?
            .filter(|l| !l.is_empty())
            .ok_or_else(|| TrustError::NothingPending(domain.to_string()))?;
        let pin_path = self.path(domain, "pin")?;
        let old = self.read_line(&pin_path)?;
        self.write_atomic(&pin_path, format!("{new}\n").as_bytes())?;
        self.remove(&pending_path)?;
        self.remove(&self.path(domain, "retained")?)?;
        Ok((old, new))
    }

    /// `sipmail trust reset`: forget everything about `domain` (pin, pending key, retained
    /// secrets). The next call is a first call again. Returns whether anything was removed.
    pub fn reset(&self, domain: &str) -> Result<bool, TrustError> {
        let _g = self.lock_for(domain);
        let mut any = false;
        for ext in ["pin", "pin-pending", "retained"] {
            any |= self.remove(&self.path(domain, ext)?)?;
        }
        Ok(any)
    }

    /// The state of every peer that has any.
    pub fn list(&self) -> Result<Vec<PeerState>, TrustError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut domains: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                ["retained", "pin", "pin-pending"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(&format!(".{ext}")).map(str::to_string))
            })
            .collect();
        domains.sort();
        domains.dedup();
        domains
            .into_iter()
            .map(|d| {
                Ok(PeerState {
                    retained: self.retained(&d).map(|v| v.len()).unwrap_or(0),
                    pinned: self.read_line(&self.path(&d, "pin")?)?,
                    pending: self.read_line(&self.path(&d, "pin-pending")?)?,
                    domain: d,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn retained_secrets_keep_the_newest_four_privately() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        assert!(s.retained("site-b.test").unwrap().is_empty());
        for i in 1..=6u8 {
            s.remember("site-b.test", &RetainedSecret::from_bytes([i; 32]))
                .unwrap();
        }
        let got = s.retained("SITE-B.test").unwrap();
        let firsts: Vec<u8> = got.iter().map(|r| r.as_bytes()[0]).collect();
        assert_eq!(firsts, vec![6, 5, 4, 3]);
        let path = dir.path().join("state/site-b.test.retained");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path().join("state")).unwrap().count(), 1);
        fs::write(&path, "not hex\n").unwrap();
        assert!(matches!(
            s.retained("site-b.test"),
            Err(TrustError::Corrupt { .. })
        ));
        assert!(s.path("../evil", "pin").is_err());
    }

    #[test]
    fn pins_change_only_through_accept_or_reset() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        assert_eq!(s.check_pin("b.test", "AA").unwrap(), PinCheck::FirstUse);
        assert!(s.pin_first_use("b.test", "aa").unwrap());
        assert!(!s.pin_first_use("b.test", "BB").unwrap());
        assert_eq!(s.check_pin("b.test", "AA").unwrap(), PinCheck::Same);
        assert_eq!(
            s.check_pin("b.test", "BB").unwrap(),
            PinCheck::Changed {
                pinned: "AA".into()
            }
        );
        assert!(matches!(
            s.accept_pending("b.test"),
            Err(TrustError::NothingPending(_))
        ));
        s.set_pending("b.test", "BB").unwrap();
        s.remember("b.test", &RetainedSecret::from_bytes([1; 32]))
            .unwrap();
        let l = s.list().unwrap();
        assert_eq!(
            l,
            vec![PeerState {
                domain: "b.test".into(),
                retained: 1,
                pinned: Some("AA".into()),
                pending: Some("BB".into())
            }]
        );
        assert_eq!(
            s.accept_pending("b.test").unwrap(),
            (Some("AA".into()), "BB".into())
        );
        assert_eq!(s.check_pin("b.test", "BB").unwrap(), PinCheck::Same);
        assert!(s.retained("b.test").unwrap().is_empty());
        assert!(s.reset("b.test").unwrap());
        assert_eq!(s.check_pin("b.test", "BB").unwrap(), PinCheck::FirstUse);
        assert!(!s.reset("b.test").unwrap());
    }
}
