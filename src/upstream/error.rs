//! How an upstream call failed: every failure (an HTTP status, a transport or parse error from
//! reqwest or hyper) is classified here, once, into an `ErrorKind` that decides whether it is
//! retried and which code a job records.

use std::time::{Duration, SystemTime};

use hyper::header::HeaderValue;
use serde_json::Value;

use super::answer;
use crate::job::Usage;

/// How a call failed; the one place that decides what may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429.
    RateLimited,
    /// 408, or our own per-call timeout.
    Timeout,
    /// Could not connect, or the connection was reset.
    Connect,
    /// 409, 425, or a 5xx but 501, 505, 508 and 511.
    Server,
    /// The body was cut off or was not a chat completion.
    BadBody,
    /// 401 / 403, or a proxy's login (407, 511): this server's credentials, refused.
    Auth,
    /// 402, or a 429 whose error is `insufficient_quota`: the account behind this server's
    /// key is out of credit, which no retry mends until an operator tops it up.
    Quota,
    /// 404: the model (or endpoint) does not exist.
    NotFound,
    /// 400 / 422 and any other 4xx: the request itself is wrong.
    Rejected,
    /// A well-formed completion with no content.
    Empty,
    /// A 2xx answer's body past `MAX_ANSWER_BYTES`: not a completion, and no retry makes it one.
    TooLarge,
    /// A 2xx answer whose body is not JSON at all: a web page (a wrong base URL), plain text.
    /// The same URL answers the same again.
    NotJson,
    /// An answer that is not HTTP/1.1 hyper can read (its head does not parse, or is past
    /// hyper's limits): another protocol on that port, which no retry changes.
    NotHttp,
    /// A 400, 413 or 422 refusing a prompt too long for the model's context: the same prompt
    /// is refused again (a shorter one may pass: see `prompts::shortened`).
    TooLong,
    /// A TLS handshake that failed on what the server presented or said: a certificate that
    /// is expired, self-signed or for another name, no protocol in common, or no TLS at all
    /// on that port (an `https://` base URL for a plain-HTTP server). The same server answers
    /// the same again until an operator mends it.
    Tls,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    pub message: String,
    /// What the failed call(s) were billed for: a completion that came back but is not taken
    /// (empty, or an error reported mid-answer) still used tokens. Summed over a step's tries
    /// by `Upstream::complete_with_retries`; zero where nothing came back.
    pub usage: Usage,
    /// The upstream said not to send the request again (`x-should-retry: false`, which the
    /// OpenAI SDKs obey too), whatever its status.
    pub not_again: bool,
}

impl UpstreamError {
    pub(super) fn new(kind: ErrorKind, status: Option<u16>, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            status,
            retry_after: None,
            message: message.into(),
            usage: Usage::default(),
            not_again: false,
        }
    }

    pub fn retryable(&self) -> bool {
        !self.not_again
            && matches!(
                self.kind,
                ErrorKind::RateLimited
                    | ErrorKind::Timeout
                    | ErrorKind::Connect
                    | ErrorKind::Server
                    | ErrorKind::BadBody
            )
    }

    /// The typed failure code recorded on a step and used as a job's `failure_reason`.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::NotFound => "invalid_model",
            ErrorKind::Timeout => "upstream_timeout",
            ErrorKind::Auth => "upstream_auth",
            ErrorKind::Quota => "upstream_quota",
            ErrorKind::TooLong => TOO_LONG,
            ErrorKind::Empty => "empty_completion",
            _ => "upstream_error",
        }
    }

    /// The same error, billed for `usage` too.
    pub(super) fn billed(mut self, usage: Usage) -> Self {
        self.usage.add(&usage);
        self
    }

    /// Whether an error answered with `status` may pass if the call is made again later: the
    /// statuses `from_status` classes as retryable.
    pub fn status_may_pass(status: u16) -> bool {
        UpstreamError::new(kind_of_status(status), Some(status), "").retryable()
    }

    /// Whether an answer with `status` refuses this server's own credentials (its key for the
    /// provider, or its proxy's login): never the client's, whose request this server makes
    /// with them.
    pub fn status_refuses_our_credentials(status: u16) -> bool {
        kind_of_status(status) == ErrorKind::Auth
    }

    /// This error with `key` (the API key the call was made with) shown as `***` wherever its
    /// message has it: an upstream may echo the key it was sent ("invalid key sk-..."), and
    /// the message is stored with the job and shown to API clients.
    pub fn hiding(mut self, key: Option<&str>) -> Self {
        self.message = answer::key_hidden(self.message.into(), key).into_owned();
        self
    }

    /// A request refused for its `temperature` (a `400` or `422` whose message names it: a
    /// model that takes only its own, as OpenAI's reasoning models and Anthropic's with
    /// extended thinking do).
    pub(super) fn names_temperature(&self) -> bool {
        self.kind == ErrorKind::Rejected
            && matches!(self.status, Some(400 | 422))
            && self.message.to_ascii_lowercase().contains("temperature")
    }

    /// Classify an HTTP status, and the error its body names where that says more (a 429 that
    /// is an account out of credit, not a rate limit).
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> Self {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        let said = upstream_message(&parsed, body);
        let kind = kind_of_error(status, parsed.as_ref().and_then(|v| v.get("error")), &said);
        UpstreamError {
            kind,
            status: Some(status),
            retry_after,
            message: format!("upstream answered {status}: {said}"),
            usage: Usage::default(),
            not_again: false,
        }
    }

    /// This error, not to be retried if the answer's `x-should-retry` says `false`.
    pub(super) fn unless_told_not_to(mut self, should_retry: Option<&HeaderValue>) -> Self {
        self.not_again = should_retry
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        self
    }
}

