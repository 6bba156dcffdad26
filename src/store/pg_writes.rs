//! Postgres batches (see `batch.rs`): a whole batch of enqueues, checkpoints and outcomes is
//! ONE statement — three data-modifying CTEs over `unnest`ed arrays — so it costs one round trip,
//! one plan and one commit however many writes it carries.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::Postgres;
use sqlx::Row;
use sqlx::postgres::{PgArguments, PgPool};
use sqlx::query::Query;
use sqlx::types::Json;
use uuid::Uuid;

use super::batch::{BatchSql, Finish, Write, took_row, which_took};
use super::postgres::bounded;
use crate::job::{JobSpec, JsonText, Lease, NewJob, StartHere, Step};

pub(super) struct PgBatch {
    pub pool: PgPool,
    /// How long a batch statement may go unanswered before its connection is given up: a bit
    /// past the statement timeout, which the server enforces and answers (see `bounded`).
    /// `None`: no statement timeout, and no limit here either.
    pub answer_within: Option<Duration>,
}

#[async_trait]
impl BatchSql for PgBatch {
    async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
        execute(&self.pool, writes, self.answer_within).await
    }
}

/// The batch statement. `e`: new jobs, queued or started under a lease (a statement-level trigger
/// NOTIFYs workers once per statement that queued any); `s`: checkpoints, fenced on the lease;
/// `f`: outcomes, fenced on the lease, their rows locked first in id order (`l`), as every
/// statement that changes several running jobs locks them: the heartbeat renews all of a
/// process's jobs while a batch finishes some, and two statements that lock the same rows in
/// opposite orders deadlock, which Postgres breaks only after `deadlock_timeout` (1 s) by
/// failing one of them. Its rows say which writes took effect.
///
/// The checkpoints' fence reads the statement's snapshot and locks nothing: a write racing the
/// loss of its lease (a cancel or a rescue committing meanwhile) may land as if just before it.
/// An outcome re-checks the row it locks and updates, so a final step may then land without its
/// outcome: it is a checkpoint like any other, which the next attempt reuses. And the next
/// attempt's claim may not see such a step yet, and run it again: its write replaces the earlier
/// attempt's row (`DO UPDATE … WHERE steps.attempt < excluded.attempt`) instead of being refused,
/// which its worker would take for a lost lease.
pub(super) const BATCH_SQL: &str = "\
WITH e AS (
    INSERT INTO jobs (id, status, spec, metadata, priority, attempt, max_attempts, run_at,
                      deadline_at, idempotency_key, request_hash, created_at, lease_owner,
                      lease_expires_at, started_at)
    SELECT u.id, CASE WHEN u.lease_owner IS NULL THEN 'queued' ELSE 'running' END, u.spec,
           u.metadata, u.priority, CASE WHEN u.lease_owner IS NULL THEN 0 ELSE 1 END,
           u.max_attempts, u.created_at, u.deadline_at, u.idempotency_key, u.request_hash,
           u.created_at, u.lease_owner, u.lease_expires_at,
           CASE WHEN u.lease_owner IS NULL THEN NULL ELSE u.created_at END
    FROM unnest($1::uuid[], $2::jsonb[], $3::jsonb[], $4::int[], $5::int[], $6::bigint[],
                $7::text[], $8::text[], $9::bigint[], $34::text[], $35::bigint[])
         AS u(id, spec, metadata, priority, max_attempts, deadline_at, idempotency_key,
              request_hash, created_at, lease_owner, lease_expires_at)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), s AS (
    INSERT INTO steps (job_id, step, model, ok, content, data, prompt_tokens, completion_tokens,
                       cost, latency_ms, error_code, error, status_code, attempt, created_at)
    SELECT u.job_id, u.step, u.model, u.ok, u.content, u.data, u.prompt_tokens,
           u.completion_tokens, u.cost, u.latency_ms, u.error_code, u.error, u.status_code,
           u.attempt, u.created_at
    FROM unnest($10::uuid[], $11::text[], $12::text[], $13::bool[], $14::text[], $15::jsonb[],
                $16::bigint[], $17::bigint[], $18::float8[], $19::bigint[], $20::text[],
                $21::text[], $22::int[], $23::int[], $24::bigint[], $25::text[])
         AS u(job_id, step, model, ok, content, data, prompt_tokens, completion_tokens, cost,
              latency_ms, error_code, error, status_code, attempt, created_at, owner)
    WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = u.job_id AND j.status = 'running'
                  AND j.attempt = u.attempt AND j.lease_owner = u.owner)
    ON CONFLICT (job_id, step) DO UPDATE SET model = excluded.model, ok = excluded.ok, content = excluded.content,
        data = excluded.data, prompt_tokens = excluded.prompt_tokens,
        completion_tokens = excluded.completion_tokens, cost = excluded.cost,
        latency_ms = excluded.latency_ms, error_code = excluded.error_code,
        error = excluded.error, status_code = excluded.status_code,
        attempt = excluded.attempt, created_at = excluded.created_at
    WHERE steps.attempt < excluded.attempt
    RETURNING job_id, step, attempt
), l AS MATERIALIZED (
    SELECT j.id FROM jobs j
    JOIN unnest($26::uuid[], $27::int[], $28::text[]) AS u(id, attempt, owner)
      ON j.id = u.id AND j.attempt = u.attempt AND j.lease_owner = u.owner
    WHERE j.status = 'running'
    ORDER BY j.id FOR UPDATE OF j
), f AS (
    UPDATE jobs SET status = u.status,
                    result = CASE WHEN u.status = 'succeeded' THEN u.result ELSE jobs.result END,
                    failure_reason = u.reason, error = u.error, finished_at = u.finished_at,
                    lease_owner = NULL, lease_expires_at = NULL
    FROM unnest($26::uuid[], $27::int[], $28::text[], $29::text[], $30::jsonb[], $31::text[],
                $32::text[], $33::bigint[])
         AS u(id, attempt, owner, status, result, reason, error, finished_at)
    WHERE jobs.id = u.id AND jobs.attempt = u.attempt AND jobs.lease_owner = u.owner
      AND jobs.status = 'running' AND jobs.id IN (SELECT id FROM l)
    RETURNING jobs.id, jobs.attempt
)
SELECT 'e' AS kind, id, NULL::text AS step, NULL::int AS attempt FROM e
UNION ALL SELECT 's', job_id, step, attempt FROM s
UNION ALL SELECT 'f', id, NULL, attempt FROM f";

