//! Exponential backoff with full jitter, for reconnecting to the broker and to devices.
//!
//! The delay before attempt `n` is uniform in `[base/2, base]` with `base = min(max, initial * 2^n)`,
//! so a fleet of mappers (or devices) that lost the same peer do not retry in lock-step.

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
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        let jitter_ns = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter_ns == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_ns)
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
}
