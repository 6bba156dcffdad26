//! The embedded default store: SQLite in WAL mode. Writers serialise, so every write goes to one
//! writer connection — enqueues, checkpoints and outcomes batched (`sqlite_writes.rs`), the claim
//! an `UPDATE … RETURNING` per priority — and a busy timeout absorbs contention from other
//! processes sharing the file. Wake-ups and job events are in-process; another process's commits
//! are noticed within a second (`watch_other_processes`): its cancels, and a wake-up.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use super::batch::{Batcher, Finish, Write};
use super::sqlite_writes::SqliteBatch;
use super::{
    CancelOutcome, Claimed, EVENT_BACKLOG, Enqueued, Held, JobEvent, Progress, Result,
    RetryOutcome, SpecRead, Store, StoreError, ms, spec_from_text, status_from_db,
};
use crate::job::{
    Job, JobStatus, JsonText, Lease, ListFilter, NewJob, SUPERSEDED, StartHere, Step, StepKey,
    Usage,
};

/// Rows buffered between SQLite's thread and the caller: more than the largest batch returns.
const ROW_BUFFER: usize = 4096;

/// The highest priority below `?1` that has queued jobs, due or not: one step of
/// `jobs_claimable`.
macro_rules! level_below {
    () => {
        "(SELECT priority FROM jobs INDEXED BY jobs_claimable \
          WHERE status = 'queued' AND priority < ?1 ORDER BY priority DESC LIMIT 1)"
    };
}

/// Take up to `?5` runnable queued jobs whose priority is `$which`, in priority then `run_at`
/// order, under a lease. `INDEXED BY` pins the walk of `jobs_claimable`: SQLite's planner
/// (without `ANALYZE` statistics) otherwise picks `jobs_status_id`, reads every queued job and
/// sorts them, so each claim cost as much as the backlog (with 10,000 queued, ~30% of the writer
/// thread's CPU per job in the throughput benchmark). The limit is `(SELECT ?5)`, not `?5`: with a
/// bare bound `LIMIT`, which changes on nearly every claim, SQLite re-prepared the statement
/// each time (`sqlite3Reprepare`, ~10% of the writer's time in a profile of the drain; gone
/// with the subquery).
macro_rules! claim_where {
    ($which:expr) => {
        concat!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = ?2, \
             lease_expires_at = ?3, started_at = coalesce(started_at, ?4) \
             WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_claimable \
                          WHERE status = 'queued' AND ",
            $which,
            " AND run_at <= ?4 ORDER BY priority DESC, run_at, id LIMIT (SELECT ?5)) \
             RETURNING ",
            job_columns!(),
            ", EXISTS (SELECT 1 FROM steps s WHERE s.job_id = jobs.id) AS checkpointed"
        )
    };
}

/// One priority's share of a claim, as one command to the writer (two statements, one hop):
/// the highest priority below `?1` with queued jobs (one row, `level`, NULL when there is none),
/// then that priority's due jobs, claimed. Within one priority the due jobs come first in
/// `jobs_claimable`, and the claim seeks them as a range (`priority = ? AND run_at <= ?`): it
/// reads the jobs it takes, never the jobs not due yet. The claim before this one walked the
/// whole index in one statement and read on through every delayed job whenever fewer were due
/// than it wanted, which is every idle poll: ~9 ms on the writer's thread with 100,000 jobs
/// waiting out a backoff, against ~0.03 ms now (Python's `sqlite3`, 200 claims). The claim visits
/// the priorities one at a time, as Postgres's does (migration 0010; its SQLite twin still names
/// the single statement, `CLAIM_SQL`, which this replaced). Each command commits on its own, so
/// writes can land between them (this process's batches, another process's) or between the two
/// statements of one: a priority is then visited twice, or left to the next claim while this
/// one takes lower priorities' due jobs; no job is taken twice, and a failure partway keeps what
/// was taken, unless it may have taken more (`stopped_partway`).
const CLAIM_LEVEL_SQL: &str = concat!(
    "SELECT ",
    level_below!(),
    " AS level;\n",
    claim_where!(concat!("priority = ", level_below!()))
);

/// After `LEVELS_ONE_BY_ONE` priorities, the rest below `?1` in one walk of the index (reading
/// past delayed jobs, as every claim did before): priorities used as a fine-grained ordering
/// (nearly one per job) would otherwise cost a command per job.
const CLAIM_REST_SQL: &str = claim_where!("priority < ?1");

/// Renews the leases of the named attempts (`?3`, a JSON array of `[id, attempt]`) that the
/// owner `?2` still holds: each looked up by its id.
const HEARTBEAT_SQL: &str = "UPDATE jobs SET lease_expires_at = ?1 \
     WHERE (id, attempt) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?3)) \
       AND status = 'running' AND lease_owner = ?2 \
     RETURNING id, attempt";

/// How many priorities a claim visits one by one, as on Postgres (migration 0010).
const LEVELS_ONE_BY_ONE: usize = 16;

/// A claim's command failed after `claimed` jobs were taken by the commands before it, each
/// committed on its own: with none taken, the claim fails; otherwise it stops there and returns
/// them, to be run, rather than leave them running under a lease nobody holds (until it ran
/// out, their attempt spent, a job on its last attempt failed without having run).
fn stopped_partway(e: StoreError, claimed: usize) -> Result<()> {
    // A command that may have taken jobs after all (its answer lost): the claim fails, so that
    // the worker hands back every job under its lease, those taken before included, instead of
    // running some while the others wait out the lease.
    if claimed == 0 || e.may_have_committed() {
        return Err(e);
    }
    tracing::warn!(error = %e, claimed, "a claim failed partway; running the jobs it took");
    Ok(())
}

/// A page of jobs, newest first, older than a cursor: a backward walk of the primary key from
/// the cursor, each spec read without its messages (a spec that is not a JSON object, or not
/// JSON, as it is, for `JobSpec::salvage`: SQLite's JSON functions raise an error on it). The statement has no optional terms (`?1 IS NULL OR …`): SQLite plans before it
/// sees the values, and an optional term turns a seek into a scan of every job, from the
/// newest down to the cursor, filtered.
macro_rules! list_sql {
    ($where:literal) => {
        concat!(
            "SELECT ",
            job_columns!(
                "CASE WHEN json_valid(spec) THEN CASE json_type(spec) WHEN 'object' \
                 THEN json_set(spec, '$.messages', json('[]')) ELSE spec END ELSE spec END",
                "NULL"
            ),
            " FROM jobs WHERE ",
            $where
        )
    };
}
const LIST_SQL: &str = list_sql!("id < ?1 ORDER BY id DESC LIMIT ?2");
/// The same in one status: a backward walk of `jobs_status_id` within that status.
const LIST_BY_STATUS_SQL: &str = list_sql!("status = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3");
/// Sorts after every id (a lowercase hyphenated UUID): the cursor of a first page.
const ID_ABOVE_ALL: &str = "~";

/// Where each job of a JSON array of ids stands (`Store::progress`): by the primary keys of
/// `jobs` and `steps`.
const PROGRESS_SQL: &str = "SELECT j.id, j.status, j.attempt, \
     (SELECT count(*) FROM steps s WHERE s.job_id = j.id) AS steps, \
     (SELECT max(s.created_at) FROM steps s WHERE s.job_id = j.id) AS last_step_at \
     FROM jobs j WHERE j.id IN (SELECT value FROM json_each(?))";

