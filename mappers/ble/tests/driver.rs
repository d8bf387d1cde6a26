//! The BLE driver over the simulated peripheral, without a node: the example sensor's standard
//! characteristics, notifications, writes, special values, missing characteristics, discovery by
//! name, and the peripheral going away and coming back.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgetwin_mapper_ble::BleDriver;
use edgetwin_mapper_sdk::driver::flat;
use edgetwin_mapper_sdk::{Driver, DriverError};
use edgetwin_profile::ResolvedDevice;
use serde_json::{json, Value};

type Sim = BleDriver<SimTransport>;

fn driver(dev: &SimPeripheral) -> Sim {
    BleDriver::with_transport(SimTransport {
        device: dev.clone(),
    })
    .with_timeouts(Duration::from_millis(500), Duration::from_secs(2))
}

async fn read(
    d: &Sim,
    conn: &mut <Sim as Driver>::Conn,
    dev: &ResolvedDevice,
    names: &[&str],
) -> Result<Vec<(String, Result<Value, DriverError>)>, DriverError> {
    let props: Vec<_> = names
        .iter()
        .map(|n| dev.device.property(n).unwrap())
        .collect();
    flat::reads(&props, d.read(conn, dev, &props).await)
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

#[tokio::test]
async fn ble_driver_reads_the_example_sensor_standard_characteristics() {
    let sim = SimPeripheral::ess_sensor("C4:7C:8D:6A:12:3F", "ESS");
    let dev = resolve(&example_profile(), "cold-room-3");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&d, &mut conn, &dev, &["temperature", "humidity", "battery"])
        .await
        .unwrap();
    assert_eq!(value(&rs, "temperature"), &json!(21.5));
    assert_eq!(value(&rs, "humidity"), &json!(49.22));
    assert_eq!(value(&rs, "battery"), &json!(95));
    assert!(sim.is_subscribed("2A6E"), "temperature is notify: true");
    assert!(!sim.is_subscribed("2A6F"));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn ble_driver_notify_property_answers_with_the_latest_notification_without_reading() {
    let sim = SimPeripheral::ess_sensor("C4:7C:8D:6A:12:3F", "ESS");
    let dev = resolve(&example_profile(), "cold-room-3");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    sim.notify("181A", "2A6E", &[0x9C, 0xFF]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rs = read(&d, &mut conn, &dev, &["temperature"]).await.unwrap();
        if value(&rs, "temperature") == &json!(-1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "notification never read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reads = sim.reads();
    sim.notify("181A", "2A6E", &[0x00, 0x80]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rs = read(&d, &mut conn, &dev, &["temperature"]).await.unwrap();
    assert_eq!(value(&rs, "temperature"), &json!(-327.68));
    assert_eq!(
        sim.reads(),
        reads,
        "no characteristic read for a notified value"
    );
    d.disconnect(conn).await;
}

#[tokio::test]
async fn ble_driver_write_encodes_the_value_and_reads_it_back() {
    let sim = SimPeripheral::ess_sensor("AA:BB:CC:DD:EE:01", "lab-sensor");
    let dev = resolve(&lab_profile("lab-sensor"), "ess-lab-1");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&d, &mut conn, &dev, &["setpoint"]).await.unwrap();
    assert_eq!(value(&rs, "setpoint"), &json!(21.0));
    let prop = dev.device.property("setpoint").unwrap();
    flat::write(d.write(&mut conn, &dev, prop, &json!(22.5)).await).unwrap();
    let (ch, bytes) = sim.writes().pop().unwrap();
    assert_eq!(ch, uuid("0000ff01-0000-1000-8000-00805f9b34fb"));
    assert_eq!(bytes, vec![0xCA, 0x08], "2250 little-endian");
    let rs = read(&d, &mut conn, &dev, &["setpoint"]).await.unwrap();
    assert_eq!(value(&rs, "setpoint"), &json!(22.5));
    // Out of the int16 range after the inverse scale: refused before anything is sent.
    let e = flat::write(d.write(&mut conn, &dev, prop, &json!(400.0)).await).unwrap_err();
    assert!(matches!(e, DriverError::Config(_)), "{e:?}");
    assert_eq!(sim.writes().len(), 1);
    d.disconnect(conn).await;
}

#[tokio::test]
async fn ble_driver_finds_the_peripheral_by_advertised_name() {
    let sim = SimPeripheral::ess_sensor("AA:BB:CC:DD:EE:01", "lab-sensor");
    let dev = resolve(&lab_profile("lab-sensor"), "ess-lab-1");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&d, &mut conn, &dev, &["battery", "body"])
        .await
        .unwrap();
    assert_eq!(value(&rs, "battery"), &json!(95));
    assert_eq!(value(&rs, "body"), &json!(36.5), "SFLOAT 0xF16D");
    d.disconnect(conn).await;
    let other = resolve(&lab_profile("someone-else"), "ess-lab-1");
    match d.connect(&other).await {
        Err(DriverError::Link(m)) => assert!(m.contains("not found"), "{m}"),
        Err(e) => panic!("expected a link error, got {e:?}"),
        Ok(_) => panic!("connected to the wrong peripheral"),
    }
}

#[tokio::test]
async fn ble_driver_special_sfloat_value_is_a_device_error_for_that_property_only() {
    let sim = SimPeripheral::ess_sensor("AA:BB:CC:DD:EE:01", "lab-sensor");
    sim.set(
        "181A",
        "0000ff02-0000-1000-8000-00805f9b34fb",
        &0x07FFu16.to_le_bytes(),
    );
    let dev = resolve(&lab_profile("lab-sensor"), "ess-lab-1");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&d, &mut conn, &dev, &["body", "battery"])
        .await
        .unwrap();
    match result(&rs, "body") {
        Err(DriverError::Device(m)) => assert!(m.contains("NaN"), "{m}"),
        other => panic!("expected a device error, got {other:?}"),
    }
    assert_eq!(value(&rs, "battery"), &json!(95));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn ble_driver_missing_characteristic_is_a_config_error_for_that_property_only() {
    let sim = SimPeripheral::ess_sensor("AA:BB:CC:DD:EE:01", "lab-sensor");
    let dev = resolve(&lab_profile("lab-sensor"), "ess-lab-1");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    let rs = read(&d, &mut conn, &dev, &["missing", "battery"])
        .await
        .unwrap();
    assert!(
        matches!(result(&rs, "missing"), Err(DriverError::Config(_))),
        "{rs:?}"
    );
    assert_eq!(value(&rs, "battery"), &json!(95));
    d.disconnect(conn).await;
}

#[tokio::test]
async fn ble_driver_peripheral_gone_is_a_link_error_and_it_reconnects_when_back() {
    let sim = SimPeripheral::ess_sensor("C4:7C:8D:6A:12:3F", "ESS");
    let dev = resolve(&example_profile(), "cold-room-3");
    let d = driver(&sim);
    let mut conn = d.connect(&dev).await.unwrap();
    read(&d, &mut conn, &dev, &["battery"]).await.unwrap();
    sim.vanish();
    match read(&d, &mut conn, &dev, &["temperature"]).await {
        Err(DriverError::Link(m)) => assert!(m.contains("C4:7C:8D:6A:12:3F"), "{m}"),
        other => panic!("expected a link error, got {other:?}"),
    }
    d.disconnect(conn).await;
    assert!(matches!(d.connect(&dev).await, Err(DriverError::Link(_))));
    sim.reappear();
    let mut conn = d.connect(&dev).await.unwrap();
    assert!(
        sim.is_subscribed("2A6E"),
        "subscribed again after reconnecting"
    );
    sim.notify("181A", "2A6E", &[0x9C, 0xFF]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rs = read(&d, &mut conn, &dev, &["temperature"]).await.unwrap();
    assert_eq!(value(&rs, "temperature"), &json!(-1.0));
    assert_eq!(sim.connects(), 2);
    d.disconnect(conn).await;
}
