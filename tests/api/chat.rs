//! The OpenAI-compatible surface: synchronous and streamed fusion completions, the gateway
//! pass-through, the fusion tool, the recursion guard, models, and disconnecting clients.

use std::sync::Arc;
use std::time::Duration;

use fusion::clock::{Shifted, SystemClock};

use serde_json::{Value, json};

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{
    Options, TestApp, body_with_panel, body_with_tool, spawn_app, spawn_app_with, until,
};

impl TestApp {
    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.address))
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

/// The `data:` payloads and the comment lines of an SSE body, in order.
fn parse_sse(text: &str) -> (Vec<String>, Vec<String>) {
    let mut data = Vec::new();
    let mut comments = Vec::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            data.push(d.to_string());
        } else if let Some(c) = line.strip_prefix(':') {
            comments.push(c.trim().to_string());
        }
    }
    (data, comments)
}

#[tokio::test]
async fn a_fusion_model_answers_a_standard_chat_completion() {
    let app = spawn_app().await;
    let resp = app.chat(&body_with_panel(&["m1", "m2"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let job_id = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fusion");
    assert_eq!(body["fusion_job_id"], job_id.as_str());
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "the fused final answer"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 60);
    assert!((body["usage"]["cost"].as_f64().unwrap() - 0.004).abs() < 1e-9);
    assert!(body["created"].is_i64());
    // The same run is a durable job.
    let job = app.get_job(&job_id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(
        job["result"]["choices"][0]["message"]["content"],
        "the fused final answer"
    );
}

// A conversation holding a tool exchange (an agent's earlier call and its result) reaches the
// panel and the final call written out as text (the call the assistant's, the result the
// user's, joined with what the user said after it): they offer no tools, and
// providers refuse `tool` messages and `tool_calls` without them. The job keeps the
// conversation as it was sent. Before, both went upstream as they came.
#[tokio::test]
async fn a_tool_exchange_goes_upstream_as_text() {
    let app = spawn_app().await;
    let mut body = body_with_panel(&["m1", "m2"], "judge");
    body["messages"] = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18°C"},
        {"role": "user", "content": "so?"}
    ]);
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let bodies = app.fake.bodies();
    assert_eq!(bodies.len(), 4);
    for sent in &bodies {
        let messages = sent["messages"].as_array().unwrap();
        for m in messages {
            assert_ne!(m["role"], "tool", "{sent:#}");
            assert!(m.get("tool_calls").is_none(), "{sent:#}");
        }
    }
    let written_out = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "[called the tool `weather` with {}]"},
        {"role": "user", "content": "[the tool `weather` returned:]\n18°C\n\nso?"}
    ]);
    let panel = bodies.iter().find(|b| b["model"] == "m1").unwrap();
    assert_eq!(panel["messages"], written_out);
    let job_id = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let job = app.store.get_job(job_id).await.unwrap().unwrap();
    assert_eq!(json!(job.spec.messages), body["messages"]);

    // The legacy shape (an assistant's `function_call` answered by a `function` message) is
    // taken and written out the same way. Before, the `function` role was refused with a 400.
    body["messages"] = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null,
         "function_call": {"name": "weather", "arguments": "{}"}},
        {"role": "function", "name": "weather", "content": "18°C"},
        {"role": "user", "content": "so?"}
    ]);
    // (A function that returned nothing may say so with a null content.)
    let mut nothing = body.clone();
    nothing["messages"][2]["content"] = Value::Null;
    let id = app.submit_ok(&nothing).await;
    assert_eq!(app.wait_final(&id, 10).await["status"], "succeeded");
    let legacy = app.fake.bodies().len();
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let bodies = app.fake.bodies();
    let panel = bodies[legacy..]
        .iter()
        .find(|b| b["model"] == "m1")
        .unwrap();
    assert_eq!(panel["messages"], written_out);
}

#[tokio::test]
async fn a_streamed_fusion_completion_follows_the_openai_chunk_format() {
    let app = spawn_app_with(Options {
        toml: "[server]\nkeepalive_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    app.fake.script(
        "slow",
        Kind::Panel,
        vec![Reply::Delay(1_500, Box::new(Reply::Ok))],
    );
    let mut body = body_with_panel(&["fast", "slow"], "judge");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // nginx, in front, would otherwise buffer the events and the keep-alives.
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert!(resp.headers().contains_key("x-fusion-job-id"));
    let text = resp.text().await.unwrap();
    let (data, comments) = parse_sse(&text);
    assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "fusion")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "the fused final answer");
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"] == "stop");
    assert!(finish.is_some(), "{text}");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 60);
    // Usage asked for: every other chunk says `"usage": null`, as OpenAI's do.
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk.get("usage"), Some(&Value::Null), "{chunk}");
    }
    // Progress and keep-alives are comments, which standard clients ignore.
    assert!(
        comments
            .iter()
            .any(|c| c == "fusion panel 1/2 fast completed"),
        "{comments:?}"
    );
    assert!(
        comments
            .iter()
            .any(|c| c == "fusion panel 2/2 slow completed"),
        "{comments:?}"
    );
    assert!(
        comments.iter().any(|c| c == "fusion analysis completed"),
        "{comments:?}"
    );
    assert!(comments.iter().any(|c| c == "keep-alive"), "{comments:?}");
}

