//! The calling side: one worker per partner domain. It places a call when there is mail,
//! runs an SMTP client through the call's encrypted stream, reuses the call for further
//! messages, and hangs up with BYE when idle.

use super::admission::handshake_failure;
use super::context::{Context, SetupFailure};
use super::dialog::{self, Dialog};
use super::events::RelayEvent;
use super::failover::{self, Attempt, Failover, Next};
use super::jobs::Lane;
use super::locate::{self, CallTarget};
use super::outcome::{Job, RcptOutcome, outcomes_from_smtp};
use super::trust::{ContinuityDecision, HoldReason, OpportunisticDecision, continuity_decision};
use crate::config::Peer;
use crate::handshake::sdp::{self, SdpError};
use crate::handshake::{AuthMode, CallContext, CallerAwaitAnswer, Continuity, HandshakeError};
use crate::metrics::counting::Counting;
use crate::metrics::{CallFailure, Direction};
use crate::sip::route::{self, Routed};
use crate::sip::{Method, Request, TxnError};
use crate::smtp::{ClientError, ClientTimeouts, SmtpClient};
use crate::tunnel::record::Limits;
use crate::tunnel::{Role, TunnelStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("SIP: {0}")]
    Sip(#[from] TxnError),
    #[error("no answer to the INVITE within {} s", .0.as_secs())]
    NoAnswer(Duration),
    #[error("the peer answered {status} {reason}{}", warning.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
    Rejected {
        status: u16,
        reason: String,
        warning: Option<String>,
        /// Its `Retry-After`, seconds: when the peer wants the next try.
        retry_after: Option<u32>,
    },
    #[error("the 200 OK is malformed: {0}")]
    BadAnswer(String),
    #[error("the answer's SDP: {0}")]
    Sdp(#[from] SdpError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("media connection to {addr}: {source}")]
    Media {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a call set up to the same peer just before failed: {0}")]
    PeerJustFailed(String, Option<u32>),
    #[error("SMTP greeting through the call: {0}")]
    Smtp(#[from] ClientError),
    #[error(
        "the key of mail@{domain} changed since first use (pinned {pinned}, presented {presented}); \
         refused until an operator runs `sipmail trust accept {domain} {presented}`"
    )]
    PinChanged {
        domain: String,
        pinned: String,
        presented: String,
    },
    #[error(
        "first call to mail@{domain} (opportunistic): its relay {target} was located by DNS answers that are not DNSSEC-secure, so the key it presented, {presented}, is not pinned on first use (a forged answer would pin an impostor); compare the fingerprint with the partner and run `sipmail trust accept {domain} {presented}`, or give the peer a literal sip URI"
    )]
    FirstUseUnlocated {
        domain: String,
        target: String,
        presented: String,
    },
    #[error(
        "key continuity with mail@{domain} broken ({continuity}); refused because continuity = \"require\" (after checking, `sipmail trust reset {domain}`)"
    )]
    Continuity {
        domain: String,
        continuity: Continuity,
    },
    #[error("trust state: {0}")]
    TrustState(#[from] super::trust::TrustError),
    #[error("locating the partner's relay in DNS: {0}")]
    Locate(#[from] crate::dns::LocateError),
    #[error("the partner's key from DNS: {0}")]
    Discovery(#[from] super::dnskey::DiscoveryError),
}

impl CallError {
    /// Why the call failed, for the metrics; `None` when no call was placed (a set-up
    /// just before failed, and this lane did not try again).
    fn failure(&self) -> Option<CallFailure> {
        Some(match self {
            CallError::Resolve(_) => CallFailure::Network,
            CallError::Random(_) | CallError::TrustState(_) => CallFailure::Internal,
            CallError::Sip(TxnError::Timeout) | CallError::NoAnswer(_) => CallFailure::Timeout,
            CallError::Sip(TxnError::Io(_) | TxnError::TransportClosed) => CallFailure::Network,
            CallError::Sip(_) => CallFailure::Internal,
            CallError::Rejected { status, .. } => CallFailure::of_status(*status),
            CallError::BadAnswer(_) | CallError::Sdp(_) => CallFailure::Malformed,
            CallError::Handshake(e) => handshake_failure(e),
            CallError::Media { .. } => CallFailure::Media,
            CallError::PeerJustFailed(..) => return None,
            CallError::Smtp(_) => CallFailure::Smtp,
            CallError::PinChanged { .. } | CallError::FirstUseUnlocated { .. } => {
                CallFailure::UnknownKey
            }
            CallError::Continuity { .. } => CallFailure::Continuity,
            CallError::Locate(_) => CallFailure::Dns,
            CallError::Discovery(e) if e.is_key_change() => CallFailure::KeyChanged,
            CallError::Discovery(_) => CallFailure::Dns,
        })
    }

    /// When the peer asked to be tried again (`Retry-After` on its refusal), seconds.
    fn retry_after(&self) -> Option<u32> {
        match self {
            CallError::Rejected { retry_after, .. } | CallError::PeerJustFailed(_, retry_after) => {
                *retry_after
            }
            _ => None,
        }
    }

    /// What this failure means for trying the partner's next relay (see `failover`).
    fn attempt(&self) -> Attempt {
        match self {
            CallError::Sip(TxnError::Timeout) | CallError::NoAnswer(_) => Attempt::NoAnswer,
            CallError::Sip(
                TxnError::Io(_) | TxnError::TransportClosed | TxnError::TooManyConnections,
            )
            | CallError::Resolve(_) => Attempt::Unreachable,
            CallError::Rejected { status, .. } => Attempt::Status(*status),
            CallError::Media { .. } | CallError::Smtp(_) => Attempt::SetupFailed,
            // A malformed answer, a failed signature, commitment, pin or continuity check,
            // our own trouble: not the relay's availability.
            _ => Attempt::Final,
        }
    }
}

/// A call's media stream: the tunnel over a TCP connection whose bytes are counted.
type Media = TunnelStream<Counting<TcpStream>>;

struct ActiveCall {
    dialog: Dialog,
    client: SmtpClient<Media>,
    /// The partner's fingerprint as this call authenticated it (hex), and whether its
    /// receipts can be verified (an OpenPGP-signed call, journalled for receipts).
    peer_fpr: String,
    receipts: bool,
    /// `call{call_id, peer}`: every line logged while the call works carries both.
    span: tracing::Span,
    /// The partner relay it reached (`CallTarget::label`), for a `RelayPin`.
    relay: String,
}

fn random32() -> Result<[u8; 32], CallError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| CallError::Random(e.to_string()))?;
    Ok(b)
}

