//! The fusion workflow: `panel[i]` in parallel, then `analysis`, then `final`. Each finished step
//! is handed to a `Checkpoints` sink as soon as it answers (the next call does not wait for the
//! write, see `saves.rs`); the final answer goes back with the outcome instead, to be written in
//! the outcome's commit. Steps already checkpointed are reused, never called again. Knows
//! nothing of SQL or HTTP servers: the worker supplies the sink.

pub mod analysis;
pub mod prompts;
mod saves;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::FusionConfig;
use crate::job::{Job, JobSpec, JsonText, NoNextTry, Step, StepKey, Usage};
use crate::upstream::{
    CallError, Completion, CompletionRequest, ErrorKind, RetryPolicy, StructuredOutput, Tries,
    Upstream, UpstreamError,
};
use analysis::Analysis;
use prompts::PanelAnswer;
use saves::Saves;

/// The sink was unable to keep a step: the lease is gone or the database is out of reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost;

/// The job's side of a run: where its steps are kept, and whether it may make another call.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    async fn save(&self, step: &Step) -> Result<(), Lost>;

    /// Wait until the job may start another upstream call: at once while the job is known to
    /// be this run's (its lease renewed in time); `Err(Lost)` when the run must stop instead.
    async fn before_call(&self) -> Result<(), Lost> {
        Ok(())
    }
}

/// How a run of the workflow ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        /// The final `chat.completion` object.
        result: JsonText,
        /// The final step when this run called it: not checkpointed yet, so that the caller
        /// writes it in the same commit as the outcome (one commit, not two, after the last
        /// answer). `None` when an earlier attempt had checkpointed it.
        last_step: Option<Step>,
    },
    Failed {
        reason: String,
        error: String,
    },
    /// A failure that may pass later (the upstream is rate limiting or down): requeue the job,
    /// keeping its checkpoints, to run again at `at` (unix ms). Made by `Outcome::retry`, which
    /// fails the job instead when it has no try left.
    Retry {
        reason: String,
        error: String,
        at: i64,
    },
    /// Cancelled, or the lease was lost: write nothing more.
    Stopped,
}

impl Outcome {
    /// A failure that may pass: the job requeued for its next try, or failed now with `reason`
    /// when it has none (no attempt left, or the try would start past its deadline).
    pub fn retry(next_try: Result<i64, NoNextTry>, reason: String, error: String) -> Outcome {
        match next_try {
            Ok(at) => Outcome::Retry { reason, error, at },
            Err(no) => Outcome::Failed {
                reason,
                error: no.explain(error),
            },
        }
    }
}

pub struct Pipeline {
    pub upstream: Arc<Upstream>,
    pub retry: RetryPolicy,
    /// Tries at a valid analysis (each may itself retry transport errors).
    pub analysis_attempts: u32,
    /// The analysis schema and response formats, built from the configured limits.
    pub analysis: analysis::Formats,
    pub clock: SharedClock,
}

impl Pipeline {
    /// The pipeline `config` describes, calling through `upstream`.
    pub fn new(config: &FusionConfig, upstream: Arc<Upstream>, clock: SharedClock) -> Pipeline {
        Pipeline {
            upstream,
            retry: config.retry.clone(),
            analysis_attempts: config.jobs.analysis_attempts,
            analysis: analysis::Formats::new(config.analysis),
            clock,
        }
    }

    /// Run what remains of `job`, given the steps already checkpointed. Every checkpoint has
    /// landed by the time the outcome is returned (or the outcome is `Stopped`), but a
    /// success's final step, which it carries for the caller to write with the outcome.
    /// `retry_base` is the first wait before a job that failed for now runs again (see
    /// `Job::next_try_at`).
    pub async fn run(
        &self,
        job: &Job,
        done: Vec<Step>,
        ckpt: &dyn Checkpoints,
        cancel: &CancellationToken,
        retry_base: Duration,
    ) -> Outcome {
        let mut saves = Saves::new(ckpt);
        let next_try = |asked| job.next_try_after(self.clock.now_ms(), retry_base, asked);
        let outcome = self
            .run_steps(job, done, &mut saves, cancel, &next_try)
            .await;
        match saves.settle().await {
            Ok(()) => outcome,
            Err(Lost) => Outcome::Stopped,
        }
    }