/// A job's checkpoints (`Store::get_steps`), and the same without their texts
/// (`Store::step_heads`), by the primary key of `steps`.
const STEPS_SQL: &str = steps_sql!(whole, "?");
const STEP_HEADS_SQL: &str = steps_sql!(heads, "?");

/// The newest job with a request hash since a time, by `jobs_request_hash` (migration 0011).
const FIND_BY_REQUEST_SQL: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE request_hash = ? AND created_at >= ? \
     AND (status IN ('queued', 'running') OR finished_at >= ?) \
     ORDER BY created_at DESC LIMIT 1"
);

pub struct SqliteStore {
    /// Readers: WAL lets them run beside the writer.
    pool: SqlitePool,
    /// The one writing connection. SQLite admits one writer at a time; queueing writes here, in
    /// order, beats several connections sleeping in SQLite's busy handler (which backs off in
    /// steps of up to 100 ms and wrecks tail latency).
    writer: SqlitePool,
    /// Enqueues, checkpoints and outcomes, grouped into shared transactions on `writer`.
    writes: Batcher,
    wakeups: Arc<Notify>,
    events: broadcast::Sender<JobEvent>,
    /// Ends `watch_other_processes` when the store is dropped.
    _watch: tokio_util::sync::DropGuard,
}

/// How often the writer connection asks whether another process committed (see
/// `watch_other_processes`).
const OTHERS_EVERY: Duration = Duration::from_secs(1);

/// How far before the latest cancel it has seen `watch_other_processes` looks again: a cancel
/// committed after a later one may carry an earlier time. Each took its time before it read the
/// job (the reader pool's 30 s to acquire) and its write queued for the file's one writer (the
/// writer pool's 30 s, then the busy timeout's 10 s); a compare-and-set tried again because a
/// claim landed in between keeps that time. Two minutes outlast one pass of those waits (a
/// second pass, which takes a claim landing in between, may not be covered); each look again
/// reads the cancels of that window (by a partial index), and only when another process
/// committed.
const CANCELS_OVERLAP_MS: i64 = 120_000;

/// Another process on the same file (a `fusion worker` beside `fusion serve`, say) commits where
/// this one's events do not reach: a cancel made there would reach a job running here only at
/// its next heartbeat (a third of a lease), and a job it enqueued only at the next poll. SQLite's
/// `data_version`, read on the writer connection, changes when any other connection commits;
/// this process's other connections only read, so on the writer it counts other processes'
/// commits alone. Each second it is read (a pragma, microseconds on the writer's thread) and,
/// when it changed, workers are woken (they claim) and the jobs cancelled since the last
/// reading (by `jobs_cancelled_at`, migration 0012, on a reader) are announced as this
/// process's own cancels are (`JobEvent::Finished`: a job running here stops), each once. Both
/// answers only read: a heartbeat here, a write, would change the other process's
/// `data_version` in turn, and the two would renew every lease each second.
async fn watch_other_processes(
    writer: SqlitePool,
    readers: SqlitePool,
    events: broadcast::Sender<JobEvent>,
    wakeups: Arc<Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    // The first reading at once: a commit before it (another process's cancel of a job this
    // one claims in its first second) would be taken for the starting point.
    let mut seen: Option<i64> = None;
    let mut wait = Duration::ZERO;
    // Cancels from `since` on are read; those announced are kept until `since` passes them.
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let mut since = now - CANCELS_OVERLAP_MS;
    let mut announced: HashMap<String, i64> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = OTHERS_EVERY;
        let version = match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
            .fetch_one(&writer)
            .await
        {
            Ok(version) => version,
            // The writer is busy or gone: the next second asks again.
            Err(_) => continue,
        };
        let Some(before) = seen.replace(version) else {
            continue;
        };
        if before == version {
            continue;
        }
        wakeups.notify_one();
        let cancelled = sqlx::query_as::<_, (String, i64, i32)>(
            "SELECT id, finished_at, attempt FROM jobs \
             WHERE status = 'cancelled' AND finished_at >= ?",
        )
        .bind(since)
        .fetch_all(&readers)
        .await;
        let Ok(cancelled) = cancelled else {
            // Not read: the next second reads them (or the heartbeat finds them).
            seen = Some(before);
            continue;
        };
        let latest = cancelled
            .iter()
            .map(|(_, at, _)| *at)
            .max()
            .unwrap_or(since);
        for (id, at, attempt) in cancelled {
            // Once per cancel: a job retried and cancelled again has a new finish time.
            if announced.insert(id.clone(), at) != Some(at)
                && let Ok(job_id) = Uuid::parse_str(&id)
            {
                let status = JobStatus::Cancelled;
                let _ = events.send(JobEvent::Finished {
                    job_id,
                    status,
                    attempt,
                });
            }
        }
        since = since.max(latest - CANCELS_OVERLAP_MS);
        announced.retain(|_, at| *at >= since);
    }
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a power loss may drop the last transactions, never corrupt the file.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Temporary files in memory. A statement of a batch that may fail halfway keeps the
            // pages it changes in a statement journal, to undo just itself; past 64 KiB that
            // journal spilled to a new file in /var/tmp (created and unlinked at once, then written:
            // 14 files and 300 writes in 0.6 s of a drain). Nothing durable lives there.
            .pragma("temp_store", "memory")
            // sqlx hands rows from SQLite's thread to the caller through a channel of this many
            // (50 by default); when it is full SQLite's thread sleeps until the caller's task is
            // scheduled. A batch returns a row per write that took and a claim a row per job:
            // with room for a whole batch, its rows cross in one hop instead of one per 50.
            .row_buffer_size(ROW_BUFFER);
        // The writer first: it creates the file and switches it to WAL.
        // Connections to a file in this process do not go stale the way a server's do: no ping
        // (a hop to SQLite's thread and back) before each is handed out.
        // Kept for the store's life: a new connection would read `data_version` afresh (see
        // `watch_other_processes`), and sqlx replaces one after 30 minutes by default.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        let wakeups = Arc::new(Notify::new());
        let events = broadcast::channel(EVENT_BACKLOG).0;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(watch_other_processes(
            writer.clone(),
            pool.clone(),
            events.clone(),
            wakeups.clone(),
            stop.clone(),
        ));
        Ok(SqliteStore {
            pool,
            writes: Batcher::start(SqliteBatch(writer.clone())),
            writer,
            wakeups,
            events,
            _watch: stop.drop_guard(),
        })
    }

    /// Publish an event; having no receiver (no worker or waiter here) is fine.
    fn emit(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    fn stepped(&self, lease: &Lease, step: &Step) {
        self.emit(JobEvent::Step {
            job_id: lease.job_id,
            step: step.key,
        });
    }

    fn finished(&self, done: bool, lease: &Lease, status: JobStatus) {
        if done {
            self.emit(JobEvent::Finished {
                job_id: lease.job_id,
                status,
                attempt: lease.attempt,
            });
        }
    }

    async fn fetch_job(&self, sql: &'static str, id: Uuid) -> Result<Option<Job>> {
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r, SpecRead::ToShow)).transpose()
    }

    /// Run a lease-fenced update (`… WHERE id = ? AND attempt = ? AND lease_owner = ? AND
    /// status = 'running'`) on the writer: true when the lease held.
    async fn fenced(&self, sql: &'static str, lease: &Lease, binds: &[Bind<'_>]) -> Result<bool> {
        let mut q = sqlx::query(sql);
        for b in binds {
            q = match *b {
                Bind::I(v) => q.bind(v),
                Bind::S(v) => q.bind(v),
            };
        }
        let done = q
            .bind(lease.job_id.to_string())
            .bind(lease.attempt)
            .bind(&lease.owner)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish(&self, finish: Finish) -> Result<bool> {
        let (lease, status) = (finish.lease.clone(), finish.status);
        let done = self.writes.write(Write::Finish(finish)).await?;
        self.finished(done, &lease, status);
        Ok(done)
    }
}