/// `trust = "dnssec"`: the partner's key from its OPENPGPKEY record, trusted only when
/// DNSSEC-secure and by the pin rules (`crate::dns::keytrust`). A refused change is an
/// alert: an error line, and `key_changed` in the metrics.
async fn discovered_key(
    shared: &Context,
    site: &super::site::Site,
    peer: &Peer,
) -> Result<Option<super::dnskey::DiscoveredKey>, CallError> {
    if !matches!(peer.trust, crate::config::Trust::Dnssec) {
        return Ok(None);
    }
    let r = site
        .resolver
        .as_ref()
        .ok_or_else(|| CallError::Resolve(format!("{}: no [dns] resolver", peer.domain)))?;
    match super::dnskey::discover_key(
        r,
        &shared.trust.store,
        &peer.domain,
        true,
        site.insecure_keys(),
    )
    .await
    {
        Ok(k) => {
            match &k.action {
                crate::dns::PinAction::Keep => {}
                crate::dns::PinAction::PinFirst => tracing::info!(peer = %peer.domain,
                    fingerprint = %k.cert.fingerprint(), "key found in DNSSEC-secure DNS pinned (first use)"),
                crate::dns::PinAction::Repin { old } => tracing::warn!(peer = %peer.domain,
                    old = %old, new = %k.cert.fingerprint(),
                    "the partner's key in DNS changed, certified by the pinned key: the new key is pinned"),
            }
            Ok(Some(k))
        }
        Err(e) => {
            if e.is_key_change() {
                tracing::error!(peer = %peer.domain, reason = %e,
                    "ALERT: the partner's key in DNS changed without the old key's certification; calls refused, mail stays queued");
            }
            Err(e.into())
        }
    }
}

/// Calls to one peer are set up one at a time (the calls themselves then run side by side).
/// Each handshake leaves a retained secret at both ends. Set-ups that overlapped would find
/// a secret at one end that the other does not hold yet, and the two caches, filled in
/// different orders, could drift apart until no secret is common: a false "man in the
/// middle?" alarm, and a refused call under `continuity = "require"`. One at a time, both
/// ends see the same sequence. It costs little: a set-up takes a few milliseconds, and a
/// call then carries many messages. A lane that waited while the set-up before it failed
/// does not call again at once: the peer was just found unreachable or refusing, and its
/// mail is retried on the queue's schedule.
async fn place_call_in_turn(
    shared: &Arc<Context>,
    peer: &Peer,
    call_id: &str,
    only: Option<&str>,
) -> Result<ActiveCall, CallError> {
    let gate = shared
        .sip
        .call_setup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(peer.domain.clone())
        .or_default()
        .clone();
    let waiting_since = tokio::time::Instant::now();
    let mut last = gate.lock().await;
    if let Some(f) = last.as_ref()
        && f.at >= waiting_since
    {
        return Err(CallError::PeerJustFailed(f.reason.clone(), f.retry_after));
    }
    let placed = place_call_on_targets(shared, peer, call_id, only).await;
    // A call to one pinned relay that fails says nothing about the peer's other relays:
    // the lanes waiting for a call to any of them still try.
    if only.is_none() || placed.is_ok() {
        *last = placed.as_ref().err().map(|e| SetupFailure {
            at: tokio::time::Instant::now(),
            reason: e.to_string(),
            retry_after: e.retry_after(),
        });
    }
    placed
}