#[tokio::test]
async fn a_failed_fusion_job_is_an_openai_style_error_with_its_job_id() {
    let app = spawn_app().await;
    app.fake
        .script("gone", Kind::Panel, vec![Reply::Status(404)]);
    let resp = app.chat(&body_with_panel(&["gone"], "judge")).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().contains_key("x-fusion-job-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_model");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn several_choices_are_refused_as_on_the_jobs_api_and_one_is_fine() {
    let app = spawn_app().await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let resp = app
        .chat(&json!({"model": "fusion", "n": 3, "messages": messages}))
        .await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_request", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("`n` must be 1"), "{message}");
    assert_eq!(app.fake.total_calls(), 0, "refused before any job ran");
    let resp = app
        .chat(&json!({"model": "fusion", "n": 1, "messages": messages}))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"].as_array().map(Vec::len), Some(1));
}

/// An app whose panel member `slow` answers its first call after 1.5 s, and a body asking it.
async fn slow_panel_app() -> (TestApp, Value) {
    let app = spawn_app().await;
    app.fake.script(
        "slow",
        Kind::Panel,
        vec![Reply::Delay(1_500, Box::new(Reply::Ok))],
    );
    (app, body_with_panel(&["slow"], "judge"))
}

// The README's advice to a client that timed out before the answer (and so never saw the job
// id): the same call with the same `Idempotency-Key` waits on the same job, paid for once.
#[tokio::test]
async fn a_timed_out_call_repeated_with_its_idempotency_key_waits_on_the_same_job() {
    let (app, body) = slow_panel_app().await;
    let call = |timeout: Duration| {
        app.client
            .post(format!("{}/v1/chat/completions", app.address))
            .header("Idempotency-Key", "chat-once")
            .timeout(timeout)
            .json(&body)
            .send()
    };
    let first = call(Duration::from_millis(300)).await;
    assert!(first.unwrap_err().is_timeout(), "the first call gives up");
    let resp = call(Duration::from_secs(30)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["fusion_job_id"], header.as_str());
    assert_eq!(
        app.fake.calls("slow", Kind::Panel),
        1,
        "one job, one panel call"
    );
    let jobs = app.list_jobs("").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1, "{jobs:#}");
}

// One key and one body name one job on either endpoint, a `user` field or `stream: false`
// included (before, the chat path left them out of its hash and /v1/jobs did not: 422).
#[tokio::test]
async fn one_idempotency_key_and_body_are_one_job_on_either_endpoint() {
    let app = spawn_app().await;
    let mut body = body_with_panel(&["m1"], "judge");
    body["user"] = json!("u1");
    body["stream"] = json!(false);
    let post = |path: &str| {
        app.client
            .post(format!("{}{path}", app.address))
            .header("Idempotency-Key", "both-ways")
            .json(&body)
            .send()
    };
    let chat = post("/v1/chat/completions").await.unwrap();
    assert_eq!(chat.status(), 200);
    assert!(!chat.headers().contains_key("idempotent-replayed"));
    let id = chat.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let job = post("/v1/jobs").await.unwrap();
    assert_eq!(job.status(), 202);
    assert_eq!(job.headers()["idempotent-replayed"], "true");
    let job: Value = job.json().await.unwrap();
    assert_eq!(job["id"], id.as_str());
    // The chat path marks a repeat as /v1/jobs does (before, it did not say).
    let again = post("/v1/chat/completions").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-fusion-job-id"], id.as_str());
    assert_eq!(
        app.fake.calls("m1", Kind::Panel),
        1,
        "one job, paid for once"
    );
}

#[tokio::test]
async fn other_models_pass_through_to_the_upstream() {
    let app = spawn_app().await;
    let body = json!({"model": "vendor/plain", "messages": [{"role": "user", "content": "hi"}]});
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "panel answer from vendor/plain"
    );
    assert_eq!(app.fake.total_calls(), 1);
    app.fake
        .script("vendor/broken", Kind::Panel, vec![Reply::Status(503)]);
    let resp = app
        .chat(&json!({"model": "vendor/broken", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(resp.status(), 503, "the upstream's own status comes back");
}

#[tokio::test]
async fn an_outer_answer_that_is_not_a_completion_is_a_bad_gateway() {
    let app = spawn_app().await;
    let body = json!({
        "model": "outer",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "fusion"}],
    });
    for (reply, says) in [
        (Reply::RawOk("[1, 2]"), "not an object"),
        (Reply::RawOk("<html>"), "not JSON"),
        (Reply::Redirect, ""),
    ] {
        app.fake.script("outer", Kind::Panel, vec![reply]);
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 502, "{says}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
}

// Streamed, the fusion tool answers at once (a role chunk, then keep-alives) rather than once
// every round and job is over, which a client or proxy waiting for a first byte would not
// outlast. A reply that calls the client's own tool streams the calls with their `index`, and
// the finish chunk names the jobs, as the non-streamed reply does.
#[tokio::test]
async fn a_streamed_fusion_tool_call_answers_at_once_and_indexes_its_tool_calls() {
    let app = spawn_app_with(Options {
        toml: "[server]\nkeepalive_seconds = 1".into(),
        ..Options::default()
    })
    .await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![
            Reply::ToolCall("fusion".into(), json!({"prompt": "Is the sky blue?"})),
            Reply::ToolCall("weather".into(), json!({"city": "Paris"})),
        ],
    );
    app.fake.script(
        "slow",
        Kind::Panel,
        vec![Reply::Delay(2_500, Box::new(Reply::Ok))],
    );
    let mut body = body_with_tool(&["slow"], "judge");
    body["stream"] = json!(true);
    body["tools"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}));
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.fake.calls("judge", Kind::Final),
        0,
        "the response began before the job it waits on was over"
    );
    let text = resp.text().await.unwrap();
    let (data, comments) = parse_sse(&text);
    assert!(comments.iter().any(|c| c == "keep-alive"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]), "{text}");
    let calls = &chunks[1]["choices"][0]["delta"]["tool_calls"];
    assert_eq!(calls[0]["index"], 0, "{text}");
    assert_eq!(calls[0]["function"]["name"], "weather", "{text}");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        chunks[2]["fusion_job_ids"].as_array().map(Vec::len),
        Some(1)
    );
}

