//! Whole calls on both clients (the lean one for plain `http://`, and reqwest) against a bare
//! server: the size limit, error bodies, answers that are not HTTP or not JSON, cut-off bodies,
//! odd `usage` fields, credentials in the base URL.

use super::*;
use test_server::{Then, answering, answering_after, chunked, trickling, upstream_at};

fn ask() -> CompletionRequest<'static> {
    CompletionRequest {
        messages: Cow::Owned(vec![json!({"role": "user", "content": "hi"})]),
        ..CompletionRequest::default()
    }
}

/// `complete` takes the lean client (a plain-`http://` upstream); `complete_json` always
/// goes through reqwest. Both, on the same upstream, as usage or an error.
async fn on_both_clients(up: &Upstream) -> [Result<Usage, UpstreamError>; 2] {
    let lean = up.complete("m", &ask()).await.map(|c| c.usage);
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let reqwest = up.complete_json("m", body).await.map(|(_, usage)| usage);
    [lean, reqwest]
}

/// The error of a call that must have failed as `kind` with `status`.
fn failed_as(result: Result<Usage, UpstreamError>, kind: ErrorKind, status: u16) -> UpstreamError {
    let err = result.expect_err("the call fails");
    assert_eq!((err.kind, err.status), (kind, Some(status)), "{err:?}");
    err
}

/// `on_both_clients` against a server answering every call `200` with the JSON `body`.
async fn on_both_clients_answered(body: &str) -> [Result<Usage, UpstreamError>; 2] {
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (base, _) = answering(answer, Then::Close).await;
    on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await
}

