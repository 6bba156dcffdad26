//! Where "now" comes from. Injected so that leases, deadlines and backoff are testable: the store
//! takes times as arguments, and tests swap the system clock for one that follows tokio's
//! (pausable) time. On a store shared by many hosts, every process's clock is aligned with the
//! database's (`AlignedClock`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::{self, Store};

pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;
}

pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that starts at the system time and then advances with tokio's clock, so
/// `tokio::time::pause()` and `advance()` move it too.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base_ms: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> TokioClock {
        TokioClock {
            base_ms: SystemClock.now_ms(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        self.base_ms + i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// This host's clock aligned with the database's: the base clock plus an offset measured against
/// the database (`align`). A store shared by many hosts (Postgres) compares times that
/// different hosts wrote: a lease written by a host whose clock is behind would look expired to
/// the others before it is, and one written ahead would keep a dead worker's jobs for longer.
/// On the database's clock every host means the same instant by the same number.
#[derive(Debug)]
pub struct AlignedClock {
    base: SharedClock,
    offset_ms: AtomicI64,
    /// The `uncertainty_ms` of the measurement `offset_ms` came from.
    uncertainty_ms: AtomicI64,
}

/// One measurement of the database's clock against this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// The database's clock minus this host's, in milliseconds.
    pub offset_ms: i64,
    /// How far the true offset may be from `offset_ms`: half the round trip it was read in.
    pub uncertainty_ms: i64,
}

/// Round trips per measurement; the shortest is used (the least time for a delay to hide in).
const SAMPLES: usize = 3;

impl AlignedClock {
    pub fn new(base: SharedClock) -> AlignedClock {
        AlignedClock {
            base,
            offset_ms: AtomicI64::new(0),
            uncertainty_ms: AtomicI64::new(0),
        }
    }

    /// The offset in use: the database's clock minus the base clock, in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Measure the database's clock and adopt the offset unless it agrees with the one in use
    /// within both measurements' uncertainty (so that the clock does not jitter with the round
    /// trips' noise).
    /// `None`: the store has no clock of its own to align with (SQLite: one host).
    pub async fn align(&self, store: &dyn Store) -> store::Result<Option<Offset>> {
        let mut best: Option<Offset> = None;
        for _ in 0..SAMPLES {
            let sent = self.base.now_ms();
            let Some(database) = store.database_now_ms().await? else {
                return Ok(None);
            };
            let answered = self.base.now_ms();
            let sample = Offset {
                offset_ms: database - (sent + (answered - sent) / 2),
                // The database reads its clock somewhere in the round trip; millisecond
                // readings add one more.
                uncertainty_ms: (answered - sent + 1) / 2 + 1,
            };
            if best.is_none_or(|b| sample.uncertainty_ms < b.uncertainty_ms) {
                best = Some(sample);
            }
        }
        let Some(best) = best else { return Ok(None) };
        let held = self.uncertainty_ms.load(Ordering::Relaxed);
        if (best.offset_ms - self.offset_ms()).abs() > best.uncertainty_ms + held {
            self.offset_ms.store(best.offset_ms, Ordering::Relaxed);
            self.uncertainty_ms
                .store(best.uncertainty_ms, Ordering::Relaxed);
        }
        Ok(Some(best))
    }
}

impl Clock for AlignedClock {
    fn now_ms(&self) -> i64 {
        self.base.now_ms().saturating_add(self.offset_ms())
    }
}

/// A clock a fixed, settable distance from another: a host whose clock is off, in tests.
#[derive(Debug)]
pub struct Shifted {
    base: SharedClock,
    by_ms: AtomicI64,
}

impl Shifted {
    pub fn new(base: SharedClock, by_ms: i64) -> Shifted {
        Shifted {
            base,
            by_ms: AtomicI64::new(by_ms),
        }
    }

    pub fn set(&self, by_ms: i64) {
        self.by_ms.store(by_ms, Ordering::Relaxed);
    }
}

impl Clock for Shifted {
    fn now_ms(&self) -> i64 {
        self.base.now_ms() + self.by_ms.load(Ordering::Relaxed)
    }
}
