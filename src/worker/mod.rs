//! Workers: claim jobs from the store, run the fusion pipeline on each under a lease, and write
//! the outcome. Three loops per process: the dispatcher (claims while there is capacity, woken by
//! the store or a slow poll), the heartbeat (renews, in one query, the leases of the jobs this
//! process is running, and stops any it no longer holds), and the rescuer (requeues jobs whose
//! lease expired).
//! Never talks HTTP to clients; never decides what a step does (that is `fusion`).

mod checkpoint;

pub(crate) use checkpoint::{Patience, retry_db};

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::SharedClock;
use crate::fusion::{Outcome, Pipeline};
use crate::job::{Job, JobStatus, Lease, StartHere};
use crate::store::{Claimed, JobEvent, Store, StoreError};
use checkpoint::{
    DB_ATTEMPTS, HeldUntil, LeaseCheckpoints, fenced_write, finished_as, requeued, with_db_retries,
};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this process.
    pub concurrency: u32,
    /// How long a claim holds a job without a heartbeat.
    pub lease: Duration,
    /// Fallback poll when no wake-up arrives: a wake-up missed (a NOTIFY while the listener was
    /// down), or one that comes late (SQLite's watch on other processes reads once a second).
    pub poll_interval: Duration,
    /// On shutdown, how long running jobs may go on before their leases are handed back.
    pub shutdown_grace: Duration,
    /// First wait before a job whose upstream keeps failing runs again (doubles per attempt).
    pub retry_base: Duration,
    /// After the grace period, how long outcomes and releases may still be retried through a
    /// database outage before shutdown gives up on them (those jobs then wait out their leases).
    pub release_window: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 32,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            retry_base: Duration::from_secs(30),
            release_window: Duration::from_secs(10),
        }
    }
}

/// The jobs this process is running, by `(id, attempt)`: after a lease lapsed (a stall, a
/// database outage) the same job may be claimed here again while the old attempt is still
/// winding down, and each attempt must be renewed, stopped and forgotten on its own.
type RunningMap = HashMap<(Uuid, i32), Running>;

/// An attempt running here: what stops it, and until when its lease is known to hold (by this
/// process's clock; see `HeldUntil`).
struct Running {
    stop: CancellationToken,
    held_until: watch::Sender<i64>,
}

/// Cancels heard lately (see `Worker::cancels_heard`): for each job, the latest attempt heard
/// cancelled and when that was last heard; and every hearing in the order heard, so that
/// forgetting old ones costs only those (every process hears every cancel).
#[derive(Default)]
struct RecentCancels {
    last_heard: HashMap<Uuid, Heard>,
    heard: VecDeque<(i64, Uuid)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Heard {
    at: i64,
    attempt: i32,
}

impl RecentCancels {
    /// Remember that `id` was cancelled in its attempt `attempt`, heard `now`; forget what was
    /// heard `kept_ms` or longer ago.
    fn hear(&mut self, id: Uuid, attempt: i32, now: i64, kept_ms: i64) {
        while let Some(&(at, old)) = self.heard.front() {
            if now - at < kept_ms {
                break;
            }
            self.heard.pop_front();
            // Unless heard again since.
            if self.last_heard.get(&old).is_some_and(|h| h.at == at) {
                self.last_heard.remove(&old);
            }
        }
        // A cancel of an earlier attempt heard after a later one's (a lagging NOTIFY) does not
        // take back the later one.
        let attempt = (self.last_heard.get(&id)).map_or(attempt, |h| h.attempt.max(attempt));
        self.last_heard.insert(id, Heard { at: now, attempt });
        self.heard.push_back((now, id));
    }

    /// Whether a cancel heard lately stops `id`'s attempt `attempt`: one of that attempt or a
    /// later one. (A cancel of an earlier attempt was followed by a retry, which queued the job
    /// again for this attempt to claim.)
    fn stops(&self, id: &Uuid, attempt: i32) -> bool {
        self.last_heard
            .get(id)
            .is_some_and(|h| attempt <= h.attempt)
    }
}

/// An attempt's place in the running map, given up when its task ends however it ends.
struct Registered<'a> {
    running: &'a Mutex<RunningMap>,
    key: (Uuid, i32),
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // Not `expect`: a poisoned map must not turn one task's end into a second panic.
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.key);
        }
    }
}

pub struct Worker {
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
    clock: SharedClock,
    config: WorkerConfig,
    /// Unique per process start: the `lease_owner` of every job it claims.
    owner: String,
    running: Mutex<RunningMap>,
    /// Cancels heard lately, by job id, with the attempt each stopped and when it was heard (the
    /// worker's clock). One that lands between a claim's commit and the job's place in
    /// `running` finds nothing to stop there: the job looks here as it takes its place. Kept
    /// for a lease's length; later, a heartbeat has stopped any job it missed. Only a cancel of
    /// the claimed attempt (or a later one) stops it: a cancelled job may be retried and claimed
    /// again within that time, and the cancel's news may lag behind the claim.
    cancels_heard: Mutex<RecentCancels>,
    /// One permit per job this process may run at once.
    capacity: Arc<Semaphore>,
    /// Every job task; closed when shutdown begins.
    tracker: TaskTracker,
    /// The dispatcher's last claim found no runnable queued job (and no wake-up came since):
    /// a job submitted here may then start here at once without overtaking any.
    queue_drained: AtomicBool,
    /// Set once shutdown's grace period is over: stopped jobs are then released, not abandoned.
    releasing: AtomicBool,
    /// Cancelled when shutdown's release window is over: what outcome and release writes watch
    /// while they retry. Not a job's own stop token: an outcome is the end of work already paid
    /// for, and ending the grace period must not throw it away mid-retry.
    last_writes: CancellationToken,
    /// Claims and inserts that failed and may have committed all the same, leaving jobs
    /// running under this process's lease with nobody on them: handed back before each claim
    /// and a heartbeat's interval apart until a lease past that lease's end (see
    /// `hand_back_unconfirmed`, `hand_back_loop`).
    unconfirmed: Mutex<Vec<Unconfirmed>>,
    /// The lease end of this worker's last claim: each claim's ends later (see `claim`).
    last_claim_end: AtomicI64,
}

