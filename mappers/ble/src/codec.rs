//! The pure part of the BLE mapper: no I/O, no clocks.
//!
//! * **UUIDs**: [`parse_uuid`] expands 16-bit (`2A6E`, `0x2A6E`) and 32-bit short forms over the
//!   Bluetooth base UUID `0000xxxx-0000-1000-8000-00805f9b34fb`, and takes full 128-bit forms.
//! * **Values**: [`decode`] / [`encode`] turn characteristic bytes into JSON values and back for
//!   every `dataType`: integers of 8, 16, 24 and 32 bits, signed or not, in either byte order;
//!   IEEE 754 `float32`; IEEE 11073 16-bit `sfloat` and 32-bit `float` (with their special values
//!   NaN, NRes, +INF, -INF, which are not numbers and decode to [`CodecError::Special`]); `utf8`
//!   (trailing NULs dropped) and `bool` (one byte, non-zero is true). Numbers are
//!   `raw * scale + valueOffset` when read; writes apply the inverse, rounding to the raw type and
//!   refusing values out of its range.
//! * **Standard characteristics**: [`STANDARD`] lists the Bluetooth SIG characteristics the
//!   examples use with their standard decoding, so a profile that decodes them otherwise can be
//!   warned about ([`standard_mismatch`]).

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::{BleDataType, BleVisitor, Endianness};
use serde_json::Value;
use uuid::Uuid;

/// Why a UUID, value or byte string could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// Not a 16-bit, 32-bit or 128-bit UUID.
    #[error("{0:?} is not a UUID like 2A6E or 00002a6e-0000-1000-8000-00805f9b34fb")]
    Uuid(String),
    /// The characteristic value has a different length than the data type needs.
    #[error("{data_type} needs {expected} bytes, the characteristic holds {got}")]
    Length {
        /// The visitor's data type.
        data_type: &'static str,
        /// Bytes the data type needs.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The sensor reports an IEEE 11073 special value (or a non-finite float32) instead of a
    /// number.
    #[error("the sensor reports {0} instead of a value")]
    Special(&'static str),
    /// The bytes are not UTF-8.
    #[error("the value is not UTF-8")]
    Utf8,
    /// The JSON value has the wrong type for the data type.
    #[error("{data_type} needs a JSON {needs}, got {got}")]
    WrongType {
        /// The visitor's data type.
        data_type: &'static str,
        /// The JSON type it needs.
        needs: &'static str,
        /// The value given.
        got: String,
    },
    /// The value does not fit the data type (after the inverse of scale and valueOffset) or the
    /// model's property type.
    #[error("{0}")]
    OutOfRange(String),
}

/// The name of a data type as written in profiles.
pub fn data_type_name(dt: BleDataType) -> &'static str {
    match dt {
        BleDataType::Uint8 => "uint8",
        BleDataType::Int8 => "int8",
        BleDataType::Uint16 => "uint16",
        BleDataType::Int16 => "int16",
        BleDataType::Uint24 => "uint24",
        BleDataType::Int24 => "int24",
        BleDataType::Uint32 => "uint32",
        BleDataType::Int32 => "int32",
        BleDataType::Float32 => "float32",
        BleDataType::Sfloat => "sfloat",
        BleDataType::Float => "float",
        BleDataType::Utf8 => "utf8",
        BleDataType::Bool => "bool",
    }
}

/// The Bluetooth base UUID's last 96 bits.
const BASE: u128 = 0x0000_0000_0000_1000_8000_0080_5f9b_34fb;

/// Parses a 16-bit (`2A6E`, `0x2A6E`), 32-bit (`12345678`) or 128-bit UUID.
pub fn parse_uuid(s: &str) -> Result<Uuid, CodecError> {
    let err = || CodecError::Uuid(s.to_string());
    let short = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if (short.len() == 4 || short.len() == 8) && short.chars().all(|c| c.is_ascii_hexdigit()) {
        let n = u32::from_str_radix(short, 16).map_err(|_| err())?;
        return Ok(short_uuid(n));
    }
    if s.len() == 36 {
        return Uuid::parse_str(s).map_err(|_| err());
    }
    Err(err())
}

