//! Step retries: exponential backoff with jitter and a cap, honouring `Retry-After`. The jitter
//! source is injected and the sleeps are tokio's, so tests run on paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Completion, CompletionRequest, Upstream, UpstreamError};

/// The longest `Retry-After` we wait out within one step.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A source of uniform randomness in [0, 1).
pub type Jitter = Arc<dyn Fn() -> f64 + Send + Sync>;

#[derive(Clone)]
pub struct RetryPolicy {
    /// Calls per step, the first included.
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// Fraction of the delay randomised either way (0.1 = ±10 %).
    pub jitter_fraction: f64,
    pub jitter: Jitter,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base", &self.base)
            .field("cap", &self.cap)
            .field("jitter_fraction", &self.jitter_fraction)
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter_fraction: 0.1,
            jitter: Arc::new(rand::random::<f64>),
        }
    }
}

impl RetryPolicy {
    /// The wait before call number `failed + 1`, after `failed` failures (≥ 1).
    pub fn delay(&self, failed: u32, err: &UpstreamError) -> Duration {
        if let Some(after) = err.retry_after {
            // Honoured as asked, past our own cap, up to a sanity limit.
            return after.min(MAX_RETRY_AFTER);
        }
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(failed.saturating_sub(1)));
        let capped = exp.min(self.cap);
        let spread = (self.jitter)() * 2.0 - 1.0;
        capped.mul_f64((1.0 + self.jitter_fraction * spread).max(0.0))
    }
}

/// Why a retried call ended without a completion.
#[derive(Debug)]
pub enum CallError {
    Upstream(UpstreamError),
    Cancelled,
}

impl Upstream {
    /// Call until success, a fatal error, the attempts are used up, or `cancel` fires (which
    /// aborts the in-flight request at once).
    pub async fn complete_with_retries(
        &self,
        model: &str,
        req: &CompletionRequest,
        policy: &RetryPolicy,
        cancel: &CancellationToken,
    ) -> Result<Completion, CallError> {
        let mut failed = 0;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
                r = self.complete(model, req) => r,
            };
            match result {
                Ok(c) => return Ok(c),
                Err(e) => {
                    failed += 1;
                    if !e.retryable() || failed >= policy.max_attempts {
                        return Err(CallError::Upstream(e));
                    }
                    let wait = policy.delay(failed, &e);
                    tracing::debug!(model, attempt = failed, ?wait, error = %e, "retrying upstream call");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(CallError::Cancelled),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ErrorKind;

    fn policy(j: f64) -> RetryPolicy {
        RetryPolicy {
            jitter: Arc::new(move || j),
            ..RetryPolicy::default()
        }
    }

    fn err(retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError {
            kind: ErrorKind::Server,
            status: Some(500),
            retry_after,
            message: String::new(),
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let p = policy(0.5); // no jitter at the midpoint
        let waits: Vec<u64> = (1..=8).map(|n| p.delay(n, &err(None)).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn jitter_spreads_both_ways() {
        assert_eq!(
            policy(0.0).delay(3, &err(None)),
            Duration::from_millis(3600)
        );
        assert_eq!(
            policy(1.0).delay(3, &err(None)),
            Duration::from_millis(4400)
        );
    }

    #[test]
    fn retry_after_wins() {
        let p = policy(0.0);
        assert_eq!(
            p.delay(1, &err(Some(Duration::from_secs(7)))),
            Duration::from_secs(7)
        );
    }
}
