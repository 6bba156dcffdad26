//! Group commit for SQLite's hot path: checkpoint and outcome writes from many jobs queue here
//! and one task runs whatever has queued up in one transaction — one commit (one WAL flush) for
//! the lot instead of one each. Each caller still gets its own result, and only after the
//! transaction committed. (Postgres goes further, one statement per batch: `pg_writes.rs`.)

use sqlx::{Database, Executor, IntoArguments, Pool, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{Result, StoreError};

/// A statement with its arguments bound (owned), ready to run on any connection.
pub(super) type Statement<DB> = sqlx::query::Query<'static, DB, <DB as Database>::Arguments>;

/// The most statements one transaction takes; more wait for the next.
const MAX_BATCH: usize = 256;

/// Builds the statement; called again when the statement must be re-run on its own.
pub(super) type MakeStatement<DB> = Box<dyn Fn() -> Statement<DB> + Send + Sync>;

struct Write<DB: Database> {
    statement: MakeStatement<DB>,
    reply: oneshot::Sender<Result<u64>>,
}

pub(super) struct GroupCommit<DB: Database> {
    queue: mpsc::Sender<Write<DB>>,
}

impl<DB> GroupCommit<DB>
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    <DB as Database>::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Start `tasks` committers sharing one queue.
    pub(super) fn start(pool: Pool<DB>, tasks: usize) -> GroupCommit<DB> {
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..tasks.max(1) {
            tokio::spawn(run(pool.clone(), rx.clone()));
        }
        GroupCommit { queue }
    }

    /// Run `statement` in the next group; its rows affected once committed.
    pub(super) async fn execute(
        &self,
        statement: impl Fn() -> Statement<DB> + Send + Sync + 'static,
    ) -> Result<u64> {
        let statement: MakeStatement<DB> = Box::new(statement);
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Write { statement, reply })
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
    }
}

async fn run<DB>(pool: Pool<DB>, rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Write<DB>>>>)
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    <DB as Database>::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Whoever holds the receiver gathers the next batch; the others are committing theirs.
    while rx.lock().await.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (statements, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|w| (w.statement, w.reply)).unzip();
        match commit(&pool, statements).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Database(sqlx::Error::Protocol(format!(
                        "group commit failed: {message}"
                    )))));
                }
            }
        }
    }
}

/// Rows affected, across databases.
pub(super) trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

/// Run the statements in one transaction. If any fails, the transaction is rolled back (on
/// Postgres an error aborts the whole transaction, so nothing of it may be trusted) and each
/// statement runs again on its own, so one bad write never fails its neighbours. A failing
/// commit fails them all.
async fn commit<DB>(
    pool: &Pool<DB>,
    statements: Vec<MakeStatement<DB>>,
) -> Result<Vec<Result<u64>>, sqlx::Error>
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    <DB as Database>::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    if statements.len() > 1 {
        let mut tx: Transaction<'static, DB> = pool.begin().await?;
        let mut results = Vec::with_capacity(statements.len());
        let mut failed = false;
        for statement in &statements {
            match statement().execute(&mut *tx).await {
                Ok(done) => results.push(Ok(done.rows())),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            tx.commit().await?;
            return Ok(results);
        }
        tx.rollback().await?;
    }
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        results.push(
            statement()
                .execute(pool)
                .await
                .map(|d| d.rows())
                .map_err(Into::into),
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool() -> sqlx::SqlitePool {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY CHECK (k > 0))")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    fn insert(k: i64) -> impl Fn() -> Statement<sqlx::Sqlite> + Send + Sync + 'static {
        move || sqlx::query("INSERT INTO t (k) VALUES (?)").bind(k)
    }

    // One current-thread runtime: all three writes are queued before the committer runs, so
    // they land in one batch.
    #[tokio::test]
    async fn one_bad_write_in_a_batch_fails_alone() {
        let pool = pool().await;
        let group = GroupCommit::start(pool.clone(), 1);
        let (a, bad, c) = tokio::join!(
            group.execute(insert(1)),
            group.execute(insert(-1)),
            group.execute(insert(2))
        );
        assert_eq!(a.unwrap(), 1);
        assert!(bad.is_err());
        assert_eq!(c.unwrap(), 1);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn a_batch_commits_together() {
        let pool = pool().await;
        let group = GroupCommit::start(pool.clone(), 2);
        let writes = (1..=50).map(|k| group.execute(insert(k)));
        let results = futures::future::join_all(writes).await;
        assert!(results.into_iter().all(|r| r.unwrap() == 1));
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 50);
    }
}
