//! A partner's outbox directory (`[[peer]] outbox`, issue 14): each file renamed into it
//! is sent to the partner as one message, and leaves the outbox only to `sent/` (with the
//! partner's signed receipt beside it) or to `failed/` (with the reason). Never dropped.
//!
//! Layout: `DIR/` (where files are dropped, by rename), `DIR/tmp/` (write there first),
//! `DIR/.work/` (files taken, each with `NAME.qid`, its queue ID, and `NAME.queued` once
//! committed), `DIR/sent/`, `DIR/failed/`.
//!
//! Only complete files are taken: regular files in `DIR` itself, not hidden, not ending in
//! `.tmp` or `.part`, and not modified for [`SETTLE`] (a writer that writes in place keeps
//! the modification time fresh). The state of each taken file is in `.work/`, written before
//! each step, so a restart at any point neither loses a file nor sends it twice:
//! - `.qid` without `.queued`, queue ID not in the spool: the commit never happened; it is
//!   queued now, under the same ID;
//! - `.queued`, in the spool: waiting for delivery (retries follow the queue's rules);
//! - a stored receipt covering every recipient: to `sent/`;
//! - `.queued`, not in the spool, no receipt: the queue gave up (a bounce went to the
//!   sender): to `failed/`.
//!
//! A file moved to `sent/` leaves `DIR/.delivered/ID` behind (its path in `sent/`): once
//! the partner's `delivered` receipts for it have been fetched and checked, they are
//! written beside it too (`NAME.delivered-1.txt`, `.sig`) and the note is removed. A note
//! is looked at when it is written and when a delivered receipt for its ID is stored (an
//! event), not every tick: a partner that issues none would otherwise cost a read per
//! waiting file per second. Every [`NOTES_SWEEP`] all notes are looked at (an event lost
//! to a lagging channel; the start), and a note older than [`DELIVERED_WAIT`] is given up
//! with a warning.

use super::context::Context;
use super::events::RelayEvent;
use super::receipts::blocking;
use crate::config::{Outbox, Peer};
use crate::group_commit::fsync_dir;
use crate::queue::{Envelope, RcptState, Recipient, Route, Spool};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a dropped file must be left alone before it is taken.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);
/// How often the outboxes are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How long a file in `sent/` waits for the partner's delivered receipts.
const DELIVERED_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often every waiting note is looked at, events or not.
const NOTES_SWEEP: Duration = Duration::from_secs(60);

/// Which notes in `DIR/.delivered/` a tick looks at.
enum Notes<'a> {
    All,
    /// Only those of these queue IDs (delivered receipts just stored, or notes just written).
    Of(&'a std::collections::HashSet<String>),
}