/// A free slot of this process's worker, taken for a job being submitted here: the job is
/// inserted already running under `lease()` and `run` starts it, with no claim round trip.
/// Dropping the slot (the job existed already, or the insert failed) frees it.
pub struct Slot {
    worker: Arc<Worker>,
    permit: OwnedSemaphorePermit,
    start: StartHere,
    /// Counted by the tracker from the slot's taking, so that shutdown waits for its job to be
    /// started or handed back: the insert, the lease check and the hand-back each take a
    /// round trip, and a shutdown that found no task meanwhile was over before the job was
    /// started unwatched.
    _tracked: TaskTrackerToken,
}

/// The entries a sweep of `Worker::unconfirmed` took out: those it keeps and those it has not
/// reached go back when it ends, however it ends.
struct Taken<'a> {
    rest: std::vec::IntoIter<Unconfirmed>,
    kept: Vec<Unconfirmed>,
    into: &'a Mutex<Vec<Unconfirmed>>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut into = self.into.lock().unwrap_or_else(PoisonError::into_inner);
        into.append(&mut self.kept);
        into.extend(self.rest.by_ref());
    }
}

/// Whether a sweep of `Worker::unconfirmed` keeps to each insert's `next_try`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    Paced,
    Now,
}

/// A write whose answer was lost, which may have committed all the same (see `Worker::unconfirmed`).
#[derive(Debug)]
enum Unconfirmed {
    /// A claim, by its lease's end: the jobs running under exactly that lease.
    Claim(i64),
    /// A job inserted started here (at its first attempt, under `lease`), its lease's end, and
    /// when to try its hand-back again: at most once a heartbeat's interval, for an entry stays
    /// two leases, and most such inserts never landed (a burst of them in a database blip
    /// must not add a round trip each to every claim).
    Insert {
        lease: Lease,
        until: i64,
        next_try: i64,
    },
}

impl Slot {
    pub fn lease(&self) -> &StartHere {
        &self.start
    }

    /// Hand back job `id`, whose insert under this slot's lease went unconfirmed and could not
    /// be read back: if it landed, it is running under this lease with nobody on it, and would
    /// sit so until the lease ran out, an attempt spent (a job on its last one failed without
    /// having run). The release is fenced on the job's first attempt under this lease, so it
    /// requeues that job only, and does nothing if the insert did not land; tried now, then
    /// once a heartbeat's interval (before a claim, or by `hand_back_loop`) until a lease past
    /// this one's end, as a lost claim's jobs are: an insert given up unanswered may commit late.
    pub async fn hand_back_unconfirmed(self, id: Uuid) {
        let insert = Unconfirmed::Insert {
            lease: self.start.lease_of(id),
            until: self.start.lease_expires_at,
            next_try: i64::MIN,
        };
        self.worker
            .unconfirmed
            .lock()
            .expect("unconfirmed")
            .push(insert);
        self.worker.hand_back_unconfirmed(Pace::Paced).await;
    }

