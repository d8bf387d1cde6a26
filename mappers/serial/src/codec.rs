//! The pure part of the serial mapper: no I/O, no clocks.
//!
//! * **Lines**: [`LineSplitter`] cuts the byte stream from the port into lines at the profile's
//!   `lineEnding` (however the bytes arrive in chunks). Trailing `\r`/`\n` left over when a device
//!   ends lines differently from the profile are dropped; bytes that are not UTF-8 are replaced
//!   (such a line will not match a pattern and is reported as garbled). A line longer than
//!   [`MAX_LINE`] bytes is cut there, so a device that never sends the ending cannot grow memory.
//! * **Patterns**: [`Extractor`] holds a property's compiled `pattern`; the value is its named
//!   group `value`, or its only capture group.
//! * **Values**: [`convert`] turns the captured text into the model property's JSON type
//!   (`int`, `float`, `boolean`, `string`, `object`); [`parse_line`] does both steps and says
//!   "garbled line ..." when the line does not match or the value does not parse.
//! * **Templates**: [`render`] fills `{value}` of a `write` template with [`format_value`].

use edgetwin_contract::PropertyType;
use regex::Regex;
use serde_json::Value;

/// Lines are cut after this many bytes even without a line ending.
pub const MAX_LINE: usize = 4096;

/// Why a line, pattern, value or template could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The pattern is not a regular expression with a value group (validation normally
    /// prevents this).
    #[error("pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as written in the profile.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The line does not match the property's pattern.
    #[error("garbled line {line:?}: does not match pattern {pattern:?}")]
    NoMatch {
        /// The line received (without its ending).
        line: String,
        /// The property's pattern.
        pattern: String,
    },
    /// The line matches, but the captured text is not a value of the property's type.
    #[error("garbled line {line:?}: {reason}")]
    Unparsable {
        /// The line received (without its ending).
        line: String,
        /// Why the captured text is not a value.
        reason: String,
    },
    /// The value cannot be written with a template (wrong JSON type, or a line ending inside).
    #[error("cannot write {value}: {reason}")]
    Unwritable {
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// Splits a byte stream into lines at a fixed line ending.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    ending: Vec<u8>,
    buf: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for lines ended by `ending` (an empty ending is taken as `"\n"`).
    pub fn new(ending: &str) -> LineSplitter {
        let ending = if ending.is_empty() { "\n" } else { ending };
        LineSplitter {
            ending: ending.as_bytes().to_vec(),
            buf: Vec::new(),
        }
    }

    /// Feeds bytes as they came from the port; returns the lines they completed, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            self.buf.push(b);
            if self.buf.ends_with(&self.ending) {
                let n = self.buf.len() - self.ending.len();
                self.buf.truncate(n);
                out.push(self.take());
            } else if self.buf.len() >= MAX_LINE {
                out.push(self.take());
            }
        }
        out
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.buf)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        self.buf.clear();
        line
    }
}

/// A property's compiled pattern.
#[derive(Debug, Clone)]
pub struct Extractor {
    re: Regex,
    /// Index of the value's capture group.
    group: usize,
}

impl Extractor {
    /// Compiles `pattern`; the value is the named group `value`, or the only group.
    pub fn new(pattern: &str) -> Result<Extractor, CodecError> {
        let err = |reason: String| CodecError::Pattern {
            pattern: pattern.to_string(),
            reason,
        };
        let re = Regex::new(pattern).map_err(|e| err(e.to_string()))?;
        let named = re
            .capture_names()
            .position(|n| n == Some("value"))
            .filter(|i| *i > 0);
        let group = match (named, re.captures_len() - 1) {
            (Some(i), _) => i,
            (None, 1) => 1,
            (None, 0) => return Err(err("no capture group around the value".into())),
            (None, n) => return Err(err(format!("{n} capture groups and none named `value`"))),
        };
        Ok(Extractor { re, group })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        self.re.as_str()
    }

    /// Whether `line` matches the pattern at all.
    pub fn matches(&self, line: &str) -> bool {
        self.re.is_match(line)
    }

    /// The value's text in `line`, when the line matches (an optional group that did not take
    /// part gives the empty string).
    pub fn extract<'l>(&self, line: &'l str) -> Option<&'l str> {
        let caps = self.re.captures(line)?;
        Some(caps.get(self.group).map_or("", |m| m.as_str()))
    }
}

/// The value of `line` for a property with pattern `ex` and model type `ty`.
pub fn parse_line(ex: &Extractor, line: &str, ty: PropertyType) -> Result<Value, CodecError> {
    let text = ex.extract(line).ok_or_else(|| CodecError::NoMatch {
        line: line.to_string(),
        pattern: ex.pattern().to_string(),
    })?;
    convert(text, ty).map_err(|reason| CodecError::Unparsable {
        line: line.to_string(),
        reason,
    })
}

