//! Behaviour of the twin state machine, one test per rule, plus property tests.

use super::*;
use edgetwin_contract::ProtocolName;
use proptest::prelude::*;
use serde_json::json;

const MAX_PROPS: usize = 64;

fn model() -> ModelSpec {
    let p = |ty, access, minimum, maximum| PropertySpec {
        ty,
        access,
        minimum,
        maximum,
        per_entry: false,
    };
    ModelSpec {
        name: "thermostat".into(),
        properties: BTreeMap::from([
            (
                "setpoint".to_string(),
                p(
                    PropertyType::Float,
                    AccessMode::ReadWrite,
                    Some(5.0),
                    Some(35.0),
                ),
            ),
            (
                "relay".to_string(),
                p(PropertyType::Boolean, AccessMode::ReadWrite, None, None),
            ),
            (
                "voltage".to_string(),
                p(PropertyType::Float, AccessMode::ReadOnly, None, None),
            ),
            (
                "mode".to_string(),
                p(PropertyType::String, AccessMode::ReadWrite, None, None),
            ),
            (
                "count".to_string(),
                p(PropertyType::Int, AccessMode::ReadWrite, Some(0.0), None),
            ),
            (
                "cfg".to_string(),
                p(PropertyType::Object, AccessMode::ReadWrite, None, None),
            ),
        ]),
    }
}

fn twin() -> Twin {
    Twin::new(
        DeviceId::new("meter-7").expect("valid"),
        "thermostat".into(),
    )
}

fn patch(v: Value) -> Patch {
    Patch::parse(v.to_string().as_bytes(), MAX_PROPS).expect("valid patch")
}

fn mapper() -> Source {
    Source::Mapper(ProtocolName::new("modbus").expect("valid"))
}

fn desired(t: &mut Twin, v: Value, now: i64) -> Result<Applied, Rejection> {
    t.apply_desired(&model(), &patch(v), Source::Local, now)
}

fn reported(t: &mut Twin, v: Value, now: i64) -> Result<Applied, Rejection> {
    t.apply_reported(&model(), &patch(v), mapper(), now)
}

fn code(r: Result<Applied, Rejection>) -> ErrorCode {
    r.expect_err("patch should be rejected").code
}

// ---- Patch::parse ----

#[test]
fn patch_parse_rejects_non_json_as_malformed_json() {
    let e = Patch::parse(b"{not json", MAX_PROPS).expect_err("rejected");
    assert_eq!(e.code, ErrorCode::MalformedJson);
}

#[test]
fn patch_parse_rejects_non_object_as_malformed_json() {
    for p in ["[1]", "3", "\"x\"", "null"] {
        let e = Patch::parse(p.as_bytes(), MAX_PROPS).expect_err("rejected");
        assert_eq!(e.code, ErrorCode::MalformedJson, "{p}");
    }
}

#[test]
fn patch_parse_rejects_bad_version_as_invalid_patch() {
    for p in [
        r#"{"$version":-1,"a":1}"#,
        r#"{"$version":"3","a":1}"#,
        r#"{"$version":1.5,"a":1}"#,
    ] {
        let e = Patch::parse(p.as_bytes(), MAX_PROPS).expect_err("rejected");
        assert_eq!(e.code, ErrorCode::InvalidPatch, "{p}");
    }
}

#[test]
fn patch_parse_rejects_bad_ts_as_invalid_patch() {
    for p in [
        r#"{"ts":"now","a":1}"#,
        r#"{"ts":1.5,"a":1}"#,
        r#"{"ts":18446744073709551615,"a":1}"#,
    ] {
        let e = Patch::parse(p.as_bytes(), MAX_PROPS).expect_err("rejected");
        assert_eq!(e.code, ErrorCode::InvalidPatch, "{p}");
    }
}

#[test]
fn patch_parse_rejects_invalid_property_name_as_invalid_patch() {
    for p in [
        r#"{"a.b":1}"#,
        r#"{"$other":1}"#,
        r#"{"":1}"#,
        r#"{"a/b":1}"#,
    ] {
        let e = Patch::parse(p.as_bytes(), MAX_PROPS).expect_err("rejected");
        assert_eq!(e.code, ErrorCode::InvalidPatch, "{p}");
    }
}

#[test]
fn patch_parse_rejects_empty_patch_as_invalid_patch() {
    for p in ["{}", r#"{"$version":1}"#, r#"{"ts":5}"#] {
        let e = Patch::parse(p.as_bytes(), MAX_PROPS).expect_err("rejected");
        assert_eq!(e.code, ErrorCode::InvalidPatch, "{p}");
    }
}

