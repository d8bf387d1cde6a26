//! `profile-bench`: how loading device profiles scales with the number of devices.
//!
//! For N = 1k, 2k, 5k, 10k devices (`--sizes`) it generates one `modbus` model and N devices
//! that use it, laid out two ways:
//! - **one file**: the model and all N devices in one multi-document YAML file;
//! - **N/100 files**: 100 devices per file, the model in the first one;
//!
//! plus one error case, **one file, unknown model**: the same N devices in one file, all
//! referring to a model that does not exist, so every device yields an error with its line.
//!
//! Each layout is timed through the library (`edgetwin_profile::parse_str` on every file, then
//! `edgetwin_profile::validate` on all of them, from strings in memory) and, when the daemon is
//! found, as a process: `edgetwin device validate FILE...` (files in a temp dir; includes process
//! start and reading the files). The table shows the best of `--runs` runs, the time per device
//! and the ratio to the smallest size: linear loading gives a ratio equal to the size ratio
//! (the `N/N0` column); quadratic loading gives its square.
//!
//! A case whose single run takes longer than `--max-secs` is not run at larger sizes (the old
//! quadratic loader needs minutes for 10k devices in one file).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use edgetwin_benches::procs;
use edgetwin_benches::table::Table;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Profile loading (parse + validate) time against the number of devices")]
struct Args {
    /// Device counts to measure, smallest first (ratios are to the first).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    sizes: Vec<usize>,
    /// Runs per measurement; the best is reported (repeats stop once a measurement has used 3 s).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// A case whose run takes longer than this is skipped at larger sizes.
    #[arg(long, default_value_t = 120.0)]
    max_secs: f64,
    /// The edgetwin binary (default: next to this program; without it only the library is timed).
    #[arg(long)]
    edgetwin: Option<PathBuf>,
}

const MODEL: &str = "thermostat";
const PER_FILE: usize = 100;

/// The layouts measured.
#[derive(Clone, Copy, Debug)]
enum Layout {
    OneFile,
    ManyFiles,
    UnknownModel,
}

impl Layout {
    fn label(self) -> &'static str {
        match self {
            Layout::OneFile => "one file",
            Layout::ManyFiles => "N/100 files",
            Layout::UnknownModel => "one file, unknown model (N errors)",
        }
    }

    fn expect_ok(self) -> bool {
        !matches!(self, Layout::UnknownModel)
    }
}

fn model_doc(s: &mut String) {
    s.push_str(
        "apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  protocol: modbus
  properties:
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: -1000, maximum: 1000}
    - {name: temperature, type: float, accessMode: ReadOnly}
    - {name: humidity, type: float, accessMode: ReadOnly}
",
    );
}

fn device_doc(s: &mut String, i: usize, model: &str) {
    let _ = write!(
        s,
        "---
apiVersion: edgetwin/v1
kind: Device
metadata:
  name: dev-{i}
  labels: {{site: bench, rack: r{rack}}}
spec:
  deviceModelRef: {model}
  protocol:
    modbus:
      communicateMode: TCP
      ip: 127.0.0.1
      port: {port}
      slaveID: 1
  properties:
    - name: temperature
      collectCycle: 1s
      visitors:
        modbus: {{register: HoldingRegister, offset: 0, limit: 2, dataType: float32}}
    - name: humidity
      collectCycle: 5s
      visitors:
        modbus: {{register: HoldingRegister, offset: 2, limit: 2, dataType: float32}}
    - name: setpoint
      collectCycle: 10s
      visitors:
        modbus: {{register: HoldingRegister, offset: 4, limit: 2, dataType: float32}}
",
        rack = i % 40,
        port = 1024 + i % 50000,
    );
}

/// (file name, YAML) of one layout with `n` devices.
fn generate(layout: Layout, n: usize) -> Vec<(String, String)> {
    match layout {
        Layout::OneFile | Layout::UnknownModel => {
            let model = match layout {
                Layout::UnknownModel => "no-such-model",
                _ => MODEL,
            };
            let mut s = String::new();
            model_doc(&mut s);
            for i in 0..n {
                device_doc(&mut s, i, model);
            }
            vec![("devices.yaml".into(), s)]
        }
        Layout::ManyFiles => {
            let files = n.div_ceil(PER_FILE);
            (0..files)
                .map(|f| {
                    let mut s = String::new();
                    if f == 0 {
                        model_doc(&mut s);
                    }
                    for i in f * PER_FILE..((f + 1) * PER_FILE).min(n) {
                        device_doc(&mut s, i, MODEL);
                    }
                    (format!("devices-{f:04}.yaml"), s)
                })
                .collect()
        }
    }
}

