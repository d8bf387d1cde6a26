//! The node behind its MQTT gate: users made with `edgetwin user add`, third-party clients
//! (mosquitto_pub/sub) on the gate's port, the broker itself only on loopback.
#![allow(clippy::unwrap_used)]

use edgetwin_testkit::*;

struct Secured {
    node: Node,
    gate: u16,
}

fn secured(devices: &[&str]) -> Secured {
    let creds_dir = tempfile::tempdir().unwrap().keep();
    let creds = creds_dir.join("users.yaml");
    user_add(&creds, "eng", "engineer", None, "eng-pw");
    user_add(&creds, "modbus-mapper", "mapper", Some("modbus"), "mb-pw");
    user_add(&creds, "opcua-mapper", "mapper", Some("opcua"), "ua-pw");
    let gate = free_port();
    let extra = format!(
        "gate:\n  listeners:\n    - listen: 127.0.0.1:{gate}\n  credentials_file: {}\n",
        creds.display()
    );
    Secured {
        node: Node::start_with_config(devices, &extra),
        gate,
    }
}

#[test]
fn security_wrong_password_is_refused_and_the_right_one_reaches_the_twin() {
    let s = secured(&["s-1"]);
    let o = publish_as(
        s.gate,
        "eng",
        "wrong",
        "dt/s-1/desired",
        r#"{"setpoint": 20}"#,
        false,
    );
    assert!(!o.status.success(), "wrong password accepted");
    let o = publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-1/desired",
        r#"{"setpoint": 20}"#,
        false,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.node.twin_until("s-1", |t| t["desired"]["setpoint"] == 20);
    assert!(s
        .node
        .metrics()
        .contains("edgetwin_gate_auth_failures_total{reason=\"bad_password\"} 1"));
}

#[test]
fn security_mapper_cannot_publish_desired_or_another_protocols_device() {
    let s = secured(&["s-2"]);
    // Denied: the modbus mapper writing desired, the opcua mapper reporting a modbus device.
    publish_as(
        s.gate,
        "modbus-mapper",
        "mb-pw",
        "dt/s-2/desired",
        r#"{"setpoint": 30}"#,
        false,
    );
    publish_as(
        s.gate,
        "opcua-mapper",
        "ua-pw",
        "dt/s-2/reported",
        r#"{"temperature": 99}"#,
        false,
    );
    // Allowed: its own device's reading.
    let o = publish_as(
        s.gate,
        "modbus-mapper",
        "mb-pw",
        "dt/s-2/reported",
        r#"{"temperature": 21}"#,
        false,
    );
    assert!(o.status.success());
    let t = s
        .node
        .twin_until("s-2", |t| t["reported"]["temperature"] == 21);
    assert!(t["desired"].get("setpoint").is_none(), "{t}");
    let m = s.node.metrics();
    assert!(
        m.contains("edgetwin_gate_denied_total{role=\"mapper\",kind=\"publish\"} 2"),
        "{m}"
    );
}

#[test]
fn security_engineer_cannot_publish_reported_and_v5_shares_the_port() {
    let s = secured(&["s-3"]);
    publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-3/reported",
        r#"{"temperature": 5}"#,
        true,
    );
    let o = publish_as(
        s.gate,
        "eng",
        "eng-pw",
        "dt/s-3/desired",
        r#"{"mode": "eco"}"#,
        true,
    );
    assert!(
        o.status.success(),
        "v5 on the gate port: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = s.node.twin_until("s-3", |t| t["desired"]["mode"] == "eco");
    assert!(t["reported"].get("temperature").is_none(), "{t}");
}
