//! Loading a folder of profile files: the only place this crate touches the file system.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use crate::validate::{borrowed, validate_with};
use crate::{parse_str, Device, Document, ProfileError, ProfileSet};

/// Loads every `*.yaml` and `*.yml` file directly in `dir` (not in subfolders; names starting
/// with `.` are skipped as editor files), in name order.
///
/// A file with any error contributes nothing, and the files that are valid load as usual; a
/// device whose model is defined in a rejected file is rejected too (with a message naming that
/// file). Returns what loaded and every error found.
pub fn load_dir(dir: &Path) -> (ProfileSet, Vec<ProfileError>) {
    let mut errors = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ProfileError {
                file: dir.display().to_string(),
                line: None,
                path: String::new(),
                message: format!("cannot read the folder: {e}"),
            });
            return (ProfileSet::default(), errors);
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_profile_file(p))
        .collect();
    files.sort();

    let mut parsed: Vec<(String, Vec<Document>)> = Vec::new();
    for path in files {
        let name = path.display().to_string();
        match fs::read_to_string(&path) {
            Ok(text) => match parse_str(&name, &text) {
                Ok(docs) => parsed.push((name, docs)),
                Err(es) => errors.extend(es),
            },
            Err(e) => errors.push(ProfileError {
                file: name,
                line: None,
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }),
        }
    }

    let (set, rejected) = settle(&parsed);
    errors.extend(rejected);
    (set, errors)
}

/// Validates the parsed files together, rejecting every file with an error; rejecting a file can
/// break references from other files, so this goes on in rounds until nothing more is rejected.
/// Returns the set of the files left and the errors of every round, round by round.
///
/// Only the first round is a full validation. A file that passed a round fails the next only
/// through its devices whose model was defined in a file rejected in that round (its duplicate
/// definitions were rejected before, and a device's other findings do not depend on other
/// files), so each later round's errors come from an index of the devices by model: each device
/// is looked at once, not once per round. The set is validated once more at the end.
pub(crate) fn settle(parsed: &[(String, Vec<Document>)]) -> (ProfileSet, Vec<ProfileError>) {
    let files = borrowed(parsed);
    let mut alive = vec![true; files.len()];
    // Per model name: definitions in files still alive, and the devices using it.
    let mut defined: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (f, (_, docs)) in files.iter().enumerate() {
        for (i, doc) in docs.iter().enumerate() {
            match doc {
                Document::DeviceModel(m) => *defined.entry(m.name()).or_default() += 1,
                Document::Device(d) => users.entry(d.model_ref()).or_default().push((f, i)),
            }
        }
    }
    let mut errors = Vec::new();
    let mut rejected_models: BTreeMap<String, String> = BTreeMap::new();
    let mut round = validate_with(&files, &BTreeMap::new(), &rejected_models);
    // Later rounds are predicted from the index until one finds nothing (see above).
    let mut predicting = true;
    loop {
        let es = match round {
            Ok(set) => return (set, errors),
            Err(es) => es,
        };
        let bad: BTreeSet<&str> = es.iter().map(|e| e.file.as_str()).collect();
        let removed: Vec<usize> = (0..files.len())
            .filter(|&f| alive[f] && bad.contains(files[f].0))
            .collect();
        for &f in &removed {
            for doc in files[f].1 {
                if let Document::DeviceModel(m) = doc {
                    rejected_models.insert(m.name().to_owned(), files[f].0.to_owned());
                }
            }
        }
        errors.extend(es);
        if removed.is_empty() {
            return (ProfileSet::default(), errors);
        }
        let mut broken = Vec::new();
        for &f in &removed {
            alive[f] = false;
        }
        for &f in &removed {
            for doc in files[f].1 {
                let Document::DeviceModel(m) = doc else {
                    continue;
                };
                let Some(n) = defined.get_mut(m.name()) else {
                    continue;
                };
                *n -= 1;
                if *n == 0 {
                    let using = users.get(m.name()).map_or(&[][..], Vec::as_slice);
                    broken.extend(using.iter().filter(|(uf, _)| alive[*uf]));
                }
            }
        }
        let rest = || -> Vec<(&str, &[Document])> {
            (0..files.len())
                .filter(|&f| alive[f])
                .map(|f| files[f])
                .collect()
        };
        round = if !predicting {
            validate_with(&rest(), &BTreeMap::new(), &rejected_models)
        } else if broken.is_empty() {
            // Nothing more should fail: the last round validates in full, and should it find
            // anything after all, the rounds go on in full.
            predicting = false;
            validate_with(&rest(), &BTreeMap::new(), &rejected_models)
        } else {
            broken.sort_unstable();
            broken.dedup();
            Err(broken
                .iter()
                .filter_map(|&(f, i)| match &files[f].1[i] {
                    Document::Device(d) => Some(unresolved(files[f].0, d, &rejected_models)),
                    Document::DeviceModel(_) => None,
                })
                .collect())
        };
    }
}

