//! Group commit for the hot path, on both stores: enqueues, step checkpoints and job outcomes
//! from many requests and jobs queue here, alone or in groups that must share a commit (a job's
//! final step and its outcome), and a committer task hands whatever has queued up to the store's
//! `BatchSql`, which writes the lot with a few set-based statements (one round trip and one
//! commit for the batch, not one per write). Each write keeps its own fence and learns its own
//! result, only after the commit; a batch that fails is re-run in halves down to single groups,
//! so one bad write never fails its neighbours.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{OnReadOnly, Refusal, Result, StoreError};
use crate::job::{JobStatus, JsonText, Lease, NewJob, StartHere, Step, StepKey};

/// The most queued groups (a write, or a job's last checkpoint and outcome) one batch takes;
/// more wait for the next.
const MAX_BATCH: usize = 512;

/// About the most bytes of text (requests, answers, results) one batch statement carries; the
/// groups past it go in a statement of their own, after it. On Postgres a batch's texts go out
/// as one array per kind of write, in one message, and Postgres refuses a message over 1 GiB:
/// 512 submissions of 4 MiB bodies, or a few dozen jobs finishing with the longest answers an
/// upstream may send, would have failed together (SQLite binds each row's values on their own
/// and has no such bound; there, the cut only adds commits). A single group over it still goes,
/// alone.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// One write, its values ready to bind.
pub(super) enum Write {
    /// Insert a queued job (or, with `start`, one already running under that lease) unless its
    /// idempotency key exists: true when inserted.
    Enqueue {
        job: Box<NewJob>,
        start: Option<StartHere>,
    },
    /// Insert a checkpoint if the lease still holds and the step is new: true when inserted.
    /// The row is written with the lease's attempt (what the fence checks).
    Step { lease: Lease, step: Step },
    /// Move a running job to `succeeded` or `failed` if the lease still holds: true when moved.
    Finish(Finish),
}

pub(super) struct Finish {
    pub lease: Lease,
    /// `Succeeded` (with `result`) or `Failed` (with `reason` and `error`).
    pub status: JobStatus,
    pub result: Option<JsonText>,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub now: i64,
}

impl Write {
    /// About how many bytes of text the write binds (what `MAX_BATCH_BYTES` counts).
    fn text_bytes(&self) -> usize {
        let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let json = |j: &Option<JsonText>| j.as_ref().map_or(0, |j| j.as_str().len());
        match self {
            Write::Enqueue { job, .. } => {
                let spec = &job.spec;
                let texts = spec.messages.iter().chain(&spec.stop);
                let names = spec.panel.iter().map(String::len).sum::<usize>() + spec.analyst.len();
                // The format is stored twice: as the object, and as its text (escaped again).
                let format = spec.response_format.as_ref().map_or(0, |f| {
                    json_bytes(f) + json_bytes(&serde_json::Value::String(f.to_string()))
                });
                texts.map(json_bytes).sum::<usize>()
                    + format
                    + names
                    + json_bytes(&job.metadata)
                    + len(&job.idempotency_key)
                    + 256
            }
            Write::Step { step, .. } => {
                len(&step.content) + json(&step.data) + len(&step.error) + step.model.len()
            }
            Write::Finish(f) => json(&f.result) + len(&f.reason) + len(&f.error),
        }
    }
}

/// About the length of `value` as JSON text, without writing it, and never less: strings and
/// keys count their bytes as escaped at worst (a control character as `\u00XX`), numbers 24,
/// the rest their words. (Parsed JSON is nested at most 128 deep.)
fn json_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let text = |s: &str| {
        let escaped = s.bytes().map(|b| match b {
            0..0x20 => 5,
            b'"' | b'\\' => 1,
            _ => 0,
        });
        s.len() + 2 + escaped.sum::<usize>()
    };
    match value {
        Value::String(s) => text(s),
        Value::Array(items) => items.iter().map(|v| json_bytes(v) + 1).sum::<usize>() + 2,
        Value::Object(fields) => {
            let each = fields.iter().map(|(k, v)| text(k) + 2 + json_bytes(v));
            each.sum::<usize>() + 2
        }
        Value::Number(_) => 24,
        Value::Bool(_) | Value::Null => 5,
    }
}

