//! Settings: the optional `fusion.toml` (providers, presets, limits, prices) merged with flags and
//! environment variables (which win). Provider keys are read from the environment only, never
//! from the file, and never printed.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::job::{MAX_MODEL_NAME_CHARS, is_fusion_model};
use crate::redact::redact_url;
use crate::upstream::{ApiKey, Price, Provider, RetryPolicy, StructuredOutput, UpstreamConfig};

/// The file, as written by a user. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub providers: HashMap<String, ProviderSection>,
    #[serde(default)]
    pub presets: HashMap<String, Preset>,
    /// The preset behind the bare model name `fusion`.
    pub default_preset: Option<String>,
    #[serde(default)]
    pub jobs: JobsSection,
    #[serde(default)]
    pub retry: RetrySection,
    #[serde(default)]
    pub prices: HashMap<String, Price>,
    #[serde(default)]
    pub analysis: AnalysisSection,
    #[serde(default)]
    pub server: ServerSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub base_url: Option<String>,
    /// Name of the environment variable holding the default provider's key.
    pub api_key_env: Option<String>,
    pub timeout_seconds: Option<u64>,
    /// `json_schema` (default), `json_object` or `prompt`.
    pub structured_output: Option<StructuredOutput>,
    /// `max_completion_tokens` (default) or `max_tokens`.
    pub max_tokens_field: Option<String>,
}

/// Bounds on the analysis, sent in its JSON schema so weak models cannot ramble forever.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSection {
    pub max_items: Option<u64>,
    pub max_text: Option<u64>,
    pub max_tokens: Option<u32>,
}

/// `[server] max_body_mib` by default: room for a long conversation or a few images in base64.
pub const DEFAULT_MAX_BODY_MIB: u64 = 4;
/// The same, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = (DEFAULT_MAX_BODY_MIB << 20) as usize;
/// The most `[server] max_body_mib` may be: a body is held whole, parsed once (its JSON tree
/// bounded by its count of objects and values, not its size), and stored in the job; Postgres
/// takes at most 1 GiB in one message, and a batch of writes is cut at ~64 MiB of text.
pub const MAX_BODY_MIB: u64 = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Seconds between SSE keep-alive comments.
    pub keepalive_seconds: Option<u64>,
    /// Seconds a request waiting on its job keeps retrying failed reads of it.
    pub wait_outage_seconds: Option<u64>,
    /// The largest request body taken, in MiB.
    pub max_body_mib: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// `json_schema` (default), `json_object` or `prompt`.
    pub structured_output: Option<StructuredOutput>,
    /// `max_completion_tokens` (default) or `max_tokens`.
    pub max_tokens_field: Option<String>,
}

/// A named panel and analyst, addressed as `fusion/NAME`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub panel: Vec<String>,
    pub analyst: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    pub min_panel: Option<u32>,
    pub deadline_seconds: Option<u64>,
    pub max_attempts: Option<i32>,
    pub analysis_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    pub max_attempts: Option<u32>,
    pub base_ms: Option<u64>,
    pub cap_ms: Option<u64>,
    pub jitter: Option<f64>,
}

/// The longest deadline a job may have: in the config's `[jobs]` and in a request.
pub const MAX_DEADLINE_SECONDS: u64 = 7 * 86_400;

/// Defaults applied to every job unless the request says otherwise.
#[derive(Debug, Clone)]
pub struct JobDefaults {
    pub min_panel: u32,
    /// `None`: no deadline.
    pub deadline_seconds: Option<u64>,
    /// Claims (including lease expiries) before a job fails with `lease_expired`.
    pub max_attempts: i32,
    pub analysis_attempts: u32,
}

/// Everything resolved: what the rest of the program reads.
#[derive(Debug, Clone)]
pub struct FusionConfig {
    pub upstream: UpstreamConfig,
    pub presets: HashMap<String, Preset>,
    pub default_preset: String,
    pub jobs: JobDefaults,
    pub retry: RetryPolicy,
    pub analysis: AnalysisLimits,
    /// Interval of SSE keep-alive comments.
    pub keepalive: Duration,
    /// How long a request waiting on its job rides out a database that fails its reads before
    /// it answers with the job's id to fetch it by later.
    pub wait_outage: Duration,
    /// The largest request body taken, in bytes (`413 body_too_large` past it).
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnalysisLimits {
    /// `maxItems` of every array in the analysis schema.
    pub max_items: u64,
    /// `maxLength` of every string in it.
    pub max_text: u64,
    /// Token limit of one analysis call (none: the provider's default).
    pub max_tokens: Option<u32>,
}

pub const DEFAULT_UPSTREAM_URL: &str = "https://openrouter.ai/api/v1";

/// Built-in presets (OpenRouter slugs); a config file may replace or add to them.
pub fn builtin_presets() -> HashMap<String, Preset> {
    let preset = |panel: &[&str], analyst: &str| Preset {
        panel: panel.iter().map(|s| s.to_string()).collect(),
        analyst: analyst.to_string(),
    };
    HashMap::from([
        (
            "quality".to_string(),
            preset(
                &[
                    "anthropic/claude-opus-4.6",
                    "openai/gpt-5.2",
                    "google/gemini-3-pro-preview",
                ],
                "anthropic/claude-opus-4.6",
            ),
        ),
        (
            "budget".to_string(),
            preset(
                &[
                    "google/gemini-3-flash-preview",
                    "moonshotai/kimi-k2.6",
                    "deepseek/deepseek-v4-pro",
                ],
                "google/gemini-3-flash-preview",
            ),
        ),
        (
            "fast".to_string(),
            preset(
                &["google/gemini-3-flash-preview", "openai/gpt-5-mini"],
                "google/gemini-3-flash-preview",
            ),
        ),
    ])
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read config file {}", path.display()))?;
        parse_file(&text).with_context(|| format!("Invalid config file {}", path.display()))
    }

