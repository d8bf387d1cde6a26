//! `broker-compare`: the same rumqttc load generator against Mosquitto and against the broker
//! embedded in `edgetwin serve`, side by side in one run, for QoS 0 and QoS 1.
//!
//! For each broker and QoS, P publishers each publish N messages to `bench/{p}/t` while one
//! subscriber on `bench/#` receives them; the table shows completed publishes, distinct messages
//! received, loss, publish and receive throughput, and end-to-end latency. Both brokers are started
//! by this program on free ports of 127.0.0.1 and killed at the end (also on error).

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
        ]);
    }
    for q in &args.qos {
        let find = |b: &str| {
            rows.iter()
                .find(|r| r.broker == b && r.qos == *q)
                .map(|r| &r.result)
        };
        if let (Some(e), Some(m)) = (find("edgetwin"), find("mosquitto")) {
            t.row(vec![
                "edgetwin/mosquitto".into(),
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
            ]);
        }
    }
    print!("{}", t.render());
    println!("(throughput: higher is better; latency = publish call to subscriber receipt, lower is better)");
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
        let result = loadgen::run_pubsub(&spec)
            .await
            .with_context(|| format!("{broker} QoS {q}"))?;
        child.check_running()?;
        println!(
            "  {broker} QoS {q}: sent {} received {} in {:.2}s",
            result.sent, result.received, result.receive_secs
        );
        rows.push(Row {
            broker,
            qos: q,
            result,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
