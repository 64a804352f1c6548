//! Mail coming in: from the site's MTA over plain TCP, and from a peer relay through a
//! call's encrypted stream. Both write into the spool and answer 250 only after fsync.

use super::context::Context;
use super::events::RelayEvent;
use super::receipts::Tap;
use super::sender::{SenderPolicy, check_peer_sender};
use super::settings::Settings;
use super::trace::StripPeerField;
use crate::queue::{Envelope, RcptState, ReceiptFacts, Recipient, Route, Spool};
use crate::receipt::store::DedupRecord;
use crate::receipt::wire::Signed;
use crate::smtp::{Backend, MailParams, Reply, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tracing::Instrument;

/// Connections served at once from the site side.
const MAX_CONNECTIONS: usize = 256;

/// How our SMTP server answers in a call (the same as on the site side).
pub(crate) fn server_config(ctx: &Context) -> ServerConfig {
    ctx.settings().smtp.clone()
}

/// Who is on the other end of an SMTP session.
#[derive(Clone, Debug)]
pub(crate) enum Origin {
    /// A client of our site, by IP; `relay` if it is inside `smtp.allow`.
    Site { addr: SocketAddr, relay: bool },
    /// A partner relay, authenticated by the call's handshake.
    Peer {
        domain: String,
        call_id: String,
        sas: String,
        /// How the call was authenticated (`signed`, `opportunistic`, `psk`).
        auth: crate::handshake::AuthMode,
        /// The fingerprint of the key that signed the handshake (hex).
        fingerprint: String,
        /// SHA-256(T2) of the call, hex (named in receipts).
        transcript_sha256: String,
        /// The partner may ask for signed receipts (an OpenPGP-signed call).
        receipts: bool,
    },
}

pub(crate) struct SpoolBackend {
    shared: Arc<Context>,
    /// The settings at the session's start: a reload applies to the next session.
    settings: Arc<Settings>,
    origin: Origin,
    routes: Vec<(String, Route)>,
    current: Option<String>,
    /// The log offsets after each delivered receipt of the last `XRECEIPT FETCH`.
    fetched: Vec<u64>,
}

impl SpoolBackend {
    pub fn new(shared: Arc<Context>, origin: Origin) -> Self {
        SpoolBackend {
            settings: shared.settings(),
            shared,
            origin,
            routes: Vec::new(),
            current: None,
            fetched: Vec::new(),
        }
    }

    fn received_header(&self, id: &str, env: &crate::smtp::Envelope) -> String {
        let helo = super::trace::clean(&env.helo);
        let from = match &self.origin {
            Origin::Site { addr, .. } => format!("{helo} ([{}])", addr.ip()),
            Origin::Peer {
                domain,
                call_id,
                sas,
                ..
            } => format!(
                "{helo} (mail@{} via sipmail call {}, SAS {})",
                super::trace::clean(domain),
                super::trace::clean(call_id),
                sas
            ),
        };
        // Mail from a call gets, right below our Received line and so above anything the
        // sender wrote, the field that says who sent it (issue 11, item 2).
        let peer_field = match &self.origin {
            Origin::Site { .. } => String::new(),
            Origin::Peer {
                domain,
                call_id,
                auth,
                fingerprint,
                ..
            } => {
                use crate::handshake::AuthMode;
                let fpr = (*auth != AuthMode::Psk).then_some(fingerprint.as_str());
                super::trace::peer_field(domain, auth.name(), fpr, call_id)
            }
        };
        let for_clause = match env.rcpt_to.as_slice() {
            [one] => format!("\r\n\tfor <{}>", super::trace::clean(one)),
            _ => String::new(),
        };
        format!(
            "Received: from {from}\r\n\tby {} (sipmail) with ESMTP id {id}{for_clause};\r\n\t{}\r\n{peer_field}",
            self.settings.site.hostname,
            super::trace::rfc5322_date(SystemTime::now())
        )
    }
}

impl SpoolBackend {
    /// Hands a message whose files are in `queue/` to the scheduler (and says so: the
    /// `Queued` event), before its 250 is written; for a site's message and a partner's
    /// with a receipt, before its flushes end (docs/ARCHITECTURE.md, "Commit and hand-off
    /// overlap"). For a partner's message this task then yields: the scheduler, woken into
    /// this worker's LIFO slot, would otherwise run only after the 250 is built and
    /// written, and so would the lane that writes the `.sending` marker and asks the
    /// hand-off agent. The partner's 250 only lets it store our receipt and take its next
    /// message; our own delivery is what the mail waits for (docs/PERFORMANCE.md, run 22).
    /// A site's message needs no yield: its task waits for the flushes next.
    async fn enqueue(&self, qenv: Envelope) {
        let id = qenv.id.clone();
        self.shared.queue.insert(qenv);
        self.shared.event(RelayEvent::Queued { id });
        if matches!(self.origin, Origin::Peer { .. }) {
            tokio::task::yield_now().await;
        }
    }

    /// Takes back a message handed to the scheduler before its commit, which then failed:
    /// the client hears 451 and sends it again. A lane that already took it may hand it
    /// over all the same; that copy and the resend are then two, and the log says so.
    /// The caller then takes its files out of the spool.
    fn withdraw(&self, id: &str) {
        let handed_over = self.shared.queue.withdraw(id);
        if handed_over {
            tracing::warn!(queue_id = %id,
                "the message was taken back after it was handed over; the client is told to send it again, so it may arrive twice");
        }
        self.shared.event(RelayEvent::Withdrawn {
            id: id.to_string(),
            handed_over,
        });
    }

    /// Commits a partner's message that asked for a receipt, exactly once per duplicate key
    /// (crate::receipt::dedup): recipients accepted before under the key are not queued
    /// again and get the earlier receipt; the others are committed with the receipt's facts
    /// in the envelope (the receipt signed meanwhile), then remembered with their new
    /// signed receipt (lazily: the envelope is the durable copy until the message leaves,
    /// `ReceiptStore::put_dedup`), and only then answered 250 with the receipts. If
    /// remembering fails, the commit is undone and the answer is 451, so that a resend
    /// cannot be queued twice. The message goes to the scheduler as soon as its files are
    /// named in `queue/`, while the flushes run; the record is written under the key's
    /// lock, which the local lane takes before it reads the record (`local`), and never
    /// before the message is durable: a record must not outlive a message the 451 took
    /// back.
    async fn commit_with_receipt(
        &mut self,
        file: (crate::queue::bodyio::BodyFile, Vec<u8>),
        mut qenv: Envelope,
        mut facts: ReceiptFacts,
    ) -> Reply {
        let id = qenv.id.clone();
        let spool = &self.shared.spool;
        let receipts = &self.shared.receipts;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(queue_id = %id, error = %e, "{what}");
            Reply::new(
                451,
                (4, 3, 0),
                "Local error: cannot record the receipt, try again later",
            )
        };
        let write_failed = |what: &str, e: &std::io::Error| {
            tracing::error!(queue_id = %id, error = %e, "{what}");
            Reply::spool_write_failed(e)
        };
        let key = super::receipts::key_of(&facts);
        let guard = receipts.lock(&key).await;
        let mut rec = match receipts.dedup(&key).await {
            Ok(r) => r.unwrap_or_else(|| DedupRecord::new(&key)),
            Err(e) => {
                spool.discard(&id).await;
                return unavailable("cannot read the duplicate record", &e);
            }
        };
        let accepted: Vec<String> = qenv.recipients.iter().map(|r| r.addr.clone()).collect();
        let plan = crate::receipt::dedup::plan(&accepted, &rec.remembered());
        let mut back: Vec<Signed> = Vec::new();
        for d in &plan.prior_receipts {
            if let Some(s) = rec.receipt(d).and_then(|r| r.to_signed().ok()) {
                back.push(s);
            }
        }
        if plan.new_rcpts.is_empty() {
            spool.discard(&id).await;
            tracing::info!(peer = %facts.peer, sender_queue_id = %facts.sender_queue_id,
                sha256 = %facts.message_sha256, rcpts = accepted.len(),
                "duplicate of a message accepted before: not queued again, its receipt sent back");
            self.shared.metrics.duplicate_suppressed(&facts.peer);
            if let Some(rewrite) = &self.shared.hooks.receipt_reply {
                back = rewrite(back);
            }
            let text =
                crate::receipt::wire::reply_text("Ok: accepted before, not queued again", &back);
            return Reply::new(250, (2, 0, 0), text);
        }
        qenv.recipients.retain(|r| plan.new_rcpts.contains(&r.addr));
        let keys = self.shared.keys();
        facts.fingerprint = keys.own_fpr_hex.clone();
        facts.committed_ms = crate::queue::now_ms();
        qenv.receipt = Some(Box::new(facts.clone()));
        // The receipt states only what is fixed before the commit (`committed_ms` above
        // included), so it is signed on this thread while the blocking pool writes and
        // fsyncs the message: the signature (80-160 µs after an idle pause) is off the
        // path to the 250. It leaves this function only once the commit has succeeded.
        let r = super::receipts::accepted_receipt(&self.settings.site.domain, &qenv, &facts);
        let committing = match spool.begin_commit(file.0, file.1, &qenv).await {
            Ok(c) => c,
            Err(e) => {
                spool.discard(&id).await;
                return write_failed("could not commit a message to the spool", &e);
            }
        };
        tracing::info!(queue_id = %id, from = %qenv.mail_from, rcpts = qenv.recipients.len(),
            size = qenv.size, call_id = %facts.call_id, peer = %facts.peer,
            sender_queue_id = %facts.sender_queue_id, receipt = %r.digest(), "queued");
        // To the scheduler while the flushes run, as a site's message (see `data_end`).
        self.enqueue(qenv).await;
        let (committed, signed) = tokio::join!(committing.durable(), async {
            super::receipts::sign(&keys, &r)
        });
        if let Err(e) = committed {
            self.withdraw(&id);
            spool.discard(&id).await;
            return write_failed("could not commit a message to the spool", &e);
        }
        let signed = match signed {
            Ok(s) => s,
            Err(e) => {
                self.withdraw(&id);
                let _ = spool.remove(&id).await;
                return unavailable("cannot sign the receipt; the message is not kept", &e);
            }
        };
        super::receipts::remember(&mut rec, &r, &signed);
        if let Err(e) = receipts.put_dedup(&key, rec).await {
            self.withdraw(&id);
            let _ = spool.remove(&id).await;
            return write_failed("cannot record the receipt; the message is not kept", &e);
        }
        // The key's decision is recorded: a resend of it from here on finds this record.
        drop(guard);
        self.shared.metrics.receipt_issued(&facts.peer);
        let mut all = vec![signed];
        all.extend(back);
        if let Some(rewrite) = &self.shared.hooks.receipt_reply {
            all = rewrite(all);
        }
        let text = crate::receipt::wire::reply_text(&format!("Ok: queued as {id}"), &all);
        Reply::new(250, (2, 0, 0), text)
    }
}

