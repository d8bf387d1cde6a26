//! The upstream bridge against a real cloud broker (Mosquitto on a free port, started and stopped
//! by the tests): store-and-forward through outages and `kill -9`, the outbox's drop policies and
//! their metrics, desired patches from the cloud, and convergence after a partition.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgetwin_testkit::*;

const PREFIX: &str = "edgetwin/test-node/";

fn bridge_yaml(port: u16, extra: &str) -> String {
    format!(
        "bridge:\n  url: mqtt://127.0.0.1:{port}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n{extra}"
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits until the metric series has a value satisfying `pred`.
fn metric_until(node: &Node, series: &str, limit: Duration, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let v = node.metric(series);
        if let Some(v) = v.filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never matched within {limit:?}; last {v:?}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_connected(node: &Node, up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    metric_until(
        node,
        "edgetwin_bridge_connected",
        Duration::from_secs(20),
        |v| v == want,
    );
}

/// Publishes each line as one message on the node's broker (`mosquitto_pub -l`, QoS 1, one
/// connection), in order.
fn publish_lines(port: u16, topic: &str, lines: &[String]) {
    require("mosquitto_pub");
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    assert!(child.wait().unwrap().success(), "mosquitto_pub -l failed");
}

fn telemetry(range: std::ops::Range<u32>, pad: usize) -> Vec<String> {
    range
        .map(|i| {
            format!(
                r#"{{"ts":{i},"values":{{"temperature":{i}}},"pad":"{}"}}"#,
                "x".repeat(pad)
            )
        })
        .collect()
}

/// The `ts` of every telemetry message received, in arrival order.
fn seqs(got: &[(String, String)]) -> Vec<u32> {
    got.iter()
        .filter(|(t, _)| t.ends_with("/telemetry"))
        .filter_map(|(_, p)| serde_json::from_str::<serde_json::Value>(p).ok())
        .filter_map(|v| v["ts"].as_u64())
        .map(|v| v as u32)
        .collect()
}

/// Order of first arrival, duplicates (at-least-once resends) removed.
fn first_arrivals(s: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    s.iter().copied().filter(|v| seen.insert(*v)).collect()
}

#[test]
fn bridge_telemetry_produced_while_cloud_is_down_arrives_in_order_after_it_returns() {
    let mut cloud = Mosquitto::start();
    let sub = Subscriber::start(
        cloud.port,
        "cloud-app-1",
        &format!("{PREFIX}dt/+/telemetry"),
    );
    let node = Node::start_with_config(&["t-1"], &bridge_yaml(cloud.port, ""));
    wait_connected(&node, true);
    publish_lines(node.port, "dt/t-1/telemetry", &telemetry(0..10, 0));
    sub.wait_until(Duration::from_secs(10), |g| seqs(g).len() >= 10);

    cloud.stop();
    wait_connected(&node, false);
    publish_lines(node.port, "dt/t-1/telemetry", &telemetry(10..510, 0));
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(10),
        |v| v >= 500.0,
    );
    cloud.restart();
    wait_connected(&node, true);
    let got = sub.wait_until(Duration::from_secs(30), |g| {
        first_arrivals(&seqs(g)).len() >= 510
    });
    assert_eq!(
        first_arrivals(&seqs(&got)),
        (0..510).collect::<Vec<_>>(),
        "every message arrives, in the order it was produced"
    );
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(10),
        |v| v == 0.0,
    );
    assert!(node.metric("edgetwin_bridge_reconnects_total").unwrap() >= 1.0);
    assert!(
        node.metric("edgetwin_bridge_replayed_messages_total")
            .unwrap()
            >= 500.0
    );
}

#[test]
fn bridge_telemetry_survives_kill_9_of_the_node_while_the_cloud_is_down() {
    let mut cloud = Mosquitto::start();
    let sub = Subscriber::start(
        cloud.port,
        "cloud-app-2",
        &format!("{PREFIX}dt/+/telemetry"),
    );
    let mut node = Node::start_with_config(&["k-1"], &bridge_yaml(cloud.port, ""));
    wait_connected(&node, true);
    cloud.stop();
    wait_connected(&node, false);
    publish_lines(node.port, "dt/k-1/telemetry", &telemetry(0..300, 0));
    // Appended means committed: the outbox gauge moves only after the durable transaction.
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(10),
        |v| v >= 300.0,
    );
    node.kill9();
    node.restart();
    cloud.restart();
    let got = sub.wait_until(Duration::from_secs(30), |g| {
        first_arrivals(&seqs(g)).len() >= 300
    });
    assert_eq!(first_arrivals(&seqs(&got)), (0..300).collect::<Vec<_>>());
}

