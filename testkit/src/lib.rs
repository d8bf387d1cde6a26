//! Test harness shared by every crate's integration tests: starts the real `edgetwin` binary on
//! free loopback ports in a temp dir and drives it only with third-party clients
//! (mosquitto_pub/sub/rr, and paho-mqtt through `clients/mqtt_probe.py`).
//!
//! Peers are never skipped: a missing one fails the test with a pointer to `./test.sh`, which
//! installs them.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc, missing_docs)]

pub mod docker;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Adds a user to a gate credentials file with `edgetwin user add` (password on stdin).
pub fn user_add(creds: &Path, name: &str, role: &str, protocol: Option<&str>, pw: &str) {
    let mut c = Command::new(edgetwin_bin());
    c.args(["user", "add", name, "--role", role, "--credentials"])
        .arg(creds);
    if let Some(p) = protocol {
        c.args(["--protocol", p]);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{pw}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosquitto_pub -q 1` as `user` (MQTT 5 with `v5`); the output, to check refusals too.
pub fn publish_as(port: u16, user: &str, pw: &str, topic: &str, msg: &str, v5: bool) -> Output {
    let mut extra = vec!["-u", user, "-P", pw];
    if v5 {
        extra.extend(["-V", "mqttv5"]);
    }
    mosquitto_pub_output(port, topic, msg, &extra)
}

/// Polls `probe` every 20 ms until it returns something, for at most `within`.
pub fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails (never skips) when a peer program is missing: `./test.sh` installs them.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "peer `{program}` is not installed; run ./test.sh, which installs every peer"
    );
}

/// The `edgetwin` binary: `$EDGETWIN_BIN`, else the one in this workspace's target dir, which
/// `cargo test --workspace` builds; when it is missing (one crate's tests run alone) it is built
/// here. Building it again when present would re-resolve features and relink it for nothing.
pub fn edgetwin_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EDGETWIN_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test-binary>
            let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
            let bin = profile_dir.join("edgetwin");
            if bin.exists() {
                return bin;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut c = Command::new(cargo);
            c.args(["build", "-q", "-p", "edgetwin-node", "--bin", "edgetwin"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                c.arg("--release");
            }
            let status = c.current_dir(env!("CARGO_MANIFEST_DIR")).status().unwrap();
            assert!(status.success(), "cannot build the edgetwin binary");
            bin
        })
        .clone()
}

/// The Python interpreter that has the peers' packages.
pub fn python() -> String {
    std::env::var("EDGETWIN_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub port_v5: u16,
    pub http_port: u16,
    child: Option<Child>,
    scan_interval_ms: u64,
    data_dir: Option<PathBuf>,
}

/// A node to start with more than the defaults of [`Node::start`].
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Thermostat devices in the devices folder.
    pub devices: Vec<String>,
    /// Top-level config sections appended to the node config (e.g. `bridge:`).
    pub extra_yaml: String,
    /// `devices_scan_interval_ms` (default 200).
    pub scan_interval_ms: u64,
    /// `data_dir` (default: `data` in the node's temp dir).
    pub data_dir: Option<PathBuf>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            devices: Vec::new(),
            extra_yaml: String::new(),
            scan_interval_ms: 200,
            data_dir: None,
        }
    }
}

impl NodeSpec {
    /// Starts the node and waits until it is ready.
    pub fn start(self) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let devdir = dir.path().join("devices");
        std::fs::create_dir_all(&devdir).unwrap();
        let mut yaml = MODEL_YAML.to_string();
        for d in &self.devices {
            yaml.push_str("---\n");
            yaml.push_str(&device_yaml(d));
        }
        std::fs::write(devdir.join("thermostats.yaml"), yaml).unwrap();
        let mut node = Node::new(dir, self.scan_interval_ms, self.data_dir);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(node.config_path())
            .unwrap();
        f.write_all(self.extra_yaml.as_bytes()).unwrap();
        drop(f);
        node.spawn();
        node
    }
}

pub const MODEL_YAML: &str = r#"apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  protocol: modbus
  properties:
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: 5, maximum: 35, unit: "°C"}
    - {name: mode, type: string, accessMode: ReadWrite}
    - {name: fan, type: int, accessMode: ReadWrite, default: 2}
    - {name: relay, type: boolean, accessMode: ReadWrite}
    - {name: temperature, type: float, accessMode: ReadOnly, unit: "°C"}
"#;

pub fn device_yaml(name: &str) -> String {
    format!(
        r#"apiVersion: edgetwin/v1
kind: Device
metadata: {{name: {name}}}
spec:
  deviceModelRef: thermostat
  protocol:
    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: 5020, slaveID: 1}}
  properties:
    - name: temperature
      collectCycle: 1s
      visitors:
        modbus: {{register: InputRegister, offset: 0, limit: 2, dataType: float32}}
"#
    )
}

impl Node {
    /// A node with the thermostat model and the given devices in its devices folder.
    pub fn start(devices: &[&str]) -> Node {
        Node::start_with_config(devices, "")
    }

    /// A node whose devices folder holds one file, `profile.yaml`, with `yaml` (models and
    /// devices of any protocol). Rewrite it with [`Node::write_profile`] to add or remove devices.
    pub fn start_with_profile(yaml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let devdir = dir.path().join("devices");
        std::fs::create_dir_all(&devdir).unwrap();
        std::fs::write(devdir.join("profile.yaml"), yaml).unwrap();
        Node::start_in(dir)
    }

    /// Replaces `profile.yaml` in the devices folder (the node rescans it every 200 ms). Written
    /// to a temp name and renamed, so the node never reads half a file.
    pub fn write_profile(&self, yaml: &str) {
        let tmp = self.dir.path().join("profile.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.devices_dir().join("profile.yaml")).unwrap();
    }

    /// A node on free ports with its config written, not started.
    fn new(dir: tempfile::TempDir, scan_interval_ms: u64, data_dir: Option<PathBuf>) -> Node {
        let node = Node {
            dir,
            port: free_port(),
            port_v5: free_port(),
            http_port: free_port(),
            child: None,
            scan_interval_ms,
            data_dir,
        };
        node.write_config();
        node
    }

    fn start_in(dir: tempfile::TempDir) -> Node {
        let mut node = Node::new(dir, 200, None);
        node.spawn();
        node
    }

    pub fn devices_dir(&self) -> PathBuf {
        self.dir.path().join("devices")
    }

    /// The node's data folder (twin store, outbox, applied profiles).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The node process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// Panics (with the log) unless the node process is still running.
    pub fn assert_running(&mut self) {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!("node exited ({status}):\n{}", self.log());
        }
    }

    /// Waits until the node's log satisfies `pred`; returns the log.
    pub fn log_until(&self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_for(within, || Some(self.log()).filter(|l| pred(l)))
            .unwrap_or_else(|| panic!("log condition not met within {within:?}:\n{}", self.log()))
    }

    /// Waits until the `/metrics` text satisfies `pred`; returns it.
    pub fn metrics_until(&self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_for(within, || Some(self.metrics()).filter(|m| pred(m))).unwrap_or_else(|| {
            panic!(
                "metrics condition not met within {within:?}:\n{}",
                self.metrics()
            )
        })
    }

    /// Waits until `GET /readyz` answers `status`; returns the body.
    pub fn readyz_until(&self, status: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok((s, body)) = self.http_get("/readyz") {
                if s == status {
                    return body;
                }
                last = Some((s, body));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "/readyz never answered {status} within {within:?}; last {last:?}:\n{}",
            self.log()
        );
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("node.yaml")
    }

    fn write_config(&self) {
        let cfg = format!(
            "node_id: test-node\ndata_dir: {data}\ndevices_dir: {dev}\ndevices_scan_interval_ms: {scan}\n\
             mqtt:\n  listen: 127.0.0.1:{p}\n  listen_v5: 127.0.0.1:{p5}\nhttp:\n  listen: 127.0.0.1:{h}\n",
            data = self.data_dir().display(),
            scan = self.scan_interval_ms,
            dev = self.devices_dir().display(),
            p = self.port,
            p5 = self.port_v5,
            h = self.http_port,
        );
        std::fs::write(self.config_path(), cfg).unwrap();
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .unwrap();
        let child = Command::new(edgetwin_bin())
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("EDGETWIN_LOG", "info,edgetwin=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("node exited during start-up ({status}):\n{}", self.log());
                }
            }
            if self
                .http_get("/readyz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node not ready within 20 s:\n{}", self.log());
    }

    /// A plain HTTP/1.1 GET against the node; (status, body).
    pub fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let status = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node running");
        signal(child.id(), "TERM");
        wait_exit(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("node running");
        signal(child.id(), "KILL");
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Sends one MQTT 3.1.1 message with mosquitto_pub.
    pub fn pub_(&self, topic: &str, payload: &str) {
        mosquitto_pub(self.port, topic, payload, &[]);
    }

    /// The retained twin document, read with mosquitto_sub.
    pub fn twin(&self, device: &str) -> Value {
        let out = run(Command::new("mosquitto_sub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-t",
            &format!("dt/{device}/twin"),
            "-C",
            "1",
            "-W",
            "5",
        ]));
        assert!(
            out.status.success(),
            "no retained twin for {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until the retained twin satisfies `pred`.
    pub fn twin_until(&self, device: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = self.twin(device);
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "twin of {device} never matched; last: {t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The retained message on `topic` (JSON, or `Value::Null` for a non-JSON payload), if any.
    pub fn retained(&self, topic: &str) -> Option<Value> {
        retained(self.port, topic)
    }

    /// Waits (up to `limit`) until the retained message on `topic` satisfies `pred`
    /// (`None` = nothing retained).
    pub fn retained_until(
        &self,
        topic: &str,
        limit: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        retained_until(self.port, topic, limit, pred)
    }

    /// Runs the paho probe: subscribe `subs`, then publish `pubs`, collect `count` messages.
    pub fn probe(&self, subs: &[&str], pubs: &[(&str, &str)], count: usize) -> Vec<Value> {
        probe(self.port, false, subs, pubs, count, &[])
    }

    pub fn metrics(&self) -> String {
        self.http_get("/metrics").unwrap().1
    }

    /// Runs the `edgetwin` CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(edgetwin_bin());
        c.args(args)
            .env("EDGETWIN_BROKER", format!("127.0.0.1:{}", self.port));
        run(&mut c)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"))
}

pub fn mosquitto_pub(port: u16, topic: &str, payload: &str, extra: &[&str]) {
    let out = mosquitto_pub_output(port, topic, payload, extra);
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosquitto_pub -q 1` with `extra` arguments; its output, whatever the outcome.
pub fn mosquitto_pub_output(port: u16, topic: &str, payload: &str, extra: &[&str]) -> Output {
    require("mosquitto_pub");
    run(Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .args(extra))
}

pub fn probe(
    port: u16,
    v5: bool,
    subs: &[&str],
    pubs: &[(&str, &str)],
    count: usize,
    extra: &[&str],
) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/mqtt_probe.py");
    let mut c = Command::new(python());
    c.arg(script)
        .args(["--port", &port.to_string(), "--count", &count.to_string()]);
    if v5 {
        c.arg("--v5");
    }
    for s in subs {
        c.args(["--sub", s]);
    }
    for (t, p) in pubs {
        c.args(["--pub", t, p]);
    }
    c.args(extra);
    let out = run(&mut c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "paho-mqtt is not installed; run ./test.sh: {stderr}"
    );
    let msgs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        out.status.success(),
        "probe got {} of {count} messages (exit {:?}): {msgs:?} {stderr}",
        msgs.len(),
        out.status.code()
    );
    msgs
}

