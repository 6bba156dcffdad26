//! The fusion tool: a non-fusion model offered `tools: [{"type": "fusion"}]` (or OpenRouter's
//! spelling, `"openrouter:fusion"`) sees a `fusion` function; each call it makes runs a durable
//! fusion job on the call's prompt, the answer goes back as the tool result, and the outer model
//! writes the reply. Usage is summed over the outer calls and every job.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::chat::{JOB_HEADER, StreamOptions, jobs_header};
use super::error::ApiError;
use super::jobs::enqueue;
use super::request::{JobRequest, PLUGIN_FIELDS, bad};
use super::{AppState, request, stream, watch};
use crate::config::FusionConfig;
use crate::job::{JobStatus, Usage};

/// Outer-model rounds before the reply is taken as it is (OpenRouter's `max_tool_calls`).
const MAX_ROUNDS: usize = 4;
/// Fusion calls run per round; the outer model's further calls in that round are answered
/// "not run". So one request runs at most `MAX_ROUNDS` × `MAX_CALLS_PER_ROUND` jobs.
const MAX_CALLS_PER_ROUND: usize = 4;

pub fn offers_fusion(body: &Value) -> bool {
    tools(body).any(is_fusion)
}

/// The tool types that name the fusion tool: ours, and OpenRouter's server tool.
const TOOL_TYPES: [&str; 2] = ["fusion", "openrouter:fusion"];

fn is_fusion(tool: &Value) -> bool {
    is_fusion_type(tool.get("type"))
}

fn is_fusion_type(kind: Option<&Value>) -> bool {
    kind.and_then(Value::as_str)
        .is_some_and(|k| TOOL_TYPES.contains(&k))
}

fn tools(body: &Value) -> impl Iterator<Item = &Value> {
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Whether `tool` is the fusion function offered in place of the fusion tool.
fn is_fusion_function(tool: &Value) -> bool {
    tool.pointer("/function/name").and_then(Value::as_str) == Some("fusion")
}

/// Whether `tool_choice` names the fusion function.
fn forces_fusion_by_name(choice: Option<&Value>) -> bool {
    let name = choice.and_then(|c| c.pointer("/function/name"));
    name.and_then(Value::as_str) == Some("fusion")
}

/// Whether `tool_choice` can force a fusion call: `"required"` (a call of any tool),
/// `{"type": "function", "function": {"name": "fusion"}}`, or `allowed_tools` in `required`
/// mode with the fusion tool among those allowed.
fn forces_fusion(choice: Option<&Value>) -> bool {
    match choice {
        Some(Value::String(s)) => s == "required",
        Some(v) if v.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
            v.pointer("/allowed_tools/mode").and_then(Value::as_str) == Some("required")
                && v.pointer("/allowed_tools/tools")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(is_fusion_function))
        }
        Some(v @ Value::Object(_)) => {
            v.pointer("/function/name").and_then(Value::as_str) == Some("fusion")
        }
        _ => false,
    }
}

/// The list of an `allowed_tools` choice (`{"type": "allowed_tools", "allowed_tools": {"mode":
/// ..., "tools": [...]}}`), when `choice` is one.
fn allowed_list(choice: &mut Value) -> Option<&mut Vec<Value>> {
    if choice.get("type")?.as_str()? != "allowed_tools" {
        return None;
    }
    choice.pointer_mut("/allowed_tools/tools")?.as_array_mut()
}

/// How the function offered in place of the fusion tool is named in an `allowed_tools` list.
fn fusion_function_ref() -> Value {
    json!({"type": "function", "function": {"name": "fusion"}})
}

/// `tool_choice: {"type": "fusion"}` names a tool type only this server knows: passed on, the
/// upstream would refuse the call. OpenRouter forces its fusion tool with `"required"`, and so
/// do we, or with the function form that names the tool we offer.
fn refuse_tool_type_choice(choice: Option<&Value>) -> Result<(), ApiError> {
    match choice.and_then(|c| c.get("type")) {
        Some(kind) if is_fusion_type(Some(kind)) => Err(bad(format!(
            "`tool_choice` {{\"type\": {kind}}} is not accepted: force the fusion tool with \
             \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": \"fusion\"}}}}"
        ))),
        _ => Ok(()),
    }
}

/// A second fusion tool (whose settings would be ignored), or a function of the client's own
/// named `fusion` (whose calls would be taken for the fusion tool's).
fn refuse_ambiguous_tools(body: &Value) -> Result<(), ApiError> {
    let mut fusion_tools = tools(body).enumerate().filter(|(_, t)| is_fusion(t));
    if let Some((i, _)) = fusion_tools.nth(1) {
        return Err(bad(format!(
            "`tools[{i}]` is a second fusion tool: offer it once, with its settings in `fusion`"
        )));
    }
    match tools(body).position(is_fusion_function) {
        Some(i) => Err(bad(format!(
            "`tools[{i}]` is a function named `fusion`, the name the fusion tool is offered \
             under: rename it"
        ))),
        None => Ok(()),
    }
}