/// Run `writes` as one statement; for each, whether it took effect.
///
/// Unanswered `within`, the batch fails as a broken connection does (committed or not, nobody
/// knows: the writers read back what landed; see `bounded`). Without that bound, a server that
/// vanished without a word would hold the process's one batch committer, and with it every
/// checkpoint, outcome and enqueue, for as long as TCP takes to give up.
async fn execute(
    pool: &PgPool,
    writes: &[Write],
    within: Option<Duration>,
) -> Result<Vec<bool>, sqlx::Error> {
    let statement = bound(sqlx::query(BATCH_SQL), writes);
    let rows = bounded(pool, within, async |c| statement.fetch_all(c).await).await?;
    let mut took = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get("id")?;
        let attempt: Option<i32> = row.try_get("attempt")?;
        let step: Option<&str> = row.try_get("step")?;
        took.push(took_row(
            row.try_get("kind")?,
            id,
            step,
            attempt.map(i64::from),
        ));
    }
    Ok(which_took(writes, took))
}

/// `query` (the batch statement, or a plan of it) with the columns of `writes` bound.
pub(super) fn bound<'a>(
    query: Query<'a, Postgres, PgArguments>,
    writes: &'a [Write],
) -> Query<'a, Postgres, PgArguments> {
    let mut e = Enqueues::default();
    let mut s = Steps::default();
    let mut f = Finishes::default();
    let mut enqueues = Vec::new();
    let mut steps = Vec::new();
    for write in writes {
        match write {
            Write::Enqueue { job, start } => enqueues.push((job, start.as_ref())),
            Write::Step { lease, step } => steps.push((lease, step)),
            Write::Finish(finish) => f.push(finish),
        }
    }
    // Rows another process's batch may insert too (an idempotency key, a step of a job taken
    // over) go in in one order everywhere: a unique index makes the second insert of a key wait
    // for the first one's transaction, so two batches holding the same two keys in opposite
    // orders would deadlock. Which rows took is read back by key, not by place.
    enqueues.sort_by(|a, b| a.0.idempotency_key.cmp(&b.0.idempotency_key));
    steps.sort_by_key(|(lease, step)| (lease.job_id, step.key));
    enqueues
        .into_iter()
        .for_each(|(job, start)| e.push(job, start));
    steps
        .into_iter()
        .for_each(|(lease, step)| s.push(lease, step));
    query
        .bind(e.id)
        .bind(e.spec)
        .bind(e.metadata)
        .bind(e.priority)
        .bind(e.max_attempts)
        .bind(e.deadline_at)
        .bind(e.idempotency_key)
        .bind(e.request_hash)
        .bind(e.created_at)
        .bind(s.job_id)
        .bind(s.step)
        .bind(s.model)
        .bind(s.ok)
        .bind(s.content)
        .bind(s.data)
        .bind(s.prompt_tokens)
        .bind(s.completion_tokens)
        .bind(s.cost)
        .bind(s.latency_ms)
        .bind(s.error_code)
        .bind(s.error)
        .bind(s.status_code)
        .bind(s.attempt)
        .bind(s.created_at)
        .bind(s.owner)
        .bind(f.id)
        .bind(f.attempt)
        .bind(f.owner)
        .bind(f.status)
        .bind(f.result)
        .bind(f.reason)
        .bind(f.error)
        .bind(f.finished_at)
        .bind(e.lease_owner)
        .bind(e.lease_expires_at)
}

