//! One call's SIP dialog, the same for both sides: the requests inside the dialog (ACK,
//! BYE), hanging up, and waiting for the other side's ACK or BYE on the call's channel.

use crate::sip::route::{self, Hop, RouteError, Routed};
use crate::sip::{Endpoint, Incoming, Method, Request, Response, Transport};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a BYE may take before we stop waiting for its answer (Timer F and a margin).
const BYE_WAIT: Duration = Duration::from_secs(35);

/// What stays the same for every request we send in the dialog.
#[derive(Clone, Debug)]
pub(crate) struct Dialog {
    pub call_id: String,
    /// Our From header (with our tag) and the other side's To (with its tag).
    pub from: String,
    pub to: String,
    /// The Request-URI: the remote target (the other side's Contact, else its
    /// `sip:mail@domain`), or a strict router's URI (see [`crate::sip::route`]).
    pub uri: String,
    /// The Route header values (the route set; empty without a record-routing proxy).
    pub routes: Vec<String>,
    /// The next hop: the first route, or without one where the INVITE went (the caller)
    /// or came from (the callee).
    pub target: SocketAddr,
    pub transport: Transport,
    /// Our CSeq for the BYE: the caller's INVITE took 1, the callee has sent nothing yet.
    pub bye_cseq: u32,
}

impl Dialog {
    /// A request inside the dialog.
    pub fn request(&self, method: Method, cseq: u32) -> Request {
        let mut r = Request::new(method.clone(), self.uri.clone());
        for v in &self.routes {
            r.headers.push("Route", v.clone());
        }
        r.headers.push("Max-Forwards", "70");
        r.headers.push("From", self.from.clone());
        r.headers.push("To", self.to.clone());
        r.headers.push("Call-ID", self.call_id.clone());
        r.headers.push("CSeq", format!("{cseq} {method}"));
        r
    }

    /// The BYE, with a `Reason` header when we say why.
    pub fn bye(&self, reason: Option<&str>) -> Request {
        let mut r = self.request(Method::Bye, self.bye_cseq);
        if let Some(text) = reason {
            r.headers
                .push("Reason", super::sipvocab::reason_header(text));
        }
        r
    }
}

/// How the dialog's requests are addressed, from the route set and the remote target
/// (`None`: the other side gave no usable Contact, `fallback` is used, its
/// `sip:mail@domain`). Without a route set, the next hop is the one the INVITE used: a
/// relay's configured partner address (or the address an INVITE came from) stays the
/// only place our in-dialog requests go, as before proxies were supported, rather than a
/// Contact that no signature covers.
pub(crate) fn plan(
    route_set: &[String],
    remote_target: Option<String>,
    fallback: &str,
) -> Result<Routed, RouteError> {
    let target = remote_target.unwrap_or_else(|| fallback.to_string());
    route::route_request(route_set, &target)
}

/// Our Contact: `<sip:mail@ADDR>`, with `;transport=tcp` on a call over TCP so that a
/// proxy forwarding the other side's requests to it keeps the transport.
pub(crate) fn contact(addr: SocketAddr, transport: Transport) -> String {
    match transport {
        Transport::Udp => format!("<sip:mail@{addr}>"),
        Transport::Tcp => format!("<sip:mail@{addr};transport=tcp>"),
    }
}

/// How long resolving a next hop's host name may take.
const HOP_RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// The address and transport of a next hop; `same` (where the INVITE went, or came from)
/// when there is no route set. A route without `transport=` uses UDP (RFC 3263 §4.1), as
/// a record-routing proxy that wants TCP says so (Kamailio does).
pub(crate) async fn resolve_hop(
    hop: Option<&Hop>,
    same: (SocketAddr, Transport),
) -> Result<(SocketAddr, Transport), String> {
    let Some(hop) = hop else { return Ok(same) };
    let port = hop.port_or_default();
    let transport = hop.transport.unwrap_or(Transport::Udp);
    // An IP address is taken as it is by the lookup itself.
    match crate::dns::system::lookup(&hop.host, port, HOP_RESOLVE_WAIT).await {
        Ok(addrs) => addrs
            .into_iter()
            .next()
            .map(|a| (a, transport))
            .ok_or_else(|| format!("route {}: no address", hop.host)),
        Err(e) => Err(format!("route {}: {e}", hop.host)),
    }
}

/// End the dialog. Best effort: a BYE that gets no answer is logged, nothing more.
pub(crate) async fn hang_up(endpoint: &Endpoint, d: &Dialog, reason: Option<&str>) {
    match tokio::time::timeout(
        BYE_WAIT,
        endpoint.request(d.bye(reason), d.target, d.transport),
    )
    .await
    {
        Ok(Ok(Response { status, .. })) if (200..300).contains(&status) => {}
        Ok(Ok(r)) => {
            tracing::debug!(call_id = %d.call_id, status = r.status, "BYE answered with an error")
        }
        Ok(Err(e)) => tracing::debug!(call_id = %d.call_id, error = %e, "BYE failed"),
        Err(_) => tracing::debug!(call_id = %d.call_id, "BYE timed out"),
    }
}

