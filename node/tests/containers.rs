//! The container agent inside the node, against a real Docker daemon started by the test
//! (testkit::docker) and, for the cloud path, a real Mosquitto as the cloud broker.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use edgetwin_testkit::docker::{daemon, IMAGE};
use edgetwin_testkit::*;
use serde_json::{json, Value};

const NODE: &str = "test-node";

/// Every test node is `test-node` on one shared daemon, and a node's reconcile owns every
/// container labelled managed: a test that empties its declared set removes the others'. Tests
/// that declare containers take turns.
static DECLARING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn declaring() -> std::sync::MutexGuard<'static, ()> {
    DECLARING.lock().unwrap_or_else(|p| p.into_inner())
}

fn containers_yaml() -> String {
    format!(
        "containers:\n  runtime_socket: unix://{}\n  reconcile_interval_ms: 500\n",
        daemon().socket.display()
    )
}

fn docker(args: &[&str]) -> std::process::Output {
    let host = format!("unix://{}", daemon().socket.display());
    run(Command::new("docker").args(["-H", &host]).args(args))
}

fn state(name: &str) -> Option<String> {
    let out = docker(&["inspect", "-f", "{{.State.Status}}", name]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_state(name: &str, want: &str) {
    wait_state_in(name, &[want]);
}

fn wait_state_in(name: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = state(name);
        if s.as_deref().is_some_and(|s| want.contains(&s)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became one of {want:?}; last {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sleeper(image: &str) -> Value {
    json!({"image": image, "args": ["busybox", "sleep", "3600"], "state": "running"})
}

#[test]
fn containers_command_runs_once_per_id_and_status_is_retained() {
    let node = Node::start_with_config(&[], &containers_yaml());
    let name = "et-node-cmd-1";
    let cmd = json!({"id": "cmd-1", "action": "run", "name": name, "image": IMAGE,
                     "args": ["busybox", "sleep", "3600"]})
    .to_string();
    let msgs = node.probe(
        &["node/containers/result"],
        &[("node/containers/cmd", &cmd)],
        1,
    );
    let r = payload(&msgs[0]);
    assert_eq!(
        (r["id"].as_str(), r["ok"].as_bool()),
        (Some("cmd-1"), Some(true)),
        "{r}"
    );
    wait_state(name, "running");
    // The at-least-once bridge may deliver it again: same answer, nothing run twice.
    let again = node.probe(
        &["node/containers/result"],
        &[("node/containers/cmd", &cmd)],
        1,
    );
    assert_eq!(payload(&again[0]), r);
    let status = node
        .retained_until("node/containers/status", Duration::from_secs(10), |v| {
            v.is_some_and(|v| {
                v["containers"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|c| c["name"] == name && c["state"] == "running")
                })
            })
        })
        .unwrap();
    assert!(status["ts"].is_i64());
    let missing =
        json!({"id": "cmd-2", "action": "run", "name": "et-node-cmd-2", "image": "nosuch:image"})
            .to_string();
    let msgs = node.probe(
        &["node/containers/result"],
        &[("node/containers/cmd", &missing)],
        1,
    );
    let r = payload(&msgs[0]);
    assert_eq!(r["ok"], false);
    assert_eq!(r["code"], "image_not_present", "{r}");
    assert!(r["error"].as_str().unwrap().contains("nosuch:image"), "{r}");
    assert!(
        node.metrics()
            .contains("edgetwin_container_commands_total{action=\"run\",outcome=\"ok\"} 1"),
        "{}",
        node.metrics()
    );
    docker(&["rm", "-f", name]);
}

#[test]
fn containers_desired_in_the_node_twin_are_reconciled_and_reported() {
    let _turn = declaring();
    let node = Node::start_with_config(&[], &containers_yaml());
    let name = "et-node-decl-1";
    let patch = json!({"containers": {name: sleeper(IMAGE)}}).to_string();
    node.pub_(&format!("dt/{NODE}/desired"), &patch);
    wait_state(name, "running");
    let twin = node.twin_until(NODE, |t| {
        t["reported"]["containers"][name]["state"] == "running"
    });
    assert_eq!(
        twin["metadata"]["reported"]["containers"]["source"],
        "mapper:containers"
    );
    // Stopping it declaratively.
    let mut stopped = sleeper(IMAGE);
    stopped["state"] = json!("stopped");
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: stopped}}).to_string(),
    );
    // Not running: exited, or created-but-not-started when the runtime had to recreate it.
    wait_state_in(name, &["exited", "created"]);
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: null}}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(name).is_some() {
        assert!(
            Instant::now() < deadline,
            "no longer desired container was not removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn containers_invalid_desired_spec_is_reported_on_the_error_topic() {
    let node = Node::start_with_config(&[], &containers_yaml());
    let patch = json!({"containers": {"bad": {"image": IMAGE, "state": "sideways"}}}).to_string();
    let msgs = node.probe(
        &[&format!("dt/{NODE}/error")],
        &[(&format!("dt/{NODE}/desired"), &patch)],
        1,
    );
    let e = payload(&msgs[0]);
    assert_eq!(e["code"], "device_config");
    assert!(e["message"].as_str().unwrap().contains("bad"), "{e}");
}

#[test]
fn containers_desired_through_the_cloud_broker_are_reconciled() {
    let _turn = declaring();
    let cloud = Mosquitto::start();
    let extra = format!(
        "{}bridge:\n  url: mqtt://127.0.0.1:{}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n",
        containers_yaml(),
        cloud.port
    );
    let node = Node::start_with_config(&[], &extra);
    node.wait_bridge_connected();
    let name = "et-node-cloud-1";
    let patch = json!({"containers": {name: sleeper(IMAGE)}}).to_string();
    cloud.pub_(&format!("edgetwin/{NODE}/dt/{NODE}/desired"), &patch);
    wait_state(name, "running");
    cloud.retained_until(
        &format!("edgetwin/{NODE}/dt/{NODE}/twin"),
        Duration::from_secs(20),
        |v| v.is_some_and(|t| t["reported"]["containers"][name]["state"] == "running"),
    );
    docker(&["rm", "-f", name]);
}

#[test]
fn containers_declared_survive_a_restart_with_the_cloud_down_and_come_back() {
    let _turn = declaring();
    // A bridge to a cloud broker that is not there: the node must work from its own store.
    let dead_cloud = free_port();
    let extra = format!(
        "{}bridge:\n  url: mqtt://127.0.0.1:{dead_cloud}\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n",
        containers_yaml()
    );
    let mut node = Node::start_with_config(&[], &extra);
    let name = "et-node-reboot-1";
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: sleeper(IMAGE)}}).to_string(),
    );
    wait_state(name, "running");
    assert!(node.stop().success());
    // What a reboot can leave behind: the container gone.
    docker(&["rm", "-f", name]);
    assert_eq!(state(name), None);
    node.restart();
    wait_state(name, "running");
    docker(&["rm", "-f", name]);
}

