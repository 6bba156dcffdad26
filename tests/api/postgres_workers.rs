//! Scale-out on Postgres: three `fusion worker` processes and a `fusion serve` share one queue
//! while one worker is SIGKILLed and restarted; every job completes exactly once.

use std::time::Duration;

use crate::fake_upstream::{FakeUpstream, Reply};
use crate::restart::{
    Checked, Server, check_no_step_repeated, free_port, submit_unique_jobs, wait_succeeded,
};

/// A fresh database on the server named by `TEST_DATABASE_URL`, or `None` (with a note) when
/// it is not set outside CI.
async fn fresh_database() -> Option<String> {
    use sqlx::Connection;
    let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set TEST_DATABASE_URL"
        );
        eprintln!("skipped: TEST_DATABASE_URL not set");
        return None;
    };
    let name = format!("fusion_workers_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect TEST_DATABASE_URL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, query) = admin
        .split_once('?')
        .map_or((admin.as_str(), ""), |(b, q)| (b, q));
    let base = &base[..base.rfind('/').unwrap()];
    Some(if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    })
}

#[tokio::test]
async fn three_workers_share_the_queue_through_a_worker_crash() {
    const JOBS: usize = 200;
    let Some(url) = fresh_database().await else {
        return;
    };
    let fake = FakeUpstream::start().await;
    fake.set_default(Reply::Delay(150, Box::new(Reply::Ok)));
    let upstream = fake.base_url();
    // The API process runs no jobs of its own: concurrency 1 and a long poll keep it mostly idle.
    let port = free_port();
    let api = Server::spawn(
        "serve",
        &url,
        &upstream,
        port,
        &[("FUSION_CONCURRENCY", "1")],
    )
    .await;
    let env = [("FUSION_CONCURRENCY", "16")];
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Server::spawn("worker", &url, &upstream, 0, &env).await);
    }
    let client = reqwest::Client::new();
    let ids = submit_unique_jobs(&client, &api, "w", JOBS).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    workers.remove(0).kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers.push(Server::spawn("worker", &url, &upstream, 0, &env).await);

    for id in &ids {
        wait_succeeded(&client, &api, id, 90).await;
    }
    let store = fusion::store::connect(&url).await.unwrap();
    let Checked { resumed, repeated } = check_no_step_repeated(store.as_ref(), &ids, &fake).await;
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
    drop_database(&url).await;
}

/// Best effort: a failed drop leaves a database behind, not a failed test.
async fn drop_database(url: &str) {
    use sqlx::Connection;
    let admin = std::env::var("TEST_DATABASE_URL").unwrap();
    let name = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await;
    }
}
