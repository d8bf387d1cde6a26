//! Per-device counters of a mapper, published as a [`MapperMetricsMsg`] on
//! `mappers/{protocol}/metrics` and re-exported by the node on its `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edgetwin_contract::{DeviceCounters, LatencyHistogram, MapperMetricsMsg, TimestampMs};

/// Upper bounds (s) of the read latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters of every device a mapper serves; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<Mutex<BTreeMap<String, DeviceCounters>>>);

impl Metrics {
    /// Applies `f` to the counters of `device` (created on first use).
    pub fn with(&self, device: &str, f: impl FnOnce(&mut DeviceCounters)) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let c = map
            .entry(device.to_owned())
            .or_insert_with(|| DeviceCounters {
                read_latency: LatencyHistogram {
                    buckets: LATENCY_BUCKETS.iter().map(|b| (*b, 0)).collect(),
                    ..LatencyHistogram::default()
                },
                ..DeviceCounters::default()
            });
        f(c);
    }

    /// Forgets a removed device.
    pub fn remove(&self, device: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device);
    }

    /// A snapshot for `mappers/{protocol}/metrics`.
    pub fn snapshot(&self, ts: TimestampMs) -> MapperMetricsMsg {
        MapperMetricsMsg {
            ts,
            devices: self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// Adds one observation to a cumulative histogram.
pub fn observe(h: &mut LatencyHistogram, d: Duration) {
    let s = d.as_secs_f64();
    h.sum += s;
    h.count += 1;
    for (bound, count) in &mut h.buckets {
        if s <= *bound {
            *count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_histogram_is_cumulative() {
        let m = Metrics::default();
        m.with("d", |c| {
            observe(&mut c.read_latency, Duration::from_millis(3));
            observe(&mut c.read_latency, Duration::from_secs(10));
        });
        let snap = m.snapshot(1);
        let h = &snap.devices["d"].read_latency;
        assert_eq!(h.count, 2);
        assert_eq!(h.buckets[0], (0.001, 0));
        assert_eq!(h.buckets[2], (0.005, 1));
        assert_eq!(h.buckets[11], (5.0, 1));
        m.remove("d");
        assert!(m.snapshot(2).devices.is_empty());
    }
}