impl SqliteStore {
    /// A job's checkpoints in step order, by `STEPS_SQL` or `STEP_HEADS_SQL`.
    async fn read_steps(&self, id: Uuid, sql: &'static str) -> Result<Vec<Step>> {
        let rows = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        let mut steps = rows.iter().map(step_from_row).collect::<Result<Vec<_>>>()?;
        steps.sort_by_key(|s| s.key);
        Ok(steps)
    }

    /// How many migrations the file records as applied (none before its first migration).
    async fn migrations_applied(&self) -> Result<i64> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.writer)
        .await?;
        if !exists {
            return Ok(0);
        }
        let n = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&self.writer)
            .await?;
        Ok(n)
    }
}

/// A value bound before the fence parameters of a lease-fenced update.
enum Bind<'a> {
    I(i64),
    S(&'a str),
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[async_trait]
impl Store for SqliteStore {
    /// sqlx takes no lock around SQLite's migrations: processes started together on one file
    /// (`serve` and `worker` after an upgrade) may apply the same migration at once, and all but
    /// one then fail it (its DDL finds the change made, or its bookkeeping row there). A run that
    /// fails while more migrations got recorded than there were before it lost such a race: it
    /// runs again, from what is applied now. A failure with no progress is the migration's own.
    async fn migrate(&self) -> Result<()> {
        loop {
            let before = self.migrations_applied().await?;
            let Err(e) = MIGRATOR.run(&self.writer).await else {
                return Ok(());
            };
            match self.migrations_applied().await {
                Ok(n) if n > before => {
                    tracing::info!(error = %e, "another process migrated this SQLite file \
                        meanwhile; migrating again from where it got");
                }
                // Whether another process got further cannot be told now: the file is busy,
                // which passes (the start tries again), where the migration's own error
                // ("table … already exists") would not.
                Err(read) if read.is_unavailable() => return Err(read),
                _ => return Err(e.into()),
            }
        }
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// One host's file: this host's clock is the only one.
    async fn database_now_ms(&self) -> Result<Option<i64>> {
        Ok(None)
    }

    async fn enqueue(&self, job: NewJob, start: Option<StartHere>) -> Result<Enqueued> {
        let pool = &self.pool;
        super::enqueue_with(&self.writes, &self.wakeups, job, start, |key| async move {
            let row = sqlx::query(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE idempotency_key = ?"
            ))
            .bind(key)
            .fetch_one(pool)
            .await?;
            job_from_row(&row, SpecRead::ToShow)
        })
        .await
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        self.fetch_job(
            concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?"),
            id,
        )
        .await
    }

    async fn job_status(&self, id: Uuid) -> Result<Option<JobStatus>> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        status.as_deref().map(status_from_db).transpose()
    }

    async fn progress(&self, ids: &[Uuid]) -> Result<Vec<Progress>> {
        let ids = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let rows = sqlx::query(PROGRESS_SQL)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        let progress = |r: &SqliteRow| -> Result<Progress> {
            Ok(Progress {
                id: parse_id(&r.try_get::<String, _>("id")?)?,
                status: status_from_db(&r.try_get::<String, _>("status")?)?,
                attempt: r.try_get("attempt")?,
                steps: r.try_get("steps")?,
                last_step_at: r.try_get("last_step_at")?,
            })
        };
        rows.iter().map(progress).collect()
    }

    async fn find_by_request(
        &self,
        request_hash: &str,
        since: i64,
        finished_since: i64,
    ) -> Result<Option<Job>> {
        let row = sqlx::query(FIND_BY_REQUEST_SQL)
            .bind(request_hash)
            .bind(since)
            .bind(finished_since)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r, SpecRead::ToShow)).transpose()
    }

    async fn get_steps(&self, id: Uuid) -> Result<Vec<Step>> {
        self.read_steps(id, STEPS_SQL).await
    }

    async fn step_heads(&self, id: Uuid) -> Result<Vec<Step>> {
        self.read_steps(id, STEP_HEADS_SQL).await
    }

    async fn list_jobs(&self, filter: &ListFilter) -> Result<Vec<Job>> {
        // Without a cursor, one past every id: `id < ?` stays a range on the index either way.
        let before = filter
            .before
            .map_or_else(|| ID_ABOVE_ALL.into(), |id| id.to_string());
        let query = match filter.status {
            Some(status) => sqlx::query(LIST_BY_STATUS_SQL).bind(status.as_str()),
            None => sqlx::query(LIST_SQL),
        };
        let rows = query
            .bind(before)
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| job_from_row(r, SpecRead::ToShow))
            .collect()
    }

    async fn cancel(&self, id: Uuid, now: i64) -> Result<CancelOutcome> {
        // Compare-and-set on the status read just before, so a claim racing with the cancel is
        // either seen (was_running) or makes the update miss and the loop read again.
        loop {
            let Some(before) = self.get_job(id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            if before.status.is_final() {
                return Ok(CancelOutcome::AlreadyFinal(before));
            }
            // The update and its event in a task of their own: once the statement is on the
            // writer's thread it commits even if this request is dropped (its client gone), and
            // the event, this process's only news of it (the job's worker stops its calls on
            // it), must then go out too. Postgres's trigger sends its own.
            let writer = self.writer.clone();
            let events = self.events.clone();
            let status = before.status;
            let attempt = before.attempt;
            let row = tokio::spawn(async move {
                let row = sqlx::query(concat!(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, \
                     failure_reason = 'cancelled', error = 'cancelled by request', \
                     lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ? AND status = ? AND attempt = ? RETURNING ",
                    job_columns!()
                ))
                .bind(now)
                .bind(id.to_string())
                .bind(status.as_str())
                .bind(attempt)
                .fetch_optional(&writer)
                .await?;
                if row.is_some() {
                    let _ = events.send(JobEvent::Finished {
                        job_id: id,
                        status: JobStatus::Cancelled,
                        attempt,
                    });
                }
                Ok::<_, sqlx::Error>(row)
            })
            .await
            // A panic in the task is this request's, as it would be inline; the task cancelled
            // (the runtime going away): whether the update ran is unknown, as when sqlx's own
            // thread dies.
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => sqlx::Error::WorkerCrashed,
            })??;
            if let Some(row) = row {
                return Ok(CancelOutcome::Cancelled {
                    job: job_from_row(&row, SpecRead::ToShow)?,
                    was_running: before.status == JobStatus::Running,
                });
            }
        }
    }

    async fn retry_failed(&self, id: Uuid, now: i64) -> Result<RetryOutcome> {
        // The requeued job is read by the update itself: once the change has committed, no
        // later read may fail and have it answered as an error (which a client would retry).
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(concat!(
            "UPDATE jobs SET status = 'queued', run_at = ?1, finished_at = NULL, \
             failure_reason = NULL, error = NULL, result = NULL, \
             max_attempts = max(max_attempts, attempt + 1), \
             deadline_at = ?1 + (deadline_at - coalesce(deadline_from, created_at)), \
             deadline_from = ?1 \
             WHERE id = ?2 AND status IN ('failed', 'cancelled') RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            // Kept, to be replaced when they run again (see `job::SUPERSEDED`).
            sqlx::query("UPDATE steps SET error_code = ?2 WHERE job_id = ?1 AND ok = 0")
                .bind(id.to_string())
                .bind(SUPERSEDED)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if let Some(row) = row {
            self.wakeups.notify_one();
            return Ok(RetryOutcome::Requeued(job_from_row(
                &row,
                SpecRead::ToShow,
            )?));
        }
        // Nothing changed: a failed read here is an error to retry like any other.
        Ok(match self.get_job(id).await? {
            Some(job) => RetryOutcome::NotRetryable(job),
            None => RetryOutcome::NotFound,
        })
    }

    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        let wanted = limit as usize;
        let mut rows = Vec::new();
        // Every priority is below this: job priorities are 32-bit.
        let mut below = i64::MAX;
        let mut levels = 0;
        while rows.len() < wanted {
            let rest = i64::try_from(wanted - rows.len()).unwrap_or(i64::MAX);
            let sql = if levels == LEVELS_ONE_BY_ONE {
                CLAIM_REST_SQL
            } else {
                CLAIM_LEVEL_SQL
            };
            let got = sqlx::query(sql)
                .bind(below)
                .bind(owner)
                .bind(now + ms(lease))
                .bind(now)
                .bind(rest)
                .fetch_all(&self.writer)
                .await;
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    stopped_partway(e.into(), rows.len())?;
                    break;
                }
            };
            if levels == LEVELS_ONE_BY_ONE {
                rows.extend(got);
                break;
            }
            levels += 1;
            let mut got = got.into_iter();
            let level = got.next().map(|row| row.try_get::<Option<i64>, _>("level"));
            rows.extend(got);
            match level {
                Some(Ok(Some(level))) => below = level,
                Some(Err(e)) => {
                    stopped_partway(e.into(), rows.len())?;
                    break;
                }
                Some(Ok(None)) | None => break,
            }
        }
        super::claimed_from(
            self,
            owner,
            now,
            &rows,
            |r| job_from_row(r, SpecRead::ToRun),
            |r| parse_id(&r.try_get::<String, _>("id")?),
        )
        .await
    }

    async fn heartbeat(
        &self,
        owner: &str,
        jobs: &[(Uuid, i32)],
        now: i64,
        lease: Duration,
    ) -> Result<Vec<Held>> {
        let rows = sqlx::query(HEARTBEAT_SQL)
            .bind(now + ms(lease))
            .bind(owner)
            // A JSON array of `[id, attempt]`, each id a hyphenated string, as `id` holds them.
            .bind(serde_json::json!(jobs).to_string())
            .fetch_all(&self.writer)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Held {
                    id: parse_id(&r.try_get::<String, _>("id")?)?,
                    attempt: r.try_get("attempt")?,
                })
            })
            .collect()
    }

    async fn rescue_expired(&self, now: i64) -> Result<u64> {
        let failed = sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_at = ?1, failure_reason = 'lease_expired', \
             error = 'the worker holding the job stopped renewing its lease on its last allowed attempt', \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE status = 'running' AND lease_expires_at < ?1 AND attempt >= max_attempts \
             RETURNING id, attempt",
        )
        .bind(now)
        .fetch_all(&self.writer)
        .await?;
        for row in &failed {
            self.emit(JobEvent::Finished {
                job_id: parse_id(&row.try_get::<String, _>("id")?)?,
                status: JobStatus::Failed,
                attempt: row.try_get("attempt")?,
            });
        }
        let failed = failed.len() as u64;
        // Only jobs with attempts left, whatever committed between the two statements (another
        // process's insert that landed with its lease already run out): one on its last
        // attempt is failed by the statement above, at the next tick if not at this one.
        let requeued = sqlx::query(
            "UPDATE jobs SET status = 'queued', run_at = ?1, lease_owner = NULL, \
             lease_expires_at = NULL, failure_reason = 'lease_expired', \
             error = 'the worker holding the job stopped renewing its lease; requeued' \
             WHERE status = 'running' AND lease_expires_at < ?1 AND attempt < max_attempts",
        )
        .bind(now)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if requeued > 0 {
            self.wakeups.notify_one();
        }
        Ok(failed + requeued)
    }

    async fn save_step(&self, lease: &Lease, step: &Step) -> Result<bool> {
        let write = Write::Step {
            lease: lease.clone(),
            step: step.clone(),
        };
        let written = self.writes.write(write).await?;
        if written {
            self.stepped(lease, step);
        }
        Ok(written)
    }

    async fn complete(
        &self,
        lease: &Lease,
        last: Option<&Step>,
        result: &JsonText,
        now: i64,
    ) -> Result<bool> {
        let step = last.map(|step| Write::Step {
            lease: lease.clone(),
            step: step.clone(),
        });
        let finish = Finish::succeeded(lease, result.clone(), now);
        let (stepped, done) = self.writes.finish_with_step(step, finish).await?;
        if let Some(step) = last.filter(|_| stepped) {
            self.stepped(lease, step);
        }
        self.finished(done, lease, JobStatus::Succeeded);
        Ok(done)
    }

    async fn fail(&self, lease: &Lease, reason: &str, error: &str, now: i64) -> Result<bool> {
        let finish = Finish::failed(lease, reason.to_string(), error.to_string(), now);
        self.finish(finish).await
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        run_at: i64,
        reason: &str,
        error: &str,
    ) -> Result<bool> {
        self.fenced(
            "UPDATE jobs SET status = 'queued', run_at = ?, failure_reason = ?, error = ?, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ? AND attempt = ? AND lease_owner = ? AND status = 'running'",
            lease,
            &[Bind::I(run_at), Bind::S(reason), Bind::S(error)],
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let released = self
            .fenced(
                "UPDATE jobs SET status = 'queued', max_attempts = max_attempts + 1, \
                 lease_owner = NULL, lease_expires_at = NULL, failure_reason = NULL, error = NULL \
                 WHERE id = ? AND attempt = ? AND lease_owner = ? AND status = 'running'",
                lease,
                &[],
            )
            .await?;
        if released {
            self.wakeups.notify_one();
        }
        Ok(released)
    }

    async fn release_claim(&self, owner: &str, lease_expires_at: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET status = 'queued', max_attempts = max_attempts + 1, \
             lease_owner = NULL, lease_expires_at = NULL, failure_reason = NULL, error = NULL \
             WHERE status = 'running' AND lease_owner = ?1 AND lease_expires_at = ?2",
        )
        .bind(owner)
        .bind(lease_expires_at)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() > 0 {
            self.wakeups.notify_one();
        }
        Ok(done.rows_affected())
    }

    fn wakeups(&self) -> Arc<Notify> {
        self.wakeups.clone()
    }

    fn events(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }
}

