//! Checkpoint writes in flight while the workflow goes on: the next upstream call starts as soon
//! as the step before it has answered, not once that answer is on disk, so a checkpoint costs
//! the critical path nothing (even when the database lags behind). Order is kept where it
//! matters: a step's write is sent only after every write it builds on has landed, and a failed
//! write (the lease is gone) stops the call under way at once.

use std::pin::pin;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;

use super::{Checkpoints, Lost};
use crate::job::Step;

pub(super) struct Saves<'a> {
    sink: &'a dyn Checkpoints,
    pending: FuturesUnordered<BoxFuture<'a, Result<(), Lost>>>,
}

impl<'a> Saves<'a> {
    pub fn new(sink: &'a dyn Checkpoints) -> Saves<'a> {
        Saves {
            sink,
            pending: FuturesUnordered::new(),
        }
    }

    /// Where the steps go (and whether the job may call again, see `Checkpoints::before_call`).
    pub fn sink(&self) -> &'a dyn Checkpoints {
        self.sink
    }

    /// Start writing `step`; whether it landed is learnt by `settle` or `alongside`.
    pub fn start(&mut self, step: Step) {
        let sink = self.sink;
        self.pending
            .push(Box::pin(async move { sink.save(&step).await }));
    }

    /// Start writing `step` once every write started so far has landed (the step builds on
    /// them), without waiting here: the caller goes on to its next call meanwhile.
    pub fn start_after_earlier(&mut self, step: Step) {
        let sink = self.sink;
        let mut earlier = std::mem::take(&mut self.pending);
        self.pending.push(Box::pin(async move {
            while let Some(saved) = earlier.next().await {
                saved?;
            }
            sink.save(&step).await
        }));
    }

    /// Wait until every write started so far has landed.
    pub async fn settle(&mut self) -> Result<(), Lost> {
        while let Some(saved) = self.pending.next().await {
            saved?;
        }
        Ok(())
    }

    /// Run `work` while the writes started so far land; `Err(Lost)` as soon as one of them
    /// fails, dropping `work` (an upstream call is then abandoned, not paid for to the end).
    /// Writes still in flight when `work` is done stay pending.
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> Result<T, Lost> {
        let mut work = pin!(work);
        loop {
            tokio::select! {
                biased;
                Some(saved) = self.pending.next(), if !self.pending.is_empty() => saved?,
                done = &mut work => return Ok(done),
            }
        }
    }
}
