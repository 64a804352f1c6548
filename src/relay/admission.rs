//! Call admission: whether an incoming INVITE may become a call, and if not, the exact SIP
//! status, reason phrase and Warning text the callee answers. Pure: no I/O, no clock, no
//! async; the callee's driver gathers the facts, asks here, and sends the one response.
//!
//! Two steps, because the continuity facts exist only once our half of the handshake is
//! computed: [`admit`] runs before the handshake (headers, offer, peer, trust policy,
//! keyring, pin), [`answer_refusal`] and [`continuity_refusal`] after it, before any 200 OK.
//! The crypto (signing, verifying the confirm) stays in the handshake layer. The table of
//! refusals is in docs/ARCHITECTURE.md, "Call admission".

use super::trust::{self, ContinuityDecision, HoldReason, OpportunisticDecision, PinCheck};
use crate::config::{ContinuityPolicy, Peer};
use crate::handshake::sdp;
use crate::handshake::{AuthMode, Continuity, HandshakeError, Offer};
use crate::metrics::CallFailure;
use crate::sip::{NameAddr, Request};
use std::net::IpAddr;

/// A refused call: the one response the callee sends, and what our log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    /// The text of the `Warning: 399 sipmail "..."` header.
    pub warning: String,
    /// `415` only: the `Accept` header value that says what we take.
    pub accept: Option<&'static str>,
    /// Why, for our log (may name more than the caller is told).
    pub log: String,
    /// Why, for the metrics (`sipmail_calls_failed_total{reason}`).
    pub failure: CallFailure,
}

impl Refusal {
    /// The failure class follows the status (a malformed request, a policy, ours);
    /// [`Refusal::because`] names a more precise one.
    fn new(status: u16, reason: &'static str, warning: impl Into<String>, log: String) -> Self {
        let failure = match status {
            400 | 415 | 482 | 488 => CallFailure::Malformed,
            500..=599 => CallFailure::Internal,
            _ => CallFailure::Policy,
        };
        Refusal {
            status,
            reason,
            warning: warning.into(),
            accept: None,
            log,
            failure,
        }
    }

    fn because(mut self, failure: CallFailure) -> Self {
        self.failure = failure;
        self
    }

    /// A failure on our side (no media port, no randomness): `500`, the caller is told
    /// only `warning`.
    pub fn internal(warning: &'static str, log: String) -> Self {
        Refusal::new(500, "Server Internal Error", warning, log)
    }

    /// Every port of `sip.media_ports` is taken: `503`, the caller may try again later
    /// (or another relay of ours).
    pub fn no_media_port(log: String) -> Self {
        Refusal::new(
            503,
            "Service Unavailable",
            "no free media port in sip.media_ports",
            log,
        )
    }

    /// The INVITE's Record-Route or Contact cannot route our requests in the dialog.
    pub fn bad_route(log: String) -> Self {
        Refusal::new(400, "Bad Request", log.clone(), log)
    }

    /// `trust = "dnssec"`: the caller's key could not be found or trusted in DNS (`log`
    /// says why; the caller is told only that).
    pub fn dns_key(log: String, key_changed: bool) -> Self {
        Refusal::new(
            403,
            "Forbidden",
            "this relay cannot trust a key from DNS for you now",
            log,
        )
        .because(if key_changed {
            CallFailure::KeyChanged
        } else {
            CallFailure::Dns
        })
    }

    /// Another call already uses this Call-ID.
    pub fn call_id_in_use() -> Self {
        Refusal::new(
            482,
            "Loop Detected",
            "Call-ID already in use",
            "duplicate Call-ID".into(),
        )
    }
}

/// What the INVITE says, as the SIP layer parsed it.
#[derive(Debug, Clone)]
pub(crate) struct InviteFacts<'a> {
    pub from: Result<NameAddr, String>,
    pub to: Result<NameAddr, String>,
    /// Lower case; empty when absent.
    pub content_type: String,
    pub body: &'a [u8],
    /// Where the INVITE came from.
    pub source: IpAddr,
}

impl<'a> InviteFacts<'a> {
    pub fn of(req: &'a Request, source: IpAddr) -> Self {
        InviteFacts {
            from: req.headers.from().map_err(|e| e.to_string()),
            to: req.headers.to().map_err(|e| e.to_string()),
            content_type: req
                .headers
                .get("Content-Type")
                .unwrap_or("")
                .to_ascii_lowercase(),
            body: &req.body,
            source,
        }
    }
}

/// Who we are: our domain and our configured peers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Local<'a> {
    pub domain: &'a str,
    pub peers: &'a [Peer],
}

impl Local<'_> {
    fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }
}