/// As [`hang_up`], in the background: a peer that never answers the BYE must not hold up
/// the call's task, the mail queue or shutdown.
pub(crate) fn hang_up_in_background(endpoint: &Endpoint, d: &Dialog, reason: Option<&str>) {
    let (endpoint, d, reason) = (endpoint.clone(), d.clone(), reason.map(str::to_string));
    tokio::spawn(async move { hang_up(&endpoint, &d, reason.as_deref()).await });
}

/// The other side's requests that matter while we wait.
#[derive(Debug)]
pub(crate) enum InDialog {
    Ack(Box<Incoming>),
    /// A BYE, already answered `200 OK`.
    Bye,
}

/// How to answer the other in-dialog requests (a re-INVITE, a CANCEL) while we wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Others {
    Answer(u16, &'static str),
    /// Leave them unanswered (their transactions time out).
    Ignore,
}

/// Handle one in-dialog request: a BYE is answered `200 OK`, an ACK handed back, anything
/// else answered as `others` says (None: keep waiting).
pub(crate) async fn on_request(i: Incoming, others: Others) -> Option<InDialog> {
    match i.request.method {
        Method::Ack => Some(InDialog::Ack(Box::new(i))),
        Method::Bye => {
            let _ = i
                .respond(Response::for_request(&i.request, 200, "OK"))
                .await;
            Some(InDialog::Bye)
        }
        _ => {
            if let Others::Answer(status, reason) = others {
                let _ = i
                    .respond(Response::for_request(&i.request, status, reason))
                    .await;
            }
            None
        }
    }
}

/// The next ACK or BYE on the call's channel; None once it is closed.
pub(crate) async fn next_ack_or_bye(
    rx: &mut mpsc::Receiver<Box<Incoming>>,
    others: Others,
) -> Option<InDialog> {
    while let Some(i) = rx.recv().await {
        if let Some(e) = on_request(*i, others).await {
            return Some(e);
        }
    }
    None
}

