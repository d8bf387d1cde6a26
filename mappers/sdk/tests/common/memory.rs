//! The SDK's own test double for the transport: a [`Driver`] over simulated in-memory devices.
//!
//! It serves the `serial` protocol (the profile loader knows only modbus/opcua/ble/serial). A
//! device is keyed by its serial `port`; a property's initial value is its serial visitor's
//! `request` text parsed as JSON (`request: "21.5"`), so a profile alone describes the simulated
//! device. Tests flip `online`, change values and refuse properties through [`Sim`].
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use edgetwin_mapper_sdk::{
    ordered, written, Driver, DriverError, LinkLost, PropertyResult, ReadResult, Reading,
};
use edgetwin_profile::{DeviceProperty, PropertyVisitor, ProtocolConfig, ResolvedDevice};
use serde_json::Value;

/// One simulated device.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// Whether it answers at all (false = link errors).
    pub online: bool,
    /// Current values by property.
    pub values: BTreeMap<String, Value>,
    /// Properties the device refuses (like a Modbus exception).
    pub refused: BTreeSet<String>,
    /// `read` calls answered.
    pub reads: u64,
    /// Successful connects.
    pub connects: u64,
    /// Every value written, in order.
    pub writes: Vec<Value>,
    /// Properties the device holds at most this value of (it takes a larger write, but clamps).
    pub clamp: BTreeMap<String, f64>,
    /// Properties whose value the device pushed at this time (ms): read as a kept value, as a
    /// driver that caches what the device sends.
    pub kept_since: BTreeMap<String, i64>,
}

/// Every simulated device, by port; shared between the driver and the test.
#[derive(Debug, Clone, Default)]
pub struct Sim(Arc<Mutex<HashMap<String, SimDevice>>>);

impl Sim {
    /// Runs `f` on the device at `port` (created empty and online when missing).
    pub fn with<T>(&self, port: &str, f: impl FnOnce(&mut SimDevice) -> T) -> T {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let dev = map.entry(port.to_owned()).or_insert_with(|| SimDevice {
            online: true,
            values: BTreeMap::new(),
            refused: BTreeSet::new(),
            reads: 0,
            connects: 0,
            writes: Vec::new(),
            clamp: BTreeMap::new(),
            kept_since: BTreeMap::new(),
        });
        f(dev)
    }
}

/// The driver over [`Sim`].
#[derive(Debug, Clone, Default)]
pub struct MemoryDriver {
    /// The simulated devices.
    pub sim: Sim,
}

fn port_of(device: &ResolvedDevice) -> Result<String, DriverError> {
    match &device.device.spec.protocol {
        ProtocolConfig::Serial(s) => Ok(s.port.clone()),
        other => Err(DriverError::Config(format!(
            "memory driver needs a serial section, got {}",
            other.name()
        ))),
    }
}

fn initial(prop: &DeviceProperty) -> Option<Value> {
    match &prop.visitors {
        PropertyVisitor::Serial(v) => v
            .request
            .as_deref()
            .and_then(|r| serde_json::from_str(r.trim()).ok()),
        _ => None,
    }
}

impl Driver for MemoryDriver {
    type Conn = String;

    fn protocol(&self) -> &'static str {
        "serial"
    }

    async fn connect(&self, device: &ResolvedDevice) -> Result<String, DriverError> {
        let port = port_of(device)?;
        self.sim.with(&port, |d| {
            for p in &device.device.spec.properties {
                if let Some(v) = initial(p) {
                    d.values.entry(p.name.as_str().to_owned()).or_insert(v);
                }
            }
            if !d.online {
                return Err(DriverError::Link(format!("{port}: no answer")));
            }
            d.connects += 1;
            Ok(port.clone())
        })
    }

    async fn read(
        &self,
        conn: &mut String,
        _device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> ReadResult {
        self.sim.with(conn, |d| {
            if !d.online {
                return Err(LinkLost(format!("{conn}: timed out")));
            }
            d.reads += 1;
            ordered(
                props
                    .iter()
                    .map(|p| {
                        let name = p.name.as_str();
                        if d.refused.contains(name) {
                            return Err(DriverError::Device(
                                "exception 0x02: illegal data address".into(),
                            ));
                        }
                        let v = d
                            .values
                            .get(name)
                            .cloned()
                            .ok_or_else(|| DriverError::Device("no such register".into()))?;
                        Ok(match d.kept_since.get(name) {
                            Some(ts) => Reading::kept(v, *ts),
                            None => Reading::fresh(v),
                        })
                    })
                    .collect(),
            )
        })
    }

    async fn write(
        &self,
        conn: &mut String,
        _device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<PropertyResult<()>, LinkLost> {
        written(self.sim.with(conn, |d| {
            if !d.online {
                return Err(DriverError::Link(format!("{conn}: timed out")));
            }
            let name = prop.name.as_str();
            if d.refused.contains(name) {
                return Err(DriverError::Device(
                    "exception 0x03: illegal data value".into(),
                ));
            }
            d.writes.push(value.clone());
            let held = match (d.clamp.get(name), value.as_f64()) {
                (Some(max), Some(x)) if x > *max => Value::from(*max),
                _ => value.clone(),
            };
            d.values.insert(name.to_owned(), held);
            Ok(())
        }))
    }

    async fn disconnect(&self, _conn: String) {}
}
