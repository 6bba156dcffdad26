//! The `Store` contract: the same suite runs against SQLite (a fresh file per test) and against
//! Postgres (a fresh database per test, created from `TEST_DATABASE_URL`).
//!
//! Every contract test is an `async fn name(store: Arc<dyn Store>)`; `contract_tests!` turns each
//! one into `sqlite::name` and `postgres::name`. Times are explicit unix milliseconds, so lease
//! expiry is tested without sleeping.
//!
//! Without `TEST_DATABASE_URL` the Postgres tests print `skipped: TEST_DATABASE_URL not set` and
//! pass — unless `CI` is set, where they fail: CI must never skip them silently.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fusion::job::{
    Job, JobSpec, JobStatus, JsonText, Lease, ListFilter, NewJob, SUPERSEDED, StartHere, Step,
    StepKey, Usage,
};
use fusion::store::{CancelOutcome, Enqueued, Held, JobEvent, Progress, RetryOutcome, Store};
use fusion::testing::ScratchDatabase;
use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Generates `sqlite::$name` and `postgres::$name` for every contract fn `$name`.
macro_rules! contract_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::SqliteDb::create().await;
                    super::$name(db.store.clone()).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::PgDb::create().await else {
                        return;
                    };
                    super::$name(db.store.clone()).await;
                }
            )+
        }
    };
}

/// A migrated SQLite store in its own temporary directory (removed on drop, after the store).
struct SqliteDb {
    store: Arc<dyn Store>,
    _dir: TempDir,
}

impl SqliteDb {
    async fn create() -> SqliteDb {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("fusion.db");
        let url = format!("sqlite://{}", path.display());
        let store = fusion::store::connect(&url)
            .await
            .expect("connect sqlite store");
        store.migrate().await.expect("migrate sqlite store");
        SqliteDb { store, _dir: dir }
    }
}

/// A migrated Postgres store on a database of its own, dropped (best effort) when this is.
struct PgDb {
    store: Arc<dyn Store>,
    // Declared after `store`, so dropped after it.
    _database: ScratchDatabase,
}

