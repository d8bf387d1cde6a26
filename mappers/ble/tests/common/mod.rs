//! Shared test helpers: a simulated BLE peripheral behind the mapper's `Transport` trait (the test
//! double for hardware that does not exist on these machines) and profiles resolved through the
//! real loader.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgetwin_mapper_ble::codec::parse_uuid;
use edgetwin_mapper_ble::transport::{
    CharAddr, Notification, Peripheral, Target, Transport, TransportError,
};
use edgetwin_profile::ResolvedDevice;
use futures::channel::mpsc;
use futures::stream::{BoxStream, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/profiles/ble-sensor.yaml"
);

pub fn uuid(s: &str) -> Uuid {
    parse_uuid(s).unwrap()
}

#[derive(Default)]
struct State {
    address: String,
    name: String,
    present: bool,
    /// Values by (service, characteristic).
    values: HashMap<(Uuid, Uuid), Vec<u8>>,
    subscribed: HashSet<Uuid>,
    writes: Vec<(Uuid, Vec<u8>)>,
    reads: u64,
    connects: u64,
    listeners: Vec<mpsc::UnboundedSender<Notification>>,
    link: Option<CancellationToken>,
}

/// One simulated peripheral; clones share it (the test keeps one to drive it).
#[derive(Clone)]
pub struct SimPeripheral {
    state: Arc<Mutex<State>>,
    gone: CancellationToken,
}

impl SimPeripheral {
    /// The Environmental Sensing sensor of examples/profiles/ble-sensor.yaml: 21.5 °C, 49.22 %,
    /// battery 95 %, plus a writable vendor characteristic (int16, 0.01) and an SFLOAT one.
    pub fn ess_sensor(address: &str, name: &str) -> SimPeripheral {
        let s = SimPeripheral {
            state: Arc::new(Mutex::new(State {
                address: address.into(),
                name: name.into(),
                present: true,
                ..State::default()
            })),
            gone: CancellationToken::new(),
        };
        s.set("181A", "2A6E", &[0x66, 0x08]);
        s.set("181A", "2A6F", &[0x3A, 0x13]);
        s.set("180F", "2A19", &[0x5F]);
        s.set(
            "181A",
            "0000ff01-0000-1000-8000-00805f9b34fb",
            &[0x34, 0x08],
        );
        s.set(
            "181A",
            "0000ff02-0000-1000-8000-00805f9b34fb",
            &[0x6D, 0xF1],
        );
        s
    }

    /// Sets a characteristic's value without notifying.
    pub fn set(&self, service: &str, ch: &str, value: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .values
            .insert((uuid(service), uuid(ch)), value.to_vec());
    }

    /// Sets a characteristic's value and notifies subscribers (if it is subscribed).
    pub fn notify(&self, service: &str, ch: &str, value: &[u8]) {
        self.set(service, ch, value);
        let mut st = self.state.lock().unwrap();
        if !st.subscribed.contains(&uuid(ch)) {
            return;
        }
        let n = Notification {
            service: uuid(service),
            characteristic: uuid(ch),
            value: value.to_vec(),
        };
        st.listeners.retain(|l| l.unbounded_send(n.clone()).is_ok());
    }

    /// The peripheral goes away (out of range, battery out): the link drops, scans miss it.
    pub fn vanish(&self) {
        let mut st = self.state.lock().unwrap();
        st.present = false;
        st.listeners.clear();
        st.subscribed.clear();
        if let Some(t) = st.link.take() {
            t.cancel();
        }
    }

    /// The peripheral advertises again.
    pub fn reappear(&self) {
        self.state.lock().unwrap().present = true;
    }

    /// Writes received so far: (characteristic, bytes).
    pub fn writes(&self) -> Vec<(Uuid, Vec<u8>)> {
        self.state.lock().unwrap().writes.clone()
    }

    /// Characteristic reads served so far.
    pub fn reads(&self) -> u64 {
        self.state.lock().unwrap().reads
    }

    /// Connections made so far.
    pub fn connects(&self) -> u64 {
        self.state.lock().unwrap().connects
    }

    /// Whether notifications of `ch` are on.
    pub fn is_subscribed(&self, ch: &str) -> bool {
        self.state.lock().unwrap().subscribed.contains(&uuid(ch))
    }

    fn check(&self) -> Result<(), TransportError> {
        if self.gone.is_cancelled() || !self.state.lock().unwrap().present {
            return Err(TransportError::Link("sim: peripheral gone".into()));
        }
        Ok(())
    }

