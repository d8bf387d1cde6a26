//! When a reading is reported, free of I/O and clocks (time is a [`Duration`] since the device
//! task started).
//!
//! Rules, per property:
//! - without `reportOnChange` every reading is reported;
//! - with `reportOnChange`, a reading is reported when it differs from the last *reported* value
//!   (numbers: by more than `deadband`; other types: any difference), or when the heartbeat
//!   (`reportCycle`, default [`DEFAULT_REPORT_CYCLE_FACTOR`] × `collectCycle`) has passed since
//!   the last report. Comparing with the last reported value (not the last reading) means a
//!   slow ramp is still reported once it has moved by more than the deadband, so the reported
//!   value never drifts more than `deadband` from the device.
//!
//! Everything reported by one poll goes out as one merged patch ([`patch`]).

use std::time::Duration;

use edgetwin_contract::{TimestampMs, TS_KEY};
use serde_json::{Map, Value};

/// Without `reportCycle`, a `reportOnChange` property is re-reported after this many collect
/// cycles even when unchanged, so the twin's `lastSeen` and the reported value stay fresh (the
/// node's stale bound counts on it).
pub use edgetwin_profile::DEFAULT_REPORT_CYCLE_FACTOR;

/// How one property is reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportPolicy {
    /// `Some(deadband)` for report-on-change (0 = any difference); `None` reports every reading.
    pub on_change: Option<f64>,
    /// Report an unchanged value again after this long.
    pub heartbeat: Duration,
}

impl ReportPolicy {
    /// The policy of a device property, given its effective collect cycle.
    pub fn of(prop: &edgetwin_profile::DeviceProperty, collect_cycle: Duration) -> ReportPolicy {
        let heartbeat = prop.heartbeat(collect_cycle);
        ReportPolicy {
            on_change: prop
                .report_on_change
                .as_ref()
                .map(|r| r.deadband.unwrap_or(0.0).max(0.0)),
            heartbeat,
        }
    }
}

/// Whether `new` is a change from the last reported `last` under `deadband`.
pub fn is_change(last: &Value, new: &Value, deadband: f64) -> bool {
    match (last.as_f64(), new.as_f64()) {
        (Some(a), Some(b)) if last.is_number() && new.is_number() => (b - a).abs() > deadband,
        _ => last != new,
    }
}

/// The report state of one device's properties.
#[derive(Debug, Clone)]
pub struct Reporter {
    policies: Vec<ReportPolicy>,
    last: Vec<Option<(Value, Duration)>>,
}

impl Reporter {
    /// A reporter for properties with these policies (index = property index).
    pub fn new(policies: Vec<ReportPolicy>) -> Reporter {
        let last = vec![None; policies.len()];
        Reporter { policies, last }
    }

    /// Decides whether reading `value` of property `idx` at `now` is reported; when it is, it
    /// becomes the last reported value.
    pub fn observe(&mut self, idx: usize, value: &Value, now: Duration) -> bool {
        let (Some(policy), Some(last)) = (self.policies.get(idx), self.last.get_mut(idx)) else {
            return false;
        };
        let report = match (policy.on_change, &*last) {
            (None, _) | (_, None) => true,
            (Some(deadband), Some((prev, at))) => {
                is_change(prev, value, deadband) || now.saturating_sub(*at) >= policy.heartbeat
            }
        };
        if report {
            *last = Some((value.clone(), now));
        }
        report
    }

    /// Records `value` as reported regardless of the policy (a write's read-back).
    pub fn force(&mut self, idx: usize, value: &Value, now: Duration) {
        if let Some(last) = self.last.get_mut(idx) {
            *last = Some((value.clone(), now));
        }
    }

    /// The last reported value of property `idx`.
    pub fn last_reported(&self, idx: usize) -> Option<&Value> {
        self.last.get(idx)?.as_ref().map(|(v, _)| v)
    }

    /// Forgets every reported value, so the next reading of each property is reported (after a
    /// reconnect the twin may be stale).
    pub fn reset(&mut self) {
        self.last.iter_mut().for_each(|l| *l = None);
    }
}

