//! The JSON body extractor: axum's `Json`, with its rejections as `ApiError`s, that refuses a
//! body whose JSON tree would weigh far more than its text before building that tree, ends a
//! body that pauses longer than `BODY_IDLE_TIMEOUT`, and parses at most `BODIES_IN_FLIGHT`
//! bytes' worth of bodies at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use super::error::ApiError;

/// The most JSON objects, and values of any kind, a request body may hold. A parsed tree weighs
/// far more than its text: an object ~650 bytes (a map's first node has room for 11 entries),
/// any other value 32, so 4 MiB of `{"type":"a"},` would take ~200 MiB, and a job's messages are
/// parsed again each time the job is run, shown or cancelled. At these limits a tree is at most
/// ~20 MiB. A long conversation (2,000 messages, a tool call or an image in each) holds ~6,000
/// objects and ~25,000 values.
pub const MAX_BODY_OBJECTS: usize = 20_000;
pub const MAX_BODY_VALUES: usize = 200_000;

/// How long a request body may go without a byte arriving, once its handler asks for it: `408
/// body_timeout` past it. A pause, not the whole body: a 4 MiB body on a slow link takes longer
/// than any fixed bound on the whole, and a client that trickles a byte at a time is bounded by
/// the server's other limits (`MAX_BODY_BYTES`, one body per request).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of request bodies are parsed at once, counted by each body's length and at
/// least 64 KiB each: 16 bodies of 4 MiB, or 1,024 small ones. While a body is parsed the
/// server holds its text twice and its tree (up to ~20 MiB); past the budget, a body waits for
/// its turn. Counted once the body is in, so that a client sending slowly holds none of it.
pub const BODIES_IN_FLIGHT: usize = 64 << 20;

/// What a body counts against `BODIES_IN_FLIGHT` at least, and the unit it is counted in.
const BODY_UNIT: usize = 64 << 10;

/// The process's budget of `BODIES_IN_FLIGHT`, in `BODY_UNIT`s.
static BUDGET: Semaphore = Semaphore::const_new(BODIES_IN_FLIGHT / BODY_UNIT);

/// A JSON body as `T`. Its text is checked as JSON first (into a `RawValue`, one copy of the
/// text and no tree), then counted, then parsed.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        read(req, state, &BUDGET, BODY_IDLE_TIMEOUT)
            .await
            .map(ApiJson)
    }
}

/// Receive `req`'s JSON body, no pause longer than `idle`, then parse it within `budget` (in
/// `BODY_UNIT`s). The checks and answers of axum's `Json`: the content type (415), the body
/// limit (413), the syntax (400).
async fn read<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
    budget: &Semaphore,
    idle: Duration,
) -> Result<T, ApiError> {
    if !json_content_type(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_content_type",
            "Expected request with `Content-Type: application/json`",
        ));
    }
    let paused = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Body::from_stream(pauses_bounded(body, idle, paused.clone()));
    let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
        .await
        .map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large()
            } else if paused.load(Ordering::Relaxed) {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "no more of the request body arrived for {} s",
                        idle.as_secs_f64()
                    ),
                )
            } else {
                ApiError::bad_request("invalid_body", r.body_text())
            }
        })?;
    let units = u32::try_from(bytes.len().div_ceil(BODY_UNIT).max(1)).unwrap_or(u32::MAX);
    let _turn = budget.acquire_many(units).await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the body budget is closed",
        )
    })?;
    let Json(raw) = Json::<Box<RawValue>>::from_bytes(&bytes)?;
    let (objects, values) = nodes(raw.get().as_bytes());
    if objects > MAX_BODY_OBJECTS || values > MAX_BODY_VALUES {
        return Err(ApiError::bad_request(
            "body_too_complex",
            format!(
                "the request body holds {objects} JSON objects and about {values} values; \
                 at most {MAX_BODY_OBJECTS} objects and {MAX_BODY_VALUES} values are allowed"
            ),
        ));
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("Failed to deserialize the JSON body into the target type: {e}"),
        )
    })
}

/// Whether `headers` declare a JSON body, as axum's `Json` reads them: `application/json` or
/// `application/*+json`, parameters aside.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// `body`'s bytes as they come, ending in an error (with `paused` set) when none came for
/// `idle`.
fn pauses_bounded(
    body: Body,
    idle: Duration,
    paused: Arc<AtomicBool>,
) -> impl Stream<Item = Result<Bytes, axum::Error>> {
    futures::stream::unfold(Some(body.into_data_stream()), move |stream| {
        let paused = paused.clone();
        async move {
            let mut stream = stream?;
            match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(stream))),
                Ok(None) => None,
                Err(_) => {
                    paused.store(true, Ordering::Relaxed);
                    let error = std::io::Error::new(std::io::ErrorKind::TimedOut, "body paused");
                    Some((Err(axum::Error::new(error)), None))
                }
            }
        }
    })
}

