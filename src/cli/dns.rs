//! `sipmail keys publish` (the DNS records a site adds for partners to find it) and
//! `sipmail discover DOMAIN` (what a relay would find in DNS and whether it would trust it).

use anyhow::{Context, Result};
use base64::Engine;
use sipmail::config::Config;
use sipmail::dns::{self, Resolver};
use sipmail::keyring::{Keyring, format_fingerprint};
use std::net::SocketAddr;
use std::process::ExitCode;

/// The SRV and OPENPGPKEY records for our domain, in zone-file form.
pub fn publish(cfg: &Config, target: Option<String>, ttl: u32) -> Result<ExitCode> {
    let kr = Keyring::open(&cfg.keyring)
        .with_context(|| format!("opening the keyring {}", cfg.keyring.display()))?;
    let key = kr.export_public_binary()?;
    let fpr = kr.own_fingerprint()?;
    let d = &cfg.domain;
    let host = target
        .unwrap_or_else(|| cfg.hostname.clone())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = cfg
        .advertise
        .and_then(|a| a.sip_port)
        .unwrap_or(cfg.sip_listen.port());
    let ip = cfg.advertise.map(|a| a.ip).unwrap_or(cfg.sip_listen.ip());
    println!(
        "; sipmail: the records partners' relays look up for {d} (config {}).",
        cfg.file
    );
    println!("; Add them to the zone of {d} and sign it with DNSSEC: a relay trusts the key below");
    println!("; only from a DNSSEC-secure answer (its resolver's AD bit).");
    println!(";");
    println!("; Where this relay takes calls (RFC 3263/2782; priority, weight, port, target).");
    println!(
        "; A second relay: another SRV line (same priority to share the load, higher to stand by)."
    );
    println!(
        "; To let the site's SIP proxy take the calls, point the target at the proxy instead."
    );
    let (udp, tcp) = (dns::locate::SRV_UDP, dns::locate::SRV_TCP);
    println!("{udp}.{d}. {ttl} IN SRV 10 10 {port} {host}.");
    println!("{tcp}.{d}. {ttl} IN SRV 20 10 {port} {host}.");
    if ip.is_unspecified() || ip.is_loopback() {
        println!(
            "; {host} needs an A/AAAA record with the address partners reach this relay at (sip.advertise)."
        );
    } else {
        let rtype = if ip.is_ipv4() { "A" } else { "AAAA" };
        println!("; {host} must resolve to the relay (if it does not already):");
        println!("; {host}. {ttl} IN {rtype} {ip}");
    }
    println!(";");
    println!(
        "; The relay's key, mail@{d} (RFC 7929), fingerprint {}:",
        format_fingerprint(&fpr)
    );
    for old in kr.predecessor_fingerprints()? {
        println!(
            "; It is certified by this relay's previous key {} (a rotation): relays that pinned",
            format_fingerprint(&old)
        );
        println!(
            "; that key from DNS take this one. Keep the old key in the keyring until they have."
        );
    }
    println!(
        "{}. {ttl} IN OPENPGPKEY {}",
        dns::openpgpkey_owner(d),
        base64::engine::general_purpose::STANDARD.encode(&key)
    );
    Ok(ExitCode::SUCCESS)
}

