//! Domain types of a fusion job: what was asked (`JobSpec`), where it stands (`Job`, `JobStatus`),
//! and what each step produced (`Step`). Plain data: no SQL, no HTTP, no upstream calls here.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

/// The longest model name a job may name, in characters.
pub const MAX_MODEL_NAME_CHARS: usize = 200;

/// Whether `model` names a fusion run (`fusion`, `fusion/<preset>`) rather than a model: it
/// cannot be a panel member or the analyst.
pub fn is_fusion_model(model: &str) -> bool {
    model == "fusion" || model.starts_with("fusion/")
}

/// Where a job stands. Each variant says who moves a job in and who moves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// In: `enqueue`, a retryable failure (`retry_later`), lease expiry (`rescue_expired`), a
    /// graceful shutdown (`release`), a manual retry. Out: `claim` (to running), `cancel`.
    Queued,
    /// In: `claim`. Out: the lease holder (`complete`, `fail`, `retry_later`, `release`),
    /// `cancel`, or `rescue_expired` when the holder stopped renewing its lease.
    Running,
    /// Final. In: the lease holder's `complete`. Out: never.
    Succeeded,
    /// In: the lease holder's `fail`, or `rescue_expired` once attempts are used up. Out: a
    /// manual retry.
    Failed,
    /// Final. In: `cancel` from queued or running. Out: never.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A validated fusion request: everything a worker needs to run the job, resolved at submit time
/// (presets expanded) so that a later config change cannot alter a queued job. Stored as JSON
/// by the `Serialize` below and read through [`StoredSpec`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "StoredSpec")]
pub struct JobSpec {
    /// The model name the caller asked for (`fusion`, `fusion/budget`, or a plugin's host model);
    /// echoed back in the result.
    pub model: String,
    /// The OpenAI chat messages, kept as sent.
    pub messages: Vec<Value>,
    /// Panel models, 1 to 8, repeats allowed.
    pub panel: Vec<String>,
    /// The model that writes the analysis and the final answer.
    pub analyst: String,
    /// Panel sampling temperature; the analyst always runs at 0.
    pub temperature: Option<f64>,
    pub max_completion_tokens: Option<u32>,
    /// How many panel answers the job needs to go on.
    pub min_panel: u32,
    /// After `min_panel` answers, how long to wait for the rest.
    pub panel_timeout_ms: Option<u64>,
    /// The client's `response_format` (`json_object` or `json_schema`, checked at submit): the
    /// final answer's only. Panel answers stay free-form, and the analysis has its own. Stored
    /// twice, as the object and as its text (see [`StoredSpec`]), so the schema's properties
    /// keep their order.
    pub response_format: Option<Value>,
    /// The client's `stop` (a string or up to 4, checked at submit): the final answer's only,
    /// as that is the text the client reads.
    pub stop: Option<Value>,
}

impl Serialize for JobSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("JobSpec", 11)?;
        out.serialize_field("model", &self.model)?;
        out.serialize_field("messages", &self.messages)?;
        out.serialize_field("panel", &self.panel)?;
        out.serialize_field("analyst", &self.analyst)?;
        out.serialize_field("temperature", &self.temperature)?;
        out.serialize_field("max_completion_tokens", &self.max_completion_tokens)?;
        out.serialize_field("min_panel", &self.min_panel)?;
        out.serialize_field("panel_timeout_ms", &self.panel_timeout_ms)?;
        if let Some(format) = &self.response_format {
            out.serialize_field("response_format", format)?;
            out.serialize_field("response_format_text", &format.to_string())?;
        }
        if let Some(stop) = &self.stop {
            out.serialize_field("stop", stop)?;
        }
        out.end()
    }
}

