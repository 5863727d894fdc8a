//! Reconnect backoff: exponential with full jitter, capped, reset after a healthy connection.
//!
//! Full jitter (a uniform delay between 0 and the exponential bound) is what keeps thousands
//! of agents from reconnecting in lock-step after a gateway restart.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// A lower maximum for now (see [`Backoff::limit_until_reset`]).
    limit: Option<Duration>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
            limit: None,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        let max = self.limit.map_or(self.max, |l| l.min(self.max));
        self.initial.saturating_mul(factor).min(max)
    }

    /// Starts over, with delays of at most `limit` until the next [`Backoff::clear_limit`]: a
    /// gateway that ended the session as planned (a restart) is expected back soon, and
    /// delays grown while it was down would keep the agent away long after it returned.
    pub fn limit_until_reset(&mut self, limit: Duration) {
        self.attempt = 0;
        self.limit = Some(limit);
    }

    /// Back to the configured maximum (a connection succeeded).
    pub fn clear_limit(&mut self) {
        self.limit = None;
    }

    /// The next delay: uniform in [0, ceiling], and the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `d` scaled by a uniform factor in [1 - frac, 1 + frac].
pub fn jittered(d: Duration, frac: f64) -> Duration {
    let f = rand::rng().random_range((1.0 - frac)..=(1.0 + frac));
    d.mul_f64(f.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn a_limit_holds_until_cleared() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        b.limit_until_reset(Duration::from_secs(10));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
        b.clear_limit();
        assert_eq!(b.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spreads_delays() {
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..200 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            let d = b.next_delay();
            seen_low |= d < Duration::from_secs(3);
            seen_high |= d > Duration::from_secs(7);
        }
        assert!(seen_low && seen_high);
    }
}
