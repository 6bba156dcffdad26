//! A write whose commit went unconfirmed (the database took it, then the connection broke before
//! saying so) is retried, finds itself already done, and the job goes on: it neither stops to
//! wait out its lease nor reports its outcome lost. The same holds for a requeue to retry later.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fusion::clock::SystemClock;
use fusion::job::{Job, JobStatus, JsonText, Lease, ListFilter, NewJob, StartHere, Step};
use fusion::store::{
    CancelOutcome, Claimed, Enqueued, Held, JobEvent, Result, RetryOutcome, Store, StoreError,
};
use fusion::worker::{Worker, WorkerConfig};
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{Options, TestApp, body_with_panel, spawn_app_with};
use crate::pipelining::pipeline;

/// A store that lets the first `n` checkpoints, outcomes and requeues commit, then answers each
/// of them with an error, as a connection broken mid-answer would.
struct Unconfirmed {
    inner: Arc<dyn Store>,
    steps_left: AtomicUsize,
    finishes_left: AtomicUsize,
    requeues_left: AtomicUsize,
}

impl Unconfirmed {
    fn unconfirm<T>(left: &AtomicUsize, answer: Result<T>) -> Result<T> {
        let taken = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match (answer, taken) {
            (Ok(_), Ok(_)) => Err(StoreError::Database(sqlx::Error::Io(
                std::io::ErrorKind::ConnectionReset.into(),
            ))),
            (answer, _) => answer,
        }
    }
}

#[async_trait]
impl Store for Unconfirmed {
    async fn migrate(&self) -> Result<()> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
    async fn enqueue(&self, job: NewJob, start: Option<StartHere>) -> Result<Enqueued> {
        self.inner.enqueue(job, start).await
    }
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        self.inner.get_job(id).await
    }
    async fn get_steps(&self, id: Uuid) -> Result<Vec<Step>> {
        self.inner.get_steps(id).await
    }
    async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<Job>> {
        self.inner.list_jobs(filter).await
    }
    async fn cancel(&self, id: Uuid, now: i64) -> Result<CancelOutcome> {
        self.inner.cancel(id, now).await
    }
    async fn retry_failed(&self, id: Uuid, now: i64) -> Result<RetryOutcome> {
        self.inner.retry_failed(id, now).await
    }
    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.inner.claim(owner, limit, now, lease).await
    }
    async fn heartbeat(
        &self,
        owner: &str,
        jobs: &[Uuid],
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Held>> {
        self.inner.heartbeat(owner, jobs, now, lease).await
    }
    async fn rescue_expired(&self, now: i64) -> Result<u64> {
        self.inner.rescue_expired(now).await
    }
    async fn save_step(&self, lease: &Lease, step: &Step) -> Result<bool> {
        let answer = self.inner.save_step(lease, step).await;
        Self::unconfirm(&self.steps_left, answer)
    }
    async fn complete(
        &self,
        lease: &Lease,
        last: Option<&Step>,
        result: &JsonText,
        now: i64,
    ) -> Result<bool> {
        let answer = self.inner.complete(lease, last, result, now).await;
        Self::unconfirm(&self.finishes_left, answer)
    }
    async fn fail(&self, lease: &Lease, reason: &str, error: &str, now: i64) -> Result<bool> {
        let answer = self.inner.fail(lease, reason, error, now).await;
        Self::unconfirm(&self.finishes_left, answer)
    }
    async fn retry_later(
        &self,
        lease: &Lease,
        run_at: i64,
        reason: &str,
        error: &str,
    ) -> Result<bool> {
        let answer = self.inner.retry_later(lease, run_at, reason, error).await;
        Self::unconfirm(&self.requeues_left, answer)
    }
    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.inner.release(lease).await
    }
    fn wakeups(&self) -> Arc<Notify> {
        self.inner.wakeups()
    }
    fn events(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.events()
    }
}

