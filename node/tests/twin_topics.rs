//! The twin topic contract (docs/contract.md §2-3) driven by third-party clients against the real
//! binary.
#![allow(clippy::unwrap_used)]

use edgetwin_testkit::*;
use serde_json::json;

#[test]
fn twin_desired_patch_produces_delta_and_retained_twin() {
    let node = Node::start(&["t-1"]);
    let msgs = node.probe(
        &["dt/t-1/delta"],
        &[("dt/t-1/desired", r#"{"setpoint": 21.5, "mode": "eco"}"#)],
        1,
    );
    let delta = payload(on(&msgs, "dt/t-1/delta"));
    assert_eq!(delta["device"], "t-1");
    assert_eq!(
        delta["delta"],
        json!({"setpoint": 21.5, "mode": "eco", "fan": 2})
    );
    let twin = node.twin("t-1");
    assert_eq!(
        twin["desired"],
        json!({"setpoint": 21.5, "mode": "eco", "fan": 2})
    );
    assert_eq!(twin["metadata"]["desired"]["setpoint"]["source"], "local");
    assert_eq!(twin["version"], delta["version"]);
}

#[test]
fn twin_reported_patch_updates_twin_and_shrinks_delta() {
    let node = Node::start(&["t-2"]);
    node.pub_("dt/t-2/desired", r#"{"setpoint": 20, "mode": "eco"}"#);
    node.twin_until("t-2", |t| t["desired"]["mode"] == "eco");
    let msgs = node.probe(
        &["dt/t-2/delta"],
        &[(
            "dt/t-2/reported",
            r#"{"setpoint": 20, "temperature": 19.25}"#,
        )],
        1,
    );
    let delta = payload(on(&msgs, "dt/t-2/delta"));
    assert_eq!(
        delta["delta"],
        json!({"mode": "eco", "fan": 2}),
        "only unmatched properties are left"
    );
    let twin = node.twin_until("t-2", |t| t["reported"]["temperature"] == 19.25);
    assert_eq!(
        twin["reported"],
        json!({"setpoint": 20.0, "temperature": 19.25})
    );
    assert_eq!(
        twin["metadata"]["reported"]["temperature"]["source"],
        "mapper:modbus"
    );
    assert!(twin["status"]["lastSeen"].is_i64());
}

#[test]
fn twin_reported_match_clears_delta_and_repeat_is_not_a_change() {
    let node = Node::start(&["t-3"]);
    node.pub_("dt/t-3/desired", r#"{"relay": true}"#);
    node.twin_until("t-3", |t| t["desired"]["relay"] == true);
    node.pub_("dt/t-3/reported", r#"{"relay": true}"#);
    let t1 = node.twin_until("t-3", |t| t["reported"]["relay"] == true);
    // Repeating the same reading: no new version, no republish.
    let msgs = node.probe(
        &["dt/t-3/twin", "dt/t-3/delta"],
        &[("dt/t-3/reported", r#"{"relay": true}"#)],
        1,
    );
    assert_eq!(msgs.len(), 1, "only the retained twin arrives: {msgs:?}");
    assert_eq!(msgs[0]["retain"], true);
    let t2 = node.twin("t-3");
    assert_eq!(t1["version"], t2["version"]);
    assert!(node
        .metrics()
        .contains("edgetwin_twin_updates_unchanged_total{side=\"reported\",source=\"mapper\"} 1"));
}

#[test]
fn twin_get_answers_on_get_result_with_request_id() {
    let node = Node::start(&["t-4"]);
    node.pub_("dt/t-4/desired", r#"{"setpoint": 22}"#);
    node.twin_until("t-4", |t| t["desired"]["setpoint"] == 22.0);
    let msgs = node.probe(
        &["dt/t-4/get/result"],
        &[("dt/t-4/get", r#"{"id": "req-1"}"#)],
        1,
    );
    let r = payload(on(&msgs, "dt/t-4/get/result"));
    assert_eq!(r["id"], "req-1");
    assert_eq!(r["twin"]["desired"]["setpoint"], 22.0);
}

#[test]
fn twin_desired_patch_with_an_id_is_answered_applied_unchanged_or_rejected() {
    let node = Node::start(&["t-5"]);
    let msgs = node.probe(
        &["dt/t-5/desired/result"],
        &[
            ("dt/t-5/desired", r#"{"$id": "a", "setpoint": 21}"#),
            // The same value in another JSON form: nothing to change, answered at once.
            ("dt/t-5/desired", r#"{"$id": "b", "setpoint": 21.0}"#),
            ("dt/t-5/desired", r#"{"$id": "c", "setpoint": 99}"#),
        ],
        3,
    );
    let answers: Vec<serde_json::Value> = msgs.iter().map(payload).collect();
    let by_id = |id: &str| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer to {id}: {answers:?}"))
            .clone()
    };
    let a = by_id("a");
    assert_eq!(a["result"], "applied", "{a}");
    let b = by_id("b");
    assert_eq!(b["result"], "unchanged", "{b}");
    assert_eq!(b["version"], a["version"], "{b}");
    let c = by_id("c");
    assert_eq!(
        (c["result"].as_str(), c["code"].as_str()),
        (Some("rejected"), Some("out_of_range")),
        "{c}"
    );
    assert!(c["message"].as_str().unwrap().contains("setpoint"), "{c}");
    assert_eq!(node.twin("t-5")["desired"]["setpoint"], json!(21.0));
}

#[test]
fn twin_get_honours_mqtt5_response_topic_and_correlation_data() {
    let node = Node::start(&["t-5"]);
    let msgs = probe(
        node.port_v5,
        true,
        &["app/replies/42"],
        &[("dt/t-5/get", r#"{"id": "r5"}"#)],
        1,
        &[
            "--response-topic",
            "app/replies/42",
            "--correlation",
            "corr-abc",
        ],
    );
    let m = on(&msgs, "app/replies/42");
    assert_eq!(m["correlation"], "corr-abc");
    assert_eq!(payload(m)["twin"]["device"], "t-5");
}

#[test]
fn twin_get_works_with_mosquitto_rr() {
    let node = Node::start(&["t-6"]);
    let r = mosquitto_rr(node.port_v5, "dt/t-6/get", "rr/t-6", r#"{"id":"x"}"#);
    assert_eq!(r["twin"]["device"], "t-6");
}

/// Sends `patch` to `topic` and returns the error message; asserts the twin did not change.
fn rejected(node: &Node, device: &str, topic: &str, patch: &str) -> serde_json::Value {
    let before = node.twin(device);
    let msgs = node.probe(&[&format!("dt/{device}/error")], &[(topic, patch)], 1);
    let err = payload(&msgs[0]);
    assert_eq!(err["topic"], topic);
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    let after = node.twin(device);
    assert_eq!(before, after, "a rejected patch changed the twin");
    err
}

#[test]
fn twin_rejects_each_bad_patch_with_a_code_and_changes_nothing() {
    let node = Node::start(&["t-7"]);
    node.pub_("dt/t-7/desired", r#"{"setpoint": 20}"#);
    let t = node.twin_until("t-7", |t| t["desired"]["setpoint"] == 20.0);
    let dv = t["desiredVersion"].as_u64().unwrap();
    let cases = [
        ("dt/t-7/desired", "{not json", "malformed_json"),
        ("dt/t-7/desired", "[1,2]", "malformed_json"),
        ("dt/t-7/desired", r#"{"nosuch": 1}"#, "unknown_property"),
        ("dt/t-7/desired", r#"{"temperature": 20}"#, "read_only"),
        ("dt/t-7/desired", r#"{"setpoint": "warm"}"#, "wrong_type"),
        ("dt/t-7/desired", r#"{"relay": 1}"#, "wrong_type"),
        ("dt/t-7/desired", r#"{"setpoint": 36}"#, "out_of_range"),
        ("dt/t-7/desired", r#"{"setpoint": 4.9}"#, "out_of_range"),
        ("dt/t-7/reported", r#"{"temperature": "hot"}"#, "wrong_type"),
        ("dt/t-7/reported", r#"{"nosuch": 1}"#, "unknown_property"),
    ];
    for (topic, patch, code) in cases {
        let err = rejected(&node, "t-7", topic, patch);
        assert_eq!(err["code"], code, "{patch} on {topic}: {err}");
    }
    let stale = format!(r#"{{"$version": {}, "setpoint": 25}}"#, dv + 7);
    assert_eq!(
        rejected(&node, "t-7", "dt/t-7/desired", &stale)["code"],
        "version_conflict"
    );
    // The right $version is accepted.
    node.pub_(
        "dt/t-7/desired",
        &format!(r#"{{"$version": {dv}, "setpoint": 25}}"#),
    );
    node.twin_until("t-7", |t| t["desired"]["setpoint"] == 25.0);
    let metrics = node.metrics();
    assert!(
        metrics.contains("edgetwin_twin_updates_rejected_total{reason=\"version_conflict\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgetwin_twin_updates_rejected_total{reason=\"malformed_json\"} 2"),
        "{metrics}"
    );
}

#[test]
fn twin_rejects_patch_for_unknown_device() {
    let node = Node::start(&["t-8"]);
    let msgs = node.probe(
        &["dt/ghost/error"],
        &[("dt/ghost/desired", r#"{"setpoint": 20}"#)],
        1,
    );
    assert_eq!(payload(&msgs[0])["code"], "unknown_device");
    let msgs = node.probe(&["dt/ghost/error"], &[("dt/ghost/get", r#"{"id":"g"}"#)], 1);
    let e = payload(&msgs[0]);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("unknown_device"), Some("g"))
    );
}

#[test]
fn twin_survives_clean_restart_with_versions_intact() {
    let mut node = Node::start(&["t-9"]);
    node.pub_("dt/t-9/desired", r#"{"setpoint": 30, "mode": "heat"}"#);
    node.pub_("dt/t-9/reported", r#"{"temperature": 18.5}"#);
    let before = node.twin_until("t-9", |t| {
        t["reported"]["temperature"] == 18.5 && t["desired"]["mode"] == "heat"
    });
    assert!(
        node.stop().success(),
        "node did not exit cleanly:\n{}",
        node.log()
    );
    node.restart();
    let after = node.twin("t-9");
    assert_eq!(before["version"], after["version"]);
    assert_eq!(before["desired"], after["desired"]);
    assert_eq!(before["reported"], after["reported"]);
    assert_eq!(before["metadata"], after["metadata"]);
    // Versions go on increasing after the restart.
    node.pub_("dt/t-9/desired", r#"{"setpoint": 31}"#);
    let next = node.twin_until("t-9", |t| t["desired"]["setpoint"] == 31.0);
    assert!(next["version"].as_u64() > after["version"].as_u64());
}

#[test]
fn twin_desired_seen_in_retained_twin_survives_kill_9() {
    let mut node = Node::start(&["t-10"]);
    node.pub_("dt/t-10/desired", r#"{"setpoint": 12.5}"#);
    let seen = node.twin_until("t-10", |t| t["desired"]["setpoint"] == 12.5);
    node.kill9();
    node.restart();
    let after = node.twin("t-10");
    assert_eq!(after["desired"]["setpoint"], 12.5);
    assert_eq!(after["version"], seen["version"]);
}

#[test]
fn twin_delta_is_resent_when_a_mapper_comes_online() {
    let node = Node::start(&["t-11"]);
    node.pub_("dt/t-11/desired", r#"{"mode": "off"}"#);
    node.twin_until("t-11", |t| t["desired"]["mode"] == "off");
    let msgs = node.probe(
        &["dt/t-11/delta"],
        &[(
            "mappers/modbus/status",
            r#"{"state":"online","ts":1,"version":"test"}"#,
        )],
        1,
    );
    assert_eq!(payload(&msgs[0])["delta"], json!({"mode": "off", "fan": 2}));
}

#[test]
fn twin_model_default_seeds_desired_and_loses_to_any_write() {
    let node = Node::start(&["t-13"]);
    let t = node.twin("t-13");
    assert_eq!(t["desired"], json!({"fan": 2}));
    assert_eq!(t["metadata"]["desired"]["fan"]["ts"], 0);
    node.pub_("dt/t-13/desired", r#"{"fan": 3, "ts": 1}"#);
    node.twin_until("t-13", |t| t["desired"]["fan"] == 3.0);
}

#[test]
fn twin_status_from_mapper_appears_in_twin() {
    let node = Node::start(&["t-12"]);
    node.pub_(
        "dt/t-12/status",
        r#"{"state":"offline","ts":1700000000000,"message":"no answer"}"#,
    );
    let t = node.twin_until("t-12", |t| t["status"]["state"] == "offline");
    assert_eq!(t["status"]["message"], "no answer");
    assert!(node
        .metrics()
        .contains("edgetwin_devices{status=\"offline\"} 1"));
}
