//! The sipmail key agreement, as pure functions and state: no sockets, no clock, no
//! randomness of its own (the caller passes the ephemeral secret and the nonce in).
//!
//! ```text
//! caller A                                    callee B
//! Offer   { suites, fpr_A, nonce, C = H(eA) }  ->
//!                                          <- Answer { suite, eB, fpr_B, Sig_B(T1) }
//! Confirm { eA, Sig_A(T2) }                ->
//! ss = X25519(eA, eB); PRK = HKDF-Extract(salt = SHA-256(T2), ss)
//! ```
//! The exact encodings are in docs/PROTOCOL.md, and the tests check its vectors.

mod transcript;

pub use transcript::{Tag, Transcript};

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use std::fmt;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Protocol label and version. Changing the wire format means a new label.
pub const PROTOCOL_LABEL: &[u8] = b"sipmail/1";
/// Prefix of the data the callee signs (answer) and the caller signs (confirm). Distinct
/// prefixes mean no signature made in one role can be replayed in the other.
pub const ANSWER_SIG_CONTEXT: &[u8] = b"sipmail/1 answer signature\0";
pub const CONFIRM_SIG_CONTEXT: &[u8] = b"sipmail/1 confirm signature\0";
const COMMIT_CONTEXT: &[u8] = b"sipmail/1 commitment\0";

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
}

/// Carried in the 200 OK's SDP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub suite: Suite,
    pub fingerprint: Vec<u8>,
    pub public: [u8; 32],
    pub signature: Vec<u8>,
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
}

/// Signs transcript data with our identity (OpenPGP key, or a PSK HMAC).
pub trait Signer {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String>;
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
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("suite", &self.suite)
            .field("keys", &"<redacted>")
            .field("sas", &self.sas)
            .field("transcript_hash", &hex::encode(self.transcript_hash))
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

/// The key schedule (docs/PROTOCOL.md, "Key schedule").
pub fn derive_keys(shared: &[u8; 32], t2: &Transcript, suite: Suite) -> SessionKeys {
    let th2: [u8; 32] = Sha256::digest(t2.as_bytes()).into();
    let hk = Hkdf::<Sha256>::new(Some(&th2), shared);
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
    SessionKeys {
        suite,
        caller_to_callee: a2b,
        callee_to_caller: b2a,
        sas: render_sas(sas),
        transcript_hash: th2,
    }
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
    let ss = secret.diffie_hellman(&PublicKey::from(*public));
    if !ss.was_contributory() {
        return Err(HandshakeError::NonContributory);
    }
    Ok(*ss.as_bytes())
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
        };
        CallerAwaitAnswer {
            secret,
            public,
            offer,
        }
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
        let keys = derive_keys(&shared, &t2, answer.suite);
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

/// The callee after sending its answer, waiting for the confirm in the ACK.
pub struct CalleeAwaitConfirm {
    secret: StaticSecret,
    t1: Transcript,
    offer: Offer,
    suite: Suite,
}

impl fmt::Debug for CalleeAwaitConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CalleeAwaitConfirm")
            .field("suite", &self.suite)
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
        let secret = StaticSecret::from(secret);
        let public = *PublicKey::from(&secret).as_bytes();
        let mut answer = Answer {
            suite,
            fingerprint,
            public,
            signature: Vec::new(),
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
            },
            answer,
        ))
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
        let keys = derive_keys(&shared, &t2, self.suite);
        Ok(CalleeDone {
            keys,
            transcript: t2,
            confirm_signed_data: confirm_signed,
        })
    }
}

#[cfg(test)]
mod tests;
