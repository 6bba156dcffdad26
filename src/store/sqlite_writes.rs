//! SQLite batches (see `batch.rs`): one command to the writer connection holding the batch's
//! transaction and its statements, each a multi-row statement whose rows are bound as plain
//! parameters (`VALUES (?, …), …`), so a batch costs one hop to SQLite's thread, not one per
//! write, and SQLite reads no JSON to find a row's values.

use std::sync::OnceLock;

use async_trait::async_trait;
use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments, SqlitePool};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::batch::{BatchSql, Write, took_row, which_took};
use crate::job::{JobStatus, JsonText};

pub(super) struct SqliteBatch(pub SqlitePool);

/// Rows per statement: a kind's rows go out in statements of `SIZES[i]` rows, each the smallest
/// that holds what is left (at most the largest; more rows take several), the unused rows bound
/// to NULLs, which match no job. A batch's command then takes one of few shapes, and sqlx, which
/// keeps a connection's last 100 prepared statements by their text, prepares each shape once
/// (1.3M instructions per preparation on average in a counted drain). A kept shape holds ~600
/// bytes per checkpoint row (a 256-row statement, 156 KB by `sqlite3`'s `.stats`): in the
/// benchmark's memory scenario, whose batches come in every size, the server's peak grew by
/// 9 MiB.
const SIZES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// One kind of write: its parameters per row, its statement with `{rows}` for the `VALUES` rows
/// (whose columns are `column1`…; each row it writes comes back as a `Took`'s columns: kind, job
/// id, step, attempt), and that statement for each size, made once.
struct Kind {
    columns: usize,
    template: &'static str,
    statements: OnceLock<[String; SIZES.len()]>,
}

impl Kind {
    const fn new(columns: usize, template: &'static str) -> Kind {
        Kind {
            columns,
            template,
            statements: OnceLock::new(),
        }
    }

    /// The statement for `SIZES[i]` rows.
    fn statement(&self, i: usize) -> &str {
        let statements = self.statements.get_or_init(|| {
            let row = format!("({})", vec!["?"; self.columns].join(", "));
            SIZES.map(|rows| {
                let rows = vec![row.as_str(); rows].join(",\n");
                self.template.replace("{rows}", &rows)
            })
        });
        &statements[i]
    }

    /// The statements for `rows` rows: their sizes' indexes in `SIZES`.
    fn sizes(rows: usize) -> impl Iterator<Item = usize> {
        let largest = SIZES.len() - 1;
        let full = rows / SIZES[largest];
        let rest = rows % SIZES[largest];
        let last = (rest > 0).then(|| SIZES.iter().position(|&n| n >= rest).unwrap_or(largest));
        std::iter::repeat_n(largest, full).chain(last)
    }
}

/// Enqueue rows: `[id, spec, metadata, priority, max_attempts, deadline_at, idempotency_key,
/// request_hash, created_at, lease_owner, lease_expires_at]`: queued, or running its first
/// attempt since its creation when it comes with a lease. The `WHERE` (a padding row's id is
/// NULL) also tells SQLite's parser that `ON CONFLICT` is the upsert's, not a join's.
const ENQUEUE_SQL: &str = "\
INSERT INTO jobs (id, status, spec, metadata, priority, attempt, max_attempts, run_at,
                  deadline_at, idempotency_key, request_hash, created_at, lease_owner,
                  lease_expires_at, started_at)
SELECT column1, iif(column10 IS NULL, 'queued', 'running'), column2, column3, column4,
       iif(column10 IS NULL, 0, 1), column5, column9, column6, column7, column8, column9,
       column10, column11, iif(column10 IS NULL, NULL, column9)
FROM (VALUES {rows}) WHERE column1 IS NOT NULL
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING 'e', id, NULL, NULL";
static ENQUEUE: Kind = Kind::new(11, ENQUEUE_SQL);

/// Step rows: `[job_id, step, model, ok, content, data, prompt_tokens, completion_tokens, cost,
/// latency_ms, error_code, error, status_code, attempt, created_at, owner]`; fenced on the lease.
/// A step an earlier attempt wrote is replaced by a later attempt's, never by its own again
/// (as on Postgres, where a claim's snapshot can miss a step an attempt that just lost its lease
/// was committing, and the next attempt then runs that step again).
const STEPS_SQL: &str = "\
INSERT INTO steps (job_id, step, model, ok, content, data, prompt_tokens, completion_tokens,
                   cost, latency_ms, error_code, error, status_code, attempt, created_at)
SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9,
       column10, column11, column12, column13, column14, column15
FROM (VALUES {rows})
WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = column1 AND j.status = 'running'
              AND j.attempt = column14 AND j.lease_owner = column16)
ON CONFLICT (job_id, step) DO UPDATE SET
    model = excluded.model, ok = excluded.ok, content = excluded.content, data = excluded.data,
    prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens,
    cost = excluded.cost, latency_ms = excluded.latency_ms, error_code = excluded.error_code,
    error = excluded.error, status_code = excluded.status_code, attempt = excluded.attempt,
    created_at = excluded.created_at
WHERE steps.attempt < excluded.attempt
RETURNING 's', job_id, step, attempt";
static STEPS: Kind = Kind::new(16, STEPS_SQL);

