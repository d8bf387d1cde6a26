//! The node's Prometheus/OpenMetrics metrics. Every name is listed in `docs/metrics.md`; labels are
//! bounded (closed enums or the protocol name), never device ids, so cardinality stays fixed.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::mapper_metrics::MapperMetrics;

/// Labels of accepted updates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    /// `desired` or `reported`.
    pub side: String,
    /// `local`, `cloud` or `mapper`.
    pub source: String,
}

/// Labels of rejected updates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The `ErrorCode` of the rejection.
    pub reason: String,
}

/// Labels of the device gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// unknown, online, offline, error.
    pub status: String,
}

/// Labels of per-mapper series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapperLabels {
    /// The mapper's protocol.
    pub protocol: String,
}

/// Labels of restored twins.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoredLabels {
    /// `salvage` (read back from the damaged file) or `snapshot` (from the last snapshot).
    pub from: String,
}

/// Every metric of the node, registered once at start.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    /// Accepted twin updates that changed at least one value.
    pub twin_updates_accepted: Family<UpdateLabels, Counter>,
    /// Updates that only repeated current values (refresh last-seen, nothing stored or sent).
    pub twin_updates_unchanged: Family<UpdateLabels, Counter>,
    /// Rejected patches by reason.
    pub twin_updates_rejected: Family<ReasonLabels, Counter>,
    /// Time from a patch reaching the twin service to its delta being published.
    pub twin_delta_latency: Histogram,
    /// Duration of one group commit.
    pub store_commit_duration: Histogram,
    /// Twins written per group commit.
    pub store_commit_batch: Histogram,
    /// Failed store commits.
    pub store_commit_errors: Counter,
    /// Registered devices by connection status.
    pub devices: Family<StatusLabels, Gauge>,
    /// Profile files rejected (each load attempt of a bad file counts once).
    pub profile_errors: Counter,
    /// HTTP connections closed at once because `http.max_connections` were open.
    pub http_connections_refused: Counter,
    /// Clients' retained messages not kept across restarts because the retained store was full.
    pub retained_refused: Counter,
    /// Clients' retained messages kept across restarts.
    pub retained_stored: Gauge,
    /// Profile files currently loaded.
    pub profile_files: Gauge,
    /// Twin store records quarantined at start because they could not be decoded.
    pub store_quarantined: Gauge,
    /// Twins a damaged store file was restored with at start, by where they came from.
    pub store_restored: Family<RestoredLabels, Gauge>,
    /// Snapshot lines found damaged while restoring (each one twin not restored).
    pub store_snapshot_damaged: Gauge,
    /// When the last twin store snapshot was written (unix seconds; 0 = none yet).
    pub store_snapshot_timestamp: Gauge,
    /// 1 while a mapper is online (its status says so), 0 once its status or will says offline.
    pub mapper_up: Family<MapperLabels, Gauge>,
    /// Latest counters of every mapper, re-exported.
    pub mappers: Arc<MapperMetrics>,
    /// Latest counters of the container agent.
    pub containers: Arc<crate::container_agent::ContainerMetrics>,
    /// The upstream bridge and its outbox.
    pub bridge: Arc<edgetwin_bridge::BridgeMetrics>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edgetwin");
        let m = Metrics {
            twin_updates_accepted: Family::default(),
            twin_updates_unchanged: Family::default(),
            twin_updates_rejected: Family::default(),
            twin_delta_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_commit_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            store_commit_errors: Counter::default(),
            devices: Family::default(),
            profile_errors: Counter::default(),
            http_connections_refused: Counter::default(),
            retained_refused: Counter::default(),
            retained_stored: Gauge::default(),
            profile_files: Gauge::default(),
            store_quarantined: Gauge::default(),
            store_restored: Family::default(),
            store_snapshot_damaged: Gauge::default(),
            store_snapshot_timestamp: Gauge::default(),
            mapper_up: Family::default(),
            mappers: Arc::new(MapperMetrics::default()),
            containers: Arc::default(),
            bridge: Default::default(),
            registry: std::sync::Mutex::new(Registry::default()),
        };
        // Which build is running, for dashboards and alerts across a fleet being upgraded.
        registry.register(
            "build",
            "The running build: its version and the commit it was built from",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("EDGETWIN_COMMIT")),
            ]),
        );
        registry.register(
            "twin_updates_accepted",
            "Twin patches accepted that changed at least one property",
            m.twin_updates_accepted.clone(),
        );
        registry.register(
            "twin_updates_unchanged",
            "Twin patches accepted that repeated current values (last-seen refreshed only)",
            m.twin_updates_unchanged.clone(),
        );
        registry.register(
            "twin_updates_rejected",
            "Twin patches rejected, by reason",
            m.twin_updates_rejected.clone(),
        );
        registry.register(
            "twin_delta_latency_seconds",
            "Time from a patch reaching the twin service to its delta being published (includes the store commit)",
            m.twin_delta_latency.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Duration of one durable group commit of the twin store",
            m.store_commit_duration.clone(),
        );
        registry.register(
            "store_commit_batch_twins",
            "Twins written per group commit",
            m.store_commit_batch.clone(),
        );
        registry.register(
            "store_commit_errors",
            "Twin store commits that failed (the batch was rejected with store_failed)",
            m.store_commit_errors.clone(),
        );
        registry.register("devices", "Registered devices by status", m.devices.clone());
        registry.register(
            "profile_errors",
            "Profile files rejected on load or apply",
            m.profile_errors.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once because http.max_connections were open",
            m.http_connections_refused.clone(),
        );
        registry.register(
            "retained_refused",
            "Clients' retained messages not kept across restarts: the retained store was full",
            m.retained_refused.clone(),
        );
        registry.register(
            "retained_stored",
            "Clients' retained messages kept across restarts",
            m.retained_stored.clone(),
        );
        registry.register(
            "profile_files",
            "Profile files currently loaded",
            m.profile_files.clone(),
        );
        registry.register(
            "store_quarantined_records",
            "Twin store records that could not be decoded at start and were quarantined",
            m.store_quarantined.clone(),
        );
        registry.register(
            "store_restored_twins",
            "Twins a damaged twin store file was restored with at start, by source (salvage: read back from the damaged file; snapshot: from the last snapshot, later changes lost)",
            m.store_restored.clone(),
        );
        registry.register(
            "store_snapshot_damaged_lines",
            "Snapshot lines found damaged while restoring the twin store at start (one twin each, not restored)",
            m.store_snapshot_damaged.clone(),
        );
        registry.register(
            "store_snapshot_timestamp_seconds",
            "When the last twin store snapshot was written (unix seconds; a damaged store loses at most the changes made since)",
            m.store_snapshot_timestamp.clone(),
        );
        for from in ["salvage", "snapshot"] {
            let _ = m.store_restored.get_or_create(&RestoredLabels {
                from: from.to_string(),
            });
        }
        registry.register(
            "mapper_up",
            "1 while a mapper is online, 0 once its status (or its will) said offline",
            m.mapper_up.clone(),
        );
        registry.register_collector(Box::new(m.mappers.clone()));
        registry.register_collector(Box::new(m.containers.clone()));
        m.bridge.register(&mut registry);
        for code in edgetwin_contract::ErrorCode::ALL {
            let _ = m.twin_updates_rejected.get_or_create(&ReasonLabels {
                reason: code.as_str().to_string(),
            });
        }
        for (side, source) in [
            ("desired", "local"),
            ("desired", "cloud"),
            ("reported", "mapper"),
        ] {
            let labels = UpdateLabels {
                side: side.to_string(),
                source: source.to_string(),
            };
            let _ = m.twin_updates_accepted.get_or_create(&labels);
            let _ = m.twin_updates_unchanged.get_or_create(&labels);
        }
        for status in ["unknown", "online", "offline", "error", "stale"] {
            let _ = m.devices.get_or_create(&StatusLabels {
                status: status.to_string(),
            });
        }
        Metrics {
            registry: std::sync::Mutex::new(registry),
            ..m
        }
    }

    /// Registers metrics of a part started after the node's metrics (the gate).
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut r) = self.registry.lock() {
            f(&mut r);
        }
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().map_err(|_| std::fmt::Error)?;
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prefixed_and_rejections_preregistered() {
        let m = Metrics::new();
        let text = m.encode().expect("encodes");
        assert!(
            text.contains("edgetwin_twin_updates_rejected_total{reason=\"read_only\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("edgetwin_store_commit_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