impl Backend for SpoolBackend {
    type Writer = Tap<StripPeerField<crate::queue::bodyio::BodyWriter>>;

    /// The partner fetches the `delivered` receipts we signed for its mail, and
    /// acknowledges them once stored (docs/PROTOCOL.md §4b).
    async fn receipts(&mut self, cmd: crate::smtp::ReceiptCommand) -> Reply {
        let Origin::Peer {
            domain,
            receipts: true,
            ..
        } = &self.origin
        else {
            return Reply::new(502, (5, 5, 1), "no receipts in this session");
        };
        let store = &self.shared.receipts;
        let failed = |e: std::io::Error| {
            tracing::error!(peer = %domain, error = %e, "cannot read the delivered-receipt log");
            Reply::temp_failure("Local error: cannot read the receipts, try again later")
        };
        match cmd {
            crate::smtp::ReceiptCommand::Fetch => {
                let batch = match store
                    .delivered_batch(domain, crate::receipt::wire::MAX_RECEIPTS)
                    .await
                {
                    Ok(b) => b,
                    Err(e) => return failed(e),
                };
                self.fetched = batch.ends;
                let mut back = batch.receipts;
                if let Some(rewrite) = &self.shared.hooks.delivered_reply {
                    back = rewrite(back);
                }
                let first = format!("Ok: {} delivered receipt(s)", back.len());
                Reply::new(
                    250,
                    (2, 0, 0),
                    crate::receipt::wire::reply_text(&first, &back),
                )
            }
            crate::smtp::ReceiptCommand::Ack(n) => {
                if n > self.fetched.len() {
                    return Reply::new(
                        501,
                        (5, 5, 4),
                        format!("the last fetch returned {} receipt(s)", self.fetched.len()),
                    );
                }
                if n > 0
                    && let Err(e) = store.ack_delivered(domain, self.fetched[n - 1]).await
                {
                    return failed(e);
                }
                self.fetched.clear();
                Reply::new(250, (2, 0, 0), format!("Ok: {n} receipt(s) acknowledged"))
            }
        }
    }