fn outbox_limit_run(policy: &str) -> (Vec<u32>, f64, String) {
    let mut cloud = Mosquitto::start();
    let sub = Subscriber::start(
        cloud.port,
        "cloud-app-3",
        &format!("{PREFIX}dt/+/telemetry"),
    );
    cloud.stop();
    let extra = format!(
        "  up: [{{filter: dt/+/telemetry}}]\n  outbox: {{max_bytes: 65536, policy: {policy}}}\n"
    );
    let node = Node::start_with_config(&["o-1"], &bridge_yaml(cloud.port, &extra));
    let sent = 300u32;
    publish_lines(node.port, "dt/o-1/telemetry", &telemetry(0..sent, 500));
    let reason = if policy == "drop_oldest" {
        "bytes_limit"
    } else {
        "rejected_new"
    };
    let series = format!("edgetwin_outbox_dropped_records_total{{reason=\"{reason}\"}}");
    // Everything was either stored or dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (stored, dropped) = loop {
        let stored = node.metric("edgetwin_outbox_records").unwrap_or(0.0);
        let dropped = node.metric(&series).unwrap_or(0.0);
        if stored + dropped >= f64::from(sent) || Instant::now() > deadline {
            break (stored, dropped);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stored + dropped, f64::from(sent), "{}", node.metrics());
    assert!(dropped > 0.0, "the limit was reached");
    cloud.restart();
    let got = sub.wait_until(Duration::from_secs(30), |g| {
        first_arrivals(&seqs(g)).len() as f64 >= stored
    });
    // Nothing is dropped for any other reason.
    let m = node.metrics();
    for other in [
        "bytes_limit",
        "age_limit",
        "records_limit",
        "rejected_new",
        "append_failed",
    ] {
        if other != reason {
            assert!(
                m.contains(&format!(
                    "edgetwin_outbox_dropped_records_total{{reason=\"{other}\"}} 0"
                )),
                "{m}"
            );
        }
    }
    (first_arrivals(&seqs(&got)), dropped, node.log())
}

#[test]
fn bridge_outbox_at_its_byte_limit_drops_oldest_and_counts_exactly_the_drops() {
    let (got, dropped, log) = outbox_limit_run("drop_oldest");
    let dropped = dropped as u32;
    assert_eq!(
        got,
        (dropped..300).collect::<Vec<_>>(),
        "the newest survive, in order; the metric counts exactly the lost ones\n{log}"
    );
}

#[test]
fn bridge_outbox_at_its_byte_limit_rejects_new_and_counts_exactly_the_drops() {
    let (got, dropped, log) = outbox_limit_run("reject_new");
    let kept = 300 - dropped as u32;
    assert_eq!(
        got,
        (0..kept).collect::<Vec<_>>(),
        "the oldest survive, in order; the metric counts exactly the refused ones\n{log}"
    );
}

