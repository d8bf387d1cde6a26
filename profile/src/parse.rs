//! One file to documents: YAML syntax, document kinds and field types, with line numbers taken
//! from serde_norway and counted from the start of the file in every document.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_norway::Value;

use crate::source::SourceDoc;
use crate::{Device, DeviceModel, Document, ProfileError};

/// Parses every document of one profile file. Empty documents are skipped. Cross-document checks
/// (model references, protocol settings) are left to [`crate::validate`].
///
/// Each document that fails yields one error (serde stops at the first problem in a document);
/// every document is tried. A YAML syntax error ends the file, since later documents cannot be
/// told apart reliably.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Document>, Vec<ProfileError>> {
    let shared: Arc<str> = Arc::from(text);
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(from_yaml_error(file, &e, None));
                break;
            }
        };
        let source = SourceDoc::new(shared.clone(), index);
        let at = |path: &str, message: String| ProfileError {
            file: file.to_owned(),
            line: source.line_of(path),
            path: path.to_owned(),
            message,
        };
        let Value::Mapping(map) = &value else {
            if !value.is_null() {
                errors.push(at(
                    "",
                    "a profile document must be a mapping with apiVersion, kind, metadata and spec"
                        .into(),
                ));
            }
            continue;
        };
        match map.get("kind") {
            Some(Value::String(k)) if k == "DeviceModel" => {
                match typed::<DeviceModel>(file, text, index) {
                    Ok(mut m) => {
                        m.set_source(source);
                        docs.push(Document::DeviceModel(m));
                    }
                    Err(e) => errors.push(e),
                }
            }
            Some(Value::String(k)) if k == "Device" => match typed::<Device>(file, text, index) {
                Ok(mut d) => {
                    d.set_source(source);
                    docs.push(Document::Device(d));
                }
                Err(e) => errors.push(e),
            },
            Some(other) => errors.push(at(
                "kind",
                format!(
                    "unknown kind {}, expected DeviceModel or Device",
                    show(other)
                ),
            )),
            None => errors.push(at(
                "",
                "missing field `kind`: expected DeviceModel or Device".into(),
            )),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => serde_norway::to_string(other)
            .map(|s| format!("`{}`", s.trim_end()))
            .unwrap_or_else(|_| "(unprintable)".into()),
    }
}

fn typed<T: DeserializeOwned>(file: &str, text: &str, index: usize) -> Result<T, ProfileError> {
    let Some(de) = serde_norway::Deserializer::from_str(text).nth(index) else {
        return Err(ProfileError {
            file: file.to_owned(),
            line: None,
            path: String::new(),
            message: "document vanished while parsing (internal error)".into(),
        });
    };
    serde_path_to_error::deserialize(de).map_err(|e| {
        let tracked = e.path().to_string();
        let mut error = from_yaml_error(file, e.inner(), Some(tracked.clone()));
        // Values checked after they were read (ids, `try_from` enums) get the position and path
        // of their parent from serde_norway; serde_path_to_error knows the field itself.
        let deeper = tracked != "."
            && looks_like_path(&tracked)
            && tracked.len() > error.path.len()
            && (error.path.is_empty()
                || tracked.starts_with(&format!("{}.", error.path))
                || tracked.starts_with(&format!("{}[", error.path)));
        if deeper {
            error.line = crate::source::line_of(text, index, &tracked).or(error.line);
            error.path = tracked;
        }
        error
    })
}

/// Splits serde_norway's `"{path}: {message} at line L column C"` into its parts.
pub(crate) fn from_yaml_error(
    file: &str,
    err: &serde_norway::Error,
    fallback_path: Option<String>,
) -> ProfileError {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(m) = message.strip_suffix(&suffix) {
            message = m.to_owned();
        }
    }
    let mut path = String::new();
    if let Some((p, rest)) = message.split_once(": ") {
        if looks_like_path(p) {
            path = p.to_owned();
            message = rest.to_owned();
        }
    }
    if path.is_empty() {
        if let Some(p) = fallback_path.filter(|p| p != "." && looks_like_path(p)) {
            path = p;
        }
    }
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'))
        .map(|(f, _)| f.to_owned())
    {
        path = if path.is_empty() {
            field
        } else {
            format!("{path}.{field}")
        };
    }
    ProfileError {
        file: file.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        path,
        message,
    }
}

fn looks_like_path(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c))
}
