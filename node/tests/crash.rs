//! A PUBACK means durable, tested by breaking it: third-party writers (paho-mqtt) publish at
//! QoS 1 and 2, on twins' desired state and on telemetry the bridge carries to a real Mosquitto
//! cloud, reconnecting from the first millisecond after every restart, while the node is killed
//! with SIGKILL again and again (also while writers flood it). Nothing it acknowledged may be
//! missing afterwards: not in the twin store, not at the cloud, and nothing out of order; a
//! client's retained message is there after every restart, and a client's kept session gets
//! the messages queued for it while it was away, one queued before each kill.
//!
//! Seeded (`EDGETWIN_CRASH_SEED`, default 11) and bounded (`EDGETWIN_CRASH_KILLS`, default 8).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgetwin_testkit::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The node id the testkit configures (the bridge's topic prefix is `edgetwin/{NODE}/`).
const NODE: &str = "test-node";

fn bridge_yaml(port: u16) -> String {
    format!(
        "bridge:\n  url: mqtt://127.0.0.1:{port}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n"
    )
}

/// One writer process (`clients/acked_writer.py`) and the file of numbers it got acknowledged.
struct Writer {
    name: String,
    device: &'static str,
    kind: &'static str,
    qos: u8,
    out: PathBuf,
    child: Child,
}

