//! The node as an operator and a field engineer see it: HTTP endpoints, start-up errors, shutdown,
//! the device registry and the CLI.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use edgetwin_testkit::*;

#[test]
fn node_serves_health_ready_and_openmetrics() {
    let node = Node::start(&["n-1"]);
    assert_eq!(node.http_get("/healthz").unwrap().0, 200);
    assert_eq!(node.http_get("/readyz").unwrap().0, 200);
    let m = node.metrics();
    for name in [
        "edgetwin_twin_updates_accepted_total",
        "edgetwin_twin_updates_rejected_total",
        "edgetwin_store_commit_duration_seconds",
        "edgetwin_twin_delta_latency_seconds",
        "edgetwin_devices{status=\"unknown\"} 1",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    node.pub_("dt/n-1/desired", r#"{"setpoint": 10}"#);
    node.twin_until("n-1", |t| t["desired"]["setpoint"] == 10.0);
    let m = node.metrics();
    assert!(
        m.contains("edgetwin_twin_updates_accepted_total{side=\"desired\",source=\"local\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("edgetwin_store_commit_duration_seconds_count"),
        "{m}"
    );
}

#[test]
fn node_fails_start_with_clear_error_when_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir: {}\nmqtt: {{listen: 127.0.0.1:{port}, listen_v5: null}}\nhttp: {{listen: 127.0.0.1:{}}}\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .args(["serve", "--config"])
        .arg(&cfg));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("cannot listen"),
        "{err}"
    );
}

#[test]
fn node_rejects_config_with_unknown_field_naming_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(&cfg, "mqtt:\n  listen: 127.0.0.1:1\n  max_payload: 5\n").unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .args(["serve", "--config"])
        .arg(&cfg));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.yaml") && err.contains("line 3") && err.contains("max_payload"),
        "{err}"
    );
}

#[test]
fn node_exits_cleanly_on_sigterm() {
    let mut node = Node::start(&["n-2"]);
    let status = node.stop();
    assert!(status.success(), "exit {status}:\n{}", node.log());
    assert!(node.log().contains("store flushed"), "{}", node.log());
}

#[test]
fn registry_picks_up_added_device_file_and_publishes_assignment() {
    let node = Node::start(&["r-1"]);
    std::fs::write(node.devices_dir().join("more.yaml"), device_yaml("r-2")).unwrap();
    let msgs = node.probe(&["mappers/modbus/devices/r-2"], &[], 1);
    let resolved = payload(&msgs[0]);
    assert_eq!(resolved["device"]["metadata"]["name"], "r-2");
    assert_eq!(resolved["model"]["metadata"]["name"], "thermostat");
    // A later subscriber gets it as a retained message.
    let again = node.probe(&["mappers/modbus/devices/r-2"], &[], 1);
    assert_eq!(again[0]["retain"], true);
    node.twin("r-2");
}

