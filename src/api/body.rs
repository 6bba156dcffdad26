//! The JSON body extractor: axum's `Json`, with its rejections as `ApiError`s, that receives a
//! body into one buffer within time limits (`BODY_IDLE_TIMEOUT`, `BODY_TIMEOUT`), and refuses
//! one whose JSON tree would weigh far more than its text before building that tree.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::BodyLimit;
use super::error::ApiError;
use crate::config::DEFAULT_MAX_BODY_BYTES;

/// The most JSON objects, and values of any kind, a request body may hold. A parsed tree weighs
/// far more than its text (an object's map starts with room for 11 entries): measured with
/// `serde_json::Value` and the system allocator, 4.16 MB of `{"type":"a"},` parts (320,000) took
/// 226 MB more RSS to parse, and 20,000 of them 14 MB; a job's messages are parsed again each
/// time the job is run, shown or cancelled. At these limits a tree is about 40 MB at most: with
/// maps that keep their keys' order (72 bytes a value), 20,000 objects of 9 numbers each took
/// 39 MB more RSS to parse, and 200,000 numbers in arrays 24 MB (19 and 11 MB with the sorted
/// maps used before). A long conversation (2,000 messages, a tool call or an image
/// in each) holds ~6,000 objects and ~25,000 values, by count of its fields.
pub const MAX_BODY_OBJECTS: usize = 20_000;
pub const MAX_BODY_VALUES: usize = 200_000;

/// How long a request body may go without a byte arriving, once its handler asks for it.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a whole request body may take to arrive: a 4 MiB body (the default limit) at
/// ~35 KB/s, a 64 MiB one (the most it may be set to) at ~560 KB/s. With the pause limit, a
/// client sending a byte now and then holds its connection and buffer this long at most. Past
/// either, `408 body_timeout`.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// A JSON body as `T`: received, counted on its text, then parsed once.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        // Set on every request by the router; the default where it is not (a handler called
        // on its own).
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(DEFAULT_MAX_BODY_BYTES, |l| l.0);
        read(req, limit, BODY_IDLE_TIMEOUT, BODY_TIMEOUT)
            .await
            .map(ApiJson)
    }
}

/// Receive `req`'s JSON body (at most `limit` bytes, no pause longer than `idle`, all of it
/// within `whole`), then parse it. The checks and answers of axum's `Json`: the content type
/// (415), the body limit (413), the syntax (400).
async fn read<T: DeserializeOwned>(
    req: Request,
    limit: usize,
    idle: Duration,
    whole: Duration,
) -> Result<T, ApiError> {
    if !json_content_type(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_content_type",
            "Expected request with `Content-Type: application/json`",
        ));
    }
    let bytes = receive(req.into_body(), limit, idle, whole).await?;
    // Counted on the text, before any tree is built (on text that is not JSON the count means
    // little, and the parse below says what is wrong with it).
    let (objects, values) = nodes(&bytes);
    if objects > MAX_BODY_OBJECTS || values > MAX_BODY_VALUES {
        return Err(ApiError::bad_request(
            "body_too_complex",
            format!(
                "the request body holds {objects} JSON objects and about {values} values; \
                 at most {MAX_BODY_OBJECTS} objects and {MAX_BODY_VALUES} values are allowed"
            ),
        ));
    }
    // axum's own parse, and its syntax and data errors.
    let Json(value) = Json::<T>::from_bytes(&bytes)?;
    Ok(value)
}

