//! Submit → poll → succeeded, idempotency, listing and cancellation.

use std::time::Duration;

use fusion::clock::{Shifted, SystemClock};
use serde_json::{Value, json};

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{
    Options, body_with_panel, spawn_api_only, spawn_app, spawn_app_with, until_within,
};

#[tokio::test]
async fn a_job_runs_panel_analysis_and_final_once_each() {
    let app = spawn_app().await;
    let body = body_with_panel(&["m1", "m2", "m1"], "judge");
    let resp = app.submit(&body).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let job: Value = resp.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/jobs/{}", job["id"].as_str().unwrap())
    );
    // Queued, or already running when the worker had claimed once and has a free slot (see
    // `a_job_starts_at_its_submit_while_a_slot_is_free`).
    assert!(
        matches!(job["status"].as_str(), Some("queued" | "running")),
        "{job:#}"
    );

    let id = job["id"].as_str().unwrap().to_string();
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let steps = app.store.get_steps(id.parse().unwrap()).await.unwrap();
    assert_eq!(
        steps.len(),
        5,
        "three panel checkpoints, the analysis and the final"
    );
    assert!(steps.iter().all(|s| s.ok && s.attempt == 1));
    // A panel may repeat a model: m1 is asked twice, m2 once; the analyst twice (two steps).
    assert_eq!(app.fake.calls("m1", Kind::Panel), 2);
    assert_eq!(app.fake.calls("m2", Kind::Panel), 1);
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 1);
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);
    assert_eq!(app.fake.total_calls(), 5);

    let panel = job["panel"].as_array().unwrap();
    assert_eq!(panel.len(), 3);
    for (i, (p, model)) in panel.iter().zip(["m1", "m2", "m1"]).enumerate() {
        assert_eq!(p["index"], i);
        assert_eq!(p["model"], model);
        assert_eq!(p["status"], "succeeded");
        assert_eq!(p["content"], format!("panel answer from {model}"));
        assert_eq!(p["usage"]["total_tokens"], 15);
        assert!(p["latency_ms"].as_i64().unwrap() >= 0);
    }
    assert_eq!(job["analysis"]["consensus"], json!(["the sky is blue"]));
    assert_eq!(job["analysis_error"], Value::Null);
    let result = &job["result"];
    assert_eq!(result["object"], "chat.completion");
    assert_eq!(result["model"], "fusion");
    assert_eq!(
        result["choices"][0]["message"]["content"],
        "the fused final answer"
    );
    assert_eq!(result["choices"][0]["finish_reason"], "stop");
    // Five calls of 10 + 5 tokens and $0.001 each.
    for usage in [&job["usage"], &result["usage"]] {
        assert_eq!(usage["prompt_tokens"], 50);
        assert_eq!(usage["completion_tokens"], 25);
        assert_eq!(usage["total_tokens"], 75);
        assert!((usage["cost"].as_f64().unwrap() - 0.005).abs() < 1e-9);
    }
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["max_attempts"], 10, "the default [jobs] max_attempts");
    assert!(job["started_at"].is_i64() && job["finished_at"].is_i64());
    // Only a queued job has a time it is not claimed before; no deadline was asked for.
    assert_eq!(
        (&job["scheduled_at"], &job["deadline_at"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(job["failure_reason"], Value::Null);
}

#[tokio::test]
async fn the_analyst_sees_every_answer_and_the_final_sees_the_analysis() {
    let app = spawn_app().await;
    let id = app
        .submit_ok(&body_with_panel(&["m1", "m2"], "judge"))
        .await;
    app.wait_final(&id, 10).await;
    let bodies = app.fake.bodies();
    let analysis = bodies
        .iter()
        .find(|b| b.get("response_format").is_some())
        .unwrap();
    assert_eq!(analysis["response_format"]["type"], "json_schema");
    assert_eq!(analysis["temperature"], 0.0);
    let prompt = analysis["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("panel answer from m1") && prompt.contains("panel answer from m2"));
    assert!(prompt.contains("Why is the sky blue?"));
    let last = bodies.last().unwrap();
    let system = last["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("Rayleigh"),
        "final prompt lacks the analysis: {system}"
    );
    assert_eq!(last["messages"][1]["content"], "Why is the sky blue?");
}

#[tokio::test]
async fn presets_resolve_from_the_config() {
    let app = spawn_app_with(Options {
        toml: "[presets.tiny]\npanel = [\"p1\", \"p2\"]\nanalyst = \"a1\"\n".into(),
        ..Options::default()
    })
    .await;
    let id = app
        .submit_ok(
            &json!({"model": "fusion/tiny", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["result"]["model"], "fusion/tiny");
    assert_eq!(app.fake.calls("p1", Kind::Panel), 1);
    assert_eq!(app.fake.calls("p2", Kind::Panel), 1);
    assert_eq!(app.fake.calls("a1", Kind::Final), 1);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_job() {
    let app = spawn_api_only().await;
    let body = body_with_panel(&["m1"], "judge");
    let post = |b: &Value, key: &str| {
        app.client
            .post(format!("{}/v1/jobs", app.address))
            .header("Idempotency-Key", key)
            .json(b)
            .send()
    };
    let first: Value = post(&body, "k1").await.unwrap().json().await.unwrap();
    let again = post(&body, "k1").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let other = post(&body_with_panel(&["m2"], "judge"), "k1")
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    let err: Value = other.json().await.unwrap();
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    let fresh: Value = post(&body, "k2").await.unwrap().json().await.unwrap();
    assert_ne!(fresh["id"], first["id"]);
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_a_status_filter_and_cursor() {
    let app = spawn_api_only().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut body = body_with_panel(&["m1"], "judge");
        body["metadata"] = json!({"n": i});
        ids.push(app.submit_ok(&body).await);
    }
    let cancelled = app.post(&format!("/v1/jobs/{}/cancel", ids[0])).await;
    assert_eq!(cancelled.status(), 200);

    let first = app.list_jobs("limit=2").await;
    let got: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()]);
    assert_eq!(first["has_more"], true);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app.list_jobs(&format!("limit=2&after={cursor}")).await;
    let got: Vec<&str> = second["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);

    let queued = app.list_jobs("status=queued&limit=100").await;
    assert_eq!(queued["data"].as_array().unwrap().len(), 4);
    assert_eq!(queued["has_more"], false);
    let only_cancelled = app.list_jobs("status=cancelled").await;
    assert_eq!(only_cancelled["data"][0]["id"], ids[0].as_str());
    assert_eq!(only_cancelled["data"][0]["metadata"], json!({"n": 0}));
}

#[tokio::test]
async fn cancelling_a_running_job_stops_its_upstream_calls() {
    let app = spawn_app().await;
    app.fake
        .script("slow", Kind::Panel, vec![Reply::Hang, Reply::Ok]);
    let id = app
        .submit_ok(&body_with_panel(&["fast", "slow"], "judge"))
        .await;
    // Wait until the fast member is checkpointed while the slow one hangs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let job = app.get_job(&id).await;
        if job["panel"][0]["status"] == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.fake.aborted("slow", Kind::Panel), 0);
    let resp = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(resp.status(), 200);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["failure_reason"], "cancelled");
    // The hanging call is abandoned within a second of the cancel.
    let aborted = async || app.fake.aborted("slow", Kind::Panel) > 0;
    until_within(
        "the in-flight call aborted",
        Duration::from_secs(1),
        aborted,
    )
    .await;
    let job = app.get_job(&id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(
        job["panel"][1]["status"], "not_run",
        "nothing is written after a cancel"
    );
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 0);
    assert_eq!(app.fake.total_calls(), 2);

    // A cancel repeated (its answer was lost) is done, as asked: the job, not a conflict.
    let again = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(again.status(), 200);
    let job: Value = again.json().await.unwrap();
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["panel"][0]["status"], "succeeded");

    // Retried, the cancelled job goes on from its checkpoint: the fast member is not asked again.
    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    // Retried already (running, or done by now): a conflict, and not for an SDK to resend.
    let again = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(again.status(), 409);
    assert_eq!(again.headers()["x-should-retry"], "false");
    let done = app.wait_final(&id, 10).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["failure_reason"], Value::Null, "{done:#}");
    assert_eq!(app.fake.calls("fast", Kind::Panel), 1);
    assert_eq!(app.fake.calls("slow", Kind::Panel), 2);
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz"] {
        let resp = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
}

/// A job submitted while this process's worker has a free slot (and its last claim found the
/// queue empty) starts here at once: the submit answers with it running its first attempt, no
/// claim in between. With every slot busy, a submitted job is queued and claimed when one frees.
#[tokio::test]
async fn a_job_starts_at_its_submit_while_a_slot_is_free() {
    // No fallback polls: while one claims, it holds the free slots, and a submit landing then is
    // queued instead (and claimed at once) — right, but not what this test looks at.
    let app = spawn_app_with(Options {
        poll_interval: Duration::from_secs(3600),
        ..Options::default()
    })
    .await;
    // A first job, so that the worker has claimed and found the queue empty.
    let first = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    assert_eq!(app.wait_final(&first, 10).await["status"], "succeeded");

    let resp = app.submit(&body_with_panel(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(
        (&job["status"], &job["attempt"]),
        (&json!("running"), &json!(1))
    );
    let done = app.wait_final(job["id"].as_str().unwrap(), 10).await;
    assert_eq!(
        (&done["status"], &done["attempt"]),
        (&json!("succeeded"), &json!(1))
    );

    // The test app's worker runs 8 jobs at once: fill every slot with a hanging job.
    app.fake.script("slow", Kind::Panel, vec![Reply::Hang]);
    let mut hanging = Vec::new();
    for _ in 0..8 {
        let resp = app.submit(&body_with_panel(&["slow"], "judge")).await;
        let job: Value = resp.json().await.unwrap();
        assert_eq!(job["status"], "running", "{job:#}");
        hanging.push(job["id"].as_str().unwrap().to_string());
    }
    let resp = app.submit(&body_with_panel(&["m1"], "judge")).await;
    let queued: Value = resp.json().await.unwrap();
    assert_eq!(queued["status"], "queued", "{queued:#}");
    assert_eq!(queued["scheduled_at"], queued["created_at"], "{queued:#}");
    let queued_id = queued["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.get_job(queued_id).await["status"], "queued");

    // A slot frees: the queued job is claimed and runs.
    assert_eq!(
        app.post(&format!("/v1/jobs/{}/cancel", hanging[0]))
            .await
            .status(),
        200
    );
    let done = app.wait_final(queued_id, 10).await;
    assert_eq!(
        (&done["status"], &done["attempt"]),
        (&json!("succeeded"), &json!(1))
    );
    for id in &hanging[1..] {
        assert_eq!(
            app.post(&format!("/v1/jobs/{id}/cancel")).await.status(),
            200
        );
    }
}

/// A job's id carries the time it was made (jobs are listed newest first by id): the process's
/// aligned clock, as its `created_at` does, which on Postgres is the database's time. Before, it
/// was the system's own clock, whatever the alignment: on a host 20 s behind the database, its
/// jobs were listed 20 s apart from those another host took at the same moment. Here the app's
/// clock (on SQLite, its host's) is the one 20 s off, and the id must follow it.
#[tokio::test]
async fn a_jobs_id_carries_the_time_of_its_created_at() {
    let app = spawn_app_with(Options {
        host_clock: Some(std::sync::Arc::new(Shifted::new(
            std::sync::Arc::new(SystemClock),
            -20_000,
        ))),
        workers: false,
        ..Options::default()
    })
    .await;
    let id: uuid::Uuid = app
        .submit_ok(&body_with_panel(&["a"], "x"))
        .await
        .parse()
        .unwrap();
    let job = app.store.get_job(id).await.unwrap().unwrap();
    let (secs, nanos) = id.get_timestamp().expect("a UUIDv7").to_unix();
    let id_ms = secs as i64 * 1000 + i64::from(nanos / 1_000_000);
    assert!(
        (id_ms - job.created_at).abs() < 1_000,
        "the id says {} ms from its created_at",
        id_ms - job.created_at
    );
}