/// parse + validate through the library; returns (devices loaded, errors).
fn load_library(files: &[(String, String)]) -> (usize, usize) {
    let mut parsed = Vec::new();
    let mut errors = 0;
    for (name, text) in files {
        match edgetwin_profile::parse_str(name, text) {
            Ok(docs) => parsed.push((name.clone(), docs)),
            Err(es) => errors += es.len(),
        }
    }
    if errors > 0 {
        return (0, errors);
    }
    match edgetwin_profile::validate(&parsed, &BTreeMap::new()) {
        Ok(set) => (set.devices.len(), 0),
        Err(es) => (0, es.len()),
    }
}

/// `edgetwin device validate FILE...`; fails if the exit status is not the expected one.
fn run_process(bin: &Path, paths: &[PathBuf], expect_ok: bool) -> Result<()> {
    let status = Command::new(bin)
        .arg("device")
        .arg("validate")
        .args(paths)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if status.success() != expect_ok {
        bail!("edgetwin device validate exited with {status}, expected success: {expect_ok}");
    }
    Ok(())
}

/// Best time of up to `runs` runs of `f` (repeats stop after 3 s in total).
fn best_of(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut best = Duration::MAX;
    let mut total = Duration::ZERO;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        let took = start.elapsed();
        best = best.min(took);
        total += took;
        if total > Duration::from_secs(3) {
            break;
        }
    }
    Ok(best)
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty() {
        bail!("--sizes is empty");
    }
    let bin = match procs::find_edgetwin(args.edgetwin.as_deref()) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("note: {e:#}; timing the library only");
            None
        }
    };
    let base = args.sizes[0];
    let mut table = Table::new(&[
        "case",
        "via",
        "devices",
        "files",
        "time (best)",
        "per device",
        "ratio to first",
        "N/N0",
    ]);
    let layouts = [Layout::OneFile, Layout::ManyFiles, Layout::UnknownModel];
    for layout in layouts {
        let mut vias = vec!["library"];
        if bin.is_some() {
            vias.push("edgetwin device validate");
        }
        for via in vias {
            let mut first: Option<Duration> = None;
            let mut over: Option<(usize, Duration)> = None;
            for &n in &args.sizes {
                let files = generate(layout, n);
                let nfiles = files.len().to_string();
                if let Some((at, took)) = over {
                    table.row(vec![
                        layout.label().into(),
                        via.into(),
                        n.to_string(),
                        nfiles,
                        format!("not run ({at} took {:.0} s)", took.as_secs_f64()),
                    ]);
                    continue;
                }
                let took = if via == "library" {
                    best_of(args.runs, || {
                        let (devices, errors) = load_library(&files);
                        let expected = if layout.expect_ok() { (n, 0) } else { (0, n) };
                        if (devices, errors) != expected {
                            bail!("{layout:?} n={n}: got {devices} devices, {errors} errors, expected {expected:?}");
                        }
                        Ok(())
                    })?
                } else {
                    let dir = tempfile::tempdir().context("tempdir")?;
                    let mut paths = Vec::new();
                    for (name, text) in &files {
                        let p = dir.path().join(name);
                        std::fs::write(&p, text).with_context(|| format!("write {name}"))?;
                        paths.push(p);
                    }
                    let bin = bin.as_deref().context("no binary")?;
                    best_of(args.runs, || run_process(bin, &paths, layout.expect_ok()))?
                };
                let ratio = match first {
                    None => {
                        first = Some(took);
                        "1.00".to_string()
                    }
                    Some(f) => format!("{:.2}", took.as_secs_f64() / f.as_secs_f64()),
                };
                table.row(vec![
                    layout.label().into(),
                    via.into(),
                    n.to_string(),
                    nfiles,
                    fmt_ms(took),
                    format!("{:.1} µs", took.as_secs_f64() * 1e6 / n as f64),
                    ratio,
                    format!("{:.2}", n as f64 / base as f64),
                ]);
                eprintln!("{} / {via} / {n}: {}", layout.label(), fmt_ms(took));
                if took.as_secs_f64() > args.max_secs {
                    over = Some((n, took));
                }
            }
        }
    }
    print!("{}", table.render());
    println!(
        "(parse + validate; library = parse_str on every file then validate, from memory; the process includes start-up and reading the files; ratio to first = time / time at {base} devices, linear when it equals N/N0)"
    );
    Ok(())
}
