//! The one trait a protocol implements. The runtime owns MQTT, scheduling, reporting, status and
//! reconnects; a driver only talks to hardware.
//!
//! Results have two layers, the way tokio-modbus has them: the outer `Result` is the link
//! ([`LinkLost`]: the runtime marks the device offline and reconnects with backoff), the inner one
//! is per property ([`Refusal`]: the device answered and refused, or the profile cannot work;
//! the property carries a lasting error in the twin while the device stays online and the other
//! properties go on). A [`Reading`] says whether it was taken by this call or is a value the
//! driver kept from the device's last push, with its time: the runtime never reports a kept
//! value as new.

use std::future::Future;

use edgetwin_contract::TimestampMs;
use edgetwin_profile::{DeviceProperty, ResolvedDevice};
use serde_json::Value;
use tokio::sync::mpsc;

/// What went wrong opening a connection to a device.
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

/// The link to the device broke during a read or write (the outer layer of a result).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("link: {0}")]
pub struct LinkLost(pub String);

/// Why one property could not be read or written while the link works (the inner layer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The device answered with a refusal (Modbus exception, OPC UA bad status, garbled line).
    #[error("device refused: {0}")]
    Device(String),
    /// The property's configuration cannot work (wrong visitor, a value the register cannot
    /// hold).
    #[error("configuration: {0}")]
    Config(String),
}

/// A value from the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The value, as the twin reports it.
    pub value: Value,
    /// `None`: read from the device by this call (fresh). `Some(ts)`: the value the device
    /// last pushed, kept by the driver since `ts` (ms); it is reported once, with that `ts`.
    pub kept_since: Option<TimestampMs>,
}

impl Reading {
    /// A value read from the device just now.
    pub fn fresh(value: Value) -> Reading {
        Reading {
            value,
            kept_since: None,
        }
    }

    /// A value the device pushed at `ts` and the driver kept.
    pub fn kept(value: Value, ts: TimestampMs) -> Reading {
        Reading {
            value,
            kept_since: Some(ts),
        }
    }
}

/// What a discovery scan found.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// A draft profile of it (edgetwin YAML), for the engineer to edit and apply.
    pub profile: String,
    /// A line per device found, in words.
    pub found: Vec<String>,
}

/// One property's result inside a working link.
pub type PropertyResult<T> = Result<T, Refusal>;

/// What [`Driver::read`] returns: one result per property, in the order asked, or the link's
/// failure.
pub type ReadResult = Result<Vec<PropertyResult<Reading>>, LinkLost>;

/// How many pushed values may wait for the runtime per connection.
pub const PUSH_QUEUE: usize = 256;

/// A value the device pushed (OPC UA data change, BLE notification, unsolicited serial line),
/// sent by the driver as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// The property (a name of the device's `spec.properties`).
    pub property: String,
    /// The value with the time it arrived (`Reading::kept`), or why it could not be decoded.
    pub reading: PropertyResult<Reading>,
}

/// A protocol driver. One `Driver` value serves every device of its protocol; each device gets
/// its own [`Driver::Conn`].
pub trait Driver: Send + Sync + 'static {
    /// One open connection to one device.
    type Conn: Send + 'static;

    /// The protocol name, as in profiles and topics (`modbus`, `opcua`, `ble`, `serial`, or
    /// any other).
    fn protocol(&self) -> &'static str;

    /// Opens a connection to the device. `Err(Link)` is retried with backoff; `Err(Config)` is
    /// reported and retried only when the device's profile changes.
    fn connect(
        &self,
        device: &ResolvedDevice,
    ) -> impl Future<Output = Result<Self::Conn, DriverError>> + Send;

    /// Reads a set of properties due in the same poll cycle (a driver may coalesce them into
    /// fewer requests). The result has exactly one entry per property of `props`, in that
    /// order (the runtime treats a missing one as a configuration refusal).
    fn read(
        &self,
        conn: &mut Self::Conn,
        device: &ResolvedDevice,
        props: &[&DeviceProperty],
    ) -> impl Future<Output = ReadResult> + Send;

    /// Writes one desired value (already checked against the model by the node). A value the
    /// property cannot hold exactly (a scaled register's resolution, a float32) is refused
    /// ([`Refusal::Config`]) without writing.
    fn write(
        &self,
        conn: &mut Self::Conn,
        device: &ResolvedDevice,
        prop: &DeviceProperty,
        value: &Value,
    ) -> impl Future<Output = Result<PropertyResult<()>, LinkLost>> + Send;

    /// Closes the connection (on removal, profile change or shutdown).
    fn disconnect(&self, conn: Self::Conn) -> impl Future<Output = ()> + Send;

    /// Optional: the values this connection pushes, as they arrive; asked once after
    /// [`Driver::connect`]. The default `None` means the device is only polled. The channel is
    /// bounded ([`PUSH_QUEUE`]): a driver drops what does not fit with `try_send` and keeps the
    /// newest value for the next [`Driver::read`]. Its end (every sender dropped) means the link
    /// is gone.
    fn pushed(&self, conn: &mut Self::Conn) -> Option<mpsc::Receiver<Pushed>> {
        let _ = conn;
        None
    }

    /// Optional: a commissioning scan (`edgetwin discover <protocol>`): `target` says what to
    /// scan in the protocol's terms; the answer is a draft profile (YAML) and a line per thing
    /// found. It runs beside the device tasks (on a serial line the driver already holds, it
    /// shares it). The default says this mapper cannot discover.
    fn discover(&self, target: &Value) -> impl Future<Output = Result<Discovered, String>> + Send {
        let _ = target;
        async {
            Err(format!(
                "the {} mapper cannot discover devices",
                self.protocol()
            ))
        }
    }

    /// Optional: how many protocol requests this connection has sent so far (cumulative), so the
    /// `requests` metric shows the effect of coalescing. The default `None` means "not counted":
    /// the runtime then counts one request per `read`/`write` call.
    fn requests_made(&self, conn: &Self::Conn) -> Option<u64> {
        let _ = conn;
        None
    }
}

