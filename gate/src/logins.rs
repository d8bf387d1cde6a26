//! Back-off on failed logins, per source address and per user name (I/O-free: the caller passes
//! the time and does the waiting).
//!
//! A few failures are free (typos). After that every further attempt from the same address, or
//! for the same user from anywhere, is answered only at its turn: the turns of one key are
//! spaced by a delay that doubles with each failure up to a cap, and concurrent attempts queue
//! behind each other, so opening many connections at once does not multiply the guess rate. An
//! attempt whose turn is further away than the cap is refused without its password being
//! checked. A success clears the user's and the address's record; records are forgotten after
//! a quiet period, and the table is bounded (the oldest record goes first), so a scan from
//! many addresses cannot grow memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The back-off's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failures per key before any delay.
    pub free_failures: u32,
    /// The first delay; doubled per further failure.
    pub base: Duration,
    /// Longest delay between two turns of one key, and the furthest turn handed out.
    pub max: Duration,
    /// A key with no failure for this long is forgotten.
    pub forget_after: Duration,
    /// Most keys remembered.
    pub max_keys: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            free_failures: 3,
            base: Duration::from_millis(250),
            max: Duration::from_secs(10),
            forget_after: Duration::from_secs(15 * 60),
            max_keys: 10_000,
        }
    }
}

/// What to do with a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Check it now.
    Now,
    /// Check it at this instant (hold the answer until then).
    At(Instant),
    /// Refuse it without checking: its turn would be further away than [`Policy::max`].
    Refuse,
}

#[derive(Debug, Hash, PartialEq, Eq, Clone)]
enum Key {
    Source(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    /// The earliest turn still free.
    next: Instant,
    last_failure: Instant,
}

/// Failed logins by source and by user.
#[derive(Debug)]
pub struct Logins {
    policy: Policy,
    records: HashMap<Key, Record>,
}

impl Logins {
    /// An empty table.
    pub fn new(policy: Policy) -> Logins {
        Logins {
            policy,
            records: HashMap::new(),
        }
    }

    fn keys(source: IpAddr, user: Option<&str>) -> impl Iterator<Item = Key> {
        std::iter::once(Key::Source(source)).chain(user.map(|u| Key::User(u.to_string())))
    }

    fn delay(&self, failures: u32) -> Duration {
        if failures < self.policy.free_failures {
            return Duration::ZERO;
        }
        let over = failures - self.policy.free_failures;
        let factor = 1u32.checked_shl(over).unwrap_or(u32::MAX);
        self.policy.base.saturating_mul(factor).min(self.policy.max)
    }

    /// The turn of an attempt from `source` as `user`, taking that turn.
    pub fn turn(&mut self, source: IpAddr, user: Option<&str>, now: Instant) -> Turn {
        self.forget(now);
        let mut at = now;
        let mut delay = Duration::ZERO;
        for key in Self::keys(source, user) {
            if let Some(r) = self.records.get(&key) {
                let d = self.delay(r.failures);
                if !d.is_zero() {
                    at = at.max(r.next);
                    delay = delay.max(d);
                }
            }
        }
        if delay.is_zero() {
            return Turn::Now;
        }
        if at.saturating_duration_since(now) > self.policy.max {
            return Turn::Refuse;
        }
        for key in Self::keys(source, user) {
            if let Some(r) = self.records.get_mut(&key) {
                r.next = r.next.max(at + delay);
            }
        }
        if at == now {
            Turn::Now
        } else {
            Turn::At(at)
        }
    }

    /// Records a failed attempt.
    pub fn failed(&mut self, source: IpAddr, user: Option<&str>, now: Instant) {
        for key in Self::keys(source, user) {
            let r = self.records.entry(key).or_insert(Record {
                failures: 0,
                next: now,
                last_failure: now,
            });
            r.failures = r.failures.saturating_add(1);
            r.last_failure = now;
        }
        self.bound();
    }

