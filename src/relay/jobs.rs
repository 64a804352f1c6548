//! The [`Lane`] through which a worker takes jobs from the scheduler and reports back,
//! and the [`RouteJobs`] from which a route's lanes take them.
//! Workers import this module (and the pure `outcome`), never the scheduler.

use super::outcome::{Job, RcptOutcome};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot};

/// A worker's account of a job, sent back to the scheduler, which commits it and then
/// answers on `committed`.
#[derive(Debug)]
pub(crate) struct Report {
    pub job: Job,
    pub outcomes: Vec<(String, RcptOutcome)>,
    /// The call that carried the attempt (peer routes), for the log.
    pub call_id: Option<String>,
    pub committed: oneshot::Sender<()>,
}

/// One worker's view of its route: the route's jobs (shared by all its lanes, so that a
/// slow message holds up one lane, not the route) and the way back to the scheduler.
pub(crate) struct Lane {
    jobs: Arc<RouteJobs>,
    reports: mpsc::Sender<Report>,
}

impl Lane {
    pub fn new(jobs: Arc<RouteJobs>, reports: mpsc::Sender<Report>) -> Self {
        Lane { jobs, reports }
    }

    /// Wait for the next job of the route (None when the scheduler closed the route and
    /// its backlog is empty). Cancel-safe: a job handed to a lane whose wait is dropped
    /// goes back to the front of the route's backlog.
    pub async fn next(&self) -> Option<Job> {
        self.jobs.next().await
    }

    /// Hand the outcomes of `job` to the scheduler and wait until they are recorded, so a
    /// lane takes its next job only once the last one is durable.
    pub async fn report(&self, job: Job, outcomes: Vec<(String, RcptOutcome)>) {
        self.report_call(job, outcomes, None).await
    }

