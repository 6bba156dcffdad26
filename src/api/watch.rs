//! Waiting on jobs without polling: one task reads the store's event stream and hands each event
//! to the requests watching that job (a synchronous chat completion, an SSE stream). A slow
//! fallback re-read covers missed events (a lagging receiver, SQLite shared across processes).
//! Closed when the process stops working (shutdown): waiting requests then answer with the job
//! as it is, so that the HTTP server's graceful shutdown is not held open by jobs handed back
//! to the queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::job::Job;
use crate::store::{JobEvent, Store, StoreError};

/// How often a watcher re-reads the job when no event arrives.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

type Subscribers = Arc<Mutex<HashMap<Uuid, Vec<mpsc::UnboundedSender<JobEvent>>>>>;

pub struct JobWatch {
    subscribers: Subscribers,
    closed: CancellationToken,
}

/// Events of one job; unsubscribes on drop.
pub struct Watcher {
    id: Uuid,
    rx: mpsc::UnboundedReceiver<JobEvent>,
    subscribers: Subscribers,
    closed: CancellationToken,
}

impl JobWatch {
    /// Start dispatching the store's events.
    pub fn start(store: &dyn Store) -> Arc<JobWatch> {
        let subscribers: Subscribers = Arc::default();
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
                            "job events lagged; watchers fall back to polling"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Arc::new(JobWatch {
            subscribers,
            closed: CancellationToken::new(),
        })
    }

    /// Stop every wait, now and from now on: this process has stopped working (its worker
    /// handed back what it ran, or it runs none), so a job not finished yet will not finish
    /// while its requests wait here.
    pub fn close(&self) {
        self.closed.cancel();
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
        }
    }
}

impl Watcher {
    /// The next event of this job, or `None` after the fallback interval passed without one
    /// (at once once the watch is closed).
    pub async fn next(&mut self) -> Option<JobEvent> {
        tokio::select! {
            _ = self.closed.cancelled() => None,
            event = tokio::time::timeout(FALLBACK_POLL, self.rx.recv()) => event.ok().flatten(),
        }
    }

    /// Whether waiting should stop (see `JobWatch::close`).
    pub fn closed(&self) -> bool {
        self.closed.is_cancelled()
    }
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
pub async fn wait_final(watch: &JobWatch, store: &dyn Store, id: Uuid) -> Result<Job, StoreError> {
    let mut watcher = watch.watch(id);
    loop {
        let job = store
            .get_job(id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("job {id} vanished")))?;
        if job.status.is_final() || watcher.closed() {
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
