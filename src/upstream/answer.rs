//! A 2xx answer read whole, and what it is parsed into. An answer that is not what was asked
//! for says what came back, in one line the job keeps and API clients see: never a credential
//! the body may echo, and never the body whole.

use std::borrow::Cow;

use bytes::Bytes;
use hyper::header::HeaderValue;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::wire::WireUsage;
use super::{ErrorKind, Provider, UpstreamError};
use crate::redact::redact_url;

/// A 2xx answer, its body read whole (up to `MAX_ANSWER_BYTES`).
pub(super) struct Answered {
    pub status: u16,
    /// Shown when the body is not JSON: `text/html` says at once that a web page came back.
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl Answered {
    /// The body as `T`, or why it is not one. A body that is not JSON at all (a web page, plain
    /// text, a stream that was not asked for) is final: the same URL answers the same again,
    /// and the likely cause is a wrong base URL (the provider's, shown redacted, with its key
    /// hidden should the page echo it). A body that ends before its JSON does was cut off (a
    /// close ended it early) and JSON of another shape may be an error reported in a 2xx
    /// (OpenRouter does so for a model that fails mid-answer): both are retried. So is a JSON
    /// object followed by other bytes: an API did answer (the URL is right), but garbled.
    /// `key`: the credential the call sent (see `Endpoint::credential`), hidden wherever shown.
    pub fn parse<T: DeserializeOwned>(
        &self,
        provider: &Provider,
        key: Option<&str>,
    ) -> Result<T, UpstreamError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            // Off the happy path only: what the body is, whatever `T` wants, read once.
            let mut values = serde_json::Deserializer::from_slice(&self.body).into_iter::<Value>();
            let message = match (values.next(), values.next()) {
                // An error reported in a 2xx says what went wrong in its own words, and may
                // carry the status it stands for (a proxy's `{"error": {"code": 401}}`): that
                // classes it, so a refused key is not sent again as a garbled answer would be.
                (Some(Ok(whole)), None) if whole.get("error").is_some_and(|e| !e.is_null()) => {
                    let text = key_hidden(String::from_utf8_lossy(&self.body), key);
                    let message = format!(
                        "upstream answered {} with an error: {}",
                        self.status,
                        super::error::upstream_message(&serde_json::from_str(&text).ok(), &text)
                    );
                    let (kind, status) = named(&whole["error"], self.status);
                    return UpstreamError::new(kind, Some(status), message);
                }
                // Text, or a value that is not an object, with more after it. A body that
                // starts as an object or array and breaks part way (a byte that is not UTF-8,
                // a stray comma) is a garbled answer, retried as one, not a page.
                (Some(Err(text)), _) if !text.is_eof() && !self.starts_as_json() => {
                    return self.not_json(provider, key);
                }
                (Some(Ok(first)), Some(_)) if !first.is_object() => {
                    return self.not_json(provider, key);
                }
                (Some(Ok(_)), Some(_)) => format!(
                    "upstream answered {} with a JSON object followed by other bytes: `{}`",
                    self.status,
                    excerpt(&self.body, key)
                ),
                // JSON of another shape; an empty body, or one cut off before its JSON ended.
                _ => format!("upstream body is not a chat completion: {e}"),
            };
            UpstreamError::new(ErrorKind::BadBody, Some(self.status), message)
        })
    }

    /// The `usage` of a body that is not the answer asked for, if it has one (a 2xx error
    /// object, a choice in another shape, a whole answer with bytes after it): that call was
    /// billed all the same. Read from the body's first JSON value, whatever follows it.
    pub fn usage(&self) -> Option<WireUsage> {
        #[derive(serde::Deserialize)]
        struct Billed {
            #[serde(default)]
            usage: Option<WireUsage>,
        }
        let mut values = serde_json::Deserializer::from_slice(&self.body).into_iter::<Billed>();
        values.next()?.ok()?.usage
    }

    /// Whether the body starts as a JSON object or array would (past any whitespace).
    fn starts_as_json(&self) -> bool {
        let first = self.body.iter().find(|b| !b.is_ascii_whitespace());
        matches!(first, Some(b'{' | b'['))
    }

    /// A body that is not JSON at all: what came back, and where it came from.
    fn not_json(&self, provider: &Provider, key: Option<&str>) -> UpstreamError {
        let content_type = self.content_type.as_ref().map_or_else(
            || "no content-type".to_string(),
            |v| format!("content-type {}", excerpt(v.as_bytes(), None)),
        );
        UpstreamError::new(
            ErrorKind::NotJson,
            Some(self.status),
            format!(
                "upstream answered {} ({content_type}) with a body that is not JSON: `{}`; \
                     is {} the API's base URL (the one under which POST /chat/completions \
                     answers)?",
                self.status,
                excerpt(&self.body, key),
                redact_url(&provider.base_url),
            ),
        )
    }
}

