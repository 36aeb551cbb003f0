//! [`Backoff`]: how long to wait before the next attempt after failures, and [`Attempts`], a
//! counter of failures in a row that resets on success. Every retry in orch goes through these:
//! the work queue's per-key backoff, cache and watch reconnects, the scheduling queue, the
//! agent's crash-loop backoff and the provisioner's launch backoff.
//!
//! The delay doubles with each failure in a row from `initial` up to `max`. With
//! [full jitter](Backoff::full_jitter) it is drawn uniformly from zero to that, so many clients
//! that failed together (every watch of a store that restarted) do not retry together. Where a
//! user reads the schedule (kubelet-style crash-loop backoff: 10 s, 20 s, 40 s…) it stays exact.
//!
//! ```
//! use std::time::Duration;
//! use orch_core::backoff::{Attempts, Backoff};
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
//! assert_eq!(backoff.delay(1), Duration::from_millis(100));
//! assert_eq!(backoff.delay(3), Duration::from_millis(400));
//! assert_eq!(backoff.delay(10), Duration::from_secs(2));
//!
//! let mut retries = Attempts::new(backoff.full_jitter());
//! let first = retries.fail(); // somewhere in 0..=100 ms
//! assert!(first <= Duration::from_millis(100));
//! retries.succeed(); // the next failure starts from the initial delay again
//! assert_eq!(retries.failures(), 0);
//! ```

use std::time::Duration;

/// An exponential backoff: `initial`, doubling per failure in a row, capped at `max`, with or
/// without full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Draw each delay uniformly from zero to the exponential delay.
    pub jitter: bool,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, without jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, jitter: false }
    }

    /// The same schedule with full jitter: each delay uniform in `[0, delay]`.
    pub const fn full_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The longest the wait after failure number `failures` (1 for the first) can be:
    /// `initial * 2^(failures - 1)`, at most `max`. Zero failures wait nothing.
    pub fn ceiling(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow((failures - 1).min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait after failure number `failures`: the [ceiling](Self::ceiling), or a uniform draw
    /// below it with jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        if self.jitter { ceiling.mul_f64(fastrand::f64()) } else { ceiling }
    }
}

/// Failures in a row under a [`Backoff`]: each [`fail`](Attempts::fail) gives the next delay,
/// [`succeed`](Attempts::succeed) starts over.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    failures: u32,
}

impl Attempts {
    /// No failures yet.
    pub fn new(backoff: Backoff) -> Self {
        Attempts { backoff, failures: 0 }
    }

    /// Counts a failure; returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures)
    }

    /// Counts a success: the next failure waits the initial delay again.
    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The backoff it follows.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_the_initial_delay_and_stops_at_the_cap() {
        let b = Backoff::new(10 * MS, 300 * MS);
        let delays: Vec<_> = (0..8).map(|n| b.delay(n)).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300].map(|n| n * MS));
    }

    #[test]
    fn huge_failure_counts_stay_at_the_cap_without_overflow() {
        let b = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
        let b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(b.delay(40), Duration::MAX);
    }

    #[test]
    fn attempts_reset_on_success() {
        let mut a = Attempts::new(Backoff::new(5 * MS, 100 * MS));
        assert_eq!((a.fail(), a.fail(), a.fail()), (5 * MS, 10 * MS, 20 * MS));
        assert_eq!(a.failures(), 3);
        a.succeed();
        assert_eq!(a.fail(), 5 * MS);
    }

    #[test]
    fn jitter_spreads_delays_below_the_ceiling() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).full_jitter();
        let draws: Vec<_> = (0..200).map(|_| b.delay(3)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(4)));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 100, "full jitter draws spread out: {} distinct of 200", distinct.len());
        let mean = draws.iter().sum::<Duration>() / 200;
        assert!(mean > Duration::from_millis(1500) && mean < Duration::from_millis(2500), "mean {mean:?}");
    }

    proptest! {
        #[test]
        fn delays_never_shrink_and_never_pass_the_cap(initial in 1u64..10_000, max in 1u64..1_000_000, n in 1u32..64) {
            let b = Backoff::new(Duration::from_millis(initial), Duration::from_millis(max));
            prop_assert!(b.delay(n) <= b.max);
            prop_assert!(b.delay(n + 1) >= b.delay(n));
            prop_assert!(b.full_jitter().delay(n) <= b.ceiling(n));
        }
    }
}
