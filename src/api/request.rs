//! Parse, don't validate: an OpenAI chat-completions body (plus job fields) becomes a `JobSpec`
//! here, with presets resolved, or a 400 that says exactly what is wrong.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::MAX_PANEL;
use crate::config::{FusionConfig, MAX_DEADLINE_SECONDS};
use crate::job::{JobSpec, MAX_MODEL_NAME_CHARS, is_fusion_model};

/// A parsed job request.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub spec: JobSpec,
    pub metadata: Value,
    pub priority: i32,
    pub deadline_seconds: Option<u64>,
}

/// OpenAI's roles; `function` is the deprecated one that answers an assistant's legacy
/// `function_call` (still sent by code written for it, and by SDKs' older helpers).
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// The fusion plugin's fields (the fusion tool's settings take them too).
pub const PLUGIN_FIELDS: [&str; 6] = [
    "id",
    "model",
    "analysis_models",
    "min_panel",
    "panel_timeout_ms",
    "deadline_seconds",
];

pub fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// `n` other than 1: a client asking for several choices would get one and not be told.
pub fn refuse_several_choices(n: Option<&Value>) -> Result<(), ApiError> {
    match n {
        None | Some(Value::Null) => Ok(()),
        Some(n) if n.as_u64() == Some(1) => Ok(()),
        Some(n) => Err(bad(format!(
            "`n` must be 1: a fusion run writes one answer, got {n}"
        ))),
    }
}

/// What a request asks for that an answer written as text cannot carry: token log
/// probabilities (`logprobs` anything but false or null; `top_logprobs` other than 0, which
/// asks for none), or an audio answer (`modalities` with `"audio"`, or `audio`). The field that
/// asks, and what the answer would lack.
pub fn beyond_text(obj: &Map<String, Value>) -> Option<(&'static str, &'static str)> {
    let unset = |v: Option<&Value>| matches!(v, None | Some(Value::Null | Value::Bool(false)));
    let top = obj.get("top_logprobs");
    let audio_out = obj
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|m| m == "audio"));
    let probabilities = "token log probabilities";
    [
        (!unset(obj.get("logprobs")), "logprobs", probabilities),
        (
            !unset(top) && top.and_then(Value::as_f64) != Some(0.0),
            "top_logprobs",
            probabilities,
        ),
        (audio_out, "modalities", "audio"),
        (
            !matches!(obj.get("audio"), None | Some(Value::Null)),
            "audio",
            "audio",
        ),
    ]
    .into_iter()
    .find_map(|(set, field, what)| set.then_some((field, what)))
}

/// What a fusion run cannot give and a client would break without: what `beyond_text` finds
/// (`choice.logprobs` or `message.audio` would be null), and a forced tool or function call (a
/// fusion model answers in text; `tools` with `tool_choice` `auto` or `none`, or
/// `allowed_tools` in `auto` mode, are accepted and unused, as text is allowed).
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some((field, what)) = beyond_text(obj) {
        return Err(unsupported(
            field,
            format!(
                "`{field}` is not supported: a fusion answer is text written from several \
                 models' answers, and has no {what}"
            ),
        ));
    }
    let offered = |k: &str| {
        obj.get(k)
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
    };
    let forces_tool = match obj.get("tool_choice") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => s == "required",
        Some(choice) if choice["type"] == "allowed_tools" => {
            choice["allowed_tools"]["mode"] == "required"
        }
        Some(_) => true,
    };
    // The older `functions` and `function_call` (`{"name": ...}` forces one).
    let forces_function = obj.get("function_call").is_some_and(Value::is_object);
    if (offered("tools") && forces_tool) || (offered("functions") && forces_function) {
        let field = match offered("tools") && forces_tool {
            true => "tool_choice",
            false => "function_call",
        };
        return Err(unsupported(
            field,
            "`tool_choice` (or `function_call`) cannot force a call on a fusion model: it \
             answers in text; use `auto` or `none`, or offer `{\"type\": \"fusion\"}` as a \
             tool to another model",
        ));
    }
    Ok(())
}