impl DriverError {
    /// This error as one property's refusal (a link error too: for a pushed value that could
    /// not be decoded, the link itself is known to work).
    pub fn refusal(self) -> Refusal {
        match self {
            DriverError::Link(m) | DriverError::Device(m) => Refusal::Device(m),
            DriverError::Config(m) => Refusal::Config(m),
        }
    }

    /// The two layers of a read or write result: a link failure outside, a refusal inside.
    pub fn split(self) -> Result<Refusal, LinkLost> {
        match self {
            DriverError::Link(m) => Err(LinkLost(m)),
            DriverError::Device(m) => Ok(Refusal::Device(m)),
            DriverError::Config(m) => Ok(Refusal::Config(m)),
        }
    }
}

/// Builds a [`ReadResult`] from per-property results in order, for drivers whose internals speak
/// [`DriverError`]: the first link error fails the whole read.
pub fn ordered(results: Vec<Result<Reading, DriverError>>) -> ReadResult {
    results
        .into_iter()
        .map(|r| match r {
            Ok(v) => Ok(Ok(v)),
            Err(e) => e.split().map(Err),
        })
        .collect()
}

/// [`ordered`] for a driver whose read can also fail as a whole: a link error fails the read;
/// any other error is every one of the `n` properties' refusal.
pub fn read_result(
    n: usize,
    r: Result<Vec<Result<Reading, DriverError>>, DriverError>,
) -> ReadResult {
    match r {
        Ok(values) => ordered(values),
        Err(e) => match e.split() {
            Err(link) => Err(link),
            Ok(refusal) => Ok(vec![Err(refusal); n]),
        },
    }
}

impl From<Refusal> for DriverError {
    fn from(r: Refusal) -> DriverError {
        match r {
            Refusal::Device(m) => DriverError::Device(m),
            Refusal::Config(m) => DriverError::Config(m),
        }
    }
}

impl From<LinkLost> for DriverError {
    fn from(l: LinkLost) -> DriverError {
        DriverError::Link(l.0)
    }
}

/// Results with one error type, for tests and tools that look at values by name and do not
/// care whether an error was the link's or one property's.
pub mod flat {
    use super::{DriverError, LinkLost, PropertyResult, ReadResult};
    use edgetwin_profile::DeviceProperty;
    use serde_json::Value;

    /// Values (or errors) by property name, in the order asked.
    pub type Named = Vec<(String, Result<Value, DriverError>)>;

    /// A read's result by property name.
    pub fn reads(props: &[&DeviceProperty], r: ReadResult) -> Result<Named, DriverError> {
        let list = r?;
        Ok(props
            .iter()
            .zip(list)
            .map(|(p, r)| {
                (
                    p.name.as_str().to_string(),
                    r.map(|reading| reading.value).map_err(DriverError::from),
                )
            })
            .collect())
    }

    /// A write's result.
    pub fn write(r: Result<PropertyResult<()>, LinkLost>) -> Result<(), DriverError> {
        Ok(r??)
    }
}

/// Builds a write result from a [`DriverError`]-speaking driver's outcome.
pub fn written(r: Result<(), DriverError>) -> Result<PropertyResult<()>, LinkLost> {
    match r {
        Ok(()) => Ok(Ok(())),
        Err(e) => e.split().map(Err),
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