impl PgDb {
    /// `None` when Postgres tests are to be skipped (no `TEST_DATABASE_URL`, not on CI).
    async fn create() -> Option<PgDb> {
        let database = ScratchDatabase::from_env("fusion_test").await?;
        // From here on the database is dropped even if connecting or migrating panics.
        let store = fusion::store::connect(&database.url)
            .await
            .expect("connect postgres store");
        store.migrate().await.expect("migrate postgres store");
        Some(PgDb {
            store,
            _database: database,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The fixed "current time" of every test (unix ms).
const NOW: i64 = 1_750_000_000_000;
const LEASE: Duration = Duration::from_secs(30);
const LEASE_MS: i64 = 30_000;

fn spec(tag: &str) -> JobSpec {
    JobSpec {
        model: "fusion/budget".to_string(),
        messages: vec![
            json!({"role": "system", "content": "Be concise."}),
            json!({"role": "user", "content": [
                {"type": "text", "text": format!("question {tag} — ünïcödé ✓ \"quoted\"")},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ]}),
        ],
        panel: vec![
            "openai/gpt-4o-mini".to_string(),
            "anthropic/claude-3-haiku".to_string(),
            "openai/gpt-4o-mini".to_string(),
        ],
        analyst: "openai/gpt-4o".to_string(),
        temperature: Some(0.7),
        max_completion_tokens: Some(1024),
        min_panel: 2,
        panel_timeout_ms: Some(15_000),
        response_format: Some(json!({"type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}}})),
        stop: Some(json!(["\n\nQ:", "END"])),
    }
}

/// A fresh job (new UUIDv7 id), runnable from `NOW - 1s`, with no idempotency key.
fn new_job() -> NewJob {
    let id = Uuid::now_v7();
    NewJob {
        id,
        spec: spec(&id.to_string()),
        metadata: json!({
            "user": "alice",
            "tags": ["a", "b"],
            "score": 0.25,
            "nested": {"n": 42, "flag": true, "none": null}
        }),
        priority: 0,
        max_attempts: 3,
        deadline_at: None,
        idempotency_key: None,
        request_hash: None,
        created_at: NOW - 1_000,
    }
}

fn new_job_at(priority: i32, created_at: i64) -> NewJob {
    NewJob {
        priority,
        created_at,
        ..new_job()
    }
}

/// The job `enqueue` must create from `new`.
fn queued(new: &NewJob) -> Job {
    Job {
        id: new.id,
        status: JobStatus::Queued,
        spec: new.spec.clone(),
        metadata: new.metadata.clone(),
        priority: new.priority,
        attempt: 0,
        max_attempts: new.max_attempts,
        run_at: new.created_at,
        deadline_at: new.deadline_at,
        lease_owner: None,
        lease_expires_at: None,
        idempotency_key: new.idempotency_key.clone(),
        request_hash: new.request_hash.clone(),
        created_at: new.created_at,
        started_at: None,
        finished_at: None,
        failure_reason: None,
        error: None,
        result: None,
    }
}

async fn enqueue(store: &Arc<dyn Store>, new: NewJob) -> Job {
    match store.enqueue(new, None).await.expect("enqueue") {
        Enqueued::Created(job) => job,
        other => panic!("expected Enqueued::Created, got {other:?}"),
    }
}

async fn get(store: &Arc<dyn Store>, id: Uuid) -> Job {
    store
        .get_job(id)
        .await
        .expect("get_job")
        .unwrap_or_else(|| panic!("job {id} not found"))
}

/// `Store::claim` with the test lease, keeping just the jobs.
async fn claim(store: &Arc<dyn Store>, owner: &str, limit: u32, now: i64) -> Vec<Job> {
    let claimed = store.claim(owner, limit, now, LEASE).await.expect("claim");
    claimed.into_iter().map(|c| c.job).collect()
}

/// Claim exactly one job for `owner` at `now`.
async fn claim_one(store: &Arc<dyn Store>, owner: &str, now: i64) -> Job {
    let mut jobs = claim(store, owner, 1, now).await;
    assert_eq!(jobs.len(), 1, "expected to claim exactly one job");
    jobs.pop().unwrap()
}

fn lease_of(job: &Job) -> Lease {
    job.lease().expect("a claimed job has a lease")
}

fn step_n(key: StepKey) -> i64 {
    match key {
        StepKey::Panel(i) => i64::from(i),
        StepKey::Analysis => 100,
        StepKey::Final => 200,
    }
}

/// A successful step checkpoint whose every field depends on `key`.
fn ok_step(key: StepKey, attempt: i32) -> Step {
    let n = step_n(key);
    Step {
        key,
        model: format!("model/{}", key.to_db()),
        ok: true,
        content: Some(format!("answer of {} — ünïcödé ✓\nline 2", key.to_db())),
        data: None,
        usage: Usage {
            prompt_tokens: 1_000 + n,
            completion_tokens: 200 + n,
            total_tokens: 1_200 + 2 * n,
            cost: 0.000_137 * (n + 1) as f64,
        },
        latency_ms: 1_500 + n,
        error_code: None,
        error: None,
        status_code: None,
        attempt,
        created_at: NOW + n,
    }
}

/// A failed step checkpoint, with every error field set.
fn failed_step(key: StepKey, attempt: i32) -> Step {
    let n = step_n(key);
    Step {
        key,
        model: format!("model/{}", key.to_db()),
        ok: false,
        content: None,
        data: None,
        usage: Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost: 0.0,
        },
        latency_ms: 30_000 + n,
        error_code: Some("rate_limited".to_string()),
        error: Some("upstream said 429: slow down".to_string()),
        status_code: Some(429),
        attempt,
        created_at: NOW + n,
    }
}

fn analysis_step(attempt: i32) -> Step {
    Step {
        data: Some(
            json!({
                "agreement": 0.75,
                "claims": [
                    {"text": "water boils at 100 °C", "support": [0, 2], "confidence": 0.9},
                    {"text": "it depends on pressure", "support": [1], "confidence": 1e-3}
                ],
                "notes": null,
                "big": 9_007_199_254_740_993u64,
                "negative": -12,
                "empty": {}
            })
            .into(),
        ),
        ..ok_step(StepKey::Analysis, attempt)
    }
}

/// Claim a job under `old-worker` with a 30s lease at NOW (saving one step under it), let the
/// lease expire, rescue it and have `new-worker` claim it. Returns (old lease, new lease).
async fn expire_and_reclaim(store: &Arc<dyn Store>) -> (Lease, Lease) {
    let job = enqueue(store, new_job()).await;
    let claimed = claim_one(store, "old-worker", NOW).await;
    assert_eq!(claimed.id, job.id);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.lease_expires_at, Some(NOW + LEASE_MS));
    let old = lease_of(&claimed);
    assert!(
        store
            .save_step(&old, &ok_step(StepKey::Panel(0), 1))
            .await
            .unwrap()
    );

    // Still within the lease: nothing to rescue, nothing changes.
    assert_eq!(store.rescue_expired(NOW + 10_000).await.unwrap(), 0);
    assert_eq!(get(store, job.id).await, claimed);

    // Past the lease: requeued, keeping the attempt count and its checkpoints, and saying why
    // it is being retried (an earlier attempt's reason would say something else).
    assert_eq!(store.rescue_expired(NOW + 31_000).await.unwrap(), 1);
    let requeued = get(store, job.id).await;
    let why = (
        Some("lease_expired".to_string()),
        Some("the worker holding the job stopped renewing its lease; requeued".to_string()),
    );
    assert_eq!(
        requeued,
        Job {
            status: JobStatus::Queued,
            lease_owner: None,
            lease_expires_at: None,
            run_at: NOW + 31_000,
            failure_reason: why.0.clone(),
            error: why.1.clone(),
            ..claimed.clone()
        }
    );
    assert_eq!(store.rescue_expired(NOW + 31_000).await.unwrap(), 0);

    let reclaimed = claim_one(store, "new-worker", NOW + 32_000).await;
    assert_eq!(
        reclaimed,
        Job {
            status: JobStatus::Running,
            attempt: 2,
            lease_owner: Some("new-worker".to_string()),
            lease_expires_at: Some(NOW + 32_000 + LEASE_MS),
            // The first claim's start is kept.
            started_at: Some(NOW),
            ..requeued
        }
    );
    (old, lease_of(&reclaimed))
}

// ---------------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------------

contract_tests!(
    enqueue_get_round_trip,
    idempotency,
    claim_order_and_limit,
    many_priorities_are_claimed_in_order,
    a_lost_claim_is_released_by_its_lease_end,
    claim_race,
    heartbeat_extends_only_owned_running_jobs,
    heartbeat_renews_only_the_jobs_named,
    lease_expiry_requeues,
    stale_worker_is_fenced_out,
    save_step_round_trip_order_and_no_overwrite,
    max_attempts_then_lease_expired,
    cancel_outcomes,
    retry_failed_keeps_ok_steps,
    retry_failed_counts_the_deadline_again,
    release_does_not_spend_attempt,
    list_jobs_order_filter_paging,
    complete_fail_and_retry_later_outcomes,
    enqueue_wakes_workers,
    checkpoints_do_not_wake_workers,
    only_requeues_due_now_wake_workers,
    every_finish_is_announced,
    a_claim_says_whether_the_job_has_checkpoints,
    concurrent_writes_each_get_their_own_result,
    nul_characters_never_break_a_write,
    the_last_step_lands_with_the_outcome,
    a_job_can_start_at_its_enqueue,
    a_failed_write_leaves_its_batch_and_the_store_working,
    a_request_finds_its_newest_job_since_a_time,
    progress_of_many_jobs_in_one_read,
    a_cancel_given_up_midway_is_still_announced,
);

/// Where each of many jobs stands, in one read: status, attempt, how many checkpoints and when
/// the latest was written; a job that does not exist is left out.
async fn progress_of_many_jobs_in_one_read(store: Arc<dyn Store>) {
    enqueue(&store, new_job()).await;
    let running = claim_one(&store, "w", NOW).await;
    let queued = enqueue(&store, new_job()).await;
    let lease = lease_of(&running);
    for key in [StepKey::Panel(1), StepKey::Panel(0)] {
        assert!(store.save_step(&lease, &ok_step(key, 1)).await.unwrap());
    }
    let missing = Uuid::now_v7();
    let mut read = store
        .progress(&[queued.id, running.id, missing])
        .await
        .unwrap();
    read.sort_by_key(|p| p.id);
    let mut expected = vec![
        Progress {
            id: queued.id,
            status: JobStatus::Queued,
            attempt: 0,
            steps: 0,
            last_step_at: None,
        },
        Progress {
            id: running.id,
            status: JobStatus::Running,
            attempt: 1,
            steps: 2,
            last_step_at: Some(ok_step(StepKey::Panel(1), 1).created_at),
        },
    ];
    expected.sort_by_key(|p| p.id);
    assert_eq!(read, expected);
    assert_eq!(store.progress(&[]).await.unwrap(), vec![]);
}

/// An SDK's retry finds the job its first try made: the newest with the request's hash at or
/// after the time given, keyed or not, that is queued or running or finished since the second
/// time given; none for another hash, or none that recent. A newer job finished too long ago
/// does not hide an older one still queued.
async fn a_request_finds_its_newest_job_since_a_time(store: Arc<dyn Store>) {
    let with = |hash: &str, created_at: i64| NewJob {
        request_hash: Some(hash.to_string()),
        ..new_job_at(0, created_at)
    };
    let older = enqueue(&store, with("h", NOW)).await;
    let newer = enqueue(&store, with("h", NOW + 1_000)).await;
    let keyed = NewJob {
        idempotency_key: Some("k".into()),
        ..with("g", NOW + 2_000)
    };
    let keyed = enqueue(&store, keyed).await;
    enqueue(&store, new_job_at(0, NOW + 3_000)).await;

    let found = |hash: &'static str, since: i64, finished_since: i64| {
        let store = store.clone();
        async move {
            let job = store.find_by_request(hash, since, finished_since).await;
            job.unwrap().map(|j| j.id)
        }
    };
    assert_eq!(found("h", NOW - 1, NOW).await, Some(newer.id));
    assert_eq!(found("h", NOW + 1_000, NOW).await, Some(newer.id));
    assert_eq!(found("h", NOW + 1_001, NOW).await, None);
    assert_eq!(found("g", 0, NOW).await, Some(keyed.id));
    assert_eq!(found("x", 0, NOW).await, None);

    let cancelled = store.cancel(newer.id, NOW + 5_000).await.unwrap();
    assert!(
        matches!(cancelled, CancelOutcome::Cancelled { .. }),
        "{cancelled:?}"
    );
    assert_eq!(found("h", NOW - 1, NOW + 5_000).await, Some(newer.id));
    assert_eq!(found("h", NOW - 1, NOW + 5_001).await, Some(older.id));
}

/// Model output and user input may contain NUL, which Postgres text and JSONB reject: the write
/// must still succeed (Postgres stores U+FFFD in its place), or the job would retry forever.
async fn nul_characters_never_break_a_write(store: Arc<dyn Store>) {
    let mut new = new_job();
    new.spec.messages = vec![json!({"role": "user", "content": "a\u{0}b"})];
    new.spec.response_format = Some(json!({"type": "json_schema", "json_schema":
        {"name": "n", "schema": {"description": "d\u{0}"}}}));
    new.metadata = json!({"k\u{0}": "v\u{0}"});
    let job = enqueue(&store, new).await;
    let lease = lease_of(&claim(&store, "w", 1, NOW).await[0]);
    let step = Step {
        content: Some("x\u{0}y".into()),
        error: Some("e\u{0}".into()),
        data: Some(json!({"s": "\u{0}"}).into()),
        ..ok_step(StepKey::Panel(0), 1)
    };
    assert!(store.save_step(&lease, &step).await.unwrap());
    let saved = store.get_steps(job.id).await.unwrap();
    let content = saved[0].content.as_deref().unwrap();
    assert!(
        content == "x\u{0}y" || content == "x\u{FFFD}y",
        "{content:?}"
    );
    assert!(
        store
            .complete(&lease, None, &json!({"c": "\u{0}"}).into(), NOW)
            .await
            .unwrap()
    );
    let done = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    let text = done.spec.messages[0]["content"].as_str().unwrap();
    assert!(text == "a\u{0}b" || text == "a\u{FFFD}b", "{text:?}");
    let format = done.spec.response_format.unwrap();
    let said = format["json_schema"]["schema"]["description"]
        .as_str()
        .unwrap();
    assert!(said == "d\u{0}" || said == "d\u{FFFD}", "{said:?}");
}

/// 1. What goes in comes out, field for field.
async fn enqueue_get_round_trip(store: Arc<dyn Store>) {
    store.ping().await.unwrap();

    let full = NewJob {
        priority: -7,
        max_attempts: 5,
        deadline_at: Some(NOW + 600_000),
        idempotency_key: Some("idem-1".to_string()),
        request_hash: Some("sha256:abc".to_string()),
        ..new_job()
    };
    let expected = queued(&full);
    assert_eq!(enqueue(&store, full.clone()).await, expected);
    assert_eq!(store.get_job(full.id).await.unwrap(), Some(expected));

    let plain = NewJob {
        metadata: json!({}),
        spec: JobSpec {
            temperature: None,
            max_completion_tokens: None,
            panel_timeout_ms: None,
            response_format: None,
            stop: None,
            ..spec("plain")
        },
        ..new_job_at(3, NOW)
    };
    let expected = queued(&plain);
    assert_eq!(enqueue(&store, plain.clone()).await, expected);
    assert_eq!(store.get_job(plain.id).await.unwrap(), Some(expected));

    assert_eq!(store.get_job(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(
        store.job_status(full.id).await.unwrap(),
        Some(JobStatus::Queued)
    );
    assert_eq!(store.job_status(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(store.get_steps(full.id).await.unwrap(), Vec::<Step>::new());
    assert_eq!(
        store.get_steps(Uuid::now_v7()).await.unwrap(),
        Vec::<Step>::new()
    );
}

/// 2. Same key + same hash → the earlier job; same key + other hash → KeyReused; no key → new.
async fn idempotency(store: Arc<dyn Store>) {
    let first = NewJob {
        idempotency_key: Some("key-A".to_string()),
        request_hash: Some("hash-1".to_string()),
        ..new_job()
    };
    let original = enqueue(&store, first.clone()).await;
    assert_eq!(original, queued(&first));

    // A true repeat: a new id and a later time, same key and hash.
    let repeat = NewJob {
        id: Uuid::now_v7(),
        created_at: NOW + 5_000,
        ..first.clone()
    };
    match store.enqueue(repeat.clone(), None).await.unwrap() {
        Enqueued::Existing(job) => assert_eq!(job, original),
        other => panic!("expected Existing, got {other:?}"),
    }
    assert_eq!(store.get_job(repeat.id).await.unwrap(), None);

    // The key reused for another request.
    let reused = NewJob {
        id: Uuid::now_v7(),
        request_hash: Some("hash-2".to_string()),
        spec: spec("other"),
        ..first.clone()
    };
    match store.enqueue(reused.clone(), None).await.unwrap() {
        Enqueued::KeyReused(job) => assert_eq!(job, original),
        other => panic!("expected KeyReused, got {other:?}"),
    }
    assert_eq!(store.get_job(reused.id).await.unwrap(), None);

    // The earlier job is untouched by either.
    assert_eq!(get(&store, first.id).await, original);

    // No key: always a new job, even for identical requests.
    let a = NewJob {
        request_hash: Some("hash-1".to_string()),
        ..new_job()
    };
    let b = NewJob {
        id: Uuid::now_v7(),
        ..a.clone()
    };
    assert_eq!(enqueue(&store, a.clone()).await, queued(&a));
    assert_eq!(enqueue(&store, b.clone()).await, queued(&b));
    assert_ne!(a.id, b.id);

    // A different key is a different job.
    let other_key = NewJob {
        idempotency_key: Some("key-B".to_string()),
        request_hash: Some("hash-1".to_string()),
        ..new_job()
    };
    assert_eq!(enqueue(&store, other_key.clone()).await, queued(&other_key));

    let all = store
        .list_jobs(&ListFilter {
            limit: 100,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let ids: Vec<Uuid> = all.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![other_key.id, b.id, a.id, first.id]);
}

/// 3. Highest priority first, then earliest run_at; future jobs wait; claim fills the lease.
async fn claim_order_and_limit(store: Arc<dyn Store>) {
    let low = enqueue(&store, new_job_at(0, NOW - 3_000)).await;
    let high_late = enqueue(&store, new_job_at(5, NOW - 1_000)).await;
    let high_early = enqueue(&store, new_job_at(5, NOW - 2_000)).await;
    let future = enqueue(&store, new_job_at(10, NOW + 60_000)).await;
    let lowest = enqueue(&store, new_job_at(-1, NOW - 5_000)).await;
    let due_now = enqueue(&store, new_job_at(-1, NOW)).await;

    let running = |job: &Job, owner: &str, now: i64| Job {
        status: JobStatus::Running,
        attempt: 1,
        lease_owner: Some(owner.to_string()),
        lease_expires_at: Some(now + LEASE_MS),
        started_at: Some(now),
        ..job.clone()
    };

    let first = claim(&store, "w1", 2, NOW).await;
    assert_eq!(
        first,
        vec![
            running(&high_early, "w1", NOW),
            running(&high_late, "w1", NOW)
        ]
    );

    let second = claim(&store, "w2", 10, NOW).await;
    assert_eq!(
        second,
        vec![
            running(&low, "w2", NOW),
            running(&lowest, "w2", NOW),
            running(&due_now, "w2", NOW),
        ]
    );
    for job in first.iter().chain(&second) {
        assert_eq!(&get(&store, job.id).await, job);
    }

    // Only the future job is left, and it is not runnable yet.
    assert_eq!(claim(&store, "w3", 10, NOW).await, vec![]);
    assert_eq!(claim(&store, "w3", 10, NOW + 59_999).await, vec![]);
    assert_eq!(get(&store, future.id).await, future);

    let later = NOW + 60_000;
    let third = claim(&store, "w3", 10, later).await;
    assert_eq!(third, vec![running(&future, "w3", later)]);
    assert_eq!(claim(&store, "w4", 10, later).await, vec![]);
}

/// Priorities used as a fine-grained order (more levels than Postgres's claim steps through one
/// by one, migration 0010), each with a job due and one not: claims take the due ones, highest
/// priority first, and only those.
async fn many_priorities_are_claimed_in_order(store: Arc<dyn Store>) {
    let mut due = Vec::new();
    for priority in 0..100 {
        enqueue(&store, new_job_at(priority, NOW + 60_000)).await;
        due.push(enqueue(&store, new_job_at(priority, NOW - 1_000)).await.id);
    }
    due.reverse();
    let ids = |jobs: Vec<Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(claim(&store, "w", 30, NOW).await), due[..30]);
    assert_eq!(ids(claim(&store, "w", 200, NOW).await), due[30..]);
    assert_eq!(claim(&store, "w", 10, NOW).await, vec![]);
}

/// A claim whose answer was lost is handed back by its owner and exact lease end: the jobs it
/// took are queued again with one more attempt allowed; the owner's jobs under another lease,
/// and another owner's under the same one, run on.
async fn a_lost_claim_is_released_by_its_lease_end(store: Arc<dyn Store>) {
    let lost: Vec<Job> = vec![
        enqueue(&store, new_job_at(0, NOW - 3_000)).await,
        enqueue(&store, new_job_at(0, NOW - 2_000)).await,
    ];
    let later = enqueue(&store, new_job_at(0, NOW - 1_000)).await;
    let other = enqueue(&store, new_job_at(0, NOW - 500)).await;
    assert_eq!(claim(&store, "w", 2, NOW).await.len(), 2);
    assert_eq!(claim(&store, "w", 1, NOW + 1).await.len(), 1);
    assert_eq!(claim(&store, "v", 1, NOW).await.len(), 1);
    let released = store.release_claim("w", NOW + LEASE_MS).await.unwrap();
    assert_eq!(released, 2);
    for job in &lost {
        let back = get(&store, job.id).await;
        assert_eq!(
            (back.status, back.lease_owner, back.max_attempts),
            (JobStatus::Queued, None, job.max_attempts + 1)
        );
    }
    for (job, owner) in [(&later, "w"), (&other, "v")] {
        let running = get(&store, job.id).await;
        assert_eq!(running.status, JobStatus::Running);
        assert_eq!(running.lease_owner.as_deref(), Some(owner));
    }
    assert_eq!(store.release_claim("w", NOW + LEASE_MS).await.unwrap(), 0);
}

/// 4. Eight claimers racing over 200 jobs: every job claimed exactly once.
async fn claim_race(store: Arc<dyn Store>) {
    const JOBS: usize = 200;
    const CLAIMERS: usize = 8;
    let mut enqueued = HashSet::new();
    for i in 0..JOBS {
        let job = enqueue(&store, new_job_at((i % 3) as i32, NOW - 1_000)).await;
        enqueued.insert(job.id);
    }

    let mut tasks = Vec::new();
    for i in 0..CLAIMERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("racer-{i}");
            let mut got = Vec::new();
            loop {
                let batch = claim(&store, &owner, 7, NOW).await;
                if batch.is_empty() {
                    break;
                }
                assert!(batch.len() <= 7, "claim returned {} > 7 jobs", batch.len());
                for job in &batch {
                    assert_eq!(job.status, JobStatus::Running);
                    assert_eq!(job.attempt, 1);
                    assert_eq!(job.lease_owner.as_deref(), Some(owner.as_str()));
                }
                got.extend(batch.into_iter().map(|j| j.id));
            }
            (owner, got)
        }));
    }

    let mut owner_of: BTreeMap<Uuid, String> = BTreeMap::new();
    let mut total = 0;
    for task in tasks {
        let (owner, got) = task.await.expect("claimer task");
        total += got.len();
        for id in got {
            if let Some(previous) = owner_of.insert(id, owner.clone()) {
                panic!("job {id} claimed twice: by {previous} and by {owner}");
            }
        }
    }
    assert_eq!(total, JOBS);
    assert_eq!(owner_of.len(), JOBS);
    assert_eq!(owner_of.keys().copied().collect::<HashSet<_>>(), enqueued);

    // The database agrees with what each claimer was told.
    for (id, owner) in &owner_of {
        let job = get(&store, *id).await;
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.lease_owner.as_ref(), Some(owner));
    }
    assert_eq!(claim(&store, "late", 100, NOW).await, vec![]);
}

/// 5. Heartbeats renew only the owner's running jobs and report them.
async fn heartbeat_extends_only_owned_running_jobs(store: Arc<dyn Store>) {
    for _ in 0..4 {
        enqueue(&store, new_job()).await;
    }
    let mine = claim(&store, "me", 3, NOW).await;
    assert_eq!(mine.len(), 3);
    let theirs = claim_one(&store, "them", NOW).await;

    // One of mine finishes, one is cancelled: neither is held any more.
    assert!(
        store
            .complete(
                &lease_of(&mine[0]),
                None,
                &json!({"ok": 1}).into(),
                NOW + 1_000
            )
            .await
            .unwrap()
    );
    assert!(matches!(
        store.cancel(mine[1].id, NOW + 1_000).await.unwrap(),
        CancelOutcome::Cancelled {
            was_running: true,
            ..
        }
    ));

    let beat_at = NOW + 20_000;
    let lease = Duration::from_secs(60);
    let named: Vec<(Uuid, i32)> = mine
        .iter()
        .chain([&theirs])
        .map(|j| (j.id, j.attempt))
        .collect();
    let held = store.heartbeat("me", &named, beat_at, lease).await.unwrap();
    assert_eq!(
        held,
        vec![Held {
            id: mine[2].id,
            attempt: 1
        }]
    );
    assert_eq!(
        get(&store, mine[2].id).await,
        Job {
            lease_expires_at: Some(beat_at + 60_000),
            ..mine[2].clone()
        }
    );
    // Other owners' leases are untouched, and so are finished jobs.
    assert_eq!(get(&store, theirs.id).await, theirs);
    assert_eq!(get(&store, mine[0].id).await.lease_expires_at, None);
    assert_eq!(get(&store, mine[1].id).await.lease_expires_at, None);

    // The renewed lease outlives the original one.
    assert_eq!(store.rescue_expired(NOW + 31_000).await.unwrap(), 1);
    assert_eq!(get(&store, theirs.id).await.status, JobStatus::Queued);
    assert_eq!(get(&store, mine[2].id).await.status, JobStatus::Running);

    // Several held jobs: each reported once with its attempt (order is not part of the contract).
    let more = enqueue(&store, new_job()).await;
    assert_eq!(claim_one(&store, "me", NOW + 31_000).await.id, more.id);
    let mut held = store
        .heartbeat("me", &[(mine[2].id, 1), (more.id, 1)], NOW + 32_000, lease)
        .await
        .unwrap();
    held.sort_by_key(|h| h.id);
    let mut expected = vec![
        Held {
            id: mine[2].id,
            attempt: 1,
        },
        Held {
            id: more.id,
            attempt: 1,
        },
    ];
    expected.sort_by_key(|h| h.id);
    assert_eq!(held, expected);
    assert_eq!(
        store
            .heartbeat("nobody", &named, beat_at, lease)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        store
            .heartbeat("them", &named, beat_at, lease)
            .await
            .unwrap(),
        vec![]
    );
    let reclaimed = claim_one(&store, "them", NOW + 32_000).await;
    assert_eq!(reclaimed.id, theirs.id);
    assert_eq!(
        store
            .heartbeat("them", &[(theirs.id, 2)], NOW + 33_000, LEASE)
            .await
            .unwrap(),
        vec![Held {
            id: theirs.id,
            attempt: 2
        }]
    );
}

/// 5b. A job its owner still holds but did not name is not renewed: a process that stopped
/// running a job without writing its outcome lets the lease run out, and the job is rescued.
async fn heartbeat_renews_only_the_jobs_named(store: Arc<dyn Store>) {
    for _ in 0..2 {
        enqueue(&store, new_job()).await;
    }
    let held = claim(&store, "me", 2, NOW).await;
    assert_eq!(held.len(), 2);
    let (named, left) = (&held[0], &held[1]);
    let renewed = store
        .heartbeat("me", &[(named.id, named.attempt)], NOW + 20_000, LEASE)
        .await
        .unwrap();
    assert_eq!(
        renewed,
        vec![Held {
            id: named.id,
            attempt: 1
        }]
    );
    let expires = |job: Job| job.lease_expires_at;
    assert_eq!(
        expires(get(&store, named.id).await),
        Some(NOW + 20_000 + LEASE_MS)
    );
    assert_eq!(expires(get(&store, left.id).await), Some(NOW + LEASE_MS));
    // Past the first lease only the job left out is rescued.
    assert_eq!(store.rescue_expired(NOW + LEASE_MS + 1).await.unwrap(), 1);
    assert_eq!(get(&store, left.id).await.status, JobStatus::Queued);
    assert_eq!(get(&store, named.id).await.status, JobStatus::Running);
    // Claimed again by the same owner (whose process may still wind its first attempt down,
    // the claim's answer lost): a heartbeat naming the first attempt does not renew the
    // second, whose claim's lease end is what hands it back.
    let again = claim_one(&store, "me", NOW + LEASE_MS + 2).await;
    assert_eq!((again.id, again.attempt), (left.id, 2));
    let later = NOW + LEASE_MS + 5_000;
    assert_eq!(
        store
            .heartbeat("me", &[(left.id, 1)], later, LEASE)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(get(&store, left.id).await, again);
    assert_eq!(
        store
            .heartbeat("me", &[(left.id, 2)], later, LEASE)
            .await
            .unwrap(),
        vec![Held {
            id: left.id,
            attempt: 2
        }]
    );
}

/// 6. An expired lease is requeued by the rescuer; the next claim is attempt 2.
async fn lease_expiry_requeues(store: Arc<dyn Store>) {
    let (old, new) = expire_and_reclaim(&store).await;
    assert_eq!(old.job_id, new.job_id);
    assert_eq!((old.attempt, old.owner.as_str()), (1, "old-worker"));
    assert_eq!((new.attempt, new.owner.as_str()), (2, "new-worker"));
    // The new lease is live: nothing to rescue before it ends.
    assert_eq!(
        store.rescue_expired(NOW + 32_000 + 10_000).await.unwrap(),
        0
    );
    assert_eq!(
        store
            .heartbeat(
                "new-worker",
                &[(new.job_id, new.attempt)],
                NOW + 40_000,
                LEASE
            )
            .await
            .unwrap(),
        vec![Held {
            id: new.job_id,
            attempt: 2
        }]
    );
}

/// 7. After losing its lease, the old worker can change nothing; the new one can.
async fn stale_worker_is_fenced_out(store: Arc<dyn Store>) {
    let (old, new) = expire_and_reclaim(&store).await;
    let id = old.job_id;
    let job_before = get(&store, id).await;
    let steps_before = store.get_steps(id).await.unwrap();
    assert_eq!(steps_before, vec![ok_step(StepKey::Panel(0), 1)]);

    let t = NOW + 40_000;
    assert!(
        !store
            .save_step(&old, &ok_step(StepKey::Panel(1), 1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .complete(&old, None, &json!({"stale": true}).into(), t)
            .await
            .unwrap()
    );
    assert!(!store.fail(&old, "stale", "stale worker", t).await.unwrap());
    assert!(
        !store
            .retry_later(&old, t + 1_000, "rate_limited", "stale")
            .await
            .unwrap()
    );
    assert!(!store.release(&old).await.unwrap());
    assert_eq!(
        store
            .heartbeat("old-worker", &[(id, old.attempt)], t, LEASE)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(get(&store, id).await, job_before);
    assert_eq!(store.get_steps(id).await.unwrap(), steps_before);

    // The right attempt with the wrong owner, or the right owner with the wrong attempt.
    let forged = [
        Lease {
            owner: "old-worker".to_string(),
            ..new.clone()
        },
        Lease {
            attempt: 1,
            ..new.clone()
        },
        Lease {
            attempt: 3,
            ..new.clone()
        },
    ];
    for lease in &forged {
        assert!(
            !store
                .save_step(lease, &ok_step(StepKey::Panel(1), lease.attempt))
                .await
                .unwrap()
        );
        assert!(
            !store
                .complete(lease, None, &json!({}).into(), t)
                .await
                .unwrap()
        );
        assert!(!store.release(lease).await.unwrap());
    }
    assert_eq!(get(&store, id).await, job_before);

    // The current holder works normally.
    let step = ok_step(StepKey::Panel(1), 2);
    assert!(store.save_step(&new, &step).await.unwrap());
    // A step the old attempt saved, written again by the new one (whose claim, on Postgres, can
    // miss a step committed just as the lease was lost): the later attempt's row replaces it.
    let again = Step {
        content: Some("the second attempt's answer".to_string()),
        ..ok_step(StepKey::Panel(0), 2)
    };
    assert!(store.save_step(&new, &again).await.unwrap());
    assert_eq!(
        store.get_steps(id).await.unwrap(),
        vec![again.clone(), step.clone()]
    );
    let result = json!({"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]});
    assert!(
        store
            .complete(&new, None, &result.clone().into(), t)
            .await
            .unwrap()
    );
    assert_eq!(
        get(&store, id).await,
        Job {
            status: JobStatus::Succeeded,
            lease_owner: None,
            lease_expires_at: None,
            finished_at: Some(t),
            result: Some(result),
            // Why it was being retried, replaced as it finishes.
            failure_reason: None,
            error: None,
            ..job_before
        }
    );
    assert_eq!(store.get_steps(id).await.unwrap(), vec![again, step]);
    // And once final, the old lease is still fenced.
    assert!(!store.fail(&old, "stale", "stale", t).await.unwrap());
    assert_eq!(get(&store, id).await.status, JobStatus::Succeeded);
}

/// 8. Steps round-trip exactly, come back in `StepKey` order, and are written once.
async fn save_step_round_trip_order_and_no_overwrite(store: Arc<dyn Store>) {
    let job = enqueue(&store, new_job()).await;
    let other = enqueue(&store, new_job()).await;
    let claimed = claim(&store, "w", 2, NOW).await;
    assert_eq!(claimed.len(), 2);
    let lease = lease_of(claimed.iter().find(|j| j.id == job.id).unwrap());

    let steps = vec![
        ok_step(StepKey::Final, 1),
        ok_step(StepKey::Panel(10), 1),
        analysis_step(1),
        ok_step(StepKey::Panel(2), 1),
        failed_step(StepKey::Panel(1), 1),
        ok_step(StepKey::Panel(0), 1),
        Step {
            // Empty-but-present values must not turn into NULLs.
            content: Some(String::new()),
            data: Some(json!([]).into()),
            ..ok_step(StepKey::Panel(3), 1)
        },
    ];
    for step in &steps {
        assert!(
            store.save_step(&lease, step).await.unwrap(),
            "save {:?}",
            step.key
        );
    }
    let mut expected = steps.clone();
    expected.sort_by_key(|s| s.key);
    assert_eq!(
        expected.iter().map(|s| s.key.to_db()).collect::<Vec<_>>(),
        [
            "panel:0", "panel:1", "panel:2", "panel:3", "panel:10", "analysis", "final"
        ]
    );
    assert_eq!(store.get_steps(job.id).await.unwrap(), expected);
    // Their heads: the same steps in the same order, every field but the texts read.
    let heads: Vec<Step> = expected.iter().cloned().map(Step::head).collect();
    assert_eq!(store.step_heads(job.id).await.unwrap(), heads);
    assert!(
        heads.iter().any(|s| s.error_code.is_some()),
        "a failed step keeps its code"
    );

    // A second write of a saved step is refused and changes nothing.
    let overwrite = Step {
        content: Some("overwritten".to_string()),
        ok: true,
        error_code: None,
        error: None,
        status_code: None,
        ..failed_step(StepKey::Panel(1), 1)
    };
    assert!(!store.save_step(&lease, &overwrite).await.unwrap());
    assert!(!store.save_step(&lease, &analysis_step(1)).await.unwrap());
    assert_eq!(store.get_steps(job.id).await.unwrap(), expected);

    // Steps belong to their job.
    assert_eq!(store.get_steps(other.id).await.unwrap(), vec![]);
    assert_eq!(store.step_heads(other.id).await.unwrap(), vec![]);
    // Saving steps does not touch the job row.
    assert_eq!(
        &get(&store, job.id).await,
        claimed.iter().find(|j| j.id == job.id).unwrap()
    );
}

/// 9. A job whose lease expires on its last attempt fails with `lease_expired`.
async fn max_attempts_then_lease_expired(store: Arc<dyn Store>) {
    let once = enqueue(
        &store,
        NewJob {
            max_attempts: 1,
            ..new_job()
        },
    )
    .await;
    let twice = enqueue(
        &store,
        NewJob {
            max_attempts: 2,
            ..new_job()
        },
    )
    .await;
    let claimed = claim(&store, "w", 2, NOW).await;
    assert_eq!(claimed.len(), 2);

    let t1 = NOW + 31_000;
    assert_eq!(store.rescue_expired(t1).await.unwrap(), 2);
    let failed = get(&store, once.id).await;
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.failure_reason.as_deref(), Some("lease_expired"));
    assert!(failed.error.is_some());
    assert_eq!(
        failed,
        Job {
            status: JobStatus::Failed,
            attempt: 1,
            started_at: Some(NOW),
            finished_at: Some(t1),
            failure_reason: Some("lease_expired".to_string()),
            error: failed.error.clone(),
            ..once.clone()
        }
    );
    let requeued = get(&store, twice.id).await;
    assert_eq!(
        requeued,
        Job {
            attempt: 1,
            run_at: t1,
            started_at: Some(NOW),
            failure_reason: Some("lease_expired".to_string()),
            error: requeued.error.clone(),
            ..twice.clone()
        }
    );

    // The failed job is not claimable; the other one expires again on its last attempt.
    let again = claim(&store, "w2", 10, t1).await;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].attempt), (twice.id, 2));
    let t2 = t1 + 31_000;
    assert_eq!(store.rescue_expired(t2).await.unwrap(), 1);
    let failed_twice = get(&store, twice.id).await;
    assert_eq!(failed_twice.status, JobStatus::Failed);
    assert_eq!(failed_twice.attempt, 2);
    assert_eq!(
        failed_twice.failure_reason.as_deref(),
        Some("lease_expired")
    );
    assert_eq!(failed_twice.finished_at, Some(t2));
    assert_eq!(failed_twice.lease_owner, None);
    assert_eq!(failed_twice.lease_expires_at, None);
    assert_eq!(store.rescue_expired(t2 + 100_000).await.unwrap(), 0);
    assert_eq!(claim(&store, "w3", 10, t2).await, vec![]);
}

/// 10. Cancel from queued and from running, of a final job, of an unknown job.
async fn cancel_outcomes(store: Arc<dyn Store>) {
    let queued_job = enqueue(&store, new_job()).await;
    let t = NOW + 5_000;
    match store.cancel(queued_job.id, t).await.unwrap() {
        CancelOutcome::Cancelled { job, was_running } => {
            assert!(!was_running);
            assert_eq!(
                job,
                Job {
                    status: JobStatus::Cancelled,
                    finished_at: Some(t),
                    failure_reason: Some("cancelled".to_string()),
                    error: job.error.clone(),
                    ..queued_job.clone()
                }
            );
            assert_eq!(get(&store, job.id).await, job);
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
    // A cancelled job is never claimed.
    assert_eq!(claim(&store, "w", 10, t).await, vec![]);

    let running_job = enqueue(&store, new_job()).await;
    let claimed = claim_one(&store, "w", NOW).await;
    assert_eq!(claimed.id, running_job.id);
    let lease = lease_of(&claimed);
    let cancelled = match store.cancel(running_job.id, t).await.unwrap() {
        CancelOutcome::Cancelled { job, was_running } => {
            assert!(was_running);
            assert_eq!(job.status, JobStatus::Cancelled);
            assert_eq!(job.finished_at, Some(t));
            assert_eq!(job.lease_owner, None);
            assert_eq!(job.lease_expires_at, None);
            assert_eq!(job.attempt, 1);
            assert_eq!(job.failure_reason.as_deref(), Some("cancelled"));
            job
        }
        other => panic!("expected Cancelled, got {other:?}"),
    };
    // The worker is fenced out.
    assert!(
        !store
            .save_step(&lease, &ok_step(StepKey::Panel(0), 1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .complete(&lease, None, &json!({}).into(), t)
            .await
            .unwrap()
    );
    assert!(!store.fail(&lease, "x", "x", t).await.unwrap());
    assert!(!store.retry_later(&lease, t, "x", "x").await.unwrap());
    assert!(!store.release(&lease).await.unwrap());
    assert_eq!(
        store
            .heartbeat("w", &[(running_job.id, running_job.attempt)], t, LEASE)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(store.rescue_expired(t + 100_000).await.unwrap(), 0);
    assert_eq!(get(&store, running_job.id).await, cancelled);
    assert_eq!(store.get_steps(running_job.id).await.unwrap(), vec![]);

    // Final jobs stay as they are.
    match store.cancel(running_job.id, t + 1).await.unwrap() {
        CancelOutcome::AlreadyFinal(job) => assert_eq!(job, cancelled),
        other => panic!("expected AlreadyFinal, got {other:?}"),
    }
    let done = enqueue(&store, new_job()).await;
    let done_lease = lease_of(&claim_one(&store, "w", NOW).await);
    assert!(
        store
            .complete(&done_lease, None, &json!({"a": 1}).into(), t)
            .await
            .unwrap()
    );
    let succeeded = get(&store, done.id).await;
    match store.cancel(done.id, t + 1).await.unwrap() {
        CancelOutcome::AlreadyFinal(job) => assert_eq!(job, succeeded),
        other => panic!("expected AlreadyFinal, got {other:?}"),
    }
    let failing = enqueue(&store, new_job()).await;
    let failing_lease = lease_of(&claim_one(&store, "w", NOW).await);
    assert!(store.fail(&failing_lease, "bad", "bad", t).await.unwrap());
    let failed = get(&store, failing.id).await;
    match store.cancel(failing.id, t + 1).await.unwrap() {
        CancelOutcome::AlreadyFinal(job) => assert_eq!(job, failed),
        other => panic!("expected AlreadyFinal, got {other:?}"),
    }
    assert_eq!(get(&store, failing.id).await, failed);

    // A cancelled job can be retried as a failed one is; a succeeded one cannot.
    match store.retry_failed(running_job.id, t + 2).await.unwrap() {
        RetryOutcome::Requeued(job) => assert_eq!(
            (job.status, job.failure_reason, job.finished_at, job.attempt),
            (JobStatus::Queued, None, None, 1)
        ),
        other => panic!("expected Requeued, got {other:?}"),
    }
    assert_eq!(claim_one(&store, "w2", t + 2).await.attempt, 2);
    assert!(matches!(
        store.retry_failed(done.id, t + 2).await.unwrap(),
        RetryOutcome::NotRetryable(_)
    ));

    assert!(matches!(
        store.cancel(Uuid::now_v7(), t).await.unwrap(),
        CancelOutcome::NotFound
    ));
}

/// A manual retry gives a job with a deadline its whole deadline again, counted from the retry
/// (a retry after the deadline would otherwise fail at once as `deadline_exceeded`); a job
/// without one keeps none.
async fn retry_failed_counts_the_deadline_again(store: Arc<dyn Store>) {
    let timed = enqueue(
        &store,
        NewJob {
            deadline_at: Some(NOW - 1_000 + 60_000),
            ..new_job()
        },
    )
    .await;
    let untimed = enqueue(&store, new_job()).await;
    // Each retry gives the whole 60 s again, counted from that retry: not the span from the
    // job's creation to the deadline the last retry set, which would grow with every retry.
    for (ran, retried) in [(NOW, NOW + 3_600_000), (NOW + 3_600_000, NOW + 7_200_000)] {
        for _ in 0..2 {
            let lease = lease_of(&claim_one(&store, "w", ran).await);
            assert!(
                store
                    .fail(&lease, "upstream_auth", "401", ran + 1)
                    .await
                    .unwrap()
            );
        }
        for (job, deadline) in [(&timed, Some(retried + 60_000)), (&untimed, None)] {
            match store.retry_failed(job.id, retried).await.unwrap() {
                RetryOutcome::Requeued(j) => assert_eq!(j.deadline_at, deadline),
                other => panic!("expected Requeued, got {other:?}"),
            }
        }
    }
}

/// 11. A manual retry requeues a failed job, keeping its ok steps and dropping failed ones.
async fn retry_failed_keeps_ok_steps(store: Arc<dyn Store>) {
    let job = enqueue(
        &store,
        NewJob {
            max_attempts: 1,
            ..new_job()
        },
    )
    .await;
    let claimed = claim_one(&store, "w", NOW).await;
    let lease = lease_of(&claimed);
    let kept = ok_step(StepKey::Panel(0), 1);
    assert!(store.save_step(&lease, &kept).await.unwrap());
    // A failed step that was billed (an empty completion, say).
    let failed = Step {
        usage: Usage::of(100, 400, 0.5),
        ..failed_step(StepKey::Panel(1), 1)
    };
    assert!(store.save_step(&lease, &failed).await.unwrap());
    assert!(
        store
            .fail(&lease, "panel_quorum", "only 1 of 2 answers", NOW + 1_000)
            .await
            .unwrap()
    );

    let status = async |id| store.job_status(id).await.unwrap().unwrap();
    assert_eq!(status(job.id).await, JobStatus::Failed);
    let t = NOW + 10_000;
    let requeued = match store.retry_failed(job.id, t).await.unwrap() {
        RetryOutcome::Requeued(job) => job,
        other => panic!("expected Requeued, got {other:?}"),
    };
    assert_eq!(
        requeued,
        Job {
            status: JobStatus::Queued,
            attempt: 1,
            // Room for one more attempt even though max_attempts was used up.
            max_attempts: 2,
            run_at: t,
            started_at: Some(NOW),
            ..job.clone()
        }
    );
    assert_eq!(get(&store, job.id).await, requeued);
    // The failed step is kept, marked to run again, its usage and the rest of it as they were.
    let superseded = Step {
        error_code: Some(SUPERSEDED.to_string()),
        ..failed.clone()
    };
    assert!(superseded.superseded());
    assert_eq!(
        store.get_steps(job.id).await.unwrap(),
        vec![kept.clone(), superseded.clone()]
    );

    // Not failed any more: a second retry is refused.
    match store.retry_failed(job.id, t).await.unwrap() {
        RetryOutcome::NotRetryable(j) => assert_eq!(j, requeued),
        other => panic!("expected NotRetryable, got {other:?}"),
    }

    // It runs again, and the kept checkpoint is still there; the failed step is redone, its
    // row replaced.
    assert_eq!(status(job.id).await, JobStatus::Queued);
    let again = claim_one(&store, "w2", t).await;
    assert_eq!((again.id, again.attempt), (job.id, 2));
    assert_eq!(status(job.id).await, JobStatus::Running);
    let lease2 = lease_of(&again);
    assert_eq!(
        store.get_steps(job.id).await.unwrap(),
        vec![kept.clone(), superseded]
    );
    let redone = ok_step(StepKey::Panel(1), 2);
    assert!(store.save_step(&lease2, &redone).await.unwrap());
    assert_eq!(store.get_steps(job.id).await.unwrap(), vec![kept, redone]);

    // Running and succeeded jobs are not failed either.
    match store.retry_failed(job.id, t).await.unwrap() {
        RetryOutcome::NotRetryable(j) => assert_eq!(j, again),
        other => panic!("expected NotRetryable, got {other:?}"),
    }
    assert!(
        store
            .complete(&lease2, None, &json!({}).into(), t + 1)
            .await
            .unwrap()
    );
    let succeeded = get(&store, job.id).await;
    assert_eq!(status(job.id).await, JobStatus::Succeeded);
    match store.retry_failed(job.id, t + 2).await.unwrap() {
        RetryOutcome::NotRetryable(j) => assert_eq!(j, succeeded),
        other => panic!("expected NotRetryable, got {other:?}"),
    }
    assert_eq!(get(&store, job.id).await, succeeded);

    assert!(matches!(
        store.retry_failed(Uuid::now_v7(), t).await.unwrap(),
        RetryOutcome::NotFound
    ));
}

/// 12. Release puts the job back without spending the attempt (one more is allowed); it is
///     claimable at once. Its attempt number is not given back: the next lease's is new, so a
///     late write of the released lease (one whose statement raced the release on Postgres)
///     cannot be taken for the next lease's own, nor refuse its write of the same step.
async fn release_does_not_spend_attempt(store: Arc<dyn Store>) {
    let job = enqueue(&store, new_job()).await;
    let claimed = claim_one(&store, "w", NOW).await;
    let lease = lease_of(&claimed);
    let step = ok_step(StepKey::Panel(0), 1);
    assert!(store.save_step(&lease, &step).await.unwrap());

    assert!(store.release(&lease).await.unwrap());
    assert_eq!(
        get(&store, job.id).await,
        Job {
            started_at: Some(NOW),
            attempt: 1,
            max_attempts: job.max_attempts + 1,
            ..job.clone()
        }
    );
    // Released once: the lease is gone.
    assert!(!store.release(&lease).await.unwrap());
    assert_eq!(
        store
            .heartbeat("w", &[(job.id, 1)], NOW, LEASE)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(store.get_steps(job.id).await.unwrap(), vec![step.clone()]);

    let again = claim_one(&store, "w2", NOW + 1).await;
    assert_eq!(
        again,
        Job {
            attempt: 2,
            max_attempts: job.max_attempts + 1,
            lease_owner: Some("w2".to_string()),
            lease_expires_at: Some(NOW + 1 + LEASE_MS),
            ..claimed
        }
    );
    assert_eq!(store.get_steps(job.id).await.unwrap(), vec![step]);
    // The next lease writes the step again over the released lease's row, if it must.
    let redone = ok_step(StepKey::Panel(0), 2);
    assert!(store.save_step(&lease_of(&again), &redone).await.unwrap());
    assert_eq!(store.get_steps(job.id).await.unwrap(), vec![redone]);

    // A release says nothing failed: the reason an earlier attempt left is cleared with it.
    let later = lease_of(&again);
    let requeued = store.retry_later(&later, NOW + 2, "rate_limited", "429");
    assert!(requeued.await.unwrap());
    let third = claim_one(&store, "w3", NOW + 2).await;
    assert_eq!(third.failure_reason.as_deref(), Some("rate_limited"));
    assert!(store.release(&lease_of(&third)).await.unwrap());
    let released = get(&store, job.id).await;
    assert_eq!((released.failure_reason, released.error), (None, None));
}

/// 13. Newest first, by status, limited, and paged with `before` without gaps or repeats.
async fn list_jobs_order_filter_paging(store: Arc<dyn Store>) {
    let mut jobs = Vec::new();
    for i in 0..7 {
        jobs.push(enqueue(&store, new_job_at(i % 2, NOW - 10_000 + i64::from(i))).await);
    }
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "UUIDv7 ids are ordered"
    );
    let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();

    let list = |status: Option<JobStatus>, limit: u32, before: Option<Uuid>| {
        let store = store.clone();
        async move {
            store
                .list_jobs(&ListFilter {
                    status,
                    limit,
                    before,
                })
                .await
                .unwrap()
        }
    };
    let idsof = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();

    // Rows as a list shows them: without the request's messages and the result (a page of
    // whole jobs held every request's message tree at once), newest first.
    let summary = |job: &Job| Job {
        spec: JobSpec {
            messages: vec![],
            ..job.spec.clone()
        },
        result: None,
        ..job.clone()
    };
    assert!(jobs.iter().all(|j| !j.spec.messages.is_empty()));
    let all = list(None, 100, None).await;
    assert_eq!(
        all,
        jobs.iter().rev().map(summary).collect::<Vec<_>>(),
        "rows without messages, newest first"
    );
    let whole = store.get_job(ids[0]).await.unwrap().unwrap();
    assert_eq!(whole, jobs[0], "a job read alone is whole");
    assert_eq!(idsof(list(None, 3, None).await), newest_first[..3]);
    assert_eq!(idsof(list(None, 0, None).await), Vec::<Uuid>::new());

    // Paging with `before` visits every job once.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = idsof(list(None, 3, before).await);
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        before = page.last().copied();
        seen.extend(page);
        assert!(seen.len() <= ids.len(), "paging repeats jobs: {seen:?}");
    }
    assert_eq!(seen, newest_first);
    assert_eq!(
        idsof(list(None, 100, Some(ids[3])).await),
        vec![ids[2], ids[1], ids[0]]
    );
    assert_eq!(
        idsof(list(None, 100, Some(ids[0])).await),
        Vec::<Uuid>::new()
    );

    // Move some jobs along: priority 1 jobs (odd i) are claimed first.
    let claimed = claim(&store, "w", 3, NOW).await;
    let mut running: Vec<Uuid> = claimed.iter().map(|j| j.id).collect();
    running.sort();
    assert_eq!(running, vec![ids[1], ids[3], ids[5]]);
    assert!(
        store
            .complete(&lease_of(&claimed[0]), None, &json!({}).into(), NOW)
            .await
            .unwrap()
    );
    let succeeded = claimed[0].id;
    let running: Vec<Uuid> = newest_first
        .iter()
        .copied()
        .filter(|id| running.contains(id) && *id != succeeded)
        .collect();
    let queued_ids: Vec<Uuid> = newest_first
        .iter()
        .copied()
        .filter(|id| [ids[0], ids[2], ids[4], ids[6]].contains(id))
        .collect();

    assert_eq!(
        idsof(list(Some(JobStatus::Running), 100, None).await),
        running
    );
    assert_eq!(
        idsof(list(Some(JobStatus::Succeeded), 100, None).await),
        vec![succeeded]
    );
    assert_eq!(
        idsof(list(Some(JobStatus::Queued), 100, None).await),
        queued_ids
    );
    assert_eq!(
        idsof(list(Some(JobStatus::Queued), 2, None).await),
        queued_ids[..2]
    );
    assert_eq!(
        idsof(list(Some(JobStatus::Queued), 100, Some(queued_ids[1])).await),
        queued_ids[2..]
    );
    assert_eq!(
        idsof(list(Some(JobStatus::Failed), 100, None).await),
        Vec::<Uuid>::new()
    );
    for job in list(Some(JobStatus::Running), 100, None).await {
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.lease_owner.as_deref(), Some("w"));
    }
}

/// 14. complete / fail / retry_later write their outcome and clear the lease.
async fn complete_fail_and_retry_later_outcomes(store: Arc<dyn Store>) {
    // retry_later: back to queued at `run_at`, reason recorded, lease cleared, attempt kept.
    let job = enqueue(&store, new_job()).await;
    let claimed = claim_one(&store, "w", NOW).await;
    let lease = lease_of(&claimed);
    let retry_at = NOW + 5_000;
    assert!(
        store
            .retry_later(&lease, retry_at, "rate_limited", "429 from upstream")
            .await
            .unwrap()
    );
    let waiting = get(&store, job.id).await;
    assert_eq!(
        waiting,
        Job {
            status: JobStatus::Queued,
            run_at: retry_at,
            lease_owner: None,
            lease_expires_at: None,
            failure_reason: Some("rate_limited".to_string()),
            error: Some("429 from upstream".to_string()),
            ..claimed.clone()
        }
    );
    assert_eq!(claim(&store, "w", 10, retry_at - 1).await, vec![]);

    // complete: succeeded with the result, earlier failure cleared, lease cleared.
    let second = claim_one(&store, "w", retry_at).await;
    assert_eq!((second.id, second.attempt), (job.id, 2));
    let lease2 = lease_of(&second);
    let result = json!({
        "id": "chatcmpl-xyz",
        "object": "chat.completion",
        "model": "fusion/budget",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42 ✓"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "cost": 0.0012}
    });
    let done_at = retry_at + 2_000;
    assert!(
        store
            .complete(&lease2, None, &result.clone().into(), done_at)
            .await
            .unwrap()
    );
    let succeeded = get(&store, job.id).await;
    assert_eq!(
        succeeded,
        Job {
            status: JobStatus::Succeeded,
            lease_owner: None,
            lease_expires_at: None,
            finished_at: Some(done_at),
            failure_reason: None,
            error: None,
            result: Some(result.clone()),
            ..second.clone()
        }
    );
    // Written once: a repeat is fenced (the job is no longer running).
    assert!(
        !store
            .complete(&lease2, None, &json!({"again": true}).into(), done_at + 1)
            .await
            .unwrap()
    );
    assert!(!store.fail(&lease2, "x", "x", done_at + 1).await.unwrap());
    assert_eq!(get(&store, job.id).await, succeeded);

    // fail: failed with reason and error, no result, lease cleared.
    let doomed = enqueue(&store, new_job()).await;
    let running = claim_one(&store, "w", NOW).await;
    assert_eq!(running.id, doomed.id);
    let failed_at = NOW + 3_000;
    assert!(
        store
            .fail(
                &lease_of(&running),
                "analysis_not_valid_json",
                "the analyst answered prose",
                failed_at
            )
            .await
            .unwrap()
    );
    let failed = get(&store, doomed.id).await;
    assert_eq!(
        failed,
        Job {
            status: JobStatus::Failed,
            lease_owner: None,
            lease_expires_at: None,
            finished_at: Some(failed_at),
            failure_reason: Some("analysis_not_valid_json".to_string()),
            error: Some("the analyst answered prose".to_string()),
            result: None,
            ..running.clone()
        }
    );
    assert!(
        !store
            .complete(&lease_of(&running), None, &json!({}).into(), failed_at + 1)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .heartbeat("w", &[(running.id, running.attempt)], failed_at, LEASE)
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(store.rescue_expired(failed_at + 100_000).await.unwrap(), 0);
    assert_eq!(get(&store, doomed.id).await, failed);
}

/// 15. An enqueue wakes this process's workers (a stored permit: no waiter needs to be parked).
async fn enqueue_wakes_workers(store: Arc<dyn Store>) {
    let wakeups = store.wakeups();
    // Drop any permit left from setup (e.g. the Postgres listener's first connection).
    let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
    enqueue(&store, new_job()).await;
    tokio::time::timeout(Duration::from_secs(5), wakeups.notified())
        .await
        .expect("enqueue must wake the workers");
}

/// Writing checkpoints and outcomes queues nothing, so it must not wake idle workers (on
/// Postgres a statement-level NOTIFY trigger would fire for every batch of checkpoints).
async fn checkpoints_do_not_wake_workers(store: Arc<dyn Store>) {
    let job = enqueue(&store, new_job()).await;
    let lease = lease_of(&claim_one(&store, "w", NOW).await);
    let wakeups = store.wakeups();
    // Let the enqueue's own wake-ups arrive (NOTIFY is asynchronous), then drop them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
    for i in 0..3 {
        assert!(
            store
                .save_step(&lease, &ok_step(StepKey::Panel(i), 1))
                .await
                .unwrap()
        );
    }
    assert!(
        store
            .complete(&lease, None, &json!({"ok": true}).into(), NOW)
            .await
            .unwrap()
    );
    assert_eq!(get(&store, job.id).await.status, JobStatus::Succeeded);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wakeups.notified())
            .await
            .is_err(),
        "a checkpoint or an outcome woke the workers"
    );
}

/// A requeue to run later (a retryable failure's backoff) wakes no worker: each would claim at
/// once and find nothing due (the poll claims the job once it is). A requeue to run now (the
/// rescuer's) wakes them. "Later" by the real clock: the store may compare with its own.
async fn only_requeues_due_now_wake_workers(store: Arc<dyn Store>) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for _ in 0..4 {
        enqueue(&store, new_job()).await;
    }
    let claimed = claim(&store, "w", 4, NOW).await;
    assert_eq!(claimed.len(), 4);
    let leases: Vec<Lease> = claimed.iter().map(lease_of).collect();
    let wakeups = store.wakeups();
    let mut events = store.events();
    // A job finishing is a fence, so that no timing decides what is checked: Postgres delivers
    // one connection's notifications in commit order, so once a finish is heard, every wake-up
    // sent by an earlier commit has been heard too.
    let mut finish_and_hear = async |lease: &Lease| {
        let result = json!({"ok": true}).into();
        assert!(store.complete(lease, None, &result, NOW).await.unwrap());
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Ok(JobEvent::Finished { job_id, .. }) if job_id == lease.job_id => break,
                    Ok(_) => {}
                    Err(e) => panic!("events: {e}"),
                }
            }
        })
        .await
        .expect("a job's finish was never heard");
    };
    // The enqueues' own wake-ups: heard, then dropped.
    finish_and_hear(&leases[0]).await;
    let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
    let in_an_hour = wall + 3_600_000;
    let later = &leases[1];
    assert!(
        store
            .retry_later(later, in_an_hour, "rate_limited", "slow down")
            .await
            .unwrap()
    );
    assert_eq!(get(&store, later.job_id).await.run_at, in_an_hour);
    finish_and_hear(&leases[2]).await;
    assert!(
        tokio::time::timeout(Duration::ZERO, wakeups.notified())
            .await
            .is_err(),
        "a requeue to run in an hour woke the workers"
    );
    // The last job's lease runs out: the rescuer requeues it to run at once.
    assert_eq!(store.rescue_expired(NOW + LEASE_MS + 1).await.unwrap(), 1);
    tokio::time::timeout(Duration::from_secs(5), wakeups.notified())
        .await
        .expect("a requeue to run now must wake the workers");
}

/// Writes of every kind issued at once (so that a store that batches them puts them in one
/// batch): each gets its own answer, fenced writes change nothing, the rest all land.
async fn concurrent_writes_each_get_their_own_result(store: Arc<dyn Store>) {
    let a = enqueue(&store, new_job()).await;
    let b = enqueue(&store, new_job()).await;
    let claimed = claim(&store, "w", 2, NOW).await;
    assert_eq!(claimed.len(), 2);
    let lease = |id: Uuid| lease_of(claimed.iter().find(|j| j.id == id).unwrap());
    let (la, lb) = (lease(a.id), lease(b.id));
    let stale = |l: &Lease| Lease {
        owner: "someone-else".to_string(),
        ..l.clone()
    };
    let c = new_job();
    let keyed = |hash: &str| NewJob {
        idempotency_key: Some("same-key".to_string()),
        request_hash: Some(hash.to_string()),
        ..new_job()
    };
    let (d1, d2) = (keyed("h"), keyed("h"));
    let (stale_a, stale_b) = (stale(&la), stale(&lb));
    let (panel0, panel1_failed) = (
        ok_step(StepKey::Panel(0), 1),
        failed_step(StepKey::Panel(1), 1),
    );
    let result = json!({"x": 1});
    let result_text = JsonText::from(result.clone());

    let (enq_c, enq_d1, enq_d2, step_a, step_b_stale, step_b, done_a_stale, fail_b_stale) = tokio::join!(
        store.enqueue(c.clone(), None),
        store.enqueue(d1, None),
        store.enqueue(d2, None),
        store.save_step(&la, &panel0),
        store.save_step(&stale_b, &panel0),
        store.save_step(&lb, &panel1_failed),
        store.complete(&stale_a, None, &result_text, NOW),
        store.fail(&stale_b, "boom", "stale worker", NOW),
    );
    match enq_c.unwrap() {
        Enqueued::Created(job) => assert_eq!(job, queued(&c)),
        other => panic!("expected Enqueued::Created, got {other:?}"),
    }
    // Exactly one of the two same-key requests created the job; the other found it.
    let (first, second) = (enq_d1.unwrap(), enq_d2.unwrap());
    let created: Vec<&Job> = [&first, &second]
        .into_iter()
        .filter_map(|e| match e {
            Enqueued::Created(j) => Some(j),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "{first:?} / {second:?}");
    for e in [&first, &second] {
        match e {
            Enqueued::Created(j) | Enqueued::Existing(j) => assert_eq!(j.id, created[0].id),
            other => panic!("same key and hash must not be KeyReused: {other:?}"),
        }
    }
    assert!(step_a.unwrap());
    assert!(!step_b_stale.unwrap(), "a stale lease wrote a checkpoint");
    assert!(step_b.unwrap());
    assert!(!done_a_stale.unwrap(), "a stale lease completed a job");
    assert!(!fail_b_stale.unwrap(), "a stale lease failed a job");

    assert_eq!(store.get_steps(b.id).await.unwrap(), vec![panel1_failed]);
    assert_eq!(store.get_steps(a.id).await.unwrap(), vec![panel0]);
    assert_eq!(get(&store, a.id).await.status, JobStatus::Running);
    assert_eq!(get(&store, b.id).await.status, JobStatus::Running);

    // The true holders finish both jobs, again at once.
    let answer = json!({"answer": "a"});
    let answer_text = JsonText::from(answer.clone());
    let (done_a, fail_b) = tokio::join!(
        store.complete(&la, None, &answer_text, NOW + 5),
        store.fail(&lb, "insufficient_quorum", "0 of 3 answered", NOW + 6),
    );
    assert!(done_a.unwrap() && fail_b.unwrap());
    let (a, b) = (get(&store, a.id).await, get(&store, b.id).await);
    assert_eq!(
        (a.status, a.result, a.finished_at, a.error),
        (
            JobStatus::Succeeded,
            Some(json!({"answer": "a"})),
            Some(NOW + 5),
            None
        )
    );
    assert_eq!(
        (
            b.status,
            b.result,
            b.finished_at,
            b.failure_reason.as_deref(),
            b.error.as_deref()
        ),
        (
            JobStatus::Failed,
            None,
            Some(NOW + 6),
            Some("insufficient_quorum"),
            Some("0 of 3 answered")
        )
    );
}

/// A write the database refuses (here an id that exists already, which no caller makes but a
/// bug or a disk error could stand for) fails alone and leaves the store working: the writes
/// queued beside it land, and the failed batch leaves no transaction open behind it, so the
/// next writes go through. Whether the three share a batch is up to the threaded runtime; the
/// re-run of a failed batch group by group is tested deterministically in `batch.rs`.
async fn a_failed_write_leaves_its_batch_and_the_store_working(store: Arc<dyn Store>) {
    let a = enqueue(&store, new_job()).await;
    let lease = lease_of(&claim_one(&store, "w", NOW).await);
    let clash = NewJob {
        id: a.id,
        ..new_job()
    };
    let fresh = new_job();
    let step = ok_step(StepKey::Panel(0), 1);
    let (dup, ok_enqueue, saved) = tokio::join!(
        store.enqueue(clash, None),
        store.enqueue(fresh.clone(), None),
        store.save_step(&lease, &step),
    );
    assert!(dup.is_err(), "a second job with an existing id: {dup:?}");
    assert!(matches!(ok_enqueue.unwrap(), Enqueued::Created(_)));
    assert!(saved.unwrap());
    assert_eq!(get(&store, fresh.id).await.status, JobStatus::Queued);
    assert_eq!(store.get_steps(a.id).await.unwrap(), vec![step]);
    // The store still writes: an outcome, a new job.
    assert!(
        store
            .complete(&lease, None, &json!({"x": 1}).into(), NOW)
            .await
            .unwrap()
    );
    assert_eq!(get(&store, a.id).await.status, JobStatus::Succeeded);
    enqueue(&store, new_job()).await;
}

/// Waiters and the cancel listener learn of every job that becomes final, however it got there
/// and however many finish in one statement, and of which attempt it was: a cancel heard late
/// must not stop a later attempt of the same job.
async fn every_finish_is_announced(store: Arc<dyn Store>) {
    let mut events = store.events();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&store, new_job()).await.id);
    }
    let claimed = claim(&store, "w", 4, NOW).await;
    assert_eq!(claimed.len(), 4);
    let leases: Vec<Lease> = claimed.iter().map(lease_of).collect();
    let result = json!({"ok": true});
    let result_text = JsonText::from(result.clone());
    let (a, b, c) = tokio::join!(
        store.complete(&leases[0], None, &result_text, NOW),
        store.complete(&leases[1], None, &result_text, NOW),
        store.fail(&leases[2], "upstream_error", "gone", NOW),
    );
    assert!(a.unwrap() && b.unwrap() && c.unwrap());
    // A running job and a queued one, cancelled.
    let queued = ids
        .iter()
        .find(|id| !claimed.iter().any(|j| j.id == **id))
        .unwrap();
    for id in [leases[3].job_id, *queued] {
        assert!(matches!(
            store.cancel(id, NOW).await.unwrap(),
            CancelOutcome::Cancelled { .. }
        ));
    }
    let mut expected: HashSet<(Uuid, JobStatus, i32)> = HashSet::from([
        (leases[0].job_id, JobStatus::Succeeded, 1),
        (leases[1].job_id, JobStatus::Succeeded, 1),
        (leases[2].job_id, JobStatus::Failed, 1),
        (leases[3].job_id, JobStatus::Cancelled, 1),
        (*queued, JobStatus::Cancelled, 0),
    ]);
    // The cancelled running job, retried, claimed again and cancelled again: its second attempt.
    let again = leases[3].job_id;
    assert!(matches!(
        store.retry_failed(again, NOW).await.unwrap(),
        RetryOutcome::Requeued(_)
    ));
    let reclaimed = claim(&store, "w", 1, NOW).await;
    assert_eq!(
        reclaimed
            .iter()
            .map(|j| (j.id, j.attempt))
            .collect::<Vec<_>>(),
        [(again, 2)]
    );
    assert!(matches!(
        store.cancel(again, NOW).await.unwrap(),
        CancelOutcome::Cancelled { .. }
    ));
    expected.insert((again, JobStatus::Cancelled, 2));
    // Three jobs on their last attempt whose leases run out: one statement fails them all.
    let mut last_tries = Vec::new();
    for _ in 0..3 {
        last_tries.push(
            enqueue(
                &store,
                NewJob {
                    max_attempts: 1,
                    ..new_job()
                },
            )
            .await
            .id,
        );
    }
    assert_eq!(claim(&store, "w", 3, NOW).await.len(), 3);
    assert_eq!(store.rescue_expired(NOW + LEASE_MS + 1).await.unwrap(), 3);
    expected.extend(last_tries.into_iter().map(|id| (id, JobStatus::Failed, 1)));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !expected.is_empty() {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no finish event for {expected:?}"))
            .expect("event stream");
        if let JobEvent::Finished {
            job_id,
            status,
            attempt,
        } = event
        {
            let heard = (job_id, status, attempt);
            assert!(expected.remove(&heard), "not expected: {heard:?}");
        }
    }
}

