//! Key expiry: the keys' gauges (see crate::metrics) and a warning in the log, at most
//! once a day per key, when our own key or a partner's expires within 30 days (or has).

use super::context::Context;
use crate::keyring::KeyInfo;
use crate::metrics::{KEY_WARNING, KeyExpiry};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often the keys are looked at; a reload's new keys are seen within this.
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// The same key is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(86_400);

/// The domain of a user ID `mail@domain` (with or without a name and angle brackets).
fn mail_domain(user_id: &str) -> Option<String> {
    let at = user_id.to_ascii_lowercase();
    let start = at.find("mail@")? + "mail@".len();
    let d: String = at[start..]
        .chars()
        .take_while(|c| !matches!(c, '>' | ' '))
        .collect();
    (!d.is_empty()).then_some(d)
}

/// The keys as the gauges show them: our own under our domain, a partner's under the
/// domain of its `mail@` user ID (its first, if it has several).
pub(crate) fn expiries(keys: &[KeyInfo], own_domain: &str) -> Vec<KeyExpiry> {
    keys.iter()
        .map(|k| KeyExpiry {
            own: k.own,
            domain: if k.own {
                own_domain.to_string()
            } else {
                k.user_ids
                    .iter()
                    .find_map(|u| mail_domain(u))
                    .unwrap_or_default()
            },
            fingerprint: k.fingerprint.clone(),
            expires: k.expires,
        })
        .collect()
}

/// Set the key gauges from the current keyring; returns the keys within the warning time.
pub(crate) fn refresh(ctx: &Context, now: SystemTime) -> Vec<KeyExpiry> {
    let keys = expiries(&ctx.keys().keyring.list(), &ctx.settings().site.domain);
    ctx.metrics.set_keys(&keys, now)
}

/// The log line for a key that expires soon (or has).
fn warn(k: &KeyExpiry, now: SystemTime) {
    let Some(at) = k.expires else { return };
    let when = crate::time::utc_datetime(at);
    let advice = if k.own {
        "rotate it (`sipmail keys generate --rotate`, README \"Rotating the relay's key\") and send partners the new certificate"
    } else {
        "ask the partner for its new certificate and import it (`sipmail keys import`)"
    };
    let owner = if k.own { "own" } else { "partner" };
    match at.duration_since(now) {
        Ok(left) => tracing::warn!(
            owner, domain = %k.domain, fingerprint = %k.fingerprint, expires = %when,
            days_left = left.as_secs() / 86_400,
            "key expires within {} days: {advice}", KEY_WARNING.as_secs() / 86_400
        ),
        Err(_) => tracing::warn!(
            owner, domain = %k.domain, fingerprint = %k.fingerprint, expired = %when,
            "key has expired: calls that need it fail; {advice}"
        ),
    }
}

/// Until shutdown: look at the keys every hour, warn about each expiring one once a day.
pub(crate) async fn watch(ctx: Arc<Context>) {
    let mut warned: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        let now = tokio::time::Instant::now();
        for k in refresh(&ctx, SystemTime::now()) {
            let due = warned
                .get(&k.fingerprint)
                .is_none_or(|last| now.duration_since(*last) >= WARN_EVERY);
            if due {
                warn(&k, SystemTime::now());
                warned.insert(k.fingerprint.clone(), now);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = ctx.shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::KeyStatus;

    fn key(own: bool, uid: &str, fpr: &str, expires: Option<SystemTime>) -> KeyInfo {
        KeyInfo {
            fingerprint: fpr.into(),
            user_ids: vec![uid.into()],
            own,
            algo: "ed25519".into(),
            expires,
            status: KeyStatus::Valid,
            can_sign: true,
        }
    }

    #[test]
    fn keys_are_labelled_by_domain_and_flagged_30_days_ahead() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let keys = expiries(
            &[
                key(true, "mail@site-a.test", "AA", None),
                key(
                    false,
                    "Site B <MAIL@Site-B.test>",
                    "BB",
                    Some(now + 29 * day),
                ),
                key(false, "mail@site-c.test", "CC", Some(now + 31 * day)),
                key(false, "mail@site-d.test", "DD", Some(now - day)),
            ],
            "site-a.test",
        );
        assert_eq!(keys[0].domain, "site-a.test");
        assert_eq!(keys[1].domain, "site-b.test");
        let m = crate::metrics::Metrics::new(Vec::new());
        let soon: Vec<String> = m
            .set_keys(&keys, now)
            .into_iter()
            .map(|k| k.fingerprint)
            .collect();
        assert_eq!(soon, ["BB", "DD"]);
        let text = m.scrape(|_| {}).unwrap();
        let b = format!(
            "sipmail_key_expiry_timestamp_seconds{{owner=\"partner\",domain=\"site-b.test\",fingerprint=\"BB\"}} {}",
            1_800_000_000 + 29 * 86_400
        );
        assert!(text.contains(&b), "{text}");
        assert!(text.contains("sipmail_key_expires_soon{owner=\"own\",domain=\"site-a.test\",fingerprint=\"AA\"} 0"), "{text}");
        assert!(text.contains("sipmail_key_expires_soon{owner=\"partner\",domain=\"site-b.test\",fingerprint=\"BB\"} 1"), "{text}");
        assert!(text.contains("sipmail_key_expires_soon{owner=\"partner\",domain=\"site-c.test\",fingerprint=\"CC\"} 0"), "{text}");
        // A key that never expires has no expiry series.
        assert!(
            !text.contains("sipmail_key_expiry_timestamp_seconds{owner=\"own\""),
            "{text}"
        );
    }
}
