//! The worker's side of checkpointing: writes fenced on the job's lease, retried through brief
//! database outages so a blip does not throw away finished upstream work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;

use super::backoff;
use crate::fusion::{Checkpoints, Lost};
use crate::job::{Job, JobStatus, Lease, Step};
use crate::store::{Store, StoreError};

/// How many times one write is tried before the job is left to lease expiry.
pub(crate) const DB_ATTEMPTS: u32 = 12;

pub(super) struct LeaseCheckpoints<'a> {
    pub store: &'a dyn Store,
    pub lease: &'a Lease,
    pub stop: &'a CancellationToken,
    pub held: HeldUntil,
}

/// Until when the job's lease is known to hold, by this process's clock: from its claim, then
/// from each heartbeat that renewed it (`Worker::heartbeat` sends the new time). Past that time,
/// less a margin, the lease may have run out unseen (renewals failing, or stuck on a database
/// that does not answer) and the job been rescued and claimed elsewhere: no new upstream call
/// starts until a heartbeat renews the lease again (the job goes on where it was) or finds it
/// lost (the job is stopped). A call under way is not stopped: if the lease held after all, what
/// it answers is kept.
pub(super) struct HeldUntil {
    pub until: watch::Receiver<i64>,
    pub clock: SharedClock,
    /// How long before `until` no new call starts: a third of the lease, a heartbeat's interval.
    pub margin_ms: i64,
}

impl HeldUntil {
    fn holds(&self, until: i64) -> bool {
        self.clock.now_ms() < until.saturating_sub(self.margin_ms)
    }

    /// Return once a new call may start; `Err(Lost)` if the job is stopped first.
    async fn wait(&self, stop: &CancellationToken) -> Result<(), Lost> {
        if self.holds(*self.until.borrow()) {
            return Ok(());
        }
        tracing::info!(
            "the job's lease has not been renewed in time; no new upstream call until it is"
        );
        let mut until = self.until.clone();
        tokio::select! {
            _ = stop.cancelled() => Err(Lost),
            renewed = until.wait_for(|&until| self.holds(until)) => match renewed {
                Ok(_) => {
                    tracing::info!("the job's lease was renewed; going on");
                    Ok(())
                }
                // The job's place in the running map is gone: it is ending.
                Err(_) => Err(Lost),
            },
        }
    }
}

#[async_trait]
impl Checkpoints for LeaseCheckpoints<'_> {
    async fn save(&self, step: &Step) -> Result<(), Lost> {
        let (store, lease) = (self.store, self.lease);
        let write = || store.save_step(lease, step);
        // Only this lease writes rows with its attempt.
        let landed = || async move {
            let steps = store.get_steps(lease.job_id).await?;
            Ok(steps
                .iter()
                .any(|s| s.key == step.key && s.attempt == lease.attempt))
        };
        match fenced_write(self.stop, write, landed).await {
            Some(true) => Ok(()),
            _ => Err(Lost),
        }
    }

    async fn before_call(&self) -> Result<(), Lost> {
        self.held.wait(self.stop).await
    }
}

/// Whether the job is `status` at `lease`'s attempt, for `reason` when it failed: an outcome
/// only that lease could write. (The rescuer may fail a job at the same attempt, as
/// `lease_expired`: that one is not this lease's.)
pub(super) async fn finished_as(
    store: &dyn Store,
    lease: &Lease,
    status: JobStatus,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    job_shows(store, lease, |j| {
        j.status == status && j.attempt == lease.attempt && j.failure_reason.as_deref() == reason
    })
    .await
}

/// Whether `lease`'s own requeue is what the job shows: queued at its attempt to run at `run_at`
/// (the rescuer's requeue of an expired lease sets `run_at` to its own clock, and a claim since
/// would have raised the attempt).
pub(super) async fn requeued(
    store: &dyn Store,
    lease: &Lease,
    run_at: i64,
) -> Result<bool, StoreError> {
    job_shows(store, lease, |j| {
        j.status == JobStatus::Queued && j.attempt == lease.attempt && j.run_at == run_at
    })
    .await
}

/// Whether the job `lease` is for, as stored now, passes `shows` (false when it is gone).
async fn job_shows(
    store: &dyn Store,
    lease: &Lease,
    shows: impl FnOnce(&Job) -> bool,
) -> Result<bool, StoreError> {
    Ok(store
        .get_job(lease.job_id)
        .await?
        .as_ref()
        .is_some_and(shows))
}

/// A write fenced on a lease (`Some(true)`: it took; `Some(false)`: fenced out), retried through
/// database errors. A try that failed may have committed all the same (the connection broke
/// after the statement went out, before its answer came back); a later try then finds the
/// write already done and reports it fenced out. So when a try failed and a later one says
/// fenced out, `landed` reads back whether the write is there: the job goes on at once instead
/// of stopping and waiting out its lease.
pub(super) async fn fenced_write<W, WFut, L, LFut>(
    stop: &CancellationToken,
    mut write: W,
    landed: L,
) -> Option<bool>
where
    W: FnMut() -> WFut,
    WFut: Future<Output = Result<bool, StoreError>>,
    L: FnMut() -> LFut,
    LFut: Future<Output = Result<bool, StoreError>>,
{
    let unsure = AtomicBool::new(false);
    let took = with_db_retries(stop, || {
        let (attempt, unsure) = (write(), &unsure);
        async move {
            let result = attempt.await;
            if result.is_err() {
                unsure.store(true, Ordering::Relaxed);
            }
            result
        }
    })
    .await?;
    if took || !unsure.load(Ordering::Relaxed) {
        return Some(took);
    }
    let landed = with_db_retries(stop, landed).await?;
    if landed {
        tracing::info!("a write whose commit went unconfirmed had landed; going on");
    }
    Some(landed)
}

/// Run a store call, retrying database errors with backoff. `None` when it never succeeded (or
/// `stop` fired while waiting).
pub(crate) async fn with_db_retries<T, F, Fut>(stop: &CancellationToken, call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    retry_db(stop, Patience::Tries(DB_ATTEMPTS), call)
        .await
        .ok()
}

/// How long `retry_db` keeps trying.
pub(crate) enum Patience {
    /// At most this many calls.
    Tries(u32),
    /// Until this long after the first call.
    For(Duration),
}

/// Run a store call, retrying database errors (`StoreError::Database`: the database did not
/// answer, or refused for now) with backoff for as long as `patience` allows, or until `stop`
/// fires; any other error, and the last one, is returned as it is.
pub(crate) async fn retry_db<T, F, Fut>(
    stop: &CancellationToken,
    patience: Patience,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let error = match call().await {
            Ok(v) => return Ok(v),
            // Rows that do not read read the same the next time.
            Err(e) if e.is_unreadable() => return Err(e),
            Err(e @ StoreError::Database(_)) => e,
            Err(e) => return Err(e),
        };
        failures += 1;
        let wait = match patience {
            Patience::Tries(most) if failures >= most => return Err(error),
            Patience::Tries(_) => backoff(failures),
            Patience::For(bound) => match bound.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => backoff(failures).min(left),
                _ => return Err(error),
            },
        };
        tracing::warn!(error = %error, failures, "database call failed; retrying");
        tokio::select! {
            _ = stop.cancelled() => return Err(error),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