/// A job submitted to a process with a free worker slot is inserted running under that
/// process's lease: nobody else can claim it, no worker is woken for it, the lease works like a
/// claimed one (and runs out like one), and an idempotent repeat finds it as it is.
async fn a_job_can_start_at_its_enqueue(store: Arc<dyn Store>) {
    let wakeups = store.wakeups();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tokio::time::timeout(Duration::ZERO, wakeups.notified()).await;
    let new = NewJob {
        idempotency_key: Some("started-here".into()),
        request_hash: Some("h".into()),
        ..new_job()
    };
    let start = StartHere {
        owner: "here".into(),
        lease_expires_at: NOW + LEASE_MS,
    };
    let Enqueued::Created(job) = store
        .enqueue(new.clone(), Some(start.clone()))
        .await
        .unwrap()
    else {
        panic!("expected a new job");
    };
    let expected = Job {
        status: JobStatus::Running,
        attempt: 1,
        lease_owner: Some("here".into()),
        lease_expires_at: Some(NOW + LEASE_MS),
        started_at: Some(new.created_at),
        ..queued(&new)
    };
    assert_eq!(job, expected);
    assert_eq!(get(&store, job.id).await, expected);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wakeups.notified())
            .await
            .is_err(),
        "a job started at its enqueue woke the workers"
    );
    assert!(claim(&store, "elsewhere", 10, NOW).await.is_empty());

    // A repeat with a slot of its own finds the job as it is, and starts nothing.
    let other = StartHere {
        owner: "other".into(),
        lease_expires_at: NOW + 1,
    };
    match store.enqueue(new.clone(), Some(other)).await.unwrap() {
        Enqueued::Existing(found) => assert_eq!(found, expected),
        e => panic!("expected the existing job, got {e:?}"),
    }

    // The lease is a lease: heartbeats renew it, checkpoints are fenced on it...
    assert_eq!(
        store
            .heartbeat("here", &[(job.id, job.attempt)], NOW + 1_000, LEASE)
            .await
            .unwrap(),
        vec![Held {
            id: job.id,
            attempt: 1
        }]
    );
    let lease = lease_of(&job);
    assert!(
        store
            .save_step(&lease, &ok_step(StepKey::Panel(0), 1))
            .await
            .unwrap()
    );
    // ...and once it runs out the job is rescued and claimed like any other, checkpoints kept.
    let expired = NOW + 1_000 + LEASE_MS + 1;
    assert_eq!(store.rescue_expired(expired).await.unwrap(), 1);
    let claimed = store.claim("elsewhere", 1, expired, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].job.attempt, claimed[0].checkpointed), (2, true));
    assert!(
        !store
            .save_step(&lease, &ok_step(StepKey::Panel(1), 1))
            .await
            .unwrap()
    );
}

