//! The queue scheduler: keeps every queued envelope in memory, hands due work to one
//! worker per route (each peer, and local delivery), and records outcomes durably.

use super::bounce::{Failure, Kind};
use super::{RelayEvent, Shared};
use crate::config::QueueTimes;
use crate::queue::{Envelope, RcptState, Route, Spool, now_ms};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// One delivery attempt for the recipients of one message that share a route.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub id: String,
    pub route: Route,
    pub mail_from: String,
    pub recipients: Vec<String>,
    /// NOTIFY/ORCPT of each recipient, in the same order.
    pub rcpt_params: Vec<crate::smtp::RcptParams>,
    /// SIZE, SMTPUTF8, RET, ENVID.
    pub opts: crate::smtp::MailOptions,
}

impl Job {
    /// The same outcome for every recipient of the job.
    pub fn all(&self, outcome: Outcome) -> Vec<(String, Outcome)> {
        self.recipients
            .iter()
            .map(|r| (r.clone(), outcome.clone()))
            .collect()
    }
}

/// The outcome of a job for one recipient.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Delivered,
    /// Try again later (4xx, failed call, I/O error).
    Transient(String),
    /// Will never work (5xx): RFC 3463 status and the diagnostic for the bounce.
    Permanent {
        status: String,
        diagnostic: String,
        remote: Option<String>,
    },
}

impl State {
    fn release(&mut self, id: &str, route: &Route) {
        if let Some(routes) = self.in_flight.get_mut(id) {
            routes.remove(route);
            if routes.is_empty() {
                self.in_flight.remove(id);
            }
        }
    }
}

struct State {
    envs: HashMap<String, Envelope>,
    /// Routes of each message that a lane is working on. Keyed by queue ID so that the
    /// scheduler's scan looks up without allocating.
    in_flight: HashMap<String, HashSet<Route>>,
    /// Messages that may have work due now: new ones, and those whose route a lane just
    /// released. A round looks at these only, so its cost does not grow with the queue.
    ready: VecDeque<String>,
    /// No pending recipient outside `ready` and `in_flight` is due before this time
    /// (a lower bound; `u64::MAX`: none known). When it passes, a round scans everything.
    timed_next: u64,
    /// The next round scans every envelope (start-up, `retry_now`, a round cut short).
    rescan: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            envs: HashMap::new(),
            in_flight: HashMap::new(),
            ready: VecDeque::new(),
            timed_next: u64::MAX,
            rescan: true,
        }
    }
}

/// Counts for operators and the demo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub messages: usize,
    pub pending_recipients: usize,
    pub in_flight: usize,
}

pub(crate) struct Queue {
    spool: Spool,
    state: Mutex<State>,
    notify: Notify,
    times: QueueTimes,
}

