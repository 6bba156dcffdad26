//! The store under test: a fresh SQLite file, or a fresh Postgres database
//! (`fusion_bench_<uuid>` created through TEST_DATABASE_URL, dropped afterwards), and the few
//! queries the harness reads the queue with (counts, timings, leases, checkpoints).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use fusion::testing::ScratchDatabase;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn parse(s: &str) -> Option<StoreKind> {
        match s.trim() {
            "sqlite" => Some(StoreKind::Sqlite),
            "postgres" | "pg" => Some(StoreKind::Postgres),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "Postgres",
        }
    }
}

/// A fresh database for one scenario.
pub struct Target {
    pub kind: StoreKind,
    /// What the server gets as `DATABASE_URL`.
    pub url: String,
    /// Postgres: the database, dropped with this.
    _pg: Option<ScratchDatabase>,
}

impl Target {
    pub async fn create(ctx: &crate::Ctx, kind: StoreKind) -> anyhow::Result<Target> {
        match kind {
            StoreKind::Sqlite => Ok(Target {
                kind,
                url: format!(
                    "sqlite://{}",
                    (ctx.dir.path())
                        .join(format!("fusion_bench_{}.db", uuid::Uuid::now_v7().simple()))
                        .display()
                ),
                _pg: None,
            }),
            StoreKind::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL")?;
                let database = ScratchDatabase::create(&admin, "fusion_bench").await?;
                Ok(Target {
                    kind,
                    url: database.url.clone(),
                    _pg: Some(database),
                })
            }
        }
    }

    /// A small pool for the harness's own queries (open it once the server made the schema).
    pub async fn open(&self) -> anyhow::Result<Db> {
        Ok(match self.kind {
            StoreKind::Sqlite => {
                let options = SqliteConnectOptions::from_str(&self.url)?
                    .busy_timeout(Duration::from_secs(10));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_with(options)
                        .await?,
                )
            }
            StoreKind::Postgres => Db::Pg(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&self.url)
                    .await?,
            ),
        })
    }
}

/// The harness's read access to the queue.
pub enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

/// Run one `query_as` on whichever pool (the SQL is the same on both stores).
macro_rules! fetch_all {
    ($db:expr, $row:ty, $sql:expr) => {
        match $db {
            Db::Sqlite(p) => {
                sqlx::query_as::<_, $row>(AssertSqlSafe($sql))
                    .fetch_all(p)
                    .await?
            }
            Db::Pg(p) => {
                sqlx::query_as::<_, $row>(AssertSqlSafe($sql))
                    .fetch_all(p)
                    .await?
            }
        }
    };
}

/// One job's state, as the recovery scenario watches it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobState {
    pub id: String,
    pub status: String,
    pub attempt: i32,
}

/// One checkpoint.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    pub step: String,
    pub model: String,
    pub created_at: i64,
}

impl Db {
    /// `SELECT status, count(*) FROM jobs GROUP BY status`.
    pub async fn counts(&self) -> anyhow::Result<HashMap<String, i64>> {
        let sql = "SELECT status, count(*) FROM jobs GROUP BY status".to_string();
        let rows = fetch_all!(self, (String, i64), sql);
        Ok(rows.into_iter().collect())
    }

    /// Jobs created at or after `since` (unix ms): `(created_at, started_at, finished_at)` of
    /// the succeeded ones, and how many are not succeeded (yet).
    pub async fn timings(&self, since: i64) -> anyhow::Result<(Vec<[i64; 3]>, usize)> {
        let sql = format!(
            "SELECT status, created_at, coalesce(started_at, 0), coalesce(finished_at, 0) \
             FROM jobs WHERE created_at >= {since}"
        );
        let rows = fetch_all!(self, (String, i64, i64, i64), sql);
        let others = rows.iter().filter(|r| r.0 != "succeeded").count();
        let done = rows
            .into_iter()
            .filter(|r| r.0 == "succeeded")
            .map(|r| [r.1, r.2, r.3])
            .collect();
        Ok((done, others))
    }

    /// `(id, created_at, finished_at)` of every finished job created in `[since, until)`.
    pub async fn finish_times(
        &self,
        since: i64,
        until: i64,
    ) -> anyhow::Result<Vec<(String, i64, i64)>> {
        let sql = format!(
            "SELECT CAST(id AS TEXT), created_at, finished_at FROM jobs \
             WHERE finished_at IS NOT NULL AND created_at >= {since} AND created_at < {until}"
        );
        Ok(fetch_all!(self, (String, i64, i64), sql))
    }

    /// Every job's status, attempt and lease.
    pub async fn jobs(&self) -> anyhow::Result<Vec<JobState>> {
        let sql = "SELECT CAST(id AS TEXT) AS id, status, attempt FROM jobs".to_string();
        Ok(fetch_all!(self, JobState, sql))
    }

    /// Every checkpoint.
    pub async fn steps(&self) -> anyhow::Result<Vec<StepRow>> {
        let sql = "SELECT step, model, created_at FROM steps".to_string();
        Ok(fetch_all!(self, StepRow, sql))
    }

    /// Postgres: the next transaction id (`pg_current_xact_id`, which takes one), so the
    /// difference of two readings counts the write transactions in between, cluster-wide and
    /// without the lag of `pg_stat_database`; `None` on SQLite.
    pub async fn xid(&self) -> anyhow::Result<Option<i64>> {
        self.pg_number("SELECT pg_current_xact_id()::text::bigint")
            .await
    }

    /// Postgres's WAL position in bytes (`None` on SQLite).
    pub async fn wal_bytes(&self) -> anyhow::Result<Option<i64>> {
        self.pg_number("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .await
    }

    /// One number from Postgres (`None` on SQLite).
    async fn pg_number(&self, sql: &'static str) -> anyhow::Result<Option<i64>> {
        match self {
            Db::Sqlite(_) => Ok(None),
            Db::Pg(p) => Ok(Some(sqlx::query_scalar(sql).fetch_one(p).await?)),
        }
    }

    pub async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Pg(p) => p.close().await,
        }
    }
}

/// Poll `counts` until `done(counts)` holds, at most `limit`; the last counts either way.
pub async fn wait_counts(
    db: &Db,
    limit: Duration,
    every: Duration,
    done: impl Fn(&HashMap<String, i64>) -> bool,
) -> anyhow::Result<(bool, HashMap<String, i64>)> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let counts = db.counts().await?;
        if done(&counts) {
            return Ok((true, counts));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((false, counts));
        }
        tokio::time::sleep(every).await;
    }
}

/// A status's count (0 when absent).
pub fn count(counts: &HashMap<String, i64>, status: &str) -> i64 {
    counts.get(status).copied().unwrap_or(0)
}

/// Jobs in a final state.
pub fn finished(counts: &HashMap<String, i64>) -> i64 {
    count(counts, "succeeded") + count(counts, "failed") + count(counts, "cancelled")
}