/// Finish rows: `[id, attempt, owner, status, result, reason, error, finished_at]`; fenced on
/// the lease. The `+` keeps the planner off the status index: it must walk the rows and look
/// each job up by id, not scan every running job once per row.
const FINISH_SQL: &str = "\
UPDATE jobs SET status = v.column4,
                result = CASE WHEN v.column4 = 'succeeded' THEN v.column5 ELSE jobs.result END,
                failure_reason = v.column6, error = v.column7, finished_at = v.column8,
                lease_owner = NULL, lease_expires_at = NULL
FROM (VALUES {rows}) AS v
WHERE jobs.id = v.column1 AND jobs.attempt = v.column2 AND jobs.lease_owner = v.column3
  AND +jobs.status = 'running'
RETURNING 'f', id, NULL, attempt";
static FINISH: Kind = Kind::new(8, FINISH_SQL);

type SqliteQuery<'a> = Query<'a, Sqlite, SqliteArguments>;

/// Bind one write's row to `q` (its kind's columns, in its kind's order).
fn bind_row<'a>(q: SqliteQuery<'a>, write: &'a Write) -> Result<SqliteQuery<'a>, sqlx::Error> {
    Ok(match write {
        Write::Enqueue { job, start } => q
            .bind(job.id.to_string())
            .bind(serde_json::to_string(&job.spec).map_err(encode)?)
            .bind(job.metadata.to_string())
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(job.deadline_at)
            .bind(job.idempotency_key.as_deref())
            .bind(job.request_hash.as_deref())
            .bind(job.created_at)
            .bind(start.as_ref().map(|s| s.owner.as_str()))
            .bind(start.as_ref().map(|s| s.lease_expires_at)),
        Write::Step { lease, step } => q
            .bind(lease.job_id.to_string())
            .bind(step.key.to_db())
            .bind(step.model.as_str())
            .bind(i64::from(step.ok))
            .bind(step.content.as_deref())
            .bind(step.data.as_ref().map(JsonText::as_str))
            .bind(step.usage.prompt_tokens)
            .bind(step.usage.completion_tokens)
            .bind(step.usage.cost)
            .bind(step.latency_ms)
            .bind(step.error_code.as_deref())
            .bind(step.error.as_deref())
            .bind(step.status_code)
            .bind(lease.attempt)
            .bind(step.created_at)
            .bind(lease.owner.as_str()),
        Write::Finish(f) => q
            .bind(f.lease.job_id.to_string())
            .bind(f.lease.attempt)
            .bind(f.lease.owner.as_str())
            .bind(f.status.as_str())
            .bind(
                f.result
                    .as_ref()
                    .filter(|_| f.status == JobStatus::Succeeded)
                    .map(JsonText::as_str),
            )
            .bind(f.reason.as_deref())
            .bind(f.error.as_deref())
            .bind(f.now),
    })
}

#[async_trait]
impl BatchSql for SqliteBatch {
    async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
        let (mut enqueues, mut steps, mut finishes) = (Vec::new(), Vec::new(), Vec::new());
        for write in writes {
            match write {
                Write::Enqueue { .. } => enqueues.push(write),
                Write::Step { .. } => steps.push(write),
                Write::Finish(_) => finishes.push(write),
            }
        }
        let mut sql = String::from("BEGIN IMMEDIATE;\n");
        let mut args = Vec::new();
        for (kind, rows) in [
            (&ENQUEUE, &enqueues),
            (&STEPS, &steps),
            (&FINISH, &finishes),
        ] {
            let mut rest = rows.as_slice();
            for i in Kind::sizes(rows.len()) {
                let (chunk, after) = rest.split_at(SIZES[i].min(rest.len()));
                rest = after;
                sql += kind.statement(i);
                sql += ";\n";
                args.push((kind, chunk, SIZES[i] - chunk.len()));
            }
        }
        sql += "COMMIT";
        let mut q: SqliteQuery<'_> = sqlx::query(AssertSqlSafe(sql));
        for (kind, chunk, padding) in args {
            for write in chunk {
                q = bind_row(q, write)?;
            }
            for _ in 0..padding * kind.columns {
                q = q.bind(None::<i64>);
            }
        }
        // One connection for the batch and, when it fails, its rollback: handed back to the
        // pool in between, the open transaction would take whatever write came next (a claim,
        // a cancel) and then roll it back after it had answered as done.
        let mut conn = self.0.acquire().await?;
        let rows = match q.fetch_all(&mut *conn).await {
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
            let id = Uuid::parse_str(row.try_get(1)?).map_err(decode)?;
            took.push(took_row(
                row.try_get(0)?,
                id,
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

fn decode(e: uuid::Error) -> sqlx::Error {
    sqlx::Error::Decode(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_out_in_the_fewest_statements_of_the_fewest_shapes() {
        let sizes = |rows| Kind::sizes(rows).map(|i| SIZES[i]).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(3), [4]);
        assert_eq!(sizes(129), [256]);
        assert_eq!(sizes(256), [256]);
        assert_eq!(sizes(300), [256, 64]);
        assert_eq!(sizes(768), [256, 256, 256]);
    }
}
