//! Modbus TCP and RTU (`spec.protocol.modbus`, `visitors.modbus`). Field names follow KubeEdge's
//! Modbus mapper (`communicateMode`, `slaveID`, `register`, `offset`, `limit`, `isSwap`,
//! `isRegisterSwap`) and EdgeX's device profiles for value transforms (`scale`, `mask`); EdgeX's
//! value `offset` is called `valueOffset` here because `offset` already is the register address.

use std::net::IpAddr;

use edgetwin_contract::{AccessMode, PropertyType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{default_baud_rate, default_scale, default_timeout, DataBits, Parity, StopBits};
use crate::model::ModelProperty;
use crate::{Duration, Issues};

/// Most registers one Modbus read may return (function codes 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// Most bits one Modbus read may return (function codes 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// How the mapper talks to the Modbus slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CommunicateMode {
    /// Modbus TCP: needs `ip` (and `port`, default 502).
    #[serde(rename = "TCP")]
    Tcp,
    /// Modbus RTU on a serial line: needs `serialName`.
    #[serde(rename = "RTU")]
    Rtu,
}

/// Connection settings of a Modbus device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModbusDevice {
    /// `TCP` or `RTU`.
    pub communicate_mode: CommunicateMode,
    /// TCP only: IP address or host name of the device or gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// TCP only: port. Default 502.
    #[serde(default = "default_port")]
    pub port: u16,
    /// RTU only: serial port path; prefer stable `/dev/serial/by-id/...` paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_name: Option<String>,
    /// RTU only: baud rate. Default 9600.
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    /// RTU only: data bits, 5 to 8. Default 8.
    #[serde(default)]
    pub data_bits: DataBits,
    /// RTU only: `none`, `even` or `odd`. Default `none`.
    #[serde(default)]
    pub parity: Parity,
    /// RTU only: stop bits, 1 or 2. Default 1.
    #[serde(default)]
    pub stop_bits: StopBits,
    /// Slave (unit) id, 1 to 247.
    #[serde(rename = "slaveID")]
    #[schemars(range(min = 1, max = 247))]
    pub slave_id: u8,
    /// How long to wait for a reply before the read counts as failed. Default `1s`.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
}

fn default_port() -> u16 {
    502
}

impl ModbusDevice {
    pub(crate) fn check(&self, out: &mut Issues) {
        match self.communicate_mode {
            CommunicateMode::Tcp => {
                match &self.ip {
                    None => out.push((String::new(), "communicateMode TCP needs `ip`".into())),
                    Some(ip) if !is_host(ip) => out.push((
                        "ip".into(),
                        format!("{ip:?} is neither an IP address nor a host name"),
                    )),
                    Some(_) => {}
                }
                if self.serial_name.is_some() {
                    out.push((
                        "serialName".into(),
                        "`serialName` is for communicateMode RTU, not TCP".into(),
                    ));
                }
                if self.port == 0 {
                    out.push(("port".into(), "port must not be 0".into()));
                }
            }
            CommunicateMode::Rtu => {
                match &self.serial_name {
                    None => out.push((
                        String::new(),
                        "communicateMode RTU needs `serialName`".into(),
                    )),
                    Some(p) if p.trim().is_empty() => {
                        out.push(("serialName".into(), "serialName must not be empty".into()))
                    }
                    Some(_) => {}
                }
                if self.ip.is_some() {
                    out.push((
                        "ip".into(),
                        "`ip` is for communicateMode TCP, not RTU".into(),
                    ));
                }
                if self.baud_rate == 0 {
                    out.push(("baudRate".into(), "baudRate must be greater than 0".into()));
                }
            }
        }
        if !(1..=247).contains(&self.slave_id) {
            out.push((
                "slaveID".into(),
                format!("slaveID must be between 1 and 247, not {}", self.slave_id),
            ));
        }
        if self.timeout.is_zero() {
            out.push(("timeout".into(), "timeout must be greater than 0".into()));
        }
    }
}