    async fn mail_from(&mut self, from: &str, _params: &MailParams) -> Result<(), Reply> {
        self.routes.clear();
        let waited = self.shared.queue.admit().await;
        if !waited.is_zero() {
            tracing::debug!(waited_ms = waited.as_millis() as u64, from = %from,
                "intake flow control: the transaction waited for the queue to drain");
        }
        if let Origin::Peer {
            domain, call_id, ..
        } = &self.origin
        {
            let site = &self.settings.site;
            // The configured spelling of the peer's domain (the call's is lower-cased too,
            // but the check must not depend on that), and its `senders`.
            let (peer, senders) = match site.peer(domain) {
                Some(p) => (p.domain.as_str(), p.senders.as_slice()),
                None => (domain.as_str(), &[][..]),
            };
            let peers: Vec<&str> = site.peers.iter().map(|p| p.domain.as_str()).collect();
            let policy = SenderPolicy {
                peer,
                senders,
                own: &site.domain,
                peers: &peers,
            };
            if let Err(refusal) = check_peer_sender(&policy, from) {
                tracing::warn!(peer = %domain, %call_id, from = %from, reason = %refusal, "sender refused");
                return Err(refusal.reply());
            }
        }
        Ok(())
    }

    async fn rcpt_to(&mut self, to: &str) -> Result<(), Reply> {
        if !to.contains('@') {
            return Err(Reply::new(501, (5, 1, 3), "Bad recipient address syntax"));
        }
        // Local delivery is open to anyone; every other route (a partner, an SMTP next
        // hop, the default route) only to `smtp.allow` clients, never to a partner's call.
        let refusal = match (self.settings.site.route_for(to), &self.origin) {
            (Ok(Route::Local), _) => Ok(Route::Local),
            (Ok(route), Origin::Site { relay: true, .. }) => Ok(route),
            (Err(reason), Origin::Site { relay: true, .. }) => Err(reason),
            (_, Origin::Site { .. }) => {
                Err("Relay access denied: your address is not in smtp.allow".to_string())
            }
            (_, Origin::Peer { domain: peer, .. }) => Err(format!(
                "Relay access denied: {peer} may only send mail for {}",
                self.settings.site.domain
            )),
        };
        match refusal {
            Ok(route) => {
                self.routes.push((to.to_string(), route));
                Ok(())
            }
            Err(reason) => {
                match &self.origin {
                    Origin::Site { addr, .. } => {
                        tracing::info!(client = %addr, rcpt = %to, %reason, "recipient refused")
                    }
                    Origin::Peer {
                        domain, call_id, ..
                    } => {
                        tracing::warn!(peer = %domain, %call_id, rcpt = %to, %reason, "recipient refused")
                    }
                }
                Err(Reply::new(550, (5, 7, 1), reason))
            }
        }
    }

