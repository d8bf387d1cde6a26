//! Pure conversions between OPC UA and the twin's JSON, with no I/O: node id strings, variants to
//! JSON per model property type, JSON to the variant type of a node (for writes), which status
//! codes mean "the link is gone", and which of two data values is newer.

use std::str::FromStr;

use edgetwin_contract::PropertyType;
use opcua::types::{DataValue, NodeId, StatusCode, Variant, VariantScalarTypeId};
use serde_json::Value;

/// Why a value or a node id cannot be converted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The node id string is not a valid OPC UA node id.
    #[error(
        "node id {0:?} is not a valid OPC UA node id (write e.g. \"ns=2;s=Temp\" or \"ns=2;i=5\")"
    )]
    NodeId(String),
    /// The node's value has no JSON form for the model property type.
    #[error("{variant} cannot be reported as a {ty:?} property")]
    Read {
        /// Short description of the variant that was received.
        variant: String,
        /// The model property type.
        ty: PropertyType,
    },
    /// The node has no value (an empty variant).
    #[error("the node has no value")]
    Empty,
    /// The desired JSON value does not fit the node's data type.
    #[error("{value} cannot be written to a node of type {ty:?}")]
    Write {
        /// The desired JSON value.
        value: String,
        /// The node's data type.
        ty: VariantScalarTypeId,
    },
    /// The node's data type is not one the mapper writes.
    #[error("writing nodes of type {0} is not supported (Boolean, SByte, Byte, Int16/32/64, UInt16/32/64, Float, Double, String are)")]
    WriteType(String),
}

/// A node id in the standard string form, either with a namespace index (`ns=2;s=Temp`,
/// `ns=2;i=5`, `i=2258`) or with a namespace URI (`nsu=urn:x;s=Temp`) that is resolved against
/// the server's namespace array once connected.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeAddress {
    /// Fully resolved.
    Id(NodeId),
    /// `nsu=<uri>;<rest>`: the namespace index is looked up on the server.
    Uri {
        /// The namespace URI.
        uri: String,
        /// The identifier part, e.g. `s=Temp`.
        rest: String,
    },
}

/// Parses `s` as a node id (`ns=<u16>;<i|s|g|b>=<id>`, or `nsu=<uri>;...`).
pub fn parse_node_id(s: &str) -> Result<NodeAddress, CodecError> {
    let bad = || CodecError::NodeId(s.to_string());
    if let Some(rest) = s.strip_prefix("nsu=") {
        let (uri, id) = rest.split_once(';').ok_or_else(bad)?;
        if uri.is_empty() {
            return Err(bad());
        }
        // Check the identifier part on its own (namespace 0 stands in for the URI).
        NodeId::from_str(id).map_err(|_| bad())?;
        return Ok(NodeAddress::Uri {
            uri: uri.to_string(),
            rest: id.to_string(),
        });
    }
    NodeId::from_str(s).map(NodeAddress::Id).map_err(|_| bad())
}

/// The node id of `rest` (e.g. `s=Temp`) in namespace `ns`.
pub fn node_in_namespace(ns: u16, rest: &str) -> Result<NodeId, CodecError> {
    let s = format!("ns={ns};{rest}");
    NodeId::from_str(&s).map_err(|_| CodecError::NodeId(s))
}

