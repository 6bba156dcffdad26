//! Bad input gets a precise 4xx with the shared error body, never a 500.

use serde_json::{Value, json};

use crate::helpers::{Options, spawn_api_only, spawn_app_with};

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body:#}");
    assert!(body["error"]["type"].is_string());
    body["error"]["message"].as_str().unwrap().to_string()
}

// A body whose JSON tree would weigh ~50 times its text (4 MiB of tiny objects, ~200 MiB parsed)
// is refused before it is parsed, on every route that reads JSON, and so is a flat array of
// numbers past the count of values; at the limit, a body is read.
#[tokio::test]
async fn a_body_of_too_many_json_objects_is_refused_unparsed() {
    let app = spawn_api_only().await;
    let parts = |n: usize| {
        let parts: Vec<Value> = (0..n).map(|_| json!({"type": "a"})).collect();
        json!({"model": "fusion", "messages": [{"role": "user", "content": parts}]})
    };
    for path in ["/v1/jobs", "/v1/chat/completions"] {
        let resp = app
            .client
            .post(format!("{}{path}", app.address))
            .json(&parts(300_000))
            .send()
            .await
            .unwrap();
        let message = expect_error(resp, 400, "body_too_complex").await;
        assert!(message.contains("300002 JSON objects"), "{message}");
    }
    let numbers = json!({"model": "fusion", "messages": [], "n": vec![1; 200_000]});
    let message = expect_error(app.submit(&numbers).await, 400, "body_too_complex").await;
    assert!(
        message.contains("at most 20000 objects and 200000 values"),
        "{message}"
    );
    // 20,000 objects in all: read, and the job made.
    let resp = app.submit(&parts(20_000 - 2)).await;
    assert_eq!(resp.status(), 202);
}