    async fn run_steps(
        &self,
        job: &Job,
        done: Vec<Step>,
        saves: &mut Saves<'_>,
        cancel: &CancellationToken,
        next_try: &(dyn Fn(Duration) -> Result<i64, NoNextTry> + Sync),
    ) -> Outcome {
        let spec = &job.spec;
        let mut panel: Vec<Option<Step>> = vec![None; spec.panel.len()];
        let mut analysis_step = None;
        let mut final_step = None;
        let mut carried = Carried::default();
        for step in done {
            // Failed steps a manual retry set to run again: run, their usage carried over.
            if step.superseded() {
                carried.0.push((step.key, step.usage));
                continue;
            }
            match step.key {
                StepKey::Panel(i) if (i as usize) < panel.len() => panel[i as usize] = Some(step),
                StepKey::Panel(_) => {}
                StepKey::Analysis => analysis_step = Some(step),
                StepKey::Final => final_step = Some(step),
            }
        }

        // Failures that may pass, and the longest wait their upstreams asked for.
        let (mut may_pass, mut asked) = (Vec::new(), Duration::ZERO);
        if panel.iter().any(Option::is_none) {
            match self
                .run_panel(job, &mut panel, saves, &carried, cancel)
                .await
            {
                Ok(failures) => (may_pass, asked) = failures,
                Err(stop) => return stop,
            }
        }
        let panel: Vec<Step> = panel.into_iter().flatten().collect();
        let answers: Vec<PanelAnswer<'_>> = panel
            .iter()
            .filter(|s| s.ok)
            .map(|s| PanelAnswer {
                model: &s.model,
                content: s.content.as_deref().unwrap_or_default(),
                cut: s
                    .data
                    .as_ref()
                    .and_then(|d| d.read::<Finished>().ok())
                    .is_some_and(|f| f.finish_reason == "length"),
                omitted: 0,
            })
            .collect();
        let mut failed = quorum_failure(spec, &panel, answers.len());
        // Members whose failure is final (a 404, a refused request) cannot answer next time.
        let reachable = answers.len() + may_pass.len() >= spec.min_panel.max(1) as usize;
        if !may_pass.is_empty()
            && reachable
            && let Some(Outcome::Failed { reason, error }) = failed
        {
            // Short because of failures that may pass (an outage, a rate limit): the job runs
            // again later, as for such a failure of the final step, and those members are
            // called again then; the answers it got are kept. With no try left (its last
            // attempt, or a next one past its deadline) it fails now. A quorum those members
            // could not make up even if they answered fails now too: requeued, they would be
            // called (and paid) again for nothing.
            failed = match Outcome::retry(next_try(asked), reason, error) {
                retry @ Outcome::Retry { .. } => {
                    // Those members are called again next time; what their tries were billed
                    // for (an answer cut off, an error mid-answer) is kept till then.
                    for step in may_pass.into_iter().filter_map(to_run_again_if_billed) {
                        saves.start(step);
                    }
                    return retry;
                }
                failed => Some(failed),
            };
        }
        // Otherwise those failures are the job's: its partial failure, or part of why it failed.
        for step in may_pass {
            saves.start(step);
        }
        if let Some(failed) = failed {
            return failed;
        }
        // A checkpointed analysis compared the answers there were when it was made. An answer
        // written by a later attempt (a manual retry ran a failed member again, and it answered)
        // was not among them: the analysis is made again, so the final answer is not written
        // from one that never saw it. The earlier analysis was paid for: its usage is carried
        // into the new one's step, which replaces its row. So is one stopped by an upstream
        // failure that may pass (an outage at the analyst's provider, which may be over by this
        // attempt): kept, the final answer would be written without an analysis the analyst can
        // now make. (One that failed on its replies, not valid JSON, say, or for good, a 401, is
        // kept: asked again, it would be paid again for the same.) Neither is made again once
        // the final step is checkpointed: that answer stands, and was written without it.
        let remake = |a: &Step| {
            panel.iter().any(|p| p.ok && p.attempt > a.attempt)
                || (!a.ok
                    && a.error_code.as_deref() == Some("analysis_upstream_error")
                    && AnalysisFailure::may_pass(a))
        };
        let analysis_step = match analysis_step {
            Some(a) if final_step.is_none() && remake(&a) => {
                carried.0.push((a.key, a.usage));
                None
            }
            kept => kept,
        };

        // The analysis step's usage, and the analysis the final prompt is written from.
        // How far the answers had to be shortened for the analyst's context (see
        // `prompts::shortened`): the final prompt, longer still as a rule, starts there. (An
        // analysis prompt carrying the schema, for a provider that does not enforce it, may
        // need more than the final one would: the final answer is then written from answers
        // cut shorter than it needed, which fails nothing.)
        let (analysis_usage, analysis, fitted) = match analysis_step {
            // Checkpointed by an earlier attempt: read back from its data.
            Some(s) => {
                let analysis = s
                    .data
                    .filter(|_| s.ok)
                    .and_then(|d| d.read::<Analysis>().ok());
                (s.usage, analysis, 0)
            }
            None => {
                // Boxed, like the final call below: a job waiting on its panel does not carry
                // room for the later steps' futures (it matters with thousands in flight).
                let analysis = self.run_analysis(spec, job.attempt, &answers, saves.sink(), cancel);
                let analysis = Box::pin(analysis);
                let Ok(Some((mut s, analysis, fitted))) = saves.alongside(analysis).await else {
                    return Outcome::Stopped;
                };
                s.usage.add(&carried.of(StepKey::Analysis));
                let usage = s.usage;
                // Written once the answers it compares are; the final call goes on meanwhile.
                saves.start_after_earlier(s);
                (usage, analysis, fitted)
            }
        };

        let (final_step, unsaved) = match final_step {
            // Checkpointed: an answer, or a failure (final, or retryable with no try left:
            // a retryable one with a next try is written set to run again, and skipped above),
            // which ends this attempt as it ended the one that wrote it, without paying again.
            // A manual retry supersedes failed steps first, so that one calls again.
            Some(s) => (s, false),
            _ => {
                // The analyst's provider is looked up only for a job that asked for a format.
                let (format, note) = match &spec.response_format {
                    Some(f) => final_format(f, self.upstream.structured_output(&spec.analyst)),
                    None => (None, None),
                };
                // A prompt too long for the analyst's context is sent again with the answers
                // shortened (see `prompts::shortened`), rather than the job failing after the
                // panel was paid for.
                let mut refused = Usage::default();
                let mut level = fitted;
                let (mut s, may_pass) = loop {
                    let shown = prompts::shortened(&answers, level);
                    let messages = prompts::final_messages_with(
                        &spec.messages,
                        &shown,
                        analysis.as_ref(),
                        note.as_deref(),
                    );
                    let req = CompletionRequest {
                        messages: messages.into(),
                        temperature: Some(0.0),
                        max_completion_tokens: spec.max_completion_tokens,
                        response_format: format.as_ref(),
                        stop: spec.stop.as_ref(),
                    };
                    let (key, analyst, sink) = (StepKey::Final, &spec.analyst, saves.sink());
                    let spent = Mutex::default();
                    let call = self.call_step((key, analyst), &req, job, sink, cancel, &spent);
                    let Ok(Some((s, may_pass))) = saves.alongside(Box::pin(call)).await else {
                        return Outcome::Stopped;
                    };
                    let overflowed = !s.ok && may_pass.is_none() && overflows(&s);
                    if !overflowed || level == SHORTEN_LEVELS {
                        break (s, may_pass);
                    }
                    tracing::info!(job = %job.id, level = level + 1,
                        "the final prompt is too long for the analyst; shortening the answers");
                    refused.add(&s.usage);
                    level += 1;
                };
                s.usage.add(&refused);
                s.usage.add(&carried.of(StepKey::Final));
                if let Some(asked) = may_pass {
                    // The next attempt of the job makes this step afresh: checkpointed only for
                    // what it was billed for, set to run again. Without a next attempt, it is
                    // the job's failure, written as such.
                    let (reason, error) = final_failure(&s);
                    let outcome = Outcome::retry(next_try(asked), reason, error);
                    let kept = match outcome {
                        Outcome::Retry { .. } => to_run_again_if_billed(s),
                        _ => Some(s),
                    };
                    if let Some(s) = kept {
                        saves.start_after_earlier(s);
                    }
                    return outcome;
                }
                // A failure is written after the analysis and before the outcome (which `run`
                // awaits); an answer goes back with the outcome, to be written in its commit.
                if !s.ok {
                    saves.start_after_earlier(s.clone());
                }
                let ok = s.ok;
                (s, ok)
            }
        };
        if !final_step.ok {
            let (reason, error) = final_failure(&final_step);
            return Outcome::Failed { reason, error };
        }

        let mut usage = Usage::default();
        for s in panel.iter().chain([&final_step]) {
            usage.add(&s.usage);
        }
        usage.add(&analysis_usage);
        let finished = final_step
            .data
            .as_ref()
            .and_then(|d| d.read::<Finished>().ok());
        let result = ChatCompletion {
            id: format!("fusion-{}", job.id),
            object: "chat.completion",
            created: self.clock.now_ms() / 1000,
            model: &spec.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: final_step.content.as_deref(),
                },
                finish_reason: finished.as_ref().map_or("stop", |f| &f.finish_reason),
            }],
            usage: &usage,
        };
        match JsonText::of(&result) {
            Ok(result) => Outcome::Succeeded {
                result,
                last_step: unsaved.then_some(final_step),
            },
            // Strings and numbers always serialize; kept an outcome rather than a panic.
            Err(e) => Outcome::Failed {
                reason: "internal_error".into(),
                error: format!("the result could not be serialized: {e}"),
            },
        }
    }

    /// Call every missing panel member in parallel, starting each one's checkpoint as it lands
    /// (the writes of answers that land together share a batch). A failure that may pass if
    /// tried again later is not written yet: it is returned, with the longest wait their
    /// upstreams asked for, for the caller to write once the quorum is known to be met.
    /// `Err(Stopped)` when the run must stop (cancelled, or the lease is gone).
    async fn run_panel(
        &self,
        job: &Job,
        panel: &mut [Option<Step>],
        saves: &mut Saves<'_>,
        carried: &Carried,
        cancel: &CancellationToken,
    ) -> Result<(Vec<Step>, Duration), Outcome> {
        let (spec, attempt) = (&job.spec, job.attempt);
        // Written out once for every member (a copy only when it holds a tool exchange).
        let messages = prompts::plain_conversation(&spec.messages);
        // What each member's failed tries were billed for, as they fail: a member cut off by
        // the grace period below still counts them.
        let spent: Vec<Mutex<Usage>> = panel.iter().map(|_| Mutex::default()).collect();
        let mut pending = FuturesUnordered::new();
        let sink = saves.sink();
        for (i, slot) in panel.iter().enumerate() {
            if slot.is_some() {
                continue;
            }
            let model = &spec.panel[i];
            let req = CompletionRequest {
                messages: Cow::Borrowed(&messages),
                temperature: spec.temperature,
                max_completion_tokens: spec.max_completion_tokens,
                response_format: None,
                stop: None,
            };
            // Boxed: the set then holds pointers, and its own bookkeeping stays small.
            let spent = &spent[i];
            pending.push(Box::pin(async move {
                let key = StepKey::Panel(i as u32);
                let step = self
                    .call_step((key, model), &req, job, sink, cancel, spent)
                    .await;
                (i, step.ok_or(Outcome::Stopped))
            }));
        }
        let mut ok = panel.iter().flatten().filter(|s| s.ok).count() as u32;
        let (mut may_pass, mut asked) = (Vec::new(), Duration::ZERO);
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            if grace.is_none()
                && ok >= spec.min_panel
                && let Some(ms) = spec.panel_timeout_ms
            {
                grace = Some(Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
            }
            // The next answer; `None` once every call returned or the grace period is over.
            let next = async {
                // `biased`: an answer that is in when the grace period ends is taken, not
                // recorded as timed out on tokio's random pick after it was paid for.
                tokio::select! {
                    biased;
                    answer = pending.next() => answer,
                    _ = async {
                        match grace.as_mut() {
                            Some(sleep) => sleep.await,
                            None => std::future::pending().await,
                        }
                    } => None,
                }
            };
            let Ok(next) = saves.alongside(next).await else {
                return Err(Outcome::Stopped);
            };
            match next {
                Some((i, Ok((mut step, later)))) => {
                    step.usage.add(&carried.of(step.key));
                    ok += u32::from(step.ok);
                    match later {
                        Some(wait) => {
                            may_pass.push(step.clone());
                            asked = asked.max(wait);
                        }
                        None => saves.start(step.clone()),
                    }
                    panel[i] = Some(step);
                }
                Some((_, Err(stopped))) => return Err(stopped),
                None => break,
            }
        }
        // Members still out when the grace period ended are recorded as timed out, with what
        // their tries that failed before were billed for.
        drop(pending);
        for (i, slot) in panel.iter_mut().enumerate() {
            if slot.is_none() {
                let key = StepKey::Panel(i as u32);
                let mut usage = carried.of(key);
                usage.add(&spent[i].lock().unwrap_or_else(PoisonError::into_inner));
                let step = Step {
                    error_code: Some("panel_timeout".into()),
                    error: Some(format!(
                        "no answer within panel_timeout_ms after {} panel answers",
                        spec.min_panel
                    )),
                    usage,
                    ..self.failed_step(key, &spec.panel[i], attempt)
                };
                saves.start(step.clone());
                *slot = Some(step);
            }
        }
        Ok((may_pass, asked))
    }

    /// Ask for the analysis, feeding back why a reply was rejected, a bounded number of times:
    /// its step, the analysis itself when there is one, and how far the answers were shortened
    /// to fit the analyst's context (`prompts::shortened`'s level). `None` means cancelled (or
    /// the job is no longer this run's).
    async fn run_analysis(
        &self,
        spec: &JobSpec,
        attempt: i32,
        answers: &[PanelAnswer<'_>],
        sink: &dyn Checkpoints,
        cancel: &CancellationToken,
    ) -> Option<(Step, Option<Analysis>, u32)> {
        let mode = self.upstream.structured_output(&spec.analyst);
        let formats = &self.analysis;
        // Providers that do not enforce the schema at least read it.
        let schema_in_prompt = (mode != StructuredOutput::JsonSchema).then(|| formats.schema());
        let mut req = CompletionRequest {
            messages: prompts::analysis_messages(&spec.messages, answers, schema_in_prompt).into(),
            temperature: Some(0.0),
            max_completion_tokens: formats.limits.max_tokens,
            response_format: formats.response_format(mode),
            stop: None,
        };
        let mut usage = Usage::default();
        let mut latency_ms = 0;
        let mut last_problem = None;
        let (mut tries, mut level) = (0, 0);
        while tries < self.analysis_attempts.max(1) {
            tries += 1;
            // Not requeued for a long `Retry-After`: the job goes on without an analysis.
            let spent = Mutex::default();
            match self
                .call(&spec.analyst, &req, sink, cancel, false, &spent)
                .await
            {
                Ok(c) => {
                    usage.add(&c.usage);
                    latency_ms += c.latency_ms;
                    match analysis::parse(&c.content) {
                        Ok(a) => {
                            let a = a.bounded(&formats.limits);
                            let step = Step {
                                ok: true,
                                data: JsonText::of(&a).ok(),
                                usage,
                                latency_ms,
                                ..self.failed_step(StepKey::Analysis, &spec.analyst, attempt)
                            };
                            return Some((step, Some(a), level));
                        }
                        // Cut off at its token limit: asked for less, as the same request
                        // would stop at the same place.
                        Err(e) if c.finish_reason.as_deref() == Some("length") => {
                            req.messages
                                .to_mut()
                                .extend(prompts::analysis_cut_correction());
                            let error = format!("cut off at the token limit: {e}");
                            last_problem = Some((e.code().to_string(), error, None, false));
                        }
                        Err(e) => {
                            req.messages
                                .to_mut()
                                .extend(prompts::analysis_correction(&c.content, &e.to_string()));
                            last_problem = Some((e.code().to_string(), e.to_string(), None, false));
                        }
                    }
                }
                Err(CallError::Cancelled) => return None,
                // Too long for the analyst's context: asked again with the answers shortened
                // (a try of its own, not one of the tries to get valid JSON).
                Err(CallError::Upstream(e))
                    if level < SHORTEN_LEVELS && e.kind == ErrorKind::TooLong =>
                {
                    usage.add(&e.usage);
                    level += 1;
                    tries -= 1;
                    let shown = prompts::shortened(answers, level);
                    let messages =
                        prompts::analysis_messages(&spec.messages, &shown, schema_in_prompt);
                    req.messages = messages.into();
                    tracing::info!(
                        level,
                        "the analysis prompt is too long for the analyst; shortening the answers"
                    );
                }
                Err(CallError::Upstream(e)) => {
                    usage.add(&e.usage);
                    let code = if e.kind == ErrorKind::Empty {
                        "analysis_empty"
                    } else {
                        "analysis_upstream_error"
                    };
                    let may_pass = e.retryable();
                    last_problem = Some((code.to_string(), e.message.clone(), e.status, may_pass));
                    break;
                }
            }
        }
        let (code, error, status, may_pass) = last_problem.unwrap_or_default();
        let step = Step {
            usage,
            latency_ms,
            data: JsonText::of(&AnalysisFailure { may_pass }).ok(),
            error_code: Some(code),
            error: Some(error),
            status_code: status.map(i32::from),
            ..self.failed_step(StepKey::Analysis, &spec.analyst, attempt)
        };
        Some((step, None, level))
    }

    /// One step that is a single (retried) call, and, for a failure that may pass if tried
    /// again later, how long its upstream asked to be left alone (its `Retry-After`, zero when
    /// it named none); `None` means cancelled (or the job is no longer this run's).
    /// What its tries that failed were billed for is summed in `spent` as they fail (see
    /// `Upstream::complete_with_retries`).
    async fn call_step(
        &self,
        (key, model): (StepKey, &str),
        req: &CompletionRequest<'_>,
        job: &Job,
        sink: &dyn Checkpoints,
        cancel: &CancellationToken,
        spent: &Mutex<Usage>,
    ) -> Option<(Step, Option<Duration>)> {
        let attempt = job.attempt;
        // A job with an attempt left is requeued for a long `Retry-After` (`Outcome::retry`).
        let requeues = job.has_attempt_left();
        match self.call(model, req, sink, cancel, requeues, spent).await {
            Ok(c) => Some((
                Step {
                    ok: true,
                    content: Some(c.content),
                    data: c
                        .finish_reason
                        .and_then(|finish_reason| JsonText::of(&Finished { finish_reason }).ok()),
                    usage: c.usage,
                    latency_ms: c.latency_ms,
                    ..self.failed_step(key, model, attempt)
                },
                None,
            )),
            Err(CallError::Cancelled) => None,
            Err(CallError::Upstream(e)) => Some((
                Step {
                    error_code: Some(e.code().to_string()),
                    error: Some(e.message.clone()),
                    status_code: e.status.map(i32::from),
                    // Billed for what came back unusable (see `UpstreamError::usage`).
                    usage: e.usage,
                    ..self.failed_step(key, model, attempt)
                },
                e.retryable().then(|| e.retry_after.unwrap_or_default()),
            )),
        }
    }

    /// One upstream call with its retries; every try waits until the job may call
    /// (`Checkpoints::before_call`), a retry after a backoff too, since the lease may have been
    /// lost meanwhile.
    async fn call(
        &self,
        model: &str,
        req: &CompletionRequest<'_>,
        sink: &dyn Checkpoints,
        cancel: &CancellationToken,
        requeues: bool,
        spent: &Mutex<Usage>,
    ) -> Result<Completion, CallError> {
        let may_call = || sink.before_call().map(|may| may.is_ok());
        let tries = Tries {
            policy: &self.retry,
            requeues,
            spent,
        };
        self.upstream
            .complete_with_retries(model, req, tries, cancel, may_call)
            .await
    }

    /// A step with no output, to fill in.
    fn failed_step(&self, key: StepKey, model: &str, attempt: i32) -> Step {
        Step {
            key,
            model: model.to_string(),
            ok: false,
            content: None,
            data: None,
            usage: Usage::default(),
            latency_ms: 0,
            error_code: None,
            error: None,
            status_code: None,
            attempt,
            created_at: self.clock.now_ms(),
        }
    }
}

