//! Delivery status notification parameters (RFC 3461) as sipmail carries them from hop
//! to hop: `RET` and `ENVID` on MAIL, `NOTIFY` and `ORCPT` on RCPT.

use serde::{Deserialize, Serialize};

/// `RET=`: what a failure DSN should return of the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=`: `NEVER`, or any of `SUCCESS`, `FAILURE`, `DELAY`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub failure: bool,
    #[serde(default)]
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// The parameter's value, e.g. `SUCCESS,FAILURE` or `NEVER`.
    pub fn value(self) -> String {
        let mut v = Vec::new();
        if self.success {
            v.push("SUCCESS");
        }
        if self.failure {
            v.push("FAILURE");
        }
        if self.delay {
            v.push("DELAY");
        }
        if v.is_empty() {
            "NEVER".into()
        } else {
            v.join(",")
        }
    }
}

/// The DSN parameters of one recipient. Without `NOTIFY`, RFC 3461 §4.1 says to act as
/// if `FAILURE` (and possibly `DELAY`) had been given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// The original recipient (`ORCPT=rfc822;...`), xtext-decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl RcptParams {
    /// Whether a failure of this recipient is reported to the sender.
    pub fn wants_failure_dsn(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }
}

/// xtext (RFC 3461 §4): `+XX` for `+`, `=`, and bytes outside `!`..`~`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_plus_equals_and_non_ascii() {
        assert_eq!(xtext("a+b=c@x.test"), "a+2Bb+3Dc@x.test");
        assert_eq!(xtext("jörg@x"), "j+C3+B6rg@x");
        assert_eq!(xtext("sp ace"), "sp+20ace");
    }

    #[test]
    fn notify_values() {
        assert_eq!(Notify::NEVER.value(), "NEVER");
        let n = Notify {
            success: true,
            failure: true,
            delay: false,
        };
        assert_eq!(n.value(), "SUCCESS,FAILURE");
        assert!(RcptParams::default().wants_failure_dsn());
        let never = RcptParams {
            notify: Some(Notify::NEVER),
            orcpt: None,
        };
        assert!(!never.wants_failure_dsn());
    }
}