/// A fusion plugin field written at the top level, where it would be taken for an unused
/// chat-completions field and the job run without it (no deadline, the default panel).
fn refuse_misplaced_plugin_fields(obj: &Map<String, Value>) -> Result<(), ApiError> {
    // `model` is a chat-completions field too (and names the analyst when a plugin is given).
    let misplaced = PLUGIN_FIELDS
        .into_iter()
        .filter(|f| !["id", "model"].contains(f))
        .find(|f| obj.get(*f).is_some_and(|v| !v.is_null()));
    match misplaced {
        None => Ok(()),
        Some(f) => Err(bad(format!(
            "`{f}` is a fusion plugin field: give it as `plugins: [{{\"id\": \"fusion\", \"{f}\": \
             ...}}]`, not at the top level"
        ))),
    }
}

fn unsupported(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("unsupported_parameter", message).param(param)
}

/// Hash of the request, to tell a true repeat under an idempotency key from a reused key. Taken
/// over the body with every object's keys in sorted order: the same request sent with its keys
/// in another order (a client whose maps have none) is the same request, and the hashes stored
/// before bodies kept their order (they were read into sorted maps) still match.
///
/// The body's fields that are not the job's (how it is answered, who asks, tools its panel is
/// not given) are left out, so that one key and one job's body match on `/v1/jobs` and on
/// `/v1/chat/completions` alike.
pub fn request_hash(body: &Value) -> String {
    let mut canonical = Vec::new();
    sorted_json(body, &NOT_THE_JOBS, &mut canonical);
    let digest = Sha256::digest(&canonical);
    crate::hex(&digest)
}

/// A request's top-level fields that are not part of its job (see `request_hash`).
const NOT_THE_JOBS: [&str; 5] = ["stream", "stream_options", "tools", "tool_choice", "user"];

/// `value` as compact JSON with its objects' keys sorted (as `str`s sort), without the keys
/// `skip` of the top level.
fn sorted_json(value: &Value, skip: &[&str], out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map
                .iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json(k, out);
                out.push(b':');
                sorted_json(v, &[], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                sorted_json(v, &[], out);
            }
            out.push(b']');
        }
        scalar => push_json(scalar, out),
    }
}

/// A key or a scalar, written to memory: serde_json fails only with a failing writer or a map
/// whose keys are not strings, neither of which this is.
fn push_json(value: &impl serde::Serialize, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, value);
}

pub fn parse(body: &Value, config: &FusionConfig) -> Result<JobRequest, ApiError> {
    parse_as(body, config, "plugins[fusion]")
}

