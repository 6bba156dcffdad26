//! The durable queue: one `Store` trait shaped by what the API and the workers need, with one
//! implementation per database (`sqlite.rs`, `postgres.rs`), chosen once from the URL scheme.
//!
//! Every write a worker makes goes through a `Lease` and is fenced on
//! `(id, attempt, lease_owner, status = running)`: a worker that lost its job can change nothing.
//! The store knows nothing of LLMs; times are unix milliseconds passed in by the caller, so lease
//! logic is testable without sleeping.

/// The columns of a job row, as each backend's `job_from_row` reads them (by name; a macro so
/// that queries stay `&'static str` via `concat!`). `job_columns!(SPEC, RESULT)` reads the
/// expressions `SPEC` and `RESULT` in place of the two stored columns: job lists, whose summaries
/// show neither the request's messages nor the result, read the spec without its messages and
/// no result (a page of 100 jobs read whole would hold 100 message trees, up to ~20 MiB each,
/// `api::body`).
macro_rules! job_columns {
    () => {
        job_columns!("spec", "result")
    };
    ($spec:literal, $result:literal) => {
        concat!(
            "id, status, ",
            $spec,
            " AS spec, metadata, priority, attempt, max_attempts, run_at, deadline_at, \
             lease_owner, lease_expires_at, idempotency_key, request_hash, created_at, \
             started_at, finished_at, failure_reason, error, ",
            $result,
            " AS result"
        )
    };
}

/// The query of a job's checkpoints, as each backend's `step_from_row` reads them, `$job` being
/// its placeholder for the job's id: `steps_sql!(whole, ..)` for `Store::get_steps`,
/// `steps_sql!(heads, ..)` for `Store::step_heads` (the texts read as NULL, so the same row
/// reader serves both).
macro_rules! steps_sql {
    (whole, $job:literal) => {
        steps_sql!("content", "data", "error", $job)
    };
    (heads, $job:literal) => {
        steps_sql!(
            "CAST(NULL AS TEXT)",
            "CAST(NULL AS JSONB)",
            "CAST(NULL AS TEXT)",
            $job
        )
    };
    ($content:literal, $data:literal, $error:literal, $job:literal) => {
        concat!(
            "SELECT step, model, ok, ",
            $content,
            " AS content, ",
            $data,
            " AS data, prompt_tokens, completion_tokens, cost, latency_ms, error_code, ",
            $error,
            " AS error, status_code, attempt, created_at FROM steps WHERE job_id = ",
            $job
        )
    };
}

mod batch;
#[cfg(test)]
mod half_open;
mod pg_writes;
pub mod postgres;
pub mod sqlite;
mod sqlite_writes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use serde_json::Value;

use crate::job::{
    Job, JobSpec, JobStatus, JsonText, Lease, ListFilter, NewJob, StartHere, Step, StepKey,
};
use crate::redact::redact_url;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "{} gave up after waiting {waited:?} for a lock: a transaction of another session \
         holds a conflicting one (see pg_stat_activity); statements queue behind a waiting \
         migration, so it does not wait longer",
        version.map_or("the migrator".to_string(), |v| format!("migration {v}"))
    )]
    MigrationBlocked {
        /// The migration that gave up; `None`: a statement of the migrator's own.
        version: Option<i64>,
        waited: Duration,
    },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("unsupported database url `{0}`: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether the database could not serve the call for now, so that the same call a little
    /// later may well succeed (an API answers 503, not 500): no connection in time, a broken or
    /// refused connection, a database shutting down or out of resources (Postgres classes 08,
    /// 53 and 57 but a dropped database, the statement timeout among them), a serialization
    /// failure or deadlock, a lock not available, a busy or locked SQLite file, or one that is
    /// out of disk or memory (see `sqlite_unavailable`).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => unavailable(e),
            _ => false,
        }
    }

    /// Whether opening or migrating the store may succeed if tried again shortly: the database
    /// out of reach for now (`is_unavailable`), in a migration's statements too, or a migration
    /// that could not take its lock. Not a refused password, a database that does not exist, or
    /// a migration history this build does not know.
    pub fn may_pass_at_start(&self) -> bool {
        use sqlx::migrate::MigrateError;
        match self {
            StoreError::MigrationBlocked { .. } => true,
            StoreError::Migrate(
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _),
            ) => unavailable(e),
            _ => self.is_unavailable(),
        }
    }

    /// Whether the rows asked for came back but do not read: a value this build cannot parse or
    /// decode (written by a newer build, or edited by hand). Asking again reads the same.
    pub fn is_unreadable(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt(_)
                | StoreError::Database(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_))
        )
    }

    /// Whether a failed call may have committed all the same: its connection broke or its
    /// answer was given up waiting for (both surface as I/O errors) after the statement went
    /// out. A pool out of connections, a busy SQLite file or a refusal never ran it.
    pub fn may_have_committed(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Io(io)) => {
                !io.get_ref().is_some_and(|e| e.is::<NotSent>())
            }
            StoreError::Database(sqlx::Error::WorkerCrashed) => true,
            _ => false,
        }
    }
}

