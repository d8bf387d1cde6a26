//! `twin-bench`: durable device-twin updates through `edgetwin serve`.
//!
//! Starts `edgetwin serve` with N thermostat devices (`bench-0..N-1`) on free ports of 127.0.0.1 and
//! measures, in one run:
//! - **durable updates/s**: a closed loop with one outstanding desired patch per device (window N);
//!   a patch counts once its `dt/{device}/delta` arrives, and the node publishes a delta only after
//!   the redb commit, so this counts committed updates;
//! - **desired → delta latency** at a fixed rate (open loop), from the publish call to the receipt
//!   of the delta carrying that value;
//! - the **reference**: a plain publish → subscribe round trip at the same rate and QoS, with no
//!   persistence, through Mosquitto and through edgetwin's embedded broker (topics outside `dt/`).
//!
//! Every patch carries a unique setpoint (`id + 0.5`), so each delta is matched to its patch.
//!
//! `--baseline PATH` runs the same phases against a second edgetwin binary (e.g. a build of the
//! previous main) in the same run, labelled `baseline`. Twin rows also give the node's CPU time
//! (utime + stime from /proc/PID/stat) per 1,000 completed patches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use edgetwin_benches::loadgen::{self, PubSubResult, PubSubSpec};
use edgetwin_benches::procs::{self, Edgetwin, Mosquitto, MosquittoQueues};
use edgetwin_benches::stats::{ms, Summary};
use edgetwin_benches::table::Table;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Durable twin update throughput and desired->delta latency of edgetwin")]
struct Args {
    /// Number of devices (`bench-0..N-1`).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Duration of the closed-loop throughput phase, in seconds.
    #[arg(long, default_value_t = 10)]
    throughput_secs: u64,
    /// Fixed rate of the latency phase, in patches per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Duration of the latency phase, in seconds.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// The edgetwin binary (default: `edgetwin` next to this program, i.e. target/release/edgetwin).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
    /// A second edgetwin binary measured in the same run (labelled `baseline`).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The mosquitto binary (default /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// Skip the plain publish/subscribe reference runs.
    #[arg(long)]
    skip_reference: bool,
}

/// Patches waiting for their delta, and what came back.
#[derive(Default)]
struct Tracker {
    /// Patch id → (device index, send time).
    pending: HashMap<u64, (usize, Instant)>,
    latencies: Vec<u64>,
    completed: usize,
    last_completed: Option<Instant>,
    errors: usize,
    first_error: Option<String>,
    /// In the closed loop: told the device index whose patch just completed.
    on_done: Option<mpsc::UnboundedSender<usize>>,
}

type Shared = Arc<Mutex<Tracker>>;

fn lock(t: &Shared) -> Result<std::sync::MutexGuard<'_, Tracker>> {
    t.lock().map_err(|_| anyhow!("tracker poisoned"))
}

/// Handles one message on `dt/+/delta` or `dt/+/error`.
fn on_message(tracker: &Shared, topic: &str, payload: &[u8]) -> Result<()> {
    let now = Instant::now();
    // The node's readiness canary asks for a reserved device every few seconds and always gets
    // an error: not one of our patches.
    if topic.starts_with("dt/edgetwin-canary/") {
        return Ok(());
    }
    let mut t = lock(tracker)?;
    if topic.ends_with("/error") {
        t.errors += 1;
        if t.first_error.is_none() {
            t.first_error = Some(format!("{topic}: {}", String::from_utf8_lossy(payload)));
        }
        return Ok(());
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Ok(());
    };
    let Some(setpoint) = v.pointer("/delta/setpoint").and_then(|s| s.as_f64()) else {
        return Ok(());
    };
    if setpoint < 0.0 {
        return Ok(());
    }
    let id = setpoint.floor() as u64;
    if let Some((device, sent)) = t.pending.remove(&id) {
        t.latencies.push(now.duration_since(sent).as_nanos() as u64);
        t.completed += 1;
        t.last_completed = Some(now);
        if let Some(tx) = &t.on_done {
            let _ = tx.send(device);
        }
    }
    Ok(())
}

