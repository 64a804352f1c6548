//! Whether the spool takes a message right now, tested by writing: what `/readyz` asks.

use super::Spool;
use std::fs;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static PROBES: AtomicU64 = AtomicU64::new(0);

impl Spool {
    /// The steps of a commit on a small file: create and write it in `tmp/`, fsync it,
    /// rename it into `queue/`, then remove it. The error names the step and the path.
    /// The name ends in `.probe`, which start-up recovery and the scans ignore.
    pub fn probe_write(&self) -> io::Result<()> {
        let name = format!(
            "ready-{}-{}.probe",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        );
        let (tmp, queued) = (self.tmp.join(&name), self.queue.join(&name));
        let named = |what: &str, p: &std::path::Path| {
            let p = p.display().to_string();
            let what = what.to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
        };
        let written = fs::File::create(&tmp)
            .map_err(named("creating", &tmp))
            .and_then(|mut f| {
                f.write_all(b"sipmail readiness probe\n")
                    .and_then(|()| f.sync_all())
                    .map_err(named("writing", &tmp))
            })
            .and_then(|()| fs::rename(&tmp, &queued).map_err(named("renaming into", &queued)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        fs::remove_file(&queued).map_err(named("removing", &queued))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_writes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        spool.probe_write().unwrap();
        for sub in ["tmp", "queue"] {
            assert_eq!(
                fs::read_dir(dir.path().join(sub)).unwrap().count(),
                0,
                "{sub}/ is empty again"
            );
        }
        // A spool whose tmp/ is gone cannot take mail: the error says where.
        fs::remove_dir(dir.path().join("tmp")).unwrap();
        let e = spool.probe_write().unwrap_err().to_string();
        assert!(e.starts_with("creating "), "{e}");
        assert!(e.contains("tmp/ready-"), "{e}");
    }
}