/// `parse`, naming the fusion plugin's fields `{plugin_field}.model` and so on in errors: the
/// fusion tool's settings become a job's plugin, but its client wrote them elsewhere.
pub fn parse_as(
    body: &Value,
    config: &FusionConfig,
    plugin_field: &str,
) -> Result<JobRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    let model = match obj.get("model") {
        // As a model the plugin names: with a plugin, this one is the analyst.
        Some(m @ Value::String(_)) => model_name(m, "model")?,
        Some(_) => return Err(bad("`model` must be a non-empty string")),
        None => return Err(bad("`model` is required")),
    };
    let messages = parse_messages(obj.get("messages"))?;
    match obj.get("stream") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(bad(
                "`stream: true` is not supported on /v1/jobs: poll GET /v1/jobs/{id} instead",
            ));
        }
        Some(_) => return Err(bad("`stream` must be a boolean")),
    }
    refuse_several_choices(obj.get("n"))?;
    refuse_unsupported(obj)?;
    refuse_misplaced_plugin_fields(obj)?;
    let plugin = parse_plugins(obj.get("plugins"))?;

    let (mut panel, mut analyst) = if model == "fusion" {
        let p = &config.presets[&config.default_preset];
        (p.panel.clone(), p.analyst.clone())
    } else if let Some(name) = model.strip_prefix("fusion/") {
        let p = config.presets.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = config.presets.keys().map(String::as_str).collect();
            known.sort_unstable();
            ApiError::bad_request(
                "unknown_preset",
                format!(
                    "unknown preset `{name}`; known presets: {}",
                    known.join(", ")
                ),
            )
        })?;
        (p.panel.clone(), p.analyst.clone())
    } else if plugin.is_some() {
        let p = &config.presets[&config.default_preset];
        (p.panel.clone(), model.clone())
    } else {
        return Err(ApiError::bad_request(
            "model_not_fusion",
            format!(
                "model `{model}` is not a fusion model: use `fusion`, `fusion/<preset>`, or add \
                 `plugins: [{{\"id\": \"fusion\", \"analysis_models\": [...]}}]`"
            ),
        ));
    };
    let mut min_panel = config.jobs.min_panel;
    // Where `min_panel` came from, for the error when the panel is smaller: the request's
    // plugin, or (`None`) the server's default.
    let mut min_panel_field = None;
    let mut panel_timeout_ms = None;
    let mut deadline_seconds = config.jobs.deadline_seconds;
    if let Some(plugin) = plugin {
        // A field given as null is left out, as the top-level fields are (an SDK's `extra_body`
        // dict with `None` in it sends nulls).
        let field = |name: &str| plugin.get(name).filter(|v| !v.is_null());
        if let Some(v) = field("analysis_models") {
            panel = string_list(v, &format!("{plugin_field}.analysis_models"))?;
        }
        if let Some(v) = field("model") {
            analyst = model_name(v, &format!("{plugin_field}.model"))?;
        }
        if let Some(v) = field("min_panel") {
            let field = format!("{plugin_field}.min_panel");
            min_panel = int_in(v, &field, 1, MAX_PANEL as i64)? as u32;
            min_panel_field = Some(field);
        }
        if let Some(v) = field("panel_timeout_ms") {
            panel_timeout_ms = Some(int_in(
                v,
                &format!("{plugin_field}.panel_timeout_ms"),
                1,
                86_400_000,
            )? as u64);
        }
        if let Some(v) = field("deadline_seconds") {
            deadline_seconds = Some(int_in(
                v,
                &format!("{plugin_field}.deadline_seconds"),
                1,
                MAX_DEADLINE_SECONDS as i64,
            )? as u64);
        }
    }
    if let Some(m) = panel.iter().chain([&analyst]).find(|m| is_fusion_model(m)) {
        return Err(ApiError::bad_request(
            "fusion_recursion",
            format!(
                "`{m}` cannot be a panel member or the analyst: a fusion call inside a fusion run is refused"
            ),
        ));
    }
    if panel.is_empty() {
        return Err(ApiError::bad_request(
            "panel_empty",
            "the panel needs at least one model",
        ));
    }
    if panel.len() > MAX_PANEL {
        return Err(ApiError::bad_request(
            "panel_too_large",
            format!(
                "the panel has {} models; at most {MAX_PANEL} are allowed",
                panel.len()
            ),
        ));
    }
    if min_panel as usize > panel.len() {
        let n = panel.len();
        return Err(bad(match min_panel_field {
            Some(field) => format!("`{field}` is {min_panel} but the panel has only {n} models"),
            None => format!(
                "the panel has only {n} models but this server asks at least {min_panel} to \
                 answer (its `[jobs] min_panel`): set `{plugin_field}.min_panel`, or send a \
                 larger panel"
            ),
        }));
    }
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => Some(t),
            _ => return Err(bad("`temperature` must be a number from 0 to 2")),
        },
    };
    // OpenAI's current name first, then the older one; a null is no limit, as if left out.
    // Both are checked when both are given, so a wrong one is not passed over in silence.
    let mut max_completion_tokens = None;
    for field in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            let n = int_in(v, field, 1, 1_000_000)? as u32;
            max_completion_tokens.get_or_insert(n);
        }
    }
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => {
            if v.to_string().len() > MAX_METADATA_BYTES {
                return Err(bad(format!(
                    "`metadata` must be at most {MAX_METADATA_BYTES} bytes"
                )));
            }
            v.clone()
        }
        Some(_) => return Err(bad("`metadata` must be a JSON object")),
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => int_in(v, "priority", -1000, 1000)? as i32,
    };
    Ok(JobRequest {
        spec: JobSpec {
            model,
            messages,
            panel,
            analyst,
            temperature,
            max_completion_tokens,
            min_panel,
            panel_timeout_ms,
            response_format: parse_response_format(obj.get("response_format"))?,
            stop: parse_stop(obj.get("stop"))?,
        },
        metadata,
        priority,
        deadline_seconds,
    })
}

/// `stop`, OpenAI's shape: a non-empty string or an array of 1 to 4 of them; null, `""` and `[]`
/// are none.
fn parse_stop(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let valid = |s: &Value| s.as_str().is_some_and(|s| !s.is_empty());
    match v {
        // Some clients send an empty list (or string) for none, as OpenAI accepts.
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(s) if valid(s) => Ok(Some(s.clone())),
        Some(Value::Array(a)) if (1..=4).contains(&a.len()) && a.iter().all(valid) => {
            Ok(Some(Value::Array(a.clone())))
        }
        Some(_) => Err(bad(
            "`stop` must be a non-empty string or an array of 1 to 4 non-empty strings",
        )),
    }
}