/// Wait for the BYE (answered `200 OK`), passing over ACKs: true once it came, false if the
/// channel closed first.
pub(crate) async fn wait_for_bye(rx: &mut mpsc::Receiver<Box<Incoming>>, others: Others) -> bool {
    loop {
        match next_ack_or_bye(rx, others).await {
            Some(InDialog::Ack(_)) => {}
            Some(InDialog::Bye) => return true,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::sipvocab::warn_response;

    fn invite() -> Request {
        let mut r = Request::new(Method::Invite, "sip:mail@b.test");
        r.headers
            .push("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx");
        r.headers.push("From", "<sip:mail@a.test>;tag=1");
        r.headers.push("To", "<sip:mail@b.test>");
        r.headers.push("Call-ID", "c1");
        r.headers.push("CSeq", "1 INVITE");
        r
    }

    #[test]
    fn the_warning_response_is_byte_for_byte_what_it_was() {
        let r = warn_response(&invite(), 403, "Forbidden", "say \"no\"\\\r\nnow");
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "SIP/2.0 403 Forbidden\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx\r\n\
             From: <sip:mail@a.test>;tag=1\r\n\
             To: <sip:mail@b.test>\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 INVITE\r\n\
             Warning: 399 sipmail \"say  no    now\"\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    fn dialog(bye_cseq: u32) -> Dialog {
        Dialog {
            call_id: "c1".into(),
            from: "<sip:mail@b.test>;tag=t2".into(),
            to: "<sip:mail@a.test>;tag=t1".into(),
            uri: "sip:mail@a.test".into(),
            routes: vec![],
            target: "192.0.2.1:5060".parse().unwrap(),
            transport: Transport::Udp,
            bye_cseq,
        }
    }

    #[test]
    fn bye_carries_the_dialog_and_the_reason() {
        let b = dialog(1).bye(Some("no \"media\""));
        assert_eq!(
            String::from_utf8(b.to_bytes()).unwrap(),
            "BYE sip:mail@a.test SIP/2.0\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:mail@b.test>;tag=t2\r\n\
             To: <sip:mail@a.test>;tag=t1\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 BYE\r\n\
             Reason: SIP;cause=488;text=\"no  media \"\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let b = dialog(2).bye(None);
        assert_eq!(b.headers.get("CSeq"), Some("2 BYE"));
        assert_eq!(b.headers.get("Reason"), None);
    }

    /// A 200 OK that came back through one record-routing proxy (Kamailio over TCP).
    fn ok_via_proxy() -> Response {
        let raw = "SIP/2.0 200 OK\r\n\
            Via: SIP/2.0/TCP 127.0.43.2:43061;branch=z9hG4bKa;rport=40000\r\n\
            Record-Route: <sip:127.0.43.1:43060;transport=tcp;lr>\r\n\
            From: <sip:mail@a.test>;tag=t1\r\n\
            To: <sip:mail@b.test>;tag=t2\r\n\
            Call-ID: c1\r\n\
            CSeq: 1 INVITE\r\n\
            Contact: <sip:mail@127.0.43.3:43062;transport=tcp>\r\n\
            Content-Length: 0\r\n\r\n";
        match crate::sip::parse_stream(raw.as_bytes()).unwrap() {
            Some((crate::sip::SipMessage::Response(r), _)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_callers_ack_and_bye_go_through_the_proxy_to_the_contact() {
        let ok = ok_via_proxy();
        let set = route::route_set_uac(&ok).unwrap();
        let p = plan(
            &set,
            route::remote_target(ok.headers.get("Contact")),
            "sip:mail@b.test",
        )
        .unwrap();
        let invite_went_to: SocketAddr = "127.0.43.1:43060".parse().unwrap();
        let (target, transport) =
            resolve_hop(p.next_hop.as_ref(), (invite_went_to, Transport::Tcp))
                .await
                .unwrap();
        assert_eq!((target, transport), (invite_went_to, Transport::Tcp));
        let d = Dialog {
            call_id: "c1".into(),
            from: "<sip:mail@a.test>;tag=t1".into(),
            to: "<sip:mail@b.test>;tag=t2".into(),
            uri: p.request_uri,
            routes: p.routes,
            target,
            transport,
            bye_cseq: 2,
        };
        assert_eq!(
            String::from_utf8(d.request(Method::Ack, 1).to_bytes()).unwrap(),
            "ACK sip:mail@127.0.43.3:43062;transport=tcp SIP/2.0\r\n\
             Route: <sip:127.0.43.1:43060;transport=tcp;lr>\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:mail@a.test>;tag=t1\r\n\
             To: <sip:mail@b.test>;tag=t2\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 ACK\r\n\
             Content-Length: 0\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8(d.bye(None).to_bytes()).unwrap(),
            "BYE sip:mail@127.0.43.3:43062;transport=tcp SIP/2.0\r\n\
             Route: <sip:127.0.43.1:43060;transport=tcp;lr>\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:mail@a.test>;tag=t1\r\n\
             To: <sip:mail@b.test>;tag=t2\r\n\
             Call-ID: c1\r\n\
             CSeq: 2 BYE\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn the_callees_bye_uses_its_route_set_and_the_callers_contact() {
        let mut inv = invite();
        inv.headers
            .push("Record-Route", "<sip:127.0.43.1:43060;lr>");
        inv.headers.push("Record-Route", "<sip:127.0.43.9:5060;lr>");
        inv.headers.push("Contact", "<sip:mail@127.0.43.2:43061>");
        let set = route::route_set_uas(&inv).unwrap();
        let p = plan(
            &set,
            route::remote_target(inv.headers.get("Contact")),
            "sip:mail@a.test",
        )
        .unwrap();
        // The INVITE came from the proxy's TCP connection; the route says UDP.
        let source: SocketAddr = "127.0.43.1:51000".parse().unwrap();
        let hop = resolve_hop(p.next_hop.as_ref(), (source, Transport::Tcp))
            .await
            .unwrap();
        assert_eq!(hop, ("127.0.43.1:43060".parse().unwrap(), Transport::Udp));
        let d = Dialog {
            call_id: "c1".into(),
            from: "<sip:mail@b.test>;tag=t2".into(),
            to: "<sip:mail@a.test>;tag=1".into(),
            uri: p.request_uri,
            routes: p.routes,
            target: hop.0,
            transport: hop.1,
            bye_cseq: 1,
        };
        assert_eq!(
            String::from_utf8(d.bye(Some("no media")).to_bytes()).unwrap(),
            "BYE sip:mail@127.0.43.2:43061 SIP/2.0\r\n\
             Route: <sip:127.0.43.1:43060;lr>\r\n\
             Route: <sip:127.0.43.9:5060;lr>\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:mail@b.test>;tag=t2\r\n\
             To: <sip:mail@a.test>;tag=1\r\n\
             Call-ID: c1\r\n\
             CSeq: 1 BYE\r\n\
             Reason: SIP;cause=488;text=\"no media\"\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn without_a_proxy_requests_go_where_the_invite_went() {
        let p = plan(&[], None, "sip:mail@b.test").unwrap();
        assert_eq!(p.request_uri, "sip:mail@b.test");
        assert!(p.routes.is_empty());
        let same: SocketAddr = "192.0.2.7:5062".parse().unwrap();
        assert_eq!(
            resolve_hop(p.next_hop.as_ref(), (same, Transport::Udp))
                .await
                .unwrap(),
            (same, Transport::Udp)
        );
    }
}
