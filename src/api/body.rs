//! The JSON body extractor: axum's `Json`, with its rejections as `ApiError`s, that refuses a
//! body whose JSON tree would weigh far more than its text before building that tree, takes at
//! most `BODY_READ_TIMEOUT` to receive one, and reads at most `BODIES_IN_FLIGHT` bytes' worth
//! of bodies at once.

use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use super::MAX_BODY_BYTES;
use super::error::ApiError;

/// The most JSON objects, and values of any kind, a request body may hold. A parsed tree weighs
/// far more than its text: an object ~650 bytes (a map's first node has room for 11 entries),
/// any other value 32, so 4 MiB of `{"type":"a"},` would take ~200 MiB, and a job's messages are
/// parsed again each time the job is run, shown or cancelled. At these limits a tree is at most
/// ~20 MiB. A long conversation (2,000 messages, a tool call or an image in each) holds ~6,000
/// objects and ~25,000 values.
pub const MAX_BODY_OBJECTS: usize = 20_000;
pub const MAX_BODY_VALUES: usize = 200_000;

/// How long a request body may take to arrive once its handler asks for it: `408
/// body_timeout` past it. A client trickling a body would otherwise hold its share of
/// `BODIES_IN_FLIGHT` for as long as it liked.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of request bodies are received and parsed at once, counted by what each
/// declares (`Content-Length`; the 4 MiB limit for one that does not say) and at least 64 KiB
/// each: 16 bodies of 4 MiB, or 1,024 small ones. While a body is parsed the server holds its
/// text twice and its tree (up to ~20 MiB), so without a bound the bodies of many clients at
/// once were memory without end; past it, a request waits for its turn.
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
        read(req, state, &BUDGET, BODY_READ_TIMEOUT)
            .await
            .map(ApiJson)
    }
}

/// Receive and parse `req`'s JSON body within `budget` (in `BODY_UNIT`s) and `timeout`.
async fn read<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
    budget: &Semaphore,
    timeout: Duration,
) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(MAX_BODY_BYTES)
        .min(MAX_BODY_BYTES);
    let units = u32::try_from(declared.div_ceil(BODY_UNIT).max(1)).unwrap_or(u32::MAX);
    let _turn = budget.acquire_many(units).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    })?;
    // axum's checks and rejections: the content type, the body limit, the syntax.
    let read = Json::<Box<RawValue>>::from_request(req, state);
    let Json(raw) = tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )
    })??;
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
    use axum::body::Body;
    use bytes::Bytes;
    use serde_json::Value;
    use tokio::sync::oneshot;

    /// A POST of the JSON `{}` whose body arrives when `go` fires.
    fn held_body(go: oneshot::Receiver<()>) -> Request {
        let chunk = async move {
            let _ = go.await;
            Ok::<_, std::convert::Infallible>(Bytes::from_static(b"{}"))
        };
        axum::http::Request::post("/")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, "2")
            .body(Body::from_stream(futures::stream::once(chunk)))
            .unwrap()
    }

    // A body that does not arrive in time is a 408, and gives its share of the budget back.
    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_a_408() {
        let budget = Semaphore::new(1);
        let (_held, go) = oneshot::channel();
        let read = read::<Value, ()>(held_body(go), &(), &budget, Duration::from_millis(100));
        let error = read.await.unwrap_err();
        assert_eq!((error.status.as_u16(), &*error.code), (408, "body_timeout"));
        assert_eq!(budget.available_permits(), 1);
    }

    // Past the budget a body waits for its turn: here the budget is one small body's, and the
    // second is read once the first has been.
    #[tokio::test]
    async fn bodies_past_the_budget_wait_for_their_turn() {
        let budget = Semaphore::new(1);
        let timeout = Duration::from_secs(5);
        let (first_go, go) = oneshot::channel();
        let first = read::<Value, ()>(held_body(go), &(), &budget, timeout);
        let (second_go, go) = oneshot::channel();
        second_go.send(()).unwrap();
        let second = read::<Value, ()>(held_body(go), &(), &budget, timeout);
        let (mut first, mut second) = (Box::pin(first), Box::pin(second));
        // Biased: the first is polled first, and takes the budget.
        tokio::select! {
            biased;
            _ = &mut first => panic!("the first body has not come"),
            _ = &mut second => panic!("the second body was read past the budget"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        first_go.send(()).unwrap();
        assert_eq!(first.await.unwrap(), serde_json::json!({}));
        assert_eq!(second.await.unwrap(), serde_json::json!({}));
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