/// The final answer's `response_format`, OpenAI's shape: `text` (the default, as no format),
/// `json_object`, or `json_schema` with a `name` and, if given, a `schema` object. Kept as sent.
fn parse_response_format(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(format.clone())),
        Some("json_schema") => {
            let inner = format.get("json_schema");
            if !inner
                .and_then(|s| s.get("name"))
                .is_some_and(Value::is_string)
            {
                return Err(bad(
                    "`response_format.json_schema.name` must be a string (OpenAI's shape: \
                     {\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}})",
                ));
            }
            // OpenAI's rule for the name; a name it refuses would fail the final call, after
            // the panel and the analysis were paid for.
            let name = inner.and_then(|s| s.get("name")).and_then(Value::as_str);
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if name.is_some_and(|n| n.is_empty() || n.len() > 64 || !n.chars().all(allowed)) {
                return Err(bad(
                    "`response_format.json_schema.name` must be 1 to 64 letters, digits, `_` \
                     or `-` (OpenAI's rule; a name it refuses would fail the final answer)",
                ));
            }
            if inner
                .and_then(|s| s.get("schema"))
                .is_some_and(|s| !s.is_object())
            {
                return Err(bad(
                    "`response_format.json_schema.schema` must be a JSON Schema object",
                ));
            }
            Ok(Some(format.clone()))
        }
        _ => Err(bad(
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

pub fn parse_messages(v: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = match v {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("`messages` must be an array")),
        None => return Err(bad("`messages` is required")),
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(
            "empty_messages",
            "`messages` must not be empty",
        ));
    }
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(format!(
                "`messages[{i}]` must be an object with a string `role`"
            ))
        })?;
        if !ROLES.contains(&role) {
            return Err(bad(format!(
                "`messages[{i}].role` is `{role}`; expected one of {}",
                ROLES.join(", ")
            )));
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => content_parts(parts, i)?,
            // A function that returned nothing (OpenAI's SDK types allow a null content).
            Some(Value::Null) | None if role == "function" => {}
            Some(Value::Null) | None if role == "assistant" => {
                // What an assistant message may carry instead of content, as the OpenAI SDKs
                // hand them back: tool calls, a refusal, an audio reply.
                let calls = m.get("tool_calls").and_then(Value::as_array);
                let instead = !calls.is_none_or(Vec::is_empty)
                    || m["function_call"].is_object()
                    || m["refusal"].is_string()
                    || m["audio"].is_object();
                if !instead {
                    return Err(bad(format!(
                        "`messages[{i}]` is an assistant message with neither `content` nor \
                         `tool_calls` (nor a `refusal` or an `audio` reply)"
                    )));
                }
            }
            _ => {
                return Err(bad(format!(
                    "`messages[{i}].content` must be a string or an array of content parts"
                )));
            }
        }
        if role == "function" && !m["name"].is_string() {
            return Err(bad(format!(
                "`messages[{i}].name` is required: a function message answers the call of the \
                 function of that name"
            )));
        }
        if role == "tool" && !m["tool_call_id"].is_string() {
            return Err(bad(format!(
                "`messages[{i}].tool_call_id` is required: a tool message answers the call of \
                 that id"
            )));
        }
    }
    Ok(list.clone())
}

/// A message's content parts, as every model is sent them: at least one, each an object with a
/// string `type`, a `text` part with its string `text`, OpenAI's `image_url`, `input_audio` and
/// `file` parts in OpenAI's shape (other kinds, a provider's own, go through as they are).
/// Refused here, a malformed part came back as a 502 (every panel model refusing it) after the
/// calls were paid.
fn content_parts(parts: &[Value], i: usize) -> Result<(), ApiError> {
    if parts.is_empty() {
        return Err(bad(format!(
            "`messages[{i}].content` is an empty array: give at least one content part"
        )));
    }
    for (j, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") if !part["text"].is_string() => {
                return Err(bad(format!(
                    "`messages[{i}].content[{j}].text` must be a string"
                )));
            }
            // OpenAI's other kinds, in OpenAI's shape: an object under the kind's name with
            // the fields every provider reads (an image's `url`, audio's `data` and `format`).
            Some(kind @ ("image_url" | "input_audio" | "file")) => {
                let needs: &[&str] = match kind {
                    "image_url" => &["url"],
                    "input_audio" => &["data", "format"],
                    _ => &[],
                };
                let inner = &part[kind];
                if !inner.is_object() || needs.iter().any(|f| !inner[*f].is_string()) {
                    let fields = needs.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>();
                    return Err(bad(format!(
                        "`messages[{i}].content[{j}].{kind}` must be an object{}",
                        match fields.len() {
                            0 => String::new(),
                            _ => format!(" with a string {}", fields.join(" and ")),
                        }
                    )));
                }
            }
            Some(_) => {}
            None => {
                return Err(bad(format!(
                    "`messages[{i}].content[{j}]` must be an object with a string `type`"
                )));
            }
        }
    }
    Ok(())
}

