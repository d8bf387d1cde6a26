//! `broker-compare`: the same rumqttc load generator against Mosquitto and against the broker
//! embedded in `edgetwin serve`, side by side in one run, for QoS 0 and QoS 1.
//!
//! For each broker and QoS, P publishers each publish N messages to `bench/{p}/t` while one
//! subscriber on `bench/#` receives them; the table shows completed publishes, distinct messages
//! received, loss, publish and receive throughput, and end-to-end latency. Both brokers are started
//! by this program on free ports of 127.0.0.1 and killed at the end (also on error).
//!
//! `--baseline PATH` measures a second edgetwin binary (e.g. a build of the previous main) in the
//! same run, labelled `baseline`. Each row also gives the broker's CPU time (utime + stime from
//! /proc/PID/stat, all threads) per 1,000 messages received.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use edgetwin_benches::loadgen::{self, PubSubResult, PubSubSpec};
use edgetwin_benches::procs::{
    self, ChildGuard, Edgetwin, Mosquitto, MosquittoQueues, EDGETWIN_QUEUES,
};
use edgetwin_benches::stats::{ms, ratio};
use edgetwin_benches::table::Table;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Compare edgetwin's embedded broker with Mosquitto under the same load")]
struct Args {
    /// Messages per publisher.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Number of publishers.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Payload size in bytes (minimum 16: send timestamp, publisher, sequence).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total publish rate in msg/s over all publishers; 0 publishes flat out.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// QoS levels to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    qos: Vec<u8>,
    /// Outgoing QoS 1 messages in flight per publisher.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Hard limit per run in seconds.
    #[arg(long, default_value_t = 60)]
    deadline_secs: u64,
    /// Mosquitto's max_inflight_messages (per client).
    #[arg(long, default_value_t = 100)]
    mosquitto_max_inflight: u32,
    /// Mosquitto's max_queued_messages (per client); keep it above publishers x messages.
    #[arg(long, default_value_t = 1_000_000)]
    mosquitto_max_queued: u32,
    /// The edgetwin binary (default: `edgetwin` next to this program, i.e. target/release/edgetwin).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
    /// A second edgetwin binary measured in the same run (labelled `baseline`).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The mosquitto binary (default /usr/sbin/mosquitto).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// Measure only Mosquitto.
    #[arg(long)]
    skip_edgetwin: bool,
    /// Measure only edgetwin.
    #[arg(long)]
    skip_mosquitto: bool,
}

struct Row {
    broker: &'static str,
    qos: u8,
    result: PubSubResult,
    /// Broker CPU seconds (utime + stime) during the run.
    cpu_secs: f64,
}