/// A step that failed for now, as it is checkpointed while its job waits to run it again: set to
/// run again when its calls were billed for anything (so that the usage is still counted), not
/// written otherwise.
fn to_run_again_if_billed(step: Step) -> Option<Step> {
    (step.usage != Usage::default()).then(|| step.to_run_again())
}

/// The usage of the rows this run replaces, by step: those a manual retry superseded
/// (`job::SUPERSEDED`), and an analysis made again. Each is added to the step that replaces its
/// row, so that what it was billed for is still counted.
#[derive(Default)]
struct Carried(Vec<(StepKey, Usage)>);

impl Carried {
    fn of(&self, key: StepKey) -> Usage {
        let mut usage = Usage::default();
        self.0
            .iter()
            .filter(|(k, _)| *k == key)
            .for_each(|(_, u)| usage.add(u));
        usage
    }
}

/// The data of an analysis that failed: whether that failure may pass if it is asked for again
/// later (an outage, a rate limit), as the call's own retries judged it.
#[derive(Serialize, Deserialize)]
struct AnalysisFailure {
    may_pass: bool,
}

impl AnalysisFailure {
    fn may_pass(step: &Step) -> bool {
        match step.data.as_ref().map(|d| d.read::<AnalysisFailure>()) {
            Some(Ok(failure)) => failure.may_pass,
            // Written before failed analyses said so: judged by its status.
            // No status (a timeout, a broken connection), a 200 (an error reported mid-answer,
            // or a web page, which cannot be told apart here), or one the call's own retries
            // treat as passing.
            _ => step.status_code.is_none_or(|s| {
                s == 200 || u16::try_from(s).is_ok_and(UpstreamError::status_may_pass)
            }),
        }
    }
}

