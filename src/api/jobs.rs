//! `/v1/jobs`: submit, fetch, list, cancel and retry fusion jobs.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::ApiError;
use super::{ApiJson, AppState, request, view};
use crate::job::{Job, JobStatus, ListFilter, NewJob, StartHere};
use crate::store::{CancelOutcome, Enqueued, RetryOutcome, Store, StoreError};
// Requests made by a fusion run itself carry it; they may not start another run.
use crate::upstream::DEPTH_HEADER;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Set on an answer to a repeat under an earlier request's `Idempotency-Key`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    refuse_recursion(&headers)?;
    let parsed = request::parse(&body, &state.config)?;
    let key = idempotency_key(&headers)?;
    let hash = key.as_ref().map(|_| request::request_hash(&body));
    let (job, replayed) = enqueue(&state, parsed, key, hash).await?;
    let steps = if replayed {
        state.store.get_steps(job.id).await?
    } else {
        vec![]
    };
    let mut resp = (StatusCode::ACCEPTED, Json(view::full(&job, &steps))).into_response();
    let location = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)).expect("ascii");
    resp.headers_mut().insert(header::LOCATION, location);
    if replayed {
        resp.headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The most fusion servers one relayed request may pass through: enough for a gateway in front
/// of another (a team's in front of a provider's), not for a loop (a server whose upstream URL
/// is its own, or two pointed at each other), which would go round until every connection and
/// file descriptor of the host was spent.
pub const MAX_RELAY_DEPTH: u32 = 8;

/// How many fusion servers a relayed request has passed through (its `x-fusion-depth`; 0
/// without one), refused with `508 relay_loop` at `MAX_RELAY_DEPTH`.
pub fn relay_depth(headers: &HeaderMap) -> Result<u32, ApiError> {
    let Some(value) = headers.get(DEPTH_HEADER) else {
        return Ok(0);
    };
    let depth = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("`{DEPTH_HEADER}` must be a whole number of hops"),
            )
        })?;
    if depth >= MAX_RELAY_DEPTH {
        return Err(ApiError {
            same_again: true,
            ..ApiError::new(
                StatusCode::LOOP_DETECTED,
                "relay_loop",
                format!(
                    "this request was relayed through {depth} fusion servers: an upstream base \
                     URL (FUSION_UPSTREAM_URL or a provider's base_url) leads back to a fusion \
                     server"
                ),
            )
        });
    }
    Ok(depth)
}

/// Refuse a fusion run asked for from inside a fusion run (a panel model that is itself a
/// fusion endpoint), which would otherwise recurse without end.
pub fn refuse_recursion(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(DEPTH_HEADER) {
        return Err(ApiError::bad_request(
            "fusion_recursion",
            "a fusion call inside a fusion run is refused",
        ));
    }
    Ok(())
}

