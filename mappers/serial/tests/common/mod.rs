//! Shared test helpers: a socat pty pair, the scripted device (`tests/sim/serial_sim.py`) on one
//! end of it, and profiles (the example profile with the pty substituted for its port, and a lab
//! profile with short cycles) resolved through the real loader.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgetwin_profile::ResolvedDevice;
use serde_json::Value;

pub use edgetwin_testkit::PtyPair;

pub const SIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/serial_sim.py");
pub const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/profiles/serial-sensor.yaml"
);

/// The scripted device on one end of a pty pair; killed on drop.
pub struct Sim {
    child: Child,
    stdin: ChildStdin,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sim {
    /// Starts the device on `path` and waits until it has the port open.
    pub fn start(path: &str) -> Sim {
        let python = edgetwin_testkit::python();
        edgetwin_testkit::require(&python);
        let mut child = Command::new(&python)
            .arg(SIM)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line);
            }
        });
        let errs = Arc::new(Mutex::new(String::new()));
        let e2 = errs.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut e = e2.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let mut sim = Sim {
            child,
            stdin,
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !sim.lines.lock().unwrap().iter().any(|l| l == "READY") {
            if let Ok(Some(status)) = sim.child.try_wait() {
                let e = errs.lock().unwrap().clone();
                assert!(
                    !e.contains("No module named"),
                    "pyserial is not installed; run ./test.sh: {e}"
                );
                panic!("serial simulator exited ({status}): {e}");
            }
            assert!(Instant::now() < deadline, "serial simulator not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        sim
    }

    /// Sends one control command (see the simulator's doc).
    pub fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Every line the device has received so far.
    pub fn received(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["rx"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until the device has received `line`.
    pub fn wait_received(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.received().iter().any(|l| l == line) {
            assert!(
                Instant::now() < deadline,
                "the device never received {line:?}; it got: {:?}",
                self.received()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example profile (examples/profiles/serial-sensor.yaml) with only its port replaced by
/// `path`: its by-id path names hardware that is not here.
pub fn example_profile(path: &str) -> String {
    let yaml = std::fs::read_to_string(EXAMPLE).unwrap();
    let mut replaced = 0;
    let out: Vec<String> = yaml
        .lines()
        .map(|l| match l.split_once("port: ") {
            Some((indent, _)) if indent.trim().is_empty() => {
                replaced += 1;
                format!("{indent}port: {path}")
            }
            _ => l.to_string(),
        })
        .collect();
    assert_eq!(replaced, 1, "the example profile has one port line");
    out.join("\n") + "\n"
}

/// A profile for the same device with every property read every 300 ms, plus `level`, an int
/// sent unsolicited as `LEVEL=<n>` (for garbled values).
pub fn lab_profile(path: &str) -> String {
    format!(
        r#"apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {{name: co2-analyser}}
spec:
  protocol: serial
  properties:
    - {{name: co2, type: int, accessMode: ReadOnly}}
    - {{name: temperature, type: float, accessMode: ReadOnly}}
    - {{name: alarm, type: boolean, accessMode: ReadOnly}}
    - {{name: level, type: int, accessMode: ReadOnly}}
    - {{name: alarm_threshold, type: int, accessMode: ReadWrite, minimum: 400, maximum: 5000}}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {{name: co2-lab-1}}
spec:
  deviceModelRef: co2-analyser
  protocol:
    serial: {{port: {path}, baudRate: 9600, lineEnding: "\r\n", timeout: 500ms}}
  properties:
    - name: co2
      collectCycle: 300ms
      visitors:
        serial: {{request: "READ CO2\r\n", pattern: '^CO2=(\d+)ppm$'}}
    - name: temperature
      collectCycle: 300ms
      visitors:
        serial: {{request: "READ T\r\n", pattern: '^T=(?P<value>-?\d+(\.\d+)?)C$'}}
    - name: alarm
      collectCycle: 300ms
      visitors:
        serial: {{unsolicited: true, pattern: '^ALARM=([01])$'}}
    - name: level
      collectCycle: 300ms
      visitors:
        serial: {{unsolicited: true, pattern: '^LEVEL=(\S+)$'}}
    - name: alarm_threshold
      collectCycle: 300ms
      visitors:
        serial: {{request: "GET SETPOINT\r\n", pattern: '^SETPOINT=(\d+)$', write: "SETPOINT {{value}}\r\n"}}
"#
    )
}

/// The resolved device of a profile, through the real loader and validation.
pub fn resolve(yaml: &str, device: &str) -> ResolvedDevice {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (set, errors) = edgetwin_profile::load_dir(dir.path());
    assert!(errors.is_empty(), "profile errors: {errors:?}\n{yaml}");
    let id = edgetwin_contract::DeviceId::new(device).unwrap();
    set.resolve(&id).unwrap()
}
