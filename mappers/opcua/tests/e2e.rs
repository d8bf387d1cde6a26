//! The real mapper binary between the real node and the asyncua simulator, observed only through
//! the topic contract: subscription-driven updates, desired writes, refusals on the error topic,
//! offline/online, the example profile, and the SDK's compliance suite.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::{free_port, MapperProcess, Node, Subscriber};
use serde_json::{json, Value};

const MAPPER: &str = env!("CARGO_BIN_EXE_edgetwin-mapper-opcua");

/// The mapper binary against a node.
struct Mapper;

impl Mapper {
    fn start(node: &Node) -> MapperProcess {
        MapperProcess::start(
            node,
            MAPPER,
            &[
                (
                    "EDGETWIN_LOG",
                    "info,edgetwin_mapper_opcua=debug,edgetwin_mapper_sdk=debug".as_ref(),
                ),
                (
                    "EDGETWIN_OPCUA_PKI_DIR",
                    node.dir.path().join("pki").as_os_str(),
                ),
            ],
        )
    }
}

fn status(node: &Node, device: &str, state: &str, limit: Duration) {
    node.retained_until(&format!("dt/{device}/status"), limit, |v| {
        v.is_some_and(|v| v["state"] == state)
    });
}

fn station_props<'a>() -> Vec<Prop<'a>> {
    vec![
        prop(
            "counter",
            "int",
            &node("ns=2;s=Counter", "samplingInterval: 200ms"),
        ),
        prop("temperature", "float", &node("ns=2;s=Float", "")),
        prop("serial", "string", &node("ns=2;s=String", "poll: true")),
        prop("numeric", "int", &node("ns=2;i=5", "")),
        rw(
            "setpoint",
            "float",
            &node("ns=2;s=Setpoint", "samplingInterval: 200ms"),
        ),
    ]
}

#[test]
fn opcua_mapper_subscribed_changes_reach_the_twin_and_polled_values_are_reported() {
    let sim = Sim::start(free_port());
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "300ms",
        &station_props(),
    ));
    let mut mapper = Mapper::start(&node);
    let t = node.twin_until("station-1", |t| {
        t["reported"]["counter"].is_u64() && t["reported"]["serial"].is_string()
    });
    assert_eq!(t["reported"]["temperature"], json!(21.5));
    assert_eq!(t["reported"]["serial"], json!("EDGE-1"));
    assert_eq!(t["reported"]["numeric"], json!(42));
    assert_eq!(t["reported"]["setpoint"], json!(21.5));
    // The counter changes on the server every 200 ms; the twin follows it (the subscription
    // delivers each change, the next collect cycle reports it).
    let first = t["reported"]["counter"].as_u64().unwrap();
    let mut seen = vec![first];
    while seen.len() < 4 {
        let t = node.twin_until("station-1", |t| {
            t["reported"]["counter"]
                .as_u64()
                .is_some_and(|c| c > *seen.last().unwrap())
        });
        seen.push(t["reported"]["counter"].as_u64().unwrap());
    }
    status(&node, "station-1", "online", Duration::from_secs(5));
    assert!(
        mapper.log().contains("subscribed"),
        "the session log names the subscribed properties"
    );
    mapper.assert_running();
}

#[test]
fn opcua_mapper_a_data_change_reaches_the_twin_before_the_next_collect_cycle() {
    let sim = Sim::start(free_port());
    // Read once an hour: only the subscription's pushes can bring the counter's changes.
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "1h",
        &[prop(
            "counter",
            "int",
            &node("ns=2;s=Counter", "samplingInterval: 200ms"),
        )],
    ));
    let _mapper = Mapper::start(&node);
    let t = node.twin_until("station-1", |t| t["reported"]["counter"].is_u64());
    let first = t["reported"]["counter"].as_u64().unwrap();
    // Three changes within twin_until's 10 s: pushed, since no poll comes for an hour.
    let t = node.twin_until("station-1", |t| {
        t["reported"]["counter"]
            .as_u64()
            .is_some_and(|c| c >= first + 3)
    });
    // Each change is stamped when it arrived, and lastSeen follows.
    let ts = t["metadata"]["reported"]["counter"]["ts"].as_i64().unwrap();
    assert!(edgetwin_contract::now_ms() - ts < 10_000, "{t}");
}

