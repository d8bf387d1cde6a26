//! Running the node the way Linux operators do: systemd's notification socket and the units
//! the package installs, a log file under logrotate, and `/metrics` as promtool and Prometheus
//! read it. Peers: systemd-analyze, promtool (Debian's `prometheus`), Mosquitto as the cloud.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use edgetwin_testkit::*;

/// A scratch root holding the host's systemd units, our units, and the binaries they name, for
/// `systemd-analyze verify --root` (it checks that every command exists and is executable).
fn units_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).unwrap();
    for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let to = units.join(e.file_name());
                if e.file_type().is_ok_and(|t| t.is_file()) && !to.exists() {
                    std::fs::copy(e.path(), to).unwrap();
                }
            }
            break;
        }
    }
    for e in std::fs::read_dir(repo_root().join("packaging/systemd")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), units.join(e.file_name())).unwrap();
    }
    let bin = root.path().join("usr/bin");
    std::fs::copy(edgetwin_bin(), bin.join("edgetwin")).unwrap();
    for protocol in ["modbus", "opcua", "serial", "ble"] {
        let name = format!("edgetwin-mapper-{protocol}");
        let built = workspace_bin(&format!("edgetwin-mapper-{protocol}"), &name);
        std::fs::copy(built, bin.join(&name)).unwrap();
    }
    std::fs::copy("/bin/kill", bin.join("kill")).unwrap();
    root
}

#[test]
fn operations_the_units_pass_systemd_analyze_verify_without_a_warning() {
    let root = units_root();
    let mut c = Command::new("systemd-analyze");
    c.args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg("edgetwin.service");
    for protocol in ["modbus", "opcua", "serial", "ble"] {
        c.arg(format!("edgetwin-mapper@{protocol}.service"));
    }
    let out = run(&mut c);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    // It exits 0 on unknown keys and unparsable values, only warning: those count too.
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warned:\n{said}"
    );
}

#[test]
fn operations_the_units_keep_their_hardening_an_exposure_of_at_most_2_of_10() {
    // systemd's own score of what a unit leaves open (Debian's mosquitto.service: 9.6 of 10;
    // ours 1.2 and 1.6 when written). `--threshold` is in tenths of the printed level.
    let root = units_root();
    for unit in ["edgetwin.service", "edgetwin-mapper@modbus.service"] {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(format!("--root={}", root.path().display()))
            .arg(unit));
        assert!(
            out.status.success(),
            "{unit} is exposed more than 2.0:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn operations_the_unit_starts_the_node_from_etc_edgetwin_and_reloads_with_sighup() {
    let unit =
        std::fs::read_to_string(repo_root().join("packaging/systemd/edgetwin.service")).unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_string()
    };
    assert_eq!(
        line("ExecStart="),
        "/usr/bin/edgetwin serve --config /etc/edgetwin/node.yaml --config-dir /etc/edgetwin/conf.d"
    );
    assert_eq!(line("Type="), "notify");
    assert_eq!(line("ExecReload="), "/bin/kill -HUP $MAINPID");
    assert_eq!(line("StateDirectory="), "edgetwin");
}

/// What the node sent on its notification socket, each datagram as it came, and whether its
/// MQTT port took a connection at the moment READY=1 arrived.
struct NotifySocket {
    path: PathBuf,
    got: mpsc::Receiver<(String, Option<bool>)>,
}

impl NotifySocket {
    fn bind(dir: &Path, mqtt_port: std::sync::Arc<std::sync::atomic::AtomicU16>) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let (tx, got) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let accepted = msg.lines().any(|l| l == "READY=1").then(|| {
                    let port = mqtt_port.load(std::sync::atomic::Ordering::SeqCst);
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                });
                if tx.send((msg, accepted)).is_err() {
                    break;
                }
            }
        });
        NotifySocket { path, got }
    }

    /// The next datagram, within `within`.
    fn next(&self, within: Duration) -> (String, Option<bool>) {
        self.got
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no notification within {within:?}"))
    }
}

