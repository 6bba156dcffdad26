//! Test support shared by the crate's unit tests, the integration tests and the benchmark
//! harness: a Postgres database of one's own on the server `TEST_DATABASE_URL` names, dropped
//! afterwards, and the log lines written while a test runs. Not part of fusion's API.

use std::sync::{Arc, Mutex};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Log lines written on this thread (a `#[tokio::test]` runs every task on it) while the guard
/// `capture_logs` returns lives.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Collect this thread's log lines (INFO and up, no colours) while the guard lives.
pub fn capture_logs() -> (Lines, tracing::subscriber::DefaultGuard) {
    let lines = Lines::default();
    let writer = lines.clone();
    let guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    (lines, guard)
}

/// A database made for one test or scenario, dropped (best effort, `WITH (FORCE)`, so that a
/// killed server's sessions do not keep it) when this is dropped, a panic included.
pub struct ScratchDatabase {
    /// The new database's URL: the admin URL with its database replaced.
    pub url: String,
    admin_url: String,
    name: String,
}

impl ScratchDatabase {
    /// Create `{prefix}_{uuid}` on the server `admin_url` names.
    pub async fn create(admin_url: &str, prefix: &str) -> Result<ScratchDatabase, sqlx::Error> {
        let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        Ok(ScratchDatabase {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_owned(),
            name,
        })
    }

    /// A database on the `TEST_DATABASE_URL` server, or `None` with a note on stderr when that
    /// is not set. On CI (`CI` set) it must be: the Postgres tests are not to be skipped there.
    ///
    /// # Panics
    /// On CI without `TEST_DATABASE_URL`, and when the database cannot be created.
    pub async fn from_env(prefix: &str) -> Option<ScratchDatabase> {
        let admin = match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "TEST_DATABASE_URL is not set but CI is: the Postgres tests must run on CI \
                     (e.g. TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test)"
                );
                eprintln!("skipped: TEST_DATABASE_URL not set");
                return None;
            }
        };
        match ScratchDatabase::create(&admin, prefix).await {
            Ok(db) => Some(db),
            Err(e) => panic!("could not create a test database through TEST_DATABASE_URL: {e}"),
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Async work in a sync drop, maybe inside a runtime: a thread with a runtime of its own.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
            .map_err(|e| e.to_string())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("warning: could not drop test database {}", self.name),
        }
    }
}

/// `url` with its database (the last path segment) replaced by `name`; any query string is kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let mut out = match base[authority_start..].rfind('/') {
        Some(slash) => format!("{}{name}", &base[..=authority_start + slash]),
        None => format!("{base}/{name}"),
    };
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// How many statements on `conn`'s database wait on a lock now (read afresh: within a
/// transaction, Postgres's activity view is otherwise a snapshot taken once).
pub async fn lock_waiters(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .expect("clear the activity snapshot");
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(conn)
    .await
    .expect("count lock waiters")
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable&a=b/c", "x"),
            "postgres://u:p@h/x?sslmode=disable&a=b/c"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
        assert_eq!(with_database("postgres://h/", "x"), "postgres://h/x");
    }
}
