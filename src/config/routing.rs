//! `[[route]]` and `[routing]`: where mail for a domain goes, in the spirit of Postfix's
//! `transport_maps` with `relayhost`/`smtp_fallback_relay` as the default route.
//!
//! ```toml
//! [routing]
//! default = "smtp:[smarthost.example]:25"   # every other domain (default: "refuse")
//! lanes = 4                                # connections at once to each SMTP next hop
//!
//! [[route]]
//! domain = "example.com"                   # exactly example.com
//! via = "smtp:[mx.example.com]:25"
//! [[route]]
//! domain = ".example.com"                  # any subdomain of example.com (not itself)
//! via = "refuse"
//! message = "No mail for example.com's hosts here"
//! ```
//!
//! Targets (`via`, `routing.default`): `local`; `peer` (the `[[peer]]` of the route's own
//! domain) or `peer:DOMAIN`; `smtp:[host]:port` or `smtp:[host]` (port 25): the host's
//! A/AAAA records through the system resolver, or an IP address, never an MX lookup;
//! `refuse` (550 5.7.1, with `message` if given); `dns` is reserved for partners
//! discovered in DNS.
//!
//! Which entry decides ([`Routing::decide`], most specific first): our own domain is always
//! local; then a `[[route]]` for exactly that domain; then a `[[peer]]` of that domain (a
//! partner); then the `.parent` route with the longest parent; then `routing.default`.

use super::raw::{RawRoute, RawRouting};
use super::values::valid_domain;
use super::{ConfigError, Errors, Peer};
use crate::queue::{NextHop, Route};

/// Connections at once to each SMTP next hop, unless `routing.lanes` says otherwise.
pub const DEFAULT_NEXT_HOP_LANES: usize = 4;

/// What a route does with the mail of its domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Delivered here, as mail for our own domain is.
    Local,
    /// To the partner of this (configured) domain, by a call.
    Peer(String),
    /// To an SMTP next hop.
    Smtp(NextHop),
    /// Refused at RCPT with 550 5.7.1, and this text if the operator gave one.
    Refuse(Option<String>),
}

/// Which domains a `[[route]]` covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `domain = "example.com"`: that domain only.
    Exact(String),
    /// `domain = ".example.com"`: every subdomain of example.com, at any depth.
    Subdomains(String),
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(d) => f.write_str(d),
            Pattern::Subdomains(d) => write!(f, ".{d}"),
        }
    }
}

/// One `[[route]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRule {
    pub pattern: Pattern,
    pub target: Target,
}

/// The routing table: the `[[route]]`s, in file order, and the default route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    pub routes: Vec<RouteRule>,
    /// For every domain no other entry covers (`routing.default`; default: refuse).
    pub default: Target,
    /// Connections at once to each SMTP next hop (`routing.lanes`).
    pub lanes: usize,
}

impl Default for Routing {
    /// No routes, and every other domain refused: sipmail before routing tables.
    fn default() -> Self {
        Routing {
            routes: Vec::new(),
            default: Target::Refuse(None),
            lanes: DEFAULT_NEXT_HOP_LANES,
        }
    }
}

impl Routing {
    /// Where mail for `domain` (lower case, no trailing dot) goes, or the text of the
    /// 550 5.7.1 that refuses it. `own` is our domain, `peers` our partners. The order is
    /// the module's: own domain, exact `[[route]]`, `[[peer]]`, longest `.parent` route,
    /// default. Who may use the route is the SMTP server's question, not this one.
    /// Whether an exact `[[route]]` names `domain` (lower case).
    pub fn has_exact(&self, domain: &str) -> bool {
        self.routes
            .iter()
            .any(|r| matches!(&r.pattern, Pattern::Exact(d) if d == domain))
    }

