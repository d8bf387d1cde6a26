//! One file to documents: YAML syntax, document kinds and field types, with line numbers taken
//! from serde_norway and counted from the start of the file in every document.
//!
//! The file is split once into documents at its `---` / `...` lines (see [`split_docs`]) and
//! each document is parsed on its own, its lines offset by the lines before it: serde_norway
//! only iterates documents from the start of a stream, so asking it for document `i` of the whole
//! file re-parses documents `0..i` (quadratic in the number of documents). Files the split cannot
//! vouch for (directives, byte order marks, line breaks other than `\n` and `\r\n`, content after
//! `...` on the same line) take the whole-stream path [`parse_stream`], which gives the same
//! results more slowly.

use std::ops::Range;
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
    parse_split(file, text).unwrap_or_else(|| parse_stream(file, text))
}

/// One document's place in the file: its bytes, and the number of lines before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) range: Range<usize>,
    pub(crate) line0: usize,
}

/// Splits `text` into documents at lines that are `---` or `...` (at the start of the line,
/// followed by a blank or the end of the line), as libyaml does: it takes these as document
/// markers in every context (a block scalar ends there, a quoted scalar or flow collection is a
/// syntax error). A `---` line starts the next chunk; a `...` line ends the current one.
///
/// `None` when the text has anything that would make libyaml see lines or documents
/// differently: a directive (`%` at the start of a line), a byte order mark, NUL, or a line break
/// other than `\n` and `\r\n` (a lone `\r`, NEL, LS, PS).
pub(crate) fn split_docs(text: &str) -> Option<Vec<Chunk>> {
    if text.contains(['\u{feff}', '\u{85}', '\u{2028}', '\u{2029}', '\0']) {
        return None;
    }
    let mut chunks = Vec::new();
    let (mut start, mut line0, mut pos) = (0, 0, 0);
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let body = body.strip_suffix('\r').unwrap_or(body);
        if body.contains('\r') || line.starts_with('%') {
            return None;
        }
        let mark = |m: &str| is_marker(line, m);
        if mark("---") {
            chunks.push(Chunk {
                range: start..pos,
                line0,
            });
            start = pos;
            line0 = n;
        }
        pos += line.len();
        if mark("...") {
            chunks.push(Chunk {
                range: start..pos,
                line0,
            });
            start = pos;
            line0 = n + 1;
        }
    }
    chunks.push(Chunk {
        range: start..text.len(),
        line0,
    });
    Some(chunks)
}

/// Whether `line` is the document marker `m` (`---` or `...`): at the start of the line and
/// followed by a blank or the end of the line (`----` is content, not a marker).
fn is_marker(line: &str, m: &str) -> bool {
    line.strip_prefix(m)
        .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r', '\n']))
}

/// [`parse_str`] one chunk at a time; `None` where only the whole-stream path can tell.
fn parse_split(file: &str, text: &str) -> Option<Result<Vec<Document>, Vec<ProfileError>>> {
    let chunks = split_docs(text)?;
    let shared: Arc<str> = Arc::from(text);
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let doc = &text[chunk.range.clone()];
        // The message of a syntax error names lines of its context too ("while parsing a block
        // mapping at line 3 column 1"): take it from the whole stream, once. It must be the
        // first error of the stream and lie in this chunk, else only the stream can tell.
        let stream_error = || {
            let e = first_value_error(text)?;
            let line = e.location()?.line();
            let end = chunks.get(k + 1).map_or(text.lines().count(), |c| c.line0);
            (line > chunk.line0 && line <= end + 1).then(|| from_yaml_error(file, &e, None))
        };
        // After a `...` the stream needs a `---` before the next document: content without one
        // is a syntax error, though the chunk alone would parse.
        if k > 0 && !is_marker(doc, "---") && !is_void(doc) {
            errors.push(stream_error()?);
            break;
        }
        let mut stream = serde_norway::Deserializer::from_str(doc);
        let value = match Value::deserialize(stream.next()?) {
            Ok(v) => v,
            Err(_) => {
                errors.push(stream_error()?);
                break;
            }
        };
        if stream.next().is_some() {
            // More than one document in the chunk (e.g. `... a: 1`): not a split we can trust.
            return None;
        }
        let source = SourceDoc::new(shared.clone(), chunk.range.clone(), chunk.line0, 0);
        errors.extend(document(
            file,
            &value,
            doc,
            0,
            chunk.line0,
            source,
            &mut docs,
        ));
    }
    Some(if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    })
}

