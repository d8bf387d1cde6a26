//! The owner of the short local history (`edgetwin-history`): takes the numeric readings the
//! twin service accepted, keeps each series' open bucket, writes what changed at every flush in
//! one transaction, and answers history requests from MQTT (`dt/{device}/history/get`) and
//! from HTTP (`GET /api/devices/{device}/history`).
//!
//! Readings reach it on a bounded channel that the twin service never waits on: when it is full
//! a reading is dropped and counted (`edgetwin_history_readings_total{outcome="dropped"}`), so a
//! slow disk under the history cannot slow the twins down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgetwin_contract::{
    DeviceId, ErrorCode, ErrorMsg, HistoryPoint, HistoryRequest, HistoryResult, Topic,
};
use edgetwin_history::{HistoryStore, Point, Recorded, Recorder, SeriesKey, Settings};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rumqttd::protocol::PublishProperties;
use rumqttd::Forward;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::twin_service::{reply_route, Directory};
use edgetwin_broker::{LocalClient, Message};

/// `history:` in the node config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Keep a history at all. Default true.
    pub enabled: bool,
    /// Width of one point, in seconds: the readings of each bucket are kept as min, max,
    /// average, last and count. Default 60.
    pub resolution_s: u64,
    /// How long points are kept, in seconds. Default 86400 (one day: 1,440 points per series).
    pub retention_s: u64,
    /// Most series (device properties) recorded at once; readings of more are dropped and
    /// counted. Default 2000.
    pub max_series: usize,
    /// How often changed points are written to disk, in seconds: the readings a crash can cost
    /// (a clean stop writes them). Default 60.
    pub flush_interval_s: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            resolution_s: 60,
            retention_s: 86_400,
            max_series: 2000,
            flush_interval_s: 60,
        }
    }
}

impl HistoryConfig {
    /// What is wrong with the section, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.resolution_s == 0 {
            out.push("history.resolution_s: must be at least 1".to_string());
        }
        if self.retention_s < self.resolution_s {
            out.push("history.retention_s: must be at least history.resolution_s".to_string());
        }
        if self.flush_interval_s == 0 {
            out.push("history.flush_interval_s: must be at least 1".to_string());
        }
        if self.max_series == 0 {
            out.push("history.max_series: must be at least 1".to_string());
        }
        out
    }

    fn settings(&self) -> Settings {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        Settings {
            resolution_ms: ms(self.resolution_s).max(1),
            retention_ms: ms(self.retention_s),
            max_series: self.max_series,
        }
    }
}

/// One accepted numeric reading.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The device.
    pub device: DeviceId,
    /// The property.
    pub property: String,
    /// When it was read (ms): the patch's `ts`, else when the node received it.
    pub t: i64,
    /// The value.
    pub value: f64,
}

/// The twin service's end of the readings channel.
#[derive(Clone)]
pub struct HistoryFeed {
    /// Where readings go.
    pub tx: mpsc::Sender<Reading>,
    /// Counts what could not be handed over.
    pub metrics: HistoryMetrics,
}

impl HistoryFeed {
    /// Hands readings over without waiting; a full queue drops and counts them.
    pub fn offer(&self, readings: Vec<Reading>) {
        for r in readings {
            if self.tx.try_send(r).is_err() {
                self.metrics.dropped();
            }
        }
    }
}

/// The numeric values of an accepted reported patch, as readings at `t`.
pub fn readings_of<'a>(
    device: &DeviceId,
    props: impl IntoIterator<Item = (&'a str, Option<&'a serde_json::Value>)>,
    t: i64,
) -> Vec<Reading> {
    props
        .into_iter()
        .filter_map(|(name, v)| {
            Some(Reading {
                device: device.clone(),
                property: name.to_string(),
                t,
                value: v?.as_f64()?,
            })
        })
        .collect()
}

/// Most readings waiting for the history task.
pub const READING_QUEUE: usize = 8192;

/// Most points one answer carries.
pub const MAX_POINTS: usize = 10_000;

/// Why a history request is not answered with points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The device is not registered.
    UnknownDevice,
    /// The property is not one of the device's model.
    UnknownProperty,
    /// The history is switched off (`history.enabled: false`).
    Disabled,
    /// The file could not be read.
    Store(String),
}

impl QueryError {
    /// What to tell the asker.
    pub fn message(&self, device: &DeviceId, property: &str) -> String {
        match self {
            QueryError::UnknownDevice => {
                format!("device \"{device}\" is not registered on this node")
            }
            QueryError::UnknownProperty => {
                format!("device \"{device}\" has no property \"{property}\"")
            }
            QueryError::Disabled => "the history is switched off (history.enabled)".into(),
            QueryError::Store(e) => format!("cannot read the history: {e}"),
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            QueryError::UnknownDevice => ErrorCode::UnknownDevice,
            QueryError::UnknownProperty => ErrorCode::UnknownProperty,
            QueryError::Disabled | QueryError::Store(_) => ErrorCode::StoreFailed,
        }
    }
}

