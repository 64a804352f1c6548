//! Command-line interface.

mod audit;
mod dns;
mod logging;
mod queue;
mod receipts;
mod reload;
mod send;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sipmail::config::Config;
use sipmail::keyring::{Imported, Keyring, format_fingerprint};
use std::path::PathBuf;
use std::process::ExitCode;

/// sipmail: a drop-in SMTP smarthost that carries mail between sites through signed SIP
/// calls and ChaCha20-Poly1305 encrypted streams, with no certificate authority.
///
/// Start with `sipmail demo`. For a real site: `sipmail keys generate`, exchange certs with
/// your partner (`keys export` / `keys import`), write a config (see config/site-a.toml),
/// then `sipmail run --config FILE` and point your MTA's relayhost at it.
#[derive(Parser, Debug)]
#[command(name = "sipmail", version, about, long_about)]
struct Cli {
    /// Log filter, as RUST_LOG (e.g. "info", "sipmail=debug"). RUST_LOG wins if set.
    /// Default: "info", or "warn" for the demo.
    #[arg(long, global = true)]
    log: Option<String>,
    /// How log lines on standard error are written: `text`, or `json` for one JSON object
    /// per line with the queue ID, Call-ID and peer as fields (for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SIPMAIL_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the relay daemon. SIGTERM or Ctrl-C stops it cleanly; SIGHUP reloads the config
    /// file and the keyring without a restart (as `sipmail reload`).
    Run {
        /// The TOML configuration file (see config/site-a.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make the running daemon read its config file and keyring again, without a restart:
    /// peers added, removed or changed, certificates imported or revoked, limits and queue
    /// times. Calls and mail in progress are untouched. A file with an error, or one that
    /// changes a setting read only at start (listen addresses, spool, domain...), is
    /// refused and the old config stays in force: the error is printed and logged, and the
    /// exit status is 1.
    Reload {
        /// The daemon's configuration file (the one it was started with).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and its keyring, then exit: 0 if usable.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run site A and site B in one process on loopback with fresh keys, send mail from A
    /// to B through a signed call, and report what happened (Cargo feature `demo`, on by default).
    Demo {
        /// How many messages to send.
        #[arg(long, default_value_t = 10)]
        messages: usize,
        /// Delete the temporary folder (keys, spools, Maildir) at the end instead of
        /// keeping it for you to look at.
        #[arg(long)]
        cleanup: bool,
    },
    /// Look at and act on the queue: list, show, retry, delete, hold, release, expire. On
    /// the running daemon (through its control socket), or on the spool files directly
    /// when no daemon runs.
    Queue {
        /// The daemon's configuration file (for the spool location).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Check a call's audit record: the signed transcript, both OpenPGP signatures (against
    /// the keyring), and the fingerprints, suite and transcript hash the record claims.
    ///
    /// Records are written per established call to <spool>/calls/<YYYY-MM-DD>/ (config
    /// `[audit]`). Exit status: 0 verified; 1 failed (altered record or bad signature) or the
    /// record cannot be read; 2 incomplete (a signature could not be checked: no keyring or
    /// unknown certificate). The SAS derives from the call's secret, which is never
    /// recorded: check it with --compare against the partner's record of the same call.
    ///
    /// For an audit with GnuPG alone: --export DIR writes answer.data answer.sig
    /// confirm.data confirm.sig (and the signers' certs from the keyring), then
    /// `gpg --verify DIR/answer.sig DIR/answer.data`. See docs/AUDIT.md.
    VerifyCall {
        /// The call record (a JSON file).
        record: PathBuf,
        /// The keyring holding both signers' certificates (a relay's own keyring will do).
        #[arg(long, conflicts_with = "config")]
        keyring: Option<PathBuf>,
        /// Take the keyring from this relay configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The partner's record of the same call: the SAS, transcript and signed data must
        /// be the same on both sides.
        #[arg(long, value_name = "RECORD")]
        compare: Option<PathBuf>,
        /// Write the signed data and signatures into DIR for `gpg --verify` (written even
        /// when verification fails, so that GnuPG can confirm the failure).
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
    /// Manage the relay's OpenPGP identity and its partners' certificates.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Pre-shared keys for peers with trust = "psk".
    Psk {
        #[command(subcommand)]
        cmd: PskCmd,
    },
    /// Show what a relay would find in DNS for DOMAIN: its relays (SRV _sipmail._udp and
    /// _sipmail._tcp, RFC 3263; or the A/AAAA fallback), its key (OPENPGPKEY for mail@DOMAIN,
    /// RFC 7929), whether each answer is DNSSEC-secure (the resolver's AD bit), and whether
    /// the key would be trusted under trust = "dnssec" (against the pin in the spool named
    /// by --config). Nothing is written. Exit status 0 when a relay with this config would
    /// deliver to DOMAIN, 1 when not (the output says why).
    Discover {
        /// The relay's configuration: its [dns] resolver, [discovery], [[peer]] and spool.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask this validating resolver (IP:PORT) instead of the config's [dns] resolver.
        #[arg(long, value_name = "IP:PORT")]
        resolver: Option<std::net::SocketAddr>,
        /// The bound on each DNS question, e.g. 5s (default: the config's, else 5s).
        #[arg(long, value_parser = sipmail::config::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// The partner's mail domain, e.g. site-b.test.
        domain: String,
    },
    /// Send documents to a partner and wait for its signed receipt: each FILE becomes a MIME
    /// attachment of one message, handed to the running relay (its smtp.listen), which
    /// sends it through a signed call. Shows the upload, then waits until the partner's
    /// receipt is stored and verifies. Exit status 0 only with a verified receipt covering
    /// every recipient; 1 if the message bounced or no receipt came within --wait (it stays
    /// queued and is still retried).
    Send(send::SendArgs),
    /// The signed receipts partners returned for the mail this relay sent:
    /// list, show, verify again, export for `gpg --verify`. A partner with trust = "signed"
    /// returns one per message once it has the message on stable storage; the relay checks
    /// it and stores it in <spool>/receipts/sent/ before it counts the message delivered.
    Receipts {
        /// The relay's configuration file (for the spool and the keyring).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: receipts::ReceiptsCmd,
    },
    /// Per-peer trust state kept in <spool>/state: keys pinned on first use (peers with
    /// trust = "opportunistic") and the retained secrets of key continuity. The daemon reads
    /// it at each call, so changes take effect on the next call without a restart.
    Trust {
        /// The daemon's configuration file (for the spool location).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: TrustCmd,
    },
    /// The daemon's hand-off agent (started by `sipmail run`, not by hand): makes the SMTP
    /// hand-offs to the site's MTA and to SMTP next hops in a process of its own, so that
    /// a killed daemon does not cut one off between the end of the message and the
    /// reply. Reads requests on standard input; stops when it ends.
    #[command(hide = true)]
    HandoffAgent {
        /// The daemon's spool (relay.spool).
        #[arg(long)]
        spool: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PskCmd {
    /// Make a new pre-shared key: 32 random bytes in base64, one line, the only form a
    /// psk_file may hold (a passphrase is refused: it could be guessed offline from one
    /// call's answer). Give the partner the same file over a channel you trust, and use a
    /// different key for each peer.
    Generate {
        /// Write the key to FILE (mode 0600; an existing file is never overwritten)
        /// instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TrustCmd {
    /// Each peer's trust policy, pinned key, key waiting for acceptance, and how many
    /// retained secrets are held.
    List,
    /// Accept one of the keys an opportunistic peer presented and proved (its signature
    /// verified) but was refused for: a changed key, or a first call from an address that
    /// is not the peer's; or (trust = "dnssec", discovered partners) a changed key found in
    /// DNSSEC-secure DNS that the pinned key did not certify. It becomes the pin; the other pending keys are dropped. Check the
    /// fingerprint with the partner first (`sipmail keys fingerprint` on their side); `trust
    /// list` shows what is pending.
    Accept {
        /// The peer's domain, e.g. site-b.test.
        domain: String,
        /// The fingerprint to pin, as the partner read it to you (spaces allowed); it must
        /// be one of the pending keys.
        fingerprint: String,
    },
    /// Forget everything about a peer: its pin, a pending key, its retained secrets. The
    /// next call is a first call again (use after a partner lost its cache, when
    /// continuity = "require" refuses it, once you know why).
    Reset {
        /// The peer's domain, e.g. site-b.test.
        domain: String,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Every queued message with its recipients' states, and totals per destination.
    List,
    /// One message: envelope, per-recipient state and its headers.
    Show { id: String },
    /// Retry now: one message, or all of them (held messages stay held).
    Retry { id: Option<String> },
    /// Remove a message from the queue for good (no bounce is sent; see `expire`).
    Delete { id: String },
    /// Keep messages in the queue without trying them until `queue release`. It survives a
    /// restart (a mark in the spool); `queue list` shows them as held. A delivery already
    /// under way finishes. A held message does not expire.
    Hold {
        /// Queue IDs (as `queue list` shows them).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
    },
    /// Let held messages go: they are tried at once, then on the normal schedule.
    Release {
        /// Queue IDs of held messages.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every held message.
        #[arg(long)]
        all: bool,
    },
    /// Give up on messages now: each pending recipient fails as if the message were older
    /// than queue.max_age (status 4.4.7), the sender gets a delivery status notification
    /// (bounce, as the sender's NOTIFY allows), and the message leaves the queue. A
    /// delivery under way finishes first. With no daemon running, the messages are
    /// marked and bounced when it starts.
    Expire {
        /// Queue IDs.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Create this relay's key: Ed25519, user ID mail@DOMAIN, no passphrase (file mode 0600).
    /// An existing key is never overwritten.
    Generate {
        #[arg(long)]
        keyring: PathBuf,
        #[arg(long)]
        domain: String,
        /// Key rotation: add a new key beside the existing one (secret-FPR.asc). The relay
        /// signs with the newest key from its next start (unless relay.signing_key names
        /// another), so give partners the new cert first: `keys export --fingerprint NEW`.
        #[arg(long)]
        rotate: bool,
    },
    /// Print the DNS records partners' relays look up to reach this relay without a
    /// [[peer]]: SRV _sipmail._udp and _sipmail._tcp (where it takes calls; dedicated
    /// names, so the company's own _sip._udp VoIP service is untouched) and OPENPGPKEY for
    /// mail@DOMAIN (its key, RFC 7929), in zone-file form. Add them to the zone and sign it
    /// with DNSSEC: the key is trusted only from a DNSSEC-secure answer. After a rotation
    /// (`keys generate --rotate`) the key printed is the new one, certified by the older
    /// own keys in the keyring, so relays that pinned the old key take the new one.
    Publish {
        /// The relay's configuration (domain, keyring, sip.listen / sip.advertise).
        #[arg(long, short)]
        config: PathBuf,
        /// The SRV target host (default: relay.hostname); it needs an A/AAAA record.
        #[arg(long, value_name = "HOST")]
        target: Option<String>,
        /// The records' TTL in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u32,
    },
    /// Print this relay's public certificate, ASCII-armored, to give to partners.
    Export {
        #[arg(long)]
        keyring: PathBuf,
        /// Export this own key instead of the signing one (e.g. a key being rotated in).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Remove a partner certificate (e.g. a partner's retired key after a rotation).
    /// A running daemon using this keyring is told to reload it: calls signed by it are
    /// refused from then on.
    Remove {
        #[arg(long)]
        keyring: PathBuf,
        /// Fingerprint of the partner certificate.
        fingerprint: String,
    },
    /// Import a partner's certificate, a revocation of one, or this relay's own secret key
    /// (from `gpg --armor --export-secret-keys` or `sq key generate`).
    ///
    /// A partner certificate counts for one peer only: the domain of its mail@DOMAIN user
    /// ID, or, if it has user IDs for several domains, the one given with --peer (without
    /// it, such a certificate is refused). A running daemon using this keyring is told to
    /// reload it, so the change takes effect without a restart.
    Import {
        #[arg(long)]
        keyring: PathBuf,
        /// The partner domain this certificate is for (needed when its user IDs name
        /// several domains); it counts for no other.
        #[arg(long, value_name = "DOMAIN")]
        peer: Option<String>,
        /// File to import ("-" for standard input).
        file: PathBuf,
    },
    /// List the own key and the partner certificates.
    List {
        #[arg(long)]
        keyring: PathBuf,
    },
    /// Print the own key's fingerprint in groups, to read over the phone.
    Fingerprint {
        #[arg(long)]
        keyring: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.cmd {
        Cmd::Demo { .. } | Cmd::VerifyCall { .. } => "warn",
        _ => "info",
    };
    let level = cli.log.clone().unwrap_or_else(|| default.to_string());
    logging::init(cli.log_format, &level);
    let json = cli.log_format == logging::LogFormat::Json;
    // The daemon's hand-off agent logs as the daemon does.
    let agent_args = {
        use clap::ValueEnum;
        let format = cli
            .log_format
            .to_possible_value()
            .map_or_else(|| "text".to_string(), |v| v.get_name().to_string());
        ["--log-format", &format, "--log", &level, "handoff-agent"]
            .map(std::ffi::OsString::from)
            .to_vec()
    };
    match dispatch(cli.cmd, agent_args) {
        Ok(code) => code,
        Err(e) => {
            // A JSON log stays all JSON, to its last line.
            if json {
                tracing::error!(error = %format!("{e:#}"), "sipmail: error");
            } else {
                eprintln!("sipmail: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The most threads tokio's blocking pool may run at once: 8 per core, at least 16.
///
/// The pool runs the relay's file work (commits, fsyncs, record logs, Maildir writes),
/// short tasks that end once the disk has answered. tokio's default bound, 512, let a busy
/// relay grow a thread for nearly every task in flight: each hand-off then woke a sleeping
/// thread, and the pool's lock was contended (threads spinning on it with `sched_yield`).
/// With the bound, a thread that finishes a task takes the next queued one without
/// sleeping, and a group commit still gathers every writer in flight. On two cores, 16
/// against 512: more msg/s in 17 of 21 interleaved pairs, a few percent, most with many
/// sessions in flight (docs/PERFORMANCE.md, run 24). Work that waits on something other
/// than the disk does not run in the pool, so that it cannot fill with tasks that wait on
/// each other or on the network: a body's file loop (`src/queue/bodyio.rs`) and a host
/// name's lookup (`src/dns/system.rs`) have threads of their own.
fn blocking_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (8 * cores).max(16)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads())
        .build()
        .context("starting the async runtime")
}

fn dispatch(cmd: Cmd, agent_args: Vec<std::ffi::OsString>) -> Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            let agent = sipmail::relay::AgentCommand {
                program: std::env::current_exe()
                    .context("finding this program, to start its hand-off agent")?,
                args: agent_args,
            };
            runtime()?.block_on(async move {
                let shutdown = sipmail::relay::Shutdown::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("signal received: stopping (sessions in progress finish, calls end with BYE)");
                    s.trigger();
                });
                sipmail::relay::run(cfg, shutdown, Some(agent)).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reload { config } => reload::run(&config),
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            let kr = sipmail::relay::check_keyring(&cfg)?;
            println!(
                "{}: ok. Relay for {} with key {} and {} peer(s).",
                cfg.file,
                cfg.domain,
                format_fingerprint(&kr.own_fingerprint()?),
                cfg.peers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Cmd::Demo { messages, cleanup } => {
            let ok = runtime()?.block_on(sipmail::demo::run(messages, cleanup))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        // Built with `--no-default-features`: the test bed was left out (Cargo feature `demo`).
        #[cfg(not(feature = "demo"))]
        Cmd::Demo { .. } => anyhow::bail!(
            "this sipmail was built without the demo (--no-default-features); try it from \
             the source tree with `cargo run --release -- demo`"
        ),
        Cmd::Keys { cmd } => keys(cmd),
        Cmd::Discover {
            config,
            resolver,
            timeout,
            domain,
        } => {
            let cfg = config.as_deref().map(Config::load).transpose()?;
            runtime()?.block_on(dns::discover(cfg.as_ref(), resolver, timeout, &domain))
        }
        Cmd::Psk {
            cmd: PskCmd::Generate { out },
        } => {
            use sipmail::config::Psk;
            match out {
                Some(path) => {
                    Psk::generate_file(&path).map_err(anyhow::Error::msg)?;
                    eprintln!(
                        "Wrote a new pre-shared key to {p} (mode 0600).\n\
                         Give the partner a copy over a channel you trust, and set in both [[peer]] sections:\n  \
                         trust = \"psk\"\n  psk_file = \"{p}\"",
                        p = path.display()
                    );
                }
                None => print!("{}", *Psk::generate().map_err(anyhow::Error::msg)?.1),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::VerifyCall {
            record,
            keyring,
            config,
            compare,
            export,
        } => audit::verify_call(&record, keyring, config, compare, export),
        Cmd::Trust { config, cmd } => {
            let config =
                config.context("sipmail trust needs --config FILE (the daemon's configuration)")?;
            let cfg = Config::load(&config)?;
            trust(&cfg, cmd)
        }
        Cmd::Send(args) => send::run(args),
        Cmd::HandoffAgent { spool } => {
            // One thread: it waits on sockets and pipes, and must not compete with the
            // daemon for the cores.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(sipmail::relay::serve_handoff_agent(spool))
                .context("hand-off agent")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Receipts { config, cmd } => {
            let config = config
                .context("sipmail receipts needs --config FILE (the relay's configuration)")?;
            let cfg = Config::load(&config)?;
            receipts::run(&cfg, cmd)
        }
        Cmd::Queue { config, json, cmd } => {
            let config =
                config.context("sipmail queue needs --config FILE (the daemon's configuration)")?;
            let cfg = Config::load(&config)?;
            runtime()?.block_on(queue::run(&cfg, cmd, json))
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Unix seconds as UTC `YYYY-MM-DD HH:MM:SS` ("unknown" for 0).
fn unix_time(t: u64) -> String {
    if t == 0 {
        return "unknown".into();
    }
    sipmail::time::utc_datetime_secs(t as i64)
}

fn trust(cfg: &Config, cmd: TrustCmd) -> Result<ExitCode> {
    use sipmail::relay::trust::TrustStore;
    let store = TrustStore::new(&cfg.spool);
    let known = |domain: &str| -> Result<String> {
        let d = domain.trim().to_ascii_lowercase();
        if cfg.peer(&d).is_none() && !cfg.discovery.as_ref().is_some_and(|x| x.allows(&d)) {
            anyhow::bail!(
                "{d} is not a [[peer]] in {}, nor a domain its [discovery] allows",
                cfg.file
            );
        }
        Ok(d)
    };
    match cmd {
        TrustCmd::List => {
            let states = store.list()?;
            // Configured peers, then partners found through [discovery] that have state.
            let mut listed = cfg.peers.clone();
            for st in &states {
                if cfg.peer(&st.domain).is_none()
                    && cfg.discovery.as_ref().is_some_and(|d| d.allows(&st.domain))
                {
                    listed.push(sipmail::config::Peer::discovered(&st.domain));
                }
            }
            for p in &listed {
                let st = states.iter().find(|s| s.domain == p.domain);
                println!(
                    "{}  trust={} continuity={:?}  retained={}  pinned={}{}",
                    p.domain,
                    match p.trust {
                        sipmail::config::Trust::Dnssec if cfg.peer(&p.domain).is_none() =>
                            "dnssec (discovered)".to_string(),
                        sipmail::config::Trust::Dnssec => "dnssec".to_string(),
                        _ => p.trust.mode().to_string(),
                    },
                    p.continuity,
                    st.map_or(0, |s| s.retained),
                    st.and_then(|s| s.pinned.as_deref())
                        .map(format_fingerprint)
                        .unwrap_or_else(|| "-".into()),
                    if st.is_some_and(|s| !s.pending.is_empty()) {
                        format!(
                            "\n  PENDING (refused; after checking with the partner: `sipmail trust accept {} FINGERPRINT`):",
                            p.domain
                        )
                    } else {
                        String::new()
                    },
                );
                for k in st.map(|s| s.pending.as_slice()).unwrap_or_default() {
                    println!(
                        "    {}  seen {} time(s), first {}, last {}, from {}",
                        format_fingerprint(&k.fingerprint),
                        k.count,
                        unix_time(k.first_seen),
                        unix_time(k.last_seen),
                        k.from
                    );
                }
            }
        }
        TrustCmd::Accept {
            domain,
            fingerprint,
        } => {
            let d = known(&domain)?;
            let (old, new) = store.accept_pending(&d, &fingerprint)?;
            println!(
                "{d}: now pinned {} (was {}); its retained secrets were forgotten",
                format_fingerprint(&new),
                old.as_deref()
                    .map(format_fingerprint)
                    .unwrap_or_else(|| "nothing".into())
            );
        }
        TrustCmd::Reset { domain } => {
            let d = known(&domain)?;
            if store.reset(&d)? {
                println!("{d}: pin and retained secrets forgotten; the next call is a first call");
            } else {
                println!("{d}: no trust state to forget");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Tell the daemon using `keyring` (if one runs) to reload it, and say what happened: the
/// keyring on disk has changed either way.
fn notify_daemon(keyring: &std::path::Path) {
    use sipmail::relay::control::{ControlReply, reload_keyring};
    let reply = runtime().and_then(|rt| Ok(rt.block_on(reload_keyring(keyring))?));
    match reply {
        Ok(Some(ControlReply::Reloaded { message })) => {
            println!("The running daemon reloaded: {message}")
        }
        Ok(Some(ControlReply::Error { message })) => eprintln!(
            "sipmail: warning: the running daemon did not take the change: {message}\n\
             Fix the keyring (or the config file it names), then run `sipmail reload` or this again."
        ),
        Ok(Some(_)) => eprintln!("sipmail: warning: unexpected answer from the daemon"),
        Ok(None) => println!(
            "No running daemon uses {} (none answers on the socket named in {}): the change \
             takes effect when it starts. If one runs elsewhere, send it SIGHUP (kill -HUP PID).",
            keyring.display(),
            keyring
                .join(sipmail::relay::control::KEYRING_POINTER)
                .display()
        ),
        Err(e) => eprintln!(
            "sipmail: warning: could not reach the daemon using {}: {e:#}; send it SIGHUP \
             (kill -HUP PID) so that it reloads its keyring",
            keyring.display()
        ),
    }
}

fn keys(cmd: KeysCmd) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Publish {
            config,
            target,
            ttl,
        } => {
            return dns::publish(&Config::load(&config)?, target, ttl);
        }
        KeysCmd::Generate {
            keyring,
            domain,
            rotate: true,
        } => {
            let info = Keyring::generate_additional(&keyring, &domain)?;
            println!(
                "Generated {} for {} in {} beside the existing key(s).\n\
                 1. Announce it: give partners the output of: sipmail keys export --keyring {} --fingerprint {}\n\
                 2. Once they have imported it, reload the relay (`kill -HUP PID`, or restart it): it signs with the newest key.\n\
                 3. Then partners retire the old key: sipmail keys remove --keyring THEIRS OLD-FINGERPRINT (or import its revocation).",
                format_fingerprint(&info.fingerprint),
                info.user_ids.join(", "),
                keyring.display(),
                keyring.display(),
                info.fingerprint
            );
        }
        KeysCmd::Generate {
            keyring, domain, ..
        } => {
            let info = Keyring::generate(&keyring, &domain)?;
            println!(
                "Generated {} for {} in {}\nGive your partners the output of: sipmail keys export --keyring {}",
                format_fingerprint(&info.fingerprint),
                info.user_ids.join(", "),
                keyring.display(),
                keyring.display()
            );
        }
        KeysCmd::Export {
            keyring,
            fingerprint,
        } => {
            let kr = Keyring::open(&keyring)?;
            match fingerprint {
                Some(f) => print!("{}", kr.export_public_of(&f)?),
                None => print!("{}", kr.export_public()?),
            }
        }
        KeysCmd::Remove {
            keyring,
            fingerprint,
        } => {
            let fpr: String = fingerprint
                .trim()
                .trim_start_matches("0x")
                .chars()
                .filter(|c| c.is_ascii_hexdigit())
                .collect::<String>()
                .to_uppercase();
            let path = keyring.join("certs").join(format!("{fpr}.asc"));
            std::fs::remove_file(&path).with_context(|| {
                format!(
                    "{}: no partner certificate {fpr} (see sipmail keys list)",
                    path.display()
                )
            })?;
            let binding = keyring
                .join("certs")
                .join(format!("{fpr}.{}", sipmail::keyring::BINDING_EXT));
            let _ = std::fs::remove_file(binding);
            println!("Removed partner certificate {}", format_fingerprint(&fpr));
            notify_daemon(&keyring);
        }
        KeysCmd::Import {
            keyring,
            peer,
            file,
        } => {
            let data = if file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                v
            } else {
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
            };
            match Keyring::import_for(&keyring, &data, peer.as_deref())? {
                Imported::OwnSecretKey {
                    fingerprint,
                    user_ids,
                } => println!(
                    "Imported this relay's own secret key {} ({})",
                    format_fingerprint(&fingerprint),
                    user_ids.join(", ")
                ),
                Imported::PartnerCert {
                    fingerprint,
                    user_ids,
                } => {
                    let bound = Keyring::peer_binding(&keyring, &fingerprint)?
                        .unwrap_or_else(|| "?".into());
                    println!(
                        "Imported partner certificate {} ({}); it counts for peer {bound} only",
                        format_fingerprint(&fingerprint),
                        user_ids.join(", ")
                    )
                }
                Imported::Revocation { fingerprint } => println!(
                    "Imported a revocation of partner certificate {}: calls with that key are refused once the daemon has reloaded its keyring",
                    format_fingerprint(&fingerprint)
                ),
            }
            notify_daemon(&keyring);
        }
        KeysCmd::List { keyring } => {
            let kr = Keyring::open(&keyring)?;
            let list = kr.list();
            if list.is_empty() {
                println!(
                    "{}: empty. Create a key with: sipmail keys generate --keyring {} --domain YOUR.DOMAIN",
                    keyring.display(),
                    keyring.display()
                );
            }
            for k in list {
                let bound = if k.own {
                    String::new()
                } else {
                    match Keyring::peer_binding(&keyring, &k.fingerprint)? {
                        Some(d) => format!("  for peer {d}"),
                        None => String::new(),
                    }
                };
                println!(
                    "{} {}  {}  {}{bound}",
                    if k.own { "own    " } else { "partner" },
                    format_fingerprint(&k.fingerprint),
                    k.user_ids.join(", "),
                    k.algo
                );
            }
            if let Err(e) = kr.check_bindings() {
                eprintln!("sipmail: warning: {e}");
            }
        }
        KeysCmd::Fingerprint { keyring } => {
            println!(
                "{}",
                format_fingerprint(&Keyring::open(&keyring)?.own_fingerprint()?)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
