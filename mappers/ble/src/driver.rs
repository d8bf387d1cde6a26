//! [`BleDriver`]: the SDK `Driver` for BLE GATT peripherals over any [`Transport`].
//!
//! * **Connect**: find the peripheral by `macAddress` or `name` (scanning up to the scan
//!   timeout), connect and discover services, start taking its notifications, and subscribe to
//!   every `notify: true` characteristic.
//! * **Read**: a `notify` property's notifications are pushed to the runtime as they arrive
//!   ([`Driver::pushed`]); `read` answers with the latest one as a kept value (before the first
//!   notification, and when subscribing was refused, the characteristic is read); the others are
//!   read every `collectCycle`. Values are decoded with [`codec::decode`].
//! * **Write**: [`codec::encode`] and a characteristic write; a notified value held for that
//!   characteristic is dropped, so the runtime's read-back reads the device.
//! * **Errors**: no adapter, peripheral not found, disconnected (the transport's disconnect
//!   signal), a timed-out or failed operation are [`DriverError::Link`] (the runtime marks the
//!   device offline and reconnects with backoff); a refused operation or a special value such
//!   as NaN from the sensor is [`DriverError::Device`]; a missing characteristic or a value the
//!   profile's decoding cannot hold is [`DriverError::Config`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgetwin_contract::{now_ms, PropertyType, TimestampMs};
use edgetwin_mapper_sdk::{
    read_result, written, Driver, DriverError, LinkLost, PropertyResult, Pushed, ReadResult,
    Reading, PUSH_QUEUE,
};
use edgetwin_profile::protocol::BleVisitor;
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::btle::BtleplugTransport;
use crate::codec::{self, CodecError};
use crate::config;
use crate::transport::{CharAddr, Peripheral, Target, Transport, TransportError};

/// Default time to scan for a peripheral.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on every other peripheral operation.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// The BLE driver over a transport (by default btleplug). One value serves every BLE device.
#[derive(Debug)]
pub struct BleDriver<T: Transport = BtleplugTransport> {
    transport: T,
    scan_timeout: Duration,
    op_timeout: Duration,
}

impl BleDriver<BtleplugTransport> {
    /// The driver on the system's Bluetooth stack (btleplug).
    pub fn new() -> Self {
        BleDriver::with_transport(BtleplugTransport::new())
    }
}

impl Default for BleDriver<BtleplugTransport> {
    fn default() -> Self {
        BleDriver::new()
    }
}

impl<T: Transport> BleDriver<T> {
    /// The driver over `transport` with the default timeouts.
    pub fn with_transport(transport: T) -> Self {
        BleDriver {
            transport,
            scan_timeout: SCAN_TIMEOUT,
            op_timeout: OP_TIMEOUT,
        }
    }

    /// The same driver with other scan and operation timeouts.
    pub fn with_timeouts(mut self, scan: Duration, op: Duration) -> Self {
        self.scan_timeout = scan;
        self.op_timeout = op;
        self
    }

    /// Runs a transport operation within the operation timeout.
    async fn bounded<R>(
        &self,
        what: impl FnOnce() -> String,
        f: impl std::future::Future<Output = Result<R, TransportError>>,
    ) -> Result<R, DriverError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(driver_error),
            Err(_) => Err(DriverError::Link(format!(
                "{}: timed out after {:?}",
                what(),
                self.op_timeout
            ))),
        }
    }
}

/// The SDK error kind of a transport error.
pub fn driver_error(e: TransportError) -> DriverError {
    match e {
        TransportError::Unavailable(m) | TransportError::NotFound(m) | TransportError::Link(m) => {
            DriverError::Link(m)
        }
        TransportError::NoSuchCharacteristic(m) => DriverError::Config(m),
        TransportError::Refused(m) => DriverError::Device(m),
    }
}

/// The SDK error kind of a value that could not be decoded or encoded.
fn codec_error(prop: &str, e: CodecError) -> DriverError {
    match e {
        CodecError::Special(_) => DriverError::Device(format!("property {prop}: {e}")),
        _ => DriverError::Config(format!("property {prop}: {e}")),
    }
}

/// How one property is read.
#[derive(Debug, Clone)]
struct PropSpec {
    visitor: BleVisitor,
    ty: PropertyType,
    ch: CharAddr,
    /// Subscribed: reads answer with the latest notification.
    notified: bool,
}

/// Latest notified values (with when they arrived) by (service, characteristic).
type Latest = Arc<Mutex<HashMap<(Uuid, Uuid), (Vec<u8>, TimestampMs)>>>;