#[test]
fn containers_a_node_without_any_device_profile_still_has_its_twin() {
    let mut node = Node::start_with_config(&[], &containers_yaml());
    assert!(node.stop().success());
    std::fs::remove_file(node.dir.path().join("devices/thermostats.yaml")).unwrap();
    node.restart();
    let out = node.cli(&["twin", "get", NODE]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let twin: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(twin["model"], "edgetwin-node", "{twin}");
}

#[test]
fn containers_status_is_published_when_it_changes_not_at_every_reconcile() {
    let _turn = declaring();
    let node = Node::start_with_config(&[], &containers_yaml());
    // A declared set, emptied again: the agent reconciles it every 500 ms.
    let name = "et-node-status-1";
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: sleeper(IMAGE)}}).to_string(),
    );
    wait_state(name, "running");
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: null}}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(name).is_some() {
        assert!(Instant::now() < deadline, "{name} was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reconciles = || {
        node.metric("edgetwin_container_reconciles_total")
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reconciles() < 1.0 {
        assert!(Instant::now() < deadline, "no reconcile");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sub = Subscriber::start(node.port, "status-watch", "node/containers/status");
    // The retained copy arrives; then, through six more reconciles of an unchanged runtime,
    // nothing else.
    sub.wait_until(Duration::from_secs(10), |got| !got.is_empty());
    let from = reconciles();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reconciles() < from + 6.0 {
        assert!(Instant::now() < deadline, "reconciles stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sub.received().len(), 1, "{:?}", sub.received());
}

#[test]
fn containers_an_invalid_declaration_is_refused_unstored_and_a_reboot_restores_the_last_valid() {
    let _turn = declaring();
    let mut node = Node::start_with_config(&[], &containers_yaml());
    let name = "et-node-valid-1";
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {name: sleeper(IMAGE)}}).to_string(),
    );
    wait_state(name, "running");
    // An image that is not a string: refused at once, nothing stored.
    let msgs = node.probe(
        &[&format!("dt/{NODE}/error")],
        &[(
            &format!("dt/{NODE}/desired"),
            r#"{"containers": {"et-node-bad": {"image": 5}}}"#,
        )],
        1,
    );
    let err = payload(on(&msgs, &format!("dt/{NODE}/error")));
    assert_eq!(err["code"], "device_config", "{err}");
    let twin = node.twin(NODE);
    assert!(twin["desired"]["containers"].get(name).is_some(), "{twin}");
    assert!(
        twin["desired"]["containers"].get("et-node-bad").is_none(),
        "{twin}"
    );
    // The container goes away while the node is down; at the next start (no cloud) the node
    // brings back what was declared last, validly.
    assert!(node.stop().success());
    docker(&["rm", "-f", name]);
    node.restart();
    wait_state(name, "running");
    // `null` for the property removes every declared container.
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": null}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while docker(&["inspect", name]).status.success() {
        assert!(Instant::now() < deadline, "{name} was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn containers_a_patch_naming_one_container_leaves_the_others_declared_and_running() {
    let _turn = declaring();
    let node = Node::start_with_config(&[], &containers_yaml());
    let (a, b) = ("et-node-merge-a", "et-node-merge-b");
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {a: sleeper(IMAGE), b: sleeper(IMAGE)}}).to_string(),
    );
    wait_state(a, "running");
    wait_state(b, "running");
    let started_b = docker(&["inspect", "-f", "{{.State.StartedAt}}", b]).stdout;
    // Only `a` is named: it is stopped, `b` stays declared and is not touched.
    let mut stopped = sleeper(IMAGE);
    stopped["state"] = json!("stopped");
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {a: stopped}}).to_string(),
    );
    wait_state_in(a, &["exited", "created"]);
    let twin = node.twin(NODE);
    assert_eq!(twin["desired"]["containers"][b], sleeper(IMAGE), "{twin}");
    assert_eq!(
        twin["desired"]["containers"][a]["state"], "stopped",
        "{twin}"
    );
    assert!(
        twin["metadata"]["desired"]["containers.a"].is_null()
            && twin["metadata"]["desired"][format!("containers.{a}")]["version"].is_u64(),
        "per-entry metadata: {twin}"
    );
    assert_eq!(state(b).as_deref(), Some("running"));
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", b]).stdout,
        started_b,
        "b was restarted"
    );
    // A `null` entry removes that one container only.
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": {b: null}}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(b).is_some() {
        assert!(Instant::now() < deadline, "{b} was not removed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let twin = node.twin_until(NODE, |t| t["desired"]["containers"].get(b).is_none());
    assert!(twin["desired"]["containers"].get(a).is_some(), "{twin}");
    node.pub_(
        &format!("dt/{NODE}/desired"),
        &json!({"containers": null}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(a).is_some() {
        assert!(Instant::now() < deadline, "{a} was not removed");
        std::thread::sleep(Duration::from_millis(200));
    }
}