/// Try the peer's relays in turn (see `failover`): the first whose call is set up wins.
/// Each failed attempt is logged with its target and why, and counted; one that must not
/// fail over (a refusal, a security check) ends the walk at once. The first attempt uses
/// `call_id`, each further one a fresh Call-ID. With `only`, the one relay of that label
/// is tried (a `RelayPin`), if the peer still has it.
async fn place_call_on_targets(
    shared: &Arc<Context>,
    peer: &Peer,
    call_id: &str,
    only: Option<&str>,
) -> Result<ActiveCall, CallError> {
    // The key from DNS (`trust = "dnssec"`) is the domain's, not one relay's: looked up
    // once for all the attempts below, before any INVITE is sent.
    let dns_key = discovered_key(shared, &shared.settings().site, peer).await?;
    let targets = locate::locate(&shared.settings().site, peer)
        .await
        .map_err(|e| match e {
            locate::Unlocated::Dns(e) => CallError::Locate(e),
            locate::Unlocated::Static(e) => CallError::Resolve(e),
        })?;
    let pinned = only.is_some_and(|l| targets.iter().any(|t| t.label == l));
    if let Some(l) = only
        && !pinned
    {
        tracing::warn!(peer = %peer.domain, relay = %l,
            "the relay that may hold a message is no longer among the peer's relays; trying them all (the message may arrive twice)");
    }
    let targets: Vec<CallTarget> = if pinned {
        targets
            .into_iter()
            .filter(|t| Some(t.label.as_str()) == only)
            .collect()
    } else {
        targets
    };
    let labels: Vec<&str> = targets.iter().map(|t| t.label.as_str()).collect();
    let mut walk = {
        let mut down = shared.sip.down.lock().unwrap_or_else(|p| p.into_inner());
        down.prune(std::time::Instant::now());
        Failover::new(&labels, &down, std::time::Instant::now())
    };
    let mut next = walk.first();
    let mut call_id = call_id.to_string();
    let mut attempt_no = 0usize;
    loop {
        let Next::Try { index, last } = next else {
            // `first` on a non-empty list always tries; `after` stops only after an Err.
            return Err(CallError::Resolve(format!(
                "no relay left for {}",
                peer.domain
            )));
        };
        let target = &targets[index];
        if attempt_no > 0 {
            call_id = format!(
                "{}@{}",
                crate::sip::random_hex(16),
                shared.settings().site.domain
            );
        }
        attempt_no += 1;
        // A pinned relay is not waited for as long as a last one: its message can wait
        // for the next attempt, and the lane has other mail.
        let answer_wait = (!last || pinned).then_some(failover::ANSWER_WAIT);
        let placed = place_call(
            shared,
            peer,
            &call_id,
            target,
            answer_wait,
            dns_key.as_ref(),
        )
        .instrument(tracing::info_span!("attempt", target = %target.label))
        .await;
        let mark = |failed: bool| {
            let mut down = shared.sip.down.lock().unwrap_or_else(|p| p.into_inner());
            if failed {
                down.mark(&target.label, std::time::Instant::now());
            } else {
                down.clear(&target.label);
            }
        };
        let e = match placed {
            Ok(c) => {
                mark(false);
                if attempt_no > 1 {
                    tracing::info!(%call_id, peer = %peer.domain, target = %target.label,
                        attempt = attempt_no, "call set up with a further relay of the peer");
                }
                return Ok(c);
            }
            Err(e) => e,
        };
        let attempt = e.attempt();
        if failover::fails_over(attempt) {
            mark(true);
        }
        next = walk.after(attempt);
        match next {
            Next::Try { index: n, .. } => {
                tracing::warn!(%call_id, peer = %peer.domain, target = %target.label, reason = %e,
                    next = %targets[n].label, "call set-up to this relay failed; trying the peer's next relay");
                if let Some(f) = e.failure() {
                    shared
                        .metrics
                        .call_failed(&peer.domain, Direction::Outgoing, f);
                }
                shared.event(RelayEvent::CallFailed {
                    peer: peer.domain.clone(),
                    reason: format!("{}: {e}", target.label),
                });
            }
            Next::Stop => {
                if !failover::fails_over(attempt) && targets.len() > 1 {
                    tracing::warn!(%call_id, peer = %peer.domain, target = %target.label, reason = %e,
                        "call set-up failed; not trying the peer's other relays: this failure is not about the relay's availability (docs/ARCHITECTURE.md, \"Several relays per site\")");
                } else {
                    tracing::warn!(%call_id, peer = %peer.domain, target = %target.label, reason = %e,
                        attempts = attempt_no, "call set-up to the peer's last relay failed");
                }
                return Err(e);
            }
        }
    }
}

