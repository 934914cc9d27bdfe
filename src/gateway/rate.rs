//! The per-session rate limit: a token bucket over the data frames a client sends after
//! `hello` (`limits.rate_per_s` tokens a second, `limits.rate_burst` at most), and the
//! count of consecutive refused frames that closes the session (`limits.rate_strikes`).
//!
//! Pure: time is passed in, so the bucket is tested without sleeping. Invariants: the
//! bucket never holds more than `burst` tokens; a refused frame costs nothing; one frame
//! within the limit resets the strikes.

use std::time::Instant;

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: apply it.
    Pass,
    /// Over the limit: answer `rate_limited`, apply nothing.
    Limited,
    /// Over the limit `rate_strikes` times in a row: answer, then close with 4009.
    Close,
}

/// A token bucket with a strike counter. `rate_per_s == 0` passes everything.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    strikes_max: u32,
    tokens: f64,
    last: Instant,
    strikes: u32,
}

impl RateLimiter {
    pub fn new(rate_per_s: u32, burst: u32, strikes: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst),
            strikes_max: strikes,
            tokens: f64::from(burst),
            last: now,
            strikes: 0,
        }
    }

    /// True when the limit is off.
    pub fn is_off(&self) -> bool {
        self.rate_per_s <= 0.0
    }

    /// Takes one token for a frame that arrived at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.is_off() {
            return Verdict::Pass;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            return Verdict::Pass;
        }
        self.strikes = self.strikes.saturating_add(1);
        if self.strikes_max > 0 && self.strikes >= self.strikes_max {
            Verdict::Close
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_frames_are_limited_then_the_strikes_close() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 5, 3, t0);
        for _ in 0..5 {
            assert_eq!(r.check(t0), Verdict::Pass);
        }
        assert_eq!(r.check(t0), Verdict::Limited);
        assert_eq!(r.check(t0), Verdict::Limited);
        assert_eq!(r.check(t0), Verdict::Close);
    }

    #[test]
    fn tokens_refill_at_the_rate_up_to_the_burst_and_a_pass_resets_the_strikes() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 2, 3, t0);
        assert_eq!(r.check(t0), Verdict::Pass);
        assert_eq!(r.check(t0), Verdict::Pass);
        assert_eq!(r.check(t0), Verdict::Limited);
        assert_eq!(r.check(t0), Verdict::Limited);
        // 100 ms at 10/s is one token: it passes and the strikes start over
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.check(t1), Verdict::Pass);
        assert_eq!(r.check(t1), Verdict::Limited);
        assert_eq!(r.check(t1), Verdict::Limited);
        assert_eq!(r.check(t1), Verdict::Close);
        // a long pause fills the bucket to the burst, not beyond
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(r.check(t2), Verdict::Pass);
        assert_eq!(r.check(t2), Verdict::Pass);
        assert_eq!(r.check(t2), Verdict::Limited);
    }

    #[test]
    fn rate_zero_is_off() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0, 0, 1, t0);
        for _ in 0..10_000 {
            assert_eq!(r.check(t0), Verdict::Pass);
        }
    }
}
