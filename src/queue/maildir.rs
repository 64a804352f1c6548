//! Maildir delivery (tmp/ then new/), as qmail's maildir(5) describes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn ensure(dir: &Path) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    Ok(())
}

/// Deliver `prefix` (trace headers) followed by the body file into the Maildir. The file
/// appears in new/ only complete and fsynced. Blocking: call from spawn_blocking.
pub fn deliver(dir: &Path, hostname: &str, prefix: &[u8], body: &Path) -> io::Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    let name = format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        host
    );
    let tmp = dir.join("tmp").join(&name);
    let result = (|| {
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
        };
        // The folders exist (made at start); made again only if someone removed them.
        let mut out = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                ensure(dir)?;
                create()?
            }
            r => r?,
        };
        out.write_all(prefix)?;
        let mut src = fs::File::open(body)?;
        io::copy(&mut src, &mut out)?;
        out.sync_all()?;
        let dest = dir.join("new").join(&name);
        if let Err(e) = fs::rename(&tmp, &dest) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            ensure(dir)?;
            fs::rename(&tmp, &dest)?;
        }
        // Deliveries on several lanes at once share the fsync of new/.
        crate::group_commit::fsync_dir_shared(&dir.join("new"))?;
        Ok(dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery lands whole in new/, also after an operator removed the Maildir's
    /// folders while the relay ran (they are made again, not assumed).
    #[test]
    fn delivers_into_new_and_remakes_removed_folders() {
        let d = tempfile::tempdir().unwrap();
        let body = d.path().join("body");
        fs::write(&body, b"Subject: x\r\n\r\nhello\r\n").unwrap();
        let md = d.path().join("Maildir");
        ensure(&md).unwrap();
        let first = deliver(&md, "h", b"Delivered-To: a@b\r\n", &body).unwrap();
        assert_eq!(
            fs::read(&first).unwrap(),
            b"Delivered-To: a@b\r\nSubject: x\r\n\r\nhello\r\n"
        );
        fs::remove_dir(md.join("new").join("..").join("cur")).unwrap();
        fs::remove_file(&first).unwrap();
        fs::remove_dir(md.join("new")).unwrap();
        let again = deliver(&md, "h", b"", &body).unwrap();
        assert!(again.starts_with(md.join("new")));
        fs::remove_dir_all(&md).unwrap();
        let third = deliver(&md, "h", b"", &body).unwrap();
        assert_eq!(fs::read(&third).unwrap(), fs::read(&body).unwrap());
        assert!(md.join("cur").is_dir());
        assert_eq!(fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    }
}
