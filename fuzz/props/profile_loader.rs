//! Arbitrary text as a profile file through the loader and the cross-document validation: never
//! panics, and every error names the file.
//!
//! Shared by the cargo-fuzz target of the same name and the stable replay of the committed
//! corpus (`fuzz/corpus/profile_loader/`) in the test command.

/// The property, for one input: panics (an assertion) when it does not hold.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match edgetwin_profile::parse_str("fuzz.yaml", text) {
        Ok(docs) => {
            let files = vec![("fuzz.yaml".to_string(), docs)];
            if let Err(errors) = edgetwin_profile::validate(&files, &Default::default()) {
                assert!(errors.iter().all(|e| e.file == "fuzz.yaml"));
            }
        }
        Err(errors) => assert!(errors.iter().all(|e| e.file == "fuzz.yaml")),
    }
}