/// What admission reads from the keyring snapshot and the trust state. The driver answers
/// from one keyring snapshot for the whole call; tests answer from a table.
pub(crate) trait TrustView {
    /// `signed` peers: is `fingerprint` a usable cert bound to `domain`? Err says why not.
    fn signed_key(&self, domain: &str, fingerprint: &str) -> Result<(), String>;
    /// `opportunistic` peers: the presented (announced) key against the pin.
    fn pin(&self, domain: &str, fingerprint: &str) -> Result<PinCheck, String>;
    /// Is `ip` one of `domain`'s configured addresses?
    fn is_peer_address(&self, domain: &str, ip: IpAddr) -> bool;
}

/// An INVITE that may go on to the handshake.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    /// The configured peer the call is from (its domain as the From URI spells it, lower
    /// case, is `domain`).
    pub peer: Peer,
    pub domain: String,
    pub from_tag: String,
    pub offer: Offer,
    /// The fingerprint the offer announces, upper-case hex.
    pub fingerprint: String,
    /// Opportunistic: why the call is refused once its key has proved itself (the
    /// handshake goes on only to verify the key's signature, then the key is recorded as
    /// pending). `None`: go on.
    pub hold: Option<HoldReason>,
}

/// The domain the caller claims (From `mail@domain`), lower case, if it parses.
pub(crate) fn caller_domain(inv: &InviteFacts<'_>) -> Option<String> {
    let from = inv.from.as_ref().ok()?;
    uri_identity(&from.uri).map(|(_, host)| host)
}

/// `(user, host)` of a SIP URI such as `sip:mail@site-a.test:5060;transport=tcp`, lower case.
fn uri_identity(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("sip:")?;
    let rest = rest.split([';', '?', '>']).next()?;
    let (user, host) = rest.split_once('@')?;
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    Some((user.to_ascii_lowercase(), host.to_ascii_lowercase()))
}

/// The checks before the handshake, in the order the callee has always made them: the
/// headers and the offer first (so any SIP phone or tester learns what is missing), then
/// who is called, who calls, the trust policy, and the key.
pub(crate) fn admit(
    inv: &InviteFacts<'_>,
    local: Local<'_>,
    view: &dyn TrustView,
) -> Result<Admitted, Refusal> {
    let (from, to) = match (&inv.from, &inv.to) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => {
            return Err(Refusal::new(
                400,
                "Bad Request",
                e.clone(),
                format!("bad From/To: {e}"),
            ));
        }
    };
    let Some(from_tag) = from.tag().map(str::to_string) else {
        return Err(Refusal::new(
            400,
            "Bad Request",
            "From has no tag",
            "From has no tag".into(),
        ));
    };
    if inv.body.is_empty() {
        return Err(Refusal::new(
            488,
            "Not Acceptable Here",
            "no offer: sipmail needs an application/sdp offer with its key exchange",
            "INVITE without an offer".into(),
        ));
    }
    if !inv.content_type.starts_with("application/sdp") {
        let mut r = Refusal::new(
            415,
            "Unsupported Media Type",
            "sipmail needs an application/sdp offer",
            format!("body type {:?}", inv.content_type),
        );
        r.accept = Some("application/sdp");
        return Err(r);
    }
    // A wrong protocol version (v2) is refused here too, by the offer's decoder.
    let offer = sdp::decode_offer(inv.body).map_err(|e| {
        Refusal::new(
            488,
            "Not Acceptable Here",
            format!("not a sipmail offer: {e}"),
            format!("offer: {e}"),
        )
    })?;
    match uri_identity(&to.uri) {
        Some((user, host)) if user == "mail" && host == local.domain => {}
        _ => {
            return Err(Refusal::new(
                404,
                "Not Found",
                "this relay only answers mail@its domain",
                format!("call for {} is not for us", to.uri),
            ));
        }
    }
    let (domain, peer) = match uri_identity(&from.uri) {
        Some((user, host)) if user == "mail" => match local.peer(&host) {
            Some(p) => (host, p.clone()),
            None => return Err(not_a_partner(from)),
        },
        _ => return Err(not_a_partner(from)),
    };
    // The offer must use the trust policy we require of this peer: no downgrade.
    let mode = peer.trust.mode();
    if offer.auth != mode {
        let warning = format!(
            "trust policy mismatch: the offer uses {}, this relay requires {mode} for {domain}",
            offer.auth
        );
        return Err(
            Refusal::new(488, "Not Acceptable Here", warning.clone(), warning)
                .because(CallFailure::Policy),
        );
    }
    let fingerprint = hex::encode_upper(&offer.fingerprint);
    let mut hold = None;
    match mode {
        // The caller's key must be in our keyring, bound to that domain.
        AuthMode::Signed => {
            if let Err(e) = view.signed_key(&domain, &fingerprint) {
                return Err(Refusal::new(
                    403,
                    "Forbidden",
                    "unknown or unusable key for this peer",
                    format!("peer {domain} key {fingerprint}: {e}"),
                )
                .because(CallFailure::UnknownKey));
            }
        }
        // The key it presents must be the one it announces, and the one pinned on first
        // use. Nothing is written to the trust state here: an INVITE proves nothing.
        AuthMode::Opportunistic => {
            let presented = crate::keyring::key_packet_fingerprint(&offer.key_packet);
            if presented.as_deref().ok() != Some(fingerprint.as_str()) {
                let why = match presented {
                    Ok(f) => format!("the presented key is {f}, not the announced fingerprint"),
                    Err(e) => e.to_string(),
                };
                return Err(Refusal::new(
                    403,
                    "Forbidden",
                    "an opportunistic peer must present the key it announces (a=sipmail-pubkey)",
                    format!("peer {domain} key {fingerprint}: {why}"),
                )
                .because(CallFailure::UnknownKey));
            }
            let pin = view.pin(&domain, &fingerprint).map_err(|e| {
                Refusal::internal("trust state", format!("trust state for {domain}: {e}"))
            })?;
            let from_peer = view.is_peer_address(&domain, inv.source);
            if let OpportunisticDecision::Hold(r) =
                trust::opportunistic_decision(pin, false, from_peer)
            {
                hold = Some(r);
            }
        }
        // The PSK is mixed into the keys and checked on the confirm: nothing to look up.
        AuthMode::Psk => {}
    }
    Ok(Admitted {
        peer,
        domain,
        from_tag,
        offer,
        fingerprint,
        hold,
    })
}