impl Finish {
    pub fn succeeded(lease: &Lease, result: JsonText, now: i64) -> Finish {
        Finish {
            lease: lease.clone(),
            status: JobStatus::Succeeded,
            result: Some(result),
            reason: None,
            error: None,
            now,
        }
    }

    pub fn failed(lease: &Lease, reason: String, error: String, now: i64) -> Finish {
        Finish {
            lease: lease.clone(),
            status: JobStatus::Failed,
            result: None,
            reason: Some(reason),
            error: Some(error),
            now,
        }
    }
}

/// How a database writes a batch: all of `writes` in one transaction, and for each whether it
/// took effect.
#[async_trait]
pub(super) trait BatchSql: Send + Sync + 'static {
    async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error>;
}

/// Writes that land in one commit, and where to say which took effect.
struct Queued {
    writes: Vec<Write>,
    reply: oneshot::Sender<Result<Vec<bool>>>,
}

pub(super) struct Batcher {
    queue: mpsc::Sender<Queued>,
}

impl Batcher {
    /// Start the committer: one task per process, so one write transaction at a time. Its
    /// batches grow with the time each commit takes, so one keeps up with any write rate up to
    /// `MAX_BATCH` groups per commit. On Postgres, four committers writing side by side made
    /// smaller batches and cost it 1.4–1.7× the CPU per job (BENCHMARKS.md).
    pub(super) fn start(sql: impl BatchSql) -> Batcher {
        Self::start_bounded(sql, MAX_BATCH_BYTES)
    }