/// The fusion tool's reply to a request offering it (panel `m1`, analyst `judge`) and the
/// client's own `weather` function.
async fn ask_offering_weather(app: &TestApp) -> Value {
    let mut body = body_with_tool(&["m1"], "judge");
    let weather_tool = json!({"type": "function", "function": {"name": "weather"}});
    body["tools"].as_array_mut().unwrap().push(weather_tool);
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The outer model's requests, in order.
fn outer_bodies(app: &TestApp) -> Vec<Value> {
    app.fake.bodies_to("outer")
}

// The outer model calls the fusion tool and the client's own tool in one message: the fusion
// call runs, and the conversation goes on with that message holding the fusion call alone and
// its result; the client gets the model's next reply, which calls its tool again. Before, the
// first reply went back to the client as it was: a call of `fusion`, a function the client
// never declared and could not answer, and no job ran.
#[tokio::test]
async fn a_fusion_call_beside_the_clients_own_runs_and_is_not_handed_to_the_client() {
    let app = spawn_app().await;
    let fusion = ("fusion".to_string(), json!({"prompt": "Is the sky blue?"}));
    let weather = ("weather".to_string(), json!({"city": "Paris"}));
    let first = Reply::ToolCalls(vec![fusion, weather.clone()]);
    let again = Reply::ToolCall(weather.0, weather.1);
    app.fake.script("outer", Kind::Panel, vec![first, again]);
    let reply = ask_offering_weather(&app).await;
    let calls = &reply["choices"][0]["message"]["tool_calls"];
    assert_eq!(calls.as_array().map(Vec::len), Some(1), "{reply:#}");
    assert_eq!(calls[0]["function"]["name"], "weather", "{reply:#}");
    assert_eq!(reply["fusion_job_ids"].as_array().map(Vec::len), Some(1));
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);

    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 2);
    let history = outer[1]["messages"].as_array().unwrap();
    let asked = &history[history.len() - 2];
    let asked_calls = asked["tool_calls"].as_array().unwrap();
    assert_eq!(asked_calls.len(), 1, "{asked:#}");
    assert_eq!(asked_calls[0]["function"]["name"], "fusion");
    let result = &history[history.len() - 1];
    assert_eq!(result["tool_call_id"], asked_calls[0]["id"]);
    assert_eq!(result["content"], "the fused final answer");
}

// A model that calls the fusion tool in every round: after the last round's jobs, the next
// reply is asked for with `tool_choice: "none"`, and a fusion call in it anyway is not handed
// to the client. Before, the client got that call, of a function it never declared.
#[tokio::test]
async fn out_of_rounds_the_reply_calls_nothing_the_client_cannot_answer() {
    let app = spawn_app().await;
    let call = Reply::ToolCall("fusion".into(), json!({"prompt": "Again?"}));
    app.fake.script("outer", Kind::Panel, vec![call; 5]);
    let resp = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    let choice = &reply["choices"][0];
    assert!(choice["message"].get("tool_calls").is_none(), "{reply:#}");
    assert_eq!(choice["message"]["content"], "", "{reply:#}");
    assert_eq!(choice["finish_reason"], "stop", "{reply:#}");
    assert_eq!(reply["fusion_job_ids"].as_array().map(Vec::len), Some(4));
    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 5);
    assert_eq!(outer[4]["tool_choice"], "none");
    assert!(outer[..4].iter().all(|b| b["tool_choice"] != "none"));
}

// The outer model's arguments are held to the size a client could submit (4 MiB), before they
// are parsed: over it, the call's result says so and no job runs. Before, any prompt the model
// wrote became a job.
#[tokio::test]
async fn a_fusion_call_with_a_prompt_over_the_body_limit_runs_no_job() {
    let app = spawn_app().await;
    let huge = "x".repeat((4 << 20) + 1);
    let replies = vec![
        Reply::ToolCall("fusion".into(), json!({ "prompt": huge })),
        Reply::Text("done".into()),
    ];
    app.fake.script("outer", Kind::Panel, replies);
    let resp = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "done");
    assert_eq!(app.fake.calls("m1", Kind::Panel), 0);
    let outer = outer_bodies(&app);
    let history = outer[1]["messages"].as_array().unwrap();
    let result = history[history.len() - 1]["content"].as_str().unwrap();
    assert!(
        result.contains("arguments are") && result.contains("over the limit of 4 MiB"),
        "{result}"
    );
}

// Arguments that are not an object (an array holding the prompt) name no `prompt`: the call's
// result says so and no job runs.
#[tokio::test]
async fn a_fusion_call_whose_arguments_are_not_an_object_runs_no_job() {
    let app = spawn_app().await;
    let replies = vec![
        Reply::ToolCall("fusion".into(), json!(["Is the sky blue?"])),
        Reply::Text("done".into()),
    ];
    app.fake.script("outer", Kind::Panel, replies);
    let resp = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 0);
    let outer = outer_bodies(&app);
    let history = outer[1]["messages"].as_array().unwrap();
    let result = history[history.len() - 1]["content"].as_str().unwrap();
    assert!(result.contains("needs a non-empty `prompt`"), "{result}");
}

