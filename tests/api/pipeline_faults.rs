//! Partial panels, failing analysts and failing final steps end in the documented states with
//! exact upstream call counts.

use std::time::Duration;

use serde_json::Value;

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{
    Options, assert_tokens, assert_usage, body_with_panel, spawn_app, spawn_app_with, until,
};

#[tokio::test]
async fn a_failed_panel_member_is_recorded_and_the_job_goes_on() {
    let app = spawn_app().await;
    app.fake
        .script("gone", Kind::Panel, vec![Reply::Status(404)]);
    let id = app
        .submit_ok(&body_with_panel(&["ok1", "gone"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let failed = &job["panel"][1];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["status_code"], 404);
    assert_eq!(failed["error_code"], "invalid_model");
    assert!(failed["error"].as_str().unwrap().contains("404"));
    // 404 is fatal: asked once, never retried.
    assert_eq!(app.fake.calls("gone", Kind::Panel), 1);
    let analysis = app
        .fake
        .bodies()
        .into_iter()
        .find(|b| b.get("response_format").is_some())
        .unwrap();
    // Only the member that answered is shown to the analyst.
    let prompt = analysis["messages"][1]["content"].as_str().unwrap();
    assert_eq!(prompt.matches("<response-").count(), 1, "{prompt}");
    assert!(prompt.contains("model=\"ok1\""), "{prompt}");
    assert!(!prompt.contains("model=\"gone\""), "{prompt}");
}

/// A redirected POST would turn into a GET (or replay a body somewhere unexpected): a 3xx is
/// the upstream's answer, recorded as the step's error, never followed.
#[tokio::test]
async fn an_upstream_redirect_is_reported_not_followed() {
    let app = spawn_app().await;
    app.fake.script("moved", Kind::Panel, vec![Reply::Redirect]);
    let id = app
        .submit_ok(&body_with_panel(&["ok1", "moved"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let failed = &job["panel"][1];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["status_code"], 307);
    assert!(
        failed["error"].as_str().unwrap().contains("307"),
        "{failed}"
    );
    assert_eq!(app.fake.calls("moved", Kind::Panel), 1);
}

#[tokio::test]
async fn a_server_error_is_retried_until_it_succeeds() {
    let app = spawn_app().await;
    app.fake.script(
        "flaky",
        Kind::Panel,
        vec![Reply::Status(500), Reply::Status(503), Reply::Ok],
    );
    let id = app.submit_ok(&body_with_panel(&["flaky"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("flaky", Kind::Panel), 3);
    assert_eq!(app.fake.ok_calls("flaky", Kind::Panel), 1);
}

#[tokio::test]
async fn when_every_member_fails_the_job_fails_with_a_typed_reason() {
    let app = spawn_app().await;
    app.fake.script("a", Kind::Panel, vec![Reply::Status(404)]);
    app.fake.script("b", Kind::Panel, vec![Reply::Status(400)]);
    let id = app.submit_ok(&body_with_panel(&["a", "b"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "all_panels_failed");
    assert_eq!(job["result"], Value::Null);
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 0);

    let id = app.submit_ok(&body_with_panel(&["a", "a"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["failure_reason"], "invalid_model");
}

#[tokio::test]
async fn invalid_analysis_json_is_retried_then_the_job_succeeds_without_it() {
    let app = spawn_app().await;
    app.fake.script(
        "judge",
        Kind::Analysis,
        vec![Reply::Text("I think they all agree.".into())],
    );
    let id = app
        .submit_ok(&body_with_panel(&["m1", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["analysis"], Value::Null);
    assert_eq!(job["analysis_error"], "analysis_not_valid_json");
    // The default three tries, each told why the previous one was rejected.
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 3);
    let last = app
        .fake
        .bodies()
        .into_iter()
        .rfind(|b| b.get("response_format").is_some())
        .unwrap();
    let feedback = last["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(feedback.contains("not valid JSON"), "{feedback}");
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);
    assert!(job["result"]["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn a_schema_mismatch_that_is_fixed_on_the_second_try_is_kept() {
    let app = spawn_app().await;
    app.fake.script(
        "judge",
        Kind::Analysis,
        vec![
            Reply::Text("```json\n{\"consensus\": []}\n```".into()),
            Reply::Ok,
        ],
    );
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["analysis_error"], Value::Null);
    assert_eq!(job["analysis"]["blind_spots"][0], "other planets");
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 2);
}

#[tokio::test]
async fn a_failing_final_step_fails_the_job_and_a_retry_reuses_every_checkpoint() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(401), Reply::Ok]);
    let id = app
        .submit_ok(&body_with_panel(&["m1", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "upstream_auth");

    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 2);
    // Only the final step ran again.
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1);
    assert_eq!(app.fake.calls("m2", Kind::Panel), 1);
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 1);
    assert_eq!(app.fake.calls("judge", Kind::Final), 2);

    let again = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(again.status(), 409);
}

// A retry calls a failed panel member again; when it answers this time, the analysis made
// without it is made again (the final answer must not be written from an analysis that never
// saw one of its answers). Only the member that failed and the later steps are paid again.
#[tokio::test]
async fn a_retry_whose_failed_member_answers_makes_the_analysis_again() {
    let app = spawn_app().await;
    app.fake
        .script("m2", Kind::Panel, vec![Reply::Status(404), Reply::Ok]);
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(401), Reply::Ok]);
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["plugins"][0]["min_panel"] = 1.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["failure_reason"], "upstream_auth", "{job:#}");
    assert_eq!(job["panel"][1]["status"], "failed");

    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"][1]["status"], "succeeded");
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1);
    assert_eq!(app.fake.calls("m2", Kind::Panel), 2);
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 2);
    assert_eq!(app.fake.calls("judge", Kind::Final), 2);
    // Five calls answered (m1, m2's second, both analyses, the second final), 10 + 5 tokens
    // each: the first analysis, whose row the second replaced, is still counted.
    assert_tokens(&job, 50, 25);
}

// A retried job whose member fails again keeps the analysis it had: nothing new to compare.
#[tokio::test]
async fn a_retry_whose_failed_member_fails_again_keeps_the_analysis() {
    let app = spawn_app().await;
    app.fake.script("m2", Kind::Panel, vec![Reply::Status(404)]);
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(401), Reply::Ok]);
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["plugins"][0]["min_panel"] = 1.into();
    let id = app.submit_ok(&body).await;
    assert_eq!(app.wait_final(&id, 10).await["status"], "failed");
    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("m2", Kind::Panel), 2);
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 1);
}