#[tokio::test]
async fn bad_requests_are_4xx_with_precise_messages() {
    let app = spawn_api_only().await;
    let url = format!("{}/v1/jobs", app.address);
    let raw = |body: &'static str| {
        app.client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(raw("{not json").await.unwrap(), 400, "invalid_json").await;
    let no_type = app.client.post(&url).body("{}").send().await.unwrap();
    expect_error(no_type, 415, "invalid_content_type").await;

    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "fusion/unknown", "messages": msgs}),
            "unknown_preset",
            "unknown",
        ),
        (
            json!({"model": "fusion", "messages": []}),
            "empty_messages",
            "messages",
        ),
        (
            json!({"model": "fusion"}),
            "invalid_request",
            "`messages` is required",
        ),
        (
            json!({"model": "gpt-4o", "messages": msgs}),
            "model_not_fusion",
            "gpt-4o",
        ),
        (
            json!({"model": "fusion", "messages": msgs,
                   "plugins": [{"id": "fusion", "analysis_models": ["a","b","c","d","e","f","g","h","i"]}]}),
            "panel_too_large",
            "at most 8",
        ),
        (
            json!({"model": "fusion", "messages": msgs, "priority": "high"}),
            "invalid_request",
            "priority",
        ),
        // Messages no model would take: refused before any call is paid for.
        (
            json!({"model": "fusion", "messages": [{"role": "tool", "content": "x"}]}),
            "invalid_request",
            "`messages[0].tool_call_id` is required",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "function", "content": "x"}]}),
            "invalid_request",
            "`messages[0].name` is required",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "critic", "content": "x"}]}),
            "invalid_request",
            "expected one of system, developer, user, assistant, tool, function",
        ),
        (
            json!({"model": "fusion", "messages": [msgs[0], {"role": "assistant"}]}),
            "invalid_request",
            "`messages[1]` is an assistant message with neither `content` nor `tool_calls`",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "assistant", "tool_calls": []}]}),
            "invalid_request",
            "neither `content` nor `tool_calls`",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": []}]}),
            "invalid_request",
            "`messages[0].content` is an empty array",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "invalid_request",
            "`messages[0].content[0].text` must be a string",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": ["hi"]}]}),
            "invalid_request",
            "`messages[0].content[0]` must be an object with a string `type`",
        ),
        // OpenAI's own part kinds in OpenAI's shape: refused at submit, not as a 502 after
        // every panel model refused them.
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": "https://example.com/a.png"}]}]}),
            "invalid_request",
            "`messages[0].content[1].image_url` must be an object with a string `url`",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]}),
            "invalid_request",
            "`messages[0].content[0].input_audio` must be an object with a string `data` and `format`",
        ),
        (
            json!({"model": "fusion", "messages": [{"role": "user", "content": [
                {"type": "file", "file": "f.pdf"}]}]}),
            "invalid_request",
            "`messages[0].content[0].file` must be an object",
        ),
        (
            json!({"model": "fusion", "messages": msgs, "stream": "true"}),
            "invalid_request",
            "`stream` must be a boolean",
        ),
        (
            json!({"model": "x".repeat(201), "messages": msgs,
                   "plugins": [{"id": "fusion", "analysis_models": ["a", "b"]}]}),
            "invalid_request",
            "`model` must be a model name (1 to 200 characters)",
        ),
    ];
    // An assistant message may stand without content when it carries what the OpenAI SDKs
    // hand back in its place: a refusal, an audio reply.
    for instead in [
        json!({"refusal": "I can't help with that."}),
        json!({"audio": {"id": "a1"}}),
    ] {
        let mut assistant = json!({"role": "assistant", "content": null});
        assistant
            .as_object_mut()
            .unwrap()
            .extend(instead.as_object().unwrap().clone());
        let body = json!({"model": "fusion", "messages": [msgs[0], assistant, msgs[0]]});
        let resp = app.submit(&body).await;
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    // Media parts in OpenAI's shapes: an image with its `detail`, a file by its id, audio; and
    // a provider's own kind of part, which goes as sent.
    let parts = json!([
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "low"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/c.mp4"}},
    ]);
    let body = json!({"model": "fusion", "messages": [{"role": "user", "content": parts}]});
    let resp = app.submit(&body).await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    for (body, code, needle) in cases {
        let msg = expect_error(app.submit(&body).await, 400, code).await;
        assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    }

    let get = |path: String| app.client.get(format!("{}{path}", app.address)).send();
    let unknown = uuid::Uuid::now_v7();
    expect_error(
        get(format!("/v1/jobs/{unknown}")).await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        get("/v1/jobs/nope".into()).await.unwrap(),
        400,
        "invalid_job_id",
    )
    .await;
    // Not UTF-8 once decoded: the same error body, on every route that takes an id.
    expect_error(
        get("/v1/jobs/%FF".into()).await.unwrap(),
        400,
        "invalid_job_id",
    )
    .await;
    for action in ["cancel", "retry"] {
        let resp = app.post(&format!("/v1/jobs/%FF/{action}")).await;
        expect_error(resp, 400, "invalid_job_id").await;
        let resp = app.post(&format!("/v1/jobs/nope/{action}")).await;
        expect_error(resp, 400, "invalid_job_id").await;
    }
    expect_error(
        get("/v1/jobs?status=done".into()).await.unwrap(),
        400,
        "invalid_status",
    )
    .await;
    expect_error(
        get("/v1/jobs?limit=0".into()).await.unwrap(),
        400,
        "invalid_limit",
    )
    .await;
    expect_error(
        get("/v1/jobs?limit=x".into()).await.unwrap(),
        400,
        "invalid_query",
    )
    .await;
    let message = expect_error(
        get("/v1/jobs?after=abc".into()).await.unwrap(),
        400,
        "invalid_cursor",
    )
    .await;
    assert!(
        message.starts_with("`after` must be a page's `next_cursor`"),
        "{message}"
    );
    // An unknown parameter is refused, not ignored (a loop paging with `cursor=` would get the
    // first page for ever); empty ones are as if left out.
    let message = expect_error(
        get("/v1/jobs?cursor=abc".into()).await.unwrap(),
        400,
        "invalid_query",
    )
    .await;
    assert!(message.contains("unknown field `cursor`"), "{message}");
    let first_page = get("/v1/jobs?status=&limit=&after=".into()).await.unwrap();
    assert_eq!(first_page.status(), 200);
    expect_error(get("/v2/nothing".into()).await.unwrap(), 404, "not_found").await;
    expect_error(
        app.post(&format!("/v1/jobs/{unknown}/cancel")).await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        app.post(&format!("/v1/jobs/{unknown}/retry")).await,
        404,
        "not_found",
    )
    .await;
}