/// The fusion plugin's object, if the request has one; other plugins are refused.
fn parse_plugins(v: Option<&Value>) -> Result<Option<&Map<String, Value>>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("`plugins` must be an array")),
    };
    let mut fusion = None;
    for (i, p) in list.iter().enumerate() {
        let obj = p
            .as_object()
            .ok_or_else(|| bad(format!("`plugins[{i}]` must be an object")))?;
        match obj.get("id").and_then(Value::as_str) {
            Some("fusion") => {}
            Some(other) => {
                return Err(bad(format!(
                    "unsupported plugin `{other}`: only the `fusion` plugin is supported"
                )));
            }
            None => return Err(bad(format!("`plugins[{i}].id` must be a string"))),
        }
        if let Some(unknown) = obj.keys().find(|k| !PLUGIN_FIELDS.contains(&k.as_str())) {
            return Err(bad(format!(
                "unknown field `{unknown}` in the fusion plugin; known fields: {}",
                PLUGIN_FIELDS.join(", ")
            )));
        }
        if fusion.replace(obj).is_some() {
            return Err(bad("only one fusion plugin may be given"));
        }
    }
    Ok(fusion)
}

fn model_name(v: &Value, field: &str) -> Result<String, ApiError> {
    match v.as_str().map(str::trim) {
        Some(m) if !m.is_empty() && m.chars().count() <= MAX_MODEL_NAME_CHARS => {
            refuse_control_characters(m, field)?;
            Ok(m.to_string())
        }
        _ => Err(bad(format!(
            "`{field}` must be a model name (1 to {MAX_MODEL_NAME_CHARS} characters)"
        ))),
    }
}

/// A model name goes into upstream bodies, logs and SSE comment lines (where a line break would
/// end the line): one with a control character is refused, naming the field.
pub fn refuse_control_characters(name: &str, field: &str) -> Result<(), ApiError> {
    match name.chars().find(|c| c.is_control()) {
        Some(c) => Err(bad(format!(
            "`{field}` must not contain control characters; it has U+{:04X}",
            u32::from(c)
        ))),
        None => Ok(()),
    }
}