/// Whether `doc` has nothing but blank lines and comments.
fn is_void(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim_end_matches('\r').trim_start_matches(' ');
        l.is_empty() || l.starts_with('#')
    })
}

/// The first error the whole stream gives when its documents are read as values.
fn first_value_error(text: &str) -> Option<serde_norway::Error> {
    serde_norway::Deserializer::from_str(text).find_map(|de| Value::deserialize(de).err())
}

/// [`parse_str`] on the whole stream at once, document `index` found by counting from the start
/// of the file every time: quadratic in the number of documents. This is the loader as it was
/// before [`split_docs`]; it stays for the files the split cannot handle, and as the reference the
/// split is tested against.
pub(crate) fn parse_stream(file: &str, text: &str) -> Result<Vec<Document>, Vec<ProfileError>> {
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
        let source = SourceDoc::new(shared.clone(), 0..text.len(), 0, index);
        errors.extend(document(file, &value, text, index, 0, source, &mut docs));
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// One document read as `value`: pushes it to `docs` typed, or returns its errors (every one,
/// [`all_errors`]). The document is number `index` of `text`, whose first line is line
/// `line0 + 1` of the file.
fn document(
    file: &str,
    value: &Value,
    text: &str,
    index: usize,
    line0: usize,
    source: SourceDoc,
    docs: &mut Vec<Document>,
) -> Vec<ProfileError> {
    let at = |path: &str, message: String| ProfileError {
        file: file.to_owned(),
        line: source.line_of(path),
        path: path.to_owned(),
        message,
    };
    let Value::Mapping(map) = value else {
        if !value.is_null() {
            return vec![at(
                "",
                "a profile document must be a mapping with apiVersion, kind, metadata and spec"
                    .into(),
            )];
        }
        return vec![];
    };
    if let Some(Value::String(api)) = map.get("apiVersion") {
        if api.starts_with("devices.kubeedge.io/") {
            return vec![at(
                "apiVersion",
                format!(
                    "{api} is KubeEdge's format: convert the file with `edgetwin device convert {file}` (it notes every field that has no equal here)"
                ),
            )];
        }
    }
    match map.get("kind") {
        Some(Value::String(k)) if k == "DeviceModel" => {
            match typed_from::<DeviceModel>(value, file, text, index, line0) {
                Ok(mut m) => {
                    m.set_source(source);
                    docs.push(Document::DeviceModel(m));
                    vec![]
                }
                Err(e) => all_errors(e, value, &schemas().0, file, &source),
            }
        }
        Some(Value::String(k)) if k == "Device" => {
            match typed_from::<Device>(value, file, text, index, line0) {
                Ok(d) => {
                    docs.push(Document::Device(d.into_document(source)));
                    vec![]
                }
                Err(e) => all_errors(e, value, &schemas().1, file, &source),
            }
        }
        Some(other) => vec![at(
            "kind",
            format!(
                "unknown kind {}, expected DeviceModel or Device",
                show(other)
            ),
        )],
        None => vec![at(
            "",
            "missing field `kind`: expected DeviceModel or Device".into(),
        )],
    }
}

/// The schemas of a DeviceModel and a Device document, generated once.
fn schemas() -> &'static (serde_json::Value, serde_json::Value) {
    static SCHEMAS: std::sync::OnceLock<(serde_json::Value, serde_json::Value)> =
        std::sync::OnceLock::new();
    SCHEMAS.get_or_init(|| {
        (
            crate::schema::device_model_schema(),
            crate::schema::device_schema(),
        )
    })
}

