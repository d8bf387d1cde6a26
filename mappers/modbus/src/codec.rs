//! The pure part of the Modbus mapper: no I/O, no clocks.
//!
//! * **Values**: [`decode_registers`] / [`encode_registers`] turn 16-bit register words into JSON
//!   values and back for every `dataType`, honouring byte order (`isSwap`: low byte first inside
//!   each register), word order (`isRegisterSwap`: least significant register first), `mask`,
//!   `scale` and `valueOffset` (`value = raw * scale + valueOffset` on read, the inverse with
//!   rounding and a range check on write). [`decode_bit`] / [`encode_bit`] do the same for coils
//!   and discrete inputs.
//! * **Plans**: [`plan`] groups the properties due in one poll cycle by table and merges nearby
//!   address ranges into as few read requests as the protocol allows (125 registers or 2000 bits
//!   per request), accepting small gaps ([`PlanLimits`]); [`ReadRequest::slice`] then cuts each
//!   property's words out of the answer.
//!
//! Register words are always given in the order the device returns them (lowest address first).

use std::ops::Range;

use edgetwin_contract::PropertyType;
use edgetwin_profile::protocol::modbus::{MAX_BITS, MAX_REGISTERS};
use edgetwin_profile::protocol::{ModbusDataType, ModbusVisitor, RegisterType};
use serde_json::Value;

/// Why a value could not be decoded from, or encoded into, registers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The device returned a different number of registers than the visitor needs.
    #[error("expected {expected} registers for {data_type}, got {got}")]
    Length {
        /// Registers the data type needs.
        expected: usize,
        /// Registers supplied.
        got: usize,
        /// The visitor's data type.
        data_type: &'static str,
    },
    /// The JSON value has the wrong type for the visitor's data type.
    #[error("{data_type} needs a JSON {needs}, got {got}")]
    WrongType {
        /// The visitor's data type.
        data_type: &'static str,
        /// The JSON type it needs.
        needs: &'static str,
        /// The value given.
        got: String,
    },
    /// The value does not fit the register type (after the inverse of scale and valueOffset),
    /// the model's property type, or the mask.
    #[error("{0}")]
    OutOfRange(String),
    /// The register cannot hold the value exactly (a scaled register's resolution, a float32's
    /// precision): writing it would read back another value, for ever.
    #[error("{value} cannot be held: {data_type} here holds {held}{hint}")]
    NotHeld {
        /// The value asked for.
        value: String,
        /// The visitor's data type.
        data_type: &'static str,
        /// What the register would read back.
        held: String,
        /// How to write a value it holds.
        hint: String,
    },
}

/// The name of a data type as written in profiles.
pub fn data_type_name(dt: ModbusDataType) -> &'static str {
    match dt {
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

/// Registers (or bits) the visitor reads: `limit`, else the width of its data type.
pub fn width(v: &ModbusVisitor) -> u16 {
    v.register_count()
}

/// Registers a fixed-width data type needs on a register table (`None` for string: `limit`).
fn fixed_width(dt: ModbusDataType) -> Option<usize> {
    dt.register_count().map(usize::from)
}

/// Words in device order -> bytes, most significant first.
fn words_to_bytes(v: &ModbusVisitor, words: &[u16]) -> Vec<u8> {
    let mut ws: Vec<u16> = words.to_vec();
    if v.is_register_swap {
        ws.reverse();
    }
    ws.iter()
        .flat_map(|w| {
            let b = w.to_be_bytes();
            if v.is_swap {
                [b[1], b[0]]
            } else {
                b
            }
        })
        .collect()
}

/// Bytes, most significant first -> words in device order (inverse of [`words_to_bytes`]).
fn bytes_to_words(v: &ModbusVisitor, bytes: &[u8]) -> Vec<u16> {
    let mut ws: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let (hi, lo) = (c[0], c.get(1).copied().unwrap_or(0));
            if v.is_swap {
                u16::from_be_bytes([lo, hi])
            } else {
                u16::from_be_bytes([hi, lo])
            }
        })
        .collect();
    if v.is_register_swap {
        ws.reverse();
    }
    ws
}

/// The raw number a register range holds, before scale and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Raw {
    Int(i128),
    Float(f64),
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Reads the raw number: the mask is ANDed with the unsigned bit pattern before the sign is
/// interpreted.
fn raw_from_bytes(dt: ModbusDataType, bytes: &[u8], mask: Option<u64>) -> Raw {
    let bits = be_u64(bytes) & mask.unwrap_or(u64::MAX);
    match dt {
        ModbusDataType::Int16 => Raw::Int(i128::from(bits as u16 as i16)),
        ModbusDataType::Int32 => Raw::Int(i128::from(bits as u32 as i32)),
        ModbusDataType::Int64 => Raw::Int(i128::from(bits as i64)),
        ModbusDataType::Float32 => Raw::Float(edgetwin_mapper_sdk::shortest_f32(f32::from_bits(
            bits as u32,
        ))),
        ModbusDataType::Float64 => Raw::Float(f64::from_bits(bits)),
        // uint16/32/64, and bool read from a register.
        _ => Raw::Int(i128::from(bits)),
    }
}

