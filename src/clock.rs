//! Where "now" comes from. Injected so that leases, deadlines and backoff are testable: the store
//! takes times as arguments, and tests swap the system clock for one that follows tokio's
//! (pausable) time or is off by a set amount. On a store shared by many hosts, every process's
//! clock is aligned with the database's (`AlignedClock`), and once aligned no longer follows the
//! clock it was given.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::store::{self, Store, ms};

pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;
}

pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
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
        self.base_ms + ms(self.start.elapsed())
    }
}

/// This host's clock aligned with the database's (`align`). A store shared by many hosts
/// (Postgres) compares times that different hosts wrote: a lease written by a host whose clock
/// is behind would look expired to the others before it is, and one written ahead would keep a
/// dead worker's jobs for longer. On the database's clock every host means the same instant by
/// the same number. Once aligned, the database's time is carried forward from the measurement
/// on the time since boot (`since_boot`), so a step of the host's wall clock (NTP correcting
/// it, an operator) does not move it, and a suspended host is not left behind by the time it
/// slept; aligning again now and then keeps the two rates together. Until it is first aligned,
/// and on a store with no clock of its own, it is the base clock.
#[derive(Debug)]
pub struct AlignedClock {
    base: SharedClock,
    anchor: RwLock<Option<Anchor>>,
}

/// The database's time at a moment of this host's time since boot.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    database_ms: i64,
    at: Duration,
    /// How far the database's true time at `at` may be from `database_ms`.
    uncertainty_ms: i64,
}

impl Anchor {
    /// The database's time at `moment`, by this anchor.
    fn at(&self, moment: Duration) -> i64 {
        let since = if moment >= self.at {
            ms(moment - self.at)
        } else {
            -ms(self.at - moment)
        };
        self.database_ms.saturating_add(since)
    }

    /// `uncertainty_ms` grown with the time since the reading, at a rate two host clocks kept
    /// by NTP do not drift apart at (100 ppm: 6 ms in a minute).
    fn uncertainty_at(&self, moment: Duration) -> i64 {
        self.uncertainty_ms + ms(moment.saturating_sub(self.at)) / 10_000
    }

    /// Whether this reading, held, stays in use over a `newer` one: when the two agree within
    /// both's uncertainty (this one's grown with its age), and the newer is not at least twice
    /// as precise. So readings that agree do not move the clock by the round trips' noise,
    /// while one taken in a slow round trip, or grown old, gives way to a precise one.
    fn stays_over(&self, newer: &Anchor) -> bool {
        let uncertainty = self.uncertainty_at(newer.at);
        let agrees =
            (self.at(newer.at) - newer.database_ms).abs() <= uncertainty + newer.uncertainty_ms;
        agrees && 2 * newer.uncertainty_ms > uncertainty
    }
}