/// A scripted Python peer (a device simulator): its stdout lines are collected, its stderr kept
/// for error messages, and `start` returns once it printed `READY`. Killed on drop.
pub struct ScriptPeer {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    errs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ScriptPeer {
    /// Runs `script args` with the test Python and waits up to `ready_within` for `READY`;
    /// `packages` names what to install when the script cannot import them.
    pub fn start(
        script: &str,
        args: &[String],
        packages: &str,
        ready_within: Duration,
    ) -> ScriptPeer {
        use std::io::BufRead;
        require(&python());
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let errs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (out, l) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let (err, e) = (child.stderr.take().unwrap(), errs.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut e = e.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let mut peer = ScriptPeer { child, lines, errs };
        let deadline = Instant::now() + ready_within;
        while !peer.lines().iter().any(|l| l == "READY") {
            if let Ok(Some(status)) = peer.child.try_wait() {
                let e = peer.errs.lock().unwrap().clone();
                assert!(
                    !e.contains("No module named"),
                    "{packages} is not installed; run ./test.sh: {e}"
                );
                panic!("{script} exited ({status}): {e}");
            }
            assert!(
                Instant::now() < deadline,
                "{script} not ready: {}",
                peer.errs.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The stdout lines that are JSON, in order.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Kills the peer (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ScriptPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A linked pair of pseudo terminals made by socat (one end for a scripted device, the other for
/// the mapper); killed on drop.
pub struct PtyPair {
    child: Child,
    /// One end (`/dev/pts/N`).
    pub a: String,
    /// The other end.
    pub b: String,
}

impl PtyPair {
    /// Starts socat and waits (up to 10 s each) for the two pty names it prints.
    pub fn new() -> PtyPair {
        require("socat");
        let mut child = Command::new("socat")
            .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in err.lines() {
                let Ok(line) = line else { break };
                // "... N PTY is /dev/pts/7"
                if let Some(p) = line.split("PTY is ").nth(1) {
                    let _ = tx.send(p.trim().to_string());
                }
            }
        });
        let a = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let b = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        PtyPair { child, a, b }
    }
}

impl Default for PtyPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mapper binary running against a node (`--broker 127.0.0.1:{node.port}`), its stderr in
/// `mapper.log` beside the node's files; killed on drop.
pub struct MapperProcess {
    child: Child,
    log: PathBuf,
}

impl MapperProcess {
    /// Starts `bin` against `node` with extra environment variables.
    pub fn start(node: &Node, bin: &str, env: &[(&str, &std::ffi::OsStr)]) -> MapperProcess {
        let log = node.dir.path().join("mapper.log");
        let mut c = Command::new(bin);
        c.args(["--broker", &format!("127.0.0.1:{}", node.port)]);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        MapperProcess { child, log }
    }

    /// What the mapper logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the mapper has exited.
    pub fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "mapper exited:\n{}",
            self.log()
        );
    }

    /// Asserts the mapper still runs, then stops it with SIGTERM and expects exit code 0 within 5 s.
    pub fn assert_running_then_stop_cleanly(&mut self) {
        self.assert_running();
        signal(self.child.id(), "TERM");
        let status = wait_exit(&mut self.child, Duration::from_secs(5));
        assert!(
            status.success(),
            "exit {status} after SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for MapperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The retained message on `topic` at the broker on `port` (JSON, or `Value::Null` for a non-JSON
/// payload), if any.
pub fn retained(port: u16, topic: &str) -> Option<Value> {
    require("mosquitto_sub");
    let out = run(Command::new("mosquitto_sub").args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "--retained-only",
        "-C",
        "1",
        "-W",
        "1",
    ]));
    if !out.status.success() || out.stdout.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// Waits (up to `limit`) until the retained message on `topic` at the broker on `port`
/// satisfies `pred` (`None` = nothing retained).
pub fn retained_until(
    port: u16,
    topic: &str,
    limit: Duration,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let v = retained(port, topic);
        if pred(v.as_ref()) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "retained message on {topic} (port {port}) never matched within {limit:?}; last: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON payload of a probe message.
pub fn payload(m: &Value) -> Value {
    serde_json::from_str(m["payload"].as_str().unwrap()).unwrap()
}

/// The first message on `topic`.
pub fn on<'a>(msgs: &'a [Value], topic: &str) -> &'a Value {
    msgs.iter()
        .find(|m| m["topic"] == topic)
        .unwrap_or_else(|| panic!("no message on {topic}: {msgs:?}"))
}

// ---------------------------------------------------------------------------------------------
// The cloud side of the bridge: a real Mosquitto, a subscriber on it, and a TCP proxy that can
// cut the link while both ends keep running.

impl Node {
    /// Like [`Node::start`], with `extra_yaml` (top-level sections, e.g. `bridge:`) appended to the
    /// node config.
    pub fn start_with_config(devices: &[&str], extra_yaml: &str) -> Node {
        NodeSpec {
            devices: devices.iter().map(|d| d.to_string()).collect(),
            extra_yaml: extra_yaml.to_string(),
            ..NodeSpec::default()
        }
        .start()
    }

    /// Waits until the bridge reports a cloud connection.
    pub fn wait_bridge_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.metric("edgetwin_bridge_connected") != Some(1.0) {
            assert!(
                Instant::now() < deadline,
                "bridge never connected:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of one metric line (`name{labels}` exactly as exported), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// The Mosquitto binary (`/usr/sbin` is not on every user's PATH).
pub fn mosquitto_bin() -> String {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto".into()
    } else {
        require("mosquitto");
        "mosquitto".into()
    }
}

/// A Mosquitto on a free 127.0.0.1 port, playing the cloud broker. Sessions persist across
/// [`Mosquitto::stop`]/[`Mosquitto::restart`] (persistence file in its own temp dir).
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\n\
             autosave_interval 1\nmax_queued_messages 1000000\nmax_inflight_messages 100\nset_tcp_nodelay true\n\
             log_dest file {dir}/mosquitto.log\n",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        // Started as root, Mosquitto drops to its own user, which must still write its files.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.restart();
        m
    }

    /// Starts it again on the same port (after [`Mosquitto::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (it saves its sessions) and wait.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("mosquitto running");
        signal(child.id(), "TERM");
        wait_exit(&mut child, Duration::from_secs(10));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Publishes one message (QoS 1) at this broker.
    pub fn pub_(&self, topic: &str, payload: &str) {
        mosquitto_pub(self.port, topic, payload, &[]);
    }

    /// The retained message on `topic` (JSON, or `Value::Null` for a non-JSON payload), if any.
    pub fn retained(&self, topic: &str) -> Option<Value> {
        retained(self.port, topic)
    }

    /// Waits (up to `limit`) until the retained message on `topic` satisfies `pred`.
    pub fn retained_until(
        &self,
        topic: &str,
        limit: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        retained_until(self.port, topic, limit, pred)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `mosquitto_sub` with a persistent session (QoS 1), collecting `(topic, payload)` lines in
/// the background. mosquitto_sub exits when its broker goes away; it is started again (same
/// client id, so the broker delivers what it queued for the session meanwhile).
pub struct Subscriber {
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pid: std::sync::Arc<std::sync::Mutex<Option<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    pub fn start(port: u16, client_id: &str, topic: &str) -> Subscriber {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        require("mosquitto_sub");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(Mutex::new(None));
        let (sink, halt, pid_slot) = (got.clone(), stop.clone(), pid.clone());
        let (client_id, topic) = (client_id.to_string(), topic.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            use std::io::BufRead;
            while !halt.load(Ordering::SeqCst) {
                let child = Command::new("mosquitto_sub")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-q",
                        "1",
                        "-c",
                        "-i",
                        &client_id,
                        "-t",
                        &topic,
                        "-v",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn();
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                *pid_slot.lock().unwrap() = Some(child.id());
                let _ = ready_tx.send(());
                if let Some(stdout) = child.stdout.take() {
                    for line in std::io::BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        let (t, p) = line.split_once(' ').unwrap_or((&line, ""));
                        sink.lock().unwrap().push((t.to_string(), p.to_string()));
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
                *pid_slot.lock().unwrap() = None;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        // mosquitto_sub has subscribed once it is connected; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        Subscriber {
            got,
            stop,
            pid,
            thread: Some(thread),
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<(String, String)> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over everything received (up to `limit`).
    pub fn wait_until(
        &self,
        limit: Duration,
        pred: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "cloud subscriber condition not met within {limit:?}; got {} messages, last: {:?}",
                got.len(),
                got.last()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(pid) = *self.pid.lock().unwrap() {
            signal(pid, "KILL");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP proxy on a free 127.0.0.1 port in front of `target_port`; [`TcpProxy::cut`] drops
/// every connection and refuses new ones until [`TcpProxy::heal`] (a network partition).
pub struct TcpProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    pub fn start(target_port: u16) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, s, k) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if c.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut k = k.lock().unwrap();
                            k.push(client.try_clone().unwrap());
                            k.push(server.try_clone().unwrap());
                        }
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TcpProxy {
            port,
            cut,
            stop,
            conns,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }
}