/// The code of a step refused for a prompt too long for its model's context (OpenAI's).
pub const TOO_LONG: &str = "context_length_exceeded";

/// The kind of an error answered with `status` (or named in a 2xx body), its `error` object and
/// its `message` saying more where they can: a 429 that is an account out of credit
/// (`insufficient_quota`, by its code or type), not a rate limit; a 403 that is OpenRouter's
/// moderation refusing the input (its metadata says why), the request's fault, not a refusal
/// of this server's key; a refusal of a prompt too long for the model's context.
pub(super) fn kind_of_error(status: u16, error: Option<&Value>, message: &str) -> ErrorKind {
    let field = |name| error.and_then(|e| e.get(name)?.as_str());
    let out_of_credit = [field("code"), field("type")].contains(&Some("insufficient_quota"));
    let flagged = (error.and_then(|e| e.get("metadata")))
        .is_some_and(|m| m.get("flagged_input").is_some() || m.get("reasons").is_some());
    match kind_of_status(status) {
        ErrorKind::RateLimited if out_of_credit => ErrorKind::Quota,
        ErrorKind::Auth if status == 403 && flagged => ErrorKind::Rejected,
        ErrorKind::Rejected if matches!(status, 400 | 413 | 422) && too_long(message) => {
            ErrorKind::TooLong
        }
        kind => kind,
    }
}

/// Whether an error's message says the prompt was too long for the model's context: OpenAI's
/// code and words, llama.cpp's (`request (N tokens) exceeds the available context size`, seen
/// from a local llama-server), and how vLLM, Anthropic and Gemini are reported to say it.
fn too_long(message: &str) -> bool {
    const SAID: [&str; 9] = [
        "context length",
        "context_length",
        "context window",
        "context size",
        "maximum context",
        "prompt is too long",
        "input is too long",
        "too many tokens",
        "maximum number of tokens",
    ];
    let message = message.to_ascii_lowercase();
    SAID.iter().any(|s| message.contains(s))
}

pub(super) fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        429 => ErrorKind::RateLimited,
        408 => ErrorKind::Timeout,
        // Not Implemented, HTTP Version Not Supported and Loop Detected (a fusion server's
        // relay that leads back to itself): the same request gets the same answer.
        501 | 505 | 508 => ErrorKind::Rejected,
        // A proxy's login (407 Proxy Authentication Required on the way out, 511 Network
        // Authentication Required) is an auth failure too.
        401 | 403 | 407 | 511 => ErrorKind::Auth,
        // Payment Required: OpenRouter's answer to an account out of credit.
        402 => ErrorKind::Quota,
        // Too Early (RFC 8470: the client may send it again), and the server-side failures.
        409 | 425 | 500..=599 => ErrorKind::Server,
        404 => ErrorKind::NotFound,
        _ => ErrorKind::Rejected,
    }
}

