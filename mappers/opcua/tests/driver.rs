//! The OPC UA driver against the asyncua simulator, without a node: every scalar type read and
//! written, subscriptions feeding reads, node id errors per property, status codes, security
//! modes, and link loss with reconnect.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgetwin_mapper_opcua::{OpcuaConn, OpcuaDriver};
use edgetwin_mapper_sdk::driver::flat;
use edgetwin_mapper_sdk::{Driver, DriverError};
use edgetwin_profile::ResolvedDevice;
use serde_json::{json, Value};

type Reads = Vec<(String, Result<Value, DriverError>)>;

async fn read_all(
    d: &OpcuaDriver,
    conn: &mut OpcuaConn,
    dev: &ResolvedDevice,
) -> Result<Reads, DriverError> {
    let props: Vec<_> = dev.device.spec.properties.iter().collect();
    flat::reads(&props, d.read(conn, dev, &props).await)
}

fn result<'a>(rs: &'a Reads, name: &str) -> &'a Result<Value, DriverError> {
    &rs.iter().find(|(n, _)| n == name).unwrap().1
}

fn value<'a>(rs: &'a Reads, name: &str) -> &'a Value {
    match result(rs, name) {
        Ok(v) => v,
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Reads until `pred` accepts the readings (subscriptions deliver their first values a
/// publishing interval after connect).
async fn read_until(
    d: &OpcuaDriver,
    conn: &mut OpcuaConn,
    dev: &ResolvedDevice,
    pred: impl Fn(&Reads) -> bool,
) -> Reads {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rs = read_all(d, conn, dev).await.unwrap();
        if pred(&rs) {
            return rs;
        }
        assert!(Instant::now() < deadline, "readings never matched: {rs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn typed_props<'a>(prefix: &str, extra: &str) -> Vec<Prop<'a>> {
    let n = |t: &str| node(&format!("ns=2;s={prefix}{t}"), extra);
    vec![
        rw("bool", "boolean", &n("Bool")),
        rw("int16", "int", &n("Int16")),
        rw("int32", "int", &n("Int32")),
        rw("int64", "int", &n("Int64")),
        rw("uint16", "int", &n("UInt16")),
        rw("uint32", "int", &n("UInt32")),
        rw("uint64", "int", &n("UInt64")),
        rw("float", "float", &n("Float")),
        rw("double", "float", &n("Double")),
        rw("string", "string", &n("String")),
    ]
}

fn expected_initial() -> Vec<(&'static str, Value)> {
    vec![
        ("bool", json!(true)),
        ("int16", json!(-1234)),
        ("int32", json!(-123456)),
        ("int64", json!(-1234567890123i64)),
        ("uint16", json!(54321)),
        ("uint32", json!(3_000_000_000u64)),
        ("uint64", json!(12_345_678_901_234u64)),
        ("float", json!(21.5)),
        ("double", json!(-3.25e10)),
        ("string", json!("EDGE-1")),
    ]
}

#[tokio::test]
async fn opcua_driver_reads_every_scalar_type_polled_and_subscribed() {
    let sim = Sim::start(edgetwin_testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    for extra in ["poll: true", "samplingInterval: 100ms"] {
        let mut props = typed_props("", extra);
        props.push(prop("numeric", "int", &node("ns=2;i=5", extra)));
        let dev = resolve(
            &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
            "d",
        );
        let mut conn = d.connect(&dev).await.unwrap();
        let rs = read_until(&d, &mut conn, &dev, |rs| rs.iter().all(|(_, r)| r.is_ok())).await;
        for (name, want) in expected_initial() {
            assert_eq!(value(&rs, name), &want, "{name} ({extra})");
        }
        assert_eq!(value(&rs, "numeric"), &json!(42));
        d.disconnect(conn).await;
    }
}

#[tokio::test]
async fn opcua_driver_subscribed_values_change_without_read_requests() {
    let sim = Sim::start(edgetwin_testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let props = vec![
        prop(
            "counter",
            "int",
            &node("ns=2;s=Counter", "samplingInterval: 100ms"),
        ),
        prop("polled", "int", &node("ns=2;s=Counter", "poll: true")),
    ];
    let dev = resolve(
        &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
        "d",
    );
    let mut conn = d.connect(&dev).await.unwrap();
    assert_eq!(conn.subscribed(), vec!["counter".to_string()]);
    let only_counter = [&dev.device.spec.properties[0]];
    // The first notification arrives one publishing interval after connect.
    let first = loop {
        let rs = flat::reads(&only_counter, d.read(&mut conn, &dev, &only_counter).await).unwrap();
        if let Ok(v) = &rs[0].1 {
            break v.as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // From now on reads are answered from the subscription: no more requests, new values.
    let requests = conn.requests();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rs = flat::reads(&only_counter, d.read(&mut conn, &dev, &only_counter).await).unwrap();
        let now = rs[0].1.as_ref().unwrap().as_u64().unwrap();
        if now > first {
            break;
        }
        assert!(Instant::now() < deadline, "counter stuck at {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conn.requests(), requests, "subscribed reads sent requests");
    // A polled property costs one Read request per read.
    let polled = [&dev.device.spec.properties[1]];
    let rs = flat::reads(&polled, d.read(&mut conn, &dev, &polled).await).unwrap();
    assert!(rs[0].1.as_ref().unwrap().as_u64().unwrap() >= first);
    assert_eq!(conn.requests(), requests + 1);
}

#[tokio::test]
async fn opcua_driver_desired_writes_reach_the_server_in_the_node_type_and_read_back() {
    let sim = Sim::start(edgetwin_testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let props = typed_props("W.", "samplingInterval: 100ms");
    let dev = resolve(
        &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
        "d",
    );
    let mut conn = d.connect(&dev).await.unwrap();
    read_until(&d, &mut conn, &dev, |rs| rs.iter().all(|(_, r)| r.is_ok())).await;
    let writes = [
        ("bool", "Bool", json!(false), "Boolean"),
        ("int16", "Int16", json!(-32768), "Int16"),
        ("int32", "Int32", json!(2_000_000_000), "Int32"),
        ("int64", "Int64", json!(-9_000_000_000_000i64), "Int64"),
        ("uint16", "UInt16", json!(65535), "UInt16"),
        ("uint32", "UInt32", json!(4_000_000_000u64), "UInt32"),
        (
            "uint64",
            "UInt64",
            json!(9_000_000_000_000_000_000u64),
            "UInt64",
        ),
        ("float", "Float", json!(25.5), "Float"),
        ("double", "Double", json!(-1.0e-3), "Double"),
        ("string", "String", json!("recipe B"), "String"),
    ];
    for (name, node_name, v, ty) in &writes {
        let p = dev.device.property(name).unwrap();
        flat::write(d.write(&mut conn, &dev, p, v).await).unwrap();
        let w = sim.wait_write_of(&format!("ns=2;s=W.{node_name}"), v);
        assert_eq!(w["type"], json!(ty), "{name}: {w}");
        // The read-back right after the write sees the new value (read directly, not an older
        // notification).
        let rs = flat::reads(&[p], d.read(&mut conn, &dev, &[p]).await).unwrap();
        assert_eq!(rs[0].1.as_ref().unwrap(), v, "{name} read back");
    }
    // A value that does not fit the node's type is a Config error and is not sent.
    let p = dev.device.property("int16").unwrap();
    let e = flat::write(d.write(&mut conn, &dev, p, &json!(70000)).await).unwrap_err();
    assert!(matches!(e, DriverError::Config(_)), "{e}");
    let p = dev.device.property("string").unwrap();
    let e = flat::write(d.write(&mut conn, &dev, p, &json!(5)).await).unwrap_err();
    assert!(matches!(e, DriverError::Config(_)), "{e}");
}

#[tokio::test]
async fn opcua_driver_bad_node_ids_are_errors_of_their_property_only() {
    let sim = Sim::start(edgetwin_testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let props = vec![
        prop("good", "int", &node("ns=2;s=Int16", "")),
        prop("malformed", "int", &node("ns=2;g=not-a-guid", "")),
        prop("unknown", "int", &node("ns=2;s=NoSuchNode", "")),
        prop(
            "unknown_polled",
            "int",
            &node("ns=2;s=NoSuchNode", "poll: true"),
        ),
        rw("readonly", "int", &node("ns=2;s=Int32", "")),
    ];
    let dev = resolve(
        &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
        "d",
    );
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read_until(&d, &mut conn, &dev, |rs| result(rs, "good").is_ok()).await;
    assert_eq!(value(&rs, "good"), &json!(-1234));
    match result(&rs, "malformed") {
        Err(DriverError::Config(m)) => assert!(m.contains("not-a-guid"), "{m}"),
        other => panic!("malformed: {other:?}"),
    }
    for name in ["unknown", "unknown_polled"] {
        match result(&rs, name) {
            Err(DriverError::Device(m)) => {
                assert!(
                    m.contains("BadNodeIdUnknown") && m.contains("NoSuchNode"),
                    "{m}"
                )
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // A node the server does not let us write: its Bad status, named.
    let p = dev.device.property("readonly").unwrap();
    match flat::write(d.write(&mut conn, &dev, p, &json!(1)).await) {
        Err(DriverError::Device(m)) => assert!(m.contains("Bad"), "{m}"),
        other => panic!("readonly write: {other:?}"),
    }
    // The connection is still fine.
    let rs = read_all(&d, &mut conn, &dev).await.unwrap();
    assert_eq!(value(&rs, "good"), &json!(-1234));
}

#[tokio::test]
async fn opcua_driver_server_restart_is_a_link_error_then_a_new_connection_works() {
    let mut sim = Sim::start(edgetwin_testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let props = vec![
        prop(
            "counter",
            "int",
            &node("ns=2;s=Counter", "samplingInterval: 100ms"),
        ),
        prop("int16", "int", &node("ns=2;s=Int16", "poll: true")),
    ];
    let dev = resolve(
        &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
        "d",
    );
    let mut conn = d.connect(&dev).await.unwrap();
    read_until(&d, &mut conn, &dev, |rs| rs.iter().all(|(_, r)| r.is_ok())).await;

    sim.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match read_all(&d, &mut conn, &dev).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "no link error after the server stopped"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(matches!(err, DriverError::Link(_)), "{err}");
    // A subscribed value is not served from the cache of a dead session.
    let e = read_all(&d, &mut conn, &dev).await.unwrap_err();
    assert!(matches!(e, DriverError::Link(_)), "{e}");
    d.disconnect(conn).await;
    match d.connect(&dev).await {
        Err(DriverError::Link(_)) => {}
        other => panic!("connect to a stopped server: {other:?}"),
    }

    sim.restart();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read_until(&d, &mut conn, &dev, |rs| rs.iter().all(|(_, r)| r.is_ok())).await;
    assert_eq!(value(&rs, "int16"), &json!(-1234));
}

#[tokio::test]
async fn opcua_driver_basic256sha256_sign_with_a_client_certificate_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::secure(
        edgetwin_testkit::free_port(),
        &dir.path().join("server"),
        None,
    );
    let (cert, key) = client_cert(&dir.path().join("client"));
    let d = driver(dir.path());
    for mode in ["Sign", "SignAndEncrypt"] {
        let protocol = format!(
            "{{url: \"{}\", securityPolicy: Basic256Sha256, securityMode: {mode}, certificate: {cert}, privateKey: {key}, timeout: 2s}}",
            sim.url()
        );
        let props = vec![
            prop("int16", "int", &node("ns=2;s=Int16", "poll: true")),
            rw(
                "setpoint",
                "float",
                &node("ns=2;s=Setpoint", "samplingInterval: 100ms"),
            ),
        ];
        let dev = resolve(&profile_yaml("m", "d", &protocol, "200ms", &props), "d");
        let mut conn = d
            .connect(&dev)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let rs = read_until(&d, &mut conn, &dev, |rs| rs.iter().all(|(_, r)| r.is_ok())).await;
        assert_eq!(value(&rs, "int16"), &json!(-1234));
        let p = dev.device.property("setpoint").unwrap();
        let v = if mode == "Sign" {
            json!(30.5)
        } else {
            json!(31.5)
        };
        flat::write(d.write(&mut conn, &dev, p, &v).await).unwrap();
        sim.wait_write_of("ns=2;s=Setpoint", &v);
        d.disconnect(conn).await;
    }
}

#[tokio::test]
async fn opcua_driver_user_password_session_and_a_wrong_password_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::secure(
        edgetwin_testkit::free_port(),
        &dir.path().join("server"),
        Some("edgetwin:s3cret"),
    );
    let (cert, key) = client_cert(&dir.path().join("client"));
    let d = driver(dir.path());
    let pw = dir.path().join("password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let props = vec![prop("int16", "int", &node("ns=2;s=Int16", "poll: true"))];
    let secure = |user: &str| {
        format!(
            "{{url: \"{}\", securityPolicy: Basic256Sha256, securityMode: SignAndEncrypt, certificate: {cert}, privateKey: {key}, {user}, timeout: 2s}}",
            sim.url()
        )
    };
    let good = secure(&format!(
        "userName: edgetwin, passwordFile: {}",
        pw.display()
    ));
    let dev = resolve(&profile_yaml("m", "d", &good, "200ms", &props), "d");
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read_all(&d, &mut conn, &dev).await.unwrap();
    assert_eq!(value(&rs, "int16"), &json!(-1234));
    d.disconnect(conn).await;

    let bad = secure("userName: edgetwin, password: wrong");
    let dev = resolve(&profile_yaml("m", "d", &bad, "200ms", &props), "d");
    match d.connect(&dev).await {
        Err(DriverError::Config(m)) => assert!(m.contains("Bad"), "{m}"),
        other => panic!("wrong password: {other:?}"),
    }
    // Security None is offered, but this server accepts no anonymous session.
    let anon = resolve(
        &profile_yaml("m", "d", &anonymous(&sim), "200ms", &props),
        "d",
    );
    match d.connect(&anon).await {
        Err(DriverError::Config(_)) => {}
        other => panic!("anonymous on a user-only server: {other:?}"),
    }
}
