//! The sipmail key agreement, as pure functions and state: no sockets, no clock, no
//! randomness of its own (the caller passes the ephemeral secret and the nonce in).
//!
//! ```text
//! caller A                                    callee B
//! Offer   { suites, fpr_A, nonce, C = H(eA) }  ->
//!                                          <- Answer { suite, eB, fpr_B, Sig_B(T1) }
//! Confirm { eA, Sig_A(T2) }                ->
//! ss = X25519(eA, eB); PRK = HKDF-Extract(salt = SHA-256(T2) [keyed by the PSK], ss || rs)
//! ```
//! The offer names how both sides authenticate (OpenPGP signatures, a PSK HMAC, or
//! opportunistic signatures by a key pinned on first use), and both halves carry short IDs
//! of the retained secrets (`rs`, ZRTP style) left by earlier calls. The handshake takes the
//! PSK and the retained secrets as inputs and returns the next retained secret; storing it
//! is the relay's job.
//! The exact encodings are in docs/PROTOCOL.md, and the tests check its vectors.

pub mod sdp;
mod transcript;
mod x25519;

pub use transcript::{Tag, Transcript};
pub use x25519::x25519;

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use std::fmt;
use std::net::SocketAddr;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Protocol label and version. Changing the wire format means a new label.
/// (The fixed KDF and context labels below keep their `sipmail/1` names: they are names,
/// and the version is bound by this label, which every signature, MAC and key covers.)
pub const PROTOCOL_LABEL: &[u8] = b"sipmail/3";
/// Prefix of the data the callee signs (answer) and the caller signs (confirm). Distinct
/// prefixes mean no signature made in one role can be replayed in the other.
pub const ANSWER_SIG_CONTEXT: &[u8] = b"sipmail/1 answer signature\0";
pub const CONFIRM_SIG_CONTEXT: &[u8] = b"sipmail/1 confirm signature\0";
const COMMIT_CONTEXT: &[u8] = b"sipmail/1 commitment\0";
const RS_ID_CALLER: &[u8] = b"sipmail/1 rs caller";
const RS_ID_CALLEE: &[u8] = b"sipmail/1 rs callee";
/// Length of a retained-secret ID on the wire.
pub const RS_ID_LEN: usize = 8;
/// How many retained secrets each side keeps per peer (newest first) and announces. More
/// than one, so that calls that overlap or fail half way do not desynchronise the caches.
pub const MAX_RETAINED: usize = 4;

/// How the two relays authenticate the transcript. It is part of the transcript, and each
/// callee refuses an offer whose mode differs from the one configured for that peer, so a
/// man in the middle cannot downgrade a call.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Default)]
pub enum AuthMode {
    /// OpenPGP signatures by certs held in the keyring.
    #[default]
    Signed,
    /// HMAC-SHA256 keyed by a pre-shared key (MIKEY DH-HMAC, RFC 4650).
    Psk,
    /// OpenPGP signatures by a key that each side presents and the other pins on first use.
    Opportunistic,
}

