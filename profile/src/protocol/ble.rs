//! Bluetooth Low Energy GATT peripherals (`spec.protocol.ble`, `visitors.ble`). The device is
//! found by `macAddress` or by advertised `name` (KubeEdge's BLE mapper uses the same two
//! fields); each property is one characteristic, decoded by `dataType`, `endianness`, `scale` and
//! `valueOffset`.

use edgetwin_contract::PropertyType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::ModelProperty;
use crate::Issues;

/// How to find the peripheral: exactly one of `macAddress` and `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BleDevice {
    /// Bluetooth device address, `AA:BB:CC:DD:EE:FF`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// Advertised local name (for peripherals with random addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl BleDevice {
    pub(crate) fn check(&self, out: &mut Issues) {
        match (&self.mac_address, &self.name) {
            (None, None) => out.push((
                String::new(),
                "give `macAddress` or `name` to find the device".into(),
            )),
            (Some(_), Some(_)) => out.push((
                "name".into(),
                "give either `macAddress` or `name`, not both".into(),
            )),
            (Some(mac), None) if !is_mac(mac) => out.push((
                "macAddress".into(),
                format!("{mac:?} is not a Bluetooth address like AA:BB:CC:DD:EE:FF"),
            )),
            (None, Some(n)) if n.is_empty() => {
                out.push(("name".into(), "name must not be empty".into()))
            }
            _ => {}
        }
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Accepts a 16-bit (`2A6E`, `0x2A6E`), 32-bit or 128-bit (`0000181a-0000-1000-8000-00805f9b34fb`) UUID.
pub(crate) fn is_uuid(s: &str) -> bool {
    let short = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if (short.len() == 4 || short.len() == 8) && short.chars().all(|c| c.is_ascii_hexdigit()) {
        return true;
    }
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// How the bytes of a characteristic value are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BleDataType {
    /// Unsigned 8-bit.
    Uint8,
    /// Signed 8-bit.
    Int8,
    /// Unsigned 16-bit.
    Uint16,
    /// Signed 16-bit.
    Int16,
    /// Unsigned 24-bit.
    Uint24,
    /// Signed 24-bit.
    Int24,
    /// Unsigned 32-bit.
    Uint32,
    /// Signed 32-bit.
    Int32,
    /// IEEE 754 single precision.
    Float32,
    /// IEEE 11073 16-bit SFLOAT (4-bit exponent, 12-bit mantissa).
    Sfloat,
    /// IEEE 11073 32-bit FLOAT (8-bit exponent, 24-bit mantissa).
    Float,
    /// UTF-8 text.
    Utf8,
    /// One byte, non-zero is true.
    Bool,
}

impl BleDataType {
    fn is_numeric(self) -> bool {
        !matches!(self, BleDataType::Utf8 | BleDataType::Bool)
    }
}

/// Byte order of multi-byte values. Bluetooth SIG characteristics are little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Endianness {
    /// Least significant byte first (the GATT default).
    #[default]
    Little,
    /// Most significant byte first.
    Big,
}

/// The GATT characteristic of one property and how to decode it.
///
/// The value is `raw * scale + valueOffset` when read; writes apply the inverse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BleVisitor {
    /// Characteristic UUID: 16-bit (`2A6E`) or full 128-bit form.
    #[serde(rename = "characteristicUUID")]
    pub characteristic_uuid: String,
    /// Service UUID, when the characteristic UUID is not unique on the device.
    #[serde(
        rename = "serviceUUID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub service_uuid: Option<String>,
    /// How the value bytes are decoded.
    pub data_type: BleDataType,
    /// Byte order. Default `little`.
    #[serde(default)]
    pub endianness: Endianness,
    /// Multiplier applied to the raw number when read. Default 1.
    #[serde(default = "super::default_scale")]
    pub scale: f64,
    /// Added to the scaled number when read. Default 0.
    #[serde(default)]
    pub value_offset: f64,
    /// Subscribe to notifications instead of reading every `collectCycle`. Default false.
    #[serde(default)]
    pub notify: bool,
}

impl BleVisitor {
    pub(crate) fn check(&self, prop: &ModelProperty, out: &mut Issues) {
        if !is_uuid(&self.characteristic_uuid) {
            out.push((
                "characteristicUUID".into(),
                format!(
                    "{:?} is not a UUID like 2A6E or 00002a6e-0000-1000-8000-00805f9b34fb",
                    self.characteristic_uuid
                ),
            ));
        }
        if let Some(s) = &self.service_uuid {
            if !is_uuid(s) {
                out.push((
                    "serviceUUID".into(),
                    format!(
                        "{s:?} is not a UUID like 181A or 0000181a-0000-1000-8000-00805f9b34fb"
                    ),
                ));
            }
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
        let dt = self.data_type;
        if !dt.is_numeric() && (self.scale != 1.0 || self.value_offset != 0.0) {
            out.push((
                "scale".into(),
                format!("scale and valueOffset apply only to numbers, not dataType {dt:?}"),
            ));
        }
        let ok = match prop.ty {
            PropertyType::Boolean => dt == BleDataType::Bool,
            PropertyType::String => dt == BleDataType::Utf8,
            PropertyType::Int | PropertyType::Float => dt.is_numeric(),
            PropertyType::Object => false,
        };
        if !ok {
            out.push((
                "dataType".into(),
                format!(
                    "dataType {dt:?} cannot hold the model's {} property {:?}",
                    prop.ty,
                    prop.name.as_str()
                ),
            ));
        } else if prop.ty == PropertyType::Int
            && (matches!(
                dt,
                BleDataType::Float32 | BleDataType::Sfloat | BleDataType::Float
            ) || self.scale.fract() != 0.0
                || self.value_offset.fract() != 0.0)
        {
            out.push((
                "dataType".into(),
                format!(
                    "this decoding gives fractions, but property {:?} is int: declare it float",
                    prop.name.as_str()
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_mac, is_uuid};

    #[test]
    fn ble_uuid_accepts_short_and_full_forms() {
        for good in [
            "2A6E",
            "0x2a19",
            "0000181a-0000-1000-8000-00805f9b34fb",
            "12345678",
        ] {
            assert!(is_uuid(good), "{good}");
        }
        for bad in ["", "2A6", "xyz1", "0000181a-0000-1000-8000-00805f9b34f"] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn ble_mac_address_needs_six_hex_pairs() {
        assert!(is_mac("AA:bb:01:23:45:67"));
        assert!(!is_mac("AA:bb:01:23:45"));
        assert!(!is_mac("AA-bb-01-23-45-67"));
    }
}