impl Queue {
    pub fn new(spool: Spool, envs: Vec<Envelope>, times: QueueTimes) -> Self {
        let mut st = State::default();
        for e in envs {
            st.envs.insert(e.id.clone(), e);
        }
        Queue {
            spool,
            state: Mutex::new(st),
            notify: Notify::new(),
            times,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still consistent (every
        // mutation is a single insert/remove), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message was committed to the spool.
    pub fn insert(&self, env: Envelope) {
        {
            let mut st = self.lock();
            st.ready.push_back(env.id.clone());
            st.envs.insert(env.id.clone(), env);
        }
        self.notify.notify_one();
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let st = self.lock();
        QueueSnapshot {
            messages: st.envs.len(),
            pending_recipients: st.envs.values().map(|e| e.pending().count()).sum(),
            in_flight: st.in_flight.values().map(HashSet::len).sum(),
        }
    }

    /// Every queued message, oldest first.
    pub fn list(&self) -> Vec<Envelope> {
        let mut v: Vec<Envelope> = self.lock().envs.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn get(&self, id: &str) -> Option<Envelope> {
        self.lock().envs.get(id).cloned()
    }

    /// Make pending recipients due now (one message, or all). Returns how many messages.
    pub fn retry_now(&self, id: Option<&str>) -> usize {
        let mut n = 0;
        {
            let mut st = self.lock();
            for e in st
                .envs
                .values_mut()
                .filter(|e| id.is_none_or(|i| e.id == i))
            {
                for r in e
                    .recipients
                    .iter_mut()
                    .filter(|r| r.state == RcptState::Pending)
                {
                    r.next_attempt_ms = 0;
                }
                n += 1;
            }
            st.rescan = true;
        }
        self.notify.notify_one();
        n
    }

    /// Remove a message for good. A delivery already under way may still complete.
    pub async fn delete(&self, id: &str) -> Result<(), String> {
        if self.lock().envs.remove(id).is_none() {
            return Err(format!("no message {id} in the queue"));
        }
        self.spool
            .remove(id)
            .await
            .map_err(|e| format!("removing {id} from the spool: {e}"))
    }

    /// Jobs due now, marked in flight, and the time of the next due attempt (`Some(0)`:
    /// more is ready now). A round looks only at the messages in `ready`, unless a timed
    /// retry may be due or a rescan was asked for: then it scans every envelope.
    fn take_due(&self, now: u64) -> (Vec<Job>, Option<u64>) {
        let mut st = self.lock();
        let mut jobs = Vec::new();
        let State {
            envs,
            in_flight,
            ready,
            timed_next,
            rescan,
        } = &mut *st;
        let full = *rescan || now >= *timed_next;
        if full {
            let mut next = u64::MAX;
            let mut complete = true;
            for env in envs.values() {
                // A bounded round: the rest is picked up on the next one.
                if jobs.len() >= ROUTE_BACKLOG {
                    complete = false;
                    break;
                }
                due_jobs(env, in_flight.get(&env.id), now, &mut jobs, &mut next);
            }
            if complete {
                // Everything was looked at: what was ready is covered.
                ready.clear();
                *timed_next = next;
            }
            *rescan = !complete;
        } else {
            while jobs.len() < ROUTE_BACKLOG
                && let Some(id) = ready.pop_front()
            {
                if let Some(env) = envs.get(&id) {
                    let mut next = *timed_next;
                    due_jobs(env, in_flight.get(&env.id), now, &mut jobs, &mut next);
                    *timed_next = next;
                }
            }
        }
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        for j in &jobs {
            in_flight
                .entry(j.id.clone())
                .or_default()
                .insert(j.route.clone());
        }
        let next = if *rescan || !ready.is_empty() {
            Some(0)
        } else {
            (*timed_next != u64::MAX).then_some(*timed_next)
        };
        (jobs, next)
    }

    /// A job was built but its route's lanes have a full backlog: release it, and look at
    /// its message again in a later round.
    fn requeue(&self, job: &Job) {
        let mut st = self.lock();
        st.release(&job.id, &job.route);
        st.ready.push_back(job.id.clone());
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.times.retry_initial;
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        (base * factor).min(self.times.retry_max)
    }

    /// Record what happened to a job, durably, and drop the message when nothing is
    /// pending any more.
    pub async fn report(&self, shared: &Shared, job: &Job, outcomes: Vec<(String, Outcome)>) {
        let now = now_ms();
        let mut failures: Vec<Failure> = Vec::new();
        let mut delays: Vec<Failure> = Vec::new();
        let updated = (|| {
            let mut st = self.lock();
            st.release(&job.id, &job.route);
            // None: deleted by an operator meanwhile.
            let env = st.envs.get_mut(&job.id)?;
            let age =
                Duration::from_secs(now / 1000).saturating_sub(Duration::from_secs(env.received));
            for (addr, outcome) in &outcomes {
                let Some(r) = env.recipients.iter_mut().find(|r| {
                    &r.addr == addr && r.route == job.route && r.state == RcptState::Pending
                }) else {
                    continue;
                };
                let failure = match outcome {
                    Outcome::Delivered => {
                        r.state = RcptState::Delivered;
                        r.last_error = None;
                        tracing::info!(queue_id = %job.id, rcpt = %addr, route = %job.route, "delivered");
                        shared.event(RelayEvent::Delivered {
                            id: job.id.clone(),
                            recipient: addr.clone(),
                        });
                        None
                    }
                    Outcome::Transient(why) if age < self.times.max_age => {
                        r.attempts += 1;
                        let wait = self.backoff(r.attempts);
                        r.next_attempt_ms = now + wait.as_millis() as u64;
                        r.last_error = Some(why.clone());
                        if self.times.delay_warning.is_some_and(|d| age >= d)
                            && !r.delay_warned
                            && r.dsn.notify.is_none_or(|n| n.delay)
                        {
                            r.delay_warned = true;
                            delays.push(Failure {
                                rcpt: addr.clone(),
                                status: "4.4.7".into(),
                                diagnostic: format!("X-Sipmail; {why}"),
                                remote: None,
                                orcpt: r.dsn.orcpt.clone(),
                            });
                        }
                        tracing::warn!(queue_id = %job.id, rcpt = %addr, route = %job.route, attempts = r.attempts,
                            retry_in_s = wait.as_secs(), reason = %why, "deferred");
                        None
                    }
                    Outcome::Transient(why) => Some(Failure {
                        rcpt: addr.clone(),
                        status: "4.4.7".into(),
                        diagnostic: format!(
                            "X-Sipmail; gave up after {} hours: {why}",
                            age.as_secs() / 3600
                        ),
                        remote: None,
                        orcpt: r.dsn.orcpt.clone(),
                    }),
                    Outcome::Permanent {
                        status,
                        diagnostic,
                        remote,
                    } => Some(Failure {
                        rcpt: addr.clone(),
                        status: status.clone(),
                        diagnostic: diagnostic.clone(),
                        remote: remote.clone(),
                        orcpt: r.dsn.orcpt.clone(),
                    }),
                };
                if let Some(f) = failure {
                    r.state = RcptState::Failed;
                    r.last_error = Some(f.diagnostic.clone());
                    tracing::error!(queue_id = %job.id, rcpt = %addr, route = %job.route,
                        status = %f.status, reason = %f.diagnostic, "delivery failed for good");
                    shared.event(RelayEvent::Failed {
                        id: job.id.clone(),
                        recipient: addr.clone(),
                        reason: f.diagnostic.clone(),
                    });
                    if r.dsn.wants_failure_dsn() {
                        failures.push(f);
                    } else {
                        tracing::info!(queue_id = %job.id, rcpt = %addr, "no bounce: the sender asked for none (NOTIFY)");
                    }
                }
            }
            let env = env.clone();
            if env.pending().next().is_some() {
                // Its route is free again: look at it in the next round (a retry that is
                // not due yet lowers `timed_next` there).
                st.ready.push_back(job.id.clone());
            }
            Some(env)
        })();
        let Some(updated) = updated else {
            // Deleted by an operator meanwhile.
            self.spool.end_send(&job.id, &job.route).await;
            return;
        };
        // A bounce is queued before the original goes: a crash in between can at worst
        // repeat the bounce, never lose it.
        let bounced = failures.is_empty()
            || super::bounce::send(shared, &updated, &failures, Kind::Failed).await;
        if !delays.is_empty() {
            let until =
                std::time::UNIX_EPOCH + Duration::from_secs(updated.received) + self.times.max_age;
            // A lost warning is not worth keeping anything for: the message stays queued.
            super::bounce::send(shared, &updated, &delays, Kind::Delayed { until }).await;
        }
        let done = updated.pending().next().is_none();
        let res = if done && bounced {
            self.spool.remove_sent(&job.id, &job.route).await
        } else {
            let res = self.spool.update(&updated).await;
            self.spool.end_send(&job.id, &job.route).await;
            res
        };
        if let Err(e) = res {
            tracing::error!(queue_id = %job.id, error = %e, "could not update the spool; the state will be retried from memory");
        }
        if done && bounced {
            self.lock().envs.remove(&job.id);
        }
        self.notify.notify_one();
    }
}

/// The jobs of `env` due at `now` on routes not in flight (one per route); `next` is
/// lowered to the earliest attempt of a pending recipient that is not due yet.
fn due_jobs(
    env: &Envelope,
    flying: Option<&HashSet<Route>>,
    now: u64,
    jobs: &mut Vec<Job>,
    next: &mut u64,
) {
    let mut by_route: Vec<(&Route, Vec<&crate::queue::Recipient>)> = Vec::new();
    for r in env.pending() {
        if flying.is_some_and(|f| f.contains(&r.route)) {
            continue;
        }
        if r.next_attempt_ms <= now {
            match by_route.iter_mut().find(|(route, _)| *route == &r.route) {
                Some((_, v)) => v.push(r),
                None => by_route.push((&r.route, vec![r])),
            }
        } else {
            *next = (*next).min(r.next_attempt_ms);
        }
    }
    for (route, recipients) in by_route {
        jobs.push(Job {
            id: env.id.clone(),
            route: route.clone(),
            mail_from: env.mail_from.clone(),
            rcpt_params: recipients.iter().map(|r| r.dsn.clone()).collect(),
            recipients: recipients.iter().map(|r| r.addr.clone()).collect(),
            opts: crate::smtp::MailOptions {
                size: Some(env.size),
                smtputf8: env.smtputf8,
                ret: env.ret,
                envid: env.envid.clone(),
            },
        });
    }
}

/// The jobs of one route, shared by its lanes: each lane takes the next job when it is
/// free, so a slow message holds up one lane, not the route.
pub(crate) type Jobs = Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>;

/// Wait for the next job of a route (None when the route is closed).
pub(crate) async fn next_job(jobs: &Jobs) -> Option<Job> {
    jobs.lock().await.recv().await
}

/// Jobs handed to a route's lanes and not yet taken, at most.
const ROUTE_BACKLOG: usize = 1024;

/// The scheduler task.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut workers: HashMap<Route, mpsc::Sender<Job>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (jobs, next) = shared.queue.take_due(now_ms());
        for job in jobs {
            let tx = workers.entry(job.route.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(ROUTE_BACKLOG);
                let rx: Jobs = Arc::new(tokio::sync::Mutex::new(rx));
                match &job.route {
                    Route::Local => {
                        for _ in 0..shared.cfg.local_lanes {
                            tasks.spawn(super::local::worker(shared.clone(), rx.clone()));
                        }
                    }
                    Route::Peer(d) => {
                        for lane in 0..shared.cfg.calls_per_peer {
                            tasks.spawn(super::caller::worker(
                                shared.clone(),
                                d.clone(),
                                lane,
                                rx.clone(),
                            ));
                        }
                    }
                }
                tx
            });
            if let Err(e) = tx.try_send(job) {
                // Worker busy with a full backlog: try again on a later round.
                shared.queue.requeue(&e.into_inner());
            }
        }
        let wait = next
            .map(|n| Duration::from_millis(n.saturating_sub(now_ms())))
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        tokio::select! {
            _ = shared.queue.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shared.shutdown.wait() => break,
        }
    }
    // Closing the channels lets each worker finish its current job and hang up.
    drop(workers);
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str, next_attempt_ms: u64) -> Envelope {
        let mut e = crate::queue::tests::env(id);
        e.recipients[0].next_attempt_ms = next_attempt_ms;
        e
    }

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.id.as_str()).collect()
    }

    #[test]
    fn rounds_take_new_messages_timed_retries_and_requeued_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        // Recovered at start-up: one due now, one at t=1000.
        let q = Queue::new(
            spool,
            vec![env("A", 0), env("B", 1000)],
            QueueTimes::default(),
        );
        let (jobs, next) = q.take_due(500);
        assert_eq!(ids(&jobs), ["A"]);
        assert_eq!(next, Some(1000));
        // Nothing new: a round finds nothing, and A is in flight.
        let (jobs, next) = q.take_due(600);
        assert!(jobs.is_empty());
        assert_eq!(next, Some(1000));
        // A new message is taken without waiting for the timed one.
        q.insert(env("C", 0));
        let (jobs, _) = q.take_due(700);
        assert_eq!(ids(&jobs), ["C"]);
        // A job its lanes could not take comes back in the next round.
        q.requeue(&jobs[0]);
        let (jobs, _) = q.take_due(800);
        assert_eq!(ids(&jobs), ["C"]);
        // The timed retry is due: a full scan finds it, not the ones in flight.
        let (jobs, next) = q.take_due(1000);
        assert_eq!(ids(&jobs), ["B"]);
        assert_eq!(next, None);
        // retry_now makes everything pending due at once.
        let _ = q.take_due(1001);
        {
            let mut st = q.lock();
            st.in_flight.clear();
            st.envs.get_mut("B").unwrap().recipients[0].next_attempt_ms = 5000;
        }
        assert_eq!(q.retry_now(None), 3);
        let (jobs, next) = q.take_due(1002);
        assert_eq!(ids(&jobs), ["A", "B", "C"]);
        assert_eq!(next, None);
    }
}