#[test]
fn patch_parse_rejects_more_than_max_props_as_invalid_patch() {
    let e = Patch::parse(br#"{"a":1,"b":2,"c":3}"#, 2).expect_err("rejected");
    assert_eq!(e.code, ErrorCode::InvalidPatch);
    assert!(Patch::parse(br#"{"a":1,"b":2}"#, 2).is_ok());
}

#[test]
fn patch_parse_reads_version_ts_and_null_as_removal() {
    let p = Patch::parse(
        br#"{"$version":4,"ts":-7,"a":null,"b":{"y":1,"x":2}}"#,
        MAX_PROPS,
    )
    .expect("ok");
    assert_eq!(p.expected_version, Some(4));
    assert_eq!(p.ts, Some(-7));
    assert_eq!(p.props.len(), 2);
    let a = PropertyName::new("a").expect("valid");
    assert_eq!(p.props.get(&a), Some(&None));
}

#[test]
fn patch_parse_canonicalizes_object_key_order() {
    let p1 = Patch::parse(br#"{"cfg":{"b":1,"a":{"d":1,"c":2}}}"#, MAX_PROPS).expect("ok");
    let p2 = Patch::parse(br#"{"cfg":{"a":{"c":2,"d":1},"b":1}}"#, MAX_PROPS).expect("ok");
    let s = |p: &Patch| serde_json::to_string(&p.props.values().collect::<Vec<_>>()).expect("json");
    assert_eq!(s(&p1), s(&p2));
}

// ---- desired checks ----

#[test]
fn desired_patch_rejected_when_property_unknown() {
    let mut t = twin();
    let e = desired(&mut t, json!({"nope": 1}), 1).expect_err("rejected");
    assert_eq!(e.code, ErrorCode::UnknownProperty);
    assert!(e.message.contains("\"nope\""), "{}", e.message);
}

#[test]
fn desired_patch_rejected_when_read_only() {
    let mut t = twin();
    assert_eq!(
        code(desired(&mut t, json!({"voltage": 230.0}), 1)),
        ErrorCode::ReadOnly
    );
}

#[test]
fn desired_patch_rejected_when_removing_read_only() {
    let mut t = twin();
    assert_eq!(
        code(desired(&mut t, json!({"voltage": null}), 1)),
        ErrorCode::ReadOnly
    );
}

#[test]
fn desired_patch_rejected_when_wrong_type() {
    let mut t = twin();
    assert_eq!(
        code(desired(&mut t, json!({"relay": "on"}), 1)),
        ErrorCode::WrongType
    );
    assert_eq!(
        code(desired(&mut t, json!({"count": 1.5}), 1)),
        ErrorCode::WrongType
    );
    assert_eq!(
        code(desired(&mut t, json!({"cfg": [1]}), 1)),
        ErrorCode::WrongType
    );
}

#[test]
fn desired_patch_rejected_when_above_maximum_naming_property_and_bound() {
    let mut t = twin();
    let e = desired(&mut t, json!({"setpoint": 40}), 1).expect_err("rejected");
    assert_eq!(e.code, ErrorCode::OutOfRange);
    assert_eq!(e.message, "property \"setpoint\": 40 is above maximum 35");
}

#[test]
fn desired_patch_rejected_when_below_minimum() {
    let mut t = twin();
    let e = desired(&mut t, json!({"setpoint": 4.5}), 1).expect_err("rejected");
    assert_eq!(e.code, ErrorCode::OutOfRange);
    assert_eq!(e.message, "property \"setpoint\": 4.5 is below minimum 5");
    assert_eq!(
        code(desired(&mut t, json!({"count": -1}), 1)),
        ErrorCode::OutOfRange
    );
}

#[test]
fn desired_patch_accepts_bounds_inclusive() {
    let mut t = twin();
    desired(&mut t, json!({"setpoint": 5}), 1).expect("min accepted");
    desired(&mut t, json!({"setpoint": 35.0}), 2).expect("max accepted");
}

#[test]
fn desired_patch_rejected_when_version_conflicts() {
    let mut t = twin();
    desired(&mut t, json!({"setpoint": 20}), 1).expect("ok");
    assert_eq!(t.desired_version, 1);
    assert_eq!(
        code(desired(&mut t, json!({"$version": 0, "setpoint": 21}), 2)),
        ErrorCode::VersionConflict
    );
    desired(&mut t, json!({"$version": 1, "setpoint": 21}), 3).expect("matching version accepted");
    assert_eq!(t.desired_version, 2);
}

#[test]
fn desired_patch_reports_property_error_before_version_conflict() {
    let mut t = twin();
    assert_eq!(
        code(desired(&mut t, json!({"$version": 9, "nope": 1}), 1)),
        ErrorCode::UnknownProperty
    );
}

#[test]
fn desired_patch_rejected_whole_when_one_property_is_bad() {
    let mut t = twin();
    let before = t.clone();
    assert_eq!(
        code(desired(&mut t, json!({"relay": true, "setpoint": 99}), 1)),
        ErrorCode::OutOfRange
    );
    assert_eq!(t, before);
}

#[test]
fn desired_patch_sets_value_metadata_and_versions() {
    let mut t = twin();
    let a = desired(&mut t, json!({"setpoint": 21.5, "relay": true}), 1000).expect("ok");
    assert_eq!(a.changed, vec!["relay".to_string(), "setpoint".to_string()]);
    assert!(!a.refreshed);
    assert_eq!(t.version, 1, "one version per patch");
    assert_eq!(t.desired_version, 1);
    let e = &t.desired["setpoint"];
    assert_eq!(
        (e.value.clone(), e.version, e.ts, e.source.clone()),
        (Some(json!(21.5)), 1, 1000, Source::Local)
    );
    assert_eq!(
        t.status.last_seen, None,
        "desired patches do not touch lastSeen"
    );
}

#[test]
fn desired_patch_uses_writer_ts_when_given() {
    let mut t = twin();
    desired(&mut t, json!({"ts": 77, "mode": "eco"}), 1000).expect("ok");
    assert_eq!(t.desired["mode"].ts, 77);
}

#[test]
fn desired_patch_repeating_current_value_is_not_a_change() {
    let mut t = twin();
    desired(&mut t, json!({"mode": "eco"}), 1).expect("ok");
    let a = desired(&mut t, json!({"mode": "eco"}), 2).expect("ok");
    assert!(a.changed.is_empty());
    assert_eq!(a.touched, vec!["mode".to_string()]);
    assert_eq!(t.version, 1);
    assert_eq!(t.desired["mode"].ts, 2, "metadata advances silently");
    assert_eq!(t.desired["mode"].version, 1);
}

#[test]
fn desired_null_removes_property_as_tombstone() {
    let mut t = twin();
    desired(&mut t, json!({"mode": "eco"}), 1).expect("ok");
    let a = desired(&mut t, json!({"mode": null}), 2).expect("ok");
    assert_eq!(a.changed, vec!["mode".to_string()]);
    assert_eq!(t.version, 2);
    assert_eq!(t.desired["mode"].value, None);
    let doc = t.to_doc();
    assert!(!doc.desired.contains_key("mode"));
    assert!(!doc.metadata.desired.contains_key("mode"));
}

#[test]
fn desired_removal_of_absent_property_is_not_a_change_but_still_wins_later() {
    let mut t = twin();
    let a = desired(&mut t, json!({"ts": 50, "mode": null}), 1).expect("ok");
    assert!(a.changed.is_empty());
    assert_eq!(t.version, 0);
    // An older write arriving afterwards loses against the tombstone.
    let a = desired(&mut t, json!({"ts": 40, "mode": "eco"}), 2).expect("ok");
    assert!(a.changed.is_empty());
    assert_eq!(t.to_doc().desired.get("mode"), None);
}

// ---- last-writer-wins ----

#[test]
fn lww_older_write_loses_without_error() {
    let mut t = twin();
    desired(&mut t, json!({"ts": 100, "mode": "eco"}), 1).expect("ok");
    let a = desired(&mut t, json!({"ts": 99, "mode": "boost"}), 2).expect("accepted, but lost");
    assert!(a.changed.is_empty() && a.touched.is_empty());
    assert_eq!(t.desired["mode"].value, Some(json!("eco")));
    assert_eq!(t.version, 1);
}

#[test]
fn lww_tie_on_ts_broken_by_source_id() {
    let m = model();
    let mut t = twin();
    let p_cloud = patch(json!({"ts": 100, "mode": "cloudy"}));
    let p_local = patch(json!({"ts": 100, "mode": "locally"}));
    t.apply_desired(&m, &p_local, Source::Local, 1).expect("ok");
    t.apply_desired(&m, &p_cloud, Source::Cloud, 2).expect("ok");
    // "local" > "cloud", so the local write wins whatever the order.
    assert_eq!(t.desired["mode"].value, Some(json!("locally")));
    let mut u = twin();
    u.apply_desired(&m, &p_cloud, Source::Cloud, 1).expect("ok");
    u.apply_desired(&m, &p_local, Source::Local, 2).expect("ok");
    assert_eq!(u.desired["mode"].value, Some(json!("locally")));
}

#[test]
fn lww_tie_on_ts_and_source_broken_by_canonical_value() {
    let mut t = twin();
    desired(&mut t, json!({"ts": 100, "mode": "b"}), 1).expect("ok");
    desired(&mut t, json!({"ts": 100, "mode": "a"}), 2).expect("ok");
    assert_eq!(t.desired["mode"].value, Some(json!("b")));
}

#[test]
fn lww_duplicate_patch_is_ignored() {
    let mut t = twin();
    desired(&mut t, json!({"ts": 100, "mode": "eco"}), 1).expect("ok");
    let before = t.clone();
    let a = desired(&mut t, json!({"ts": 100, "mode": "eco"}), 2).expect("ok");
    assert_eq!(a, Applied::default());
    assert_eq!(t, before);
}

// ---- reported ----

#[test]
fn reported_patch_rejected_when_property_unknown() {
    let mut t = twin();
    assert_eq!(
        code(reported(&mut t, json!({"nope": 1}), 1)),
        ErrorCode::UnknownProperty
    );
}

#[test]
fn reported_patch_rejected_when_wrong_type() {
    let mut t = twin();
    assert_eq!(
        code(reported(&mut t, json!({"voltage": "230"}), 1)),
        ErrorCode::WrongType
    );
}

#[test]
fn reported_patch_rejected_when_it_carries_version() {
    let mut t = twin();
    assert_eq!(
        code(reported(&mut t, json!({"$version": 0, "voltage": 230}), 1)),
        ErrorCode::InvalidPatch
    );
}

#[test]
fn reported_patch_ignores_range_and_access_mode() {
    let mut t = twin();
    let a = reported(&mut t, json!({"voltage": 230.1, "setpoint": 99}), 5).expect("ok");
    assert_eq!(a.changed.len(), 2);
    assert_eq!(t.reported["voltage"].source, mapper());
}

#[test]
fn reported_patch_sets_last_seen() {
    let mut t = twin();
    let a = reported(&mut t, json!({"voltage": 230}), 5).expect("ok");
    assert!(a.refreshed);
    assert_eq!(t.status.last_seen, Some(5));
    assert_eq!(t.version, 1);
    assert_eq!(
        t.desired_version, 0,
        "reported changes leave desired_version alone"
    );
}

#[test]
fn reported_patch_repeating_current_value_refreshes_last_seen_without_version_bump() {
    let mut t = twin();
    reported(&mut t, json!({"voltage": 230}), 5).expect("ok");
    let a = reported(&mut t, json!({"voltage": 230}), 9).expect("ok");
    assert!(a.changed.is_empty());
    assert!(a.refreshed);
    assert_eq!(t.version, 1);
    assert_eq!(t.status.last_seen, Some(9));
    assert_eq!(t.reported["voltage"].ts, 9);
}

#[test]
fn last_seen_is_the_time_of_the_reading_not_of_its_arrival() {
    let mut t = twin();
    reported(&mut t, json!({"ts": 40, "voltage": 230}), 100).expect("ok");
    assert_eq!(t.status.last_seen, Some(40), "the reading's ts");
    // An older reading arriving late does not move it back.
    reported(&mut t, json!({"ts": 30, "voltage": 231}), 110).expect("ok");
    assert_eq!(t.status.last_seen, Some(40));
    // A reading stamped ahead of the node's clock counts as now.
    reported(&mut t, json!({"ts": 500, "voltage": 232}), 120).expect("ok");
    assert_eq!(t.status.last_seen, Some(120));
}

#[test]
fn an_errors_only_report_is_not_a_reading() {
    let mut t = twin();
    let a = reported(
        &mut t,
        json!({"$errors": {"voltage": {"code": "device_refused", "message": "exception 2", "op": "read"}}}),
        5,
    )
    .expect("ok");
    assert!(!a.refreshed);
    assert!(a.status_changed);
    assert_eq!(t.status.last_seen, None);
    assert_eq!(t.version, 0, "an error is not a value change");
}

#[test]
fn rejected_reported_patch_does_not_refresh_last_seen() {
    let mut t = twin();
    let _ = reported(&mut t, json!({"voltage": "x"}), 5);
    assert_eq!(t.status.last_seen, None);
}

// ---- status ----

#[test]
fn status_sets_state_and_reports_change_but_is_not_a_reading() {
    let mut t = twin();
    let online = DeviceStatusMsg {
        state: DeviceState::Online,
        ts: 10,
        message: None,
    };
    assert!(t.apply_status(&online));
    assert_eq!(t.status.state, DeviceState::Online);
    assert_eq!(t.status.ts, Some(10));
    assert_eq!(t.status.last_seen, None, "lastSeen is the last reading");
    assert!(
        !t.apply_status(&DeviceStatusMsg {
            ts: 20,
            ..online.clone()
        }),
        "same state is no change"
    );
    let err = DeviceStatusMsg {
        state: DeviceState::Online,
        ts: 30,
        message: Some("slave 3 timeout".into()),
    };
    assert!(t.apply_status(&err), "message change is a change");
    assert_eq!(t.version, 0, "status does not bump the version");
}

#[test]
fn status_older_than_current_is_ignored() {
    let mut t = twin();
    t.apply_status(&DeviceStatusMsg {
        state: DeviceState::Offline,
        ts: 50,
        message: None,
    });
    assert!(!t.apply_status(&DeviceStatusMsg {
        state: DeviceState::Online,
        ts: 40,
        message: None
    }));
    assert_eq!(t.status.state, DeviceState::Offline);
    assert_eq!(t.status.last_seen, None, "a status is not a reading");
}

#[test]
fn a_gone_mapper_marks_the_device_offline_keeps_last_seen_and_its_next_status_wins() {
    let mut t = twin();
    let online = |ts| DeviceStatusMsg {
        state: DeviceState::Online,
        ts,
        message: None,
    };
    assert!(t.apply_status(&online(10)));
    reported(&mut t, json!({"voltage": 230.0}), 50).expect("ok");
    assert!(t.mark_mapper_gone("mapper modbus is offline", 70));
    assert_eq!(t.status.state, DeviceState::Offline);
    assert_eq!(
        t.status.last_seen,
        Some(50),
        "nothing was heard from the device"
    );
    assert_eq!(
        t.status.message.as_deref(),
        Some("mapper modbus is offline")
    );
    assert!(
        !t.mark_mapper_gone("mapper modbus is offline", 80),
        "unchanged"
    );
    // The restarted mapper's status, stamped after the mark, replaces it.
    assert!(t.apply_status(&online(90)));
    assert_eq!(t.status.state, DeviceState::Online);
    assert_eq!(t.status.message, None);
}

// ---- delta and doc ----

#[test]
fn delta_lists_desired_values_reported_does_not_match() {
    let mut t = twin();
    desired(
        &mut t,
        json!({"setpoint": 21.5, "relay": true, "mode": "eco"}),
        1,
    )
    .expect("ok");
    reported(&mut t, json!({"setpoint": 20.0, "relay": true}), 2).expect("ok");
    let d = t.delta();
    assert_eq!(Value::Object(d), json!({"setpoint": 21.5, "mode": "eco"}));
}

#[test]
fn delta_is_empty_once_reported_matches_desired() {
    let mut t = twin();
    desired(
        &mut t,
        json!({"setpoint": 21.5, "cfg": {"a": 1, "b": 2}}),
        1,
    )
    .expect("ok");
    reported(
        &mut t,
        json!({"setpoint": 21.5, "cfg": {"b": 2, "a": 1}}),
        2,
    )
    .expect("ok");
    assert!(t.delta().is_empty());
}

#[test]
fn an_integer_desired_on_a_float_property_is_met_by_the_float_read_back() {
    let mut t = twin();
    desired(&mut t, json!({"setpoint": 30}), 1).expect("ok");
    reported(&mut t, json!({"setpoint": 30.0}), 2).expect("ok");
    assert!(t.delta().is_empty(), "{:?}", t.delta());
    reported(&mut t, json!({"setpoint": 30.5}), 3).expect("ok");
    assert_eq!(
        Value::Object(t.delta()),
        json!({"setpoint": 30.0}),
        "an integer desired on a float property is held as a float"
    );
}

#[test]
fn numbers_are_the_same_value_by_value_and_large_integers_exactly() {
    assert!(same_value(&json!(30), &json!(30.0)));
    assert!(same_value(&json!(-2), &json!(-2.0)));
    assert!(!same_value(&json!(30), &json!(30.5)));
    assert!(!same_value(
        &json!(9_007_199_254_740_993_i64),
        &json!(9_007_199_254_740_992_i64)
    ));
    assert!(same_value(&json!(u64::MAX), &json!(u64::MAX)));
    assert!(!same_value(&json!(1), &json!("1")));
    assert!(!same_value(&json!(1), &json!(true)));
    assert!(same_value(
        &json!({"a": 1, "b": 2}),
        &json!({"b": 2, "a": 1})
    ));
}

#[test]
fn delta_ignores_removed_desired_properties() {
    let mut t = twin();
    desired(&mut t, json!({"mode": "eco"}), 1).expect("ok");
    desired(&mut t, json!({"mode": null}), 2).expect("ok");
    assert!(t.delta().is_empty());
}

#[test]
fn to_doc_serializes_the_wire_shape() {
    let mut t = twin();
    desired(&mut t, json!({"ts": 5, "setpoint": 21.5}), 6).expect("ok");
    reported(&mut t, json!({"ts": 7, "voltage": 230}), 8).expect("ok");
    let doc = serde_json::to_value(t.to_doc()).expect("json");
    assert_eq!(
        doc,
        json!({
            "device": "meter-7", "model": "thermostat", "version": 2, "desiredVersion": 1,
            "desired": {"setpoint": 21.5}, "reported": {"voltage": 230.0},
            "metadata": {
                "desired": {"setpoint": {"version": 1, "ts": 5, "source": "local"}},
                "reported": {"voltage": {"version": 2, "ts": 7, "source": "mapper:modbus"}}
            },
            "status": {"state": "unknown", "lastSeen": 7}
        })
    );
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Op {
    Desired(Value, Source),
    Reported(Value, Source),
}

fn arb_source() -> impl Strategy<Value = Source> {
    prop_oneof![Just(Source::Local), Just(Source::Cloud), Just(mapper())]
}

/// A small value domain so that collisions, ties and repeats are frequent; includes values that
/// the model rejects (wrong type, out of range, unknown or read-only properties).
fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(false)),
        Just(json!(5)),
        Just(json!(20.5)),
        Just(json!(40)),
        Just(json!("eco")),
        Just(json!("boost")),
        Just(json!({"a": 1, "b": 2})),
        Just(json!({"a": 2})),
    ]
}

fn arb_prop() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("setpoint"),
        Just("relay"),
        Just("mode"),
        Just("cfg"),
        Just("count"),
        Just("voltage"),
        Just("nope"),
    ]
}

fn arb_patch_json(with_version: bool) -> impl Strategy<Value = Value> {
    (
        0i64..4,
        proptest::collection::btree_map(arb_prop(), arb_value(), 1..4),
        proptest::option::of(0u64..4),
    )
        .prop_map(move |(ts, props, ver)| {
            let mut m = Map::new();
            m.insert("ts".into(), json!(ts));
            if with_version {
                if let Some(v) = ver {
                    m.insert("$version".into(), json!(v));
                }
            }
            for (k, v) in props {
                m.insert(k.to_string(), v);
            }
            Value::Object(m)
        })
}

fn arb_op(with_version: bool) -> impl Strategy<Value = Op> {
    (any::<bool>(), arb_patch_json(with_version), arb_source()).prop_map(|(d, p, s)| {
        if d {
            Op::Desired(p, s)
        } else {
            Op::Reported(p, s)
        }
    })
}

fn run(t: &mut Twin, op: &Op, now: i64) -> Result<Applied, Rejection> {
    let m = model();
    match op {
        Op::Desired(p, s) => t.apply_desired(&m, &patch(p.clone()), s.clone(), now),
        Op::Reported(p, s) => {
            let mut p = patch(p.clone());
            p.expected_version = None;
            t.apply_reported(&m, &p, s.clone(), now)
        }
    }
}

/// Values and (ts, source) per property, tombstones included; versions are local and excluded.
fn lww_state(t: &Twin) -> Vec<(String, String, Option<Value>, i64, String)> {
    let side = |name: &str, es: &BTreeMap<String, Entry>| {
        es.iter()
            .map(|(k, e)| {
                (
                    name.to_string(),
                    k.clone(),
                    e.value.clone(),
                    e.ts,
                    e.source.id(),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut v = side("desired", &t.desired);
    v.extend(side("reported", &t.reported));
    v
}

proptest! {
    #[test]
    fn versions_never_decrease_over_any_sequence(ops in proptest::collection::vec(arb_op(true), 0..40)) {
        let mut t = twin();
        for (i, op) in ops.iter().enumerate() {
            let (v, dv) = (t.version, t.desired_version);
            let r = run(&mut t, op, i as i64);
            prop_assert!(t.version >= v && t.desired_version >= dv);
            if let Ok(a) = r {
                prop_assert_eq!(t.version, if a.is_change() { v + 1 } else { v });
            }
            prop_assert!(t.desired_version <= t.version);
            for e in t.desired.values().chain(t.reported.values()) {
                prop_assert!(e.version <= t.version);
            }
        }
    }

    #[test]
    fn any_order_and_duplication_of_patches_converges(
        ops in proptest::collection::vec(arb_op(false), 1..12),
        seed in any::<u64>(),
        dups in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
    ) {
        let mut reference = twin();
        for (i, op) in ops.iter().enumerate() {
            let _ = run(&mut reference, op, 1000 + i as i64);
        }
        // A shuffled copy with duplicates.
        let mut shuffled: Vec<Op> = ops.clone();
        for d in &dups {
            shuffled.push(d.get(&ops).clone());
        }
        let mut state = seed;
        for i in (1..shuffled.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        let mut other = twin();
        for (i, op) in shuffled.iter().enumerate() {
            let _ = run(&mut other, op, 5000 + i as i64);
        }
        prop_assert_eq!(lww_state(&reference), lww_state(&other));
        let (a, b) = (reference.to_doc(), other.to_doc());
        prop_assert_eq!(a.desired, b.desired);
        prop_assert_eq!(a.reported, b.reported);
    }

    #[test]
    fn delta_is_empty_exactly_when_reported_matches_every_desired_value(
        ops in proptest::collection::vec(arb_op(false), 0..30),
    ) {
        let mut t = twin();
        for (i, op) in ops.iter().enumerate() {
            let _ = run(&mut t, op, i as i64);
            let doc = t.to_doc();
            let converged = doc.desired.iter().all(|(k, v)| {
                doc.reported.get(k).is_some_and(|r| same_value(r, v))
            });
            prop_assert_eq!(t.delta().is_empty(), converged);
            for (k, v) in t.delta() {
                prop_assert_eq!(doc.desired.get(&k), Some(&v));
            }
        }
    }

    #[test]
    fn rejected_patch_leaves_the_twin_byte_identical(
        ops in proptest::collection::vec(arb_op(true), 0..30),
    ) {
        let mut t = twin();
        for (i, op) in ops.iter().enumerate() {
            let before = t.clone();
            let before_doc = serde_json::to_vec(&t.to_doc()).expect("json");
            if run(&mut t, op, i as i64).is_err() {
                prop_assert_eq!(serde_json::to_vec(&t.to_doc()).expect("json"), before_doc);
                prop_assert_eq!(&t, &before);
            }
        }
    }
}

#[test]
fn node_stamped_writes_in_the_same_millisecond_end_at_the_later_one() {
    let mut t = twin();
    // "b" sorts after "a": with equal stamps the tie-break on value would keep "b".
    desired(&mut t, json!({"mode": "b"}), 1_000).expect("valid");
    desired(&mut t, json!({"mode": "a"}), 1_000).expect("valid");
    assert_eq!(
        t.to_doc().desired["mode"],
        json!("a"),
        "the later write wins"
    );
    let ts = t.to_doc().metadata.desired["mode"].ts;
    assert_eq!(
        ts, 1_001,
        "stamped one millisecond after the value it replaced"
    );
    // Bounded: a flood does not push stamps more than STAMP_LEAD_MS ahead of the clock.
    for i in 0..5_000 {
        desired(&mut t, json!({"mode": format!("x{i}")}), 2_000).expect("valid");
    }
    let ts = t.to_doc().metadata.desired["mode"].ts;
    assert_eq!(ts, 2_000 + super::STAMP_LEAD_MS, "{ts}");
    // ...and a write at the bound ties instead of losing to the stamps before it.
    desired(&mut t, json!({"mode": "zzz"}), 2_000).expect("valid");
    assert_eq!(t.to_doc().desired["mode"], json!("zzz"));
    // An explicit ts is the writer's and is kept as given.
    desired(&mut t, json!({"mode": "w", "ts": 5_000}), 2_000).expect("valid");
    assert_eq!(t.to_doc().metadata.desired["mode"].ts, 5_000);
}

// ---- stale ----

fn online(t: &mut Twin, ts: i64) {
    t.apply_status(&DeviceStatusMsg {
        state: DeviceState::Online,
        ts,
        message: None,
    });
}

#[test]
fn an_online_device_without_a_reading_within_the_bound_is_stale_until_the_next_reading() {
    let mut t = twin();
    online(&mut t, 10);
    reported(&mut t, json!({"ts": 100, "voltage": 230}), 100).expect("ok");
    assert!(
        !t.mark_stale(50, 150, || "quiet".into()),
        "at the bound it is not stale yet"
    );
    assert!(t.mark_stale(50, 151, || "quiet".into()));
    assert_eq!(t.status.state, DeviceState::Stale);
    assert_eq!(t.status.message.as_deref(), Some("quiet"));
    assert!(!t.mark_stale(50, 200, || "quiet".into()), "already stale");
    // The next reading, even of the same value, makes it online again.
    let a = reported(&mut t, json!({"voltage": 230}), 210).expect("ok");
    assert!(a.status_changed && a.changed.is_empty());
    assert_eq!(t.status.state, DeviceState::Online);
    assert_eq!(t.status.message, None);
}

#[test]
fn stale_counts_from_the_online_status_before_any_reading() {
    let mut t = twin();
    assert!(
        !t.mark_stale(50, 1000, String::new),
        "unknown is never stale"
    );
    online(&mut t, 100);
    assert!(!t.mark_stale(50, 140, String::new));
    assert!(t.mark_stale(50, 151, String::new));
}

#[test]
fn offline_and_error_devices_do_not_turn_stale() {
    for state in [DeviceState::Offline, DeviceState::Error] {
        let mut t = twin();
        t.apply_status(&DeviceStatusMsg {
            state,
            ts: 10,
            message: None,
        });
        assert!(!t.mark_stale(50, 1000, String::new), "{state:?}");
        assert_eq!(t.status.state, state);
    }
}

// ---- lasting property errors ----

fn read_error(code: &str) -> Value {
    json!({"code": code, "message": "exception 2 (illegal address)", "op": "read"})
}

fn write_error(value: Value) -> Value {
    json!({"code": "write_not_held", "message": "reads back 100", "op": "write", "value": value})
}

#[test]
fn a_read_error_lasts_keeps_its_since_and_clears_when_the_property_reads() {
    let mut t = twin();
    reported(
        &mut t,
        json!({"ts": 10, "$errors": {"voltage": read_error("device_refused")}}),
        10,
    )
    .expect("ok");
    let a = reported(
        &mut t,
        json!({"ts": 20, "$errors": {"voltage": read_error("device_refused")}}),
        20,
    )
    .expect("ok");
    assert!(!a.status_changed, "a repeat is no change");
    let e = &t.status.errors["voltage"];
    assert_eq!(
        (e.code, e.op, e.since),
        (ErrorCode::DeviceRefused, PropertyOp::Read, 10)
    );
    assert_eq!(t.to_doc().status.errors.len(), 1, "in the twin document");
    // Another property reading leaves it.
    reported(&mut t, json!({"setpoint": 20}), 30).expect("ok");
    assert!(t.status.errors.contains_key("voltage"));
    let a = reported(&mut t, json!({"voltage": 230}), 40).expect("ok");
    assert!(a.status_changed);
    assert!(t.status.errors.is_empty());
}

#[test]
fn a_mapper_clears_an_error_with_null() {
    let mut t = twin();
    reported(
        &mut t,
        json!({"$errors": {"voltage": read_error("device_config")}}),
        10,
    )
    .expect("ok");
    let a = reported(&mut t, json!({"$errors": {"voltage": null}}), 20).expect("ok");
    assert!(a.status_changed);
    assert!(t.status.errors.is_empty());
}

#[test]
fn a_write_error_for_the_desired_value_keeps_it_out_of_the_delta_until_desired_changes() {
    let mut t = twin();
    desired(&mut t, json!({"setpoint": 30, "relay": true}), 10).expect("ok");
    reported(
        &mut t,
        json!({"setpoint": 25, "$errors": {"setpoint": write_error(json!(30))}}),
        20,
    )
    .expect("ok");
    assert_eq!(
        t.delta(),
        json!({"relay": true})
            .as_object()
            .cloned()
            .unwrap_or_default()
    );
    // Readings of another value do not bring it back (that would write it again).
    reported(&mut t, json!({"setpoint": 25}), 30).expect("ok");
    assert!(!t.delta().contains_key("setpoint"));
    assert!(t.status.errors.contains_key("setpoint"));
    // The same value desired again (`30.0` is `30`) changes nothing.
    desired(&mut t, json!({"setpoint": 30.0}), 40).expect("ok");
    assert!(!t.delta().contains_key("setpoint"));
    // A new desired value clears it and is tried.
    let a = desired(&mut t, json!({"setpoint": 28}), 50).expect("ok");
    assert!(a.status_changed);
    assert!(t.status.errors.is_empty());
    assert_eq!(t.delta().get("setpoint"), Some(&json!(28.0)));
}

#[test]
fn a_write_error_clears_when_the_device_reads_back_the_desired_value() {
    let mut t = twin();
    desired(&mut t, json!({"setpoint": 30}), 10).expect("ok");
    reported(
        &mut t,
        json!({"setpoint": 25, "$errors": {"setpoint": write_error(json!(30))}}),
        20,
    )
    .expect("ok");
    reported(&mut t, json!({"setpoint": 30.0}), 30).expect("ok");
    assert!(t.status.errors.is_empty());
    assert!(t.delta().is_empty());
}

#[test]
fn errors_are_checked_against_the_model_and_only_allowed_in_reported_patches() {
    let mut t = twin();
    assert_eq!(
        code(reported(
            &mut t,
            json!({"$errors": {"nosuch": read_error("device_refused")}}),
            1
        )),
        ErrorCode::UnknownProperty
    );
    assert_eq!(
        code(desired(
            &mut t,
            json!({"setpoint": 20, "$errors": {"setpoint": null}}),
            1
        )),
        ErrorCode::InvalidPatch
    );
    for bad in [
        json!({"$errors": 3}),
        json!({"$errors": {"voltage": {"code": "device_refused"}}}),
    ] {
        let r = Patch::parse(bad.to_string().as_bytes(), MAX_PROPS);
        assert_eq!(
            r.map(|_| ()).map_err(|r| r.code),
            Err(ErrorCode::InvalidPatch),
            "{bad}"
        );
    }
}

// ---- per-entry properties ----

fn entries_model() -> ModelSpec {
    ModelSpec {
        name: "node".into(),
        properties: BTreeMap::from([(
            "containers".to_string(),
            PropertySpec {
                ty: PropertyType::Object,
                access: AccessMode::ReadWrite,
                minimum: None,
                maximum: None,
                per_entry: true,
            },
        )]),
    }
}

fn declare(t: &mut Twin, v: Value, source: Source, now: i64) -> Applied {
    t.apply_desired(&entries_model(), &patch(v), source, now)
        .expect("accepted")
}

fn declared(t: &Twin) -> Option<Value> {
    t.desired_value("containers")
}

#[test]
fn per_entry_patch_changes_only_the_entries_it_names() {
    let mut t = twin();
    declare(
        &mut t,
        json!({"containers": {"web": {"image": "a"}, "db": {"image": "b"}, "mq": {"image": "c"}}}),
        Source::Local,
        10,
    );
    let a = declare(
        &mut t,
        json!({"containers": {"web": {"image": "a2"}, "mq": null}}),
        Source::Local,
        20,
    );
    assert_eq!(a.changed, vec!["containers.mq", "containers.web"]);
    assert_eq!(
        declared(&t),
        Some(json!({"db": {"image": "b"}, "web": {"image": "a2"}}))
    );
    let doc = t.to_doc();
    assert_eq!(doc.desired["containers"], declared(&t).expect("set"));
    let meta = &doc.metadata.desired;
    assert_eq!(meta["containers.db"].ts, 10);
    assert_eq!(meta["containers.web"].ts, 20);
    assert!(
        !meta.contains_key("containers.mq"),
        "a removed entry has no metadata"
    );
    assert_eq!(
        (meta["containers"].ts, meta["containers"].version),
        (20, t.version)
    );
}

#[test]
fn per_entry_edits_of_different_entries_from_two_sides_both_win_in_any_order() {
    let base = json!({"containers": {"web": {"image": "a"}, "db": {"image": "b"}}});
    let cloud = json!({"ts": 100, "containers": {"web": {"image": "cloud"}}});
    let local = json!({"ts": 90, "containers": {"db": null, "new": {"image": "n"}}});
    let run = |first: &Value, second: &Value| {
        let mut t = twin();
        declare(
            &mut t,
            json!({"ts": 1, "containers": base["containers"]}),
            Source::Local,
            1,
        );
        declare(&mut t, first.clone(), Source::Cloud, 200);
        declare(&mut t, second.clone(), Source::Local, 300);
        t
    };
    let (a, b) = (run(&cloud, &local), run(&local, &cloud));
    let want = json!({"new": {"image": "n"}, "web": {"image": "cloud"}});
    assert_eq!(declared(&a), Some(want.clone()));
    assert_eq!(declared(&b), Some(want));
    // The same entry written on both sides: the later write wins wherever it arrives first.
    let mut t = twin();
    declare(
        &mut t,
        json!({"ts": 50, "containers": {"web": {"image": "late"}}}),
        Source::Cloud,
        60,
    );
    declare(
        &mut t,
        json!({"ts": 40, "containers": {"web": {"image": "early"}}}),
        Source::Local,
        70,
    );
    assert_eq!(declared(&t), Some(json!({"web": {"image": "late"}})));
}

#[test]
fn per_entry_null_removes_every_entry_and_leaves_an_empty_declared_set() {
    let mut t = twin();
    assert_eq!(declared(&t), None, "never declared");
    declare(
        &mut t,
        json!({"containers": {"web": {"image": "a"}}}),
        Source::Local,
        10,
    );
    declare(&mut t, json!({"containers": null}), Source::Local, 20);
    assert_eq!(declared(&t), Some(json!({})), "declared, and empty");
    assert_eq!(t.to_doc().desired["containers"], json!({}));
    // An empty object names no entry: nothing changes.
    declare(
        &mut t,
        json!({"containers": {"web": {"image": "b"}}}),
        Source::Local,
        30,
    );
    let a = declare(&mut t, json!({"containers": {}}), Source::Local, 40);
    assert!(!a.is_change());
    assert_eq!(declared(&t), Some(json!({"web": {"image": "b"}})));
}

#[test]
fn per_entry_value_stored_whole_before_is_split_keeping_its_metadata() {
    let mut t = twin();
    // As an older build stored it: one register for the whole object.
    let mut whole = entries_model();
    if let Some(p) = whole.properties.get_mut("containers") {
        p.per_entry = false;
    }
    t.apply_desired(
        &whole,
        &patch(json!({"containers": {"web": {"image": "a"}, "db": {"image": "b"}}})),
        Source::Cloud,
        10,
    )
    .expect("accepted");
    assert_eq!(
        declared(&t),
        Some(json!({"db": {"image": "b"}, "web": {"image": "a"}}))
    );
    declare(
        &mut t,
        json!({"containers": {"db": null}}),
        Source::Local,
        20,
    );
    assert_eq!(declared(&t), Some(json!({"web": {"image": "a"}})));
    let meta = &t.to_doc().metadata.desired;
    assert_eq!(
        (
            meta["containers.web"].ts,
            meta["containers.web"].source.id()
        ),
        (10, Source::Cloud.id())
    );
}

#[test]
fn per_entry_delta_compares_the_whole_declared_set() {
    let mut t = twin();
    declare(
        &mut t,
        json!({"containers": {"web": {"image": "a"}}}),
        Source::Local,
        10,
    );
    assert_eq!(
        t.delta().get("containers"),
        Some(&json!({"web": {"image": "a"}}))
    );
    t.apply_reported(
        &entries_model(),
        &patch(json!({"containers": {"web": {"image": "a"}}})),
        mapper(),
        20,
    )
    .expect("accepted");
    assert!(t.delta().is_empty(), "{:?}", t.delta());
}
