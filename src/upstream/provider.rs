//! Where calls go: the configured providers (base URL, key, how each is asked for structured
//! output), which one serves a `provider:model` name, and how calls to it are made (URL, headers,
//! which client). Never shows a key or a password in `Debug`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use hyper::Uri;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper_util::client::proxy::matcher::Matcher;
use serde::Deserialize;

use super::h1::Target;
use super::{DEPTH_HEADER, Upstream};
use crate::redact::redact_url;

/// A provider key, kept out of `Debug` and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub(super) String);

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

impl StructuredOutput {
    /// An OpenAI `response_format` (`json_object`, or `json_schema` with its schema) as a
    /// provider in this mode is asked for it: as it is; as `json_object` with the schema beside
    /// the type; or not at all, the prompt then saying what to write.
    pub fn request_format(self, format: &serde_json::Value) -> Option<serde_json::Value> {
        match self {
            StructuredOutput::JsonSchema => Some(format.clone()),
            StructuredOutput::JsonObject => {
                let mut object = serde_json::json!({"type": "json_object"});
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    object["schema"] = schema.clone();
                }
                Some(object)
            }
            StructuredOutput::Prompt => None,
        }
    }
}

/// Price per million tokens, used when the upstream does not report `usage.cost`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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

impl Upstream {
    /// The provider that serves `model` and the model name to send it: `NAME:model` addresses a
    /// configured provider; anything else (including OpenRouter's `vendor/model:variant`) goes to
    /// the default provider unchanged.
    pub fn route<'a>(&'a self, model: &'a str) -> (&'a Provider, &'a str) {
        let (provider, _, model) = self.resolve(model);
        (provider, model)
    }

    /// `route`, with the provider's endpoint.
    pub(super) fn resolve<'a>(&'a self, model: &'a str) -> (&'a Provider, &'a Endpoint, &'a str) {
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
}

/// How calls to one provider are made. (The `Authorization` value is marked sensitive: `Debug`
/// does not print it.)
#[derive(Debug)]
pub(super) struct Endpoint {
    /// The chat-completions URL under the provider's base URL, without its userinfo.
    pub(super) url: String,
    /// The headers every call carries: JSON body, the recursion guard, the provider's key (or
    /// the base URL's userinfo as Basic auth).
    pub(super) headers: HeaderMap,
    /// `Some` when completions take the lean client: an `http://` URL that the proxy variables
    /// (`HTTP_PROXY`, `ALL_PROXY`, less `NO_PROXY`, read as reqwest reads them) leave alone.
    pub(super) plain: Option<Target>,
    /// The credential every call sends, as it goes out: the provider's key, or the base64 of
    /// the base URL's userinfo. What an upstream echoing its request would show (kept out of
    /// `Debug`, as a key is). `None` for one shorter than `MIN_HIDDEN_CREDENTIAL` characters: a
    /// local server (llama.cpp, vLLM, Ollama) takes any key and is given `x` or `EMPTY`, which
    /// guards nothing, and hiding every `x` of every answer would garble it.
    pub(super) credential: Option<ApiKey>,
}

/// The shortest credential hidden in relayed bodies and error messages (see
/// `Endpoint::credential`): shorter ones are placeholders, not secrets.
const MIN_HIDDEN_CREDENTIAL: usize = 8;

impl Endpoint {
    /// The credential every call sends, as it goes out (see `credential`): what an error
    /// message or a relayed body must not show.
    pub(super) fn credential(&self) -> Option<&str> {
        self.credential.as_ref().map(|c| c.0.as_str())
    }

    pub(super) fn of(provider: &Provider, proxies: &Matcher) -> anyhow::Result<Endpoint> {
        let (base_url, basic_auth) = without_userinfo(&provider.base_url);
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(DEPTH_HEADER, HeaderValue::from_static("1"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        let mut credential = None;
        if let Some(key) = &provider.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.0)).map_err(|_| {
                anyhow::anyhow!(
                    "the API key of provider {} cannot be sent in an HTTP header",
                    provider.name
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
            credential = Some(key.clone());
        } else if let Some(value) = basic_auth {
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Basic "));
            credential = token.map(|t| ApiKey(t.to_string()));
            headers.insert(AUTHORIZATION, value);
        }
        let plain = url
            .parse::<Uri>()
            .ok()
            .filter(|uri| uri.scheme_str() == Some("http") && proxies.intercept(uri).is_none())
            .and_then(|uri| Target::new(&uri));
        Ok(Endpoint {
            url,
            headers,
            plain,
            credential: credential.filter(|c| c.0.chars().count() >= MIN_HIDDEN_CREDENTIAL),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let target = endpoint.plain.as_ref().unwrap();
        assert_eq!(target.path, "/v1/chat/completions");
        assert_eq!(target.host, "127.0.0.1:8081");
        assert_eq!(target.origin, "127.0.0.1:8081");
        let default_port = Endpoint::of(&p("http://user:pw@localhost/v1"), &none).unwrap();
        let target = default_port.plain.unwrap();
        assert_eq!(
            (target.host.to_str().unwrap(), target.origin.as_str()),
            ("localhost", "localhost:80")
        );
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
