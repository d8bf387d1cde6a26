//! `mem-bench`: memory over time, idle memory per device and start-up time of `edgetwin serve`
//! (the node under test, and optionally a `--baseline` build of it) beside Mosquitto, in one run.
//!
//! Subcommands:
//! - `rss`: resident memory (`VmRSS`, sampled every `--sample-ms`) and CPU time while pushing
//!   `--messages` messages through each broker: `twin` load (desired patches at QoS 1 to
//!   `--devices` registered devices, closed loop, one outstanding per device; Mosquitto gets the
//!   same publishes, retained, and a subscriber on them) and `plain` load (QoS 0 messages of 64
//!   bytes to one topic with one subscriber, paced at `--rate`). Prints the curve at every 10 % of
//!   the run, growth over the last half and peak RSS.
//! - `idle`: with N registered devices (N/100 profile files): first start, status of every device
//!   published retained (as mappers do), graceful stop, restart on the twins on disk; time to
//!   `/readyz` 200 and to the retained `dt/bench-{N-1}/twin`, then idle `VmRSS`. Mosquitto holds
//!   the same retained set (the node's own twin document, mapper assignment and status payloads,
//!   per device) with `persistence true`, restarts on it, and the time to its first retained
//!   message is measured. Per-device cost is the RSS over that of the same broker with 0 devices.
//! - `startup`: `edgetwin serve` with N devices in ONE profile file (time to `/readyz` and to the
//!   last twin), and `edgetwin device apply` of such a file to a running node, for each size.
//!
//! Every broker binds 127.0.0.1 on free ports and is killed on exit; every wait is bounded.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use edgetwin_benches::loadgen::{self, PubSubSpec};
use edgetwin_benches::procs::{
    self, ChildGuard, Edgetwin, Mosquitto, MosquittoQueues, RssSample, RssSampler,
};
use edgetwin_benches::stats::{ms, ratio, Summary};
use edgetwin_benches::table::Table;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "RSS over time, idle RSS per device and start-up time: edgetwin vs Mosquitto")]
struct Args {
    /// The edgetwin binary under test (default: `edgetwin` next to this program).
    #[arg(long, global = true)]
    edgetwin: Option<PathBuf>,
    /// A second edgetwin binary (e.g. a build of the previous main) measured in the same run,
    /// labelled `baseline`.
    #[arg(long, global = true)]
    baseline: Option<PathBuf>,
    /// The mosquitto binary (default /usr/sbin/mosquitto).
    #[arg(long, global = true)]
    mosquitto: Option<PathBuf>,
    /// Skip Mosquitto.
    #[arg(long, global = true)]
    skip_mosquitto: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// RSS over time under load (twin patches and/or plain messages).
    Rss(RssArgs),
    /// Idle RSS per registered device and restart time with the twins on disk.
    Idle(IdleArgs),
    /// `edgetwin serve` with N devices in one file, and `edgetwin device apply` of such a file.
    Startup(StartupArgs),
}

