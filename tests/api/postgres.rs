//! Postgres with real processes: three `fusion worker`s share one queue through a SIGKILL, a
//! cancel reaches a worker in another process within a second (and one whose NOTIFY was missed
//! once the worker listens again), and a Postgres stop/start mid-run
//! loses no job; the plan of the batch's lease fences; and a host whose clock is off. The outage
//! test takes `PG_SERVER` exclusively; the others share it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fusion::clock::{Clock, SharedClock, Shifted, SystemClock};
use fusion::job::JobStatus;
use fusion::testing::ScratchDatabase;
use serde_json::json;

use crate::checkpoints::{Checked, check_no_step_repeated, record_step_writes};
use crate::fake_upstream::{FakeUpstream, Kind, Reply};
use crate::helpers::{Options, body_with_panel, spawn_app_with, try_spawn_app_with};
use crate::pipeline_faults::call_of;
use crate::restart::{Server, failed_start, free_port, submit_unique_jobs, wait_succeeded};
use crate::store_faults::{Faults, Faulty};

#[tokio::test]
async fn three_workers_share_the_queue_through_a_worker_crash() {
    const JOBS: usize = 200;
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_workers").await else {
        return;
    };
    let url = db.url.clone();
    record_step_writes(&url).await;
    let fake = FakeUpstream::start().await;
    fake.set_default(Reply::Delay(150, Box::new(Reply::Ok)));
    let upstream = fake.base_url();
    // The API process runs no jobs of its own.
    let port = free_port();
    let api = Server::spawn(
        "serve",
        &url,
        &upstream,
        port,
        &[("FUSION_CONCURRENCY", "0")],
    )
    .await;
    let env = [("FUSION_CONCURRENCY", "16")];
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Server::spawn("worker", &url, &upstream, 0, &env).await);
    }
    let client = reqwest::Client::new();
    let ids = submit_unique_jobs(&client, &api, "w", JOBS).await;
    // Kill the first worker while it holds running jobs (its lease owner is `host:pid:uuid`).
    let victim = format!("%:{}:%", workers[0].pid());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status = 'running' AND lease_owner LIKE $1",
        )
        .bind(&victim)
        .fetch_one(&pool)
        .await
        .unwrap();
        if held > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first worker never ran a job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pool.close().await;
    workers.remove(0).kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers.push(Server::spawn("worker", &url, &upstream, 0, &env).await);

    for id in &ids {
        wait_succeeded(&client, &api, id, 90).await;
    }
    let Checked { resumed, repeated } = check_no_step_repeated(&url, &ids, &fake).await;
    eprintln!(
        "{JOBS} jobs on 3 workers, one killed: {resumed} jobs resumed on another worker, \
         {repeated} in-flight calls repeated"
    );
    assert!(
        resumed > 0,
        "the kill hit no running job: the test proved nothing"
    );
    for w in workers {
        w.kill().await;
    }
    api.kill().await;
    drop(db);
}

#[tokio::test]
async fn a_cancel_reaches_a_worker_in_another_process_by_its_notify() {
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_workers").await else {
        return;
    };
    // Within 4 s: well before the 5 s poll or the 20 s heartbeat could have told it, with
    // room for a loaded machine.
    a_cancel_in_serve_stops_the_worker(&db.url, Duration::from_secs(4)).await;
    drop(db);
}

// A cancel whose NOTIFY the worker's listener missed (the LISTEN connection was down when it
// was sent) reaches the worker as soon as it listens again: it re-checks its leases at once
// instead of at its next heartbeat (a third of the lease: 20 s here). The missed NOTIFY is
// made certain by cancelling with the session's triggers off (`session_replication_role`),
// then cutting the listeners' connections.
#[tokio::test]
async fn a_cancel_the_listener_missed_reaches_the_worker_once_it_listens_again() {
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_workers").await else {
        return;
    };
    let url = db.url.clone();
    let fake = FakeUpstream::start().await;
    fake.script("hangs", Kind::Panel, vec![Reply::Hang]);
    let upstream = fake.base_url();
    let env = [("FUSION_LEASE_SECONDS", "60"), ("FUSION_POLL_MS", "5000")];
    let worker = Server::spawn("serve", &url, &upstream, free_port(), &env).await;
    let client = reqwest::Client::new();
    let id = hanging_job_called(&client, &worker, &fake).await;

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica; \
         UPDATE jobs SET status = 'cancelled', finished_at = 1, lease_owner = NULL, \
                         lease_expires_at = NULL \
         WHERE id = '{id}' AND status = 'running'; \
         SET session_replication_role = origin"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(!cut.is_empty(), "no LISTEN connection to cut");
    let missed = "the worker kept calling upstream for a job cancelled while it did not listen";
    wait_aborted(&fake, Duration::from_secs(5), missed).await;
    worker.kill().await;
    drop(db);
}

