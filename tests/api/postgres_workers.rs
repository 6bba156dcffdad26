//! Scale-out on Postgres: three `fusion worker` processes and a `fusion serve` share one queue
//! while one worker is SIGKILLed and restarted; every job completes exactly once.

use std::time::Duration;

use serde_json::Value;

use crate::fake_upstream::{FakeUpstream, Kind, Reply};
use crate::helpers::body_with_panel;
use crate::restart::{Server, free_port, get_job};

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
    let mut ids = Vec::new();
    for n in 0..JOBS {
        let panel = [format!("w{n}-a"), format!("w{n}-b"), format!("w{n}-c")];
        let panel: Vec<&str> = panel.iter().map(String::as_str).collect();
        let resp = client
            .post(format!("{}/v1/jobs", api.address))
            .json(&body_with_panel(&panel, &format!("w{n}-judge")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    workers.remove(0).kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers.push(Server::spawn("worker", &url, &upstream, 0, &env).await);

    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for id in &ids {
        loop {
            let job = get_job(&client, &api, id).await;
            if job["status"] == "succeeded" {
                break;
            }
            assert_ne!(job["status"], "failed", "{job:#}");
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} not done: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let store = fusion::store::connect(&url).await.unwrap();
    let mut repeated = 0;
    let mut resumed = 0;
    for (n, id) in ids.iter().enumerate() {
        let job = store.get_job(id.parse().unwrap()).await.unwrap().unwrap();
        resumed += usize::from(job.attempt > 1);
        let steps = store.get_steps(id.parse().unwrap()).await.unwrap();
        assert_eq!(steps.len(), 5, "job {n}");
        for step in steps {
            let kind = match step.key {
                fusion::job::StepKey::Panel(_) => Kind::Panel,
                fusion::job::StepKey::Analysis => Kind::Analysis,
                fusion::job::StepKey::Final => Kind::Final,
            };
            let starts = fake.starts(&step.model, kind);
            assert!(
                starts.iter().all(|s| *s <= step.created_at),
                "job {n} {:?} repeated after its checkpoint",
                step.key
            );
            repeated += starts.len() - 1;
        }
    }
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
