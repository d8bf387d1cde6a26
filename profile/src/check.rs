//! Every type error of one document at once, in a field engineer's words.
//!
//! serde stops at the first problem in a document, so a file with five mistakes took five
//! rounds of `device validate`. When a document does not convert to its type, its value tree is
//! walked against the JSON Schema generated from that same type ([`crate::schema`]), which
//! finds every field that does not fit and says what it expects in words: "an integer between 1
//! and 247", not "u8"; "a mapping", not "map". Only the keywords schemars emits for our types
//! are understood (`$ref`, `allOf`, `anyOf`/`oneOf`, `const`, `enum`, `type`, `minimum`,
//! `maximum`, `pattern`, `maxLength`, `properties`, `required`, `additionalProperties`,
//! `minProperties`/`maxProperties`, `items`); a schema that cannot be followed finds nothing,
//! and the caller falls back to serde's one error.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// One problem: the field path (`spec.properties[0].visitors.modbus.slaveID`; empty for the
/// document) and what is wrong, in words.
pub(crate) type Problem = (String, String);

/// Every problem of `value` against the root schema `root` (with its `definitions`).
pub(crate) fn problems(value: &Value, root: &Value) -> Vec<Problem> {
    let empty = Map::new();
    let defs = root
        .get("definitions")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut c = Checker {
        defs,
        regexes: HashMap::new(),
    };
    let mut out = Vec::new();
    c.check(value, root, "", None, &mut out);
    out
}

struct Checker<'a> {
    defs: &'a Map<String, Value>,
    regexes: HashMap<String, Option<regex::Regex>>,
}

