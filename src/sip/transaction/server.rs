//! Server transactions (RFC 3261 §17.2): a request in, its responses out, Timers G, H,
//! I and J, ACK and retransmission absorption, CANCEL (§9.2), and the stateless `503`
//! answers of an overloaded endpoint.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, trace, warn};

use super::{
    Action, Delivery, Dest, DialogKey, Resend, STATELESS_TAG, ServerTxn, Slot, Transactions,
    Transmit, Transport, TxnError, admits, arm, overload_response, server_key,
};
use crate::sip::limits::{RateVerdict, ReplyBudget};
use crate::sip::message::{Method, Request, Response, Via};
use crate::sip::random_hex;
use crate::sip::timer::{RetransmitTimer, TimerAction};

/// What a request that is not an ACK leads to.
enum Admission {
    Resend(Vec<u8>),
    Absorb,
    Reject,
    RateLimited(u32, u64),
    Quiet,
    New,
}

/// How long an ACKed INVITE transaction stays to absorb stray copies (Timer I's length:
/// T4 over UDP, nothing over TCP, whose transport does not duplicate).
fn timer_i(cfg: &super::Config, transport: Transport) -> Duration {
    match transport {
        Transport::Udp => cfg.t4,
        Transport::Tcp => Duration::ZERO,
    }
}

impl<P: Clone> Transactions<P> {
    /// A request from `source`. `path` is how to answer it, `wire_len` its size on the wire
    /// (for the reply budget of UDP sources), `free` the places left in the TU's queue.
    #[allow(clippy::too_many_arguments)]
    pub fn received_request(
        &mut self,
        mut req: Request,
        source: SocketAddr,
        transport: Transport,
        path: P,
        wire_len: usize,
        free: usize,
        now: Instant,
    ) -> Vec<Action<P>> {
        let (mut via, Some(call_id), Ok(cseq)) = (
            match req.headers.top_via() {
                Ok(v) => v,
                Err(e) => {
                    debug!(%source, error = %e, "dropping request with bad Via");
                    return Vec::new();
                }
            },
            req.headers.call_id().map(str::to_string),
            req.headers.cseq(),
        ) else {
            debug!(%source, "dropping request without Call-ID/CSeq");
            return Vec::new();
        };
        // RFC 3261 §18.2.1 received, RFC 3581 rport.
        let src_ip = source.ip().to_string();
        if via.rport == Some(None) {
            via.rport = Some(Some(source.port()));
            via.received = Some(src_ip);
        } else if via.host.trim_start_matches('[').trim_end_matches(']') != src_ip {
            via.received = Some(src_ip);
        }
        req.headers.set_top_via(&via);
        let key = server_key(&req, &via, &req.method);
        let dialog: DialogKey = (call_id, cseq.seq);
        let in_dialog = req.is_in_dialog();
        let delivery = |request: Request, key: String, is_ack: bool| Delivery {
            request,
            source,
            transport,
            path: path.clone(),
            key,
            in_dialog,
            is_ack,
        };

        if req.method == Method::Ack {
            let branch = via.branch.clone().unwrap_or_default();
            if !self.absorb_ack(&req, &key, dialog, branch, transport, now) {
                if admits(in_dialog, free) {
                    return vec![Action::Deliver(delivery(req, key, true))];
                }
                warn!(%source, "incoming queue full or closed: ACK dropped");
            }
            return Vec::new();
        }

        let mut out = Vec::new();
        match self.admit(&req, &key, source, transport, wire_len, in_dialog, now) {
            Admission::Resend(bytes) => {
                debug!(%source, method = %req.method, "retransmitted request: re-sending last response");
                out.push(reply(path, bytes));
            }
            Admission::Absorb => {
                debug!(%source, method = %req.method, "retransmitted request absorbed");
            }
            Admission::Reject => {
                warn!(%source, "too many server transactions: 503");
                let r = overload_response(&req, "too many transactions", self.cfg.retry_after);
                out.push(reply(path, r.to_bytes()));
            }
            Admission::RateLimited(retry_after, suppressed) => {
                warn!(
                    %source,
                    rate = self.cfg.invite_rate,
                    suppressed,
                    "INVITE rate limit exceeded: 503 (at most 5 of these lines a second; \
                     `suppressed` counts the ones not logged)"
                );
                let r = overload_response(&req, "INVITE rate limit", retry_after);
                out.push(reply(path, r.to_bytes()));
            }
            Admission::Quiet => {
                let r = overload_response(&req, "INVITE rate limit", self.cfg.retry_after);
                out.push(reply(path, r.to_bytes()));
            }
            Admission::New => {
                let invite = (req.method == Method::Invite).then(|| {
                    let mut head = req.clone();
                    head.body = Vec::new();
                    (head, path.clone())
                });
                self.servers.insert(
                    key.clone(),
                    ServerTxn {
                        last_response: None,
                        final_status: None,
                        expires: now + self.cfg.proceeding_timeout + self.cfg.t1 * 64,
                        to_tag: random_hex(8),
                        invite,
                        is_invite: req.method == Method::Invite,
                        dialog,
                        source,
                        transport,
                        budget: (transport == Transport::Udp).then(|| ReplyBudget::new(wire_len)),
                        ended: false,
                        resend: None,
                    },
                );
                if req.method == Method::Cancel {
                    self.cancel(req, source, key, path, via, now, &mut out);
                } else if admits(in_dialog, free) {
                    out.push(Action::Deliver(delivery(req, key, false)));
                } else {
                    out.extend(self.undeliverable(&key, &req, source, false, path));
                }
            }
        }
        out
    }

