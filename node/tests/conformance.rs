//! Standard MQTT through the node's front door, as a third-party paho-mqtt client sees it
//! (`testkit/clients/conformance.py`; each scenario runs unchanged against Mosquitto, which is
//! how the scenarios themselves were checked). The behaviours rumqttd alone gets wrong and the
//! front door answers for: delivery QoS, No Local, the retain flags and Retain Handling,
//! properties passed on, MQTT 5 session and message expiry, 3.1.1 persistent sessions, kept
//! sessions across a restart of the node.
#![allow(clippy::unwrap_used)]

use edgetwin_testkit::*;
use serde_json::{json, Value};

#[test]
fn mqtt_a_delivery_goes_at_the_lower_of_publish_and_subscription_qos_in_either_version() {
    let node = Node::start(&[]);
    let got = node.scenario("delivery_qos", &[]);
    let each = json!([[0, 0], [1, 1], [2, 2]]);
    assert_eq!(
        got,
        json!({"sub5-pub5": each, "sub4-pub4": each, "sub5-pub4": each, "sub4-pub5": each})
    );
}

#[test]
fn mqtt_lower_qos_deliveries_to_a_qos2_subscriber_never_stall_the_broker() {
    let node = Node::start(&[]);
    let got = node.scenario("downgraded_flows_complete", &[]);
    assert_eq!(got, json!({"sent": 300, "received": 300, "qos": [0, 1]}));
}

#[test]
fn mqtt_no_local_keeps_a_clients_own_publishes_from_it() {
    let node = Node::start(&[]);
    assert_eq!(node.scenario("no_local", &[]), json!({"a": 0, "b": 1}));
}

#[test]
fn mqtt_retain_as_published_and_retain_handling_are_honoured() {
    let node = Node::start(&[]);
    assert_eq!(
        node.scenario("retain_flags", &[]),
        json!({"flags": [["norap", "kept", false], ["rap", "kept", true], ["rap", "live", false]]})
    );
    assert_eq!(
        node.scenario("retain_handling", &[]),
        json!({"rh2": 0, "rh1_new": 1, "rh1_again": 0, "rh0_again": [["kept", true, 1]]})
    );
}

#[test]
fn mqtt_publish_properties_reach_the_subscriber_and_the_internal_marker_never_does() {
    let node = Node::start(&[]);
    // A client's own `$edgetwin` user property is dropped (it could pose as another
    // connection); everything else the publisher set arrives.
    assert_eq!(
        node.scenario("properties_pass_through", &[]),
        json!({"user": [["a", "2"]], "format": 1, "content_type": "text/plain",
               "response_topic": "reply", "correlation": [1, 2], "qos": 1})
    );
}

#[test]
fn mqtt5_a_session_lasts_its_expiry_interval_and_not_longer() {
    let node = Node::start(&[]);
    assert_eq!(
        node.scenario("session_expiry", &[]),
        json!({"first": false, "resumed": true, "queued": ["while away"], "after_expiry": false,
               "after_expiry_msgs": 0, "after_disconnect_0": false, "clean_start_present": false})
    );
}

#[test]
fn mqtt5_a_queued_message_past_its_expiry_is_dropped_and_the_rest_count_down() {
    let node = Node::start(&[]);
    let got = node.scenario("message_expiry", &[]);
    let got = got["got"].as_array().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0][0], "long");
    let left = got[0][1].as_u64().unwrap();
    assert!((1..30).contains(&left), "expiry left {left}");
}

#[test]
fn mqtt311_a_persistent_session_keeps_subscriptions_and_queued_messages_until_a_clean_session() {
    let node = Node::start(&[]);
    assert_eq!(
        node.scenario("v4_persistent_session", &[]),
        json!({"present": true, "queued": ["queued"], "present_after_clean": false})
    );
}

/// `persist_setup`, a restart of `node` (SIGTERM), then what `persist_check` saw (topics under
/// `prefix`).
fn sessions_after_a_restart(mut node: Node, prefix: &str) -> Value {
    let prefix = ["--prefix", prefix];
    node.scenario("persist_setup", &prefix);
    node.stop();
    node.restart();
    node.scenario("persist_check", &prefix)
}

#[test]
fn mqtt_kept_sessions_and_their_subscription_options_survive_a_restart_of_the_node() {
    // Published after the restart, before the clients come back: queued for their sessions.
    assert_eq!(
        sessions_after_a_restart(Node::start(&[]), "restart/"),
        json!({"v4_present": true, "v4_msgs": ["before restart keep4", "after restart keep4"],
               "v5_present": true, "v5_msgs": ["before restart keep5", "after restart keep5"],
               "v5_qos": [1, 1], "v5_own": 0, "short_present": false})
    );
}