fn not_a_partner(from: &NameAddr) -> Refusal {
    Refusal::new(
        403,
        "Forbidden",
        "not a partner of this relay",
        format!("caller {} is not a configured peer", from.uri),
    )
}

/// Our half of the handshake failed: an offer we cannot answer is `488` with the reason;
/// anything else (signing) is ours, `500`.
pub(crate) fn answer_refusal(e: &HandshakeError) -> Refusal {
    match e {
        HandshakeError::NoCommonSuite { .. }
        | HandshakeError::EmptySuiteList
        | HandshakeError::AuthMismatch { .. }
        | HandshakeError::TooManyRetainedIds => {
            Refusal::new(488, "Not Acceptable Here", e.to_string(), e.to_string())
                .because(CallFailure::Policy)
        }
        _ => Refusal::new(
            500,
            "Server Internal Error",
            "signing failed",
            e.to_string(),
        ),
    }
}

/// The metrics' class of a handshake failure (on either side of a call).
pub(crate) fn handshake_failure(e: &HandshakeError) -> CallFailure {
    match e {
        HandshakeError::BadSignature(_) => CallFailure::Signature,
        HandshakeError::CommitmentMismatch => CallFailure::Commitment,
        HandshakeError::NoCommonSuite { .. }
        | HandshakeError::SuiteNotOffered(_)
        | HandshakeError::EmptySuiteList
        | HandshakeError::AuthMismatch { .. }
        | HandshakeError::TooManyRetainedIds => CallFailure::Policy,
        HandshakeError::NonContributory | HandshakeError::FieldTooLong { .. } => {
            CallFailure::Malformed
        }
        HandshakeError::SignFailed(_) | HandshakeError::NoPsk => CallFailure::Internal,
    }
}

/// Key continuity, known before we answer: refused (`403`) only under
/// `continuity = "require"`. The rule itself is [`trust::continuity_decision`].
pub(crate) fn continuity_refusal(
    domain: &str,
    continuity: Continuity,
    policy: ContinuityPolicy,
) -> Option<Refusal> {
    (trust::continuity_decision(continuity, policy) == ContinuityDecision::Refuse).then(|| {
        let warning = format!(
            "key continuity with mail@{domain} is broken ({continuity}); refused by policy"
        );
        Refusal::new(403, "Forbidden", warning.clone(), warning).because(CallFailure::Continuity)
    })
}

/// What the caller of a held opportunistic call is told (in a `554` greeting through the
/// call, after its key proved itself), and what our log says.
pub(crate) fn held_message(domain: &str, fpr: &str, why: &HoldReason) -> String {
    match why {
        HoldReason::Changed { .. } => format!(
            "the key of mail@{domain} changed since first use; refused until the operator runs `sipmail trust accept {domain} {fpr}`"
        ),
        HoldReason::FirstUseFromElsewhere => format!(
            "first call from mail@{domain}, from an address that is not its configured one: its key is not pinned; refused until the operator runs `sipmail trust accept {domain} {fpr}`"
        ),
    }
}

#[cfg(test)]
mod tests;
