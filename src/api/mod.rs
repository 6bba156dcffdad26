//! The HTTP API (axum): routes, shared state and the body limit. Every error answers in one
//! shared body (`error.rs`), the JSON extractor's rejections too (`body.rs`). Handlers turn
//! requests into domain values and call the store; fusion steps are never run here (workers do
//! that) — only the gateway pass-through and the fusion tool's outer model call upstream from a
//! request.

mod body;
mod chat;
pub mod error;
mod jobs;
mod relay;
pub mod request;
mod stream;
mod tool;
mod view;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{OriginalUri, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::clock::SharedClock;
use crate::config::FusionConfig;
use crate::job::JobIds;
use crate::store::Store;
use crate::upstream::Upstream;
use crate::worker::Worker;
pub use body::ApiJson;
pub use error::ApiError;
use watch::JobWatch;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<FusionConfig>,
    pub clock: SharedClock,
    pub upstream: Arc<Upstream>,
    /// Wakes requests that wait on a job.
    pub watch: Arc<JobWatch>,
    /// This process's worker, if it runs one: a job submitted here may start here at once.
    pub worker: Option<Arc<Worker>>,
    /// Where new jobs' ids come from.
    pub job_ids: Arc<JobIds>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        config: Arc<FusionConfig>,
        clock: SharedClock,
        upstream: Arc<Upstream>,
        worker: Option<Arc<Worker>>,
    ) -> AppState {
        let watch = JobWatch::start(store.clone(), config.wait_outage);
        AppState {
            store,
            config,
            clock,
            upstream,
            watch,
            worker,
            job_ids: Arc::default(),
        }
    }
}

/// The body limit of the request at hand (`[server] max_body_mib`), for `ApiJson`: set by
/// `refuse_long_bodies` on every request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(chat::models))
        .route("/v1/models/{*id}", get(chat::model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Every body is read by `ApiJson`, which holds it to `[server] max_body_mib` as it
        // arrives; a declared length over that is refused before reading.
        .layer(middleware::from_fn_with_state(
            state.config.max_body_bytes,
            refuse_long_bodies,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers a ping within 2 s. Why it did not goes to the log, not to
/// whoever asks: the database's own message may name its host, user or a failed password.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let error = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => return (StatusCode::OK, Json(json!({"status": "ready"}))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check: the database did not answer");
            "the database did not answer a ping (see the server's log)"
        }
        Err(_) => "database ping timed out",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "unavailable", "error": error})),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// A known path with another method: the JSON error body (axum adds the `Allow` header).
async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; the Allow header lists the methods that are",
            uri.path()
        ),
    )
}

/// The header the OpenAI SDKs read a request's id from (`_request_id`, and on their errors).
const REQUEST_ID: &str = "x-request-id";

/// Every answer carries an `x-request-id`, `req_` and a UUID, also recorded on the request's
/// log lines (its span); a relayed answer keeps the upstream's own, which its provider knows.
async fn request_id(request: Request, next: Next) -> Response {
    let id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let span = tracing::info_span!("request", id = %id);
    let mut resp = tracing::Instrument::instrument(next.run(request), span).await;
    if !resp.headers().contains_key(REQUEST_ID) {
        let value = header::HeaderValue::from_str(&id).expect("letters and digits");
        resp.headers_mut().insert(REQUEST_ID, value);
    }
    resp
}

/// Refuse a body whose `Content-Length` is over the limit without reading it. (tower-http's
/// `RequestBodyLimitLayer` would answer this in text/plain, not in the shared error body.)
async fn refuse_long_bodies(
    State(limit): State<usize>,
    mut request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::body_too_large(limit).into_response();
    }
    request.extensions_mut().insert(BodyLimit(limit));
    next.run(request).await
}