/// An I/O error met before any statement went out (opening a connection: an unreachable host, a
/// reset handshake), so that nothing ran: still unavailable (503, retried), but known not to
/// have committed.
#[derive(Debug)]
struct NotSent(std::io::Error);

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for NotSent {}

/// `e`, marked as met before any statement went out when it is an I/O error.
pub(crate) fn not_sent(e: sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), NotSent(io))),
        other => other,
    }
}

fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => match refusal(db.as_ref()) {
            Refusal::Postgres(code) => postgres_unavailable(code),
            Refusal::Sqlite(primary) => sqlite_unavailable(primary),
            Refusal::Other => false,
        },
        _ => false,
    }
}

/// Whether a SQLite primary result code says the file cannot serve the call for now: busy or
/// locked by another writer, a locking protocol failure (`SQLITE_PROTOCOL`), or out of a
/// resource, as Postgres's class 53 says it: a full disk (`SQLITE_FULL`) or memory
/// (`SQLITE_NOMEM`). The statement did not take effect. Not `SQLITE_CANTOPEN`: a wrong path,
/// or a directory without permission, says it too, for good, and the start waits only for
/// what may pass.
fn sqlite_unavailable(primary: i32) -> bool {
    matches!(
        primary,
        SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_FULL | SQLITE_PROTOCOL
    )
}

/// Whether a Postgres SQLSTATE says the database cannot serve the call for now: connection
/// trouble (08), resources (53), an operator or a timeout (57, but a dropped database, which
/// does not come back), a serialization failure or deadlock (40001, 40P01), a lock not available,
/// or a server taking no writes (`READ_ONLY`: a standby reached after a failover, through a
/// stale DNS name or pooler, until they point at the new primary).
fn postgres_unavailable(code: &str) -> bool {
    let class = |c: &str| code.starts_with(c);
    let codes = ["40001", "40P01", "55P03", READ_ONLY];
    (class("08") || class("53") || class("57") || codes.contains(&code)) && code != "57P04"
}

/// `read_only_sql_transaction`.
pub(crate) const READ_ONLY: &str = "25006";

/// An error that may say the server takes no writes (Postgres's `bounded`, the batches).
pub(crate) trait OnReadOnly {
    fn read_only(&self) -> bool;
}

impl OnReadOnly for sqlx::Error {
    fn read_only(&self) -> bool {
        match self {
            sqlx::Error::Database(db) => {
                matches!(refusal(db.as_ref()), Refusal::Postgres(READ_ONLY))
            }
            _ => false,
        }
    }
}

impl OnReadOnly for StoreError {
    fn read_only(&self) -> bool {
        matches!(self, StoreError::Database(e) if e.read_only())
    }
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_NOMEM: i32 = 7;
const SQLITE_FULL: i32 = 13;
const SQLITE_PROTOCOL: i32 = 15;

/// Which database refused a statement, and its code for why.
pub(crate) enum Refusal<'a> {
    /// The SQLSTATE.
    Postgres(&'a str),
    /// The primary result code (the low byte of the extended one).
    Sqlite(i32),
    Other,
}

pub(crate) fn refusal(db: &dyn sqlx::error::DatabaseError) -> Refusal<'_> {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return Refusal::Postgres(pg.code());
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        let code = db.code().and_then(|c| c.parse::<i32>().ok());
        return code.map_or(Refusal::Other, |c| Refusal::Sqlite(c & 0xff));
    }
    Refusal::Other
}

/// What `enqueue` did.
#[derive(Debug, Clone)]
pub enum Enqueued {
    Created(Job),
    /// The idempotency key was seen before with the same request: the earlier job.
    Existing(Job),
    /// The idempotency key was seen before with a different request.
    KeyReused(Job),
}

