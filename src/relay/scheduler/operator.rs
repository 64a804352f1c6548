//! The operator's marks on queued messages (`sipmail queue hold|release|expire`), as
//! methods of the scheduler's [`MailQueue`]: the durable mark first (a file in the spool,
//! `crate::queue::Mark`), then the message in memory, then the scheduler is woken.

use super::{Job, MailQueue};
use crate::queue::{Envelope, Mark, RcptState};
use crate::relay::outcome::RcptOutcome;
use std::time::Duration;

impl MailQueue {
    /// The messages an operator's command names (see [`crate::queue::pick`]).
    fn pick(
        &self,
        ids: &[String],
        all: bool,
        fits: impl Fn(&Envelope) -> bool,
    ) -> Result<Vec<String>, String> {
        crate::queue::pick(self.lock().envs.values(), ids, all, fits)
    }

    /// Keep messages from being tried until [`release`](Self::release)d: durable (the
    /// [`Mark::Hold`] file), so a restart keeps them held. A delivery already under way
    /// finishes. Returns how many messages are held.
    pub async fn hold(&self, ids: &[String], all: bool) -> Result<usize, String> {
        let _one = self.marking.lock().await;
        let ids = self.pick(ids, all, |e| !e.held && !e.expired)?;
        for id in &ids {
            if self.lock().envs.get(id).is_some_and(|e| e.expired) {
                return Err(format!("{id} is expired: its bounce is on its way"));
            }
        }
        for id in &ids {
            // In memory first: no attempt starts from now on. A held message is parked
            // by the operator, not waiting for the relay: intake flow control stops
            // counting it (else holding a few hundred new messages would slow all intake).
            {
                let mut st = self.lock();
                if let Some(e) = st.envs.get_mut(id) {
                    e.held = true;
                }
                self.attempted(&mut st, id);
            }
            self.spool
                .set_mark(id, Mark::Hold, true)
                .await
                .map_err(|e| format!("{id}: cannot write its hold mark: {e}"))?;
            tracing::info!(queue_id = %id, "held by the operator");
        }
        Ok(ids.len())
    }

    /// Let held messages go: their pending recipients are due at once.
    pub async fn release(&self, ids: &[String], all: bool) -> Result<usize, String> {
        let _one = self.marking.lock().await;
        let ids = self.pick(ids, all, |e| e.held)?;
        if let Some(id) = ids
            .iter()
            .find(|i| self.lock().envs.get(*i).is_some_and(|e| !e.held))
        {
            return Err(format!("{id} is not held"));
        }
        for id in &ids {
            // On disk first: if that fails, the message stays held everywhere.
            self.spool
                .set_mark(id, Mark::Hold, false)
                .await
                .map_err(|e| format!("{id}: cannot remove its hold mark: {e}"))?;
            self.make_due(id, |e| e.held = false);
            tracing::info!(queue_id = %id, "released by the operator");
        }
        Ok(ids.len())
    }

    /// Give up on messages now: their pending recipients fail as past `queue.max_age`
    /// (4.4.7), the sender gets the same DSN, and the message leaves the queue, all through
    /// the path of a failed attempt. Durable (the [`Mark::Expire`] file): a restart does the
    /// same. A delivery under way finishes first: what it delivers stays delivered.
    /// Returns the messages expired.
    pub async fn expire(&self, ids: &[String], all: bool) -> Result<Vec<String>, String> {
        let _one = self.marking.lock().await;
        let ids = self.pick(ids, all, |e| !e.expired)?;
        for id in &ids {
            let mark = async {
                self.spool.set_mark(id, Mark::Expire, true).await?;
                // A held message is expired too (else a restart would find it held).
                self.spool.set_mark(id, Mark::Hold, false).await
            };
            mark.await
                .map_err(|e| format!("{id}: cannot write its expire mark: {e}"))?;
            self.make_due(id, |e| {
                e.held = false;
                e.expired = true;
            });
            tracing::warn!(queue_id = %id, "expired by the operator: it is returned to the sender");
        }
        Ok(ids)
    }

    /// Change a message, make its pending recipients due now and wake the scheduler.
    fn make_due(&self, id: &str, change: impl FnOnce(&mut Envelope)) {
        {
            let mut st = self.lock();
            let Some(e) = st.envs.get_mut(id) else {
                return;
            };
            change(e);
            for r in e
                .recipients
                .iter_mut()
                .filter(|r| r.state == RcptState::Pending)
            {
                r.next_attempt_ms = 0;
            }
            st.ready.push_back(id.to_string());
        }
        self.notify.notify_one();
    }

    /// How many of `ids` are still queued after up to `wait` (checked every 20 ms).
    pub async fn still_queued(&self, ids: &[String], wait: Duration) -> usize {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let n = {
                let st = self.lock();
                ids.iter().filter(|i| st.envs.contains_key(*i)).count()
            };
            if n == 0 || tokio::time::Instant::now() >= until {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// For a job of an expired message: the outcome that ends it without an attempt
    /// (a transient failure with the recipient's last error, which [`schedule::decide`]
    /// turns into the expiry). None for any other message.
    pub(super) fn expired_outcomes(&self, job: &Job) -> Option<Vec<(String, RcptOutcome)>> {
        let st = self.lock();
        let env = st.envs.get(&job.id).filter(|e| e.expired)?;
        Some(
            job.recipients
                .iter()
                .map(|addr| {
                    let why = env
                        .recipients
                        .iter()
                        .find(|r| &r.addr == addr && r.route == job.route)
                        .and_then(|r| r.last_error.clone())
                        .unwrap_or_else(|| "not tried yet".into());
                    (addr.clone(), RcptOutcome::Transient(why))
                })
                .collect(),
        )
    }
}
