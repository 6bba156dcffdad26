//! The chat-completions body on the wire: the request written field by field from a
//! `CompletionRequest`, the answer and its `usage` read leniently (servers disagree on both).

use serde::Deserialize;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::CompletionRequest;

/// A chat-completions request body, written field by field from a `CompletionRequest`.
pub(super) struct WireRequest<'a> {
    pub(super) model: &'a str,
    pub(super) req: &'a CompletionRequest<'a>,
    /// `max_completion_tokens` or `max_tokens`, as the provider wants it.
    pub(super) max_tokens_field: &'a str,
}

impl Serialize for WireRequest<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        map.serialize_entry("messages", &self.req.messages)?;
        map.serialize_entry("stream", &false)?;
        if let Some(t) = self.req.temperature {
            map.serialize_entry("temperature", &t)?;
        }
        if let Some(n) = self.req.max_completion_tokens {
            map.serialize_entry(self.max_tokens_field, &n)?;
        }
        if let Some(rf) = &self.req.response_format {
            map.serialize_entry("response_format", rf)?;
        }
        if let Some(stop) = self.req.stop {
            map.serialize_entry("stop", stop)?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
pub(super) struct WireResponse {
    pub(super) choices: Vec<WireChoice>,
    #[serde(default)]
    pub(super) usage: Option<WireUsage>,
    /// An error reported beside the choices (OpenRouter answers a failure once the model has
    /// started with a 200); `null` is none.
    #[serde(default)]
    pub(super) error: Value,
}

#[derive(Deserialize)]
pub(super) struct WireChoice {
    /// Absent or `null` when a choice has no text (a content filter's `finish_reason` alone):
    /// an empty completion, billed, not a garbled answer to ask for again.
    #[serde(default)]
    pub(super) message: Option<WireMessage>,
    /// Read leniently, like `usage`: a `finish_reason` that is not a string (a null, an object
    /// from some servers) is absent, not a reason to throw away a completion that was paid for.
    #[serde(default, deserialize_with = "lenient_string")]
    pub(super) finish_reason: Option<String>,
    /// The error a choice ended with (OpenRouter: `finish_reason: "error"` and this object);
    /// `null` is none.
    #[serde(default)]
    pub(super) error: Value,
}

/// The error an answer reports beside its text, if any: a choice's own `error` (OpenRouter ends
/// a choice whose model failed once it had started with it and `finish_reason: "error"`), or
/// one beside the choices (`top`); `null` is none. The model failed mid-answer, and what came
/// back is cut short however it reads. Its words: the error's `message`, or the error as it
/// came.
pub(super) fn reported_error(
    top: &Value,
    choice: &Value,
    finish_reason: Option<&str>,
) -> Option<String> {
    let error = [choice, top].into_iter().find(|e| !e.is_null());
    if error.is_none() && finish_reason != Some("error") {
        return None;
    }
    Some(match error {
        Some(e) => match e.get("message").and_then(Value::as_str) {
            Some(message) => message.to_string(),
            None => e.to_string(),
        },
        None => "finish_reason `error`".to_string(),
    })
}

#[derive(Deserialize)]
pub(super) struct WireMessage {
    /// A string, or an array of content parts (`[{"type": "text", "text": "..."}]`, which some
    /// OpenAI-compatible servers answer): see `text_of`.
    #[serde(default, deserialize_with = "content_text")]
    pub(super) content: Option<String>,
    /// Why the model declined, in place of `content` (OpenAI's structured outputs).
    #[serde(default, deserialize_with = "lenient_string")]
    pub(super) refusal: Option<String>,
}

fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Value::deserialize(d).map(|v| match v {
        Value::String(s) => Some(s),
        _ => None,
    })
}

fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Value::deserialize(d).map(text_of)
}

