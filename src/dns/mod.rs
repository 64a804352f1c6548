//! DNS for partners without hand-wiring (issue 13): where a partner's relay is (SRV,
//! RFC 3263) and its key (OPENPGPKEY, RFC 7929), asked of a validating resolver whose AD
//! bit says whether an answer is DNSSEC-secure.
//!
//! - [`client`]: the stub resolver (hickory), bounded in time; Secure / Insecure / errors
//!   (bogus, SERVFAIL, timeout).
//! - [`srv`]: RFC 2782 ordering, sans-IO.
//! - [`locate`]: SRV (or the RFC 3263 A/AAAA fallback) into ordered call targets.
//! - [`keytrust`]: the `trust = "dnssec"` pin rules, sans-IO.
//! - [`system`]: a configured host name through the system resolver, off the blocking pool.
//! - this file: [`openpgpkey_owner`]. The OPENPGPKEY lookup with those rules and the pin
//!   state is `relay::dnskey::discover_key` (the pin state belongs to the relay).

pub mod client;
pub mod keytrust;
pub mod locate;
pub mod srv;
pub mod system;

pub use client::{DnsError, Resolver, Security};
pub use keytrust::{InsecureKeys, KeyRefusal, PinAction, Verdict};
pub use locate::{CallTarget, LocateError, Location, locate};

use sha2::{Digest, Sha256};

/// The OPENPGPKEY owner name of `mail@<domain>` (RFC 7929 section 3): the SHA2-256 hash
/// of the local part "mail", truncated to 28 octets, in hex, under `_openpgpkey`.
pub fn openpgpkey_owner(domain: &str) -> String {
    let h = Sha256::digest(b"mail");
    format!("{}._openpgpkey.{domain}", hex::encode(&h[..28]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_owner_name_is_rfc_7929s() {
        // `printf mail | sha256sum`, first 56 hex digits (28 octets).
        assert_eq!(
            super::openpgpkey_owner("site-b.test"),
            "00d8d3f11739d2f3537099982b4674c29fc59a8fda350fca1379613a._openpgpkey.site-b.test"
        );
    }
}