    /// Values that parse but cannot work: refused at start-up, naming the key, rather than
    /// clamped or left to fail every job.
    fn check_numbers(&self) -> anyhow::Result<()> {
        if let Some(d) = self.jobs.deadline_seconds {
            anyhow::ensure!(
                (1..=MAX_DEADLINE_SECONDS).contains(&d),
                "[jobs] deadline_seconds must be 1 to {MAX_DEADLINE_SECONDS} (7 days), got {d}"
            );
        }
        if let Some(n) = self.jobs.min_panel {
            anyhow::ensure!(
                (1..=crate::MAX_PANEL as u32).contains(&n),
                "[jobs] min_panel must be 1 to {}, got {n}",
                crate::MAX_PANEL
            );
        }
        let r = &self.retry;
        anyhow::ensure!(r.base_ms != Some(0), "[retry] base_ms must be at least 1");
        // Either one may be left to its default, which counts the same.
        let defaults = RetryPolicy::default();
        let base = r.base_ms.unwrap_or(defaults.base.as_millis() as u64);
        let cap = r.cap_ms.unwrap_or(defaults.cap.as_millis() as u64);
        anyhow::ensure!(
            cap >= base,
            "[retry] cap_ms ({cap}{}) must not be below base_ms ({base}{})",
            if r.cap_ms.is_none() {
                ", the default"
            } else {
                ""
            },
            if r.base_ms.is_none() {
                ", the default"
            } else {
                ""
            },
        );
        for (key, value, max) in [
            ("keepalive_seconds", self.server.keepalive_seconds, 3_600),
            (
                "wait_outage_seconds",
                self.server.wait_outage_seconds,
                86_400,
            ),
            ("max_body_mib", self.server.max_body_mib, MAX_BODY_MIB),
        ] {
            if let Some(v) = value {
                anyhow::ensure!(
                    (1..=max).contains(&v),
                    "[server] {key} must be 1 to {max}, got {v}"
                );
            }
        }
        if let Some(j) = r.jitter {
            anyhow::ensure!(
                (0.0..=1.0).contains(&j),
                "[retry] jitter must be a fraction from 0 to 1, got {j}"
            );
        }
        // Counts and sizes: below the range they cannot work (an analysis allowed 0 tokens
        // fails every try, paid for), above it they hold a slot for days or ask for what no
        // model gives. They used to be raised or lowered into range without a word.
        let (a, j) = (&self.analysis, &self.jobs);
        let big = |v: Option<u64>| v.map(saturating_i64);
        for (key, value, (min, max)) in [
            (
                "[jobs] max_attempts",
                j.max_attempts.map(i64::from),
                (1, 1_000),
            ),
            (
                "[jobs] analysis_attempts",
                j.analysis_attempts.map(i64::from),
                (1, 100),
            ),
            (
                "[retry] max_attempts",
                r.max_attempts.map(i64::from),
                (1, 100),
            ),
            ("[retry] base_ms", big(r.base_ms), (1, 600_000)),
            ("[retry] cap_ms", big(r.cap_ms), (1, 3_600_000)),
            ("[analysis] max_items", big(a.max_items), (1, 100)),
            ("[analysis] max_text", big(a.max_text), (20, 20_000)),
            (
                "[analysis] max_tokens",
                a.max_tokens.map(i64::from),
                (1, 1_000_000),
            ),
        ] {
            if let Some(v) = value {
                anyhow::ensure!(
                    (min..=max).contains(&v),
                    "{key} must be {min} to {max}, got {v}"
                );
            }
        }
        Ok(())
    }

    /// Prices are multiplied into every call's cost: one that is not a finite, non-negative
    /// number would make costs NaN (which SQLite cannot store in a step, so every checkpoint of
    /// that model would fail), infinite or negative.
    fn check_prices(&self) -> anyhow::Result<()> {
        for (model, price) in &self.prices {
            for (part, value) in [("prompt", price.prompt), ("completion", price.completion)] {
                anyhow::ensure!(
                    value.is_finite() && value >= 0.0,
                    "[prices.{model:?}] {part} must be a price per million tokens, 0 or more; \
                     got {value}"
                );
            }
        }
        Ok(())
    }

