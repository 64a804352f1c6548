//! What happens once a call is up, in either direction: the log line, the audit record,
//! the trust state (retained secret, first-use pin) and the event.

use super::context::Context;
use super::events::RelayEvent;
use super::trust;
use crate::config::Peer;

impl Context {
    /// The audit record of a call: both fingerprints, the suite, the SAS and the hash of
    /// the signed transcript, in the log and as an event; and, unless `audit.record_calls`
    /// is off, the signed data and both signatures in a record file (crate::audit). Then the
    /// call's trust state is kept: its retained secret for the next call, and
    /// (opportunistic) the peer's key pinned if this was the first use. Called only once the
    /// media stream has proved that both sides hold the same keys.
    pub async fn call_established(
        &self,
        call_id: &str,
        peer: &Peer,
        outgoing: bool,
        peer_fpr: &str,
        keys: &crate::handshake::SessionKeys,
        sigs: crate::audit::CallSignatures<'_>,
    ) {
        let mode = peer.trust.mode();
        let ks = self.keys();
        // Only OpenPGP-signed calls leave evidence a third party can check (docs/AUDIT.md):
        // a PSK call's MACs prove nothing to anyone without the secret, and an
        // opportunistic call's keys are not in anyone's keyring.
        if let Some(dir) = &self.settings().site.call_records
            && mode == crate::handshake::AuthMode::Signed
        {
            self.record_call(dir, call_id, &peer.domain, outgoing, keys, sigs);
        }
        let local_fpr = if mode == crate::handshake::AuthMode::Opportunistic {
            hex::encode_upper(&ks.signing_fpr)
        } else {
            ks.own_fpr_hex.clone()
        };
        tracing::info!(
            %call_id,
            peer = %peer.domain,
            direction = if outgoing { "outgoing" } else { "incoming" },
            trust = %mode,
            local_fingerprint = %local_fpr,
            peer_fingerprint = %peer_fpr,
            suite = %keys.suite,
            sas = %keys.sas,
            continuity = %keys.continuity,
            transcript_sha256 = %hex::encode(keys.transcript_hash),
            "call established"
        );
        // The retained secret is written (and fsynced) on the blocking pool, group-committed
        // with other calls' secrets. The call does not wait for it: lookups for the next
        // call see a secret whose write has not finished (`TrustStore::remember`), and a
        // crash before it is durable leaves what a crash a moment before this call did
        // (docs/ARCHITECTURE.md, "Key continuity"). An opportunistic peer's first-use pin
        // is a trust decision the next call reads from disk: that one is waited for.
        let (trust, domain, retained, remote) = (
            self.trust.store.clone(),
            peer.domain.clone(),
            keys.retained.clone(),
            peer_fpr.to_string(),
        );
        // Queued here, before the caller sees our side of the stream or the next set-up
        // with this peer starts: lookups for that call find it.
        match trust.retain(&domain, &remote, &retained) {
            Ok(ticket) => {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = trust.write_retained(ticket) {
                        tracing::warn!(peer = %domain, error = %e, "cannot store the retained secret; the next call has no key continuity");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(peer = %domain, error = %e, "cannot store the retained secret; the next call has no key continuity")
            }
        }
        if mode == crate::handshake::AuthMode::Opportunistic {
            let (trust, domain, fpr) = (
                self.trust.store.clone(),
                peer.domain.clone(),
                peer_fpr.to_string(),
            );
            let pinned = tokio::task::spawn_blocking(move || trust.pin_first_use(&domain, &fpr))
                .await
                .unwrap_or_else(|e| {
                    Err(trust::TrustError::Io {
                        path: self.trust.store.dir().to_path_buf(),
                        source: std::io::Error::other(e.to_string()),
                    })
                });
            match pinned {
                Ok(true) => tracing::warn!(
                    peer = %peer.domain, peer_fingerprint = %peer_fpr, sas = %keys.sas,
                    "opportunistic peer's key pinned on first use: compare the SAS with the partner to rule out a man in the middle on this call"
                ),
                Err(e) => {
                    tracing::warn!(peer = %peer.domain, error = %e, "cannot pin the peer's key")
                }
                Ok(false) => {}
            }
        }
        self.metrics.call_established(
            &peer.domain,
            if outgoing {
                crate::metrics::Direction::Outgoing
            } else {
                crate::metrics::Direction::Incoming
            },
            keys.continuity.name(),
        );
        self.event(RelayEvent::CallEstablished {
            call_id: call_id.to_string(),
            peer: peer.domain.clone(),
            outgoing,
            local_fingerprint: local_fpr,
            peer_fingerprint: peer_fpr.to_string(),
            suite: keys.suite.to_string(),
            sas: keys.sas.clone(),
            trust: mode.to_string(),
            continuity: keys.continuity.to_string(),
        });
    }
}

impl Context {
    /// Write the call's audit record off the call's path. A failure is logged, never fatal:
    /// the log line "call established" carries the same identities.
    fn record_call(
        &self,
        dir: &std::path::Path,
        call_id: &str,
        peer: &str,
        outgoing: bool,
        keys: &crate::handshake::SessionKeys,
        sigs: crate::audit::CallSignatures<'_>,
    ) {
        let rec = match crate::audit::CallRecord::new(
            call_id,
            outgoing,
            peer,
            keys,
            sigs,
            std::time::SystemTime::now(),
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%call_id, error = %e, "cannot build the call's audit record");
                return;
            }
        };
        let dir = dir.to_path_buf();
        let call_id = call_id.to_string();
        tokio::task::spawn_blocking(move || match rec.write(&dir) {
            Ok(path) => tracing::debug!(%call_id, record = %path.display(), "call record written"),
            Err(e) => tracing::warn!(%call_id, error = %e, "cannot write the call's audit record"),
        });
    }
}
