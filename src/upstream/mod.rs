//! Calls to OpenAI-compatible chat-completion servers (OpenRouter by default, any base URL by
//! configuration). Routes `provider:model` names, classifies every failure once into retryable or
//! fatal, and turns the upstream `usage` into tokens and cost. Never stores or logs a key.

mod answer;
mod body;
mod error;
mod h1;
mod provider;
mod retry;
#[cfg(test)]
pub(crate) mod test_server;
mod wire;

pub use error::{ErrorKind, TOO_LONG, UpstreamError, parse_retry_after};
pub use provider::{
    ApiKey, DEFAULT_MAX_IDLE_PER_HOST, Price, Provider, StructuredOutput, UpstreamConfig,
};
pub use retry::{CallError, Jitter, MAX_RETRY_AFTER, RetryPolicy, Tries};
pub use wire::text_of;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper_util::client::proxy::matcher::Matcher;
use serde_json::{Value, json};

use crate::clock::{SharedClock, SystemClock};
use crate::job::{JsonText, Usage};
use answer::Answered;
use error::transport_error;
use provider::Endpoint;
use wire::{WireRequest, WireResponse, WireUsage};

/// What is sent for one completion. The messages are borrowed where they can be: a job's panel
/// sends the caller's messages to every member without copying them.
#[derive(Debug, Clone, Default)]
pub struct CompletionRequest<'a> {
    pub messages: Cow<'a, [Value]>,
    pub temperature: Option<f64>,
    pub max_completion_tokens: Option<u32>,
    pub response_format: Option<&'a JsonText>,
    /// Stop sequences: a string or an array of them.
    pub stop: Option<&'a Value>,
}

impl CompletionRequest<'_> {
    /// The same request with no `temperature`, its messages borrowed.
    fn without_temperature(&self) -> CompletionRequest<'_> {
        CompletionRequest {
            messages: Cow::Borrowed(&self.messages),
            temperature: None,
            ..*self
        }
    }
}

