//! Starting and stopping the brokers under test: free ports on 127.0.0.1, a guard that kills its
//! child on drop, readiness probes, peak memory (`VmHWM`), and the config files of Mosquitto and
//! `edgetwin serve`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Returns `n` distinct free TCP ports on 127.0.0.1 (all held open until every one is picked).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("cannot bind a free port on 127.0.0.1"))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr().context("local_addr of a free port")?.port()))
        .collect()
}

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped, also on error paths.
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("clone log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of the log if the child has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("try_wait")? {
            bail!(
                "{} exited early ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last 40 lines of the child's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Peak resident set size of the child so far (`VmHWM` in /proc/PID/status), in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        vm_hwm_kib(self.pid())
    }

    /// Kills and reaps the child now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads `VmHWM` (peak resident set size, KiB) from /proc/PID/status.
pub fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .with_context(|| format!("no VmHWM in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad VmHWM line {line:?}"))
}

/// Formats KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Waits until `addr` accepts TCP connections, the child is still alive, and `timeout` has not passed.
pub fn wait_tcp(child: &mut ChildGuard, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        child.check_running()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{addr} not accepting after {timeout:?}; log tail:\n{}",
                child.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `GET path` over HTTP/1.0 and returns the status code.
pub fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(4096).read_to_end(&mut buf).ok();
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in reply to GET {path}: {head:?}"))
}