/// What a relay would find for `domain` and whether it would trust it. Exit 0 when a
/// relay with this config would call and trust the key, 1 when not.
pub async fn discover(
    cfg: Option<&Config>,
    resolver: Option<SocketAddr>,
    timeout: Option<std::time::Duration>,
    domain: &str,
) -> Result<ExitCode> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let r = match (resolver, cfg.and_then(|c| c.dns.as_ref())) {
        (Some(a), _) => Resolver::new(a, timeout.unwrap_or(sipmail::config::DEFAULT_DNS_TIMEOUT)),
        (None, Some(d)) => Resolver::new(d.resolver, timeout.unwrap_or(d.timeout)),
        (None, None) => anyhow::bail!(
            "no resolver: give --resolver IP:PORT (a validating resolver, e.g. 127.0.0.1:53) or --config FILE with a [dns] section"
        ),
    };
    println!(
        "discover {domain} (resolver {}, timeout {:?})",
        r.addr, r.timeout
    );
    let own: Vec<SocketAddr> = cfg.map(|c| vec![c.sip_listen]).unwrap_or_default();
    let mut ok = true;
    let mut random = dns::srv::os_random;
    println!("\nrelay location (SRV _sipmail._udp / _sipmail._tcp, RFC 3263):");
    match dns::locate(&r, &domain, &own, &mut random).await {
        Ok(loc) => {
            if loc.srv.is_empty() {
                println!("  no SRV records: the A/AAAA fallback of {domain}, port 5060, UDP");
            }
            for (i, t) in loc.targets.iter().enumerate() {
                println!(
                    "  {}. {} -> {} {}",
                    i + 1,
                    t.label,
                    t.addr,
                    t.transport.as_str()
                );
            }
            for s in &loc.skipped_self {
                println!("  skipped (this relay itself): {s}");
            }
            println!("  answers: {}", loc.security);
        }
        Err(e) => {
            ok = false;
            println!("  NONE: {e}");
        }
    }
    println!(
        "\nkey (OPENPGPKEY {}, RFC 7929):",
        dns::openpgpkey_owner(&domain)
    );
    let store = cfg.map(|c| sipmail::relay::trust::TrustStore::new(&c.spool));
    let scratch;
    let store = match store {
        Some(s) => s,
        None => {
            scratch = tempfile::tempdir()?;
            sipmail::relay::trust::TrustStore::new(scratch.path())
        }
    };
    let insecure = cfg
        .and_then(|c| c.discovery.as_ref())
        .map_or(dns::InsecureKeys::Refuse, |d| d.insecure);
    let key = sipmail::relay::dnskey::discover_key(&r, &store, &domain, false, insecure).await;
    match &key {
        Ok(k) => {
            println!(
                "  {} ({}), user IDs: {}",
                format_fingerprint(k.cert.fingerprint()),
                k.security,
                k.cert.user_ids().join(", ")
            );
            println!(
                "  trust = \"dnssec\": TRUSTED ({})",
                match &k.action {
                    dns::PinAction::Keep => "the pinned key".to_string(),
                    dns::PinAction::PinFirst => "first use: it would be pinned".to_string(),
                    dns::PinAction::Repin { old } => format!(
                        "a new key certified by the pinned {}: it would become the pin",
                        format_fingerprint(old)
                    ),
                }
            );
        }
        Err(e) => {
            ok = false;
            println!("  trust = \"dnssec\": NOT TRUSTED: {e}");
        }
    }
    println!("\npolicy:");
    match cfg {
        None => println!("  (no --config: the policy of a relay is not known)"),
        Some(c) => match c.peer(&domain) {
            Some(p) => println!(
                "  {domain} is a [[peer]] (sip = {}, trust = {}): {}",
                if p.dns {
                    "\"dns\"".to_string()
                } else {
                    p.sip
                        .iter()
                        .map(|t| format!("\"{t}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                match p.trust {
                    sipmail::config::Trust::Dnssec => "dnssec",
                    sipmail::config::Trust::Signed => "signed",
                    sipmail::config::Trust::Opportunistic => "opportunistic",
                    sipmail::config::Trust::Psk(_) => "psk",
                },
                if matches!(p.trust, sipmail::config::Trust::Dnssec) {
                    "the key above decides"
                } else {
                    "its own trust policy decides, not the DNS key"
                }
            ),
            None if c.discovery.as_ref().is_some_and(|d| d.allows(&domain)) => println!(
                "  no [[peer]]; [discovery] allows {domain}: mail goes there {}",
                if ok {
                    "and would be delivered"
                } else {
                    "but stays queued (deferred) until the problem above is fixed"
                }
            ),
            None => {
                ok = false;
                println!(
                    "  no [[peer]] and [discovery] does not allow {domain}: mail for it is refused (550)"
                );
            }
        },
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
