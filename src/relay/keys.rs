//! The keyring in use: [`KeyState`] (the keyring and what we derive from it), the
//! [`Keys`] holder that a reload swaps whole, the signer/verifier adaptors the
//! handshake uses, and [`check_keyring`], the start-up check against the config.

use super::error::RelayError;
use crate::config::{Config, Peer};
use crate::handshake::{Signer, Verifier};
use crate::keyring::Keyring;
use std::sync::{Arc, RwLock};

/// The keyring and what the relay derives from it, swapped as a whole on reload. A call
/// takes one snapshot ([`Keys::current`]) and uses it to the end, so it never mixes two
/// keyrings.
pub(crate) struct KeyState {
    pub keyring: Keyring,
    pub own_fpr: Vec<u8>,
    pub own_fpr_hex: String,
    /// The key we sign with and its public key packet, presented in opportunistic calls.
    pub signing_fpr: Vec<u8>,
    pub signing_packet: Vec<u8>,
}

impl KeyState {
    /// Open and check the keyring against the config (see [`check_keyring`]). `before`:
    /// on a reload, the peers of the config in force until now (see [`check_keyring_for`]).
    pub fn load(cfg: &Config, before: Option<&[Peer]>) -> Result<KeyState, RelayError> {
        let keyring = check_keyring_for(cfg, before)?;
        let own_fpr_hex = keyring.own_fingerprint()?;
        let own_fpr =
            hex::decode(&own_fpr_hex).map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
        let (signing_fpr_hex, signing_packet) = keyring.own_signing_key()?;
        let signing_fpr = hex::decode(&signing_fpr_hex)
            .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
        Ok(KeyState {
            keyring,
            own_fpr,
            own_fpr_hex,
            signing_fpr,
            signing_packet,
        })
    }

    /// The signer and the verifier for calls with `peer`, by its trust policy. `presented`
    /// is the key packet the peer presented (opportunistic only).
    pub fn auth_for<'a>(
        &'a self,
        peer: &'a Peer,
        presented: &'a [u8],
    ) -> (
        Box<dyn Signer + Send + Sync + 'a>,
        Box<dyn Verifier + Send + Sync + 'a>,
    ) {
        use crate::config::Trust;
        match &peer.trust {
            Trust::Signed => (
                Box::new(KeyringSigner(&self.keyring)),
                Box::new(PeerVerifier {
                    keyring: &self.keyring,
                    domain: &peer.domain,
                }),
            ),
            Trust::Psk(k) => {
                let a = crate::handshake::PskAuth::new(k.as_bytes());
                (Box::new(a.clone()), Box::new(a))
            }
            Trust::Opportunistic => (
                Box::new(KeyringSigner(&self.keyring)),
                Box::new(PresentedKeyVerifier { packet: presented }),
            ),
            // Without the cert found in DNS (see `auth_with_discovered`), nothing verifies.
            Trust::Dnssec => (
                Box::new(KeyringSigner(&self.keyring)),
                Box::new(DiscoveredVerifier(None)),
            ),
        }
    }

    /// `trust = "dnssec"`: we sign with our own key, the peer's signatures are verified
    /// with the certificate found (and trusted) in DNS for this call.
    pub fn auth_with_discovered<'a>(
        &'a self,
        cert: &'a crate::keyring::DiscoveredCert,
    ) -> (
        Box<dyn Signer + Send + Sync + 'a>,
        Box<dyn Verifier + Send + Sync + 'a>,
    ) {
        (
            Box::new(KeyringSigner(&self.keyring)),
            Box::new(DiscoveredVerifier(Some(cert))),
        )
    }

    /// The fingerprint we announce to `peer`: our cert's, or (opportunistic) our signing
    /// key's, which is what the peer pins.
    pub fn announced_fpr(&self, peer: &Peer) -> Vec<u8> {
        if peer.trust.mode() == crate::handshake::AuthMode::Opportunistic {
            self.signing_fpr.clone()
        } else {
            self.own_fpr.clone()
        }
    }
}

/// The current [`KeyState`], replaced whole by a reload (SIGHUP, `sipmail reload`,
/// `sipmail keys import`; see `reload`).
pub(crate) struct Keys {
    current: RwLock<Arc<KeyState>>,
}

impl Keys {
    pub fn new(loaded: KeyState) -> Self {
        Keys {
            current: RwLock::new(Arc::new(loaded)),
        }
    }

