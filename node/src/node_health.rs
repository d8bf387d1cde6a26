//! The node's health document, `node/health` (retained; the bridge carries it to the cloud as
//! `{prefix}node/health`). It is read from the very registry `/metrics` serves, by encoding it
//! and reading the samples back, so the document and a Prometheus scrape can never disagree and
//! every part that registers metrics is seen the same way.
//!
//! It is sampled every [`SAMPLE_EVERY`] and published only when something an operator acts on
//! changed (readiness, a mapper, device or container counts, dropped outbox records) or a
//! measured value moved past its band (see [`worth_publishing`]), and at least every
//! [`HEARTBEAT`]: a node that sits still sends one small message a minute, not one per sample.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edgetwin_contract::{
    now_ms, DiskHealth, MapperState, NodeHealthMsg, OutboxHealth, TimestampMs, Topic,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::health::Health;
use crate::metrics::Metrics;
use edgetwin_broker::{LocalClient, Message};

/// How often the health is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Published at least this often, changed or not.
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// One sample of the OpenMetrics text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name with its suffix (`_total`, `_bucket`, ...).
    pub name: String,
    /// Label pairs in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// The samples of one scrape.
#[derive(Debug, Default)]
pub struct Samples(Vec<Sample>);

impl Samples {
    /// Reads OpenMetrics text; lines it cannot read are skipped (the text is our own encoder's).
    pub fn parse(text: &str) -> Samples {
        Samples(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(parse_line)
                .collect(),
        )
    }

    /// The first sample named `name`.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|s| s.name == name).map(|s| s.value)
    }

    /// The sum over every sample named `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The samples named `name` by the value of their label `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| {
                let (_, v) = s.labels.iter().find(|(k, _)| k == label)?;
                Some((v.clone(), s.value))
            })
            .collect()
    }
}

/// `name{a="x",b="y"} value [timestamp]`.
fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, rest) = if let Some(body) = rest.strip_prefix('{') {
        parse_labels(body)?
    } else {
        (Vec::new(), rest)
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Labels up to the closing `}`, and what follows it.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].to_string();
        let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[eq + 2 + end + 1..];
    }
}

/// What is known besides the registry.
#[derive(Debug, Clone)]
pub struct Context {
    /// Readiness as `/readyz` says it.
    pub ready: bool,
    /// Failing checks, or the phase.
    pub failing: Vec<String>,
    /// Whether the node has a bridge (else no `outbox`).
    pub bridge: bool,
    /// Whether the node has a container agent (else no `containers`).
    pub containers: bool,
    /// CPU percent of one core since the previous sample.
    pub cpu_percent: f64,
    /// Now, ms.
    pub now_ms: TimestampMs,
}

fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// The health document of one scrape.
pub fn document(s: &Samples, cx: &Context) -> NodeHealthMsg {
    let started = s
        .value("edgetwin_process_start_time_seconds")
        .unwrap_or(0.0);
    let uptime = (cx.now_ms as f64 / 1000.0 - started).max(0.0);
    let mappers = s
        .by_label("edgetwin_mapper_up", "protocol")
        .into_iter()
        .map(|(p, up)| {
            let state = if up > 0.0 {
                MapperState::Online
            } else {
                MapperState::Offline
            };
            (p, state)
        })
        .collect();
    let counts = |name: &str, label: &str| -> BTreeMap<String, u64> {
        s.by_label(name, label)
            .into_iter()
            .map(|(k, v)| (k, count(v)))
            .collect()
    };
    NodeHealthMsg {
        ts: cx.now_ms,
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: uptime as u64,
        ready: cx.ready,
        failing: cx.failing.clone(),
        cpu_percent: (cx.cpu_percent * 10.0).round() / 10.0,
        memory_rss_bytes: count(
            s.value("edgetwin_process_resident_memory_bytes")
                .unwrap_or(0.0),
        ),
        disk: DiskHealth {
            free_bytes: count(s.value("edgetwin_data_dir_free_bytes").unwrap_or(0.0)),
            total_bytes: count(s.value("edgetwin_data_dir_size_bytes").unwrap_or(0.0)),
        },
        outbox: cx.bridge.then(|| OutboxHealth {
            records: count(s.value("edgetwin_outbox_records").unwrap_or(0.0)),
            bytes: count(s.value("edgetwin_outbox_bytes").unwrap_or(0.0)),
            oldest_age_s: count(s.value("edgetwin_outbox_oldest_age_seconds").unwrap_or(0.0)),
            dropped: count(s.sum("edgetwin_outbox_dropped_records_total")),
        }),
        mappers,
        devices: counts("edgetwin_devices", "status"),
        containers: cx
            .containers
            .then(|| counts("edgetwin_containers", "state")),
    }
}