/// A job's final step can be written in its outcome's commit: both land, or (fenced out)
/// neither, and this process hears of the step as of any checkpoint.
async fn the_last_step_lands_with_the_outcome(store: Arc<dyn Store>) {
    let mut events = store.events();
    let job = enqueue(&store, new_job()).await;
    let running = claim_one(&store, "w", NOW).await;
    let lease = lease_of(&running);
    let panel = ok_step(StepKey::Panel(0), 1);
    assert!(store.save_step(&lease, &panel).await.unwrap());
    let last = ok_step(StepKey::Final, 1);
    let result = json!({"choices": [{"message": {"content": "done"}}]});
    assert!(
        store
            .complete(&lease, Some(&last), &result.clone().into(), NOW + 10)
            .await
            .unwrap()
    );
    let done = get(&store, job.id).await;
    assert_eq!(
        (done.status, done.result, done.finished_at),
        (JobStatus::Succeeded, Some(result.clone()), Some(NOW + 10))
    );
    assert_eq!(
        store.get_steps(job.id).await.unwrap(),
        vec![panel.clone(), last.clone()]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (mut stepped, mut finished) = (false, false);
    while !(stepped && finished) {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("events so far: step {stepped}, finish {finished}"))
            .expect("event stream");
        match event {
            JobEvent::Step { job_id, step } if job_id == job.id => {
                stepped |= step == StepKey::Final;
            }
            JobEvent::Finished {
                job_id,
                status,
                attempt,
            } if job_id == job.id => {
                assert_eq!((status, attempt), (JobStatus::Succeeded, 1));
                finished = true;
            }
            _ => {}
        }
    }
    // Once finished, the same lease writes neither again.
    let other = ok_step(StepKey::Analysis, 1);
    assert!(
        !store
            .complete(&lease, Some(&other), &json!({}).into(), NOW + 20)
            .await
            .unwrap()
    );
    assert_eq!(get(&store, job.id).await.finished_at, Some(NOW + 10));
    assert_eq!(store.get_steps(job.id).await.unwrap(), vec![panel, last]);

    // A stale worker: neither its last step nor its outcome lands.
    let (old, _new) = expire_and_reclaim(&store).await;
    let before = get(&store, old.job_id).await;
    let steps_before = store.get_steps(old.job_id).await.unwrap();
    assert!(
        !store
            .complete(
                &old,
                Some(&ok_step(StepKey::Final, 1)),
                &json!({}).into(),
                NOW
            )
            .await
            .unwrap()
    );
    assert_eq!(get(&store, old.job_id).await, before);
    assert_eq!(store.get_steps(old.job_id).await.unwrap(), steps_before);
}