// A manual retry gives the job its whole deadline again, counted from the retry: a job that
// failed for another reason (a bad key, fixed since) must not fail at once as past its
// deadline, its real failure wiped.
#[tokio::test]
async fn a_manual_retry_after_the_deadline_runs_with_the_deadline_counted_again() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(401), Reply::Ok]);
    let mut body = body_with_panel(&["m1"], "judge");
    body["plugins"][0]["deadline_seconds"] = 1.into();
    let id = app.submit_ok(&body).await;
    assert_eq!(
        app.wait_final(&id, 10).await["failure_reason"],
        "upstream_auth"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("judge", Kind::Final), 2);
}

// A retryable failure whose next try would come after the job's deadline fails the job now,
// with its own reason, instead of leaving it queued to fail later as `deadline_exceeded`.
#[tokio::test]
async fn a_requeue_past_the_deadline_fails_the_job_now_with_its_own_reason() {
    let app = spawn_app_with(Options {
        retry_base: Duration::from_secs(10),
        ..Options::default()
    })
    .await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(503)]);
    let mut body = body_with_panel(&["m1"], "judge");
    body["plugins"][0]["deadline_seconds"] = 5.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 3).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["failure_reason"], "upstream_error", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("deadline"), "{error}");
}

// The same for a panel short of its quorum because of failures that may pass: the job fails
// now, and those failures are written as its members' steps, as on its last attempt.
#[tokio::test]
async fn a_panel_requeue_past_the_deadline_fails_the_job_now_with_its_members_failures() {
    let app = spawn_app_with(Options {
        retry_base: Duration::from_secs(10),
        ..Options::default()
    })
    .await;
    app.fake
        .script("down", Kind::Panel, vec![Reply::Status(503)]);
    let mut body = body_with_panel(&["m1", "down"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    body["plugins"][0]["deadline_seconds"] = 5.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 3).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    assert_eq!(job["failure_reason"], "insufficient_quorum", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("deadline"), "{error}");
    assert_eq!(job["panel"][0]["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"][1]["status"], "failed", "{job:#}");
    assert_eq!(job["panel"][1]["status_code"], 503, "{job:#}");
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 0);
}

