//! The BLE transport: what the driver needs from a Bluetooth stack, as a trait, so the driver can
//! be tested against a simulated peripheral (there is no Bluetooth adapter on CI machines).
//!
//! * [`Transport`] finds a peripheral by address or advertised name.
//! * [`Peripheral`] connects (and discovers services), reads and writes characteristics,
//!   subscribes to notifications (delivered as one stream of [`Notification`]s) and gives a
//!   [`CancellationToken`] that is cancelled when the peripheral goes away.
//!
//! [`crate::btle`] implements both on btleplug (BlueZ over D-Bus on Linux).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How to find the peripheral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// By Bluetooth device address (`AA:BB:CC:DD:EE:FF`, compared case-insensitively).
    Address(String),
    /// By advertised local name.
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a}"),
            Target::Name(n) => write!(f, "named {n:?}"),
        }
    }
}

/// One characteristic: its UUID, and its service's when the characteristic UUID is not unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CharAddr {
    /// The service UUID, if given in the profile.
    pub service: Option<Uuid>,
    /// The characteristic UUID.
    pub characteristic: Uuid,
}

impl CharAddr {
    /// Whether a characteristic of `service` with UUID `characteristic` is this one.
    pub fn matches(&self, service: Uuid, characteristic: Uuid) -> bool {
        self.characteristic == characteristic && self.service.is_none_or(|s| s == service)
    }
}

impl fmt::Display for CharAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.service {
            Some(s) => write!(f, "characteristic {} of service {s}", self.characteristic),
            None => write!(f, "characteristic {}", self.characteristic),
        }
    }
}

/// A value the peripheral notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The service of the characteristic.
    pub service: Uuid,
    /// The characteristic.
    pub characteristic: Uuid,
    /// The new value.
    pub value: Vec<u8>,
}

/// What went wrong in the Bluetooth stack. Every message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No usable Bluetooth adapter (no D-Bus, no BlueZ, no controller).
    #[error("{0}")]
    Unavailable(String),
    /// The peripheral was not found (not advertising, out of range).
    #[error("{0}")]
    NotFound(String),
    /// The peripheral has no such characteristic.
    #[error("{0}")]
    NoSuchCharacteristic(String),
    /// The peripheral refused the operation (not permitted, not supported).
    #[error("{0}")]
    Refused(String),
    /// The link failed: disconnected, timed out, stack error.
    #[error("{0}")]
    Link(String),
}

/// A Bluetooth stack that can find peripherals.
pub trait Transport: Send + Sync + 'static {
    /// A found peripheral.
    type Peripheral: Peripheral;

    /// Finds the peripheral `target`, scanning for at most `timeout`.
    fn find(
        &self,
        target: &Target,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Peripheral, TransportError>> + Send;
}

/// One peripheral.
pub trait Peripheral: Send + Sync + 'static {
    /// Connects and discovers its services.
    fn connect(&self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Reads a characteristic's value.
    fn read(&self, ch: &CharAddr) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;

    /// Writes a characteristic's value.
    fn write(
        &self,
        ch: &CharAddr,
        value: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Turns on notifications of a characteristic.
    fn subscribe(&self, ch: &CharAddr) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Every notification of this peripheral from now on.
    fn notifications(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, Notification>, TransportError>> + Send;

    /// Cancelled when the peripheral disconnects.
    fn disconnected(&self) -> CancellationToken;

    /// Disconnects (best effort).
    fn disconnect(&self) -> impl Future<Output = ()> + Send;
}

/// Flattens a message to one line (stack errors may span several).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
