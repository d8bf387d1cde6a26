//! `fleet-bench`: many real bridges against one cloud broker. Each simulated node is the real
//! `edgetwin-bridge` with its own durable outbox (two redb files) and its own cloud connection,
//! all in this one process; the node around it is simulated: it sends telemetry through the
//! bridge's intake (appended durably, as the node's front door does) and answers every desired
//! patch from the cloud with a `desired/result`. A cloud-side observer (a plain MQTT client at
//! the cloud Mosquitto) counts presence, telemetry and answers, and sends desired patches to
//! random nodes, timing each answer.
//!
//! Reported: time until every node is online at the cloud, telemetry offered vs delivered,
//! command round trips (cloud → node → cloud), and the cloud broker's CPU and RSS over time
//! beside this process's (whose RSS divided by the node count is the cost of one bridge).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use edgetwin_benches::procs::{self, MosquittoQueues, RssSampler};
use edgetwin_benches::stats::{ms, Summary};
use edgetwin_benches::table::Table;
use edgetwin_bridge::{BridgeConfig, BridgeMetrics, Tap};
use edgetwin_broker::{EmbeddedBroker, LocalClient, MqttConfig};
use rand::Rng;
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Many bridges, one cloud broker.
#[derive(Parser)]
struct Args {
    /// Simulated nodes (one bridge each).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// How long telemetry flows once every node is online, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Telemetry interval per node, milliseconds.
    #[arg(long, default_value_t = 1000)]
    telemetry_ms: u64,
    /// Desired patches sent from the cloud to random nodes during the run.
    #[arg(long, default_value_t = 200)]
    commands: usize,
    /// The Mosquitto binary (default: /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// An already running cloud broker, `host:port` (e.g. one node of an EMQX, HiveMQ or
    /// VerneMQ cluster; anonymous MQTT 3.1.1), instead of a Mosquitto started here. Its CPU and
    /// RSS are then not measured.
    #[arg(long)]
    cloud: Option<std::net::SocketAddr>,
    /// The topic root of the simulated nodes (`{root}sim-N/`); benches sharing a cluster need
    /// different roots.
    #[arg(long, default_value = "fleet/")]
    root: String,
    /// Full nodes (`edgetwin serve` processes, one device each) beside the simulated ones, each
    /// sent a tenth of the desired patches' share.
    #[arg(long, default_value_t = 3)]
    full_nodes: usize,
    /// The edgetwin binary for the full nodes (default: next to this program).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
}

/// Starts full node `full-{i}`: the real daemon with one profile device (`bench-0`), bridged to
/// the cloud under `{root}full-{i}/` with the default routes.
fn start_full_node(
    i: usize,
    bin: &std::path::Path,
    dir: &std::path::Path,
    root: &str,
    cloud: std::net::SocketAddr,
) -> Result<procs::ChildGuard> {
    use std::fmt::Write as _;
    let node = format!("full-{i}");
    let base = dir.join(&node);
    let devices = base.join("devices");
    std::fs::create_dir_all(&devices)?;
    std::fs::write(devices.join("bench.yaml"), procs::thermostat_profile(1))?;
    let ports = procs::free_ports(3)?;
    let mut t = String::new();
    writeln!(t, "node_id: {node}")?;
    writeln!(t, "data_dir: {}", base.join("data").display())?;
    writeln!(t, "devices_dir: {}", devices.display())?;
    writeln!(
        t,
        "mqtt: {{listen: 127.0.0.1:{}, listen_v5: 127.0.0.1:{}}}",
        ports[0], ports[1]
    )?;
    writeln!(t, "http: {{listen: 127.0.0.1:{}}}", ports[2])?;
    writeln!(
        t,
        "bridge: {{url: mqtt://{cloud}, topic_prefix: {root}{node}/}}"
    )?;
    let conf = base.join("edgetwin.yaml");
    std::fs::write(&conf, t)?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("serve").arg("--config").arg(&conf);
    cmd.env("EDGETWIN_LOG", "warn");
    let mut child = procs::ChildGuard::spawn(&node, cmd, &base.join("edgetwin.log"))?;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], ports[2]));
    procs::wait_ready(&mut child, http, Duration::from_secs(30))?;
    Ok(child)
}

const UP: [&str; 2] = ["dt/+/telemetry", "dt/+/desired/result"];

/// What the cloud-side observer saw.
#[derive(Default)]
struct Seen {
    online: HashSet<String>,
    telemetry: usize,
    answers: HashMap<String, Instant>,
}