/// A spec as stored. `response_format` is there twice: as the object, which every build reads
/// (one from before this field, in a rolling upgrade or after a rollback, runs the job as it
/// would have), and as `response_format_text`, its text, which Postgres's JSONB keeps as it is
/// while it orders an object's keys its own way (shortest first). A provider that writes a
/// structured output in its schema's property order (OpenAI's strict mode) would otherwise
/// write `answer` before `reasoning`. The text is read first; a spec without it (stored
/// before), or with text that does not read, has the object.
#[derive(Deserialize)]
struct StoredSpec {
    model: String,
    messages: Vec<Value>,
    panel: Vec<String>,
    analyst: String,
    temperature: Option<f64>,
    max_completion_tokens: Option<u32>,
    min_panel: u32,
    panel_timeout_ms: Option<u64>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    response_format_text: Option<String>,
    #[serde(default)]
    stop: Option<Value>,
}

impl From<StoredSpec> for JobSpec {
    fn from(s: StoredSpec) -> JobSpec {
        JobSpec {
            model: s.model,
            messages: s.messages,
            panel: s.panel,
            analyst: s.analyst,
            temperature: s.temperature,
            max_completion_tokens: s.max_completion_tokens,
            min_panel: s.min_panel,
            panel_timeout_ms: s.panel_timeout_ms,
            response_format: stored_format(s.response_format, s.response_format_text.as_deref()),
            stop: s.stop.filter(|v| !v.is_null()),
        }
    }
}

/// The format a stored spec holds: its text's if that reads as an object, else the object. (A
/// few builds stored the text alone, under `response_format`: it reads as the text.)
fn stored_format(object: Option<Value>, text: Option<&str>) -> Option<Value> {
    let parse = |t: &str| {
        serde_json::from_str::<Value>(t)
            .ok()
            .filter(Value::is_object)
    };
    match (text.and_then(parse), object) {
        (Some(format), _) => Some(format),
        (None, Some(Value::String(text))) => parse(&text),
        (None, object) => object.filter(Value::is_object),
    }
}

impl JobSpec {
    /// What can be read of a stored spec that does not parse as one (edited by hand, or written
    /// by a build with an incompatible format), for showing the job: the fields that read, the
    /// rest empty. No worker runs such a job: its claim fails it as `invalid_job`.
    pub fn salvage(value: &Value) -> JobSpec {
        let text = |k: &str| value[k].as_str().unwrap_or_default().to_string();
        let count = |k: &str| value[k].as_u64().and_then(|n| u32::try_from(n).ok());
        JobSpec {
            model: text("model"),
            messages: value["messages"].as_array().cloned().unwrap_or_default(),
            panel: value["panel"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            analyst: text("analyst"),
            temperature: value["temperature"].as_f64(),
            max_completion_tokens: count("max_completion_tokens"),
            min_panel: count("min_panel").unwrap_or(0),
            panel_timeout_ms: value["panel_timeout_ms"].as_u64(),
            response_format: stored_format(
                value.get("response_format").cloned(),
                value["response_format_text"].as_str(),
            ),
            stop: value.get("stop").filter(|v| !v.is_null()).cloned(),
        }
    }
}

/// A job as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub metadata: Value,
    pub priority: i32,
    /// How many times a worker has claimed the job; the fence token of the current lease.
    pub attempt: i32,
    pub max_attempts: i32,
    /// Not claimable before this instant (unix ms): set by retry backoff.
    pub run_at: i64,
    /// Overall deadline (unix ms) after which the job fails with `deadline_exceeded`.
    pub deadline_at: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub failure_reason: Option<String>,
    pub error: Option<String>,
    /// The final `chat.completion` object once succeeded.
    pub result: Option<Value>,
}

impl Job {
    /// The fence token a worker presents with every write while it holds this job.
    pub fn lease(&self) -> Option<Lease> {
        Some(Lease {
            job_id: self.id,
            attempt: self.attempt,
            owner: self.lease_owner.clone()?,
        })
    }

    /// When this job, requeued at `now` after a failure that may pass, would run again: after
    /// `base` doubled per attempt so far, at most 10 minutes. None left: an error saying why.
    pub fn next_try_at(&self, now: i64, base: Duration) -> Result<i64, NoNextTry> {
        self.next_try_after(now, base, Duration::ZERO)
    }

    /// Whether a failure that may pass can requeue this job (its last attempt has not run).
    pub fn has_attempt_left(&self) -> bool {
        self.attempt < self.max_attempts
    }