    /// True if the ACK ends here: it confirms our non-2xx (Timer I starts), answers a
    /// stateless 503, or is a retransmission. Otherwise (an ACK for a 2xx) it stops the
    /// 2xx's retransmission and goes to the TU.
    fn absorb_ack(
        &mut self,
        req: &Request,
        key: &str,
        dialog: DialogKey,
        branch: String,
        transport: Transport,
        now: Instant,
    ) -> bool {
        if let Some(txn) = self.servers.get_mut(key)
            && txn.final_status.is_some_and(|s| s >= 300)
        {
            txn.resend = None;
            // Confirmed: Timer I (T4 over UDP, zero over TCP) absorbs further
            // retransmitted ACKs, then the transaction ends.
            txn.expires = txn.expires.min(now + timer_i(&self.cfg, transport));
            trace!("ACK for non-2xx absorbed by its transaction");
            return true;
        }
        let stateless = req
            .headers
            .to()
            .ok()
            .and_then(|t| t.tag().map(|t| t.starts_with(STATELESS_TAG)))
            .unwrap_or(false);
        if stateless {
            trace!("ACK for a stateless 503 absorbed");
            return true;
        }
        let seen_key = (dialog.0.clone(), dialog.1, branch);
        if self.seen_acks.contains_key(&seen_key) {
            trace!("retransmitted ACK absorbed");
            return true;
        }
        if self.seen_acks.len() < self.cfg.max_transactions {
            self.seen_acks.insert(seen_key, now + self.cfg.t1 * 64);
        }
        if let Some(k) = self.ack_index.remove(&dialog)
            && let Some(txn) = self.servers.get_mut(&k)
        {
            txn.resend = None;
            // The caller sent this ACK because our 2xx reached it, and a caller that has
            // a response stops retransmitting its INVITE (Timer A), so the Accepted state
            // (RFC 6026, Timer L: 64*T1) has nothing left to answer. It ends as Timer I
            // ends a non-2xx: after T4 over UDP for a stray copy, at once over TCP, and a
            // copy meanwhile is absorbed. Kept for 32 s, the accepted INVITEs filled the
            // table at a hub taking over 120 calls a second and it answered new calls 503.
            txn.last_response = None;
            txn.expires = txn.expires.min(now + timer_i(&self.cfg, transport));
        }
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        req: &Request,
        key: &str,
        source: SocketAddr,
        transport: Transport,
        wire_len: usize,
        in_dialog: bool,
        now: Instant,
    ) -> Admission {
        let open = self.servers.len();
        if let Some(txn) = self.servers.get_mut(key) {
            return match &txn.last_response {
                Some(bytes) if !txn.ended => {
                    // A retransmitted request earns its source more reply bytes.
                    let allowed = match txn.budget.as_mut() {
                        Some(b) => {
                            b.received(wire_len);
                            b.try_send(bytes.len())
                        }
                        None => true,
                    };
                    if allowed {
                        Admission::Resend(bytes.clone())
                    } else {
                        Admission::Absorb
                    }
                }
                _ => Admission::Absorb,
            };
        }
        if open >= self.cfg.max_transactions {
            return Admission::Reject;
        }
        if req.method != Method::Invite || in_dialog {
            return Admission::New;
        }
        // The peers' exemption holds only over TCP, where the source address is
        // proven; over UDP anyone can send from it.
        let verified = transport == Transport::Tcp;
        match self.invite_limiter.check_source(source.ip(), verified, now) {
            RateVerdict::Allow => Admission::New,
            RateVerdict::Refuse { retry_after } => match self.limit_log.allow(now) {
                Some(suppressed) => Admission::RateLimited(retry_after, suppressed),
                None => Admission::Quiet,
            },
        }
    }