/// One attempt: the INVITE to `target`, waiting at most `answer_wait` for its answer
/// (`None`: the INVITE transaction's own time, 32 s).
async fn place_call(
    shared: &Arc<Context>,
    peer: &Peer,
    call_id: &str,
    call_target: &CallTarget,
    answer_wait: Option<Duration>,
    dns_key: Option<&super::dnskey::DiscoveredKey>,
) -> Result<ActiveCall, CallError> {
    // One set of settings for the whole call, even if a reload swaps them meanwhile.
    let settings = shared.settings();
    let site = &settings.site;
    let started = tokio::time::Instant::now();
    shared.metrics.call_placed(&peer.domain);
    let (target, transport) = (call_target.addr, call_target.transport);
    let call_id = call_id.to_string();
    let from_tag = crate::sip::random_hex(8);
    let mode = peer.trust.mode();
    // One keyring for the whole call, even if it is reloaded meanwhile.
    let ks = shared.keys();
    let caller = CallerAwaitAnswer::new(
        random32()?,
        random32()?,
        site.suites.clone(),
        ks.announced_fpr(peer),
    )
    .with_auth(
        mode,
        if mode == AuthMode::Opportunistic {
            ks.signing_packet.clone()
        } else {
            Vec::new()
        },
    )
    .with_retained(shared.retained_for(&peer.domain, None));
    let session_id = u64::from_be_bytes(random32()?[..8].try_into().unwrap_or_default()) >> 1;
    let uri = format!("sip:mail@{}", peer.domain);
    let mut invite = Request::new(Method::Invite, uri.clone());
    invite.headers.push("Max-Forwards", "70");
    invite
        .headers
        .push("From", format!("<sip:mail@{}>;tag={from_tag}", site.domain));
    invite
        .headers
        .push("To", format!("<sip:mail@{}>", peer.domain));
    invite.headers.push("Call-ID", call_id.clone());
    invite.headers.push("CSeq", "1 INVITE");
    invite
        .headers
        .push("Contact", dialog::contact(shared.sip.addr, transport));
    invite.headers.push("Allow", super::sipvocab::ALLOW);
    invite
        .headers
        .push("User-Agent", concat!("sipmail/", env!("CARGO_PKG_VERSION")));
    invite.headers.push("Content-Type", "application/sdp");
    invite.body = sdp::encode_offer(caller.offer(), session_id, site.public_media_ip);

    tracing::debug!(%call_id, peer = %peer.domain, %target, "INVITE");
    let sent = shared.sip.endpoint.request(invite, target, transport);
    let resp = match answer_wait {
        Some(w) => tokio::time::timeout(w, sent)
            .await
            .map_err(|_| CallError::NoAnswer(w))??,
        None => sent.await?,
    };
    if !(200..300).contains(&resp.status) {
        return Err(CallError::Rejected {
            status: resp.status,
            reason: resp.reason.clone(),
            warning: resp.headers.get("Warning").map(str::to_string),
            retry_after: resp.headers.get("Retry-After").and_then(retry_after_secs),
        });
    }
    let to = resp
        .headers
        .get("To")
        .ok_or_else(|| CallError::BadAnswer("no To header".into()))?
        .to_string();
    let to_tag = resp
        .headers
        .to()
        .ok()
        .and_then(|t| t.tag().map(str::to_string))
        .ok_or_else(|| CallError::BadAnswer("no To tag".into()))?;
    // The route set (through record-routing proxies) and the remote target; ACK and BYE
    // go to the first route, or without one where the INVITE went.
    let routing = match route::route_set_uac(&resp) {
        Ok(set) => dialog::plan(
            &set,
            route::remote_target(resp.headers.get("Contact")),
            &uri,
        )
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (routed, mut bad_route) = match routing {
        Ok(r) => (r, None),
        Err(e) => (
            Routed {
                request_uri: uri.clone(),
                routes: Vec::new(),
                next_hop: None,
            },
            Some(e),
        ),
    };
    let (hop, hop_transport) =
        match dialog::resolve_hop(routed.next_hop.as_ref(), (target, transport)).await {
            Ok(h) => h,
            Err(e) => {
                bad_route.get_or_insert(e);
                (target, transport)
            }
        };
    let dialog = Dialog {
        call_id: call_id.clone(),
        from: format!("<sip:mail@{}>;tag={from_tag}", site.domain),
        to,
        uri: routed.request_uri,
        routes: routed.routes,
        target: hop,
        transport: hop_transport,
        // Our INVITE took CSeq 1 (and its ACK shares it).
        bye_cseq: 2,
    };
    if let Some(e) = bad_route {
        // Best effort: ACK and BYE where the INVITE went, without the routes.
        let ack = dialog.request(Method::Ack, 1);
        let _ = shared.sip.endpoint.send_ack(ack, hop, hop_transport).await;
        bye_in_background(shared, &dialog, "unusable Record-Route or Contact");
        return Err(CallError::BadAnswer(e));
    }
    let ctx = CallContext {
        call_id: call_id.clone(),
        from_tag,
        to_tag,
        caller: format!("mail@{}", site.domain),
        callee: format!("mail@{}", peer.domain),
    };
    // From here on the INVITE has a 2xx, so whatever fails, we ACK and then BYE.
    let checked = sdp::decode_answer(&resp.body)
        .map_err(CallError::from)
        .and_then(|answer| {
            // The answer's signature is verified first (with the key the callee presents,
            // opportunistic): only a key that proved itself is compared with the pin, and
            // only such a key is ever recorded as pending.
            let done = {
                let (signer, verifier) = match dns_key {
                    Some(k) => ks.auth_with_discovered(&k.cert),
                    None => ks.auth_for(peer, &answer.key_packet),
                };
                caller.on_answer(&ctx, &answer, verifier.as_ref(), signer.as_ref())?
            };
            if mode == AuthMode::Opportunistic {
                check_pin(shared, peer, &answer.fingerprint, call_target)?;
            }
            let continuity = done.keys.continuity;
            match continuity_decision(continuity, peer.continuity) {
                d @ (ContinuityDecision::Warn | ContinuityDecision::Refuse) => {
                    tracing::warn!(%call_id, peer = %peer.domain, %continuity,
                        "key continuity: the callee does not hold the secret our last calls left (it lost its cache, or someone else is answering)");
                    if d == ContinuityDecision::Refuse {
                        return Err(CallError::Continuity {
                            domain: peer.domain.clone(),
                            continuity,
                        });
                    }
                }
                ContinuityDecision::LostLocal => {
                    tracing::warn!(%call_id, peer = %peer.domain,
                        "key continuity: the callee remembers a call we do not (our retained secrets were lost or reset)");
                }
                ContinuityDecision::Fine => {}
            }
            Ok((done, answer))
        });
    let (done, answer) = match checked {
        Ok(x) => x,
        Err(e) => {
            let ack = dialog.request(Method::Ack, 1);
            let _ = shared
                .sip
                .endpoint
                .send_ack(ack, dialog.target, dialog.transport)
                .await;
            bye_in_background(shared, &dialog, &e.to_string());
            if let CallError::PinChanged { presented, .. }
            | CallError::FirstUseUnlocated { presented, .. } = &e
            {
                shared
                    .record_pending(&peer.domain, presented, target.ip())
                    .await;
            }
            return Err(e);
        }
    };
    let mut ack = dialog.request(Method::Ack, 1);
    ack.headers.push("Content-Type", sdp::CONFIRM_CONTENT_TYPE);
    ack.body = sdp::encode_confirm(&done.confirm);
    shared
        .sip
        .endpoint
        .send_ack(ack, dialog.target, dialog.transport)
        .await?;

    // A receipt names the call it came through; the journal lets us check that, also for
    // a receipt that comes back on a later call after a restart. So the call is journaled
    // (fsynced) before any message goes through it: the write runs while the media
    // connection and the greeting come up, and is waited for below.
    // Only a partner whose cert is in our keyring (`trust = "signed"`): a receipt must
    // verify later too (`sipmail receipts verify`), not only with this call's key. A
    // `dnssec` partner's key is found per call and not kept in the keyring.
    let journaled = matches!(peer.trust, crate::config::Trust::Signed).then(|| {
        let receipts = shared.receipts.clone();
        let entry = crate::receipt::store::JournalCall {
            at_ms: crate::queue::now_ms(),
            peer: peer.domain.to_ascii_lowercase(),
            call_id: call_id.to_string(),
            transcript_sha256: hex::encode(done.keys.transcript_hash),
        };
        tokio::spawn(async move { receipts.record_call(entry).await })
    });

    // Connect where the callee's signed answer says (the address is in T1), nowhere else.
    let media = match &shared.hooks.media_connect {
        Some(f) => f(answer.media),
        None => answer.media,
    };
    let stream = async {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(media))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        tcp.set_nodelay(true)?;
        let tcp = Counting::new(tcp, shared.metrics.tunnel_counters(&peer.domain));
        let mut t = TunnelStream::new(tcp, &done.keys, Role::Caller, Limits::default());
        t.send_hello().await?;
        Ok::<_, std::io::Error>(t)
    }
    .await;
    let stream = match stream {
        Ok(s) => s,
        Err(source) => {
            bye_in_background(shared, &dialog, "media connection failed");
            return Err(CallError::Media {
                addr: media,
                source,
            });
        }
    };
    let client = match SmtpClient::connect(stream, &site.hostname, ClientTimeouts::default()).await
    {
        Ok(c) => c,
        Err(e) => {
            bye_in_background(shared, &dialog, "no SMTP greeting through the call");
            return Err(e.into());
        }
    };
    let peer_fpr = hex::encode_upper(&answer.fingerprint);
    let sigs = crate::audit::CallSignatures {
        transcript: &done.transcript,
        answer_signature: &answer.signature,
        confirm_signature: &done.confirm.signature,
    };
    shared.metrics.call_setup(&peer.domain, started.elapsed());
    shared
        .call_established(&call_id, peer, true, &peer_fpr, &done.keys, sigs)
        .await;
    let receipts = match journaled {
        None => false,
        Some(j) => match j.await.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot journal the call; no receipts are asked for on it");
                false
            }
        },
    };
    Ok(ActiveCall {
        dialog,
        client,
        peer_fpr,
        receipts,
        span: tracing::Span::current(),
        relay: call_target.label.clone(),
    })
}

