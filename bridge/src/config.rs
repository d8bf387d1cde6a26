//! The `bridge:` section of the node config. No section means no upstream (the embedded default).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The upstream bridge to a cloud MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Cloud broker: `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS, 8883).
    pub url: String,
    /// MQTT client id at the cloud broker; fixed so the cloud keeps this node's session.
    /// Default `edgetwin-{node_id}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT protocol version spoken to the cloud: `v4` (3.1.1, the default) or `v5`.
    #[serde(default)]
    pub protocol: BridgeProtocol,
    /// MQTT 5: how long the cloud broker keeps the node's session (its subscriptions and the
    /// commands queued for it) while the node is away, seconds. Default 604800 (7 days).
    #[serde(default = "default_session_expiry_s")]
    pub session_expiry_s: u32,
    /// TLS files (PEM); used with `mqtts://`. Without `ca_file` the URL must be `mqtt://`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// User name at the cloud broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password at the cloud broker (prefer `password_file`). Never printed by `--print-config`.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive in seconds. Default 30.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// Prefix of every topic at the cloud broker. Default `edgetwin/{node_id}/`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// Local topic filters forwarded up (each message goes through the outbox), published at
    /// `{topic_prefix}{local topic}` with QoS 1.
    #[serde(default = "default_up")]
    pub up: Vec<UpRoute>,
    /// Cloud topic filters, relative to `topic_prefix`, subscribed with QoS 1 and brought down:
    /// `dt/+/desired` goes to the twin service (source `cloud`), anything else is republished on
    /// the local broker under the same topic without the prefix.
    #[serde(default = "default_down")]
    pub down: Vec<String>,
    /// The durable outbox bounds.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Most backlog telemetry records (bulk lane, appended before the current connection came
    /// up) sent per second, for a cloud that rate-limits; the control lane and records appended
    /// while connected are not paced. `0` = unpaced, the default: the backlog drains as fast
    /// as the link and the cloud broker take it.
    #[serde(default = "default_replay_rate")]
    pub replay_max_msgs_per_s: u32,
    /// Batch and compress telemetry upstream (absent: one upstream message per message). See
    /// [`crate::batch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::batch::BatchConfig>,
    /// Require every message from the cloud to be signed by a trusted key (absent: not
    /// required). See [`crate::signed`].
    #[serde(default)]
    pub signatures: Option<SignaturesConfig>,
    /// Most QoS 1 publishes waiting for PUBACK at once. Default 100.
    #[serde(default = "default_inflight")]
    pub max_inflight_messages: u16,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// At shutdown, how long to keep sending what is queued before exiting, in milliseconds
    /// (nothing is lost either way: the outbox is durable). Default 5000.
    #[serde(default = "default_flush_timeout_ms")]
    pub flush_timeout_ms: u64,
}

/// MQTT protocol version towards the cloud broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeProtocol {
    /// MQTT 3.1.1.
    #[default]
    V4,
    /// MQTT 5.
    V5,
}

/// TLS material for the cloud connection (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) the cloud broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate (mutual TLS); needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// One local filter forwarded upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpRoute {
    /// Local MQTT topic filter (`+` and `#` allowed).
    pub filter: String,
    /// Publish retained at the cloud. Retained routes are also re-read from the local broker's
    /// retained messages on every (re)connect, so the cloud converges to the current documents.
    #[serde(default)]
    pub retain: bool,
    /// The outbox lane its messages wait in (default: `bulk` for a filter ending in
    /// `/telemetry`, `control` for every other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
}

/// `bridge.signatures`: the keys whose signatures the node accepts on cloud messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignaturesConfig {
    /// Key id → Ed25519 public key (32 bytes, base64), as `edgetwin key generate` prints it.
    pub keys: std::collections::BTreeMap<String, String>,
    /// Longest validity an envelope may claim, seconds (bounds replays). Default 3600.
    #[serde(default = "default_max_validity_s")]
    pub max_validity_s: u64,
}

fn default_max_validity_s() -> u64 {
    3600
}

/// The two lanes of the outbox. The bridge sends every waiting `control` record before any
/// `bulk` one and keeps a tenth of the in-flight window for `control`, so twin documents,
/// statuses, errors and command results never wait behind a telemetry backlog. Order is kept
/// within a lane (per device too), not across lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// State and answers: small, never behind telemetry.
    Control,
    /// Telemetry: the bulk of the traffic and of any backlog.
    Bulk,
}

impl UpRoute {
    /// The lane this route's messages wait in.
    pub fn lane(&self) -> Lane {
        self.lane
            .unwrap_or(if self.filter.rsplit('/').next() == Some("telemetry") {
                Lane::Bulk
            } else {
                Lane::Control
            })
    }
}

/// Bounds of the durable outbox (`{data_dir}/outbox.redb`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Most stored bytes (topic + payload + record overhead). Default 268435456 (256 MiB).
    pub max_bytes: u64,
    /// Oldest record kept, in seconds. Default 86400 (24 h).
    pub max_age_s: u64,
    /// What to drop when full: `drop_oldest` (default) or `reject_new`.
    pub policy: OutboxPolicy,
}

/// The outbox overflow policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxPolicy {
    /// Drop the oldest records until the new one fits (newest data is worth most).
    #[default]
    DropOldest,
    /// Refuse new records while full (oldest data is worth most).
    RejectNew,
}

