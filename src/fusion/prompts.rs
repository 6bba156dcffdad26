//! The words sent to the analyst: the analysis request and the final-answer request. Panel answers
//! are labelled by number and model so the analysis can say who said what.

use serde_json::{Value, json};

use super::analysis::Analysis;

/// One surviving panel answer.
pub struct PanelAnswer<'a> {
    pub model: &'a str,
    pub content: &'a str,
}

/// The conversation as plain text, for the analyst's eyes.
fn transcript(messages: &[Value]) -> String {
    messages
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            format!("[{role}]\n{}", message_text(m))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The text of a message whose content is a string or an array of parts.
pub fn message_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn numbered(answers: &[PanelAnswer<'_>]) -> String {
    answers
        .iter()
        .enumerate()
        .map(|(i, a)| format!("### Response {} (model: {})\n{}", i + 1, a.model, a.content))
        .collect::<Vec<_>>()
        .join("\n\n")
}

const ANALYSIS_SYSTEM: &str = "You are an impartial analyst. Several models answered the same \
conversation. Compare their answers carefully and report, as a JSON object: `consensus` (points \
most responses agree on), `contradictions` (topics where responses disagree, with each model's \
stance), `partial_coverage` (points only some responses cover, with which models), \
`unique_insights` (valuable points made by a single model), and `blind_spots` (important aspects \
no response addressed). Name models exactly as given. Be concise. Reply with the JSON object only.";

/// Messages asking for the analysis; `schema` is spelled out for providers that do not enforce it.
pub fn analysis_messages(
    messages: &[Value],
    answers: &[PanelAnswer<'_>],
    schema: Option<&str>,
) -> Vec<Value> {
    let system = match schema {
        Some(s) => {
            format!("{ANALYSIS_SYSTEM}\n\nThe JSON object must follow this JSON schema:\n{s}")
        }
        None => ANALYSIS_SYSTEM.to_string(),
    };
    vec![
        json!({"role": "system", "content": system}),
        json!({"role": "user", "content": format!(
            "## Conversation\n{}\n\n## Responses\n{}",
            transcript(messages),
            numbered(answers)
        )}),
    ]
}

/// The follow-up sent when a reply was not a valid analysis, so the next try can fix it.
pub fn analysis_correction(reply: &str, problem: &str) -> [Value; 2] {
    [
        json!({"role": "assistant", "content": reply}),
        json!({"role": "user", "content": format!(
            "That reply was rejected: {problem}. Reply again with only the JSON object, with all \
             five fields: consensus, contradictions, partial_coverage, unique_insights, blind_spots."
        )}),
    ]
}

/// Messages asking for the final answer: a system message carrying the panel answers and the
/// analysis, then the caller's conversation unchanged.
pub fn final_messages(
    messages: &[Value],
    answers: &[PanelAnswer<'_>],
    analysis: Option<&Analysis>,
) -> Vec<Value> {
    final_messages_with(messages, answers, analysis, None)
}

/// `final_messages`, with `format` (how the answer must be written, for a provider that is not
/// asked for a format in the request) at the end of its instructions.
pub fn final_messages_with(
    messages: &[Value],
    answers: &[PanelAnswer<'_>],
    analysis: Option<&Analysis>,
    format: Option<&str>,
) -> Vec<Value> {
    let analysis_text = match analysis {
        Some(a) => serde_json::to_string_pretty(a).unwrap_or_default(),
        None => "(no analysis is available: compare the responses yourself)".to_string(),
    };
    let mut system = format!(
        "You have been provided with responses from several models to the latest user query, \
         and an analysis comparing them. Synthesise them into a single, high-quality answer. \
         Critically evaluate the information: keep what the responses agree on, resolve \
         contradictions on the merits, include valuable unique insights, and cover the blind \
         spots where you can. Do not copy the responses, do not mention that several models \
         answered, and answer in the user's language and format.\n\n## Responses\n{}\n\n\
         ## Analysis\n{}",
        numbered(answers),
        analysis_text
    );
    if let Some(format) = format {
        system.push_str("\n\n## Format\n");
        system.push_str(format);
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    out.push(json!({"role": "system", "content": system}));
    out.extend(messages.iter().cloned());
    out
}