/// Digits after the decimal point in `x`'s shortest form (`0.1` → 1, `25` → 0).
fn decimals(x: f64) -> usize {
    let s = x.abs().to_string();
    s.split_once('.').map_or(0, |(_, frac)| frac.len())
}

/// `f` rounded to `places` decimals, where the inputs had no more than that: `3 × 0.1` is
/// `0.3`, not `0.30000000000000004`. Left alone past 15 places (no f64 carries more).
fn tidy(f: f64, places: usize) -> f64 {
    if places > 15 || !f.is_finite() {
        return f;
    }
    format!("{f:.places$}").parse().unwrap_or(f)
}

fn is_integral(x: f64) -> bool {
    x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15
}

/// Decodes the words of one property (device order) into its JSON value for a model property of
/// type `ty`.
///
/// An `int` property gets an exact integer (integer arithmetic when scale and valueOffset are
/// whole numbers; a float register is rounded to the nearest integer); a `float` property gets a
/// JSON float.
pub fn decode_registers(
    v: &ModbusVisitor,
    ty: PropertyType,
    words: &[u16],
) -> Result<Value, CodecError> {
    let dt = v.data_type;
    let expected = match dt {
        ModbusDataType::String => usize::from(width(v)),
        ModbusDataType::Bool => 1,
        _ => fixed_width(dt).unwrap_or(1),
    };
    if words.len() != expected {
        return Err(CodecError::Length {
            expected,
            got: words.len(),
            data_type: data_type_name(dt),
        });
    }
    let bytes = words_to_bytes(v, words);
    match dt {
        ModbusDataType::String => {
            let end = bytes
                .iter()
                .rposition(|b| *b != 0)
                .map(|i| i + 1)
                .unwrap_or(0);
            Ok(Value::String(
                String::from_utf8_lossy(&bytes[..end]).into_owned(),
            ))
        }
        ModbusDataType::Bool => Ok(Value::Bool(
            be_u64(&bytes) & v.mask.unwrap_or(u64::MAX) != 0,
        )),
        _ => {
            let raw = raw_from_bytes(dt, &bytes, v.mask);
            scale_to_value(v, ty, raw)
        }
    }
}

/// `raw * scale + valueOffset`, typed for the model property.
fn scale_to_value(v: &ModbusVisitor, ty: PropertyType, raw: Raw) -> Result<Value, CodecError> {
    let out_of_int = |x: String| {
        CodecError::OutOfRange(format!(
            "value {x} does not fit the int property (64-bit signed)"
        ))
    };
    match (ty, raw) {
        (PropertyType::Int, Raw::Int(r)) if is_integral(v.scale) && is_integral(v.value_offset) => {
            let x = r
                .checked_mul(v.scale as i128)
                .and_then(|x| x.checked_add(v.value_offset as i128))
                .ok_or_else(|| out_of_int(format!("{r} * {} + {}", v.scale, v.value_offset)))?;
            i64::try_from(x)
                .map(Value::from)
                .map_err(|_| out_of_int(x.to_string()))
        }
        (PropertyType::Int, raw) => {
            let f = match raw {
                Raw::Int(r) => r as f64,
                Raw::Float(f) => f,
            } * v.scale
                + v.value_offset;
            let r = f.round();
            // NaN and infinities are outside the range too.
            if !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&r) {
                return Err(out_of_int(f.to_string()));
            }
            Ok(Value::from(r as i64))
        }
        (_, raw) => {
            let (x, places) = match raw {
                Raw::Int(r) => (r as f64, 0),
                Raw::Float(f) => (f, decimals(f)),
            };
            // The register's resolution: no more decimals than raw × scale + offset can carry.
            let places = (places + decimals(v.scale)).max(decimals(v.value_offset));
            let f = tidy(x * v.scale + v.value_offset, places);
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| {
                    CodecError::OutOfRange(format!("decoded value {f} is not a finite number"))
                })
        }
    }
}

/// Decodes a coil or discrete input.
pub fn decode_bit(bit: bool, ty: PropertyType) -> Value {
    match ty {
        PropertyType::Int => Value::from(u8::from(bit)),
        _ => Value::Bool(bit),
    }
}

/// Encodes a JSON boolean (or, for an `int` property, 0 or 1) for a coil.
pub fn encode_bit(value: &Value) -> Result<bool, CodecError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
            Ok(n.as_u64() == Some(1))
        }
        _ => Err(CodecError::WrongType {
            data_type: "bool",
            needs: "boolean (or 0 or 1)",
            got: value.to_string(),
        }),
    }
}

