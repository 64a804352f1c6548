//! Where a recipient's mail goes, as the spool records it: [`Route`], decided when the
//! message is accepted (see `relay::site::Site::route_for`) and kept with the recipient.

use serde::{Deserialize, Serialize};

/// One route of the queue; each gets its own lanes.
///
/// In the envelope files it is a JSON object with a `kind`: `{"kind":"local"}`,
/// `{"kind":"peer","domain":"site-b.test"}` (both as every earlier version wrote them),
/// and `{"kind":"smtp","host":"smarthost.example","port":25}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Repr", from = "Repr")]
pub enum Route {
    /// Our own domain (or a `local` route): the Maildir or the site's MTA.
    Local,
    /// A partner relay, reached by a SIP call; the partner's configured domain.
    Peer(String),
    /// An SMTP next hop (a `smtp:[host]:port` route or the default route).
    Smtp(NextHop),
}

/// An SMTP next hop: a host (a name resolved through the system's resolver, A/AAAA and
/// no MX lookup, or an IP address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NextHop {
    /// A host name (lower case) or an IP address, without brackets.
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]:{}", self.host, self.port)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Local => f.write_str("local"),
            Route::Peer(d) => write!(f, "peer {d}"),
            Route::Smtp(h) => write!(f, "smtp:{h}"),
        }
    }
}

/// The JSON form of [`Route`]. `peer` keeps the `domain` key of the adjacently tagged
/// enum of earlier versions, so their spool files still parse.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
enum Repr {
    Local,
    Peer { domain: String },
    Smtp { host: String, port: u16 },
}

impl From<Route> for Repr {
    fn from(r: Route) -> Repr {
        match r {
            Route::Local => Repr::Local,
            Route::Peer(domain) => Repr::Peer { domain },
            Route::Smtp(NextHop { host, port }) => Repr::Smtp { host, port },
        }
    }
}

impl From<Repr> for Route {
    fn from(r: Repr) -> Route {
        match r {
            Repr::Local => Route::Local,
            Repr::Peer { domain } => Route::Peer(domain),
            Repr::Smtp { host, port } => Route::Smtp(NextHop { host, port }),
        }
    }
}

/// A route as a file-name part: `local`, `peer-<domain>` or `smtp-<host>-<port>`
/// (domain characters only).
pub(super) fn route_key(route: &Route) -> String {
    let clean = |d: &str| -> String {
        d.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
            .collect()
    };
    match route {
        Route::Local => "local".into(),
        Route::Peer(d) => format!("peer-{}", clean(d)),
        Route::Smtp(h) => format!("smtp-{}-{}", clean(&h.host), h.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envelope route fields exactly as earlier versions wrote them (serde's adjacently
    /// tagged enum, `tag = "kind", content = "domain"`) still parse.
    #[test]
    fn routes_of_earlier_spool_files_parse() {
        let local: Route = serde_json::from_str(r#"{"kind":"local"}"#).unwrap();
        assert_eq!(local, Route::Local);
        let peer: Route =
            serde_json::from_str(r#"{"kind":"peer","domain":"site-b.test"}"#).unwrap();
        assert_eq!(peer, Route::Peer("site-b.test".into()));
        // And what this version writes for them is the same text.
        assert_eq!(
            serde_json::to_string(&Route::Local).unwrap(),
            r#"{"kind":"local"}"#
        );
        assert_eq!(
            serde_json::to_string(&peer).unwrap(),
            r#"{"kind":"peer","domain":"site-b.test"}"#
        );
    }

    /// A whole envelope file of an earlier version (before SMTP routes) is read as it was.
    #[test]
    fn envelope_of_an_earlier_version_parses() {
        let old = r#"{"id":"0000018c1a2b3c4d-1-2","received":1700000000,"client":"127.0.0.1:5000",
            "helo":"mta","mail_from":"a@site-a.test","recipients":[
            {"addr":"b@site-b.test","route":{"kind":"peer","domain":"site-b.test"},"state":"pending",
             "attempts":2,"next_attempt_ms":1700000060000,"last_error":"call failed"},
            {"addr":"c@site-a.test","route":{"kind":"local"},"state":"delivered"}],
            "size":42,"body_8bit":false}"#;
        let env: crate::queue::Envelope = serde_json::from_str(old).unwrap();
        assert_eq!(env.recipients[0].route, Route::Peer("site-b.test".into()));
        assert_eq!(env.recipients[0].attempts, 2);
        assert_eq!(env.recipients[1].route, Route::Local);
    }

    #[test]
    fn smtp_route_round_trips_and_names_its_next_hop() {
        let r = Route::Smtp(NextHop {
            host: "smarthost.example".into(),
            port: 2525,
        });
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"smtp","host":"smarthost.example","port":2525}"#
        );
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), r);
        assert_eq!(r.to_string(), "smtp:[smarthost.example]:2525");
        assert_eq!(route_key(&r), "smtp-smarthost.example-2525");
        let v6 = Route::Smtp(NextHop {
            host: "::1".into(),
            port: 25,
        });
        assert_eq!(route_key(&v6), "smtp-1-25");
        assert_eq!(v6.to_string(), "smtp:[::1]:25");
    }

    #[test]
    fn bad_route_json_is_an_error_not_a_panic() {
        for bad in [
            r#"{"kind":"smtp","host":"x"}"#,
            r#"{"kind":"smtp","host":"x","port":70000}"#,
            r#"{"kind":"carrier-pigeon"}"#,
            r#"{"kind":"peer"}"#,
            r#""local""#,
        ] {
            assert!(serde_json::from_str::<Route>(bad).is_err(), "{bad}");
        }
    }
}