#[tokio::test]
async fn a_429_waits_out_its_retry_after() {
    let app = spawn_app().await;
    app.fake
        .script("busy", Kind::Panel, vec![Reply::RateLimited(1), Reply::Ok]);
    let id = app.submit_ok(&body_with_panel(&["busy"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    // The test config's backoff cap is 50 ms: only Retry-After explains a second between the
    // two calls (measured between them, so a slow start cannot make up the wait).
    let starts = app.fake.starts("busy", Kind::Panel);
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(starts[1] - starts[0] >= 1000, "{starts:?}");
}

/// Seconds since the epoch, as the API gives times.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// Asked to come back in an hour (a quota), a step does not wait five minutes and ask again to
// be refused again, holding its worker slot: it ends at once, and its job waits in the queue
// for the hour. Before, the final step waited out 300 s per try and the job was requeued after
// its own backoff (50 ms in the test config), to be refused again.
#[tokio::test]
async fn a_retry_after_longer_than_a_step_waits_requeues_the_job_for_then() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::RateLimited(3_600)]);
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let before = now_secs();
    let mut job = Value::Null;
    until("the job requeued", async || {
        job = app.get_job(&id).await;
        job["status"] == "queued" && job["attempt"] == 1
    })
    .await;
    assert_eq!(app.fake.calls("judge", Kind::Final), 1, "{job:#}");
    let at = job["scheduled_at"].as_i64().unwrap();
    assert!(
        (before + 3_590..=now_secs() + 3_601).contains(&at),
        "scheduled {} s from now: {job:#}",
        at - now_secs()
    );
    assert_eq!(job["failure_reason"], "rate_limited", "{job:#}");
}

// The same with a deadline the wait would run past: the job fails at once, saying why, instead
// of sleeping in the step until its deadline ends it.
#[tokio::test]
async fn a_retry_after_past_the_deadline_fails_the_job_at_once() {
    let app = spawn_app().await;
    app.fake
        .script("busy", Kind::Panel, vec![Reply::RateLimited(3_600)]);
    let mut body = body_with_panel(&["m1", "busy"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    body["plugins"][0]["deadline_seconds"] = 600.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    assert_eq!(job["failure_reason"], "insufficient_quorum", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("deadline"), "{error}");
    assert_eq!(job["panel"][1]["status_code"], 429, "{job:#}");
    assert_eq!(app.fake.calls("busy", Kind::Panel), 1);
}

#[tokio::test]
async fn after_min_panel_answers_late_members_are_cut_off_by_the_panel_timeout() {
    let app = spawn_app().await;
    app.fake.script(
        "late",
        Kind::Panel,
        vec![Reply::Delay(5_000, Box::new(Reply::Ok))],
    );
    let mut body = body_with_panel(&["quick", "late"], "judge");
    body["plugins"][0]["min_panel"] = 1.into();
    body["plugins"][0]["panel_timeout_ms"] = 200.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 4).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"][0]["status"], "succeeded");
    assert_eq!(job["panel"][1]["status"], "failed");
    assert_eq!(job["panel"][1]["error_code"], "panel_timeout");
}

// A member cut off by the panel's timeout while trying again still counts what its earlier try
// was billed for (a whole answer with bytes after it: retried, and paid for), in its step and
// in the job's usage. Before, that usage went with the dropped call.
#[tokio::test]
async fn a_member_cut_off_by_the_panel_timeout_keeps_the_usage_of_its_billed_tries() {
    let app = spawn_app().await;
    let garbled = r#"{"choices": [{"message": {"content": "hi"}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 400}}{"x": 1}"#;
    app.fake.script(
        "late",
        Kind::Panel,
        vec![Reply::RawOk(garbled), Reply::Hang],
    );
    let mut body = body_with_panel(&["quick", "late"], "judge");
    body["plugins"][0]["min_panel"] = 1.into();
    body["plugins"][0]["panel_timeout_ms"] = 500.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        app.fake.calls("late", Kind::Panel),
        2,
        "tried again, then cut off"
    );
    assert_eq!(job["panel"][1]["error_code"], "panel_timeout", "{job:#}");
    assert_usage(&job["panel"][1]["usage"], 100, 400);
    // quick, late's billed try, the analysis and the final.
    assert_tokens(&job, 10 + 100 + 10 + 10, 5 + 400 + 5 + 5);
}