/// `serve` with no workers and a `worker`, two processes on the database at `url`, with a long
/// lease and poll (60 s, 5 s): a cancel made in `serve` must stop the job running in the worker
/// (its hanging call dropped) `within`.
pub(crate) async fn a_cancel_in_serve_stops_the_worker(url: &str, within: Duration) {
    let fake = FakeUpstream::start().await;
    fake.script("hangs", Kind::Panel, vec![Reply::Hang]);
    let upstream = fake.base_url();
    let api_env = [("FUSION_CONCURRENCY", "0")];
    let api = Server::spawn("serve", url, &upstream, free_port(), &api_env).await;
    let env = [("FUSION_LEASE_SECONDS", "60"), ("FUSION_POLL_MS", "5000")];
    let worker = Server::spawn("worker", url, &upstream, 0, &env).await;
    let client = reqwest::Client::new();
    let id = hanging_job_called(&client, &api, &fake).await;
    let resp = client
        .post(format!("{}/v1/jobs/{id}/cancel", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_aborted(&fake, within, "the worker kept calling upstream").await;
    worker.kill().await;
    api.kill().await;
}

/// Submit a job to `server` whose one panel model (`hangs`) never answers, and wait until the
/// fake has its call; the job's id.
async fn hanging_job_called(
    client: &reqwest::Client,
    server: &Server,
    fake: &FakeUpstream,
) -> String {
    let resp = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&crate::helpers::body_with_panel(&["hangs"], "judge"))
        .send()
        .await
        .unwrap();
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    while fake.calls("hangs", Kind::Panel) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the worker never picked the job up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    id
}

/// Wait until the hanging call is dropped by its worker, failing with `why` after `within`.
async fn wait_aborted(fake: &FakeUpstream, within: Duration, why: &str) {
    let since = std::time::Instant::now();
    while fake.aborted("hangs", Kind::Panel) == 0 {
        assert!(since.elapsed() < within, "{why}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Postgres tests in this binary share the server with the outage test, which stops it.
pub static PG_SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Starts the Postgres cluster again when dropped, whatever happened in between.
struct RestartOnDrop(String);

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = pg_ctlcluster(&self.0, "start");
    }
}

fn pg_ctlcluster(version: &str, action: &str) -> std::process::ExitStatus {
    std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .expect("run pg_ctlcluster")
}

/// The local cluster's version, when this process may stop and start it.
fn local_cluster() -> Option<String> {
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .flatten()
        .next()?;
    is_root.then(|| version.file_name().to_string_lossy().into_owned())
}

#[tokio::test]
async fn a_postgres_outage_mid_run_loses_no_job() {
    const JOBS: usize = 60;
    let _exclusive = PG_SERVER.write().await;
    let Some(db) = ScratchDatabase::from_env("fusion_workers").await else {
        return;
    };
    let url = db.url.clone();
    let Some(version) = local_cluster() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to restart Postgres"
        );
        eprintln!("skipped: cannot stop and start the local Postgres cluster here");
        return;
    };
    record_step_writes(&url).await;
    let fake = FakeUpstream::start().await;
    fake.set_default(Reply::Delay(200, Box::new(Reply::Ok)));
    let env = [("FUSION_LEASE_SECONDS", "10"), ("FUSION_CONCURRENCY", "16")];
    let server = Server::spawn("serve", &url, &fake.base_url(), free_port(), &env).await;
    let client = reqwest::Client::new();
    let ids = submit_unique_jobs(&client, &server, "o", JOBS).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let called = fake.total_calls();
    let guard = RestartOnDrop(version.clone());
    assert!(pg_ctlcluster(&version, "stop").success());
    let ready = |c: reqwest::Client, a: String| async move {
        c.get(format!("{a}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let stopped_at = std::time::Instant::now();
    while ready(client.clone(), server.address.clone()).await != 503 {
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "/readyz never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pg_ctlcluster(&version, "start").success());
    drop(guard);

    for id in &ids {
        wait_succeeded(&client, &server, id, 90).await;
    }
    assert_eq!(ready(client.clone(), server.address.clone()).await, 200);
    assert!(
        fake.total_calls() > called,
        "every call was made before the outage ({called}): the test would prove nothing"
    );
    let Checked { resumed, repeated } = check_no_step_repeated(&url, &ids, &fake).await;
    eprintln!(
        "Postgres stopped for ~2 s mid-run: {resumed} jobs resumed, {repeated} calls repeated"
    );
    server.kill().await;
    drop(db);
}

/// A host whose clock is 20 s behind the database's still writes leases that hold for their
/// whole length by the database's clock, so by every other host's: another host's rescuer,
/// with a clock that is right, does not take its running job away (which would pay for the
/// job's calls twice), and its timestamps are the database's time. Without the alignment its
/// 5 s leases were written already 15 s expired.
#[tokio::test]
async fn a_host_whose_clock_is_behind_keeps_its_leases() {
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_skew").await else {
        return;
    };
    let behind: SharedClock = Arc::new(Shifted::new(Arc::new(SystemClock), -20_000));
    let app = spawn_app_with(Options {
        database_url: Some(db.url.clone()),
        host_clock: Some(behind),
        ..Options::default()
    })
    .await;
    // Longer than the 5 s lease: the heartbeat must renew it on the way.
    app.fake
        .set_default(Reply::Delay(2_500, Box::new(Reply::Ok)));
    let id = app.submit_ok(&body_with_panel(&["a", "b", "c"], "x")).await;
    let uuid: uuid::Uuid = id.parse().unwrap();
    let right = SystemClock;
    let started = std::time::Instant::now();
    let mut looked = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let job = app.store.get_job(uuid).await.unwrap().unwrap();
        if job.status == JobStatus::Running {
            looked += 1;
            let now = right.now_ms();
            let held = job.lease_expires_at.unwrap() - now;
            // Renewed every third of the lease: two thirds of it are left when a renewal is
            // due, less however late it is (a loaded machine's may be seconds late). An
            // unaligned host's were 15 s expired.
            assert!(held > 500, "the lease holds {held} ms more");
            assert_eq!(app.store.rescue_expired(now).await.unwrap(), 0);
            assert!(
                (job.created_at - now).abs() < 10_000,
                "{}",
                job.created_at - now
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(looked >= 10, "the job ran for {looked} looks");
    let done = app.wait_final(&id, 30).await;
    assert_eq!(
        (&done["status"], &done["attempt"]),
        (&json!("succeeded"), &json!(1))
    );
    assert_eq!(app.fake.total_calls(), 5);
}

/// The database's clock cannot be read as the process starts: it tries again, and fails the
/// start if it never can, rather than run its jobs on the host's own clock.
#[tokio::test]
async fn a_process_that_cannot_read_the_database_clock_does_not_start_on_its_own() {
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_no_clock").await else {
        return;
    };
    let failing = |reads: usize| Options {
        database_url: Some(db.url.clone()),
        host_clock: Some(Arc::new(Shifted::new(Arc::new(SystemClock), -20_000))),
        wrap_store: Some(Box::new(move |inner| {
            let faulty = Faulty::over(inner, Faults::default(), Duration::ZERO);
            faulty.clock_reads_fail.store(reads, Ordering::SeqCst);
            Arc::new(faulty)
        })),
        ..Options::default()
    };
    // Two failed reads: the start goes on once the third answers, on the database's time.
    let app = try_spawn_app_with(failing(2)).await.unwrap();
    let id = app.submit_ok(&body_with_panel(&["a"], "x")).await;
    let job = app
        .store
        .get_job(id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let off = job.created_at - SystemClock.now_ms();
    assert!(
        off.abs() < 10_000,
        "created {off} ms off the database's time"
    );
    // Never: the start fails, naming why.
    let Err(e) = try_spawn_app_with(failing(usize::MAX)).await else {
        panic!("the process started on its own clock");
    };
    assert!(format!("{e:#}").contains("database's clock"), "{e:#}");
}

// A database that does not exist (a refused password likewise) is not waited for: the start
// stops at once with Postgres's own reason. Before, the pool tried again quietly, the start
// retried for half a minute, and it ended with "pool timed out", the reason never shown.
#[tokio::test]
async fn a_database_that_does_not_exist_stops_the_start_at_once_saying_so() {
    let _shared = PG_SERVER.read().await;
    let Some(db) = ScratchDatabase::from_env("fusion_exists").await else {
        return;
    };
    let missing = format!("{}_missing", db.url);
    let stderr = failed_start("migrate", &[("DATABASE_URL", missing)]).await;
    assert!(stderr.contains("does not exist"), "{stderr}");
}

/// A schema's properties reach the final call in the order the client wrote them, on either
/// store (a provider in strict mode writes them in that order: `reasoning` before `answer`).
/// Before, bodies were read into sorted maps, and Postgres's JSONB sorts keys its own way.
#[tokio::test]
async fn a_schemas_property_order_reaches_the_final_call() {
    let _shared = PG_SERVER.read().await;
    let db = ScratchDatabase::from_env("fusion_order").await;
    let schema = json!({"type": "object", "required": ["reasoning", "answer"],
                        "properties": {"reasoning": {"type": "string"},
                                       "answer": {"type": "string"}}});
    let mut body = body_with_panel(&["m1"], "judge");
    body["response_format"] = json!({"type": "json_schema",
                                     "json_schema": {"name": "reasoned", "schema": schema}});
    let mut stores = vec![("sqlite", None)];
    stores.extend(db.as_ref().map(|db| ("postgres", Some(db.url.clone()))));
    for (store, database_url) in stores {
        let app = spawn_app_with(Options {
            database_url,
            ..Options::default()
        })
        .await;
        let id = app.submit_ok(&body).await;
        let job = app.wait_final(&id, 10).await;
        assert_eq!(job["status"], "succeeded", "{store}: {job:#}");
        let (_, last) = call_of(&app.fake.bodies(), "judge", "final");
        let sent = &last["response_format"]["json_schema"]["schema"];
        let keys: Vec<&String> = sent["properties"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["reasoning", "answer"], "{store}: {last}");
        assert_eq!(sent, &schema, "{store}");
    }
}