/// The error a device gets when its model is defined only in rejected files (the one the full
/// validation gives it).
fn unresolved(file: &str, d: &Device, rejected_models: &BTreeMap<String, String>) -> ProfileError {
    let path = "spec.deviceModelRef";
    let message = match rejected_models.get(d.model_ref()) {
        Some(f) => format!(
            "device model {:?} is defined in {f}, which has errors",
            d.model_ref()
        ),
        None => format!("unknown device model {:?}", d.model_ref()),
    };
    ProfileError {
        file: file.to_owned(),
        line: d.source().line_of(path),
        path: path.to_owned(),
        message,
    }
}

fn is_profile_file(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = p
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml && p.is_file()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    /// `settle` as it was: a full validation every round.
    fn settle_reference(parsed: &[(String, Vec<Document>)]) -> (ProfileSet, Vec<ProfileError>) {
        let mut parsed = parsed.to_vec();
        let mut errors = Vec::new();
        let mut rejected_models: BTreeMap<String, String> = BTreeMap::new();
        loop {
            match validate_with(&borrowed(&parsed), &BTreeMap::new(), &rejected_models) {
                Ok(set) => return (set, errors),
                Err(es) => {
                    let bad: BTreeSet<String> = es.iter().map(|e| e.file.clone()).collect();
                    for (file, docs) in parsed.iter().filter(|(f, _)| bad.contains(f)) {
                        for doc in docs {
                            if let Document::DeviceModel(m) = doc {
                                rejected_models.insert(m.name().to_owned(), file.clone());
                            }
                        }
                    }
                    let before = parsed.len();
                    parsed.retain(|(f, _)| !bad.contains(f));
                    errors.extend(es);
                    if parsed.len() == before {
                        return (ProfileSet::default(), errors);
                    }
                }
            }
        }
    }

    /// Documents: models m0..m2 (valid, or with an error), devices using one of them (valid, or
    /// with a property the model lacks), or an unknown model.
    fn doc(kind: u8, model: u8, name: usize) -> String {
        let m = format!("m{model}");
        match kind {
            0..=2 => format!("apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: {m}}}\nspec:\n  protocol: modbus\n  properties: [{{name: v, type: float, accessMode: ReadOnly}}]\n"),
            3 => format!("apiVersion: edgetwin/v1\nkind: DeviceModel\nmetadata: {{name: {m}}}\nspec:\n  protocol: modbus\n  properties: [{{name: v, type: float, accessMode: ReadOnly, minimum: 9, maximum: 1}}]\n"),
            _ => {
                let (model, prop, port) = match kind {
                    4 => ("nope".to_string(), "v", 502),
                    5 => (m, "w", 502),
                    _ => (m, "v", 502),
                };
                format!("apiVersion: edgetwin/v1\nkind: Device\nmetadata: {{name: d{name}}}\nspec:\n  deviceModelRef: {model}\n  protocol:\n    modbus: {{communicateMode: TCP, ip: 127.0.0.1, port: {port}, slaveID: 1}}\n  properties:\n    - name: {prop}\n      visitors:\n        modbus: {{register: HoldingRegister, offset: 0, limit: 2, dataType: float32}}\n")
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Predicted rounds reject the same files with the same errors, in the same order, as
        /// full validation in every round, and leave the same set.
        #[test]
        fn settle_matches_validating_every_round(
            files in prop::collection::vec(
                prop::collection::vec((0..12u8, 0..3u8, 0..40usize), 1..4),
                1..7,
            ),
        ) {
            let parsed: Vec<(String, Vec<Document>)> = files
                .iter()
                .enumerate()
                .map(|(f, docs)| {
                    let text: Vec<String> =
                        docs.iter().map(|&(k, m, n)| doc(k, m, n)).collect();
                    let name = format!("f{f}.yaml");
                    let parsed = parse_str(&name, &text.join("---\n")).unwrap();
                    (name, parsed)
                })
                .collect();
            prop_assert_eq!(settle(&parsed), settle_reference(&parsed));
        }
    }

    #[test]
    fn rejections_spread_along_model_references() {
        let model = doc(3, 0, 0);
        let uses_m0_defines_m1 = format!("{}---\n{}", doc(6, 0, 1), doc(0, 1, 0));
        let uses_m1 = doc(6, 1, 2);
        let ok = doc(6, 2, 3);
        let parsed: Vec<(String, Vec<Document>)> = [
            ("a.yaml", model),
            ("b.yaml", uses_m0_defines_m1),
            ("c.yaml", uses_m1),
            ("d.yaml", format!("{}---\n{ok}", doc(0, 2, 0))),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), parse_str(n, t).unwrap()))
        .collect();
        let (set, errors) = settle(&parsed);
        assert_eq!(settle_reference(&parsed), (set.clone(), errors.clone()));
        let files: Vec<&str> = errors.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(files, ["a.yaml", "b.yaml", "c.yaml"]);
        assert_eq!(
            errors[2].message,
            "device model \"m1\" is defined in b.yaml, which has errors"
        );
        assert_eq!(errors[2].line, Some(5));
        assert_eq!(set.devices.len(), 1);
    }
}