/// Recipients the partner took, but whose receipt could not be checked or kept: not
/// delivered yet, tried again (the partner recognises the resend).
fn not_delivered(outcomes: &mut [(String, RcptOutcome)], why: String) {
    for (_, o) in outcomes.iter_mut() {
        if *o == RcptOutcome::Delivered {
            *o = RcptOutcome::Transient(why.clone());
        }
    }
}

/// The receipts a partner returned for `job`: verified with the key this call
/// authenticated, checked against the message sent (its hash, size, sender, our queue ID)
/// and the calls we placed, and stored durably *before* any recipient is reported
/// delivered. A recipient the partner accepted without a good receipt stays queued (its
/// resend is recognised, and the partner returns its receipt again).
#[allow(clippy::too_many_arguments)]
async fn receipts_for(
    ctx: &Context,
    domain: &str,
    active: &ActiveCall,
    job: &Job,
    sent: &crate::smtp::SendOutcome,
    sha256: &str,
    size: u64,
    outcomes: &mut [(String, RcptOutcome)],
) {
    let Some(data) = sent.data.as_ref().filter(|d| d.is_positive()) else {
        return;
    };
    let accepted: Vec<String> = sent.delivered().into_iter().map(str::to_string).collect();
    let settings = ctx.settings();
    let keys = ctx.keys();
    let m = super::receipts::SentMessage {
        peer: domain,
        peer_fpr: &active.peer_fpr,
        own_domain: &settings.site.domain,
        queue_id: &job.id,
        sha256,
        size,
        mail_from: &job.mail_from,
        rcpts: &accepted,
    };
    let checked = super::receipts::check_returned(&keys, &ctx.receipts, &m, data.lines());
    let (covered, signed) = match checked {
        Ok(x) => x,
        Err(e) => {
            // Which hash the receipt was held against: one taken when the message was
            // spooled also catches a spool file that changed since (a local fault).
            let ours = if job.decoded.is_some() {
                "when spooled"
            } else {
                "as sent"
            };
            tracing::error!(queue_id = %job.id, peer = %domain, call_id = %active.dialog.call_id, error = %e,
                hashed = ours,
                "ALERT: the partner's receipt is refused; the message is not counted as delivered and stays queued");
            ctx.metrics.receipt_checked(domain, false);
            not_delivered(outcomes, format!("peer {domain}: receipt refused: {e}"));
            return;
        }
    };
    if let Err(e) = ctx
        .receipts
        .add_sent(&job.id, domain, &active.peer_fpr, signed)
        .await
    {
        tracing::error!(queue_id = %job.id, error = %e, "cannot store the receipt; the message stays queued and is sent again");
        not_delivered(outcomes, format!("cannot store the receipt: {e}"));
        return;
    }
    ctx.metrics.receipt_checked(domain, true);
    for (addr, o) in outcomes.iter_mut() {
        if *o == RcptOutcome::Delivered && !covered.iter().any(|c| c == addr) {
            *o = RcptOutcome::Transient(format!(
                "peer {domain} accepted {addr} but no receipt covers it"
            ));
        }
    }
    tracing::info!(queue_id = %job.id, peer = %domain, rcpts = covered.len(), "receipt verified and stored");
}

