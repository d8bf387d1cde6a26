//! The serial driver against the scripted device on a socat pty pair, without a node: polled and
//! unsolicited values, writes, garbled lines, silence, missing ports and by-id symlinks.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edgetwin_mapper_sdk::driver::flat;
use edgetwin_mapper_sdk::{Driver, DriverError};
use edgetwin_mapper_serial::{SerialConn, SerialDriver};
use edgetwin_profile::ResolvedDevice;
use serde_json::{json, Value};

const DEVICE: &str = "co2-lab-1";

async fn read(
    conn: &mut SerialConn,
    dev: &ResolvedDevice,
    names: &[&str],
) -> Result<Vec<(String, Result<Value, DriverError>)>, DriverError> {
    let props: Vec<_> = names
        .iter()
        .map(|n| dev.device.property(n).unwrap())
        .collect();
    flat::reads(&props, SerialDriver::new().read(conn, dev, &props).await)
}

fn result<'a>(
    rs: &'a [(String, Result<Value, DriverError>)],
    name: &str,
) -> &'a Result<Value, DriverError> {
    &rs.iter().find(|(n, _)| n == name).unwrap().1
}

fn value<'a>(rs: &'a [(String, Result<Value, DriverError>)], name: &str) -> &'a Value {
    match result(rs, name) {
        Ok(v) => v,
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Reads `name` until it gives `want` (unsolicited values arrive on the device's own schedule).
async fn read_until(conn: &mut SerialConn, dev: &ResolvedDevice, name: &str, want: &Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rs = read(conn, dev, &[name]).await.unwrap();
        if result(&rs, name).as_ref().ok() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never read {want}; last: {:?}",
            result(&rs, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn serial_driver_polled_properties_take_their_values_from_the_reply_lines() {
    let pty = PtyPair::new();
    let sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&mut conn, &dev, &["co2", "temperature", "alarm_threshold"])
        .await
        .unwrap();
    assert_eq!(value(&rs, "co2"), &json!(412));
    assert_eq!(value(&rs, "temperature"), &json!(21.5));
    assert_eq!(value(&rs, "alarm_threshold"), &json!(1000));
    for line in ["READ CO2", "READ T", "GET SETPOINT"] {
        sim.wait_received(line);
    }
    assert_eq!(d.requests_made(&conn), Some(3));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_unsolicited_lines_keep_the_latest_value() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    // The first read waits (up to the timeout) for the first ALARM line.
    let rs = read(&mut conn, &dev, &["alarm"]).await.unwrap();
    assert_eq!(value(&rs, "alarm"), &json!(false));
    sim.command("alarm 1");
    read_until(&mut conn, &dev, "alarm", &json!(true)).await;
    // Unsolicited lines arriving between a request and its reply do not disturb the reply.
    for _ in 0..5 {
        let rs = read(&mut conn, &dev, &["co2", "alarm"]).await.unwrap();
        assert_eq!(value(&rs, "co2"), &json!(412));
        assert_eq!(value(&rs, "alarm"), &json!(true));
    }
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_write_sends_the_filled_template_and_the_device_reads_back_the_value() {
    let pty = PtyPair::new();
    let sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let prop = dev.device.property("alarm_threshold").unwrap();
    flat::write(d.write(&mut conn, &dev, prop, &json!(800)).await).unwrap();
    sim.wait_received("SETPOINT 800");
    // The device's "OK" is not taken for the reply to the next request.
    let rs = read(&mut conn, &dev, &["alarm_threshold", "co2"])
        .await
        .unwrap();
    assert_eq!(value(&rs, "alarm_threshold"), &json!(800));
    assert_eq!(value(&rs, "co2"), &json!(412));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_garbled_reply_is_a_device_error_for_that_property_only() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    sim.command("garble 1");
    // The command travels through the simulator's stdin: wait until it is in effect.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rs = loop {
        let rs = read(&mut conn, &dev, &["temperature", "co2"])
            .await
            .unwrap();
        if result(&rs, "temperature").is_err() || Instant::now() > deadline {
            break rs;
        }
    };
    match result(&rs, "temperature") {
        Err(DriverError::Device(m)) => {
            assert!(m.contains("garbled line \"T=#?!C\""), "{m}");
        }
        other => panic!("expected a garbled-line device error, got {other:?}"),
    }
    assert_eq!(value(&rs, "co2"), &json!(412));
    // Skipped: the next reply is good again.
    let rs = read(&mut conn, &dev, &["temperature"]).await.unwrap();
    assert_eq!(value(&rs, "temperature"), &json!(21.5));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_garbled_unsolicited_value_is_a_device_error_until_a_good_line_arrives() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let dev = resolve(&lab_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    sim.command("send LEVEL=abc");
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let rs = read(&mut conn, &dev, &["level"]).await.unwrap();
        match result(&rs, "level") {
            Err(DriverError::Device(m)) if m.contains("garbled") => break m.clone(),
            other => assert!(Instant::now() < deadline, "no garbled error: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(err.contains("\"LEVEL=abc\""), "{err}");
    assert!(err.contains("not an integer"), "{err}");
    sim.command("send LEVEL=7");
    read_until(&mut conn, &dev, "level", &json!(7)).await;
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_unsolicited_property_without_any_line_yet_is_a_device_error_after_the_timeout(
) {
    let pty = PtyPair::new();
    let _sim = Sim::start(&pty.b);
    let dev = resolve(&lab_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&mut conn, &dev, &["level"]).await.unwrap();
    match result(&rs, "level") {
        Err(DriverError::Device(m)) => assert!(m.contains("has arrived yet"), "{m}"),
        other => panic!("expected a device error, got {other:?}"),
    }
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_silent_device_is_a_link_error_naming_the_request_and_port() {
    let pty = PtyPair::new();
    let mut sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    sim.command("mute");
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match read(&mut conn, &dev, &["co2"]).await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "the device never went silent"),
        }
    };
    let DriverError::Link(m) = err else {
        panic!("expected a link error, got {err:?}")
    };
    assert!(m.contains("no reply to \"READ CO2\\r\\n\""), "{m}");
    assert!(m.contains(&pty.a), "{m}");
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_port_that_goes_away_is_a_link_error() {
    let pty = PtyPair::new();
    let sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    read(&mut conn, &dev, &["co2"]).await.unwrap();
    drop(sim);
    drop(pty);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read(&mut conn, &dev, &["co2", "alarm"]).await {
            Err(DriverError::Link(_)) => break,
            Err(e) => panic!("expected a link error, got {e:?}"),
            Ok(_) => assert!(Instant::now() < deadline, "reads go on without a port"),
        }
    }
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_missing_port_is_a_link_error_naming_the_path() {
    let path = "/dev/serial/by-id/usb-edgetwin-test-does-not-exist-if00-port0";
    let dev = resolve(&example_profile(path), DEVICE);
    match SerialDriver::new().connect(&dev).await {
        Err(DriverError::Link(m)) => assert!(m.contains(path), "{m}"),
        Err(e) => panic!("expected a link error, got {e:?}"),
        Ok(_) => panic!("opened a port that does not exist"),
    }
}

#[tokio::test]
async fn serial_driver_opens_a_by_id_style_symlink_to_the_port() {
    let pty = PtyPair::new();
    let _sim = Sim::start(&pty.b);
    let dir = tempfile::tempdir().unwrap();
    let link = dir
        .path()
        .join("usb-Prolific_Technology_Inc._USB-Serial_Controller_D-if00-port0");
    std::os::unix::fs::symlink(&pty.a, &link).unwrap();
    let dev = resolve(&example_profile(link.to_str().unwrap()), DEVICE);
    let d = SerialDriver::new();
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&mut conn, &dev, &["co2"]).await.unwrap();
    assert_eq!(value(&rs, "co2"), &json!(412));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn serial_driver_reconnects_after_disconnect_on_the_same_port() {
    let pty = PtyPair::new();
    let _sim = Sim::start(&pty.b);
    let dev = resolve(&example_profile(&pty.a), DEVICE);
    let d = SerialDriver::new();
    for _ in 0..3 {
        let mut conn = d.connect(&dev).await.unwrap();
        let rs = read(&mut conn, &dev, &["co2"]).await.unwrap();
        assert_eq!(value(&rs, "co2"), &json!(412));
        d.disconnect(conn).await;
    }
}