    /// `next_try_at`, not sooner than `asked` (an upstream's `Retry-After`, at most
    /// `MAX_REQUEUE_WAIT`): a rate limit that lifts in an hour is waited out in the queue, not
    /// spent on tries it would refuse. Past the job's deadline, that is why there is no next try.
    pub fn next_try_after(
        &self,
        now: i64,
        base: Duration,
        asked: Duration,
    ) -> Result<i64, NoNextTry> {
        if !self.has_attempt_left() {
            return Err(NoNextTry::Attempts);
        }
        let doublings = self.attempt.clamp(1, 16) as u32 - 1;
        let wait = base
            .saturating_mul(1 << doublings)
            .min(Duration::from_secs(600))
            .max(asked.min(MAX_REQUEUE_WAIT));
        let at = now.saturating_add(wait.as_millis() as i64);
        match self.deadline_at {
            Some(deadline) if at >= deadline => Err(NoNextTry::Deadline),
            _ => Ok(at),
        }
    }
}

/// The longest an upstream's `Retry-After` keeps a requeued job waiting: a day, which outlasts
/// a daily quota; a job is not left in the queue longer on the word of one answer.
pub const MAX_REQUEUE_WAIT: Duration = Duration::from_secs(86_400);

/// Why a job that failed for now will not run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoNextTry {
    /// Its last attempt has run.
    Attempts,
    /// Its next try would start past its deadline.
    Deadline,
}

impl NoNextTry {
    /// The error a job failing for this reason keeps: the failure's own, and why it is final.
    pub fn explain(self, error: String) -> String {
        match self {
            NoNextTry::Attempts => error,
            NoNextTry::Deadline => format!("{error} (its next try would start past its deadline)"),
        }
    }
}

/// New job ids: UUIDv7s whose time is the one given, the aligned clock's (the database's on
/// Postgres), not the host's own, so that jobs listed newest first (by id) are in the order of
/// their `created_at` whichever host took them. Ids made here never go back (those of one
/// millisecond rise in the order they were made, and a clock stepped back continues from the
/// latest time), so one per process.
#[derive(Debug, Default)]
pub struct JobIds(std::sync::Mutex<uuid::ContextV7>);

impl JobIds {
    pub fn next(&self, now_ms: i64) -> Uuid {
        let ms = u64::try_from(now_ms).unwrap_or(0);
        let context = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = uuid::Timestamp::from_unix(&*context, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        Uuid::new_v7(at)
    }
}

/// What `enqueue` is given.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub spec: JobSpec,
    pub metadata: Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub deadline_at: Option<i64>,
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a true repeat from a reused idempotency key.
    pub request_hash: Option<String>,
    pub created_at: i64,
}

/// The lease a new job is inserted under when the process taking the submission runs it at
/// once, with no claim (see `Store::enqueue`): its first attempt, started at its creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartHere {
    pub owner: String,
    pub lease_expires_at: i64,
}

impl StartHere {
    /// The lease job `job_id` is inserted under: its first attempt, this owner's.
    pub fn lease_of(&self, job_id: Uuid) -> Lease {
        Lease {
            job_id,
            attempt: 1,
            owner: self.owner.clone(),
        }
    }
}

impl NewJob {
    /// The job as `enqueue` stores it: queued, runnable from its creation, never claimed.
    pub fn into_queued(self) -> Job {
        self.into_job(None)
    }

    /// The job as `enqueue` stores it: queued, or with `start` running its first attempt.
    pub fn into_job(self, start: Option<&StartHere>) -> Job {
        Job {
            id: self.id,
            status: if start.is_some() {
                JobStatus::Running
            } else {
                JobStatus::Queued
            },
            spec: self.spec,
            metadata: self.metadata,
            priority: self.priority,
            attempt: i32::from(start.is_some()),
            max_attempts: self.max_attempts,
            run_at: self.created_at,
            deadline_at: self.deadline_at,
            lease_owner: start.map(|s| s.owner.clone()),
            lease_expires_at: start.map(|s| s.lease_expires_at),
            idempotency_key: self.idempotency_key,
            request_hash: self.request_hash,
            created_at: self.created_at,
            started_at: start.map(|_| self.created_at),
            finished_at: None,
            failure_reason: None,
            error: None,
            result: None,
        }
    }
}

