//! [`BtleplugTransport`]: the real [`Transport`] on btleplug (BlueZ over the system D-Bus on
//! Linux).
//!
//! The adapter is opened on first use and kept; when that fails the error says why in one line,
//! starting "BLE: no Bluetooth adapter available: ", e.g. "cannot reach the system D-Bus" (no
//! `dbus-daemon`, or `DBUS_SYSTEM_BUS_ADDRESS` points nowhere) or "BlueZ (org.bluez) is not
//! running" (D-Bus but no `bluetoothd`), and the next attempt tries again.
//!
//! Peripherals are found by scanning until one with the address or advertised name shows up.
//! Disconnection is watched on the adapter's event stream.

use std::time::Duration;

use btleplug::api::{
    Central, CentralEvent, CharPropFlags, Characteristic, Manager as _, Peripheral as _,
    ScanFilter, WriteType,
};
use btleplug::platform::{Adapter, Manager, Peripheral as BtlePeripheral};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::transport::{
    one_line, CharAddr, Notification, Peripheral, Target, Transport, TransportError,
};

/// Timeout of connect, service discovery and each read or write.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The btleplug transport. One value serves every BLE device of the mapper.
#[derive(Debug, Default)]
pub struct BtleplugTransport {
    adapter: Mutex<Option<Adapter>>,
}

impl BtleplugTransport {
    /// A transport that opens the first Bluetooth adapter on first use.
    pub fn new() -> Self {
        BtleplugTransport::default()
    }

    async fn adapter(&self) -> Result<Adapter, TransportError> {
        let mut slot = self.adapter.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let manager = Manager::new().await.map_err(|e| unavailable(&e))?;
        let adapter = manager
            .adapters()
            .await
            .map_err(|e| unavailable(&e))?
            .into_iter()
            .next()
            .ok_or_else(|| {
                TransportError::Unavailable(
                    "BLE: no Bluetooth adapter available: BlueZ lists no adapter".into(),
                )
            })?;
        let about = adapter.adapter_info().await.unwrap_or_default();
        info!(adapter = %about, "Bluetooth adapter open");
        *slot = Some(adapter.clone());
        Ok(adapter)
    }
}

/// The one-line "no adapter" error for a stack error while opening the adapter.
pub fn unavailable(e: &btleplug::Error) -> TransportError {
    TransportError::Unavailable(unavailable_message(&e.to_string()))
}

/// The one-line "no adapter" message for the text of a stack error.
pub fn unavailable_message(text: &str) -> String {
    let text = one_line(text);
    let why = if text.contains("org.bluez") {
        "BlueZ (org.bluez) is not running: "
    } else if text.contains("system_bus_socket")
        || text.contains("Failed to connect to socket")
        || text.contains("D-Bus")
        || text.contains("DBus")
    {
        "cannot reach the system D-Bus: "
    } else {
        ""
    };
    format!("BLE: no Bluetooth adapter available: {why}{text}")
}

/// The transport error for a failed peripheral operation.
fn op_error(what: &str, e: btleplug::Error) -> TransportError {
    let text = one_line(&format!("{what}: {e}"));
    match e {
        btleplug::Error::PermissionDenied | btleplug::Error::NotSupported(_) => {
            TransportError::Refused(text)
        }
        btleplug::Error::NoSuchCharacteristic => TransportError::NoSuchCharacteristic(text),
        _ if text.contains("NotPermitted")
            || text.contains("NotAuthorized")
            || text.contains("NotSupported") =>
        {
            TransportError::Refused(text)
        }
        _ => TransportError::Link(text),
    }
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = btleplug::Result<T>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| op_error(what, e)),
        Err(_) => Err(TransportError::Link(format!(
            "{what}: timed out after {OP_TIMEOUT:?}"
        ))),
    }
}

async fn is_target(p: &BtlePeripheral, target: &Target) -> bool {
    match target {
        Target::Address(a) => p.address().to_string().eq_ignore_ascii_case(a),
        Target::Name(n) => p
            .properties()
            .await
            .ok()
            .flatten()
            .and_then(|pp| pp.local_name)
            .is_some_and(|l| &l == n),
    }
}

impl Transport for BtleplugTransport {
    type Peripheral = BtleplugPeripheral;

