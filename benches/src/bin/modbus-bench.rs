//! `modbus-bench`: the Modbus mapper, pymodbus simulator → mapper → node, in one run:
//!
//! - **Modbus requests per point**, coalesced vs one request per property, as a ratio: the
//!   driver (`ModbusDriver`) polls one device with P `uint16` properties at adjacent addresses
//!   directly against the simulator, C cycles each way, and counts the requests it sent;
//! - **points per second end to end**: `edgetwin serve` with D devices of P properties each,
//!   the real `edgetwin-mapper-modbus` binary polling them every `cycle`, and a subscriber on the
//!   node counting property values in `dt/+/reported` patches and `dt/+/twin` documents over a
//!   fixed time; once with coalescing, once with `EDGETWIN_MODBUS_COALESCE=0`.
//!
//! The simulator runs with `--ticking`, so every reading is a new value and every reported
//! value is a real twin change (a repeated value is not republished by the node).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use edgetwin_benches::loadgen;
use edgetwin_benches::procs::{self, ChildGuard, Edgetwin};
use edgetwin_benches::table::Table;
use edgetwin_mapper_modbus::codec::PlanLimits;
use edgetwin_mapper_modbus::ModbusDriver;
use edgetwin_mapper_sdk::Driver;
use rumqttc::{Event, Packet, QoS};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    about = "Modbus mapper: points/s through simulator -> mapper -> node, requests per point"
)]
struct Args {
    /// Devices on the node (all served by the one simulator).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Properties per device (uint16 at holding registers 100..100+P, at most 100).
    #[arg(long, default_value_t = 50)]
    props: usize,
    /// collectCycle of every property, in ms.
    #[arg(long, default_value_t = 100)]
    cycle_ms: u64,
    /// Measuring time of each end-to-end run, in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Poll cycles of the direct driver comparison.
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// The edgetwin binary (default: next to this program).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
    /// The mapper binary (default: edgetwin-mapper-modbus next to this program).
    #[arg(long)]
    mapper: Option<PathBuf>,
    /// Python with pymodbus 3.16.1.
    #[arg(long, default_value = "python3")]
    python: String,
}

const SIM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../mappers/modbus/tests/sim/modbus_sim.py"
);

fn profile(devices: usize, props: usize, port: u16, cycle_ms: u64) -> String {
    let mut y = String::from(
        "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: counter}\nspec:\n  protocol: modbus\n  properties:\n",
    );
    for p in 0..props {
        y.push_str(&format!(
            "    - {{name: p{p}, type: int, accessMode: ReadOnly}}\n"
        ));
    }
    for d in 0..devices {
        y.push_str(&format!(
            "---\napiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: mb-{d}}}\nspec:\n  deviceModelRef: counter\n  protocol:\n    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: {port}, slaveID: 1, timeout: 1s}}\n  properties:\n"
        ));
        for p in 0..props {
            y.push_str(&format!(
                "    - name: p{p}\n      collectCycle: {cycle_ms}ms\n      visitors:\n        modbus: {{register: HoldingRegister, offset: {}, dataType: uint16}}\n",
                100 + p
            ));
        }
    }
    y
}

fn next_to_exe(name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let p = exe.parent().context("no parent dir")?.join(name);
    if !p.is_file() {
        bail!("{} not found (build it, or pass its path)", p.display());
    }
    Ok(p)
}

/// Direct driver polling: (requests, points, seconds).
async fn driver_run(limits: PlanLimits, yaml: &str, cycles: usize) -> Result<(u64, u64, f64)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("p.yaml"), yaml)?;
    let (set, errors) = edgetwin_profile::load_dir(dir.path());
    if !errors.is_empty() {
        bail!("profile errors: {errors:?}");
    }
    let dev = set.resolved().next().context("no device")?;
    let driver = ModbusDriver::with_limits(limits);
    let mut conn = driver.connect(&dev).await?;
    let props: Vec<_> = dev.device.spec.properties.iter().collect();
    let start = Instant::now();
    let mut points = 0u64;
    for _ in 0..cycles {
        let rs = driver.read(&mut conn, &dev, &props).await?;
        points += rs.iter().filter(|r| r.is_ok()).count() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = conn.requests();
    driver.disconnect(conn).await;
    Ok((requests, points, secs))
}

/// Counts of one end-to-end run.
struct E2e {
    reported_points: u64,
    twin_docs: u64,
    secs: f64,
}

