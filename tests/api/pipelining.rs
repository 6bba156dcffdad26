//! Checkpoint writes off the critical path: the pipeline runs against the fake upstream with a
//! checkpoint sink whose writes are slow (or fail), and the test reads when each call started
//! (the fake's clock) against when each write started and landed (the sink's). Also what a run
//! hands back: its result, and checkpoints a later attempt resumes from.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fusion::clock::SystemClock;
use fusion::config::FileConfig;
use fusion::fusion::{Checkpoints, Lost, Outcome, Pipeline};
use fusion::job::{Job, JobSpec, NewJob, Step, StepKey};
use fusion::upstream::Upstream;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fake_upstream::{FakeUpstream, Kind, Reply};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One write as the sink saw it: the step, when it started and when it landed (unix ms).
#[derive(Debug, Clone)]
struct Write {
    step: String,
    started: i64,
    landed: i64,
}

/// Takes `delay` over every write; with `fail`, every write fails after it (a lost lease).
struct SlowSink {
    delay: Duration,
    fail: bool,
    log: Mutex<Vec<Write>>,
}

#[async_trait]
impl Checkpoints for SlowSink {
    async fn save(&self, step: &Step) -> Result<(), Lost> {
        let started = now_ms();
        tokio::time::sleep(self.delay).await;
        self.log.lock().unwrap().push(Write {
            step: step.key.to_db(),
            started,
            landed: now_ms(),
        });
        if self.fail { Err(Lost) } else { Ok(()) }
    }
}

impl SlowSink {
    fn new(delay_ms: u64, fail: bool) -> SlowSink {
        SlowSink {
            delay: Duration::from_millis(delay_ms),
            fail,
            log: Mutex::new(Vec::new()),
        }
    }

    fn writes(&self, prefix: &str) -> Vec<Write> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|w| w.step.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// The first wait before a job that failed for now runs again, as the worker would pass it.
const RETRY_BASE: Duration = Duration::from_secs(30);

/// A new job (`job()`) run from its start, its checkpoints kept by `sink`.
async fn run_anew(fake: &FakeUpstream, sink: &dyn Checkpoints) -> Outcome {
    let cancel = CancellationToken::new();
    pipeline(fake)
        .run(&job(), Vec::new(), sink, &cancel, RETRY_BASE)
        .await
}

pub fn pipeline(fake: &FakeUpstream) -> Pipeline {
    let file: FileConfig = toml::from_str("[retry]\nbase_ms = 10\ncap_ms = 50\n").unwrap();
    let url = fake.base_url();
    let config = file
        .resolve(&|k| (k == "FUSION_UPSTREAM_URL").then(|| url.clone()))
        .unwrap();
    let upstream = Arc::new(Upstream::new(config.upstream.clone()).unwrap());
    Pipeline::new(&config, upstream, Arc::new(SystemClock))
}

/// A job with panel `a`, `b` and analyst `judge`, claimed once.
fn job() -> Job {
    let mut job = new_job().into_queued();
    job.attempt = 1;
    job
}

/// A new job with panel `a`, `b` and analyst `judge`.
pub fn new_job() -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        spec: JobSpec {
            model: "fusion".into(),
            messages: vec![json!({"role": "user", "content": "Why is the sky blue?"})],
            panel: vec!["a".into(), "b".into()],
            analyst: "judge".into(),
            temperature: None,
            max_completion_tokens: None,
            min_panel: 1,
            panel_timeout_ms: None,
            response_format: None,
            stop: None,
        },
        metadata: json!({}),
        priority: 0,
        max_attempts: 3,
        deadline_at: None,
        idempotency_key: None,
        request_hash: None,
        created_at: now_ms(),
    }
}