/// Time since boot, counting time the host was suspended (`CLOCK_BOOTTIME`), not stepped with
/// the wall clock. `Instant` would not count a suspend, and the clock would come back from one
/// behind by as long as the host slept.
#[cfg(target_os = "linux")]
fn since_boot() -> Duration {
    fn boottime() -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock_gettime` only writes the `timespec` it is given, which outlives the call.
        let read = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } == 0;
        read.then(|| {
            Duration::new(
                u64::try_from(now.tv_sec).unwrap_or(0),
                u32::try_from(now.tv_nsec).unwrap_or(0),
            )
        })
    }
    // Chosen once: two time bases mixed would make the clock jump by the host's uptime.
    static BOOTTIME: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *BOOTTIME.get_or_init(|| boottime().is_some()) {
        boottime().unwrap_or_default()
    } else {
        monotonic()
    }
}

/// Elsewhere, the monotonic clock (which may not count a suspend).
#[cfg(not(target_os = "linux"))]
fn since_boot() -> Duration {
    monotonic()
}

/// Time since this process first asked.
fn monotonic() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// One measurement of the database's clock against this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// The aligned clock minus the base clock, in milliseconds, after the measurement.
    pub offset_ms: i64,
    /// How far the measurement may be from the database's true time: half the round trip it
    /// was read in, and a millisecond of rounding.
    pub uncertainty_ms: i64,
}

/// Round trips per measurement; the shortest is used (the least time for a delay to hide in).
const SAMPLES: usize = 3;

impl AlignedClock {
    pub fn new(base: SharedClock) -> AlignedClock {
        AlignedClock {
            base,
            anchor: RwLock::new(None),
        }
    }

    /// This clock minus the base clock, in milliseconds (0 until aligned).
    pub fn offset_ms(&self) -> i64 {
        self.now_ms() - self.base.now_ms()
    }

    /// When the measurement in use was taken (time since boot), if any.
    pub fn aligned_at(&self) -> Option<Duration> {
        self.anchor().map(|a| a.at)
    }

    fn anchor(&self) -> Option<Anchor> {
        *self
            .anchor
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Measure the database's clock and adopt the measurement unless the one in use stays over
    /// it (`Anchor::stays_over`): in practice a reading is replaced about once a minute, by one
    /// a few milliseconds from it. `None`: the store has no clock of its own to align with
    /// (SQLite: one host).
    pub async fn align(&self, store: &dyn Store) -> store::Result<Option<Offset>> {
        let mut best: Option<Anchor> = None;
        for _ in 0..SAMPLES {
            let sent = since_boot();
            let Some(database_ms) = store.database_now_ms().await? else {
                return Ok(None);
            };
            let half = since_boot().saturating_sub(sent) / 2;
            // The database read its clock somewhere in the round trip, and rounded it.
            let sample = Anchor {
                database_ms,
                at: sent + half,
                uncertainty_ms: i64::try_from(half.as_micros().div_ceil(1000)).unwrap_or(i64::MAX)
                    + 1,
            };
            if best.is_none_or(|b| sample.uncertainty_ms < b.uncertainty_ms) {
                best = Some(sample);
            }
        }
        let Some(best) = best else { return Ok(None) };
        {
            let mut anchor = self
                .anchor
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !anchor.is_some_and(|held| held.stays_over(&best)) {
                *anchor = Some(best);
            }
        }
        Ok(Some(Offset {
            offset_ms: self.offset_ms(),
            uncertainty_ms: best.uncertainty_ms,
        }))
    }
}

impl Clock for AlignedClock {
    fn now_ms(&self) -> i64 {
        match self.anchor() {
            Some(anchor) => anchor.at(since_boot()),
            None => self.base.now_ms(),
        }
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
        self.by_ms.store(by_ms, Ordering::SeqCst);
    }

    /// Move it on by `ms`.
    pub fn advance(&self, ms: i64) {
        self.by_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for Shifted {
    fn now_ms(&self) -> i64 {
        self.base.now_ms() + self.by_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(database_ms: i64, at_ms: u64, uncertainty_ms: i64) -> Anchor {
        Anchor {
            database_ms,
            at: Duration::from_millis(at_ms),
            uncertainty_ms,
        }
    }

    // Which of two readings of the database's clock is used: the held one, unless the newer
    // disagrees with it or is at least twice as precise as it has become with age.
    #[test]
    fn a_reading_gives_way_only_to_a_disagreeing_or_markedly_more_precise_one() {
        let held = reading(1_000_000, 10_000, 2);
        // 5 ms later by the host, 4 ms later by the database: within 2 + 2.
        assert!(held.stays_over(&reading(1_000_004, 10_005, 2)));
        // 10 ms off.
        assert!(!held.stays_over(&reading(1_000_015, 10_005, 2)));
        // Agreeing, twice as precise.
        assert!(!held.stays_over(&reading(1_000_005, 10_005, 1)));
        // Taken in a slow round trip (±40 ms), then a precise reading that agrees with it.
        let slow = reading(1_000_000, 10_000, 40);
        assert!(!slow.stays_over(&reading(1_000_030, 10_005, 2)));
        assert!(slow.stays_over(&reading(1_000_030, 10_005, 25)));
        // A minute on, a held ±2 ms reading counts as ±8: a ±3 ms reading replaces it.
        assert!(held.stays_over(&reading(1_060_000, 70_000, 5)));
        assert!(!held.stays_over(&reading(1_060_000, 70_000, 3)));
        // Carried forward and back from the moment it was taken.
        assert_eq!(held.at(Duration::from_millis(10_250)), 1_000_250);
        assert_eq!(held.at(Duration::from_millis(9_750)), 999_750);
    }
}
