//! Calls to OpenAI-compatible chat-completion servers (OpenRouter by default, any base URL by
//! configuration). Routes `provider:model` names, classifies every failure once into retryable or
//! fatal, and turns the upstream `usage` into tokens and cost. Never stores or logs a key.

mod answer;
mod body;
mod h1;
mod retry;
#[cfg(test)]
mod test_server;

pub use retry::{CallError, Jitter, RetryPolicy};

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use bytes::Bytes;
use hyper::Uri;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper_util::client::proxy::matcher::Matcher;
use serde::Deserialize;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Value, json};

use crate::job::{JsonText, Usage};
use crate::store::redact_url;
use answer::Answered;

/// A provider key, kept out of `Debug` and logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Option<ApiKey> {
        let key = key.trim().to_string();
        (!key.is_empty()).then_some(ApiKey(key))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// One OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct Provider {
    pub name: String,
    /// Base URL up to and including `/v1` (the path `/chat/completions` is appended). A
    /// `user:password@` in it is sent as Basic auth (see `Endpoint::of`; the configuration
    /// refuses one beside an `api_key`), and `Debug` shows neither its password nor a user name
    /// alone.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    /// How this provider is asked for JSON that follows a schema.
    pub structured_output: StructuredOutput,
    /// The request field that limits the answer's length: `max_completion_tokens` (OpenAI's
    /// current name, the default) or `max_tokens` (older servers).
    pub max_tokens_field: String,
}

impl Provider {
    pub fn new(name: &str, base_url: &str, api_key: Option<ApiKey>) -> Provider {
        Provider {
            name: name.to_string(),
            base_url: base_url.to_string(),
            api_key,
            structured_output: StructuredOutput::default(),
            max_tokens_field: "max_completion_tokens".to_string(),
        }
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key)
            .field("structured_output", &self.structured_output)
            .field("max_tokens_field", &self.max_tokens_field)
            .finish()
    }
}

/// Providers differ in how they enforce a JSON schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `response_format: {"type": "json_schema", "json_schema": {...}}` (OpenAI, OpenRouter,
    /// llama.cpp's llama-server, vLLM).
    #[default]
    JsonSchema,
    /// `response_format: {"type": "json_object", "schema": {...}}` (llama-cpp-python, some
    /// others).
    JsonObject,
    /// No `response_format`: the schema is only described in the prompt.
    Prompt,
}

/// Price per million tokens, used when the upstream does not report `usage.cost`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Price {
    pub prompt: f64,
    pub completion: f64,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub default: Provider,
    pub providers: HashMap<String, Provider>,
    /// Limit on one whole call, connection to last byte.
    pub timeout: Duration,
    pub prices: HashMap<String, Price>,
    /// Idle connections kept per upstream host. Fewer than the calls a worker has in flight
    /// there, and each swing of its load closes connections it opens again a moment later.
    pub max_idle_per_host: usize,
}

/// `max_idle_per_host` unless a worker's concurrency asks for more.
pub const DEFAULT_MAX_IDLE_PER_HOST: usize = 256;

impl UpstreamConfig {
    /// Room in the idle pools for every call `jobs` jobs can have in flight to one host (every
    /// panel member there): a worker's load swings (3 panel calls per job, then 1, then 1), and
    /// a pool smaller than its busiest phase closes connections the next phase opens again.
    pub fn for_jobs_in_flight(mut self, jobs: u32) -> UpstreamConfig {
        self.max_idle_per_host = self.max_idle_per_host.max(jobs as usize * crate::MAX_PANEL);
        self
    }
}

/// What is sent for one completion. The messages are borrowed where they can be: a job's panel
/// sends the caller's messages to every member without copying them.
#[derive(Debug, Clone, Default)]
pub struct CompletionRequest<'a> {
    pub messages: Cow<'a, [Value]>,
    pub temperature: Option<f64>,
    pub max_completion_tokens: Option<u32>,
    pub response_format: Option<&'a JsonText>,
}