#[test]
fn opcua_mapper_desired_setpoint_reaches_the_server_is_reported_and_delta_clears() {
    let sim = Sim::start(free_port());
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "300ms",
        &station_props(),
    ));
    let _mapper = Mapper::start(&node);
    node.twin_until("station-1", |t| t["reported"]["setpoint"].is_number());
    node.pub_("dt/station-1/desired", r#"{"setpoint": 25.5}"#);
    let w = sim.wait_write_of("ns=2;s=Setpoint", &json!(25.5));
    assert_eq!(w["type"], json!("Double"));
    let t = node.twin_until("station-1", |t| t["reported"]["setpoint"] == json!(25.5));
    assert_eq!(t["desired"]["setpoint"], json!(25.5));
    for (k, v) in t["desired"].as_object().unwrap() {
        assert_eq!(&t["reported"][k], v, "delta left for {k}: {t}");
    }
}

#[test]
fn opcua_mapper_unknown_node_is_reported_on_the_error_topic_and_others_keep_reporting() {
    let sim = Sim::start(free_port());
    let props = vec![
        prop("numeric", "int", &node("ns=2;i=5", "")),
        prop("missing", "int", &node("ns=2;s=NoSuchNode", "")),
    ];
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "300ms",
        &props,
    ));
    // Errors are not retained: subscribe before the mapper starts.
    let sub = Subscriber::start(node.port, "opcua-errors", "dt/station-1/error");
    let mut mapper = Mapper::start(&node);
    let got = sub.wait_until(Duration::from_secs(15), |m| !m.is_empty());
    let e: Value = serde_json::from_str(&got[0].1).unwrap();
    let text = e["message"].as_str().unwrap_or_default();
    assert!(text.contains("missing"), "{e}");
    assert!(
        text.contains("BadNodeIdUnknown"),
        "the status code is named: {e}"
    );
    let t = node.twin_until("station-1", |t| t["reported"]["numeric"] == json!(42));
    assert!(t["reported"].get("missing").is_none(), "{t}");
    status(&node, "station-1", "online", Duration::from_secs(5));
    // The bad node id stays visible in the twin while it lasts.
    let t = node.twin_until("station-1", |t| {
        t["status"]["errors"]["missing"].is_object()
    });
    let e = &t["status"]["errors"]["missing"];
    assert_eq!(e["code"], "device_refused", "{t}");
    assert!(
        e["message"].as_str().unwrap().contains("BadNodeIdUnknown"),
        "{t}"
    );
    mapper.assert_running();
}

#[test]
fn opcua_mapper_stopped_server_goes_offline_and_recovers_without_restart() {
    let mut sim = Sim::start(free_port());
    let props = vec![
        prop(
            "counter",
            "int",
            &node("ns=2;s=Counter", "samplingInterval: 200ms"),
        ),
        prop("numeric", "int", &node("ns=2;i=5", "poll: true")),
    ];
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "500ms",
        &props,
    ));
    let mut mapper = Mapper::start(&node);
    status(&node, "station-1", "online", Duration::from_secs(15));

    sim.stop();
    status(&node, "station-1", "offline", Duration::from_secs(10));

    sim.restart();
    status(&node, "station-1", "online", Duration::from_secs(30));
    // The counter restarts from 0 on the new server; a fresh small value shows the new session's
    // subscription delivers.
    node.twin_until("station-1", |t| {
        t["reported"]["counter"].as_u64().is_some_and(|c| c < 40)
    });
    mapper.assert_running();
}

#[test]
fn opcua_mapper_serves_the_example_opcua_plc_profile_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::secure(
        free_port(),
        &dir.path().join("server"),
        Some("edgetwin:tank-secret"),
    );
    let (cert, key) = client_cert(&dir.path().join("client"));
    let pw = dir.path().join("tank-station-1.password");
    std::fs::write(&pw, "tank-secret\n").unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/profiles/opcua-plc.yaml"
    ))
    .unwrap();
    // Only where things are on this machine changes: endpoint, secrets and PKI paths.
    let profile = example
        .replace("opc.tcp://192.0.2.40:4840", &sim.url())
        .replace(
            "/etc/edgetwin/secrets/tank-station-1.password",
            &pw.display().to_string(),
        )
        .replace("/etc/edgetwin/pki/client-cert.der", &cert)
        .replace("/etc/edgetwin/pki/client-key.pem", &key);
    assert!(profile.contains(&sim.url()) && profile.contains(&cert));
    let node = Node::start_with_profile(&profile);
    let mut mapper = Mapper::start(&node);
    let t = node.twin_until("tank-station-1", |t| {
        let r = &t["reported"];
        r["tank_level"].is_number()
            && r["temperature"].is_number()
            && r["pump_speed"].is_number()
            && r["batch_count"].is_number()
            && r["recipe"].is_string()
            && r["pump_running"].is_boolean()
    });
    let r = &t["reported"];
    assert_eq!(r["temperature"], json!(18.5));
    assert_eq!(r["pump_running"], json!(false));
    // No defaults on actuators: adding the device writes nothing to the PLC, so the
    // simulator's own speed (1200) is reported as it is.
    assert_eq!(r["pump_speed"], json!(1200));
    assert_eq!(t["desired"], json!({}), "{t}");
    let r = &t["reported"];
    assert_eq!(r["batch_count"], json!(7));
    assert_eq!(r["recipe"], json!("PILS"));
    let level = r["tank_level"].as_f64().unwrap();
    assert!((40.0..=90.0).contains(&level), "{t}");

    node.pub_(
        "dt/tank-station-1/desired",
        r#"{"pump_running": true, "pump_speed": 1500, "recipe": "WEIZEN"}"#,
    );
    let w = sim.wait_write_of("ns=3;s=\"Pump1\".\"Run\"", &json!(true));
    assert_eq!(w["type"], json!("Boolean"));
    let w = sim.wait_write_of("ns=3;s=\"Pump1\".\"Speed\"", &json!(1500));
    assert_eq!(w["type"], json!("UInt16"));
    let w = sim.wait_write_of("ns=3;s=\"Recipe\".\"Name\"", &json!("WEIZEN"));
    assert_eq!(w["type"], json!("String"));
    let t = node.twin_until("tank-station-1", |t| {
        ["pump_running", "pump_speed", "recipe"]
            .iter()
            .all(|k| t["reported"][k] == t["desired"][k])
    });
    assert_eq!(t["reported"]["pump_speed"], json!(1500));
    status(&node, "tank-station-1", "online", Duration::from_secs(5));
    mapper.assert_running();
}

