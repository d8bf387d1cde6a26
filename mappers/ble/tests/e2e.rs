//! Against the real node: the real mapper binary on the real btleplug path (there is no Bluetooth
//! adapter here, so it must say so in one line and keep running), and the SDK runtime in-process
//! with the simulated peripheral (notifications, writes, the peripheral going away and back).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgetwin_mapper_ble::BleDriver;
use edgetwin_mapper_sdk::RuntimeOptions;
use edgetwin_testkit::{MapperProcess, Node};
use serde_json::{json, Value};

const MAPPER: &str = env!("CARGO_BIN_EXE_edgetwin-mapper-ble");
const EXAMPLE_DEVICE: &str = "cold-room-3";

/// The mapper binary against a node.
struct Mapper;

impl Mapper {
    fn start(node: &Node, bus: &str) -> MapperProcess {
        MapperProcess::start(
            node,
            MAPPER,
            &[
                ("DBUS_SYSTEM_BUS_ADDRESS", bus.as_ref()),
                ("EDGETWIN_LOG", "info,edgetwin_mapper_ble=debug".as_ref()),
            ],
        )
    }
}

/// A private D-Bus daemon (no BlueZ on it), killed on drop.
struct Bus {
    child: Child,
    _dir: tempfile::TempDir,
    address: String,
}

impl Bus {
    fn start() -> Bus {
        edgetwin_testkit::require("dbus-daemon");
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("bus");
        let address = format!("unix:path={}", sock.display());
        let child = Command::new("dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                "--address",
                &address,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "dbus-daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Bus {
            child,
            _dir: dir,
            address,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the example device's retained status to be `offline` with a message; returns it.
fn offline_message(node: &Node, mapper: &MapperProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = node.retained(&format!("dt/{EXAMPLE_DEVICE}/status"));
        if let Some(s) = s.filter(|s| s["state"] == "offline") {
            return s["message"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "device never offline; mapper log:\n{}",
            mapper.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ble_mapper_without_a_system_dbus_marks_the_device_offline_with_one_line_and_keeps_running() {
    let node = Node::start_with_profile(&example_profile());
    let dir = tempfile::tempdir().unwrap();
    let bus = format!("unix:path={}", dir.path().join("no-bus-here").display());
    let mut mapper = Mapper::start(&node, &bus);
    let m = offline_message(&node, &mapper);
    assert!(
        m.contains("BLE: no Bluetooth adapter available: cannot reach the system D-Bus: "),
        "{m}"
    );
    assert!(m.contains("no-bus-here"), "names the socket: {m}");
    assert!(!m.contains('\n'), "one line: {m:?}");
    node.retained_until("mappers/ble/status", Duration::from_secs(5), |v| {
        v.is_some_and(|v| v["state"] == "online")
    });
    // Retried with backoff, not fatal: still running a few retries later.
    std::thread::sleep(Duration::from_secs(2));
    mapper.assert_running_then_stop_cleanly();
}

#[test]
fn ble_mapper_with_dbus_but_no_bluez_says_bluez_is_not_running() {
    let bus = Bus::start();
    let node = Node::start_with_profile(&example_profile());
    let mut mapper = Mapper::start(&node, &bus.address);
    let m = offline_message(&node, &mapper);
    assert!(
        m.contains("BLE: no Bluetooth adapter available: BlueZ (org.bluez) is not running: "),
        "{m}"
    );
    assert!(!m.contains('\n'), "one line: {m:?}");
    mapper.assert_running_then_stop_cleanly();
}

/// The SDK runtime with the simulated peripheral, in a runtime of its own, until dropped.
struct InProcess {
    shutdown: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(node: &Node, sim: &SimPeripheral) -> InProcess {
        let driver = BleDriver::with_transport(SimTransport {
            device: sim.clone(),
        })
        .with_timeouts(Duration::from_millis(300), Duration::from_secs(2));
        let mut opts = RuntimeOptions::new(format!("127.0.0.1:{}", node.port));
        opts.device_backoff_max = Duration::from_millis(500);
        let shutdown = opts.shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(edgetwin_mapper_sdk::run(driver, opts)).unwrap();
        });
        InProcess {
            shutdown,
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(node: &Node, device: &str, state: &str) -> Value {
    node.retained_until(
        &format!("dt/{device}/status"),
        Duration::from_secs(15),
        |v| v.is_some_and(|v| v["state"] == state),
    )
    .unwrap()
}

#[test]
fn ble_runtime_reports_the_example_sensor_and_follows_notifications() {
    let sim = SimPeripheral::ess_sensor("C4:7C:8D:6A:12:3F", "ESS");
    let node = Node::start_with_profile(&example_profile());
    let _mapper = InProcess::start(&node, &sim);
    let t = node.twin_until(EXAMPLE_DEVICE, |t| {
        ["temperature", "humidity", "battery"]
            .iter()
            .all(|p| t["reported"].get(p).is_some())
    });
    assert_eq!(t["reported"]["temperature"], json!(21.5), "{t}");
    assert_eq!(t["reported"]["humidity"], json!(49.22), "{t}");
    assert_eq!(t["reported"]["battery"], json!(95), "{t}");
    status(&node, EXAMPLE_DEVICE, "online");
    sim.notify("181A", "2A6E", &[0x9C, 0xFF]);
    node.twin_until(EXAMPLE_DEVICE, |t| {
        t["reported"]["temperature"] == json!(-1.0)
    });
}

#[test]
fn ble_runtime_peripheral_gone_turns_the_device_offline_and_it_recovers_when_back() {
    let sim = SimPeripheral::ess_sensor("C4:7C:8D:6A:12:3F", "ESS");
    let node = Node::start_with_profile(&example_profile());
    let _mapper = InProcess::start(&node, &sim);
    status(&node, EXAMPLE_DEVICE, "online");
    sim.vanish();
    let s = status(&node, EXAMPLE_DEVICE, "offline");
    assert!(
        s["message"].as_str().unwrap().contains("C4:7C:8D:6A:12:3F"),
        "{s}"
    );
    sim.reappear();
    status(&node, EXAMPLE_DEVICE, "online");
    // Subscribed again: notifications flow after the reconnect.
    sim.notify("181A", "2A6E", &[0x00, 0x80]);
    node.twin_until(EXAMPLE_DEVICE, |t| {
        t["reported"]["temperature"] == json!(-327.68)
    });
    assert!(sim.connects() >= 2);
}

#[test]
fn ble_runtime_desired_setpoint_is_written_to_the_characteristic_and_the_delta_clears() {
    let sim = SimPeripheral::ess_sensor("AA:BB:CC:DD:EE:01", "lab-sensor");
    let node = Node::start_with_profile(&lab_profile("lab-sensor"));
    let _mapper = InProcess::start(&node, &sim);
    node.twin_until("ess-lab-1", |t| t["reported"]["setpoint"] == json!(21.0));
    node.pub_("dt/ess-lab-1/desired", r#"{"setpoint": 22.5}"#);
    let t = node.twin_until("ess-lab-1", |t| t["reported"]["setpoint"] == json!(22.5));
    assert_eq!(t["desired"]["setpoint"], json!(22.5));
    assert_eq!(
        sim.writes().last().unwrap().1,
        vec![0xCA, 0x08],
        "2250 little-endian"
    );
}