// A model asking for many fusion calls at once runs at most four of them a round; the others
// are answered "not run", in the calls' order, so every call has its result. Before, each call
// was a paid job, as many as the model asked for.
#[tokio::test]
async fn at_most_four_fusion_calls_run_in_a_round() {
    let app = spawn_app().await;
    let calls: Vec<(String, Value)> = (0..6)
        .map(|i| {
            (
                "fusion".to_string(),
                json!({"prompt": format!("Topic {i}?")}),
            )
        })
        .collect();
    let replies = vec![Reply::ToolCalls(calls), Reply::Text("done".into())];
    app.fake.script("outer", Kind::Panel, replies);
    let resp = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"], "done",
        "{reply:#}"
    );
    assert_eq!(reply["fusion_job_ids"].as_array().map(Vec::len), Some(4));
    assert_eq!(app.fake.calls("judge", Kind::Final), 4);
    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 2);
    let history = outer[1]["messages"].as_array().unwrap();
    let asked = history[history.len() - 7]["tool_calls"].as_array().unwrap();
    let results = &history[history.len() - 6..];
    assert_eq!(asked.len(), 6);
    for (i, (call, result)) in asked.iter().zip(results).enumerate() {
        assert_eq!(result["tool_call_id"], call["id"], "{i}");
        let content = result["content"].as_str().unwrap();
        match i < 4 {
            true => assert_eq!(content, "the fused final answer", "{i}"),
            false => assert!(
                content.starts_with("error: not run: at most 4"),
                "{content}"
            ),
        }
    }
}

// The same with a tool of the client's own offered: the last request no longer offers the
// fusion function, and the client's tool stays callable.
#[tokio::test]
async fn out_of_rounds_the_clients_own_tools_stay_offered() {
    let app = spawn_app().await;
    let call = Reply::ToolCall("fusion".into(), json!({"prompt": "Again?"}));
    let mut replies = vec![call; 4];
    replies.push(Reply::ToolCall("weather".into(), json!({"city": "Paris"})));
    app.fake.script("outer", Kind::Panel, replies);
    let reply = ask_offering_weather(&app).await;
    let calls = &reply["choices"][0]["message"]["tool_calls"];
    assert_eq!(calls[0]["function"]["name"], "weather", "{reply:#}");
    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 5);
    let offered = |b: &Value| -> Vec<String> {
        let tools = b["tools"].as_array().unwrap();
        tools
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(offered(&outer[3]), ["fusion", "weather"]);
    assert_eq!(offered(&outer[4]), ["weather"]);
    assert_ne!(outer[4]["tool_choice"], "none");
}

// Streamed, a reply whose content comes as parts (as some servers answer) streams their text,
// and a reply without a finish reason (`null`) ends with "stop". Before, the parts streamed as
// an empty answer and no chunk said why the stream ended.
#[tokio::test]
async fn a_streamed_tool_reply_in_content_parts_streams_their_text() {
    let app = spawn_app().await;
    let reply = r#"{"id": "c", "object": "chat.completion", "created": 0, "model": "outer",
        "choices": [{"index": 0, "finish_reason": null, "message": {"role": "assistant",
        "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}"#;
    app.fake
        .script("outer", Kind::Panel, vec![Reply::RawOk(reply)]);
    let mut body = body_with_tool(&["m1"], "judge");
    body["stream"] = json!(true);
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (data, _) = parse_sse(&text);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello, world", "{text}");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{text}");
}

// The outer model's refusal and its message's annotations reach a streamed client as they
// reach an unstreamed one.
#[tokio::test]
async fn a_streamed_tool_reply_keeps_its_refusal_and_annotations() {
    let app = spawn_app().await;
    let reply = r#"{"id": "c", "object": "chat.completion", "created": 0, "model": "outer",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
        "content": null, "refusal": "I cannot help with that.",
        "annotations": [{"type": "url_citation", "url_citation": {"url": "https://a.example",
        "title": "A", "start_index": 0, "end_index": 1}}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}"#;
    app.fake
        .script("outer", Kind::Panel, vec![Reply::RawOk(reply)]);
    let mut body = body_with_tool(&["m1"], "judge");
    body["stream"] = json!(true);
    let text = app.chat(&body).await.text().await.unwrap();
    let (data, _) = parse_sse(&text);
    let deltas: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"].clone())
        .collect();
    let said = |field: &str| deltas.iter().find_map(|d| d.get(field).cloned());
    assert_eq!(
        said("refusal"),
        Some(json!("I cannot help with that.")),
        "{text}"
    );
    let annotations = said("annotations").expect("annotations");
    assert_eq!(annotations[0]["url_citation"]["url"], "https://a.example");
}

#[tokio::test]
async fn the_fusion_tool_checks_the_messages_before_any_call() {
    let app = spawn_app().await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![Reply::ToolCall("fusion".into(), json!({"prompt": "x"}))],
    );
    for messages in [None, Some(json!([])), Some(json!("hi"))] {
        let mut body = json!({"model": "outer", "tools": [{"type": "fusion"}]});
        if let Some(m) = &messages {
            body["messages"] = m.clone();
        }
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400, "{messages:?}");
        let error: Value = resp.json().await.unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    assert_eq!(app.fake.calls("outer", Kind::Panel), 0);
}

#[tokio::test]
async fn the_fusion_tool_runs_a_job_and_hands_the_answer_back_to_the_outer_model() {
    let app = spawn_app().await;
    app.fake.outer_calls_fusion_once();
    let body = json!({
        "model": "outer",
        "messages": [{"role": "user", "content": "Ask the panel about the sky."}],
        "tools": [{"type": "fusion", "fusion": {"analysis_models": ["m1", "m2"], "model": "judge"}}],
        "tool_choice": "required",
    });
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let job_id = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "outer model's reply"
    );
    assert_eq!(reply["fusion_job_ids"], json!([job_id]));
    // Two outer calls and a four-call fusion job, all in the usage.
    assert_eq!(reply["usage"]["total_tokens"], 90);
    assert_eq!(app.fake.calls("outer", Kind::Panel), 2);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1);
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);

    let outer = outer_bodies(&app);
    assert_eq!(outer[0]["tools"][0]["function"]["name"], "fusion");
    assert_eq!(outer[0]["tool_choice"], "required");
    assert_eq!(
        outer[1]["tool_choice"], "auto",
        "forcing again would loop forever"
    );
    let tool_msg = outer[1]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(tool_msg["role"], "tool");
    assert_eq!(tool_msg["tool_call_id"], "call_1");
    assert_eq!(tool_msg["content"], "the fused final answer");
    let job = app.get_job(&job_id).await;
    assert_eq!(job["panel"][0]["model"], "m1");
}