/// Where a job stands, as a waiting request follows it (`Store::progress`): any change in
/// these is news for its waits and streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub id: Uuid,
    pub status: JobStatus,
    pub attempt: i32,
    /// How many checkpoints it has, and when the latest was written (a step run again after a
    /// retry is written anew).
    pub steps: i64,
    pub last_step_at: Option<i64>,
}

/// What `cancel` did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// The job was queued or running and is now cancelled; `was_running` tells whether a worker
    /// must be told to stop.
    Cancelled {
        job: Job,
        was_running: bool,
    },
    /// Already final: nothing changed.
    AlreadyFinal(Job),
    NotFound,
}

/// What a manual retry did.
#[derive(Debug, Clone)]
pub enum RetryOutcome {
    Requeued(Job),
    /// Only failed and cancelled jobs can be retried.
    NotRetryable(Job),
    NotFound,
}

/// A job just claimed.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub job: Job,
    /// Whether any step of it is checkpointed (from an earlier attempt): the worker reads its
    /// steps only then, so a fresh job costs no read.
    pub checkpointed: bool,
}

/// A job held by a worker whose lease was just renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: Uuid,
    pub attempt: i32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Apply this backend's migrations.
    async fn migrate(&self) -> Result<()>;
    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// The database's own clock (unix milliseconds) when the store is shared by many hosts
    /// (Postgres), for each process to align its clock with (`clock::AlignedClock`); `None` for
    /// a store only one host uses (SQLite).
    async fn database_now_ms(&self) -> Result<Option<i64>>;
    /// Insert a queued job, or find the earlier one under the same idempotency key. With
    /// `start`, a new job is inserted running its first attempt under that lease, for the
    /// caller's process to run with no claim (and no worker is woken); an earlier job comes back
    /// as it is.
    async fn enqueue(&self, job: NewJob, start: Option<StartHere>) -> Result<Enqueued>;
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>>;
    /// A job's status alone, for a wait that re-reads it until it is final: no request (its
    /// messages, possibly megabytes) read or parsed each time. `None` when there is no such job.
    async fn job_status(&self, id: Uuid) -> Result<Option<JobStatus>> {
        Ok(self.get_job(id).await?.map(|job| job.status))
    }
    /// The newest job made from a request with this hash (`NewJob::request_hash`) at or after
    /// `since` (ms) that is queued, running, or finished at or after `finished_since`: an
    /// OpenAI SDK's automatic retry of a call it gave up waiting on finds the job the first
    /// call made.
    async fn find_by_request(
        &self,
        request_hash: &str,
        since: i64,
        finished_since: i64,
    ) -> Result<Option<Job>>;
    /// Every checkpoint of a job, in step order.
    async fn get_steps(&self, id: Uuid) -> Result<Vec<Step>>;
    /// Every checkpoint of a job, in step order, without its texts: `content`, `data` and
    /// `error` are `None`. What a stream's progress lines need (which step, which model,
    /// whether it answered), read on each event of the job without its answers, which may be
    /// long. By default `get_steps` with the texts dropped.
    async fn step_heads(&self, id: Uuid) -> Result<Vec<Step>> {
        let steps = self.get_steps(id).await?;
        Ok(steps.into_iter().map(Step::head).collect())
    }
    /// Where each job of `ids` that exists stands (`Progress`), in one read: what the waiting
    /// requests of a process re-read each second together, for what no event told them (a
    /// job finished, or a step written, in another process).
    async fn progress(&self, ids: &[Uuid]) -> Result<Vec<Progress>>;
    async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<Job>>;
    async fn cancel(&self, id: Uuid, now: i64) -> Result<CancelOutcome>;
    /// Put a failed or cancelled job back in the queue; its successful checkpoints are kept and
    /// reused, its failed steps are marked superseded (`job::SUPERSEDED`) so they run again,
    /// their usage still counted. A job with a deadline gets its whole deadline again, counted from `now`.
    async fn retry_failed(&self, id: Uuid, now: i64) -> Result<RetryOutcome>;

    /// Move up to `limit` runnable queued jobs to running under `owner`, highest priority
    /// first. No job is ever handed to two claimers. Postgres takes them in one statement;
    /// SQLite in one statement per priority, each committed on its own.
    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Claimed>>;
    /// Extend the lease of each of `jobs` (id and attempt) that `owner` still holds; returns
    /// those. Only the attempts named: a job left `running` under this owner that the process
    /// no longer runs (its outcome never written) must see its lease run out, and be rescued;
    /// and a later attempt of a job the process still winds down an earlier one of (taken by a
    /// claim whose answer was lost) must keep its claim's lease end, by which it is handed back.
    async fn heartbeat(
        &self,
        owner: &str,
        jobs: &[(Uuid, i32)],
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Held>>;
    /// Requeue running jobs whose lease expired (or fail them once attempts are used up);
    /// returns how many were touched.
    async fn rescue_expired(&self, now: i64) -> Result<u64>;

    /// Write one step checkpoint; false when fenced out (the lease is gone).
    async fn save_step(&self, lease: &Lease, step: &Step) -> Result<bool>;
    /// Mark the job succeeded with `result`, writing `last` (its final step, when not yet
    /// checkpointed) in the same commit: both or neither, false when fenced out.
    async fn complete(
        &self,
        lease: &Lease,
        last: Option<&Step>,
        result: &JsonText,
        now: i64,
    ) -> Result<bool>;
    async fn fail(&self, lease: &Lease, reason: &str, error: &str, now: i64) -> Result<bool>;
    /// Back to queued until `run_at`, keeping checkpoints (a retryable failure).
    async fn retry_later(
        &self,
        lease: &Lease,
        run_at: i64,
        reason: &str,
        error: &str,
    ) -> Result<bool>;
    /// Back to queued now without spending the attempt (graceful shutdown): it allows one more
    /// (`max_attempts + 1`), while `attempt` stays, so that no two leases share a number.
    async fn release(&self, lease: &Lease) -> Result<bool>;
    /// `release` every job still running under `owner`'s lease that runs out at exactly
    /// `lease_expires_at`: what a claim took whose answer was lost (it committed, then the
    /// connection broke or the wait ran out), so that its jobs go back to the queue at once
    /// instead of waiting out a lease nobody holds, an attempt spent. How many went back.
    async fn release_claim(&self, owner: &str, lease_expires_at: i64) -> Result<u64>;

    /// Woken whenever work may be available (an enqueue in this process, or — on Postgres — a
    /// NOTIFY from any process).
    fn wakeups(&self) -> Arc<Notify>;

    /// Step checkpoints written by this process, and jobs finishing (in this process, or — on
    /// Postgres — in any): a cancelled job's worker stops at once, waiters and streams wake
    /// without polling.
    fn events(&self) -> broadcast::Receiver<JobEvent>;
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// A step checkpoint was written.
    Step { job_id: Uuid, step: StepKey },
    /// The job reached a final state in its attempt `attempt` (a cancelled job retried later
    /// runs as a later attempt, which a cancel heard late must not stop).
    Finished {
        job_id: Uuid,
        status: JobStatus,
        attempt: i32,
    },
    /// Events of any job may have been lost (Postgres: the LISTEN connection was down, and
    /// listens again): whoever waits on one re-reads the store now.
    Missed,
}

