//! The embedded rumqttd broker. We spawn rumqttd's `Router` and `Server`s ourselves instead of
//! calling `Broker::start`, because `Broker::start` reports a taken port only in its log and blocks
//! its caller forever; here a listener that cannot bind fails start-up with a clear error.
//!
//! rumqttd has no shutdown API: its router and listener threads end with the process. Nothing
//! durable lives inside rumqttd (retained messages are memory-only there), so that is safe.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

use crate::config::MqttConfig;

/// Creates an in-process link; the error is rendered to text because rumqttd's is very large.
type NewLink = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;

/// A running embedded broker: a handle to create in-process links.
pub struct EmbeddedBroker {
    // rumqttd does not export the router's event type, so the sender is kept inside a closure.
    new_link: NewLink,
}

impl EmbeddedBroker {
    /// Starts the router and the listeners; returns once every listener accepts connections.
    pub async fn start(cfg: &MqttConfig) -> anyhow::Result<EmbeddedBroker> {
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections,
            // Per-connection outgoing queue in the router; large enough that a burst of retained
            // twin documents at (re)subscribe is not cut.
            max_outgoing_packet_count: 10_000,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, router_cfg).spawn();

        let mut listeners = vec![(cfg.listen, false)];
        if let Some(v5) = cfg.listen_v5 {
            listeners.push((v5, true));
        }
        for (addr, v5) in listeners {
            let settings = ServerSettings {
                name: if v5 {
                    format!("v5-{addr}")
                } else {
                    format!("v4-{addr}")
                },
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: cfg.connect_timeout_ms,
                    max_payload_size: cfg.max_payload_bytes,
                    max_inflight_count: cfg.max_inflight_messages,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            let tx = router_tx.clone();
            let serve: ServeFn = if v5 {
                Box::new(move |rt| {
                    rt.block_on(async move {
                        Server::new(settings, tx, V5).start(LinkType::Remote).await
                    })
                    .map_err(|e| e.to_string())
                })
            } else {
                Box::new(move |rt| {
                    rt.block_on(async move {
                        Server::new(settings, tx, V4).start(LinkType::Remote).await
                    })
                    .map_err(|e| e.to_string())
                })
            };
            spawn_listener(addr, serve)
                .await
                .with_context(|| format!("MQTT{} listener {addr}", if v5 { " 5" } else { "" }))?;
        }
        Ok(EmbeddedBroker {
            new_link: Box::new(move |client_id| {
                let (tx, rx, _ack) = LinkBuilder::new(client_id, router_tx.clone())
                    .clean_session(true)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok((tx, rx))
            }),
        })
    }

    /// An in-process client link (no TCP) with the given client id.
    pub fn link(&self, client_id: &str) -> anyhow::Result<(LinkTx, LinkRx)> {
        (self.new_link)(client_id)
            .map_err(|e| anyhow::anyhow!("in-process broker link {client_id}: {e}"))
    }
}

type ServeFn = Box<dyn FnOnce(&tokio::runtime::Runtime) -> Result<(), String> + Send>;

async fn spawn_listener(addr: SocketAddr, serve: ServeFn) -> anyhow::Result<()> {
    // Bind once ourselves so a taken port or a bad address is reported here, not only in a log.
    std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<String>();
    std::thread::Builder::new()
        .name(format!("mqtt-{addr}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = done_tx.send(format!("cannot start listener runtime: {e}"));
                    return;
                }
            };
            let _ = done_tx.send(match serve(&rt) {
                Ok(()) => "listener stopped".to_string(),
                Err(e) => e,
            });
        })
        .context("cannot spawn listener thread")?;
    wait_until_listening(addr, &done_rx).await
}

async fn wait_until_listening(
    addr: SocketAddr,
    done: &std::sync::mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    };
    for _ in 0..200 {
        if let Ok(msg) = done.try_recv() {
            bail!("{msg}");
        }
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("not accepting connections after 5 s")
}
