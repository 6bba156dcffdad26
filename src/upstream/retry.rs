//! Step retries: exponential backoff with jitter and a cap, honouring `Retry-After`. The jitter
//! source is injected and the sleeps are tokio's, so tests run on paused time.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Completion, CompletionRequest, Upstream, UpstreamError};
use crate::job::Usage;

/// The longest `Retry-After` we wait out within one step, and pass on to a client. A step asked
/// to wait longer (a quota that resets in an hour) whose job can be requeued for it ends at once
/// with that error, and its job waits in the queue instead (`Job::next_try_after`), holding no
/// worker slot meanwhile; any other waits about this long (`RetryPolicy::delay`) and asks again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

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
    /// The wait before call number `failed + 1`, after `failed` failures (≥ 1): the backoff,
    /// or a `Retry-After` that asks for longer (honoured past our own cap, up to
    /// `MAX_RETRY_AFTER`; a longer one ends the step instead when its job is requeued for it,
    /// see `with_retries`). A shorter one does not cut the backoff: `Retry-After: 0` from every
    /// call of a busy gateway would otherwise spend a step's attempts at once, all at the same
    /// instant. A `Retry-After` is stretched by up to `jitter_fraction` (never shortened, nor
    /// stretched past `MAX_RETRY_AFTER`), and one of `MAX_RETRY_AFTER` or more, which is not
    /// waited out whole anyway, is spread as far under it: the calls one rate limit turned
    /// away, told the same wait, do not all come back at once.
    pub fn delay(&self, failed: u32, err: &UpstreamError) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(failed.saturating_sub(1)));
        let capped = exp.min(self.cap);
        let draw = (self.jitter)();
        let backoff = capped.mul_f64((1.0 + self.jitter_fraction * (draw * 2.0 - 1.0)).max(0.0));
        match err.retry_after {
            Some(after) if after >= MAX_RETRY_AFTER => MAX_RETRY_AFTER
                .mul_f64(1.0 - self.jitter_fraction * draw)
                .max(backoff),
            Some(after) => after
                .mul_f64(1.0 + self.jitter_fraction * draw)
                .min(MAX_RETRY_AFTER)
                .max(backoff),
            None => backoff,
        }
    }
}

/// How a step's call is tried (`Upstream::complete_with_retries`).
pub struct Tries<'a> {
    pub policy: &'a RetryPolicy,
    /// Whether its job is requeued for a long `Retry-After` (see `with_retries`).
    pub requeues: bool,
    /// Where what its failed tries were billed for is summed, as they fail.
    pub spent: &'a Mutex<Usage>,
}

/// Why a retried call ended without a completion.
#[derive(Debug)]
pub enum CallError {
    Upstream(UpstreamError),
    Cancelled,
}

impl Upstream {
    /// Call until success, a fatal error, the attempts are used up, or `cancel` fires (which
    /// aborts the in-flight request at once). Each try waits for `ready` first, which may end
    /// the call instead (`false`: as cancelled). `requeues`: see `with_retries`.
    ///
    /// What the tries that failed were billed for is carried into the result: a completion
    /// that came back unusable (an error mid-answer, bytes after it) was paid for even when a
    /// later try answers. It is summed in `tries.spent` as they fail, so that a caller that drops
    /// this call before it ends (a panel member cut off by the panel's timeout) still knows
    /// it. A mutex, not a cell, since the job's future moves between threads; never contended.
    pub async fn complete_with_retries<R: Future<Output = bool>>(
        &self,
        model: &str,
        req: &CompletionRequest<'_>,
        tries: Tries<'_>,
        cancel: &CancellationToken,
        ready: impl Fn() -> R,
    ) -> Result<Completion, CallError> {
        let Tries {
            policy,
            requeues,
            spent,
        } = tries;
        let spent_so_far = || *spent.lock().unwrap_or_else(PoisonError::into_inner);
        let result = with_retries(policy, cancel, requeues, || async {
            if !ready().await {
                return Err(CallError::Cancelled);
            }
            self.complete(model, req).await.map_err(|e| {
                let mut sum = spent.lock().unwrap_or_else(PoisonError::into_inner);
                sum.add(&e.usage);
                CallError::Upstream(e)
            })
        })
        .await;
        match result {
            Ok(mut c) => {
                c.usage.add(&spent_so_far());
                Ok(c)
            }
            Err(CallError::Upstream(e)) => Err(CallError::Upstream(UpstreamError {
                usage: spent_so_far(),
                ..e
            })),
            // A cancelled job writes nothing more, its usage included.
            Err(CallError::Cancelled) => Err(CallError::Cancelled),
        }
    }
}

