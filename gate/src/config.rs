//! The gate's configuration (the `gate:` section of the node config).
//!
//! ```yaml
//! listeners:
//!   - listen: 0.0.0.0:1883                     # plain TCP, MQTT 3.1.1 and 5
//!   - listen: 0.0.0.0:8883
//!     tls:
//!       cert_file: /etc/edgetwin/tls/server.crt   # PEM chain, leaf first
//!       key_file: /etc/edgetwin/tls/server.key    # PEM private key (PKCS#8, PKCS#1 or SEC1)
//!       client_ca_file: /etc/edgetwin/tls/ca.crt  # optional: verify client certificates
//!       require_client_cert: false                # true: no handshake without a client cert
//! credentials_file: /etc/edgetwin/users.yaml      # optional; see `credentials`
//! allow_anonymous: false      # default: false with a credentials file, true without
//! anonymous_role: admin       # role of anonymous clients (admin|engineer|app); default admin
//! limits:
//!   max_packet_bytes: 1048576         # whole MQTT packet (remaining length)
//!   max_topic_len: 512                # bytes, topic names and filters
//!   max_subscriptions_per_client: 100 # active filters per connection
//!   connect_timeout_ms: 10000         # TLS handshake + CONNECT, and the upstream dial
//!   max_queued_messages: 1000         # per kept session while its client is away
//!   max_queued_bytes: 16777216        # the same, in bytes
//!   max_held_sessions: 256            # away sessions whose queues are kept on disk
//! ```
//!
//! Without a credentials file and with the defaults, the gate is as open as the bare broker
//! (anonymous admins) and only adds the limits, TCP_NODELAY and the single v4+v5 port; a
//! credentials file closes it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::credentials::RoleName;

/// The whole gate configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Public listeners besides the node's `mqtt.listen`/`listen_v5`; each serves MQTT 3.1.1
    /// and 5.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// YAML file of users, hashes and roles.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Accept clients without credentials; default: `false` with a credentials file, else `true`.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// Role of anonymous clients (not `mapper`).
    #[serde(default = "default_anonymous_role")]
    pub anonymous_role: RoleName,
    /// Hardening limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

fn default_anonymous_role() -> RoleName {
    RoleName::Admin
}

/// One public listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// TLS; absent: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// TLS settings of a listener (rustls, ring provider).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA bundle that client certificates must chain to; enables client-certificate login.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse handshakes without a valid client certificate (needs `client_ca_file`).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// Hardening limits; a client that exceeds one is disconnected with a log line naming the limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest MQTT packet accepted from a client (remaining length, bytes).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Longest topic name or filter (bytes).
    #[serde(default = "default_max_topic_len")]
    pub max_topic_len: usize,
    /// Most active subscriptions of one connection.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions_per_client: usize,
    /// Most distinct subscription filters the gate ever passes to the broker, all clients
    /// together. The embedded broker keeps a log per distinct filter for the life of the process
    /// (about 0.5 MiB each when busy), so clients subscribing ever new filters would grow memory
    /// without bound; past this budget a new filter is refused (SUBACK failure, counted as
    /// `kind="filter_budget"`), filters already seen stay allowed. Default 256.
    #[serde(default = "default_max_distinct_filters")]
    pub max_distinct_filters: usize,
    /// Most distinct topic names, outside a registered device's own topics and the node's fixed
    /// ones, the gate ever passes to the broker, all clients together. rumqttd keeps an entry
    /// for every topic name it has seen (and its retained message) for the life of the process,
    /// so clients publishing to ever new topics would grow memory without bound; past this
    /// budget a publish to a new topic is refused (MQTT 5: PUBACK/PUBREC 0x97 quota exceeded;
    /// counted as `kind="topic_budget"`). Default 10,000.
    #[serde(default = "default_max_distinct_topics")]
    pub max_distinct_topics: usize,
    /// Failed logins from one address, or for one user, before further attempts are held back
    /// (each further failure doubles the spacing of attempts, from 250 ms). Default 3.
    #[serde(default = "default_login_free_failures")]
    pub login_free_failures: u32,
    /// Longest spacing of attempts after failed logins; an attempt whose turn would be further
    /// away is refused unchecked (`reason="throttled"`). Default 10000.
    #[serde(default = "default_login_max_delay_ms")]
    pub login_max_delay_ms: u64,
    /// The keep-alive, in seconds, the gate asks of the broker for a client that turned its
    /// keep-alive off (0, which rumqttd refuses); the gate then pings the broker every half of
    /// it for that client. Default 60, at least 2.
    #[serde(default = "default_keepalive_off_upstream_s")]
    pub keepalive_off_upstream_s: u16,
    /// Time allowed for the TLS handshake plus CONNECT, and for dialling the upstream broker.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Most QoS 1/2 messages queued on disk for one kept session while its client is away
    /// (Mosquitto's `max_queued_messages`); past it new ones are dropped and counted
    /// (`edgetwin_gate_queue_dropped_total`). Default 1000.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Most bytes queued for one kept session (the queue is read into memory when the client
    /// comes back). Default 16 MiB.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Most kept sessions whose queue the gate keeps on disk while their clients are away. Each
    /// costs an in-process connection to the broker (about 65 KiB measured); past it
    /// an away session's messages stay in the broker's memory only (not kept across a restart),
    /// counted in `edgetwin_gate_sessions_not_held_total`. Default 256.
    #[serde(default = "default_max_held_sessions")]
    pub max_held_sessions: usize,
}

