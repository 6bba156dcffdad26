//! The JSON body extractor: axum's `Json`, with its rejections as `ApiError`s, that refuses a
//! body whose JSON tree would weigh far more than its text before building that tree.

use axum::Json;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::error::ApiError;

/// The most JSON objects, and values of any kind, a request body may hold. A parsed tree weighs
/// far more than its text: an object ~650 bytes (a map's first node has room for 11 entries),
/// any other value 32, so 4 MiB of `{"type":"a"},` would take ~200 MiB, and a job's messages are
/// parsed again each time the job is run, shown or cancelled. At these limits a tree is at most
/// ~20 MiB. A long conversation (2,000 messages, a tool call or an image in each) holds ~6,000
/// objects and ~25,000 values.
pub const MAX_BODY_OBJECTS: usize = 20_000;
pub const MAX_BODY_VALUES: usize = 200_000;

/// A JSON body as `T`. Its text is checked as JSON first (into a `RawValue`, one copy of the
/// text and no tree), then counted, then parsed.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // axum's checks and rejections: the content type, the body limit, the syntax.
        let Json(raw) = Json::<Box<RawValue>>::from_request(req, state).await?;
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
        serde_json::from_str(raw.get()).map(ApiJson).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        })
    }
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