/// The outbox task: every [`TICK`], each partner's outbox in the settings in force.
pub(crate) async fn run(ctx: Arc<Context>) {
    let mut last_errors: std::collections::HashMap<String, String> = Default::default();
    // Why a message failed for good, from the scheduler's events (for `failed/`).
    let mut events = ctx.events.subscribe();
    // Queue IDs whose delivered-receipt note is worth a look this tick, and when all are.
    let mut receipted = std::collections::HashSet::new();
    let mut sweep_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = ctx.shutdown.wait() => break,
        }
        loop {
            match events.try_recv() {
                Ok(RelayEvent::Failed {
                    id,
                    recipient,
                    reason,
                }) => {
                    last_errors.insert(id, format!("{recipient}: {reason}"));
                }
                Ok(RelayEvent::DeliveredReceipt { id }) => {
                    receipted.insert(id);
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                    sweep_at = tokio::time::Instant::now();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let sweep = tokio::time::Instant::now() >= sweep_at;
        if sweep {
            sweep_at += NOTES_SWEEP;
        }
        let settings = ctx.settings();
        for peer in &settings.site.peers {
            let Some(ob) = &peer.outbox else { continue };
            if let Err(e) = scan(&ctx, peer, ob, &mut last_errors, &mut receipted, sweep).await {
                tracing::warn!(peer = %peer.domain, outbox = %ob.dir.display(), error = %e,
                    "outbox: cannot process; tried again in a second");
            }
        }
        receipted.clear();
    }
}

fn work(ob: &Outbox) -> PathBuf {
    ob.dir.join(".work")
}

async fn scan(
    ctx: &Arc<Context>,
    peer: &Peer,
    ob: &Outbox,
    last_errors: &mut std::collections::HashMap<String, String>,
    receipted: &mut std::collections::HashSet<String>,
    sweep: bool,
) -> io::Result<()> {
    let o = ob.clone();
    let (taken, fresh) = blocking(move || {
        for d in ["tmp", ".work", ".delivered", "sent", "failed"] {
            fs::create_dir_all(o.dir.join(d))?;
        }
        Ok((list_work(&o)?, list_new(&o)?))
    })
    .await?;
    // Files taken earlier: where are they?
    for name in taken {
        if let Some(sent) = follow(ctx, peer, ob, &name, last_errors).await? {
            receipted.insert(sent); // its delivered receipt may be in already
        }
    }
    // Files in sent/ still waiting for their delivered receipts.
    let (store, o) = (ctx.receipts.store.clone(), ob.clone());
    if sweep {
        blocking(move || add_delivered_receipts(&store, &o, Notes::All)).await?;
    } else if !receipted.is_empty() {
        let ids = receipted.clone();
        blocking(move || add_delivered_receipts(&store, &o, Notes::Of(&ids))).await?;
    }
    // New files: claim (rename into .work), note the queue ID, queue.
    for name in fresh {
        let o = ob.clone();
        let n = name.clone();
        let claimed = blocking(move || {
            let w = work(&o);
            if w.join(&n).exists() {
                return Ok(None); // the same name is still on its way: wait
            }
            fs::rename(o.dir.join(&n), w.join(&n))?;
            let id = Spool::new_id();
            write_synced(&w.join(format!("{n}.qid")), id.as_bytes())?;
            fsync_dir(&w)?;
            Ok(Some(id))
        })
        .await?;
        if let Some(id) = claimed {
            tracing::info!(peer = %peer.domain, file = %name, queue_id = %id, "outbox: file taken");
            queue(ctx, peer, ob, &name, &id).await?;
        }
    }
    Ok(())
}

/// Names in `.work/` that are files taken (not the state files beside them).
fn list_work(ob: &Outbox) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(work(ob))? {
        let e = e?;
        let Ok(n) = e.file_name().into_string() else {
            continue;
        };
        if n.ends_with(".qid") || n.ends_with(".queued") || !e.file_type()?.is_file() {
            continue;
        }
        out.push(n);
    }
    out.sort();
    Ok(out)
}