impl JobEvent {
    /// The job the event is about; `None` for `Missed`, which is about all of them.
    pub fn job_id(&self) -> Option<Uuid> {
        match self {
            JobEvent::Step { job_id, .. } | JobEvent::Finished { job_id, .. } => Some(*job_id),
            JobEvent::Missed => None,
        }
    }

    /// Parse the NOTIFY payload of the Postgres `fusion_notify_finished` trigger:
    /// `done ID STATUS ATTEMPT` (since migration 0013; steps are not NOTIFYed since 0002).
    pub(crate) fn from_payload(payload: &str) -> Option<JobEvent> {
        let mut parts = payload.split(' ');
        let (kind, id, status) = (parts.next()?, parts.next()?, parts.next()?);
        let attempt = parts.next()?.parse().ok()?;
        (kind == "done" && parts.next().is_none()).then_some(())?;
        Some(JobEvent::Finished {
            job_id: Uuid::parse_str(id).ok()?,
            status: JobStatus::parse(status)?,
            attempt,
        })
    }
}

/// Room for events not yet read by a slow receiver; a lagging one re-reads the store (waiters
/// learn of what they missed from their process's read of every watched job's progress, and
/// the heartbeat notices every cancelled job anyway).
pub(crate) const EVENT_BACKLOG: usize = 4096;