/// The text of a message's `content`: a string as it is; of an array of content parts, the
/// `text` of its `{"type": "text"}` parts joined as they come (they are pieces of one answer:
/// servers that split it, around citations say, split it mid-sentence). Every other part (an
/// image, a reasoning or `thinking` block, a citation) is left out: the answer is the text.
/// Anything else, or parts with no text, is no content (the call then fails as an empty
/// completion).
pub fn text_of(content: Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s),
        Value::Array(parts) => {
            let text: Vec<&str> = parts
                .iter()
                .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            (!text.is_empty()).then(|| text.concat())
        }
        _ => None,
    }
}

/// `usage`, read leniently: servers send nulls, floats and numbers as strings, and a completion
/// that was paid for is not thrown away (and asked for again) over how its usage is written.
/// A token count is a number or a numeric string, cut to 0..=`MAX_TOKENS`; anything else is 0.
/// A cost is read the same way; one that is not a number from 0 to `MAX_COST` is absent (the
/// price table prices the call).
pub(super) struct WireUsage {
    pub(super) prompt_tokens: i64,
    pub(super) completion_tokens: i64,
    pub(super) cost: Option<f64>,
}

/// The most tokens one call is counted for: past any context window, and small enough that
/// sums of many cannot overflow (the stores add the two counts up again as they read them).
const MAX_TOKENS: i64 = u32::MAX as i64;

/// The most one call is taken to cost, in dollars: past any real price, and small enough that
/// sums of many stay finite (an infinite cost would be written as JSON `null`).
const MAX_COST: f64 = 1e9;

impl WireUsage {
    pub(super) fn of(usage: &Value) -> WireUsage {
        let tokens =
            |field| number(usage.get(field)).map_or(0, |n| n.clamp(0.0, MAX_TOKENS as f64) as i64);
        WireUsage {
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
            cost: number(usage.get("cost")).filter(|c| (0.0..=MAX_COST).contains(c)),
        }
    }
}

impl<'de> Deserialize<'de> for WireUsage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WireUsage, D::Error> {
        Value::deserialize(d).map(|usage| WireUsage::of(&usage))
    }
}

/// A finite JSON number, or a string that holds one.
fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Content as a string or as content parts (only text parts count); a `finish_reason` that
    // is not a string is absent. Nothing here is an error of the body: what has no text is an
    // empty completion, which `complete` reports as such.
    #[test]
    fn content_parts_are_joined_and_odd_finish_reasons_are_absent() {
        for (choice, content, finish_reason) in [
            (
                r#"{"message": {"content": "hi"}, "finish_reason": "stop"}"#,
                Some("hi"),
                Some("stop"),
            ),
            (
                r#"{"message": {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
                    {"type": "text", "text": "The answer"}, {"type": "reference", "reference_ids": [1]},
                    {"type": "text", "text": " is 42."}, {"type": "text", "text": 7}, "stray"]},
                   "finish_reason": null}"#,
                Some("The answer is 42."),
                None,
            ),
            (
                r#"{"message": {"content": []}, "finish_reason": 3}"#,
                None,
                None,
            ),
            (
                r#"{"message": {"content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "finish_reason": {"type": "stop"}}"#,
                None,
                None,
            ),
            (r#"{"message": {"content": null}}"#, None, None),
            (
                r#"{"message": {"content": 12}, "finish_reason": ["stop"]}"#,
                None,
                None,
            ),
            (r#"{"message": {}}"#, None, None),
            (
                r#"{"message": null, "finish_reason": "content_filter"}"#,
                None,
                Some("content_filter"),
            ),
            (
                r#"{"index": 0, "finish_reason": "content_filter"}"#,
                None,
                Some("content_filter"),
            ),
        ] {
            let wire: WireResponse =
                serde_json::from_str(&format!(r#"{{"choices": [{choice}]}}"#)).expect(choice);
            let read = &wire.choices[0];
            let text = read.message.as_ref().and_then(|m| m.content.as_deref());
            assert_eq!(text, content, "{choice}");
            assert_eq!(read.finish_reason.as_deref(), finish_reason, "{choice}");
        }
    }
}
