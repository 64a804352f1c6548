//! The answering side: check the caller, answer with our signed half of the handshake,
//! check the ACK's confirm, accept the media connection and serve SMTP through it.

use super::context::{Context, PendingGuard};
use super::events::RelayEvent;
use super::inbound::{Origin, SpoolBackend};
use super::trust::{self, HoldReason, OpportunisticDecision};
use crate::config::ContinuityPolicy;
use crate::handshake::sdp::{self, SdpError};
use crate::handshake::{
    AuthMode, CallContext, CalleeAwaitConfirm, CalleePolicy, Continuity, HandshakeError,
};
use crate::sip::{Incoming, Method, Response};
use crate::tunnel::record::Limits;
use crate::tunnel::{Role, TunnelStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long we wait for the ACK after our 200 OK (64*T1, like Timer H).
const ACK_WAIT: Duration = Duration::from_secs(32);
/// How long the caller has to open the media connection after its ACK.
const MEDIA_WAIT: Duration = Duration::from_secs(10);

/// Calls refused by trust policy, each with its SIP status. The Warning names the problem;
/// it tells the caller nothing it did not send or cannot learn from its own config.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(
        "trust policy mismatch: the offer uses {offered}, this relay requires {required} for {domain}"
    )]
    PolicyMismatch {
        domain: String,
        offered: AuthMode,
        required: AuthMode,
    },
    #[error("key continuity with mail@{domain} is broken ({continuity}); refused by policy")]
    Continuity {
        domain: String,
        continuity: Continuity,
    },
}

impl Refusal {
    fn status(&self) -> (u16, &'static str) {
        match self {
            Refusal::PolicyMismatch { .. } => (488, "Not Acceptable Here"),
            Refusal::Continuity { .. } => (403, "Forbidden"),
        }
    }
}

async fn refuse(inc: &Incoming, r: Refusal) -> String {
    let (status, reason) = r.status();
    let msg = r.to_string();
    let _ = inc.respond(reject(inc, status, reason, &msg)).await;
    msg
}

fn reject(inc: &Incoming, status: u16, reason: &str, warning: &str) -> Response {
    let mut r = Response::for_request(&inc.request, status, reason);
    r.headers.push(
        "Warning",
        format!(
            "399 sipmail \"{}\"",
            warning.replace(['"', '\\', '\r', '\n'], " ")
        ),
    );
    r
}

/// Domain part of a SIP URI inside a header value such as `<sip:mail@site-a.test>;tag=x`.
fn uri_identity(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("sip:")?;
    let rest = rest.split([';', '?', '>']).next()?;
    let (user, host) = rest.split_once('@')?;
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    Some((user.to_ascii_lowercase(), host.to_ascii_lowercase()))
}

struct DialogGuard<'a> {
    shared: &'a Context,
    call_id: String,
}
impl Drop for DialogGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut d) = self.shared.sip.dialogs.lock() {
            d.remove(&self.call_id);
        }
    }
}

pub(crate) async fn handle_invite(shared: Arc<Context>, inc: Incoming, pending: PendingGuard) {
    let call_id = inc
        .request
        .headers
        .call_id()
        .unwrap_or_default()
        .to_string();
    let source = inc.source;
    match answer(&shared, inc, pending).await {
        Ok(()) => {}
        Err(msg) => {
            tracing::warn!(%call_id, %source, reason = %msg, "incoming call refused or failed");
        }
    }
}

/// Returns Err with a reason for the log on any failure (the SIP answer has been sent).
/// What the caller of a held opportunistic call is told (in a `554` greeting through the
/// call, after its key proved itself), and what our log says.
fn held_message(domain: &str, fpr: &str, why: &HoldReason) -> String {
    match why {
        HoldReason::Changed { .. } => format!(
            "the key of mail@{domain} changed since first use; refused until the operator runs `sipmail trust accept {domain} {fpr}`"
        ),
        HoldReason::FirstUseFromElsewhere => format!(
            "first call from mail@{domain}, from an address that is not its configured one: its key is not pinned; refused until the operator runs `sipmail trust accept {domain} {fpr}`"
        ),
    }
}