/// Proof of holding a job: every worker write must match all three fields and `running`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: Uuid,
    pub attempt: i32,
    pub owner: String,
}

/// Tokens and money spent by one call, or summed over many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost: f64,
}

impl Usage {
    /// A call's usage from its two token counts (as stored); the total stops at `i64::MAX`
    /// rather than overflow, should a row hold counts no upstream sent.
    pub fn of(prompt_tokens: i64, completion_tokens: i64, cost: f64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            cost,
        }
    }

    /// Add `other`'s; token counts stop at `i64::MAX` rather than overflow.
    pub fn add(&mut self, other: &Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        self.cost += other.cost;
    }
}

/// Which step of the fixed fusion workflow a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKey {
    Panel(u32),
    Analysis,
    Final,
}

impl StepKey {
    pub fn to_db(self) -> String {
        match self {
            StepKey::Panel(i) => format!("panel:{i}"),
            StepKey::Analysis => "analysis".to_string(),
            StepKey::Final => "final".to_string(),
        }
    }

    /// ```
    /// use fusion::job::StepKey;
    /// assert_eq!(StepKey::parse("panel:2"), Some(StepKey::Panel(2)));
    /// assert_eq!(StepKey::parse("final"), Some(StepKey::Final));
    /// assert!(StepKey::parse("panel:").is_none());
    /// // Steps sort in workflow order, panel members by index (not as text).
    /// assert!(StepKey::Panel(10) > StepKey::Panel(2) && StepKey::Analysis > StepKey::Panel(10));
    /// ```
    pub fn parse(s: &str) -> Option<StepKey> {
        match s {
            "analysis" => Some(StepKey::Analysis),
            "final" => Some(StepKey::Final),
            _ => s.strip_prefix("panel:")?.parse().ok().map(StepKey::Panel),
        }
    }
}

/// The `error_code` of a failed step set to run again: by a manual retry, or, when the step was
/// billed, by the requeue of its job after a failure that may pass. It is kept rather than
/// deleted (or never written), so that what it was billed for still counts in the job's usage;
/// the step's next run replaces the row and carries that usage into its own.
pub const SUPERSEDED: &str = "superseded_by_retry";

/// The checkpoint of one finished step: written once, never run again (but a failed step a
/// manual retry superseded, see `SUPERSEDED`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub key: StepKey,
    pub model: String,
    /// Whether the step produced its output; a failed step is recorded with its error.
    pub ok: bool,
    pub content: Option<String>,
    /// Structured output: the analysis object for the analysis step, `finish_reason` for the
    /// others.
    pub data: Option<JsonText>,
    pub usage: Usage,
    pub latency_ms: i64,
    /// Typed failure code (`rate_limited`, `analysis_not_valid_json`, …) when not ok.
    pub error_code: Option<String>,
    pub error: Option<String>,
    /// Upstream HTTP status of the failure, when there was one.
    pub status_code: Option<i32>,
    /// The job attempt that wrote it.
    pub attempt: i32,
    pub created_at: i64,
}

impl Step {
    /// Whether this failed step was set to run again (see `SUPERSEDED`).
    pub fn superseded(&self) -> bool {
        !self.ok && self.error_code.as_deref() == Some(SUPERSEDED)
    }

    /// This step without its texts (`content`, `data`, `error`), as `Store::step_heads` reads it.
    pub fn head(self) -> Step {
        Step {
            content: None,
            data: None,
            error: None,
            ..self
        }
    }

    /// This failed step, set to run again (see `SUPERSEDED`).
    pub fn to_run_again(self) -> Step {
        Step {
            error_code: Some(SUPERSEDED.into()),
            ..self
        }
    }
}

