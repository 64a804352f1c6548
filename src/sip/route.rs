//! Dialog routing through proxies (RFC 3261 §12.1, §12.2.1.1, §16.12): the route set a
//! dialog learns from Record-Route, the remote target from Contact, and how a request
//! inside the dialog is addressed (Request-URI, Route headers, next hop). Pure: no I/O;
//! the driver resolves the next hop's host and sends.
//!
//! A proxy that record-routes (Kamailio's `record_route()`) puts its URI in a
//! Record-Route header of the INVITE; the callee copies them into its 2xx. The callee's
//! route set is that list in order, the caller's is the list reversed, so that each side's
//! first route is the proxy nearest to it. Requests in the dialog (ACK for the 2xx, BYE)
//! then go to the first route with the route set as Route headers, and carry the remote
//! target (the other side's Contact) as Request-URI. A loose router (`;lr`) keeps the
//! Request-URI; a strict router (no `;lr`, RFC 2543) gets its URI as the Request-URI and
//! the remote target as the last Route (§12.2.1.1).

use super::endpoint::Transport;
use super::message::{NameAddr, Request, Response};

/// Where a request in the dialog goes next: a SIP URI's host, port and transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// A host name or an IP address (an IPv6 address without its brackets).
    pub host: String,
    /// `None`: the URI gives no port (5060 for `sip:`).
    pub port: Option<u16>,
    /// The URI's `transport=` parameter; `None`: none given.
    pub transport: Option<Transport>,
}

impl Hop {
    /// The port to use: the URI's, else 5060 (RFC 3263 §4.2 without SRV).
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(5060)
    }
}

/// Why a URI cannot be a next hop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0:?} is not a sip: URI")]
    NotSip(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} has a bad port")]
    BadPort(String),
    #[error("{0:?} asks for transport {1:?}, which sipmail does not speak (udp, tcp)")]
    Transport(String, String),
    #[error("Record-Route entry {0:?} is not a name-addr")]
    BadRoute(String),
}

/// The caller's route set from the 2xx to its INVITE: its Record-Route values reversed.
pub fn route_set_uac(resp: &Response) -> Result<Vec<String>, RouteError> {
    let mut v = record_routes(resp.headers.list_values("Record-Route"))?;
    v.reverse();
    Ok(v)
}

/// The callee's route set from the INVITE: its Record-Route values in order.
pub fn route_set_uas(req: &Request) -> Result<Vec<String>, RouteError> {
    record_routes(req.headers.list_values("Record-Route"))
}

/// Each entry must be a name-addr whose URI is a usable hop; kept as written.
fn record_routes(values: Vec<&str>) -> Result<Vec<String>, RouteError> {
    values
        .into_iter()
        .map(|v| {
            let n = NameAddr::parse(v).map_err(|_| RouteError::BadRoute(v.to_string()))?;
            parse_hop(&n.uri)?;
            Ok(v.to_string())
        })
        .collect()
}

/// The remote target: the URI of the first Contact, if there is a usable one.
pub fn remote_target(contact: Option<&str>) -> Option<String> {
    let c = NameAddr::parse(contact?).ok()?;
    parse_hop(&c.uri).ok()?;
    Some(c.uri)
}

/// How one request in the dialog is addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub request_uri: String,
    /// The Route header values, in order.
    pub routes: Vec<String>,
    /// Where to send it: the first route's URI; `None` when the route set is empty (the
    /// driver then sends where the dialog's INVITE went, see relay/dialog.rs).
    pub next_hop: Option<Hop>,
}

/// Address a request in the dialog with `route_set` and `remote_target` (§12.2.1.1).
pub fn route_request(route_set: &[String], remote_target: &str) -> Result<Routed, RouteError> {
    let Some(first) = route_set.first() else {
        return Ok(Routed {
            request_uri: remote_target.to_string(),
            routes: Vec::new(),
            next_hop: None,
        });
    };
    let first_uri = NameAddr::parse(first)
        .map_err(|_| RouteError::BadRoute(first.clone()))?
        .uri;
    let hop = parse_hop(&first_uri)?;
    if has_param(&first_uri, "lr") {
        Ok(Routed {
            request_uri: remote_target.to_string(),
            routes: route_set.to_vec(),
            next_hop: Some(hop),
        })
    } else {
        // A strict router: it gets its own URI (without headers) as the Request-URI.
        let mut routes: Vec<String> = route_set[1..].to_vec();
        routes.push(format!("<{remote_target}>"));
        Ok(Routed {
            request_uri: first_uri,
            routes,
            next_hop: Some(hop),
        })
    }
}

/// Does the URI carry the parameter `name` (before any `?headers`)?
fn has_param(uri: &str, name: &str) -> bool {
    let uri = uri.split('?').next().unwrap_or(uri);
    uri.split(';')
        .skip(1)
        .any(|p| p.split('=').next().unwrap_or("").eq_ignore_ascii_case(name))
}