/// How a store connects, beyond its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Postgres: the most connections this process opens, its listener's included (which holds
    /// one for good); less than `MIN_CONNECTIONS` is raised to it (the CLI refuses it). Every
    /// `serve` and `worker` process opens up to this many, so their sum must fit the server's
    /// `max_connections` (100 by default), but for connections closed after going silent (a
    /// statement past its bound, a replaced listener's), which the server keeps until its own TCP
    /// gives up, and the migration's own at start-up. SQLite keeps one writer and a few readers
    /// whatever this says.
    pub max_connections: u32,
    /// Postgres: the longest any statement of this process may run (`statement_timeout` on
    /// each of its connections), lock waits included; `None`: no limit. A lock held elsewhere
    /// (a long transaction in `psql`, a stuck migration) then fails the writes waiting behind it,
    /// which are retried, instead of stalling the one batch committer, and with it every
    /// checkpoint, outcome and enqueue of the process, for as long as the lock is held.
    /// Migrations run without it. SQLite waits at most its busy timeout (10 s) for a lock.
    pub statement_timeout: Option<Duration>,
}

impl StoreOptions {
    /// The fewest Postgres connections a process works with: the listener's, one for the
    /// batch committer, one for claims and reads.
    pub const MIN_CONNECTIONS: u32 = 3;
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_connections: 16,
            statement_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Open the store named by `url` (`sqlite://…` or `postgres://…`) with the default options.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    connect_with(url, StoreOptions::default()).await
}

/// Open the store named by `url` (`sqlite://…` or `postgres://…`).
pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url, options).await?))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// How a job row's spec is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpecRead {
    /// To run the job (a claim): a spec that does not parse is an error.
    ToRun,
    /// To show or answer with the job: what reads of it (`JobSpec::salvage`) when it does not
    /// parse, so that one such row neither breaks a listing nor hides the job's failure.
    ToShow,
}

/// A stored spec, as its JSON text (SQLite's column; Postgres's `jsonb` as sent), read `how`:
/// parsed straight into a `JobSpec`, and only when that fails a second time for `salvage`.
pub(crate) fn spec_from_text(text: &str, how: SpecRead) -> Result<JobSpec> {
    match serde_json::from_str(text) {
        Ok(spec) => Ok(spec),
        Err(e) if how == SpecRead::ToRun => Err(bad_spec(e)),
        Err(_) => Ok(JobSpec::salvage(
            &serde_json::from_str(text).unwrap_or(Value::Null),
        )),
    }
}

fn bad_spec(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("bad job spec: {e}"))
}

pub(crate) fn status_from_db(s: &str) -> Result<JobStatus> {
    JobStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown job status `{s}`")))
}

/// The claim's rows (a job's columns and `checkpointed`) as claimed jobs, in the order they were
/// picked (`RETURNING` does not keep it): highest priority, then longest runnable. A row that
/// does not read as a job (a spec this build cannot parse, or a column of another type: edited by
/// hand, or written by a build with an incompatible format) is failed as `invalid_job` under the lease just taken, and the
/// rest are claimed: failing the claim instead left every job it took running with no worker
/// until their leases ran out, and the next claim took the same unreadable job first again, so
/// one such row stalled the queue.
async fn claimed_from<R: sqlx::Row>(
    store: &dyn Store,
    owner: &str,
    now: i64,
    rows: &[R],
    job: fn(&R) -> Result<Job>,
    id: fn(&R) -> Result<Uuid>,
) -> Result<Vec<Claimed>>
where
    bool: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        match job(row) {
            Ok(job) => claimed.push(Claimed {
                job,
                // Unreadable, the checkpoints are read (as if there were some), not skipped.
                checkpointed: row.try_get("checkpointed").unwrap_or(true),
            }),
            // Any error here is this row's: a spec that does not parse, or a column that does
            // not decode (a value of another type, edited by hand).
            Err(why) => {
                let (job_id, attempt) = match (id(row), row.try_get("attempt")) {
                    (Ok(job_id), Ok(attempt)) => (job_id, attempt),
                    (job_id, attempt) => {
                        // Not even its lease can be named: it is left running under this
                        // claim's, which runs out, and the rescuer requeues it, then fails it
                        // once its attempts are spent. The rest of the claim runs.
                        tracing::error!(error = %why, id = ?job_id.err(), attempt = ?attempt.err(),
                            "a claimed job does not read, nor does its id or attempt; \
                             leaving it to its lease");
                        continue;
                    }
                };
                let lease = Lease {
                    job_id,
                    attempt,
                    owner: owner.to_string(),
                };
                tracing::error!(job = %lease.job_id, error = %why,
                    "a claimed job does not read; failing it as invalid_job");
                let error = format!(
                    "this job cannot be read by fusion {}: {why}",
                    env!("CARGO_PKG_VERSION")
                );
                if let Err(e) = store.fail(&lease, "invalid_job", &error, now).await {
                    // Left running: its lease runs out and the next claim tries again.
                    tracing::warn!(job = %lease.job_id, error = %e, "failing an unreadable job failed");
                }
            }
        }
    }
    claimed.sort_by(|a, b| {
        (b.job.priority.cmp(&a.job.priority)).then(a.job.run_at.cmp(&b.job.run_at))
    });
    Ok(claimed)
}