    /// The TU's queue refused a [`Delivery`]: the transaction is dropped and the request
    /// answered `503` (an ACK is only dropped).
    pub fn undeliverable(
        &mut self,
        key: &str,
        request: &Request,
        source: SocketAddr,
        is_ack: bool,
        path: P,
    ) -> Vec<Action<P>> {
        if is_ack {
            warn!(%source, "incoming queue full or closed: ACK dropped");
            return Vec::new();
        }
        warn!(%source, "incoming queue full or closed: 503");
        self.servers.remove(key);
        let r = overload_response(request, "overloaded", self.cfg.retry_after);
        vec![reply(path, r.to_bytes())]
    }

    /// CANCEL (RFC 3261 §9.2): 200 for the CANCEL and 487 for its INVITE if that has
    /// not been answered yet; 481 if there is no such INVITE.
    #[allow(clippy::too_many_arguments)]
    fn cancel(
        &mut self,
        req: Request,
        source: SocketAddr,
        key: String,
        path: P,
        via: Via,
        now: Instant,
        out: &mut Vec<Action<P>>,
    ) {
        let invite_key = server_key(&req, &via, &Method::Invite);
        let found = self
            .servers
            .get(&invite_key)
            .map(|t| (t.final_status.is_some(), t.to_tag.clone(), t.invite.clone()));
        let Some((answered, tag, invite)) = found else {
            debug!(%source, "CANCEL for no known INVITE: 481");
            let r = Response::for_request(&req, 481, "Call/Transaction Does Not Exist");
            out.extend(
                self.send_response(&key, path, r, now)
                    .ok()
                    .map(Action::Transmit),
            );
            return;
        };
        let r = Response::for_request(&req, 200, "OK").with_to_tag(&tag);
        out.extend(
            self.send_response(&key, path, r, now)
                .ok()
                .map(Action::Transmit),
        );
        if answered {
            debug!(%source, "CANCEL after the final response: no effect");
            return;
        }
        let Some((inv, inv_path)) = invite else {
            return;
        };
        let r = Response::for_request(&inv, 487, "Request Terminated").with_to_tag(&tag);
        match self.send_response(&invite_key, inv_path, r, now) {
            Ok(t) => {
                debug!(%source, "INVITE cancelled: 487");
                out.push(Action::Transmit(t));
            }
            Err(e) => debug!(%source, error = %e, "INVITE not cancelled: {e}"),
        }
    }

