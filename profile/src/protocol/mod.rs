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

use edgetwin_contract::ProtocolName;
use schemars::JsonSchema;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

pub use ble::{BleDataType, BleDevice, BleVisitor, Endianness};
pub use modbus::{CommunicateMode, ModbusDataType, ModbusDevice, ModbusVisitor, RegisterType};
pub use opcua::{OpcuaDevice, OpcuaVisitor, SecurityMode, SecurityPolicy};
pub use serial::{SerialDevice, SerialVisitor};

/// The protocols this crate knows the sections of (typed and validated); a device may name any
/// other protocol, whose section is passed to its mapper as JSON ([`OtherSection`]).
pub const KNOWN_PROTOCOLS: [&str; 4] = ["modbus", "opcua", "ble", "serial"];

/// The section of a protocol this crate does not know (`spec.protocol.<name>`, or a property's
/// `visitors.<name>`): kept as the JSON object written, for the protocol's own mapper to read.
#[derive(Debug, Clone, PartialEq)]
pub struct OtherSection {
    /// The protocol's name (the section's key).
    pub protocol: ProtocolName,
    /// Its settings, as written (a mapping).
    pub config: serde_json::Value,
}

/// A device's connection settings: exactly one protocol section.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolConfig {
    /// Modbus TCP or RTU.
    Modbus(ModbusDevice),
    /// OPC UA client connection.
    Opcua(OpcuaDevice),
    /// Bluetooth Low Energy GATT peripheral.
    Ble(BleDevice),
    /// Line-oriented serial (RS-232/RS-485) device.
    Serial(SerialDevice),
    /// Any other protocol, served by its own mapper.
    Other(OtherSection),
}

impl ProtocolConfig {
    /// The protocol name (`modbus`, `opcua`, `ble`, `serial`, or another protocol's).
    pub fn name(&self) -> &str {
        match self {
            ProtocolConfig::Modbus(_) => "modbus",
            ProtocolConfig::Opcua(_) => "opcua",
            ProtocolConfig::Ble(_) => "ble",
            ProtocolConfig::Serial(_) => "serial",
            ProtocolConfig::Other(o) => o.protocol.as_str(),
        }
    }
}

/// How a mapper reaches one property on the device: exactly one protocol's visitor.
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyVisitor {
    /// A Modbus register range.
    Modbus(ModbusVisitor),
    /// An OPC UA node.
    Opcua(OpcuaVisitor),
    /// A BLE GATT characteristic.
    Ble(BleVisitor),
    /// A serial request/response or unsolicited line pattern.
    Serial(SerialVisitor),
    /// Any other protocol's visitor, passed to its mapper as JSON.
    Other(OtherSection),
}

impl PropertyVisitor {
    /// The protocol name this visitor is for.
    pub fn protocol(&self) -> &str {
        match self {
            PropertyVisitor::Modbus(_) => "modbus",
            PropertyVisitor::Opcua(_) => "opcua",
            PropertyVisitor::Ble(_) => "ble",
            PropertyVisitor::Serial(_) => "serial",
            PropertyVisitor::Other(o) => o.protocol.as_str(),
        }
    }

    /// Whether the device pushes this value instead of being polled: a BLE `notify`
    /// characteristic, an OPC UA node read by subscription (not `poll`), an unsolicited serial
    /// line. Another protocol's value counts as polled (every `collectCycle`).
    pub fn is_pushed(&self) -> bool {
        match self {
            PropertyVisitor::Modbus(_) | PropertyVisitor::Other(_) => false,
            PropertyVisitor::Opcua(v) => !v.poll,
            PropertyVisitor::Ble(v) => v.notify,
            PropertyVisitor::Serial(v) => v.unsolicited && v.request.is_none(),
        }
    }
}

/// YAML (serde_norway) writes enums as `!tags`; profiles write a one-entry mapping
/// (`modbus: {...}`) as KubeEdge does, so both enums read and write exactly that. A key that is
/// not a known protocol is another protocol's section, kept as JSON.
macro_rules! one_entry_enum {
    ($name:ident, $what:literal, $other_doc:literal, [$($key:literal => $variant:ident : $ty:ty),+]) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, concat!("a mapping with exactly one ", $what, " (", $other_doc, ")"))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let Some(key) = map.next_key::<String>()? else {
                            return Err(de::Error::custom(format!(
                                concat!("expected one ", $what, ", e.g. {}"),
                                KNOWN_PROTOCOLS.join(", ")
                            )));
                        };
                        let value = match key.as_str() {
                            $($key => $name::$variant(map.next_value()?),)+
                            other => {
                                let protocol = ProtocolName::new(other).map_err(|e| {
                                    de::Error::custom(format!(
                                        concat!("`{}` cannot name a protocol ({}); a ", $what, " is keyed by its protocol, e.g. {}"),
                                        other, e, KNOWN_PROTOCOLS.join(", ")
                                    ))
                                })?;
                                let config = match map.next_value::<serde_json::Value>()? {
                                    serde_json::Value::Null => serde_json::Value::Object(Default::default()),
                                    v @ serde_json::Value::Object(_) => v,
                                    _ => {
                                        return Err(de::Error::custom(format!(
                                            concat!("the ", $what, " of protocol `{}` must be a mapping"),
                                            other
                                        )))
                                    }
                                };
                                $name::Other(OtherSection { protocol, config })
                            }
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

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                match self {
                    $($name::$variant(v) => m.serialize_entry($key, v)?,)+
                    $name::Other(o) => m.serialize_entry(o.protocol.as_str(), &o.config)?,
                }
                m.end()
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let mut props = serde_json::Map::new();
                $(props.insert($key.into(), g.subschema_for::<$ty>().to_value());)+
                schemars::json_schema!({
                    "description": concat!("Exactly one ", $what, ", keyed by its protocol: ", $other_doc, "."),
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "properties": props,
                    "additionalProperties": {
                        "type": "object",
                        "description": "Another protocol's settings, passed to its mapper as JSON."
                    }
                })
            }
        }
    };
}

one_entry_enum!(ProtocolConfig, "protocol section", "modbus, opcua, ble and serial are checked here; any other protocol's section is passed to its mapper as written", ["modbus" => Modbus: ModbusDevice, "opcua" => Opcua: OpcuaDevice, "ble" => Ble: BleDevice, "serial" => Serial: SerialDevice]);
one_entry_enum!(PropertyVisitor, "visitor", "modbus, opcua, ble and serial are checked here; any other protocol's visitor is passed to its mapper as written", ["modbus" => Modbus: ModbusVisitor, "opcua" => Opcua: OpcuaVisitor, "ble" => Ble: BleVisitor, "serial" => Serial: SerialVisitor]);

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