/// The enqueue columns of a batch, borrowed from its writes (bound as they are, not copied).
#[derive(Default)]
struct Enqueues<'a> {
    id: Vec<Uuid>,
    spec: Vec<Json<&'a JobSpec>>,
    metadata: Vec<Json<&'a Value>>,
    priority: Vec<i32>,
    max_attempts: Vec<i32>,
    deadline_at: Vec<Option<i64>>,
    idempotency_key: Vec<Option<&'a str>>,
    request_hash: Vec<Option<&'a str>>,
    created_at: Vec<i64>,
    lease_owner: Vec<Option<&'a str>>,
    lease_expires_at: Vec<Option<i64>>,
}

impl<'a> Enqueues<'a> {
    fn push(&mut self, job: &'a NewJob, start: Option<&'a StartHere>) {
        self.id.push(job.id);
        self.spec.push(Json(&job.spec));
        self.metadata.push(Json(&job.metadata));
        self.priority.push(job.priority);
        self.max_attempts.push(job.max_attempts);
        self.deadline_at.push(job.deadline_at);
        self.idempotency_key.push(job.idempotency_key.as_deref());
        self.request_hash.push(job.request_hash.as_deref());
        self.created_at.push(job.created_at);
        self.lease_owner.push(start.map(|s| s.owner.as_str()));
        self.lease_expires_at
            .push(start.map(|s| s.lease_expires_at));
    }
}

/// The checkpoint columns of a batch, borrowed from its writes.
#[derive(Default)]
struct Steps<'a> {
    job_id: Vec<Uuid>,
    step: Vec<String>,
    model: Vec<&'a str>,
    ok: Vec<bool>,
    content: Vec<Option<&'a str>>,
    data: Vec<Option<Json<&'a JsonText>>>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost: Vec<f64>,
    latency_ms: Vec<i64>,
    error_code: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    status_code: Vec<Option<i32>>,
    attempt: Vec<i32>,
    created_at: Vec<i64>,
    owner: Vec<&'a str>,
}

impl<'a> Steps<'a> {
    fn push(&mut self, lease: &'a Lease, step: &'a Step) {
        self.job_id.push(lease.job_id);
        self.step.push(step.key.to_db());
        self.model.push(&step.model);
        self.ok.push(step.ok);
        self.content.push(step.content.as_deref());
        self.data.push(step.data.as_ref().map(Json));
        self.prompt_tokens.push(step.usage.prompt_tokens);
        self.completion_tokens.push(step.usage.completion_tokens);
        self.cost.push(step.usage.cost);
        self.latency_ms.push(step.latency_ms);
        self.error_code.push(step.error_code.as_deref());
        self.error.push(step.error.as_deref());
        self.status_code.push(step.status_code);
        // The step is written with the lease's attempt: that is what the fence checks.
        self.attempt.push(lease.attempt);
        self.created_at.push(step.created_at);
        self.owner.push(&lease.owner);
    }
}

/// The outcome columns of a batch, borrowed from its writes.
#[derive(Default)]
struct Finishes<'a> {
    id: Vec<Uuid>,
    attempt: Vec<i32>,
    owner: Vec<&'a str>,
    status: Vec<&'static str>,
    result: Vec<Option<Json<&'a JsonText>>>,
    reason: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    finished_at: Vec<i64>,
}

impl<'a> Finishes<'a> {
    fn push(&mut self, finish: &'a Finish) {
        self.id.push(finish.lease.job_id);
        self.attempt.push(finish.lease.attempt);
        self.owner.push(&finish.lease.owner);
        self.status.push(finish.status.as_str());
        self.result.push(finish.result.as_ref().map(Json));
        self.reason.push(finish.reason.as_deref());
        self.error.push(finish.error.as_deref());
        self.finished_at.push(finish.now);
    }
}
