//! Faults between a request that waits on its job and the store. A failed read of the job is
//! retried: a blip does not end the wait (its client, told to retry, would pay for a new job).
//! A database down for longer than `[server] wait_outage_seconds` ends it with a 503 that names
//! the job and tells the OpenAI SDKs not to retry. A stream whose client left stops reading its
//! job at once; the job goes on.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{body_with_panel, body_with_tool};
use crate::store_faults::{Faults, Faulty, app_on};

fn reads(store: &Faulty) -> usize {
    store.reads.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_chat_completion_rides_out_failed_reads_while_it_waits() {
    let faults = Faults {
        reads: 3,
        ..Faults::default()
    };
    let (app, store) = app_on(faults, true, "").await;
    let resp = app.chat(&body_with_panel(&["m1", "m2"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "the fused final answer"
    );
    assert!(reads(&store) > 3, "the failed reads were retried");
}

#[tokio::test]
async fn a_streamed_completion_rides_out_failed_reads_while_it_waits() {
    let faults = Faults {
        reads: 3,
        ..Faults::default()
    };
    let (app, store) = app_on(faults, true, "").await;
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["stream"] = json!(true);
    let text = app.chat(&body).await.text().await.unwrap();
    assert!(text.contains("the fused final answer"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(reads(&store) > 3, "the failed reads were retried");
}

#[tokio::test]
async fn a_database_down_for_long_ends_the_wait_with_an_answer_naming_the_job() {
    let faults = Faults {
        reads: usize::MAX,
        ..Faults::default()
    };
    let (app, store) = app_on(faults, false, "[server]\nwait_outage_seconds = 1\n").await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![Reply::ToolCall("fusion".into(), json!({"prompt": "Why?"}))],
    );
    // A fusion model's wait, then the fusion tool's.
    for body in [
        body_with_panel(&["m1"], "judge"),
        body_with_tool(&["m1"], "judge"),
    ] {
        let before = reads(&store);
        let started = Instant::now();
        let resp = app.chat(&body).await;
        assert!(started.elapsed() >= Duration::from_secs(1), "gave up early");
        assert_eq!(resp.status(), 503);
        // The SDKs retry a 503 by default: each retry would be a new, paid job.
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let job = resp.headers()["x-fusion-job-id"]
            .to_str()
            .unwrap()
            .to_string();
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["code"], "database_unavailable", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("GET /v1/jobs/{job}")),
            "{message}"
        );
        assert!(reads(&store) > before + 1, "the failed reads were retried");
        let listed = app.list_jobs("").await;
        assert_eq!(listed["data"][0]["id"], job.as_str(), "{listed:#}");
    }
    // Streamed: the same error as the last event, then `[DONE]`.
    let mut body = body_with_panel(&["m1"], "judge");
    body["stream"] = json!(true);
    let resp = app.chat(&body).await;
    let job = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let text = resp.text().await.unwrap();
    assert!(text.contains("database_unavailable"), "{text}");
    assert!(text.contains(&format!("GET /v1/jobs/{job}")), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

// While the process's read of every watched job's progress fails, each wait is told every
// second and re-reads its own job (riding out the outage as any of its reads does): here, that
// keeps a stream reading while its client is there, and shows it stops once the client left.
#[tokio::test]
async fn an_abandoned_stream_stops_reading_its_job_and_the_job_goes_on() {
    let (app, store) = app_on(Faults::default(), true, "").await;
    store.progress_fails.store(usize::MAX, Ordering::SeqCst);
    app.fake.script("stuck", Kind::Panel, vec![Reply::Hang]);
    let mut body = body_with_panel(&["stuck"], "judge");
    body["stream"] = json!(true);
    let mut resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));
    // While its client is there, the stream reads its job each second the progress read fails
    // (else the check below proves nothing).
    let before = reads(&store);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        reads(&store) >= before + 2,
        "the stream did not re-read its job"
    );
    drop(resp);

    // Once its client is gone, no read comes for well over a second.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut last = reads(&store);
    loop {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let now = reads(&store);
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned stream still reads its job: {now} reads"
        );
        last = now;
    }
    let job = app.get_job(&id).await;
    assert_eq!(job["status"], "running", "{job:#}");
}

// A read failing with the database out of reach, where nothing was stored, is a 503 the client
// may retry, and `Retry-After` spaces the SDKs' retries (they honour it; without it they spend
// both retries within a second and a half).
#[tokio::test]
async fn a_read_with_the_database_away_is_answered_503_with_a_retry_after() {
    let faults = Faults {
        reads: 100,
        ..Faults::default()
    };
    let (app, _store) = app_on(faults, false, "").await;
    let resp = app
        .client
        .get(format!("{}/v1/jobs/{}", app.address, uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert!(!resp.headers().contains_key("x-should-retry"));
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "database_unavailable", "{error}");
}

// The fusion tool reads its job's checkpoints (for their usage) once the job is over: the job
// ran and was paid for, so a failed read is retried as the wait's own reads are, not turned
// into an error the client would retry with new, paid jobs.
#[tokio::test]
async fn the_fusion_tool_rides_out_a_failed_read_of_its_jobs_steps() {
    let faults = Faults {
        step_reads: 2,
        ..Faults::default()
    };
    let (app, store) = app_on(faults, true, "").await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![
            Reply::ToolCall("fusion".into(), json!({"prompt": "Why?"})),
            Reply::Text("Because of Rayleigh scattering.".into()),
        ],
    );
    let resp = app.chat(&body_with_tool(&["m1", "m2"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"], "Because of Rayleigh scattering.",
        "{body:#}"
    );
    assert_eq!(store.step_reads_left.load(Ordering::SeqCst), 0);
}

// Waiting requests do not poll each: a wait re-reads its job's status on news of it (an event,
// or the process's progress read seeing the job for the first time or changed), and the whole
// job (its request, possibly megabytes) once, when it is final; once a second, one read of all
// watched jobs' progress stands in for what no event said. Before, every wait re-read its
// job's status every second: six waits on 6.2 s jobs made 60 reads of their own, and none
// together (28 and 30 since, in two runs, and six together).
#[tokio::test]
async fn waits_share_one_progress_read_a_second_and_read_their_job_on_news() {
    let (app, store) = app_on(Faults::default(), true, "").await;
    let slow = Reply::Delay(6200, Box::new(Reply::Ok));
    app.fake.script("slow", Kind::Panel, vec![slow; 6]);
    let (before, whole) = (reads(&store), store.whole_reads.load(Ordering::SeqCst));
    let waits = (0..6).map(|i| {
        let mut body = body_with_panel(&["slow"], "judge");
        body["stream"] = json!(i % 2 == 1);
        let app = &app;
        async move { app.chat(&body).await.text().await.unwrap() }
    });
    for text in futures::future::join_all(waits).await {
        assert!(text.contains("the fused final answer"), "{text}");
    }
    let progress = store.progress_reads.load(Ordering::SeqCst);
    assert!((4..=9).contains(&progress), "{progress} progress reads");
    assert_eq!(store.progress_most.load(Ordering::SeqCst), 6);
    // Each wait: its first read, the progress read's first sight, its job's events (a stream
    // also wakes on each step: panel, analysis, final), and maybe a change the progress read
    // saw as the job went on (six reads each time), and the final read of the whole job: 33,
    // and 45 with two such changes seen.
    let own = reads(&store) - before;
    assert!(own <= 45, "{own} reads of their own by six waits");
    let whole = store.whole_reads.load(Ordering::SeqCst) - whole;
    assert_eq!(whole, 6);
}
