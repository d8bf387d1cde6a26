//! The SDK runtime against the real node: assignments, polling, reporting, status, errors,
//! telemetry, writes and metrics, with the memory driver as the transport's test double; and the
//! compliance suite against the `memory_mapper` example binary.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgetwin_mapper_sdk::compliance::{run_compliance, ComplianceSpec, Expect};
use edgetwin_testkit::Node;
use serde_json::json;

#[test]
fn sdk_memory_mapper_passes_the_compliance_suite() {
    run_compliance(ComplianceSpec {
        protocol: "serial".into(),
        mapper_bin: memory_mapper_bin(),
        profile_yaml: profile(&["sim-1"]),
        device: "sim-1".into(),
        read: ("humidity".into(), Expect::Value(json!(40.0))),
        write: Some(("setpoint".into(), json!(22.5))),
        ..ComplianceSpec::default()
    });
}

#[test]
fn runtime_serves_devices_added_and_removed_by_retained_assignment_without_restart() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("sim-1 online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    node.write_profile(&profile(&["sim-1", "sim-2"]));
    eventually("sim-2 online", || {
        status(&node, "sim-2").as_deref() == Some("online")
    });
    node.twin_until("sim-2", |t| t["reported"]["humidity"] == 40.0);

    node.write_profile(&profile(&["sim-1"]));
    eventually("sim-2 status cleared", || status(&node, "sim-2").is_none());
    let reads = sim.with("mem-sim-2", |d| d.reads);
    eventually("sim-1 still polled", || {
        sim.with("mem-sim-1", |d| d.reads) > reads + 3
    });
    assert_eq!(
        sim.with("mem-sim-2", |d| d.reads),
        reads,
        "a removed device is not polled"
    );
    assert_eq!(
        sim.with("mem-sim-1", |d| d.connects),
        1,
        "unchanged devices are not reconnected"
    );
}

#[test]
fn runtime_marks_device_offline_on_link_error_and_recovers_without_restart() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    sim.with("mem-sim-1", |d| d.online = false);
    eventually("offline", || {
        status(&node, "sim-1").as_deref() == Some("offline")
    });
    node.twin_until("sim-1", |t| t["status"]["state"] == "offline");

    sim.with("mem-sim-1", |d| {
        d.online = true;
        d.values.insert("humidity".into(), json!(41));
    });
    eventually("online again", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });
    node.twin_until("sim-1", |t| t["reported"]["humidity"] == 41.0);
}

#[test]
fn runtime_reports_a_refused_property_on_the_error_topic_while_others_keep_reporting() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    let errors = Watch::new(node.port, "dt/sim-1/error");
    sim.with("mem-sim-1", |d| d.refused.insert("temperature".into()));
    let (_, err) = errors.next_matching(|_, _| true);
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("temperature") && message.contains("illegal data address"),
        "{err}"
    );
    assert_eq!(err["topic"], "dt/sim-1/reported");

    sim.with("mem-sim-1", |d| {
        d.values.insert("humidity".into(), json!(55))
    });
    node.twin_until("sim-1", |t| t["reported"]["humidity"] == 55.0);
    assert_eq!(status(&node, "sim-1").as_deref(), Some("online"));
    // The refusal stays visible in the twin, not only in the one error message.
    let t = node.twin_until("sim-1", |t| {
        t["status"]["errors"]["temperature"].is_object()
    });
    let e = &t["status"]["errors"]["temperature"];
    assert_eq!(
        (e["code"].as_str(), e["op"].as_str()),
        (Some("device_refused"), Some("read")),
        "{t}"
    );
    assert!(e["since"].is_i64(), "{t}");
    // It reads again: the error goes, and the value is reported at once (even though
    // report-on-change would not report the unchanged 20.0).
    sim.with("mem-sim-1", |d| d.refused.remove("temperature"));
    let t = node.twin_until("sim-1", |t| t["status"].get("errors").is_none());
    assert_eq!(t["reported"]["temperature"], json!(20.0), "{t}");
}