/// `body` whole, in one buffer (collected frame by frame, a body sent in many small chunks
/// kept a handle per chunk), at most `limit` bytes (413 past it), with no pause longer than
/// `idle` and all of it within `whole` (408 past either).
async fn receive(
    body: Body,
    limit: usize,
    idle: Duration,
    whole: Duration,
) -> Result<Bytes, ApiError> {
    let deadline = Instant::now() + whole;
    let mut chunks = body.into_data_stream();
    let mut received = BytesMut::new();
    loop {
        let by = deadline.min(Instant::now() + idle);
        let chunk = match tokio::time::timeout_at(by, chunks.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => return Ok(received.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!("the request body could not be read: {e}"),
                ));
            }
            Err(_) => {
                let (limit, what) = if Instant::now() >= deadline {
                    (whole, "all of the request body did not arrive within")
                } else {
                    (idle, "no more of the request body arrived for")
                };
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("{what} {} s", limit.as_secs_f64()),
                ));
            }
        };
        if chunk.len() > limit - received.len() {
            return Err(ApiError::body_too_large(limit));
        }
        received.extend_from_slice(&chunk);
    }
}

/// Whether `headers` declare a JSON body, as axum's `Json` reads them: `application/json` or
/// `application/*+json`, parsed as a MIME type.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Ok(mime) = value.parse::<mime::Mime>() else {
        return false;
    };
    mime.type_() == "application"
        && (mime.subtype() == "json" || mime.suffix().is_some_and(|name| name == "json"))
}

/// How many objects, and about how many values, the JSON text `json` holds: its `{` and its
/// `{`, `[` and `,` outside strings (one `,` between two values; an empty container counts as
/// holding one). Only strings are tracked: exact for valid JSON.
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

    /// A POST of `chunks` as a JSON body, each sent `gap` after the one before.
    fn body_of(chunks: &[&'static str], gap: Duration) -> Request {
        let chunks = chunks.to_vec();
        let stream = futures::stream::iter(chunks).then(move |chunk| async move {
            tokio::time::sleep(gap).await;
            Ok::<_, std::convert::Infallible>(Bytes::from_static(chunk.as_bytes()))
        });
        axum::http::Request::post("/")
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Body::from_stream(stream))
            .unwrap()
    }

    // A body that pauses longer than the pause limit is a 408, and so is one that keeps
    // trickling past the limit on the whole; one that keeps coming within both is read, in as
    // many chunks as it came.
    #[tokio::test]
    async fn a_body_that_stops_or_trickles_is_a_408_and_a_slow_one_is_read() {
        let (idle, whole) = (Duration::from_millis(100), Duration::from_millis(400));
        let stalled = body_of(&["{}"], Duration::from_secs(5));
        let stalled = read::<Value>(stalled, 1 << 20, idle, whole);
        let error = stalled.await.unwrap_err();
        assert_eq!((error.status.as_u16(), &*error.code), (408, "body_timeout"));
        assert!(error.message.starts_with("no more"), "{}", error.message);

        let trickle = body_of(
            &["[", "1", ",", "2", ",", "3", ",", "4", "]"],
            Duration::from_millis(60),
        );
        let error = read::<Value>(trickle, 1 << 20, idle, whole)
            .await
            .unwrap_err();
        assert_eq!((error.status.as_u16(), &*error.code), (408, "body_timeout"));
        assert!(error.message.starts_with("all of"), "{}", error.message);

        let slow = body_of(&["{\"a\"", ":", "1}"], Duration::from_millis(60));
        let value = read::<Value>(slow, 1 << 20, idle, whole).await.unwrap();
        assert_eq!(value, serde_json::json!({"a": 1}));
    }

    // Over the limit, however it comes (no length was declared): a 413 that names it.
    #[tokio::test]
    async fn a_body_over_the_limit_is_a_413() {
        let chunk: &'static str = Box::leak("x".repeat(1 << 20).into_boxed_str());
        let big = body_of(&[chunk; 5], Duration::ZERO);
        let error = read::<Value>(big, 4 << 20, BODY_IDLE_TIMEOUT, BODY_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(
            (error.status.as_u16(), &*error.code),
            (413, "body_too_large")
        );
        assert!(error.message.contains("4 MiB"), "{}", error.message);
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
        for no in [
            "text/plain",
            "application/jsonx",
            "json",
            "text/json",
            "application/json; charset",
        ] {
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