/// Opportunistic peers: the key the callee presents (already verified) must be the one
/// pinned on first use. We placed the call, so a first use may pin, but only when the
/// address we called is one that could vouch for it: the peer's configured address, or
/// one DNSSEC-secure answers gave (`CallTarget::authentic`). A relay found by insecure
/// SRV is whoever forged the answer, as far as we know. A different key, and a first key
/// from such an address, are refused (and kept as pending, for `sipmail trust accept`).
fn check_pin(
    shared: &Context,
    peer: &Peer,
    fingerprint: &[u8],
    target: &CallTarget,
) -> Result<(), CallError> {
    let presented = hex::encode_upper(fingerprint);
    let pin = shared.trust.store.check_pin(&peer.domain, &presented)?;
    match super::trust::opportunistic_decision(pin, target.authentic, false) {
        OpportunisticDecision::Proceed => Ok(()),
        OpportunisticDecision::Hold(HoldReason::FirstUseFromElsewhere) => {
            Err(CallError::FirstUseUnlocated {
                domain: peer.domain.clone(),
                target: target.label.clone(),
                presented,
            })
        }
        OpportunisticDecision::Hold(HoldReason::Changed { pinned }) => Err(CallError::PinChanged {
            domain: peer.domain.clone(),
            pinned,
            presented,
        }),
    }
}

/// A failed call is hung up without holding up the mail queue behind it.
fn bye_in_background(shared: &Arc<Context>, d: &Dialog, reason: &str) {
    dialog::hang_up_in_background(&shared.sip.endpoint, d, Some(reason));
}

async fn hang_up(shared: &Context, peer: &str, mut call: ActiveCall) {
    let span = call.span.clone();
    async {
        // A last look for delivered receipts before the call ends, bounded: a hang-up
        // (also at shutdown) does not wait on a partner that stopped answering.
        if call.receipts && call.client.extensions().receipts {
            let fetch = super::delivered::fetch(shared, peer, &mut call.client);
            let _ = tokio::time::timeout(HANG_UP_FETCH, fetch).await;
        }
        let _ = call.client.quit().await;
        dialog::hang_up(&shared.sip.endpoint, &call.dialog, None).await;
    }
    .instrument(span)
    .await;
    tracing::info!(call_id = %call.dialog.call_id, %peer, "call ended");
    shared.event(RelayEvent::CallEnded {
        call_id: call.dialog.call_id.clone(),
        peer: peer.to_string(),
    });
}

/// How long a lane waits without work after a message that asked for receipts before it
/// fetches the partner's delivered receipts through the call (the partner hands a message
/// on within milliseconds of taking it, when its mailbox or MTA is up).
const FETCH_AFTER: Duration = Duration::from_millis(200);

/// How long the fetch of delivered receipts before a hang-up may take.
const HANG_UP_FETCH: Duration = Duration::from_secs(5);

/// Fetches delivered receipts through the call, if it can carry them; a call whose stream
/// failed is hung up and dropped. False when another call to the partner was fetching
/// (this one fetched nothing; try again later if what we sent may not be covered).
async fn fetch_delivered(
    ctx: &Arc<Context>,
    domain: &str,
    call: &mut Option<(ActiveCall, u64)>,
) -> bool {
    let Some((active, _)) = call.as_mut() else {
        return true;
    };
    if !(active.receipts && active.client.extensions().receipts) {
        return true;
    }
    let span = active.span.clone();
    let r = super::delivered::fetch(ctx, domain, &mut active.client)
        .instrument(span)
        .await;
    match r {
        Ok(done) => done.is_some(),
        Err(e) => {
            if let Some((c, _)) = call.take() {
                tracing::warn!(call_id = %c.dialog.call_id, peer = %domain, error = %e,
                    "fetching delivered receipts failed; hanging up");
                bye_in_background(ctx, &c.dialog, "stream failed");
            }
            true
        }
    }
}