fn int_range(dt: ModbusDataType) -> (i128, i128) {
    match dt {
        ModbusDataType::Int16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
        ModbusDataType::Uint16 => (0, i128::from(u16::MAX)),
        ModbusDataType::Int32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
        ModbusDataType::Uint32 => (0, i128::from(u32::MAX)),
        ModbusDataType::Int64 => (i128::from(i64::MIN), i128::from(i64::MAX)),
        _ => (0, i128::from(u64::MAX)),
    }
}

/// The raw integer for `value`: `(value - valueOffset) / scale`, exact when everything is whole,
/// otherwise rounded to the nearest integer.
fn raw_int(v: &ModbusVisitor, value: &serde_json::Number) -> Result<i128, CodecError> {
    let exact = value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from));
    if let Some(x) = exact {
        if is_integral(v.scale) && is_integral(v.value_offset) && v.scale != 0.0 {
            let (s, o) = (v.scale as i128, v.value_offset as i128);
            let diff = x - o;
            if diff % s == 0 {
                return Ok(diff / s);
            }
        }
    }
    let f = value.as_f64().unwrap_or(f64::NAN);
    let r = ((f - v.value_offset) / v.scale).round();
    // Beyond ±2^100 nothing fits any Modbus integer anyway.
    if !r.is_finite() || r.abs() > 1.0e30 {
        return Err(CodecError::OutOfRange(format!(
            "{value} does not fit {}",
            data_type_name(v.data_type)
        )));
    }
    Ok(r as i128)
}

/// Encodes a JSON value into the words to write (device order, `width(v)` words).
///
/// With a `mask`, only the masked bits are meant to change: a value with bits outside the mask
/// is out of range, and the caller merges the result into the current words with
/// [`merge_masked`] (a bool on a register sets or clears all mask bits).
pub fn encode_registers(v: &ModbusVisitor, value: &Value) -> Result<Vec<u16>, CodecError> {
    let dt = v.data_type;
    let name = data_type_name(dt);
    let wrong = |needs: &'static str| CodecError::WrongType {
        data_type: name,
        needs,
        got: value.to_string(),
    };
    match dt {
        ModbusDataType::String => {
            let s = value.as_str().ok_or_else(|| wrong("string"))?;
            let cap = usize::from(width(v)) * 2;
            if s.len() > cap {
                return Err(CodecError::OutOfRange(format!(
                    "string of {} bytes does not fit {} registers ({cap} bytes)",
                    s.len(),
                    width(v)
                )));
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(cap, 0);
            // Strings are stored in address order; word order does not apply.
            let plain = ModbusVisitor {
                is_register_swap: false,
                ..v.clone()
            };
            Ok(bytes_to_words(&plain, &bytes))
        }
        ModbusDataType::Bool => {
            let b = value.as_bool().ok_or_else(|| wrong("boolean"))?;
            let on = v.mask.unwrap_or(1) & 0xFFFF;
            Ok(bytes_to_words(
                v,
                &(if b { on as u16 } else { 0 }).to_be_bytes(),
            ))
        }
        ModbusDataType::Float32 | ModbusDataType::Float64 => {
            let n = value.as_f64().ok_or_else(|| wrong("number"))?;
            let f = (n - v.value_offset) / v.scale;
            if dt == ModbusDataType::Float32 {
                if !f.is_finite() || f.abs() > f64::from(f32::MAX) {
                    return Err(CodecError::OutOfRange(format!(
                        "{value} does not fit float32"
                    )));
                }
                Ok(bytes_to_words(v, &(f as f32).to_be_bytes()))
            } else {
                if !f.is_finite() {
                    return Err(CodecError::OutOfRange(format!(
                        "{value} does not fit float64"
                    )));
                }
                Ok(bytes_to_words(v, &f.to_be_bytes()))
            }
        }
        _ => {
            let n = match value {
                Value::Number(n) => n,
                _ => return Err(wrong("number")),
            };
            let raw = raw_int(v, n)?;
            let (lo, hi) = int_range(dt);
            if raw < lo || raw > hi {
                return Err(CodecError::OutOfRange(format!(
                    "{value} is raw {raw} after scale {} and valueOffset {}, outside {name} ({lo}..={hi})",
                    v.scale, v.value_offset
                )));
            }
            let nbytes = fixed_width(dt).unwrap_or(1) * 2;
            // Two's complement bit pattern of the right width.
            let bits = (raw as u64) & (u64::MAX >> (64 - 8 * nbytes));
            if let Some(m) = v.mask {
                if bits & !m != 0 {
                    return Err(CodecError::OutOfRange(format!(
                        "{value} (raw {raw:#x}) has bits outside mask {m:#x}"
                    )));
                }
            }
            let be = bits.to_be_bytes();
            Ok(bytes_to_words(v, &be[8 - nbytes..]))
        }
    }
}

