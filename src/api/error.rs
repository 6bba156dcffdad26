//! One error type for every endpoint, mapped to HTTP in one place. Bodies follow the OpenAI shape
//! `{"error": {"code", "message", "param", "type"}}` so SDKs raise their usual exceptions. Internal errors
//! are logged here once and answered with a generic message. An error answered after the request
//! enqueued a job names the job and tells SDKs not to retry: a retry would be a new, paid job.

use std::borrow::Cow;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::chat::{JOB_HEADER, jobs_header};
use crate::store::StoreError;
// The OpenAI SDKs retry 408, 409, 429 and 5xx answers unless this header says `false`.
use crate::upstream::{ErrorKind, SHOULD_RETRY as SHOULD_RETRY_HEADER, UpstreamError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Fixed for request errors; a failed job's is its `failure_reason`.
    pub code: Cow<'static, str>,
    pub message: String,
    /// The jobs the request enqueued before this error: named in the answer (and its
    /// `x-fusion-job-id`), which also carries `x-should-retry: false`.
    pub jobs: Vec<Uuid>,
    /// The request field at fault, when one is (`error.param`; `null` otherwise).
    pub param: Option<&'static str>,
    /// How long an upstream asked to be left alone (its `Retry-After`), passed on as ours.
    pub retry_after: Option<Duration>,
    /// The same request would fail the same way whatever its status (answered with
    /// `x-should-retry: false`): a refusal of this server's credentials, or its provider
    /// account out of credit, until an operator mends them; an upstream's own
    /// `x-should-retry: false`; a relay loop.
    pub same_again: bool,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            jobs: Vec::new(),
            param: None,
            retry_after: None,
            same_again: false,
        }
    }

    /// This error, answered after a change to job `id` whose commit was not confirmed (it may
    /// have taken effect): the job is named, and SDKs are told not to send the change again,
    /// since a resend would be a change of its own (a retry requeued twice is a run nobody
    /// asked for, paid for).
    pub fn may_have_changed(mut self, id: Uuid, change: &str) -> ApiError {
        self.jobs.push(id);
        self.message = format!(
            "the database did not confirm the {change} of job {id}, which may have taken \
             effect: fetch it from GET /v1/jobs/{id} rather than sending it again"
        );
        self
    }

    /// This error, about the request field `param`.
    pub fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    /// This error, answered with `Retry-After` (whole seconds, rounded up) when `after` is set.
    pub fn retry_after(mut self, after: Option<Duration>) -> ApiError {
        self.retry_after = after;
        self
    }

    /// This error, answered after the request enqueued `jobs`: the message names each job not
    /// named yet, where to fetch it, and the answer tells SDKs not to retry.
    pub fn after_jobs(mut self, jobs: &[Uuid]) -> ApiError {
        for &id in jobs {
            if self.jobs.contains(&id) {
                continue;
            }
            self.jobs.push(id);
            if !self.message.contains(&id.to_string()) {
                self.message += &format!(
                    "; fusion job {id} was enqueued and is not lost: fetch it from GET \
                     /v1/jobs/{id} rather than retrying"
                );
            }
        }
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// A request body over `limit` bytes (`[server] max_body_mib`), whether its length was
    /// declared or not.
    pub fn body_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is over the limit of {} MiB ({limit} bytes; the server's \
                 `[server] max_body_mib`)",
                limit >> 20
            ),
        )
    }

    /// An upstream call's failure, as this server answers it: the upstream's own error status
    /// passes on (an answer with a success or redirect status that could not be used is a bad
    /// gateway), but for a refusal of this server's credentials (401, 403, a proxy's 407 or 511:
    /// an SDK would raise an authentication error about the client's key, which is fine),
    /// `502 upstream_auth`; for its account out of credit, `502 upstream_quota` (the client's
    /// SDK would take a 429 for its own rate limit); for our own timeout, `504
    /// upstream_timeout`, as a proxy answers it;
    /// for an upstream not reached, `502 upstream_unreachable`. The upstream's `Retry-After`
    /// passes on.
    pub fn upstream(e: UpstreamError) -> ApiError {
        let (status, code) = match e.kind {
            ErrorKind::Auth => (StatusCode::BAD_GATEWAY, "upstream_auth"),
            ErrorKind::Quota => (StatusCode::BAD_GATEWAY, "upstream_quota"),
            ErrorKind::Timeout if e.status.is_none() => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            }
            // Not reached at all (refused, reset, a name that does not resolve): nothing came
            // back to pass on.
            ErrorKind::Connect if e.status.is_none() => {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable")
            }
            _ => {
                let status = e
                    .status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                (status, "upstream_error")
            }
        };
        ApiError {
            same_again: matches!(e.kind, ErrorKind::Auth | ErrorKind::Quota) || e.not_again,
            ..ApiError::new(status, code, e.message).retry_after(e.retry_after)
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            503 => "service_unavailable",
            _ => "api_error",
        }
    }

    /// The `{"error": {"code", "message", "param", "type"}}` body, also sent as a stream's last
    /// event.
    /// Log a server-side failure (a 5xx), once, however it reaches the client: as a response,
    /// or as an error event in a stream that had started.
    pub fn log(&self) {
        if self.status.is_server_error() {
            tracing::error!(code = %self.code, message = %self.message, "request failed");
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "type": self.kind(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut resp = (self.status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if !self.jobs.is_empty() {
            headers.insert(JOB_HEADER, jobs_header(&self.jobs));
            headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
        } else if (self.status.is_client_error() && !matches!(self.status.as_u16(), 408 | 429))
            || self.same_again
        {
            // The same request gets the same answer: the SDKs would resend a 409 (a retry of a
            // job still running) up to twice, and a resend that lands once the job has failed
            // again would requeue it, a paid run nobody asked for. So is a refusal of this
            // server's credentials (a 502), until an operator mends them.
            headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
        } else if let Some(after) = self.retry_after {
            // An upstream's own wait, passed on (at most what a step waits out): the SDKs wait
            // as long as it says rather than going straight back into the provider's limit.
            let after = after.min(crate::upstream::MAX_RETRY_AFTER);
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Nothing was stored: a retry is safe, and the SDKs wait as long as this says
            // rather than spending their retries within a second and a half.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if e.is_unavailable() {
            tracing::error!(error = %e, "database unavailable");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; try again shortly",
            );
        }
        tracing::error!(error = %e, "store error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "an internal error occurred",
        )
    }
}

impl From<JsonRejection> for ApiError {
    /// What `Json::from_bytes` refuses: text that is not JSON, or JSON of another shape. (The
    /// body's type, size and arrival are `body.rs`'s to check, before.)
    fn from(r: JsonRejection) -> ApiError {
        let code = match r {
            JsonRejection::JsonSyntaxError(_) => "invalid_json",
            _ => "invalid_body",
        };
        ApiError::bad_request(code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}