/// A connected peripheral.
#[derive(Debug)]
pub struct BleConn<P: Peripheral> {
    peripheral: P,
    target: Target,
    latest: Latest,
    pump: Option<JoinHandle<()>>,
    gone: CancellationToken,
    props: HashMap<String, Result<PropSpec, DriverError>>,
    /// Notified values as they arrive, until the runtime takes the receiver.
    pushed: Option<mpsc::Receiver<Pushed>>,
    requests: u64,
}

impl<P: Peripheral> BleConn<P> {
    /// Reads, writes and subscriptions sent on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    fn latest(&self, ch: &CharAddr) -> Option<(Vec<u8>, TimestampMs)> {
        let map = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|((s, c), _)| ch.matches(*s, *c))
            .map(|(_, v)| v.clone())
    }

    fn forget(&self, ch: &CharAddr) {
        let mut map = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(s, c), _| !ch.matches(*s, *c));
    }

    fn check_link(&self) -> Result<(), DriverError> {
        if self.gone.is_cancelled() {
            return Err(DriverError::Link(format!(
                "BLE: peripheral {} disconnected",
                self.target
            )));
        }
        Ok(())
    }

    fn spec(&self, name: &str) -> Result<PropSpec, DriverError> {
        match self.props.get(name) {
            Some(r) => r.clone(),
            None => Err(DriverError::Config(format!(
                "property {name} is not in the device profile"
            ))),
        }
    }
}

impl<P: Peripheral> Drop for BleConn<P> {
    fn drop(&mut self) {
        if let Some(p) = &self.pump {
            p.abort();
        }
    }
}

impl<T: Transport> Driver for BleDriver<T> {
    type Conn = BleConn<T::Peripheral>;

