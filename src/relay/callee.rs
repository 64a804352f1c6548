//! The answering side: ask admission whether the INVITE may become a call, answer with
//! our signed half of the handshake, check the ACK's confirm, accept the media connection
//! and serve SMTP through it.

use super::admission::{self, Admitted, InviteFacts, Local, Refusal, TrustView};
use super::context::{Context, PendingGuard};
use super::dialog::{self, Dialog, InDialog, Others};
use super::events::RelayEvent;
use super::inbound::{Origin, SpoolBackend};
use super::keys::KeyState;
use super::mediaport::{self, MediaPortError};
use super::sipvocab::warn_response;
use super::site::Site;
use super::trust::{self, ContinuityDecision, HoldReason, PinCheck};
use crate::handshake::sdp::{self, SdpError};
use crate::handshake::{Answer, AuthMode, CallContext, CalleeAwaitConfirm, CalleePolicy, Signer};
use crate::metrics::counting::{Counters, Counting};
use crate::metrics::{CallFailure, Direction};
use crate::sip::route;
use crate::sip::{Incoming, Request, Response};
use crate::tunnel::record::Limits;
use crate::tunnel::{Role, TunnelStream};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;

/// How long we wait for the ACK after our 200 OK (64*T1, like Timer H).
const ACK_WAIT: Duration = Duration::from_secs(32);
/// How long the caller has to open the media connection after its ACK.
const MEDIA_WAIT: Duration = Duration::from_secs(10);
/// Other in-dialog requests before the call is up (a re-INVITE, a CANCEL).
const WAITING: Others = Others::Answer(491, "Request Pending");
/// Other in-dialog requests while SMTP runs through the call.
const SERVING: Others = Others::Answer(488, "Not Acceptable Here");

/// The call's authenticated media stream (over a connection whose bytes are counted).
type Media = TunnelStream<Counting<tokio::net::TcpStream>>;

/// Send a refusal: the one response to the INVITE, counted as a failed call with `peer`
/// (the domain the caller claims; not a partner's counts as `other`). Returns what our
/// log says.
async fn refuse(shared: &Context, peer: &str, inc: &Incoming, r: Refusal) -> String {
    shared
        .metrics
        .call_failed(peer, Direction::Incoming, r.failure);
    let mut resp = warn_response(&inc.request, r.status, r.reason, &r.warning);
    if let Some(a) = r.accept {
        resp.headers.push("Accept", a);
    }
    let _ = inc.respond(resp).await;
    r.log
}

/// What admission reads, answered from one keyring snapshot and the trust store.
struct View<'a> {
    shared: &'a Context,
    keys: &'a KeyState,
    /// `trust = "dnssec"`: the caller's certificate, found and trusted in DNS.
    discovered: Option<&'a crate::keyring::DiscoveredCert>,
}

impl TrustView for View<'_> {
    fn signed_key(&self, domain: &str, fingerprint: &str) -> Result<(), String> {
        if let Some(c) = self.discovered {
            return if c.fingerprint().eq_ignore_ascii_case(fingerprint) {
                Ok(())
            } else {
                Err(format!(
                    "the call announces key {fingerprint}, DNS (trusted) has {}",
                    c.fingerprint()
                ))
            };
        }
        self.keys
            .keyring
            .peer_cert(domain, fingerprint)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn pin(&self, domain: &str, fingerprint: &str) -> Result<PinCheck, String> {
        self.shared
            .trust
            .store
            .check_pin(domain, fingerprint)
            .map_err(|e| e.to_string())
    }
    fn is_peer_address(&self, domain: &str, ip: IpAddr) -> bool {
        self.shared.is_peer_address(domain, ip)
    }
}

