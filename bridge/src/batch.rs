//! Telemetry batching (pure, no I/O): bulk-lane records of a batched topic are held per topic
//! and sent as one upstream message, an *envelope*, per topic per interval (docs/contract.md
//! §5.4).
//!
//! Batching happens when records leave the outbox, not when they enter it: the outbox keeps one
//! record per message, a batch's PUBACK acks every record in it at once, and a batch that was
//! not acknowledged before a crash or a lost connection is rebuilt from the same records on the
//! next connection. So batching changes what goes over the link, never what is durable.
//!
//! Envelope (version 1): `{"v":1,"topic":"<local topic>","messages":[<payload>,...]}`, the
//! payloads in outbox order, each the JSON value its message carried; compressed as one zstd
//! frame unless compression is off. It is published at `{prefix}{local topic}/batch`, so a
//! consumer of single messages never mistakes one for a message, and with MQTT 5 carries the
//! content type [`CONTENT_TYPE`] and the user property `content-encoding`. A payload that is not
//! JSON is never batched (it is sent on its own, as is).
//!
//! When a batch goes: when it holds `max_messages` or `max_bytes`, when `interval_ms` passed
//! since its first record was taken, when everything held is over the held bound (the oldest
//! batch goes first), or when the bridge is flushing at shutdown. While a backlog drains,
//! records keep arriving faster than the interval, so batches fill and go full.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The envelope's MQTT 5 content type.
pub const CONTENT_TYPE: &str = "application/vnd.edgetwin.batch.v1+json";
/// The envelope's version field.
pub const VERSION: u32 = 1;
/// Appended to the local topic for the upstream topic of a batch.
pub const TOPIC_SUFFIX: &str = "/batch";

/// `bridge.batch`: off when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Local topic filters whose messages are batched (they must be on bulk-lane routes).
    /// Default `["dt/+/telemetry"]`.
    pub topics: Vec<String>,
    /// Longest a message waits for others of its topic, in milliseconds. Default 10000.
    pub interval_ms: u64,
    /// Most messages per batch. Default 1000.
    pub max_messages: usize,
    /// Most bytes of payload per batch, before compression. Default 262144 (256 KiB).
    pub max_bytes: usize,
    /// Most bytes of payload held in open batches, all topics together; over it the oldest
    /// batch goes at once. Default 8388608 (8 MiB).
    pub max_held_bytes: usize,
    /// `zstd` (default) or `none`.
    pub compression: Compression,
    /// zstd level, 1-19. Default 3.
    pub level: i32,
}

/// How an envelope is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain JSON.
    None,
    /// One zstd frame.
    Zstd,
}

impl Compression {
    /// The MQTT 5 `content-encoding` user property's value (`None` for plain JSON).
    pub fn encoding(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Zstd => Some("zstd"),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            topics: vec!["dt/+/telemetry".to_string()],
            interval_ms: 10_000,
            max_messages: 1000,
            max_bytes: 256 * 1024,
            max_held_bytes: 8 * 1024 * 1024,
            compression: Compression::Zstd,
            level: 3,
        }
    }
}

impl BatchConfig {
    /// Every problem with this section, each prefixed with its field path.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.topics.is_empty() {
            errors.push("bridge.batch.topics: name at least one topic filter".to_string());
        }
        for (i, t) in self.topics.iter().enumerate() {
            if !crate::config::valid_filter(t) {
                errors.push(format!(
                    "bridge.batch.topics[{i}]: {t:?} is not a valid MQTT filter"
                ));
            }
        }
        if self.interval_ms == 0 || self.interval_ms > 3_600_000 {
            errors.push("bridge.batch.interval_ms: must be 1-3600000".to_string());
        }
        if self.max_messages < 2 {
            errors.push("bridge.batch.max_messages: must be at least 2".to_string());
        }
        if self.max_bytes < 1024 || self.max_bytes > 3 * 1024 * 1024 {
            errors.push("bridge.batch.max_bytes: must be 1024-3145728".to_string());
        }
        if self.max_held_bytes < self.max_bytes {
            errors.push("bridge.batch.max_held_bytes: must be at least max_bytes".to_string());
        }
        if !(1..=19).contains(&self.level) {
            errors.push("bridge.batch.level: must be 1-19".to_string());
        }
        errors
    }

    /// Whether messages on `topic` are batched.
    pub fn batches(&self, topic: &str) -> bool {
        self.topics
            .iter()
            .any(|f| edgetwin_contract::topic::filter::matches(f, topic))
    }
}