impl Row {
    fn cpu_per_1k(&self) -> f64 {
        self.cpu_secs / (self.result.received.max(1) as f64 / 1000.0)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("edgetwin-bench-")
        .tempdir()
        .context("temp dir")?;
    let queues = MosquittoQueues {
        max_inflight: args.mosquitto_max_inflight,
        max_queued: args.mosquitto_max_queued,
    };
    let total = args.publishers * args.messages;
    if total > queues.max_queued as usize {
        eprintln!(
            "warning: {total} messages per run exceed mosquitto max_queued_messages {}",
            queues.max_queued
        );
    }
    println!(
        "broker-compare: {} publishers x {} messages, {} B payload, rate {}, QoS {:?}, {} in flight per publisher",
        args.publishers,
        args.messages,
        args.payload.max(loadgen::HEADER_LEN),
        if args.rate > 0.0 { format!("{} msg/s", args.rate) } else { "unlimited".into() },
        args.qos,
        args.inflight
    );

    let mut rows = Vec::new();
    let mut rss = Vec::new();
    let mut notes = Vec::new();

    if !args.skip_mosquitto {
        let dir = tmp.path().join("mosquitto");
        std::fs::create_dir_all(&dir)?;
        let bin = procs::find_mosquitto(args.mosquitto.as_deref());
        let mut m = Mosquitto::start(&bin, &dir, queues)?;
        println!("mosquitto {} on {}", bin.display(), m.addr);
        measure("mosquitto", m.addr, &args, &mut m.child, &mut rows).await?;
        rss.push(("mosquitto", m.child.peak_rss_kib()?, queues.describe()));
        m.child.stop();
    }

    if !args.skip_edgetwin {
        match procs::find_edgetwin(args.edgetwin.as_deref()) {
            Ok(bin) => {
                let dir = tmp.path().join("edgetwin");
                std::fs::create_dir_all(&dir)?;
                let mut e = Edgetwin::start(&bin, &dir, &[])?;
                println!("edgetwin {} on {} (http {})", bin.display(), e.mqtt, e.http);
                measure("edgetwin", e.mqtt, &args, &mut e.child, &mut rows).await?;
                rss.push((
                    "edgetwin",
                    e.child.peak_rss_kib()?,
                    EDGETWIN_QUEUES.to_string(),
                ));
                e.child.stop();
            }
            Err(e) if args.edgetwin.is_none() => {
                notes.push(format!("edgetwin not measured: {e:#}"))
            }
            Err(e) => return Err(e),
        }
        if let Some(b) = &args.baseline {
            let bin = procs::find_edgetwin(Some(b))?;
            let dir = tmp.path().join("baseline");
            std::fs::create_dir_all(&dir)?;
            let mut e = Edgetwin::start(&bin, &dir, &[])?;
            println!("baseline {} on {} (http {})", bin.display(), e.mqtt, e.http);
            measure("baseline", e.mqtt, &args, &mut e.child, &mut rows).await?;
            rss.push((
                "baseline",
                e.child.peak_rss_kib()?,
                EDGETWIN_QUEUES.to_string(),
            ));
            e.child.stop();
        }
    }

    println!();
    let mut t = Table::new(&[
        "broker",
        "qos",
        "msgs sent",
        "received",
        "lost",
        "dup",
        "publish msg/s",
        "receive msg/s",
        "p50",
        "p99",
        "max",
        "CPU s / 1k msgs",
    ]);
    for r in &rows {
        let x = &r.result;
        t.row(vec![
            format!(
                "{}{}",
                r.broker,
                if x.timed_out { " (deadline)" } else { "" }
            ),
            r.qos.to_string(),
            x.sent.to_string(),
            x.received.to_string(),
            x.lost().to_string(),
            x.duplicates.to_string(),
            format!("{:.0}", x.publish_rate()),
            format!("{:.0}", x.receive_rate()),
            ms(x.latency.p50, x.latency.count),
            ms(x.latency.p99, x.latency.count),
            ms(x.latency.max, x.latency.count),
            format!("{:.4}", r.cpu_per_1k()),
        ]);
    }
    let pairs = [
        ("edgetwin", "mosquitto"),
        ("baseline", "mosquitto"),
        ("edgetwin", "baseline"),
    ];
    for q in &args.qos {
        let find = |b: &str| rows.iter().find(|r| r.broker == b && r.qos == *q);
        for (num, den) in pairs {
            let (Some(er), Some(mr)) = (find(num), find(den)) else {
                continue;
            };
            let (e, m) = (&er.result, &mr.result);
            t.row(vec![
                format!("{num}/{den}"),
                q.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                ratio(e.publish_rate(), m.publish_rate()),
                ratio(e.receive_rate(), m.receive_rate()),
                ratio(e.latency.p50.as_secs_f64(), m.latency.p50.as_secs_f64()),
                ratio(e.latency.p99.as_secs_f64(), m.latency.p99.as_secs_f64()),
                ratio(e.latency.max.as_secs_f64(), m.latency.max.as_secs_f64()),
                ratio(er.cpu_per_1k(), mr.cpu_per_1k()),
            ]);
        }
    }
    print!("{}", t.render());
    println!("(throughput: higher is better; latency = publish call to subscriber receipt, lower is better; CPU = broker utime+stime per 1,000 messages received, lower is better)");
    println!();
    let mut t = Table::new(&["broker", "peak RSS (VmHWM)", "queue settings"]);
    for (b, kib, q) in &rss {
        t.row(vec![b.to_string(), procs::mib(*kib), q.clone()]);
    }
    print!("{}", t.render());
    for n in notes {
        println!("note: {n}");
    }
    Ok(())
}

/// Runs every requested QoS level against one broker.
async fn measure(
    broker: &'static str,
    addr: std::net::SocketAddr,
    args: &Args,
    child: &mut ChildGuard,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for &q in &args.qos {
        let spec = PubSubSpec {
            addr,
            publishers: args.publishers,
            messages: args.messages,
            payload: args.payload,
            qos: loadgen::qos(q)?,
            rate: (args.rate > 0.0).then_some(args.rate),
            prefix: "bench".into(),
            inflight: args.inflight,
            deadline: Duration::from_secs(args.deadline_secs),
            drain_idle: Duration::from_secs(2),
        };
        let cpu0 = child.cpu_secs()?;
        let result = loadgen::run_pubsub(&spec)
            .await
            .with_context(|| format!("{broker} QoS {q}"))?;
        child.check_running()?;
        let cpu_secs = child.cpu_secs()? - cpu0;
        println!(
            "  {broker} QoS {q}: sent {} received {} in {:.2}s",
            result.sent, result.received, result.receive_secs
        );
        rows.push(Row {
            broker,
            qos: q,
            result,
            cpu_secs,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