/// The worker reads a job's steps only when the claim says it has some: a first claim must say
/// no, and every claim of a job with a checkpoint (after a lease expiry or a release) must say
/// yes, or finished steps would run (and be paid for) again.
async fn a_claim_says_whether_the_job_has_checkpoints(store: Arc<dyn Store>) {
    let (a, b) = (
        enqueue(&store, new_job()).await,
        enqueue(&store, new_job()).await,
    );
    let first = store.claim("w", 2, NOW, LEASE).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|c| !c.checkpointed), "{first:?}");
    let lease = |id: Uuid| lease_of(&first.iter().find(|c| c.job.id == id).unwrap().job);
    let (la, lb) = (lease(a.id), lease(b.id));

    // `a` keeps a checkpoint and is released; `b` is released with none.
    assert!(
        store
            .save_step(&la, &ok_step(StepKey::Panel(1), 1))
            .await
            .unwrap()
    );
    assert!(store.release(&la).await.unwrap() && store.release(&lb).await.unwrap());
    let again = store.claim("w2", 2, NOW + 1, LEASE).await.unwrap();
    let flag = |id: Uuid| again.iter().find(|c| c.job.id == id).unwrap().checkpointed;
    assert!(flag(a.id), "a released job with a checkpoint");
    assert!(!flag(b.id), "a released job without one");

    // After a lease expiry the new holder is told too.
    assert_eq!(
        store.rescue_expired(NOW + 1 + LEASE_MS + 1).await.unwrap(),
        2
    );
    let third = store
        .claim("w3", 2, NOW + LEASE_MS + 2, LEASE)
        .await
        .unwrap();
    let flag = |id: Uuid| third.iter().find(|c| c.job.id == id).unwrap().checkpointed;
    assert!(flag(a.id) && !flag(b.id));
}

