//! SQLite batches (see `batch.rs`): one command to the writer connection holding the batch's
//! transaction and one statement per kind of write — each reads its rows from a JSON array bound
//! as a single parameter (`jsonb_each`: its rows come as binary JSON, which `->>` reads without
//! parsing the row again) — so a batch costs one hop to SQLite's thread, not one per write.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::batch::{BatchSql, Write, which_took};
use crate::job::{JobStatus, JsonText};

pub(super) struct SqliteBatch(pub SqlitePool);

/// A whole batch in one command to SQLite's thread: its own transaction and the three writes,
/// each reading its rows from a JSON array (`[]` when there are none) and returning the rows
/// that took effect under their kind. Sent as one statement list, it costs one hop to the
/// writer thread and back, where `begin`, three queries and `commit` cost five (and a thread
/// wake-up on each side of every hop).
///
/// Enqueue rows: `[id, spec, metadata, priority, max_attempts, deadline_at, idempotency_key,
/// request_hash, created_at, lease_owner, lease_expires_at]`: queued, or running its first
/// attempt since its creation when it comes with a lease.
///
/// Step rows: `[job_id, step, model, ok, content, data, prompt_tokens, completion_tokens, cost,
/// latency_ms, error_code, error, status_code, attempt, created_at, owner]`; fenced on the lease.
/// A step an earlier attempt wrote is replaced by a later attempt's, never by its own again
/// (as on Postgres, where a claim's snapshot can miss a step an attempt that just lost its lease
/// was committing, and the next attempt then runs that step again).
///
/// Finish rows: `[id, attempt, owner, status, result, reason, error, finished_at]`; fenced on the
/// lease. The `+` keeps the planner off the status index: it must walk the batch and look each
/// job up by id, not scan every running job once per row of the batch.
const BATCH_SQL: &str = "\
BEGIN IMMEDIATE;
INSERT INTO jobs (id, status, spec, metadata, priority, attempt, max_attempts, run_at,
                  deadline_at, idempotency_key, request_hash, created_at, lease_owner,
                  lease_expires_at, started_at)
SELECT value ->> 0, iif(value ->> 9 IS NULL, 'queued', 'running'), value ->> 1, value ->> 2,
       value ->> 3, iif(value ->> 9 IS NULL, 0, 1), value ->> 4, value ->> 8, value ->> 5,
       value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10,
       iif(value ->> 9 IS NULL, NULL, value ->> 8)
FROM jsonb_each(?1) WHERE true
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING 'e', id, NULL, NULL;
INSERT INTO steps (job_id, step, model, ok, content, data, prompt_tokens, completion_tokens,
                   cost, latency_ms, error_code, error, status_code, attempt, created_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
       value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11,
       value ->> 12, value ->> 13, value ->> 14
FROM jsonb_each(?2)
WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = value ->> 0 AND j.status = 'running'
              AND j.attempt = value ->> 13 AND j.lease_owner = value ->> 15)
ON CONFLICT (job_id, step) DO UPDATE SET
    model = excluded.model, ok = excluded.ok, content = excluded.content, data = excluded.data, prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens, cost = excluded.cost,
    latency_ms = excluded.latency_ms, error_code = excluded.error_code,
    error = excluded.error, status_code = excluded.status_code,
    attempt = excluded.attempt, created_at = excluded.created_at
WHERE steps.attempt < excluded.attempt
RETURNING 's', job_id, step, attempt;
UPDATE jobs SET status = f.value ->> 3,
                result = CASE WHEN f.value ->> 3 = 'succeeded' THEN f.value ->> 4
                              ELSE jobs.result END,
                failure_reason = f.value ->> 5, error = f.value ->> 6,
                finished_at = f.value ->> 7, lease_owner = NULL, lease_expires_at = NULL
FROM jsonb_each(?3) AS f
WHERE jobs.id = f.value ->> 0 AND jobs.attempt = f.value ->> 1
  AND jobs.lease_owner = f.value ->> 2 AND +jobs.status = 'running'
RETURNING 'f', id, NULL, attempt;
COMMIT";

#[async_trait]
impl BatchSql for SqliteBatch {
    async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
        // Each kind's rows serialize straight from the writes into its JSON array: no
        // `serde_json::Value` tree in between.
        let (mut enqueues, mut steps, mut finishes) = (Vec::new(), Vec::new(), Vec::new());
        for write in writes {
            match write {
                Write::Enqueue { job, start } => enqueues.push((
                    job.id,
                    serde_json::to_string(&job.spec).map_err(encode)?,
                    job.metadata.to_string(),
                    job.priority,
                    job.max_attempts,
                    job.deadline_at,
                    &job.idempotency_key,
                    &job.request_hash,
                    job.created_at,
                    start.as_ref().map(|s| &s.owner),
                    start.as_ref().map(|s| s.lease_expires_at),
                )),
                Write::Step { lease, step } => steps.push((
                    lease.job_id,
                    step.key.to_db(),
                    &step.model,
                    i64::from(step.ok),
                    &step.content,
                    step.data.as_ref().map(JsonText::as_str),
                    step.usage.prompt_tokens,
                    step.usage.completion_tokens,
                    step.usage.cost,
                    step.latency_ms,
                    &step.error_code,
                    &step.error,
                    step.status_code,
                    lease.attempt,
                    step.created_at,
                    &lease.owner,
                )),
                Write::Finish(f) => finishes.push((
                    f.lease.job_id,
                    f.lease.attempt,
                    &f.lease.owner,
                    f.status.as_str(),
                    f.result
                        .as_ref()
                        .filter(|_| f.status == JobStatus::Succeeded)
                        .map(JsonText::as_str),
                    &f.reason,
                    &f.error,
                    f.now,
                )),
            }
        }
        // One connection for the batch and, when it fails, its rollback: handed back to the
        // pool in between, the open transaction would take whatever write came next (a claim,
        // a cancel) and then roll it back after it had answered as done.
        let mut conn = self.0.acquire().await?;
        let rows = sqlx::query(BATCH_SQL)
            .bind(serde_json::to_string(&enqueues).map_err(encode)?)
            .bind(serde_json::to_string(&steps).map_err(encode)?)
            .bind(serde_json::to_string(&finishes).map_err(encode)?)
            .fetch_all(&mut *conn)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // The statement that failed ended the command with the transaction open (or
                // SQLite already rolled it back, and this is a harmless error).
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(e);
            }
        };
        let mut took = Vec::with_capacity(rows.len());
        for row in &rows {
            took.push((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ));
        }
        Ok(which_took(writes, took))
    }
}

fn encode(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Encode(e.into())
}