async fn observer(
    root: String,
    cloud: std::net::SocketAddr,
    seen: Arc<Mutex<Seen>>,
) -> Result<rumqttc::AsyncClient> {
    let (client, mut el) = edgetwin_benches::loadgen::connect("fleet-observer", cloud, 100).await?;
    edgetwin_benches::loadgen::subscribe(
        &client,
        &mut el,
        &[
            &format!("{root}+/node/status"),
            &format!("{root}+/dt/+/desired/result"),
            &format!("{root}+/dt/+/telemetry"),
        ],
        QoS::AtLeastOnce,
    )
    .await?;
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if p.topic.ends_with("/telemetry") {
                        s.telemetry += 1;
                    } else if p.topic.ends_with("/node/status") {
                        let node = p.topic[root.len()..]
                            .split('/')
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let v: serde_json::Value =
                            serde_json::from_slice(&p.payload).unwrap_or_default();
                        if v["state"] == "online" {
                            s.online.insert(node);
                        } else {
                            s.online.remove(&node);
                        }
                    } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        if let Some(id) = v["id"].as_str() {
                            s.answers.entry(id.to_string()).or_insert(now);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok(client)
}

/// One simulated node: its bridge, its telemetry, its answers.
/// What every simulated node shares.
struct World<'a> {
    root: &'a str,
    cloud: std::net::SocketAddr,
    broker: &'a EmbeddedBroker,
    data: &'a std::path::Path,
    telemetry: Duration,
    stop: CancellationToken,
    tracker: &'a TaskTracker,
    offered: Arc<AtomicUsize>,
}