/// Every error of a document that did not convert: serde's one error (`first`) and whatever
/// else the schema walk ([`crate::check`]) finds in the document, each with its line. Where
/// both name one field, serde's message is kept when it is one of ours (a duration without a
/// unit says how to write one), the schema's words otherwise ("expected an integer between 1
/// and 247", not "expected u8").
fn all_errors(
    first: ProfileError,
    value: &Value,
    schema: &serde_json::Value,
    file: &str,
    source: &SourceDoc,
) -> Vec<ProfileError> {
    let Ok(json) = serde_json::to_value(value) else {
        return vec![first];
    };
    let problems = crate::check::problems(&json, schema);
    if problems.is_empty() {
        return vec![first];
    }
    let generic = [
        "invalid type",
        "invalid value",
        "unknown variant",
        "expected ",
    ];
    let ours = !generic.iter().any(|g| first.message.starts_with(g));
    let mut errors: Vec<ProfileError> = problems
        .into_iter()
        .map(|(path, message)| {
            let message = if ours && path == first.path {
                first.message.clone()
            } else {
                message
            };
            ProfileError {
                file: file.to_owned(),
                line: source
                    .line_of(&path)
                    .or(first.line.filter(|_| path == first.path)),
                path,
                message,
            }
        })
        .collect();
    if !errors.iter().any(|e| e.path == first.path) {
        errors.push(first);
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    errors.dedup_by(|a, b| a.path == b.path && a.message == b.message);
    errors
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => serde_norway::to_string(other)
            .map(|s| format!("`{}`", s.trim_end()))
            .unwrap_or_else(|_| "(unprintable)".into()),
    }
}

/// [`typed`], converting the already parsed `value` first: most documents are valid, and this
/// spares parsing the YAML a second time (half the time of loading a large profile file). Only a
/// document that does not convert is parsed again from its text, so every error still carries
/// the line and path the text path gives.
fn typed_from<T: DeserializeOwned>(
    value: &Value,
    file: &str,
    text: &str,
    index: usize,
    line0: usize,
) -> Result<T, ProfileError> {
    match T::deserialize(value) {
        Ok(t) => Ok(t),
        Err(_) => typed::<T>(file, text, index, line0),
    }
}

