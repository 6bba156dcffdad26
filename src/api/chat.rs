//! The OpenAI-compatible surface: `POST /v1/chat/completions` and `GET /v1/models`. A fusion
//! model (or a fusion plugin) becomes a durable job that this request waits for; any other model
//! is passed through to its upstream as a thin gateway, unless it is offered the fusion tool.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::ApiError;
use super::jobs::{self, REPLAYED_HEADER, enqueue, idempotency_key, refuse_recursion};
use super::{ApiJson, AppState, relay, request, stream, tool, watch};
use crate::job::{Job, JobStatus, is_fusion_model};

/// Response header naming the job behind a completion, so a client that timed out can fetch the
/// result later from `GET /v1/jobs/{id}`.
pub const JOB_HEADER: &str = "x-fusion-job-id";

fn has_fusion_plugin(body: &Value) -> bool {
    body.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|ps| {
            ps.iter()
                .any(|p| p.get("id").and_then(Value::as_str) == Some("fusion"))
        })
}

/// What the client asked of the stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOptions {
    pub stream: bool,
    pub include_usage: bool,
}

impl StreamOptions {
    fn from_body(body: &Value) -> Result<StreamOptions, ApiError> {
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(
                    ApiError::bad_request("invalid_request", "`stream` must be a boolean")
                        .param("stream"),
                );
            }
        };
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(StreamOptions {
            stream,
            include_usage,
        })
    }

    /// `stream_options` as OpenAI takes it: only with `stream: true`, and `include_usage` a
    /// boolean (read as false otherwise, a client asking for usage would get none). Checked
    /// for the completions this server answers itself; a relayed one is the upstream's to judge.
    fn refuse_stray(&self, body: &Value) -> Result<(), ApiError> {
        let Some(options) = body.get("stream_options").filter(|o| !o.is_null()) else {
            return Ok(());
        };
        let wrong = |message| {
            Err(ApiError::bad_request("invalid_request", message).param("stream_options"))
        };
        if !self.stream {
            return wrong("`stream_options` is only allowed with `stream: true`");
        }
        let Some(options) = options.as_object() else {
            return wrong("`stream_options` must be an object");
        };
        match options.get("include_usage") {
            None | Some(Value::Null | Value::Bool(_)) => Ok(()),
            Some(_) => wrong("`stream_options.include_usage` must be a boolean"),
        }
    }
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the request body must be a JSON object",
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.trim().to_string(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`model` must be a non-empty string",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`model` is required",
            ));
        }
    };
    request::refuse_control_characters(&model, "model")?;
    // `stream` and `stream_options` are read for the completions answered here; a relayed
    // body's are the upstream's to judge, as the rest of it is.
    if is_fusion_model(&model) || has_fusion_plugin(&body) {
        refuse_recursion(&headers)?;
        let opts = StreamOptions::from_body(&body)?;
        opts.refuse_stray(&body)?;
        return fusion_completion(state, &headers, body, opts).await;
    }
    if tool::offers_fusion(&body) {
        refuse_recursion(&headers)?;
        let opts = StreamOptions::from_body(&body)?;
        opts.refuse_stray(&body)?;
        return tool::run(state, body, model, opts).await;
    }
    let depth = jobs::relay_depth(&headers)?;
    relay::passthrough(&state, &model, body, depth).await
}