    /// Records a successful login: the address and the user start afresh.
    pub fn succeeded(&mut self, source: IpAddr, user: Option<&str>) {
        for key in Self::keys(source, user) {
            self.records.remove(&key);
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn forget(&mut self, now: Instant) {
        let keep = self.policy.forget_after;
        self.records
            .retain(|_, r| now.saturating_duration_since(r.last_failure) < keep || r.next > now);
    }

    fn bound(&mut self) {
        while self.records.len() > self.policy.max_keys {
            let oldest = self
                .records
                .iter()
                .min_by_key(|(_, r)| r.last_failure)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.records.remove(&k);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn policy() -> Policy {
        Policy {
            free_failures: 2,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            forget_after: Duration::from_secs(60),
            max_keys: 4,
        }
    }

    #[test]
    fn a_few_failures_are_free_then_the_delay_doubles_up_to_the_cap() {
        let mut l = Logins::new(policy());
        let t0 = Instant::now();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let wait = match l.turn(ip(1), Some("eng"), now) {
                Turn::Now => Duration::ZERO,
                Turn::At(at) => at - now,
                Turn::Refuse => panic!("a serial guesser is slowed, not refused"),
            };
            now += wait;
            waits.push(wait.as_millis());
            l.failed(ip(1), Some("eng"), now);
        }
        // Two free failures; then turns are spaced by 100, 200, 400... ms (the attempt after
        // the free failures takes the turn at hand and spaces the next one).
        assert_eq!(waits, [0, 0, 0, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn concurrent_attempts_queue_behind_each_other_and_the_far_ones_are_refused() {
        let mut l = Logins::new(policy());
        let now = Instant::now();
        for _ in 0..3 {
            l.failed(ip(1), None, now);
        }
        // Delay 200 ms per turn: turns at +0 (free slot), +200, +400, ... up to the 1 s cap.
        let turns: Vec<Turn> = (0..8).map(|_| l.turn(ip(1), None, now)).collect();
        assert_eq!(turns[0], Turn::Now);
        assert_eq!(turns[1], Turn::At(now + Duration::from_millis(200)));
        assert_eq!(turns[5], Turn::At(now + Duration::from_millis(1000)));
        assert_eq!(turns[6], Turn::Refuse);
        assert_eq!(turns[7], Turn::Refuse);
    }

    #[test]
    fn the_user_is_protected_from_every_address_and_a_success_clears_it() {
        let mut l = Logins::new(policy());
        let now = Instant::now();
        for n in 0..3 {
            l.failed(ip(n), Some("eng"), now);
        }
        // A fresh address guessing the same user waits; another user from it does not.
        assert!(matches!(l.turn(ip(9), Some("eng"), now), Turn::Now));
        assert!(matches!(l.turn(ip(9), Some("eng"), now), Turn::At(_)));
        assert_eq!(l.turn(ip(9), Some("other"), now), Turn::Now);
        l.succeeded(ip(9), Some("eng"));
        assert_eq!(l.turn(ip(8), Some("eng"), now), Turn::Now);
    }

    #[test]
    fn records_are_forgotten_after_a_quiet_period() {
        let mut l = Logins::new(policy());
        let now = Instant::now();
        for _ in 0..5 {
            l.failed(ip(1), None, now);
        }
        let later = now + Duration::from_secs(61);
        assert_eq!(l.turn(ip(1), None, later), Turn::Now);
        assert!(l.is_empty());
    }

    proptest! {
        /// However many addresses and users fail, the table stays within its bound, and no
        /// turn is ever handed out further away than the cap.
        #[test]
        fn the_table_is_bounded_and_turns_never_exceed_the_cap(
            attempts in prop::collection::vec((0u8..20, 0u8..5, any::<bool>(), 0u64..500), 1..200),
        ) {
            let p = policy();
            let mut l = Logins::new(p);
            let mut now = Instant::now();
            for (src, user, fail, step) in attempts {
                now += Duration::from_millis(step);
                let user = format!("u{user}");
                if let Turn::At(at) = l.turn(ip(src), Some(&user), now) {
                    prop_assert!(at - now <= p.max);
                }
                if fail {
                    l.failed(ip(src), Some(&user), now);
                } else {
                    l.succeeded(ip(src), Some(&user));
                }
                prop_assert!(l.len() <= p.max_keys);
            }
        }
    }
}