#[tokio::test]
async fn the_next_call_does_not_wait_for_the_checkpoint_before_it() {
    let fake = FakeUpstream::start().await;
    // Writes take 1.5 s each and the fake answers at once: a call that waited for a write
    // would start at least that late, so the 1 s margins below leave room for a loaded machine.
    let sink = SlowSink::new(1500, false);
    let outcome = run_anew(&fake, &sink).await;
    let finished = now_ms();
    let Outcome::Succeeded {
        last_step: Some(last),
        ..
    } = outcome
    else {
        panic!("expected a success carrying its final step: {outcome:?}");
    };
    assert_eq!(last.key, StepKey::Final);

    let panel = sink.writes("panel");
    let analysis = &sink.writes("analysis")[0];
    assert_eq!(panel.len(), 2, "{panel:?}");
    let panel_landed = panel.iter().map(|w| w.landed).max().unwrap();
    // Each call started while the write before it was still under way...
    let analysis_call = fake.starts("judge", Kind::Analysis)[0];
    let final_call = fake.starts("judge", Kind::Final)[0];
    assert!(
        analysis_call < panel_landed - 1000,
        "the analysis call ({analysis_call}) waited for the panel's checkpoints ({panel_landed})"
    );
    assert!(
        final_call < analysis.landed - 1000,
        "the final call ({final_call}) waited for the analysis checkpoint ({})",
        analysis.landed
    );
    // Nor for the panel's: the analysis checkpoint queues behind them, the calls do not.
    assert!(
        final_call < panel_landed - 1000,
        "the final call ({final_call}) waited for the panel's checkpoints ({panel_landed})"
    );
    // ...but a step is written only after the steps it builds on, and the outcome comes back
    // only after every write landed. The final step is not written here: it goes back with the
    // outcome, for the worker to write in the outcome's commit.
    assert!(analysis.started >= panel_landed, "{:?}", sink.log);
    assert!(finished >= analysis.landed);
    assert!(sink.writes("final").is_empty(), "{:?}", sink.log);
}

#[tokio::test]
async fn a_failed_checkpoint_abandons_the_call_under_way() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "judge",
        Kind::Analysis,
        vec![Reply::Delay(10_000, Box::new(Reply::Ok))],
    );
    let sink = SlowSink::new(300, true);
    let started = now_ms();
    let outcome = run_anew(&fake, &sink).await;
    let took = now_ms() - started;
    assert_eq!(outcome, Outcome::Stopped);
    // Well under the analysis call's 10 s: it was dropped, not waited for.
    assert!(took < 5_000, "stopping took {took} ms");
    // The analysis call had started while the panel was being written; it was dropped when the
    // write failed, and nothing after it was written.
    assert_eq!(fake.calls("judge", Kind::Analysis), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fake.aborted("judge", Kind::Analysis) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.aborted("judge", Kind::Analysis), 1);
    assert!(sink.writes("analysis").is_empty() && sink.writes("final").is_empty());
    assert_eq!(fake.calls("judge", Kind::Final), 0);
}

/// Keeps a copy of every step it is given.
#[derive(Default)]
struct KeepSink(Mutex<Vec<Step>>);

#[async_trait]
impl Checkpoints for KeepSink {
    async fn save(&self, step: &Step) -> Result<(), Lost> {
        self.0.lock().unwrap().push(step.clone());
        Ok(())
    }
}

#[tokio::test]
async fn the_result_says_why_the_answer_ended_and_a_resumed_run_says_it_again() {
    let fake = FakeUpstream::start().await;
    fake.script("judge", Kind::Final, vec![Reply::Cut("half an ans".into())]);
    let job = job();
    let sink = KeepSink::default();
    let cancel = CancellationToken::new();
    let outcome = pipeline(&fake)
        .run(&job, Vec::new(), &sink, &cancel, RETRY_BASE)
        .await;
    let Outcome::Succeeded {
        result,
        last_step: Some(last),
    } = outcome
    else {
        panic!("expected a success carrying its final step: {outcome:?}");
    };
    let result = result.to_value();
    assert_eq!(result["id"], format!("fusion-{}", job.id));
    assert_eq!(result["object"], "chat.completion");
    assert_eq!(result["model"], "fusion");
    assert_eq!(
        result["choices"][0]["message"],
        json!({"role": "assistant", "content": "half an ans"})
    );
    assert_eq!(result["choices"][0]["finish_reason"], "length");
    assert_eq!(result["usage"]["total_tokens"], 60);

    // The checkpoints hold what a later attempt builds on: the analysis, and why the answer ended.
    let mut done = sink.0.lock().unwrap().clone();
    let analysis = done.iter().find(|s| s.key == StepKey::Analysis).unwrap();
    let analysis = analysis.data.as_ref().unwrap().to_value();
    assert_eq!(analysis["blind_spots"], json!(["other planets"]));
    done.push(last);
    let again = pipeline(&fake)
        .run(&job, done, &KeepSink::default(), &cancel, RETRY_BASE)
        .await;
    let Outcome::Succeeded {
        result: again,
        last_step: None,
    } = again
    else {
        panic!("expected a success from the checkpoints alone: {again:?}");
    };
    assert_eq!(again.to_value()["choices"], result["choices"]);
    assert_eq!(
        fake.starts("judge", Kind::Final).len(),
        1,
        "no call was made again"
    );
}