#[tokio::test]
async fn a_fusion_call_inside_a_fusion_run_is_refused() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.address))
        .header("x-fusion-depth", "1")
        .json(&body_with_panel(&["m1"], "judge"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "fusion_recursion");
    // Our own upstream calls carry the header, so a fusion server upstream would refuse too.
    app.chat(&body_with_panel(&["m1"], "judge")).await;
    assert_eq!(app.fake.total_calls(), 3);
    assert_eq!(app.fake.calls_with_depth_header(), 3);
    let resp = app.chat(&body_with_panel(&["m1", "fusion"], "judge")).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        app.fake.total_calls(),
        3,
        "no call was made for the refused request"
    );
}

#[tokio::test]
async fn the_models_list_names_every_fusion_preset() {
    let app = spawn_app().await;
    let resp = app.get("/v1/models").await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["fusion", "fusion/budget", "fusion/fast", "fusion/quality"]
    );
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_cancel_the_job() {
    let app = spawn_app().await;
    app.fake.script(
        "slow",
        Kind::Panel,
        vec![Reply::Delay(800, Box::new(Reply::Ok))],
    );
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let gone = impatient
        .post(format!("{}/v1/chat/completions", app.address))
        .json(&body_with_panel(&["slow"], "judge"))
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout());
    let list = app.list_jobs("").await;
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    let job = app.wait_final(&id, 10).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(
        job["result"]["choices"][0]["message"]["content"],
        "the fused final answer"
    );
}

#[tokio::test]
async fn a_model_name_with_a_control_character_is_refused_before_any_stream() {
    let app = spawn_app().await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "x\ny", "messages": msgs, "plugins": [{"id": "fusion"}]}),
            "`model`",
        ),
        (
            json!({"model": "fusion", "messages": msgs,
                   "plugins": [{"id": "fusion", "model": "ju\rdge"}]}),
            "`plugins[fusion].model`",
        ),
        (
            json!({"model": "fusion", "messages": msgs,
                   "plugins": [{"id": "fusion", "analysis_models": ["m1", "x\ny"]}]}),
            "`plugins[fusion].analysis_models[1]`",
        ),
        (
            json!({"model": "fusion", "messages": msgs,
                   "plugins": [{"id": "fusion", "analysis_models": ["a\u{7}b"]}]}),
            "`plugins[fusion].analysis_models[0]`",
        ),
    ];
    for (body, field) in cases {
        // Streamed, a newline in a progress comment used to kill the stream's task.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        for (body, path) in [(streamed, "/v1/chat/completions"), (body, "/v1/jobs")] {
            let resp = app
                .client
                .post(format!("{}{path}", app.address))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path} {body}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "invalid_request", "{err:#}");
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains(field) && msg.contains("control character"),
                "`{msg}` should name {field} and say what is wrong"
            );
        }
    }
    assert_eq!(app.fake.total_calls(), 0);
}

#[tokio::test]
async fn a_tool_choice_naming_the_fusion_function_forces_only_the_first_round() {
    let app = spawn_app().await;
    app.fake.outer_calls_fusion_once();
    let forced = json!({"type": "function", "function": {"name": "fusion"}});
    let body = json!({
        "model": "outer",
        "messages": [{"role": "user", "content": "Ask the panel about the sky."}],
        "tools": [{"type": "fusion", "fusion": {"analysis_models": ["m1"], "model": "judge"}}],
        "tool_choice": forced,
    });
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "outer model's reply"
    );
    assert_eq!(reply["fusion_job_ids"].as_array().unwrap().len(), 1);
    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 2);
    assert_eq!(outer[0]["tool_choice"], forced);
    assert_eq!(
        outer[1]["tool_choice"], "auto",
        "forcing again would run a paid fusion job every round"
    );
}

#[tokio::test]
async fn a_failed_or_cancelled_job_tells_openai_sdks_not_to_retry() {
    let app = spawn_app().await;
    // The SDKs retry 409, 429 and 5xx by default: each retry would be a new, paid job.
    app.fake
        .script("down", Kind::Panel, vec![Reply::Status(401)]);
    let resp = app.chat(&body_with_panel(&["down"], "judge")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-should-retry"], "false");

    app.fake.script(
        "slow",
        Kind::Panel,
        vec![Reply::Delay(10_000, Box::new(Reply::Ok))],
    );
    let waiting = tokio::spawn({
        let (client, url) = (
            app.client.clone(),
            format!("{}/v1/chat/completions", app.address),
        );
        async move {
            client
                .post(url)
                .json(&body_with_panel(&["slow"], "judge"))
                .send()
                .await
                .unwrap()
        }
    });
    let mut id = None;
    until("a running job", async || {
        let list = app.list_jobs("status=running").await;
        id = list["data"][0]["id"].as_str().map(str::to_string);
        id.is_some()
    })
    .await;
    let id = id.unwrap();
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/cancel")).await.status(),
        200
    );
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "job_cancelled");

    // An error before any job exists names none; as every 4xx but 408 and 429, it is not to
    // be resent as it is.
    let resp = app.chat(&json!({"model": "fusion", "messages": []})).await;
    assert_eq!(resp.status(), 400);
    assert!(!resp.headers().contains_key("x-fusion-job-id"));
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