impl AuthMode {
    pub const ALL: &'static [AuthMode] =
        &[AuthMode::Signed, AuthMode::Psk, AuthMode::Opportunistic];
    pub fn id(self) -> u8 {
        match self {
            AuthMode::Signed => 1,
            AuthMode::Psk => 2,
            AuthMode::Opportunistic => 3,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Signed => "signed",
            AuthMode::Psk => "psk",
            AuthMode::Opportunistic => "opportunistic",
        }
    }
    pub fn from_name(s: &str) -> Option<AuthMode> {
        AuthMode::ALL
            .iter()
            .copied()
            .find(|x| x.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A secret left by an earlier call with the same peer (ZRTP's rs1/rs2, RFC 6189 §4.6.1).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct RetainedSecret([u8; 32]);

impl RetainedSecret {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        RetainedSecret(b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// `HMAC-SHA256(rs, "sipmail/1 rs caller" | "sipmail/1 rs callee")`, first 8 bytes: tells
    /// the peer which secret we hold without revealing it; the role labels keep a caller's
    /// ID from being reflected as a callee's.
    pub fn id(&self, caller: bool) -> [u8; RS_ID_LEN] {
        let label = if caller { RS_ID_CALLER } else { RS_ID_CALLEE };
        let mut m = <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes any key length");
        hmac::Mac::update(&mut m, label);
        let full = hmac::Mac::finalize(m).into_bytes();
        let mut id = [0u8; RS_ID_LEN];
        id.copy_from_slice(&full[..RS_ID_LEN]);
        id
    }
}

impl fmt::Debug for RetainedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetainedSecret(<redacted>)")
    }
}

/// What the retained-secret IDs told us about this peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Continuity {
    /// Both sides held the same secret from an earlier call; it is mixed into the keys.
    Matched,
    /// We hold no secret for this peer: a first call, or our cache was lost or reset.
    /// `peer_has` says whether the peer announced one (it remembers a call we do not).
    NoneHeld { peer_has: bool },
    /// We hold secrets but the peer announced none: it lost its cache, or a man in the
    /// middle who never saw our earlier calls is answering for it.
    PeerHasNone,
    /// Both announced secrets and none is in common: a man in the middle on this call or on
    /// an earlier one, or both caches out of date.
    Mismatch,
}

impl Continuity {
    /// A problem the operator should hear about (and `continuity = "require"` refuses).
    pub fn is_problem(self) -> bool {
        matches!(self, Continuity::PeerHasNone | Continuity::Mismatch)
    }
    pub fn name(self) -> &'static str {
        match self {
            Continuity::Matched => "matched",
            Continuity::NoneHeld { peer_has: false } => "first-call",
            Continuity::NoneHeld { peer_has: true } => "lost-local-cache",
            Continuity::PeerHasNone => "peer-has-none",
            Continuity::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for Continuity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pick the retained secret both sides hold: the first, in the caller's order (newest
/// first), of the caller's secrets that the callee also holds. `mine` are our secrets and
/// `theirs` the IDs the peer announced; `we_are_caller` tells which labels apply.
fn match_retained(
    mine: &[RetainedSecret],
    theirs: &[[u8; RS_ID_LEN]],
    we_are_caller: bool,
) -> (Option<RetainedSecret>, Continuity) {
    if mine.is_empty() {
        return (
            None,
            Continuity::NoneHeld {
                peer_has: !theirs.is_empty(),
            },
        );
    }
    if theirs.is_empty() {
        return (None, Continuity::PeerHasNone);
    }
    let found = if we_are_caller {
        // Our own order is the caller's order.
        mine.iter().find(|s| theirs.contains(&s.id(false))).cloned()
    } else {
        theirs
            .iter()
            .find_map(|id| mine.iter().find(|s| s.id(true) == *id))
            .cloned()
    };
    match found {
        Some(s) => (Some(s), Continuity::Matched),
        None => (None, Continuity::Mismatch),
    }
}

/// Cipher suites for the media stream. The numeric id is what the transcript carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Suite {
    ChaCha20Poly1305,
    Aes256Gcm,
}

impl Suite {
    /// Every suite we implement, in our order of preference: ChaCha20-Poly1305 is
    /// constant-time in software everywhere; AES-256-GCM is for sites that want AES.
    pub const ALL: &'static [Suite] = &[Suite::ChaCha20Poly1305, Suite::Aes256Gcm];

    pub fn id(self) -> u8 {
        match self {
            Suite::ChaCha20Poly1305 => 1,
            Suite::Aes256Gcm => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Suite::ChaCha20Poly1305 => "chacha20-poly1305",
            Suite::Aes256Gcm => "aes-256-gcm",
        }
    }
    pub fn from_name(s: &str) -> Option<Suite> {
        Suite::ALL
            .iter()
            .copied()
            .find(|x| x.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who is who in the SIP dialog. Everything here is covered by the signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallContext {
    pub call_id: String,
    pub from_tag: String,
    /// Empty until the callee has chosen its tag; the callee fills it in before signing.
    pub to_tag: String,
    /// `mail@caller-domain`
    pub caller: String,
    /// `mail@callee-domain`
    pub callee: String,
}

/// Carried in the INVITE's SDP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub suites: Vec<Suite>,
    /// The caller's OpenPGP primary key fingerprint, raw bytes.
    pub fingerprint: Vec<u8>,
    pub nonce: [u8; 32],
    pub commitment: [u8; 32],
    /// How this call is authenticated.
    pub auth: AuthMode,
    /// IDs of the caller's retained secrets for this callee, newest first.
    pub rs_ids: Vec<[u8; RS_ID_LEN]>,
    /// Opportunistic mode only: the caller's signing key (an OpenPGP public key packet).
    /// Not in the transcript: `fingerprint`, which is, is that packet's fingerprint.
    pub key_packet: Vec<u8>,
}

/// Carried in the 200 OK's SDP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Where the callee's media listener is (the SDP's `c=` address and `m=` port). In T1,
    /// so the callee's signature covers where the caller connects.
    pub media: SocketAddr,
    pub suite: Suite,
    pub fingerprint: Vec<u8>,
    pub public: [u8; 32],
    pub signature: Vec<u8>,
    /// IDs of the callee's retained secrets for this caller, newest first.
    pub rs_ids: Vec<[u8; RS_ID_LEN]>,
    /// Opportunistic mode only: the callee's signing key packet (see [`Offer::key_packet`]).
    pub key_packet: Vec<u8>,
}

/// Carried in the ACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    pub public: [u8; 32],
    pub signature: Vec<u8>,
}

/// What failed, grouped so the SIP layer can map it to a status code and the relay can
/// log it. None of these is permanent for the mail: it stays queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("no cipher suite in common (offered: {offered})")]
    NoCommonSuite { offered: String },
    #[error("the answer chose suite {0}, which was not offered")]
    SuiteNotOffered(Suite),
    #[error("the offer lists no cipher suite")]
    EmptySuiteList,
    #[error("the caller's ephemeral key does not match its commitment")]
    CommitmentMismatch,
    #[error("the peer's signature does not verify: {0}")]
    BadSignature(String),
    #[error("signing the transcript failed: {0}")]
    SignFailed(String),
    #[error("the Diffie-Hellman result is all zero (low-order public key)")]
    NonContributory,
    #[error("field {field} is too long for the transcript ({len} bytes)")]
    FieldTooLong { field: &'static str, len: usize },
    #[error("the offer uses trust policy {offered}, but this peer requires {required}")]
    AuthMismatch {
        offered: AuthMode,
        required: AuthMode,
    },
    #[error("more than {MAX_RETAINED} retained-secret IDs")]
    TooManyRetainedIds,
    #[error("trust policy psk, but no pre-shared key to mix into the key schedule")]
    NoPsk,
}

/// Authenticates the transcript with a pre-shared key: `HMAC-SHA256(psk, context || T)`,
/// the same data and the same role contexts that the OpenPGP signatures cover (MIKEY
/// DH-HMAC, RFC 4650). The key is zeroized on drop and never printed.
#[derive(Clone)]
pub struct PskAuth(zeroize::Zeroizing<Vec<u8>>);

impl PskAuth {
    pub fn new(key: &[u8]) -> Self {
        PskAuth(zeroize::Zeroizing::new(key.to_vec()))
    }
    /// The key, for the key schedule (see [`Signer::psk`]).
    fn key(&self) -> &[u8] {
        &self.0
    }
    fn mac(&self) -> hmac::Hmac<Sha256> {
        <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes any key length")
    }
}

impl fmt::Debug for PskAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PskAuth(<redacted>)")
    }
}

impl Signer for PskAuth {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut m = self.mac();
        hmac::Mac::update(&mut m, data);
        Ok(hmac::Mac::finalize(m).into_bytes().to_vec())
    }
    fn psk(&self) -> Option<&[u8]> {
        Some(self.key())
    }
}

