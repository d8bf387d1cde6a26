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

    /// The child's exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child.try_wait().context("try_wait")
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

    /// Current resident set size of the child (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        vm_rss_kib(self.pid())
    }

    /// CPU seconds the child has used so far (user + system, `/proc/PID/stat`).
    pub fn cpu_secs(&self) -> Result<f64> {
        cpu_secs(self.pid())
    }

    /// Sends SIGTERM (via `kill -TERM`) and waits up to `timeout` for the child to exit, then
    /// kills it; returns whether it exited on its own.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
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
    status_kib(pid, "VmHWM:")
}

/// Reads one `Vm*:` field (KiB) from /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad {field} line {line:?}"))
}

/// Reads `VmRSS` (current resident set size, KiB) from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`; 100 on Linux if that fails).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds used by process `pid` (utime + stime of /proc/PID/stat, all threads).
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("bad {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("bad field {} in {path}", i + 3))
    };
    // utime is field 14, stime field 15 (1-based); `rest` starts at field 3.
    Ok((tick(11)? + tick(12)?) / clock_ticks())
}

/// Sums the `Rss:` of the mappings in /proc/PID/smaps by kind (heap and anonymous, binary and
/// libraries, other files, stacks), in KiB, largest first.
pub fn smaps_summary(pid: u32) -> Result<Vec<(String, u64)>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    let mut kind = String::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = line.split_whitespace().nth(5).unwrap_or("");
            kind = match name {
                "" => "anonymous (heap arenas, mmap)".into(),
                "[heap]" => "[heap] (brk)".into(),
                n if n.starts_with("[stack") => "stacks".into(),
                n if n.starts_with('[') => n.into(),
                n if n.contains(".so") => "shared libraries".into(),
                n if n.ends_with(".redb") => "redb files (mapped)".into(),
                n => format!("file {}", n.rsplit('/').next().unwrap_or(n)),
            };
        } else if first == "Rss:" {
            let kib: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *sums.entry(kind.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    Ok(v)
}

/// One RSS sample of an [`RssSampler`].
#[derive(Debug, Clone, Copy)]
pub struct RssSample {
    /// Seconds since the sampler started.
    pub secs: f64,
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// The progress counter at that moment (messages done).
    pub done: usize,
    /// CPU seconds of the process so far.
    pub cpu_secs: f64,
}

/// Samples a process's `VmRSS` (and CPU time and a progress counter) every `interval` on its own
/// thread until stopped.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<RssSample>>>,
}

impl RssSampler {
    /// Starts sampling `pid`; `done` is read at each sample.
    pub fn start(
        pid: u32,
        interval: Duration,
        done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> RssSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut v = Vec::new();
            loop {
                if let (Ok(rss), Ok(cpu)) = (vm_rss_kib(pid), cpu_secs(pid)) {
                    v.push(RssSample {
                        secs: start.elapsed().as_secs_f64(),
                        rss_kib: rss,
                        done: done.load(Ordering::Relaxed),
                        cpu_secs: cpu,
                    });
                }
                let next = start + interval * v.len() as u32;
                while Instant::now() < next {
                    if flag.load(Ordering::Relaxed) {
                        return v;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if flag.load(Ordering::Relaxed) {
                    return v;
                }
            }
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Takes a last sample and returns all of them.
    pub fn finish(mut self) -> Vec<RssSample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
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
        Mosquitto::start_with(bin, dir, queues, false)
    }

    /// Like [`Mosquitto::start`]; with `persist`, `persistence true` with the database in `dir`
    /// (`autosave_interval 60`, and Mosquitto saves on SIGTERM), so a restart on the same `dir`
    /// loads the retained messages of the previous run.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        queues: MosquittoQueues,
        persist: bool,
    ) -> Result<Mosquitto> {
        let (mut child, addr) = Mosquitto::spawn(bin, dir, queues, persist)?;
        wait_tcp(&mut child, addr, Duration::from_secs(30))?;
        Ok(Mosquitto { child, addr })
    }

    /// Writes the config and spawns Mosquitto without waiting for its listener.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        queues: MosquittoQueues,
        persist: bool,
    ) -> Result<(ChildGuard, SocketAddr)> {
        let port = free_ports(1)?[0];
        let conf = dir.join("mosquitto.conf");
        let mut text = String::new();
        writeln!(text, "listener {port} 127.0.0.1")?;
        writeln!(text, "allow_anonymous true")?;
        if persist {
            writeln!(text, "persistence true")?;
            writeln!(text, "persistence_location {}/", dir.display())?;
            writeln!(text, "autosave_interval 60")?;
            // Run as root, Mosquitto drops to user `mosquitto`, which cannot write our temp dir.
            if status_kib(std::process::id(), "Uid:").is_ok_and(|uid| uid == 0) {
                writeln!(text, "user root")?;
            }
        } else {
            writeln!(text, "persistence false")?;
        }
        writeln!(text, "set_tcp_nodelay true")?;
        writeln!(text, "max_inflight_messages {}", queues.max_inflight)?;
        writeln!(text, "max_queued_messages {}", queues.max_queued)?;
        writeln!(text, "log_dest stderr")?;
        writeln!(text, "log_type error")?;
        writeln!(text, "log_type warning")?;
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let child = ChildGuard::spawn("mosquitto", cmd, &dir.join("mosquitto.log"))?;
        Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
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
        Edgetwin::start_with(bin, dir, profiles, &[], Duration::from_secs(30))
    }

