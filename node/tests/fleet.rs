//! `edgetwin fleet` against a real cloud broker (Mosquitto) and two real nodes bridged to it:
//! the operator lists the nodes with presence and health, reads and watches a node's twins, and
//! sends a desired patch and a container command through the cloud, with their answers.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgetwin_testkit::docker::daemon;
use edgetwin_testkit::*;

fn bridge_yaml(cloud: u16, node: &str) -> String {
    format!(
        "bridge:\n  url: mqtt://127.0.0.1:{cloud}\n  topic_prefix: edgetwin/{node}/\n  client_id: edgetwin-{node}\n  keep_alive_s: 5\n  reconnect: {{initial_ms: 100, max_ms: 400}}\n"
    )
}

fn fleet(cloud: u16, args: &[&str]) -> Output {
    run(Command::new(edgetwin_bin()).arg("fleet").args(args).args([
        "--broker",
        &format!("127.0.0.1:{cloud}"),
        "--timeout-ms",
        "10000",
    ]))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `fleet list` until its table satisfies `pred`.
fn list_until(cloud: u16, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = fleet(cloud, &["list"]);
        let t = text(&out);
        if out.status.success() && pred(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "fleet list never showed it:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn row<'a>(table: &'a str, node: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .unwrap_or("")
}

#[test]
fn fleet_lists_watches_and_commands_two_nodes_through_the_cloud_broker() {
    let cloud = Mosquitto::start();
    let a = Node::start_with_config(&["f-1"], &bridge_yaml(cloud.port, "node-a"));
    let containers = format!(
        "containers:\n  runtime_socket: unix://{}\n  reconcile_interval_ms: 500\n",
        daemon().socket.display()
    );
    let mut b = Node::start_with_config(
        &["f-2"],
        &format!("{}{containers}", bridge_yaml(cloud.port, "node-b")),
    );

    // Both nodes, online, ready, with their devices (node-b's own twin too) and node-b's
    // containers counted.
    let t = list_until(cloud.port, |t| {
        let (ra, rb) = (row(t, "node-a"), row(t, "node-b"));
        [ra, rb]
            .iter()
            .all(|r| r.contains("online") && r.contains("yes"))
            && ra.contains("0/1 online")
            && rb.contains("0/2 online")
    });
    assert!(row(&t, "node-b").contains("running"), "{t}");
    assert!(
        !row(&t, "node-a").contains("running"),
        "no container agent: {t}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&fleet(cloud.port, &["list", "--json"]).stdout).unwrap();
    assert_eq!(json["node-a"]["presence"]["state"], "online", "{json}");
    assert!(json["node-a"]["health"]["uptime_s"].is_u64(), "{json}");

    // A desired patch through the cloud, answered by the node.
    let set = fleet(cloud.port, &["set", "node-a", "f-1", "setpoint=21.5"]);
    assert!(set.status.success(), "{}", text(&set));
    assert!(
        text(&set).contains("node-a/f-1: accepted at version"),
        "{}",
        text(&set)
    );
    let rejected = fleet(cloud.port, &["set", "node-a", "f-1", "setpoint=99"]);
    assert!(!rejected.status.success());
    assert!(
        text(&rejected).contains("out_of_range"),
        "{}",
        text(&rejected)
    );

    // The twin as the cloud holds it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = fleet(cloud.port, &["twin", "node-a", "f-1"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if doc["desired"]["setpoint"] == 21.5 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Watching node-a while it changes.
    let mut watch = Command::new(edgetwin_bin())
        .args(["fleet", "watch", "node-a", "--device", "f-1"])
        .args(["--broker", &format!("127.0.0.1:{}", cloud.port)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap());
    // The retained document comes first: the watch is subscribed once it is printed.
    let mut lines = lines.lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("edgetwin/node-a/dt/f-1/"), "{first}");
    assert!(fleet(cloud.port, &["set", "node-a", "f-1", "setpoint=22"])
        .status
        .success());
    let seen = lines
        .map_while(Result::ok)
        .find(|l| l.starts_with("edgetwin/node-a/dt/f-1/twin") && l.contains("22.0"));
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        seen.is_some(),
        "the watch never printed the new twin document"
    );

    // A container command to node-b, with the agent's result.
    let list = fleet(
        cloud.port,
        &["containers", "node-b", r#"{"action": "list"}"#],
    );
    assert!(list.status.success(), "{}", text(&list));
    let result: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["containers"].is_array(), "{result}");
    let bad = fleet(
        cloud.port,
        &[
            "containers",
            "node-b",
            r#"{"action": "stop", "name": "et-fleet-none"}"#,
        ],
    );
    assert!(!bad.status.success());
    assert!(text(&bad).contains("no_such_container"), "{}", text(&bad));

    // node-b crashes: the fleet sees it offline at once (its will), node-a still online.
    b.kill9();
    let t = list_until(cloud.port, |t| {
        row(t, "node-b").contains("offline (connection lost)")
    });
    assert!(row(&t, "node-a").contains("online"), "{t}");
    drop(a);
}
