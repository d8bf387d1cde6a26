//! Validated identifiers. An id that reaches a topic can never contain `/`, `+`, `#`, a leading `$`
//! or be empty, so no payload can address a topic it was not meant for.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct IdError {
    /// Which kind of id was being checked.
    pub kind: &'static str,
    /// The offending input (truncated to 140 characters).
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

const MAX_ID_LEN: usize = 128;

fn check(
    kind: &'static str,
    s: &str,
    first_extra: &[char],
    rest_extra: &[char],
) -> Result<(), IdError> {
    let err = |reason| IdError {
        kind,
        value: s.chars().take(140).collect(),
        reason,
    };
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return Err(err("must not be empty"));
    };
    if s.len() > MAX_ID_LEN {
        return Err(err("must be at most 128 characters"));
    }
    if !(first.is_ascii_alphanumeric() || first_extra.contains(&first)) {
        return Err(err("must start with a letter or digit"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || rest_extra.contains(&c)) {
        return Err(err(if rest_extra.contains(&'.') {
            "may only contain letters, digits, '_', '.' and '-'"
        } else {
            "may only contain letters, digits, '_' and '-'"
        }));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $first:expr, $rest:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($kind, &s, $first, $rest)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $name::PATTERN,
                    "maxLength": 128
                })
            }
        }
    };
}

id_type!(
    /// A device name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    DeviceId, "device id", &[], &['_', '.', '-']
);
id_type!(
    /// A node name, same rule as a device name.
    NodeId, "node id", &[], &['_', '.', '-']
);
id_type!(
    /// A protocol name (`modbus`, `opcua`, ...), same rule as a device name.
    ProtocolName, "protocol name", &[], &['_', '.', '-']
);
id_type!(
    /// A property name: `[A-Za-z0-9_][A-Za-z0-9_-]{0,127}`; no `.` so dotted paths stay free for
    /// nested addressing later, and never `$`-prefixed so `$version` cannot collide.
    PropertyName, "property name", &['_'], &['_', '-']
);

impl DeviceId {
    /// The regular expression the id must match (for JSON Schema).
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$";
}
impl NodeId {
    /// The regular expression the id must match (for JSON Schema).
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$";
}
impl ProtocolName {
    /// The regular expression the id must match (for JSON Schema).
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$";
}
impl PropertyName {
    /// The regular expression the name must match (for JSON Schema).
    pub const PATTERN: &'static str = "^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$";
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_id_rejects_topic_metacharacters() {
        for bad in ["", "a/b", "a+", "#", "$sys", "-lead", "a b", "é"] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["meter-7", "a", "A.b_c-9", "0"] {
            assert!(DeviceId::new(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn device_id_rejects_more_than_128_chars() {
        assert!(DeviceId::new("a".repeat(128)).is_ok());
        assert!(DeviceId::new("a".repeat(129)).is_err());
    }

    #[test]
    fn property_name_rejects_dollar_and_dot() {
        assert!(PropertyName::new("$version").is_err());
        assert!(PropertyName::new("a.b").is_err());
        assert!(PropertyName::new("_x").is_ok());
    }

    proptest! {
        #[test]
        fn device_id_accepts_exactly_the_documented_pattern(s in "\\PC{0,20}") {
            let re_ok = !s.is_empty()
                && s.len() <= 128
                && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            prop_assert_eq!(DeviceId::new(s.clone()).is_ok(), re_ok);
        }
    }
}
