//! `sipmail reload`: tell the running daemon to read its config file and keyring again,
//! through its control socket, and print its answer (exit 1 when it refused).

use anyhow::{Context as _, Result, anyhow, bail};
use sipmail::relay::control::{self, ControlReply, ControlRequest};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn run(config: &Path) -> Result<ExitCode> {
    let spool = spool_of(config)?;
    let sock = control::socket_path(&spool);
    let reply = super::runtime()?
        .block_on(control::request(&spool, &ControlRequest::Reload))
        .with_context(|| format!("talking to the daemon on {}", sock.display()))?;
    match reply {
        Some(ControlReply::Reloaded { message }) => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Some(ControlReply::Error { message }) => {
            eprintln!("sipmail: {message}");
            Ok(ExitCode::FAILURE)
        }
        Some(other) => bail!(
            "unexpected answer from the daemon on {}: {other:?}",
            sock.display()
        ),
        None => bail!(
            "no sipmail daemon answers on {} (relay.spool in {}): none is running with this \
             config. Start it with `sipmail run --config {}`; it reads the config and the \
             keyring when it starts",
            sock.display(),
            config.display(),
            config.display()
        ),
    }
}

/// Where the daemon's control socket is: `relay.spool` of the file. Only that key is read
/// here, so that the daemon itself judges the rest of the file (and logs what it refuses);
/// a file that is not even TOML cannot say where the daemon is.
fn spool_of(config: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read", config.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: {}\nNothing was sent to the daemon (its control socket is found through \
             relay.spool in this file); a running daemon keeps the config it loaded. Fix the \
             file and run `sipmail reload` again.",
            config.display(),
            e.to_string().trim_end()
        )
    })?;
    match table
        .get("relay")
        .and_then(|r| r.get("spool"))
        .and_then(|s| s.as_str())
    {
        Some(s) => Ok(PathBuf::from(s)),
        None => bail!(
            "{}: relay.spool: missing; it says where the daemon's control socket is",
            config.display()
        ),
    }
}