/// Exponential backoff with full jitter between connection attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// Upper bound of the first wait, in milliseconds. Default 500.
    pub initial_ms: u64,
    /// Upper bound of any wait, in milliseconds. Default 30000.
    pub max_ms: u64,
}

fn default_session_expiry_s() -> u32 {
    7 * 24 * 60 * 60
}
fn default_keep_alive_s() -> u16 {
    30
}
fn default_replay_rate() -> u32 {
    // Unpaced: a fixed rate made a day's backlog take hours (2000 msg/s drained at 0.04x the
    // link), and state no longer waits behind telemetry (it has its own lane and slots).
    0
}
fn default_inflight() -> u16 {
    100
}
fn default_flush_timeout_ms() -> u64 {
    5000
}

/// The default up routes.
pub fn default_up() -> Vec<UpRoute> {
    let r = |filter: &str, retain| UpRoute {
        filter: filter.to_string(),
        retain,
        lane: None,
    };
    vec![
        r("dt/+/twin", true),
        r("dt/+/status", true),
        r("dt/+/telemetry", false),
        r("dt/+/error", false),
        r("dt/+/desired/result", false),
        r("node/containers/result", false),
        r("node/containers/status", true),
    ]
}

/// The default down filters (relative to the prefix).
pub fn default_down() -> Vec<String> {
    vec![
        "dt/+/desired".to_string(),
        "node/containers/cmd".to_string(),
    ]
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 256 * 1024 * 1024,
            max_age_s: 24 * 60 * 60,
            policy: OutboxPolicy::DropOldest,
        }
    }
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

/// Where the cloud broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{url:?}: unexpected {after:?} after the address")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?}: bad host"));
    }
    Ok(Endpoint { host, port, tls })
}

/// A valid MQTT topic filter: non-empty, `#` only as the last level, wildcards only as whole levels.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

impl BridgeConfig {
    /// Every problem with this section, each prefixed with its field path.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        match parse_url(&self.url) {
            Ok(ep) => {
                if ep.tls && self.tls.is_none() {
                    errors.push("bridge.tls: mqtts:// needs tls.ca_file".to_string());
                }
                if !ep.tls && self.tls.is_some() {
                    errors.push("bridge.url: tls is configured but the URL is mqtt://".to_string());
                }
            }
            Err(e) => errors.push(format!("bridge.url: {e}")),
        }
        if self.session_expiry_s == 0 {
            errors.push(
                "bridge.session_expiry_s: must be at least 1 (0 would end the session, and the commands queued for the node, at every disconnect)"
                    .to_string(),
            );
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.starts_with(' ') || id.len() > 256 {
                errors.push(
                    "bridge.client_id: must be 1-256 characters, not starting with a space"
                        .to_string(),
                );
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            errors
                .push("bridge.password_file: give password or password_file, not both".to_string());
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                errors.push("bridge.tls: cert_file and key_file go together".to_string());
            }
        }
        if let Some(p) = &self.topic_prefix {
            if p.contains(['+', '#']) || p.starts_with('$') {
                errors.push(
                    "bridge.topic_prefix: must not contain + or # or start with $".to_string(),
                );
            }
        }
        for (i, r) in self.up.iter().enumerate() {
            if !valid_filter(&r.filter) {
                errors.push(format!(
                    "bridge.up[{i}].filter: {:?} is not a valid MQTT filter",
                    r.filter
                ));
            }
        }
        for (i, f) in self.down.iter().enumerate() {
            if !valid_filter(f) {
                errors.push(format!(
                    "bridge.down[{i}]: {f:?} is not a valid MQTT filter"
                ));
            }
        }
        if let Some(b) = &self.batch {
            errors.extend(b.check());
        }
        if self.max_inflight_messages == 0 {
            errors.push("bridge.max_inflight_messages: must be at least 1".to_string());
        }
        if let Some(sig) = &self.signatures {
            if let Err(e) = crate::signed::Verifier::new(&sig.keys, sig.max_validity_s) {
                errors.push(format!("bridge.signatures.keys: {e}"));
            }
            if sig.max_validity_s == 0 {
                errors.push("bridge.signatures.max_validity_s: must be at least 1".to_string());
            }
        }
        if self.outbox.max_bytes < 64 * 1024 {
            errors.push("bridge.outbox.max_bytes: must be at least 65536".to_string());
        }
        if self.outbox.max_age_s == 0 {
            errors.push("bridge.outbox.max_age_s: must be at least 1".to_string());
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.max_ms < self.reconnect.initial_ms {
            errors.push("bridge.reconnect: need 0 < initial_ms <= max_ms".to_string());
        }
        errors
    }

    /// The client id, defaulted from the node id.
    pub fn client_id(&self, node_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("edgetwin-{node_id}"))
    }

    /// The topic prefix, defaulted from the node id.
    pub fn topic_prefix(&self, node_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("edgetwin/{node_id}/"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bridge_url_parses_scheme_host_and_default_ports() {
        assert_eq!(
            parse_url("mqtt://cloud.example:1884").unwrap(),
            Endpoint {
                host: "cloud.example".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://cloud.example").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://[::1]:1883").unwrap().host, "::1");
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://x:notaport").is_err());
    }

    #[test]
    fn bridge_filter_validation_follows_mqtt_rules() {
        assert!(valid_filter("dt/+/twin"));
        assert!(valid_filter("dt/#"));
        assert!(!valid_filter("dt/#/x"));
        assert!(!valid_filter("dt/a+/x"));
        assert!(!valid_filter(""));
    }
}
