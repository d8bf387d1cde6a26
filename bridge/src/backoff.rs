//! Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter"):
//! the n-th wait is uniform in `[0, min(max, initial * 2^n)]`, so a fleet of nodes that lost the
//! cloud at the same moment does not reconnect in lock-step.

use std::time::Duration;

use rand::Rng;

/// Backoff state of one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// A backoff whose first cap is `initial_ms` and whose caps never exceed `max_ms`.
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial_ms: initial_ms.max(1),
            max_ms: max_ms.max(initial_ms.max(1)),
            attempt: 0,
        }
    }

    /// The upper bound of the next wait.
    pub fn cap_ms(&self) -> u64 {
        let factor = 1u64.checked_shl(self.attempt.min(32)).unwrap_or(u64::MAX);
        self.initial_ms.saturating_mul(factor).min(self.max_ms)
    }

    /// The next wait, drawn from `rng`; the cap doubles for the one after.
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self.cap_ms();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rng.random_range(0..=cap))
    }

    /// The next wait, from the thread's random generator.
    pub fn next_wait(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// After a successful connection: start again from `initial_ms`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_caps_double_up_to_max_and_waits_stay_below_cap() {
        let mut b = Backoff::new(100, 1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut caps = Vec::new();
        for _ in 0..8 {
            let cap = b.cap_ms();
            caps.push(cap);
            let w = b.next_with(&mut rng);
            assert!(w <= Duration::from_millis(cap));
        }
        assert_eq!(caps, vec![100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.cap_ms(), 100);
    }

    #[test]
    fn backoff_waits_are_spread_not_lockstep() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(1000, 1000).next_with(&mut rng))
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn backoff_survives_many_attempts_without_overflow() {
        let mut b = Backoff::new(500, 30_000);
        for _ in 0..200 {
            b.next_wait();
        }
        assert_eq!(b.cap_ms(), 30_000);
    }
}
