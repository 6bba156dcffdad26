//! Jobs started by the process that takes their submission (`Worker::slot_for_new_job`): the
//! worker hands out a slot only when it may, and a slot used after shutdown began hands its job
//! back to the queue instead of running it unwatched.

use std::sync::Arc;
use std::time::Duration;

use fusion::clock::SystemClock;
use fusion::job::JobStatus;
use fusion::store::Enqueued;
use fusion::worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::fake_upstream::FakeUpstream;
use crate::pipelining::{new_job, pipeline};

#[tokio::test]
async fn a_job_started_at_its_submit_as_shutdown_begins_goes_back_to_the_queue() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fusion.db").display());
    let store = fusion::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let config = WorkerConfig {
        concurrency: 2,
        ..WorkerConfig::default()
    };
    let worker = Worker::new(
        store.clone(),
        Arc::new(pipeline(&fake)),
        Arc::new(SystemClock),
        config,
    );
    // No slot before the dispatcher's first claim has found the queue empty.
    assert!(worker.slot_for_new_job().is_none());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.clone().run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let slot = loop {
        if let Some(slot) = worker.slot_for_new_job() {
            break slot;
        }
        assert!(tokio::time::Instant::now() < deadline, "no free slot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let Enqueued::Created(job) = store
        .enqueue(new_job(), Some(slot.lease().clone()))
        .await
        .unwrap()
    else {
        panic!("expected a new job");
    };
    assert_eq!((job.status, job.attempt), (JobStatus::Running, 1));

    // Shutdown begins between the insert and the start: no slot is given out any more, and
    // the worker's shutdown waits for the one it gave out.
    shutdown.cancel();
    while worker.slot_for_new_job().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "shutdown did not wait for the slot");
    slot.run(job.clone()).await;
    running.await.unwrap();
    let back = store.get_job(job.id).await.unwrap().unwrap();
    // Handed back without spending its attempt: one more is allowed (its number stays).
    assert_eq!(
        (
            back.status,
            back.attempt,
            back.max_attempts,
            back.lease_owner
        ),
        (JobStatus::Queued, 1, job.max_attempts + 1, None)
    );
    assert_eq!(fake.total_calls(), 0);
}