/// A completion by a fusion model: its job, enqueued (or, for an SDK's retry, the one its first
/// try made), streamed or waited for. The body is the job's; neither it nor the job is held
/// while the answer is waited for, which may take many minutes (a copy per waiting request).
async fn fusion_completion(
    state: AppState,
    headers: &HeaderMap,
    mut body: Value,
    opts: StreamOptions,
) -> Result<Response, ApiError> {
    let obj = body.as_object_mut().expect("checked by the caller");
    // `n` stays: a request for several choices is refused, as on /v1/jobs.
    for field in ["stream", "stream_options"] {
        obj.remove(field);
    }
    // Parsed with `tools` and `tool_choice` (a forced call is refused there), which, with
    // `user`, the hash leaves out (see `request::request_hash`).
    let parsed = request::parse(&body, &state.config)?;
    let key = idempotency_key(headers)?;
    let hash = request::request_hash(&body);
    drop(body);
    let (job, replayed) = match sdk_retry_of(&state, headers, key.is_some(), &hash).await? {
        Some(job) => (job, false),
        None => enqueue(&state, parsed, key, Some(hash)).await?,
    };
    let answer = if opts.stream {
        Ok(stream::fusion_job(state, job, opts))
    } else {
        let id = job.id;
        drop(job);
        watch::wait_final(&state.watch, state.store.as_ref(), id)
            .await
            .and_then(|job| finished_completion(&job))
    };
    if !replayed {
        return answer;
    }
    // A repeat under an earlier request's key, as `/v1/jobs` marks it: this answer is that
    // request's job's, whatever it is.
    let mut answer = answer.unwrap_or_else(IntoResponse::into_response);
    answer
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    Ok(answer)
}

/// The OpenAI SDKs send `x-stainless-retry-count` (0, then 1, 2 on their retries) and their
/// timeout in seconds (`x-stainless-timeout` from Node, `x-stainless-read-timeout` from Python).
const SDK_RETRY_HEADER: &str = "x-stainless-retry-count";
const SDK_TIMEOUT_HEADERS: [&str; 2] = ["x-stainless-timeout", "x-stainless-read-timeout"];
/// The SDKs' default timeout (600 s in Python, 10 min in Node), when none is sent.
const SDK_DEFAULT_TIMEOUT_MS: i64 = 600_000;
/// The longest an SDK waits between a try that gave up and its retry (8 s at most after a
/// timeout or a broken connection), with room for a busy client.
const SDK_MAX_BACKOFF_MS: i64 = 15_000;

/// For an OpenAI SDK's automatic retry without an `Idempotency-Key`, the job its first try made:
/// the newest with the same request since that try can have been sent, by the retry count and
/// the SDK's timeout (each try waits at most the timeout, then a backoff of at most 8 s; a
/// minute is allowed for each). An SDK retries a call whose answer it gave up waiting for (its
/// timeout, a proxy's idle cut, a 502 from a proxy), and every retry was a new, paid job while
/// the first ran on. The job must still be running, or have finished since the retry's last
/// try can have given up. `None` for a first try, a request with a key (which finds its job by
/// the key), or a retry whose first try made no job (refused, or never arrived).
async fn sdk_retry_of(
    state: &AppState,
    headers: &HeaderMap,
    keyed: bool,
    hash: &str,
) -> Result<Option<Job>, ApiError> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let retries = number(SDK_RETRY_HEADER).unwrap_or(0.0).min(100.0) as i64;
    if keyed || retries == 0 {
        return Ok(None);
    }
    let timeout_ms = SDK_TIMEOUT_HEADERS
        .iter()
        .find_map(|h| number(h))
        .map_or(SDK_DEFAULT_TIMEOUT_MS, |s| {
            (s.min(86_400.0) * 1000.0) as i64
        });
    let now = state.clock.now_ms();
    let since = now - retries * (timeout_ms + 60_000);
    // A job that finished before this call's last try gave up would have answered that try,
    // which then had no reason to retry: such a job is another call's (the same request asked
    // again on purpose), not this one's.
    let job = state
        .store
        .find_by_request(hash, since, now - SDK_MAX_BACKOFF_MS)
        .await?;
    if let Some(job) = &job {
        tracing::info!(job = %job.id, retries, "an SDK's retry waits on the job its first try made");
    }
    Ok(job)
}