// ---------------------------------------------------------------------------------------------
// Postgres only
// ---------------------------------------------------------------------------------------------

/// Postgres cut off mid-run: the store reaches it through a proxy, which is then stopped (its
/// connections dropped, new ones refused). The writes queued meanwhile fail together within a
/// pool timeout or two (10 s each), with the errors the API answers 503 to, rather than one
/// timeout after another: re-running each of these 16 writes on its own took ~170 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_out_of_reach_fails_the_queued_writes_together() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mut url = reqwest::Url::parse(&db._database.url).expect("database url");
    let target = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().unwrap_or(5432)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(listener.local_addr().unwrap().port()))
        .unwrap();
    let proxy = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            connections.spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let store = fusion::store::connect(url.as_str())
        .await
        .expect("connect through the proxy");
    enqueue(&store, new_job()).await;

    proxy.abort();
    let _ = proxy.await;
    let started = std::time::Instant::now();
    let writes = (0..16).map(|_| store.enqueue(new_job(), None));
    let results = futures::future::join_all(writes).await;
    let took = started.elapsed();
    for result in &results {
        assert!(
            matches!(
                result,
                Err(fusion::store::StoreError::Database(
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)
                ))
            ),
            "{result:?}"
        );
    }
    assert!(
        took < Duration::from_secs(25),
        "the writes failed after {took:?}, not within a pool timeout or two"
    );
}