/// Publishes `{"setpoint": id + 0.5}` to `dt/bench-{device}/desired` and records it as pending.
async fn send_patch(client: &AsyncClient, tracker: &Shared, device: usize, id: u64) -> Result<()> {
    let body = format!("{{\"setpoint\": {}.5}}", id);
    lock(tracker)?.pending.insert(id, (device, Instant::now()));
    client
        .publish(
            format!("dt/bench-{device}/desired"),
            QoS::AtLeastOnce,
            false,
            body,
        )
        .await
        .context("publish desired patch")
}

/// Result of one twin phase.
struct Phase {
    sent: usize,
    completed: usize,
    secs: f64,
    latency: Summary,
    errors: usize,
    /// Node CPU seconds during the phase (set by the caller).
    cpu_secs: f64,
}

/// Resets the tracker for a new phase.
fn reset(tracker: &Shared, on_done: Option<mpsc::UnboundedSender<usize>>) -> Result<()> {
    let mut t = lock(tracker)?;
    t.pending.clear();
    t.latencies.clear();
    t.completed = 0;
    t.last_completed = None;
    t.errors = 0;
    t.on_done = on_done;
    Ok(())
}

/// Collects the tracker's figures for a phase that started at `start`.
fn finish(tracker: &Shared, sent: usize, start: Instant) -> Result<Phase> {
    let mut t = lock(tracker)?;
    t.on_done = None;
    let secs = t
        .last_completed
        .map_or(0.0, |l| l.duration_since(start).as_secs_f64());
    Ok(Phase {
        sent,
        completed: t.completed,
        secs,
        latency: Summary::from_nanos(&mut t.latencies),
        errors: t.errors,
        cpu_secs: 0.0,
    })
}