/// A JSON value kept as its text: serialized once where it is made, written to the store and
/// sent to clients as is, and parsed only where something reads inside it. A checkpoint's data
/// and a job's result go from the worker to the database this way, with no `Value` tree to
/// build, copy, walk and free on the way.
///
/// ```
/// use fusion::job::JsonText;
/// let a = JsonText::of(&serde_json::json!({"b": 1, "a": [true]})).unwrap();
/// assert_eq!(a.as_str(), r#"{"b":1,"a":[true]}"#);
/// // Equal when the values are, whatever the spacing and the order of keys (Postgres's
/// // `jsonb` re-renders text, its keys in an order of its own).
/// assert_eq!(a, JsonText::parse(r#"{ "a": [ true ], "b": 1 }"#.into()).unwrap());
/// assert!(JsonText::parse("{not json".into()).is_err());
/// ```
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// The text of `value`.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<JsonText> {
        serde_json::value::to_raw_value(value).map(JsonText)
    }

    /// Checked text: an error unless it is one JSON value.
    pub fn parse(text: String) -> serde_json::Result<JsonText> {
        RawValue::from_string(text).map(JsonText)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Read it as `T`.
    pub fn read<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.as_str())
    }

    /// The value as a tree.
    pub fn to_value(&self) -> Value {
        self.read().unwrap_or(Value::Null)
    }
}