/// Waits until `GET /readyz` answers 200.
pub fn wait_ready(child: &mut ChildGuard, http: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        child.check_running()?;
        let last = match http_status(http, "/readyz") {
            Ok(200) => return Ok(()),
            Ok(code) => format!("status {code}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "/readyz on {http} not 200 after {timeout:?} ({last}); log tail:\n{}",
                child.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mosquitto's queue settings, stated in every result table.
#[derive(Debug, Clone, Copy)]
pub struct MosquittoQueues {
    /// `max_inflight_messages`: QoS 1/2 messages in flight per client.
    pub max_inflight: u32,
    /// `max_queued_messages`: QoS 1/2 messages queued per client beyond those in flight.
    pub max_queued: u32,
}

impl MosquittoQueues {
    /// One-line description for tables.
    pub fn describe(&self) -> String {
        format!(
            "mosquitto: max_inflight_messages {}, max_queued_messages {}, set_tcp_nodelay true, persistence false",
            self.max_inflight, self.max_queued
        )
    }
}

/// A running Mosquitto with its own config file.
pub struct Mosquitto {
    /// The process.
    pub child: ChildGuard,
    /// Its MQTT listener.
    pub addr: SocketAddr,
}

impl Mosquitto {
    /// Writes a config in `dir` and starts `bin` on a free port of 127.0.0.1.
    pub fn start(bin: &Path, dir: &Path, queues: MosquittoQueues) -> Result<Mosquitto> {
        let port = free_ports(1)?[0];
        let conf = dir.join("mosquitto.conf");
        let mut text = String::new();
        writeln!(text, "listener {port} 127.0.0.1")?;
        writeln!(text, "allow_anonymous true")?;
        writeln!(text, "persistence false")?;
        writeln!(text, "set_tcp_nodelay true")?;
        writeln!(text, "max_inflight_messages {}", queues.max_inflight)?;
        writeln!(text, "max_queued_messages {}", queues.max_queued)?;
        writeln!(text, "log_dest stderr")?;
        writeln!(text, "log_type error")?;
        writeln!(text, "log_type warning")?;
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let mut child = ChildGuard::spawn("mosquitto", cmd, &dir.join("mosquitto.log"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_tcp(&mut child, addr, Duration::from_secs(10))?;
        Ok(Mosquitto { child, addr })
    }
}

/// A running `edgetwin serve`.
pub struct Edgetwin {
    /// The process.
    pub child: ChildGuard,
    /// MQTT 3.1.1 listener.
    pub mqtt: SocketAddr,
    /// HTTP endpoint.
    pub http: SocketAddr,
}

/// Settings of the embedded rumqttd as configured by the daemon (its defaults), stated in tables.
pub const EDGETWIN_QUEUES: &str =
    "edgetwin (rumqttd 0.20): max_inflight_messages 100 per client (daemon default), router queue 10000 packets per connection, no persistence of broker sessions";

impl Edgetwin {
    /// Writes a node config (and `profiles`, file name → YAML, into the devices folder) in `dir`
    /// and starts `bin serve`; returns when `/readyz` answers 200.
    pub fn start(bin: &Path, dir: &Path, profiles: &[(&str, String)]) -> Result<Edgetwin> {
        let ports = free_ports(3)?;
        let data = dir.join("data");
        let devices = dir.join("devices");
        std::fs::create_dir_all(&data).context("create data dir")?;
        std::fs::create_dir_all(&devices).context("create devices dir")?;
        for (name, yaml) in profiles {
            std::fs::write(devices.join(name), yaml)
                .with_context(|| format!("write profile {name}"))?;
        }
        let conf = dir.join("edgetwin.yaml");
        let mut text = String::new();
        writeln!(text, "node_id: bench")?;
        writeln!(text, "data_dir: {}", data.display())?;
        writeln!(text, "devices_dir: {}", devices.display())?;
        writeln!(text, "mqtt:")?;
        writeln!(text, "  listen: 127.0.0.1:{}", ports[0])?;
        writeln!(text, "  listen_v5: 127.0.0.1:{}", ports[1])?;
        writeln!(text, "http:")?;
        writeln!(text, "  listen: 127.0.0.1:{}", ports[2])?;
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(&conf);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = ChildGuard::spawn("edgetwin", cmd, &dir.join("edgetwin.log"))?;
        let mqtt = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let http = SocketAddr::from(([127, 0, 0, 1], ports[2]));
        wait_ready(&mut child, http, Duration::from_secs(30))?;
        wait_tcp(&mut child, mqtt, Duration::from_secs(10))?;
        Ok(Edgetwin { child, mqtt, http })
    }
}

/// Finds the `edgetwin` binary: `explicit` if given, else `target/release/edgetwin` next to the
/// running benchmark binary.
pub fn find_edgetwin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("edgetwin binary {} not found", p.display());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("benchmark binary has no parent dir")?;
    let candidate = dir.join("edgetwin");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "edgetwin binary not found at {} (build it with `cargo build --release -p edgetwin-node`, or pass --edgetwin PATH)",
            candidate.display()
        )
    }
}

/// Finds Mosquitto: `explicit` if given, else /usr/sbin/mosquitto, else `mosquitto` on PATH.
pub fn find_mosquitto(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() {
        sbin
    } else {
        PathBuf::from("mosquitto")
    }
}

/// A profile YAML with the `thermostat` model and devices `bench-0..n-1`.
pub fn thermostat_profile(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  protocol: modbus
  properties:
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: -1000000000, maximum: 1000000000}
    - {name: temperature, type: float, accessMode: ReadOnly}
",
    );
    for i in 0..n {
        let _ = write!(
            s,
            "---
apiVersion: edgetwin/v1
kind: Device
metadata: {{name: bench-{i}}}
spec:
  deviceModelRef: thermostat
  protocol:
    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: 502, slaveID: 1}}
  properties:
    - name: temperature
      collectCycle: 1s
      visitors:
        modbus: {{register: HoldingRegister, offset: 0, limit: 2, dataType: float32}}
"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_profile_loads_with_the_real_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bench.yaml"), thermostat_profile(3)).expect("write");
        let (set, errors) = edgetwin_profile::load_dir(dir.path());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.resolved().count(), 3);
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(3).expect("ports");
        assert!(p[0] != p[1] && p[1] != p[2] && p[0] != p[2]);
    }
}