    /// `start`, with batch statements cut at about `max_bytes` of text.
    fn start_bounded(sql: impl BatchSql, max_bytes: usize) -> Batcher {
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(sql, rx, max_bytes));
        Batcher { queue }
    }

    /// Queue `write` for the next batch; whether it took effect, once committed.
    pub(super) async fn write(&self, write: Write) -> Result<bool> {
        let took = self.write_together(vec![write]).await?;
        Ok(took.first().copied().unwrap_or(false))
    }

    /// Queue a job's outcome with its final step, when there is one, so that both land in the
    /// same commit; whether the step was written, and whether the outcome took effect.
    pub(super) async fn finish_with_step(
        &self,
        step: Option<Write>,
        finish: Finish,
    ) -> Result<(bool, bool)> {
        let with_step = step.is_some();
        let mut writes: Vec<Write> = step.into_iter().collect();
        writes.push(Write::Finish(finish));
        let took = self.write_together(writes).await?;
        let stepped = with_step && took.first() == Some(&true);
        Ok((stepped, took.last() == Some(&true)))
    }

    /// Queue `writes` for the next batch, all in the same commit (and run in their kinds'
    /// order: enqueues, then checkpoints, then outcomes); whether each took effect.
    pub(super) async fn write_together(&self, writes: Vec<Write>) -> Result<Vec<bool>> {
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Database(sqlx::Error::PoolClosed);
        self.queue
            .send(Queued { writes, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn run<S: BatchSql>(sql: S, mut rx: mpsc::Receiver<Queued>, max_bytes: usize) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Whatever queued while the last batch was being written is the next batch: one statement,
    // or, past `max_bytes` of text, several, in the order queued.
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut writes = Vec::with_capacity(batch.len());
        let mut groups = Vec::with_capacity(batch.len());
        let mut bytes = 0;
        // Once a statement did not reach the database, the rest of the batch is not tried (it
        // would meet the same wait, one statement after another): it fails as that one did.
        let mut unreached = None;
        for q in batch.drain(..) {
            let weight: usize = q.writes.iter().map(Write::text_bytes).sum();
            if !groups.is_empty() && bytes + weight > max_bytes {
                unreached = write_groups(&sql, &writes, std::mem::take(&mut groups)).await;
                writes.clear();
                bytes = 0;
            }
            if let Some(e) = &unreached {
                let _ = q.reply.send(Err(again(e).into()));
                continue;
            }
            bytes += weight;
            groups.push((q.writes.len(), q.reply));
            writes.extend(q.writes);
        }
        if !groups.is_empty() {
            write_groups(&sql, &writes, groups).await;
        }
    }
}

/// `e` again, for one more caller: an error that `unreached` said did not reach the database
/// (its copies say so too; `PoolClosed` is never reached).
fn again(e: &sqlx::Error) -> sqlx::Error {
    unreached(e).unwrap_or(sqlx::Error::PoolClosed)
}

/// A group's size in writes, and where its result goes.
type Group = (usize, oneshot::Sender<Result<Vec<bool>>>);

/// Write `groups`, which hold `writes` in order, and answer each. When the database rejects a
/// statement, its groups are halved and each half written on its own, down to single groups,
/// which then fail alone with their own error: one bad group among `n` costs about `2 log2 n`
/// more statements, where trying every group alone cost `n` (and no other batch is written
/// meanwhile). The error, when a statement did not reach the database (see `unreached`).
async fn write_groups<S: BatchSql>(
    sql: &S,
    writes: &[Write],
    groups: Vec<Group>,
) -> Option<sqlx::Error> {
    let mut pending = vec![(0, groups)];
    while let Some((start, mut groups)) = pending.pop() {
        let len = groups.iter().map(|g| g.0).sum::<usize>();
        match sql.execute(&writes[start..start + len]).await {
            Ok(done) => {
                let mut done = done.into_iter();
                for (n, reply) in groups {
                    let _ = reply.send(Ok(done.by_ref().take(n).collect()));
                }
            }
            Err(e) if groups.len() > 1 && unreached(&e).is_none() => {
                let second = groups.split_off(groups.len() / 2);
                let first_len = groups.iter().map(|g| g.0).sum::<usize>();
                // The first half is written first: the stack pops it next.
                pending.push((start + first_len, second));
                pending.push((start, groups));
            }
            // One group left, or the database was not reached: every group gets the error.
            Err(e) => {
                let mut groups = groups.into_iter();
                let first = groups.next();
                for (_, other) in groups {
                    if let Some(again) = unreached(&e) {
                        let _ = other.send(Err(again.into()));
                    }
                }
                let not_reached = unreached(&e);
                if let Some((_, first)) = first {
                    let _ = first.send(Err(e.into()));
                }
                if let Some(e) = not_reached {
                    // What is left of a halved batch fails the same way, untried.
                    for (_, groups) in pending.drain(..) {
                        for (_, other) in groups {
                            let _ = other.send(Err(again(&e).into()));
                        }
                    }
                    return Some(e);
                }
            }
        }
    }
    None
}

/// The same error again, when it says the statement never reached the database or never came
/// back (no connection in time, the pool closed, the connection broke), gave up waiting for a
/// lock held elsewhere (Postgres's statement timeout, SQLite's busy timeout), or met a server
/// that takes no writes (a standby after a failover): halving the batch would only meet it
/// again, each half after the same wait, while every other write waits behind it. Such a failure goes to every group of the batch at once, and their callers retry.
/// The copy says whether the statement may have committed as the error does: an I/O error met
/// before anything went out, a statement the database cancelled or refused, did not.
fn unreached(e: &sqlx::Error) -> Option<sqlx::Error> {
    let again = |kind, message: String| Some(sqlx::Error::Io(std::io::Error::new(kind, message)));
    let unsent = |kind, message: String| {
        let io = std::io::Error::new(kind, message);
        Some(super::not_sent(sqlx::Error::Io(io)))
    };
    match e {
        sqlx::Error::PoolTimedOut => Some(sqlx::Error::PoolTimedOut),
        sqlx::Error::PoolClosed => Some(sqlx::Error::PoolClosed),
        // SQLite's worker thread died, maybe after the commit: halves written again would find
        // their rows written and answer "fenced out" to writes that landed.
        sqlx::Error::WorkerCrashed => Some(sqlx::Error::WorkerCrashed),
        sqlx::Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<super::NotSent>()) => {
            unsent(io.kind(), io.to_string())
        }
        sqlx::Error::Io(io) => again(io.kind(), io.to_string()),
        sqlx::Error::Database(db) if gave_up_waiting(db.as_ref()) => {
            unsent(std::io::ErrorKind::TimedOut, db.to_string())
        }
        sqlx::Error::Database(db) if e.read_only() => {
            unsent(std::io::ErrorKind::PermissionDenied, db.to_string())
        }
        _ => None,
    }
}

