//! The embedded rumqttd broker. We spawn rumqttd's `Router` and `Server`s ourselves instead of
//! calling `Broker::start`, because `Broker::start` reports a taken port only in its log and blocks
//! its caller forever; here a listener that cannot bind fails start-up with a clear error.
//!
//! The router starts first ([`EmbeddedBroker::start_router`]) and the TCP listeners only when the
//! node calls [`EmbeddedBroker::listen`], after every internal consumer has subscribed: a client
//! can never publish into a broker whose consumers are not there yet.
//!
//! rumqttd has no shutdown API: its router and listener threads end with the process. Nothing
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
//! counted (see [`crate::local`]); for TCP clients it is rumqttd's behaviour, counted from its
//! warnings (see [`crate::skips`]). rumqttd acknowledges a QoS 1 publish once it is in the log,
//! so a publisher is never slowed down by a slow subscriber: back-pressure needs the node's own
//! front door.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

use crate::{BrokerMetrics, MqttConfig};

/// Creates an in-process link; the error is rendered to text because rumqttd's is very large.
type NewLink = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;

/// Log size of an internal consumer's filter: 3 full segments of history (1.5 MiB accounted).
pub const INTERNAL_SEGMENT: (usize, usize) = (512 * 1024, 4);
/// Log size of any other filter: 3 full segments of history (768 KiB accounted, about 10,000
/// small telemetry messages of lag a subscriber may fall behind before it loses the oldest;
/// such losses are counted, see [`crate::skips`]).
pub const CLIENT_SEGMENT: (usize, usize) = (256 * 1024, 4);

/// Starts one listener thread; rumqttd's server types differ per protocol version.
type ServeFn = Box<dyn FnOnce(&tokio::runtime::Runtime) -> Result<(), String> + Send>;
type MakeServe = Box<dyn Fn(ServerSettings, bool) -> ServeFn + Send + Sync>;

/// The broker's internal TCP listeners: loopback ports picked at start and a login made fresh
/// at every start. Only the node's front door (the gate) knows the login, so no other process
/// on the host can reach the broker around the gate's authentication and permissions.
#[derive(Clone)]
pub struct Internal {
    /// The MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// The MQTT 5 listener.
    pub v5: SocketAddr,
    /// Username and password.
    pub login: (String, String),
}

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Internal")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("login", &(&self.login.0, "<secret>"))
            .finish()
    }
}

impl Internal {
    /// Two free loopback ports (the kernel's choice) and a random 128-bit password.
    pub fn pick() -> anyhow::Result<Internal> {
        // Both held at once, so they differ; released just before rumqttd binds them.
        let a = std::net::TcpListener::bind(("127.0.0.1", 0)).context("no free loopback port")?;
        let b = std::net::TcpListener::bind(("127.0.0.1", 0)).context("no free loopback port")?;
        let password: String = (0..32)
            .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16usize)]))
            .collect();
        Ok(Internal {
            v4: a.local_addr()?,
            v5: b.local_addr()?,
            login: ("edgetwin-front-door".to_string(), password),
        })
    }
}

/// A running embedded broker: a handle to create in-process links and, once, start listening.
pub struct EmbeddedBroker {
    // rumqttd does not export the router's event type, so the sender is kept inside closures.
    new_link: NewLink,
    make_serve: MakeServe,
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
            make_serve: Box::new(move |settings, v5| {
                let tx = router_tx.clone();
                if v5 {
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
                }
            }),
            metrics: BrokerMetrics::default(),
        }
    }

    /// The broker's metrics (register them with [`BrokerMetrics::register`]).
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    /// Starts the broker's internal TCP listeners (the front door's upstream): MQTT 3.1.1 on
    /// `internal.v4`, MQTT 5 on `internal.v5`, each taking only `internal.login`. Returns once
    /// every listener accepts connections. `cfg` gives the connection limits.
    pub async fn listen(&self, cfg: &MqttConfig, internal: &Internal) -> anyhow::Result<()> {
        let auth: std::collections::HashMap<String, String> =
            [(internal.login.0.clone(), internal.login.1.clone())].into();
        for (addr, v5) in [(internal.v4, false), (internal.v5, true)] {
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
                    auth: Some(auth.clone()),
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            spawn_listener(addr, (self.make_serve)(settings, v5))
                .await
                .with_context(|| format!("MQTT{} listener {addr}", if v5 { " 5" } else { "" }))?;
        }
        Ok(())
    }

    /// An in-process client link (no TCP) with the given client id.
    pub fn link(&self, client_id: &str) -> anyhow::Result<(LinkTx, LinkRx)> {
        (self.new_link)(client_id)
            .map_err(|e| anyhow::anyhow!("in-process broker link {client_id}: {e}"))
    }
}

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
    wait_until_listening(addr, done_rx).await
}

