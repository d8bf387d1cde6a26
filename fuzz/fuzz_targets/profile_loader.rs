//! Arbitrary text as a profile file through the loader and the cross-document validation: never
//! panics, and every error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match edgetwin_profile::parse_str("fuzz.yaml", text) {
        Ok(docs) => {
            let files = vec![("fuzz.yaml".to_string(), docs)];
            if let Err(errors) = edgetwin_profile::validate(&files, &Default::default()) {
                assert!(errors.iter().all(|e| e.file == "fuzz.yaml"));
            }
        }
        Err(errors) => assert!(errors.iter().all(|e| e.file == "fuzz.yaml")),
    }
});
