//! Re-export of mapper metrics. Mappers publish cumulative counters on `mappers/{protocol}/metrics`;
//! the node keeps the latest snapshot per protocol and encodes it on every scrape, so operators
//! scrape one target per node. Labels are the protocol and the device, both bounded by the
//! registry.

use std::collections::BTreeMap;
use std::sync::Mutex;

use edgetwin_contract::{DeviceCounters, MapperMetricsMsg};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Latest metrics snapshot of every mapper.
#[derive(Debug, Default)]
pub struct MapperMetrics {
    snapshots: Mutex<BTreeMap<String, MapperMetricsMsg>>,
}

type CounterField = fn(&DeviceCounters) -> u64;

const COUNTERS: [(&str, &str, CounterField); 6] = [
    ("mapper_reads", "Property reads by mappers", |c| c.reads),
    (
        "mapper_read_errors",
        "Property reads that failed (link or device refusal)",
        |c| c.read_errors,
    ),
    ("mapper_writes", "Desired values written to devices", |c| {
        c.writes
    }),
    (
        "mapper_write_errors",
        "Writes to devices that failed",
        |c| c.write_errors,
    ),
    (
        "mapper_poll_overruns",
        "Poll cycles that started late because the previous one overran",
        |c| c.poll_overruns,
    ),
    (
        "mapper_requests",
        "Protocol requests sent to devices (after coalescing)",
        |c| c.requests,
    ),
];

impl MapperMetrics {
    /// Replaces the snapshot of one mapper.
    pub fn update(&self, protocol: &str, msg: MapperMetricsMsg) {
        if let Ok(mut s) = self.snapshots.lock() {
            s.insert(protocol.to_string(), msg);
        }
    }

    /// Drops the series of devices no longer registered (so removed devices stop being exported).
    pub fn retain_devices(&self, registered: &dyn Fn(&str) -> bool) {
        if let Ok(mut s) = self.snapshots.lock() {
            for msg in s.values_mut() {
                msg.devices.retain(|d, _| registered(d));
            }
        }
    }
}

impl Collector for MapperMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(snaps) = self.snapshots.lock() else {
            return Ok(());
        };
        for (name, help, field) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (protocol, msg) in snaps.iter() {
                for (device, c) in &msg.devices {
                    let labels = [("protocol", protocol.as_str()), ("device", device.as_str())];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&field(c), None)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "mapper_read_latency_seconds",
            "Latency of mapper read requests to devices",
            None,
            MetricType::Histogram,
        )?;
        for (protocol, msg) in snaps.iter() {
            for (device, c) in &msg.devices {
                let labels = [("protocol", protocol.as_str()), ("device", device.as_str())];
                let h = &c.read_latency;
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        h.sum,
                        h.count,
                        &per_bucket(&h.buckets, h.count),
                        None,
                    )?;
            }
        }
        Ok(())
    }
}

/// Cumulative `(le, count)` pairs as the encoder wants them: per-bucket counts ending in `+Inf`.
fn per_bucket(cumulative: &[(f64, u64)], total: u64) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(cumulative.len() + 1);
    let mut prev = 0u64;
    for &(le, c) in cumulative {
        out.push((le, c.saturating_sub(prev)));
        prev = prev.max(c);
    }
    out.push((f64::INFINITY, total.saturating_sub(prev)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgetwin_contract::LatencyHistogram;
    use prometheus_client::registry::Registry;

    #[test]
    fn mapper_metrics_are_exported_per_protocol_and_device() {
        let m = std::sync::Arc::new(MapperMetrics::default());
        let mut reg = Registry::with_prefix("edgetwin");
        reg.register_collector(Box::new(m.clone()));
        let mut devices = BTreeMap::new();
        devices.insert(
            "meter-7".to_string(),
            DeviceCounters {
                reads: 10,
                read_errors: 1,
                read_latency: LatencyHistogram {
                    sum: 0.5,
                    count: 10,
                    buckets: vec![(0.01, 4), (0.1, 9)],
                },
                ..Default::default()
            },
        );
        m.update("modbus", MapperMetricsMsg { ts: 1, devices });
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("encodes");
        assert!(
            out.contains("edgetwin_mapper_reads_total{protocol=\"modbus\",device=\"meter-7\"} 10"),
            "{out}"
        );
        assert!(out.contains("edgetwin_mapper_read_latency_seconds_bucket{le=\"0.1\",protocol=\"modbus\",device=\"meter-7\"} 9") || out.contains("edgetwin_mapper_read_latency_seconds_bucket{protocol=\"modbus\",device=\"meter-7\",le=\"0.1\"} 9"), "{out}");
        assert!(
            out.contains("le=\"+Inf\"") && out.contains("} 10\n"),
            "{out}"
        );
    }
}