#[tokio::test]
async fn a_failed_job_answers_with_its_failure_reason_as_the_code() {
    let app = spawn_app().await;
    app.fake
        .script("judge", Kind::Final, vec![Reply::Status(401)]);
    let resp = app.chat(&body_with_panel(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 502);
    let id = resp.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(app.get_job(&id).await["failure_reason"], "upstream_auth");
    assert_eq!(body["error"]["code"], "upstream_auth", "{body:#}");
    assert_eq!(body["error"]["type"], "api_error");

    // Streamed, the same error object comes as the last data before [DONE].
    let mut streamed = body_with_panel(&["m1"], "judge");
    streamed["stream"] = json!(true);
    let text = app.chat(&streamed).await.text().await.unwrap();
    let (data, _) = parse_sse(&text);
    assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "upstream_auth", "{err:#}");
    assert_eq!(err["error"]["type"], "api_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("failed"));
}

// An OpenAI SDK that gave up waiting (its timeout, a proxy's idle cut) sends the call again with
// `x-stainless-retry-count` and no idempotency key: the retry waits on the job the first try
// made, rather than starting and paying for another while the first runs on. A first try, or a
// client that is not retrying, starts a job of its own.
#[tokio::test]
async fn an_sdk_retry_waits_on_the_job_its_first_try_made() {
    let (app, body) = slow_panel_app().await;
    let call = |retry: Option<&'static str>, timeout: Duration| {
        let mut req = app
            .client
            .post(format!("{}/v1/chat/completions", app.address))
            .header("x-stainless-timeout", "1")
            .json(&body)
            .timeout(timeout);
        if let Some(n) = retry {
            req = req.header("x-stainless-retry-count", n);
        }
        req.send()
    };
    let first = call(Some("0"), Duration::from_millis(300)).await;
    assert!(first.is_err(), "the first try was meant to time out");
    let retried = call(Some("1"), Duration::from_secs(10)).await.unwrap();
    assert_eq!(retried.status(), 200);
    let job = retried.headers()["x-fusion-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let listed = app.list_jobs("").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed["data"][0]["id"], job.as_str());
    assert_eq!(app.fake.calls("slow", Kind::Panel), 1);

    // Not a retry (no header, or a first try): a job of its own, the same body or not.
    for retry in [None, Some("0")] {
        let resp = call(retry, Duration::from_secs(10)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_ne!(resp.headers()["x-fusion-job-id"], job.as_str());
    }
    assert_eq!(app.list_jobs("").await["data"].as_array().unwrap().len(), 3);
}

// A retry joins only a job that was still running when its last try gave up: a job that had
// finished before then would have answered that try. Here the same request was asked on
// purpose 20 s before a retry arrives (a retry whose first try made no job: refused, or never
// arrived), and that job is not joined; one finished within the SDKs' backoff is.
#[tokio::test]
async fn an_sdk_retry_does_not_join_a_job_that_finished_before_its_try_gave_up() {
    let clock = Arc::new(Shifted::new(Arc::new(SystemClock), 0));
    let app = spawn_app_with(Options {
        host_clock: Some(clock.clone()),
        ..Options::default()
    })
    .await;
    let body = body_with_panel(&["m1"], "judge");
    let retry = || {
        app.client
            .post(format!("{}/v1/chat/completions", app.address))
            .header("x-stainless-retry-count", "1")
            .json(&body)
            .send()
    };
    let job_of = |resp: &reqwest::Response| {
        assert_eq!(resp.status(), 200);
        resp.headers()["x-fusion-job-id"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let earlier = job_of(&app.chat(&body).await);
    clock.advance(20_000);
    let retried = job_of(&retry().await.unwrap());
    assert_ne!(retried, earlier, "joined a job finished 20 s before");
    let again = job_of(&retry().await.unwrap());
    assert_eq!(again, retried, "a job finished just now is the retry's own");
    assert_eq!(app.fake.calls("m1", Kind::Panel), 2);
}

// `allowed_tools` in `required` mode with the fusion tool allowed forces the first call only,
// as `"required"` does: later rounds keep the list in `auto` mode (forced, each round would run
// another paid job), the list names the fusion tool as the function the upstream is offered,
// and out of rounds the fusion function leaves the list (here emptied: no tool may be called).
#[tokio::test]
async fn an_allowed_tools_choice_forces_the_fusion_tool_once() {
    let app = spawn_app().await;
    let call = Reply::ToolCall("fusion".into(), json!({"prompt": "Again?"}));
    app.fake.script("outer", Kind::Panel, vec![call; 5]);
    let mut body = body_with_tool(&["m1"], "judge");
    let weather_tool = json!({"type": "function", "function": {"name": "weather"}});
    body["tools"].as_array_mut().unwrap().push(weather_tool);
    body["tool_choice"] = json!({"type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "fusion"}]}});
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let outer = outer_bodies(&app);
    assert_eq!(outer.len(), 5);
    let fusion_ref = json!([{"type": "function", "function": {"name": "fusion"}}]);
    let first = &outer[0]["tool_choice"]["allowed_tools"];
    assert_eq!(first["mode"], "required", "{:#}", outer[0]);
    assert_eq!(first["tools"], fusion_ref, "{:#}", outer[0]);
    for later in &outer[1..4] {
        let allowed = &later["tool_choice"]["allowed_tools"];
        assert_eq!(allowed["mode"], "auto", "{later:#}");
        assert_eq!(allowed["tools"], fusion_ref, "{later:#}");
    }
    assert_eq!(outer[4]["tool_choice"], "none", "{:#}", outer[4]);
}

/// A completion with usage details, as OpenAI's reasoning models answer.
const DETAILED_USAGE: &str = r#"{"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
 "model": "outer", "choices": [{"index": 0, "finish_reason": "stop",
 "message": {"role": "assistant", "content": "answered alone"}}],
 "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
           "prompt_tokens_details": {"cached_tokens": 3},
           "completion_tokens_details": {"reasoning_tokens": 4}}}"#;

// What the OpenAI SDKs read besides the body: every answer's `x-request-id` (`_request_id`,
// and on errors), ours or, relayed, the upstream's; `error.param`, null when no field is at
// fault; and `client.models.retrieve`. Before, none of these was there.
#[tokio::test]
async fn answers_carry_what_the_openai_sdks_read() {
    let app = spawn_app().await;
    let ok = app.chat(&body_with_panel(&["m1"], "judge")).await;
    assert_eq!(ok.status(), 200);
    let ours = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(ours.starts_with("req_") && ours.len() == 36, "{ours}");
    let missing = app.get("/v1/nowhere").await;
    assert_eq!(missing.status(), 404);
    let other = missing.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(other.starts_with("req_") && other != ours, "{other}");
    let body: Value = missing.json().await.unwrap();
    assert!(
        body["error"].as_object().unwrap().contains_key("param"),
        "{body}"
    );
    assert_eq!(body["error"]["param"], Value::Null);

    app.fake.script(
        "vendor/raw",
        Kind::Panel,
        vec![Reply::RawOk(DETAILED_USAGE)],
    );
    let relayed = app
        .chat(&json!({"model": "vendor/raw", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(relayed.status(), 200);
    assert_eq!(relayed.headers()["x-request-id"], "req_fake_raw");

    let retrieve = async |id: &str| {
        let resp = app.get(&format!("/v1/models/{id}")).await;
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    for id in ["fusion", "fusion/budget"] {
        let (status, model) = retrieve(id).await;
        assert_eq!(
            (status, &model["id"], &model["object"]),
            (200, &json!(id), &json!("model"))
        );
    }
    let (status, error) = retrieve("gpt-4o").await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (404, &json!("model_not_found"))
    );
    let (status, error) = retrieve("%FF").await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (400, &json!("invalid_model"))
    );
}

// `stream_options` only with `stream: true`, and `include_usage` a boolean, as OpenAI answers;
// before, both were taken and usage quietly left out.
#[tokio::test]
async fn stray_stream_options_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let mut unstreamed = body_with_panel(&["m1"], "judge");
    unstreamed["stream_options"] = json!({"include_usage": true});
    let mut not_boolean = body_with_panel(&["m1"], "judge");
    not_boolean["stream"] = json!(true);
    not_boolean["stream_options"] = json!({"include_usage": "yes"});
    let mut tool = body_with_tool(&["m1"], "judge");
    tool["stream_options"] = json!({"include_usage": true});
    for body in [unstreamed, not_boolean, tool] {
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], "stream_options", "{error}");
    }
    assert_eq!(app.fake.total_calls(), 0);
    let mut fine = body_with_panel(&["m1"], "judge");
    fine["stream"] = json!(true);
    fine["stream_options"] = json!({"include_usage": false});
    assert_eq!(app.chat(&fine).await.status(), 200);
}

// The fusion tool's outer model answering at once (no job): its own usage comes back whole,
// cached and reasoning token details too (before, a sum of four counts replaced it). Rate
// limited, its `Retry-After` is passed on, for the SDK to wait as long (before, none was).
#[tokio::test]
async fn the_fusion_tools_outer_model_keeps_its_usage_details_and_its_retry_after() {
    let app = spawn_app().await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![
            Reply::RawOk(DETAILED_USAGE),
            Reply::RateLimited(7),
            Reply::RateLimited(u64::MAX),
        ],
    );
    let resp = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "answered alone");
    assert_eq!(reply["usage"]["total_tokens"], 12, "{reply:#}");
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    assert_eq!(
        reply["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
    assert_eq!(reply["fusion_job_ids"], json!([]));

    let limited = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    // At most the 300 s a step would wait out (before, this one overflowed).
    let limited = app.chat(&body_with_tool(&["m1"], "judge")).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "300");

    // Streamed, the reply is rebuilt from its text and calls: what it would drop is refused,
    // naming the field.
    for (field, value) in [
        ("logprobs", json!(true)),
        ("modalities", json!(["text", "audio"])),
    ] {
        let mut body = body_with_tool(&["m1"], "judge");
        body["stream"] = json!(true);
        body[field] = value;
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400, "{field}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], field, "{error}");
    }
}

// The gateway forwards a body's keys in the order the client wrote them: a strict schema's
// properties (written by the provider in that order) and the request's own fields. Before, the
// body was read into a sorted map, so `answer` went before `reasoning`.
#[tokio::test]
async fn the_gateway_keeps_the_order_of_a_bodys_keys() {
    let app = spawn_app().await;
    let schema = json!({"type": "object", "properties": {"reasoning": {"type": "string"},
                                                         "answer": {"type": "string"}}});
    let body = json!({"model": "vendor/raw", "messages": [{"role": "user", "content": "hi"}],
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "r", "schema": schema}},
                      "max_tokens": 5});
    let relayed = app.chat(&body).await;
    assert_eq!(relayed.status(), 200);
    let bodies = app.fake.bodies();
    let sent = bodies.iter().find(|b| b["model"] == "vendor/raw").unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(sent),
        ["model", "messages", "response_format", "max_tokens"],
        "{sent}"
    );
    let properties = &sent["response_format"]["json_schema"]["schema"]["properties"];
    assert_eq!(keys(properties), ["reasoning", "answer"], "{sent}");
}