/// A successful completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    pub latency_ms: i64,
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
    /// What a `Retry-After` date is measured from when the answer has no `Date` of its own.
    clock: SharedClock,
    /// The models that refused a `temperature` (see `complete`).
    no_temperature: std::sync::Mutex<HashSet<String>>,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> anyhow::Result<Upstream> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            // Between two reads of an answer: what bounds a pass-through stream (see `relay`).
            .read_timeout(config.timeout)
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
                config.timeout,
                body::error_body_wait(config.timeout),
            ),
            default_endpoint: Endpoint::of(&config.default, &proxies)?,
            endpoints,
            config,
            clock: Arc::new(SystemClock),
            no_temperature: Default::default(),
        })
    }

    /// Measure `Retry-After` dates of answers without a `Date` from `clock` (the system's by
    /// default).
    pub fn with_clock(mut self, clock: SharedClock) -> Upstream {
        self.clock = clock;
        self
    }

    /// How long an error's body is waited for (see `body::Body::read_error`).
    fn error_wait(&self) -> Duration {
        body::error_body_wait(self.config.timeout)
    }

    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(self.clock.now_ms()).unwrap_or(0))
    }

    /// One call, no retries. Its error never shows the credential it sent, the provider's key or
    /// its URL's userinfo (`UpstreamError::hiding`).
    ///
    /// A model that refuses any `temperature` but its own (OpenAI's reasoning models answer
    /// `400` to the analyst's 0) is asked again at once without one, and, once that is taken,
    /// sent none from then on: the temperature is a preference, and the step would otherwise
    /// fail for good after the panel was paid for.
    pub async fn complete(
        &self,
        model: &str,
        req: &CompletionRequest<'_>,
    ) -> Result<Completion, UpstreamError> {
        let resolved = self.resolve(model);
        let key = resolved.1.credential();
        let known = req.temperature.is_some() && self.refuse_temperature(model);
        let answered = match known {
            true => {
                self.complete_shown(model, resolved, &req.without_temperature())
                    .await
            }
            false => self.complete_shown(model, resolved, req).await,
        };
        let answered = match answered {
            Err(refused) if req.temperature.is_some() && !known && refused.names_temperature() => {
                let again = self
                    .complete_shown(model, resolved, &req.without_temperature())
                    .await;
                // Remembered only when the resend was taken, which shows the temperature was
                // what it refused: a refusal that only quoted it (a validation error echoing
                // the request) is refused again, and a resend that failed shows nothing.
                if again.is_ok() {
                    tracing::info!(model, error = %refused.hiding(key),
                        "the model refuses the temperature asked; sending it none from now on");
                    self.no_temperature
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(model.to_string());
                }
                again
            }
            answered => answered,
        };
        answered.map_err(|e| e.hiding(key))
    }

    /// Whether `model` is known to refuse a `temperature` (see `complete`).
    fn refuse_temperature(&self, model: &str) -> bool {
        let refusing = self.no_temperature.lock();
        refusing.unwrap_or_else(|e| e.into_inner()).contains(model)
    }

    async fn complete_shown(
        &self,
        model: &str,
        (provider, endpoint, upstream_model): (&Provider, &Endpoint, &str),
        req: &CompletionRequest<'_>,
    ) -> Result<Completion, UpstreamError> {
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
        // A body of another shape may still say what it was billed for.
        let mut wire: WireResponse = answered
            .parse(provider, endpoint.credential())
            .map_err(|e| e.billed(self.usage(model, answered.usage())))?;
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        // Billed whether or not the completion is taken: an error below carries it.
        let usage = self.usage(model, wire.usage.take());
        // An error reported beside no choices at all is that error, not an empty answer
        // (final): classed by the status it names, else retried.
        let first = wire.choices.first();
        let finish_reason = first.and_then(|c| c.finish_reason.as_deref());
        let first_error = first.map_or(&Value::Null, |c| &c.error);
        if let Some(error) = wire::reported_error(&wire.error, first_error, finish_reason) {
            let alone = first.is_none().then_some(&wire.error);
            return Err(mid_answer(status, &error, alone, endpoint.credential()).billed(usage));
        }
        let empty =
            |what: String| UpstreamError::new(ErrorKind::Empty, Some(status), what).billed(usage);
        if wire.choices.is_empty() {
            return Err(empty("upstream returned no choices".into()));
        }
        let choice = wire.choices.swap_remove(0);
        let (content, refusal) = choice
            .message
            .map_or((None, None), |m| (m.content, m.refusal));
        let content = content.unwrap_or_default();
        if content.trim().is_empty() {
            // A refusal in place of the content (OpenAI's, under a structured output) is said,
            // not taken for an empty answer with no reason.
            let said = refusal.map(|r| {
                answer::one_line(r.as_bytes(), endpoint.credential(), answer::MESSAGE_CHARS)
            });
            // So is why it stopped, when that was not the end of an answer: the token limit
            // spent before any (a reasoning model's, on its reasoning), or a content filter.
            let why = choice
                .finish_reason
                .as_deref()
                .map(|r| answer::one_line(r.as_bytes(), endpoint.credential(), 64))
                .filter(|r| !r.is_empty() && r != "stop");
            return Err(empty(match (said.filter(|r| !r.is_empty()), why) {
                (Some(refusal), _) => format!("upstream refused to answer: {refusal}"),
                (None, Some(why)) => format!(
                    "upstream returned an empty completion (finish_reason `{why}`{})",
                    match why.as_str() {
                        "length" => ": the token limit was reached before any answer",
                        "content_filter" => ": the provider's content filter withheld it",
                        _ => "",
                    }
                ),
                (None, None) => "upstream returned an empty completion".into(),
            }));
        }
        Ok(Completion {
            content,
            finish_reason: choice.finish_reason,
            usage,
            latency_ms,
        })
    }

    /// POST a chat-completions body to the provider serving `model`, for the gateway, which
    /// relays the answer as it comes (a stream, say), whatever its status. The whole exchange
    /// may take up to `RELAY_FOR`; the timeout (`timeout_seconds`) bounds each wait for more of
    /// the answer instead. Bounded whole by the timeout, as a completion is, a long generation
    /// streamed through was cut off mid-answer, without its end.
    /// Also the credential the call sent (the provider's key, or the base64 of its URL's
    /// userinfo), which the relayed answer must not show. `depth`: the fusion servers the
    /// request will have passed through (`DEPTH_HEADER`), counted so that a loop ends.
    pub async fn relay<'a>(
        &'a self,
        model: &'a str,
        body: Value,
        depth: u32,
    ) -> Result<(reqwest::Response, Option<&'a str>), UpstreamError> {
        let resolved = self.resolve(model);
        let answer = self.send_within(resolved, body, RELAY_FOR, depth).await?;
        Ok((answer, resolved.1.credential()))
    }

    /// A relayed answer that is not a 2xx (see `relay`), read as the error it stands for: its
    /// body waited for as any error's is, and the credential the call sent (`key`) hidden in
    /// its message.
    pub async fn relayed_error(
        &self,
        answer: reqwest::Response,
        key: Option<&str>,
    ) -> UpstreamError {
        let status = answer.status().as_u16();
        match read_ok(answer, key, self.now(), self.error_wait()).await {
            // Hidden again once the message is read out of its JSON: escaped there (`\/`,
            // `\u002B`), the key in the body did not read as the key.
            Err(e) => e.hiding(key),
            Ok(_) => UpstreamError::new(
                ErrorKind::BadBody,
                Some(status),
                format!("upstream answered {status}, not an error"),
            ),
        }
    }

    /// POST a chat-completions body to a resolved provider (its `model` field set to the
    /// provider's name for the model, its `DEPTH_HEADER` `depth`), the whole exchange bounded
    /// by `within`; the answer whatever its status.
    async fn send_within(
        &self,
        (_, endpoint, upstream_model): (&Provider, &Endpoint, &str),
        mut body: Value,
        within: Duration,
        depth: u32,
    ) -> Result<reqwest::Response, UpstreamError> {
        body["model"] = json!(upstream_model);
        let body = serde_json::to_vec(&body)
            .map_err(|e| UpstreamError::new(ErrorKind::Rejected, None, e.to_string()))?;
        let mut headers = endpoint.headers.clone();
        headers.insert(DEPTH_HEADER, HeaderValue::from(depth));
        self.post(&endpoint.url, headers, body, within).await
    }

    /// POST a completion request to `provider` and read the answer whole: the body of a 2xx,
    /// or the classified error of anything else. Plain-HTTP upstreams go through the lean
    /// client (which applies the same whole-call timeout), the rest through reqwest.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        body: Vec<u8>,
    ) -> Result<Answered, UpstreamError> {
        let key = endpoint.credential();
        let Some(target) = &endpoint.plain else {
            let headers = endpoint.headers.clone();
            let answer = self
                .post(&endpoint.url, headers, body, self.config.timeout)
                .await?;
            return read_ok(answer, key, self.now(), self.error_wait()).await;
        };
        let answer = self
            .plain
            .post(target, &endpoint.headers, body.into())
            .await?;
        let mut headers = answer.headers;
        let content_type = headers.remove(CONTENT_TYPE);
        let retry_after = headers.get(hyper::header::RETRY_AFTER);
        let now = date_of(&headers).unwrap_or_else(|| self.now());
        ok_or_error(
            answer.status,
            (retry_after, headers.get(SHOULD_RETRY)),
            content_type,
            answer.body,
            key,
            now,
        )
    }

    /// POST a JSON body to `url` through reqwest.
    async fn post(
        &self,
        url: &str,
        headers: hyper::HeaderMap,
        body: Vec<u8>,
        within: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.http
            .post(url)
            .headers(headers)
            .timeout(within)
            .body(body)
            .send()
            .await
            .map_err(error::send_error)
    }

    /// A whole non-streamed completion as JSON, with its usage priced. Its error never shows
    /// the provider's key.
    pub async fn complete_json(
        &self,
        model: &str,
        body: Value,
    ) -> Result<(Value, Usage), UpstreamError> {
        let resolved = self.resolve(model);
        self.complete_json_shown(model, resolved, body)
            .await
            .map_err(|e| e.hiding(resolved.1.credential()))
    }

    async fn complete_json_shown(
        &self,
        model: &str,
        resolved: (&Provider, &Endpoint, &str),
        body: Value,
    ) -> Result<(Value, Usage), UpstreamError> {
        let resp = self
            .send_within(resolved, body, self.config.timeout, 1)
            .await?;
        let (provider, endpoint, _) = resolved;
        let key = endpoint.credential();
        let answered = read_ok(resp, key, self.now(), self.error_wait()).await?;
        let status = answered.status;
        let value: Value = answered.parse(provider, key)?;
        if !value.is_object() {
            return Err(UpstreamError::new(
                ErrorKind::BadBody,
                Some(status),
                "upstream body is JSON but not an object (a chat completion)",
            ));
        }
        let choice = &value["choices"][0];
        let finish_reason = choice["finish_reason"].as_str();
        let wire = value
            .get("usage")
            .filter(|u| !u.is_null())
            .map(WireUsage::of);
        let usage = self.usage(model, wire);
        if let Some(error) = wire::reported_error(&value["error"], &choice["error"], finish_reason)
        {
            let alone = choice.is_null().then_some(&value["error"]);
            return Err(mid_answer(status, &error, alone, key).billed(usage));
        }
        // As `complete` reads them: no `choices` is not a completion (retried), an empty list
        // is one with no answer (final); neither goes to the client as if it were an answer.
        match value["choices"].as_array() {
            None => Err(UpstreamError::new(
                ErrorKind::BadBody,
                Some(status),
                "upstream body is not a chat completion: it has no `choices`",
            )
            .billed(usage)),
            Some(choices) if choices.is_empty() => Err(UpstreamError::new(
                ErrorKind::Empty,
                Some(status),
                "upstream returned no choices",
            )
            .billed(usage)),
            Some(_) => Ok((value, usage)),
        }
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
        Usage::of(u.prompt_tokens, u.completion_tokens, cost)
    }
}