fn parse_id(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("bad job id `{s}`: {e}")))
}

fn parse_json(s: &str) -> Result<Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON column: {e}")))
}

fn job_from_row(r: &SqliteRow, how: SpecRead) -> Result<Job> {
    let spec: String = r.try_get("spec")?;
    let metadata: String = r.try_get("metadata")?;
    let result: Option<String> = r.try_get("result")?;
    Ok(Job {
        id: parse_id(&r.try_get::<String, _>("id")?)?,
        status: status_from_db(&r.try_get::<String, _>("status")?)?,
        spec: spec_from_text(&spec, how)?,
        metadata: parse_json(&metadata)?,
        priority: r.try_get("priority")?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        run_at: r.try_get("run_at")?,
        deadline_at: r.try_get("deadline_at")?,
        lease_owner: r.try_get("lease_owner")?,
        lease_expires_at: r.try_get("lease_expires_at")?,
        idempotency_key: r.try_get("idempotency_key")?,
        request_hash: r.try_get("request_hash")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        failure_reason: r.try_get("failure_reason")?,
        error: r.try_get("error")?,
        result: result.as_deref().map(parse_json).transpose()?,
    })
}

fn step_from_row(r: &SqliteRow) -> Result<Step> {
    let key: String = r.try_get("step")?;
    let data: Option<String> = r.try_get("data")?;
    let prompt_tokens: i64 = r.try_get("prompt_tokens")?;
    let completion_tokens: i64 = r.try_get("completion_tokens")?;
    Ok(Step {
        key: StepKey::parse(&key)
            .ok_or_else(|| StoreError::Corrupt(format!("bad step `{key}`")))?,
        model: r.try_get("model")?,
        ok: r.try_get("ok")?,
        content: r.try_get("content")?,
        data: data
            .map(JsonText::parse)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("bad step data: {e}")))?,
        usage: Usage::of(prompt_tokens, completion_tokens, r.try_get("cost")?),
        latency_ms: r.try_get("latency_ms")?,
        error_code: r.try_get("error_code")?,
        error: r.try_get("error")?,
        status_code: r.try_get("status_code")?,
        attempt: r.try_get("attempt")?,
        created_at: r.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use futures::future::join_all;
    use sqlx::Connection;

    use super::*;
    use crate::store::batch::{BatchSql, Finish, Write, all_fail_at_once_behind_a_lock};
    use crate::store::{
        CORRUPT_CLAIM_LEASE, a_job_that_does_not_read_fails_at_its_claim, claim_past_a_corrupt_job,
        queued_job,
    };

    /// What `EXPLAIN QUERY PLAN` says of `sql` (its parameters unbound), a step per line.
    async fn query_plan(pool: &SqlitePool, sql: &str) -> String {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
            .fetch_all(pool)
            .await
            .unwrap();
        let plan: Vec<String> = rows.iter().map(|r| r.get("detail")).collect();
        plan.join("\n")
    }

    /// Asserts that SQLite's plan for `sql` holds `access` and sorts nothing (`why` otherwise).
    async fn plan_uses(pool: &SqlitePool, sql: &str, access: &str, why: &str) {
        let plan = query_plan(pool, sql).await;
        assert!(
            plan.contains(access) && !plan.contains("TEMP B-TREE"),
            "{why}:\n{plan}"
        );
    }

    /// A migrated store on a file in its own temporary directory (kept while the guard lives).
    async fn migrated_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }

    /// Whether an event `wanted` comes on `events` within `within` (other events skipped).
    async fn event_within(
        events: &mut broadcast::Receiver<JobEvent>,
        within: Duration,
        wanted: impl Fn(&JobEvent) -> bool,
    ) -> bool {
        tokio::time::timeout(within, async {
            loop {
                match events.recv().await {
                    Ok(event) if wanted(&event) => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    // Two processes on one file (two stores here): a cancel committed by one reaches the other
    // within a second or two as its own cancels do, with a wake-up, and a job running there
    // stops. A store's own commits raise nothing. Before, a cancel made in `serve` reached a
    // separate `worker` only at its next heartbeat.
    #[tokio::test]
    async fn another_process_cancels_are_announced_here() {
        let (dir, here) = migrated_store().await;
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let there = SqliteStore::connect(&url).await.unwrap();
        let mut events = here.events();
        let wakeups = here.wakeups();
        // The watcher's first reading, then this store's own writes: nothing is missed.
        tokio::time::sleep(OTHERS_EVERY + Duration::from_millis(200)).await;
        let job = running_job(&here, 1, 1, "w").await;
        let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
        assert!(
            !event_within(&mut events, OTHERS_EVERY * 2, |_| true).await,
            "this store's own commits raised an event"
        );
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let CancelOutcome::Cancelled { .. } = there.cancel(job.id, now).await.unwrap() else {
            panic!("the job was running");
        };
        let cancelled = |attempt| JobEvent::Finished {
            job_id: job.id,
            status: JobStatus::Cancelled,
            attempt,
        };
        assert!(
            event_within(&mut events, OTHERS_EVERY * 5, |e| *e == cancelled(1)).await,
            "the other store's cancel was not announced"
        );
        // Once: the other store's next commit announces nothing again, and wakes the workers
        // (the wake-up the cancel left is taken first, or it would answer for this one).
        let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
        there.enqueue(queued_job(3), None).await.unwrap();
        assert!(
            !event_within(&mut events, OTHERS_EVERY * 3, |e| *e == cancelled(1)).await,
            "the cancel was announced again"
        );
        tokio::time::timeout(Duration::from_secs(1), wakeups.notified())
            .await
            .expect("and workers are woken");
        // Retried, claimed again and cancelled again there: announced again. Before, a job
        // announced once was never announced again while no later cancel moved the cursor.
        let RetryOutcome::Requeued(_) = there.retry_failed(job.id, now + 1).await.unwrap() else {
            panic!("a cancelled job is retried");
        };
        let again = there
            .claim("w2", 10, now + 2, Duration::from_secs(60))
            .await;
        let again = again.unwrap().into_iter().find(|c| c.job.id == job.id);
        assert_eq!(again.map(|c| c.job.attempt), Some(2));
        let CancelOutcome::Cancelled { .. } = there.cancel(job.id, now + 3).await.unwrap() else {
            panic!("the job was running again");
        };
        assert!(
            event_within(&mut events, OTHERS_EVERY * 5, |e| *e == cancelled(2)).await,
            "the second cancel was not announced, for the attempt it stopped"
        );
    }

    // A cancel whose write waited long for the file's one writer commits after a later one,
    // carrying the earlier time it was made at: it is announced all the same. Before, the watcher
    // looked only 5 s before the latest cancel it had seen, and one that waited 20 s (behind a
    // busy writer: the pool's 30 s and the busy timeout's 10 s allow it) was never announced.
    #[tokio::test]
    async fn a_cancel_committed_late_with_an_early_time_is_announced() {
        let (dir, here) = migrated_store().await;
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let there = SqliteStore::connect(&url).await.unwrap();
        let mut events = here.events();
        tokio::time::sleep(OTHERS_EVERY + Duration::from_millis(200)).await;
        let (late, early) = (
            running_job(&here, 1, 1, "w").await,
            running_job(&here, 2, 1, "w").await,
        );
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let cancelled = |job_id| JobEvent::Finished {
            job_id,
            status: JobStatus::Cancelled,
            attempt: 1,
        };
        there.cancel(early.id, now).await.unwrap();
        assert!(event_within(&mut events, OTHERS_EVERY * 5, |e| *e == cancelled(early.id)).await);
        there.cancel(late.id, now - 20_000).await.unwrap();
        assert!(
            event_within(&mut events, OTHERS_EVERY * 5, |e| *e == cancelled(late.id)).await,
            "the cancel made 20 s before it committed was not announced"
        );
    }

    /// A job (created at `created_at`) running at `attempt` under `owner`'s lease.
    async fn running_job(
        store: &SqliteStore,
        created_at: i64,
        attempt: i32,
        owner: &str,
    ) -> NewJob {
        let job = queued_job(created_at);
        store.enqueue(job.clone(), None).await.unwrap();
        sqlx::query(
            "UPDATE jobs SET status = 'running', attempt = ?, lease_owner = ?, \
             lease_expires_at = 9000000000000 WHERE id = ?",
        )
        .bind(attempt)
        .bind(owner)
        .bind(job.id.to_string())
        .execute(&store.writer)
        .await
        .unwrap();
        job
    }

    // A batch that fails rolls back on its own connection: a claim waiting for the writer
    // must not run inside the failed transaction, answer with jobs, and then be rolled back.
    #[tokio::test]
    async fn a_failed_batch_does_not_take_the_next_write_down_with_it() {
        let (_dir, store) = migrated_store().await;
        let store = Arc::new(store);
        let now = 1_750_000_000_000;
        let job = queued_job(now - 1_000);
        store.enqueue(job.clone(), None).await.unwrap();

        // Hold the writer so that the failing batch and then the claim queue for it, in order.
        let held = store.writer.acquire().await.unwrap();
        let again = tokio::spawn({
            let store = store.clone();
            async move { store.enqueue(job, None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let claim = tokio::spawn({
            let store = store.clone();
            async move { store.claim("w", 1, now, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);

        assert!(
            again.await.unwrap().is_err(),
            "a second job with the same id"
        );
        let claimed = claim.await.unwrap().unwrap();
        assert_eq!(claimed.len(), 1);
        let stored = store.get_job(claimed[0].job.id).await.unwrap().unwrap();
        assert_eq!(
            stored.status,
            JobStatus::Running,
            "the claim was rolled back"
        );
    }

    #[tokio::test]
    async fn of_two_outcomes_in_one_batch_only_the_current_lease_is_told_it_took() {
        let (_dir, store) = migrated_store().await;
        let job = running_job(&store, 1_000, 2, "w2").await;
        let sql = crate::store::sqlite_writes::SqliteBatch(store.writer.clone());
        crate::store::batch::only_the_current_lease_of_two_outcomes_takes(&sql, job.id).await;
        let stored = store.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(stored.status, JobStatus::Succeeded);
    }

    // A batch's writes go out as multi-row statements of 1 to 256 rows, padded with rows of
    // NULLs (`sqlite_writes.rs`): a batch larger than the largest statement, of every kind, its
    // kinds interleaved, some of each fenced out, tells each write whether it took, and the
    // padding writes nothing.
    #[tokio::test]
    async fn a_large_mixed_batch_tells_each_write_whether_it_took_and_pads_with_nothing() {
        let (_dir, store) = migrated_store().await;
        let mut jobs = vec![];
        for i in 0..70 {
            jobs.push(running_job(&store, 1_000 + i, 2, "w1").await);
        }
        let taken_key = {
            let mut job = queued_job(5_000);
            job.idempotency_key = Some("taken".into());
            store.enqueue(job, None).await.unwrap();
            "taken"
        };
        let lease = |job: &NewJob, attempt: i32, owner: &str| Lease {
            job_id: job.id,
            attempt,
            owner: owner.into(),
        };
        let step = |key: StepKey| Step {
            key,
            model: "m1".into(),
            ok: true,
            content: Some(format!("answer \"{key:?}\"\n")),
            data: None,
            usage: Usage::default(),
            latency_ms: 1,
            error_code: None,
            error: None,
            status_code: None,
            attempt: 2,
            created_at: 2_000,
        };
        let (mut writes, mut expected) = (vec![], vec![]);
        for (i, job) in jobs.iter().enumerate() {
            for k in 0..5 {
                let key = if k < 4 {
                    StepKey::Panel(k)
                } else {
                    StepKey::Analysis
                };
                writes.push(Write::Step {
                    lease: lease(job, 2, "w1"),
                    step: step(key),
                });
                expected.push(true);
            }
            if i % 7 == 0 {
                // Another worker's stale lease: fenced out.
                writes.push(Write::Step {
                    lease: lease(job, 1, "w0"),
                    step: step(StepKey::Final),
                });
                expected.push(false);
            }
            let (attempt, took) = if i % 9 == 0 { (1, false) } else { (2, true) };
            let finish = Finish::failed(&lease(job, attempt, "w1"), "r".into(), "e".into(), 3_000);
            writes.push(Write::Finish(finish));
            expected.push(took);
            if i % 20 == 0 {
                let mut new = queued_job(4_000 + i as i64);
                if i == 40 {
                    new.idempotency_key = Some(taken_key.into());
                }
                writes.push(Write::Enqueue {
                    job: Box::new(new),
                    start: None,
                });
                expected.push(i != 40);
            }
        }
        let sql = crate::store::sqlite_writes::SqliteBatch(store.writer.clone());
        assert_eq!(sql.execute(&writes).await.unwrap(), expected);

        let pool = &store.pool;
        let count = |q: &'static str| async move {
            let n: i64 = sqlx::query_scalar(q).fetch_one(pool).await.unwrap();
            n
        };
        assert_eq!(count("SELECT count(*) FROM steps").await, 350);
        assert_eq!(
            count("SELECT count(*) FROM steps WHERE step = 'final'").await,
            0
        );
        assert_eq!(count("SELECT count(*) FROM jobs").await, 70 + 1 + 3);
        assert_eq!(count("SELECT count(*) FROM jobs WHERE id IS NULL").await, 0);
        let failed = count("SELECT count(*) FROM jobs WHERE status = 'failed'").await;
        assert_eq!(failed, 70 - 8);
        let stored = store.get_steps(jobs[3].id).await.unwrap();
        assert_eq!(stored.len(), 5);
        assert_eq!(stored[0].content.as_deref(), Some("answer \"Panel(0)\"\n"));
    }

    // A list leaves each spec's messages out in SQL (`list_sql!`); a spec that is not a JSON
    // object, or not JSON at all, is listed as far as it reads rather than failing the page
    // (SQLite's JSON functions raise an error on text that is not JSON).
    #[tokio::test]
    async fn a_list_reads_specs_without_their_messages_and_any_spec_at_all() {
        let (_dir, store) = migrated_store().await;
        let mut ids = Vec::new();
        for spec in [None, Some("not json"), Some("[1, 2]")] {
            let job = queued_job(1_000);
            ids.push(job.id);
            store.enqueue(job.clone(), None).await.unwrap();
            if let Some(spec) = spec {
                sqlx::query("UPDATE jobs SET spec = ? WHERE id = ?")
                    .bind(spec)
                    .bind(job.id.to_string())
                    .execute(&store.writer)
                    .await
                    .unwrap();
            }
        }
        let all = ListFilter {
            limit: 10,
            ..ListFilter::default()
        };
        let listed = store.list_jobs(&all).await.unwrap();
        assert_eq!(listed.len(), 3);
        let readable = listed.iter().find(|j| j.id == ids[0]).unwrap();
        assert!(readable.spec.messages.is_empty());
        assert_eq!(readable.spec.panel, ["m1", "m2"]);
        for id in &ids[1..] {
            let salvaged = listed.iter().find(|j| j.id == *id).unwrap();
            assert_eq!(salvaged.spec.panel, Vec::<String>::new());
        }
    }

    #[tokio::test]
    async fn a_job_that_does_not_read_fails_at_its_claim_and_the_rest_run() {
        let (_dir, store) = migrated_store().await;
        let writer = &store.writer;
        a_job_that_does_not_read_fails_at_its_claim(&store, |id| async move {
            let q =
                "UPDATE jobs SET spec = '{\"model\": 7, \"panel\": [\"m1\", \"m2\"]}' WHERE id = ?";
            sqlx::query(q)
                .bind(id.to_string())
                .execute(writer)
                .await
                .unwrap();
        })
        .await;
    }

    // A claimed job with a column that does not decode (a time edited by hand into text) is
    // failed as `invalid_job` as one with a bad spec is, and the rest of the claim runs. Before,
    // only a bad spec was taken as one row's: this failed the claim after it had committed.
    #[tokio::test]
    async fn a_job_with_a_column_that_does_not_decode_fails_at_its_claim() {
        let (_dir, store) = migrated_store().await;
        let writer = &store.writer;
        let (jobs, _) = claim_past_a_corrupt_job(&store, |id| async move {
            sqlx::query("UPDATE jobs SET created_at = 'yesterday' WHERE id = ?")
                .bind(id.to_string())
                .execute(writer)
                .await
                .unwrap();
        })
        .await;
        let (status, reason): (String, String) =
            sqlx::query_as("SELECT status, failure_reason FROM jobs WHERE id = ?")
                .bind(jobs[0].id.to_string())
                .fetch_one(&store.writer)
                .await
                .unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("failed", "invalid_job")
        );
    }

    // A claimed job whose very id does not read (a row edited by hand) cannot be failed by its
    // lease: it is left running, to its lease and the rescuer, and the rest of the claim runs.
    // Before, the claim failed after its UPDATE had committed, leaving every job it took
    // running unseen until their leases ran out, and again at every claim after.
    #[tokio::test]
    async fn a_job_whose_id_does_not_read_does_not_take_its_claim_down() {
        let (_dir, store) = migrated_store().await;
        let writer = &store.writer;
        let (_, now) = claim_past_a_corrupt_job(&store, |id| async move {
            sqlx::query("UPDATE jobs SET id = 'not-a-uuid' WHERE id = ?")
                .bind(id.to_string())
                .execute(writer)
                .await
                .unwrap();
        })
        .await;
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = 'not-a-uuid'")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(status, "running");
        // Its lease runs out with the others': the rescuer takes it back.
        let expired = now + ms(CORRUPT_CLAIM_LEASE) + 1;
        assert_eq!(store.rescue_expired(expired).await.unwrap(), 3);
    }

    // A write lock held by another process fails the writes queued behind it once the busy
    // timeout (10 s) passes, the whole batch at once, and they land once it is released.
    // Halved like a batch with a bad write in it, these four waited out seven busy timeouts.
    #[tokio::test]
    async fn writes_stuck_behind_another_writer_fail_after_the_busy_timeout_all_at_once() {
        let (dir, store) = migrated_store().await;
        let mut leases = vec![];
        for i in 0..4 {
            let job = running_job(&store, 1_000 + i, 1, "w1").await;
            leases.push(Lease {
                job_id: job.id,
                attempt: 1,
                owner: "w1".into(),
            });
        }
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();

        let outcomes = || {
            leases.iter().map(|lease| {
                let finish = Finish::failed(lease, "x".into(), "y".into(), 2_000);
                store.writes.write(Write::Finish(finish))
            })
        };
        let (within, give_up) = (Duration::from_secs(25), Duration::from_secs(45));
        all_fail_at_once_behind_a_lock(join_all(outcomes()), "locked", within, give_up).await;

        sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
        for result in join_all(outcomes()).await {
            assert!(result.unwrap());
        }
    }

    // A batch's statement journals (and any other temporary file) stay in memory on every
    // connection, the writer's above all: spilled, a batch statement's journal became a file.
    #[tokio::test]
    async fn temporary_files_stay_in_memory() {
        let (_dir, store) = migrated_store().await;
        for pool in [&store.writer, &store.pool] {
            let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(temp_store, 2, "temp_store = MEMORY");
        }
    }

    // The claim's plan, from SQLite itself, on a file with a backlog and no statistics (as the
    // queue's own file has): it must walk the claim index in order, never read every queued job
    // and sort them.
    #[tokio::test]
    async fn a_claim_walks_the_claim_index_without_sorting_the_backlog() {
        let (_dir, store) = store_with_a_backlog().await;
        let why = "the claim does not walk jobs_claimable in order";
        plan_uses(&store.writer, CLAIM_REST_SQL, "INDEX jobs_claimable", why).await;
    }

    /// A migrated store holding 2,000 jobs over three priorities, three in four queued, and no
    /// statistics (as the queue's own file has).
    async fn store_with_a_backlog() -> (tempfile::TempDir, SqliteStore) {
        let (dir, store) = migrated_store().await;
        sqlx::raw_sql(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000) \
             INSERT INTO jobs (id, status, spec, metadata, priority, max_attempts, run_at, \
                               created_at) \
             SELECT printf('job-%05d', n), iif(n % 4 = 0, 'succeeded', 'queued'), '{}', '{}', \
                    n % 3, 3, n, n FROM g",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        (dir, store)
    }

    // A claim reads the jobs it takes, not the jobs waiting to be due: by SQLite's own plan, each
    // priority's claim seeks its due jobs as a range of the claim index (the priority, then
    // `run_at` up to now), and the next priority is one step of the same index. A walk in
    // `(priority, run_at, id)` order filtered by `run_at`, the claim before, read on through every
    // delayed job whenever fewer were due than it wanted.
    #[tokio::test]
    async fn a_claim_seeks_the_due_jobs_of_one_priority_at_a_time() {
        let (_dir, store) = store_with_a_backlog().await;
        let take = claim_where!(concat!("priority = ", level_below!()));
        let seek = "INDEX jobs_claimable (priority=? AND run_at<?)";
        let why = "a priority's claim does not seek its due jobs";
        plan_uses(&store.writer, take, seek, why).await;
        let step = concat!("SELECT ", level_below!());
        let why = "the next priority is not one step of the claim index";
        plan_uses(
            &store.writer,
            step,
            "INDEX jobs_claimable (priority<?)",
            why,
        )
        .await;
    }

    // A claim's commands commit one by one: when one fails after others took jobs, the claim
    // returns those jobs to be run. Failing the claim instead left them running under a lease
    // nobody held, their attempt spent, until the rescuer took them back.
    #[tokio::test]
    async fn a_claim_that_fails_partway_runs_the_jobs_it_took() {
        let (_dir, store) = migrated_store().await;
        let now = 1_750_000_000_000;
        let high = NewJob {
            priority: 1,
            ..queued_job(now - 2_000)
        };
        let low = queued_job(now - 1_000);
        for job in [&high, &low] {
            store.enqueue(job.clone(), None).await.unwrap();
        }
        // The second priority's command fails, after the first took its job.
        sqlx::raw_sql(
            "CREATE TRIGGER refuse_low BEFORE UPDATE OF status ON jobs WHEN OLD.priority = 0 \
             BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let lease = Duration::from_secs(30);
        let claimed = store.claim("w", 10, now, lease).await.unwrap();
        let ids: Vec<Uuid> = claimed.iter().map(|c| c.job.id).collect();
        assert_eq!(ids, [high.id], "the job taken before the failure");
        let left = store.get_job(low.id).await.unwrap().unwrap();
        assert_eq!(left.status, JobStatus::Queued);
        // With nothing taken before it, the failure is the claim's.
        let failed = store.claim("w", 10, now, lease).await;
        assert!(failed.is_err(), "{failed:?}");
    }

    // A command whose answer was lost may have taken jobs too: then the claim fails, so that the
    // worker hands back all it took (by its lease), not just the jobs it could not see.
    #[test]
    fn a_claim_stopped_by_a_command_that_may_have_committed_fails() {
        let lost = || StoreError::Database(sqlx::Error::WorkerCrashed);
        assert!(lost().may_have_committed());
        assert!(stopped_partway(lost(), 3).is_err());
        assert!(stopped_partway(lost(), 0).is_err());
        let refused = || StoreError::Corrupt("injected".into());
        assert!(stopped_partway(refused(), 3).is_ok());
        assert!(stopped_partway(refused(), 0).is_err());
    }

    #[tokio::test]
    async fn deleting_jobs_deletes_their_steps() {
        let (_dir, store) = migrated_store().await;
        sqlx::raw_sql(
            "INSERT INTO jobs (id, status, spec, metadata, max_attempts, run_at, created_at) \
             VALUES ('j1', 'succeeded', '{}', '{}', 3, 0, 0), \
                    ('j2', 'succeeded', '{}', '{}', 3, 0, 0); \
             INSERT INTO steps (job_id, step, model, ok, prompt_tokens, completion_tokens, cost, \
                                latency_ms, attempt, created_at) \
             SELECT id, 'final', 'm', 1, 0, 0, 0, 0, 1, 0 FROM jobs; \
             DELETE FROM jobs WHERE id = 'j1'",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let left: Vec<String> = sqlx::query_scalar("SELECT job_id FROM steps")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        assert_eq!(left, ["j2"]);
    }

    // A retry that commits is answered from its own update: with the readers unable to answer
    // (the pool closed here; a busy file or a timeout in service), the failed job is requeued
    // and told so, and the steps' marks changed with it. Before, the job was read back after
    // the commit, and that read's error answered a change that had taken place as a failure.
    #[tokio::test]
    async fn a_retry_that_commits_is_answered_without_another_read() {
        let (_dir, store) = migrated_store().await;
        sqlx::raw_sql(
            "INSERT INTO jobs (id, status, spec, metadata, attempt, max_attempts, run_at, \
                               created_at, finished_at, failure_reason) \
             VALUES ('01a2504c-0000-7000-8000-000000000001', 'failed', \
                     '{\"model\": \"fusion\", \"panel\": [\"m1\"], \"analyst\": \"m1\", \
                       \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}', \
                     '{}', 1, 1, 0, 0, 5, 'rate_limited'); \
             INSERT INTO steps (job_id, step, model, ok, prompt_tokens, completion_tokens, cost, \
                                latency_ms, error_code, attempt, created_at) \
             VALUES ('01a2504c-0000-7000-8000-000000000001', 'final', 'm1', 0, 0, 0, 0, 0, \
                     'rate_limited', 1, 0)",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let id: Uuid = "01a2504c-0000-7000-8000-000000000001".parse().unwrap();
        store.pool.close().await;
        let RetryOutcome::Requeued(job) = store.retry_failed(id, 10).await.unwrap() else {
            panic!("not requeued");
        };
        assert_eq!(
            (job.id, job.status, job.max_attempts),
            (id, JobStatus::Queued, 2)
        );
        assert_eq!(job.failure_reason, None);
        let code: String = sqlx::query_scalar("SELECT error_code FROM steps")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(code, SUPERSEDED);
        // Nothing to change: the answer needs a read, and a failed one is an error.
        assert!(store.retry_failed(id, 11).await.is_err());
    }

    // A heartbeat names thousands of jobs when thousands run: each is looked up by its id (the
    // plan is checked, since a join on `json_each` planned the other way round read every
    // running job once per job named).
    #[tokio::test]
    async fn a_heartbeat_seeks_each_job_it_names() {
        let (_dir, store) = migrated_store().await;
        let why = "a heartbeat looks each named job up by its id";
        plan_uses(&store.writer, HEARTBEAT_SQL, "(status=? AND id=?)", why).await;
    }

    // A page of the job list seeks to its cursor, in a status or not, rather than scanning every
    // job newer than the cursor (or all of them, for a rare status).
    #[tokio::test]
    async fn a_page_of_the_job_list_seeks_to_its_cursor() {
        let (_dir, store) = migrated_store().await;
        let why = "listing every status does not seek to the cursor";
        plan_uses(&store.pool, LIST_SQL, "(id<?)", why).await;
        let seek = "jobs_status_id (status=? AND id<?)";
        let why = "listing one status does not seek to the cursor within it";
        plan_uses(&store.pool, LIST_BY_STATUS_SQL, seek, why).await;
    }

    // An SDK's retry finds its first try's job by the partial index, not by reading the table.
    #[tokio::test]
    async fn a_request_is_found_by_its_index() {
        let (_dir, store) = migrated_store().await;
        let seek = "jobs_request_hash (request_hash=? AND created_at>?)";
        let why = "finding a request's job does not seek its index";
        plan_uses(&store.pool, FIND_BY_REQUEST_SQL, seek, why).await;
    }

    // An API answers 503 (try again shortly) for a database file busy with another process's
    // write, and 500 for a call that is wrong.
    #[tokio::test]
    async fn a_busy_file_is_told_from_a_wrong_call() {
        let (dir, _store) = migrated_store().await;
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let mut one = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let mut two = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE")
            .execute(&mut one)
            .await
            .unwrap();
        let busy = sqlx::raw_sql("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE")
            .execute(&mut two)
            .await
            .unwrap_err();
        assert!(StoreError::from(busy).is_unavailable(), "SQLITE_BUSY");
        let syntax = sqlx::raw_sql("SELEC 1")
            .execute(&mut one)
            .await
            .unwrap_err();
        assert!(!StoreError::from(syntax).is_unavailable());
    }

    // A file that cannot be opened (its directory does not exist: a wrong path) is not the
    // database away for now: the start fails at once, naming it, rather than trying again for
    // half a minute.
    #[tokio::test]
    async fn a_file_that_cannot_be_opened_does_not_pass_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("no/such/dir/q.db").display());
        let Err(e) = SqliteStore::connect(&url).await else {
            panic!("opened a file in a directory that does not exist");
        };
        assert!(!e.may_pass_at_start(), "{e}");
        assert!(!e.is_unavailable(), "{e}");
    }

    // A full disk is the database unavailable for now (503, retried), as Postgres's
    // `disk_full` is, not a fault of the server's own (500). Here the file may not grow past
    // the pages it has (`max_page_count`), as a full disk stops it.
    #[tokio::test]
    async fn a_full_disk_is_unavailable_for_now() {
        let (dir, _store) = migrated_store().await;
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        // A limit under the pages the file has is raised to them: it may not grow at all.
        sqlx::raw_sql("CREATE TABLE filler (b BLOB); PRAGMA max_page_count = 1")
            .execute(&mut conn)
            .await
            .unwrap();
        let full = sqlx::query("INSERT INTO filler VALUES (zeroblob(1000000))")
            .execute(&mut conn)
            .await
            .unwrap_err();
        let code = full.as_database_error().and_then(|db| db.code());
        assert_eq!(code.as_deref(), Some("13"), "SQLITE_FULL: {full}");
        assert!(StoreError::from(full).is_unavailable());
    }
}
