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
    ensure(dir)?;
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
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        out.write_all(prefix)?;
        let mut src = fs::File::open(body)?;
        io::copy(&mut src, &mut out)?;
        out.sync_all()?;
        let dest = dir.join("new").join(&name);
        fs::rename(&tmp, &dest)?;
        fs::File::open(dir.join("new"))?.sync_all()?;
        Ok(dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
