//! `bridge-bench`: drain rate of the upstream bridge after an outage, edgetwin's store-and-forward
//! bridge (one message per message, and with `bridge.batch`) beside Mosquitto's own bridge
//! forwarding the same load in the same run, and upstream bytes per telemetry point on a fixed
//! corpus (`benches/data/meter-telemetry.jsonl`: a three-phase meter's 20 properties read every
//! second for 15 minutes), one message per point vs edgetwin's zstd envelopes.
//!
//! Topology for both systems (everything on 127.0.0.1, free ports):
//!
//! ```text
//! publisher ─▶ edge broker (edgetwin | mosquitto with a bridge) ─▶ TCP proxy ─▶ cloud mosquitto ─▶ subscriber
//! ```
//!
//! The proxy (in this process) makes the outage: it drops the bridge's connection and refuses new
//! ones while N QoS 1 telemetry messages are published at the edge, then lets the bridge
//! reconnect. The subscriber stays connected to the cloud throughout and counts distinct
//! messages. Drain rate = N / (last arrival - first arrival); the time from healing the link to the
//! first arrival (reconnect backoff) is reported separately. Upstream bytes are counted by the
//! proxy (bridge → cloud direction, MQTT framing included).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use edgetwin_benches::loadgen;
use edgetwin_benches::procs::{self, ChildGuard, MosquittoQueues};
use edgetwin_benches::stats::ratio;
use edgetwin_benches::table::Table;
use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Drain rate after an outage (edgetwin vs Mosquitto's bridge) and upstream bytes per point.
#[derive(Parser)]
struct Args {
    /// Messages published at the edge during the outage.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Skip the bytes-per-point runs (drain only).
    #[arg(long)]
    no_corpus: bool,
    /// edgetwin's `bridge.replay_max_msgs_per_s` (0 = unpaced, the drain at full speed).
    #[arg(long, default_value_t = 0)]
    replay_rate: u32,
    /// In-flight window of both bridges (edgetwin's `max_inflight_messages`, the edge
    /// Mosquitto's `max_inflight_messages`).
    #[arg(long, default_value_t = INFLIGHT)]
    window: u16,
    /// The edgetwin binary (default: next to this program).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
    /// The Mosquitto binary (default: /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
}

const PREFIX: &str = "edgetwin/bench/";
const INFLIGHT: u16 = 100;
const QUEUES: MosquittoQueues = MosquittoQueues {
    max_inflight: 100,
    max_queued: 10_000_000,
};

/// A TCP proxy that can cut the link and counts bytes towards the target.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    up_bytes: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let up_bytes = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (c, g, u, a) = (
            cut.clone(),
            generation.clone(),
            up_bytes.clone(),
            accepted.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let my_gen = g.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, Some(u.clone()), g.clone(), my_gen));
                tokio::spawn(pipe(sr, cw, None, g.clone(), my_gen));
            }
        });
        Ok(Proxy {
            addr,
            cut,
            generation,
            up_bytes,
            accepted,
            task,
        })
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Option<Arc<AtomicU64>>,
    generation: Arc<AtomicU64>,
    mine: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await;
        if generation.load(Ordering::SeqCst) != mine {
            break;
        }
        let n = match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Counts distinct telemetry points arriving at the cloud.
#[derive(Default)]
struct Arrivals {
    seen: HashSet<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
    duplicates: usize,
    /// When the live status message published during the drain arrived.
    live_at: Option<Instant>,
}

