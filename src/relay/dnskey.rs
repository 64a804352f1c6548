//! `trust = "dnssec"`: the OPENPGPKEY lookup of a partner's key, decided by
//! `dns::keytrust` against the pin state of [`super::trust`].

use super::trust::{PinCheck, TrustStore};
use crate::dns::keytrust::{self, InsecureKeys, KeyRefusal, PinAction, Verdict};
use crate::dns::{DnsError, Resolver, Security, openpgpkey_owner};
use crate::keyring::DiscoveredCert;
use hickory_proto::rr::{RData, RecordType};

/// Why no key from DNS may be used for a partner. Each names the domain and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0}")]
    Dns(#[from] DnsError),
    #[error(
        "no OPENPGPKEY record for mail@{domain} ({owner}): the partner must publish its key (`sipmail keys publish` on its side)"
    )]
    Missing { domain: String, owner: String },
    #[error("no usable key for mail@{domain} in its OPENPGPKEY record: {why}")]
    Unusable { domain: String, why: String },
    #[error("{0}")]
    Refused(KeyRefusal),
    #[error("trust state: {0}")]
    State(#[from] super::trust::TrustError),
}

impl DiscoveryError {
    /// The alert case: a changed key, refused (it gets `key_changed` in the metrics and
    /// an error line in the log).
    pub fn is_key_change(&self) -> bool {
        matches!(
            self,
            DiscoveryError::Refused(
                KeyRefusal::Changed { .. }
                    | KeyRefusal::InsecurePending {
                        pinned: Some(_),
                        ..
                    }
            )
        )
    }
}

/// What [`discover_key`] found and decided.
#[derive(Debug)]
pub struct DiscoveredKey {
    pub cert: DiscoveredCert,
    pub security: Security,
    pub action: PinAction,
}

/// Look up `mail@<domain>`'s OPENPGPKEY and decide with the pin state whether to trust
/// it (see [`keytrust::decide`]). `commit`: write the outcome to the trust state (pin on
/// first use, re-pin a certified change, record a refused changed key as pending for
/// `sipmail trust accept`); `false` for `sipmail discover`, which only shows.
/// `insecure`: `[discovery] insecure`, the policy for an answer that is not secure.
pub async fn discover_key(
    r: &Resolver,
    store: &TrustStore,
    domain: &str,
    commit: bool,
    insecure: InsecureKeys,
) -> Result<DiscoveredKey, DiscoveryError> {
    let owner = openpgpkey_owner(domain);
    let answer = r.query(&owner, RecordType::OPENPGPKEY).await?;
    let blobs: Vec<Vec<u8>> = answer
        .records
        .into_iter()
        .filter_map(|rd| match rd {
            RData::OPENPGPKEY(k) => Some(k.public_key),
            _ => None,
        })
        .take(8)
        .collect();
    if blobs.is_empty() {
        return Err(DiscoveryError::Missing {
            domain: domain.to_string(),
            owner,
        });
    }
    let mut certs = Vec::new();
    let mut why = Vec::new();
    for b in &blobs {
        match DiscoveredCert::parse(b, domain) {
            Ok(c) => certs.push(c),
            Err(e) => why.push(e.to_string()),
        }
    }
    if certs.is_empty() {
        return Err(DiscoveryError::Unusable {
            domain: domain.to_string(),
            why: why.join("; "),
        });
    }
    let pinned = match store.check_pin(domain, certs[0].fingerprint())? {
        PinCheck::FirstUse => None,
        PinCheck::Same => Some(certs[0].fingerprint().to_string()),
        PinCheck::Changed { pinned } => Some(pinned),
    };
    let old = match (&pinned, store.pinned_cert(domain)?) {
        (Some(_), Some(bytes)) => DiscoveredCert::stored(&bytes).ok(),
        _ => None,
    };
    let candidates: Vec<keytrust::Candidate> = certs
        .iter()
        .map(|c| keytrust::Candidate {
            fingerprint: c.fingerprint().to_string(),
            certified_by_pinned: old.as_ref().is_some_and(|o| {
                pinned.as_deref() == Some(o.fingerprint().to_hex().as_str()) && c.certified_by(o)
            }),
        })
        .collect();
    match keytrust::decide(
        domain,
        answer.security,
        &candidates,
        pinned.as_deref(),
        insecure,
    ) {
        Verdict::Use { index, action } => {
            let cert = certs.swap_remove(index);
            if commit {
                match &action {
                    PinAction::Keep => {}
                    PinAction::PinFirst => {
                        store.pin_first_use(domain, cert.fingerprint())?;
                    }
                    PinAction::Repin { .. } => store.repin(domain, cert.fingerprint())?,
                }
                if let Ok(b) = cert.to_bytes() {
                    store.store_cert(domain, &b)?;
                }
            }
            Ok(DiscoveredKey {
                cert,
                security: answer.security,
                action,
            })
        }
        Verdict::Refuse(refusal) => {
            if commit
                && let KeyRefusal::Changed { found, .. } | KeyRefusal::InsecurePending { found, .. } =
                    &refusal
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                for f in found {
                    store.record_pending(domain, f, "dns", now)?;
                }
            }
            Err(DiscoveryError::Refused(refusal))
        }
    }
}