/// Whether the database cancelled the statement after a wait: Postgres's `query_canceled` (the
/// statement timeout) or `lock_not_available`, SQLite's `SQLITE_BUSY` (the busy timeout).
fn gave_up_waiting(db: &dyn sqlx::error::DatabaseError) -> bool {
    match super::refusal(db) {
        Refusal::Postgres(code) => matches!(code, "57014" | "55P03"),
        Refusal::Sqlite(primary) => primary == super::SQLITE_BUSY,
        Refusal::Other => false,
    }
}

/// A write that took effect, as the row its batch statement returned names it: its kind (`e`,
/// `s` or `f`), job id, step (checkpoints) and attempt (checkpoints and outcomes). Typed, so that
/// matching rows to writes formats nothing.
pub(super) type Took = (u8, Uuid, Option<StepKey>, Option<i64>);

/// The key of a row a batch statement returned: `kind` (`e`, `s` or `f`), job id, step name and
/// attempt, as the statement's columns hold them. A row that is none of ours matches no write.
pub(super) fn took_row(kind: &str, id: Uuid, step: Option<&str>, attempt: Option<i64>) -> Took {
    match (kind, step.map(StepKey::parse), attempt) {
        ("s", Some(Some(key)), Some(_)) => (b's', id, Some(key), attempt),
        ("e", None, None) => (b'e', id, None, None),
        ("f", None, Some(_)) => (b'f', id, None, attempt),
        _ => (b'?', id, None, attempt),
    }
}

/// Which of `writes` took effect, given the rows their batch returned. Sorted and searched
/// rather than hashed: SipHash over every key cost more than the sort.
pub(super) fn which_took(writes: &[Write], returned: impl IntoIterator<Item = Took>) -> Vec<bool> {
    let mut took: Vec<Took> = returned.into_iter().collect();
    took.sort_unstable();
    writes
        .iter()
        .map(|w| took.binary_search(&took_key(w)).is_ok())
        .collect()
}

/// The key a write's row comes back under when it took effect.
fn took_key(write: &Write) -> Took {
    match write {
        Write::Enqueue { job, .. } => (b'e', job.id, None, None),
        Write::Step { lease, step } => (
            b's',
            lease.job_id,
            Some(step.key),
            Some(i64::from(lease.attempt)),
        ),
        Write::Finish(f) => (b'f', f.lease.job_id, None, Some(i64::from(f.lease.attempt))),
    }
}

/// For both stores' tests: `writes`, queued together behind a lock held elsewhere, all fail
/// with an error that mentions `why`, together, within `within` of the start (halved like a
/// batch with a bad write in it, they would wait once per half); still waiting after `give_up`
/// fails the test.
#[cfg(test)]
pub(super) async fn all_fail_at_once_behind_a_lock<T: std::fmt::Debug>(
    writes: impl Future<Output = Vec<Result<T>>>,
    why: &str,
    within: std::time::Duration,
    give_up: std::time::Duration,
) {
    let started = std::time::Instant::now();
    let results = tokio::time::timeout(give_up, writes)
        .await
        .unwrap_or_else(|_| panic!("the writes were still waiting after {give_up:?}"));
    let waited = started.elapsed();
    for result in &results {
        let error = result.as_ref().unwrap_err().to_string();
        assert!(error.contains(why), "{error}");
    }
    assert!(
        waited < within,
        "{} writes failed after {waited:?}: the batch was halved, one wait per half",
        results.len()
    );
}