    pub fn decide(&self, domain: &str, own: &str, peers: &[Peer]) -> Result<Route, String> {
        if domain == own {
            return Ok(Route::Local);
        }
        let exact = self
            .routes
            .iter()
            .find(|r| matches!(&r.pattern, Pattern::Exact(d) if d == domain));
        if let Some(r) = exact {
            return r.target.route(domain, Some(&r.pattern));
        }
        if let Some(p) = peers.iter().find(|p| p.domain.eq_ignore_ascii_case(domain)) {
            return Ok(Route::Peer(p.domain.clone()));
        }
        let parent = self
            .routes
            .iter()
            .filter_map(|r| match &r.pattern {
                Pattern::Subdomains(p) if is_subdomain(domain, p) => Some((p.len(), r)),
                _ => None,
            })
            .max_by_key(|(len, _)| *len);
        match parent {
            Some((_, r)) => r.target.route(domain, Some(&r.pattern)),
            None => self.default.route(domain, None),
        }
    }

    /// Every SMTP next hop the table names (for the log at start and reload).
    pub fn next_hops(&self) -> Vec<&NextHop> {
        let mut v: Vec<&NextHop> = self
            .routes
            .iter()
            .map(|r| &r.target)
            .chain(std::iter::once(&self.default))
            .filter_map(|t| match t {
                Target::Smtp(h) => Some(h),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn is_subdomain(domain: &str, parent: &str) -> bool {
    domain
        .strip_suffix(parent)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
}

impl Target {
    /// The queue's route for mail to `domain`, or the refusal's text. `by`: the
    /// `[[route]]` that chose this target (None: the default route).
    fn route(&self, domain: &str, by: Option<&Pattern>) -> Result<Route, String> {
        match self {
            Target::Local => Ok(Route::Local),
            Target::Peer(p) => Ok(Route::Peer(p.clone())),
            Target::Smtp(h) => Ok(Route::Smtp(h.clone())),
            Target::Refuse(Some(msg)) => Err(msg.clone()),
            Target::Refuse(None) => Err(match by {
                None => {
                    format!("Relay access denied: {domain} is not a partner domain of this relay")
                }
                Some(p) => format!(
                    "Relay access denied: mail for {domain} is refused by this relay's route for \"{p}\""
                ),
            }),
        }
    }
}

/// `[routing]` and the `[[route]]`s. `own`: `relay.domain`; `peers`: the parsed `[[peer]]`s.
pub(super) fn parse_routing(
    raw: &RawRouting,
    routes: &[RawRoute],
    own: &str,
    peers: &[Peer],
    e: Errors<'_>,
) -> Result<Routing, ConfigError> {
    let mut out: Vec<RouteRule> = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        let pattern = parse_pattern(&r.domain).map_err(|m| e.bad(&key("domain"), m))?;
        if let Some(j) = out.iter().position(|o| o.pattern == pattern) {
            return Err(e.bad(
                &key("domain"),
                format!("\"{pattern}\" is already routed by route[{j}]: one route per domain"),
            ));
        }
        let exact = match &pattern {
            Pattern::Exact(d) => Some(d.as_str()),
            Pattern::Subdomains(_) => None,
        };
        let target = parse_target(&r.via, exact, peers).map_err(|m| e.bad(&key("via"), m))?;
        let target =
            with_message(target, r.message.as_deref()).map_err(|m| e.bad(&key("message"), m))?;
        if exact == Some(own) && target != Target::Local {
            return Err(e.bad(
                &key("via"),
                format!("{own} is relay.domain, whose mail is always delivered here: remove this route or make it \"local\""),
            ));
        }
        out.push(RouteRule { pattern, target });
    }
    let default = match raw.default.as_deref() {
        None => Target::Refuse(None),
        Some(v) => match parse_target(v, None, peers).map_err(|m| e.bad("routing.default", m))? {
            Target::Local => {
                return Err(e.bad(
                    "routing.default",
                    "\"local\" as the default would take mail for every domain from anyone; route the domains delivered here with [[route]] entries".into(),
                ));
            }
            t => t,
        },
    };
    let default = with_message(default, raw.default_message.as_deref())
        .map_err(|m| e.bad("routing.default_message", m))?;
    let lanes = raw.lanes.unwrap_or(DEFAULT_NEXT_HOP_LANES);
    if !(1..=256).contains(&lanes) {
        return Err(e.bad("routing.lanes", format!("{lanes} is not between 1 and 256")));
    }
    Ok(Routing {
        routes: out,
        default,
        lanes,
    })
}

/// `example.com` or `.example.com`, lower-cased, a trailing dot dropped.
fn parse_pattern(s: &str) -> Result<Pattern, String> {
    let d = s.trim_end_matches('.').to_ascii_lowercase();
    let (sub, name) = match d.strip_prefix('.') {
        Some(rest) => (true, rest.to_string()),
        None => (false, d.clone()),
    };
    if !valid_domain(&name) {
        return Err(format!(
            "\"{s}\" is not a domain name (\"example.com\" for that domain, \".example.com\" for its subdomains)"
        ));
    }
    Ok(if sub {
        Pattern::Subdomains(name)
    } else {
        Pattern::Exact(name)
    })
}

/// A `via` or `routing.default` value. `exact`: the route's domain when it names one
/// domain (a bare `peer` means that domain's `[[peer]]`).
fn parse_target(s: &str, exact: Option<&str>, peers: &[Peer]) -> Result<Target, String> {
    let partner = |d: &str| -> Result<Target, String> {
        match peers.iter().find(|p| p.domain.eq_ignore_ascii_case(d)) {
            Some(p) => Ok(Target::Peer(p.domain.clone())),
            None => Err(format!(
                "\"{s}\": no [[peer]] has domain \"{d}\" (a partner route needs its [[peer]])"
            )),
        }
    };
    match s.trim() {
        "local" => Ok(Target::Local),
        "refuse" => Ok(Target::Refuse(None)),
        "peer" => match exact {
            Some(d) => partner(d),
            None => Err(
                "\"peer\" alone names the partner of the route's own domain: here write peer:DOMAIN"
                    .into(),
            ),
        },
        // Partners found in DNS are listed in [discovery] (which the routing table yields
        // to for those domains), not named per route.
        "dns" => Err(
            "\"dns\" is not a route target: list the domain in [discovery] domains, and mail for it goes to the partner DNS names".into(),
        ),
        t => {
            if let Some(d) = t.strip_prefix("peer:") {
                partner(d.trim_end_matches('.'))
            } else if let Some(hop) = t.strip_prefix("smtp:") {
                parse_next_hop(hop).map(Target::Smtp)
            } else {
                Err(format!(
                    "\"{s}\" is not a route: expected \"local\", \"peer\", \"peer:DOMAIN\", \"smtp:[host]:port\", \"refuse\" or \"dns\""
                ))
            }
        }
    }
}

/// `[host]:port` or `[host]` (port 25). The host is a name (its A/AAAA records, looked up
/// by the system resolver at each connection) or an IP address, `ipv6:` allowed before
/// an IPv6 address as Postfix writes it. Without brackets Postfix would look up MX
/// records, which sipmail does not do: refused rather than silently done differently.
fn parse_next_hop(s: &str) -> Result<NextHop, String> {
    let bad_form = || {
        format!(
            "\"smtp:{s}\": write smtp:[host]:port or smtp:[host] (port 25); the brackets say what sipmail does: connect to the host's address records, no MX lookup"
        )
    };
    let rest = s.strip_prefix('[').ok_or_else(bad_form)?;
    let (host, after) = rest.split_once(']').ok_or_else(bad_form)?;
    let port = match after {
        "" => 25,
        p => match p.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(n)) if n > 0 => n,
            _ => return Err(format!("\"smtp:{s}\": the port must be 1-65535")),
        },
    };
    let host = host.strip_prefix("ipv6:").unwrap_or(host);
    let host = if host.parse::<std::net::IpAddr>().is_ok() {
        host.to_string()
    } else {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        if !valid_domain(&h) {
            return Err(format!(
                "\"smtp:{s}\": \"{host}\" is neither a host name nor an IP address"
            ));
        }
        h
    };
    Ok(NextHop { host, port })
}

/// Attach a refusal's text (`message`): only `refuse` takes one; one line of printable
/// ASCII, since it goes into an SMTP reply.
fn with_message(t: Target, message: Option<&str>) -> Result<Target, String> {
    let Some(m) = message else { return Ok(t) };
    if !matches!(t, Target::Refuse(_)) {
        return Err("only a \"refuse\" route has a message".into());
    }
    let m = m.trim();
    if m.is_empty() || m.len() > 200 || !m.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(
            "the message must be 1 to 200 printable ASCII characters on one line (it goes into the SMTP reply)"
                .into(),
        );
    }
    Ok(Target::Refuse(Some(m.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The documented example with a second partner, c.example.com.
    const PEER_C: &str =
        "[[peer]]\ndomain = \"c.example.com\"\nsip = \"sip:mail@127.0.0.1:5064\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        let base = crate::config::tests::GOOD;
        Config::parse("a.toml", &format!("{base}{PEER_C}{extra}")).map_err(|e| e.to_string())
    }

    fn hop(host: &str, port: u16) -> Route {
        Route::Smtp(NextHop {
            host: host.into(),
            port,
        })
    }

    #[test]
    fn without_a_table_partners_go_by_call_and_the_rest_is_refused() {
        let c = parse("").unwrap();
        assert_eq!(c.routing, Routing::default());
        let d = |dom: &str| c.routing.decide(dom, &c.domain, &c.peers);
        assert_eq!(d("site-a.test"), Ok(Route::Local));
        assert_eq!(d("site-b.test"), Ok(Route::Peer("site-b.test".into())));
        assert_eq!(
            d("elsewhere.example"),
            Err(
                "Relay access denied: elsewhere.example is not a partner domain of this relay"
                    .into()
            )
        );
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let c = parse(
            r#"
[routing]
default = "smtp:[smarthost.example]"
[[route]]
domain = ".example.com"
via = "smtp:[10.0.0.1]:2525"
[[route]]
domain = ".b.example.com"
via = "refuse"
message = "Not here"
[[route]]
domain = "example.com"
via = "peer:site-b.test"
[[route]]
domain = "site-b.test"
via = "smtp:[ipv6:::1]:25"
[[route]]
domain = ".site-a.test"
via = "local"
"#,
        )
        .unwrap();
        let d = |dom: &str| c.routing.decide(dom, &c.domain, &c.peers);
        // Own domain: always local.
        assert_eq!(d("site-a.test"), Ok(Route::Local));
        // Its subdomains, by their route.
        assert_eq!(d("x.site-a.test"), Ok(Route::Local));
        // An exact route beats the [[peer]] of the same domain.
        assert_eq!(d("site-b.test"), Ok(hop("::1", 25)));
        // Exact beats `.parent`.
        assert_eq!(d("example.com"), Ok(Route::Peer("site-b.test".into())));
        // A [[peer]] (exact) beats a `.parent` route.
        assert_eq!(d("c.example.com"), Ok(Route::Peer("c.example.com".into())));
        // The longest parent wins, at any depth.
        assert_eq!(d("a.example.com"), Ok(hop("10.0.0.1", 2525)));
        assert_eq!(d("x.y.a.example.com"), Ok(hop("10.0.0.1", 2525)));
        assert_eq!(d("x.b.example.com"), Err("Not here".into()));
        assert_eq!(d("deep.x.b.example.com"), Err("Not here".into()));
        // `.b.example.com` covers b.example.com's subdomains, not b.example.com itself.
        assert_eq!(d("b.example.com"), Ok(hop("10.0.0.1", 2525)));
        // Suffix, not label: "notexample.com" is no subdomain of example.com.
        assert_eq!(d("notexample.com"), Ok(hop("smarthost.example", 25)));
        assert_eq!(d("elsewhere.example"), Ok(hop("smarthost.example", 25)));
        assert_eq!(
            c.routing.next_hops(),
            vec![
                &NextHop {
                    host: "10.0.0.1".into(),
                    port: 2525
                },
                &NextHop {
                    host: "::1".into(),
                    port: 25
                },
                &NextHop {
                    host: "smarthost.example".into(),
                    port: 25
                },
            ]
        );
        assert_eq!(c.routing.lanes, DEFAULT_NEXT_HOP_LANES);
    }

    #[test]
    fn refusals_say_why() {
        let c = parse(
            "[routing]\ndefault = \"refuse\"\ndefault_message = \"Outbound mail goes through mx.corp\"\nlanes = 2\n[[route]]\ndomain = \"spam.example\"\nvia = \"refuse\"\n",
        )
        .unwrap();
        let d = |dom: &str| c.routing.decide(dom, &c.domain, &c.peers);
        assert_eq!(
            d("x.test"),
            Err("Outbound mail goes through mx.corp".into())
        );
        assert_eq!(
            d("spam.example"),
            Err("Relay access denied: mail for spam.example is refused by this relay's route for \"spam.example\"".into())
        );
        assert_eq!(c.routing.lanes, 2);
    }

    #[test]
    fn a_bare_peer_names_the_routes_own_partner() {
        let c = parse("[[route]]\ndomain = \"site-b.test.\"\nvia = \"peer\"\n").unwrap();
        assert_eq!(
            c.routing.routes[0],
            RouteRule {
                pattern: Pattern::Exact("site-b.test".into()),
                target: Target::Peer("site-b.test".into())
            }
        );
        let c = parse("[routing]\ndefault = \"peer:SITE-B.test\"\n").unwrap();
        assert_eq!(c.routing.default, Target::Peer("site-b.test".into()));
    }

    /// Each bad value: the key the error must name, and a piece of its explanation.
    #[test]
    fn bad_input_names_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[[route]]\ndomain = \"bad domain\"\nvia = \"local\"\n",
                "route[0].domain",
                "not a domain name",
            ),
            (
                "[[route]]\ndomain = \".\"\nvia = \"local\"\n",
                "route[0].domain",
                "not a domain name",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:x.test:25\"\n",
                "route[0].via",
                "no MX lookup",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:[x.test]:0\"\n",
                "route[0].via",
                "port must be 1-65535",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:[x.test]:99999\"\n",
                "route[0].via",
                "port must be 1-65535",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:[x.test]25\"\n",
                "route[0].via",
                "port must be",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:[bad host]:25\"\n",
                "route[0].via",
                "neither a host name",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"smtp:[x.test\"\n",
                "route[0].via",
                "smtp:[host]:port",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"uucp:x\"\n",
                "route[0].via",
                "is not a route",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"peer\"\n",
                "route[0].via",
                "no [[peer]] has domain \"x.test\"",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"peer:nobody.test\"\n",
                "route[0].via",
                "no [[peer]] has domain \"nobody.test\"",
            ),
            (
                "[[route]]\ndomain = \".x.test\"\nvia = \"peer\"\n",
                "route[0].via",
                "peer:DOMAIN",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"dns\"\n",
                "route[0].via",
                "[discovery]",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"local\"\nmessage = \"hi\"\n",
                "route[0].message",
                "only a \"refuse\"",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"refuse\"\nmessage = \"a\\r\\nb\"\n",
                "route[0].message",
                "printable ASCII",
            ),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"refuse\"\n[[route]]\ndomain = \"X.test\"\nvia = \"local\"\n",
                "route[1].domain",
                "already routed by route[0]",
            ),
            (
                "[[route]]\ndomain = \"site-a.test\"\nvia = \"smtp:[mx.test]\"\n",
                "route[0].via",
                "relay.domain",
            ),
            ("[[route]]\ndomain = \"x.test\"\n", "route", "via"),
            (
                "[[route]]\ndomain = \"x.test\"\nvia = \"local\"\nvai = \"local\"\n",
                "vai",
                "unknown field",
            ),
            (
                "[routing]\ndefault = \"local\"\n",
                "routing.default",
                "every domain from anyone",
            ),
            (
                "[routing]\ndefault = \"peer\"\n",
                "routing.default",
                "peer:DOMAIN",
            ),
            (
                "[routing]\ndefault = \"dns\"\n",
                "routing.default",
                "[discovery]",
            ),
            (
                "[routing]\ndefault = \"smtp:relay.test\"\n",
                "routing.default",
                "no MX lookup",
            ),
            (
                "[routing]\ndefault = \"smtp:[relay.test]\"\ndefault_message = \"x\"\n",
                "routing.default_message",
                "only a \"refuse\"",
            ),
            (
                "[routing]\nlanes = 0\n",
                "routing.lanes",
                "between 1 and 256",
            ),
            (
                "[routing]\ndefualt = \"refuse\"\n",
                "defualt",
                "unknown field",
            ),
        ];
        for (extra, key, why) in cases {
            let e = parse(extra).expect_err(extra);
            assert!(e.starts_with("a.toml"), "{e}");
            assert!(e.contains(key), "{extra}: error does not name {key}: {e}");
            assert!(e.contains(why), "{extra}: error does not say {why}: {e}");
        }
    }
}
