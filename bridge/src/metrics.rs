//! Bridge and outbox metrics (names in `docs/metrics.md`). Registered whether or not a bridge is
//! configured, so dashboards and alerts see zeros rather than missing series.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use edgetwin_outbox::{DropReason, Stats};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use prometheus_client::encoding::EncodeLabelSet;

/// Labels of dropped records.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why the records were dropped.
    pub reason: String,
}

/// The `reason` label of records lost because the outbox could not store them.
pub const APPEND_FAILED: &str = "append_failed";
/// The `reason` label of records the cloud broker refused (an MQTT 5 PUBACK with a failure
/// reason code, e.g. not authorized): released from the outbox, not sent again.
pub const CLOUD_REFUSED: &str = "cloud_refused";
/// The `reason` label of records lost because the outbox file was damaged (counted at open).
pub const DAMAGED: &str = "damaged";

/// Every bridge and outbox metric.
#[derive(Default)]
pub struct BridgeMetrics {
    /// 1 while connected to the cloud broker, else 0.
    pub connected: Gauge,
    /// Successful connections after the first one.
    pub reconnects: Counter,
    /// Failed connection attempts and lost connections.
    pub connection_errors: Counter,
    /// Outbox records handed to the cloud connection, alone or in batches (resends after a
    /// reconnect included).
    pub sent: Counter,
    /// Batch envelopes handed to the cloud connection.
    pub batches: Counter,
    /// Payload bytes of the messages in those batches, before the envelope and compression.
    pub batch_raw_bytes: Counter,
    /// Bytes of those envelopes as sent (after compression).
    pub batch_sent_bytes: Counter,
    /// Of `sent`, records appended before the current connection came up (backlog replay).
    pub replayed: Counter,
    /// Outbox records whose publish (alone or in a batch) the cloud broker acknowledged.
    pub acked: Counter,
    /// Messages received from the cloud broker.
    pub received: Counter,
    /// Publishes waiting for PUBACK.
    pub inflight: Gauge,
    /// Records in the outbox.
    pub outbox_records: Gauge,
    /// Stored bytes in the outbox.
    pub outbox_bytes: Gauge,
    /// Age of the oldest record in the outbox.
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    /// Outbox file size.
    pub outbox_file_bytes: Gauge,
    /// Records stored in the outbox.
    pub outbox_appended: Counter,
    /// Records dropped, by reason.
    pub outbox_dropped: Family<ReasonLabels, Counter>,
    /// Cloud messages refused because signatures are required, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// The outbox counters as last seen, to turn its since-open totals into increments.
    last: Mutex<Seen>,
}

/// Outbox counters already turned into metric increments.
#[derive(Default)]
struct Seen {
    appended: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl BridgeMetrics {
    /// Registers every metric (with the registry's `edgetwin` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bridge_connected",
            "1 while the bridge is connected to the cloud broker, else 0",
            self.connected.clone(),
        );
        registry.register(
            "bridge_reconnects",
            "Successful connections to the cloud broker after the first one",
            self.reconnects.clone(),
        );
        registry.register(
            "bridge_connection_errors",
            "Failed connection attempts and lost connections to the cloud broker",
            self.connection_errors.clone(),
        );
        registry.register(
            "bridge_sent_messages",
            "Outbox records handed to the cloud connection, alone or in batches, resends included",
            self.sent.clone(),
        );
        registry.register(
            "bridge_batches",
            "Batch envelopes handed to the cloud connection",
            self.batches.clone(),
        );
        registry.register(
            "bridge_batch_raw_bytes",
            "Payload bytes of the batched messages, before the envelope and compression",
            self.batch_raw_bytes.clone(),
        );
        registry.register(
            "bridge_batch_sent_bytes",
            "Bytes of the batch envelopes as sent, after compression",
            self.batch_sent_bytes.clone(),
        );
        registry.register(
            "bridge_replayed_messages",
            "Publishes of records appended before the current connection came up (backlog replay)",
            self.replayed.clone(),
        );
        registry.register(
            "bridge_acked_messages",
            "Outbox records whose publish (alone or in a batch) the cloud broker acknowledged",
            self.acked.clone(),
        );
        registry.register(
            "bridge_received_messages",
            "Messages received from the cloud broker",
            self.received.clone(),
        );
        registry.register(
            "bridge_inflight_messages",
            "Publishes sent to the cloud broker and waiting for PUBACK",
            self.inflight.clone(),
        );
        registry.register(
            "outbox_records",
            "Records waiting in the durable outbox",
            self.outbox_records.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Stored size of the records waiting in the outbox",
            self.outbox_bytes.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest record in the outbox (0 when empty)",
            self.outbox_oldest_age.clone(),
        );
        registry.register(
            "outbox_file_bytes",
            "Size of the outbox file",
            self.outbox_file_bytes.clone(),
        );
        registry.register(
            "outbox_appended_records",
            "Records stored in the outbox",
            self.outbox_appended.clone(),
        );
        registry.register(
            "bridge_refused_messages",
            "Messages from the cloud refused for want of a valid signature (bridge.signatures), by reason",
            self.refused.clone(),
        );
        for reason in crate::signed::Refusal::REASONS {
            let _ = self.refused.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        registry.register(
            "outbox_dropped_records",
            "Records dropped from or refused by the outbox, by reason",
            self.outbox_dropped.clone(),
        );
        for reason in DropReason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain([APPEND_FAILED, DAMAGED])
        {
            let _ = self.outbox_dropped.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
    }

    /// Brings the outbox gauges and counters up to `stats` (a snapshot of the same outbox).
    pub fn sync_outbox(&self, stats: &Stats, now_ms: i64) {
        self.outbox_records.set(to_i64(stats.records));
        self.outbox_bytes.set(to_i64(stats.bytes));
        self.outbox_file_bytes.set(to_i64(stats.file_bytes));
        let age = stats
            .oldest_ts_ms
            .map(|ts| (now_ms.saturating_sub(ts)).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.outbox_oldest_age.set(age);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // Snapshots can be taken concurrently and arrive out of order: only move forward.
        if stats.appended_total > last.appended {
            self.outbox_appended
                .inc_by(stats.appended_total - last.appended);
            last.appended = stats.appended_total;
        }
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            let now = stats.dropped.get(reason).records;
            let before = last.dropped[i];
            if now > before {
                self.outbox_dropped
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str().to_string(),
                    })
                    .inc_by(now - before);
                last.dropped[i] = now;
            }
        }
    }

    /// Counts records lost because an append failed.
    /// Records known lost in a damaged outbox file (see `edgetwin_outbox::QuarantinedFile`).
    pub fn damaged(&self, records: u64) {
        self.outbox_dropped
            .get_or_create(&ReasonLabels {
                reason: DAMAGED.to_string(),
            })
            .inc_by(records);
    }

    /// Records lost because an append failed.
    pub fn append_failed(&self, records: u64) {
        self.outbox_dropped
            .get_or_create(&ReasonLabels {
                reason: APPEND_FAILED.to_string(),
            })
            .inc_by(records);
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
