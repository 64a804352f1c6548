//! The [`Lane`] through which a worker takes jobs from the scheduler and reports back.
//! Workers import this module (and the pure `outcome`), never the scheduler.

use super::outcome::{Job, RcptOutcome};
use std::sync::Arc;
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
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    reports: mpsc::Sender<Report>,
}

impl Lane {
    pub fn new(
        jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
        reports: mpsc::Sender<Report>,
    ) -> Self {
        Lane { jobs, reports }
    }

    /// Wait for the next job of the route (None when the scheduler closed the route).
    pub async fn next(&self) -> Option<Job> {
        self.jobs.lock().await.recv().await
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