/// The function the outer model is offered in place of `{"type": "fusion"}`.
fn fusion_function() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "fusion",
            "description": "Ask a panel of expert models the question in parallel, compare their \
                answers (agreements, contradictions, blind spots) and get back one carefully \
                cross-checked answer. Use it for hard, factual or high-stakes questions.",
            "parameters": {
                "type": "object",
                "properties": {"prompt": {"type": "string",
                    "description": "The complete, self-contained question for the panel."}},
                "required": ["prompt"],
            },
        },
    })
}

pub async fn run(
    state: AppState,
    body: Value,
    model: String,
    opts: StreamOptions,
) -> Result<Response, ApiError> {
    // The conversation and the job every fusion call runs are checked as a job's are, before
    // any paid call: the outer model's rounds extend the conversation.
    request::parse_messages(body.get("messages"))?;
    // Only the first choice's calls would run, and the others would carry fusion calls.
    request::refuse_several_choices(body.get("n"))?;
    // A streamed reply is rebuilt from the outer model's text and calls: its log probabilities
    // or audio would come back null. (Not streamed, the last round's pass on.)
    let beyond = body.as_object().and_then(request::beyond_text);
    if let Some((field, what)) = beyond.filter(|_| opts.stream) {
        let message = format!(
            "`{field}` is not supported with the fusion tool and `stream: true`: the streamed \
             reply is rebuilt from the outer model's text and calls, without its {what}; ask \
             without streaming"
        );
        return Err(ApiError::bad_request("unsupported_parameter", message).param(field));
    }
    let template = job_template(&body, &state.config)?;
    refuse_tool_type_choice(body.get("tool_choice"))?;
    refuse_ambiguous_tools(&body)?;
    let mut outer = body.clone();
    let obj = outer.as_object_mut().expect("checked by the caller");
    let offered: Vec<Value> = tools(&body)
        .map(|t| match is_fusion(t) {
            true => fusion_function(),
            false => t.clone(),
        })
        .collect();
    obj.insert("tools".into(), Value::Array(offered));
    // An `allowed_tools` list names the fusion tool as the function the upstream is offered.
    if let Some(list) = obj.get_mut("tool_choice").and_then(allowed_list) {
        list.iter_mut()
            .filter(|t| is_fusion(t))
            .for_each(|t| *t = fusion_function_ref());
    }
    obj.insert("stream".into(), json!(false));
    obj.shift_remove("stream_options");
    let forced = forces_fusion(obj.get("tool_choice"));
    // Not held while the rounds run, which may take many minutes (as `fusion_completion` drops
    // its body): `outer` is the conversation from here on.
    drop(body);
    if opts.stream {
        let model_name = model.clone();
        // Answered at once, with keep-alives while the rounds and their jobs run (a client or
        // proxy waiting for a first byte would otherwise give up on a long job).
        let keepalive = state.config.keepalive;
        let created = state.clock.now_ms() / 1000;
        let reply = async move {
            let (reply, _) = rounds(&state, outer, &model, forced, &template).await?;
            Ok(reply)
        };
        return Ok(stream::completion_later(
            reply,
            &model_name,
            created,
            opts,
            keepalive,
        ));
    }
    let (reply, job_ids) = rounds(&state, outer, &model, forced, &template).await?;
    Ok(respond(reply, &job_ids))
}