/// The answer for a finished job: its `chat.completion`, or the error it ended with (which
/// names the job and tells SDKs not to retry).
pub fn finished_completion(job: &Job) -> Result<Response, ApiError> {
    let (JobStatus::Succeeded, Some(result)) = (&job.status, &job.result) else {
        // Not finished: the wait ended because this process is shutting down.
        return Err(match job.status.is_final() {
            true => job_error(job),
            false => handed_back(job),
        });
    };
    let mut result = result.clone();
    // The pipeline writes an object; a row edited by hand may hold anything, and indexing
    // into anything else would panic.
    if let Some(fields) = result.as_object_mut() {
        fields.insert("fusion_job_id".into(), json!(job.id));
    }
    let mut resp = Json(result).into_response();
    resp.headers_mut().insert(JOB_HEADER, job_header(job));
    Ok(resp)
}

pub fn job_header(job: &Job) -> HeaderValue {
    jobs_header(&[job.id])
}

/// The `x-fusion-job-id` value naming these jobs, comma-separated.
pub fn jobs_header(ids: &[Uuid]) -> HeaderValue {
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    HeaderValue::from_str(&ids.join(",")).expect("uuids are valid header text")
}

/// The answer to a request that waited on a job when this process shut down before the job
/// finished: the job is not lost (it was handed back to the queue, or runs elsewhere), and a
/// retry of the request would start another; so 503 with the job's id to fetch it by (and not to
/// retry).
pub fn handed_back(job: &Job) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        format!(
            "this server is shutting down before fusion job {} finished; the job is {} and keeps \
             its checkpoints: fetch its result later from GET /v1/jobs/{}",
            job.id,
            job.status.as_str(),
            job.id
        ),
    )
    .after_jobs(&[job.id])
}

/// The error a failed or cancelled job answers with, streamed or not: a failed job's code is its
/// `failure_reason`, whatever it is. It names the job and tells SDKs not to retry.
pub fn job_error(job: &Job) -> ApiError {
    let reason = job.failure_reason.as_deref().unwrap_or("unexpected_error");
    let message = format!(
        "fusion job {} {}: {}",
        job.id,
        job.status.as_str(),
        job.error.as_deref().unwrap_or(reason)
    );
    if job.status == JobStatus::Cancelled {
        return ApiError::conflict("job_cancelled", message).after_jobs(&[job.id]);
    }
    let status = match reason {
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        // The conversation and its answers cannot fit the analyst, however shortened: the
        // request's to change, as OpenAI answers a prompt past a model's context.
        "invalid_model" | crate::upstream::TOO_LONG => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, reason.to_string(), message).after_jobs(&[job.id])
}

/// The fusion models this server answers as itself: `fusion` (the default preset) and
/// `fusion/NAME` for each preset, in that order, as OpenAI's model objects.
fn model_entries(config: &crate::config::FusionConfig) -> Vec<(String, Value)> {
    let mut names: Vec<&String> = config.presets.keys().collect();
    names.sort();
    let entry = |id: String, preset: &crate::config::Preset| {
        let object = json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "fusion",
            "fusion": {"panel": preset.panel, "analyst": preset.analyst},
        });
        (id, object)
    };
    let mut entries = vec![entry(
        "fusion".into(),
        &config.presets[&config.default_preset],
    )];
    entries.extend(
        names
            .into_iter()
            .map(|n| entry(format!("fusion/{n}"), &config.presets[n])),
    );
    entries
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = model_entries(&state.config)
        .into_iter()
        .map(|(_, object)| object)
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// One model by id (`client.models.retrieve("fusion")`): one of the list's, or 404
/// `model_not_found`. (A model id may hold a slash: `fusion/budget`.)
pub async fn model(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Ok(Path(id)) = id else {
        let message = "the path's model id is not UTF-8 once decoded, so not a model id";
        return Err(ApiError::bad_request("invalid_model", message));
    };
    model_entries(&state.config)
        .into_iter()
        .find(|(name, _)| *name == id)
        .map(|(_, object)| Json(object))
        .ok_or_else(|| {
            let message = format!(
                "the model `{id}` does not exist here: GET /v1/models lists the fusion models \
                 this server answers (other models are relayed to their provider by \
                 /v1/chat/completions)"
            );
            ApiError::new(StatusCode::NOT_FOUND, "model_not_found", message)
        })
}
