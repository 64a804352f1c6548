//! The SIP front door: every request the endpoint passes up is answered here or handed
//! on. A new INVITE starts a callee task (holding a pending-call slot until its ACK);
//! in-dialog requests go to their call's task; the rest get their answer here.

use super::callee;
use super::context::{Context, PendingGuard};
use super::sipvocab::{ALLOW, warn_response};
use crate::sip::{Incoming, Method, Request, Response};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Methods that exist (RFC 3261 and its extensions) but that sipmail does not allow:
/// `405 Method Not Allowed`. Anything else is unknown: `501 Not Implemented`.
const KNOWN_METHODS: &[&str] = &[
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

/// Option-tags in `Require` that we do not support: all of them (RFC 3261 §8.2.2.3).
fn unsupported_requires(req: &Request) -> Vec<String> {
    req.headers
        .get_all("Require")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Dispatch incoming SIP requests: new INVITEs start a callee task; in-dialog requests go
/// to their call's task.
pub(crate) async fn sip_loop(shared: Arc<Context>, mut incoming: mpsc::Receiver<Incoming>) {
    let mut calls = tokio::task::JoinSet::new();
    let mut stopping = false;
    loop {
        if stopping && calls.is_empty() {
            break;
        }
        let inc = tokio::select! {
            inc = incoming.recv() => match inc { Some(i) => i, None => break },
            _ = shared.shutdown.wait(), if !stopping => { stopping = true; continue }
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
        };
        let call_id = inc
            .request
            .headers
            .call_id()
            .unwrap_or_default()
            .to_string();
        let in_dialog = inc.request.is_in_dialog();
        // A Request-URI we cannot serve: 416 (RFC 3261 §8.2.2.1).
        let scheme = inc.request.uri.split(':').next().unwrap_or("");
        if !scheme.eq_ignore_ascii_case("sip") && inc.request.method != Method::Ack {
            let r = warn_response(
                &inc.request,
                416,
                "Unsupported URI Scheme",
                "sipmail answers sip: URIs only",
            );
            let _ = inc.respond(r).await;
            continue;
        }
        // We support no extensions: any Require gets 420 (never for ACK or CANCEL).
        if !matches!(inc.request.method, Method::Ack | Method::Cancel) {
            let unsupported = unsupported_requires(&inc.request);
            if !unsupported.is_empty() {
                let mut r = warn_response(
                    &inc.request,
                    420,
                    "Bad Extension",
                    "sipmail supports no SIP extensions",
                );
                r.headers.push("Unsupported", unsupported.join(", "));
                let _ = inc.respond(r).await;
                continue;
            }
        }
        match inc.request.method {
            Method::Invite if !in_dialog && stopping => {
                let mut r = Response::for_request(&inc.request, 503, "Service Unavailable");
                r.headers.push("Retry-After", "60");
                r.headers
                    .push("Warning", "399 sipmail \"relay is shutting down\"");
                let _ = inc.respond(r).await;
            }
            Method::Invite if !in_dialog => {
                // Never refused for lack of room: the oldest un-ACKed call from the same
                // source (or, with the table full, from anywhere) is evicted instead, so
                // spoofed INVITEs cannot hold a partner's slots (issue 11).
                let verified = inc.transport == crate::sip::Transport::Tcp;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let admitted = shared.sip.pending.lock().ok().map(|mut p| {
                    let a = p
                        .calls
                        .start(inc.source.ip(), verified, std::time::Instant::now());
                    p.evict.insert(a.id, tx);
                    let evicted = a.evict.and_then(|e| p.evict.remove(&e.id).map(|s| (e, s)));
                    (a.id, evicted)
                });
                let Some((id, evicted)) = admitted else {
                    let r = warn_response(&inc.request, 503, "Service Unavailable", "overloaded");
                    let _ = inc.respond(r).await;
                    continue;
                };
                if let Some((e, stop)) = evicted {
                    tracing::warn!(source = %inc.source, per_source = e.per_source,
                        "pending calls full: the oldest un-ACKed call is dropped to make room");
                    let _ = stop.send(());
                }
                let guard = PendingGuard::new(shared.clone(), id, rx);
                calls.spawn(callee::handle_invite(shared.clone(), inc, guard));
            }
            Method::Options => {
                let mut r = Response::for_request(&inc.request, 200, "OK");
                r.headers.push("Allow", ALLOW);
                r.headers
                    .push("Accept", "application/sdp, application/sipmail-confirm");
                r.headers.push("Supported", "");
                let _ = inc.respond(r).await;
            }
            Method::Ack | Method::Bye | Method::Invite | Method::Cancel => {
                let tx = shared
                    .sip
                    .dialogs
                    .lock()
                    .ok()
                    .and_then(|d| d.get(&call_id).cloned());
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(Box::new(inc));
                    }
                    None if inc.request.method == Method::Ack => {
                        tracing::debug!(%call_id, "ACK for no known call, absorbed");
                    }
                    None => {
                        let _ = inc
                            .respond(Response::for_request(
                                &inc.request,
                                481,
                                "Call/Transaction Does Not Exist",
                            ))
                            .await;
                    }
                }
            }
            ref m if KNOWN_METHODS.contains(&m.as_str()) => {
                let mut r = Response::for_request(&inc.request, 405, "Method Not Allowed");
                r.headers.push("Allow", ALLOW);
                let _ = inc.respond(r).await;
            }
            _ => {
                let mut r = Response::for_request(&inc.request, 501, "Not Implemented");
                r.headers.push("Allow", ALLOW);
                let _ = inc.respond(r).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_tags_are_all_unsupported() {
        let mut r = Request::new(Method::Invite, "sip:mail@x");
        assert!(unsupported_requires(&r).is_empty());
        r.headers.push("Require", "100rel, timer");
        r.headers.push("Require", "foo");
        assert_eq!(unsupported_requires(&r), vec!["100rel", "timer", "foo"]);
    }
}
