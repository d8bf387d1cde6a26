//! Parsed profile documents kept between runs, so a restart need not parse YAML again.
//!
//! Parsing YAML is most of a node's start-up with thousands of devices (about 40 µs per device
//! document; JSON of the same typed documents reads about ten times faster). The cache maps a
//! file key to the SHA-256 of the text it was parsed from and the typed documents with their
//! place in the file, so errors found later (a model removed from another file) still name the
//! line. An entry is used only for the very text it was made from, and a cache is used only by
//! the build that wrote it ([`ParsedCache::decode`] takes a build id), so a parser change in a
//! new release can never be masked by an old cache. Anything unreadable is ignored: the cache
//! only ever saves time, it never decides what a file means.
//!
//! No I/O here: the registry reads and writes the bytes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::source::SourceDoc;
use crate::{Device, DeviceModel, Document};

/// Layout of the cache bytes; a cache of another layout is ignored.
const FORMAT: u32 = 1;

/// SHA-256 of a profile file's text: what says two texts are the same without keeping either.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `text`.
    pub fn of(text: &str) -> Fingerprint {
        Fingerprint(Sha256::digest(text.as_bytes()).into())
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(s: &str) -> Option<Fingerprint> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.hex()[..12])
    }
}

/// Why cache bytes were not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Not JSON of the cache's shape.
    #[error("unreadable profile cache: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Written by another build or in another layout.
    #[error("profile cache written by {found:?}, this is {expected:?}")]
    OtherBuild {
        /// The build id in the cache.
        found: String,
        /// This build's id.
        expected: String,
    },
}

/// The documents of every cached file, taken out one file at a time.
#[derive(Debug, Default)]
pub struct ParsedCache {
    files: HashMap<String, (Fingerprint, Vec<OwnedDoc>)>,
}

impl ParsedCache {
    /// The cache in `bytes` if `build` wrote it.
    pub fn decode(build: &str, bytes: &[u8]) -> Result<ParsedCache, CacheError> {
        let raw: Owned = serde_json::from_slice(bytes)?;
        if raw.format != FORMAT || raw.build != build {
            return Err(CacheError::OtherBuild {
                found: format!("{} (format {})", raw.build, raw.format),
                expected: format!("{build} (format {FORMAT})"),
            });
        }
        let files = raw
            .files
            .into_iter()
            .filter_map(|(k, f)| Some((k, (Fingerprint::from_hex(&f.sha256)?, f.docs))))
            .collect();
        Ok(ParsedCache { files })
    }

    /// Files in the cache.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the cache holds no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The documents of `file` if they were parsed from `text` (the entry is removed either
    /// way). Their places are checked against `text`, so a damaged entry is refused, not used.
    pub fn take(&mut self, file: &str, text: &str) -> Option<Vec<Document>> {
        let (fingerprint, docs) = self.files.remove(file)?;
        if fingerprint != Fingerprint::of(text) {
            return None;
        }
        let shared: Arc<str> = Arc::from(text);
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            let [start, end, line0, index] = d.at;
            if start > end || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
                return None;
            }
            let source = SourceDoc::new(shared.clone(), start..end, line0, index);
            out.push(match d.doc {
                OwnedKind::DeviceModel(mut m) => {
                    m.set_source(source);
                    Document::DeviceModel(m)
                }
                OwnedKind::Device(dev) => Document::Device(dev.into_document(source)),
            });
        }
        Some(out)
    }
}

/// The cache bytes of `files` (key, text fingerprint, its documents) for `build`. A file with
/// a document that has no place in its file (not parsed from text) is left out.
pub fn encode<'a>(
    build: &str,
    files: impl IntoIterator<Item = (&'a str, Fingerprint, &'a [Document])>,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Borrowed {
        format: FORMAT,
        build,
        files: Vec::new(),
    };
    'files: for (key, fingerprint, docs) in files {
        let mut entry = BorrowedFile {
            sha256: fingerprint.hex(),
            docs: Vec::with_capacity(docs.len()),
        };
        for doc in docs {
            let (source, kind) = match doc {
                Document::DeviceModel(m) => (m.source(), BorrowedKind::DeviceModel(m)),
                Document::Device(d) => (d.source(), BorrowedKind::Device(d)),
            };
            let Some((range, line0, index)) = source.place() else {
                continue 'files;
            };
            entry.docs.push(BorrowedDoc {
                at: [range.start, range.end, line0, index],
                doc: kind,
            });
        }
        out.files.push((key, entry));
    }
    serde_json::to_vec(&out)
}

#[derive(Serialize)]
struct Borrowed<'a> {
    format: u32,
    build: &'a str,
    #[serde(serialize_with = "as_map")]
    files: Vec<(&'a str, BorrowedFile<'a>)>,
}

fn as_map<S: serde::Serializer>(
    files: &[(&str, BorrowedFile<'_>)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(files.iter().map(|(k, v)| (k, v)))
}

#[derive(Serialize)]
struct BorrowedFile<'a> {
    sha256: String,
    docs: Vec<BorrowedDoc<'a>>,
}

/// `at`: byte range start and end, lines before the range, document index within it.
#[derive(Serialize)]
struct BorrowedDoc<'a> {
    at: [usize; 4],
    doc: BorrowedKind<'a>,
}