    /// [`report`](Self::report) for an attempt made through the call `call_id` (or an
    /// attempt to set it up), so that the log lines of the outcome name the call.
    pub async fn report_call(
        &self,
        job: Job,
        outcomes: Vec<(String, RcptOutcome)>,
        call_id: Option<String>,
    ) {
        let (committed, done) = oneshot::channel();
        let r = Report {
            job,
            outcomes,
            call_id,
            committed,
        };
        if self.reports.send(r).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// The jobs of one route, shared by its lanes. A job goes to the lane that became idle
/// last, not in turn: that lane's call (or SMTP connection) is the one most likely still
/// up, so a lightly loaded route reuses one warm call instead of placing a new call for
/// each message on a lane that has none, and the calls it does not need time out.
/// Under load every lane is busy and jobs wait in the backlog, first in, first out.
pub(crate) struct RouteJobs {
    state: Mutex<RouteState>,
    backlog_max: usize,
}

struct RouteState {
    backlog: VecDeque<Job>,
    /// Lanes waiting for a job, the one idle last at the end.
    idle: Vec<(u64, oneshot::Sender<Job>)>,
    next_waiter: u64,
    closed: bool,
}

impl RouteJobs {
    pub fn new(backlog_max: usize) -> Arc<Self> {
        Arc::new(RouteJobs {
            state: Mutex::new(RouteState {
                backlog: VecDeque::new(),
                idle: Vec::new(),
                next_waiter: 0,
                closed: false,
            }),
            backlog_max,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RouteState> {
        // The state is consistent between statements: a panic elsewhere cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand `job` to the lane idle last, or queue it. `Err(job)` when no lane is idle and
    /// the backlog is full: the caller keeps the job for a later round (boxed: it is rare).
    pub fn push(&self, job: Job) -> Result<(), Box<Job>> {
        let mut st = self.lock();
        let Some(job) = hand_to_idle(&mut st, job) else {
            return Ok(());
        };
        if st.backlog.len() >= self.backlog_max {
            return Err(Box::new(job));
        }
        st.backlog.push_back(job);
        Ok(())
    }

    /// How many jobs a push can still place now: lanes waiting, and backlog room.
    pub fn room(&self) -> usize {
        let st = self.lock();
        st.idle.len() + self.backlog_max.saturating_sub(st.backlog.len())
    }

    /// No more jobs: waiting lanes get None, the others once the backlog is empty.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.idle.clear();
    }

    async fn next(&self) -> Option<Job> {
        let waiting = {
            let mut st = self.lock();
            if let Some(job) = st.backlog.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.idle.push((id, tx));
            Waiting {
                jobs: self,
                id,
                rx: Some(rx),
            }
        };
        waiting.recv().await
    }
}

/// Give `job` to the lane that became idle last; back if no lane is waiting.
fn hand_to_idle(st: &mut RouteState, mut job: Job) -> Option<Job> {
    while let Some((_, tx)) = st.idle.pop() {
        match tx.send(job) {
            Ok(()) => return None,
            Err(j) => job = j,
        }
    }
    Some(job)
}

/// A lane's place among the idle ones, given up when its wait ends or is dropped.
struct Waiting<'a> {
    jobs: &'a RouteJobs,
    id: u64,
    rx: Option<oneshot::Receiver<Job>>,
}

impl Waiting<'_> {
    async fn recv(mut self) -> Option<Job> {
        let rx = self.rx.as_mut()?;
        let job = rx.await.ok();
        self.rx = None;
        job
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut st = self.jobs.lock();
        st.idle.retain(|(id, _)| *id != self.id);
        // Handed a job after the lane stopped waiting (its select! took another branch):
        // the job is not lost, it goes to another idle lane or first in the backlog.
        if let Ok(job) = rx.try_recv()
            && let Some(job) = hand_to_idle(&mut st, job)
        {
            st.backlog.push_front(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Route;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    fn job(id: &str) -> Job {
        Job {
            id: id.into(),
            route: Route::Local,
            mail_from: "a@site-a.test".into(),
            recipients: vec!["b@site-b.test".into()],
            rcpt_params: vec![Default::default()],
            opts: Default::default(),
            from_peer: None,
            dedup_key_file: None,
            pin: None,
            decoded: None,
        }
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Messages one after another on a quiet route: the lane that just finished takes the
    /// next one, so they share its call. Taken in turn (a FIFO of waiting lanes, as before),
    /// each of 16 lanes placed a call of its own for its first message.
    #[tokio::test]
    async fn one_message_after_another_goes_to_the_same_lane() {
        let jobs = RouteJobs::new(8);
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        for lane_no in 0..4 {
            let jobs = jobs.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                while let Some(j) = jobs.next().await {
                    done_tx.send((lane_no, j.id)).unwrap();
                }
            });
            // Let it reach its wait, so the lanes wait in the order 0, 1, 2, 3.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        let mut lanes = Vec::new();
        for i in 0..6 {
            jobs.push(job(&format!("M{i}"))).unwrap();
            let (lane_no, id) = done.recv().await.unwrap();
            assert_eq!(id, format!("M{i}"));
            lanes.push(lane_no);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(lanes, [3; 6], "each message went to the lane idle last");
        jobs.close();
    }

    /// A lane's select! may drop its wait (its idle timer fired) just after a job was
    /// handed to it: the job goes back, first in line, and is not lost.
    #[test]
    fn a_job_handed_to_a_dropped_wait_is_not_lost() {
        let jobs = RouteJobs::new(8);
        let mut first = Box::pin(jobs.next());
        let mut second = Box::pin(jobs.next());
        assert!(poll_once(&mut first).is_pending());
        assert!(poll_once(&mut second).is_pending());
        jobs.push(job("A")).unwrap(); // to `second`, idle last
        jobs.push(job("B")).unwrap(); // to `first`
        drop(second);
        // A went to the backlog's front; B is still `first`'s.
        match poll_once(&mut first) {
            Poll::Ready(Some(j)) => assert_eq!(j.id, "B"),
            other => panic!("expected B, got {other:?}"),
        }
        let mut third = Box::pin(jobs.next());
        match poll_once(&mut third) {
            Poll::Ready(Some(j)) => assert_eq!(j.id, "A"),
            other => panic!("expected A, got {other:?}"),
        }
        // A wait dropped before anything came leaves no place behind: the next job is queued.
        let mut fourth = Box::pin(jobs.next());
        assert!(poll_once(&mut fourth).is_pending());
        drop(fourth);
        jobs.push(job("C")).unwrap();
        assert_eq!(jobs.lock().backlog.len(), 1);
    }

    #[test]
    fn a_full_backlog_gives_the_job_back_and_close_drains_it_first() {
        let jobs = RouteJobs::new(2);
        jobs.push(job("A")).unwrap();
        jobs.push(job("B")).unwrap();
        let back = jobs.push(job("C")).unwrap_err();
        assert_eq!(back.id, "C");
        let mut waiting = Box::pin(jobs.next());
        assert!(matches!(poll_once(&mut waiting), Poll::Ready(Some(j)) if j.id == "A"));
        jobs.close();
        let mut after = Box::pin(jobs.next());
        assert!(matches!(poll_once(&mut after), Poll::Ready(Some(j)) if j.id == "B"));
        let mut last = Box::pin(jobs.next());
        assert!(matches!(poll_once(&mut last), Poll::Ready(None)));
    }

    #[test]
    fn close_wakes_the_waiting_lanes_with_none() {
        let jobs = RouteJobs::new(2);
        let mut waiting = Box::pin(jobs.next());
        assert!(poll_once(&mut waiting).is_pending());
        jobs.close();
        assert!(matches!(poll_once(&mut waiting), Poll::Ready(None)));
    }
}