/// The JSON value of `v` for a model property of type `ty`.
///
/// * `boolean`: Boolean (or an integer 0/1);
/// * `int`: any integer type that fits an i64, or a float without fraction;
/// * `float`: any number (a Float keeps its shortest decimal form: 21.5f32 is 21.5);
/// * `string`: String, LocalizedText text, or the text of a number or boolean.
pub fn variant_to_json(v: &Variant, ty: PropertyType) -> Result<Value, CodecError> {
    if matches!(v, Variant::Empty) {
        return Err(CodecError::Empty);
    }
    let err = || CodecError::Read {
        variant: describe(v),
        ty,
    };
    match ty {
        PropertyType::Boolean => match v {
            Variant::Boolean(b) => Ok(Value::Bool(*b)),
            _ => match as_i128(v) {
                Some(0) => Ok(Value::Bool(false)),
                Some(1) => Ok(Value::Bool(true)),
                _ => Err(err()),
            },
        },
        PropertyType::Int => {
            if let Some(i) = as_i128(v) {
                return i64::try_from(i).map(Value::from).map_err(|_| err());
            }
            match as_f64(v) {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Ok(Value::from(f as i64)),
                _ => Err(err()),
            }
        }
        PropertyType::Float => {
            if let Some(i) = as_i128(v) {
                return Ok(Value::from(i as f64));
            }
            as_f64(v)
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(err)
        }
        PropertyType::String => match v {
            Variant::String(s) => Ok(Value::String(s.as_ref().to_string())),
            Variant::LocalizedText(t) => Ok(Value::String(t.text.as_ref().to_string())),
            Variant::Boolean(b) => Ok(Value::String(b.to_string())),
            _ => {
                if let Some(i) = as_i128(v) {
                    Ok(Value::String(i.to_string()))
                } else if let Some(f) = as_f64(v) {
                    Ok(Value::String(f.to_string()))
                } else {
                    Err(err())
                }
            }
        },
        PropertyType::Object => Err(err()),
    }
}

/// `json` as a variant of the node's data type `ty` (for a write). Integers are range checked;
/// a whole float (`3.0`) is accepted for integer types; a Float is rounded to f32.
pub fn json_to_variant(json: &Value, ty: VariantScalarTypeId) -> Result<Variant, CodecError> {
    use VariantScalarTypeId as T;
    let err = || CodecError::Write {
        value: json.to_string(),
        ty,
    };
    let int = || -> Result<i128, CodecError> {
        if let Some(i) = json.as_i64() {
            return Ok(i128::from(i));
        }
        if let Some(u) = json.as_u64() {
            return Ok(i128::from(u));
        }
        match json.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1.8e19 => Ok(f as i128),
            _ => Err(err()),
        }
    };
    let v = match ty {
        T::Boolean => match json {
            Value::Bool(b) => Variant::Boolean(*b),
            _ => match int()? {
                0 => Variant::Boolean(false),
                1 => Variant::Boolean(true),
                _ => return Err(err()),
            },
        },
        T::SByte => Variant::SByte(i8::try_from(int()?).map_err(|_| err())?),
        T::Byte => Variant::Byte(u8::try_from(int()?).map_err(|_| err())?),
        T::Int16 => Variant::Int16(i16::try_from(int()?).map_err(|_| err())?),
        T::UInt16 => Variant::UInt16(u16::try_from(int()?).map_err(|_| err())?),
        T::Int32 => Variant::Int32(i32::try_from(int()?).map_err(|_| err())?),
        T::UInt32 => Variant::UInt32(u32::try_from(int()?).map_err(|_| err())?),
        T::Int64 => Variant::Int64(i64::try_from(int()?).map_err(|_| err())?),
        T::UInt64 => Variant::UInt64(u64::try_from(int()?).map_err(|_| err())?),
        T::Float => {
            let f = json.as_f64().ok_or_else(err)?;
            let x = f as f32;
            if !x.is_finite() {
                return Err(err());
            }
            Variant::Float(x)
        }
        T::Double => Variant::Double(json.as_f64().ok_or_else(err)?),
        T::String => Variant::String(json.as_str().ok_or_else(err)?.into()),
        other => return Err(CodecError::WriteType(format!("{other:?}"))),
    };
    Ok(v)
}

/// Whether a service-level failure with `status` means the session or channel is gone (so the
/// runtime should reconnect) rather than a refusal of this request.
pub fn is_link_status(status: StatusCode) -> bool {
    // Refusals of the request itself; everything else that fails a whole service call is
    // taken as a broken session or channel (a fresh session fixes it, or the device goes offline).
    let refusals = [
        StatusCode::BadTooManyOperations,
        StatusCode::BadNothingToDo,
        StatusCode::BadUserAccessDenied,
        StatusCode::BadRequestTooLarge,
        StatusCode::BadResponseTooLarge,
        StatusCode::BadEncodingLimitsExceeded,
        StatusCode::BadServiceUnsupported,
        StatusCode::BadTimestampsToReturnInvalid,
        StatusCode::BadMaxAgeInvalid,
    ];
    !refusals.iter().any(|r| r.sub_code() == status.sub_code())
}

