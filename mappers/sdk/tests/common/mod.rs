//! Shared pieces of the SDK's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod memory;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgetwin_mapper_sdk::{run, RuntimeOptions};
use edgetwin_testkit::Node;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use memory::MemoryDriver;

/// A model and `devices` memory devices (`sim-1`, `sim-2`, ...), serial ports `mem-sim-N`.
/// temperature: report on change with deadband 0.5, telemetry; humidity: every reading;
/// setpoint: writable. Every property is read every 200 ms.
pub fn profile(devices: &[&str]) -> String {
    let mut y = String::from(
        r#"apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: sim-thermostat}
spec:
  protocol: serial
  properties:
    - {name: temperature, type: float, accessMode: ReadOnly}
    - {name: humidity, type: float, accessMode: ReadOnly}
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: 5, maximum: 35}
"#,
    );
    for d in devices {
        y.push_str(&format!(
            r#"---
apiVersion: edgetwin/v1
kind: Device
metadata: {{name: {d}}}
spec:
  deviceModelRef: sim-thermostat
  protocol:
    serial: {{port: mem-{d}}}
  properties:
    - name: temperature
      collectCycle: 200ms
      reportCycle: 1h
      reportOnChange: {{deadband: 0.5}}
      telemetry: true
      visitors: {{serial: {{request: "20.0", pattern: "(.*)"}}}}
    - name: humidity
      collectCycle: 200ms
      visitors: {{serial: {{request: "40", pattern: "(.*)"}}}}
    - name: setpoint
      collectCycle: 200ms
      visitors: {{serial: {{request: "18.0", pattern: "(.*)", write: "{{value}}"}}}}
"#
        ));
    }
    y
}

/// The SDK runtime running in this test process (own thread, own tokio runtime) with the
/// memory driver; stopped (cleanly) when dropped.
pub struct InProcess {
    token: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    pub fn start(node: &Node, driver: MemoryDriver) -> InProcess {
        let mut opts = RuntimeOptions::new(format!("127.0.0.1:{}", node.port));
        opts.metrics_interval = Duration::from_millis(200);
        let token = opts.shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(driver, opts)).unwrap();
        });
        InProcess {
            token,
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An MQTT subscriber (rumqttc, in a thread) that is subscribed when `new` returns.
pub struct Watch {
    client: Client,
    rx: mpsc::Receiver<(String, Value)>,
}

impl Watch {
    pub fn new(port: u16, filter: &str) -> Watch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("sdk-watch-{}-{n}", std::process::id());
        let (client, mut conn) = Client::new(MqttOptions::new(id, "127.0.0.1", port), 256);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic.to_string(), v)).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watch subscribed");
        Watch { client, rx }
    }

    /// The first message (topic, JSON payload) satisfying `pred` within 15 s.
    pub fn next_matching(&self, pred: impl Fn(&str, &Value) -> bool) -> (String, Value) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, v)) if pred(&t, &v) => return (t, v),
                Ok(_) => {}
                Err(_) => panic!("no matching message within 15 s"),
            }
        }
    }
}

impl Watch {
    /// Every message received so far and not taken yet.
    pub fn drain(&self) -> Vec<(String, Value)> {
        self.rx.try_iter().collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Waits until `f` holds (15 s at most).
pub fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The retained `state` of `dt/{device}/status`, if any.
pub fn status(node: &Node, device: &str) -> Option<String> {
    node.retained(&format!("dt/{device}/status"))
        .and_then(|v| v["state"].as_str().map(str::to_owned))
}

/// The `memory_mapper` example binary (built here when missing).
pub fn memory_mapper_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("examples").join("memory_mapper");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "edgetwin-mapper-sdk",
                "--example",
                "memory_mapper",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "cannot build the memory_mapper example");
    }
    bin
}