/// Store a parsed request as a job (queued, or started in this process when it has a free slot);
/// `true` when an idempotency key found an earlier one. `request_hash` is the request's
/// (`request::request_hash`), kept to tell a repeat under `key` from a reused key, and to find
/// the job again (`Store::find_by_request`).
pub async fn enqueue(
    state: &AppState,
    parsed: request::JobRequest,
    key: Option<String>,
    request_hash: Option<String>,
) -> Result<(Job, bool), ApiError> {
    let now = state.clock.now_ms();
    // A retry under the same key finds the job, stored or not: always safe.
    let keyed = key.is_some();
    let new = NewJob {
        id: state.job_ids.next(now),
        spec: parsed.spec,
        metadata: parsed.metadata,
        priority: parsed.priority,
        max_attempts: state.config.jobs.max_attempts,
        deadline_at: parsed.deadline_seconds.map(|s| now + s as i64 * 1000),
        request_hash,
        idempotency_key: key,
        created_at: now,
    };
    // With a free slot here and nothing queued ahead, the job starts here at once, no claim.
    let enqueued = match state.worker.as_ref().and_then(|w| w.slot_for_new_job()) {
        Some(slot) => {
            // In a task of its own: once the insert is on its way, the job may land running
            // under this process's lease, and must then be started here even if the client
            // goes away meanwhile (dropping this request's future), or it would sit running
            // with nobody on it until its lease ran out.
            let store = state.store.clone();
            let start = slot.lease().clone();
            tokio::spawn(async move {
                let enqueued = insert(&*store, new, Some(start)).await;
                match &enqueued {
                    Ok(Enqueued::Created(job)) => slot.run(job.clone()).await,
                    // Not waited for: the answer says the job may be stored either way.
                    Err(Inserted::Unknown(_, id)) => {
                        tokio::spawn(slot.hand_back_unconfirmed(*id));
                    }
                    _ => {}
                }
                enqueued
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "the task inserting a job failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the job could not be stored (an internal error); it may exist: list jobs to check",
                )
            })?
        }
        None => insert(&*state.store, new, None).await,
    };
    let enqueued = enqueued.map_err(|e| match e {
        // Not keyed, and it may be stored: named, so that a retry does not make a second job.
        Inserted::Unknown(e, id) if !keyed => {
            let answer = ApiError::from(e);
            ApiError::new(
                answer.status,
                answer.code,
                format!(
                    "{}; fusion job {id} may have been stored (the insert's answer was lost and \
                     it could not be read back): look for it at GET /v1/jobs/{id} before \
                     retrying, or send an Idempotency-Key",
                    answer.message
                ),
            )
            .after_jobs(&[id])
        }
        Inserted::No(e) | Inserted::Unknown(e, _) => ApiError::from(e),
    })?;
    let (job, replayed) = match enqueued {
        Enqueued::Created(job) => (job, false),
        Enqueued::Existing(job) => (job, true),
        Enqueued::KeyReused(job) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "this Idempotency-Key was already used for job {} with a different request",
                    job.id
                ),
            ));
        }
    };
    Ok((job, replayed))
}

/// Insert `new`, queued or started under `start`. An insert that failed may have committed all
/// the same (the connection broke after the statement went out, before its answer came back):
/// the new job's id is then read back, and a job found is the one inserted (nobody else knows
/// that id). Before, the client was told 503, try again, and its retry made and paid for a
/// second job, while the first ran anyway or, started here, sat running with nobody on it
/// until its lease ran out.
async fn insert(
    store: &dyn Store,
    new: NewJob,
    start: Option<StartHere>,
) -> Result<Enqueued, Inserted> {
    let id = new.id;
    let error = match store.enqueue(new, start).await {
        Ok(enqueued) => return Ok(enqueued),
        Err(e) => e,
    };
    match store.get_job(id).await {
        Ok(Some(job)) => {
            tracing::warn!(job = %id, error = %error,
                "an insert whose commit went unconfirmed had landed");
            if job.status == JobStatus::Queued {
                // The wake-up a confirmed insert gives.
                store.wakeups().notify_one();
            }
            Ok(Enqueued::Created(job))
        }
        Ok(None) => Err(Inserted::No(error)),
        // Not readable either (the database away): the insert's own error, and whether the job
        // may be there all the same, so that the client is not told a retry is safe.
        Err(_) if error.may_have_committed() => Err(Inserted::Unknown(error, id)),
        Err(_) => Err(Inserted::No(error)),
    }
}

/// Why an insert did not answer with its job.
enum Inserted {
    /// Not stored: the insert's error.
    No(StoreError),
    /// Its answer was lost and the job could not be read back: it may be stored, under this id.
    Unknown(StoreError, Uuid),
}

pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= 255 => Ok(Some(s.to_string())),
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 characters of printable ASCII (spaces and tabs included)",
        )),
    }
}

pub fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_job_id", format!("`{raw}` is not a job id")))
}

/// The job id of a `/v1/jobs/{id}` path. Anything else is `400 invalid_job_id` in the shared
/// error body, a segment that is not UTF-8 once decoded (`%FF`) included.
pub struct JobId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<JobId, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                ApiError::bad_request(
                    "invalid_job_id",
                    "the path's job id is not UTF-8 once decoded, so not a job id",
                )
            })?;
        parse_id(&raw).map(JobId)
    }
}

async fn load(state: &AppState, id: Uuid) -> Result<Job, ApiError> {
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))
}