/// The 128-bit UUID of a 16- or 32-bit Bluetooth SIG number.
pub fn short_uuid(n: u32) -> Uuid {
    Uuid::from_u128((u128::from(n) << 96) | BASE)
}

/// Integer layout: width in bytes and signedness.
fn int_layout(dt: BleDataType) -> Option<(usize, bool)> {
    match dt {
        BleDataType::Uint8 => Some((1, false)),
        BleDataType::Int8 => Some((1, true)),
        BleDataType::Uint16 => Some((2, false)),
        BleDataType::Int16 => Some((2, true)),
        BleDataType::Uint24 => Some((3, false)),
        BleDataType::Int24 => Some((3, true)),
        BleDataType::Uint32 => Some((4, false)),
        BleDataType::Int32 => Some((4, true)),
        _ => None,
    }
}

/// Bytes a data type occupies (`None`: any length, for `utf8`).
pub fn byte_len(dt: BleDataType) -> Option<usize> {
    match dt {
        BleDataType::Float32 | BleDataType::Float => Some(4),
        BleDataType::Sfloat => Some(2),
        BleDataType::Bool => Some(1),
        BleDataType::Utf8 => None,
        other => int_layout(other).map(|(n, _)| n),
    }
}

/// Unsigned integer from `b` in the given byte order.
fn to_uint(b: &[u8], e: Endianness) -> u32 {
    let mut n = 0u32;
    match e {
        Endianness::Little => {
            for &x in b.iter().rev() {
                n = (n << 8) | u32::from(x);
            }
        }
        Endianness::Big => {
            for &x in b {
                n = (n << 8) | u32::from(x);
            }
        }
    }
    n
}

/// The low `len` bytes of `n` in the given byte order.
fn from_uint(n: u32, len: usize, e: Endianness) -> Vec<u8> {
    let le = n.to_le_bytes();
    let mut out = le[..len].to_vec();
    if e == Endianness::Big {
        out.reverse();
    }
    out
}

/// Sign-extends the low `bits` bits of `n`.
fn sign_extend(n: u32, bits: u32) -> i64 {
    let shift = 64 - bits;
    (i64::from(n) << shift) >> shift
}

/// IEEE 11073 SFLOAT (4-bit exponent, 12-bit mantissa) to a number.
pub fn sfloat_to_f64(raw: u16) -> Result<f64, CodecError> {
    let mantissa = sign_extend(u32::from(raw & 0x0FFF), 12);
    let exponent = sign_extend(u32::from(raw >> 12), 4);
    match raw & 0x0FFF {
        0x07FF => return Err(CodecError::Special("NaN")),
        0x0800 => return Err(CodecError::Special("NRes")),
        0x07FE => return Err(CodecError::Special("+INF")),
        0x0802 => return Err(CodecError::Special("-INF")),
        0x0801 => return Err(CodecError::Special("a reserved value")),
        _ => {}
    }
    Ok(pow10(mantissa, exponent))
}

/// IEEE 11073 FLOAT (8-bit exponent, 24-bit mantissa) to a number.
pub fn float11073_to_f64(raw: u32) -> Result<f64, CodecError> {
    let m = raw & 0x00FF_FFFF;
    match m {
        0x007F_FFFF => return Err(CodecError::Special("NaN")),
        0x0080_0000 => return Err(CodecError::Special("NRes")),
        0x007F_FFFE => return Err(CodecError::Special("+INF")),
        0x0080_0002 => return Err(CodecError::Special("-INF")),
        0x0080_0001 => return Err(CodecError::Special("a reserved value")),
        _ => {}
    }
    Ok(pow10(sign_extend(m, 24), sign_extend(raw >> 24, 8)))
}

/// `m * 10^e` as the double nearest to that decimal number (so 2150e-2 is exactly 21.5, and
/// every spelling of one value decodes to the same double). Parsing the decimal text is the
/// correctly rounded conversion; multiplying by a power of ten is not for large exponents.
fn pow10(m: i64, e: i64) -> f64 {
    format!("{m}e{e}").parse().unwrap_or(f64::NAN)
}

