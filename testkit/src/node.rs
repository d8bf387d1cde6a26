//! The node under test: the real `edgetwin` binary on free loopback ports in a temp dir.

use super::*;

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

/// The `edgetwin` binary: `$EDGETWIN_BIN`, else the one in this workspace's target dir, which
/// `cargo test --workspace` builds; when it is missing (one crate's tests run alone) it is built
/// here. Building it again when present would re-resolve features and relink it for nothing.
pub fn edgetwin_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EDGETWIN_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_bin("edgetwin-node", "edgetwin"))
        .clone()
}

/// Binary `bin` of workspace package `package` in the target dir the running test was built
/// in, built there first when it is missing.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let path = profile_dir.join(bin);
    if path.exists() {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(["build", "-q", "-p", package, "--bin", bin]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        c.arg("--release");
    }
    let status = c.current_dir(env!("CARGO_MANIFEST_DIR")).status().unwrap();
    assert!(status.success(), "cannot build the {bin} binary");
    path
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub port_v5: u16,
    pub http_port: u16,
    child: Option<Child>,
    scan_interval_ms: u64,
    data_dir: Option<PathBuf>,
    /// The user the helpers that read and write twins ([`Node::twin`], [`Node::pub_`]) log in
    /// as; `None`: anonymous, which the node accepts from loopback unless a credentials file is
    /// configured.
    pub login: Option<(String, String)>,
    /// `serve`'s arguments after `--config`, and environment variables, at every (re)start.
    launch: Launch,
}

/// Extra arguments and environment of the node process.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Arguments after `serve --config FILE` (e.g. `--log-file`).
    pub args: Vec<String>,
    /// Environment variables besides `EDGETWIN_LOG` (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// Where standard error goes: `None` is the node's `node.log`.
    pub stderr_to: Option<PathBuf>,
    /// Log with the node's own default filter (no `EDGETWIN_LOG`), as an operator's node does;
    /// otherwise `info,edgetwin=debug`.
    pub default_log: bool,
}

/// A node to start with more than the defaults of [`Node::start`].
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Thermostat devices in the devices folder.
    pub devices: Vec<String>,
    /// Top-level config sections appended to the node config (e.g. `bridge:`).
    pub extra_yaml: String,
    /// Keys of the `http:` section besides `listen` (e.g. `header_timeout_ms: 500`), one per line.
    pub http_keys: Vec<String>,
    /// `devices_scan_interval_ms` (default 200).
    pub scan_interval_ms: u64,
    /// `data_dir` (default: `data` in the node's temp dir).
    pub data_dir: Option<PathBuf>,
    /// Extra arguments and environment of the process.
    pub launch: Launch,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            devices: Vec::new(),
            extra_yaml: String::new(),
            http_keys: Vec::new(),
            scan_interval_ms: 200,
            data_dir: None,
            launch: Launch::default(),
        }
    }
}

impl NodeSpec {
    /// Starts the node and waits until it is ready.
    pub fn start(self) -> Node {
        let mut node = self.prepare();
        node.spawn();
        node
    }

    /// The node on its ports with its config and devices written, not started yet
    /// ([`Node::spawn`] starts it).
    pub fn prepare(self) -> Node {
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
        node.launch = self.launch;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(node.config_path())
            .unwrap();
        // `http:` is the last section of the written config: its keys go right after it.
        for k in &self.http_keys {
            writeln!(f, "  {k}").unwrap();
        }
        f.write_all(self.extra_yaml.as_bytes()).unwrap();
        drop(f);
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
            login: None,
            launch: Launch::default(),
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

    /// The node's config file.
    pub fn config_path(&self) -> PathBuf {
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
        let stderr = self
            .launch
            .stderr_to
            .clone()
            .unwrap_or_else(|| self.dir.path().join("node.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let mut c = Command::new(edgetwin_bin());
        if self.launch.default_log {
            c.env_remove("EDGETWIN_LOG");
        } else {
            c.env("EDGETWIN_LOG", "info,edgetwin=debug");
        }
        let child = c
            .args(["serve", "--config"])
            .arg(self.config_path())
            .args(&self.launch.args)
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
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

    /// Runs scenario `name` of `testkit/clients/conformance.py` (a paho-mqtt client) against
    /// the node's front door with `args`, and returns the JSON object it printed.
    pub fn scenario(&self, name: &str, args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/conformance.py");
        let out = run(Command::new(python())
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .args(args)
            .arg(name));
        assert!(
            out.status.success(),
            "scenario {name} failed: {}\n{}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        serde_json::from_str(&last)
            .unwrap_or_else(|e| panic!("scenario {name} printed {last}: {e}"))
    }

    /// The node's count of messages written to kept sessions' queues since it started.
    pub fn queued_total(&self) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("edgetwin_gate_queued_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
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
        http_get(self.http_port, path, &[]).map(|r| (r.status, r.body))
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
        mosquitto_pub(self.port, topic, payload, &self.login_args());
    }

    /// `-u user -P password` for mosquitto_* when [`Node::login`] is set.
    pub fn login_args(&self) -> Vec<&str> {
        match &self.login {
            Some((u, p)) => vec!["-u", u.as_str(), "-P", p.as_str()],
            None => Vec::new(),
        }
    }

    /// The retained twin document, read with mosquitto_sub.
    pub fn twin(&self, device: &str) -> Value {
        let out = run(Command::new("mosquitto_sub")
            .args([
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
            ])
            .args(self.login_args()));
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
        retained_as(self.port, topic, &self.login_args())
    }

    /// Waits (up to `limit`) until the retained message on `topic` satisfies `pred`
    /// (`None` = nothing retained).
    pub fn retained_until(
        &self,
        topic: &str,
        limit: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        retained_until_as(self.port, topic, &self.login_args(), limit, pred)
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