/// A successful completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    pub latency_ms: i64,
}

/// How a call failed; the one place that decides what may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429.
    RateLimited,
    /// 408, or our own per-call timeout.
    Timeout,
    /// Could not connect, or the connection was reset.
    Connect,
    /// 409 or 5xx.
    Server,
    /// The body was cut off or was not a chat completion.
    BadBody,
    /// 401 / 403.
    Auth,
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
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    pub message: String,
}

impl UpstreamError {
    fn new(kind: ErrorKind, status: Option<u16>, message: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            status,
            retry_after: None,
            message: message.into(),
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(
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
            ErrorKind::Empty => "empty_completion",
            _ => "upstream_error",
        }
    }

    /// Classify an HTTP status.
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> Self {
        let kind = match status {
            429 => ErrorKind::RateLimited,
            408 => ErrorKind::Timeout,
            409 | 500..=599 => ErrorKind::Server,
            401 | 403 => ErrorKind::Auth,
            404 => ErrorKind::NotFound,
            _ => ErrorKind::Rejected,
        };
        let detail = upstream_message(body);
        UpstreamError {
            kind,
            status: Some(status),
            retry_after,
            message: format!("upstream answered {status}: {detail}"),
        }
    }
}

/// The upstream's own error message, or the start of its body (redacted, see `excerpt`).
fn upstream_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("error")))
        .and_then(Value::as_str)
        .map(str::to_string)
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

#[derive(Debug)]
pub struct Upstream {
    /// HTTPS upstreams, proxied ones, and the gateway's pass-through.
    http: reqwest::Client,
    /// Completions from plain-`http://` upstreams that no proxy variable applies to.
    plain: h1::PlainClient,
    /// Where and how each provider is called, settled at start-up: the default's, and the
    /// named ones' under the same keys as `config.providers`.
    default_endpoint: Endpoint,
    endpoints: HashMap<String, Endpoint>,
    config: UpstreamConfig,
}

/// How calls to one provider are made. (The `Authorization` value is marked sensitive: `Debug`
/// does not print it.)
#[derive(Debug)]
struct Endpoint {
    /// The chat-completions URL under the provider's base URL, without its userinfo.
    url: String,
    /// The headers every call carries: JSON body, the recursion guard, the provider's key (or
    /// the base URL's userinfo as Basic auth).
    headers: HeaderMap,
    /// `Some` when completions take the lean client: an `http://` URL that the proxy variables
    /// (`HTTP_PROXY`, `ALL_PROXY`, less `NO_PROXY`, read as reqwest reads them) leave alone.
    plain: Option<Uri>,
}