#[test]
fn registry_keeps_loaded_devices_when_a_file_turns_bad() {
    let node = Node::start(&["r-3"]);
    let file = node.devices_dir().join("thermostats.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        good.replace("accessMode: ReadWrite", "accessMode: Sometimes"),
    )
    .unwrap();
    node.log_until(std::time::Duration::from_secs(10), |l| {
        l.contains("profile rejected")
    });
    // The device is still served.
    node.pub_("dt/r-3/desired", r#"{"setpoint": 11}"#);
    node.twin_until("r-3", |t| t["desired"]["setpoint"] == 11.0);
    assert!(node.metrics().contains("edgetwin_profile_errors_total 1"));
}

#[test]
fn registry_removing_a_device_clears_its_retained_messages() {
    let node = Node::start(&["r-4"]);
    std::fs::write(node.devices_dir().join("extra.yaml"), device_yaml("r-5")).unwrap();
    node.twin("r-5");
    std::fs::remove_file(node.devices_dir().join("extra.yaml")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let msgs = probe(
            node.port,
            false,
            &["dt/r-5/twin"],
            &[],
            0,
            &["--timeout", "0.5"],
        );
        if msgs.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retained twin of removed device remains"
        );
    }
    let msgs = node.probe(
        &["dt/r-5/error"],
        &[("dt/r-5/desired", r#"{"setpoint": 9}"#)],
        1,
    );
    assert_eq!(payload(&msgs[0])["code"], "unknown_device");
}

#[test]
fn cli_device_apply_registers_devices_and_list_shows_them() {
    let node = Node::start(&["c-1"]);
    let f = node.dir.path().join("new-devices.yaml");
    std::fs::write(
        &f,
        format!("{}---\n{}", device_yaml("c-2"), device_yaml("c-3")),
    )
    .unwrap();
    let out = node.cli(&["device", "apply", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["device", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    for d in ["c-1", "c-2", "c-3"] {
        assert!(list.contains(d), "{d} missing: {list}");
    }
    node.twin("c-3");
}

#[test]
fn cli_device_apply_survives_restart() {
    let mut node = Node::start(&["c-4"]);
    let f = node.dir.path().join("applied.yaml");
    std::fs::write(&f, device_yaml("c-5")).unwrap();
    assert!(node
        .cli(&["device", "apply", f.to_str().unwrap()])
        .status
        .success());
    assert!(node.stop().success());
    node.restart();
    node.twin("c-5");
}

#[test]
fn cli_device_apply_rejects_bad_file_with_line_and_path_and_changes_nothing() {
    let node = Node::start(&["c-6"]);
    let f = node.dir.path().join("broken.yaml");
    let bad =
        device_yaml("c-7").replace("deviceModelRef: thermostat", "deviceModelRef: nosuchmodel");
    std::fs::write(&f, bad).unwrap();
    let out = node.cli(&["device", "apply", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.yaml") && err.contains("deviceModelRef"),
        "{err}"
    );
    let list = String::from_utf8_lossy(&node.cli(&["device", "list"]).stdout).to_string();
    assert!(!list.contains("c-7") && list.contains("c-6"), "{list}");
}

#[test]
fn cli_device_validate_reports_every_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    let model = MODEL_YAML.replace(
        "type: float, accessMode: ReadOnly",
        "type: floaty, accessMode: ReadOnly",
    );
    let device = device_yaml("v-1").replace("collectCycle: 1s", "collectCycle: 5");
    let text = format!("{model}---\n{device}");
    std::fs::write(&f, text).unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .args(["device", "validate"])
        .arg(&f));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:11: spec.properties[4].type"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:22: spec.properties[0].collectCycle"),
        "{err}"
    );
}

#[test]
fn cli_device_validate_takes_a_folder_and_reports_every_error_of_every_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.yaml"), MODEL_YAML).unwrap();
    // Two devices with errors in two files, one of them two errors in one document.
    let one = device_yaml("v-1")
        .replace("collectCycle: 1s", "collectCycle: 5")
        .replace("deviceModelRef: thermostat", "deviceModelRef: nosuch");
    std::fs::write(dir.path().join("a.yaml"), &one).unwrap();
    let two = device_yaml("v-2").replace("collectCycle: 1s", "collectCycle: 0s");
    std::fs::write(dir.path().join("b.yml"), &two).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a profile").unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .args(["device", "validate"])
        .arg(dir.path()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.yaml") && err.contains("collectCycle"),
        "{err}"
    );
    assert!(
        err.contains("b.yml") && err.contains("greater than 0"),
        "{err}"
    );
    assert!(err.contains("in 3 file(s)"), "{err}");
    // Fixed, the folder validates.
    std::fs::write(dir.path().join("a.yaml"), device_yaml("v-1")).unwrap();
    std::fs::write(dir.path().join("b.yml"), device_yaml("v-2")).unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .args(["device", "validate"])
        .arg(dir.path()));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("2 device(s) in 3 file(s)"),
        "{said}"
    );
}