// The gateway relays an answer as it comes: one that keeps coming may take longer than the
// timeout (2 s here; 5 events 0.6 s apart take 3 s), and arrives whole. One that stops coming
// for longer than the timeout fails. Before, the timeout bounded the whole answer, and a long
// generation streamed through was cut off mid-answer.
#[tokio::test]
async fn a_relayed_answer_is_bounded_between_reads_not_whole() {
    let every = Duration::from_millis(600);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let up = upstream_at(
        &format!("{}/v1", trickling(5, every, Then::Close).await),
        None,
    );
    let (answer, _) = up.relay("m", body.clone(), 1).await.unwrap();
    let text = answer.text().await.expect("the whole stream");
    assert_eq!(text.matches("data: ").count(), 5, "{text}");

    let up = upstream_at(
        &format!("{}/v1", trickling(1, every, Then::Hold).await),
        None,
    );
    let (answer, _) = up.relay("m", body, 1).await.unwrap();
    let started = Instant::now();
    let stalled = answer.text().await.unwrap_err();
    assert!(stalled.is_timeout(), "{stalled:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

// A completion padded past the limit (an upstream streaming without end would be cut at
// the same point) fails on either client, for good, with the limit in its message.
#[tokio::test]
async fn an_answer_past_the_limit_fails_for_good_on_both_clients() {
    let mut body = test_server::completion("hi", "{}").into_bytes();
    body.resize(20 << 20, b' ');
    let (base, _) = answering(chunked(&body, 64 << 10), Then::Close).await;
    let up = upstream_at(&format!("{base}/v1"), None);
    for result in on_both_clients(&up).await {
        let err = result.expect_err("an answer over the limit is refused");
        assert!(!err.retryable(), "{err:?}");
        assert_eq!(err.message, "upstream answer larger than 16777216 bytes");
    }
}

// A 500 that announces 100 MiB, sends 64 KiB and then nothing is reported as the 500 it is
// at once, on either client, not after the whole-call timeout.
#[tokio::test]
async fn an_error_body_is_read_only_as_far_as_its_message() {
    let mut answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 104857600\r\n\r\n{\"error\": \"overloaded".to_vec();
    answer.resize(answer.len() + (64 << 10), b'.');
    let (base, _) = answering(answer, Then::Hold).await;
    let up = upstream_at(&format!("{base}/v1"), None);
    for result in on_both_clients(&up).await {
        let err = failed_as(result, ErrorKind::Server, 500);
        assert!(
            err.message
                .starts_with("upstream answered 500: {\"error\": \"overloaded...")
        );
    }
}

// A 401 whose body stalls, or breaks, after its start is the 401 it is: final, with what came
// of its message, on either client. Before, it was a timeout or a broken body, both retried:
// the bad key was sent again and again until the attempts ran out.
#[tokio::test]
async fn an_error_whose_body_stalls_or_breaks_is_its_status() {
    let answer = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 1000\r\n\r\n{\"error\": \"bad key";
    for then in [Then::Hold, Then::Close] {
        let (base, _) = answering(answer, then).await;
        let up = upstream_at(&format!("{base}/v1"), None);
        for result in on_both_clients(&up).await {
            let err = failed_as(result, ErrorKind::Auth, 401);
            assert!(!err.retryable());
            assert!(
                err.message
                    .starts_with("upstream answered 401: {\"error\": \"bad key"),
                "{err:?}"
            );
        }
    }
    // Its head late in the call's 2 s, its body then stalled: still the 401, once its own wait
    // is over, on either client (the lean one used to end it as the whole call's timeout).
    let (base, _) = answering_after(Duration::from_millis(1500), answer, Then::Hold).await;
    let up = upstream_at(&format!("{base}/v1"), None);
    for result in on_both_clients(&up).await {
        failed_as(result, ErrorKind::Auth, 401);
    }
}

// Another protocol on the upstream's port answers nothing a retry would make HTTP; a long
// head is HTTP all the same. On either client.
#[tokio::test]
async fn long_heads_are_read_and_answers_that_are_not_http_are_final_on_both_clients() {
    let body = test_server::completion("hi", "{}");
    let pad = "a".repeat(5000);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nx-pad: {pad}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (base, _) = answering(answer, Then::Close).await;
    for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
        result.unwrap();
    }
    let (base, _) = answering(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..], Then::Close).await;
    for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
        let err = result.unwrap_err();
        assert!(!err.retryable(), "{err:?}");
        assert!(
            err.message.contains("not an HTTP/1.1 answer"),
            "{}",
            err.message
        );
    }
}

// A web page where the API was expected (a base URL without its `/v1`, or a web app's):
// no retry makes it a completion. The error says what came back, with no credential the
// page may echo, and points at the base URL. On either client.
#[tokio::test]
async fn a_web_page_in_place_of_a_completion_is_final_on_both_clients() {
    let page = "<!DOCTYPE html>\n<html>\t<body>Sign in at https://sk-live@app.example/ \
                (sent: Bearer sk-1) or https://u:pw@app.example/login</body></html>";
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
        page.len()
    );
    let (base, _) = answering(answer, Then::Close).await;
    let up = upstream_at(&format!("{base}/v1"), Some("sk-1"));
    for result in on_both_clients(&up).await {
        let err = result.unwrap_err();
        assert!(!err.retryable(), "{err:?}");
        assert_eq!(err.status, Some(200));
        let shown = format!(
            "upstream answered 200 (content-type text/html) with a body that is not JSON: \
             `<!DOCTYPE html> <html> <body>Sign in at https://***@app.example/ (sent: Bearer \
             *** or https://u:***@app.example/login</body></html>`; is {base}/v1 the API's \
             base URL (the one under which POST /chat/completions answers)?"
        );
        assert_eq!(err.message, shown);
    }
}

// A body that ends before its JSON does is a cut-off answer, not a wrong server: retried,
// whether the connection was cut inside the announced length or the body had none (ended
// by the close, it reads as whole).
#[tokio::test]
async fn a_completion_cut_off_is_retried_on_both_clients() {
    let start = r#"{"choices": [{"message": {"content": "cut"#;
    for head in [
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
    ] {
        let (base, _) = answering(format!("{head}{start}"), Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
            let err = result.unwrap_err();
            assert_eq!(err.kind, ErrorKind::BadBody, "{err:?}");
            assert!(err.retryable(), "{err:?}");
        }
    }
}