#[derive(Parser, Debug)]
struct RssArgs {
    /// Loads to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "twin,plain")]
    loads: Vec<Load>,
    /// Messages (patches) per broker and load.
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Registered devices for the twin load.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Rate of the plain load in msg/s (0: flat out). The twin load is a closed loop.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// RSS sample interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
    /// Hard limit per broker and load, in seconds.
    #[arg(long, default_value_t = 600)]
    deadline_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Load {
    Twin,
    Plain,
}

#[derive(Parser, Debug)]
struct IdleArgs {
    /// Registered device counts (0 is always measured as the reference).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    devices: Vec<usize>,
    /// Devices per profile file.
    #[arg(long, default_value_t = 100)]
    per_file: usize,
    /// Seconds to wait after the last publish before reading the idle RSS.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Limit on every wait for serving, in seconds.
    #[arg(long, default_value_t = 300)]
    max_secs: u64,
}

#[derive(Parser, Debug)]
struct StartupArgs {
    /// Device counts, smallest first.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    sizes: Vec<usize>,
    /// A case that takes longer than this (seconds) is stopped and not run at larger sizes.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
}

/// `mqtt:` lines added to every node config: big enough for a 10k-device apply request.
const MQTT_EXTRA: &[&str] = &["max_payload_bytes: 33554432"];

const QUEUES: MosquittoQueues = MosquittoQueues {
    max_inflight: 100,
    max_queued: 1_000_000,
};

/// The nodes to measure: ("edgetwin", path) and optionally ("baseline", path).
fn nodes(args: &Args) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut v = vec![("edgetwin", procs::find_edgetwin(args.edgetwin.as_deref())?)];
    if let Some(b) = &args.baseline {
        v.push(("baseline", procs::find_edgetwin(Some(b))?));
    }
    Ok(v)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("edgetwin-mem-bench-")
        .tempdir()
        .context("temp dir")?;
    let nodes = nodes(&args)?;
    for (label, bin) in &nodes {
        println!("{label}: {}", bin.display());
    }
    let mosq = (!args.skip_mosquitto).then(|| procs::find_mosquitto(args.mosquitto.as_deref()));
    match &args.cmd {
        Cmd::Rss(a) => rss(a, &nodes, mosq.as_deref(), tmp.path()).await,
        Cmd::Idle(a) => idle(a, &nodes, mosq.as_deref(), tmp.path()).await,
        Cmd::Startup(a) => startup(a, &nodes, tmp.path()).await,
    }
}

// ---------------------------------------------------------------------------------------------
// rss

/// What one broker did under one load.
struct RssRun {
    broker: String,
    load: Load,
    samples: Vec<RssSample>,
    done: usize,
    secs: f64,
    cpu_secs: f64,
    peak_kib: u64,
    latency: Summary,
    note: String,
}