/// Whether `new` is not older than `old`, by source timestamp (or server timestamp when a value
/// has no source timestamp). Values without timestamps count as new.
pub fn is_newer(old: &DataValue, new: &DataValue) -> bool {
    let ts = |d: &DataValue| d.source_timestamp.or(d.server_timestamp);
    match (ts(old), ts(new)) {
        (Some(o), Some(n)) => n >= o,
        _ => true,
    }
}

fn as_i128(v: &Variant) -> Option<i128> {
    Some(match v {
        Variant::SByte(x) => i128::from(*x),
        Variant::Byte(x) => i128::from(*x),
        Variant::Int16(x) => i128::from(*x),
        Variant::UInt16(x) => i128::from(*x),
        Variant::Int32(x) => i128::from(*x),
        Variant::UInt32(x) => i128::from(*x),
        Variant::Int64(x) => i128::from(*x),
        Variant::UInt64(x) => i128::from(*x),
        _ => return None,
    })
}

fn as_f64(v: &Variant) -> Option<f64> {
    match v {
        // The shortest decimal that round-trips the f32 (21.5f32 -> 21.5, 0.1f32 -> 0.1).
        Variant::Float(f) if f.is_finite() => Some(edgetwin_mapper_sdk::shortest_f32(*f)),
        Variant::Double(d) if d.is_finite() => Some(*d),
        _ => None,
    }
}