/// The peers admission may admit, and the caller's key from DNS when its trust is
/// `dnssec`: a configured `[[peer]]` with that trust, or a domain `[discovery]` allows
/// (added to the peers for this call). Err: (why, for the log; whether it is a refused key
/// change, the alert). The configured peers are borrowed, not copied: a copy per call
/// was a few hundred bytes per peer for the call's whole life (a hub's idle calls).
async fn caller_key_from_dns<'s>(
    shared: &Context,
    site: &'s super::site::Site,
    claimed: &str,
) -> Result<
    (
        std::borrow::Cow<'s, [crate::config::Peer]>,
        Option<super::dnskey::DiscoveredKey>,
    ),
    (String, bool),
> {
    let mut peers = std::borrow::Cow::Borrowed(site.peers.as_slice());
    let Some(partner) = site.partner(claimed) else {
        return Ok((peers, None));
    };
    if !matches!(partner.trust, crate::config::Trust::Dnssec) {
        return Ok((peers, None));
    }
    let Some(r) = site.resolver.as_ref() else {
        return Err((
            format!("{claimed}: trust = \"dnssec\" without a [dns] resolver"),
            false,
        ));
    };
    match super::dnskey::discover_key(
        r,
        &shared.trust.store,
        &partner.domain,
        true,
        site.insecure_keys(),
    )
    .await
    {
        Ok(k) => {
            if let crate::dns::PinAction::Repin { old } = &k.action {
                tracing::warn!(peer = %partner.domain, old = %old, new = %k.cert.fingerprint(),
                    "the caller's key in DNS changed, certified by the pinned key: the new key is pinned");
            }
            if site.peer(claimed).is_none() {
                peers.to_mut().push(partner);
            }
            Ok((peers, Some(k)))
        }
        Err(e) => {
            if e.is_key_change() {
                tracing::error!(peer = %partner.domain, reason = %e,
                    "ALERT: the caller's key in DNS changed without the old key's certification; its calls are refused");
            }
            Err((format!("caller {claimed}: {e}"), e.is_key_change()))
        }
    }
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
    // Every line logged while the call works carries its Call-ID, and once admission knows
    // it, the peer; the SMTP session through the call ("queued") runs inside it.
    let span = tracing::info_span!("call", %call_id, peer = tracing::field::Empty,
        direction = "incoming", %source);
    let answered = answer(&shared, inc, pending).instrument(span.clone()).await;
    if let Err(msg) = answered {
        span.in_scope(
            || tracing::warn!(%call_id, %source, reason = %msg, "incoming call refused or failed"),
        );
    }
}

/// Answer one INVITE: admission, our half of the handshake, the 200 OK, the caller's
/// confirm on the ACK, the media connection, then SMTP through it. Every refusal before
/// the 200 OK is one response, decided by [`admission`]. Returns Err with a reason for
/// the log on any failure (the SIP answer has been sent).
async fn answer(shared: &Arc<Context>, inc: Incoming, pending: PendingGuard) -> Result<(), String> {
    // Boxed, and gone once the call is up: the set-up's locals (admission, the handshake,
    // the SIP exchanges) took 7 kB more than serving needs, and an unboxed future keeps
    // room for them for the call's whole life, idle or not (docs/PERFORMANCE.md).
    let live = Box::pin(set_up(shared, inc, pending)).await?;
    let Live {
        inc,
        mut stream,
        mut rx,
        origin,
        call_id,
        peer_domain,
        call_dialog,
        guard,
    } = live;
    if !serve(shared, &mut stream, &mut rx, origin, &call_id, &peer_domain).await {
        dialog::hang_up_in_background(&shared.sip.endpoint, &call_dialog, None);
    }
    drop((guard, inc));
    tracing::info!(%call_id, peer = %peer_domain, "call ended");
    shared.event(RelayEvent::CallEnded {
        call_id,
        peer: peer_domain,
    });
    Ok(())
}

/// A call that is up: what serving it needs, kept as long as it lasts.
struct Live<'a> {
    /// The INVITE, kept for the call's life as before the split (its reply path).
    inc: Incoming,
    stream: Media,
    rx: mpsc::Receiver<Box<Incoming>>,
    origin: Origin,
    call_id: String,
    peer_domain: String,
    call_dialog: Dialog,
    guard: DialogGuard<'a>,
}