/// Complete files dropped into the outbox (see the module text).
fn list_new(ob: &Outbox) -> io::Result<Vec<String>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for e in fs::read_dir(&ob.dir)? {
        let e = e?;
        let Ok(n) = e.file_name().into_string() else {
            tracing::warn!(outbox = %ob.dir.display(), file = ?e.file_name(), "outbox: a file name that is not UTF-8 is left alone");
            continue;
        };
        if n.starts_with('.') || n.ends_with(".tmp") || n.ends_with(".part") {
            continue;
        }
        let meta = e.metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let settled = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= SETTLE);
        if settled {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

fn write_synced(p: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(p)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Commits the message for `.work/NAME` under queue ID `id`, then marks it `.queued`.
async fn queue(
    ctx: &Arc<Context>,
    peer: &Peer,
    ob: &Outbox,
    name: &str,
    id: &str,
) -> io::Result<()> {
    let settings = ctx.settings();
    let from = ob
        .from
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", settings.site.domain));
    let path = work(ob).join(name);
    let bytes = blocking(move || fs::read(path)).await?;
    let docs = [crate::document::Document {
        name: name.to_string(),
        bytes,
    }];
    let msg = crate::document::build(
        &from,
        &ob.to,
        None,
        &format!("{id}@{}", settings.site.domain),
        &docs,
    )
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut body = ctx.spool.create_body(id).await?;
    {
        use tokio::io::AsyncWriteExt;
        body.write_all(&msg).await?;
    }
    let env = Envelope {
        id: id.to_string(),
        received: crate::queue::now_ms() / 1000,
        client: format!("outbox {}", ob.dir.display()),
        helo: settings.site.hostname.clone(),
        mail_from: from,
        recipients: ob
            .to
            .iter()
            .map(|to| Recipient {
                addr: to.clone(),
                route: Route::Peer(peer.domain.clone()),
                state: RcptState::Pending,
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
                dsn: Default::default(),
                delay_warned: false,
                pin: None,
            })
            .collect(),
        size: msg.len() as u64,
        body_8bit: false,
        smtputf8: false,
        ret: None,
        envid: None,
        held: false,
        expired: false,
        receipt: None,
        decoded: Some(Box::new(crate::queue::DecodedBody::of(&msg))),
        body_crc32: None,
        body_inline: None,
    };
    if let Err(e) = ctx.spool.commit(body, &env).await {
        ctx.spool.discard(id).await;
        return Err(e);
    }
    let marker = work(ob).join(format!("{name}.queued"));
    blocking(move || write_synced(&marker, b"")).await?;
    tracing::info!(queue_id = %id, peer = %peer.domain, file = %name, size = env.size, "outbox: queued");
    ctx.queue.insert(env);
    ctx.event(RelayEvent::Queued { id: id.to_string() });
    Ok(())
}

/// Moves `.work/NAME` on when its message is done (see the module text).
async fn follow(
    ctx: &Arc<Context>,
    peer: &Peer,
    ob: &Outbox,
    name: &str,
    last_errors: &mut std::collections::HashMap<String, String>,
) -> io::Result<Option<String>> {
    let w = work(ob);
    let qid_path = w.join(format!("{name}.qid"));
    let id = match fs::read_to_string(&qid_path) {
        Ok(s) => s.trim().to_string(),
        // Taken, then stopped before the ID was written: take it again.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = Spool::new_id();
            let (q, i) = (qid_path.clone(), id.clone());
            blocking(move || write_synced(&q, i.as_bytes())).await?;
            return queue(ctx, peer, ob, name, &id).await.map(|()| None);
        }
        Err(e) => return Err(e),
    };
    let queued = w.join(format!("{name}.queued")).exists();
    let waiting = ctx.queue.get(&id);
    if let Some(rec) = ctx.receipts.store.sent(&id)? {
        let covered = |to: &String| {
            rec.receipts.iter().any(|s| {
                crate::receipt::Receipt::parse(s.text.as_bytes())
                    .is_ok_and(|r| r.rcpts.iter().any(|a| a.eq_ignore_ascii_case(to)))
            })
        };
        if ob.to.iter().all(covered) {
            let (o, n, i) = (ob.clone(), name.to_string(), id.clone());
            let dest = blocking(move || {
                finish(&o, &n, &i, "sent", |base| {
                    write_synced(
                        &o.dir.join(".delivered").join(&i),
                        base.as_os_str().as_bytes(),
                    )?;
                    write_receipts(base, "receipt", &rec.receipts)
                })
            })
            .await?;
            last_errors.remove(&id);
            tracing::info!(queue_id = %id, peer = %peer.domain, file = %dest.display(), "outbox: sent, receipt beside it");
            return Ok(Some(id));
        }
    }
    if let Some(env) = waiting {
        // Waiting: remember the latest reason, for failed/ if it comes to that.
        if let Some(err) = env.recipients.iter().find_map(|r| r.last_error.clone()) {
            last_errors.insert(id, err);
        }
        return Ok(None);
    }
    if !queued {
        // Stopped between noting the ID and the commit: queue it now, same ID.
        return queue(ctx, peer, ob, name, &id).await.map(|()| None);
    }
    let reason = format!(
        "not delivered to {}: the relay gave up on queue ID {id} (a bounce went to the sender); last error: {}\n",
        ob.to.join(", "),
        last_errors.remove(&id).unwrap_or_else(|| {
            "(not seen by this process; see the relay's log for the queue ID)".into()
        })
    );
    let (o, n, i) = (ob.clone(), name.to_string(), id.clone());
    let r = reason.clone();
    let dest = blocking(move || {
        finish(&o, &n, &i, "failed", |base| {
            write_synced(
                &base.with_file_name(format!("{}.reason.txt", file_of(base))),
                r.as_bytes(),
            )
        })
    })
    .await?;
    tracing::warn!(queue_id = %id, peer = %peer.domain, file = %dest.display(), reason = %reason.trim_end(), "outbox: failed");
    Ok(None)
}

/// For each note in `DIR/.delivered/`: when the stored record of that queue ID has
/// delivered receipts that together cover every `outbox_to` recipient, write them beside
/// the file in `sent/` and drop the note.
fn add_delivered_receipts(
    store: &crate::receipt::store::ReceiptStore,
    ob: &Outbox,
    which: Notes<'_>,
) -> io::Result<()> {
    let dir = ob.dir.join(".delivered");
    let notes: Vec<String> = match which {
        Notes::All => fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Notes::Of(ids) => ids
            .iter()
            .filter(|id| dir.join(id).is_file())
            .cloned()
            .collect(),
    };
    for id in notes {
        let note = dir.join(&id);
        let Ok(rec) = store.sent(&id) else {
            let _ = fs::remove_file(&note); // not a queue ID: not ours
            continue;
        };
        let delivered: Vec<_> = rec.map(|r| r.delivered).unwrap_or_default();
        let handed: Vec<String> = delivered
            .iter()
            .filter_map(|s| crate::receipt::Receipt::parse(s.text.as_bytes()).ok())
            .flat_map(|r| r.handoffs.into_iter().map(|h| h.rcpt))
            .collect();
        if !ob
            .to
            .iter()
            .all(|to| handed.iter().any(|h| h.eq_ignore_ascii_case(to)))
        {
            let age = fs::metadata(&note)?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if age > DELIVERED_WAIT {
                tracing::warn!(queue_id = %id, outbox = %ob.dir.display(),
                    "outbox: no delivered receipt from the partner after 7 days; the file stays in sent/ with its accepted receipt only");
                fs::remove_file(&note)?;
            }
            continue;
        }
        let base = PathBuf::from(std::ffi::OsString::from_vec(fs::read(&note)?));
        write_receipts(&base, "delivered", &delivered)?;
        tracing::info!(queue_id = %id, file = %base.display(), "outbox: delivered receipt beside the file in sent/");
        fs::remove_file(&note)?;
    }
    Ok(())
}

/// Writes `receipts` beside the file `base` as `NAME.<kind>-N.txt` and `.sig` (N from 1),
/// each fsynced: what `gpg --verify` takes.
fn write_receipts(
    base: &Path,
    kind: &str,
    receipts: &[crate::receipt::store::StoredReceipt],
) -> io::Result<()> {
    for (k, s) in receipts.iter().enumerate() {
        let signed = s.to_signed()?;
        for (ext, bytes) in [("txt", &signed.text), ("sig", &signed.sig)] {
            let name = format!("{}.{kind}-{}.{ext}", file_of(base), k + 1);
            write_synced(&base.with_file_name(name), bytes)?;
        }
    }
    Ok(())
}

fn file_of(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

/// Writes what goes beside the file (`extra`, given the file's destination), then moves
/// `.work/NAME` into `sub/` (as `NAME`, or `ID-NAME` if taken), and removes its state.
fn finish(
    ob: &Outbox,
    name: &str,
    id: &str,
    sub: &str,
    extra: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let d = ob.dir.join(sub);
    let mut dest = d.join(name);
    if dest.exists() {
        dest = d.join(format!("{id}-{name}"));
    }
    extra(&dest)?;
    let w = work(ob);
    fs::rename(w.join(name), &dest)?;
    fsync_dir(&d)?;
    let _ = fs::remove_file(w.join(format!("{name}.qid")));
    let _ = fs::remove_file(w.join(format!("{name}.queued")));
    fsync_dir(&w)?;
    Ok(dest)
}