/// How many objects, and about how many values, the JSON text `json` holds: its `{` and its
/// `{`, `[` and `,` outside strings (one `,` between two values; an empty container counts as
/// holding one). `json` is valid JSON: no other state is tracked.
fn nodes(json: &[u8]) -> (usize, usize) {
    let (mut objects, mut values) = (0, 1);
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => {
                objects += 1;
                values += 1;
            }
            b'[' | b',' => values += 1,
            _ => {}
        }
    }
    (objects, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use tokio::sync::oneshot;

    /// A POST of `chunks` as a JSON body, each sent `gap` after the one before, the first when
    /// `go` fires.
    fn body_of(chunks: &[&'static str], gap: Duration, go: oneshot::Receiver<()>) -> Request {
        let chunks = chunks.to_vec();
        let stream = futures::stream::once(go).flat_map(move |_| {
            futures::stream::iter(chunks.clone()).then(move |chunk| async move {
                tokio::time::sleep(gap).await;
                Ok::<_, std::convert::Infallible>(Bytes::from_static(chunk.as_bytes()))
            })
        });
        axum::http::Request::post("/")
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Body::from_stream(stream))
            .unwrap()
    }

    fn sent_now(chunks: &[&'static str], gap: Duration) -> Request {
        let (go, now) = oneshot::channel();
        go.send(()).unwrap();
        body_of(chunks, gap, now)
    }

    // A body that pauses longer than the limit is a 408; one that keeps coming, however long it
    // takes in all, is read.
    #[tokio::test]
    async fn a_body_that_stops_arriving_is_a_408_and_a_slow_one_is_read() {
        let budget = Semaphore::new(1);
        let idle = Duration::from_millis(100);
        let (_held, go) = oneshot::channel();
        let stalled = read::<Value, ()>(body_of(&["{}"], idle, go), &(), &budget, idle);
        let error = stalled.await.unwrap_err();
        assert_eq!((error.status.as_u16(), &*error.code), (408, "body_timeout"));
        let slow = sent_now(&["{\"a\"", ":", "1}"], Duration::from_millis(60));
        let value = read::<Value, ()>(slow, &(), &budget, idle).await.unwrap();
        assert_eq!(value, serde_json::json!({"a": 1}));
    }

    // Past the budget a body waits for its turn to be parsed; a body still arriving holds none
    // of it (a client sending slowly cannot keep others waiting).
    #[tokio::test]
    async fn bodies_past_the_budget_wait_for_their_turn_and_arriving_ones_hold_none() {
        let budget = Semaphore::new(1);
        let idle = Duration::from_secs(5);
        let (_held, go) = oneshot::channel();
        let mut arriving = Box::pin(read::<Value, ()>(
            body_of(&["{}"], idle, go),
            &(),
            &budget,
            idle,
        ));
        let read_now = read::<Value, ()>(sent_now(&["{}"], Duration::ZERO), &(), &budget, idle);
        tokio::select! {
            biased;
            _ = &mut arriving => panic!("that body has not come"),
            value = tokio::time::timeout(Duration::from_secs(2), read_now) => {
                let value = value.expect("a body that came waited behind one still arriving");
                assert_eq!(value.unwrap(), serde_json::json!({}));
            }
        }
        let taken = budget.acquire().await.unwrap();
        let mut waiting = Box::pin(read::<Value, ()>(
            sent_now(&["{}"], Duration::ZERO),
            &(),
            &budget,
            idle,
        ));
        tokio::select! {
            _ = &mut waiting => panic!("parsed past the budget"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        drop(taken);
        assert_eq!(waiting.await.unwrap(), serde_json::json!({}));
    }

    #[test]
    fn json_content_types_are_read_as_axum_reads_them() {
        let declared = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            json_content_type(&headers)
        };
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.x+json",
        ] {
            assert!(declared(yes), "{yes}");
        }
        for no in ["text/plain", "application/jsonx", "json", "text/json"] {
            assert!(!declared(no), "{no}");
        }
        assert!(!json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn objects_and_values_are_counted_outside_strings() {
        assert_eq!(nodes(br#"1"#), (0, 1));
        assert_eq!(nodes(br#"[1,2,3]"#), (0, 4));
        assert_eq!(nodes(br#"{"a":{"b":[{},{}]}}"#), (4, 7));
        // Brackets and commas in strings, escaped quotes included, are text.
        assert_eq!(nodes(br#"{"a":"{[,\"{,"}"#), (1, 2));
        assert_eq!(nodes(br#"["\\",{}]"#), (1, 4));
    }
}