/// The retry loop itself, over any call: retryable errors wait out `policy.delay` (tokio's
/// sleep, so paused time drives it in tests), fatal ones and the last attempt's return at
/// once, and so does one whose `Retry-After` is over `MAX_RETRY_AFTER` when the caller
/// `requeues` its job for such a wait (a panel or final step with a next attempt left; an
/// analysis, or a job's last attempt, waits about `MAX_RETRY_AFTER`, see `RetryPolicy::delay`,
/// and asks again); a call that says `Cancelled` ends the loop as a cancel does.
pub async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    requeues: bool,
    mut call: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut failed = 0;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
            r = call() => r,
        };
        let e = match result {
            Ok(v) => return Ok(v),
            Err(CallError::Cancelled) => return Err(CallError::Cancelled),
            Err(CallError::Upstream(e)) => e,
        };
        failed += 1;
        let too_long = requeues && e.retry_after.is_some_and(|after| after > MAX_RETRY_AFTER);
        if !e.retryable() || failed >= policy.max_attempts || too_long {
            return Err(CallError::Upstream(e));
        }
        let wait = policy.delay(failed, &e);
        tracing::debug!(attempt = failed, ?wait, error = %e, "retrying upstream call");
        tokio::select! {
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

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
            usage: Default::default(),
            not_again: false,
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

    // A longer Retry-After wins, past the cap up to the sanity limit; a shorter one (0, a date
    // already past) does not cut the backoff.
    #[test]
    fn retry_after_lengthens_the_backoff_but_never_cuts_it() {
        let p = policy(0.0);
        let after = |failed, secs| p.delay(failed, &err(Some(Duration::from_secs(secs))));
        assert_eq!(after(1, 7), Duration::from_secs(7));
        assert_eq!(after(1, 120), Duration::from_secs(120));
        assert_eq!(after(1, 100_000), MAX_RETRY_AFTER);
        assert_eq!(after(1, 300), MAX_RETRY_AFTER);
        assert_eq!(after(1, 0), Duration::from_millis(900));
        assert_eq!(after(4, 2), Duration::from_millis(7200));
    }

    // Calls a rate limit turned away with the same Retry-After come back spread over the tenth
    // after it, never before it, and within the longest a step waits; those told to wait that
    // long or more, over the tenth under it.
    #[test]
    fn retry_after_is_spread_by_the_jitter() {
        let after = |j, secs| policy(j).delay(1, &err(Some(Duration::from_secs(secs))));
        assert_eq!(after(0.5, 20), Duration::from_secs(21));
        assert_eq!(after(0.999, 20), Duration::from_secs_f64(20.0 * 1.0999));
        // Not past the longest a step waits; one asking for that or more (not waited out
        // whole) is spread as far under it.
        assert_eq!(after(0.999, 290), MAX_RETRY_AFTER);
        assert_eq!(after(0.5, 100_000), MAX_RETRY_AFTER.mul_f64(0.95));
        assert_eq!(after(0.5, 300), MAX_RETRY_AFTER.mul_f64(0.95));
    }

    fn status(code: u16, retry_after: Option<u64>) -> UpstreamError {
        UpstreamError::from_status(code, "", retry_after.map(Duration::from_secs))
    }

    type Scripted = Result<&'static str, UpstreamError>;

    /// Replays scripted results, counting calls.
    fn scripted(
        script: Vec<Scripted>,
    ) -> (
        Arc<AtomicU32>,
        impl FnMut() -> std::future::Ready<Result<&'static str, CallError>>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let mut script = script.into_iter();
        let call = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let next = script.next().expect("called more often than scripted");
            std::future::ready(next.map_err(CallError::Upstream))
        };
        (calls, call)
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_waits_the_backoff_and_retry_after_on_paused_time() {
        let (calls, call) = scripted(vec![
            Err(status(500, None)),
            Err(status(429, Some(7))),
            Err(status(503, None)),
            Ok("answer"),
        ]);
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &CancellationToken::new(), false, call).await;
        assert_eq!(got.unwrap(), "answer");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // 1 s after the first failure, Retry-After's 7 s (and 5 % of jitter) after the second,
        // 4 s after the third.
        assert_eq!(start.elapsed(), Duration::from_millis(12_350));
    }

    // Asked to wait longer than a step waits, the loop does not wait a shortened time and ask
    // again (to be refused again): it ends, and the job waits in the queue (`Job::next_try_after`).
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_past_the_steps_limit_ends_the_step_at_once() {
        let (calls, call) = scripted(vec![
            Err(status(429, Some(MAX_RETRY_AFTER.as_secs()))),
            Err(status(429, Some(MAX_RETRY_AFTER.as_secs() + 1))),
        ]);
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &CancellationToken::new(), true, call).await;
        let Err(CallError::Upstream(e)) = got else {
            panic!("expected the upstream's error, got {got:?}");
        };
        assert_eq!(
            e.retry_after,
            Some(MAX_RETRY_AFTER + Duration::from_secs(1))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The first Retry-After, at the limit, was waited out (less the jitter's 5 % at the
        // midpoint, as the calls it turned away are spread under the limit); the second was not.
        assert_eq!(start.elapsed(), MAX_RETRY_AFTER.mul_f64(0.95));

        // A caller that cannot requeue (an analysis, a job's last attempt) waits the limit and
        // asks again, as before.
        let long = Err(status(429, Some(3_600)));
        let (calls, call) = scripted(vec![long, Ok("answer")]);
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &CancellationToken::new(), false, call).await;
        assert_eq!(got.unwrap(), "answer");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), MAX_RETRY_AFTER.mul_f64(0.95));
    }

    #[tokio::test(start_paused = true)]
    async fn fatal_errors_and_the_last_attempt_return_at_once() {
        let (calls, call) = scripted(vec![Err(status(500, None)), Err(status(404, None))]);
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &CancellationToken::new(), false, call).await;
        assert!(matches!(got, Err(CallError::Upstream(e)) if e.kind == ErrorKind::NotFound));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(1));

        let five = (0..5).map(|_| Err(status(502, None))).collect();
        let (calls, call) = scripted(five);
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &CancellationToken::new(), false, call).await;
        assert!(matches!(got, Err(CallError::Upstream(_))));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "max_attempts calls, no more"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1 + 2 + 4 + 8));
    }

    // A call that says it was cancelled (the job may no longer call) is not tried again.
    #[tokio::test(start_paused = true)]
    async fn a_call_that_says_cancelled_is_not_retried() {
        let calls = AtomicU32::new(0);
        let call = || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<(), _>(CallError::Cancelled))
        };
        let got = with_retries(&policy(0.5), &CancellationToken::new(), false, call).await;
        assert!(matches!(got, Err(CallError::Cancelled)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_during_the_backoff_returns_at_once() {
        let (_, call) = scripted(vec![Err(status(500, None))]);
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let start = tokio::time::Instant::now();
        let got = with_retries(&policy(0.5), &cancel, false, call).await;
        assert!(matches!(got, Err(CallError::Cancelled)));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}