impl Writer {
    fn start(
        dir: &Path,
        port: u16,
        device: &'static str,
        kind: &'static str,
        qos: u8,
        rate: u32,
    ) -> Writer {
        let name = format!("crash-{kind}-{device}-q{qos}");
        let out = dir.join(format!("{name}.acked"));
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/clients/acked_writer.py");
        let child = Command::new(python())
            .arg(script)
            .args([
                "--port",
                &port.to_string(),
                "--device",
                device,
                "--kind",
                kind,
            ])
            .args([
                "--qos",
                &qos.to_string(),
                "--id",
                &name,
                "--rate",
                &rate.to_string(),
            ])
            .args(["--inflight", "20", "--out", out.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Writer {
            name,
            device,
            kind,
            qos,
            out,
            child,
        }
    }

    /// The numbers acknowledged so far, in acknowledgement order.
    fn acked(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The number in a twin's `desired.mode` (the last desired patch it holds).
fn desired_n(node: &Node, device: &str) -> Option<u64> {
    node.twin(device)["desired"]["mode"].as_str()?.parse().ok()
}

#[test]
fn crash_sigkill_loop_loses_no_acknowledged_message() {
    let seed: u64 = std::env::var("EDGETWIN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let kills: usize = std::env::var("EDGETWIN_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cloud = Mosquitto::start();
    let up = Subscriber::start(
        cloud.port,
        "crash-up",
        &format!("edgetwin/{NODE}/dt/+/telemetry"),
    );
    let mut node = Node::start_with_config(&["cr-1", "cr-2"], &bridge_yaml(cloud.port));
    node.wait_bridge_connected();
    // A client's retained message: there after every restart.
    mosquitto_pub(node.port, "plant/crash/info", r#"{"kept":true}"#, &["-r"]);
    // A client's kept session, away: one message is queued for it before each kill, and it
    // gets every one when it comes back at the end.
    let kept = ["--prefix", "crash/"];
    node.scenario("kept_setup", &kept);
    let files = tempfile::tempdir().unwrap();
    // Two flood (no pacing, 20 in flight each), two paced at 300 msg/s.
    let mut writers = vec![
        Writer::start(files.path(), node.port, "cr-1", "desired", 1, 0),
        Writer::start(files.path(), node.port, "cr-2", "desired", 2, 300),
        Writer::start(files.path(), node.port, "cr-1", "telemetry", 1, 0),
        Writer::start(files.path(), node.port, "cr-2", "telemetry", 2, 300),
    ];

    let mut lost_desired = Vec::new();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        // What was acknowledged before the kill must be there after it.
        let before: Vec<Option<u64>> = writers
            .iter()
            .map(|w| w.acked().into_iter().max())
            .collect();
        mosquitto_pub(node.port, "crash/queued", &k.to_string(), &["-q", "1"]);
        // Acknowledged at once; on disk once the session's keeper has it (milliseconds).
        if wait_for(Duration::from_secs(10), || {
            (node.queued_total() >= 1).then_some(())
        })
        .is_none()
        {
            lost_desired.push(format!(
                "kill {k}: message {k} for the kept session not queued"
            ));
        }
        node.kill9();
        node.restart();
        if node.retained("plant/crash/info").is_none() {
            lost_desired.push(format!("kill {k}: the retained message is gone"));
        }
        for (w, last) in writers.iter().zip(&before) {
            if w.kind != "desired" {
                continue;
            }
            let Some(last) = last else { continue };
            // Later patches may have landed since the restart: the twin's number is at least
            // the last one acknowledged before the kill.
            let now = desired_n(&node, w.device);
            if now.is_none_or(|n| n < *last) {
                lost_desired.push(format!(
                    "kill {k}: {} acknowledged {last}, twin holds {now:?}",
                    w.name
                ));
            }
        }
    }
    // Let the writers run once more against the last start, then stop them.
    std::thread::sleep(Duration::from_millis(500));
    for w in &mut writers {
        w.stop();
    }
    node.assert_running();
    let back = node.scenario(
        "kept_check",
        &["--prefix", "crash/", "--arg", &format!("n={kills}")],
    );
    let got: Vec<String> = back["got"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let expected: Vec<String> = (0..kills).map(|k| k.to_string()).collect();
    if back["present"] != true || got != expected {
        lost_desired.push(format!(
            "the kept session came back as {back}, expected its {kills} queued messages in order"
        ));
    }
    let kept_lost = expected.iter().filter(|e| !got.contains(e)).count();
    let numbers: Vec<u64> = got.iter().filter_map(|g| g.parse().ok()).collect();
    let kept_reordered = numbers.windows(2).filter(|p| p[1] < p[0]).count();

    let mut table = vec![
        format!("seed {seed}, {kills} kills: writer | QoS | acknowledged | lost | reordered"),
        format!("kept session, queued while away | 1 | {kills} | {kept_lost} | {kept_reordered}"),
    ];
    let mut failures = lost_desired.clone();
    for w in &writers {
        let acked = w.acked();
        assert!(
            acked.len() > 50,
            "{} got only {} acknowledgements:\n{}",
            w.name,
            acked.len(),
            node.log()
        );
        let (lost, reordered) = if w.kind == "desired" {
            let last = *acked.iter().max().unwrap();
            let held = desired_n(&node, w.device);
            let lost = usize::from(held.is_none_or(|n| n < last));
            if lost > 0 {
                failures.push(format!(
                    "{}: last acknowledged {last}, twin holds {held:?}",
                    w.name
                ));
            }
            (lost, 0)
        } else {
            let key = |p: &str| -> Option<u64> {
                let v: Value = serde_json::from_str(p).ok()?;
                (v["w"] == w.name.as_str()).then(|| v["n"].as_u64())?
            };
            let all_there = |msgs: &[(String, String)]| {
                let seen: std::collections::HashSet<u64> =
                    msgs.iter().filter_map(|(_, p)| key(p)).collect();
                acked.iter().all(|n| seen.contains(n))
            };
            // The outbox drains within seconds; a message still missing after a minute is lost.
            let deadline = Instant::now() + Duration::from_secs(60);
            let got = loop {
                let got = up.received();
                if all_there(&got) || Instant::now() > deadline {
                    break got;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let seen: Vec<u64> = got.iter().filter_map(|(_, p)| key(p)).collect();
            let set: std::collections::HashSet<u64> = seen.iter().copied().collect();
            let missing: Vec<u64> = acked.iter().copied().filter(|n| !set.contains(n)).collect();
            // In order: the first arrival of each number comes after the first arrival of every
            // smaller one (a resend after a reconnect may repeat older ones: "a b a b c").
            let mut firsts = Vec::new();
            let mut first_seen = std::collections::HashSet::new();
            for n in &seen {
                if first_seen.insert(*n) {
                    firsts.push(*n);
                }
            }
            let reordered = firsts.windows(2).filter(|p| p[1] < p[0]).count();
            if !missing.is_empty() {
                failures.push(format!(
                    "{}: {} acknowledged messages never reached the cloud, e.g. {:?}",
                    w.name,
                    missing.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
            if reordered > 0 {
                failures.push(format!("{}: {reordered} arrivals out of order", w.name));
            }
            (missing.len(), reordered)
        };
        table.push(format!(
            "{} | {} | {} | {lost} | {reordered}",
            w.name,
            w.qos,
            acked.len()
        ));
    }
    eprintln!("{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "acknowledged, then lost:\n{}\n{}\n{}",
        failures.join("\n"),
        table.join("\n"),
        node.log()
    );
    let started = Instant::now();
    assert!(node.stop().success());
    assert!(started.elapsed() < Duration::from_secs(30));
}
