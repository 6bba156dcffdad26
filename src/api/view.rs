//! The JSON a client sees for a job: the job row and its checkpoints folded into one object
//! (panel side by side, the analysis, the final `chat.completion`, usage summed over all steps).

use serde_json::{Value, json};

use crate::job::{Job, JobStatus, JsonText, Step, StepKey, Usage};

fn secs(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| json!(ms / 1000))
}

/// The short form used in lists.
pub fn summary(job: &Job) -> Value {
    json!({
        "id": job.id,
        "object": "fusion.job",
        "status": job.status.as_str(),
        "model": job.spec.model,
        "created_at": job.created_at / 1000,
        "started_at": secs(job.started_at),
        "finished_at": secs(job.finished_at),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        // A queued job is not claimed before this (a retry's backoff); else null.
        "scheduled_at": if job.status == JobStatus::Queued { secs(Some(job.run_at)) } else { Value::Null },
        "deadline_at": secs(job.deadline_at),
        "priority": job.priority,
        "failure_reason": job.failure_reason,
        "error": job.error,
        "metadata": job.metadata,
    })
}

/// The full form: summary plus panel, analysis, result and usage. A failed panel member set to
/// run again (a manual retry, or a requeue after billed tries) is shown as not run yet while
/// the job may still run it, and as the failure it was once the job is final (it never ran
/// again); its usage counts either way.
pub fn full(job: &Job, steps: &[Step]) -> Value {
    let mut usage = Usage::default();
    for s in steps {
        usage.add(&s.usage);
    }
    let final_job = job.status.is_final();
    let shown = |key| {
        steps
            .iter()
            .find(|s| s.key == key && (final_job || !s.superseded()))
    };
    let panel: Vec<Value> = job
        .spec
        .panel
        .iter()
        .enumerate()
        .map(|(i, model)| match shown(StepKey::Panel(i as u32)) {
            Some(s) => json!({
                "index": i,
                "model": model,
                "status": if s.ok { "succeeded" } else { "failed" },
                "content": s.content,
                "usage": s.usage,
                "latency_ms": s.latency_ms,
                "error": s.error,
                // The marker took the place of the failure's code.
                "error_code": if s.superseded() { None } else { s.error_code.as_deref() },
                "status_code": s.status_code,
            }),
            None => json!({
                "index": i,
                "model": model,
                "status": if final_job { "not_run" } else { "pending" },
                "content": null,
                "usage": null,
                "latency_ms": null,
                "error": null,
                "error_code": null,
                "status_code": null,
            }),
        })
        .collect();
    // Shown only as it stands: a superseded analysis's code is the marker, its own is gone.
    let analysis = steps
        .iter()
        .find(|s| s.key == StepKey::Analysis && !s.superseded());
    let mut view = summary(job);
    let obj = view.as_object_mut().expect("summary is an object");
    obj.insert("analyst".into(), json!(job.spec.analyst));
    obj.insert("panel".into(), Value::Array(panel));
    obj.insert(
        "analysis".into(),
        analysis
            .filter(|s| s.ok)
            .and_then(|s| s.data.as_ref().map(JsonText::to_value))
            .unwrap_or(Value::Null),
    );
    let failed = analysis.filter(|s| !s.ok);
    obj.insert(
        "analysis_error".into(),
        json!(failed.and_then(|s| s.error_code.clone())),
    );
    // What went wrong, in words: a context too long for the analyst, a cut-off reply.
    obj.insert(
        "analysis_error_message".into(),
        json!(failed.and_then(|s| s.error.clone())),
    );
    obj.insert("result".into(), job.result.clone().unwrap_or(Value::Null));
    obj.insert("usage".into(), json!(usage));
    view
}