/// Waits until nothing is pending, or nothing completed for `idle`, or `limit` passed.
async fn drain(tracker: &Shared, idle: Duration, limit: Instant) -> Result<()> {
    let since = Instant::now();
    loop {
        let (pending, last) = {
            let t = lock(tracker)?;
            (t.pending.len(), t.last_completed)
        };
        if pending == 0
            || Instant::now() > limit
            || last.unwrap_or(since).max(since).elapsed() > idle
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Closed loop: one outstanding patch per device for `secs`.
async fn closed_loop(
    client: &AsyncClient,
    tracker: &Shared,
    devices: usize,
    secs: u64,
    next_id: &mut u64,
) -> Result<Phase> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    reset(tracker, Some(tx))?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut sent = 0;
    for d in 0..devices {
        send_patch(client, tracker, d, *next_id).await?;
        *next_id += 1;
        sent += 1;
    }
    while Instant::now() < end {
        match tokio::time::timeout_at(end.into(), rx.recv()).await {
            Ok(Some(d)) => {
                send_patch(client, tracker, d, *next_id).await?;
                *next_id += 1;
                sent += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    drain(
        tracker,
        Duration::from_secs(3),
        end + Duration::from_secs(10),
    )
    .await?;
    finish(tracker, sent, start)
}

/// Open loop: patches at a fixed `rate` round robin over the devices for `secs`.
async fn open_loop(
    client: &AsyncClient,
    tracker: &Shared,
    devices: usize,
    rate: f64,
    secs: u64,
    next_id: &mut u64,
) -> Result<Phase> {
    reset(tracker, None)?;
    let total = (rate * secs as f64).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = Instant::now();
    let hard_end = start + Duration::from_secs(secs) * 3 + Duration::from_secs(10);
    let mut sent = 0;
    for i in 0..total {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        if Instant::now() > hard_end {
            break;
        }
        send_patch(client, tracker, i % devices, *next_id).await?;
        *next_id += 1;
        sent += 1;
    }
    drain(tracker, Duration::from_secs(3), hard_end).await?;
    finish(tracker, sent, start)
}

/// Plain publish → subscribe at `rate` for `secs`, QoS 1, with a patch-sized payload.
async fn reference(addr: SocketAddr, rate: f64, secs: u64) -> Result<PubSubResult> {
    loadgen::run_pubsub(&PubSubSpec {
        addr,
        publishers: 1,
        messages: (rate * secs as f64).round().max(1.0) as usize,
        payload: 32,
        qos: QoS::AtLeastOnce,
        rate: Some(rate),
        prefix: "ref".into(),
        inflight: 100,
        deadline: Duration::from_secs(secs * 3 + 10),
        drain_idle: Duration::from_secs(3),
    })
    .await
}

/// Everything measured through `edgetwin serve`.
struct TwinFigures {
    closed: Phase,
    open: Phase,
    plain: Option<PubSubResult>,
    rss_kib: u64,
    first_error: Option<String>,
}

/// Starts the node with `args.devices` devices and runs the probe, both twin phases and (unless
/// skipped) the plain pub/sub reference through its broker; the node is killed on return.
async fn measure_twin(
    args: &Args,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<TwinFigures> {
    let profile = procs::thermostat_profile(args.devices);
    let mut node = Edgetwin::start(bin, dir, &[("bench.yaml", profile)])?;
    println!(
        "edgetwin {} on {} (http {}) with {} devices",
        bin.display(),
        node.mqtt,
        node.http,
        args.devices
    );

    let tracker: Shared = Arc::new(Mutex::new(Tracker::default()));
    let (sub, mut sub_el) = loadgen::connect("twin-bench-sub", node.mqtt, 100).await?;
    let filters = ["dt/+/delta", "dt/+/error"];
    loadgen::subscribe(&sub, &mut sub_el, &filters, QoS::AtLeastOnce).await?;
    let sub_task = {
        let tracker = tracker.clone();
        tokio::spawn(async move {
            loop {
                match sub_el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        on_message(&tracker, &p.topic, &p.payload)?
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err::<(), _>(anyhow::Error::new(e).context("delta subscriber"))
                    }
                }
            }
        })
    };
    let (publ, mut pub_el) = loadgen::client("twin-bench-pub", node.mqtt, 200);
    let pub_task = tokio::spawn(async move {
        loop {
            if let Err(e) = pub_el.poll().await {
                return Err::<(), _>(anyhow::Error::new(e).context("patch publisher"));
            }
        }
    });
    let result = async {
        // Probe: one patch must come back as a delta, else say why (profile rejected, error topic...).
        let mut next_id: u64 = 1;
        reset(&tracker, None)?;
        send_patch(&publ, &tracker, 0, next_id).await?;
        next_id += 1;
        let ten = Duration::from_secs(10);
        drain(&tracker, ten, Instant::now() + ten).await?;
        {
            let t = lock(&tracker)?;
            if t.completed != 1 {
                bail!(
                    "probe patch to bench-0 got no delta within 10 s; first error: {}; node log tail:\n{}",
                    t.first_error.as_deref().unwrap_or("none"),
                    node.child.log_tail()
                );
            }
        }
        let cpu0 = node.child.cpu_secs()?;
        let mut closed = closed_loop(&publ, &tracker, args.devices, args.throughput_secs, &mut next_id).await?;
        let cpu1 = node.child.cpu_secs()?;
        closed.cpu_secs = cpu1 - cpu0;
        node.child.check_running()?;
        println!("  closed loop: {} durable updates in {:.2}s", closed.completed, closed.secs);
        let (rate, secs) = (args.rate, args.latency_secs);
        let mut open = open_loop(&publ, &tracker, args.devices, rate, secs, &mut next_id).await?;
        open.cpu_secs = node.child.cpu_secs()? - cpu1;
        node.child.check_running()?;
        println!("  open loop: {} of {} deltas", open.completed, open.sent);
        let plain = if args.skip_reference {
            None
        } else {
            Some(reference(node.mqtt, rate, secs).await.context("edgetwin reference")?)
        };
        node.child.check_running()?;
        Ok(TwinFigures {
            closed,
            open,
            plain,
            rss_kib: node.child.peak_rss_kib()?,
            first_error: lock(&tracker)?.first_error.clone(),
        })
    }
    .await;
    sub_task.abort();
    pub_task.abort();
    node.child.stop();
    result
}

/// One table row from a twin phase.
fn phase_row(name: String, p: &Phase) -> Vec<String> {
    let rate = if p.secs > 0.0 {
        format!("{:.0}", p.completed as f64 / p.secs)
    } else {
        "-".into()
    };
    vec![
        name,
        p.sent.to_string(),
        p.completed.to_string(),
        (p.sent - p.completed.min(p.sent)).to_string(),
        rate,
        ms(p.latency.p50, p.latency.count),
        ms(p.latency.p99, p.latency.count),
        ms(p.latency.max, p.latency.count),
        format!("{:.4}", p.cpu_secs / (p.completed.max(1) as f64 / 1000.0)),
    ]
}

/// One table row from a plain pub/sub reference run.
fn reference_row(name: String, r: &PubSubResult) -> Vec<String> {
    vec![
        name,
        r.sent.to_string(),
        r.received.to_string(),
        r.lost().to_string(),
        format!("{:.0}", r.receive_rate()),
        ms(r.latency.p50, r.latency.count),
        ms(r.latency.p99, r.latency.count),
        ms(r.latency.max, r.latency.count),
        String::new(),
    ]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.devices == 0 || args.rate <= 0.0 {
        bail!("--devices and --rate must be positive");
    }
    let tmp = tempfile::Builder::new()
        .prefix("edgetwin-twin-bench-")
        .tempdir()
        .context("temp dir")?;
    println!(
        "twin-bench: {} devices; closed loop {} s; open loop {} patch/s for {} s; QoS 1",
        args.devices, args.throughput_secs, args.rate, args.latency_secs
    );
    let mut notes = Vec::new();
    let mut twins = Vec::new();
    match procs::find_edgetwin(args.edgetwin.as_deref()) {
        Ok(bin) => twins.push(("edgetwin", measure_twin(&args, &bin, tmp.path()).await?)),
        Err(e) if args.edgetwin.is_none() => {
            notes.push(format!("edgetwin not measured: {e:#}"));
        }
        Err(e) => return Err(e),
    };
    if let Some(b) = &args.baseline {
        let bin = procs::find_edgetwin(Some(b))?;
        let dir = tmp.path().join("baseline");
        std::fs::create_dir_all(&dir)?;
        twins.push(("baseline", measure_twin(&args, &bin, &dir).await?));
    }

    let queues = MosquittoQueues {
        max_inflight: 100,
        max_queued: 1_000_000,
    };
    let mut mosq = None;
    if !args.skip_reference {
        let dir = tmp.path().join("mosquitto");
        std::fs::create_dir_all(&dir)?;
        let mut m = Mosquitto::start(
            &procs::find_mosquitto(args.mosquitto.as_deref()),
            &dir,
            queues,
        )?;
        println!("mosquitto on {}", m.addr);
        let r = reference(m.addr, args.rate, args.latency_secs)
            .await
            .context("mosquitto reference")?;
        m.child.check_running()?;
        mosq = Some(r);
    }

    println!();
    let mut t = Table::new(&[
        "measurement",
        "sent",
        "completed",
        "missing",
        "rate /s",
        "p50",
        "p99",
        "max",
        "node CPU s / 1k",
    ]);
    for (label, f) in &twins {
        t.row(phase_row(
            format!(
                "{label}: durable twin updates, closed loop (window {})",
                args.devices
            ),
            &f.closed,
        ));
        t.row(phase_row(
            format!("{label}: desired->delta at {} patch/s", args.rate),
            &f.open,
        ));
        if let Some(r) = &f.plain {
            let name = format!(
                "REFERENCE plain pub->sub at {} msg/s, {label} broker (no twin, no persistence)",
                args.rate
            );
            t.row(reference_row(name, r));
        }
    }
    if let Some(r) = &mosq {
        let name = format!(
            "REFERENCE plain pub->sub at {} msg/s, mosquitto (no persistence)",
            args.rate
        );
        t.row(reference_row(name, r));
    }
    print!("{}", t.render());
    println!("(completed = deltas received for twin rows, i.e. updates committed to redb; latency = publish call to receipt; QoS 1 everywhere)");
    for (label, f) in &twins {
        let rejected = f.closed.errors + f.open.errors;
        println!(
            "{label} peak RSS (VmHWM): {}; rejected patches: {rejected}",
            procs::mib(f.rss_kib)
        );
        if let Some(e) = &f.first_error {
            println!("first error message: {e}");
        }
    }
    if mosq.is_some() {
        println!("reference broker settings: {}", queues.describe());
    }
    for n in notes {
        println!("note: {n}");
    }
    Ok(())
}