/// A batch ready to publish: its upstream topic, its envelope, and the in-flight tags of the
/// records it carries (a PUBACK for it acks them all).
#[derive(Debug)]
pub struct Ready {
    /// `{prefix}{local topic}/batch`.
    pub topic: String,
    /// The envelope, compressed as configured.
    pub payload: Vec<u8>,
    /// How `payload` is compressed.
    pub compression: Compression,
    /// The records' in-flight tags, in outbox order.
    pub tags: Vec<u64>,
    /// Payload bytes before the envelope and compression.
    pub raw_bytes: usize,
}

/// Messages of one topic waiting to go as one envelope.
#[derive(Debug)]
struct Open {
    /// The upstream topic of the messages (`{prefix}{local topic}`).
    topic: String,
    /// The envelope's JSON so far: `{"v":1,"topic":...,"messages":[a,b` (closed at seal).
    json: Vec<u8>,
    tags: Vec<u64>,
    raw_bytes: usize,
    opened: Instant,
}

/// Open batches, one per topic, and which opened first.
#[derive(Debug)]
pub struct Batcher {
    cfg: BatchConfig,
    prefix: String,
    open: HashMap<String, Open>,
    /// Topics by when their batch opened (a topic's batch is in here once).
    order: VecDeque<String>,
    held_bytes: usize,
}

/// Why a record could not join a batch (then it is sent on its own).
#[derive(Debug, PartialEq, Eq)]
pub enum NotBatched {
    /// Not on a batched topic, or not under the prefix.
    Topic,
    /// The payload is not JSON.
    NotJson,
}