/// Everything before SMTP: admission, the answer, the ACK and its confirm, the media
/// connection, the audit record.
async fn set_up(
    shared: &Arc<Context>,
    inc: Incoming,
    mut pending: PendingGuard,
) -> Result<Live<'_>, String> {
    let req = &inc.request;
    let call_id = req.headers.call_id().unwrap_or_default().to_string();
    // One keyring and one set of settings for the whole call, even if a reload swaps
    // them meanwhile.
    let ks = shared.keys();
    let settings = shared.settings();
    let site = &settings.site;
    let facts = InviteFacts::of(req, inc.source.ip());
    let claimed = admission::caller_domain(&facts).unwrap_or_default();
    // `trust = "dnssec"` (a [[peer]] with it, or a domain [discovery] allows): the caller's
    // key comes from DNS, looked up before admission.
    let (peers, dns_key) = match caller_key_from_dns(shared, site, &claimed).await {
        Ok(x) => x,
        Err((log, key_changed)) => {
            return Err(refuse(shared, &claimed, &inc, Refusal::dns_key(log, key_changed)).await);
        }
    };
    let local = Local {
        domain: &site.domain,
        peers: &peers,
    };
    let view = View {
        shared,
        keys: &ks,
        discovered: dns_key.as_ref().map(|k| &k.cert),
    };
    let admitted = match admission::admit(&facts, local, &view) {
        Ok(a) => a,
        Err(r) => return Err(refuse(shared, &claimed, &inc, r).await),
    };
    let peer_domain = &admitted.domain;
    let failed = |f: CallFailure| {
        shared
            .metrics
            .call_failed(peer_domain, Direction::Incoming, f)
    };
    tracing::Span::current().record("peer", admitted.domain.as_str());
    let media = match mediaport::bind(site.media_ip, site.media_ports).await {
        Ok(l) => l,
        Err(e) => {
            let r = match e {
                MediaPortError::Busy(_) => Refusal::no_media_port(e.to_string()),
                MediaPortError::Io { .. } => Refusal::internal("no media port", e.to_string()),
            };
            return Err(refuse(shared, peer_domain, &inc, r).await);
        }
    };
    // Bound on `sip.media`; announced (and signed) at `sip.advertise` behind a NAT, whose
    // forwarding must keep the port.
    let bound = media.local_addr().map_err(|e| e.to_string())?;
    let media_addr = SocketAddr::new(site.public_media_ip, bound.port());
    let (signer, verifier) = match &dns_key {
        Some(k) => ks.auth_with_discovered(&k.cert),
        None => ks.auth_for(&admitted.peer, &admitted.offer.key_packet),
    };
    let prepared = prepare(
        shared,
        site,
        &ks,
        &admitted,
        signer.as_ref(),
        &call_id,
        media_addr,
    );
    let Prepared {
        ctx,
        awaiting,
        answer,
    } = match prepared {
        Ok(p) => p,
        Err(r) => return Err(refuse(shared, peer_domain, &inc, r).await),
    };
    // Register the dialog before answering so the ACK cannot race past us.
    // Boxed: the channel allocates its slots in blocks of 32, and an `Incoming` inline is
    // about 200 bytes, held for the call's whole life.
    let (tx, mut rx) = mpsc::channel::<Box<Incoming>>(8);
    let registered = match shared.sip.dialogs.lock() {
        Ok(mut d) if !d.contains_key(&call_id) => {
            d.insert(call_id.clone(), tx);
            true
        }
        _ => false,
    };
    if !registered {
        return Err(refuse(shared, peer_domain, &inc, Refusal::call_id_in_use()).await);
    }
    let _guard = DialogGuard {
        shared,
        call_id: call_id.clone(),
    };
    // Our requests in the dialog follow the route set (the INVITE's Record-Route, copied
    // into our 200 OK) to the caller's Contact; without one, they go back where the INVITE
    // came from. An unusable one is refused before anything is answered.
    let fallback = format!("sip:{}", ctx.caller);
    let routed = route::route_set_uas(req)
        .and_then(|set| {
            dialog::plan(
                &set,
                route::remote_target(req.headers.get("Contact")),
                &fallback,
            )
        })
        .map_err(|e| e.to_string());
    let hop = match routed {
        Ok(r) => dialog::resolve_hop(r.next_hop.as_ref(), (inc.source, inc.transport))
            .await
            .map(|h| (r, h)),
        Err(e) => Err(e),
    };
    let (routed, (hop, hop_transport)) = match hop {
        Ok(x) => x,
        Err(e) => {
            let r = Refusal::bad_route(e);
            return Err(refuse(shared, peer_domain, &inc, r).await);
        }
    };
    if let Err(e) = inc
        .respond(ok_response(
            shared,
            req,
            inc.transport,
            &ctx.to_tag,
            &answer,
        ))
        .await
    {
        failed(CallFailure::Network);
        return Err(format!("sending 200 OK: {e}"));
    }
    shared.metrics.call_answered(peer_domain);
    // Our requests in the dialog: From/To swap roles (RFC 3261 §12.2.1.1).
    let call_dialog = Dialog {
        call_id: call_id.clone(),
        from: format!("<sip:{}>;tag={}", ctx.callee, ctx.to_tag),
        to: format!("<sip:{}>;tag={}", ctx.caller, ctx.from_tag),
        uri: routed.request_uri,
        routes: routed.routes,
        target: hop,
        transport: hop_transport,
        bye_cseq: 1,
    };
    // A BYE is sent in the background: a caller that never answers it must not hold up
    // this call's task (or shutdown).
    let hang_up = |reason: &str| {
        dialog::hang_up_in_background(
            &shared.sip.endpoint,
            &call_dialog,
            (!reason.is_empty()).then_some(reason),
        )
    };

    // Wait for the ACK and check the caller's half. A call evicted meanwhile (its source
    // sent newer calls than it has room for) ends here: its transaction stops, its media
    // port closes.
    let ack_wait = tokio::time::timeout(ACK_WAIT, async {
        match dialog::next_ack_or_bye(&mut rx, WAITING).await {
            Some(InDialog::Ack(i)) => Some(*i),
            Some(InDialog::Bye) | None => None,
        }
    });
    let ack = tokio::select! {
        a = ack_wait => a,
        _ = pending.evicted() => {
            inc.end_transaction();
            failed(CallFailure::Policy);
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
        Ok(None) => {
            failed(CallFailure::Cancelled);
            return Err("caller hung up before the ACK".into());
        }
        Err(_) => {
            failed(CallFailure::Timeout);
            return Err("no ACK within 32 s".into());
        }
    };
    let done = sdp::decode_confirm(&ack.request.body)
        .map_err(|e: SdpError| (CallFailure::Malformed, e.to_string()))
        .and_then(|c| {
            awaiting
                .on_confirm(&c, verifier.as_ref())
                .map(|d| (d, c.signature))
                .map_err(|e| (admission::handshake_failure(&e), e.to_string()))
        });
    let (done, confirm_signature) = match done {
        Ok(d) => d,
        Err((why, e)) => {
            failed(why);
            tracing::warn!(%call_id, peer = %peer_domain, reason = %e, "the caller's confirm failed; hanging up");
            shared.event(RelayEvent::CallFailed {
                peer: peer_domain.clone(),
                reason: e.clone(),
            });
            hang_up(&e);
            return Err(e);
        }
    };
    // Accept the media connection: the first one whose first record authenticates. A BYE
    // meanwhile ends the call.
    let counters = shared.metrics.tunnel_counters(peer_domain);
    let stream = tokio::select! {
        s = tokio::time::timeout(MEDIA_WAIT, accept_media(&media, &done.keys, &call_id, &counters)) => s.ok().flatten(),
        _ = dialog::wait_for_bye(&mut rx, WAITING) => {
            failed(CallFailure::Cancelled);
            return Err("the caller hung up before the media connection authenticated".into());
        }
    };
    drop(media);
    let Some(mut stream) = stream else {
        failed(CallFailure::Media);
        hang_up("no media connection");
        return Err("the caller never opened an authenticated media connection".into());
    };
    if let Some(why) = &admitted.hold {
        failed(match why {
            HoldReason::Changed { .. } => CallFailure::UnknownKey,
            HoldReason::FirstUseFromElsewhere => CallFailure::Policy,
        });
        let (msg, log) = hold(shared, &mut stream, &admitted, why, inc.source).await;
        hang_up(&msg);
        shared.event(RelayEvent::CallFailed {
            peer: peer_domain.clone(),
            reason: msg,
        });
        return Err(log);
    }
    let sigs = crate::audit::CallSignatures {
        transcript: &done.transcript,
        answer_signature: &answer.signature,
        confirm_signature: &confirm_signature,
    };
    shared
        .call_established(
            &call_id,
            &admitted.peer,
            false,
            &admitted.fingerprint,
            &done.keys,
            sigs,
        )
        .await;
    let origin = Origin::Peer {
        domain: peer_domain.clone(),
        call_id: call_id.clone(),
        sas: done.keys.sas.clone(),
        auth: admitted.peer.trust.mode(),
        fingerprint: admitted.fingerprint.clone(),
        transcript_sha256: hex::encode(done.keys.transcript_hash),
        // Receipts need a key the partner holds in its keyring for us: signed calls only.
        receipts: admitted.peer.trust.mode() == crate::handshake::AuthMode::Signed,
    };
    let peer_domain = admitted.domain.clone();
    Ok(Live {
        inc,
        stream,
        rx,
        origin,
        call_id,
        peer_domain,
        call_dialog,
        guard: _guard,
    })
}

