//! The node's embedded MQTT broker (rumqttd, in-process) and the one local client API every
//! internal consumer of the node uses. See [`embedded`] for the memory model (bounded per-filter
//! logs) and the start order (router first, the front door's pipes on demand), and [`local`] for
//! how a consumer that falls behind the broker's log is detected.

pub mod embedded;
pub mod local;
mod metrics;
pub mod skips;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use embedded::{fresh_login, EmbeddedBroker, Pipes, CLIENT_SEGMENT, INTERNAL_SEGMENT};
pub use local::{LocalClient, Message};
pub use metrics::{BrokerMetrics, LinkLabels};

/// The embedded broker's listeners and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The node's MQTT port, served by the front door (the gate): MQTT 3.1.1 and 5. Default
    /// `127.0.0.1:1883`: nothing is open to other hosts until the config says so (as Mosquitto 2
    /// does). The broker itself has no listener: the front door reaches it in-process ([`Pipes`]).
    pub listen: SocketAddr,
    /// A second front-door port, also both versions (kept for MQTT 5 clients set up for the
    /// old separate port). Default `127.0.0.1:1884`; `null` disables it.
    pub listen_v5: Option<SocketAddr>,
    /// Largest accepted MQTT payload in bytes. Default 262144 (256 KiB).
    pub max_payload_bytes: usize,
    /// Most concurrent client connections. Default 10000.
    pub max_connections: usize,
    /// Most unacknowledged QoS 1/2 messages in flight per client. Default 100.
    pub max_inflight_messages: usize,
    /// How long a new connection may take to send CONNECT, in milliseconds. Default 5000.
    pub connect_timeout_ms: u16,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: Some(SocketAddr::from(([127, 0, 0, 1], 1884))),
            max_payload_bytes: 256 * 1024,
            max_connections: 10_000,
            max_inflight_messages: 100,
            connect_timeout_ms: 5000,
        }
    }
}

/// The address to connect to for a listener bound to `addr` (an unspecified address listens on
/// loopback too).
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}