#[test]
fn operations_systemd_hears_ready_only_once_the_listeners_accept_then_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
    let notify = NotifySocket::bind(dir.path(), port.clone());
    // The port is known only once the node is set up; the socket thread reads it at READY.
    let spec = NodeSpec {
        launch: Launch {
            env: vec![("NOTIFY_SOCKET".into(), notify.path.display().to_string())],
            ..Launch::default()
        },
        ..NodeSpec::default()
    };
    let mut node = spec.prepare();
    port.store(node.port, std::sync::atomic::Ordering::SeqCst);
    node.spawn();

    let (first, accepted) = notify.next(Duration::from_secs(20));
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "the first notification is not READY=1: {first:?}"
    );
    assert_eq!(
        accepted,
        Some(true),
        "READY=1 came before the MQTT listener accepted a connection"
    );
    assert!(first.contains("STATUS="), "{first:?}");

    signal(node.pid(), "HUP");
    let (reloading, _) = notify.next(Duration::from_secs(10));
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1")
            && reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "SIGHUP did not say RELOADING=1 with MONOTONIC_USEC: {reloading:?}"
    );
    let (again, accepted) = notify.next(Duration::from_secs(10));
    assert!(again.lines().any(|l| l == "READY=1"), "{again:?}");
    assert_eq!(accepted, Some(true));
    node.readyz_until(200, Duration::from_secs(5));

    assert!(node.stop().success(), "{}", node.log());
    let (stopping, _) = notify.next(Duration::from_secs(5));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}

#[test]
fn operations_a_log_file_has_no_escape_codes_and_follows_a_logrotate_rename_and_sighup() {
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("edgetwin.log");
    let stderr = logs.path().join("stderr.log");
    let mut node = NodeSpec {
        launch: Launch {
            args: vec!["--log-file".into(), file.display().to_string()],
            stderr_to: Some(stderr.clone()),
            default_log: true,
            ..Launch::default()
        },
        ..NodeSpec::default()
    }
    .start();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for(Duration::from_secs(5), || {
        read(&file).contains("node serving").then_some(())
    })
    .unwrap_or_else(|| panic!("no 'node serving' in the log file:\n{}", read(&file)));

    // logrotate without copytruncate: rename, then `kill -HUP` (postrotate).
    let rotated = logs.path().join("edgetwin.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    signal(node.pid(), "HUP");
    let fresh = wait_for(Duration::from_secs(5), || {
        Some(read(&file)).filter(|t| t.contains("log file reopened"))
    })
    .unwrap_or_else(|| panic!("no new log file after SIGHUP; old one:\n{}", read(&rotated)));
    assert!(fresh.contains("SIGHUP received"), "{fresh}");
    // Lines after the reopen go to the new file only.
    node.pub_("dt/nobody/desired", "{}");
    assert!(node.stop().success());
    let (old, new) = (read(&rotated), read(&file));
    assert!(
        old.contains("node serving") && !old.contains("shutting down"),
        "{old}"
    );
    assert!(new.contains("shutting down"), "{new}");
    for (name, text) in [("rotated", &old), ("new", &new), ("stderr", &read(&stderr))] {
        assert!(
            !text.contains('\u{1b}'),
            "escape codes in the {name} log:\n{text}"
        );
    }
    for text in [&old, &new] {
        assert!(
            !text.contains(" ERROR ") && !text.contains(" WARN "),
            "an ERROR or WARN line on a clean start and stop:\n{text}"
        );
        // rumqttd logs each internal link's connect and subscribe at info: below the default.
        assert!(
            !text.lines().any(|l| l.contains(" INFO rumqttd")),
            "rumqttd's chatter in the default log:\n{text}"
        );
    }
}

#[test]
fn operations_a_json_log_is_one_object_per_line_with_its_fields_at_the_top() {
    let logs = tempfile::tempdir().unwrap();
    let stderr = logs.path().join("stderr.log");
    let mut node = NodeSpec {
        launch: Launch {
            args: vec!["--log-format".into(), "json".into()],
            stderr_to: Some(stderr.clone()),
            ..Launch::default()
        },
        ..NodeSpec::default()
    }
    .start();
    assert!(node.stop().success());
    let text = std::fs::read_to_string(&stderr).unwrap();
    let mut serving = false;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == "node serving" {
            serving = true;
            assert_eq!(v["node"], "test-node", "{line}");
        }
    }
    assert!(serving, "no 'node serving' line:\n{text}");
}

fn bridge_yaml(port: u16) -> String {
    format!(
        "bridge:\n  url: mqtt://127.0.0.1:{port}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n"
    )
}