pub(crate) fn is_host(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
        || (!s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// The Modbus table a value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RegisterType {
    /// Read/write bits (function codes 1, 5, 15).
    CoilRegister,
    /// Read-only bits (function code 2).
    DiscreteInputRegister,
    /// Read/write 16-bit registers (function codes 3, 6, 16).
    HoldingRegister,
    /// Read-only 16-bit registers (function code 4).
    InputRegister,
}

impl RegisterType {
    /// Whether this table holds single bits rather than 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(
            self,
            RegisterType::CoilRegister | RegisterType::DiscreteInputRegister
        )
    }

    /// Whether the master may write this table.
    pub fn is_writable(self) -> bool {
        matches!(
            self,
            RegisterType::CoilRegister | RegisterType::HoldingRegister
        )
    }
}

/// How the registers of a Modbus value are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModbusDataType {
    /// One bit (coil or discrete input), or a register that is non-zero (after `mask`).
    Bool,
    /// Signed 16-bit, one register.
    Int16,
    /// Unsigned 16-bit, one register.
    Uint16,
    /// Signed 32-bit, two registers.
    Int32,
    /// Unsigned 32-bit, two registers.
    Uint32,
    /// Signed 64-bit, four registers.
    Int64,
    /// Unsigned 64-bit, four registers.
    Uint64,
    /// IEEE 754 single precision, two registers.
    Float32,
    /// IEEE 754 double precision, four registers.
    Float64,
    /// ASCII text, two characters per register, `limit` registers.
    String,
}

impl ModbusDataType {
    /// How many registers (or bits, for `bool` on a bit table) the type occupies; `None` for
    /// `string`, whose length is `limit`.
    pub fn register_count(self) -> Option<u16> {
        match self {
            ModbusDataType::Bool | ModbusDataType::Int16 | ModbusDataType::Uint16 => Some(1),
            ModbusDataType::Int32 | ModbusDataType::Uint32 | ModbusDataType::Float32 => Some(2),
            ModbusDataType::Int64 | ModbusDataType::Uint64 | ModbusDataType::Float64 => Some(4),
            ModbusDataType::String => None,
        }
    }

    /// Whether the type decodes to a number.
    pub fn is_numeric(self) -> bool {
        !matches!(self, ModbusDataType::Bool | ModbusDataType::String)
    }

    /// Whether the type is an integer (so `mask` applies).
    pub fn is_integer(self) -> bool {
        self.is_numeric() && !matches!(self, ModbusDataType::Float32 | ModbusDataType::Float64)
    }

    fn as_str(self) -> &'static str {
        match self {
            ModbusDataType::Bool => "bool",
            ModbusDataType::Int16 => "int16",
            ModbusDataType::Uint16 => "uint16",
            ModbusDataType::Int32 => "int32",
            ModbusDataType::Uint32 => "uint32",
            ModbusDataType::Int64 => "int64",
            ModbusDataType::Uint64 => "uint64",
            ModbusDataType::Float32 => "float32",
            ModbusDataType::Float64 => "float64",
            ModbusDataType::String => "string",
        }
    }
}

/// Where and how one property is read from (and written to) a Modbus device.
///
/// The value is `raw * scale + valueOffset` when read; writes apply the inverse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModbusVisitor {
    /// The register table.
    pub register: RegisterType,
    /// Zero-based address of the first register (or bit) in the table.
    pub offset: u16,
    /// Number of registers (or bits) to read. Default: the width of `dataType` (1 for bool and
    /// 16-bit types, 2 for 32-bit, 4 for 64-bit); required for `string`. At most 125 registers or
    /// 2000 bits. Validated devices (and so resolved devices) always carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u16>,
    /// How the registers are decoded.
    pub data_type: ModbusDataType,
    /// Word order: `true` when the least significant 16-bit register comes first.
    #[serde(default)]
    pub is_register_swap: bool,
    /// Byte order within each register: `true` when the low byte comes first.
    #[serde(default)]
    pub is_swap: bool,
    /// Multiplier applied to the raw number when read (EdgeX `scale`). Default 1.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added to the scaled number when read (EdgeX `offset`). Default 0.
    #[serde(default)]
    pub value_offset: f64,
    /// Bit mask ANDed with the raw integer before scaling (EdgeX `mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<u64>,
}

