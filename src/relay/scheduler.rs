//! The queue scheduler: keeps every queued envelope in memory, hands due work to the
//! lanes of each route (each peer, and local delivery), and commits what the lanes report:
//! the rules are in [`super::schedule`], this file does the I/O (spool, DSNs, events).

use super::bounce;
use super::events::{Events, RelayEvent, Shutdown};
use super::jobs::{Lane, Report, RouteJobs};
use super::outcome::{Job, route_label};
use super::schedule::{self, Disposal, DsnKind, Step};
use super::settings::Live;
use super::site::Site;
use crate::config::QueueTimes;
use crate::metrics::Metrics;
use crate::queue::{Envelope, RcptState, Route, Spool, now_ms};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

mod operator;

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
    /// Messages taken in by this process whose first delivery attempt has not been
    /// reported yet: what intake flow control counts ([`MailQueue::admit`]).
    unattempted: HashSet<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            envs: HashMap::new(),
            in_flight: HashMap::new(),
            ready: VecDeque::new(),
            timed_next: u64::MAX,
            rescan: true,
            unattempted: HashSet::new(),
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

/// The queue in memory, shared by the scheduler, the SMTP servers that insert into it,
/// the control socket and the commits of reports.
pub(crate) struct MailQueue {
    spool: Spool,
    state: Mutex<State>,
    notify: Notify,
    /// Changed by a reload ([`MailQueue::reconfigure`]); a commit uses one snapshot.
    times: Live<QueueTimes>,
    /// For the DSNs: our host name, and where the sender's mail goes (changed by a reload).
    site: Live<Site>,
    events: Events,
    /// Serialises the operator's hold, release and expire (each sets marks in turn).
    marking: tokio::sync::Mutex<()>,
    /// One new transaction waiting in [`MailQueue::admit`] is woken for each message that
    /// leaves the unattempted set.
    drained: Notify,
    /// Accepted, delivered, deferred and bounced recipients per route.
    metrics: Arc<Metrics>,
}

/// One route's share of the queue (see [`MailQueue::route_stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteStats {
    pub route: Route,
    /// Messages with a pending recipient on this route.
    pub messages: u64,
    /// When the oldest of them was received (unix seconds).
    pub oldest_received: u64,
}

impl MailQueue {
    pub fn new(
        spool: Spool,
        envs: Vec<Envelope>,
        times: QueueTimes,
        site: Site,
        events: Events,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut st = State::default();
        for e in envs {
            st.envs.insert(e.id.clone(), e);
        }
        MailQueue {
            spool,
            state: Mutex::new(st),
            notify: Notify::new(),
            times: Live::new(times),
            site: Live::new(site),
            events,
            marking: tokio::sync::Mutex::new(()),
            drained: Notify::new(),
            metrics,
        }
    }