fn default_max_packet_bytes() -> usize {
    1024 * 1024
}
fn default_max_topic_len() -> usize {
    512
}
fn default_max_subscriptions() -> usize {
    100
}
fn default_max_distinct_filters() -> usize {
    256
}
fn default_max_distinct_topics() -> usize {
    10_000
}
fn default_login_free_failures() -> u32 {
    3
}
fn default_login_max_delay_ms() -> u64 {
    10_000
}
fn default_keepalive_off_upstream_s() -> u16 {
    60
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_queued_messages() -> usize {
    1000
}
fn default_max_queued_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_held_sessions() -> usize {
    256
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_packet_bytes: default_max_packet_bytes(),
            max_topic_len: default_max_topic_len(),
            max_subscriptions_per_client: default_max_subscriptions(),
            max_distinct_filters: default_max_distinct_filters(),
            max_distinct_topics: default_max_distinct_topics(),
            login_free_failures: default_login_free_failures(),
            login_max_delay_ms: default_login_max_delay_ms(),
            keepalive_off_upstream_s: default_keepalive_off_upstream_s(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_queued_messages: default_max_queued_messages(),
            max_queued_bytes: default_max_queued_bytes(),
            max_held_sessions: default_max_held_sessions(),
        }
    }
}

impl GateConfig {
    /// A plain-TCP gate on `listen` with every default.
    pub fn plain(listen: SocketAddr) -> GateConfig {
        GateConfig {
            listeners: vec![ListenerConfig { listen, tls: None }],
            credentials_file: None,
            allow_anonymous: None,
            anonymous_role: default_anonymous_role(),
            limits: LimitsConfig::default(),
        }
    }

    /// Whether a client without credentials connecting from `peer` is let in. Unset
    /// `allow_anonymous` means: without a credentials file, from this host (loopback) only, so a
    /// node reachable from the network takes no anonymous client unless the config says so;
    /// with a credentials file, never. `true` lets anonymous clients in from anywhere.
    pub fn anonymous_allowed_from(&self, peer: std::net::IpAddr) -> bool {
        match self.allow_anonymous {
            Some(allowed) => allowed,
            None => self.credentials_file.is_none() && is_loopback(peer),
        }
    }

    /// Every problem of the configuration, each with its field path; empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push("listeners: at least one listener is needed".to_string());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(tls) = &l.tls {
                if tls.require_client_cert && tls.client_ca_file.is_none() {
                    errors.push(format!(
                        "listeners[{i}].tls.require_client_cert: needs client_ca_file"
                    ));
                }
            }
        }
        if self.anonymous_role == RoleName::Mapper {
            errors.push("anonymous_role: cannot be mapper (a mapper needs an identity)".into());
        }
        let l = &self.limits;
        if l.max_packet_bytes < 1024 {
            errors.push("limits.max_packet_bytes: must be at least 1024".into());
        }
        if l.keepalive_off_upstream_s < 2 {
            errors.push("limits.keepalive_off_upstream_s: must be at least 2".into());
        }
        if l.max_topic_len < 64 {
            errors.push("limits.max_topic_len: must be at least 64".into());
        }
        if l.max_subscriptions_per_client == 0 {
            errors.push("limits.max_subscriptions_per_client: must be at least 1".into());
        }
        if l.connect_timeout_ms == 0 {
            errors.push("limits.connect_timeout_ms: must be at least 1".into());
        }
        errors
    }
}

/// Loopback, also as an IPv4-mapped IPv6 address (what a dual-stack listener reports).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_apply_and_unknown_fields_are_refused() {
        let c: GateConfig =
            serde_norway::from_str("listeners: [{listen: 127.0.0.1:1883}]").unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        let (here, mapped, remote): (std::net::IpAddr, std::net::IpAddr, std::net::IpAddr) = (
            "127.0.0.1".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
        );
        assert!(c.anonymous_allowed_from(here) && c.anonymous_allowed_from(mapped));
        assert!(
            !c.anonymous_allowed_from(remote),
            "anonymous from loopback only by default"
        );
        assert!(c.problems().is_empty());
        let c: GateConfig = serde_norway::from_str(
            "listeners: [{listen: 127.0.0.1:1883}]\ncredentials_file: /x.yaml",
        )
        .unwrap();
        assert!(!c.anonymous_allowed_from(here));
        let c: GateConfig =
            serde_norway::from_str("listeners: [{listen: 0.0.0.0:1883}]\nallow_anonymous: true")
                .unwrap();
        assert!(
            c.anonymous_allowed_from(remote),
            "an explicit true opens it to every host"
        );
        assert!(serde_norway::from_str::<GateConfig>(
            "listeners: [{listen: 127.0.0.1:1883}]\nlimits: {max_packet: 1}"
        )
        .is_err());
    }

    #[test]
    fn config_problems_are_all_reported_with_paths() {
        let c: GateConfig = serde_norway::from_str(
            "listeners: [{listen: 127.0.0.1:1, tls: {cert_file: a, key_file: b, require_client_cert: true}}]\n\
             anonymous_role: mapper\nlimits: {max_packet_bytes: 1, max_subscriptions_per_client: 0}",
        )
        .unwrap();
        let p = c.problems();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("listeners[0].tls.require_client_cert"));
    }
}