    fn protocol(&self) -> &'static str {
        "ble"
    }

    async fn connect(&self, dev: &ResolvedDevice) -> Result<Self::Conn, DriverError> {
        let target = config::target(dev).map_err(|e| DriverError::Config(e.to_string()))?;
        let mut props = HashMap::new();
        for p in &dev.device.spec.properties {
            let spec = config::property(dev, p)
                .map(|(v, ty, ch)| {
                    if let Some(w) = codec::standard_mismatch(ch.characteristic, v) {
                        warn!(device = %dev.id(), property = %p.name, "{w}");
                    }
                    PropSpec {
                        visitor: v.clone(),
                        ty,
                        ch,
                        notified: false,
                    }
                })
                .map_err(|e| DriverError::Config(e.to_string()));
            props.insert(p.name.as_str().to_string(), spec);
        }
        let found = tokio::time::timeout(
            self.scan_timeout + self.op_timeout,
            self.transport.find(&target, self.scan_timeout),
        )
        .await;
        let peripheral = match found {
            Ok(r) => r.map_err(driver_error)?,
            Err(_) => {
                return Err(DriverError::Link(format!(
                    "BLE: finding peripheral {target} timed out"
                )))
            }
        };
        let mut conn = BleConn {
            gone: peripheral.disconnected(),
            peripheral,
            target: target.clone(),
            latest: Arc::default(),
            pump: None,
            props,
            pushed: None,
            requests: 0,
        };
        self.bounded(
            || format!("BLE: connecting to {target}"),
            conn.peripheral.connect(),
        )
        .await?;
        let mut stream = self
            .bounded(
                || format!("BLE: notifications of {target}"),
                conn.peripheral.notifications(),
            )
            .await?;
        let (latest, gone) = (conn.latest.clone(), conn.gone.clone());
        // The notify properties, to push each notification as its property's value.
        let notifying: Vec<(String, PropSpec)> = conn
            .props
            .iter()
            .filter_map(|(n, s)| match s {
                Ok(s) if s.visitor.notify => Some((n.clone(), s.clone())),
                _ => None,
            })
            .collect();
        let (push, pushed) = mpsc::channel(PUSH_QUEUE);
        if !notifying.is_empty() {
            conn.pushed = Some(pushed);
        }
        conn.pump = Some(tokio::spawn(async move {
            while let Some(n) = stream.next().await {
                debug!(characteristic = %n.characteristic, bytes = ?n.value, "notification");
                let at = now_ms();
                for (name, spec) in &notifying {
                    if !spec.ch.matches(n.service, n.characteristic) {
                        continue;
                    }
                    let reading = codec::decode(&spec.visitor, spec.ty, &n.value)
                        .map(|v| Reading::kept(v, at))
                        .map_err(|e| codec_error(name, e).refusal());
                    // A full queue drops the push; `latest` keeps it for the next read.
                    let _ = push.try_send(Pushed {
                        property: name.clone(),
                        reading,
                    });
                }
                latest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((n.service, n.characteristic), (n.value, at));
            }
            // The stream ends with the connection.
            gone.cancel();
        }));
        let names: Vec<String> = conn.props.keys().cloned().collect();
        for name in names {
            let Some(Ok(spec)) = conn.props.get(&name).cloned() else {
                continue;
            };
            if !spec.visitor.notify {
                continue;
            }
            conn.requests += 1;
            let subscribed = self
                .bounded(
                    || format!("BLE: subscribing to {}", spec.ch),
                    conn.peripheral.subscribe(&spec.ch),
                )
                .await;
            match subscribed {
                Ok(()) => {
                    if let Some(Ok(s)) = conn.props.get_mut(&name) {
                        s.notified = true;
                    }
                }
                Err(DriverError::Link(m)) => {
                    conn.peripheral.disconnect().await;
                    return Err(DriverError::Link(m));
                }
                Err(DriverError::Device(m)) => {
                    warn!(device = %dev.id(), property = %name, error = %m, "notifications refused; reading instead");
                }
                Err(e) => {
                    conn.props.insert(name, Err(e));
                }
            }
        }
        info!(device = %dev.id(), peripheral = %target, "BLE peripheral connected");
        Ok(conn)
    }

    async fn read(
        &self,
        conn: &mut Self::Conn,
        dev: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> ReadResult {
        read_result(props.len(), self.read_values(conn, dev, props).await)
    }

    async fn write(
        &self,
        conn: &mut Self::Conn,
        dev: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<PropertyResult<()>, LinkLost> {
        written(self.write_value(conn, dev, prop, value).await)
    }

    fn pushed(&self, conn: &mut Self::Conn) -> Option<mpsc::Receiver<Pushed>> {
        conn.pushed.take()
    }

    async fn disconnect(&self, mut conn: Self::Conn) {
        if let Some(p) = conn.pump.take() {
            p.abort();
        }
        let _ = tokio::time::timeout(self.op_timeout, conn.peripheral.disconnect()).await;
    }

    fn requests_made(&self, conn: &Self::Conn) -> Option<u64> {
        Some(conn.requests)
    }
}

impl<T: Transport> BleDriver<T> {
    /// Every property's value in the order of `props`; `Err` only for the link.
    async fn read_values(
        &self,
        conn: &mut BleConn<T::Peripheral>,
        _dev: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> Result<Vec<Result<Reading, DriverError>>, DriverError> {
        conn.check_link()?;
        let mut out = Vec::with_capacity(props.len());
        for p in props {
            let name = p.name.as_str();
            let spec = match conn.spec(name) {
                Ok(s) => s,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let held = if spec.notified {
                conn.latest(&spec.ch)
            } else {
                None
            };
            let bytes = match held {
                Some((b, at)) => Ok((b, Some(at))),
                None => {
                    conn.requests += 1;
                    self.bounded(
                        || format!("BLE: reading {}", spec.ch),
                        conn.peripheral.read(&spec.ch),
                    )
                    .await
                    .map(|b| (b, None))
                }
            };
            let r = match bytes {
                Err(DriverError::Link(m)) => return Err(DriverError::Link(m)),
                Err(e) => Err(e),
                Ok((b, at)) => codec::decode(&spec.visitor, spec.ty, &b)
                    .map_err(|e| codec_error(name, e))
                    .map(|v| match at {
                        Some(at) => Reading::kept(v, at),
                        None => Reading::fresh(v),
                    }),
            };
            out.push(r);
        }
        // A read that raced the disconnection is not to be trusted.
        conn.check_link()?;
        Ok(out)
    }

    async fn write_value(
        &self,
        conn: &mut BleConn<T::Peripheral>,
        _dev: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> Result<(), DriverError> {
        let name = prop.name.as_str();
        let spec = conn.spec(name)?;
        let bytes =
            codec::encode_exact(&spec.visitor, spec.ty, value).map_err(|e| codec_error(name, e))?;
        conn.check_link()?;
        conn.requests += 1;
        self.bounded(
            || format!("BLE: writing {}", spec.ch),
            conn.peripheral.write(&spec.ch, &bytes),
        )
        .await?;
        conn.forget(&spec.ch);
        Ok(())
    }
}