    /// Each `api_key_env` must name an environment variable. A key written there by mistake
    /// would otherwise be looked up as a variable's name, found unset, and logged in the
    /// warning that says so; so the value is not shown here either.
    fn check_key_vars(&self) -> anyhow::Result<()> {
        let providers = self
            .providers
            .iter()
            .map(|(name, p)| (format!("[providers.{name}]"), p.api_key_env.as_deref()));
        let named = [(
            "[upstream]".to_string(),
            self.upstream.api_key_env.as_deref(),
        )];
        for (section, var) in named.into_iter().chain(providers) {
            let Some(var) = var else { continue };
            let mut chars = var.chars();
            let name = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            anyhow::ensure!(
                name,
                "{section} api_key_env must be the name of the environment variable that holds \
                 the key (letters, digits and `_`, not starting with a digit), not the key \
                 itself; what is there ({} characters) is not shown",
                var.chars().count()
            );
        }
        Ok(())
    }

    /// Resolve against the environment (`env` is a lookup so tests need not touch the process's).
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<FusionConfig> {
        self.check_numbers()?;
        self.check_prices()?;
        self.check_key_vars()?;
        // The key in the first of `vars` that holds one, and that variable's name.
        let key_from = |vars: &[&str]| {
            vars.iter()
                .find_map(|var| Some((env(var).and_then(ApiKey::new)?, var.to_string())))
        };
        // The variable the file names, else `FUSION_UPSTREAM_API_KEY`: before, once the file
        // named a variable (the README's example names `OPENROUTER_API_KEY`), a key in
        // `FUSION_UPSTREAM_API_KEY` was never read, and every call went without one. The file's
        // own choice stays first: it may point `base_url` at a provider whose key that is.
        // With the URL from the environment (`FUSION_UPSTREAM_URL`), its key is the
        // environment's too: the file's variable may hold the key of the file's `base_url`.
        let file_var = self.upstream.api_key_env.as_deref();
        let env_url = env("FUSION_UPSTREAM_URL");
        let default_key = match file_var {
            Some(var) if env_url.is_some() => key_from(&["FUSION_UPSTREAM_API_KEY", var]),
            Some(var) => key_from(&[var, "FUSION_UPSTREAM_API_KEY"]),
            None => key_from(&["FUSION_UPSTREAM_API_KEY", "OPENROUTER_API_KEY"]),
        };
        if default_key.is_none() {
            unset_key_var("[upstream]", file_var);
        }
        let (base_url, url_setting) = match (env_url, self.upstream.base_url) {
            (Some(url), _) => (url, "FUSION_UPSTREAM_URL"),
            (None, Some(url)) => (url, "[upstream] base_url"),
            (None, None) => (DEFAULT_UPSTREAM_URL.to_string(), "the default base URL"),
        };
        let parsed = check_url(&base_url).context("Invalid upstream base URL")?;
        one_authorization("default", &default_key, &parsed, &base_url, url_setting)?;
        // A hosted provider (OpenRouter by default) refuses every call without a key: the jobs
        // would fail as `all_panels_failed` with nothing said at start. A local server over
        // plain HTTP usually needs none.
        if default_key.is_none()
            && file_var.is_none()
            && parsed.scheme() == "https"
            && parsed.username().is_empty()
        {
            tracing::warn!(
                "no upstream API key is set (FUSION_UPSTREAM_API_KEY or OPENROUTER_API_KEY): \
                 calls to {} go without one, which a hosted provider refuses",
                parsed.host_str().unwrap_or("the upstream")
            );
        }
        let timeout_seconds = match env("FUSION_UPSTREAM_TIMEOUT_SECONDS") {
            Some(v) => v
                .parse()
                .context("FUSION_UPSTREAM_TIMEOUT_SECONDS must be a number")?,
            None => self.upstream.timeout_seconds.unwrap_or(600),
        };
        anyhow::ensure!(
            (1..=86_400).contains(&timeout_seconds),
            "the upstream timeout (FUSION_UPSTREAM_TIMEOUT_SECONDS or [upstream] timeout_seconds) \
             must be 1 to 86400 seconds, got {timeout_seconds}"
        );
        let mut providers = HashMap::new();
        for (name, p) in self.providers {
            // Addressed as `NAME:model`, split at the first colon: a name with one, or none, would
            // never be routed to, and its models would go to the default provider instead.
            let longest = MAX_MODEL_NAME_CHARS - ":m".len();
            anyhow::ensure!(
                plain_name(&name, longest) && !name.contains(':'),
                "provider name {name:?} must be 1 to {longest} characters, without a colon (its \
                 models are addressed as `{name}:model`), control characters or spaces around it"
            );
            let parsed = check_url(&p.base_url)
                .with_context(|| format!("Invalid base_url of provider {name}"))?;
            let api_key = p.api_key_env.as_deref().and_then(|var| key_from(&[var]));
            if api_key.is_none() {
                unset_key_var(&format!("[providers.{name}]"), p.api_key_env.as_deref());
            }
            let url_setting = format!("[providers.{name}] base_url");
            one_authorization(&name, &api_key, &parsed, &p.base_url, &url_setting)?;
            let provider = with_wire_options(
                Provider::new(&name, &p.base_url, api_key.map(|(key, _)| key)),
                p.structured_output,
                p.max_tokens_field,
            )?;
            providers.insert(name, provider);
        }
        let mut presets = builtin_presets();
        for (name, preset) in self.presets {
            // Asked for as `fusion/<name>`, which must be a model name a request may carry.
            let longest = MAX_MODEL_NAME_CHARS - "fusion/".len();
            anyhow::ensure!(
                plain_name(&name, longest),
                "preset name {name:?} must be 1 to {longest} characters (it is asked for as \
                 `fusion/{name}`), without control characters or spaces around it"
            );
            anyhow::ensure!(
                (1..=crate::MAX_PANEL).contains(&preset.panel.len()),
                "preset {name} must have 1 to {} panel models",
                crate::MAX_PANEL
            );
            for m in preset.panel.iter().chain([&preset.analyst]) {
                check_preset_model(&name, m)?;
            }
            presets.insert(name, preset);
        }
        let default_preset = self.default_preset.unwrap_or_else(|| "quality".to_string());
        anyhow::ensure!(
            presets.contains_key(&default_preset),
            "default_preset `{default_preset}` is not a preset"
        );
        let defaults = RetryPolicy::default();
        let retry = RetryPolicy {
            max_attempts: self.retry.max_attempts.unwrap_or(defaults.max_attempts),
            base: self
                .retry
                .base_ms
                .map_or(defaults.base, Duration::from_millis),
            cap: self
                .retry
                .cap_ms
                .map_or(defaults.cap, Duration::from_millis),
            jitter_fraction: self
                .retry
                .jitter
                .unwrap_or(defaults.jitter_fraction)
                .clamp(0.0, 1.0),
            jitter: defaults.jitter,
        };
        Ok(FusionConfig {
            upstream: UpstreamConfig {
                default: with_wire_options(
                    Provider::new("default", &base_url, default_key.map(|(key, _)| key)),
                    self.upstream.structured_output,
                    self.upstream.max_tokens_field,
                )?,
                providers,
                timeout: Duration::from_secs(timeout_seconds),
                prices: self.prices,
                max_idle_per_host: crate::upstream::DEFAULT_MAX_IDLE_PER_HOST,
            },
            presets,
            default_preset,
            jobs: JobDefaults {
                min_panel: self.jobs.min_panel.unwrap_or(1).max(1),
                deadline_seconds: self.jobs.deadline_seconds,
                max_attempts: self.jobs.max_attempts.unwrap_or(10),
                analysis_attempts: self.jobs.analysis_attempts.unwrap_or(3),
            },
            retry,
            analysis: AnalysisLimits {
                max_items: self.analysis.max_items.unwrap_or(12),
                max_text: self.analysis.max_text.unwrap_or(600),
                max_tokens: self.analysis.max_tokens,
            },
            keepalive: Duration::from_secs(self.server.keepalive_seconds.unwrap_or(15)),
            wait_outage: Duration::from_secs(self.server.wait_outage_seconds.unwrap_or(60)),
            max_body_bytes: (self.server.max_body_mib)
                .map_or(DEFAULT_MAX_BODY_BYTES, |mib| (mib << 20) as usize),
        })
    }
}