#[tokio::test]
async fn a_body_cut_off_mid_stream_is_retried() {
    let app = spawn_app().await;
    app.fake
        .script("cut", Kind::Panel, vec![Reply::Truncated, Reply::Ok]);
    let id = app.submit_ok(&body_with_panel(&["cut"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"][0]["content"], "panel answer from cut");
    assert_eq!(app.fake.calls("cut", Kind::Panel), 2);
}

#[tokio::test]
async fn a_call_hanging_past_the_timeout_is_abandoned_and_retried() {
    let app = spawn_app_with(Options {
        toml: "[upstream]\ntimeout_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    app.fake
        .script("stuck", Kind::Panel, vec![Reply::Hang, Reply::Ok]);
    let id = app.submit_ok(&body_with_panel(&["stuck"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("stuck", Kind::Panel), 2);
}

#[tokio::test]
async fn too_few_answers_fail_with_insufficient_quorum() {
    let app = spawn_app().await;
    app.fake
        .script("bad", Kind::Panel, vec![Reply::Status(400)]);
    let mut body = body_with_panel(&["good", "bad", "bad"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "insufficient_quorum");
    assert!(job["error"].as_str().unwrap().contains("1 of 3"), "{job:#}");
}

#[tokio::test]
async fn an_analyst_that_keeps_failing_upstream_leaves_analysis_null() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Analysis, vec![Reply::Status(503)]);
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["analysis_error"], "analysis_upstream_error");
    // Transport retries (3 in the test config) within one analysis try; no JSON retries.
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 3);
}

#[tokio::test]
async fn an_overdue_job_fails_with_deadline_exceeded() {
    let app = spawn_app().await;
    app.fake.script("judge", Kind::Analysis, vec![Reply::Hang]);
    let mut body = body_with_panel(&["m1"], "judge");
    body["plugins"][0]["deadline_seconds"] = 1.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 5).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "deadline_exceeded");
    assert_eq!(app.fake.calls("judge", Kind::Final), 0);
}

/// An outage one attempt long: three 503s use up a step's retries (three calls in the test
/// config); then it recovers.
fn outage_for_one_attempt() -> Vec<Reply> {
    vec![
        Reply::Status(503),
        Reply::Status(503),
        Reply::Status(503),
        Reply::Ok,
    ]
}

#[tokio::test]
async fn an_upstream_outage_at_the_final_step_requeues_the_job_with_its_checkpoints() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, outage_for_one_attempt());
    let id = app
        .submit_ok(&body_with_panel(&["m1", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 2, "requeued once");
    assert_eq!(job["failure_reason"], Value::Null);
    assert_eq!(app.fake.calls("judge", Kind::Final), 4);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1, "checkpoints reused");
    assert_eq!(
        app.fake.calls("judge", Kind::Analysis),
        1,
        "checkpoints reused"
    );
}

// The analyst's provider is down through the first attempt too: the analysis failed then is
// made again on the next one, so the final answer is written from an analysis. Before, the
// failed analysis was reused, and the answer written without one.
#[tokio::test]
async fn an_analysis_stopped_by_an_outage_is_made_again_when_the_job_is_requeued() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, outage_for_one_attempt());
    app.fake
        .script("judge", Kind::Analysis, outage_for_one_attempt());
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 2, "requeued once");
    assert_eq!(job["analysis_error"], Value::Null, "{job:#}");
    assert!(job["analysis"].is_object(), "{job:#}");
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 4);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1, "checkpoint reused");
}

// An analysis refused for good (a 401; a web page answered with a 200, which the same URL
// answers again) is kept on the next attempt: asked again, it would be paid for and fail the
// same way. Before, the page's 200 was taken for an error mid-answer, which may pass, and the
// analysis was asked for again.
#[tokio::test]
async fn an_analysis_refused_for_good_is_not_asked_again_when_the_job_is_requeued() {
    for refusal in [Reply::Status(401), Reply::Page("<html>sign in</html>")] {
        let app = spawn_app().await;
        app.fake
            .script("judge", Kind::Final, outage_for_one_attempt());
        app.fake
            .script("judge", Kind::Analysis, vec![refusal, Reply::Ok]);
        let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
        let job = app.wait_final(&id, 10).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert_eq!(job["attempt"], 2, "requeued once");
        assert_eq!(job["analysis_error"], "analysis_upstream_error", "{job:#}");
        assert_eq!(app.fake.calls("judge", Kind::Analysis), 1, "{job:#}");
    }
}