/// Whether `next` says something `prev` (published `since` ago) did not.
pub fn worth_publishing(prev: &NodeHealthMsg, next: &NodeHealthMsg, since: Duration) -> bool {
    let moved = |a: u64, b: u64, band: u64| a.abs_diff(b) >= band.max(1);
    let discrete = prev.ready != next.ready
        || prev.failing != next.failing
        || prev.version != next.version
        || prev.mappers != next.mappers
        || prev.devices != next.devices
        || prev.containers != next.containers;
    let outbox = match (&prev.outbox, &next.outbox) {
        (Some(a), Some(b)) => {
            a.dropped != b.dropped
                || (a.records == 0) != (b.records == 0)
                || moved(a.records, b.records, (a.records / 10).max(1000))
        }
        (a, b) => a.is_some() != b.is_some(),
    };
    let total = next.disk.total_bytes;
    let low = |free: u64| total > 0 && free < total / 10;
    let disk = moved(prev.disk.free_bytes, next.disk.free_bytes, total / 50)
        || low(prev.disk.free_bytes) != low(next.disk.free_bytes);
    let memory = moved(
        prev.memory_rss_bytes,
        next.memory_rss_bytes,
        prev.memory_rss_bytes / 10,
    );
    let cpu = (prev.cpu_percent - next.cpu_percent).abs() >= 25.0;
    since >= HEARTBEAT || discrete || outbox || disk || memory || cpu
}

/// The node process and its data dir's filesystem, read at every scrape (Linux `/proc`).
#[derive(Debug)]
pub struct ProcessCollector {
    data_dir: PathBuf,
    started: f64,
}

impl ProcessCollector {
    /// Starts counting uptime now.
    pub fn new(data_dir: PathBuf) -> ProcessCollector {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        ProcessCollector { data_dir, started }
    }
}

/// CPU seconds (user + system) of this process, from `/proc/self/stat`.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib * 1024)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            let e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(e)
        };
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "When the node process started, unix seconds",
            self.started,
        )?;
        if let Some(rss) = rss_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory of the node process",
                rss as f64,
            )?;
        }
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            let e = encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time (user and system) of the node process",
                None,
                c.metric_type(),
            )?;
            c.encode(e)?;
        }
        if let Ok(fs) = rustix::fs::statvfs(&self.data_dir) {
            let frsize = fs.f_frsize;
            gauge(
                &mut encoder,
                "data_dir_free_bytes",
                "Bytes the node can still write on the data dir's filesystem",
                fs.f_bavail.saturating_mul(frsize) as f64,
            )?;
            gauge(
                &mut encoder,
                "data_dir_size_bytes",
                "Size of the data dir's filesystem",
                fs.f_blocks.saturating_mul(frsize) as f64,
            )?;
        }
        Ok(())
    }
}

/// Samples the health and publishes it when worth it.
pub struct HealthTask {
    /// The registry `/metrics` serves.
    pub metrics: Arc<Metrics>,
    /// What `/readyz` answers.
    pub readiness: Arc<Health>,
    /// Publishes the retained `node/health` locally.
    pub link: LocalClient,
    /// The bridge's feed, when there is a bridge.
    pub cloud: Option<edgetwin_bridge::HealthFeed>,
    /// Whether a container agent runs.
    pub containers: bool,
}