/// Log lines written on this thread (a `#[tokio::test]` runs every task on it) while the guard
/// lives.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Collect this thread's log lines while the guard lives.
fn capture_logs() -> (Lines, tracing::subscriber::DefaultGuard) {
    let lines = Lines::default();
    let writer = lines.clone();
    let guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    (lines, guard)
}

/// An app without workers holding one queued job (panel `m1`, `m2`, analyst `judge`), a store
/// over its own that leaves the first `steps`, `finishes` and `requeues` writes unconfirmed, and
/// a worker for one job at a time on that store, with a lease far longer than the test: a job
/// left to wait out its lease would still be running.
async fn one_job(
    steps: usize,
    finishes: usize,
    requeues: usize,
) -> (TestApp, Uuid, Arc<Unconfirmed>, Arc<Worker>) {
    let app = spawn_app_with(Options {
        workers: false,
        ..Options::default()
    })
    .await;
    let id = app
        .submit_ok(&body_with_panel(&["m1", "m2"], "judge"))
        .await;
    let store = Arc::new(Unconfirmed {
        inner: app.store.clone(),
        steps_left: AtomicUsize::new(steps),
        finishes_left: AtomicUsize::new(finishes),
        requeues_left: AtomicUsize::new(requeues),
    });
    let config = WorkerConfig {
        concurrency: 1,
        lease: Duration::from_secs(300),
        poll_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(1),
        retry_base: Duration::from_millis(10),
    };
    let worker = Worker::new(
        store.clone(),
        Arc::new(pipeline(&app.fake)),
        Arc::new(SystemClock),
        config,
    );
    (app, id.parse().unwrap(), store, worker)
}

/// The job as stored: its status and attempt.
async fn stored(app: &TestApp, id: Uuid) -> (JobStatus, i32) {
    let job = app.store.get_job(id).await.unwrap().unwrap();
    (job.status, job.attempt)
}

#[tokio::test]
async fn a_write_that_committed_unconfirmed_is_found_done_and_the_job_goes_on() {
    let (lines, _logs) = capture_logs();
    let (app, id, store, worker) = one_job(1, 1, 0).await;
    assert_eq!(worker.run_once(1).await.unwrap(), 1);

    // Both faults were met: a checkpoint and the outcome each committed and then failed.
    assert_eq!(store.steps_left.load(Ordering::SeqCst), 0);
    assert_eq!(store.finishes_left.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&app, id).await, (JobStatus::Succeeded, 1));
    // Every step asked once: nothing was run again.
    for (model, kind) in [
        ("m1", Kind::Panel),
        ("m2", Kind::Panel),
        ("judge", Kind::Analysis),
        ("judge", Kind::Final),
    ] {
        assert_eq!(app.fake.calls(model, kind), 1, "{model} {kind:?}");
    }
    let logs = lines.text();
    assert_eq!(
        logs.matches("a write whose commit went unconfirmed had landed")
            .count(),
        2,
        "{logs}"
    );
    assert!(!logs.contains("outcome not written"), "{logs}");
}

#[tokio::test]
async fn a_requeue_that_committed_unconfirmed_is_not_reported_lost() {
    let (lines, _logs) = capture_logs();
    let (app, id, store, worker) = one_job(0, 0, 1).await;
    // The final answer fails on every upstream try: the job is requeued to retry later.
    app.fake.set_default(Reply::Status(503));
    for model in ["m1", "m2"] {
        app.fake.script(model, Kind::Panel, vec![Reply::Ok]);
    }
    app.fake.script("judge", Kind::Analysis, vec![Reply::Ok]);
    assert_eq!(worker.run_once(1).await.unwrap(), 1);

    assert_eq!(store.requeues_left.load(Ordering::SeqCst), 0);
    assert_eq!(stored(&app, id).await, (JobStatus::Queued, 1));
    assert!(app.fake.calls("judge", Kind::Final) > 1);
    let logs = lines.text();
    assert_eq!(
        logs.matches("a write whose commit went unconfirmed had landed")
            .count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("job requeued to retry later"), "{logs}");
    assert!(!logs.contains("outcome not written"), "{logs}");
}