fn describe(v: &Variant) -> String {
    match v.scalar_type_id() {
        Some(t) if !matches!(v, Variant::Array(_)) => format!("a {t:?} value"),
        _ => match v {
            Variant::Array(_) => "an array".to_string(),
            _ => "a value of an unsupported type".to_string(),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn codec_node_ids_parse_in_string_numeric_and_uri_forms() {
        assert_eq!(
            parse_node_id("ns=2;s=Temp").unwrap(),
            NodeAddress::Id(NodeId::new(2, "Temp"))
        );
        assert_eq!(
            parse_node_id("ns=2;i=5").unwrap(),
            NodeAddress::Id(NodeId::new(2, 5u32))
        );
        assert_eq!(
            parse_node_id("ns=3;s=\"Tank1\".\"Level\"").unwrap(),
            NodeAddress::Id(NodeId::new(3, "\"Tank1\".\"Level\""))
        );
        assert_eq!(
            parse_node_id("nsu=urn:plc;s=A.B").unwrap(),
            NodeAddress::Uri {
                uri: "urn:plc".into(),
                rest: "s=A.B".into()
            }
        );
        assert_eq!(
            node_in_namespace(4, "s=A.B").unwrap(),
            NodeId::new(4, "A.B")
        );
    }

    #[test]
    fn codec_bad_node_ids_are_rejected() {
        for bad in [
            "",
            "Temp",
            "ns=2;g=not-a-guid",
            "ns=x;s=T",
            "nsu=;s=T",
            "ns=2;q=1",
        ] {
            assert!(parse_node_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codec_variants_become_json_of_the_model_type() {
        let f = PropertyType::Float;
        assert_eq!(
            variant_to_json(&Variant::Float(21.5), f).unwrap(),
            json!(21.5)
        );
        assert_eq!(
            variant_to_json(&Variant::Float(0.1), f).unwrap(),
            json!(0.1)
        );
        assert_eq!(
            variant_to_json(&Variant::Double(-3.25e10), f).unwrap(),
            json!(-3.25e10)
        );
        assert_eq!(
            variant_to_json(&Variant::Int16(-7), f).unwrap(),
            json!(-7.0)
        );
        let i = PropertyType::Int;
        assert_eq!(
            variant_to_json(&Variant::Int16(-1234), i).unwrap(),
            json!(-1234)
        );
        assert_eq!(
            variant_to_json(&Variant::UInt32(3_000_000_000), i).unwrap(),
            json!(3_000_000_000u64)
        );
        assert_eq!(
            variant_to_json(&Variant::Int64(i64::MIN), i).unwrap(),
            json!(i64::MIN)
        );
        assert_eq!(
            variant_to_json(&Variant::Double(42.0), i).unwrap(),
            json!(42)
        );
        assert!(variant_to_json(&Variant::UInt64(u64::MAX), i).is_err());
        assert!(variant_to_json(&Variant::Double(1.5), i).is_err());
        let b = PropertyType::Boolean;
        assert_eq!(
            variant_to_json(&Variant::Boolean(true), b).unwrap(),
            json!(true)
        );
        assert_eq!(variant_to_json(&Variant::Byte(0), b).unwrap(), json!(false));
        assert!(variant_to_json(&Variant::Byte(2), b).is_err());
        let s = PropertyType::String;
        assert_eq!(
            variant_to_json(&Variant::from("EDGE-1"), s).unwrap(),
            json!("EDGE-1")
        );
        assert_eq!(variant_to_json(&Variant::Int32(5), s).unwrap(), json!("5"));
        assert_eq!(variant_to_json(&Variant::Empty, s), Err(CodecError::Empty));
        assert!(variant_to_json(&Variant::Double(f64::NAN), f).is_err());
        assert!(variant_to_json(&Variant::Int32(1), PropertyType::Object).is_err());
    }

    #[test]
    fn codec_json_becomes_the_variant_of_the_node_type_with_range_checks() {
        use VariantScalarTypeId as T;
        assert_eq!(
            json_to_variant(&json!(true), T::Boolean).unwrap(),
            Variant::Boolean(true)
        );
        assert_eq!(
            json_to_variant(&json!(-5), T::Int16).unwrap(),
            Variant::Int16(-5)
        );
        assert_eq!(
            json_to_variant(&json!(7.0), T::Int32).unwrap(),
            Variant::Int32(7)
        );
        assert_eq!(
            json_to_variant(&json!(u64::MAX), T::UInt64).unwrap(),
            Variant::UInt64(u64::MAX)
        );
        assert_eq!(
            json_to_variant(&json!(-1), T::Int64).unwrap(),
            Variant::Int64(-1)
        );
        assert_eq!(
            json_to_variant(&json!(65535), T::UInt16).unwrap(),
            Variant::UInt16(65535)
        );
        assert_eq!(
            json_to_variant(&json!(4_000_000_000u64), T::UInt32).unwrap(),
            Variant::UInt32(4_000_000_000)
        );
        assert_eq!(
            json_to_variant(&json!(21.5), T::Float).unwrap(),
            Variant::Float(21.5)
        );
        assert_eq!(
            json_to_variant(&json!(3), T::Double).unwrap(),
            Variant::Double(3.0)
        );
        assert_eq!(
            json_to_variant(&json!("B-7"), T::String).unwrap(),
            Variant::from("B-7")
        );
        assert!(json_to_variant(&json!(70000), T::Int16).is_err());
        assert!(json_to_variant(&json!(-1), T::UInt16).is_err());
        assert!(json_to_variant(&json!(1.5), T::Int32).is_err());
        assert!(json_to_variant(&json!("x"), T::Double).is_err());
        assert!(json_to_variant(&json!(1e300), T::Float).is_err());
        assert!(json_to_variant(&json!(2), T::Boolean).is_err());
        assert!(matches!(
            json_to_variant(&json!(1), T::Guid),
            Err(CodecError::WriteType(_))
        ));
    }

    #[test]
    fn codec_session_failures_are_link_errors_and_request_refusals_are_not() {
        assert!(is_link_status(StatusCode::BadConnectionClosed));
        assert!(is_link_status(StatusCode::BadTimeout));
        assert!(is_link_status(StatusCode::BadSessionIdInvalid));
        assert!(!is_link_status(StatusCode::BadTooManyOperations));
    }

    #[test]
    fn codec_newer_value_is_chosen_by_source_timestamp() {
        use opcua::types::DateTime;
        let at = |secs: i64| DataValue {
            value: Some(Variant::Int32(0)),
            source_timestamp: Some(DateTime::ymd_hms(2026, 1, 1, 0, 0, secs as u16)),
            ..DataValue::default()
        };
        assert!(is_newer(&at(1), &at(2)));
        assert!(is_newer(&at(2), &at(2)));
        assert!(!is_newer(&at(3), &at(2)));
        assert!(is_newer(&at(3), &DataValue::value_only(1i32)));
    }
}