/// How many times a prompt too long for the analyst's context is sent again with the panel's
/// answers halved together (to a half, a quarter, an eighth of their length).
const SHORTEN_LEVELS: u32 = 3;

/// Whether a failed step's call was refused for a prompt too long for the model's context.
fn overflows(step: &Step) -> bool {
    step.error_code.as_deref() == Some(crate::upstream::TOO_LONG)
}

/// The data of a step whose call answered: why the model stopped.
#[derive(Serialize, Deserialize)]
struct Finished {
    finish_reason: String,
}

/// A job's result: the `chat.completion` object an OpenAI client expects, fields in its order.
#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: String,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: &'a Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
}

/// The final call's `response_format` for the client's `format`, asked for in the analyst's
/// provider's own way (as the analysis is), and for a provider asked for none, what the prompt
/// then says instead.
fn final_format(
    format: &serde_json::Value,
    mode: StructuredOutput,
) -> (Option<JsonText>, Option<String>) {
    let note = (mode == StructuredOutput::Prompt).then(|| {
        let mut note =
            "Reply with one JSON object and nothing else: no prose, no code fence.".to_string();
        if let Some(schema) = format.pointer("/json_schema/schema") {
            note += &format!(" It must be valid against this JSON Schema:\n{schema}");
        }
        note
    });
    (mode.request_format(format).map(JsonText::from), note)
}