/// Our half of the handshake, ready for the 200 OK.
struct Prepared {
    ctx: CallContext,
    awaiting: CalleeAwaitConfirm,
    answer: Answer,
}

/// Compute our signed answer, announcing the media port at `media`; refused if that
/// fails, or if key continuity is broken and the peer's policy requires it (known before
/// any 200 OK).
fn prepare(
    shared: &Context,
    site: &Site,
    ks: &KeyState,
    a: &Admitted,
    signer: &dyn Signer,
    call_id: &str,
    media: SocketAddr,
) -> Result<Prepared, Refusal> {
    let mode = a.peer.trust.mode();
    let ctx = CallContext {
        call_id: call_id.to_string(),
        from_tag: a.from_tag.clone(),
        to_tag: crate::sip::random_hex(8),
        caller: format!("mail@{}", a.domain),
        callee: format!("mail@{}", site.domain),
    };
    // Wiped when this function returns; respond_with wipes its copy.
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    if getrandom::fill(secret.as_mut()).is_err() {
        return Err(Refusal::internal(
            "no randomness",
            "the OS random number generator failed".into(),
        ));
    }
    let policy = CalleePolicy {
        media,
        auth: mode,
        retained: shared.retained_for(&a.domain, Some(&a.fingerprint)),
        key_packet: if mode == AuthMode::Opportunistic {
            ks.signing_packet.clone()
        } else {
            Vec::new()
        },
    };
    let (awaiting, answer) = CalleeAwaitConfirm::respond_with(
        &ctx,
        &a.offer,
        *secret,
        &site.suites,
        ks.announced_fpr(&a.peer),
        signer,
        &policy,
    )
    .map_err(|e| admission::answer_refusal(&e))?;
    drop(policy);
    let continuity = awaiting.continuity();
    let peer = &a.domain;
    match trust::continuity_decision(continuity, a.peer.continuity) {
        ContinuityDecision::Warn | ContinuityDecision::Refuse => {
            tracing::warn!(%call_id, %peer, %continuity,
                "key continuity: the caller does not hold the secret our last calls left (it lost its cache, or someone else is calling)")
        }
        ContinuityDecision::LostLocal => {
            tracing::warn!(%call_id, %peer,
                "key continuity: the caller remembers a call we do not (our retained secrets were lost or reset)")
        }
        ContinuityDecision::Fine => {}
    }
    if let Some(r) = admission::continuity_refusal(peer, continuity, a.peer.continuity) {
        return Err(r);
    }
    Ok(Prepared {
        ctx,
        awaiting,
        answer,
    })
}