/// The merged `dt/{device}/reported` patch of `values`, with the reading's `ts`.
pub fn patch(values: Map<String, Value>, ts: TimestampMs) -> Map<String, Value> {
    let mut out = values;
    out.insert(TS_KEY.into(), Value::from(ts));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn on_change(deadband: f64) -> ReportPolicy {
        ReportPolicy {
            on_change: Some(deadband),
            heartbeat: secs(3600),
        }
    }

    #[test]
    fn report_every_reading_without_report_on_change() {
        let mut r = Reporter::new(vec![ReportPolicy {
            on_change: None,
            heartbeat: secs(10),
        }]);
        assert!(r.observe(0, &json!(1), secs(0)));
        assert!(r.observe(0, &json!(1), secs(1)));
    }

    #[test]
    fn report_deadband_suppresses_changes_within_it() {
        let mut r = Reporter::new(vec![on_change(0.5)]);
        assert!(r.observe(0, &json!(20.0), secs(0)));
        assert!(!r.observe(0, &json!(20.4), secs(1)));
        assert!(!r.observe(0, &json!(19.6), secs(2)));
        assert!(r.observe(0, &json!(20.6), secs(3)));
        assert_eq!(r.last_reported(0), Some(&json!(20.6)));
    }

    #[test]
    fn report_slow_ramp_is_reported_once_it_leaves_the_deadband() {
        let mut r = Reporter::new(vec![on_change(1.0)]);
        r.observe(0, &json!(0.0), secs(0));
        let reported: Vec<bool> = (1..=5)
            .map(|i| r.observe(0, &json!(f64::from(i) * 0.3), secs(u64::from(i as u8))))
            .collect();
        // 0.3, 0.6, 0.9 stay within 1.0 of 0.0; 1.2 leaves it; 1.5 is within 1.0 of 1.2.
        assert_eq!(reported, vec![false, false, false, true, false]);
    }

    #[test]
    fn report_unchanged_value_again_after_the_heartbeat() {
        let mut r = Reporter::new(vec![ReportPolicy {
            on_change: Some(0.0),
            heartbeat: secs(10),
        }]);
        assert!(r.observe(0, &json!("on"), secs(0)));
        assert!(!r.observe(0, &json!("on"), secs(9)));
        assert!(r.observe(0, &json!("on"), secs(10)));
    }

    #[test]
    fn report_non_numbers_change_on_any_difference() {
        assert!(is_change(&json!("a"), &json!("b"), 100.0));
        assert!(is_change(&json!(true), &json!(false), 100.0));
        assert!(!is_change(&json!({"a": 1}), &json!({"a": 1}), 0.0));
        assert!(is_change(&json!(1), &json!("1"), 100.0));
    }

    #[test]
    fn report_default_heartbeat_is_ten_collect_cycles() {
        let prop: edgetwin_profile::DeviceProperty = serde_json::from_value(json!({
            "name": "t", "reportOnChange": {"deadband": 0.5},
            "visitors": {"serial": {"request": "T?\n", "pattern": "(.*)"}}
        }))
        .unwrap();
        let p = ReportPolicy::of(&prop, secs(2));
        assert_eq!(p.heartbeat, secs(20));
        assert_eq!(p.on_change, Some(0.5));
    }

    #[test]
    fn report_patch_carries_ts() {
        let mut m = Map::new();
        m.insert("a".into(), json!(1));
        assert_eq!(Value::Object(patch(m, 42)), json!({"a": 1, "ts": 42}));
    }

    proptest! {
        #[test]
        fn report_never_drifts_more_than_deadband_from_the_last_reading(
            deadband in 0.0f64..10.0,
            readings in proptest::collection::vec(-100.0f64..100.0, 1..100),
        ) {
            let mut r = Reporter::new(vec![on_change(deadband)]);
            for (i, v) in readings.iter().enumerate() {
                let before = r.last_reported(0).and_then(Value::as_f64);
                let reported = r.observe(0, &json!(v), secs(i as u64));
                let after = r.last_reported(0).and_then(Value::as_f64).unwrap();
                if let (Some(b), false) = (before, reported) {
                    // Not reported: the reading was within the deadband of the last report.
                    prop_assert!((v - b).abs() <= deadband);
                    prop_assert_eq!(after, b);
                }
                if reported {
                    prop_assert_eq!(after, *v);
                }
                prop_assert!((after - v).abs() <= deadband);
            }
        }
    }
}