async fn answer(
    shared: &Arc<Context>,
    inc: Incoming,
    mut pending: PendingGuard,
) -> Result<(), String> {
    let req = &inc.request;
    let call_id = req.headers.call_id().unwrap_or_default().to_string();
    let from = req.headers.from().map_err(|e| e.to_string());
    let to = req.headers.to().map_err(|e| e.to_string());
    let (from, to) = match (from, to) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => {
            let _ = inc.respond(reject(&inc, 400, "Bad Request", &e)).await;
            return Err(format!("bad From/To: {e}"));
        }
    };
    let Some(from_tag) = from.tag().map(str::to_string) else {
        let _ = inc
            .respond(reject(&inc, 400, "Bad Request", "From has no tag"))
            .await;
        return Err("From has no tag".into());
    };
    // The body must be our offer: checked first, so that any SIP phone or tester learns
    // what is missing (488 with a Warning) before identity checks.
    let ctype = req
        .headers
        .get("Content-Type")
        .unwrap_or("")
        .to_ascii_lowercase();
    if req.body.is_empty() {
        let r = reject(
            &inc,
            488,
            "Not Acceptable Here",
            "no offer: sipmail needs an application/sdp offer with its key exchange",
        );
        let _ = inc.respond(r).await;
        return Err("INVITE without an offer".into());
    }
    if !ctype.starts_with("application/sdp") {
        let mut r = reject(
            &inc,
            415,
            "Unsupported Media Type",
            "sipmail needs an application/sdp offer",
        );
        r.headers.push("Accept", "application/sdp");
        let _ = inc.respond(r).await;
        return Err(format!("body type {ctype:?}"));
    }
    let offer = match sdp::decode_offer(&req.body) {
        Ok(o) => o,
        Err(e) => {
            let _ = inc
                .respond(reject(
                    &inc,
                    488,
                    "Not Acceptable Here",
                    &format!("not a sipmail offer: {e}"),
                ))
                .await;
            return Err(format!("offer: {e}"));
        }
    };
    // To: must be us.
    match uri_identity(&to.uri) {
        Some((user, host)) if user == "mail" && host == shared.site.domain => {}
        _ => {
            let _ = inc
                .respond(reject(
                    &inc,
                    404,
                    "Not Found",
                    "this relay only answers mail@its domain",
                ))
                .await;
            return Err(format!("call for {} is not for us", to.uri));
        }
    }
    // From: must be a configured peer.
    let peer_domain = match uri_identity(&from.uri) {
        Some((user, host)) if user == "mail" && shared.site.peer(&host).is_some() => host,
        _ => {
            let _ = inc
                .respond(reject(
                    &inc,
                    403,
                    "Forbidden",
                    "not a partner of this relay",
                ))
                .await;
            return Err(format!("caller {} is not a configured peer", from.uri));
        }
    };
    let Some(peer) = shared.site.peer(&peer_domain).cloned() else {
        return Err(format!("{peer_domain} is not a configured peer"));
    };
    // The offer must use the trust policy we require of this peer: no downgrade.
    let mode = peer.trust.mode();
    if offer.auth != mode {
        return Err(refuse(
            &inc,
            Refusal::PolicyMismatch {
                domain: peer_domain.clone(),
                offered: offer.auth,
                required: mode,
            },
        )
        .await);
    }
    let peer_fpr = hex::encode_upper(&offer.fingerprint);
    // One keyring for the whole call, even if it is reloaded meanwhile.
    let ks = shared.keys();
    // Opportunistic: why this call is refused once its key has proved itself.
    let mut hold: Option<HoldReason> = None;
    match mode {
        // The caller's key must be in our keyring for that domain.
        AuthMode::Signed => {
            if let Err(e) = ks.keyring.peer_cert(&peer_domain, &peer_fpr) {
                let _ = inc
                    .respond(reject(
                        &inc,
                        403,
                        "Forbidden",
                        "unknown or unusable key for this peer",
                    ))
                    .await;
                return Err(format!("peer {peer_domain} key {peer_fpr}: {e}"));
            }
        }
        // The key it presents must be the one pinned on first use. Nothing is written to
        // the trust state here: an INVITE proves nothing. A key that is not the pin (or a
        // first use from an address that is not the peer's) is held: the handshake goes on
        // only so that the key's signature on the confirm can be verified, and then it is
        // recorded as pending and the call refused.
        AuthMode::Opportunistic => {
            let presented = crate::keyring::key_packet_fingerprint(&offer.key_packet);
            if presented.as_deref().ok() != Some(peer_fpr.as_str()) {
                let why = match presented {
                    Ok(f) => format!("the presented key is {f}, not the announced fingerprint"),
                    Err(e) => e.to_string(),
                };
                let _ = inc
                    .respond(reject(
                        &inc,
                        403,
                        "Forbidden",
                        "an opportunistic peer must present the key it announces (a=sipmail-pubkey)",
                    ))
                    .await;
                return Err(format!("peer {peer_domain} key {peer_fpr}: {why}"));
            }
            let checked = shared.trust.store.check_pin(&peer_domain, &peer_fpr);
            match checked {
                Ok(pin) => {
                    let from_peer = shared.is_peer_address(&peer_domain, inc.source.ip());
                    if let OpportunisticDecision::Hold(r) =
                        trust::opportunistic_decision(pin, false, from_peer)
                    {
                        hold = Some(r);
                    }
                }
                Err(e) => {
                    let _ = inc
                        .respond(reject(&inc, 500, "Server Internal Error", "trust state"))
                        .await;
                    return Err(format!("trust state for {peer_domain}: {e}"));
                }
            }
        }
        // The PSK MAC is checked on the confirm; nothing to look up here.
        AuthMode::Psk => {}
    }
    let media = match TcpListener::bind(SocketAddr::new(shared.site.media_ip, 0)).await {
        Ok(l) => l,
        Err(e) => {
            let _ = inc
                .respond(reject(&inc, 500, "Server Internal Error", "no media port"))
                .await;
            return Err(format!("cannot open a media port: {e}"));
        }
    };
    let media_addr = media.local_addr().map_err(|e| e.to_string())?;
    let to_tag = crate::sip::random_hex(8);
    let ctx = CallContext {
        call_id: call_id.clone(),
        from_tag,
        to_tag: to_tag.clone(),
        caller: format!("mail@{peer_domain}"),
        callee: format!("mail@{}", shared.site.domain),
    };
    // Wiped when this function returns; respond_with wipes its copy.
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    if getrandom::fill(secret.as_mut()).is_err() {
        let _ = inc
            .respond(reject(&inc, 500, "Server Internal Error", "no randomness"))
            .await;
        return Err("the OS random number generator failed".into());
    }
    let policy = CalleePolicy {
        media: media_addr,
        auth: mode,
        retained: shared.retained_for(&peer_domain),
        key_packet: if mode == AuthMode::Opportunistic {
            ks.signing_packet.clone()
        } else {
            Vec::new()
        },
    };
    let (signer, verifier) = ks.auth_for(&peer, &offer.key_packet);
    let responded = CalleeAwaitConfirm::respond_with(
        &ctx,
        &offer,
        *secret,
        &shared.site.suites,
        ks.announced_fpr(&peer),
        signer.as_ref(),
        &policy,
    );
    drop(policy);
    let (awaiting, answer) = match responded {
        Ok(x) => x,
        Err(
            e @ (HandshakeError::NoCommonSuite { .. }
            | HandshakeError::EmptySuiteList
            | HandshakeError::AuthMismatch { .. }
            | HandshakeError::TooManyRetainedIds),
        ) => {
            let _ = inc
                .respond(reject(&inc, 488, "Not Acceptable Here", &e.to_string()))
                .await;
            return Err(e.to_string());
        }
        Err(e) => {
            let _ = inc
                .respond(reject(&inc, 500, "Server Internal Error", "signing failed"))
                .await;
            return Err(e.to_string());
        }
    };
    // Key continuity is known before we answer: refuse here, before any 200 OK, if the
    // policy requires it.
    let continuity = awaiting.continuity();
    if continuity.is_problem() {
        tracing::warn!(%call_id, peer = %peer_domain, %continuity,
            "key continuity: the caller does not hold the secret our last calls left (it lost its cache, or someone else is calling)");
        if peer.continuity == ContinuityPolicy::Require {
            return Err(refuse(
                &inc,
                Refusal::Continuity {
                    domain: peer_domain.clone(),
                    continuity,
                },
            )
            .await);
        }
    } else if continuity == (Continuity::NoneHeld { peer_has: true }) {
        tracing::warn!(%call_id, peer = %peer_domain,
            "key continuity: the caller remembers a call we do not (our retained secrets were lost or reset)");
    }
    // Register the dialog before answering so the ACK cannot race past us.
    let (tx, mut rx) = mpsc::channel::<Incoming>(8);
    let registered = match shared.sip.dialogs.lock() {
        Ok(mut d) if !d.contains_key(&call_id) => {
            d.insert(call_id.clone(), tx);
            true
        }
        _ => false,
    };
    if !registered {
        let _ = inc
            .respond(reject(&inc, 482, "Loop Detected", "Call-ID already in use"))
            .await;
        return Err("duplicate Call-ID".into());
    }
    let _guard = DialogGuard {
        shared,
        call_id: call_id.clone(),
    };
    let mut ok = Response::for_request(req, 200, "OK");
    if let Some(v) = ok.headers.get("To").map(|t| format!("{t};tag={to_tag}")) {
        ok.headers.set("To", v);
    }
    ok.headers
        .push("Contact", format!("<sip:mail@{}>", shared.sip.addr));
    ok.headers.push("Allow", super::ALLOW);
    ok.headers.push("Content-Type", "application/sdp");
    let mut sid = [0u8; 8];
    let _ = getrandom::fill(&mut sid);
    ok.body = sdp::encode_answer(&answer, u64::from_be_bytes(sid) >> 1);
    inc.respond(ok)
        .await
        .map_err(|e| format!("sending 200 OK: {e}"))?;

    // Wait for the ACK and check the caller's half. A call evicted meanwhile (its source
    // sent newer calls than it has room for) ends here: its transaction stops, its media
    // port closes.
    let ack_wait = tokio::time::timeout(ACK_WAIT, async {
        loop {
            match rx.recv().await {
                Some(i) if i.request.method == Method::Ack => return Some(i),
                Some(i) if i.request.method == Method::Bye => {
                    let _ = i
                        .respond(Response::for_request(&i.request, 200, "OK"))
                        .await;
                    return None;
                }
                Some(i) => {
                    let _ = i
                        .respond(Response::for_request(&i.request, 491, "Request Pending"))
                        .await;
                }
                None => return None,
            }
        }
    });
    let ack = tokio::select! {
        a = ack_wait => a,
        _ = pending.evicted() => {
            inc.end_transaction();
            return Err("evicted before its ACK: its source placed newer calls than it has room for".into());
        }
        // Shutdown does not wait up to 32 s for an ACK that may never come.
        _ = shared.shutdown.wait() => {
            inc.end_transaction();
            return Err("shutting down before the ACK".into());
        }
    };
    // The call is no longer pending once ACKed (or given up).
    drop(pending);
    let ack = match ack {
        Ok(Some(a)) => a,
        Ok(None) => return Err("caller hung up before the ACK".into()),
        Err(_) => return Err("no ACK within 32 s".into()),
    };
    let done = sdp::decode_confirm(&ack.request.body)
        .map_err(|e: SdpError| e.to_string())
        .and_then(|c| {
            awaiting
                .on_confirm(&c, verifier.as_ref())
                .map(|d| (d, c.signature))
                .map_err(|e| e.to_string())
        });
    let (done, confirm_signature) = match done {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%call_id, peer = %peer_domain, error = %e, "the caller's confirm failed; hanging up");
            shared.event(RelayEvent::CallFailed {
                peer: peer_domain.clone(),
                reason: e.clone(),
            });
            send_bye(shared, &inc, &ctx, &e).await;
            return Err(e);
        }
    };
    // Accept the media connection: the first one whose first record authenticates. A BYE
    // meanwhile ends the call.
    let stream = tokio::select! {
        s = tokio::time::timeout(MEDIA_WAIT, accept_media(&media, &done.keys, &call_id)) => s.ok().flatten(),
        _ = wait_for_bye(&mut rx) => {
            return Err("the caller hung up before the media connection authenticated".into());
        }
    };
    drop(media);
    let Some(mut stream) = stream else {
        send_bye(shared, &inc, &ctx, "no media connection").await;
        return Err("the caller never opened an authenticated media connection".into());
    };
    // A held opportunistic call: its key has now proved itself (the confirm's signature
    // verified, and the media stream shows the caller holds the call's keys). Keep it for
    // the operator, tell the caller why through the call, and hang up. Nothing is pinned,
    // no retained secret kept, no mail taken.
    if let Some(why) = &hold {
        shared
            .record_pending(&peer_domain, &peer_fpr, inc.source.ip())
            .await;
        let msg = held_message(&peer_domain, &peer_fpr, why);
        use tokio::io::AsyncWriteExt;
        let greeting = format!("554 5.7.0 {}\r\n", msg.replace(['\r', '\n'], " "));
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            stream.write_all(greeting.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
        send_bye(shared, &inc, &ctx, &msg).await;
        shared.event(RelayEvent::CallFailed {
            peer: peer_domain.clone(),
            reason: msg.clone(),
        });
        let pinned = match why {
            HoldReason::Changed { pinned } => pinned.as_str(),
            HoldReason::FirstUseFromElsewhere => "nothing",
        };
        return Err(format!(
            "{msg} (pinned {pinned}, presented {peer_fpr}, from {})",
            inc.source
        ));
    }
    let sigs = crate::audit::CallSignatures {
        transcript: &done.transcript,
        answer_signature: &answer.signature,
        confirm_signature: &confirm_signature,
    };
    shared
        .call_established(&call_id, &peer, false, &peer_fpr, &done.keys, sigs)
        .await;

    let mut backend = SpoolBackend::new(
        shared.clone(),
        Origin::Peer {
            domain: peer_domain.clone(),
            call_id: call_id.clone(),
            sas: done.keys.sas.clone(),
            auth: mode,
            fingerprint: peer_fpr.clone(),
        },
    );
    let cfg = super::inbound::server_config(shared);
    let label = format!("{peer_domain} (call {call_id})");
    // Serve SMTP until the caller QUITs; a BYE (or shutdown) meanwhile ends the call.
    let mut bye_seen = false;
    {
        let session = crate::smtp::serve(&mut stream, label, &cfg, &mut backend);
        tokio::pin!(session);
        loop {
            tokio::select! {
                r = &mut session => {
                    if let Err(e) = r {
                        tracing::warn!(%call_id, peer = %peer_domain, error = %e, "SMTP through the call ended abnormally");
                    }
                    break;
                }
                m = rx.recv() => match m {
                    Some(i) if i.request.method == Method::Bye => {
                        let _ = i.respond(Response::for_request(&i.request, 200, "OK")).await;
                        bye_seen = true;
                        break;
                    }
                    Some(i) if i.request.method == Method::Ack => {}
                    Some(i) => {
                        let _ = i.respond(Response::for_request(&i.request, 488, "Not Acceptable Here")).await;
                    }
                    None => break,
                },
            }
        }
    }
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
    if !bye_seen {
        // The caller hangs up after QUIT; give it a moment, then hang up ourselves.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(i) = rx.recv().await {
                if i.request.method == Method::Bye {
                    let _ = i
                        .respond(Response::for_request(&i.request, 200, "OK"))
                        .await;
                    return true;
                }
            }
            false
        })
        .await;
        if !matches!(got, Ok(true)) {
            send_bye(shared, &inc, &ctx, "").await;
        }
    }
    tracing::info!(%call_id, peer = %peer_domain, "call ended");
    shared.event(RelayEvent::CallEnded {
        call_id,
        peer: peer_domain,
    });
    Ok(())
}