#[derive(Serialize)]
enum BorrowedKind<'a> {
    DeviceModel(&'a DeviceModel),
    Device(&'a Device),
}

#[derive(Deserialize)]
struct Owned {
    format: u32,
    build: String,
    files: HashMap<String, OwnedFile>,
}

#[derive(Deserialize)]
struct OwnedFile {
    sha256: String,
    docs: Vec<OwnedDoc>,
}

#[derive(Debug, Deserialize)]
struct OwnedDoc {
    at: [usize; 4],
    doc: OwnedKind,
}

#[derive(Debug, Deserialize)]
enum OwnedKind {
    DeviceModel(DeviceModel),
    Device(Device),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::parse_str;

    const MODEL: &str = "apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {name: m}\nspec:\n  protocol: modbus\n  properties:\n  - {name: v, type: float, accessMode: ReadWrite, minimum: 0.5, maximum: 1e300}\n";

    fn device(name: &str) -> String {
        format!("---\napiVersion: edgetwin/v1\nkind: Device\nmetadata:\n  name: {name}\n  labels: {{room: \"ü\"}}\nspec:\n  deviceModelRef: m\n  protocol:\n    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: 502, slaveID: 1, timeout: 250ms}}\n  properties:\n  - name: v\n    collectCycle: 1500ms\n    visitors:\n      modbus: {{register: HoldingRegister, offset: 3, limit: 2, dataType: float32, scale: 0.1}}\n")
    }

    fn file() -> String {
        format!("{MODEL}{}{}", device("d1"), device("d2"))
    }

    fn round_trip(key: &str, text: &str) -> Option<Vec<Document>> {
        let docs = parse_str(key, text).expect("valid");
        let bytes = encode("b1", [(key, Fingerprint::of(text), &docs[..])]).expect("encodes");
        ParsedCache::decode("b1", &bytes)
            .expect("decodes")
            .take(key, text)
    }

    #[test]
    fn cached_documents_equal_the_parsed_ones_and_keep_their_lines() {
        let text = file();
        let parsed = parse_str("f.yaml", &text).unwrap();
        let cached = round_trip("f.yaml", &text).expect("cache hit");
        assert_eq!(cached, parsed);
        for (a, b) in parsed.iter().zip(&cached) {
            let (sa, sb) = match (a, b) {
                (Document::Device(a), Document::Device(b)) => (a.source(), b.source()),
                (Document::DeviceModel(a), Document::DeviceModel(b)) => (a.source(), b.source()),
                _ => panic!("kinds differ"),
            };
            assert_eq!(sa.place(), sb.place());
            assert_eq!(sa.line_of("spec"), sb.line_of("spec"));
            assert!(sb.line_of("spec").is_some());
        }
    }

    #[test]
    fn an_entry_is_used_only_for_the_text_it_was_made_from() {
        let text = file();
        let docs = parse_str("f.yaml", &text).unwrap();
        let bytes = encode("b1", [("f.yaml", Fingerprint::of(&text), &docs[..])]).unwrap();
        let mut cache = ParsedCache::decode("b1", &bytes).unwrap();
        assert!(cache.take("f.yaml", &text.replace("d2", "d3")).is_none());
        // Taken entries are gone: a second take never hands out documents twice.
        assert!(cache.take("f.yaml", &text).is_none());
        assert!(ParsedCache::decode("b1", &bytes)
            .unwrap()
            .take("other.yaml", &text)
            .is_none());
    }

    #[test]
    fn another_build_or_damaged_bytes_are_refused() {
        let text = file();
        let docs = parse_str("f.yaml", &text).unwrap();
        let bytes = encode("b1", [("f.yaml", Fingerprint::of(&text), &docs[..])]).unwrap();
        assert!(matches!(
            ParsedCache::decode("b2", &bytes),
            Err(CacheError::OtherBuild { .. })
        ));
        assert!(matches!(
            ParsedCache::decode("b1", &bytes[..bytes.len() / 2]),
            Err(CacheError::Malformed(_))
        ));
    }

    #[test]
    fn a_place_outside_the_text_is_refused() {
        let text = file();
        let docs = parse_str("f.yaml", &text).unwrap();
        let bytes = encode("b1", [("f.yaml", Fingerprint::of(&text), &docs[..])]).unwrap();
        let json = String::from_utf8(bytes).unwrap();
        // Point the first document's range past the end of the text.
        let start = json.find("\"at\":[").unwrap() + 6;
        let end = start + json[start..].find(']').unwrap();
        let damaged = format!("{}0,99999,0,0{}", &json[..start], &json[end..]);
        let mut cache = ParsedCache::decode("b1", damaged.as_bytes()).unwrap();
        assert!(cache.take("f.yaml", &text).is_none());
    }

    #[test]
    fn every_example_profile_round_trips() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("examples/profiles") {
            let path = entry.unwrap().path();
            if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let Ok(parsed) = parse_str("x.yaml", &text) else {
                continue;
            };
            assert_eq!(
                round_trip("x.yaml", &text).as_ref(),
                Some(&parsed),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen > 0, "no example profile found in {dir}");
    }
}