/// Encodes `x` as IEEE 11073 with a `mbits`-bit mantissa and `ebits`-bit exponent: the smallest
/// exponent whose mantissa fits (most precision), avoiding the reserved special mantissas.
fn to_11073(x: f64, mbits: u32, ebits: u32) -> Result<(i64, i64), CodecError> {
    if !x.is_finite() {
        return Err(CodecError::OutOfRange(format!(
            "{x} is not a finite number"
        )));
    }
    let mmax = (1i64 << (mbits - 1)) - 3; // 0x7FD / 0x7FFFFD: below the specials
    let mmin = -mmax;
    let emin = -(1i64 << (ebits - 1));
    let emax = (1i64 << (ebits - 1)) - 1;
    for e in emin..=emax {
        let m = (if e < 0 {
            x * 10f64.powi((-e) as i32)
        } else {
            x / 10f64.powi(e as i32)
        })
        .round();
        if m >= mmin as f64 && m <= mmax as f64 {
            #[allow(clippy::cast_possible_truncation)]
            return Ok((m as i64, e));
        }
    }
    Err(CodecError::OutOfRange(format!(
        "{x} is out of range for an IEEE 11073 {mbits}-bit mantissa"
    )))
}

/// `raw * scale + offset`; a scale like 0.01 divides by 100 instead (exact for decimal data).
fn apply_scale(raw: f64, scale: f64, offset: f64) -> f64 {
    let inv = 1.0 / scale;
    let k = inv.round();
    let scaled = if scale.abs() < 1.0 && k != 0.0 && (inv - k).abs() <= 1e-9 * k.abs() {
        raw / k
    } else {
        raw * scale
    };
    scaled + offset
}

/// The inverse of [`apply_scale`].
fn unapply_scale(v: f64, scale: f64, offset: f64) -> f64 {
    let inv = 1.0 / scale;
    let k = inv.round();
    let x = v - offset;
    if scale.abs() < 1.0 && k != 0.0 && (inv - k).abs() <= 1e-9 * k.abs() {
        x * k
    } else {
        x / scale
    }
}

/// The JSON number for a decoded value of a model property of type `ty`.
fn number(v: f64, ty: PropertyType) -> Result<Value, CodecError> {
    if !v.is_finite() {
        return Err(CodecError::Special("a non-finite number"));
    }
    if ty == PropertyType::Int {
        if v.fract() != 0.0 || v.abs() > 9.0e15 {
            return Err(CodecError::OutOfRange(format!(
                "{v} is not an integer, but the property is int"
            )));
        }
        #[allow(clippy::cast_possible_truncation)]
        return Ok(Value::from(v as i64));
    }
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .ok_or(CodecError::Special("a non-finite number"))
}

fn check_len(dt: BleDataType, b: &[u8]) -> Result<(), CodecError> {
    match byte_len(dt) {
        Some(n) if n != b.len() => Err(CodecError::Length {
            data_type: data_type_name(dt),
            expected: n,
            got: b.len(),
        }),
        _ => Ok(()),
    }
}

