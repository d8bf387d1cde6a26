//! The real mapper binary between the real node and the scripted device on a socat pty pair,
//! observed only through the topic contract: the example profile end to end, desired writes,
//! garbled lines on the error topic, and the SDK's compliance suite.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::{MapperProcess, Node, Subscriber};
use serde_json::{json, Value};

const MAPPER: &str = env!("CARGO_BIN_EXE_edgetwin-mapper-serial");
const DEVICE: &str = "co2-lab-1";

/// The mapper binary against a node.
struct Mapper;

impl Mapper {
    fn start(node: &Node) -> MapperProcess {
        MapperProcess::start(
            node,
            MAPPER,
            &[(
                "EDGETWIN_LOG",
                "info,edgetwin_mapper_serial=debug,edgetwin_mapper_sdk=debug".as_ref(),
            )],
        )
    }
}

fn online(node: &Node) {
    node.retained_until(
        &format!("dt/{DEVICE}/status"),
        Duration::from_secs(15),
        |v| v.is_some_and(|v| v["state"] == "online"),
    );
}

#[test]
fn serial_mapper_serves_the_example_profile_with_polled_and_unsolicited_values() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let node = Node::start_with_profile(&example_profile(&pty.a));
    let mut mapper = Mapper::start(&node);
    online(&node);
    let t = node.twin_until(DEVICE, |t| {
        ["co2", "temperature", "alarm", "alarm_threshold"]
            .iter()
            .all(|p| t["reported"].get(p).is_some())
    });
    assert_eq!(t["reported"]["co2"], json!(412), "{t}");
    assert_eq!(t["reported"]["temperature"], json!(21.5), "{t}");
    assert_eq!(t["reported"]["alarm"], json!(false), "{t}");
    assert_eq!(t["reported"]["alarm_threshold"], json!(1000), "{t}");
    // alarm is pushed as its unsolicited line arrives.
    sim.command("alarm 1");
    node.twin_until(DEVICE, |t| t["reported"]["alarm"] == json!(true));
    mapper.assert_running();
}

#[test]
fn serial_mapper_desired_threshold_reaches_the_device_and_the_delta_clears() {
    let pty = PtyPair::new();
    let sim = Sim::start(&pty.b);
    let node = Node::start_with_profile(&example_profile(&pty.a));
    let _mapper = Mapper::start(&node);
    node.twin_until(DEVICE, |t| t["reported"]["alarm_threshold"] == json!(1000));
    node.pub_(
        &format!("dt/{DEVICE}/desired"),
        r#"{"alarm_threshold": 800}"#,
    );
    sim.wait_received("SETPOINT 800");
    let t = node.twin_until(DEVICE, |t| t["reported"]["alarm_threshold"] == json!(800));
    assert_eq!(t["desired"]["alarm_threshold"], json!(800));
    for (k, v) in t["desired"].as_object().unwrap() {
        assert_eq!(&t["reported"][k], v, "delta left for {k}: {t}");
    }
}

#[test]
fn serial_mapper_garbled_line_is_reported_on_the_error_topic_and_skipped() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    sim.command("garble 1");
    let node = Node::start_with_profile(&lab_profile(&pty.a));
    // Errors are not retained: subscribe before the mapper starts.
    let sub = Subscriber::start(
        node.port,
        "serial-error-watch",
        &format!("dt/{DEVICE}/error"),
    );
    let mut mapper = Mapper::start(&node);
    let got = sub.wait_until(Duration::from_secs(15), |m| {
        m.iter().any(|(_, p)| p.contains("garbled line"))
    });
    let (_, payload) = got
        .iter()
        .find(|(_, p)| p.contains("garbled line"))
        .unwrap();
    let e: Value = serde_json::from_str(payload).unwrap();
    let text = e["message"].as_str().unwrap();
    assert!(text.contains("\"temperature\""), "names the property: {e}");
    assert!(text.contains("T=#?!C"), "quotes the line: {e}");
    assert_eq!(e["topic"], json!(format!("dt/{DEVICE}/reported")), "{e}");
    // Skipped: the next good reply is reported and the device stays online.
    node.twin_until(DEVICE, |t| {
        t["reported"]["temperature"] == json!(21.5) && t["reported"]["co2"] == json!(412)
    });
    online(&node);
    mapper.assert_running();
}

/// A device that only pushes: `alarm` from its unsolicited lines, expected at least every 2 s.
fn push_only_profile(path: &str) -> String {
    format!(
        r#"apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {{name: alarm-panel}}
spec:
  protocol: serial
  properties:
    - {{name: alarm, type: boolean, accessMode: ReadOnly}}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {{name: {DEVICE}}}
spec:
  deviceModelRef: alarm-panel
  protocol:
    serial: {{port: {path}, baudRate: 9600, lineEnding: "\r\n", timeout: 500ms}}
  properties:
    - name: alarm
      collectCycle: 300ms
      silenceTimeout: 2s
      visitors:
        serial: {{unsolicited: true, pattern: '^ALARM=([01])$'}}
"#
    )
}

#[test]
fn serial_mapper_a_device_that_goes_silent_is_stale_not_alive() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let node = Node::start_with_profile(&push_only_profile(&pty.a));
    let mut mapper = Mapper::start(&node);
    node.twin_until(DEVICE, |t| {
        t["status"]["state"] == "online" && t["reported"]["alarm"] == json!(false)
    });
    sim.command("quiet");
    // No line for 2 × 2 s + 1 s (its bound), seen by the node's once-a-second sweep; the mapper
    // still runs and still says online, but it no longer reports the last line as new.
    let t = node.twin_until(DEVICE, |t| t["status"]["state"] == "stale");
    let last_seen = t["status"]["lastSeen"].as_i64().unwrap();
    assert!(edgetwin_contract::now_ms() - last_seen >= 2_000, "{t}");
    let t = node.twin_until(DEVICE, |t| {
        t["status"]["errors"]["alarm"]["code"] == "silent"
    });
    assert!(
        t["status"]["errors"]["alarm"]["message"]
            .as_str()
            .unwrap()
            .contains("silenceTimeout"),
        "{t}"
    );
    assert_eq!(
        node.retained(&format!("dt/{DEVICE}/status")).unwrap()["state"],
        "online"
    );
    mapper.assert_running();
    // It speaks again: online, with the error gone.
    sim.command("loud");
    let t = node.twin_until(DEVICE, |t| {
        t["status"]["state"] == "online" && t["status"].get("errors").is_none()
    });
    assert!(t["status"]["lastSeen"].as_i64().unwrap() > last_seen, "{t}");
}

#[test]
fn serial_mapper_passes_the_sdk_compliance_suite() {
    let pty = PtyPair::new();
    let _sim = Sim::start(&pty.b);
    run_compliance(ComplianceSpec {
        protocol: "serial".into(),
        mapper_bin: MAPPER.into(),
        profile_yaml: lab_profile(&pty.a),
        device: DEVICE.into(),
        read: ("co2".into(), Expect::Value(json!(412))),
        write: Some(("alarm_threshold".into(), json!(900))),
        ..ComplianceSpec::default()
    });
}
