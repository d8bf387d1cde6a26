//! The embedded rumqttd broker. We spawn rumqttd's `Router` and `Server` ourselves instead of
//! calling `Broker::start`, which binds TCP listeners and blocks its caller forever. The broker
//! has no TCP listener at all: the front door reaches it through in-process pipes
//! ([`EmbeddedBroker::serve_in_process`], served by `Server::serve_stream`, which our copy of
//! rumqttd adds, see `vendor/rumqttd/PATCHED.md`), the node's own consumers through rumqttd's
//! local links.
//!
//! The router starts first ([`EmbeddedBroker::start_router`]) and the pipes only when the node
//! calls [`EmbeddedBroker::serve_in_process`], after every internal consumer has subscribed: a
//! client can never publish into a broker whose consumers are not there yet.
//!
//! rumqttd has no shutdown API: its router and connection threads end with the process. Nothing
//! durable lives inside rumqttd (retained messages are memory-only there), so that is safe.
//!
//! # Memory
//! rumqttd keeps one log per distinct subscription filter, never freed, each holding up to
//! `max_segment_count` segments of `max_segment_size` accounted bytes (topic + payload; the real
//! cost is about 1.7× for 300-byte messages). A log that keeps receiving traffic sits at that cap,
//! so the cap is what bounds memory: internal consumers' filters get [`INTERNAL_SEGMENT`] (they
//! read from the broker into their own bounded queue at once, so the log only needs to cover the
//! router's own scheduling), everyone else's get [`CLIENT_SEGMENT`]. A consumer that falls behind
//! by more than its log loses the oldest messages: for internal consumers that is detected and
//! counted (see [`crate::local`]); for clients it is rumqttd's behaviour, counted from its
//! warnings (see [`crate::skips`]). rumqttd acknowledges a QoS 1 publish once it is in the log,
//! so a publisher is never slowed down by a slow subscriber: back-pressure needs the node's own
//! front door.

use std::net::SocketAddr;

use anyhow::Context;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, Router, RouterConfig, Server, ServerSettings};

use crate::{BrokerMetrics, MqttConfig};

/// Creates an in-process link; the error is rendered to text because rumqttd's is very large.
type NewLink = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;
/// Makes rumqttd's MQTT 5 server on the router.
type NewServer = Box<dyn Fn(ServerSettings) -> Server<V5> + Send + Sync>;

/// Log size of an internal consumer's filter: 3 full segments of history (1.5 MiB accounted).
pub const INTERNAL_SEGMENT: (usize, usize) = (512 * 1024, 4);
/// Log size of any other filter: 3 full segments of history (768 KiB accounted, about 10,000
/// small telemetry messages of lag a subscriber may fall behind before it loses the oldest;
/// such losses are counted, see [`crate::skips`]).
pub const CLIENT_SEGMENT: (usize, usize) = (256 * 1024, 4);

/// Bytes buffered each way in one in-process connection before its writer waits (as a socket's
/// buffer would make it wait); allocated as used. Measured flat out (broker-compare, QoS 0, one
/// subscriber, four publishers): 64 KiB made deliveries fall behind the broker's log and lose
/// 41%; 256 KiB and 1 MiB lost nothing.
const PIPE_BUFFER: usize = 256 * 1024;

/// The broker's side for the front door: each [`connect`](Pipes::connect) is a new MQTT
/// connection to rumqttd's MQTT 5 server through an in-process pipe. The broker has no TCP
/// listener, so no other process on the host can reach it around the front door's
/// authentication and permissions.
#[derive(Clone)]
pub struct Pipes {
    to_broker: tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
}

impl Pipes {
    /// A new connection: the caller's end of the pipe; the broker expects a CONNECT on it
    /// (with the login given to [`EmbeddedBroker::serve_in_process`]).
    pub fn connect(&self) -> std::io::Result<tokio::io::DuplexStream> {
        let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
        self.to_broker.send(theirs).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the embedded broker's connection thread has stopped",
            )
        })?;
        Ok(ours)
    }
}