/// `text` with `key` shown as `***` wherever it appears whole: done before an error message is
/// cut from the text, since a key cut in two would not be found whole afterwards.
pub(super) fn key_hidden<'a>(text: Cow<'a, str>, key: Option<&str>) -> Cow<'a, str> {
    match key.filter(|k| !k.is_empty()) {
        Some(key) if text.contains(key) => Cow::Owned(text.replace(key, "***")),
        _ => text,
    }
}

/// The kind and status of an error reported in a 2xx (answered with `status`) in place of an
/// answer: those of the status it names (`status_in`), so that it is recorded and answered as
/// that status would be; else a garbled answer's (retried).
pub(super) fn named(error: &Value, status: u16) -> (ErrorKind, u16) {
    match status_in(error) {
        Some(named) => {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default();
            (
                super::error::kind_of_error(named, Some(error), message),
                named,
            )
        }
        None => (ErrorKind::BadBody, status),
    }
}

/// The HTTP status an error object in a 2xx stands for: its `code` or `status`, a number or
/// a numeric string, from 400 to 599 (OpenRouter and LiteLLM write the status as `code`;
/// OpenAI's string codes such as `invalid_api_key` are not statuses).
fn status_in(error: &Value) -> Option<u16> {
    ["code", "status"].into_iter().find_map(|field| {
        let status = match error.get(field)? {
            Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        (400..=599).contains(&status).then_some(status)
    })
}

/// How many characters of a body an error message shows.
const EXCERPT_CHARS: usize = 200;

/// How many characters of an upstream's own error message are kept: room for a provider's
/// explanation (a context-length message names both counts), not for a body echoed whole.
pub(super) const MESSAGE_CHARS: usize = 1000;

/// The start of a body for an error message, on one line (control characters and runs of white
/// space become one space), at most `EXCERPT_CHARS` characters (`...` marks a cut), with what
/// may be a credential shown as `***`: `key` wherever it appears, the userinfo of URLs
/// (`redact_url`), and the word after `Bearer` or `Basic`. A page may echo the request's
/// headers, and the message is stored with the job and shown to API clients.
pub(super) fn excerpt(body: &[u8], key: Option<&str>) -> String {
    one_line(body, key, EXCERPT_CHARS)
}

/// `excerpt`, at most `max_chars` characters.
pub(super) fn one_line(body: &[u8], key: Option<&str>, max_chars: usize) -> String {
    // Far past what is shown, so that every word shown is redacted whole.
    let start = key_hidden(
        String::from_utf8_lossy(&body[..body.len().min(8 << 10)]),
        key,
    );
    let mut words = Vec::new();
    let mut after_scheme = false;
    for word in start.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        words.push(if after_scheme {
            "***".to_string()
        } else {
            redact_url(word)
        });
        after_scheme = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
    }
    let line = words.join(" ");
    match line.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_one_short_line_without_credentials() {
        for (body, key, shown) in [
            (
                "{\"error\": \"overloaded\"}",
                None,
                "{\"error\": \"overloaded\"}",
            ),
            ("a\n\n\tb\u{7}c  d", None, "a b c d"),
            ("key=sk-12345&x", Some("sk-12345"), "key=***&x"),
            (
                "Authorization: bearer eyJ.x go <a href=\"https://tok@h/\">",
                None,
                "Authorization: bearer *** go <a href=\"https://***@h/\">",
            ),
            ("", None, ""),
        ] {
            assert_eq!(excerpt(body.as_bytes(), key), shown);
        }
        let long = "é".repeat(EXCERPT_CHARS + 1);
        assert_eq!(
            excerpt(long.as_bytes(), None),
            format!("{}...", "é".repeat(EXCERPT_CHARS))
        );
        // Not UTF-8: shown as replacement characters, never a panic.
        assert_eq!(excerpt(&[0xff, b'a'], None), "\u{fffd}a");
    }
}