/// The pool pings only connections left idle a while (not every one it hands out, as sqlx's
/// default does): a connection that broke while idle — here the backends of the store's pool are
/// terminated, as a Postgres restart would — is still replaced before use, and the store's next
/// writes, reads and claims succeed as if nothing had happened. The listener's backend is
/// spared: with it terminated too, this test passed even with no ping at all (the listener
/// reconnects through the same pool, and, I take it, met and dropped the dead connections
/// first), so it did not tell the two apart. Sparing it, it fails without the idle ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_broken_while_idle_are_replaced_unseen() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let store = &db.store;
    let first = enqueue(store, new_job()).await;
    assert_eq!(get(store, first.id).await.status, JobStatus::Queued);

    let admin = sqlx::PgPool::connect(&db._database.url)
        .await
        .expect("admin connection");
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND query NOT LIKE 'LISTEN%') AS t",
    )
    .fetch_one(&admin)
    .await
    .expect("terminate the store's connections");
    admin.close().await;
    assert!(terminated >= 1, "terminated {terminated} backends");
    // Idle for longer than the pool's ping threshold (1 s).
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let second = enqueue(store, new_job()).await;
    assert_eq!(get(store, second.id).await.status, JobStatus::Queued);
    let claimed = claim(store, "w1", 2, NOW).await;
    assert_eq!(claimed.len(), 2, "both jobs claimed after the break");
}