    /// Like [`Edgetwin::start`] with `extra` lines appended to the config (e.g. `mqtt:` keys go
    /// through [`Edgetwin::spawn`]'s `mqtt_extra`) and a readiness timeout.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        profiles: &[(&str, String)],
        mqtt_extra: &[&str],
        ready_timeout: Duration,
    ) -> Result<Edgetwin> {
        let mut e = Edgetwin::spawn(bin, dir, profiles, mqtt_extra)?;
        wait_ready(&mut e.child, e.http, ready_timeout)?;
        wait_tcp(&mut e.child, e.mqtt, Duration::from_secs(10))?;
        Ok(e)
    }

    /// Writes the config (fresh ports; `mqtt_extra` lines such as `max_payload_bytes: N` go under
    /// `mqtt:`) and the profiles, and spawns `bin serve` without waiting. The data dir is kept
    /// between spawns on the same `dir`, so a second spawn restarts the node on its twins.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        profiles: &[(&str, String)],
        mqtt_extra: &[&str],
    ) -> Result<Edgetwin> {
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
        for l in mqtt_extra {
            writeln!(text, "  {l}")?;
        }
        writeln!(text, "http:")?;
        writeln!(text, "  listen: 127.0.0.1:{}", ports[2])?;
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(&conf);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = ChildGuard::spawn("edgetwin", cmd, &dir.join("edgetwin.log"))?;
        let mqtt = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let http = SocketAddr::from(([127, 0, 0, 1], ports[2]));
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
    thermostat_profile_range(0..n, true)
}

/// Profile files of `per_file` devices each for devices `bench-0..n-1`, the model in the first:
/// (file name, YAML).
pub fn thermostat_files(n: usize, per_file: usize) -> Vec<(String, String)> {
    let per_file = per_file.max(1);
    (0..n.div_ceil(per_file).max(1))
        .map(|f| {
            let range = f * per_file..((f + 1) * per_file).min(n);
            (
                format!("bench-{f:05}.yaml"),
                thermostat_profile_range(range, f == 0),
            )
        })
        .collect()
}

/// Devices `bench-{i}` for `i` in `range` (thermostat model), with the model document first when
/// `with_model`.
pub fn thermostat_profile_range(range: std::ops::Range<usize>, with_model: bool) -> String {
    if !with_model {
        let mut s = String::new();
        push_thermostat_devices(&mut s, range);
        return s;
    }
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
    push_thermostat_devices(&mut s, range);
    s
}

/// Appends the device documents, each after a `---` line unless it is the first document.
fn push_thermostat_devices(s: &mut String, range: std::ops::Range<usize>) {
    for i in range {
        if !s.is_empty() {
            s.push_str("---\n");
        }
        let _ = write!(
            s,
            "apiVersion: edgetwin/v1
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
    fn split_profile_files_load_with_the_real_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, yaml) in thermostat_files(7, 3) {
            std::fs::write(dir.path().join(name), yaml).expect("write");
        }
        let (set, errors) = edgetwin_profile::load_dir(dir.path());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.resolved().count(), 7);
    }

    #[test]
    fn cpu_and_rss_of_this_process() {
        let pid = std::process::id();
        assert!(vm_rss_kib(pid).expect("rss") > 0);
        assert!(cpu_secs(pid).expect("cpu") >= 0.0);
        assert!(!smaps_summary(pid).expect("smaps").is_empty());
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(3).expect("ports");
        assert!(p[0] != p[1] && p[1] != p[2] && p[0] != p[2]);
    }
}