impl ModbusVisitor {
    /// Number of registers (or bits) to read: `limit`, or the width of `dataType`.
    pub fn register_count(&self) -> u16 {
        self.limit
            .or_else(|| self.data_type.register_count())
            .unwrap_or(1)
    }

    pub(crate) fn check(&self, prop: &ModelProperty, out: &mut Issues) {
        let dt = self.data_type;
        let (max, unit) = if self.register.is_bit() {
            (MAX_BITS, "bits")
        } else {
            (MAX_REGISTERS, "registers")
        };
        if self.register.is_bit() && dt != ModbusDataType::Bool {
            out.push((
                "dataType".into(),
                format!(
                    "{:?} holds single bits, so dataType must be bool, not {}",
                    self.register,
                    dt.as_str()
                ),
            ));
        }
        match (self.limit, dt.register_count()) {
            (None, None) => out.push((
                String::new(),
                "dataType string needs `limit` (registers to read)".into(),
            )),
            (Some(0), _) => out.push(("limit".into(), "limit must be at least 1".into())),
            (Some(l), _) if l > max => out.push((
                "limit".into(),
                format!("limit {l} is more than one Modbus read returns ({max} {unit})"),
            )),
            (Some(l), Some(need))
                if l != need && !(self.register.is_bit() && dt == ModbusDataType::Bool) =>
            {
                out.push((
                    "limit".into(),
                    format!(
                        "dataType {} needs limit {need} (registers), not {l}",
                        dt.as_str()
                    ),
                ))
            }
            (Some(l), Some(_)) if self.register.is_bit() && l != 1 => out.push((
                "limit".into(),
                format!("a bool property reads one bit, so limit must be 1, not {l}"),
            )),
            _ => {}
        }
        if u32::from(self.offset) + u32::from(self.register_count()) > 65536 {
            out.push((
                "offset".into(),
                format!(
                    "offset {} + limit {} runs past the last address 65535",
                    self.offset,
                    self.register_count()
                ),
            ));
        }
        if self.mask.is_some()
            && (self.register.is_bit() || !(dt.is_integer() || dt == ModbusDataType::Bool))
        {
            out.push((
                "mask".into(),
                "mask applies only to integer or bool values read from registers".into(),
            ));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            out.push((
                "scale".into(),
                "scale must be a finite number other than 0".into(),
            ));
        }
        if !self.value_offset.is_finite() {
            out.push((
                "valueOffset".into(),
                "valueOffset must be a finite number".into(),
            ));
        }
        if !dt.is_numeric() {
            if self.scale != 1.0 {
                out.push((
                    "scale".into(),
                    format!(
                        "scale applies only to numbers, not dataType {}",
                        dt.as_str()
                    ),
                ));
            }
            if self.value_offset != 0.0 {
                out.push((
                    "valueOffset".into(),
                    format!(
                        "valueOffset applies only to numbers, not dataType {}",
                        dt.as_str()
                    ),
                ));
            }
        }
        let ok = match prop.ty {
            PropertyType::Boolean => dt == ModbusDataType::Bool,
            // A bit read into an `int` is 0 or 1 (as KubeEdge's Modbus mapper reads coils).
            PropertyType::Int if dt == ModbusDataType::Bool => self.register.is_bit(),
            PropertyType::String => dt == ModbusDataType::String,
            PropertyType::Int | PropertyType::Float => dt.is_numeric(),
            PropertyType::Object => false,
        };
        if !ok {
            out.push((
                "dataType".into(),
                format!(
                    "dataType {} cannot hold the model's {} property {:?}",
                    dt.as_str(),
                    prop.ty,
                    prop.name.as_str()
                ),
            ));
        } else if prop.ty == PropertyType::Int
            && (self.scale.fract() != 0.0 || self.value_offset.fract() != 0.0)
        {
            out.push((
                "scale".into(),
                format!(
                    "a fractional scale or valueOffset gives fractions, but property {:?} is int: declare it float",
                    prop.name.as_str()
                ),
            ));
        }
        if prop.access_mode == AccessMode::ReadWrite && !self.register.is_writable() {
            out.push((
                "register".into(),
                format!(
                    "property {:?} is ReadWrite but {:?} is read-only",
                    prop.name.as_str(),
                    self.register
                ),
            ));
        }
    }
}