/// For the stores' tests: a queued job, runnable since `created_at`.
#[cfg(test)]
pub(crate) fn queued_job(created_at: i64) -> NewJob {
    let id = Uuid::now_v7();
    NewJob {
        id,
        spec: crate::job::JobSpec {
            model: "fusion".into(),
            messages: vec![serde_json::json!({"role": "user", "content": "hi"})],
            panel: vec!["m1".into(), "m2".into()],
            analyst: "judge".into(),
            temperature: None,
            max_completion_tokens: None,
            min_panel: 1,
            panel_timeout_ms: None,
            response_format: None,
            stop: None,
        },
        metadata: serde_json::json!({}),
        priority: 0,
        max_attempts: 3,
        deadline_at: None,
        idempotency_key: None,
        request_hash: None,
        created_at,
    }
}

/// For the stores' tests: of three queued jobs, the oldest made unreadable by `corrupt` (given
/// its id), a claim of them all must answer with the other two. Returns the three and the
/// claim's time.
#[cfg(test)]
pub(crate) async fn claim_past_a_corrupt_job<F, Fut>(
    store: &dyn Store,
    corrupt: F,
) -> (Vec<NewJob>, i64)
where
    F: FnOnce(Uuid) -> Fut,
    Fut: Future<Output = ()>,
{
    let now = 1_750_000_000_000;
    let jobs: Vec<NewJob> = (0..3).map(|i| queued_job(now - 3_000 + i)).collect();
    for job in &jobs {
        store.enqueue(job.clone(), None).await.unwrap();
    }
    corrupt(jobs[0].id).await;
    let claimed = store
        .claim("w", 10, now, CORRUPT_CLAIM_LEASE)
        .await
        .expect("one unreadable job failed the whole claim");
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [jobs[1].id, jobs[2].id]);
    (jobs, now)
}

/// The lease `claim_past_a_corrupt_job` claims under.
#[cfg(test)]
pub(crate) const CORRUPT_CLAIM_LEASE: Duration = Duration::from_secs(30);

/// For both stores' tests: `claim_past_a_corrupt_job` with a spec this build cannot parse
/// (`corrupt` stores one): the claim fails that job, which no later claim takes and reads
/// still show.
#[cfg(test)]
pub(crate) async fn a_job_that_does_not_read_fails_at_its_claim<F, Fut>(
    store: &dyn Store,
    corrupt: F,
) where
    F: FnOnce(Uuid) -> Fut,
    Fut: Future<Output = ()>,
{
    let (jobs, now) = claim_past_a_corrupt_job(store, corrupt).await;
    let again = store
        .claim("w", 10, now + 60_000, CORRUPT_CLAIM_LEASE)
        .await
        .unwrap();
    assert!(again.is_empty(), "claimed again: {again:?}");
    // Still shown, as far as it reads, with why it failed; and it does not break a listing.
    let failed = store.get_job(jobs[0].id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.failure_reason.as_deref()),
        (JobStatus::Failed, Some("invalid_job"))
    );
    let error = failed.error.unwrap_or_default();
    assert!(error.contains("bad job spec"), "{error}");
    assert_eq!(failed.spec.panel, jobs[0].spec.panel);
    let all = ListFilter {
        limit: 10,
        ..ListFilter::default()
    };
    let listed = store.list_jobs(&all).await.unwrap();
    assert_eq!(listed.len(), 3);
}