/// The job's reason and error when its final step failed as `step` did.
fn final_failure(step: &Step) -> (String, String) {
    let reason = step.error_code.as_deref().unwrap_or("upstream_error");
    let error = step.error.as_deref().unwrap_or("unknown error");
    (
        reason.to_string(),
        format!("the final answer could not be written: {error}"),
    )
}

/// The job's failure when too few panel members answered.
fn quorum_failure(spec: &JobSpec, panel: &[Step], answered: usize) -> Option<Outcome> {
    if answered as u32 >= spec.min_panel.max(1) {
        return None;
    }
    let errors: Vec<&Step> = panel.iter().filter(|s| !s.ok).collect();
    let detail = errors
        .iter()
        .map(|s| format!("{}: {}", s.model, s.error.as_deref().unwrap_or("failed")))
        .collect::<Vec<_>>()
        .join("; ");
    let reason = if answered == 0 {
        // When every member failed the same typed way, say that; otherwise the generic reason.
        let first = errors.first().and_then(|s| s.error_code.as_deref());
        match first {
            Some(code @ ("rate_limited" | "invalid_model"))
                if errors.iter().all(|s| s.error_code.as_deref() == Some(code)) =>
            {
                code.to_string()
            }
            _ => "all_panels_failed".to_string(),
        }
    } else {
        "insufficient_quorum".to_string()
    };
    Some(Outcome::Failed {
        error: format!(
            "{answered} of {} panel members answered, {} needed: {detail}",
            panel.len(),
            spec.min_panel.max(1)
        ),
        reason,
    })
}
