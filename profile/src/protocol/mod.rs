//! Protocol sections of a device (`spec.protocol.<name>`) and of a device property
//! (`spec.properties[].visitors.<name>`), one submodule per protocol.
//!
//! Each device names exactly one protocol section and each property exactly one visitor, keyed by
//! the protocol name (`modbus`, `opcua`, `ble`, `serial`), as in KubeEdge v1beta1.

pub mod ble;
pub mod modbus;
pub mod opcua;
pub mod serial;

use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

pub use ble::{BleDataType, BleDevice, BleVisitor, Endianness};
pub use modbus::{CommunicateMode, ModbusDataType, ModbusDevice, ModbusVisitor, RegisterType};
pub use opcua::{OpcuaDevice, OpcuaVisitor, SecurityMode, SecurityPolicy};
pub use serial::{SerialDevice, SerialVisitor};

/// The protocols this crate knows the sections of.
pub const KNOWN_PROTOCOLS: [&str; 4] = ["modbus", "opcua", "ble", "serial"];

/// A device's connection settings: exactly one protocol section.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolConfig {
    /// Modbus TCP or RTU.
    Modbus(ModbusDevice),
    /// OPC UA client connection.
    Opcua(OpcuaDevice),
    /// Bluetooth Low Energy GATT peripheral.
    Ble(BleDevice),
    /// Line-oriented serial (RS-232/RS-485) device.
    Serial(SerialDevice),
}

impl ProtocolConfig {
    /// The protocol name (`modbus`, `opcua`, `ble`, `serial`).
    pub fn name(&self) -> &'static str {
        match self {
            ProtocolConfig::Modbus(_) => "modbus",
            ProtocolConfig::Opcua(_) => "opcua",
            ProtocolConfig::Ble(_) => "ble",
            ProtocolConfig::Serial(_) => "serial",
        }
    }
}

/// How a mapper reaches one property on the device: exactly one protocol's visitor.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropertyVisitor {
    /// A Modbus register range.
    Modbus(ModbusVisitor),
    /// An OPC UA node.
    Opcua(OpcuaVisitor),
    /// A BLE GATT characteristic.
    Ble(BleVisitor),
    /// A serial request/response or unsolicited line pattern.
    Serial(SerialVisitor),
}

impl PropertyVisitor {
    /// The protocol name this visitor is for.
    pub fn protocol(&self) -> &'static str {
        match self {
            PropertyVisitor::Modbus(_) => "modbus",
            PropertyVisitor::Opcua(_) => "opcua",
            PropertyVisitor::Ble(_) => "ble",
            PropertyVisitor::Serial(_) => "serial",
        }
    }
    /// Whether the device pushes this value instead of being polled: a BLE `notify`
    /// characteristic, an OPC UA node read by subscription (not `poll`), an unsolicited serial
    /// line.
    pub fn is_pushed(&self) -> bool {
        match self {
            PropertyVisitor::Modbus(_) => false,
            PropertyVisitor::Opcua(v) => !v.poll,
            PropertyVisitor::Ble(v) => v.notify,
            PropertyVisitor::Serial(v) => v.unsolicited && v.request.is_none(),
        }
    }
}

/// YAML (serde_norway) writes enums as `!tags`; profiles write a one-entry mapping
/// (`modbus: {...}`) as KubeEdge does, so both enums deserialize from exactly that.
macro_rules! one_entry_enum {
    ($name:ident, $what:literal, [$($key:literal => $variant:ident),+]) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, concat!("a mapping with exactly one ", $what, ": {}"), KNOWN_PROTOCOLS.join(", "))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let Some(key) = map.next_key::<String>()? else {
                            return Err(de::Error::custom(format!(
                                concat!("expected one ", $what, ": {}"),
                                KNOWN_PROTOCOLS.join(", ")
                            )));
                        };
                        let value = match key.as_str() {
                            $($key => $name::$variant(map.next_value()?),)+
                            other => return Err(de::Error::unknown_variant(other, &KNOWN_PROTOCOLS)),
                        };
                        if let Some(extra) = map.next_key::<String>()? {
                            return Err(de::Error::custom(format!(
                                concat!("only one ", $what, " is allowed, found `{}` besides `{}`"),
                                extra, key
                            )));
                        }
                        Ok(value)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

one_entry_enum!(ProtocolConfig, "protocol section", ["modbus" => Modbus, "opcua" => Opcua, "ble" => Ble, "serial" => Serial]);
one_entry_enum!(PropertyVisitor, "visitor", ["modbus" => Modbus, "opcua" => Opcua, "ble" => Ble, "serial" => Serial]);

/// Serial line parity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

macro_rules! small_int_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal, $default:ident, [$($(#[$vdoc:meta])* $variant:ident = $n:literal),+]) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "u8", into = "u8")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// The number as written in YAML.
            pub fn get(self) -> u8 {
                match self { $($name::$variant => $n,)+ }
            }
        }

        impl Default for $name {
            fn default() -> Self { $name::$default }
        }

        impl TryFrom<u8> for $name {
            type Error = String;
            fn try_from(n: u8) -> Result<Self, String> {
                match n {
                    $($n => Ok($name::$variant),)+
                    other => Err(format!(concat!($what, " must be one of {}, not {}"), [$($n.to_string()),+].join(", "), other)),
                }
            }
        }

        impl From<$name> for u8 {
            fn from(v: $name) -> u8 { v.get() }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.get())
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({"type": "integer", "enum": [$($n),+]})
            }
        }
    };
}

small_int_enum!(
    /// Data bits per character on a serial line (5 to 8).
    DataBits, "dataBits", Eight, [
        /// 5 data bits.
        Five = 5,
        /// 6 data bits.
        Six = 6,
        /// 7 data bits.
        Seven = 7,
        /// 8 data bits.
        Eight = 8
    ]
);

small_int_enum!(
    /// Stop bits on a serial line (1 or 2).
    StopBits, "stopBits", One, [
        /// One stop bit.
        One = 1,
        /// Two stop bits.
        Two = 2
    ]
);

pub(crate) fn default_baud_rate() -> u32 {
    9600
}

pub(crate) fn default_timeout() -> crate::Duration {
    crate::Duration::from_secs(1)
}

pub(crate) fn default_scale() -> f64 {
    1.0
}
