//! The fusion tool's request, checked before the outer model is called (each call is paid): its
//! settings as a job's would be, naming the field in `tools`, and a `tool_choice` the upstream
//! would not understand. OpenRouter's spelling of the tool's type is understood.

use serde_json::{Value, json};

use crate::fake_upstream::{Kind, Reply};
use crate::helpers::{Options, spawn_app, spawn_app_with};

/// A request offering a function of the client's own and then the fusion tool with `settings`.
fn offering(settings: Value) -> Value {
    json!({
        "model": "outer",
        "messages": [{"role": "user", "content": "Ask the panel about the sky."}],
        "tools": [
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
            {"type": "fusion", "fusion": settings},
        ],
    })
}

#[tokio::test]
async fn the_fusion_tools_settings_are_checked_before_any_call() {
    let app = spawn_app().await;
    app.fake.script(
        "outer",
        Kind::Panel,
        vec![Reply::ToolCall("fusion".into(), json!({"prompt": "x"}))],
    );
    let cases = [
        (
            json!({"preset": "nope"}),
            "`tools[1].fusion.preset`",
            "unknown preset",
        ),
        (
            json!({"preset": "bu\ndget"}),
            "`tools[1].fusion.preset`",
            "control character",
        ),
        (json!({"preset": 3}), "`tools[1].fusion.preset`", "string"),
        (
            json!({"model": "ju\rdge"}),
            "`tools[1].fusion.model`",
            "control character",
        ),
        (
            json!({"analysis_models": "m1"}),
            "`tools[1].fusion.analysis_models`",
            "array",
        ),
        (
            json!({"min_panel": 0}),
            "`tools[1].fusion.min_panel`",
            "integer",
        ),
        (json!({"prset": "budget"}), "`prset`", "unknown field"),
        // A plugin's `id` says which plugin it is; on the tool it would be ignored.
        (json!({"id": "fusion"}), "`id`", "unknown field"),
        (json!("budget"), "`tools[1].fusion`", "object"),
    ];
    for (settings, field, says) in cases {
        let resp = app.chat(&offering(settings.clone())).await;
        assert_eq!(resp.status(), 400, "{settings}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field) && message.contains(says),
            "`{message}` should name {field} and say {says}"
        );
    }
    assert_eq!(app.fake.calls("outer", Kind::Panel), 0);
    // Settings that parse are not refused.
    let resp = app
        .chat(&offering(json!({"preset": "budget", "min_panel": 1})))
        .await;
    assert_eq!(resp.status(), 200);
}

// Two fusion tools (the second's settings would be ignored), or a function of the client's own
// named `fusion` (its calls would be run as fusion jobs): refused before any call.
#[tokio::test]
async fn an_ambiguous_fusion_tool_is_refused_before_any_call() {
    let app = spawn_app().await;
    app.fake.outer_calls_fusion_once();
    let own = json!({"type": "function", "function": {"name": "fusion"}});
    let cases = [
        (
            json!({"type": "fusion", "fusion": {"preset": "quality"}}),
            "`tools[2]` is a second fusion tool",
        ),
        (
            json!({"type": "openrouter:fusion"}),
            "`tools[2]` is a second fusion tool",
        ),
        (own, "`tools[2]` is a function named `fusion`"),
    ];
    for (extra, says) in cases {
        let mut body = offering(json!({"preset": "budget"}));
        body["tools"].as_array_mut().unwrap().push(extra);
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(says), "`{message}` should say {says}");
    }
    assert_eq!(app.fake.total_calls(), 0);
}

#[tokio::test]
async fn a_tool_choice_of_type_fusion_is_refused_before_any_call() {
    let app = spawn_app().await;
    for kind in ["fusion", "openrouter:fusion"] {
        let mut body = offering(json!({}));
        body["tool_choice"] = json!({"type": kind});
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400);
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{{\"type\": \"{kind}\"}}"))
                && message.contains("\"required\""),
            "{message}"
        );
    }
    assert_eq!(app.fake.total_calls(), 0);
}