#[test]
fn opcua_mapper_passes_the_sdk_compliance_suite() {
    let sim = Sim::start(free_port());
    let pki = tempfile::tempdir().unwrap();
    run_compliance(ComplianceSpec {
        protocol: "opcua".into(),
        mapper_bin: MAPPER.into(),
        mapper_env: vec![(
            "EDGETWIN_OPCUA_PKI_DIR".into(),
            pki.path().display().to_string(),
        )],
        profile_yaml: profile_yaml(
            "station",
            "station-1",
            &anonymous(&sim),
            "300ms",
            &station_props(),
        ),
        device: "station-1".into(),
        read: ("temperature".into(), Expect::Value(json!(21.5))),
        write: Some(("setpoint".into(), json!(22.5))),
        ..ComplianceSpec::default()
    });
}

#[test]
fn opcua_discover_browses_the_server_into_a_draft_that_serves_its_values() {
    let sim = Sim::start(free_port());
    let node = Node::start(&[]);
    let mut mapper = Mapper::start(&node);
    node.retained_until("mappers/opcua/status", Duration::from_secs(15), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("draft.yaml");
    let out = node.cli(&[
        "discover",
        "opcua",
        "--url",
        &sim.url(),
        "--name",
        "boiler",
        "-o",
        draft.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{}", mapper.log());
    // The simulator's own variables, with their types; not the standard Server object's.
    assert!(said.contains("ns=2;s=Int16 Int16 (int)"), "{said}");
    assert!(
        said.contains("ns=2;s=Setpoint Setpoint (float, writable)"),
        "{said}"
    );
    assert!(!said.contains("ServerStatus"), "{said}");
    let yaml = std::fs::read_to_string(&draft).unwrap();
    let out = node.cli(&["device", "validate", draft.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["device", "apply", draft.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.twin_until("boiler", |t| {
        t["reported"]["Int16"] == json!(-1234) && t["reported"]["String"] == json!("EDGE-1")
    });
    mapper.assert_running();
}

#[test]
fn opcua_mapper_an_integer_desired_on_a_double_node_settles_with_one_write() {
    let sim = Sim::start(free_port());
    let node = Node::start_with_profile(&profile_yaml(
        "station",
        "station-1",
        &anonymous(&sim),
        "200ms",
        &station_props(),
    ));
    let _mapper = Mapper::start(&node);
    node.twin_until("station-1", |t| t["reported"]["setpoint"].is_number());
    // `25`, not `25.0`: the node holds it as 25.0 on the float property, and the server's
    // Double reads back 25.0, which meets it.
    node.pub_("dt/station-1/desired", r#"{"setpoint": 25}"#);
    sim.wait_write_of("ns=2;s=Setpoint", &json!(25.0));
    node.twin_until("station-1", |t| t["reported"]["setpoint"] == json!(25.0));
    let setpoint_writes = || {
        sim.writes()
            .into_iter()
            .filter(|w| w["write"] == "ns=2;s=Setpoint")
            .count()
    };
    // Ten more collect cycles: before, every report resent the delta and the node was written
    // again each time.
    let watch_until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < watch_until && setpoint_writes() == 1 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(setpoint_writes(), 1, "{:?}", sim.writes());
}