impl Verifier for PskAuth {
    fn verify(&self, _fingerprint: &[u8], data: &[u8], mac: &[u8]) -> Result<(), String> {
        let mut m = self.mac();
        hmac::Mac::update(&mut m, data);
        // Constant-time comparison.
        hmac::Mac::verify_slice(m, mac)
            .map_err(|_| "the PSK MAC does not verify (a different pre-shared key?)".to_string())
    }
}

/// Signs transcript data with our identity (OpenPGP key, or a PSK HMAC).
pub trait Signer {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String>;
    /// The pre-shared key, if this signer is one: with trust policy psk it also enters the
    /// key schedule, so the handshake takes it from the same object that makes the MACs
    /// (one key, no way to pass a different one to each).
    fn psk(&self) -> Option<&[u8]> {
        None
    }
}
/// Verifies the peer's signature over transcript data.
pub trait Verifier {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String>;
}

/// `C = SHA-256("sipmail/1 commitment\0" || eA_pub)`
pub fn commitment(public: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(COMMIT_CONTEXT);
    h.update(public);
    h.finalize().into()
}

/// Key material for one direction of the media stream.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DirectionKeys {
    pub key: [u8; 32],
    pub iv: [u8; 12],
}

impl fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirectionKeys { key: <redacted>, iv: <redacted> }")
    }
}