impl HealthTask {
    /// Runs until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let topic = Topic::NodeHealth.to_topic_string();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(NodeHealthMsg, tokio::time::Instant)> = None;
        let mut cpu_then = (tokio::time::Instant::now(), cpu_seconds().unwrap_or(0.0));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let text = match self.metrics.encode() {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %e, "cannot encode the metrics for the health document");
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            let cpu_now = cpu_seconds().unwrap_or(cpu_then.1);
            let wall = now.duration_since(cpu_then.0).as_secs_f64();
            let cpu_percent = if wall > 0.0 {
                ((cpu_now - cpu_then.1) / wall * 100.0).max(0.0)
            } else {
                0.0
            };
            cpu_then = (now, cpu_now);
            let report = self.readiness.report();
            let cx = Context {
                ready: report.ready,
                failing: self.readiness.failing(),
                bridge: self.cloud.is_some(),
                containers: self.containers,
                cpu_percent,
                now_ms: now_ms(),
            };
            let doc = document(&Samples::parse(&text), &cx);
            let due = last
                .as_ref()
                .is_none_or(|(prev, at)| worth_publishing(prev, &doc, now.duration_since(*at)));
            if !due {
                continue;
            }
            let payload = Bytes::from(doc.to_json_bytes());
            self.link
                .publish(Message::retained(topic.clone(), payload.clone()))
                .await;
            if let Some(cloud) = &self.cloud {
                cloud.set(payload);
            }
            last = Some((doc, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP edgetwin_devices Registered devices by status.
# TYPE edgetwin_devices gauge
edgetwin_devices{status="online"} 3
edgetwin_devices{status="stale"} 1
edgetwin_devices{status="offline"} 0
edgetwin_mapper_up{protocol="modbus"} 1
edgetwin_mapper_up{protocol="opcua"} 0
edgetwin_containers{state="running"} 2
edgetwin_outbox_records 1500
edgetwin_outbox_bytes 90000
edgetwin_outbox_oldest_age_seconds 12.7
edgetwin_outbox_dropped_records_total{reason="bytes_limit"} 4
edgetwin_outbox_dropped_records_total{reason="age_limit"} 1
edgetwin_process_start_time_seconds 1000.5
edgetwin_process_resident_memory_bytes 2.5e7
edgetwin_data_dir_free_bytes 5000000000
edgetwin_data_dir_size_bytes 10000000000
edgetwin_odd{path="a \"quoted\", b\\c",x="}"} 7
# EOF
"#;

    fn cx() -> Context {
        Context {
            ready: true,
            failing: vec![],
            bridge: true,
            containers: true,
            cpu_percent: 3.12,
            now_ms: 1_060_500,
        }
    }

    #[test]
    fn node_health_samples_read_labels_with_escapes_and_exponents() {
        let s = Samples::parse(TEXT);
        assert_eq!(
            s.value("edgetwin_process_resident_memory_bytes"),
            Some(2.5e7)
        );
        let odd = s.by_label("edgetwin_odd", "path");
        assert_eq!(odd.get("a \"quoted\", b\\c"), Some(&7.0));
        assert_eq!(s.by_label("edgetwin_odd", "x").get("}"), Some(&7.0));
        assert_eq!(s.sum("edgetwin_outbox_dropped_records_total"), 5.0);
    }

    #[test]
    fn node_health_document_is_read_from_the_samples() {
        let d = document(&Samples::parse(TEXT), &cx());
        assert_eq!(d.uptime_s, 60);
        assert_eq!(d.cpu_percent, 3.1);
        assert_eq!(d.memory_rss_bytes, 25_000_000);
        assert_eq!(d.devices["online"], 3);
        assert_eq!(d.devices["stale"], 1);
        assert_eq!(d.mappers["modbus"], MapperState::Online);
        assert_eq!(d.mappers["opcua"], MapperState::Offline);
        assert_eq!(d.containers.as_ref().map(|c| c["running"]), Some(2));
        let o = d.outbox.expect("bridge");
        assert_eq!((o.records, o.oldest_age_s, o.dropped), (1500, 13, 5));
        assert_eq!(d.disk.free_bytes, 5_000_000_000);
        let bare = document(
            &Samples::parse(TEXT),
            &Context {
                bridge: false,
                containers: false,
                ..cx()
            },
        );
        assert!(bare.outbox.is_none() && bare.containers.is_none());
    }

    #[test]
    fn node_health_is_published_on_what_an_operator_acts_on_not_on_noise() {
        let base = document(&Samples::parse(TEXT), &cx());
        let soon = Duration::from_secs(2);
        let with = |f: &dyn Fn(&mut NodeHealthMsg)| {
            let mut d = base.clone();
            f(&mut d);
            d
        };
        // Noise: a little CPU, memory, disk, backlog, age and uptime.
        let noise = with(&|d| {
            d.cpu_percent += 10.0;
            d.memory_rss_bytes += 1_000_000;
            d.disk.free_bytes -= 10_000_000;
            d.uptime_s += 2;
            if let Some(o) = d.outbox.as_mut() {
                o.records += 200;
                o.oldest_age_s += 2;
            }
        });
        assert!(!worth_publishing(&base, &noise, soon));
        assert!(worth_publishing(&base, &noise, HEARTBEAT), "heartbeat");
        for (what, changed) in [
            ("readiness", with(&|d| d.ready = false)),
            (
                "a device",
                with(&|d| *d.devices.entry("online".into()).or_default() -= 1),
            ),
            (
                "a mapper",
                with(&|d| {
                    d.mappers.insert("modbus".into(), MapperState::Offline);
                }),
            ),
            (
                "a container",
                with(&|d| d.containers = Some(BTreeMap::new())),
            ),
            (
                "a drop",
                with(&|d| d.outbox.as_mut().map_or((), |o| o.dropped += 1)),
            ),
            (
                "backlog gone",
                with(&|d| d.outbox.as_mut().map_or((), |o| o.records = 0)),
            ),
            (
                "backlog grew",
                with(&|d| d.outbox.as_mut().map_or((), |o| o.records += 1000)),
            ),
            ("memory +10%", with(&|d| d.memory_rss_bytes += 2_500_000)),
            ("disk low", with(&|d| d.disk.free_bytes = 900_000_000)),
            ("cpu busy", with(&|d| d.cpu_percent = 80.0)),
        ] {
            assert!(worth_publishing(&base, &changed, soon), "{what}");
        }
    }

    #[test]
    fn node_health_process_collector_reads_this_process() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("edgetwin");
        registry.register_collector(Box::new(ProcessCollector::new(std::env::temp_dir())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let s = Samples::parse(&text);
        assert!(
            s.value("edgetwin_process_resident_memory_bytes")
                .unwrap_or(0.0)
                > 1e6,
            "{text}"
        );
        assert!(
            s.value("edgetwin_process_cpu_seconds_total").is_some(),
            "{text}"
        );
        let free = s.value("edgetwin_data_dir_free_bytes").unwrap_or(0.0);
        let size = s.value("edgetwin_data_dir_size_bytes").unwrap_or(0.0);
        assert!(free > 0.0 && size >= free, "{text}");
    }
}