#[test]
fn bridge_desired_patch_published_at_the_cloud_while_node_is_offline_is_applied_after_reconnect() {
    let cloud = Mosquitto::start();
    let mut node = Node::start_with_config(&["d-1"], &bridge_yaml(cloud.port, ""));
    wait_connected(&node, true);
    // The node's persistent session exists at the cloud; now the node goes away.
    assert!(node.stop().success());
    cloud.pub_(&format!("{PREFIX}dt/d-1/desired"), r#"{"setpoint": 19.5}"#);
    node.restart();
    let twin = node.twin_until("d-1", |t| t["desired"]["setpoint"] == 19.5);
    assert_eq!(twin["metadata"]["desired"]["setpoint"]["source"], "cloud");
    // The cloud sees the result as the retained twin document under the prefix.
    cloud.retained_until(
        &format!("{PREFIX}dt/d-1/twin"),
        Duration::from_secs(10),
        |t| t.is_some_and(|t| t["desired"]["setpoint"] == 19.5),
    );
    assert!(
        node.metric("edgetwin_twin_updates_accepted_total{side=\"desired\",source=\"cloud\"}")
            .unwrap()
            >= 1.0
    );
}

#[test]
fn bridge_local_and_cloud_edits_during_a_partition_converge_to_one_value_on_both_sides() {
    let cloud = Mosquitto::start();
    let link = TcpProxy::start(cloud.port);
    let node = Node::start_with_config(&["c-1"], &bridge_yaml(link.port, ""));
    wait_connected(&node, true);
    cloud.retained_until(
        &format!("{PREFIX}dt/c-1/twin"),
        Duration::from_secs(10),
        |t| t.is_some(),
    );

    link.cut();
    wait_connected(&node, false);
    let base = now_ms();
    // setpoint: the cloud writes last; mode: the engineer on site writes last.
    node.pub_(
        "dt/c-1/desired",
        &format!(r#"{{"setpoint": 22, "ts": {}}}"#, base + 1000),
    );
    node.pub_(
        "dt/c-1/desired",
        &format!(r#"{{"mode": "local", "ts": {}}}"#, base + 3000),
    );
    node.twin_until("c-1", |t| t["desired"]["mode"] == "local");
    cloud.pub_(
        &format!("{PREFIX}dt/c-1/desired"),
        &format!(
            r#"{{"setpoint": 18, "mode": "cloud", "ts": {}}}"#,
            base + 2000
        ),
    );
    link.heal();
    wait_connected(&node, true);

    let converged =
        |t: &serde_json::Value| t["desired"]["setpoint"] == 18.0 && t["desired"]["mode"] == "local";
    let twin = node.twin_until("c-1", converged);
    assert_eq!(twin["metadata"]["desired"]["setpoint"]["source"], "cloud");
    assert_eq!(twin["metadata"]["desired"]["mode"]["source"], "local");
    let at_cloud = cloud
        .retained_until(
            &format!("{PREFIX}dt/c-1/twin"),
            Duration::from_secs(10),
            |t| t.is_some_and(converged),
        )
        .unwrap();
    assert_eq!(at_cloud["desired"], twin["desired"]);
}

#[test]
fn bridge_container_command_from_the_cloud_is_republished_locally() {
    let cloud = Mosquitto::start();
    let node = Node::start_with_config(&[], &bridge_yaml(cloud.port, ""));
    wait_connected(&node, true);
    let local = Subscriber::start(node.port, "local-agent", "node/containers/cmd");
    cloud.pub_(
        &format!("{PREFIX}node/containers/cmd"),
        r#"{"id":"c1","action":"list"}"#,
    );
    let got = local.wait_until(Duration::from_secs(10), |g| !g.is_empty());
    assert_eq!(got[0].0, "node/containers/cmd");
    assert_eq!(got[0].1, r#"{"id":"c1","action":"list"}"#);
}

#[test]
fn bridge_sigterm_flushes_what_is_queued_and_exits_cleanly() {
    let cloud = Mosquitto::start();
    let sub = Subscriber::start(
        cloud.port,
        "cloud-app-4",
        &format!("{PREFIX}dt/+/telemetry"),
    );
    let mut node = Node::start_with_config(&["s-1"], &bridge_yaml(cloud.port, ""));
    wait_connected(&node, true);
    publish_lines(node.port, "dt/s-1/telemetry", &telemetry(0..200, 0));
    metric_until(
        &node,
        "edgetwin_outbox_appended_records_total",
        Duration::from_secs(10),
        |v| v >= 200.0,
    );
    assert!(node.stop().success(), "{}", node.log());
    let got = sub.wait_until(Duration::from_secs(10), |g| {
        first_arrivals(&seqs(g)).len() >= 200
    });
    assert_eq!(first_arrivals(&seqs(&got)), (0..200).collect::<Vec<_>>());
}

#[test]
fn bridge_reconnect_republishes_every_twin_document_the_cloud_lost() {
    let cloud = Mosquitto::start();
    let link = TcpProxy::start(cloud.port);
    let node = Node::start_with_config(&["r-1", "r-2"], &bridge_yaml(link.port, ""));
    wait_connected(&node, true);
    for d in ["r-1", "r-2"] {
        cloud.retained_until(
            &format!("{PREFIX}dt/{d}/twin"),
            Duration::from_secs(10),
            |t| t.is_some(),
        );
    }
    // The cloud loses its retained state (e.g. a broker without persistence restarted).
    for d in ["r-1", "r-2"] {
        mosquitto_pub(cloud.port, &format!("{PREFIX}dt/{d}/twin"), "", &["-r"]);
        cloud.retained_until(
            &format!("{PREFIX}dt/{d}/twin"),
            Duration::from_secs(10),
            |t| t.is_none(),
        );
    }
    link.cut();
    wait_connected(&node, false);
    link.heal();
    wait_connected(&node, true);
    for d in ["r-1", "r-2"] {
        let t = cloud
            .retained_until(
                &format!("{PREFIX}dt/{d}/twin"),
                Duration::from_secs(10),
                |t| t.is_some(),
            )
            .unwrap();
        assert_eq!(t["device"], d);
        assert_eq!(
            t,
            node.twin(d),
            "the cloud holds the node's current document"
        );
    }
}

#[test]
fn bridge_presence_is_online_on_connect_offline_via_the_will_on_kill_9_and_stopped_on_sigterm() {
    let cloud = Mosquitto::start();
    let topic = format!("{PREFIX}node/status");
    let mut node = Node::start_with_config(&["p-1"], &bridge_yaml(cloud.port, ""));
    let at = |want: &'static str| {
        retained_until(cloud.port, &topic, Duration::from_secs(15), |v| {
            v.is_some_and(|v| v["state"] == want)
        })
        .unwrap()
    };
    let online = at("online");
    assert!(
        online["boot"].as_i64().is_some() && online["version"].is_string(),
        "{online}"
    );
    // A crash: the cloud broker publishes the will as soon as the socket closes.
    node.kill9();
    let dead = at("offline");
    assert_eq!(dead["reason"], "connection lost", "{dead}");
    // Back, with a new boot; then a clean stop says so itself.
    node.restart();
    let again = at("online");
    assert!(
        again["boot"].as_i64() > online["boot"].as_i64(),
        "{again} after {online}"
    );
    assert!(node.stop().success());
    let stopped = at("offline");
    assert_eq!(stopped["reason"], "stopped", "{stopped}");
    assert!(stopped["boot"] == again["boot"], "{stopped}");
}

#[test]
fn bridge_presence_of_a_frozen_node_turns_offline_through_its_will() {
    let cloud = Mosquitto::start();
    let topic = format!("{PREFIX}node/status");
    // keep_alive_s: 5 (bridge_yaml).
    let node = Node::start_with_config(&["p-2"], &bridge_yaml(cloud.port, ""));
    retained_until(cloud.port, &topic, Duration::from_secs(15), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    signal(node.pid(), "STOP");
    // The cloud broker notices after 1.5 keep-alives counted from the node's last packet, at its
    // own check's granularity (11-12 s seen with Mosquitto 2.0.11), then publishes the will.
    let dead = retained_until(cloud.port, &topic, Duration::from_secs(25), |v| {
        v.is_some_and(|v| v["state"] == "offline")
    })
    .unwrap();
    signal(node.pid(), "CONT");
    assert_eq!(dead["reason"], "connection lost", "{dead}");
    // Thawed, it reconnects and is online again.
    retained_until(cloud.port, &topic, Duration::from_secs(20), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
}

#[test]
fn bridge_health_document_is_retained_at_the_cloud_follows_changes_and_stays_quiet_otherwise() {
    let cloud = Mosquitto::start();
    let topic = format!("{PREFIX}node/health");
    let node = Node::start_with_config(&["p-3"], &bridge_yaml(cloud.port, ""));
    let ready = cloud
        .retained_until(&topic, Duration::from_secs(20), |v| {
            v.is_some_and(|v| v["ready"] == true)
        })
        .unwrap();
    assert!(ready["uptime_s"].is_u64(), "{ready}");
    assert!(
        ready["memory_rss_bytes"].as_u64() > Some(1 << 20),
        "{ready}"
    );
    assert!(
        ready["disk"]["free_bytes"].as_u64() > Some(0)
            && ready["disk"]["total_bytes"].as_u64() >= ready["disk"]["free_bytes"].as_u64(),
        "{ready}"
    );
    assert_eq!(ready["outbox"]["dropped"], 0, "{ready}");
    let devices: u64 = ready["devices"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(devices, 1, "one registered device: {ready}");
    assert!(ready.get("containers").is_none(), "no agent: {ready}");

    // Nothing changes: the samples every 2 s are not sent.
    let watch = Subscriber::start(cloud.port, "health-watch", &topic);
    let first = watch.wait_until(Duration::from_secs(10), |got| !got.is_empty());
    std::thread::sleep(Duration::from_secs(7));
    let quiet = watch.received().len() - first.len();
    assert!(quiet <= 1, "{quiet} health documents in 7 quiet seconds");

    // A mapper comes and goes: each change is at the cloud within a sample or two.
    node.pub_(
        "mappers/modbus/status",
        r#"{"state":"online","ts":1,"version":"t"}"#,
    );
    cloud
        .retained_until(&topic, Duration::from_secs(10), |v| {
            v.is_some_and(|v| v["mappers"]["modbus"] == "online")
        })
        .unwrap();
    node.pub_(
        "mappers/modbus/status",
        r#"{"state":"offline","ts":2,"version":"t"}"#,
    );
    let gone = cloud
        .retained_until(&topic, Duration::from_secs(10), |v| {
            v.is_some_and(|v| v["mappers"]["modbus"] == "offline" && v["devices"]["offline"] == 1)
        })
        .unwrap();
    // The node's own retained copy says the same.
    let local = retained_until(node.port, "node/health", Duration::from_secs(5), |v| {
        v.is_some_and(|v| v["ts"] == gone["ts"])
    })
    .unwrap();
    assert_eq!(local, gone);
}

#[test]
fn bridge_a_twin_document_overtakes_a_telemetry_backlog() {
    let cloud = Mosquitto::start();
    let link = TcpProxy::start(cloud.port);
    let sub = Subscriber::start(cloud.port, "cloud-app-lanes", &format!("{PREFIX}dt/#"));
    let node = Node::start_with_config(&["l-1"], &bridge_yaml(link.port, ""));
    wait_connected(&node, true);
    link.cut();
    wait_connected(&node, false);
    let n = 20_000u32;
    publish_lines(node.port, "dt/l-1/telemetry", &telemetry(0..n, 0));
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(30),
        |v| v >= f64::from(n),
    );
    // An engineer changes desired while the backlog waits: the new twin document is queued
    // after every telemetry message.
    node.pub_("dt/l-1/desired", r#"{"setpoint": 21.5}"#);
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(10),
        |v| v > f64::from(n),
    );
    link.heal();
    let got = sub.wait_until(Duration::from_secs(120), |g| {
        first_arrivals(&seqs(g)).len() >= n as usize
    });
    let twin_at = got
        .iter()
        .position(|(t, p)| t.ends_with("/dt/l-1/twin") && p.contains("21.5"))
        .expect("the new twin document reached the cloud");
    let before = first_arrivals(&seqs(&got[..twin_at])).len();
    assert!(
        before < 1_000,
        "{before} of {n} telemetry messages went up before the twin document"
    );
    assert_eq!(
        first_arrivals(&seqs(&got)),
        (0..n).collect::<Vec<_>>(),
        "telemetry keeps its order in its own lane"
    );
}

#[test]
fn bridge_with_signatures_required_refuses_unsigned_commands_and_applies_signed_ones() {
    let cloud = Mosquitto::start();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("ops.key");
    let made = run(Command::new(edgetwin_bin())
        .args(["key", "generate", "--out"])
        .arg(&key));
    assert!(made.status.success(), "{made:?}");
    let public = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let signatures = format!("  signatures:\n    keys: {{ops: \"{public}\"}}\n");
    let node = Node::start_with_config(&["s-1"], &bridge_yaml(cloud.port, &signatures));
    wait_connected(&node, true);
    let before = node.twin("s-1")["version"].as_u64().unwrap();
    let desired = format!("{PREFIX}dt/s-1/desired");
    let answers = Subscriber::start(cloud.port, "sig-answers", &format!("{PREFIX}+/+/+"));

    // Unsigned: refused and answered where the outcome would have been; nothing changes.
    cloud.pub_(&desired, r#"{"$id": "p-1", "setpoint": 30}"#);
    cloud.pub_(
        &format!("{PREFIX}node/containers/cmd"),
        r#"{"id": "c-1", "action": "list"}"#,
    );
    let got = answers.wait_until(Duration::from_secs(15), |g| {
        g.iter().any(|(t, _)| t.ends_with("dt/s-1/error"))
            && g.iter().any(|(t, _)| t.ends_with("node/containers/result"))
    });
    let find = |suffix: &str| -> serde_json::Value {
        let (_, p) = got.iter().find(|(t, _)| t.ends_with(suffix)).unwrap();
        serde_json::from_str(p).unwrap()
    };
    let e = find("dt/s-1/error");
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("unauthenticated"), Some("p-1")),
        "{e}"
    );
    let r = find("node/containers/result");
    assert_eq!(
        (r["ok"].as_bool(), r["code"].as_str(), r["id"].as_str()),
        (Some(false), Some("unauthenticated"), Some("c-1")),
        "{r}"
    );

    // Signed by a key the node does not trust: refused too.
    let stranger = keys.path().join("stranger.key");
    assert!(run(Command::new(edgetwin_bin())
        .args(["key", "generate", "--out"])
        .arg(&stranger))
    .status
    .success());
    let sign = |key: &std::path::Path, id: &str, msg: &str| -> String {
        let out = run(Command::new(edgetwin_bin())
            .args(["key", "sign", "--key"])
            .arg(key)
            .args(["--id", id, "--topic", &desired, msg]));
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    cloud.pub_(&desired, &sign(&stranger, "ops", r#"{"setpoint": 31}"#));
    metric_until(
        &node,
        "edgetwin_bridge_refused_messages_total{reason=\"bad_signature\"}",
        Duration::from_secs(10),
        |v| v == 1.0,
    );

    // Signed with the trusted key by `edgetwin key sign`: applied.
    cloud.pub_(&desired, &sign(&key, "ops", r#"{"setpoint": 22}"#));
    node.twin_until("s-1", |t| t["desired"]["setpoint"] == 22.0);

    // Signed in Python with the `cryptography` package, from the same key file: applied.
    let script = r#"
import base64, json, sys, time
from cryptography.hazmat.primitives.serialization import load_pem_private_key
key = load_pem_private_key(open(sys.argv[1], "rb").read(), password=None)
topic, msg = sys.argv[2], sys.argv[3]
exp = int(time.time() * 1000) + 600_000
sig = key.sign(f"edgetwin-sig-v1\n{topic}\n{exp}\n{msg}".encode())
print(json.dumps({"msg": msg, "exp": exp, "key": "ops", "sig": base64.b64encode(sig).decode()}))
"#;
    let py = run(Command::new(python())
        .args(["-c", script])
        .arg(&key)
        .args([&desired, r#"{"setpoint": 23}"#]));
    assert!(py.status.success(), "{py:?}");
    cloud.pub_(&desired, String::from_utf8(py.stdout).unwrap().trim());
    let twin = node.twin_until("s-1", |t| t["desired"]["setpoint"] == 23.0);
    assert_eq!(
        twin["version"].as_u64(),
        Some(before + 2),
        "only the two signed patches changed the twin: {twin}"
    );
    assert_eq!(
        node.metric("edgetwin_bridge_refused_messages_total{reason=\"unsigned\"}"),
        Some(2.0)
    );
}

/// The Python batch decoder example (examples/cloud), subscribed at the cloud broker: one JSON
/// line per message it decoded, with the envelope it came in.
fn batch_consumer(port: u16, client_id: &str) -> ScriptPeer {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/cloud/edgetwin_batches.py"
    );
    let args = [
        "--port".to_string(),
        port.to_string(),
        "--topic".to_string(),
        format!("{PREFIX}dt/+/telemetry/#"),
        "--client-id".to_string(),
        client_id.to_string(),
        "--ready".to_string(),
    ];
    ScriptPeer::start(
        script,
        &args,
        "paho-mqtt, zstandard",
        Duration::from_secs(20),
    )
}

/// `(ts, envelope number)` of every message of `device` the consumer printed, in order.
fn decoded(consumer: &ScriptPeer, device: &str) -> Vec<(u32, Option<u64>)> {
    let topic = format!("{PREFIX}dt/{device}/telemetry");
    consumer
        .json_lines()
        .iter()
        .filter(|l| l["topic"] == topic.as_str())
        .map(|l| {
            (
                l["message"]["ts"].as_u64().unwrap() as u32,
                l["batch"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn bridge_batches_telemetry_into_compressed_envelopes_that_the_python_decoder_reads_and_kill_9_loses_none(
) {
    let cloud = Mosquitto::start();
    let link = TcpProxy::start(cloud.port);
    let consumer = batch_consumer(cloud.port, "batch-consumer");
    // Paced to 10 publishes a second, so the kill -9 below lands mid-drain.
    let batch = "  batch: {interval_ms: 500, max_messages: 200}\n  replay_max_msgs_per_s: 10\n";
    let mut node = Node::start_with_config(&["b-1", "b-2"], &bridge_yaml(link.port, batch));
    wait_connected(&node, true);

    // Live telemetry waits for the interval and goes as one envelope (two if it straddled one).
    publish_lines(node.port, "dt/b-1/telemetry", &telemetry(0..5, 0));
    let live = wait_for(Duration::from_secs(10), || {
        let d = decoded(&consumer, "b-1");
        (d.len() >= 5).then_some(d)
    })
    .expect("live telemetry reached the cloud in envelopes");
    let envelopes: std::collections::HashSet<_> = live.iter().map(|(_, b)| *b).collect();
    assert!(
        envelopes.len() <= 2 && !envelopes.contains(&None),
        "5 messages within 500 ms went as {envelopes:?}"
    );
    assert_eq!(
        live.iter().map(|(ts, _)| *ts).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );

    // A backlog of two devices drains in full envelopes; a kill -9 mid-drain loses nothing that
    // was acknowledged, and what was sent but not acked goes again.
    link.cut();
    wait_connected(&node, false);
    publish_lines(node.port, "dt/b-1/telemetry", &telemetry(5..3005, 0));
    publish_lines(node.port, "dt/b-2/telemetry", &telemetry(0..3000, 0));
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(30),
        |v| v >= 6000.0,
    );
    link.heal();
    wait_for(Duration::from_secs(30), || {
        (decoded(&consumer, "b-2").len() >= 400).then_some(())
    })
    .expect("the drain started");
    let before_kill = decoded(&consumer, "b-1").len() + decoded(&consumer, "b-2").len();
    assert!(before_kill < 5 + 6000, "the kill came after the drain");
    node.kill9();
    node.restart();
    let all = |device: &str, n: u32| {
        wait_for(Duration::from_secs(60), || {
            let d = decoded(&consumer, device);
            let ts: Vec<u32> = d.iter().map(|(ts, _)| *ts).collect();
            (first_arrivals(&ts) == (0..n).collect::<Vec<_>>()).then_some(d)
        })
        .unwrap_or_else(|| {
            panic!(
                "{device}: not every message arrived in order: {} decoded\n{}",
                decoded(&consumer, device).len(),
                node.log()
            )
        })
    };
    let b1 = all("b-1", 3005);
    let b2 = all("b-2", 3000);
    let envelopes: std::collections::HashSet<_> =
        b1.iter().chain(b2.iter()).map(|(_, b)| *b).collect();
    assert!(
        !envelopes.contains(&None),
        "every message came in an envelope"
    );
    assert!(
        envelopes.len() <= 6005 / 50,
        "{} envelopes for 6005 messages",
        envelopes.len()
    );
}

#[test]
fn bridge_over_mqtt_5_keeps_its_session_and_labels_its_envelopes() {
    let cloud = Mosquitto::start();
    let extra = "  protocol: v5\n  session_expiry_s: 120\n  batch: {interval_ms: 200}\n";
    let mut node = Node::start_with_config(&["v-1"], &bridge_yaml(cloud.port, extra));
    wait_connected(&node, true);
    assert!(
        cloud
            .log()
            .lines()
            .any(|l| l.contains("as edgetwin-test-node (p5")),
        "the bridge connects with MQTT 5:\n{}",
        cloud.log()
    );
    let status = format!("{PREFIX}node/status");
    let state_is = |want: &'static str| {
        move |v: Option<&serde_json::Value>| v.is_some_and(|v| v["state"] == want)
    };
    cloud
        .retained_until(&status, Duration::from_secs(10), state_is("online"))
        .expect("online at the cloud");

    // An envelope carries its content type and encoding as MQTT 5 properties.
    require("mosquitto_sub");
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cloud.port.to_string(),
            "-V",
            "5",
            "-q",
            "1",
        ])
        .args(["-t", &format!("{PREFIX}dt/v-1/telemetry/batch")])
        .args(["-C", "1", "-W", "20", "-F", "%C|%P|%x"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    publish_lines(node.port, "dt/v-1/telemetry", &telemetry(0..3, 0));
    let out = sub.wait_with_output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let mut parts = line.trim().splitn(3, '|');
    let (ctype, props, hex) = (
        parts.next().unwrap(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    assert_eq!(ctype, "application/vnd.edgetwin.batch.v1+json", "{line}");
    assert!(props.contains("content-encoding:zstd"), "{props}");
    assert!(props.contains("edgetwin-node:test-node"), "{props}");
    let payload: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let (topic, messages) = edgetwin_bridge::batch::decode(&payload).unwrap();
    assert_eq!(topic, "dt/v-1/telemetry");
    assert_eq!(messages.len(), 3);

    // The session outlives the node: a patch the cloud queued while it was dead is applied.
    node.kill9();
    cloud
        .retained_until(&status, Duration::from_secs(10), state_is("offline"))
        .expect("the will says offline");
    cloud.pub_(&format!("{PREFIX}dt/v-1/desired"), r#"{"setpoint": 17.5}"#);
    node.restart();
    let twin = node.twin_until("v-1", |t| t["desired"]["setpoint"] == 17.5);
    assert_eq!(twin["desired"]["setpoint"], 17.5);
}

#[test]
fn bridge_over_mqtt_5_drops_and_counts_what_the_cloud_refuses_instead_of_resending_it() {
    // The cloud's ACL refuses this node's telemetry; MQTT 5 says so in the PUBACK.
    let cloud = Mosquitto::start_with_acl(Some(
        "topic readwrite #\ntopic deny edgetwin/test-node/dt/+/telemetry\n",
    ));
    let extra = "  protocol: v5\n";
    let node = Node::start_with_config(&["r-1"], &bridge_yaml(cloud.port, extra));
    wait_connected(&node, true);
    publish_lines(node.port, "dt/r-1/telemetry", &telemetry(0..5, 0));
    metric_until(
        &node,
        r#"edgetwin_outbox_dropped_records_total{reason="cloud_refused"}"#,
        Duration::from_secs(15),
        |v| v == 5.0,
    );
    metric_until(
        &node,
        "edgetwin_outbox_records",
        Duration::from_secs(10),
        |v| v == 0.0,
    );
    // What the cloud takes still goes: the twin document of a desired change arrives.
    node.pub_("dt/r-1/desired", r#"{"setpoint": 12.5}"#);
    cloud
        .retained_until(
            &format!("{PREFIX}dt/r-1/twin"),
            Duration::from_secs(10),
            |v| v.is_some_and(|v| v["desired"]["setpoint"] == 12.5),
        )
        .expect("the twin document reached the cloud");
}