    /// Run `job`, just inserted under this slot's lease; if shutdown began meanwhile, hand it
    /// back to the queue at once instead (the attempt is not spent).
    pub async fn run(self, job: Job) {
        let Slot {
            worker,
            permit,
            start,
            _tracked,
        } = self;
        // The lease the job was inserted under, not the one it was read back with: an insert
        // whose answer was slow may be read back after its lease ran out and another worker
        // claimed the job, whose run a hand-back under that lease would stop.
        let ours = start.lease_of(job.id);
        let hand_back = || async {
            with_db_retries(&worker.last_writes, || worker.store.release(&ours)).await;
        };
        if worker.tracker.is_closed() {
            hand_back().await;
            return;
        }
        // Read back after an insert whose answer was lost, the job may be another lease's by
        // now (rescued, then requeued or claimed again, by this process too): only what this
        // slot's insert started runs here, or the same attempt would run twice.
        if job.status != JobStatus::Running || job.lease().as_ref() != Some(&ours) {
            tracing::info!(job = %job.id, attempt = job.attempt,
                "the job was another lease's by the time its insert was read back; not \
                 running it here");
            return;
        }
        let Some(held_until) = worker.still_holds(&job, &start).await else {
            return;
        };
        if worker.tracker.is_closed() {
            hand_back().await;
            return;
        }
        let claimed = Claimed {
            job: Job {
                lease_expires_at: Some(held_until),
                ..job
            },
            checkpointed: false,
        };
        worker
            .tracker
            .spawn(worker.clone().execute_holding(claimed, permit));
    }
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        pipeline: Arc<Pipeline>,
        clock: SharedClock,
        config: WorkerConfig,
    ) -> Arc<Worker> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        Arc::new(Worker {
            store,
            pipeline,
            clock,
            owner: format!("{host}:{}:{}", std::process::id(), Uuid::now_v7()),
            running: Mutex::new(HashMap::new()),
            cancels_heard: Mutex::new(RecentCancels::default()),
            capacity: Arc::new(Semaphore::new(config.concurrency.max(1) as usize)),
            tracker: TaskTracker::new(),
            queue_drained: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
            last_writes: CancellationToken::new(),
            unconfirmed: Mutex::new(Vec::new()),
            last_claim_end: AtomicI64::new(i64::MIN),
            config,
        })
    }

    /// A slot to run a job being submitted in this process at once, with no claim: only while
    /// a slot is free, the dispatcher's last claim found no runnable queued job, and shutdown
    /// has not begun. `None`: the job is queued and claimed as usual.
    pub fn slot_for_new_job(self: &Arc<Self>) -> Option<Slot> {
        if self.tracker.is_closed() || !self.queue_drained.load(Ordering::SeqCst) {
            return None;
        }
        let permit = self.capacity.clone().try_acquire_owned().ok()?;
        Some(Slot {
            worker: self.clone(),
            permit,
            start: StartHere {
                owner: self.owner.clone(),
                lease_expires_at: self.held_lease_end(self.clock.now_ms()),
            },
            _tracked: self.tracker.token(),
        })
    }

    /// Whether `job`, inserted under `start`'s lease, is still this lease's to run. Its lease
    /// was counted from when the slot was taken, and the insert may have taken long (a slow
    /// commit, a lock wait): once a heartbeat's interval has gone by, the lease is renewed
    /// first; a job whose lease ran out meanwhile may have been rescued and claimed again (by
    /// this process too), and running it here as well would pay every call twice. Not held:
    /// not run here. Held: until when. Not known (the renewal failed): the lease's end as
    /// inserted, so that no new call starts in the lease's last third until a heartbeat renews
    /// it (`HeldUntil`).
    async fn still_holds(&self, job: &Job, start: &StartHere) -> Option<i64> {
        let now = self.held_now(self.clock.now_ms());
        let lease_ms = crate::store::ms(self.config.lease);
        if start.lease_expires_at - now > lease_ms * 2 / 3 {
            return Some(start.lease_expires_at);
        }
        match self
            .store
            .heartbeat(
                &self.owner,
                &[(job.id, job.attempt)],
                now,
                self.config.lease,
            )
            .await
        {
            Ok(held)
                if held
                    .iter()
                    .any(|h| h.id == job.id && h.attempt == job.attempt) =>
            {
                Some(now + lease_ms)
            }
            Ok(_) => {
                tracing::info!(job = %job.id, "lease ran out while the job was inserted; \
                    not running it here");
                None
            }
            // The lease may hold all the same: the job runs as a claimed one whose renewal
            // failed does, making no new upstream call in its lease's last third until a
            // heartbeat renews it (or finds it lost and stops it). Left to the rescuer, it
            // would lose an attempt.
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "could not renew the lease of a job \
                    that was slow to insert; running it once a heartbeat renews it");
                Some(start.lease_expires_at)
            }
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Stop a job's attempt `attempt` (and any earlier one still winding down) if this process
    /// is running it, after a cancel: its in-flight upstream calls are dropped at once.
    /// Remembered for a while, for a job claimed here as it was cancelled that has not taken its
    /// place in `running` yet (see `cancels_heard`). A later attempt runs on: a retry queued the
    /// job again after this cancel.
    fn stop_local(&self, id: Uuid, attempt: i32) {
        let now = self.clock.now_ms();
        let kept_ms = crate::store::ms(self.config.lease);
        (self.cancels_heard.lock().expect("cancels heard")).hear(id, attempt, now, kept_ms);
        let running = self.running.lock().expect("running map");
        let stopped =
            |((job, tried), _): &(&(Uuid, i32), &Running)| *job == id && *tried <= attempt;
        for (_, run) in running.iter().filter(stopped) {
            run.stop.cancel();
        }
    }

    /// Claim up to `limit` jobs and run them to the end. The building block of `run`, and a way
    /// for tests to drive the queue without sleeping.
    pub async fn run_once(self: &Arc<Self>, limit: u32) -> Result<usize, StoreError> {
        let jobs = self.claim(limit).await?;
        let n = jobs.len();
        let runs = jobs.into_iter().map(|job| self.clone().execute(job));
        futures::future::join_all(runs).await;
        Ok(n)
    }

    /// Claim up to `wanted` jobs under a new lease. A claim that failed may have committed all
    /// the same (the connection broke, or the wait ran out, after the statement went out): its
    /// jobs would then run under this process's lease with nobody on them until it ran out, an
    /// attempt spent (a job on its last one failed without having run). So the jobs running
    /// under exactly that lease are handed back at once, and again before each later claim
    /// and a heartbeat's interval apart until a lease past that lease's end: a claim given up
    /// unanswered may commit late (see `hand_back_unconfirmed`).
    async fn claim(&self, wanted: u32) -> Result<Vec<Claimed>, StoreError> {
        self.hand_back_unconfirmed(Pace::Paced).await;
        // A claim's lease ends at an odd millisecond, the leases this process renews or starts
        // jobs with at an even one (`held_now`), and each claim's later than the one before
        // (two claims within a millisecond, a clock stepped back): handing back by owner and
        // lease end then takes only what that claim took, never a job running here.
        let lease_ms = crate::store::ms(self.config.lease);
        let last = self.last_claim_end.load(Ordering::SeqCst);
        let (now, until) = claim_times(self.clock.now_ms(), lease_ms, last);
        self.last_claim_end.store(until, Ordering::SeqCst);
        let lease = Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
        let claimed = self.store.claim(&self.owner, wanted, now, lease).await;
        if let Err(e) = &claimed
            && e.may_have_committed()
        {
            let claim = Unconfirmed::Claim(until);
            self.unconfirmed.lock().expect("unconfirmed").push(claim);
            self.hand_back_unconfirmed(Pace::Paced).await;
        }
        claimed
    }

    /// The time a lease renewed or started at `now` is counted from (see `held_now`).
    fn held_now(&self, now: i64) -> i64 {
        held_now(now, crate::store::ms(self.config.lease))
    }

    /// The even lease end of a lease renewed or started at `now` (see `claim`).
    fn held_lease_end(&self, now: i64) -> i64 {
        self.held_now(now) + crate::store::ms(self.config.lease)
    }

    /// Hand back what `unconfirmed` holds (see there). `Pace::Now` tries every entry, as the
    /// worker's last sweep at shutdown must: no later claim will. A sweep dropped part way (the
    /// heartbeat's, aborted at shutdown) loses no entry: each is put back (`Taken`).
    async fn hand_back_unconfirmed(&self, pace: Pace) {
        let mut taken = Taken {
            rest: std::mem::take(&mut *self.unconfirmed.lock().expect("unconfirmed")).into_iter(),
            kept: Vec::new(),
            into: &self.unconfirmed,
        };
        let lease_ms = crate::store::ms(self.config.lease);
        let now = self.clock.now_ms();
        for write in taken.rest.by_ref() {
            let until = match &write {
                Unconfirmed::Claim(until) | Unconfirmed::Insert { until, .. } => *until,
            };
            // Kept a lease past its end, and tried at least once: a write given up unanswered
            // (after the statement timeout, which may outlast the lease) may commit late, and
            // the rescuer, once its lease ran out, clears its owner, so the match stays exact.
            if until + lease_ms <= now {
                continue;
            }
            // Kept while it is tried: put back if the sweep is dropped meanwhile.
            taken.kept.push(write);
            let write = taken.kept.last_mut().expect("just kept");
            // Whether it is done with: an insert that landed, and is handed back.
            let done = match write {
                Unconfirmed::Claim(until) => {
                    let released = self.store.release_claim(&self.owner, *until).await;
                    if let Ok(jobs @ 1..) = released {
                        tracing::warn!(
                            jobs,
                            "a claim whose answer was lost had taken jobs; handed them back"
                        );
                    }
                    released.map(|_| false)
                }
                Unconfirmed::Insert { next_try, .. } if pace == Pace::Paced && *next_try > now => {
                    Ok(false)
                }
                Unconfirmed::Insert {
                    lease, next_try, ..
                } => {
                    let released = self.store.release(lease).await;
                    // Not there (yet): tried again a heartbeat's interval on. A failed try is
                    // made again at the next sweep, which it stops.
                    if let Ok(false) = released {
                        *next_try = now + lease_ms / 3;
                    }
                    released
                }
            };
            match done {
                Ok(true) => {
                    if let Some(Unconfirmed::Insert { lease, .. }) = taken.kept.pop() {
                        tracing::warn!(job = %lease.job_id,
                            "a job inserted started here whose answer was lost had landed; \
                             handed it back");
                    }
                }
                // Kept (see above): a write given up unanswered may still commit.
                Ok(false) => {}
                // The database is away: the rest wait for the next sweep, untried.
                Err(_) => break,
            }
        }
    }

    /// Run until `shutdown` fires, then drain within the grace period and release what is left:
    /// jobs still in their pipelines are stopped and handed back, and outcomes being written go
    /// on being retried, for at most the release window.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let tracker = &self.tracker;
        let background = CancellationToken::new();
        let heartbeat = tokio::spawn(self.clone().heartbeat_loop(background.clone()));
        let rescuer = tokio::spawn(self.clone().rescue_loop(background.clone()));
        let cancels = tokio::spawn(self.clone().cancel_loop(background.clone()));
        let hand_backs = tokio::spawn(self.clone().hand_back_loop(background.clone()));

        self.dispatch_loop(&shutdown).await;

        tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            // `tasks` counts the submits whose insert is still under way too (started here
            // once it lands), which `jobs` does not yet hold.
            tracing::warn!(
                jobs = self.running.lock().expect("running map").len(),
                tasks = tracker.len(),
                "grace period over: releasing the jobs still running"
            );
            self.releasing.store(true, Ordering::SeqCst);
            for run in self.running.lock().expect("running map").values() {
                run.stop.cancel();
            }
            if tokio::time::timeout(self.config.release_window, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    jobs = self.running.lock().expect("running map").len(),
                    tasks = tracker.len(),
                    "release window over: the database has not taken these jobs' outcomes or \
                     releases; they wait out their leases"
                );
                self.last_writes.cancel();
                // A store call already under way ends on its own timeouts; do not wait on it.
                let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
            }
        }
        // No job runs here any more. A heartbeat, rescue, cancel read or hand-back under way
        // would run to its own bound (the statement timeout; with none, until TCP gives up):
        // dropped instead.
        background.cancel();
        for task in [&heartbeat, &rescuer, &cancels, &hand_backs] {
            task.abort();
        }
        let _ = tokio::join!(heartbeat, rescuer, cancels, hand_backs);
        // A claim or an insert whose answer was lost may have left jobs running here, and no
        // later claim will hand them back: one more try now, of every one, paced or not (which
        // also finds one that committed late meanwhile).
        let last_sweep = self.hand_back_unconfirmed(Pace::Now);
        if tokio::time::timeout(self.config.release_window, last_sweep)
            .await
            .is_err()
        {
            tracing::warn!(
                "the hand-back of a claim whose answer was lost did not finish in the release \
                 window; its jobs wait out their lease"
            );
        }
    }

    async fn dispatch_loop(self: &Arc<Self>, shutdown: &CancellationToken) {
        let capacity = &self.capacity;
        let wakeups = self.store.wakeups();
        let mut failures = 0u32;
        loop {
            // `biased`: shutdown first. Left to tokio's random pick, a free slot won about half
            // the time after the signal, and jobs claimed then were started only to be stopped
            // at the grace period's end, their calls in flight paid again by the next attempt.
            let mut permits = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                p = capacity.clone().acquire_owned() => p.expect("semaphore never closes"),
            };
            let extra = capacity.available_permits() as u32;
            if extra > 0
                && let Ok(more) = capacity.clone().try_acquire_many_owned(extra)
            {
                permits.merge(more);
            }
            let wanted = permits.num_permits() as u32;
            if shutdown.is_cancelled() {
                return;
            }
            let claimed = self.claim(wanted).await;
            let idle = match claimed {
                Ok(jobs) => {
                    failures = 0;
                    let got = jobs.len();
                    self.queue_drained
                        .store(got < wanted as usize, Ordering::SeqCst);
                    for job in jobs {
                        let permit = permits.split(1).expect("one permit per claimed job");
                        self.tracker
                            .spawn(self.clone().execute_holding(job, permit));
                    }
                    if got > 0 {
                        continue;
                    }
                    self.config.poll_interval
                }
                Err(e) => {
                    failures += 1;
                    self.queue_drained.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %e, "claim failed; backing off");
                    backoff(failures)
                }
            };
            drop(permits);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                // Something was queued: until the claim, jobs submitted here queue behind it.
                _ = wakeups.notified() => self.queue_drained.store(false, Ordering::SeqCst),
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    async fn execute_holding(self: Arc<Self>, claimed: Claimed, _permit: OwnedSemaphorePermit) {
        self.execute(claimed).await;
    }

    /// Run one claimed job and write its outcome, fenced on its lease.
    async fn execute(self: Arc<Self>, claimed: Claimed) {
        let Claimed { job, checkpointed } = claimed;
        let Some(lease) = job.lease() else {
            tracing::error!(job = %job.id, "claimed job has no lease owner");
            return;
        };
        let stop = CancellationToken::new();
        let key = (job.id, job.attempt);
        // A claim always sets the lease; were it missing, no call would start until a heartbeat.
        let (held_until, until) = watch::channel(job.lease_expires_at.unwrap_or(i64::MIN));
        let running = Running {
            stop: stop.clone(),
            held_until,
        };
        self.running
            .lock()
            .expect("running map")
            .insert(key, running);
        let _registered = Registered {
            running: &self.running,
            key,
        };
        let span = tracing::info_span!("job", id = %job.id, attempt = job.attempt);
        // Cancelled as it was claimed: not a single call is made. (A cancel heard from now on
        // finds the job in `running`.) One of an earlier attempt, heard late, was for the job
        // before a retry queued it again for this attempt.
        let cancelled =
            (self.cancels_heard.lock().expect("cancels heard")).stops(&job.id, job.attempt);
        let outcome = if cancelled {
            Outcome::Stopped
        } else {
            // A panic in the pipeline is a bug, but it must not leave the job `running` under a
            // lease this process keeps renewing: it becomes a retryable failure like any other.
            AssertUnwindSafe(self.run_pipeline(&job, checkpointed, &lease, &stop, until))
                .catch_unwind()
                .instrument(span.clone())
                .await
                .unwrap_or_else(|panic| {
                    let what = panic_message(panic.as_ref());
                    tracing::error!(job = %job.id, panic = what, "the pipeline panicked");
                    Outcome::retry(
                        job.next_try_at(self.clock.now_ms(), self.config.retry_base),
                        "internal_error".into(),
                        format!("internal error (a bug in fusion): {what}"),
                    )
                })
        };
        // In the job's span too: a retried outcome write logs which job it is for. Retried under
        // `last_writes`, not `stop`: see there. A finished job's time is read at each try of its
        // write, so that it says when the job finished for its readers (an SDK's retry joins a
        // job that finished just now), not when the outcome was decided before a database blip.
        let written = async {
            match &outcome {
                Outcome::Succeeded { result, last_step } => {
                    let store = self.store.as_ref();
                    fenced_write(
                        &self.last_writes,
                        || store.complete(&lease, last_step.as_ref(), result, self.clock.now_ms()),
                        || finished_as(store, &lease, JobStatus::Succeeded, None),
                    )
                    .await
                }
                Outcome::Failed { reason, error } => self.fail(&lease, reason, error).await,
                Outcome::Retry { reason, error, at } => {
                    let store = self.store.as_ref();
                    fenced_write(
                        &self.last_writes,
                        || store.retry_later(&lease, *at, reason, error),
                        || requeued(store, &lease, *at),
                    )
                    .await
                }
                Outcome::Stopped if self.releasing.load(Ordering::SeqCst) => {
                    with_db_retries(&self.last_writes, || self.store.release(&lease)).await
                }
                Outcome::Stopped => Some(false),
            }
        }
        .instrument(span)
        .await;
        match (&outcome, written) {
            (Outcome::Succeeded { .. }, Some(true)) => {
                tracing::info!(job = %job.id, "job succeeded")
            }
            (Outcome::Failed { reason, .. }, Some(true)) => {
                tracing::info!(job = %job.id, reason, "job failed")
            }
            (Outcome::Retry { reason, at, .. }, Some(true)) => {
                tracing::info!(job = %job.id, reason, "job requeued to retry later");
                self.wake_when_due(*at);
            }
            (Outcome::Stopped, _) => tracing::info!(job = %job.id, "job stopped"),
            (_, Some(false)) => {
                tracing::warn!(job = %job.id, "outcome not written: the lease was lost")
            }
            // Every try failed, or shutdown came while it waited to try again.
            (_, None) => tracing::warn!(job = %job.id,
                "outcome not written: the database did not take it; the job waits out its lease"),
        }
    }

    /// Wake the dispatcher once a job requeued here is due (`at`, on the aligned clock), so that
    /// it runs again then, not at the next poll: nothing else says it is due (Postgres's
    /// NOTIFY of a requeue comes at its commit, before then). Another process's requeue is
    /// found by its own timer, or by the poll.
    fn wake_when_due(&self, at: i64) {
        // A millisecond past `at`, so that the claim it wakes finds the job due.
        let wait = u64::try_from(at.saturating_sub(self.clock.now_ms())).unwrap_or(0) + 1;
        let wakeups = self.store.wakeups();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            wakeups.notify_one();
        });
    }

    /// Fail the job `lease` holds (a terminal outcome, confirmed as `complete`'s is).
    async fn fail(&self, lease: &Lease, reason: &str, error: &str) -> Option<bool> {
        let store = self.store.as_ref();
        fenced_write(
            &self.last_writes,
            || store.fail(lease, reason, error, self.clock.now_ms()),
            || finished_as(store, lease, JobStatus::Failed, Some(reason)),
        )
        .await
    }

    async fn run_pipeline(
        &self,
        job: &Job,
        checkpointed: bool,
        lease: &Lease,
        stop: &CancellationToken,
        until: watch::Receiver<i64>,
    ) -> Outcome {
        let deadline_passed = || Outcome::Failed {
            reason: "deadline_exceeded".into(),
            error: "the job did not finish before its deadline".into(),
        };
        let remaining = job.deadline_at.map(|d| d - self.clock.now_ms());
        if remaining.is_some_and(|r| r <= 0) {
            return deadline_passed();
        }
        // The deadline stops the work as a cancel does, through a token of its own: the
        // pipeline returns once the calls under way are dropped and the checkpoints of the
        // answers already in have landed (written on `stop`, which the deadline leaves alone).
        // Dropping the pipeline at the deadline, as before, dropped those writes with it, and a
        // manual retry paid for those answers again. The clock runs from here, so the reading
        // back of checkpoints (with its retries through a database outage) counts too.
        let within = stop.child_token();
        let ckpt = LeaseCheckpoints {
            store: self.store.as_ref(),
            lease,
            stop,
            held: HeldUntil {
                until,
                clock: self.clock.clone(),
                margin_ms: crate::store::ms(self.config.lease / 3),
            },
        };
        let work = async {
            // Nothing checkpointed (the claim says so, e.g. a first claim): nothing to read back.
            let done = if checkpointed {
                let read = || self.store.get_steps(job.id);
                match retry_db(&within, Patience::Tries(DB_ATTEMPTS), read).await {
                    Ok(done) => done,
                    // Stopped here, each attempt waited out its lease and the job ended as
                    // `lease_expired`. Requeued instead: in a rolling upgrade a newer worker
                    // may claim it next and read them; failed on its last attempt.
                    Err(e) if e.is_unreadable() => {
                        return Outcome::retry(
                            job.next_try_at(self.clock.now_ms(), self.config.retry_base),
                            "invalid_job".into(),
                            format!(
                                "this job's checkpoints cannot be read by fusion {}: {e}",
                                env!("CARGO_PKG_VERSION")
                            ),
                        );
                    }
                    Err(_) => return Outcome::Stopped,
                }
            } else {
                Vec::new()
            };
            let retry_base = self.config.retry_base;
            self.pipeline
                .run(job, done, &ckpt, &within, retry_base)
                .await
        };
        let outcome = match remaining {
            Some(r) => {
                let mut work = std::pin::pin!(work);
                tokio::select! {
                    biased;
                    outcome = &mut work => outcome,
                    _ = tokio::time::sleep(Duration::from_millis(r as u64)) => {
                        within.cancel();
                        work.await
                    }
                }
            }
            None => work.await,
        };
        // Stopped by the deadline, not by a cancel, a lost lease or shutdown (those cancel
        // `stop`): the job failed. Any other outcome reached meanwhile (an answer in as the
        // deadline came) stands.
        if matches!(outcome, Outcome::Stopped) && within.is_cancelled() && !stop.is_cancelled() {
            return deadline_passed();
        }
        outcome
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        // At a fixed rate, not a fixed pause after each heartbeat: a slow one does not push the
        // next one back, and with it each job's renewal towards the point where it stops calling
        // (`HeldUntil`: a heartbeat's interval before its lease runs out).
        let every = self.config.lease / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.heartbeat().await;
        }
    }

    /// Hand back, at a heartbeat's interval, the claims and inserts whose answer was lost, as
    /// each claim does first: a worker whose slots are all busy claims nothing, and one due
    /// meanwhile would wait for a slot to free. In a task of its own, so that a slow hand-back
    /// (a row locked elsewhere) never holds a renewal back; aborted at shutdown part way, it
    /// loses no entry (`Taken`).
    async fn hand_back_loop(self: Arc<Self>, stop: CancellationToken) {
        let every = self.config.lease / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.hand_back_unconfirmed(Pace::Paced).await;
        }
    }

    /// Renew every lease at once; any job no longer held (cancelled elsewhere, or rescued after a
    /// stall) is stopped so it writes nothing more.
    pub async fn heartbeat(&self) {
        let snapshot: Vec<(Uuid, i32)> = self
            .running
            .lock()
            .expect("running map")
            .keys()
            .copied()
            .collect();
        if snapshot.is_empty() {
            return;
        }
        // Only the attempts this process runs: a job it stopped running without writing an
        // outcome must not be kept alive by its owner's heartbeat, nor a later attempt of it
        // that a claim whose answer was lost took (see `Store::heartbeat`).
        let now = self.held_now(self.clock.now_ms());
        let held = match self
            .store
            .heartbeat(&self.owner, &snapshot, now, self.config.lease)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                return;
            }
        };
        // The store renewed the held leases to what it was sent: `now` plus the lease.
        let renewed_until = now + crate::store::ms(self.config.lease);
        // A set: with thousands of jobs running, a scan of `held` per job is millions of steps.
        let held: HashSet<(Uuid, i32)> = held.iter().map(|h| (h.id, h.attempt)).collect();
        let running = self.running.lock().expect("running map");
        for key in snapshot {
            let Some(run) = running.get(&key) else {
                continue;
            };
            let (id, attempt) = key;
            if held.contains(&key) {
                // What the database now holds, even if earlier than what was known (the clock
                // stepped back, or an older heartbeat answered last): never later than it.
                run.held_until.send_if_modified(|until| {
                    let changed = *until != renewed_until;
                    *until = renewed_until;
                    changed
                });
            } else {
                tracing::info!(job = %id, attempt, "lease lost or job cancelled: stopping it");
                run.stop.cancel();
            }
        }
    }

    /// Stop jobs as soon as the store says they were cancelled; when it may have missed saying
    /// so, re-check every lease now (the heartbeat stops a job whose lease is gone).
    async fn cancel_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut events = self.store.events();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = events.recv() => match event {
                    Ok(JobEvent::Finished { job_id, status: JobStatus::Cancelled, attempt }) => {
                        self.stop_local(job_id, attempt)
                    }
                    Ok(JobEvent::Missed) => self.heartbeat().await,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "job events lagged; re-checking every lease");
                        self.heartbeat().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn rescue_loop(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.config.lease / 2).min(Duration::from_secs(1));
        let mut jumps = JumpWatch::new(self.clock.now_ms(), self.config.lease);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.clock.now_ms();
            if !jumps.may_rescue(now, std::time::Instant::now()) {
                continue;
            }
            match self.store.rescue_expired(now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "rescued jobs whose lease expired"),
                Err(e) => tracing::warn!(error = %e, "rescue failed"),
            }
        }
    }
}