/// The upstream's own error message (on one line, redacted and cut as `answer::one_line` does:
/// a proxy may echo the credentials it was sent), or the start of its body (`excerpt`).
pub(super) fn upstream_message(parsed: &Option<Value>, body: &str) -> String {
    let msg = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("error")))
        .and_then(Value::as_str)
        .map(|m| answer::one_line(m.as_bytes(), None, answer::MESSAGE_CHARS))
        .unwrap_or_else(|| answer::excerpt(body.as_bytes(), None));
    if msg.is_empty() {
        "(empty body)".into()
    } else {
        msg
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        // Past what a `Duration` holds (`1e20`) is "very long", not a panic; the caller caps it.
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A failure to send a request and read its answer's head: a TLS handshake refused on what the
/// server presented is final (`ErrorKind::Tls`); anything else is `transport_error`'s. The
/// handshake is the connector's (a connect error); a TLS error on a connection already made
/// (a record garbled on the way, on a reused or shared connection, or while the body is read)
/// is a transport error like any other.
pub(super) fn send_error(e: reqwest::Error) -> UpstreamError {
    if e.is_connect() && is_tls_error(&e) {
        return UpstreamError::new(
            ErrorKind::Tls,
            None,
            format!("upstream call failed: TLS: {}", with_sources(&e)),
        );
    }
    transport_error(e)
}

pub(super) fn transport_error(e: reqwest::Error) -> UpstreamError {
    if is_parse_error(&e) {
        return UpstreamError::new(
            ErrorKind::NotHttp,
            None,
            format!("upstream call failed: {}", not_http(&e)),
        );
    }
    // A connect that timed out is both: it is a host not reached (as the lean client classes
    // it), not one that was reached and went silent.
    let kind = if e.is_connect() {
        ErrorKind::Connect
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ErrorKind::BadBody
    } else {
        // Resets and other transport failures mid-request.
        ErrorKind::Connect
    };
    UpstreamError::new(
        kind,
        None,
        format!("upstream call failed: {}", with_sources(&e)),
    )
}

/// Whether hyper could not parse the answer, somewhere in `e`'s sources.
fn is_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether TLS refused what the server presented or said, somewhere in `e`'s sources (an I/O
/// error's own inner error included, which its `source` skips). A connection reset or closed
/// during the handshake is an I/O error of its own, not this, and may pass, as may a server's
/// `internal_error` alert.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            // But the server's own failure, which it says as an alert, may pass.
            let internal = rustls::AlertDescription::InternalError;
            return !matches!(tls, rustls::Error::AlertReceived(a) if *a == internal);
        }
        // An I/O error wrapping another (tokio-rustls's, inside the connector's) goes on to
        // the one it wraps: its `source` is that one's source, past it.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        source = match wrapped {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// The message of an answer hyper could not parse.
pub(super) fn not_http(e: &dyn std::error::Error) -> String {
    format!(
        "not an HTTP/1.1 answer this client can read: {}",
        with_sources(e)
    )
}

/// An error's message followed by its sources' (`a: b: c`): the cause is often only there.
pub(super) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // How providers refuse a prompt too long for the model's context, told from other
    // refusals (one of the temperature's, say) and from a server error that mentions it.
    #[test]
    fn tells_a_prompt_too_long_for_the_context() {
        for (status, message, overflows) in [
            (
                400,
                "This model's maximum context length is 8192 tokens.",
                true,
            ),
            (
                400,
                "the request exceeds the available context size, try increasing it",
                true,
            ),
            (
                400,
                "prompt is too long: 210000 tokens > 200000 maximum",
                true,
            ),
            (
                400,
                "The input token count exceeds the maximum number of tokens allowed",
                true,
            ),
            (413, "context_length_exceeded", true),
            (
                400,
                "Unsupported value: 'temperature' does not support 0.0",
                false,
            ),
            (500, "maximum context length", false),
        ] {
            let body = json!({"error": {"message": message}}).to_string();
            let e = UpstreamError::from_status(status, &body, None);
            assert_eq!(
                e.kind == ErrorKind::TooLong,
                overflows,
                "{status} {message}"
            );
            assert_eq!(e.code() == TOO_LONG, overflows, "{status} {message}");
        }
    }

    #[test]
    fn classifies_statuses_once() {
        for (status, retryable, code) in [
            (429, true, "rate_limited"),
            (408, true, "upstream_timeout"),
            (409, true, "upstream_error"),
            (500, true, "upstream_error"),
            (503, true, "upstream_error"),
            (425, true, "upstream_error"),
            // What no retry changes: a feature the server lacks, a protocol, a proxy's login.
            (501, false, "upstream_error"),
            (505, false, "upstream_error"),
            (511, false, "upstream_auth"),
            (400, false, "upstream_error"),
            (401, false, "upstream_auth"),
            (403, false, "upstream_auth"),
            (404, false, "invalid_model"),
            (422, false, "upstream_error"),
            // A relay loop between fusion servers; an account out of credit (OpenRouter's).
            (508, false, "upstream_error"),
            (402, false, "upstream_quota"),
        ] {
            let e = UpstreamError::from_status(status, "", None);
            assert_eq!(e.retryable(), retryable, "status {status}");
            assert_eq!(e.code(), code, "status {status}");
        }
    }

    #[test]
    fn reads_upstream_error_messages() {
        let e = UpstreamError::from_status(400, r#"{"error":{"message":"bad model"}}"#, None);
        assert_eq!(e.message, "upstream answered 400: bad model");
    }

    #[test]
    fn parses_retry_after_both_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        // Larger than a `Duration` holds: very long (the retry loop caps it), not a panic.
        assert_eq!(parse_retry_after("1e20", now), Some(Duration::MAX));
        assert_eq!(
            parse_retry_after("99999999999999999999", now),
            Some(Duration::MAX)
        );
        assert_eq!(parse_retry_after("NaN", now), None);
    }
}
