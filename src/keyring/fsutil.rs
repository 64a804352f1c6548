//! Small file system helpers: private directories and atomic writes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::KeyringError;

/// Mode of the keyring directory and its `certs/` sub directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the keyring writes.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and parents) with mode 0700 if missing; tightens the
/// mode of an existing directory to 0700 if group or others have access.
pub fn ensure_private_dir(dir: &Path) -> Result<(), KeyringError> {
    match fs::metadata(dir) {
        Ok(md) if md.is_dir() => {
            let mode = md.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    "keyring directory had mode {mode:o}; tightening to 0700"
                );
                fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(|e| KeyringError::io("cannot chmod 0700", dir, e))?;
            }
            Ok(())
        }
        Ok(_) => Err(KeyringError::io(
            "not a directory:",
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "exists but is no directory",
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| KeyringError::io("cannot create directory", dir, e))?;
            // The umask may have removed bits we want (never added any);
            // set the exact mode.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| KeyringError::io("cannot chmod 0700", dir, e))
        }
        Err(e) => Err(KeyringError::io("cannot stat", dir, e)),
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically: a temporary file in the same
/// directory (mode 0600, created exclusively), fsync, then rename (or,
/// with `no_clobber`, hard link so that an existing file is never
/// replaced), then fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], no_clobber: bool) -> Result<(), KeyringError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp: PathBuf = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(|e| KeyringError::io("cannot create", &tmp, e))?;
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| KeyringError::io("cannot chmod 0600", &tmp, e))?;
        f.write_all(data)
            .map_err(|e| KeyringError::io("cannot write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| KeyringError::io("cannot fsync", &tmp, e))?;
        drop(f);
        if no_clobber {
            fs::hard_link(&tmp, path).map_err(|e| KeyringError::io("cannot create", path, e))?;
        } else {
            fs::rename(&tmp, path).map_err(|e| KeyringError::io("cannot replace", path, e))?;
        }
        Ok(())
    })();
    // After a rename the temporary name is gone already; after a hard
    // link or a failure it must go.
    let _ = fs::remove_file(&tmp);
    result?;

    crate::group_commit::fsync_dir(dir)
        .map_err(|e| KeyringError::io("cannot fsync directory", dir, e))
}

/// Reads a file, mapping errors to `KeyringError::Io`.
pub fn read(path: &Path) -> Result<Vec<u8>, KeyringError> {
    fs::read(path).map_err(|e| KeyringError::io("cannot read", path, e))
}

/// Warns if a file holding secrets is accessible by group or others.
pub fn warn_if_not_private(path: &Path) {
    if let Ok(md) = fs::metadata(path) {
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "secret key file has mode {mode:o}; it should be 0600 (chmod 600 it)"
            );
        }
    }
}