async fn start_node(i: usize, w: &World<'_>) -> Result<()> {
    let node = format!("sim-{i}");
    let cfg: BridgeConfig = serde_json::from_value(serde_json::json!({
        "url": format!("mqtt://{}", w.cloud),
        "topic_prefix": format!("{}{node}/", w.root),
        "client_id": node,
        "keep_alive_s": 30,
        "reconnect": {"initial_ms": 200, "max_ms": 5000},
        "up": UP.iter().map(|f| serde_json::json!({"filter": f})).collect::<Vec<_>>(),
    }))?;
    let dir = w.data.join(&node);
    std::fs::create_dir_all(&dir)?;
    // The tap's link: nothing is published on the shared router, everything comes through the
    // intake (as a node's front door hands clients' messages over).
    let name: &'static str = Box::leak(format!("tap-{i}").into_boxed_str());
    let tap_stop = CancellationToken::new();
    let (client, messages) =
        LocalClient::connect(w.broker, name, &UP, 16, tap_stop.clone(), w.tracker).await?;
    let tap = Tap {
        client,
        messages,
        stop: tap_stop,
    };
    let (mut bridge, mut inbound) = edgetwin_bridge::start(
        &cfg,
        &node,
        &dir,
        tap,
        Arc::new(BridgeMetrics::default()),
        Box::new(|_| {}),
    )?;
    bridge.connect();
    bridge.health_feed().set(Bytes::from(
        serde_json::json!({"ready": true, "devices": {"online": 1}}).to_string(),
    ));
    let intake = bridge.intake();
    let (telemetry, stop, offered) = (w.telemetry, w.stop.clone(), w.offered.clone());
    w.tracker.spawn(async move {
        let mut tick = tokio::time::interval(telemetry);
        // Nodes do not all tick in the same millisecond.
        tick.reset_after(telemetry.mul_f64(rand::random::<f64>()));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                m = inbound.recv() => {
                    let Some(m) = m else { break };
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                    let id = v["$id"].as_str().unwrap_or_default().to_string();
                    let answer = serde_json::json!({"id": id, "result": "applied", "version": 1});
                    if let Some(done) = intake.submit("dt/dev/desired/result", Bytes::from(answer.to_string())).await {
                        let _ = done.await;
                    }
                    let _ = m.done.send(());
                }
                _ = tick.tick() => {
                    n += 1;
                    let p = format!(r#"{{"ts":{n},"values":{{"power":{}}}}}"#, 1000 + n % 50);
                    if let Some(done) = intake.submit("dt/dev/telemetry", Bytes::from(p)).await {
                        if matches!(done.await, Ok(Ok(()))) {
                            offered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        bridge.shutdown().await;
    });
    Ok(())
}

/// `p50 / p99 / max` of round trips.
fn percentiles(s: &Summary) -> String {
    format!(
        "{} / {} / {}",
        ms(s.p50, s.count),
        ms(s.p99, s.count),
        ms(s.max, s.count)
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = args
        .mosquitto
        .clone()
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
    let dir = tempfile::tempdir()?;
    let local = match args.cloud {
        Some(_) => None,
        None => Some(procs::Mosquitto::start(
            &bin,
            dir.path(),
            MosquittoQueues {
                max_inflight: 100,
                max_queued: 1_000_000,
            },
        )?),
    };
    let cloud_addr = match (&local, args.cloud) {
        (Some(m), _) => m.addr,
        (None, Some(a)) => a,
        (None, None) => bail!("no cloud broker"),
    };
    let cloud_pid = local.as_ref().map(|m| m.child.pid());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let observer = observer(args.root.clone(), cloud_addr, seen.clone()).await?;
    let offered = Arc::new(AtomicUsize::new(0));
    let cloud_rss =
        cloud_pid.map(|pid| RssSampler::start(pid, Duration::from_secs(1), offered.clone()));
    let own_rss = RssSampler::start(std::process::id(), Duration::from_secs(1), offered.clone());

    let filters: Vec<String> = UP.iter().map(|f| f.to_string()).collect();
    let broker = EmbeddedBroker::start_router(&MqttConfig::default(), &filters);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let world = World {
        root: &args.root,
        cloud: cloud_addr,
        broker: &broker,
        data: dir.path(),
        telemetry: Duration::from_millis(args.telemetry_ms),
        stop: stop.clone(),
        tracker: &tracker,
        offered: offered.clone(),
    };
    let started = Instant::now();
    let full_bin = if args.full_nodes > 0 {
        Some(procs::find_edgetwin(args.edgetwin.as_deref())?)
    } else {
        None
    };
    let mut full = Vec::new();
    for i in 0..args.full_nodes {
        let bin = full_bin.as_deref().context("no edgetwin binary")?;
        full.push(
            start_full_node(i, bin, dir.path(), &args.root, cloud_addr)
                .with_context(|| format!("full node {i}"))?,
        );
    }
    for i in 0..args.nodes {
        start_node(i, &world)
            .await
            .with_context(|| format!("node {i}"))?;
    }
    let started_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let online = seen.lock().unwrap_or_else(|e| e.into_inner()).online.len();
        if online >= args.nodes + args.full_nodes {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {online} of {} nodes online at the cloud after 300 s",
                args.nodes + args.full_nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_online = started.elapsed();

    // The run: telemetry flows; desired patches go to random nodes, evenly spread.
    let run = Duration::from_secs(args.seconds);
    let (offered0, delivered0) = (
        offered.load(Ordering::Relaxed),
        seen.lock().unwrap_or_else(|e| e.into_inner()).telemetry,
    );
    let run_start = Instant::now();
    let cpu0 = cloud_pid.map(procs::cpu_secs).transpose()?;
    let mut sent: Vec<(String, Instant)> = Vec::with_capacity(args.commands);
    let mut sent_full: Vec<(String, Instant)> = Vec::new();
    for k in 0..args.commands {
        let at = run_start + run.mul_f64(k as f64 / args.commands.max(1) as f64);
        tokio::time::sleep_until(at.into()).await;
        let id = format!("k-{k}");
        let patch = serde_json::json!({"$id": id, "setpoint": k});
        // Every tenth patch goes to a full node (its twin service answers it after the commit).
        let (topic, log) = if args.full_nodes > 0 && k % 10 == 0 {
            let f = (k / 10) % args.full_nodes;
            (
                format!("{}full-{f}/dt/bench-0/desired", args.root),
                &mut sent_full,
            )
        } else {
            let node = rand::rng().random_range(0..args.nodes);
            (format!("{}sim-{node}/dt/dev/desired", args.root), &mut sent)
        };
        observer
            .publish(topic, QoS::AtLeastOnce, false, patch.to_string())
            .await?;
        log.push((id, Instant::now()));
    }
    tokio::time::sleep_until((run_start + run).into()).await;
    let cpu = match (cloud_pid, cpu0) {
        (Some(pid), Some(c0)) => Some(procs::cpu_secs(pid)? - c0),
        _ => None,
    };
    let (offered1, delivered1) = (
        offered.load(Ordering::Relaxed),
        seen.lock().unwrap_or_else(|e| e.into_inner()).telemetry,
    );
    // Answers still on their way get 10 s.
    let answer_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            sent.iter()
                .chain(sent_full.iter())
                .filter(|(id, _)| s.answers.contains_key(id))
                .count()
        };
        if n == sent.len() + sent_full.len() || Instant::now() > answer_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rtts = |sent: &[(String, Instant)]| {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u64> = sent
            .iter()
            .filter_map(|(id, at)| {
                s.answers
                    .get(id)
                    .map(|t| t.saturating_duration_since(*at).as_nanos() as u64)
            })
            .collect();
        Summary::from_nanos(&mut v)
    };
    let rtt = rtts(&sent);
    let rtt_full = rtts(&sent_full);
    // Full nodes still online at the end (their presence at the cloud).
    let full_online = {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        (0..args.full_nodes)
            .filter(|i| s.online.contains(&format!("full-{i}")))
            .count()
    };
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    let cloud_samples = cloud_rss.map(|s| s.finish()).unwrap_or_default();
    let own_samples = own_rss.finish();

    let secs = run.as_secs_f64();
    println!(
        "fleet: {} bridges (edgetwin-bridge, durable outboxes) in one process and {} full nodes (edgetwin serve) -> one Mosquitto (cloud), all on 127.0.0.1",
        args.nodes, args.full_nodes
    );
    println!(
        "each node: telemetry every {} ms through the bridge's intake, answers desired patches; the cloud sends {} patches to random nodes over {} s\n",
        args.telemetry_ms, args.commands, args.seconds
    );
    let mut t = Table::new(&["measure", "value"]);
    t.row(vec![
        "bridges started".into(),
        format!("{:.1} s", started_in.as_secs_f64()),
    ]);
    t.row(vec![
        "every node online at the cloud".into(),
        format!("{:.1} s after the first start", all_online.as_secs_f64()),
    ]);
    t.row(vec![
        "telemetry offered".into(),
        format!("{:.0} msg/s", (offered1 - offered0) as f64 / secs),
    ]);
    t.row(vec![
        "telemetry delivered at the cloud".into(),
        format!("{:.0} msg/s", (delivered1 - delivered0) as f64 / secs),
    ]);
    t.row(vec![
        "desired patches answered".into(),
        format!("{} of {}", rtt.count, sent.len()),
    ]);
    t.row(vec!["round trip p50 / p99 / max".into(), percentiles(&rtt)]);
    if args.full_nodes > 0 {
        t.row(vec![
            "full nodes (edgetwin serve) online at the end".into(),
            format!("{full_online} of {}", args.full_nodes),
        ]);
        t.row(vec![
            "desired patches to full nodes answered".into(),
            format!("{} of {}", rtt_full.count, sent_full.len()),
        ]);
        t.row(vec![
            "full-node round trip p50 / p99 / max".into(),
            percentiles(&rtt_full),
        ]);
    }
    t.row(vec![
        "cloud Mosquitto CPU".into(),
        cpu.map_or("- (external broker)".into(), |c| {
            format!("{:.0} % of one core", c / secs * 100.0)
        }),
    ]);
    let last = |v: &[procs::RssSample]| v.last().map_or(0, |s| s.rss_kib);
    let peak = |v: &[procs::RssSample]| v.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    t.row(vec![
        "cloud Mosquitto RSS (end / peak)".into(),
        if cloud_samples.is_empty() {
            "- (external broker)".into()
        } else {
            format!(
                "{} / {}",
                procs::mib(last(&cloud_samples)),
                procs::mib(peak(&cloud_samples))
            )
        },
    ]);
    t.row(vec![
        "this process RSS (end / peak)".into(),
        format!(
            "{} / {}",
            procs::mib(last(&own_samples)),
            procs::mib(peak(&own_samples))
        ),
    ]);
    t.row(vec![
        "per bridge (this process's peak / nodes)".into(),
        format!("{:.0} KiB", peak(&own_samples) as f64 / args.nodes as f64),
    ]);
    print!("{}", t.render());
    println!("\nRSS over time (s: cloud Mosquitto, this process):");
    for (i, o) in own_samples.iter().enumerate().step_by(5) {
        let c = cloud_samples
            .get(i)
            .map_or("-".to_string(), |c| procs::mib(c.rss_kib));
        println!("  {:>5.0}: {c:>10} {:>10}", o.secs, procs::mib(o.rss_kib));
    }
    drop(full);
    drop(broker);
    Ok(())
}