// The same outage on the panel: with too few answers because of failures that may pass, the
// job is requeued like a failed final step, not failed for good; the answer it got is kept and
// the failed member is called again.
#[tokio::test]
async fn an_upstream_outage_across_the_panel_requeues_the_job_keeping_the_answers_it_got() {
    let app = spawn_app().await;
    app.fake
        .script("down", Kind::Panel, outage_for_one_attempt());
    let mut body = body_with_panel(&["m1", "down"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 2, "requeued once");
    assert_eq!(job["panel"][1]["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("down", Kind::Panel), 4);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1, "checkpoint reused");
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 1);
}

// A quorum that the members down for now could not make up even if they answered (another
// member's failure is final) fails the job now, rather than requeuing it to call them again
// for nothing.
#[tokio::test]
async fn a_quorum_out_of_reach_fails_now_though_some_failures_may_pass() {
    let app = spawn_app().await;
    app.fake
        .script("down", Kind::Panel, vec![Reply::Status(503)]);
    app.fake
        .script("gone", Kind::Panel, vec![Reply::Status(404)]);
    let mut body = body_with_panel(&["m1", "down", "gone"], "judge");
    body["plugins"][0]["min_panel"] = 3.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    assert_eq!(job["failure_reason"], "insufficient_quorum", "{job:#}");
    assert_eq!(app.fake.calls("down", Kind::Panel), 3);
}

// A failure that may pass does not hold up a job whose quorum is met: it is recorded as the
// job's partial failure, as any other.
#[tokio::test]
async fn a_member_down_for_now_beside_enough_answers_is_a_partial_failure() {
    let app = spawn_app().await;
    app.fake
        .script("down", Kind::Panel, vec![Reply::Status(503)]);
    let id = app
        .submit_ok(&body_with_panel(&["m1", "down"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["panel"][1]["status"], "failed", "{job:#}");
    assert_eq!(job["panel"][1]["status_code"], 503, "{job:#}");
    assert_eq!(app.fake.calls("down", Kind::Panel), 3);
}

#[tokio::test]
async fn a_panel_that_never_recovers_fails_after_its_attempts_with_a_typed_reason() {
    let app = spawn_app_with(Options {
        toml: "[jobs]\nmax_attempts = 2\n".into(),
        ..Options::default()
    })
    .await;
    for model in ["a", "b"] {
        app.fake
            .script(model, Kind::Panel, vec![Reply::RateLimited(0)]);
    }
    let id = app.submit_ok(&body_with_panel(&["a", "b"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["failure_reason"], "rate_limited");
    assert_eq!(job["attempt"], 2);
    // Three tries per member per attempt (the test config), and the failures are the job's.
    assert_eq!(app.fake.calls("a", Kind::Panel), 6);
    for member in 0..2 {
        assert_eq!(
            job["panel"][member]["error_code"], "rate_limited",
            "{job:#}"
        );
    }
}

#[tokio::test]
async fn a_job_whose_upstream_never_recovers_fails_after_its_attempts() {
    let app = spawn_app_with(Options {
        toml: "[jobs]\nmax_attempts = 2\n".into(),
        ..Options::default()
    })
    .await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::RateLimited(0)]);
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["failure_reason"], "rate_limited");
    assert_eq!(job["attempt"], 2);
    assert_eq!(app.fake.calls("judge", Kind::Final), 6);
    // Said as a final failure, not as one to be tried again.
    let error = job["error"].as_str().unwrap();
    assert!(
        error.starts_with("the final answer could not be written: upstream answered 429"),
        "{error}"
    );
}

/// The system prompt of the call `model` got for `kind`'s step, and the call's body.
pub fn call_of(bodies: &[Value], model: &str, kind: &str) -> (String, Value) {
    let body = bodies
        .iter()
        .find(|b| {
            let system = b["messages"][0]["content"].as_str().unwrap_or_default();
            b["model"] == model
                && match kind {
                    "final" => system.starts_with("You have been provided with responses"),
                    "analysis" => system.starts_with("You are an impartial analyst"),
                    _ => b["messages"][0]["role"] != "system",
                }
        })
        .unwrap_or_else(|| panic!("no {kind} call of {model}"))
        .clone();
    let system = body["messages"][0]["content"].as_str().unwrap_or_default();
    (system.to_string(), body)
}

// A client's `stop` is the final answer's, the text the client reads: the panel and the
// analysis (whose JSON it could cut) are called without it. Through the chat endpoint, where a
// forced tool call, which a fusion model cannot make, is refused before anything is paid for.
#[tokio::test]
async fn the_clients_stop_ends_the_final_answer_only() {
    let app = spawn_app().await;
    let tools = serde_json::json!([{"type": "function",
                                     "function": {"name": "f", "parameters": {}}}]);
    let mut body = body_with_panel(&["m1"], "judge");
    body["tools"] = tools;
    body["tool_choice"] = serde_json::json!("required");
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 400);
    let error: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unsupported_parameter", "{error}");
    assert_eq!(app.fake.total_calls(), 0);

    body["tool_choice"] = serde_json::json!("auto");
    body["stop"] = serde_json::json!(["\n\nQ:"]);
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let bodies = app.fake.bodies();
    let (_, panel) = call_of(&bodies, "m1", "panel");
    let (_, analysis) = call_of(&bodies, "judge", "analysis");
    let (_, last) = call_of(&bodies, "judge", "final");
    assert!(panel.get("stop").is_none(), "{panel}");
    assert!(analysis.get("stop").is_none(), "{analysis}");
    assert_eq!(last["stop"], serde_json::json!(["\n\nQ:"]), "{last}");
}

// A client's `response_format` is the final answer's, asked for in the analyst's provider's own
// way: the panel's answers stay free-form and the analysis keeps its own schema.
#[tokio::test]
async fn the_clients_response_format_shapes_the_final_answer_only() {
    let schema = serde_json::json!({"type": "object", "required": ["city"],
                                    "properties": {"city": {"type": "string"}}});
    let format = serde_json::json!({"type": "json_schema",
                                    "json_schema": {"name": "place", "schema": schema}});
    let mut body = body_with_panel(&["m1"], "judge");
    body["response_format"] = format.clone();
    for mode in ["json_schema", "json_object", "prompt"] {
        let app = spawn_app_with(Options {
            toml: format!("[upstream]\nstructured_output = \"{mode}\"\n"),
            ..Options::default()
        })
        .await;
        let id = app.submit_ok(&body).await;
        let job = app.wait_final(&id, 10).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        let bodies = app.fake.bodies();
        let (_, panel) = call_of(&bodies, "m1", "panel");
        assert!(panel.get("response_format").is_none(), "{mode}: {panel}");
        let (_, analysis) = call_of(&bodies, "judge", "analysis");
        let own = analysis.get("response_format");
        match mode {
            "json_schema" => {
                assert_eq!(
                    own.unwrap()["json_schema"]["name"],
                    "fusion_analysis",
                    "{own:?}"
                )
            }
            "json_object" => assert_eq!(own.unwrap()["type"], "json_object", "{own:?}"),
            _ => assert!(own.is_none(), "{mode}: {own:?}"),
        }
        assert!(
            !own.is_some_and(|f| f.to_string().contains("city")),
            "{own:?}"
        );
        let (system, last) = call_of(&bodies, "judge", "final");
        let sent = last.get("response_format");
        match mode {
            "json_schema" => assert_eq!(sent, Some(&format)),
            "json_object" => assert_eq!(
                sent,
                Some(&serde_json::json!({"type": "json_object", "schema": schema}))
            ),
            _ => {
                assert_eq!(sent, None);
                assert!(system.contains("Reply with one JSON object"), "{system}");
                assert!(system.contains("\"required\":[\"city\"]"), "{system}");
            }
        }
    }
}

#[tokio::test]
async fn each_provider_gets_the_analysis_schema_in_its_own_structured_output_mode() {
    let app = spawn_app_with(Options {
        toml: "[upstream]\nstructured_output = \"prompt\"\nmax_tokens_field = \"max_tokens\"\n"
            .into(),
        ..Options::default()
    })
    .await;
    let mut body = body_with_panel(&["m1"], "judge");
    body["max_completion_tokens"] = 99.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let bodies = app.fake.bodies();
    let analysis = bodies.iter().find(|b| b["model"] == "judge").unwrap();
    assert!(
        analysis.get("response_format").is_none(),
        "prompt mode sends no response_format"
    );
    let system = analysis["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("\"maxItems\""),
        "the schema is spelled out in the prompt: {system}"
    );
    let panel = bodies.iter().find(|b| b["model"] == "m1").unwrap();
    assert_eq!(panel["max_tokens"], 99);
    assert!(panel.get("max_completion_tokens").is_none());

    let app = spawn_app_with(Options {
        toml: "[upstream]\nstructured_output = \"json_object\"\n".into(),
        ..Options::default()
    })
    .await;
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    app.wait_final(&id, 10).await;
    let bodies = app.fake.bodies();
    let analysis = bodies.iter().find(|b| b["model"] == "judge").unwrap();
    assert_eq!(analysis["response_format"]["type"], "json_object");
    assert_eq!(
        analysis["response_format"]["schema"]["required"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

// A manual retry runs a failed step again, but what the failed try was billed for (an empty
// completion, here) still counts: in the step that replaced it and in the job's usage. While
// the job waits to run again, the member shows as pending, and its usage is counted already.
// Before, the retry deleted the failed step, and its tokens with it.
#[tokio::test]
async fn a_retry_keeps_the_usage_of_the_failed_steps_it_runs_again() {
    let app = spawn_app().await;
    let empty = r#"{"choices": [{"message": {"content": ""}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 400, "cost": 0.5}}"#;
    // The call the retry makes answers 3 s late, so that the retry's answer is read while the
    // member is still pending (on a loaded machine it was once read after the call was done).
    let late = Reply::Delay(3000, Box::new(Reply::Ok));
    app.fake
        .script("m2", Kind::Panel, vec![Reply::RawOk(empty), late]);
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["failure_reason"], "insufficient_quorum", "{job:#}");
    assert_eq!(job["usage"]["prompt_tokens"], 110, "{job:#}");

    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let requeued: Value = resp.json().await.unwrap();
    assert_eq!(requeued["panel"][1]["status"], "pending", "{requeued:#}");
    assert_eq!(requeued["usage"]["prompt_tokens"], 110, "{requeued:#}");

    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("m2", Kind::Panel), 2);
    assert_usage(&job["panel"][1]["usage"], 110, 405);
    // m1, both of m2's calls, the analysis and the final.
    assert_tokens(&job, 10 + 110 + 10 + 10, 5 + 405 + 5 + 5);
}

// A member set to run again that never does (its job cancelled meanwhile) is shown in the final
// job as the failure it was, with its error and what it was billed for; while the job could
// still run it, as pending. Before, the final job showed it `not_run`, without error or usage,
// while the job's usage counted it.
#[tokio::test]
async fn a_member_set_to_run_again_shows_its_failure_once_the_job_is_final() {
    let app = spawn_app().await;
    let empty = r#"{"choices": [{"message": {"content": ""}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 400}}"#;
    app.fake
        .script("m2", Kind::Panel, vec![Reply::RawOk(empty), Reply::Hang]);
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["failure_reason"], "insufficient_quorum", "{job:#}");
    let resp = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(resp.status(), 202);
    let requeued: Value = resp.json().await.unwrap();
    assert_eq!(requeued["panel"][1]["status"], "pending", "{requeued:#}");
    assert_eq!(requeued["panel"][1]["error"], Value::Null, "{requeued:#}");
    until("m2's second call", async || {
        app.fake.calls("m2", Kind::Panel) == 2
    })
    .await;

    let resp = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(resp.status(), 200);
    let job: Value = resp.json().await.unwrap();
    let member = &job["panel"][1];
    assert_eq!(member["status"], "failed", "{job:#}");
    assert_usage(&member["usage"], 100, 400);
    assert_eq!(member["error_code"], Value::Null, "{job:#}");
    let error = member["error"].as_str().unwrap_or_default();
    assert!(error.contains("empty completion"), "{job:#}");
    assert_eq!(job["usage"]["prompt_tokens"], 110, "{job:#}");
}

// A step whose tries were all billed for answers that could not be taken (an error
// mid-answer) and whose job is requeued to call it again: what those tries cost still counts,
// for a panel member and for the final step, in the step that replaced them and in the job.
// Before, a step that failed for now was not written, and its tries' usage was lost.
#[tokio::test]
async fn the_billed_tries_of_a_step_its_requeued_job_runs_again_are_counted() {
    let app = spawn_app().await;
    let cut = r#"{"choices": [{"message": {"content": "The answer is"}, "finish_reason": "error",
        "error": {"code": 502, "message": "went away"}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1000}}"#;
    // Three tries per step (the test config's retry policy), then the job is requeued.
    let tries = || {
        vec![
            Reply::RawOk(cut),
            Reply::RawOk(cut),
            Reply::RawOk(cut),
            Reply::Ok,
        ]
    };
    app.fake.script("down", Kind::Panel, tries());
    app.fake.script("judge", Kind::Final, tries());
    let mut body = body_with_panel(&["m1", "down"], "judge");
    body["plugins"][0]["min_panel"] = 2.into();
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 15).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        job["attempt"], 3,
        "requeued for the panel, then for the final step"
    );
    assert_eq!(app.fake.calls("down", Kind::Panel), 4);
    assert_eq!(app.fake.calls("judge", Kind::Final), 4);
    assert_usage(&job["panel"][1]["usage"], 310, 3005);
    // m1, down's four calls, the analysis, the final step's four calls.
    assert_tokens(&job, 10 + 310 + 10 + 310, 5 + 3005 + 5 + 3005);
}