/// Connections to a call's media port that may be waiting for their first record at once.
const MEDIA_ATTEMPTS: usize = 8;
/// How long one media connection has to send its first, authenticated record.
const FIRST_RECORD_WAIT: Duration = Duration::from_secs(5);

/// Accept connections on the call's media port side by side until one sends a first
/// record that authenticates under the call's keys; that one wins, the others are dropped.
/// Each connection gets its own deadline, so silent or garbage connections (from anyone
/// who saw or guessed the port) cannot hold up the caller's. At most [`MEDIA_ATTEMPTS`]
/// wait at once; a new connection beyond that drops the oldest waiting one, so a flood
/// cannot keep the caller's connection in the backlog either. None if the listener fails.
async fn accept_media(
    media: &TcpListener,
    keys: &crate::handshake::SessionKeys,
    call_id: &str,
) -> Option<TunnelStream<tokio::net::TcpStream>> {
    let mut waiting = tokio::task::JoinSet::new();
    let mut order = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            accepted = media.accept() => {
                let (tcp, addr) = accepted.ok()?;
                let _ = tcp.set_nodelay(true);
                let mut t = TunnelStream::new(tcp, keys, Role::Callee, Limits::default());
                if waiting.len() >= MEDIA_ATTEMPTS
                    && let Some(oldest) = order.pop_front()
                {
                    tokio::task::AbortHandle::abort(&oldest);
                    tracing::warn!(%call_id, "too many media connections waiting; dropped the oldest");
                }
                order.push_back(waiting.spawn(async move {
                    match tokio::time::timeout(FIRST_RECORD_WAIT, t.read_first_record()).await {
                        Ok(Ok(())) => Ok(t),
                        Ok(Err(e)) => Err((addr, format!("failed authentication: {e}"))),
                        Err(_) => Err((addr, "sent nothing".to_string())),
                    }
                }));
            }
            Some(done) = waiting.join_next_with_id(), if !waiting.is_empty() => {
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                order.retain(|h: &tokio::task::AbortHandle| h.id() != id);
                match done {
                    Ok((_, Ok(t))) => return Some(t),
                    Ok((_, Err((addr, why)))) => {
                        tracing::warn!(%call_id, %addr, "media connection {why}; dropped")
                    }
                    // Aborted (dropped as the oldest, logged then) or panicked.
                    Err(_) => {}
                }
            }
        }
    }
}