#[test]
fn cli_twin_set_get_and_rejection() {
    let node = Node::start(&["c-8"]);
    let out = node.cli(&["twin", "set", "c-8", "setpoint=21.5", "mode=eco"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["twin", "get", "c-8"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["desired"]["setpoint"], 21.5);
    assert_eq!(doc["desired"]["mode"], "eco");
    // The same values again (a re-run commissioning script): answered, not "no answer" after
    // the timeout.
    let out = node.cli(&[
        "twin",
        "set",
        "c-8",
        "setpoint=21.5",
        "mode=eco",
        "--timeout-ms",
        "3000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = node.cli(&["twin", "set", "c-8", "setpoint=99"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("out_of_range") && err.contains("setpoint"),
        "{err}"
    );
}

#[test]
fn cli_reports_unreachable_node_clearly() {
    let port = free_port();
    let out = run(Command::new(env!("CARGO_BIN_EXE_edgetwin")).args([
        "twin",
        "get",
        "x",
        "--broker",
        &format!("127.0.0.1:{port}"),
        "--timeout-ms",
        "1000",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn node_reexports_mapper_metrics_of_registered_devices_only() {
    let node = Node::start(&["m-1"]);
    let snapshot = r#"{"ts":1,"devices":{
        "m-1":{"reads":5,"read_errors":1,"writes":2,"write_errors":0,"poll_overruns":0,"requests":3,
               "read_latency":{"sum":0.02,"count":3,"buckets":[[0.01,2],[0.1,3]]}},
        "not-registered":{"reads":9,"read_errors":0,"writes":0,"write_errors":0,"poll_overruns":0,
               "read_latency":{"sum":0,"count":0,"buckets":[]}}}}"#;
    node.pub_("mappers/modbus/metrics", snapshot);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let m = node.metrics();
        if m.contains("edgetwin_mapper_reads_total{protocol=\"modbus\",device=\"m-1\"} 5") {
            assert!(!m.contains("not-registered"), "{m}");
            assert!(m.contains("edgetwin_mapper_read_latency_seconds_count{protocol=\"modbus\",device=\"m-1\"} 3"), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mapper metrics not exported:\n{m}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Metric names in `text` (`edgetwin_...`), with histogram suffixes folded onto the family name.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("edgetwin_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        if base.len() > "edgetwin_".len() {
            out.insert(base);
        }
    }
    out
}

#[test]
fn metrics_doc_dashboard_and_endpoint_agree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("examples/grafana/edgetwin.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("dashboard is JSON");
    let documented = metric_names(&doc);
    let charted = metric_names(&dashboard);
    for name in &charted {
        assert!(
            documented.contains(name),
            "dashboard uses undocumented {name}"
        );
    }
    for name in &documented {
        assert!(
            charted.contains(name),
            "documented {name} is in no panel of examples/grafana/edgetwin.json"
        );
    }
    let node = Node::start(&["m-2"]);
    node.pub_(
        "mappers/modbus/metrics",
        r#"{"ts":1,"devices":{"m-2":{"reads":1,"read_errors":0,"writes":0,"write_errors":0,"poll_overruns":0,"read_latency":{"sum":0,"count":0,"buckets":[]}}}}"#,
    );
    // A mapper that announced itself (`edgetwin_mapper_up` has a series per mapper seen).
    node.pub_(
        "mappers/modbus/status",
        r#"{"state":"online","ts":1,"version":"t"}"#,
    );
    let exported: std::collections::BTreeSet<String> = node
        .metrics_until(std::time::Duration::from_secs(10), |m| {
            m.contains("edgetwin_mapper_reads_total{") && m.contains("edgetwin_mapper_up{")
        })
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    for name in &exported {
        let doc_name = if documented.contains(name) {
            name.clone()
        } else {
            format!("{name}_total")
        };
        assert!(
            documented.contains(&doc_name),
            "exported {name} is not in docs/metrics.md"
        );
    }
    // The gate's families exist only on a node with a gate (node/tests/security.rs).
    for name in documented
        .iter()
        .filter(|n| !n.starts_with("edgetwin_gate_"))
    {
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            exported.contains(family) || exported.contains(name),
            "documented {name} is not exported"
        );
    }
}

#[test]
fn node_counts_the_messages_a_stalled_subscriber_never_gets() {
    use std::io::{Read, Write};
    let node = Node::start(&[]);
    // A subscriber that subscribes and then never reads again: its socket buffers fill, then
    // the broker's queue for it, then its filter's bounded log moves past it.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(&raw_connect_v4("stalled", None, 60)).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    s.write_all(&raw_subscribe_v4(1, "flood/#")).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90);

    // 100,000 messages of 200 bytes (20 MB): far more than the socket buffers, the broker's
    // per-connection queue and the filter's log can hold for it.
    let lines: String = (0..100_000).map(|i| format!("{i:0>200}\n")).collect();
    let mut publisher = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.port.to_string(),
            "-t",
            "flood/x",
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(publisher.wait().unwrap().success());
    node.metrics_until(std::time::Duration::from_secs(20), |m| {
        m.lines()
            .find_map(|l| l.strip_prefix("edgetwin_broker_subscriber_skipped_messages_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|n| n > 0.0)
    });
    drop(s);
}

#[test]
fn cli_device_apply_of_a_file_that_clashes_with_the_folder_is_refused_and_the_folder_device_stays()
{
    let node = Node::start(&["c-9"]);
    // The devices folder defines model `thermostat`; this file defines it again.
    let f = node.dir.path().join("again.yaml");
    std::fs::write(&f, format!("{MODEL_YAML}---\n{}", device_yaml("c-10"))).unwrap();
    let out = node.cli(&["device", "apply", f.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already defined"), "{err}");
    let list = String::from_utf8_lossy(&node.cli(&["device", "list"]).stdout).to_string();
    assert!(list.contains("c-9") && !list.contains("c-10"), "{list}");
    // The next folder scan (SIGHUP) keeps the folder's device.
    edgetwin_testkit::signal(node.pid(), "HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !node.log().contains("SIGHUP received") {
        assert!(std::time::Instant::now() < deadline, "{}", node.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let list = String::from_utf8_lossy(&node.cli(&["device", "list"]).stdout).to_string();
    assert!(list.contains("c-9"), "{list}");
    node.twin_until("c-9", |t| t["device"] == "c-9");
}