/// Converts captured text to the model type: `int` takes an optional sign and decimal digits
/// (leading zeros allowed, `"0412"` is 412; `"12.0"` is 12, `"12.5"` is refused); `float` any
/// finite decimal number; `boolean` `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no` (any case);
/// `string` the text as is; `object` a JSON object.
pub fn convert(text: &str, ty: PropertyType) -> Result<Value, String> {
    let t = text.trim();
    match ty {
        PropertyType::Int => {
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::from(i));
            }
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                    // Exact: |f| < 2^53 and integral.
                    Ok(Value::from(f as i64))
                }
                _ => Err(format!("{text:?} is not an integer")),
            }
        }
        PropertyType::Float => match t.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("{text:?} is not a finite number")),
            _ => Err(format!("{text:?} is not a number")),
        },
        PropertyType::Boolean => match t.to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => Ok(Value::Bool(true)),
            "0" | "false" | "off" | "no" => Ok(Value::Bool(false)),
            _ => Err(format!(
                "{text:?} is not a boolean (1/0, true/false, on/off, yes/no)"
            )),
        },
        PropertyType::String => Ok(Value::String(text.to_string())),
        PropertyType::Object => match serde_json::from_str::<Value>(t) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(format!("{text:?} is not a JSON object")),
        },
    }
}

/// The text a value is written as: integers in decimal, other numbers in plain decimal notation
/// (`21.5`, never `2.15e1`), booleans as `1`/`0`, strings as they are, objects as JSON.
pub fn format_value(v: &Value) -> Result<String, CodecError> {
    let text = match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.to_string()
            } else if let Some(u) = n.as_u64() {
                u.to_string()
            } else {
                n.as_f64().map(|f| f.to_string()).unwrap_or_default()
            }
        }
        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
        Value::String(s) => s.clone(),
        Value::Object(_) => v.to_string(),
        Value::Null | Value::Array(_) => {
            return Err(CodecError::Unwritable {
                value: v.to_string(),
                reason: "only numbers, booleans, strings and objects can be written".into(),
            })
        }
    };
    if text.contains(['\r', '\n']) {
        return Err(CodecError::Unwritable {
            value: v.to_string(),
            reason: "it contains a line break".into(),
        });
    }
    Ok(text)
}