    /// The current keyring (a snapshot: a reload does not change it under the caller).
    pub fn current(&self) -> Arc<KeyState> {
        match self.current.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Calls from now on use `ks`; calls in progress keep their snapshot.
    pub fn set(&self, ks: KeyState) {
        let ks = Arc::new(ks);
        match self.current.write() {
            Ok(mut k) => *k = ks,
            Err(poisoned) => *poisoned.into_inner() = ks,
        }
    }
}

/// Signs with the relay's own OpenPGP key.
pub struct KeyringSigner<'a>(pub &'a Keyring);
impl Signer for KeyringSigner<'_> {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        self.0.sign_detached(data).map_err(|e| e.to_string())
    }
}

/// Verifies with the cert held for `mail@domain`.
pub struct PeerVerifier<'a> {
    pub keyring: &'a Keyring,
    pub domain: &'a str,
}
impl Verifier for PeerVerifier<'_> {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String> {
        self.keyring
            .verify_detached(
                self.domain,
                &hex::encode_upper(fingerprint),
                data,
                signature,
            )
            .map_err(|e| e.to_string())
    }
}

/// Verifies with the key packet the peer presented in an opportunistic call.
pub struct PresentedKeyVerifier<'a> {
    pub packet: &'a [u8],
}
impl Verifier for PresentedKeyVerifier<'_> {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String> {
        if self.packet.is_empty() {
            return Err("an opportunistic peer must present its key (a=sipmail-pubkey)".into());
        }
        crate::keyring::verify_with_key_packet(
            self.packet,
            &hex::encode_upper(fingerprint),
            data,
            signature,
        )
        .map_err(|e| e.to_string())
    }
}

/// Verifies with the certificate of a DNSSEC-secure OPENPGPKEY record.
pub struct DiscoveredVerifier<'a>(pub Option<&'a crate::keyring::DiscoveredCert>);
impl Verifier for DiscoveredVerifier<'_> {
    fn verify(&self, fingerprint: &[u8], data: &[u8], signature: &[u8]) -> Result<(), String> {
        let Some(cert) = self.0 else {
            return Err("trust = \"dnssec\": no key from DNS for this call".into());
        };
        cert.verify_detached(&hex::encode_upper(fingerprint), data, signature)
            .map_err(|e| e.to_string())
    }
}

/// Open the keyring and check it against the config: our own key for mail@domain, and a
/// usable cert for every peer.
pub fn check_keyring(cfg: &Config) -> Result<Keyring, RelayError> {
    check_keyring_for(cfg, None)
}

/// As [`check_keyring`]. On a reload (`before`: the peers configured until now), a peer
/// that was configured before and is left without a usable certificate (its only one
/// revoked or removed: the point of the change) is a warning, and calls with it are
/// refused until one is imported; a peer new in this config needs one, as at start.
fn check_keyring_for(cfg: &Config, before: Option<&[Peer]>) -> Result<Keyring, RelayError> {
    if !cfg.keyring.is_dir() {
        return Err(cfg
            .invalid(
                "relay.keyring",
                format!(
                    "{} does not exist: create it with `sipmail keys generate --keyring {} --domain {}`",
                    cfg.keyring.display(),
                    cfg.keyring.display(),
                    cfg.domain
                ),
            )
            .into());
    }
    let mut kr =
        Keyring::open(&cfg.keyring).map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    kr.check_bindings()
        .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    for (i, p) in cfg.peers.iter().enumerate() {
        if let Some(list) = &p.fingerprints {
            kr.restrict_peer(&p.domain, list)
                .map_err(|e| cfg.invalid(&format!("peer[{i}].fingerprints"), e.to_string()))?;
        }
    }
    if let Some(fpr) = &cfg.signing_key {
        kr.select_signing_key(fpr)
            .map_err(|e| cfg.invalid("relay.signing_key", e.to_string()))?;
    }
    kr.own_domain_ok(&cfg.domain)
        .map_err(|e| cfg.invalid("relay.keyring", e.to_string()))?;
    for (i, p) in cfg.peers.iter().enumerate() {
        // Only `signed` peers need a cert; psk and opportunistic peers do without.
        if matches!(p.trust, crate::config::Trust::Signed) && !kr.has_peer(&p.domain) {
            let known =
                before.is_some_and(|b| b.iter().any(|o| o.domain.eq_ignore_ascii_case(&p.domain)));
            if known {
                tracing::warn!(peer = %p.domain, "no usable certificate for this peer any more: its calls are refused until one is imported");
                continue;
            }
            return Err(cfg
                .invalid(
                    &format!("peer[{i}]"),
                    format!(
                        "no usable certificate for mail@{}{} in {}: import the partner's cert with `sipmail keys import --keyring {} FILE`",
                        p.domain,
                        if p.fingerprints.is_some() { " among its fingerprints" } else { "" },
                        cfg.keyring.display(),
                        cfg.keyring.display()
                    ),
                )
                .into());
        }
    }
    Ok(kr)
}
