//! The analyst's structured comparison of the panel answers: its JSON schema (bounded so weak
//! models cannot ramble forever), a lenient parser (code fences, leading prose) and validation.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::AnalysisLimits;
use crate::job::JsonText;
use crate::upstream::StructuredOutput;

/// Read leniently, as models write it where the provider does not enforce the schema: fields
/// it does not have are ignored (a `summary`, a stance's `confidence`) and a list given as
/// `null` is empty; each of the five lists must still be there, or any JSON object at all (an
/// answer to the question in JSON, say) would read as an empty analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    #[serde(deserialize_with = "list")]
    pub consensus: Vec<String>,
    #[serde(deserialize_with = "list")]
    pub contradictions: Vec<Contradiction>,
    #[serde(deserialize_with = "list")]
    pub partial_coverage: Vec<PartialCoverage>,
    #[serde(deserialize_with = "list")]
    pub unique_insights: Vec<UniqueInsight>,
    #[serde(deserialize_with = "list")]
    pub blind_spots: Vec<String>,
}

/// A list, `null` read as an empty one.
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contradiction {
    pub topic: String,
    #[serde(deserialize_with = "list")]
    pub stances: Vec<Stance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stance {
    pub model: String,
    pub stance: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialCoverage {
    #[serde(deserialize_with = "list")]
    pub models: Vec<String>,
    pub point: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniqueInsight {
    pub model: String,
    pub insight: String,
}

/// The longest a model label in the analysis is kept: a model name (at most
/// `MAX_MODEL_NAME_CHARS`) and what `prompts` adds to tell samples apart, with room to spare.
const MAX_LABEL_CHARS: usize = crate::job::MAX_MODEL_NAME_CHARS + 40;

impl Analysis {
    /// The analysis within `limits`: every list cut to `max_items`, every string to `max_text`
    /// characters. The schema asks for these bounds, but a provider asked for JSON in
    /// `json_object` or `prompt` mode (and some in `json_schema` mode) does not enforce them,
    /// and the analysis is written into the final prompt and kept with the job.
    /// Model labels are not texts: they are cut only past the longest a label can be (a model
    /// name and its sample number, see `prompts`), or an analysis of long model names (longer
    /// than a short `max_text`) could no longer say which model said what.
    pub fn bounded(mut self, limits: &AnalysisLimits) -> Analysis {
        let items = usize::try_from(limits.max_items).unwrap_or(usize::MAX);
        let chars = usize::try_from(limits.max_text).unwrap_or(usize::MAX);
        let cut = |s: &mut String, chars: usize| {
            if let Some((at, _)) = s.char_indices().nth(chars) {
                s.truncate(at);
            }
        };
        let text = |s: &mut String| cut(s, chars);
        let label = |s: &mut String| cut(s, MAX_LABEL_CHARS);
        let texts = |list: &mut Vec<String>| {
            list.truncate(items);
            list.iter_mut().for_each(text);
        };
        texts(&mut self.consensus);
        texts(&mut self.blind_spots);
        self.contradictions.truncate(items);
        for c in &mut self.contradictions {
            text(&mut c.topic);
            c.stances.truncate(items);
            for s in &mut c.stances {
                label(&mut s.model);
                text(&mut s.stance);
            }
        }
        self.partial_coverage.truncate(items);
        for p in &mut self.partial_coverage {
            p.models.truncate(items);
            p.models.iter_mut().for_each(label);
            text(&mut p.point);
        }
        self.unique_insights.truncate(items);
        for u in &mut self.unique_insights {
            label(&mut u.model);
            text(&mut u.insight);
        }
        self
    }
}

/// Why an analyst reply was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnalysisError {
    #[error("the analysis is not valid JSON: {0}")]
    NotJson(String),
    #[error("the analysis does not match the schema: {0}")]
    SchemaMismatch(String),
}

impl AnalysisError {
    pub fn code(&self) -> &'static str {
        match self {
            AnalysisError::NotJson(_) => "analysis_not_valid_json",
            AnalysisError::SchemaMismatch(_) => "analysis_schema_mismatch",
        }
    }
}

/// The JSON schema of the analysis, its arrays and strings bounded by `limits`.
pub fn schema(limits: &AnalysisLimits) -> Value {
    let text = json!({"type": "string", "maxLength": limits.max_text});
    // Model labels are bounded as `bounded` bounds them, not by `max_text`: a provider that
    // enforces the schema while it writes (llama.cpp's grammars) would cut a long model name
    // short, and two samples of one model could no longer be told apart.
    let label = json!({"type": "string", "maxLength": MAX_LABEL_CHARS});
    let list =
        |items: Value| json!({"type": "array", "items": items, "maxItems": limits.max_items});
    let object = |props: Value, required: &[&str]| {
        json!({"type": "object", "properties": props, "required": required,
               "additionalProperties": false})
    };
    object(
        json!({
            "consensus": list(text.clone()),
            "contradictions": list(object(
                json!({"topic": text.clone(), "stances": list(object(
                    json!({"model": label.clone(), "stance": text.clone()}), &["model", "stance"]))}),
                &["topic", "stances"])),
            "partial_coverage": list(object(
                json!({"models": list(label.clone()), "point": text.clone()}), &["models", "point"])),
            "unique_insights": list(object(
                json!({"model": label, "insight": text.clone()}), &["model", "insight"])),
            "blind_spots": list(text.clone()),
        }),
        &[
            "consensus",
            "contradictions",
            "partial_coverage",
            "unique_insights",
            "blind_spots",
        ],
    )
}

/// The `response_format` asking for that schema in the provider's own way; `None` when the
/// provider only gets the schema in the prompt.
pub fn response_format(mode: StructuredOutput, limits: &AnalysisLimits) -> Option<Value> {
    mode.request_format(&json!({
        "type": "json_schema",
        "json_schema": {"name": "fusion_analysis", "strict": true, "schema": schema(limits)}
    }))
}

/// The schema and the response formats for one set of limits, built and rendered to text once:
/// every analysis call of a process sends the same ones, and building them (or walking their
/// trees to write them) was most of what an analysis request cost to assemble.
#[derive(Debug, Clone)]
pub struct Formats {
    pub limits: AnalysisLimits,
    schema: String,
    json_schema: Option<JsonText>,
    json_object: Option<JsonText>,
}

impl Formats {
    pub fn new(limits: AnalysisLimits) -> Formats {
        Formats {
            limits,
            schema: schema(&limits).to_string(),
            json_schema: response_format(StructuredOutput::JsonSchema, &limits).map(JsonText::from),
            json_object: response_format(StructuredOutput::JsonObject, &limits).map(JsonText::from),
        }
    }

    /// The schema as JSON text, for a prompt.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// [`response_format`] for `mode`, borrowed.
    pub fn response_format(&self, mode: StructuredOutput) -> Option<&JsonText> {
        match mode {
            StructuredOutput::JsonSchema => self.json_schema.as_ref(),
            StructuredOutput::JsonObject => self.json_object.as_ref(),
            StructuredOutput::Prompt => None,
        }
    }
}

/// Parse an analyst reply: plain JSON, JSON inside a code fence, or JSON after some prose.
pub fn parse(text: &str) -> Result<Analysis, AnalysisError> {
    // The usual reply, bare JSON that fits: read straight into the struct, no tree in between.
    if let Ok(analysis) = serde_json::from_str::<Analysis>(text.trim()) {
        return Ok(analysis);
    }
    let value = match extract_json(text)? {
        // The object alone in a list, as some models wrap it.
        Value::Array(mut one) if one.len() == 1 && one[0].is_object() => one.remove(0),
        value => value,
    };
    if !value.is_object() {
        return Err(AnalysisError::SchemaMismatch(
            "expected a JSON object with the five analysis fields".into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| AnalysisError::SchemaMismatch(e.to_string()))
}

fn extract_json(text: &str) -> Result<Value, AnalysisError> {
    let trimmed = text.trim();
    let first_err = match serde_json::from_str::<Value>(trimmed) {
        Ok(v) => return Ok(v),
        Err(e) => e.to_string(),
    };
    let unfenced = strip_fence(trimmed);
    if let Ok(v) = serde_json::from_str::<Value>(unfenced) {
        return Ok(v);
    }
    // The outermost braces inside the fence, then in the whole reply: a string of the JSON
    // that quotes a code fence (likely on a coding question) ends the fence early.
    for within in [unfenced, trimmed] {
        if let (Some(start), Some(end)) = (within.find('{'), within.rfind('}'))
            && start < end
            && let Ok(v) = serde_json::from_str::<Value>(&within[start..=end])
        {
            return Ok(v);
        }
    }
    Err(AnalysisError::NotJson(first_err))
}

/// The inside of the first ```…``` block, if any.
fn strip_fence(text: &str) -> &str {
    let Some(open) = text.find("```") else {
        return text;
    };
    let after = &text[open + 3..];
    // Skip a language tag such as `json` up to the end of the line.
    let body = after.find('\n').map_or(after, |nl| &after[nl + 1..]);
    match body.find("```") {
        Some(close) => body[..close].trim(),
        None => body.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Past the limits (a provider that does not enforce the schema's bounds): every list and
    // string is cut to them, multi-byte characters whole.
    #[test]
    fn an_analysis_past_the_limits_is_cut_to_them() {
        let limits = AnalysisLimits {
            max_items: 2,
            max_text: 3,
            max_tokens: None,
        };
        let long = r#"{"consensus":["éééé","b","c"],
            "contradictions":[{"topic":"topic","stances":[{"model":"m1","stance":"yes!"},
                {"model":"m2","stance":"no"},{"model":"m3","stance":"?"}]},
                {"topic":"t2","stances":[]},{"topic":"t3","stances":[]}],
            "partial_coverage":[{"models":["abcd","b","c"],"point":"point"}],
            "unique_insights":[{"model":"model","insight":"insight"},{"model":"m","insight":"i"},
                {"model":"m","insight":"i"}],
            "blind_spots":["a","b","c"]}"#;
        let cut = parse(long).unwrap().bounded(&limits);
        // Model labels are not cut to `max_text`: they name who said what.
        let want = r#"{"consensus":["ééé","b"],
            "contradictions":[{"topic":"top","stances":[{"model":"m1","stance":"yes"},
                {"model":"m2","stance":"no"}]},{"topic":"t2","stances":[]}],
            "partial_coverage":[{"models":["abcd","b"],"point":"poi"}],
            "unique_insights":[{"model":"model","insight":"ins"},{"model":"m","insight":"i"}],
            "blind_spots":["a","b"]}"#;
        assert_eq!(cut, parse(want).unwrap());
        // Only past the longest a label can be.
        let name = "n".repeat(MAX_LABEL_CHARS + 5);
        let long_label = format!(
            r#"{{"consensus":[],"contradictions":[],"partial_coverage":[],
                "unique_insights":[{{"model":"{name}","insight":"i"}}],"blind_spots":[]}}"#
        );
        let cut = parse(&long_label).unwrap().bounded(&limits);
        assert_eq!(cut.unique_insights[0].model.len(), MAX_LABEL_CHARS);
        // Within them: unchanged.
        let within = parse(GOOD).unwrap();
        assert_eq!(within.clone().bounded(&limits), within);
    }

    const GOOD: &str = r#"{"consensus":["a"],"contradictions":[{"topic":"t","stances":[{"model":"m","stance":"s"}]}],"partial_coverage":[{"models":["m"],"point":"p"}],"unique_insights":[{"model":"m","insight":"i"}],"blind_spots":[]}"#;

    #[test]
    fn parses_plain_fenced_and_prefixed_json() {
        let want = parse(GOOD).unwrap();
        assert_eq!(want.consensus, vec!["a"]);
        assert_eq!(parse(&format!("```json\n{GOOD}\n```")).unwrap(), want);
        assert_eq!(
            parse(&format!("Here is the analysis:\n{GOOD}\nHope it helps")).unwrap(),
            want
        );
        // A string quoting a code fence ends the fence early; the whole reply's braces hold it.
        let quoting = GOOD.replace(
            r#""consensus":["a"]"#,
            r#""consensus":["use ```rust blocks"]"#,
        );
        let fenced = parse(&format!("```json\n{quoting}\n```")).unwrap();
        assert_eq!(fenced.consensus, vec!["use ```rust blocks"]);
    }

    #[test]
    fn tells_bad_json_from_a_schema_mismatch() {
        assert_eq!(
            parse("no json here").unwrap_err().code(),
            "analysis_not_valid_json"
        );
        assert_eq!(
            parse(r#"{"consensus": []}"#).unwrap_err().code(),
            "analysis_schema_mismatch"
        );
        assert_eq!(
            parse("[1, 2]").unwrap_err().code(),
            "analysis_schema_mismatch"
        );
        let wrong_type = GOOD.replace(r#""consensus":["a"]"#, r#""consensus":"a""#);
        assert_eq!(
            parse(&wrong_type).unwrap_err().code(),
            "analysis_schema_mismatch"
        );
        // Another JSON object altogether (an answer to the question) is not an empty analysis.
        assert_eq!(
            parse(r#"{"answer": "42"}"#).unwrap_err().code(),
            "analysis_schema_mismatch"
        );
    }

    // What models write where the provider does not enforce the schema, read as what it says:
    // fields of their own (a summary, a stance's confidence) ignored, a list given as `null`
    // empty, the object wrapped in a list unwrapped. Before, each was a schema mismatch, asked
    // again (each try paid) and, three times over, the analysis was dropped.
    #[test]
    fn reads_what_lax_providers_write() {
        let want = parse(GOOD).unwrap();
        let extra = GOOD
            .replace(r#""consensus""#, r#""summary":"s","consensus""#)
            .replace(r#""stance":"s""#, r#""stance":"s","confidence":0.9"#);
        assert_eq!(parse(&extra).unwrap(), want);
        assert_eq!(parse(&format!("[{GOOD}]")).unwrap(), want);
        assert_eq!(parse(&format!("```json\n[{GOOD}]\n```")).unwrap(), want);
        let nulls = GOOD.replace(r#""blind_spots":[]"#, r#""blind_spots":null"#);
        assert_eq!(parse(&nulls).unwrap(), want);
        let no_stances = r#"{"consensus":null,"contradictions":[{"topic":"t","stances":null}],
            "partial_coverage":[],"unique_insights":[],"blind_spots":[]}"#;
        assert_eq!(parse(no_stances).unwrap().contradictions[0].stances, vec![]);
    }

    const LIMITS: AnalysisLimits = AnalysisLimits {
        max_items: 4,
        max_text: 200,
        max_tokens: None,
    };

    #[test]
    fn schema_requires_all_five_fields_and_bounds_them() {
        let s = schema(&LIMITS);
        assert_eq!(s["required"].as_array().unwrap().len(), 5);
        assert_eq!(s["properties"]["consensus"]["maxItems"], 4);
        assert_eq!(s["properties"]["consensus"]["items"]["maxLength"], 200);
        let stance = &s["properties"]["contradictions"]["items"]["properties"]["stances"];
        assert_eq!(stance["items"]["properties"]["stance"]["maxLength"], 200);
        // Model labels are bounded as labels, not texts: a short `max_text` must not cut them
        // (it did, in the schema, after `bounded` had stopped cutting them).
        assert_eq!(
            stance["items"]["properties"]["model"]["maxLength"],
            MAX_LABEL_CHARS
        );
        let coverage = &s["properties"]["partial_coverage"]["items"]["properties"];
        assert_eq!(coverage["models"]["items"]["maxLength"], MAX_LABEL_CHARS);
        assert_eq!(coverage["point"]["maxLength"], 200);
        let insight = &s["properties"]["unique_insights"]["items"]["properties"];
        assert_eq!(insight["model"]["maxLength"], MAX_LABEL_CHARS);
    }

    #[test]
    fn each_provider_mode_gets_its_own_response_format() {
        let schema_mode = response_format(StructuredOutput::JsonSchema, &LIMITS).unwrap();
        assert_eq!(schema_mode["type"], "json_schema");
        assert_eq!(schema_mode["json_schema"]["schema"], schema(&LIMITS));
        let object_mode = response_format(StructuredOutput::JsonObject, &LIMITS).unwrap();
        assert_eq!(object_mode["type"], "json_object");
        assert_eq!(object_mode["schema"], schema(&LIMITS));
        assert_eq!(response_format(StructuredOutput::Prompt, &LIMITS), None);
    }
}
