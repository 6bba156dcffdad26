//! 2xx answers from OpenAI-compatible servers that are not OpenAI's own shape: kept when they
//! hold a completion, failed at once (not paid for again) when they are not an API's answer.

use serde_json::Value;

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{body_with_panel, spawn_app};

#[tokio::test]
async fn content_given_as_parts_and_odd_finish_reasons_are_kept_from_the_first_call() {
    let app = spawn_app().await;
    app.fake.script(
        "parts",
        Kind::Panel,
        vec![Reply::RawOk(
            r#"{"choices": [{"message": {"role": "assistant", "content": [
                {"type": "text", "text": "Rayleigh "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "scattering."}
            ]}, "finish_reason": null}]}"#,
        )],
    );
    app.fake.script(
        "odd",
        Kind::Panel,
        vec![Reply::RawOk(
            r#"{"choices": [{"message": {"content": "Blue light scatters most."},
                "finish_reason": {"type": "stop"}}]}"#,
        )],
    );
    let id = app
        .submit_ok(&body_with_panel(&["parts", "odd"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"][0]["content"], "Rayleigh scattering.");
    assert_eq!(job["panel"][1]["content"], "Blue light scatters most.");
    assert_eq!(app.fake.calls("parts", Kind::Panel), 1);
    assert_eq!(app.fake.calls("odd", Kind::Panel), 1);
}

#[tokio::test]
async fn a_web_page_in_place_of_a_completion_is_final_and_says_what_came_back() {
    let page =
        "<!doctype html>\n<html><head><title>My App</title></head><body>Welcome</body></html>";
    let failed = member_answering_once(Reply::Page(page)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    for says in [
        "200",
        "text/html",
        "<!doctype html> <html><head><title>My App",
        "base URL",
    ] {
        assert!(error.contains(says), "{says:?} in {error}");
    }
}

#[tokio::test]
async fn a_completion_with_nothing_usable_is_still_an_error() {
    let images = r#"{"choices": [{"message": {"content": [{"type": "image_url", "image_url": {"url": "x"}}]}}]}"#;
    let failed = member_answering_once(Reply::RawOk(images)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error_code"], "empty_completion");
}

// OpenRouter reports a model that failed mid-answer as a 200 carrying `{"error": ...}`: the
// step is retried (another try may answer) and, when every try fails so, the member's error is
// the upstream's own message, not a parse error about a missing field.
#[tokio::test]
async fn an_error_carried_in_a_2xx_is_retried_and_told_in_its_own_words() {
    let app = spawn_app().await;
    let error = r#"{"error": {"code": 502, "message": "Provider returned error: overloaded"}}"#;
    app.fake
        .script("member", Kind::Panel, vec![Reply::RawOk(error); 3]);
    let id = app
        .submit_ok(&body_with_panel(&["ok1", "member"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("member", Kind::Panel), 3);
    let said = job["panel"][1]["error"].as_str().unwrap();
    assert!(
        said.contains("Provider returned error: overloaded"),
        "{said}"
    );
    assert!(!said.contains("missing field"), "{said}");
}

/// The panel entry of a member answering `reply`, beside one that answers well, once the job
/// is over; the member was asked once (the same answer would come back on every retry).
async fn member_answering_once(reply: Reply) -> Value {
    let app = spawn_app().await;
    app.fake.script("member", Kind::Panel, vec![reply]);
    let id = app
        .submit_ok(&body_with_panel(&["ok1", "member"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("member", Kind::Panel), 1, "{job:#}");
    job["panel"][1].clone()
}

// A completion that came back but is not taken was still billed: its tokens are counted on its
// step and in the job's usage, whether a later try answers (an error mid-answer, retried) or
// not (an empty completion, final: a reasoning model that spent its budget thinking), on the
// panel and on the analysis.
#[tokio::test]
async fn tokens_of_completions_not_taken_are_counted() {
    let app = spawn_app().await;
    let cut = r#"{"choices": [{"message": {"content": "half an ans"}, "finish_reason": "error",
        "error": {"message": "provider disconnected"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "cost": 0.01}}"#;
    app.fake
        .script("retried", Kind::Panel, vec![Reply::RawOk(cut), Reply::Ok]);
    let empty = r#"{"choices": [{"message": {"content": ""}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 400, "cost": 0.5}}"#;
    app.fake
        .script("thinker", Kind::Panel, vec![Reply::RawOk(empty)]);
    app.fake
        .script("judge", Kind::Analysis, vec![Reply::RawOk(empty)]);
    let id = app
        .submit_ok(&body_with_panel(&["ok1", "retried", "thinker"], "judge"))
        .await;
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(app.fake.calls("retried", Kind::Panel), 2);
    assert_eq!(app.fake.calls("thinker", Kind::Panel), 1);

    let retried = &job["panel"][1];
    assert_eq!(retried["status"], "succeeded", "{job:#}");
    assert_eq!(retried["usage"]["prompt_tokens"], 17, "{job:#}");
    assert_eq!(retried["usage"]["completion_tokens"], 8, "{job:#}");
    let thinker = &job["panel"][2];
    assert_eq!(thinker["error_code"], "empty_completion", "{job:#}");
    assert_eq!(thinker["usage"]["prompt_tokens"], 100, "{job:#}");
    assert_eq!(thinker["usage"]["completion_tokens"], 400, "{job:#}");
    assert!((thinker["usage"]["cost"].as_f64().unwrap() - 0.5).abs() < 1e-9);

    assert_eq!(job["analysis_error"], "analysis_empty", "{job:#}");

    // ok1, both of `retried`'s tries, `thinker`'s empty one, the empty analysis, the final.
    for usage in [&job["usage"], &job["result"]["usage"]] {
        assert_eq!(usage["prompt_tokens"], 10 + 17 + 100 + 100 + 10, "{job:#}");
        assert_eq!(usage["completion_tokens"], 5 + 8 + 400 + 400 + 5, "{job:#}");
        assert_eq!(usage["total_tokens"], 237 + 818, "{job:#}");
        let cost = usage["cost"].as_f64().unwrap();
        assert!(
            (cost - (3.0 * 0.001 + 0.01 + 0.5 + 0.5)).abs() < 1e-9,
            "{cost}"
        );
    }
}

// An analyst that takes no temperature but its own (OpenAI's reasoning models answer `400` to
// the analyst's 0) is asked again at once without one, and sent none from then on; the panel
// member that refuses the job's temperature too. Before, the analysis went without and the
// final answer failed for good, after the panel had been paid for.
#[tokio::test]
async fn a_model_that_refuses_a_temperature_is_asked_again_without_one() {
    let app = spawn_app().await;
    for kind in [Kind::Panel, Kind::Analysis, Kind::Final] {
        app.fake
            .script("reasoner", kind, vec![Reply::RefusesTemperature]);
    }
    let mut body = body_with_panel(&["reasoner", "m2"], "reasoner");
    body["temperature"] = serde_json::json!(0.7);
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert!(job["analysis"].is_object(), "{job:#}");
    // One refusal (the first call the job made to it), then every call without.
    let calls = [Kind::Panel, Kind::Analysis, Kind::Final].map(|k| app.fake.calls("reasoner", k));
    assert_eq!(calls.iter().sum::<u32>(), 4, "{calls:?}");
    let sent: Vec<bool> = (app.fake.bodies_to("reasoner").iter())
        .map(|b| b.get("temperature").is_some())
        .collect();
    assert_eq!(sent.iter().filter(|t| **t).count(), 1, "{sent:?}");
    // The other member keeps the job's temperature.
    let m2 = app.fake.bodies().into_iter().find(|b| b["model"] == "m2");
    assert_eq!(m2.unwrap()["temperature"], 0.7);
}

/// The messages of each request to `model`, as JSON text, in order.
fn prompts_to(app: &crate::helpers::TestApp, model: &str) -> Vec<String> {
    let bodies = app.fake.bodies_to(model);
    bodies.iter().map(|b| b["messages"].to_string()).collect()
}

// A panel answer that stopped at its token limit is marked so in the analyst's and the final
// call's prompts (its checkpoint's finish reason), not shown as if whole.
#[tokio::test]
async fn a_panel_answer_cut_at_its_token_limit_is_marked_in_the_prompts() {
    let app = spawn_app().await;
    app.fake
        .script("long", Kind::Panel, vec![Reply::Cut("half an ans".into())]);
    let id = app
        .submit_ok(&body_with_panel(&["long", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let prompts = prompts_to(&app, "judge");
    assert_eq!(prompts.len(), 2, "the analysis and the final call");
    for prompt in &prompts {
        assert!(
            prompt.contains(r#"model=\"long\" cut-off=\"token limit\">\nhalf an ans"#),
            "{prompt}"
        );
        assert!(!prompt.contains(r#"model=\"m2\" cut-off"#), "{prompt}");
    }
}

// Panel answers too long together for the analyst's context (a 400 `context_length_exceeded`)
// are sent again shortened, the longest cut first and each cut one marked, to the analysis and
// to the final call: the job succeeds with its analysis. Before, the analysis failed, the final
// call failed the same way, and the job failed after the panel had been paid for.
#[tokio::test]
async fn answers_too_long_for_the_analysts_context_are_shortened_to_fit() {
    let app = spawn_app().await;
    let long = "All about copper. ".repeat(2_000); // 36,000 characters
    app.fake
        .script("verbose", Kind::Panel, vec![Reply::Text(long.clone())]);
    for kind in [Kind::Analysis, Kind::Final] {
        app.fake
            .script("judge", kind, vec![Reply::ContextOf(25_000)]);
    }
    let id = app
        .submit_ok(&body_with_panel(&["verbose", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert!(job["analysis"].is_object(), "{job:#}");
    // The panel's answer itself is kept whole.
    assert_eq!(
        job["panel"][0]["content"].as_str().unwrap().len(),
        long.len()
    );
    // The analysis refused once, then taken at half the answers' length; the final call
    // starts at that length, not from the whole answers again (refused once more, before).
    assert_eq!(app.fake.calls("judge", Kind::Analysis), 2);
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);
    let prompts = prompts_to(&app, "judge");
    assert_eq!(prompts.len(), 3);
    for taken in [&prompts[1], &prompts[2]] {
        assert!(taken.len() <= 25_000, "{}", taken.len());
        assert!(
            taken.contains(r#"model=\"verbose\" shortened=\""#),
            "{taken}"
        );
        assert!(!taken.contains(r#"model=\"m2\" shortened"#));
    }

    // An analyst whose analysis fits whole but whose final prompt does not: the final call
    // alone is shortened.
    app.fake
        .script("judge2", Kind::Analysis, vec![Reply::ContextOf(80_000)]);
    app.fake
        .script("judge2", Kind::Final, vec![Reply::ContextOf(25_000)]);
    let id = app
        .submit_ok(&body_with_panel(&["verbose", "m2"], "judge2"))
        .await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert!(job["analysis"].is_object(), "{job:#}");
    assert_eq!(app.fake.calls("judge2", Kind::Analysis), 1);
    assert_eq!(app.fake.calls("judge2", Kind::Final), 2);

    // An analyst too small for even an eighth of the answers: the analysis gives up after the
    // last level, the final call is refused at that level too, and the job fails saying why
    // (`context_length_exceeded`, a 400 on the chat path), not as an upstream error.
    for kind in [Kind::Analysis, Kind::Final] {
        app.fake.script("tiny", kind, vec![Reply::ContextOf(100)]);
    }
    let id = app
        .submit_ok(&body_with_panel(&["verbose", "m2"], "tiny"))
        .await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["failure_reason"], "context_length_exceeded", "{job:#}");
    assert_eq!(job["analysis_error"], "analysis_upstream_error", "{job:#}");
    assert_eq!(app.fake.calls("tiny", Kind::Analysis), 4);
    assert_eq!(app.fake.calls("tiny", Kind::Final), 1);
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.address))
        .json(&body_with_panel(&["verbose", "m2"], "tiny"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
}