async fn e2e_run(
    edgetwin: &Path,
    mapper: &Path,
    yaml: &str,
    coalesce: bool,
    secs: u64,
) -> Result<E2e> {
    let dir = tempfile::tempdir()?;
    let node = Edgetwin::start(edgetwin, dir.path(), &[("bench.yaml", yaml.to_string())])?;
    let (client, mut el) = loadgen::connect("modbus-bench-sub", node.mqtt, 10).await?;
    loadgen::subscribe(
        &client,
        &mut el,
        &["dt/+/reported", "dt/+/twin"],
        QoS::AtMostOnce,
    )
    .await?;
    let mut cmd = Command::new(mapper);
    cmd.args(["--broker", &node.mqtt.to_string()])
        .env("EDGETWIN_LOG", "warn")
        .env("EDGETWIN_MODBUS_COALESCE", if coalesce { "1" } else { "0" });
    let _mapper = ChildGuard::spawn("mapper", cmd, &dir.path().join("mapper.log"))?;
    let points = Arc::new(AtomicU64::new(0));
    let twins = Arc::new(AtomicU64::new(0));
    let (p2, t2) = (points.clone(), twins.clone());
    let counter = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/reported") {
                        let n = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .and_then(|v| {
                                v.as_object()
                                    .map(|o| o.keys().filter(|k| *k != "ts").count())
                            })
                            .unwrap_or(0);
                        p2.fetch_add(n as u64, Ordering::Relaxed);
                    } else {
                        t2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    // Warm up: until the first readings arrive, then 1 s more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while points.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!(
                "no reported values within 30 s; see {}",
                dir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, t0) = (
        points.load(Ordering::Relaxed),
        twins.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let r = E2e {
        reported_points: points.load(Ordering::Relaxed) - p0,
        twin_docs: twins.load(Ordering::Relaxed) - t0,
        secs: start.elapsed().as_secs_f64(),
    };
    counter.abort();
    Ok(r)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.props == 0 || args.props > 100 {
        bail!("--props must be 1..=100");
    }
    let edgetwin = procs::find_edgetwin(args.edgetwin.as_deref())?;
    let mapper = next_to_exe("edgetwin-mapper-modbus", args.mapper.as_deref())?;
    let port = procs::free_ports(1)?[0];
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(&args.python);
    cmd.arg(SIM).args(["tcp", &port.to_string(), "--ticking"]);
    let mut sim = ChildGuard::spawn("modbus_sim", cmd, &dir.path().join("sim.log"))?;
    procs::wait_tcp(
        &mut sim,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(15),
    )?;

    // 1. Requests per point, direct driver.
    let one = profile(1, args.props, port, args.cycle_ms);
    let (rq_c, pt_c, s_c) = driver_run(PlanLimits::default(), &one, args.cycles).await?;
    let (rq_s, pt_s, s_s) = driver_run(PlanLimits::single(), &one, args.cycles).await?;
    let mut t = Table::new(&[
        "driver, 1 device",
        "properties",
        "cycles",
        "requests",
        "points",
        "requests/point",
        "points/s (direct)",
    ]);
    for (name, rq, pt, s) in [
        ("coalesced", rq_c, pt_c, s_c),
        ("one per property", rq_s, pt_s, s_s),
    ] {
        t.row(vec![
            name.into(),
            args.props.to_string(),
            args.cycles.to_string(),
            rq.to_string(),
            pt.to_string(),
            format!("{:.3}", rq as f64 / pt.max(1) as f64),
            format!("{:.0}", pt as f64 / s),
        ]);
    }
    println!("{}", t.render());
    let ratio = (rq_s as f64 / pt_s.max(1) as f64) / (rq_c as f64 / pt_c.max(1) as f64);
    println!("coalescing sends {ratio:.1}x fewer Modbus requests per point\n");

    // 2. End to end.
    let yaml = profile(args.devices, args.props, port, args.cycle_ms);
    let offered = (args.devices * args.props) as f64 * 1000.0 / args.cycle_ms as f64;
    let mut t = Table::new(&[
        "mapper",
        "devices x props",
        "cycle",
        "offered points/s",
        "reported points/s",
        "twin docs/s",
    ]);
    for coalesce in [true, false] {
        let r = e2e_run(&edgetwin, &mapper, &yaml, coalesce, args.secs).await?;
        t.row(vec![
            if coalesce {
                "coalesced"
            } else {
                "one per property"
            }
            .into(),
            format!("{} x {}", args.devices, args.props),
            format!("{} ms", args.cycle_ms),
            format!("{offered:.0}"),
            format!("{:.0}", r.reported_points as f64 / r.secs),
            format!("{:.1}", r.twin_docs as f64 / r.secs),
        ]);
    }
    println!("{}", t.render());
    sim.check_running()?;
    Ok(())
}