async fn rss(
    a: &RssArgs,
    nodes: &[(&'static str, PathBuf)],
    mosq: Option<&Path>,
    tmp: &Path,
) -> Result<()> {
    println!(
        "rss: {} messages per broker and load, {} devices (twin load), plain rate {}, sample every {} ms",
        a.messages,
        a.devices,
        if a.rate > 0.0 { format!("{} msg/s", a.rate) } else { "unlimited".into() },
        a.sample_ms
    );
    let mut runs = Vec::new();
    for &load in &a.loads {
        for (label, bin) in nodes {
            let dir = tmp.join(format!("rss-{label}-{load:?}"));
            std::fs::create_dir_all(&dir)?;
            let profiles = match load {
                Load::Twin => procs::thermostat_files(a.devices, 100),
                Load::Plain => vec![],
            };
            let refs: Vec<(&str, String)> = profiles
                .iter()
                .map(|(n, y)| (n.as_str(), y.clone()))
                .collect();
            let mut node =
                Edgetwin::start_with(bin, &dir, &refs, MQTT_EXTRA, Duration::from_secs(300))?;
            if load == Load::Twin {
                let last = format!("dt/bench-{}/twin", a.devices - 1);
                loadgen::first_message(node.mqtt, &last, Duration::from_secs(300)).await?;
            }
            let run = rss_one(a, load, label, node.mqtt, &mut node.child, true).await?;
            print_run(&run, a.messages);
            runs.push(run);
            node.child.stop();
        }
        if let Some(m) = mosq {
            let dir = tmp.join(format!("rss-mosquitto-{load:?}"));
            std::fs::create_dir_all(&dir)?;
            let mut b = Mosquitto::start(m, &dir, QUEUES)?;
            let run = rss_one(a, load, "mosquitto", b.addr, &mut b.child, false).await?;
            print_run(&run, a.messages);
            runs.push(run);
            b.child.stop();
        }
    }

    println!();
    for &load in &a.loads {
        let these: Vec<&RssRun> = runs.iter().filter(|r| r.load == load).collect();
        let mut headers = vec!["% of run".to_string()];
        headers.extend(these.iter().map(|r| format!("{} RSS", r.broker)));
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let mut t = Table::new(&h);
        for step in 0..=10 {
            let mut row = vec![format!("{}%", step * 10)];
            for r in &these {
                row.push(
                    at_fraction(&r.samples, step as f64 / 10.0)
                        .map_or("-".into(), |s| procs::mib(s.rss_kib)),
                );
            }
            t.row(row);
        }
        println!(
            "{} load, RSS curve (VmRSS at each 10% of the run's time):",
            load_name(load)
        );
        print!("{}", t.render());
        let mut t = Table::new(&[
            "broker",
            "load",
            "done",
            "secs",
            "rate /s",
            "RSS at 50%",
            "RSS at end",
            "growth last half",
            "peak RSS (VmHWM)",
            "CPU s / 1k msgs",
            "p50",
            "p99",
            "note",
        ]);
        for r in &these {
            let mid = at_fraction(&r.samples, 0.5).map_or(0, |s| s.rss_kib);
            let end = r.samples.last().map_or(0, |s| s.rss_kib);
            let growth = if mid > 0 {
                format!("{:+.1}%", (end as f64 - mid as f64) / mid as f64 * 100.0)
            } else {
                "-".into()
            };
            t.row(vec![
                r.broker.clone(),
                load_name(load).into(),
                r.done.to_string(),
                format!("{:.1}", r.secs),
                format!("{:.0}", r.done as f64 / r.secs.max(1e-9)),
                procs::mib(mid),
                procs::mib(end),
                growth,
                procs::mib(r.peak_kib),
                format!("{:.4}", r.cpu_secs / (r.done.max(1) as f64 / 1000.0)),
                ms(r.latency.p50, r.latency.count),
                ms(r.latency.p99, r.latency.count),
                r.note.clone(),
            ]);
        }
        print!("{}", t.render());
        println!();
    }
    println!("(growth last half = (RSS at end - RSS at 50%) / RSS at 50%; CPU = utime+stime of the broker process during the load; twin load latency = patch publish to its delta (node) or to the subscriber's copy (mosquitto))");
    println!("mosquitto settings: {}", QUEUES.describe());
    Ok(())
}

fn load_name(l: Load) -> &'static str {
    match l {
        Load::Twin => "twin patches QoS 1",
        Load::Plain => "plain 64 B QoS 0",
    }
}

/// The sample nearest to `f` of the run's duration.
fn at_fraction(samples: &[RssSample], f: f64) -> Option<RssSample> {
    let last = samples.last()?;
    let t = last.secs * f;
    samples
        .iter()
        .min_by(|a, b| {
            (a.secs - t)
                .abs()
                .partial_cmp(&(b.secs - t).abs())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .copied()
}

fn print_run(r: &RssRun, asked: usize) {
    println!(
        "  {} {}: {} of {} in {:.1}s, peak {}, CPU {:.1}s{}",
        r.broker,
        load_name(r.load),
        r.done,
        asked,
        r.secs,
        procs::mib(r.peak_kib),
        r.cpu_secs,
        if r.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.note)
        }
    );
}

async fn rss_one(
    a: &RssArgs,
    load: Load,
    broker: &str,
    addr: SocketAddr,
    child: &mut ChildGuard,
    is_node: bool,
) -> Result<RssRun> {
    let done = Arc::new(AtomicUsize::new(0));
    let cpu0 = child.cpu_secs()?;
    let sampler = RssSampler::start(
        child.pid(),
        Duration::from_millis(a.sample_ms),
        done.clone(),
    );
    let start = Instant::now();
    let deadline = Duration::from_secs(a.deadline_secs);
    let (n, latency, note) = match load {
        Load::Twin => {
            twin_load(addr, a.devices, a.messages, is_node, deadline, done.clone()).await?
        }
        Load::Plain => {
            let r = loadgen::run_pubsub(&PubSubSpec {
                addr,
                publishers: 1,
                messages: a.messages,
                payload: 64,
                qos: QoS::AtMostOnce,
                rate: (a.rate > 0.0).then_some(a.rate),
                prefix: "plain".into(),
                inflight: 100,
                deadline,
                drain_idle: Duration::from_secs(2),
            })
            .await?;
            done.store(r.received, Ordering::Relaxed);
            let mut note = format!("sent {}, lost {}", r.sent, r.lost());
            if r.timed_out {
                note.push_str(", deadline");
            }
            (r.received, r.latency, note)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let samples = sampler.finish();
    child.check_running()?;
    Ok(RssRun {
        broker: broker.to_string(),
        load,
        samples,
        done: n,
        secs,
        cpu_secs: child.cpu_secs()? - cpu0,
        peak_kib: child.peak_rss_kib()?,
        latency,
        note,
    })
}

/// Closed loop of desired patches, one outstanding per device, until `total` completed.
/// Completion is the node's delta carrying the patch's value (`is_node`), or the subscriber's
/// copy of the (retained) patch for Mosquitto.
async fn twin_load(
    addr: SocketAddr,
    devices: usize,
    total: usize,
    is_node: bool,
    deadline: Duration,
    done: Arc<AtomicUsize>,
) -> Result<(usize, Summary, String)> {
    let tag: u32 = rand::random();
    let (sub, mut sub_el) = loadgen::connect(&format!("mem-sub-{tag:08x}"), addr, 100).await?;
    let filters: &[&str] = if is_node {
        &["dt/+/delta", "dt/+/error"]
    } else {
        &["dt/+/desired"]
    };
    loadgen::subscribe(&sub, &mut sub_el, filters, QoS::AtLeastOnce).await?;
    // Patch id → (device, send time).
    let pending: Arc<Mutex<HashMap<u64, (usize, Instant)>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64)>();
    let sub_task = {
        let pending = pending.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        tokio::spawn(async move {
            loop {
                match sub_el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // The node's readiness canary asks for a reserved device every
                        // few seconds and always gets an error: not one of our patches.
                        if p.topic.starts_with("dt/edgetwin-canary/") {
                            continue;
                        }
                        if p.topic.ends_with("/error") {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = first_error.lock() {
                                if f.is_none() {
                                    let text = String::from_utf8_lossy(&p.payload);
                                    let text: String = text.chars().take(300).collect();
                                    *f = Some(format!("{}: {text}", p.topic));
                                }
                            }
                            continue;
                        }
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                            continue;
                        };
                        let ptr = if is_node {
                            "/delta/setpoint"
                        } else {
                            "/setpoint"
                        };
                        let Some(sp) = v.pointer(ptr).and_then(|s| s.as_f64()) else {
                            continue;
                        };
                        let id = sp.floor() as u64;
                        let hit = pending.lock().ok().and_then(|mut m| m.remove(&id));
                        if let Some((d, sent)) = hit {
                            let _ = tx.send((d, sent.elapsed().as_nanos() as u64));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err::<(), _>(anyhow::Error::new(e).context("subscriber")),
                }
            }
        })
    };
    let (publ, mut pub_el) = loadgen::client(&format!("mem-pub-{tag:08x}"), addr, 200);
    let pub_task = tokio::spawn(async move {
        loop {
            if let Err(e) = pub_el.poll().await {
                return Err::<(), _>(anyhow::Error::new(e).context("patch publisher"));
            }
        }
    });
    let result = async {
        let start = Instant::now();
        let end = start + deadline;
        let mut next_id: u64 = 1;
        let mut sent = 0usize;
        let mut completed = 0usize;
        let mut lat = Vec::with_capacity(total);
        let send = |d: usize, id: u64| {
            let body = format!("{{\"setpoint\": {id}.5}}");
            if let Ok(mut m) = pending.lock() {
                m.insert(id, (d, Instant::now()));
            }
            let topic = format!("dt/bench-{d}/desired");
            let publ = publ.clone();
            async move {
                publ.publish(topic, QoS::AtLeastOnce, !is_node, body)
                    .await
                    .context("publish patch")
            }
        };
        for d in 0..devices.min(total) {
            send(d, next_id).await?;
            next_id += 1;
            sent += 1;
        }
        let mut note = String::new();
        while completed < total {
            match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
                Ok(Some((d, ns))) => {
                    completed += 1;
                    done.store(completed, Ordering::Relaxed);
                    lat.push(ns);
                    if sent < total && Instant::now() < end {
                        send(d, next_id).await?;
                        next_id += 1;
                        sent += 1;
                    } else if sent == completed {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    note = format!(
                        "stalled: nothing completed for 15 s, {} pending",
                        sent - completed
                    );
                    break;
                }
            }
            if Instant::now() > end + Duration::from_secs(15) {
                note = "deadline".into();
                break;
            }
        }
        let e = errors.load(Ordering::Relaxed);
        if e > 0 {
            let first = first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            let _ = write!(
                note,
                "{}{e} error messages (first: {first})",
                if note.is_empty() { "" } else { "; " }
            );
        }
        Ok::<_, anyhow::Error>((completed, Summary::from_nanos(&mut lat), note))
    }
    .await;
    sub_task.abort();
    pub_task.abort();
    result
}

// ---------------------------------------------------------------------------------------------
// idle

/// Per-device retained payloads taken from the node, used for Mosquitto's retained set.
#[derive(Clone, Default)]
struct Payloads {
    twin: Vec<u8>,
    assignment: Vec<u8>,
    status: Vec<u8>,
}

impl Payloads {
    /// The retained set of device `i` (topic, payload), device name substituted.
    fn for_device(&self, i: usize) -> Vec<(String, Vec<u8>)> {
        let sub = |p: &[u8]| {
            String::from_utf8_lossy(p)
                .replace("bench-0\"", &format!("bench-{i}\""))
                .into_bytes()
        };
        vec![
            (format!("dt/bench-{i}/twin"), sub(&self.twin)),
            (
                format!("mappers/modbus/devices/bench-{i}"),
                sub(&self.assignment),
            ),
            (format!("dt/bench-{i}/status"), self.status.clone()),
        ]
    }
}

fn status_payload() -> Vec<u8> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{{\"state\":\"online\",\"ts\":{ts}}}").into_bytes()
}

/// One broker at one device count.
struct IdleRow {
    broker: String,
    devices: usize,
    first_start: Option<f64>,
    ready: Option<f64>,
    serving: f64,
    rss_kib: u64,
    smaps: Vec<(String, u64)>,
}

/// Polls until `topic` has a message on `addr` (retrying connects while the broker starts).
async fn wait_topic(
    child: &mut ChildGuard,
    addr: SocketAddr,
    topic: &str,
    limit: Instant,
) -> Result<Vec<u8>> {
    loop {
        child.check_running()?;
        let left = limit.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{topic} not readable in time; log tail:\n{}",
                child.log_tail()
            );
        }
        match loadgen::first_message(addr, topic, left.min(Duration::from_secs(30))).await {
            Ok(p) => return Ok(p),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls `/readyz` until 200 (bounded).
fn wait_readyz(child: &mut ChildGuard, http: SocketAddr, limit: Instant) -> Result<()> {
    wait_ready(child, http, limit.saturating_duration_since(Instant::now()))
}

fn wait_ready(child: &mut ChildGuard, http: SocketAddr, t: Duration) -> Result<()> {
    let deadline = Instant::now() + t;
    loop {
        child.check_running()?;
        if let Ok(200) = procs::http_status(http, "/readyz") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "/readyz not 200 after {t:?}; log tail:\n{}",
                child.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn idle_node(
    a: &IdleArgs,
    label: &str,
    bin: &Path,
    n: usize,
    tmp: &Path,
) -> Result<(IdleRow, Payloads)> {
    let dir = tmp.join(format!("idle-{label}-{n}"));
    std::fs::create_dir_all(&dir)?;
    let files = procs::thermostat_files(n, a.per_file);
    let refs: Vec<(&str, String)> = if n == 0 {
        vec![]
    } else {
        files.iter().map(|(f, y)| (f.as_str(), y.clone())).collect()
    };
    let max = Duration::from_secs(a.max_secs);
    let last = n.checked_sub(1).map(|l| format!("dt/bench-{l}/twin"));
    // First start: twins created.
    let t0 = Instant::now();
    let mut node = Edgetwin::spawn(bin, &dir, &refs, MQTT_EXTRA)?;
    wait_readyz(&mut node.child, node.http, t0 + max)?;
    if let Some(last) = &last {
        wait_topic(&mut node.child, node.mqtt, last, t0 + max).await?;
    }
    let first_start = t0.elapsed().as_secs_f64();
    let status: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("dt/bench-{i}/status"), status_payload()))
        .collect();
    loadgen::publish_retained(node.mqtt, status.clone(), max).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut payloads = Payloads::default();
    if n > 0 {
        payloads.twin = loadgen::first_message(node.mqtt, "dt/bench-0/twin", max).await?;
        payloads.assignment =
            loadgen::first_message(node.mqtt, "mappers/modbus/devices/bench-0", max).await?;
        payloads.status = loadgen::first_message(node.mqtt, "dt/bench-0/status", max).await?;
    }
    if !node.child.terminate(Duration::from_secs(30)) {
        println!("  note: {label} did not stop within 30 s of SIGTERM (killed)");
    }
    // Restart on the twins on disk.
    let t0 = Instant::now();
    let mut node = Edgetwin::spawn(bin, &dir, &[], MQTT_EXTRA)?;
    wait_readyz(&mut node.child, node.http, t0 + max)?;
    let ready = t0.elapsed().as_secs_f64();
    if let Some(last) = &last {
        wait_topic(&mut node.child, node.mqtt, last, t0 + max).await?;
    }
    let serving = t0.elapsed().as_secs_f64();
    // Mappers republish their status after a restart (the node's broker keeps retained messages
    // in memory only).
    loadgen::publish_retained(node.mqtt, status, max).await?;
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    node.child.check_running()?;
    let row = IdleRow {
        broker: label.to_string(),
        devices: n,
        first_start: Some(first_start),
        ready: Some(ready),
        serving,
        rss_kib: node.child.rss_kib()?,
        smaps: procs::smaps_summary(node.child.pid()).unwrap_or_default(),
    };
    node.child.terminate(Duration::from_secs(10));
    Ok((row, payloads))
}

async fn idle_mosquitto(
    a: &IdleArgs,
    bin: &Path,
    n: usize,
    payloads: &Payloads,
    tmp: &Path,
) -> Result<IdleRow> {
    let dir = tmp.join(format!("idle-mosquitto-{n}"));
    std::fs::create_dir_all(&dir)?;
    let max = Duration::from_secs(a.max_secs);
    let t0 = Instant::now();
    let mut m = Mosquitto::start_with(bin, &dir, QUEUES, true)?;
    let msgs: Vec<(String, Vec<u8>)> = (0..n).flat_map(|i| payloads.for_device(i)).collect();
    loadgen::publish_retained(m.addr, msgs, max).await?;
    let first_start = t0.elapsed().as_secs_f64();
    if !m.child.terminate(Duration::from_secs(30)) {
        println!("  note: mosquitto did not stop within 30 s of SIGTERM (killed)");
    }
    let t0 = Instant::now();
    let (mut child, addr) = Mosquitto::spawn(bin, &dir, QUEUES, true)?;
    if n > 0 {
        let last = format!("dt/bench-{}/twin", n - 1);
        wait_topic(&mut child, addr, &last, t0 + max).await?;
    } else {
        procs::wait_tcp(&mut child, addr, max)?;
    }
    let serving = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    child.check_running()?;
    Ok(IdleRow {
        broker: "mosquitto".into(),
        devices: n,
        first_start: Some(first_start),
        ready: None,
        serving,
        rss_kib: child.rss_kib()?,
        smaps: procs::smaps_summary(child.pid()).unwrap_or_default(),
    })
}

async fn idle(
    a: &IdleArgs,
    nodes: &[(&'static str, PathBuf)],
    mosq: Option<&Path>,
    tmp: &Path,
) -> Result<()> {
    let mut sizes = vec![0];
    sizes.extend(a.devices.iter().copied().filter(|&n| n > 0));
    println!(
        "idle: devices {sizes:?} ({} per profile file), settle {} s",
        a.per_file, a.settle_secs
    );
    let mut rows: Vec<IdleRow> = Vec::new();
    let mut sizes_seen = Payloads::default();
    for &n in &sizes {
        let mut payloads = None;
        for (label, bin) in nodes {
            let (row, p) = idle_node(a, label, bin, n, tmp).await?;
            println!(
                "  {label} {n} devices: restart ready {:.2}s serving {:.2}s, RSS {}",
                row.ready.unwrap_or(0.0),
                row.serving,
                procs::mib(row.rss_kib)
            );
            rows.push(row);
            if payloads.is_none() && n > 0 {
                payloads = Some(p);
            }
        }
        if let Some(p) = &payloads {
            sizes_seen = p.clone();
        }
        if let Some(m) = mosq {
            let row = idle_mosquitto(a, m, n, &sizes_seen, tmp).await?;
            println!(
                "  mosquitto {n} devices: restart serving {:.2}s, RSS {}",
                row.serving,
                procs::mib(row.rss_kib)
            );
            rows.push(row);
        }
    }
    println!();
    println!(
        "retained set per device (from the node under test): twin document {} B, mapper assignment {} B, status {} B",
        sizes_seen.twin.len(),
        sizes_seen.assignment.len(),
        sizes_seen.status.len()
    );
    let base = |b: &str| {
        rows.iter()
            .find(|r| r.broker == b && r.devices == 0)
            .map(|r| r.rss_kib)
    };
    let per_dev = |r: &IdleRow| -> Option<f64> {
        let b = base(&r.broker)?;
        (r.devices > 0).then(|| (r.rss_kib as f64 - b as f64) / r.devices as f64)
    };
    let mut t = Table::new(&[
        "broker",
        "devices",
        "first start to serving",
        "restart: /readyz 200",
        "restart: last twin retained readable",
        "serving / mosquitto",
        "idle RSS",
        "per device",
        "per device / mosquitto",
    ]);
    for r in &rows {
        let m = rows
            .iter()
            .find(|x| x.broker == "mosquitto" && x.devices == r.devices);
        let pd = per_dev(r);
        let pdm = m.and_then(per_dev);
        t.row(vec![
            r.broker.clone(),
            r.devices.to_string(),
            r.first_start.map_or("-".into(), |s| format!("{s:.2} s")),
            r.ready.map_or("-".into(), |s| format!("{s:.2} s")),
            format!("{:.2} s", r.serving),
            m.map_or("-".into(), |m| ratio(r.serving, m.serving)),
            procs::mib(r.rss_kib),
            pd.map_or("-".into(), |k| format!("{k:.2} KiB")),
            match (pd, pdm) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            },
        ]);
    }
    print!("{}", t.render());
    println!("(first start: mosquitto = start + publishing the retained set; restart: node = spawn to /readyz 200 and to the retained dt/bench-{{N-1}}/twin; mosquitto = spawn to that retained message, persistence true; per device = (idle RSS - idle RSS at 0 devices) / N)");
    println!();
    println!("RSS by mapping kind (/proc/PID/smaps), largest devices count:");
    let nmax = sizes.iter().copied().max().unwrap_or(0);
    for r in rows.iter().filter(|r| r.devices == nmax || r.devices == 0) {
        let parts: Vec<String> = r
            .smaps
            .iter()
            .take(5)
            .map(|(k, v)| format!("{k} {}", procs::mib(*v)))
            .collect();
        println!("  {} @ {}: {}", r.broker, r.devices, parts.join(", "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// startup

async fn startup(a: &StartupArgs, nodes: &[(&'static str, PathBuf)], tmp: &Path) -> Result<()> {
    println!(
        "startup: sizes {:?}, one profile file, limit {} s per case",
        a.sizes, a.max_secs
    );
    let max = Duration::from_secs(a.max_secs);
    let mut t = Table::new(&[
        "node",
        "case",
        "devices",
        "file size",
        "to /readyz 200 (or command exit)",
        "to last twin readable",
        "per device",
        "ratio to first",
        "N/N0",
    ]);
    for (label, bin) in nodes {
        for case in ["serve, one file in devices dir", "device apply, one file"] {
            let mut first: Option<(usize, f64)> = None;
            let mut skip: Option<String> = None;
            for &n in &a.sizes {
                let yaml = procs::thermostat_profile(n);
                let size = format!("{:.1} MiB", yaml.len() as f64 / (1024.0 * 1024.0));
                if let Some(why) = &skip {
                    t.row(vec![
                        label.to_string(),
                        case.into(),
                        n.to_string(),
                        size,
                        format!("not run ({why})"),
                    ]);
                    continue;
                }
                let dir = tmp.join(format!("startup-{label}-{n}-{}", case.len()));
                std::fs::create_dir_all(&dir)?;
                let last = format!("dt/bench-{}/twin", n - 1);
                let r = if case.starts_with("serve") {
                    startup_serve(bin, &dir, &yaml, &last, max).await
                } else {
                    startup_apply(bin, &dir, &yaml, &last, max).await
                };
                match r {
                    Ok((first_t, all)) => {
                        let f = *first.get_or_insert((n, all));
                        println!("  {label} {case} {n}: {first_t:.2}s / {all:.2}s");
                        t.row(vec![
                            label.to_string(),
                            case.into(),
                            n.to_string(),
                            size,
                            format!("{first_t:.2} s"),
                            format!("{all:.2} s"),
                            format!("{:.0} µs", all / n as f64 * 1e6),
                            format!("{:.2}", all / f.1),
                            format!("{:.2}", n as f64 / f.0 as f64),
                        ]);
                    }
                    Err(e) => {
                        println!("  {label} {case} {n}: {e:#}");
                        let why = format!("{n} did not finish within {} s", a.max_secs);
                        t.row(vec![
                            label.to_string(),
                            case.into(),
                            n.to_string(),
                            size,
                            format!("> {} s (stopped)", a.max_secs),
                        ]);
                        skip = Some(why);
                    }
                }
            }
        }
    }
    println!();
    print!("{}", t.render());
    println!("(serve: fresh data dir, the file in the devices folder; apply: a running node with no devices, `edgetwin device apply FILE`; last twin readable = retained dt/bench-{{N-1}}/twin received by a new subscriber; ratio to first uses the last-twin time)");
    Ok(())
}

/// Spawns `serve` with the file in its devices dir: (to /readyz, to the last twin).
async fn startup_serve(
    bin: &Path,
    dir: &Path,
    yaml: &str,
    last: &str,
    max: Duration,
) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut node = Edgetwin::spawn(bin, dir, &[("devices.yaml", yaml.to_string())], MQTT_EXTRA)?;
    let limit = t0 + max;
    wait_readyz(&mut node.child, node.http, limit)?;
    let ready = t0.elapsed().as_secs_f64();
    wait_topic(&mut node.child, node.mqtt, last, limit).await?;
    Ok((ready, t0.elapsed().as_secs_f64()))
}

/// Starts a node with no devices, then times `edgetwin device apply FILE`: (command exit, last
/// twin readable), both from the start of the command.
async fn startup_apply(
    bin: &Path,
    dir: &Path,
    yaml: &str,
    last: &str,
    max: Duration,
) -> Result<(f64, f64)> {
    let mut node = Edgetwin::start_with(bin, dir, &[], MQTT_EXTRA, Duration::from_secs(60))?;
    let file = dir.join("apply.yaml");
    std::fs::write(&file, yaml)?;
    let t0 = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("device")
        .arg("apply")
        .arg(&file)
        .arg("--broker")
        .arg(node.mqtt.to_string())
        .arg("--timeout-ms")
        .arg(max.as_millis().to_string());
    let mut apply = ChildGuard::spawn("edgetwin device apply", cmd, &dir.join("apply.log"))?;
    let limit = t0 + max;
    let status = loop {
        if let Some(s) = apply.try_wait()? {
            break s;
        }
        if Instant::now() > limit {
            bail!("apply did not finish within {max:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let exit = t0.elapsed().as_secs_f64();
    if !status.success() {
        return Err(anyhow!("apply failed ({status}): {}", apply.log_tail()));
    }
    wait_topic(&mut node.child, node.mqtt, last, limit).await?;
    Ok((exit, t0.elapsed().as_secs_f64()))
}