impl Batcher {
    /// Batches for upstream topics under `prefix`.
    pub fn new(cfg: BatchConfig, prefix: &str) -> Batcher {
        Batcher {
            cfg,
            prefix: prefix.to_string(),
            open: HashMap::new(),
            order: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// Whether any record is held.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Records held in open batches.
    pub fn held_records(&self) -> usize {
        self.open.values().map(|o| o.tags.len()).sum()
    }

    /// Takes the record with upstream topic `topic`. A batch that this record fills, or that
    /// the held bound pushes out, comes back ready (at most two: the record's own, and the
    /// oldest).
    pub fn push(
        &mut self,
        topic: &str,
        payload: &[u8],
        tag: u64,
        now: Instant,
    ) -> Result<Vec<Ready>, NotBatched> {
        let local = topic.strip_prefix(self.prefix.as_str()).unwrap_or("");
        if local.is_empty() || !self.cfg.batches(local) {
            return Err(NotBatched::Topic);
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_err() {
            return Err(NotBatched::NotJson);
        }
        let mut out = Vec::new();
        // A message that would push its batch over max_bytes goes into the next batch.
        if self
            .open
            .get(topic)
            .is_some_and(|o| o.raw_bytes + payload.len() > self.cfg.max_bytes)
        {
            out.extend(self.take(topic));
        }
        let open = match self.open.get_mut(topic) {
            Some(o) => o,
            None => {
                self.order.push_back(topic.to_string());
                let mut json = Vec::with_capacity(payload.len() * 8 + 64);
                json.extend_from_slice(format!("{{\"v\":{VERSION},\"topic\":").as_bytes());
                // A topic is UTF-8 text: its JSON string form cannot fail.
                json.extend_from_slice(
                    serde_json::to_string(local)
                        .unwrap_or_else(|_| "\"\"".to_string())
                        .as_bytes(),
                );
                json.extend_from_slice(b",\"messages\":[");
                self.open.entry(topic.to_string()).or_insert(Open {
                    topic: topic.to_string(),
                    json,
                    tags: Vec::new(),
                    raw_bytes: 0,
                    opened: now,
                })
            }
        };
        if !open.tags.is_empty() {
            open.json.push(b',');
        }
        // Checked as JSON above; trimmed of the whitespace around it.
        open.json.extend_from_slice(payload.trim_ascii());
        open.tags.push(tag);
        open.raw_bytes += payload.len();
        self.held_bytes += payload.len();
        let full = open.tags.len() >= self.cfg.max_messages || open.raw_bytes >= self.cfg.max_bytes;
        if full {
            out.extend(self.take(topic));
        }
        while self.held_bytes > self.cfg.max_held_bytes {
            let Some(oldest) = self.order.front().cloned() else {
                break;
            };
            out.extend(self.take(&oldest));
        }
        Ok(out)
    }

    /// The batches whose interval has passed at `now` (all of them when `flush`).
    pub fn due(&mut self, now: Instant, flush: bool) -> Vec<Ready> {
        let interval = Duration::from_millis(self.cfg.interval_ms);
        let mut out = Vec::new();
        while let Some(t) = self.order.front() {
            let Some(o) = self.open.get(t) else {
                self.order.pop_front();
                continue;
            };
            if !flush && now.duration_since(o.opened) < interval {
                break;
            }
            let t = t.clone();
            out.extend(self.take(&t));
        }
        out
    }

    /// When the oldest open batch falls due.
    pub fn next_due(&self) -> Option<Instant> {
        let t = self.order.front()?;
        let o = self.open.get(t)?;
        Some(o.opened + Duration::from_millis(self.cfg.interval_ms))
    }

    /// Forgets everything held (a lost connection: the records are read again from the outbox).
    pub fn clear(&mut self) {
        self.open.clear();
        self.order.clear();
        self.held_bytes = 0;
    }

    /// Seals the open batch of upstream topic `topic`, if any (a record of that topic that
    /// cannot join it must go after it).
    pub fn take_topic(&mut self, topic: &str) -> Option<Ready> {
        self.take(topic)
    }

    fn take(&mut self, topic: &str) -> Option<Ready> {
        let mut o = self.open.remove(topic)?;
        self.order.retain(|t| t != topic);
        self.held_bytes = self.held_bytes.saturating_sub(o.raw_bytes);
        o.json.extend_from_slice(b"]}");
        let (payload, compression) = match self.cfg.compression {
            Compression::None => (o.json, Compression::None),
            // Compressing a buffer in memory fails only when allocation does; the plain JSON is
            // still a valid envelope (a decoder tells the two apart by zstd's magic number).
            Compression::Zstd => match zstd::bulk::compress(&o.json, self.cfg.level) {
                Ok(z) => (z, Compression::Zstd),
                Err(_) => (o.json, Compression::None),
            },
        };
        Some(Ready {
            topic: format!("{}{TOPIC_SUFFIX}", o.topic),
            payload,
            compression,
            tags: o.tags,
            raw_bytes: o.raw_bytes,
        })
    }
}

/// Decodes an envelope (the reference for consumers; the tests and `edgetwin fleet` use it):
/// the local topic and the messages, each as the JSON it was.
pub fn decode(payload: &[u8]) -> Result<(String, Vec<serde_json::Value>), String> {
    let json = if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(payload).map_err(|e| format!("not a zstd frame: {e}"))?
    } else {
        payload.to_vec()
    };
    #[derive(Deserialize)]
    struct Envelope {
        v: u32,
        topic: String,
        messages: Vec<serde_json::Value>,
    }
    let e: Envelope =
        serde_json::from_slice(&json).map_err(|e| format!("not a batch envelope: {e}"))?;
    if e.v != VERSION {
        return Err(format!(
            "envelope version {} (this decoder reads {VERSION})",
            e.v
        ));
    }
    Ok((e.topic, e.messages))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> BatchConfig {
        BatchConfig {
            max_messages: 3,
            max_bytes: 1024,
            max_held_bytes: 2048,
            ..BatchConfig::default()
        }
    }

    fn msg(i: u64) -> Vec<u8> {
        format!(r#"{{"ts":{i},"values":{{"v":{i}}}}}"#).into_bytes()
    }

    #[test]
    fn batch_a_full_batch_goes_at_once_with_every_tag_in_order() {
        let mut b = Batcher::new(cfg(), "p/");
        let t0 = Instant::now();
        assert!(b
            .push("p/dt/a/telemetry", &msg(1), 10, t0)
            .unwrap()
            .is_empty());
        assert!(b
            .push("p/dt/a/telemetry", &msg(2), 11, t0)
            .unwrap()
            .is_empty());
        let ready = b.push("p/dt/a/telemetry", &msg(3), 12, t0).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].topic, "p/dt/a/telemetry/batch");
        assert_eq!(ready[0].tags, vec![10, 11, 12]);
        let (topic, messages) = decode(&ready[0].payload).unwrap();
        assert_eq!(topic, "dt/a/telemetry");
        let ts: Vec<u64> = messages.iter().map(|m| m["ts"].as_u64().unwrap()).collect();
        assert_eq!(ts, vec![1, 2, 3]);
        assert!(b.is_empty());
    }

    #[test]
    fn batch_topics_are_batched_apart_and_fall_due_oldest_first() {
        let mut b = Batcher::new(cfg(), "p/");
        let t0 = Instant::now();
        b.push("p/dt/a/telemetry", &msg(1), 1, t0).unwrap();
        b.push("p/dt/b/telemetry", &msg(2), 2, t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(10)));
        assert!(b.due(t0 + Duration::from_millis(9999), false).is_empty());
        let due = b.due(t0 + Duration::from_secs(10), false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tags, vec![1]);
        assert_eq!(b.held_records(), 1);
        let flushed = b.due(t0, true);
        assert_eq!(
            flushed[0].tags,
            vec![2],
            "a flush takes what is not due yet"
        );
        assert!(b.is_empty() && b.next_due().is_none());
    }