/// The 200 OK carrying our answer; our Contact names the `transport` the INVITE came on.
fn ok_response(
    shared: &Context,
    req: &Request,
    transport: crate::sip::Transport,
    to_tag: &str,
    answer: &Answer,
) -> Response {
    let mut ok = Response::for_request(req, 200, "OK");
    if let Some(v) = ok.headers.get("To").map(|t| format!("{t};tag={to_tag}")) {
        ok.headers.set("To", v);
    }
    ok.headers
        .push("Contact", dialog::contact(shared.sip.addr, transport));
    ok.headers.push("Allow", super::sipvocab::ALLOW);
    ok.headers.push("Content-Type", "application/sdp");
    let mut sid = [0u8; 8];
    let _ = getrandom::fill(&mut sid);
    ok.body = sdp::encode_answer(answer, u64::from_be_bytes(sid) >> 1);
    ok
}

/// A held opportunistic call: its key has now proved itself (the confirm's signature
/// verified, and the media stream shows the caller holds the call's keys). Keep it for the
/// operator and tell the caller why through the call. Nothing is pinned, no retained
/// secret kept, no mail taken. Returns what the caller is told (the BYE's reason) and
/// what our log says.
async fn hold(
    shared: &Context,
    stream: &mut Media,
    a: &Admitted,
    why: &HoldReason,
    source: SocketAddr,
) -> (String, String) {
    let (peer_domain, peer_fpr) = (&a.domain, &a.fingerprint);
    shared
        .record_pending(peer_domain, peer_fpr, source.ip())
        .await;
    let msg = admission::held_message(peer_domain, peer_fpr, why);
    let greeting = format!("554 5.7.0 {}\r\n", msg.replace(['\r', '\n'], " "));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(greeting.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    let pinned = match why {
        HoldReason::Changed { pinned } => pinned.as_str(),
        HoldReason::FirstUseFromElsewhere => "nothing",
    };
    let log = format!("{msg} (pinned {pinned}, presented {peer_fpr}, from {source})");
    (msg, log)
}

/// Serve SMTP through the call until the caller QUITs; a BYE meanwhile ends the call.
/// True once the caller hung up (its BYE answered), false if we should.
async fn serve(
    shared: &Arc<Context>,
    stream: &mut Media,
    rx: &mut mpsc::Receiver<Box<Incoming>>,
    origin: Origin,
    call_id: &str,
    peer_domain: &str,
) -> bool {
    let mut cfg = super::inbound::server_config(shared);
    cfg.receipts = matches!(origin, Origin::Peer { receipts: true, .. });
    let mut backend = SpoolBackend::new(shared.clone(), origin);
    let label = format!("{peer_domain} (call {call_id})");
    let mut bye_seen = false;
    {
        let session = crate::smtp::serve(&mut *stream, label, &cfg, &mut backend);
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
                    Some(i) => {
                        if let Some(InDialog::Bye) = dialog::on_request(*i, SERVING).await {
                            bye_seen = true;
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
    if bye_seen {
        return true;
    }
    // The caller hangs up after QUIT; give it a moment, then hang up ourselves.
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        dialog::wait_for_bye(rx, Others::Ignore),
    )
    .await;
    matches!(got, Ok(true))
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
    counters: &Counters,
) -> Option<Media> {
    let mut waiting = tokio::task::JoinSet::new();
    let mut order = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            accepted = media.accept() => {
                let (tcp, addr) = accepted.ok()?;
                let _ = tcp.set_nodelay(true);
                let tcp = Counting::new(tcp, counters.clone());
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