/// The outer model's rounds, each fusion call it makes run as a job: the reply, with `usage`
/// summed over the outer calls and the jobs, and `fusion_job_ids`; and those ids.
async fn rounds(
    state: &AppState,
    mut outer: Value,
    model: &str,
    forced: bool,
    template: &JobRequest,
) -> Result<(Value, Vec<uuid::Uuid>), ApiError> {
    let mut usage = Usage::default();
    let mut job_ids = Vec::new();
    let offers_own_tools = tools(&outer).any(|t| !is_fusion_function(t));
    for round in 0..=MAX_ROUNDS {
        if round > 0 && forced {
            // Forcing applies to the first call only, or the model could never answer and
            // every round would run another fusion job. An `allowed_tools` choice keeps its
            // list, in `auto` mode.
            match outer.get_mut("tool_choice").and_then(allowed_list) {
                Some(_) => outer["tool_choice"]["allowed_tools"]["mode"] = json!("auto"),
                None => outer["tool_choice"] = json!("auto"),
            }
        }
        if round == MAX_ROUNDS {
            // Out of rounds: this reply is the answer, so it may not call fusion (a call could
            // not be run any more, and the client cannot run one). With tools of the client's
            // own, the fusion function is no longer offered and the client's `tool_choice`
            // stands (one naming fusion becomes "auto"); with none, it may call nothing. A
            // fusion call made anyway is dropped below.
            if offers_own_tools {
                let own = tools(&outer).filter(|t| !is_fusion_function(t)).cloned();
                outer["tools"] = Value::Array(own.collect());
                if forces_fusion_by_name(outer.get("tool_choice")) {
                    outer["tool_choice"] = json!("auto");
                }
                // An `allowed_tools` list loses the fusion function too; with nothing left in
                // it, no tool may be called.
                let allowed = outer.get_mut("tool_choice").and_then(allowed_list);
                if let Some(list) = allowed {
                    list.retain(|t| !is_fusion_function(t));
                    if list.is_empty() {
                        outer["tool_choice"] = json!("none");
                    }
                }
            } else {
                outer["tool_choice"] = json!("none");
            }
        }
        let (mut reply, outer_usage) = state
            .upstream
            .complete_json(model, outer.clone())
            .await
            // Jobs run in earlier rounds are named: a retry would run them again. With none,
            // the upstream's wait (its `Retry-After`) is passed on.
            .map_err(|e| ApiError::upstream(e).after_jobs(&job_ids))?;
        usage.add(&outer_usage);
        let message = reply
            .pointer("/choices/0/message")
            .cloned()
            .unwrap_or(Value::Null);
        let calls: Vec<Value> = message
            .get("tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let (fusion_calls, own): (Vec<Value>, Vec<Value>) =
            calls.into_iter().partition(is_fusion_function);
        // No fusion call (an answer, or calls of the client's own tools, theirs to run), or out
        // of rounds: this reply is the answer, without any fusion call the model made anyway
        // (the client did not declare that function and could not answer it).
        if fusion_calls.is_empty() || round == MAX_ROUNDS {
            if !fusion_calls.is_empty() {
                only_calls(&mut reply, own);
            }
            // The sum of every round's calls and every job's. With this one call alone, its
            // own usage object with those counts set, so that its details (cached and
            // reasoning tokens) are kept; after more, they would count one call of many.
            let summed = json!(usage);
            match reply.get_mut("usage").and_then(Value::as_object_mut) {
                Some(own) if round == 0 => {
                    own.extend(summed.as_object().cloned().unwrap_or_default())
                }
                _ => reply["usage"] = summed,
            }
            reply["fusion_job_ids"] = json!(job_ids);
            return Ok((reply, job_ids));
        }
        // Calls of the client's own tools beside fusion calls are left out of the conversation:
        // the model makes them again, if it still wants to, once it has the panel's answer.
        // Handed to the client with the fusion calls in the same message, they could not be
        // answered (the fusion calls would have no results on the client's next request).
        let mut message = message;
        message["tool_calls"] = json!(fusion_calls);
        let run = fusion_calls.len().min(MAX_CALLS_PER_ROUND);
        let results = futures::future::join_all(
            fusion_calls[..run]
                .iter()
                .map(|call| run_call(state, call, template)),
        )
        .await;
        let messages = outer["messages"]
            .as_array_mut()
            .expect("checked at the start: an array");
        messages.push(message);
        // Every call gets a result, in the calls' order; the model is told which did not run.
        let not_run = || {
            Ok((
                format!(
                    "error: not run: at most {MAX_CALLS_PER_ROUND} fusion calls run at a time; \
                     call again for the rest"
                ),
                None,
            ))
        };
        let results = results.into_iter().chain(std::iter::repeat_with(not_run));
        let mut failed = None;
        for (call, result) in fusion_calls.iter().zip(results) {
            match result {
                Ok((content, job)) => {
                    if let Some((id, job_usage)) = job {
                        job_ids.push(id);
                        usage.add(&job_usage);
                    }
                    messages.push(
                        json!({"role": "tool", "tool_call_id": call["id"], "content": content}),
                    );
                }
                Err(e) => {
                    job_ids.extend(&e.jobs);
                    failed.get_or_insert(e);
                }
            }
        }
        // Every job this request enqueued is named, the other calls' too.
        if let Some(e) = failed {
            return Err(e.after_jobs(&job_ids));
        }
    }
    unreachable!("the last round always returns")
}

/// `reply`'s message with only `calls` as its tool calls; with none, it is a plain answer
/// (`finish_reason` `stop`, its content a string).
fn only_calls(reply: &mut Value, calls: Vec<Value>) {
    let Some(choice) = reply.pointer_mut("/choices/0") else {
        return;
    };
    if calls.is_empty() {
        if let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) {
            message.shift_remove("tool_calls");
            // An answer's content is a string, if an empty one.
            if message.get("content").is_none_or(Value::is_null) {
                message.insert("content".into(), json!(""));
            }
        }
        if choice["finish_reason"] == "tool_calls" {
            choice["finish_reason"] = json!("stop");
        }
    } else {
        choice["message"]["tool_calls"] = json!(calls);
    }
}