/// Enqueue as both stores do: the insert goes through the batcher (queued, waking the workers,
/// or started under `start`); when the idempotency key was seen before, `earlier` reads that
/// job by its key and the request hashes tell a repeat from a reuse.
async fn enqueue_with<Fut>(
    writes: &batch::Batcher,
    wakeups: &Notify,
    job: NewJob,
    start: Option<StartHere>,
    earlier: impl FnOnce(Option<String>) -> Fut,
) -> Result<Enqueued>
where
    Fut: Future<Output = Result<Job>>,
{
    let write = batch::Write::Enqueue {
        job: Box::new(job.clone()),
        start: start.clone(),
    };
    if writes.write(write).await? {
        if start.is_none() {
            wakeups.notify_one();
        }
        return Ok(Enqueued::Created(job.into_job(start.as_ref())));
    }
    let existing = earlier(job.idempotency_key).await?;
    Ok(if existing.request_hash == job.request_hash {
        Enqueued::Existing(existing)
    } else {
        Enqueued::KeyReused(existing)
    })
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every migration file as it was when it landed (SHA-256 of its bytes). sqlx records a
    /// checksum of each migration it applies and refuses to start against a database where an
    /// applied one has changed since, comments included: a migration, once landed, is never
    /// edited (0010 was, before it landed, and a database migrated in between would not start).
    /// A change goes into a new migration; a new one is added here.
    const LANDED_MIGRATIONS: [(&str, &str); 26] = [
        (
            "postgres/0001_jobs.sql",
            "f449d02dc02fe51a24aee9f04a05cdf9f649e8d4f5fe10ad6759259e1aab2e19",
        ),
        (
            "postgres/0002_no_step_notify.sql",
            "2ecee91987e1e9b30dc0f9cb64d308a7ba050fc14093ee3e46928f5d2d1c24c6",
        ),
        (
            "postgres/0003_batched_writes.sql",
            "0944badee59c4543a09d44413b0db3d06e1b0ee292a900511bdcacc3c478ca59",
        ),
        (
            "postgres/0004_started_jobs_do_not_wake.sql",
            "e133483a440db1c8f298c4a65bdbbb0fe0920259e34ee181c3e914b7b3d03e48",
        ),
        (
            "postgres/0005_fewer_index_entries.sql",
            "e485315b6c411420be12cd07f726e7f76393d51c5dc51476914cd856d0f758ee",
        ),
        (
            "postgres/0006_claim_walks_its_index.sql",
            "a9c83c4e852fe23e7f275e5914b5da924ff9a1c936ec11f5d6bf240895e7cfe7",
        ),
        (
            "postgres/0007_steps_fence_not_foreign_key.sql",
            "1d53d6eea0f287dd6fc2e09156d3cef1e85bf1d02478a9bd12c30b104fb04e62",
        ),
        (
            "postgres/0008_deadline_from.sql",
            "38f090c5d011dce46e7630b61c7687b6b9b249a0feb592649111efb8591f3689",
        ),
        (
            "postgres/0009_later_requeues_do_not_wake.sql",
            "255a1cd258bab949fbe55c46cdce51eb1eb8bf655dbc7869d9896bf51bd0db1c",
        ),
        (
            "postgres/0010_claim_skips_delayed_jobs.sql",
            "7ff82d28a64720078e6d9c82ffab6fa3b3c2d8952995b9965e14711c4adc694d",
        ),
        (
            "postgres/0011_retries_find_their_request.sql",
            "5f0f1c076287b1bc325af4e2e44156b7a642a41dc5d5d1314161c5b0a814666c",
        ),
        (
            "postgres/0012_cancels_seen_by_other_processes.sql",
            "6634b2e48192d5bcd7200d5f4a284179072ff8154ae325ec924f836350eb6df6",
        ),
        (
            "postgres/0013_finished_events_say_the_attempt.sql",
            "db4331d728971ecae56a04ea34a005888889a24788007ae9a5f3381a91af0384",
        ),
        (
            "sqlite/0001_jobs.sql",
            "8e5b4d10777fa1ef9a2099fad6870f7db026241f7d47178130896196e1724df5",
        ),
        (
            "sqlite/0002_no_step_notify.sql",
            "54e7727a7aa183b3e109ba213422bf2f41bce4a328db172389d2b8bbd65086fb",
        ),
        (
            "sqlite/0003_batched_writes.sql",
            "37649d2c52b14c0af17a9de0b5900930aac57fd2429917039de1be93b317aacd",
        ),
        (
            "sqlite/0004_started_jobs_do_not_wake.sql",
            "140e2fcc5c8286df580ec8e640a0ba76a7a988f064caeb489f4ac614aa8c7688",
        ),
        (
            "sqlite/0005_fewer_index_entries.sql",
            "3d79a1bb487e30c563073a69e4c879b566b3b2c693683feacfb05c5b0d64def2",
        ),
        (
            "sqlite/0006_claim_walks_its_index.sql",
            "11272091fe8b60b7c4e78aa332fcc5be519a5768b1ddcc9ce9771613674cff73",
        ),
        (
            "sqlite/0007_steps_fence_not_foreign_key.sql",
            "3aebb72bde2b4394dd328400d971166d2b7ea65fb64c9e16b942ce6879ed6096",
        ),
        (
            "sqlite/0008_deadline_from.sql",
            "5982b53a818dda4de651985b4c93a7cd1c98f54f6ef5e786c0394ee8cffb601a",
        ),
        (
            "sqlite/0009_later_requeues_do_not_wake.sql",
            "38e7e92bb34c5f779f016114809ad02b4ef71860ad19b7ca4ce8afe4eb87a5d9",
        ),
        (
            "sqlite/0010_claim_skips_delayed_jobs.sql",
            "3c4edbe03d8810b87b2fca11b26c0cff934cefa5e6b97df10ec16f8489cccb9b",
        ),
        (
            "sqlite/0011_retries_find_their_request.sql",
            "64415ddb10541e838089b33bdd64aeb87aa0ee153dbbf7a14ab90e2f31d44080",
        ),
        (
            "sqlite/0012_cancels_seen_by_other_processes.sql",
            "435960074a19b69776831b9440375a6ac001619a4bf2587d99bd49bc35f63c3d",
        ),
        (
            "sqlite/0013_finished_events_say_the_attempt.sql",
            "ff2ebfdc01b8c6637944eab87a3ff68f9083a76aebc8887f3cdf451d7f0144a5",
        ),
    ];

    #[test]
    fn landed_migrations_are_never_edited() {
        use sha2::{Digest, Sha256};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut found = Vec::new();
        for store in ["postgres", "sqlite"] {
            for entry in std::fs::read_dir(root.join(store)).unwrap() {
                let path = entry.unwrap().path();
                let name = format!("{store}/{}", path.file_name().unwrap().to_string_lossy());
                let digest = Sha256::digest(std::fs::read(&path).unwrap());
                found.push((name, crate::hex(&digest)));
            }
        }
        found.sort();
        for (name, hex) in &found {
            match LANDED_MIGRATIONS.iter().find(|(landed, _)| landed == name) {
                Some((_, landed)) => assert_eq!(
                    hex, landed,
                    "{name} changed after it landed: databases that applied it would refuse to \
                     start; put the change in a new migration"
                ),
                None => panic!("{name} is new: add (\"{name}\", \"{hex}\") to LANDED_MIGRATIONS"),
            }
        }
        assert_eq!(
            found.len(),
            LANDED_MIGRATIONS.len(),
            "a landed migration is gone"
        );
    }

    #[test]
    fn parses_trigger_payloads() {
        let id = Uuid::now_v7();
        assert_eq!(
            JobEvent::from_payload(&format!("done {id} cancelled 3")),
            Some(JobEvent::Finished {
                job_id: id,
                status: JobStatus::Cancelled,
                attempt: 3,
            })
        );
        // Not ours, a step (not NOTIFYed since migration 0002), or the bare three words from
        // before migration 0013, which no attempt can be placed by: none is an event.
        for bad in [
            format!("step {id} panel:3"),
            "done nope cancelled 3".to_string(),
            format!("done {id} exploded 3"),
            format!("done {id} cancelled"),
            format!("done {id} cancelled x"),
            format!("done {id} cancelled 3 4"),
        ] {
            assert_eq!(JobEvent::from_payload(&bad), None, "{bad}");
        }
    }

    // Codes no test can make a server send at will (`postgres.rs` makes the others for real).
    #[test]
    fn a_dropped_database_is_not_away_for_now() {
        for code in ["57P01", "57P03", "53300", "08006", "40P01", "25006"] {
            assert!(postgres_unavailable(code), "{code}");
        }
        for code in ["57P04", "42601", "23505", "22P02"] {
            assert!(!postgres_unavailable(code), "{code}");
        }
    }
}
