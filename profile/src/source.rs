//! Finding the line of a field path (`spec.properties[2].visitors.modbus.offset`) in YAML text.
//!
//! serde_norway attaches the position of the node being deserialized to any error raised while
//! deserializing it. The locator walks the document along the path with a `DeserializeSeed`
//! and raises a marker error at the target node; the error's location is the node's line. This
//! uses serde_norway's own parser, so flow mappings (`{a: 1}`), anchors, multi-line strings and
//! multi-document files need no scanner of our own. A path that does not exist (a field left to
//! its default) resolves to its nearest existing parent.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Where a parsed document came from: the whole file text, the part of it that holds the
/// document (normally the document alone, see `parse::split_docs`), the number of lines before
/// that part, and the document's index within the part (0 unless the part is the whole stream).
/// Not part of any document's value: it compares equal to every other `SourceDoc`.
#[derive(Clone, Default)]
pub(crate) struct SourceDoc {
    text: Option<Arc<str>>,
    range: Range<usize>,
    line0: usize,
    index: usize,
}

impl SourceDoc {
    pub(crate) fn new(
        text: Arc<str>,
        range: Range<usize>,
        line0: usize,
        index: usize,
    ) -> SourceDoc {
        SourceDoc {
            text: Some(text),
            range,
            line0,
            index,
        }
    }

    /// Where the document lies in its file (range, lines before it, index within the range),
    /// without the text; `None` for a document that was not parsed from a file.
    pub(crate) fn place(&self) -> Option<(Range<usize>, usize, usize)> {
        self.text.as_ref()?;
        Some((self.range.clone(), self.line0, self.index))
    }

    /// The 1-based line, counted from the start of the file, of `path` (or of its nearest
    /// existing parent) in this document. Parses only the document's part of the file.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let text = self.text.as_deref()?.get(self.range.clone())?;
        line_of(text, self.index, path).map(|l| l + self.line0)
    }
}

impl PartialEq for SourceDoc {
    fn eq(&self, _: &SourceDoc) -> bool {
        true
    }
}

impl fmt::Debug for SourceDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceDoc")
    }
}

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// `name` in `a.name`.
    Key(String),
    /// `2` in `a[2]`.
    Index(usize),
}

/// The steps of a field path as serde_path_to_error writes it (`spec.properties[2].name`).
pub fn segments(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key.to_owned()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            match r[..end].parse() {
                Ok(i) => out.push(Seg::Index(i)),
                Err(_) => out.push(Seg::Key(r[..end].to_owned())),
            }
            rest = &r[end + 1..];
        }
    }
    out
}

const MARKER: &str = "\u{0}edgetwin-locate";

/// The 1-based line of `path` in document `index` of `text`, falling back to its parents.
pub(crate) fn line_of(text: &str, index: usize, path: &str) -> Option<usize> {
    let segs = segments(path);
    (0..=segs.len())
        .rev()
        .find_map(|n| locate(text, index, &segs[..n]))
}

fn locate(text: &str, index: usize, segs: &[Seg]) -> Option<usize> {
    let de = serde_norway::Deserializer::from_str(text).nth(index)?;
    match (Locate { rest: segs }).deserialize(de) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(MARKER) => e.location().map(|l| l.line()),
        Err(_) => None,
    }
}

struct Locate<'a> {
    rest: &'a [Seg],
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.rest.is_empty() {
            d.deserialize_any(Found)
        } else {
            d.deserialize_any(Walk { rest: self.rest })
        }
    }
}

/// Fails on whatever node it is given, so the error carries that node's position.
struct Found;

macro_rules! fail {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { Err(E::custom(MARKER)) })*
    };
}

impl<'de> Visitor<'de> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fail!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str, visit_i128: i128, visit_u128: u128);
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARKER))
    }
    fn visit_some<D: de::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(MARKER))
    }
}

/// Reads a mapping key and tells whether it is the next path segment; when it is the last
/// segment, fails on the key itself, so a field's line is the line of its key (in a block
/// mapping the value starts on the next line).
struct Key<'a> {
    target: Option<&'a str>,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl Key<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        let matches = self.target == Some(key);
        if matches && self.last {
            return Err(E::custom(MARKER));
        }
        Ok(matches)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Walks towards the target, ignoring everything beside the path.
struct Walk<'a> {
    rest: &'a [Seg],
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let target = match self.rest.first() {
            Some(Seg::Index(i)) => Some(*i),
            _ => None,
        };
        let mut i = 0;
        loop {
            if Some(i) == target {
                if seq
                    .next_element_seed(Locate {
                        rest: &self.rest[1..],
                    })?
                    .is_none()
                {
                    break;
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let target = match self.rest.first() {
            Some(Seg::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let last = self.rest.len() == 1;
        while let Some(matches) = map.next_key_seed(Key { target, last })? {
            if matches {
                map.next_value_seed(Locate {
                    rest: &self.rest[1..],
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use de::VariantAccess;
        let (tag, variant) = data.variant::<String>()?;
        match self.rest.first() {
            Some(Seg::Key(k)) if *k == tag => variant.newtype_variant_seed(Locate {
                rest: &self.rest[1..],
            }),
            _ => variant.newtype_variant::<IgnoredAny>().map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DOC: &str = "\
a: 1
b:
  c: [10, {d: 2}]
  e:
    - x: 1
    - x: 2
      y: 3
---
a: 5
z: {w: 6}
";

    #[test]
    fn locator_finds_block_and_flow_nodes() {
        assert_eq!(line_of(DOC, 0, "a"), Some(1));
        assert_eq!(line_of(DOC, 0, "b.c[1].d"), Some(3));
        assert_eq!(line_of(DOC, 0, "b.e[1].y"), Some(7));
        assert_eq!(line_of(DOC, 0, "b.e[1]"), Some(6));
    }

    #[test]
    fn locator_gives_the_key_line_of_a_block_mapping_field() {
        assert_eq!(line_of(DOC, 0, "b"), Some(2));
        assert_eq!(line_of(DOC, 0, "b.e"), Some(4));
    }

    #[test]
    fn locator_falls_back_to_the_nearest_parent() {
        assert_eq!(line_of(DOC, 0, "b.e[1].missing"), Some(6));
        assert_eq!(line_of(DOC, 0, "b.e[7].x"), Some(4));
    }

    #[test]
    fn locator_counts_lines_from_the_start_of_the_file_in_later_documents() {
        assert_eq!(line_of(DOC, 1, "a"), Some(9));
        assert_eq!(line_of(DOC, 1, "z.w"), Some(10));
    }

    #[test]
    fn a_document_split_from_its_file_counts_lines_from_the_start_of_the_file() {
        let chunks = crate::parse::split_docs(DOC).unwrap();
        assert_eq!(chunks.len(), 2);
        let second = SourceDoc::new(Arc::from(DOC), chunks[1].range.clone(), chunks[1].line0, 0);
        assert_eq!(second.line_of("a"), Some(9));
        assert_eq!(second.line_of("z.w"), Some(10));
        assert_eq!(second.line_of("z.missing"), Some(10));
        let first = SourceDoc::new(Arc::from(DOC), chunks[0].range.clone(), chunks[0].line0, 0);
        assert_eq!(first.line_of("b.e[1].y"), Some(7));
    }

    #[test]
    fn locator_splits_paths_into_keys_and_indexes() {
        assert_eq!(
            segments("spec.properties[2].visitors.modbus"),
            vec![
                Seg::Key("spec".into()),
                Seg::Key("properties".into()),
                Seg::Index(2),
                Seg::Key("visitors".into()),
                Seg::Key("modbus".into())
            ]
        );
    }
}
