//! Client transactions (RFC 3261 §17.1): the request retransmitted over UDP (Timers A
//! and E), the transaction timeout (B and F), the wait after a provisional response, the
//! ACK of a non-2xx final response to INVITE, and the ACKs we sent, re-sent when their
//! final response is retransmitted.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, trace};

use super::{
    Action, ClientKey, ClientOutcome, ClientTxn, Dest, SentAck, Slot, Transactions, Transmit,
    Transport, TxnError, arm,
};
use crate::sip::message::{Method, Request, Response};
use crate::sip::timer::{RetransmitTimer, TimerAction};

impl<P: Clone> Transactions<P> {
    /// Opens a client transaction for `request` (with our Via on top; `bytes` is its wire
    /// form), which the driver sends once itself right after. Over UDP it is retransmitted
    /// (Timer A for INVITE, E otherwise); either way it times out after 64*T1 (B, F).
    pub fn start_client(
        &mut self,
        key: ClientKey,
        request: &Request,
        bytes: Vec<u8>,
        dest: SocketAddr,
        transport: Transport,
        now: Instant,
    ) -> Result<(), TxnError> {
        if self.clients.len() >= self.cfg.max_transactions {
            return Err(TxnError::TooManyTransactions);
        }
        let is_invite = request.method == Method::Invite;
        let t1 = self.cfg.t1;
        let mut timer = match transport {
            Transport::Udp if is_invite => RetransmitTimer::timer_a(now, t1),
            Transport::Udp => RetransmitTimer::timer_e(now, t1, self.cfg.t2),
            Transport::Tcp => RetransmitTimer::no_retransmit(now, t1 * 64),
        };
        let due = match timer.poll(now) {
            TimerAction::WaitUntil(at) => at,
            _ => now,
        };
        let mut head = request.clone();
        head.body = Vec::new();
        self.timers.push(Reverse((due, Slot::Client(key.clone()))));
        self.clients.insert(
            key,
            ClientTxn {
                request: head,
                bytes,
                dest,
                transport,
                is_invite,
                timer,
                due,
            },
        );
        Ok(())
    }

    /// Forgets client transaction `key` (its caller gave up, or sending failed).
    pub fn abandon_client(&mut self, key: &ClientKey) {
        self.clients.remove(key);
    }

    /// Remembers an ACK we sent for 64*T1, to re-send it if its final response comes
    /// again (keyed by Call-ID and CSeq number).
    pub fn remember_ack(
        &mut self,
        ack: &Request,
        bytes: Vec<u8>,
        dest: SocketAddr,
        transport: Transport,
        now: Instant,
    ) {
        let (Some(call_id), Ok(cseq)) = (ack.headers.call_id(), ack.headers.cseq()) else {
            return;
        };
        if self.acks.len() >= self.cfg.max_transactions {
            return;
        }
        self.acks.insert(
            (call_id.to_string(), cseq.seq),
            SentAck {
                bytes,
                dest,
                transport,
                expires: now + self.cfg.t1 * 64,
            },
        );
    }

    /// A response from `source`: matched to its client transaction by branch and CSeq
    /// method. A provisional one changes the timers; the first final one ends the
    /// transaction (a non-2xx to INVITE is ACKed here, §17.1.1.3). A retransmitted final
    /// response to an INVITE we ACKed gets the ACK again.
    pub fn received_response(
        &mut self,
        resp: Response,
        source: SocketAddr,
        now: Instant,
    ) -> Vec<Action<P>> {
        let (Ok(via), Ok(cseq)) = (resp.headers.top_via(), resp.headers.cseq()) else {
            debug!(%source, "dropping response without usable Via/CSeq");
            return Vec::new();
        };
        let Some(branch) = via.branch else {
            debug!(%source, "dropping response without branch");
            return Vec::new();
        };
        let key: ClientKey = (branch, cseq.method.to_string());
        let mut out = Vec::new();
        if let Some(c) = self.clients.get_mut(&key) {
            if resp.is_provisional() {
                if c.is_invite {
                    c.timer.stop_retransmitting();
                    c.timer.set_deadline(now + self.cfg.proceeding_timeout);
                } else if c.transport == Transport::Udp {
                    c.timer.fixed_interval(now, self.cfg.t2);
                }
                if let TimerAction::WaitUntil(at) = c.timer.poll(now) {
                    arm(&mut self.timers, &mut c.due, at, Slot::Client(key));
                }
                return out;
            }
            let Some(c) = self.clients.remove(&key) else {
                return out;
            };
            if c.is_invite && !resp.is_success() {
                let ack = non2xx_ack(&c.request, &resp);
                let bytes = ack.to_bytes();
                out.push(Action::Transmit(Transmit {
                    to: Dest::Addr(c.dest, c.transport),
                    bytes: bytes.clone(),
                }));
                self.remember_ack(&ack, bytes, c.dest, c.transport, now);
            }
            out.push(Action::ClientDone {
                key,
                outcome: ClientOutcome::Final(resp),
            });
            return out;
        }
        let resend = if cseq.method == Method::Invite && resp.status >= 200 {
            resp.headers
                .call_id()
                .and_then(|cid| self.acks.get(&(cid.to_string(), cseq.seq)))
        } else {
            None
        };
        match resend {
            Some(a) => {
                debug!(%source, status = resp.status, "final response retransmitted: re-sending ACK");
                out.push(Action::Transmit(Transmit {
                    to: Dest::Addr(a.dest, a.transport),
                    bytes: a.bytes.clone(),
                }));
            }
            None => {
                debug!(%source, status = resp.status, "response matches no transaction, dropped")
            }
        }
        out
    }

    /// Timer A/E (retransmit) or B/F (time out) of client transaction `key`.
    pub(super) fn fire_client(
        &mut self,
        key: ClientKey,
        at: Instant,
        now: Instant,
        out: &mut Vec<Action<P>>,
    ) {
        let Some(c) = self.clients.get_mut(&key) else {
            return;
        };
        if c.due != at {
            return;
        }
        loop {
            match c.timer.poll(now) {
                TimerAction::Retransmit => {
                    trace!(dest = %c.dest, method = %c.request.method, "retransmitting request");
                    out.push(Action::Retransmit {
                        key: key.clone(),
                        dest: c.dest,
                        bytes: c.bytes.clone(),
                    });
                }
                TimerAction::Expired => {
                    self.clients.remove(&key);
                    out.push(Action::ClientDone {
                        key,
                        outcome: ClientOutcome::TimedOut,
                    });
                    return;
                }
                TimerAction::WaitUntil(next) => {
                    arm(&mut self.timers, &mut c.due, next, Slot::Client(key));
                    return;
                }
            }
        }
    }
}

/// ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
pub fn non2xx_ack(req: &Request, resp: &Response) -> Request {
    let mut ack = Request::new(Method::Ack, req.uri.clone());
    if let Some(v) = req.headers.via_values().first() {
        ack.headers.push("Via", *v);
    }
    ack.headers.push("Max-Forwards", "70");
    for name in ["From", "Call-ID"] {
        if let Some(v) = req.headers.get(name) {
            ack.headers.push(name, v);
        }
    }
    if let Some(to) = resp.headers.get("To").or(req.headers.get("To")) {
        ack.headers.push("To", to);
    }
    let seq = req.headers.cseq().map(|c| c.seq).unwrap_or(0);
    ack.headers.push("CSeq", format!("{seq} ACK"));
    for r in req.headers.get_all("Route") {
        ack.headers.push("Route", r);
    }
    ack
}