impl From<Box<RawValue>> for JsonText {
    fn from(raw: Box<RawValue>) -> JsonText {
        JsonText(raw)
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> JsonText {
        JsonText::of(&value).expect("a Value always serializes")
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

/// Filter for listing jobs, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub limit: u32,
    /// Only jobs with an id lower than this (ids are time-ordered UUIDv7).
    pub before: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Job ids carry the time given, and those made in one millisecond (a burst of submits) still
    // rise in the order they were made: the list's order by id is theirs.
    #[test]
    fn job_ids_carry_the_time_given_and_rise_within_a_millisecond() {
        let at = 1_800_000_000_123;
        let job_ids = JobIds::default();
        let ids: Vec<Uuid> = (0..1_000).map(|_| job_ids.next(at)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let (secs, nanos) = ids[0].get_timestamp().expect("a UUIDv7").to_unix();
        assert_eq!((secs, nanos / 1_000_000), (1_800_000_000, 123));
    }

    // A schema's properties keep their order through the store, whose JSONB (Postgres) orders
    // an object's keys its own way: the spec holds the format's text beside the object, and the
    // text is read first. The object is still there for a build from before the text, which
    // reads it as it did; and a spec stored before (the object alone) still reads.
    #[test]
    fn the_response_format_is_stored_with_its_text_and_read_either_way() {
        let format = serde_json::json!({"type": "json_schema", "json_schema": {"name": "a",
            "schema": {"properties": {"reasoning": {}, "answer": {}}}}});
        let spec = JobSpec {
            response_format: Some(format.clone()),
            ..JobSpec::salvage(&Value::Null)
        };
        let mut stored = serde_json::to_value(&spec).unwrap();
        assert_eq!(stored["response_format"], format);
        assert_eq!(stored["response_format_text"], format.to_string());
        // As JSONB gives it back: the object's keys in another order.
        let reordered = serde_json::json!({"json_schema": {"name": "a", "schema": {"properties":
            {"answer": {}, "reasoning": {}}}}, "type": "json_schema"});
        stored["response_format"] = reordered.clone();
        let keys = |f: &Value| {
            let props = &f["json_schema"]["schema"]["properties"];
            props
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        let read: JobSpec = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(
            keys(read.response_format.as_ref().unwrap()),
            ["reasoning", "answer"]
        );
        let salvaged = JobSpec::salvage(&stored).response_format.unwrap();
        assert_eq!(keys(&salvaged), ["reasoning", "answer"]);
        // Stored before: the object alone.
        let text = stored["response_format_text"].as_str().unwrap().to_string();
        let mut before = stored;
        before
            .as_object_mut()
            .unwrap()
            .remove("response_format_text");
        let read: JobSpec = serde_json::from_value(before.clone()).unwrap();
        assert_eq!(
            keys(read.response_format.as_ref().unwrap()),
            ["answer", "reasoning"]
        );
        assert_eq!(read.response_format, Some(format.clone()));
        assert_eq!(JobSpec::salvage(&before).response_format, Some(format));
        // Stored by the builds that kept the text alone, under `response_format`.
        let mut text_alone = before.clone();
        text_alone["response_format"] = Value::String(text);
        let read: JobSpec = serde_json::from_value(text_alone).unwrap();
        assert_eq!(
            keys(read.response_format.as_ref().unwrap()),
            ["reasoning", "answer"]
        );
        // Without a format, neither field is written, and none is read.
        before.as_object_mut().unwrap().remove("response_format");
        let read: JobSpec = serde_json::from_value(before).unwrap();
        assert_eq!(read.response_format, None);
        let written = serde_json::to_value(&read).unwrap();
        assert!(written.get("response_format_text").is_none(), "{written}");
    }

    // Sums over a job's steps (and the tool loop's jobs) stop at the largest count, never wrap
    // or panic, whatever an upstream reported.
    #[test]
    fn usage_sums_saturate() {
        // A stored row's counts, whatever they hold, make a total without overflow.
        let huge = Usage::of(i64::MAX, i64::MAX - 1, 1.5);
        assert_eq!(huge.total_tokens, i64::MAX);
        let mut sum = huge;
        sum.add(&huge);
        assert_eq!(
            (
                sum.prompt_tokens,
                sum.completion_tokens,
                sum.total_tokens,
                sum.cost
            ),
            (i64::MAX, i64::MAX, i64::MAX, 3.0)
        );
    }

    #[test]
    fn step_keys_round_trip() {
        for key in [
            StepKey::Panel(0),
            StepKey::Panel(7),
            StepKey::Analysis,
            StepKey::Final,
        ] {
            assert_eq!(StepKey::parse(&key.to_db()), Some(key));
        }
        assert_eq!(StepKey::parse("panel:x"), None);
        assert_eq!(StepKey::parse("other"), None);
    }

    #[test]
    fn a_requeued_job_waits_longer_each_attempt_within_its_tries_and_deadline() {
        let job = |attempt, deadline_at| Job {
            attempt,
            max_attempts: 5,
            deadline_at,
            ..crate::store::queued_job(0).into_queued()
        };
        let base = Duration::from_secs(1);
        assert_eq!(job(1, None).next_try_at(1_000, base), Ok(2_000));
        assert_eq!(job(3, None).next_try_at(1_000, base), Ok(5_000));
        // Ten minutes at most.
        let long = Duration::from_secs(100);
        assert_eq!(job(4, None).next_try_at(0, long), Ok(600_000));
        assert_eq!(job(5, None).next_try_at(0, base), Err(NoNextTry::Attempts));
        assert_eq!(job(1, Some(2_001)).next_try_at(1_000, base), Ok(2_000));
        assert_eq!(
            job(1, Some(2_000)).next_try_at(1_000, base),
            Err(NoNextTry::Deadline)
        );
        // An upstream's Retry-After, when it asks for longer, up to a day; past the deadline,
        // no next try.
        let hour = Duration::from_secs(3_600);
        assert_eq!(
            job(1, None).next_try_after(1_000, base, hour),
            Ok(3_601_000)
        );
        assert_eq!(job(4, None).next_try_after(0, long, hour), Ok(3_600_000));
        assert_eq!(
            job(1, None).next_try_after(0, base, Duration::MAX),
            Ok(86_400_000)
        );
        assert_eq!(
            job(1, None).next_try_after(1_000, base, Duration::from_millis(10)),
            Ok(2_000)
        );
        assert_eq!(
            job(1, Some(3_600_000)).next_try_after(0, base, hour),
            Err(NoNextTry::Deadline)
        );
        assert_eq!(
            job(5, None).next_try_after(0, base, hour),
            Err(NoNextTry::Attempts)
        );
        assert_eq!(NoNextTry::Attempts.explain("e".into()), "e");
        assert!(NoNextTry::Deadline.explain("e".into()).contains("deadline"));
    }

    #[test]
    fn statuses_round_trip() {
        for st in JobStatus::ALL {
            assert_eq!(JobStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }
}