/// Fills every `{value}` of `template` with [`format_value`] of `v`.
pub fn render(template: &str, v: &Value) -> Result<String, CodecError> {
    Ok(template.replace("{value}", &format_value(v)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn codec_lines_split_at_crlf_across_chunks() {
        let mut s = LineSplitter::new("\r\n");
        assert!(s.push(b"CO2=04").is_empty());
        assert_eq!(s.push(b"12ppm\r"), Vec::<String>::new());
        assert_eq!(s.push(b"\nT=21.5C\r\nALA"), vec!["CO2=0412ppm", "T=21.5C"]);
        assert_eq!(s.push(b"RM=1\r\n"), vec!["ALARM=1"]);
    }

    #[test]
    fn codec_lines_with_lf_ending_drop_a_stray_carriage_return() {
        let mut s = LineSplitter::new("\n");
        assert_eq!(s.push(b"OK\r\nX\n"), vec!["OK", "X"]);
    }

    #[test]
    fn codec_lines_without_ending_are_cut_at_max_line() {
        let mut s = LineSplitter::new("\n");
        let lines = s.push(&vec![b'a'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }

    #[test]
    fn codec_lines_with_invalid_utf8_are_kept_with_replacement_characters() {
        let mut s = LineSplitter::new("\n");
        assert_eq!(s.push(b"T=\xff1\n"), vec!["T=\u{fffd}1"]);
    }

    #[test]
    fn codec_pattern_value_is_the_only_group() {
        let ex = Extractor::new(r"^CO2=(\d+)ppm$").unwrap();
        assert_eq!(ex.extract("CO2=0412ppm"), Some("0412"));
        assert_eq!(
            parse_line(&ex, "CO2=0412ppm", PropertyType::Int).unwrap(),
            json!(412)
        );
    }

    #[test]
    fn codec_pattern_value_is_the_named_group_among_several() {
        let ex = Extractor::new(r"^T=(?P<value>-?\d+(\.\d+)?)C$").unwrap();
        assert_eq!(
            parse_line(&ex, "T=-21.5C", PropertyType::Float).unwrap(),
            json!(-21.5)
        );
        assert_eq!(
            parse_line(&ex, "T=21C", PropertyType::Float).unwrap(),
            json!(21.0)
        );
    }

    #[test]
    fn codec_pattern_without_a_value_group_is_refused() {
        assert!(matches!(
            Extractor::new(r"^T=\d+$"),
            Err(CodecError::Pattern { .. })
        ));
        assert!(matches!(
            Extractor::new(r"^(a)(b)$"),
            Err(CodecError::Pattern { .. })
        ));
        assert!(matches!(
            Extractor::new(r"^(a"),
            Err(CodecError::Pattern { .. })
        ));
    }

    #[test]
    fn codec_line_not_matching_is_garbled() {
        let ex = Extractor::new(r"^CO2=(\d+)ppm$").unwrap();
        let e = parse_line(&ex, "C#2=??ppm", PropertyType::Int).unwrap_err();
        assert!(matches!(e, CodecError::NoMatch { .. }));
        assert!(
            e.to_string().starts_with("garbled line \"C#2=??ppm\""),
            "{e}"
        );
    }

    #[test]
    fn codec_matching_line_with_unparsable_value_is_garbled() {
        let ex = Extractor::new(r"^LEVEL=(\S+)$").unwrap();
        let e = parse_line(&ex, "LEVEL=abc", PropertyType::Int).unwrap_err();
        assert!(matches!(e, CodecError::Unparsable { .. }));
        assert!(e.to_string().contains("garbled line \"LEVEL=abc\""), "{e}");
        assert!(e.to_string().contains("not an integer"), "{e}");
    }

    #[test]
    fn codec_converts_to_every_model_type() {
        assert_eq!(convert("+17", PropertyType::Int).unwrap(), json!(17));
        assert_eq!(convert("12.0", PropertyType::Int).unwrap(), json!(12));
        assert!(convert("12.5", PropertyType::Int).is_err());
        assert!(convert("99999999999999999999", PropertyType::Int).is_err());
        assert_eq!(convert("1e3", PropertyType::Float).unwrap(), json!(1000.0));
        assert!(convert("NaN", PropertyType::Float).is_err());
        assert!(convert("inf", PropertyType::Float).is_err());
        for (t, b) in [("1", true), ("OFF", false), ("True", true), ("no", false)] {
            assert_eq!(convert(t, PropertyType::Boolean).unwrap(), json!(b));
        }
        assert!(convert("2", PropertyType::Boolean).is_err());
        assert_eq!(
            convert(" v1.2 ", PropertyType::String).unwrap(),
            json!(" v1.2 ")
        );
        assert_eq!(
            convert(r#"{"a":1}"#, PropertyType::Object).unwrap(),
            json!({"a": 1})
        );
        assert!(convert("[1]", PropertyType::Object).is_err());
    }

    #[test]
    fn codec_write_template_fills_every_value_placeholder() {
        assert_eq!(
            render("SETPOINT {value}\r\n", &json!(800)).unwrap(),
            "SETPOINT 800\r\n"
        );
        assert_eq!(
            render("S {value}/{value}\n", &json!(21.5)).unwrap(),
            "S 21.5/21.5\n"
        );
        assert_eq!(
            render("RELAY {value}\n", &json!(true)).unwrap(),
            "RELAY 1\n"
        );
        assert_eq!(
            render("NAME {value}\n", &json!("lab")).unwrap(),
            "NAME lab\n"
        );
    }

    #[test]
    fn codec_write_of_huge_float_uses_plain_decimal_notation() {
        assert_eq!(
            format_value(&json!(1.0e20)).unwrap(),
            "100000000000000000000"
        );
        assert_eq!(format_value(&json!(0.000125)).unwrap(), "0.000125");
    }

    #[test]
    fn codec_write_refuses_null_arrays_and_line_breaks() {
        assert!(render("S {value}\n", &json!(null)).is_err());
        assert!(render("S {value}\n", &json!([1])).is_err());
        assert!(render("S {value}\n", &json!("a\r\nREBOOT")).is_err());
    }

    proptest! {
        /// Any chunking of a byte stream gives the same lines.
        #[test]
        fn codec_lines_do_not_depend_on_chunking(
            lines in prop::collection::vec("[ -~]{0,20}", 0..8),
            cuts in prop::collection::vec(0usize..200, 0..10),
        ) {
            let stream: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut s = LineSplitter::new("\r\n");
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(s.push(&bytes[at..c]));
                at = c;
            }
            let want: Vec<String> = lines.iter().map(|l| l.trim_end_matches(['\r', '\n']).to_string()).collect();
            prop_assert_eq!(got, want);
        }

        /// An integer written with a template comes back through the matching pattern.
        #[test]
        fn codec_int_written_by_template_reads_back_through_pattern(v in any::<i64>()) {
            let line = render("SETPOINT={value}", &json!(v)).unwrap();
            let ex = Extractor::new(r"^SETPOINT=(?P<value>[-+]?\d+)$").unwrap();
            prop_assert_eq!(parse_line(&ex, &line, PropertyType::Int).unwrap(), json!(v));
        }

        /// A finite float written with a template comes back exactly through the pattern.
        #[test]
        fn codec_float_written_by_template_reads_back_exactly(v in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let line = render("T={value}C", &json!(v)).unwrap();
            let ex = Extractor::new(r"^T=(-?\d+(?:\.\d+)?)C$").unwrap();
            let back = parse_line(&ex, &line, PropertyType::Float).unwrap();
            prop_assert_eq!(back.as_f64(), Some(v));
        }
    }
}
