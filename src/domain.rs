//! Domain names compared as the relay compares them (peer senders in the config, the
//! envelope sender's domain on the callee side). Pure, no I/O.

/// A domain in the form used for comparison: one trailing dot removed, IDNA (UTS #46) to
/// A-labels, lower case, LDH labels of 1..=63 octets, at most 253 octets in all. `None`
/// if it is not a domain name (address literals included).
pub fn normalise_domain(d: &str) -> Option<String> {
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() || d.starts_with('[') {
        return None;
    }
    let ascii = idna::domain_to_ascii_cow(d.as_bytes(), idna::AsciiDenyList::STD3).ok()?;
    let ascii = ascii.to_ascii_lowercase();
    let ok = ascii.len() <= 253
        && ascii.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    ok.then_some(ascii)
}

#[cfg(test)]
mod tests {
    use super::normalise_domain;

    #[test]
    fn normalised() {
        assert_eq!(
            normalise_domain("Site-C.Test.").as_deref(),
            Some("site-c.test")
        );
        assert_eq!(
            normalise_domain("Bücher.test").as_deref(),
            Some("xn--bcher-kva.test")
        );
        assert_eq!(normalise_domain("[127.0.0.1]"), None);
        assert_eq!(normalise_domain(""), None);
        assert_eq!(normalise_domain("-a.test"), None);
        assert_eq!(normalise_domain(&format!("{}.test", "a".repeat(64))), None);
    }
}