// Only the first choice's calls would run and the others would hand the client fusion calls;
// a streamed reply, rebuilt from the outer model's text and calls, would drop its logprobs.
#[tokio::test]
async fn what_the_tools_reply_cannot_carry_is_refused_before_any_call() {
    let app = spawn_app().await;
    for (extra, says) in [
        (json!({"n": 2}), "`n` must be 1"),
        (json!({"stream": true, "logprobs": true}), "`logprobs`"),
        (json!({"stream": true, "logprobs": 1}), "`logprobs`"),
    ] {
        let mut body = offering(json!({}));
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let resp = app.chat(&body).await;
        assert_eq!(resp.status(), 400, "{extra}");
        let error: Value = resp.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    assert_eq!(app.fake.total_calls(), 0);
}

// The outer model refusing this server's key is the server's problem: a 401 passed on would
// make the client's SDK raise an authentication error about its own key, which is fine. So is a
// proxy's login on the way out (407, which passed on as the client's before).
#[tokio::test]
async fn the_upstream_refusing_the_servers_key_is_a_bad_gateway() {
    let app = spawn_app().await;
    for status in [401, 403, 407] {
        app.fake
            .script("outer", Kind::Panel, vec![Reply::Status(status)]);
        let resp = app.chat(&offering(json!({}))).await;
        assert_eq!(resp.status(), 502, "{status}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["code"], "upstream_auth", "{error}");
    }
    app.fake
        .script("outer", Kind::Panel, vec![Reply::Status(404)]);
    let resp = app.chat(&offering(json!({}))).await;
    assert_eq!(resp.status(), 404);
}

// An outer model silent past the upstream timeout is a gateway's timeout, as on the gateway's
// own path: `504 upstream_timeout`. Before, it was `502 upstream_error`.
#[tokio::test]
async fn an_outer_model_past_the_timeout_is_a_gateway_timeout() {
    let app = spawn_app_with(Options {
        toml: "[upstream]\ntimeout_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    app.fake.script("outer", Kind::Panel, vec![Reply::Hang]);
    let resp = app.chat(&offering(json!({}))).await;
    assert_eq!(resp.status(), 504);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout", "{error}");
}

// OpenRouter's server tool is `{"type": "openrouter:fusion"}`: a request written for it runs the
// fusion tool here too, rather than reaching the upstream as a tool type it does not know.
#[tokio::test]
async fn openrouters_tool_type_offers_the_fusion_tool() {
    let app = spawn_app().await;
    app.fake.outer_calls_fusion_once();
    let mut body = offering(json!({"analysis_models": ["m1", "m2"], "model": "judge"}));
    body["tools"][1]["type"] = json!("openrouter:fusion");
    body["tool_choice"] = json!("required");
    let resp = app.chat(&body).await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["fusion_job_ids"].as_array().unwrap().len(), 1);
    assert_eq!(app.fake.calls("m1", Kind::Panel), 1);
    assert_eq!(app.fake.calls("judge", Kind::Final), 1);
    let first = app
        .fake
        .bodies()
        .into_iter()
        .find(|b| b["model"] == "outer");
    let tools = first.unwrap()["tools"].clone();
    assert_eq!(tools[1]["function"]["name"], "fusion", "{tools}");
}

// An outer model that cannot be reached is `502 upstream_unreachable`, as on the gateway's own
// path, not the `upstream_error` a status passed on gets: nothing came back.
#[tokio::test]
async fn an_outer_model_not_reached_is_upstream_unreachable() {
    let closed = crate::restart::free_port();
    let app = spawn_app_with(Options {
        upstream_url: Some(format!("http://127.0.0.1:{closed}/v1")),
        ..Options::default()
    })
    .await;
    let resp = app.chat(&offering(json!({}))).await;
    assert_eq!(resp.status(), 502);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_unreachable", "{error}");
}