// A relayed body's `stream` is the upstream's to judge, as the rest of it is: before, one that
// was not a boolean got our 400 and never reached it.
#[tokio::test]
async fn the_gateway_leaves_a_bodys_stream_field_to_the_upstream() {
    let app = spawn_app().await;
    let body = json!({"model": "vendor/raw", "messages": [{"role": "user", "content": "hi"}],
                      "stream": "true"});
    assert_eq!(app.chat(&body).await.status(), 200);
    let bodies = app.fake.bodies();
    let sent = bodies.iter().find(|b| b["model"] == "vendor/raw").unwrap();
    assert_eq!(sent["stream"], "true", "{sent}");
}

// A provider refusing this server's credentials (its key, or a proxy's login on the way) is
// this server's problem, as on the fusion tool's path: relayed as it came, a 401 made the
// client's SDK raise an authentication error about its own key, which is fine. Its message
// passes on; other errors still pass on as they came.
#[tokio::test]
async fn a_relayed_refusal_of_the_servers_credentials_is_a_bad_gateway() {
    let app = spawn_app().await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    for status in [401, 403, 407] {
        app.fake
            .script("vendor/locked", Kind::Panel, vec![Reply::Status(status)]);
        let resp = app
            .chat(&json!({"model": "vendor/locked", "messages": hi}))
            .await;
        assert_eq!(resp.status(), 502, "{status}");
        // Not resent by the SDKs: the same refusal would come back, each try a call.
        assert_eq!(resp.headers()["x-should-retry"], "false", "{status}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_auth", "{status}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("upstream answered {status}: ")),
            "{message}"
        );
    }
    app.fake
        .script("vendor/locked", Kind::Panel, vec![Reply::Status(400)]);
    let resp = app
        .chat(&json!({"model": "vendor/locked", "messages": hi}))
        .await;
    assert_eq!(resp.status(), 400);
}