/// Watches the clock leases are written on against the monotonic clock. A wall clock stepped
/// forward (NTP correcting it, a host resumed from a suspend) makes every lease written before the
/// step look older than it is, and the rescuer would take back jobs whose workers are alive and
/// whose heartbeats would renew them on the new clock within a third of a lease: each job would
/// pay its calls in flight again, and one on its last attempt fail as `lease_expired`. (SQLite
/// has no clock of its own, so its leases are on this host's wall clock; on Postgres a step of
/// the database's clock is seen at the next alignment.) After a forward jump of over a quarter
/// of a lease, rescues wait half a lease: every process on the host saw the same step, and its
/// heartbeats renew its leases meanwhile.
struct JumpWatch {
    last: (i64, std::time::Instant),
    lease: Duration,
    held_until: Option<std::time::Instant>,
}

impl JumpWatch {
    fn new(now_ms: i64, lease: Duration) -> JumpWatch {
        JumpWatch {
            last: (now_ms, std::time::Instant::now()),
            lease,
            held_until: None,
        }
    }

    /// Whether a rescue may run at `now_ms`, read at `at`. (Ticks are compared one with the next:
    /// several small steps in a row, each under a quarter of a lease, are not seen.)
    fn may_rescue(&mut self, now_ms: i64, at: std::time::Instant) -> bool {
        let (then_ms, then) = std::mem::replace(&mut self.last, (now_ms, at));
        let jumped = (now_ms - then_ms) - crate::store::ms(at.saturating_duration_since(then));
        if jumped > crate::store::ms(self.lease / 4) {
            tracing::warn!(
                jumped_ms = jumped,
                "the clock jumped forward: no lease is taken back for half a lease, while the \
                 heartbeats renew theirs on the new clock"
            );
            self.held_until = Some(at + self.lease / 2);
        }
        self.held_until.is_none_or(|until| at >= until)
    }
}

