//! The node's lifecycle as an operator meets it: the start order (nothing a client or the cloud
//! sends during a restart is lost because an internal consumer was not listening yet), SIGHUP
//! reloads without stopping, and readiness that tells the truth about a full disk.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use edgetwin_testkit::*;
use serde_json::{json, Value};

const NODE: &str = "test-node";

fn bridge_yaml(port: u16) -> String {
    format!(
        "bridge:\n  url: mqtt://127.0.0.1:{port}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n"
    )
}

/// One MQTT 3.1.1 QoS 1 publish over a fresh connection, in raw bytes so a connection attempt
/// costs microseconds (a racing client during the node's start). `Ok(true)` = PUBACK received.
fn raw_qos1_publish(port: u16, topic: &str, payload: &[u8]) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(&raw_connect_v4("racer", None, 30))?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Ok(false);
    }
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0x00, 0x01]);
    body.extend_from_slice(payload);
    assert!(body.len() < 128, "one-byte remaining length");
    s.write_all(&[0x32, body.len() as u8])?;
    s.write_all(&body)?;
    let mut puback = [0u8; 4];
    s.read_exact(&mut puback)?;
    let _ = s.write_all(&[0xe0, 0x00]);
    Ok(puback[0] == 0x40 && puback[2..] == [0x00, 0x01])
}

#[test]
fn lifecycle_every_message_acked_during_a_restart_reaches_the_cloud() {
    let cloud = Mosquitto::start();
    let up = Subscriber::start(
        cloud.port,
        "lifecycle-up",
        &format!("edgetwin/{NODE}/dt/race-1/telemetry"),
    );
    let mut node = Node::start_with_config(&[], &bridge_yaml(cloud.port));
    node.wait_bridge_connected();
    assert!(node.stop().success());

    // A client hammers the node's port from before the restart until it has 50 PUBACKs: the
    // first ones land in the first milliseconds the listener accepts.
    let port = node.port;
    let racer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut n = 0;
        while acked.len() < 50 && Instant::now() < deadline {
            let payload = format!("{{\"n\":{n}}}");
            if let Ok(true) = raw_qos1_publish(port, "dt/race-1/telemetry", payload.as_bytes()) {
                acked.push(n);
            }
            n += 1;
        }
        acked
    });
    node.restart();
    let acked = racer.join().unwrap();
    assert_eq!(
        acked.len(),
        50,
        "the node never acked 50 publishes:\n{}",
        node.log()
    );
    let got = up.wait_until(Duration::from_secs(30), |msgs| {
        acked.iter().all(|n| {
            msgs.iter()
                .any(|(_, p)| serde_json::from_str::<Value>(p).is_ok_and(|v| v["n"] == *n))
        })
    });
    let missing: Vec<_> = acked
        .iter()
        .filter(|n| {
            !got.iter()
                .any(|(_, p)| serde_json::from_str::<Value>(p).is_ok_and(|v| v["n"] == **n))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "acked by the node, never at the cloud: {missing:?}\n{}",
        node.log()
    );
    assert_eq!(
        node.metric("edgetwin_local_link_skipped_messages_total{link=\"bridge-tap\"}"),
        Some(0.0)
    );
}

#[test]
fn lifecycle_a_command_queued_at_the_cloud_while_the_node_was_down_is_answered_after_restart() {
    use edgetwin_testkit::docker::{daemon, IMAGE};
    let cloud = Mosquitto::start();
    let results = Subscriber::start(
        cloud.port,
        "lifecycle-results",
        &format!("edgetwin/{NODE}/node/containers/result"),
    );
    let extra = format!(
        "containers:\n  runtime_socket: unix://{}\n  reconcile_interval_ms: 500\n{}",
        daemon().socket.display(),
        bridge_yaml(cloud.port)
    );
    let mut node = Node::start_with_config(&[], &extra);
    node.wait_bridge_connected();
    assert!(node.stop().success());

    // While the node is down the operator sends a command; the cloud keeps it for the node's
    // persistent session.
    let name = "et-lifecycle-queued-1";
    let cmd = json!({"id": "queued-1", "action": "run", "name": name, "image": IMAGE,
                     "args": ["busybox", "sleep", "3600"]});
    mosquitto_pub(
        cloud.port,
        &format!("edgetwin/{NODE}/node/containers/cmd"),
        &cmd.to_string(),
        &["-q", "1"],
    );
    node.restart();
    let got = results.wait_until(Duration::from_secs(30), |msgs| {
        msgs.iter().any(|(_, p)| p.contains("queued-1"))
    });
    let result: Value = got
        .iter()
        .find_map(|(_, p)| {
            serde_json::from_str::<Value>(p)
                .ok()
                .filter(|v| v["id"] == "queued-1")
        })
        .unwrap_or_else(|| panic!("no result for the queued command:\n{}", node.log()));
    assert_eq!(result["ok"], true, "{result}");
    let host = format!("unix://{}", daemon().socket.display());
    run(Command::new("docker").args(["-H", &host, "rm", "-f", name]));
}