/// GET /metrics with an `Accept` header: (content type, body).
fn scrape(node: &Node, accept: &str) -> (String, String) {
    let reply = http_get(node.http_port, "/metrics", &[("Accept", accept)]).unwrap();
    (
        reply.header("content-type").unwrap_or_default().to_string(),
        reply.body,
    )
}

#[test]
fn operations_promtool_accepts_the_classic_metrics_of_a_live_node_and_prometheus_gets_openmetrics()
{
    let cloud = Mosquitto::start();
    let mut node = Node::start_with_config(&["pt-1", "pt-2"], &bridge_yaml(cloud.port));
    node.wait_bridge_connected();
    node.pub_("dt/pt-1/desired", r#"{"setpoint": 21.5}"#);
    node.metrics_until(Duration::from_secs(5), |m| m.contains("edgetwin_bridge_"));

    let (ctype, text) = scrape(&node, "text/plain;version=0.0.4");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert!(!text.contains("# EOF"), "OpenMetrics sent for text/plain");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What Prometheus itself asks for.
    let (ctype, om) = scrape(
        &node,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.trim_end().ends_with("# EOF"), "not OpenMetrics");
    // The same series either way.
    let series = |t: &str| -> std::collections::BTreeSet<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split([' ', '{']).next())
            .filter(|n| !n.ends_with("_created"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(series(&text), series(&om));
    assert!(node.stop().success());
}

#[test]
fn operations_every_dashboard_query_is_valid_promql() {
    let text = std::fs::read_to_string(repo_root().join("examples/grafana/edgetwin.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            // Grafana's variables, as Grafana substitutes them for one node.
            let expr = expr.replace("$instance", "node-1:8080");
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
            n += 1;
        }
    }
    assert!(n >= 50, "only {n} queries");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&file, &rules).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Prometheus (Debian's `prometheus`) scraping `targets` every second, on a free port.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: edgetwin\n    static_configs: [{{targets: [{list}]}}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus) must be installed");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// `GET /api/v1/query?query=...`: the JSON answer.
    fn query(&self, promql: &str) -> Option<serde_json::Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let reply = http_get(self.port, &format!("/api/v1/query?query={encoded}"), &[]).ok()?;
        let body = reply.body;
        // Chunked or not, the JSON object is the part between the outer braces.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        serde_json::from_str(json).ok()
    }

    /// The result vector of an instant query, once it has at least one element.
    fn series_until(&self, promql: &str, within: Duration) -> Vec<serde_json::Value> {
        wait_for(within, || {
            let v = self.query(promql)?;
            let r = v["data"]["result"].as_array()?.clone();
            (!r.is_empty()).then_some(r)
        })
        .unwrap_or_else(|| {
            panic!(
                "Prometheus has no series for {promql}: {:?}",
                self.query(promql)
            )
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn operations_a_real_prometheus_scrapes_the_node_and_every_dashboard_query_evaluates() {
    let node = Node::start(&["pr-1"]);
    node.pub_("dt/pr-1/desired", r#"{"setpoint": 20.5}"#);
    let target = format!("127.0.0.1:{}", node.http_port);
    let prom = Prometheus::start(std::slice::from_ref(&target));

    let up = prom.series_until("up{job=\"edgetwin\"} == 1", Duration::from_secs(30));
    assert_eq!(up[0]["metric"]["instance"], target.as_str());
    let build = prom.series_until("edgetwin_build_info", Duration::from_secs(10));
    assert!(build[0]["metric"]["commit"].is_string(), "{build:?}");
    prom.series_until(
        "edgetwin_twin_updates_accepted_total{side=\"desired\"}",
        Duration::from_secs(10),
    );
    // A counter's samples are read as counters: rate() over them is defined.
    prom.series_until(
        "rate(edgetwin_twin_updates_accepted_total[10s]) >= 0",
        Duration::from_secs(15),
    );

    // Every dashboard query, for this node, evaluates without an error.
    let text = std::fs::read_to_string(repo_root().join("examples/grafana/edgetwin.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap().replace("$instance", &target);
            let answer = prom
                .query(&expr)
                .unwrap_or_else(|| panic!("no answer for {expr}"));
            assert_eq!(
                answer["status"], "success",
                "panel {:?}: {expr}: {answer}",
                panel["title"]
            );
        }
    }
}