#[test]
fn runtime_a_write_the_device_does_not_hold_stops_after_the_budget_with_a_lasting_error() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    // The device takes any setpoint but holds at most 30.
    sim.with("mem-sim-1", |d| d.clamp.insert("setpoint".into(), 30.0));
    let mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });
    node.pub_("dt/sim-1/desired", r#"{"setpoint": 33}"#);
    let t = node.twin_until("sim-1", |t| t["status"]["errors"]["setpoint"].is_object());
    let e = &t["status"]["errors"]["setpoint"];
    assert_eq!(e["code"], "write_not_held", "{t}");
    assert_eq!(e["op"], "write", "{t}");
    assert_eq!(e["value"], json!(33.0), "{t}");
    assert_eq!(t["reported"]["setpoint"], json!(30.0), "{t}");
    let writes = || sim.with("mem-sim-1", |d| d.writes.len());
    assert_eq!(writes(), 3, "written exactly the budget's 3 times");
    // No more writes: not by the running mapper, nor by a restarted one (the node leaves the
    // property out of the delta it sends a mapper that comes back).
    drop(mapper);
    let _again = InProcess::start(&node, MemoryDriver { sim: sim.clone() });
    let reads = sim.with("mem-sim-1", |d| d.reads);
    eventually("the restarted mapper polls", || {
        sim.with("mem-sim-1", |d| d.reads) > reads + 10
    });
    assert_eq!(writes(), 3, "the device was written again");
    assert!(node.twin("sim-1")["status"]["errors"]["setpoint"].is_object());
    // A new desired value is tried, and met, which clears the error.
    node.pub_("dt/sim-1/desired", r#"{"setpoint": 25}"#);
    let t = node.twin_until("sim-1", |t| t["reported"]["setpoint"] == json!(25.0));
    assert_eq!(writes(), 4);
    assert!(t["status"].get("errors").is_none(), "{t}");
}

#[test]
fn runtime_a_kept_value_is_reported_once_with_the_time_the_device_sent_it() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let sent_at = edgetwin_contract::now_ms() - 5_000;
    // humidity is a value the driver keeps from the device's last push, 5 s ago.
    sim.with("mem-sim-1", |d| {
        d.kept_since.insert("humidity".into(), sent_at)
    });
    let reported = Watch::new(node.port, "dt/sim-1/reported");
    let _mapper = InProcess::start(&node, driver);
    let (_, first) = reported.next_matching(|_, v| v.get("humidity").is_some());
    assert_eq!(
        first["ts"],
        json!(sent_at),
        "stamped when the device sent it: {first}"
    );
    // Polled every 200 ms, yet not reported again: nothing new came from the device.
    let reads = sim.with("mem-sim-1", |d| d.reads);
    eventually("ten more polls", || {
        sim.with("mem-sim-1", |d| d.reads) > reads + 10
    });
    let again: Vec<_> = reported
        .drain()
        .into_iter()
        .filter(|(_, v)| v.get("humidity").is_some())
        .collect();
    assert!(
        again.is_empty(),
        "a kept value was reported again: {again:?}"
    );
    let t = node.twin("sim-1");
    assert_eq!(
        t["metadata"]["reported"]["humidity"]["ts"],
        json!(sent_at),
        "{t}"
    );
    // The device pushes again: reported once more, with the new time.
    sim.with("mem-sim-1", |d| {
        d.values.insert("humidity".into(), json!(47));
        d.kept_since.insert("humidity".into(), sent_at + 4_000);
    });
    let (_, next) = reported.next_matching(|_, v| v.get("humidity").is_some());
    assert_eq!(
        (next["humidity"].clone(), next["ts"].clone()),
        (json!(47), json!(sent_at + 4_000))
    );
}

#[test]
fn runtime_a_device_whose_values_stop_coming_is_stale_and_online_again_at_the_next() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    node.twin_until("sim-1", |t| t["status"]["state"] == "online");
    // Every value becomes one the device sent long ago and nothing new arrives: the mapper
    // still runs and says `online`, but no reading reaches the twin.
    let long_ago = edgetwin_contract::now_ms() - 60_000;
    sim.with("mem-sim-1", |d| {
        for p in ["temperature", "humidity", "setpoint"] {
            d.kept_since.insert(p.into(), long_ago);
        }
    });
    // The profile reads every 200 ms: stale after 2 × 200 ms + 1 s, seen by the node's
    // once-a-second sweep.
    let t = node.twin_until("sim-1", |t| t["status"]["state"] == "stale");
    assert!(
        t["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no reading"),
        "{t}"
    );
    assert_eq!(
        status(&node, "sim-1").as_deref(),
        Some("online"),
        "the mapper's own view stays"
    );
    let m = node.metrics();
    assert!(m.contains(r#"edgetwin_devices{status="stale"} 1"#), "{m}");
    // A fresh reading brings it back.
    sim.with("mem-sim-1", |d| d.kept_since.remove("humidity"));
    node.twin_until("sim-1", |t| t["status"]["state"] == "online");
}

#[test]
fn runtime_deadband_suppresses_changes_smaller_than_it() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    node.twin_until("sim-1", |t| t["reported"]["temperature"] == 20.0);

    sim.with("mem-sim-1", |d| {
        d.values.insert("temperature".into(), json!(20.4))
    });
    let reads = sim.with("mem-sim-1", |d| d.reads);
    eventually("three more polls", || {
        sim.with("mem-sim-1", |d| d.reads) >= reads + 3
    });
    // humidity is reported on every poll, so the twin has seen those polls too.
    assert_eq!(node.twin("sim-1")["reported"]["temperature"], 20.0);

    sim.with("mem-sim-1", |d| {
        d.values.insert("temperature".into(), json!(20.6))
    });
    node.twin_until("sim-1", |t| t["reported"]["temperature"] == 20.6);
}

