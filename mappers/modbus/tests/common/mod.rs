//! Shared test helpers: the pymodbus simulator (`tests/sim/modbus_sim.py`), a socat pty pair for
//! RTU, and resolved devices built from profile YAML through the real loader.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgetwin_profile::ResolvedDevice;
use edgetwin_testkit::ScriptPeer;
use serde_json::Value;

/// The register map of the simulator, as documented in `modbus_sim.py`.
pub const SIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/modbus_sim.py");

/// A running pymodbus simulator; killed on drop.
pub struct Sim {
    peer: ScriptPeer,
    pub args: Vec<String>,
}

impl Sim {
    /// Modbus TCP on 127.0.0.1:`port`, ready to serve.
    pub fn tcp(port: u16) -> Sim {
        let sim = Sim::spawn(vec!["tcp".into(), port.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "simulator did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sim
    }

    /// Modbus RTU on the serial port `path`.
    pub fn rtu(path: &str) -> Sim {
        Sim::spawn(vec!["rtu".into(), path.into()])
    }

    fn spawn(args: Vec<String>) -> Sim {
        let peer = ScriptPeer::start(SIM, &args, "pymodbus", Duration::from_secs(15));
        Sim { peer, args }
    }

    /// Writes the simulator has received so far (`{"unit","fc","address","values"}`).
    pub fn writes(&self) -> Vec<Value> {
        self.peer.json_lines()
    }

    /// Waits until a write to `address` of `unit` has arrived; returns its values.
    pub fn wait_write(&self, unit: u64, address: u64) -> Vec<u64> {
        self.wait_nth_write(unit, address, 1)
    }

    /// Waits until `n` writes to `address` of `unit` have arrived (the simulator logs a write
    /// just after answering it, so the last of several quick writes can lag); returns the
    /// values of the latest.
    pub fn wait_nth_write(&self, unit: u64, address: u64, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let to_address: Vec<_> = self
                .writes()
                .into_iter()
                .filter(|w| w["unit"] == unit && w["address"] == address)
                .collect();
            if let Some(w) = to_address.last().filter(|_| to_address.len() >= n) {
                return w["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "no write to unit {unit} address {address}; writes: {:?}",
                self.writes()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the simulator (SIGKILL).
    pub fn stop(&mut self) {
        self.peer.stop();
    }
}

/// A model property line and the matching device property (name, model type, access mode,
/// `visitors.modbus` flow mapping).
pub struct Prop<'a> {
    pub name: &'a str,
    pub ty: &'a str,
    pub access: &'a str,
    pub visitor: String,
}

pub fn prop<'a>(name: &'a str, ty: &'a str, visitor: &str) -> Prop<'a> {
    Prop {
        name,
        ty,
        access: "ReadOnly",
        visitor: visitor.to_string(),
    }
}

pub fn rw<'a>(name: &'a str, ty: &'a str, visitor: &str) -> Prop<'a> {
    Prop {
        name,
        ty,
        access: "ReadWrite",
        visitor: visitor.to_string(),
    }
}

/// Profile YAML with one model `{model}` and one device `{device}` using `protocol` (the flow
/// mapping under `protocol.modbus`), each property read every `cycle`.
pub fn profile_yaml(
    model: &str,
    device: &str,
    protocol: &str,
    cycle: &str,
    props: &[Prop<'_>],
) -> String {
    let mut y = format!(
        "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: {model}}}\nspec:\n  protocol: modbus\n  properties:\n"
    );
    for p in props {
        y.push_str(&format!(
            "    - {{name: {}, type: {}, accessMode: {}}}\n",
            p.name, p.ty, p.access
        ));
    }
    y.push_str("---\n");
    y.push_str(&device_yaml(model, device, protocol, cycle, props));
    y
}

/// Only the `kind: Device` document.
pub fn device_yaml(
    model: &str,
    device: &str,
    protocol: &str,
    cycle: &str,
    props: &[Prop<'_>],
) -> String {
    let mut y = format!(
        "apiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: {device}}}\nspec:\n  deviceModelRef: {model}\n  protocol:\n    modbus: {protocol}\n  properties:\n"
    );
    for p in props {
        y.push_str(&format!(
            "    - name: {}\n      collectCycle: {cycle}\n      visitors:\n        modbus: {}\n",
            p.name, p.visitor
        ));
    }
    y
}

/// The resolved device of a profile, through the real loader and validation.
pub fn resolve(yaml: &str, device: &str) -> ResolvedDevice {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (set, errors) = edgetwin_profile::load_dir(dir.path());
    assert!(errors.is_empty(), "profile errors: {errors:?}\n{yaml}");
    let id = edgetwin_contract::DeviceId::new(device).unwrap();
    set.resolve(&id).unwrap()
}

/// `{communicateMode: TCP, ...}` for the simulator on `port`.
pub fn tcp(port: u16, slave: u8) -> String {
    format!(
        "{{communicateMode: TCP, ip: 127.0.0.1, port: {port}, slaveID: {slave}, timeout: 500ms}}"
    )
}

/// `{communicateMode: RTU, ...}` on `path`.
pub fn rtu(path: &Path, slave: u8) -> String {
    format!(
        "{{communicateMode: RTU, serialName: {}, baudRate: 115200, slaveID: {slave}, timeout: 500ms}}",
        path.display()
    )
}

pub fn path(s: &str) -> PathBuf {
    PathBuf::from(s)
}