impl Checker<'_> {
    /// Checks `v` against schema `s` at `path`; `def` is the definition being checked (its
    /// name gives words to a pattern).
    fn check(
        &mut self,
        v: &Value,
        s: &Value,
        path: &str,
        def: Option<&str>,
        out: &mut Vec<Problem>,
    ) {
        let Some(s) = s.as_object() else { return };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/definitions/");
            if let Some(target) = self.defs.get(name) {
                self.check(v, target, path, Some(name), out);
            }
            return;
        }
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            for sub in all {
                self.check(v, sub, path, def, out);
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = s.get(key).and_then(Value::as_array) {
                self.one_of(v, alts, path, def, out);
            }
        }
        if let Some(c) = s.get("const") {
            if v != c {
                out.push((path.into(), format!("expected {}, got {}", show(c), got(v))));
                return;
            }
        }
        if let Some(options) = s.get("enum").and_then(Value::as_array) {
            if !options.contains(v) {
                out.push((
                    path.into(),
                    format!("expected one of {}, got {}", list(options), got(v)),
                ));
                return;
            }
        }
        if let Some(ty) = s.get("type") {
            let types: Vec<&str> = match ty {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            if !types.is_empty() && !types.iter().any(|t| has_type(v, t)) {
                out.push((
                    path.into(),
                    format!("expected {}, got {}", expected(s, &types, def), got(v)),
                ));
                return;
            }
        }
        match v {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let min = s.get("minimum").and_then(Value::as_f64);
                let max = s.get("maximum").and_then(Value::as_f64);
                if min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m) {
                    let types = match s.get("type").and_then(Value::as_str) {
                        Some(t) => vec![t],
                        None => vec!["number"],
                    };
                    out.push((
                        path.into(),
                        format!("expected {}, got {}", expected(s, &types, def), got(v)),
                    ));
                }
            }
            Value::String(text) => {
                let too_long = s
                    .get("maxLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| text.chars().count() as u64 > m);
                let mismatch = s
                    .get("pattern")
                    .and_then(Value::as_str)
                    .and_then(|p| self.regex(p))
                    .is_some_and(|re| !re.is_match(text));
                if too_long || mismatch {
                    out.push((
                        path.into(),
                        format!("expected {}, got {}", expected(s, &["string"], def), got(v)),
                    ));
                }
            }
            Value::Object(map) => self.object(map, s, path, out),
            Value::Array(items) => {
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.check(x, item, &format!("{path}[{i}]"), None, out);
                    }
                }
            }
            _ => {}
        }
    }

    fn object(
        &mut self,
        map: &Map<String, Value>,
        s: &Map<String, Value>,
        path: &str,
        out: &mut Vec<Problem>,
    ) {
        let at = |k: &str| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        };
        let empty = Map::new();
        let props = s
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let extra = s.get("additionalProperties");
        let one_entry = s.get("maxProperties").and_then(Value::as_u64) == Some(1);
        if one_entry && map.len() != 1 {
            let names: Vec<&str> = props.keys().map(String::as_str).collect();
            out.push((
                path.into(),
                format!(
                    "expected exactly one entry, keyed by the protocol (e.g. {}), got {}",
                    names.join(", "),
                    if map.is_empty() {
                        "none".to_string()
                    } else {
                        map.keys()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            ));
        }
        for (k, x) in map {
            match props.get(k) {
                Some(sub) => self.check(x, sub, &at(k), None, out),
                None => match extra {
                    Some(Value::Bool(false)) => {
                        let mut known: Vec<&str> = props.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        out.push((
                            at(k),
                            format!(
                                "unknown field `{k}`; the fields here are {}",
                                known.join(", ")
                            ),
                        ));
                    }
                    Some(sub @ Value::Object(_)) => self.check(x, sub, &at(k), None, out),
                    _ => {}
                },
            }
        }
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    out.push((path.into(), format!("missing field `{r}`")));
                }
            }
        }
    }

    /// `anyOf`/`oneOf`: fine when one alternative fits. Otherwise a list of constants is "one
    /// of ..."; `X or null` (an optional field) reports what X found; anything else the
    /// alternative that came closest.
    fn one_of(
        &mut self,
        v: &Value,
        alts: &[Value],
        path: &str,
        def: Option<&str>,
        out: &mut Vec<Problem>,
    ) {
        let mut best: Option<Vec<Problem>> = None;
        for alt in alts {
            let mut found = Vec::new();
            self.check(v, alt, path, def, &mut found);
            if found.is_empty() {
                return;
            }
            if best.as_ref().is_none_or(|b| found.len() < b.len()) {
                best = Some(found);
            }
        }
        let consts: Vec<&Value> = alts.iter().filter_map(|a| a.get("const")).collect();
        if !consts.is_empty() && consts.len() == alts.len() {
            let options: Vec<Value> = consts.into_iter().cloned().collect();
            out.push((
                path.into(),
                format!("expected one of {}, got {}", list(&options), got(v)),
            ));
        } else if let Some(b) = best {
            out.extend(b);
        }
    }

    fn regex(&mut self, pattern: &str) -> Option<&regex::Regex> {
        self.regexes
            .entry(pattern.to_string())
            .or_insert_with(|| regex::Regex::new(pattern).ok())
            .as_ref()
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

/// What a schema expects, in words.
fn expected(s: &Map<String, Value>, types: &[&str], def: Option<&str>) -> String {
    let words: Vec<String> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match *t {
            "integer" | "number" => {
                let what = if *t == "integer" {
                    "an integer"
                } else {
                    "a number"
                };
                let min = s.get("minimum").and_then(Value::as_f64);
                let max = s.get("maximum").and_then(Value::as_f64);
                match (min, max) {
                    (Some(a), Some(b)) => format!("{what} between {a} and {b}"),
                    (Some(a), None) if a == 0.0 && *t == "integer" => {
                        "a whole number (0 or more)".to_string()
                    }
                    (Some(a), None) => format!("{what} of at least {a}"),
                    (None, Some(b)) => format!("{what} of at most {b}"),
                    (None, None) => what.to_string(),
                }
            }
            "string" => match def {
                Some("Duration") => "a duration with a unit, e.g. 250ms, 1s, 5m or 1h 30m".into(),
                Some("PropertyName") => format!(
                    "a name of letters, digits, '_' or '-', starting with a letter, digit or '_'{}",
                    at_most(s)
                ),
                Some("DeviceId" | "ProtocolName") => format!(
                    "a name of letters, digits, '_', '.' or '-', starting with a letter or digit{}",
                    at_most(s)
                ),
                _ => "text".into(),
            },
            "boolean" => "true or false".into(),
            "object" => "a mapping".into(),
            "array" => "a list".into(),
            other => other.to_string(),
        })
        .collect();
    if words.is_empty() {
        "nothing".into()
    } else {
        words.join(" or ")
    }
}