    async fn data_start(&mut self, env: &crate::smtp::Envelope) -> Result<Self::Writer, Reply> {
        let id = Spool::new_id();
        // The file itself is created when the body outgrows the writer's buffer, or by the
        // commit: a spool that cannot create it fails the message there, with the same 451.
        let mut w = self.shared.spool.body_writer(&id);
        // A message for a partner: its digest as the partner will decode it is kept with
        // it, for the receipt check of every attempt (see `caller`).
        if self.routes.iter().any(|(_, r)| matches!(r, Route::Peer(_)))
            && !self.shared.hooks.spool_without_digest
        {
            w = w.with_digest();
        }
        let hdr = self.received_header(&id, env);
        if let Err(e) = w.write_all(hdr.as_bytes()).await {
            tracing::error!(error = %e, "cannot write to a spool file");
            self.shared.spool.discard(&id).await;
            return Err(Reply::spool_write_failed(&e));
        }
        self.current = Some(id);
        // Our own trace lines are written; what the client sends loses any look-alike. A
        // message that asks for a receipt is hashed as received, before that.
        let tap = env.xqid.is_some() && matches!(self.origin, Origin::Peer { receipts: true, .. });
        Ok(Tap::new(StripPeerField::new(w), tap))
    }

    async fn data_end(&mut self, env: crate::smtp::Envelope, writer: Self::Writer) -> Reply {
        let Some(id) = self.current.take() else {
            return Reply::new(451, (4, 3, 0), "Local error: no open message");
        };
        let fail = |e: std::io::Error| {
            tracing::error!(queue_id = %id, error = %e, "could not commit a message to the spool");
            Reply::spool_write_failed(&e)
        };
        let (writer, tapped) = writer.into_parts().await;
        let tapped = match tapped.transpose() {
            Ok(t) => t,
            Err(e) => {
                drop(writer);
                tracing::error!(queue_id = %id, error = %e, "cannot hash the message for its receipt");
                self.shared.spool.discard(&id).await;
                return Reply::new(
                    451,
                    (4, 3, 0),
                    format!(
                        "Local error: cannot hash the message for its receipt ({e}); try again"
                    ),
                );
            }
        };
        let finished = match writer.into_inner().await {
            Ok(w) => w.finish().await,
            Err(e) => Err(e),
        };
        // A small body's bytes are written by the commit (`Spool::commit_parts`).
        let (file, size, decoded) = match finished {
            Ok(f) => ((f.file, f.tail), f.size, f.decoded),
            Err(e) => {
                self.shared.spool.discard(&id).await;
                return fail(e);
            }
        };
        let recipients = env
            .rcpt_to
            .iter()
            .zip(
                env.rcpt_params
                    .iter()
                    .chain(std::iter::repeat(&Default::default())),
            )
            .filter_map(|(r, dsn)| {
                let route = self.routes.iter().find(|(a, _)| a == r)?.1.clone();
                Some(Recipient {
                    addr: r.clone(),
                    route,
                    state: RcptState::Pending,
                    attempts: 0,
                    next_attempt_ms: 0,
                    last_error: None,
                    dsn: dsn.clone(),
                    delay_warned: false,
                    pin: None,
                })
            })
            .collect();
        let client = match &self.origin {
            Origin::Site { addr, .. } => addr.to_string(),
            Origin::Peer {
                domain, call_id, ..
            } => format!("peer {domain} call {call_id}"),
        };
        let qenv = Envelope {
            id: id.clone(),
            received: crate::queue::now_ms() / 1000,
            client,
            helo: env.helo.clone(),
            mail_from: env.mail_from.clone(),
            recipients,
            size,
            body_8bit: env.body_8bit,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: env.envid.clone(),
            held: false,
            expired: false,
            receipt: None,
            decoded: decoded.map(Box::new),
            body_crc32: None,
            body_inline: None,
        };
        // A partner's message with a receipt asked for: decided under its duplicate key.
        let asked = match (&self.origin, &env.xqid, tapped) {
            (
                Origin::Peer {
                    domain,
                    call_id,
                    transcript_sha256,
                    ..
                },
                Some(xqid),
                Some(t),
            ) => Some(ReceiptFacts {
                peer: domain.clone(),
                sender_queue_id: xqid.clone(),
                message_sha256: t.sha256,
                message_size: t.size,
                message_id: t.message_id,
                call_id: call_id.clone(),
                transcript_sha256: transcript_sha256.clone(),
                fingerprint: String::new(),
                committed_ms: 0,
            }),
            _ => None,
        };
        if let Some(facts) = asked {
            return self.commit_with_receipt(file, qenv, facts).await;
        }
        let committing = match self.shared.spool.begin_commit(file.0, file.1, &qenv).await {
            Ok(c) => c,
            Err(e) => {
                self.shared.spool.discard(&id).await;
                return fail(e);
            }
        };
        match &self.origin {
            Origin::Site { addr, .. } => {
                // The site's message goes to the scheduler while its flushes run: its
                // files are in `queue/` already, and the client's 250 still waits for
                // the flushes. What that saves is the flushes' time on the way to the
                // next hop (docs/ARCHITECTURE.md, "Commit and hand-off overlap").
                tracing::info!(queue_id = %id, from = %qenv.mail_from,
                    rcpts = qenv.recipients.len(), size, client = %addr, "queued");
                self.enqueue(qenv).await;
                if let Err(e) = committing.durable().await {
                    self.withdraw(&id);
                    self.shared.spool.discard(&id).await;
                    return fail(e);
                }
            }
            Origin::Peer {
                domain, call_id, ..
            } => {
                if let Err(e) = committing.durable().await {
                    self.shared.spool.discard(&id).await;
                    return fail(e);
                }
                tracing::info!(queue_id = %id, from = %qenv.mail_from,
                    rcpts = qenv.recipients.len(), size, %call_id, peer = %domain, "queued");
                self.enqueue(qenv).await;
            }
        }
        Reply::new(250, (2, 0, 0), format!("Ok: queued as {id}"))
    }