/// The result of a completed handshake.
pub struct SessionKeys {
    pub suite: Suite,
    pub caller_to_callee: DirectionKeys,
    pub callee_to_caller: DirectionKeys,
    /// Short authentication string, 4 characters of ZRTP's base32 (20 bits).
    pub sas: String,
    /// SHA-256 of the full transcript T2; identifies the call in logs and audits.
    pub transcript_hash: [u8; 32],
    /// The secret this call leaves for the next one with the same peer.
    pub retained: RetainedSecret,
    /// Whether an earlier call's secret was mixed in, or what went wrong.
    pub continuity: Continuity,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("suite", &self.suite)
            .field("keys", &"<redacted>")
            .field("sas", &self.sas)
            .field("transcript_hash", &hex::encode(self.transcript_hash))
            .field("continuity", &self.continuity)
            .finish()
    }
}

/// ZRTP's base32 alphabet (RFC 6189 §5.1.6), chosen to be easy to read aloud.
const B32: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";

fn render_sas(bytes: [u8; 4]) -> String {
    let v = u32::from_be_bytes(bytes) >> 12; // leftmost 20 bits
    (0..4)
        .map(|i| B32[((v >> (15 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// The key schedule (docs/PROTOCOL.md, "Key schedule"): `IKM = ss || rs`, with `rs` the
/// retained secret both sides hold (absent on a first call or a mismatch). With a PSK
/// (trust policy psk), the salt is `HKDF-Extract(salt = TH2, IKM = psk)` instead of TH2,
/// as TLS 1.3's early secret keys the extraction of its DH secret: the PRK is then a PRF
/// of the PSK (secret to anyone without it, even one who can compute ss) and still an
/// extraction of ss (secret to anyone without ss, even one who later learns the PSK).
pub fn derive_keys(
    shared: &[u8; 32],
    retained: Option<&RetainedSecret>,
    psk: Option<&[u8]>,
    continuity: Continuity,
    t2: &Transcript,
    suite: Suite,
) -> SessionKeys {
    let th2: [u8; 32] = Sha256::digest(t2.as_bytes()).into();
    let mut ikm = zeroize::Zeroizing::new(Vec::with_capacity(64));
    ikm.extend_from_slice(shared);
    if let Some(rs) = retained {
        ikm.extend_from_slice(rs.as_bytes());
    }
    let salt = zeroize::Zeroizing::new(match psk {
        Some(psk) => Hkdf::<Sha256>::extract(Some(&th2), psk).0.into(),
        None => th2,
    });
    let hk = expander(&salt[..], &ikm);
    let expand = |label: &[u8], out: &mut [u8]| {
        // Output lengths are fixed and far below 255*32, so expand cannot fail.
        let _ = hk.expand(label, out);
    };
    let mut a2b = DirectionKeys {
        key: [0; 32],
        iv: [0; 12],
    };
    let mut b2a = a2b.clone();
    expand(b"sipmail/1 key caller->callee", &mut a2b.key);
    expand(b"sipmail/1 iv caller->callee", &mut a2b.iv);
    expand(b"sipmail/1 key callee->caller", &mut b2a.key);
    expand(b"sipmail/1 iv callee->caller", &mut b2a.iv);
    let mut sas = [0u8; 4];
    expand(b"sipmail/1 sas", &mut sas);
    let mut rs = [0u8; 32];
    expand(b"sipmail/1 retained secret", &mut rs);
    let retained = RetainedSecret(rs);
    rs.zeroize();
    SessionKeys {
        suite,
        caller_to_callee: a2b,
        callee_to_caller: b2a,
        sas: render_sas(sas),
        transcript_hash: th2,
        retained,
        continuity,
    }
}

/// HKDF-Extract into a buffer that is wiped when dropped, then the expander from that PRK
/// (`Hkdf::new` would leave the PRK in memory it returns and we cannot wipe). The HMAC
/// state inside the expander is hmac's, which does not wipe itself; it lives only as long
/// as `derive_keys`.
fn expander(salt: &[u8], ikm: &[u8]) -> Hkdf<Sha256> {
    let prk = {
        let (mut out, _) = Hkdf::<Sha256>::extract(Some(salt), ikm);
        let mut prk = zeroize::Zeroizing::new([0u8; 32]);
        prk.copy_from_slice(&out);
        out.as_mut_slice().zeroize();
        prk
    };
    Hkdf::<Sha256>::from_prk(prk.as_slice()).expect("a SHA-256 PRK is 32 bytes")
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
    let shared = x25519(&zeroize::Zeroizing::new(secret.to_bytes()), public);
    // All zeros: the peer's key has small order, so the secret would not depend on ours.
    if shared.iter().fold(0u8, |acc, b| acc | b) == 0 {
        return Err(HandshakeError::NonContributory);
    }
    Ok(shared)
}

/// The PSK to mix into the keys: the signer's, with trust policy psk (required), none
/// otherwise.
fn schedule_psk(auth: AuthMode, signer: &dyn Signer) -> Result<Option<&[u8]>, HandshakeError> {
    match auth {
        AuthMode::Psk => signer.psk().map(Some).ok_or(HandshakeError::NoPsk),
        AuthMode::Signed | AuthMode::Opportunistic => Ok(None),
    }
}

fn signed_data(context: &[u8], t: &Transcript) -> Vec<u8> {
    let mut v = Vec::with_capacity(context.len() + t.as_bytes().len());
    v.extend_from_slice(context);
    v.extend_from_slice(t.as_bytes());
    v
}

/// The caller after sending its offer, waiting for the answer.
pub struct CallerAwaitAnswer {
    secret: StaticSecret,
    public: [u8; 32],
    offer: Offer,
    retained: Vec<RetainedSecret>,
}

impl fmt::Debug for CallerAwaitAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerAwaitAnswer")
            .field("offer", &self.offer)
            .finish_non_exhaustive()
    }
}

/// What the caller has once the answer checked out.
#[derive(Debug)]
pub struct CallerDone {
    pub confirm: Confirm,
    pub keys: SessionKeys,
    /// T2 and the callee's signature over T1, kept for the audit log.
    pub transcript: Transcript,
    pub answer_signed_data: Vec<u8>,
}

impl CallerAwaitAnswer {
    /// Start a call. `secret` and `nonce` must come from a CSPRNG (tests pass fixed ones).
    pub fn new(
        secret: [u8; 32],
        nonce: [u8; 32],
        suites: Vec<Suite>,
        fingerprint: Vec<u8>,
    ) -> Self {
        let secret = StaticSecret::from(secret);
        let public = *PublicKey::from(&secret).as_bytes();
        let offer = Offer {
            suites,
            fingerprint,
            nonce,
            commitment: commitment(&public),
            auth: AuthMode::Signed,
            rs_ids: Vec::new(),
            key_packet: Vec::new(),
        };
        CallerAwaitAnswer {
            secret,
            public,
            offer,
            retained: Vec::new(),
        }
    }

    /// Use trust policy `auth` (default: signed). `key_packet` is our signing key for
    /// opportunistic mode (empty otherwise).
    pub fn with_auth(mut self, auth: AuthMode, key_packet: Vec<u8>) -> Self {
        self.offer.auth = auth;
        self.offer.key_packet = key_packet;
        self
    }

    /// The retained secrets we hold for this callee, newest first (at most
    /// [`MAX_RETAINED`] are used).
    pub fn with_retained(mut self, mut retained: Vec<RetainedSecret>) -> Self {
        retained.truncate(MAX_RETAINED);
        self.offer.rs_ids = retained.iter().map(|s| s.id(true)).collect();
        self.retained = retained;
        self
    }

    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// Check the callee's answer: the suite must be one we offered, and its signature over
    /// T1 must verify against the cert we hold for the callee. Then sign T2.
    pub fn on_answer(
        self,
        ctx: &CallContext,
        answer: &Answer,
        verifier: &dyn Verifier,
        signer: &dyn Signer,
    ) -> Result<CallerDone, HandshakeError> {
        if !self.offer.suites.contains(&answer.suite) {
            return Err(HandshakeError::SuiteNotOffered(answer.suite));
        }
        if answer.rs_ids.len() > MAX_RETAINED {
            return Err(HandshakeError::TooManyRetainedIds);
        }
        let t1 = Transcript::t1(ctx, &self.offer, answer)?;
        let answer_signed = signed_data(ANSWER_SIG_CONTEXT, &t1);
        verifier
            .verify(&answer.fingerprint, &answer_signed, &answer.signature)
            .map_err(HandshakeError::BadSignature)?;
        let shared = zeroize::Zeroizing::new(dh(&self.secret, &answer.public)?);
        let t2 = t1.extend_t2(&self.public)?;
        let signature = signer
            .sign(&signed_data(CONFIRM_SIG_CONTEXT, &t2))
            .map_err(HandshakeError::SignFailed)?;
        let (rs, continuity) = match_retained(&self.retained, &answer.rs_ids, true);
        let psk = schedule_psk(self.offer.auth, signer)?;
        let keys = derive_keys(&shared, rs.as_ref(), psk, continuity, &t2, answer.suite);
        Ok(CallerDone {
            confirm: Confirm {
                public: self.public,
                signature,
            },
            keys,
            transcript: t2,
            answer_signed_data: answer_signed,
        })
    }
}

/// The callee after sending its answer, waiting for the confirm in the ACK. Its ephemeral
/// secret and the retained secret are wiped when it is dropped: after the confirm, on a
/// refusal, or when the call times out.
#[derive(ZeroizeOnDrop)]
pub struct CalleeAwaitConfirm {
    secret: StaticSecret,
    #[zeroize(skip)]
    t1: Transcript,
    #[zeroize(skip)]
    offer: Offer,
    #[zeroize(skip)]
    suite: Suite,
    rs: Option<RetainedSecret>,
    #[zeroize(skip)]
    continuity: Continuity,
    /// Trust policy psk: the key, for the key schedule once the confirm is in.
    psk: Option<zeroize::Zeroizing<Vec<u8>>>,
}

/// What the callee brings to a call with one peer, besides its identity.
#[derive(Debug)]
pub struct CalleePolicy {
    /// Where our media listener for this call is; it goes into T1 (the answer's `c=`/`m=`).
    pub media: SocketAddr,
    /// The trust policy configured for this peer; an offer with another is refused.
    pub auth: AuthMode,
    /// Our retained secrets for this peer, newest first.
    pub retained: Vec<RetainedSecret>,
    /// Our signing key packet, for opportunistic mode.
    pub key_packet: Vec<u8>,
}

impl Default for CalleePolicy {
    /// Trust policy signed, no retained secrets, and the unspecified media address
    /// `0.0.0.0:0` (a relay always sets the real one).
    fn default() -> Self {
        CalleePolicy {
            media: SocketAddr::from(([0, 0, 0, 0], 0)),
            auth: AuthMode::default(),
            retained: Vec::new(),
            key_packet: Vec::new(),
        }
    }
}

impl fmt::Debug for CalleeAwaitConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CalleeAwaitConfirm")
            .field("suite", &self.suite)
            .field("continuity", &self.continuity)
            .finish_non_exhaustive()
    }
}

/// What the callee has once the confirm checked out.
#[derive(Debug)]
pub struct CalleeDone {
    pub keys: SessionKeys,
    pub transcript: Transcript,
    pub confirm_signed_data: Vec<u8>,
}

impl CalleeAwaitConfirm {
    /// Answer an offer. The caller's identity (fingerprint in the keyring, domain) is
    /// checked by the relay before this; here we pick the first suite of ours that the
    /// caller offered, and sign T1.
    pub fn respond(
        ctx: &CallContext,
        offer: &Offer,
        secret: [u8; 32],
        supported: &[Suite],
        fingerprint: Vec<u8>,
        signer: &dyn Signer,
    ) -> Result<(CalleeAwaitConfirm, Answer), HandshakeError> {
        Self::respond_with(
            ctx,
            offer,
            secret,
            supported,
            fingerprint,
            signer,
            &CalleePolicy::default(),
        )
    }

    /// As [`respond`](Self::respond), under `policy`: the offer's trust policy must be the
    /// one configured for this peer, and our retained secrets are matched against the
    /// caller's IDs (see [`CalleeAwaitConfirm::continuity`]).
    pub fn respond_with(
        ctx: &CallContext,
        offer: &Offer,
        mut secret: [u8; 32],
        supported: &[Suite],
        fingerprint: Vec<u8>,
        signer: &dyn Signer,
        policy: &CalleePolicy,
    ) -> Result<(CalleeAwaitConfirm, Answer), HandshakeError> {
        if offer.auth != policy.auth {
            return Err(HandshakeError::AuthMismatch {
                offered: offer.auth,
                required: policy.auth,
            });
        }
        if offer.rs_ids.len() > MAX_RETAINED {
            return Err(HandshakeError::TooManyRetainedIds);
        }
        if offer.suites.is_empty() {
            return Err(HandshakeError::EmptySuiteList);
        }
        // The caller's order expresses its preference; we honour it among what we support.
        let suite = offer
            .suites
            .iter()
            .copied()
            .find(|s| supported.contains(s))
            .ok_or_else(|| HandshakeError::NoCommonSuite {
                offered: offer
                    .suites
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(","),
            })?;
        let ephemeral = StaticSecret::from(secret);
        // Our copy of the caller's bytes; StaticSecret wipes its own when dropped.
        secret.zeroize();
        let secret = ephemeral;
        let public = *PublicKey::from(&secret).as_bytes();
        let retained = &policy.retained[..policy.retained.len().min(MAX_RETAINED)];
        let (rs, continuity) = match_retained(retained, &offer.rs_ids, false);
        let psk = schedule_psk(offer.auth, signer)?.map(|k| zeroize::Zeroizing::new(k.to_vec()));
        let mut answer = Answer {
            media: policy.media,
            suite,
            fingerprint,
            public,
            signature: Vec::new(),
            rs_ids: retained.iter().map(|s| s.id(false)).collect(),
            key_packet: policy.key_packet.clone(),
        };
        let t1 = Transcript::t1(ctx, offer, &answer)?;
        answer.signature = signer
            .sign(&signed_data(ANSWER_SIG_CONTEXT, &t1))
            .map_err(HandshakeError::SignFailed)?;
        Ok((
            CalleeAwaitConfirm {
                secret,
                t1,
                offer: offer.clone(),
                suite,
                rs,
                continuity,
                psk,
            },
            answer,
        ))
    }

    /// What the caller's retained-secret IDs told us; known before we answer, so a relay
    /// that requires continuity can refuse the call before any 200 OK.
    pub fn continuity(&self) -> Continuity {
        self.continuity
    }

    /// The offer this answers (the relay needs the caller's presented key, if any).
    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// Check the caller's confirm: its key must match the commitment in the offer, and its
    /// signature over T2 must verify against the caller's cert.
    pub fn on_confirm(
        self,
        confirm: &Confirm,
        verifier: &dyn Verifier,
    ) -> Result<CalleeDone, HandshakeError> {
        if commitment(&confirm.public) != self.offer.commitment {
            return Err(HandshakeError::CommitmentMismatch);
        }
        let t2 = self.t1.extend_t2(&confirm.public)?;
        let confirm_signed = signed_data(CONFIRM_SIG_CONTEXT, &t2);
        verifier
            .verify(&self.offer.fingerprint, &confirm_signed, &confirm.signature)
            .map_err(HandshakeError::BadSignature)?;
        let shared = zeroize::Zeroizing::new(dh(&self.secret, &confirm.public)?);
        let keys = derive_keys(
            &shared,
            self.rs.as_ref(),
            self.psk.as_ref().map(|k| k.as_slice()),
            self.continuity,
            &t2,
            self.suite,
        );
        Ok(CalleeDone {
            keys,
            transcript: t2,
            confirm_signed_data: confirm_signed,
        })
    }
}

// The states and values that hold secrets wipe them when dropped (a compile-time check).
const _: () = {
    const fn zeroize_on_drop<T: ZeroizeOnDrop>() {}
    zeroize_on_drop::<CalleeAwaitConfirm>();
    zeroize_on_drop::<StaticSecret>();
    zeroize_on_drop::<RetainedSecret>();
    zeroize_on_drop::<DirectionKeys>();
};

#[cfg(test)]
mod tests;