    /// A reload's new queue times and partners: commits and DSNs from now on use them.
    pub fn reconfigure(&self, times: QueueTimes, site: Site) {
        self.times.set(times);
        self.site.set(site);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still consistent (every
        // mutation is a single insert/remove), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message was committed to the spool (from SMTP, or a DSN of ours).
    pub fn insert(&self, env: Envelope) {
        for r in env.pending() {
            self.metrics.accepted(route_label(&r.route), 1);
        }
        {
            let mut st = self.lock();
            st.ready.push_back(env.id.clone());
            st.unattempted.insert(env.id.clone());
            st.envs.insert(env.id.clone(), env);
        }
        self.notify.notify_one();
    }

    /// Intake flow control, as Postfix's `in_flow_delay`: a new mail transaction waits
    /// while [`FLOW_LIMIT`] or more messages taken in have not had a first delivery
    /// attempt yet, for [`FLOW_DELAY`] at most, and then goes ahead all the same (so a
    /// stalled route slows intake down but never stops it). Without it, many sessions
    /// (200 in `integration/bench.sh`) took messages in faster than the relay sent them
    /// on: the queue grew by thousands, every new message cost new spool inodes instead
    /// of recycled ones, and sending fell behind until intake was over (docs/PERFORMANCE.md,
    /// run 15). Returns how long the transaction waited.
    pub async fn admit(&self) -> Duration {
        if self.lock().unattempted.len() < FLOW_LIMIT {
            return Duration::ZERO;
        }
        let start = tokio::time::Instant::now();
        let deadline = start + FLOW_DELAY;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the count is read again: a message leaving in between
            // still wakes this wait.
            drained.as_mut().enable();
            if self.lock().unattempted.len() < FLOW_LIMIT
                || tokio::time::timeout_at(deadline, drained).await.is_err()
            {
                return start.elapsed();
            }
        }
    }

    /// `id` had its first attempt (or is gone): one waiting transaction looks again.
    fn attempted(&self, st: &mut State, id: &str) {
        if st.unattempted.remove(id) {
            self.drained.notify_one();
        }
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let st = self.lock();
        QueueSnapshot {
            messages: st.envs.len(),
            pending_recipients: st.envs.values().map(|e| e.pending().count()).sum(),
            in_flight: st.in_flight.values().map(HashSet::len).sum(),
        }
    }

    /// Per route: how many messages wait with a pending recipient on it, and when the
    /// oldest of them was received.
    pub fn route_stats(&self) -> Vec<RouteStats> {
        let st = self.lock();
        let mut out: Vec<RouteStats> = Vec::new();
        for env in st.envs.values() {
            let mut seen: Vec<&Route> = Vec::new();
            for r in env.pending() {
                if seen.contains(&&r.route) {
                    continue;
                }
                seen.push(&r.route);
                match out.iter_mut().find(|s| s.route == r.route) {
                    Some(s) => {
                        s.messages += 1;
                        s.oldest_received = s.oldest_received.min(env.received);
                    }
                    None => out.push(RouteStats {
                        route: r.route.clone(),
                        messages: 1,
                        oldest_received: env.received,
                    }),
                }
            }
        }
        out
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

    /// Take back a message whose commit failed after [`insert`](Self::insert) (an
    /// intake that hands a message over while its flushes run): it is forgotten, and
    /// whether a lane had taken it (or already finished with it) is returned, since such
    /// a hand-off may still complete (`true`: a lane was handing it over, or had done so
    /// already; `false`: nothing of it left the relay).
    pub fn withdraw(&self, id: &str) -> bool {
        let mut st = self.lock();
        let known = st.envs.remove(id).is_some();
        self.attempted(&mut st, id);
        !known || st.in_flight.contains_key(id)
    }

    /// Remove a message for good. A delivery already under way may still complete.
    pub async fn delete(&self, id: &str) -> Result<(), String> {
        {
            let mut st = self.lock();
            if st.envs.remove(id).is_none() {
                return Err(format!("no message {id} in the queue"));
            }
            self.attempted(&mut st, id);
        }
        self.spool
            .remove(id)
            .await
            .map_err(|e| format!("removing {id} from the spool: {e}"))
    }

    /// Jobs due now, marked in flight, and the time of the next due attempt (`Some(0)`:
    /// more is ready now). A round looks only at the messages in `ready`, unless a timed
    /// retry may be due or a rescan was asked for: then it scans every envelope. A job is
    /// built only where `room` says its route's lanes can take it; a message whose route
    /// is full stays in `ready`, unbuilt (see [`Room`]).
    fn take_due(&self, now: u64, mut room: Room) -> (Vec<Job>, Option<u64>) {
        let mut st = self.lock();
        let mut jobs = Vec::new();
        let mut blocked = Vec::new();
        let State {
            envs,
            in_flight,
            ready,
            timed_next,
            rescan,
            ..
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
                if due_jobs(
                    env,
                    in_flight.get(&env.id),
                    now,
                    &mut room,
                    &mut jobs,
                    &mut next,
                ) {
                    blocked.push(env.id.clone());
                }
            }
            if complete {
                // Everything was looked at: what is ready now is what found its route full.
                ready.clear();
                ready.extend(blocked);
                *timed_next = next;
            }
            *rescan = !complete;
        } else {
            // Each message looked at costs a little even when its route is full: look at
            // as many as the lanes can take, and a few more (a message for another route,
            // or one whose route has no lanes yet, is reached as `ready` turns).
            let mut budget = room.known() + ROUND_SPARE;
            while budget > 0
                && jobs.len() < ROUTE_BACKLOG
                && let Some(id) = ready.pop_front()
            {
                budget -= 1;
                if let Some(env) = envs.get(&id) {
                    let mut next = *timed_next;
                    if due_jobs(
                        env,
                        in_flight.get(&env.id),
                        now,
                        &mut room,
                        &mut jobs,
                        &mut next,
                    ) {
                        blocked.push(id);
                    }
                    *timed_next = next;
                }
            }
            // To the back: the messages behind them get their turn.
            ready.extend(blocked);
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

    /// Record what a lane reported, durably (see [`schedule::decide`] for the rules), and
    /// drop the message when nothing is pending any more.
    /// Apply a lane's report (or a replayed one, see [`handed_job`](Self::handed_job)).
    pub(crate) async fn commit(
        &self,
        job: &Job,
        outcomes: &[(String, super::outcome::RcptOutcome)],
        call_id: Option<&str>,
    ) {
        let now = now_ms();
        let times = self.times.get();
        let decided = {
            let mut st = self.lock();
            st.release(&job.id, &job.route);
            self.attempted(&mut st, &job.id);
            // None: deleted by an operator meanwhile.
            let decided = st.envs.get_mut(&job.id).map(|env| {
                let d = schedule::decide(env, &job.route, outcomes, now, &times);
                *env = d.envelope.clone();
                d
            });
            if decided.as_ref().is_some_and(|d| !d.done()) {
                // Its route is free again: look at it in the next round (a retry that is
                // not due yet lowers `timed_next` there).
                st.ready.push_back(job.id.clone());
            }
            decided
        };
        let Some(d) = decided else {
            self.spool.end_send(&job.id, &job.route);
            return;
        };
        for step in &d.steps {
            self.log_step(job, call_id, step);
        }
        let updated = &d.envelope;
        let bounced =
            d.failed_dsn.is_empty() || self.dsn(updated, &d.failed_dsn, DsnKind::Failed).await;
        if let Some((delays, until)) = &d.delayed_dsn {
            // A lost warning is not worth keeping anything for: the message stays queued.
            self.dsn(updated, delays, DsnKind::Delayed { until: *until })
                .await;
        }
        let disposal = d.disposal(bounced);
        let res = match disposal {
            Disposal::Remove => self.spool.remove_sent(&job.id, &job.route),
            Disposal::Keep => {
                let res = self.spool.update(updated).await;
                self.spool.end_send(&job.id, &job.route);
                res
            }
        };
        if let Err(e) = res {
            tracing::error!(queue_id = %job.id, error = %e, "could not update the spool; the state will be retried from memory");
        }
        if disposal == Disposal::Remove {
            let marked = self
                .lock()
                .envs
                .remove(&job.id)
                .is_some_and(|e| e.held || e.expired);
            if marked {
                self.spool.clear_marks(&job.id).await;
            }
        }
        self.notify.notify_one();
    }

    /// A hand-off the last process recorded (`.sending` marker) but did not live to
    /// report: the job and outcomes to commit now, as its report would have. `None` when
    /// the message or those recipients are no longer pending on that route.
    pub fn handed_job(
        &self,
        h: &crate::queue::Handed,
    ) -> Option<(Job, Vec<(String, super::outcome::RcptOutcome)>)> {
        self.replayed_job(
            &h.id,
            &h.route,
            |r| h.delivered.iter().any(|d| d == r),
            || super::outcome::RcptOutcome::Delivered,
        )
    }

    /// A transaction with a partner relay the last process did not live to finish
    /// (`.sending` marker naming the relay): its outcome, to commit now, is "unconfirmed at
    /// that relay", so the message is pinned to it (see `crate::queue::RelayPin`).
    pub fn interrupted_job(
        &self,
        i: &crate::queue::Interrupted,
    ) -> Option<(Job, Vec<(String, super::outcome::RcptOutcome)>)> {
        self.replayed_job(
            &i.id,
            &i.route,
            |_| true,
            || super::outcome::RcptOutcome::Unconfirmed {
                reason: "sipmail stopped during the transaction".into(),
                relay: i.relay.clone(),
            },
        )
    }

    /// The job of the recipients of `id` pending on `route` that `pick` takes, each with
    /// the outcome `outcome` makes; `None` when there are none.
    fn replayed_job(
        &self,
        id: &str,
        route: &Route,
        pick: impl Fn(&str) -> bool,
        outcome: impl Fn() -> super::outcome::RcptOutcome,
    ) -> Option<(Job, Vec<(String, super::outcome::RcptOutcome)>)> {
        let st = self.lock();
        let env = st.envs.get(id)?;
        let rcpts: Vec<&crate::queue::Recipient> = env
            .pending()
            .filter(|r| &r.route == route && pick(&r.addr))
            .collect();
        if rcpts.is_empty() {
            return None;
        }
        let job = job_for(env, route, &rcpts);
        let outcomes = rcpts.iter().map(|r| (r.addr.clone(), outcome())).collect();
        Some((job, outcomes))
    }

    /// The log line and event of one recipient's step: with the queue ID, the recipient,
    /// and for a partner's route the peer and the call that carried the attempt.
    fn log_step(&self, job: &Job, call_id: Option<&str>, step: &Step) {
        let peer = match &job.route {
            Route::Peer(d) => Some(d.as_str()),
            Route::Local | Route::Smtp(_) => None,
        };
        match step {
            Step::Delivered { rcpt } => {
                tracing::info!(queue_id = %job.id, %rcpt, route = %job.route, peer, call_id, "delivered");
                self.metrics.delivered(route_label(&job.route));
                self.events.emit(RelayEvent::Delivered {
                    id: job.id.clone(),
                    recipient: rcpt.clone(),
                });
            }
            Step::Deferred {
                rcpt,
                attempts,
                retry_in,
                reason,
            } => {
                tracing::warn!(queue_id = %job.id, %rcpt, route = %job.route, peer, call_id,
                    attempts, retry_in_s = retry_in.as_secs(), %reason, "deferred");
                self.metrics.deferred(route_label(&job.route));
            }
            Step::Failed { failure: f, bounce } => {
                tracing::error!(queue_id = %job.id, rcpt = %f.rcpt, route = %job.route, peer,
                    call_id, status = %f.status, reason = %f.diagnostic, "delivery failed for good");
                self.metrics.bounced(route_label(&job.route));
                self.events.emit(RelayEvent::Failed {
                    id: job.id.clone(),
                    recipient: f.rcpt.clone(),
                    reason: f.diagnostic.clone(),
                });
                if !bounce {
                    tracing::info!(queue_id = %job.id, rcpt = %f.rcpt, "no bounce: the sender asked for none (NOTIFY)");
                }
            }
        }
    }

    /// Queue a DSN about `original`; false if it could not be queued.
    async fn dsn(
        &self,
        original: &Envelope,
        failures: &[schedule::Failure],
        kind: DsnKind,
    ) -> bool {
        let site = self.site.get();
        match bounce::queue(&self.spool, &site, original, failures, kind).await {
            bounce::Queued::Yes(env) => {
                self.insert(*env);
                true
            }
            bounce::Queued::NotNeeded => true,
            bounce::Queued::Failed => false,
        }
    }
}

/// Adds the jobs of `env` due at `now` on routes not in flight (one per route) whose route
/// has room (taking it); `next` is lowered to the earliest attempt of a pending recipient
/// that is not due yet. Returns whether a due route had no room (the message must be
/// looked at again).
fn due_jobs(
    env: &Envelope,
    flying: Option<&HashSet<Route>>,
    now: u64,
    room: &mut Room,
    jobs: &mut Vec<Job>,
    next: &mut u64,
) -> bool {
    if env.held {
        // Not tried, and no timed retry either, until the operator releases it.
        return false;
    }
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
    let mut blocked = false;
    for (route, recipients) in by_route {
        if room.take(route) {
            jobs.push(job_for(env, route, &recipients));
        } else {
            blocked = true;
        }
    }
    blocked
}

/// How many more jobs each route's lanes can take this round (`RouteJobs::room`, read
/// before the round). A route not listed has no lanes yet: they start with its first job,
/// and take up to a backlog's worth.
///
/// Why: with a deep queue (a burst from many sessions), the backlog of the busy route is
/// full. A round used to build a job for every ready message anyway, fail to hand it
/// over, and put it back; rounds come with every message and every report, so the
/// scheduler's work grew with the queue's depth for each message (issue 16: the
/// 200-session point fell to 70-80% of the peak).
#[derive(Debug, Default)]
pub(crate) struct Room(HashMap<Route, usize>);

/// Messages a round looks at beyond the room its known routes have.
const ROUND_SPARE: usize = 8;

impl Room {
    pub(crate) fn new(routes: impl IntoIterator<Item = (Route, usize)>) -> Room {
        Room(routes.into_iter().collect())
    }

    fn take(&mut self, route: &Route) -> bool {
        let left = match self.0.get_mut(route) {
            Some(left) => left,
            None => self.0.entry(route.clone()).or_insert(ROUTE_BACKLOG),
        };
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// The room of the routes that have lanes.
    fn known(&self) -> usize {
        self.0.values().sum()
    }
}

/// The job that delivers `recipients` of `env` over `route`.
fn job_for(env: &Envelope, route: &Route, recipients: &[&crate::queue::Recipient]) -> Job {
    Job {
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
            // A partner that offers receipts returns one for this ID (the worker
            // drops it where receipts cannot be verified).
            xqid: matches!(route, crate::queue::Route::Peer(_)).then(|| env.id.clone()),
        },
        from_peer: env.receipt.as_ref().map(|f| f.peer.clone()),
        // The attempt goes to the relay that may hold the message (see `caller`).
        pin: recipients.iter().find_map(|r| r.pin.clone()),
        decoded: env.decoded.clone(),
        dedup_key_file: env.receipt.as_ref().map(|f| {
            crate::receipt::DedupKey::new(&f.peer, &f.sender_queue_id, &f.message_sha256)
                .file_name()
        }),
    }
}

/// Jobs handed to a route's lanes and not yet taken, at most.
const ROUTE_BACKLOG: usize = 1024;

/// Messages taken in and not yet attempted beyond which a new transaction waits
/// ([`MailQueue::admit`]): far more than the lanes work on at once (a few calls per
/// partner, each one message at a time), so that they never run dry, and few enough that
/// the spool's files of finished messages (up to 1,024 kept for reuse) cover the queue.
pub(crate) const FLOW_LIMIT: usize = 256;

/// The longest a transaction waits in [`MailQueue::admit`] (Postfix's `in_flow_delay`).
pub(crate) const FLOW_DELAY: Duration = Duration::from_secs(1);

/// Lanes per route: the scheduler's share of the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LaneCounts {
    /// Local deliveries at once.
    pub local: usize,
    /// Calls at once to one peer.
    pub per_peer: usize,
    /// Connections at once to one SMTP next hop (`routing.lanes`).
    pub per_next_hop: usize,
}

/// A lane's task, as the daemon builds it for a route (see `daemon::start`).
pub(crate) type LaneTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The scheduler task: hands due jobs to the lanes (started on first use by
/// `spawn_lane(route, lane number, lane)`), and commits their reports, each in its own
/// task so that one slow fsync or bounce does not hold up the others.
pub(crate) async fn run(
    queue: Arc<MailQueue>,
    lanes: LaneCounts,
    shutdown: Shutdown,
    spawn_lane: impl Fn(&Route, usize, Lane) -> LaneTask,
) {
    let mut routes: HashMap<Route, Arc<RouteJobs>> = HashMap::new();
    let mut workers = tokio::task::JoinSet::new();
    let mut commits = tokio::task::JoinSet::new();
    let (report_tx, mut reports) = mpsc::channel::<Report>(ROUTE_BACKLOG);
    let commit = |commits: &mut tokio::task::JoinSet<()>, r: Report| {
        let q = queue.clone();
        commits.spawn(async move {
            q.commit(&r.job, &r.outcomes, r.call_id.as_deref()).await;
            let _ = r.committed.send(());
        });
    };
    'rounds: loop {
        let room = Room::new(routes.iter().map(|(r, j)| (r.clone(), j.room())));
        let (jobs, next) = queue.take_due(now_ms(), room);
        for job in jobs {
            // Expired by the operator: failed here, through the same commit as a report.
            if let Some(outcomes) = queue.expired_outcomes(&job) {
                let (committed, _) = tokio::sync::oneshot::channel();
                commit(
                    &mut commits,
                    Report {
                        job,
                        outcomes,
                        call_id: None,
                        committed,
                    },
                );
                continue;
            }
            let route_jobs = routes.entry(job.route.clone()).or_insert_with(|| {
                let route_jobs = RouteJobs::new(ROUTE_BACKLOG);
                let n = match &job.route {
                    Route::Local => lanes.local,
                    Route::Peer(_) => lanes.per_peer,
                    Route::Smtp(_) => lanes.per_next_hop,
                };
                for lane_no in 0..n {
                    let lane = Lane::new(route_jobs.clone(), report_tx.clone());
                    workers.spawn(spawn_lane(&job.route, lane_no, lane));
                }
                route_jobs
            });
            if let Err(job) = route_jobs.push(job) {
                // Lanes busy with a full backlog: try again on a later round.
                queue.requeue(&job);
            }
        }
        let wait = next
            .map(|n| Duration::from_millis(n.saturating_sub(now_ms())))
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        let round = tokio::time::sleep(wait);
        tokio::pin!(round);
        // Reports are taken while waiting for the next round; their commits wake it.
        loop {
            tokio::select! {
                _ = queue.notify.notified() => break,
                _ = &mut round => break,
                Some(r) = reports.recv() => commit(&mut commits, r),
                Some(_) = commits.join_next(), if !commits.is_empty() => {}
                _ = shutdown.wait() => break 'rounds,
            }
        }
    }
    // Closing the routes lets each lane finish its current job, report it and hang up;
    // those last reports are committed too.
    for route_jobs in routes.values() {
        route_jobs.close();
    }
    drop(routes);
    drop(report_tx);
    while let Some(r) = reports.recv().await {
        commit(&mut commits, r);
    }
    while commits.join_next().await.is_some() {}
    while workers.join_next().await.is_some() {}
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

    /// A route whose lanes have no room gets no job built: its messages stay ready, and
    /// are taken as room opens, in turn; another route's message behind them is reached.
    #[test]
    fn a_full_route_gets_no_jobs_built_and_its_messages_wait_their_turn() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), vec![]);
        let _ = q.take_due(0, Room::default()); // the start-up scan: nothing yet
        for i in 0..20 {
            q.insert(env(&format!("M{i:02}"), 0));
        }
        let mut other = env("X", 0);
        other.recipients[0].route = Route::Smtp(crate::queue::NextHop {
            host: "relay.example".into(),
            port: 25,
        });
        q.insert(other);
        let busy = q.lock().envs["M00"].recipients[0].route.clone();
        let full = || Room::new([(busy.clone(), 0)]);
        // Full: nothing built; a round looks at a few messages only, and they stay ready.
        let (jobs, next) = q.take_due(1, full());
        assert!(jobs.is_empty());
        assert_eq!(next, Some(0));
        assert_eq!(q.lock().ready.len(), 21);
        assert!(q.lock().in_flight.is_empty());
        // Room for two: the two oldest in `ready` order.
        let (jobs, _) = q.take_due(2, Room::new([(busy.clone(), 2)]));
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.route == busy));
        // The other route's message, behind the busy one's, is reached as `ready` turns.
        let mut reached = false;
        for round in 0..10 {
            let (jobs, _) = q.take_due(3 + round, full());
            if jobs.iter().any(|j| j.id == "X") {
                reached = true;
                break;
            }
        }
        assert!(
            reached,
            "a message for another route waited behind a full one"
        );
        assert_eq!(q.lock().ready.len(), 18);
    }

    /// A message taken back after its commit failed (`withdraw`): forgotten, and
    /// reported as handed over when a lane had taken it or was done with it, so that the
    /// intake can warn that the client's resend may make two.
    #[test]
    fn a_withdrawn_message_is_forgotten_and_says_whether_a_lane_had_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), vec![]);
        let _ = q.take_due(0, Room::default());
        q.insert(env("WAIT", 0));
        assert!(!q.withdraw("WAIT"), "no lane had it");
        assert!(q.get("WAIT").is_none());
        assert!(
            q.lock().unattempted.is_empty(),
            "flow control still counts it"
        );
        let (jobs, _) = q.take_due(1, Room::default());
        assert!(
            jobs.is_empty(),
            "a withdrawn message was still handed to a lane"
        );
        q.insert(env("TAKEN", 0));
        let (jobs, _) = q.take_due(2, Room::default());
        assert_eq!(ids(&jobs), vec!["TAKEN"]);
        assert!(q.withdraw("TAKEN"), "a lane had it");
        assert!(q.get("TAKEN").is_none());
        assert!(q.withdraw("TAKEN"), "gone already: handed over and retired");
    }

    /// A queue on a new spool in `dir`, holding `envs` as if recovered at start-up.
    fn queue(dir: &std::path::Path, envs: Vec<Envelope>) -> Arc<MailQueue> {
        let (spool, _) = Spool::open(dir).unwrap();
        Arc::new(MailQueue::new(
            spool,
            envs,
            QueueTimes::default(),
            site(),
            Events::new(),
            Arc::new(Metrics::new(Vec::new())),
        ))
    }

    /// Intake flow control: below FLOW_LIMIT messages without a first attempt a new
    /// transaction goes straight on; at the limit, with nothing draining, it waits
    /// FLOW_DELAY and then goes on all the same (virtual time).
    #[tokio::test(start_paused = true)]
    async fn intake_waits_at_the_limit_and_never_longer_than_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), vec![]);
        for i in 0..FLOW_LIMIT - 1 {
            q.insert(env(&format!("M{i:04}"), 0));
        }
        assert_eq!(q.admit().await, Duration::ZERO);
        q.insert(env("LAST", 0));
        let waited = q.admit().await;
        assert!(
            waited >= FLOW_DELAY && waited < FLOW_DELAY + Duration::from_millis(10),
            "{waited:?}"
        );
        // Messages recovered at start-up are not intake: they do not count.
        let q = queue(
            dir.path(),
            (0..FLOW_LIMIT)
                .map(|i| env(&format!("R{i:04}"), 0))
                .collect(),
        );
        assert_eq!(q.admit().await, Duration::ZERO);
    }

    /// A waiting transaction goes on as soon as a message has its first attempt reported
    /// (the scheduler's commit), or is deleted, and not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_transaction_goes_on_when_a_message_is_attempted() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), vec![]);
        let _ = q.take_due(0, Room::default()); // the start-up scan
        for i in 0..FLOW_LIMIT {
            q.insert(env(&format!("M{i:04}"), 0));
        }
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "it waits at the limit");
        let (jobs, _) = q.take_due(1, Room::default());
        let job = &jobs[0];
        let rcpt = job.recipients[0].clone();
        q.commit(
            job,
            &[(rcpt, super::super::outcome::RcptOutcome::Delivered)],
            None,
        )
        .await;
        let waited = waiter.await.unwrap();
        assert!(
            waited < FLOW_DELAY,
            "woken by the commit, not by the timeout: {waited:?}"
        );
        assert_eq!(q.lock().unattempted.len(), FLOW_LIMIT - 1);
        // An operator's delete takes a message out of the count too, and so does a hold
        // (a held message waits for the operator, not for the relay).
        q.insert(env("NEW", 0));
        let _ = q.delete("M0001").await;
        assert_eq!(q.lock().unattempted.len(), FLOW_LIMIT - 1);
        q.insert(env("NEW2", 0));
        assert_eq!(q.hold(&["M0002".into()], false).await, Ok(1));
        assert_eq!(q.lock().unattempted.len(), FLOW_LIMIT - 1);
        assert_eq!(q.admit().await, Duration::ZERO);
    }

    #[test]
    fn rounds_take_new_messages_timed_retries_and_requeued_jobs() {
        let dir = tempfile::tempdir().unwrap();
        // Recovered at start-up: one due now, one at t=1000.
        let q = queue(dir.path(), vec![env("A", 0), env("B", 1000)]);
        let (jobs, next) = q.take_due(500, Room::default());
        assert_eq!(ids(&jobs), ["A"]);
        assert_eq!(next, Some(1000));
        // Nothing new: a round finds nothing, and A is in flight.
        let (jobs, next) = q.take_due(600, Room::default());
        assert!(jobs.is_empty());
        assert_eq!(next, Some(1000));
        // A new message is taken without waiting for the timed one.
        q.insert(env("C", 0));
        let (jobs, _) = q.take_due(700, Room::default());
        assert_eq!(ids(&jobs), ["C"]);
        // A job its lanes could not take comes back in the next round.
        q.requeue(&jobs[0]);
        let (jobs, _) = q.take_due(800, Room::default());
        assert_eq!(ids(&jobs), ["C"]);
        // The timed retry is due: a full scan finds it, not the ones in flight.
        let (jobs, next) = q.take_due(1000, Room::default());
        assert_eq!(ids(&jobs), ["B"]);
        assert_eq!(next, None);
        // retry_now makes everything pending due at once.
        let _ = q.take_due(1001, Room::default());
        {
            let mut st = q.lock();
            st.in_flight.clear();
            st.envs.get_mut("B").unwrap().recipients[0].next_attempt_ms = 5000;
        }
        assert_eq!(q.retry_now(None), 3);
        let (jobs, next) = q.take_due(1002, Room::default());
        assert_eq!(ids(&jobs), ["A", "B", "C"]);
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn a_held_message_is_not_taken_until_released_and_then_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), vec![env("A", 0), env("B", 0)]);
        let none: &[String] = &[];
        assert!(q.hold(none, false).await.is_err(), "no ID and no --all");
        let unknown = q.hold(&["X".into(), "A".into()], false).await;
        assert_eq!(unknown, Err("no message X in the queue".into()));
        assert_eq!(q.hold(&["A".into()], false).await, Ok(1));
        let (jobs, _) = q.take_due(10, Room::default());
        assert_eq!(ids(&jobs), ["B"]);
        assert!(q.get("A").unwrap().held);
        assert_eq!(
            q.release(&["B".into()], false).await,
            Err("B is not held".into())
        );
        // Released: due now, even though its next attempt was far off.
        q.lock().envs.get_mut("A").unwrap().recipients[0].next_attempt_ms = u64::MAX;
        assert_eq!(q.release(&[], true).await, Ok(1));
        let (jobs, _) = q.take_due(20, Room::default());
        assert_eq!(ids(&jobs), ["A"]);
        assert!(!dir.path().join("queue/A.hold").exists());
    }

    fn site() -> Site {
        Site {
            domain: "site-a.test".into(),
            hostname: "relay.site-a.test".into(),
            peers: Vec::new(),
            suites: Vec::new(),
            media_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            media_ports: None,
            public_media_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            call_records: None,
            routing: Default::default(),
            resolver: None,
            discovery: None,
            own_sip: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_permanent_failure_queues_the_bounce_and_drops_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let events = Events::new();
        let mut rx = events.subscribe();
        let q = MailQueue::new(
            spool,
            vec![env("A", 0)],
            QueueTimes::default(),
            site(),
            events,
            Arc::new(Metrics::new(Vec::new())),
        );
        let (jobs, _) = q.take_due(0, Room::default());
        let outcomes = jobs[0].all(super::super::outcome::RcptOutcome::Permanent {
            status: "5.1.1".into(),
            diagnostic: "smtp; 550 5.1.1 no such user".into(),
            remote: Some("peer site-b.test".into()),
        });
        q.commit(&jobs[0], &outcomes, None).await;
        let left = q.list();
        assert_eq!(left.len(), 1, "only the bounce is left");
        let bounce = &left[0];
        assert_ne!(bounce.id, "A");
        assert_eq!(bounce.mail_from, "");
        assert_eq!(bounce.recipients[0].addr, "a@site-a.test");
        assert_eq!(bounce.recipients[0].route, Route::Local);
        assert!(matches!(
            rx.try_recv(),
            Ok(RelayEvent::Failed { id, recipient, .. }) if id == "A" && recipient == "b@site-b.test"
        ));
        // The bounce is in the spool too, for the next start.
        let spooled = Spool::scan(dir.path()).unwrap();
        assert!(spooled.iter().any(|e| e.id == bounce.id));
    }

    #[tokio::test]
    async fn a_transient_failure_keeps_the_message_for_a_later_round() {
        let dir = tempfile::tempdir().unwrap();
        // Received just now (the commit reads the clock): far from expiry.
        let mut fresh = env("A", 0);
        fresh.received = now_ms() / 1000;
        let q = queue(dir.path(), vec![fresh]);
        let (jobs, _) = q.take_due(0, Room::default());
        let outcomes = jobs[0].all(super::super::outcome::RcptOutcome::Transient("busy".into()));
        q.commit(&jobs[0], &outcomes, None).await;
        let a = q.get("A").expect("still queued");
        assert_eq!(a.recipients[0].attempts, 1);
        assert_eq!(a.recipients[0].last_error.as_deref(), Some("busy"));
        assert!(a.recipients[0].next_attempt_ms > 0);
        // Released: not in flight, and not due before its next attempt.
        assert_eq!(q.snapshot().in_flight, 0);
        let (jobs, next) = q.take_due(1, Room::default());
        assert!(jobs.is_empty());
        assert_eq!(next, Some(a.recipients[0].next_attempt_ms));
    }
}