/// Answer in-dialog requests until a BYE comes (answered 200) or the channel closes.
async fn wait_for_bye(rx: &mut mpsc::Receiver<Incoming>) {
    while let Some(i) = rx.recv().await {
        match i.request.method {
            Method::Bye => {
                let _ = i
                    .respond(Response::for_request(&i.request, 200, "OK"))
                    .await;
                return;
            }
            Method::Ack => {}
            _ => {
                let _ = i
                    .respond(Response::for_request(&i.request, 491, "Request Pending"))
                    .await;
            }
        }
    }
}

/// BYE from the callee: From/To swap roles (RFC 3261 §12.2.1.1). Sent in the background:
/// a caller that never answers it must not hold up this call's task (or shutdown).
async fn send_bye(shared: &Context, inc: &Incoming, ctx: &CallContext, reason: &str) {
    let mut r = crate::sip::Request::new(
        Method::Bye,
        format!("sip:mail@{}", ctx.caller.trim_start_matches("mail@")),
    );
    r.headers.push("Max-Forwards", "70");
    r.headers
        .push("From", format!("<sip:{}>;tag={}", ctx.callee, ctx.to_tag));
    r.headers
        .push("To", format!("<sip:{}>;tag={}", ctx.caller, ctx.from_tag));
    r.headers.push("Call-ID", ctx.call_id.clone());
    r.headers.push("CSeq", "1 BYE");
    if !reason.is_empty() {
        r.headers.push("Reason", super::reason_header(reason));
    }
    let (endpoint, dest, transport) = (shared.sip.endpoint.clone(), inc.source, inc.transport);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(35),
            endpoint.request(r, dest, transport),
        )
        .await;
    });
}