/// A body of `size` bytes that is one valid job request (the bulk in one message).
fn body_of_size(size: usize) -> String {
    let head = r#"{"model": "fusion", "messages": [{"role": "user", "content": ""#;
    let tail = r#""}]}"#;
    let filler = "x".repeat(size - head.len() - tail.len());
    format!("{head}{filler}{tail}")
}

#[tokio::test]
async fn bodies_up_to_4_mib_are_taken_and_larger_ones_get_the_json_413() {
    let app = spawn_api_only().await;
    let url = format!("{}/v1/jobs", app.address);
    const LIMIT: usize = 4 * 1024 * 1024;
    let post = |body: reqwest::Body| {
        app.client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Above axum's own 2 MiB default for `Json`, below the documented limit.
    let resp = post(body_of_size(3 * 1024 * 1024).into()).await.unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let resp = post(body_of_size(LIMIT).into()).await.unwrap();
    assert_eq!(resp.status(), 202, "exactly the limit is allowed");

    // Over it, with a Content-Length and sent chunked without one: the same JSON error.
    let over = body_of_size(LIMIT + 1);
    let msg = expect_error(
        post(over.clone().into()).await.unwrap(),
        413,
        "body_too_large",
    )
    .await;
    assert!(msg.contains("4 MiB"), "`{msg}` should name the limit");
    let chunks: Vec<Result<String, std::io::Error>> = over
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    expect_error(post(chunked).await.unwrap(), 413, "body_too_large").await;
}

// `[server] max_body_mib` moves the limit: with 5, a 4.5 MiB body (an image or two in base64,
// over the default) is taken, and one over 5 MiB gets the 413 naming 5 MiB, declared or not.
#[tokio::test]
async fn the_body_limit_is_the_servers_max_body_mib() {
    let app = spawn_app_with(Options {
        workers: false,
        toml: "[server]\nmax_body_mib = 5\n".into(),
        ..Options::default()
    })
    .await;
    let post = |body: String, chunked: bool| {
        let body = match chunked {
            false => reqwest::Body::from(body),
            true => {
                reqwest::Body::wrap_stream(futures::stream::iter([Ok::<_, std::io::Error>(body)]))
            }
        };
        app.client
            .post(format!("{}/v1/jobs", app.address))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = post(body_of_size(9 << 19), false).await.unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    for chunked in [false, true] {
        let resp = post(body_of_size((5 << 20) + 1), chunked).await.unwrap();
        let msg = expect_error(resp, 413, "body_too_large").await;
        assert!(msg.contains("5 MiB"), "`{msg}` should name the limit");
    }
}

#[tokio::test]
async fn a_wrong_method_on_a_known_route_is_a_json_405() {
    let app = spawn_api_only().await;
    let resp = app
        .client
        .get(format!("{}/v1/chat/completions", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "POST");
    let msg = expect_error(resp, 405, "method_not_allowed").await;
    assert!(
        msg.contains("GET") && msg.contains("/v1/chat/completions"),
        "`{msg}` should name the method and the path"
    );
    let resp = app
        .client
        .delete(format!("{}/v1/jobs", app.address))
        .send()
        .await
        .unwrap();
    expect_error(resp, 405, "method_not_allowed").await;
}