// A relayed call whose upstream says nothing within the upstream timeout is a gateway's
// timeout, `504 upstream_timeout`, not `502 upstream_unreachable`: it was reached, and a
// client may well try again. One that cannot be reached stays 502.
#[tokio::test]
async fn a_relayed_call_past_the_timeout_is_a_gateway_timeout() {
    let app = spawn_app_with(Options {
        toml: "[upstream]\ntimeout_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    app.fake.script(
        "vendor/slow",
        Kind::Panel,
        vec![Reply::Delay(3_000, Box::new(Reply::Ok))],
    );
    let hi = json!([{"role": "user", "content": "hi"}]);
    let resp = app
        .chat(&json!({"model": "vendor/slow", "messages": hi}))
        .await;
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");

    let closed = crate::restart::free_port();
    let app = spawn_app_with(Options {
        upstream_url: Some(format!("http://127.0.0.1:{closed}/v1")),
        ..Options::default()
    })
    .await;
    let resp = app
        .chat(&json!({"model": "vendor/slow", "messages": hi}))
        .await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
}

// A server whose upstream leads back to itself (a base URL mistyped as its own address, two
// servers pointed at each other) relays a plain model's request round and round. Each server
// now counts itself in `x-fusion-depth`, and the eighth refuses with `508 relay_loop`, which
// passes back out and is not resent; a job's panel call going round the same loop fails for
// good, not tried again. Before, the request went round until some hop failed (here, after
// ~4 s, a `502` reached the client).
#[tokio::test]
async fn a_relay_that_leads_back_to_its_own_server_ends_as_a_loop() {
    use crate::restart::{Server, free_port, get_job};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let itself = format!("http://127.0.0.1:{port}/v1");
    let server = Server::start(&dir.path().join("fusion.db"), &itself, port).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let hi = json!([{"role": "user", "content": "hi"}]);
    let resp = client
        .post(format!("{}/v1/chat/completions", server.address))
        .json(&json!({"model": "vendor/x", "messages": hi}))
        .send()
        .await
        .expect("an answer, not a request going round for good");
    assert_eq!(resp.status(), 508);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "relay_loop", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("relayed through 8 fusion servers"),
        "{message}"
    );

    let resp = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&body_with_panel(&["vendor/x"], "vendor/judge"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let job = loop {
        let job = get_job(&client, &server, &id).await;
        if job["status"] == "failed" {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["attempt"], 1, "{job:#}");
    let error = job["panel"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("upstream answered 508"), "{job:#}");
}

// The hop count a client sends is read as a number of hops: garbled, it is refused as a bad
// header rather than taken as none.
#[tokio::test]
async fn a_garbled_hop_count_is_a_bad_request() {
    let app = spawn_app().await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.address))
        .header("x-fusion-depth", "many")
        .json(&json!({"model": "vendor/x", "messages": hi}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_header", "{body}");
    assert_eq!(app.fake.total_calls(), 0);
}

// A 403 that is the provider's moderation refusing the input (OpenRouter's, its reasons in the
// metadata) is the request's fault, not a refusal of this server's key: relayed as a 403 with
// its message, and a job's panel member refused so fails as `upstream_error`, not
// `upstream_auth`. Before, both said this server's credentials were refused.
#[tokio::test]
async fn a_moderation_refusal_is_not_taken_for_a_refused_key() {
    let app = spawn_app().await;
    app.fake
        .script("vendor/strict", Kind::Panel, vec![Reply::Flagged]);
    let hi = json!([{"role": "user", "content": "hi"}]);
    let resp = app
        .chat(&json!({"model": "vendor/strict", "messages": hi}))
        .await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("Input flagged by moderation"), "{message}");

    let id = app
        .submit_ok(&body_with_panel(&["vendor/strict", "m2"], "judge"))
        .await;
    let job = app.wait_final(&id, 20).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let refused = &job["panel"][0];
    assert_eq!(refused["error_code"], "upstream_error", "{job:#}");
    assert_eq!(app.fake.calls("vendor/strict", Kind::Panel), 2);
}
