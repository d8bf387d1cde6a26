//! The outbox's two lanes ([`Lane`]): `control` (`{data_dir}/outbox-control.redb`: twin
//! documents, statuses, errors, command results) and `bulk` (`{data_dir}/outbox.redb`:
//! telemetry). Each lane is its own [`Outbox`] with its own sequence numbers; the bridge sends
//! every waiting control record before any bulk one, so a telemetry backlog never delays the
//! state the cloud acts on. Order is kept within a lane, per device too; not across lanes.
//!
//! Why two files rather than one file with two tables: the outbox's bounds, drop policy, damage
//! handling and sequence numbers stay exactly as they are (one owner per file), and a control
//! record is never behind a bulk one in any scan. The cost is a second fsync when one append
//! batch holds records of both lanes.
//!
//! A record's in-flight tag carries its lane in bit 62 ([`tag`]), so one in-flight table binds
//! packet ids of both lanes and the acker knows which file to remove a record from.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use edgetwin_outbox::{Limits, Outbox, Stats};
use tracing::{info, warn};

pub use crate::config::Lane;
use crate::metrics::BridgeMetrics;

const CONTROL_BIT: u64 = 1 << 62;

/// The in-flight tag of record `seq` of `lane`.
pub fn tag(lane: Lane, seq: u64) -> u64 {
    match lane {
        Lane::Control => seq | CONTROL_BIT,
        Lane::Bulk => seq,
    }
}

/// The lane and sequence number of an in-flight tag.
pub fn untag(tag: u64) -> (Lane, u64) {
    if tag & CONTROL_BIT != 0 {
        (Lane::Control, tag & !CONTROL_BIT)
    } else {
        (Lane::Bulk, tag)
    }
}

/// Both lanes, and a counter per lane that every append moves (so a reader that found a lane
/// empty knows when to look again without reading it).
pub struct Lanes {
    control: Arc<Outbox>,
    bulk: Arc<Outbox>,
    appends: [AtomicU64; 2],
}

fn index(lane: Lane) -> usize {
    match lane {
        Lane::Control => 0,
        Lane::Bulk => 1,
    }
}

impl Lanes {
    /// Opens (or creates) both lanes' files in `data_dir` with the same bounds each.
    pub fn open(data_dir: &Path, limits: Limits, metrics: &BridgeMetrics) -> anyhow::Result<Lanes> {
        let open = |name: &str| -> anyhow::Result<Arc<Outbox>> {
            let path = data_dir.join(name);
            let (outbox, report) = Outbox::open(&path, limits)
                .with_context(|| format!("cannot open the outbox {}", path.display()))?;
            if let Some(q) = &report.quarantined_file {
                warn!(path = %q.renamed_to.display(), reason = %q.reason, salvaged = q.salvaged, lost_at_least = q.lost_at_least, "damaged outbox file moved aside; the records that still read were kept");
                metrics.damaged(q.lost_at_least);
            }
            if !report.quarantined_records.is_empty() {
                warn!(
                    path = %path.display(),
                    records = report.quarantined_records.len(),
                    "undecodable outbox records quarantined"
                );
            }
            info!(records = report.records, bytes = report.bytes, path = %path.display(), "outbox opened");
            Ok(Arc::new(outbox))
        };
        Ok(Lanes {
            control: open("outbox-control.redb")?,
            bulk: open("outbox.redb")?,
            appends: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// The outbox of `lane`.
    pub fn get(&self, lane: Lane) -> &Arc<Outbox> {
        match lane {
            Lane::Control => &self.control,
            Lane::Bulk => &self.bulk,
        }
    }

    /// Both lanes, control first.
    pub fn all(&self) -> [(Lane, &Arc<Outbox>); 2] {
        [(Lane::Control, &self.control), (Lane::Bulk, &self.bulk)]
    }

    /// Counts an append to `lane`.
    pub fn appended(&self, lane: Lane) {
        self.appends[index(lane)].fetch_add(1, Ordering::SeqCst);
    }

    /// How many appends `lane` has had.
    pub fn appends(&self, lane: Lane) -> u64 {
        self.appends[index(lane)].load(Ordering::SeqCst)
    }

    /// The two lanes' statistics added up (the metrics are of the whole outbox).
    pub fn stats(&self) -> Stats {
        combine(&self.control.stats(), &self.bulk.stats())
    }
}

/// Two outboxes' statistics as one.
pub fn combine(a: &Stats, b: &Stats) -> Stats {
    let mut dropped = a.dropped;
    dropped.merge(&b.dropped);
    Stats {
        records: a.records + b.records,
        bytes: a.bytes + b.bytes,
        oldest_ts_ms: match (a.oldest_ts_ms, b.oldest_ts_ms) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        },
        next_seq: a.next_seq.max(b.next_seq),
        file_bytes: a.file_bytes + b.file_bytes,
        appended_total: a.appended_total + b.appended_total,
        acked_total: a.acked_total + b.acked_total,
        dropped,
        compactions_total: a.compactions_total + b.compactions_total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpRoute;

    #[test]
    fn lanes_tags_round_trip() {
        for lane in [Lane::Control, Lane::Bulk] {
            for seq in [0, 1, 41, (1 << 62) - 1] {
                assert_eq!(untag(tag(lane, seq)), (lane, seq));
            }
        }
    }

    #[test]
    fn lanes_telemetry_routes_are_bulk_and_the_rest_control_unless_configured() {
        let route = |filter: &str, lane| UpRoute {
            filter: filter.into(),
            retain: false,
            lane,
        };
        assert_eq!(route("dt/+/telemetry", None).lane(), Lane::Bulk);
        assert_eq!(route("dt/+/twin", None).lane(), Lane::Control);
        assert_eq!(route("node/containers/result", None).lane(), Lane::Control);
        assert_eq!(route("plant/#", None).lane(), Lane::Control);
        assert_eq!(route("plant/#", Some(Lane::Bulk)).lane(), Lane::Bulk);
    }

    #[test]
    fn lanes_stats_add_up_and_the_oldest_is_the_older_lane() {
        let a = Stats {
            records: 2,
            bytes: 100,
            oldest_ts_ms: Some(50),
            ..Stats::default()
        };
        let b = Stats {
            records: 3,
            bytes: 10,
            oldest_ts_ms: Some(20),
            ..Stats::default()
        };
        let c = combine(&a, &b);
        assert_eq!((c.records, c.bytes, c.oldest_ts_ms), (5, 110, Some(20)));
        let empty = combine(&a, &Stats::default());
        assert_eq!(empty.oldest_ts_ms, Some(50));
    }
}