    fn key(&self, ch: &CharAddr) -> Result<(Uuid, Uuid), TransportError> {
        let st = self.state.lock().unwrap();
        st.values
            .keys()
            .find(|(s, c)| ch.matches(*s, *c))
            .copied()
            .ok_or_else(|| TransportError::NoSuchCharacteristic(format!("sim: no {ch}")))
    }
}

impl Peripheral for SimPeripheral {
    async fn connect(&self) -> Result<(), TransportError> {
        self.check()?;
        let mut st = self.state.lock().unwrap();
        st.connects += 1;
        st.link = Some(self.gone.clone());
        Ok(())
    }

    async fn read(&self, ch: &CharAddr) -> Result<Vec<u8>, TransportError> {
        self.check()?;
        let k = self.key(ch)?;
        let mut st = self.state.lock().unwrap();
        st.reads += 1;
        Ok(st.values[&k].clone())
    }

    async fn write(&self, ch: &CharAddr, value: &[u8]) -> Result<(), TransportError> {
        self.check()?;
        let k = self.key(ch)?;
        let mut st = self.state.lock().unwrap();
        st.writes.push((k.1, value.to_vec()));
        st.values.insert(k, value.to_vec());
        Ok(())
    }

    async fn subscribe(&self, ch: &CharAddr) -> Result<(), TransportError> {
        self.check()?;
        let k = self.key(ch)?;
        self.state.lock().unwrap().subscribed.insert(k.1);
        Ok(())
    }

    async fn notifications(&self) -> Result<BoxStream<'static, Notification>, TransportError> {
        self.check()?;
        let (tx, rx) = mpsc::unbounded();
        self.state.lock().unwrap().listeners.push(tx);
        Ok(rx.boxed())
    }

    fn disconnected(&self) -> CancellationToken {
        self.gone.clone()
    }

    async fn disconnect(&self) {
        self.gone.cancel();
    }
}

/// A transport that sees one simulated peripheral.
pub struct SimTransport {
    pub device: SimPeripheral,
}

impl Transport for SimTransport {
    type Peripheral = SimPeripheral;

    async fn find(
        &self,
        target: &Target,
        _timeout: Duration,
    ) -> Result<SimPeripheral, TransportError> {
        let st = self.device.state.lock().unwrap();
        let hit = st.present
            && match target {
                Target::Address(a) => a.eq_ignore_ascii_case(&st.address),
                Target::Name(n) => n == &st.name,
            };
        if !hit {
            return Err(TransportError::NotFound(format!(
                "BLE: peripheral {target} not found"
            )));
        }
        // Every connection gets its own disconnect signal.
        Ok(SimPeripheral {
            state: self.device.state.clone(),
            gone: CancellationToken::new(),
        })
    }
}

/// The example profile, unchanged.
pub fn example_profile() -> String {
    std::fs::read_to_string(EXAMPLE).unwrap()
}

/// A profile for the simulated sensor found by `name`, with a writable vendor setpoint (int16,
/// 0.01) and an SFLOAT reading, every property read every 300 ms.
pub fn lab_profile(name: &str) -> String {
    format!(
        r#"apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {{name: ess-lab}}
spec:
  protocol: ble
  properties:
    - {{name: temperature, type: float, accessMode: ReadOnly}}
    - {{name: battery, type: int, accessMode: ReadOnly}}
    - {{name: setpoint, type: float, accessMode: ReadWrite}}
    - {{name: body, type: float, accessMode: ReadOnly}}
    - {{name: missing, type: int, accessMode: ReadOnly}}
---
apiVersion: edgetwin/v1
kind: Device
metadata: {{name: ess-lab-1}}
spec:
  deviceModelRef: ess-lab
  protocol:
    ble: {{name: "{name}"}}
  properties:
    - name: temperature
      collectCycle: 300ms
      visitors:
        ble: {{serviceUUID: "181A", characteristicUUID: "2A6E", dataType: int16, scale: 0.01, notify: true}}
    - name: battery
      collectCycle: 300ms
      visitors:
        ble: {{characteristicUUID: "2A19", dataType: uint8}}
    - name: setpoint
      collectCycle: 300ms
      visitors:
        ble: {{characteristicUUID: "0000ff01-0000-1000-8000-00805f9b34fb", dataType: int16, scale: 0.01}}
    - name: body
      collectCycle: 300ms
      visitors:
        ble: {{characteristicUUID: "0000ff02-0000-1000-8000-00805f9b34fb", dataType: sfloat}}
    - name: missing
      collectCycle: 300ms
      visitors:
        ble: {{characteristicUUID: "2A1A", dataType: uint8}}
"#
    )
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