/// A history request from inside the node (the HTTP API).
pub struct Query {
    /// The device.
    pub device: DeviceId,
    /// What is asked.
    pub request: HistoryRequest,
    /// The answer.
    pub reply: oneshot::Sender<Result<HistoryResult, QueryError>>,
}

/// Labels of readings by what became of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `taken`, `late`, `series_limit`, `not_finite` or `dropped`.
    pub outcome: String,
}

/// The history's metrics.
#[derive(Clone, Default)]
pub struct HistoryMetrics {
    /// Readings by outcome.
    pub readings: Family<OutcomeLabels, Counter>,
    /// Points written to disk.
    pub points_written: Counter,
    /// Flushes (transactions) and failed ones.
    pub flushes: Counter,
    /// Flushes that failed (their points are tried again at the next one).
    pub flush_failures: Counter,
    /// Series open now.
    pub series: Gauge,
}

impl HistoryMetrics {
    /// Registers every history metric, each outcome's series at 0 so that it is exported (and
    /// charted) before its first reading.
    pub fn register(&self, r: &mut Registry) {
        for o in ["taken", "late", "series_limit", "not_finite", "dropped"] {
            self.outcome(o);
        }
        r.register(
            "history_readings",
            "Numeric readings offered to the local history, by outcome",
            self.readings.clone(),
        );
        r.register(
            "history_points_written",
            "History points written to disk",
            self.points_written.clone(),
        );
        r.register(
            "history_flushes",
            "History flushes (one transaction each)",
            self.flushes.clone(),
        );
        r.register(
            "history_flush_failures",
            "History flushes that failed (retried at the next one)",
            self.flush_failures.clone(),
        );
        r.register(
            "history_series",
            "History series open now",
            self.series.clone(),
        );
    }

    /// Counts a reading the twin service could not hand over (the queue was full).
    pub fn dropped(&self) {
        self.outcome("dropped").inc();
    }

    fn outcome(&self, o: &str) -> Counter {
        self.readings
            .get_or_create(&OutcomeLabels {
                outcome: o.to_string(),
            })
            .clone()
    }
}

/// The history task's parts.
pub struct HistoryTask {
    /// The config section.
    pub cfg: HistoryConfig,
    /// Where the file is.
    pub path: PathBuf,
    /// The open file (`None` when disabled, or after an I/O error until it reopens).
    pub store: Option<HistoryStore>,
    /// Readings from the twin service.
    pub readings: mpsc::Receiver<Reading>,
    /// Requests from the HTTP API.
    pub queries: mpsc::Receiver<Query>,
    /// Requests over MQTT (`dt/+/history/get`), and the link that answers them.
    pub link: LocalClient,
    /// What the link delivers.
    pub requests: mpsc::Receiver<Forward>,
    /// Registered devices and their models.
    pub directory: Arc<Directory>,
    /// Metrics.
    pub metrics: HistoryMetrics,
}

