//! The retry policy: how many attempts a delivery gets and how long it
//! waits between them.
//!
//! The pause before retry `n` is capped exponential with jitter: the cap is
//! `base · 2^(n-1)`, at most `max`, and the pause is drawn uniformly from
//! the upper half of the cap ("equal jitter"). Half keeps the backoff
//! growing, so a struggling endpoint gets room; the random half spreads the
//! retries of many deliveries that failed together, so an endpoint coming
//! back is not hit by all of them in the same millisecond. A `Retry-After`
//! the endpoint sent is honoured, up to `max`.

use std::time::Duration;

use rand::Rng;

/// Attempts and pauses of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Pause cap before the first retry.
    pub base: Duration,
    /// Longest pause.
    pub max: Duration,
    /// Attempts in all (the first one included); at least 1.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The cap of the pause before retry `retry` (1 = the first retry).
    pub fn cap(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(30);
        self.base
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(Duration::from_millis(1))
    }

    /// The pause before retry `retry`: uniform in `[cap/2, cap]`, or the
    /// endpoint's `retry_after` if that is longer (never beyond `max`).
    pub fn pause(&self, retry: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let cap = self.cap(retry);
        let half = cap / 2;
        let jittered = half + rng.random_range(Duration::ZERO..=cap - half);
        match retry_after {
            Some(asked) => jittered.max(asked.min(self.max)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            max_attempts: 8,
        }
    }

    #[test]
    fn the_cap_doubles_until_the_max() {
        let p = policy();
        let caps: Vec<u128> = (1..=7).map(|n| p.cap(n).as_millis()).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(p.cap(u32::MAX), Duration::from_secs(2), "no overflow");
    }

    #[test]
    fn pauses_are_jittered_within_the_upper_half_of_the_cap() {
        let p = policy();
        let mut rng = rand::rng();
        let pauses: Vec<Duration> = (0..200).map(|_| p.pause(3, None, &mut rng)).collect();
        assert!(pauses
            .iter()
            .all(|d| *d >= Duration::from_millis(200) && *d <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 10, "jittered, not constant");
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_max() {
        let p = policy();
        let mut rng = rand::rng();
        assert_eq!(
            p.pause(1, Some(Duration::from_secs(1)), &mut rng),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.pause(1, Some(Duration::from_secs(3600)), &mut rng),
            Duration::from_secs(2)
        );
    }
}
