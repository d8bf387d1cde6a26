//! Durations written as strings with units (`"250ms"`, `"1s"`, `"5m"`, `"1h 30m"`).
//!
//! KubeEdge users complain that its bare-number cycles have unclear units, so a bare number is
//! rejected with a message that shows how to write it instead.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A number without a unit, e.g. `"5"`.
    #[error("duration {0:?} has no unit: write e.g. \"{0}s\" or \"{0}ms\"")]
    MissingUnit(String),
    /// Not a duration at all.
    #[error(
        "invalid duration {input:?} ({reason}): write e.g. \"250ms\", \"1s\", \"5m\" or \"1h 30m\""
    )]
    Invalid {
        /// The text that was given.
        input: String,
        /// What humantime said about it.
        reason: String,
    },
}

/// A span of time, written as a string with units (humantime syntax: `250ms`, `1s`, `5m`,
/// `1h 30m`) and written back in the same form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// The zero duration.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Duration {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Duration {
        Duration(std::time::Duration::from_secs(s))
    }

    /// The standard library duration.
    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }

    /// Whether this is zero.
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        let trimmed = s.trim();
        if !trimmed.is_empty() && trimmed.parse::<f64>().is_ok() {
            return Err(DurationError::MissingUnit(trimmed.to_owned()));
        }
        humantime::parse_duration(trimmed)
            .map(Duration)
            .map_err(|e| DurationError::Invalid {
                input: s.to_owned(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, e.g. \"250ms\", \"1s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(DurationError::MissingUnit(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(DurationError::MissingUnit(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(DurationError::MissingUnit(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: a string of numbers with units (ns, us, ms, s, m, h, d), e.g. \"250ms\", \"1s\", \"5m\", \"1h 30m\". Bare numbers are rejected.",
            "type": "string",
            "pattern": "^\\s*([0-9]+\\s*[A-Za-zµ]+\\s*)+$",
            "examples": ["250ms", "1s", "5m"]
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn duration_parses_common_units() {
        assert_eq!(
            "250ms".parse::<Duration>().unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!("1s".parse::<Duration>().unwrap(), Duration::from_secs(1));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::from_secs(300));
        assert_eq!(
            "1h 30m".parse::<Duration>().unwrap(),
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn duration_writes_back_the_same_form() {
        for s in ["250ms", "1s", "5m", "1h 30m", "0s"] {
            assert_eq!(s.parse::<Duration>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn duration_rejects_bare_numbers_with_a_hint() {
        let e = "5".parse::<Duration>().unwrap_err();
        assert_eq!(e, DurationError::MissingUnit("5".into()));
        assert!(e.to_string().contains("\"5s\""), "{e}");
    }
}