pub async fn get(State(state): State<AppState>, JobId(id): JobId) -> Result<Json<Value>, ApiError> {
    let job = load(&state, id).await?;
    let steps = state.store.get_steps(id).await?;
    Ok(Json(view::full(&job, &steps)))
}

/// An unknown parameter (`cursor=`, Stripe's `starting_after=`) is refused rather than ignored:
/// ignored, a pagination loop would get the first page again and again. An empty value is as
/// if it were left out (`?after=` for a first page).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default, deserialize_with = "empty_as_none")]
    status: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    limit: Option<u32>,
    /// Cursor: the `next_cursor` of the previous page.
    #[serde(default, deserialize_with = "empty_as_none")]
    after: Option<String>,
}

/// A query parameter's value, `None` when it is empty.
fn empty_as_none<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let raw = String::deserialize(de)?;
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(serde::de::Error::custom)
}

const MAX_PAGE: u32 = 100;

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_status",
                    format!(
                        "unknown status `{s}`; expected one of queued, running, succeeded, \
                         failed, cancelled"
                    ),
                )
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("`limit` must be from 1 to {MAX_PAGE}"),
        ));
    }
    let before = q
        .after
        .as_deref()
        .map(|raw| {
            parse_id(raw).map_err(|_| {
                ApiError::bad_request(
                    "invalid_cursor",
                    format!("`after` must be a page's `next_cursor` (a job id); got `{raw}`"),
                )
            })
        })
        .transpose()?;
    let mut jobs = state
        .store
        .list_jobs(&ListFilter {
            status,
            limit: limit + 1,
            before,
        })
        .await?;
    let has_more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    let next_cursor = if has_more {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(Json(json!({
        "object": "list",
        "data": jobs.iter().map(view::summary).collect::<Vec<_>>(),
        "has_more": has_more,
        "next_cursor": next_cursor,
    })))
}

pub async fn cancel(
    State(state): State<AppState>,
    JobId(id): JobId,
) -> Result<Json<Value>, ApiError> {
    match state.store.cancel(id, state.clock.now_ms()).await? {
        // A running job's worker hears of it through the store's cancellation signal.
        CancelOutcome::Cancelled { job, .. } => Ok(Json(view_after_change(&state, &job).await)),
        // Cancelled already (this client's own cancel, whose answer was lost, repeated): done,
        // as asked. Only another final status is a conflict.
        CancelOutcome::AlreadyFinal(job) if job.status == JobStatus::Cancelled => {
            Ok(Json(view_after_change(&state, &job).await))
        }
        CancelOutcome::AlreadyFinal(job) => Err(ApiError::conflict(
            "job_already_final",
            format!(
                "job {id} is already {} and cannot be cancelled",
                job.status.as_str()
            ),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("no job with id {id}"))),
    }
}

pub async fn retry(State(state): State<AppState>, JobId(id): JobId) -> Result<Response, ApiError> {
    let retried = state.store.retry_failed(id, state.clock.now_ms()).await;
    // Its answer lost after the statement went out: the job may be requeued already, and a
    // resend, finding it failed again by then, would requeue it once more.
    let retried = retried.map_err(|e| match e.may_have_committed() {
        true => ApiError::from(e).may_have_changed(id, "retry"),
        false => ApiError::from(e),
    });
    match retried? {
        RetryOutcome::Requeued(job) => {
            let view = view_after_change(&state, &job).await;
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
        RetryOutcome::NotRetryable(job) => Err(ApiError::conflict(
            "job_not_failed",
            format!(
                "job {id} is {}; only failed and cancelled jobs can be retried",
                job.status.as_str()
            ),
        )),
        RetryOutcome::NotFound => Err(ApiError::not_found(format!("no job with id {id}"))),
    }
}

/// A job's view after a change to it has committed (cancelled, requeued). When its steps cannot
/// be read just then, the short form of lists, without them: an error would tell the client the
/// change failed, and its retry would be refused as already done.
async fn view_after_change(state: &AppState, job: &Job) -> Value {
    match state.store.get_steps(job.id).await {
        Ok(steps) => view::full(job, &steps),
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e,
                "the job changed but its steps could not be read: answering its short form");
            view::summary(job)
        }
    }
}
