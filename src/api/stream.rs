//! Server-Sent Events in the OpenAI chunk format. A fusion job streams a role chunk at once,
//! progress as SSE comments while the panel and the analysis run (standard clients ignore them),
//! keep-alive comments, then the answer, a finish chunk, usage when asked, and `data: [DONE]`;
//! the fusion tool's flow streams the same way, its role chunk too sent before its rounds run.
//! A client that goes away stops the stream's task at once (not at its next event, which may be
//! hours away), never the job.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::AppState;
use super::chat::{JOB_HEADER, StreamOptions, handed_back, job_error, job_header};
use super::error::ApiError;
use crate::job::{Job, JobStatus, Step, StepKey};

type Tx = mpsc::Sender<Result<Event, Infallible>>;

/// The client went away (the response body, and with it the channel's receiver, was dropped).
struct Gone;

/// A channel whose receiver is the response body: the sender can tell when the client left.
fn channel(size: usize) -> (Tx, impl Stream<Item = Result<Event, Infallible>>) {
    let (tx, mut rx) = mpsc::channel(size);
    (tx, futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// The stream of a queued fusion job.
pub fn fusion_job(state: AppState, job: Job, opts: StreamOptions) -> Response {
    let (tx, rx) = channel(32);
    let header = job_header(&job);
    let keepalive = state.config.keepalive;
    // The stream keeps what it shows of the job, not the job: its request (the messages) may
    // be megabytes, and a stream may wait hours.
    let shown = Shown {
        id: job.id,
        model: job.spec.model.clone(),
        panel: job.spec.panel.len(),
    };
    drop(job);
    // In the request's span: its log lines carry the request's id.
    let streamed = async move {
        // The client left: stop now, wherever the task waits; the job goes on regardless.
        tokio::select! {
            _ = drive(state, shown, opts, &tx) => {}
            _ = tx.closed() => {}
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(streamed));
    let mut resp = sse(rx, keepalive);
    resp.headers_mut().insert(JOB_HEADER, header);
    resp
}

/// The event stream's response: keep-alive comments every `keepalive`, and a header telling
/// nginx (whose proxy buffers answers by default) to pass each event on as it comes.
fn sse(
    rx: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    keepalive: Duration,
) -> Response {
    let mut resp = Sse::new(rx)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response();
    unbuffered(resp.headers_mut());
    resp
}

/// Tell nginx (whose proxy buffers answers by default) to pass an event stream on as it comes.
pub(super) fn unbuffered(headers: &mut HeaderMap) {
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// The chunk envelope. With `include_usage`, every chunk says `"usage": null` but the last,
/// which carries it, as OpenAI's do (a typed client may expect the field on each).
fn chunk(id: &str, created: i64, model: &str, choices: Value, opts: StreamOptions) -> Value {
    let mut chunk = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if opts.include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

async fn send(tx: &Tx, event: Event) -> Result<(), Gone> {
    tx.send(Ok(event)).await.map_err(|_| Gone)
}

async fn data(tx: &Tx, value: &Value) -> Result<(), Gone> {
    send(tx, Event::default().data(value.to_string())).await
}

async fn done(tx: &Tx) -> Result<(), Gone> {
    send(tx, Event::default().data("[DONE]")).await
}

/// What a stream shows of its job.
struct Shown {
    id: Uuid,
    model: String,
    /// How many panel members it has.
    panel: usize,
}

async fn drive(state: AppState, job: Shown, opts: StreamOptions, tx: &Tx) -> Result<(), Gone> {
    let id = format!("fusion-{}", job.id);
    let created = state.clock.now_ms() / 1000;
    let model = job.model;
    let role =
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
    data(tx, &chunk(&id, created, &model, role, opts)).await?;
    send(tx, comment(&format!("fusion job {} queued", job.id))).await?;

    let mut watcher = state.watch.watch(job.id);
    let mut reported = HashSet::new();
    let store = state.store.as_ref();
    let finished = loop {
        // Failed reads are retried for a while; a database down for longer ends the stream
        // with an error that names the job.
        let settled = match watcher.settled(store).await {
            Ok(settled) => settled,
            Err(lost) => return fail(tx, &lost).await,
        };
        // Progress is best effort: a failed read of the steps is made up at the next event.
        // Their heads only: a progress line names the step, not its answer.
        if let Ok(steps) = store.step_heads(job.id).await {
            let shown = steps.iter().filter(|s| !s.superseded());
            for step in shown.filter(|s| reported.insert(s.key)) {
                send(tx, comment(&progress(job.panel, step))).await?;
            }
        }
        match settled {
            Some(current) if current.status.is_final() => break current,
            Some(current) => return fail(tx, &handed_back(&current)).await,
            None => {}
        }
        watcher.next().await;
    };

    if finished.status != JobStatus::Succeeded {
        return fail(tx, &job_error(&finished)).await;
    }
    let result = finished.result.unwrap_or(Value::Null);
    finish(tx, &id, created, &model, &result, opts).await
}

/// A message's tool calls as a chunk's delta carries them: each with its place (`index`),
/// which clients accumulate the calls of a stream by, and which a whole message's calls lack.
fn indexed(calls: &Value) -> Value {
    let Some(calls) = calls.as_array() else {
        return calls.clone();
    };
    let calls = calls.iter().enumerate().map(|(i, call)| {
        let mut call = call.clone();
        if let Some(fields) = call.as_object_mut() {
            fields.entry("index").or_insert(json!(i));
        }
        call
    });
    Value::Array(calls.collect())
}

/// End a stream with `error`'s object, in place of the answer, and `[DONE]`; logged as the
/// same error answered as a response would be.
async fn fail(tx: &Tx, error: &ApiError) -> Result<(), Gone> {
    error.log();
    data(tx, &error.body()).await?;
    done(tx).await
}

/// Content, finish reason, usage (when asked) and `[DONE]` for a finished completion.
async fn finish(
    tx: &Tx,
    id: &str,
    created: i64,
    model: &str,
    completion: &Value,
    opts: StreamOptions,
) -> Result<(), Gone> {
    let choice = &completion["choices"][0];
    // A string, or content parts (some servers answer so): their text, as a completion's is
    // read. Before, parts streamed as an empty answer.
    let content = crate::upstream::text_of(choice["message"]["content"].clone());
    let mut delta = json!({"content": content.unwrap_or_default()});
    if let Some(calls) = choice["message"].get("tool_calls").filter(|c| !c.is_null()) {
        delta["tool_calls"] = indexed(calls);
    }
    // What else the message says, as a streamed one would carry it: a refusal (the outer
    // model's, in the fusion tool's flow) and its annotations (url citations). Before, a
    // streamed reply dropped both, which the same reply unstreamed kept.
    for field in ["refusal", "annotations"] {
        if let Some(value) = choice["message"].get(field).filter(|v| !v.is_null()) {
            delta[field] = value.clone();
        }
    }
    let content_choice = json!([{"index": 0, "delta": delta, "finish_reason": null}]);
    data(tx, &chunk(id, created, model, content_choice, opts)).await?;
    // A reason that is not a string (`null` from some servers) is "tool_calls" or "stop":
    // the stream's last chunk must say why it ended.
    let called = delta.get("tool_calls").is_some();
    let reason = choice
        .get("finish_reason")
        .filter(|r| r.is_string())
        .cloned()
        .unwrap_or(json!(if called { "tool_calls" } else { "stop" }));
    let end = json!([{"index": 0, "delta": {}, "finish_reason": reason}]);
    let mut end = chunk(id, created, model, end, opts);
    // The fusion tool's jobs, named as the non-streamed reply names them.
    if let Some(ids) = completion.get("fusion_job_ids") {
        end["fusion_job_ids"] = ids.clone();
    }
    data(tx, &end).await?;
    if opts.include_usage {
        let mut last = chunk(id, created, model, json!([]), opts);
        last["usage"] = completion["usage"].clone();
        data(tx, &last).await?;
    }
    done(tx).await
}

/// The tool flow's stream: a role chunk at once and keep-alives while `reply` (the outer
/// model's rounds and their jobs) runs, then its answer as chunks, or its error object, and
/// `[DONE]`. The chunks share one id, made here: the reply's own is not known in time. A client
/// that leaves drops the rounds; the jobs they started go on. `created`: unix seconds, by the
/// process's clock.
pub fn completion_later(
    reply: impl Future<Output = Result<Value, ApiError>> + Send + 'static,
    model: &str,
    created: i64,
    opts: StreamOptions,
    keepalive: Duration,
) -> Response {
    let (tx, rx) = channel(8);
    let model = model.to_string();
    let streamed = async move {
        let id = format!("chatcmpl-fusion-{}", Uuid::now_v7());
        let streamed = async {
            let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
            data(&tx, &chunk(&id, created, &model, role, opts)).await?;
            match reply.await {
                Ok(completion) => finish(&tx, &id, created, &model, &completion, opts).await,
                Err(e) => fail(&tx, &e).await,
            }
        };
        tokio::select! {
            _ = streamed => {}
            _ = tx.closed() => {}
        }
    };
    // In the request's span: its log lines carry the request's id.
    tokio::spawn(tracing::Instrument::in_current_span(streamed));
    sse(rx, keepalive)
}

/// A comment event. Control characters are written escaped: a line break would end the
/// comment (axum panics on one, which would end the stream without `[DONE]`).
fn comment(text: &str) -> Event {
    if !text.contains(char::is_control) {
        return Event::default().comment(text);
    }
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    Event::default().comment(clean)
}

/// One progress comment line.
fn progress(panel: usize, step: &Step) -> String {
    let outcome = if step.ok { "completed" } else { "failed" };
    match step.key {
        StepKey::Panel(i) => format!("fusion panel {}/{panel} {} {outcome}", i + 1, step.model),
        StepKey::Analysis => format!("fusion analysis {outcome}"),
        StepKey::Final => format!("fusion final {outcome}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes an event puts on the wire.
    async fn wire(event: Event) -> String {
        let events = futures::stream::iter([Ok::<_, Infallible>(event)]);
        let body = Sse::new(events).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_comment_with_line_breaks_stays_one_comment_line() {
        let text = wire(comment("fusion panel 1/1 x\ny\r\u{7} completed")).await;
        assert_eq!(text, ": fusion panel 1/1 x\\ny\\r\\u{7} completed\n\n");
    }
}