/// Decodes a characteristic value for a property of model type `ty`.
pub fn decode(v: &BleVisitor, ty: PropertyType, b: &[u8]) -> Result<Value, CodecError> {
    let dt = v.data_type;
    check_len(dt, b)?;
    let e = v.endianness;
    let raw = match dt {
        BleDataType::Utf8 => {
            let s = std::str::from_utf8(b).map_err(|_| CodecError::Utf8)?;
            return Ok(Value::String(s.trim_end_matches('\0').to_string()));
        }
        BleDataType::Bool => return Ok(Value::Bool(b[0] != 0)),
        BleDataType::Float32 => {
            let f = f32::from_bits(to_uint(b, e));
            if !f.is_finite() {
                return Err(CodecError::Special(if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "+INF"
                } else {
                    "-INF"
                }));
            }
            edgetwin_mapper_sdk::shortest_f32(f)
        }
        #[allow(clippy::cast_possible_truncation)]
        BleDataType::Sfloat => sfloat_to_f64(to_uint(b, e) as u16)?,
        BleDataType::Float => float11073_to_f64(to_uint(b, e))?,
        int => {
            let (n, signed) = int_layout(int).unwrap_or((4, false));
            let u = to_uint(b, e);
            let i = if signed {
                sign_extend(u, 8 * n as u32)
            } else {
                i64::from(u)
            };
            if v.scale == 1.0 && v.value_offset == 0.0 {
                return if ty == PropertyType::Int {
                    Ok(Value::from(i))
                } else {
                    number(i as f64, ty)
                };
            }
            i as f64
        }
    };
    number(apply_scale(raw, v.scale, v.value_offset), ty)
}

/// [`encode`], refusing a value the characteristic cannot hold exactly: the bytes are decoded
/// back for a property of type `ty`, and a value that reads back as another (a float32's
/// precision, a scaled integer's resolution) is [`CodecError::OutOfRange`] naming what it would
/// hold. Compared by value (`25` is held by `25.0`).
pub fn encode_exact(
    v: &BleVisitor,
    ty: PropertyType,
    value: &Value,
) -> Result<Vec<u8>, CodecError> {
    let bytes = encode(v, value)?;
    if matches!(v.data_type, BleDataType::Utf8 | BleDataType::Bool) {
        return Ok(bytes);
    }
    let held = decode(v, ty, &bytes)?;
    if edgetwin_contract::value::same_value(&held, value) {
        Ok(bytes)
    } else {
        Err(CodecError::OutOfRange(format!(
            "{value} cannot be held: {} here holds {held}",
            data_type_name(v.data_type)
        )))
    }
}

/// Encodes a desired value into characteristic bytes (the inverse of [`decode`]).
pub fn encode(v: &BleVisitor, value: &Value) -> Result<Vec<u8>, CodecError> {
    let dt = v.data_type;
    let name = data_type_name(dt);
    let wrong = |needs: &'static str| CodecError::WrongType {
        data_type: name,
        needs,
        got: value.to_string(),
    };
    let e = v.endianness;
    match dt {
        BleDataType::Utf8 => return Ok(value.as_str().ok_or_else(|| wrong("string"))?.into()),
        BleDataType::Bool => {
            return Ok(vec![u8::from(
                value.as_bool().ok_or_else(|| wrong("boolean"))?,
            )])
        }
        _ => {}
    }
    let x = unapply_scale(
        value.as_f64().ok_or_else(|| wrong("number"))?,
        v.scale,
        v.value_offset,
    );
    match dt {
        BleDataType::Float32 => {
            #[allow(clippy::cast_possible_truncation)]
            let f = x as f32;
            if !f.is_finite() {
                return Err(CodecError::OutOfRange(format!(
                    "{value} does not fit a float32"
                )));
            }
            Ok(from_uint(f.to_bits(), 4, e))
        }
        BleDataType::Sfloat => {
            let (m, ex) = to_11073(x, 12, 4)?;
            #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
            let raw = (((ex as u32) & 0xF) << 12) | ((m as u32) & 0x0FFF);
            Ok(from_uint(raw, 2, e))
        }
        BleDataType::Float => {
            let (m, ex) = to_11073(x, 24, 8)?;
            #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
            let raw = (((ex as u32) & 0xFF) << 24) | ((m as u32) & 0x00FF_FFFF);
            Ok(from_uint(raw, 4, e))
        }
        int => {
            let (n, signed) = int_layout(int).unwrap_or((4, false));
            let bits = 8 * n as u32;
            let (lo, hi) = if signed {
                (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
            } else {
                (0, (1i64 << bits) - 1)
            };
            let r = x.round();
            if !r.is_finite() || r < lo as f64 || r > hi as f64 {
                return Err(CodecError::OutOfRange(format!(
                    "{value} is out of range for {name} ({lo}..={hi} after scale and valueOffset)"
                )));
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let raw = (r as i64) as u32;
            Ok(from_uint(raw, n, e))
        }
    }
}

/// A Bluetooth SIG characteristic with its standard little-endian decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standard {
    /// The 16-bit characteristic number.
    pub uuid: u16,
    /// Its name in the Bluetooth SIG assigned numbers.
    pub name: &'static str,
    /// Its data type.
    pub data_type: BleDataType,
    /// Its resolution (the profile's `scale`).
    pub scale: f64,
}

