//! The short local history (docs/history.md): reported readings of the real binary, asked for
//! over HTTP and over MQTT (mosquitto_rr, MQTT 5 response topic), across a clean restart and a
//! `kill -9`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgetwin_testkit::*;
use serde_json::Value;

/// One-second points, written every second, so a test sees them on disk at once.
const FAST: &str = "history: {resolution_s: 1, flush_interval_s: 1, retention_s: 3600}\n";

fn history(node: &Node, device: &str, query: &str) -> (u16, Value) {
    let (code, body) = node
        .http_get(&format!("/api/devices/{device}/history?{query}"))
        .unwrap();
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    (code, v)
}

/// Readings counted over all points of the answer.
fn readings(v: &Value) -> u64 {
    v["points"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["count"].as_u64().unwrap()).sum())
        .unwrap_or(0)
}

fn history_until(node: &Node, device: &str, query: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, v) = history(node, device, query);
        if code == 200 && pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "history never matched: {code} {v}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `edgetwin_history_points_written_total` in a metrics text.
fn written(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgetwin_history_points_written_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn history_keeps_readings_as_points_and_answers_over_http_and_mqtt() {
    let mut node = Node::start_with_config(&["h-1"], FAST);
    // Three readings in one second's bucket (their own `ts`), one in the next.
    let t0 = (edgetwin_contract::now_ms() / 1000 - 5) * 1000;
    for (dt, v) in [(100, 20.0), (400, 18.0), (900, 22.5), (1500, 30.0)] {
        node.pub_(
            "dt/h-1/reported",
            &format!(r#"{{"temperature": {v}, "ts": {}}}"#, t0 + dt),
        );
    }
    // A string is not a number: no series for it.
    node.pub_("dt/h-1/reported", r#"{"mode": "eco"}"#);
    let v = history_until(&node, "h-1", "prop=temperature", |v| readings(v) == 4);
    assert_eq!(v["device"], "h-1");
    assert_eq!(v["resolutionMs"], 1000);
    let p = &v["points"][0];
    assert_eq!(p["t"], t0);
    assert_eq!(
        (p["min"].as_f64(), p["max"].as_f64()),
        (Some(18.0), Some(22.5))
    );
    assert_eq!(
        (p["last"].as_f64(), p["count"].as_u64()),
        (Some(22.5), Some(3))
    );
    assert!((p["avg"].as_f64().unwrap() - 20.1667).abs() < 1e-3);
    assert_eq!(v["points"][1]["t"], t0 + 1000);
    // `since` leaves out buckets that ended before it.
    let (_, later) = history(
        &node,
        "h-1",
        &format!("prop=temperature&since={}", t0 + 1000),
    );
    assert_eq!(readings(&later), 1);

    // Over MQTT 5: the answer goes to the response topic.
    let r = mosquitto_rr(
        node.port_v5,
        "dt/h-1/history/get",
        "rr/h-1/history",
        r#"{"id":"q1","property":"temperature","limit":1}"#,
    );
    assert_eq!(r["id"], "q1");
    assert_eq!(
        r["points"].as_array().unwrap().len(),
        1,
        "limit keeps the newest"
    );
    assert_eq!(r["points"][0]["last"], 30.0);

    // Asking for what is not there: HTTP 404, and an error on the result topic.
    let (code, e) = history(&node, "h-1", "prop=nope");
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    let (code, _) = history(&node, "ghost", "prop=temperature");
    assert_eq!(code, 404);
    let (code, e) = history(&node, "h-1", "since=5");
    assert_eq!(code, 400, "{e}");
    let msgs = node.probe(
        &["dt/h-1/history/result"],
        &[("dt/h-1/history/get", r#"{"property":"nope","id":"q2"}"#)],
        1,
    );
    let err = payload(on(&msgs, "dt/h-1/history/result"));
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("unknown_property"), Some("q2"))
    );

    // A clean stop writes what is pending; the points are there after the restart.
    node.restart();
    let v = history_until(&node, "h-1", "prop=temperature", |v| readings(v) == 4);
    assert_eq!(v["points"][0]["count"], 3);
}

#[test]
fn history_written_before_a_kill_9_survives_it_and_its_bucket_continues() {
    let mut node = Node::start_with_config(&["h-2"], FAST);
    let t0 = (edgetwin_contract::now_ms() / 1000 - 5) * 1000;
    node.pub_(
        "dt/h-2/reported",
        &format!(r#"{{"temperature": 1.0, "ts": {}}}"#, t0 + 10),
    );
    node.metrics_until(Duration::from_secs(10), |m| written(m) >= 1.0);
    node.kill9();
    node.spawn();
    // A later reading of the same bucket after the restart joins the stored point.
    node.pub_(
        "dt/h-2/reported",
        &format!(r#"{{"temperature": 3.0, "ts": {}}}"#, t0 + 20),
    );
    let v = history_until(&node, "h-2", "prop=temperature", |v| readings(v) == 2);
    let p = &v["points"][0];
    assert_eq!(
        (p["count"].as_u64(), p["min"].as_f64(), p["max"].as_f64()),
        (Some(2), Some(1.0), Some(3.0))
    );
}

#[test]
fn history_disabled_answers_why() {
    let node = Node::start_with_config(&["h-3"], "history: {enabled: false}\n");
    node.pub_("dt/h-3/reported", r#"{"temperature": 1.0}"#);
    node.twin_until("h-3", |t| t["reported"]["temperature"] == 1.0);
    let (code, e) = history(&node, "h-3", "prop=temperature");
    assert_eq!(code, 503);
    assert!(
        e["error"].as_str().unwrap().contains("history.enabled"),
        "{e}"
    );
    assert!(
        !node.data_dir().join("history.redb").exists(),
        "no file when switched off"
    );
}
