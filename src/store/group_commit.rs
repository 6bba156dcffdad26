//! Group commit for SQLite's hot path. SQLite takes one writer at a time, so checkpoint writes
//! from many jobs queue here and a single task runs whatever has queued up in one transaction:
//! one connection hand-off and one commit for the lot instead of one each. Each caller still gets
//! its own result, and only after the transaction committed.

use sqlx::sqlite::{Sqlite, SqliteArguments, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{Result, StoreError};

/// A statement with its arguments bound (owned), ready to run on any connection.
pub(super) type Statement = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

/// The most statements one transaction takes; more wait for the next.
const MAX_BATCH: usize = 256;

struct Write {
    statement: Statement,
    reply: oneshot::Sender<Result<u64>>,
}

pub(super) struct GroupCommit {
    queue: mpsc::Sender<Write>,
}

impl GroupCommit {
    pub(super) fn start(pool: SqlitePool) -> GroupCommit {
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(pool, rx));
        GroupCommit { queue }
    }

    /// Run `statement` in the next group; its rows affected once committed.
    pub(super) async fn execute(&self, statement: Statement) -> Result<u64> {
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

async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
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

/// Run the statements in one transaction. A failing statement fails only its own caller (SQLite
/// rolls back just that statement); a failing commit fails them all.
async fn commit(
    pool: &SqlitePool,
    statements: Vec<Statement>,
) -> Result<Vec<Result<u64>>, sqlx::Error> {
    if statements.len() == 1 {
        let statement = statements.into_iter().next().expect("one statement");
        return Ok(vec![
            statement
                .execute(pool)
                .await
                .map(|d| d.rows_affected())
                .map_err(Into::into),
        ]);
    }
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        results.push(
            statement
                .execute(&mut *tx)
                .await
                .map(|d| d.rows_affected())
                .map_err(Into::into),
        );
    }
    tx.commit().await?;
    Ok(results)
}