/// A 200 whose model failed mid-answer (see `wire::reported_error`): retried like a garbled
/// body, since whatever text came with it is cut short, and taken (or, empty, failed for good)
/// it would be checkpointed as it is. An error `alone`, beside no choice at all, is classed by
/// the status it names, if any (`answer::named`). `key`: the credential the call sent.
fn mid_answer(status: u16, error: &str, alone: Option<&Value>, key: Option<&str>) -> UpstreamError {
    let error = answer::excerpt(error.as_bytes(), key);
    let (kind, named) = alone.map_or((ErrorKind::BadBody, status), |e| answer::named(e, status));
    UpstreamError::new(
        kind,
        Some(named),
        format!("upstream answered {status} with an error mid-answer: {error}"),
    )
}

/// The longest a relayed answer may take whole (see `Upstream::relay`).
const RELAY_FOR: Duration = Duration::from_secs(24 * 3600);

/// Answer header by which a server says whether a request may be sent again (the OpenAI SDKs
/// obey it).
pub const SHOULD_RETRY: &str = "x-should-retry";

/// Header marking calls made by a fusion run, so that a fusion endpoint upstream refuses to
/// start another run (the recursion guard).
pub const DEPTH_HEADER: &str = "x-fusion-depth";

/// The body of a 2xx answer (up to `MAX_ANSWER_BYTES`), or the classified error of any other
/// (a `Retry-After` date measured from the answer's `Date`, else from `now`; its body waited for
/// at most `error_wait`).
async fn read_ok(
    mut resp: reqwest::Response,
    key: Option<&str>,
    now: SystemTime,
    error_wait: Duration,
) -> Result<Answered, UpstreamError> {
    let status = resp.status().as_u16();
    let now = date_of(resp.headers()).unwrap_or(now);
    let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).cloned();
    let should_retry = resp.headers().get(SHOULD_RETRY).cloned();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let mut body = body::Body::new(status, resp.content_length())?;
    let is_error = body.is_error();
    let read = async {
        while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
            if !body.take(&chunk)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    match is_error {
        true => _ = body::Body::read_error(error_wait, read).await,
        false => _ = read.await?,
    }
    ok_or_error(
        status,
        (retry_after.as_ref(), should_retry.as_ref()),
        content_type,
        body.into_bytes(),
        key,
        now,
    )
}

/// An answer's own `Date`: a `Retry-After` date is the same server's clock, so the wait it
/// means is measured from there, whatever this host's clock (or the database's) says.
fn date_of(headers: &hyper::HeaderMap) -> Option<SystemTime> {
    let date = headers.get(hyper::header::DATE)?.to_str().ok()?;
    httpdate::parse_http_date(date).ok()
}

/// A 2xx answer, or the error any other status stands for (`key` hidden in its body before
/// the message is cut from it: a key cut in two would not be found whole afterwards), retried
/// as its `Retry-After` and `x-should-retry` say.
fn ok_or_error(
    status: u16,
    (retry_after, should_retry): (Option<&HeaderValue>, Option<&HeaderValue>),
    content_type: Option<HeaderValue>,
    body: Bytes,
    key: Option<&str>,
    now: SystemTime,
) -> Result<Answered, UpstreamError> {
    if !(200..300).contains(&status) {
        let retry_after = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        let text = answer::key_hidden(String::from_utf8_lossy(&body), key);
        let error = UpstreamError::from_status(status, &text, retry_after);
        return Err(error.unless_told_not_to(should_retry));
    }
    Ok(Answered {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests;
