//! [`RateLimiter`]: at most so many permits per second, with bursts, on tokio's clock.
//!
//! It is `governor`'s GCRA limiter (the generic cell rate algorithm: a token bucket kept as one
//! timestamp) driven by `tokio::time`, so on a paused runtime it runs in virtual time like
//! everything else in orch. The work queue's global rate limit and the node lifecycle
//! controller's eviction rate use it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! use std::time::Duration;
//! use orch_core::rate::RateLimiter;
//!
//! let limit = RateLimiter::new(2.0, 1).unwrap(); // 2 per second, no burst beyond one
//! assert!(limit.check().is_ok());
//! let next = limit.check().unwrap_err(); // the next permit, half a second from now
//! tokio::time::sleep_until(next).await;
//! assert!(limit.check().is_ok());
//! # }
//! ```

use std::num::NonZeroU32;
use std::ops::Add;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};
use tokio::time::Instant;

/// Nanoseconds on tokio's clock since the limiter's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(u64);

impl Add<Nanos> for Tick {
    type Output = Tick;
    fn add(self, other: Nanos) -> Tick {
        Tick(self.0.saturating_add(other.as_u64()))
    }
}

impl Reference for Tick {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_sub(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        Tick(self.0.saturating_sub(duration.as_u64()))
    }
}

/// `tokio::time` as a governor clock.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    fn tick(&self, at: Instant) -> Tick {
        Tick(u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX))
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.origin + Duration::from_nanos(tick.0)
    }
}

impl Clock for TokioClock {
    type Instant = Tick;
    fn now(&self) -> Tick {
        self.tick(Instant::now())
    }
}

/// At most `per_second` permits per second on average, `burst` at once after a quiet spell.
pub struct RateLimiter {
    clock: TokioClock,
    gcra: Gcra<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Tick>>,
    per_second: f64,
    burst: u32,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("per_second", &self.per_second).field("burst", &self.burst).finish()
    }
}

/// Why a rate limit was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RateError {
    /// The rate must be a positive, finite number of permits per second.
    #[error("rate: must be a positive number of permits per second (is {0})")]
    Rate(f64),
}

impl RateLimiter {
    /// A limiter of `per_second` permits per second (a fraction for less than one), bursts of
    /// `burst` (at least one), starting full.
    pub fn new(per_second: f64, burst: u32) -> Result<Self, RateError> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(RateError::Rate(per_second));
        }
        Ok(RateLimiter::build(per_second, burst))
    }

    /// A limiter that never refuses its settings: a rate that is not a positive number (zero,
    /// negative, NaN) lets one permit through per 31 years, an infinite one a billion per second.
    pub fn clamped(per_second: f64, burst: u32) -> Self {
        let rate = if per_second.is_nan() { 1e-9 } else { per_second.clamp(1e-9, 1e9) };
        RateLimiter::build(rate, burst)
    }

    /// `per_second` must be positive and finite.
    fn build(per_second: f64, burst: u32) -> Self {
        let period = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
        let burst_n = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota =
            Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst_n);
        let clock = TokioClock { origin: Instant::now() };
        RateLimiter { clock, gcra: Gcra::direct_with_clock(quota, clock), per_second, burst: burst_n.get() }
    }

    /// Takes a permit now, or says when the next one comes.
    pub fn check(&self) -> Result<(), Instant> {
        self.gcra.check().map_err(|not_until| self.clock.instant(not_until.earliest_possible()))
    }

    /// Permits per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_burst_then_one_per_period_in_virtual_time() {
        let limit = RateLimiter::new(0.1, 3).unwrap();
        for _ in 0..3 {
            assert!(limit.check().is_ok(), "the burst goes at once");
        }
        let next = limit.check().unwrap_err();
        assert_eq!(next - Instant::now(), Duration::from_secs(10), "one every 10 s after the burst");
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(limit.check().is_err());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refills_to_the_burst_after_a_quiet_spell_and_no_further() {
        let limit = RateLimiter::new(100.0, 5).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let taken = (0..50).filter(|_| limit.check().is_ok()).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn a_rate_that_is_not_positive_is_refused_or_clamped() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(RateLimiter::new(bad, 1).is_err(), "{bad}");
        }
        assert_eq!(RateLimiter::clamped(f64::NAN, 1).per_second(), 1e-9);
        assert_eq!(RateLimiter::clamped(f64::INFINITY, 1).per_second(), 1e9);
    }
}