impl HistoryTask {
    /// Runs until `shutdown`, then writes what is pending.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let settings = self.cfg.settings();
        let mut recorder = Recorder::new(settings);
        let mut flush = tokio::time::interval(Duration::from_secs(self.cfg.flush_interval_s));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        let mut since_prune = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(r) = self.readings.recv() => self.record(&mut recorder, r),
                Some(q) = self.queries.recv() => {
                    let answer = self.answer(&recorder, &q.device, q.request);
                    let _ = q.reply.send(answer);
                }
                Some(f) = self.requests.recv() => self.handle_request(&recorder, f).await,
                _ = flush.tick() => {
                    self.flush(&mut recorder).await;
                    since_prune += Duration::from_secs(self.cfg.flush_interval_s);
                    // Series no longer written are pruned here, once an hour.
                    if since_prune >= Duration::from_secs(3600) {
                        since_prune = Duration::ZERO;
                        self.prune(&recorder).await;
                    }
                }
            }
        }
        // What already arrived is recorded, then everything pending is written.
        while let Ok(r) = self.readings.try_recv() {
            self.record(&mut recorder, r);
        }
        self.flush(&mut recorder).await;
        info!("history stopped; pending points written");
    }

    fn record(&mut self, recorder: &mut Recorder, r: Reading) {
        let key = SeriesKey {
            device: r.device.to_string(),
            property: r.property,
        };
        let store = self.store.as_ref();
        let outcome = recorder.record(&key.device, &key.property, r.t, r.value, |bucket| {
            // The point a reopened series continues (a restart, or an idle series forgotten).
            store.and_then(|s| s.get(&key, bucket).ok().flatten())
        });
        let label = match outcome {
            Recorded::Taken => "taken",
            Recorded::Late => "late",
            Recorded::SeriesLimit => "series_limit",
            Recorded::NotFinite => "not_finite",
        };
        self.metrics.outcome(label).inc();
        self.metrics.series.set(recorder.open_series() as i64);
    }

    async fn flush(&mut self, recorder: &mut Recorder) {
        let points = recorder.take_dirty(edgetwin_contract::now_ms());
        self.metrics.series.set(recorder.open_series() as i64);
        if points.is_empty() {
            return;
        }
        let store = match self.store.take() {
            Some(s) => s,
            None => match HistoryStore::open(&self.path) {
                Ok((s, _)) => {
                    info!(path = %self.path.display(), "history store reopened");
                    s
                }
                Err(e) => {
                    warn!(error = %e, "history store still cannot be opened; points kept for the next flush");
                    self.metrics.flush_failures.inc();
                    recorder.unflushed(points);
                    return;
                }
            },
        };
        let retention = recorder.settings().retention_ms;
        let n = points.len();
        let joined = tokio::task::spawn_blocking(move || {
            let mut store = store;
            let result = store.write(&points, retention);
            (store, points, result)
        })
        .await;
        match joined {
            Ok((store, _, Ok(()))) => {
                self.store = Some(store);
                self.metrics.flushes.inc();
                self.metrics.points_written.inc_by(n as u64);
                debug!(points = n, "history flushed");
            }
            Ok((store, points, Err(e))) => {
                error!(error = %e, points = n, "history flush failed; the points are tried again at the next flush");
                self.metrics.flush_failures.inc();
                recorder.unflushed(points);
                // redb refuses everything after an I/O error until the file is opened again.
                drop(store);
            }
            Err(e) => {
                error!(error = %e, "history flush panicked");
                self.metrics.flush_failures.inc();
            }
        }
    }

    async fn prune(&mut self, recorder: &Recorder) {
        let Some(store) = self.store.take() else {
            return;
        };
        let cutoff = edgetwin_contract::now_ms() - recorder.settings().retention_ms;
        let joined = tokio::task::spawn_blocking(move || {
            let mut store = store;
            let r = store.prune_before(cutoff);
            (store, r)
        })
        .await;
        match joined {
            Ok((store, Ok(n))) => {
                self.store = Some(store);
                debug!(removed = n, "history pruned");
            }
            Ok((_, Err(e))) => {
                warn!(error = %e, "history prune failed; the file is reopened at the next flush")
            }
            Err(e) => error!(error = %e, "history prune panicked"),
        }
    }

    fn answer(
        &self,
        recorder: &Recorder,
        device: &DeviceId,
        req: HistoryRequest,
    ) -> Result<HistoryResult, QueryError> {
        let devices = self.directory.devices();
        let reg = devices.get(device).ok_or(QueryError::UnknownDevice)?;
        if !reg.spec.properties.contains_key(&req.property) {
            return Err(QueryError::UnknownProperty);
        }
        if !self.cfg.enabled {
            return Err(QueryError::Disabled);
        }
        let settings = recorder.settings();
        let limit = req.limit.unwrap_or(MAX_POINTS).clamp(1, MAX_POINTS);
        let since = req.since.unwrap_or(i64::MIN + settings.resolution_ms);
        let key = SeriesKey {
            device: device.to_string(),
            property: req.property.clone(),
        };
        // Read from the file: a query between flushes reads what is on disk and lays the
        // pending points over it, so it never forces a write.
        let stored = match &self.store {
            Some(s) => s
                .range(&key, since, settings.resolution_ms, limit)
                .map_err(|e| QueryError::Store(e.to_string()))?,
            None => Vec::new(),
        };
        let mut points = recorder.overlay(&key, stored, since);
        if points.len() > limit {
            points.drain(..points.len() - limit);
        }
        Ok(HistoryResult {
            id: req.id,
            device: device.clone(),
            property: req.property,
            resolution_ms: settings.resolution_ms,
            points: points.iter().map(point_out).collect(),
        })
    }

    async fn handle_request(&mut self, recorder: &Recorder, f: Forward) {
        let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
        let Some(Topic::HistoryGet(device)) = Topic::parse(&topic) else {
            return;
        };
        let props: Option<PublishProperties> = f.properties;
        let out = match serde_json::from_slice::<HistoryRequest>(&f.publish.payload) {
            Err(e) => Err((
                ErrorCode::MalformedJson,
                format!("history request is not {{\"property\": string, \"since\"?: ms, \"limit\"?: n, \"id\"?: string}}: {e}"),
                None,
            )),
            Ok(req) => {
                let property = req.property.clone();
                let id = req.id.clone();
                self.answer(recorder, &device, req)
                    .map_err(|e| (e.code(), e.message(&device, &property), id))
            }
        };
        let (reply_topic, reply_props) = reply_route(props, Topic::HistoryResult(device.clone()));
        let payload = match out {
            Ok(result) => serde_json::to_vec(&result),
            Err((code, message, id)) => {
                debug!(device = %device, topic, %message, "history request refused");
                serde_json::to_vec(&ErrorMsg {
                    code,
                    message,
                    topic: topic.clone(),
                    id,
                })
            }
        };
        let Ok(payload) = payload else { return };
        self.link
            .publish(Message {
                topic: reply_topic,
                payload: Bytes::from(payload),
                retain: false,
                props: reply_props,
            })
            .await;
    }
}

fn point_out(p: &Point) -> HistoryPoint {
    HistoryPoint {
        t: p.t,
        min: p.min,
        max: p.max,
        avg: p.avg(),
        last: p.last,
        count: p.count,
    }
}
