//! The crash tests' check that no checkpointed step is called again: the database keeps every
//! write of a step (a later attempt's write replaces the row in `steps`, its `created_at` with
//! it, so `steps` alone cannot show a step paid for twice), and every upstream call to a step
//! must have begun before its first checkpoint.

use std::collections::HashMap;

use sqlx::{Connection, PgConnection, Row, SqliteConnection};

use crate::fake_upstream::{FakeUpstream, Kind};

/// Every insert and update of `steps`, by triggers `record_step_writes` adds.
const SQLITE_RECORDER: &str = "
CREATE TABLE step_writes (job_id TEXT, step TEXT, ok INTEGER, attempt INTEGER, created_at INTEGER);
CREATE TRIGGER step_inserted AFTER INSERT ON steps BEGIN
    INSERT INTO step_writes VALUES (NEW.job_id, NEW.step, NEW.ok, NEW.attempt, NEW.created_at);
END;
CREATE TRIGGER step_updated AFTER UPDATE ON steps BEGIN
    INSERT INTO step_writes VALUES (NEW.job_id, NEW.step, NEW.ok, NEW.attempt, NEW.created_at);
END;";

const POSTGRES_RECORDER: &str = "
CREATE TABLE step_writes (job_id uuid, step text, ok boolean, attempt integer, created_at bigint);
CREATE FUNCTION record_step_write() RETURNS trigger AS $$
BEGIN
    INSERT INTO step_writes VALUES (NEW.job_id, NEW.step, NEW.ok, NEW.attempt, NEW.created_at);
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER step_written AFTER INSERT OR UPDATE ON steps
    FOR EACH ROW EXECUTE FUNCTION record_step_write();";

/// Migrates the database at `url` (a `sqlite://` or `postgres://` URL) and makes it keep every
/// write of a step. Run it before any server starts on the database.
pub async fn record_step_writes(url: &str) {
    let store = fusion::store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    drop(store);
    if url.starts_with("postgres") {
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(POSTGRES_RECORDER)
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(SQLITE_RECORDER)
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// One recorded write of a step: (job id, step, ok, created_at).
type StepWrite = (String, String, bool, i64);

async fn step_writes(url: &str) -> Vec<StepWrite> {
    const SQL: &str = "SELECT job_id, step, ok, created_at FROM step_writes ORDER BY created_at";
    if url.starts_with("postgres") {
        let mut conn = PgConnection::connect(url).await.unwrap();
        let rows = sqlx::query(SQL).fetch_all(&mut conn).await.unwrap();
        rows.iter()
            .map(|r| {
                let id: uuid::Uuid = r.get(0);
                (id.to_string(), r.get(1), r.get(2), r.get(3))
            })
            .collect()
    } else {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        let rows = sqlx::query(SQL).fetch_all(&mut conn).await.unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }
}

/// What `check_no_step_repeated` counted.
pub struct Checked {
    /// Jobs claimed more than once (resumed after a crash).
    pub resumed: usize,
    /// Upstream calls made again because they were in flight at a crash.
    pub repeated: usize,
}

/// Every job has its five steps, all ok and each written ok once, and every call to a step began
/// before that write: calls in flight at a crash may repeat, a checkpointed step never does.
/// The database at `url` was set up by `record_step_writes`; every job names its own models.
pub async fn check_no_step_repeated(url: &str, ids: &[String], fake: &FakeUpstream) -> Checked {
    let store = fusion::store::connect(url).await.unwrap();
    let mut first_ok: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for (job, step, ok, created_at) in step_writes(url).await {
        if ok {
            first_ok.entry((job, step)).or_default().push(created_at);
        }
    }
    let mut checked = Checked {
        resumed: 0,
        repeated: 0,
    };
    for (n, id) in ids.iter().enumerate() {
        let job = store.get_job(id.parse().unwrap()).await.unwrap().unwrap();
        checked.resumed += usize::from(job.attempt > 1);
        let steps = store.get_steps(job.id).await.unwrap();
        assert_eq!(steps.len(), 5, "job {n}");
        for step in steps {
            assert!(
                step.ok,
                "job {n} step {:?} failed: {:?}",
                step.key, step.error
            );
            let writes = &first_ok[&(id.clone(), step.key.to_db())];
            assert_eq!(
                writes.len(),
                1,
                "job {n} {:?} was checkpointed {} times, at {writes:?}",
                step.key,
                writes.len()
            );
            let kind = match step.key {
                fusion::job::StepKey::Panel(_) => Kind::Panel,
                fusion::job::StepKey::Analysis => Kind::Analysis,
                fusion::job::StepKey::Final => Kind::Final,
            };
            let starts = fake.starts(&step.model, kind);
            assert!(!starts.is_empty());
            for s in &starts {
                assert!(
                    *s <= writes[0],
                    "job {n} {:?} was called at {s} after its checkpoint at {}",
                    step.key,
                    writes[0]
                );
            }
            checked.repeated += starts.len() - 1;
        }
    }
    checked
}