/// The relay a pin sends this attempt to, while the pin is in force. Once it is over
/// (`queue.resend_hold`), the message goes to the peer's relays as any other, which is
/// where it may arrive twice: logged, with its queue ID.
fn pin_in_force<'a>(pin: &'a crate::queue::RelayPin, id: &str, domain: &str) -> Option<&'a str> {
    if pin.until_ms > crate::queue::now_ms() {
        return Some(&pin.relay);
    }
    tracing::warn!(queue_id = %id, peer = %domain, relay = %pin.relay,
        "the relay that may hold this message did not take it again within queue.resend_hold; it goes to the peer's other relays and may arrive twice");
    None
}

/// One lane of calls to the peer `domain`: it places a call when a job comes, sends that
/// job and the following ones through it, and hangs up after `sip.call_idle` without work.
/// The peer's settings are looked up at each call placed, so a reload applies to the next
/// call; an idle call placed before a reload is hung up before the next message.
pub(crate) async fn worker(ctx: Arc<Context>, domain: String, lane_no: usize, lane: Lane) {
    // The call in progress and the settings generation it was placed under.
    let mut call: Option<(ActiveCall, u64)> = None;
    // A message asking for receipts went through this call since the last fetch of
    // delivered receipts (fetched once the lane has been idle a moment).
    let mut want_fetch = false;
    loop {
        let call_idle = ctx.settings().call_idle;
        let job = tokio::select! {
            j = lane.next() => j,
            _ = tokio::time::sleep(FETCH_AFTER), if want_fetch && call.is_some() => {
                // Another call fetching may have started before the partner signed the
                // receipts of what this one sent: look again after another pause.
                want_fetch = !fetch_delivered(&ctx, &domain, &mut call).await;
                continue;
            }
            _ = tokio::time::sleep(call_idle), if call.is_some() => {
                if let Some((c, _)) = call.take() {
                    hang_up(&ctx, &domain, c).await;
                }
                continue;
            }
            _ = ctx.shutdown.wait() => None,
        };
        let Some(job) = job else { break };
        let settings = ctx.settings();
        if let Some((c, generation)) = call.take() {
            if generation == settings.generation {
                call = Some((c, generation));
            } else {
                tracing::info!(call_id = %c.dialog.call_id, peer = %domain,
                    "config or keyring reloaded since this call was placed; hanging up before the next message");
                hang_up(&ctx, &domain, c).await;
            }
        }
        // A message another relay of the peer may already hold goes to that relay: a call
        // to it is placed when the lane's call reaches another one (kept if that fails).
        let pin = job
            .pin
            .as_ref()
            .and_then(|p| pin_in_force(p, &job.id, &domain));
        let to_pin = pin.filter(|r| call.as_ref().is_some_and(|(c, _)| c.relay != *r));
        if call.is_none() || to_pin.is_some() {
            let Some(peer) = settings.site.partner(&domain) else {
                tracing::warn!(peer = %domain, lane = lane_no, queue_id = %job.id,
                    "no [[peer]] for this domain in the config in force (removed by a reload?); the mail stays queued, is retried on the queue's schedule and bounced after queue.max_age unless the peer is added again");
                let outcomes = job.all(RcptOutcome::Transient(format!(
                    "no [[peer]] for {domain} in the relay's config"
                )));
                lane.report(job, outcomes).await;
                continue;
            };
            // Shutdown does not wait for a call attempt (an unanswered INVITE takes 32 s):
            // the job stays in the spool for the next start.
            let call_id = format!("{}@{}", crate::sip::random_hex(16), settings.site.domain);
            let span =
                tracing::info_span!("call", %call_id, peer = %domain, direction = "outgoing");
            let placed = tokio::select! {
                r = place_call_in_turn(&ctx, &peer, &call_id, pin).instrument(span) => r,
                _ = ctx.shutdown.wait() => break,
            };
            match placed {
                Err(e) if to_pin.is_some() => {
                    tracing::warn!(peer = %domain, relay = pin, queue_id = %job.id, reason = %e,
                        "call to the relay that may hold this message failed; it stays queued for that relay");
                    let outcomes = job.all(RcptOutcome::Transient(format!(
                        "call to {domain} at {}, which may hold this message, failed: {e}",
                        pin.unwrap_or_default()
                    )));
                    lane.report(job, outcomes).await;
                    continue;
                }
                Ok(c) => {
                    if let Some((old, _)) = call.take() {
                        hang_up(&ctx, &domain, old).await;
                    }
                    call = Some((c, settings.generation));
                    // What the partner delivered since our last call is fetched once the
                    // lane is idle, not before this message: a round trip on its path.
                    want_fetch = true;
                }
                Err(e) => {
                    // No INVITE went out when the set-up just before failed.
                    let call_id = (!matches!(e, CallError::PeerJustFailed(..))).then_some(call_id);
                    tracing::warn!(peer = %domain, call_id = call_id.as_deref(), lane = lane_no,
                        queue_id = %job.id, reason = %e, "call failed; mail stays queued");
                    if let Some(f) = e.failure() {
                        ctx.metrics.call_failed(&domain, Direction::Outgoing, f);
                    }
                    ctx.event(RelayEvent::CallFailed {
                        peer: domain.clone(),
                        reason: e.to_string(),
                    });
                    let reason = format!("call to {domain} failed: {e}");
                    let outcomes = job.all(match e.retry_after() {
                        Some(secs) => RcptOutcome::TransientAfter { reason, secs },
                        None => RcptOutcome::Transient(reason),
                    });
                    lane.report_call(job, outcomes, call_id).await;
                    continue;
                }
            }
        }
        let Some((active, _)) = call.as_mut() else {
            continue;
        };
        // The `.sending` marker exists before the first byte goes out. A marker for a body
        // that cannot be opened is cleared by the report, as after any failed attempt.
        ctx.spool
            .begin_send(&job.id, &job.route, Some(&active.relay));
        let body = crate::queue::bodyio::BodyReader::open(&ctx.spool.body_path(&job.id));
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(queue_id = %job.id, error = %e, "cannot open the queued message");
                let outcomes = job.all(RcptOutcome::Transient(format!(
                    "cannot open the queued message: {e}"
                )));
                lane.report(job, outcomes).await;
                continue;
            }
        };
        let span = active.span.clone();
        let sending = tokio::time::Instant::now();
        // Ask for a receipt only where one can be verified; hash what we send, to check it.
        let ask = active.receipts && active.client.extensions().receipts;
        let mut opts = job.opts.clone();
        if !ask {
            opts.xqid = None;
        }
        // The hash to check the receipt against: kept since the message was spooled, or
        // else taken of the bytes as they go on the wire.
        let hash_wire = ask && job.decoded.is_none();
        let mut wire = super::receipts::WireHash::new();
        let res = active
            .client
            .send_tx_observed(
                &job.mail_from,
                &job.recipients,
                &job.rcpt_params,
                &opts,
                body,
                hash_wire.then_some(&mut wire as crate::smtp::client::Observer<'_>),
            )
            .instrument(span.clone())
            .await;
        ctx.metrics.transferred(Some(&domain), sending.elapsed());
        let broken = res.is_err();
        let what = format!("peer {domain}");
        let sent_ok = res.as_ref().ok().cloned();
        let mut outcomes = span.in_scope(|| match res {
            Err(e) if ask && e.is_unconfirmed() => {
                tracing::warn!(queue_id = %job.id, route = %job.route, relay = %active.relay, error = %e,
                    "no reply after the end of the message: it is sent again to the same relay, which recognises the resend (our queue ID and its hash) and returns its receipt; the peer's other relays get it only after queue.resend_hold");
                job.all(RcptOutcome::Unconfirmed {
                    reason: format!("{what}: {e}"),
                    relay: active.relay.clone(),
                })
            }
            res => outcomes_from_smtp(&job, res, &what),
        });
        if ask && let Some(o) = &sent_ok {
            let digest = match &job.decoded {
                Some(d) => Ok((d.sha256.clone(), d.size)),
                None => wire.digest().await,
            };
            match digest {
                Ok((sha256, size)) => {
                    receipts_for(&ctx, &domain, active, &job, o, &sha256, size, &mut outcomes)
                        .instrument(span.clone())
                        .await
                }
                // Without the hash, no receipt can be checked: the message is not counted
                // as delivered, and its resend is recognised by the partner (queue ID and
                // its own hash), which returns the receipt then.
                Err(e) => {
                    span.in_scope(|| {
                        tracing::error!(queue_id = %job.id, error = %e,
                        "cannot hash the sent message to check its receipt; it stays queued")
                    });
                    not_delivered(&mut outcomes, format!("cannot check the receipt: {e}"));
                }
            }
        }
        want_fetch |= ask;
        let call_id = Some(active.dialog.call_id.clone());
        lane.report_call(job, outcomes, call_id).await;
        if broken && let Some((c, _)) = call.take() {
            tracing::warn!(call_id = %c.dialog.call_id, peer = %domain, "call's stream failed; hanging up");
            bye_in_background(&ctx, &c.dialog, "stream failed");
        }
    }
    if let Some((c, _)) = call.take() {
        hang_up(&ctx, &domain, c).await;
    }
}

/// A `Retry-After` value's seconds (RFC 3261 section 20.33: delta-seconds, then an optional
/// comment and parameters, as in `120 (busy);duration=60`). Anything else: None.
fn retry_after_secs(v: &str) -> Option<u32> {
    let v = v.trim_start();
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    v[..digits].parse().ok()
}

#[cfg(test)]
mod retry_after_tests {
    use super::retry_after_secs;

    #[test]
    fn retry_after_takes_the_delta_seconds_and_nothing_else() {
        assert_eq!(retry_after_secs("5"), Some(5));
        assert_eq!(
            retry_after_secs(" 120 (in a meeting);duration=60"),
            Some(120)
        );
        assert_eq!(retry_after_secs("18000;duration=3600"), Some(18000));
        assert_eq!(retry_after_secs(""), None);
        assert_eq!(retry_after_secs("soon"), None);
        assert_eq!(retry_after_secs("-5"), None);
        assert_eq!(retry_after_secs("99999999999"), None);
    }
}