#[test]
fn mqtt_messages_queued_for_a_kept_session_survive_kill9_in_order_and_once() {
    let mut node = Node::start(&[]);
    let args = ["--prefix", "killq/", "--arg", "n=100"];
    node.scenario("queue_setup", &args);
    // Acknowledged to the publisher by then; on disk once the gate's count says so (the broker
    // hands them to the session's keeper within milliseconds).
    assert!(
        wait_for(std::time::Duration::from_secs(20), || (node.queued_total()
            >= 200)
            .then_some(()))
        .is_some(),
        "queued: {}\n{}",
        node.queued_total(),
        node.log()
    );
    node.kill9();
    node.restart();
    assert_eq!(
        node.scenario("queue_check", &args),
        json!({"cf-q4": got_all(100, 0), "cf-q5": got_all(100, 0)})
    );
}

/// A node with one more `gate.limits` entry, after `queue_setup` (with `args`) sent messages of
/// each QoS to its two away sessions and its metrics met `until`.
fn away_sessions_with_limit(
    limit: &str,
    args: &[&str],
    until: impl Fn(&str) -> bool,
) -> (Node, String) {
    let node = NodeSpec {
        extra_yaml: format!("gate:\n  limits:\n    {limit}\n"),
        ..NodeSpec::default()
    }
    .start();
    node.scenario("queue_setup", args);
    let m = node.metrics_until(std::time::Duration::from_secs(20), until);
    (node, m)
}

/// What `queue_check` says of a session that got all `count` messages of QoS 1 and 2, each
/// once and in order, and `qos0` QoS 0 ones.
fn got_all(count: usize, qos0: usize) -> Value {
    json!({"present": true, "count": count, "once": true, "in_order": true,
           "qos": [1, 2], "qos0": qos0})
}

#[test]
fn mqtt_away_sessions_past_max_held_sessions_are_queued_by_the_broker_in_memory_and_counted() {
    let args = ["--prefix", "heldq/", "--arg", "n=5"];
    let (node, m) = away_sessions_with_limit("max_held_sessions: 1", &args, |m| {
        m.contains("edgetwin_gate_queued_total 5")
    });
    assert!(m.contains("edgetwin_gate_sessions_not_held_total 1"), "{m}");
    // Without a restart both get everything: the second from the broker's memory (which
    // queues QoS 0 as well).
    assert_eq!(
        node.scenario("queue_check", &args),
        json!({"cf-q4": got_all(5, 0), "cf-q5": got_all(5, 5)})
    );
}

#[test]
fn mqtt_an_away_session_past_max_held_sessions_keeps_its_subscriptions_across_a_restart() {
    let node = NodeSpec {
        extra_yaml: "gate:\n  limits:\n    max_held_sessions: 1\n".into(),
        ..NodeSpec::default()
    }
    .start();
    // keep4 went away first and is held; keep5 is not: what was queued for it before the
    // restart was in the broker's memory only, but its subscription came back.
    assert_eq!(
        sessions_after_a_restart(node, "capped/"),
        json!({"v4_present": true, "v4_msgs": ["before restart keep4", "after restart keep4"],
               "v5_present": true, "v5_msgs": ["after restart keep5"],
               "v5_qos": [1], "v5_own": 0, "short_present": false})
    );
}

#[test]
fn mqtt_a_kept_sessions_queue_is_bounded_and_what_it_drops_is_counted() {
    let args = ["--prefix", "fullq/", "--arg", "n=30"];
    let (node, m) = away_sessions_with_limit("max_queued_messages: 10", &args, |m| {
        m.contains("edgetwin_gate_queue_dropped_total 40")
    });
    assert!(m.contains("edgetwin_gate_queued_total 20"), "{m}");
    let got = node.scenario("queue_check", &args);
    for c in ["cf-q4", "cf-q5"] {
        assert_eq!(got[c]["count"], 10, "{got}");
    }
}

#[test]
fn mqtt_a_qos1_wildcard_subscription_made_while_its_filter_is_busy_is_served_at_once() {
    // The front door fetches the filter's retained messages first; that once waited for the
    // filter to fall quiet, and the subscriber with it.
    let node = Node::start(&[]);
    assert_eq!(
        node.scenario("busy_subscribe", &[]),
        json!({"served_while_busy": true})
    );
}

#[test]
fn mqtt_a_qos1_wildcard_subscription_gets_every_retained_message_not_only_the_first_hundred() {
    let node = Node::start(&[]);
    // rumqttd alone sends a QoS 1/2 subscription at most its in-flight window (100).
    assert_eq!(
        node.scenario("many_retained", &[]),
        json!({"got": 150, "copies": 150, "retain": [true], "qos": [1]})
    );
}