/// For both stores' tests: two outcomes of job `job_id` in one batch, under an earlier lease
/// (attempt 1 of `w1`) and the job's current one (attempt 2 of `w2`, set up by the caller). Only
/// the current one takes, and only it is told so: matched by job id alone, both were.
#[cfg(test)]
pub(super) async fn only_the_current_lease_of_two_outcomes_takes(
    sql: &impl BatchSql,
    job_id: uuid::Uuid,
) {
    let old = Lease {
        job_id,
        attempt: 1,
        owner: "w1".into(),
    };
    let current = Lease {
        job_id,
        attempt: 2,
        owner: "w2".into(),
    };
    let result = JsonText::from(serde_json::json!({"answer": "current"}));
    let writes = [
        Write::Finish(Finish::failed(&old, "stale".into(), "stale".into(), 1)),
        Write::Finish(Finish::succeeded(&current, result, 2)),
    ];
    assert_eq!(sql.execute(&writes).await.unwrap(), vec![false, true]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fails any batch holding a step called `bad`, and counts the batches it saw.
    struct Picky(Arc<AtomicUsize>);

    #[async_trait]
    impl BatchSql for Picky {
        async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let bad = |w: &Write| matches!(w, Write::Step { step, .. } if step.model == "bad");
            if writes.iter().any(bad) {
                return Err(sqlx::Error::Protocol("bad step".into()));
            }
            Ok(writes.iter().map(|_| true).collect())
        }
    }

    fn step(model: &str) -> Write {
        Write::Step {
            lease: Lease {
                job_id: uuid::Uuid::now_v7(),
                attempt: 1,
                owner: "w".into(),
            },
            step: Step {
                key: crate::job::StepKey::Final,
                model: model.into(),
                ok: true,
                content: None,
                data: None,
                usage: Default::default(),
                latency_ms: 0,
                error_code: None,
                error: None,
                status_code: None,
                attempt: 1,
                created_at: 0,
            },
        }
    }

    // One current-thread runtime: all three writes are queued before the committer runs, so
    // they land in one batch, which fails and is re-run in halves: `a`, then `bad` and `c`
    // (failing), then `bad` and `c` alone.
    #[tokio::test]
    async fn one_bad_write_in_a_batch_fails_alone() {
        let batches = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::start(Picky(batches.clone()));
        let (a, bad, c) = tokio::join!(
            batcher.write(step("a")),
            batcher.write(step("bad")),
            batcher.write(step("c"))
        );
        assert!(a.unwrap() && c.unwrap());
        assert!(bad.is_err());
        assert_eq!(batches.load(Ordering::SeqCst), 1 + 4);
    }

    // Writes queued together share a commit: when the batch fails, they are re-run together
    // (and fail together), apart from the others.
    #[tokio::test]
    async fn writes_queued_together_land_or_fail_together() {
        let batches = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::start(Picky(batches.clone()));
        let (pair, bad_pair, alone) = tokio::join!(
            batcher.write_together(vec![step("a"), step("b")]),
            batcher.write_together(vec![step("c"), step("bad")]),
            batcher.write(step("d"))
        );
        assert_eq!(pair.unwrap(), vec![true, true]);
        assert!(bad_pair.is_err());
        assert!(alone.unwrap());
        assert_eq!(batches.load(Ordering::SeqCst), 1 + 4);
    }

    // One bad write among 64 costs a statement per half on its way down, two per level of
    // six: 13 statements in all, where trying each write alone took 65; the other 63 land.
    #[tokio::test]
    async fn a_failed_batch_is_halved_until_the_bad_write_is_alone() {
        let batches = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::start(Picky(batches.clone()));
        let writes = (0..64).map(|i| batcher.write(step(if i == 41 { "bad" } else { "ok" })));
        let results = futures::future::join_all(writes).await;
        for (i, result) in results.iter().enumerate() {
            assert_eq!(result.is_err(), i == 41, "write {i}: {result:?}");
        }
        assert_eq!(batches.load(Ordering::SeqCst), 13);
    }

    /// Records each batch it was handed: its writes' models, in order.
    #[derive(Clone, Default)]
    struct Recording(Arc<std::sync::Mutex<Vec<Vec<String>>>>);

    #[async_trait]
    impl BatchSql for Recording {
        async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            let models = writes.iter().map(|w| match w {
                Write::Step { step, .. } => step.model.clone(),
                _ => "?".into(),
            });
            self.0.lock().unwrap().push(models.collect());
            Ok(writes.iter().map(|_| true).collect())
        }
    }

    // What queued together is cut into statements of at most `max_bytes` of text, in the order
    // queued, a group never split; a group over the bound goes alone. (Current-thread runtime:
    // all is queued before the committer runs.) Before, one statement took all 512 groups,
    // whatever their size.
    #[tokio::test]
    async fn a_batch_is_cut_by_its_text_as_well_as_its_count() {
        let recording = Recording::default();
        let batcher = Batcher::start_bounded(recording.clone(), 100);
        let sized = |model: &str, bytes: usize| {
            let Write::Step { lease, mut step } = step(model) else {
                unreachable!()
            };
            step.content = Some("x".repeat(bytes - 1));
            Write::Step { lease, step }
        };
        let (a, b, cd, e, f) = tokio::join!(
            batcher.write(sized("a", 46)),
            batcher.write(sized("b", 46)),
            batcher.write_together(vec![sized("c", 46), sized("d", 46)]),
            batcher.write(sized("e", 201)),
            batcher.write(sized("f", 11)),
        );
        assert!(a.unwrap() && b.unwrap() && e.unwrap() && f.unwrap());
        assert_eq!(cd.unwrap(), [true, true]);
        let batches = recording.0.lock().unwrap().clone();
        assert_eq!(
            batches,
            [vec!["a", "b"], vec!["c", "d"], vec!["e"], vec!["f"]]
        );
    }

    #[test]
    fn json_text_is_sized_without_writing_it() {
        for value in [
            serde_json::json!({"role": "user", "content": "hello"}),
            serde_json::json!([{"type": "text", "text": "a longer part"}, null, 1.5, true]),
            serde_json::json!("é".repeat(1000)),
            serde_json::json!({"q\"uo\\te": "line\nbreaks\ttabs\u{1}\"quotes\"\\"}),
            serde_json::json!([
                "\u{0}".repeat(100),
                -1.2345678901234567e-300,
                u64::MAX,
                i64::MIN
            ]),
            serde_json::json!([[], {}, [[[]]], false]),
        ] {
            let written = serde_json::to_string(&value).unwrap().len();
            let sized = json_bytes(&value);
            assert!(
                written <= sized && sized <= 2 * written,
                "{written} {sized}: {value}"
            );
        }
    }

    // A submission is sized by all of its request, not its messages alone: a 4 MiB
    // `response_format` schema with a one-word prompt weighs 4 MiB.
    #[test]
    fn a_submission_weighs_its_whole_request() {
        // Quotes and backslashes, which the format's stored text escapes once more.
        let schema = serde_json::json!({"type": "json_schema", "json_schema": {
            "name": "big", "schema": {"description": "x\"\\".repeat(1 << 20)}}});
        let job = NewJob {
            id: uuid::Uuid::now_v7(),
            spec: crate::job::JobSpec {
                model: "fusion".into(),
                messages: vec![serde_json::json!({"role": "user", "content": "hi"})],
                panel: vec!["a".into()],
                analyst: "a".into(),
                temperature: None,
                max_completion_tokens: None,
                min_panel: 1,
                panel_timeout_ms: None,
                response_format: Some(schema),
                stop: Some(serde_json::json!(["y".repeat(1000)])),
            },
            metadata: serde_json::json!({}),
            priority: 0,
            max_attempts: 1,
            deadline_at: None,
            idempotency_key: None,
            request_hash: None,
            created_at: 0,
        };
        let written = serde_json::to_string(&job.spec).unwrap().len();
        let sized = Write::Enqueue {
            job: Box::new(job),
            start: None,
        }
        .text_bytes();
        assert!(
            written <= sized && sized < written + 1024,
            "{written} {sized}"
        );
    }

    /// Fails every batch as a pool that cannot connect does, recording each batch's models.
    #[derive(Clone, Default)]
    struct DownRecording(Recording);

    #[async_trait]
    impl BatchSql for DownRecording {
        async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            self.0.execute(writes).await?;
            Err(sqlx::Error::PoolTimedOut)
        }
    }

    // A batch cut in parts whose first part did not reach the database: the other parts fail
    // with it, untried (each would have waited out the pool's timeout in turn).
    #[tokio::test]
    async fn when_a_cut_batch_does_not_reach_the_database_its_other_parts_are_not_tried() {
        let down = DownRecording::default();
        let batcher = Batcher::start_bounded(down.clone(), 10);
        let writes = ["a", "b", "c"].map(|m| {
            let Write::Step { lease, mut step } = step(m) else {
                unreachable!()
            };
            step.content = Some("x".repeat(9));
            batcher.write(Write::Step { lease, step })
        });
        for result in futures::future::join_all(writes).await {
            assert!(matches!(
                result,
                Err(StoreError::Database(sqlx::Error::PoolTimedOut))
            ));
        }
        assert_eq!(*down.0.0.lock().unwrap(), [vec!["a"]]);
    }

    /// Records how many batches it was handed at once, and how many in all.
    #[derive(Clone, Default)]
    struct Slow {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        batches: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl BatchSql for Slow {
        async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            let at_once = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(at_once, Ordering::SeqCst);
            self.batches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(writes.iter().map(|_| true).collect())
        }
    }

    // One write transaction at a time: while a batch is being written, what queues meanwhile
    // waits and goes out as the next batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_is_written_at_a_time_and_the_rest_wait_for_the_next() {
        let slow = Slow::default();
        let batcher = Arc::new(Batcher::start(slow.clone()));
        let writers: Vec<_> = (0..64)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(i % 16)).await;
                    batcher.write(step("a")).await
                })
            })
            .collect();
        for writer in writers {
            assert!(writer.await.unwrap().unwrap());
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 1);
        let batches = slow.batches.load(Ordering::SeqCst);
        assert!(batches < 64, "{batches} batches for 64 writes");
    }

    /// Fails every batch as a pool that cannot connect does, and counts them.
    struct Down(Arc<AtomicUsize>);

    #[async_trait]
    impl BatchSql for Down {
        async fn execute(&self, _: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(sqlx::Error::PoolTimedOut)
        }
    }

    // The database out of reach: one statement, and every write of the batch gets the error at
    // once (halving would wait out the pool's timeout 2n - 1 times).
    #[tokio::test]
    async fn when_the_database_is_out_of_reach_the_whole_batch_fails_at_once() {
        let batches = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::start(Down(batches.clone()));
        let writes = (0..16).map(|_| batcher.write(step("a")));
        for result in futures::future::join_all(writes).await {
            assert!(matches!(
                result,
                Err(StoreError::Database(sqlx::Error::PoolTimedOut))
            ));
        }
        assert_eq!(batches.load(Ordering::SeqCst), 1);
    }

    /// Fails every batch with `error()`.
    struct Failing(fn() -> sqlx::Error);

    #[async_trait]
    impl BatchSql for Failing {
        async fn execute(&self, _: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            Err((self.0)())
        }
    }

    /// Commits every batch, but answers the first with `error()` (a failure after the commit);
    /// later ones as a database whose rows are already written answers them: nothing took.
    struct CommittedThenFailed(fn() -> sqlx::Error, std::sync::atomic::AtomicBool);

    #[async_trait]
    impl BatchSql for CommittedThenFailed {
        async fn execute(&self, writes: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
            match self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
                false => Err((self.0)()),
                true => Ok(vec![false; writes.len()]),
            }
        }
    }

    // A batch that failed in a way that may have committed it (SQLite's worker thread died) is
    // not halved and written again: the halves would find their rows written and answer
    // "fenced out" to writes that landed, and the worker would give up a job it still held.
    // Every write gets the error, which says it may have landed, so its caller reads it back.
    #[tokio::test]
    async fn a_batch_that_may_have_committed_is_not_written_again() {
        let sql = CommittedThenFailed(|| sqlx::Error::WorkerCrashed, false.into());
        let batcher = Batcher::start(sql);
        let writes = (0..4).map(|_| batcher.write(step("a")));
        for result in futures::future::join_all(writes).await {
            let e = result.unwrap_err();
            assert!(e.may_have_committed(), "{e:?}");
        }
    }

    // Every write of a batch that failed at once is told whether it may have landed as the
    // batch's error says, not only the first: a connection that never opened, a statement the
    // database cancelled or refused, did not; a connection broken mid-statement may have.
    #[tokio::test]
    async fn every_write_of_a_failed_batch_is_told_whether_it_may_have_landed() {
        let cases: [(fn() -> sqlx::Error, bool); 3] = [
            (
                || {
                    super::super::not_sent(sqlx::Error::Io(std::io::Error::from(
                        std::io::ErrorKind::ConnectionReset,
                    )))
                },
                false,
            ),
            (
                || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                true,
            ),
            (|| sqlx::Error::PoolTimedOut, false),
        ];
        for (error, may) in cases {
            let batcher = Batcher::start(Failing(error));
            let writes = (0..4).map(|_| batcher.write(step("a")));
            for result in futures::future::join_all(writes).await {
                let e = result.unwrap_err();
                assert!(e.is_unavailable(), "{e:?}");
                assert_eq!(e.may_have_committed(), may, "{e:?}");
            }
        }
    }
}