/// [`encode_registers`], refusing a value the register cannot hold exactly: the words are decoded
/// back for a model property of type `ty`, and a value that reads back as another number
/// (`21.55` at scale 0.1 reads `21.6`; `0.1234567891` as float32 reads `0.12345679`) is
/// [`CodecError::NotHeld`]. Compared by value, so `25` on a float property is held by `25.0`.
pub fn encode_exact(
    v: &ModbusVisitor,
    ty: PropertyType,
    value: &Value,
) -> Result<Vec<u16>, CodecError> {
    let words = encode_registers(v, value)?;
    if v.data_type == ModbusDataType::Bool || v.data_type == ModbusDataType::String {
        return Ok(words);
    }
    let held = decode_registers(v, ty, &words)?;
    if edgetwin_contract::value::same_value(&held, value) {
        return Ok(words);
    }
    let hint = if v.scale != 1.0 {
        format!(
            " (resolution {} at scale {}); write a multiple of it",
            v.scale.abs(),
            v.scale
        )
    } else {
        String::new()
    };
    Err(CodecError::NotHeld {
        value: value.to_string(),
        data_type: data_type_name(v.data_type),
        held: held.to_string(),
        hint,
    })
}

/// The mask of the visitor as words in device order (all ones without a mask).
pub fn mask_words(v: &ModbusVisitor) -> Vec<u16> {
    let n = usize::from(width(v));
    let Some(m) = v.mask else {
        return vec![u16::MAX; n];
    };
    let nbytes = n * 2;
    let be = m.to_be_bytes();
    let bytes: Vec<u8> = if nbytes <= 8 {
        be[8 - nbytes..].to_vec()
    } else {
        let mut b = vec![0; nbytes - 8];
        b.extend_from_slice(&be);
        b
    };
    bytes_to_words(v, &bytes)
}

/// Keeps the bits of `current` outside the visitor's mask and takes the masked bits from `new`.
pub fn merge_masked(v: &ModbusVisitor, current: &[u16], new: &[u16]) -> Vec<u16> {
    mask_words(v)
        .iter()
        .zip(current.iter().zip(new))
        .map(|(m, (c, n))| (c & !m) | (n & m))
        .collect()
}

/// Where one property lives: table, first address and number of registers or bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The table.
    pub register: RegisterType,
    /// First address.
    pub offset: u16,
    /// Registers (or bits) to read; at least 1.
    pub count: u16,
}

impl Span {
    /// The span a visitor reads.
    pub fn of(v: &ModbusVisitor) -> Span {
        Span {
            register: v.register,
            offset: v.offset,
            count: width(v).max(1),
        }
    }

    fn end(&self) -> u32 {
        u32::from(self.offset) + u32::from(self.count)
    }
}

/// How far the planner may merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Most registers in one request (protocol limit 125).
    pub max_registers: u16,
    /// Most bits in one request (protocol limit 2000).
    pub max_bits: u16,
    /// Largest run of unwanted registers read to merge two ranges.
    pub register_gap: u16,
    /// Largest run of unwanted bits read to merge two ranges.
    pub bit_gap: u16,
}

impl Default for PlanLimits {
    /// Protocol maxima; gaps of up to 8 registers (16 bytes on the wire, far cheaper than a
    /// round trip) or 64 bits.
    fn default() -> Self {
        PlanLimits {
            max_registers: MAX_REGISTERS,
            max_bits: MAX_BITS,
            register_gap: 8,
            bit_gap: 64,
        }
    }
}

impl PlanLimits {
    /// No merging at all: one request per property.
    pub fn single() -> Self {
        PlanLimits {
            max_registers: 0,
            max_bits: 0,
            register_gap: 0,
            bit_gap: 0,
        }
    }

    fn max(&self, r: RegisterType) -> u32 {
        u32::from(if r.is_bit() {
            self.max_bits
        } else {
            self.max_registers
        })
    }

    fn gap(&self, r: RegisterType) -> u32 {
        u32::from(if r.is_bit() {
            self.bit_gap
        } else {
            self.register_gap
        })
    }
}

/// One planned read: a contiguous range of one table and the properties it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The table.
    pub register: RegisterType,
    /// First address read.
    pub start: u16,
    /// Registers (or bits) read.
    pub count: u16,
    /// Indices (into the planned spans) of the properties served, in address order.
    pub members: Vec<usize>,
}

impl ReadRequest {
    /// Where `span` (one of the members) sits in this request's answer.
    pub fn slice(&self, span: &Span) -> Range<usize> {
        let from = usize::from(span.offset.saturating_sub(self.start));
        from..from + usize::from(span.count)
    }
}