    #[test]
    fn batch_never_exceeds_its_byte_bounds() {
        let mut b = Batcher::new(cfg(), "p/");
        let t0 = Instant::now();
        let big = format!(r#"{{"ts":1,"blob":"{}"}}"#, "x".repeat(600)).into_bytes();
        assert!(b.push("p/dt/a/telemetry", &big, 1, t0).unwrap().is_empty());
        // The second would make 1200 B > 1024: the first goes alone.
        let out = b.push("p/dt/a/telemetry", &big, 2, t0).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tags, vec![1]);
        // Over the held bound (2048 B): the oldest batch goes.
        b.push("p/dt/b/telemetry", &big, 3, t0).unwrap();
        b.push("p/dt/c/telemetry", &big, 4, t0).unwrap();
        let out = b.push("p/dt/d/telemetry", &big, 5, t0).unwrap();
        assert_eq!(
            out.iter().map(|r| r.tags.clone()).collect::<Vec<_>>(),
            vec![vec![2]]
        );
    }

    #[test]
    fn batch_takes_only_json_on_batched_topics_under_the_prefix() {
        let mut b = Batcher::new(cfg(), "p/");
        let t0 = Instant::now();
        assert_eq!(
            b.push("p/dt/a/twin", &msg(1), 1, t0).unwrap_err(),
            NotBatched::Topic
        );
        assert_eq!(
            b.push("q/dt/a/telemetry", &msg(1), 1, t0).unwrap_err(),
            NotBatched::Topic
        );
        assert_eq!(
            b.push("p/dt/a/telemetry", b"\xff not json", 1, t0)
                .unwrap_err(),
            NotBatched::NotJson
        );
        assert!(b.is_empty());
    }

    #[test]
    fn batch_plain_envelope_is_json_and_decodes_the_same() {
        let mut b = Batcher::new(
            BatchConfig {
                compression: Compression::None,
                ..cfg()
            },
            "p/",
        );
        let t0 = Instant::now();
        b.push("p/dt/a/telemetry", b" {\"ts\":5} \n", 1, t0)
            .unwrap();
        let r = b.due(t0, true).remove(0);
        assert_eq!(
            std::str::from_utf8(&r.payload).unwrap(),
            r#"{"v":1,"topic":"dt/a/telemetry","messages":[{"ts":5}]}"#
        );
        assert_eq!(decode(&r.payload).unwrap().1[0]["ts"], 5);
        assert!(decode(br#"{"v":2,"topic":"x","messages":[]}"#)
            .unwrap_err()
            .contains("version 2"));
    }

    #[test]
    fn batch_config_check_names_each_bad_field() {
        let bad = BatchConfig {
            topics: vec!["dt/#/x".into()],
            interval_ms: 0,
            max_messages: 1,
            max_bytes: 10,
            level: 30,
            ..BatchConfig::default()
        };
        let errors = bad.check().join("\n");
        for field in [
            "topics[0]",
            "interval_ms",
            "max_messages",
            "max_bytes",
            "level",
        ] {
            assert!(errors.contains(field), "{field} in {errors}");
        }
        assert!(BatchConfig::default().check().is_empty());
    }
}