/// What a caught panic said (its payload is a `&str` or a `String` when it came from `panic!`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with no message")
}

/// Exponential backoff for database failures: 100 ms × 2^`failures`, at most 5 s (the first
/// wait, after one failure, is 200 ms).
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

/// `now`, or a millisecond before it, so that a lease of `lease_ms` renewed or started then
/// ends at an even millisecond (see `Worker::claim`).
fn held_now(now: i64, lease_ms: i64) -> i64 {
    now - (now + lease_ms).rem_euclid(2)
}

/// `now`, or a millisecond after it, so that a claim's lease of `lease_ms` ends at an odd
/// millisecond (see `Worker::claim`).
fn claim_now(now: i64, lease_ms: i64) -> i64 {
    now + 1 - (now + lease_ms).rem_euclid(2)
}

/// A claim's time and its lease's end, given the clock's `now` and the end of the last claim's
/// lease: the end odd and later than `last`. The time stays the clock's (a millisecond on at
/// most): after the clock stepped back, only the lease is longer, so that jobs waiting out a
/// backoff are not taken early, nor stamped as started in the future.
fn claim_times(now: i64, lease_ms: i64, last: i64) -> (i64, i64) {
    let now = claim_now(now, lease_ms);
    (now, (now + lease_ms).max(last.saturating_add(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only a forward jump of over a quarter of a lease holds rescues, for half a lease from
    // when it is seen; time passing, a late tick, or a step back do not.
    #[test]
    fn rescues_wait_half_a_lease_after_the_clock_jumps_forward() {
        let lease = Duration::from_secs(8);
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut watch = JumpWatch {
            last: (1_000_000, t0),
            lease,
            held_until: None,
        };
        assert!(watch.may_rescue(1_001_000, at(1)), "a second passed");
        assert!(watch.may_rescue(1_004_000, at(4)), "a late tick");
        assert!(watch.may_rescue(1_000_000, at(5)), "a step back");
        assert!(
            watch.may_rescue(1_003_000, at(6)),
            "a 2 s jump: a quarter lease"
        );
        assert!(!watch.may_rescue(1_006_001, at(7)), "a 2.001 s jump");
        assert!(!watch.may_rescue(1_008_001, at(9)), "held");
        assert!(
            watch.may_rescue(1_010_001, at(11)),
            "half a lease since it was seen"
        );
    }

    // A claim's lease and a renewed or started one never end at the same millisecond: handing
    // back a lost claim by its lease end cannot take a job this process runs.
    #[test]
    fn claims_and_renewals_end_their_leases_apart() {
        for lease_ms in [30_000, 2_000, 1_001] {
            for now in 1_750_000_000_000..1_750_000_000_004 {
                let claimed = claim_now(now, lease_ms) + lease_ms;
                let held = held_now(now, lease_ms) + lease_ms;
                assert_eq!(claimed.rem_euclid(2), 1, "{now} {lease_ms}");
                assert_eq!(held.rem_euclid(2), 0, "{now} {lease_ms}");
                assert!((0..=1).contains(&(claim_now(now, lease_ms) - now)));
                assert!((0..=1).contains(&(now - held_now(now, lease_ms))));
            }
        }
    }

    // Claims' leases end later each time, odd, even after the clock stepped back; the claim's
    // own time, which says which jobs are due and when they started, stays the clock's.
    #[test]
    fn a_clock_stepped_back_lengthens_the_claims_lease_not_its_time() {
        let lease_ms = 30_000;
        let before = 1_750_000_300_000;
        let (time, first) = claim_times(before, lease_ms, i64::MIN);
        assert_eq!((time, first), (before + 1, before + 1 + lease_ms));
        // Five minutes back.
        let now = before - 300_000;
        let (time, end) = claim_times(now, lease_ms, first);
        assert_eq!(time, now + 1, "the claim's time is the clock's");
        assert_eq!(end, first + 2, "its lease ends after the last claim's");
        // Within the same millisecond.
        assert_eq!(claim_times(now, lease_ms, end), (now + 1, end + 2));
        // The clock caught up: the plain lease again.
        let later = before + 60_000;
        assert_eq!(
            claim_times(later, lease_ms, end),
            (later + 1, later + 1 + lease_ms)
        );
    }

    #[test]
    fn cancels_are_forgotten_a_lease_after_they_were_heard_and_only_then() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut heard = RecentCancels::default();
        let known = |heard: &RecentCancels, id| heard.stops(&id, 1);
        heard.hear(a, 1, 0, 100);
        heard.hear(b, 1, 50, 100);
        heard.hear(c, 1, 60, 100);
        assert!(known(&heard, a) && known(&heard, b) && known(&heard, c));
        heard.hear(c, 2, 100, 100); // heard again (retried, claimed, cancelled): kept from then
        assert!(!known(&heard, a), "heard a lease ago");
        assert!(known(&heard, b) && known(&heard, c));
        heard.hear(b, 1, 159, 100);
        assert!(known(&heard, c), "heard again 59 ms ago");
        heard.hear(b, 1, 200, 100);
        assert!(!known(&heard, c));
        assert_eq!((heard.last_heard.len(), heard.heard.len()), (1, 2));
    }

    // A cancel stops the attempt it was for, and one still winding down from before, not a
    // later one: that is a retry's, of the job the cancel was for, however late the cancel's
    // news arrives.
    #[test]
    fn a_cancel_stops_its_attempt_and_earlier_ones_only() {
        let id = Uuid::now_v7();
        let mut heard = RecentCancels::default();
        heard.hear(id, 2, 1_000, 30_000);
        assert!(heard.stops(&id, 2) && heard.stops(&id, 1));
        assert!(!heard.stops(&id, 3));
        assert!(!heard.stops(&Uuid::now_v7(), 1));
        // The first attempt's cancel, heard late, does not take back the second's.
        heard.hear(id, 1, 1_500, 30_000);
        assert!(heard.stops(&id, 2));
        assert_eq!(
            heard.last_heard[&id],
            Heard {
                at: 1_500,
                attempt: 2
            }
        );
    }
}
