//! The one trait a protocol implements. The runtime owns MQTT, scheduling, reporting, status and
//! reconnects; a driver only talks to hardware.
//!
//! Errors are split the way tokio-modbus splits them: [`DriverError::Link`] means the link is
//! broken (the runtime marks the device offline and reconnects with backoff), while
//! [`DriverError::Device`] means the device answered and refused (reported per property on
//! `dt/{device}/error`; the device stays online and the other properties go on).

use std::future::Future;

use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use serde_json::Value;

/// What went wrong talking to a device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// Connection refused, timed out, closed, I/O error: the device is unreachable.
    #[error("link: {0}")]
    Link(String),
    /// The device answered with a refusal (Modbus exception, OPC UA bad status, ...).
    #[error("device refused: {0}")]
    Device(String),
    /// The device's configuration cannot work (wrong visitor, value that cannot be encoded).
    #[error("configuration: {0}")]
    Config(String),
}

/// The result of reading one property: its value, or why that property could not be read.
pub type PropertyRead = (String, Result<Value, DriverError>);

/// A protocol driver. One `Driver` value serves every device of its protocol; each device gets
/// its own [`Driver::Conn`].
pub trait Driver: Send + Sync + 'static {
    /// One open connection to one device.
    type Conn: Send + 'static;

    /// The protocol name, as in profiles and topics (`modbus`, `opcua`, `ble`, `serial`).
    fn protocol(&self) -> &'static str;

    /// Opens a connection to the device. `Err(Link)` is retried with backoff; `Err(Config)` is
    /// reported and retried only when the device's profile changes.
    fn connect(
        &self,
        device: &ResolvedDevice,
    ) -> impl Future<Output = Result<Self::Conn, DriverError>> + Send;

    /// Reads a set of properties due in the same poll cycle (a driver may coalesce them into
    /// fewer requests). `Err` means the whole link failed; per-property refusals go inside.
    fn read(
        &self,
        conn: &mut Self::Conn,
        device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> impl Future<Output = Result<Vec<PropertyRead>, DriverError>> + Send;

    /// Writes one desired value (already checked against the model by the node).
    fn write(
        &self,
        conn: &mut Self::Conn,
        device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Closes the connection (on removal, profile change or shutdown).
    fn disconnect(&self, conn: Self::Conn) -> impl Future<Output = ()> + Send;

    /// Optional: how many protocol requests this connection has sent so far (cumulative), so the
    /// `requests` metric shows the effect of coalescing. The default `None` means "not counted":
    /// the runtime then counts one request per `read`/`write` call.
    fn requests_made(&self, conn: &Self::Conn) -> Option<u64> {
        let _ = conn;
        None
    }
}

/// A float32 reading as the number to report: the shortest decimal that reads back as the same
/// float32 (`232.1`), not its exact binary value widened to f64 (`232.10000610351562`), which
/// is float noise to anyone reading the twin. A non-finite value stays as it is (drivers refuse
/// those).
pub fn shortest_f32(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    x.to_string().parse().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_float32_reads_as_its_shortest_decimal() {
        assert_eq!(super::shortest_f32(232.1), 232.1);
        assert_eq!(super::shortest_f32(0.1), 0.1);
        assert_eq!(super::shortest_f32(21.75), 21.75);
        assert!(super::shortest_f32(f32::NAN).is_nan());
    }
}