    async fn find(
        &self,
        target: &Target,
        timeout: Duration,
    ) -> Result<BtleplugPeripheral, TransportError> {
        let adapter = match self.adapter().await {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        let scan = adapter.start_scan(ScanFilter::default()).await;
        if let Err(e) = scan {
            // The adapter may be gone (unplugged, bluetoothd restarted): open it again next time.
            *self.adapter.lock().await = None;
            return Err(unavailable(&e));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let found = loop {
            let list = adapter.peripherals().await.unwrap_or_default();
            let mut hit = None;
            for p in list {
                if is_target(&p, target).await {
                    hit = Some(p);
                    break;
                }
            }
            if let Some(p) = hit {
                break Some(p);
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let _ = adapter.stop_scan().await;
        let p = found.ok_or_else(|| {
            TransportError::NotFound(format!(
                "BLE: peripheral {target} not found within {timeout:?} of scanning"
            ))
        })?;
        debug!(peripheral = %p.address(), "peripheral found");
        Ok(BtleplugPeripheral {
            adapter,
            p,
            gone: CancellationToken::new(),
        })
    }
}

/// A peripheral found by [`BtleplugTransport`].
#[derive(Debug)]
pub struct BtleplugPeripheral {
    adapter: Adapter,
    p: BtlePeripheral,
    gone: CancellationToken,
}

impl BtleplugPeripheral {
    fn characteristic(&self, ch: &CharAddr) -> Result<Characteristic, TransportError> {
        self.p
            .characteristics()
            .into_iter()
            .find(|c| ch.matches(c.service_uuid, c.uuid))
            .ok_or_else(|| {
                TransportError::NoSuchCharacteristic(format!(
                    "BLE: peripheral {} has no {ch}",
                    self.p.address()
                ))
            })
    }
}

impl Peripheral for BtleplugPeripheral {
    async fn connect(&self) -> Result<(), TransportError> {
        let label = self.p.address().to_string();
        // Watch for the disconnection before connecting, so none is missed.
        let mut events = self
            .adapter
            .events()
            .await
            .map_err(|e| op_error(&format!("BLE: watching {label}"), e))?;
        let id = self.p.id();
        let gone = self.gone.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = gone.cancelled() => return,
                    ev = events.next() => match ev {
                        Some(CentralEvent::DeviceDisconnected(d)) if d == id => break,
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            gone.cancel();
        });
        timed(&format!("BLE: connecting to {label}"), self.p.connect()).await?;
        timed(
            &format!("BLE: discovering services of {label}"),
            self.p.discover_services(),
        )
        .await
    }

    async fn read(&self, ch: &CharAddr) -> Result<Vec<u8>, TransportError> {
        let c = self.characteristic(ch)?;
        timed(&format!("BLE: reading {ch}"), self.p.read(&c)).await
    }

    async fn write(&self, ch: &CharAddr, value: &[u8]) -> Result<(), TransportError> {
        let c = self.characteristic(ch)?;
        let kind = if c.properties.contains(CharPropFlags::WRITE) {
            WriteType::WithResponse
        } else {
            WriteType::WithoutResponse
        };
        timed(&format!("BLE: writing {ch}"), self.p.write(&c, value, kind)).await
    }

    async fn subscribe(&self, ch: &CharAddr) -> Result<(), TransportError> {
        let c = self.characteristic(ch)?;
        timed(&format!("BLE: subscribing to {ch}"), self.p.subscribe(&c)).await
    }

    async fn notifications(&self) -> Result<BoxStream<'static, Notification>, TransportError> {
        let s = timed("BLE: notifications", self.p.notifications()).await?;
        Ok(s.map(|n| Notification {
            service: n.service_uuid,
            characteristic: n.uuid,
            value: n.value,
        })
        .boxed())
    }

    fn disconnected(&self) -> CancellationToken {
        self.gone.clone()
    }

    async fn disconnect(&self) {
        self.gone.cancel();
        let _ = tokio::time::timeout(OP_TIMEOUT, self.p.disconnect()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::unavailable_message;

    #[test]
    fn btle_missing_system_bus_says_so_in_one_line() {
        let m = unavailable_message(
            "Failed to connect to socket /run/dbus/system_bus_socket: No such file or directory",
        );
        assert_eq!(m, "BLE: no Bluetooth adapter available: cannot reach the system D-Bus: Failed to connect to socket /run/dbus/system_bus_socket: No such file or directory");
    }

    #[test]
    fn btle_missing_bluez_says_so_in_one_line() {
        let m = unavailable_message("The name org.bluez was not provided by any .service files\n");
        assert!(
            m.starts_with(
                "BLE: no Bluetooth adapter available: BlueZ (org.bluez) is not running: "
            ),
            "{m}"
        );
        assert!(!m.contains('\n'));
    }
}
