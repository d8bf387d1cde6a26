//! Fixed-rate poll schedule of one device, free of I/O and clocks: time is a parameter
//! (a [`Duration`] since the schedule started), so tests drive it by hand.
//!
//! Properties are grouped by `collectCycle`. Group `g` is due at `k * period_g` for k = 0, 1, ...
//! (fixed rate: a late poll never shifts later ones, so there is no drift). When a poll ran so
//! long that whole ticks were missed, those ticks are skipped (not bunched up) and counted as
//! overruns. Every group due at the same wake-up is read together, in one `Driver::read` call,
//! so one device needs one timer however many cycles its properties use.

use std::time::Duration;

/// The poll schedule of one device.
#[derive(Debug, Clone)]
pub struct Schedule {
    groups: Vec<Group>,
}

#[derive(Debug, Clone)]
struct Group {
    period: Duration,
    next: Duration,
    props: Vec<usize>,
}

/// What [`Schedule::take_due`] found due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Indexes (into the list given to [`Schedule::new`]) of the properties to read now, ascending.
    pub props: Vec<usize>,
    /// Ticks skipped because the previous poll overran.
    pub overruns: u64,
}

impl Schedule {
    /// A schedule for properties with the given collect cycles (index = property index). A zero
    /// cycle is treated as 1 ms so the schedule always advances.
    pub fn new(cycles: &[Duration]) -> Schedule {
        let mut groups: Vec<Group> = Vec::new();
        for (i, c) in cycles.iter().enumerate() {
            let period = (*c).max(Duration::from_millis(1));
            match groups.iter_mut().find(|g| g.period == period) {
                Some(g) => g.props.push(i),
                None => groups.push(Group {
                    period,
                    next: Duration::ZERO,
                    props: vec![i],
                }),
            }
        }
        Schedule { groups }
    }

    /// The distinct collect cycles, shortest first.
    pub fn periods(&self) -> Vec<Duration> {
        let mut p: Vec<Duration> = self.groups.iter().map(|g| g.period).collect();
        p.sort();
        p
    }

    /// The shortest collect cycle, if there is any property.
    pub fn shortest_period(&self) -> Option<Duration> {
        self.groups.iter().map(|g| g.period).min()
    }

    /// When the next poll is due (time since start); `None` when there is nothing to poll.
    pub fn next_wake(&self) -> Option<Duration> {
        self.groups.iter().map(|g| g.next).min()
    }

    /// Takes every group due at `now` and moves it to its next tick after `now`.
    pub fn take_due(&mut self, now: Duration) -> Due {
        let mut due = Due::default();
        for g in &mut self.groups {
            if g.next > now {
                continue;
            }
            due.props.extend_from_slice(&g.props);
            g.next += g.period;
            if g.next <= now {
                // Whole ticks were missed: skip them, keep the fixed-rate grid.
                let behind = now - g.next;
                let missed = behind.as_nanos() / g.period.as_nanos() + 1;
                due.overruns += u64::try_from(missed).unwrap_or(u64::MAX);
                g.next += g.period * u32::try_from(missed).unwrap_or(u32::MAX);
            }
        }
        due.props.sort_unstable();
        due
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn schedule_reads_properties_with_the_same_cycle_together() {
        let mut s = Schedule::new(&[ms(1000), ms(500), ms(1000)]);
        assert_eq!(s.take_due(ms(0)).props, vec![0, 1, 2]);
        assert_eq!(s.next_wake(), Some(ms(500)));
        assert_eq!(s.take_due(ms(500)).props, vec![1]);
        assert_eq!(s.take_due(ms(1000)).props, vec![0, 1, 2]);
    }

    #[test]
    fn schedule_skips_and_counts_missed_ticks_without_drift() {
        let mut s = Schedule::new(&[ms(100)]);
        s.take_due(ms(0));
        // The poll at 100 ms ran until 350 ms: ticks 200 and 300 are missed.
        let d = s.take_due(ms(350));
        assert_eq!(d.props, vec![0]);
        assert_eq!(d.overruns, 2);
        assert_eq!(s.next_wake(), Some(ms(400)));
    }

    #[test]
    fn schedule_late_wake_within_one_period_is_not_an_overrun() {
        let mut s = Schedule::new(&[ms(100)]);
        s.take_due(ms(0));
        let d = s.take_due(ms(130));
        assert_eq!(d.overruns, 0);
        assert_eq!(s.next_wake(), Some(ms(200)));
    }

    proptest! {
        #[test]
        fn schedule_ticks_stay_on_the_fixed_rate_grid(
            period in 1u64..500,
            wakes in proptest::collection::vec(0u64..2000, 1..50),
        ) {
            let mut s = Schedule::new(&[ms(period)]);
            let mut now = 0;
            for w in wakes {
                now += w;
                s.take_due(ms(now));
                let next = s.next_wake().unwrap();
                prop_assert_eq!(next.as_millis() as u64 % period, 0);
                prop_assert!(next > ms(now));
                prop_assert!(next <= ms(now + period));
            }
        }
    }
}