impl std::fmt::Debug for Pipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipes(in-process MQTT 5)")
    }
}

/// A login made fresh at every start (`edgetwin-front-door` and a random 128-bit password):
/// what the front door sends the broker, and how it knows the node's own clients.
pub fn fresh_login() -> (String, String) {
    let password: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16usize)]))
        .collect();
    ("edgetwin-front-door".to_string(), password)
}

/// A running embedded broker: a handle to create in-process links and, once, serve the front door.
pub struct EmbeddedBroker {
    // rumqttd does not export the router's event type, so the sender is kept inside closures.
    new_link: NewLink,
    new_server: NewServer,
    metrics: BrokerMetrics,
}

impl EmbeddedBroker {
    /// Starts the router only (no TCP listener yet). `internal_filters` are the filters the
    /// node's own consumers subscribe; they get the larger log of [`INTERNAL_SEGMENT`].
    pub fn start_router(cfg: &MqttConfig, internal_filters: &[String]) -> EmbeddedBroker {
        let internal = rumqttd::SegmentConfig {
            max_segment_size: INTERNAL_SEGMENT.0,
            max_segment_count: INTERNAL_SEGMENT.1,
        };
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections,
            // Per-connection outgoing queue in the router; large enough that a burst of retained
            // twin documents at (re)subscribe (the bridge's resync) is not cut.
            max_outgoing_packet_count: 10_000,
            max_segment_size: CLIENT_SEGMENT.0,
            max_segment_count: CLIENT_SEGMENT.1,
            custom_segment: Some(
                internal_filters
                    .iter()
                    .map(|f| (f.clone(), internal.clone()))
                    .collect(),
            ),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, router_cfg).spawn();
        let link_tx = router_tx.clone();
        EmbeddedBroker {
            new_link: Box::new(move |client_id| {
                let (tx, rx, _ack) = LinkBuilder::new(client_id, link_tx.clone())
                    .clean_session(true)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok((tx, rx))
            }),
            new_server: Box::new(move |settings| Server::new(settings, router_tx.clone(), V5)),
            metrics: BrokerMetrics::default(),
        }
    }

    /// The broker's metrics (register them with [`BrokerMetrics::register`]).
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    /// Starts rumqttd's MQTT 5 server on a thread of its own, serving connections over
    /// in-process pipes (the front door's upstream); each connection must log in with `login`.
    /// `cfg` gives the connection limits.
    pub fn serve_in_process(
        &self,
        cfg: &MqttConfig,
        login: &(String, String),
    ) -> anyhow::Result<Pipes> {
        let settings = ServerSettings {
            name: "in-process".to_string(),
            // Never bound: connections come through `Pipes`.
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: cfg.connect_timeout_ms,
                max_payload_size: cfg.max_payload_bytes,
                max_inflight_count: cfg.max_inflight_messages,
                auth: Some([login.clone()].into()),
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let (to_broker, mut pipes) = tokio::sync::mpsc::unbounded_channel();
        let server = (self.new_server)(settings);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the broker's connection runtime")?;
        // rumqttd's connection tasks run apart from the node's runtime, as its listener did.
        std::thread::Builder::new()
            .name("mqtt-connections".into())
            .spawn(move || {
                rt.block_on(async move {
                    while let Some(pipe) = pipes.recv().await {
                        tokio::spawn(server.serve_stream(pipe));
                    }
                })
            })
            .context("cannot spawn the broker's connection thread")?;
        Ok(Pipes { to_broker })
    }

    /// An in-process client link (no TCP) with the given client id.
    pub fn link(&self, client_id: &str) -> anyhow::Result<(LinkTx, LinkRx)> {
        (self.new_link)(client_id)
            .map_err(|e| anyhow::anyhow!("in-process broker link {client_id}: {e}"))
    }
}