/// The standard characteristics the examples use.
pub const STANDARD: &[Standard] = &[
    Standard {
        uuid: 0x2A6E,
        name: "Temperature (0.01 °C)",
        data_type: BleDataType::Int16,
        scale: 0.01,
    },
    Standard {
        uuid: 0x2A6F,
        name: "Humidity (0.01 %)",
        data_type: BleDataType::Uint16,
        scale: 0.01,
    },
    Standard {
        uuid: 0x2A19,
        name: "Battery Level (%)",
        data_type: BleDataType::Uint8,
        scale: 1.0,
    },
    Standard {
        uuid: 0x2A6D,
        name: "Pressure (0.1 Pa)",
        data_type: BleDataType::Uint32,
        scale: 0.1,
    },
];

/// The standard characteristic `uuid` is, if listed in [`STANDARD`].
pub fn standard(uuid: Uuid) -> Option<&'static Standard> {
    STANDARD
        .iter()
        .find(|s| short_uuid(u32::from(s.uuid)) == uuid)
}

/// A warning when a visitor decodes a standard characteristic otherwise than the standard says.
pub fn standard_mismatch(uuid: Uuid, v: &BleVisitor) -> Option<String> {
    let s = standard(uuid)?;
    let same = s.data_type == v.data_type
        && (s.scale - v.scale).abs() < 1e-12
        && v.endianness == Endianness::Little;
    (!same).then(|| {
        format!(
            "characteristic {:04X} is the standard {}: {} little-endian with scale {}, but the profile says {} {:?} with scale {}",
            s.uuid,
            s.name,
            data_type_name(s.data_type),
            s.scale,
            data_type_name(v.data_type),
            v.endianness,
            v.scale
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn visitor(dt: BleDataType) -> BleVisitor {
        BleVisitor {
            characteristic_uuid: "2A6E".into(),
            service_uuid: None,
            data_type: dt,
            endianness: Endianness::Little,
            scale: 1.0,
            value_offset: 0.0,
            notify: false,
        }
    }

    fn scaled(dt: BleDataType, scale: f64) -> BleVisitor {
        BleVisitor {
            scale,
            ..visitor(dt)
        }
    }

    #[test]
    fn codec_a_value_the_characteristic_cannot_hold_is_refused() {
        let t = scaled(BleDataType::Int16, 0.01);
        assert!(encode_exact(&t, PropertyType::Float, &json!(21.5)).is_ok());
        assert!(
            encode_exact(&t, PropertyType::Float, &json!(25)).is_ok(),
            "25 is held by 25.0"
        );
        let e = encode_exact(&t, PropertyType::Float, &json!(21.555)).unwrap_err();
        assert!(e.to_string().contains("cannot be held"), "{e}");
        let f = visitor(BleDataType::Float32);
        assert!(encode_exact(&f, PropertyType::Float, &json!(232.1)).is_ok());
        assert!(encode_exact(&f, PropertyType::Float, &json!(0.1234567891)).is_err());
    }

    #[test]
    fn codec_uuid_short_forms_expand_over_the_bluetooth_base() {
        let full = Uuid::parse_str("00002a6e-0000-1000-8000-00805f9b34fb").unwrap();
        assert_eq!(parse_uuid("2A6E").unwrap(), full);
        assert_eq!(parse_uuid("0x2a6e").unwrap(), full);
        assert_eq!(
            parse_uuid("00002a6e-0000-1000-8000-00805f9b34fb").unwrap(),
            full
        );
        assert_eq!(
            parse_uuid("12345678").unwrap().to_string(),
            "12345678-0000-1000-8000-00805f9b34fb"
        );
        assert!(parse_uuid("2A6").is_err());
        assert!(parse_uuid("zz6e").is_err());
    }

    /// Known byte vectors of the standard characteristics in examples/profiles/ble-sensor.yaml.
    #[test]
    fn codec_standard_characteristics_decode_known_byte_vectors() {
        let cases: &[(u16, &[u8], PropertyType, Value)] = &[
            // Temperature 0x2A6E, sint16, 0.01 °C: 0x0866 = 2150 -> 21.5
            (0x2A6E, &[0x66, 0x08], PropertyType::Float, json!(21.5)),
            // 0xFF9C = -100 -> -1.0
            (0x2A6E, &[0x9C, 0xFF], PropertyType::Float, json!(-1.0)),
            // 0x8000 = -32768 -> -327.68
            (0x2A6E, &[0x00, 0x80], PropertyType::Float, json!(-327.68)),
            // Humidity 0x2A6F, uint16, 0.01 %: 0x133A = 4922 -> 49.22
            (0x2A6F, &[0x3A, 0x13], PropertyType::Float, json!(49.22)),
            (0x2A6F, &[0x10, 0x27], PropertyType::Float, json!(100.0)),
            // Battery Level 0x2A19, uint8, %: 0x5F -> 95
            (0x2A19, &[0x5F], PropertyType::Int, json!(95)),
            (0x2A19, &[0x00], PropertyType::Int, json!(0)),
            // Pressure 0x2A6D, uint32, 0.1 Pa: 1013250 -> 101325.0
            (
                0x2A6D,
                &[0x02, 0x76, 0x0F, 0x00],
                PropertyType::Float,
                json!(101325.0),
            ),
        ];
        for (uuid, bytes, ty, want) in cases {
            let s = standard(short_uuid(u32::from(*uuid))).unwrap();
            let v = scaled(s.data_type, s.scale);
            assert_eq!(
                &decode(&v, *ty, bytes).unwrap(),
                want,
                "{} {bytes:02X?}",
                s.name
            );
            assert_eq!(&encode(&v, want).unwrap(), bytes, "{} encodes back", s.name);
        }
    }

    #[test]
    fn codec_example_profile_visitors_match_the_standard_decoding() {
        let mut v = scaled(BleDataType::Int16, 0.01);
        assert_eq!(standard_mismatch(short_uuid(0x2A6E), &v), None);
        v.data_type = BleDataType::Uint16;
        let w = standard_mismatch(short_uuid(0x2A6E), &v).unwrap();
        assert!(w.contains("int16 little-endian with scale 0.01"), "{w}");
        assert_eq!(standard_mismatch(short_uuid(0x1234), &v), None);
    }

    #[test]
    fn codec_integers_of_every_width_sign_and_byte_order_decode() {
        let cases: &[(BleDataType, Endianness, &[u8], i64)] = &[
            (BleDataType::Uint8, Endianness::Little, &[0xFF], 255),
            (BleDataType::Int8, Endianness::Little, &[0xFF], -1),
            (
                BleDataType::Uint16,
                Endianness::Little,
                &[0x34, 0x12],
                0x1234,
            ),
            (BleDataType::Uint16, Endianness::Big, &[0x12, 0x34], 0x1234),
            (BleDataType::Int16, Endianness::Big, &[0xFF, 0xFE], -2),
            (
                BleDataType::Uint24,
                Endianness::Little,
                &[0x56, 0x34, 0x12],
                0x12_3456,
            ),
            (
                BleDataType::Int24,
                Endianness::Little,
                &[0x00, 0x00, 0x80],
                -8_388_608,
            ),
            (
                BleDataType::Int24,
                Endianness::Big,
                &[0x7F, 0xFF, 0xFF],
                8_388_607,
            ),
            (
                BleDataType::Uint32,
                Endianness::Little,
                &[0xFF, 0xFF, 0xFF, 0xFF],
                4_294_967_295,
            ),
            (
                BleDataType::Int32,
                Endianness::Big,
                &[0x80, 0, 0, 0],
                -2_147_483_648,
            ),
        ];
        for (dt, e, bytes, want) in cases {
            let v = BleVisitor {
                endianness: *e,
                ..visitor(*dt)
            };
            assert_eq!(
                decode(&v, PropertyType::Int, bytes).unwrap(),
                json!(want),
                "{dt:?} {e:?}"
            );
            assert_eq!(&encode(&v, &json!(want)).unwrap(), bytes, "{dt:?} {e:?}");
        }
    }

    #[test]
    fn codec_scale_and_value_offset_apply_on_read_and_invert_on_write() {
        let v = BleVisitor {
            scale: 0.5,
            value_offset: -40.0,
            ..visitor(BleDataType::Uint8)
        };
        assert_eq!(
            decode(&v, PropertyType::Float, &[100]).unwrap(),
            json!(10.0)
        );
        assert_eq!(encode(&v, &json!(10.0)).unwrap(), vec![100]);
        let e = encode(&v, &json!(100.0)).unwrap_err();
        assert!(matches!(e, CodecError::OutOfRange(_)), "{e}");
    }

    #[test]
    fn codec_wrong_length_is_refused_with_both_lengths() {
        let e = decode(
            &visitor(BleDataType::Int16),
            PropertyType::Float,
            &[1, 2, 3],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "int16 needs 2 bytes, the characteristic holds 3"
        );
    }

    #[test]
    fn codec_sfloat_decodes_mantissa_and_exponent() {
        // exponent -1, mantissa 365 -> 36.5 (0xF16D, little-endian 6D F1)
        let v = visitor(BleDataType::Sfloat);
        assert_eq!(
            decode(&v, PropertyType::Float, &[0x6D, 0xF1]).unwrap(),
            json!(36.5)
        );
        // exponent 2, mantissa -5 -> -500 (0x2FFB)
        assert_eq!(
            decode(&v, PropertyType::Float, &[0xFB, 0x2F]).unwrap(),
            json!(-500.0)
        );
        assert_eq!(encode(&v, &json!(36.5)).unwrap(), vec![0x6D, 0xF1]);
    }

    #[test]
    fn codec_sfloat_special_values_are_not_numbers() {
        let v = visitor(BleDataType::Sfloat);
        for (raw, name) in [
            (0x07FFu16, "NaN"),
            (0x0800, "NRes"),
            (0x07FE, "+INF"),
            (0x0802, "-INF"),
            (0x0801, "a reserved value"),
        ] {
            let e = decode(&v, PropertyType::Float, &raw.to_le_bytes()).unwrap_err();
            assert_eq!(e, CodecError::Special(name));
            assert!(e.to_string().contains(name));
        }
    }

    #[test]
    fn codec_float11073_decodes_and_reports_special_values() {
        // exponent -2, mantissa 3650 -> 36.5 (0xFE000E42)
        let v = visitor(BleDataType::Float);
        assert_eq!(
            decode(&v, PropertyType::Float, &[0x42, 0x0E, 0x00, 0xFE]).unwrap(),
            json!(36.5)
        );
        let big = BleVisitor {
            endianness: Endianness::Big,
            ..visitor(BleDataType::Float)
        };
        assert_eq!(
            decode(&big, PropertyType::Float, &[0xFE, 0x00, 0x0E, 0x42]).unwrap(),
            json!(36.5)
        );
        for (raw, name) in [
            (0x007F_FFFFu32, "NaN"),
            (0x0080_0000, "NRes"),
            (0x007F_FFFE, "+INF"),
            (0x0080_0002, "-INF"),
        ] {
            assert_eq!(
                decode(&v, PropertyType::Float, &raw.to_le_bytes()).unwrap_err(),
                CodecError::Special(name)
            );
        }
    }

    #[test]
    fn codec_float32_decodes_ieee754_and_refuses_non_finite() {
        let v = visitor(BleDataType::Float32);
        assert_eq!(
            decode(&v, PropertyType::Float, &21.75f32.to_le_bytes()).unwrap(),
            json!(21.75)
        );
        assert_eq!(
            decode(&v, PropertyType::Float, &232.1f32.to_le_bytes())
                .unwrap()
                .to_string(),
            "232.1",
            "the shortest decimal, not float noise"
        );
        assert_eq!(
            decode(&v, PropertyType::Float, &f32::NAN.to_le_bytes()).unwrap_err(),
            CodecError::Special("NaN")
        );
    }

    #[test]
    fn codec_utf8_and_bool_decode_and_encode() {
        let v = visitor(BleDataType::Utf8);
        assert_eq!(
            decode(&v, PropertyType::String, b"EDGE-1\0\0").unwrap(),
            json!("EDGE-1")
        );
        assert_eq!(
            decode(&v, PropertyType::String, &[0xFF]).unwrap_err(),
            CodecError::Utf8
        );
        assert_eq!(encode(&v, &json!("hi")).unwrap(), b"hi".to_vec());
        let b = visitor(BleDataType::Bool);
        assert_eq!(
            decode(&b, PropertyType::Boolean, &[2]).unwrap(),
            json!(true)
        );
        assert_eq!(
            decode(&b, PropertyType::Boolean, &[0]).unwrap(),
            json!(false)
        );
        assert_eq!(encode(&b, &json!(true)).unwrap(), vec![1]);
        assert!(matches!(
            encode(&b, &json!(1)).unwrap_err(),
            CodecError::WrongType { .. }
        ));
    }

    fn arb_type() -> impl Strategy<Value = BleDataType> {
        prop_oneof![
            Just(BleDataType::Uint8),
            Just(BleDataType::Int8),
            Just(BleDataType::Uint16),
            Just(BleDataType::Int16),
            Just(BleDataType::Uint24),
            Just(BleDataType::Int24),
            Just(BleDataType::Uint32),
            Just(BleDataType::Int32),
            Just(BleDataType::Float32),
            Just(BleDataType::Sfloat),
            Just(BleDataType::Float),
            Just(BleDataType::Bool),
        ]
    }

    proptest! {
        /// Integer and float32 bytes decode and re-encode to the same bytes in either order.
        #[test]
        fn codec_integer_bytes_roundtrip_through_json(
            dt in arb_type(), big: bool, bytes in prop::collection::vec(any::<u8>(), 4)
        ) {
            let v = BleVisitor {
                endianness: if big { Endianness::Big } else { Endianness::Little },
                ..visitor(dt)
            };
            let b = &bytes[..byte_len(dt).unwrap()];
            let ty = match dt {
                BleDataType::Bool => PropertyType::Boolean,
                BleDataType::Float32 | BleDataType::Sfloat | BleDataType::Float => PropertyType::Float,
                _ => PropertyType::Int,
            };
            match decode(&v, ty, b) {
                Ok(value) => {
                    let again = encode(&v, &value).unwrap();
                    match dt {
                        // A value has several 11073 spellings (10e0 = 1e1): compare values.
                        BleDataType::Sfloat | BleDataType::Float => {
                            prop_assert_eq!(decode(&v, ty, &again).unwrap(), value)
                        }
                        BleDataType::Bool => prop_assert_eq!(again, vec![u8::from(b[0] != 0)]),
                        _ => prop_assert_eq!(again, b.to_vec()),
                    }
                }
                Err(CodecError::Special(_)) => prop_assert!(matches!(
                    dt,
                    BleDataType::Float32 | BleDataType::Sfloat | BleDataType::Float
                )),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        /// Scaled standard values (0.01 resolution) survive encode then decode exactly.
        #[test]
        fn codec_scaled_values_roundtrip_encode_then_decode(raw in -32768i64..=32767) {
            let v = scaled(BleDataType::Int16, 0.01);
            let value = json!(raw as f64 / 100.0);
            let bytes = encode(&v, &value).unwrap();
            prop_assert_eq!(decode(&v, PropertyType::Float, &bytes).unwrap(), value);
        }
    }
}