/// Apply a provider's wire options (how it differs from OpenAI) to its defaults.
fn with_wire_options(
    mut p: Provider,
    structured_output: Option<StructuredOutput>,
    max_tokens_field: Option<String>,
) -> anyhow::Result<Provider> {
    if let Some(mode) = structured_output {
        p.structured_output = mode;
    }
    if let Some(field) = max_tokens_field {
        anyhow::ensure!(
            matches!(field.as_str(), "max_completion_tokens" | "max_tokens"),
            "provider {}: max_tokens_field must be max_completion_tokens or max_tokens",
            p.name
        );
        p.max_tokens_field = field;
    }
    Ok(p)
}

/// An upstream URL must be http or https; the error names it without its credentials.
fn check_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let shown = redact_url(url);
    let parsed = reqwest::Url::parse(url).with_context(|| format!("`{shown}` is not a URL"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https"),
        "`{shown}` must be http or https"
    );
    // `/chat/completions` is appended to the base URL: after a query or a fragment it would
    // not be part of the path, and every call would go to the wrong place.
    anyhow::ensure!(
        parsed.query().is_none() && parsed.fragment().is_none(),
        "`{shown}` must be a base URL without a query or fragment (`/chat/completions` is \
         appended to it)"
    );
    Ok(parsed)
}

/// `v` as an `i64`, `i64::MAX` past it (out of every range checked).
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A provider's key and credentials in its base URL would both be the `Authorization` header,
/// and a request carries one: refused at start-up, naming both settings, rather than one of them
/// dropped without a word (the URL's, as reqwest drops it) — and with it the key, possibly one
/// meant for another service (`OPENROUTER_API_KEY` is the fallback), sent to a server that
/// wanted the URL's. No server needs both: each is a complete credential.
fn one_authorization(
    provider: &str,
    key: &Option<(ApiKey, String)>,
    parsed: &reqwest::Url,
    url: &str,
    url_setting: &str,
) -> anyhow::Result<()> {
    let Some((_, key_var)) = key else {
        return Ok(());
    };
    anyhow::ensure!(
        parsed.username().is_empty() && parsed.password().is_none(),
        "provider {provider}: both an API key ({key_var}) and credentials in the base URL \
         ({url_setting}: `{}`) are set, and a request can carry only one of them as its \
         Authorization header: remove the key or the URL's `user:password@`",
        redact_url(url)
    );
    Ok(())
}