fn string_list(v: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| bad(format!("`{field}` must be an array of model names")))?;
    if list.len() > MAX_PANEL {
        return Err(ApiError::bad_request(
            "panel_too_large",
            format!(
                "`{field}` has {} models; at most {MAX_PANEL} are allowed",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| model_name(m, &format!("{field}[{i}]")))
        .collect()
}

fn int_in(v: &Value, field: &str, min: i64, max: i64) -> Result<i64, ApiError> {
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(format!(
            "`{field}` must be an integer from {min} to {max}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use serde_json::json;

    fn config() -> FusionConfig {
        FileConfig::default().resolve(&|_| None).unwrap()
    }

    fn msgs() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    fn err(body: Value) -> (String, String) {
        let e = parse(&body, &config()).unwrap_err();
        (e.code.into_owned(), e.message)
    }

    #[test]
    fn resolves_presets_and_plugins() {
        let cfg = config();
        let r = parse(&json!({"model": "fusion/budget", "messages": msgs()}), &cfg).unwrap();
        assert_eq!(r.spec.panel, cfg.presets["budget"].panel);
        let r = parse(
            &json!({"model": "openai/gpt-4o", "messages": msgs(), "plugins": [
                {"id": "fusion", "model": "a/analyst", "analysis_models": ["x", "x", "y"], "min_panel": 2}
            ], "temperature": 0.7, "max_tokens": 100, "metadata": {"k": 1}, "priority": 5}),
            &cfg,
        )
        .unwrap();
        assert_eq!(r.spec.panel, vec!["x", "x", "y"]);
        assert_eq!(r.spec.analyst, "a/analyst");
        assert_eq!(r.spec.min_panel, 2);
        assert_eq!(r.spec.temperature, Some(0.7));
        assert_eq!(r.spec.max_completion_tokens, Some(100));
        assert_eq!(r.priority, 5);
    }

    // A null plugin field is as if left out, as the top-level fields are; a plugin field at the
    // top level is refused only when it holds a value.
    #[test]
    fn a_null_plugin_field_is_left_out() {
        let nulls = json!({"id": "fusion", "model": null, "analysis_models": null,
                           "min_panel": null, "panel_timeout_ms": null, "deadline_seconds": null});
        let body = json!({"model": "judge", "messages": msgs(), "plugins": [nulls]});
        let given = parse(&body, &config()).unwrap();
        let bare = json!({"model": "judge", "messages": msgs(), "plugins": [{"id": "fusion"}]});
        assert_eq!(given, parse(&bare, &config()).unwrap());
        let top = json!({"model": "judge", "messages": msgs(), "plugins": [{"id": "fusion"}],
                         "deadline_seconds": null});
        assert_eq!(given, parse(&top, &config()).unwrap());
    }

    // A panel smaller than `min_panel` is refused, and the message names where the number
    // came from: the request's plugin, or the server's default, which the client never sent.
    #[test]
    fn a_panel_below_min_panel_names_where_min_panel_came_from() {
        let plugin = |min_panel: Option<u32>| {
            let mut p = json!({"id": "fusion", "analysis_models": ["a", "b"]});
            if let Some(n) = min_panel {
                p["min_panel"] = n.into();
            }
            json!({"model": "fusion", "messages": msgs(), "plugins": [p]})
        };
        let (code, message) = err(plugin(Some(3)));
        assert_eq!(code, "invalid_request");
        assert_eq!(
            message,
            "`plugins[fusion].min_panel` is 3 but the panel has only 2 models"
        );
        let mut strict = config();
        strict.jobs.min_panel = 3;
        let message = parse(&plugin(None), &strict).unwrap_err().message;
        assert!(
            message.starts_with("the panel has only 2 models but this server asks at least 3")
                && message.contains("[jobs] min_panel")
                && message.contains("set `plugins[fusion].min_panel`"),
            "{message}"
        );
        // The fusion tool's settings are named where its client wrote them.
        let message = parse_as(&plugin(None), &strict, "tools[0].fusion")
            .unwrap_err()
            .message;
        assert!(
            message.contains("set `tools[0].fusion.min_panel`"),
            "{message}"
        );
        // The plugin's own number overrides the server's.
        assert_eq!(parse(&plugin(Some(2)), &strict).unwrap().spec.min_panel, 2);
    }

    #[test]
    fn says_precisely_what_is_wrong() {
        assert_eq!(err(json!([])).0, "invalid_request");
        assert_eq!(err(json!({"messages": msgs()})).1, "`model` is required");
        assert_eq!(
            err(json!({"model": "fusion", "messages": []})).0,
            "empty_messages"
        );
        assert_eq!(
            err(json!({"model": "fusion/nope", "messages": msgs()})).0,
            "unknown_preset"
        );
        assert_eq!(
            err(json!({"model": "gpt-4o", "messages": msgs()})).0,
            "model_not_fusion"
        );
        for n in [json!(3), json!(0), json!("1")] {
            let (code, message) = err(json!({"model": "fusion", "messages": msgs(), "n": n}));
            assert_eq!(code, "invalid_request");
            assert!(message.starts_with("`n` must be 1"), "{message}");
        }
        for (format, says) in [
            (json!("json"), "`response_format.type`"),
            (json!({"type": "xml"}), "`response_format.type`"),
            (
                json!({"type": "json_schema"}),
                "`response_format.json_schema.name`",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}),
                "`response_format.json_schema.schema`",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "my schema"}}),
                "`response_format.json_schema.name` must be 1 to 64",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": ""}}),
                "`response_format.json_schema.name` must be 1 to 64",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a".repeat(65)}}),
                "`response_format.json_schema.name` must be 1 to 64",
            ),
        ] {
            let body = json!({"model": "fusion", "messages": msgs(), "response_format": format});
            let (code, message) = err(body);
            assert_eq!(code, "invalid_request");
            assert!(message.starts_with(says), "{message}");
        }
        let kept = |format: Value| {
            let body = json!({"model": "fusion", "messages": msgs(), "response_format": format});
            parse(&body, &config()).unwrap().spec.response_format
        };
        assert_eq!(kept(json!({"type": "text"})), None);
        assert_eq!(kept(Value::Null), None);
        let schema = json!({"type": "json_schema",
                            "json_schema": {"name": "a", "schema": {"type": "object"}}});
        assert_eq!(kept(schema.clone()), Some(schema));
        let named = json!({"type": "json_schema", "json_schema": {"name": "Math_answer-2"}});
        assert_eq!(kept(named.clone()), Some(named));
        // Whichever of the two token limits is given (not null) is read, and named if wrong.
        let limit = |extra: Value| {
            let mut body = json!({"model": "fusion", "messages": msgs()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse(&body, &config()).map(|r| r.spec.max_completion_tokens)
        };
        assert_eq!(
            limit(json!({"max_completion_tokens": null, "max_tokens": 100})).unwrap(),
            Some(100)
        );
        assert_eq!(
            limit(json!({"max_completion_tokens": 50, "max_tokens": 100})).unwrap(),
            Some(50)
        );
        assert_eq!(limit(json!({"max_tokens": null})).unwrap(), None);
        for (field, says) in [
            ("max_tokens", "`max_tokens` must be"),
            ("max_completion_tokens", "`max_completion_tokens` must be"),
        ] {
            let message = limit(json!({ field: 0 })).unwrap_err().message;
            assert!(message.starts_with(says), "{message}");
        }
        // The one not used is checked too.
        let message = limit(json!({"max_completion_tokens": 50, "max_tokens": 0}))
            .unwrap_err()
            .message;
        assert!(message.starts_with("`max_tokens` must be"), "{message}");
        // A plugin field written at the top level would be an unused chat field: refused.
        for field in [
            "analysis_models",
            "min_panel",
            "panel_timeout_ms",
            "deadline_seconds",
        ] {
            let (code, message) = err(json!({"model": "fusion", "messages": msgs(), field: 1}));
            assert_eq!(code, "invalid_request");
            let says = format!("`{field}` is a fusion plugin field");
            assert!(message.starts_with(&says), "{message}");
        }
        for n in [json!(1), Value::Null] {
            let body = json!({"model": "fusion", "messages": msgs(), "n": n});
            assert!(parse(&body, &config()).is_ok(), "{body}");
        }
        let nine: Vec<&str> = vec!["m"; 9];
        assert_eq!(
            err(json!({"model": "fusion", "messages": msgs(),
                       "plugins": [{"id": "fusion", "analysis_models": nine}]}))
            .0,
            "panel_too_large"
        );
        assert!(
            err(json!({"model": "fusion", "messages": [{"role": "robot", "content": "x"}]}))
                .1
                .contains("messages[0].role")
        );
        assert!(
            err(json!({"model": "fusion", "messages": msgs(), "temperature": 3}))
                .1
                .contains("temperature")
        );
        assert!(
            err(json!({"model": "fusion", "messages": msgs(), "plugins": [{"id": "web"}]}))
                .1
                .contains("unsupported plugin")
        );
        assert!(
            err(json!({"model": "fusion", "messages": msgs(),
                          "plugins": [{"id": "fusion", "analysis_modls": []}]}))
            .1
            .contains("analysis_modls")
        );
        assert_eq!(
            err(json!({"model": "fusion", "messages": msgs(),
                       "plugins": [{"id": "fusion", "analysis_models": ["a", "fusion/budget"]}]}))
            .0,
            "fusion_recursion"
        );
        assert!(
            err(json!({"model": "fusion", "messages": msgs(), "metadata": [1]}))
                .1
                .contains("metadata")
        );
    }

    #[test]
    fn stop_is_kept_for_the_final_answer_and_checked() {
        let stop = |v: Value| {
            let body = json!({"model": "fusion", "messages": msgs(), "stop": v});
            parse(&body, &config()).map(|r| r.spec.stop)
        };
        assert_eq!(stop(json!("END")).unwrap(), Some(json!("END")));
        assert_eq!(stop(json!(["a", "b"])).unwrap(), Some(json!(["a", "b"])));
        for none in [Value::Null, json!(""), json!([])] {
            assert_eq!(stop(none).unwrap(), None);
        }
        for wrong in [
            json!([""]),
            json!(["a", "b", "c", "d", "e"]),
            json!([1]),
            json!(7),
        ] {
            let e = stop(wrong.clone()).unwrap_err();
            assert!(
                e.message.starts_with("`stop` must be"),
                "{wrong}: {}",
                e.message
            );
        }
    }

    // What a fusion run cannot give is refused, not dropped: the client would read
    // `choice.logprobs` or `message.audio` as null, or find no tool call where it forced one.
    // The error names the field (`error.param`).
    #[test]
    fn refuses_log_probabilities_audio_and_forced_tool_calls() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        for (extra, param) in [
            (json!({"logprobs": true}), "logprobs"),
            (json!({"logprobs": 1}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (
                json!({"audio": {"voice": "alloy", "format": "wav"}}),
                "audio",
            ),
            (
                json!({"tools": tools, "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": tools, "tool_choice": {"type": "allowed_tools",
                       "allowed_tools": {"mode": "required", "tools": []}}}),
                "tool_choice",
            ),
            (
                json!({"functions": [{"name": "f"}], "function_call": {"name": "f"}}),
                "function_call",
            ),
        ] {
            let mut body = json!({"model": "fusion", "messages": msgs()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = parse(&body, &config()).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{extra}: {}", e.message);
            assert_eq!(e.param, Some(param), "{extra}");
        }
        for extra in [
            json!({"modalities": ["text"], "audio": null}),
            json!({"modalities": null}),
        ] {
            let mut body = json!({"model": "fusion", "messages": msgs()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert!(parse(&body, &config()).is_ok(), "{extra}");
        }
        for extra in [
            json!({"logprobs": false, "top_logprobs": null}),
            json!({"top_logprobs": 0}),
            json!({"top_logprobs": 0.0, "logprobs": null}),
            json!({"tools": tools, "tool_choice": {"type": "allowed_tools",
                   "allowed_tools": {"mode": "auto", "tools": []}}}),
            json!({"functions": [{"name": "f"}], "function_call": "auto"}),
            json!({"tools": tools, "tool_choice": "auto"}),
            json!({"tools": tools, "tool_choice": "none"}),
            json!({"tools": [], "tool_choice": "required"}),
        ] {
            let mut body = json!({"model": "fusion", "messages": msgs()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert!(parse(&body, &config()).is_ok(), "{extra}");
        }
    }

    #[test]
    fn refuses_control_characters_in_model_names() {
        let plugin = |p: Value| json!({"model": "fusion", "messages": msgs(), "plugins": [p]});
        let cases = [
            (
                json!({"model": "a\tb", "messages": msgs(), "plugins": [{"id": "fusion"}]}),
                "`model`",
            ),
            (
                plugin(json!({"id": "fusion", "model": "a\u{0}b"})),
                "`plugins[fusion].model`",
            ),
            (
                plugin(json!({"id": "fusion", "analysis_models": ["a", "b\u{1b}[0m"]})),
                "`plugins[fusion].analysis_models[1]`",
            ),
        ];
        for (body, field) in cases {
            let (code, message) = err(body);
            assert_eq!(code, "invalid_request");
            assert!(
                message.contains(field) && message.contains("control character"),
                "{message}"
            );
        }
    }

    #[test]
    fn hashes_are_stable_and_distinct() {
        let a = json!({"model": "fusion", "messages": msgs()});
        let b = json!({"messages": msgs(), "model": "fusion"});
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(
            request_hash(&a),
            request_hash(&json!({"model": "fusion/budget"}))
        );
        // The hash of the body written compact with sorted keys, as hashes stored before bodies
        // kept their order were taken (Python's `json.dumps` gives the same text with
        // `sort_keys=True, separators=(",", ":"), ensure_ascii=False`).
        let c = json!({"z": null, "model": "fusion", "a": 1.5,
                       "messages": [{"role": "user", "content": "hi \"there\" é"}]});
        assert_eq!(
            request_hash(&c),
            "09aa77dfd31316c9ed3943c703cd98e5111e2d95e7e9782bfa506df1a5202da1"
        );
        // What is not the job's is left out (at the top level only).
        let mut d = c.clone();
        d["stream"] = json!(false);
        d["user"] = json!("u1");
        d["tools"] = json!([]);
        assert_eq!(request_hash(&d), request_hash(&c));
        let mut e = c.clone();
        e["messages"][0]["user"] = json!("u1");
        assert_ne!(request_hash(&e), request_hash(&c));
    }
}