#[test]
fn runtime_publishes_telemetry_for_properties_that_ask_for_it() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let telemetry = Watch::new(node.port, "dt/sim-1/telemetry");
    let _mapper = InProcess::start(&node, MemoryDriver::default());
    let (_, msg) = telemetry.next_matching(|_, _| true);
    assert_eq!(msg["values"], json!({"temperature": 20.0}), "{msg}");
    assert!(msg["ts"].as_i64().unwrap() > 0);
}

#[test]
fn runtime_desired_write_is_reported_back_without_reconnecting_the_device() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    node.pub_("dt/sim-1/desired", r#"{"setpoint": 25}"#);
    node.twin_until("sim-1", |t| {
        t["desired"]["setpoint"] == 25.0 && t["reported"]["setpoint"] == 25.0
    });
    assert_eq!(
        sim.with("mem-sim-1", |d| d.values["setpoint"].clone()),
        25.0
    );
    assert_eq!(sim.with("mem-sim-1", |d| d.connects), 1);
}

#[test]
fn runtime_refused_write_is_reported_on_the_error_topic_and_counted() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });
    // Reads of setpoint are refused too; only the write is checked here.
    sim.with("mem-sim-1", |d| d.refused.insert("setpoint".into()));

    let errors = Watch::new(node.port, "dt/sim-1/error");
    node.pub_("dt/sim-1/desired", r#"{"setpoint": 30}"#);
    let (_, err) = errors.next_matching(|_, v| v["topic"] == "dt/sim-1/delta");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("setpoint") && message.contains("illegal data value"),
        "{err}"
    );

    let metrics = Watch::new(node.port, "mappers/serial/metrics");
    let (_, m) = metrics.next_matching(|_, v| v["devices"]["sim-1"]["write_errors"] == 1);
    let c = &m["devices"]["sim-1"];
    assert_eq!(c["writes"], 1, "{m}");
    assert!(c["reads"].as_u64().unwrap() > 0, "{m}");
    assert!(c["requests"].as_u64().unwrap() > 0, "{m}");
    assert!(c["read_latency"]["count"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn runtime_ignores_deltas_not_newer_than_the_last_applied_one() {
    let node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    let delta = |version: u64, v: f64| {
        json!({"device": "sim-1", "version": version, "delta": {"setpoint": v}, "ts": 1})
            .to_string()
    };
    node.pub_("dt/sim-1/delta", &delta(1000, 10.0));
    eventually("first write", || {
        sim.with("mem-sim-1", |d| d.values["setpoint"] == 10.0)
    });
    node.pub_("dt/sim-1/delta", &delta(999, 11.0));
    node.pub_("dt/sim-1/delta", &delta(1000, 12.0));
    node.pub_("dt/sim-1/delta", &delta(1001, 13.0));
    eventually("newer write", || {
        sim.with("mem-sim-1", |d| d.values["setpoint"] == 13.0)
    });
    assert_eq!(
        sim.with("mem-sim-1", |d| d.writes.clone()),
        vec![json!(10.0), json!(13.0)]
    );
}

#[test]
fn runtime_reconnects_to_a_restarted_node_and_announces_itself_again() {
    let mut node = Node::start_with_profile(&profile(&["sim-1"]));
    let driver = MemoryDriver::default();
    let sim = driver.sim.clone();
    let _mapper = InProcess::start(&node, driver);
    eventually("online", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });

    node.stop();
    node.restart();
    // The restarted broker lost every retained message; the mapper publishes them again.
    node.retained_until(
        "mappers/serial/status",
        std::time::Duration::from_secs(30),
        |v| v.is_some_and(|v| v["state"] == "online"),
    );
    eventually("device status republished", || {
        status(&node, "sim-1").as_deref() == Some("online")
    });
    sim.with("mem-sim-1", |d| {
        d.values.insert("humidity".into(), json!(77))
    });
    node.twin_until("sim-1", |t| t["reported"]["humidity"] == 77.0);
    assert_eq!(
        sim.with("mem-sim-1", |d| d.connects),
        1,
        "the redelivered, unchanged assignment does not reconnect the device"
    );
}
