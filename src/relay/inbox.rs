//! A partner's inbox directory (`[[peer]] inbox`, issue 14): the attachments of the
//! partner's messages, written where a business application picks them up.
//!
//! Each file is written to `DIR/tmp/`, fsynced, and renamed into `DIR`, so an application
//! watching `DIR` never sees a partial file. A name that could leave the directory (`/`,
//! `\`, `..`, a NUL or other control character, a leading dot, over 255 bytes) is refused
//! with an error naming it; the message itself is still delivered to the mailbox, so
//! nothing is lost. Writing is idempotent: a retry after a failure finds the files already
//! there with the same bytes and writes nothing twice; another file of the same name is
//! kept apart as `STEM.<queue ID>.EXT`.

use crate::group_commit::fsync_dir;
use mail_parser::MimeHeaders;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why an attachment's file name is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadName {
    #[error("the attachment has no file name")]
    Missing,
    #[error("{0:?}: a file name may not contain '/', '\\\\' or NUL, or be \".\" or \"..\"")]
    Escapes(String),
    #[error("{0:?}: a file name may not contain control characters or start with a dot")]
    Unsafe(String),
    #[error("{0:?}: a file name is at most 255 bytes")]
    TooLong(String),
}

/// `name` if it is safe as one path component inside the inbox.
pub(crate) fn check_name(name: Option<&str>) -> Result<&str, BadName> {
    let name = name.ok_or(BadName::Missing)?;
    if name.is_empty() {
        return Err(BadName::Missing);
    }
    if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(BadName::Escapes(name.to_string()));
    }
    if name.starts_with('.') || name.chars().any(char::is_control) {
        return Err(BadName::Unsafe(name.to_string()));
    }
    if name.len() > 255 {
        return Err(BadName::TooLong(name.to_string()));
    }
    Ok(name)
}

/// What happened to one attachment.
#[derive(Debug)]
pub(crate) enum Written {
    /// Written (or already there with the same bytes) at this path.
    File(PathBuf),
    /// Not written: its name was refused.
    Refused(BadName),
}

/// Writes every attachment of the message in `body_path` into `dir`. I/O errors (a full
/// disk) are returned, so the delivery is retried; refused names are reported, not errors.
pub(crate) fn write_attachments(
    dir: &Path,
    queue_id: &str,
    body_path: &Path,
) -> io::Result<Vec<Written>> {
    let raw = fs::read(body_path)?;
    let Some(msg) = mail_parser::MessageParser::default().parse(&raw[..]) else {
        return Ok(Vec::new());
    };
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    let mut out = Vec::new();
    for (i, part) in msg.attachments().enumerate() {
        let name = match check_name(part.attachment_name()) {
            Ok(n) => n,
            Err(e) => {
                out.push(Written::Refused(e));
                continue;
            }
        };
        let bytes = part.contents();
        let mut target = dir.join(name);
        if let Ok(existing) = fs::read(&target) {
            if existing == bytes {
                out.push(Written::File(target));
                continue;
            }
            let p = Path::new(name);
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
            target = dir.join(match p.extension().and_then(|e| e.to_str()) {
                Some(ext) => format!("{stem}.{queue_id}.{ext}"),
                None => format!("{stem}.{queue_id}"),
            });
            if fs::read(&target).is_ok_and(|e| e == bytes) {
                out.push(Written::File(target));
                continue;
            }
        }
        let t = tmp.join(format!("{queue_id}.{i}"));
        let mut f = fs::File::create(&t)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&t, &target)?;
        out.push(Written::File(target));
    }
    fsync_dir(dir)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_inbox_are_refused() {
        for ok in ["invoice 42.pdf", "Rechnung-März.xml", "a", "x.tar.gz"] {
            assert_eq!(check_name(Some(ok)), Ok(ok));
        }
        assert_eq!(check_name(None), Err(BadName::Missing));
        assert_eq!(check_name(Some("")), Err(BadName::Missing));
        for esc in [
            "../etc/passwd",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "..",
            ".",
            "a\0b",
        ] {
            assert!(
                matches!(check_name(Some(esc)), Err(BadName::Escapes(_))),
                "{esc}"
            );
        }
        for bad in [".hidden", "a\nb", "a\rb", "a\u{7f}b"] {
            assert!(
                matches!(check_name(Some(bad)), Err(BadName::Unsafe(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            check_name(Some(&"a".repeat(256))),
            Err(BadName::TooLong(_))
        ));
        let e = check_name(Some("../x")).unwrap_err().to_string();
        assert!(e.contains("\"../x\""), "{e}");
    }

    #[test]
    fn attachments_are_written_once_and_same_names_kept_apart() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        fs::create_dir_all(&inbox).unwrap();
        let msg = |content: &str| {
            format!(
                "From: a@x\r\nTo: b@y\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n\
                 --B\r\nContent-Type: text/plain\r\n\r\nhello\r\n\
                 --B\r\nContent-Type: application/octet-stream\r\n\
                 Content-Disposition: attachment; filename=\"r.txt\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
                 --B\r\nContent-Type: application/octet-stream\r\n\
                 Content-Disposition: attachment; filename=\"../escape.txt\"\r\n\r\nx\r\n\
                 --B--\r\n",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, content)
            )
        };
        let m1 = d.path().join("m1");
        fs::write(&m1, msg("first")).unwrap();
        let w = write_attachments(&inbox, "Q1", &m1).unwrap();
        assert!(matches!(&w[0], Written::File(p) if p == &inbox.join("r.txt")));
        assert!(matches!(&w[1], Written::Refused(BadName::Escapes(_))));
        assert_eq!(fs::read(inbox.join("r.txt")).unwrap(), b"first");
        assert!(!d.path().join("escape.txt").exists());
        // The same delivery again (a retry): nothing new.
        write_attachments(&inbox, "Q1", &m1).unwrap();
        // Another message with a file of the same name: kept apart, both intact.
        let m2 = d.path().join("m2");
        fs::write(&m2, msg("second")).unwrap();
        write_attachments(&inbox, "Q2", &m2).unwrap();
        assert_eq!(fs::read(inbox.join("r.txt")).unwrap(), b"first");
        assert_eq!(fs::read(inbox.join("r.Q2.txt")).unwrap(), b"second");
        let mut names: Vec<_> = fs::read_dir(&inbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["r.Q2.txt", "r.txt", "tmp"]);
    }
}
