//! What the relay says in SIP whatever the call: the methods it allows, the `Reason` of
//! a hang-up, and a response carrying a `Warning`.

use crate::sip::{Request, Response};

pub(crate) const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS";

/// A `Reason` header value (RFC 3326) explaining why we hang up.
pub(crate) fn reason_header(text: &str) -> String {
    format!(
        "SIP;cause=488;text=\"{}\"",
        text.replace(['"', '\\', '\r', '\n'], " ")
    )
}

/// A response with our `Warning` (code 399), its text made safe for the quoted string
/// (the sip layer's one Warning builder).
pub(crate) fn warn_response(req: &Request, status: u16, reason: &str, warning: &str) -> Response {
    crate::sip::warning_response(req, status, reason, 399, "sipmail", warning)
}