// A model that fails once it has started answers 200 (OpenRouter), its choice ending with
// `finish_reason: "error"` and an `error`, or the error beside the choices: retried like a
// garbled body, the error quoted. Before, text cut short was taken as the answer and
// checkpointed, and an empty one failed for good as an empty completion.
#[tokio::test]
async fn an_error_reported_mid_answer_is_retried_on_both_clients() {
    let bodies = [
        r#"{"choices": [{"message": {"content": "The answer is"}, "finish_reason": "error", "error": {"code": 502, "message": "provider went away"}}]}"#,
        r#"{"choices": [{"message": {"content": ""}, "finish_reason": "error", "error": {"code": 502, "message": "provider went away"}}]}"#,
        r#"{"choices": [{"message": {"content": "The answer is"}, "finish_reason": "stop"}], "error": {"message": "provider went away"}}"#,
        r#"{"choices": [{"message": {"content": "The answer is"}, "finish_reason": "error"}]}"#,
        r#"{"choices": [], "error": {"code": 502, "message": "provider went away"}}"#,
    ];
    for body in bodies {
        // Beside no choice, the error stands for the call, classed by the status it names.
        let kind = match body.contains(r#""choices": []"#) {
            true => ErrorKind::Server,
            false => ErrorKind::BadBody,
        };
        for result in on_both_clients_answered(body).await {
            let err = result.unwrap_err();
            assert_eq!(err.kind, kind, "{body}: {err:?}");
            assert!(err.retryable(), "{err:?}");
            let quoted = if body.contains("went away") {
                "provider went away"
            } else {
                "finish_reason `error`"
            };
            assert!(
                err.message
                    .contains(&format!("with an error mid-answer: {quoted}")),
                "{err:?}"
            );
        }
    }
    // A `null` error is none: the answer stands.
    let body = r#"{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop", "error": null}], "error": null}"#;
    for result in on_both_clients_answered(body).await {
        result.unwrap();
    }
}

// A whole JSON object with more after it (two answers run together, bytes added on the way)
// came from an API, so the URL is right: retried like a garbled body, and not told to check
// the base URL as a web page is. A text that merely starts with a number is still not JSON.
#[tokio::test]
async fn a_completion_with_bytes_after_it_is_retried_on_both_clients() {
    let body = r#"{"choices": [{"message": {"content": "hi"}}]}{"choices": []}"#;
    for result in on_both_clients_answered(body).await {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadBody, "{err:?}");
        assert!(err.retryable(), "{err:?}");
        assert!(
            err.message
                .contains("a JSON object followed by other bytes"),
            "{err:?}"
        );
    }
    let text = "200 OK";
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\n{text}");
    let (base, _) = answering(answer, Then::Close).await;
    for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotJson, "{err:?}");
    }
}

// Servers disagree on `usage`: nulls, floats, numbers as strings. A completion that was
// paid for is kept whatever its usage says; what cannot be read counts as 0 (or, for the
// cost, as absent: the price table's).
#[tokio::test]
async fn odd_usage_fields_do_not_throw_away_a_completion() {
    let cases = [
        (
            r#"{"prompt_tokens": null, "completion_tokens": 7.0, "cost": "0.0012"}"#,
            Usage {
                prompt_tokens: 0,
                completion_tokens: 7,
                total_tokens: 7,
                cost: 0.0012,
            },
        ),
        (
            r#"{"prompt_tokens": "12", "completion_tokens": -3, "total_tokens": "many", "cost": null}"#,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 0,
                total_tokens: 12,
                cost: 0.0,
            },
        ),
        (
            r#"{"prompt_tokens": 18446744073709551615, "completion_tokens": 1e300, "cost": {}}"#,
            Usage {
                prompt_tokens: u32::MAX.into(),
                completion_tokens: u32::MAX.into(),
                total_tokens: 2 * i64::from(u32::MAX),
                cost: 0.0,
            },
        ),
        (r#""none""#, Usage::default()),
        // A cost past any real price is absent: sums of such would be infinite.
        (
            r#"{"prompt_tokens": 1, "completion_tokens": 1, "cost": 1e308}"#,
            Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                total_tokens: 2,
                cost: 0.0,
            },
        ),
    ];
    for (usage, expected) in cases {
        let body = test_server::completion("hi", usage);
        let (base, _) = answering(test_server::answer("200 OK", &body), Then::Close).await;
        let up = upstream_at(&format!("{base}/v1"), None);
        for result in on_both_clients(&up).await {
            assert_eq!(result.unwrap(), expected, "usage {usage}");
        }
    }
}