impl Endpoint {
    fn of(provider: &Provider, proxies: &Matcher) -> anyhow::Result<Endpoint> {
        let (base_url, basic_auth) = without_userinfo(&provider.base_url);
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(DEPTH_HEADER, HeaderValue::from_static("1"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        if let Some(key) = &provider.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.0)).map_err(|_| {
                anyhow::anyhow!(
                    "the API key of provider {} cannot be sent in an HTTP header",
                    provider.name
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        } else if let Some(value) = basic_auth {
            headers.insert(AUTHORIZATION, value);
        }
        let plain = url.parse::<Uri>().ok().filter(|uri| {
            uri.scheme_str() == Some("http")
                && uri.host().is_some()
                && proxies.intercept(uri).is_none()
        });
        Ok(Endpoint {
            url,
            headers,
            plain,
        })
    }
}

/// `url` without its `user:password@`, and that userinfo as a Basic `Authorization` value
/// (percent-decoded, marked sensitive) — what reqwest makes of it. Both clients get the URL
/// without it, so the password goes neither into a connect target, a `Host` header nor an error
/// message, and the same header, which a provider's key replaces (as reqwest's explicit headers
/// replace the one it derives from the URL; the configuration refuses a key beside credentials
/// in the URL, see `config::one_authorization`, so only a `Provider` built in code has both).
fn without_userinfo(url: &str) -> (Cow<'_, str>, Option<HeaderValue>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return (url.into(), None);
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return (url.into(), None);
    }
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = format!(
        "{}:{}",
        decoded(parsed.username()),
        parsed.password().map(decoded).unwrap_or_default()
    );
    let mut value = HeaderValue::try_from(format!("Basic {}", BASE64_STANDARD.encode(credentials)))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    // Cannot fail: the URL has a host, since it has userinfo.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    (String::from(parsed).into(), Some(value))
}

/// A chat-completions request body, written field by field from a `CompletionRequest`.
struct WireRequest<'a> {
    model: &'a str,
    req: &'a CompletionRequest<'a>,
    /// `max_completion_tokens` or `max_tokens`, as the provider wants it.
    max_tokens_field: &'a str,
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
        map.end()
    }
}

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    /// Read leniently, like `usage`: a `finish_reason` that is not a string (a null, an object
    /// from some servers) is absent, not a reason to throw away a completion that was paid for.
    #[serde(default, deserialize_with = "lenient_string")]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    /// A string, or an array of content parts (`[{"type": "text", "text": "..."}]`, which some
    /// OpenAI-compatible servers answer): see `text_of`.
    #[serde(default, deserialize_with = "content_text")]
    content: Option<String>,
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
fn text_of(content: Value) -> Option<String> {
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
/// A cost is read the same way; one that is not a number at least 0 is absent (the price table
/// prices the call).
struct WireUsage {
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: Option<f64>,
}

/// The most tokens one call is counted for: past any context window, and small enough that
/// sums of many cannot overflow (the stores add the two counts up again as they read them).
const MAX_TOKENS: i64 = u32::MAX as i64;

impl WireUsage {
    fn of(usage: &Value) -> WireUsage {
        let tokens =
            |field| number(usage.get(field)).map_or(0, |n| n.clamp(0.0, MAX_TOKENS as f64) as i64);
        WireUsage {
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
            cost: number(usage.get("cost")).filter(|c| *c >= 0.0),
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

impl Upstream {
    pub fn new(config: UpstreamConfig) -> anyhow::Result<Upstream> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(10).min(config.timeout))
            .pool_max_idle_per_host(config.max_idle_per_host)
            // A redirected POST would become a GET: a 3xx is reported as the error it is.
            .redirect(reqwest::redirect::Policy::none())
            // Transport failures are retried by `with_retries`, with backoff; reqwest's own
            // retry layer would keep a copy of every request in flight just in case.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()?;
        let proxies = Matcher::from_env();
        let endpoints = config
            .providers
            .iter()
            .map(|(key, p)| Ok((key.clone(), Endpoint::of(p, &proxies)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Upstream {
            http,
            plain: h1::PlainClient::new(
                Duration::from_secs(10).min(config.timeout),
                config.max_idle_per_host,
            ),
            default_endpoint: Endpoint::of(&config.default, &proxies)?,
            endpoints,
            config,
        })
    }

    /// The provider that serves `model` and the model name to send it: `NAME:model` addresses a
    /// configured provider; anything else (including OpenRouter's `vendor/model:variant`) goes to
    /// the default provider unchanged.
    pub fn route<'a>(&'a self, model: &'a str) -> (&'a Provider, &'a str) {
        let (provider, _, model) = self.resolve(model);
        (provider, model)
    }

    /// `route`, with the provider's endpoint.
    fn resolve<'a>(&'a self, model: &'a str) -> (&'a Provider, &'a Endpoint, &'a str) {
        if let Some((prefix, rest)) = model.split_once(':')
            && let (Some(p), Some(e)) = (
                self.config.providers.get(prefix),
                self.endpoints.get(prefix),
            )
        {
            return (p, e, rest);
        }
        (&self.config.default, &self.default_endpoint, model)
    }

    /// One call, no retries.
    pub async fn complete(
        &self,
        model: &str,
        req: &CompletionRequest<'_>,
    ) -> Result<Completion, UpstreamError> {
        let (provider, endpoint, upstream_model) = self.resolve(model);
        // Serialized straight from the request: no JSON tree is built or kept per call.
        let body = serde_json::to_vec(&WireRequest {
            model: upstream_model,
            req,
            max_tokens_field: &provider.max_tokens_field,
        })
        .map_err(|e| UpstreamError::new(ErrorKind::Rejected, None, e.to_string()))?;
        let started = Instant::now();
        let answered = self.exchange(endpoint, body).await?;
        let status = answered.status;
        let wire: WireResponse = answered.parse(provider)?;
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let choice = wire.choices.into_iter().next().ok_or_else(|| {
            UpstreamError::new(
                ErrorKind::Empty,
                Some(status),
                "upstream returned no choices",
            )
        })?;
        let content = choice.message.content.unwrap_or_default();
        if content.trim().is_empty() {
            return Err(UpstreamError::new(
                ErrorKind::Empty,
                Some(status),
                "upstream returned an empty completion",
            ));
        }
        let usage = self.usage(model, wire.usage);
        Ok(Completion {
            content,
            finish_reason: choice.finish_reason,
            usage,
            latency_ms,
        })
    }

    /// POST a chat-completions body to the provider serving `model` (its `model` field is set to
    /// the provider's name for it). The answer is returned whatever its status: the gateway
    /// passes it on as it is.
    pub async fn send(
        &self,
        model: &str,
        mut body: Value,
    ) -> Result<reqwest::Response, UpstreamError> {
        let (_, endpoint, upstream_model) = self.resolve(model);
        body["model"] = json!(upstream_model);
        let body = serde_json::to_vec(&body)
            .map_err(|e| UpstreamError::new(ErrorKind::Rejected, None, e.to_string()))?;
        self.post(endpoint, body).await
    }

    /// POST a completion request to `provider` and read the answer whole: the body of a 2xx,
    /// or the classified error of anything else. Plain-HTTP upstreams go through the lean
    /// client (bounded by the same whole-call timeout), the rest through reqwest.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        body: Vec<u8>,
    ) -> Result<Answered, UpstreamError> {
        let Some(uri) = &endpoint.plain else {
            return read_ok(self.post(endpoint, body).await?).await;
        };
        let call = self.plain.post(uri, &endpoint.headers, body.into());
        let answer = tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| {
                UpstreamError::new(
                    ErrorKind::Timeout,
                    None,
                    format!(
                        "upstream call failed: no whole answer within {} s",
                        self.config.timeout.as_secs_f64()
                    ),
                )
            })??;
        let mut headers = answer.headers;
        let content_type = headers.remove(CONTENT_TYPE);
        let retry_after = headers.get(hyper::header::RETRY_AFTER);
        ok_or_error(answer.status, retry_after, content_type, answer.body)
    }

    /// POST a JSON body to `endpoint` through reqwest.
    async fn post(
        &self,
        endpoint: &Endpoint,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.http
            .post(&endpoint.url)
            .headers(endpoint.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(transport_error)
    }

    /// A whole non-streamed completion as JSON, with its usage priced.
    pub async fn complete_json(
        &self,
        model: &str,
        body: Value,
    ) -> Result<(Value, Usage), UpstreamError> {
        let resp = self.send(model, body).await?;
        let answered = read_ok(resp).await?;
        let status = answered.status;
        let value: Value = answered.parse(self.route(model).0)?;
        if !value.is_object() {
            return Err(UpstreamError::new(
                ErrorKind::BadBody,
                Some(status),
                "upstream body is JSON but not an object (a chat completion)",
            ));
        }
        let wire = value
            .get("usage")
            .filter(|u| !u.is_null())
            .map(WireUsage::of);
        let usage = self.usage(model, wire);
        Ok((value, usage))
    }

    /// How the provider serving `model` is asked for structured output.
    pub fn structured_output(&self, model: &str) -> StructuredOutput {
        self.route(model).0.structured_output
    }

    fn usage(&self, model: &str, wire: Option<WireUsage>) -> Usage {
        let Some(u) = wire else {
            return Usage::default();
        };
        let cost = u.cost.unwrap_or_else(|| {
            self.config.prices.get(model).map_or(0.0, |p| {
                (u.prompt_tokens as f64 * p.prompt + u.completion_tokens as f64 * p.completion)
                    / 1_000_000.0
            })
        });
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
            cost,
        }
    }
}

