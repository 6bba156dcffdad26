//! The worker's side of checkpointing: writes fenced on the job's lease, retried through brief
//! database outages so a blip does not throw away finished upstream work.

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::backoff;
use crate::fusion::{Checkpoints, Lost};
use crate::job::{Lease, Step};
use crate::store::{Store, StoreError};

/// How many times one write is tried before the job is left to lease expiry.
const DB_ATTEMPTS: u32 = 12;

pub(super) struct LeaseCheckpoints<'a> {
    pub store: &'a dyn Store,
    pub lease: &'a Lease,
    pub stop: &'a CancellationToken,
}

#[async_trait]
impl Checkpoints for LeaseCheckpoints<'_> {
    async fn save(&self, step: &Step) -> Result<(), Lost> {
        match with_db_retries(self.stop, || self.store.save_step(self.lease, step)).await {
            Some(true) => Ok(()),
            _ => Err(Lost),
        }
    }
}

/// Run a store call, retrying database errors with backoff. `None` when it never succeeded (or
/// `stop` fired while waiting).
pub(crate) async fn with_db_retries<T, F, Fut>(stop: &CancellationToken, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    for failures in 1..=DB_ATTEMPTS {
        match call().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, failures, "database write failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    }
    None
}
