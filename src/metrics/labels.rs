//! The label values and label sets of the metrics: the fixed sets (call direction, why a
//! call failed) and one struct per combination of labels.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// Which way a call went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// We placed it.
    Outgoing,
    /// A peer called us.
    Incoming,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outgoing => "outgoing",
            Direction::Incoming => "incoming",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), e)
    }
}

/// Why a call failed: the fixed set of the `reason` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CallFailure {
    /// A signature (or PSK MAC) over the handshake did not verify.
    Signature,
    /// The caller's ephemeral key did not match its commitment.
    Commitment,
    /// Refused by a policy: not a partner, trust policy or suite mismatch, a held key.
    Policy,
    /// The peer's key is not a usable one we hold for it (unknown, revoked, expired).
    UnknownKey,
    /// Key continuity broken and `continuity = "require"`.
    Continuity,
    /// No answer in time (SIP timer, ACK, media connection).
    Timeout,
    /// The peer answered 4xx (3xx counts here too).
    Status4xx,
    /// The peer answered 5xx.
    Status5xx,
    /// The peer answered 6xx.
    Status6xx,
    /// Resolving, connecting or sending failed.
    Network,
    /// The media connection failed or did not authenticate.
    Media,
    /// No SMTP greeting through the call.
    Smtp,
    /// A malformed request, answer or SDP body.
    Malformed,
    /// The other side gave up (hung up) before the call came up.
    Cancelled,
    /// Something on our side (randomness, a port, the trust state).
    Internal,
    /// DNS gave no usable answer (SRV location or OPENPGPKEY key: bogus, insecure,
    /// missing, a timeout, targets that are ourselves).
    Dns,
    /// `trust = "dnssec"`: the partner's key in DNS changed and the change was refused
    /// (an alert: the old key did not certify the new one, nor did an operator accept it).
    KeyChanged,
}

impl CallFailure {
    pub const ALL: [CallFailure; 17] = [
        CallFailure::Signature,
        CallFailure::Commitment,
        CallFailure::Policy,
        CallFailure::UnknownKey,
        CallFailure::Continuity,
        CallFailure::Timeout,
        CallFailure::Status4xx,
        CallFailure::Status5xx,
        CallFailure::Status6xx,
        CallFailure::Network,
        CallFailure::Media,
        CallFailure::Smtp,
        CallFailure::Malformed,
        CallFailure::Cancelled,
        CallFailure::Internal,
        CallFailure::Dns,
        CallFailure::KeyChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallFailure::Signature => "signature",
            CallFailure::Commitment => "commitment",
            CallFailure::Policy => "policy",
            CallFailure::UnknownKey => "unknown_key",
            CallFailure::Continuity => "continuity",
            CallFailure::Timeout => "timeout",
            CallFailure::Status4xx => "4xx",
            CallFailure::Status5xx => "5xx",
            CallFailure::Status6xx => "6xx",
            CallFailure::Network => "network",
            CallFailure::Media => "media",
            CallFailure::Smtp => "smtp",
            CallFailure::Malformed => "malformed",
            CallFailure::Cancelled => "cancelled",
            CallFailure::Internal => "internal",
            CallFailure::Dns => "dns",
            CallFailure::KeyChanged => "key_changed",
        }
    }

    /// The class of a SIP final status the peer answered with.
    pub fn of_status(status: u16) -> CallFailure {
        match status {
            500..=599 => CallFailure::Status5xx,
            600..=699 => CallFailure::Status6xx,
            _ => CallFailure::Status4xx,
        }
    }
}

impl EncodeLabelValue for CallFailure {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), e)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PeerLabels {
    pub(super) peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CallLabels {
    pub(super) peer: String,
    pub(super) direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FailLabels {
    pub(super) peer: String,
    pub(super) direction: Direction,
    pub(super) reason: CallFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BytesLabels {
    pub(super) peer: String,
    /// `in` (received from the peer) or `out` (sent to it).
    pub(super) direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ContinuityLabels {
    pub(super) peer: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KeyLabels {
    /// `own` or `partner`.
    pub(super) owner: &'static str,
    pub(super) domain: String,
    pub(super) fingerprint: String,
}