/// Host, port and transport of a `sip:` URI such as `sip:127.0.0.1:5060;lr;transport=tcp`
/// or `sip:mail@[::1]:5070`.
pub fn parse_hop(uri: &str) -> Result<Hop, RouteError> {
    let rest = uri
        .get(..4)
        .filter(|s| s.eq_ignore_ascii_case("sip:"))
        .map(|_| &uri[4..])
        .ok_or_else(|| RouteError::NotSip(uri.to_string()))?;
    let rest = rest.split('?').next().unwrap_or(rest);
    let mut parts = rest.split(';');
    let userhost = parts.next().unwrap_or("");
    let hostport = userhost.rsplit_once('@').map_or(userhost, |(_, h)| h);
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, r) = h
            .split_once(']')
            .ok_or_else(|| RouteError::NoHost(uri.to_string()))?;
        (h, r.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
    {
        return Err(RouteError::NoHost(uri.to_string()));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| RouteError::BadPort(uri.to_string()))?,
        ),
    };
    let mut transport = None;
    for p in parts {
        if let Some((n, v)) = p.split_once('=')
            && n.eq_ignore_ascii_case("transport")
        {
            transport = Some(match v.to_ascii_lowercase().as_str() {
                "udp" => Transport::Udp,
                "tcp" => Transport::Tcp,
                _ => return Err(RouteError::Transport(uri.to_string(), v.to_string())),
            });
        }
    }
    Ok(Hop {
        host: host.to_string(),
        port,
        transport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{Method, parse_datagram};

    /// A 2xx as it comes back through two record-routing proxies: P2 (nearest the callee)
    /// added its Record-Route last, on top.
    const OK_THROUGH_TWO_PROXIES: &str = "SIP/2.0 200 OK\r\n\
        Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa\r\n\
        Record-Route: <sip:p2.example.net;lr>\r\n\
        Record-Route: <sip:192.0.2.20:5070;lr;transport=tcp>, <sip:p0.example.org:5080>\r\n\
        From: <sip:mail@a.test>;tag=1\r\n\
        To: <sip:mail@b.test>;tag=2\r\n\
        Call-ID: c1\r\n\
        CSeq: 1 INVITE\r\n\
        Contact: <sip:mail@192.0.2.3:5062;transport=tcp>\r\n\
        Content-Length: 0\r\n\r\n";

    fn ok() -> Response {
        match parse_datagram(OK_THROUGH_TWO_PROXIES.as_bytes()).unwrap() {
            crate::sip::SipMessage::Response(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_caller_reverses_record_route_the_callee_keeps_it() {
        let r = ok();
        assert_eq!(
            route_set_uac(&r).unwrap(),
            [
                "<sip:p0.example.org:5080>",
                "<sip:192.0.2.20:5070;lr;transport=tcp>",
                "<sip:p2.example.net;lr>"
            ]
        );
        let mut inv = Request::new(Method::Invite, "sip:mail@b.test");
        for v in r.headers.get_all("Record-Route") {
            inv.headers.push("Record-Route", v);
        }
        assert_eq!(
            route_set_uas(&inv).unwrap(),
            [
                "<sip:p2.example.net;lr>",
                "<sip:192.0.2.20:5070;lr;transport=tcp>",
                "<sip:p0.example.org:5080>"
            ]
        );
        assert_eq!(
            remote_target(r.headers.get("Contact")).as_deref(),
            Some("sip:mail@192.0.2.3:5062;transport=tcp")
        );
    }

    #[test]
    fn a_loose_router_keeps_the_remote_target_as_request_uri() {
        let set = vec![
            "<sip:192.0.2.20:5070;lr;transport=tcp>".to_string(),
            "<sip:p2.example.net;lr>".to_string(),
        ];
        let r = route_request(&set, "sip:mail@192.0.2.3:5062").unwrap();
        assert_eq!(r.request_uri, "sip:mail@192.0.2.3:5062");
        assert_eq!(r.routes, set);
        assert_eq!(
            r.next_hop,
            Some(Hop {
                host: "192.0.2.20".into(),
                port: Some(5070),
                transport: Some(Transport::Tcp)
            })
        );
    }

    #[test]
    fn a_strict_router_gets_its_uri_and_the_target_goes_last() {
        let set = vec![
            "<sip:p0.example.org:5080>".to_string(),
            "<sip:p2.example.net;lr>".to_string(),
        ];
        let r = route_request(&set, "sip:mail@192.0.2.3:5062").unwrap();
        assert_eq!(r.request_uri, "sip:p0.example.org:5080");
        assert_eq!(
            r.routes,
            ["<sip:p2.example.net;lr>", "<sip:mail@192.0.2.3:5062>"]
        );
        assert_eq!(r.next_hop.unwrap().port_or_default(), 5080);
    }

    #[test]
    fn no_route_set_no_route_headers() {
        let r = route_request(&[], "sip:mail@a.test").unwrap();
        assert_eq!(
            r,
            Routed {
                request_uri: "sip:mail@a.test".into(),
                routes: vec![],
                next_hop: None
            }
        );
    }

    #[test]
    fn hops_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_hop("sip:mail@[::1]:5070;lr").unwrap(),
            Hop {
                host: "::1".into(),
                port: Some(5070),
                transport: None
            }
        );
        assert_eq!(
            parse_hop("SIP:proxy.example.net;transport=UDP").unwrap(),
            Hop {
                host: "proxy.example.net".into(),
                port: None,
                transport: Some(Transport::Udp)
            }
        );
        assert!(matches!(
            parse_hop("sips:p.example"),
            Err(RouteError::NotSip(_))
        ));
        assert!(matches!(
            parse_hop("sip:p.example:99999"),
            Err(RouteError::BadPort(_))
        ));
        assert!(matches!(
            parse_hop("sip:p.example;transport=sctp"),
            Err(RouteError::Transport(..))
        ));
        assert!(matches!(parse_hop("sip:;lr"), Err(RouteError::NoHost(_))));
        assert!(matches!(
            parse_hop("sip:a b.example"),
            Err(RouteError::NoHost(_))
        ));
        // A Record-Route that is not a usable hop makes the route set an error, not a
        // request sent somewhere else.
        let mut inv = Request::new(Method::Invite, "sip:mail@b.test");
        inv.headers.push("Record-Route", "<sips:p.example;lr>");
        assert!(route_set_uas(&inv).is_err());
        assert_eq!(remote_target(Some("<tel:+15551234>")), None);
        assert_eq!(remote_target(None), None);
    }
}