/// The file's settings, or what is wrong with them and where: toml's message and the line and
/// column, never the line itself, which toml's own error quotes (an `api_key = "sk-…"` written
/// under a section that takes no such key went to the terminal and the logs as it was).
fn parse_file(text: &str) -> anyhow::Result<FileConfig> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map_or_else(String::new, |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!(" (line {line}, column {column})")
        });
        anyhow::anyhow!("{}{at}", e.message().trim_end())
    })
}

/// A key variable that the file names (`api_key_env` under `section`) but that holds no key: the
/// provider is called without one, which its every call may refuse (401), so it is said.
fn unset_key_var(section: &str, var: Option<&str>) {
    if let Some(var) = var {
        let var = shown_var(var);
        tracing::warn!(
            "{section} api_key_env names {var}, which holds no key: calls go without one"
        );
    }
}

/// A variable's name as a log line shows it: an upper-case name as it is, anything else (a key
/// of letters and digits written there by mistake would pass for a name) by its length only.
fn shown_var(var: &str) -> String {
    let conventional = var
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    match conventional {
        true => format!("`{var}`"),
        false => format!(
            "a variable ({} characters, not shown: not an upper-case name, it may be a key)",
            var.chars().count()
        ),
    }
}

/// A name as a request could carry it (a model's name is trimmed, and one with a control
/// character refused): 1 to `longest` characters, no control character, no spaces around it.
fn plain_name(name: &str, longest: usize) -> bool {
    (1..=longest).contains(&name.chars().count())
        && name.trim() == name
        && !name.contains(char::is_control)
}

