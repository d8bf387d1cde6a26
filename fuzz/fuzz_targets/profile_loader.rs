//! Arbitrary text as a profile file through the loader and the cross-document validation: never
//! panics, and every error names the file.
#![no_main]

#[path = "../props/profile_loader.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check(data));