// An upstream may echo the key it was sent in its error (a proxy's "invalid key sk-..."),
// as an error status or as an error in a 2xx: the message the job keeps and clients see
// shows it as `***`, on both clients, and a provider's message is cut to 1,000 characters.
// Before, the message was kept as the upstream wrote it.
#[tokio::test]
async fn an_echoed_key_is_hidden_and_a_long_message_is_cut_on_both_clients() {
    let key = "sk-live-0123456789abcdef";
    for status in ["401 Unauthorized", "200 OK"] {
        let echo = format!(
            r#"{{"error": {{"message": "Incorrect API key provided: {key}. You can find your key at https://example.com."}}}}"#
        );
        let (base, _) = answering(test_server::answer(status, &echo), Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), Some(key))).await {
            let err = result.unwrap_err();
            assert!(!err.message.contains(key), "{status}: {err:?}");
            assert!(
                err.message.contains("Incorrect API key provided: ***."),
                "{status}: {err:?}"
            );
        }
    }
    // A key where the message is cut (a body with no `message`, shown as a 200-character
    // excerpt, the key from its 191st): hidden whole before the cut, not left in part.
    let detail = format!(
        r#"{{"error": {{"code": 401, "detail": "{} {key} more"}}}}"#,
        "x".repeat(154)
    );
    for status in ["401 Unauthorized", "200 OK"] {
        let (base, _) = answering(test_server::answer(status, &detail), Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), Some(key))).await {
            let err = result.unwrap_err();
            assert!(!err.message.contains("sk-live"), "{status}: {err:?}");
            assert!(err.message.contains("***"), "{status}: {err:?}");
        }
    }
    let long = format!(r#"{{"error": {{"message": "{}"}}}}"#, "word ".repeat(2000));
    let (base, _) = answering(test_server::answer("400 Bad Request", &long), Then::Close).await;
    for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
        let err = result.unwrap_err();
        assert!(err.message.ends_with("..."), "{err:?}");
        assert!(err.message.chars().count() < 1100, "{}", err.message.len());
    }
}

