//! The analyst's structured comparison of the panel answers: its JSON schema (bounded so weak
//! models cannot ramble forever), a lenient parser (code fences, leading prose) and validation.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    pub consensus: Vec<String>,
    pub contradictions: Vec<Contradiction>,
    pub partial_coverage: Vec<PartialCoverage>,
    pub unique_insights: Vec<UniqueInsight>,
    pub blind_spots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contradiction {
    pub topic: String,
    pub stances: Vec<Stance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stance {
    pub model: String,
    pub stance: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialCoverage {
    pub models: Vec<String>,
    pub point: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniqueInsight {
    pub model: String,
    pub insight: String,
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

/// Bounds that keep a weak model's output finite.
const MAX_ITEMS: u64 = 12;
const MAX_TEXT: u64 = 600;

/// The JSON schema sent as `response_format.json_schema.schema`.
pub fn schema() -> Value {
    let text = json!({"type": "string", "maxLength": MAX_TEXT});
    let list = |items: Value| json!({"type": "array", "items": items, "maxItems": MAX_ITEMS});
    let object = |props: Value, required: &[&str]| {
        json!({"type": "object", "properties": props, "required": required,
               "additionalProperties": false})
    };
    object(
        json!({
            "consensus": list(text.clone()),
            "contradictions": list(object(
                json!({"topic": text.clone(), "stances": list(object(
                    json!({"model": text.clone(), "stance": text.clone()}), &["model", "stance"]))}),
                &["topic", "stances"])),
            "partial_coverage": list(object(
                json!({"models": list(text.clone()), "point": text.clone()}), &["models", "point"])),
            "unique_insights": list(object(
                json!({"model": text.clone(), "insight": text.clone()}), &["model", "insight"])),
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

/// The `response_format` asking for that schema, OpenAI style.
pub fn response_format() -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {"name": "fusion_analysis", "strict": true, "schema": schema()}
    })
}

/// Parse an analyst reply: plain JSON, JSON inside a code fence, or JSON after some prose.
pub fn parse(text: &str) -> Result<Analysis, AnalysisError> {
    let value = extract_json(text)?;
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
    if let (Some(start), Some(end)) = (unfenced.find('{'), unfenced.rfind('}'))
        && start < end
        && let Ok(v) = serde_json::from_str::<Value>(&unfenced[start..=end])
    {
        return Ok(v);
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
    }

    #[test]
    fn schema_requires_all_five_fields() {
        let s = schema();
        assert_eq!(s["required"].as_array().unwrap().len(), 5);
        assert_eq!(s["properties"]["consensus"]["maxItems"], MAX_ITEMS);
    }
}