/// A preset's model is sent as written, so it must be what a request's model names are after
/// trimming: 1 to 200 characters, no control character, not a fusion model. A bad one would
/// fail every request for the preset, and the error would blame the client.
fn check_preset_model(preset: &str, m: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        plain_name(m, MAX_MODEL_NAME_CHARS),
        "preset {preset}: model name {m:?} must be 1 to {MAX_MODEL_NAME_CHARS} characters, \
         without control characters or spaces around it"
    );
    anyhow::ensure!(
        !is_fusion_model(m),
        "preset {preset}: `{m}` is a fusion model; a preset's panel and analyst are models a \
         fusion run calls"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Whether resolving the default file config with `pairs` as the environment warns that
    /// no upstream key is set.
    fn warns_of_no_key(pairs: &[(&str, &str)]) -> bool {
        let (lines, _logs) = crate::testing::capture_logs();
        FileConfig::default().resolve(&env(pairs)).unwrap();
        lines.text().contains("no upstream API key is set")
    }

    // OpenRouter (the default) refuses every call without a key; a local server does not.
    #[test]
    fn a_hosted_upstream_without_a_key_is_warned_of_at_start() {
        assert!(warns_of_no_key(&[]));
        assert!(!warns_of_no_key(&[("OPENROUTER_API_KEY", "sk-or")]));
        assert!(!warns_of_no_key(&[("FUSION_UPSTREAM_API_KEY", "sk")]));
        assert!(!warns_of_no_key(&[(
            "FUSION_UPSTREAM_URL",
            "http://127.0.0.1:8080/v1"
        )]));
    }

    #[test]
    fn env_overrides_the_file_and_keys_fall_back() {
        let file: FileConfig = toml::from_str(
            r#"
            default_preset = "budget"
            [upstream]
            base_url = "http://file.example/v1"
            [providers.ollama]
            base_url = "http://127.0.0.1:11434/v1"
            [presets.tiny]
            panel = ["a", "a"]
            analyst = "b"
            "#,
        )
        .unwrap();
        let cfg = file
            .resolve(&env(&[
                ("FUSION_UPSTREAM_URL", "http://env.example/v1"),
                ("OPENROUTER_API_KEY", "sk-or"),
            ]))
            .unwrap();
        assert_eq!(cfg.upstream.default.base_url, "http://env.example/v1");
        assert!(cfg.upstream.default.api_key.is_some());
        assert!(cfg.upstream.providers.contains_key("ollama"));
        assert_eq!(cfg.presets["tiny"].panel.len(), 2);
        assert!(cfg.presets.contains_key("quality"));
        assert_eq!(cfg.default_preset, "budget");
        assert!(!format!("{cfg:?}").contains("sk-or"));
    }

    // The file names the variable holding the key (as the README's example does), but the key
    // is in `FUSION_UPSTREAM_API_KEY`: that one is read when the named one holds none. Before,
    // it was never read, and every call went without a key. The file's choice comes first.
    #[test]
    fn the_environments_key_variable_backs_up_the_files_choice() {
        let file = || -> FileConfig {
            toml::from_str("[upstream]\napi_key_env = \"OPENROUTER_API_KEY\"").unwrap()
        };
        let cfg = file()
            .resolve(&env(&[("FUSION_UPSTREAM_API_KEY", "sk-env")]))
            .unwrap();
        let key = |k: &str| ApiKey::new(k.into());
        assert_eq!(cfg.upstream.default.api_key, key("sk-env"));
        let cfg = file()
            .resolve(&env(&[("OPENROUTER_API_KEY", "sk-or")]))
            .unwrap();
        assert_eq!(cfg.upstream.default.api_key, key("sk-or"));
        let both = [
            ("OPENROUTER_API_KEY", "sk-or"),
            ("FUSION_UPSTREAM_API_KEY", "sk-env"),
        ];
        let cfg = file().resolve(&env(&both)).unwrap();
        assert_eq!(
            cfg.upstream.default.api_key,
            key("sk-or"),
            "the file's choice first"
        );
        // With the URL from the environment, the environment's key goes with it.
        let url = ("FUSION_UPSTREAM_URL", "http://mine.example/v1");
        let cfg = file().resolve(&env(&[both[0], both[1], url])).unwrap();
        assert_eq!(
            cfg.upstream.default.api_key,
            key("sk-env"),
            "the URL's own key"
        );
        let cfg = file().resolve(&env(&[])).unwrap();
        assert!(cfg.upstream.default.api_key.is_none());
    }

    // A key written where the file takes none (here beside the upstream's settings, refused as
    // an unknown field) is not quoted back: the error says what and where, not the line.
    // Before, toml's own message showed the line, key and all.
    #[test]
    fn a_bad_file_is_told_without_quoting_its_lines() {
        let text = "[upstream]\nbase_url = \"http://h/v1\"\napi_key = \"sk-secret-123\"\n";
        let err = parse_file(text).unwrap_err();
        let shown = format!("{err:#}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(
            shown.contains("api_key") && shown.contains("line 3"),
            "{shown}"
        );
    }

    // A password in an upstream URL stays out of the start-up error that names a bad URL, and
    // out of the configuration's `Debug`.
    #[test]
    fn upstream_urls_are_shown_without_their_password() {
        for url in ["ftp://user:secret@h/v1", "http://user:secret@h:99999/v1"] {
            let file: FileConfig = toml::from_str("").unwrap();
            let err = file
                .resolve(&env(&[("FUSION_UPSTREAM_URL", url)]))
                .unwrap_err();
            let shown = format!("{err:#}");
            assert!(
                shown.contains("user:***@h") && !shown.contains("secret"),
                "{shown}"
            );
        }
        let file: FileConfig = toml::from_str("").unwrap();
        let cfg = file
            .resolve(&env(&[("FUSION_UPSTREAM_URL", "http://user:secret@h/v1")]))
            .unwrap();
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("http://user:***@h/v1") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn refuses_numbers_that_cannot_work_naming_the_key() {
        for (toml, key) in [
            ("[upstream]\ntimeout_seconds = 0", "timeout"),
            ("[jobs]\ndeadline_seconds = 0", "deadline_seconds"),
            (
                "[jobs]\ndeadline_seconds = 10000000000000000",
                "deadline_seconds",
            ),
            ("[jobs]\nmin_panel = 9", "min_panel"),
            ("[retry]\nbase_ms = 0", "base_ms"),
            ("[retry]\nbase_ms = 500\ncap_ms = 100", "cap_ms"),
            // Against the other's default (base 1 s, cap 60 s).
            (
                "[retry]\ncap_ms = 500",
                "cap_ms (500) must not be below base_ms (1000, the default)",
            ),
            ("[retry]\nbase_ms = 120000", "base_ms (120000)"),
            ("[server]\nkeepalive_seconds = 0", "keepalive_seconds"),
            (
                "[server]\nkeepalive_seconds = 9223372036854775807",
                "keepalive_seconds",
            ),
            ("[server]\nwait_outage_seconds = 0", "wait_outage_seconds"),
            (
                "[server]\nmax_body_mib = 0",
                "max_body_mib must be 1 to 64, got 0",
            ),
            (
                "[server]\nmax_body_mib = 65",
                "max_body_mib must be 1 to 64, got 65",
            ),
            ("[retry]\njitter = nan", "jitter"),
            ("[retry]\njitter = 2.0", "jitter"),
            // Once raised or lowered into range without a word.
            (
                "[jobs]\nmax_attempts = 0",
                "[jobs] max_attempts must be 1 to 1000, got 0",
            ),
            (
                "[jobs]\nanalysis_attempts = 0",
                "[jobs] analysis_attempts must be 1",
            ),
            (
                "[retry]\nmax_attempts = 0",
                "[retry] max_attempts must be 1",
            ),
            (
                "[analysis]\nmax_tokens = 0",
                "[analysis] max_tokens must be 1",
            ),
            (
                "[analysis]\nmax_items = 1000",
                "[analysis] max_items must be 1 to 100",
            ),
            ("[analysis]\nmax_text = 5", "[analysis] max_text must be 20"),
            (
                "[retry]\nbase_ms = 86400000\ncap_ms = 86400000",
                "[retry] base_ms must be 1 to 600000",
            ),
            (
                "[upstream]\ntimeout_seconds = 1000000",
                "must be 1 to 86400 seconds, got 1000000",
            ),
            (
                "[upstream]\nbase_url = \"https://h/v1?api-version=2024\"",
                "without a query",
            ),
            (
                "[providers.p]\nbase_url = \"http://h/v1#x\"",
                "without a query or fragment",
            ),
        ] {
            let file: FileConfig = toml::from_str(toml).unwrap();
            let err = format!("{:#}", file.resolve(&env(&[])).expect_err(toml));
            assert!(err.contains(key), "{toml}: {err}");
        }
        let file: FileConfig = toml::from_str("").unwrap();
        let err = file
            .resolve(&env(&[("FUSION_UPSTREAM_TIMEOUT_SECONDS", "0")]))
            .expect_err("a zero timeout")
            .to_string();
        assert!(err.contains("FUSION_UPSTREAM_TIMEOUT_SECONDS"), "{err}");
        let file: FileConfig = toml::from_str("").unwrap();
        let env_huge = env(&[("FUSION_UPSTREAM_TIMEOUT_SECONDS", "99999999")]);
        let err = file.resolve(&env_huge).expect_err("a huge timeout");
        assert!(err.to_string().contains("1 to 86400"), "{err}");
        // The environment's timeout wins over the file's, which is then not checked either.
        let file: FileConfig = toml::from_str("[upstream]\ntimeout_seconds = 0").unwrap();
        let env_ok = env(&[("FUSION_UPSTREAM_TIMEOUT_SECONDS", "600")]);
        file.resolve(&env_ok).expect("the environment's timeout");
        // The edges that do work still resolve.
        let file: FileConfig = toml::from_str(
            "[jobs]\ndeadline_seconds = 604800\nmin_panel = 8\n[retry]\nbase_ms = 1\ncap_ms = 1\njitter = 0.0",
        )
        .unwrap();
        file.resolve(&env(&[])).unwrap();
    }

    // A key and credentials in the base URL would both be the `Authorization` header, and one
    // would be dropped without a word: start-up stops, naming the provider and both settings
    // (never the secrets). Either one alone is fine.
    #[test]
    fn refuses_a_key_beside_credentials_in_the_base_url_naming_both() {
        for (toml, vars, says) in [
            (
                "",
                &[
                    ("FUSION_UPSTREAM_URL", "http://u:pw@h/v1"),
                    ("OPENROUTER_API_KEY", "sk-or"),
                ][..],
                &[
                    "provider default",
                    "OPENROUTER_API_KEY",
                    "FUSION_UPSTREAM_URL",
                    "u:***@h",
                ][..],
            ),
            (
                "[upstream]\nbase_url = \"https://sk-tok@h/v1\"\napi_key_env = \"MY_KEY\"",
                &[("MY_KEY", "sk-1")],
                &["provider default", "MY_KEY", "[upstream] base_url", "***@h"],
            ),
            (
                "[providers.local]\nbase_url = \"http://u:pw@h/v1\"\napi_key_env = \"LOCAL_KEY\"",
                &[("LOCAL_KEY", "sk-1")],
                &["provider local", "LOCAL_KEY", "[providers.local] base_url"],
            ),
        ] {
            let file: FileConfig = toml::from_str(toml).unwrap();
            let err = format!("{:#}", file.resolve(&env(vars)).expect_err(toml));
            for said in says {
                assert!(err.contains(said), "{said:?} in {err}");
            }
            for secret in ["pw", "sk-"] {
                assert!(!err.contains(secret), "{secret:?} in {err}");
            }
        }
        for (toml, vars) in [
            ("", &[("FUSION_UPSTREAM_URL", "http://u:pw@h/v1")][..]),
            ("", &[("OPENROUTER_API_KEY", "sk-or")]),
            (
                // The variable it names is unset: no key.
                "[providers.local]\nbase_url = \"http://u:pw@h/v1\"\napi_key_env = \"UNSET\"",
                &[],
            ),
        ] {
            let file: FileConfig = toml::from_str(toml).unwrap();
            file.resolve(&env(vars)).expect(toml);
        }
    }

    #[test]
    fn rejects_bad_files() {
        let bad: Result<FileConfig, _> = toml::from_str("[upstream]\nbase_urll = \"x\"");
        assert!(bad.is_err());
        let file: FileConfig = toml::from_str("default_preset = \"nope\"").unwrap();
        assert!(file.resolve(&env(&[])).is_err());
        let file: FileConfig =
            toml::from_str("[presets.big]\npanel = []\nanalyst = \"a\"").unwrap();
        assert!(file.resolve(&env(&[])).is_err());
        // A model name goes into SSE comment lines and upstream bodies: no control characters.
        for preset in [
            "[presets.nl]\npanel = [\"a\\nb\"]\nanalyst = \"a\"",
            "[presets.nl]\npanel = [\"a\"]\nanalyst = \"a\\rb\"",
        ] {
            let file: FileConfig = toml::from_str(preset).unwrap();
            let err = file.resolve(&env(&[])).unwrap_err().to_string();
            assert!(err.contains("control character"), "{err}");
        }
        // A model name a request could not give fails at start-up, naming the preset, rather
        // than every request for the preset with an error that blames the client.
        let long = "m".repeat(201);
        for (model, says) in [
            ("fusion/budget", "`fusion/budget` is a fusion model"),
            ("fusion", "`fusion` is a fusion model"),
            ("", "must be 1 to 200 characters"),
            (" m ", "or spaces around it"),
            (long.as_str(), "must be 1 to 200 characters"),
        ] {
            for preset in [
                format!("[presets.x]\npanel = [\"a\", {model:?}]\nanalyst = \"a\""),
                format!("[presets.x]\npanel = [\"a\"]\nanalyst = {model:?}"),
            ] {
                let file: FileConfig = toml::from_str(&preset).unwrap();
                let err = file.resolve(&env(&[])).unwrap_err().to_string();
                assert!(err.starts_with("preset x: ") && err.contains(says), "{err}");
            }
        }
        // A preset name is asked for as `fusion/<name>`: one no request could carry (too long
        // for a model name, a control character) fails at start-up, not as an unknown model
        // that `/v1/models` lists all the same.
        let long = format!(
            "[presets.{}]\npanel = [\"a\"]\nanalyst = \"a\"",
            "p".repeat(194)
        );
        let tab = "[presets.\"a\\tb\"]\npanel = [\"a\"]\nanalyst = \"a\"".to_string();
        for preset in [long, tab] {
            let file: FileConfig = toml::from_str(&preset).unwrap();
            let err = file.resolve(&env(&[])).unwrap_err().to_string();
            assert!(err.contains("must be 1 to 193 characters"), "{err}");
        }
        let fits = format!(
            "[presets.{}]\npanel = [\"a\"]\nanalyst = \"a\"",
            "p".repeat(193)
        );
        let file: FileConfig = toml::from_str(&fits).unwrap();
        assert!(file.resolve(&env(&[])).is_ok());
    }

    // A provider is addressed as `NAME:model`, split at the first colon: a name that no model
    // could address fails at start-up, rather than its models going to the default provider.
    #[test]
    fn a_provider_name_must_be_addressable() {
        for name in ["my:llm", "", " x", "a\tb"] {
            let text = format!("[providers.{name:?}]\nbase_url = \"http://h/v1\"");
            let file: FileConfig = toml::from_str(&text).unwrap();
            let err = file.resolve(&env(&[])).unwrap_err().to_string();
            assert!(err.starts_with("provider name"), "{name:?}: {err}");
        }
        let file: FileConfig =
            toml::from_str("[providers.\"my-llm.2\"]\nbase_url = \"http://h/v1\"").unwrap();
        assert!(file.resolve(&env(&[])).is_ok());
    }

    // A price takes `prompt` and `completion` only: another key (a cached-prompt price, say)
    // is refused, not ignored.
    #[test]
    fn a_price_with_an_unknown_key_is_refused() {
        let text = "[prices.\"m\"]\nprompt = 3.0\ncompletion = 15.0\ncached_prompt = 0.3";
        let err = parse_file(text).unwrap_err().to_string();
        assert!(err.contains("unknown field `cached_prompt`"), "{err}");
    }

    #[test]
    fn a_price_must_be_a_finite_amount_of_zero_or_more() {
        for (value, shown) in [("nan", "NaN"), ("inf", "inf"), ("-1.0", "-1")] {
            for part in ["prompt", "completion"] {
                let other = if part == "prompt" {
                    "completion"
                } else {
                    "prompt"
                };
                let text = format!("[prices.\"m\"]\n{part} = {value}\n{other} = 1.0");
                let file: FileConfig = toml::from_str(&text).unwrap();
                let err = file.resolve(&env(&[])).unwrap_err().to_string();
                let says = format!("[prices.\"m\"] {part} must be a price per million tokens");
                assert!(err.starts_with(&says) && err.ends_with(shown), "{err}");
            }
        }
        let file: FileConfig =
            toml::from_str("[prices.\"m\"]\nprompt = 0.0\ncompletion = 2.5").unwrap();
        assert!(file.resolve(&env(&[])).is_ok());
    }

    // A key written where its variable's name goes is refused without being shown (looked up
    // as a name, it was found unset and logged in the warning that said so).
    #[test]
    fn api_key_env_must_name_a_variable_and_a_key_there_is_not_shown() {
        let key = "sk-or-v1-0123abcd";
        for (toml, section) in [
            (format!("[upstream]\napi_key_env = {key:?}"), "[upstream]"),
            (
                format!("[providers.x]\nbase_url = \"http://h/v1\"\napi_key_env = {key:?}"),
                "[providers.x]",
            ),
            (
                "[upstream]\napi_key_env = \"1KEY\"".to_string(),
                "[upstream]",
            ),
        ] {
            let file: FileConfig = toml::from_str(&toml).unwrap();
            let err = file.resolve(&env(&[])).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{section} api_key_env must be the name")),
                "{err}"
            );
            assert!(!err.contains(key) && !err.contains("1KEY"), "{err}");
        }
        for name in ["OPENROUTER_API_KEY", "_k", "key2"] {
            let toml = format!("[upstream]\napi_key_env = {name:?}");
            let file: FileConfig = toml::from_str(&toml).unwrap();
            assert!(file.resolve(&env(&[])).is_ok(), "{name}");
        }
        // A key of letters and digits passes for a name: the warning that it holds no key
        // shows an upper-case name only.
        assert_eq!(shown_var("OPENROUTER_API_KEY"), "`OPENROUTER_API_KEY`");
        for key in ["gsk_abc123DEF", "0123abcdef"] {
            let shown = shown_var(key);
            assert!(
                !shown.contains(key) && shown.contains("not shown"),
                "{shown}"
            );
        }
    }
}