// An error in a 2xx that names the status it stands for (`code` or `status`, as a number or
// a numeric string) is classed by it: a refused key fails for good instead of being sent four
// more times as a garbled answer would be. A code that is not a status (OpenAI's words) leaves
// it a garbled answer, retried.
#[tokio::test]
async fn an_error_in_a_2xx_is_classed_by_the_status_it_names() {
    let cases = [
        (
            r#"{"error": {"code": 401, "message": "invalid key"}}"#,
            ErrorKind::Auth,
        ),
        (
            r#"{"error": {"status": "429", "message": "slow down"}}"#,
            ErrorKind::RateLimited,
        ),
        (
            r#"{"error": {"code": 503, "message": "overloaded"}}"#,
            ErrorKind::Server,
        ),
        (
            r#"{"error": {"code": "invalid_api_key", "message": "no"}}"#,
            ErrorKind::BadBody,
        ),
        (
            r#"{"error": {"code": 200, "message": "odd"}}"#,
            ErrorKind::BadBody,
        ),
        (r#"{"error": "plain words"}"#, ErrorKind::BadBody),
        // What the error's body says beyond its status, as for an error answered with one: an
        // account out of credit, a moderation's refusal of the input.
        (
            r#"{"error": {"code": 429, "type": "insufficient_quota", "message": "no credit"}}"#,
            ErrorKind::Quota,
        ),
        (
            r#"{"error": {"code": 403, "message": "flagged", "metadata": {"reasons": ["x"]}}}"#,
            ErrorKind::Rejected,
        ),
    ];
    for (body, kind) in cases {
        for result in on_both_clients_answered(body).await {
            let err = result.unwrap_err();
            // Recorded as the status it stands for (a refused key's 401), not as the 200.
            let status = match kind {
                ErrorKind::Auth => 401,
                ErrorKind::RateLimited | ErrorKind::Quota => 429,
                ErrorKind::Server => 503,
                ErrorKind::Rejected => 403,
                _ => 200,
            };
            assert_eq!(
                (err.kind, err.status),
                (kind, Some(status)),
                "{body}: {err:?}"
            );
        }
    }
}

// A refusal in place of the content (OpenAI's structured outputs: `content` null, `refusal`
// set) fails the completion as an empty one (final) that says what the model said, on one
// line. Before, it was "upstream returned an empty completion", the reason thrown away.
#[tokio::test]
async fn a_refusal_is_said_in_the_error() {
    let body = r#"{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": null, "refusal": "I'm sorry,\nI cannot help with that."}}]}"#;
    let [completion, _] = on_both_clients_answered(body).await;
    let err = completion.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Empty, "{err:?}");
    assert!(!err.retryable());
    assert_eq!(
        err.message,
        "upstream refused to answer: I'm sorry, I cannot help with that."
    );
    // An empty refusal says nothing.
    let body = r#"{"choices": [{"message": {"content": null, "refusal": " "}}]}"#;
    let [completion, _] = on_both_clients_answered(body).await;
    let err = completion.unwrap_err();
    assert_eq!(err.message, "upstream returned an empty completion");
}

// An empty completion says why it stopped when that was not the end of an answer: a reasoning
// model that spent its token limit thinking (`length`), a content filter, or another reason
// the provider gave. Before, every one was "upstream returned an empty completion", and the
// client could not tell that raising `max_tokens` would help.
#[tokio::test]
async fn an_empty_completion_says_why_it_stopped() {
    for (reason, said) in [
        (
            "length",
            " (finish_reason `length`: the token limit was reached before any answer)",
        ),
        (
            "content_filter",
            " (finish_reason `content_filter`: the provider's content filter withheld it)",
        ),
        ("recitation", " (finish_reason `recitation`)"),
        ("stop", ""),
    ] {
        let body = format!(
            r#"{{"choices": [{{"finish_reason": "{reason}", "message": {{"content": "",
                "reasoning_content": "Let me think..."}}}}]}}"#
        );
        // The lean client's call (`complete_json`, the other, reads JSON answers whole).
        let [completion, _] = on_both_clients_answered(&body).await;
        let err = completion.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Empty, "{err:?}");
        assert_eq!(
            err.message,
            format!("upstream returned an empty completion{said}")
        );
    }
}