/// `StoreOptions::max_connections` bounds the Postgres pool: through 8 concurrent enqueues, then
/// 8 concurrent read-and-claim pairs, a store allowed 3 connections keeps to 3 backends (its
/// listener's included), and every call still succeeds, each waiting its turn for a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pool_keeps_to_its_configured_size() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    // Named, to tell its backends from those of `db`'s own store.
    let url = format!("{}?application_name=small_pool", db._database.url);
    let options = fusion::store::StoreOptions {
        max_connections: 3,
        ..Default::default()
    };
    let store = fusion::store::connect_with(&url, options)
        .await
        .expect("connect with a small pool");
    let jobs: Vec<Job> =
        futures::future::join_all((0..8).map(|_| enqueue(&store, new_job()))).await;
    let reads = jobs.iter().map(|job| store.get_job(job.id));
    let mut tasks = Vec::new();
    for (i, read) in reads.enumerate() {
        let store = store.clone();
        tasks.push(async move {
            let job = read.await.expect("read").expect("the job");
            let claimed = store
                .claim(&format!("w{i}"), 1, NOW, LEASE)
                .await
                .expect("claim");
            (job, claimed.len())
        });
    }
    let results = futures::future::join_all(tasks).await;
    assert_eq!(
        results.iter().map(|(_, n)| n).sum::<usize>(),
        8,
        "every job claimed once"
    );

    let admin = sqlx::PgPool::connect(&db._database.url)
        .await
        .expect("admin connection");
    let backends: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'small_pool'",
    )
    .fetch_one(&admin)
    .await
    .expect("count backends");
    admin.close().await;
    assert!(
        (1..=3).contains(&backends),
        "{backends} backends for a pool of 3"
    );
}

/// A server that takes no writes (a standby reached after a failover, until DNS or the pooler
/// point at the new primary) is away for now, not a wrong call: a write fails as unavailable
/// (the API's 503, the workers' retry), and once writes are taken again the store writes. Before, it was a 500, and a failing batch was halved
/// into ever smaller statements that all met the same refusal.
#[tokio::test]
async fn postgres_taking_no_writes_is_unavailable_for_now() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let admin = sqlx::PgPool::connect(&db._database.url)
        .await
        .expect("admin connection");
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&admin)
        .await
        .expect("the database's name");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"
    )))
    .execute(&admin)
    .await
    .expect("make the database read-only");
    admin.close().await;
    // New sessions take the setting: a store connected now.
    let store = fusion::store::connect(&db._database.url)
        .await
        .expect("connect");
    let refused = store.enqueue(new_job(), None).await.unwrap_err();
    assert!(refused.is_unavailable(), "{refused:?}");
    // Writable again (the new primary): the store writes at once. The connection that met
    // the refusal was closed, not pooled: it would have kept its session's read-only default.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db._database.url)
        .await
        .expect("admin connection");
    for sql in [
        "SET default_transaction_read_only = off".to_string(),
        format!("ALTER DATABASE \"{name}\" RESET default_transaction_read_only"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .expect("make the database writable");
    }
    sqlx::Connection::close(admin).await.expect("close");
    for _ in 0..3 {
        store.enqueue(new_job(), None).await.expect("a write");
    }
}

// Processes started together on one SQLite file (`serve` and `worker` after an upgrade) all
// migrate it at start. sqlx takes no lock for SQLite's migrations, so two of them applied the
// same migration at once, and the loser failed to start ("table jobs already exists", or the
// bookkeeping row's UNIQUE). Every one must start, with the schema migrated once.
#[tokio::test]
async fn processes_migrating_one_sqlite_file_at_once_all_start() {
    for round in 0..5 {
        let dir = tempfile::tempdir().expect("create temp dir");
        let url = format!("sqlite://{}", dir.path().join("fusion.db").display());
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(fusion::store::connect(&url).await.expect("connect"));
        }
        let migrated = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
        for (i, m) in migrated.iter().enumerate() {
            assert!(m.is_ok(), "round {round}, store {i}: {m:?}");
        }
        let job = enqueue(&stores[0], new_job()).await;
        assert!(stores[2].get_job(job.id).await.unwrap().is_some());
    }
}

/// A cancel whose caller goes away while it is under way (its client hung up) is announced if
/// its update lands: the job's worker, in this process, hears of cancels only so. Each cancel is
/// polled for a little longer than the one before (spread over what one whole cancel took
/// here), then dropped; rounds go on until a dropped one is seen to have landed.
async fn a_cancel_given_up_midway_is_still_announced(store: Arc<dyn Store>) {
    use std::task::{Context, Poll};
    let mut events = store.events();
    let whole = {
        let job = enqueue(&store, new_job()).await;
        let started = std::time::Instant::now();
        store.cancel(job.id, NOW).await.unwrap();
        started.elapsed()
    };
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut cancelled = HashSet::new();
    let mut caught = 0;
    for round in 0..20u32 {
        for _ in 0..30 {
            enqueue(&store, new_job()).await;
        }
        let ids: Vec<Uuid> = claim(&store, "w", 30, NOW)
            .await
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids.len(), 30);
        let mut dropped = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            // From nothing to 1.5 times a whole cancel, later rounds longer still.
            let window = whole * (i as u32) * (round + 2) / 40;
            let mut cancel = store.cancel(*id, NOW + 1_000);
            let give_up = std::time::Instant::now() + window;
            loop {
                if let Poll::Ready(done) = cancel.as_mut().poll(&mut cx) {
                    done.unwrap();
                    break;
                }
                if std::time::Instant::now() >= give_up {
                    dropped.push(*id);
                    break;
                }
                std::hint::spin_loop();
            }
            drop(cancel);
            tokio::task::yield_now().await;
        }
        // What is cancelled by now (and whatever lands still) must be heard of.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for id in &ids {
            if get(&store, *id).await.status == JobStatus::Cancelled {
                cancelled.insert(*id);
            }
        }
        caught += dropped.iter().filter(|id| cancelled.contains(id)).count();
        if caught > 0 {
            break;
        }
    }
    assert!(
        caught > 0,
        "no cancel was dropped after its update was under way (a whole one took {whole:?}): \
         the test saw nothing"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut unheard = cancelled.clone();
    while !unheard.is_empty() {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("{} cancels never announced", unheard.len()))
            .expect("event stream");
        if let JobEvent::Finished {
            job_id,
            status: JobStatus::Cancelled,
            ..
        } = event
        {
            unheard.remove(&job_id);
        }
    }
}