// Takes the receiver by value: a `&Receiver` held across an await would make the node's `serve`
// future not `Send` (a std receiver is not `Sync`).
async fn wait_until_listening(
    addr: SocketAddr,
    done: std::sync::mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let probe = crate::loopback(addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // rumqttd binds within a millisecond or two: poll fast first, a start waits on this.
    let mut pause = Duration::from_millis(1);
    while tokio::time::Instant::now() < deadline {
        if let Ok(msg) = done.try_recv() {
            bail!("{msg}");
        }
        // The kernel's socket table answers without a connection; a connection that sends no
        // CONNECT makes rumqttd log an error at every start. Elsewhere, connect.
        let listening = match listening_in_proc(addr) {
            Some(l) => l,
            None => tokio::net::TcpStream::connect(probe).await.is_ok(),
        };
        if listening {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
    bail!("not accepting connections after 5 s")
}

/// Whether a socket listens on `addr`, from Linux's `/proc/net/tcp` and `tcp6`; `None` where
/// those cannot be read.
fn listening_in_proc(addr: SocketAddr) -> Option<bool> {
    let (file, want) = match addr {
        SocketAddr::V4(a) => ("/proc/net/tcp", proc_hex_v4(a.ip())),
        SocketAddr::V6(a) => ("/proc/net/tcp6", proc_hex_v6(a.ip())),
    };
    let table = std::fs::read_to_string(file).ok()?;
    Some(listens(&table, &format!("{want}:{:04X}", addr.port())))
}

/// Whether the `/proc/net/tcp` table has a LISTEN (`0A`) socket whose local address is `local`.
fn listens(table: &str, local: &str) -> bool {
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let (_, local_addr, _, state) = (f.next(), f.next(), f.next(), f.next());
        local_addr.is_some_and(|a| a.eq_ignore_ascii_case(local)) && state == Some("0A")
    })
}

/// An IPv4 address as `/proc/net/tcp` prints it: the address word in host (little-endian) order.
fn proc_hex_v4(ip: &std::net::Ipv4Addr) -> String {
    format!("{:08X}", u32::from_le_bytes(ip.octets()))
}

/// An IPv6 address as `/proc/net/tcp6` prints it: four words, each in host order.
fn proc_hex_v6(ip: &std::net::Ipv6Addr) -> String {
    ip.octets()
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .collect()
}

#[cfg(test)]
mod proc_tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_in_the_kernel_table_and_a_closed_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(listening_in_proc(addr), Some(true));
        drop(l);
        assert_eq!(listening_in_proc(addr), Some(false));
    }

    #[test]
    fn proc_addresses_are_printed_in_host_word_order() {
        assert_eq!(proc_hex_v4(&"127.0.0.1".parse().expect("ip")), "0100007F");
        assert_eq!(proc_hex_v4(&"0.0.0.0".parse().expect("ip")), "00000000");
        assert_eq!(
            proc_hex_v6(&"::1".parse().expect("ip")),
            "00000000000000000000000001000000"
        );
        let table = "  sl  local_address rem_address   st\n   0: 0100007F:0B5B 00000000:0000 0A 0\n   1: 0100007F:0B5C 0100007F:A70D 01 0\n";
        assert!(listens(table, "0100007F:0B5B"));
        assert!(
            !listens(table, "0100007F:0B5C"),
            "established, not listening"
        );
    }
}