// A choice with no message (a content filter's `finish_reason` alone, or `"message": null`)
// is an empty completion: final, and billed. A body of another shape that still has `usage`
// (an error in a 2xx, choices that are not a list, a whole answer with bytes after it) is
// retried, and what it was billed for is counted. Before, both failed to parse as a garbled
// answer whose usage was lost, and the first was asked for again.
#[tokio::test]
async fn answers_of_another_shape_keep_their_usage() {
    let usage = r#""usage": {"prompt_tokens": 9, "completion_tokens": 2}"#;
    let billed = Usage::of(9, 2, 0.0);
    for (body, kind) in [
        (
            format!(
                r#"{{"choices": [{{"index": 0, "finish_reason": "content_filter"}}], {usage}}}"#
            ),
            ErrorKind::Empty,
        ),
        (
            format!(
                r#"{{"choices": [{{"message": null, "finish_reason": "content_filter"}}], {usage}}}"#
            ),
            ErrorKind::Empty,
        ),
        (
            format!(r#"{{"error": {{"message": "boom"}}, {usage}}}"#),
            ErrorKind::BadBody,
        ),
        (format!(r#"{{"choices": 3, {usage}}}"#), ErrorKind::BadBody),
        // A whole answer with more after it: retried, and the first was paid for.
        (
            format!(r#"{{"choices": [{{"message": {{"content": "hi"}}}}], {usage}}}{{"x": 1}}"#),
            ErrorKind::BadBody,
        ),
    ] {
        let [lean, _] = on_both_clients_answered(&body).await;
        let err = lean.unwrap_err();
        assert_eq!(err.kind, kind, "{body}: {err:?}");
        assert_eq!(err.retryable(), kind == ErrorKind::BadBody, "{body}");
        assert_eq!(err.usage, billed, "{body}");
    }
}

// A placeholder key (shorter than 8 characters: `x`, `EMPTY`) is not hidden in an error
// message, which would garble it; a real key of 8 or more is. Before, every `x` was `***`.
#[tokio::test]
async fn a_placeholder_key_leaves_an_error_message_whole() {
    let echo = r#"{"error": {"message": "extra text: x EMPTY sk-xxxx sk-xxxxx"}}"#;
    for (key, shown) in [
        ("x", "extra text: x EMPTY sk-xxxx sk-xxxxx"),
        ("sk-xxxx", "extra text: x EMPTY sk-xxxx sk-xxxxx"),
        ("sk-xxxxx", "extra text: x EMPTY sk-xxxx ***"),
    ] {
        let (base, _) = answering(test_server::answer("400 Bad Request", echo), Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), Some(key))).await {
            let err = result.unwrap_err();
            assert!(err.message.ends_with(shown), "{key}: {err:?}");
        }
    }
}

// An upstream that echoes the Basic credentials of a base URL's userinfo, in a way the
// "word after `Basic`" rule does not catch (quoted, glued to what comes before): the error
// message, stored with the job and shown to API clients, has them hidden on both clients.
// Before, only a provider's key was hidden there.
#[tokio::test]
async fn echoed_url_credentials_never_reach_an_error_message() {
    let page = r#"<p>{"authorization":"Basic dXNlcjpzQGNyZXQ="}</p>"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
        page.len()
    );
    let (base, _) = answering(answer, Then::Close).await;
    let up = upstream_at(
        &(base.replace("http://", "http://user:s%40cret@") + "/v1"),
        None,
    );
    for result in on_both_clients(&up).await {
        let err = result.expect_err("a web page is not a completion");
        assert_eq!(err.kind, ErrorKind::NotJson, "{err:?}");
        assert!(!err.message.contains("dXNlcjpzQGNyZXQ"), "{}", err.message);
        assert!(err.message.contains(r#"Basic ***"#), "{}", err.message);
    }
}

// `http://user:password@host/v1`: as reqwest does, both clients send the userinfo
// (percent-decoded) as Basic auth unless a key is set (the key's `Bearer` wins: the
// configuration refuses both, but a `Provider` built in code may have them), and
// never in the `Host` header; no error message or `Debug` output carries the password.
#[tokio::test]
async fn credentials_in_a_plain_url_go_as_basic_auth_on_both_clients() {
    let body = test_server::completion("hi", "{}");
    let (base, heads) = answering(test_server::answer("200 OK", &body), Then::Close).await;
    let with_user = base.replace("http://", "http://us%65r:s%40cret@") + "/v1";
    for key in [None, Some("sk-1")] {
        let up = upstream_at(&with_user, key);
        for result in on_both_clients(&up).await {
            result.unwrap();
        }
        assert!(!format!("{up:?}").contains("cret"), "{up:?}");
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 4);
    let host = base.trim_start_matches("http://");
    for (i, head) in heads.iter().enumerate() {
        let auth = if i < 2 {
            "Basic dXNlcjpzQGNyZXQ="
        } else {
            "Bearer sk-1"
        };
        assert_eq!(header(head, "authorization"), Some(auth), "{head}");
        assert_eq!(header(head, "host"), Some(host), "{head}");
        assert!(!head.contains("cret") && !head.contains("us%65r"), "{head}");
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = format!("http://user:secret@{}/v1", listener.local_addr().unwrap());
    drop(listener);
    let up = upstream_at(&refused, None);
    for result in on_both_clients(&up).await {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Connect, "{err:?}");
        assert!(!err.message.contains("secret"), "{}", err.message);
    }
}

/// The value of header `name` in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

// A `Retry-After` date is the upstream's clock: the wait is measured from the answer's own
// `Date` (here 30 s, in 1994), on both clients; without a `Date`, from this process's clock.
#[tokio::test]
async fn a_retry_after_date_is_measured_from_the_answers_date() {
    let rate_limited = |date: &str| {
        let body = r#"{"error": {"message": "slow down"}}"#;
        format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
             retry-after: Sun, 06 Nov 1994 08:50:07 GMT\r\n{date}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let waits = |results: [Result<Usage, UpstreamError>; 2]| {
        results.map(|r| r.expect_err("a 429").retry_after)
    };
    let (dated, _) = answering(
        rate_limited("date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
        Then::Close,
    )
    .await;
    let up = upstream_at(&dated, None);
    assert_eq!(
        waits(on_both_clients(&up).await),
        [Some(Duration::from_secs(30)); 2]
    );
    // No `Date`: from this process's clock, here 10 s before the date.
    let (undated, _) = answering(rate_limited(""), Then::Close).await;
    let then = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:57 GMT").unwrap();
    let then_ms = then.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let at_then = crate::clock::Shifted::new(
        Arc::new(SystemClock),
        then_ms - crate::clock::Clock::now_ms(&SystemClock),
    );
    let up = upstream_at(&undated, None).with_clock(Arc::new(at_then));
    for wait in waits(on_both_clients(&up).await) {
        let wait = wait.expect("a wait");
        assert!(
            wait.abs_diff(Duration::from_secs(10)) < Duration::from_secs(2),
            "{wait:?}"
        );
    }
}

// What no retry mends, as the upstream says it: a 429 that is an account out of credit
// (OpenAI's `insufficient_quota`, by its code or its type) is final, `upstream_quota`; any
// answer with `x-should-retry: false` is final and keeps its code. A plain 429 is still
// retried. On both clients. Before, every 429 was retried, for an hour of a job's attempts.
#[tokio::test]
async fn what_the_upstream_says_no_retry_mends_is_final_on_both_clients() {
    let answer = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let quota = r#"{"error": {"message": "You exceeded your current quota", "type":
        "insufficient_quota", "param": null, "code": "insufficient_quota"}}"#;
    let by_type = r#"{"error": {"message": "out of credit", "type": "insufficient_quota"}}"#;
    let slow = r#"{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}"#;
    let (too_many, unavailable) = ("429 Too Many Requests", "503 Service Unavailable");
    let no = "x-should-retry: false\r\n";
    // (status line, extra headers, body, kind, retried); the code is the kind's.
    for (status, extra, body, kind, retryable) in [
        (too_many, "", quota, ErrorKind::Quota, false),
        (too_many, "", by_type, ErrorKind::Quota, false),
        (too_many, no, slow, ErrorKind::RateLimited, false),
        (
            unavailable,
            "x-should-retry: False\r\n",
            slow,
            ErrorKind::Server,
            false,
        ),
        (too_many, "", slow, ErrorKind::RateLimited, true),
        (
            too_many,
            "x-should-retry: true\r\n",
            slow,
            ErrorKind::RateLimited,
            true,
        ),
    ] {
        let answer = answer(status, extra, body);
        let (base, _) = answering(answer.clone(), Then::Close).await;
        for result in on_both_clients(&upstream_at(&base, None)).await {
            let err = result.expect_err("an error");
            assert_eq!((err.kind, err.retryable()), (kind, retryable), "{answer}");
            if kind == ErrorKind::Quota {
                assert_eq!(err.code(), "upstream_quota");
            }
        }
    }
}

// A 2xx body that starts as JSON and breaks part way (a byte that is not UTF-8, a lone
// surrogate escape, a stray comma) is a garbled answer, retried as one cut off is; only a body
// that is not JSON from its first byte is final, as a web page. On both clients. Before, all
// of these failed for good as "not JSON", pointing at the base URL.
#[tokio::test]
async fn a_completion_garbled_part_way_is_retried_on_both_clients() {
    let bodies: [&[u8]; 3] = [
        b"{\"choices\": [{\"message\": {\"content\": \"caf\xff\"}}]}",
        br#"{"choices": [{"message": {"content": "\ud83d"}}]}"#,
        br#"{"choices": [{"message": {"content": "hi"},}]}"#,
    ];
    for body in bodies {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let answer = [head.as_bytes(), body].concat();
        let (base, _) = answering(answer, Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
            let err = result.expect_err("not a completion");
            assert_eq!(
                (err.kind, err.retryable()),
                (ErrorKind::BadBody, true),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

// An `https://` base URL for a server that speaks no TLS (a plain-HTTP port) fails the
// handshake the same way every time: final, saying it was TLS, where before it was retried as
// a connection that may pass (5 calls a step, then the job requeued until `max_attempts`).
#[tokio::test]
async fn a_failed_tls_handshake_is_final() {
    // Answers as a plain-HTTP server does to bytes it cannot read, at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let answer = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
            let _ = socket.write_all(answer.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let up = upstream_at(&format!("https://{at}"), None);
    let err = up.complete("m", &ask()).await.expect_err("no TLS there");
    assert_eq!(
        (err.kind, err.retryable()),
        (ErrorKind::Tls, false),
        "{err:?}"
    );
    assert!(
        err.message.starts_with("upstream call failed: TLS: "),
        "{err:?}"
    );
}

// A relayed refusal that echoes the key JSON-escaped (`\/`, as PHP's encoder writes a slash)
// does not show it: hidden again once the message is read out of its JSON, as `complete`'s
// errors are. Before, only the raw body was searched, where the escaped key did not match.
#[tokio::test]
async fn a_relayed_error_hides_a_key_echoed_escaped() {
    let body = r#"{"error": {"message": "invalid key sk-ab\/cd\/efgh1234"}}"#;
    let answer = format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (base, _) = answering(answer, Then::Close).await;
    let up = upstream_at(&base, Some("sk-ab/cd/efgh1234"));
    let (answer, key) = up.relay("m", json!({"messages": []}), 1).await.unwrap();
    let err = up.relayed_error(answer, key).await;
    assert_eq!(err.message, "upstream answered 401: invalid key ***");
}

// A 2xx body with no `choices` and no error is not an answer to hand on (the fusion tool's
// outer call): retried as a garbled one; an empty list is a completion with none, final. As
// `complete` reads them. Before, both went to the client as if they were answers.
#[tokio::test]
async fn a_json_completion_without_choices_is_not_taken() {
    for (body, kind) in [
        (r#"{"id": "x"}"#, ErrorKind::BadBody),
        (r#"{"id": "x", "choices": []}"#, ErrorKind::Empty),
    ] {
        let [lean, reqwest] = on_both_clients_answered(body).await;
        assert_eq!(reqwest.expect_err(body).kind, kind, "{body}");
        assert_eq!(lean.expect_err(body).kind, kind, "{body}");
    }
}

// A refusal that only quotes the temperature (a validation error echoing the request, about
// something else) comes back the same without one: the model is not taken to refuse a
// temperature, and later calls still send theirs (each resent once without it). Before, it
// was remembered at the first such refusal, for the process's life.
#[tokio::test]
async fn a_refusal_that_only_quotes_the_temperature_is_not_remembered() {
    let body = r#"{"error": {"message": "invalid request {'temperature': 0.0, 'response_format': 'xml'}: response_format must be json"}}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (base, heads) = answering(answer, Then::Close).await;
    let up = upstream_at(&base, None);
    let warm = CompletionRequest {
        temperature: Some(0.0),
        ..ask()
    };
    for round in 1..=2 {
        let err = up.complete("m", &warm).await.expect_err("refused");
        assert!(err.names_temperature(), "{err:?}");
        assert_eq!(heads.lock().unwrap().len(), 2 * round, "round {round}");
    }
}