#[test]
fn lifecycle_sighup_rescans_profiles_at_once_and_the_node_keeps_serving() {
    // A scan interval of an hour: only the reload can pick the new file up within the test.
    let mut node = NodeSpec {
        devices: vec!["hup-1".into()],
        scan_interval_ms: 3_600_000,
        ..NodeSpec::default()
    }
    .start();
    std::fs::write(node.devices_dir().join("more.yaml"), device_yaml("hup-2")).unwrap();
    for _ in 0..3 {
        signal(node.pid(), "HUP");
    }
    node.retained_until("dt/hup-2/twin", Duration::from_secs(10), |v| v.is_some());
    node.assert_running();
    node.readyz_until(200, Duration::from_secs(10));
    // Still serving: a desired patch goes through.
    node.pub_("dt/hup-1/desired", r#"{"mode":"after-hup"}"#);
    node.twin_until("hup-1", |t| t["desired"]["mode"] == "after-hup");
    assert!(node.log().contains("SIGHUP received"), "{}", node.log());
}

#[test]
fn lifecycle_sighup_reloads_the_gate_credentials() {
    let creds = tempfile::tempdir().unwrap();
    let file = creds.path().join("users.yaml");
    user_add(&file, "first", "engineer", None, "first-pw");
    let gate = free_port();
    let extra = format!(
        "gate:\n  listeners:\n    - listen: 127.0.0.1:{gate}\n  credentials_file: {}\n",
        file.display()
    );
    let mut node = Node::start_with_config(&["hup-g"], &extra);
    let publish = |user: &str, pw: &str| {
        publish_as(gate, user, pw, "dt/hup-g/desired", r#"{"mode":"x"}"#, false)
            .status
            .success()
    };
    assert!(publish("first", "first-pw"));
    user_add(&file, "second", "engineer", None, "second-pw");
    assert!(
        !publish("second", "second-pw"),
        "not in force before the reload"
    );
    signal(node.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publish("second", "second-pw") {
        assert!(
            Instant::now() < deadline,
            "the new user never got in:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(publish("first", "first-pw"));
    node.assert_running();
}

/// A small tmpfs: a real file system that really fills up. Unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    fn fill(&self) {
        let mut f = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn lifecycle_full_disk_makes_the_node_not_ready_and_freeing_space_recovers_without_restart() {
    let Some(disk) = SmallDisk::mount(8 * 1024 * 1024) else {
        // Mounting needs root (CI runs as root); a developer's unprivileged run says so.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs: this test needs root"
        );
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let data = disk.dir.path().join("data");
    let mut node = NodeSpec {
        devices: vec!["fd-1".into()],
        data_dir: Some(data),
        ..NodeSpec::default()
    }
    .start();
    node.pub_("dt/fd-1/desired", r#"{"mode":"before"}"#);
    node.twin_until("fd-1", |t| t["desired"]["mode"] == "before");

    disk.fill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    let body = loop {
        // Large values use up whatever free pages the file still has (once they are gone, the
        // publish is not acknowledged: its outcome is checked below).
        let big = "x".repeat(900);
        mosquitto_pub_output(
            node.port,
            "dt/fd-1/desired",
            &format!(r#"{{"mode":"full-{i}-{big}"}}"#),
            &[],
        );
        i += 1;
        if let Ok((503, body)) = node.http_get("/readyz") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "never not ready on a full disk:\n{}",
            node.log()
        );
    };
    assert!(body.contains("twin store: failing"), "{body}");
    assert!(body.contains("twins.redb"), "names the file: {body}");
    // A PUBACK means durable: a QoS 1 patch the store cannot commit is not acknowledged (the
    // client is disconnected and would send it again)...
    let refused = mosquitto_pub_output(node.port, "dt/fd-1/desired", r#"{"mode":"refused"}"#, &[]);
    assert!(
        !refused.status.success(),
        "acknowledged although not stored: {refused:?}"
    );
    // ...and whoever listens is told why (here at QoS 0, which keeps its connection).
    let store_failed = probe(
        node.port,
        false,
        &["dt/fd-1/error"],
        &[("dt/fd-1/desired", r#"{"mode":"refused"}"#)],
        1,
        &["--qos", "0"],
    );
    assert_eq!(
        payload(&store_failed[0])["code"],
        "store_failed",
        "{store_failed:?}"
    );
    // Memory never ran ahead of disk: the twin shows no refused value.
    assert_ne!(node.twin("fd-1")["desired"]["mode"], "refused");

    disk.free();
    // Nothing is published: the store's own probe finds the space.
    node.readyz_until(200, Duration::from_secs(15));
    node.pub_("dt/fd-1/desired", r#"{"mode":"after"}"#);
    node.twin_until("fd-1", |t| t["desired"]["mode"] == "after");
    node.assert_running();
    assert!(node.stop().success());
    node.restart();
    assert_eq!(
        node.twin("fd-1")["desired"]["mode"],
        "after",
        "kept across a restart"
    );
}

#[test]
fn lifecycle_clients_retained_messages_survive_a_crash_but_liveness_does_not() {
    let mut node = Node::start(&["rt-1"]);
    // Acknowledged at QoS 1 = on disk.
    mosquitto_pub(node.port, "plant/line-1/info", r#"{"shift":"B"}"#, &["-r"]);
    mosquitto_pub(node.port, "plant/line-2/info", r#"{"shift":"A"}"#, &["-r"]);
    mosquitto_pub(node.port, "plant/line-2/info", "", &["-r"]);
    // A mapper's "online" is true only while that mapper is connected: not kept.
    mosquitto_pub(
        node.port,
        "mappers/modbus/status",
        r#"{"state":"online","ts":1,"version":"x"}"#,
        &["-r"],
    );
    node.kill9();
    node.restart();
    assert_eq!(
        node.retained("plant/line-1/info"),
        Some(json!({"shift": "B"})),
        "kept across the crash"
    );
    assert_eq!(
        node.retained("plant/line-2/info"),
        None,
        "cleared stays cleared"
    );
    assert_eq!(
        node.retained("mappers/modbus/status"),
        None,
        "liveness comes from live mappers"
    );
    assert_eq!(node.metric("edgetwin_retained_stored"), Some(1.0));
}