/// Plans the reads for `spans`: per table, ranges closer than the gap limit are merged while the
/// merged request stays within the size limit. Every span is served by exactly one request; a
/// span larger than the limit (validation prevents it) gets a request of its own.
pub fn plan(spans: &[Span], limits: &PlanLimits) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| {
        let s = &spans[i];
        (table_rank(s.register), s.offset, s.count)
    });
    let mut out: Vec<ReadRequest> = Vec::new();
    let mut cur_end: u32 = 0;
    for i in order {
        let s = spans[i];
        if let Some(req) = out.last_mut() {
            let start = u32::from(req.start);
            let new_end = cur_end.max(s.end());
            if req.register == s.register
                && u32::from(s.offset) <= cur_end + limits.gap(s.register)
                && new_end - start <= limits.max(s.register)
            {
                req.members.push(i);
                cur_end = new_end;
                req.count = (cur_end - start) as u16;
                continue;
            }
        }
        out.push(ReadRequest {
            register: s.register,
            start: s.offset,
            count: s.count,
            members: vec![i],
        });
        cur_end = s.end();
    }
    out
}

fn table_rank(r: RegisterType) -> u8 {
    match r {
        RegisterType::CoilRegister => 0,
        RegisterType::DiscreteInputRegister => 1,
        RegisterType::HoldingRegister => 2,
        RegisterType::InputRegister => 3,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn visitor(dt: ModbusDataType) -> ModbusVisitor {
        ModbusVisitor {
            register: RegisterType::HoldingRegister,
            offset: 0,
            limit: dt.register_count(),
            data_type: dt,
            is_register_swap: false,
            is_swap: false,
            scale: 1.0,
            value_offset: 0.0,
            mask: None,
        }
    }

    fn with(dt: ModbusDataType, rswap: bool, swap: bool) -> ModbusVisitor {
        ModbusVisitor {
            is_register_swap: rswap,
            is_swap: swap,
            ..visitor(dt)
        }
    }

    #[test]
    fn codec_float32_big_endian_decodes_abcd() {
        // 230.5 = 0x43668000
        let v = visitor(ModbusDataType::Float32);
        let got = decode_registers(&v, PropertyType::Float, &[0x4366, 0x8000]).unwrap();
        assert_eq!(got, json!(230.5));
    }

    #[test]
    fn codec_float32_reads_as_the_shortest_decimal_not_float_noise() {
        let v = visitor(ModbusDataType::Float32);
        let words = encode_registers(&v, &json!(232.1)).unwrap();
        let got = decode_registers(&v, PropertyType::Float, &words).unwrap();
        assert_eq!(got.to_string(), "232.1");
        for x in [0.1_f32, 1e-7, 3.3, 1e-30, 65504.0, -0.7] {
            let words = encode_registers(&v, &json!(x as f64)).unwrap();
            let got = decode_registers(&v, PropertyType::Float, &words).unwrap();
            assert_eq!(got.as_f64().map(|g| g as f32), Some(x), "{x}");
            let shortest: f64 = x.to_string().parse().unwrap();
            assert_eq!(got.as_f64(), Some(shortest), "{x}");
        }
    }

    #[test]
    fn codec_a_scaled_register_reads_at_its_resolution() {
        let scaled = |scale, value_offset| ModbusVisitor {
            scale,
            value_offset,
            ..visitor(ModbusDataType::Uint16)
        };
        let read = |v: &ModbusVisitor, w: u16| {
            decode_registers(v, PropertyType::Float, &[w])
                .unwrap()
                .to_string()
        };
        assert_eq!(read(&scaled(0.1, 0.0), 215), "21.5");
        assert_eq!(read(&scaled(0.1, 0.0), 3), "0.3");
        assert_eq!(read(&scaled(0.01, 0.2), 7), "0.27");
        assert_eq!(read(&scaled(0.1, -40.0), 653), "25.3");
        assert_eq!(read(&scaled(2.5, 0.0), 3), "7.5");
        // A float32 register with a scale: the float's decimals plus the scale's.
        let f = ModbusVisitor {
            scale: 0.1,
            ..visitor(ModbusDataType::Float32)
        };
        let words = encode_registers(&visitor(ModbusDataType::Float32), &json!(232.1)).unwrap();
        let got = decode_registers(&f, PropertyType::Float, &words).unwrap();
        assert_eq!(got.to_string(), "23.21");
    }

    #[test]
    fn codec_float32_every_order_decodes_the_same_number() {
        let cases = [
            (false, false, [0x4366, 0x8000]), // ABCD
            (true, false, [0x8000, 0x4366]),  // CDAB
            (false, true, [0x6643, 0x0080]),  // BADC
            (true, true, [0x0080, 0x6643]),   // DCBA
        ];
        for (rswap, swap, words) in cases {
            let v = with(ModbusDataType::Float32, rswap, swap);
            let got = decode_registers(&v, PropertyType::Float, &words).unwrap();
            assert_eq!(got, json!(230.5), "rswap={rswap} swap={swap}");
            assert_eq!(encode_registers(&v, &json!(230.5)).unwrap(), words);
        }
    }

    #[test]
    fn codec_int16_negative_and_scale_offset_applied() {
        let v = ModbusVisitor {
            scale: 0.1,
            value_offset: -40.0,
            ..visitor(ModbusDataType::Int16)
        };
        // raw -5 -> -0.5 - 40 = -40.5
        let got = decode_registers(&v, PropertyType::Float, &[0xFFFB]).unwrap();
        assert!((got.as_f64().unwrap() + 40.5).abs() < 1e-9, "{got}");
        assert_eq!(encode_registers(&v, &json!(-40.5)).unwrap(), vec![0xFFFB]);
    }

    #[test]
    fn codec_int_property_gets_exact_integer() {
        let v = ModbusVisitor {
            scale: 10.0,
            value_offset: 3.0,
            ..visitor(ModbusDataType::Uint32)
        };
        let got = decode_registers(&v, PropertyType::Int, &[0x0001, 0x0000]).unwrap();
        assert_eq!(got, json!(655_363));
        assert!(got.is_i64());
        assert_eq!(
            encode_registers(&v, &json!(655_363)).unwrap(),
            vec![0x0001, 0x0000]
        );
    }

    #[test]
    fn codec_uint64_beyond_i64_fails_for_int_property_but_reads_as_float() {
        let v = visitor(ModbusDataType::Uint64);
        let words = [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF];
        assert!(matches!(
            decode_registers(&v, PropertyType::Int, &words),
            Err(CodecError::OutOfRange(_))
        ));
        let f = decode_registers(&v, PropertyType::Float, &words).unwrap();
        assert_eq!(f.as_f64().unwrap(), u64::MAX as f64);
    }

    #[test]
    fn codec_write_out_of_range_is_rejected() {
        let v = visitor(ModbusDataType::Uint16);
        assert!(matches!(
            encode_registers(&v, &json!(65_536)),
            Err(CodecError::OutOfRange(_))
        ));
        assert!(matches!(
            encode_registers(&v, &json!(-1)),
            Err(CodecError::OutOfRange(_))
        ));
        let s = ModbusVisitor {
            scale: 0.1,
            ..visitor(ModbusDataType::Int16)
        };
        assert!(encode_registers(&s, &json!(3276.7)).is_ok());
        assert!(matches!(
            encode_registers(&s, &json!(3276.8)),
            Err(CodecError::OutOfRange(_))
        ));
        assert!(matches!(
            encode_registers(&visitor(ModbusDataType::Float32), &json!(1e300)),
            Err(CodecError::OutOfRange(_))
        ));
    }

    #[test]
    fn codec_write_rounds_to_nearest_raw_integer() {
        let v = ModbusVisitor {
            scale: 0.1,
            ..visitor(ModbusDataType::Uint16)
        };
        assert_eq!(encode_registers(&v, &json!(21.5)).unwrap(), vec![215]);
        assert_eq!(encode_registers(&v, &json!(21.54)).unwrap(), vec![215]);
        assert_eq!(encode_registers(&v, &json!(21.56)).unwrap(), vec![216]);
    }

    #[test]
    fn codec_write_wrong_json_type_is_rejected() {
        assert!(matches!(
            encode_registers(&visitor(ModbusDataType::Int16), &json!("3")),
            Err(CodecError::WrongType { .. })
        ));
        assert!(matches!(
            encode_registers(&visitor(ModbusDataType::Bool), &json!(1)),
            Err(CodecError::WrongType { .. })
        ));
        assert!(encode_bit(&json!("true")).is_err());
        assert!(encode_bit(&json!(true)).unwrap());
    }

    #[test]
    fn codec_string_two_chars_per_register_trailing_nuls_trimmed() {
        let v = ModbusVisitor {
            limit: Some(4),
            ..visitor(ModbusDataType::String)
        };
        let words = [0x4845, 0x4C4C, 0x4F00, 0x0000]; // "HELLO"
        assert_eq!(
            decode_registers(&v, PropertyType::String, &words).unwrap(),
            json!("HELLO")
        );
        assert_eq!(encode_registers(&v, &json!("HELLO")).unwrap(), words);
        let swapped = ModbusVisitor {
            is_swap: true,
            ..v.clone()
        };
        assert_eq!(
            decode_registers(&swapped, PropertyType::String, &[0x4548, 0x4C4C, 0x004F, 0]).unwrap(),
            json!("HELLO")
        );
        assert!(matches!(
            encode_registers(&v, &json!("TOO LONG!")),
            Err(CodecError::OutOfRange(_))
        ));
    }

    #[test]
    fn codec_bool_from_register_is_nonzero_after_mask() {
        let v = visitor(ModbusDataType::Bool);
        assert_eq!(
            decode_registers(&v, PropertyType::Boolean, &[0x0100]).unwrap(),
            json!(true)
        );
        assert_eq!(
            decode_registers(&v, PropertyType::Boolean, &[0]).unwrap(),
            json!(false)
        );
        let m = ModbusVisitor {
            mask: Some(0x0004),
            ..v
        };
        assert_eq!(
            decode_registers(&m, PropertyType::Boolean, &[0xFFFB]).unwrap(),
            json!(false)
        );
        assert_eq!(
            decode_registers(&m, PropertyType::Boolean, &[0x0004]).unwrap(),
            json!(true)
        );
        let on = encode_registers(&m, &json!(true)).unwrap();
        assert_eq!(merge_masked(&m, &[0xFF00], &on), vec![0xFF04]);
        let off = encode_registers(&m, &json!(false)).unwrap();
        assert_eq!(merge_masked(&m, &[0xFFFF], &off), vec![0xFFFB]);
    }

    #[test]
    fn codec_mask_selects_bits_and_write_keeps_the_others() {
        let v = ModbusVisitor {
            mask: Some(0x00F0),
            ..visitor(ModbusDataType::Uint16)
        };
        assert_eq!(
            decode_registers(&v, PropertyType::Int, &[0x1234]).unwrap(),
            json!(0x30)
        );
        let w = encode_registers(&v, &json!(0x50)).unwrap();
        assert_eq!(merge_masked(&v, &[0x1234], &w), vec![0x1254]);
        assert!(matches!(
            encode_registers(&v, &json!(0x51)),
            Err(CodecError::OutOfRange(_))
        ));
    }

    #[test]
    fn codec_wrong_word_count_is_an_error() {
        assert!(matches!(
            decode_registers(&visitor(ModbusDataType::Int32), PropertyType::Int, &[1]),
            Err(CodecError::Length { .. })
        ));
    }

    #[test]
    fn plan_merges_neighbours_and_splits_tables() {
        let spans = [
            Span {
                register: RegisterType::HoldingRegister,
                offset: 0,
                count: 2,
            },
            Span {
                register: RegisterType::HoldingRegister,
                offset: 2,
                count: 1,
            },
            Span {
                register: RegisterType::HoldingRegister,
                offset: 10,
                count: 4,
            },
            Span {
                register: RegisterType::HoldingRegister,
                offset: 100,
                count: 2,
            },
            Span {
                register: RegisterType::InputRegister,
                offset: 0,
                count: 2,
            },
            Span {
                register: RegisterType::CoilRegister,
                offset: 0,
                count: 1,
            },
            Span {
                register: RegisterType::CoilRegister,
                offset: 50,
                count: 1,
            },
        ];
        let p = plan(&spans, &PlanLimits::default());
        let got: Vec<(RegisterType, u16, u16, Vec<usize>)> = p
            .iter()
            .map(|r| (r.register, r.start, r.count, r.members.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (RegisterType::CoilRegister, 0, 51, vec![5, 6]),
                (RegisterType::HoldingRegister, 0, 14, vec![0, 1, 2]),
                (RegisterType::HoldingRegister, 100, 2, vec![3]),
                (RegisterType::InputRegister, 0, 2, vec![4]),
            ]
        );
        assert_eq!(p[1].slice(&spans[2]), 10..14);
    }

    #[test]
    fn plan_single_makes_one_request_per_property() {
        let spans = [
            Span {
                register: RegisterType::HoldingRegister,
                offset: 0,
                count: 2,
            },
            Span {
                register: RegisterType::HoldingRegister,
                offset: 2,
                count: 2,
            },
        ];
        assert_eq!(plan(&spans, &PlanLimits::single()).len(), 2);
    }

    fn arb_type() -> impl Strategy<Value = ModbusDataType> {
        prop_oneof![
            Just(ModbusDataType::Int16),
            Just(ModbusDataType::Uint16),
            Just(ModbusDataType::Int32),
            Just(ModbusDataType::Uint32),
            Just(ModbusDataType::Int64),
            Just(ModbusDataType::Uint64),
            Just(ModbusDataType::Float32),
            Just(ModbusDataType::Float64),
        ]
    }

    fn arb_table() -> impl Strategy<Value = RegisterType> {
        prop_oneof![
            Just(RegisterType::CoilRegister),
            Just(RegisterType::DiscreteInputRegister),
            Just(RegisterType::HoldingRegister),
            Just(RegisterType::InputRegister),
        ]
    }

    fn arb_span() -> impl Strategy<Value = Span> {
        (arb_table(), 0u16..600, 1u16..=125).prop_flat_map(|(register, offset, count)| {
            let max = if register.is_bit() { 2000 } else { 125 };
            (Just(register), Just(offset), 1u16..=count.min(max)).prop_map(
                |(register, offset, count)| Span {
                    register,
                    offset,
                    count,
                },
            )
        })
    }

    proptest! {
        /// Raw words decode and re-encode to the same words for every type and order (NaN
        /// payloads excepted, since NaN is not JSON).
        #[test]
        fn codec_words_roundtrip_through_json(
            dt in arb_type(), rswap: bool, swap: bool, words in prop::collection::vec(any::<u16>(), 4)
        ) {
            let v = with(dt, rswap, swap);
            let w = &words[..fixed_width(dt).unwrap_or(1)];
            let ty = if dt.is_integer() { PropertyType::Int } else { PropertyType::Float };
            match decode_registers(&v, ty, w) {
                Ok(value) => prop_assert_eq!(encode_registers(&v, &value).unwrap(), w.to_vec()),
                // uint64 above i64::MAX for an int property; NaN/inf floats.
                Err(CodecError::OutOfRange(_)) => {
                    prop_assert!(matches!(dt, ModbusDataType::Uint64 | ModbusDataType::Float32 | ModbusDataType::Float64));
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        /// Integers within the type's range survive encode then decode exactly, with integral
        /// scale and valueOffset.
        #[test]
        fn codec_int_values_roundtrip_with_integral_scale(
            dt in prop_oneof![Just(ModbusDataType::Int16), Just(ModbusDataType::Uint16),
                Just(ModbusDataType::Int32), Just(ModbusDataType::Uint32),
                Just(ModbusDataType::Int64), Just(ModbusDataType::Uint64)],
            rswap: bool, swap: bool, raw: i64, scale in -5i64..=5, off in -1000i64..1000
        ) {
            prop_assume!(scale != 0);
            let (lo, hi) = int_range(dt);
            let raw = i128::from(raw).clamp(lo, hi.min(i128::from(i64::MAX)));
            let value = raw * i128::from(scale) + i128::from(off);
            prop_assume!(i64::try_from(value).is_ok());
            let v = ModbusVisitor { scale: scale as f64, value_offset: off as f64, ..with(dt, rswap, swap) };
            let json = json!(value as i64);
            let words = encode_registers(&v, &json).unwrap();
            prop_assert_eq!(decode_registers(&v, PropertyType::Int, &words).unwrap(), json);
        }

        /// Floats survive encode then decode: exactly for float64 and scale 1, within float32
        /// precision otherwise.
        #[test]
        fn codec_float_values_roundtrip(
            f64_type: bool, rswap: bool, swap: bool, x in -1.0e6f64..1.0e6, scale in 0.01f64..100.0, off in -100.0f64..100.0
        ) {
            let dt = if f64_type { ModbusDataType::Float64 } else { ModbusDataType::Float32 };
            let v = ModbusVisitor { scale, value_offset: off, ..with(dt, rswap, swap) };
            let words = encode_registers(&v, &json!(x)).unwrap();
            let back = decode_registers(&v, PropertyType::Float, &words).unwrap().as_f64().unwrap();
            let tol = if f64_type { 1e-6 } else { ((x - off).abs() / scale * 1e-6 + 1e-6) * scale };
            prop_assert!((back - x).abs() <= tol.max(1e-6), "{x} -> {back}");
        }

        /// Strings of up to 2*limit bytes without NULs survive encode then decode.
        #[test]
        fn codec_strings_roundtrip(s in "[ -~]{0,20}", swap: bool, extra in 0u16..4) {
            let limit = (s.len() as u16).div_ceil(2) + extra;
            prop_assume!(limit > 0);
            let v = ModbusVisitor { limit: Some(limit), is_swap: swap, ..visitor(ModbusDataType::String) };
            let words = encode_registers(&v, &json!(s)).unwrap();
            prop_assert_eq!(words.len(), usize::from(limit));
            let back = decode_registers(&v, PropertyType::String, &words).unwrap();
            prop_assert_eq!(back, json!(s));
        }

        /// Every span is served by exactly one request that contains it, no request exceeds the
        /// protocol limits or mixes tables, and there are never more requests than spans.
        #[test]
        fn plan_covers_every_span_exactly_within_limits(spans in prop::collection::vec(arb_span(), 0..40), single: bool) {
            let limits = if single { PlanLimits::single() } else { PlanLimits::default() };
            let p = plan(&spans, &limits);
            prop_assert!(p.len() <= spans.len());
            let mut seen = vec![0usize; spans.len()];
            for r in &p {
                let max = if r.register.is_bit() { MAX_BITS } else { MAX_REGISTERS };
                prop_assert!(r.count >= 1 && r.count <= max, "{r:?}");
                prop_assert!(u32::from(r.start) + u32::from(r.count) <= 65536);
                for &i in &r.members {
                    seen[i] += 1;
                    let s = spans[i];
                    prop_assert_eq!(s.register, r.register);
                    prop_assert!(s.offset >= r.start && s.end() <= u32::from(r.start) + u32::from(r.count));
                    prop_assert_eq!(r.slice(&s).len(), usize::from(s.count));
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
            if single {
                prop_assert_eq!(p.len(), spans.len());
            }
        }
    }
}