    async fn data_abort(&mut self, writer: Self::Writer) {
        // Dropping the tap ends its hashing thread, if it has one, without waiting for it.
        drop(writer);
        if let Some(id) = self.current.take() {
            self.shared.spool.discard(&id).await;
        }
    }
}

/// Accept connections from the site until shutdown; then let sessions finish.
pub(crate) async fn accept_loop(shared: Arc<Context>, listener: TcpListener) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shared.shutdown.wait() => break,
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shared.shutdown.wait() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        // `smtp.allow` and the SMTP limits as in force when the session starts.
        let settings = shared.settings();
        let relay = settings.smtp_allow.iter().any(|c| c.contains(addr.ip()));
        let mut backend = SpoolBackend::new(shared.clone(), Origin::Site { addr, relay });
        let cfg = settings.smtp.clone();
        // Every line of the session (refusals, "queued") carries the client's address.
        let span = tracing::info_span!("smtp", client = %addr);
        sessions.spawn(
            async move {
                let _permit = permit;
                let _ = crate::smtp::serve(stream, addr.to_string(), &cfg, &mut backend).await;
            }
            .instrument(span),
        );
    }
    drop(listener);
    if !sessions.is_empty() {
        tracing::info!(
            sessions = sessions.len(),
            "waiting for SMTP sessions in progress to finish"
        );
    }
    // Sessions in progress get a grace period to finish their transaction; an idle client
    // that keeps its connection open is then cut (nothing it sent unacknowledged is lost:
    // unfinished spool files are removed at the next start).
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("SMTP sessions still open after 30 s; closing them");
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
}
