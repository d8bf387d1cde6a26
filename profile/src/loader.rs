//! Loading a folder of profile files: the only place this crate touches the file system.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::validate::{borrowed, validate_with};
use crate::{parse_str, Document, ProfileError, ProfileSet};

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

    // Rejecting a file can break references from other files, so validate until nothing more
    // is rejected. Every round removes at least one file, so this ends.
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