/// `, at most N long` for a schema with `maxLength`.
fn at_most(s: &Map<String, Value>) -> String {
    s.get("maxLength")
        .and_then(Value::as_u64)
        .map(|m| format!(", at most {m} long"))
        .unwrap_or_default()
}

/// A value as the engineer wrote it, in words.
fn got(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the text {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn list(options: &[Value]) -> String {
    options.iter().map(show).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device_problems(v: Value) -> Vec<Problem> {
        problems(&v, &crate::schema::device_schema())
    }

    fn good() -> Value {
        json!({
            "apiVersion": "edgetwin/v1", "kind": "Device", "metadata": {"name": "m-1"},
            "spec": {
                "deviceModelRef": "meter",
                "protocol": {"modbus": {"communicateMode": "TCP", "ip": "10.0.0.2", "slaveID": 1}},
                "properties": [{"name": "v", "collectCycle": "1s",
                    "visitors": {"modbus": {"register": "HoldingRegister", "offset": 0, "dataType": "float32"}}}]
            }
        })
    }

    #[test]
    fn check_a_valid_document_has_no_problem() {
        assert_eq!(device_problems(good()), vec![]);
    }

    #[test]
    fn check_finds_every_problem_of_a_document_in_words() {
        let mut d = good();
        d["spec"]["protocol"]["modbus"]["slaveID"] = json!(300);
        d["spec"]["protocol"]["modbus"]["communicateMode"] = json!("UDP");
        d["spec"]["properties"][0]["collectCycle"] = json!(5);
        d["spec"]["properties"][0]["visitors"]["modbus"]["offset"] = json!("zero");
        d["spec"]["properties"][0]["telemetry"] = json!({"on": true});
        d["spec"]["colour"] = json!("red");
        let found = device_problems(d);
        let at = |p: &str| {
            found
                .iter()
                .find(|(path, _)| path == p)
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| panic!("nothing at {p}: {found:#?}"))
        };
        assert_eq!(
            at("spec.protocol.modbus.slaveID"),
            "expected an integer between 1 and 247, got the number 300"
        );
        assert_eq!(
            at("spec.protocol.modbus.communicateMode"),
            "expected one of `TCP`, `RTU`, got the text \"UDP\""
        );
        assert!(at("spec.properties[0].collectCycle").contains("a duration with a unit"));
        assert!(at("spec.properties[0].visitors.modbus.offset")
            .starts_with("expected an integer between 0 and 65535"));
        assert_eq!(
            at("spec.properties[0].telemetry"),
            "expected true or false, got a mapping"
        );
        assert!(at("spec.colour").starts_with("unknown field `colour`; the fields here are"));
        assert_eq!(found.len(), 6, "{found:#?}");
    }

    #[test]
    fn check_names_missing_fields_and_one_entry_sections() {
        let mut d = good();
        d["spec"]["protocol"] = json!({});
        d["metadata"] = json!({});
        let found = device_problems(d);
        assert!(
            found.contains(&("metadata".into(), "missing field `name`".into())),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|(p, m)| p == "spec.protocol" && m.contains("exactly one entry")),
            "{found:#?}"
        );
    }
}
