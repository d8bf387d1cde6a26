//! The one reconnect backoff of edgetwin: the bridge reconnecting to the cloud broker, mappers
//! reconnecting to the node and to their devices, the front door's keepers to the broker.
//!
//! Exponential with "equal jitter" (AWS architecture blog, "Exponential Backoff And Jitter"): the
//! delay before attempt `n` is uniform in `[base/2, base]` with `base = min(max, initial * 2^n)`,
//! so a fleet of nodes or mappers that lost the same peer at the same moment does not retry in
//! lock-step, and no retry comes at once after a failure (full jitter's `[0, base]` can, which
//! hammers a peer that is still down).

use std::time::Duration;

use rand::Rng;

/// Backoff state: the number of failures since the last success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// [`next_delay`](Self::next_delay) drawing from `rng` (tests seed it).
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        let jitter_ns = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter_ns == 0 {
            0
        } else {
            rng.random_range(0..=jitter_ns)
        };
        half + Duration::from_nanos(extra)
    }

    /// Records a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut last_base = Duration::ZERO;
        for _ in 0..10 {
            let base = b.base();
            assert!(base >= last_base);
            let d = b.next_delay();
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
            last_base = base;
        }
        assert_eq!(b.base(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.base(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_waits_are_spread_not_lockstep() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_with(&mut rng)
            })
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn backoff_survives_many_attempts_without_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        for _ in 0..200 {
            b.next_delay();
        }
        assert_eq!(b.base(), Duration::from_secs(30));
    }
}