/// Document `index` of `text` as a `T`; lines are offset by `line0`.
fn typed<T: DeserializeOwned>(
    file: &str,
    text: &str,
    index: usize,
    line0: usize,
) -> Result<T, ProfileError> {
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
        error.line = error.line.map(|l| l + line0);
        // Values checked after they were read (ids, `try_from` enums) get the position and path
        // of their parent from serde_norway; serde_path_to_error knows the field itself.
        let deeper = tracked != "."
            && looks_like_path(&tracked)
            && tracked.len() > error.path.len()
            && (error.path.is_empty()
                || tracked.starts_with(&format!("{}.", error.path))
                || tracked.starts_with(&format!("{}[", error.path)));
        if deeper {
            error.line = crate::source::line_of(text, index, &tracked)
                .map(|l| l + line0)
                .or(error.line);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const MODEL: &str = "\
apiVersion: edgetwin/v1
kind: DeviceModel
metadata: {name: m}
spec:
  protocol: modbus
  properties:
    - {name: v, type: float, accessMode: ReadOnly}
";

    /// A device document named `d{i}` whose body is `spec`.
    fn device(i: usize, model: &str, port: &str, extra: &str) -> String {
        format!(
            "apiVersion: edgetwin/v1
kind: Device
metadata:
  name: d{i}
spec:
  deviceModelRef: {model}
  protocol:
    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: {port}, slaveID: 1}}
  properties:
    - name: v
      collectCycle: 1s
      visitors:
        modbus: {{register: HoldingRegister, offset: 0, limit: 2, dataType: float32}}
{extra}"
        )
    }

    /// Document bodies: valid ones, type errors, non-profile documents and syntax errors.
    fn body(kind: usize, i: usize) -> String {
        match kind {
            0 | 1 => device(i, "m", "502", ""),
            2 => MODEL.into(),
            3 => "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: m2}\nspec: {protocol: modbus, properties: [{name: v, type: int, accessMode: ReadOnly}]}\n".into(),
            4 => device(i, "nope", "502", ""),
            5 => device(i, "m", "abc", ""),
            6 => device(i, "m", "502", "  colour: red\n"),
            7 => device(i, "m", "502", "  description: |\n    text\n    ---\n\n    more\n"),
            8 => device(i, "m", "70000", "  # a comment\n"),
            9 => "apiVersion: edgetwin/v1\nkind: Device\nmetadata: {name: 'bad name'}\nspec: {deviceModelRef: m}\n".into(),
            10 => "just a string\n".into(),
            11 => "- a\n- b\n".into(),
            12 => String::new(),
            13 => "# nothing here\n\n".into(),
            14 => "apiVersion: edgetwin/v1\nmetadata: {name: x}\n".into(),
            15 => "kind: Gadget\nnote: first\n  second\n".into(),
            16 => "kind: [1, 2]\n".into(),
            17 => "a: &x 1\nb: *x\nkind: 7\n".into(),
            // Syntax and value errors: they end the file.
            18 => "a: b: c\n".into(),
            19 => "metadata: {name: x,\n".into(),
            20 => "description: \"unterminated\n".into(),
            21 => "spec:\n\tprotocol: x\n".into(),
            22 => "a: *nope\n".into(),
            23 => "kind: Device\nkind: Device\n".into(),
            24 => "notes: |\n  text\n".into(),
            25 => "kind: Gadget\n... trailing: 1\n".into(),
            26 => "%YAML 1.2\n".into(),
            27 => "key: 'multi\n  line'\nkind: Device\n".into(),
            28 => "a: [1, 2\n".into(),
            // No line break at the end: the next separator continues this line.
            29 => "kind: Gadget".into(),
            30 => "|\n  literal\n  text\n".into(),
            31 => "? complex\n: key\nkind: Gadget\n".into(),
            _ => "[a, b]\n".into(),
        }
    }

    const BODIES: usize = 33;

    /// What goes before a document.
    fn separator(kind: usize) -> &'static str {
        match kind {
            0..=3 => "---\n",
            4 => "--- \n",
            5 => "---\t# start\n",
            6 => "--- ",
            7 => "...\n---\n",
            8 => "...\n",
            9 => "... # end\n",
            10 => "\n---\n\n",
            11 => "----\n",
            12 => " ---\n",
            _ => "",
        }
    }

    const SEPARATORS: usize = 14;

    fn file(parts: &[(usize, usize)], crlf: bool, final_newline: bool, lone_cr: bool) -> String {
        let mut text = String::new();
        for (i, (sep, kind)) in parts.iter().enumerate() {
            if i > 0 || *sep % 2 == 0 {
                text.push_str(separator(*sep));
            }
            text.push_str(&body(*kind, i));
        }
        if !final_newline {
            while text.ends_with('\n') {
                text.pop();
            }
        }
        if crlf {
            text = text.replace('\n', "\r\n");
        }
        if lone_cr {
            text = text.replacen("\n", "\r", 1);
        }
        text
    }

    const PATHS: &[&str] = &[
        "",
        "kind",
        "metadata.name",
        "spec.deviceModelRef",
        "spec.protocol.modbus.port",
        "spec.properties[0].visitors.modbus.offset",
        "spec.properties[0].missing",
        "spec.properties[3]",
    ];

    fn source(doc: &Document) -> &SourceDoc {
        match doc {
            Document::DeviceModel(m) => m.source(),
            Document::Device(d) => d.source(),
        }
    }

    /// What the fast path accepts, the text path accepts too, as the same document: the fast
    /// path may only save time, never change a verdict.
    fn fast_path_agrees(text: &str) -> Result<usize, String> {
        let mut fast_ok = 0;
        let Some(chunks) = split_docs(text) else {
            return Ok(0);
        };
        for (index, chunk) in chunks.iter().enumerate() {
            let doc = &text[chunk.range.clone()];
            let Some(Ok(value)) = serde_norway::Deserializer::from_str(doc)
                .next()
                .map(Value::deserialize)
            else {
                continue;
            };
            let kind = value.get("kind").and_then(Value::as_str);
            let agree = match kind {
                Some("Device") => match Device::deserialize(&value) {
                    Ok(fast) => {
                        fast_ok += 1;
                        typed::<Device>("f", doc, 0, 0).ok() == Some(fast)
                    }
                    Err(_) => true,
                },
                Some("DeviceModel") => match DeviceModel::deserialize(&value) {
                    Ok(fast) => {
                        fast_ok += 1;
                        typed::<DeviceModel>("f", doc, 0, 0).ok() == Some(fast)
                    }
                    Err(_) => true,
                },
                _ => true,
            };
            if !agree {
                return Err(format!("document {index} differs:\n{doc}"));
            }
        }
        Ok(fast_ok)
    }

    #[test]
    fn fast_path_agrees_with_the_text_path_on_the_examples() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/profiles");
        let mut fast = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            fast += fast_path_agrees(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        assert!(
            fast > 4,
            "the fast path must actually take valid documents ({fast})"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn fast_path_agrees_with_the_text_path(
            parts in prop::collection::vec((0..SEPARATORS, 0..BODIES), 0..8),
            crlf in prop::bool::weighted(0.2),
        ) {
            let text = file(&parts, crlf, true, false);
            prop_assert!(fast_path_agrees(&text).is_ok(), "{:?}", fast_path_agrees(&text));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The split parse gives what the whole-stream parse gives: the same documents, the same
        /// errors with the same lines, the same lines for later validation errors.
        #[test]
        fn split_parse_matches_the_whole_stream_parse(
            parts in prop::collection::vec((0..SEPARATORS, 0..BODIES), 0..8),
            crlf in prop::bool::weighted(0.2),
            final_newline in prop::bool::weighted(0.8),
            lone_cr in prop::bool::weighted(0.05),
        ) {
            let text = file(&parts, crlf, final_newline, lone_cr);
            let split = parse_str("f.yaml", &text);
            let stream = parse_stream("f.yaml", &text);
            prop_assert_eq!(&split, &stream, "text:\n{}", text);
            if let (Ok(a), Ok(b)) = (split, stream) {
                for (x, y) in a.iter().zip(&b) {
                    for path in PATHS {
                        prop_assert_eq!(source(x).line_of(path), source(y).line_of(path), "path {} in\n{}", path, text);
                    }
                }
                let known = BTreeMap::new();
                let va = crate::validate(&[("f.yaml".into(), a)], &known);
                let vb = crate::validate(&[("f.yaml".into(), b)], &known);
                prop_assert_eq!(va, vb, "text:\n{}", text);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// What the parsed-document cache hands back on restart is what parsing gives: the same
        /// documents and the same lines for later validation errors.
        #[test]
        fn cached_documents_match_a_fresh_parse(
            parts in prop::collection::vec((0..SEPARATORS, 0..BODIES), 0..8),
            crlf in prop::bool::weighted(0.2),
        ) {
            let text = file(&parts, crlf, true, false);
            if let Ok(parsed) = parse_str("f.yaml", &text) {
                let fp = crate::cache::Fingerprint::of(&text);
                let bytes = crate::cache::encode("t", [("f.yaml", fp, &parsed[..])]).unwrap();
                let cached = crate::cache::ParsedCache::decode("t", &bytes).unwrap().take("f.yaml", &text);
                prop_assert_eq!(cached.as_ref(), Some(&parsed), "text:\n{}", text);
                for (x, y) in parsed.iter().zip(cached.iter().flatten()) {
                    for path in PATHS {
                        prop_assert_eq!(source(x).line_of(path), source(y).line_of(path), "path {} in\n{}", path, text);
                    }
                }
            }
        }
    }

    #[test]
    fn content_after_a_document_end_needs_a_real_document_start() {
        // `----` is content, not a `---` marker: libyaml refuses the stream, and so must the
        // split path (it used to take the chunk for a new document and report another error).
        let text = "apiVersion: edgetwin/v1\nkind: Device\n...\n----\njust a string";
        assert_eq!(parse_str("f.yaml", text), parse_stream("f.yaml", text));
    }

    #[test]
    fn split_cuts_at_document_markers_only() {
        let text = "a: 1\n---\nb: 2\n...\n# c\n--- x\n----\n ---\n---";
        let chunks = split_docs(text).unwrap();
        let parts: Vec<(&str, usize)> = chunks
            .iter()
            .map(|c| (&text[c.range.clone()], c.line0))
            .collect();
        assert_eq!(
            parts,
            [
                ("a: 1\n", 0),
                ("---\nb: 2\n...\n", 1),
                ("# c\n", 4),
                ("--- x\n----\n ---\n", 5),
                ("---", 8)
            ]
        );
    }

    #[test]
    fn split_leaves_directives_and_unusual_line_breaks_to_the_stream_parse() {
        assert!(split_docs("%YAML 1.2\n---\na: 1\n").is_none());
        assert!(split_docs("a: 1\r---\rb: 2\r").is_none());
        assert!(split_docs("a: 1\u{2028}---\u{2028}b: 2").is_none());
        assert!(split_docs("\u{feff}a: 1\n").is_none());
        assert!(split_docs("a: 1\r\n---\r\nb: 2\r\n").is_some());
    }

    #[test]
    fn typical_files_take_the_split_path_also_with_errors() {
        let mut text = MODEL.to_string();
        for i in 0..3 {
            text.push_str("---\n");
            text.push_str(&device(i, "m", if i == 1 { "abc" } else { "502" }, ""));
        }
        let errors = parse_split("f.yaml", &text).unwrap().unwrap_err();
        assert_eq!(errors.len(), 1);
        let port = text.lines().position(|l| l.contains("port: abc")).unwrap() + 1;
        assert_eq!(errors[0].line, Some(port), "{errors:?}");
        text.push_str("---\na: b: c\n");
        let errors = parse_split("f.yaml", &text).unwrap().unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[1], parse_stream("f.yaml", &text).unwrap_err()[1]);
        assert!(parse_split("f.yaml", "a: 1\n... b: 2\n").is_none());
    }

    #[test]
    fn content_after_an_end_marker_needs_a_start_marker_as_in_the_stream() {
        let text = "kind: Gadget\n...\nkind: Device\n";
        let errors = parse_split("f.yaml", text).unwrap().unwrap_err();
        assert_eq!(errors, parse_stream("f.yaml", text).unwrap_err());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[1].line, Some(3));
        assert_eq!(errors[1].message, "did not find expected <document start>");
    }

    #[test]
    fn a_late_document_reports_its_line_in_the_file() {
        let mut text = MODEL.to_string();
        for i in 0..50 {
            text.push_str("---\n");
            text.push_str(&device(i, "m", "502", ""));
        }
        text.push_str("---\n");
        text.push_str(&device(50, "m", "502", "  colour: red\n"));
        let errors = parse_str("f.yaml", &text).unwrap_err();
        let expected = text.lines().position(|l| l.contains("colour")).unwrap() + 1;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(expected));
        assert_eq!(errors[0].path, "spec.colour");
    }
}
