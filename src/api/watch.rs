//! Waiting on jobs without polling each: one task reads the store's event stream and hands each
//! event to the requests watching that job (a synchronous chat completion, an SSE stream), and
//! once a second one read of every watched job's progress (`Store::progress`) tells the
//! watchers of a job that changed what no event said (a job finished or stepped in another
//! process, a lagging receiver). Closed when the process stops working (shutdown): waiting requests then answer with the job
//! as it is, so that the HTTP server's graceful shutdown is not held open by jobs handed back
//! to the queue. A read of the job that fails is retried with backoff, for up to `[server]
//! wait_outage_seconds`: a wait that ended on a blip would be answered with an error, and a
//! client that retried it would pay for a new job.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ApiError;
use crate::job::{Job, Step};
use crate::store::{JobEvent, Progress, Store, StoreError};
use crate::worker::{Patience, retry_db};

/// How often the watched jobs' progress is read, for what no event said.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

type Subscribers = Arc<Mutex<HashMap<Uuid, Vec<mpsc::UnboundedSender<JobEvent>>>>>;

pub struct JobWatch {
    subscribers: Subscribers,
    closed: CancellationToken,
    /// How long failed reads of a job are retried before a wait gives up.
    outage: Duration,
}

/// Events of one job; unsubscribes on drop.
pub struct Watcher {
    id: Uuid,
    rx: mpsc::UnboundedReceiver<JobEvent>,
    subscribers: Subscribers,
    closed: CancellationToken,
    outage: Duration,
}

impl JobWatch {
    /// Start dispatching the store's events, and reading the watched jobs' progress each second;
    /// waits ride out failed reads for up to `outage`.
    pub fn start(store: Arc<dyn Store>, outage: Duration) -> Arc<JobWatch> {
        let subscribers: Subscribers = Arc::default();
        let closed = CancellationToken::new();
        let mut events = store.events();
        let subs = subscribers.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let mut map = subs.lock().expect("subscribers");
                        match event.job_id() {
                            Some(id) => {
                                if let Some(list) = map.get_mut(&id) {
                                    list.retain(|tx| tx.send(event.clone()).is_ok());
                                }
                            }
                            // Every watcher re-reads its job.
                            None => map
                                .values_mut()
                                .for_each(|list| list.retain(|tx| tx.send(event.clone()).is_ok())),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(
                            missed = n,
                            "job events lagged; the progress read finds what they said"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let store = Arc::downgrade(&store);
        tokio::spawn(poll_progress(store, subscribers.clone(), closed.clone()));
        Arc::new(JobWatch {
            subscribers,
            closed,
            outage,
        })
    }

    /// Stop every wait, now and from now on: this process has stopped working (its worker
    /// handed back what it ran, or it runs none), so a job not finished yet will not finish
    /// while its requests wait here.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// The checkpoints of job `id` (one that was waited on), riding out failed reads as a
    /// wait does: the job ran, and was paid for, so a blip must not turn its answer into an
    /// error.
    pub async fn read_steps(&self, store: &dyn Store, id: Uuid) -> Result<Vec<Step>, ApiError> {
        ride_out(&self.closed, self.outage, id, || store.get_steps(id)).await
    }

    pub fn watch(&self, id: Uuid) -> Watcher {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .expect("subscribers")
            .entry(id)
            .or_default()
            .push(tx);
        Watcher {
            id,
            rx,
            subscribers: self.subscribers.clone(),
            closed: self.closed.clone(),
            outage: self.outage,
        }
    }
}

impl Watcher {
    /// The news of this job since the last call, as one event (`Missed`: it changed, or may
    /// have, in a way no event said; re-read it), or `None` once the watch is closed. What
    /// queued while the watcher was busy comes as the one that says most (a finish, else a
    /// `Missed`, else the last step): one re-read answers for all of it. (A wait riding out an
    /// outage is told each second the progress read fails; once the database is back, one
    /// re-read, not one per second it was away.)
    pub async fn next(&mut self) -> Option<JobEvent> {
        let first = tokio::select! {
            _ = self.closed.cancelled() => return None,
            event = self.rx.recv() => event?,
        };
        let mut news = first;
        while let Ok(more) = self.rx.try_recv() {
            let rank = |e: &JobEvent| match e {
                JobEvent::Finished { .. } => 2,
                JobEvent::Missed => 1,
                JobEvent::Step { .. } => 0,
            };
            if rank(&more) >= rank(&news) {
                news = more;
            }
        }
        Some(news)
    }

    /// Whether waiting should stop (see `JobWatch::close`).
    pub fn closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// The job once it is settled: final, or the watch closed (`Some`, the job as stored then);
    /// `None` while it runs or waits. Until then only its status is read (`Store::job_status`),
    /// not its request (possibly megabytes), on every event; the whole job is read once. Not final in that read although its status was (a retry requeued it between
    /// the two): still `None`. A database error is retried with backoff until the watch's outage
    /// bound has passed (or the watch closes); then the answer names the job, to fetch it by
    /// later.
    pub async fn settled(&self, store: &dyn Store) -> Result<Option<Job>, ApiError> {
        let status = self.present(|| store.job_status(self.id)).await?;
        if !status.is_final() && !self.closed() {
            return Ok(None);
        }
        let job = self.present(|| store.get_job(self.id)).await?;
        Ok((job.status.is_final() || self.closed()).then_some(job))
    }

    /// `read` (of this watcher's job), ridden out; a job that is not there is an error.
    async fn present<T, F, Fut>(&self, read: F) -> Result<T, ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, StoreError>>,
    {
        let read = || async {
            read()
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("job {} vanished", self.id)))
        };
        ride_out(&self.closed, self.outage, self.id, read).await
    }
}