async fn cloud_subscriber(
    cloud: SocketAddr,
) -> Result<(Arc<Mutex<Arrivals>>, tokio::task::JoinHandle<()>)> {
    let (client, mut el) = loadgen::connect("bench-cloud-app", cloud, INFLIGHT).await?;
    loadgen::subscribe(&client, &mut el, &[&format!("{PREFIX}#")], QoS::AtLeastOnce).await?;
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let sink = arrivals.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic.ends_with("/status")
                        && p.payload.windows(10).any(|w| w == b"bench-live") =>
                {
                    let mut a = sink.lock().unwrap_or_else(|e| e.into_inner());
                    a.live_at.get_or_insert(Instant::now());
                }
                // Only telemetry: the node's presence and health documents (`{"ts": ...}` too)
                // arrive under the same prefix, at the first connection, long before the drain.
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic.ends_with("/telemetry") || p.topic.ends_with("/telemetry/batch") =>
                {
                    let now = Instant::now();
                    let ids = point_ids(&p.topic, &p.payload);
                    let mut a = sink.lock().unwrap_or_else(|e| e.into_inner());
                    for id in ids {
                        if a.seen.insert(id) {
                            a.first.get_or_insert(now);
                            a.last = Some(now);
                        } else {
                            a.duplicates += 1;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok((arrivals, task))
}

/// The point ids in a payload: `{"ts": id, ...}`, or an edgetwin envelope of such messages.
fn point_ids(topic: &str, payload: &[u8]) -> Vec<u64> {
    if topic.ends_with(edgetwin_bridge::batch::TOPIC_SUFFIX) {
        return match edgetwin_bridge::batch::decode(payload) {
            Ok((_, messages)) => messages.iter().filter_map(|m| m["ts"].as_u64()).collect(),
            Err(e) => {
                eprintln!("{topic}: {e}");
                Vec::new()
            }
        };
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    v["ts"].as_u64().into_iter().collect()
}

fn one_point(id: u64) -> String {
    format!(
        r#"{{"ts":{id},"values":{{"temperature":{:.1}}}}}"#,
        20.0 + (id % 50) as f64 / 10.0
    )
}

/// The bytes-per-point corpus: one telemetry message per line, as the SDK publishes them.
const CORPUS: &str = include_str!("../../data/meter-telemetry.jsonl");
/// The corpus's device.
const CORPUS_TOPIC: &str = "dt/meter-1/telemetry";

/// One QoS 1 message, acknowledged by the edge broker.
async fn publish_one(edge: SocketAddr, topic: &str, payload: &str) -> Result<()> {
    let (client, mut el) = loadgen::connect("bench-live", edge, INFLIGHT).await?;
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline.into(), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("live publisher failed: {e}"),
            Err(_) => bail!("live publisher: no PUBACK within 10 s"),
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

/// Publishes `(topic, payload)` pairs at QoS 1 and waits for every PUBACK.
async fn publish_all(edge: SocketAddr, payloads: Vec<(String, String)>) -> Result<()> {
    let (client, mut el) = loadgen::connect("bench-publisher", edge, INFLIGHT).await?;
    let total = payloads.len();
    let producer = tokio::spawn(async move {
        for (topic, p) in payloads {
            if client
                .publish(topic, QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked < total {
        if Instant::now() > deadline {
            bail!("publisher: only {acked} of {total} acked within 300 s");
        }
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("publisher connection failed: {e}"),
            Err(_) => bail!("publisher: no progress for 10 s ({acked} of {total} acked)"),
        }
    }
    let client = producer.await.context("publisher task")?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while !matches!(
            el.poll().await,
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
        ) {}
    })
    .await;
    Ok(())
}

/// Which edge broker forwards to the cloud.
enum Edge {
    Edgetwin {
        _child: ChildGuard,
        http: SocketAddr,
    },
    Mosquitto {
        _child: ChildGuard,
    },
}

fn metric(http: SocketAddr, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_metric(http: SocketAddr, name: &str, pred: impl Fn(f64) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if metric(http, name).is_some_and(&pred) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not reach the expected value within 120 s (last {:?})",
                metric(http, name)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_edgetwin(
    bin: &Path,
    dir: &Path,
    proxy: SocketAddr,
    args: &Args,
    v: &Variant,
) -> Result<(ChildGuard, SocketAddr, SocketAddr)> {
    let (replay_rate, window) = (args.replay_rate, args.window);
    let ports = procs::free_ports(3)?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let conf = dir.join("edgetwin.yaml");
    let mut t = String::new();
    writeln!(t, "node_id: bench")?;
    writeln!(t, "data_dir: {}", data.display())?;
    writeln!(t, "devices_dir: {}", dir.join("devices").display())?;
    writeln!(
        t,
        "mqtt: {{listen: 127.0.0.1:{}, listen_v5: 127.0.0.1:{}}}",
        ports[0], ports[1]
    )?;
    writeln!(t, "http: {{listen: 127.0.0.1:{}}}", ports[2])?;
    writeln!(t, "bridge:")?;
    writeln!(t, "  url: mqtt://{proxy}")?;
    writeln!(t, "  topic_prefix: {PREFIX}")?;
    writeln!(
        t,
        "  up: [{{filter: dt/+/telemetry}}, {{filter: dt/+/status, retain: true}}]"
    )?;
    writeln!(t, "  max_inflight_messages: {window}")?;
    writeln!(t, "  replay_max_msgs_per_s: {replay_rate}")?;
    writeln!(t, "  reconnect: {{initial_ms: 100, max_ms: 1000}}")?;
    if let Some(b) = v.batch {
        writeln!(t, "  batch: {b}")?;
    }
    if v.v5 {
        writeln!(t, "  protocol: v5")?;
    }
    std::fs::write(&conf, t)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--config").arg(&conf);
    cmd.env("EDGETWIN_LOG", "warn");
    let mut child = ChildGuard::spawn("edgetwin", cmd, &dir.join("edgetwin.log"))?;
    let mqtt = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let http = SocketAddr::from(([127, 0, 0, 1], ports[2]));
    procs::wait_ready(&mut child, http, Duration::from_secs(30))?;
    procs::wait_tcp(&mut child, mqtt, Duration::from_secs(10))?;
    Ok((child, mqtt, http))
}

fn start_mosquitto_bridge(
    bin: &Path,
    dir: &Path,
    proxy: SocketAddr,
    window: u16,
) -> Result<(ChildGuard, SocketAddr)> {
    let port = procs::free_ports(1)?[0];
    let conf = dir.join("edge-mosquitto.conf");
    let mut t = String::new();
    writeln!(t, "listener {port} 127.0.0.1")?;
    writeln!(t, "allow_anonymous true")?;
    writeln!(t, "persistence false")?;
    writeln!(t, "set_tcp_nodelay true")?;
    writeln!(t, "max_inflight_messages {window}")?;
    writeln!(t, "max_queued_messages {}", QUEUES.max_queued)?;
    writeln!(t, "log_dest stderr")?;
    writeln!(t, "log_type error")?;
    writeln!(t, "connection cloud")?;
    writeln!(t, "address {proxy}")?;
    writeln!(t, "clientid bench-edge-bridge")?;
    writeln!(t, "cleansession false")?;
    writeln!(t, "try_private false")?;
    writeln!(t, "bridge_protocol_version mqttv311")?;
    writeln!(t, "restart_timeout 1")?;
    writeln!(t, "topic dt/+/telemetry out 1 \"\" {PREFIX}")?;
    writeln!(t, "topic dt/+/status out 1 \"\" {PREFIX}")?;
    std::fs::write(&conf, t)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let mut child = ChildGuard::spawn("edge-mosquitto", cmd, &dir.join("edge-mosquitto.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    procs::wait_tcp(&mut child, addr, Duration::from_secs(10))?;
    Ok((child, addr))
}

/// One run: an edge (edgetwin with a `bridge.batch` setting, or Mosquitto's bridge) and what
/// is measured through it.
struct Variant {
    name: &'static str,
    edgetwin: bool,
    /// edgetwin's `bridge.batch` (flow YAML), `None` = off.
    batch: Option<&'static str>,
    /// edgetwin's `bridge.protocol` is `v5`.
    v5: bool,
    drain: bool,
    corpus: bool,
}

/// The runs, in order. The corpus is published as fast as the edge takes it, so a batch's size
/// is set by `max_messages`: 10 and 60 are what a 10 s and a 60 s interval hold at the meter's
/// 1 s cadence (the interval itself is longer than the run, so it never splits a batch).
const VARIANTS: &[Variant] = &[
    Variant {
        name: "edgetwin",
        edgetwin: true,
        batch: None,
        v5: false,
        drain: true,
        corpus: true,
    },
    Variant {
        name: "edgetwin batched (defaults)",
        edgetwin: true,
        batch: Some("{}"),
        v5: false,
        drain: true,
        corpus: false,
    },
    Variant {
        name: "edgetwin over MQTT 5",
        edgetwin: true,
        batch: None,
        v5: true,
        drain: true,
        corpus: false,
    },
    Variant {
        name: "edgetwin batched over MQTT 5",
        edgetwin: true,
        batch: Some("{}"),
        v5: true,
        drain: true,
        corpus: false,
    },
    Variant {
        name: "edgetwin batched, 10 s at 1 s",
        edgetwin: true,
        batch: Some("{max_messages: 10, interval_ms: 600000}"),
        v5: false,
        drain: false,
        corpus: true,
    },
    Variant {
        name: "edgetwin batched, 60 s at 1 s",
        edgetwin: true,
        batch: Some("{max_messages: 60, interval_ms: 600000}"),
        v5: false,
        drain: false,
        corpus: true,
    },
    Variant {
        name: "mosquitto-bridge",
        edgetwin: false,
        batch: None,
        v5: false,
        drain: true,
        corpus: true,
    },
];

struct Outcome {
    system: &'static str,
    drain: Option<Drain>,
    /// Upstream bytes per corpus point (MQTT framing included).
    corpus_bytes_per_point: Option<f64>,
}

struct Drain {
    to_first: Duration,
    /// From publishing a status message a tenth into the drain to its arrival at the cloud.
    live_latency: Option<Duration>,
    took: Duration,
    duplicates: usize,
    up_bytes_per_msg: f64,
}

async fn run_one(
    v: &Variant,
    args: &Args,
    mosquitto_bin: &Path,
    edgetwin_bin: Option<&Path>,
) -> Result<Outcome> {
    let which = v.name;
    let dir = tempfile::tempdir()?;
    let cloud = procs::Mosquitto::start(mosquitto_bin, dir.path(), QUEUES)?;
    let proxy = Proxy::start(cloud.addr).await?;
    let (arrivals, sub_task) = cloud_subscriber(cloud.addr).await?;
    let (edge, edge_addr) = if v.edgetwin {
        let bin = edgetwin_bin.context("no edgetwin binary")?;
        let (child, mqtt, http) = start_edgetwin(bin, dir.path(), proxy.addr, args, v)?;
        (
            Edge::Edgetwin {
                _child: child,
                http,
            },
            mqtt,
        )
    } else {
        let (child, addr) =
            start_mosquitto_bridge(mosquitto_bin, dir.path(), proxy.addr, args.window)?;
        (Edge::Mosquitto { _child: child }, addr)
    };
    // Bridge up first.
    match &edge {
        Edge::Edgetwin { http, .. } => {
            wait_metric(*http, "edgetwin_bridge_connected", |v| v == 1.0).await?
        }
        Edge::Mosquitto { .. } => {
            let deadline = Instant::now() + Duration::from_secs(20);
            while proxy.accepted.load(Ordering::SeqCst) == 0 {
                if Instant::now() > deadline {
                    bail!("mosquitto bridge never connected");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let drain = if v.drain {
        Some(drain_after_outage(which, args, &proxy, &edge, edge_addr, &arrivals).await?)
    } else {
        None
    };
    let corpus_bytes_per_point = if v.corpus && !args.no_corpus {
        let lines: Vec<(String, String)> = CORPUS
            .lines()
            .map(|l| (CORPUS_TOPIC.to_string(), l.to_string()))
            .collect();
        let points = lines.len();
        let before = arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len();
        proxy.up_bytes.store(0, Ordering::SeqCst);
        publish_all(edge_addr, lines).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len()
            < before + points
        {
            if Instant::now() > deadline {
                bail!("{which}: the corpus did not all arrive");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some(proxy.up_bytes.load(Ordering::SeqCst) as f64 / points as f64)
    } else {
        None
    };
    sub_task.abort();
    drop(edge);
    drop(cloud);
    Ok(Outcome {
        system: which,
        drain,
        corpus_bytes_per_point,
    })
}

/// Cuts the link, queues `args.messages` at the edge, heals it and times the drain.
async fn drain_after_outage(
    which: &str,
    args: &Args,
    proxy: &Proxy,
    edge: &Edge,
    edge_addr: SocketAddr,
    arrivals: &Mutex<Arrivals>,
) -> Result<Drain> {
    proxy.cut();
    match edge {
        Edge::Edgetwin { http, .. } => {
            wait_metric(*http, "edgetwin_bridge_connected", |v| v == 0.0).await?
        }
        Edge::Mosquitto { .. } => tokio::time::sleep(Duration::from_millis(500)).await,
    }
    let n = args.messages;
    let payloads = (0..n as u64)
        .map(|i| (format!("dt/dev-{}/telemetry", i % 10), one_point(i)))
        .collect();
    publish_all(edge_addr, payloads).await?;
    if let Edge::Edgetwin { http, .. } = edge {
        wait_metric(*http, "edgetwin_outbox_records", |v| v >= n as f64).await?;
    }
    proxy.up_bytes.store(0, Ordering::SeqCst);
    let healed = Instant::now();
    proxy.heal();
    let deadline = healed + Duration::from_secs(600);
    let mut live_sent: Option<Instant> = None;
    loop {
        let got = arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len();
        if got >= n {
            break;
        }
        // A live message in the middle of the drain: how long does it wait behind the backlog?
        if live_sent.is_none() && got >= n / 10 {
            live_sent = Some(Instant::now());
            publish_one(
                edge_addr,
                "dt/dev-0/status",
                r#"{"state":"online","ts":1,"message":"bench-live"}"#,
            )
            .await?;
        }
        if Instant::now() > deadline {
            bail!("{which}: only {got} of {n} messages reached the cloud within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (to_first, took, duplicates) = {
        let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let first = a.first.context("no arrival")?;
        let last = a.last.context("no arrival")?;
        (
            first.saturating_duration_since(healed),
            last - first,
            a.duplicates,
        )
    };
    let live_deadline = Instant::now() + Duration::from_secs(30);
    let live_latency = loop {
        let at = arrivals.lock().unwrap_or_else(|e| e.into_inner()).live_at;
        match (at, live_sent) {
            (Some(at), Some(sent)) => break Some(at.saturating_duration_since(sent)),
            (_, None) => break None,
            _ if Instant::now() > live_deadline => break None,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    // Let PUBACK-side traffic settle before reading the byte counter.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let up_bytes_per_msg = proxy.up_bytes.load(Ordering::SeqCst) as f64 / n as f64;
    Ok(Drain {
        to_first,
        live_latency,
        took,
        duplicates,
        up_bytes_per_msg,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mosquitto = procs::find_mosquitto(args.mosquitto.as_deref());
    let edgetwin = procs::find_edgetwin(args.edgetwin.as_deref());
    if let Err(e) = &edgetwin {
        eprintln!("note: {e:#}; measuring Mosquitto's bridge only");
    }
    let mut outcomes = Vec::new();
    for v in VARIANTS {
        let bin = match (&edgetwin, v.edgetwin) {
            (Err(_), true) => continue,
            (Ok(b), true) => Some(b.as_path()),
            (_, false) => None,
        };
        outcomes.push(run_one(v, &args, &mosquitto, bin).await?);
    }

    let n = args.messages;
    println!(
        "bridge drain after an outage: {n} QoS 1 telemetry messages (~{} B payload) published at the edge while the link was cut",
        one_point(12345).len()
    );
    println!("edge -> TCP proxy -> cloud Mosquitto -> subscriber (QoS 1); all on 127.0.0.1");
    println!("{}", QUEUES.describe());
    println!(
        "edgetwin bridge: max_inflight_messages {}, replay_max_msgs_per_s {} (0 = unpaced), durable outbox (fsync per append batch and per ack batch)",
        args.window,
        args.replay_rate
    );
    println!("mosquitto bridge: in-memory queue (persistence false), cleansession false, restart_timeout 1 s\n");
    let mut t = Table::new(&[
        "system",
        "heal -> first msg",
        "drain time",
        "drain rate",
        "vs mosquitto-bridge",
        "live msg during drain",
        "dup",
        "upstream B/msg",
    ]);
    let rate = |d: &Drain| n as f64 / d.took.as_secs_f64().max(1e-9);
    let mosquitto_rate = outcomes
        .iter()
        .find(|o| o.system == "mosquitto-bridge")
        .and_then(|o| o.drain.as_ref())
        .map(rate);
    for o in &outcomes {
        let Some(d) = &o.drain else { continue };
        t.row(vec![
            o.system.to_string(),
            format!("{:.0} ms", d.to_first.as_secs_f64() * 1000.0),
            format!("{:.0} ms", d.took.as_secs_f64() * 1000.0),
            format!("{:.0} msg/s", rate(d)),
            mosquitto_rate.map_or("-".into(), |m| ratio(rate(d), m)),
            d.live_latency.map_or("-".to_string(), |l| {
                format!("{:.0} ms", l.as_secs_f64() * 1000.0)
            }),
            d.duplicates.to_string(),
            format!("{:.1}", d.up_bytes_per_msg),
        ]);
    }
    print!("{}", t.render());
    if args.no_corpus {
        return Ok(());
    }
    let points = CORPUS.lines().count();
    println!(
        "\nupstream bytes per telemetry point (bridge -> cloud, MQTT framing included): {points} messages of benches/data/meter-telemetry.jsonl (a meter's 20 properties, 1 s apart, ~{} B each)",
        CORPUS.len() / points.max(1)
    );
    let mut b = Table::new(&["system", "B/point", "vs mosquitto-bridge"]);
    let base = outcomes
        .iter()
        .find(|o| o.system == "mosquitto-bridge")
        .and_then(|o| o.corpus_bytes_per_point);
    for o in &outcomes {
        let Some(v) = o.corpus_bytes_per_point else {
            continue;
        };
        b.row(vec![
            o.system.to_string(),
            format!("{v:.1}"),
            base.map_or("-".into(), |m| ratio(v, m)),
        ]);
    }
    print!("{}", b.render());
    Ok(())
}