    /// The TU answers the request of transaction `key` (received on `path`). The
    /// response gets the transaction's To tag and is cached for retransmitted requests;
    /// a final response to INVITE over UDP is retransmitted until the ACK (Timers G, H).
    /// Returns what to send now.
    pub fn send_response(
        &mut self,
        key: &str,
        path: P,
        mut resp: Response,
        now: Instant,
    ) -> Result<Transmit<P>, TxnError> {
        let is_final = resp.status >= 200;
        let Some(txn) = self.servers.get_mut(key) else {
            // Gone (expired or shut down): sent as it is, not cached.
            let bytes = resp.to_bytes();
            if bytes.len() > self.cfg.max_message {
                return Err(TxnError::TooLarge(bytes.len()));
            }
            return Ok(Transmit {
                to: Dest::Path(path),
                bytes,
            });
        };
        if txn.ended {
            return Err(TxnError::Ended);
        }
        if txn.final_status.is_some() {
            return Err(TxnError::AlreadyResponded);
        }
        if resp.status > 100 {
            resp = resp.with_to_tag(&txn.to_tag);
        }
        let bytes = resp.to_bytes();
        if bytes.len() > self.cfg.max_message {
            return Err(TxnError::TooLarge(bytes.len()));
        }
        if let Some(b) = txn.budget.as_mut()
            && !b.try_send(bytes.len())
        {
            return Err(TxnError::ReplyBudget);
        }
        txn.last_response = Some(bytes.clone());
        if is_final {
            txn.final_status = Some(resp.status);
            txn.invite = None;
            // Timer H (INVITE) or J (non-INVITE over UDP); a non-INVITE
            // transaction over TCP ends at once.
            let linger = if !txn.is_invite && txn.transport == Transport::Tcp {
                Duration::ZERO
            } else {
                self.cfg.t1 * 64
            };
            txn.expires = now + linger;
            if txn.is_invite && resp.is_success() {
                self.ack_index.insert(txn.dialog.clone(), key.to_string());
            }
            if txn.is_invite && txn.transport == Transport::Udp {
                let timer = RetransmitTimer::timer_g(now, self.cfg.t1, self.cfg.t2);
                let due = now + self.cfg.t1;
                txn.resend = Some(Resend {
                    timer,
                    bytes: bytes.clone(),
                    dest: txn.source,
                    status: resp.status,
                    due,
                });
                self.timers
                    .push(Reverse((due, Slot::Server(key.to_string()))));
            }
        }
        Ok(Transmit {
            to: Dest::Path(path),
            bytes,
        })
    }

    /// Ends transaction `key` for the TU (an evicted call): nothing more is sent in it,
    /// and a retransmitted request is absorbed.
    pub fn end(&mut self, key: &str) {
        if let Some(t) = self.servers.get_mut(key) {
            t.ended = true;
            t.invite = None;
            t.resend = None;
        }
    }

    /// Timer G or H of server transaction `key`, in the heap under `at`.
    pub(super) fn fire_server(
        &mut self,
        key: String,
        at: Instant,
        now: Instant,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(txn) = self.servers.get_mut(&key) else {
            return;
        };
        let Some(r) = txn.resend.as_mut() else {
            return;
        };
        if r.due != at {
            return;
        }
        loop {
            match r.timer.poll(now) {
                TimerAction::Retransmit => {
                    // Each retransmission is charged to the reply budget; when that is
                    // spent, retransmission stops as if Timer H had fired.
                    let allowed = txn
                        .budget
                        .as_mut()
                        .is_none_or(|b| b.try_send(r.bytes.len()));
                    if !allowed {
                        debug!(dest = %r.dest, status = r.status, "reply budget spent: final response no longer retransmitted");
                        txn.resend = None;
                        return;
                    }
                    trace!(dest = %r.dest, status = r.status, "retransmitting final response");
                    out.push(Action::Transmit(Transmit {
                        to: Dest::Addr(r.dest, Transport::Udp),
                        bytes: r.bytes.clone(),
                    }));
                }
                TimerAction::Expired => {
                    warn!(dest = %r.dest, status = r.status, "no ACK for final response to INVITE before Timer H; giving up");
                    txn.resend = None;
                    return;
                }
                TimerAction::WaitUntil(next) => {
                    arm(&mut self.timers, &mut r.due, next, Slot::Server(key));
                    return;
                }
            }
        }
    }
}

fn reply<P>(path: P, bytes: Vec<u8>) -> Action<P> {
    Action::Transmit(Transmit {
        to: Dest::Path(path),
        bytes,
    })
}