/// Once a second, where every watched job stands, in one read; each watcher of a job whose
/// standing changed since the last read is told (`JobEvent::Missed`: re-read it), as is each
/// watcher of a job seen for the first time (it may have changed between the watcher's own
/// read and this one). A read that fails tells every watcher, whose own re-read then rides out
/// the outage as any read of a wait does, and ends the wait with an answer naming the job when
/// the database stays away. Before, each watcher re-read its job every second: one read per
/// waiting request per second, however many waited.
/// Ends with the store (held weakly, so that a server dropped unstarted lets it go) or the
/// watch.
async fn poll_progress(
    store: Weak<dyn Store>,
    subscribers: Subscribers,
    closed: CancellationToken,
) {
    let mut seen: HashMap<Uuid, Progress> = HashMap::new();
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(FALLBACK_POLL) => {}
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        let ids: Vec<Uuid> = {
            let map = subscribers.lock().expect("subscribers");
            seen.retain(|id, _| map.contains_key(id));
            map.keys().copied().collect()
        };
        if ids.is_empty() {
            continue;
        }
        let changed: Vec<Uuid> = match store.progress(&ids).await {
            Ok(now) => {
                let mut found = 0;
                let mut changed = Vec::new();
                for p in now {
                    found += 1;
                    match seen.entry(p.id) {
                        Entry::Occupied(e) if *e.get() == p => {}
                        Entry::Occupied(mut e) => {
                            e.insert(p);
                            changed.push(p.id);
                        }
                        Entry::Vacant(e) => {
                            e.insert(p);
                            changed.push(p.id);
                        }
                    }
                }
                // A job gone from the store: its watchers' own read says so.
                if found < ids.len() {
                    changed.extend(ids.iter().filter(|id| !seen.contains_key(id)));
                }
                changed
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the watched jobs failed; each re-reads its own");
                ids
            }
        };
        let mut map = subscribers.lock().expect("subscribers");
        for id in changed {
            if let Some(list) = map.get_mut(&id) {
                list.retain(|tx| tx.send(JobEvent::Missed).is_ok());
            }
        }
    }
}

/// `read` of job `id`, a failure retried with backoff for up to `outage` (or until `closed`);
/// then the answer names the job, to fetch it by later.
async fn ride_out<T, F, Fut>(
    closed: &CancellationToken,
    outage: Duration,
    id: Uuid,
    read: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    retry_db(closed, Patience::For(outage), read)
        .await
        .map_err(|error| unreadable(id, error))
}

/// The answer of a wait that could not read its job: the job is not lost, so the answer names it
/// rather than inviting a retry (a new job).
fn unreadable(id: Uuid, error: StoreError) -> ApiError {
    let generic = ApiError::from(error);
    let why = match generic.code == "database_unavailable" {
        true => "the database is unavailable",
        false => "an internal error occurred",
    };
    let message = format!(
        "could not read fusion job {id} while waiting on it ({why}); the job is not lost: \
         fetch it later from GET /v1/jobs/{id}"
    );
    ApiError::new(generic.status, generic.code, message).after_jobs(&[id])
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Closing our end marks our sender closed, so it is pruned with any other dead ones.
        self.rx.close();
        let mut map = self.subscribers.lock().expect("subscribers");
        if let Some(list) = map.get_mut(&self.id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

/// Wait until the job is final, or the watch is closed (the job is then returned as it is, not
/// final). The watcher is taken before the first read, so no event can slip between the read
/// and the wait.
pub async fn wait_final(watch: &JobWatch, store: &dyn Store, id: Uuid) -> Result<Job, ApiError> {
    let mut watcher = watch.watch(id);
    loop {
        if let Some(job) = watcher.settled(store).await? {
            return Ok(job);
        }
        // Step events do not finish a job; skip them rather than re-reading on each.
        while let Some(event) = watcher.next().await {
            if matches!(event, JobEvent::Finished { .. } | JobEvent::Missed) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobStatus, StepKey};

    /// A watcher on a channel of its own, and that channel's sender.
    fn watcher() -> (Watcher, mpsc::UnboundedSender<JobEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher {
            id: Uuid::now_v7(),
            rx,
            subscribers: Arc::default(),
            closed: CancellationToken::new(),
            outage: Duration::from_secs(1),
        };
        (watcher, tx)
    }

    // What queued while a wait was busy (a minute of an outage's tellings, steps, a finish)
    // comes as one event, the one that says most: one re-read, not one per telling.
    #[tokio::test]
    async fn news_that_queued_comes_as_one_event_that_says_most() {
        let (mut watcher, tx) = watcher();
        let job_id = watcher.id;
        let step = JobEvent::Step {
            job_id,
            step: StepKey::Panel(0),
        };
        let finished = JobEvent::Finished {
            job_id,
            status: JobStatus::Succeeded,
            attempt: 1,
        };
        for event in [
            JobEvent::Missed,
            step.clone(),
            finished.clone(),
            JobEvent::Missed,
        ] {
            tx.send(event).unwrap();
        }
        assert_eq!(watcher.next().await, Some(finished));
        for _ in 0..60 {
            tx.send(JobEvent::Missed).unwrap();
        }
        tx.send(step.clone()).unwrap();
        assert_eq!(watcher.next().await, Some(JobEvent::Missed));
        tx.send(step.clone()).unwrap();
        assert_eq!(watcher.next().await, Some(step));
        let nothing = tokio::time::timeout(Duration::from_millis(50), watcher.next()).await;
        assert!(nothing.is_err(), "{nothing:?}");
        watcher.closed.cancel();
        assert_eq!(watcher.next().await, None);
    }
}