/// Header marking calls made by a fusion run, so that a fusion endpoint upstream refuses to
/// start another run (the recursion guard).
pub const DEPTH_HEADER: &str = "x-fusion-depth";

/// The body of a 2xx answer (up to `MAX_ANSWER_BYTES`), or the classified error of any other.
async fn read_ok(mut resp: reqwest::Response) -> Result<Answered, UpstreamError> {
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).cloned();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let mut body = body::Body::new(status, resp.content_length())?;
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if !body.take(&chunk)? {
            break;
        }
    }
    ok_or_error(
        status,
        retry_after.as_ref(),
        content_type,
        body.into_bytes(),
    )
}

/// A 2xx answer, or the error any other status stands for.
fn ok_or_error(
    status: u16,
    retry_after: Option<&HeaderValue>,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Result<Answered, UpstreamError> {
    if !(200..300).contains(&status) {
        let retry_after = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let text = String::from_utf8_lossy(&body);
        return Err(UpstreamError::from_status(status, &text, retry_after));
    }
    Ok(Answered {
        status,
        content_type,
        body,
    })
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    if is_parse_error(&e) {
        return UpstreamError::new(
            ErrorKind::NotHttp,
            None,
            format!("upstream call failed: {}", not_http(&e)),
        );
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
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

/// The message of an answer hyper could not parse.
fn not_http(e: &dyn std::error::Error) -> String {
    format!(
        "not an HTTP/1.1 answer this client can read: {}",
        with_sources(e)
    )
}

/// An error's message followed by its sources' (`a: b: c`): the cause is often only there.
fn with_sources(e: &dyn std::error::Error) -> String {
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
    use test_server::{Then, answering, chunked};

    #[test]
    fn classifies_statuses_once() {
        for (status, retryable, code) in [
            (429, true, "rate_limited"),
            (408, true, "upstream_timeout"),
            (409, true, "upstream_error"),
            (500, true, "upstream_error"),
            (503, true, "upstream_error"),
            (400, false, "upstream_error"),
            (401, false, "upstream_auth"),
            (403, false, "upstream_auth"),
            (404, false, "invalid_model"),
            (422, false, "upstream_error"),
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

    /// Plain calls go to `http://` upstreams that no proxy applies to; HTTPS and proxied ones
    /// (unless `NO_PROXY` names them) go through reqwest. Every call carries the same headers.
    #[test]
    fn only_unproxied_plain_http_upstreams_take_the_lean_client() {
        let p = |url: &str| Provider::new("p", url, Some(ApiKey::new("sk-1".into()).unwrap()));
        let none = Matcher::builder().build();
        let proxied = Matcher::builder().http("http://proxy.example:3128").build();
        let except_local = Matcher::builder()
            .http("http://proxy.example:3128")
            .no("127.0.0.1")
            .build();
        let local = p("http://127.0.0.1:8081/v1/");
        let endpoint = Endpoint::of(&local, &none).unwrap();
        assert_eq!(endpoint.url, "http://127.0.0.1:8081/v1/chat/completions");
        assert_eq!(endpoint.plain.as_ref().unwrap(), &endpoint.url.as_str());
        assert_eq!(endpoint.headers[AUTHORIZATION], "Bearer sk-1");
        assert_eq!(endpoint.headers[DEPTH_HEADER], "1");
        let shown = format!("{endpoint:?}");
        assert!(
            shown.contains("Sensitive") && !shown.contains("sk-1"),
            "{shown}"
        );
        assert!(Endpoint::of(&local, &proxied).unwrap().plain.is_none());
        assert!(Endpoint::of(&local, &except_local).unwrap().plain.is_some());
        let https = Endpoint::of(&p("https://openrouter.ai/api/v1"), &none).unwrap();
        assert!(https.plain.is_none());
        let bad_key = Provider::new("bad", "http://h/v1", Some(ApiKey("a\nb".into())));
        assert!(Endpoint::of(&bad_key, &none).is_err());
    }

    fn upstream_at(base_url: &str, key: Option<&str>) -> Upstream {
        Upstream::new(UpstreamConfig {
            default: Provider::new("default", base_url, key.and_then(|k| ApiKey::new(k.into()))),
            providers: HashMap::new(),
            timeout: Duration::from_secs(2),
            prices: HashMap::new(),
            max_idle_per_host: 8,
        })
        .unwrap()
    }

    fn ask() -> CompletionRequest<'static> {
        CompletionRequest {
            messages: Cow::Owned(vec![json!({"role": "user", "content": "hi"})]),
            ..CompletionRequest::default()
        }
    }

    /// `complete` takes the lean client (a plain-`http://` upstream); `complete_json` always
    /// goes through reqwest. Both, on the same upstream, as usage or an error.
    async fn on_both_clients(up: &Upstream) -> [Result<Usage, UpstreamError>; 2] {
        let lean = up.complete("m", &ask()).await.map(|c| c.usage);
        let body = json!({"messages": [{"role": "user", "content": "hi"}]});
        let reqwest = up.complete_json("m", body).await.map(|(_, usage)| usage);
        [lean, reqwest]
    }

    // A completion padded past the limit (an upstream streaming without end would be cut at
    // the same point) fails on either client, for good, with the limit in its message.
    #[tokio::test]
    async fn an_answer_past_the_limit_fails_for_good_on_both_clients() {
        let mut body = test_server::completion("hi", "{}").into_bytes();
        body.resize(20 << 20, b' ');
        let (base, _) = answering(chunked(&body, 64 << 10), Then::Close).await;
        let up = upstream_at(&format!("{base}/v1"), None);
        for result in on_both_clients(&up).await {
            let err = result.expect_err("an answer over the limit is refused");
            assert!(!err.retryable(), "{err:?}");
            assert_eq!(err.message, "upstream answer larger than 16777216 bytes");
        }
    }

    // A 500 that announces 100 MiB, sends 64 KiB and then nothing is reported as the 500 it is
    // at once, on either client, not after the whole-call timeout.
    #[tokio::test]
    async fn an_error_body_is_read_only_as_far_as_its_message() {
        let mut answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 104857600\r\n\r\n{\"error\": \"overloaded".to_vec();
        answer.resize(answer.len() + (64 << 10), b'.');
        let (base, _) = answering(answer, Then::Hold).await;
        let up = upstream_at(&format!("{base}/v1"), None);
        for result in on_both_clients(&up).await {
            let err = result.unwrap_err();
            assert_eq!(
                (err.kind, err.status),
                (ErrorKind::Server, Some(500)),
                "{err:?}"
            );
            assert!(
                err.message
                    .starts_with("upstream answered 500: {\"error\": \"overloaded...")
            );
        }
    }

    // Another protocol on the upstream's port answers nothing a retry would make HTTP; a long
    // head is HTTP all the same. On either client.
    #[tokio::test]
    async fn long_heads_are_read_and_answers_that_are_not_http_are_final_on_both_clients() {
        let body = test_server::completion("hi", "{}");
        let pad = "a".repeat(5000);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-pad: {pad}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, _) = answering(answer, Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
            result.unwrap();
        }
        let (base, _) = answering(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..], Then::Close).await;
        for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
            let err = result.unwrap_err();
            assert!(!err.retryable(), "{err:?}");
            assert!(
                err.message.contains("not an HTTP/1.1 answer"),
                "{}",
                err.message
            );
        }
    }

    // A web page where the API was expected (a base URL without its `/v1`, or a web app's):
    // no retry makes it a completion. The error says what came back, with no credential the
    // page may echo, and points at the base URL. On either client.
    #[tokio::test]
    async fn a_web_page_in_place_of_a_completion_is_final_on_both_clients() {
        let page = "<!DOCTYPE html>\n<html>\t<body>Sign in at https://sk-live@app.example/ \
                    (sent: Bearer sk-1) or https://u:pw@app.example/login</body></html>";
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        );
        let (base, _) = answering(answer, Then::Close).await;
        let up = upstream_at(&format!("{base}/v1"), Some("sk-1"));
        for result in on_both_clients(&up).await {
            let err = result.unwrap_err();
            assert!(!err.retryable(), "{err:?}");
            assert_eq!(err.status, Some(200));
            let shown = format!(
                "upstream answered 200 (content-type text/html) with a body that is not JSON: \
                 `<!DOCTYPE html> <html> <body>Sign in at https://***@app.example/ (sent: Bearer \
                 *** or https://u:***@app.example/login</body></html>`; is {base}/v1 the API's \
                 base URL (the one under which POST /chat/completions answers)?"
            );
            assert_eq!(err.message, shown);
        }
    }

    // A body that ends before its JSON does is a cut-off answer, not a wrong server: retried,
    // whether the connection was cut inside the announced length or the body had none (ended
    // by the close, it reads as whole).
    #[tokio::test]
    async fn a_completion_cut_off_is_retried_on_both_clients() {
        let start = r#"{"choices": [{"message": {"content": "cut"#;
        for head in [
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
        ] {
            let (base, _) = answering(format!("{head}{start}"), Then::Close).await;
            for result in on_both_clients(&upstream_at(&format!("{base}/v1"), None)).await {
                let err = result.unwrap_err();
                assert_eq!(err.kind, ErrorKind::BadBody, "{err:?}");
                assert!(err.retryable(), "{err:?}");
            }
        }
    }

    // Servers disagree on `usage`: nulls, floats, numbers as strings. A completion that was
    // paid for is kept whatever its usage says; what cannot be read counts as 0 (or, for the
    // cost, as absent: the price table's).
    #[tokio::test]
    async fn odd_usage_fields_do_not_throw_away_a_completion() {
        let cases = [
            (
                r#"{"prompt_tokens": null, "completion_tokens": 7.0, "cost": "0.0012"}"#,
                Usage {
                    prompt_tokens: 0,
                    completion_tokens: 7,
                    total_tokens: 7,
                    cost: 0.0012,
                },
            ),
            (
                r#"{"prompt_tokens": "12", "completion_tokens": -3, "total_tokens": "many", "cost": null}"#,
                Usage {
                    prompt_tokens: 12,
                    completion_tokens: 0,
                    total_tokens: 12,
                    cost: 0.0,
                },
            ),
            (
                r#"{"prompt_tokens": 18446744073709551615, "completion_tokens": 1e300, "cost": {}}"#,
                Usage {
                    prompt_tokens: u32::MAX.into(),
                    completion_tokens: u32::MAX.into(),
                    total_tokens: 2 * i64::from(u32::MAX),
                    cost: 0.0,
                },
            ),
            (r#""none""#, Usage::default()),
        ];
        for (usage, expected) in cases {
            let body = test_server::completion("hi", usage);
            let (base, _) = answering(test_server::answer("200 OK", &body), Then::Close).await;
            let up = upstream_at(&format!("{base}/v1"), None);
            for result in on_both_clients(&up).await {
                assert_eq!(result.unwrap(), expected, "usage {usage}");
            }
        }
    }

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
        ] {
            let wire: WireResponse =
                serde_json::from_str(&format!(r#"{{"choices": [{choice}]}}"#)).expect(choice);
            let read = &wire.choices[0];
            assert_eq!(read.message.content.as_deref(), content, "{choice}");
            assert_eq!(read.finish_reason.as_deref(), finish_reason, "{choice}");
        }
    }

    // `http://user:password@host/v1`: as reqwest does, both clients send the userinfo
    // (percent-decoded) as Basic auth unless a key is set (the key's `Bearer` wins: the
    // configuration refuses both, but a `Provider` built in code may have them), and
    // never in the `Host` header; no error message or `Debug` output carries the password.
    #[tokio::test]
    async fn credentials_in_a_plain_url_go_as_basic_auth_on_both_clients() {
        let body = test_server::completion("hi", "{}");
        let (base, heads) = answering(test_server::answer("200 OK", &body), Then::Close).await;
        let with_user = base.replace("http://", "http://us%65r:s%40cret@") + "/v1";
        for key in [None, Some("sk-1")] {
            let up = upstream_at(&with_user, key);
            for result in on_both_clients(&up).await {
                result.unwrap();
            }
            assert!(!format!("{up:?}").contains("cret"), "{up:?}");
        }
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 4);
        let host = base.trim_start_matches("http://");
        for (i, head) in heads.iter().enumerate() {
            let auth = if i < 2 {
                "Basic dXNlcjpzQGNyZXQ="
            } else {
                "Bearer sk-1"
            };
            assert_eq!(header(head, "authorization"), Some(auth), "{head}");
            assert_eq!(header(head, "host"), Some(host), "{head}");
            assert!(!head.contains("cret") && !head.contains("us%65r"), "{head}");
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = format!("http://user:secret@{}/v1", listener.local_addr().unwrap());
        drop(listener);
        let up = upstream_at(&refused, None);
        for result in on_both_clients(&up).await {
            let err = result.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Connect, "{err:?}");
            assert!(!err.message.contains("secret"), "{}", err.message);
        }
    }

    /// The value of header `name` in a request head.
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    #[test]
    fn the_idle_pools_have_room_for_every_call_a_worker_can_make() {
        let config = |jobs| {
            UpstreamConfig {
                default: Provider::new("default", "http://h/v1", None),
                providers: HashMap::new(),
                timeout: Duration::from_secs(1),
                prices: HashMap::new(),
                max_idle_per_host: DEFAULT_MAX_IDLE_PER_HOST,
            }
            .for_jobs_in_flight(jobs)
            .max_idle_per_host
        };
        assert_eq!(config(256), 256 * crate::MAX_PANEL);
        assert_eq!(config(2), DEFAULT_MAX_IDLE_PER_HOST);
        // An API-only process (no worker) keeps the default.
        assert_eq!(config(0), DEFAULT_MAX_IDLE_PER_HOST);
    }

    #[test]
    fn routes_named_providers_only() {
        let p = |n: &str| Provider::new(n, &format!("http://{n}"), None);
        let up = Upstream::new(UpstreamConfig {
            default: p("default"),
            providers: HashMap::from([("ollama".to_string(), p("ollama"))]),
            timeout: Duration::from_secs(1),
            prices: HashMap::new(),
            max_idle_per_host: DEFAULT_MAX_IDLE_PER_HOST,
        })
        .unwrap();
        assert_eq!(up.route("ollama:llama3.2").0.name, "ollama");
        assert_eq!(up.route("ollama:llama3.2").1, "llama3.2");
        let (prov, model) = up.route("deepseek/deepseek-r1:free");
        assert_eq!(
            (prov.name.as_str(), model),
            ("default", "deepseek/deepseek-r1:free")
        );
        assert_eq!(
            format!("{:?}", ApiKey::new("sk-123".into()).unwrap()),
            "ApiKey(***)"
        );
    }
}