// A job requeued to try again later runs again when it is due, not at the workers' next poll:
// the poll is a fallback for a wake-up missed, and nothing else says a requeued job is due.
// Here the poll is 30 s and the job is due 300 ms after its first attempt failed. Before, it ran
// again only at the poll, and a job due just before its deadline was claimed past it and failed
// `deadline_exceeded` untried.
#[tokio::test]
async fn a_requeued_job_runs_again_when_due_not_at_the_next_poll() {
    let app = spawn_app_with(Options {
        poll_interval: Duration::from_secs(30),
        retry_base: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    // Every try of the first attempt's final call fails (3 per step here); the next answers.
    let busy = Reply::Status(503);
    app.fake.script(
        "judge",
        Kind::Final,
        vec![busy.clone(), busy.clone(), busy, Reply::Ok],
    );
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    let finals = app.fake.starts("judge", Kind::Final);
    let waited = finals[3] - finals[2];
    assert!(
        (300..5_000).contains(&waited),
        "ran again {waited} ms later"
    );
}

// An analysis cut off at its token limit before its JSON ended is asked for again, shorter,
// without the cut reply sent back (the same request would stop at the same place, and the
// reply may be most of the limit); one cut every time leaves the job without an analysis, its
// view saying why. Before, the cut reply was sent back with "not valid JSON" and asked for
// again under the same limit.
#[tokio::test]
async fn an_analysis_cut_off_at_its_token_limit_is_asked_for_shorter() {
    let app = spawn_app().await;
    let cut = Reply::Cut(r#"{"consensus": ["the sky is blue", "it sca"#.into());
    app.fake
        .script("judge", Kind::Analysis, vec![cut.clone(), Reply::Ok]);
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        job["analysis"]["blind_spots"][0], "other planets",
        "{job:#}"
    );
    let second = app
        .fake
        .bodies()
        .into_iter()
        .filter(|b| b.get("response_format").is_some())
        .nth(1)
        .expect("a second analysis call");
    let messages = second["messages"].as_array().unwrap();
    let asked = messages.last().unwrap()["content"].as_str().unwrap();
    assert!(asked.contains("cut off at your token limit"), "{asked}");
    assert!(
        !second["messages"].to_string().contains("it sca"),
        "{second}"
    );

    app.fake.script("judge2", Kind::Analysis, vec![cut]);
    let id = app.submit_ok(&body_with_panel(&["m1"], "judge2")).await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["analysis_error"], "analysis_not_valid_json");
    let message = job["analysis_error_message"].as_str().unwrap();
    assert!(
        message.starts_with("cut off at the token limit: "),
        "{message}"
    );
}