/// The job a fusion call runs, but for its prompt. Its settings ride on the tool entry:
/// `{"type": "fusion", "fusion": {"preset": "budget", and any fusion plugin field but `id`:
/// "model" (the analyst), "analysis_models", "min_panel", ...}}`; errors name the field where
/// it was written.
fn job_template(body: &Value, config: &FusionConfig) -> Result<JobRequest, ApiError> {
    let (i, tool) = tools(body)
        .enumerate()
        .find(|(_, t)| is_fusion(t))
        .expect("offered, or the tool would not run");
    let field = format!("tools[{i}].fusion");
    let mut plugin = match tool.get("fusion") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(settings)) => settings.clone(),
        Some(_) => return Err(bad(format!("`{field}` must be an object of settings"))),
    };
    // The plugin's `id` says which plugin it is; the tool's type already says so here.
    let known: Vec<&str> = std::iter::once("preset")
        .chain(PLUGIN_FIELDS.into_iter().filter(|f| *f != "id"))
        .collect();
    if let Some(unknown) = plugin.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field `{unknown}` in `{field}`; known fields: {}",
            known.join(", ")
        )));
    }
    let model = match plugin.remove("preset") {
        None | Some(Value::Null) => "fusion".to_string(),
        Some(Value::String(preset)) => {
            request::refuse_control_characters(&preset, &format!("{field}.preset"))?;
            format!("fusion/{preset}")
        }
        Some(_) => {
            return Err(bad(format!(
                "`{field}.preset` must be a string naming a preset"
            )));
        }
    };
    let mut job = Map::new();
    job.insert("model".into(), json!(model));
    job.insert("messages".into(), json!([{"role": "user", "content": ""}]));
    if !plugin.is_empty() {
        plugin.insert("id".into(), json!("fusion"));
        job.insert("plugins".into(), json!([plugin]));
    }
    request::parse_as(&Value::Object(job), config, &field).map_err(|mut e| {
        if e.code == "unknown_preset" {
            e.message = format!("`{field}.preset`: {}", e.message);
        }
        e
    })
}

/// Run one fusion call; the tool result text, and the job's id and usage when one ran.
async fn run_call(
    state: &AppState,
    call: &Value,
    template: &JobRequest,
) -> Result<(String, Option<(uuid::Uuid, Usage)>), ApiError> {
    /// The tool's arguments: only `prompt` is read (others are skipped, not parsed).
    #[derive(serde::Deserialize)]
    struct Arguments {
        prompt: Option<String>,
    }
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // The outer model writes the arguments (an answer of up to 16 MiB): held to what a client
    // could submit as a whole job, before they are parsed.
    let limit = state.config.max_body_bytes;
    if arguments.len() > limit {
        return Ok((
            format!(
                "error: the fusion tool's arguments are {} bytes, over the limit of {} MiB",
                arguments.len(),
                limit >> 20
            ),
            None,
        ));
    }
    // An object only: serde would read a struct from an array as well (`["do X"]`).
    let prompt = Some(arguments)
        .filter(|a| a.trim_start().starts_with('{'))
        .and_then(|a| serde_json::from_str::<Arguments>(a).ok())
        .and_then(|a| a.prompt)
        .filter(|p| !p.trim().is_empty());
    let Some(prompt) = prompt else {
        return Ok((
            "error: the fusion tool needs a non-empty `prompt` argument".into(),
            None,
        ));
    };
    let mut parsed = template.clone();
    parsed.spec.messages = vec![json!({"role": "user", "content": prompt})];
    // Without an idempotency key the request body is not kept (nor hashed).
    let (job, _) = enqueue(state, parsed, None, None).await?;
    let job = watch::wait_final(&state.watch, state.store.as_ref(), job.id).await?;
    if !job.status.is_final() {
        return Err(super::chat::handed_back(&job));
    }
    let steps = state.watch.read_steps(state.store.as_ref(), job.id).await?;
    let mut usage = Usage::default();
    steps.iter().for_each(|s| usage.add(&s.usage));
    let content = match job.status {
        JobStatus::Succeeded => job
            .result
            .as_ref()
            .and_then(|r| r.pointer("/choices/0/message/content"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => format!(
            "error: the fusion run failed ({}): {}",
            job.failure_reason.as_deref().unwrap_or("unknown"),
            job.error.as_deref().unwrap_or("")
        ),
    };
    Ok((content, Some((job.id, usage))))
}

/// A non-streamed reply, its jobs named in the header too.
fn respond(reply: Value, job_ids: &[uuid::Uuid]) -> Response {
    let mut resp = Json(reply).into_response();
    if !job_ids.is_empty() {
        resp.headers_mut().insert(JOB_HEADER, jobs_header(job_ids));
    }
    resp
}
